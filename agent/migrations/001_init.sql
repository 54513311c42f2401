-- 001: the attachment queue, its event log, multipart resume state and daemon control.
-- Columns up to meta_data are the attachment-queue seed columns; the rest are fieldsync's.
CREATE TABLE attachments (
    id              TEXT PRIMARY KEY,          -- UUID v4, part of the object key
    filename        TEXT NOT NULL,             -- base name as captured
    local_uri       TEXT NOT NULL,             -- absolute path of the local file
    timestamp       INTEGER NOT NULL,          -- unix ms of the last change to this row
    size            INTEGER NOT NULL,          -- bytes, as hashed at ingest
    media_type      TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN
                      ('queued_upload','synced','queued_delete','queued_download','archived','failed')),
    has_synced      INTEGER NOT NULL DEFAULT 0, -- 1 once the object was confirmed remotely
    meta_data       TEXT,                      -- sidecar JSON, verbatim
    checklist       TEXT NOT NULL,
    row             TEXT NOT NULL,
    sha256          TEXT NOT NULL,             -- hex; '' when the file could not be read
    mtime_ns        INTEGER NOT NULL,          -- local mtime at ingest: dedup across rescans
    object_key      TEXT NOT NULL,
    created_at      INTEGER NOT NULL,          -- unix ms of ingest: queue order, pending age
    bytes_sent      INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,                      -- human reason of the last failure
    last_error_code TEXT,                      -- stable reason code of the last failure
    upload_id       TEXT,                      -- multipart upload id being resumed
    part_size       INTEGER,                   -- part size chosen for upload_id
    uploading_since INTEGER,                   -- set while a worker holds the row (status only)
    synced_at       INTEGER,
    remote_etag     TEXT
);
CREATE INDEX attachments_queue ON attachments (state, next_attempt_at, created_at);
CREATE INDEX attachments_uri ON attachments (local_uri);
CREATE INDEX attachments_checklist ON attachments (checklist, row);

CREATE TABLE upload_parts (
    attachment_id TEXT NOT NULL REFERENCES attachments (id) ON DELETE CASCADE,
    part_number   INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    etag          TEXT NOT NULL,
    checksum      TEXT NOT NULL,
    PRIMARY KEY (attachment_id, part_number)
);

CREATE TABLE events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    time          INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    outcome       TEXT NOT NULL CHECK (outcome IN ('applied','skipped','failed')),
    attachment_id TEXT,
    checklist     TEXT,
    row           TEXT,
    from_state    TEXT,
    to_state      TEXT,
    reason        TEXT
);

-- Small key/value table shared by the daemon and the CLI: operator pause, wake requests,
-- the daemon's pid and heartbeat, its current pause reason and condition facts.
CREATE TABLE control (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
