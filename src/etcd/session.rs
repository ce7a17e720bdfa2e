//! Many calls over one connection: the replay of a history, an import.

use super::*;

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

    pub(super) fn compare(&self) -> pb::Compare {
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
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) channel: Channel,
    pub(super) client: Client,
    pub(super) keepalive: Option<tokio::sync::mpsc::UnboundedSender<i64>>,
}

impl Session {
    pub(super) fn unary<T, Fut>(&self, call: &str, fut: Fut) -> Result<T, Error>
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
    pub(super) fn together<T, Fut>(
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
