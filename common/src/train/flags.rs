//! The flags of a training run, made from [`TrainJob::FIELDS`]: one
//! `--<field>` per field (OpenFlamingo's names, underscores included), with
//! the field's documentation as its help. What a flag takes follows from the
//! field's default: a switch for a boolean, a comma-separated list for a
//! list, a number for a number, text otherwise. The values given become an
//! overlay on the `--config` file (or the defaults) and are decoded by the
//! same serde types as the file, so both are checked alike.

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use serde_json::{Map, Value};

use super::TrainJob;
use crate::CommonError;

/// A run's settings: a TOML file and OpenFlamingo-named flags over it
/// (shared by `flamingoctl train` and `flamingoctl launch`).
#[derive(Debug, Clone, Default)]
pub struct TrainFlags {
    /// `--config`: a TOML file of the fields (flags override it).
    pub config: Option<PathBuf>,
    /// The fields given as flags, as JSON values.
    overrides: Map<String, Value>,
}

/// What a field's flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Switch,
    List,
    Integer,
    Float,
    Text,
}

fn kinds() -> Vec<(&'static str, &'static str, FlagKind)> {
    let defaults = serde_json::to_value(TrainJob::default()).expect("the defaults serialize");
    TrainJob::FIELDS
        .iter()
        .map(|&(name, doc)| {
            let kind = match &defaults[name] {
                Value::Bool(_) => FlagKind::Switch,
                Value::Array(_) => FlagKind::List,
                Value::Number(number) if number.is_f64() => FlagKind::Float,
                Value::Number(_) => FlagKind::Integer,
                _ => FlagKind::Text,
            };
            (name, doc, kind)
        })
        .collect()
}

impl TrainFlags {
    /// Whether a field was given as a flag.
    pub fn given(&self, field: &str) -> bool {
        self.overrides.contains_key(field)
    }

    /// A flag's text value, if given (`--run_name`, `--model`, …).
    pub fn text(&self, field: &str) -> Option<&str> {
        self.overrides.get(field).and_then(Value::as_str)
    }

    /// Sets a field as if its flag had been given.
    pub fn set(&mut self, field: &str, value: impl Into<Value>) {
        self.overrides.insert(field.to_string(), value.into());
    }

    /// The file's fields (or the defaults), then the flags given. Not yet
    /// validated: see [`TrainJob::validate`].
    pub fn overlay(&self) -> Result<TrainJob, CommonError> {
        let base = match &self.config {
            Some(path) => TrainJob::from_toml_file(path)?,
            None => TrainJob::default(),
        };
        let mut merged = serde_json::to_value(&base).expect("a run serializes");
        for (field, value) in &self.overrides {
            merged[field] = value.clone();
            // Decoded one flag at a time, so a bad value names its flag.
            serde_json::from_value::<TrainJob>(merged.clone())
                .map_err(|error| CommonError::invalid(format!("--{field}"), error.to_string()))?;
        }
        Ok(serde_json::from_value(merged).expect("checked field by field"))
    }
}

impl FromArgMatches for TrainFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Self::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        if let Some(path) = matches.get_one::<PathBuf>("config") {
            self.config = Some(path.clone());
        }
        for (name, _, kind) in kinds() {
            let value = match kind {
                FlagKind::Switch => matches.get_flag(name).then_some(Value::Bool(true)),
                FlagKind::List => matches.get_many::<String>(name).map(|values| {
                    Value::Array(values.map(|value| Value::String(value.clone())).collect())
                }),
                FlagKind::Integer => matches.get_one::<u64>(name).map(|&value| value.into()),
                FlagKind::Float => matches.get_one::<f64>(name).map(|&value| value.into()),
                FlagKind::Text => matches
                    .get_one::<String>(name)
                    .map(|value| value.clone().into()),
            };
            if let Some(value) = value {
                self.overrides.insert(name.to_string(), value);
            }
        }
        Ok(())
    }
}

impl Args for TrainFlags {
    fn augment_args(command: Command) -> Command {
        let mut command = command.arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("A TOML file of the run's fields (the flags below override it)"),
        );
        for (name, doc, kind) in kinds() {
            let help = doc.lines().map(str::trim).collect::<Vec<_>>().join(" ");
            let arg = Arg::new(name).long(name).help(help.trim().to_string());
            let arg = match kind {
                FlagKind::Switch => arg.action(ArgAction::SetTrue),
                FlagKind::List => arg.action(ArgAction::Append).value_delimiter(','),
                FlagKind::Integer => arg.value_parser(clap::value_parser!(u64)),
                FlagKind::Float => arg.value_parser(clap::value_parser!(f64)),
                FlagKind::Text => arg,
            };
            command = command.arg(arg);
        }
        command
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Precision, Strategy};
    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        flags: TrainFlags,
    }

    fn parse(args: &[&str]) -> Result<TrainJob, String> {
        let mut argv = vec!["train"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|error| error.to_string())?;
        cli.flags.overlay().map_err(|error| error.to_string())
    }

    #[test]
    fn every_field_is_a_flag_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "batch_size_laion = 3\nwarmup_steps = 7\nprecision = \"amp_bf16\"\n",
        )
        .unwrap();
        let job = parse(&[
            "--config",
            file.to_str().unwrap(),
            "--warmup_steps",
            "9",
            "--learning_rate",
            "3e-3",
            "--fsdp_sharding_strategy",
            "full",
            "--gradient_checkpointing",
            "--data_service",
            "http://a:1,http://b:2",
            "--laion_shards",
            "x-{0..3}.tar",
            "--mmc4_max_num_images",
            "4",
        ])
        .unwrap();
        assert_eq!(job.batch_size_laion, 3, "from the file");
        assert_eq!(job.warmup_steps, 9, "the flag wins");
        assert_eq!(job.precision, Precision::AmpBf16);
        assert_eq!(job.learning_rate, 3e-3);
        assert_eq!(job.fsdp_sharding_strategy, Strategy::Full);
        assert!(job.gradient_checkpointing);
        assert_eq!(job.data_service, ["http://a:1", "http://b:2"]);
        assert_eq!(job.laion_shards.as_deref(), Some("x-{0..3}.tar"));
        assert_eq!(job.mmc4_max_num_images, 4);
        assert!(
            !job.audit_samples,
            "a switch not given keeps the file's value"
        );
    }

    #[test]
    fn bad_values_name_their_flag() {
        let error = parse(&["--fsdp_sharding_strategy", "sharded"]).unwrap_err();
        assert!(
            error.contains("fsdp_sharding_strategy") && error.contains("sharded"),
            "{error}"
        );
        // (The schedule's names moved here from the engine's parser.)
        let cosine = parse(&["--lr_scheduler", "cosine"]).unwrap();
        assert_eq!(cosine.lr_scheduler, super::super::LrScheduler::Cosine);
        let error = parse(&["--lr_scheduler", "step"]).unwrap_err();
        assert!(
            error.contains("--lr_scheduler") && error.contains("step"),
            "{error}"
        );
        let error = parse(&["--batch_size_laion", "many"]).unwrap_err();
        assert!(error.contains("--batch_size_laion"), "{error}");
        let error = parse(&["--batch_size", "3"]).unwrap_err();
        assert!(error.contains("--batch_size"), "{error}");
    }
}
