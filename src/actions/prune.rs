//! The `prune` action: retention in restic's `forget` terms over the archives in `target` and
//! in the store. Only this cluster's archives that this tool wrote, with a readable manifest,
//! are counted and touched (with their sidecars): snapshots of this cluster id (and under Juju
//! of this model and application), and this unit's pre-restore backups. Everything else
//! (other clusters sharing the folder, foreign files) is listed as ignored and never deleted.
//! Archives are ordered by the time their manifest records; one dated in the future (taken
//! while the clock was ahead) is kept, reported, and not counted, so it cannot push out real
//! ones. The newest archive of each kind that verifies is always kept, and so is the archive
//! the calling run just wrote. Deletion removes the archive first and its sidecar last; a
//! later run tidies orphaned sidecars.

use super::Unit;
use crate::catalog::{self, Entry};
use crate::error::Error;
use crate::fsutil::Dir;
use crate::juju::Results;
use crate::params::{Params, TakesParams};
use crate::retention::{parse_time, Policy};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub target: std::path::PathBuf,
    pub policy: Policy,
    pub dry_run: bool,
    /// The archive the calling run wrote (or reported): never removed.
    pub protect: Option<String>,
}

/// A prune as asked: flags, or Juju params over them, before the policy is checked.
#[derive(Debug, Clone)]
pub struct PruneRequest {
    pub target: std::path::PathBuf,
    pub counts: [(&'static str, Option<i64>); 6],
    pub within: Option<String>,
    pub dry_run: bool,
}

impl From<crate::cli::PruneArgs> for PruneRequest {
    fn from(a: crate::cli::PruneArgs) -> PruneRequest {
        PruneRequest {
            target: a.target,
            counts: [
                ("last", a.keep_last),
                ("hourly", a.keep_hourly),
                ("daily", a.keep_daily),
                ("weekly", a.keep_weekly),
                ("monthly", a.keep_monthly),
                ("yearly", a.keep_yearly),
            ],
            within: a.keep_within,
            dry_run: a.dry_run,
        }
    }
}

impl TakesParams for PruneRequest {
    fn take(&mut self, params: &mut Params) -> Result<(), Error> {
        if let Some(t) = params.string("target")? {
            self.target = std::path::PathBuf::from(t);
        }
        for (name, value) in self.counts.iter_mut() {
            if let Some(v) = params.integer(&format!("keep-{name}"))? {
                *value = Some(v);
            }
        }
        if let Some(w) = params.string("keep-within")? {
            self.within = Some(w);
        }
        // The action's default is a dry run (actions.yaml); only an explicit false deletes.
        self.dry_run = params.boolean("dry-run")?.unwrap_or(true);
        Ok(())
    }
}

impl PruneRequest {
    /// The options to run with: the policy checked, nothing deleted when it does not parse.
    pub fn options(self) -> Result<PruneOptions, Error> {
        Ok(PruneOptions {
            policy: policy_from(self.counts, self.within.as_deref())?,
            target: self.target,
            dry_run: self.dry_run,
            protect: None,
        })
    }
}

/// How far ahead of this machine's clock an archive's time may be before it counts as dated
/// in the future (clock skew between units).
const FUTURE_SLACK: i64 = 300;

/// Whether an archive is dated more than `FUTURE_SLACK` after `now` (unix seconds).
pub fn in_future(e: &Entry, now: i64) -> bool {
    parse_time(&e.time).is_some_and(|t| t > now + FUTURE_SLACK)
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
    // Whose archives these are: this cluster's, as etcd says now.
    let status = crate::etcd::Client::new(&unit.config)
        .status()
        .map_err(|e| {
            Error::Declined(format!(
                "prune counts only this cluster's archives and cannot tell which those are: \
                 {e}; nothing was deleted. Start etcd and run it again"
            ))
        })?;
    let owner = crate::catalog::Owner::of(unit, status.cluster_id);
    let _lock = unit.lock("prune")?;
    // A restore that crashed is finished or rolled back first, as every action does.
    crate::recovery::recover(unit)?;
    let dir = Dir::open(&opts.target).ok();
    let (entries, mut ignored) = catalog::list_all(unit, &opts.target, store.as_ref())?;
    let now = crate::manifest::now_secs() as i64;
    let mut future = Vec::new();
    let mut decided: Vec<(Entry, Vec<&'static str>)> = Vec::new();
    for kind in ["etcd-snapshot-", "etcd-backup-"] {
        let mut group: Vec<Entry> = Vec::new();
        for e in &entries {
            if !e.id.starts_with(kind) {
                continue;
            }
            let owned = if kind == "etcd-snapshot-" {
                owner.owns_snapshot(e)
            } else {
                owner.owns_backup(e)
            };
            if e.incomplete {
                continue;
            }
            if !owned || parse_time(&e.time).is_none() {
                ignored.push(e.shown());
            } else if in_future(e, now) {
                future.push(e.clone());
            } else {
                group.push(e.clone());
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
        for (e, why) in group.iter().zip(why.iter_mut()) {
            if why.is_empty() && opts.protect.as_deref() == Some(e.id.as_str()) {
                why.push("written by this run");
            }
        }
        decided.extend(group.into_iter().zip(why));
    }
    for (i, e) in future.iter().enumerate() {
        let msg = format!(
            "{} is dated {}, in the future by this machine's clock: kept and not counted; check \
             the clocks, and remove it by hand once it is not needed",
            e.shown(),
            e.time
        );
        unit.log(&msg);
        results.set(&format!("future.{i}"), msg);
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
    prune_history(
        unit,
        opts,
        store.as_ref(),
        &owner.cluster_id,
        &decided,
        results,
    )?;
    let leftovers = remove_leftovers(unit, store.as_ref(), &entries, now, opts.dry_run)?;
    for (i, what) in leftovers.iter().enumerate() {
        results.set(
            &format!("incomplete.{i}"),
            format!(
                "{what}: an upload that never finished (no record), older than {} h: {}",
                LEFTOVER_AGE_SECS / 3600,
                if opts.dry_run {
                    "would be removed"
                } else {
                    "removed"
                }
            ),
        );
    }
    for e in entries
        .iter()
        .filter(|e| e.incomplete && !leftovers.contains(&e.shown()))
    {
        ignored.push(format!(
            "{} (incomplete upload, younger than {} h: kept for now)",
            e.shown(),
            LEFTOVER_AGE_SECS / 3600
        ));
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

/// Removes the change segments no kept full snapshot's window needs. A snapshot's window runs
/// from its revision to the next full snapshot's (kept or not; the newest one's has no end):
/// a restore to a point in it replays from that snapshot. Segments outside every kept
/// window go, as the snapshots they belonged to went. With no kept snapshot of the cluster,
/// every segment stays.
fn prune_history(
    unit: &Unit<'_>,
    opts: &PruneOptions,
    store: Option<&Store>,
    cluster: &str,
    decided: &[(Entry, Vec<&'static str>)],
    results: &mut Results,
) -> Result<(), Error> {
    let snapshots: Vec<(i64, bool)> = decided
        .iter()
        .filter(|(e, _)| e.id.starts_with("etcd-snapshot-"))
        .filter_map(|(e, why)| e.revision.map(|r| (r.max(1), !why.is_empty())))
        .collect();
    let windows = windows(snapshots);
    let Some(oldest) = windows.first().map(|w| w.0) else {
        return Ok(());
    };
    let folder = store.map(|s| unit.store_folder(s));
    let histories = crate::history::list(
        &opts.target,
        store.zip(folder.as_deref()),
        &crate::history::unit_tag(&unit.name()),
    )?;
    let (mut removed, mut kept) = (0u64, 0u64);
    let mut local_dir = None;
    for f in histories
        .iter()
        .filter(|h| h.cluster_id == cluster)
        .flat_map(|h| &h.segments)
    {
        let needed = windows
            .iter()
            .any(|(from, to)| f.named.last > *from && f.named.first <= *to);
        if needed {
            kept += 1;
            continue;
        }
        removed += 1;
        if opts.dry_run {
            continue;
        }
        if let (Some(s), Some(key)) = (store, &f.key) {
            s.delete(key)?;
        }
        if let Some(p) = &f.path {
            crate::fsutil::remove_any(p)?;
            local_dir = p.parent().map(std::path::Path::to_path_buf);
        }
    }
    if removed > 0 && !opts.dry_run {
        if let Some(d) = &local_dir {
            let _ = crate::fsutil::sync_dir(d);
        }
        unit.log(&format!(
            "removed {removed} change segments outside the windows of the kept full \
             snapshots (the oldest at revision {oldest})"
        ));
    }
    results.set("history.removed", removed);
    results.set("history.kept", kept);
    results.set("history.from-revision", oldest + 1);
    Ok(())
}

/// The windows `(from, to]` of the kept snapshots among `(revision, kept)`: from a kept
/// snapshot's revision to the next snapshot's, kept or not (`i64::MAX` for the newest).
fn windows(mut snapshots: Vec<(i64, bool)>) -> Vec<(i64, i64)> {
    snapshots.sort_unstable();
    snapshots
        .iter()
        .enumerate()
        .filter(|(_, (_, kept))| *kept)
        .map(|(i, (r, _))| {
            let end = snapshots[i + 1..]
                .iter()
                .map(|(n, _)| *n)
                .find(|n| n > r)
                .unwrap_or(i64::MAX);
            (*r, end)
        })
        .collect()
}

/// Removes an archive everywhere it is. In the store its record goes first (the archive is
/// then incomplete, never listed as a backup), then the object; locally the file, then its
/// sidecars.
fn remove(
    unit: &Unit<'_>,
    dir: Option<&Dir>,
    store: Option<&Store>,
    e: &Entry,
) -> Result<(), Error> {
    if let (Some(store), Some(_)) = (store, &e.url) {
        let key = format!("{}/{}", unit.store_folder(store), e.id);
        store.delete(&crate::store::record_key(&key))?;
        crate::actions::crash_point("prune-between-record-and-object");
        store.delete(&key)?;
    }
    if let (Some(dir), Some(_)) = (dir, &e.path) {
        dir.unlink(&e.id)?;
        crate::actions::crash_point("prune-between-archive-and-sidecar");
        dir.unlink(&format!("{}.sha256", e.id))?;
        dir.unlink(&format!("{}{}", e.id, crate::manifest::RECORD_SUFFIX))?;
        dir.sync()?;
    }
    unit.log(&format!("removed {}", e.id));
    Ok(())
}

/// How old an archive object without its record must be before prune removes it: an upload
/// completes its object and writes the record a moment later, so a younger one may be an
/// upload of another unit finishing now.
pub const LEFTOVER_AGE_SECS: i64 = 24 * 3600;

/// Removes the store's leftovers: archive objects without their record (an upload killed
/// between completing the object and writing the record, or a prune killed between the two
/// deletions) older than `LEFTOVER_AGE_SECS`. Returns what it removed (or would).
fn remove_leftovers(
    unit: &Unit<'_>,
    store: Option<&Store>,
    entries: &[Entry],
    now: i64,
    dry_run: bool,
) -> Result<Vec<String>, Error> {
    let Some(store) = store else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for e in entries.iter().filter(|e| e.incomplete && e.url.is_some()) {
        let old = parse_time(&e.time).is_some_and(|t| now - t > LEFTOVER_AGE_SECS);
        if !old {
            continue;
        }
        if !dry_run {
            store.delete(&format!("{}/{}", unit.store_folder(store), e.id))?;
            unit.log(&format!("removed the incomplete upload {}", e.shown()));
        }
        removed.push(e.shown());
    }
    Ok(removed)
}

/// Removes sidecars whose archive is gone (a prune killed between the deletions).
fn tidy_orphans(dir: &Dir) {
    for name in dir.names() {
        let archive = name
            .strip_suffix(".sha256")
            .or_else(|| name.strip_suffix(crate::manifest::RECORD_SUFFIX));
        if let Some(archive) = archive {
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

#[cfg(test)]
mod window_tests {
    use super::windows;

    #[test]
    fn history_windows_end_at_the_next_snapshot() {
        // Snapshots at 10 (kept), 20 (removed), 30 (kept), 40 (kept, newest).
        let w = windows(vec![(30, true), (10, true), (20, false), (40, true)]);
        assert_eq!(w, vec![(10, 20), (30, 40), (40, i64::MAX)]);
        assert!(windows(vec![(5, false)]).is_empty());
    }
}
