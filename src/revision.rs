//! The snapshot's revision, read from the bbolt pages as etcd streams them: no db file, one
//! forward pass, memory bounded by the number of branch pages.
//!
//! The revision is the main revision of the largest key of the `key` bucket, as
//! `etcdutl snapshot status` reports it. bbolt's `tx.WriteTo` sends both meta pages (from the
//! snapshot's transaction), then every page from 2 to the high-water mark in id order, freed
//! pages included. A child page may come before its parent, so what the final lookup may need
//! is remembered as it goes by:
//! - every branch page's last child, and its child covering the name `key` (for the root
//!   bucket);
//! - the `key` bucket's entry of every leaf that holds one (its root page, or its inline page's
//!   last key);
//! - the last key of every leaf whose last key looks like a revision and is at least the
//!   revision etcd reported before the stream started (the snapshot's cannot be lower), or
//!   whose id a branch seen earlier names as its last child; and, as a safety net, the leaves
//!   with the largest last keys below that bound.
//!
//! At the end the tree is followed from the meta page's root: root bucket → `key` bucket →
//! last children → last key. A page is only taken as a page when its header carries its own id
//! (freed pages keep theirs; the middle of a large value does not), so a stale overflow count
//! never hides a live page. If anything the lookup needs was not seen, the answer is "unknown",
//! never a guess.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use crate::bbolt::{fnv64a, le_u16, le_u32, le_u64, BRANCH, BUCKET_LEAF, HEADER, LEAF, MAGIC};

/// Leaves below the bound kept as a safety net (tombstones removed by a compaction can leave
/// the largest key below the revision etcd reports).
const SPARE_LEAVES: usize = 256;
/// Pages read at once at most (one real page, and look-alikes inside its values).
const MAX_ACTIVE: usize = 64;
/// Bytes captured from one page at most (keys and a small inline bucket).
const MAX_CAPTURE: usize = 1 << 20;

/// A key of the `key` bucket: 8-byte big-endian main revision, `_`, 8-byte sub revision, and
/// an optional `t` (tombstone).
pub(crate) fn is_revision_key(k: &[u8]) -> bool {
    (k.len() == 17 || k.len() == 18) && k[8] == b'_'
}

pub(crate) fn main_revision(k: &[u8]) -> i64 {
    i64::from_be_bytes(k[..8].try_into().expect("8 bytes"))
}

/// Where the `key` bucket's tree is, as a leaf of the root bucket records it.
#[derive(Debug, Clone)]
enum KeyBucket {
    Page(u64),
    /// Inline: the last key of its page (`None` when it is empty).
    Inline(Option<Vec<u8>>),
}

/// What `finish_detailed` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub revision: i64,
    /// The `key` bucket was inline in the root bucket's leaf.
    pub inline: bool,
    /// Branch levels above the `key` bucket's last leaf.
    pub depth: usize,
}

/// A byte range of the current page to keep.
struct Want {
    start: usize,
    bytes: Vec<u8>,
    len: usize,
}

/// The page being read.
struct Page {
    id: u64,
    flags: u16,
    count: usize,
    span: usize,
    /// Bytes of this page seen so far.
    seen: usize,
    /// The header and element table (`HEADER + count * 16` bytes).
    table: Vec<u8>,
    /// Ranges to capture, known once the table is complete; `None` until then.
    wants: Option<Vec<Want>>,
    /// Set when the page asks for more than `MAX_CAPTURE`: it is then ignored.
    too_large: bool,
}

/// Feed it the snapshot stream's bytes in order with `update`; `finish` gives the revision.
pub struct RevisionFinder {
    /// Leaves whose last key is at least this are remembered.
    bound: Vec<u8>,
    pos: u64,
    page_size: usize,
    /// From the first meta page: the root bucket's page and the high-water mark.
    root: u64,
    hwm: u64,
    meta: Vec<u8>,
    active: Vec<Page>,
    /// The next page boundary's header, when it straddles two reads.
    head: Vec<u8>,
    branches: HashMap<u64, (u64, u64)>,
    last_children: HashSet<u64>,
    leaves: HashMap<u64, Vec<u8>>,
    spare: BinaryHeap<Reverse<(Vec<u8>, u64)>>,
    key_buckets: HashMap<u64, KeyBucket>,
    problem: Option<String>,
}

impl RevisionFinder {
    /// `at_least`: the revision etcd reported just before the stream started (0 when unknown:
    /// then every leaf's last key is remembered).
    pub fn new(at_least: i64) -> RevisionFinder {
        RevisionFinder {
            bound: at_least.max(0).to_be_bytes().to_vec(),
            pos: 0,
            page_size: 0,
            root: 0,
            hwm: 0,
            meta: Vec::new(),
            active: Vec::new(),
            head: Vec::new(),
            branches: HashMap::new(),
            last_children: HashSet::new(),
            leaves: HashMap::new(),
            spare: BinaryHeap::new(),
            key_buckets: HashMap::new(),
            problem: None,
        }
    }

    fn fail(&mut self, why: String) {
        if self.problem.is_none() {
            self.problem = Some(why);
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.problem.is_none() {
            if self.page_size == 0 {
                // The first meta page: page size, root bucket and high-water mark.
                let need = HEADER + 64 - self.meta.len();
                let n = need.min(data.len());
                self.meta.extend_from_slice(&data[..n]);
                if self.meta.len() == HEADER + 64 {
                    self.read_meta();
                }
                self.pos += n as u64;
                data = &data[n..];
                continue;
            }
            let ps = self.page_size as u64;
            let end = self.hwm * ps;
            if self.pos >= end {
                // etcd's sha256 trailer.
                self.pos += data.len() as u64;
                return;
            }
            // Up to the next page boundary (or the end of the pages).
            let next = ((self.pos / ps) + 1) * ps;
            let take = (next.min(end) - self.pos).min(data.len() as u64) as usize;
            let (chunk, rest) = data.split_at(take);
            let in_page = (self.pos % ps) as usize;
            if self.pos / ps >= 2 && in_page < HEADER {
                let n = (HEADER - in_page).min(chunk.len());
                self.head.extend_from_slice(&chunk[..n]);
                if self.head.len() == HEADER {
                    let head = std::mem::take(&mut self.head);
                    self.start_page(self.pos / ps, &head);
                }
            }
            self.feed_active(chunk);
            self.pos += take as u64;
            data = rest;
        }
    }

    fn read_meta(&mut self) {
        let m = &self.meta[HEADER..];
        let valid = le_u32(m, 0) == Some(MAGIC)
            && le_u32(m, 4) == Some(2)
            && le_u64(m, 56) == Some(fnv64a(&m[..56]));
        let page_size = le_u32(m, 8).unwrap_or(0) as usize;
        if !valid || !(512..=65536).contains(&page_size) {
            self.fail("the stream does not start with a valid bbolt meta page".into());
            return;
        }
        self.page_size = page_size;
        self.root = le_u64(m, 16).unwrap_or(0);
        self.hwm = le_u64(m, 40).unwrap_or(0);
    }

    /// A page boundary: a page starts here when its header carries this id.
    fn start_page(&mut self, pgid: u64, head: &[u8]) {
        let id = le_u64(head, 0).unwrap_or(u64::MAX);
        let flags = le_u16(head, 8).unwrap_or(0);
        if id != pgid || (flags != BRANCH && flags != LEAF) {
            return;
        }
        let count = usize::from(le_u16(head, 10).unwrap_or(0));
        let overflow = u64::from(le_u32(head, 12).unwrap_or(0));
        // Pages never run past the high-water mark.
        let pages = (overflow + 1).min(self.hwm.saturating_sub(pgid)).max(1);
        let span = pages as usize * self.page_size;
        let table_len = HEADER + count * 16;
        if table_len > span {
            return;
        }
        // Only one real page is ever being read; the others are look-alikes inside a large
        // value. Too many of them at once would make the walk quadratic: give up instead.
        if self.active.len() >= MAX_ACTIVE {
            self.fail("too many page look-alikes inside values".into());
            return;
        }
        let mut table = Vec::with_capacity(table_len);
        table.extend_from_slice(head);
        // `seen` is where in the page the chunk being fed starts; `feed_active` skips the
        // header bytes, which are already in `table`.
        self.active.push(Page {
            id,
            flags,
            count,
            span,
            seen: (self.pos % self.page_size as u64) as usize,
            table,
            wants: None,
            too_large: false,
        });
    }

    fn feed_active(&mut self, chunk: &[u8]) {
        let mut done = Vec::new();
        for (i, page) in self.active.iter_mut().enumerate() {
            let mut data = chunk;
            // The page's own first bytes (its header) are already in `table`.
            while !data.is_empty() {
                let at = page.seen;
                if at >= page.span {
                    break;
                }
                let n = (page.span - at).min(data.len());
                let piece = &data[..n];
                let table_len = HEADER + page.count * 16;
                if at < table_len {
                    let from = at.max(HEADER);
                    if from < table_len && from < at + n {
                        let upto = table_len.min(at + n);
                        page.table.extend_from_slice(&piece[from - at..upto - at]);
                    }
                    if page.table.len() == table_len && page.wants.is_none() {
                        page.wants = Some(plan(page));
                        let total: usize = page
                            .wants
                            .as_ref()
                            .map_or(0, |w| w.iter().map(|w| w.len).sum());
                        page.too_large = total > MAX_CAPTURE;
                    }
                }
                if let (Some(wants), false) = (page.wants.as_mut(), page.too_large) {
                    for w in wants.iter_mut() {
                        let (ws, we) = (w.start, w.start + w.len);
                        let (ps, pe) = (at, at + n);
                        if ws < pe && ps < we && w.bytes.len() < w.len {
                            let s = ws.max(ps);
                            let e = we.min(pe);
                            // Bytes arrive in order, so what is missing starts at `s`.
                            if ws + w.bytes.len() == s {
                                w.bytes.extend_from_slice(&piece[s - at..e - at]);
                            }
                        }
                    }
                }
                page.seen += n;
                data = &data[n..];
            }
            if page.seen >= page.span {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            let page = self.active.remove(i);
            self.finish_page(page);
        }
    }

    fn finish_page(&mut self, page: Page) {
        if page.too_large {
            return;
        }
        let Some(wants) = page.wants else {
            return;
        };
        let t = &page.table;
        let get = |start: usize| -> Option<&[u8]> {
            wants
                .iter()
                .find(|w| w.start == start && w.bytes.len() == w.len)
                .map(|w| w.bytes.as_slice())
        };
        if page.count == 0 {
            if page.flags == LEAF {
                self.leaves.insert(page.id, Vec::new());
            }
            return;
        }
        if page.flags == BRANCH {
            let child = |i: usize| le_u64(t, HEADER + i * 16 + 8).unwrap_or(0);
            let last = child(page.count - 1);
            // The child covering the name `key`: the last one whose first key is <= "key".
            let mut named = child(0);
            for i in 0..page.count {
                let e = HEADER + i * 16;
                let start = e + le_u32(t, e).unwrap_or(0) as usize;
                match get(start) {
                    Some(k) if k <= b"key".as_slice() => named = child(i),
                    _ => break,
                }
            }
            self.branches.insert(page.id, (last, named));
            self.last_children.insert(last);
            return;
        }
        // A leaf.
        for i in 0..page.count {
            let e = HEADER + i * 16;
            let flags = le_u32(t, e).unwrap_or(0);
            let ksize = le_u32(t, e + 8).unwrap_or(0) as usize;
            if flags & BUCKET_LEAF == 0 || ksize != 3 {
                continue;
            }
            let start = e + le_u32(t, e + 4).unwrap_or(0) as usize;
            let (Some(k), Some(v)) = (get(start), get(start + 3)) else {
                continue;
            };
            if k == b"key" {
                if let Some(b) = key_bucket(v) {
                    self.key_buckets.insert(page.id, b);
                }
            }
        }
        let e = HEADER + (page.count - 1) * 16;
        let start = e + le_u32(t, e + 4).unwrap_or(0) as usize;
        let Some(last) = get(start) else {
            return;
        };
        if !is_revision_key(last) {
            return;
        }
        if last >= self.bound.as_slice() || self.last_children.contains(&page.id) {
            self.leaves.insert(page.id, last.to_vec());
        } else {
            self.spare.push(Reverse((last.to_vec(), page.id)));
            if self.spare.len() > SPARE_LEAVES {
                self.spare.pop();
            }
        }
    }

    /// The db's size as its meta page gives it (pages up to the high-water mark), once seen.
    pub fn db_size(&self) -> Option<u64> {
        (self.page_size > 0).then(|| self.hwm.saturating_mul(self.page_size as u64))
    }

    /// The revision, or why it cannot be known exactly.
    pub fn finish(self) -> Result<i64, String> {
        self.finish_detailed().map(|f| f.revision)
    }

    /// The revision and how it was found.
    pub fn finish_detailed(mut self) -> Result<Found, String> {
        if let Some(p) = self.problem.take() {
            return Err(p);
        }
        if self.page_size == 0 {
            return Err("the stream ended before its first page".into());
        }
        for Reverse((k, id)) in std::mem::take(&mut self.spare) {
            self.leaves.entry(id).or_insert(k);
        }
        let missing = |what: &str, id: u64| format!("{what} (page {id}) was not in the stream");
        // Root bucket → the leaf holding the `key` bucket.
        let mut id = self.root;
        for _ in 0..64 {
            match self.branches.get(&id) {
                Some(&(_, named)) => id = named,
                None => break,
            }
        }
        let bucket = self
            .key_buckets
            .get(&id)
            .cloned()
            .ok_or_else(|| missing("the root bucket's leaf naming the `key` bucket", id))?;
        let mut found = Found {
            revision: 0,
            inline: matches!(bucket, KeyBucket::Inline(_)),
            depth: 0,
        };
        let last = match bucket {
            KeyBucket::Inline(last) => last,
            KeyBucket::Page(root) => {
                let mut id = root;
                for _ in 0..64 {
                    match self.branches.get(&id) {
                        Some(&(last, _)) => id = last,
                        None => break,
                    }
                    found.depth += 1;
                }
                let last = self
                    .leaves
                    .get(&id)
                    .ok_or_else(|| missing("the `key` bucket's last leaf", id))?;
                (!last.is_empty()).then(|| last.clone())
            }
        };
        found.revision = match last {
            None => 0,
            Some(k) if is_revision_key(&k) => main_revision(&k),
            Some(_) => return Err("the `key` bucket's last key is not a revision".into()),
        };
        Ok(found)
    }
}

/// The ranges of a page to capture once its element table is known: for a branch every key
/// (to find the child covering `key`); for a leaf the last key and, of every bucket element
/// with a 3-byte name, its name and value.
fn plan(page: &Page) -> Vec<Want> {
    let t = &page.table;
    let mut wants = Vec::new();
    let mut want = |start: usize, len: usize| {
        if start.saturating_add(len) <= page.span {
            wants.push(Want {
                start,
                len,
                bytes: Vec::with_capacity(len.min(4096)),
            });
        }
    };
    for i in 0..page.count {
        let e = HEADER + i * 16;
        if page.flags == BRANCH {
            let pos = le_u32(t, e).unwrap_or(0) as usize;
            let ksize = le_u32(t, e + 4).unwrap_or(0) as usize;
            want(e + pos, ksize);
        } else {
            let flags = le_u32(t, e).unwrap_or(0);
            let pos = le_u32(t, e + 4).unwrap_or(0) as usize;
            let ksize = le_u32(t, e + 8).unwrap_or(0) as usize;
            let vsize = le_u32(t, e + 12).unwrap_or(0) as usize;
            if flags & BUCKET_LEAF != 0 && ksize == 3 {
                want(e + pos, 3);
                want(e + pos + 3, vsize);
            } else if i + 1 == page.count {
                want(e + pos, ksize);
            }
        }
    }
    wants
}

/// A `key` bucket's value: its root page, or its inline page's last key.
fn key_bucket(v: &[u8]) -> Option<KeyBucket> {
    let root = le_u64(v, 0)?;
    if root != 0 {
        return Some(KeyBucket::Page(root));
    }
    let page = v.get(16..)?;
    let count = usize::from(le_u16(page, 10)?);
    if count == 0 {
        return Some(KeyBucket::Inline(None));
    }
    let e = HEADER + (count - 1) * 16;
    let pos = le_u32(page, e + 4)? as usize;
    let ksize = le_u32(page, e + 8)? as usize;
    let key = page.get(e + pos..e + pos + ksize)?;
    Some(KeyBucket::Inline(Some(key.to_vec())))
}

/// The revision of a db file on disk, as `etcdutl snapshot status` reports it (the main
/// revision of the `key` bucket's largest key), read by following the bucket's last children:
/// a few page reads, where etcdutl reads the whole db.
pub fn of_db_file(db: &std::path::Path) -> Result<i64, String> {
    let file = crate::fsutil::open_regular_path(db).map_err(|e| e.to_string())?;
    let bolt = crate::bbolt::Bolt::open(file)?;
    match bolt.last_key(b"key")? {
        Some(k) if is_revision_key(&k) => Ok(main_revision(&k)),
        Some(_) => Err("the largest key of the `key` bucket is not a revision".into()),
        None => Err("the db has no `key` bucket or it is empty".into()),
    }
}

/// Pieces that show every byte going through them to a `RevisionFinder`.
pub struct Tap<P> {
    pub inner: P,
    pub finder: std::rc::Rc<std::cell::RefCell<RevisionFinder>>,
}

impl<P: crate::pipe::Pieces> crate::pipe::Pieces for Tap<P> {
    fn next_piece(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        let piece = self.inner.next_piece()?;
        if let Some(p) = &piece {
            self.finder.borrow_mut().update(p);
        }
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(page_size: u32, root: u64, hwm: u64) -> Vec<u8> {
        let mut p = vec![0u8; page_size as usize];
        p[8..10].copy_from_slice(&0x04u16.to_le_bytes());
        let m = &mut p[HEADER..HEADER + 64];
        m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        m[4..8].copy_from_slice(&2u32.to_le_bytes());
        m[8..12].copy_from_slice(&page_size.to_le_bytes());
        m[16..24].copy_from_slice(&root.to_le_bytes());
        m[40..48].copy_from_slice(&hwm.to_le_bytes());
        let sum = fnv64a(&m[..56]);
        m[56..64].copy_from_slice(&sum.to_le_bytes());
        p
    }

    #[test]
    fn garbage_and_short_streams_give_reasons_not_panics() {
        assert!(RevisionFinder::new(0).finish().is_err());
        let mut f = RevisionFinder::new(0);
        f.update(&[0xAB; 10_000]);
        assert!(f.finish().is_err());
        // A valid meta page whose root page never arrives.
        let mut f = RevisionFinder::new(0);
        f.update(&meta(4096, 3, 4));
        f.update(&meta(4096, 3, 4));
        assert!(f.finish().unwrap_err().contains("was not in the stream"));
    }

    #[test]
    fn a_flood_of_page_look_alikes_is_refused_not_quadratic() {
        let ps = 4096usize;
        let pages = 2000u64;
        let mut stream = meta(ps as u32, 2, pages);
        stream.extend(meta(ps as u32, 2, pages));
        for id in 2..pages {
            // Every page claims to be a leaf spanning to the end of the db.
            let mut p = vec![0u8; ps];
            p[0..8].copy_from_slice(&id.to_le_bytes());
            p[8..10].copy_from_slice(&LEAF.to_le_bytes());
            p[12..16].copy_from_slice(&((pages - id) as u32).to_le_bytes());
            stream.extend(p);
        }
        let mut f = RevisionFinder::new(0);
        let started = std::time::Instant::now();
        f.update(&stream);
        assert!(f.finish().unwrap_err().contains("look-alikes"));
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn an_inline_key_bucket_with_a_short_key_is_not_a_revision() {
        // Root bucket leaf (page 2) holding an inline `key` bucket whose only key is "x".
        let ps = 4096usize;
        let mut leaf = vec![0u8; ps];
        leaf[0..8].copy_from_slice(&2u64.to_le_bytes());
        leaf[8..10].copy_from_slice(&LEAF.to_le_bytes());
        leaf[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut inline = vec![0u8; HEADER + 16 + 2];
        inline[8..10].copy_from_slice(&LEAF.to_le_bytes());
        inline[10..12].copy_from_slice(&1u16.to_le_bytes());
        inline[HEADER + 4..HEADER + 8].copy_from_slice(&16u32.to_le_bytes());
        inline[HEADER + 8..HEADER + 12].copy_from_slice(&1u32.to_le_bytes());
        inline[HEADER + 12..HEADER + 16].copy_from_slice(&1u32.to_le_bytes());
        inline[HEADER + 16] = b'x';
        let mut value = vec![0u8; 16];
        value.extend(&inline);
        let e = HEADER;
        leaf[e..e + 4].copy_from_slice(&BUCKET_LEAF.to_le_bytes());
        leaf[e + 4..e + 8].copy_from_slice(&16u32.to_le_bytes());
        leaf[e + 8..e + 12].copy_from_slice(&3u32.to_le_bytes());
        leaf[e + 12..e + 16].copy_from_slice(&(value.len() as u32).to_le_bytes());
        leaf[e + 16..e + 19].copy_from_slice(b"key");
        leaf[e + 19..e + 19 + value.len()].copy_from_slice(&value);
        let mut stream = meta(ps as u32, 2, 3);
        stream.extend(meta(ps as u32, 2, 3));
        stream.extend(leaf);
        let mut f = RevisionFinder::new(0);
        f.update(&stream);
        assert!(f.finish().unwrap_err().contains("not a revision"));
    }
}
