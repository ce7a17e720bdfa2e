//! What the store takes, learnt by asking: CRC64NVME checksum headers and `If-None-Match`
//! are sent until the store refuses them (`400 InvalidArgument`, `InvalidRequest`,
//! `InvalidRequestParameter`, `501 NotImplemented`), and from then on, for the rest of the
//! process (a `follow` service: its lifetime), left out. `Content-MD5`, which every S3 store
//! checks, is always sent. The operator may pin the checksum mode (`--s3-checksum`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The checksum mode: `auto` (CRC64NVME until refused), `crc64nvme` (always; a refusal is an
/// error), `md5` (Content-MD5 only, never a checksum header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumMode {
    #[default]
    Auto,
    Crc64nvme,
    Md5,
}

impl ChecksumMode {
    pub fn parse(text: &str) -> Option<ChecksumMode> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(ChecksumMode::Auto),
            "crc64nvme" => Some(ChecksumMode::Crc64nvme),
            "md5" => Some(ChecksumMode::Md5),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumMode::Auto => "auto",
            ChecksumMode::Crc64nvme => "crc64nvme",
            ChecksumMode::Md5 => "md5",
        }
    }

    /// Whether requests carry CRC64NVME checksum headers now.
    pub fn checksums(self) -> bool {
        match self {
            ChecksumMode::Auto => !CHECKSUMS_REFUSED.load(Ordering::SeqCst),
            ChecksumMode::Crc64nvme => true,
            ChecksumMode::Md5 => false,
        }
    }
}

/// The checksum mode an operator set (`--s3-checksum`, `ETCD_ACTIONS_S3_CHECKSUM`, or the charm's
/// `s3-checksum` option).
pub fn parse_checksum(text: &str) -> Result<ChecksumMode, crate::error::Error> {
    ChecksumMode::parse(text).ok_or_else(|| {
        crate::error::Error::Usage(format!(
            "--s3-checksum `{}`: expected `auto` (CRC64NVME where the store takes it, the \
             default), `crc64nvme` (always; for stores that check it) or `md5` (Content-MD5 \
             only; for stores that refuse checksum headers)",
            crate::error::bounded(text, 100)
        ))
    })
}

static CHECKSUMS_REFUSED: AtomicBool = AtomicBool::new(false);
static CONDITIONAL_REFUSED: AtomicBool = AtomicBool::new(false);
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Whether the store refused checksum headers in this process.
pub fn checksums_refused() -> bool {
    CHECKSUMS_REFUSED.load(Ordering::SeqCst)
}

/// Whether writes carry `If-None-Match: *` now.
pub fn conditional() -> bool {
    !CONDITIONAL_REFUSED.load(Ordering::SeqCst)
}

/// What a request carried that a store may refuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub checksum: bool,
    pub conditional: bool,
}

impl Carried {
    pub fn of(headers: &http::HeaderMap) -> Carried {
        Carried {
            checksum: headers.keys().any(|k| {
                let k = k.as_str();
                k.starts_with("x-amz-checksum-") || k == "x-amz-sdk-checksum-algorithm"
            }),
            conditional: headers.contains_key(http::header::IF_NONE_MATCH)
                || headers.contains_key("x-goog-if-generation-match"),
        }
    }

    pub fn any(self) -> bool {
        self.checksum || self.conditional
    }
}

/// Whether an error answer is a store saying it does not take a header: the codes S3 stores
/// answer for an unknown or unsupported header.
pub fn is_refusal(status: u16, body: &str) -> bool {
    let code = error_code(body);
    status == 501
        || (status == 400
            && matches!(
                code,
                Some("InvalidArgument" | "InvalidRequest" | "InvalidRequestParameter")
                    | Some("NotImplemented")
            ))
}

/// Notes a refusal of what a request carried: the checksum headers first (a request carrying
/// both gets the other dropped only if it is refused again). Logged once per process.
pub fn refused(carried: Carried, status: u16, body: &str) {
    if carried.checksum {
        if !CHECKSUMS_REFUSED.swap(true, Ordering::SeqCst) {
            note(format!(
                "the store refuses CRC64NVME checksum headers ({}); with `--s3-checksum auto` \
                 uploads go on without them, with Content-MD5 on every part and a \
                 confirmation of each object (`md5` skips the first try)",
                code_of(status, body)
            ));
        }
    } else if carried.conditional && !CONDITIONAL_REFUSED.swap(true, Ordering::SeqCst) {
        note(format!(
            "the store refuses `If-None-Match` ({}); write-once rests on this agent's own \
             checks (a HEAD and a claim before each write, a confirmation after)",
            code_of(status, body)
        ));
    }
}

/// Notes, once, that the store ignored `If-None-Match` (a write over an object that was there).
pub fn conditional_ignored() {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::SeqCst) {
        note(
            "the store does not enforce `If-None-Match`; write-once rests on this agent's own \
             checks (a HEAD and a claim before each write, a confirmation after)"
                .into(),
        );
    }
}

/// The `<Code>` of an S3-style error body.
fn error_code(body: &str) -> Option<&str> {
    body.split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(c, _)| c.trim())
}

fn code_of(status: u16, body: &str) -> String {
    let code = error_code(body).unwrap_or_default();
    crate::error::bounded(format!("{status} {code}").trim(), 200)
}

fn note(text: String) {
    if let Ok(mut n) = NOTES.lock() {
        n.push(text);
    }
}

/// The notes not yet taken (each logged by whoever takes it).
pub fn take_notes() -> Vec<String> {
    NOTES
        .lock()
        .map(|mut n| std::mem::take(&mut *n))
        .unwrap_or_default()
}

/// The state a request was built for: a request that failed while the state changed under it
/// is sent again, built for the new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Using {
    pub checksums: bool,
    pub conditional: bool,
}

pub fn using(mode: ChecksumMode) -> Using {
    Using {
        checksums: mode.checksums(),
        conditional: conditional(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_the_codes_stores_answer() {
        let body = |c: &str| format!("<Error><Code>{c}</Code><Message>m</Message></Error>");
        assert!(is_refusal(400, &body("InvalidRequestParameter")));
        assert!(is_refusal(400, &body("InvalidArgument")));
        assert!(is_refusal(400, &body("InvalidRequest")));
        assert!(is_refusal(501, ""));
        assert!(!is_refusal(400, &body("BadDigest")));
        assert!(!is_refusal(403, &body("AccessDenied")));
        assert!(!is_refusal(412, &body("PreconditionFailed")));
        assert_eq!(ChecksumMode::parse(" MD5 "), Some(ChecksumMode::Md5));
        assert_eq!(ChecksumMode::parse("crc32"), None);
    }
}
