//! Slurm: `flamingoctl launch --scheduler slurm` renders
//! deploy/slurm/flamingo.sbatch for the job into a folder every node sees and
//! submits it; inside the allocation `flamingoctl slurm run` starts the
//! control plane and one agent per node (`srun … flamingoctl slurm agent`),
//! launches the job and follows it, and turns Slurm's warning signal into a
//! checkpoint and a requeue. `status`, `stop`, `wait` and `logs` find a
//! Slurm job through its folder by either id.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flamingo_common::JobRecord;
use serde::{Deserialize, Serialize};

use crate::commands::{self, Session};
use crate::local;

/// The sbatch template; `{{SBATCH}}`, `{{FLAMINGOCTL}}` and `{{JOB_DIR}}`
/// are filled in.
pub const TEMPLATE: &str = include_str!("../../deploy/slurm/flamingo.sbatch");

#[derive(Debug, Clone, clap::Args)]
pub struct SlurmFlags {
    /// Slurm: the partition (sbatch --partition).
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm: generic resources per node, e.g. gpu:8 (sbatch --gres).
    #[arg(long)]
    pub gres: Option<String>,
    /// Slurm: the time limit, e.g. 2-00:00:00 (sbatch --time).
    #[arg(long)]
    pub time: Option<String>,
    /// Slurm: the account charged (sbatch --account).
    #[arg(long)]
    pub account: Option<String>,
    /// Slurm: seconds before the time limit at which every rank checkpoints
    /// and the job is requeued (sbatch --signal=B:USR1@S).
    #[arg(long, default_value_t = 300)]
    pub signal_seconds: u32,
    /// Slurm: another sbatch option, e.g. --sbatch-arg=--qos=high (repeatable).
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// Slurm: an existing etcd for the job's coordinator (default: one
    /// started for the job, its data in the job's folder).
    #[arg(long)]
    pub etcd_endpoints: Option<String>,
    /// Slurm: the network interface other nodes reach the first node on
    /// (default: the first one that is up, other than loopback).
    #[arg(long)]
    pub interface: Option<String>,
    /// Slurm: a folder every node sees, for the jobs' folders (default
    /// $FLAMINGO_HOME/slurm, i.e. ~/.flamingo/slurm).
    #[arg(long, env = "FLAMINGO_SLURM_DIR")]
    pub slurm_dir: Option<PathBuf>,
}

/// The flags `launch` strips before the job's own launch runs inside the
/// allocation: the scheduler's, and the submitting side's.
pub const FLAGS_WITH_VALUE: [&str; 12] = [
    "--scheduler",
    "--partition",
    "--gres",
    "--time",
    "--account",
    "--signal-seconds",
    "--sbatch-arg",
    "--etcd-endpoints",
    "--interface",
    "--slurm-dir",
    "--coordinator",
    "--state-dir",
];
pub const BARE_FLAGS: [&str; 5] = ["--dry-run", "--wait", "--follow", "-f", "--json"];

/// Where Slurm jobs' folders go: the flag, `$FLAMINGO_SLURM_DIR`, else
/// `$FLAMINGO_HOME/slurm`.
pub fn slurm_dir(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("FLAMINGO_SLURM_DIR").map(PathBuf::from))
        .unwrap_or_else(|| flamingo_common::paths::flamingo_home().join("slurm"))
}

/// `job.json` in a job's folder: what was submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobFile {
    pub name: String,
    pub nodes: u32,
    pub slots_per_node: u32,
    /// `flamingoctl launch` arguments for the launch inside the allocation.
    pub launch_args: Vec<String>,
    /// A training job (it gets the allocation's data service).
    pub train: bool,
    /// An existing coordinator the agents join instead of a new one.
    pub coordinator: Option<String>,
    pub etcd_endpoints: Option<String>,
    pub interface: Option<String>,
    /// The working directory the job's relative paths are resolved in.
    pub workdir: PathBuf,
    pub submitted_unix_ms: i64,
    /// Set once sbatch accepted the script.
    #[serde(default)]
    pub slurm_job_id: Option<String>,
}

impl JobFile {
    fn path(dir: &Path) -> PathBuf {
        dir.join("job.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        read_json(&Self::path(dir))
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        write_json(&Self::path(dir), self)
    }
}

/// `control-plane.json`: where the running job's coordinator is, written by
/// `flamingoctl slurm run` at every start of the Slurm job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlPlane {
    pub slurm_job_id: String,
    /// Slurm's restart count at this start (0 = the first start).
    pub restarts: u32,
    pub coordinator: String,
    pub dashboard: Option<String>,
    pub data_service: Option<String>,
    /// The flamingo job, once launched (it keeps its id across requeues).
    pub job_id: Option<String>,
    /// Set when the job ended and the control plane went away.
    #[serde(default)]
    pub stopped: bool,
}

impl ControlPlane {
    fn path(dir: &Path) -> PathBuf {
        dir.join("control-plane.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(dir);
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        write_json(&Self::path(dir), self)
    }
}

fn final_path(dir: &Path) -> PathBuf {
    dir.join("final.json")
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not what flamingoctl wrote there; was it edited?",
            path.display()
        )
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A value for an `#SBATCH` line: one word, no line breaks.
fn sbatch_value(flag: &str, value: &str) -> anyhow::Result<String> {
    if value.is_empty() || value.chars().any(char::is_whitespace) {
        bail!("--{flag} '{value}': give one word without spaces");
    }
    Ok(value.to_string())
}

/// Quotes `text` for bash when it needs it.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The sbatch script for `job`, whose folder is `dir`.
pub fn render_script(
    job: &JobFile,
    dir: &Path,
    flags: &SlurmFlags,
    flamingoctl: &Path,
) -> anyhow::Result<String> {
    let name = crate::k8s::object_name(&job.name);
    let mut lines = vec![
        format!("#SBATCH --job-name=flamingo-{name}"),
        format!("#SBATCH --nodes={}", job.nodes),
        "#SBATCH --ntasks-per-node=1".to_string(),
        format!("#SBATCH --output={}/slurm-%j.out", dir.display()),
        "#SBATCH --open-mode=append".to_string(),
        format!("#SBATCH --chdir={}", job.workdir.display()),
        "#SBATCH --requeue".to_string(),
        format!("#SBATCH --signal=B:USR1@{}", flags.signal_seconds),
    ];
    for (flag, value) in [
        ("partition", &flags.partition),
        ("gres", &flags.gres),
        ("time", &flags.time),
        ("account", &flags.account),
    ] {
        if let Some(value) = value {
            lines.push(format!("#SBATCH --{flag}={}", sbatch_value(flag, value)?));
        }
    }
    for extra in &flags.sbatch_args {
        if !extra.starts_with('-') || extra.contains('\n') {
            bail!("--sbatch-arg '{extra}': give one sbatch option, e.g. --sbatch-arg=--qos=high");
        }
        lines.push(format!("#SBATCH {extra}"));
    }
    for path in [dir, job.workdir.as_path(), flamingoctl] {
        if path.display().to_string().chars().any(char::is_whitespace) {
            bail!(
                "{}: Slurm's #SBATCH lines cannot hold a path with spaces; use another --slurm-dir or working directory",
                path.display()
            );
        }
    }
    Ok(TEMPLATE
        .replace("{{SBATCH}}", &lines.join("\n"))
        .replace(
            "{{FLAMINGOCTL}}",
            &shell_quote(&flamingoctl.display().to_string()),
        )
        .replace("{{JOB_DIR}}", &shell_quote(&dir.display().to_string())))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

fn slurm_command(program: &str) -> anyhow::Result<Command> {
    match which(program) {
        Some(path) => Ok(Command::new(path)),
        None => bail!(
            "{program} not found on PATH: --scheduler slurm needs Slurm's client commands (Debian: slurm-client)"
        ),
    }
}

/// What `launch --scheduler slurm` submits.
pub struct Submission {
    pub name: String,
    pub nodes: u32,
    pub slots_per_node: u32,
    pub launch_args: Vec<String>,
    pub train: bool,
    pub coordinator: Option<String>,
}

/// Writes the job's folder and script and submits it (or, with `dry_run`,
/// prints the script); returns the folder.
pub fn submit(
    submission: Submission,
    flags: &SlurmFlags,
    dry_run: bool,
) -> anyhow::Result<(PathBuf, JobFile)> {
    let root = slurm_dir(flags.slurm_dir.as_deref());
    let stamp = flamingo_common::unix_ms();
    let dir = root.join(format!(
        "{}-{}",
        crate::k8s::object_name(&submission.name),
        flamingo_common::ids::to_base36(stamp as u64)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let mut job = JobFile {
        name: submission.name,
        nodes: submission.nodes,
        slots_per_node: submission.slots_per_node,
        launch_args: submission.launch_args,
        train: submission.train,
        coordinator: submission.coordinator,
        etcd_endpoints: flags.etcd_endpoints.clone(),
        interface: flags.interface.clone(),
        workdir: std::env::current_dir()?,
        submitted_unix_ms: stamp,
        slurm_job_id: None,
    };
    let flamingoctl = std::env::current_exe()?;
    let script = render_script(&job, &dir, flags, &flamingoctl)?;
    let script_path = dir.join("flamingo.sbatch");
    std::fs::write(&script_path, &script)
        .with_context(|| format!("writing {}", script_path.display()))?;
    job.save(&dir)?;
    if dry_run {
        print!("{script}");
        eprintln!(
            "(dry run: nothing submitted; the job's folder {} is ready for `sbatch {}`)",
            dir.display(),
            script_path.display()
        );
        return Ok((dir, job));
    }
    let output = slurm_command("sbatch")?
        .arg("--parsable")
        .arg(&script_path)
        .output()
        .context("running sbatch")?;
    if !output.status.success() {
        bail!(
            "sbatch refused {}: {}",
            script_path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    // `--parsable` prints `id` or `id;cluster`.
    let id = stdout
        .trim()
        .split(';')
        .next()
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("sbatch printed '{}', not a job id", stdout.trim()))?
        .to_string();
    job.slurm_job_id = Some(id);
    job.save(&dir)?;
    Ok((dir, job))
}

/// Slurm's view of a job (`scontrol show job`), while Slurm remembers it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SlurmState {
    pub state: String,
    pub reason: String,
    pub nodes: String,
    pub restarts: u32,
    pub run_time: String,
    pub time_limit: String,
}

impl SlurmState {
    /// Parses `scontrol show job -o` output (one line of `Key=Value`).
    pub fn parse(text: &str) -> Option<Self> {
        let mut state = Self::default();
        for field in text.split_whitespace() {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            match key {
                "JobState" => state.state = value.to_string(),
                "Reason" => state.reason = value.to_string(),
                "NodeList" => state.nodes = value.to_string(),
                "Restarts" => state.restarts = value.parse().unwrap_or(0),
                "RunTime" => state.run_time = value.to_string(),
                "TimeLimit" => state.time_limit = value.to_string(),
                _ => {}
            }
        }
        (!state.state.is_empty()).then_some(state)
    }

    pub fn query(slurm_job_id: &str) -> Option<Self> {
        let output = slurm_command("scontrol")
            .ok()?
            .args(["show", "job", "-o", slurm_job_id])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| Self::parse(&String::from_utf8_lossy(&output.stdout)))
            .flatten()
    }

    /// Slurm is done with the job (it will not run again unless requeued by hand).
    pub fn is_finished(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "OUT_OF_MEMORY"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "PREEMPTED"
        )
    }

    fn summary(&self) -> String {
        let mut out = self.state.clone();
        if !self.nodes.is_empty() && self.nodes != "(null)" {
            out.push_str(&format!(" on {}", self.nodes));
        }
        if self.state == "PENDING" && !self.reason.is_empty() && self.reason != "None" {
            out.push_str(&format!(" ({})", self.reason));
        }
        if !self.run_time.is_empty() && self.state != "PENDING" {
            out.push_str(&format!(", time {} of {}", self.run_time, self.time_limit));
        }
        if self.restarts > 0 {
            out.push_str(&format!(", requeued {}×", self.restarts));
        }
        out
    }
}

/// A Slurm job's folder, found by either id.
pub struct Record {
    pub dir: PathBuf,
    pub file: JobFile,
    pub control: Option<ControlPlane>,
}

impl Record {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            file: JobFile::load(dir)?,
            control: ControlPlane::load(dir)?,
        })
    }

    pub fn slurm_job_id(&self) -> &str {
        self.file.slurm_job_id.as_deref().unwrap_or("")
    }

    pub fn job_id(&self) -> Option<&str> {
        self.control.as_ref().and_then(|c| c.job_id.as_deref())
    }

    /// The job's record as the control plane left it when the job ended.
    pub fn final_job(&self) -> anyhow::Result<Option<JobRecord>> {
        let path = final_path(&self.dir);
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }

    /// The coordinator, while one runs for the job.
    pub fn coordinator(&self) -> Option<&str> {
        self.control
            .as_ref()
            .filter(|c| !c.stopped)
            .map(|c| c.coordinator.as_str())
    }

    fn slurm_json(&self, state: Option<&SlurmState>) -> serde_json::Value {
        serde_json::json!({
            "job_id": self.slurm_job_id(),
            "state": state.map(|s| s.state.clone()),
            "reason": state.map(|s| s.reason.clone()),
            "nodes": state.map(|s| s.nodes.clone()),
            "restarts": state.map(|s| s.restarts),
            "dir": self.dir,
            "dashboard": self.control.as_ref().and_then(|c| c.dashboard.clone()),
        })
    }
}

/// The Slurm job whose Slurm id, flamingo job id or folder name is `id`.
pub fn find(root: &Path, id: &str) -> anyhow::Result<Option<Record>> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(None);
    };
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        if !JobFile::path(&dir).exists() {
            continue;
        }
        let Ok(record) = Record::load(&dir) else {
            continue;
        };
        if record.slurm_job_id() == id
            || record.job_id() == Some(id)
            || dir.file_name().is_some_and(|name| name == id)
        {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

/// The live job record: from the coordinator while it runs, else the one
/// written when the job ended.
async fn current_job(record: &Record) -> anyhow::Result<Option<JobRecord>> {
    if let Some(job) = record.final_job()? {
        return Ok(Some(job));
    }
    if let (Some(address), Some(job_id)) = (record.coordinator(), record.job_id()) {
        if let Ok(mut session) = Session::open(address).await {
            if let Ok(job) = session.job(job_id).await {
                return Ok(Some(job));
            }
        }
    }
    Ok(None)
}

pub async fn print_status(record: &Record, json: bool) -> anyhow::Result<()> {
    let state = SlurmState::query(record.slurm_job_id());
    let job = current_job(record).await?;
    print_both(
        record,
        state.as_ref(),
        job.as_ref(),
        json,
        "not launched yet (it starts when Slurm runs the batch job)",
    )
}

/// The Slurm job's state above the flamingo job (or `missing` when there is
/// none yet); with `json`, the job's JSON with a `slurm` object added.
fn print_both(
    record: &Record,
    state: Option<&SlurmState>,
    job: Option<&JobRecord>,
    json: bool,
    missing: &str,
) -> anyhow::Result<()> {
    if json {
        let mut value = match job {
            Some(job) => crate::render::job_json(job),
            None => serde_json::json!({"id": null, "state": "not_started"}),
        };
        value["slurm"] = record.slurm_json(state);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "slurm job {}: {}",
        record.slurm_job_id(),
        state.map_or_else(
            || "no longer in Slurm's records".to_string(),
            SlurmState::summary
        )
    );
    println!("folder    {}", record.dir.display());
    if let Some(dashboard) = record
        .control
        .as_ref()
        .filter(|c| !c.stopped)
        .and_then(|c| c.dashboard.as_deref())
    {
        println!("dashboard {dashboard}");
    }
    match job {
        Some(job) => print!("{}", crate::render::job_text(job)),
        None => println!("flamingo job: {missing}"),
    }
    Ok(())
}

/// Follows a Slurm job until its flamingo job ends (across requeues) and
/// Slurm has let go of the allocation.
pub async fn wait(record: &Record, progress: bool, follow: bool) -> anyhow::Result<JobRecord> {
    let job = wait_job(record, progress, follow).await?;
    // The batch job stops the agents and the control plane, then ends.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && SlurmState::query(record.slurm_job_id()).is_some_and(|s| !s.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(job)
}

async fn wait_job(record: &Record, progress: bool, follow: bool) -> anyhow::Result<JobRecord> {
    let mut last_state = String::new();
    loop {
        let record = Record::load(&record.dir)?;
        if let Some(job) = record.final_job()? {
            return Ok(job);
        }
        let state = SlurmState::query(record.slurm_job_id());
        let summary = state.as_ref().map_or_else(
            || "no longer in Slurm's records".to_string(),
            SlurmState::summary,
        );
        let started = record.control.as_ref().is_some_and(|c| {
            c.job_id.is_some()
                && !c.stopped
                && state
                    .as_ref()
                    .is_some_and(|s| s.restarts == c.restarts && s.state == "RUNNING")
        });
        if started {
            let address = record.coordinator().unwrap_or_default().to_string();
            let job_id = record.job_id().unwrap_or_default().to_string();
            if let Ok(mut session) = Session::open(&address).await {
                match session.wait(&job_id, progress, follow).await {
                    Ok(job) => {
                        // The control plane writes the final record as it stops.
                        let deadline = Instant::now() + Duration::from_secs(20);
                        while Instant::now() < deadline {
                            if let Some(job) = record.final_job()? {
                                return Ok(job);
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        return Ok(job);
                    }
                    Err(error) if progress => {
                        eprintln!("(lost the coordinator: {error:#}; following Slurm)");
                    }
                    Err(_) => {}
                }
            }
        } else if state.as_ref().is_none_or(SlurmState::is_finished) {
            // One last look: the final record may have landed meanwhile.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(job) = record.final_job()? {
                return Ok(job);
            }
            let output = record
                .dir
                .join(format!("slurm-{}.out", record.slurm_job_id()));
            bail!(
                "slurm job {} ended ({summary}) before its flamingo job did; its output ({}) ends:\n{}",
                record.slurm_job_id(),
                output.display(),
                local::tail(&output, 15)
            );
        }
        if progress && summary != last_state {
            eprintln!("slurm job {}: {summary}", record.slurm_job_id());
            last_state = summary;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `flamingoctl stop` for a Slurm job: the flamingo job is stopped through
/// its coordinator (its ranks exit, the batch job ends by itself), then
/// `scancel` releases whatever is left of the allocation.
pub async fn stop(record: &Record, json: bool) -> anyhow::Result<()> {
    let mut stopped = None;
    if let (Some(address), Some(job_id)) = (record.coordinator(), record.job_id()) {
        if let Ok(mut session) = Session::open(address).await {
            stopped = Some(session.stop(job_id).await?);
        }
    }
    let slurm_id = record.slurm_job_id();
    let before = SlurmState::query(slurm_id);
    if before.as_ref().is_some_and(|s| !s.is_finished()) {
        let status = slurm_command("scancel")?
            .arg(slurm_id)
            .status()
            .context("running scancel")?;
        if !status.success() {
            bail!("scancel {slurm_id} failed ({status})");
        }
    }
    // Until Slurm has let go of the nodes.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut state = SlurmState::query(slurm_id);
    while state
        .as_ref()
        .is_some_and(|s| !s.is_finished() || s.state == "COMPLETING")
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        state = SlurmState::query(slurm_id);
    }
    let job = match record.final_job()? {
        Some(job) => Some(job),
        None => stopped,
    };
    print_both(
        record,
        state.as_ref(),
        job.as_ref(),
        json,
        "cancelled before it was launched",
    )
}

/// A rank's log from the agents' folders (after the job's coordinator is gone).
pub fn rank_log(record: &Record, job_id: &str, rank: u32) -> Option<PathBuf> {
    let agents = std::fs::read_dir(record.dir.join("agents")).ok()?;
    agents
        .filter_map(Result::ok)
        .map(|node| {
            node.path()
                .join("jobs")
                .join(job_id)
                .join(format!("rank-{rank}.log"))
        })
        .find(|path| path.exists())
}

// ---------------------------------------------------------------------------
// Inside the allocation.

/// Processes this batch job started, stopped (TERM, then KILL) when dropped.
#[derive(Default)]
struct Children(Vec<(String, Child)>);

impl Children {
    fn push(&mut self, name: &str, child: Child) {
        self.0.push((name.to_string(), child));
    }

    fn stop(&mut self) {
        // The last started first: the data service and the coordinator
        // before etcd.
        while let Some((_, mut child)) = self.0.pop() {
            local::terminate(&[child.id()], Duration::from_secs(10));
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_service(
    command: Command,
    name: &str,
    log: &Path,
    children: &mut Children,
) -> anyhow::Result<()> {
    children.push(name, local::spawn(command, log, false)?);
    Ok(())
}

fn wait_up(name: &str, port: u16, log: &Path) -> anyhow::Result<()> {
    local::wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(30)).with_context(|| {
        format!(
            "{name} did not start; {} ends:\n{}",
            log.display(),
            local::tail(log, 15)
        )
    })
}

fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| shell_quote(&part.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

enum Outcome {
    Done(Box<JobRecord>),
    /// USR1: the warning before the time limit (or a preemption).
    Warned,
    /// SIGTERM: scancel, or a preemption's grace period.
    Terminated,
    AgentsGone(String),
}

/// `flamingoctl slurm run --job-dir DIR`: the batch script's body.
pub async fn run_in_allocation(dir: &Path) -> anyhow::Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    // First, so no signal is missed while the control plane starts.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let file = JobFile::load(dir)?;
    let slurm_id = std::env::var("SLURM_JOB_ID").context(
        "SLURM_JOB_ID is not set: `flamingoctl slurm run` is the body of the batch job that `flamingoctl launch --scheduler slurm` submits",
    )?;
    let restarts: u32 = std::env::var("SLURM_RESTART_COUNT")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    let nodes: u32 = std::env::var("SLURM_JOB_NUM_NODES")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(file.nodes);
    let previous = ControlPlane::load(dir)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    eprintln!(
        "flamingo: Slurm job {slurm_id}, start {} on {nodes} node(s); folder {}",
        restarts + 1,
        dir.display()
    );

    let mut children = Children::default();
    let host = match flamingo_common::net::host_address(file.interface.as_deref()) {
        Ok(address) => address,
        Err(error) if file.interface.is_none() => {
            eprintln!("flamingo: {error}; using 127.0.0.1, so the job cannot span machines");
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        Err(error) => return Err(error).context("finding this node's address (--interface)"),
    };
    let (coordinator, dashboard, data_service) = match &file.coordinator {
        Some(address) => (address.clone(), None, None),
        None => {
            let free = flamingo_common::net::free_local_port;
            let etcd = match &file.etcd_endpoints {
                Some(endpoints) => endpoints.clone(),
                None => {
                    let data_dir = dir.join("etcd");
                    let client_port = free()?;
                    let peer_port = free()?;
                    let spec = local::EtcdSpec {
                        data_dir: data_dir.clone(),
                        client_port,
                        peer_port,
                    };
                    let mut command = local::etcd_command(&spec)?;
                    if data_dir.exists() {
                        // A requeued job: the same data on another node or
                        // other ports; keep it, as the only member.
                        command.arg("--force-new-cluster");
                    }
                    let log = logs.join("etcd.log");
                    spawn_service(command, "etcd", &log, &mut children)?;
                    wait_up("etcd", client_port, &log)?;
                    spec.endpoint()
                }
            };
            let port = free()?;
            let http_port = free()?;
            let mut command = Command::new(local::binary("flamingo-coordinator")?);
            command
                .arg(format!("--listen=0.0.0.0:{port}"))
                .arg(format!("--http-listen=0.0.0.0:{http_port}"))
                .arg(format!("--etcd-endpoints={etcd}"))
                .arg(format!("--metrics-dir={}", dir.join("metrics").display()));
            if file.etcd_endpoints.is_some() {
                command.arg(format!("--etcd-prefix=/flamingo/slurm-{slurm_id}"));
            }
            let log = logs.join("coordinator.log");
            spawn_service(command, "the coordinator", &log, &mut children)?;
            wait_up("the coordinator", port, &log)?;
            let data_service = if file.train {
                let port = free()?;
                let mut command = Command::new(local::binary("flamingo-data-service")?);
                command.arg(format!("--listen=0.0.0.0:{port}"));
                let log = logs.join("data-service.log");
                spawn_service(command, "the data service", &log, &mut children)?;
                wait_up("the data service", port, &log)?;
                Some(format!("http://{host}:{port}"))
            } else {
                None
            };
            (
                format!("http://{host}:{port}"),
                Some(format!("http://{host}:{http_port}/")),
                data_service,
            )
        }
    };
    let mut control = ControlPlane {
        slurm_job_id: slurm_id.clone(),
        restarts,
        coordinator: coordinator.clone(),
        dashboard: dashboard.clone(),
        data_service: data_service.clone(),
        job_id: previous.and_then(|p| p.job_id),
        stopped: false,
    };
    control.save(dir)?;
    eprintln!("flamingo: coordinator {coordinator}");
    if let Some(dashboard) = &dashboard {
        eprintln!("flamingo: dashboard {dashboard}");
    }

    // One agent per node, as one job step.
    let exe = std::env::current_exe()?;
    let mut srun = slurm_command("srun")?;
    srun.arg(format!("--nodes={nodes}"))
        .arg(format!("--ntasks={nodes}"))
        .arg("--ntasks-per-node=1")
        .arg("--kill-on-bad-exit=0")
        .arg("--job-name=flamingo-agents")
        .arg(&exe)
        .args(["slurm", "agent", "--job-dir"])
        .arg(dir)
        .arg(format!("--coordinator={coordinator}"))
        .arg(format!("--slots={}", file.slots_per_node))
        .args(
            data_service
                .as_ref()
                .map(|endpoint| format!("--data-service={endpoint}")),
        );
    eprintln!("flamingo: agents: {}", command_line(&srun));
    let agents_log = logs.join("agents.log");
    let agents_file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&agents_log)?;
    srun.stdin(Stdio::null())
        .stdout(agents_file.try_clone()?)
        .stderr(agents_file);
    let mut agents = srun.spawn().context("starting the agents with srun")?;

    let job_id = match control.job_id.clone() {
        Some(id) => {
            eprintln!("flamingo: job {id} goes on (Slurm restart {restarts})");
            id
        }
        None => match launch_job(&exe, dir, &file, &coordinator) {
            Ok(id) => id,
            Err(error) => {
                eprintln!("flamingo: {error:#}");
                stop_agents(&slurm_id, &mut agents).await;
                control.stopped = true;
                control.save(dir)?;
                return Ok(2);
            }
        },
    };
    control.job_id = Some(job_id.clone());
    control.save(dir)?;
    eprintln!("flamingo: job {job_id}");

    // Events into Slurm's output file while the job runs.
    let progress = {
        let coordinator = coordinator.clone();
        let job_id = job_id.clone();
        tokio::spawn(async move {
            if let Ok(mut session) = Session::open(&coordinator).await {
                let _ = session.wait(&job_id, true, false).await;
            }
        })
    };
    let mut session = Session::open(&coordinator).await?;
    let outcome = loop {
        tokio::select! {
            _ = usr1.recv() => break Outcome::Warned,
            _ = term.recv() => break Outcome::Terminated,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Ok(job) = session.job(&job_id).await {
                    if job.state.is_terminal() && job.live_ranks().next().is_none() {
                        break Outcome::Done(Box::new(job));
                    }
                }
                if let Ok(Some(status)) = agents.try_wait() {
                    break Outcome::AgentsGone(status.to_string());
                }
            }
        }
    };
    progress.abort();

    let job = match outcome {
        Outcome::Done(job) => *job,
        Outcome::AgentsGone(status) => {
            eprintln!(
                "flamingo: the agents' step ended ({status}) while the job ran; see {}",
                agents_log.display()
            );
            match session.stop(&job_id).await {
                Ok(job) => job,
                Err(_) => session.job(&job_id).await?,
            }
        }
        Outcome::Warned | Outcome::Terminated => {
            let warned = matches!(outcome, Outcome::Warned);
            eprintln!(
                "flamingo: {}: every rank checkpoints and stops",
                if warned {
                    "USR1 (time limit or preemption ahead)"
                } else {
                    "SIGTERM"
                }
            );
            if warned {
                // Steps only: every agent drains, every training rank
                // commits a checkpoint.
                let _ = slurm_command("scancel")?
                    .args(["--signal=USR1", &slurm_id])
                    .status();
            }
            wait_for_exit(&mut agents, Duration::from_secs(180)).await;
            let job = session.job(&job_id).await?;
            let cancelled = SlurmState::query(&slurm_id).is_some_and(|s| s.state == "CANCELLED");
            if !job.state.is_terminal() && !cancelled {
                let from = job
                    .latest_checkpoint()
                    .map_or("the start".to_string(), |c| format!("step {}", c.step));
                eprintln!("flamingo: requeueing Slurm job {slurm_id}; the job resumes from {from}");
                control.stopped = true;
                control.save(dir)?;
                drop(session);
                children.stop();
                let status = slurm_command("scontrol")?
                    .args(["requeue", &slurm_id])
                    .status()?;
                if !status.success() {
                    eprintln!("flamingo: scontrol requeue {slurm_id} failed ({status}); resume by hand with --resume_from_checkpoint");
                    return Ok(1);
                }
                // Slurm ends this script as it requeues the job.
                tokio::time::sleep(Duration::from_secs(120)).await;
                return Ok(0);
            }
            if job.state.is_terminal() {
                job
            } else {
                eprintln!("flamingo: the Slurm job was cancelled; stopping job {job_id}");
                session.stop(&job_id).await?
            }
        }
    };
    write_json(&final_path(dir), &job)?;
    eprintln!(
        "flamingo: job {job_id} {}{}",
        job.state.as_str(),
        if job.message.is_empty() {
            String::new()
        } else {
            format!(": {}", job.message)
        }
    );
    control.stopped = true;
    control.save(dir)?;
    stop_agents(&slurm_id, &mut agents).await;
    drop(session);
    children.stop();
    Ok(commands::exit_code_for(&job))
}

/// The agents' step ends: USR1 drains each agent (nothing runs any more),
/// and srun is killed if they linger.
async fn stop_agents(slurm_id: &str, agents: &mut Child) {
    if let Ok(mut scancel) = slurm_command("scancel") {
        let _ = scancel.args(["--signal=USR1", slurm_id]).status();
    }
    if !wait_for_exit(agents, Duration::from_secs(60)).await {
        let _ = agents.kill();
        let _ = agents.wait();
    }
}

async fn wait_for_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Runs `flamingoctl launch` (the submitted flags) against the job's
/// coordinator; returns the job id. The data service is not named in the
/// job: it moves when the job is requeued, so the agents pass the current
/// one to their ranks.
fn launch_job(exe: &Path, dir: &Path, file: &JobFile, coordinator: &str) -> anyhow::Result<String> {
    let mut command = Command::new(exe);
    command
        // Not a local cluster's record (its data service) from the
        // submitting user's environment.
        .env("FLAMINGO_STATE_DIR", dir.join("launch"))
        .arg(format!("--coordinator={coordinator}"))
        .arg("--json")
        .arg("launch")
        .args(&file.launch_args);
    eprintln!("flamingo: launching: {}", command_line(&command));
    let output = command.output().context("running flamingoctl launch")?;
    if !output.status.success() {
        bail!(
            "the launch failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let value: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("flamingoctl launch --json printed no JSON")?;
    value["id"]
        .as_str()
        .map(String::from)
        .context("flamingoctl launch --json printed no job id")
}

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    #[arg(long)]
    pub job_dir: PathBuf,
    #[arg(long)]
    pub coordinator: String,
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// The allocation's data-service replica, for the ranks of training
    /// jobs that name none.
    #[arg(long)]
    pub data_service: Option<String>,
}

/// `flamingoctl slurm agent`: one node's agent, as srun starts it. Named
/// after the Slurm node, bound to the address on its route to the
/// coordinator; replaces this process.
pub fn exec_agent(args: &AgentArgs) -> anyhow::Error {
    let run = || -> anyhow::Result<Command> {
        let node = std::env::var("SLURMD_NODENAME").or_else(|_| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|name| name.trim().to_string())
        })?;
        let peer = args
            .coordinator
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        let address = flamingo_common::net::route_address(peer)
            .with_context(|| format!("finding the route to the coordinator {peer}"))?;
        let mut command = Command::new(local::binary("flamingo-worker")?);
        command
            .arg("agent")
            .arg(format!("--coordinator={}", args.coordinator))
            .arg(format!("--node-id={node}"))
            .arg(format!("--address={address}"))
            .arg(format!("--listen={address}:0"))
            .arg(format!("--cpu-slots={}", args.slots))
            .arg(format!(
                "--state-dir={}",
                args.job_dir.join("agents").join(&node).display()
            ))
            .arg("--drain-timeout-seconds=150");
        if let Some(endpoint) = &args.data_service {
            command.env("FLAMINGO_DATA_SERVICE", endpoint);
        }
        Ok(command)
    };
    match run() {
        Ok(mut command) => {
            use std::os::unix::process::CommandExt;
            eprintln!("flamingo agent: {}", command_line(&command));
            anyhow::Error::from(command.exec()).context("starting flamingo-worker agent")
        }
        Err(error) => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobFile {
        JobFile {
            name: "Demo run".into(),
            nodes: 2,
            slots_per_node: 4,
            launch_args: vec!["--nodes".into(), "2".into()],
            train: true,
            coordinator: None,
            etcd_endpoints: None,
            interface: None,
            workdir: PathBuf::from("/work"),
            submitted_unix_ms: 0,
            slurm_job_id: None,
        }
    }

    fn flags() -> SlurmFlags {
        SlurmFlags {
            partition: Some("gpu".into()),
            gres: Some("gpu:8".into()),
            time: Some("1-00:00:00".into()),
            account: None,
            signal_seconds: 300,
            sbatch_args: vec!["--qos=high".into()],
            etcd_endpoints: None,
            interface: None,
            slurm_dir: None,
        }
    }

    #[test]
    fn the_script_carries_the_requested_resources_and_the_warning_signal() {
        let script = render_script(
            &job(),
            Path::new("/shared/demo-1"),
            &flags(),
            Path::new("/opt/flamingo/bin/flamingoctl"),
        )
        .unwrap();
        for line in [
            "#SBATCH --job-name=flamingo-demo-run",
            "#SBATCH --nodes=2",
            "#SBATCH --ntasks-per-node=1",
            "#SBATCH --output=/shared/demo-1/slurm-%j.out",
            "#SBATCH --chdir=/work",
            "#SBATCH --requeue",
            "#SBATCH --signal=B:USR1@300",
            "#SBATCH --partition=gpu",
            "#SBATCH --gres=gpu:8",
            "#SBATCH --time=1-00:00:00",
            "#SBATCH --qos=high",
            "exec /opt/flamingo/bin/flamingoctl slurm run --job-dir /shared/demo-1",
        ] {
            assert!(
                script.lines().any(|l| l == line),
                "missing {line}:\n{script}"
            );
        }
        assert!(!script.contains("--account"));
        assert!(!script.contains("{{"));
        // sbatch reads #SBATCH lines only before the first command.
        let lines: Vec<&str> = script.lines().collect();
        let first_command = lines
            .iter()
            .position(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        let last_sbatch = lines
            .iter()
            .rposition(|l| l.starts_with("#SBATCH"))
            .unwrap();
        assert!(last_sbatch < first_command);
    }

    #[test]
    fn values_that_would_break_an_sbatch_line_are_refused() {
        let mut bad = flags();
        bad.partition = Some("gpu debug".into());
        let error = render_script(&job(), Path::new("/d"), &bad, Path::new("/f")).unwrap_err();
        assert!(error.to_string().contains("--partition"), "{error}");
        let mut bad = flags();
        bad.sbatch_args = vec!["qos=high".into()];
        let error = render_script(&job(), Path::new("/d"), &bad, Path::new("/f")).unwrap_err();
        assert!(error.to_string().contains("--sbatch-arg"), "{error}");
    }

    #[test]
    fn scontrol_output_is_parsed() {
        let line = "JobId=12 JobName=flamingo-demo UserId=root(0) JobState=PENDING Reason=Resources Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 RunTime=00:00:00 TimeLimit=01:00:00 NodeList=(null)";
        let state = SlurmState::parse(line).unwrap();
        assert_eq!(state.state, "PENDING");
        assert_eq!(state.reason, "Resources");
        assert_eq!(state.restarts, 1);
        assert_eq!(state.summary(), "PENDING (Resources), requeued 1×");
        assert!(!state.is_finished());
        assert!(SlurmState::parse("slurm_load_jobs error: Invalid job id specified").is_none());
    }

    #[test]
    fn paths_are_quoted_for_bash_only_when_needed() {
        assert_eq!(shell_quote("/a/b-c_d.e"), "/a/b-c_d.e");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
