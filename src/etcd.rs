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
pub mod kv;
use pb::auth_client::AuthClient;
use pb::cluster_client::ClusterClient;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;

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

impl Client {
    pub fn new(config: &EtcdConfig) -> Client {
        Client::with_tls(config.endpoint(), config.tls.clone())
    }

    /// A client of `endpoint`; the TLS files are used when it is `https://`.
    pub fn with_tls(endpoint: &str, tls: ClientTls) -> Client {
        Client {
            endpoint: endpoint.to_string(),
            tls,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether something listens on the endpoint's port. `Ok(false)` only when every address
    /// refuses the connection, which means etcd is not running here; a timeout or any other
    /// failure is an error, because etcd may be running but unreachable. Fast: no gRPC
    /// retries against a closed port.
    pub fn listening(&self) -> Result<bool, Error> {
        use std::net::{TcpStream, ToSocketAddrs};
        let hostport = host_port(&self.endpoint);
        let fail = |detail: String| Error::EtcdUnreachable {
            endpoint: self.endpoint.clone(),
            detail,
        };
        let addrs: Vec<_> = hostport
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve `{hostport}`: {e}")))?
            .collect();
        let mut other = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, Duration::from_secs(3)) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => other = Some(format!("{addr}: {e}")),
            }
        }
        match other {
            None if !addrs.is_empty() => Ok(false),
            None => Err(fail(format!("`{hostport}` resolves to no address"))),
            Some(e) => Err(fail(format!(
                "{e}; neither running nor refusing connections, so the restore cannot tell \
                 whether etcd is stopped"
            ))),
        }
    }

    /// Waits up to `DIAL_TIMEOUT` for the port to accept connections, as etcdctl's dial does
    /// (etcd just started by a service command needs a moment); a refused port is then an
    /// error at once, where gRPC would keep retrying it until the call's timeout.
    fn wait_listening(&self) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + DIAL_TIMEOUT;
        while !self.listening()? {
            if std::time::Instant::now() >= deadline {
                return Err(Error::EtcdUnreachable {
                    endpoint: self.endpoint.clone(),
                    detail: format!("connection refused for {}s", DIAL_TIMEOUT.as_secs()),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The gRPC endpoint: timeouts, keepalives and, for `https://`, the TLS files.
    fn grpc_endpoint(&self) -> Result<Endpoint, Error> {
        let invalid = |problem: String| Error::ConfigInvalid {
            path: self.endpoint.clone().into(),
            problem,
        };
        let mut ep = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| invalid(format!("the client URL is not usable: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        if !self.endpoint.starts_with("https://") {
            return Ok(ep);
        }
        let read = |what: &str, p: &Path| {
            std::fs::read(p).map_err(|e| Error::ConfigInvalid {
                path: p.to_path_buf(),
                problem: format!(
                    "cannot read the client {what} ({e}); the agent reads etcd's TLS files as \
                     etcdctl does: run it as root"
                ),
            })
        };
        let mut tls = ClientTlsConfig::new();
        match &self.tls.trusted_ca_file {
            Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read("CA", ca)?)),
            None => tls = tls.with_native_roots(),
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("certificate", cert)?,
                    read("key", key)?,
                ));
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(Error::Usage(
                    "a client certificate needs its key, and a key its certificate (cert-file \
                     and key-file, or --cert and --key)"
                        .into(),
                ))
            }
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| invalid(format!("the TLS settings are not usable: {e}")))?;
        Ok(ep)
    }

    fn runtime() -> Result<tokio::runtime::Runtime, Error> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(|| "cannot start the etcd client's runtime".to_string())
    }

    /// Turns a client error into ours, naming the endpoint and the call.
    fn error(&self, call: &str, e: &CallError) -> Error {
        let (detail, unreachable) = match e {
            CallError::Connect(e) => (error_chain(e), true),
            CallError::Status(s) => {
                let mut detail = s.message().to_string();
                if let Some(source) = std::error::Error::source(s) {
                    detail = format!("{detail}: {}", error_chain(source));
                }
                if detail.is_empty() {
                    detail = format!("{:?}", s.code());
                }
                (
                    detail,
                    matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Cancelled
                    ),
                )
            }
        };
        if unreachable {
            Error::EtcdUnreachable {
                endpoint: self.endpoint.clone(),
                detail,
            }
        } else {
            Error::Etcd {
                endpoint: self.endpoint.clone(),
                call: call.to_string(),
                detail,
            }
        }
    }

    fn timed_out(&self, call: &str, after: Duration) -> Error {
        Error::EtcdUnreachable {
            endpoint: self.endpoint.clone(),
            detail: format!("{call} got no answer within {}s", after.as_secs()),
        }
    }

    /// Runs one call on a runtime of its own, over a connection of its own.
    fn call<T, F, Fut>(&self, call: &str, f: F) -> Result<T, Error>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        self.wait_listening()?;
        let ep = self.grpc_endpoint()?;
        let rt = Client::runtime()?;
        rt.block_on(async {
            let work = async {
                let channel = ep.connect().await?;
                f(channel).await
            };
            match tokio::time::timeout(CALL_TIMEOUT, work).await {
                Ok(r) => r.map_err(|e| self.error(call, &e)),
                Err(_) => Err(self.timed_out(call, CALL_TIMEOUT)),
            }
        })
    }

    /// Waits up to `timeout` for an etcd just started (a restored member, a throwaway one) to
    /// listen and answer its status. Looks again every 20 ms: for a restore, the wait is
    /// downtime (a refused connect costs microseconds).
    pub fn wait_serving(&self, timeout: Duration) -> Result<Status, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let answer = match self.listening() {
                Ok(true) => self.status(),
                Ok(false) => Err(Error::EtcdUnreachable {
                    endpoint: self.endpoint.clone(),
                    detail: "connection refused".into(),
                }),
                Err(e) => Err(e),
            };
            match answer {
                Ok(s) => return Ok(s),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn status(&self) -> Result<Status, Error> {
        self.call("status", |c| async move {
            let r = MaintenanceClient::new(c)
                .status(pb::StatusRequest {})
                .await?
                .into_inner();
            let h = r.header.unwrap_or_default();
            Ok(Status {
                version: r.version,
                cluster_id: h.cluster_id,
                member_id: h.member_id,
                revision: h.revision,
                db_size: u64::try_from(r.db_size).unwrap_or(0),
                applied_index: r.raft_applied_index,
                raft_index: r.raft_index,
                raft_term: r.raft_term,
                storage_version: Some(r.storage_version).filter(|v| !v.is_empty()),
            })
        })
    }

    pub fn members(&self) -> Result<Vec<Member>, Error> {
        self.call("member list", |c| async move {
            let r = ClusterClient::new(c)
                .member_list(pb::MemberListRequest::default())
                .await?
                .into_inner();
            Ok(r.members
                .into_iter()
                .map(|m| Member {
                    id: m.id,
                    name: m.name,
                    peer_urls: m.peer_ur_ls,
                    is_learner: m.is_learner,
                })
                .collect())
        })
    }

    /// The auth store's revision and a digest of the lease ids; either is `None` where etcd
    /// does not answer it (3.4 has no AuthStatus).
    pub fn marks(&self) -> Result<Marks, Error> {
        self.call("auth status and leases", |c| async move {
            let auth_revision = match AuthClient::new(c.clone())
                .auth_status(pb::AuthStatusRequest {})
                .await
            {
                Ok(r) => Some(r.into_inner().auth_revision),
                Err(s) if s.code() == tonic::Code::Unimplemented => None,
                Err(s) => return Err(CallError::Status(s)),
            };
            let leases = match LeaseClient::new(c)
                .lease_leases(pb::LeaseLeasesRequest {})
                .await
            {
                Ok(r) => {
                    use sha2::Digest;
                    let mut ids: Vec<i64> = r.into_inner().leases.iter().map(|l| l.id).collect();
                    ids.sort_unstable();
                    let mut h = sha2::Sha256::new();
                    for id in ids {
                        h.update(id.to_le_bytes());
                    }
                    Some(hex::encode(&h.finalize()[..8]))
                }
                Err(s) if s.code() == tonic::Code::Unimplemented => None,
                Err(s) => return Err(CallError::Status(s)),
            };
            Ok(Marks {
                auth_revision,
                leases,
            })
        })
    }

    /// One key as it was at `revision` (see `KeyAt`): its mod revision and value, `None` when it did not
    /// exist then. `Ok(Err(why))` when etcd cannot say: the revision was compacted, or it
    /// is in etcd's future.
    pub fn key_at(&self, key: &[u8], revision: i64) -> Result<KeyAt, Error> {
        let key = key.to_vec();
        let got = self.call("range", |c| async move {
            match KvClient::new(c)
                .range(pb::RangeRequest {
                    key,
                    revision,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => Ok(Ok(r
                    .into_inner()
                    .kvs
                    .into_iter()
                    .next()
                    .map(|kv| (kv.mod_revision, kv.value)))),
                Err(s) if s.code() == tonic::Code::OutOfRange => Ok(Err(s.message().to_string())),
                Err(s) => Err(CallError::Status(s)),
            }
        })?;
        Ok(got)
    }

    /// Number of live keys at `revision`: one count-only Range over all keys.
    pub fn key_count(&self, revision: i64) -> Result<u64, Error> {
        self.call("range count", |c| async move {
            let r = KvClient::new(c)
                .range(pb::RangeRequest {
                    key: vec![0],
                    range_end: vec![0],
                    revision,
                    count_only: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(u64::try_from(r.count).unwrap_or(0))
        })
    }

    /// Opens etcd's snapshot stream. A thread of its own receives it (so the network keeps
    /// flowing while the caller compresses) and hands it over in etcd's 32 KiB messages
    /// through a bounded queue. Returns once the first message has arrived: it announces the
    /// size.
    pub fn snapshot(&self, timeout: Duration) -> Result<SnapshotStream, Error> {
        self.wait_listening()?;
        let ep = self.grpc_endpoint()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Option<Vec<bytes::Bytes>>, Error>>(4);
        let (first_tx, first_rx) = std::sync::mpsc::channel::<Result<(bytes::Bytes, u64), Error>>();
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name("etcd-snapshot".into())
            .spawn(move || me.receive(ep, timeout, &first_tx, &tx))
            .ctx(|| "cannot start the snapshot receiver".to_string())?;
        let (first, remaining) = first_rx.recv().unwrap_or_else(|_| {
            Err(Error::EtcdUnreachable {
                endpoint: self.endpoint.clone(),
                detail: "the snapshot stream ended before it started".into(),
            })
        })?;
        let db = remaining + first.len() as u64;
        Ok(SnapshotStream {
            endpoint: self.endpoint.clone(),
            size: db + 32,
            received: first.len() as u64,
            batch: vec![first].into_iter(),
            rx,
            ended: false,
            failure: None,
            thread: Some(thread),
        })
    }

    /// The receiving thread: sends the first message's bytes and remaining count on `first`,
    /// then every further message on `rest`, then `None` at the stream's end.
    fn receive(
        &self,
        ep: Endpoint,
        timeout: Duration,
        first: &std::sync::mpsc::Sender<Result<(bytes::Bytes, u64), Error>>,
        rest: &std::sync::mpsc::SyncSender<Result<Option<Vec<bytes::Bytes>>, Error>>,
    ) {
        let rt = match Client::runtime() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = first.send(Err(e));
                return;
            }
        };
        rt.block_on(async {
            let open = async {
                let channel = ep.connect_with_connector(BigReads).await?;
                let mut stream = MaintenanceClient::new(channel)
                    .snapshot(pb::SnapshotRequest {})
                    .await?
                    .into_inner();
                let m = stream.message().await?;
                Ok::<_, CallError>((stream, m))
            };
            let (mut stream, m) = match tokio::time::timeout(CALL_TIMEOUT, open).await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    let _ = first.send(Err(self.error("snapshot", &e)));
                    return;
                }
                Err(_) => {
                    let _ = first.send(Err(self.timed_out("snapshot", CALL_TIMEOUT)));
                    return;
                }
            };
            let Some(m) = m else {
                let _ = first.send(Err(Error::EtcdUnreachable {
                    endpoint: self.endpoint.clone(),
                    detail: "the snapshot stream ended before it started".into(),
                }));
                return;
            };
            let remaining = m.remaining_bytes;
            if first.send(Ok((m.blob, remaining))).is_err() {
                return;
            }
            let started = tokio::time::Instant::now();
            let deadline = started + timeout;
            let (mut window, mut window_bytes) = (started, 0u64);
            let (mut batch, mut batched) = (Vec::new(), 0);
            loop {
                let wait = STREAM_STALL
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                let next = match tokio::time::timeout(wait, stream.message()).await {
                    Ok(Ok(Some(m))) => Ok(Some(m.blob)),
                    Ok(Ok(None)) => Ok(None),
                    Ok(Err(e)) => Err(self.error("snapshot", &CallError::Status(e))),
                    Err(_) => Err(self.timed_out("the snapshot stream", wait)),
                };
                let now = tokio::time::Instant::now();
                if let Ok(Some(blob)) = &next {
                    window_bytes += blob.len() as u64;
                }
                let next = if now >= deadline {
                    Err(Error::EtcdUnreachable {
                        endpoint: self.endpoint.clone(),
                        detail: format!(
                            "the snapshot stream did not finish within {}s; \
                             ETCD_ACTIONS_SNAPSHOT_TIMEOUT (--snapshot-timeout) sets the limit",
                            timeout.as_secs()
                        ),
                    })
                } else if now - window >= STREAM_STALL {
                    if window_bytes < STALL_BYTES {
                        Err(Error::EtcdUnreachable {
                            endpoint: self.endpoint.clone(),
                            detail: format!(
                                "the snapshot stream stalled: {window_bytes} bytes in the last \
                                 {}s",
                                STREAM_STALL.as_secs()
                            ),
                        })
                    } else {
                        (window, window_bytes) = (now, 0);
                        next
                    }
                } else {
                    next
                };
                // Messages go over in batches of about 1 MiB: one hand-off (and wake-up) per
                // batch instead of one per 32 KiB message.
                let end = match next {
                    Ok(Some(blob)) => {
                        batched += blob.len();
                        batch.push(blob);
                        if batched < BATCH {
                            continue;
                        }
                        None
                    }
                    Ok(None) => Some(Ok(None)),
                    Err(e) => Some(Err(e)),
                };
                batched = 0;
                // The reader went away (the archive failed): stop, which cancels the stream.
                if !batch.is_empty() && rest.send(Ok(Some(std::mem::take(&mut batch)))).is_err() {
                    return;
                }
                if let Some(end) = end {
                    let _ = rest.send(end);
                    return;
                }
            }
        });
    }
}

/// Connects over TCP with a 256 KiB read buffer in front of the socket: h2 reads about 8 KiB
/// at a time, which cost 150,000 `recvfrom` calls per GB of snapshot; through the buffer a
/// call takes whatever has arrived. TLS, when the endpoint has it, is layered on top by tonic.
#[derive(Clone, Copy)]
struct BigReads;

type BigReadsIo = hyper_util::rt::TokioIo<tokio::io::BufReader<tokio::net::TcpStream>>;

impl tonic::codegen::Service<http::Uri> for BigReads {
    type Response = BigReadsIo;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<BigReadsIo, std::io::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no host in the URL")
            })?;
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let tcp = tokio::net::TcpStream::connect(format!("{host}:{port}")).await?;
            tcp.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(
                tokio::io::BufReader::with_capacity(256 << 10, tcp),
            ))
        })
    }
}

/// `host:port` of a client URL (port 2379 when it has none).
fn host_port(endpoint: &str) -> String {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    if hostport.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
    }) {
        hostport.to_string()
    } else {
        format!("{hostport}:2379")
    }
}

/// An error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Bytes of snapshot messages handed from the receiving thread at once.
const BATCH: usize = 1 << 20;

/// etcd's snapshot stream as pieces (its messages, not copied): the db's bytes, then the
/// 32-byte sha256 etcd sends last. `size` is what the first message announced; a stream that ends early, runs long or
/// breaks is a read error, and the typed cause is kept for `take_failure`.
pub struct SnapshotStream {
    endpoint: String,
    /// Bytes the stream announced: the db and etcd's 32-byte digest.
    pub size: u64,
    received: u64,
    batch: std::vec::IntoIter<bytes::Bytes>,
    rx: std::sync::mpsc::Receiver<Result<Option<Vec<bytes::Bytes>>, Error>>,
    ended: bool,
    failure: Option<Error>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotStream {
    /// Why the stream failed, when it did.
    pub fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    fn fail(&mut self, e: Error) -> std::io::Error {
        let io = std::io::Error::other(e.to_string());
        self.failure = Some(e);
        io
    }
}

impl crate::pipe::Pieces for SnapshotStream {
    fn next_piece(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        if let Some(e) = &self.failure {
            return Err(std::io::Error::other(e.to_string()));
        }
        loop {
            if let Some(piece) = self.batch.find(|p| !p.is_empty()) {
                return Ok(Some(piece));
            }
            if self.ended {
                return Ok(None);
            }
            match self.rx.recv() {
                Ok(Ok(Some(batch))) => {
                    self.received += batch.iter().map(|p| p.len() as u64).sum::<u64>();
                    if self.received > self.size {
                        let e = Error::EtcdUnreachable {
                            endpoint: self.endpoint.clone(),
                            detail: format!(
                                "etcd sent more than the {} bytes it announced",
                                self.size
                            ),
                        };
                        return Err(self.fail(e));
                    }
                    self.batch = batch.into_iter();
                }
                Ok(Ok(None)) => {
                    self.ended = true;
                    if self.received != self.size {
                        let e = Error::EtcdUnreachable {
                            endpoint: self.endpoint.clone(),
                            detail: format!(
                                "the snapshot stream ended after {} of the {} bytes etcd \
                                 announced",
                                self.received, self.size
                            ),
                        };
                        return Err(self.fail(e));
                    }
                }
                Ok(Err(e)) => return Err(self.fail(e)),
                Err(_) => {
                    let e = Error::EtcdUnreachable {
                        endpoint: self.endpoint.clone(),
                        detail: "the snapshot receiver stopped".into(),
                    };
                    return Err(self.fail(e));
                }
            }
        }
    }
}

impl Drop for SnapshotStream {
    fn drop(&mut self) {
        // Closing the queue stops the receiver at its next message.
        let (_, rx) = std::sync::mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One change as etcd's watch stream gives it: a put or a delete of one key at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub delete: bool,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

/// What one message of the watch stream said.
#[derive(Debug)]
pub enum Watched {
    /// Changes, in revision order (etcd never splits one revision across messages unless
    /// asked to fragment, which this watch does not).
    Changes(Vec<Change>),
    /// Every change up to this revision has been delivered (an answer to `progress`).
    Progress(i64),
    /// The start revision was compacted away: etcd keeps nothing older than this.
    Compacted(i64),
}

/// A watch of every key from a revision, over a connection and runtime of its own, with
/// the lease calls the follower needs on the same connection.
pub struct Watch {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    requests: tokio::sync::mpsc::UnboundedSender<pb::WatchRequest>,
    stream: tonic::Streaming<pb::WatchResponse>,
    endpoint: String,
    pub cluster_id: u64,
}

impl Client {
    /// Watches every key from `from` (inclusive). Returns once etcd has created the watch.
    pub fn watch(&self, from: i64) -> Result<Watch, Error> {
        self.wait_listening()?;
        let ep = self.grpc_endpoint()?;
        let rt = Client::runtime()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<pb::WatchRequest>();
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: vec![0],
                    range_end: vec![0],
                    start_revision: from,
                    ..Default::default()
                },
            )),
        };
        let _ = tx.send(create);
        let opened = rt.block_on(async {
            let work = async {
                let channel = ep.connect().await?;
                let requests = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                });
                // etcd's own client takes messages of any size (MaxInt32): a catch-up batch
                // or one revision deleting a prefix of many keys exceeds tonic's 4 MiB.
                let stream = pb::watch_client::WatchClient::new(channel.clone())
                    .max_decoding_message_size(usize::MAX)
                    .watch(requests)
                    .await?
                    .into_inner();
                Ok::<_, CallError>((channel, stream))
            };
            match tokio::time::timeout(CALL_TIMEOUT, work).await {
                Ok(r) => r.map_err(|e| self.error("watch", &e)),
                Err(_) => Err(self.timed_out("watch", CALL_TIMEOUT)),
            }
        })?;
        let (channel, stream) = opened;
        let mut w = Watch {
            rt,
            channel,
            requests: tx,
            stream,
            endpoint: self.endpoint.clone(),
            cluster_id: 0,
        };
        // The first message says the watch exists, or why not.
        match w.message(CALL_TIMEOUT)? {
            Some(first) if first.created && !first.canceled => {
                w.cluster_id = first.header.map_or(0, |h| h.cluster_id);
                Ok(w)
            }
            Some(first) if first.compact_revision > 0 => {
                Err(Error::Compacted(first.compact_revision))
            }
            Some(first) => Err(w.fail(&format!(
                "etcd refused the watch: {}",
                if first.cancel_reason.is_empty() {
                    "no reason given".to_string()
                } else {
                    first.cancel_reason
                }
            ))),
            None => Err(w.fail("etcd did not answer the watch")),
        }
    }

    /// A connection of its own for many calls in a row (a replay).
    pub fn session(&self) -> Result<Session, Error> {
        self.wait_listening()?;
        let ep = self.grpc_endpoint()?;
        let rt = Client::runtime()?;
        let channel = rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, ep.connect()).await {
                Ok(r) => r.map_err(|e| self.error("connect", &CallError::Connect(e))),
                Err(_) => Err(self.timed_out("connect", CALL_TIMEOUT)),
            }
        })?;
        Ok(Session {
            rt,
            channel,
            client: self.clone(),
            keepalive: None,
        })
    }
}

impl Watch {
    fn fail(&self, detail: &str) -> Error {
        Error::EtcdUnreachable {
            endpoint: self.endpoint.clone(),
            detail: detail.to_string(),
        }
    }

    fn message(&mut self, wait: Duration) -> Result<Option<pb::WatchResponse>, Error> {
        let stream = &mut self.stream;
        let got = self
            .rt
            .block_on(async { tokio::time::timeout(wait, stream.message()).await });
        match got {
            Err(_) => Ok(None),
            Ok(Ok(Some(m))) => Ok(Some(m)),
            Ok(Ok(None)) => Err(self.fail("etcd ended the watch stream")),
            Ok(Err(s)) => Err(Error::Etcd {
                endpoint: self.endpoint.clone(),
                call: "the watch".into(),
                detail: format!("the watch stream broke ({:?}): {}", s.code(), s.message()),
            }),
        }
    }

    /// The next message, waiting at most `wait` (`None`: nothing came).
    pub fn next(&mut self, wait: Duration) -> Result<Option<Watched>, Error> {
        let Some(m) = self.message(wait)? else {
            return Ok(None);
        };
        let revision = m.header.as_ref().map_or(0, |h| h.revision);
        if m.compact_revision > 0 {
            return Ok(Some(Watched::Compacted(m.compact_revision)));
        }
        if m.canceled {
            return Err(self.fail(&format!("etcd cancelled the watch: {}", m.cancel_reason)));
        }
        if m.events.is_empty() {
            return Ok(Some(Watched::Progress(revision)));
        }
        let changes = m
            .events
            .into_iter()
            .map(|e| {
                let kv = e.kv.unwrap_or_default();
                Change {
                    delete: e.r#type == pb::event::EventType::Delete as i32,
                    key: kv.key,
                    value: kv.value,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                    lease: kv.lease,
                }
            })
            .collect();
        Ok(Some(Watched::Changes(changes)))
    }

    /// Asks etcd to say how far the watch has come (a `Progress` answer follows).
    pub fn progress(&mut self) {
        let _ = self.requests.send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                pb::WatchProgressRequest {},
            )),
        });
    }

    /// The cluster's current revision by a linearizable read (it goes through the leader, so
    /// a member cut off from the quorum cannot answer it): every change up to it has been
    /// acknowledged by the cluster, and the watch owes them.
    pub fn linearizable_revision(&mut self, wait: Duration) -> Result<i64, Error> {
        let channel = self.channel.clone();
        let r = self.rt.block_on(async {
            tokio::time::timeout(
                wait,
                KvClient::new(channel).range(pb::RangeRequest {
                    key: vec![0],
                    range_end: vec![0],
                    limit: 1,
                    count_only: true,
                    serializable: false,
                    ..Default::default()
                }),
            )
            .await
        });
        match r {
            Err(_) => Err(self.fail(&format!(
                "a linearizable read got no answer within {}s (is this member cut off from the \
                 quorum?)",
                wait.as_secs()
            ))),
            Ok(Err(s)) => Err(self.fail(&format!("a linearizable read failed: {}", s.message()))),
            Ok(Ok(r)) => Ok(r.into_inner().header.map_or(0, |h| h.revision)),
        }
    }

    /// The TTL a lease was granted with; `None` when it no longer exists.
    pub fn lease_ttl(&mut self, id: i64) -> Result<Option<i64>, Error> {
        let channel = self.channel.clone();
        let r = self.rt.block_on(async {
            tokio::time::timeout(
                CALL_TIMEOUT,
                LeaseClient::new(channel)
                    .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: false }),
            )
            .await
        });
        match r {
            Err(_) => Err(self.fail("lease time-to-live got no answer")),
            Ok(Err(s)) => Err(self.fail(&format!("lease time-to-live: {}", s.message()))),
            Ok(Ok(r)) => {
                let r = r.into_inner();
                Ok((r.ttl >= 0 && r.granted_ttl > 0).then_some(r.granted_ttl))
            }
        }
    }
}

/// A key at a revision: `Ok(Some((mod revision, value)))`, `Ok(None)` when it did not exist
/// then, `Err(why)` when etcd cannot say (compacted, or a future revision).
pub type KeyAt = Result<Option<(i64, Vec<u8>)>, String>;

/// A revision to apply: its changes, guarded by the one before it.
pub struct Step<'a> {
    pub changes: &'a [Change],
    pub after: Option<Guard>,
}

/// What holds once the revision before is applied, and never before it: a key it put has
/// that revision as its mod revision. ("A key it deleted is absent" is no guard: it also
/// holds before the key was created.)
#[derive(Debug, Clone)]
pub struct Guard {
    key: Vec<u8>,
    revision: i64,
}

impl Guard {
    /// The guard a revision's changes give the revision after it: `None` for a revision that
    /// only deletes (the one after it must wait until it is confirmed applied).
    pub fn after(revision: i64, changes: &[Change]) -> Option<Guard> {
        changes.iter().find(|c| !c.delete).map(|c| Guard {
            key: c.key.clone(),
            revision,
        })
    }

    fn compare(&self) -> pb::Compare {
        use pb::compare::{CompareResult, CompareTarget, TargetUnion};
        pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: self.key.clone(),
            target_union: Some(TargetUnion::ModRevision(self.revision)),
        }
    }
}

/// Many calls over one connection: the replay of a history into a throwaway etcd.
pub struct Session {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    client: Client,
    keepalive: Option<tokio::sync::mpsc::UnboundedSender<i64>>,
}

impl Session {
    fn unary<T, Fut>(&self, call: &str, fut: Fut) -> Result<T, Error>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, fut).await })
            .map_err(|_| self.client.timed_out(call, CALL_TIMEOUT))?
            .map(tonic::Response::into_inner)
            .map_err(|s| self.client.error(call, &CallError::Status(s)))
    }

    /// Applies revisions as txns sent together on this connection, each guarded so that it
    /// applies only after the one before it (see `Guard`). Returns, for each, the revision
    /// etcd gave it, or `None` when its guard did not hold (it was not applied: send it again
    /// once the one before it is).
    pub fn apply_window(&self, steps: &[Step<'_>]) -> Result<Vec<Option<i64>>, Error> {
        use pb::request_op::Request;
        let calls = steps.iter().map(|step| {
            let success = step
                .changes
                .iter()
                .map(|c| pb::RequestOp {
                    request: Some(if c.delete {
                        Request::RequestDeleteRange(pb::DeleteRangeRequest {
                            key: c.key.clone(),
                            range_end: Vec::new(),
                        })
                    } else {
                        Request::RequestPut(pb::PutRequest {
                            key: c.key.clone(),
                            value: c.value.clone(),
                            lease: c.lease,
                            ..Default::default()
                        })
                    }),
                })
                .collect();
            let compare = step
                .after
                .as_ref()
                .map(Guard::compare)
                .into_iter()
                .collect();
            let mut kv = KvClient::new(self.channel.clone());
            async move {
                kv.txn(pb::TxnRequest { compare, success }).await.map(|r| {
                    let r = r.into_inner();
                    r.succeeded.then(|| r.header.map_or(0, |h| h.revision))
                })
            }
        });
        self.together("txn", calls)
    }

    /// Runs `calls` together on this connection, all within one call's timeout; the first
    /// failure is the error.
    fn together<T, Fut>(
        &self,
        call: &str,
        calls: impl Iterator<Item = Fut>,
    ) -> Result<Vec<T>, Error>
    where
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let all = self
            .rt
            .block_on(async {
                tokio::time::timeout(CALL_TIMEOUT, futures::future::join_all(calls)).await
            })
            .map_err(|_| self.client.timed_out(call, CALL_TIMEOUT))?;
        all.into_iter()
            .map(|r| r.map_err(|s| self.client.error(call, &CallError::Status(s))))
            .collect()
    }

    /// Grants lease `id` with `ttl` seconds unless it exists, and keeps it alive from now on
    /// for as long as this session lasts.
    pub fn grant(&mut self, id: i64, ttl: i64) -> Result<(), Error> {
        let lease = LeaseClient::new(self.channel.clone());
        let r = self.unary("lease grant", async move {
            lease
                .clone()
                .lease_grant(pb::LeaseGrantRequest { ttl, id })
                .await
        });
        match r {
            Ok(_) => {}
            Err(Error::Etcd { detail, .. }) if detail.contains("already exists") => {}
            Err(e) => return Err(e),
        }
        self.keep_alive(id);
        Ok(())
    }

    /// The ids of every lease etcd holds.
    pub fn leases(&self) -> Result<Vec<i64>, Error> {
        let lease = LeaseClient::new(self.channel.clone());
        let r = self.unary("lease leases", async move {
            lease.clone().lease_leases(pb::LeaseLeasesRequest {}).await
        })?;
        Ok(r.leases.iter().map(|l| l.id).collect())
    }

    /// Keeps lease `id` alive every half second while this session's calls run, so that no
    /// lease expires (and deletes keys at a revision of its own) during a replay.
    pub fn keep_alive(&mut self, id: i64) {
        if self.keepalive.is_none() {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
            let channel = self.channel.clone();
            self.rt.spawn(async move {
                let mut ids: Vec<i64> = Vec::new();
                let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel();
                let requests = futures::stream::unfold(req_rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                });
                let Ok(answers) = LeaseClient::new(channel).lease_keep_alive(requests).await else {
                    return;
                };
                let mut answers = answers.into_inner();
                tokio::spawn(async move { while let Ok(Some(_)) = answers.message().await {} });
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    while let Ok(id) = rx.try_recv() {
                        ids.push(id);
                    }
                    if rx.is_closed() && rx.is_empty() {
                        return;
                    }
                    for &id in &ids {
                        if req_tx.send(pb::LeaseKeepAliveRequest { id }).is_err() {
                            return;
                        }
                    }
                }
            });
            self.keepalive = Some(tx);
        }
        if let Some(tx) = &self.keepalive {
            let _ = tx.send(id);
        }
    }
}

/// What `snapshot status` reads from a db file.
#[derive(Debug, Clone, Copy)]
pub struct DbStatus {
    pub revision: i64,
}

/// The offline tool: etcdutl, or etcdctl on 3.4.
#[derive(Debug, Clone)]
pub struct OfflineTool {
    pub bin: PathBuf,
    pub name: &'static str,
    pub version: Version,
    /// `--bump-revision` and `--mark-compacted` are both available.
    pub supports_bump: bool,
}

impl OfflineTool {
    /// Picks etcdutl when present, else etcdctl, and reads its version and restore flags.
    pub fn detect(settings: &Settings) -> Result<OfflineTool, Error> {
        let (bin, name) = match settings.etcdutl()? {
            Some(bin) => (bin, "etcdutl"),
            None => (settings.etcdctl()?, "etcdctl"),
        };
        let out = run_checked(etcd_tool(&bin).arg("version"))?;
        let version = out
            .stdout
            .lines()
            .find_map(|l| {
                l.split_once("version:")
                    .and_then(|(_, v)| Version::parse(v))
            })
            .ok_or_else(|| Error::BadOutput {
                command: format!("{name} version"),
                problem: format!("no version in `{}`", out.stdout.trim()),
            })?;
        if name == "etcdctl" && version >= Version(3, 6, 0) {
            return Err(Error::ToolMissing {
                tool: "etcdutl".into(),
                hint: format!(
                    "etcdctl {version} cannot restore snapshots (removed in 3.6); install etcdutl \
                     or set ETCD_ACTIONS_ETCDUTL"
                ),
            });
        }
        let help = run_checked(etcd_tool(&bin).args(["snapshot", "restore", "--help"]))?;
        let text = format!("{}{}", help.stdout, help.stderr);
        let supports_bump = text.contains("--bump-revision") && text.contains("--mark-compacted");
        Ok(OfflineTool {
            bin,
            name,
            version,
            supports_bump,
        })
    }

    /// The etcd server that goes with this tool: ETCD_ACTIONS_ETCD, else the `etcd` beside
    /// it (as a unit's bin dir holds them), else `etcd` on PATH.
    pub fn server_binary(&self) -> Result<PathBuf, Error> {
        if let Some(p) = std::env::var_os("ETCD_ACTIONS_ETCD").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        if let Some(beside) = self.bin.parent().map(|d| d.join("etcd")) {
            if beside.is_file() {
                return Ok(beside);
            }
        }
        which::which("etcd").map_err(|_| Error::ToolMissing {
            tool: "etcd".into(),
            hint: "set ETCD_ACTIONS_ETCD to the etcd server binary".into(),
        })
    }

    pub fn db_status(&self, db: &Path) -> Result<DbStatus, Error> {
        #[derive(Deserialize)]
        struct Raw {
            revision: i64,
        }
        let mut cmd = etcd_tool(&self.bin);
        cmd.args(["snapshot", "status", "-w", "json"]).arg(db);
        let out = run_checked(&mut cmd)?;
        let raw: Raw = serde_json::from_str(out.stdout.trim()).map_err(|e| Error::BadOutput {
            command: display(&cmd),
            problem: e.to_string(),
        })?;
        Ok(DbStatus {
            revision: raw.revision,
        })
    }

    /// Restores `db` into `data_dir` (which must not exist) as a new one-member cluster.
    pub fn restore(&self, req: &RestoreRequest<'_>) -> Result<(), Error> {
        let mut cmd = etcd_tool(&self.bin);
        let peers = req.peer_urls.join(",");
        let initial: Vec<String> = req
            .peer_urls
            .iter()
            .map(|u| format!("{}={u}", req.name))
            .collect();
        cmd.args(["snapshot", "restore"])
            .arg(req.db)
            .arg(format!("--data-dir={}", req.data_dir.display()))
            .arg(format!("--name={}", req.name))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-token={}", req.token))
            .arg(format!("--initial-advertise-peer-urls={peers}"));
        // The db's trailer, when it has one, was checked by us on these very bytes as they
        // were unpacked (a db without one has nothing to check).
        cmd.arg("--skip-hash-check");
        if req.bump > 0 {
            cmd.arg(format!("--bump-revision={}", req.bump))
                .arg("--mark-compacted");
        }
        run_checked(&mut cmd).map(drop)
    }
}

/// A free loopback port (the kernel's choice), for a throwaway etcd.
fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ctx(|| "cannot find a free loopback port".to_string())
}

/// The command line of a throwaway etcd (a drill, a replay): member `name` serving
/// `data_dir` alone on free loopback ports.
pub struct Throwaway {
    pub client_url: String,
    pub peer_url: String,
    /// `--data-dir=…`: also the marker that finds the process again.
    pub data_arg: String,
    pub args: Vec<String>,
}

impl Throwaway {
    pub fn new(name: &str, data_dir: &Path) -> Result<Throwaway, Error> {
        let client_url = format!("http://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let data_arg = format!("--data-dir={}", data_dir.display());
        let args = vec![
            format!("--name={name}"),
            data_arg.clone(),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={name}={peer_url}"),
            "--log-level=error".to_string(),
        ];
        Ok(Throwaway {
            client_url,
            peer_url,
            data_arg,
            args,
        })
    }
}

/// A fresh `--initial-cluster-token`: a restored cluster never shares one with another.
pub fn random_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    let salt = u64::from(std::process::id()) ^ crate::manifest::now_secs();
    format!("etcd-actions-{}-{salt:x}", hex::encode(bytes))
}

pub struct RestoreRequest<'a> {
    pub db: &'a Path,
    pub data_dir: &'a Path,
    pub name: &'a str,
    pub peer_urls: &'a [String],
    pub token: &'a str,
    pub bump: u64,
}

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
