//! Checklist progress: for each photo a checklist.json names, whether it counts as in
//! remote storage, and what publication waits for. Pure: the publisher resolves the
//! records and writes the result to the store; `status` (text, `--json`, MQTT) reads it.
//!
//! Invariant: a photo counts as present once the remote confirmed its exact bytes and
//! nothing deleted them since (`has_synced`, set at upload and cleared only when a delete
//! removed the object), whatever happened to its local copy. So a checklist whose photos
//! were uploaded and then evicted locally (`delete_after_upload`, `keep_synced_*`, disk-low
//! eviction) still publishes, with each photo's key, size and sha256 from its record.

use serde::{Deserialize, Serialize};

use crate::store::{Attachment, State};

/// The status `checklists[]` object (the shared contract of the status JSON and MQTT).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub checklist: String,
    /// Photos the checklist.json names.
    pub named: usize,
    /// Of those, confirmed in remote storage.
    pub synced: usize,
    /// Waiting to upload (queued, in progress, or being deleted).
    pub pending: usize,
    /// Given up on (`failed`), with the reason in `waiting_for`.
    pub failed: usize,
    /// When the current content was published (RFC 3339, UTC); null while it waits.
    pub published_at: Option<String>,
    /// What publication waits for; empty once published.
    pub waiting_for: Vec<Waiting>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Waiting {
    pub file: String,
    /// `pending`, `failed` or `not_captured`.
    pub reason: String,
    /// The failure reason, or why a photo counts as not captured (`deleted`); else null.
    pub detail: Option<String>,
}

/// What one named photo's current record means for publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Photo {
    /// In remote storage: the manifest names it with this record.
    Present,
    /// Archived with its local copy but never uploaded (or its object was deleted):
    /// referenced again, it goes back to `queued_upload`.
    Requeue,
    /// Archived, uploaded, local copy still there: back to `synced`.
    Restore,
    Pending,
    Failed(String),
    NotCaptured(Option<String>),
}

/// Classifies the newest record of a named photo. `local_exists`: whether its local
/// file is there; `tombstone`: an operator deleted it.
pub fn classify(a: Option<&Attachment>, local_exists: bool, tombstone: bool) -> Photo {
    let Some(a) = a else {
        return Photo::NotCaptured(None);
    };
    match a.state {
        State::Synced => Photo::Present,
        State::Archived if tombstone => Photo::NotCaptured(Some("deleted".into())),
        State::Archived if a.has_synced && local_exists => Photo::Restore,
        // Uploaded, then evicted: the remote has it.
        State::Archived if a.has_synced => Photo::Present,
        State::Archived if local_exists => Photo::Requeue,
        State::Archived => Photo::NotCaptured(Some("local file gone before upload".into())),
        State::QueuedUpload | State::QueuedDownload | State::QueuedDelete => Photo::Pending,
        State::Failed => Photo::Failed(
            a.last_error
                .clone()
                .or_else(|| a.last_error_code.clone())
                .unwrap_or_else(|| "failed".into()),
        ),
    }
}

impl Progress {
    pub fn new(checklist: &str) -> Progress {
        Progress {
            checklist: checklist.to_string(),
            named: 0,
            synced: 0,
            pending: 0,
            failed: 0,
            published_at: None,
            waiting_for: Vec::new(),
        }
    }

    /// Counts one named photo as it stands after any restore.
    pub fn add(&mut self, file: &str, p: &Photo) {
        self.named += 1;
        let wait = |reason: &str, detail: Option<String>| Waiting {
            file: file.to_string(),
            reason: reason.into(),
            detail,
        };
        match p {
            Photo::Present | Photo::Restore => self.synced += 1,
            Photo::Pending | Photo::Requeue => {
                self.pending += 1;
                self.waiting_for.push(wait("pending", None));
            }
            Photo::Failed(why) => {
                self.failed += 1;
                self.waiting_for.push(wait("failed", Some(why.clone())));
            }
            Photo::NotCaptured(why) => self.waiting_for.push(wait("not_captured", why.clone())),
        }
    }

    pub fn complete(&self) -> bool {
        self.waiting_for.is_empty()
    }

    /// One line for the `checklist_stalled` event and `fieldsync status`.
    pub fn waiting_line(&self) -> String {
        self.waiting_for
            .iter()
            .map(|w| match &w.detail {
                Some(d) => format!("{} ({}: {d})", w.file, w.reason),
                None => format!("{} ({})", w.file, w.reason),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(state: State, has_synced: bool) -> Attachment {
        Attachment {
            id: "a".into(),
            filename: "a.jpg".into(),
            local_uri: "/c/a.jpg".into(),
            timestamp: 0,
            size: 1,
            media_type: "image/jpeg".into(),
            state,
            has_synced,
            meta_data: None,
            checklist: "c".into(),
            row: "r".into(),
            sha256: "00".into(),
            mtime_ns: 0,
            object_key: "k".into(),
            created_at: 0,
            bytes_sent: 0,
            attempts: 0,
            next_attempt_at: 0,
            last_error: Some("s3_AccessDenied: no".into()),
            last_error_code: None,
            upload_id: None,
            part_size: None,
            uploading_since: None,
            synced_at: None,
            remote_etag: None,
            ctime_ns: None,
        }
    }

    #[test]
    fn an_uploaded_photo_counts_as_present_without_its_local_copy() {
        let evicted = att(State::Archived, true);
        assert_eq!(classify(Some(&evicted), false, false), Photo::Present);
        assert_eq!(classify(Some(&evicted), true, false), Photo::Restore);
        // Deleted by an operator: never present, even though it was uploaded once.
        assert_eq!(
            classify(Some(&att(State::Archived, false)), false, true),
            Photo::NotCaptured(Some("deleted".into()))
        );
        assert_eq!(
            classify(Some(&att(State::Archived, false)), true, false),
            Photo::Requeue
        );
        assert_eq!(classify(None, false, false), Photo::NotCaptured(None));
    }

    #[test]
    fn progress_counts_and_says_what_it_waits_for() {
        let mut p = Progress::new("C-17");
        p.add("a.jpg", &Photo::Present);
        p.add(
            "b.jpg",
            &classify(Some(&att(State::Failed, false)), true, false),
        );
        p.add("c.jpg", &Photo::Pending);
        p.add("d.jpg", &Photo::NotCaptured(None));
        assert_eq!((p.named, p.synced, p.pending, p.failed), (4, 1, 1, 1));
        assert!(!p.complete());
        assert_eq!(
            p.waiting_line(),
            "b.jpg (failed: s3_AccessDenied: no), c.jpg (pending), d.jpg (not_captured)"
        );
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["waiting_for"][0]["reason"], "failed");
        assert_eq!(j["waiting_for"][2]["detail"], serde_json::Value::Null);
        assert_eq!(j["published_at"], serde_json::Value::Null);
    }
}
