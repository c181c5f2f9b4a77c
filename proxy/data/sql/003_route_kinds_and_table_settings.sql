-- tiergate 003: what a route and a provider may say beyond 001 (deadlines, the models of other kinds
-- of call, stream recovery, bring-your-own-key, the APIs a provider serves, stream usage) and the table's own settings (default
-- embeddings model, per-model parameter rules, pass-through), as in the YAML file.

ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS timeout double precision;
ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS first_byte_timeout double precision;
ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS embeddings_model text[] NOT NULL DEFAULT '{}';
ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS completions_model text[] NOT NULL DEFAULT '{}';
ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS stream_recovery text;             -- continue | NULL (off)

ALTER TABLE llm_providers ADD COLUMN IF NOT EXISTS first_byte_timeout double precision;
ALTER TABLE llm_providers ADD COLUMN IF NOT EXISTS pass_client_key boolean NOT NULL DEFAULT false;
ALTER TABLE llm_providers ADD COLUMN IF NOT EXISTS apis text[];                -- NULL: the kind's default
ALTER TABLE llm_providers ADD COLUMN IF NOT EXISTS stream_usage boolean;         -- NULL: the default (true)
ALTER TABLE llm_providers ADD COLUMN IF NOT EXISTS continuation text;            -- NULL: instruction

-- one row per table-level key of the file: embeddings_model, model_rules, passthrough_provider,
-- passthrough_paths; the value is the file's value as JSON
CREATE TABLE IF NOT EXISTS llm_table_settings (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

DROP TRIGGER IF EXISTS llm_table_settings_touch ON llm_table_settings;
CREATE TRIGGER llm_table_settings_touch BEFORE UPDATE ON llm_table_settings
    FOR EACH ROW EXECUTE FUNCTION tiergate_touch();
DROP TRIGGER IF EXISTS llm_table_settings_notify ON llm_table_settings;
CREATE TRIGGER llm_table_settings_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON llm_table_settings
    FOR EACH STATEMENT EXECUTE FUNCTION tiergate_notify();
