//! The `import` action: applies the keys under a prefix from an export file, an archive or a
//! point of the change history to the **running** cluster, as a client: no data swap, any
//! number of units. Stages, each with one job:
//! - open: the source is read whole and checked (an export's head, order, limits, count and
//!   sha256) before anything is written; the cluster must be healthy;
//! - survey: the cluster's keys under the prefix, at one revision, by key, mod revision and a
//!   digest of the value;
//! - plan: source and survey merged in key order into adds, changes and deletes, each with
//!   the mod revision the survey saw (0: absent);
//! - back up: a snapshot of the cluster into `target`, unless `skip-backup` (or a dry run);
//! - apply: the source read again, each planned key checked against its digest, written in
//!   txns of bounded size, each guarded by the mod revisions planning saw. A key someone
//!   changed meanwhile is left as it is and reported as a conflict.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::{write_archive, DbSource, Unit};
use crate::error::Error;
use crate::etcd::kv::{prefix_end, Guarded};
use crate::etcd::{Client, Session};
use crate::exportfile::ExportReader;
use crate::juju::Results;
use crate::keyset::Kv;
use crate::params::{Params, TakesParams};
use crate::sources::{Backup, Taken};

/// etcd's default `--max-txn-ops`: the ops of one txn.
const TXN_OPS: usize = 128;
/// Bytes of keys and values in one txn, well below etcd's default request limit (1.5 MiB).
const TXN_BYTES: usize = 1 << 20;
/// Txns sent together on the connection.
const WINDOW: usize = 8;
/// Keys read from etcd in one range call.
const PAGE: i64 = 1000;
/// Keys of each kind named in the results.
const FIRST_KEYS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Add,
    Overwrite,
    Sync,
}

impl Mode {
    fn parse(s: &str) -> Result<Mode, Error> {
        match s.trim() {
            "add" => Ok(Mode::Add),
            "overwrite" => Ok(Mode::Overwrite),
            "sync" => Ok(Mode::Sync),
            other => Err(Error::usage(format!(
                "mode `{}` is not one of add, overwrite, sync",
                crate::error::bounded(other, 100)
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub file: Option<PathBuf>,
    pub from: Backup,
    pub prefix: Option<String>,
    pub mode: String,
    pub dry_run: bool,
    pub skip_backup: bool,
    pub max_keys: i64,
    pub target: PathBuf,
}

impl From<crate::cli::ImportArgs> for ImportOptions {
    fn from(a: crate::cli::ImportArgs) -> ImportOptions {
        ImportOptions {
            file: a.file,
            from: a.from.into(),
            prefix: a.prefix,
            mode: a.mode,
            dry_run: a.dry_run,
            skip_backup: a.skip_backup,
            max_keys: a.max_keys,
            target: a.target,
        }
    }
}

impl TakesParams for ImportOptions {
    fn take(&mut self, params: &mut Params) -> Result<(), Error> {
        if let Some(f) = params.string("file")? {
            self.file = Some(PathBuf::from(f)).filter(|p| !p.as_os_str().is_empty());
        }
        self.from.take(params, &mut self.target)?;
        if let Some(p) = params.string("prefix")? {
            // Juju gives "" as the default: the export's prefix.
            self.prefix = Some(p).filter(|p| !p.is_empty());
        }
        if let Some(m) = params.string("mode")? {
            self.mode = m;
        }
        self.dry_run = params.boolean("dry-run")?.unwrap_or(true);
        if let Some(b) = params.boolean("skip-backup")? {
            self.skip_backup = b;
        }
        if let Some(n) = params.integer("max-keys")? {
            self.max_keys = n;
        }
        Ok(())
    }
}

/// Where the keys come from.
enum Source {
    /// An export file, read once to plan and once to write.
    File { path: PathBuf, sha256: String },
    /// Keys read offline from a backup.
    Backup(Taken),
}

impl Source {
    /// Calls `f` with every key under `prefix`, in key order.
    fn each(
        &self,
        unit: &Unit<'_>,
        prefix: &[u8],
        f: &mut dyn FnMut(Kv<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        match self {
            Source::File { path, sha256 } => {
                let mut r = ExportReader::open(path, unit.keys()?)?;
                r.recorded = Some(sha256.clone());
                while let Some(kv) = r.next_kv()? {
                    if kv.key.starts_with(prefix) {
                        f(Kv::of(&kv))?;
                    }
                }
                Ok(())
            }
            Source::Backup(taken) => taken.keys.each(prefix, f),
        }
    }
}

/// The source, opened and checked whole, with the prefix to apply.
struct Opened {
    source: Source,
    prefix: Vec<u8>,
    /// In words, and the revision the source holds.
    described: String,
    revision: i64,
}

/// A count of one kind of write, with its first keys.
#[derive(Debug, Default)]
struct Counted {
    n: u64,
    first: Vec<String>,
}

impl Counted {
    fn add(&mut self, key: &[u8]) {
        self.n += 1;
        if self.first.len() < FIRST_KEYS {
            self.first.push(String::from_utf8_lossy(key).into_owned());
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    added: Counted,
    changed: Counted,
    deleted: Counted,
    unchanged: Counted,
    /// Present with another value, left alone by `add`.
    skipped: Counted,
    conflicts: Counted,
    leases_dropped: u64,
}

impl Tally {
    fn touched(&self) -> u64 {
        self.added.n + self.changed.n + self.deleted.n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Change,
    Delete,
}

/// One write planned: the key, what the survey saw (its mod revision, 0: absent), and the
/// digest of the value to write.
struct Planned {
    key: Vec<u8>,
    op: Op,
    guard: i64,
    digest: [u8; 16],
}

/// A key of the cluster as the survey saw it.
struct Seen {
    key: Vec<u8>,
    mod_revision: i64,
    digest: [u8; 16],
}

fn digest(value: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(value);
    d[..16].try_into().expect("16 of 32 bytes")
}

pub fn run(unit: &Unit<'_>, opts: &ImportOptions, results: &mut Results) -> Result<(), Error> {
    let mode = Mode::parse(&opts.mode)?;
    if opts.max_keys < 1 {
        return Err(Error::usage(format!(
            "max-keys {} is not a count: give the most keys the import may touch (1 or more)",
            opts.max_keys
        )));
    }
    let target = if opts.dry_run || opts.skip_backup {
        None
    } else {
        Some(super::open_target(unit, &opts.target)?)
    };
    let _lock = unit.lock("import")?;
    crate::recovery::recover(unit)?;
    let opened = open(unit, opts)?;
    let client = Client::new(&unit.config);
    let session = client.session()?;
    check_health(&session)?;
    let (seen, revision) = survey(&session, &opened.prefix)?;
    let (planned, tally) = plan(unit, &opened, &seen, mode)?;
    drop(seen);
    unit.log(&format!(
        "planned at revision {revision}: {} to add, {} to change, {} to delete, {} unchanged",
        tally.added.n, tally.changed.n, tally.deleted.n, tally.unchanged.n
    ));
    results.set("import.mode", &opts.mode);
    results.set("import.prefix", String::from_utf8_lossy(&opened.prefix));
    results.set("import.source", &opened.described);
    results.set("import.source-revision", opened.revision);
    results.set("import.cluster-revision", revision);
    results.set("import.dry-run", opts.dry_run);
    let touched = tally.touched();
    let too_many = u64::try_from(opts.max_keys).is_ok_and(|max| touched > max);
    if opts.dry_run {
        report(&tally, results);
        let note = if too_many {
            format!(
                "dry run: nothing was written. The import touches {touched} keys, more than \
                 max-keys={}: run it again with max-keys={touched} (or more) and dry-run=false",
                opts.max_keys
            )
        } else {
            "dry run: nothing was written; run again with dry-run=false to apply".to_string()
        };
        results.set("import.note", note);
        return Ok(());
    }
    if too_many {
        return Err(Error::Declined(format!(
            "the import would touch {touched} keys ({} added, {} changed, {} deleted), more \
             than max-keys={}; nothing was written. Check the prefix with a dry run, then \
             raise max-keys to at least {touched}",
            tally.added.n, tally.changed.n, tally.deleted.n, opts.max_keys
        )));
    }
    crate::points::pause_point("import-planned");
    if let Some(target) = &target {
        unit.reporter
            .status("maintenance", "import: backing up the cluster first");
        let b = write_archive(
            unit,
            target,
            DbSource::Live { client: &client },
            "etcd-backup",
            None,
        )?;
        b.report(results, "backup");
    }
    unit.reporter.status("maintenance", "import: writing keys");
    let mut done = apply(unit, &session, &opened, planned, tally.leases_dropped)?;
    done.unchanged = tally.unchanged;
    done.skipped = tally.skipped;
    report(&done, results);
    Ok(())
}

/// Opens the source and reads it whole, checking it, before anything is written; settles
/// the prefix.
fn open(unit: &Unit<'_>, opts: &ImportOptions) -> Result<Opened, Error> {
    match (&opts.file, opts.from.given()) {
        (Some(_), true) => {
            return Err(Error::usage(
                "file and a backup (snapshot, backup-id, to-revision, to-time) both given: give \
                 one source",
            ))
        }
        (None, false) => {
            return Err(Error::usage(
                "no source: give file (an export), snapshot or backup-id (an archive), or \
                 to-revision / to-time (the change history)",
            ))
        }
        _ => {}
    }
    if let Some(path) = &opts.file {
        let mut r = ExportReader::open(path, unit.keys()?)?;
        let export_prefix = r.head.prefix.clone();
        let prefix = opts.prefix.clone().unwrap_or_else(|| export_prefix.clone());
        if !prefix.starts_with(&export_prefix) {
            return Err(Error::BadExport {
                path: path.clone(),
                problem: format!(
                    "prefix `{prefix}` is outside the export's prefix `{export_prefix}`: it \
                     holds only keys under `{export_prefix}`; give a prefix under it, or export \
                     `{prefix}`"
                ),
            });
        }
        let count = r.check_all()?;
        let sha256 = r.sha256().unwrap_or_default();
        if r.recorded.is_none() {
            unit.log(&format!(
                "`{}` has no .sha256 sidecar: checked by its gzip CRC and its count",
                path.display()
            ));
        }
        unit.log(&format!(
            "export `{}` checked: {count} keys under `{export_prefix}` at revision {} of \
             cluster {} ({})",
            path.display(),
            r.head.revision,
            r.head.cluster_id,
            r.head.source
        ));
        return Ok(Opened {
            described: format!("file {}", path.display()),
            revision: r.head.revision,
            source: Source::File {
                path: path.clone(),
                sha256,
            },
            prefix: prefix.into_bytes(),
        });
    }
    let prefix = opts.prefix.clone().unwrap_or_default().into_bytes();
    let taken = crate::sources::read(unit, &opts.from, &prefix, &opts.target)?;
    Ok(Opened {
        described: taken.source.clone(),
        revision: taken.revision,
        source: Source::Backup(taken),
        prefix,
    })
}

/// Refuses a cluster without a leader, or with an alarm or error raised.
fn check_health(session: &Session) -> Result<(), Error> {
    let h = session.health()?;
    if h.leader == 0 {
        return Err(Error::Declined(
            "the cluster has no leader: nothing was written. Bring the cluster back to health \
             (`etcdctl endpoint status --cluster`), then import"
                .into(),
        ));
    }
    if !h.errors.is_empty() {
        return Err(Error::Declined(format!(
            "the cluster is not healthy ({}): nothing was written. Clear the alarm \
             (`etcdctl alarm list`, then `alarm disarm` once resolved), then import",
            crate::error::bounded(&h.errors.join("; "), 1000)
        )));
    }
    Ok(())
}

/// The cluster's keys under `prefix` at one revision, in key order.
fn survey(session: &Session, prefix: &[u8]) -> Result<(Vec<Seen>, i64), Error> {
    let end = prefix_end(prefix);
    let mut seen = Vec::new();
    let mut from = prefix.to_vec();
    let mut revision = 0;
    loop {
        let page = session.range_page(&from, &end, revision, PAGE)?;
        if revision == 0 {
            revision = page.revision;
        }
        for kv in &page.kvs {
            seen.push(Seen {
                key: kv.key.clone(),
                mod_revision: kv.mod_revision,
                digest: digest(&kv.value),
            });
        }
        match page.kvs.last() {
            Some(last) if page.more => {
                from = last.key.clone();
                from.push(0);
            }
            _ => return Ok((seen, revision)),
        }
    }
}

/// Merges the source and the survey, in key order, into the writes `mode` asks for.
fn plan(
    unit: &Unit<'_>,
    opened: &Opened,
    seen: &[Seen],
    mode: Mode,
) -> Result<(Vec<Planned>, Tally), Error> {
    let mut tally = Tally::default();
    let mut planned = Vec::new();
    let mut i = 0;
    let only_in_cluster = |s: &Seen, planned: &mut Vec<Planned>, tally: &mut Tally| {
        if mode == Mode::Sync {
            tally.deleted.add(&s.key);
            planned.push(Planned {
                key: s.key.clone(),
                op: Op::Delete,
                guard: s.mod_revision,
                digest: [0; 16],
            });
        }
    };
    opened.source.each(unit, &opened.prefix, &mut |kv| {
        while i < seen.len() && seen[i].key.as_slice() < kv.key {
            only_in_cluster(&seen[i], &mut planned, &mut tally);
            i += 1;
        }
        let d = digest(kv.value);
        let (op, guard) = match seen.get(i).filter(|s| s.key.as_slice() == kv.key) {
            None => (Some(Op::Add), 0),
            Some(s) => {
                i += 1;
                if s.digest == d {
                    tally.unchanged.add(kv.key);
                    (None, 0)
                } else if mode == Mode::Add {
                    tally.skipped.add(kv.key);
                    (None, 0)
                } else {
                    (Some(Op::Change), s.mod_revision)
                }
            }
        };
        if let Some(op) = op {
            match op {
                Op::Add => tally.added.add(kv.key),
                _ => tally.changed.add(kv.key),
            }
            if kv.lease != 0 {
                tally.leases_dropped += 1;
            }
            planned.push(Planned {
                key: kv.key.to_vec(),
                op,
                guard,
                digest: d,
            });
        }
        Ok(())
    })?;
    for s in &seen[i..] {
        only_in_cluster(s, &mut planned, &mut tally);
    }
    Ok((planned, tally))
}

/// Txns being filled, and sent a window at a time.
struct Writer<'a> {
    session: &'a Session,
    /// Full txns not sent yet, each with what its writes are.
    ready: Vec<(Vec<Guarded>, Vec<Op>)>,
    batch: Vec<Guarded>,
    ops: Vec<Op>,
    bytes: usize,
    done: Tally,
}

impl Writer<'_> {
    fn push(&mut self, g: Guarded, op: Op) -> Result<(), Error> {
        let size = g.key.len() + g.value.as_ref().map_or(0, Vec::len);
        if !self.batch.is_empty() && (self.batch.len() == TXN_OPS || self.bytes + size > TXN_BYTES)
        {
            self.seal();
            if self.ready.len() == WINDOW {
                self.send()?;
            }
        }
        self.bytes += size;
        self.batch.push(g);
        self.ops.push(op);
        Ok(())
    }

    fn seal(&mut self) {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            let ops = std::mem::take(&mut self.ops);
            self.ready.push((batch, ops));
            self.bytes = 0;
        }
    }

    /// Sends the ready txns together. A txn refused (a guard no longer held) is sent again
    /// key by key: what still holds is written, the rest are conflicts.
    fn send(&mut self) -> Result<(), Error> {
        let ready = std::mem::take(&mut self.ready);
        let batches: Vec<&[Guarded]> = ready.iter().map(|(b, _)| b.as_slice()).collect();
        let applied = self.session.guarded_txns(&batches)?;
        crate::points::pause_point("import-window-sent");
        for ((batch, ops), ok) in ready.iter().zip(applied) {
            if ok {
                for (g, op) in batch.iter().zip(ops) {
                    self.count(&g.key, *op);
                }
                continue;
            }
            let singles: Vec<&[Guarded]> = batch.chunks(1).collect();
            let each = self.session.guarded_txns(&singles)?;
            for ((g, op), ok) in batch.iter().zip(ops).zip(each) {
                if ok {
                    self.count(&g.key, *op);
                } else {
                    self.done.conflicts.add(&g.key);
                }
            }
        }
        Ok(())
    }

    fn count(&mut self, key: &[u8], op: Op) {
        match op {
            Op::Add => self.done.added.add(key),
            Op::Change => self.done.changed.add(key),
            Op::Delete => self.done.deleted.add(key),
        }
    }

    fn finish(mut self) -> Result<Tally, Error> {
        self.seal();
        self.send()?;
        Ok(self.done)
    }
}

/// Reads the source again and writes what was planned, each key checked to be the value
/// planned (the file did not change since).
fn apply(
    unit: &Unit<'_>,
    session: &Session,
    opened: &Opened,
    planned: Vec<Planned>,
    leases_dropped: u64,
) -> Result<Tally, Error> {
    let started = std::time::Instant::now();
    let (puts, deletes): (Vec<Planned>, Vec<Planned>) =
        planned.into_iter().partition(|p| p.op != Op::Delete);
    let mut w = Writer {
        session,
        ready: Vec::new(),
        batch: Vec::new(),
        ops: Vec::new(),
        bytes: 0,
        done: Tally::default(),
    };
    let changed = || {
        Error::Declined(
            "the source changed since it was planned: the keys written so far are reported; \
             run the import again (a dry run first)"
                .into(),
        )
    };
    let mut next = puts.iter().peekable();
    opened.source.each(unit, &opened.prefix, &mut |kv| {
        let Some(p) = next.peek().filter(|p| p.key.as_slice() == kv.key) else {
            return Ok(());
        };
        if digest(kv.value) != p.digest {
            return Err(changed());
        }
        w.push(
            Guarded {
                key: kv.key.to_vec(),
                value: Some(kv.value.to_vec()),
                guard: p.guard,
            },
            p.op,
        )?;
        next.next();
        Ok(())
    })?;
    if next.peek().is_some() {
        return Err(changed());
    }
    for d in deletes {
        w.push(
            Guarded {
                key: d.key,
                value: None,
                guard: d.guard,
            },
            Op::Delete,
        )?;
    }
    let mut done = w.finish()?;
    done.leases_dropped = leases_dropped;
    let secs = started.elapsed().as_secs_f64();
    unit.log(&format!(
        "wrote {} keys in {secs:.1}s ({:.0} keys/s), {} conflicts",
        done.touched(),
        done.touched() as f64 / secs.max(1e-3),
        done.conflicts.n
    ));
    Ok(done)
}

fn report(t: &Tally, results: &mut Results) {
    for (name, c) in [
        ("added", &t.added),
        ("changed", &t.changed),
        ("deleted", &t.deleted),
        ("unchanged", &t.unchanged),
        ("skipped", &t.skipped),
        ("conflicts", &t.conflicts),
    ] {
        results.set(&format!("import.{name}"), c.n);
        if !c.first.is_empty() {
            results.set(&format!("import.{name}-keys"), c.first.join(", "));
        }
    }
    results.set("import.leases-dropped", t.leases_dropped);
}
