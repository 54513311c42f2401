-- 004: deletes and checklist progress.
-- One row per photo an operator (or a revised checklist) asked to delete. While `done_at`
-- is NULL the delete is pending (the attachment is `queued_delete`, or `failed` when the
-- remote refused it for good). Once done, a row with keep_local = 0 is the tombstone that
-- keeps a rescan from taking the same bytes at the same path again.
CREATE TABLE deletes (
    attachment_id TEXT PRIMARY KEY REFERENCES attachments (id) ON DELETE CASCADE,
    requested_at  INTEGER NOT NULL,
    source        TEXT NOT NULL,           -- cli | mqtt | checklist
    from_state    TEXT NOT NULL,           -- the state the photo was in when asked
    keep_local    INTEGER NOT NULL DEFAULT 0, -- 1: only the remote object goes (unreferenced)
    done_at       INTEGER
);

-- What the publisher last found for each checklist with a checklist.json: the progress
-- object of the status JSON, when it began waiting, and whether that wait was reported as
-- stalled (so a restart does not report it again).
CREATE TABLE checklists (
    name          TEXT PRIMARY KEY,
    progress      TEXT NOT NULL,           -- JSON, the status `checklists[]` object
    waiting_since INTEGER,                 -- unix ms; NULL once published
    stalled_at    INTEGER,                 -- unix ms of its checklist_stalled event
    published_at  INTEGER,                 -- unix ms of the publication of the current content
    updated_at    INTEGER NOT NULL
);
