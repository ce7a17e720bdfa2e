//! Backup health that operators can see: what every run leaves behind (a small JSON file
//! beside etcd's data dir, `.etcd-actions-health-<data-dir name>.json`: outside the data dir
//! and its state dir, which restores and their recovery own), the Prometheus textfile written from it after every run (node_exporter's
//! textfile collector reads it), the charm's workload status, and the `status` command.
//!
//! Everything here reads the state the last runs left: no snapshot, no listing of the store.
//! The facts come from each run's outcome and results, recorded once the run has ended.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::juju::Results;
use crate::manifest::now_secs;

/// Where node_exporter's textfile collector reads by default on Debian and Ubuntu
/// (`prometheus-node-exporter`'s `--collector.textfile.directory`).
pub const DEFAULT_METRICS_DIR: &str = "/var/lib/prometheus/node-exporter";
/// The textfile's name.
pub const METRICS_FILE: &str = "etcd_backup.prom";
/// How many verified archives (by sha256) are remembered.
const VERIFIED_MAX: usize = 64;

/// What one operation (at one location) has done so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct Operation {
    /// Unix seconds of the last success and failure (0: never).
    pub last_success: u64,
    pub last_failure: u64,
    pub last_duration_seconds: f64,
    pub successes: u64,
    pub failures: u64,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Whether the last run succeeded (times are in seconds: two runs can share one).
    pub last_ok: Option<bool>,
}

/// The newest archive at a location.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct Newest {
    pub id: String,
    /// When it was written (unix seconds).
    pub at: u64,
    pub bytes: u64,
    pub revision: Option<i64>,
    pub sha256: Option<String>,
    /// How long the run that wrote it took.
    pub duration_seconds: f64,
    pub encrypted: bool,
}

/// The last restore drill (`verify --deep`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct Drill {
    pub at: u64,
    pub id: String,
    pub passed: bool,
    /// The measured time of the drill's restore (the whole verify).
    pub duration_seconds: f64,
    pub message: String,
}

/// The last error of any run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct LastError {
    pub at: u64,
    pub operation: String,
    pub message: String,
}

/// Everything the runs on this unit left behind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct Health {
    /// By `<operation>/<location>`: snapshot, upload, verify, drill, prune, restore, backup;
    /// local or store.
    pub operations: BTreeMap<String, Operation>,
    /// By location.
    pub newest: BTreeMap<String, Newest>,
    /// Archives kept after the last prune.
    pub archives_kept: Option<u64>,
    pub drill: Option<Drill>,
    pub last_error: Option<LastError>,
    /// sha256 of archives that verify checked, newest last.
    pub verified: Vec<String>,
}

impl Health {
    /// The state in `file`, or an empty one.
    pub fn load(file: &Path) -> Health {
        std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, file: &Path) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(self).expect("health serializes");
        crate::fsutil::write_atomic(file, &text)
    }

    fn op(&mut self, operation: &str, location: &str) -> &mut Operation {
        self.operations
            .entry(format!("{operation}/{location}"))
            .or_default()
    }

    fn succeeded(&mut self, operation: &str, location: &str, now: u64, seconds: f64) {
        let op = self.op(operation, location);
        op.last_success = now;
        op.last_duration_seconds = seconds;
        op.successes += 1;
        op.last_ok = Some(true);
    }

    fn failed(&mut self, operation: &str, location: &str, now: u64, seconds: f64, e: &str) {
        let op = self.op(operation, location);
        op.last_failure = now;
        op.last_duration_seconds = seconds;
        op.failures += 1;
        op.last_ok = Some(false);
        op.last_error = Some(crate::error::bounded(e, 400));
        self.last_error = Some(LastError {
            at: now,
            operation: operation.to_string(),
            message: crate::error::bounded(e, 400),
        });
    }

    /// The newest archive anywhere, and where: `s3` when the store has it.
    pub fn newest_anywhere(&self) -> Option<(&Newest, &'static str)> {
        let local = self.newest.get("local");
        let store = ["store", "azure", "gcs"]
            .iter()
            .filter_map(|k| self.newest.get(*k))
            .max_by_key(|n| n.at);
        match (local, store) {
            // The same archive, uploaded; or one uploaded after the newest local one.
            (Some(l), Some(s)) if s.id == l.id || s.at > l.at => Some((s, "s3")),
            (Some(l), _) => Some((l, "local")),
            (None, Some(s)) => Some((s, "s3")),
            (None, None) => None,
        }
    }

    /// Whether the upload that ran last failed.
    pub fn upload_failed(&self) -> Option<&Operation> {
        self.operations
            .get("upload/store")
            .filter(|o| o.last_ok == Some(false))
    }

    /// Whether a restore failed after the last successful snapshot: the restore then set the
    /// unit's status itself (what it left, and what to do), and backup health leaves it.
    pub fn restore_status_stands(&self) -> bool {
        let failed = self
            .operations
            .iter()
            .filter(|(k, _)| k.starts_with("restore/"))
            .map(|(_, o)| o.last_failure)
            .max()
            .unwrap_or(0);
        let backed_up = self
            .operations
            .get("snapshot/local")
            .map_or(0, |o| o.last_success);
        failed > 0 && failed >= backed_up
    }

    /// Whether the last scheduled run (`backup`) failed.
    pub fn scheduled_run_failed(&self) -> Option<&Operation> {
        self.operations
            .iter()
            .filter(|(k, _)| k.starts_with("backup/"))
            .map(|(_, o)| o)
            .max_by_key(|o| o.last_success.max(o.last_failure))
            .filter(|o| o.last_ok == Some(false))
    }
}

/// The command a run was, for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    Snapshot,
    Backup,
    Verify,
    Prune,
    Restore,
    /// Commands that leave no health facts (list-backups, schedule, status).
    Other,
}

impl Ran {
    pub fn of(command: &crate::cli::Command) -> Ran {
        use crate::cli::Command as C;
        match command {
            C::Snapshot(_) => Ran::Snapshot,
            C::Backup(_) => Ran::Backup,
            C::Verify(_) => Ran::Verify,
            C::Prune(_) => Ran::Prune,
            C::Restore(_) => Ran::Restore,
            _ => Ran::Other,
        }
    }
}

/// Where the store went wrong rather than the archive.
fn is_store_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Store { .. }
            | Error::StoreConflict { .. }
            | Error::StoreUnconfirmed { .. }
            | Error::StoreNotReady(_)
            | Error::ProviderNotReady { .. }
    )
}

/// Records what a run did, from its outcome and results.
pub fn record(
    health: &mut Health,
    ran: Ran,
    results: &Results,
    outcome: &Result<(), Error>,
    seconds: f64,
    now: u64,
) {
    let get = |k: &str| results.get(k);
    let message = outcome.as_ref().err().map(|e| e.to_string());
    let store_failed = outcome.as_ref().err().is_some_and(is_store_error);
    let uploaded = get("upload.url").is_some();
    // `store` (S3), `azure` or `gcs`: the store this run used.
    let store_at = crate::store::location_used().unwrap_or("store");
    match ran {
        Ran::Snapshot | Ran::Backup => {
            let wrote = get("snapshot.path").is_some() && get("snapshot.skipped").is_none();
            match &message {
                None => health.succeeded("snapshot", "local", now, seconds),
                Some(m) if store_failed && get("snapshot.path").is_some() => {
                    health.succeeded("snapshot", "local", now, seconds);
                    health.failed("upload", store_at, now, seconds, m);
                }
                Some(m) if store_failed => health.failed("upload", store_at, now, seconds, m),
                Some(m) if get("snapshot.path").is_some() => {
                    // The snapshot was written; what failed came after it (a prune).
                    health.succeeded("snapshot", "local", now, seconds);
                    if ran == Ran::Backup {
                        health.failed("prune", "local", now, seconds, m);
                    }
                }
                Some(m) => health.failed("snapshot", "local", now, seconds, m),
            }
            if uploaded {
                health.succeeded("upload", store_at, now, seconds);
            }
            if wrote {
                let newest = Newest {
                    id: get("snapshot.path")
                        .and_then(|p| Path::new(p).file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    at: now,
                    bytes: get("snapshot.bytes")
                        .and_then(|b| b.parse().ok())
                        .unwrap_or(0),
                    revision: get("snapshot.revision").and_then(|r| r.parse().ok()),
                    sha256: get("snapshot.sha256").map(str::to_string),
                    duration_seconds: seconds,
                    encrypted: get("snapshot.encryption").is_some(),
                };
                if uploaded {
                    health.newest.insert(store_at.into(), newest.clone());
                }
                health.newest.insert("local".into(), newest);
            } else if uploaded {
                // An unchanged archive uploaded now (its earlier upload had failed).
                if let Some(l) = health.newest.get("local").cloned() {
                    health
                        .newest
                        .insert(store_at.into(), Newest { at: now, ..l });
                }
            }
            if let Some(kept) = get("prune.kept").and_then(|k| k.parse().ok()) {
                health.archives_kept = Some(kept);
                health.succeeded("prune", "local", now, seconds);
            }
            if ran == Ran::Backup {
                let at = if uploaded { store_at } else { "local" };
                match &message {
                    None => health.succeeded("backup", at, now, seconds),
                    Some(m) => health.failed("backup", at, now, seconds, m),
                }
            }
        }
        Ran::Verify => {
            let at = match get("verify.origin") {
                Some("store") => store_at,
                _ => "local",
            };
            let drill = get("verify.drill").unwrap_or("not run");
            match &message {
                None => {
                    health.succeeded("verify", at, now, seconds);
                    if let Some(sha) = get("verify.sha256") {
                        health.verified.retain(|s| s != sha);
                        health.verified.push(sha.to_string());
                        let over = health.verified.len().saturating_sub(VERIFIED_MAX);
                        health.verified.drain(..over);
                    }
                }
                Some(m) => health.failed("verify", at, now, seconds, m),
            }
            if drill != "not run" {
                let passed = message.is_none() && drill == "passed";
                if passed {
                    health.succeeded("drill", at, now, seconds);
                } else {
                    let m = message.clone().unwrap_or_else(|| drill.to_string());
                    health.failed("drill", at, now, seconds, &m);
                }
                health.drill = Some(Drill {
                    at: now,
                    id: get("verify.id").unwrap_or_default().to_string(),
                    passed,
                    duration_seconds: seconds,
                    message: drill.to_string(),
                });
            }
        }
        Ran::Prune => match &message {
            None => {
                health.succeeded("prune", "local", now, seconds);
                if let Some(kept) = get("prune.kept").and_then(|k| k.parse().ok()) {
                    if get("prune.dry-run") != Some("true") {
                        health.archives_kept = Some(kept);
                    }
                }
            }
            Some(m) => health.failed("prune", "local", now, seconds, m),
        },
        Ran::Restore => {
            let at = match get("restore.origin") {
                Some("store") => store_at,
                _ => "local",
            };
            match &message {
                None => health.succeeded("restore", at, now, seconds),
                Some(m) => health.failed("restore", at, now, seconds, m),
            }
        }
        Ran::Other => {}
    }
}

/// Prometheus label values are fixed words here: operations and locations, never a path or
/// an id.
fn labels(key: &str) -> String {
    let (op, at) = key.split_once('/').unwrap_or((key, "local"));
    format!("operation=\"{op}\",location=\"{at}\"")
}

/// The textfile node_exporter reads, from the state (and the configured max age).
pub fn metrics(health: &Health, max_age: Option<u64>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    };
    let ops = &health.operations;
    let per_op = |f: &dyn Fn(&Operation) -> f64| -> Vec<(String, f64)> {
        ops.iter().map(|(k, o)| (labels(k), f(o))).collect()
    };
    family(
        "etcd_backup_last_success_timestamp_seconds",
        "gauge",
        "When the operation last succeeded (unix seconds; 0: never).",
        per_op(&|o| o.last_success as f64),
    );
    family(
        "etcd_backup_last_failure_timestamp_seconds",
        "gauge",
        "When the operation last failed (unix seconds; 0: never).",
        per_op(&|o| o.last_failure as f64),
    );
    family(
        "etcd_backup_last_duration_seconds",
        "gauge",
        "How long the operation's last run took.",
        per_op(&|o| o.last_duration_seconds),
    );
    let mut runs = Vec::new();
    for (k, o) in ops {
        runs.push((
            format!("{},result=\"success\"", labels(k)),
            o.successes as f64,
        ));
        runs.push((
            format!("{},result=\"failure\"", labels(k)),
            o.failures as f64,
        ));
    }
    family(
        "etcd_backup_runs_total",
        "counter",
        "Runs of the operation, by result.",
        runs,
    );
    let newest = |f: &dyn Fn(&Newest) -> Option<f64>| -> Vec<(String, f64)> {
        health
            .newest
            .iter()
            .filter_map(|(at, n)| f(n).map(|v| (format!("location=\"{at}\""), v)))
            .collect()
    };
    family(
        "etcd_backup_newest_timestamp_seconds",
        "gauge",
        "When the newest backup at the location was written (unix seconds).",
        newest(&|n| Some(n.at as f64)),
    );
    family(
        "etcd_backup_newest_size_bytes",
        "gauge",
        "Size of the newest backup's archive.",
        newest(&|n| Some(n.bytes as f64)),
    );
    family(
        "etcd_backup_newest_duration_seconds",
        "gauge",
        "How long the run that wrote the newest backup took.",
        newest(&|n| Some(n.duration_seconds)),
    );
    family(
        "etcd_backup_newest_revision",
        "gauge",
        "etcd's revision in the newest backup.",
        newest(&|n| n.revision.map(|r| r as f64)),
    );
    if let Some(d) = &health.drill {
        family(
            "etcd_backup_drill_duration_seconds",
            "gauge",
            "How long the last restore drill took: the measured restore time.",
            vec![(String::new(), d.duration_seconds)],
        );
        family(
            "etcd_backup_drill_passed",
            "gauge",
            "Whether the last restore drill passed (1) or failed (0).",
            vec![(String::new(), if d.passed { 1.0 } else { 0.0 })],
        );
    }
    if let Some(k) = health.archives_kept {
        family(
            "etcd_backup_archives_kept",
            "gauge",
            "Archives kept by the last prune.",
            vec![(String::new(), k as f64)],
        );
    }
    if let Some(a) = max_age {
        family(
            "etcd_backup_max_age_seconds",
            "gauge",
            "The configured age past which the newest backup is too old (backup-max-age).",
            vec![(String::new(), a as f64)],
        );
    }
    out
}

/// Parses a max age: `26h`, `2d`, `90m` (minutes), `1w`, `3600s`, or a number of seconds;
/// `0` or empty: none.
pub fn parse_max_age(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.is_empty() || t == "0" {
        return Ok(None);
    }
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{t}` is not an age; write it like 26h, 2d or 90m"))?;
    let unit = match unit {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("`{t}` is not an age; write it like 26h, 2d or 90m")),
    };
    Ok(Some(n.saturating_mul(unit)).filter(|&s| s > 0))
}

/// `40s`, `5m`, `2h`, `3d`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The workload status the facts give: (`active` or `blocked`, message).
pub fn workload_status(health: &Health, max_age: Option<u64>, now: u64) -> (&'static str, String) {
    if let Some(o) = health.scheduled_run_failed() {
        return (
            "blocked",
            format!(
                "scheduled backup failed {} ago: {}",
                age(now.saturating_sub(o.last_failure)),
                crate::error::bounded(o.last_error.as_deref().unwrap_or("unknown"), 200)
            ),
        );
    }
    let Some((newest, place)) = health.newest_anywhere() else {
        return ("active", "no backup yet".to_string());
    };
    // A skipped snapshot of an unchanged cluster confirms the newest archive is current.
    let confirmed = health
        .operations
        .get("snapshot/local")
        .map_or(0, |o| o.last_success);
    let ago = now.saturating_sub(newest.at.max(confirmed));
    if let Some(max) = max_age.filter(|&m| ago > m) {
        return (
            "blocked",
            format!(
                "newest backup is {} old, older than backup-max-age ({}); run the snapshot \
                 action or check the backup schedule",
                age(ago),
                age(max)
            ),
        );
    }
    let revision = newest
        .revision
        .map_or(String::new(), |r| format!("revision {r}, "));
    let mut msg = format!("backup {} ago ({revision}{place})", age(ago));
    if let Some(o) = health.upload_failed() {
        let _ = write!(
            msg,
            "; upload failed {} ago",
            age(now.saturating_sub(o.last_failure))
        );
    }
    ("active", msg)
}

/// Where the state lives for these settings: beside etcd's data dir (when its parent
/// exists), `.etcd-actions-health-<data-dir name>.json`.
pub fn state_file(settings: &crate::config::Settings) -> Option<PathBuf> {
    let config = crate::config::EtcdConfig::resolve(settings).ok()?;
    let parent = config.data_dir.parent()?;
    let name = config.data_dir.file_name()?.to_string_lossy().into_owned();
    parent
        .is_dir()
        .then(|| parent.join(format!(".etcd-actions-health-{name}.json")))
}

/// The metrics directory: the setting (under Juju, the `metrics-dir` option), else
/// node_exporter's default when it exists.
pub fn metrics_dir(settings: &crate::config::Settings, juju: bool) -> Option<PathBuf> {
    let configured = juju
        .then(|| crate::juju::config_value("metrics-dir"))
        .flatten()
        .filter(|d| !d.trim().is_empty())
        .map(PathBuf::from);
    match configured.or_else(|| settings.metrics_dir.clone()) {
        Some(d) => Some(d),
        None => Some(PathBuf::from(DEFAULT_METRICS_DIR)).filter(|d| d.is_dir()),
    }
}

/// The `update-status` hook: the workload status from the state the last runs left (and the
/// textfile again, so that its max age follows the config). Cheap: reads two small files.
pub fn update_status(settings: &crate::config::Settings) -> Result<String, Error> {
    let now = now_secs();
    let health = state_file(settings)
        .map(|f| Health::load(&f))
        .unwrap_or_default();
    let max = max_age(true);
    // Only once something was recorded: a unit that never ran an action writes nothing.
    if health != Health::default() {
        if let Some(dir) = metrics_dir(settings, true) {
            write_metrics(&dir, &metrics(&health, max))?;
        }
    }
    if health.restore_status_stands() {
        return Ok("update-status: a failed restore's status stands".into());
    }
    // Encryption configured with no usable recipient stays `blocked` (backups refuse to run).
    if let Err(e) =
        crate::crypt::Keys::load(&settings.keys, true).and_then(|k| k.check_writes().map(drop))
    {
        let msg = format!(
            "{}: {}",
            crate::crypt::SECRET_OPTION,
            crate::error::bounded(&e.to_string(), 400)
        );
        unit_reporter().status("blocked", &msg);
        return Ok(format!("update-status: blocked: {msg}"));
    }
    if let Some(msg) = several_stores_blocked() {
        unit_reporter().status("blocked", &msg);
        return Ok(format!("update-status: blocked: {msg}"));
    }
    let (state, msg) = workload_status(&health, max, now);
    unit_reporter().status(state, &msg);
    Ok(format!("update-status: {state}: {msg}"))
}

/// Writes the textfile atomically (a temp file renamed over it: node_exporter never reads a
/// half-written one). The directory is created when it was set explicitly.
pub fn write_metrics(dir: &Path, text: &str) -> Result<(), Error> {
    write_textfile(dir, METRICS_FILE, text)
}

/// Writes one textfile of `dir` atomically, readable by node_exporter.
pub fn write_textfile(dir: &Path, name: &str, text: &str) -> Result<(), Error> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create `{}`", dir.display()), e))?;
    }
    // The directory may belong to another user (node_exporter's): every step is by its
    // descriptor, the temp file is made readable (node_exporter runs as its own user) by
    // its descriptor before the rename, and nothing is ever changed by path.
    let held = crate::fsutil::Dir::open(dir)?;
    held.write_replacing(name, text.as_bytes(), 0o644)
}

/// `follow`'s own textfile (it runs for days; the other runs' file is written at their end).
pub const FOLLOW_METRICS_FILE: &str = "etcd_backup_follow.prom";

/// What follow says of itself: how far behind the live cluster its durable history is.
#[derive(Debug, Clone, Copy, Default)]
pub struct FollowMetrics {
    /// Seconds the last segment's first change waited until it was durable: how far the
    /// durable history trailed the live cluster at its last flush.
    pub lag_seconds: f64,
    /// The last revision made durable.
    pub durable_revision: i64,
    /// Unix time up to which the history is known complete.
    pub complete_through: f64,
    pub segments: u64,
}

pub fn follow_metrics(m: &FollowMetrics) -> String {
    format!(
        "# HELP etcd_backup_follow_lag_seconds Seconds the first change of the last segment waited to be durable (the RPO of the last flush).\n\
         # TYPE etcd_backup_follow_lag_seconds gauge\n\
         etcd_backup_follow_lag_seconds {:.3}\n\
         # HELP etcd_backup_follow_durable_revision The last revision of the change history that is durable.\n\
         # TYPE etcd_backup_follow_durable_revision gauge\n\
         etcd_backup_follow_durable_revision {}\n\
         # HELP etcd_backup_follow_complete_through_timestamp_seconds Time up to which the change history is known complete.\n\
         # TYPE etcd_backup_follow_complete_through_timestamp_seconds gauge\n\
         etcd_backup_follow_complete_through_timestamp_seconds {:.3}\n\
         # HELP etcd_backup_follow_segments_total Change segments this follow has written.\n\
         # TYPE etcd_backup_follow_segments_total counter\n\
         etcd_backup_follow_segments_total {}\n\
",
        m.lag_seconds, m.durable_revision, m.complete_through, m.segments
    )
}

/// The configured max age: `backup-max-age` under Juju (config-get), else
/// `ETCD_ACTIONS_BACKUP_MAX_AGE`.
pub fn max_age(juju: bool) -> Option<u64> {
    let text = if juju {
        crate::juju::config_value("backup-max-age").unwrap_or_else(|| "26h".into())
    } else {
        std::env::var("ETCD_ACTIONS_BACKUP_MAX_AGE").unwrap_or_default()
    };
    parse_max_age(&text).ok().flatten()
}

/// After a run: records it, rewrites the textfile, and under Juju sets the workload status.
/// Never changes the run's outcome: a problem here is logged.
pub fn after_run(
    settings: &crate::config::Settings,
    reporter: &crate::juju::Reporter,
    ran: Ran,
    results: &Results,
    outcome: &Result<(), Error>,
    started: Instant,
) {
    if ran == Ran::Other {
        return;
    }
    let Some(state) = state_file(settings) else {
        return;
    };
    let now = now_secs();
    let mut health = Health::load(&state);
    record(
        &mut health,
        ran,
        results,
        outcome,
        started.elapsed().as_secs_f64(),
        now,
    );
    if let Err(e) = health.save(&state) {
        reporter.log(&format!("could not record the run's health: {e}"));
    }
    // An action, or the backup timer's run through `juju-exec` (hook tools on PATH).
    let juju = reporter.is_juju() || juju_context();
    let max = max_age(juju);
    if let Some(dir) = metrics_dir(settings, juju) {
        if let Err(e) = write_metrics(&dir, &metrics(&health, max)) {
            reporter.log(&format!("could not write the metrics textfile: {e}"));
        }
    }
    // A restore sets the unit's status itself.
    if juju && ran != Ran::Restore && !health.restore_status_stands() {
        let (state, msg) = several_stores_blocked()
            .map(|m| ("blocked", m))
            .unwrap_or_else(|| workload_status(&health, max, now));
        unit_reporter().status(state, &msg);
    }
}

/// The unit is `blocked` by its store relations: more than one (naming them), or the one it
/// has missing or breaking a field (naming the relation and the field).
fn several_stores_blocked() -> Option<String> {
    let shown = |e: Error| crate::error::bounded(&e.to_string(), 300);
    match unit_reporter().one_store_relation() {
        Ok(None) => None,
        Ok(Some((endpoint, bag))) => crate::store::StoreConfig::from_relation(endpoint, &bag)
            .err()
            .map(|e| format!("{endpoint}: {}", shown(e))),
        Err(Error::Declined(msg)) => Some(msg),
        Err(e) => Some(shown(e)),
    }
}

/// Whether this runs on a Juju unit with its hook tools (an action, a hook, or `juju-exec`).
fn juju_context() -> bool {
    std::env::var_os("JUJU_UNIT_NAME").is_some() && which::which("status-set").is_ok()
}

/// A reporter that sets this unit's status.
fn unit_reporter() -> crate::juju::Reporter {
    let unit = std::env::var("JUJU_UNIT_NAME").unwrap_or_default();
    crate::juju::Reporter::Juju {
        app: unit.split('/').next().unwrap_or_default().to_string(),
        unit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(pairs: &[(&str, &str)]) -> Results {
        let mut r = Results::default();
        for (k, v) in pairs {
            r.set(k, v);
        }
        r
    }

    #[test]
    fn status_follows_the_facts() {
        let mut h = Health::default();
        assert_eq!(workload_status(&h, Some(3600), 1000).1, "no backup yet");
        let ok = results(&[
            ("snapshot.path", "/b/etcd-snapshot-x.tar.gz"),
            ("snapshot.bytes", "1234"),
            ("snapshot.revision", "4211"),
            ("upload.url", "s3://b/etcd/etcd-snapshot-x.tar.gz"),
        ]);
        record(&mut h, Ran::Snapshot, &ok, &Ok(()), 2.0, 1000);
        assert_eq!(
            workload_status(&h, Some(26 * 3600), 1000 + 7200),
            ("active", "backup 2h ago (revision 4211, s3)".to_string())
        );
        let (state, msg) = workload_status(&h, Some(3600), 1000 + 7200);
        assert_eq!(state, "blocked");
        assert!(msg.contains("older than backup-max-age"), "{msg}");
        // A failed upload of a manual snapshot: still active, and said.
        let local_only = results(&[
            ("snapshot.path", "/b/etcd-snapshot-y.tar.gz"),
            ("snapshot.revision", "4300"),
        ]);
        let failed = Err(Error::Store {
            store: "s3".into(),
            problem: "down".into(),
        });
        // (In the very second of the last success: the facts still say which came last.)
        record(&mut h, Ran::Snapshot, &local_only, &failed, 1.0, 1000);
        let (state, msg) = workload_status(&h, None, 1060);
        assert_eq!(state, "active");
        assert!(
            msg.contains("revision 4300, local") && msg.contains("upload failed"),
            "{msg}"
        );
        // A failed scheduled run blocks.
        record(&mut h, Ran::Backup, &local_only, &failed, 1.0, 3000);
        let (state, msg) = workload_status(&h, None, 3060);
        assert_eq!(state, "blocked");
        assert!(msg.contains("scheduled backup failed"), "{msg}");
        let text = metrics(&h, Some(3600));
        assert!(text.contains(
            "etcd_backup_last_failure_timestamp_seconds{operation=\"upload\",location=\"store\"} 3000"
        ));
        assert!(text.contains("etcd_backup_max_age_seconds 3600"));
        assert!(!text.contains("/b/"), "no paths as labels");
        // A failed restore's own status stands until the next successful snapshot.
        assert!(!h.restore_status_stands());
        let refused = Err(Error::Refused("scaled".into()));
        record(
            &mut h,
            Ran::Restore,
            &Results::default(),
            &refused,
            1.0,
            4000,
        );
        assert!(h.restore_status_stands());
        record(&mut h, Ran::Snapshot, &ok, &Ok(()), 1.0, 4100);
        assert!(!h.restore_status_stands());
    }

    #[test]
    fn ages_parse() {
        assert_eq!(parse_max_age("26h").unwrap(), Some(26 * 3600));
        assert_eq!(parse_max_age("90m").unwrap(), Some(5400));
        assert_eq!(parse_max_age("").unwrap(), None);
        assert_eq!(parse_max_age("0").unwrap(), None);
        assert!(parse_max_age("soon").is_err());
    }
}
