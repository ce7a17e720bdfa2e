//! Durable file-system steps: targets with the right owner and mode, free-space checks,
//! no-clobber publishing, the atomic exchange of two directories, fsync of whole trees, temp
//! paths that clean up after themselves, and the unit lock.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{renameat2, Flock, FlockArg, RenameFlags, AT_FDCWD};
use nix::unistd::{Gid, Uid};

use crate::error::{human_size, Error, IoContext};

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, Error> {
    let st =
        nix::sys::statvfs::statvfs(path).ctx(|| format!("cannot statvfs `{}`", path.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Fails with a clear message unless `path`'s filesystem has `need` bytes free.
pub fn require_space(path: &Path, need: u64, action: &str) -> Result<(), Error> {
    let available = free_bytes(path)?;
    if available < need {
        return Err(Error::NoSpace {
            path: path.to_path_buf(),
            action: action.to_string(),
            need: human_size(need),
            available: human_size(available),
        });
    }
    Ok(())
}

/// The owner of `path`.
pub fn owner(path: &Path) -> Result<(Uid, Gid), Error> {
    let md = fs::metadata(path).ctx(|| format!("cannot stat `{}`", path.display()))?;
    Ok((Uid::from_raw(md.uid()), Gid::from_raw(md.gid())))
}

/// Makes sure `target` is an absolute, writable directory, creating missing parts with mode
/// 0700 owned by the owner of the nearest existing ancestor (so `/home/ubuntu/x` belongs to
/// `ubuntu`, and `juju scp` as `ubuntu` can read what lands there).
pub fn ensure_target(target: &Path) -> Result<(), Error> {
    let bad = |problem: String| Error::Target {
        path: target.to_path_buf(),
        problem,
    };
    if !target.is_absolute() {
        return Err(bad(
            "is relative; give an absolute directory such as /home/ubuntu/etcd-snapshots".into(),
        ));
    }
    if target
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad("contains `..`; give a plain absolute directory".into()));
    }
    let mut missing = Vec::new();
    let mut existing = target;
    while !existing.exists() {
        missing.push(existing.to_path_buf());
        existing = existing
            .parent()
            .ok_or_else(|| bad("has no existing parent".into()))?;
    }
    if !existing.is_dir() {
        return Err(bad(format!(
            "cannot be created: `{}` is not a directory",
            existing.display()
        )));
    }
    let (uid, gid) = owner(existing)?;
    for dir in missing.iter().rev() {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(bad(format!("cannot be created: {e}"))),
        }
        // Best effort when not root: the directory is then ours, which is what we want anyway.
        let _ = nix::unistd::chown(dir.as_path(), Some(uid), Some(gid));
    }
    if !target.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    if nix::unistd::access(
        target,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .is_err()
    {
        return Err(bad(
            "is not writable by this user; choose a writable directory or fix its permissions"
                .into(),
        ));
    }
    Ok(())
}

/// fsync a directory so the names in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("cannot fsync directory `{}`", dir.display()))
}

/// fsync every file and directory below `root`, and `root` itself.
pub fn sync_tree(root: &Path) -> Result<(), Error> {
    let md = fs::symlink_metadata(root).ctx(|| format!("cannot stat `{}`", root.display()))?;
    if md.is_dir() {
        for entry in fs::read_dir(root).ctx(|| format!("cannot list `{}`", root.display()))? {
            let entry = entry.ctx(|| format!("cannot list `{}`", root.display()))?;
            sync_tree(&entry.path())?;
        }
        sync_dir(root)
    } else if md.is_file() {
        File::open(root)
            .and_then(|f| f.sync_all())
            .ctx(|| format!("cannot fsync `{}`", root.display()))
    } else {
        Ok(())
    }
}

/// Renames `from` to `to` unless `to` exists (RENAME_NOREPLACE). `Ok(false)` when it exists.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<bool, Error> {
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EEXIST) => Ok(false),
        Err(e) => Err(Error::io(
            format!("cannot rename `{}` to `{}`", from.display(), to.display()),
            e.into(),
        )),
    }
}

/// Swaps two paths atomically (RENAME_EXCHANGE): at every instant each name holds one of
/// the two trees, never nothing.
pub fn exchange(a: &Path, b: &Path) -> Result<(), Error> {
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE)
        .ctx(|| format!("cannot exchange `{}` and `{}`", a.display(), b.display()))
}

/// Removes a file or a tree if it exists.
pub fn remove_any(path: &Path) -> Result<(), Error> {
    let result = match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.ctx(|| format!("cannot remove `{}`", path.display()))
}

/// A path removed on drop unless kept: temp files and staging directories.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    keep: bool,
}

impl TempPath {
    pub fn new(path: PathBuf) -> TempPath {
        TempPath { path, keep: false }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop owning the path.
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.keep {
            let _ = remove_any(&self.path);
        }
    }
}

/// Creates a new file with mode 0600, failing if it exists.
pub fn create_private(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .ctx(|| format!("cannot create `{}`", path.display()))
}

/// Writes `text` to `path` atomically and durably: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, text: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = TempPath::new(dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    )));
    let _ = fs::remove_file(tmp.path());
    let mut f = create_private(tmp.path())?;
    f.write_all(text)
        .and_then(|()| f.sync_all())
        .ctx(|| format!("cannot write `{}`", tmp.path().display()))?;
    fs::rename(tmp.path(), path).ctx(|| format!("cannot rename into `{}`", path.display()))?;
    let _ = tmp.keep();
    sync_dir(dir)
}

/// The unit's lock, released when dropped (or when the process dies: it is an flock).
#[derive(Debug)]
pub struct UnitLock {
    _lock: Flock<File>,
}

impl UnitLock {
    /// Takes the lock at `path`, waiting up to `timeout` for another run to finish.
    pub fn acquire(path: &Path, timeout: Duration, what: &str) -> Result<UnitLock, Error> {
        let start = Instant::now();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .ctx(|| format!("cannot open lock file `{}`", path.display()))?;
        let _ = file.set_permissions(fs::Permissions::from_mode(0o600));
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    let _ = lock.set_len(0);
                    let _ = writeln!(
                        lock,
                        "pid {} {what} since {}",
                        std::process::id(),
                        crate::manifest::rfc3339(crate::manifest::now_secs())
                    );
                    let _ = lock.sync_data();
                    return Ok(UnitLock { _lock: lock });
                }
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    if start.elapsed() >= timeout {
                        let holder = fs::read_to_string(path).unwrap_or_default();
                        let holder = holder.trim();
                        return Err(Error::Busy {
                            path: path.to_path_buf(),
                            holder: if holder.is_empty() {
                                String::new()
                            } else {
                                format!(" ({holder})")
                            },
                        });
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err((_, e)) => {
                    return Err(Error::io(
                        format!("cannot lock `{}`", path.display()),
                        e.into(),
                    ))
                }
            }
        }
    }
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}
