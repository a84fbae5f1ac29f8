-- Feedback that carries a call: a demonstration or correction of an agent's answer may hold
-- the tool call(s) the answer should have made (OpenAI's shape, checked against the tools of
-- the request it answers when it is written). Signals and episodes carry them to the learner
-- and the review queue.

ALTER TABLE feedback ADD COLUMN tool_calls JSON;

DROP VIEW episodes;
DROP VIEW review_queue;
DROP VIEW signals;

CREATE VIEW signals AS
WITH s AS (
    SELECT id, completion_id, created_at, 'feedback' AS origin, type, score, text, metadata,
           NULL AS next_completion_id, principal, may_teach, tool_calls
    FROM feedback
    UNION ALL
    SELECT id, completion_id, created_at, 'followup', 'followup', NULL, text, NULL,
           next_completion_id, principal, may_teach, NULL
    FROM followups
    UNION ALL
    SELECT id, completion_id, created_at, 'tool_result', 'env_error', NULL, error,
           json_object('call_id', call_id, 'tool', name), next_completion_id, principal,
           may_teach, NULL
    FROM tool_results WHERE is_error
)
SELECT s.*,
       coalesce(s.may_teach, true) AND NOT EXISTS (
           SELECT 1 FROM api_keys k WHERE k.name = s.principal AND k.revoked_at IS NOT NULL
       ) AS teaches,
       r.decision AS review
FROM s LEFT JOIN signal_reviews r ON r.signal_id = s.id;

-- A call without text is reviewed as the calls' JSON.
CREATE VIEW review_queue AS
SELECT s.id, s.origin, s.type, coalesce(s.text, CAST(s.tool_calls AS VARCHAR)) AS text,
       s.principal, s.created_at, s.completion_id, c.messages, c.response_text
FROM signals s JOIN completions c ON c.id = s.completion_id
WHERE s.teaches AND s.review IS NULL
  AND coalesce(trim(s.text), '') || coalesce(CAST(s.tool_calls AS VARCHAR), '') <> ''
ORDER BY s.created_at;

CREATE VIEW episodes AS
WITH fb AS (
    SELECT completion_id,
           list({'id': id, 'type': type, 'score': score, 'text': text, 'metadata': metadata,
                 'created_at': created_at, 'principal': principal, 'teaches': teaches,
                 'review': review, 'tool_calls': tool_calls} ORDER BY created_at) AS feedback
    FROM signals WHERE origin IN ('feedback', 'tool_result') GROUP BY completion_id
), fu AS (
    SELECT completion_id,
           list({'id': id, 'text': text, 'next_completion_id': next_completion_id,
                 'created_at': created_at, 'principal': principal, 'teaches': teaches,
                 'review': review} ORDER BY created_at) AS followups
    FROM signals WHERE origin = 'followup' GROUP BY completion_id
)
SELECT c.id AS completion_id, c.created_at, c.alias, c.version, c.messages, c.params,
       c.response_text, c.response_message, c.prompt_token_ids, c.token_ids, c.finish_reason,
       c.status, c.principal, c.session_id,
       coalesce(fb.feedback, []) AS feedback,
       coalesce(fu.followups, []) AS followups,
       (fb.feedback IS NOT NULL OR fu.followups IS NOT NULL) AS has_signal
FROM completions c
LEFT JOIN fb ON fb.completion_id = c.id
LEFT JOIN fu ON fu.completion_id = c.id;
