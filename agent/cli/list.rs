//! `fieldsync list` and `fieldsync events`: the queue's records and its event log, as
//! lines or JSON.

use crate::config::Config;
use crate::localfs::{readable, readable_line};
use crate::status;
use crate::store::{ListFilter, Store};

use super::common::{open_store, print_json, write_json};
use super::error::{exit, CliError};

/// The records of a filter as a JSON array, serialised as they are read.
struct Listed<'a> {
    store: &'a Store,
    filter: &'a ListFilter,
}

impl serde::Serialize for Listed<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = s.serialize_seq(None)?;
        let mut failed = None;
        self.store
            .list_each(self.filter, &mut |mut a| {
                // Names are shown readably: a byte that is not UTF-8 as `\xff` (README).
                a.filename = readable(&a.filename);
                a.local_uri = readable(&a.local_uri);
                match seq.serialize_element(&a) {
                    Ok(()) => true,
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            })
            .map_err(S::Error::custom)?;
        if let Some(e) = failed {
            return Err(e);
        }
        seq.end()
    }
}

pub fn list(cfg: &Config, filter: &ListFilter, json: bool) -> Result<i32, CliError> {
    let store = open_store(cfg)?;
    if json {
        write_json(&Listed {
            store: &store,
            filter,
        })
        .or_else(|e| match e.io_error_kind() {
            Some(std::io::ErrorKind::BrokenPipe) => Ok(()),
            _ => Err(CliError::new(exit::FAILURE, format!("list: {e}"))),
        })?;
    } else {
        let list = store.list(filter)?;
        for a in &list {
            // checklist/row/file; a part that is empty (a downloaded file has no
            // checklist, a photo outside the layout may have no row) is left out.
            let place = [&a.checklist, &a.row, &a.filename]
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(|p| readable_line(p))
                .collect::<Vec<_>>()
                .join("/");
            println!(
                "{}  {:<14} {:>10}  {}{}",
                a.id,
                a.state,
                status::human_bytes(a.size),
                place,
                a.last_error
                    .as_ref()
                    .map(|e| format!(
                        "  ({}: {})",
                        a.last_error_code.as_deref().unwrap_or(""),
                        readable_line(e)
                    ))
                    .unwrap_or_default()
            );
        }
    }
    Ok(exit::OK)
}

pub fn events(cfg: &Config, after: i64, limit: i64, json: bool) -> Result<i32, CliError> {
    let store = open_store(cfg)?;
    let events = store.events_after(after, limit)?;
    if json {
        print_json(&events);
    } else {
        for e in &events {
            println!(
                "{:>6} {} {:<16} {:<8} {} {}->{} {}",
                e.seq,
                crate::util::rfc3339(e.time),
                e.kind,
                e.outcome,
                e.attachment_id.as_deref().unwrap_or("-"),
                e.from_state.map(|s| s.as_str()).unwrap_or(""),
                e.to_state.map(|s| s.as_str()).unwrap_or(""),
                e.reason.as_deref().unwrap_or("")
            );
        }
    }
    Ok(exit::OK)
}
