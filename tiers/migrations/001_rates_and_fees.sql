CREATE TABLE IF NOT EXISTS exchange_rates (
    base        TEXT        NOT NULL CHECK (base ~ '^[A-Z0-9]{1,12}$'),
    quote       TEXT        NOT NULL CHECK (quote ~ '^[A-Z0-9]{1,12}$'),
    rate        NUMERIC     NOT NULL CHECK (rate > 0),
    source      TEXT        NOT NULL DEFAULT 'manual',
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (base, quote)
);

CREATE TABLE IF NOT EXISTS fee_structures (
    fee_type    TEXT        PRIMARY KEY CHECK (fee_type ~ '^[a-z0-9_]{1,32}$'),
    rate_bps    INTEGER     NOT NULL CHECK (rate_bps >= 0 AND rate_bps <= 10000),
    flat        NUMERIC     NOT NULL CHECK (flat >= 0),
    min         NUMERIC     NOT NULL CHECK (min >= 0),
    max         NUMERIC     NOT NULL CHECK (max >= min),
    currency    TEXT        NOT NULL CHECK (currency ~ '^[A-Z0-9]{1,12}$'),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
