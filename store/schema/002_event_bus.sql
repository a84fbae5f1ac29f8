-- The Kafka path: what the ingester could not store, and which version each replica serves.

-- A message the ingester could not store as an event, kept with the reason instead of being
-- dropped or blocking its partition. One row per message (`<topic>:<partition>:<offset>`), so
-- a redelivered poison message is recorded once. Feedback that names a completion not stored
-- yet (it travelled on another partition) waits here with reason_code 'unknown_completion'
-- and is stored, and its row deleted, when that completion arrives.
CREATE TABLE dead_letters (
    id            VARCHAR PRIMARY KEY,
    received_at   TIMESTAMP NOT NULL,
    topic         VARCHAR NOT NULL,
    "partition"   INTEGER NOT NULL,
    "offset"      BIGINT NOT NULL,
    key           VARCHAR,
    payload       VARCHAR NOT NULL,     -- the message as received (invalid UTF-8 replaced)
    reason_code   VARCHAR NOT NULL,     -- not_json | invalid_event | unknown_completion | write_failed
    reason        VARCHAR NOT NULL,     -- what was wrong, for a person
    event_id      VARCHAR,
    completion_id VARCHAR
);

-- What each serving replica did with each adapter version (reported over the events topic).
CREATE TABLE replica_versions (
    id        VARCHAR PRIMARY KEY,      -- the report's event id
    replica   VARCHAR NOT NULL,
    alias     VARCHAR,
    version   VARCHAR NOT NULL,
    action    VARCHAR NOT NULL,         -- publish | promote | rollback
    status    VARCHAR NOT NULL,         -- promoted | candidate | rejected | failed
    detail    VARCHAR,
    created_at TIMESTAMP NOT NULL
);
