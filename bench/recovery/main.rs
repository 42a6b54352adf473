//! bench-recovery: how fast a training job gets back to work after a rank
//! dies, and how much of the wall time goes to steps that are kept, with
//! faults injected — flamingo's local cluster against `torchrun
//! --max-restarts` running the Python OpenFlamingo step, same tiny model,
//! same batch, same checkpoint interval, one run, this machine.
//!
//! 1. Recovery: SIGKILL a rank; time until the first step of the restarted
//!    group completes, split into detection + respawn (kill → the new rank 0
//!    process starts), start-up (process start → its `main` is running:
//!    dynamic loading, Python imports), loading (model and checkpoint) and
//!    the first step.
//! 2. Effective training time: for `--minutes`, a rank is SIGKILLed every
//!    `--fault-every` seconds; the share of the wall time spent on steps
//!    whose results were kept (a step redone after a restart counts once,
//!    its last run).
//!
//! Both jobs log one line per step from rank 0 with a Unix time and their
//! attempt, and one line per start (`attempts.jsonl`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Recovery time and effective training time under faults, against torchrun")]
struct Args {
    /// Length of the fault-injection run of each system, in minutes.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// A rank is SIGKILLed this often during that run (seconds).
    #[arg(long, default_value_t = 60.0)]
    fault_every: f64,
    /// Recovery measurements (separate kills) per system.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// Samples per rank per step.
    #[arg(long, default_value_t = 4)]
    batch: u32,
    /// Checkpoint interval in steps (both systems).
    #[arg(long, default_value_t = 10)]
    checkpoint_steps: u64,
    /// Only measure flamingo (no torchrun baseline).
    #[arg(long)]
    skip_python: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const WORLD: u32 = 4;

/// One step line: (attempt, step, time).
type StepLine = (u64, u64, f64);

/// One start: attempt → (started, entered, loaded).
type Starts = BTreeMap<u64, (f64, f64, f64)>;

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn steps(log: &Path) -> Vec<StepLine> {
    read_lines(log)
        .iter()
        .filter_map(|value| {
            Some((
                value["attempt"].as_u64()?,
                value["step"].as_u64()?,
                value["time"].as_f64()?,
            ))
        })
        .collect()
}

fn starts(path: &Path) -> Starts {
    read_lines(path)
        .iter()
        .filter_map(|value| {
            Some((
                value["attempt"].as_u64()?,
                (
                    value["started"].as_f64()?,
                    value["entered"].as_f64()?,
                    value["loaded"].as_f64()?,
                ),
            ))
        })
        .collect()
}

/// What one system needs from the bench: its files and a way to kill ranks.
trait System {
    fn name(&self) -> &'static str;
    fn log(&self) -> PathBuf;
    fn attempts(&self) -> PathBuf;
    /// The pid of `rank` in the current attempt.
    fn rank_pid(&self, rank: u32) -> anyhow::Result<u32>;
    fn stop(&mut self) -> anyhow::Result<()>;
}

#[derive(Debug, Clone, Copy, Default)]
struct Recovery {
    total: f64,
    respawn: f64,
    startup: f64,
    load: f64,
    first_step: f64,
}

fn last_step(system: &dyn System) -> Option<StepLine> {
    steps(&system.log()).last().copied()
}

/// Waits until the log shows `count` more steps of the current attempt.
fn wait_steps(system: &dyn System, count: u64, timeout: Duration) -> anyhow::Result<StepLine> {
    let started = Instant::now();
    let first = loop {
        if let Some(line) = last_step(system) {
            break line;
        }
        if started.elapsed() > timeout {
            bail!("{}: no step logged within {timeout:?}", system.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    loop {
        if let Some(line) = last_step(system) {
            if line.0 == first.0 && line.1 >= first.1 + count {
                return Ok(line);
            }
            if line.0 > first.0 {
                // Restarted meanwhile: count from its first step.
                return wait_steps(system, count, timeout);
            }
        }
        if started.elapsed() > timeout {
            bail!(
                "{}: {count} steps did not come within {timeout:?}",
                system.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILLs a rank; waits for the first step of the next attempt.
fn measure_recovery(system: &dyn System, rank: u32) -> anyhow::Result<Recovery> {
    let before = last_step(system).map_or(0, |line| line.0);
    let pid = system.rank_pid(rank)?;
    let killed = flamingo_common::unix_seconds();
    // SAFETY: plain syscall.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(180);
    let first = loop {
        if let Some(line) = steps(&system.log())
            .into_iter()
            .find(|line| line.0 > before && line.2 > killed)
        {
            break line;
        }
        if Instant::now() > deadline {
            bail!("{}: no step after the kill within 180 s", system.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (started, entered, loaded) = starts(&system.attempts())
        .get(&first.0)
        .copied()
        .with_context(|| format!("{}: attempt {} logged no start", system.name(), first.0))?;
    Ok(Recovery {
        total: first.2 - killed,
        respawn: started - killed,
        startup: entered - started,
        load: loaded - entered,
        first_step: first.2 - loaded,
    })
}

/// Share of [from, to] spent on kept steps: each step's time is the gap to
/// the previous line of the same attempt (to the attempt's `loaded` for its
/// first step); a step counts only in its last run.
fn effective(lines: &[StepLine], starts: &Starts, from: f64, to: f64) -> (f64, u64, u64) {
    let mut last_run: BTreeMap<u64, usize> = BTreeMap::new();
    for (index, line) in lines.iter().enumerate() {
        last_run.insert(line.1, index);
    }
    let mut kept = 0.0;
    let mut kept_steps = 0;
    let mut redone = 0;
    for (index, line) in lines.iter().enumerate() {
        let previous = lines[..index]
            .iter()
            .rev()
            .find(|other| other.0 == line.0)
            .map(|other| other.2)
            .or_else(|| starts.get(&line.0).map(|start| start.2))
            .unwrap_or(line.2);
        let (begin, end) = (previous.max(from), line.2.min(to));
        if end <= begin {
            continue;
        }
        if last_run.get(&line.1) == Some(&index) {
            kept += end - begin;
            kept_steps += 1;
        } else {
            redone += 1;
        }
    }
    (kept / (to - from), kept_steps, redone)
}

#[derive(Debug, Default)]
struct Outcome {
    recoveries: Vec<Recovery>,
    effective: f64,
    kept_steps: u64,
    redone_steps: u64,
    faults: u32,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run_system(system: &mut dyn System, args: &Args) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let name = system.name();
    wait_steps(system, 5, Duration::from_secs(300))?;
    for kill in 0..args.kills {
        let rank = 1 + (kill as u32 % (WORLD - 1));
        let recovery = measure_recovery(system, rank)?;
        eprintln!(
            "{name}: kill {}/{}: rank {rank} SIGKILL → first step after restart {:.2} s (respawn {:.2}, start-up {:.2}, load {:.2}, first step {:.2})",
            kill + 1,
            args.kills,
            recovery.total,
            recovery.respawn,
            recovery.startup,
            recovery.load,
            recovery.first_step
        );
        outcome.recoveries.push(recovery);
        wait_steps(system, 3, Duration::from_secs(120))?;
    }
    let from = flamingo_common::unix_seconds();
    let to = from + args.minutes * 60.0;
    let mut next_fault = from + args.fault_every;
    let mut rank = 0;
    let mut reported = f64::INFINITY;
    while flamingo_common::unix_seconds() < to {
        let remaining = to - flamingo_common::unix_seconds();
        // A line every 10 s: readable in a log as on a terminal.
        if reported - remaining >= 10.0 {
            reported = remaining;
            let steps = last_step(system).map_or(0, |line| line.1);
            eprintln!(
                "{name}: faults every {:.0} s: {:.0} s left, {} fault(s) so far, step {steps}",
                args.fault_every, remaining, outcome.faults
            );
        }
        if flamingo_common::unix_seconds() >= next_fault {
            rank = (rank % (WORLD - 1)) + 1;
            if let Ok(pid) = system.rank_pid(rank) {
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                outcome.faults += 1;
            }
            next_fault += args.fault_every;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    system.stop()?;
    let (share, kept, redone) =
        effective(&steps(&system.log()), &starts(&system.attempts()), from, to);
    outcome.effective = share;
    outcome.kept_steps = kept;
    outcome.redone_steps = redone;
    eprintln!(
        "{name}: effective training time {:.1}% ({kept} kept steps, {redone} redone, {} faults in {:.0} s)",
        share * 100.0,
        outcome.faults,
        to - from
    );
    Ok(outcome)
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("the bench binary has a folder")?
        .to_path_buf())
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

struct Flamingo {
    work: PathBuf,
    ctl: PathBuf,
    job: String,
}

impl Flamingo {
    fn ctl(&self) -> Command {
        let mut command = Command::new(&self.ctl);
        command
            .current_dir(&self.work)
            .env("FLAMINGO_STATE_DIR", self.work.join("cluster"))
            .env_remove("FLAMINGO_COORDINATOR");
        command
    }

    fn start(work: &Path, model: &Path, args: &Args) -> anyhow::Result<Self> {
        let ctl = bin_dir()?.join("flamingoctl");
        let mut system = Self {
            work: work.to_path_buf(),
            ctl,
            job: String::new(),
        };
        let port = flamingo_common::net::free_local_port()?;
        run(
            system.ctl().args([
                "up",
                "--nodes",
                "2",
                "--slots-per-node",
                "2",
                "--port",
                &port.to_string(),
            ]),
            "flamingoctl up",
        )?;
        let batch = args.batch.to_string();
        let every = args.checkpoint_steps.to_string();
        let output = run(
            system.ctl().args([
                "launch",
                "--nodes",
                "2",
                "--slots-per-node",
                "2",
                "--name",
                "recovery",
                "--model",
                &model.join("model.toml").display().to_string(),
                "--laion_shards",
                "data/laion-{00000..00007}.tar",
                "--batch_size_laion",
                &batch,
                "--train_num_samples_laion",
                "4096",
                "--num_epochs",
                "1000",
                "--fsdp_sharding_strategy",
                "full",
                "--checkpoint_steps",
                &every,
                "--logging_steps",
                "1",
                "--runs_dir",
                "runs",
                "--max-restarts",
                "100000",
                "--hang-timeout",
                "120",
                "--keep-checkpoints",
                "2",
            ]),
            "flamingoctl launch",
        )?;
        system.job = output.trim().to_string();
        Ok(system)
    }
}

impl System for Flamingo {
    fn name(&self) -> &'static str {
        "flamingo"
    }
    fn log(&self) -> PathBuf {
        self.work.join("runs/recovery/log.jsonl")
    }
    fn attempts(&self) -> PathBuf {
        self.work.join("runs/recovery/attempts.jsonl")
    }
    fn rank_pid(&self, rank: u32) -> anyhow::Result<u32> {
        let text = run(
            self.ctl().args(["status", &self.job, "--json"]),
            "flamingoctl status",
        )?;
        let value: Value = serde_json::from_str(&text)?;
        value["ranks"]
            .as_array()
            .and_then(|ranks| ranks.iter().find(|r| r["rank"] == rank))
            .filter(|r| r["state"] == "Running")
            .and_then(|r| r["pid"].as_u64())
            .map(|pid| pid as u32)
            .with_context(|| format!("rank {rank} is not running"))
    }
    fn stop(&mut self) -> anyhow::Result<()> {
        let _ = run(self.ctl().args(["stop", &self.job]), "flamingoctl stop");
        run(self.ctl().args(["down"]), "flamingoctl down").map(|_| ())
    }
}

struct Torchrun {
    out: PathBuf,
    child: Child,
}

impl Torchrun {
    fn start(work: &Path, python: &Path, args: &Args) -> anyhow::Result<Self> {
        let out = work.join("torchrun");
        std::fs::create_dir_all(&out)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("recovery/torchrun_train.py");
        let port = flamingo_common::net::free_local_port()?;
        let log = std::fs::File::create(out.join("torchrun.log"))?;
        let child = Command::new(python)
            .args([
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "1",
                "--nproc-per-node",
                &WORLD.to_string(),
                "--max-restarts",
                "100000",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                &format!("127.0.0.1:{port}"),
            ])
            .arg(&script)
            .arg(&out)
            .arg(work.join("torchrun-models"))
            .args([
                args.batch.to_string(),
                args.checkpoint_steps.to_string(),
                "100000000".to_string(),
            ])
            .env("OMP_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting torchrun")?;
        Ok(Self { out, child })
    }
}

impl System for Torchrun {
    fn name(&self) -> &'static str {
        "torchrun"
    }
    fn log(&self) -> PathBuf {
        self.out.join("log.jsonl")
    }
    fn attempts(&self) -> PathBuf {
        self.out.join("attempts.jsonl")
    }
    fn rank_pid(&self, rank: u32) -> anyhow::Result<u32> {
        let text = std::fs::read_to_string(self.out.join(format!("pid-{rank}")))?;
        let pid: u32 = text.trim().parse()?;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("rank {rank} (pid {pid}) is not running");
        }
        Ok(pid)
    }
    fn stop(&mut self) -> anyhow::Result<()> {
        // SAFETY: plain syscall; torchrun forwards SIGTERM to its workers.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Torchrun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn summary(outcome: &Outcome) -> Value {
    let field = |get: fn(&Recovery) -> f64| {
        let mut values: Vec<f64> = outcome.recoveries.iter().map(get).collect();
        median(&mut values)
    };
    json!({
        "recovery_seconds": field(|r| r.total),
        "respawn_seconds": field(|r| r.respawn),
        "startup_seconds": field(|r| r.startup),
        "load_seconds": field(|r| r.load),
        "first_step_seconds": field(|r| r.first_step),
        "recoveries": outcome.recoveries.iter().map(|r| r.total).collect::<Vec<_>>(),
        "effective_training_time": outcome.effective,
        "kept_steps": outcome.kept_steps,
        "redone_steps": outcome.redone_steps,
        "faults": outcome.faults,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let python = PathBuf::from(std::env::var("FLAMINGO_VENV").context(
        "FLAMINGO_VENV is not set; run through bench/recovery.sh (it sources scripts/setup.sh)",
    )?)
    .join("bin/python");
    let work = tempfile::tempdir()?;
    let dir = work.path();
    eprintln!("bench-recovery: tiny OpenFlamingo model, {WORLD} ranks (2 nodes × 2 on this machine), {} samples per rank per step, checkpoint every {} steps; work in {}", args.batch, args.checkpoint_steps, dir.display());
    // The model as the Python reference builds it (seed 0), for both.
    let model = dir.join("model");
    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    run(
        Command::new(&python).args([
            "-c",
            &format!(
                "import sys; sys.path.insert(0, {:?}); from reference import build; build({:?}, 'tiny')",
                bench_dir.join("model").display().to_string(),
                model.display().to_string()
            ),
        ]),
        "building the reference model",
    )?;
    run(
        Command::new(bin_dir()?.join("flamingoctl"))
            .current_dir(dir)
            .args([
                "data",
                "synth",
                "--form",
                "laion",
                "--out",
                "data",
                "--samples",
                "4096",
                "--per-shard",
                "512",
                "--image-size",
                "28",
            ]),
        "flamingoctl data synth",
    )?;

    let mut ours = Flamingo::start(dir, &model, &args)?;
    let flamingo = run_system(&mut ours, &args)?;
    let torchrun = if args.skip_python {
        None
    } else {
        let mut theirs = Torchrun::start(dir, &python, &args)?;
        Some(run_system(&mut theirs, &args)?)
    };

    let ours = summary(&flamingo);
    let theirs = torchrun.as_ref().map(summary);
    println!(
        "\n{:<34} {:>10} {:>10} {:>8}",
        "median of kills", "flamingo", "torchrun", "ratio"
    );
    for (label, key) in [
        ("SIGKILL → first step (s)", "recovery_seconds"),
        ("  detection + respawn (s)", "respawn_seconds"),
        ("  process start-up (s)", "startup_seconds"),
        ("  model + checkpoint load (s)", "load_seconds"),
        ("  first step (s)", "first_step_seconds"),
    ] {
        let a = ours[key].as_f64().unwrap_or(f64::NAN);
        let b = theirs
            .as_ref()
            .and_then(|t| t[key].as_f64())
            .unwrap_or(f64::NAN);
        println!("{label:<34} {a:>10.2} {b:>10.2} {:>7.2}×", b / a);
    }
    let a = ours["effective_training_time"].as_f64().unwrap_or(f64::NAN);
    let b = theirs
        .as_ref()
        .and_then(|t| t["effective_training_time"].as_f64())
        .unwrap_or(f64::NAN);
    println!(
        "{:<34} {:>9.1}% {:>9.1}% {:>7.2}×",
        format!(
            "effective time, fault/{:.0}s, {:.0} min",
            args.fault_every, args.minutes
        ),
        a * 100.0,
        b * 100.0,
        a / b
    );
    let result = json!({"flamingo": ours, "torchrun": theirs, "minutes": args.minutes, "fault_every": args.fault_every});
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    Ok(())
}
