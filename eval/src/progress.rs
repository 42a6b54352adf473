//! The progress line of a running evaluation.

use std::io::Write;
use std::time::Instant;

/// A progress line on stderr: redrawn on a terminal, every tenth of the way
/// otherwise.
pub(crate) struct Progress {
    label: String,
    total: usize,
    done: usize,
    started: Instant,
    terminal: bool,
    last_tenth: usize,
}

impl Progress {
    pub(crate) fn new(label: String, total: usize) -> Self {
        use std::io::IsTerminal;
        Self {
            label,
            total,
            done: 0,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            last_tenth: 0,
        }
    }

    pub(crate) fn advance(&mut self, count: usize) {
        self.done += count;
        let tenth = self.done * 10 / self.total.max(1);
        if !self.terminal && tenth == self.last_tenth && self.done < self.total {
            return;
        }
        self.last_tenth = tenth;
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / elapsed.max(1e-9);
        let eta = (self.total - self.done.min(self.total)) as f64 / rate.max(1e-9);
        let width = 24;
        let filled = (self.done * width / self.total.max(1)).min(width);
        let line = format!(
            "{} {}/{} [{}{}] {rate:.2} samples/s ETA {eta:.0}s",
            self.label,
            self.done,
            self.total,
            "=".repeat(filled),
            " ".repeat(width - filled)
        );
        if self.terminal {
            eprint!("\r{line}   ");
            if self.done >= self.total {
                eprintln!();
            }
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    }
}
