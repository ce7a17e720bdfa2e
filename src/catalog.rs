//! Finding archives: one place that restore and list-backups (and verify) call. Planning is
//! separate from executing, as in rustic: `locate` decides where an archive is and opens it
//! once, returning a reader and what is recorded about it; the caller's `unpack` then checks
//! the bytes. `list` gathers what the target directory and the store hold.
//!
//! Sources: a path (the `snapshot` param), the Juju `snapshot` resource, a backup id (an
//! archive's name) in the target directory or in the store. Each may hold one of our archives,
//! the original charm's, or a plain db as `etcdctl snapshot save` writes it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::archive::{peek_manifest, unpack, Layout, Limits, Unpacked};
use crate::datadir::{data_reserve, WAL_SEGMENT};
use crate::error::{human_size, Error, IoContext};
use crate::etcd::OfflineTool;
use crate::fsutil::free_bytes;
use crate::fsutil::Dir;
use crate::manifest::{Record, RECORD_MAX, RECORD_SUFFIX};
use crate::store::{ObjectInfo, Store};
use crate::unit::Unit;
use crate::writer::{ENCRYPTED_EXT, PLAIN_EXT};

/// An archive found and opened, not yet checked.
pub struct Located {
    /// How the archive is named in results and messages: a path or an `s3://` url.
    pub shown: PathBuf,
    pub reader: Box<dyn Read + Send>,
    pub size: Option<u64>,
    /// The sha256 recorded beside it (the store's metadata), checked against its bytes.
    pub recorded_sha256: Option<String>,
    /// `path`, `resource`, `local` or `store`.
    pub origin: &'static str,
}

/// What to look for.
pub struct Wanted<'a> {
    pub snapshot: Option<&'a Path>,
    pub backup_id: Option<&'a str>,
    pub target: &'a Path,
}

/// Checks a backup id: an archive's name, or `<app>/<name>` for another application's
/// folder in the store; nothing that could leave its directory.
pub fn check_id(id: &str) -> Result<(), Error> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 255
            && !p.starts_with('.')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:+".contains(&b))
    };
    let ok = match id.split_once('/') {
        Some((app, name)) => part_ok(app) && part_ok(name),
        None => part_ok(id),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "backup-id `{}` is not an archive name; run list-backups for the ids",
            crate::error::bounded(id, 200)
        )))
    }
}

fn no_snapshot(unit: &Unit<'_>, detail: String) -> Error {
    Error::NoSnapshot {
        detail,
        app: unit.reporter.app().to_string(),
    }
}

/// Opens an absolute path once; see `fsutil::open_regular_path`.
fn open_path(unit: &Unit<'_>, path: &Path) -> Result<(File, u64), Error> {
    if !path.is_absolute() {
        return Err(Error::usage(format!(
            "snapshot path `{}` is relative; give an absolute path on the unit",
            path.display()
        )));
    }
    let file = crate::fsutil::open_regular_path(path).map_err(|e| {
        no_snapshot(
            unit,
            match e {
                Error::Io { source, .. } if source.to_string() == crate::fsutil::NOT_REGULAR => {
                    format!("`{}` is not a regular file", path.display())
                }
                Error::Io { source, .. } => {
                    format!("`{}` cannot be read: {source}", path.display())
                }
                other => other.to_string(),
            },
        )
    })?;
    let len = file
        .metadata()
        .ctx(|| format!("cannot stat `{}`", path.display()))?
        .len();
    if len == 0 {
        return Err(no_snapshot(
            unit,
            format!("`{}` is an empty (zero-byte) placeholder", path.display()),
        ));
    }
    Ok((file, len))
}

/// Finds and opens the archive a restore (or verify) asked for.
pub fn locate(unit: &Unit<'_>, want: &Wanted<'_>) -> Result<Located, Error> {
    if want.snapshot.is_some() && want.backup_id.is_some() {
        return Err(Error::usage(
            "give either `snapshot` (a path) or `backup-id`, not both",
        ));
    }
    if let Some(id) = want.backup_id {
        return locate_id(unit, id, want.target);
    }
    let (path, origin) = match want.snapshot {
        Some(p) => (p.to_path_buf(), "path"),
        None if unit.reporter.is_juju() => (
            unit.reporter
                .resource("snapshot")?
                .ok_or_else(|| no_snapshot(unit, "the `snapshot` resource is not attached".into()))?,
            "resource",
        ),
        None => {
            return Err(Error::usage(
                "no snapshot to restore: pass --snapshot /path/to/etcd-snapshot-....tar.gz or --backup-id",
            ))
        }
    };
    let (file, len) = open_path(unit, &path)?;
    crate::points::pause_point("snapshot-opened");
    // The sidecar beside it, when there is one, records its sha256.
    let recorded = path
        .parent()
        .and_then(|d| Dir::open(d).ok())
        .zip(path.file_name().and_then(|n| n.to_str()))
        .and_then(|(d, n)| read_sidecar(&d, n));
    Ok(Located {
        shown: path,
        reader: Box::new(file),
        size: Some(len),
        recorded_sha256: recorded,
        origin,
    })
}

fn locate_id(unit: &Unit<'_>, id: &str, target: &Path) -> Result<Located, Error> {
    check_id(id)?;
    let local = if id.contains('/') {
        None
    } else {
        Dir::open(target).ok()
    };
    if let Some(dir) = local {
        if dir.entry_stat(id)?.is_some() {
            let file = dir
                .open_file(id)
                .map_err(|e| no_snapshot(unit, e.to_string()))?;
            let len = file
                .metadata()
                .ctx(|| format!("cannot stat `{}`", dir.join(id).display()))?
                .len();
            if len == 0 {
                return Err(no_snapshot(
                    unit,
                    format!("`{}` is empty", dir.join(id).display()),
                ));
            }
            return Ok(Located {
                shown: dir.join(id),
                reader: Box::new(file),
                size: Some(len),
                recorded_sha256: read_sidecar(&dir, id)
                    .or_else(|| local_record(&dir, id).map(|r| r.sha256)),
                origin: "local",
            });
        }
    }
    let Some(store) = unit.store()? else {
        return Err(no_snapshot(
            unit,
            format!(
                "there is no backup `{id}` in `{}`, and no object store is configured",
                target.display()
            ),
        ));
    };
    let key = match id.split_once('/') {
        Some((app, name)) => store.cfg.key(app, name),
        None => format!("{}/{id}", unit.store_folder(&store)),
    };
    let Some(info) = store.head(&key)? else {
        return Err(no_snapshot(
            unit,
            format!(
                "there is no backup `{id}` in `{}` nor at {} in {}",
                target.display(),
                store.cfg.url(&key),
                store.cfg.describe()
            ),
        ));
    };
    if info.size == 0 {
        return Err(no_snapshot(
            unit,
            format!("{} is an empty object", store.cfg.url(&key)),
        ));
    }
    // The record beside it (or, written before records, the object's metadata) gives the
    // sha256 its bytes must have. Without either, the upload never finished.
    let recorded = match store.record(&key)? {
        Some(r) if r.size == info.size => Some(r.sha256),
        Some(r) => {
            return Err(Error::BadArchive {
                path: PathBuf::from(store.cfg.url(&key)),
                problem: format!(
                    "its record says {} bytes but the object has {}; use another backup",
                    r.size, info.size
                ),
            })
        }
        None => match info.meta.get("sha256") {
            Some(sha) if info.meta.contains_key("format-version") => Some(sha.clone()),
            // Not named as ours (a db uploaded by hand): its own checks only.
            _ if !is_archive_name(id.rsplit('/').next().unwrap_or(id)) => None,
            _ => {
                return Err(Error::BadArchive {
                    path: PathBuf::from(store.cfg.url(&key)),
                    problem: format!(
                        "it has no record (`{}`): its upload never finished; use another \
                         backup (list-backups shows it as incomplete)",
                        crate::store::record_key(&key)
                            .rsplit('/')
                            .next()
                            .unwrap_or_default()
                    ),
                })
            }
        },
    };
    if id.ends_with(ENCRYPTED_EXT) {
        // Refused before a byte is downloaded.
        unit.keys()?
            .require_identity(Path::new(&store.cfg.url(&key)))?;
    }
    unit.log(&format!(
        "downloading {} ({})",
        store.cfg.url(&key),
        human_size(info.size)
    ));
    Ok(Located {
        shown: PathBuf::from(store.cfg.url(&key)),
        reader: Box::new(store.reader(&key)),
        size: Some(info.size),
        recorded_sha256: recorded,
        origin: "store",
    })
}

/// What a check found about an archive.
pub struct Checked {
    pub id: String,
    pub shown: PathBuf,
    pub origin: &'static str,
    pub unpacked: Unpacked,
    pub integrity: String,
    pub revision: i64,
}

/// Finds `want` and checks it; see `check_located`.
pub fn check(
    unit: &Unit<'_>,
    want: &Wanted<'_>,
    given_sha: Option<String>,
    offline: &OfflineTool,
    dest: &Path,
) -> Result<Checked, Error> {
    let located = locate(unit, want)?;
    check_located(unit, located, given_sha, offline, dest)
}

/// Unpacks a located archive into `dest` (in the state dir, leaving the live etcd its reserve
/// whatever the archive's headers claim) and checks everything restore checks before it
/// touches data: gzip framing, tar layout, manifest, etcd's trailer, db sha256, the `sha256`
/// given and the one recorded beside it (sidecar or store), and that the db opens with the
/// manifest's revision. Restore and verify both call this.
pub fn check_located(
    unit: &Unit<'_>,
    located: Located,
    given_sha: Option<String>,
    offline: &OfflineTool,
    dest: &Path,
) -> Result<Checked, Error> {
    let shown = located.shown.clone();
    let origin = located.origin;
    let recorded_by = if origin == "store" {
        "the sha256 the store recorded with it"
    } else {
        "its `.sha256` sidecar"
    };
    let expected = match (given_sha, located.recorded_sha256.clone()) {
        (Some(given), Some(recorded)) if !given.eq_ignore_ascii_case(&recorded) => {
            return Err(Error::Mismatch {
                what: format!("the sha256 param and {recorded_by}"),
                expected: given,
                actual: recorded,
                hint: format!("`{}` is not the archive the sha256 names", shown.display()),
            })
        }
        (Some(given), _) => Some((given, "the sha256 param")),
        (None, Some(recorded)) => Some((recorded, recorded_by)),
        (None, None) => None,
    };
    let reserve = data_reserve(unit)?;
    let free = free_bytes(&unit.state)?;
    let limits = Limits {
        max_db: free.saturating_sub(reserve + WAL_SEGMENT) / 2,
    };
    let unpacked = unpack(
        located.reader,
        located.size,
        &shown,
        dest,
        expected
            .as_ref()
            .map(|(sha256, from)| crate::archive::Expected { sha256, from }),
        limits,
        unit.keys()?,
    )?;
    // The revision from our own walk of the db's `key` bucket; `etcdutl snapshot status`
    // (which reads the whole db) only when the walk cannot tell.
    let revision = match crate::revision::of_db_file(dest) {
        Ok(r) => r,
        Err(why) => {
            unit.log(&format!("the db's revision needs {}: {why}", offline.name));
            offline
                .db_status(dest)
                .map_err(|e| Error::BadArchive {
                    path: shown.clone(),
                    problem: format!("its db is not a valid etcd snapshot: {e}"),
                })?
                .revision
        }
    };
    if let Some(rev) = unpacked.manifest.as_ref().and_then(|m| m.revision) {
        if rev != revision {
            return Err(Error::BadArchive {
                path: shown.clone(),
                problem: format!(
                    "its manifest says revision {rev} but its db holds revision {}; the \
                     manifest was altered: use another snapshot",
                    revision
                ),
            });
        }
    }
    let integrity = integrity(&unpacked, expected.is_some());
    Ok(Checked {
        origin,
        shown: shown.clone(),
        id: shown
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        unpacked,
        integrity,
        revision,
    })
}

/// How far an archive's integrity was checked, in words for the results.
pub fn integrity(u: &Unpacked, sha_checked: bool) -> String {
    let archive = if sha_checked {
        "archive sha256 checked"
    } else {
        "archive sha256 not given"
    };
    match (&u.layout, u.db.trailer) {
        (Layout::PlainDb, Some(_)) => format!("plain snapshot db: etcd trailer verified; {archive}"),
        (Layout::PlainDb, None) => format!("plain db without etcd trailer (a raw copy): unchecked; {archive}"),
        (Layout::Ours, Some(_)) => format!("etcd trailer and manifest sha256 verified; {archive}"),
        (Layout::Ours, None) => format!("raw db copy: manifest sha256 verified, no etcd trailer; {archive}"),
        (Layout::Legacy, Some(_)) => format!("legacy archive: etcd trailer verified; {archive}"),
        (Layout::Legacy, None) if sha_checked => {
            "legacy archive with a raw db: integrity checked with the archive sha256 only".into()
        }
        (Layout::Legacy, None) => "legacy archive with a raw db: unchecked (no etcd trailer; pass sha256 to check the archive)".into(),
    }
}

/// One backup as list-backups shows it.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub id: String,
    /// When it was taken: the manifest's (or the store's record of it), else the name's.
    pub time: String,
    pub revision: Option<i64>,
    pub cluster_id: Option<String>,
    /// The raft applied index, auth revision and lease digest when it was taken (see
    /// `Manifest`).
    pub applied_index: Option<u64>,
    pub auth_revision: Option<u64>,
    pub leases: Option<String>,
    /// The unit, and the Juju model and application, that took it.
    pub unit: Option<String>,
    pub model_uuid: Option<String>,
    pub app: Option<String>,
    /// Written by this tool and carrying a readable manifest (or the store's record of one).
    pub ours: bool,
    pub size: u64,
    pub sha256: Option<String>,
    pub path: Option<PathBuf>,
    pub url: Option<String>,
    /// Encrypted (age), as its record says.
    pub encrypted: bool,
    /// An archive object without its record: an upload that never finished, or was not
    /// finished yet. Never counted, never offered as the newest.
    pub incomplete: bool,
}

impl Entry {
    pub fn place(&self) -> &'static str {
        match (&self.path, &self.url) {
            (Some(_), Some(_)) => "both",
            (Some(_), None) => "local",
            (None, Some(u)) if u.starts_with("azure://") => "azure",
            (None, Some(u)) if u.starts_with("gs://") => "gcs",
            _ => "store",
        }
    }

    /// How it is named in a list of things passed over: its path or url.
    pub fn shown(&self) -> String {
        self.path.as_ref().map_or_else(
            || self.url.clone().unwrap_or_else(|| self.id.clone()),
            |p| p.display().to_string(),
        )
    }
}

/// Whose archives a lifecycle rule may count: a cluster, and under Juju a model and an
/// application. An archive is this owner's when its cluster id is this one, and every model
/// or application it records is this one's (archives older than those fields record none).
#[derive(Debug, Clone, Default)]
pub struct Owner {
    pub cluster_id: String,
    pub unit: String,
    pub model_uuid: Option<String>,
    pub app: Option<String>,
}

impl Owner {
    /// Whose archives `unit`'s lifecycle rules count, for the cluster with `cluster_id`.
    pub fn of(unit: &Unit<'_>, cluster_id: u64) -> Owner {
        let (model_uuid, app) = crate::unit::juju_identity();
        Owner {
            cluster_id: crate::etcd::hex_id(cluster_id),
            unit: unit.name(),
            model_uuid,
            app,
        }
    }

    fn same_juju(&self, e: &Entry) -> bool {
        let agrees = |recorded: &Option<String>, mine: &Option<String>| {
            recorded.is_none() || recorded == mine
        };
        agrees(&e.model_uuid, &self.model_uuid) && agrees(&e.app, &self.app)
    }

    /// A snapshot of this cluster (and model and application).
    pub fn owns_snapshot(&self, e: &Entry) -> bool {
        e.ours && e.cluster_id.as_deref() == Some(self.cluster_id.as_str()) && self.same_juju(e)
    }

    /// A pre-restore backup this unit took (its cluster is the one a restore replaced).
    pub fn owns_backup(&self, e: &Entry) -> bool {
        e.ours && e.unit.as_deref() == Some(self.unit.as_str()) && self.same_juju(e)
    }
}

/// Orders archives newest first: by time, then by the `-N` suffix two archives of one second
/// get (a higher N is newer), then by id.
pub fn newest_first(a: &Entry, b: &Entry) -> std::cmp::Ordering {
    b.time
        .cmp(&a.time)
        .then(same_second_suffix(&b.id).cmp(&same_second_suffix(&a.id)))
        .then(b.id.cmp(&a.id))
}

/// The `N` of `<kind>-<stamp>[-<cluster-id>]-N.tar.gz` (0 without one): `publish` adds 1 to
/// 999 when the name is taken in that second.
fn same_second_suffix(id: &str) -> u32 {
    let rest = id
        .strip_suffix(ENCRYPTED_EXT)
        .or_else(|| id.strip_suffix(PLAIN_EXT))
        .and_then(|s| {
            s.strip_prefix("etcd-snapshot-")
                .or_else(|| s.strip_prefix("etcd-backup-"))
        })
        .and_then(|s| s.get(19..))
        .unwrap_or("");
    match rest.rsplit_once('-') {
        Some((_, n)) if (1..=3).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()) => {
            n.parse().unwrap_or(0)
        }
        _ => 0,
    }
}

/// Whether a name is one of the archives this tool writes (`.tar.gz`, or `.tar.gz.age`
/// encrypted).
pub fn is_archive_name(name: &str) -> bool {
    (name.starts_with("etcd-snapshot-") || name.starts_with("etcd-backup-"))
        && (name.ends_with(PLAIN_EXT) || name.ends_with(ENCRYPTED_EXT))
}

/// Whether a name is a sidecar of one of our archives (`.sha256` or the record).
pub fn is_sidecar_name(name: &str) -> bool {
    name.strip_suffix(".sha256")
        .or_else(|| name.strip_suffix(RECORD_SUFFIX))
        .is_some_and(is_archive_name)
}

/// The record of the local archive `name`: its `.manifest.yaml`, or for an archive written
/// before records (never encrypted) its manifest, sidecar sha256 and size.
pub fn local_record(dir: &Dir, name: &str) -> Option<Record> {
    if let Ok(f) = dir.open_file(&format!("{name}{RECORD_SUFFIX}")) {
        let mut text = String::new();
        let read = f.take(RECORD_MAX).read_to_string(&mut text);
        if let Some(r) = read.ok().and_then(|_| Record::from_yaml(&text, name).ok()) {
            return Some(r);
        }
        // An unreadable record: a plain archive still has its manifest inside.
    }
    if name.ends_with(ENCRYPTED_EXT) {
        return None;
    }
    let file = dir.open_file(name).ok()?;
    let manifest = peek_manifest(&file)?;
    Some(Record {
        archive: name.to_string(),
        sha256: read_sidecar(dir, name)?,
        size: file.metadata().ok()?.len(),
        encryption: None,
        recipients: Vec::new(),
        manifest,
    })
}

/// `etcd-snapshot-YYYY-MM-DD-HH.MM.SS[-N].tar.gz` -> `YYYY-MM-DDTHH:MM:SSZ`.
pub fn time_from_name(name: &str) -> Option<String> {
    let stamp = name
        .strip_prefix("etcd-snapshot-")
        .or_else(|| name.strip_prefix("etcd-backup-"))?;
    let s = stamp.get(..19)?;
    let b = s.as_bytes();
    let shape = b.len() == 19
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'-'
        && b[13] == b'.'
        && b[16] == b'.';
    shape.then(|| format!("{}T{}:{}:{}Z", &s[..10], &s[11..13], &s[14..16], &s[17..19]))
}

fn read_sidecar(dir: &Dir, name: &str) -> Option<String> {
    match dir.sha256_sidecar(name) {
        Ok(crate::fsutil::Sidecar::Sha256(sha)) => Some(sha),
        _ => None,
    }
}

/// The archives in `target` (ours, by name) and in the store folder of this application.
pub fn list(unit: &Unit<'_>, target: &Path, store: Option<&Store>) -> Result<Vec<Entry>, Error> {
    Ok(list_all_in(unit, target, store, None)?.0)
}

/// The archives in `target` and in the store folder of `app` (`None`: this application).
pub fn list_in(
    unit: &Unit<'_>,
    target: &Path,
    store: Option<&Store>,
    app: Option<&str>,
) -> Result<Vec<Entry>, Error> {
    Ok(list_all_in(unit, target, store, app)?.0)
}

/// The archives, and what else is there (files and objects this tool did not write, keys the
/// store client cannot use: listed as ignored, by path or url). A local archive and an
/// object of the same name are one entry (`both`) only when their sha256 values agree;
/// otherwise they are two entries of that name. The store's metadata is read (a HEAD) only
/// for objects named like archives.
pub fn list_all(
    unit: &Unit<'_>,
    target: &Path,
    store: Option<&Store>,
) -> Result<(Vec<Entry>, Vec<String>), Error> {
    list_all_in(unit, target, store, None)
}

fn list_all_in(
    unit: &Unit<'_>,
    target: &Path,
    store: Option<&Store>,
    app: Option<&str>,
) -> Result<(Vec<Entry>, Vec<String>), Error> {
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut apart: Vec<Entry> = Vec::new();
    let mut ignored = Vec::new();
    if let Ok(dir) = Dir::open(target) {
        let names = dir.names();
        let present: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        for name in &names {
            if !is_archive_name(name) {
                let archive_of = name
                    .strip_suffix(".sha256")
                    .or_else(|| name.strip_suffix(RECORD_SUFFIX));
                let orphan_sidecar =
                    is_sidecar_name(name) && !archive_of.is_some_and(|a| present.contains(a));
                // The change history's folder is ours too (listed apart).
                if (!is_sidecar_name(name) || orphan_sidecar)
                    && !name.starts_with(".etcd-actions-tmp-")
                    && name != crate::history::DIR
                {
                    ignored.push(dir.join(name).display().to_string());
                }
                continue;
            }
            let Ok(file) = dir.open_file(name) else {
                continue;
            };
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            let record = local_record(&dir, name);
            let e = entries.entry(name.clone()).or_default();
            e.id.clone_from(name);
            e.time = time_from_name(name).unwrap_or_default();
            if let Some(r) = &record {
                fill_from_record(e, r);
            }
            e.size = size;
            e.sha256 = read_sidecar(&dir, name).or_else(|| record.map(|r| r.sha256));
            e.encrypted |= name.ends_with(ENCRYPTED_EXT);
            e.path = Some(dir.join(name));
        }
    }
    if let Some(store) = store {
        let folder = match app {
            Some(app) => store.cfg.folder(app),
            None => unit.store_folder(store),
        };
        let listing = store.list(&folder)?;
        for key in listing.skipped {
            ignored.push(format!(
                "{} (a key the S3 client cannot use)",
                store.cfg.url(&key)
            ));
        }
        let names: std::collections::BTreeSet<String> = listing
            .objects
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        for obj in listing.objects {
            let name = obj.name().to_string();
            if name.starts_with('.') {
                continue;
            }
            if let Some(archive) = name.strip_suffix(RECORD_SUFFIX) {
                if is_archive_name(archive) {
                    if !names.contains(archive) {
                        ignored.push(format!(
                            "{} (the record of an archive that is not there)",
                            store.cfg.url(&obj.key)
                        ));
                    }
                    continue;
                }
            }
            if !is_archive_name(&name) {
                // Not ours by name: the listing says enough.
                let e = entries.entry(name.clone()).or_default();
                e.id.clone_from(&name);
                e.time.clone_from(&obj.modified);
                e.size = obj.size;
                e.url = Some(store.cfg.url(&obj.key));
                continue;
            }
            let mut from_store = Entry {
                id: name.clone(),
                size: obj.size,
                url: Some(store.cfg.url(&obj.key)),
                encrypted: name.ends_with(ENCRYPTED_EXT),
                ..Entry::default()
            };
            let has_record = names.contains(&format!("{name}{RECORD_SUFFIX}"));
            match has_record
                .then(|| store.record(&obj.key))
                .transpose()?
                .flatten()
            {
                Some(r) if r.size == obj.size => fill_from_record(&mut from_store, &r),
                Some(_) => {
                    // A record of other bytes than the object's: not an archive to trust.
                    from_store.incomplete = true;
                    from_store.time.clone_from(&obj.modified);
                }
                None => {
                    // Written before records (metadata on the object), or incomplete.
                    let info = if has_record || name.ends_with(ENCRYPTED_EXT) {
                        None
                    } else {
                        store.head(&obj.key)?
                    };
                    match info {
                        Some(info) if info.meta.contains_key("format-version") => {
                            fill_from_object(&mut from_store, &name, &info);
                        }
                        _ => {
                            from_store.incomplete = true;
                            from_store.time.clone_from(&obj.modified);
                        }
                    }
                }
            }
            // A local file of another size is another archive whatever the sha256 says.
            let differs = entries.get(&name).is_some_and(|l| l.size != obj.size);
            match entries.get_mut(&name) {
                Some(l)
                    if !differs
                        && !from_store.incomplete
                        && l.sha256.is_some()
                        && l.sha256.as_deref().map(str::to_ascii_lowercase)
                            == from_store.sha256.as_deref().map(str::to_ascii_lowercase) =>
                {
                    l.url = from_store.url;
                }
                Some(_) => apart.push(from_store),
                None => {
                    entries.insert(name, from_store);
                }
            }
        }
    }
    let mut out: Vec<Entry> = entries.into_values().chain(apart).collect();
    // Newest first; uploads that never finished after every backup, never first.
    out.sort_by(|a, b| a.incomplete.cmp(&b.incomplete).then(newest_first(a, b)));
    ignored.sort();
    Ok((out, ignored))
}

/// What an archive's record tells about it.
fn fill_from_record(e: &mut Entry, r: &Record) {
    let m = &r.manifest;
    e.time.clone_from(&m.created);
    e.revision = m.revision;
    e.cluster_id.clone_from(&m.cluster_id);
    e.applied_index = m.applied_index;
    e.auth_revision = m.auth_revision;
    e.leases.clone_from(&m.leases);
    e.unit = Some(m.unit.clone());
    e.model_uuid.clone_from(&m.model_uuid);
    e.app.clone_from(&m.app);
    e.sha256 = Some(r.sha256.clone());
    e.encrypted = r.encryption.is_some();
    e.ours = true;
}

/// What an object written before records carries in its metadata.
fn fill_from_object(e: &mut Entry, name: &str, obj: &ObjectInfo) {
    let meta = |k: &str| obj.meta.get(k).cloned();
    e.time = meta("created")
        .or_else(|| time_from_name(name))
        .unwrap_or_else(|| obj.modified.clone());
    e.revision = meta("revision").and_then(|r| r.parse().ok());
    e.sha256 = meta("sha256");
    e.cluster_id = meta("cluster-id");
    e.applied_index = meta("applied-index").and_then(|r| r.parse().ok());
    e.auth_revision = meta("auth-revision").and_then(|r| r.parse().ok());
    e.leases = meta("leases");
    e.unit = meta("unit");
    e.model_uuid = meta("model-uuid");
    e.app = meta("app");
    e.ours = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(id: &str) -> Entry {
        Entry {
            id: id.into(),
            time: "2026-11-30T06:53:34Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn archives_of_one_second_order_by_their_suffix() {
        let mut v = [
            at("etcd-snapshot-2026-11-30-06.53.34-8a00b85f8413511e.tar.gz"),
            at("etcd-snapshot-2026-11-30-06.53.34-8a00b85f8413511e-10.tar.gz"),
            at("etcd-snapshot-2026-11-30-06.53.34-8a00b85f8413511e-2.tar.gz"),
            at("etcd-snapshot-2026-11-30-06.53.34-1.tar.gz"),
            at("etcd-snapshot-2026-11-30-06.53.34.tar.gz"),
        ];
        v.sort_by(newest_first);
        let ids: Vec<&str> = v.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                "etcd-snapshot-2026-11-30-06.53.34-8a00b85f8413511e-10.tar.gz",
                "etcd-snapshot-2026-11-30-06.53.34-8a00b85f8413511e-2.tar.gz",
                "etcd-snapshot-2026-11-30-06.53.34-1.tar.gz",
                "etcd-snapshot-2026-11-30-06.53.34.tar.gz",
                "etcd-snapshot-2026-11-30-06.53.34-8a00b85f8413511e.tar.gz",
            ]
        );
    }
}
