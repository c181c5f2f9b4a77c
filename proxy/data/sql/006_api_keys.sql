-- tiergate 006: inbound keys a shared gateway can run on: stored hashed, with an expiry, a revocation
-- and scopes, created, rotated and revoked by `tiergate keys ...`, live-reloaded like routes.
-- Applied once by `tiergate db init` (tracked in schema_migrations); safe to run again by hand.

-- The secret itself is never stored: only its SHA-256 (the secret is 256 random bits, so a plain hash
-- is enough) and a short prefix that identifies it in `keys list`. The scope columns left NULL do not
-- restrict; `credentials` holds, per provider, what the key's calls send it instead of tiergate's
-- (an OpenAI-Project, an organization, the name of the environment variable holding the key's own
-- provider key): never a secret itself.
CREATE TABLE IF NOT EXISTS llm_api_keys (
    name                 text PRIMARY KEY,                 -- limits, logs and metrics name the key by it
    secret_hash          bytea NOT NULL UNIQUE,            -- sha256 of the secret
    prefix               text NOT NULL,                    -- the secret's first characters (tg-xxxxxx)
    previous_hash        bytea,                            -- the secret before the last rotation ...
    previous_expires_at  timestamptz,                      -- ... still valid until then
    expires_at           timestamptz,                      -- NULL: never
    revoked              boolean NOT NULL DEFAULT false,
    revoked_at           timestamptz,
    routes               text[],                           -- use_case:tier
    use_cases            text[],
    tiers                text[],
    models               text[],                           -- aliases, provider/model, provider/*
    credentials          jsonb,                            -- {provider: {project, organization, api_key_env}}
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

DROP TRIGGER IF EXISTS llm_api_keys_touch ON llm_api_keys;
CREATE TRIGGER llm_api_keys_touch BEFORE UPDATE ON llm_api_keys FOR EACH ROW EXECUTE FUNCTION tiergate_touch();
DROP TRIGGER IF EXISTS llm_api_keys_notify ON llm_api_keys;
CREATE TRIGGER llm_api_keys_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON llm_api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION tiergate_notify();
