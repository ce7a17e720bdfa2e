//! Pieces of a stream handed from the thread that produces them to a `Read`: the object
//! download, the decryption and the archive's reading (with its hash) all run ahead of their
//! reader this way; and `Pieces`, the owned pieces the archive writer passes along.

use std::io::{self, BufRead, Read};
use std::sync::mpsc::{Receiver, SyncSender};

/// Reads the pieces a producer thread sends, as a `BufRead` (no second buffer around it). An
/// empty piece ends the stream; so does the producer's end when `end_on_hangup` (otherwise
/// that is an error: the producer stopped before saying the stream ended). Used pieces go
/// back to the producer when it asked for them (`recycle`).
pub struct PieceReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    piece: Vec<u8>,
    pos: usize,
    done: bool,
    end_on_hangup: bool,
    what: &'static str,
    recycle: Option<SyncSender<Vec<u8>>>,
}

impl PieceReader {
    pub fn new(
        rx: Receiver<io::Result<Vec<u8>>>,
        end_on_hangup: bool,
        what: &'static str,
    ) -> PieceReader {
        PieceReader {
            rx,
            piece: Vec::new(),
            pos: 0,
            done: false,
            end_on_hangup,
            what,
            recycle: None,
        }
    }
}

impl BufRead for PieceReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.piece.len() {
            if self.done {
                return Ok(&[]);
            }
            match self.rx.recv() {
                Ok(Ok(p)) if p.is_empty() => self.done = true,
                Ok(Ok(p)) => {
                    let used = std::mem::replace(&mut self.piece, p);
                    if let Some(back) = &self.recycle {
                        let _ = back.try_send(used);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) if self.end_on_hangup => self.done = true,
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other(format!("the {} stopped", self.what)));
                }
            }
        }
        Ok(&self.piece[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.piece.len());
    }
}

impl Read for PieceReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        read_buffered(self, out)
    }
}

/// `Read::read` for a `BufRead`: copies from what `fill_buf` holds.
pub fn read_buffered<R: BufRead + ?Sized>(r: &mut R, out: &mut [u8]) -> io::Result<usize> {
    let n = {
        let have = r.fill_buf()?;
        let n = out.len().min(have.len());
        out[..n].copy_from_slice(&have[..n]);
        n
    };
    r.consume(n);
    Ok(n)
}

/// Sees every piece a `read_ahead` thread reads, on that thread.
pub trait Observe: Send {
    fn observe(&mut self, piece: &[u8]);
}

/// Nothing to see.
impl Observe for () {
    fn observe(&mut self, _: &[u8]) {}
}

/// Bytes per piece a `read_ahead` thread reads.
const AHEAD_PIECE: usize = 1 << 20;

/// Reads `inner` on a scoped thread of its own, up to four 1 MiB pieces ahead of the reader
/// it returns, showing each piece to `observe` there (a hash of the file, on the thread that
/// reads it): the reading overlaps whatever consumes the bytes. Pieces go round between the
/// two threads instead of being allocated anew. When the reader is dropped, the thread stops
/// at its next piece; its handle gives `observe` back.
pub fn read_ahead<'scope, R, O>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    mut inner: R,
    what: &'static str,
    mut observer: O,
) -> (PieceReader, std::thread::ScopedJoinHandle<'scope, O>)
where
    R: Read + Send + 'scope,
    O: Observe + 'scope,
{
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    let (back_tx, back) = std::sync::mpsc::sync_channel::<Vec<u8>>(6);
    let handle = scope.spawn(move || {
        loop {
            let mut piece = back.try_recv().unwrap_or_default();
            // Zeroed only where it grows: a recycled piece is overwritten.
            piece.resize(AHEAD_PIECE, 0);
            let mut filled = 0;
            // Fill the piece (age hands out at most one 64 KiB chunk a read).
            let read = loop {
                match inner.read(&mut piece[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == piece.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            piece.truncate(filled);
            observer.observe(&piece);
            let last = filled < AHEAD_PIECE;
            if filled > 0 && tx.send(Ok(piece)).is_err() {
                break;
            }
            if let Err(e) = read {
                let _ = tx.send(Err(e));
                break;
            }
            if last {
                // The end: an empty piece says so.
                let _ = tx.send(Ok(Vec::new()));
                break;
            }
        }
        observer
    });
    let mut reader = PieceReader::new(rx, false, what);
    reader.recycle = Some(back_tx);
    (reader, handle)
}

/// A stream of owned pieces: the bytes go along the archive writer's stages by reference
/// (hashing, walking, compressing), copied once, into the compressor's block.
pub trait Pieces {
    /// The next piece (never empty), or `None` at the end.
    fn next_piece(&mut self) -> io::Result<Option<bytes::Bytes>>;
}

/// Pieces of up to `PIECE` bytes read from a `Read` (a db file). The buffer is reused once
/// the pieces handed out before are dropped.
pub struct ReadPieces<R> {
    inner: R,
    buf: bytes::BytesMut,
}

/// Bytes per piece read from a file.
const PIECE: usize = 1 << 20;

impl<R: Read> ReadPieces<R> {
    pub fn new(inner: R) -> ReadPieces<R> {
        ReadPieces {
            inner,
            buf: bytes::BytesMut::new(),
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Pieces for ReadPieces<R> {
    fn next_piece(&mut self) -> io::Result<Option<bytes::Bytes>> {
        self.buf.clear();
        self.buf.resize(PIECE, 0);
        let mut got = 0;
        while got < PIECE {
            match self.inner.read(&mut self.buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.truncate(got);
        Ok((got > 0).then(|| self.buf.split().freeze()))
    }
}

impl<P: Pieces + ?Sized> Pieces for &mut P {
    fn next_piece(&mut self) -> io::Result<Option<bytes::Bytes>> {
        (**self).next_piece()
    }
}
