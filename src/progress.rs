//! Progress of a long transfer in bytes: `action-log` about every 10% under Juju, a bar with
//! bytes, rate and ETA when stderr is a terminal, plain timestamped lines otherwise.

use std::io::{IsTerminal, Read};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::human_size;
use crate::juju::Reporter;

enum Shown {
    /// Lines through the reporter (`action-log`, or timestamped on stderr), every 10%.
    Lines {
        next: u64,
    },
    Bar(ProgressBar),
}

pub struct Progress<'a> {
    reporter: &'a Reporter,
    what: String,
    total: u64,
    done: u64,
    shown: Shown,
    started: Instant,
}

impl<'a> Progress<'a> {
    /// Progress of `what` over `total` bytes. The bar is drawn only standalone with stderr on
    /// a terminal (`ETCD_ACTIONS_PROGRESS=lines` forces lines, `=bar` the bar).
    pub fn new(reporter: &'a Reporter, what: &str, total: u64) -> Progress<'a> {
        let mode = std::env::var("ETCD_ACTIONS_PROGRESS").unwrap_or_default();
        let bar = !reporter.is_juju()
            && mode != "lines"
            && (mode == "bar" || std::io::stderr().is_terminal());
        let shown = if bar {
            let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            pb.set_message(what.to_string());
            pb.enable_steady_tick(Duration::from_millis(200));
            Shown::Bar(pb)
        } else {
            Shown::Lines { next: 10 }
        };
        Progress {
            reporter,
            what: what.to_string(),
            total: total.max(1),
            done: 0,
            shown,
            started: Instant::now(),
        }
    }

    pub fn advance(&mut self, n: u64) {
        self.done += n;
        match &mut self.shown {
            Shown::Bar(pb) => pb.set_position(self.done.min(self.total)),
            Shown::Lines { next } => {
                let pct = self.done.saturating_mul(100) / self.total;
                if pct >= *next && *next <= 100 {
                    let secs = self.started.elapsed().as_secs_f64().max(0.001);
                    let rate = (self.done as f64 / secs) as u64;
                    self.reporter.log(&format!(
                        "{}: {pct}% ({} of {}, {}/s)",
                        self.what,
                        human_size(self.done),
                        human_size(self.total),
                        human_size(rate)
                    ));
                    *next = (pct / 10 + 1) * 10;
                }
            }
        }
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        if let Shown::Bar(pb) = &self.shown {
            if self.done >= self.total {
                pb.finish();
            } else {
                pb.abandon();
            }
        }
    }
}

/// A `Read` or a stream of pieces that reports what goes through it.
pub struct Counted<'a, R> {
    pub inner: R,
    pub progress: Progress<'a>,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

impl<P: crate::pipe::Pieces> crate::pipe::Pieces for Counted<'_, P> {
    fn next_piece(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        let piece = self.inner.next_piece()?;
        if let Some(p) = &piece {
            self.progress.advance(p.len() as u64);
        }
        Ok(piece)
    }
}
