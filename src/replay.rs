//! A restore to a point: which full snapshot and which change segments reach it (`resolve`),
//! and the replay of those changes into a throwaway etcd on the staged data (`replay`),
//! before anything of the live etcd is stopped.
//!
//! Each recorded revision is applied as one txn, so every key's create revision, mod
//! revision and version come out as they were; the revision etcd gives each txn is checked
//! against the recorded one, so a replay that would diverge stops instead. Leases first seen
//! in the history are granted with their recorded ids and TTLs, and every lease is kept
//! alive while the replay runs, so that none expires and deletes keys at a revision of its
//! own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::catalog::Entry;
use crate::config::ClientTls;
use crate::error::{Error, IoContext};
use crate::etcd::{Client, OfflineTool, Throwaway};
use crate::history::{self, Found, History};
use crate::process::{end_recorded, Guarded};
use crate::unit::Unit;

/// Where the replay's throwaway etcd is recorded while it runs.
pub const RECORD: &str = "replay.pid";

/// The point asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    Revision(i64),
    /// Unix milliseconds, and the text given.
    Time(i64, String),
}

/// What `resolve` chose.
#[derive(Debug, Clone)]
pub struct Point {
    pub cluster_id: String,
    pub revision: i64,
    /// The full snapshot the replay starts from.
    pub base: Entry,
    pub base_revision: i64,
    /// The segments that hold `base_revision + 1 ..= revision`, in chain order.
    pub segments: Vec<Found>,
    /// How the point was asked for, for messages and results.
    pub asked: String,
}

/// The point the `to-revision` and `to-time` params ask for (`None`: neither given);
/// refuses both at once, a revision below 1, and a time that is not RFC 3339.
pub fn wanted(to_revision: Option<i64>, to_time: Option<&str>) -> Result<Option<Wanted>, Error> {
    Ok(Some(match (to_revision, to_time) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(Error::usage(
                "to-revision and to-time both given: give one point",
            ))
        }
        (Some(r), None) if r < 1 => {
            return Err(Error::usage(format!(
                "to-revision {r} is not a revision: revisions start at 1"
            )))
        }
        (Some(r), None) => Wanted::Revision(r),
        (None, Some(t)) => match parse_rfc3339_ms(t) {
            Some(ms) => Wanted::Time(ms, t.trim().to_string()),
            None => {
                return Err(Error::usage(format!(
                    "to-time `{}` is not an RFC 3339 time; write it as `2026-11-30T14:05:00Z` (or with an offset, `+01:00`)",
                    crate::error::bounded(t, 100)
                )))
            }
        },
    }))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` into Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    // Only ASCII is a time (slicing by bytes below never splits a character).
    if !s.is_ascii()
        || b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let field = |r: std::ops::Range<usize>, max: i64| {
        let text = &s[r];
        let v: i64 = text.parse().ok()?;
        (text.bytes().all(|c| c.is_ascii_digit()) && v <= max).then_some(v)
    };
    field(0..4, 9999)?;
    if field(5..7, 12)? == 0 || field(8..10, 31)? == 0 {
        return None;
    }
    field(11..13, 23)?;
    field(14..16, 59)?;
    field(17..19, 60)?;
    let secs = crate::retention::parse_time(&s[..19])?;
    let mut rest = &s[19..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            return None;
        }
        let padded = format!("{digits:0<3}");
        ms = padded[..3].parse().ok()?;
        rest = &frac[digits.len()..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = rest[1..].split_once(':')?;
            if h.len() != 2
                || m.len() != 2
                || !(h.to_owned() + m).bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            let (h, m) = (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?);
            // RFC 3339: an offset is at most 23:59.
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
    };
    Some((secs - offset) * 1000 + ms)
}

/// A time in milliseconds as RFC 3339 with milliseconds.
pub fn show_ms(ms: u64) -> String {
    let base = crate::manifest::rfc3339(ms / 1000);
    format!("{}.{:03}Z", base.trim_end_matches('Z'), ms % 1000)
}

/// Describes what a history covers, for a refusal.
fn coverage(h: &History, fulls: &[&Entry]) -> String {
    let (spans, gaps) = h.spans();
    let mut parts: Vec<String> = spans
        .iter()
        .map(|s| {
            format!(
                "revisions {}–{} ({} – {})",
                s.from,
                s.to,
                show_ms(s.from_ms),
                show_ms(s.to_ms)
            )
        })
        .collect();
    if let Some(oldest) = fulls.iter().filter_map(|e| e.revision).min() {
        parts.push(format!("full snapshots from revision {oldest}"));
    }
    for (a, b) in gaps {
        parts.push(format!("lost revisions {a}–{b}"));
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join("; ")
    }
}

/// Chooses the cluster, the revision, the newest full snapshot at or below it and the
/// segments from there, and checks the chain is continuous by the names. Refuses a point
/// outside the recorded history, naming what it covers.
pub fn resolve(
    unit: &Unit<'_>,
    target: &Path,
    store: Option<&crate::store::Store>,
    wanted: &Wanted,
    from_app: Option<&str>,
) -> Result<Point, Error> {
    let folder = store.map(|s| match from_app {
        Some(app) => s.cfg.folder(app),
        None => unit.store_folder(s),
    });
    let histories = history::list(
        target,
        store.zip(folder.as_deref()),
        &history::unit_tag(&unit.name()),
    )?;
    let entries = crate::catalog::list_in(unit, target, store, from_app)?;
    let live = Client::new(&unit.config)
        .status()
        .ok()
        .map(|s| crate::etcd::hex_id(s.cluster_id));
    // The live cluster's history first, this unit's own chain before other units', then
    // the one recorded last.
    let mut order: Vec<&History> = histories.iter().collect();
    order.sort_by_key(|h| {
        (
            Some(&h.cluster_id) != live.as_ref(),
            !h.own,
            std::cmp::Reverse(h.newest().map_or(0, |f| f.named.last_ms)),
        )
    });
    if order.is_empty() {
        return Err(Error::History(format!(
            "there is no change history in `{}`{}: `etcd-actions follow` (the charm's \
             continuous-backup option) records it; without it, restore a full snapshot by \
             backup-id",
            target.join(history::DIR).display(),
            if store.is_some() {
                " nor in the store"
            } else {
                ""
            }
        )));
    }
    let mut refusals = Vec::new();
    for h in order {
        let fulls: Vec<&Entry> = entries
            .iter()
            .filter(|e| {
                !e.incomplete
                    && e.ours
                    && crate::catalog::is_archive_name(&e.id)
                    && e.cluster_id.as_deref() == Some(h.cluster_id.as_str())
                    && e.revision.is_some()
            })
            .collect();
        let read = |f: &Found| -> Result<(history::Head, Vec<history::Rev>), Error> {
            let bytes = history::read(f, store)?;
            history::decode(&bytes, &f.named, unit.keys()?)
        };
        let head = |f: &Found| -> Result<history::Head, Error> {
            let bytes = history::read(f, store)?;
            history::decode_head(&bytes, &f.named, unit.keys()?)
        };
        match point_in(h, &fulls, wanted, target, &read, &head)? {
            Ok(p) => {
                let chain: Vec<&Found> = p.segments.iter().collect();
                history::check_trust(h, &chain, store, unit.keys()?)?;
                return Ok(p);
            }
            Err(why) => refusals.push(format!(
                "cluster {}: {why}; the history covers {}",
                h.cluster_id,
                coverage(h, &fulls)
            )),
        }
    }
    let asked = match wanted {
        Wanted::Revision(r) => format!("revision {r}"),
        Wanted::Time(_, t) => format!("time {t}"),
    };
    Err(Error::History(format!(
        "{asked} is outside the recorded history, nothing was changed: {}. Pick a point inside \
         it (list-backups shows the history)",
        refusals.join("; ")
    )))
}

/// A full snapshot taken while this unit's own local chain was recorded (a scheduled
/// backup, which the chain does not name): its time is at or after the chain's first local
/// segment. A rollback sets the local chain aside, so a snapshot of the timeline before it
/// is always older than the local chain.
fn taken_during_own(h: &History, base: &Entry) -> bool {
    let start = h
        .segments
        .iter()
        .filter(|f| f.path.is_some())
        .map(|f| f.named.first_ms)
        .min();
    let taken = parse_rfc3339_ms(&base.time).and_then(|t| u64::try_from(t).ok());
    h.own && base.path.is_some() && matches!((start, taken), (Some(s), Some(t)) if t >= s)
}

/// Reads and decodes one segment.
type Read<'a> = dyn Fn(&Found) -> Result<(history::Head, Vec<history::Rev>), Error> + 'a;
/// Reads one segment's head only.
type ReadHead<'a> = dyn Fn(&Found) -> Result<history::Head, Error> + 'a;

fn point_in(
    h: &History,
    fulls: &[&Entry],
    wanted: &Wanted,
    target: &Path,
    read: &Read,
    head: &ReadHead,
) -> Result<Result<Point, String>, Error> {
    let (revision, asked) = match wanted {
        Wanted::Revision(r) => (*r, format!("revision {r}")),
        Wanted::Time(ms, text) => {
            let Ok(ms) = u64::try_from(*ms) else {
                return Ok(Err("the time is before 1970".to_string()));
            };
            let rev = match time_point(h, fulls, ms, text, target, read)? {
                Ok(r) => r,
                Err(why) => return Ok(Err(why)),
            };
            (rev, format!("time {text} (revision {rev})"))
        }
    };
    let mut bases: Vec<&&Entry> = fulls
        .iter()
        .filter(|e| e.revision.is_some_and(|r| r <= revision))
        .collect();
    bases.sort_by_key(|e| std::cmp::Reverse(e.revision));
    let mut last_err = format!("no full snapshot at or below revision {revision}");
    for base in bases {
        // An empty db records revision 0; etcd serves it at revision 1.
        let r = base.revision.expect("filtered").max(1);
        match h.chain(r + 1, revision) {
            Ok(chain) => {
                // Only a full snapshot the history names (a chain's start, or one taken
                // while it was recorded): a snapshot of another timeline of the cluster at
                // the same revision (after a rollback) is never spliced onto this one.
                let tied = history::names_base(h, r, base.sha256.as_deref(), head)?
                    || match chain.first() {
                        Some(first) if first.named.first == r + 1 => {
                            history::legacy_start(first, &head(first)?)
                        }
                        _ => false,
                    }
                    || taken_during_own(h, base);
                if !tied {
                    last_err = format!(
                        "the history does not name the full snapshot `{}` at revision {r} (it \
                         is not the one this history continues)",
                        base.id
                    );
                    continue;
                }
                return Ok(Ok(Point {
                    cluster_id: h.cluster_id.clone(),
                    revision,
                    base: (*base).clone(),
                    base_revision: r,
                    segments: chain.into_iter().cloned().collect(),
                    asked,
                }));
            }
            Err(e) => last_err = format!("from the full snapshot at revision {r}: {e}"),
        }
    }
    Ok(Err(last_err))
}

/// The revision for a time: the newest full snapshot or recorded change at or before it,
/// whichever is later (a full snapshot taken after a gap, or before the first change, answers
/// for the time after it). A point after everything recorded needs follow's word that the
/// history was complete until then.
fn time_point(
    h: &History,
    fulls: &[&Entry],
    ms: u64,
    text: &str,
    target: &Path,
    read: &Read,
) -> Result<Result<i64, String>, Error> {
    // The newest full snapshot taken at or before the time.
    let snap = fulls
        .iter()
        .filter_map(|e| {
            Some((
                e.revision?.max(1),
                u64::try_from(parse_rfc3339_ms(&e.time)?).ok()?,
            ))
        })
        .filter(|(_, t)| *t <= ms)
        .max_by_key(|(r, t)| (*t, *r));
    // The last change received at or before the time.
    let candidate = h
        .segments
        .iter()
        .filter(|f| !f.named.gap && f.named.first_ms <= ms)
        .max_by_key(|f| f.named.first);
    let change = match candidate {
        Some(f) if ms >= f.named.last_ms => Some((f.named.last, f)),
        Some(f) => history::last_at_or_before(&read(f)?.1, ms).map(|r| (r, f)),
        None => None,
    };
    // The revision, whether a later one is recorded (the history goes on past the time), and
    // when the point itself was taken.
    let (rev, recorded_after, point_ms) = match (change, snap) {
        (Some((rc, _)), Some((rs, ts))) if rs > rc => (rs, h.chain(rs + 1, rs + 1).is_ok(), ts),
        (Some((rc, f)), _) => (
            rc,
            rc < f.named.last || h.chain(rc + 1, rc + 1).is_ok(),
            if rc == f.named.last {
                f.named.last_ms
            } else {
                0
            },
        ),
        (None, Some((rs, ts))) => (rs, h.chain(rs + 1, rs + 1).is_ok(), ts),
        (None, None) => {
            return Ok(Err(format!(
                "{text} is before the first recorded change and the oldest full snapshot"
            )))
        }
    };
    if !recorded_after {
        // After the last change recorded: only when follow said it had recorded everything
        // until at least then.
        let through = history::read_state(&history::local_dir(target, &h.cluster_id))
            .filter(|_| h.own)
            .filter(|s| s.through_revision >= rev)
            .map_or(point_ms, |s| s.through_ms.max(point_ms));
        if ms > through {
            return Ok(Err(format!(
                "{text} is after the history's end ({}, revision {rev})",
                show_ms(through)
            )));
        }
    }
    Ok(Ok(rev))
}

/// Whether this etcd server takes `--unsafe-no-fsync` (3.5 and later).
fn takes_no_fsync(etcd: &Path) -> bool {
    std::process::Command::new(etcd)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).contains("--unsafe-no-fsync")
                || String::from_utf8_lossy(&o.stderr).contains("--unsafe-no-fsync")
        })
        .unwrap_or(false)
}

/// What the replay did.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub revisions: u64,
    pub events: u64,
    pub leases: u64,
    pub keys: u64,
    pub seconds: f64,
    /// Of which reading and decoding the segments.
    pub reading: f64,
    /// Txns sent (more than `revisions` when some had to be sent again).
    pub sent: u64,
}

/// The throwaway etcd's settings for a replay: any txn size and quota, no raft snapshots,
/// and no fsync of its own where the server allows it.
fn tune(etcd: &Path, data_dir: &Path, args: &mut Vec<String>) {
    args.extend([
        // A revision is replayed as one txn however many changes it holds (a prefix delete
        // of thousands of keys), and the db may be as large as the source allowed.
        "--max-txn-ops=100000000".to_string(),
        "--max-request-bytes=1073741824".to_string(),
        format!("--quota-backend-bytes={}", quota(data_dir)),
        // No raft snapshots during the replay: they would only cost time.
        "--snapshot-count=1000000000".to_string(),
    ]);
    // The replayed data is taken from this etcd's db once it stopped cleanly, and the
    // restore tool then builds the member that is swapped in (and synced): its own fsyncs
    // would only slow the replay.
    if takes_no_fsync(etcd) {
        args.push("--unsafe-no-fsync".into());
    }
}

/// Replays the point's changes into a throwaway etcd serving `data_dir` (a restored member
/// dir of the base snapshot, no revision bump), then stops it cleanly so that its db holds
/// every change. Nothing of the live etcd is touched.
pub fn replay(
    unit: &Unit<'_>,
    offline: &OfflineTool,
    data_dir: &Path,
    point: &Point,
    store: Option<&crate::store::Store>,
) -> Result<Replayed, Error> {
    let started = Instant::now();
    let fail = |detail: String| {
        Error::History(format!(
            "the replay of the change history to {} failed: {detail}; nothing was changed",
            point.asked
        ))
    };
    let etcd = offline.server_binary()?;
    let record = unit.state.join(RECORD);
    end_recorded(&record);
    let Throwaway {
        client_url,
        data_arg,
        mut args,
        ..
    } = Throwaway::new(&unit.config.name, data_dir)?;
    tune(&etcd, data_dir, &mut args);
    let log_path = data_dir.with_extension("log");
    let log = std::fs::File::create(&log_path)
        .ctx(|| format!("cannot create `{}`", log_path.display()))?;
    let cleanup_dir = data_dir.to_path_buf();
    let child = Guarded::spawn(
        &etcd,
        &args,
        &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
        &log,
        &record,
        &data_arg,
        move || {
            let _ = std::fs::remove_dir_all(&cleanup_dir);
        },
    )?;
    unit.log(&format!(
        "replay: throwaway etcd (pid {}) on {client_url}, from revision {} to {}",
        child.id(),
        point.base_revision,
        point.revision
    ));
    crate::points::pause_point("replay-started");
    let ctl = Client::with_tls(&client_url, ClientTls::default());
    let status = ctl.wait_serving(unit.settings.start_timeout).map_err(|e| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        fail(format!(
            "the throwaway etcd did not become healthy: {e}\n{}",
            crate::error::bounded(&log, 2000)
        ))
    })?;
    if status.revision != point.base_revision {
        return Err(fail(format!(
            "the full snapshot restored at revision {} where its manifest says {}",
            status.revision, point.base_revision
        )));
    }
    let mut session = ctl.session()?;
    for id in session.leases()? {
        session.keep_alive(id);
    }
    let keys = unit.keys()?;
    let (mut revisions, mut events, mut leases) = (0u64, 0u64, 0u64);
    let mut current = point.base_revision;
    let mut guard: Option<crate::etcd::Guard> = None;
    // Seconds spent applying segments (the rest is reading and decoding them).
    let mut applying = 0f64;
    // Txns sent: a revision is sent again when etcd took it before the one it follows.
    let mut sent = 0u64;
    let reading_started = Instant::now();
    each_revision(point, store, keys, &mut |f, revs| {
        let started = Instant::now();
        let mut todo: Vec<(i64, Vec<crate::etcd::Change>)> = Vec::new();
        for rev in revs {
            for &(id, ttl) in &rev.leases {
                // A lease gone when it was recorded: its keys are deleted by a later
                // revision, or were live only briefly; it gets a minute.
                session.grant(id, if ttl > 0 { ttl } else { 60 })?;
                leases += 1;
            }
            let changes = rev
                .ev
                .iter()
                .map(history::Ev::change)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(format!("`{}`: {e}", f.named.name)))?;
            events += changes.len() as u64;
            todo.push((rev.r, changes));
        }
        for window in todo.chunks(WINDOW) {
            current = apply(&session, window, current, &mut guard, &mut sent, &fail)?;
            revisions += window.len() as u64;
        }
        applying += started.elapsed().as_secs_f64();
        Ok(())
    })?;
    let reading = reading_started.elapsed().as_secs_f64() - applying;
    let count = ctl.key_count(current)?;
    drop(session);
    // A clean stop commits the backend: its db then holds every replayed change.
    if !child.terminate(Duration::from_secs(60)) {
        return Err(fail("the throwaway etcd did not stop within 60s".into()));
    }
    let _ = std::fs::remove_file(&log_path);
    Ok(Replayed {
        revisions,
        events,
        leases,
        keys: count,
        seconds: started.elapsed().as_secs_f64(),
        reading,
        sent,
    })
}

/// Called with each segment and its revisions to apply.
pub type EachSegment<'a> = dyn FnMut(&Found, Vec<history::Rev>) -> Result<(), Error> + 'a;

/// Reads the point's segments in chain order, each checked to continue the one before it, and
/// hands `f` each segment's revisions after the base and up to the point, in order. Fails
/// when the history ends short of the point. Replay and the export at a point both read
/// the history through here.
pub fn each_revision(
    point: &Point,
    store: Option<&crate::store::Store>,
    keys: &crate::crypt::Keys,
    f: &mut EachSegment<'_>,
) -> Result<(), Error> {
    let fail = |detail: String| {
        Error::History(format!(
            "the change history to {} cannot be read: {detail}; nothing was changed",
            point.asked
        ))
    };
    let mut prev_sha: Option<String> = None;
    let mut last = point.base_revision;
    for found in &point.segments {
        let bytes = history::read(found, store)?;
        let (head, revs) = history::decode(&bytes, &found.named, keys)?;
        if let (Some(want), Some(_)) = (&prev_sha, &head.prev_sha256) {
            if head.prev_sha256.as_ref() != Some(want) {
                return Err(fail(format!(
                    "the chain is broken at `{}`: it follows a segment other than the one \
                     before it",
                    found.named.name
                )));
            }
        } else if prev_sha.is_some() {
            return Err(fail(format!(
                "the chain is broken at `{}`: it starts a new chain",
                found.named.name
            )));
        }
        prev_sha = Some(history::sha256(&bytes));
        let revs: Vec<history::Rev> = revs
            .into_iter()
            .filter(|r| r.r > last && r.r <= point.revision)
            .collect();
        if let Some(r) = revs.last() {
            last = r.r;
        }
        f(found, revs)?;
    }
    if last != point.revision {
        return Err(fail(format!(
            "the history ends at revision {last}, short of {}",
            point.revision
        )));
    }
    Ok(())
}

/// Revisions sent together: each guarded by the one before it, so they apply in order
/// whatever order etcd takes them in; those whose guard did not hold yet are sent again.
const WINDOW: usize = 32;

/// Applies a window of consecutive revisions after `current`; returns the last applied. Each
/// must be applied as exactly its recorded revision.
fn apply(
    session: &crate::etcd::Session,
    window: &[(i64, Vec<crate::etcd::Change>)],
    mut current: i64,
    guard: &mut Option<crate::etcd::Guard>,
    sent: &mut u64,
    fail: &dyn Fn(String) -> Error,
) -> Result<i64, Error> {
    use crate::etcd::{Guard, Step};
    let mut start = 0;
    let mut stuck = 0;
    while start < window.len() {
        let rest = &window[start..];
        let mut steps = Vec::with_capacity(rest.len());
        let mut g = guard.clone();
        for (r, changes) in rest {
            steps.push(Step {
                changes,
                after: g.take(),
            });
            g = Guard::after(*r, changes);
            if g.is_none() {
                // A delete-only revision gives the next no guard: that one goes first in the
                // next window, once this one is confirmed applied.
                break;
            }
        }
        let got = session.apply_window(&steps)?;
        *sent += steps.len() as u64;
        // Every revision up to the first whose guard did not hold was applied, in order.
        let mut applied = 0;
        for ((r, changes), got) in rest.iter().zip(&got) {
            match got {
                Some(rev) if *rev == *r => {
                    current = *r;
                    *guard = Guard::after(*r, changes);
                    applied += 1;
                }
                Some(rev) => {
                    return Err(fail(format!(
                        "revision {r} was applied as revision {rev}: the history does not \
                         continue the full snapshot exactly"
                    )))
                }
                None => break,
            }
        }
        // After one that did not apply, none after it may have: their guards chain to it.
        if let Some(p) = got[applied..].iter().position(Option::is_some) {
            return Err(fail(format!(
                "revision {} applied before revision {}",
                rest[applied + p].0,
                rest[applied].0
            )));
        }
        // The first of a window always follows an applied revision, so its guard holds: a
        // refusal twice in a row means the history does not fit the data.
        stuck = if applied == 0 { stuck + 1 } else { 0 };
        if stuck >= 2 {
            return Err(fail(format!(
                "revision {} does not apply after revision {current}",
                rest[0].0
            )));
        }
        start += applied;
    }
    Ok(current)
}

/// The backend quota of the throwaway etcd: room for the db three times over and 8 GiB more,
/// so that no replay meets a space alarm the source never met.
fn quota(data_dir: &Path) -> u64 {
    let db = std::fs::metadata(replayed_db(data_dir))
        .map(|m| m.len())
        .unwrap_or(0);
    db.saturating_mul(3).saturating_add(8 << 30)
}

/// The db a replay left, for the restore tool.
pub fn replayed_db(data_dir: &Path) -> PathBuf {
    data_dir.join("member/snap/db")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:01+01:00"), Some(1000));
        assert_eq!(
            parse_rfc3339_ms("1970-01-01T00:00:01.123456-00:30"),
            Some(1_801_123)
        );
        for bad in [
            "",
            "1970-01-01",
            "1970-01-01T00:00:01",
            "1970-01-01T00:00:01+1",
            "x970-01-01T00:00:01Z",
            "1970-01-01T00:00:01+99:99",
            "1970-01-01T00:00:01+24:00",
            "1970-01-01T00:00:01+0é:00",
            "1970-01-01Té0:00:01Z",
            "1970-01-01T00:00:0é",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
        assert_eq!(show_ms(1500), "1970-01-01T00:00:01.500Z");
    }
}
