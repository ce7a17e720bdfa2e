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
pub mod crypt;
pub mod datadir;
pub mod error;
pub mod etcd;
pub mod exportfile;
pub mod fsutil;
pub mod health;
pub mod history;
pub mod juju;
pub mod keyset;
pub mod manifest;
pub mod params;
pub mod pgzip;
pub mod pipe;
pub mod points;
pub mod process;
pub mod progress;
pub mod recovery;
pub mod replay;
pub mod retention;
pub mod revision;
pub mod sources;
pub mod store;
pub mod unit;
pub mod writer;

use std::ffi::OsString;

use clap::Parser;

use actions::list_backups::ListOptions;
use actions::prune::PruneRequest;
use actions::restore::RestoreOptions;
use actions::snapshot::SnapshotOptions;
use actions::verify::VerifyOptions;
use actions::Unit;
use cli::{Arguments, Command};
use config::Settings;
use error::Error;
use juju::{Reporter, Results};
use params::merged;

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
    let settings = match Settings::from_args(args.settings, args.command.given(), credentials) {
        Ok(s) => s,
        Err(e) => {
            let _ = e.print();
            return error::code::USAGE;
        }
    };
    if let Command::Hook { name } = &args.command {
        if name == juju::GCS_KEY_HOOK {
            // Run by the follow service through `juju-exec`: the key goes to its stdout, a pipe,
            // never to disk.
            return match juju::print_gcs_key() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("etcd-actions: {e}");
                    error::code::FAILED
                }
            };
        }
        // The follow service runs outside any hook: what it was given (the secret's
        // recipients, the relation's store) is refreshed when they may have changed.
        let refreshed = |msg: String| match actions::schedule::refresh_follow(&settings) {
            Ok(note) => format!("{msg}; {note}"),
            Err(e) => format!("{msg}; the follow service was not updated: {e}"),
        };
        let outcome = if name == "config-changed" {
            actions::schedule::config_changed(&settings)
        } else if name == "update-status" {
            health::update_status(&settings).map(refreshed)
        } else if name == "secret-changed" {
            // config-changed's checks: a secret without a usable recipient blocks the unit.
            actions::schedule::config_changed(&settings).map(|m| format!("secret-changed: {m}"))
        } else if juju::STORE_ENDPOINTS.iter().any(|e| {
            name.strip_prefix(e)
                .is_some_and(|rest| rest == "-relation-joined" || rest == "-relation-changed")
        }) {
            juju::s3_relation_hook(name).map(refreshed)
        } else if juju::STORE_ENDPOINTS
            .iter()
            .any(|e| name.starts_with(&format!("{e}-relation-")))
        {
            // A store relation departing or broken: the follow service loses it too.
            Ok(refreshed(format!("{name}: the store relation changed")))
        } else {
            Ok(format!("{name}: nothing to do"))
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
    let ran = health::Ran::of(&args.command);
    let started = std::time::Instant::now();
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
    health::after_run(&settings, &reporter, ran, &results, &outcome, started);
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
    let unit = || Unit::open(reporter, settings);
    match command {
        Command::Snapshot(a) => {
            let opts = merged(reporter, SnapshotOptions::from(a))?;
            actions::snapshot::run(&unit()?, &opts, results).map(drop)
        }
        Command::Restore(a) => {
            let opts = merged(reporter, RestoreOptions::from(a))?;
            actions::restore::run(&unit()?, &opts, results)
        }
        Command::ListBackups(a) => {
            let opts = merged(reporter, ListOptions::from(a))?;
            actions::list_backups::run(&unit()?, &opts.target, results)
        }
        Command::Verify(a) => {
            let opts = merged(reporter, VerifyOptions::from(a))?;
            actions::verify::run(&unit()?, &opts, results)
        }
        Command::Prune(a) => {
            let request = merged(reporter, PruneRequest::from(a))?;
            let opts = request.options()?;
            actions::prune::run(&unit()?, &opts, results)
        }
        Command::Backup(a) => actions::backup::run(reporter, settings, a, results),
        Command::Schedule(a) => {
            actions::schedule::run(settings, &a.on_calendar, &a.target, a.install, results)
        }
        Command::Status(a) => {
            let opts = merged(
                reporter,
                ListOptions::from(cli::ListArgs {
                    target: a.target,
                    store: cli::StoreArgs::default(),
                }),
            )?;
            actions::status::run(reporter, settings, &opts.target, results)
        }
        Command::Follow(a) => {
            let opts = actions::follow::FollowOptions::try_from(a)?;
            actions::follow::run(&unit()?, &opts)
        }
        Command::Export(a) => {
            let opts = merged(reporter, actions::export::ExportOptions::from(a))?;
            actions::export::run(&unit()?, &opts, results)
        }
        Command::Import(a) => {
            let opts = merged(reporter, actions::import::ImportOptions::from(a))?;
            actions::import::run(&unit()?, &opts, results)
        }
        Command::Hook { .. } => Ok(()),
    }
}
