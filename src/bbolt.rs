//! A small read-only reader of bbolt files (etcd's backend), enough to list the entries of a
//! top-level bucket: offline, restore reads the `members` bucket of a stopped member's db to
//! know whether it belongs to a larger cluster.
//!
//! Layout (bbolt's `page.go`): each page starts with a 16-byte header (`id u64, flags u16,
//! count u16, overflow u32`); pages 0 and 1 are meta pages (`magic, version, page size,
//! flags, root bucket {root pgid, sequence}, freelist, pgid, txid, checksum`), the valid one
//! with the higher txid wins. Branch elements are `pos u32, ksize u32, pgid u64`; leaf
//! elements `flags u32, pos u32, ksize u32, vsize u32`, with `pos` relative to the element. A
//! bucket's value is `root pgid u64, sequence u64`, followed by an inline page when the root
//! is 0. Every read is bounded and checked: a damaged file gives an error, never a panic.

use std::fs::File;
use std::os::unix::fs::FileExt;

pub(crate) const MAGIC: u32 = 0xED0C_DAED;
pub(crate) const BRANCH: u16 = 0x01;
pub(crate) const LEAF: u16 = 0x02;
pub(crate) const BUCKET_LEAF: u32 = 0x01;
pub(crate) const HEADER: usize = 16;
/// Pages read in one listing at most: a members bucket is a handful of pages.
const MAX_PAGES: usize = 100_000;
/// Largest page (with overflow) read.
const MAX_PAGE_BYTES: u64 = 64 << 20;

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Called with every key and value of a bucket.
pub type EachEntry<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), String> + 'a;

/// Called with every (element flags, key, value) of a tree.
type Visit<'a> = dyn FnMut(u32, &[u8], &[u8]) -> Result<(), String> + 'a;

pub struct Bolt {
    file: File,
    page_size: u64,
    root: u64,
    /// Pages one walk reads at most: every page of the file once, and never fewer than
    /// `MAX_PAGES` (a damaged tree that loops ends here).
    max_pages: usize,
}

pub(crate) fn le_u16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
pub(crate) fn le_u32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
pub(crate) fn le_u64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

pub(crate) fn fnv64a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The key of the element at `e` of a page: its `pos` (relative to the element) and size are
/// at `pos_at` and `size_at` of it (branch: 0 and 4; leaf: 4 and 8).
fn elem_key(page: &[u8], e: usize, pos_at: usize, size_at: usize) -> Option<&[u8]> {
    let pos = le_u32(page, e + pos_at)? as usize;
    let size = le_u32(page, e + size_at)? as usize;
    let k = e.checked_add(pos)?;
    page.get(k..k.checked_add(size)?)
}

/// A meta page's (root pgid, txid, page size) when it is valid.
fn meta(page: &[u8]) -> Option<(u64, u64, u64)> {
    let m = page.get(HEADER..HEADER + 64)?;
    if le_u32(m, 0)? != MAGIC || le_u32(m, 4)? != 2 || fnv64a(&m[..56]) != le_u64(m, 56)? {
        return None;
    }
    Some((le_u64(m, 16)?, le_u64(m, 48)?, u64::from(le_u32(m, 8)?)))
}

/// Where a bucket's tree starts: a page of the file, or a page inline in the parent's value.
pub enum Root {
    Page(u64),
    Inline(Vec<u8>),
}

impl Bolt {
    pub fn open(file: File) -> Result<Bolt, String> {
        let mut first = vec![0u8; 4096];
        let n = file.read_at(&mut first, 0).map_err(|e| e.to_string())?;
        first.truncate(n);
        let m0 = meta(&first);
        let page_size = m0
            .map(|m| m.2)
            .or_else(|| le_u32(&first, HEADER + 8).map(u64::from))
            .filter(|p| (512..=65536).contains(p))
            .ok_or("no valid bbolt meta page")?;
        let mut second = vec![0u8; HEADER + 64];
        let n = file
            .read_at(&mut second, page_size)
            .map_err(|e| e.to_string())?;
        second.truncate(n);
        let m1 = meta(&second).filter(|m| m.2 == page_size);
        let (root, _, _) = match (m0, m1) {
            (Some(a), Some(b)) => {
                if b.1 > a.1 {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Err("no valid bbolt meta page".into()),
        };
        let pages = file.metadata().map(|m| m.len() / page_size).unwrap_or(0);
        Ok(Bolt {
            file,
            page_size,
            root,
            max_pages: usize::try_from(pages).unwrap_or(usize::MAX).max(MAX_PAGES),
        })
    }

    fn page(&self, id: u64) -> Result<Vec<u8>, String> {
        let mut head = [0u8; HEADER];
        let off = id
            .checked_mul(self.page_size)
            .ok_or("page id out of range")?;
        self.file
            .read_exact_at(&mut head, off)
            .map_err(|e| format!("page {id}: {e}"))?;
        let overflow = u64::from(le_u32(&head, 12).unwrap_or(0));
        let len = (overflow + 1)
            .checked_mul(self.page_size)
            .filter(|l| *l <= MAX_PAGE_BYTES)
            .ok_or_else(|| format!("page {id} is too large"))?;
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(|e| format!("page {id}: {e}"))?;
        Ok(buf)
    }

    /// Calls `f` with every (flags, key, value) of the tree at `root`, in order.
    fn walk(&self, root: &Root, f: &mut Visit<'_>) -> Result<(), String> {
        let mut budget = self.max_pages;
        match root {
            Root::Inline(page) => self.walk_page(page, 0, &mut budget, f),
            Root::Page(id) => {
                let page = self.page(*id)?;
                self.walk_page(&page, 0, &mut budget, f)
            }
        }
    }

    fn walk_page(
        &self,
        page: &[u8],
        depth: usize,
        budget: &mut usize,
        f: &mut Visit<'_>,
    ) -> Result<(), String> {
        if depth > 64 || *budget == 0 {
            return Err("the b+tree is too deep or too large".into());
        }
        *budget -= 1;
        let bad = || "a page is damaged".to_string();
        let flags = le_u16(page, 8).ok_or_else(bad)?;
        let count = usize::from(le_u16(page, 10).ok_or_else(bad)?);
        for i in 0..count {
            let e = HEADER + i * 16;
            if flags & BRANCH != 0 {
                let child = le_u64(page, e + 8).ok_or_else(bad)?;
                let child = self.page(child)?;
                self.walk_page(&child, depth + 1, budget, f)?;
            } else if flags & LEAF != 0 {
                let eflags = le_u32(page, e).ok_or_else(bad)?;
                let pos = le_u32(page, e + 4).ok_or_else(bad)? as usize;
                let ksize = le_u32(page, e + 8).ok_or_else(bad)? as usize;
                let vsize = le_u32(page, e + 12).ok_or_else(bad)? as usize;
                let k = e.checked_add(pos).ok_or_else(bad)?;
                let key = page.get(k..k + ksize).ok_or_else(bad)?;
                let value = page.get(k + ksize..k + ksize + vsize).ok_or_else(bad)?;
                f(eflags, key, value)?;
            } else {
                return Err(format!("unexpected page type {flags:#x}"));
            }
        }
        Ok(())
    }

    /// Every key and value of the top-level bucket `name`; `None` when there is no such bucket.
    pub fn bucket_entries(&self, name: &[u8]) -> Result<Option<Vec<Entry>>, String> {
        let Some(root) = self.bucket_root(name)? else {
            return Ok(None);
        };
        let mut entries = Vec::new();
        self.walk(&root, &mut |flags, key, value| {
            if flags & BUCKET_LEAF == 0 {
                entries.push((key.to_vec(), value.to_vec()));
            }
            Ok(())
        })?;
        Ok(Some(entries))
    }

    /// Calls `f` with every key and value of the top-level bucket `name`, in key order,
    /// without holding them: a walk of a whole db reads one page at a time. `false` when
    /// there is no such bucket.
    pub fn for_each(&self, name: &[u8], f: &mut EachEntry<'_>) -> Result<bool, String> {
        let Some(root) = self.bucket_root(name)? else {
            return Ok(false);
        };
        self.walk(&root, &mut |flags, key, value| {
            if flags & BUCKET_LEAF == 0 {
                f(key, value)?;
            }
            Ok(())
        })?;
        Ok(true)
    }

    /// The value of `key` in the bucket whose tree starts at `root` (see `bucket_root`),
    /// found by descending from the root: a handful of page reads.
    pub fn get(&self, root: &Root, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let bad = || "a page is damaged".to_string();
        let mut page = match root {
            Root::Inline(page) => page.clone(),
            Root::Page(id) => self.page(*id)?,
        };
        for _ in 0..64 {
            let flags = le_u16(&page, 8).ok_or_else(bad)?;
            let count = usize::from(le_u16(&page, 10).ok_or_else(bad)?);
            if flags & BRANCH != 0 {
                // The last child whose first key is at most `key`.
                let (mut lo, mut hi) = (0usize, count);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    let k = elem_key(&page, HEADER + mid * 16, 0, 4).ok_or_else(bad)?;
                    if k <= key {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                let e = HEADER + lo.saturating_sub(1) * 16;
                let child = le_u64(&page, e + 8).ok_or_else(bad)?;
                page = self.page(child)?;
            } else if flags & LEAF != 0 {
                let (mut lo, mut hi) = (0usize, count);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    let e = HEADER + mid * 16;
                    let k = elem_key(&page, e, 4, 8).ok_or_else(bad)?;
                    match k.cmp(key) {
                        std::cmp::Ordering::Less => lo = mid + 1,
                        std::cmp::Ordering::Greater => hi = mid,
                        std::cmp::Ordering::Equal => {
                            let pos = le_u32(&page, e + 4).ok_or_else(bad)? as usize;
                            let vsize = le_u32(&page, e + 12).ok_or_else(bad)? as usize;
                            let v = e + pos + k.len();
                            let value = page.get(v..v + vsize).ok_or_else(bad)?;
                            return Ok(Some(value.to_vec()));
                        }
                    }
                }
                return Ok(None);
            } else {
                return Err(format!("unexpected page type {flags:#x}"));
            }
        }
        Err("the b+tree is too deep".into())
    }

    /// Where the top-level bucket `name`'s tree starts; `None` when there is no such bucket.
    pub fn bucket_root(&self, name: &[u8]) -> Result<Option<Root>, String> {
        let mut found: Option<Root> = None;
        self.walk(&Root::Page(self.root), &mut |flags, key, value| {
            if flags & BUCKET_LEAF != 0 && key == name {
                let root = le_u64(value, 0).ok_or("a bucket header is damaged")?;
                found = Some(if root == 0 {
                    Root::Inline(value.get(16..).unwrap_or_default().to_vec())
                } else {
                    Root::Page(root)
                });
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// The largest key of the top-level bucket `name`, found by following the last child of
    /// each branch page (a handful of page reads); `None` when the bucket is absent or empty.
    pub fn last_key(&self, name: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let bad = || "a page is damaged".to_string();
        let mut page = match self.bucket_root(name)? {
            None => return Ok(None),
            Some(Root::Inline(page)) => page,
            Some(Root::Page(id)) => self.page(id)?,
        };
        for _ in 0..64 {
            let flags = le_u16(&page, 8).ok_or_else(bad)?;
            let count = usize::from(le_u16(&page, 10).ok_or_else(bad)?);
            let Some(last) = count.checked_sub(1) else {
                return Ok(None);
            };
            let e = HEADER + last * 16;
            if flags & BRANCH != 0 {
                let child = le_u64(&page, e + 8).ok_or_else(bad)?;
                page = self.page(child)?;
            } else if flags & LEAF != 0 {
                let key = elem_key(&page, e, 4, 8).ok_or_else(bad)?;
                return Ok(Some(key.to_vec()));
            } else {
                return Err(format!("unexpected page type {flags:#x}"));
            }
        }
        Err("the b+tree is too deep".into())
    }
}
