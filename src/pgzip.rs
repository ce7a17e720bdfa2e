//! Parallel gzip: a stream of independent gzip members, compressed and decompressed on every
//! core with bounded memory.
//!
//! Each member carries its own total length in a gzip FEXTRA subfield `EA` (like BGZF's `BC`),
//! so a reader can find member boundaries without inflating. The output is plain RFC 1952
//! multi-member gzip: GNU gzip/tar and flate2's `MultiGzDecoder` read it as one stream.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use flate2::{Decompress, FlushDecompress, Status};
use miniz_oxide::deflate::core::{
    compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
};

/// Uncompressed bytes per member.
pub const BLOCK: usize = 1 << 20;
/// Largest uncompressed member a reader accepts (hostile input cannot make us allocate more).
const MAX_BLOCK: usize = 4 * BLOCK;
/// Largest compressed member a reader accepts.
const MAX_MEMBER: usize = MAX_BLOCK + (MAX_BLOCK >> 4) + 4096;
const HEADER_LEN: usize = 20;

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16)
}

/// A job: its number, its input, and a spare buffer for its output.
type Job<I> = (u64, I, Vec<u8>);
/// An output buffer and how many of its first bytes are the output.
type Output = (Vec<u8>, usize);
/// A finished job: its number, its input (for reuse) and its output.
type Done<I> = (u64, I, io::Result<Output>);
/// What a worker does: reads the input and writes into the output buffer (reused from earlier
/// jobs: its length only grows, so it is zeroed once), returning how much it produced.
type Work<I> = fn(&I, u32, &mut Vec<u8>) -> io::Result<usize>;

/// A fixed pool of workers applying `work` to numbered jobs. Input and output buffers go
/// round: a finished job's input is the next job's, and an output the caller has used is
/// given back, so a run of any length touches the same few megabytes (no page faults, no
/// zeroing of fresh allocations).
struct Pool<I> {
    jobs: Option<SyncSender<Job<I>>>,
    done: Receiver<Done<I>>,
    workers: Vec<JoinHandle<()>>,
    capacity: usize,
    in_flight: usize,
    pending: BTreeMap<u64, (I, io::Result<Output>)>,
    next_out: u64,
    next_in: u64,
    spare_in: Vec<I>,
    spare_out: Vec<Vec<u8>>,
}

impl<I: Send + 'static> Pool<I> {
    fn new(work: Work<I>, arg: u32) -> Pool<I> {
        let n = threads();
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job<I>>(n);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (done_tx, done) = mpsc::channel::<Done<I>>();
        let workers = (0..n)
            .map(|_| {
                let rx = Arc::clone(&jobs_rx);
                let tx: Sender<Done<I>> = done_tx.clone();
                std::thread::spawn(move || loop {
                    let job = rx.lock().map(|r| r.recv());
                    let Ok(Ok((seq, data, mut out))) = job else {
                        return;
                    };
                    let result = work(&data, arg, &mut out).map(|used| (out, used));
                    if tx.send((seq, data, result)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Pool {
            jobs: Some(jobs_tx),
            done,
            workers,
            capacity: 2 * n,
            in_flight: 0,
            pending: BTreeMap::new(),
            next_out: 0,
            next_in: 0,
            spare_in: Vec::new(),
            spare_out: Vec::new(),
        }
    }

    fn full(&self) -> bool {
        self.in_flight >= self.capacity
    }

    /// An input buffer, a finished job's (with its old bytes: resizing it zeroes only what
    /// it grows by) or a new one.
    fn input(&mut self, new: impl FnOnce() -> I) -> I {
        self.spare_in.pop().unwrap_or_else(new)
    }

    /// Gives an output back once its bytes are used.
    fn give_back(&mut self, out: Vec<u8>) {
        if self.spare_out.len() <= self.capacity {
            self.spare_out.push(out);
        }
    }

    fn submit(&mut self, data: I) -> io::Result<()> {
        let out = self.spare_out.pop().unwrap_or_default();
        let tx = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("pool is closed"))?;
        tx.send((self.next_in, data, out))
            .map_err(|_| io::Error::other("worker thread died"))?;
        self.next_in += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// The next result in submission order, waiting for it. `None` when nothing is in flight.
    fn next(&mut self) -> Option<io::Result<Output>> {
        if self.in_flight == 0 {
            return None;
        }
        loop {
            if let Some((input, r)) = self.pending.remove(&self.next_out) {
                self.next_out += 1;
                self.in_flight -= 1;
                if self.spare_in.len() <= self.capacity {
                    self.spare_in.push(input);
                }
                return Some(r);
            }
            match self.done.recv() {
                Ok((seq, input, r)) => {
                    self.pending.insert(seq, (input, r));
                }
                Err(_) => return Some(Err(io::Error::other("worker thread died"))),
            }
        }
    }
}

impl<I> Drop for Pool<I> {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Bytes compressed at one level before the level is chosen again.
pub const CHUNK: usize = 16 * 1024;
/// Bytes sampled at each end of a chunk to choose its level.
const PROBE: usize = 1024;

/// Whether a chunk is not worth compressing: both its ends look random (at least 230 of the
/// 256 byte values occur in each 1 KiB sample; random or already compressed bytes show about
/// 251, text and protobuf far fewer). Encrypted values (Kubernetes Secrets at rest) and
/// random payloads are then stored, at memory speed, while the rest is deflated. A histogram
/// costs a fraction of a trial deflate.
pub fn incompressible(chunk: &[u8]) -> bool {
    chunk.len() >= 2 * PROBE
        && looks_random(&chunk[..PROBE])
        && looks_random(&chunk[chunk.len() - PROBE..])
}

/// At least 230 distinct byte values in a sample. Branch-free: mark, then count (the loop
/// with a test per byte was 5% of a snapshot).
fn looks_random(sample: &[u8]) -> bool {
    let mut seen = [0u8; 256];
    for &b in sample {
        seen[usize::from(b)] = 1;
    }
    seen.iter().map(|&s| u32::from(s)).sum::<u32>() >= 230
}

thread_local! {
    /// The deflate state kept per worker thread for reuse: a new one allocates and clears its
    /// window and hash tables (hundreds of KiB) every time.
    static SPARE: std::cell::RefCell<Option<(u32, Box<CompressorOxide>)>> =
        const { std::cell::RefCell::new(None) };
}

/// One block of the writer: pieces of the stream in order, shared, not copied; the
/// compressor reads them where they are.
#[derive(Default)]
struct Block {
    pieces: Vec<Bytes>,
    /// Where each piece starts in the block.
    starts: Vec<usize>,
    len: usize,
}

impl Block {
    fn push(&mut self, piece: Bytes) {
        self.starts.push(self.len);
        self.len += piece.len();
        self.pieces.push(piece);
    }

    fn clear(&mut self) {
        self.pieces.clear();
        self.starts.clear();
        self.len = 0;
    }

    /// The bytes `a..b` of the block as slices of its pieces.
    fn slices(&self, a: usize, b: usize) -> impl Iterator<Item = &[u8]> + '_ {
        let first = self.starts.partition_point(|&s| s <= a).saturating_sub(1);
        self.pieces[first..]
            .iter()
            .zip(&self.starts[first..])
            .take_while(move |(_, &start)| start < b)
            .map(move |(piece, &start)| {
                let from = a.saturating_sub(start);
                let to = (b - start).min(piece.len());
                &piece[from..to]
            })
            .filter(|s| !s.is_empty())
    }

    /// The bytes `a..b`: a slice of one piece, or gathered into `scratch` when they span two.
    fn view<'a>(&'a self, a: usize, b: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
        let mut parts = self.slices(a, b);
        match (parts.next(), parts.next()) {
            (Some(one), None) => one,
            (first, second) => {
                scratch.clear();
                first
                    .into_iter()
                    .chain(second)
                    .chain(parts)
                    .for_each(|s| scratch.extend_from_slice(s));
                scratch
            }
        }
    }

    /// Whether the 16 KiB chunk `a..b` is not worth compressing (see `incompressible`).
    fn incompressible(&self, a: usize, b: usize, scratch: &mut Vec<u8>) -> bool {
        b - a >= 2 * PROBE
            && looks_random(self.view(a, a + PROBE, scratch))
            && looks_random(self.view(b - PROBE, b, scratch))
    }
}

/// Compresses one block into gzip members with our `EA` length subfield: one member per run
/// of 16 KiB chunks that are stored or deflated alike. `buf` is a reused output buffer.
fn compress_block(block: &Block, level: u32, buf: &mut Vec<u8>) -> io::Result<usize> {
    let len = block.len;
    let members = len / CHUNK + 1;
    let mut out = Out {
        buf: std::mem::take(buf),
        used: 0,
    };
    out.room(len + len / 64 + members * 64 + block.pieces.len() * 5 + 1024);
    let mut scratch = Vec::new();
    let mut run_start = 0;
    let mut run_level = None;
    for start in (0..len).step_by(CHUNK) {
        let end = (start + CHUNK).min(len);
        let want = if level > 0 && block.incompressible(start, end, &mut scratch) {
            0
        } else {
            level
        };
        match run_level {
            Some(l) if l != want => {
                append_member(&mut out, block, run_start, start, l)?;
                run_start = start;
                run_level = Some(want);
            }
            None => run_level = Some(want),
            Some(_) => {}
        }
    }
    append_member(&mut out, block, run_start, len, run_level.unwrap_or(level))?;
    *buf = out.buf;
    Ok(out.used)
}

/// An output buffer, zeroed only where it grows, and how much of it is used.
struct Out {
    buf: Vec<u8>,
    used: usize,
}

impl Out {
    fn room(&mut self, n: usize) {
        if self.buf.len() - self.used < n {
            self.buf.resize(self.used + n, 0);
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.buf[self.used..self.used + bytes.len()].copy_from_slice(bytes);
        self.used += bytes.len();
    }
}

/// Appends one complete gzip member holding the bytes `a..b` of `block` at `level` (0: stored).
fn append_member(out: &mut Out, block: &Block, a: usize, b: usize, level: u32) -> io::Result<()> {
    let start = out.used;
    out.put(&[
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 3, 8, 0, b'E', b'A', 4, 0, 0, 0, 0, 0,
    ]);
    if level == 0 {
        put_stored(out, block.slices(a, b));
    } else {
        deflate_into(out, block.slices(a, b), level)?;
    }
    let mut crc = crc32fast::Hasher::new();
    block.slices(a, b).for_each(|s| crc.update(s));
    out.put(&crc.finalize().to_le_bytes());
    out.put(&((b - a) as u32).to_le_bytes());
    let total = u32::try_from(out.used - start).map_err(io::Error::other)?;
    out.buf[start + 16..start + 20].copy_from_slice(&total.to_le_bytes());
    Ok(())
}

/// Stored deflate blocks (RFC 1951 3.2.4): an incompressible run is copied once, with a
/// 5-byte header per piece (at most 64 KiB), and no compressor runs over it.
fn put_stored<'a>(out: &mut Out, slices: impl Iterator<Item = &'a [u8]>) {
    let mut blocks = slices.flat_map(|s| s.chunks(0xffff)).peekable();
    if blocks.peek().is_none() {
        out.put(&[1, 0, 0, 0xff, 0xff]);
        return;
    }
    while let Some(b) = blocks.next() {
        let len = b.len() as u16;
        out.put(&[u8::from(blocks.peek().is_none())]);
        out.put(&len.to_le_bytes());
        out.put(&(!len).to_le_bytes());
        out.put(b);
    }
}

/// Deflates the slices (raw deflate, one stream) into `out`, with miniz_oxide: at level 1
/// on our chunks it measured faster than zlib-rs and libdeflate, and smaller than zlib-rs
/// (`examples/codecs.rs`).
fn deflate_into<'a>(
    out: &mut Out,
    slices: impl Iterator<Item = &'a [u8]>,
    level: u32,
) -> io::Result<()> {
    let mut z = SPARE
        .with(|s| s.borrow_mut().take())
        .filter(|(l, _)| *l == level)
        .map(|(_, mut z)| {
            z.reset();
            z
        })
        .unwrap_or_else(|| {
            // Window bits 0: raw deflate, no zlib header.
            let flags = create_comp_flags_from_zip_params(level.min(10) as i32, 0, 0);
            Box::new(CompressorOxide::new(flags))
        });
    let mut slices = slices.peekable();
    let mut input: &[u8] = slices.next().unwrap_or(&[]);
    loop {
        let last = slices.peek().is_none();
        let flush = if last {
            TDEFLFlush::Finish
        } else {
            TDEFLFlush::None
        };
        out.room(input.len() / 4 + 4096);
        let (status, read, wrote) = compress(&mut z, input, &mut out.buf[out.used..], flush);
        out.used += wrote;
        input = &input[read..];
        match status {
            TDEFLStatus::Done => break,
            TDEFLStatus::Okay if input.is_empty() && !last => {
                input = slices.next().unwrap_or(&[]);
            }
            TDEFLStatus::Okay => {}
            other => return Err(io::Error::other(format!("deflate failed: {other:?}"))),
        }
    }
    SPARE.with(|s| *s.borrow_mut() = Some((level, z)));
    Ok(())
}

/// Writes gzip members compressed in parallel, in order, to `inner`. `push` hands over a
/// piece without copying it; `write` copies small things (tar headers) into a piece of their
/// own.
pub struct ParGzWriter<W: Write> {
    inner: Option<W>,
    block: Block,
    small: bytes::BytesMut,
    pool: Pool<Block>,
}

impl<W: Write> ParGzWriter<W> {
    pub fn new(inner: W, level: u32) -> Self {
        ParGzWriter {
            inner: Some(inner),
            block: Block::default(),
            small: bytes::BytesMut::new(),
            pool: Pool::new(compress_block, level),
        }
    }

    /// Appends a piece of the stream, shared: the compressor reads it where it is.
    pub fn push(&mut self, piece: Bytes) -> io::Result<()> {
        self.flush_small()?;
        self.add(piece)
    }

    fn add(&mut self, piece: Bytes) -> io::Result<()> {
        if !piece.is_empty() {
            self.block.push(piece);
        }
        if self.block.len >= BLOCK {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_small(&mut self) -> io::Result<()> {
        if self.small.is_empty() {
            return Ok(());
        }
        let piece = self.small.split().freeze();
        self.add(piece)
    }

    fn write_ready(&mut self, wait: bool) -> io::Result<()> {
        while self.pool.in_flight > 0 && (wait || self.pool.full()) {
            let (members, used) = self.pool.next().expect("in flight")?;
            self.inner
                .as_mut()
                .expect("not finished")
                .write_all(&members[..used])?;
            self.pool.give_back(members);
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        let mut next = self.pool.input(Block::default);
        next.clear();
        let block = std::mem::replace(&mut self.block, next);
        self.pool.submit(block)?;
        self.write_ready(false)
    }

    /// Compresses what is left, writes every member and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_small()?;
        if self.block.len > 0 || self.pool.next_in == 0 {
            self.flush_block()?;
        }
        self.write_ready(true)?;
        let mut inner = self.inner.take().expect("finish runs once");
        inner.flush()?;
        Ok(inner)
    }
}

impl<W: Write> Write for ParGzWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOCK - self.small.len().min(BLOCK));
        self.small.extend_from_slice(&data[..n]);
        if self.small.len() >= BLOCK / 16 {
            self.flush_small()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Inflates one complete member read by `ParGzReader` into `out` (a reused buffer) and checks
/// its CRC and length.
// `&Vec`: the pool's job type (the reader's inputs are reused `Vec`s).
#[allow(clippy::ptr_arg)]
fn decompress_member(member: &Vec<u8>, _: u32, out: &mut Vec<u8>) -> io::Result<usize> {
    let body = &member[HEADER_LEN..member.len() - 8];
    let trailer = &member[member.len() - 8..];
    let crc_expected = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes")) as usize;
    if size > MAX_BLOCK {
        return Err(invalid("gzip member is larger than any this tool writes"));
    }
    // One byte more than the recorded length: a member that inflates past it is caught.
    if out.len() < size + 1 {
        out.resize(size + 1, 0);
    }
    let out = &mut out[..size + 1];
    let mut z = Decompress::new(false);
    let status = z
        .decompress(body, out, FlushDecompress::Finish)
        .map_err(|e| invalid(format!("corrupt deflate data: {e}")))?;
    let produced = z.total_out() as usize;
    if produced > size {
        return Err(invalid("gzip member inflates past its recorded length"));
    }
    if status != Status::StreamEnd {
        return Err(invalid("truncated deflate data"));
    }
    if z.total_in() as usize != body.len() {
        return Err(invalid("gzip member has data after its deflate stream"));
    }
    if crc32fast::hash(&out[..produced]) != crc_expected || produced != size {
        return Err(invalid("gzip member fails its CRC check"));
    }
    Ok(produced)
}

/// Reads a stream written by `ParGzWriter`, inflating members on every core.
pub struct ParGzReader<R: Read> {
    inner: R,
    pool: Pool<Vec<u8>>,
    current: Vec<u8>,
    /// How much of `current` is the inflated block.
    len: usize,
    pos: usize,
    eof: bool,
}

impl<R: Read> ParGzReader<R> {
    /// Whether `header` (the first bytes of a file) starts a member with our length subfield.
    pub fn recognizes(header: &[u8]) -> bool {
        header.len() >= HEADER_LEN
            && header[..4] == [0x1f, 0x8b, 8, 4]
            && header[10..16] == [8, 0, b'E', b'A', 4, 0]
    }

    pub fn new(inner: R) -> Self {
        ParGzReader {
            inner,
            pool: Pool::new(decompress_member, 0),
            current: Vec::new(),
            len: 0,
            pos: 0,
            eof: false,
        }
    }

    /// Reads the next whole member, or `None` at a clean end of input.
    fn read_member(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = self.inner.read(&mut header[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_LEN || !Self::recognizes(&header) {
            return Err(invalid(
                "truncated or foreign gzip member in an etcd-actions archive",
            ));
        }
        let total = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
        if !(HEADER_LEN + 8..=MAX_MEMBER).contains(&total) {
            return Err(invalid(format!(
                "gzip member length {total} is out of range"
            )));
        }
        let mut member = self.pool.input(|| Vec::with_capacity(BLOCK + BLOCK / 8));
        member.resize(total, 0);
        member[..HEADER_LEN].copy_from_slice(&header);
        self.inner
            .read_exact(&mut member[HEADER_LEN..])
            .map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    invalid("archive is truncated inside a gzip member")
                } else {
                    e
                }
            })?;
        Ok(Some(member))
    }

    fn refill(&mut self) -> io::Result<()> {
        while !self.eof && !self.pool.full() {
            match self.read_member()? {
                Some(m) => self.pool.submit(m)?,
                None => self.eof = true,
            }
        }
        match self.pool.next() {
            Some(block) => {
                let (block, len) = block?;
                let used = std::mem::replace(&mut self.current, block);
                self.pool.give_back(used);
                self.len = len;
                self.pos = 0;
            }
            None => self.len = 0,
        }
        Ok(())
    }
}

impl<R: Read> Read for ParGzReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.len {
            if self.eof && self.pool.in_flight == 0 {
                return Ok(0);
            }
            self.refill()?;
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::MultiGzDecoder;

    fn sample(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|i| {
                if (i / 10_000) % 2 == 0 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                } else {
                    b"etcd-key-value "[i % 15]
                }
            })
            .collect()
    }

    fn compress(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut w = ParGzWriter::new(Vec::new(), 1);
        for c in data.chunks(chunk.max(1)) {
            w.write_all(c).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trips_through_both_readers() {
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345] {
            let data = sample(len);
            let gz = compress(&data, 7919);
            let mut a = Vec::new();
            MultiGzDecoder::new(&gz[..]).read_to_end(&mut a).unwrap();
            assert_eq!(a, data, "MultiGzDecoder, len {len}");
            assert!(ParGzReader::<&[u8]>::recognizes(&gz));
            let mut b = Vec::new();
            ParGzReader::new(&gz[..]).read_to_end(&mut b).unwrap();
            assert_eq!(b, data, "ParGzReader, len {len}");
        }
    }

    #[test]
    fn pushed_pieces_of_any_size_round_trip() {
        let data = sample(3 * BLOCK + 54321);
        // Pieces that split chunks, probes and stored blocks anywhere, with small writes
        // (copied) between them.
        for size in [1, 7, 1000, 16 * 1024 + 3, 32 * 1024, 70_000, BLOCK + 9] {
            let mut w = ParGzWriter::new(Vec::new(), 1);
            let mut pos = 0;
            let mut i = 0;
            while pos < data.len() {
                let end = (pos + size).min(data.len());
                if i % 3 == 2 {
                    w.write_all(&data[pos..end]).unwrap();
                } else {
                    w.push(Bytes::copy_from_slice(&data[pos..end])).unwrap();
                }
                pos = end;
                i += 1;
            }
            let gz = w.finish().unwrap();
            let mut a = Vec::new();
            MultiGzDecoder::new(&gz[..]).read_to_end(&mut a).unwrap();
            assert!(a == data, "MultiGzDecoder, pieces of {size}");
            let mut b = Vec::new();
            ParGzReader::new(&gz[..]).read_to_end(&mut b).unwrap();
            assert!(b == data, "ParGzReader, pieces of {size}");
        }
    }

    #[test]
    fn noise_is_stored_and_text_is_compressed() {
        let mut x: u64 = 7;
        let random: Vec<u8> = (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let text = b"etcd key value ".repeat(BLOCK / 30);
        let gz = compress(&random, BLOCK);
        assert!(gz.len() < random.len() + 1024, "stored blocks add little");
        let mut mixed = random[..BLOCK / 2].to_vec();
        mixed.extend_from_slice(&text);
        let gz = compress(&mixed, BLOCK);
        assert!(
            gz.len() < BLOCK / 2 + 64 * 1024,
            "the text half is compressed: {}",
            gz.len()
        );
        let mut back = Vec::new();
        ParGzReader::new(&gz[..]).read_to_end(&mut back).unwrap();
        assert!(back == mixed, "round trip of a mixed block");
    }

    #[test]
    fn corruption_is_an_error_not_a_panic() {
        let gz = compress(&sample(2 * BLOCK + 5), 65536);
        for pos in [
            0,
            3,
            10,
            16,
            17,
            30,
            gz.len() / 2,
            gz.len() - 5,
            gz.len() - 1,
        ] {
            let mut bad = gz.clone();
            bad[pos] ^= 0x40;
            let mut out = Vec::new();
            assert!(
                ParGzReader::new(&bad[..]).read_to_end(&mut out).is_err(),
                "flip at {pos}"
            );
        }
        let mut out = Vec::new();
        assert!(ParGzReader::new(&gz[..gz.len() - 3])
            .read_to_end(&mut out)
            .is_err());
    }
}
