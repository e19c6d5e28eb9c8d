-- The event outbox: each verified event once (the node's exact bytes), and its delivery to
-- each event server.
CREATE TABLE outbox (
    event_id    TEXT PRIMARY KEY,
    event_type  TEXT NOT NULL,
    package     BYTEA NOT NULL,
    received_ms BIGINT NOT NULL
);

CREATE TABLE outbox_deliveries (
    event_id         TEXT NOT NULL REFERENCES outbox (event_id) ON DELETE CASCADE,
    server           TEXT NOT NULL,
    state            TEXT NOT NULL,          -- pending, delivered, dropped
    attempts         BIGINT NOT NULL DEFAULT 0,
    created_ms       BIGINT NOT NULL,
    next_attempt_ms  BIGINT NOT NULL,
    claimed_by       TEXT,
    claimed_until_ms BIGINT,
    last_error       TEXT,
    PRIMARY KEY (event_id, server)
);
CREATE INDEX outbox_deliveries_due ON outbox_deliveries (server, state, next_attempt_ms);

-- Every APPROVE answer, written before it was sent.
CREATE TABLE approvals (
    request_id        TEXT NOT NULL,
    request_type      BIGINT NOT NULL,
    payload_sha256    TEXT NOT NULL,
    approved_ms       BIGINT NOT NULL,
    config_generation BIGINT NOT NULL,
    replica           TEXT NOT NULL
);
CREATE INDEX approvals_request ON approvals (request_id);
CREATE INDEX approvals_time ON approvals (approved_ms);

-- Alarms raised by reconciliation; one per kind and event.
CREATE TABLE alarms (
    kind       TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    request_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    node_id    TEXT NOT NULL,
    ts_ms      BIGINT NOT NULL,
    replica    TEXT NOT NULL,
    PRIMARY KEY (kind, event_id)
);
CREATE INDEX alarms_time ON alarms (ts_ms);

-- Each replica's last write, every few seconds: proves the store takes writes.
CREATE TABLE replicas (
    replica TEXT PRIMARY KEY,
    seen_ms BIGINT NOT NULL
);
