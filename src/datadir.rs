//! Facts about etcd's data filesystem that restore, verify and the archive check share: what a
//! restored member needs beside its db, and the reserve left for the live etcd.

use crate::error::{Error, IoContext};
use crate::unit::Unit;

/// Free space that staging leaves on the data filesystem for the live etcd, which keeps
/// writing its WAL and db while the restore is prepared: 5% of the filesystem, at least 64 MiB
/// (one more WAL segment beyond the one etcd keeps preallocated) and at most 1 GiB.
pub fn staging_reserve(fs_bytes: u64) -> u64 {
    (fs_bytes / 20).clamp(64 << 20, 1 << 30)
}

/// The reserve of the unit's data filesystem (`staging_reserve` of its size).
pub fn data_reserve(unit: &Unit<'_>) -> Result<u64, Error> {
    let fs = nix::sys::statvfs::statvfs(&unit.state)
        .ctx(|| format!("cannot statvfs `{}`", unit.state.display()))?;
    Ok(staging_reserve(
        fs.blocks() as u64 * fs.fragment_size() as u64,
    ))
}

/// What the restore tool writes besides the db: the first preallocated WAL segment.
pub const WAL_SEGMENT: u64 = 64 << 20;
