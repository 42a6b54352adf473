//! What the coordinator checks of a train job before it queues it, so a
//! bad run is refused at `launch` with the field named instead of failing
//! on every rank after scheduling: the run settings decode, the model spec
//! and every local shard exist (when this coordinator sees the nodes'
//! filesystem; `--no-path-checks` otherwise), and the batch sizes and world
//! size give at least one step.

use flamingo_common::train::TrainJob;
use flamingo_common::{CommonError, JobKind, JobSpec};

use crate::Limits;

/// Checks a submitted job against this coordinator's limits, then a train
/// job for its world size: the same rules as `flamingoctl` and the ranks
/// ([`TrainJob::validate`]), plus the paths when `check_paths`. Every error
/// names the field (`train.<field>` for the run's) and the limit.
pub fn check(spec: &JobSpec, check_paths: bool, limits: &Limits) -> Result<(), CommonError> {
    check_limits(spec, limits)?;
    let JobKind::Train { config_json } = &spec.kind else {
        return Ok(());
    };
    let in_train = |error: CommonError| match error {
        CommonError::InvalidField { field, message } => {
            CommonError::invalid(format!("train.{field}"), message)
        }
        other => other,
    };
    let run: TrainJob = serde_json::from_str(config_json)
        .map_err(|error| CommonError::invalid("train.config_json", error.to_string()))?;
    run.validate(u64::from(spec.world_size()))
        .map_err(in_train)?;
    for (name, pattern) in run.datasets() {
        let shards = flamingo_common::brace::count(pattern).map_err(|error| {
            CommonError::invalid(format!("train.{name}_shards"), error.to_string())
        })?;
        if shards > u128::from(limits.max_shards) {
            return Err(CommonError::invalid(
                format!("train.{name}_shards"),
                format!(
                    "'{pattern}' names {shards} shards, more than this coordinator's limit of {} (--max-shards)",
                    limits.max_shards
                ),
            ));
        }
    }
    if check_paths {
        run.check_paths(limits.max_shards).map_err(in_train)?;
    }
    Ok(())
}

/// Sizes a job may ask for: nodes and slots under the configured maxima
/// (which bound the placement work the request causes), and a spec that
/// fits an etcd request.
fn check_limits(spec: &JobSpec, limits: &Limits) -> Result<(), CommonError> {
    let over = |field: &str, value: u64, limit: u64, flag: &str| {
        CommonError::invalid(
            field,
            format!("{value} is more than this coordinator's limit of {limit} ({flag})"),
        )
    };
    if spec.nodes > limits.max_job_nodes {
        return Err(over(
            "nodes",
            spec.nodes.into(),
            limits.max_job_nodes.into(),
            "--max-job-nodes",
        ));
    }
    if spec.slots_per_node > limits.max_slots_per_node {
        return Err(over(
            "slots_per_node",
            spec.slots_per_node.into(),
            limits.max_slots_per_node.into(),
            "--max-slots-per-node",
        ));
    }
    let bytes = serde_json::to_vec(spec)
        .map_err(|error| CommonError::invalid("spec", error.to_string()))?
        .len();
    if bytes > limits.max_spec_bytes {
        return Err(CommonError::invalid(
            "spec",
            format!(
                "{bytes} bytes is more than this coordinator's limit of {} (--max-spec-bytes); \
                 keep large settings in files the nodes read, not in the environment or argv",
                limits.max_spec_bytes
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

    use super::*;

    fn train(run: Value) -> JobSpec {
        JobSpec {
            submitter: String::new(),
            name: String::new(),
            nodes: 2,
            slots_per_node: 2,
            min_nodes: 0,
            kind: JobKind::Train {
                config_json: run.to_string(),
            },
            env: BTreeMap::new(),
            policy: Default::default(),
        }
    }

    #[test]
    fn a_bad_run_is_refused_with_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.toml");
        std::fs::write(&model, "").unwrap();
        for shard in ["a-0.tar", "a-1.tar"] {
            std::fs::write(dir.path().join(shard), "").unwrap();
        }
        let shards = format!("{}/a-{{0..1}}.tar", dir.path().display());
        let good = serde_json::json!({
            "model": model, "laion_shards": shards,
            "batch_size_laion": 2, "train_num_samples_laion": 8,
        });
        check(&train(good.clone()), true, &Limits::default()).expect("a good run");
        let refused = |change: &dyn Fn(&mut Value), paths: bool| {
            let mut run = good.clone();
            change(&mut run);
            check(&train(run), paths, &Limits::default())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let missing_shard = refused(
            &|run| run["laion_shards"] = format!("{}/a-{{0..2}}.tar", dir.path().display()).into(),
            true,
        );
        assert!(
            missing_shard
                .as_ref()
                .unwrap_err()
                .contains("train.laion_shards")
                && missing_shard
                    .unwrap_err()
                    .contains("a-2.tar does not exist")
        );
        let no_model = refused(&|run| run["model"] = "/nowhere/model.toml".into(), true);
        assert!(no_model.unwrap_err().contains("train.model"));
        // Without path checks only the arithmetic is checked.
        assert!(refused(&|run| run["model"] = "/nowhere/model.toml".into(), false).is_ok());
        let small = refused(&|run| run["train_num_samples_laion"] = 7.into(), false);
        assert!(small
            .unwrap_err()
            .contains("train.train_num_samples_laion: 7 samples per epoch is less than one optimizer step's (2 per rank × 4 ranks"));
        let zero = refused(&|run| run["batch_size_laion"] = 0.into(), false);
        assert!(zero.unwrap_err().contains("train.batch_size_laion"));
        let none = refused(&|run| run["laion_shards"] = Value::Null, false);
        assert!(none.unwrap_err().contains("no dataset"));
    }
}
