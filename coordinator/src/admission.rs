//! What the coordinator checks of a train job before it queues it, so a
//! bad run is refused at `launch` with the field named instead of failing
//! on every rank after scheduling: the run settings decode, the model spec
//! and every local shard exist (when this coordinator sees the nodes'
//! filesystem; `--no-path-checks` otherwise), and the batch sizes and world
//! size give at least one step.

use std::path::Path;

use flamingo_common::{CommonError, JobKind, JobSpec};
use serde_json::Value;

pub fn check(spec: &JobSpec, check_paths: bool) -> Result<(), CommonError> {
    let JobKind::Train { config_json } = &spec.kind else {
        return Ok(());
    };
    let run: Value = serde_json::from_str(config_json)
        .map_err(|error| CommonError::invalid("train.config_json", error.to_string()))?;
    let text = |field: &str| run.get(field).and_then(Value::as_str);
    let number = |field: &str| run.get(field).and_then(Value::as_u64).unwrap_or(0);
    let model = text("model").ok_or_else(|| {
        CommonError::invalid("train.model", "missing; give the model spec file (--model)")
    })?;
    if check_paths && !model.contains("://") && !Path::new(model).exists() {
        return Err(CommonError::invalid(
            "train.model",
            format!("{model} does not exist; give a model spec path every node can read"),
        ));
    }
    let datasets: Vec<(&str, &str)> = ["laion", "mmc4"]
        .into_iter()
        .filter_map(|name| Some((name, text(&format!("{name}_shards"))?)))
        .collect();
    if datasets.is_empty() {
        return Err(CommonError::invalid(
            "train.laion_shards",
            "no dataset: give laion_shards, mmc4_shards or both",
        ));
    }
    let world = u64::from(spec.world_size());
    for (name, pattern) in datasets {
        let field = format!("train.{name}_shards");
        let urls = flamingo_common::brace::expand(pattern)
            .map_err(|error| CommonError::invalid(&field, error.to_string()))?;
        if check_paths {
            for url in urls
                .iter()
                .filter(|url| !url.contains("://") || url.starts_with("file://"))
            {
                let path = url.strip_prefix("file://").unwrap_or(url);
                if !Path::new(path).exists() {
                    return Err(CommonError::invalid(
                        &field,
                        format!("shard {path} does not exist (pattern {pattern})"),
                    ));
                }
            }
        }
        let batch = number(&format!("batch_size_{name}"));
        if batch == 0 {
            return Err(CommonError::invalid(
                format!("train.batch_size_{name}"),
                "must be at least 1 (samples per rank)",
            ));
        }
        // The epoch's steps come from MMC4's budget when it is trained,
        // else LAION's (OpenFlamingo's rule).
        let paces = name == "mmc4" || text("mmc4_shards").is_none();
        let samples = number(&format!("train_num_samples_{name}"));
        let global = batch * world * number("gradient_accumulation_steps").max(1);
        if paces && samples < global {
            return Err(CommonError::invalid(
                format!("train.train_num_samples_{name}"),
                format!(
                    "{samples} samples per epoch is less than one optimizer step's ({batch} per rank × {world} ranks × gradient accumulation)"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn train(run: Value) -> JobSpec {
        JobSpec {
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
        check(&train(good.clone()), true).expect("a good run");
        let refused = |change: &dyn Fn(&mut Value), paths: bool| {
            let mut run = good.clone();
            change(&mut run);
            check(&train(run), paths)
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
