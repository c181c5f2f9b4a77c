-- tiergate 001: the routing table in Postgres (providers, models, routes, aliases) and change
-- notification. Applied once by `tiergate db init` (tracked in schema_migrations); written so
-- that running it again by hand is harmless too.

CREATE TABLE IF NOT EXISTS llm_providers (
    name              text PRIMARY KEY,
    kind              text NOT NULL DEFAULT 'openai',           -- openai | mock
    base_url          text NOT NULL DEFAULT '',
    api_key_env       text,                                     -- the variable holding the key (preferred)
    api_key_header    text NOT NULL DEFAULT 'Authorization',
    api_key           text,                                     -- a literal key, for local providers
    headers           jsonb NOT NULL DEFAULT '{}'::jsonb,       -- values may use ${ENV_VAR}
    failure_threshold integer,
    recovery_timeout  double precision,
    max_concurrency   integer,
    models            text[] NOT NULL DEFAULT '{}',
    enabled           boolean NOT NULL DEFAULT true,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS llm_models (
    provider                 text NOT NULL,
    model                    text NOT NULL,                     -- the id sent upstream
    context_window           integer,
    input_price_per_million  double precision,                  -- USD per million input tokens
    output_price_per_million double precision,                  -- USD per million output tokens
    available                boolean NOT NULL DEFAULT true,
    discovered_at            timestamptz,                       -- last seen in the provider's GET /models
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model)
);

-- use_case, tier and model are checked by tiergate when it loads the table (a bad row is
-- skipped and reported in /health/details), not by constraints, so one bad edit never
-- blocks the rest.
CREATE TABLE IF NOT EXISTS llm_routes (
    use_case      text NOT NULL,
    tier          text NOT NULL,
    model         text NOT NULL,                                -- provider/model-id
    fallbacks     text[] NOT NULL DEFAULT '{}',
    max_tokens    integer,
    temperature   real,
    system_prompt text,
    cache         text NOT NULL DEFAULT 'auto',
    cache_ttl     integer,
    enabled       boolean NOT NULL DEFAULT true,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, tier)
);

CREATE TABLE IF NOT EXISTS llm_aliases (
    alias      text PRIMARY KEY,
    model      text NOT NULL,                                   -- provider/model-id
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- keep updated_at honest whoever writes the row
CREATE OR REPLACE FUNCTION tiergate_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

-- one notification per statement; the payload names the schema so sidecars sharing a
-- database but not a schema ignore each other
CREATE OR REPLACE FUNCTION tiergate_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tiergate_config', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    RETURN NULL;
END $$;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['llm_providers', 'llm_models', 'llm_routes', 'llm_aliases'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', t || '_touch', t);
        EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON %I FOR EACH ROW EXECUTE FUNCTION tiergate_touch()',
                       t || '_touch', t);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', t || '_notify', t);
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION tiergate_notify()', t || '_notify', t);
    END LOOP;
END $$;
