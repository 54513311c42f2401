//! Reload without restart: SIGHUP (`systemctl reload fieldsync`), `fieldsync reload` and
//! MQTT `cmd/reload` re-read the config file and every secret file it names.
//!
//! [`plan`] is the decision, a pure function of the running and the new configuration:
//! what applies live and which changed keys wait for a restart. The [`Reloader`] applies
//! it to the parts through the handles they share with it: the governor's settings
//! (`[conditions]`, `[retention]`), the remote's credentials, the MQTT login slot, and a
//! message to the scheduler (new credentials: re-check an `auth` pause now). A new config
//! that does not load is refused with the one-line error `config check` prints, and the
//! running one stays in force; either way the outcome is one `config_reloaded` event.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{ReloadMsg, ReloadSource, SchedMsg};
use crate::conditions::governor::Governor;
use crate::config::{Config, ConfigError};
use crate::remote::{Remote, RemoteConfig};
use crate::reporter::LoginSlot;
use crate::store::{EventKind, EventOutcome, Store};

/// What a reload does: the live parts that changed, and the keys that changed but take
/// effect only after a restart. Secrets are not compared here (their files are re-read
/// on every reload, and the parts that hold them tell whether they changed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// `[conditions]` (but `probe_interval`) changed: budget, schedule, bandwidth,
    /// battery, disk, temperature.
    pub conditions: bool,
    /// `[retention]` changed: the local-copy rules and the archive cache limit.
    pub retention: bool,
    /// Where the remote's credentials come from changed (inline keys, `credentials_file`,
    /// `profile`, `token`, `token_file`).
    pub remote_credentials: bool,
    /// `mqtt.username`, `password` or `password_file` changed.
    pub mqtt_login: bool,
    /// Changed keys that need a restart, in config order.
    pub restart: Vec<String>,
}

impl Plan {
    /// One line for the log and the event: what changed live, and what waits.
    pub fn summary(&self, credentials_changed: bool, mqtt_changed: bool) -> String {
        let mut live = Vec::new();
        if self.conditions {
            live.push("conditions");
        }
        if self.retention {
            live.push("retention");
        }
        if credentials_changed {
            live.push("remote credentials");
        }
        if mqtt_changed {
            live.push("mqtt credentials");
        }
        let mut s = if live.is_empty() {
            "applied: no live change".to_string()
        } else {
            format!("applied: {}", live.join(", "))
        };
        if !self.restart.is_empty() {
            s.push_str(&format!("; needs a restart: {}", self.restart.join(", ")));
        }
        s
    }
}

/// The config types are plain data whose `Debug` shows every field (secrets redacted:
/// those are compared after reading them, by the parts that hold them).
fn same<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The decision (pure; unit-tested): compares the running configuration with the new one.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    let mut restart = |changed: bool, key: &str| {
        if changed {
            p.restart.push(key.to_string());
        }
    };
    restart(old.device_id != new.device_id, "device_id");
    restart(old.paths.capture != new.paths.capture, "paths.capture");
    restart(
        old.paths.state_dir != new.paths.state_dir,
        "paths.state_dir",
    );
    restart(!same(&old.ingest, &new.ingest), "ingest");
    let (u, v) = (&old.upload, &new.upload);
    restart(u.concurrency != v.concurrency, "upload.concurrency");
    restart(u.order != v.order, "upload.order");
    restart(
        !same(&u.sync_interval, &v.sync_interval),
        "upload.sync_interval",
    );
    restart(
        !same(&u.initial_backoff, &v.initial_backoff),
        "upload.initial_backoff",
    );
    restart(!same(&u.max_backoff, &v.max_backoff), "upload.max_backoff");
    restart(
        u.permanent_attempts != v.permanent_attempts,
        "upload.permanent_attempts",
    );
    restart(
        u.transient_attempts != v.transient_attempts,
        "upload.transient_attempts",
    );
    restart(
        !same(&u.auth_recheck, &v.auth_recheck),
        "upload.auth_recheck",
    );
    restart(old.remote.kind != new.remote.kind, "remote.kind");
    restart(old.remote.prefix != new.remote.prefix, "remote.prefix");
    restart(!same(&old.remote.file, &new.remote.file), "remote.file");
    let (a, b) = (
        without_credentials(&old.remote),
        without_credentials(&new.remote),
    );
    restart(!same(&a.s3, &b.s3), "remote.s3");
    restart(!same(&a.http, &b.http), "remote.http");
    restart(!same(&old.log, &new.log), "log");
    restart(
        !same(
            &old.conditions.probe_interval,
            &new.conditions.probe_interval,
        ),
        "conditions.probe_interval",
    );
    match (&old.mqtt, &new.mqtt) {
        (None, None) => {}
        (Some(m), Some(n)) => {
            let strip = |c: &crate::mqtt::MqttConfig| {
                let mut c = c.clone();
                c.username = None;
                c.password = None;
                c.password_file = None;
                c
            };
            restart(!same(&strip(m), &strip(n)), "mqtt");
            p.mqtt_login = m.username != n.username
                || m.password.as_ref().map(|s| s.expose())
                    != n.password.as_ref().map(|s| s.expose())
                || m.password_file != n.password_file;
        }
        _ => restart(true, "mqtt"),
    }
    let mut oc = old.conditions.clone();
    oc.probe_interval = new.conditions.probe_interval;
    p.conditions = !same(&oc, &new.conditions);
    p.retention = !same(&old.retention, &new.retention);
    p.remote_credentials = credentials_only(&old.remote) != credentials_only(&new.remote);
    p
}

/// The remote's table without the keys that say where credentials come from.
fn without_credentials(r: &RemoteConfig) -> RemoteConfig {
    let mut r = r.clone();
    if let Some(s) = r.s3.as_mut() {
        s.access_key_id = None;
        s.secret_access_key = None;
        s.session_token = None;
        s.credentials_file = None;
        s.profile = String::new();
    }
    if let Some(h) = r.http.as_mut() {
        h.token = None;
        h.token_file = None;
    }
    r
}

/// Only the keys that say where credentials come from (the secrets' values redacted).
fn credentials_only(r: &RemoteConfig) -> String {
    let s3 = r.s3.as_ref().map(|s| {
        format!(
            "{:?}",
            (
                &s.access_key_id,
                &s.secret_access_key.as_ref().map(|v| v.expose().to_string()),
                &s.session_token.as_ref().map(|v| v.expose().to_string()),
                &s.credentials_file,
                &s.profile
            )
        )
    });
    let http = r.http.as_ref().map(|h| {
        format!(
            "{:?}",
            (
                h.token.as_ref().map(|t| t.expose().to_string()),
                &h.token_file
            )
        )
    });
    format!("{s3:?} {http:?}")
}

/// Copies what applied live from `new` into the running configuration, so the next
/// reload compares against what is in force (restart-only keys keep their old value
/// and are named again).
pub fn adopt_live(running: &mut Config, new: &Config) {
    let probe_interval = running.conditions.probe_interval;
    running.conditions = new.conditions.clone();
    running.conditions.probe_interval = probe_interval;
    running.retention = new.retention.clone();
    if let (Some(r), Some(n)) = (running.remote.s3.as_mut(), new.remote.s3.as_ref()) {
        r.access_key_id = n.access_key_id.clone();
        r.secret_access_key = n.secret_access_key.clone();
        r.session_token = n.session_token.clone();
        r.credentials_file = n.credentials_file.clone();
        r.profile = n.profile.clone();
    }
    if let (Some(r), Some(n)) = (running.remote.http.as_mut(), new.remote.http.as_ref()) {
        r.token = n.token.clone();
        r.token_file = n.token_file.clone();
    }
    if let (Some(r), Some(n)) = (running.mqtt.as_mut(), new.mqtt.as_ref()) {
        r.username = n.username.clone();
        r.password = n.password.clone();
        r.password_file = n.password_file.clone();
    }
}

/// The parts a reload reaches, and the configuration in force.
pub struct Reloader {
    /// The config file; `None`: the embedded demo config.
    pub path: Option<PathBuf>,
    pub running: Config,
    pub gov: Arc<Governor>,
    pub remote: Arc<dyn Remote>,
    pub sched: UnboundedSender<SchedMsg>,
    /// The MQTT reporter's login slot, when MQTT runs.
    pub mqtt_login: Option<LoginSlot>,
    /// The MQTT login in force (user, password), to tell whether a reload changed it.
    pub mqtt_current: Option<(String, String)>,
    pub store: Store,
    /// The last `fieldsync reload` request handled (its event sequence number).
    pub handled: i64,
}

impl Reloader {
    /// Handles one message (blocking: file reads, the store).
    pub fn handle(&mut self, msg: ReloadMsg) {
        match msg {
            ReloadMsg::Reload { source, reply } => {
                let outcome = self.reload(source);
                if let Some(r) = reply {
                    let _ = r.send(outcome);
                }
            }
            ReloadMsg::Check => match self.store.reload_requested() {
                Ok(Some(seq)) if seq > self.handled => {
                    self.handled = seq;
                    let _ = self.reload(ReloadSource::Cli);
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot read reload requests"),
            },
        }
    }

    /// Re-reads the configuration and its secrets and applies what can change live.
    /// Returns the summary, or the one-line error that refused the new configuration.
    pub fn reload(&mut self, source: ReloadSource) -> Result<String, String> {
        let outcome = self.try_reload();
        let (event, text) = match &outcome {
            Ok(s) => (EventOutcome::Applied, s.clone()),
            Err(e) => (EventOutcome::Failed, e.clone()),
        };
        match &outcome {
            // One line, naming what waits for a restart when something does.
            Ok(s) if s.contains("needs a restart") => warn!(
                source = source.as_str(),
                "config reloaded: {s} (those changes take effect only after a restart)"
            ),
            Ok(s) => info!(source = source.as_str(), "config reloaded: {s}"),
            Err(e) => warn!(
                source = source.as_str(),
                "config reload refused; the running configuration stays in force: {e}"
            ),
        }
        if let Err(e) = self
            .store
            .log_event(EventKind::ConfigReloaded, event, None, Some(&text))
        {
            warn!(error = %e, "cannot record the reload");
        }
        outcome
    }

    fn try_reload(&mut self) -> Result<String, String> {
        let new = match &self.path {
            Some(p) => Config::load(p).map_err(|e| e.to_string())?,
            None => Config::demo(),
        };
        // A file the new configuration names that cannot be used is refused in the form
        // of every configuration error, naming the file and the key.
        let file = crate::config::source(self.path.as_deref(), true);
        let keyed = |e: String| ConfigError::keyed(&file, &e).to_string();
        let plan = plan(&self.running, &new);
        // Everything is read before anything is applied: a secret file that cannot be
        // read refuses the reload as `config check` would.
        let login = match (&new.mqtt, &self.mqtt_login) {
            (Some(m), Some(_)) if !plan.restart.iter().any(|k| k == "mqtt") => {
                crate::mqtt::options(m, "check", None).map_err(|e| keyed(e.to_string()))?;
                crate::mqtt::login(m).map_err(|e| keyed(e.to_string()))?
            }
            _ => None,
        };
        // New credentials for a remote whose endpoint changed belong to the next start;
        // until then the running one re-reads its own secret files.
        let remote_moved = plan.restart.iter().any(|k| k.starts_with("remote."));
        let creds_changed = self
            .remote
            .reload_credentials((!remote_moved).then_some(&new.remote))
            .map_err(keyed)?;
        if plan.conditions || plan.retention {
            // In force (rate limit included) and in status before the reload is answered.
            if let Err(e) =
                self.gov
                    .reconfigure(&self.store, new.conditions.clone(), new.retention.clone())
            {
                warn!(error = %e, "cannot show the reloaded conditions in status yet");
            }
        }
        let mqtt_changed = match (&self.mqtt_login, login) {
            (Some(slot), Some(l)) if self.mqtt_current.as_ref() != Some(&l) => {
                slot.set(l.0.clone(), l.1.clone());
                self.mqtt_current = Some(l);
                true
            }
            _ => false,
        };
        if creds_changed {
            let _ = self.sched.send(SchedMsg::CredentialsChanged);
        }
        let _ = self.sched.send(SchedMsg::Wake);
        adopt_live(&mut self.running, &new);
        Ok(plan.summary(creds_changed, mqtt_changed))
    }
}

/// Drives the reloader: each request is handled on the blocking pool, one at a time,
/// until shutdown.
pub async fn run(
    mut r: Reloader,
    mut rx: UnboundedReceiver<ReloadMsg>,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        r = tokio::task::spawn_blocking(move || {
            r.handle(msg);
            r
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "device_id = \"d1\"\n[remote.file]\npath = \"/x\"\n[conditions]\nmin_battery_percent = 25\n";

    fn cfg(text: &str) -> Config {
        Config::parse(text, "t").unwrap()
    }

    #[test]
    fn no_change_is_no_change() {
        let p = plan(&cfg(BASE), &cfg(BASE));
        assert_eq!(p, Plan::default());
        assert_eq!(p.summary(false, false), "applied: no live change");
    }

    #[test]
    fn conditions_retention_apply_live() {
        let new = BASE.replace("= 25", "= 60\nbandwidth_limit = \"1MB\"")
            + "[retention]\ndelete_after_upload = true\n";
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(p.conditions && p.retention);
        assert!(p.restart.is_empty(), "{p:?}");
        assert_eq!(p.summary(false, false), "applied: conditions, retention");
        let only = BASE.to_string() + "[retention]\nkeep_synced_files = 3\n";
        let p = plan(&cfg(BASE), &cfg(&only));
        assert_eq!(p.summary(false, false), "applied: retention");
    }

    #[test]
    fn paths_device_and_workers_need_a_restart() {
        let new = BASE.replace("d1", "d2")
            + "[paths]\ncapture = \"/elsewhere\"\n[upload]\nconcurrency = 4\n";
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(!p.conditions);
        assert_eq!(
            p.restart,
            ["device_id", "paths.capture", "upload.concurrency"]
        );
        assert_eq!(
            p.summary(false, false),
            "applied: no live change; needs a restart: device_id, paths.capture, upload.concurrency"
        );
        let probe = BASE.replace("= 25", "= 25\nprobe_interval = \"1s\"");
        let p = plan(&cfg(BASE), &cfg(&probe));
        assert_eq!(p.restart, ["conditions.probe_interval"]);
        assert!(!p.conditions);
    }

    #[test]
    fn remote_credentials_are_live_its_endpoint_is_not() {
        let s3 = |extra: &str| {
            format!("[remote]\nkind = \"s3\"\n[remote.s3]\nendpoint = \"http://a\"\nbucket = \"bbb\"\n{extra}")
        };
        let old = cfg(&s3("access_key_id = \"k\"\nsecret_access_key = \"s1\"\n"));
        let new = cfg(&s3("access_key_id = \"k\"\nsecret_access_key = \"s2\"\n"));
        let p = plan(&old, &new);
        assert!(p.remote_credentials && p.restart.is_empty(), "{p:?}");
        let file = cfg(&s3("credentials_file = \"/etc/creds\"\n"));
        let p = plan(&old, &file);
        assert!(p.remote_credentials && p.restart.is_empty(), "{p:?}");
        let moved = cfg(&s3("access_key_id = \"k\"\nsecret_access_key = \"s1\"\n")
            .replace("http://a", "http://b"));
        assert_eq!(plan(&old, &moved).restart, ["remote.s3"]);
        let proxied = cfg(&s3(
            "access_key_id = \"k\"\nsecret_access_key = \"s1\"\nproxy = \"http://p:3128\"\n",
        ));
        assert_eq!(plan(&old, &proxied).restart, ["remote.s3"]);
    }

    #[test]
    fn mqtt_login_is_live_the_broker_is_not() {
        let m = |extra: &str| format!("{BASE}[mqtt]\nhost = \"b\"\n{extra}");
        let old = cfg(&m("username = \"u\"\npassword = \"p1\"\n"));
        let p = plan(&old, &cfg(&m("username = \"u\"\npassword = \"p2\"\n")));
        assert!(p.mqtt_login && p.restart.is_empty(), "{p:?}");
        let p = plan(
            &old,
            &cfg(&m("username = \"u\"\npassword = \"p1\"\nport = 1884\n")),
        );
        assert_eq!(p.restart, ["mqtt"]);
        assert_eq!(plan(&cfg(BASE), &old).restart, ["mqtt"]);
    }

    #[test]
    fn adopting_the_live_part_leaves_only_the_restart_keys() {
        let old = cfg(BASE);
        let new = cfg(&(BASE.replace("= 25", "= 60") + "[upload]\nconcurrency = 4\n"));
        let mut running = old.clone();
        adopt_live(&mut running, &new);
        let p = plan(&running, &new);
        assert!(!p.conditions);
        assert_eq!(p.restart, ["upload.concurrency"]);
        assert_eq!(running.conditions.min_battery_percent, 60);
        assert_eq!(running.upload.concurrency, 2);
    }
}
