//! The SQLite store: the single source of truth for the attachment queue.
//!
//! Every state change is one transaction that updates the attachment row and appends a
//! row to the event log. The daemon and the CLI open the same file (WAL mode): readers
//! never block the daemon. A change the CLI commits reaches the daemon through the wake
//! file beside the database ([`Store::wake_file`]), with `PRAGMA data_version` as the
//! backstop.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::util::{now_ms, rfc3339};

/// Name of the wake file in the state directory.
pub const WAKE_FILE: &str = "wake";

/// Ordered migrations; `PRAGMA user_version` records how many have been applied.
const MIGRATIONS: &[(&str, &str)] = &[
    ("001_init", include_str!("migrations/001_init.sql")),
    ("002_ctime", include_str!("migrations/002_ctime.sql")),
    (
        "003_assignments",
        include_str!("migrations/003_assignments.sql"),
    ),
    ("004_deletes", include_str!("migrations/004_deletes.sql")),
];

/// The event log is trimmed to this many rows so it never grows without bound on a
/// device that runs for years; older events are of no use to an operator.
const MAX_EVENTS: i64 = 20_000;

/// How long a writer waits for another connection's write lock (the CLI and daemon share
/// the file). Writes are short, so this only bites when something is badly wrong.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Page cache per connection, in KiB (negative in the pragma). SQLite's default of 2 MiB
/// per connection, times the daemon's connections, would dominate its idle memory; the
/// queue's hot pages (the state index) fit easily.
const CACHE_KIB: i64 = -256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database schema version {found} is newer than this fieldsync knows ({known}); upgrade fieldsync")]
    TooNew { found: i64, known: i64 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("no attachment with id {0}")]
    NotFound(String),
    #[error("attachment {id} is {from}, cannot become {to}")]
    BadTransition { id: String, from: State, to: State },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The six attachment states of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum State {
    QueuedUpload,
    Synced,
    QueuedDelete,
    QueuedDownload,
    Archived,
    Failed,
}

impl State {
    pub const ALL: [State; 6] = [
        State::QueuedUpload,
        State::Synced,
        State::QueuedDelete,
        State::QueuedDownload,
        State::Archived,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::QueuedUpload => "queued_upload",
            State::Synced => "synced",
            State::QueuedDelete => "queued_delete",
            State::QueuedDownload => "queued_download",
            State::Archived => "archived",
            State::Failed => "failed",
        }
    }

    /// Whether the state machine allows `self → to`. Kept pure so it is unit-tested and
    /// every writer goes through it.
    pub fn can_become(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (QueuedUpload, Synced | Failed | Archived | QueuedDelete)
                | (Synced, Archived | QueuedDelete | QueuedUpload)
                | (QueuedDelete, Archived | Failed)
                | (Synced, QueuedDownload)
                | (QueuedDownload, Synced | Failed | Archived)
                | (
                    Archived,
                    Synced | QueuedUpload | QueuedDelete | QueuedDownload
                )
                | (
                    Failed,
                    QueuedUpload | QueuedDownload | Archived | QueuedDelete
                )
        )
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown state `{s}` (expected one of: {})",
                    State::ALL.map(|s| s.as_str()).join(", ")
                )
            })
    }
}

/// One row of the attachments table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Attachment {
    pub id: String,
    pub filename: String,
    pub local_uri: String,
    pub timestamp: i64,
    pub size: i64,
    pub media_type: String,
    pub state: State,
    pub has_synced: bool,
    pub meta_data: Option<String>,
    pub checklist: String,
    pub row: String,
    pub sha256: String,
    pub mtime_ns: i64,
    pub object_key: String,
    pub created_at: i64,
    pub bytes_sent: i64,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub last_error_code: Option<String>,
    pub upload_id: Option<String>,
    pub part_size: Option<i64>,
    pub uploading_since: Option<i64>,
    pub synced_at: Option<i64>,
    pub remote_etag: Option<String>,
    /// ctime when the file was hashed (see migration 002).
    pub ctime_ns: Option<i64>,
}

const ATTACHMENT_COLUMNS: &str = "id, filename, local_uri, timestamp, size, media_type, state, \
    has_synced, meta_data, checklist, row, sha256, mtime_ns, object_key, created_at, bytes_sent, \
    attempts, next_attempt_at, last_error, last_error_code, upload_id, part_size, \
    uploading_since, synced_at, remote_etag, ctime_ns";

impl Attachment {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        let state: String = r.get(6)?;
        Ok(Attachment {
            id: r.get(0)?,
            filename: r.get(1)?,
            local_uri: r.get(2)?,
            timestamp: r.get(3)?,
            size: r.get(4)?,
            media_type: r.get(5)?,
            state: State::from_str(&state).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, e.into())
            })?,
            has_synced: r.get::<_, i64>(7)? != 0,
            meta_data: r.get(8)?,
            checklist: r.get(9)?,
            row: r.get(10)?,
            sha256: r.get(11)?,
            mtime_ns: r.get(12)?,
            object_key: r.get(13)?,
            created_at: r.get(14)?,
            bytes_sent: r.get(15)?,
            attempts: r.get(16)?,
            next_attempt_at: r.get(17)?,
            last_error: r.get(18)?,
            last_error_code: r.get(19)?,
            upload_id: r.get(20)?,
            part_size: r.get(21)?,
            uploading_since: r.get(22)?,
            synced_at: r.get(23)?,
            remote_etag: r.get(24)?,
            ctime_ns: r.get(25)?,
        })
    }
}

/// What ingest knows about a new attachment.
#[derive(Debug, Clone)]
pub struct NewAttachment {
    pub id: String,
    pub filename: String,
    pub local_uri: String,
    pub size: i64,
    pub media_type: String,
    pub meta_data: Option<String>,
    pub checklist: String,
    pub row: String,
    pub sha256: String,
    pub mtime_ns: i64,
    pub object_key: String,
    /// ctime of the file when it was hashed.
    pub ctime_ns: Option<i64>,
    /// `queued_upload` normally; `failed` when the file exists but cannot be read.
    pub state: State,
    pub error: Option<(String, String)>,
}

/// What an event records. The strings are the wire schema (`fieldsync events`, MQTT
/// `…/events`, status; the README lists them) and the stored form: never rename one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A new attachment entered the queue (not published on MQTT: one per photo).
    Enqueued,
    Uploaded,
    /// A failed attempt that will be retried (the row stays `queued_upload`).
    RetryScheduled,
    Failed,
    Archived,
    /// Requeued by the operator.
    Retried,
    /// An archived record referenced again by a revised checklist.
    Restored,
    /// A local copy deleted for disk space.
    Evicted,
    /// Start-up repair settled a record.
    Repaired,
    PauseRequested,
    ResumeRequested,
    /// Uploads stopped running; the reason is the condition.
    Paused,
    /// Uploads run again; the reason is the condition that held them.
    Resumed,
    ConditionsChanged,
    DiskLow,
    ProbeFailed,
    SidecarInvalid,
    ChecklistPublished,
    ChecklistInvalid,
    /// The queue database was missing or corrupt at start and was created anew (the old
    /// file kept aside); the capture folder is rescanned into it.
    DatabaseRebuilt,
    /// `fieldsync reload` asked the daemon to re-read its configuration (reason: the
    /// source, `cli`).
    ReloadRequested,
    /// The daemon re-read its configuration: `applied` (reason: what changed live and
    /// what waits for a restart) or `failed` (reason: the one-line config error).
    ConfigReloaded,
    /// An episode that needs an operator began (`alarms.rs`): the oldest pending photo
    /// waits too long, a photo failed, the disk runs low. Once per episode.
    Alarm,
    /// The episode of an earlier `alarm` ended; same reason code.
    AlarmCleared,
    /// A file in the capture folder that is not read (a symbolic link, a FIFO, …):
    /// outcome `skipped`, reason `not_regular_file: <path>: <what>; not read`. Once per
    /// path and daemon run.
    FileSkipped,
    /// `fieldsync delete` / MQTT `cmd/delete` (reason: the source, `cli`, `mqtt`, or
    /// `checklist` for a photo a revised checklist no longer names): the photo is
    /// `queued_delete`. The delete ends with an `archived` event, reason `deleted`.
    DeleteRequested,
    /// A checklist waited longer than `upload.checklist_alarm_after` for its photos;
    /// once per wait (reason: what it waits for).
    ChecklistStalled,
    /// A file an assignment names was downloaded into the inbox (sha256 verified).
    Downloaded,
    /// An archived record beyond `retention.archived_cache_limit` was removed (with its
    /// local inbox copy).
    Expired,
    /// A kind this version does not know (written by a newer one): kept verbatim, so
    /// reading the log never fails on it.
    Other(String),
}

impl EventKind {
    /// Every kind this version writes.
    pub const KNOWN: [EventKind; 29] = [
        EventKind::Enqueued,
        EventKind::Uploaded,
        EventKind::RetryScheduled,
        EventKind::Failed,
        EventKind::Archived,
        EventKind::Retried,
        EventKind::Restored,
        EventKind::Evicted,
        EventKind::Repaired,
        EventKind::PauseRequested,
        EventKind::ResumeRequested,
        EventKind::Paused,
        EventKind::Resumed,
        EventKind::ConditionsChanged,
        EventKind::DiskLow,
        EventKind::ProbeFailed,
        EventKind::SidecarInvalid,
        EventKind::ChecklistPublished,
        EventKind::ChecklistInvalid,
        EventKind::DatabaseRebuilt,
        EventKind::ReloadRequested,
        EventKind::ConfigReloaded,
        EventKind::Alarm,
        EventKind::AlarmCleared,
        EventKind::FileSkipped,
        EventKind::DeleteRequested,
        EventKind::ChecklistStalled,
        EventKind::Downloaded,
        EventKind::Expired,
    ];

    /// The kinds status reports as `last_success`.
    pub const SUCCESS: [EventKind; 1] = [EventKind::Uploaded];
    /// The kinds status reports as `last_error`.
    pub const ERROR: [EventKind; 2] = [EventKind::Failed, EventKind::RetryScheduled];

    pub fn as_str(&self) -> &str {
        match self {
            EventKind::Enqueued => "enqueued",
            EventKind::Uploaded => "uploaded",
            EventKind::RetryScheduled => "retry_scheduled",
            EventKind::Failed => "failed",
            EventKind::Archived => "archived",
            EventKind::Retried => "retried",
            EventKind::Restored => "restored",
            EventKind::Evicted => "evicted",
            EventKind::Repaired => "repaired",
            EventKind::PauseRequested => "pause_requested",
            EventKind::ResumeRequested => "resume_requested",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::ConditionsChanged => "conditions_changed",
            EventKind::DiskLow => "disk_low",
            EventKind::ProbeFailed => "probe_failed",
            EventKind::SidecarInvalid => "sidecar_invalid",
            EventKind::ChecklistPublished => "checklist_published",
            EventKind::ChecklistInvalid => "checklist_invalid",
            EventKind::DatabaseRebuilt => "database_rebuilt",
            EventKind::ReloadRequested => "reload_requested",
            EventKind::ConfigReloaded => "config_reloaded",
            EventKind::Alarm => "alarm",
            EventKind::AlarmCleared => "alarm_cleared",
            EventKind::FileSkipped => "file_skipped",
            EventKind::DeleteRequested => "delete_requested",
            EventKind::ChecklistStalled => "checklist_stalled",
            EventKind::Downloaded => "downloaded",
            EventKind::Expired => "expired",
            EventKind::Other(s) => s,
        }
    }

    /// Parses a stored or published kind; an unknown one becomes [`EventKind::Other`].
    pub fn parse(s: &str) -> EventKind {
        EventKind::KNOWN
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or_else(|| EventKind::Other(s.to_string()))
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`: the CLI lays the log out in columns.
        f.pad(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(EventKind::parse(&String::deserialize(d)?))
    }
}

/// How an event ended (the `outcome` column's CHECK constraint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventOutcome {
    Applied,
    Skipped,
    Failed,
}

impl EventOutcome {
    pub const ALL: [EventOutcome; 3] = [
        EventOutcome::Applied,
        EventOutcome::Skipped,
        EventOutcome::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Applied => "applied",
            EventOutcome::Skipped => "skipped",
            EventOutcome::Failed => "failed",
        }
    }
}

impl std::fmt::Display for EventOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One row of the event log: the one event type of the product. The store returns it,
/// `fieldsync events` prints it, MQTT publishes it and status quotes it, each in one of
/// the [`EventForm`]s the README documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in the log: increases by one per event (consumers drop duplicates by it).
    pub seq: i64,
    /// Unix ms.
    pub time: i64,
    pub kind: EventKind,
    pub outcome: EventOutcome,
    pub attachment_id: Option<String>,
    pub checklist: Option<String>,
    pub row: Option<String>,
    pub from_state: Option<State>,
    pub to_state: Option<State>,
    pub reason: Option<String>,
}

/// The wire forms of an [`Event`]. Each is a documented schema: fields, their order and
/// their types are pinned by tests to the bytes earlier versions produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventForm {
    /// `fieldsync events --json`: every field, `time` in unix ms.
    Log,
    /// MQTT `<prefix>/events`: every field, `time` as RFC 3339 text.
    Message,
    /// Status' `last_success` / `last_error`: `time` (RFC 3339), `kind`, `attachment_id`,
    /// `checklist`, `row`, `reason`.
    Summary,
}

impl Event {
    /// The event in one of its wire forms, for serialising.
    pub fn form(&self, form: EventForm) -> EventIn<'_> {
        EventIn { event: self, form }
    }
}

/// An [`Event`] as written in one [`EventForm`].
#[derive(Debug, Clone, Copy)]
pub struct EventIn<'a> {
    pub event: &'a Event,
    pub form: EventForm,
}

impl Serialize for EventIn<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let e = self.event;
        let full = self.form != EventForm::Summary;
        let mut st = s.serialize_struct("Event", if full { 10 } else { 6 })?;
        if full {
            st.serialize_field("seq", &e.seq)?;
        }
        match self.form {
            EventForm::Log => st.serialize_field("time", &e.time)?,
            EventForm::Message | EventForm::Summary => {
                st.serialize_field("time", &rfc3339(e.time))?
            }
        }
        st.serialize_field("kind", &e.kind)?;
        if full {
            st.serialize_field("outcome", &e.outcome)?;
        }
        st.serialize_field("attachment_id", &e.attachment_id)?;
        st.serialize_field("checklist", &e.checklist)?;
        st.serialize_field("row", &e.row)?;
        if full {
            st.serialize_field("from_state", &e.from_state)?;
            st.serialize_field("to_state", &e.to_state)?;
        }
        st.serialize_field("reason", &e.reason)?;
        st.end()
    }
}

/// An event serialises in its log form ([`EventForm::Log`]).
impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.form(EventForm::Log).serialize(s)
    }
}

/// A completed multipart part, persisted as soon as the server acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartRecord {
    pub part_number: u32,
    pub size: u64,
    pub etag: String,
    pub checksum: String,
}

/// Count and bytes of one state.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountBytes {
    pub count: i64,
    pub bytes: i64,
}

/// Filter for `list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<State>,
    pub checklist: Option<String>,
    pub row: Option<String>,
    pub limit: Option<i64>,
}

/// What a transition changes besides the state.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// Event kind written to the log (`uploaded`, `failed`, `archived`, `retried`, …).
    pub kind: EventKind,
    /// Reason code (and for failures the message) recorded with the event.
    pub reason: Option<&'a str>,
    /// For `failed`: the stable error code and the human message.
    pub error: Option<(&'a str, &'a str)>,
    /// For `synced`: the remote's ETag if it returned one.
    pub etag: Option<&'a str>,
}

impl Change<'_> {
    /// A change that records `kind` and nothing else; set the other fields with
    /// `Change { reason: …, ..Change::of(kind) }`.
    pub fn of(kind: EventKind) -> Self {
        Change {
            kind,
            reason: None,
            error: None,
            etag: None,
        }
    }
}

/// Why the database file cannot serve as the queue ([`Store::open_checked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// It was there before (a daemon ran on this state directory) and is gone.
    Missing,
    /// SQLite refuses it (not a database, malformed) or `PRAGMA quick_check` fails.
    Corrupt(String),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Missing => f.write_str("missing"),
            Damage::Corrupt(why) => write!(f, "corrupt: {why}"),
        }
    }
}

/// The last rebuild of the database (control key `database.rebuilt`), for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebuilt {
    /// Unix ms.
    pub at: i64,
    /// `missing` or `corrupt: …`.
    pub reason: String,
    /// Where the damaged file was kept (None when it was missing).
    pub kept_as: Option<String>,
}

/// The errors that mean the file itself is damaged. A full disk, a busy lock or a
/// permission problem is not: moving a healthy queue aside for those would lose it.
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Whether an error is SQLite's "database or disk is full": the write did not happen and
/// will once space returns (the file is intact: SQLite rolls the transaction back).
pub fn is_disk_full(e: &StoreError) -> bool {
    match e {
        StoreError::Sql(e) | StoreError::Open { source: e, .. } => {
            e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
        }
        _ => false,
    }
}

/// Space kept beside the database (`queue.db.reserve`) for the writes that record what
/// happened to photos already queued (an upload's outcome, the daemon's status) once the
/// state disk is full. Ingest records a new photo only while the reserve exists, so the
/// queue stops growing before it can no longer record its own progress; a write that
/// fails for lack of space releases it. A few hundred transactions' worth of WAL frames.
pub const RESERVE_BYTES: u64 = 2 * 1024 * 1024;

/// The reserve file beside the database in `state_dir`.
pub fn reserve_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("queue.db.reserve")
}

/// Free bytes on the state volume that fieldsync may count on: while the reserve is
/// released, the room it will take back is not free.
pub fn usable_free(state_dir: &Path, free: u64) -> u64 {
    if reserve_path(state_dir).exists() {
        free
    } else {
        free.saturating_sub(RESERVE_BYTES)
    }
}

/// Makes sure the reserve exists; false when the disk has no room for it (then nothing
/// new should be recorded yet).
pub fn ensure_reserve(state_dir: &Path) -> bool {
    use std::io::Write;
    let path = reserve_path(state_dir);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES) {
        return true;
    }
    let tmp = state_dir.join(".queue.db.reserve.tmp");
    let made = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut n = 0;
        while n < RESERVE_BYTES {
            f.write_all(&chunk)?;
            n += chunk.len() as u64;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made.is_ok()
}

/// Frees the reserve for writes that must happen (the disk is full); returns whether
/// there was one to free.
pub fn release_reserve(state_dir: &Path) -> bool {
    let released = std::fs::remove_file(reserve_path(state_dir)).is_ok();
    if released {
        tracing::warn!(
            state_dir = %state_dir.display(),
            "state disk full: released the database reserve; new photos wait until there is room"
        );
    }
    released
}

pub struct Store {
    conn: Connection,
    /// The database file (None in memory): the wake file lives beside it.
    path: Option<std::path::PathBuf>,
}

impl Store {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let mut store = Self::init(conn).map_err(|e| match e {
            StoreError::Sql(source) => StoreError::Open {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })?;
        store.path = Some(path.to_path_buf());
        Ok(store)
    }

    /// Opens the database the daemon runs on and checks it (`PRAGMA quick_check`).
    /// `Ok(Err(damage))` when the file cannot serve as the queue and must be replaced
    /// ([`Store::rebuild`]); `existed_before` tells a lost file from a first start.
    /// Errors that are not damage (a full disk, a newer schema) are returned as such.
    pub fn open_checked(
        path: &Path,
        existed_before: bool,
    ) -> Result<std::result::Result<Store, Damage>> {
        if !path.exists() && existed_before {
            return Ok(Err(Damage::Missing));
        }
        let store = match Store::open(path) {
            Ok(s) => s,
            Err(StoreError::Open { source, .. }) if is_damage(&source) => {
                return Ok(Err(Damage::Corrupt(source.to_string())))
            }
            Err(e) => return Err(e),
        };
        let check: rusqlite::Result<Vec<String>> = store
            .conn
            .prepare("PRAGMA quick_check")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect());
        match check {
            Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(Ok(store)),
            Ok(rows) => Ok(Err(Damage::Corrupt(rows.join("; ")))),
            Err(e) if is_damage(&e) => Ok(Err(Damage::Corrupt(e.to_string()))),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a damaged database: the old file (with its `-wal` and `-shm`) is moved to
    /// `<name>.<reason>-<UTC time>` beside it, a new one is created, its event log
    /// continues above every sequence number the old one can have used (so consumers that
    /// drop duplicates by `seq` keep working), and the rebuild is recorded (control value
    /// and a `database_rebuilt` event, which MQTT publishes).
    pub fn rebuild(path: &Path, damage: &Damage, now: i64) -> Result<(Store, Rebuilt)> {
        let io = |source: std::io::Error| StoreError::Io {
            what: "move aside the damaged database",
            path: path.display().to_string(),
            source,
        };
        // Read what the old file still tells before moving it.
        let old_seq = Self::salvage_last_seq(path);
        let stamp = crate::util::rfc3339(now)
            .replace([':', '-'], "")
            .replace('.', "-");
        let kept_as = match damage {
            Damage::Missing => None,
            Damage::Corrupt(_) => {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                let base = path.with_file_name(format!(
                    "{}.corrupt-{stamp}",
                    name.as_deref().unwrap_or("queue.db")
                ));
                std::fs::rename(path, &base).map_err(io)?;
                for ext in ["-wal", "-shm"] {
                    let mut from = path.as_os_str().to_owned();
                    from.push(ext);
                    let mut to = base.as_os_str().to_owned();
                    to.push(ext);
                    match std::fs::rename(&from, &to) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io(e)),
                    }
                }
                Some(base.display().to_string())
            }
        };
        if matches!(damage, Damage::Missing) {
            // A stray -wal/-shm of the lost file must not be applied to the new one.
            for ext in ["-wal", "-shm"] {
                let mut p = path.as_os_str().to_owned();
                p.push(ext);
                let _ = std::fs::remove_file(&p);
            }
        }
        let mut store = Store::open(path)?;
        // The old last seq when readable; otherwise the time in ms, above any count of
        // events a device can have logged.
        let start = old_seq.unwrap_or(now).max(store.last_event_seq()?);
        let rebuilt = Rebuilt {
            at: now,
            reason: damage.to_string(),
            kept_as,
        };
        let tx = store.write_tx()?;
        tx.execute(
            "INSERT OR REPLACE INTO sqlite_sequence (name, seq) VALUES ('events', ?1)",
            [start],
        )?;
        tx.commit()?;
        store.control_set_json(key::REBUILT, &rebuilt)?;
        // Reported over MQTT from here on, the rebuild itself included.
        store.set_events_acked_seq(start)?;
        let reason = match &rebuilt.kept_as {
            Some(k) => format!("{}; old database kept as {k}", rebuilt.reason),
            None => rebuilt.reason.clone(),
        };
        store.log_event(
            EventKind::DatabaseRebuilt,
            EventOutcome::Applied,
            None,
            Some(&reason),
        )?;
        Ok((store, rebuilt))
    }

    /// The highest event seq a damaged file still yields, if any.
    fn salvage_last_seq(path: &Path) -> Option<i64> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .ok()?;
        conn.query_row("SELECT MAX(seq) FROM events", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .ok()
        .flatten()
    }

    /// The last rebuild of this database, if it was ever rebuilt.
    pub fn database_rebuilt(&self) -> Result<Option<Rebuilt>> {
        self.control_json(key::REBUILT)
    }

    /// The state directory the database lives in (None in memory).
    pub fn state_dir(&self) -> Option<&Path> {
        self.path.as_deref().and_then(|p| p.parent())
    }

    /// Runs a write; when it fails because the disk is full, releases the reserve
    /// ([`RESERVE_BYTES`]) and runs it once more.
    pub fn with_room<T>(&mut self, mut f: impl FnMut(&mut Store) -> Result<T>) -> Result<T> {
        match f(self) {
            Err(e) if is_disk_full(&e) && self.state_dir().is_some_and(release_reserve) => f(self),
            other => other,
        }
    }

    /// The file whose modification wakes a running daemon (watched with inotify), so CLI
    /// commands take effect at once without the daemon polling the database.
    pub fn wake_file(&self) -> Option<std::path::PathBuf> {
        self.path
            .as_ref()
            .and_then(|p| p.parent())
            .map(|d| d.join(WAKE_FILE))
    }

    /// An in-memory store for unit tests.
    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets the CLI read while the daemon writes; FULL makes every committed state
        // change survive a power cut, which is the point of the queue.
        // Switching a new file to WAL takes an exclusive lock and SQLite does not use the
        // busy handler for it: another process opening the same new file at that moment
        // (daemon and CLI at first start) gets SQLITE_BUSY at once, so retry briefly.
        let mut tries = 0;
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 200 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Several connections live in one small process: keep each page cache small.
        conn.pragma_update(None, "cache_size", CACHE_KIB)?;
        let mut store = Store { conn, path: None };
        store.migrate()?;
        Ok(store)
    }

    /// Write transactions take the lock up front (IMMEDIATE): a deferred one that reads
    /// first and then writes can fail at once with SQLITE_BUSY when another connection
    /// writes meanwhile, which the busy timeout cannot help with.
    fn write_tx(&mut self) -> rusqlite::Result<rusqlite::Transaction<'_>> {
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
    }

    fn migrate(&mut self) -> Result<()> {
        let known = MIGRATIONS.len() as i64;
        // Up to date (every open but the first): nothing to write, so a reader such as
        // `fieldsync status` still opens the queue when the disk is full.
        let current: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current == known {
            return Ok(());
        }
        // The version is read again inside the write transaction: the daemon and a CLI opening a
        // new database at the same moment must not both apply the same migration.
        let tx = self.write_tx()?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > known {
            return Err(StoreError::TooNew {
                found: version,
                known,
            });
        }
        for (_name, sql) in MIGRATIONS.iter().skip(version as usize) {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", known.max(version))?;
        tx.commit()?;
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Changes whenever another connection commits: the daemon checks it every few seconds
    /// (`scheduler::CONTROL_POLL`), the backstop should a CLI command's wake file touch be
    /// missed.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    // ----- attachments -------------------------------------------------------------

    /// Inserts a newly ingested attachment and its `enqueued` event in one transaction.
    /// When `supersedes` names an older, not yet uploaded version of the same file, that
    /// version is archived in the same transaction so the stale bytes are never sent.
    pub fn insert(&mut self, new: &NewAttachment, supersedes: Option<&str>) -> Result<Attachment> {
        let now = now_ms();
        let tx = self.write_tx()?;
        if let Some(old) = supersedes {
            let prev = get_tx(&tx, old)?;
            if prev.state == State::QueuedUpload || prev.state == State::Failed {
                tx.execute(
                    "UPDATE attachments SET state='archived', timestamp=?2, uploading_since=NULL
                     WHERE id=?1",
                    params![old, now],
                )?;
                event_conn(
                    &tx,
                    now,
                    &EventKind::Archived,
                    EventOutcome::Applied,
                    Some(&prev),
                    Some(prev.state),
                    Some(State::Archived),
                    Some("superseded"),
                )?;
            }
        }
        let (code, msg) = match &new.error {
            Some((c, m)) => (Some(c.as_str()), Some(m.as_str())),
            None => (None, None),
        };
        tx.execute(
            "INSERT INTO attachments (id, filename, local_uri, timestamp, size, media_type, state,
                has_synced, meta_data, checklist, row, sha256, mtime_ns, object_key, created_at,
                last_error_code, last_error, ctime_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?10, ?11, ?12, ?13, ?4, ?14, ?15, ?16)",
            params![
                new.id,
                new.filename,
                new.local_uri,
                now,
                new.size,
                new.media_type,
                new.state.as_str(),
                new.meta_data,
                new.checklist,
                new.row,
                new.sha256,
                new.mtime_ns,
                new.object_key,
                code,
                msg,
                new.ctime_ns,
            ],
        )?;
        let att = get_tx(&tx, &new.id)?;
        let (kind, outcome, reason) = if new.state == State::Failed {
            (EventKind::Failed, EventOutcome::Failed, code)
        } else {
            (EventKind::Enqueued, EventOutcome::Applied, None)
        };
        event_conn(
            &tx,
            now,
            &kind,
            outcome,
            Some(&att),
            None,
            Some(new.state),
            reason,
        )?;
        tx.commit()?;
        Ok(att)
    }

    /// [`Store::insert`] for a file the start-up rescan finds again should the record be
    /// lost: a photo inside the capture folder. Committed without its own fsync (WAL,
    /// `synchronous=NORMAL`): a power cut may roll back only the newest such records (the
    /// next fsynced state change makes them durable, WAL frames are ordered), and their
    /// files are then "not yet seen" and re-ingested under the same name-based id. The
    /// fsync was most of what ingest cost beyond hashing (5 ms of a 2 MB photo's 6 ms).
    pub fn insert_rediscoverable(
        &mut self,
        new: &NewAttachment,
        supersedes: Option<&str>,
    ) -> Result<Attachment> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let r = self.insert(new, supersedes);
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        r
    }

    pub fn get(&self, id: &str) -> Result<Option<Attachment>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE id=?1"
            ))?
            .query_row([id], Attachment::from_row)
            .optional()?)
    }

    /// The newest record for a local path (the current version of that file).
    pub fn latest_for_path(&self, local_uri: &str) -> Result<Option<Attachment>> {
        // Called for every file on every rescan: a cached statement matters here.
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE local_uri=?1
                 ORDER BY created_at DESC, rowid DESC LIMIT 1"
            ))?
            .query_row([local_uri], Attachment::from_row)
            .optional()?)
    }

    /// Attachments ready to upload now, oldest (or newest) first, skipping `exclude`
    /// (those already held by a worker).
    pub fn due_uploads(
        &self,
        now: i64,
        limit: usize,
        newest_first: bool,
        exclude: &[String],
    ) -> Result<Vec<Attachment>> {
        let order = if newest_first { "DESC" } else { "ASC" };
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments
             WHERE state IN ('queued_upload','queued_download') AND next_attempt_at <= ?1
             ORDER BY created_at {order}, rowid {order} LIMIT ?2"
        ))?;
        due_rows(&mut stmt, now, limit, exclude)
    }

    /// When the next queued upload not already held by a worker becomes due (unix ms).
    pub fn next_due_at(&self) -> Result<Option<i64>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT MIN(next_attempt_at) FROM attachments
             WHERE state IN ('queued_upload','queued_download') AND uploading_since IS NULL",
            )?
            .query_row([], |r| r.get(0))?)
    }

    /// Moves `id` from its current state to `to`, checking the state machine, and logs
    /// the event; all in one transaction.
    pub fn transition(&mut self, id: &str, to: State, change: Change<'_>) -> Result<Attachment> {
        let now = now_ms();
        let tx = self.write_tx()?;
        let cur = get_tx(&tx, id)?;
        if !cur.state.can_become(to) {
            return Err(StoreError::BadTransition {
                id: id.to_string(),
                from: cur.state,
                to,
            });
        }
        match to {
            State::Synced => {
                tx.execute(
                    "UPDATE attachments SET state='synced', has_synced=1, synced_at=?2,
                        timestamp=?2, bytes_sent=size, uploading_since=NULL, upload_id=NULL,
                        part_size=NULL, last_error=NULL, last_error_code=NULL, remote_etag=?3
                     WHERE id=?1",
                    params![id, now, change.etag],
                )?;
                tx.execute("DELETE FROM upload_parts WHERE attachment_id=?1", [id])?;
            }
            State::Failed => {
                let (code, msg) = change.error.unwrap_or(("unknown", "unknown error"));
                tx.execute(
                    "UPDATE attachments SET state='failed', timestamp=?2, uploading_since=NULL,
                        last_error_code=?3, last_error=?4
                     WHERE id=?1",
                    params![id, now, code, msg],
                )?;
            }
            State::QueuedUpload => {
                // A requeue (retry, or a re-referenced archived record) starts afresh: the
                // attempt budget is reset, resume state is kept.
                tx.execute(
                    "UPDATE attachments SET state='queued_upload', timestamp=?2, attempts=0,
                        next_attempt_at=0, uploading_since=NULL
                     WHERE id=?1",
                    params![id, now],
                )?;
            }
            State::QueuedDownload => {
                // (Re)queued for download: a fresh attempt budget; the partial file on
                // disk, not a column, says where to resume.
                tx.execute(
                    "UPDATE attachments SET state='queued_download', timestamp=?2, attempts=0,
                        next_attempt_at=0, uploading_since=NULL, bytes_sent=0
                     WHERE id=?1",
                    params![id, now],
                )?;
            }
            other => {
                tx.execute(
                    "UPDATE attachments SET state=?3, timestamp=?2, uploading_since=NULL
                     WHERE id=?1",
                    params![id, now, other.as_str()],
                )?;
            }
        }
        let after = get_tx(&tx, id)?;
        let outcome = if to == State::Failed {
            EventOutcome::Failed
        } else {
            EventOutcome::Applied
        };
        let reason = change.reason.or(change.error.map(|e| e.0));
        event_conn(
            &tx,
            now,
            &change.kind,
            outcome,
            Some(&after),
            Some(cur.state),
            Some(to),
            reason,
        )?;
        tx.commit()?;
        Ok(after)
    }

    /// Records a failed attempt that will be retried at `next_at` (the row stays
    /// `queued_upload`); returns the new attempt count.
    pub fn schedule_retry(&mut self, id: &str, next_at: i64, code: &str, msg: &str) -> Result<i64> {
        self.hold_row(id, next_at, code, msg, true)
    }

    /// Records why `id`'s upload stopped when the cause is not the file's (a refused device
    /// clock): due again at once, no attempt used, a `retry_scheduled` event with the
    /// reason. Returns the attempts so far.
    pub fn hold_without_attempt(&mut self, id: &str, code: &str, msg: &str) -> Result<i64> {
        self.hold_row(id, now_ms(), code, msg, false)
    }

    /// One transaction: the row is due again at `next_at` with its error recorded (and
    /// one more attempt counted when `count` is set), plus its `retry_scheduled` event.
    fn hold_row(
        &mut self,
        id: &str,
        next_at: i64,
        code: &str,
        msg: &str,
        count: bool,
    ) -> Result<i64> {
        let now = now_ms();
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE attachments SET attempts=attempts+?6, next_attempt_at=?2, last_error_code=?3,
                last_error=?4, timestamp=?5, uploading_since=NULL
             WHERE id=?1",
            params![id, next_at, code, msg, now, i64::from(count)],
        )?;
        let att = get_tx(&tx, id)?;
        let reason = format!("{code}: {msg}");
        event_conn(
            &tx,
            now,
            &EventKind::RetryScheduled,
            EventOutcome::Skipped,
            Some(&att),
            Some(att.state),
            Some(att.state),
            Some(&reason),
        )?;
        tx.commit()?;
        Ok(att.attempts)
    }

    /// Marks `id` as held by a worker (for status), or releases it.
    pub fn set_uploading(&self, id: &str, on: bool) -> Result<()> {
        let v = on.then(now_ms);
        self.advisory_write(
            "UPDATE attachments SET uploading_since=?2 WHERE id=?1",
            params![id, v],
        )
    }

    /// Progress of the running upload. Not an event: it changes many times a second.
    pub fn set_progress(&self, id: &str, bytes_sent: i64) -> Result<()> {
        self.advisory_write(
            "UPDATE attachments SET bytes_sent=?2 WHERE id=?1",
            params![id, bytes_sent],
        )
    }

    /// A write that only informs status (worker markers, progress): committed without its
    /// own fsync (WAL, `synchronous=NORMAL`); the next state change's fsync covers it. A
    /// power cut may lose it, which start-up repair and the next progress write make good.
    fn advisory_write(&self, sql: &str, p: impl rusqlite::Params) -> Result<()> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let r = self.conn.execute(sql, p);
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        r?;
        Ok(())
    }

    /// Records the hash of a file that could not be read at ingest (retried after a fix).
    pub fn set_hash(&self, id: &str, sha256: &str, size: i64, mtime_ns: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE attachments SET sha256=?2, size=?3, mtime_ns=?4, ctime_ns=NULL WHERE id=?1",
            params![id, sha256, size, mtime_ns],
        )?;
        Ok(())
    }

    /// Updates the mtime recorded for a file whose bytes did not change (touched).
    pub fn touch_mtime(&self, id: &str, mtime_ns: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE attachments SET mtime_ns=?2 WHERE id=?1",
            params![id, mtime_ns],
        )?;
        Ok(())
    }

    /// Replaces the sidecar metadata of an attachment (a sidecar written after its photo).
    pub fn set_meta_data(&self, id: &str, meta: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE attachments SET meta_data=?2 WHERE id=?1",
            params![id, meta],
        )?;
        Ok(())
    }

    /// Requeues failed attachments (one id, or all) and logs a `retried` event for each.
    /// Returns the ids requeued.
    pub fn retry_failed(&mut self, id: Option<&str>) -> Result<Vec<String>> {
        let ids: Vec<String> = match id {
            Some(id) => {
                let a = self
                    .get(id)?
                    .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
                if a.state != State::Failed {
                    return Err(StoreError::BadTransition {
                        id: id.to_string(),
                        from: a.state,
                        to: State::QueuedUpload,
                    });
                }
                vec![a.id]
            }
            None => {
                let mut stmt = self.conn.prepare(
                    "SELECT id FROM attachments WHERE state='failed' ORDER BY created_at",
                )?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            }
        };
        for id in &ids {
            // A delete the remote refused for good is retried as a delete, not an upload.
            if let Some(d) = self.pending_delete(id)? {
                self.request_delete(id, "operator", d.keep_local)?;
                continue;
            }
            // A failed download is retried as a download.
            let to = if self.is_assignment(id)? {
                State::QueuedDownload
            } else {
                State::QueuedUpload
            };
            self.transition(
                id,
                to,
                Change {
                    reason: Some("operator"),
                    ..Change::of(EventKind::Retried)
                },
            )?;
        }
        Ok(ids)
    }

    pub fn list(&self, f: &ListFilter) -> Result<Vec<Attachment>> {
        let mut out = Vec::new();
        self.list_each(f, &mut |a| {
            out.push(a);
            true
        })?;
        Ok(out)
    }

    /// [`Store::list`] one record at a time, until `each` returns false: `fieldsync list`
    /// writes 100,000 records without holding them all.
    pub fn list_each(
        &self,
        f: &ListFilter,
        each: &mut dyn FnMut(Attachment) -> bool,
    ) -> Result<()> {
        let mut sql = format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE 1=1");
        let mut args: Vec<String> = Vec::new();
        if let Some(s) = f.state {
            args.push(s.as_str().to_string());
            sql.push_str(&format!(" AND state=?{}", args.len()));
        }
        if let Some(c) = &f.checklist {
            args.push(c.clone());
            sql.push_str(&format!(" AND checklist=?{}", args.len()));
        }
        if let Some(r) = &f.row {
            args.push(r.clone());
            sql.push_str(&format!(" AND row=?{}", args.len()));
        }
        sql.push_str(" ORDER BY created_at, rowid");
        if let Some(l) = f.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(
            rusqlite::params_from_iter(args.iter()),
            Attachment::from_row,
        )?;
        for row in rows {
            if !each(row?) {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` attachments in any of `states` with a rowid above `after`, in rowid
    /// order, with the last rowid: start-up repair pages through a large queue instead of
    /// holding all of it in memory.
    pub fn page_in_states(
        &self,
        states: &[State],
        after: i64,
        limit: i64,
    ) -> Result<(Vec<Attachment>, i64)> {
        let list = states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(",");
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ATTACHMENT_COLUMNS}, rowid FROM attachments
             WHERE state IN ({list}) AND rowid > ?1 ORDER BY rowid LIMIT ?2"
        ))?;
        let mut last = after;
        let rows = stmt.query_map(params![after, limit], |r| {
            last = r.get(26)?;
            Attachment::from_row(r)
        })?;
        let page = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((page, last))
    }

    /// Attachments in any of `states` (for start-up repair and verify).
    pub fn in_states(&self, states: &[State]) -> Result<Vec<Attachment>> {
        let list = states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(",");
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE state IN ({list}) ORDER BY created_at"
        ))?;
        let rows = stmt.query_map([], Attachment::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Makes every waiting retry due now (`fieldsync sync`); returns how many were waiting.
    pub fn make_retries_due(&self) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE attachments SET next_attempt_at=0 WHERE state='queued_upload'",
            [],
        )?)
    }

    /// Writes records as they are, in one transaction and without events: `synced` ones
    /// count as uploaded. For seeding a benchmark's queue, where a transaction per record
    /// would measure the disk rather than the agent.
    pub fn import(&mut self, records: &[NewAttachment]) -> Result<()> {
        let tx = self.write_tx()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO attachments (id, filename, local_uri, timestamp, size, media_type,
                    state, has_synced, meta_data, checklist, row, sha256, mtime_ns, object_key,
                    created_at, ctime_ns)
                 VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            for (i, r) in records.iter().enumerate() {
                stmt.execute(params![
                    r.id,
                    r.filename,
                    r.local_uri,
                    r.size,
                    r.media_type,
                    r.state.as_str(),
                    (r.state == State::Synced) as i64,
                    r.meta_data,
                    r.checklist,
                    r.row,
                    r.sha256,
                    r.mtime_ns,
                    r.object_key,
                    i as i64,
                    r.ctime_ns,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Clears the worker markers left by a process that died mid-upload.
    pub fn clear_uploading(&self) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE attachments SET uploading_since=NULL WHERE uploading_since IS NOT NULL",
            [],
        )?)
    }

    /// Count and bytes per state.
    pub fn counts(&self) -> Result<Vec<(State, CountBytes)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT state, COUNT(*), COALESCE(SUM(size),0) FROM attachments GROUP BY state",
        )?;
        let mut out: Vec<(State, CountBytes)> = State::ALL
            .iter()
            .map(|s| (*s, CountBytes::default()))
            .collect();
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (s, count, bytes) = row?;
            if let Ok(st) = State::from_str(&s) {
                if let Some(slot) = out.iter_mut().find(|(k, _)| *k == st) {
                    slot.1 = CountBytes { count, bytes };
                }
            }
        }
        Ok(out)
    }

    /// Creation time (unix ms) of the oldest attachment still waiting to upload.
    pub fn oldest_pending(&self) -> Result<Option<i64>> {
        Ok(self.conn.query_row(
            "SELECT MIN(created_at) FROM attachments WHERE state='queued_upload'",
            [],
            |r| r.get(0),
        )?)
    }

    /// Attachments held by a worker right now.
    pub fn uploading(&self) -> Result<Vec<Attachment>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments
             WHERE uploading_since IS NOT NULL AND state='queued_upload' ORDER BY uploading_since"
        ))?;
        let rows = stmt.query_map([], Attachment::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The most recent event of one of `kinds` (e.g. the last upload, the last failure).
    pub fn last_event(&self, kinds: &[EventKind]) -> Result<Option<Event>> {
        let list = kinds
            .iter()
            .map(|k| format!("'{}'", k.as_str().replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(",");
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT seq, time, kind, outcome, attachment_id, checklist, row, from_state,
                        to_state, reason FROM events WHERE kind IN ({list})
                     ORDER BY seq DESC LIMIT 1"
                ),
                [],
                event_from_row,
            )
            .optional()?)
    }

    /// Events after `seq`, oldest first, at most `limit`.
    pub fn events_after(&self, seq: i64, limit: i64) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, time, kind, outcome, attachment_id, checklist, row, from_state, to_state,
                reason FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![seq, limit], event_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The highest event sequence number (0 when the log is empty).
    pub fn last_event_seq(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq),0) FROM events", [], |r| r.get(0))?)
    }

    /// Appends an event that is not a state change (paused, resumed, repaired, …).
    pub fn log_event(
        &self,
        kind: EventKind,
        outcome: EventOutcome,
        att: Option<&Attachment>,
        reason: Option<&str>,
    ) -> Result<()> {
        event_conn(
            &self.conn,
            now_ms(),
            &kind,
            outcome,
            att,
            None,
            None,
            reason,
        )
    }

    /// Appends an event about a checklist rather than one attachment.
    pub fn log_event_for(
        &self,
        kind: EventKind,
        outcome: EventOutcome,
        checklist: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()> {
        event_row(
            &self.conn,
            now_ms(),
            &kind,
            outcome,
            None,
            checklist,
            None,
            None,
            reason,
        )
    }

    /// Trims the event log to the newest `MAX_EVENTS` rows.
    pub fn trim_events(&self) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?1",
            [MAX_EVENTS],
        )?)
    }

    // ----- multipart resume --------------------------------------------------------

    pub fn parts(&self, id: &str) -> Result<Vec<PartRecord>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT part_number, size, etag, checksum FROM upload_parts
             WHERE attachment_id=?1 ORDER BY part_number",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(PartRecord {
                part_number: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                etag: r.get(2)?,
                checksum: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Starts (or restarts) a multipart upload: forgets old parts, records the new id.
    pub fn begin_multipart(&mut self, id: &str, upload_id: &str, part_size: u64) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute("DELETE FROM upload_parts WHERE attachment_id=?1", [id])?;
        tx.execute(
            "UPDATE attachments SET upload_id=?2, part_size=?3, bytes_sent=0 WHERE id=?1",
            params![id, upload_id, part_size as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Commits one acknowledged part and the new progress together.
    pub fn part_done(&mut self, id: &str, part: &PartRecord) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT OR REPLACE INTO upload_parts (attachment_id, part_number, size, etag, checksum)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id,
                part.part_number,
                part.size as i64,
                part.etag,
                part.checksum
            ],
        )?;
        tx.execute(
            "UPDATE attachments SET bytes_sent=(SELECT COALESCE(SUM(size),0) FROM upload_parts
                WHERE attachment_id=?1) WHERE id=?1",
            [id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets a multipart upload (completed, aborted or unknown to the server).
    pub fn clear_multipart(&mut self, id: &str) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute("DELETE FROM upload_parts WHERE attachment_id=?1", [id])?;
        tx.execute(
            "UPDATE attachments SET upload_id=NULL, part_size=NULL WHERE id=?1",
            [id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Multipart uploads left open by records that will never complete them
    /// (archived or failed): these are aborted on the server.
    pub fn abandoned_multiparts(&self) -> Result<Vec<Attachment>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments
             WHERE upload_id IS NOT NULL AND state IN ('archived','failed')"
        ))?;
        let rows = stmt.query_map([], Attachment::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ----- control: the switches and facts the daemon and the CLI share ----------

    /// Whether an operator paused uploads (`fieldsync pause`, MQTT `cmd/pause`).
    pub fn operator_paused(&self) -> Result<bool> {
        Ok(self.control_get(key::PAUSED)?.as_deref() == Some("1"))
    }

    pub fn set_operator_paused(&self, paused: bool) -> Result<()> {
        self.control_set(key::PAUSED, if paused { "1" } else { "0" })
    }

    /// The sequence number of the newest `reload_requested` event (`fieldsync reload`).
    pub fn reload_requested(&self) -> Result<Option<i64>> {
        self.control_parse(key::RELOAD)
    }

    /// Records a reload request: its `reload_requested` event and the control key that
    /// points at it, in one transaction. Returns the event's sequence number.
    pub fn request_reload(&mut self, source: &str) -> Result<i64> {
        let tx = self.conn.transaction()?;
        event_conn(
            &tx,
            now_ms(),
            &EventKind::ReloadRequested,
            EventOutcome::Applied,
            None,
            None,
            None,
            Some(source),
        )?;
        let seq: i64 = tx.query_row("SELECT COALESCE(MAX(seq),0) FROM events", [], |r| r.get(0))?;
        tx.execute(
            "INSERT INTO control (key, value, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            params![key::RELOAD, seq.to_string(), now_ms()],
        )?;
        tx.commit()?;
        Ok(seq)
    }

    /// The first `config_reloaded` event after `seq`, if the daemon wrote one yet.
    pub fn reload_outcome_after(&self, seq: i64) -> Result<Option<Event>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, time, kind, outcome, attachment_id, checklist, row, from_state, to_state,
                reason FROM events WHERE seq > ?1 AND kind = ?2 ORDER BY seq LIMIT 1",
        )?;
        let mut rows = stmt.query_map(
            params![seq, EventKind::ConfigReloaded.as_str()],
            event_from_row,
        )?;
        Ok(rows.next().transpose()?)
    }

    /// When a command last asked the daemon to look at the queue again (unix ms).
    pub fn wake_requested_at(&self) -> Result<Option<i64>> {
        self.control_parse(key::WAKE)
    }

    pub fn set_wake_requested_at(&self, at: i64) -> Result<()> {
        self.control_set(key::WAKE, &at.to_string())
    }

    /// The reason code uploads are paused for, as the running daemon last wrote it; None
    /// while they run.
    pub fn pause_reason(&self) -> Result<Option<String>> {
        Ok(self
            .control_get(key::PAUSE_REASON)?
            .filter(|r| !r.is_empty()))
    }

    pub fn set_pause_reason(&self, reason: Option<&str>) -> Result<()> {
        self.control_set(key::PAUSE_REASON, reason.unwrap_or(""))
    }

    /// The daemon's last condition report (`conditions::report::ConditionsReport`); None
    /// when none was written or it does not parse as `T`.
    pub fn conditions_report<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>> {
        self.control_json(key::CONDITIONS)
    }

    pub fn set_conditions_report<T: Serialize>(&self, report: &T) -> Result<()> {
        self.control_set_json(key::CONDITIONS, report)
    }

    /// The bytes counted against today's metered budget (the conditions' `Budget`); None
    /// when none was written or it does not parse as `T`.
    pub fn metered_budget<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>> {
        self.control_json(key::BUDGET)
    }

    pub fn set_metered_budget<T: Serialize>(&self, budget: &T) -> Result<()> {
        self.control_set_json(key::BUDGET, budget)
    }

    /// The alarm episodes in progress (`alarms::Active`); None when none was written or it
    /// does not parse as `T`.
    pub fn active_alarms<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>> {
        self.control_json(key::ALARMS)
    }

    /// Records the episodes in progress and appends the events that changed them, in one
    /// transaction: an alarm is raised or cleared exactly once, even across a crash.
    pub fn record_alarms<T: Serialize>(
        &mut self,
        active: &T,
        events: &[(EventKind, Option<&Attachment>, String)],
    ) -> Result<()> {
        let now = now_ms();
        let tx = self.write_tx()?;
        for (kind, att, reason) in events {
            event_conn(
                &tx,
                now,
                kind,
                EventOutcome::Applied,
                *att,
                None,
                None,
                Some(reason.as_str()),
            )?;
        }
        tx.execute(
            "INSERT INTO control (key, value, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            params![
                key::ALARMS,
                serde_json::to_string(active).unwrap_or_default(),
                now
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The running (or last) daemon's process id and start time (unix ms).
    pub fn daemon_started(&self) -> Result<Option<(u32, i64)>> {
        Ok(self
            .control_parse(key::PID)?
            .zip(self.control_parse(key::STARTED_AT)?))
    }

    pub fn set_daemon_started(&self, pid: u32, at: i64) -> Result<()> {
        self.control_set(key::PID, &pid.to_string())?;
        self.control_set(key::STARTED_AT, &at.to_string())
    }

    /// The last event the MQTT broker acknowledged: later ones are sent after a reconnect.
    pub fn events_acked_seq(&self) -> Result<Option<i64>> {
        self.control_parse(key::EVENTS_ACKED_SEQ)
    }

    pub fn set_events_acked_seq(&self, seq: i64) -> Result<()> {
        self.control_set(key::EVENTS_ACKED_SEQ, &seq.to_string())
    }

    /// The content hash of the manifest last published for `checklist`.
    pub fn published_checklist(&self, checklist: &str) -> Result<Option<String>> {
        self.control_get(&key::published(checklist))
    }

    pub fn set_published_checklist(&self, checklist: &str, digest: &str) -> Result<()> {
        self.control_set(&key::published(checklist), digest)
    }

    /// The hash of the malformed checklist.json of `checklist` last reported.
    pub fn invalid_checklist(&self, checklist: &str) -> Result<Option<String>> {
        self.control_get(&key::checklist_invalid(checklist))
    }

    pub fn set_invalid_checklist(&self, checklist: &str, digest: &str) -> Result<()> {
        self.control_set(&key::checklist_invalid(checklist), digest)
    }

    /// Runs `f` in one transaction: the writes it makes through `&Store` commit together
    /// or not at all (a condition report with its events).
    pub fn atomically<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        let v = f(self)?;
        tx.commit()?;
        Ok(v)
    }

    fn control_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM control WHERE key=?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    /// A number-valued key; a value that does not parse reads as absent.
    fn control_parse<T: FromStr>(&self, key: &str) -> Result<Option<T>> {
        Ok(self.control_get(key)?.and_then(|v| v.parse().ok()))
    }

    /// A JSON-valued key; a value that does not parse as `T` reads as absent.
    fn control_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        Ok(self
            .control_get(key)?
            .and_then(|v| serde_json::from_str(&v).ok()))
    }

    fn control_set_json<T: Serialize>(&self, key: &str, v: &T) -> Result<()> {
        self.control_set(key, &serde_json::to_string(v).expect("serialisable"))
    }

    /// A control value is the daemon's own status: written even on a full disk, from
    /// the reserve if need be.
    fn control_set(&self, key: &str, value: &str) -> Result<()> {
        match self.control_set_once(key, value) {
            Err(e) if is_disk_full(&e) && self.state_dir().is_some_and(release_reserve) => {
                self.control_set_once(key, value)
            }
            other => other,
        }
    }

    fn control_set_once(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO control (key, value, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            )?
            .execute(params![key, value, now_ms()])?;
        Ok(())
    }
}

// ----- deletes and checklist progress (migration 004) ---------------------------------

/// What [`Store::request_delete`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct DeleteRequest {
    /// The attachment, now `queued_delete`.
    pub attachment: Attachment,
    /// The state it was in: `queued_upload` means its upload is cancelled.
    pub from: State,
}

/// A pending delete: what the delete worker needs besides the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDelete {
    pub source: String,
    pub from_state: String,
    pub keep_local: bool,
}

/// The stored progress of one checklist (the publisher writes it, status reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChecklistRecord {
    pub name: String,
    /// The status `checklists[]` object as JSON.
    pub progress: String,
    pub waiting_since: Option<i64>,
    pub stalled_at: Option<i64>,
    pub published_at: Option<i64>,
}

impl Store {
    /// Asks for `id` to be removed everywhere (`source`: `cli`, `mqtt`, `checklist`): the
    /// row becomes `queued_delete` and the delete worker removes the remote object (or
    /// aborts an open multipart upload), then the local copy unless `keep_local`. One
    /// transaction with its `delete_requested` event. A photo already deleted, or in
    /// `queued_download`, is refused ([`StoreError::BadTransition`]).
    pub fn request_delete(
        &mut self,
        id: &str,
        source: &str,
        keep_local: bool,
    ) -> Result<DeleteRequest> {
        let now = now_ms();
        let tx = self.write_tx()?;
        let cur = match tx
            .prepare_cached(&format!(
                "SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE id=?1"
            ))?
            .query_row([id], Attachment::from_row)
            .optional()?
        {
            Some(a) => a,
            None => return Err(StoreError::NotFound(id.to_string())),
        };
        let tombstone: bool = tx
            .prepare_cached(
                "SELECT COUNT(*) FROM deletes WHERE attachment_id=?1 AND done_at IS NOT NULL
                 AND keep_local=0",
            )?
            .query_row([id], |r| r.get::<_, i64>(0))?
            > 0;
        // A file an assignment names is the back office's (a reference photo, a drawing):
        // deleting it would remove their object from the remote. It leaves the device
        // when no assignment names it any more.
        let assigned: bool = tx
            .prepare_cached("SELECT origin='assignment' FROM attachments WHERE id=?1")?
            .query_row([id], |r| r.get(0))?;
        if tombstone || assigned || !cur.state.can_become(State::QueuedDelete) {
            return Err(StoreError::BadTransition {
                id: id.to_string(),
                from: cur.state,
                to: State::QueuedDelete,
            });
        }
        tx.execute(
            "INSERT INTO deletes (attachment_id, requested_at, source, from_state, keep_local)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(attachment_id) DO UPDATE SET requested_at=excluded.requested_at,
                source=excluded.source, from_state=excluded.from_state,
                keep_local=excluded.keep_local, done_at=NULL",
            params![id, now, source, cur.state.as_str(), keep_local],
        )?;
        tx.execute(
            "UPDATE attachments SET state='queued_delete', timestamp=?2, attempts=0,
                next_attempt_at=0, last_error=NULL, last_error_code=NULL
             WHERE id=?1",
            params![id, now],
        )?;
        let after = get_tx(&tx, id)?;
        event_conn(
            &tx,
            now,
            &EventKind::DeleteRequested,
            EventOutcome::Applied,
            Some(&after),
            Some(cur.state),
            Some(State::QueuedDelete),
            Some(source),
        )?;
        tx.commit()?;
        Ok(DeleteRequest {
            attachment: after,
            from: cur.state,
        })
    }

    /// The pending delete of `id`, if one was asked and is not done.
    pub fn pending_delete(&self, id: &str) -> Result<Option<PendingDelete>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT source, from_state, keep_local FROM deletes
                 WHERE attachment_id=?1 AND done_at IS NULL",
            )?
            .query_row([id], |r| {
                Ok(PendingDelete {
                    source: r.get(0)?,
                    from_state: r.get(1)?,
                    keep_local: r.get::<_, i64>(2)? != 0,
                })
            })
            .optional()?)
    }

    /// Whether `id` was deleted by an operator (its tombstone: rescans never take the
    /// same bytes at its path again).
    pub fn is_tombstone(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM deletes WHERE attachment_id=?1 AND done_at IS NOT NULL
                 AND keep_local=0",
            )?
            .query_row([id], |r| r.get::<_, i64>(0))?
            > 0)
    }

    /// Ids of `checklist`'s operator-deleted photos.
    pub fn tombstones_in(&self, checklist: &str) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT d.attachment_id FROM deletes d JOIN attachments a ON a.id=d.attachment_id
             WHERE a.checklist=?1 AND d.done_at IS NOT NULL AND d.keep_local=0",
        )?;
        let rows = stmt.query_map([checklist], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes ready to run now, oldest request first, skipping `exclude`.
    pub fn due_deletes(
        &self,
        now: i64,
        limit: usize,
        exclude: &[String],
    ) -> Result<Vec<Attachment>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments
             WHERE state='queued_delete' AND next_attempt_at <= ?1
             ORDER BY timestamp, rowid LIMIT ?2"
        ))?;
        due_rows(&mut stmt, now, limit, exclude)
    }

    /// When the next queued delete falls due (unix ms).
    pub fn next_delete_due_at(&self) -> Result<Option<i64>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT MIN(next_attempt_at) FROM attachments WHERE state='queued_delete'",
            )?
            .query_row([], |r| r.get(0))?)
    }

    /// Which of `ids` are `queued_delete` now (uploads in flight that were cancelled).
    pub fn queued_for_delete(&self, ids: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state FROM attachments WHERE id=?1")?;
        for id in ids {
            let st: Option<String> = stmt.query_row([id], |r| r.get(0)).optional()?;
            if st.as_deref() == Some("queued_delete") {
                out.push(id.clone());
            }
        }
        Ok(out)
    }

    /// The remote object of `id` is gone (and its local copy, unless the delete keeps
    /// it): the row becomes `archived` with `has_synced` cleared (nothing is in the
    /// remote any more), the delete is done, and one `archived` event (`reason`) is
    /// logged; one transaction.
    pub fn finish_delete(&mut self, id: &str, reason: &str) -> Result<Attachment> {
        let now = now_ms();
        let tx = self.write_tx()?;
        let cur = get_tx(&tx, id)?;
        if cur.state != State::QueuedDelete {
            return Err(StoreError::BadTransition {
                id: id.to_string(),
                from: cur.state,
                to: State::Archived,
            });
        }
        tx.execute(
            "UPDATE attachments SET state='archived', has_synced=0, timestamp=?2, bytes_sent=0,
                uploading_since=NULL, upload_id=NULL, part_size=NULL, synced_at=NULL,
                remote_etag=NULL, last_error=NULL, last_error_code=NULL
             WHERE id=?1",
            params![id, now],
        )?;
        tx.execute("DELETE FROM upload_parts WHERE attachment_id=?1", [id])?;
        tx.execute(
            "UPDATE deletes SET done_at=?2 WHERE attachment_id=?1",
            params![id, now],
        )?;
        let after = get_tx(&tx, id)?;
        event_conn(
            &tx,
            now,
            &EventKind::Archived,
            EventOutcome::Applied,
            Some(&after),
            Some(State::QueuedDelete),
            Some(State::Archived),
            Some(reason),
        )?;
        tx.commit()?;
        Ok(after)
    }

    /// `fieldsync verify --remote` found `id`'s object missing or wrong while its local
    /// copy is intact: back to `queued_upload` as never uploaded, with a `repaired` event
    /// (`reason`); one transaction.
    pub fn requeue_lost_object(&mut self, id: &str, reason: &str) -> Result<Attachment> {
        let now = now_ms();
        let tx = self.write_tx()?;
        let cur = get_tx(&tx, id)?;
        if !cur.state.can_become(State::QueuedUpload) {
            return Err(StoreError::BadTransition {
                id: id.to_string(),
                from: cur.state,
                to: State::QueuedUpload,
            });
        }
        tx.execute(
            "UPDATE attachments SET state='queued_upload', has_synced=0, timestamp=?2,
                bytes_sent=0, attempts=0, next_attempt_at=0, synced_at=NULL, remote_etag=NULL,
                uploading_since=NULL
             WHERE id=?1",
            params![id, now],
        )?;
        let after = get_tx(&tx, id)?;
        event_conn(
            &tx,
            now,
            &EventKind::Repaired,
            EventOutcome::Applied,
            Some(&after),
            Some(cur.state),
            Some(State::QueuedUpload),
            Some(reason),
        )?;
        tx.commit()?;
        Ok(after)
    }

    /// Up to `limit` records whose object should be in the remote (`has_synced`, synced
    /// or archived) with a rowid above `after`, with their rowids: `verify --remote`
    /// pages through them and resumes from the last rowid it checked.
    pub fn page_uploaded(&self, after: i64, limit: i64) -> Result<Vec<(i64, Attachment)>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS}, rowid FROM attachments
             WHERE has_synced=1 AND state IN ('synced','archived') AND rowid > ?1
             ORDER BY rowid LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok((r.get::<_, i64>(26)?, Attachment::from_row(r)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Where an interrupted `verify --remote` goes on (the last rowid checked); 0 when
    /// the last run finished.
    pub fn verify_remote_cursor(&self) -> Result<i64> {
        Ok(self.control_parse(key::VERIFY_REMOTE_AFTER)?.unwrap_or(0))
    }

    pub fn set_verify_remote_cursor(&self, after: i64) -> Result<()> {
        self.control_set(key::VERIFY_REMOTE_AFTER, &after.to_string())
    }

    /// Every stored checklist progress, by name.
    pub fn checklist_records(&self) -> Result<Vec<ChecklistRecord>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, progress, waiting_since, stalled_at, published_at FROM checklists
             ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ChecklistRecord {
                name: r.get(0)?,
                progress: r.get(1)?,
                waiting_since: r.get(2)?,
                stalled_at: r.get(3)?,
                published_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn checklist_record(&self, name: &str) -> Result<Option<ChecklistRecord>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT name, progress, waiting_since, stalled_at, published_at FROM checklists
                 WHERE name=?1",
            )?
            .query_row([name], |r| {
                Ok(ChecklistRecord {
                    name: r.get(0)?,
                    progress: r.get(1)?,
                    waiting_since: r.get(2)?,
                    stalled_at: r.get(3)?,
                    published_at: r.get(4)?,
                })
            })
            .optional()?)
    }

    /// Writes a checklist's progress (only when something in it changed: the publisher
    /// looks often).
    pub fn set_checklist_record(&self, rec: &ChecklistRecord) -> Result<()> {
        if self.checklist_record(&rec.name)?.as_ref() == Some(rec) {
            return Ok(());
        }
        self.conn
            .prepare_cached(
                "INSERT INTO checklists (name, progress, waiting_since, stalled_at, published_at,
                    updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET progress=excluded.progress,
                    waiting_since=excluded.waiting_since, stalled_at=excluded.stalled_at,
                    published_at=excluded.published_at, updated_at=excluded.updated_at",
            )?
            .execute(params![
                rec.name,
                rec.progress,
                rec.waiting_since,
                rec.stalled_at,
                rec.published_at,
                now_ms()
            ])?;
        Ok(())
    }

    /// A checklist.json that is gone (or no longer valid) has no progress to show.
    pub fn remove_checklist_record(&self, name: &str) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM checklists WHERE name=?1")?
            .execute([name])?;
        Ok(())
    }
}

/// A file an assignment names, as the store records it (`origin = 'assignment'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDownload {
    pub id: String,
    /// Base name of the inbox path.
    pub filename: String,
    /// Absolute path in the inbox.
    pub local_uri: String,
    pub size: i64,
    pub sha256: String,
    /// The remote key it is fetched from.
    pub object_key: String,
    pub media_type: String,
}

/// Assignments and downloads: rows with `origin = 'assignment'`, the per-channel
/// assignment documents, and the expiry of archived records.
impl Store {
    /// Whether `id` is a file an assignment named (downloaded, not captured).
    pub fn is_assignment(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT origin='assignment' FROM attachments WHERE id=?1")?
            .query_row([id], |r| r.get::<_, bool>(0))
            .optional()?
            .unwrap_or(false))
    }

    /// Every row an assignment ever named, in any state.
    pub fn assignment_rows(&self) -> Result<Vec<Attachment>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE origin='assignment'
             ORDER BY created_at, rowid"
        ))?;
        let rows = stmt.query_map([], Attachment::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a newly assigned file: `queued_download`, or `synced` when its local copy
    /// is already there with the right hash (reason `already_local`). One transaction
    /// with its event.
    pub fn insert_download(&mut self, d: &NewDownload, state: State) -> Result<Attachment> {
        Ok(self
            .insert_downloads(&[(d.clone(), state)])?
            .pop()
            .expect("one row"))
    }

    /// [`Store::insert_download`] for many files in one transaction: an assignment of a
    /// few hundred files costs one fsync, not hundreds.
    pub fn insert_downloads(&mut self, rows: &[(NewDownload, State)]) -> Result<Vec<Attachment>> {
        let now = now_ms();
        let tx = self.write_tx()?;
        let mut out = Vec::with_capacity(rows.len());
        for (d, state) in rows {
            let state = *state;
            out.push(insert_download_tx(&tx, d, state, now)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Downloads held by a worker right now (status `downloading[]`).
    pub fn downloading(&self) -> Result<Vec<Attachment>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments
             WHERE uploading_since IS NOT NULL AND state='queued_download'
             ORDER BY uploading_since"
        ))?;
        let rows = stmt.query_map([], Attachment::from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Whether any download is still queued.
    pub fn downloads_pending(&self) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM attachments WHERE state='queued_download')",
            )?
            .query_row([], |r| r.get(0))?)
    }

    /// Whether a row other than `id` that is not archived uses `local_uri` (a newer
    /// version of the same inbox file): then `id`'s local copy is not its own to delete.
    pub fn path_in_use_by_other(&self, local_uri: &str, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM attachments
                 WHERE local_uri=?1 AND id<>?2 AND state<>'archived')",
            )?
            .query_row(params![local_uri, id], |r| r.get(0))?)
    }

    /// Archived records, oldest first, each with whether an assignment named it; not the
    /// tombstones of operator deletes (they are never expired).
    pub fn archived_oldest_first(&self) -> Result<Vec<(Attachment, bool)>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS}, origin='assignment' FROM attachments
             WHERE state='archived' AND id NOT IN (SELECT attachment_id FROM deletes
                 WHERE done_at IS NOT NULL AND keep_local=0)
             ORDER BY timestamp, rowid"
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok((Attachment::from_row(r)?, r.get::<_, bool>(26)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Removes an archived record past the cache limit and logs its `expired` event
    /// (reason: what happened to the local copy), in one transaction.
    pub fn remove_expired(&mut self, id: &str, reason: &str) -> Result<Attachment> {
        let now = now_ms();
        let tx = self.write_tx()?;
        let cur = get_tx(&tx, id)?;
        if cur.state != State::Archived {
            return Err(StoreError::BadTransition {
                id: id.to_string(),
                from: cur.state,
                to: State::Archived,
            });
        }
        tx.execute("DELETE FROM attachments WHERE id=?1", [id])?;
        event_conn(
            &tx,
            now,
            &EventKind::Expired,
            EventOutcome::Applied,
            Some(&cur),
            Some(State::Archived),
            None,
            Some(reason),
        )?;
        tx.commit()?;
        Ok(cur)
    }

    /// A download finished: the file is in place. Records its mtime (so a later check
    /// can tell it unchanged) and marks it `synced` with a `downloaded` event.
    pub fn download_done(&mut self, id: &str, mtime_ns: i64, reason: &str) -> Result<Attachment> {
        let cur = self
            .get(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if cur.state != State::QueuedDownload {
            // Unassigned while it downloaded: it stays archived (the copy is cache).
            return Ok(cur);
        }
        // Committed with the transition's fsync just below.
        self.advisory_write(
            "UPDATE attachments SET mtime_ns=?2 WHERE id=?1",
            params![id, mtime_ns],
        )?;
        self.transition(
            id,
            State::Synced,
            Change {
                reason: Some(reason),
                ..Change::of(EventKind::Downloaded)
            },
        )
    }

    /// The last assignment document a channel (`mqtt`, `remote`) delivered, as JSON.
    pub fn assignments_doc(&self, channel: &str) -> Result<Option<String>> {
        self.control_get(&key::assignments(channel))
    }

    pub fn set_assignments_doc(&self, channel: &str, json: &str) -> Result<()> {
        self.control_set(&key::assignments(channel), json)
    }

    /// The ETag (or size-mtime) of the remote assignments file last read.
    pub fn assignments_tag(&self) -> Result<Option<String>> {
        Ok(self
            .control_get(key::ASSIGNMENTS_TAG)?
            .filter(|t| !t.is_empty()))
    }

    pub fn set_assignments_tag(&self, tag: Option<&str>) -> Result<()> {
        self.control_set(key::ASSIGNMENTS_TAG, tag.unwrap_or(""))
    }
}

/// Up to `limit` due rows of a `(now, limit)` query that are not in `exclude` (rows a
/// worker holds): the query asks for `limit + exclude.len()` so enough remain.
fn due_rows(
    stmt: &mut rusqlite::CachedStatement<'_>,
    now: i64,
    limit: usize,
    exclude: &[String],
) -> Result<Vec<Attachment>> {
    let rows = stmt.query_map(
        params![now, (limit + exclude.len()) as i64],
        Attachment::from_row,
    )?;
    let mut out = Vec::new();
    for r in rows {
        let a = r?;
        if !exclude.contains(&a.id) {
            out.push(a);
            if out.len() == limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Keys of the control table. The strings are the stored form: databases written by
/// earlier versions keep working only while they stay the same.
mod key {
    /// "1" while an operator paused uploads, "0" after a resume.
    pub const PAUSED: &str = "paused";
    /// Unix ms of the last command that asked the daemon to look again.
    pub const WAKE: &str = "wake";
    /// The reason code uploads are paused for, "" when they run. Written by the daemon.
    pub const PAUSE_REASON: &str = "daemon.pause_reason";
    /// The condition report as JSON. Written by the daemon.
    pub const CONDITIONS: &str = "daemon.conditions";
    pub const PID: &str = "daemon.pid";
    pub const STARTED_AT: &str = "daemon.started_at";
    /// Today's metered byte count: `{"day":"YYYY-MM-DD","used":N}`.
    pub const BUDGET: &str = "conditions.budget";
    /// The sequence number of the last event the MQTT broker acknowledged.
    pub const EVENTS_ACKED_SEQ: &str = "mqtt.events_acked_seq";
    /// The last database rebuild as JSON (`Rebuilt`). Written by the daemon.
    pub const REBUILT: &str = "database.rebuilt";
    /// The sequence number of the newest `reload_requested` event.
    pub const RELOAD: &str = "reload.requested";
    /// The alarm episodes in progress (`alarms::Active`), so a restart does not raise
    /// them again.
    pub const ALARMS: &str = "alarms.active";
    /// The last rowid an interrupted `fieldsync verify --remote` checked.
    pub const VERIFY_REMOTE_AFTER: &str = "verify_remote.after";

    /// The ETag (or size-mtime) of the remote assignments file last read.
    pub const ASSIGNMENTS_TAG: &str = "assignments.remote_tag";

    /// The last assignment document of a channel (`mqtt`, `remote`), as JSON.
    pub fn assignments(channel: &str) -> String {
        format!("assignments:{channel}")
    }

    /// The content hash of the manifest published for a checklist.
    pub fn published(checklist: &str) -> String {
        format!("published:{checklist}")
    }

    /// The hash of a checklist.json already reported invalid.
    pub fn checklist_invalid(checklist: &str) -> String {
        format!("checklist_invalid:{checklist}")
    }
}

fn event_from_row(r: &Row<'_>) -> rusqlite::Result<Event> {
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let state = |i: usize| -> rusqlite::Result<Option<State>> {
        r.get::<_, Option<String>>(i)?
            .map(|s| State::from_str(&s).map_err(|e| bad(i, e)))
            .transpose()
    };
    let outcome: String = r.get(3)?;
    Ok(Event {
        seq: r.get(0)?,
        time: r.get(1)?,
        kind: EventKind::parse(&r.get::<_, String>(2)?),
        outcome: EventOutcome::ALL
            .into_iter()
            .find(|o| o.as_str() == outcome)
            .ok_or_else(|| bad(3, format!("unknown event outcome `{outcome}`")))?,
        attachment_id: r.get(4)?,
        checklist: r.get(5)?,
        row: r.get(6)?,
        from_state: state(7)?,
        to_state: state(8)?,
        reason: r.get(9)?,
    })
}

/// One assigned file's row and its `enqueued` event, inside `tx`.
fn insert_download_tx(
    tx: &Connection,
    d: &NewDownload,
    state: State,
    now: i64,
) -> Result<Attachment> {
    let synced = state == State::Synced;
    tx.execute(
        "INSERT INTO attachments (id, filename, local_uri, timestamp, size, media_type, state,
            has_synced, checklist, row, sha256, mtime_ns, object_key, created_at,
            bytes_sent, synced_at, origin)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, '', '', ?9, 0, ?10, ?4, ?11, ?12,
            'assignment')",
        params![
            d.id,
            d.filename,
            d.local_uri,
            now,
            d.size,
            d.media_type,
            state.as_str(),
            synced as i64,
            d.sha256,
            d.object_key,
            if synced { d.size } else { 0 },
            synced.then_some(now),
        ],
    )?;
    let att = get_tx(tx, &d.id)?;
    event_conn(
        tx,
        now,
        &EventKind::Enqueued,
        EventOutcome::Applied,
        Some(&att),
        None,
        Some(state),
        synced.then_some("already_local"),
    )?;
    Ok(att)
}

fn get_tx(conn: &Connection, id: &str) -> Result<Attachment> {
    conn.query_row(
        &format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE id=?1"),
        [id],
        Attachment::from_row,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(id.to_string()))
}

#[allow(clippy::too_many_arguments)]
fn event_conn(
    conn: &Connection,
    now: i64,
    kind: &EventKind,
    outcome: EventOutcome,
    att: Option<&Attachment>,
    from: Option<State>,
    to: Option<State>,
    reason: Option<&str>,
) -> Result<()> {
    event_row(
        conn,
        now,
        kind,
        outcome,
        att,
        att.map(|a| a.checklist.as_str()),
        from,
        to,
        reason,
    )
}

/// The one INSERT into the event log.
#[allow(clippy::too_many_arguments)]
fn event_row(
    conn: &Connection,
    now: i64,
    kind: &EventKind,
    outcome: EventOutcome,
    att: Option<&Attachment>,
    checklist: Option<&str>,
    from: Option<State>,
    to: Option<State>,
    reason: Option<&str>,
) -> Result<()> {
    conn.execute(
        "INSERT INTO events (time, kind, outcome, attachment_id, checklist, row, from_state,
            to_state, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            now,
            kind.as_str(),
            outcome.as_str(),
            att.map(|a| a.id.as_str()),
            checklist,
            att.map(|a| a.row.as_str()),
            from.map(|s| s.as_str()),
            to.map(|s| s.as_str()),
            reason,
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(id: &str, path: &str) -> NewAttachment {
        NewAttachment {
            id: id.into(),
            filename: "a.jpg".into(),
            local_uri: path.into(),
            size: 10,
            media_type: "image/jpeg".into(),
            meta_data: None,
            checklist: "c1".into(),
            row: "r1".into(),
            sha256: "00".into(),
            mtime_ns: 1,
            object_key: format!("p/d/c1/r1/{id}.jpg"),
            ctime_ns: None,
            state: State::QueuedUpload,
            error: None,
        }
    }

    #[test]
    fn a_damaged_database_is_detected_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("queue.db");
        // First start: no file, none before.
        assert!(Store::open_checked(&db, false).unwrap().is_ok());
        {
            let mut s = Store::open(&db).unwrap();
            s.insert(&new("id-1", "/c/a.jpg"), None).unwrap();
            assert!(s.last_event_seq().unwrap() >= 1);
        }
        assert!(Store::open_checked(&db, true).unwrap().is_ok());
        // Bytes overwritten in the middle of the file.
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
            let len = f.metadata().unwrap().len();
            f.seek(SeekFrom::Start(len / 2)).unwrap();
            f.write_all(&[0xA5; 4096]).unwrap();
            // The header too, as a card that lost a sector there would.
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(b"garbage garbage!").unwrap();
        }
        let damage = match Store::open_checked(&db, true).unwrap() {
            Err(d @ Damage::Corrupt(_)) => d,
            other => panic!("expected corrupt, got {:?}", other.map(|_| ())),
        };
        let (s, rebuilt) = Store::rebuild(&db, &damage, 1_800_000_000_000).unwrap();
        let kept = rebuilt.kept_as.clone().unwrap();
        assert!(
            kept.ends_with("queue.db.corrupt-20270115T080000-000Z"),
            "{kept}"
        );
        assert!(Path::new(&kept).exists());
        assert_eq!(s.list(&ListFilter::default()).unwrap(), vec![]);
        assert_eq!(s.database_rebuilt().unwrap(), Some(rebuilt));
        // The log continues above anything the old one used (unreadable: the time).
        let ev = s.events_after(0, 10).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventKind::DatabaseRebuilt);
        assert_eq!(ev[0].seq, 1_800_000_000_001);
        assert_eq!(s.events_acked_seq().unwrap(), Some(1_800_000_000_000));
        drop(s);
        assert!(Store::open_checked(&db, true).unwrap().is_ok());

        // A deleted database is a lost one when a daemon ran here before.
        std::fs::remove_file(&db).unwrap();
        assert_eq!(
            Store::open_checked(&db, true).unwrap().err(),
            Some(Damage::Missing)
        );
        let (_, r) = Store::rebuild(&db, &Damage::Missing, 1_800_000_000_000).unwrap();
        assert_eq!((r.reason.as_str(), r.kept_as), ("missing", None));
    }

    #[test]
    fn a_readable_old_log_is_continued() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("queue.db");
        {
            let mut s = Store::open(&db).unwrap();
            for n in 0..5 {
                s.insert(&new(&format!("id-{n}"), &format!("/c/{n}.jpg")), None)
                    .unwrap();
            }
        }
        let (s, _) =
            Store::rebuild(&db, &Damage::Corrupt("test".into()), 1_800_000_000_000).unwrap();
        assert_eq!(s.last_event_seq().unwrap(), 6);
    }

    #[test]
    fn state_machine_allows_only_designed_transitions() {
        use State::*;
        assert!(QueuedUpload.can_become(Synced));
        assert!(QueuedUpload.can_become(Failed));
        assert!(QueuedUpload.can_become(Archived));
        assert!(Failed.can_become(QueuedUpload));
        assert!(!Synced.can_become(Failed));
        assert!(!Failed.can_become(Synced));
        assert!(!Archived.can_become(Failed));
        assert!(!QueuedUpload.can_become(QueuedUpload));
        for s in State::ALL {
            assert_eq!(State::from_str(s.as_str()).unwrap(), s);
        }
    }

    #[test]
    fn every_transition_appends_an_event() {
        let mut s = Store::open_in_memory().unwrap();
        s.insert(&new("a", "/x/a.jpg"), None).unwrap();
        s.transition("a", State::Synced, Change::of(EventKind::Uploaded))
            .unwrap();
        let ev = s.events_after(0, 10).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].kind, EventKind::Enqueued);
        assert_eq!(ev[1].kind, EventKind::Uploaded);
        assert_eq!(ev[1].from_state, Some(State::QueuedUpload));
        assert_eq!(ev[1].to_state, Some(State::Synced));
        let a = s.get("a").unwrap().unwrap();
        assert!(a.has_synced);
        assert_eq!(a.bytes_sent, 10);
        // A forbidden transition changes nothing and logs nothing.
        assert!(s
            .transition("a", State::Failed, Change::of(EventKind::Failed))
            .is_err());
        assert_eq!(s.events_after(0, 10).unwrap().len(), 2);
    }

    #[test]
    fn superseding_archives_the_stale_version_atomically() {
        let mut s = Store::open_in_memory().unwrap();
        s.insert(&new("a", "/x/a.jpg"), None).unwrap();
        s.insert(&new("b", "/x/a.jpg"), Some("a")).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().state, State::Archived);
        assert_eq!(s.latest_for_path("/x/a.jpg").unwrap().unwrap().id, "b");
        let due = s.due_uploads(i64::MAX, 10, false, &[]).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].id, "b");
    }

    #[test]
    fn a_delete_ends_as_a_tombstone_and_a_refused_one_retries_as_a_delete() {
        let mut s = Store::open_in_memory().unwrap();
        s.insert(&new("a", "/x/a.jpg"), None).unwrap();
        s.transition("a", State::Synced, Change::of(EventKind::Uploaded))
            .unwrap();
        let r = s.request_delete("a", "cli", false).unwrap();
        assert_eq!(
            (r.from, r.attachment.state),
            (State::Synced, State::QueuedDelete)
        );
        assert_eq!(s.due_deletes(now_ms(), 5, &[]).unwrap().len(), 1);
        assert_eq!(
            s.queued_for_delete(&["a".into(), "zz".into()]).unwrap(),
            ["a"]
        );
        // Refused for good, then retried: a delete again, not an upload.
        s.transition(
            "a",
            State::Failed,
            Change {
                error: Some(("http_403", "denied")),
                ..Change::of(EventKind::Failed)
            },
        )
        .unwrap();
        assert_eq!(s.retry_failed(Some("a")).unwrap(), ["a"]);
        assert_eq!(s.get("a").unwrap().unwrap().state, State::QueuedDelete);
        assert!(!s.is_tombstone("a").unwrap());
        let a = s.finish_delete("a", "deleted").unwrap();
        assert_eq!(a.state, State::Archived);
        assert!(!a.has_synced);
        assert!(s.is_tombstone("a").unwrap());
        assert_eq!(s.tombstones_in("c1").unwrap().len(), 1);
        // Deleted once is deleted: a second request is refused.
        assert!(matches!(
            s.request_delete("a", "cli", false),
            Err(StoreError::BadTransition { .. })
        ));
        assert!(matches!(
            s.request_delete("nope", "cli", false),
            Err(StoreError::NotFound(_))
        ));
        let kinds: Vec<String> = s
            .events_after(0, 100)
            .unwrap()
            .iter()
            .map(|e| format!("{}:{}", e.kind, e.reason.clone().unwrap_or_default()))
            .collect();
        assert!(
            kinds.contains(&"delete_requested:cli".to_string()),
            "{kinds:?}"
        );
        assert_eq!(kinds.last().unwrap(), "archived:deleted");
    }

    #[test]
    fn retry_requeues_failed_and_resets_attempts() {
        let mut s = Store::open_in_memory().unwrap();
        s.insert(&new("a", "/x/a.jpg"), None).unwrap();
        s.schedule_retry("a", 0, "io", "boom").unwrap();
        s.transition(
            "a",
            State::Failed,
            Change {
                error: Some(("read_error", "denied")),
                ..Change::of(EventKind::Failed)
            },
        )
        .unwrap();
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(a.last_error_code.as_deref(), Some("read_error"));
        assert_eq!(s.retry_failed(None).unwrap(), vec!["a".to_string()]);
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(a.state, State::QueuedUpload);
        assert_eq!(a.attempts, 0);
        assert!(matches!(
            s.retry_failed(Some("a")),
            Err(StoreError::BadTransition { .. })
        ));
        assert!(matches!(
            s.retry_failed(Some("nope")),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn parts_persist_and_progress_follows() {
        let mut s = Store::open_in_memory().unwrap();
        s.insert(&new("a", "/x/a.jpg"), None).unwrap();
        s.begin_multipart("a", "up1", 5).unwrap();
        for n in 1..=2 {
            s.part_done(
                "a",
                &PartRecord {
                    part_number: n,
                    size: 5,
                    etag: format!("e{n}"),
                    checksum: "c".into(),
                },
            )
            .unwrap();
        }
        assert_eq!(s.parts("a").unwrap().len(), 2);
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(a.bytes_sent, 10);
        assert_eq!(a.upload_id.as_deref(), Some("up1"));
    }

    #[test]
    fn concurrent_first_opens_migrate_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.db");
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || Store::open(&p).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        assert_eq!(
            Store::open(&p).unwrap().schema_version().unwrap(),
            MIGRATIONS.len() as i64
        );
    }

    #[test]
    fn a_version_1_database_upgrades_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(MIGRATIONS[0].1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO attachments (id, filename, local_uri, timestamp, size, media_type,
                    state, checklist, row, sha256, mtime_ns, object_key, created_at)
                 VALUES ('old', 'a.jpg', '/x/a.jpg', 1, 3, 'image/jpeg', 'queued_upload',
                    'c', 'r', 'ab', 1, 'k/old.jpg', 1)",
                [],
            )
            .unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let a = s.get("old").unwrap().unwrap();
        assert_eq!(a.state, State::QueuedUpload);
        assert_eq!(a.ctime_ns, None, "old rows are hashed again at upload");
    }

    #[test]
    fn migrations_are_idempotent_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.db");
        {
            let mut s = Store::open(&p).unwrap();
            s.insert(&new("a", "/x/a.jpg"), None).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert!(s.get("a").unwrap().is_some());
    }
}

/// The three wire forms of an event, pinned to the bytes the released agent produced:
/// `fieldsync events --json` (time in unix ms), MQTT `…/events` (time as RFC 3339 text)
/// and status' `last_success` / `last_error` (the README tables).
#[cfg(test)]
mod wire_tests {
    use super::*;
    use crate::mqtt::{encode, PayloadFormat};

    /// A store holding one `uploaded` and one `retry_scheduled` event at fixed times.
    fn store_with_events() -> Store {
        let s = Store::open_in_memory().unwrap();
        s.conn
            .execute_batch(
                "INSERT INTO events (time, kind, outcome, attachment_id, checklist, row,
                    from_state, to_state, reason)
                 VALUES (1767225600123, 'uploaded', 'applied', 'a1', 'c1', 'r1',
                    'queued_upload', 'synced', NULL),
                        (1767225601000, 'retry_scheduled', 'skipped', 'a2', 'c1', 'r2',
                    'queued_upload', 'queued_upload', 'io: connection reset');",
            )
            .unwrap();
        s
    }

    const LOG: &str = r#"[{"seq":1,"time":1767225600123,"kind":"uploaded","outcome":"applied","attachment_id":"a1","checklist":"c1","row":"r1","from_state":"queued_upload","to_state":"synced","reason":null},{"seq":2,"time":1767225601000,"kind":"retry_scheduled","outcome":"skipped","attachment_id":"a2","checklist":"c1","row":"r2","from_state":"queued_upload","to_state":"queued_upload","reason":"io: connection reset"}]"#;

    const MQTT: &str = r#"{"seq":1,"time":"2026-01-01T00:00:00.123Z","kind":"uploaded","outcome":"applied","attachment_id":"a1","checklist":"c1","row":"r1","from_state":"queued_upload","to_state":"synced","reason":null}"#;

    const STATUS: &str = r#""last_success":{"time":"2026-01-01T00:00:00.123Z","kind":"uploaded","attachment_id":"a1","checklist":"c1","row":"r1","reason":null},"last_error":{"time":"2026-01-01T00:00:01.000Z","kind":"retry_scheduled","attachment_id":"a2","checklist":"c1","row":"r2","reason":"io: connection reset"}"#;

    /// The CBOR of [`MQTT`], as hex.
    const MQTT_CBOR: &str =
        "aa63736571016474696d657818323032362d30312d30315430303a30303a30302e3132335a646b69\
        6e646875706c6f61646564676f7574636f6d65676170706c6965646d6174746163686d656e745f69\
        6462613169636865636b6c69737462633163726f776272316a66726f6d5f73746174656d71756575\
        65645f75706c6f616468746f5f73746174656673796e63656466726561736f6ef6";

    /// Every kind's string: the wire schema and the stored form.
    #[test]
    fn event_kind_strings_are_pinned() {
        let strings: Vec<&str> = EventKind::KNOWN.iter().map(EventKind::as_str).collect();
        assert_eq!(
            strings,
            [
                "enqueued",
                "uploaded",
                "retry_scheduled",
                "failed",
                "archived",
                "retried",
                "restored",
                "evicted",
                "repaired",
                "pause_requested",
                "resume_requested",
                "paused",
                "resumed",
                "conditions_changed",
                "disk_low",
                "probe_failed",
                "sidecar_invalid",
                "checklist_published",
                "checklist_invalid",
                "database_rebuilt",
                "reload_requested",
                "config_reloaded",
                "alarm",
                "alarm_cleared",
                "file_skipped",
                "delete_requested",
                "checklist_stalled",
                "downloaded",
                "expired",
            ]
        );
        for k in EventKind::KNOWN {
            assert_eq!(EventKind::parse(k.as_str()), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
            let back: EventKind = serde_json::from_str(&format!("\"{k}\"")).unwrap();
            assert_eq!(back, k);
        }
        // The CLI lays kinds out in columns.
        assert_eq!(format!("[{:<10}]", EventKind::Paused), "[paused    ]");
        assert_eq!(format!("[{:<8}]", EventOutcome::Skipped), "[skipped ]");
    }

    /// A kind written by a newer version reads back verbatim instead of failing the log.
    #[test]
    fn unknown_event_kinds_are_kept() {
        let s = Store::open_in_memory().unwrap();
        s.conn
            .execute_batch(
                "INSERT INTO events (time, kind, outcome) VALUES (5, 'teleported', 'applied');",
            )
            .unwrap();
        let e = s.events_after(0, 1).unwrap().remove(0);
        assert_eq!(e.kind, EventKind::Other("teleported".into()));
        assert_eq!(
            serde_json::to_string(&e.form(EventForm::Summary)).unwrap(),
            r#"{"time":"1970-01-01T00:00:00.005Z","kind":"teleported","attachment_id":null,"checklist":null,"row":null,"reason":null}"#
        );
        let other = EventKind::Other("teleported".into());
        assert_eq!(s.last_event(&[other]).unwrap().unwrap().seq, e.seq);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn event_log_json_is_pinned() {
        let s = store_with_events();
        let events = s.events_after(0, 10).unwrap();
        assert_eq!(serde_json::to_string(&events).unwrap(), LOG);
    }

    #[test]
    fn mqtt_event_json_and_cbor_are_pinned() {
        let s = store_with_events();
        let e = s.events_after(0, 1).unwrap().remove(0);
        let msg = e.form(EventForm::Message);
        assert_eq!(
            String::from_utf8(encode(PayloadFormat::Json, &msg)).unwrap(),
            MQTT
        );
        assert_eq!(hex(&encode(PayloadFormat::Cbor, &msg)), MQTT_CBOR);
    }

    #[test]
    fn status_event_refs_are_pinned() {
        let s = store_with_events();
        let snap = crate::status::snapshot(&s, "d", "file:x", false).unwrap();
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains(STATUS), "{json}");
    }
}

/// The databases released versions left behind (`tests/fixtures/queue-v*.db`) open,
/// migrate and read through today's API: rows, resume state, events and control values.
#[cfg(test)]
mod fixture_tests {
    use super::*;

    const RELEASED: [i64; 2] = [1, 2];

    fn id(n: u32) -> String {
        format!("0b6f7e0a-1d1c-4f55-9d51-0c8a4f1e000{n}")
    }

    fn open_copy(v: i64, dir: &Path) -> Store {
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/queue-v{v}.db"));
        let p = dir.join("queue.db");
        std::fs::copy(src, &p).unwrap();
        let before: i64 = Connection::open(&p)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(before, v, "fixture queue-v{v}.db");
        Store::open(&p).unwrap()
    }

    #[test]
    fn released_databases_migrate_and_read_their_rows() {
        for v in RELEASED {
            let dir = tempfile::tempdir().unwrap();
            let s = open_copy(v, dir.path());
            assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
            let all = s.list(&ListFilter::default()).unwrap();
            assert_eq!(all.len(), if v >= 2 { 7 } else { 6 }, "v{v}");
            let synced = s.get(&id(1)).unwrap().unwrap();
            assert_eq!(synced.state, State::Synced);
            assert!(synced.has_synced);
            assert_eq!(synced.remote_etag.as_deref(), Some("\"e0001\""));
            assert_eq!(
                synced.meta_data.as_deref(),
                Some(r#"{"inspector":"kim","note":"north wall"}"#)
            );
            assert_eq!(synced.ctime_ns, None, "v{v}: rows before 002 hash again");
            let retry = s.get(&id(3)).unwrap().unwrap();
            assert_eq!((retry.state, retry.attempts), (State::QueuedUpload, 2));
            assert_eq!(retry.last_error_code.as_deref(), Some("io"));
            // The newest record of a path is the live one, not the superseded one.
            assert_eq!(
                s.latest_for_path(&retry.local_uri).unwrap().unwrap().id,
                id(3)
            );
            let mp = s.get(&id(4)).unwrap().unwrap();
            assert_eq!(mp.upload_id.as_deref(), Some("mpu-0004"));
            assert_eq!(mp.part_size, Some(8388608));
            assert_eq!(
                s.parts(&id(4)).unwrap(),
                vec![PartRecord {
                    part_number: 1,
                    size: 8,
                    etag: "\"p1\"".into(),
                    checksum: "crc32c:AAAAAA==".into(),
                }]
            );
            assert_eq!(s.uploading().unwrap()[0].id, id(4), "v{v}: stale marker");
            let failed = s.get(&id(5)).unwrap().unwrap();
            assert_eq!(failed.state, State::Failed);
            assert_eq!(failed.last_error_code.as_deref(), Some("read_error"));
            let counts: Vec<(State, i64)> = s
                .counts()
                .unwrap()
                .into_iter()
                .map(|(st, c)| (st, c.count))
                .collect();
            let queued = if v >= 2 { 3 } else { 2 };
            assert_eq!(
                counts,
                [
                    (State::QueuedUpload, queued),
                    (State::Synced, 1),
                    (State::QueuedDelete, 0),
                    (State::QueuedDownload, 0),
                    (State::Archived, 2),
                    (State::Failed, 1),
                ]
            );
            if v >= 2 {
                assert!(s.get(&id(7)).unwrap().unwrap().ctime_ns.is_some());
            }
            let due = s.due_uploads(i64::MAX, 10, false, &[]).unwrap();
            assert_eq!(due.len() as i64, queued, "v{v}");
        }
    }

    #[test]
    fn released_databases_read_their_events() {
        for v in RELEASED {
            let dir = tempfile::tempdir().unwrap();
            let s = open_copy(v, dir.path());
            let ev = s.events_after(0, 1000).unwrap();
            assert_eq!(ev.len(), if v >= 2 { 23 } else { 22 }, "v{v}");
            assert_eq!(s.last_event_seq().unwrap(), ev.len() as i64);
            assert!(
                ev.iter().all(|e| !matches!(e.kind, EventKind::Other(_))),
                "v{v}: every released kind is known: {ev:?}"
            );
            let up = s.last_event(&EventKind::SUCCESS).unwrap().unwrap();
            assert_eq!(up.attachment_id, Some(id(6)));
            assert_eq!(up.from_state, Some(State::QueuedUpload));
            assert_eq!(up.to_state, Some(State::Synced));
            assert_eq!(up.outcome, EventOutcome::Applied);
            let err = s.last_event(&EventKind::ERROR).unwrap().unwrap();
            assert_eq!(err.kind, EventKind::RetryScheduled);
            assert_eq!(err.outcome, EventOutcome::Skipped);
            assert_eq!(err.reason.as_deref(), Some("io: connection reset by peer"));
            let published = ev
                .iter()
                .find(|e| e.kind == EventKind::ChecklistPublished)
                .unwrap();
            assert_eq!(published.checklist.as_deref(), Some("c1"));
            assert_eq!(published.attachment_id, None);
            // New events continue the old sequence.
            s.log_event(EventKind::Repaired, EventOutcome::Applied, None, None)
                .unwrap();
            assert_eq!(s.last_event_seq().unwrap(), ev.len() as i64 + 1);
        }
    }

    #[test]
    fn released_databases_read_their_control_values() {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Budget {
            day: String,
            used: u64,
        }
        for v in RELEASED {
            let dir = tempfile::tempdir().unwrap();
            let s = open_copy(v, dir.path());
            assert!(s.operator_paused().unwrap(), "v{v}");
            assert_eq!(
                s.pause_reason().unwrap().as_deref(),
                Some("paused_by_operator")
            );
            assert_eq!(s.wake_requested_at().unwrap(), Some(1795255740003));
            assert_eq!(s.daemon_started().unwrap(), Some((4242, 1795254600000)));
            assert_eq!(s.events_acked_seq().unwrap(), Some(12));
            assert_eq!(
                s.metered_budget::<Budget>().unwrap(),
                Some(Budget {
                    day: "2026-11-21".into(),
                    used: 1048576
                })
            );
            let report: crate::conditions::report::ConditionsReport =
                s.conditions_report().unwrap().expect("report parses");
            assert_eq!(report.network.interface.as_deref(), Some("wwan0"));
            assert_eq!(report.budget.used, 1048576);
            assert_eq!(report.battery.percent, Some(81));
            assert_eq!(report.failing, ["paused_by_operator"]);
            assert_eq!(
                s.published_checklist("c1").unwrap().map(|d| d.len()),
                Some(64)
            );
            assert_eq!(
                s.invalid_checklist("c2").unwrap().map(|d| d.len()),
                Some(64)
            );
            assert_eq!(s.published_checklist("c2").unwrap(), None);
            // Written back under the same keys.
            s.set_operator_paused(false).unwrap();
            s.set_pause_reason(None).unwrap();
            s.set_events_acked_seq(20).unwrap();
            assert!(!s.operator_paused().unwrap());
            assert_eq!(s.pause_reason().unwrap(), None);
            assert_eq!(s.events_acked_seq().unwrap(), Some(20));
        }
    }
}
