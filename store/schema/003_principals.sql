-- Who may teach the model. Every request is made by a principal (an API key's name, or
-- `local` on a server with no keys); what it sends is recorded with it, and a signal teaches
-- only if its principal held the `feedback` scope when it was sent and has not been revoked
-- since. With `learner.review` on, a signal also waits for a person's approval.

-- One row per API key (`sdloop keys add|list|revoke`); only the key's sha256 is kept.
CREATE TABLE api_keys (
    name       VARCHAR PRIMARY KEY,        -- the principal: recorded on all it sends
    key_hash   VARCHAR NOT NULL UNIQUE,    -- sha256 of the key, hex
    scopes     VARCHAR[] NOT NULL,         -- chat | feedback (may teach) | admin
    created_at TIMESTAMP NOT NULL,
    revoked_at TIMESTAMP                   -- set by `revoke`: its signals stop teaching
);

ALTER TABLE completions ADD COLUMN principal VARCHAR;
ALTER TABLE feedback ADD COLUMN principal VARCHAR;
ALTER TABLE feedback ADD COLUMN may_teach BOOLEAN;   -- had the feedback scope when sent
ALTER TABLE followups ADD COLUMN principal VARCHAR;
ALTER TABLE followups ADD COLUMN may_teach BOOLEAN;

-- A person's decision on a signal (review mode: `sdloop review approve|reject`).
CREATE TABLE signal_reviews (
    signal_id  VARCHAR PRIMARY KEY,   -- a feedback or followups id
    decision   VARCHAR NOT NULL,      -- approved | rejected
    reviewer   VARCHAR NOT NULL,
    decided_at TIMESTAMP NOT NULL
);

-- Every signal on a completion, explicit feedback and follow-ups alike, with whether it may
-- teach (rows from before principals existed were accepted from anyone the server served,
-- as they are kept) and its review decision, if any.
CREATE VIEW signals AS
WITH s AS (
    SELECT id, completion_id, created_at, 'feedback' AS origin, type, score, text, metadata,
           NULL AS next_completion_id, principal, may_teach
    FROM feedback
    UNION ALL
    SELECT id, completion_id, created_at, 'followup', 'followup', NULL, text, NULL,
           next_completion_id, principal, may_teach
    FROM followups
)
SELECT s.*,
       coalesce(s.may_teach, true) AND NOT EXISTS (
           SELECT 1 FROM api_keys k WHERE k.name = s.principal AND k.revoked_at IS NOT NULL
       ) AS teaches,
       r.decision AS review
FROM s LEFT JOIN signal_reviews r ON r.signal_id = s.id;

-- Signals waiting for a decision in review mode: those that may teach and have text.
CREATE VIEW review_queue AS
SELECT s.id, s.origin, s.type, s.text, s.principal, s.created_at, s.completion_id,
       c.messages, c.response_text
FROM signals s JOIN completions c ON c.id = s.completion_id
WHERE s.teaches AND s.review IS NULL AND coalesce(trim(s.text), '') <> ''
ORDER BY s.created_at;

DROP VIEW episodes;
-- The learner's input: each completion with its signals (each naming its principal, whether
-- it may teach, and its review decision).
CREATE VIEW episodes AS
WITH fb AS (
    SELECT completion_id,
           list({'id': id, 'type': type, 'score': score, 'text': text, 'metadata': metadata,
                 'created_at': created_at, 'principal': principal, 'teaches': teaches,
                 'review': review} ORDER BY created_at) AS feedback
    FROM signals WHERE origin = 'feedback' GROUP BY completion_id
), fu AS (
    SELECT completion_id,
           list({'id': id, 'text': text, 'next_completion_id': next_completion_id,
                 'created_at': created_at, 'principal': principal, 'teaches': teaches,
                 'review': review} ORDER BY created_at) AS followups
    FROM signals WHERE origin = 'followup' GROUP BY completion_id
)
SELECT c.id AS completion_id, c.created_at, c.alias, c.version, c.messages, c.params,
       c.response_text, c.prompt_token_ids, c.token_ids, c.finish_reason, c.status,
       c.principal,
       coalesce(fb.feedback, []) AS feedback,
       coalesce(fu.followups, []) AS followups,
       (fb.feedback IS NOT NULL OR fu.followups IS NOT NULL) AS has_signal
FROM completions c
LEFT JOIN fb ON fb.completion_id = c.id
LEFT JOIN fu ON fu.completion_id = c.id;
