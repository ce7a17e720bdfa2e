//! The archive writer: a db from etcd's snapshot stream (or a stopped member's file) through
//! one pass of nested readers and writers (revision walk, progress, hashes, tar, parallel gzip,
//! the file and an upload), published under a name of its own with its sidecar.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::archive::{pack, pack_stream, Packed};
use crate::error::{human_size, Error, IoContext};
use crate::etcd::{hex_id, Client, Status};
use crate::fsutil::{pid_alive, Dir};
use crate::juju::Results;
use crate::manifest::{
    name_stamp, now_secs, Manifest, Record, RECORD_SUFFIX, SOURCE_RAW_COPY, SOURCE_SNAPSHOT,
};
use crate::points::{crash_point, pause_point};
use crate::progress::{Counted, Progress};
use crate::revision::RevisionFinder;
use crate::store::{Store, TeeFile, UploadTee};
use crate::unit::{juju_identity, Unit};

/// Prefix of temp entries this tool makes in a target directory.
const TEMP_PREFIX: &str = ".etcd-actions-tmp-";

/// Uploads a published archive by reading it again (the streamed upload could not see the
/// whole archive, or an earlier upload failed). Returns the upload, not yet completed, and
/// the sha256 and size of the bytes it was given: the caller completes it only when they are
/// the archive's.
pub fn upload_file(
    store: &Store,
    folder: &str,
    path: &Path,
) -> Result<(crate::store::Upload, String, u64), Error> {
    let upload = store.start_upload(folder);
    let mut tee = upload.tee();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tee.begin(&name);
    let f = crate::fsutil::open_regular_path(path)?;
    let mut h = crate::archive::HashingReader::new(f);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = h
            .read(&mut buf)
            .ctx(|| format!("cannot read `{}`", path.display()))?;
        if n == 0 {
            break;
        }
        tee.send(&buf[..n]);
    }
    let (sha, bytes) = h.finish();
    Ok((upload, hex::encode(sha), bytes))
}

/// Where the db of a new archive comes from.
pub enum DbSource<'a> {
    /// etcd's snapshot API on this unit's member.
    Live { client: &'a Client },
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
    /// Whether the upload given to `write_archive` received the whole archive, under the
    /// archive's name.
    pub uploaded: bool,
    /// The age recipients it is encrypted to (none: not encrypted).
    pub recipients: Vec<String>,
}

impl Archive {
    /// The archive's name: its backup id.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Its record: what `<name>.manifest.yaml` holds, beside it and in the store.
    pub fn record(&self) -> Record {
        Record {
            archive: self.name(),
            sha256: self.sha256.clone(),
            size: self.bytes,
            encryption: (!self.recipients.is_empty()).then(|| "age".to_string()),
            recipients: self.recipients.clone(),
            manifest: self.manifest.clone(),
        }
    }
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
        if let Some(v) = &m.storage_version {
            results.set(&format!("{prefix}.storage-version"), v);
        }
        results.set(&format!("{prefix}.source"), &m.source);
        if !self.recipients.is_empty() {
            results.set(&format!("{prefix}.encryption"), "age");
            results.set(&format!("{prefix}.recipients"), self.recipients.join(","));
        }
    }
}

/// Removes temp entries left in `target` by runs that died (their pid is gone). Only
/// directories are removed, and never through a symlink.
fn clean_stale_temps(target: &Dir) {
    for name in target.names() {
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let pid = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or(0);
        if !pid_alive(pid) {
            let _ = target.remove_tree(&name);
        }
    }
}

/// This run's temp directory in a target: created 0700 by this process and only ever used
/// through its descriptor, and recorded in the state dir (`writing-<pid>`: the target's path)
/// so that recovery removes it should this run be killed. Dropping it removes what it holds,
/// then the directory, then the record.
struct TempDir<'a> {
    parent: &'a Dir,
    name: String,
    dir: Dir,
    record: PathBuf,
}

impl Drop for TempDir<'_> {
    fn drop(&mut self) {
        self.parent.remove_own_dir(&self.name, &self.dir);
        let _ = std::fs::remove_file(&self.record);
    }
}

const WRITING_PREFIX: &str = "writing-";

/// For crash recovery, under the unit lock: removes the temp dirs of killed writers in the
/// targets they recorded (resolved again as targets are: no symlink a user could swap is
/// followed), and their records.
pub fn clean_killed_writers(state: &Path) {
    for entry in std::fs::read_dir(state).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(WRITING_PREFIX) else {
            continue;
        };
        if pid.parse::<i32>().is_ok_and(pid_alive) {
            continue;
        }
        if let Ok(target) = std::fs::read_to_string(entry.path()) {
            if let Ok(dir) = Dir::open(Path::new(target.trim_end_matches('\n'))) {
                clean_stale_temps(&dir);
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

/// This run's temp dir in `target` (stale ones of killed runs removed first), and the file
/// to write there, owned by the target's owner, with a second descriptor of it to check the
/// published name against.
fn temp_file<'a>(unit: &Unit<'_>, target: &'a Dir) -> Result<(TempDir<'a>, File, File), Error> {
    clean_stale_temps(target);
    let name = format!("{TEMP_PREFIX}{}-{}", std::process::id(), now_secs());
    let record = unit
        .state
        .join(format!("{WRITING_PREFIX}{}", std::process::id()));
    crate::fsutil::write_atomic(&record, format!("{}\n", target.path().display()).as_bytes())?;
    let tmp = TempDir {
        dir: target.mkdir(&name, 0o700).inspect_err(|_| {
            let _ = std::fs::remove_file(&record);
        })?,
        parent: target,
        name,
        record,
    };
    let (uid, gid) = target.owner()?;
    let out = tmp.dir.create_file(ARCHIVE_TMP)?;
    // Owner and mode are set on the descriptor: no name is resolved again.
    let _ = nix::unistd::fchown(&out, Some(uid), Some(gid));
    let held = out
        .try_clone()
        .ctx(|| "cannot duplicate the archive's descriptor".to_string())?;
    Ok((tmp, out, held))
}

/// A file published by `write_file`.
#[derive(Debug, Clone)]
pub struct Published {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

/// Writes a file that is not an archive (an export) as archives are written: in a temp dir of
/// ours in `target`, then published as `<kind>-<stamp>-<tag><ext>` (or the next free name)
/// with its `.sha256` sidecar, never over anything, and checked to be the file written.
/// `body` writes and fsyncs the file, and returns its sha256 and length.
pub fn write_file(
    unit: &Unit<'_>,
    target: &Dir,
    kind: &str,
    tag: &str,
    ext: &'static str,
    body: impl FnOnce(File) -> Result<(String, u64), Error>,
) -> Result<Published, Error> {
    let (tmp, out, held) = temp_file(unit, target)?;
    let (sha256, bytes) = body(out)?;
    let naming = Naming {
        kind,
        tag: Some(tag.to_string()),
        ext,
        stamp: now_secs(),
    };
    let chosen = naming.free(target)?;
    let name = publish_named(target, &tmp.dir, &naming, &chosen, &sha256)?;
    target.sync()?;
    check_published(target, &name, &held)?;
    Ok(Published {
        path: target.join(&name),
        sha256,
        bytes,
    })
}

/// Takes a db from `source` and publishes `<target>/<kind>-<stamp>[-N].tar.gz` with its
/// `.sha256` sidecar: written under a temp name, fsynced, renamed without clobbering
/// anything, directory fsynced. The archive is 0600 and owned by the target's owner. Every
/// step is done through descriptors of the target and of a temp dir of our own.
pub fn write_archive(
    unit: &Unit<'_>,
    target: &Dir,
    source: DbSource<'_>,
    kind: &str,
    upload: Option<UploadTee>,
) -> Result<Archive, Error> {
    let (tmp, out, held) = temp_file(unit, target)?;

    let mut manifest = Manifest::new(&unit.name(), SOURCE_SNAPSHOT);
    (manifest.model_uuid, manifest.app) = juju_identity();
    let keys = unit.keys()?;
    let naming = Naming {
        kind,
        // The cluster's id is in the name: clusters sharing a store folder never name two
        // archives alike.
        tag: None,
        ext: if keys.encrypts() {
            ENCRYPTED_EXT
        } else {
            PLAIN_EXT
        },
        stamp: now_secs(),
    };
    let mut upload = upload;
    let packed = match source {
        DbSource::Live { client } => {
            unit.log(&format!("checking etcd at {}", client.endpoint()));
            let status = client.status()?;
            // Taken before the stream: a change meanwhile only makes the next if-changed
            // take one snapshot more.
            let marks = client.marks()?;
            manifest.auth_revision = marks.auth_revision;
            manifest.leases = marks.leases;
            let naming = Naming {
                tag: Some(hex_id(status.cluster_id)),
                ..naming
            };
            let name = client
                .members()?
                .into_iter()
                .find(|m| m.id == status.member_id)
                .map(|m| m.name);
            // Only the compressed archive is written: at most about the db's size.
            target.require_space(status.db_size + (64 << 20), "the snapshot")?;
            let chosen = naming.free(target)?;
            if let Some(u) = upload.as_mut() {
                u.begin(&chosen);
            }
            unit.log(&format!(
                "streaming a snapshot of member {} ({} db){}",
                hex_id(status.member_id),
                human_size(status.db_size),
                if keys.encrypts() {
                    format!(
                        ", encrypted to {} age recipient(s)",
                        keys.recipients().len()
                    )
                } else {
                    String::new()
                }
            ));
            let member = Member {
                status,
                name,
                client,
            };
            let packed = stream_and_pack(unit, &member, out, upload, manifest, keys.encryptor()?)?;
            (packed, naming, chosen)
        }
        DbSource::RawCopy { db } => {
            let size = crate::config::metadata(&db)?.len();
            target.require_space(size + (64 << 20), "the raw backup")?;
            manifest.source = SOURCE_RAW_COPY.to_string();
            manifest.member_name = Some(unit.config.name.clone());
            let chosen = naming.free(target)?;
            if let Some(u) = upload.as_mut() {
                u.begin(&chosen);
            }
            unit.log("writing archive of the raw db");
            let out = TeeFile::new(out, upload);
            let packed = pack(
                &db,
                manifest,
                false,
                out,
                unit.settings.compression_level,
                keys.encryptor()?,
            )?;
            (packed, naming, chosen)
        }
    };
    let (packed, naming, chosen) = packed;
    pause_point("archive-written");
    let mut archive = publish(
        target,
        &tmp.dir,
        &naming,
        &chosen,
        &held,
        packed,
        keys.recipients(),
    )?;
    unit.log(&format!(
        "wrote {} ({})",
        archive.path.display(),
        human_size(archive.bytes)
    ));
    if archive.name() != chosen {
        // Published under another name than the upload began with: upload it again.
        archive.uploaded = false;
    }
    Ok(archive)
}

/// The archive under the next name `<stem>-N<ext>` that is free both in `target` and in the
/// store folder: for an upload whose key another unit of this cluster took in the same second.
/// The new name's sidecars are written first, then the archive is renamed (never over
/// anything), then the old sidecars go: a crash between the steps leaves orphan sidecars, which
/// prune tidies, never an archive without its own.
pub fn renamed_for_store(
    target: &Dir,
    archive: &Archive,
    store: &Store,
    folder: &str,
) -> Result<Archive, Error> {
    let name = archive.name();
    let ext = if name.ends_with(ENCRYPTED_EXT) {
        ENCRYPTED_EXT
    } else {
        PLAIN_EXT
    };
    let stem = name.trim_end_matches(ext);
    // `<stamp>-<cluster-id>-N`: the N a name taken in the same second got, if any.
    let base = match stem.rsplit_once('-') {
        Some((b, n))
            if (1..=3).contains(&n.len())
                && n.bytes().all(|c| c.is_ascii_digit())
                && b.len() > "etcd-snapshot-YYYY-MM-DD-HH.MM.SS".len() =>
        {
            b
        }
        _ => stem,
    };
    for n in 1..1000 {
        let candidate = format!("{base}-{n}{ext}");
        if candidate == name
            || Naming::taken(target, &candidate)?
            || store.head(&format!("{folder}/{candidate}"))?.is_some()
        {
            continue;
        }
        let mut renamed = archive.clone();
        renamed.path = target.join(&candidate);
        let line = format!("{}  {candidate}\n", archive.sha256);
        if !write_sidecar(target, &format!("{candidate}.sha256"), line.as_bytes())? {
            continue;
        }
        let record = renamed.record().to_yaml();
        if !write_sidecar(
            target,
            &format!("{candidate}{RECORD_SUFFIX}"),
            record.as_bytes(),
        )? || !target.rename_noreplace(&name, target, &candidate)?
        {
            let _ = target.unlink(&format!("{candidate}.sha256"));
            let _ = target.unlink(&format!("{candidate}{RECORD_SUFFIX}"));
            continue;
        }
        target.unlink(&format!("{name}.sha256"))?;
        target.unlink(&format!("{name}{RECORD_SUFFIX}"))?;
        target.sync()?;
        return Ok(renamed);
    }
    Err(Error::Target {
        path: target.path().to_path_buf(),
        problem: format!("has no free name left for `{name}` in it and in the store"),
    })
}

/// What an archive's name ends in.
pub const PLAIN_EXT: &str = ".tar.gz";
pub const ENCRYPTED_EXT: &str = ".tar.gz.age";

/// How a new archive is named: `<kind>-<stamp>[-<tag>][-N]<ext>`, N for a name taken in the
/// same second.
struct Naming<'a> {
    kind: &'a str,
    tag: Option<String>,
    ext: &'static str,
    stamp: u64,
}

impl Naming<'_> {
    fn name(&self, n: u32) -> String {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        match &self.tag {
            Some(t) => format!(
                "{}-{}-{t}{suffix}{}",
                self.kind,
                name_stamp(self.stamp),
                self.ext
            ),
            None => format!(
                "{}-{}{suffix}{}",
                self.kind,
                name_stamp(self.stamp),
                self.ext
            ),
        }
    }

    /// Whether `name` or one of its sidecars is in `target`.
    fn taken(target: &Dir, name: &str) -> Result<bool, Error> {
        for n in [
            name.to_string(),
            format!("{name}.sha256"),
            format!("{name}{RECORD_SUFFIX}"),
        ] {
            if target.entry_stat(&n)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The first name free in `target`, chosen before the archive is written so that an
    /// upload can go straight to its final key.
    fn free(&self, target: &Dir) -> Result<String, Error> {
        for n in 0..1000 {
            let name = self.name(n);
            if !Self::taken(target, &name)? {
                return Ok(name);
            }
        }
        Err(Error::Target {
            path: target.path().to_path_buf(),
            problem: format!(
                "already holds 1000 archives named {}*; clean it up",
                self.name(0).trim_end_matches(self.ext)
            ),
        })
    }
}

/// Name of the archive inside this run's temp dir.
const ARCHIVE_TMP: &str = "archive.tar.gz";

/// What the archive of a live member needs to know about it.
struct Member<'a> {
    status: Status,
    name: Option<String>,
    client: &'a Client,
}

/// Takes the snapshot from etcd's stream and archives it in the same pass: the db is hashed,
/// checked against etcd's trailing sha256, walked for its revision and compressed as it
/// arrives; only the compressed archive is written. The stream must end exactly where its
/// first message said it would.
fn stream_and_pack(
    unit: &Unit<'_>,
    m: &Member<'_>,
    out: File,
    upload: Option<UploadTee>,
    manifest: Manifest,
    encryptor: Option<age::Encryptor>,
) -> Result<Packed, Error> {
    let mut stream = m.client.snapshot(unit.settings.snapshot_timeout)?;
    pause_point("snapshot-streaming");
    let size = stream.size;
    // etcd announces the size in the stream's first message; it must be about what its status
    // said a moment before (the db may grow meanwhile: twice the size plus 64 MiB is allowed).
    let allowed = m.status.db_size.saturating_mul(2) + (64 << 20) + 32;
    if size > allowed {
        return Err(Error::Mismatch {
            what: "the snapshot size etcd announced".into(),
            expected: format!(
                "at most {} (its status reports a {} db)",
                human_size(allowed),
                human_size(m.status.db_size)
            ),
            actual: human_size(size),
            hint: format!(
                "nothing was written; the endpoint `{}` is not behaving as etcd does: check \
                 that it is this unit's etcd",
                m.client.endpoint()
            ),
        });
    }
    let finder = Rc::new(RefCell::new(RevisionFinder::new(m.status.revision)));
    let source = crate::revision::Tap {
        inner: Counted {
            inner: &mut stream,
            progress: Progress::new(unit.reporter, "snapshot", size),
        },
        finder: finder.clone(),
    };
    let packed = pack_stream(
        source,
        size,
        "etcd's snapshot stream",
        true,
        |_| {
            let finder = finder.replace(RevisionFinder::new(0));
            if let Some(pages) = finder.db_size() {
                if pages + 32 != size {
                    return Err(Error::Mismatch {
                        what: "the snapshot's size".into(),
                        expected: format!("{} bytes (from its bbolt meta page)", pages + 32),
                        actual: format!("{size} bytes"),
                        hint: "etcd sent another size than its first page announced; take the \
                               snapshot again"
                            .into(),
                    });
                }
            }
            let mut manifest = manifest;
            manifest.etcd_version = Some(m.status.version.clone());
            manifest.cluster_id = Some(hex_id(m.status.cluster_id));
            manifest.member_id = Some(hex_id(m.status.member_id));
            manifest.applied_index = Some(m.status.applied_index).filter(|&i| i > 0);
            manifest
                .storage_version
                .clone_from(&m.status.storage_version);
            manifest.member_name.clone_from(&m.name);
            match finder.finish() {
                Ok(revision) => {
                    manifest.revision = Some(revision);
                    manifest.keys = match m.client.key_count(revision) {
                        Ok(k) => Some(k),
                        Err(e) => {
                            unit.log(&format!("could not count keys at revision {revision}: {e}"));
                            None
                        }
                    };
                }
                Err(why) => {
                    unit.log(&format!("the snapshot's revision is unknown: {why}"));
                    manifest.revision_note = Some(format!(
                        "unknown: {why}; `etcdutl snapshot status` on the db tells it"
                    ));
                }
            }
            Ok(manifest)
        },
        TeeFile::new(out, upload),
        unit.settings.compression_level,
        encryptor,
    );
    // The stream's own failure says more than "cannot write archive".
    packed.map_err(|e| stream.take_failure().unwrap_or(e))
}

/// Names and publishes the archive `ARCHIVE_TMP` of `tmp` in `target` (as `chosen` when that
/// is still free, else the next free name), with its sidecars (`.sha256`, and the record
/// `.manifest.yaml`), all owned by the target's owner, all renamed in without replacing
/// anything. Afterwards the name is checked to hold exactly the file written (`held`), so the
/// results describe the bytes at `path`.
fn publish(
    target: &Dir,
    tmp: &Dir,
    naming: &Naming<'_>,
    chosen: &str,
    held: &File,
    packed: Packed,
    recipients: &[String],
) -> Result<Archive, Error> {
    crash_point("snapshot-before-publish");
    let name = publish_named(target, tmp, naming, chosen, &packed.sha256)?;
    let mut archive = Archive {
        uploaded: packed.uploaded,
        path: target.join(&name),
        sha256: packed.sha256,
        bytes: packed.bytes,
        manifest: packed.manifest,
        recipients: recipients.to_vec(),
    };
    let record = archive.record().to_yaml();
    if !write_sidecar(target, &format!("{name}{RECORD_SUFFIX}"), record.as_bytes())? {
        return Err(changed_while_publishing(target, &name));
    }
    target.sync()?;
    check_published(target, &name, held)?;
    archive.path = target.join(&name);
    Ok(archive)
}

/// Renames `ARCHIVE_TMP` of `tmp` into `target` as `chosen` when that is still free, else as
/// the next free name, and writes its `.sha256` sidecar; returns the name.
fn publish_named(
    target: &Dir,
    tmp: &Dir,
    naming: &Naming<'_>,
    chosen: &str,
    sha256: &str,
) -> Result<String, Error> {
    // Where the file is now: in the temp dir until the first rename.
    let mut at: Option<String> = None;
    let names = std::iter::once(chosen.to_string()).chain((0..1000).map(|n| naming.name(n)));
    for name in names {
        if Naming::taken(target, &name)? {
            continue;
        }
        let moved = match &at {
            None => tmp.rename_noreplace(ARCHIVE_TMP, target, &name)?,
            Some(from) => target.rename_noreplace(from, target, &name)?,
        };
        if !moved {
            continue;
        }
        at = Some(name.clone());
        pause_point("archive-published");
        let line = format!("{sha256}  {name}\n");
        if !write_sidecar(target, &format!("{name}.sha256"), line.as_bytes())? {
            // Someone made the sidecar's name meanwhile: move on to the next name.
            continue;
        }
        return Ok(name);
    }
    Err(Error::Target {
        path: target.path().to_path_buf(),
        problem: format!(
            "already holds 1000 archives named {}*; clean it up",
            naming.name(0).trim_end_matches(naming.ext)
        ),
    })
}

/// The published `name` must be the file written (`held`): the results describe its bytes.
fn check_published(target: &Dir, name: &str, held: &File) -> Result<(), Error> {
    let ours = held
        .metadata()
        .ctx(|| "cannot stat the archive".to_string())?;
    match target.entry_stat(name)? {
        Some(st) if st.st_ino == ours.ino() && st.st_dev == ours.dev() => Ok(()),
        _ => Err(changed_while_publishing(target, name)),
    }
}

fn changed_while_publishing(target: &Dir, name: &str) -> Error {
    Error::Target {
        path: target.path().to_path_buf(),
        problem: format!(
            "changed while publishing: `{name}` or its sidecars are no longer what was written; something else writes to this directory: choose a directory only you control"
        ),
    }
}

/// Writes a sidecar of an archive: a new file of ours, written, fsynced and owned by
/// descriptor, renamed in without replacing anything. `false` when the name was taken.
fn write_sidecar(target: &Dir, side: &str, text: &[u8]) -> Result<bool, Error> {
    let (uid, gid) = target.owner()?;
    let side_tmp = format!("{TEMP_PREFIX}{}-{side}", std::process::id());
    target.unlink(&side_tmp)?;
    let mut f = target.create_file(&side_tmp)?;
    let _ = nix::unistd::fchown(&f, Some(uid), Some(gid));
    let written = f
        .write_all(text)
        .and_then(|()| f.sync_all())
        .ctx(|| format!("cannot write `{}`", target.join(&side_tmp).display()));
    if let Err(e) = written {
        let _ = target.unlink(&side_tmp);
        return Err(e);
    }
    if target.rename_noreplace(&side_tmp, target, side)? {
        return Ok(true);
    }
    target.unlink(&side_tmp)?;
    Ok(false)
}
