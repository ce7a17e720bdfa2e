//! The `restore` action: a snapshot archive becomes a new single-member cluster on this unit.
//!
//! Order: find the source, refuse scaled clusters, verify the archive completely (into a
//! staging area beside the data), back up the current data, build the restored member dir,
//! and only then stop etcd and swap. Invariant: `<data-dir>/member` always holds a complete
//! dataset, the old one or the new one: the swap is one `renameat2(RENAME_EXCHANGE)`.
//! A journal in the state dir lets the next run finish or roll back a restore that crashed.
//! The member dir the restore replaced is kept (renamed, not copied) in the state dir until
//! the next successful restore, so every write etcd acknowledged before it stopped survives.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{crash_point, open_target, write_archive, Archive, DbSource, Unit};
use crate::archive::Unpacked;
use crate::datadir::{data_reserve, WAL_SEGMENT};
use crate::error::{human_size, Error, IoContext};
use crate::etcd::{hex_id, random_token, Client, OfflineTool, RestoreRequest, Status, Version};
use crate::fsutil::{
    exchange, free_bytes, remove_any, rename_noreplace, sync_dir, sync_tree, Dir, TempPath,
    UnitLock,
};
use crate::juju::Results;
use crate::params::{Params, TakesParams};
use crate::recovery::{
    inode, keep_previous, paths, recover, start_service, stop_service, write_journal, Journal,
    Paths, Phase,
};

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
    /// The archive, or the point of the history (the newest full snapshot at or below it,
    /// and the change history replayed up to it).
    pub from: crate::sources::Backup,
    pub target: PathBuf,
    pub skip_backup: bool,
    pub sha256: Option<String>,
}

impl From<crate::cli::RestoreArgs> for RestoreOptions {
    fn from(a: crate::cli::RestoreArgs) -> RestoreOptions {
        RestoreOptions {
            from: a.from.into(),
            target: a.target,
            skip_backup: a.skip_backup,
            sha256: a.sha256,
        }
    }
}

impl TakesParams for RestoreOptions {
    fn take(&mut self, params: &mut Params) -> Result<(), Error> {
        self.from.take(params, &mut self.target)?;
        if let Some(s) = params.string("sha256")? {
            self.sha256 = Some(s);
        }
        if let Some(b) = params.boolean("skip-backup")? {
            self.skip_backup = b;
        }
        Ok(())
    }
}

/// After the stop command: waits (at most the start timeout) until etcd is really gone: its
/// client URL refuses connections, and nobody holds `member/snap/db` open (bbolt keeps an
/// exclusive `flock` on it while etcd runs). A stop command that returned early, or stopped
/// something else, must not lead to a swap under a live etcd.
fn confirm_stopped(unit: &Unit<'_>, client: &Client, member: &Path) -> Result<(), Error> {
    let db = member.join("snap/db");
    let deadline = Instant::now() + unit.settings.start_timeout;
    loop {
        let problem = match client.listening() {
            Ok(true) => Some(format!(
                "its client URL `{}` still accepts connections",
                client.endpoint()
            )),
            Ok(false) => db_locked(&db).err(),
            Err(e) => Some(e.to_string()),
        };
        let Some(problem) = problem else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(Error::RestoreFailed {
                detail: format!(
                    "etcd is still running after the stop command `{}` returned: {problem} \
                     ({}s later)",
                    unit.settings.stop_command,
                    unit.settings.start_timeout.as_secs()
                ),
                outcome: "nothing was swapped: the live data is unchanged, the start command \
                          was run and the staged data removed; fix the stop command \
                          (ETCD_ACTIONS_STOP_COMMAND, --stop-command) so that it returns only \
                          once etcd has exited"
                    .into(),
            });
        }
        // Clients wait while this loop does: look again soon (a refused connect and a
        // non-blocking flock cost microseconds).
        std::thread::sleep(POLL);
    }
}

/// How often the restore looks again while etcd stops: it is downtime.
const POLL: Duration = Duration::from_millis(20);

/// `Err` when a process holds `db`'s bbolt lock (an exclusive, non-blocking `flock` fails).
fn db_locked(db: &Path) -> Result<(), String> {
    use nix::fcntl::{Flock, FlockArg};
    let file = match crate::fsutil::open_regular_path(db) {
        Ok(f) => f,
        // No db (a member that never wrote one): nothing can hold it.
        Err(_) if !db.exists() => return Ok(()),
        Err(e) => {
            return Err(format!(
                "cannot open `{}` to check its lock: {e}",
                db.display()
            ))
        }
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        // Dropping the lock releases it at once.
        Ok(lock) => {
            drop(lock);
            Ok(())
        }
        Err((_, errno)) => Err(format!(
            "`{}` is still locked by a running process ({errno}); bbolt holds that lock while \
             etcd has the db open",
            db.display()
        )),
    }
}

/// The unit's etcd version while it is stopped: from its etcd binary (`etcd --version`:
/// ETCD_ACTIONS_ETCD, the etcd beside the restore tool, or `etcd` on PATH), else from the
/// `storageVersion` its db records (3.6 and later), else the restore tool's own, which says
/// least. Returns the version and how it was learned.
fn offline_unit_version(unit: &Unit<'_>, offline: &OfflineTool, db: &Path) -> (Version, String) {
    if let Ok(bin) = offline.server_binary() {
        if let Ok(out) =
            crate::process::run_checked(std::process::Command::new(&bin).arg("--version"))
        {
            let found = out.stdout.lines().find_map(|l| {
                l.split_once("etcd Version:")
                    .and_then(|(_, v)| Version::parse(v))
            });
            if let Some(v) = found {
                return (v, format!("`{} --version`", bin.display()));
            }
        }
    }
    let stored = fs::File::open(db)
        .ok()
        .and_then(|f| crate::bbolt::Bolt::open(f).ok())
        .and_then(|b| b.bucket_entries(b"meta").ok().flatten())
        .and_then(|entries| {
            entries
                .into_iter()
                .find(|(k, _)| k == b"storageVersion")
                .and_then(|(_, v)| Version::parse(&String::from_utf8_lossy(&v)))
        });
    if let Some(v) = stored {
        return (v, format!("the storage version in `{}`", db.display()));
    }
    unit.log(&format!(
        "etcd is stopped and its version cannot be read; taking the restore tool's ({})",
        offline.version
    ));
    (
        offline.version,
        format!("the restore tool ({})", offline.name),
    )
}

/// Refuses what the unit's etcd could not run on: a snapshot from a newer minor version (its
/// db may use what this etcd does not know), or a restore tool of a newer minor version
/// (etcdutl 3.6 and later writes its own storage version into the data dir it builds, and
/// etcd refuses to start on data written by a newer version).
fn check_versions(
    snapshot: Option<Version>,
    tool: &OfflineTool,
    unit: Version,
    known_by: &str,
) -> Result<(), Error> {
    if let Some(snap) = snapshot {
        if snap.minor() > unit.minor() {
            return Err(Error::Refused(format!(
                "the snapshot comes from etcd {snap}, newer than this unit's etcd {unit} (as \
                 {known_by} says); restore it on etcd {}.{} or later, or upgrade this unit first",
                snap.0, snap.1
            )));
        }
    }
    if tool.version.minor() > unit.minor() {
        return Err(Error::Refused(format!(
            "the restore tool is {} {}, newer than this unit's etcd {unit} (as {known_by} \
             says): the data dir it writes would not start on etcd {unit}; use the {} of etcd \
             {}.{} (ETCD_ACTIONS_ETCDUTL)",
            tool.name, tool.version, tool.name, unit.0, unit.1
        )));
    }
    Ok(())
}

/// Refuses a member dir that the atomic swap cannot handle: a symlink (the swap would replace
/// the link and orphan the data on the other volume) or another filesystem mounted there.
fn check_member_dir(unit: &Unit<'_>) -> Result<(), Error> {
    let member = unit.config.member_dir();
    let md = match fs::symlink_metadata(&member) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot stat `{}`", member.display()), e)),
    };
    if md.file_type().is_symlink() {
        let to = fs::read_link(&member)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(Error::Refused(format!(
            "`{}` is a symlink to `{to}`; a restore swaps the member dir with one atomic rename \
             on the data filesystem, which would replace the link and leave the data it points \
             to orphaned. Set etcd's data-dir to the real location (the directory that holds \
             `{to}`) or move the data back into `{}`, then run the restore again",
            member.display(),
            unit.config.data_dir.display()
        )));
    }
    if !md.is_dir() {
        return Err(Error::Refused(format!(
            "`{}` is not a directory; move it away or point etcd's data-dir elsewhere",
            member.display()
        )));
    }
    let data = crate::config::metadata(&unit.config.data_dir)?;
    if data.dev() != md.dev() {
        return Err(Error::Refused(format!(
            "`{}` is a mount point of another filesystem; a restore swaps the member dir with \
             one atomic rename, which cannot cross filesystems. Mount the volume at `{}` \
             (etcd's data-dir) instead, then run the restore again",
            member.display(),
            unit.config.data_dir.display()
        )));
    }
    Ok(())
}

/// The members a stopped etcd belongs to, from what is on disk: the `members` bucket of the
/// member dir's db, or failing that the config's `initial-cluster`. With where it came from.
fn members_on_disk(unit: &Unit<'_>) -> (Vec<String>, String) {
    let db = unit.config.member_dir().join("snap/db");
    let read = File::open(&db)
        .map_err(|e| e.to_string())
        .and_then(crate::bbolt::Bolt::open)
        .and_then(|b| {
            let removed = b.bucket_entries(b"members_removed")?.unwrap_or_default();
            Ok(b.bucket_entries(b"members")?.map(|entries| {
                entries
                    .into_iter()
                    .filter(|(k, _)| !removed.iter().any(|(r, _)| r == k))
                    .collect::<Vec<_>>()
            }))
        });
    match read {
        Ok(Some(entries)) if !entries.is_empty() => {
            return (
                distinct_members(unit, &entries),
                format!("the members bucket of `{}`", db.display()),
            );
        }
        Ok(_) => unit.log(&format!("`{}` lists no members", db.display())),
        Err(e) if db.exists() => {
            unit.log(&format!("cannot read members from `{}`: {e}", db.display()))
        }
        Err(_) => {}
    }
    (
        unit.config.initial_members.clone(),
        format!("`initial-cluster` in `{}`", unit.config.path.display()),
    )
}

/// The names of the members a db lists, this unit counted once: etcd 3.4's restore keeps the
/// snapshot's own member beside the new one, both with this unit's name and peer URLs (a
/// real other member has another name or other peer URLs).
fn distinct_members(unit: &Unit<'_>, entries: &[crate::bbolt::Entry]) -> Vec<String> {
    let mut own_urls = unit.config.peer_urls.clone();
    own_urls.sort();
    let mut names = Vec::new();
    let mut this_unit = false;
    for (key, value) in entries {
        let v = serde_json::from_slice::<serde_json::Value>(value).ok();
        let name = v
            .as_ref()
            .and_then(|v| v["name"].as_str().map(str::to_string))
            .filter(|n| !n.is_empty());
        let mut urls: Vec<String> = v
            .as_ref()
            .and_then(|v| v["peerURLs"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|u| u.as_str().map(str::to_string))
            .collect();
        urls.sort();
        if name.as_deref() == Some(unit.config.name.as_str()) && urls == own_urls {
            this_unit = true;
            continue;
        }
        names.push(name.unwrap_or_else(|| String::from_utf8_lossy(key).into_owned()));
    }
    if this_unit {
        names.push(unit.config.name.clone());
    }
    names
}

/// Refuses when this unit is not alone: Juju peers, or other etcd members (asked of etcd when
/// it runs, read from disk when it is stopped).
fn refuse_scaled(unit: &Unit<'_>, client: &Client, status: Option<&Status>) -> Result<(), Error> {
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
    let (mut names, what) = if status.is_some() {
        let names = client
            .members()?
            .iter()
            .map(|m| {
                if m.name.is_empty() {
                    hex_id(m.id)
                } else {
                    m.name.clone()
                }
            })
            .collect();
        (names, "etcd members".to_string())
    } else {
        let (names, from) = members_on_disk(unit);
        (names, format!("etcd members according to {from}"))
    };
    if names.len() > 1 {
        names.sort();
        return Err(Error::Scaled {
            count: names.len(),
            what,
            names: names.join(", "),
        });
    }
    Ok(())
}

/// Waits for etcd to answer, then checks it is the restored cluster.
fn wait_healthy(unit: &Unit<'_>, client: &Client) -> Result<Status, Error> {
    client
        .wait_serving(unit.settings.start_timeout)
        .map_err(|e| Error::RestoreFailed {
            detail: format!(
                "etcd did not become healthy within {}s: {e}",
                unit.settings.start_timeout.as_secs()
            ),
            outcome: String::new(),
        })
}

struct Expected {
    revision: Option<i64>,
    keys: Option<u64>,
    old_cluster: Option<u64>,
}

fn verify_restored(
    unit: &Unit<'_>,
    client: &Client,
    want: &Expected,
) -> Result<(Status, u64), Error> {
    let status = wait_healthy(unit, client)?;
    let fail = |detail: String| Error::RestoreFailed {
        detail,
        outcome: String::new(),
    };
    let members = client.members()?;
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
    let keys = client.key_count(status.revision)?;
    if let Some(k) = want.keys {
        if keys != k {
            return Err(fail(format!(
                "the restored member holds {keys} keys but the snapshot holds {k}"
            )));
        }
    }
    Ok((status, keys))
}

/// Runs the restore and sets the workload status to how it ended. A failure that left the
/// data alone says so only after checking that etcd is healthy.
pub fn run(unit: &Unit<'_>, opts: &RestoreOptions, results: &mut Results) -> Result<(), Error> {
    if !unit.config.local {
        return Err(Error::Usage(format!(
            "a restore replaces etcd's data on this machine, and `{}` does not exist: point \
             --etcd-config (ETCD_ACTIONS_ETCD_CONFIG) at etcd's config file or its kubeadm \
             manifest; --endpoints alone is enough only for a snapshot",
            unit.settings.etcd_config.display()
        )));
    }
    let mut was_online = None;
    let outcome = restore(unit, opts, results, &mut was_online);
    let r = unit.reporter;
    match outcome {
        Ok(()) => Ok(()),
        Err(err @ Error::RestoreFailed { .. }) => {
            r.status("blocked", "restore failed: see the restore action's output");
            Err(err)
        }
        Err(err @ Error::ServiceTimeout { .. }) => {
            r.status(
                "blocked",
                "restore interrupted: a service command timed out",
            );
            Err(err)
        }
        Err(err) => match health(unit) {
            Health::Healthy => {
                r.status("active", "restore not done; the unit's data is unchanged");
                Err(err)
            }
            Health::Stopped if was_online != Some(true) => {
                r.status(
                    "blocked",
                    "restore not done; the unit's data is unchanged and etcd is not running",
                );
                Err(err)
            }
            now => {
                let now = match now {
                    Health::Failing(e) => e,
                    _ => "it does not answer: connection refused".to_string(),
                };
                r.status("blocked", "restore not done, and etcd is not healthy");
                Err(Error::RestoreFailed {
                    detail: err.to_string(),
                    outcome: format!(
                        "this run did not swap the data, but etcd is not healthy now ({now}); \
                         check the etcd service (its disk, its log) before anything else"
                    ),
                })
            }
        },
    }
}

enum Health {
    Healthy,
    /// Nothing listens on the client port.
    Stopped,
    Failing(String),
}

fn health(unit: &Unit<'_>) -> Health {
    let client = Client::new(&unit.config);
    match client.listening() {
        Ok(false) => Health::Stopped,
        Ok(true) => match client.status() {
            Ok(_) => Health::Healthy,
            Err(e) => Health::Failing(e.to_string()),
        },
        Err(e) => Health::Failing(e.to_string()),
    }
}

/// The restore as a pipeline of stages, each with one job: `plan` (find and check, no change
/// to etcd's data), `back_up` (the unit's current data), `stage` (build the restored member
/// beside the live one), `swap` (stop, confirm stopped, journal, exchange), `confirm` (start,
/// wait healthy, verify, or `roll_back`) and `commit`. A stage that rewrites the staged data
/// (a replay to a later revision) fits between `stage` and `swap`.
fn restore(
    unit: &Unit<'_>,
    opts: &RestoreOptions,
    results: &mut Results,
    was_online: &mut Option<bool>,
) -> Result<(), Error> {
    let plan = plan(unit, opts, was_online)?;
    let backup = back_up(unit, &plan, results)?;
    let staged = stage(unit, &plan)?;
    let swapped = swap(unit, &plan, staged, backup, results)?;
    let (new_status, keys) = confirm(unit, &plan, &swapped)?;
    commit(unit, opts, &plan, swapped, (new_status, keys), results)
}

/// What `plan` decided: the verified archive, the unit's state, and the tools.
struct Plan {
    client: Client,
    offline: OfflineTool,
    p: Paths,
    /// How the archive is named in results and messages.
    archive: PathBuf,
    origin: &'static str,
    integrity: String,
    unpacked: Unpacked,
    /// The verified db in the state dir, removed unless a stage consumes it.
    _incoming: TempPath,
    /// etcd's status when it runs; `None` when it is stopped (an offline restore).
    status: Option<Status>,
    /// Where the current data is backed up (`None`: skip-backup).
    target: Option<Dir>,
    /// Free space left to the live etcd while staging.
    reserve: u64,
    /// Revisions added by the restore tool (0: none).
    bump: u64,
    /// A restore to a point: the changes replayed onto the full snapshot.
    point: Option<crate::replay::Point>,
    /// Held from the plan to the end, and released last (fields drop in order): no other run
    /// of the agent touches the unit meanwhile.
    _lock: UnitLock,
}

/// Finds the archive and checks it completely, and checks every precondition: settings, the
/// member dir, a scaled cluster, versions. Nothing of etcd's data changes.
fn plan(
    unit: &Unit<'_>,
    opts: &RestoreOptions,
    was_online: &mut Option<bool>,
) -> Result<Plan, Error> {
    // Resolve everything before any side effect.
    let client = Client::new(&unit.config);
    let offline = OfflineTool::detect(unit.settings)?;
    if let Some(wal) = &unit.config.wal_dir {
        return Err(Error::Refused(format!(
            "etcd uses a separate wal-dir `{}`, which this action cannot swap atomically; move the WAL back into the data dir first",
            wal.display()
        )));
    }
    let expected_sha = match opts.sha256.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => Some(s.to_ascii_lowercase()),
        Some(s) => return Err(Error::usage(format!("sha256 `{}` is not 64 hex digits; pass the archive's sha256 as the snapshot action printed it", crate::error::bounded(s, 200)))),
        None => None,
    };
    if !opts.skip_backup && !opts.target.is_absolute() {
        return Err(Error::Target {
            path: opts.target.clone(),
            problem: "is relative; give an absolute directory for the backup".into(),
        });
    }
    check_member_dir(unit)?;

    unit.reporter
        .status("maintenance", "restore: checking the snapshot");
    let (point, backup_id) = opts.from.resolve(unit, &opts.target)?;
    if let Some(point) = &point {
        unit.log(&format!(
            "restoring to {}: the full snapshot {} at revision {}, then {} change segment(s)",
            point.asked,
            point.base.id,
            point.base_revision,
            point.segments.len()
        ));
    }
    let located = crate::catalog::locate(
        unit,
        &crate::catalog::Wanted {
            snapshot: opts.from.snapshot.as_deref(),
            backup_id: backup_id.as_deref(),
            target: &opts.target,
        },
    )?;
    let archive = located.shown.clone();
    // The sha256 given and the one recorded beside the archive are compared (and then
    // checked against its bytes) by `catalog::check_located`.
    let target: Option<Dir> = if opts.skip_backup {
        None
    } else {
        Some(open_target(unit, &opts.target)?)
    };
    let lock = unit.lock("restore")?;
    recover(unit)?;
    let p = paths(unit);

    // Offline only when nothing listens on the client port; a timeout or a TLS failure is an
    // error, not a stopped etcd.
    let status = if client.listening()? {
        *was_online = Some(true);
        Some(client.status()?)
    } else {
        *was_online = Some(false);
        unit.log(&format!(
            "nothing listens at {} (connection refused); restoring offline",
            client.endpoint()
        ));
        None
    };
    refuse_scaled(unit, &client, status.as_ref())?;

    // Verify the archive completely, into the state dir on the data filesystem, leaving the
    // live etcd its reserve whatever the archive's headers claim, and check what can be
    // checked offline before anything stops: the db must open and hold the manifest's revision.
    unit.log(&format!("verifying {}", archive.display()));
    let incoming = TempPath::new(p.incoming_db.clone());
    let checked =
        crate::catalog::check_located(unit, located, expected_sha, &offline, &p.incoming_db)?;
    crash_point("restore-after-unpack");
    unit.log(&format!("archive verified: {}", checked.integrity));
    let reserve = data_reserve(unit)?;

    let (unit_version, known_by) = match status.as_ref().and_then(|s| Version::parse(&s.version)) {
        Some(v) => (v, "its status".to_string()),
        None => offline_unit_version(unit, &offline, &p.member.join("snap/db")),
    };
    let snapshot_version = checked
        .unpacked
        .manifest
        .as_ref()
        .and_then(|m| m.etcd_version.as_deref())
        .and_then(Version::parse);
    check_versions(snapshot_version, &offline, unit_version, &known_by)?;
    let bump = if unit.settings.bump_revision > 0 && offline.supports_bump {
        revision_bump(
            unit,
            status.as_ref(),
            &p,
            point
                .as_ref()
                .map(|pt| pt.revision)
                .or_else(|| checked.unpacked.manifest.as_ref().and_then(|m| m.revision)),
        )
    } else {
        0
    };
    Ok(Plan {
        client,
        offline,
        p,
        archive,
        origin: checked.origin,
        integrity: checked.integrity,
        unpacked: checked.unpacked,
        _incoming: incoming,
        status,
        target,
        reserve,
        bump,
        point,
        _lock: lock,
    })
}

/// The revisions the restore tool adds: the margin (`--bump-revision`), plus however far the
/// unit's etcd had already gone past the restored revision, so that the restored cluster's
/// revisions always lie above every revision a client has seen (a cluster restored before
/// lives above the margin already). The highest served revision is the running etcd's, else
/// the stopped member's db's.
fn revision_bump(
    unit: &Unit<'_>,
    status: Option<&Status>,
    p: &Paths,
    restored: Option<i64>,
) -> u64 {
    let margin = unit.settings.bump_revision;
    let served = match status {
        Some(s) => s.revision,
        None => crate::revision::of_db_file(&p.member.join("snap/db")).unwrap_or(0),
    };
    let restored = restored
        .or_else(|| crate::revision::of_db_file(&p.incoming_db).ok())
        .unwrap_or(0);
    let behind = u64::try_from(served.saturating_sub(restored)).unwrap_or(0);
    if behind > 0 {
        unit.log(&format!(
            "revision bump: {behind} (etcd served revision {served}, the restore is at \
             {restored}) + {margin}"
        ));
    }
    margin.saturating_add(behind)
}

/// The backup `back_up` took, or the raw copy it left for `swap` (etcd is stopped then).
struct Backup {
    archive: Option<Archive>,
    raw_needed: bool,
}

/// Backs up what the unit holds now: a snapshot when etcd runs; when it is stopped, checks
/// the room for a raw copy of its db, which `swap` takes once etcd is confirmed stopped.
fn back_up(unit: &Unit<'_>, plan: &Plan, results: &mut Results) -> Result<Backup, Error> {
    let p = &plan.p;
    let raw_needed =
        plan.target.is_some() && plan.status.is_none() && p.member.join("snap/db").is_file();
    let mut archive = None;
    if let Some(target) = &plan.target {
        if plan.status.is_some() {
            unit.reporter
                .status("maintenance", "restore: backing up current data");
            let b = write_archive(
                unit,
                target,
                DbSource::Live {
                    client: &plan.client,
                },
                "etcd-backup",
                None,
            )?;
            b.report(results, "backup");
            archive = Some(b);
        } else if raw_needed {
            let db_size = fs::metadata(p.member.join("snap/db"))
                .map(|m| m.len())
                .unwrap_or(0);
            target.require_space(db_size + (64 << 20), "the raw backup")?;
        } else {
            unit.log("no existing data to back up");
            results.set("backup.path", "none (the unit held no data)");
        }
    }
    Ok(Backup {
        archive,
        raw_needed,
    })
}

/// The restored member dir, built in staging.
struct Staged {
    /// Removes the staging area on any failure until the swap.
    guard: TempPath,
    new_inode: u64,
    old_inode: Option<u64>,
    /// What a replay to a point did.
    replayed: Option<crate::replay::Replayed>,
}

/// Builds the restored member dir beside the live one with the restore tool, if the data
/// filesystem still has room for it and the reserve.
fn stage(unit: &Unit<'_>, plan: &Plan) -> Result<Staged, Error> {
    let (p, offline) = (&plan.p, &plan.offline);
    unit.reporter
        .status("maintenance", "restore: building the restored data");
    // A replay builds the member twice: once to replay into, once with the bump.
    let copies = if plan.point.is_some() { 2 } else { 1 };
    let need = copies * (plan.unpacked.db.size + WAL_SEGMENT) + plan.reserve;
    let free = free_bytes(&unit.state)?;
    if free < need {
        return Err(Error::NoSpace {
            path: unit.config.data_dir.clone(),
            action: format!(
                "building the restored data (keeping {} free for the live etcd)",
                human_size(plan.reserve)
            ),
            need: human_size(need),
            available: human_size(free),
        });
    }
    let token = random_token();
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&p.staging)
        .ctx(|| format!("cannot create `{}`", p.staging.display()))?;
    // Removes the staging area on any failure until the swap; from then on it holds the
    // previous data and is handled explicitly.
    let guard = TempPath::new(p.staging.clone());
    let build_dir = p.staging.join("build");
    let (db, replayed) = match &plan.point {
        Some(point) => {
            let (db, r) = replay(unit, plan, point, &token)?;
            (db, Some(r))
        }
        None => (p.incoming_db.clone(), None),
    };
    unit.log(&format!(
        "{} {} snapshot restore into staging",
        offline.name, offline.version
    ));
    // The restored db is flushed while the tool writes it: the sync before the swap, which
    // clients wait for, then has little left to write.
    crate::fsutil::flushing_while(&build_dir, || {
        offline.restore(&RestoreRequest {
            db: &db,
            data_dir: &build_dir,
            name: &unit.config.name,
            peer_urls: &unit.config.peer_urls,
            token: &token,
            bump: plan.bump,
        })
    })
    .map_err(|e| match e {
        Error::CommandFailed { ref stderr, .. }
            if !stderr.to_ascii_lowercase().contains("no space left") =>
        {
            Error::BadArchive {
                path: plan.archive.clone(),
                problem: format!("{} cannot restore its db: {e}", offline.name),
            }
        }
        other => other,
    })?;
    fs::rename(build_dir.join("member"), &p.staged_member)
        .ctx(|| "cannot move the restored member dir into staging".to_string())?;
    remove_any(&build_dir)?;
    remove_any(&p.staging.join("replay"))?;
    remove_any(&p.incoming_db)?;
    crash_point("restore-after-build");
    Ok(Staged {
        guard,
        new_inode: inode(&p.staged_member).expect("just built"),
        old_inode: inode(&p.member),
        replayed,
    })
}

/// The replay stage of a restore to a point: the full snapshot restored without a bump into
/// `staging/replay`, the changes replayed there by a throwaway etcd on loopback, and the db
/// it leaves handed to the restore tool (which applies the bump after the replay, so the
/// replayed revisions keep their numbers). Returns that db.
fn replay(
    unit: &Unit<'_>,
    plan: &Plan,
    point: &crate::replay::Point,
    token: &str,
) -> Result<(PathBuf, crate::replay::Replayed), Error> {
    let (p, offline) = (&plan.p, &plan.offline);
    let dir = p.staging.join("replay");
    unit.reporter.status(
        "maintenance",
        &format!("restore: replaying changes to {}", point.asked),
    );
    offline
        .restore(&RestoreRequest {
            db: &p.incoming_db,
            data_dir: &dir,
            name: &unit.config.name,
            peer_urls: &unit.config.peer_urls,
            token,
            bump: 0,
        })
        .map_err(|e| Error::BadArchive {
            path: plan.archive.clone(),
            problem: format!("{} cannot restore its db: {e}", offline.name),
        })?;
    remove_any(&p.incoming_db)?;
    let store = unit.store()?;
    let r = crate::replay::replay(unit, offline, &dir, point, store.as_ref())?;
    unit.log(&format!(
        "replayed {} revisions ({} changes, {} leases, {} txns sent) to revision {} in {:.1}s \
         ({:.1}s reading the history)",
        r.revisions, r.events, r.leases, r.sent, point.revision, r.seconds, r.reading
    ));
    crash_point("restore-after-replay");
    Ok((crate::replay::replayed_db(&dir), r))
}

/// Before the swap a failure restarts the service (when it was stopped) and removes the
/// journal; the staging guard removes the staging area. A service command that timed out
/// leaves the journal: etcd's state is unknown, and the next run recovers from it.
fn abort(unit: &Unit<'_>, p: &Paths, err: Error, started: bool) -> Error {
    if matches!(err, Error::ServiceTimeout { .. }) {
        return err;
    }
    if started {
        let _ = start_service(unit);
    }
    let _ = remove_any(&p.journal);
    err
}

/// The new data in place, etcd not yet started on it.
struct Swapped {
    journal: Journal,
    old_inode: Option<u64>,
    down_since: Instant,
    backup: Option<Archive>,
    replayed: Option<crate::replay::Replayed>,
}

/// Journals the restore, stops etcd (syncing the staged data meanwhile), confirms it is gone,
/// takes the raw backup an offline restore needs, and exchanges the member dirs: the one step
/// that changes the live data, atomic, so it either happened or not.
fn swap(
    unit: &Unit<'_>,
    plan: &Plan,
    staged: Staged,
    backup: Backup,
    results: &mut Results,
) -> Result<Swapped, Error> {
    let p = &plan.p;
    let mut journal = Journal {
        pid: std::process::id(),
        started: crate::manifest::rfc3339(crate::manifest::now_secs()),
        phase: Phase::Prepared,
        new_inode: staged.new_inode,
        old_inode: staged.old_inode,
    };
    write_journal(p, &journal).map_err(|e| abort(unit, p, e, false))?;
    crash_point("restore-after-journal");

    unit.reporter
        .status("maintenance", "restore: switching to the restored data");
    journal.phase = Phase::Stopped;
    write_journal(p, &journal).map_err(|e| abort(unit, p, e, false))?;
    // The restored tree is synced to disk while etcd stops; the swap waits for both.
    unit.log("syncing the restored data to disk while etcd stops");
    let down_since = Instant::now();
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
    stopped.map_err(|e| abort(unit, p, e, true))?;
    synced.map_err(|e| abort(unit, p, e, true))?;
    confirm_stopped(unit, &plan.client, &p.member).map_err(|e| abort(unit, p, e, true))?;
    crash_point("restore-after-stop");
    let mut taken = backup.archive;
    if backup.raw_needed {
        let raw = write_archive(
            unit,
            plan.target.as_ref().expect("a raw backup needs a target"),
            DbSource::RawCopy {
                db: p.member.join("snap/db"),
            },
            "etcd-backup",
            None,
        )
        .map_err(|e| abort(unit, p, e, true))?;
        raw.report(results, "backup");
        taken = Some(raw);
    }
    let swapped = if staged.old_inode.is_some() {
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
    swapped.map_err(|e| abort(unit, p, e, true))?;
    let _ = staged.guard.keep();
    crash_point("restore-after-swap");
    journal.phase = Phase::Swapped;
    Ok(Swapped {
        journal,
        old_inode: staged.old_inode,
        down_since,
        backup: taken,
        replayed: staged.replayed,
    })
}

/// Starts etcd on the new data and checks it is the restored cluster, with the snapshot's
/// revision (plus the bump) and keys; on any failure, `roll_back`.
fn confirm(unit: &Unit<'_>, plan: &Plan, swapped: &Swapped) -> Result<(Status, u64), Error> {
    let p = &plan.p;
    let manifest = plan.unpacked.manifest.as_ref();
    let want = Expected {
        revision: match &plan.point {
            Some(point) => Some(point.revision),
            None => manifest.and_then(|m| m.revision),
        }
        .map(|rev| rev + plan.bump as i64),
        keys: match &swapped.replayed {
            Some(r) => Some(r.keys),
            None => manifest.and_then(|m| m.keys),
        },
        old_cluster: plan.status.as_ref().map(|s| s.cluster_id),
    };
    let started = sync_dir(&unit.config.data_dir)
        .and_then(|()| sync_dir(&p.staging))
        .and_then(|()| write_journal(p, &swapped.journal))
        .and_then(|()| start_service(unit))
        .and_then(|()| {
            crash_point("restore-after-start");
            unit.log("waiting for etcd to become healthy");
            verify_restored(unit, &plan.client, &want)
        });
    started.or_else(|err| {
        unit.log(&format!(
            "the restored etcd failed its checks ({err}); putting the previous data back"
        ));
        let (outcome, keep_journal) = roll_back(unit, &plan.client, p, swapped.old_inode.is_some());
        if !keep_journal {
            remove_any(&p.journal)?;
        }
        let detail = match err {
            Error::RestoreFailed { detail, .. } => detail,
            other => other.to_string(),
        };
        Err(Error::RestoreFailed { detail, outcome })
    })
}

/// Marks the restore done, keeps the data it replaced, tidies, and reports.
fn commit(
    unit: &Unit<'_>,
    opts: &RestoreOptions,
    plan: &Plan,
    swapped: Swapped,
    (new_status, keys): (Status, u64),
    results: &mut Results,
) -> Result<(), Error> {
    let p = &plan.p;
    let downtime = swapped.down_since.elapsed();
    let mut journal = swapped.journal;
    journal.phase = Phase::Committed;
    write_journal(p, &journal)?;
    crash_point("restore-after-commit");
    if swapped.old_inode.is_some() {
        keep_previous(unit, p, &journal.started)?;
        results.set("restore.previous-data", p.previous.display());
        results.set(
            "restore.previous-data-note",
            format!(
                "the data etcd served until this restore (every write it acknowledged before it \
                 stopped), kept until the next successful restore; to go back: stop etcd, move \
                 {member} aside, move {prev} to {member}, start etcd",
                member = p.member.display(),
                prev = p.previous.display()
            ),
        );
        unit.log(&format!(
            "kept the previous data in `{}` until the next restore",
            p.previous.display()
        ));
    }
    remove_any(&p.staging)?;
    remove_any(&p.journal)?;
    sync_dir(&unit.state)?;

    let (offline, bump) = (&plan.offline, plan.bump);
    results.set("restore.source", plan.archive.display());
    results.set("restore.origin", plan.origin);
    results.set("restore.sha256", &plan.unpacked.sha256);
    results.set("restore.revision", new_status.revision);
    if let (Some(point), Some(r)) = (&plan.point, &swapped.replayed) {
        results.set("restore.point", &point.asked);
        results.set("restore.point-revision", point.revision);
        results.set("restore.base-revision", point.base_revision);
        results.set("restore.replayed-revisions", r.revisions);
        results.set("restore.replayed-changes", r.events);
        results.set("restore.replay-seconds", format!("{:.1}", r.seconds));
    }
    results.set("restore.keys", keys);
    results.set("restore.cluster-id", hex_id(new_status.cluster_id));
    results.set("restore.member", &unit.config.name);
    results.set("restore.etcd-version", &new_status.version);
    results.set("restore.integrity", &plan.integrity);
    results.set(
        "restore.downtime",
        format!("{:.1}s", downtime.as_secs_f64()),
    );
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
    } else if swapped.backup.is_none() && results.get("backup.path").is_none() {
        results.set("backup.path", "none (the unit held no data)");
    }
    unit.log(&format!(
        "restored revision {} with {keys} keys as new cluster {} ({:.1}s without etcd)",
        new_status.revision,
        hex_id(new_status.cluster_id),
        downtime.as_secs_f64()
    ));
    unit.reporter.status(
        "active",
        &format!("restored snapshot {}", &plan.unpacked.sha256[..12]),
    );
    Ok(())
}

/// Puts the previous data back after a failed start, and starts it. Returns what happened,
/// for the error message, and whether the journal must stay for the next run (a service
/// command timed out, so etcd's state is unknown).
fn roll_back(unit: &Unit<'_>, client: &Client, p: &Paths, had_old: bool) -> (String, bool) {
    if let Err(e @ Error::ServiceTimeout { .. }) = stop_service(unit) {
        return (
            format!(
                "etcd could not be stopped to put the previous data back ({e}); the journal is \
                 kept and the next snapshot or restore run rolls back"
            ),
            true,
        );
    }
    let swapped_back = if had_old {
        exchange(&p.staged_member, &p.member)
    } else {
        fs::rename(&p.member, p.staging.join("rolled-back"))
            .ctx(|| "cannot move the restored data aside".into())
    }
    .and_then(|()| sync_dir(&unit.config.data_dir));
    if let Err(e) = swapped_back {
        return (
            format!(
                "putting the previous data back failed too ({e}); the restored data is still in place"
            ),
            false,
        );
    }
    let _ = remove_any(&p.staging);
    if let Err(e) = start_service(unit) {
        return (
            format!("the previous data was put back, but etcd did not start: {e}"),
            false,
        );
    }
    if !had_old {
        return (
            "the unit had no data before; the restored data was removed and etcd started".into(),
            false,
        );
    }
    match wait_healthy(unit, client) {
        Ok(_) => (
            "the previous data was put back and etcd restarted".into(),
            false,
        ),
        Err(e) => (
            format!("the previous data was put back, but etcd is not healthy: {e}"),
            false,
        ),
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;

    fn tool(v: Version) -> OfflineTool {
        OfflineTool {
            bin: PathBuf::from("/usr/bin/etcdutl"),
            name: "etcdutl",
            version: v,
            supports_bump: true,
        }
    }

    #[test]
    fn what_a_unit_can_take() {
        let (v34, v35, v36, v37) = (
            Version(3, 4, 23),
            Version(3, 5, 30),
            Version(3, 6, 15),
            Version(3, 7, 2),
        );
        // Same or older snapshots, with a tool of the unit's minor or older: fine (3.6 and
        // 3.7 servers with 3.5 tools is how the tests pair them).
        assert!(check_versions(Some(v34), &tool(v35), v35, "x").is_ok());
        assert!(check_versions(Some(v36), &tool(v35), v36, "x").is_ok());
        assert!(check_versions(Some(v35), &tool(v35), v37, "x").is_ok());
        assert!(check_versions(None, &tool(v35), v35, "x").is_ok());
        // A newer snapshot: refused, naming both versions.
        let e = check_versions(Some(v37), &tool(v35), v36, "its status").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("3.7.2") && msg.contains("3.6.15"), "{msg}");
        // A newer restore tool: refused, naming both.
        let msg = check_versions(Some(v35), &tool(v36), v35, "x")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("etcdutl 3.6.15") && msg.contains("etcd 3.5.30"),
            "{msg}"
        );
        // Patch levels never matter.
        assert!(
            check_versions(Some(Version(3, 5, 31)), &tool(Version(3, 5, 40)), v35, "x").is_ok()
        );
    }
}
