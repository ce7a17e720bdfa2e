//! `manifest.yaml`, the description every archive carries next to its `db`.

use serde::{Deserialize, Serialize};

/// Archive format written by this version.
pub const FORMAT_VERSION: u32 = 1;

/// How the db in an archive was taken.
pub const SOURCE_SNAPSHOT: &str = "snapshot-api";
/// A copy of `member/snap/db` of a stopped etcd: no etcd trailer.
pub const SOURCE_RAW_COPY: &str = "raw-copy";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub format_version: u32,
    pub created: String,
    pub tool_version: String,
    pub unit: String,
    /// `snapshot-api` or `raw-copy`.
    pub source: String,
    #[serde(default)]
    pub etcd_version: Option<String>,
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub member_id: Option<String>,
    #[serde(default)]
    pub member_name: Option<String>,
    #[serde(default)]
    pub revision: Option<i64>,
    /// Why `revision` is absent, when it could not be established exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_note: Option<String>,
    #[serde(default)]
    pub keys: Option<u64>,
    /// The member's raft applied index when the snapshot began: it moves with every change,
    /// auth and leases included, where the revision moves only with keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<u64>,
    /// The auth store's revision when the snapshot began (etcd 3.5 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_revision: Option<u64>,
    /// A digest of the lease ids when the snapshot began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases: Option<String>,
    /// The db's storage version, as etcd 3.6 and later report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_version: Option<String>,
    /// The Juju model and application that took it (absent standalone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    pub db_size: u64,
    pub db_sha256: String,
}

impl Manifest {
    /// A manifest made now by this tool, for `unit`, with `source` (`snapshot-api` or
    /// `raw-copy`); what is known about etcd and the db is filled in later.
    pub fn new(unit: &str, source: &str) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            created: rfc3339(now_secs()),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            unit: unit.to_string(),
            source: source.to_string(),
            etcd_version: None,
            cluster_id: None,
            member_id: None,
            member_name: None,
            revision: None,
            revision_note: None,
            keys: None,
            applied_index: None,
            auth_revision: None,
            leases: None,
            storage_version: None,
            model_uuid: None,
            app: None,
            db_size: 0,
            db_sha256: String::new(),
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a manifest always serializes")
    }

    pub fn from_yaml(text: &str) -> Result<Manifest, String> {
        let m: Manifest = serde_yaml::from_str(text).map_err(|e| format!("{e}"))?;
        if m.format_version == 0 || m.format_version > FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this tool reads up to {FORMAT_VERSION}); \
                 use a newer etcd-actions",
                m.format_version
            ));
        }
        if m.db_sha256.len() != 64 || !m.db_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("`db-sha256` is not a sha256 in hex".into());
        }
        Ok(m)
    }
}

/// What a published archive's `<name>.manifest.yaml` holds, beside it on disk and in the
/// store: everything list-backups, if-changed and prune need, readable without the key of an
/// encrypted archive (no key or value of etcd's is ever in it). In the store it is written
/// last, once the archive object is complete: it marks the archive as complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Record {
    /// The archive's name (its backup id).
    pub archive: String,
    /// sha256 and size of the archive file (of the encrypted file, when encrypted).
    pub sha256: String,
    pub size: u64,
    /// `age` when the archive is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    /// The age recipients (public keys) it was encrypted to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// The manifest inside the archive.
    #[serde(flatten)]
    pub manifest: Manifest,
}

/// What the record of an archive is named: `<archive>.manifest.yaml`.
pub const RECORD_SUFFIX: &str = ".manifest.yaml";
/// Largest record read.
pub const RECORD_MAX: u64 = 64 * 1024;

impl Record {
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a record always serializes")
    }

    /// Parses a record, which must be the record of `archive`.
    pub fn from_yaml(text: &str, archive: &str) -> Result<Record, String> {
        let r: Record = serde_yaml::from_str(text).map_err(|e| format!("{e}"))?;
        // The manifest's own checks.
        Manifest::from_yaml(&serde_yaml::to_string(&r.manifest).map_err(|e| e.to_string())?)?;
        if r.archive != archive {
            return Err(format!(
                "it is the record of `{}`",
                crate::error::bounded(&r.archive, 200)
            ));
        }
        if r.sha256.len() != 64 || !r.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("`sha256` is not a sha256 in hex".into());
        }
        Ok(r)
    }
}

/// Seconds since the epoch as `YYYY-MM-DD`, `HH`, `MM`, `SS` parts in UTC.
pub fn utc_parts(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days, Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

pub fn now_secs() -> u64 {
    // The crash-test build lets a test set the clock, to take real archives "at" chosen times.
    #[cfg(feature = "failpoints")]
    if let Some(t) = std::env::var("ETCD_ACTIONS_TEST_NOW")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        return t;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC timestamp.
pub fn rfc3339(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// The stamp in archive names, as the original charm wrote it: `YYYY-MM-DD-HH.MM.SS`.
pub fn name_stamp(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(secs);
    format!("{y:04}-{mo:02}-{d:02}-{h:02}.{mi:02}.{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(name_stamp(1_795_250_103), "2026-11-21-08.35.03");
    }

    #[test]
    fn manifest_round_trips_and_rejects_future_formats() {
        let m = Manifest {
            format_version: 1,
            created: rfc3339(0),
            tool_version: "0.1.0".into(),
            unit: "etcd/0".into(),
            source: SOURCE_SNAPSHOT.into(),
            etcd_version: Some("3.5.1".into()),
            cluster_id: Some("abc".into()),
            member_id: None,
            member_name: None,
            revision: Some(5),
            revision_note: None,
            keys: Some(3),
            applied_index: Some(9),
            auth_revision: Some(2),
            leases: Some("00".into()),
            storage_version: None,
            model_uuid: None,
            app: Some("etcd".into()),
            db_size: 20480,
            db_sha256: "0".repeat(64),
        };
        assert_eq!(Manifest::from_yaml(&m.to_yaml()).unwrap(), m);
        let future = m
            .to_yaml()
            .replace("format-version: 1", "format-version: 9");
        assert!(Manifest::from_yaml(&future).unwrap_err().contains("newer"));
        let r = Record {
            archive: "etcd-snapshot-x.tar.gz.age".into(),
            sha256: "a".repeat(64),
            size: 7,
            encryption: Some("age".into()),
            recipients: vec!["age1x".into()],
            manifest: m,
        };
        assert_eq!(Record::from_yaml(&r.to_yaml(), &r.archive).unwrap(), r);
        assert!(Record::from_yaml(&r.to_yaml(), "other.tar.gz").is_err());
    }
}
