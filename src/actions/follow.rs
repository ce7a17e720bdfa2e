//! `follow`: the continuous change history. A long-running command (a systemd service runs
//! it) that watches every key from the revision after the newest full snapshot and writes
//! change segments (`crate::history`), each durable at most `--flush-interval` seconds after
//! the first change it holds, uploaded when a store is configured, encrypted when
//! recipients are set. A pipeline of stages: `plan` (where the history resumes, a full
//! snapshot first when there is none), `record` (watch, group by revision, flush), with
//! `full` (a new full snapshot in a child process) and `gap` (a compaction that outran it,
//! recorded explicitly) where they are needed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Unit;
use crate::error::{human_size, Error, IoContext};
use crate::etcd::{hex_id, Change, Client, Watched};
use crate::history::{self, Ev, Head, Named, Pending, Rev};
use crate::manifest::now_secs;

/// A segment is flushed at this many bytes of changes, whatever the interval.
const SEGMENT_BYTES: usize = 8 << 20;
/// Name of the lock (in `<target>/changes/`) that keeps a second follow out.
const LOCK: &str = ".follow.lock";

#[derive(Debug, Clone)]
pub struct FollowOptions {
    pub target: PathBuf,
    pub flush_interval: Duration,
    pub full_every: FullEvery,
}

/// When a new full snapshot starts: the changes since the last one pass an age or a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullEvery {
    pub age: Duration,
    pub bytes: u64,
}

pub use crate::cli::FULL_EVERY_DEFAULT;

impl FullEvery {
    /// `6h`, `512MiB`, or both separated by a comma.
    pub fn parse(text: &str) -> Result<FullEvery, Error> {
        let mut out = FullEvery {
            age: Duration::MAX,
            bytes: u64::MAX,
        };
        let bad = |why: &str| {
            Error::usage(format!(
                "--full-every `{}` {why}; give an age (`1h`, `30m`), a size (`256MiB`, `1GiB`) or \
                 both (`1h,256MiB`)",
                crate::error::bounded(text, 100)
            ))
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits
                .parse()
                .map_err(|_| bad("does not start with a number"))?;
            if n == 0 {
                return Err(bad("is zero"));
            }
            let unit = part[digits.len()..].trim().to_ascii_lowercase();
            let secs = |m: u64| Duration::from_secs(n.saturating_mul(m));
            match unit.as_str() {
                "s" => out.age = secs(1),
                "m" => out.age = secs(60),
                "h" => out.age = secs(3600),
                "d" => out.age = secs(86400),
                "kib" | "k" => out.bytes = n << 10,
                "mib" | "mb" => out.bytes = n << 20,
                "gib" | "gb" => out.bytes = n << 30,
                _ => return Err(bad(&format!("has the unknown unit `{unit}`"))),
            }
        }
        if out.age == Duration::MAX && out.bytes == u64::MAX {
            return Err(bad("is empty"));
        }
        Ok(out)
    }
}

impl TryFrom<crate::cli::FollowArgs> for FollowOptions {
    type Error = Error;
    fn try_from(a: crate::cli::FollowArgs) -> Result<FollowOptions, Error> {
        if a.flush_interval == 0 || a.flush_interval > 3600 {
            return Err(Error::usage(format!(
                "--flush-interval {} is out of range: give 1 to 3600 seconds",
                a.flush_interval
            )));
        }
        Ok(FollowOptions {
            target: a.target,
            flush_interval: Duration::from_secs(a.flush_interval),
            full_every: FullEvery::parse(&a.full_every)?,
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What follow last said of the history in `target` (the newest of its clusters'), and
/// whether a follow runs there now (it holds the lock).
pub fn seen(target: &Path) -> Option<(history::FollowState, bool)> {
    let root = target.join(history::DIR);
    let newest = std::fs::read_dir(&root)
        .ok()?
        .flatten()
        .filter_map(|e| history::read_state(&e.path()))
        .max_by_key(|s| s.through_ms)?;
    let running = crate::fsutil::open_regular_path(&root.join(LOCK)).is_ok_and(|f| {
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
    });
    Some((newest, running))
}

/// Where the history resumes.
struct Plan {
    cluster_id: u64,
    dir: crate::fsutil::Dir,
    /// The next revision to record.
    next: i64,
    prev_sha256: Option<String>,
    /// The sha256 of the full snapshot a new chain starts from.
    base_sha256: Option<String>,
    /// This unit's folder name in the store's history.
    tag: String,
    /// Bytes of segments since the newest full snapshot, and when that was taken.
    since_full: (u64, Instant),
    /// The member and its raft index when the plan was made.
    seen: (u64, u64),
    /// The last key put the history holds (from the last run's state).
    last_put: Option<(i64, String, String)>,
    _lock: crate::fsutil::UnitLock,
}

pub fn run(unit: &Unit<'_>, opts: &FollowOptions) -> Result<(), Error> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .ctx(|| "cannot handle SIGTERM".to_string())?;
    }
    let mut rolled_back = None;
    loop {
        let plan = match plan(unit, opts, &stop, rolled_back.take()) {
            Ok(p) => p,
            // Stopped before anything was recorded (during the first full snapshot): a stop.
            Err(_) if stop.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => return Err(e),
        };
        match record(unit, opts, plan, &stop)? {
            // etcd's data went back under the same cluster id: the history so far ends, and
            // a new one starts from a full snapshot (a chain never crosses a rollback).
            Ended::RolledBack(why) => rolled_back = Some(why),
            Ended::Stopped => return Ok(()),
        }
    }
}

/// How `record` ended without an error.
enum Ended {
    Stopped,
    RolledBack(String),
}

/// Whether etcd's data went back since follow last saw it: the revision below the one the
/// history holds, or the member's raft index below the one seen.
fn rollback(seen: (u64, u64), through: i64, now: &crate::etcd::Status) -> Option<String> {
    let (member, index) = seen;
    if now.revision < through {
        return Some(format!(
            "etcd is at revision {} though the history holds revision {through}",
            now.revision
        ));
    }
    if member == now.member_id && index > 0 && now.raft_index < index {
        return Some(format!(
            "member {}'s raft index went back from {index} to {}",
            hex_id(member),
            now.raft_index
        ));
    }
    None
}

/// Whether etcd no longer holds the last key put the history holds, as it was recorded: its
/// data went back (a rollback that has since gone past the same revisions). `None` when it
/// does, or when etcd cannot say (compacted, unreachable).
fn diverged(client: &Client, last_put: Option<&(i64, String, String)>) -> Option<String> {
    use base64::Engine;
    let (rev, key, sha) = last_put?;
    let k = base64::engine::general_purpose::STANDARD.decode(key).ok()?;
    let shown = String::from_utf8_lossy(&k).into_owned();
    match client.key_at(&k, *rev).ok()? {
        Ok(Some((m, v))) if m == *rev && history::sha256(&v) == *sha => None,
        Ok(_) => Some(format!(
            "key `{}` at revision {rev} is not what the history recorded",
            crate::error::bounded(&shown, 100)
        )),
        Err(why) if why.contains("future") => Some(format!(
            "etcd has not reached revision {rev}, which the history holds"
        )),
        Err(_) => None,
    }
}

/// Sets a cluster's history aside (`<cluster>.rolled-back-<ms>`, never read again by a
/// restore) and starts its dir anew, with a store folder of its own for the new chain.
fn set_aside(
    changes: &crate::fsutil::Dir,
    cluster: &str,
    tag: &str,
    why: &str,
) -> Result<crate::fsutil::Dir, Error> {
    let aside = format!("{cluster}.rolled-back-{}", now_ms());
    changes.rename_noreplace(cluster, changes, &aside)?;
    changes.sync()?;
    eprintln!(
        "etcd-actions follow: etcd was rolled back ({why}): the history so far is set aside in \
         `{}` and a new one starts from a full snapshot",
        changes.join(&aside).display()
    );
    let dir = changes.private_dir(cluster)?;
    dir.write_replacing(
        history::CHAIN,
        format!("{tag}@{}\n", now_ms()).as_bytes(),
        0o600,
    )?;
    Ok(dir)
}

/// Refuses a second follow on the target, finds where the history resumes (the last durable
/// segment, else the newest full snapshot), and takes a full snapshot when there is none.
fn plan(
    unit: &Unit<'_>,
    opts: &FollowOptions,
    stop: &AtomicBool,
    rolled_back: Option<String>,
) -> Result<Plan, Error> {
    let client = Client::new(&unit.config);
    let target = super::open_target(unit, &opts.target)?;
    unit.keys()?;
    let store = unit.store()?;
    // Every path below the target is opened by descriptor, never through a symlink, and
    // only directories and files of this user's are written (the target's owner may be
    // someone else).
    let changes = target.private_dir(history::DIR)?;
    let lock = crate::fsutil::UnitLock::acquire_in(&changes, LOCK, Duration::ZERO, "follow")
        .map_err(|e| match e {
            Error::Busy { holder, .. } => Error::Declined(format!(
                "another follow already records the history of `{}`{holder}; one follow per \
                 target: stop it first (systemctl stop {})",
                opts.target.display(),
                SERVICE
            )),
            other => other,
        })?;
    let status = client.status()?;
    let cluster = hex_id(status.cluster_id);
    let mut dir = changes.private_dir(&cluster)?;
    clean_temps(&dir);
    let unit_tag = history::unit_tag(&unit.name());
    // A rollback seen while recording, or since the last run (its state says how far the
    // history went and which raft index it saw).
    let state = history::read_state(dir.path()).filter(|s| s.cluster_id == cluster);
    let rolled_back = rolled_back.or_else(|| {
        let s = state.as_ref()?;
        rollback((s.member_id, s.raft_index), s.through_revision, &status)
            .or_else(|| diverged(&client, s.last_put.as_ref()))
    });
    if let Some(why) = &rolled_back {
        dir = set_aside(&changes, &cluster, &unit_tag, why)?;
    }
    let tag = history::chain_name(dir.path(), &unit_tag);
    let mine = history::list(target.path(), None, &unit_tag)?
        .into_iter()
        .find(|h| h.cluster_id == cluster && h.own)
        .unwrap_or_default();
    let base = match newest_full(unit, target.path(), store.as_ref(), &cluster) {
        Ok(b) => b,
        // The store being away: the target's own snapshots say where the history starts.
        Err(e) if store.is_some() => {
            eprintln!("etcd-actions follow: {e}; going by the snapshots in the target");
            newest_full(unit, target.path(), None, &cluster)?
        }
        Err(e) => return Err(e),
    };
    let (next, prev, base_sha256) = match mine.newest().filter(|_| rolled_back.is_none()) {
        Some(f) => {
            let bytes = history::read(f, None)?;
            // The chain goes on from the newest segment; a damaged one stops follow (its
            // error names the file: move it aside to start the history again from a full
            // snapshot).
            // An encrypted segment is never opened here: its name gives its range and the
            // link is the sha256 of its bytes, whatever identity follow holds (after a key
            // rotation the one it holds may not open older segments).
            if !f.named.encrypted {
                history::decode(&bytes, &f.named, unit.keys()?)?;
            }
            (f.named.last + 1, Some(history::sha256(&bytes)), None)
        }
        None => {
            let (rev, sha) = match base.clone().filter(|_| rolled_back.is_none()) {
                Some(b) => b,
                None => {
                    unit.log("no full snapshot of this cluster yet: taking one first");
                    full_snapshot(unit, &opts.target, stop)?
                }
            };
            // An empty db records revision 0; etcd serves it at revision 1. The chain's
            // first segment names the full snapshot it continues.
            (rev.max(1) + 1, None, sha)
        }
    };
    let since: u64 = mine
        .segments
        .iter()
        .filter(|f| base.as_ref().is_some_and(|b| f.named.first > b.0))
        .map(|f| f.size)
        .sum();
    unit.log(&format!(
        "follow: recording cluster {cluster} from revision {next} into `{}`{}",
        dir.path().display(),
        if store.is_some() {
            " and the store"
        } else {
            ""
        }
    ));
    Ok(Plan {
        cluster_id: status.cluster_id,
        seen: (status.member_id, status.raft_index),
        last_put: if rolled_back.is_some() {
            None
        } else {
            state.and_then(|s| s.last_put)
        },
        dir,
        next,
        prev_sha256: prev,
        base_sha256,
        tag,
        since_full: (since, Instant::now()),
        _lock: lock,
    })
}

/// Removes the temp files of a follow that was killed while writing.
fn clean_temps(dir: &crate::fsutil::Dir) {
    for name in dir.names() {
        if name.starts_with(".tmp-") || name.starts_with(&format!(".{}.tmp-", history::STATE)) {
            let _ = dir.unlink(&name);
        }
    }
}

/// The revision and sha256 of the newest complete full snapshot of `cluster`, in the target
/// or the store.
fn newest_full(
    unit: &Unit<'_>,
    target: &Path,
    store: Option<&crate::store::Store>,
    cluster: &str,
) -> Result<Option<(i64, Option<String>)>, Error> {
    Ok(crate::catalog::list(unit, target, store)?
        .into_iter()
        .filter(|e| {
            !e.incomplete
                && e.ours
                && crate::catalog::is_archive_name(&e.id)
                && e.cluster_id.as_deref() == Some(cluster)
        })
        .filter_map(|e| Some((e.revision?, e.sha256)))
        .max_by_key(|(r, _)| *r))
}

/// Takes a full snapshot with this program's `snapshot` in a child process (the settings in
/// force passed in its environment), and returns its revision and sha256.
fn full_snapshot(
    unit: &Unit<'_>,
    target: &Path,
    stop: &AtomicBool,
) -> Result<(i64, Option<String>), Error> {
    let mut child = spawn_full(unit, target)?;
    loop {
        if let Some(done) = child
            .try_wait()
            .ctx(|| "cannot wait for the snapshot".into())?
        {
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                use std::io::Read;
                let _ = o.read_to_string(&mut out);
            }
            if !done.success() {
                return Err(Error::Declined(format!(
                    "the full snapshot follow needs failed ({done}); see its output above, fix \
                     it, and start follow again"
                )));
            }
            return snapshot_revision(&out);
        }
        if stop.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Declined(
                "stopped while taking a full snapshot".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_full(unit: &Unit<'_>, target: &Path) -> Result<std::process::Child, Error> {
    let exe = std::env::current_exe().ctx(|| "cannot find this program's path".into())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["snapshot", "--target"]).arg(target);
    for (k, v) in unit.settings.env_pairs() {
        cmd.env(k, v);
    }
    for (k, v) in unit.settings.s3.credentials.env_pairs() {
        cmd.env(k, v);
    }
    // The child reports in YAML on stdout; its errors go to follow's stderr (the journal).
    cmd.env_remove("JUJU_ACTION_NAME")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    cmd.spawn().map_err(|e| Error::CommandInvoke {
        command: crate::process::display(&cmd),
        source: e,
    })
}

/// The revision and sha256 of a finished full snapshot, from its results.
fn finished_full(mut child: std::process::Child) -> Result<(i64, String), Error> {
    use std::io::Read;
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    match snapshot_revision(&out)? {
        (r, Some(sha)) => Ok((r.max(1), sha)),
        _ => Err(Error::BadOutput {
            command: "etcd-actions snapshot".into(),
            problem: "no snapshot.sha256 in its results".into(),
        }),
    }
}

fn snapshot_revision(yaml: &str) -> Result<(i64, Option<String>), Error> {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap_or_default();
    let snap = v.get("results").and_then(|r| r.get("snapshot"));
    let sha = snap
        .and_then(|s| s.get("sha256"))
        .and_then(|s| s.as_str())
        .map(str::to_string);
    snap.and_then(|s| s.get("revision"))
        .and_then(|r| {
            r.as_i64()
                .or_else(|| r.as_str().and_then(|s| s.parse().ok()))
        })
        .map(|r| (r, sha))
        .ok_or_else(|| Error::BadOutput {
            command: "etcd-actions snapshot".into(),
            problem: "no snapshot.revision in its results".into(),
        })
}

/// The recorder: pending changes, the chain, the uploads.
struct Recorder<'a> {
    unit: &'a Unit<'a>,
    cluster: String,
    dir: crate::fsutil::Dir,
    /// The last revision made durable.
    flushed_to: i64,
    prev_sha256: Option<String>,
    /// The full snapshot the chain starts from, named by the first segment.
    base_sha256: Option<String>,
    /// Full snapshots taken meanwhile, named by the next segment written.
    new_bases: Vec<(i64, String)>,
    /// The member watched and its raft index when last seen (rollbacks show there).
    seen: (u64, u64),
    /// The last key put that was received (see `FollowState::last_put`).
    last_put: Option<(i64, String, String)>,
    pending: Pending,
    first_at: Option<Instant>,
    uploads: Option<Uploader>,
    since_full: (u64, Instant),
    segments: u64,
    /// How long the last segment's first change waited to be durable.
    last_flush_ms: u64,
    /// How long the last segment took to encode and make durable.
    last_write: Duration,
    /// Unix ms until which the history is known complete: the time a linearizable read was
    /// asked whose revision the history holds durably. Nothing else advances it.
    confirmed_ms: u64,
    /// A linearizable read's revision not yet durable here, and when it was asked.
    awaiting: Option<(i64, u64)>,
}

impl Recorder<'_> {
    /// The head of the next segment in the chain.
    fn head(&self, first: i64, last: i64, revs: &[Rev]) -> Head {
        Head {
            format: history::FORMAT.into(),
            cluster_id: self.cluster.clone(),
            first,
            last,
            prev_sha256: self.prev_sha256.clone(),
            base_sha256: if self.prev_sha256.is_none() {
                self.base_sha256.clone()
            } else {
                None
            },
            bases: self.new_bases.clone(),
            gap: false,
            revisions: revs.len() as u64,
            events: revs.iter().map(|r| r.ev.len() as u64).sum(),
        }
    }

    fn received(&self) -> i64 {
        self.pending.revs.last().map_or(self.flushed_to, |r| r.r)
    }

    /// Writes the pending changes as one durable segment (nothing when there are none).
    fn flush(&mut self) -> Result<(), Error> {
        let Some(last) = self.pending.revs.last().map(|r| r.r) else {
            return Ok(());
        };
        let first = self.flushed_to + 1;
        let revs = std::mem::take(&mut self.pending.revs);
        self.pending.bytes = 0;
        let keys = self.unit.keys()?;
        let head = self.head(first, last, &revs);
        let ms = (revs[0].t, revs[revs.len() - 1].t);
        let named = Named::new(&self.cluster, first, last, ms, false, keys.encrypts());
        let write_started = Instant::now();
        let bytes = history::encode(&head, &revs, keys)?;
        if let Err(e) = self.publish(&named, &bytes) {
            // Kept for the next try: nothing is lost while the process lives.
            self.pending.revs = revs;
            return Err(e);
        }
        self.last_write = write_started.elapsed();
        crate::points::crash_point("follow-after-segment");
        let lag = now_ms().saturating_sub(ms.0);
        eprintln!(
            "etcd-actions follow: segment {first}..{last} ({} revisions, {}) durable, {:.1}s after \
             its first change",
            head.revisions,
            human_size(bytes.len() as u64),
            lag as f64 / 1000.0
        );
        self.since_full.0 += bytes.len() as u64;
        self.segments += 1;
        self.prev_sha256 = Some(history::sha256(&bytes));
        self.flushed_to = last;
        // Named again until a segment past it is written (prune keeps only segments past a
        // kept snapshot's revision: one of them must name it).
        self.new_bases.retain(|(r, _)| *r >= last);
        self.first_at = None;
        self.last_flush_ms = lag;
        self.confirm_awaited();
        self.write_state();
        Ok(())
    }

    /// A linearizable read's answer whose revision is now durable confirms its time.
    fn confirm_awaited(&mut self) {
        if let Some((rev, asked)) = self.awaiting {
            if rev <= self.flushed_to {
                self.confirmed_ms = self.confirmed_ms.max(asked);
                self.awaiting = None;
            }
        }
    }

    /// Asks the cluster (a linearizable read) how far it is; the history is complete until
    /// the time of asking once it holds that revision durably. A member cut off from the
    /// quorum cannot answer: the history's end then stays where it was (and the stall alert
    /// fires), however quiet the watch is.
    fn confirm(&mut self, watch: &mut crate::etcd::Watch, wait: Duration) {
        let asked = now_ms();
        match watch.linearizable_revision(wait) {
            Ok(rev) => {
                self.awaiting = Some((rev, asked));
                if self.pending.is_empty() {
                    self.confirm_awaited();
                }
            }
            Err(e) => eprintln!(
                "etcd-actions follow: cannot confirm the history is complete: {e}; it stays \
                 complete through {}",
                crate::replay::show_ms(self.confirmed_ms)
            ),
        }
    }

    fn publish(&mut self, named: &Named, bytes: &[u8]) -> Result<(), Error> {
        // The tests' full disk (a real one maps the same way).
        let full = || -> Result<(), Error> {
            fail::fail_point!("follow-disk-full", |_| Err(Error::io(
                "cannot write a change segment",
                std::io::Error::from_raw_os_error(libc::ENOSPC)
            )));
            Ok(())
        };
        full()
            .and_then(|()| history::publish(&self.dir, &named.name, bytes))
            .map_err(|e| match e {
                Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                    Error::NoSpace {
                        path: self.dir.path().to_path_buf(),
                        action: "writing the next change segment".into(),
                        need: human_size(bytes.len() as u64),
                        available: self
                            .dir
                            .free_bytes()
                            .map(human_size)
                            .unwrap_or_else(|_| "unknown".into()),
                    }
                }
                other => other,
            })?;
        if let Some(u) = &self.uploads {
            let _ = u.tx.send(self.dir.join(&named.name));
        }
        Ok(())
    }

    /// Records revisions `first..=last` as lost, chained like any segment.
    fn gap(&mut self, last: i64) -> Result<(), Error> {
        self.flush()?;
        let first = self.flushed_to + 1;
        if last < first {
            return Ok(());
        }
        let keys = self.unit.keys()?;
        let head = Head {
            gap: true,
            ..self.head(first, last, &[])
        };
        let t = now_ms();
        let named = Named::new(&self.cluster, first, last, (t, t), true, keys.encrypts());
        let bytes = history::encode(&head, &[], keys)?;
        self.publish(&named, &bytes)?;
        eprintln!(
            "etcd-actions follow: revisions {first}..{last} were compacted before they were \
             recorded: recorded as a gap; the full snapshot at {last} continues the history"
        );
        self.prev_sha256 = Some(history::sha256(&bytes));
        self.flushed_to = last;
        // Named again until a segment past it is written (prune keeps only segments past a
        // kept snapshot's revision: one of them must name it).
        self.new_bases.retain(|(r, _)| *r >= last);
        self.write_state();
        Ok(())
    }

    /// Adds a watch message's changes, one `Rev` per revision.
    fn add(
        &mut self,
        changes: Vec<Change>,
        watch: &mut crate::etcd::Watch,
        leases: &mut HashSet<i64>,
    ) -> Result<(), Error> {
        let t = now_ms();
        for c in changes {
            if c.mod_revision <= self.received()
                && self.pending.revs.last().map(|r| r.r) != Some(c.mod_revision)
            {
                // Already recorded (never expected: the watch resumes after the last one).
                continue;
            }
            if !c.delete {
                use base64::Engine;
                self.last_put = Some((
                    c.mod_revision,
                    base64::engine::general_purpose::STANDARD.encode(&c.key),
                    history::sha256(&c.value),
                ));
            }
            let mut lease = None;
            if c.lease != 0 && leases.insert(c.lease) {
                // The watch carries no lease grants: the TTL is asked for once per lease.
                let ttl = watch.lease_ttl(c.lease)?.unwrap_or(0);
                lease = Some((c.lease, ttl));
            }
            match self.pending.revs.last_mut() {
                Some(r) if r.r == c.mod_revision => {
                    r.ev.push(Ev::of(&c));
                    r.leases.extend(lease);
                }
                _ => {
                    self.pending.push(Rev {
                        r: c.mod_revision,
                        t,
                        ev: vec![Ev::of(&c)],
                        leases: lease.into_iter().collect(),
                    });
                    continue;
                }
            }
            self.pending.bytes += c.key.len() + c.value.len() + 64;
        }
        if leases.len() > 1_000_000 {
            leases.clear();
        }
        if self.first_at.is_none() && !self.pending.is_empty() {
            self.first_at = Some(Instant::now());
        }
        Ok(())
    }

    /// The state file: how far the history goes and when that was known; and follow's
    /// textfile for node_exporter.
    fn write_state(&self) {
        let lag_ms = self.last_flush_ms;
        if let Some(dir) = crate::health::metrics_dir(self.unit.settings, false) {
            let m = crate::health::FollowMetrics {
                lag_seconds: lag_ms as f64 / 1000.0,
                durable_revision: self.flushed_to,
                complete_through: self.confirmed_ms as f64 / 1000.0,
                segments: self.segments,
            };
            if let Err(e) = crate::health::write_textfile(
                &dir,
                crate::health::FOLLOW_METRICS_FILE,
                &crate::health::follow_metrics(&m),
            ) {
                eprintln!("etcd-actions follow: cannot write its metrics: {e}");
            }
        }
        let state = history::FollowState {
            pid: std::process::id(),
            cluster_id: self.cluster.clone(),
            through_revision: self.flushed_to,
            through_ms: self.confirmed_ms,
            segments_written: self.segments,
            last_flush_lag_ms: lag_ms,
            member_id: self.seen.0,
            raft_index: self.seen.1,
            last_put: self.last_put.clone(),
        };
        if let Err(e) = history::write_state(&self.dir, &state) {
            eprintln!("etcd-actions follow: cannot write its state: {e}");
        }
    }
}

/// The background uploader: segments to upload go in; `finish` waits for the last.
struct Uploader {
    tx: std::sync::mpsc::Sender<PathBuf>,
    thread: std::thread::JoinHandle<()>,
}

impl Uploader {
    fn finish(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

/// Uploads published segments in the background (the store's pace never holds up the
/// watch); a failed upload is tried again with the next one, and at the next start.
fn uploader(
    unit: &Unit<'_>,
    dir: &Path,
    cluster: &str,
    tag: &str,
) -> Result<Option<Uploader>, Error> {
    let Some(store) = unit.store()? else {
        return Ok(None);
    };
    let folder = history::store_folder(&unit.store_folder(&store), cluster, tag);
    let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
    // What the store lacks from an earlier run.
    // The store being away does not stop the history: what it lacks is uploaded at the next
    // start.
    let there: Option<HashSet<String>> = match store.names(&folder) {
        Ok(names) => Some(names.into_iter().map(|(n, _)| n).collect()),
        Err(e) => {
            eprintln!("etcd-actions follow: {e}; segments are written locally and uploaded as the store answers");
            None
        }
    };
    if let (Some(there), Ok(rd)) = (there, std::fs::read_dir(dir)) {
        let mut missing: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| Named::parse(n).is_some() && !there.contains(n))
            })
            .collect();
        missing.sort();
        for p in missing {
            let _ = tx.send(p);
        }
    }
    let thread = std::thread::Builder::new()
        .name("segment-upload".into())
        .spawn(move || {
            let mut retry: Vec<PathBuf> = Vec::new();
            while let Ok(p) = rx.recv() {
                retry.push(p);
                retry.retain(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let Ok(bytes) = read_segment(p) else {
                        return false;
                    };
                    let put = store.put_once(&format!("{folder}/{name}"), bytes);
                    for note in crate::store::take_notes() {
                        eprintln!("etcd-actions follow: {note}");
                    }
                    match put {
                        Ok(()) => false,
                        Err(e) => {
                            eprintln!("etcd-actions follow: upload of {name} failed, tried again with the next segment: {e}");
                            true
                        }
                    }
                });
            }
            if !retry.is_empty() {
                eprintln!(
                    "etcd-actions follow: {} segment(s) not uploaded yet: the next follow \
                     uploads them",
                    retry.len()
                );
            }
        })
        .ctx(|| "cannot start the segment uploader".into())?;
    Ok(Some(Uploader { tx, thread }))
}

/// A published segment's bytes, for its upload: a regular file (no symlink followed), bounded.
fn read_segment(p: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = crate::fsutil::open_regular_path(p).map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    f.take(history::FILE_MAX).read_to_end(&mut out)?;
    Ok(out)
}

pub const SERVICE: &str = "etcd-actions-follow";

/// Watches and records until SIGTERM (flush, exit 0) or a failure (flushed first).
fn record(
    unit: &Unit<'_>,
    opts: &FollowOptions,
    plan: Plan,
    stop: &AtomicBool,
) -> Result<Ended, Error> {
    let client = Client::new(&unit.config);
    let cluster = hex_id(plan.cluster_id);
    let uploads = uploader(unit, plan.dir.path(), &cluster, &plan.tag)?;
    // What the last run confirmed stands for the revisions it made durable.
    let confirmed_ms = history::read_state(plan.dir.path())
        .filter(|s| s.cluster_id == cluster && s.through_revision < plan.next)
        .map_or(0, |s| s.through_ms);
    let mut rec = Recorder {
        unit,
        cluster: cluster.clone(),
        dir: plan.dir,
        flushed_to: plan.next - 1,
        prev_sha256: plan.prev_sha256.clone(),
        base_sha256: plan.base_sha256.clone(),
        new_bases: Vec::new(),
        seen: plan.seen,
        last_put: plan.last_put.clone(),
        pending: Pending::default(),
        first_at: None,
        uploads,
        since_full: plan.since_full,
        segments: 0,
        last_flush_ms: 0,
        last_write: Duration::ZERO,
        confirmed_ms,
        awaiting: None,
    };
    rec.write_state();
    let mut leases = HashSet::new();
    let mut backoff = Duration::from_millis(200);
    let mut full: Option<std::process::Child> = None;
    // The first confirmation right after the watch starts (the history's end is then known
    // without waiting an interval).
    let mut last_progress = Instant::now()
        .checked_sub(opts.flush_interval)
        .unwrap_or_else(Instant::now);
    'connect: loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut watch = match connect(&client, opts, &mut rec, stop, &mut backoff, plan.cluster_id)?
        {
            Connected::Watch(w) => w,
            Connected::Retry => continue,
            Connected::RolledBack(why) => {
                if let Some(u) = rec.uploads.take() {
                    u.finish();
                }
                return Ok(Ended::RolledBack(why));
            }
        };
        loop {
            if stop.load(Ordering::SeqCst) {
                break 'connect;
            }
            let wait = match rec.first_at {
                Some(t) => flush_at(opts, &rec).saturating_sub(t.elapsed()),
                None => Duration::from_millis(500),
            }
            .clamp(Duration::from_millis(10), Duration::from_millis(500));
            match watch.next(wait) {
                Ok(Some(Watched::Changes(cs))) => {
                    backoff = Duration::from_millis(200);
                    rec.add(cs, &mut watch, &mut leases)?
                }
                Ok(Some(Watched::Progress(_))) => backoff = Duration::from_millis(200),
                Ok(None) => {}
                Ok(Some(Watched::Compacted(c))) => {
                    let from = rec.received() + 1;
                    outran(unit, opts, &mut rec, stop, c, from)?;
                    continue 'connect;
                }
                Err(e) => {
                    // Named as it is (a message too large is not "etcd is not reachable"),
                    // and never retried in a hot loop.
                    eprintln!(
                        "etcd-actions follow: {e}; resuming after revision {} in {:.1}s",
                        rec.received(),
                        backoff.as_secs_f64()
                    );
                    back_off(&mut rec, opts, stop, &mut backoff)?;
                    continue 'connect;
                }
            }
            if due(&rec, opts) {
                rec.flush()?;
            }
            if last_progress.elapsed() >= opts.flush_interval {
                // The history's end advances only on the cluster's word (see `confirm`).
                last_progress = Instant::now();
                rec.confirm(
                    &mut watch,
                    opts.flush_interval
                        .clamp(Duration::from_secs(1), Duration::from_secs(5)),
                );
                rec.write_state();
            }
            // A new full snapshot bounds the replay: after an age or a size of changes.
            match full.as_mut().map(std::process::Child::try_wait) {
                Some(Ok(Some(st))) => {
                    if !st.success() {
                        eprintln!("etcd-actions follow: the periodic full snapshot failed ({st}); trying again later");
                    }
                    // The next segment names it: a restore may start from it.
                    rec.new_bases
                        .extend(full.take().and_then(|c| finished_full(c).ok()));
                    rec.since_full = (0, Instant::now());
                }
                Some(_) => {}
                None => {
                    let (bytes, at) = rec.since_full;
                    if bytes >= opts.full_every.bytes || at.elapsed() >= opts.full_every.age {
                        eprintln!(
                            "etcd-actions follow: {} of changes in {:.0}s since the last full \
                             snapshot: taking a new one",
                            human_size(bytes),
                            at.elapsed().as_secs_f64()
                        );
                        full = Some(spawn_full(unit, &opts.target)?);
                        rec.since_full = (0, Instant::now());
                    }
                }
            }
        }
    }
    rec.flush()?;
    if let Some(mut c) = full {
        let _ = c.wait();
    }
    if let Some(u) = rec.uploads.take() {
        u.finish();
    }
    eprintln!(
        "etcd-actions follow: stopped; the history is durable up to revision {} ({} segments this run, {})",
        rec.flushed_to,
        rec.segments,
        crate::manifest::rfc3339(now_secs())
    );
    rec.write_state();
    Ok(Ended::Stopped)
}

/// What a (re)connection gave.
enum Connected {
    Watch(Box<crate::etcd::Watch>),
    /// etcd did not answer (waited already): try again.
    Retry,
    RolledBack(String),
}

/// Checks that etcd is the same cluster and was not rolled back since it was last seen (the
/// pending changes are flushed first: they belong to the history so far), then watches from
/// the revision after the last one received.
fn connect(
    client: &Client,
    opts: &FollowOptions,
    rec: &mut Recorder<'_>,
    stop: &AtomicBool,
    backoff: &mut Duration,
    cluster_id: u64,
) -> Result<Connected, Error> {
    let unit = rec.unit;
    let checked = client.status().and_then(|st| {
        if st.cluster_id != cluster_id {
            rec.flush()?;
            return Err(other_cluster(&rec.cluster, st.cluster_id));
        }
        Ok(st)
    });
    let from = rec.received() + 1;
    let watched = checked.and_then(|st| {
        match rollback(rec.seen, rec.received(), &st)
            .or_else(|| diverged(client, rec.last_put.as_ref()))
        {
            Some(why) => Ok(Err(why)),
            None => {
                rec.seen = (st.member_id, st.raft_index);
                client.watch(from).map(Ok)
            }
        }
    });
    match watched {
        Ok(Ok(w)) => Ok(Connected::Watch(Box::new(w))),
        Ok(Err(why)) => {
            rec.flush()?;
            Ok(Connected::RolledBack(why))
        }
        Err(Error::Compacted(c)) => {
            outran(unit, opts, rec, stop, c, from)?;
            Ok(Connected::Retry)
        }
        Err(e @ Error::Declined(_)) => Err(e),
        Err(e) => {
            // etcd restarting, a leader change, a network blip: keep what is pending
            // (flushed on time) and resume after the last change received.
            eprintln!(
                "etcd-actions follow: {e}; reconnecting in {:.1}s",
                backoff.as_secs_f64()
            );
            back_off(rec, opts, stop, backoff)?;
            Ok(Connected::Retry)
        }
    }
}

/// A compaction outran the history (it was down, or too slow): what it had is flushed, a
/// full snapshot is taken, and the revisions between are recorded as an explicit gap.
fn outran(
    unit: &Unit<'_>,
    opts: &FollowOptions,
    rec: &mut Recorder<'_>,
    stop: &AtomicBool,
    compacted: i64,
    from: i64,
) -> Result<(), Error> {
    unit.log(&format!(
        "follow: etcd compacted up to revision {compacted}, past revision {from}: taking a full \
         snapshot"
    ));
    rec.flush()?;
    // A restore replaced the cluster (its bumped revisions look like a compaction): that is
    // the end of this history, not a gap in it.
    let now = Client::new(&unit.config).status()?;
    if hex_id(now.cluster_id) != rec.cluster {
        return Err(other_cluster(&rec.cluster, now.cluster_id));
    }
    let (rev, sha) = full_snapshot(unit, &opts.target, stop)?;
    let rev = rev.max(1);
    rec.new_bases.extend(sha.map(|s| (rev, s)));
    rec.gap(rev)?;
    rec.since_full = (0, Instant::now());
    Ok(())
}

fn other_cluster(cluster: &str, now: u64) -> Error {
    Error::Declined(format!(
        "etcd now serves cluster {} instead of {cluster} (a restore?): this history ends \
         here; start follow again to record the new cluster from a full snapshot",
        hex_id(now)
    ))
}

/// Waits `backoff` (flushing what falls due meanwhile, and stopping early on a signal), then
/// doubles it up to 5 s.
fn back_off(
    rec: &mut Recorder<'_>,
    opts: &FollowOptions,
    stop: &AtomicBool,
    backoff: &mut Duration,
) -> Result<(), Error> {
    let until = Instant::now() + *backoff;
    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
        if due(rec, opts) {
            rec.flush()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    Ok(())
}

fn due(rec: &Recorder<'_>, opts: &FollowOptions) -> bool {
    rec.pending.bytes >= SEGMENT_BYTES
        || rec
            .first_at
            .is_some_and(|t| t.elapsed() >= flush_at(opts, rec))
}

/// When a segment's write starts, after its first change: early enough that it is durable
/// by the flush interval (a tenth of it, at least the last write's time twice and 200 ms,
/// is left for encoding, writing and fsync, and for the change's way from etcd).
fn flush_at(opts: &FollowOptions, rec: &Recorder<'_>) -> Duration {
    let margin = (opts.flush_interval / 10)
        .max(Duration::from_millis(200))
        .max(rec.last_write * 2)
        .min(opts.flush_interval / 2);
    opts.flush_interval - margin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_every_parses() {
        let f = FullEvery::parse(FULL_EVERY_DEFAULT).unwrap();
        assert_eq!(f.age, Duration::from_secs(3600));
        assert_eq!(f.bytes, 128 << 20);
        assert_eq!(FullEvery::parse("30m").unwrap().bytes, u64::MAX);
        for bad in ["", "0h", "1x", "h"] {
            assert!(FullEvery::parse(bad).is_err(), "{bad}");
        }
    }
}
