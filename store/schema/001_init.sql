-- sdloop feedback store, version 1. All timestamps are UTC.

-- One row per answered chat request.
CREATE TABLE completions (
    id                VARCHAR PRIMARY KEY,      -- the response `id` the client saw
    event_id          VARCHAR NOT NULL,
    created_at        TIMESTAMP NOT NULL,
    session_id        VARCHAR,
    alias             VARCHAR NOT NULL,         -- what the client asked for (`model`)
    version           VARCHAR NOT NULL,         -- the adapter version that answered
    messages          JSON NOT NULL,            -- the exact prompt messages
    params            JSON NOT NULL,            -- sampling and other request parameters
    stream            BOOLEAN NOT NULL,
    response_text     VARCHAR,
    response_message  JSON,                     -- the full assistant message (tool calls…)
    finish_reason     VARCHAR,
    prompt_token_ids  INTEGER[],
    token_ids         INTEGER[],                -- the exact response ids the engine produced
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_ms        DOUBLE,
    ttft_ms           DOUBLE,
    status            VARCHAR NOT NULL,         -- ok | client_disconnected | engine_error
    error             VARCHAR,
    context_hash      VARCHAR,                  -- follow-up linking keys
    reply_hash        VARCHAR
);

-- Explicit feedback on a completion.
CREATE TABLE feedback (
    id            VARCHAR PRIMARY KEY,
    completion_id VARCHAR NOT NULL,
    created_at    TIMESTAMP NOT NULL,
    type          VARCHAR NOT NULL,   -- rating | correction | critique | env_error | demonstration
    score         DOUBLE,
    text          VARCHAR,
    metadata      JSON
);

-- A user message that came right after a stored reply (hindsight context for it).
CREATE TABLE followups (
    id                 VARCHAR PRIMARY KEY,
    completion_id      VARCHAR NOT NULL,   -- the reply it follows
    next_completion_id VARCHAR NOT NULL,   -- the request it arrived in
    created_at         TIMESTAMP NOT NULL,
    text               VARCHAR NOT NULL,
    matched_by         VARCHAR NOT NULL    -- context | reply: which linking hash matched
);

-- Every model version the server can answer with; `base` is the model without an adapter.
CREATE TABLE adapter_versions (
    version    VARCHAR PRIMARY KEY,     -- e.g. default@v3
    alias      VARCHAR,
    parent     VARCHAR,
    path       VARCHAR,                 -- immutable folder of the adapter; NULL for base
    status     VARCHAR NOT NULL,        -- base | candidate | promoted | rejected | retired
    created_at TIMESTAMP NOT NULL,
    manifest   JSON
);

-- Aliases clients name in `model`, and the version each points at now.
CREATE TABLE aliases (
    alias      VARCHAR PRIMARY KEY,
    version    VARCHAR NOT NULL,
    previous   VARCHAR,                 -- where `rollback` goes
    updated_at TIMESTAMP NOT NULL
);

-- The learner's input: each completion with its explicit feedback and follow-ups.
CREATE VIEW episodes AS
WITH fb AS (
    SELECT completion_id,
           list({'id': id, 'type': type, 'score': score, 'text': text,
                 'metadata': metadata, 'created_at': created_at} ORDER BY created_at) AS feedback
    FROM feedback GROUP BY completion_id
), fu AS (
    SELECT completion_id,
           list({'text': text, 'next_completion_id': next_completion_id,
                 'created_at': created_at} ORDER BY created_at) AS followups
    FROM followups GROUP BY completion_id
)
SELECT c.id AS completion_id, c.created_at, c.alias, c.version, c.messages, c.params,
       c.response_text, c.prompt_token_ids, c.token_ids, c.finish_reason, c.status,
       coalesce(fb.feedback, []) AS feedback,
       coalesce(fu.followups, []) AS followups,
       (fb.feedback IS NOT NULL OR fu.followups IS NOT NULL) AS has_signal
FROM completions c
LEFT JOIN fb ON fb.completion_id = c.id
LEFT JOIN fu ON fu.completion_id = c.id;
