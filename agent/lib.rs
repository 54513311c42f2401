//! fieldsync: uploads inspection photos from ARM field devices to object storage.
//!
//! Data flow (see README.md, "Architecture"): `watcher` notices files → `ingest` hashes
//! and records them in the `store` → the `uploader` scheduler hands due attachments to
//! workers when the `conditions` allow → a `remote` moves the bytes → `status` reports.

pub mod alarms;
pub mod assignments;
pub mod bus;
pub mod checklists;
pub mod cli;
pub mod commands;
pub mod conditions;
pub mod config;
pub mod daemon;
pub mod deletes;
pub mod device;
pub mod downloader;
pub mod ingest;
pub mod localfs;
pub mod publisher;
pub mod reload;

pub mod mqtt;
pub mod remote;
pub mod reporter;
pub mod scheduler;
pub mod status;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod units;
pub mod uploader;
pub mod util;
pub mod verify;
pub mod watcher;
