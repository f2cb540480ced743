-- One row per write, committed with it: the keys it invalidates (tiers.coherence.outbox).
CREATE TABLE IF NOT EXISTS cache_outbox (
    id          BIGSERIAL   PRIMARY KEY,
    keys        TEXT[]      NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS cache_outbox_created_at ON cache_outbox (created_at);
