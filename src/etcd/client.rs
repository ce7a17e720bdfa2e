//! The client and its one-shot calls: status, members, marks, a key or a count at a revision.

use super::*;

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
    pub(super) fn wait_listening(&self) -> Result<(), Error> {
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
    pub(super) fn grpc_endpoint(&self) -> Result<Endpoint, Error> {
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

    pub(super) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(|| "cannot start the etcd client's runtime".to_string())
    }

    /// Turns a client error into ours, naming the endpoint and the call.
    pub(super) fn error(&self, call: &str, e: &CallError) -> Error {
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

    pub(super) fn timed_out(&self, call: &str, after: Duration) -> Error {
        Error::EtcdUnreachable {
            endpoint: self.endpoint.clone(),
            detail: format!("{call} got no answer within {}s", after.as_secs()),
        }
    }

    /// Runs one call on a runtime of its own, over a connection of its own.
    pub(super) fn call<T, F, Fut>(&self, call: &str, f: F) -> Result<T, Error>
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
}

/// A key at a revision: `Ok(Some((mod revision, value)))`, `Ok(None)` when it did not exist
/// then, `Err(why)` when etcd cannot say (compacted, or a future revision).
pub type KeyAt = Result<Option<(i64, Vec<u8>)>, String>;

/// `host:port` of a client URL (port 2379 when it has none).
pub(super) fn host_port(endpoint: &str) -> String {
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
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
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

impl Client {
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
