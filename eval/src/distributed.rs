//! Evaluation over several ranks (`flamingoctl launch --job eval`, or any
//! launcher that sets torchrun's environment): every rank predicts its
//! share of the batches (batch b goes to rank b mod world, see
//! [`crate::run::Settings`]), and rank 0 gathers the predictions over Gloo,
//! in rank order, to score them. Batches are those of one process, so the
//! numbers are the same.

use flamingo_collectives::{Backend, ProcessGroup, ProcessGroupConfig, ReduceOp};
use tch::{Kind, Tensor};

use crate::datasets::Dataset;
use crate::run::{self, Model, Outputs, Settings};
use crate::{EvalError, Result};

/// Joins the ranks when started as one of several (`WORLD_SIZE` > 1); `None`
/// alone.
pub fn process_group() -> Result<Option<ProcessGroup>> {
    let world: i64 = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1);
    if world <= 1 {
        return Ok(None);
    }
    let config = ProcessGroupConfig::from_env(Backend::Gloo, std::time::Duration::from_secs(1800))?;
    Ok(Some(ProcessGroup::new(&config)?))
}

/// This rank's predictions, and with a group every rank's merged on rank 0
/// (`None` on the others).
pub fn predict(
    model: &Model,
    dataset: &Dataset,
    settings: &Settings,
    group: Option<&ProcessGroup>,
) -> Result<Option<Outputs>> {
    let outputs = run::predict(model, dataset, settings)?;
    let Some(group) = group else {
        return Ok(Some(outputs));
    };
    let mine = serde_json::to_vec(&outputs).expect("predictions serialize");
    let gathered = all_gather_bytes(group, &mine)?;
    if group.rank() != 0 {
        return Ok(None);
    }
    let parts = gathered
        .iter()
        .enumerate()
        .map(|(rank, bytes)| {
            serde_json::from_slice::<Outputs>(bytes).map_err(|error| EvalError::Gather {
                rank,
                message: error.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    eprintln!("gathered the predictions of {} ranks", parts.len());
    Ok(Some(run::merge(parts)))
}

/// Every rank's `bytes`, in rank order, on every rank.
fn all_gather_bytes(group: &ProcessGroup, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let world = group.world_size();
    let lengths = Tensor::zeros([world], (Kind::Int64, tch::Device::Cpu));
    let _ = lengths.get(group.rank()).fill_(bytes.len() as i64);
    group.all_reduce(&lengths, ReduceOp::Sum)?;
    let lengths: Vec<i64> = Vec::<i64>::try_from(&lengths)?;
    let longest = lengths.iter().copied().max().unwrap_or(0).max(1);
    let mine = Tensor::zeros([longest], (Kind::Uint8, tch::Device::Cpu));
    if !bytes.is_empty() {
        mine.narrow(0, 0, bytes.len() as i64)
            .copy_(&Tensor::from_slice(bytes));
    }
    let all = Tensor::zeros([world * longest], (Kind::Uint8, tch::Device::Cpu));
    group.all_gather_into_tensor(&all, &mine)?;
    let all: Vec<u8> = Vec::<u8>::try_from(&all)?;
    Ok(lengths
        .iter()
        .enumerate()
        .map(|(rank, length)| {
            let start = rank * longest as usize;
            all[start..start + *length as usize].to_vec()
        })
        .collect())
}
