//! The progress line of a long-running command (training, evaluation,
//! indexing, packing): `label done/total [=====     ] details 12.3 samples/s
//! ETA 45s` on stderr. On a terminal it is redrawn in place; on a pipe or a
//! file (CI logs, `… > log`) it is printed as whole lines, only when due, so
//! logs stay readable.

use std::io::{IsTerminal, Write};
use std::time::Instant;

const BAR_WIDTH: usize = 24;

#[derive(Debug)]
pub struct Progress {
    label: String,
    total: Option<u64>,
    unit: &'static str,
    started: Instant,
    terminal: bool,
    /// The last tenth of the total printed off a terminal.
    printed_tenth: Option<u64>,
    drawn: bool,
    /// Items counted through [`Progress::advance`].
    done: u64,
}

impl Progress {
    /// A line for `total` items (unknown: `None`), counting `samples/s`.
    pub fn new(label: impl Into<String>, total: Option<u64>) -> Self {
        Self {
            label: label.into(),
            total,
            unit: "samples",
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            printed_tenth: None,
            drawn: false,
            done: 0,
        }
    }

    /// What the rate counts (`samples` by default).
    pub fn counting(mut self, unit: &'static str) -> Self {
        self.unit = unit;
        self
    }

    /// Seconds since the line was made.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The line after `done` items; `rate` overrides `done / elapsed`
    /// (a training run counts steps but reports samples per second).
    pub fn line(&self, done: u64, details: &str, rate: Option<f64>) -> String {
        let elapsed = self.elapsed();
        let rate = rate.unwrap_or(done as f64 / elapsed.max(1e-9));
        let mut line = self.label.clone();
        match self.total {
            Some(total) => {
                let filled = ((done as f64 / total.max(1) as f64) * BAR_WIDTH as f64) as usize;
                let filled = filled.min(BAR_WIDTH);
                line.push_str(&format!(
                    " {done}/{total} [{}{}]",
                    "=".repeat(filled),
                    " ".repeat(BAR_WIDTH - filled)
                ));
            }
            None => line.push_str(&format!(" {done}")),
        }
        if !details.is_empty() {
            line.push(' ');
            line.push_str(details);
        }
        line.push_str(&format!(" {} {}/s", significant(rate), self.unit));
        if let Some(total) = self.total.filter(|_| done > 0) {
            let eta = elapsed / done as f64 * total.saturating_sub(done) as f64;
            line.push_str(&format!(" ETA {eta:.0}s"));
        }
        line
    }

    /// Redraws on a terminal; off a terminal prints at each tenth of the
    /// total and at the end (with no total: every call).
    pub fn update(&mut self, done: u64, details: &str, rate: Option<f64>) {
        if self.terminal {
            return self.draw(done, details, rate);
        }
        let tenth = self.total.map(|total| done * 10 / total.max(1));
        let finished = self.total.is_some_and(|total| done >= total);
        if tenth.is_none() || tenth != self.printed_tenth || finished {
            self.printed_tenth = tenth;
            self.emit(done, details, rate);
        }
    }

    /// Counts `count` more items done and [`Progress::update`]s the line.
    pub fn advance(&mut self, count: u64) {
        self.done += count;
        self.update(self.done, "", None);
    }

    /// Redraws on a terminal; prints nothing elsewhere.
    pub fn redraw(&mut self, done: u64, details: &str, rate: Option<f64>) {
        if self.terminal {
            self.draw(done, details, rate);
        }
    }

    /// Redraws on a terminal, prints a line elsewhere (a logged step).
    pub fn print(&mut self, done: u64, details: &str, rate: Option<f64>) {
        self.emit(done, details, rate);
    }

    /// Ends the line (on a terminal) and returns the seconds it ran.
    pub fn finish(&mut self) -> f64 {
        if self.terminal && self.drawn {
            eprintln!();
            self.drawn = false;
        }
        self.elapsed()
    }

    fn emit(&mut self, done: u64, details: &str, rate: Option<f64>) {
        if self.terminal {
            self.draw(done, details, rate);
        } else {
            eprintln!("{}", self.line(done, details, rate));
        }
    }

    fn draw(&mut self, done: u64, details: &str, rate: Option<f64>) {
        eprint!("\r{}   ", self.line(done, details, rate));
        self.drawn = true;
        if self.total.is_some_and(|total| done >= total) {
            eprintln!();
            self.drawn = false;
        }
        let _ = std::io::stderr().flush();
    }
}

/// A rate with about three significant digits (`0.123`, `12.3`, `4567`).
fn significant(value: f64) -> String {
    match value.abs() {
        magnitude if magnitude >= 100.0 || magnitude == 0.0 => format!("{value:.0}"),
        magnitude if magnitude >= 10.0 => format!("{value:.1}"),
        magnitude if magnitude >= 1.0 => format!("{value:.2}"),
        _ => format!("{value:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_the_bar_the_details_the_rate_and_the_eta() {
        let progress = Progress::new("step", Some(200));
        let line = progress.line(100, "loss_laion 3.7100", Some(47.25));
        assert!(
            line.starts_with(
                "step 100/200 [============            ] loss_laion 3.7100 47.2 samples/s ETA "
            ),
            "{line}"
        );
        let unknown = Progress::new("indexed", None).counting("shards");
        let line = unknown.line(7, "", Some(0.5));
        assert_eq!(line, "indexed 7 0.500 shards/s");
        // Nothing done yet: no ETA to guess.
        assert!(!progress.line(0, "", Some(0.0)).contains("ETA"));
        assert_eq!(significant(4567.4), "4567");
        assert_eq!(significant(1.234), "1.23");
    }
}
