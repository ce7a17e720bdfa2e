//! Where an export or an import takes its keys from, when not from the live cluster: an
//! archive (a path, or a backup id in the target or the store) or a point of the change
//! history (`to-revision` / `to-time`: the full snapshot restore would start from, and the
//! history after it). Read offline: the archive is checked as restore checks it (through
//! `catalog`), its db read with our own bbolt reader (`keyset`), the history applied on top
//! (through `replay::each_revision`). No etcd runs.

use std::path::{Path, PathBuf};

use crate::catalog::{self, Wanted};
use crate::error::Error;
use crate::etcd::{hex_id, OfflineTool};
use crate::fsutil::TempPath;
use crate::keyset::KeySet;
use crate::replay;
use crate::unit::Unit;

/// The params that name a backup as the source.
#[derive(Debug, Clone, Default)]
pub struct Backup {
    pub snapshot: Option<PathBuf>,
    pub backup_id: Option<String>,
    pub to_revision: Option<i64>,
    pub to_time: Option<String>,
    /// The application whose store folder holds the archives and the history.
    pub from_app: Option<String>,
}

impl From<crate::cli::BackupSourceArgs> for Backup {
    fn from(a: crate::cli::BackupSourceArgs) -> Backup {
        Backup {
            snapshot: a.snapshot,
            backup_id: a.backup_id,
            to_revision: a.to_revision,
            to_time: a.to_time,
            from_app: a.from_app.filter(|a| !a.trim().is_empty()),
        }
    }
}

impl Backup {
    /// Takes `target`, `snapshot`, `backup-id`, `to-revision`, `to-time` and `from-app` from
    /// an action's params (empty and 0: unset).
    pub fn take(
        &mut self,
        params: &mut crate::params::Params,
        target: &mut PathBuf,
    ) -> Result<(), Error> {
        params.archive(target, &mut self.snapshot, &mut self.backup_id)?;
        if let Some(r) = params.integer("to-revision")? {
            self.to_revision = Some(r).filter(|r| *r != 0);
        }
        if let Some(t) = params.string("to-time")? {
            self.to_time = Some(t).filter(|t| !t.trim().is_empty());
        }
        if let Some(a) = params.string("from-app")? {
            self.from_app = Some(a.trim().to_string()).filter(|a| !a.is_empty());
        }
        Ok(())
    }

    /// Whether any of them is given.
    pub fn given(&self) -> bool {
        self.snapshot.is_some()
            || self.backup_id.is_some()
            || self.to_revision.is_some()
            || self.to_time.is_some()
    }

    /// Refuses an archive and a point together: the point picks its full snapshot.
    pub fn check(&self) -> Result<Option<replay::Wanted>, Error> {
        let wanted = replay::wanted(self.to_revision, self.to_time.as_deref())?;
        if wanted.is_some() && (self.snapshot.is_some() || self.backup_id.is_some()) {
            return Err(Error::usage(
                "to-revision and to-time pick the full snapshot themselves: leave snapshot and \
                 backup-id empty",
            ));
        }
        if let Some(app) = &self.from_app {
            catalog::check_id(app).map_err(|_| {
                Error::usage(format!(
                    "from-app `{}` is not an application name; give the name of the \
                     application whose backups to use (as `juju status` shows it)",
                    crate::error::bounded(app, 100)
                ))
            })?;
        }
        Ok(wanted)
    }
}

impl Backup {
    /// Checks the params, resolves the point of the history when one is asked for, and
    /// names the archive to read: the point's full snapshot, or the backup id given (another
    /// application's archive is `<app>/<id>`, its store folder).
    pub fn resolve(
        &self,
        unit: &Unit<'_>,
        target: &Path,
    ) -> Result<(Option<replay::Point>, Option<String>), Error> {
        let wanted = self.check()?;
        let in_app = |id: &str| match &self.from_app {
            Some(app) if !id.contains('/') => format!("{app}/{id}"),
            _ => id.to_string(),
        };
        let point = match &wanted {
            Some(w) => {
                let store = unit.store()?;
                Some(replay::resolve(
                    unit,
                    target,
                    store.as_ref(),
                    w,
                    self.from_app.as_deref(),
                )?)
            }
            None => None,
        };
        let backup_id = match &point {
            // A base that is in the target too is read from there.
            Some(p) if p.base.path.is_some() => Some(p.base.id.clone()),
            Some(p) => Some(in_app(&p.base.id)),
            None => self.backup_id.as_deref().map(in_app),
        };
        Ok((point, backup_id))
    }
}

/// The keys under a prefix as a backup holds them.
pub struct Taken {
    /// The keys; their values are read from the unpacked db (unlinked already, held open).
    pub keys: KeySet,
    pub cluster_id: String,
    pub revision: i64,
    /// In words, for the export's head and the results.
    pub source: String,
    /// Entries (revisions) of the db walked, and changes of the history applied.
    pub walked: u64,
}

/// Reads the keys under `prefix` from the backup `from` names; `target` holds the local
/// archives and history.
pub fn read(unit: &Unit<'_>, from: &Backup, prefix: &[u8], target: &Path) -> Result<Taken, Error> {
    let (point, backup_id) = from.resolve(unit, target)?;
    let mut taken = read_archive(
        unit,
        from.snapshot.as_deref(),
        backup_id.as_deref(),
        prefix,
        target,
    )?;
    if let Some(point) = point {
        if taken.revision != point.base_revision {
            return Err(Error::History(format!(
                "the full snapshot {} holds revision {}, where the history expects {}",
                point.base.id, taken.revision, point.base_revision
            )));
        }
        let store = unit.store()?;
        let mut changes = 0u64;
        replay::each_revision(&point, store.as_ref(), unit.keys()?, &mut |f, revs| {
            for rev in revs {
                for ev in &rev.ev {
                    let c = ev.change().map_err(|e| {
                        Error::History(format!("change segment `{}`: {e}", f.named.name))
                    })?;
                    taken.keys.apply(prefix, c);
                    changes += 1;
                }
            }
            Ok(())
        })?;
        taken.walked += changes;
        taken.revision = point.revision;
        taken.source = format!("history {} from {}", point.asked, taken.source);
    }
    Ok(taken)
}

/// Checks the archive as restore would, unpacked into the state dir, and reads its db.
fn read_archive(
    unit: &Unit<'_>,
    snapshot: Option<&Path>,
    backup_id: Option<&str>,
    prefix: &[u8],
    target: &Path,
) -> Result<Taken, Error> {
    let offline = OfflineTool::detect(unit.settings)?;
    let located = catalog::locate(
        unit,
        &Wanted {
            snapshot,
            backup_id,
            target,
        },
    )?;
    let db = TempPath::new(unit.state.join(format!("keys-{}.db", std::process::id())));
    let checked = catalog::check_located(unit, located, None, &offline, db.path())?;
    unit.log(&format!(
        "reading the keys of {} offline ({})",
        checked.shown.display(),
        checked.integrity
    ));
    let (keys, walked) = KeySet::from_db(db.path(), prefix).map_err(|e| Error::BadArchive {
        path: checked.shown.clone(),
        problem: format!("its db cannot be read: {e}"),
    })?;
    let cluster_id = checked
        .unpacked
        .manifest
        .as_ref()
        .and_then(|m| m.cluster_id.clone())
        .unwrap_or_else(|| hex_id(0));
    Ok(Taken {
        keys,
        cluster_id,
        revision: checked.revision,
        source: format!("archive {}", checked.id),
        walked,
    })
}
