//! The `restore` action: a snapshot archive becomes a new single-member cluster on this unit.
//!
//! Order: find the source, refuse scaled clusters, verify the archive completely (into a
//! staging area beside the data), back up the current data, build the restored member dir,
//! and only then stop etcd and swap. Invariant: `<data-dir>/member` always holds a complete
//! dataset, the old one or the new one: the swap is one `renameat2(RENAME_EXCHANGE)`.
//! A journal in the state dir lets the next run finish or roll back a restore that crashed.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{crash_point, write_archive, Archive, DbSource, Unit};
use crate::archive::{unpack, Layout, Limits, Unpacked};
use crate::error::{Error, IoContext};
use crate::etcd::{hex_id, Etcdctl, OfflineTool, RestoreRequest, Status, Version};
use crate::fsutil::{
    exchange, free_bytes, remove_any, rename_noreplace, sync_dir, sync_tree, write_atomic, TempPath,
};
use crate::juju::Results;
use crate::process::run_shell;

/// Every crash point on the restore path, in order (the tests crash at each one).
pub const CRASH_POINTS: &[&str] = &[
    "restore-after-unpack",
    "restore-after-build",
    "restore-after-journal",
    "restore-after-stop",
    "restore-after-swap",
    "restore-after-start",
    "restore-after-commit",
];

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub snapshot: Option<PathBuf>,
    pub target: PathBuf,
    pub skip_backup: bool,
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Phase {
    /// Staged; live data untouched.
    Prepared,
    /// The service is (being) stopped.
    Stopped,
    /// New data swapped in, not yet verified.
    Swapped,
    /// New data verified: finish forward.
    Committed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Journal {
    pid: u32,
    started: String,
    phase: Phase,
    /// Inode of the restored member dir.
    new_inode: u64,
    /// Inode of the member dir it replaces, if there was one.
    old_inode: Option<u64>,
}

fn inode(path: &Path) -> Option<u64> {
    fs::symlink_metadata(path).ok().map(|m| m.ino())
}

struct Paths {
    member: PathBuf,
    staging: PathBuf,
    staged_member: PathBuf,
    incoming_db: PathBuf,
    journal: PathBuf,
}

fn paths(unit: &Unit<'_>) -> Paths {
    let staging = unit.state.join("staging");
    Paths {
        member: unit.config.member_dir(),
        staged_member: staging.join("member"),
        staging,
        incoming_db: unit.state.join("incoming.db"),
        journal: unit.state.join("restore-journal.yaml"),
    }
}

fn write_journal(p: &Paths, j: &Journal) -> Result<(), Error> {
    write_atomic(
        &p.journal,
        serde_yaml::to_string(j)
            .expect("journal serializes")
            .as_bytes(),
    )
}

fn stop_service(unit: &Unit<'_>) -> Result<(), Error> {
    unit.log("stopping etcd");
    run_shell(&unit.settings.stop_command, &unit.state).map(drop)
}

fn start_service(unit: &Unit<'_>) -> Result<(), Error> {
    unit.log("starting etcd");
    run_shell(&unit.settings.start_command, &unit.state).map(drop)
}

/// Finishes or rolls back a restore that a crash interrupted, removes its leftovers, and
/// leaves the service running. Runs under the unit lock at the start of every action.
pub fn recover(unit: &Unit<'_>) -> Result<(), Error> {
    let p = paths(unit);
    let journal = match fs::read_to_string(&p.journal) {
        Ok(text) => {
            Some(
                serde_yaml::from_str::<Journal>(&text).map_err(|e| Error::RestoreFailed {
                    detail: format!(
                        "the restore journal `{}` is unreadable ({e})",
                        p.journal.display()
                    ),
                    outcome: format!(
                        "nothing was changed; check which data `{}` holds, then remove the journal",
                        p.member.display()
                    ),
                })?,
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Error::io(
                format!("cannot read `{}`", p.journal.display()),
                e,
            ))
        }
    };
    if let Some(j) = &journal {
        unit.log(&format!(
            "found an interrupted restore (phase {:?}, pid {}); recovering",
            j.phase, j.pid
        ));
        let live = inode(&p.member);
        if live == Some(j.new_inode) && j.phase != Phase::Committed {
            // The unverified new data is live: put the old data back.
            stop_service(unit)?;
            if j.old_inode.is_some() && inode(&p.staged_member) == j.old_inode {
                exchange(&p.staged_member, &p.member)?;
            } else {
                let aside = p.staging.join("rolled-back");
                fs::rename(&p.member, &aside)
                    .ctx(|| format!("cannot move `{}` aside", p.member.display()))?;
            }
            sync_dir(&unit.config.data_dir)?;
            sync_dir(&p.staging)?;
            unit.log("rolled back to the data that was there before the interrupted restore");
        } else if live == Some(j.new_inode) {
            unit.log("the interrupted restore had been verified; finishing it");
        }
    }
    remove_any(&p.staging)?;
    remove_any(&p.incoming_db)?;
    // Output files of service commands a killed run was running.
    for entry in fs::read_dir(&unit.state).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("service-") && (name.ends_with(".out") || name.ends_with(".err")) {
            let _ = fs::remove_file(entry.path());
        }
    }
    if let Some(j) = journal {
        if j.phase >= Phase::Stopped {
            start_service(unit)?;
        }
        remove_any(&p.journal)?;
        sync_dir(&unit.state)?;
    }
    Ok(())
}

fn random_token() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    let salt = u64::from(std::process::id()) ^ crate::manifest::now_secs();
    format!("etcd-actions-{}-{salt:x}", hex::encode(bytes))
}

/// Finds the archive: the `snapshot` param, or the `snapshot` resource in Juju mode.
fn source(unit: &Unit<'_>, opts: &RestoreOptions) -> Result<PathBuf, Error> {
    let app = unit.reporter.app().to_string();
    let path = match &opts.snapshot {
        Some(p) => p.clone(),
        None if unit.reporter.is_juju() => {
            unit.reporter
                .resource("snapshot")?
                .ok_or_else(|| Error::NoSnapshot {
                    detail: "the `snapshot` resource is not attached".into(),
                    app: app.clone(),
                })?
        }
        None => {
            return Err(Error::usage(
                "no snapshot to restore: pass --snapshot /path/to/etcd-snapshot-....tar.gz",
            ))
        }
    };
    if !path.is_absolute() {
        return Err(Error::usage(format!(
            "snapshot path `{}` is relative; give an absolute path on the unit",
            path.display()
        )));
    }
    match fs::metadata(&path) {
        Ok(md) if md.is_file() && md.len() == 0 => Err(Error::NoSnapshot {
            detail: format!("`{}` is an empty (zero-byte) placeholder", path.display()),
            app,
        }),
        Ok(md) if md.is_file() => Ok(path),
        Ok(_) => Err(Error::NoSnapshot {
            detail: format!("`{}` is not a regular file", path.display()),
            app,
        }),
        Err(e) => Err(Error::NoSnapshot {
            detail: format!("`{}` cannot be read: {e}", path.display()),
            app,
        }),
    }
}

/// Refuses when this unit is not alone: Juju peers, or other etcd members.
fn refuse_scaled(unit: &Unit<'_>, etcdctl: &Etcdctl, status: Option<&Status>) -> Result<(), Error> {
    if unit.reporter.is_juju() {
        let peers = unit.reporter.peers("cluster")?;
        if !peers.is_empty() {
            let mut names = vec![unit.reporter.unit().to_string()];
            names.extend(peers);
            return Err(Error::Scaled {
                count: names.len(),
                what: "units".into(),
                names: names.join(", "),
            });
        }
    }
    if status.is_some() {
        let members = etcdctl.members()?;
        if members.len() > 1 {
            let mut names: Vec<String> = members
                .iter()
                .map(|m| {
                    if m.name.is_empty() {
                        hex_id(m.id)
                    } else {
                        m.name.clone()
                    }
                })
                .collect();
            names.sort();
            return Err(Error::Scaled {
                count: members.len(),
                what: "etcd members".into(),
                names: names.join(", "),
            });
        }
    }
    Ok(())
}

/// Waits for etcd to answer, then checks it is the restored cluster.
fn wait_healthy(unit: &Unit<'_>, etcdctl: &Etcdctl) -> Result<Status, Error> {
    let deadline = Instant::now() + unit.settings.start_timeout;
    loop {
        match etcdctl.status() {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::RestoreFailed {
                    detail: format!(
                        "etcd did not become healthy within {}s: {e}",
                        unit.settings.start_timeout.as_secs()
                    ),
                    outcome: String::new(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

struct Expected {
    revision: Option<i64>,
    keys: Option<u64>,
    old_cluster: Option<u64>,
}

fn verify_restored(
    unit: &Unit<'_>,
    etcdctl: &Etcdctl,
    want: &Expected,
) -> Result<(Status, u64), Error> {
    let status = wait_healthy(unit, etcdctl)?;
    let fail = |detail: String| Error::RestoreFailed {
        detail,
        outcome: String::new(),
    };
    let members = etcdctl.members()?;
    if members.len() != 1 {
        return Err(fail(format!(
            "the restored cluster has {} members instead of 1",
            members.len()
        )));
    }
    if want.old_cluster == Some(status.cluster_id) {
        return Err(fail("the restored member kept the old cluster id".into()));
    }
    if let Some(rev) = want.revision {
        if status.revision != rev {
            return Err(fail(format!(
                "the restored revision is {} but the snapshot's is {rev}",
                status.revision
            )));
        }
    }
    let keys = etcdctl.key_count(status.revision)?;
    if let Some(k) = want.keys {
        if keys != k {
            return Err(fail(format!(
                "the restored member holds {keys} keys but the snapshot holds {k}"
            )));
        }
    }
    Ok((status, keys))
}

pub fn run(unit: &Unit<'_>, opts: &RestoreOptions, results: &mut Results) -> Result<(), Error> {
    let r = unit.reporter;
    // Resolve everything before any side effect.
    let etcdctl = Etcdctl::new(unit.settings, &unit.config)?;
    let offline = OfflineTool::detect(unit.settings)?;
    if let Some(wal) = &unit.config.wal_dir {
        return Err(Error::Refused(format!(
            "etcd uses a separate wal-dir `{}`, which this action cannot swap atomically; move the WAL back into the data dir first",
            wal.display()
        )));
    }
    let expected_sha = match opts.sha256.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => Some(s.to_ascii_lowercase()),
        Some(s) => return Err(Error::usage(format!("sha256 `{s}` is not 64 hex digits; pass the archive's sha256 as the snapshot action printed it"))),
        None => None,
    };
    if !opts.skip_backup && !opts.target.is_absolute() {
        return Err(Error::Target {
            path: opts.target.clone(),
            problem: "is relative; give an absolute directory for the backup".into(),
        });
    }

    r.status("maintenance", "restore: checking the snapshot");
    let archive = source(unit, opts)?;
    let _lock = unit.lock("restore")?;
    recover(unit)?;
    let p = paths(unit);

    let status = match etcdctl.status() {
        Ok(s) => Some(s),
        Err(Error::EtcdUnreachable { detail, .. }) => {
            unit.log(&format!(
                "etcd is not reachable ({detail}); restoring offline"
            ));
            None
        }
        Err(e) => return Err(e),
    };
    refuse_scaled(unit, &etcdctl, status.as_ref())?;

    // Verify the archive completely, into the state dir on the data filesystem.
    unit.log(&format!("verifying {}", archive.display()));
    let free = free_bytes(&unit.state)?;
    let limits = Limits {
        max_db: free.saturating_sub(128 << 20) / 2,
    };
    let unpacked = unpack(&archive, &p.incoming_db, expected_sha.as_deref(), limits)?;
    let incoming = crate::fsutil::TempPath::new(p.incoming_db.clone());
    crash_point("restore-after-unpack");
    let integrity = integrity(&unpacked, expected_sha.is_some());
    unit.log(&format!("archive verified: {integrity}"));

    let unit_version = status
        .as_ref()
        .and_then(|s| Version::parse(&s.version))
        .unwrap_or(offline.version);
    if let Some(v) = unpacked
        .manifest
        .as_ref()
        .and_then(|m| m.etcd_version.as_deref())
    {
        if let Some(snap) = Version::parse(v) {
            if snap.minor() > unit_version.minor() {
                return Err(Error::Refused(format!(
                    "the snapshot comes from etcd {snap}, newer than this unit's etcd {unit_version}; \
                     restore it on etcd {}.{} or later",
                    snap.0, snap.1
                )));
            }
        }
    }

    // Back up what the unit holds now.
    let mut backup: Option<Archive> = None;
    let raw_backup_needed =
        !opts.skip_backup && status.is_none() && p.member.join("snap/db").is_file();
    if !opts.skip_backup {
        if status.is_some() {
            r.status("maintenance", "restore: backing up current data");
            let b = write_archive(
                unit,
                &opts.target,
                DbSource::Live {
                    etcdctl: &etcdctl,
                    offline: &offline,
                },
                "etcd-backup",
            )?;
            b.report(results, "backup");
            backup = Some(b);
        } else if raw_backup_needed {
            crate::fsutil::ensure_target(&opts.target)?;
            let db_size = fs::metadata(p.member.join("snap/db"))
                .map(|m| m.len())
                .unwrap_or(0);
            crate::fsutil::require_space(&opts.target, db_size + (64 << 20), "the raw backup")?;
        } else {
            unit.log("no existing data to back up");
            results.set("backup.path", "none (the unit held no data)");
        }
    }

    // Build the restored member dir beside the live one.
    r.status("maintenance", "restore: building the restored data");
    let bump = if unit.settings.bump_revision > 0 && offline.supports_bump {
        unit.settings.bump_revision
    } else {
        0
    };
    let token = random_token();
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&p.staging)
        .ctx(|| format!("cannot create `{}`", p.staging.display()))?;
    // Removes the staging area on any failure until the swap; from then on it holds the
    // previous data and is handled explicitly.
    let staging_guard = TempPath::new(p.staging.clone());
    let build_dir = p.staging.join("build");
    unit.log(&format!(
        "{} {} snapshot restore into staging",
        offline.name, offline.version
    ));
    offline.restore(&RestoreRequest {
        db: &p.incoming_db,
        data_dir: &build_dir,
        name: &unit.config.name,
        peer_urls: &unit.config.peer_urls,
        token: &token,
        skip_hash_check: unpacked.db.trailer.is_none(),
        bump,
    })?;
    fs::rename(build_dir.join("member"), &p.staged_member)
        .ctx(|| "cannot move the restored member dir into staging".to_string())?;
    remove_any(&build_dir)?;
    drop(incoming);
    crash_point("restore-after-build");

    let new_inode = inode(&p.staged_member).expect("just built");
    let old_inode = inode(&p.member);
    let mut journal = Journal {
        pid: std::process::id(),
        started: crate::manifest::rfc3339(crate::manifest::now_secs()),
        phase: Phase::Prepared,
        new_inode,
        old_inode,
    };
    // Before the swap a failure restarts the service and removes the journal; the staging
    // guard removes the staging area.
    let abort = |err: Error, started: bool| -> Error {
        if started {
            let _ = start_service(unit);
        }
        let _ = remove_any(&p.journal);
        err
    };
    write_journal(&p, &journal).map_err(|e| abort(e, false))?;
    crash_point("restore-after-journal");

    // Switch over.
    r.status("maintenance", "restore: switching to the restored data");
    journal.phase = Phase::Stopped;
    write_journal(&p, &journal).map_err(|e| abort(e, false))?;
    // The restored tree is synced to disk while etcd stops; the swap waits for both.
    unit.log("syncing the restored data to disk while etcd stops");
    let (stopped, synced) = std::thread::scope(|s| {
        let sync = s.spawn(|| sync_tree(&p.staging));
        let stopped = stop_service(unit);
        let synced = sync.join().unwrap_or_else(|_| {
            Err(Error::io(
                "cannot sync the restored data",
                std::io::Error::other("the sync thread panicked"),
            ))
        });
        (stopped, synced)
    });
    stopped.and(synced).map_err(|e| abort(e, true))?;
    crash_point("restore-after-stop");
    if raw_backup_needed {
        let raw = write_archive(
            unit,
            &opts.target,
            DbSource::RawCopy {
                db: p.member.join("snap/db"),
            },
            "etcd-backup",
        );
        match raw {
            Ok(b) => {
                b.report(results, "backup");
                backup = Some(b);
            }
            Err(e) => return Err(abort(e, true)),
        }
    }
    // The one step that changes the live data: atomic, so it either happened or not.
    let swapped = if old_inode.is_some() {
        exchange(&p.staged_member, &p.member)
    } else {
        match rename_noreplace(&p.staged_member, &p.member) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::RestoreFailed {
                detail: format!("`{}` appeared during the restore", p.member.display()),
                outcome: "nothing was changed".into(),
            }),
            Err(e) => Err(e),
        }
    };
    swapped.map_err(|e| abort(e, true))?;
    let _ = staging_guard.keep();
    crash_point("restore-after-swap");
    journal.phase = Phase::Swapped;

    let want = Expected {
        revision: unpacked
            .manifest
            .as_ref()
            .and_then(|m| m.revision)
            .map(|rev| rev + bump as i64),
        keys: unpacked.manifest.as_ref().and_then(|m| m.keys),
        old_cluster: status.as_ref().map(|s| s.cluster_id),
    };
    let started = sync_dir(&unit.config.data_dir)
        .and_then(|()| sync_dir(&p.staging))
        .and_then(|()| write_journal(&p, &journal))
        .and_then(|()| start_service(unit))
        .and_then(|()| {
            crash_point("restore-after-start");
            unit.log("waiting for etcd to become healthy");
            verify_restored(unit, &etcdctl, &want)
        });
    let (new_status, keys) = match started {
        Ok(v) => v,
        Err(err) => {
            unit.log(&format!(
                "the restored etcd failed its checks ({err}); putting the previous data back"
            ));
            let outcome = roll_back(unit, &etcdctl, &p, old_inode.is_some());
            remove_any(&p.journal)?;
            let detail = match err {
                Error::RestoreFailed { detail, .. } => detail,
                other => other.to_string(),
            };
            return Err(Error::RestoreFailed { detail, outcome });
        }
    };
    journal.phase = Phase::Committed;
    write_journal(&p, &journal)?;
    crash_point("restore-after-commit");
    remove_any(&p.staging)?;
    remove_any(&p.journal)?;
    sync_dir(&unit.state)?;

    results.set("restore.source", archive.display());
    results.set("restore.sha256", &unpacked.sha256);
    results.set("restore.revision", new_status.revision);
    results.set("restore.keys", keys);
    results.set("restore.cluster-id", hex_id(new_status.cluster_id));
    results.set("restore.member", &unit.config.name);
    results.set("restore.etcd-version", &new_status.version);
    results.set("restore.integrity", &integrity);
    results.set(
        "restore.revision-bump",
        if bump > 0 {
            bump.to_string()
        } else if unit.settings.bump_revision == 0 {
            "disabled".to_string()
        } else {
            format!("not applied: {} {} has no --bump-revision/--mark-compacted (needs 3.4.27, 3.5.10 or later); restart kube-apiserver after the restore", offline.name, offline.version)
        },
    );
    if opts.skip_backup {
        results.set("backup.path", "skipped (skip-backup=true)");
    } else if backup.is_none() && results.get("backup.path").is_none() {
        results.set("backup.path", "none (the unit held no data)");
    }
    unit.log(&format!(
        "restored revision {} with {keys} keys as new cluster {}",
        new_status.revision,
        hex_id(new_status.cluster_id)
    ));
    r.status(
        "active",
        &format!("restored snapshot {}", &unpacked.sha256[..12]),
    );
    Ok(())
}

/// Puts the previous data back after a failed start, and starts it. Returns what happened,
/// for the error message.
fn roll_back(unit: &Unit<'_>, etcdctl: &Etcdctl, p: &Paths, had_old: bool) -> String {
    let _ = stop_service(unit);
    let swapped_back = if had_old {
        exchange(&p.staged_member, &p.member)
    } else {
        fs::rename(&p.member, p.staging.join("rolled-back"))
            .ctx(|| "cannot move the restored data aside".into())
    }
    .and_then(|()| sync_dir(&unit.config.data_dir));
    if let Err(e) = swapped_back {
        return format!(
            "putting the previous data back failed too ({e}); the restored data is still in place"
        );
    }
    let _ = remove_any(&p.staging);
    if let Err(e) = start_service(unit) {
        return format!("the previous data was put back, but etcd did not start: {e}");
    }
    if !had_old {
        return "the unit had no data before; the restored data was removed and etcd started"
            .into();
    }
    match wait_healthy(unit, etcdctl) {
        Ok(_) => "the previous data was put back and etcd restarted".into(),
        Err(e) => format!("the previous data was put back, but etcd is not healthy: {e}"),
    }
}

fn integrity(u: &Unpacked, sha_checked: bool) -> String {
    let archive = if sha_checked {
        "archive sha256 checked"
    } else {
        "archive sha256 not given"
    };
    match (&u.layout, u.db.trailer) {
        (Layout::Ours, Some(_)) => format!("etcd trailer and manifest sha256 verified; {archive}"),
        (Layout::Ours, None) => format!("raw db copy: manifest sha256 verified, no etcd trailer; {archive}"),
        (Layout::Legacy, Some(_)) => format!("legacy archive: etcd trailer verified; {archive}"),
        (Layout::Legacy, None) if sha_checked => {
            "legacy archive with a raw db: integrity checked with the archive sha256 only".into()
        }
        (Layout::Legacy, None) => "legacy archive with a raw db: unchecked (no etcd trailer; pass sha256 to check the archive)".into(),
    }
}
