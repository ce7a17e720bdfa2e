//! The unit an action runs on: its settings, etcd's config, the state directory and lock, its
//! object store, whose archives it owns, and where its archives may go.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{EtcdConfig, Settings};
use crate::error::{Error, IoContext};
use crate::fsutil::{Dir, UnitLock};
use crate::juju::Reporter;
use crate::store::{Store, StoreConfig};

/// Everything an action knows about this unit.
pub struct Unit<'a> {
    pub reporter: &'a Reporter,
    pub settings: &'a Settings,
    pub config: EtcdConfig,
    /// `<data-dir>/.etcd-actions`: lock, restore journal and staging, on the data filesystem.
    pub state: PathBuf,
    /// The age keys, read once when first asked for.
    keys: std::cell::OnceCell<crate::crypt::Keys>,
}

impl<'a> Unit<'a> {
    pub fn open(reporter: &'a Reporter, settings: &'a Settings) -> Result<Unit<'a>, Error> {
        let config = EtcdConfig::resolve(settings)?;
        let state = config.data_dir.join(".etcd-actions");
        Ok(Unit {
            reporter,
            settings,
            config,
            state,
            keys: std::cell::OnceCell::new(),
        })
    }

    /// The age keys in force: the settings', and in Juju (an action, or the timer's
    /// `juju-exec`) those of the secret the `backup-encryption-secret` option names.
    pub fn keys(&self) -> Result<&crate::crypt::Keys, Error> {
        if let Some(k) = self.keys.get() {
            return Ok(k);
        }
        let keys = crate::crypt::Keys::load(&self.settings.keys, self.in_juju())?;
        Ok(self.keys.get_or_init(|| keys))
    }

    /// Whether the hook tools of a Juju unit are at hand.
    fn in_juju(&self) -> bool {
        self.reporter.is_juju()
            || (std::env::var_os("JUJU_UNIT_NAME").is_some()
                && which::which("relation-ids").is_ok())
    }

    /// Creates the state directory (0700) and takes the unit lock.
    pub fn lock(&self, what: &str) -> Result<UnitLock, Error> {
        if !self.config.data_dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.config.data_dir)
                .ctx(|| {
                    format!(
                        "cannot create data dir `{}`",
                        self.config.data_dir.display()
                    )
                })?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.state) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "cannot create state dir `{}` (run the action as root)",
                        self.state.display()
                    ),
                    e,
                ))
            }
        }
        let _ = fs::set_permissions(&self.state, fs::Permissions::from_mode(0o700));
        UnitLock::acquire(&self.state.join("lock"), self.settings.lock_timeout, what)
    }

    pub fn log(&self, msg: &str) {
        self.reporter.log(msg);
    }

    /// The object store archives also go to: the `s3` relation in Juju mode, the S3 settings
    /// standalone; `None` when there is none (archives stay local).
    pub fn store(&self) -> Result<Option<Store>, Error> {
        // In an action, or run by `juju-exec` (the backup timer): the relation has it.
        let cfg = if self.in_juju() {
            match self.reporter.one_store_relation()? {
                Some((endpoint, bag)) => {
                    let mut cfg = StoreConfig::from_relation(endpoint, &bag)?;
                    if endpoint == crate::juju::S3_ENDPOINT {
                        // The charm's option, else the agent's own setting (default `auto`).
                        let set = crate::juju::config_value("s3-checksum")
                            .filter(|v| !v.trim().is_empty())
                            .or_else(|| self.settings.s3.checksum.clone());
                        cfg.checksum = crate::store::parse_checksum(set.as_deref().unwrap_or(""))
                            .map_err(|e| Error::ConfigInvalid {
                            path: "config s3-checksum".into(),
                            problem: e.to_string(),
                        })?;
                    }
                    Some(cfg)
                }
                None => None,
            }
        } else {
            StoreConfig::from_settings(&self.settings.s3)?
        };
        cfg.map(Store::open).transpose()
    }

    /// The folder of this application's archives in the store.
    pub fn store_folder(&self, store: &Store) -> String {
        store.cfg.folder(&self.app())
    }

    /// The application: Juju's (in an action, or in the timer's `juju-exec`), else `etcd`.
    pub fn app(&self) -> String {
        juju_identity()
            .1
            .unwrap_or_else(|| self.reporter.app().to_string())
    }

    /// This unit's name: Juju's (also under the timer's `juju-exec`), else the host's.
    pub fn name(&self) -> String {
        std::env::var("JUJU_UNIT_NAME")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| self.reporter.unit().to_string())
    }
}

/// The Juju model uuid and application this process runs for, when it runs under Juju (an
/// action, a hook, or `juju-exec`): from `JUJU_MODEL_UUID` and `JUJU_UNIT_NAME`.
pub fn juju_identity() -> (Option<String>, Option<String>) {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let app = var("JUJU_UNIT_NAME")
        .and_then(|u| u.split('/').next().map(str::to_string))
        .filter(|a| !a.is_empty());
    (var("JUJU_MODEL_UUID"), app)
}

/// Refuses a target at or below the data dir: it would be swept away with the data.
pub fn refuse_target_in_data_dir(unit: &Unit<'_>, target: &Dir) -> Result<(), Error> {
    let Ok(data) = Dir::open(&unit.config.data_dir) else {
        return Ok(());
    };
    if target.is_within(&data.stat()?)? {
        return Err(Error::Target {
            path: target.path().to_path_buf(),
            problem: format!(
                "is inside etcd's data dir `{}`, which a restore replaces; choose a directory \
                 outside it, such as /home/ubuntu/etcd-snapshots",
                unit.config.data_dir.display()
            ),
        });
    }
    Ok(())
}

/// Opens (creating if needed) an archive target, refusing it in the data dir before anything
/// is created there.
pub fn open_target(unit: &Unit<'_>, target: &Path) -> Result<Dir, Error> {
    Dir::open_target(target, &|dir| refuse_target_in_data_dir(unit, dir))
}
