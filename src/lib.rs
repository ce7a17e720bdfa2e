//! etcd-actions: snapshot and restore for etcd deployed with Juju.
//!
//! `run` parses arguments (multi-call aware), builds the reporter for Juju or standalone
//! mode, runs the action, and reports its results exactly once.

pub mod actions;
pub mod archive;
pub mod bbolt;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod error;
pub mod etcd;
pub mod fsutil;
pub mod juju;
pub mod manifest;
pub mod pgzip;
pub mod points;
pub mod process;
pub mod progress;
pub mod recovery;
pub mod retention;
pub mod revision;
pub mod store;
pub mod unit;
pub mod writer;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use serde_json::{Map, Value};

use actions::restore::RestoreOptions;
use actions::snapshot::SnapshotOptions;
use actions::Unit;
use cli::{Arguments, Command};
use config::Settings;
use error::Error;
use juju::{Reporter, Results};

/// Runs the agent and returns the process exit code.
pub fn run(args: Vec<OsString>) -> u8 {
    #[cfg(feature = "failpoints")]
    let _scenario = fail::FailScenario::setup();
    // The S3 credentials leave the environment at once: no child process may inherit them.
    let credentials = store::Credentials::take_from_env();
    // An empty setting means "unset", as in a shell profile that says `ETCD_ACTIONS_ETCDUTL=`.
    for (key, value) in std::env::vars_os() {
        if value.is_empty() && key.to_string_lossy().starts_with("ETCD_ACTIONS_") {
            std::env::remove_var(key);
        }
    }
    let args = match Arguments::try_parse_from(cli::normalize_args(args)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                error::code::USAGE
            } else {
                0
            };
        }
    };
    juju::started();
    let settings = Settings::from_args(args.settings, credentials);
    if let Command::Hook { name } = &args.command {
        let outcome = if name == "config-changed" {
            actions::schedule::config_changed(&settings)
        } else {
            juju::s3_relation_hook(name)
        };
        return match outcome {
            Ok(msg) => {
                juju::juju_log(&msg);
                0
            }
            Err(e) => {
                let msg = format!("{name} failed: {e}");
                juju::juju_log(&msg);
                eprintln!("etcd-actions: {msg}");
                error::code::FAILED
            }
        };
    }
    let reporter = Reporter::from_env();
    let mut results = Results::default();
    // A panic (a bug, or a library's) still ends in a reported failure, not a bare exit 101.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(&reporter, &settings, args.command, &mut results)
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown".into());
        Err(Error::Internal(error::bounded(&what, 2048)))
    });
    let code = reporter.finish(&results, outcome);
    report_peak_rss();
    code
}

/// For the benchmark: writes this process's own peak RSS (`VmHWM`, children excluded) to
/// the file named by `ETCD_ACTIONS_PEAK_RSS_FILE`.
fn report_peak_rss() {
    let Some(path) = std::env::var_os("ETCD_ACTIONS_PEAK_RSS_FILE") else {
        return;
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
        let _ = std::fs::write(path, line);
    }
}

fn execute(
    reporter: &Reporter,
    settings: &Settings,
    command: Command,
    results: &mut Results,
) -> Result<(), Error> {
    match command {
        Command::Snapshot(a) => {
            let mut opts = SnapshotOptions {
                target: a.target,
                if_changed: a.if_changed,
            };
            if reporter.is_juju() {
                let mut params = Params::new(reporter.params()?);
                if let Some(t) = params.string("target")? {
                    opts.target = PathBuf::from(t);
                }
                if let Some(b) = params.boolean("if-changed")? {
                    opts.if_changed = b;
                }
                params.finish()?;
            }
            let unit = Unit::open(reporter, settings)?;
            actions::snapshot::run(&unit, &opts, results).map(drop)
        }
        Command::Restore(a) => {
            let mut opts = RestoreOptions {
                snapshot: a.snapshot,
                backup_id: a.backup_id,
                target: a.target,
                skip_backup: a.skip_backup,
                sha256: a.sha256,
            };
            if reporter.is_juju() {
                let mut params = Params::new(reporter.params()?);
                params.archive(&mut opts.target, &mut opts.snapshot, &mut opts.backup_id)?;
                if let Some(s) = params.string("sha256")? {
                    opts.sha256 = Some(s);
                }
                if let Some(b) = params.boolean("skip-backup")? {
                    opts.skip_backup = b;
                }
                params.finish()?;
            }
            let unit = Unit::open(reporter, settings)?;
            actions::restore::run(&unit, &opts, results)
        }
        Command::ListBackups(a) => {
            let mut target = a.target;
            if reporter.is_juju() {
                let mut params = Params::new(reporter.params()?);
                if let Some(t) = params.string("target")? {
                    target = PathBuf::from(t);
                }
                params.finish()?;
            }
            let unit = Unit::open(reporter, settings)?;
            actions::list_backups::run(&unit, &target, results)
        }
        Command::Verify(a) => {
            let mut opts = actions::verify::VerifyOptions {
                snapshot: a.snapshot,
                backup_id: a.backup_id,
                target: a.target,
                deep: a.deep,
            };
            if reporter.is_juju() {
                let mut params = Params::new(reporter.params()?);
                params.archive(&mut opts.target, &mut opts.snapshot, &mut opts.backup_id)?;
                if let Some(b) = params.boolean("deep")? {
                    opts.deep = b;
                }
                params.finish()?;
            }
            let unit = Unit::open(reporter, settings)?;
            actions::verify::run(&unit, &opts, results)
        }
        Command::Prune(a) => {
            let mut target = a.target;
            let mut counts = [
                ("last", a.keep_last),
                ("hourly", a.keep_hourly),
                ("daily", a.keep_daily),
                ("weekly", a.keep_weekly),
                ("monthly", a.keep_monthly),
                ("yearly", a.keep_yearly),
            ];
            let mut within = a.keep_within;
            let mut dry_run = a.dry_run;
            if reporter.is_juju() {
                let mut params = Params::new(reporter.params()?);
                if let Some(t) = params.string("target")? {
                    target = PathBuf::from(t);
                }
                for (name, value) in counts.iter_mut() {
                    if let Some(v) = params.integer(&format!("keep-{name}"))? {
                        *value = Some(v);
                    }
                }
                if let Some(w) = params.string("keep-within")? {
                    within = Some(w);
                }
                // The action's default is a dry run (actions.yaml); only an explicit false deletes.
                dry_run = params.boolean("dry-run")?.unwrap_or(true);
                params.finish()?;
            }
            let policy = actions::prune::policy_from(counts, within.as_deref())?;
            let unit = Unit::open(reporter, settings)?;
            actions::prune::run(
                &unit,
                &actions::prune::PruneOptions {
                    target,
                    policy,
                    dry_run,
                    protect: None,
                },
                results,
            )
        }
        Command::Backup(a) => {
            // Parsed before anything runs: a bad policy deletes nothing and takes no snapshot.
            let policy = retention::Policy::parse(&a.retention)
                .map_err(|e| Error::usage(format!("ETCD_ACTIONS_RETENTION: {e}")))?;
            let unit = Unit::open(reporter, settings)?;
            let written = actions::snapshot::run(
                &unit,
                &SnapshotOptions {
                    target: a.target.clone(),
                    if_changed: true,
                },
                results,
            )?;
            if policy.keeps_nothing() {
                results.set(
                    "prune.skipped",
                    "no retention policy (ETCD_ACTIONS_RETENTION)",
                );
                return Ok(());
            }
            actions::prune::run(
                &unit,
                &actions::prune::PruneOptions {
                    target: a.target,
                    policy,
                    dry_run: false,
                    // Whatever the clock or the names say, this run's archive stays.
                    protect: Some(written),
                },
                results,
            )
        }
        Command::Schedule(a) => {
            actions::schedule::run(settings, &a.on_calendar, &a.target, a.install, results)
        }
        Command::Hook { .. } => Ok(()),
    }
}

/// Action params from `action-get --format=json`, checked by type; unknown ones are refused.
struct Params {
    map: Map<String, Value>,
}

impl Params {
    fn new(map: Map<String, Value>) -> Params {
        Params { map }
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, Error> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Error::usage(format!(
                "param `{key}` must be a string, got `{other}`"
            ))),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>, Error> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(other) => Err(Error::usage(format!(
                "param `{key}` must be true or false, got `{other}`"
            ))),
        }
    }

    /// The params that name an archive: `target`, `snapshot` and `backup-id` (empty = unset).
    fn archive(
        &mut self,
        target: &mut PathBuf,
        snapshot: &mut Option<PathBuf>,
        backup_id: &mut Option<String>,
    ) -> Result<(), Error> {
        if let Some(t) = self.string("target")? {
            *target = PathBuf::from(t);
        }
        if let Some(s) = self.string("snapshot")? {
            *snapshot = Some(PathBuf::from(s)).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(s) = self.string("backup-id")? {
            *backup_id = Some(s).filter(|s| !s.is_empty());
        }
        Ok(())
    }

    fn integer(&mut self, key: &str) -> Result<Option<i64>, Error> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
            Some(Value::String(s)) if s.trim().parse::<i64>().is_ok() => {
                Ok(s.trim().parse::<i64>().ok())
            }
            Some(other) => Err(Error::usage(format!(
                "param `{key}` must be a whole number, got `{other}`"
            ))),
        }
    }

    fn finish(self) -> Result<(), Error> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(Error::usage(format!(
                "unknown param `{k}`; see `juju actions --schema` for the params this action takes"
            ))),
        }
    }
}
