-- Agent traffic: the tool calls an answer made, the results an agent sent back for them (a
-- failed one teaches like `env_error` feedback), and OpenAI's `metadata` and `user`.

ALTER TABLE completions ADD COLUMN metadata JSON;     -- the request's `metadata` (string map)
ALTER TABLE completions ADD COLUMN end_user VARCHAR;  -- the request's `user`

-- One row per tool call in an answer (`response_message.tool_calls`).
CREATE TABLE tool_calls (
    completion_id VARCHAR NOT NULL,   -- the answer that made the call
    idx           INTEGER NOT NULL,   -- its place among the answer's calls
    call_id       VARCHAR,            -- the id the engine gave it (`tool_calls[].id`)
    name          VARCHAR,
    arguments     VARCHAR,            -- as the model wrote them: JSON text, or not
    PRIMARY KEY (completion_id, idx)
);
CREATE INDEX tool_calls_call_id ON tool_calls (call_id);

INSERT INTO tool_calls
SELECT id, i - 1, call ->> 'id', call -> 'function' ->> 'name', call -> 'function' ->> 'arguments'
FROM (SELECT id, generate_subscripts(calls, 1) AS i, unnest(calls) AS call
      FROM (SELECT id, response_message -> '$.tool_calls[*]' AS calls FROM completions
            WHERE json_array_length(response_message -> 'tool_calls') > 0));

-- A tool's result, as the agent sent it back (a `tool` message in its next request).
CREATE TABLE tool_results (
    id                 VARCHAR PRIMARY KEY,
    completion_id      VARCHAR NOT NULL,   -- the answer whose call it answers
    call_id            VARCHAR,
    name               VARCHAR,            -- the tool
    next_completion_id VARCHAR NOT NULL,   -- the request it arrived in
    created_at         TIMESTAMP NOT NULL,
    content            VARCHAR NOT NULL,
    is_error           BOOLEAN NOT NULL,
    error              VARCHAR,            -- why it counts as failed: the signal's text
    matched_by         VARCHAR NOT NULL,   -- call_id | context: how it found its answer
    principal          VARCHAR,
    may_teach          BOOLEAN
);

-- Answers whose tool calls all came back without failing, per tool: the successes a failed
-- call to the same tool earlier in the same conversation learns from (learner, export).
CREATE VIEW tool_successes AS
SELECT c.id AS completion_id, c.session_id, r.name, c.created_at
FROM tool_results r JOIN completions c ON c.id = r.completion_id
WHERE c.status = 'ok' AND c.session_id IS NOT NULL AND r.name IS NOT NULL
GROUP BY ALL HAVING NOT bool_or(r.is_error);

DROP VIEW episodes;
DROP VIEW review_queue;
DROP VIEW signals;

-- Every signal on a completion: explicit feedback, follow-ups, and failed tool results (as
-- `env_error`, the error their text), with whether it may teach and its review decision.
CREATE VIEW signals AS
WITH s AS (
    SELECT id, completion_id, created_at, 'feedback' AS origin, type, score, text, metadata,
           NULL AS next_completion_id, principal, may_teach
    FROM feedback
    UNION ALL
    SELECT id, completion_id, created_at, 'followup', 'followup', NULL, text, NULL,
           next_completion_id, principal, may_teach
    FROM followups
    UNION ALL
    SELECT id, completion_id, created_at, 'tool_result', 'env_error', NULL, error,
           json_object('call_id', call_id, 'tool', name), next_completion_id, principal,
           may_teach
    FROM tool_results WHERE is_error
)
SELECT s.*,
       coalesce(s.may_teach, true) AND NOT EXISTS (
           SELECT 1 FROM api_keys k WHERE k.name = s.principal AND k.revoked_at IS NOT NULL
       ) AS teaches,
       r.decision AS review
FROM s LEFT JOIN signal_reviews r ON r.signal_id = s.id;

CREATE VIEW review_queue AS
SELECT s.id, s.origin, s.type, s.text, s.principal, s.created_at, s.completion_id,
       c.messages, c.response_text
FROM signals s JOIN completions c ON c.id = s.completion_id
WHERE s.teaches AND s.review IS NULL AND coalesce(trim(s.text), '') <> ''
ORDER BY s.created_at;

-- The learner's input: each completion with its signals. A failed tool result arrives among
-- `feedback` as an `env_error`, exactly as one a client sends explicitly.
CREATE VIEW episodes AS
WITH fb AS (
    SELECT completion_id,
           list({'id': id, 'type': type, 'score': score, 'text': text, 'metadata': metadata,
                 'created_at': created_at, 'principal': principal, 'teaches': teaches,
                 'review': review} ORDER BY created_at) AS feedback
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
