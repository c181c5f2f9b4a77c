-- tiergate 004: a route's shadow deployment (the file's `shadow: {model, share, max_concurrency}`), as JSON;
-- NULL: the route mirrors nothing. Safe to run again by hand.

ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS shadow jsonb;
