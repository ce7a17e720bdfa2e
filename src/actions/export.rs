//! The `export` action: the keys under a prefix, as they were at one revision, written to
//! `etcd-export-<stamp>-<cluster>.jsonl.gz` in `target` (see `exportfile`). The source is
//! the live cluster (at its current revision, or at `revision`), an archive (`snapshot` or
//! `backup-id`, read offline), or a point of the change history (`to-revision` / `to-time`).
//! Stages: plan (the source and the target, before anything is read) → read and write (one
//! pass into the export nest) → report.

use std::path::PathBuf;

use super::Unit;
use crate::error::{human_size, Error};
use crate::etcd::kv::prefix_end;
use crate::etcd::{hex_id, Client};
use crate::exportfile::{ExportWriter, Head, Written, EXT, EXT_AGE, FORMAT, KIND};
use crate::fsutil::Dir;
use crate::juju::Results;
use crate::keyset::Kv;
use crate::params::{Params, TakesParams};
use crate::sources::Backup;
use crate::writer::{write_file, Published};

/// Keys read from etcd in one range call.
const PAGE: i64 = 1000;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub prefix: String,
    /// The live cluster's revision to export (0 or none: the current one).
    pub revision: Option<i64>,
    pub from: Backup,
    pub target: PathBuf,
}

impl From<crate::cli::ExportArgs> for ExportOptions {
    fn from(a: crate::cli::ExportArgs) -> ExportOptions {
        ExportOptions {
            prefix: a.prefix,
            revision: a.revision,
            from: a.from.into(),
            target: a.target,
        }
    }
}

impl TakesParams for ExportOptions {
    fn take(&mut self, params: &mut Params) -> Result<(), Error> {
        if let Some(p) = params.string("prefix")? {
            self.prefix = p;
        }
        if let Some(r) = params.integer("revision")? {
            // Juju's schema gives 0 as the default: the current revision.
            self.revision = Some(r).filter(|r| *r != 0);
        }
        self.from.take(params, &mut self.target)
    }
}

/// What was read, for the head and the results.
struct Source {
    cluster_id: String,
    revision: i64,
    count: u64,
    description: String,
}

pub fn run(unit: &Unit<'_>, opts: &ExportOptions, results: &mut Results) -> Result<(), Error> {
    let target = plan(unit, opts)?;
    // Held to the end: the temp file in the target is recorded in the state dir, which
    // recovery (under the lock) tidies after a killed run.
    let _lock = unit.lock("export")?;
    let prefix = opts.prefix.as_bytes();
    let started = std::time::Instant::now();
    let (published, source) = if opts.from.given() {
        let taken = crate::sources::read(unit, &opts.from, prefix, &opts.target)?;
        let source = Source {
            cluster_id: taken.cluster_id.clone(),
            revision: taken.revision,
            count: taken.keys.len() as u64,
            description: taken.source.clone(),
        };
        let published = write(unit, &target, opts, &source, |w| {
            taken.keys.each(prefix, &mut |kv| w.put(kv))
        })?;
        unit.log(&format!(
            "walked {} revisions of the db and its history",
            taken.walked
        ));
        (published, source)
    } else {
        export_live(unit, &target, opts)?
    };
    let seconds = started.elapsed().as_secs_f64();
    unit.log(&format!(
        "exported {} keys under `{}` at revision {} in {seconds:.1}s",
        source.count, opts.prefix, source.revision
    ));
    report(unit, &published, &source, opts, results);
    Ok(())
}

/// Checks the params and opens the target before anything is read.
fn plan(unit: &Unit<'_>, opts: &ExportOptions) -> Result<Dir, Error> {
    opts.from.check()?;
    if opts.revision.is_some() && opts.from.given() {
        return Err(Error::usage(
            "revision is the live cluster's: to export an earlier state from a backup, give \
             to-revision (the change history) or snapshot/backup-id, without revision",
        ));
    }
    if let Some(r) = opts.revision.filter(|r| *r < 0) {
        return Err(Error::usage(format!(
            "revision {r} is not a revision: revisions start at 1"
        )));
    }
    unit.keys()?.check_writes()?;
    super::open_target(unit, &opts.target)
}

/// Reads the live cluster page by page at one revision, straight into the export.
fn export_live(
    unit: &Unit<'_>,
    target: &Dir,
    opts: &ExportOptions,
) -> Result<(Published, Source), Error> {
    let client = Client::new(&unit.config);
    let session = client.session()?;
    let status = session.health()?;
    let prefix = opts.prefix.as_bytes();
    let end = prefix_end(prefix);
    let revision = opts.revision.unwrap_or(status.revision);
    let count = session
        .count(prefix, &end, revision)
        .map_err(|e| revision_gone(e, revision))?;
    let source = Source {
        cluster_id: hex_id(status.cluster_id),
        revision,
        count,
        description: "live".into(),
    };
    unit.log(&format!(
        "exporting {count} keys under `{}` at revision {revision} from {}",
        opts.prefix,
        client.endpoint()
    ));
    let published = write(unit, target, opts, &source, |w| {
        let mut from = prefix.to_vec();
        loop {
            let page = session
                .range_page(&from, &end, revision, PAGE)
                .map_err(|e| revision_gone(e, revision))?;
            for kv in &page.kvs {
                w.put(Kv::of(kv))?;
            }
            match page.kvs.last() {
                Some(last) if page.more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    })?;
    Ok((published, source))
}

/// A range at a compacted or future revision, in words.
fn revision_gone(e: Error, revision: i64) -> Error {
    match e {
        Error::Etcd { ref detail, .. } if detail.contains("compacted") => Error::usage(format!(
            "revision {revision} is compacted in the live cluster; export that state from a \
             backup instead: to-revision={revision} (the change history) or a backup-id"
        )),
        Error::Etcd { ref detail, .. } if detail.contains("future revision") => {
            Error::usage(format!(
                "revision {revision} is past the cluster's current revision; give 0 for the \
                 current one"
            ))
        }
        other => other,
    }
}

/// Writes the export through its nest and publishes it with its sidecar.
fn write(
    unit: &Unit<'_>,
    target: &Dir,
    opts: &ExportOptions,
    source: &Source,
    keys: impl FnOnce(&mut ExportWriter) -> Result<(), Error>,
) -> Result<Published, Error> {
    let head = Head {
        format: FORMAT.into(),
        cluster_id: source.cluster_id.clone(),
        revision: source.revision,
        prefix: opts.prefix.clone(),
        count: source.count,
        source: source.description.clone(),
        created: crate::manifest::rfc3339(crate::manifest::now_secs()),
    };
    let encryptor = unit.keys()?.encryptor()?;
    let ext = if encryptor.is_some() { EXT_AGE } else { EXT };
    write_file(unit, target, KIND, &source.cluster_id, ext, |file| {
        let mut w = ExportWriter::new(file, encryptor, &head)?;
        keys(&mut w)?;
        let Written { sha256, bytes, .. } = w.finish()?;
        Ok((sha256, bytes))
    })
}

fn report(
    unit: &Unit<'_>,
    published: &Published,
    source: &Source,
    opts: &ExportOptions,
    results: &mut Results,
) {
    results.set("export.path", published.path.display());
    results.set("export.sha256", &published.sha256);
    results.set("export.size", human_size(published.bytes));
    results.set("export.bytes", published.bytes);
    results.set("export.keys", source.count);
    results.set("export.revision", source.revision);
    results.set("export.prefix", &opts.prefix);
    results.set("export.source", &source.description);
    results.set("export.cluster-id", &source.cluster_id);
    if let Ok(keys) = unit.keys() {
        if keys.encrypts() {
            results.set("export.encryption", "age");
            results.set("export.recipients", keys.recipients().join(","));
        }
    }
    results.set("copy.cmd", unit.reporter.copy_command(&published.path));
}
