//! What a rank tells about its steps: rank 0's progress line and
//! `log.jsonl`, every rank's metrics to the coordinator (through the
//! [`super::ClusterLink`]), the sample audit, and the memory report at the
//! end.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use flamingo_common::progress::Progress;
use flamingo_common::train::TrainJob;
use flamingo_data::sample::{RejectReason, Skipped};
use serde_json::json;

use super::feed::Fetched;
use super::ClusterLink;
use crate::batch::TrainBatch;
use crate::flops::FlopModel;
use crate::trainer::{StepReport, Trainer};

/// What one optimizer step of this rank took, measured across its
/// micro-batches.
pub(crate) struct StepMeter {
    started: Instant,
    pub(crate) data_wait: f64,
    samples: usize,
    tokens: f64,
    flops: f64,
    /// Per dataset seen this step (`laion`, `mmc4`): the samples skipped.
    pub(crate) skipped: Vec<(&'static str, Vec<Skipped>)>,
}

pub(crate) struct Measured {
    values: Vec<(&'static str, f64)>,
    skipped: Vec<(&'static str, Vec<Skipped>)>,
}

impl StepMeter {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            data_wait: 0.0,
            samples: 0,
            tokens: 0.0,
            flops: 0.0,
            skipped: Vec::new(),
        }
    }

    /// Notes a dataset's batch of this step and the samples it skipped.
    pub(crate) fn skipped(&mut self, dataset: &'static str, skipped: &[Skipped]) {
        match self.skipped.iter_mut().find(|(name, _)| *name == dataset) {
            Some((_, list)) => list.extend(skipped.iter().cloned()),
            None => self.skipped.push((dataset, skipped.to_vec())),
        }
    }

    pub(crate) fn count(&mut self, batch: &TrainBatch, flops: &FlopModel) {
        let images = batch.vision_x.size();
        let tokens = batch.input_ids.size();
        self.samples += batch.samples;
        self.tokens += (tokens[0] * tokens[1]) as f64;
        self.flops += flops.batch_flops(tokens[0] as f64, images[1] as f64, tokens[1] as f64);
    }

    /// The step's metrics; the meter starts over for the next step.
    /// Throughput is global (this rank's count × world: every rank's
    /// batches have the same shape).
    pub(crate) fn finish(&mut self, peak_tflops: f64, world: usize) -> Measured {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let achieved = self.flops / seconds;
        let mut values = vec![
            ("step_seconds", seconds),
            ("data_wait_seconds", self.data_wait),
            (
                "samples_per_second",
                (self.samples * world) as f64 / seconds,
            ),
            ("tokens_per_second", self.tokens * world as f64 / seconds),
            ("model_tflops", achieved / 1e12),
        ];
        if peak_tflops > 0.0 {
            values.push(("mfu", achieved / (peak_tflops * 1e12)));
        }
        if let Some(bytes) = resident_bytes() {
            values.push(("memory_bytes", bytes));
        }
        let skipped = std::mem::take(&mut self.skipped);
        *self = Self::new();
        Measured { values, skipped }
    }
}

/// This process's resident memory (`/proc/self/statm`).
fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as f64)
}

/// Rank 0's progress line and `log.jsonl`, and every rank's reports to the
/// coordinator.
pub(crate) struct Reporter<'a> {
    rank: usize,
    link: Option<&'a dyn ClusterLink>,
    logging_steps: u64,
    end: u64,
    progress: Progress,
    log: Option<std::fs::File>,
    /// Samples per second over the whole run so far (since this start).
    window: (Instant, usize),
    per_step_samples: usize,
    /// Samples of a step's global batch (LAION, MMC4), accumulation
    /// included.
    global_batch: (usize, usize),
    /// Rank 0: each dataset's skipped samples per step, recent steps.
    skip_history: Vec<(&'static str, std::collections::VecDeque<usize>)>,
    /// Rank 0: examples sent of each (dataset is LAION, reason), this start.
    examples_sent: std::collections::HashMap<(bool, RejectReason), usize>,
}

/// Skipped samples sent as examples per dataset and reason (the dashboard
/// keeps a few per reason; counts travel as series).
const EXAMPLES_PER_REASON: usize = 3;

macro_rules! skip_series {
    ($($reason:ident => $name:literal),* $(,)?) => {
        /// The series of one dataset's skipped samples of one reason.
        fn skip_series(laion: bool, reason: RejectReason) -> &'static str {
            match (laion, reason) {
                $(
                    (true, RejectReason::$reason) => concat!("skipped_laion.", $name),
                    (false, RejectReason::$reason) => concat!("skipped_mmc4.", $name),
                )*
            }
        }
    };
}

skip_series! {
    MissingImage => "missing_image",
    MissingText => "missing_text",
    MissingJson => "missing_json",
    BadText => "bad_text",
    BadJson => "bad_json",
    BadBase64 => "bad_base64",
    BadImage => "bad_image",
    NoImages => "no_images",
    TooFewImages => "too_few_images",
    SingleImageDropped => "single_image_dropped",
    ImageAtEnd => "image_at_end",
    BadTar => "bad_tar",
}

/// A step's skipped samples in a line: a count per reason and the first
/// few samples (`shard key: reason`).
fn summarise_skips(skipped: &[Skipped]) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for skip in skipped {
        *counts.entry(skip.reject.reason.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect();
    let shown: Vec<String> = skipped
        .iter()
        .take(3)
        .map(|skip| format!("{} {}: {}", skip.shard, skip.key, skip.reject.reason))
        .collect();
    format!("{} (e.g. {})", counts.join(", "), shown.join("; "))
}

/// Steps of skip counts kept to judge a step's count against.
const SKIP_HISTORY: usize = 200;

/// Whether `count` skipped samples in a step is unusual against the recent
/// `history`: more than twice its median (and at least 4), once there are
/// 10 steps to compare with. Skips are normal (MMC4 rejects about a third
/// of documents by design), so only a change in their rate is an event.
fn unusual_skips(count: usize, history: &std::collections::VecDeque<usize>) -> Option<f64> {
    if history.len() < 10 || count < 4 {
        return None;
    }
    let mut sorted: Vec<usize> = history.iter().copied().collect();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2] as f64;
    (count as f64 > 2.0 * median).then_some(median)
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(
        job: &TrainJob,
        run_dir: &Path,
        (rank, world): (usize, usize),
        end: u64,
        link: Option<&'a dyn ClusterLink>,
    ) -> anyhow::Result<Self> {
        let log = if rank == 0 {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(run_dir.join("log.jsonl"))?,
            )
        } else {
            None
        };
        let steps = world * job.gradient_accumulation_steps as usize;
        let global_batch = (
            job.batch_size_laion as usize * steps,
            job.batch_size_mmc4 as usize * steps,
        );
        let per_step_samples = (job.batch_size_laion as usize
            * usize::from(job.laion_shards.is_some())
            + job.batch_size_mmc4 as usize * usize::from(job.mmc4_shards.is_some()))
            * world
            * job.gradient_accumulation_steps as usize;
        Ok(Self {
            rank,
            link,
            logging_steps: job.logging_steps.max(1),
            end,
            progress: Progress::new("step", Some(end)),
            log,
            window: (Instant::now(), 0),
            per_step_samples,
            global_batch,
            skip_history: Vec::new(),
            examples_sent: Default::default(),
        })
    }

    /// Rank 0: the progress line, and a `log.jsonl` line per logged step.
    pub(crate) fn step(&mut self, report: &StepReport) -> anyhow::Result<f64> {
        self.window.1 += self.per_step_samples;
        let rate = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64().max(1e-9);
        if self.rank != 0 {
            return Ok(rate);
        }
        let step = report.step;
        let logged = step.is_multiple_of(self.logging_steps) || step == self.end || report.skipped;
        let loss = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.4}"));
        let details = format!(
            "loss_laion {} loss_mmc4 {} lr {:.2e}",
            loss(report.loss_laion),
            loss(report.loss_mmc4),
            report.lr
        );
        // One line per logged step on a pipe or file (CI logs,
        // `flamingoctl train > log`); redrawn in place on a terminal.
        if !logged {
            self.progress.redraw(step, &details, Some(rate));
            return Ok(rate);
        }
        self.progress.print(step, &details, Some(rate));
        if let Some(log) = self.log.as_mut() {
            let line = json!({
                "step": step,
                "loss_laion": report.loss_laion,
                "loss_mmc4": report.loss_mmc4,
                "lr": report.lr,
                "grad_norm": report.grad_norm,
                "samples_per_second": rate,
                "skipped": report.skipped,
                "time": flamingo_common::unix_seconds(),
                "attempt": self.link.map_or(0, |link| link.attempt()),
            });
            writeln!(log, "{line}")?;
        }
        Ok(rate)
    }

    /// The step's metrics to the coordinator (rank 0's with the losses, lr,
    /// grad norm and each dataset's skipped samples: `skipped_laion` and
    /// `skipped_mmc4`, and per reason `skipped_<dataset>.<reason>` when
    /// non-zero), the first few skipped samples of each reason as examples,
    /// and an event on the job's timeline when a dataset skips unusually
    /// many samples (see [`unusual_skips`]).
    pub(crate) fn metrics(&mut self, report: &StepReport, skipped_steps: u64, measured: Measured) {
        let mut values = measured.values;
        let mut unusual = Vec::new();
        let mut examples = Vec::new();
        if self.rank == 0 {
            values.push(("lr", report.lr));
            values.push(("grad_norm", report.grad_norm));
            values.push(("skipped_steps", skipped_steps as f64));
            if let Some(loss) = report.loss_laion {
                values.push(("loss_laion", loss));
            }
            if let Some(loss) = report.loss_mmc4 {
                values.push(("loss_mmc4", loss));
            }
            for (dataset, skipped) in &measured.skipped {
                let laion = *dataset == "laion";
                values.push((
                    if laion {
                        "skipped_laion"
                    } else {
                        "skipped_mmc4"
                    },
                    skipped.len() as f64,
                ));
                // Of the samples this step read (its full global batch and
                // the skipped ones), the fraction skipped.
                let batch = if laion {
                    self.global_batch.0
                } else {
                    self.global_batch.1
                };
                let read = (batch + skipped.len()).max(1);
                values.push((
                    if laion {
                        "skip_rate_laion"
                    } else {
                        "skip_rate_mmc4"
                    },
                    skipped.len() as f64 / read as f64,
                ));
                for reason in RejectReason::ALL {
                    let of_reason = skipped.iter().filter(|skip| skip.reject.reason == reason);
                    let count = of_reason.clone().count();
                    if count > 0 {
                        values.push((skip_series(laion, reason), count as f64));
                    }
                    for skip in of_reason {
                        let sent = self.examples_sent.entry((laion, reason)).or_insert(0);
                        if *sent >= EXAMPLES_PER_REASON {
                            break;
                        }
                        *sent += 1;
                        examples.push((*dataset, skip.clone()));
                    }
                }
                let history = match self
                    .skip_history
                    .iter_mut()
                    .find(|(name, _)| name == dataset)
                {
                    Some((_, history)) => history,
                    None => {
                        self.skip_history.push((dataset, Default::default()));
                        &mut self.skip_history.last_mut().expect("just pushed").1
                    }
                };
                if let Some(median) = unusual_skips(skipped.len(), history) {
                    unusual.push((*dataset, skipped.clone(), median));
                }
                if history.len() == SKIP_HISTORY {
                    history.pop_front();
                }
                history.push_back(skipped.len());
            }
        }
        let Some(link) = self.link else { return };
        link.step(report.step, &values);
        for (dataset, skip) in &examples {
            link.skip_example(report.step, dataset, skip);
        }
        for (dataset, skipped, median) in unusual {
            link.note(
                report.step,
                "samples_skipped",
                format!(
                    "{dataset}: {} samples skipped in one step, over twice the recent median of {median}: {}",
                    skipped.len(),
                    summarise_skips(&skipped)
                ),
            );
        }
    }

    /// Ends the progress line; returns the seconds since this start.
    pub(crate) fn finish(&mut self) -> f64 {
        self.progress.finish()
    }
}

/// Appends one line per micro-batch to `<run>/audit/rank-<r>.jsonl`.
pub(crate) struct Audit {
    file: std::fs::File,
    attempt: u32,
}

impl Audit {
    pub(crate) fn open(run_dir: &Path, rank: usize, attempt: u32) -> anyhow::Result<Self> {
        let dir = run_dir.join("audit");
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("rank-{rank}.jsonl")))?;
        Ok(Self { file, attempt })
    }

    pub(crate) fn record(
        &mut self,
        step: u64,
        dataset: &str,
        fetched: &Fetched,
    ) -> anyhow::Result<()> {
        let line = json!({
            "attempt": self.attempt,
            "step": step,
            "dataset": dataset,
            "epoch": fetched.epoch,
            "keys": fetched.keys,
        });
        writeln!(self.file, "{line}")?;
        Ok(())
    }
}

/// This process's peak resident memory so far (`VmHWM`), in bytes.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let value = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))?;
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The peak so far, then the peak starts again from the memory resident
/// now (`/proc/self/clear_refs` 5), so that a later [`peak_rss`] is the
/// peak of what came after.
pub(crate) fn restart_peak_rss() -> u64 {
    let peak = peak_rss();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    peak
}

/// Bytes this process has read through `read`-family calls so far
/// (`rchar` of `/proc/self/io`: files, whether or not the page cache held
/// them, and sockets).
pub fn read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|line| line.strip_prefix("rchar:"))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What loading the model (and resuming) cost this rank: its peak
/// resident memory, the bytes it read and the seconds it took.
pub(crate) struct LoadCost {
    pub(crate) peak_rss: u64,
    pub(crate) read_bytes: u64,
    pub(crate) seconds: f64,
}

/// `<run>/memory-rank-<r>.json`, for `bench/train-memory.sh`: what this
/// rank held; the load's peak (loading the model) measured apart from the
/// steps' own, with the bytes it read and its time.
pub(crate) fn write_memory_report(
    run_dir: &Path,
    job: &TrainJob,
    (rank, world): (usize, usize),
    trainer: &Trainer<'_>,
    load: &LoadCost,
) -> anyhow::Result<()> {
    let load_peak_rss = load.peak_rss;
    let step_peak_rss = peak_rss();
    let memory = trainer.memory();
    std::fs::write(
        run_dir.join(format!("memory-rank-{rank}.json")),
        json!({
            "rank": rank,
            "world_size": world,
            "strategy": job.fsdp_sharding_strategy,
            "trainable_parameters": trainer.parameter_count(),
            "gradient_checkpointing": job.gradient_checkpointing,
            "recompute_policy": job.recompute(),
            "parameter_bytes": memory.parameter_bytes,
            "gradient_bytes": memory.gradient_bytes,
            "optimizer_bytes": memory.optimizer_bytes,
            "frozen_bytes": memory.frozen_bytes,
            "gathered_peak_bytes": memory.gathered_peak_bytes,
            "peak_rss_bytes": step_peak_rss.max(load_peak_rss),
            "load_peak_rss_bytes": load_peak_rss,
            "step_peak_rss_bytes": step_peak_rss,
            "load_read_bytes": load.read_bytes,
            "load_seconds": load.seconds,
        })
        .to_string(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_series_named_by_its_stable_name() {
        for reason in RejectReason::ALL {
            assert_eq!(
                skip_series(true, reason),
                format!("skipped_laion.{}", reason.as_str())
            );
            assert_eq!(
                skip_series(false, reason),
                format!("skipped_mmc4.{}", reason.as_str())
            );
        }
    }

    #[test]
    fn only_a_change_in_the_skip_rate_is_unusual() {
        let mut history: std::collections::VecDeque<usize> = [3, 2, 3, 4, 3].into();
        assert_eq!(unusual_skips(20, &history), None, "too little history");
        history.extend([3, 2, 3, 3, 4]);
        // A third of MMC4 rejected at every step is the normal rate.
        assert_eq!(unusual_skips(4, &history), None);
        assert_eq!(unusual_skips(6, &history), None);
        assert_eq!(unusual_skips(7, &history), Some(3.0));
        // A quiet dataset: a few skips are not worth an event.
        let quiet: std::collections::VecDeque<usize> = [0; 20].into();
        assert_eq!(unusual_skips(3, &quiet), None);
        assert_eq!(unusual_skips(4, &quiet), Some(0.0));
    }
}
