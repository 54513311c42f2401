//! Publisher: uploads a checklist's manifest once every photo it names is `synced`.
//!
//! The app declares a checklist finished by writing `<checklist folder>/checklist.json`:
//! rows, their fields, and the photo file names of each row. Once every named photo is
//! confirmed in remote storage, the publisher uploads that JSON enriched with each photo's
//! object key, size, sha256 and upload time to `<prefix>/<device>/<checklist>/manifest.json`
//! and logs `checklist_published`. A backend that sees the manifest can rely on every photo
//! it names being present. A changed checklist.json republishes; the same content twice is
//! a no-op. Photos of the checklist that it does not name are archived once it is
//! published (kept locally and in the log, never deleted). A malformed checklist.json is
//! reported (`checklist_invalid`) and the photos upload regardless.
//!
//! Runs on its own thread: publishing is a network request and must not hold up the
//! scheduler.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::ingest::{Layout, CHECKLIST_FILE};
use crate::remote::{key_component, Remote};
use crate::store::{Attachment, Change, ListFilter, State, Store, StoreError};
use crate::util::{hex, rfc3339};

/// How often the publisher looks for new `uploaded` events: a manifest follows its last
/// photo within this time; shorter costs idle CPU for nothing.
const EVENT_POLL: Duration = Duration::from_secs(2);

/// Messages to the publisher thread.
#[derive(Debug)]
pub enum PublishMsg {
    /// A checklist.json appeared or changed, or a photo of this checklist was synced.
    Check(String),
    /// Look at the event log now (before a `--until-idle` exit).
    Flush,
    Shutdown,
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Published {
        key: String,
    },
    /// Same content as the last publication.
    Unchanged,
    /// Named photos not yet synced (or not yet captured).
    Waiting {
        missing: usize,
    },
    NoChecklist,
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("upload manifest {key}: {message}")]
    Remote { key: String, message: String },
}

pub struct Publisher {
    pub capture: PathBuf,
    pub layout: Layout,
    pub prefix: String,
    pub device: String,
    pub remote: Arc<dyn Remote>,
}

/// Control-table key recording the hash of the last published manifest of a checklist.
fn published_key(checklist: &str) -> String {
    format!("published:{checklist}")
}

/// Control-table key recording the hash of a checklist.json already reported invalid.
fn invalid_key(checklist: &str) -> String {
    format!("checklist_invalid:{checklist}")
}

impl Publisher {
    /// The checklist.json of a checklist, if the layout places checklists in folders.
    pub fn checklist_file(&self, checklist: &str) -> Option<PathBuf> {
        self.layout
            .checklist_dir(&self.capture, checklist)
            .map(|d| d.join(CHECKLIST_FILE))
    }

    pub fn manifest_key(&self, checklist: &str) -> String {
        let mut parts = Vec::new();
        let p = self.prefix.trim_matches('/');
        if !p.is_empty() {
            parts.push(p.to_string());
        }
        parts.push(key_component(&self.device));
        parts.push(key_component(checklist));
        parts.push("manifest.json".into());
        parts.join("/")
    }

    /// Every checklist that has a checklist.json (start-up and periodic passes).
    pub fn all_checklists(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.layout
            .each_checklist_dir(&self.capture, &mut |name, dir| {
                if dir.join(CHECKLIST_FILE).is_file() {
                    out.push(name);
                }
            });
        out
    }

    /// Publishes `checklist` if it is complete and changed since the last publication.
    pub fn check(&self, store: &mut Store, checklist: &str) -> Result<Outcome, PublishError> {
        let Some(path) = self.checklist_file(checklist) else {
            return Ok(Outcome::NoChecklist);
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(_) => return Ok(Outcome::NoChecklist),
        };
        let doc: Value = match serde_json::from_slice(&bytes) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return self.invalid(store, checklist, &path, &bytes, "expected a JSON object")
            }
            Err(e) => return self.invalid(store, checklist, &path, &bytes, &e.to_string()),
        };
        let rows = match doc.get("rows").and_then(Value::as_array) {
            Some(r) => r.clone(),
            None => {
                return self.invalid(store, checklist, &path, &bytes, "expected a `rows` array")
            }
        };

        // Resolve every named photo to its current record.
        let records = store.list(&ListFilter {
            checklist: Some(checklist.to_string()),
            ..Default::default()
        })?;
        let mut named: HashSet<String> = HashSet::new();
        let mut missing = 0;
        let mut out_rows = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let Some(obj) = row.as_object() else {
                return self.invalid(
                    store,
                    checklist,
                    &path,
                    &bytes,
                    &format!("rows[{i}]: expected an object"),
                );
            };
            let Some(row_id) = obj.get("id").and_then(Value::as_str) else {
                return self.invalid(
                    store,
                    checklist,
                    &path,
                    &bytes,
                    &format!("rows[{i}]: expected a string `id`"),
                );
            };
            let photos: Vec<&str> = match obj.get("photos") {
                None => Vec::new(),
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                    a.iter().filter_map(Value::as_str).collect()
                }
                Some(_) => {
                    return self.invalid(
                        store,
                        checklist,
                        &path,
                        &bytes,
                        &format!("rows[{i}].photos: expected an array of file names"),
                    )
                }
            };
            let mut attachments = Vec::new();
            for photo in photos {
                let current = records
                    .iter()
                    .filter(|a| a.row == row_id && a.filename == photo)
                    .max_by_key(|a| a.created_at);
                match current {
                    Some(a) if a.state == State::Synced => {
                        named.insert(a.id.clone());
                        attachments.push(attachment_json(a));
                    }
                    Some(a) if a.state == State::Archived && Path::new(&a.local_uri).exists() => {
                        // Referenced again (a revised checklist): back to where it was.
                        let to = if a.has_synced {
                            State::Synced
                        } else {
                            State::QueuedUpload
                        };
                        let a = store.transition(
                            &a.id,
                            to,
                            Change {
                                kind: "restored",
                                reason: Some("referenced_by_checklist"),
                                ..Default::default()
                            },
                        )?;
                        if to == State::Synced {
                            named.insert(a.id.clone());
                            attachments.push(attachment_json(&a));
                        } else {
                            missing += 1;
                        }
                    }
                    _ => missing += 1,
                }
            }
            let mut r: Map<String, Value> = obj.clone();
            r.insert("attachments".into(), Value::Array(attachments));
            out_rows.push(Value::Object(r));
        }
        if missing > 0 {
            return Ok(Outcome::Waiting { missing });
        }

        let mut manifest = doc.as_object().cloned().unwrap_or_default();
        manifest.insert("rows".into(), Value::Array(out_rows));
        manifest.insert(
            "fieldsync".into(),
            json!({ "device_id": self.device, "checklist": checklist }),
        );
        // The content hash excludes the publication time, so the same content is a no-op.
        let content = serde_json::to_vec(&manifest).expect("serialisable");
        let digest = hex(&Sha256::digest(&content));
        if store.control_get(&published_key(checklist))?.as_deref() == Some(digest.as_str()) {
            return Ok(Outcome::Unchanged);
        }
        manifest
            .get_mut("fieldsync")
            .and_then(Value::as_object_mut)
            .expect("inserted above")
            .insert("published_at".into(), json!(rfc3339(crate::util::now_ms())));
        let body = serde_json::to_vec_pretty(&manifest).expect("serialisable");
        let key = self.manifest_key(checklist);
        self.remote
            .put_bytes(&key, &body, "application/json")
            .map_err(|e| PublishError::Remote {
                key: key.clone(),
                message: e.to_string(),
            })?;
        store.control_set(&published_key(checklist), &digest)?;
        store.log_event_for(
            "checklist_published",
            "applied",
            Some(checklist),
            Some(&key),
        )?;
        info!(checklist, key = %key, "checklist published");

        // Photos of this checklist it does not name are no longer referenced.
        for a in records.iter().filter(|a| {
            !named.contains(&a.id) && matches!(a.state, State::Synced | State::QueuedUpload)
        }) {
            store.transition(
                &a.id,
                State::Archived,
                Change {
                    kind: "archived",
                    reason: Some("not_in_checklist"),
                    ..Default::default()
                },
            )?;
        }
        Ok(Outcome::Published { key })
    }

    fn invalid(
        &self,
        store: &mut Store,
        checklist: &str,
        path: &Path,
        bytes: &[u8],
        why: &str,
    ) -> Result<Outcome, PublishError> {
        let digest = hex(&Sha256::digest(bytes));
        // Report each bad content once, not on every pass.
        if store.control_get(&invalid_key(checklist))?.as_deref() != Some(digest.as_str()) {
            let msg = format!("{}: {why}", path.display());
            warn!(checklist, error = %msg, "malformed checklist.json; its photos still upload");
            store.log_event_for("checklist_invalid", "failed", Some(checklist), Some(&msg))?;
            store.control_set(&invalid_key(checklist), &digest)?;
        }
        Ok(Outcome::Invalid(why.to_string()))
    }

    /// The publisher thread. Checks every checklist at start, then those named by a
    /// message (a checklist.json changed) or by an `uploaded` event in the store's log
    /// (tailed once a second: the workers need no knowledge of checklists). A publication
    /// that failed (remote down) is retried every `retry_interval`.
    pub fn run(&self, store: &mut Store, rx: Receiver<PublishMsg>, retry_interval: Duration) {
        let mut dirty: HashSet<String> = self.all_checklists().into_iter().collect();
        let mut failed: HashSet<String> = HashSet::new();
        let mut seq = store.last_event_seq().unwrap_or(0);
        let mut last_retry = Instant::now();
        loop {
            for name in std::mem::take(&mut dirty) {
                match self.check(store, &name) {
                    Ok(o) => debug!(checklist = %name, outcome = ?o, "checklist checked"),
                    Err(e) => {
                        warn!(checklist = %name, error = %e, "cannot publish checklist yet; will retry");
                        failed.insert(name);
                    }
                }
            }
            match rx.recv_timeout(EVENT_POLL) {
                Ok(PublishMsg::Check(name)) => {
                    dirty.insert(name);
                }
                Ok(PublishMsg::Flush) => {}
                Ok(PublishMsg::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Ok(events) = store.events_after(seq, 1000) {
                for e in events {
                    seq = e.seq;
                    if e.kind == "uploaded" {
                        if let Some(c) = e.checklist {
                            dirty.insert(c);
                        }
                    }
                }
            }
            if last_retry.elapsed() >= retry_interval {
                last_retry = Instant::now();
                dirty.extend(failed.drain());
            }
        }
    }
}

fn attachment_json(a: &Attachment) -> Value {
    let meta: Value = a
        .meta_data
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    json!({
        "file": a.filename,
        "id": a.id,
        "key": a.object_key,
        "size": a.size,
        "sha256": a.sha256,
        "media_type": a.media_type,
        "uploaded_at": a.synced_at.map(rfc3339),
        "meta_data": meta,
    })
}
