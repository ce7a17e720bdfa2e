//! The keys under a prefix at one revision, as a backup keeps them: a snapshot's db read
//! offline with our own bbolt reader (the newest version of each key, tombstones applied), and
//! the change history applied on top for a point in time. No etcd runs. Memory grows with the
//! keys under the prefix, never with the db: the walk holds one page at a time, and a key
//! outside the prefix is skipped from its first bytes.
//!
//! etcd's `key` bucket maps a revision (`main` u64 big-endian, `_`, `sub` u64 big-endian, and a
//! trailing `t` for a deletion) to an `mvccpb.KeyValue`, so a walk in bucket order is a walk
//! in revision order.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;

use crate::etcd::pb;
use crate::etcd::Change;

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

/// A key's value and revisions, kept under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Val {
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl Val {
    pub fn kv<'a>(&'a self, key: &'a [u8]) -> Kv<'a> {
        Kv {
            key,
            value: &self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
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

/// The keys under a prefix, in key order.
pub type Keys = BTreeMap<Vec<u8>, Val>;

/// The key of an encoded `KeyValue` without decoding the rest: etcd writes field 1 (the key)
/// first. `None` when it does not start so (then the whole message is decoded).
fn peek_key(msg: &[u8]) -> Option<&[u8]> {
    if msg.first() != Some(&0x0a) {
        return None;
    }
    let (mut len, mut shift, mut i) = (0usize, 0u32, 1usize);
    loop {
        let b = *msg.get(i)?;
        len |= usize::from(b & 0x7f).checked_shl(shift)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 35 {
            return None;
        }
    }
    msg.get(i..i.checked_add(len)?)
}

/// The keys under `prefix` of the etcd db at `db`, and how many entries (revisions) the walk
/// read.
pub fn from_db(db: &Path, prefix: &[u8]) -> Result<(Keys, u64), String> {
    let file = std::fs::File::open(db).map_err(|e| format!("cannot open the db: {e}"))?;
    let bolt = crate::bbolt::Bolt::open(file)?;
    let mut keys = Keys::new();
    let mut entries = 0u64;
    let found = bolt.for_each(b"key", &mut |rev, msg| {
        entries += 1;
        if rev.len() < 17 || rev[8] != b'_' {
            return Err(format!(
                "the key bucket holds `{}`, which is not a revision",
                hex::encode(&rev[..rev.len().min(32)])
            ));
        }
        let tombstone = rev.len() == 18 && rev[17] == b't';
        if peek_key(msg).is_some_and(|k| !k.starts_with(prefix)) {
            return Ok(());
        }
        let kv = pb::KeyValue::decode(msg)
            .map_err(|e| format!("a key's record at revision {} is damaged: {e}", main(rev)))?;
        if !kv.key.starts_with(prefix) {
            return Ok(());
        }
        if tombstone {
            keys.remove(&kv.key);
        } else {
            keys.insert(
                kv.key,
                Val {
                    value: kv.value,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                    lease: kv.lease,
                },
            );
        }
        Ok(())
    })?;
    if !found {
        return Err("the db has no `key` bucket: it is not an etcd v3 db".into());
    }
    Ok((keys, entries))
}

fn main(rev: &[u8]) -> i64 {
    rev.get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i64::from_be_bytes)
}

/// Applies one change of the history to the keys under `prefix`.
pub fn apply(keys: &mut Keys, prefix: &[u8], c: Change) {
    if !c.key.starts_with(prefix) {
        return;
    }
    if c.delete {
        keys.remove(&c.key);
    } else {
        keys.insert(
            c.key,
            Val {
                value: c.value,
                create_revision: c.create_revision,
                mod_revision: c.mod_revision,
                version: c.version,
                lease: c.lease,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeks_the_key_only_when_it_comes_first() {
        let kv = pb::KeyValue {
            key: b"/registry/a".to_vec(),
            value: vec![7; 300],
            mod_revision: 9,
            ..Default::default()
        };
        let msg = kv.encode_to_vec();
        assert_eq!(peek_key(&msg), Some(&b"/registry/a"[..]));
        assert_eq!(peek_key(&msg[..3]), None);
        assert_eq!(peek_key(&[0x10, 0x01]), None);
        let long = pb::KeyValue {
            key: vec![b'k'; 200],
            ..Default::default()
        };
        assert_eq!(peek_key(&long.encode_to_vec()), Some(&[b'k'; 200][..]));
    }

    #[test]
    fn history_changes_apply_under_the_prefix_only() {
        let mut keys = Keys::new();
        let put = |k: &str, m: i64| Change {
            delete: false,
            key: k.as_bytes().to_vec(),
            value: b"v".to_vec(),
            create_revision: 2,
            mod_revision: m,
            version: 1,
            lease: 0,
        };
        apply(&mut keys, b"/a/", put("/a/1", 3));
        apply(&mut keys, b"/a/", put("/b/1", 4));
        assert_eq!(keys.len(), 1);
        apply(
            &mut keys,
            b"/a/",
            Change {
                delete: true,
                ..put("/a/1", 5)
            },
        );
        assert!(keys.is_empty());
    }
}
