//! The watch of every key from a revision, for `follow`.

use super::*;

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
}

impl Watch {
    pub(super) fn fail(&self, detail: &str) -> Error {
        Error::EtcdUnreachable {
            endpoint: self.endpoint.clone(),
            detail: detail.to_string(),
        }
    }

    pub(super) fn message(&mut self, wait: Duration) -> Result<Option<pb::WatchResponse>, Error> {
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
