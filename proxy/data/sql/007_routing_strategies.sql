-- tiergate 007: how a route orders its candidates per request (the file's `strategy:` and `weights:`), and
-- aliases that name a route (the file's `aliases: {name: {model, fallbacks, strategy, ...}}` or
-- `{route: use_case:tier}`), as JSON. Groups of deployments (`groups:`) are a table setting
-- (llm_table_settings, key `groups`). NULL: ordered, no weights, a plain provider/model alias.
-- Safe to run again by hand.

ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS strategy text;                -- NULL: ordered
ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS weights double precision[];   -- one per candidate
ALTER TABLE llm_aliases ADD COLUMN IF NOT EXISTS route jsonb;                 -- NULL: `model` alone
