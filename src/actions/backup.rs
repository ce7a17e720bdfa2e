//! `etcd-actions backup`, for timers: a snapshot if anything changed (uploaded when a store is
//! configured), then a prune by `ETCD_ACTIONS_RETENTION` that never removes what it just wrote.

use super::prune::PruneOptions;
use super::snapshot::SnapshotOptions;
use super::Unit;
use crate::cli::BackupArgs;
use crate::config::Settings;
use crate::error::Error;
use crate::juju::{Reporter, Results};
use crate::retention::Policy;

pub fn run(
    reporter: &Reporter,
    settings: &Settings,
    a: BackupArgs,
    results: &mut Results,
) -> Result<(), Error> {
    // Parsed before anything runs: a bad policy deletes nothing and takes no snapshot.
    let policy = Policy::parse(&a.retention)
        .map_err(|e| Error::usage(format!("ETCD_ACTIONS_RETENTION: {e}")))?;
    let unit = Unit::open(reporter, settings)?;
    let written = super::snapshot::run(
        &unit,
        &SnapshotOptions {
            target: a.target.clone(),
            if_changed: true,
        },
        results,
    )?;
    if policy.keeps_nothing() {
        results.set(
            "prune.skipped",
            "no retention policy (ETCD_ACTIONS_RETENTION)",
        );
        return Ok(());
    }
    super::prune::run(
        &unit,
        &PruneOptions {
            target: a.target,
            policy,
            dry_run: false,
            // Whatever the clock or the names say, this run's archive stays.
            protect: Some(written),
        },
        results,
    )
}
