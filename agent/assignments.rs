//! Assignments: the files the back office tells a device to hold, and the archive of the
//! ones no assignment names any more.
//!
//! One schema ([`Document`]), two channels: the retained MQTT message on
//! `<mqtt prefix>/assignments` (handed over by the reporter) and
//! `<remote prefix>/<device>/assignments.json` in the remote, polled every
//! `upload.sync_interval` with a conditional request. Each channel's newest document
//! replaces that channel's previous one; the device holds the **union** of both. When both
//! name the same inbox path with different content, the entry of the document received
//! last wins (a path holds one file).
//!
//! [`reconcile`] turns the union into rows: a named file not present locally with its
//! sha256 becomes `queued_download` (the uploader's workers fetch it, see
//! [`crate::downloader`]); a downloaded file no document names becomes `archived` (its local
//! copy kept as cache); an archived one named again is restored to `synced` without a
//! download when its copy still matches, else queued again. [`expire`] keeps at most
//! `retention.archived_cache_limit` archived records.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::SchedMsg;
use crate::remote::{Fetched, Remote};
use crate::store::{Change, EventKind, NewDownload, State, Store, StoreError};
use crate::util::now_ms;

/// The channel names, as stored and logged.
pub const MQTT: &str = "mqtt";
pub const REMOTE: &str = "remote";

/// An assignment document (JSON or CBOR on MQTT, JSON in the remote).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The files the device must hold; an empty list (or a missing document) names none.
    #[serde(default)]
    pub files: Vec<Entry>,
}

/// One file of an assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The remote key it is downloaded from (not prefixed: the full key).
    pub key: String,
    /// Hex sha256 of its bytes; a download that does not match is never placed.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where it goes, relative to `paths.inbox` (no `..`, not absolute).
    pub path: String,
    /// Content type recorded with the row; default from the extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
}

/// What a channel delivered last, as kept in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    /// Unix ms it was received: orders the channels when both name a path.
    received_at: i64,
    files: Vec<Entry>,
}

/// Why an entry was refused (the others of its document still apply).
pub fn check(e: &Entry) -> Result<(), String> {
    if e.key.is_empty() || e.key.starts_with('/') {
        return Err("`key` must be a non-empty remote key".into());
    }
    if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("`sha256` must be 64 hex digits".into());
    }
    let p = Path::new(&e.path);
    if e.path.is_empty() || e.path.ends_with('/') {
        return Err("`path` must name a file".into());
    }
    // Checked on the text, not on `Path::components`, which drops an inner `.` and
    // merges `//`: one spelling per file, so "named twice" is exact.
    if e.path
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == ".." || seg.contains('\0'))
    {
        return Err("`path` must be relative to the inbox, without `.`, `..` or a root".into());
    }
    if p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(PART_SUFFIX))
    {
        return Err(format!("`path` must not end with `{PART_SUFFIX}`"));
    }
    Ok(())
}

/// The partial download beside its final path ends so.
pub const PART_SUFFIX: &str = ".fieldsync-part";

/// The temp file a download of `dest` is written to (in the inbox, so the rename into place
/// is atomic).
pub fn part_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}{PART_SUFFIX}"))
}

/// Parses a document from MQTT (JSON or CBOR) or the remote (JSON); invalid entries are
/// dropped with a warning, so one bad line does not hold back the rest.
pub fn parse(payload: &[u8], source: &str) -> Result<Document, String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        // An empty retained message clears the channel.
        return Ok(Document::default());
    }
    let mut doc: Document = crate::mqtt::decode(payload)?;
    let mut seen = std::collections::HashSet::new();
    doc.files.retain(|e| match check(e) {
        Err(why) => {
            warn!(source, path = %e.path, key = %e.key, "assignment entry ignored: {why}");
            false
        }
        Ok(()) if !seen.insert(e.path.clone()) => {
            warn!(source, path = %e.path, "assignment entry ignored: the path is named twice");
            false
        }
        Ok(()) => true,
    });
    for e in &mut doc.files {
        e.sha256.make_ascii_lowercase();
    }
    Ok(doc)
}

/// The row id of an entry: a name-based UUID of the device and everything that makes the
/// file what it is, so the same assignment maps to the same row after a restart.
pub fn entry_id(device: &str, e: &Entry) -> String {
    let name = format!(
        "assignment\0{device}\0{}\0{}\0{}\0{}",
        e.key, e.sha256, e.size, e.path
    );
    uuid::Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).to_string()
}

const ID_NAMESPACE: uuid::Uuid = uuid::uuid!("0b6f1f5e-3c2a-4d8e-9f71-5a4e2d1c8b90");

/// Whether `path` holds exactly `size` bytes hashing to `sha256`.
pub fn local_matches(path: &Path, size: u64, sha256: &str) -> bool {
    match fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() == size => {
            crate::ingest::hash_file(path).is_ok_and(|(sha, _)| sha == sha256)
        }
        _ => false,
    }
}

/// What a reconcile changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub queued: usize,
    pub already_local: usize,
    pub archived: usize,
    pub restored: usize,
}

impl Summary {
    pub fn changed(&self) -> bool {
        *self != Summary::default()
    }
}

/// Records `doc` as `channel`'s current document and reconciles the rows with the union.
pub fn receive(
    store: &mut Store,
    inbox: &Path,
    device: &str,
    channel: &str,
    doc: &Document,
) -> Result<Summary, StoreError> {
    let same = store
        .assignments_doc(channel)?
        .and_then(|j| serde_json::from_str::<Stored>(&j).ok())
        .is_some_and(|old| old.files == doc.files);
    // The same document again (a retained message on every reconnect) keeps its place in
    // the order of the channels.
    if !same {
        let stored = Stored {
            received_at: now_ms(),
            files: doc.files.clone(),
        };
        store.set_assignments_doc(
            channel,
            &serde_json::to_string(&stored).expect("serialisable"),
        )?;
    }
    reconcile(store, inbox, device)
}

/// The union of both channels' documents, by inbox path; the later document wins a path.
fn wanted(store: &Store) -> Result<BTreeMap<String, Entry>, StoreError> {
    let mut docs: Vec<Stored> = [MQTT, REMOTE]
        .into_iter()
        .filter_map(|c| store.assignments_doc(c).transpose())
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter_map(|json| serde_json::from_str(&json).ok())
        .collect();
    docs.sort_by_key(|d| d.received_at);
    let mut out = BTreeMap::new();
    for d in docs {
        for e in d.files {
            out.insert(e.path.clone(), e);
        }
    }
    Ok(out)
}

/// Brings the rows in line with what the channels name (see the module header).
pub fn reconcile(store: &mut Store, inbox: &Path, device: &str) -> Result<Summary, StoreError> {
    let wanted = wanted(store)?;
    let ids: BTreeMap<String, &Entry> = wanted.values().map(|e| (entry_id(device, e), e)).collect();
    let rows = store.assignment_rows()?;
    let mut sum = Summary::default();
    for r in &rows {
        if !ids.contains_key(&r.id)
            && matches!(
                r.state,
                State::Synced | State::QueuedDownload | State::Failed
            )
        {
            info!(id = %r.id, path = %r.local_uri, "no assignment names it any more; archived");
            store.transition(
                &r.id,
                State::Archived,
                Change {
                    reason: Some("unassigned"),
                    ..Change::of(EventKind::Archived)
                },
            )?;
            sum.archived += 1;
        }
    }
    let by_id: std::collections::HashMap<&str, &crate::store::Attachment> =
        rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut new = Vec::new();
    for (id, e) in ids {
        let dest = inbox.join(&e.path);
        match by_id.get(id.as_str()) {
            None => {
                let here = local_matches(&dest, e.size, &e.sha256);
                let state = if here {
                    State::Synced
                } else {
                    State::QueuedDownload
                };
                new.push((
                    NewDownload {
                        id: id.clone(),
                        filename: dest
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        // The stored form every path has (`localfs::path_text`).
                        local_uri: crate::localfs::path_text(&dest),
                        size: e.size as i64,
                        sha256: e.sha256.clone(),
                        object_key: e.key.clone(),
                        media_type: e.media_type.clone().unwrap_or_else(|| {
                            let ext = dest.extension().and_then(|x| x.to_str());
                            crate::ingest::media_type(ext.unwrap_or("")).to_string()
                        }),
                    },
                    state,
                ));
                if here {
                    sum.already_local += 1;
                } else {
                    sum.queued += 1;
                }
            }
            Some(r) if r.state == State::Archived => {
                let here = local_matches(&dest, e.size, &e.sha256);
                let (to, reason) = if here {
                    (State::Synced, "local_copy_intact")
                } else {
                    (State::QueuedDownload, "local_copy_changed")
                };
                info!(id = %id, path = %r.local_uri, to = %to, "assigned again; restored");
                store.transition(
                    &id,
                    to,
                    Change {
                        reason: Some(reason),
                        ..Change::of(EventKind::Restored)
                    },
                )?;
                sum.restored += 1;
            }
            Some(_) => {}
        }
    }
    // One transaction for every new file (one fsync for a large assignment).
    store.insert_downloads(&new)?;
    Ok(sum)
}

/// One record [`expire`] removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Expired {
    pub id: String,
    /// Readable form (`\xff` for a byte that is not UTF-8), as in `list --json`.
    pub path: String,
    /// The same for one line of text (control characters escaped too).
    #[serde(skip)]
    pub path_line: String,
    /// Whether its local copy was deleted (only ever a downloaded inbox file).
    pub local_deleted: bool,
}

/// Keeps at most `limit` archived records: the oldest beyond it are removed with an
/// `expired` event. A downloaded file's local inbox copy goes with its record (unless a
/// newer row uses the same path). A captured photo's file is never deleted here, and its
/// record stays while the file exists: it is what stops a rescan from ingesting and
/// uploading the photo again. An operator's delete (its tombstone) is never expired and
/// not counted: the same bytes put back at its path must stay deleted.
pub fn expire(store: &mut Store, limit: u64) -> Result<Vec<Expired>, StoreError> {
    let archived = store.archived_oldest_first()?;
    let mut excess = archived.len().saturating_sub(limit as usize);
    let mut out = Vec::new();
    for (a, assigned) in archived {
        if excess == 0 {
            break;
        }
        // The stored text stands for the exact bytes of the name (not UTF-8 included).
        let path_buf = crate::localfs::text_path(&a.local_uri);
        let path = path_buf.as_path();
        let shown = crate::localfs::readable_line(&a.local_uri);
        let mut local_deleted = false;
        if assigned {
            if !store.path_in_use_by_other(&a.local_uri, &a.id)? {
                match fs::remove_file(path) {
                    Ok(()) => local_deleted = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        warn!(id = %a.id, path = %shown, error = %e, "cannot delete the archived copy; kept");
                        continue;
                    }
                }
                let _ = fs::remove_file(part_path(path));
            }
        } else if fs::symlink_metadata(path).is_ok() {
            continue;
        }
        let reason = if local_deleted {
            "local_copy_deleted"
        } else {
            "record_only"
        };
        store.remove_expired(&a.id, reason)?;
        info!(id = %a.id, path = %shown, reason, "archived record expired");
        out.push(Expired {
            id: a.id,
            path: crate::localfs::readable(&a.local_uri),
            path_line: shown,
            local_deleted,
        });
        excess -= 1;
    }
    Ok(out)
}

/// The remote key of this device's assignments file.
pub fn remote_key(prefix: &str, device: &str) -> String {
    let prefix = prefix.trim_matches('/');
    let device = crate::remote::key_component(device);
    if prefix.is_empty() {
        format!("{device}/assignments.json")
    } else {
        format!("{prefix}/{device}/assignments.json")
    }
}

/// What the assignments loop needs.
pub struct AssignmentLoop {
    pub store: Store,
    pub remote: Arc<dyn Remote>,
    pub inbox: PathBuf,
    pub device: String,
    /// `<prefix>/<device>/assignments.json`.
    pub key: String,
    pub interval: Duration,
    /// `retention.archived_cache_limit` as in force now (a reload changes it).
    pub cache_limit: Arc<dyn Fn() -> u64 + Send + Sync>,
    pub sched: UnboundedSender<SchedMsg>,
    /// The transfer gate: the remote file is read only while transfers may run (online,
    /// battery, schedule, not paused), like any download.
    pub shared: Arc<crate::bus::Shared>,
}

impl AssignmentLoop {
    /// One poll of the remote file (conditional) plus expiry; blocking.
    fn poll(&mut self) {
        self.poll_remote();
        self.expire();
    }

    fn poll_remote(&mut self) {
        let tag = self.store.assignments_tag().ok().flatten();
        match self.remote.fetch_if_changed(&self.key, tag.as_deref()) {
            Ok(Fetched::Unchanged) => {}
            Ok(Fetched::Missing) => {
                // No file: the channel names nothing (once; then nothing to do).
                if tag.is_some() {
                    info!(key = %self.key, "remote assignments file is gone");
                    self.apply(REMOTE, &Document::default());
                    let _ = self.store.set_assignments_tag(None);
                }
            }
            Ok(Fetched::Changed { body, tag }) => match parse(&body, REMOTE) {
                Ok(doc) => {
                    info!(key = %self.key, files = doc.files.len(), "remote assignments changed");
                    if self.apply(REMOTE, &doc) {
                        let _ = self.store.set_assignments_tag(tag.as_deref());
                    }
                }
                Err(e) => {
                    warn!(key = %self.key, "remote assignments file ignored: {e}");
                    // Not read again until it changes.
                    let _ = self.store.set_assignments_tag(tag.as_deref());
                }
            },
            Err(e) => debug!(key = %self.key, error = %e, "cannot read the remote assignments"),
        }
    }

    fn apply(&mut self, channel: &str, doc: &Document) -> bool {
        match receive(&mut self.store, &self.inbox, &self.device, channel, doc) {
            Ok(sum) => {
                if sum.changed() {
                    info!(
                        channel,
                        queued = sum.queued,
                        already_local = sum.already_local,
                        archived = sum.archived,
                        restored = sum.restored,
                        "assignments applied"
                    );
                    let _ = self.sched.send(SchedMsg::Wake);
                }
                self.expire();
                true
            }
            Err(e) => {
                warn!(channel, error = %e, "cannot apply assignments; will retry");
                false
            }
        }
    }

    fn expire(&mut self) {
        if let Err(e) = expire(&mut self.store, (self.cache_limit)()) {
            warn!(error = %e, "cannot expire archived records");
        }
    }
}

/// While transfers may not run, how often the remote poll checks whether they may again.
const GATE_RECHECK: Duration = Duration::from_secs(1);

/// Drives the channels until shutdown: a poll of the remote file every `interval`, and
/// every MQTT document as it arrives.
pub async fn run(
    l: AssignmentLoop,
    mut mqtt: UnboundedReceiver<Vec<u8>>,
    shutdown: CancellationToken,
) {
    let mut l = Some(l);
    let mut next_poll = tokio::time::Instant::now();
    let mut mqtt_open = true;
    loop {
        enum Work {
            Poll,
            Mqtt(Vec<u8>),
        }
        let work = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next_poll) => Work::Poll,
            m = mqtt.recv(), if mqtt_open => match m {
                Some(p) => Work::Mqtt(p),
                // No reporter (no `[mqtt]`): only the remote channel.
                None => {
                    mqtt_open = false;
                    continue;
                }
            },
        };
        if matches!(work, Work::Poll) && !l.as_ref().is_some_and(|c| c.shared.keep_going()) {
            // Transfers may not run now (offline, paused, battery, schedule): look again
            // shortly rather than a whole interval later.
            next_poll = tokio::time::Instant::now() + GATE_RECHECK;
            continue;
        }
        let was_poll = matches!(work, Work::Poll);
        let mut c = l.take().expect("assignment loop");
        let r = tokio::task::spawn_blocking(move || {
            match work {
                Work::Poll => c.poll(),
                Work::Mqtt(p) => match parse(&p, MQTT) {
                    Ok(doc) => {
                        info!(files = doc.files.len(), "mqtt assignments received");
                        c.apply(MQTT, &doc);
                    }
                    Err(e) => warn!("mqtt assignments ignored: {e}"),
                },
            }
            c
        })
        .await;
        match r {
            Ok(c) => l = Some(c),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
        if was_poll {
            next_poll = tokio::time::Instant::now() + l.as_ref().expect("loop").interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, body: &[u8]) -> Entry {
        use sha2::Digest;
        Entry {
            key: format!("refs/{path}"),
            sha256: crate::util::hex(&sha2::Sha256::digest(body)),
            size: body.len() as u64,
            path: path.into(),
            media_type: None,
        }
    }

    fn doc_of(files: &[Entry]) -> Document {
        Document {
            files: files.to_vec(),
        }
    }

    #[test]
    fn bad_entries_are_refused_one_by_one() {
        let ok = entry("a/b.pdf", b"x");
        assert!(check(&ok).is_ok());
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../x",
            "",
            "./a",
            "a/./b",
            "a//b",
            "a/.",
            "a/b/",
            "a/.b.fieldsync-part",
        ] {
            assert!(
                check(&Entry {
                    path: bad.into(),
                    ..ok.clone()
                })
                .is_err(),
                "{bad}"
            );
        }
        assert!(check(&Entry {
            sha256: "00".into(),
            ..ok.clone()
        })
        .is_err());
        let json = format!(
            r#"{{"files":[{},{{"key":"k","sha256":"zz","size":1,"path":"p"}}]}}"#,
            serde_json::to_string(&ok).unwrap()
        );
        let doc = parse(json.as_bytes(), "test").unwrap();
        assert_eq!(doc.files, vec![ok.clone()]);
        assert_eq!(parse(b"", "test").unwrap(), Document::default());
        // CBOR, like every MQTT payload: the same schema.
        let mut cbor = Vec::new();
        ciborium::into_writer(&doc_of(std::slice::from_ref(&ok)), &mut cbor).unwrap();
        assert_eq!(parse(&cbor, "test").unwrap().files, vec![ok]);
    }

    #[test]
    fn union_of_channels_archive_restore_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path().join("inbox");
        let mut s = Store::open_in_memory().unwrap();
        let a = entry("a.pdf", b"aaa");
        let b = entry("b.pdf", b"bbb");
        let doc = |v: Vec<Entry>| Document { files: v };
        let sum = receive(&mut s, &inbox, "d", MQTT, &doc(vec![a.clone()])).unwrap();
        assert_eq!(sum.queued, 1);
        receive(&mut s, &inbox, "d", REMOTE, &doc(vec![b.clone()])).unwrap();
        let rows = s.assignment_rows().unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.state == State::QueuedDownload));

        // Pretend a.pdf was downloaded.
        fs::create_dir_all(&inbox).unwrap();
        fs::write(inbox.join("a.pdf"), b"aaa").unwrap();
        let ida = entry_id("d", &a);
        s.download_done(&ida, 0, "downloaded").unwrap();

        // MQTT drops a: archived, copy kept; remote still names b.
        let sum = receive(&mut s, &inbox, "d", MQTT, &doc(vec![])).unwrap();
        assert_eq!(sum.archived, 1);
        assert_eq!(s.get(&ida).unwrap().unwrap().state, State::Archived);
        assert!(inbox.join("a.pdf").exists());
        // Named again on the other channel: restored without a download.
        let sum = receive(
            &mut s,
            &inbox,
            "d",
            REMOTE,
            &doc(vec![a.clone(), b.clone()]),
        )
        .unwrap();
        assert_eq!(sum.restored, 1);
        assert_eq!(s.get(&ida).unwrap().unwrap().state, State::Synced);

        // Archive both, limit 1: the older one expires with its copy.
        receive(&mut s, &inbox, "d", REMOTE, &doc(vec![])).unwrap();
        let gone = expire(&mut s, 1).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(s.archived_oldest_first().unwrap().len(), 1);
    }

    #[test]
    fn expiry_never_deletes_a_capture_photo_and_keeps_its_record_while_the_file_exists() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in_memory().unwrap();
        for (id, exists) in [("kept", true), ("gone", false)] {
            let path = dir.path().join(format!("{id}.jpg"));
            if exists {
                fs::write(&path, b"photo").unwrap();
            }
            s.insert(
                &crate::store::NewAttachment {
                    id: id.into(),
                    filename: format!("{id}.jpg"),
                    local_uri: path.display().to_string(),
                    size: 5,
                    media_type: "image/jpeg".into(),
                    meta_data: None,
                    checklist: "c".into(),
                    row: "r".into(),
                    sha256: "00".into(),
                    mtime_ns: 0,
                    object_key: format!("k/{id}"),
                    ctime_ns: None,
                    state: State::QueuedUpload,
                    error: None,
                },
                None,
            )
            .unwrap();
            s.transition(id, State::Archived, Change::of(EventKind::Archived))
                .unwrap();
        }
        let gone = expire(&mut s, 0).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].id, "gone");
        assert!(!gone[0].local_deleted);
        // The photo whose file exists stays, record and file: a rescan must not find it new.
        assert!(dir.path().join("kept.jpg").exists());
        assert_eq!(s.get("kept").unwrap().unwrap().state, State::Archived);
    }
}
