//! The `prune` action: retention in restic's `forget` terms over the archives in `target` and
//! in the store. Only archives this tool wrote, with a readable manifest, are touched (with
//! their sidecars); everything else is listed as ignored. Snapshots and pre-restore backups are
//! counted separately. The newest archive of each kind that verifies is always kept. Deletion
//! removes the archive first and its sidecar last; a later run tidies orphaned sidecars.

use super::Unit;
use crate::catalog::{self, Entry};
use crate::error::Error;
use crate::fsutil::Dir;
use crate::juju::Results;
use crate::retention::{parse_time, Policy};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub target: std::path::PathBuf,
    pub policy: Policy,
    pub dry_run: bool,
}

/// Whether an archive verifies cheaply: a local file whose sha256 matches its sidecar, or a
/// store object with a recorded sha256 and format version.
fn verifies(e: &Entry, dir: Option<&Dir>) -> bool {
    if let (Some(dir), Some(_)) = (dir, &e.path) {
        let Some(want) = &e.sha256 else {
            return false;
        };
        let Ok(mut f) = dir.open_file(&e.id) else {
            return false;
        };
        let mut h = crate::archive::HashingReader::new(&mut f);
        if std::io::copy(&mut h, &mut std::io::sink()).is_err() {
            return false;
        }
        return hex::encode(h.finish().0) == *want;
    }
    e.url.is_some() && e.sha256.is_some() && e.ours
}

pub fn run(unit: &Unit<'_>, opts: &PruneOptions, results: &mut Results) -> Result<(), Error> {
    if opts.policy.keeps_nothing() {
        return Err(Error::usage(
            "no keep rule: give at least one of keep-last, keep-hourly, keep-daily, keep-weekly, \
             keep-monthly, keep-yearly (a count above 0) or keep-within; nothing was deleted",
        ));
    }
    if !opts.target.is_absolute() {
        return Err(Error::Target {
            path: opts.target.clone(),
            problem: "is relative; give the absolute directory the archives are in".into(),
        });
    }
    let store = unit.store()?;
    let _lock = unit.lock("prune")?;
    let dir = Dir::open(&opts.target).ok();
    let (entries, mut ignored) = catalog::list_all(unit, &opts.target, store.as_ref())?;
    let mut decided: Vec<(Entry, Vec<&'static str>)> = Vec::new();
    for kind in ["etcd-snapshot-", "etcd-backup-"] {
        let mut group: Vec<Entry> = Vec::new();
        for e in &entries {
            if !e.id.starts_with(kind) {
                continue;
            }
            match (e.ours, parse_time(&e.time)) {
                (true, Some(_)) => group.push(e.clone()),
                _ => ignored.push(e.path.as_ref().map_or_else(
                    || e.url.clone().unwrap_or_else(|| e.id.clone()),
                    |p| p.display().to_string(),
                )),
            }
        }
        group.sort_by(catalog::newest_first);
        let times: Vec<i64> = group
            .iter()
            .map(|e| parse_time(&e.time).unwrap_or(0))
            .collect();
        let mut why = opts.policy.apply(&times);
        // The newest archive that verifies is always kept.
        if let Some(i) = group.iter().position(|e| verifies(e, dir.as_ref())) {
            if why[i].is_empty() {
                why[i].push("newest that verifies");
            }
        }
        decided.extend(group.into_iter().zip(why));
    }
    let mut removed = 0;
    for (i, (e, why)) in decided.iter().enumerate() {
        let key = |k: &str| format!("archives.{i}.{k}");
        results.set(&key("id"), &e.id);
        results.set(&key("time"), &e.time);
        results.set(&key("where"), e.place());
        if !why.is_empty() {
            results.set(&key("kept-by"), why.join(", "));
            continue;
        }
        removed += 1;
        if opts.dry_run {
            results.set(&key("kept-by"), "removed (dry run: not yet)");
            continue;
        }
        remove(unit, dir.as_ref(), store.as_ref(), e)?;
        results.set(&key("kept-by"), "removed");
    }
    if let Some(dir) = &dir {
        if !opts.dry_run {
            tidy_orphans(dir);
        }
    }
    for (i, what) in ignored.iter().enumerate() {
        results.set(&format!("ignored.{i}"), what);
    }
    results.set("prune.removed", removed);
    results.set("prune.kept", decided.len() - removed);
    results.set("prune.ignored", ignored.len());
    results.set("prune.dry-run", opts.dry_run);
    Ok(())
}

/// Removes an archive everywhere it is: the object, the local file, then its sidecar.
fn remove(
    unit: &Unit<'_>,
    dir: Option<&Dir>,
    store: Option<&Store>,
    e: &Entry,
) -> Result<(), Error> {
    if let (Some(store), Some(_)) = (store, &e.url) {
        store.delete(&format!("{}/{}", unit.store_folder(store), e.id))?;
    }
    if let (Some(dir), Some(_)) = (dir, &e.path) {
        dir.unlink(&e.id)?;
        crate::actions::crash_point("prune-between-archive-and-sidecar");
        dir.unlink(&format!("{}.sha256", e.id))?;
        dir.sync()?;
    }
    unit.log(&format!("removed {}", e.id));
    Ok(())
}

/// Removes sidecars whose archive is gone (a prune killed between the two deletions).
fn tidy_orphans(dir: &Dir) {
    for name in dir.names() {
        if let Some(archive) = name.strip_suffix(".sha256") {
            if catalog::is_archive_name(archive) && matches!(dir.entry_stat(archive), Ok(None)) {
                let _ = dir.unlink(&name);
            }
        }
    }
}

/// Reads a policy from params or flags: counts and a duration; `None` counts are unset.
pub fn policy_from(
    counts: [(&str, Option<i64>); 6],
    within: Option<&str>,
) -> Result<Policy, Error> {
    let mut text = Vec::new();
    for (name, v) in counts {
        if let Some(v) = v {
            if v < 0 {
                return Err(Error::usage(format!(
                    "keep-{name} is {v}; counts are 0 or more"
                )));
            }
            text.push(format!("{name}={v}"));
        }
    }
    if let Some(w) = within.filter(|w| !w.trim().is_empty()) {
        text.push(format!("within={w}"));
    }
    Policy::parse(&text.join(",")).map_err(Error::usage)
}
