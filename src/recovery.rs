//! Crash recovery: the restore journal and what the next run of any action does with it
//! (finish or roll back an interrupted restore, put etcd's service back, remove what killed
//! runs left in the state dir). Snapshot, restore, verify and prune call `recover` under the
//! unit lock; only restore writes journals.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext};
use crate::fsutil::{exchange, remove_any, sync_dir, write_atomic};
use crate::process::run_shell;
use crate::unit::Unit;

/// Where a deep verify records its throwaway etcd while it runs.
pub const DRILL_RECORD: &str = "drill.pid";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Staged; live data untouched.
    Prepared,
    /// The service is (being) stopped.
    Stopped,
    /// New data swapped in, not yet verified.
    Swapped,
    /// New data verified: finish forward.
    Committed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Journal {
    pub pid: u32,
    pub started: String,
    pub phase: Phase,
    /// Inode of the restored member dir.
    pub new_inode: u64,
    /// Inode of the member dir it replaces, if there was one.
    pub old_inode: Option<u64>,
}

pub fn inode(path: &Path) -> Option<u64> {
    fs::symlink_metadata(path).ok().map(|m| m.ino())
}

pub struct Paths {
    pub member: PathBuf,
    pub staging: PathBuf,
    pub staged_member: PathBuf,
    pub incoming_db: PathBuf,
    pub journal: PathBuf,
    /// The member dir the last successful restore replaced.
    pub previous: PathBuf,
    pub previous_info: PathBuf,
}

pub fn paths(unit: &Unit<'_>) -> Paths {
    let staging = unit.state.join("staging");
    Paths {
        member: unit.config.member_dir(),
        staged_member: staging.join("member"),
        staging,
        incoming_db: unit.state.join("incoming.db"),
        journal: unit.state.join("restore-journal.yaml"),
        previous: unit.state.join(PREVIOUS),
        previous_info: unit.state.join(format!("{PREVIOUS}.yaml")),
    }
}

/// Name of the kept member dir in the state dir.
pub const PREVIOUS: &str = "previous-member";

/// Moves the member dir a restore replaced (in staging) to `previous-member`, replacing the
/// one an earlier restore kept, and records when and why.
pub fn keep_previous(unit: &Unit<'_>, p: &Paths, started: &str) -> Result<(), Error> {
    remove_any(&p.previous_info)?;
    remove_any(&p.previous)?;
    fs::rename(&p.staged_member, &p.previous).ctx(|| {
        format!(
            "cannot keep the previous data as `{}`",
            p.previous.display()
        )
    })?;
    let info = format!(
        "# The member dir that etcd served until the restore started at {started}.\n\
         # It holds every write etcd acknowledged before it was stopped for that restore.\n\
         # Kept until the next successful restore. To go back to it: stop etcd, move\n\
         # {member} aside, move this directory to {member}, start etcd.\n\
         replaced-by-restore-at: {started}\n",
        member = p.member.display()
    );
    write_atomic(&p.previous_info, info.as_bytes())?;
    sync_dir(&unit.state)
}

pub fn write_journal(p: &Paths, j: &Journal) -> Result<(), Error> {
    write_atomic(
        &p.journal,
        serde_yaml::to_string(j)
            .expect("journal serializes")
            .as_bytes(),
    )
}

pub fn stop_service(unit: &Unit<'_>) -> Result<(), Error> {
    unit.log("stopping etcd");
    run_shell(
        &unit.settings.stop_command,
        &unit.state,
        unit.settings.service_timeout,
    )
    .map(drop)
}

pub fn start_service(unit: &Unit<'_>) -> Result<(), Error> {
    unit.log("starting etcd");
    run_shell(
        &unit.settings.start_command,
        &unit.state,
        unit.settings.service_timeout,
    )
    .map(drop)
}

/// Finishes or rolls back a restore that a crash interrupted, removes its leftovers, and
/// leaves the service running. Runs under the unit lock at the start of every action.
pub fn recover(unit: &Unit<'_>) -> Result<(), Error> {
    // Temp dirs of archive writers that were killed, in whatever target they wrote to.
    crate::writer::clean_killed_writers(&unit.state);
    if !unit.config.local {
        // Only a connection was given: no data of etcd's here, nothing to recover.
        return Ok(());
    }
    let p = paths(unit);
    let journal = match fs::read_to_string(&p.journal) {
        Ok(text) => {
            Some(
                serde_yaml::from_str::<Journal>(&text).map_err(|e| Error::RestoreFailed {
                    detail: format!(
                        "the restore journal `{}` is unreadable ({e})",
                        p.journal.display()
                    ),
                    outcome: format!(
                        "nothing was changed; check which data `{}` holds, then remove the journal",
                        p.member.display()
                    ),
                })?,
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Error::io(
                format!("cannot read `{}`", p.journal.display()),
                e,
            ))
        }
    };
    if let Some(j) = &journal {
        unit.log(&format!(
            "found an interrupted restore (phase {:?}, pid {}); recovering",
            j.phase, j.pid
        ));
        let live = inode(&p.member);
        if live == Some(j.new_inode) && j.phase != Phase::Committed {
            // The unverified new data is live: put the old data back.
            stop_service(unit)?;
            if j.old_inode.is_some() && inode(&p.staged_member) == j.old_inode {
                exchange(&p.staged_member, &p.member)?;
            } else {
                let aside = p.staging.join("rolled-back");
                fs::rename(&p.member, &aside)
                    .ctx(|| format!("cannot move `{}` aside", p.member.display()))?;
            }
            sync_dir(&unit.config.data_dir)?;
            sync_dir(&p.staging)?;
            unit.log("rolled back to the data that was there before the interrupted restore");
        } else if live == Some(j.new_inode) {
            unit.log("the interrupted restore had been verified; finishing it");
            if j.old_inode.is_some() && inode(&p.staged_member) == j.old_inode {
                keep_previous(unit, &p, &j.started)?;
                unit.log(&format!(
                    "kept the data it replaced in `{}`",
                    p.previous.display()
                ));
            }
        }
    }
    remove_any(&p.staging)?;
    remove_any(&p.incoming_db)?;
    // A drill's throwaway etcd left by a killed verify: ended before its files go.
    crate::process::end_recorded(&unit.state.join(DRILL_RECORD));
    // Output files of service commands a killed run was running.
    for entry in fs::read_dir(&unit.state).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Under the lock no other run writes here: every temp file is a killed run's.
        let killed_output = (name.starts_with("service-") || name.starts_with("etcdctl-save-"))
            && (name.ends_with(".out") || name.ends_with(".err") || name.ends_with(".log"));
        let atomic_temp = name.starts_with('.') && name.contains(".tmp-");
        let verify_leftover =
            (name.starts_with("verify-") && name.ends_with(".db")) || name.starts_with("drill-");
        if verify_leftover {
            let _ = remove_any(&entry.path());
            continue;
        }
        if killed_output || atomic_temp {
            let _ = fs::remove_file(entry.path());
        }
    }
    if let Some(j) = journal {
        if j.phase >= Phase::Stopped {
            start_service(unit)?;
        }
        remove_any(&p.journal)?;
        sync_dir(&unit.state)?;
    }
    Ok(())
}
