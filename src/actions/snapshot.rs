//! The `snapshot` action: a consistent snapshot through etcd's snapshot API, verified against
//! etcd's sha256 trailer, published as a durable 0600 archive with a manifest and sidecar.

use std::path::PathBuf;

use super::{write_archive, DbSource, Unit};
use crate::error::Error;
use crate::etcd::{Etcdctl, OfflineTool};
use crate::juju::Results;

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub target: PathBuf,
}

pub fn run(unit: &Unit<'_>, opts: &SnapshotOptions, results: &mut Results) -> Result<(), Error> {
    // Resolve every tool before any side effect.
    let etcdctl = Etcdctl::new(unit.settings, &unit.config)?;
    let offline = OfflineTool::detect(unit.settings)?;
    let target = super::open_target(unit, &opts.target)?;
    let _lock = unit.lock("snapshot")?;
    // A restore that crashed must be finished or rolled back before etcd is read.
    super::restore::recover(unit)?;
    let archive = write_archive(
        unit,
        &target,
        DbSource::Live {
            etcdctl: &etcdctl,
            offline: &offline,
        },
        "etcd-snapshot",
    )?;
    archive.report(results, "snapshot");
    results.set("copy.cmd", unit.reporter.copy_command(&archive.path));
    Ok(())
}
