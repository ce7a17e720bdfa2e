//! The key-value calls of a prefix export and import, over one `Session`: pages of a range
//! at one revision, guarded txns sent together, and the cluster's health as its status says.

use super::pb;
use super::Session;
use crate::error::Error;
use pb::kv_client::KvClient;
use pb::maintenance_client::MaintenanceClient;

/// One page of a range: keys in order, and whether more follow.
pub struct Page {
    pub kvs: Vec<pb::KeyValue>,
    pub more: bool,
    /// The revision the page was read at (the cluster's, for a range at revision 0).
    pub revision: i64,
}

/// One write of an import: a put or a delete of one key, applied only while the key's mod
/// revision is still `guard` (0: the key is absent).
#[derive(Debug, Clone)]
pub struct Guarded {
    pub key: Vec<u8>,
    /// `None`: delete the key.
    pub value: Option<Vec<u8>>,
    pub guard: i64,
}

/// What the status of this member says of the cluster's health.
pub struct Health {
    pub leader: u64,
    /// The member's errors: its alarms (NOSPACE, CORRUPT) among them.
    pub errors: Vec<String>,
    pub revision: i64,
    pub cluster_id: u64,
}

/// The end of etcd's range over every key starting with `prefix` (etcdctl's `--prefix`):
/// the prefix with its last byte below 0xff raised by one; every key for an empty prefix or
/// one of 0xff bytes only.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Session {
    /// The keys in `[from, end)` at `revision` (0: now), at most `limit` of them.
    pub fn range_page(
        &self,
        from: &[u8],
        end: &[u8],
        revision: i64,
        limit: i64,
    ) -> Result<Page, Error> {
        let mut kv = KvClient::new(self.channel.clone());
        let req = pb::RangeRequest {
            key: from.to_vec(),
            range_end: end.to_vec(),
            limit,
            revision,
            ..Default::default()
        };
        let r = self.unary("range", async move { kv.range(req).await })?;
        Ok(Page {
            kvs: r.kvs,
            more: r.more,
            revision: r.header.map_or(0, |h| h.revision),
        })
    }

    /// How many keys `[from, end)` held at `revision`.
    pub fn count(&self, from: &[u8], end: &[u8], revision: i64) -> Result<u64, Error> {
        let mut kv = KvClient::new(self.channel.clone());
        let req = pb::RangeRequest {
            key: from.to_vec(),
            range_end: end.to_vec(),
            revision,
            count_only: true,
            ..Default::default()
        };
        let r = self.unary("range count", async move { kv.range(req).await })?;
        Ok(u64::try_from(r.count).unwrap_or(0))
    }

    /// This member's view of the cluster: its leader, its errors and alarms, its revision.
    pub fn health(&self) -> Result<Health, Error> {
        let mut m = MaintenanceClient::new(self.channel.clone());
        let r = self.unary(
            "status",
            async move { m.status(pb::StatusRequest {}).await },
        )?;
        let header = r.header.unwrap_or_default();
        Ok(Health {
            leader: r.leader,
            errors: r.errors,
            revision: header.revision,
            cluster_id: header.cluster_id,
        })
    }

    /// Sends every batch as one txn, all together on this connection: each applies whole only
    /// while every guard of it holds. Returns, per batch, whether it was applied.
    pub fn guarded_txns(&self, batches: &[&[Guarded]]) -> Result<Vec<bool>, Error> {
        use pb::compare::{CompareResult, CompareTarget, TargetUnion};
        use pb::request_op::Request;
        let calls = batches.iter().map(|batch| {
            let compare = batch
                .iter()
                .map(|g| pb::Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Mod as i32,
                    key: g.key.clone(),
                    target_union: Some(TargetUnion::ModRevision(g.guard)),
                })
                .collect();
            let success = batch
                .iter()
                .map(|g| pb::RequestOp {
                    request: Some(match &g.value {
                        Some(v) => Request::RequestPut(pb::PutRequest {
                            key: g.key.clone(),
                            value: v.clone(),
                            ..Default::default()
                        }),
                        None => Request::RequestDeleteRange(pb::DeleteRangeRequest {
                            key: g.key.clone(),
                            range_end: Vec::new(),
                        }),
                    }),
                })
                .collect();
            let mut kv = KvClient::new(self.channel.clone());
            async move {
                kv.txn(pb::TxnRequest { compare, success })
                    .await
                    .map(|r| r.into_inner().succeeded)
            }
        });
        self.together("txn", calls)
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
