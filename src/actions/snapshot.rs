//! The `snapshot` action: a consistent snapshot through etcd's snapshot API, verified against
//! etcd's sha256 trailer, published as a durable 0600 archive with a manifest and sidecar, and
//! uploaded when a store is configured.
//!
//! With `if-changed`, nothing new is written when this cluster's newest archive already holds
//! what etcd holds now: the same revision (keys) and the same raft applied index (which also
//! moves with users, roles and leases). "Unchanged" also means "in the store" when one is
//! configured: a newest archive that only exists locally (its upload failed) is uploaded now.

use std::path::PathBuf;

use super::{upload_file, write_archive, Archive, DbSource, Unit};
use crate::catalog::{self, Entry};
use crate::error::Error;
use crate::etcd::{hex_id, Client, Marks, Status};
use crate::fsutil::Dir;
use crate::juju::Results;
use crate::params::{Params, TakesParams};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub target: PathBuf,
    /// Write nothing when the newest snapshot archive already holds this cluster as it is.
    pub if_changed: bool,
}

impl From<crate::cli::SnapshotArgs> for SnapshotOptions {
    fn from(a: crate::cli::SnapshotArgs) -> SnapshotOptions {
        SnapshotOptions {
            target: a.target,
            if_changed: a.if_changed,
        }
    }
}

impl TakesParams for SnapshotOptions {
    fn take(&mut self, params: &mut Params) -> Result<(), Error> {
        if let Some(t) = params.string("target")? {
            self.target = PathBuf::from(t);
        }
        if let Some(b) = params.boolean("if-changed")? {
            self.if_changed = b;
        }
        Ok(())
    }
}

/// Runs the action; returns the id of the archive the results describe (new or unchanged).
pub fn run(
    unit: &Unit<'_>,
    opts: &SnapshotOptions,
    results: &mut Results,
) -> Result<String, Error> {
    // Resolve every tool before any side effect.
    let client = Client::new(&unit.config);
    let store = unit.store()?;
    let target = super::open_target(unit, &opts.target)?;
    let _lock = unit.lock("snapshot")?;
    // A restore that crashed must be finished or rolled back before etcd is read.
    crate::recovery::recover(unit)?;
    if opts.if_changed {
        let status = client.status()?;
        if let Some(id) = unchanged(
            unit,
            opts,
            store.as_ref(),
            &target,
            &client,
            &status,
            results,
        )? {
            return Ok(id);
        }
    }
    let folder = store.as_ref().map(|s| unit.store_folder(s));
    let upload = match (&store, &folder) {
        (Some(s), Some(f)) => {
            unit.log(&format!(
                "uploading to {} as it is written",
                s.cfg.describe()
            ));
            Some(s.start_upload(f))
        }
        _ => None,
    };
    let archive = write_archive(
        unit,
        &target,
        DbSource::Live { client: &client },
        "etcd-snapshot",
        upload.as_ref().map(|u| u.tee()),
    )?;
    archive.report(results, "snapshot");
    results.set("copy.cmd", unit.reporter.copy_command(&archive.path));
    if let (Some(store), Some(folder), Some(mut upload)) = (&store, &folder, upload) {
        if !archive.uploaded {
            drop(upload);
            upload = upload_again(store, folder, &archive)?;
        }
        commit(unit, (store, &target, folder), upload, &archive, results)?;
    }
    Ok(archive.name())
}

/// Whether an archive holds what etcd holds now. The revision (read from the db, exact) covers
/// keys. Users, roles, grants and leases do not move it: where etcd reports them (3.5 and
/// later), the auth revision and the lease ids must be the same too; elsewhere (3.4, or an
/// archive of an older version) the raft applied index, which moves with every change but also
/// with elections and restarts (then one snapshot more is taken). An archive that records
/// neither never counts as unchanged.
fn holds_what_etcd_holds(e: &Entry, status: &Status, now: &Marks) -> bool {
    if e.revision != Some(status.revision) {
        return false;
    }
    match (e.auth_revision, &e.leases, now.auth_revision, &now.leases) {
        (Some(a), Some(l), Some(na), Some(nl)) => a == na && l == nl,
        _ => status.applied_index > 0 && e.applied_index == Some(status.applied_index),
    }
}

/// Completes an upload of `archive` under its own name, and reports it. When another unit of
/// this cluster took that key in the same second (every unit's timer fires at once), the
/// archive takes the next name free here and in the store, and is uploaded under it. When the
/// object written was not the archive (bytes changed on the way, not caught before), it was
/// removed, and the archive is uploaded again under the same name.
fn commit(
    unit: &Unit<'_>,
    (store, target, folder): (&Store, &Dir, &str),
    upload: crate::store::Upload,
    archive: &Archive,
    results: &mut Results,
) -> Result<(), Error> {
    let key = format!("{folder}/{}", archive.name());
    let mut done = upload.commit(&key, &archive.record());
    let mut current = archive.clone();
    for _ in 0..4 {
        log_store_notes(unit);
        match &done {
            Err(Error::StoreConflict { .. }) => {}
            Err(Error::StoreUnconfirmed { .. }) => {
                unit.log(&format!(
                    "{}; uploading `{}` again",
                    done.as_ref()
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    current.name()
                ));
                let again = upload_again(store, folder, &current)?;
                done = again.commit(&format!("{folder}/{}", current.name()), &current.record());
                continue;
            }
            _ => break,
        }
        let renamed = crate::writer::renamed_for_store(target, &current, store, folder)?;
        unit.log(&format!(
            "`{folder}/{}` was taken by another archive (another unit of this cluster, in the \
             same second): uploading this one as `{}`",
            current.name(),
            renamed.name()
        ));
        let again = upload_again(store, folder, &renamed)?;
        if results.get("snapshot.path").is_some() && results.get("snapshot.skipped").is_none() {
            renamed.report(results, "snapshot");
            results.set("copy.cmd", unit.reporter.copy_command(&renamed.path));
        } else if results.get("snapshot.path").is_some() {
            results.set("snapshot.path", renamed.path.display());
        }
        done = again.commit(&format!("{folder}/{}", renamed.name()), &renamed.record());
        current = renamed;
    }
    log_store_notes(unit);
    let done = done.map_err(|e| match e {
        Error::Store { store, problem } => Error::Store {
            store,
            problem: format!(
                "the upload of `{key}` failed ({problem}); the local archive `{}` is complete \
                     and verified, nothing was left under that key, and the next `snapshot \
                     --if-changed` (or `backup`) uploads it",
                current.path.display()
            ),
        },
        other => other,
    })?;
    report_upload(unit, done, results)
}

/// Logs what the store was found to refuse or ignore (once a run).
fn log_store_notes(unit: &Unit<'_>) {
    for note in crate::store::take_notes() {
        unit.log(&note);
    }
}

/// Uploads a published archive by reading it again; the upload may be completed only when the
/// bytes read are the archive's.
fn upload_again(
    store: &Store,
    folder: &str,
    archive: &Archive,
) -> Result<crate::store::Upload, Error> {
    let (upload, sha, _) = upload_file(store, folder, &archive.path)?;
    if sha != archive.sha256 {
        return Err(changed_under_us(&archive.path, &archive.sha256, sha));
    }
    Ok(upload)
}

fn report_upload(
    unit: &Unit<'_>,
    done: crate::store::Uploaded,
    results: &mut Results,
) -> Result<(), Error> {
    results.set("upload.url", &done.url);
    results.set("upload.etag", &done.etag);
    results.set("upload.size", done.size);
    results.set("upload.confirmed", done.confirmed.as_str());
    results.set("upload.checksum", done.checksum);
    unit.log(&format!(
        "uploaded {} ({} bytes; confirmed by its {})",
        done.url,
        done.size,
        done.confirmed.as_str()
    ));
    Ok(())
}

/// With `if-changed`: when this cluster's newest snapshot holds what etcd holds now, reports
/// it (uploading it first if a store is configured and it is not there) and returns its id.
fn unchanged(
    unit: &Unit<'_>,
    opts: &SnapshotOptions,
    store: Option<&Store>,
    target: &Dir,
    client: &Client,
    status: &Status,
    results: &mut Results,
) -> Result<Option<String>, Error> {
    let owner = crate::catalog::Owner::of(unit, status.cluster_id);
    let entries = catalog::list(unit, &opts.target, store)?;
    let now = crate::manifest::now_secs() as i64;
    // This cluster's newest snapshot archive (backups, foreign files, other clusters' archives
    // and archives dated in the future aside).
    let Some(newest) = entries.iter().find(|e| {
        e.id.starts_with("etcd-snapshot-")
            && owner.owns_snapshot(e)
            && !crate::actions::prune::in_future(e, now)
    }) else {
        return Ok(None);
    };
    if !holds_what_etcd_holds(newest, status, &client.marks()?) {
        return Ok(None);
    }
    if unit.keys()?.encrypts() && !newest.encrypted {
        // Encryption was turned on since: the data is written again, encrypted.
        unit.log(&format!(
            "{} holds this revision but is not encrypted, and recipients are set: taking an \
             encrypted snapshot",
            newest.id
        ));
        return Ok(None);
    }
    if let (Some(store), None, Some(path)) = (store, &newest.url, &newest.path) {
        unit.log(&format!(
            "{} is unchanged but not in the store: uploading it",
            newest.id
        ));
        upload_existing(unit, store, target, newest, path, results)?;
    }
    unit.log(&format!(
        "revision {} (applied index {}) of cluster {} is already in {}; nothing to do",
        status.revision,
        status.applied_index,
        hex_id(status.cluster_id),
        newest.id
    ));
    results.set("snapshot.skipped", format!("unchanged since {}", newest.id));
    results.set("snapshot.revision", status.revision);
    if let Some(p) = &newest.path {
        results.set("snapshot.path", p.display());
        results.set("copy.cmd", unit.reporter.copy_command(p));
    }
    if let Some(u) = &newest.url {
        results.set("upload.url", u);
    }
    Ok(Some(newest.id.clone()))
}

fn changed_under_us(path: &std::path::Path, recorded: &str, actual: String) -> Error {
    Error::Mismatch {
        what: format!("the sha256 of `{}`", path.display()),
        expected: recorded.to_string(),
        actual,
        hint: "the archive changed since it was written, so it is not uploaded (nothing in the \
               store changed); take a new snapshot without --if-changed"
            .into(),
    }
}

/// Uploads an archive already published in `target`: its bytes are read once, hashed as they
/// go, and the upload is completed only when they match its sidecar.
fn upload_existing(
    unit: &Unit<'_>,
    store: &Store,
    target: &Dir,
    e: &Entry,
    path: &std::path::Path,
    results: &mut Results,
) -> Result<(), Error> {
    let record = catalog::local_record(target, &e.id).ok_or_else(|| Error::BadArchive {
        path: path.to_path_buf(),
        problem: "its manifest cannot be read, so it is not uploaded; take a new snapshot".into(),
    })?;
    let folder = unit.store_folder(store);
    let (upload, sha, bytes) = upload_file(store, &folder, path)?;
    let recorded = e.sha256.clone().unwrap_or_default();
    if recorded != sha {
        return Err(changed_under_us(path, &recorded, sha));
    }
    let archive = Archive {
        path: path.to_path_buf(),
        sha256: sha,
        bytes,
        manifest: record.manifest,
        uploaded: true,
        recipients: record.recipients,
    };
    commit(unit, (store, target, &folder), upload, &archive, results)
}
