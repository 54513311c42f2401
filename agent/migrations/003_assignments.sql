-- 003: downloads. A row is either a captured photo ('capture', uploaded from the capture
-- folder) or a file an assignment names ('assignment', downloaded into paths.inbox; its
-- local_uri is the inbox path). Older rows are all captures.
ALTER TABLE attachments ADD COLUMN origin TEXT NOT NULL DEFAULT 'capture';
CREATE INDEX attachments_origin ON attachments (origin, state);
