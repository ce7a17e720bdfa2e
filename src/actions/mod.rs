//! The actions, and what they share: the unit (config, tools, state directory, lock) and the
//! archive writer used by both `snapshot` and restore's backup step.

pub mod restore;
pub mod snapshot;

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::archive::{pack, pack_stream, sidecar_path, snapshot_size_from_meta, Packed};
use crate::config::{EtcdConfig, Settings};
use crate::error::{human_size, Error, IoContext};
use crate::etcd::{hex_id, Etcdctl, OfflineTool, Status};
use crate::fsutil::{
    create_private, ensure_target, owner, pid_alive, remove_any, rename_noreplace, require_space,
    sync_dir, write_atomic, TempPath, UnitLock,
};
use crate::juju::{Reporter, Results};
use crate::manifest::{name_stamp, now_secs, Manifest, SOURCE_RAW_COPY, SOURCE_SNAPSHOT};
use crate::process::Running;

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
    let tmp_archive = tmp.path().join("archive.tar.gz");

    let mut manifest = Manifest::new(unit.reporter.unit(), SOURCE_SNAPSHOT);
    let packed = match source {
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
            unit.log(&format!(
                "saving and archiving a snapshot of member {} ({} db)",
                hex_id(status.member_id),
                human_size(status.db_size)
            ));
            let member = Member {
                status,
                name,
                etcdctl,
                offline,
            };
            let db = tmp.path().join("db");
            save_and_pack(unit, &member, &db, &tmp_archive, manifest)?
        }
        DbSource::RawCopy { db } => {
            let size = crate::config::metadata(&db)?.len();
            require_space(target, size + (64 << 20), "the raw backup")?;
            manifest.source = SOURCE_RAW_COPY.to_string();
            manifest.member_name = Some(unit.config.name.clone());
            unit.log("writing archive of the raw db");
            let out = create_private(&tmp_archive)?;
            pack(&db, manifest, false, out, unit.settings.compression_level)?
        }
    };
    let archive = publish(target, kind, &tmp_archive, packed)?;
    unit.log(&format!(
        "wrote {} ({})",
        archive.path.display(),
        human_size(archive.bytes)
    ));
    Ok(archive)
}

/// What the archive of a live member needs to know about it.
struct Member<'a> {
    status: Status,
    name: Option<String>,
    etcdctl: &'a Etcdctl,
    offline: &'a OfflineTool,
}

/// Reads a file that etcdctl is still writing: at its current end it waits for more until
/// etcdctl has exited.
struct Growing<'a> {
    file: File,
    save: &'a RefCell<Running>,
}

impl Read for Growing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.file.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            let exited = self.save.borrow_mut().exited().map_err(io::Error::other)?;
            if exited {
                // One more read: the last bytes may have landed just before the exit.
                return self.file.read(buf);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Takes the snapshot and archives it in the same pass: the archive is written while etcdctl
/// is still receiving the snapshot, reading its `.part` file as it grows, with the db's size
/// read from its first page (bbolt's meta). Whatever the stream did, the db is checked against
/// etcd's sha256 trailer and its final size against the size archived; if the first page is
/// not a bbolt meta page, or the sizes differ, the finished file is archived instead.
fn save_and_pack(
    unit: &Unit<'_>,
    m: &Member<'_>,
    db: &Path,
    tmp_archive: &Path,
    mut manifest: Manifest,
) -> Result<Packed, Error> {
    let log = db.with_file_name("etcdctl.log");
    let save = RefCell::new(m.etcdctl.snapshot_save_start(db, &log)?);
    let finish = || m.etcdctl.finish_save(&mut save.borrow_mut());
    let part = db.with_file_name("db.part");
    let file = loop {
        if let Ok(f) = File::open(&part).or_else(|_| File::open(db)) {
            break f;
        }
        if save.borrow_mut().exited()? {
            finish()?;
            break File::open(db).ctx(|| format!("etcdctl wrote no `{}`", db.display()))?;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut growing = Growing { file, save: &save };
    let mut head = Vec::with_capacity(4096);
    (&mut growing)
        .take(4096)
        .read_to_end(&mut head)
        .ctx(|| format!("cannot read `{}`", part.display()))?;
    let level = unit.settings.compression_level;
    let describe = |manifest: &mut Manifest| -> Result<(), Error> {
        let revision = m.offline.db_status(db)?.revision;
        let keys = match m.etcdctl.key_count(revision) {
            Ok(k) => Some(k),
            Err(e) => {
                unit.log(&format!("could not count keys at revision {revision}: {e}"));
                None
            }
        };
        manifest.etcd_version = Some(m.status.version.clone());
        manifest.cluster_id = Some(hex_id(m.status.cluster_id));
        manifest.member_id = Some(hex_id(m.status.member_id));
        manifest.member_name.clone_from(&m.name);
        manifest.revision = Some(revision);
        manifest.keys = keys;
        Ok(())
    };
    if let Some(size) = snapshot_size_from_meta(&head) {
        let out = create_private(tmp_archive)?;
        let streamed = pack_stream(
            io::Cursor::new(head).chain(growing),
            size,
            "the snapshot stream",
            true,
            |_| {
                finish()?;
                let actual = crate::config::metadata(db)?.len();
                if actual != size {
                    return Err(Error::Mismatch {
                        what: "the snapshot's size".into(),
                        expected: format!("{size} bytes (from its bbolt meta page)"),
                        actual: format!("{actual} bytes"),
                        hint: "etcd sent another size than its first page announced".into(),
                    });
                }
                let mut manifest = manifest.clone();
                describe(&mut manifest)?;
                Ok(manifest)
            },
            out,
            level,
        );
        match streamed {
            Ok(packed) => return Ok(packed),
            Err(e) => {
                // etcdctl's own failure says more than a short stream does.
                finish()?;
                // The meta page announced another size than etcd sent (the stream ended
                // early or ran long): archive the finished file instead. Same size: the
                // error stands (a trailer mismatch is corruption, not a misread size).
                let actual = crate::config::metadata(db)?.len();
                if actual == size {
                    return Err(e);
                }
                unit.log(&format!("{e}; archiving the finished file instead"));
                remove_any(tmp_archive)?;
            }
        }
    } else {
        finish()?;
    }
    unit.log("writing archive");
    describe(&mut manifest)?;
    let out = create_private(tmp_archive)?;
    pack(db, manifest, true, out, level)
}

/// Names and publishes an archive written to `tmp_archive`, with its sidecar, both owned by
/// the target's owner.
fn publish(
    target: &Path,
    kind: &str,
    tmp_archive: &Path,
    packed: Packed,
) -> Result<Archive, Error> {
    let (uid, gid) = owner(target)?;
    let _ = nix::unistd::chown(tmp_archive, Some(uid), Some(gid));
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
        if rename_noreplace(tmp_archive, &path)? {
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
    Ok(Archive {
        path,
        sha256: packed.sha256,
        bytes: packed.bytes,
        manifest: packed.manifest,
    })
}
