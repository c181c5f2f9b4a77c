-- tiergate 002: rate limits and budgets (the table file's `limits:`), live-reloaded like routes.
-- Applied once by `tiergate db init` (tracked in schema_migrations); safe to run again by hand.

-- Scope columns left NULL match every request; the kinds left NULL are not limited. Values are
-- checked by tiergate when it loads the table (a bad row is skipped and listed in
-- /health/details), not by constraints, so one bad edit never blocks the rest.
CREATE TABLE IF NOT EXISTS llm_limits (
    name                text PRIMARY KEY,                        -- named in 429 messages and metrics
    key_name            text,                                    -- an inbound key's name (TIERGATE_API_KEYS name=key)
    use_case            text,
    tier                text,
    route               text,                                    -- use_case:tier, alias:<name> or override
    model               text,                                    -- provider/model-id: the route's first candidate
    requests_per_minute integer,
    tokens_per_minute   bigint,                                  -- input + output tokens
    usd_per_day         double precision,                        -- the UTC day
    usd_per_month       double precision,                        -- the UTC month
    on_budget_exceeded  text,                                    -- a tier to downgrade to; NULL: 429 budget_exceeded
    enabled             boolean NOT NULL DEFAULT true,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

DROP TRIGGER IF EXISTS llm_limits_touch ON llm_limits;
CREATE TRIGGER llm_limits_touch BEFORE UPDATE ON llm_limits FOR EACH ROW EXECUTE FUNCTION tiergate_touch();
DROP TRIGGER IF EXISTS llm_limits_notify ON llm_limits;
CREATE TRIGGER llm_limits_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON llm_limits
    FOR EACH STATEMENT EXECUTE FUNCTION tiergate_notify();
