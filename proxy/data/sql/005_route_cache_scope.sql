-- tiergate 005: whose requests a route's cached answers and shared streams serve (the file's `cache_scope`):
-- NULL or `key`, only the inbound key that asked; `shared`, every key. Safe to run again by hand.

ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS cache_scope text;
