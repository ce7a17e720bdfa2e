//! The actions, one file each. What they share lives in lower rooms: the unit
//! (`crate::unit`), the archive writer (`crate::writer`), finding and checking archives
//! (`crate::catalog`), crash recovery (`crate::recovery`).

pub mod backup;
pub mod export;
pub mod follow;
pub mod import;
pub mod list_backups;
pub mod prune;
pub mod restore;
pub mod schedule;
pub mod snapshot;
pub mod status;
pub mod verify;

pub use crate::points::{crash_point, pause_point};
pub use crate::unit::{juju_identity, open_target, refuse_target_in_data_dir, Unit};
pub use crate::writer::{upload_file, write_archive, Archive, DbSource};
