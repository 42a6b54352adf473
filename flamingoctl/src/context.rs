//! What every command may need: where the local state is, which
//! coordinator to talk to, whether a job id names a Slurm job (whose own
//! coordinator then answers), and whether to print JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use flamingo_common::{JobRecord, JobState};
use flamingo_launch::slurm;

pub struct Context {
    pub state_dir: PathBuf,
    /// The coordinator: `--coordinator`, the local cluster's, or the default.
    pub address: String,
    /// Whether `--coordinator` (or `FLAMINGO_COORDINATOR`) named it.
    pub explicit: bool,
    pub json: bool,
}

impl Context {
    pub fn new(coordinator: Option<String>, state_dir: Option<PathBuf>, json: bool) -> Self {
        let state_dir = state_dir.unwrap_or_else(flamingo_common::paths::local_cluster_dir);
        let address = flamingo_client::address::resolve(coordinator.as_deref(), &state_dir);
        Self {
            state_dir,
            address,
            explicit: coordinator.is_some(),
            json,
        }
    }

    /// The Slurm job (by Slurm or flamingo id) `job` names, unless the
    /// coordinator was given explicitly.
    pub fn slurm_record(&self, job: &str) -> anyhow::Result<Option<slurm::Record>> {
        // A Slurm job id (digits; flamingo's ids never are) is looked up
        // even with an explicit coordinator.
        let slurm_id = !job.is_empty() && job.bytes().all(|byte| byte.is_ascii_digit());
        if self.explicit && !slurm_id {
            return Ok(None);
        }
        Ok(slurm::find(&slurm::slurm_dir(None), job)?)
    }

    /// The coordinator and flamingo job id for `job`: a running Slurm job's
    /// own coordinator when `job` names one.
    pub fn route(&self, job: &str) -> anyhow::Result<(String, String)> {
        if let Some(record) = self.slurm_record(job)? {
            if let (Some(coordinator), Some(job_id)) = (record.coordinator(), record.job_id()) {
                return Ok((coordinator.to_string(), job_id.to_string()));
            }
            if let Some(job_id) = record.job_id() {
                return Ok((self.address.clone(), job_id.to_string()));
            }
        }
        Ok((self.address.clone(), job.to_string()))
    }

    /// A session with the coordinator that answers for `job`, and the job's
    /// flamingo id.
    pub async fn session_for(
        &self,
        job: &str,
    ) -> anyhow::Result<(flamingo_client::Session, String)> {
        let (address, job) = self.route(job)?;
        Ok((flamingo_client::Session::open(&address).await?, job))
    }

    /// A session with this context's coordinator.
    pub async fn session(&self) -> anyhow::Result<flamingo_client::Session> {
        Ok(flamingo_client::Session::open(&self.address).await?)
    }

    /// Prints `job` as a table or JSON.
    pub fn print_job(&self, job: &JobRecord) {
        print!("{}", flamingo_client::render::job(job, self.json));
    }
}

/// Exit status for a finished job: success only when it succeeded.
pub fn exit_code_for(job: &JobRecord) -> ExitCode {
    match job.state {
        JobState::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
