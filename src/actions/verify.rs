//! The `verify` action: checks an archive the way restore would before touching data, and
//! with `deep`, runs a restore drill: the db restored offline into a temp dir, served by a
//! throwaway etcd on free loopback ports, its revision and key count compared with the
//! manifest. The live etcd, its data dir and its service are never touched.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::Unit;
use crate::catalog::{self, Checked, Wanted};
use crate::config::ClientTls;
use crate::datadir::WAL_SEGMENT;
use crate::error::{human_size, Error, IoContext};
use crate::etcd::random_token;
use crate::etcd::{Client, OfflineTool, RestoreRequest, Throwaway};
use crate::fsutil::{free_bytes, TempPath};
use crate::juju::Results;
use crate::params::{Params, TakesParams};
use crate::process::{end_recorded, Guarded};

/// Where a drill's throwaway etcd is recorded while it runs.
fn drill_record(unit: &Unit<'_>) -> PathBuf {
    unit.state.join(crate::recovery::DRILL_RECORD)
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub snapshot: Option<PathBuf>,
    pub backup_id: Option<String>,
    pub target: PathBuf,
    pub deep: bool,
}

impl From<crate::cli::VerifyArgs> for VerifyOptions {
    fn from(a: crate::cli::VerifyArgs) -> VerifyOptions {
        VerifyOptions {
            snapshot: a.snapshot,
            backup_id: a.backup_id,
            target: a.target,
            deep: a.deep,
        }
    }
}

impl TakesParams for VerifyOptions {
    fn take(&mut self, params: &mut Params) -> Result<(), Error> {
        params.archive(&mut self.target, &mut self.snapshot, &mut self.backup_id)?;
        if let Some(b) = params.boolean("deep")? {
            self.deep = b;
        }
        Ok(())
    }
}

pub fn run(unit: &Unit<'_>, opts: &VerifyOptions, results: &mut Results) -> Result<(), Error> {
    let started = Instant::now();
    let offline = OfflineTool::detect(unit.settings)?;
    let etcd_bin = if opts.deep {
        Some(offline.server_binary().map_err(|e| {
            match e {
                Error::ToolMissing { tool, .. } => Error::ToolMissing {
                    tool,
                    hint:
                        "a deep verify starts a throwaway etcd; set ETCD_ACTIONS_ETCD to the etcd \
                       binary"
                            .into(),
                },
                other => other,
            }
        })?)
    } else {
        None
    };
    // The newest archive in target or the store when none is named.
    let newest;
    let backup_id = match (&opts.snapshot, &opts.backup_id) {
        (None, None) => {
            let store = unit.store()?;
            let entries = catalog::list(unit, &opts.target, store.as_ref())?;
            // Never an upload that did not finish (no record), nor a file that is not ours.
            let Some(first) = entries
                .into_iter()
                .find(|e| !e.incomplete && catalog::is_archive_name(&e.id))
            else {
                return Err(Error::NoSnapshot {
                    detail: format!(
                        "there is no archive in `{}`{}",
                        opts.target.display(),
                        if store.is_some() {
                            " nor in the store"
                        } else {
                            ""
                        }
                    ),
                    app: unit.reporter.app().to_string(),
                });
            };
            newest = first.id;
            Some(newest.as_str())
        }
        (_, id) => id.as_deref(),
    };
    let _lock = unit.lock("verify")?;
    // A restore that crashed is finished or rolled back first, as every action does.
    crate::recovery::recover(unit)?;
    // A drill of a run that was killed outright may still run: end it first.
    end_recorded(&drill_record(unit));
    let dest = TempPath::new(unit.state.join(format!("verify-{}.db", std::process::id())));
    let checked = catalog::check(
        unit,
        &Wanted {
            snapshot: opts.snapshot.as_deref(),
            backup_id,
            target: &opts.target,
        },
        None,
        &offline,
        dest.path(),
    )?;
    unit.log(&format!("{} verified: {}", checked.id, checked.integrity));
    results.set("verify.id", &checked.id);
    results.set("verify.origin", checked.origin);
    results.set("verify.sha256", &checked.unpacked.sha256);
    results.set("verify.integrity", &checked.integrity);
    results.set("verify.revision", checked.revision);
    let manifest_keys = checked.unpacked.manifest.as_ref().and_then(|m| m.keys);
    let drill = match &etcd_bin {
        None => {
            results.set(
                "verify.keys",
                manifest_keys.map_or("unknown".into(), |k| k.to_string()),
            );
            "not run".to_string()
        }
        Some(bin) => match drill(unit, &offline, bin, dest.path(), &checked) {
            Ok(keys) => {
                results.set("verify.keys", keys);
                "passed".to_string()
            }
            Err(e) => {
                let msg = format!("failed: {e}");
                results.set("verify.drill", &msg);
                results.set(
                    "verify.seconds",
                    format!("{:.1}", started.elapsed().as_secs_f64()),
                );
                return Err(Error::BadArchive {
                    path: PathBuf::from(&checked.id),
                    problem: format!("the restore drill failed: {e}"),
                });
            }
        },
    };
    results.set("verify.drill", &drill);
    history(unit, opts, &offline, results)?;
    results.set(
        "verify.seconds",
        format!("{:.1}", started.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// Checks the change history in the target (and the store): every segment read, its links
/// checked. With `deep`, the newest history is replayed to its end onto its full snapshot in
/// a throwaway etcd, as a restore to that point would.
fn history(
    unit: &Unit<'_>,
    opts: &VerifyOptions,
    offline: &OfflineTool,
    results: &mut Results,
) -> Result<(), Error> {
    let store = unit.store()?;
    let folder = store.as_ref().map(|s| unit.store_folder(s));
    let histories = crate::history::list(
        &opts.target,
        store.as_ref().zip(folder.as_deref()),
        &crate::history::unit_tag(&unit.name()),
    )?;
    for (i, h) in histories.iter().enumerate() {
        let key = |k: &str| format!("verify.history.{i}.{k}");
        let report = crate::history::check_chain(h, store.as_ref(), unit.keys()?)?;
        let (spans, gaps) = h.spans();
        results.set(&key("cluster-id"), &h.cluster_id);
        results.set(&key("segments"), report.segments);
        results.set(
            &key("revisions"),
            spans
                .iter()
                .map(|s| format!("{}–{}", s.from, s.to))
                .collect::<Vec<_>>()
                .join("; "),
        );
        results.set(&key("gaps"), gaps.len());
        results.set(
            &key("chain"),
            if report.sealed > 0 {
                format!(
                    "{} segments read; {} encrypted ones not opened (no identity): their links are unchecked",
                    report.segments - report.sealed,
                    report.sealed
                )
            } else {
                format!(
                    "continuous: {} segments, {} revisions, {} changes",
                    report.segments, report.revisions, report.events
                )
            },
        );
    }
    if !opts.deep {
        return Ok(());
    }
    let Some(end) = histories
        .iter()
        .filter_map(|h| h.spans().0.last().map(|s| (s.to_ms, s.to)))
        .max()
        .map(|(_, to)| to)
    else {
        return Ok(());
    };
    let point = match crate::replay::resolve(
        unit,
        &opts.target,
        store.as_ref(),
        &crate::replay::Wanted::Revision(end),
        None,
    ) {
        Ok(p) => p,
        Err(Error::History(why)) => {
            results.set("verify.history-drill", format!("not run: {why}"));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let db = TempPath::new(
        unit.state
            .join(format!("verify-history-{}.db", std::process::id())),
    );
    catalog::check(
        unit,
        &Wanted {
            snapshot: None,
            backup_id: Some(&point.base.id),
            target: &opts.target,
        },
        None,
        offline,
        db.path(),
    )?;
    let dir = TempPath::new(
        unit.state
            .join(format!("history-drill-{}", std::process::id())),
    );
    std::fs::create_dir(dir.path()).ctx(|| "cannot create the drill's dir".to_string())?;
    let data = dir.path().join("data");
    offline.restore(&RestoreRequest {
        db: db.path(),
        data_dir: &data,
        name: &unit.config.name,
        peer_urls: &unit.config.peer_urls,
        token: &random_token(),
        bump: 0,
    })?;
    let r = crate::replay::replay(unit, offline, &data, &point, store.as_ref()).map_err(|e| {
        Error::BadArchive {
            path: PathBuf::from(&point.base.id),
            problem: format!("the replay drill of the change history failed: {e}"),
        }
    })?;
    results.set(
        "verify.history-drill",
        format!(
            "passed: {} revisions ({} changes) replayed onto {} (revision {}) up to revision {} in {:.1}s, {} keys",
            r.revisions, r.events, point.base.id, point.base_revision, end, r.seconds, r.keys
        ),
    );
    Ok(())
}

/// The restore drill; returns the key count the throwaway etcd serves.
fn drill(
    unit: &Unit<'_>,
    offline: &OfflineTool,
    etcd: &Path,
    db: &Path,
    checked: &Checked,
) -> Result<u64, String> {
    let size = checked.unpacked.db.size;
    let reserve = crate::datadir::data_reserve(unit).map_err(|e| e.to_string())?;
    let free = free_bytes(&unit.state).map_err(|e| e.to_string())?;
    let need = size + 2 * WAL_SEGMENT + reserve;
    if free < need {
        return Err(format!(
            "not enough space for the drill on the data filesystem: it needs {} (keeping {} for \
             the live etcd), {} is free",
            human_size(need),
            human_size(reserve),
            human_size(free)
        ));
    }
    let dir = TempPath::new(unit.state.join(format!("drill-{}", std::process::id())));
    std::fs::create_dir(dir.path()).map_err(|e| e.to_string())?;
    let name = format!("drill-{}", std::process::id());
    let data = dir.path().join("data");
    let throwaway = Throwaway::new(&name, &data).map_err(|e| e.to_string())?;
    let Throwaway {
        client_url,
        data_arg,
        args,
        ..
    } = &throwaway;
    unit.log(&format!(
        "drill: {} snapshot restore into a temp dir",
        offline.name
    ));
    offline
        .restore(&RestoreRequest {
            db,
            data_dir: &data,
            name: &name,
            peer_urls: std::slice::from_ref(&throwaway.peer_url),
            token: &random_token(),
            bump: 0,
        })
        .map_err(|e| format!("{} cannot restore the db: {e}", offline.name))?;
    let log = std::fs::File::create(dir.path().join("etcd.log")).map_err(|e| e.to_string())?;
    // Dies with this run, however it ends; a SIGTERM (Juju's cancel) also removes the drill's
    // files, which hold deleted space open on the live etcd's filesystem.
    let drill_dir = dir.path().to_path_buf();
    let child = Guarded::spawn(
        etcd,
        args,
        &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
        &log,
        &drill_record(unit),
        data_arg,
        move || {
            let _ = std::fs::remove_dir_all(&drill_dir);
        },
    )
    .map_err(|e| e.to_string())?;
    unit.log(&format!(
        "drill: throwaway etcd (pid {}) on {client_url}",
        child.id()
    ));
    super::pause_point("drill-started");
    let ctl = Client::with_tls(client_url, ClientTls::default());
    let status = ctl
        .wait_serving(unit.settings.start_timeout)
        .map_err(|e| format!("the throwaway etcd did not become healthy: {e}"))?;
    let members = ctl.members().map_err(|e| e.to_string())?;
    if members.len() != 1 {
        return Err(format!(
            "the drill cluster has {} members instead of 1",
            members.len()
        ));
    }
    if status.revision != checked.revision {
        return Err(format!(
            "the restored revision is {} but the snapshot's is {}",
            status.revision, checked.revision
        ));
    }
    let keys = ctl.key_count(status.revision).map_err(|e| e.to_string())?;
    if let Some(want) = checked.unpacked.manifest.as_ref().and_then(|m| m.keys) {
        if keys != want {
            return Err(format!(
                "the restored db holds {keys} keys but the manifest says {want}"
            ));
        }
    }
    drop(child);
    Ok(keys)
}
