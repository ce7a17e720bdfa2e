//! The keys under a prefix at one revision, as a backup keeps them: a snapshot's db read
//! offline with our own bbolt reader (the newest version of each key, tombstones applied), and
//! the change history applied on top for a point in time. No etcd runs. Memory grows with the
//! number of keys under the prefix, never with the db or the values: the walk holds one page
//! at a time and copies no value; each key keeps the revision that wrote it, and its value is
//! read from the db (a descent of the b+tree) only when it is written out.
//!
//! etcd's `key` bucket maps a revision (`main` u64 big-endian, `_`, `sub` u64 big-endian, and a
//! trailing `t` for a deletion) to an `mvccpb.KeyValue`, so a walk in bucket order is a walk
//! in revision order.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;

use crate::bbolt::{Bolt, Root};
use crate::etcd::pb;
use crate::etcd::Change;
use crate::revision::{is_revision_key, main_revision};

/// One key as an export holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kv<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

/// Where a key's value is: still in the db, under the revision that wrote it (read when the
/// key is written out, so that memory holds no value of the db), or held (from the history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    InDb(Vec<u8>),
    Held(Vec<u8>),
}

/// A key's value and revisions, kept under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Val {
    pub value: Value,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl<'a> Kv<'a> {
    pub fn of(kv: &'a pb::KeyValue) -> Kv<'a> {
        Kv {
            key: &kv.key,
            value: &kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// The keys under a prefix, in key order, with the db their values are read from.
pub struct KeySet {
    db: Option<(Bolt, Root)>,
    keys: BTreeMap<Vec<u8>, Val>,
}

/// What a `KeyValue` record says besides its value.
struct Record<'a> {
    key: &'a [u8],
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

fn varint(msg: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *msg.get(*i)?;
        *i += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Reads an encoded `mvccpb.KeyValue` without copying its value (protobuf's wire format:
/// varints and length-delimited fields; unknown fields are skipped).
fn record(msg: &[u8]) -> Option<Record<'_>> {
    let mut r = Record {
        key: &[],
        create_revision: 0,
        mod_revision: 0,
        version: 0,
        lease: 0,
    };
    let mut i = 0;
    while i < msg.len() {
        let tag = varint(msg, &mut i)?;
        match tag & 7 {
            0 => {
                let v = varint(msg, &mut i)? as i64;
                match tag >> 3 {
                    2 => r.create_revision = v,
                    3 => r.mod_revision = v,
                    4 => r.version = v,
                    6 => r.lease = v,
                    _ => {}
                }
            }
            2 => {
                let len = usize::try_from(varint(msg, &mut i)?).ok()?;
                let field = msg.get(i..i.checked_add(len)?)?;
                i += len;
                if tag >> 3 == 1 {
                    r.key = field;
                }
            }
            1 => i += 8,
            5 => i += 4,
            _ => return None,
        }
    }
    (i == msg.len()).then_some(r)
}

impl KeySet {
    /// The keys under `prefix` of the etcd db at `db`, and how many entries (revisions) the
    /// walk read. The values stay in the db until `each` reads them.
    pub fn from_db(db: &Path, prefix: &[u8]) -> Result<(KeySet, u64), String> {
        let file = std::fs::File::open(db).map_err(|e| format!("cannot open the db: {e}"))?;
        let bolt = Bolt::open(file)?;
        let root = bolt
            .bucket_root(b"key")?
            .ok_or("the db has no `key` bucket: it is not an etcd v3 db")?;
        let mut keys = BTreeMap::new();
        let mut entries = 0u64;
        bolt.for_each(b"key", &mut |rev, msg| {
            entries += 1;
            if !is_revision_key(rev) {
                return Err(format!(
                    "the key bucket holds `{}`, which is not a revision",
                    hex::encode(&rev[..rev.len().min(32)])
                ));
            }
            let r = record(msg).ok_or_else(|| {
                format!(
                    "a key's record at revision {} is damaged",
                    main_revision(rev)
                )
            })?;
            if !r.key.starts_with(prefix) {
                return Ok(());
            }
            if rev.len() == 18 && rev[17] == b't' {
                keys.remove(r.key);
            } else {
                keys.insert(
                    r.key.to_vec(),
                    Val {
                        value: Value::InDb(rev.to_vec()),
                        create_revision: r.create_revision,
                        mod_revision: r.mod_revision,
                        version: r.version,
                        lease: r.lease,
                    },
                );
            }
            Ok(())
        })?;
        Ok((
            KeySet {
                db: Some((bolt, root)),
                keys,
            },
            entries,
        ))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Applies one change of the history to the keys under `prefix`.
    pub fn apply(&mut self, prefix: &[u8], c: Change) {
        if !c.key.starts_with(prefix) {
            return;
        }
        if c.delete {
            self.keys.remove(&c.key);
        } else {
            self.keys.insert(
                c.key,
                Val {
                    value: Value::Held(c.value),
                    create_revision: c.create_revision,
                    mod_revision: c.mod_revision,
                    version: c.version,
                    lease: c.lease,
                },
            );
        }
    }

    /// Calls `f` with every key under `prefix`, in key order, its value read from the db
    /// where it still is.
    pub fn each(
        &self,
        prefix: &[u8],
        f: &mut dyn FnMut(Kv<'_>) -> Result<(), crate::error::Error>,
    ) -> Result<(), crate::error::Error> {
        let reread = |e: String| {
            crate::error::Error::Internal(format!("the db walked a moment ago cannot be read: {e}"))
        };
        for (k, v) in self.keys.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            let read;
            let value: &[u8] = match (&v.value, &self.db) {
                (Value::Held(bytes), _) => bytes,
                (Value::InDb(rev), Some((bolt, root))) => {
                    let msg = bolt.get(root, rev).map_err(reread)?.ok_or_else(|| {
                        reread(format!("revision {} is gone", main_revision(rev)))
                    })?;
                    read = pb::KeyValue::decode(msg.as_slice())
                        .map_err(|e| reread(e.to_string()))?
                        .value;
                    &read
                }
                (Value::InDb(_), None) => return Err(reread("no db".into())),
            };
            f(Kv {
                key: k,
                value,
                create_revision: v.create_revision,
                mod_revision: v.mod_revision,
                version: v.version,
                lease: v.lease,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_record_without_its_value() {
        let kv = pb::KeyValue {
            key: b"/registry/a".to_vec(),
            value: vec![7; 300],
            create_revision: 4,
            mod_revision: 9,
            version: 3,
            lease: 1 << 40,
        };
        let msg = kv.encode_to_vec();
        let r = record(&msg).unwrap();
        assert_eq!(r.key, b"/registry/a");
        assert_eq!(
            (r.create_revision, r.mod_revision, r.version, r.lease),
            (4, 9, 3, 1 << 40)
        );
        assert!(record(&msg[..msg.len() - 1]).is_none(), "a cut record");
        assert!(record(&[0x0a, 0x05, b'a']).is_none());
    }

    #[test]
    fn history_changes_apply_under_the_prefix_only() {
        let mut set = KeySet {
            db: None,
            keys: BTreeMap::new(),
        };
        let put = |k: &str, m: i64| Change {
            delete: false,
            key: k.as_bytes().to_vec(),
            value: b"v".to_vec(),
            create_revision: 2,
            mod_revision: m,
            version: 1,
            lease: 0,
        };
        set.apply(b"/a/", put("/a/1", 3));
        set.apply(b"/a/", put("/b/1", 4));
        assert_eq!(set.len(), 1);
        let mut seen = Vec::new();
        set.each(b"/a/", &mut |kv| {
            seen.push((kv.key.to_vec(), kv.value.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(b"/a/1".to_vec(), b"v".to_vec())]);
        set.apply(
            b"/a/",
            Change {
                delete: true,
                ..put("/a/1", 5)
            },
        );
        assert!(set.is_empty());
    }
}
