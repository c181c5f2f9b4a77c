-- tiergate 008: the failure policy's route settings, as in the YAML file. `retry_same`: more tries of the
-- same deployment before the next candidate (NULL: the default, one after a short 429). `fallback_continuations`:
-- how a fallback continues an answer a stream recovery hands it, by its provider/model
-- ({"backup/model-b": "prefix"}; a fallback not named: its model rule's, else its provider's).
-- `stream_recovery` (003) NULL is now the default, continue; `off` turns it off.

ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS retry_same integer;
ALTER TABLE llm_routes ADD COLUMN IF NOT EXISTS fallback_continuations jsonb;
