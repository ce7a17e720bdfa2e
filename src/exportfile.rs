//! The export file: `etcd-export-<stamp>-<cluster>.jsonl.gz` (`.age` after it when
//! encrypted). Gzip of JSON lines: a head line (format, cluster id, revision, prefix, count,
//! source), then one line per key in key order, named as `etcdctl get -w json` names a
//! KeyValue's fields (`key` and `value` in base64). Its `.sha256` sidecar is the file's.
//!
//! Written as one nest (lines, gzip, age, the hashing file writer) and read as one (the file
//! tapped for its sha256, age, gzip, lines), each line and the head checked as they come:
//! a file that is cut, altered, out of order, or holds a value etcd would refuse is refused
//! at the line that shows it, and its count and sha256 at the end.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::archive::HashingFileWriter;
use crate::crypt::{Keys, Sealed};
use crate::error::{Error, IoContext};
use crate::etcd::pb::KeyValue;
use crate::fsutil::Sidecar;
use crate::history::b64;
use crate::keyset::Kv;
use crate::store::TeeFile;

pub const FORMAT: &str = "etcd-actions-export/1";
/// The name's kind, and its extensions.
pub const KIND: &str = "etcd-export";
pub const EXT: &str = ".jsonl.gz";
pub const EXT_AGE: &str = ".jsonl.gz.age";
/// etcd's default `--max-request-bytes`: a put of a key and value past it is refused by etcd.
pub const REQUEST_MAX: usize = 1_572_864;
/// Room a put request takes besides its key and value.
const REQUEST_OVERHEAD: usize = 512;
/// Longest line read: a key and value at the request limit, in base64, with room to spare.
const LINE_MAX: u64 = 4 << 20;

/// The first line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    pub format: String,
    pub cluster_id: String,
    pub revision: i64,
    /// Every key of the file starts with it.
    pub prefix: String,
    pub count: u64,
    /// Where the keys were read: `live`, `archive <id>`, or `history <point> from <id>`.
    pub source: String,
    /// When the export was written (RFC 3339).
    pub created: String,
}

/// One key, as etcdctl's JSON output names a KeyValue's fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    key: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    #[serde(default)]
    value: String,
    #[serde(default)]
    lease: i64,
}

/// Writes an export: the head, then the keys in order, into `file` (gzip, then age when
/// encrypting, then the hashing file writer).
pub struct ExportWriter {
    gz: flate2::write::GzEncoder<Sealed<HashingFileWriter>>,
    line: Vec<u8>,
    expected: u64,
    written: u64,
    /// The last key written (empty before the first: no key is empty).
    last: Vec<u8>,
}

/// What an `ExportWriter` wrote: the file, its sha256 and its length.
pub struct Written {
    pub file: File,
    pub sha256: String,
    pub bytes: u64,
}

impl ExportWriter {
    pub fn new(
        file: File,
        encryptor: Option<age::Encryptor>,
        head: &Head,
    ) -> Result<ExportWriter, Error> {
        let io = |e: std::io::Error| Error::io("cannot write the export", e);
        let sealed =
            Sealed::new(HashingFileWriter::new(TeeFile::new(file, None)), encryptor).map_err(io)?;
        let mut w = ExportWriter {
            gz: flate2::write::GzEncoder::new(sealed, flate2::Compression::new(1)),
            line: Vec::with_capacity(4096),
            expected: head.count,
            written: 0,
            last: Vec::new(),
        };
        serde_json::to_writer(&mut w.line, head).map_err(|e| Error::Internal(e.to_string()))?;
        w.line.push(b'\n');
        w.gz.write_all(&w.line).map_err(io)?;
        Ok(w)
    }

    /// Writes one key; keys come in strictly increasing order.
    pub fn put(&mut self, kv: Kv<'_>) -> Result<(), Error> {
        if self.last.as_slice() >= kv.key {
            return Err(Error::Internal("export keys out of order".into()));
        }
        self.last.clear();
        self.last.extend_from_slice(kv.key);
        self.line.clear();
        let line = Line {
            key: b64().encode(kv.key),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: b64().encode(kv.value),
            lease: kv.lease,
        };
        serde_json::to_writer(&mut self.line, &line).map_err(|e| Error::Internal(e.to_string()))?;
        self.line.push(b'\n');
        self.gz
            .write_all(&self.line)
            .map_err(|e| Error::io("cannot write the export", e))?;
        self.written += 1;
        Ok(())
    }

    /// Ends the gzip and age streams, and returns the file with its sha256 and length. The
    /// head's count must be what was written: the keys changed under a read that should not
    /// move otherwise.
    pub fn finish(self) -> Result<Written, Error> {
        if self.written != self.expected {
            return Err(Error::Internal(format!(
                "the export's head says {} keys but {} were written",
                self.expected, self.written
            )));
        }
        let io = |e: std::io::Error| Error::io("cannot write the export", e);
        let (tee, sha, bytes) = self
            .gz
            .finish()
            .map_err(io)?
            .finish()
            .map_err(io)?
            .finish()
            .map_err(io)?;
        tee.file.sync_all().map_err(io)?;
        Ok(Written {
            file: tee.file,
            sha256: hex::encode(sha),
            bytes,
        })
    }
}

/// Hashes what passes through it into a hasher shared with the `ExportReader`, which reads the
/// file's last bytes through the same tap once the gzip stream ends.
struct Tap<R> {
    inner: R,
    hash: Rc<RefCell<Sha256>>,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

/// Reads an export, checking as it goes (see the module's text).
pub struct ExportReader {
    path: PathBuf,
    lines: Box<dyn BufRead>,
    /// The file itself (its offset shared with the one read through the nest).
    rest: File,
    hash: Rc<RefCell<Sha256>>,
    pub head: Head,
    prefix: Vec<u8>,
    read: u64,
    /// The last key read (empty before the first: an empty key is refused).
    last: Vec<u8>,
    buf: Vec<u8>,
    /// The sha256 its sidecar records, when it has one.
    pub recorded: Option<String>,
    /// The file's sha256, once read to the end.
    computed: Option<String>,
    done: bool,
}

impl ExportReader {
    /// Opens `path` and reads its head. An encrypted export (`.age`, or age bytes) is opened
    /// with the unit's identities.
    pub fn open(path: &Path, keys: &Keys) -> Result<ExportReader, Error> {
        let refuse = |problem: String| Error::BadExport {
            path: path.to_path_buf(),
            problem,
        };
        let file = crate::fsutil::open_regular_path(path)?;
        let rest = file
            .try_clone()
            .ctx(|| format!("cannot read `{}`", path.display()))?;
        let recorded = read_sidecar(path)?;
        let hash = Rc::new(RefCell::new(Sha256::new()));
        let mut tapped = BufReader::new(Tap {
            inner: file,
            hash: hash.clone(),
        });
        let head_bytes = tapped
            .fill_buf()
            .ctx(|| format!("cannot read `{}`", path.display()))?;
        let plain: Box<dyn Read> = if crate::crypt::is_age(head_bytes) {
            Box::new(keys.decrypt(tapped, path)?)
        } else if head_bytes.starts_with(&[0x1f, 0x8b]) {
            Box::new(tapped)
        } else {
            return Err(refuse(
                "it is not an export: neither gzip nor age; give a file the export action wrote"
                    .into(),
            ));
        };
        let lines: Box<dyn BufRead> = Box::new(BufReader::with_capacity(
            256 << 10,
            flate2::read::GzDecoder::new(plain),
        ));
        let mut r = ExportReader {
            path: path.to_path_buf(),
            lines,
            rest,
            hash,
            head: Head {
                format: String::new(),
                cluster_id: String::new(),
                revision: 0,
                prefix: String::new(),
                count: 0,
                source: String::new(),
                created: String::new(),
            },
            prefix: Vec::new(),
            read: 0,
            last: Vec::new(),
            buf: Vec::new(),
            recorded,
            computed: None,
            done: false,
        };
        if !r.line()? {
            return Err(refuse("it is empty: it holds no head line".into()));
        }
        let head: Head = serde_json::from_slice(&r.buf).map_err(|e| {
            refuse(format!(
                "its first line is not an export's head ({e}); give a file the export action wrote"
            ))
        })?;
        if head.format != FORMAT {
            return Err(refuse(format!(
                "its format is `{}`, not `{FORMAT}`",
                crate::error::bounded(&head.format, 100)
            )));
        }
        r.prefix = head.prefix.as_bytes().to_vec();
        r.head = head;
        Ok(r)
    }

    fn refuse(&self, problem: String) -> Error {
        Error::BadExport {
            path: self.path.clone(),
            problem,
        }
    }

    /// Reads the next line into `buf` (without its newline); `false` at the end.
    fn line(&mut self) -> Result<bool, Error> {
        self.buf.clear();
        let n = (&mut self.lines)
            .take(LINE_MAX)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| {
                self.refuse(format!(
                    "it cannot be decompressed ({e}): it is cut or damaged; copy it again"
                ))
            })?;
        if n == 0 {
            return Ok(false);
        }
        if self.buf.last() != Some(&b'\n') {
            if n as u64 >= LINE_MAX {
                return Err(self.refuse(format!(
                    "line {} is longer than {}",
                    self.read + 2,
                    crate::error::human_size(LINE_MAX)
                )));
            }
            return Err(self.refuse("its last line is cut".into()));
        }
        self.buf.pop();
        Ok(true)
    }

    /// The next key, checked; `None` after the last, once the count and the sha256 are
    /// checked too.
    pub fn next_kv(&mut self) -> Result<Option<KeyValue>, Error> {
        if self.done {
            return Ok(None);
        }
        if !self.line()? {
            self.finish()?;
            return Ok(None);
        }
        self.read += 1;
        let at = self.read;
        if at > self.head.count {
            return Err(self.refuse(format!(
                "it holds more keys than the {} its head says: it was altered",
                self.head.count
            )));
        }
        let line: Line = serde_json::from_slice(&self.buf)
            .map_err(|e| self.refuse(format!("key line {at} is not readable ({e})")))?;
        let decode = |what: &str, s: &str| {
            b64()
                .decode(s)
                .map_err(|e| self.refuse(format!("key line {at}: its {what} is not base64 ({e})")))
        };
        let kv = KeyValue {
            key: decode("key", &line.key)?,
            value: decode("value", &line.value)?,
            create_revision: line.create_revision,
            mod_revision: line.mod_revision,
            version: line.version,
            lease: line.lease,
        };
        let shown = || crate::error::bounded(&String::from_utf8_lossy(&kv.key), 200);
        if kv.key.is_empty() || !kv.key.starts_with(&self.prefix) {
            return Err(self.refuse(format!(
                "key `{}` (line {at}) is outside its prefix `{}`",
                shown(),
                self.head.prefix
            )));
        }
        if self.last >= kv.key {
            return Err(self.refuse(format!(
                "key `{}` (line {at}) is out of order: an export lists each key once, in order",
                shown()
            )));
        }
        if kv.key.len() + kv.value.len() + REQUEST_OVERHEAD > REQUEST_MAX {
            return Err(self.refuse(format!(
                "key `{}` (line {at}) holds {} of value, past etcd's request limit ({}): etcd \
                 would refuse it",
                shown(),
                crate::error::human_size(kv.value.len() as u64),
                crate::error::human_size(REQUEST_MAX as u64)
            )));
        }
        self.last.clear();
        self.last.extend_from_slice(&kv.key);
        Ok(Some(kv))
    }

    /// At the end of the gzip stream: the count, nothing after it, and the sidecar's sha256.
    fn finish(&mut self) -> Result<(), Error> {
        self.done = true;
        if self.read != self.head.count {
            return Err(self.refuse(format!(
                "its head says {} keys but it holds {}: it is cut or was altered",
                self.head.count, self.read
            )));
        }
        // Whatever the nest did not read (after the gzip stream) is hashed too.
        let mut rest = Vec::new();
        (&mut self.rest)
            .take(1 << 20)
            .read_to_end(&mut rest)
            .ctx(|| format!("cannot read `{}`", self.path.display()))?;
        self.hash.borrow_mut().update(&rest);
        let sha = hex::encode(self.hash.borrow().clone().finalize());
        self.computed = Some(sha.clone());
        if let Some(recorded) = &self.recorded {
            if !recorded.eq_ignore_ascii_case(&sha) {
                return Err(self.refuse(format!(
                    "its sha256 is {sha} but its `.sha256` sidecar says {recorded}: it was \
                     altered or cut"
                )));
            }
        }
        Ok(())
    }

    /// The file's sha256, once it was read to the end.
    pub fn sha256(&self) -> Option<String> {
        self.computed.clone()
    }

    /// Reads every key to the end, checking each; returns how many.
    pub fn check_all(&mut self) -> Result<u64, Error> {
        while self.next_kv()?.is_some() {}
        Ok(self.read)
    }
}

/// The sha256 in `<path>.sha256`, when there is such a file.
fn read_sidecar(path: &Path) -> Result<Option<String>, Error> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    match crate::fsutil::Dir::open(parent)?.sha256_sidecar(&name)? {
        Sidecar::Missing => Ok(None),
        Sidecar::Sha256(sha) => Ok(Some(sha)),
        Sidecar::NotASha256 => Err(Error::BadExport {
            path: path.to_path_buf(),
            problem: format!(
                "its sidecar `{}.sha256` holds no sha256; remove it or copy it again",
                path.display()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(count: u64) -> Head {
        Head {
            format: FORMAT.into(),
            cluster_id: "c".into(),
            revision: 9,
            prefix: "/a/".into(),
            count,
            source: "live".into(),
            created: "2026-12-04T00:00:00Z".into(),
        }
    }

    fn kv<'a>(key: &'a [u8], value: &'a [u8]) -> Kv<'a> {
        Kv {
            key,
            value,
            create_revision: 2,
            mod_revision: 3,
            version: 1,
            lease: 0,
        }
    }

    fn write(dir: &Path, head: &Head, keys: &[(&[u8], &[u8])]) -> PathBuf {
        let path = dir.join("x.jsonl.gz");
        let mut w = ExportWriter::new(File::create(&path).unwrap(), None, head).unwrap();
        for (k, v) in keys {
            w.put(kv(k, v)).unwrap();
        }
        let written = w.finish().unwrap();
        std::fs::write(
            dir.join("x.jsonl.gz.sha256"),
            format!("{}  x.jsonl.gz\n", written.sha256),
        )
        .unwrap();
        path
    }

    fn keys() -> Keys {
        Keys::load(&crate::crypt::KeySettings::default(), false).unwrap()
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &head(2), &[(b"/a/1", b"one"), (b"/a/2", b"")]);
        let mut r = ExportReader::open(&path, &keys()).unwrap();
        assert_eq!(r.head, head(2));
        assert_eq!(r.next_kv().unwrap().unwrap().value, b"one");
        assert_eq!(r.next_kv().unwrap().unwrap().key, b"/a/2");
        assert!(r.next_kv().unwrap().is_none());

        // A flipped byte: gzip or the sidecar says so.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let got = ExportReader::open(&path, &keys()).and_then(|mut r| r.check_all());
        assert!(matches!(got, Err(Error::BadExport { .. })), "{got:?}");

        // A cut file.
        let path = write(dir.path(), &head(2), &[(b"/a/1", b"one"), (b"/a/2", b"")]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        std::fs::remove_file(dir.path().join("x.jsonl.gz.sha256")).unwrap();
        let got = ExportReader::open(&path, &keys()).and_then(|mut r| r.check_all());
        assert!(matches!(got, Err(Error::BadExport { .. })), "{got:?}");
    }
}
