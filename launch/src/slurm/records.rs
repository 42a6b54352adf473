//! A Slurm job's folder: what was submitted (`job.json`), where its control
//! plane runs (`control-plane.json`), the final record of its flamingo job
//! (`final.json`), and Slurm's own view of it (`scontrol show job`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use flamingo_common::JobRecord;
use serde::{Deserialize, Serialize};

use super::slurm_command;
use crate::{LaunchError, Result};

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
    /// The CA folder of the cluster it joins; `None`: `<job dir>/pki`.
    #[serde(default)]
    pub pki: Option<PathBuf>,
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
    pub(crate) fn path(dir: &Path) -> PathBuf {
        dir.join("job.json")
    }

    /// The CA the job's certificates come from.
    pub fn pki_dir(&self, dir: &Path) -> PathBuf {
        self.pki.clone().unwrap_or_else(|| dir.join("pki"))
    }

    pub fn load(dir: &Path) -> Result<Self> {
        read_json(&Self::path(dir))
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
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

    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(dir);
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        write_json(&Self::path(dir), self)
    }
}

pub(crate) fn final_path(dir: &Path) -> PathBuf {
    dir.join("final.json")
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| LaunchError::file(path, "reading", source))?;
    serde_json::from_slice(&bytes).map_err(|error| LaunchError::Record {
        path: path.display().to_string(),
        message: format!("not what flamingoctl wrote there ({error})"),
    })
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let temporary = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).expect("a record serializes");
    std::fs::write(&temporary, bytes)
        .map_err(|source| LaunchError::file(&temporary, "writing", source))?;
    std::fs::rename(&temporary, path).map_err(|source| LaunchError::file(path, "writing", source))
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
    /// A pending job's place among the cluster's pending jobs in the order
    /// Slurm will consider them (priority, then submission): (place from
    /// 1, pending jobs).
    pub position: Option<(usize, usize)>,
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
        let mut state = output
            .status
            .success()
            .then(|| Self::parse(&String::from_utf8_lossy(&output.stdout)))
            .flatten()?;
        if state.state == "PENDING" {
            state.position = Self::queue_position(slurm_job_id);
        }
        Some(state)
    }

    /// Where a pending job stands in Slurm's queue (`squeue` sorted by
    /// priority, then job id).
    fn queue_position(slurm_job_id: &str) -> Option<(usize, usize)> {
        let output = slurm_command("squeue")
            .ok()?
            .args([
                "--noheader",
                "--states=PENDING",
                "--sort=-p,i",
                "--format=%i",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        position_in(&String::from_utf8_lossy(&output.stdout), slurm_job_id)
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

    pub(crate) fn summary(&self) -> String {
        let mut out = self.state.clone();
        if !self.nodes.is_empty() && self.nodes != "(null)" {
            out.push_str(&format!(" on {}", self.nodes));
        }
        if self.state == "PENDING" && !self.reason.is_empty() && self.reason != "None" {
            out.push_str(&format!(" ({})", self.reason));
        }
        if let Some((place, pending)) = self.position {
            out.push_str(&format!(", {place} of {pending} pending in the queue"));
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

/// The place (from 1) of `slurm_job_id` in `squeue`'s list of job ids, and
/// the list's length. An array job's tasks (`12_3`) count as their job.
fn position_in(list: &str, slurm_job_id: &str) -> Option<(usize, usize)> {
    let ids: Vec<&str> = list.split_whitespace().collect();
    let place = ids
        .iter()
        .position(|id| *id == slurm_job_id || id.split(['_', '+']).next() == Some(slurm_job_id))?;
    Some((place + 1, ids.len()))
}

/// A Slurm job's folder, found by either id.
pub struct Record {
    pub dir: PathBuf,
    pub file: JobFile,
    pub control: Option<ControlPlane>,
}

impl Record {
    /// A session with the job's coordinator, as the admin of the job's CA
    /// (created in `<job dir>/pki` on first use).
    pub async fn session(&self, address: &str) -> anyhow::Result<flamingo_client::Session> {
        let credentials =
            crate::pki::ClusterCredentials::prepare(&self.file.pki_dir(&self.dir), &[])?;
        crate::pki::admin_session(&credentials, address).await
    }

    pub fn load(dir: &Path) -> Result<Self> {
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
    pub fn final_job(&self) -> Result<Option<JobRecord>> {
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

    pub(crate) fn slurm_json(&self, state: Option<&SlurmState>) -> serde_json::Value {
        serde_json::json!({
            "job_id": self.slurm_job_id(),
            "state": state.map(|s| s.state.clone()),
            "reason": state.map(|s| s.reason.clone()),
            "nodes": state.map(|s| s.nodes.clone()),
            "restarts": state.map(|s| s.restarts),
            "queue_position": state.and_then(|s| s.position).map(|(place, _)| place),
            "pending_jobs": state.and_then(|s| s.position).map(|(_, pending)| pending),
            "dir": self.dir,
            "dashboard": self.control.as_ref().and_then(|c| c.dashboard.clone()),
        })
    }
}

/// The Slurm job whose Slurm id, flamingo job id or folder name is `id`.
pub fn find(root: &Path, id: &str) -> Result<Option<Record>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_output_is_parsed() {
        let line = "JobId=12 JobName=flamingo-demo UserId=root(0) JobState=PENDING Reason=Resources Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 RunTime=00:00:00 TimeLimit=01:00:00 NodeList=(null)";
        let state = SlurmState::parse(line).unwrap();
        assert_eq!(state.state, "PENDING");
        assert_eq!(state.reason, "Resources");
        assert_eq!(state.restarts, 1);
        assert_eq!(state.summary(), "PENDING (Resources), requeued 1×");
        let queued = SlurmState {
            position: position_in("31\n12\n40_[1-3]\n", "40"),
            ..state.clone()
        };
        assert_eq!(queued.position, Some((3, 3)));
        assert_eq!(
            queued.summary(),
            "PENDING (Resources), 3 of 3 pending in the queue, requeued 1×"
        );
        assert_eq!(position_in("31\n12\n", "7"), None);
        assert!(!state.is_finished());
        assert!(SlurmState::parse("slurm_load_jobs error: Invalid job id specified").is_none());
    }
}
