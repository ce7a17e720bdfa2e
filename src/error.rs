//! The one error type of the agent.
//!
//! Every message here is read by an operator, usually through `juju show-action-output`.
//! Rules: lowercase, one clause naming the problem with user values in backticks, then the
//! way forward. Nothing secret (TLS keys, etcd values) is ever put into a message.

use std::path::PathBuf;

/// Exit codes, documented in the README.
pub mod code {
    /// The action failed while running.
    pub const FAILED: u8 = 1;
    /// Bad flags or params.
    pub const USAGE: u8 = 2;
    /// A precondition refused the action before anything changed.
    pub const REFUSED: u8 = 3;
    /// Another action holds the unit's lock.
    pub const BUSY: u8 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),

    #[error("cannot read etcd config `{path}`: {source}; point ETCD_ACTIONS_ETCD_CONFIG (or --etcd-config) at the file etcd runs with `--config-file`")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("etcd config `{path}` is not usable: {problem}")]
    ConfigInvalid { path: PathBuf, problem: String },

    #[error("cannot find `{tool}`: {hint}")]
    ToolMissing { tool: String, hint: String },

    #[error("failed to invoke `{command}`: {source}")]
    CommandInvoke {
        command: String,
        source: std::io::Error,
    },

    #[error("`{command}` {status}\n{}", frame(stderr))]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("etcd is not reachable at `{endpoint}`: {detail}; check that the etcd service is running and that ETCD_ACTIONS_ETCD_CONFIG points at its config")]
    EtcdUnreachable { endpoint: String, detail: String },

    #[error("etcd at `{endpoint}` refused {call}: {detail}")]
    Etcd {
        endpoint: String,
        call: String,
        detail: String,
    },

    #[error("unexpected output from `{command}`: {problem}")]
    BadOutput { command: String, problem: String },

    #[error("target `{path}` {problem}")]
    Target { path: PathBuf, problem: String },

    #[error("not enough free space in `{path}`: {action} needs about {need} but only {available} is free; free some space or choose another target")]
    NoSpace {
        path: PathBuf,
        action: String,
        need: String,
        available: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },

    #[error("another etcd-actions run holds the lock `{path}`{holder}; wait for it to finish and run the action again")]
    Busy { path: PathBuf, holder: String },

    #[error("{what} does not match: expected {expected}, got {actual}; {hint}")]
    Mismatch {
        what: String,
        expected: String,
        actual: String,
        hint: String,
    },

    #[error("archive `{path}` is refused: {problem}")]
    BadArchive { path: PathBuf, problem: String },

    #[error("export file `{path}` is refused: {problem}; nothing was changed")]
    BadExport { path: PathBuf, problem: String },

    #[error("no snapshot to restore: {detail}; attach one with `juju attach-resource {app} snapshot=./etcd-snapshot-....tar.gz` (or `--resource snapshot=...` at deploy), or pass the `snapshot` param with a path on the unit")]
    NoSnapshot { detail: String, app: String },

    #[error("refusing to restore: the cluster has {count} {what} ({names}); restoring on a scaled cluster breaks it. Deploy a new single unit with the snapshot resource (`juju deploy etcd new-etcd --resource snapshot=...`) or remove the other units first")]
    Scaled {
        count: usize,
        what: String,
        names: String,
    },

    #[error("`{command}` did not finish within {seconds}s and was killed with its process group; etcd's state is unknown: check the service. The restore journal is kept, so the next snapshot or restore run finishes or rolls back. ETCD_ACTIONS_SERVICE_TIMEOUT (--service-timeout) sets the limit\n{}", frame(output))]
    ServiceTimeout {
        command: String,
        seconds: u64,
        output: String,
    },

    #[error("waiting for the s3 provider: {0}; check `juju status` for the s3-integrator (its `sync-s3-credentials` action sets the keys) and run the action again")]
    StoreNotReady(String),

    #[error("waiting for the {provider}: {detail}; check `juju status` for it (its `credentials` option names the secret with the key) and run the action again")]
    ProviderNotReady { provider: String, detail: String },

    #[error("object store {store}: {problem}")]
    Store { store: String, problem: String },

    #[error("object store {store}: `{key}` already holds another archive, and an archive is never written over; nothing in the store was changed. Another cluster writes to the same folder: give each cluster a folder of its own (the s3 `path`)")]
    StoreConflict { store: String, key: String },

    #[error("object store {store}: the object written at `{key}` is not the archive that was sent ({problem}); it was removed and nothing was reported as uploaded")]
    StoreUnconfirmed {
        store: String,
        key: String,
        problem: String,
    },

    #[error("refusing to restore: {0}")]
    Refused(String),

    #[error("archive `{archive}` is encrypted (age) and no identity to open it is set: {hint}; nothing was changed")]
    Encrypted { archive: PathBuf, hint: String },

    #[error("archive `{archive}` cannot be decrypted: {problem}; nothing was changed. Give the identity of one of the recipients it was encrypted to")]
    Decrypt { archive: PathBuf, problem: String },

    /// A precondition refused the action before anything changed (not a restore).
    #[error("{0}")]
    Declined(String),

    #[error("internal error (a bug in etcd-actions: please report it): {0}; nothing after the failing step ran")]
    Internal(String),

    #[error("etcd has compacted its history up to revision {0}: the changes before it are gone")]
    Compacted(i64),

    /// A point in time outside the recorded change history, or a history with a hole.
    #[error("{0}")]
    History(String),

    #[error("restore failed: {detail}; {outcome}")]
    RestoreFailed { detail: String, outcome: String },
}

/// Most of a child's stderr shown in a message.
const STDERR_SHOWN: usize = 4096;

/// Most of a message given to the operator (`action-fail`, YAML, stderr). The kernel refuses a
/// single argument over 128 KiB, so `action-fail` could not even carry a longer one.
pub const MESSAGE_MAX: usize = 16 * 1024;

/// Cuts `text` to at most `max` bytes, keeping its start and its end (where tools put the
/// cause) around a note of how much was cut. Never splits a character.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let keep = max.saturating_sub(64) / 2;
    let mut head = keep;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - keep;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}\n[... {} bytes cut ...]\n{}",
        &text[..head],
        tail - head,
        &text[tail..]
    )
}

/// Frames a child's stderr between divider lines, as ripgrep does.
fn frame(stderr: &str) -> String {
    let stderr = bounded(stderr, STDERR_SHOWN);
    let body = stderr.trim();
    let body = if body.is_empty() {
        "<stderr is empty>"
    } else {
        body
    };
    format!("--- stderr ---\n{body}\n---")
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn usage(msg: impl Into<String>) -> Error {
        Error::Usage(msg.into())
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Target { .. } => code::USAGE,
            Error::Busy { .. } => code::BUSY,
            Error::Scaled { .. }
            | Error::Refused(_)
            | Error::Declined(_)
            | Error::Encrypted { .. }
            | Error::Decrypt { .. }
            | Error::History(_)
            | Error::BadArchive { .. }
            | Error::BadExport { .. }
            | Error::NoSnapshot { .. }
            | Error::StoreNotReady(_)
            | Error::ProviderNotReady { .. }
            | Error::Mismatch { .. }
            | Error::NoSpace { .. } => code::REFUSED,
            _ => code::FAILED,
        }
    }
}

/// Adds context to `io::Result`s so that every I/O error names the file it concerns.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::io(context(), source))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|errno| Error::io(context(), std::io::Error::from(errno)))
    }
}

/// Formats bytes the way `du -h` does: powers of 1024, one decimal below 10, rounded up.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        let rounded = (value * 10.0).ceil() / 10.0;
        if rounded < 10.0 {
            return format!("{rounded:.1}{}", UNITS[unit]);
        }
        return format!("10{}", UNITS[unit]);
    }
    let rounded = value.ceil();
    if rounded >= 1024.0 && unit < UNITS.len() - 1 {
        return format!("1.0{}", UNITS[unit + 1]);
    }
    format!("{rounded:.0}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_size_matches_du() {
        assert_eq!(human_size(0), "0");
        assert_eq!(human_size(1023), "1023");
        assert_eq!(human_size(1024), "1.0K");
        assert_eq!(human_size(1025), "1.1K");
        assert_eq!(human_size(68 * 1024), "68K");
        assert_eq!(human_size(10 * 1024 - 1), "10K");
        assert_eq!(human_size(1536 * 1024), "1.5M");
        assert_eq!(human_size(1024 * 1024 * 1024), "1.0G");
        assert_eq!(human_size(1024 * 1024 - 1), "1.0M");
    }

    #[test]
    fn bounded_keeps_both_ends() {
        let long = format!("start{}end", "é".repeat(10_000));
        let b = bounded(&long, 1000);
        assert!(b.len() <= 1000, "{}", b.len());
        assert!(b.starts_with("start") && b.ends_with("end"));
        assert!(b.contains("bytes cut"));
        assert_eq!(bounded("short", 1000), "short");
    }

    #[test]
    fn stderr_is_framed() {
        let e = Error::CommandFailed {
            command: "etcdctl x".into(),
            status: "exited with status 1".into(),
            stderr: "\n".into(),
        };
        assert!(e.to_string().contains("<stderr is empty>"));
    }
}
