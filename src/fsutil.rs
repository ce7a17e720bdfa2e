//! Durable file-system steps: targets with the right owner and mode, free-space checks,
//! no-clobber publishing, the atomic exchange of two directories, fsync of whole trees, temp
//! paths that clean up after themselves, and the unit lock.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{
    openat, readlinkat, renameat2, AtFlags, Flock, FlockArg, OFlag, RenameFlags, AT_FDCWD,
};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, Gid, Uid, UnlinkatFlags};
use nix::NixPath;

use crate::error::{human_size, Error, IoContext};

/// What a `.sha256` sidecar says (see `Dir::sha256_sidecar`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sidecar {
    Missing,
    Sha256(String),
    /// It exists but holds no sha256.
    NotASha256,
}

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

/// A directory held open. Every operation below it is relative to this descriptor and never
/// follows a symlink, so a user who can write the directory cannot redirect what root does
/// in it by swapping names for symlinks: ownership and modes are set on descriptors
/// (`fchown`), files are created with `O_EXCL | O_NOFOLLOW`, and renames are `renameat2`
/// between held directories.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

impl Dir {
    /// The path the directory was opened by (for messages and results).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stat(&self) -> Result<FileStat, Error> {
        fstat(&self.fd).ctx(|| format!("cannot stat `{}`", self.path.display()))
    }

    /// The directory's owner.
    pub fn owner(&self) -> Result<(Uid, Gid), Error> {
        let st = self.stat()?;
        Ok((Uid::from_raw(st.st_uid), Gid::from_raw(st.st_gid)))
    }

    /// Free bytes for an unprivileged writer on this directory's filesystem.
    pub fn free_bytes(&self) -> Result<u64, Error> {
        let st = nix::sys::statvfs::fstatvfs(&self.fd)
            .ctx(|| format!("cannot statvfs `{}`", self.path.display()))?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    /// Fails with a clear message unless this directory's filesystem has `need` bytes free.
    pub fn require_space(&self, need: u64, action: &str) -> Result<(), Error> {
        let available = self.free_bytes()?;
        if available < need {
            return Err(Error::NoSpace {
                path: self.path.clone(),
                action: action.to_string(),
                need: human_size(need),
                available: human_size(available),
            });
        }
        Ok(())
    }

    /// The display path of `name` in this directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates a new file (mode 0600), never through a symlink and never over anything.
    pub fn create_file(&self, name: &str) -> Result<File, Error> {
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .ctx(|| format!("cannot create `{}`", self.join(name).display()))?;
        Ok(File::from(fd))
    }

    /// Opens `name` for reading: no symlink followed, no blocking on a FIFO, and only a
    /// regular file is accepted.
    pub fn open_file(&self, name: &str) -> Result<File, Error> {
        open_regular(&self.fd, name, &self.join(name))
    }

    /// Creates the subdirectory `name` (it must not exist) and opens it.
    pub fn mkdir(&self, name: &str, mode: u32) -> Result<Dir, Error> {
        mkdirat(&self.fd, name, Mode::from_bits_truncate(mode))
            .ctx(|| format!("cannot create `{}`", self.join(name).display()))?;
        self.open_dir(name)
    }

    /// Opens the subdirectory `name`, refusing a symlink.
    pub fn open_dir(&self, name: &str) -> Result<Dir, Error> {
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ctx(|| format!("cannot open directory `{}`", self.join(name).display()))?;
        Ok(Dir {
            fd,
            path: self.join(name),
        })
    }

    /// Opens the subdirectory `name`, creating it (mode 0700) when missing, and refuses it
    /// unless it is a real directory (never a symlink) owned by this user, so that whoever
    /// owns this directory cannot have planted it, or what is in it.
    pub fn private_dir(&self, name: &str) -> Result<Dir, Error> {
        let sub = match self.mkdir(name, 0o700) {
            Ok(d) => d,
            Err(_) if self.entry_stat(name)?.is_some() => self.open_dir(name)?,
            Err(e) => return Err(e),
        };
        let me = nix::unistd::geteuid();
        let (owner, _) = sub.owner()?;
        if owner != me {
            return Err(Error::Target {
                path: sub.path.clone(),
                problem: format!(
                    "is owned by uid {owner}, not by uid {me} who writes the history there; remove it (this tool creates it itself, mode 0700)"
                ),
            });
        }
        Ok(sub)
    }

    /// Opens (creating it, mode 0600) the file `name` to read and write, never through a
    /// symlink and never blocking on a FIFO; refuses anything but a regular file owned by
    /// this user.
    pub fn open_own_file(&self, name: &str) -> Result<File, Error> {
        let shown = self.join(name);
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDWR
                | OFlag::O_CREAT
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .ctx(|| format!("cannot open `{}`", shown.display()))?;
        let st = fstat(&fd).ctx(|| format!("cannot stat `{}`", shown.display()))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG
            || st.st_uid != nix::unistd::geteuid().as_raw()
        {
            return Err(Error::io(
                format!("cannot use `{}`", shown.display()),
                std::io::Error::other(
                    "it is not a regular file of this user's; remove it and try again",
                ),
            ));
        }
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_RDWR))
            .ctx(|| format!("cannot use `{}`", shown.display()))?;
        Ok(File::from(fd))
    }

    /// What the sidecar `<name>.sha256` (`sha256sum` format) records: read bounded, never
    /// through a symlink. Archives and exports both have one.
    pub fn sha256_sidecar(&self, name: &str) -> Result<Sidecar, Error> {
        use std::io::Read;
        let side = format!("{name}.sha256");
        if self.entry_stat(&side)?.is_none() {
            return Ok(Sidecar::Missing);
        }
        let mut text = String::new();
        self.open_file(&side)?
            .take(4096)
            .read_to_string(&mut text)
            .ctx(|| format!("cannot read `{}`", self.join(&side).display()))?;
        let sha = text.split_whitespace().next().unwrap_or_default();
        Ok(
            if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                Sidecar::Sha256(sha.to_ascii_lowercase())
            } else {
                Sidecar::NotASha256
            },
        )
    }

    /// `lstat` of `name` in this directory; `None` when it does not exist.
    pub fn entry_stat(&self, name: &str) -> Result<Option<FileStat>, Error> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(Error::io(
                format!("cannot stat `{}`", self.join(name).display()),
                errno_io(e),
            )),
        }
    }

    /// Renames `from` here to `to` in `dest` unless `to` exists. `Ok(false)` when it does.
    pub fn rename_noreplace(&self, from: &str, dest: &Dir, to: &str) -> Result<bool, Error> {
        match renameat2(&self.fd, from, &dest.fd, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(Error::io(
                format!(
                    "cannot rename `{}` to `{}`",
                    self.join(from).display(),
                    dest.join(to).display()
                ),
                errno_io(e),
            )),
        }
    }

    /// Writes `name` atomically and durably with `mode`, by this descriptor only: a new temp
    /// file (`O_EXCL | O_NOFOLLOW`), `fchmod`, fsync, a rename over `name`, fsync of the
    /// directory. A symlink planted at either name is replaced, never followed.
    pub fn write_replacing(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), Error> {
        let tmp = format!(".{name}.tmp-{}", std::process::id());
        self.unlink(&tmp)?;
        let written = (|| {
            let mut f = self.create_file(&tmp)?;
            nix::sys::stat::fchmod(&f, Mode::from_bits_truncate(mode))
                .ctx(|| format!("cannot chmod `{}`", self.join(&tmp).display()))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .ctx(|| format!("cannot write `{}`", self.join(&tmp).display()))?;
            nix::fcntl::renameat(&self.fd, tmp.as_str(), &self.fd, name)
                .ctx(|| format!("cannot rename into `{}`", self.join(name).display()))
        })();
        if written.is_err() {
            let _ = self.unlink(&tmp);
        }
        written?;
        self.sync()
    }

    /// Removes the file (or symlink) `name`; missing is fine.
    pub fn unlink(&self, name: &str) -> Result<(), Error> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io(
                format!("cannot remove `{}`", self.join(name).display()),
                errno_io(e),
            )),
        }
    }

    /// Removes what this tool put in the subdirectory `name` (its files, by the descriptor of
    /// the directory as it was opened), then the directory if it is empty.
    pub fn remove_own_dir(&self, name: &str, inner: &Dir) {
        for entry in inner.names() {
            let _ = unlinkat(&inner.fd, entry.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        let _ = unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir);
    }

    /// Removes the tree `name` in this directory, never following a symlink (std's
    /// `remove_dir_all` is symlink-safe; the path reaches it through this descriptor).
    pub fn remove_tree(&self, name: &str) -> Result<(), Error> {
        remove_any(&PathBuf::from(format!(
            "/proc/self/fd/{}/{name}",
            self.fd.as_raw_fd()
        )))
    }

    /// The names in this directory.
    pub fn names(&self) -> Vec<String> {
        let dir = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// fsync the directory so the names in it are durable.
    pub fn sync(&self) -> Result<(), Error> {
        nix::unistd::fsync(&self.fd)
            .ctx(|| format!("cannot fsync directory `{}`", self.path.display()))
    }

    /// Whether this directory is `other` or lies below it (walking `..` by descriptor).
    pub fn is_within(&self, other: &FileStat) -> Result<bool, Error> {
        let same = |a: &FileStat| a.st_dev == other.st_dev && a.st_ino == other.st_ino;
        let mut cur = openat(
            &self.fd,
            ".",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ctx(|| format!("cannot open `{}`", self.path.display()))?;
        for _ in 0..4096 {
            let st = fstat(&cur).ctx(|| format!("cannot stat `{}`", self.path.display()))?;
            if same(&st) {
                return Ok(true);
            }
            let parent = openat(
                &cur,
                "..",
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .ctx(|| format!("cannot walk up from `{}`", self.path.display()))?;
            let pst = fstat(&parent).ctx(|| format!("cannot stat `{}`", self.path.display()))?;
            if pst.st_dev == st.st_dev && pst.st_ino == st.st_ino {
                return Ok(false);
            }
            cur = parent;
        }
        Ok(false)
    }

    /// Opens an existing directory, refusing it when `path` or any directory on the way is a
    /// symlink that someone other than root (or this user) could have planted.
    pub fn open(path: &Path) -> Result<Dir, Error> {
        resolve(path, None)
    }

    /// Opens the target directory of an archive, creating missing parts (0700, owned by the
    /// owner of the directory they are created in, so that `juju scp` as that user can read
    /// what lands there). Refuses relative paths, `..`, non-directories, symlinks owned by
    /// anyone but root (or this user) and directories this user cannot write. `guard` sees the
    /// deepest existing directory before anything is created, and the target itself.
    pub fn open_target(target: &Path, guard: &Guard<'_>) -> Result<Dir, Error> {
        let dir = resolve(target, Some(guard))?;
        if nix::unistd::access(
            Path::new(&format!("/proc/self/fd/{}", dir.fd.as_raw_fd())),
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .is_err()
        {
            return Err(Error::Target {
                path: target.to_path_buf(),
                problem:
                    "is not writable by this user; choose a writable directory or fix its permissions"
                        .into(),
            });
        }
        Ok(dir)
    }
}

/// Why `open_regular` refused what it opened.
pub const NOT_REGULAR: &str = "it is not a regular file";

/// Opens `name` relative to `dir` read-only with `O_NOFOLLOW | O_NONBLOCK` (a FIFO planted
/// there cannot block us), checks that what was opened is a regular file, and returns that
/// descriptor in blocking mode.
pub fn open_regular<Fd: AsFd>(
    dir: Fd,
    name: &(impl NixPath + ?Sized),
    shown: &Path,
) -> Result<File, Error> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        let problem = match e {
            Errno::ELOOP => "is a symlink; give the path of the file itself".to_string(),
            other => errno_io(other).to_string(),
        };
        Error::io(
            format!("cannot open `{}`", shown.display()),
            std::io::Error::other(problem),
        )
    })?;
    let st = fstat(&fd).ctx(|| format!("cannot stat `{}`", shown.display()))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(Error::io(
            format!("cannot read `{}`", shown.display()),
            std::io::Error::other(NOT_REGULAR),
        ));
    }
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_RDONLY))
        .ctx(|| format!("cannot read `{}`", shown.display()))?;
    Ok(File::from(fd))
}

/// Opens an absolute path for reading once, without following a symlink in its last part,
/// and checks it is a regular file; see `open_regular`.
pub fn open_regular_path(path: &Path) -> Result<File, Error> {
    open_regular(AT_FDCWD, path, path)
}

/// A check on a directory before a target is created in or below it.
pub type Guard<'a> = dyn Fn(&Dir) -> Result<(), Error> + 'a;

/// Walks `path` from `/` one component at a time by descriptor. A symlink is followed only
/// when root (or the user running this) owns it; missing parts are created when a `guard` is
/// given, after the guard accepted the deepest existing directory.
fn resolve(path: &Path, guard: Option<&Guard<'_>>) -> Result<Dir, Error> {
    if !path.is_absolute() {
        return Err(walk_error(
            path,
            "is relative; give an absolute directory such as /home/ubuntu/etcd-snapshots".into(),
        ));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(walk_error(
            path,
            "contains `..`; give a plain absolute directory".into(),
        ));
    }
    let mut walk = Walk::start(path)?;
    let mut guarded = false;
    while let Some(part) = walk.todo.pop_front() {
        if part == "." || part.is_empty() {
            continue;
        }
        if part == ".." {
            walk.up()?;
            continue;
        }
        let here = walk.shown.join(&part);
        match openat(
            &walk.dir,
            part.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(node) => walk.visit(node, here)?,
            Err(Errno::ENOENT) => {
                let Some(guard) = guard else {
                    return Err(
                        walk.bad(format!("does not exist (`{}` is missing)", here.display()))
                    );
                };
                if !guarded {
                    guard(&walk.here_dir()?)?;
                    guarded = true;
                }
                walk.create(&part, here)?;
            }
            Err(e) => {
                return Err(Error::io(
                    format!("cannot open `{}`", here.display()),
                    errno_io(e),
                ))
            }
        }
    }
    let dir = Dir {
        fd: walk.dir,
        path: path.to_path_buf(),
    };
    if let Some(guard) = guard {
        guard(&dir)?;
    }
    Ok(dir)
}

fn walk_error(path: &Path, problem: String) -> Error {
    Error::Target {
        path: path.to_path_buf(),
        problem,
    }
}

fn open_root() -> Result<OwnedFd, Error> {
    openat(
        AT_FDCWD,
        "/",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| "cannot open `/`".to_string())
}

/// Where `resolve` is: the directory held, its path as shown, what is left to walk.
struct Walk<'a> {
    path: &'a Path,
    dir: OwnedFd,
    shown: PathBuf,
    todo: VecDeque<std::ffi::OsString>,
    links: u32,
    me: u32,
}

impl<'a> Walk<'a> {
    fn start(path: &'a Path) -> Result<Walk<'a>, Error> {
        Ok(Walk {
            path,
            dir: open_root()?,
            shown: PathBuf::from("/"),
            todo: path
                .components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_os_string()),
                    _ => None,
                })
                .collect(),
            links: 0,
            me: nix::unistd::geteuid().as_raw(),
        })
    }

    fn bad(&self, problem: String) -> Error {
        walk_error(self.path, problem)
    }

    /// `..` from a symlink's target.
    fn up(&mut self) -> Result<(), Error> {
        self.dir = openat(
            &self.dir,
            "..",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ctx(|| format!("cannot open `{}/..`", self.shown.display()))?;
        self.shown.pop();
        Ok(())
    }

    /// The directory held now, for the guard.
    fn here_dir(&self) -> Result<Dir, Error> {
        Ok(Dir {
            fd: self
                .dir
                .try_clone()
                .ctx(|| format!("cannot open `{}`", self.shown.display()))?,
            path: self.path.to_path_buf(),
        })
    }

    /// An existing component: a directory is entered, a symlink root owns is followed.
    fn visit(&mut self, node: OwnedFd, here: PathBuf) -> Result<(), Error> {
        let st = fstat(&node).ctx(|| format!("cannot stat `{}`", here.display()))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            return self.follow(&node, &here, st.st_uid);
        }
        if kind != SFlag::S_IFDIR {
            return Err(self.bad(format!(
                "cannot be used: `{}` is not a directory",
                here.display()
            )));
        }
        self.dir = openat(
            &node,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ctx(|| format!("cannot open `{}`", here.display()))?;
        self.shown = here;
        Ok(())
    }

    /// Puts a symlink's target in front of what is left to walk.
    fn follow(&mut self, node: &OwnedFd, here: &Path, owner: u32) -> Result<(), Error> {
        if owner != 0 && owner != self.me {
            return Err(self.bad(format!(
                "passes through `{}`, a symlink owned by uid {owner}; a symlink that \
                 user can swap is not followed as root: give the real directory",
                here.display()
            )));
        }
        self.links += 1;
        if self.links > 40 {
            return Err(self.bad("has too many levels of symlinks".into()));
        }
        let link =
            readlinkat(node, "").ctx(|| format!("cannot read symlink `{}`", here.display()))?;
        let mut parts: Vec<std::ffi::OsString> = Vec::new();
        for c in PathBuf::from(link).components() {
            match c {
                Component::RootDir => {
                    self.dir = open_root()?;
                    self.shown = PathBuf::from("/");
                    parts.clear();
                }
                Component::Normal(n) => parts.push(n.to_os_string()),
                Component::ParentDir => parts.push("..".into()),
                _ => {}
            }
        }
        for p in parts.into_iter().rev() {
            self.todo.push_front(p);
        }
        Ok(())
    }

    /// Creates a missing component 0700, owned as its parent is, and enters it.
    fn create(&mut self, part: &std::ffi::OsStr, here: PathBuf) -> Result<(), Error> {
        let parent = fstat(&self.dir).ctx(|| format!("cannot stat `{}`", self.shown.display()))?;
        match mkdirat(&self.dir, part, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(self.bad(format!("cannot be created: {}", errno_io(e)))),
        }
        let made = openat(
            &self.dir,
            part,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            self.bad(format!(
                "cannot open `{}` after creating it: {}",
                here.display(),
                errno_io(e)
            ))
        })?;
        // Best effort when not root: the directory is then ours, which is what we want.
        let _ = nix::unistd::fchown(
            &made,
            Some(Uid::from_raw(parent.st_uid)),
            Some(Gid::from_raw(parent.st_gid)),
        );
        self.dir = made;
        self.shown = here;
        Ok(())
    }
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

/// Runs `work` (a tool writing files under `root`) while a thread of our own flushes those
/// files to disk every 200 ms (`sync_tree`: the pages stay cached for whatever reads them
/// next), so the disk writes overlap the tool's work and a final sync of the tree is short.
/// Flushing is best effort: errors are left to that final sync.
pub fn flushing_while<T>(root: &Path, work: impl FnOnce() -> T) -> T {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(std::time::Duration::from_millis(200))
            {
                // A file the tool renames or removes meanwhile fails this round; the next
                // round, or the final sync, sees the tree as it is then.
                let _ = sync_tree(root);
            }
        });
        let out = work();
        drop(stop);
        out
    })
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .ctx(|| format!("cannot open lock file `{}`", path.display()))?;
        let _ = file.set_permissions(fs::Permissions::from_mode(0o600));
        UnitLock::take(file, path, timeout, what)
    }

    /// Takes the lock `name` in a held directory (see `Dir::open_own_file`: no symlink, no
    /// FIFO, only this user's regular file is ever truncated and written).
    pub fn acquire_in(
        dir: &Dir,
        name: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<UnitLock, Error> {
        let file = dir.open_own_file(name)?;
        UnitLock::take(file, &dir.join(name), timeout, what)
    }

    fn take(mut file: File, path: &Path, timeout: Duration, what: &str) -> Result<UnitLock, Error> {
        let start = Instant::now();
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
                        let mut holder = String::new();
                        let _ = std::io::Read::read_to_string(
                            &mut std::io::Read::take(&f, 4096),
                            &mut holder,
                        );
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
