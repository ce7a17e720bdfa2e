//! Pieces of a stream handed from the thread that produces them to a `Read`: the object
//! download and the decryption both run ahead of their reader this way.

use std::io::{self, Read};
use std::sync::mpsc::Receiver;

/// Reads the pieces a producer thread sends. An empty piece ends the stream; so does the
/// producer's end when `end_on_hangup` (otherwise that is an error: the producer stopped
/// before saying the stream ended).
pub struct PieceReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    piece: Vec<u8>,
    pos: usize,
    done: bool,
    end_on_hangup: bool,
    what: &'static str,
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
        }
    }
}

impl Read for PieceReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.piece.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(p)) if p.is_empty() => self.done = true,
                Ok(Ok(p)) => {
                    self.piece = p;
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
        let n = out.len().min(self.piece.len() - self.pos);
        out[..n].copy_from_slice(&self.piece[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
