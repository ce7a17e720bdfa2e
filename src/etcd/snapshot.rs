//! etcd's snapshot stream, received on a thread of its own through a large read buffer.

use super::*;

impl Client {
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
    pub(super) fn receive(
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

    pub(super) fn fail(&mut self, e: Error) -> std::io::Error {
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
