//! etcd behind typed methods: its v3 gRPC API in-process, and its offline tools.
//!
//! Online calls (status, member list, a count-only range, the snapshot stream) go to this
//! unit's client URL through etcd's v3 gRPC API in-process, with the TLS files from etcd's
//! config. Offline commands (`snapshot status`, `snapshot restore`) run etcdutl where it
//! exists (3.5+) and etcdctl otherwise (3.4); etcd 3.6's etcdctl has neither.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{ClientTls, EtcdConfig, Settings};
use crate::error::{Error, IoContext};
use crate::process::{display, etcd_tool, run_checked};

/// etcd's v3 API, generated at build time from `proto/etcd.proto` (see build.rs). Public for
/// the tests, which load data through it.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}
mod client;
pub mod kv;
mod offline;
mod session;
mod snapshot;
mod watch;

pub use client::KeyAt;
pub use offline::{random_token, DbStatus, OfflineTool, RestoreRequest, Throwaway};
use pb::auth_client::AuthClient;
use pb::cluster_client::ClusterClient;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;
pub use session::{Guard, Session, Step};
pub use snapshot::SnapshotStream;
pub use watch::{Change, Watch, Watched};

/// What a call can fail with: connecting, or the call itself.
enum CallError {
    Connect(tonic::transport::Error),
    Status(tonic::Status),
}

impl From<tonic::transport::Error> for CallError {
    fn from(e: tonic::transport::Error) -> CallError {
        CallError::Connect(e)
    }
}

impl From<tonic::Status> for CallError {
    fn from(e: tonic::Status) -> CallError {
        CallError::Status(e)
    }
}

/// A `major.minor.patch` etcd version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim().trim_start_matches('v');
        let mut parts = s
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Version(major, minor, patch))
    }

    pub fn minor(self) -> (u32, u32) {
        (self.0, self.1)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// `endpoint status` of one member.
#[derive(Debug, Clone)]
pub struct Status {
    pub version: String,
    pub cluster_id: u64,
    pub member_id: u64,
    pub revision: i64,
    pub db_size: u64,
    /// The member's raft applied index (0 where etcd does not report it).
    pub applied_index: u64,
    /// The member's raft index and term: they only grow in a cluster's life, so going back
    /// means the member's data was rolled back.
    pub raft_index: u64,
    pub raft_term: u64,
    /// The db's storage version (etcd 3.6 and later).
    pub storage_version: Option<String>,
}

/// What moves when users, roles, grants or leases change, which the revision does not: the
/// auth store's revision (etcd 3.5 and later) and a digest of the lease ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    pub auth_revision: Option<u64>,
    pub leases: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub is_learner: bool,
}

/// Formats an etcd id the way etcdctl's table output does.
pub fn hex_id(id: u64) -> String {
    format!("{id:x}")
}

/// Online client for this unit's member: etcd's v3 gRPC API in-process (tonic, generated from `proto/etcd.proto`),
/// each call on a small tokio runtime of its own, so the rest of the program stays synchronous.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: String,
    tls: ClientTls,
}

/// Time to connect, and to answer one unary call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused port is retried before a call gives up.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// The snapshot stream stalls when less than `STALL_BYTES` arrive in `STREAM_STALL`: etcd
/// sends 32 KiB messages as fast as the network takes them, so a trickle is no etcd.
const STREAM_STALL: Duration = Duration::from_secs(60);
const STALL_BYTES: u64 = 256 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(Version::parse("3.4.23"), Some(Version(3, 4, 23)));
        assert_eq!(Version::parse(" v3.5.1\n"), Some(Version(3, 5, 1)));
        assert_eq!(Version::parse("3.6"), Some(Version(3, 6, 0)));
        assert_eq!(Version::parse("x"), None);
        assert!(Version(3, 5, 0) > Version(3, 4, 27));
    }
}
