//! The `snapshot` action: a consistent snapshot through etcd's snapshot API, verified against
//! etcd's sha256 trailer, published as a durable 0600 archive with a manifest and sidecar.

use std::path::PathBuf;

use super::{write_archive, DbSource, Unit};
use crate::catalog;
use crate::error::Error;
use crate::etcd::{hex_id, Client};
use crate::juju::Results;

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub target: PathBuf,
    /// Write nothing when the newest snapshot archive already holds this cluster at this revision.
    pub if_changed: bool,
}

pub fn run(unit: &Unit<'_>, opts: &SnapshotOptions, results: &mut Results) -> Result<(), Error> {
    // Resolve every tool before any side effect.
    let client = Client::new(&unit.config);
    let store = unit.store()?;
    let target = super::open_target(unit, &opts.target)?;
    let _lock = unit.lock("snapshot")?;
    // A restore that crashed must be finished or rolled back before etcd is read.
    super::restore::recover(unit)?;
    if opts.if_changed {
        let status = client.status()?;
        let entries = catalog::list(unit, &opts.target, store.as_ref())?;
        // The newest snapshot archive this tool wrote (backups and foreign files aside).
        if let Some(newest) = entries
            .iter()
            .find(|e| e.ours && e.id.starts_with("etcd-snapshot-"))
        {
            let same_cluster =
                newest.cluster_id.as_deref() == Some(hex_id(status.cluster_id).as_str());
            // A recorded revision is exact (read from the db by `snapshot status`); an
            // archive without one never counts as unchanged.
            if same_cluster && newest.revision == Some(status.revision) {
                unit.log(&format!(
                    "revision {} of cluster {} is already in {}; nothing to do",
                    status.revision,
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
                return Ok(());
            }
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
            upload = super::upload_file(store, folder, &archive.path)?;
        }
        let key = format!("{folder}/{}", archive.name());
        let done = upload
            .commit(&key, archive.object_metadata())
            .map_err(|e| match e {
                Error::Store { store, problem } => Error::Store {
                    store,
                    problem: format!(
                    "the upload of `{key}` failed ({problem}); the local archive `{}` is complete \
                     and verified, and nothing was left under that key",
                    archive.path.display()
                ),
                },
                other => other,
            })?;
        results.set("upload.url", &done.url);
        results.set("upload.etag", &done.etag);
        results.set("upload.size", done.size);
        unit.log(&format!("uploaded {}", done.url));
    }
    Ok(())
}
