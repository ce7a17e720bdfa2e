//! The change history: what `follow` records from etcd's watch stream between full
//! snapshots, and what a restore to a point replays.
//!
//! A **segment** holds every change of a contiguous revision range `first..=last`, the
//! changes of one revision together (a txn is one revision), each revision with the time it
//! was received, and the TTL of each lease first seen on a key. Its file is JSON lines (a
//! head, then one line per revision), gzip-compressed, and age-encrypted when recipients are
//! set. Segments are chained: each head names the cluster and the sha256 of the previous
//! segment's file. A **gap** segment marks revisions that were lost (etcd compacted them
//! before they were recorded); the next full snapshot is at or after its end.
//!
//! Names carry the range and the time range, so a listing (local or in the store) tells the
//! coverage without reading a file:
//! `etcd-changes-<cluster>-<first>-<last>-<first ms>-<last ms>[-gap].jsonl.gz[.age]`.
//! Files live in `<target>/changes/<cluster>/`, objects in `<folder>/changes/<cluster>/`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::crypt::Keys;
use crate::error::{Error, IoContext};
use crate::etcd::Change;

pub const DIR: &str = "changes";
pub const FORMAT: &str = "etcd-actions-changes/1";
const PREFIX: &str = "etcd-changes-";
/// Largest segment file read back: a segment is flushed at 8 MiB of changes.
pub const FILE_MAX: u64 = 256 << 20;

/// The base64 of keys and values in change segments and exports: standard, padded.
pub fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The first line of a segment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    pub format: String,
    pub cluster_id: String,
    pub first: i64,
    pub last: i64,
    /// sha256 of the previous segment's file; `None` when the chain starts here (right after
    /// a full snapshot at `first - 1`).
    pub prev_sha256: Option<String>,
    /// Where the chain starts: the sha256 of the full snapshot archive at `first - 1` it
    /// continues (only restored from that archive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
    /// Full snapshots taken while this chain was recorded (revision, archive sha256): a
    /// restore starts from a full snapshot in the middle of a chain only when the chain
    /// names it (a snapshot of another timeline of the same cluster, after a rollback, is
    /// never spliced onto this one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bases: Vec<(i64, String)>,
    /// Revisions `first..=last` were lost (compacted before they were recorded).
    #[serde(default)]
    pub gap: bool,
    pub revisions: u64,
    pub events: u64,
}

/// One revision: its changes and when it was received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rev {
    pub r: i64,
    /// Unix time in milliseconds when follow received it.
    pub t: u64,
    pub ev: Vec<Ev>,
    /// Leases first seen in this revision: `[id, granted TTL seconds]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<(i64, i64)>,
}

/// One change, with the key and value in base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ev {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub del: bool,
    pub k: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub v: String,
    pub c: i64,
    pub m: i64,
    pub ver: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub l: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl Ev {
    pub fn of(c: &Change) -> Ev {
        Ev {
            del: c.delete,
            k: b64().encode(&c.key),
            v: b64().encode(&c.value),
            c: c.create_revision,
            m: c.mod_revision,
            ver: c.version,
            l: c.lease,
        }
    }

    pub fn change(&self) -> Result<Change, String> {
        let d = |s: &str| b64().decode(s).map_err(|e| format!("bad base64: {e}"));
        Ok(Change {
            delete: self.del,
            key: d(&self.k)?,
            value: d(&self.v)?,
            create_revision: self.c,
            mod_revision: self.m,
            version: self.ver,
            lease: self.l,
        })
    }
}

/// What a segment's name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub cluster_id: String,
    pub first: i64,
    pub last: i64,
    pub first_ms: u64,
    pub last_ms: u64,
    pub gap: bool,
    pub encrypted: bool,
}

impl Named {
    pub fn new(
        cluster_id: &str,
        first: i64,
        last: i64,
        ms: (u64, u64),
        gap: bool,
        enc: bool,
    ) -> Named {
        let name = format!(
            "{PREFIX}{cluster_id}-{first:019}-{last:019}-{:013}-{:013}{}.jsonl.gz{}",
            ms.0,
            ms.1,
            if gap { "-gap" } else { "" },
            if enc { ".age" } else { "" }
        );
        Named {
            name,
            cluster_id: cluster_id.to_string(),
            first,
            last,
            first_ms: ms.0,
            last_ms: ms.1,
            gap,
            encrypted: enc,
        }
    }

    /// Parses a segment name; `None` for any other name.
    pub fn parse(name: &str) -> Option<Named> {
        let rest = name.strip_prefix(PREFIX)?;
        let (rest, encrypted) = match rest.strip_suffix(".age") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let rest = rest.strip_suffix(".jsonl.gz")?;
        let (rest, gap) = match rest.strip_suffix("-gap") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let [cluster, first, last, t0, t1] = parts.as_slice() else {
            return None;
        };
        if cluster.is_empty() || !cluster.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let n = Named::new(
            cluster,
            first.parse().ok()?,
            last.parse().ok()?,
            (t0.parse().ok()?, t1.parse().ok()?),
            gap,
            encrypted,
        );
        (n.name == name && n.first <= n.last && n.first > 0).then_some(n)
    }
}

/// A segment in memory, before it is written.
#[derive(Debug, Default)]
pub struct Pending {
    pub revs: Vec<Rev>,
    /// Bytes of keys and values held (the flush threshold).
    pub bytes: usize,
}

impl Pending {
    pub fn push(&mut self, rev: Rev) {
        self.bytes += rev
            .ev
            .iter()
            .map(|e| e.k.len() + e.v.len() + 64)
            .sum::<usize>();
        self.revs.push(rev);
    }

    pub fn is_empty(&self) -> bool {
        self.revs.is_empty()
    }
}

/// Encodes a segment: JSON lines, gzip, and age when `keys` has recipients.
pub fn encode(head: &Head, revs: &[Rev], keys: &Keys) -> Result<Vec<u8>, Error> {
    let io = |e: std::io::Error| Error::io("cannot encode a change segment", e);
    let enc = keys.encryptor()?;
    let sealed = crate::crypt::Sealed::new(Vec::new(), enc).map_err(io)?;
    let mut gz = flate2::write::GzEncoder::new(sealed, flate2::Compression::new(1));
    let mut line = serde_json::to_vec(head).map_err(|e| Error::Internal(e.to_string()))?;
    line.push(b'\n');
    gz.write_all(&line).map_err(io)?;
    for r in revs {
        line.clear();
        serde_json::to_writer(&mut line, r).map_err(|e| Error::Internal(e.to_string()))?;
        line.push(b'\n');
        gz.write_all(&line).map_err(io)?;
    }
    gz.finish().map_err(io)?.finish().map_err(io)
}

/// Decompressed bytes a segment may hold in all (a segment is flushed at 8 MiB of changes),
/// and in one line (one revision: a prefix delete of many keys is one line).
pub const PLAIN_MAX: u64 = 1 << 30;
pub const LINE_MAX: u64 = 64 << 20;

/// Counts what is read through it, and fails past `PLAIN_MAX` in all or `LINE_MAX` since the
/// count of the current line was reset: a decompression bomb costs no more than one line.
struct Capped<R> {
    inner: R,
    total: u64,
    line: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        self.line.set(self.line.get() + n as u64);
        if self.total > PLAIN_MAX {
            return Err(std::io::Error::other(format!(
                "it decompresses to more than {}",
                crate::error::human_size(PLAIN_MAX)
            )));
        }
        if self.line.get() > LINE_MAX {
            return Err(std::io::Error::other(format!(
                "a line is longer than {}",
                crate::error::human_size(LINE_MAX)
            )));
        }
        Ok(n)
    }
}

/// Decodes a segment file's bytes, streaming (line by line, each line and the whole capped);
/// checks the head against the name.
pub fn decode(bytes: &[u8], named: &Named, keys: &Keys) -> Result<(Head, Vec<Rev>), Error> {
    parse(bytes, named, keys, false)
}

/// Decodes only a segment's head (checked against the name): the rest is not read.
pub fn decode_head(bytes: &[u8], named: &Named, keys: &Keys) -> Result<Head, Error> {
    parse(bytes, named, keys, true).map(|(head, _)| head)
}

fn parse(
    bytes: &[u8],
    named: &Named,
    keys: &Keys,
    head_only: bool,
) -> Result<(Head, Vec<Rev>), Error> {
    use serde::Deserialize as _;
    let bad = |problem: String| {
        Error::History(format!(
            "change segment `{}` is damaged: {problem}; restore to a point before it, or from \
             a full snapshot",
            named.name
        ))
    };
    let plain: Box<dyn Read + '_> = if named.encrypted {
        Box::new(keys.decrypt(std::io::BufReader::new(bytes), Path::new(&named.name))?)
    } else {
        Box::new(bytes)
    };
    let line = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let capped = Capped {
        inner: flate2::read::GzDecoder::new(plain),
        total: 0,
        line: line.clone(),
    };
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(capped));
    let head =
        Head::deserialize(&mut de).map_err(|e| bad(format!("its head is not readable ({e})")))?;
    if head.format != FORMAT {
        return Err(bad(format!(
            "its format is `{}`, not `{FORMAT}`",
            crate::error::bounded(&head.format, 100)
        )));
    }
    if head.first != named.first
        || head.last != named.last
        || head.cluster_id != named.cluster_id
        || head.gap != named.gap
    {
        return Err(bad("its head does not match its name".into()));
    }
    if head_only {
        return Ok((head, Vec::new()));
    }
    let mut revs = Vec::new();
    let mut prev = head.first - 1;
    line.set(0);
    for r in de.into_iter::<Rev>() {
        let r = r.map_err(|e| bad(format!("a line is not readable ({e})")))?;
        line.set(0);
        if r.r <= prev || r.r > head.last || r.ev.is_empty() {
            return Err(bad(format!("revision {} is out of order or empty", r.r)));
        }
        if r.ev.iter().any(|e| e.m != r.r) {
            return Err(bad(format!(
                "revision {} holds a change of another revision",
                r.r
            )));
        }
        prev = r.r;
        revs.push(r);
        if revs.len() as u64 > head.revisions {
            break;
        }
    }
    if revs.len() as u64 != head.revisions {
        return Err(bad(format!(
            "it holds {} revisions or more, its head says {}",
            revs.len(),
            head.revisions
        )));
    }
    Ok((head, revs))
}

pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The local directory of a cluster's history in `target`.
pub fn local_dir(target: &Path, cluster_id: &str) -> PathBuf {
    target.join(DIR).join(cluster_id)
}

/// The store folder of a cluster's history as one unit records it: each unit's chain apart
/// (every unit of an application may run follow), never mixed with another's.
pub fn store_folder(folder: &str, cluster_id: &str, unit: &str) -> String {
    format!("{folder}/{DIR}/{cluster_id}/{unit}")
}

/// A unit's name as a folder name (`etcd/0` → `etcd-0`).
pub fn unit_tag(unit: &str) -> String {
    unit.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Writes a segment durably into a held directory (see `fsutil::Dir`: nothing followed
/// through a symlink): a temp file, fsync, a rename that never replaces, fsync of the
/// directory. A segment of that name already there with other bytes is an error.
pub fn publish(dir: &crate::fsutil::Dir, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let tmp = format!(".tmp-{name}");
    dir.unlink(&tmp)?;
    let written = (|| {
        let mut f = dir.create_file(&tmp)?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .ctx(|| format!("cannot write `{}`", dir.join(&tmp).display()))
    })();
    if let Err(e) = written {
        let _ = dir.unlink(&tmp);
        return Err(e);
    }
    let placed = dir.rename_noreplace(&tmp, dir, name);
    let _ = dir.unlink(&tmp);
    if !placed? {
        let mut there = Vec::new();
        dir.open_file(name)?
            .take(bytes.len() as u64 + 1)
            .read_to_end(&mut there)
            .ctx(|| format!("cannot read `{}`", dir.join(name).display()))?;
        if there != bytes {
            return Err(Error::History(format!(
                "`{}` already exists with other changes; another follow writes to this target",
                dir.join(name).display()
            )));
        }
    }
    dir.sync()
}

/// Where a segment can be read from.
#[derive(Debug, Clone)]
pub struct Found {
    pub named: Named,
    pub path: Option<PathBuf>,
    pub key: Option<String>,
    pub size: u64,
}

/// Whether `p` is a real directory (not a symlink) of this user's.
fn own_dir(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .is_ok_and(|m| m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw())
}

/// One chain of a cluster's segments, sorted by first revision: this unit's (its local files
/// and its own folder in the store), or another unit's in the store (`unit` is its folder;
/// empty for segments uploaded before chains were kept apart).
#[derive(Debug, Clone, Default)]
pub struct History {
    pub cluster_id: String,
    pub unit: String,
    /// This unit's own chain (the local files are in it).
    pub own: bool,
    pub segments: Vec<Found>,
}

type Chains =
    std::collections::BTreeMap<(String, String), std::collections::BTreeMap<String, Found>>;

/// Every cluster's chains in `target` (this unit's, `own` names it) and in the store's
/// `folder`: this unit's first, then the others.
pub fn list(
    target: &Path,
    store: Option<(&crate::store::Store, &str)>,
    own: &str,
) -> Result<Vec<History>, Error> {
    let mut all: Chains = Default::default();
    // Each cluster's own chain: its store folder is named in the local dir.
    let mut mine: std::collections::BTreeMap<String, String> = Default::default();
    let root = target.join(DIR);
    // Local segments are trusted as root's own: only a real directory of this user's (follow
    // makes them 0700), never one the target's owner could have made or planted.
    let clusters = std::fs::read_dir(&root).ok().filter(|_| own_dir(&root));
    if let Some(clusters) = clusters {
        for c in clusters.flatten() {
            if !own_dir(&c.path()) {
                continue;
            }
            let dir_name = c.file_name().to_string_lossy().into_owned();
            let own = chain_name(&c.path(), own);
            mine.insert(dir_name.clone(), own.clone());
            let own = own.as_str();
            // Only a cluster's own folder: a history set aside (a rollback) is not read.
            let Ok(files) = std::fs::read_dir(c.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Some(named) = Named::parse(&name) else {
                    continue;
                };
                if named.cluster_id != dir_name {
                    continue;
                }
                // `DirEntry::metadata` does not follow a symlink: a regular file only.
                let Ok(meta) =
                    f.metadata().map_err(drop).and_then(
                        |m| {
                            if m.is_file() {
                                Ok(m)
                            } else {
                                Err(())
                            }
                        },
                    )
                else {
                    continue;
                };
                let size = meta.len();
                all.entry((named.cluster_id.clone(), own.to_string()))
                    .or_default()
                    .insert(
                        name,
                        Found {
                            path: Some(f.path()),
                            key: None,
                            size,
                            named,
                        },
                    );
            }
        }
    }
    if let Some((store, folder)) = store {
        list_store(&mut all, store, folder)?;
    }
    let mut out: Vec<History> = all
        .into_iter()
        .map(|((cluster_id, unit), m)| {
            let mut segments: Vec<Found> = m.into_values().collect();
            segments.sort_by_key(|f| (f.named.first, f.named.last));
            History {
                own: unit == *mine.get(&cluster_id).map_or(own, String::as_str),
                cluster_id,
                unit,
                segments,
            }
        })
        .collect();
    out.sort_by_key(|h| !h.own);
    Ok(out)
}

/// Adds the store's segments: `<folder>/changes/<cluster>/<unit>/<segment>` (and, from
/// before chains were kept apart, `<folder>/changes/<cluster>/<segment>`).
fn list_store(all: &mut Chains, store: &crate::store::Store, folder: &str) -> Result<(), Error> {
    let base = format!("{folder}/{DIR}");
    let mut folders: std::collections::BTreeSet<(String, String)> = Default::default();
    for key in store.keys_under(&base)? {
        let Some(rest) = key.strip_prefix(&format!("{base}/")) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [c, _] => folders.insert((c.to_string(), String::new())),
            [c, u, _] => folders.insert((c.to_string(), u.to_string())),
            _ => false,
        };
    }
    for (c, u) in folders {
        let dir = if u.is_empty() {
            format!("{base}/{c}")
        } else {
            store_folder(folder, &c, &u)
        };
        for (name, size) in store.names(&dir)? {
            let Some(named) = Named::parse(&name) else {
                continue;
            };
            if named.cluster_id != c {
                continue;
            }
            let key = format!("{dir}/{name}");
            let e = all.entry((c.clone(), u.clone())).or_default();
            match e.get_mut(&name) {
                Some(f) => f.key = Some(key),
                None => {
                    e.insert(
                        name,
                        Found {
                            path: None,
                            key: Some(key),
                            size,
                            named,
                        },
                    );
                }
            }
        }
    }
    Ok(())
}

/// A run of revisions the history holds without a hole: `from..=to`, received between the
/// two times (ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub from: i64,
    pub to: i64,
    pub from_ms: u64,
    pub to_ms: u64,
}

impl History {
    /// The contiguous runs the segments cover (a gap segment or a missing range ends one),
    /// and the gaps (revision ranges lost).
    pub fn spans(&self) -> (Vec<Span>, Vec<(i64, i64)>) {
        let mut spans: Vec<Span> = Vec::new();
        let mut gaps = Vec::new();
        let mut last_end: Option<i64> = None;
        for f in &self.segments {
            let n = &f.named;
            if n.gap {
                gaps.push((n.first, n.last));
                last_end = Some(n.last);
                spans.push(Span {
                    from: n.last + 1,
                    to: n.last,
                    from_ms: n.last_ms,
                    to_ms: n.last_ms,
                });
                continue;
            }
            match (spans.last_mut(), last_end) {
                (Some(s), Some(end)) if end + 1 == n.first => {
                    s.to = n.last;
                    s.to_ms = n.last_ms;
                }
                (_, end) => {
                    if let Some(end) = end {
                        if n.first > end + 1 {
                            gaps.push((end + 1, n.first - 1));
                        }
                    }
                    spans.push(Span {
                        from: n.first,
                        to: n.last,
                        from_ms: n.first_ms,
                        to_ms: n.last_ms,
                    });
                }
            }
            last_end = Some(last_end.map_or(n.last, |e| e.max(n.last)));
        }
        spans.retain(|s| s.from <= s.to);
        (spans, gaps)
    }

    /// The segments that cover `from..=to` in chain order, or why they cannot. A local
    /// segment is taken before any store object for the same revisions.
    pub fn chain(&self, from: i64, to: i64) -> Result<Vec<&Found>, String> {
        let mut out = Vec::new();
        let mut next = from;
        while next <= to {
            let Some(f) = self
                .segments
                .iter()
                .filter(|f| f.named.first <= next && next <= f.named.last)
                .max_by_key(|f| (f.path.is_some(), f.named.last))
            else {
                return Err(format!("no recorded changes hold revision {next}"));
            };
            if f.named.gap {
                return Err(format!(
                    "revisions {}–{} were lost (etcd compacted them before follow recorded \
                     them)",
                    f.named.first, f.named.last
                ));
            }
            out.push(f);
            next = f.named.last + 1;
        }
        Ok(out)
    }

    /// The other segments that hold some of `seg`'s revisions (under another name).
    pub fn overlapping<'a>(&'a self, seg: &'a Found) -> impl Iterator<Item = &'a Found> + 'a {
        self.segments.iter().filter(move |f| {
            f.named.name != seg.named.name
                && f.named.first <= seg.named.last
                && seg.named.first <= f.named.last
        })
    }

    /// The newest segment (by last revision), if any.
    pub fn newest(&self) -> Option<&Found> {
        self.segments.iter().max_by_key(|f| f.named.last)
    }
}

/// Reads one segment's bytes (bounded), from its file or the store.
pub fn read(found: &Found, store: Option<&crate::store::Store>) -> Result<Vec<u8>, Error> {
    if let Some(p) = &found.path {
        let f = crate::fsutil::open_regular_path(p)?;
        let mut out = Vec::new();
        f.take(FILE_MAX + 1)
            .read_to_end(&mut out)
            .ctx(|| format!("cannot read `{}`", p.display()))?;
        if out.len() as u64 > FILE_MAX {
            return Err(Error::History(format!(
                "`{}` is larger than any segment",
                p.display()
            )));
        }
        return Ok(out);
    }
    match (&found.key, store) {
        (Some(key), Some(s)) => s.get_bytes(key, FILE_MAX)?.ok_or_else(|| {
            Error::History(format!(
                "the store no longer holds `{key}` (or it is too large)"
            ))
        }),
        _ => Err(Error::History(format!(
            "segment `{}` is only in the store, and no store is configured",
            found.named.name
        ))),
    }
}

/// Refuses what a chain of segments cannot be trusted for, before anything is replayed: a
/// plaintext store object while recipients are set (anyone who can write the store could
/// have put it there), and a segment that another segment of the history holds revisions of
/// differently (a forged or foreign object beside this unit's own).
pub fn check_trust(
    h: &History,
    chain: &[&Found],
    store: Option<&crate::store::Store>,
    keys: &Keys,
) -> Result<(), Error> {
    for f in chain {
        if keys.encrypts() && !f.named.encrypted && f.path.is_none() {
            return Err(Error::History(format!(
                "change segment `{}` in the store is not encrypted though recipients are set: \
                 it is refused (anyone who can write the store could have put it there); \
                 remove it, or restore to a point before it",
                f.named.name
            )));
        }
        let mut mine: Option<Vec<Rev>> = None;
        for other in h.overlapping(f) {
            let mine = match &mut mine {
                Some(m) => m,
                None => mine.insert(decode(&read(f, store)?, &f.named, keys)?.1),
            };
            let theirs = if other.named.gap {
                None
            } else {
                Some(decode(&read(other, store)?, &other.named, keys)?)
            };
            let lo = f.named.first.max(other.named.first);
            let hi = f.named.last.min(other.named.last);
            let within = |revs: &[Rev]| -> Vec<(i64, Vec<Ev>)> {
                revs.iter()
                    .filter(|r| (lo..=hi).contains(&r.r))
                    .map(|r| (r.r, r.ev.clone()))
                    .collect()
            };
            let agree = theirs.is_some_and(|t| within(mine) == within(&t.1));
            if !agree {
                return Err(Error::History(format!(
                    "change segments `{}` and `{}` ({}) both hold revisions {lo}–{hi} and \
                     disagree: the history is refused; remove the one this unit did not write",
                    f.named.name,
                    other.named.name,
                    if other.path.is_some() {
                        "local"
                    } else {
                        "in the store"
                    }
                )));
            }
        }
    }
    Ok(())
}

/// A chain start recorded before chains named their full snapshot: trusted only from the
/// local target (root's own files).
pub fn legacy_start(first: &Found, head: &Head) -> bool {
    first.path.is_some() && head.prev_sha256.is_none() && head.base_sha256.is_none()
}

/// Whether the history names the full snapshot at revision `r` with sha256 `sha` (in a
/// chain start's link or in the bases of a segment from `r` on): read forward from `r` until
/// a segment names it. `Ok(true)` too when nothing was recorded after `r` (nothing there
/// could contradict it).
pub fn names_base(
    h: &History,
    r: i64,
    sha: Option<&str>,
    read: &dyn Fn(&Found) -> Result<Head, Error>,
) -> Result<bool, Error> {
    let Some(sha) = sha else {
        return Ok(false);
    };
    let mut after = h.segments.iter().filter(|f| f.named.last >= r).peekable();
    if after.peek().is_none() {
        return Ok(true);
    }
    for f in after {
        let head = read(f)?;
        if head.bases.iter().any(|(br, bs)| *br == r && bs == sha)
            || (f.named.first == r + 1 && head.base_sha256.as_deref() == Some(sha))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What `check_chain` found.
#[derive(Debug, Clone, Default)]
pub struct ChainReport {
    pub segments: u64,
    pub revisions: u64,
    pub events: u64,
    /// Segments whose contents were not read (encrypted, and no identity given).
    pub sealed: u64,
}

/// Reads every segment of a history and checks it: its head against its name, its revisions
/// in order and within its range, and its link to the segment before it (the sha256 of that
/// file). A break is an error naming the segment. Encrypted segments are checked only when an
/// identity is given (their links are inside the ciphertext).
pub fn check_chain(
    h: &History,
    store: Option<&crate::store::Store>,
    keys: &Keys,
) -> Result<ChainReport, Error> {
    let mut report = ChainReport::default();
    let mut prev: Option<(i64, String)> = None;
    // A plaintext store object while recipients are set, or overlapping segments that
    // disagree, are reported before anything else.
    let all: Vec<&Found> = h.segments.iter().collect();
    check_trust(h, &all, store, keys)?;
    for f in &h.segments {
        if prev.as_ref().is_some_and(|(last, _)| f.named.last <= *last) {
            // Held by the segment before (they agree: checked above).
            continue;
        }
        let bytes = read(f, store)?;
        let sha = sha256(&bytes);
        report.segments += 1;
        if f.named.encrypted && keys.require_identity(Path::new(&f.named.name)).is_err() {
            report.sealed += 1;
            prev = Some((f.named.last, sha));
            continue;
        }
        let (head, revs) = decode(&bytes, &f.named, keys)?;
        if let Some((last, want)) = &prev {
            if *last + 1 == f.named.first {
                if let Some(link) = &head.prev_sha256 {
                    if link != want {
                        return Err(Error::History(format!(
                            "the change history of cluster {} is broken at `{}`: it does not follow the \
                             segment before it (sha256 {} expected, {} recorded); a restore to a \
                             point after it is refused",
                            h.cluster_id, f.named.name, want, link
                        )));
                    }
                }
            }
        }
        report.revisions += revs.len() as u64;
        report.events += revs.iter().map(|r| r.ev.len() as u64).sum::<u64>();
        prev = Some((f.named.last, sha));
    }
    Ok(report)
}

/// The state `follow` leaves beside a cluster's segments (`follow.json`): how far the
/// history is durable, and until when it was known complete.
pub const STATE: &str = "follow.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FollowState {
    pub pid: u32,
    pub cluster_id: String,
    /// The last revision made durable.
    pub through_revision: i64,
    /// Unix ms until which every change received is durable.
    pub through_ms: u64,
    pub segments_written: u64,
    /// How long the last segment's first change waited to be durable.
    pub last_flush_lag_ms: u64,
    /// The member follow watched and its raft index when last seen: a rollback of its data
    /// shows as the index (or the revision) going back.
    #[serde(default)]
    pub member_id: u64,
    #[serde(default)]
    pub raft_index: u64,
    /// The last key put that the history holds: revision, key (base64), sha256 of the value.
    /// etcd must still have it at that revision, or its data went back (a rollback).
    #[serde(default)]
    pub last_put: Option<(i64, String, String)>,
}

/// The file in a cluster's history dir that names this chain's folder in the store (a new
/// chain after a rollback gets a folder of its own). Without it, the unit's tag.
pub const CHAIN: &str = "chain";

/// The store folder name of the chain in a cluster's local dir.
pub fn chain_name(dir: &Path, default: &str) -> String {
    crate::fsutil::open_regular_path(&dir.join(CHAIN))
        .ok()
        .and_then(|f| {
            let mut text = String::new();
            f.take(256).read_to_string(&mut text).ok()?;
            let t = text.trim().to_string();
            (!t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_@".contains(&b)))
            .then_some(t)
        })
        .unwrap_or_else(|| default.to_string())
}

/// Writes the state into a cluster's (held) history dir, atomically.
pub fn write_state(dir: &crate::fsutil::Dir, state: &FollowState) -> Result<(), Error> {
    let text = serde_json::to_vec(state).map_err(|e| Error::Internal(e.to_string()))?;
    dir.write_replacing(STATE, &text, 0o600)
}

/// The state in a cluster's history dir, when there is a readable one: a regular file (no
/// symlink followed, no FIFO waited on), read up to 64 KiB.
pub fn read_state(dir: &Path) -> Option<FollowState> {
    // Only follow's own word: a state in a directory someone else made says nothing.
    if !own_dir(dir) || !dir.parent().is_some_and(own_dir) {
        return None;
    }
    let f = crate::fsutil::open_regular_path(&dir.join(STATE)).ok()?;
    let mut text = Vec::new();
    f.take(64 << 10).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// A revision chosen from a time: the last revision received at or before `ms`, among
/// `revs`.
pub fn last_at_or_before(revs: &[Rev], ms: u64) -> Option<i64> {
    revs.iter().take_while(|r| r.t <= ms).last().map(|r| r.r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_refuse_others() {
        let n = Named::new("ab12", 5, 19, (1000, 2000), false, true);
        assert_eq!(Named::parse(&n.name), Some(n.clone()));
        let g = Named::new("ab12", 20, 30, (1, 2), true, false);
        assert_eq!(Named::parse(&g.name), Some(g));
        for bad in ["etcd-changes-zz-1-2-3-4.jsonl.gz", "x", "etcd-changes-ab-0000000000000000002-0000000000000000001-0000000000001-0000000000002.jsonl.gz"] {
            assert_eq!(Named::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn spans_and_chains() {
        let seg = |a, b, gap| Found {
            named: Named::new("c", a, b, (a as u64, b as u64), gap, false),
            path: None,
            key: None,
            size: 0,
        };
        let h = History {
            cluster_id: "c".into(),
            unit: String::new(),
            own: true,
            segments: vec![
                seg(5, 9, false),
                seg(10, 12, false),
                seg(13, 20, true),
                seg(21, 25, false),
            ],
        };
        let (spans, gaps) = h.spans();
        assert_eq!(
            spans.iter().map(|s| (s.from, s.to)).collect::<Vec<_>>(),
            vec![(5, 12), (21, 25)]
        );
        assert_eq!(gaps, vec![(13, 20)]);
        assert_eq!(h.chain(7, 11).unwrap().len(), 2);
        assert!(h.chain(11, 22).unwrap_err().contains("13–20"));
        assert!(h.chain(26, 27).is_err());
        assert!(h.chain(8, 7).unwrap().is_empty());
    }

    #[test]
    fn segments_round_trip() {
        let keys = Keys::default();
        let rev = Rev {
            r: 7,
            t: 99,
            ev: vec![Ev::of(&Change {
                delete: false,
                key: b"k".to_vec(),
                value: b"\x00v".to_vec(),
                create_revision: 7,
                mod_revision: 7,
                version: 1,
                lease: 0,
            })],
            leases: vec![],
        };
        let head = Head {
            format: FORMAT.into(),
            cluster_id: "c".into(),
            first: 6,
            last: 7,
            prev_sha256: None,
            base_sha256: None,
            bases: vec![],
            gap: false,
            revisions: 1,
            events: 1,
        };
        let bytes = encode(&head, std::slice::from_ref(&rev), &keys).unwrap();
        let named = Named::new("c", 6, 7, (99, 99), false, false);
        let (h2, revs) = decode(&bytes, &named, &keys).unwrap();
        assert_eq!((h2, revs), (head, vec![rev]));
        let other = Named::new("c", 6, 8, (99, 99), false, false);
        assert!(decode(&bytes, &other, &keys).is_err());
    }
}
