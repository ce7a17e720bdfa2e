//! Encrypted archives: age v1 (age-encryption.org/v1) to X25519 recipients, one more `Write`
//! in the archive's nest (`tar -> gzip -> age -> hash -> file + upload`) and one more `Read` in
//! the unpacking nest (`file or object -> hash -> age -> gzip -> tar`). An encrypted archive is
//! exactly `age -r RECIPIENT < archive.tar.gz`: the stock `age -d -i key.txt` gives back the
//! `.tar.gz` this tool writes unencrypted.
//!
//! Where the keys come from: `--encrypt-to` / `ETCD_ACTIONS_ENCRYPT_TO` (recipients) and
//! `--identity-file` / `ETCD_ACTIONS_IDENTITY_FILE` standalone; under Juju, also the user
//! secret named by the `backup-encryption-secret` option (keys `recipients` and `identity`).
//! The identity is read into memory only (zeroized when dropped): never into argv, a child's
//! environment, a log line or a result.

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use zeroize::Zeroizing;

use crate::error::{bounded, Error};

/// The first bytes of every age v1 file.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";
/// What an encrypted archive's name ends in (after `.tar.gz`).
pub const AGE_SUFFIX: &str = ".age";
/// The charm option naming the secret with the keys.
pub const SECRET_OPTION: &str = "backup-encryption-secret";

/// The keys in force: recipients to encrypt to, identities to decrypt with.
#[derive(Default)]
pub struct Keys {
    recipients: Vec<age::x25519::Recipient>,
    /// The recipients as given (public keys), for the archive's record.
    recipient_text: Vec<String>,
    identities: Vec<age::x25519::Identity>,
    /// Where an identity would come from, for the message when none is there.
    identity_hint: String,
    /// Encryption was asked for but names no usable recipient: why (nothing is then ever
    /// written in the clear).
    unusable: Option<String>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("recipients", &self.recipient_text)
            .field("identities", &self.identities.len())
            .finish()
    }
}

/// Splits recipients given as one string: commas or newlines between them.
pub fn split_recipients(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.starts_with('#'))
        .map(str::to_string)
}

fn key_error(problem: String) -> Error {
    Error::usage(problem)
}

impl Keys {
    /// The keys of the standalone settings, and under Juju those of the configured secret.
    pub fn load(settings: &KeySettings, juju: bool) -> Result<Keys, Error> {
        let mut keys = Keys {
            identity_hint: if juju {
                format!(
                    "put the age identity under the key `identity` of the secret named by the \
                     `{SECRET_OPTION}` option (or pass --identity-file)"
                )
            } else {
                "pass --identity-file FILE or set ETCD_ACTIONS_IDENTITY_FILE (an age identity \
                 file, as age-keygen writes it)"
                    .to_string()
            },
            ..Keys::default()
        };
        for r in &settings.recipients {
            for one in split_recipients(r) {
                keys.add_recipient(&one, "--encrypt-to (ETCD_ACTIONS_ENCRYPT_TO)")?;
            }
        }
        if !settings.recipients.is_empty() && keys.recipients.is_empty() {
            keys.unusable = Some(format!(
                "--encrypt-to (ETCD_ACTIONS_ENCRYPT_TO) is set but names no recipient (`{}`)",
                bounded(&settings.recipients.join(","), 100)
            ));
        }
        if let Some(path) = &settings.identity_file {
            let text = read_identity_file(path)?;
            keys.add_identities(&text, &format!("the identity file `{}`", path.display()))?;
        }
        if juju {
            if let Some((uri, secret)) = juju_secret()? {
                let from = format!("the secret {uri} (option `{SECRET_OPTION}`)");
                if let Some(r) = &secret.recipients {
                    for one in split_recipients(r) {
                        keys.add_recipient(&one, &from)?;
                    }
                }
                if let Some(id) = &secret.identity {
                    keys.add_identities(id, &from)?;
                }
                if secret.recipients.is_none() && secret.identity.is_none() {
                    return Err(key_error(format!(
                        "{from} has neither `recipients` nor `identity`; add them with `juju \
                         update-secret`"
                    )));
                }
                if keys.recipients.is_empty() {
                    keys.unusable = Some(format!(
                        "{from} names no usable recipient (its `recipients` is missing, empty \
                         or only comments), so backups would be written in the clear; add the \
                         public keys under `recipients` with `juju update-secret`"
                    ));
                }
            }
        }
        Ok(keys)
    }

    fn add_recipient(&mut self, text: &str, from: &str) -> Result<(), Error> {
        let r = age::x25519::Recipient::from_str(text).map_err(|_| {
            key_error(format!(
                "`{}` from {from} is not an age X25519 recipient (a public key `age1...`, as \
                 `age-keygen -y key.txt` prints it)",
                bounded(text, 100)
            ))
        })?;
        if !self.recipient_text.iter().any(|t| t == text) {
            self.recipients.push(r);
            self.recipient_text.push(text.to_string());
        }
        Ok(())
    }

    fn add_identities(&mut self, text: &str, from: &str) -> Result<(), Error> {
        let mut found = 0;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Never echo the line: it may be a secret key with a typo.
            let id = age::x25519::Identity::from_str(line).map_err(|_| {
                key_error(format!(
                    "{from} holds a line that is not an age X25519 identity \
                     (`AGE-SECRET-KEY-1...`); only X25519 identities are used"
                ))
            })?;
            self.identities.push(id);
            found += 1;
        }
        if found == 0 {
            return Err(key_error(format!("{from} holds no age identity")));
        }
        Ok(())
    }

    /// Whether new archives are encrypted.
    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// The recipients, as given.
    pub fn recipients(&self) -> &[String] {
        &self.recipient_text
    }

    /// An encryptor to every recipient; `None` when there are none.
    pub fn encryptor(&self) -> Result<Option<age::Encryptor>, Error> {
        self.check_writes()?;
        if self.recipients.is_empty() {
            return Ok(None);
        }
        age::Encryptor::with_recipients(self.recipients.iter().map(|r| r as &dyn age::Recipient))
            .map(Some)
            .map_err(|e| Error::Internal(format!("cannot set up age encryption: {e}")))
    }

    /// Refuses to write anything when encryption is configured without a usable recipient.
    pub fn check_writes(&self) -> Result<(), Error> {
        match &self.unusable {
            Some(why) => Err(key_error(format!(
                "encryption is configured but {why}; nothing is written in the clear"
            ))),
            None => Ok(()),
        }
    }

    /// Refuses when there is no identity to open an encrypted archive with.
    pub fn require_identity(&self, archive: &Path) -> Result<(), Error> {
        if self.identities.is_empty() {
            return Err(Error::Encrypted {
                archive: archive.to_path_buf(),
                hint: self.identity_hint.clone(),
            });
        }
        Ok(())
    }

    /// A reader of the plaintext of the age file `input` (positioned at its start). Refuses,
    /// changing nothing, when there is no identity or none of them opens it.
    pub fn decrypt<R: BufRead>(
        &self,
        input: R,
        archive: &Path,
    ) -> Result<age::stream::StreamReader<HeaderBound<R>>, Error> {
        self.require_identity(archive)?;
        let refused = |problem: String| Error::BadArchive {
            path: archive.to_path_buf(),
            problem,
        };
        let d = age::Decryptor::new_buffered(HeaderBound::new(input)).map_err(|e| {
            refused(format!(
                "its age header cannot be read ({e}); it is damaged or not an age file"
            ))
        })?;
        d.decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => Error::Decrypt {
                    archive: archive.to_path_buf(),
                    problem: "none of the identities given opens it (it was encrypted to other \
                              recipients)"
                        .into(),
                },
                other => Error::Decrypt {
                    archive: archive.to_path_buf(),
                    problem: format!("its age header is damaged ({other})"),
                },
            })
    }
}

/// Largest age header read: a header with dozens of recipients is a few KiB. A hostile
/// file's endless header line is refused here, not read into memory.
const HEADER_MAX: u64 = 64 << 10;

/// Lets at most `HEADER_MAX` bytes through until the header's last line (`--- <mac>`) has
/// been consumed; after it, everything.
pub struct HeaderBound<R> {
    inner: R,
    consumed: u64,
    /// The last bytes consumed, to find `\n---` across reads.
    tail: [u8; 4],
    open: bool,
}

impl<R> HeaderBound<R> {
    fn new(inner: R) -> Self {
        HeaderBound {
            inner,
            consumed: 0,
            tail: [0; 4],
            open: false,
        }
    }
}

impl<R: BufRead> io::Read for HeaderBound<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        crate::pipe::read_buffered(self, out)
    }
}

impl<R: BufRead> BufRead for HeaderBound<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let open = self.open;
        let left = HEADER_MAX.saturating_sub(self.consumed);
        let buf = self.inner.fill_buf()?;
        if open {
            return Ok(buf);
        }
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the age header is longer than {} KiB", HEADER_MAX >> 10),
            ));
        }
        let n = buf.len().min(left as usize);
        Ok(&buf[..n])
    }

    fn consume(&mut self, n: usize) {
        if !self.open {
            if let Ok(buf) = self.inner.fill_buf() {
                for &b in &buf[..n.min(buf.len())] {
                    self.tail = [self.tail[1], self.tail[2], self.tail[3], b];
                    if &self.tail == b"\n---" {
                        // The MAC line: the header ends with it.
                        self.open = true;
                    }
                }
            }
            self.consumed += n as u64;
        }
        self.inner.consume(n);
    }
}

/// The settings that name keys.
#[derive(Debug, Clone, Default)]
pub struct KeySettings {
    /// Recipients, each possibly several separated by commas or newlines.
    pub recipients: Vec<String>,
    pub identity_file: Option<PathBuf>,
}

/// Reads an identity file (bounded; the text is zeroized when dropped).
fn read_identity_file(path: &Path) -> Result<Zeroizing<String>, Error> {
    use std::io::Read;
    let f = crate::fsutil::open_regular_path(path).map_err(|e| {
        key_error(format!(
            "the identity file `{}` cannot be read: {e}",
            path.display()
        ))
    })?;
    let mut text = Zeroizing::new(String::new());
    f.take(1 << 20).read_to_string(&mut text).map_err(|e| {
        key_error(format!(
            "the identity file `{}` cannot be read: {e}",
            path.display()
        ))
    })?;
    Ok(text)
}

/// What the configured secret holds.
#[derive(serde::Deserialize)]
struct SecretKeys {
    #[serde(default)]
    recipients: Option<String>,
    #[serde(default)]
    identity: Option<Zeroizing<String>>,
}

/// The secret named by `backup-encryption-secret`, when the option is set: `secret-get <uri>
/// --format json`.
fn juju_secret() -> Result<Option<(String, SecretKeys)>, Error> {
    let Ok(tool) = which::which("config-get") else {
        return Ok(None);
    };
    let out =
        crate::process::run_checked(Command::new(tool).args([SECRET_OPTION, "--format=json"]))?;
    let uri = serde_json::from_str::<Option<String>>(out.stdout.trim())
        .ok()
        .flatten()
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if uri.is_empty() {
        return Ok(None);
    }
    if !uri.starts_with("secret:") || uri.len() > 200 || uri.chars().any(char::is_whitespace) {
        return Err(key_error(format!(
            "the `{SECRET_OPTION}` option is `{}`, not a secret URI; set it to the `secret:...` \
             id `juju add-secret` printed",
            bounded(&uri, 100)
        )));
    }
    let tool = which::which("secret-get").map_err(|_| Error::ToolMissing {
        tool: "secret-get".into(),
        hint: "Juju 3.3 or later is needed for user secrets".into(),
    })?;
    let out = crate::process::run_checked(Command::new(tool).args([
        uri.as_str(),
        "--refresh",
        "--format=json",
    ]))
    .map_err(|e| match e {
        Error::CommandFailed { stderr, .. } => key_error(format!(
            "the secret {uri} (option `{SECRET_OPTION}`) cannot be read ({}); grant it to this \
             application: `juju grant-secret <secret> <app>`",
            bounded(stderr.trim(), 300)
        )),
        other => other,
    })?;
    let text = Zeroizing::new(out.stdout);
    // Parsed straight into zeroizing strings: no other copy of the identity is kept.
    let keys: SecretKeys = serde_json::from_str(text.trim()).map_err(|_| Error::BadOutput {
        command: "secret-get --format=json".into(),
        problem: "not a JSON object of strings".into(),
    })?;
    Ok(Some((uri, keys)))
}

/// The archive nest's encrypting layer: plain, or age. `finish` ends the age stream (its last
/// chunk) and hands back the writer below.
pub enum Sealed<W: Write> {
    Plain(W),
    Age(age::stream::StreamWriter<W>),
}

impl<W: Write> Sealed<W> {
    pub fn new(inner: W, encryptor: Option<age::Encryptor>) -> io::Result<Sealed<W>> {
        Ok(match encryptor {
            Some(e) => Sealed::Age(e.wrap_output(inner)?),
            None => Sealed::Plain(inner),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Sealed::Plain(w) => Ok(w),
            Sealed::Age(w) => w.finish(),
        }
    }
}

impl<W: Write> Write for Sealed<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sealed::Plain(w) => w.write(data),
            Sealed::Age(w) => w.write(data),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Sealed::Plain(w) => w.write_all(data),
            Sealed::Age(w) => w.write_all(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealed::Plain(w) => w.flush(),
            Sealed::Age(w) => w.flush(),
        }
    }
}

/// Reads `inner` (the decryption) on a scoped thread of its own, ahead of the reader it
/// returns: the decryption overlaps whatever consumes the plaintext.
pub fn ahead<'scope, R: io::Read + Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    inner: R,
) -> crate::pipe::PieceReader {
    crate::pipe::read_ahead(scope, inner, "decrypting thread", ()).0
}

/// Whether an archive's first bytes are an age header.
pub fn is_age(head: &[u8]) -> bool {
    head.starts_with(AGE_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn round_trips_and_refuses_the_wrong_key() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let mut keys = Keys::default();
        keys.add_recipient(&id.to_public().to_string(), "test")
            .unwrap();
        let mut w = Sealed::new(Vec::new(), keys.encryptor().unwrap()).unwrap();
        w.write_all(b"hello etcd").unwrap();
        let sealed = w.finish().unwrap();
        assert!(is_age(&sealed));
        assert!(
            keys.decrypt(&sealed[..], Path::new("x")).is_err(),
            "no identity"
        );
        use age::secrecy::ExposeSecret;
        keys.add_identities(other.to_string().expose_secret(), "test")
            .unwrap();
        assert!(matches!(
            keys.decrypt(&sealed[..], Path::new("x")),
            Err(Error::Decrypt { .. })
        ));
        keys.add_identities(id.to_string().expose_secret(), "test")
            .unwrap();
        let mut plain = String::new();
        keys.decrypt(&sealed[..], Path::new("x"))
            .unwrap()
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, "hello etcd");
        // A truncated file is refused at its end.
        // An endless header line is refused, not read.
        let mut endless = b"age-encryption.org/v1\n-> X25519 ".to_vec();
        endless.extend(std::iter::repeat_n(b'A', 1 << 20));
        let mut cursor = std::io::Cursor::new(&endless[..]);
        assert!(keys.decrypt(&mut cursor, Path::new("x")).is_err());
        assert!(
            cursor.position() <= HEADER_MAX,
            "read {}",
            cursor.position()
        );
        let cut = &sealed[..sealed.len() - 5];
        let mut out = Vec::new();
        assert!(keys
            .decrypt(cut, Path::new("x"))
            .unwrap()
            .read_to_end(&mut out)
            .is_err());
        assert!(keys.add_recipient("age1nope", "test").is_err());
        assert_eq!(
            split_recipients("a, b\nc\n\n").collect::<Vec<_>>(),
            vec!["a", "b", "c"]
        );
    }
}
