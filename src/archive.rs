//! Snapshot archives: `./db` (exactly the file etcd wrote, trailer intact) then
//! `./manifest.yaml`, in a tar inside parallel gzip.
//!
//! Writing is one streaming pass: the db's pieces (etcd's messages, as `Bytes`) are hashed
//! (and etcd's sha256 trailer checked) and handed, shared, to a `ParGzWriter`, inside the tar
//! framing written here; its workers compress them where they are, on every core, and the
//! members go to a `HashingFileWriter` (the archive's sha256 and the disk writes on a thread
//! of their own).
//! Every buffer between the stages is bounded and reused. Reading is one pass too (the file
//! read and hashed ahead on a thread, inflated on every core, the db written and hashed on
//! another), and accepts nothing but what a snapshot archive (ours or the original charm's)
//! can hold: every other entry, path or size is refused before a byte of it is written.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use bytes::Bytes;
use flate2::bufread::MultiGzDecoder;
use sha2::{Digest, Sha256};

use crate::crypt::{Keys, Sealed};
use crate::error::{human_size, Error, IoContext};
use crate::manifest::{Manifest, SOURCE_SNAPSHOT};
use crate::pgzip::{ParGzReader, ParGzWriter};
use crate::pipe::Pieces;
use crate::store::TeeFile;

pub const DB_ENTRY: &str = "db";
pub const MANIFEST_ENTRY: &str = "manifest.yaml";
const MANIFEST_MAX: u64 = 64 * 1024;
/// Largest GNU long name or PAX header read (they are read whole).
const EXT_MAX: u64 = 64 * 1024;
/// Longest entry name accepted.
const NAME_MAX: usize = 4096;

/// The PAX records that matter to us; others (times, owners) are ignored.
#[derive(Debug, Default)]
struct Pax {
    path: Option<Vec<u8>>,
    size: Option<u64>,
}

impl Pax {
    /// Parses `<len> <key>=<value>\n` records.
    fn parse(mut data: &[u8]) -> Result<Pax, String> {
        let mut pax = Pax::default();
        let bad = || "it has a malformed PAX header".to_string();
        while !data.is_empty() && data[0] != 0 {
            let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(&data[..space])
                .ok()
                .and_then(|l| l.parse().ok())
                .ok_or_else(bad)?;
            if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
                return Err(bad());
            }
            let record = &data[space + 1..len - 1];
            let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"path" => pax.path = Some(value.to_vec()),
                b"size" => {
                    pax.size = Some(
                        std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(bad)?,
                    )
                }
                k if k.starts_with(b"GNU.sparse") => {
                    return Err(
                        "it holds a sparse file; snapshot archives hold only regular files".into(),
                    )
                }
                _ => {}
            }
            data = &data[len..];
        }
        Ok(pax)
    }
}
/// Zero padding GNU tar may add after the end-of-archive blocks.
const TRAILING_MAX: u64 = 1 << 20;

/// Counts and hashes everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hash: FileHash,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: FileHash::default(),
        }
    }

    pub fn finish(self) -> ([u8; 32], u64) {
        self.hash.finish()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        crate::pipe::Observe::observe(&mut self.hash, &buf[..n]);
        Ok(n)
    }
}

/// The sha256 and length of a file, fed piece by piece (by a `HashingReader`, or by the
/// thread that reads the file ahead).
#[derive(Default)]
struct FileHash {
    hasher: Sha256,
    bytes: u64,
}

impl FileHash {
    fn finish(self) -> ([u8; 32], u64) {
        (self.hasher.finalize().into(), self.bytes)
    }
}

impl crate::pipe::Observe for FileHash {
    fn observe(&mut self, piece: &[u8]) {
        self.hasher.update(piece);
        self.bytes += piece.len() as u64;
    }
}

/// Whether a db of this size ends in etcd's 32-byte sha256 trailer (etcd's own test).
pub fn has_trailer(size: u64) -> bool {
    size >= 32 && size % 512 == 32
}

/// Hashes a db as it streams past: the sha256 of the whole file, and, when the file carries
/// etcd's trailer, whether the trailer is the sha256 of everything before it. One pass.
pub struct DbDigest {
    full: Sha256,
    boundary: u64,
    pos: u64,
    body: Option<[u8; 32]>,
    tail: Vec<u8>,
}

/// What `DbDigest` found.
#[derive(Debug, Clone, Copy)]
pub struct DbHashes {
    pub sha256: [u8; 32],
    pub size: u64,
    /// `None`: no trailer; `Some(ok)`: a trailer that matches or not.
    pub trailer: Option<bool>,
}

impl DbDigest {
    pub fn new(size: u64) -> Self {
        let boundary = if has_trailer(size) {
            size - 32
        } else {
            u64::MAX
        };
        let mut d = DbDigest {
            full: Sha256::new(),
            boundary,
            pos: 0,
            body: None,
            tail: Vec::new(),
        };
        if boundary == 0 {
            d.body = Some(d.full.clone().finalize().into());
        }
        d
    }

    pub fn update(&mut self, mut data: &[u8]) {
        if self.pos < self.boundary {
            let n = (self.boundary - self.pos).min(data.len() as u64) as usize;
            self.full.update(&data[..n]);
            self.pos += n as u64;
            if self.pos == self.boundary {
                self.body = Some(self.full.clone().finalize().into());
            }
            data = &data[n..];
        }
        if !data.is_empty() {
            self.full.update(data);
            self.pos += data.len() as u64;
            if self.tail.len() < 32 {
                let take = (32 - self.tail.len()).min(data.len());
                self.tail.extend_from_slice(&data[..take]);
            }
        }
    }

    pub fn finish(self) -> DbHashes {
        let trailer =
            (self.boundary != u64::MAX).then(|| self.body.is_some_and(|b| b[..] == self.tail[..]));
        DbHashes {
            sha256: self.full.finalize().into(),
            size: self.pos,
            trailer,
        }
    }
}

/// Chunks handed from a reader to a hashing thread.
const CHUNK: usize = 1 << 20;

/// A `DbDigest` running on its own thread that also writes the db file (an unpack): the
/// thread that touches the pieces anyway, while the reading thread inflates on. It gets the
/// pieces themselves, about 1 MiB of them per hand-off.
pub struct DigestThread {
    tx: Option<SyncSender<Vec<Bytes>>>,
    batch: Vec<Bytes>,
    batched: usize,
    handle: JoinHandle<io::Result<DbHashes>>,
}

impl DigestThread {
    /// Hashes `size` bytes and writes them to `file`. (Not written back early: an unpacked db
    /// only feeds the restore tool and is removed after it; the disk is better left to the
    /// tool's output.)
    pub fn writing(size: u64, mut file: File) -> DigestThread {
        let (tx, rx) = sync_channel::<Vec<Bytes>>(4);
        let handle = std::thread::spawn(move || {
            let mut digest = DbDigest::new(size);
            for batch in rx {
                for piece in batch {
                    file.write_all(&piece)?;
                    digest.update(&piece);
                }
            }
            Ok(digest.finish())
        });
        DigestThread {
            tx: Some(tx),
            batch: Vec::new(),
            batched: 0,
            handle,
        }
    }

    /// Hands a piece over. `false`: the thread stopped, and `finish` says why.
    #[must_use]
    pub fn send(&mut self, piece: Bytes) -> bool {
        self.batched += piece.len();
        self.batch.push(piece);
        if self.batched < CHUNK {
            return true;
        }
        self.batched = 0;
        let tx = self.tx.as_ref().expect("not finished");
        tx.send(std::mem::take(&mut self.batch)).is_ok()
    }

    pub fn finish(mut self) -> io::Result<DbHashes> {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(std::mem::take(&mut self.batch));
        }
        self.handle
            .join()
            .map_err(|_| io::Error::other("the hashing thread panicked"))?
    }
}

/// What a `HashingFileWriter` wrote: the file, its sha256 and its length.
pub type Written = (TeeFile, [u8; 32], u64);

/// Writes to a file on its own thread, hashing and counting what it writes, so that the
/// archive's sha256 and the disk writes overlap compression.
pub struct HashingFileWriter {
    buf: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    handle: Option<JoinHandle<io::Result<Written>>>,
}

impl HashingFileWriter {
    pub fn new(mut file: TeeFile) -> HashingFileWriter {
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let handle = std::thread::spawn(move || {
            let mut hasher = Sha256::new();
            let mut bytes = 0u64;
            // The archive is fsynced at the end: written back as it goes, that sync is short.
            let mut writeback = Writeback::new(&file.file);
            for chunk in rx {
                hasher.update(&chunk);
                file.write_all(&chunk)?;
                bytes += chunk.len() as u64;
                writeback.wrote(bytes);
            }
            Ok((file, hasher.finalize().into(), bytes))
        });
        HashingFileWriter {
            buf: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let tx = self.tx.as_ref().expect("not finished");
        if tx.send(chunk).is_err() {
            // The thread stopped on an error: finish() reports it.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the writer thread stopped")));
        }
        Ok(())
    }

    fn join(&mut self) -> io::Result<Written> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| io::Error::other("the writer thread panicked"))?,
            None => Err(io::Error::other("the writer thread already stopped")),
        }
    }

    /// Writes what is buffered and returns the file, the sha256 and the byte count.
    pub fn finish(mut self) -> io::Result<Written> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        self.join()
    }
}

impl Write for HashingFileWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What `pack` wrote.
#[derive(Debug, Clone)]
pub struct Packed {
    pub sha256: String,
    pub bytes: u64,
    pub manifest: Manifest,
    /// Whether an upload attached to the output saw all of it (false when the archive had to
    /// be written again from the finished file, without the upload).
    pub uploaded: bool,
}

fn entry_header(name: &str, size: u64, mtime: u64) -> io::Result<tar::Header> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    // `./db`, as `tar czf x.tar.gz .` writes it: the original charm's restore looks for `*/db`.
    let path = format!("./{name}");
    let gnu = header.as_gnu_mut().expect("gnu header");
    gnu.name[..path.len()].copy_from_slice(path.as_bytes());
    header.set_cksum();
    Ok(header)
}

/// Streams the db file `db` and a manifest into `out` as a snapshot archive; see
/// `pack_stream`.
pub fn pack(
    db: &Path,
    manifest: Manifest,
    expect_trailer: bool,
    out: impl Into<TeeFile>,
    level: u32,
    encryptor: Option<age::Encryptor>,
) -> Result<Packed, Error> {
    let what = db.display().to_string();
    let src = crate::fsutil::open_regular_path(db)?;
    let size = src
        .metadata()
        .ctx(|| format!("cannot stat `{what}`"))?
        .len();
    pack_stream(
        crate::pipe::ReadPieces::new(src),
        size,
        &what,
        expect_trailer,
        |_| Ok(manifest),
        out,
        level,
        encryptor,
    )
}

/// Streams `size` bytes of a db from `src` and then a manifest into `out` as a snapshot
/// archive, in one pass: the db is hashed (and etcd's trailer checked) as it goes by. Each
/// piece of the db is hashed here and handed to the compressor shared, not copied; the tar
/// framing around the one `db` member is written here.
/// `make_manifest` runs once the db is through, and gets the db's size and sha256 filled in.
/// With `expect_trailer`, a db without a valid etcd sha256 trailer is an error and nothing is
/// published. With an `encryptor`, the gzip stream is encrypted (age) before it is hashed and
/// written: the sha256 and size are those of the encrypted file. `out` is synced before this
/// returns.
#[allow(clippy::too_many_arguments)]
pub fn pack_stream<P: Pieces>(
    mut src: P,
    size: u64,
    what: &str,
    expect_trailer: bool,
    make_manifest: impl FnOnce(&DbHashes) -> Result<Manifest, Error>,
    out: impl Into<TeeFile>,
    level: u32,
    encryptor: Option<age::Encryptor>,
) -> Result<Packed, Error> {
    let out: TeeFile = out.into();
    let io_err = |step: &str| {
        let step = format!("cannot write archive ({step})");
        move |e: io::Error| Error::io(step, e)
    };
    if expect_trailer && !has_trailer(size) {
        return Err(Error::Mismatch {
            what: "etcd snapshot layout".into(),
            expected: "a db ending in etcd's 32-byte sha256 trailer".into(),
            actual: format!("{size} bytes with no trailer"),
            hint: "the snapshot etcdctl wrote is incomplete; take it again".into(),
        });
    }
    let mtime = crate::manifest::now_secs();
    let sealed =
        Sealed::new(HashingFileWriter::new(out), encryptor).map_err(io_err("age header"))?;
    let mut gz = ParGzWriter::new(sealed, level);

    let mut digest = DbDigest::new(size);
    let header = entry_header(DB_ENTRY, size, mtime).map_err(io_err("db header"))?;
    let copied = gz.write_all(header.as_bytes()).map_err(io_err("db header"));
    // The source must end where it said it would: past `size`, it must say it has ended (for
    // a stream, its clean close).
    let mut read = 0u64;
    let mut overrun = false;
    let copied = copied.and_then(|()| loop {
        let piece = match src.next_piece() {
            Ok(Some(p)) => p,
            Ok(None) => break Ok(()),
            Err(e) => break Err(Error::io(format!("cannot read `{what}`"), e)),
        };
        let take = piece.len().min((size - read) as usize);
        if take < piece.len() {
            overrun = true;
        }
        if take == 0 {
            break Ok(());
        }
        read += take as u64;
        let piece = piece.slice(..take);
        // Hashed here, then handed to the compressor as it is (shared, not copied).
        digest.update(&piece);
        if let Err(e) = gz.push(piece) {
            break Err(io_err("db")(e));
        }
    });
    let hashes = digest.finish();
    copied?;
    if overrun {
        return Err(Error::Mismatch {
            what: format!("the length of `{what}`"),
            expected: format!("{size} bytes"),
            actual: "more".into(),
            hint: "it changed while it was archived; take it again".into(),
        });
    }
    if hashes.size != size {
        return Err(Error::io(
            format!("`{what}` ended after {} of {size} bytes", hashes.size),
            io::Error::from(io::ErrorKind::UnexpectedEof),
        ));
    }
    if expect_trailer && hashes.trailer != Some(true) {
        return Err(Error::Mismatch {
            what: "etcd's sha256 trailer of the snapshot".into(),
            expected: "the sha256 of the db pages".into(),
            actual: "a different digest".into(),
            hint: "the snapshot was damaged in transit from etcd; take it again".into(),
        });
    }
    let mut manifest = make_manifest(&hashes)?;
    manifest.db_size = size;
    manifest.db_sha256 = hex::encode(hashes.sha256);
    let text = manifest.to_yaml();
    let header =
        entry_header(MANIFEST_ENTRY, text.len() as u64, mtime).map_err(io_err("manifest"))?;
    let zeros = [0u8; 1024];
    gz.write_all(&zeros[..tar_padding(size)])
        .and_then(|()| gz.write_all(header.as_bytes()))
        .and_then(|()| gz.write_all(text.as_bytes()))
        .and_then(|()| gz.write_all(&zeros[..tar_padding(text.len() as u64)]))
        // The end of the archive: two zero blocks.
        .and_then(|()| gz.write_all(&zeros))
        .map_err(io_err("manifest"))?;

    let (tee, sha, bytes) = gz
        .finish()
        .and_then(Sealed::finish)
        .and_then(HashingFileWriter::finish)
        .map_err(io_err("gzip"))?;
    tee.file.sync_all().map_err(io_err("fsync"))?;
    Ok(Packed {
        uploaded: tee.upload.is_some(),
        sha256: hex::encode(sha),
        bytes,
        manifest,
    })
}

/// Zero bytes that pad a tar member of `size` bytes to its 512-byte block.
fn tar_padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

/// How a verified archive was laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Ours: `db` and `manifest.yaml` at the root.
    Ours,
    /// A plain db file, as `etcdctl snapshot save` writes it (no archive around it).
    PlainDb,
    /// The original charm's: a raw `db` at the root or in one subdirectory, no manifest.
    Legacy,
}

/// A verified archive whose db was written to the destination.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub sha256: String,
    pub bytes: u64,
    pub db: DbHashes,
    pub manifest: Option<Manifest>,
    pub layout: Layout,
}

/// Limits on what `unpack` writes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest db the destination has room for.
    pub max_db: u64,
}

fn refuse(path: &Path, problem: impl Into<String>) -> Error {
    Error::BadArchive {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Normalizes an entry path: no absolute paths, no `..`, `./` and empty parts dropped.
fn entry_parts(raw: &[u8]) -> Result<Vec<String>, String> {
    if raw.len() > NAME_MAX {
        return Err(format!(
            "an entry name is {} bytes long; snapshot archives hold `db` and `manifest.yaml`",
            raw.len()
        ));
    }
    let text = std::str::from_utf8(raw).map_err(|_| "an entry name is not UTF-8".to_string())?;
    if text.starts_with('/') {
        return Err(format!("entry `{text}` has an absolute path"));
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "entry `{text}` climbs out of the archive with `..`"
                ))
            }
            p => parts.push(p.to_string()),
        }
    }
    Ok(parts)
}

fn is_v2_or_data_dir(parts: &[String]) -> bool {
    parts
        .windows(2)
        .any(|w| w[0] == "member" && (w[1] == "wal" || w[1] == "snap"))
}

/// Reads `src` (the bytes of `archive`, `size` of them when known) in one pass, writes its db
/// to `dest` (created, mode 0600), and checks it: the expected archive sha256 if given, then
/// the manifest's db size and sha256, then etcd's trailer. `src` is a snapshot archive, or,
/// recognized by its content, a plain db file as `etcdctl snapshot save` writes it. On any
/// error `dest` is removed.
/// A sha256 an archive must have, and what recorded it (for the message when it has not).
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub sha256: &'a str,
    /// e.g. "the sha256 param", "its sidecar", "the store's record".
    pub from: &'a str,
}

pub fn unpack(
    file: impl Read + Send,
    size: Option<u64>,
    archive: &Path,
    dest: &Path,
    expected_sha256: Option<Expected<'_>>,
    limits: Limits,
    keys: &Keys,
) -> Result<Unpacked, Error> {
    let result = unpack_inner(file, size, archive, dest, expected_sha256, limits, keys);
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

struct Scan {
    db: Option<DbHashes>,
    db_depth: usize,
    manifest: Option<Manifest>,
}

fn unpack_inner(
    file: impl Read + Send,
    size: Option<u64>,
    archive: &Path,
    dest: &Path,
    expected_sha256: Option<Expected<'_>>,
    limits: Limits,
    keys: &Keys,
) -> Result<Unpacked, Error> {
    // The file is read and hashed on a thread of its own, ahead of the scan.
    let (scanned, drained, (sha, bytes)) = std::thread::scope(|s| {
        let (mut buf, reader) =
            crate::pipe::read_ahead(s, file, "archive reader", FileHash::default());
        let scanned = scan(archive, &mut buf, size, dest, limits, keys);
        if matches!(
            scanned,
            Err(Error::Encrypted { .. } | Error::Decrypt { .. })
        ) {
            // Nothing to learn from the rest without a key that opens it.
            return (scanned, Ok(0), ([0u8; 32], 0));
        }
        // Hash the rest of the file, whatever the scan made of it, so the sha256 covers it all.
        let drained = io::copy(&mut buf, &mut io::sink());
        drop(buf);
        let hash = reader
            .join()
            .map(FileHash::finish)
            .unwrap_or(([0u8; 32], 0));
        (scanned, drained, hash)
    });
    if let Err(e @ (Error::Encrypted { .. } | Error::Decrypt { .. })) = scanned {
        return Err(e);
    }
    let sha = hex::encode(sha);
    if let Some(expected) = expected_sha256 {
        if !expected.sha256.eq_ignore_ascii_case(&sha) {
            return Err(Error::Mismatch {
                what: "the archive's sha256".into(),
                expected: expected.sha256.to_ascii_lowercase(),
                actual: sha,
                hint: format!(
                    "the archive is not the one {} names, or it was damaged in transfer or in \
                     storage; use another backup, or copy it again and compare with the snapshot \
                     action's result",
                    expected.from
                ),
            });
        }
    }
    let scan = scanned?;
    drained.ctx(|| format!("cannot read archive `{}`", archive.display()))?;
    let db = scan.db.ok_or_else(|| {
        refuse(
            archive,
            "it holds no `db` file; is it an etcd snapshot archive?",
        )
    })?;
    let layout = match (&scan.manifest, scan.db_depth) {
        (None, 0) => Layout::PlainDb,
        (Some(_), 1) => Layout::Ours,
        (None, _) => Layout::Legacy,
        (Some(_), _) => {
            return Err(refuse(
                archive,
                "its manifest sits beside a `db` that is not at the root",
            ))
        }
    };
    if let Some(m) = &scan.manifest {
        if m.db_size != db.size {
            return Err(Error::Mismatch {
                what: "the db size recorded in the manifest".into(),
                expected: m.db_size.to_string(),
                actual: db.size.to_string(),
                hint: "the archive was altered after it was made; use another snapshot".into(),
            });
        }
        if !m.db_sha256.eq_ignore_ascii_case(&hex::encode(db.sha256)) {
            return Err(Error::Mismatch {
                what: "the db sha256 recorded in the manifest".into(),
                expected: m.db_sha256.clone(),
                actual: hex::encode(db.sha256),
                hint: "the archive was altered after it was made; use another snapshot".into(),
            });
        }
    }
    match db.trailer {
        Some(true) => {}
        Some(false) => {
            return Err(Error::Mismatch {
                what: "etcd's sha256 trailer of the db".into(),
                expected: "the sha256 of the db pages".into(),
                actual: "a different digest".into(),
                hint: "the snapshot is corrupt; use another snapshot".into(),
            })
        }
        None if scan
            .manifest
            .as_ref()
            .is_some_and(|m| m.source == SOURCE_SNAPSHOT) =>
        {
            return Err(refuse(
                archive,
                "its manifest says the db came from etcd's snapshot API, but the db has no etcd \
                 sha256 trailer; the db was truncated or replaced",
            ))
        }
        None => {}
    }
    Ok(Unpacked {
        sha256: sha,
        bytes,
        db,
        manifest: scan.manifest,
        layout,
    })
}

/// Whether `head` starts a bbolt file: the magic of its first meta page.
pub fn is_bbolt(head: &[u8]) -> bool {
    head.len() >= 24
        && head[16..20] == 0xED0C_DAEDu32.to_le_bytes()
        && head[20..24] == 2u32.to_le_bytes()
}

fn scan<R: BufRead + Send>(
    archive: &Path,
    buf: &mut R,
    size: Option<u64>,
    dest: &Path,
    limits: Limits,
    keys: &Keys,
) -> Result<Scan, Error> {
    let head = buf
        .fill_buf()
        .ctx(|| format!("cannot read archive `{}`", archive.display()))?;
    if crate::crypt::is_age(head) {
        // One more reader in the nest: the plaintext is the .tar.gz, never written anywhere.
        // The header is read (and the identity tried) here; the payload is decrypted on a
        // thread of its own, beside the gzip workers and the db's writer.
        let decrypting = keys.decrypt(buf, archive)?;
        return std::thread::scope(|s| {
            let mut plain = crate::crypt::ahead(s, decrypting);
            let head = plain.fill_buf().map_err(corrupt(archive))?;
            if head.len() < 2 || head[..2] != [0x1f, 0x8b] {
                return Err(refuse(
                    archive,
                    "it is an age file, but what it holds is not a .tar.gz snapshot archive",
                ));
            }
            let scan = scan_archive(archive, &mut plain, dest, limits)?;
            // Read to its end: age authenticates the last chunk there (a cut file fails here).
            io::copy(&mut plain, &mut io::sink()).map_err(corrupt(archive))?;
            Ok(scan)
        });
    }
    if is_bbolt(head) {
        return scan_plain_db(archive, buf, size, dest, limits);
    }
    if head.len() < 2 || head[..2] != [0x1f, 0x8b] {
        return Err(refuse(
            archive,
            "it is not a gzip file nor an etcd snapshot db (expected a .tar.gz snapshot archive \
             or a db written by `etcdctl snapshot save`)",
        ));
    }
    scan_archive(archive, buf, dest, limits)
}

/// A .tar.gz (ours or the original charm's), from its first byte.
fn scan_archive<R: BufRead>(
    archive: &Path,
    buf: &mut R,
    dest: &Path,
    limits: Limits,
) -> Result<Scan, Error> {
    let head = buf
        .fill_buf()
        .ctx(|| format!("cannot read archive `{}`", archive.display()))?;
    let decoder: Box<dyn Read + '_> = if ParGzReader::<&mut R>::recognizes(head) {
        Box::new(ParGzReader::new(buf))
    } else {
        Box::new(MultiGzDecoder::new(buf))
    };
    let mut tar = tar::Archive::new(decoder);
    let scan = scan_entries(archive, &mut tar, dest, limits)?;
    check_trailing(archive, tar.into_inner())?;
    Ok(scan)
}

fn corrupt(archive: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |e| refuse(archive, format!("it is corrupt or truncated: {e}"))
}

/// A plain db (as `etcdctl snapshot save` writes it), copied to `dest` within the limits.
fn scan_plain_db<R: BufRead>(
    archive: &Path,
    buf: &mut R,
    size: Option<u64>,
    dest: &Path,
    limits: Limits,
) -> Result<Scan, Error> {
    let Some(size) = size else {
        return Err(refuse(archive, "it is a plain db of unknown size"));
    };
    if size > limits.max_db {
        return Err(refuse(
            archive,
            format!(
                "it is a plain db of {} but there is room for at most {}; free space on the \
                 data filesystem or check the file",
                human_size(size),
                human_size(limits.max_db)
            ),
        ));
    }
    let db = extract_db(archive, buf, size, limits.max_db, dest)?;
    Ok(Scan {
        db: Some(db),
        db_depth: 0,
        manifest: None,
    })
}

/// Extension headers seen before the entry they describe: a GNU long name, a PAX header.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    pax: Option<Pax>,
}

impl Pending {
    /// Takes in an extension header; `false` when `entry` is not one (a real entry).
    fn absorb(
        &mut self,
        archive: &Path,
        entry: &mut dyn Read,
        kind: tar::EntryType,
        size: u64,
    ) -> Result<bool, Error> {
        let read_ext = |entry: &mut dyn Read, what: &str| -> Result<Vec<u8>, Error> {
            if size > EXT_MAX {
                return Err(refuse(
                    archive,
                    format!(
                        "it has a {what} of {}; a snapshot archive needs none over {}",
                        human_size(size),
                        human_size(EXT_MAX)
                    ),
                ));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .take(EXT_MAX)
                .read_to_end(&mut data)
                .map_err(corrupt(archive))?;
            Ok(data)
        };
        match kind {
            tar::EntryType::GNULongName => {
                if self.long_name.is_some() {
                    return Err(refuse(archive, "it has two long names for one entry"));
                }
                let mut name = read_ext(entry, "GNU long name")?;
                while name.last() == Some(&0) {
                    name.pop();
                }
                self.long_name = Some(name);
            }
            tar::EntryType::XHeader => {
                if self.pax.is_some() {
                    return Err(refuse(archive, "it has two PAX headers for one entry"));
                }
                let data = read_ext(entry, "PAX header")?;
                self.pax = Some(Pax::parse(&data).map_err(|p| refuse(archive, p))?);
            }
            tar::EntryType::XGlobalHeader => {
                read_ext(entry, "PAX global header")?;
            }
            tar::EntryType::GNULongLink => {
                return Err(refuse(
                    archive,
                    "it holds a link; snapshot archives hold only regular files",
                ))
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The path of the entry these headers describe (its own when there are none), checked
    /// to agree with the entry's size and to stay inside the archive.
    fn entry_parts(
        &mut self,
        archive: &Path,
        header_path: &[u8],
        size: u64,
    ) -> Result<Vec<String>, Error> {
        let pax_entry = self.pax.take().unwrap_or_default();
        if let Some(pax_size) = pax_entry.size {
            if pax_size != size {
                return Err(refuse(
                    archive,
                    format!(
                        "its PAX header says an entry holds {pax_size} bytes but the entry's \
                         tar header says {size}; tar tools would read this archive \
                         differently, so it is refused"
                    ),
                ));
            }
        }
        let raw_name = match (self.long_name.take(), pax_entry.path) {
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => header_path.to_vec(),
        };
        entry_parts(&raw_name).map_err(|p| refuse(archive, p))
    }
}

/// Walks the tar's entries raw: extension headers (GNU long names, PAX records) come as
/// entries of their own, so their size is checked before a byte of them is read, and a PAX
/// `size` can never make the copy longer than the header that was checked.
fn scan_entries(
    archive: &Path,
    tar: &mut tar::Archive<Box<dyn Read + '_>>,
    dest: &Path,
    limits: Limits,
) -> Result<Scan, Error> {
    let mut scan = Scan {
        db: None,
        db_depth: 0,
        manifest: None,
    };
    let mut pending = Pending::default();
    let entries = tar.entries().map_err(corrupt(archive))?.raw(true);
    for entry in entries {
        let mut entry = entry.map_err(corrupt(archive))?;
        let kind = entry.header().entry_type();
        let size = entry.header().size().map_err(corrupt(archive))?;
        if pending.absorb(archive, &mut entry, kind, size)? {
            continue;
        }
        let header_path = entry.path_bytes().into_owned();
        let parts = pending.entry_parts(archive, &header_path, size)?;
        if !is_regular_entry(archive, &parts, kind)? {
            continue;
        }
        take_entry(archive, &parts, &mut entry, size, &mut scan, dest, limits)?;
    }
    if pending.long_name.is_some() || pending.pax.is_some() {
        return Err(refuse(
            archive,
            "it ends with a header that describes no entry",
        ));
    }
    Ok(scan)
}

/// Whether an entry is a regular file to look at (`false`: a directory, passed over);
/// refuses data dirs, v2 backups and anything that is not a file.
fn is_regular_entry(archive: &Path, parts: &[String], kind: tar::EntryType) -> Result<bool, Error> {
    let shown = parts.join("/");
    if is_v2_or_data_dir(parts) {
        return Err(refuse(
            archive,
            format!(
                "it holds an etcd data directory or a v2-era backup (`{shown}`); only v3 \
                 snapshots (a `db` file) can be restored: take a v3 snapshot with the \
                 snapshot action"
            ),
        ));
    }
    match kind {
        tar::EntryType::Directory => Ok(false),
        tar::EntryType::Regular | tar::EntryType::Continuous => Ok(true),
        other => Err(refuse(
            archive,
            format!(
                "entry `{shown}` is a {}; snapshot archives hold only regular files",
                type_name(other)
            ),
        )),
    }
}

/// Takes the `db` (copied to `dest`) or the manifest (parsed); refuses anything else.
fn take_entry(
    archive: &Path,
    parts: &[String],
    entry: &mut dyn Read,
    size: u64,
    scan: &mut Scan,
    dest: &Path,
    limits: Limits,
) -> Result<(), Error> {
    let name = parts.last().map(String::as_str).unwrap_or_default();
    match (name, parts.len()) {
        (DB_ENTRY, 1 | 2) => {
            if scan.db.is_some() {
                return Err(refuse(archive, "it holds more than one `db` file"));
            }
            if size > limits.max_db {
                return Err(refuse(
                    archive,
                    format!(
                        "its `db` claims {} but there is room for at most {}; free space \
                         on the data filesystem or check the archive",
                        human_size(size),
                        human_size(limits.max_db)
                    ),
                ));
            }
            scan.db = Some(extract_db(archive, entry, size, limits.max_db, dest)?);
            scan.db_depth = parts.len();
        }
        (MANIFEST_ENTRY, 1) => {
            if scan.manifest.is_some() {
                return Err(refuse(archive, "it holds more than one manifest"));
            }
            if size > MANIFEST_MAX {
                return Err(refuse(
                    archive,
                    format!("its manifest is {size} bytes, far more than a manifest can be"),
                ));
            }
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .map_err(|e| refuse(archive, format!("its manifest is unreadable: {e}")))?;
            let m = Manifest::from_yaml(&text)
                .map_err(|e| refuse(archive, format!("its manifest is invalid: {e}")))?;
            scan.manifest = Some(m);
        }
        _ => {
            return Err(refuse(
                archive,
                format!(
                    "it holds an unexpected file `{}`; a snapshot archive holds only `db` and \
                     `manifest.yaml`",
                    parts.join("/")
                ),
            ))
        }
    }
    Ok(())
}

/// Reads what follows the tar's end so every gzip member's CRC is checked; allows only the
/// zero padding tar writes.
fn check_trailing(archive: &Path, rest: impl Read) -> Result<(), Error> {
    let mut rest = rest.take(TRAILING_MAX + 1);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = rest.read(&mut chunk).map_err(corrupt(archive))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > TRAILING_MAX || chunk[..n].iter().any(|&b| b != 0) {
            return Err(refuse(
                archive,
                "it has unexpected data after the end of the tar archive",
            ));
        }
    }
    Ok(())
}

/// Copies the db entry to `dest`: never more than `size` (the checked header size) nor more
/// than `max` bytes, whatever the entry's reader would give.
fn extract_db<R: Read + ?Sized>(
    archive: &Path,
    entry: &mut R,
    size: u64,
    max: u64,
    dest: &Path,
) -> Result<DbHashes, Error> {
    let mut entry = entry.take(size.min(max).saturating_add(1));
    let entry = &mut entry;
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .ctx(|| format!("cannot create `{}`", dest.display()))?;
    // The db is written and hashed on one thread while this one inflates and reads on.
    let mut digest = DigestThread::writing(size, out);
    let mut written = 0u64;
    let copied = loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        match (&mut *entry).take(CHUNK as u64).read_to_end(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => {
                break Err(refuse(
                    archive,
                    format!("it is corrupt or truncated inside `db`: {e}"),
                ))
            }
        }
        written += chunk.len() as u64;
        if !digest.send(Bytes::from(chunk)) {
            break Ok(());
        }
    };
    let hashes = digest
        .finish()
        .map_err(|e| Error::io(format!("cannot write `{}`", dest.display()), e));
    copied?;
    let hashes = hashes?;
    if written > size.min(max) {
        return Err(refuse(
            archive,
            format!("its `db` holds more than the {size} bytes its header announced"),
        ));
    }
    if written != size {
        return Err(refuse(
            archive,
            format!("it is truncated: `db` should hold {size} bytes but has {written}"),
        ));
    }
    // No final fsync: this copy only feeds the restore tool, whose output is synced; after a
    // crash the next run deletes it.
    Ok(hashes)
}

/// Starts the writeback of a file's dirty pages while it is still being written, without
/// waiting for it: `posix_fadvise(DONTNEED)` on the range just written makes Linux start
/// writing it back (its pages stay cached while they are dirty or under writeback). The CPU
/// work of the pass then overlaps the disk's, and the final fsync, or the next tool reading
/// the file, does not wait for a whole file's worth of dirty pages.
struct Writeback {
    file: Option<File>,
    done: u64,
}

/// Bytes written between two writeback starts.
const WRITEBACK_EVERY: u64 = 32 << 20;

impl Writeback {
    fn new(file: &File) -> Writeback {
        Writeback {
            file: file.try_clone().ok(),
            done: 0,
        }
    }

    /// `written` bytes are in the file so far.
    fn wrote(&mut self, written: u64) {
        if written < self.done + WRITEBACK_EVERY {
            return;
        }
        if let Some(f) = &self.file {
            let (Ok(off), Ok(len)) = (i64::try_from(self.done), i64::try_from(written - self.done))
            else {
                return;
            };
            // Only a hint: an error changes nothing that matters.
            let _ = nix::fcntl::posix_fadvise(
                f,
                off,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        self.done = written;
    }
}

fn type_name(t: tar::EntryType) -> &'static str {
    match t {
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        _ => "special entry",
    }
}

/// Reads the manifest of one of our archives without inflating all of it: walks the parallel
/// gzip members by their length fields and inflates only the last ones, where the manifest
/// is. `None` when the file is not ours or its manifest is not found there.
pub fn peek_manifest(file: &File) -> Option<Manifest> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let len = file.metadata().ok()?.len();
    // Only the last members are kept while walking (at most `TAIL_MEMBERS` of them, 32 MiB
    // in all): memory stays flat however many members a file named like an archive has.
    const TAIL_MEMBERS: usize = 4096;
    const TAIL_BYTES: u64 = 32 << 20;
    let mut members = std::collections::VecDeque::new();
    let mut kept = 0u64;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader.seek(SeekFrom::Start(0)).ok()?;
    let mut off = 0u64;
    let mut h = [0u8; 20];
    while off < len {
        reader.read_exact(&mut h).ok()?;
        if !ParGzReader::<&[u8]>::recognizes(&h) {
            return None;
        }
        let total = u64::from(u32::from_le_bytes(h[16..20].try_into().ok()?));
        if total < 28 {
            return None;
        }
        members.push_back((off, total));
        kept += total;
        while members.len() > TAIL_MEMBERS || (kept > TAIL_BYTES && members.len() > 1) {
            let (_, t) = members.pop_front()?;
            kept -= t;
        }
        off += total;
        reader.seek_relative(i64::try_from(total - 20).ok()?).ok()?;
    }
    let members = Vec::from(members);
    // Members from the end until 256 KiB of tar: the manifest (at most 64 KiB) and the end
    // blocks are in there.
    let mut start = members.len();
    let mut data = 0u64;
    while start > 0 && data < 256 << 10 {
        start -= 1;
        let (o, t) = members[start];
        let mut isize = [0u8; 4];
        file.read_exact_at(&mut isize, o + t - 4).ok()?;
        data += u64::from(u32::from_le_bytes(isize));
    }
    let (from, _) = *members.get(start)?;
    let tail_len = len - from;
    if tail_len > 32 << 20 {
        return None;
    }
    let mut comp = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut comp, from).ok()?;
    let mut tail = Vec::new();
    MultiGzDecoder::new(&comp[..])
        .take(32 << 20)
        .read_to_end(&mut tail)
        .ok()?;
    for at in (0..tail.len().saturating_sub(511)).step_by(512) {
        let block = &tail[at..at + 512];
        let name_end = block[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = &block[..name_end];
        if name != b"./manifest.yaml" && name != b"manifest.yaml" {
            continue;
        }
        let header = tar::Header::from_byte_slice(block);
        if header.cksum().ok()?
            != block[..148]
                .iter()
                .chain(&block[156..])
                .map(|&b| u32::from(b))
                .sum::<u32>()
                + 8 * 32
        {
            continue;
        }
        let size = header.size().ok()? as usize;
        let body = tail.get(at + 512..at + 512 + size)?;
        if size as u64 > MANIFEST_MAX {
            return None;
        }
        return Manifest::from_yaml(std::str::from_utf8(body).ok()?).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_db(pages: usize, trailer: bool) -> Vec<u8> {
        let mut db: Vec<u8> = (0..pages * 4096).map(|i| (i * 31 % 251) as u8).collect();
        if trailer {
            let d: [u8; 32] = Sha256::digest(&db).into();
            db.extend_from_slice(&d);
        }
        db
    }

    #[test]
    fn digest_checks_the_trailer_in_any_chunking() {
        let db = fake_db(5, true);
        for chunk in [1, 7, 32, 4096, 100_000] {
            let mut d = DbDigest::new(db.len() as u64);
            for c in db.chunks(chunk) {
                d.update(c);
            }
            let h = d.finish();
            assert_eq!(h.trailer, Some(true), "chunk {chunk}");
            assert_eq!(h.sha256, <[u8; 32]>::from(Sha256::digest(&db)));
        }
        let mut bad = db.clone();
        bad[100] ^= 1;
        let mut d = DbDigest::new(bad.len() as u64);
        d.update(&bad);
        assert_eq!(d.finish().trailer, Some(false));
        let raw = fake_db(5, false);
        let mut d = DbDigest::new(raw.len() as u64);
        d.update(&raw);
        assert_eq!(d.finish().trailer, None);
    }

    #[test]
    fn entry_paths_are_confined() {
        assert_eq!(entry_parts(b"./db").unwrap(), vec!["db"]);
        assert_eq!(entry_parts(b"snap-1/./db").unwrap(), vec!["snap-1", "db"]);
        assert!(entry_parts(b"/etc/passwd").is_err());
        assert!(entry_parts(b"a/../../db").is_err());
        assert!(entry_parts(b"\xff").is_err());
    }
}
