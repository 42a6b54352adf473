//! Jobs' metric reports and timeline events, kept durably outside etcd: per
//! job one JSON-lines file of points (`<job>.jsonl`) and one of events
//! (`<job>.events.jsonl`) under the metrics folder, appended as reports
//! arrive. A restarted coordinator finds everything its predecessor stored.
//!
//! For the dashboard each job's curves are also held in memory, column by
//! column (loaded from the file the first time the job is asked for), so a
//! query over a million points is a scan of compact arrays, downsampled on
//! the server before it is sent.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use flamingo_common::EventKind;
use flamingo_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// One report of one rank at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub step: u64,
    pub rank: u32,
    pub attempt: u32,
    pub unix_ms: i64,
    pub values: BTreeMap<String, f64>,
}

impl From<&Point> for pb::MetricPoint {
    fn from(point: &Point) -> Self {
        pb::MetricPoint {
            step: point.step,
            rank: point.rank,
            attempt: point.attempt,
            unix_ms: point.unix_ms,
            values: point.values.clone().into_iter().collect(),
        }
    }
}

/// A mark on a job's timeline: a job event of the coordinator's (launch,
/// restart, checkpoint, …) or a note a rank sent (samples skipped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub unix_ms: i64,
    pub kind: EventKind,
    pub message: String,
    /// The job event's sequence number (none for ranks' notes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    #[serde(default)]
    pub attempt: u32,
}

/// One benchmark's scores on one checkpoint of the job (`flamingoctl eval
/// --job`), as OpenFlamingo's results JSON holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub unix_ms: i64,
    pub dataset: String,
    pub metric: String,
    pub selection: String,
    pub scores: Vec<EvalScore>,
    pub samples: u64,
    pub checkpoint: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalScore {
    pub shots: u64,
    pub mean: f64,
    pub stddev: f64,
    pub trials: Vec<f64>,
}

impl From<pb::EvalReport> for EvalRecord {
    fn from(report: pb::EvalReport) -> Self {
        EvalRecord {
            step: report.step,
            unix_ms: report.unix_ms,
            dataset: report.dataset,
            metric: report.metric,
            selection: report.selection,
            scores: report
                .scores
                .into_iter()
                .map(|score| EvalScore {
                    shots: score.shots,
                    mean: score.mean,
                    stddev: score.stddev,
                    trials: score.trials,
                })
                .collect(),
            samples: report.samples,
            checkpoint: report.checkpoint,
        }
    }
}

impl EvalRecord {
    pub fn to_proto(&self, job_id: &str) -> pb::EvalReport {
        pb::EvalReport {
            job_id: job_id.to_string(),
            step: self.step,
            dataset: self.dataset.clone(),
            metric: self.metric.clone(),
            selection: self.selection.clone(),
            scores: self
                .scores
                .iter()
                .map(|score| pb::EvalScore {
                    shots: score.shots,
                    mean: score.mean,
                    stddev: score.stddev,
                    trials: score.trials.clone(),
                })
                .collect(),
            samples: self.samples,
            checkpoint: self.checkpoint.clone(),
            rank_token: String::new(),
            unix_ms: self.unix_ms,
        }
    }

    /// The timeline's line for it: `coco CIDEr (random) at step 40: 0 shots
    /// 115.2, 4 shots 115.5`.
    pub fn summary(&self) -> String {
        let scores: Vec<String> = self
            .scores
            .iter()
            .map(|score| format!("{} shots {:.4}", score.shots, score.mean))
            .collect();
        format!(
            "{} {} ({}) at step {}: {}",
            self.dataset,
            self.metric,
            self.selection,
            self.step,
            scores.join(", ")
        )
    }
}

/// A sample the data pipeline skipped, kept as an example of its reason
/// (a few per dataset and reason; the counts are the ranks' series).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkipExample {
    pub step: u64,
    pub attempt: u32,
    pub dataset: String,
    pub reason: String,
    pub shard: String,
    pub key: String,
    pub detail: String,
}

/// Examples kept per dataset and reason.
pub const SKIP_EXAMPLES_PER_REASON: usize = 5;

/// One dataset's skipped samples of one reason, over the job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkipReason {
    pub dataset: String,
    pub reason: String,
    /// Samples skipped for this reason by the steps the job kept (a step
    /// that a restart ran again counts once, as its latest run).
    pub count: u64,
    pub examples: Vec<SkipExample>,
}

/// One value of a curve, as held in memory (32 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub step: u64,
    pub unix_ms: i64,
    pub value: f64,
    pub attempt: u16,
}

/// One curve: a metric of one rank.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    pub name: String,
    pub rank: u32,
}

#[derive(Debug, Default)]
struct JobCache {
    series: BTreeMap<SeriesKey, Vec<Sample>>,
    events: Vec<StoredEvent>,
    evals: Vec<EvalRecord>,
    skip_examples: Vec<SkipExample>,
    points: u64,
}

impl JobCache {
    fn add(&mut self, point: &Point) {
        self.points += 1;
        for (name, value) in &point.values {
            let key = SeriesKey {
                name: name.clone(),
                rank: point.rank,
            };
            self.series.entry(key).or_default().push(Sample {
                step: point.step,
                unix_ms: point.unix_ms,
                value: *value,
                attempt: point.attempt.min(u32::from(u16::MAX)) as u16,
            });
        }
    }
}

/// What a query asks for.
#[derive(Debug, Clone, Default)]
pub struct SeriesQuery {
    /// Metric names to return (all when empty).
    pub names: Vec<String>,
    /// Ranks to return (all when empty).
    pub ranks: Vec<u32>,
    /// At most about this many points per curve (0: all).
    pub max_points: usize,
}

/// One curve as a query returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesOut {
    pub name: String,
    pub rank: u32,
    /// Stored points of the curve.
    pub total: usize,
    /// `[step, unix_ms, value, attempt]`, in arrival order; fewer than
    /// `total` when downsampled.
    pub points: Vec<(u64, i64, f64, u16)>,
}

/// What the Prometheus endpoint shows about a job's curves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub points: u64,
    /// Rank 0's latest value of each metric.
    pub latest: BTreeMap<String, f64>,
    /// Steps per second over the last minute of rank 0's reports.
    pub step_rate: Option<f64>,
    /// Reports the ranks could not send (sum of their latest counters).
    pub dropped: u64,
}

pub struct MetricsStore {
    dir: PathBuf,
    /// Serialises appends to the files.
    write: Mutex<()>,
    cache: Mutex<HashMap<String, Cached>>,
}

/// A job's curves in memory and when they were last read or appended to.
struct Cached {
    job: Arc<RwLock<JobCache>>,
    used: Arc<std::sync::atomic::AtomicU64>,
}

impl MetricsStore {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            write: Mutex::new(()),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn safe(job_id: &str) -> String {
        // Job ids are generated by the coordinator; refuse anything that
        // could leave the folder.
        job_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect()
    }

    fn points_path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{}.jsonl", Self::safe(job_id)))
    }

    fn events_path(&self, job_id: &str) -> PathBuf {
        self.dir
            .join(format!("{}.events.jsonl", Self::safe(job_id)))
    }

    fn record_path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{}.job.jsonl", Self::safe(job_id)))
    }

    /// Keeps a finished job's final record with its curves (one JSON line,
    /// written durably; the archive syncs it like the curves), before the
    /// job leaves etcd.
    pub fn archive_job(&self, job: &flamingo_common::JobRecord) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.record_path(job.id.as_str());
        let temporary = path.with_extension("jsonl.tmp");
        {
            let mut file = std::fs::File::create(&temporary)?;
            let mut line = serde_json::to_vec(job)?;
            line.push(b'\n');
            std::io::Write::write_all(&mut file, &line)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// A job's archived record, if it left etcd after its retention.
    pub fn archived_job(&self, job_id: &str) -> Option<flamingo_common::JobRecord> {
        let text = std::fs::read_to_string(self.record_path(job_id)).ok()?;
        serde_json::from_str(text.lines().next()?).ok()
    }

    fn skips_path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{}.skips.jsonl", Self::safe(job_id)))
    }

    fn evals_path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{}.evals.jsonl", Self::safe(job_id)))
    }

    /// The job's in-memory curves, loaded from its files the first time.
    fn job(&self, job_id: &str) -> std::io::Result<Arc<RwLock<JobCache>>> {
        let key = Self::safe(job_id);
        if let Some(cached) = lock(&self.cache).get(&key) {
            cached.used.store(
                flamingo_common::unix_seconds() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            return Ok(cached.job.clone());
        }
        // Load outside the map's lock (a big job takes a moment); a racing
        // loader's copy is dropped.
        let mut loaded = JobCache::default();
        for point in read_lines::<Point>(&self.points_path(job_id))? {
            loaded.add(&point);
        }
        loaded.events = read_lines(&self.events_path(job_id))?;
        loaded.evals = read_lines(&self.evals_path(job_id))?;
        loaded.skip_examples = read_lines(&self.skips_path(job_id))?;
        let _writer = lock(&self.write);
        let mut cache = lock(&self.cache);
        Ok(cache
            .entry(key)
            .or_insert_with(|| Cached {
                job: Arc::new(RwLock::new(loaded)),
                used: Arc::new(std::sync::atomic::AtomicU64::new(
                    flamingo_common::unix_seconds() as u64,
                )),
            })
            .job
            .clone())
    }

    /// Drops from memory the curves of jobs nobody reported to or looked at
    /// for `idle` (their files stay; the next look loads them again).
    /// Returns how many were dropped.
    pub fn evict_idle(&self, idle: std::time::Duration) -> usize {
        let _writer = lock(&self.write);
        let mut cache = lock(&self.cache);
        let before = cache.len();
        let cutoff = (flamingo_common::unix_seconds() as u64).saturating_sub(idle.as_secs());
        cache.retain(|_, cached| {
            idle.as_secs() > 0 && cached.used.load(std::sync::atomic::Ordering::Relaxed) > cutoff
        });
        before - cache.len()
    }

    /// Stores one report.
    pub fn append(&self, job_id: &str, point: &Point) -> std::io::Result<()> {
        self.append_batch(job_id, std::slice::from_ref(point), &[])
    }

    /// Stores a rank's batch of reports and notes with one write per file.
    pub fn append_batch(
        &self,
        job_id: &str,
        points: &[Point],
        events: &[StoredEvent],
    ) -> std::io::Result<()> {
        let job = self.job(job_id)?;
        let _serial = lock(&self.write);
        if !points.is_empty() {
            append_lines(&self.points_path(job_id), points)?;
        }
        if !events.is_empty() {
            append_lines(&self.events_path(job_id), events)?;
        }
        let mut cache = job.write().unwrap_or_else(|p| p.into_inner());
        for point in points {
            cache.add(point);
        }
        cache.events.extend_from_slice(events);
        Ok(())
    }

    /// Stores a checkpoint's benchmark scores and marks them on the job's
    /// timeline (at the checkpoint's step).
    pub fn append_eval(&self, job_id: &str, record: &EvalRecord) -> std::io::Result<()> {
        let job = self.job(job_id)?;
        let event = StoredEvent {
            unix_ms: record.unix_ms,
            kind: EventKind::Eval,
            message: format!("eval: {}", record.summary()),
            seq: None,
            step: Some(record.step),
            rank: None,
            attempt: 0,
        };
        let _serial = lock(&self.write);
        append_lines(&self.evals_path(job_id), std::slice::from_ref(record))?;
        append_lines(&self.events_path(job_id), std::slice::from_ref(&event))?;
        let mut cache = job.write().unwrap_or_else(|p| p.into_inner());
        cache.evals.push(record.clone());
        cache.events.push(event);
        Ok(())
    }

    /// Stores examples of skipped samples, up to
    /// [`SKIP_EXAMPLES_PER_REASON`] per dataset and reason (the rest are
    /// dropped: the counts are series).
    pub fn append_skip_examples(
        &self,
        job_id: &str,
        examples: Vec<SkipExample>,
    ) -> std::io::Result<()> {
        let job = self.job(job_id)?;
        let _serial = lock(&self.write);
        let mut cache = job.write().unwrap_or_else(|p| p.into_inner());
        let mut kept = Vec::new();
        for example in examples {
            let held = cache
                .skip_examples
                .iter()
                .chain(&kept)
                .filter(|e: &&SkipExample| {
                    e.dataset == example.dataset && e.reason == example.reason
                })
                .count();
            if held < SKIP_EXAMPLES_PER_REASON {
                kept.push(example);
            }
        }
        if kept.is_empty() {
            return Ok(());
        }
        append_lines(&self.skips_path(job_id), &kept)?;
        cache.skip_examples.extend(kept);
        Ok(())
    }

    /// The job's skipped samples by dataset and reason: counts summed from
    /// rank 0's `skipped_<dataset>.<reason>` series (each step once, as its
    /// latest attempt reported it), with the kept examples.
    pub fn skip_reasons(&self, job_id: &str) -> std::io::Result<Vec<SkipReason>> {
        let job = self.job(job_id)?;
        let cache = job.read().unwrap_or_else(|p| p.into_inner());
        let mut reasons: BTreeMap<(String, String), SkipReason> = BTreeMap::new();
        for (key, samples) in &cache.series {
            if key.rank != 0 {
                continue;
            }
            let Some((dataset, reason)) = key
                .name
                .strip_prefix("skipped_")
                .and_then(|rest| rest.split_once('.'))
            else {
                continue;
            };
            let mut by_step: BTreeMap<u64, (u16, f64)> = BTreeMap::new();
            for sample in samples {
                let entry = by_step.entry(sample.step).or_insert((sample.attempt, 0.0));
                if sample.attempt >= entry.0 {
                    *entry = (sample.attempt, sample.value);
                }
            }
            let count = by_step.values().map(|(_, value)| *value).sum::<f64>();
            reasons.insert(
                (dataset.to_string(), reason.to_string()),
                SkipReason {
                    dataset: dataset.to_string(),
                    reason: reason.to_string(),
                    count: count.round() as u64,
                    examples: Vec::new(),
                },
            );
        }
        for example in &cache.skip_examples {
            if let Some(entry) = reasons.get_mut(&(example.dataset.clone(), example.reason.clone()))
            {
                entry.examples.push(example.clone());
            }
        }
        let mut out: Vec<SkipReason> = reasons.into_values().collect();
        out.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| (&a.dataset, &a.reason).cmp(&(&b.dataset, &b.reason)))
        });
        Ok(out)
    }

    /// The job's eval reports, in arrival order.
    pub fn evals(&self, job_id: &str) -> std::io::Result<Vec<EvalRecord>> {
        let job = self.job(job_id)?;
        let cache = job.read().unwrap_or_else(|p| p.into_inner());
        Ok(cache.evals.clone())
    }

    /// Every stored point of the job, in arrival order; a torn last line (a
    /// crash mid-write) is skipped.
    pub fn read(&self, job_id: &str) -> std::io::Result<Vec<Point>> {
        read_lines(&self.points_path(job_id))
    }

    pub fn events(&self, job_id: &str) -> std::io::Result<Vec<StoredEvent>> {
        let job = self.job(job_id)?;
        let cache = job.read().unwrap_or_else(|p| p.into_inner());
        Ok(cache.events.clone())
    }

    /// The job's curves, downsampled to about `query.max_points` each.
    pub fn series(&self, job_id: &str, query: &SeriesQuery) -> std::io::Result<Vec<SeriesOut>> {
        let job = self.job(job_id)?;
        let cache = job.read().unwrap_or_else(|p| p.into_inner());
        Ok(cache
            .series
            .iter()
            .filter(|(key, _)| query.names.is_empty() || query.names.contains(&key.name))
            .filter(|(key, _)| query.ranks.is_empty() || query.ranks.contains(&key.rank))
            .map(|(key, samples)| SeriesOut {
                name: key.name.clone(),
                rank: key.rank,
                total: samples.len(),
                points: downsample(samples, query.max_points)
                    .into_iter()
                    .map(|s| (s.step, s.unix_ms, s.value, s.attempt))
                    .collect(),
            })
            .collect())
    }

    /// The names and ranks of the job's curves.
    pub fn keys(&self, job_id: &str) -> std::io::Result<Vec<SeriesKey>> {
        let job = self.job(job_id)?;
        let cache = job.read().unwrap_or_else(|p| p.into_inner());
        Ok(cache.series.keys().cloned().collect())
    }

    /// Jobs held in memory and what Prometheus shows about them.
    pub fn summaries(&self) -> Vec<(String, Summary)> {
        let jobs: Vec<(String, Arc<RwLock<JobCache>>)> = lock(&self.cache)
            .iter()
            .map(|(id, cached)| (id.clone(), cached.job.clone()))
            .collect();
        let mut out: Vec<(String, Summary)> = jobs
            .into_iter()
            .map(|(id, cache)| {
                let cache = cache.read().unwrap_or_else(|p| p.into_inner());
                (id, summarise(&cache))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

fn summarise(cache: &JobCache) -> Summary {
    let mut summary = Summary {
        points: cache.points,
        ..Summary::default()
    };
    for (key, samples) in &cache.series {
        let Some(last) = samples.last() else { continue };
        if key.name == DROPPED {
            summary.dropped += last.value as u64;
        }
        if key.rank != 0 {
            continue;
        }
        summary.latest.insert(key.name.clone(), last.value);
        if summary.step_rate.is_none() {
            let since = last.unix_ms - 60_000;
            let first = samples
                .iter()
                .rev()
                .take_while(|s| s.unix_ms >= since && s.attempt == last.attempt)
                .last()
                .copied()
                .unwrap_or(*last);
            let seconds = (last.unix_ms - first.unix_ms) as f64 / 1000.0;
            if seconds > 0.0 {
                summary.step_rate = Some(last.step.saturating_sub(first.step) as f64 / seconds);
            }
        }
    }
    summary
}

/// The metric a rank's batches carry its count of unsent reports in.
pub const DROPPED: &str = "dropped_reports";

/// At most about `max_points` of `samples` (all of them when 0 or when
/// fewer): the first and last, and in each of `max_points / 2` equal runs
/// the smallest and largest value, in their order — spikes survive, unlike
/// with plain striding.
pub fn downsample(samples: &[Sample], max_points: usize) -> Vec<Sample> {
    let n = samples.len();
    if max_points == 0 || n <= max_points.max(4) {
        return samples.to_vec();
    }
    let buckets = (max_points / 2).max(2);
    let mut out = Vec::with_capacity(buckets * 2 + 2);
    let mut last_index = None;
    let mut push = |index: usize, out: &mut Vec<Sample>| {
        if last_index != Some(index) {
            out.push(samples[index]);
            last_index = Some(index);
        }
    };
    push(0, &mut out);
    for bucket in 0..buckets {
        let start = bucket * n / buckets;
        let end = ((bucket + 1) * n / buckets).max(start + 1);
        let run = &samples[start..end];
        let (mut low, mut high) = (0, 0);
        for (index, sample) in run.iter().enumerate() {
            // NaN never wins either comparison, so it is skipped.
            if sample.value < run[low].value || run[low].value.is_nan() {
                low = index;
            }
            if sample.value > run[high].value || run[high].value.is_nan() {
                high = index;
            }
        }
        let (first, second) = if low <= high {
            (low, high)
        } else {
            (high, low)
        };
        push(start + first, &mut out);
        push(start + second, &mut out);
    }
    push(n - 1, &mut out);
    out
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends JSON lines with one write; after a torn line (a crash
/// mid-write) it starts on a fresh one.
fn append_lines<T: Serialize>(path: &Path, items: &[T]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let length = file.metadata()?.len();
    let mut last = [b'\n'];
    if length > 0 {
        use std::os::unix::fs::FileExt;
        file.read_at(&mut last, length - 1)?;
    }
    let mut text = String::new();
    if last[0] != b'\n' {
        text.push('\n');
    }
    for item in items {
        text.push_str(&serde_json::to_string(item).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    file.write_all(text.as_bytes())
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Vec<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, rank: u32, value: f64) -> Point {
        Point {
            step,
            rank,
            attempt: 1,
            unix_ms: 5 + step as i64,
            values: [("loss_laion".to_string(), value)].into_iter().collect(),
        }
    }

    #[test]
    fn eval_reports_are_stored_marked_and_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetricsStore::new(dir.path().join("metrics"));
        let record = |step: u64, mean: f64| EvalRecord {
            step,
            unix_ms: 1000 + step as i64,
            dataset: "coco".to_string(),
            metric: "CIDEr".to_string(),
            selection: "random".to_string(),
            scores: vec![EvalScore {
                shots: 4,
                mean,
                stddev: 0.5,
                trials: vec![mean - 0.5, mean + 0.5],
            }],
            samples: 16,
            checkpoint: format!("/runs/a/checkpoints/step-{step:08}"),
        };
        store.append_eval("job-a", &record(80, 12.5)).unwrap();
        store.append_eval("job-a", &record(40, 3.25)).unwrap();
        store.append("job-a", &point(1, 0, 2.5)).unwrap();
        let reopened = MetricsStore::new(dir.path().join("metrics"));
        assert_eq!(
            reopened.evals("job-a").unwrap(),
            vec![record(80, 12.5), record(40, 3.25)]
        );
        assert!(reopened.evals("job-b").unwrap().is_empty());
        let events = reopened.events("job-a").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].kind, EventKind::Eval);
        assert_eq!(events[1].step, Some(40));
        assert_eq!(
            events[1].message,
            "eval: coco CIDEr (random) at step 40: 4 shots 3.2500"
        );
        // Eval scores are not curves: the points hold only the rank's report.
        assert_eq!(reopened.keys("job-a").unwrap().len(), 1);
        let proto = record(40, 3.25).to_proto("job-a");
        assert_eq!(EvalRecord::from(proto), record(40, 3.25));
    }

    #[test]
    fn skip_reasons_count_each_step_once_and_keep_a_few_examples() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetricsStore::new(dir.path().join("metrics"));
        let report = |step: u64, rank: u32, attempt: u32, values: &[(&str, f64)]| Point {
            step,
            rank,
            attempt,
            unix_ms: step as i64,
            values: values.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
        };
        // Attempt 0 runs steps 1–3; a restart resumes at step 2 and runs
        // 2–4 with other counts: steps 2 and 3 count as attempt 1 has them.
        let mut points = vec![
            report(
                1,
                0,
                0,
                &[("skipped_mmc4.no_images", 2.0), ("skipped_mmc4", 3.0)],
            ),
            report(1, 0, 0, &[("skipped_mmc4.bad_json", 1.0)]),
            report(2, 0, 0, &[("skipped_mmc4.no_images", 5.0)]),
            report(3, 0, 0, &[("skipped_mmc4.no_images", 7.0)]),
            report(2, 0, 1, &[("skipped_mmc4.no_images", 1.0)]),
            report(3, 0, 1, &[("skipped_mmc4.no_images", 1.0)]),
            report(4, 0, 1, &[("skipped_laion.missing_text", 4.0)]),
            // Another rank's values are not the job's count.
            report(4, 1, 1, &[("skipped_laion.missing_text", 9.0)]),
        ];
        points.sort_by_key(|point| point.attempt);
        store.append_batch("j", &points, &[]).unwrap();
        let example = |reason: &str, key: u32| SkipExample {
            step: 1,
            attempt: 0,
            dataset: "mmc4".into(),
            reason: reason.into(),
            shard: "file:///data/mmc4-00000.tar".into(),
            key: format!("{key:09}"),
            detail: "no image passed the filters".into(),
        };
        store
            .append_skip_examples("j", (0..4).map(|k| example("no_images", k)).collect())
            .unwrap();
        store
            .append_skip_examples("j", (4..9).map(|k| example("no_images", k)).collect())
            .unwrap();
        let reasons = store.skip_reasons("j").unwrap();
        let summary: Vec<(&str, &str, u64, usize)> = reasons
            .iter()
            .map(|r| {
                (
                    r.dataset.as_str(),
                    r.reason.as_str(),
                    r.count,
                    r.examples.len(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            // Most frequent first; ties by dataset and reason.
            vec![
                ("laion", "missing_text", 4, 0),
                ("mmc4", "no_images", 4, SKIP_EXAMPLES_PER_REASON),
                ("mmc4", "bad_json", 1, 0),
            ]
        );
        // Kept across a new store (a restarted coordinator).
        let again = MetricsStore::new(dir.path().join("metrics"));
        assert_eq!(again.skip_reasons("j").unwrap(), reasons);
    }

    #[test]
    fn points_survive_a_new_store_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetricsStore::new(dir.path().join("metrics"));
        store.append("job-a", &point(1, 0, 2.5)).unwrap();
        store.append("job-a", &point(2, 0, 2.5)).unwrap();
        store.append("job-b", &point(9, 0, 2.5)).unwrap();
        // A coordinator killed mid-write leaves half a line.
        let path = dir.path().join("metrics/job-a.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        write!(file, "{{\"step\": 3, \"ra").unwrap();
        let reopened = MetricsStore::new(dir.path().join("metrics"));
        assert_eq!(
            reopened.read("job-a").unwrap(),
            vec![point(1, 0, 2.5), point(2, 0, 2.5)]
        );
        reopened.append("job-a", &point(4, 0, 2.5)).unwrap();
        assert_eq!(
            reopened.read("job-a").unwrap(),
            vec![point(1, 0, 2.5), point(2, 0, 2.5), point(4, 0, 2.5)]
        );
        assert_eq!(reopened.read("job-none").unwrap(), vec![]);
        assert_eq!(reopened.read("../metrics/job-b").unwrap(), vec![]);
        // The in-memory curves hold the same points as the file.
        let curves = reopened.series("job-a", &SeriesQuery::default()).unwrap();
        assert_eq!(curves.len(), 1);
        let steps: Vec<u64> = curves[0].points.iter().map(|p| p.0).collect();
        assert_eq!(steps, vec![1, 2, 4]);
    }

    #[test]
    fn batches_store_points_and_events_and_filter_by_name_and_rank() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetricsStore::new(dir.path().to_path_buf());
        let mut with_time = point(1, 3, 0.5);
        with_time.values.insert("step_seconds".into(), 0.25);
        let note = StoredEvent {
            unix_ms: 7,
            kind: EventKind::SamplesSkipped,
            message: "2 samples skipped".into(),
            seq: None,
            step: Some(1),
            rank: Some(3),
            attempt: 1,
        };
        store
            .append_batch(
                "j",
                &[point(1, 0, 2.0), with_time],
                std::slice::from_ref(&note),
            )
            .unwrap();
        let query = SeriesQuery {
            names: vec!["step_seconds".into()],
            ..SeriesQuery::default()
        };
        let curves = store.series("j", &query).unwrap();
        assert_eq!(curves.len(), 1);
        assert_eq!((curves[0].rank, curves[0].points[0].2), (3, 0.25));
        let query = SeriesQuery {
            ranks: vec![0],
            ..SeriesQuery::default()
        };
        let curves = store.series("j", &query).unwrap();
        assert_eq!(curves.len(), 1);
        assert_eq!(curves[0].name, "loss_laion");
        let fresh = MetricsStore::new(dir.path().to_path_buf());
        assert_eq!(fresh.events("j").unwrap(), vec![note.clone()]);
        assert_eq!(fresh.series("j", &SeriesQuery::default()).unwrap().len(), 3);
        // Dropped from memory, the job loads again from its files.
        assert_eq!(fresh.evict_idle(std::time::Duration::from_secs(3600)), 0);
        assert_eq!(fresh.evict_idle(std::time::Duration::ZERO), 1);
        assert!(fresh.summaries().is_empty());
        assert_eq!(fresh.events("j").unwrap(), vec![note]);
        assert_eq!(fresh.series("j", &SeriesQuery::default()).unwrap().len(), 3);
    }

    #[test]
    fn downsampling_keeps_ends_and_extremes_in_order() {
        let samples: Vec<Sample> = (0..10_000u64)
            .map(|step| Sample {
                step,
                unix_ms: step as i64,
                value: if step == 4321 {
                    100.0
                } else {
                    (step % 7) as f64
                },
                attempt: 0,
            })
            .collect();
        let out = downsample(&samples, 500);
        assert!(out.len() <= 502, "{} points", out.len());
        assert_eq!(out.first().unwrap().step, 0);
        assert_eq!(out.last().unwrap().step, 9_999);
        assert!(out.iter().any(|s| s.step == 4321), "the spike survives");
        assert!(out.windows(2).all(|w| w[0].step < w[1].step));
        // Small curves come back whole.
        assert_eq!(downsample(&samples[..300], 500), samples[..300].to_vec());
        assert_eq!(downsample(&samples, 0).len(), 10_000);
    }

    #[test]
    fn summary_has_latest_values_step_rate_and_dropped_reports() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetricsStore::new(dir.path().to_path_buf());
        let points: Vec<Point> = (0..=10u64)
            .map(|step| Point {
                step,
                rank: 0,
                attempt: 0,
                unix_ms: step as i64 * 500,
                values: [("loss_laion".to_string(), 10.0 - step as f64)]
                    .into_iter()
                    .collect(),
            })
            .collect();
        store.append_batch("j", &points, &[]).unwrap();
        let mut dropped = point(3, 1, 0.0);
        dropped.values = [(DROPPED.to_string(), 4.0)].into_iter().collect();
        store.append("j", &dropped).unwrap();
        let summaries = store.summaries();
        let summary = &summaries[0].1;
        assert_eq!(summary.points, 12);
        assert_eq!(summary.latest["loss_laion"], 0.0);
        assert_eq!(summary.step_rate, Some(2.0));
        assert_eq!(summary.dropped, 4);
    }
}
