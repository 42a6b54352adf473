//! The batch script of a Slurm job (deploy/slurm/flamingo.sbatch with the
//! job's `#SBATCH` lines) and its submission: the job's folder, `job.json`,
//! `sbatch --parsable`.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::records::JobFile;
use super::{slurm_command, slurm_dir, SlurmFlags};
use crate::{LaunchError, Result};

/// The sbatch template; `{{SBATCH}}`, `{{FLAMINGOCTL}}` and `{{JOB_DIR}}`
/// are filled in.
pub const TEMPLATE: &str = include_str!("../../../deploy/slurm/flamingo.sbatch");

/// A value for an `#SBATCH` line: one word, no line breaks.
fn sbatch_value(flag: &'static str, value: &str) -> Result<String> {
    if value.is_empty() || value.chars().any(char::is_whitespace) {
        return Err(LaunchError::Setting {
            field: flag,
            message: format!("'{value}': give one word without spaces"),
        });
    }
    Ok(value.to_string())
}

/// Quotes `text` for bash when it needs it.
pub(crate) fn shell_quote(text: &str) -> String {
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

/// `command` as one line a shell would run.
pub(crate) fn command_line(command: &std::process::Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| shell_quote(&part.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sbatch script for `job`, whose folder is `dir`.
pub fn render_script(
    job: &JobFile,
    dir: &Path,
    flags: &SlurmFlags,
    flamingoctl: &Path,
) -> Result<String> {
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
            return Err(LaunchError::Setting {
                field: "sbatch-arg",
                message: format!("'{extra}': give one sbatch option, e.g. --sbatch-arg=--qos=high"),
            });
        }
        lines.push(format!("#SBATCH {extra}"));
    }
    for path in [dir, job.workdir.as_path(), flamingoctl] {
        if path.display().to_string().chars().any(char::is_whitespace) {
            return Err(LaunchError::Setting {
                field: "slurm-dir",
                message: format!(
                    "{}: Slurm's #SBATCH lines cannot hold a path with spaces; use another --slurm-dir or working directory",
                    path.display()
                ),
            });
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

/// What `launch --scheduler slurm` submits.
pub struct Submission {
    pub name: String,
    pub nodes: u32,
    pub slots_per_node: u32,
    pub launch_args: Vec<String>,
    pub train: bool,
    pub coordinator: Option<String>,
    /// The CA of the cluster the job joins (`coordinator`); `None`: the
    /// job's own, in its folder.
    pub pki: Option<PathBuf>,
}

/// A job's folder and script, and its Slurm id once submitted.
#[derive(Debug)]
pub struct Submitted {
    pub dir: PathBuf,
    pub file: JobFile,
    pub script: String,
}

/// Writes the job's folder and script and submits it (with `dry_run`, only
/// writes them: the folder is ready for `sbatch`).
pub fn submit(
    submission: Submission,
    flags: &SlurmFlags,
    dry_run: bool,
) -> anyhow::Result<Submitted> {
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
        pki: submission.pki,
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
        return Ok(Submitted {
            dir,
            file: job,
            script,
        });
    }
    let output = slurm_command("sbatch")?
        .arg("--parsable")
        .arg(&script_path)
        .output()
        .context("running sbatch")?;
    if !output.status.success() {
        anyhow::bail!(
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
    Ok(Submitted {
        dir,
        file: job,
        script,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn job() -> JobFile {
        JobFile {
            name: "Demo run".into(),
            nodes: 2,
            slots_per_node: 4,
            launch_args: vec!["--nodes".into(), "2".into()],
            train: true,
            coordinator: None,
            pki: None,
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
    fn paths_are_quoted_for_bash_only_when_needed() {
        assert_eq!(shell_quote("/a/b-c_d.e"), "/a/b-c_d.e");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
