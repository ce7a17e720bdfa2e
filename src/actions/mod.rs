//! The actions, and what they share: the unit (config, tools, state directory, lock) and the
//! archive writer used by both `snapshot` and restore's backup step.

pub mod restore;
pub mod snapshot;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::archive::{pack, sidecar_path};
use crate::config::{EtcdConfig, Settings};
use crate::error::{human_size, Error, IoContext};
use crate::etcd::{hex_id, Etcdctl, OfflineTool};
use crate::fsutil::{
    create_private, ensure_target, owner, pid_alive, remove_any, rename_noreplace, require_space,
    sync_dir, write_atomic, TempPath, UnitLock,
};
use crate::juju::{Reporter, Results};
use crate::manifest::{
    name_stamp, now_secs, rfc3339, Manifest, FORMAT_VERSION, SOURCE_RAW_COPY, SOURCE_SNAPSHOT,
};

/// Prefix of temp entries this tool makes in a target directory.
const TEMP_PREFIX: &str = ".etcd-actions-tmp-";

/// A named point where the `failpoints` build can be made to crash (abort, no cleanup) with
/// `FAILPOINTS=<name>=return`. Compiles to nothing otherwise.
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        let _: Option<()> = fail::eval(name, |_| std::process::abort());
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Everything an action knows about this unit.
pub struct Unit<'a> {
    pub reporter: &'a Reporter,
    pub settings: &'a Settings,
    pub config: EtcdConfig,
    /// `<data-dir>/.etcd-actions`: lock, restore journal and staging, on the data filesystem.
    pub state: PathBuf,
}

impl<'a> Unit<'a> {
    pub fn open(reporter: &'a Reporter, settings: &'a Settings) -> Result<Unit<'a>, Error> {
        let config = EtcdConfig::load(&settings.etcd_config)?;
        let state = config.data_dir.join(".etcd-actions");
        Ok(Unit {
            reporter,
            settings,
            config,
            state,
        })
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
}

/// Where the db of a new archive comes from.
pub enum DbSource<'a> {
    /// etcd's snapshot API on this unit's member.
    Live {
        etcdctl: &'a Etcdctl,
        offline: &'a OfflineTool,
    },
    /// A copy of `member/snap/db` of a stopped etcd.
    RawCopy { db: PathBuf },
}

/// A published archive.
#[derive(Debug, Clone)]
pub struct Archive {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub manifest: Manifest,
}

impl Archive {
    /// Sets `<prefix>.path`, `.sha256`, `.size`, `.bytes` and what the manifest knows.
    pub fn report(&self, results: &mut Results, prefix: &str) {
        results.set(&format!("{prefix}.path"), self.path.display());
        results.set(&format!("{prefix}.sha256"), &self.sha256);
        results.set(&format!("{prefix}.size"), human_size(self.bytes));
        results.set(&format!("{prefix}.bytes"), self.bytes);
        let m = &self.manifest;
        if let Some(rev) = m.revision {
            results.set(&format!("{prefix}.revision"), rev);
        }
        if let Some(keys) = m.keys {
            results.set(&format!("{prefix}.keys"), keys);
        }
        if let Some(v) = &m.etcd_version {
            results.set(&format!("{prefix}.etcd-version"), v);
        }
        if let Some(id) = &m.cluster_id {
            results.set(&format!("{prefix}.cluster-id"), id);
        }
        results.set(&format!("{prefix}.source"), &m.source);
    }
}

/// Removes temp entries left in `target` by runs that died (their pid is gone).
fn clean_stale_temps(target: &Path) {
    let Ok(entries) = fs::read_dir(target) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
            continue;
        };
        let pid = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or(0);
        if !pid_alive(pid) {
            let _ = remove_any(&entry.path());
        }
    }
}

/// Takes a db from `source` and publishes `<target>/<kind>-<stamp>[-N].tar.gz` with its
/// `.sha256` sidecar: written under a temp name, fsynced, renamed without clobbering
/// anything, directory fsynced. The archive is 0600 and owned by the target's owner.
pub fn write_archive(
    unit: &Unit<'_>,
    target: &Path,
    source: DbSource<'_>,
    kind: &str,
) -> Result<Archive, Error> {
    ensure_target(target)?;
    clean_stale_temps(target);
    let tmp = TempPath::new(target.join(format!(
        "{TEMP_PREFIX}{}-{}",
        std::process::id(),
        now_secs()
    )));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(tmp.path())
        .ctx(|| format!("cannot create `{}`", tmp.path().display()))?;

    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        created: rfc3339(now_secs()),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        unit: unit.reporter.unit().to_string(),
        source: SOURCE_SNAPSHOT.to_string(),
        etcd_version: None,
        cluster_id: None,
        member_id: None,
        member_name: None,
        revision: None,
        keys: None,
        db_size: 0,
        db_sha256: String::new(),
    };
    let (db, expect_trailer) = match source {
        DbSource::Live { etcdctl, offline } => {
            unit.log(&format!("checking etcd at {}", etcdctl.endpoint()));
            let status = etcdctl.status()?;
            let name = etcdctl
                .members()?
                .into_iter()
                .find(|m| m.id == status.member_id)
                .map(|m| m.name);
            // etcdctl writes the db; the archive is at most about as large again.
            require_space(
                target,
                status.db_size.saturating_mul(2) + (64 << 20),
                "the snapshot",
            )?;
            let db = tmp.path().join("db");
            unit.log(&format!(
                "saving snapshot of member {} ({} db)",
                hex_id(status.member_id),
                human_size(status.db_size)
            ));
            etcdctl.snapshot_save(&db)?;
            let revision = offline.db_status(&db)?.revision;
            let keys = match etcdctl.key_count(revision) {
                Ok(k) => Some(k),
                Err(e) => {
                    unit.log(&format!("could not count keys at revision {revision}: {e}"));
                    None
                }
            };
            manifest.etcd_version = Some(status.version);
            manifest.cluster_id = Some(hex_id(status.cluster_id));
            manifest.member_id = Some(hex_id(status.member_id));
            manifest.member_name = name;
            manifest.revision = Some(revision);
            manifest.keys = keys;
            (db, true)
        }
        DbSource::RawCopy { db } => {
            let size = crate::config::metadata(&db)?.len();
            require_space(target, size + (64 << 20), "the raw backup")?;
            manifest.source = SOURCE_RAW_COPY.to_string();
            manifest.member_name = Some(unit.config.name.clone());
            (db, false)
        }
    };

    unit.log("writing archive");
    let tmp_archive = tmp.path().join("archive.tar.gz");
    let out = create_private(&tmp_archive)?;
    let packed = pack(
        &db,
        manifest,
        expect_trailer,
        out,
        unit.settings.compression_level,
    )?;
    let (uid, gid) = owner(target)?;
    let _ = nix::unistd::chown(tmp_archive.as_path(), Some(uid), Some(gid));
    crash_point("snapshot-before-publish");

    let stamp = name_stamp(now_secs());
    let mut published = None;
    for n in 0..1000 {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        let path = target.join(format!("{kind}-{stamp}{suffix}.tar.gz"));
        if sidecar_path(&path).exists() {
            continue;
        }
        if rename_noreplace(&tmp_archive, &path)? {
            published = Some(path);
            break;
        }
    }
    let path = published.ok_or_else(|| Error::Target {
        path: target.to_path_buf(),
        problem: format!("already holds 1000 archives named {kind}-{stamp}*; clean it up"),
    })?;
    sync_dir(target)?;
    let sidecar = sidecar_path(&path);
    let line = format!(
        "{}  {}\n",
        packed.sha256,
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    write_atomic(&sidecar, line.as_bytes())?;
    let _ = nix::unistd::chown(sidecar.as_path(), Some(uid), Some(gid));
    unit.log(&format!(
        "wrote {} ({})",
        path.display(),
        human_size(packed.bytes)
    ));
    Ok(Archive {
        path,
        sha256: packed.sha256,
        bytes: packed.bytes,
        manifest: packed.manifest,
    })
}
