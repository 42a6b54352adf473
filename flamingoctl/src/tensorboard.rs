//! TensorBoard event files from a job's stored metrics, so `tensorboard
//! --logdir DIR` shows a flamingo job: TFRecord framing (length, masked
//! CRC-32C of the length, the record, masked CRC-32C of the record) around
//! `Event` protos with scalar summaries, as TensorFlow's `EventsWriter`
//! writes them.
//!
//! One run per rank (`<dir>/rank-<r>/`), so TensorBoard overlays the ranks'
//! curves of a tag and sees each rank's steps in order (a restart rewinds
//! them; TensorBoard then drops the abandoned points past the resume step,
//! as it does for any resumed run). Tags: the job-wide values rank 0 reports
//! as `train/<name>` (`train/loss_laion`, `train/lr`, …); every rank's own
//! measurements under their names (`step_seconds`, `memory_bytes`, …).

use std::io::Write;
use std::path::{Path, PathBuf};

use flamingo_proto::v1::MetricPoint;

/// `tensorflow.Event`, the fields written here.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// Rank 0's values that describe the whole job (the rest are per rank).
const JOB_WIDE: [&str; 7] = [
    "loss_laion",
    "loss_mmc4",
    "lr",
    "grad_norm",
    "samples_per_second",
    "tokens_per_second",
    "skipped_steps",
];

/// The tag a stored value is written under.
pub fn tag(rank: u32, name: &str) -> String {
    if rank == 0 && JOB_WIDE.contains(&name) {
        format!("train/{name}")
    } else {
        name.to_string()
    }
}

/// Benchmark scores as points, in step order (TensorBoard drops points
/// that go back in step): `eval/coco/4_shots` (`eval/coco_rices/…`
/// with RICES demonstrations), a report's latest score per step and tag.
pub fn eval_points(reports: &[flamingo_proto::v1::EvalReport]) -> Vec<MetricPoint> {
    let mut by_step: std::collections::BTreeMap<u64, MetricPoint> = Default::default();
    for report in reports {
        let point = by_step.entry(report.step).or_insert_with(|| MetricPoint {
            step: report.step,
            rank: 0,
            attempt: 0,
            unix_ms: report.unix_ms,
            values: Default::default(),
        });
        point.unix_ms = point.unix_ms.max(report.unix_ms);
        let benchmark = if report.selection == "RICES" {
            format!("{}_rices", report.dataset)
        } else {
            report.dataset.clone()
        };
        for score in &report.scores {
            point.values.insert(
                format!("eval/{benchmark}/{}_shots", score.shots),
                score.mean,
            );
        }
    }
    by_step.into_values().collect()
}

/// Writes a job's benchmark scores as their own run, `<job_dir>/eval/`,
/// beside the ranks': in a rank's run their steps would go back, and
/// TensorBoard would purge the curves after them. Returns the points
/// written (one per evaluated step).
pub fn write_evals(
    job_dir: &Path,
    reports: &[flamingo_proto::v1::EvalReport],
) -> anyhow::Result<usize> {
    if reports.is_empty() {
        return Ok(0);
    }
    EventWriter::create(&job_dir.join("eval"))?.write_points(&eval_points(reports))
}

/// CRC-32C (Castagnoli), bitwise-reflected, as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (index, slot) in table.iter_mut().enumerate() {
            let mut crc = index as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
            *slot = crc;
        }
        table
    });
    let mut crc = !0u32;
    for byte in data {
        crc = table[((crc ^ u32::from(*byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// An open event file; records are appended and flushed per batch.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// A new `events.out.tfevents.<time>.<host>.flamingo` file in `dir`.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|error| anyhow::anyhow!("creating {}: {error}", dir.display()))?;
        let now = flamingo_common::unix_seconds();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.flamingo",
            now as u64
        ));
        let file = std::fs::File::create(&path)
            .map_err(|error| anyhow::anyhow!("creating {}: {error}", path.display()))?;
        let mut writer = Self { file, path };
        writer.write_event(&Event {
            wall_time: now,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(writer)
    }

    fn write_event(&mut self, event: &Event) -> anyhow::Result<()> {
        let data = prost::Message::encode_to_vec(event);
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc(&length).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file
            .write_all(&record)
            .map_err(|error| anyhow::anyhow!("writing {}: {error}", self.path.display()))
    }

    /// One event per point, a scalar per value (non-finite values too:
    /// TensorBoard shows them as gaps).
    pub fn write_points(&mut self, points: &[MetricPoint]) -> anyhow::Result<usize> {
        let mut written = 0;
        for point in points {
            let mut names: Vec<(&String, &f64)> = point.values.iter().collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            let value = names
                .into_iter()
                .map(|(name, value)| SummaryValue {
                    tag: tag(point.rank, name),
                    simple_value: Some(*value as f32),
                })
                .collect();
            self.write_event(&Event {
                wall_time: point.unix_ms as f64 / 1000.0,
                step: point.step as i64,
                file_version: None,
                summary: Some(Summary { value }),
            })?;
            written += 1;
        }
        self.file
            .flush()
            .map_err(|error| anyhow::anyhow!("writing {}: {error}", self.path.display()))?;
        Ok(written)
    }
}

/// A job's event files: one writer per rank, made as ranks appear.
pub struct JobEvents {
    dir: PathBuf,
    writers: std::collections::BTreeMap<u32, EventWriter>,
}

impl JobEvents {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            writers: std::collections::BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn write_points(&mut self, points: &[MetricPoint]) -> anyhow::Result<usize> {
        let mut written = 0;
        let mut ranks: Vec<u32> = points.iter().map(|point| point.rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        for rank in ranks {
            let writer = match self.writers.entry(rank) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(EventWriter::create(&self.dir.join(format!("rank-{rank}")))?)
                }
            };
            let mine: Vec<MetricPoint> = points
                .iter()
                .filter(|point| point.rank == rank)
                .cloned()
                .collect();
            written += writer.write_points(&mine)?;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn eval_reports_become_rank_0_points_in_step_order() {
        use flamingo_proto::v1::{EvalReport, EvalScore};
        let report = |step: u64, selection: &str, mean: f64, unix_ms: i64| EvalReport {
            job_id: "job".to_string(),
            step,
            dataset: "coco".to_string(),
            metric: "CIDEr".to_string(),
            selection: selection.to_string(),
            scores: vec![EvalScore {
                shots: 4,
                mean,
                stddev: 0.0,
                trials: vec![mean],
            }],
            samples: 8,
            checkpoint: String::new(),
            unix_ms,
            rank_token: String::new(),
        };
        let points = eval_points(&[
            report(80, "random", 1.0, 10),
            report(40, "random", 2.0, 20),
            report(80, "RICES", 3.0, 30),
            report(80, "random", 4.0, 40),
        ]);
        let steps: Vec<u64> = points.iter().map(|p| p.step).collect();
        assert_eq!(steps, vec![40, 80]);
        assert_eq!(points[0].values["eval/coco/4_shots"], 2.0);
        assert_eq!(
            points[1].values["eval/coco/4_shots"], 4.0,
            "the latest report wins"
        );
        assert_eq!(points[1].values["eval/coco_rices/4_shots"], 3.0);
        assert_eq!(points[1].unix_ms, 40);
        assert_eq!(tag(0, "eval/coco/4_shots"), "eval/coco/4_shots");
    }

    #[test]
    fn tags_separate_job_wide_and_per_rank_values() {
        assert_eq!(tag(0, "loss_laion"), "train/loss_laion");
        assert_eq!(tag(0, "step_seconds"), "step_seconds");
        assert_eq!(tag(3, "memory_bytes"), "memory_bytes");
    }
}
