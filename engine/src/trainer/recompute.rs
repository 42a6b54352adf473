//! The unit-by-unit pass (`full`, `hybrid`, `--gradient_checkpointing`):
//! forward unit by unit without a graph, keeping each layer's input; the
//! loss and the head's backward; then each layer recomputed with a graph
//! and backpropagated on its own, last to first, the media latents'
//! gradient summed over the cross-attention blocks; then the input
//! embedding and the perceiver. The vision tower only runs forward. Units
//! are gathered in the order the pass uses them, one ahead.
//!
//! Without `--gradient_checkpointing` (`full` and `hybrid`), nothing is
//! recomputed, as torch FSDP without activation checkpointing: each unit's
//! forward keeps its graph, and its gathered weights' bytes are freed right
//! after it ([`crate::units::park`]: the buffers, which the graph's saved
//! views point into, stay); before the unit's backward the same buffers
//! are gathered into again, the next unit's gather running meanwhile.

use flamingo_collectives::ProcessGroup;
use flamingo_model::{Flamingo, Unit};
use tch::{Kind, Tensor};

use super::loss::token_loss;
use super::phases::{mark, PhaseTimer};
use super::state::ParameterState;
use super::{MicroLoss, TrainConfig, TrainError};
use crate::batch::TrainBatch;
use crate::units::{self, Gathered};

/// What one pass works with.
pub(crate) struct Pass<'a> {
    pub(crate) model: &'a Flamingo,
    pub(crate) state: &'a mut dyn ParameterState,
    /// Every rank, for the global loss.
    pub(crate) group: Option<&'a ProcessGroup>,
    pub(crate) config: &'a TrainConfig,
    pub(crate) phases: &'a mut Option<PhaseTimer>,
}

/// Gathers units in the order a pass uses them, one ahead.
struct Prefetcher {
    order: Vec<usize>,
    position: usize,
    ahead: Option<Gathered>,
}

/// The unit indices of the model's parts.
struct Indices {
    vision: usize,
    vision_blocks: Vec<usize>,
    perceiver: usize,
    text: usize,
    layers: Vec<usize>,
}

impl Indices {
    /// The units of the forward pass and the head, in order: the vision
    /// tower's ends, its blocks, its ends again (the patch tokens), the
    /// perceiver, the embedding, the layers, the head.
    fn forward_order(&self) -> Vec<usize> {
        let mut order = vec![self.vision];
        order.extend(&self.vision_blocks);
        order.extend([self.vision, self.perceiver, self.text]);
        order.extend(&self.layers);
        order.push(self.text);
        order
    }
}

impl Pass<'_> {
    fn indices(&self) -> Indices {
        let index = |unit: Unit| {
            self.state
                .plans()
                .iter()
                .position(|plan| plan.unit == unit)
                .expect("every unit has a plan")
        };
        Indices {
            vision: index(Unit::Vision),
            vision_blocks: (0..self.model.vision_block_count())
                .map(|block| index(Unit::VisionBlock(block)))
                .collect(),
            perceiver: index(Unit::Perceiver),
            text: index(Unit::Text),
            layers: (0..self.model.layer_count())
                .map(|layer| index(Unit::Layer(layer)))
                .collect(),
        }
    }

    /// Waits for the next unit of the pass, starts gathering the one after
    /// (when that gather runs in the background), and points the model at
    /// the waited-for unit's whole weights.
    fn acquire(&mut self, fetch: &mut Prefetcher) -> Result<(usize, Gathered), TrainError> {
        let index = fetch.order[fetch.position];
        let current = match fetch.ahead.take() {
            Some(gathered) => gathered,
            None => self.state.start_gather(index)?,
        };
        fetch.position += 1;
        if let Some(&next) = fetch.order.get(fetch.position) {
            if self.state.gathers_in_background(next) {
                fetch.ahead = Some(self.state.start_gather(next)?);
            }
        }
        let ahead = fetch.ahead.as_ref().map_or(0, |gathered| gathered.bytes);
        Ok((index, self.state.install(current, ahead)?))
    }

    fn mark(&mut self, phase: &'static str) {
        mark(self.phases, phase);
    }

    fn bf16(
        &self,
        device: tch::Device,
        f: impl FnOnce() -> Result<Tensor, TrainError>,
    ) -> Result<Tensor, TrainError> {
        crate::autocast::bf16(self.config.amp_bf16, device, f)
    }

    /// Backpropagates `upstream` from `output` (recomputed with a graph)
    /// into the `leading` inputs and the trainable weights of unit `index`:
    /// (the inputs' gradients, the weights' gradients), `None` where one
    /// took no part.
    #[allow(clippy::type_complexity)]
    fn backward_unit(
        &self,
        index: usize,
        output: &Tensor,
        upstream: &Tensor,
        leading: &[&Tensor],
    ) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>), TrainError> {
        let mut wrt = leading.to_vec();
        wrt.extend(
            self.state.plans()[index]
                .trainable
                .iter()
                .map(|member| &member.tensor),
        );
        let upstream = upstream.to_kind(output.kind());
        let mut grads = units::gradients(&[output], &[&upstream], &wrt)?;
        let weights = grads.split_off(leading.len());
        Ok((grads, weights))
    }

    /// Backpropagates `backward.upstream` through decoder layer `layer`
    /// (unit `index`) from its `output` (with its graph) into its `input`,
    /// which becomes the next upstream, and, when the layer sees media,
    /// into the media latents, summed over the layers; returns the layer's
    /// weight gradients.
    fn layer_backward(
        &self,
        (layer, index): (usize, usize),
        input: &Tensor,
        output: &Tensor,
        media_leaf: &Tensor,
        backward: &mut Backward,
    ) -> Result<Vec<Option<Tensor>>, TrainError> {
        let sees_media = self.model.layer_sees_media(layer);
        let mut leading = vec![input];
        if sees_media {
            leading.push(media_leaf);
        }
        let (mut inputs_grads, grads) =
            self.backward_unit(index, output, &backward.upstream, &leading)?;
        backward.upstream = inputs_grads
            .remove(0)
            .expect("a layer's output depends on its input");
        if let Some(grad) = inputs_grads.pop().flatten().filter(|_| sees_media) {
            backward.media_grad = Some(match backward.media_grad.take() {
                Some(sum) => sum + grad.to_kind(Kind::Float),
                None => grad.to_kind(Kind::Float),
            });
        }
        Ok(grads)
    }

    /// Forward and backward of one dataset's micro-batch.
    pub(crate) fn run(
        &mut self,
        batch: &TrainBatch,
        multiplier: f64,
    ) -> Result<MicroLoss, TrainError> {
        let at = self.indices();
        let embedding_trains = self.state.plans()[at.text].len > 0;
        let keep = !self.config.gradient_checkpointing;
        let mut order = at.forward_order();
        if !keep {
            order.extend(at.layers.iter().rev());
            if embedding_trains {
                order.push(at.text);
            }
            order.push(at.perceiver);
        }
        let mut fetch = Prefetcher {
            order,
            position: 0,
            ahead: None,
        };
        let Forward {
            features,
            media_leaf,
            inputs,
            layer_inputs,
            last,
            kept,
        } = self.forward(batch, &mut fetch, keep, keep && embedding_trains)?;
        let mut backward = match self.head(batch, &mut fetch, last, multiplier)? {
            Head::Finite(backward) => backward,
            Head::NonFinite(mean) => {
                return Ok(MicroLoss {
                    mean,
                    finite: false,
                })
            }
        };
        let mean = backward.mean;
        if let Some(kept) = kept {
            self.kept_backward(kept, &media_leaf, &mut backward)?;
            return Ok(MicroLoss { mean, finite: true });
        }
        self.layers_backward(
            &mut fetch,
            &media_leaf,
            &inputs,
            layer_inputs,
            &mut backward,
        )?;
        if embedding_trains {
            self.embedding_backward(batch, &mut fetch, &mut backward)?;
        }
        self.perceiver_backward(&mut fetch, &features, backward.media_grad)?;
        Ok(MicroLoss { mean, finite: true })
    }

    /// The batch's mean loss, forward only: each unit gathered, run without
    /// a graph and released, and no gradient made.
    pub(crate) fn loss(&mut self, batch: &TrainBatch) -> Result<f64, TrainError> {
        let mut fetch = Prefetcher {
            order: self.indices().forward_order(),
            position: 0,
            ahead: None,
        };
        let forward = self.forward(batch, &mut fetch, false, false)?;
        drop(forward.layer_inputs);
        let device = batch.input_ids.device();
        let (index, gathered) = self.acquire(&mut fetch)?;
        let logits = tch::no_grad(|| self.bf16(device, || Ok(self.model.head(&forward.last))))?;
        let loss = token_loss(self.group, &logits, &batch.labels)?;
        self.state.release(index, gathered);
        Ok(loss.mean())
    }

    /// Vision, perceiver, embedding and layers. Recomputing: without a
    /// graph, keeping each layer's input. Otherwise (`keep`): each unit but
    /// the vision tower with its graph, on a detached input of its own, its
    /// whole weights parked until its backward (the embedding's only when
    /// `embedding_trains`).
    fn forward(
        &mut self,
        batch: &TrainBatch,
        fetch: &mut Prefetcher,
        keep: bool,
        embedding_trains: bool,
    ) -> Result<Forward, TrainError> {
        let device = batch.input_ids.device();
        self.mark("data");
        let (index, gathered) = self.acquire(fetch)?;
        let mut hidden = self.bf16(device, || Ok(self.model.vision_start(&batch.vision_x)?))?;
        self.state.release(index, gathered);
        for block in 0..self.model.vision_block_count() {
            let (index, gathered) = self.acquire(fetch)?;
            hidden = self.bf16(device, || Ok(self.model.vision_block(block, &hidden)))?;
            self.state.release(index, gathered);
        }
        let (index, gathered) = self.acquire(fetch)?;
        let features = self.bf16(device, || {
            Ok(self.model.vision_end(&batch.vision_x, &hidden))
        })?;
        self.state.release(index, gathered);
        drop(hidden);
        self.mark("vision forward");
        let (index, gathered) = self.acquire(fetch)?;
        let mut kept = keep.then(Kept::default);
        let slot = kept.as_mut().map(|kept| &mut kept.perceiver);
        let media = self.unit_forward((index, gathered), slot, device, |model| {
            Ok(model.perceive(&features)?)
        })?;
        self.mark("perceiver forward");
        let media_leaf = media.detach().set_requires_grad(true);
        let inputs =
            self.model
                .text_inputs(&batch.input_ids, Some(&batch.attention_mask), &media)?;
        let (index, gathered) = self.acquire(fetch)?;
        let slot = kept
            .as_mut()
            .filter(|_| embedding_trains)
            .map(|kept| &mut kept.embedding);
        let mut hidden = self.unit_forward((index, gathered), slot, device, |model| {
            Ok(model.embed(&batch.input_ids))
        })?;
        let layers = self.model.layer_count();
        let mut layer_inputs = Vec::with_capacity(layers);
        for layer in 0..layers {
            let (index, gathered) = self.acquire(fetch)?;
            match kept.as_mut() {
                Some(kept) => {
                    let input = hidden.detach().set_requires_grad(true);
                    let output = self.bf16(device, || {
                        Ok(self.model.layer(layer, &input, &media_leaf, &inputs)?)
                    })?;
                    hidden = output.detach();
                    kept.layers.push(KeptUnit {
                        index,
                        parked: Some(self.state.park(index, gathered)?),
                        input: Some(input),
                        output,
                    });
                }
                None => {
                    let next = tch::no_grad(|| {
                        self.bf16(device, || {
                            Ok(self.model.layer(layer, &hidden, &media_leaf, &inputs)?)
                        })
                    })?;
                    self.state.release(index, gathered);
                    layer_inputs.push(std::mem::replace(&mut hidden, next));
                }
            }
        }
        self.mark("embedding and layers forward");
        Ok(Forward {
            features,
            media_leaf,
            inputs,
            layer_inputs,
            last: hidden,
            kept,
        })
    }

    /// Unit `index`'s `forward`, its output detached: with `slot`, with a
    /// graph kept in the slot and the unit parked; without, with no graph
    /// and the unit released.
    fn unit_forward(
        &mut self,
        (index, gathered): (usize, Gathered),
        slot: Option<&mut Option<KeptUnit>>,
        device: tch::Device,
        forward: impl Fn(&Flamingo) -> Result<Tensor, TrainError>,
    ) -> Result<Tensor, TrainError> {
        let model = self.model;
        match slot {
            Some(slot) => {
                let output = self.bf16(device, || forward(model))?;
                let detached = output.detach();
                *slot = Some(KeptUnit {
                    index,
                    parked: Some(self.state.park(index, gathered)?),
                    input: None,
                    output,
                });
                Ok(detached)
            }
            None => {
                let output = tch::no_grad(|| self.bf16(device, || forward(model)))?;
                self.state.release(index, gathered);
                Ok(output)
            }
        }
    }

    /// The backward of a pass that kept its graphs: each layer's, last to
    /// first, from its kept graph once its weights are gathered again into
    /// their buffers (the one before it gathering meanwhile); then the
    /// embedding's and the perceiver's.
    fn kept_backward(
        &mut self,
        mut kept: Kept,
        media_leaf: &Tensor,
        backward: &mut Backward,
    ) -> Result<(), TrainError> {
        let mut current: Option<(KeptUnit, Gathered)> = None;
        if let Some(mut last) = kept.layers.pop() {
            let gathered = self
                .state
                .start_regather(last.index, last.parked.take().expect("parked once"))?;
            current = Some((last, gathered));
        }
        let mut layer = kept.layers.len();
        while let Some((unit, started)) = current.take() {
            if let Some(mut previous) = kept.layers.pop() {
                let gathered = self
                    .state
                    .start_regather(previous.index, previous.parked.take().expect("parked once"))?;
                current = Some((previous, gathered));
            }
            let ahead = current.as_ref().map_or(0, |(_, gathered)| gathered.bytes);
            let gathered = self.state.install(started, ahead)?;
            let input = unit.input.as_ref().expect("a layer keeps its input");
            let grads = self.layer_backward(
                (layer, unit.index),
                input,
                &unit.output,
                media_leaf,
                backward,
            )?;
            self.state.sink(unit.index, grads)?;
            self.state.release(unit.index, gathered);
            layer = layer.saturating_sub(1);
        }
        self.mark("layers backward");
        if let Some(mut unit) = kept.embedding.take() {
            let gathered = self
                .state
                .start_regather(unit.index, unit.parked.take().expect("parked once"))?;
            let gathered = self.state.install(gathered, 0)?;
            let (_, grads) =
                self.backward_unit(unit.index, &unit.output, &backward.upstream, &[])?;
            for (sum, grad) in backward.text_grads.iter_mut().zip(grads) {
                *sum = match (sum.take(), grad) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                };
            }
            self.state
                .sink(unit.index, std::mem::take(&mut backward.text_grads))?;
            self.state.release(unit.index, gathered);
        }
        if let Some(mut unit) = kept.perceiver.take() {
            let gathered = self
                .state
                .start_regather(unit.index, unit.parked.take().expect("parked once"))?;
            let gathered = self.state.install(gathered, 0)?;
            if let Some(media_grad) = backward.media_grad.take() {
                let (_, grads) = self.backward_unit(unit.index, &unit.output, &media_grad, &[])?;
                self.state.sink(unit.index, grads)?;
            }
            self.state.release(unit.index, gathered);
        }
        self.mark("embedding and perceiver backward");
        Ok(())
    }

    /// The head, the loss and the head's backward from the last hidden
    /// state.
    fn head(
        &mut self,
        batch: &TrainBatch,
        fetch: &mut Prefetcher,
        hidden: Tensor,
        multiplier: f64,
    ) -> Result<Head, TrainError> {
        let device = batch.input_ids.device();
        let (index, gathered) = self.acquire(fetch)?;
        let last = hidden.detach().set_requires_grad(true);
        let logits = self.bf16(device, || Ok(self.model.head(&last)))?;
        let loss = token_loss(self.group, &logits, &batch.labels)?;
        if !loss.global_sum.is_finite() {
            // Every rank sees the same sum, so all stop here together.
            self.state.release(index, gathered);
            return Ok(Head::NonFinite(loss.mean()));
        }
        let scale = Tensor::from(loss.scale(multiplier, self.config.gradient_accumulation_steps))
            .to_kind(loss.summed.kind())
            .to_device(device);
        let (mut leading, text_grads) =
            self.backward_unit(index, &loss.summed, &scale, &[&last])?;
        drop(logits);
        let upstream = leading
            .remove(0)
            .expect("the loss depends on the last hidden state");
        self.state.release(index, gathered);
        self.mark("head, loss and head backward");
        Ok(Head::Finite(Backward {
            mean: loss.mean(),
            upstream,
            text_grads,
            media_grad: None,
        }))
    }

    /// Each layer recomputed with a graph and backpropagated, last to
    /// first; the media latents' gradient summed over the cross-attention
    /// blocks.
    fn layers_backward(
        &mut self,
        fetch: &mut Prefetcher,
        media_leaf: &Tensor,
        inputs: &flamingo_model::TextInputs,
        mut layer_inputs: Vec<Tensor>,
        backward: &mut Backward,
    ) -> Result<(), TrainError> {
        let device = media_leaf.device();
        for layer in (0..self.model.layer_count()).rev() {
            let (index, gathered) = self.acquire(fetch)?;
            // Each layer's input is freed once its backward is done.
            let input = layer_inputs
                .pop()
                .expect("one input per layer")
                .set_requires_grad(true);
            let output = self.bf16(device, || {
                Ok(self.model.layer(layer, &input, media_leaf, inputs)?)
            })?;
            let grads =
                self.layer_backward((layer, index), &input, &output, media_leaf, backward)?;
            self.state.sink(index, grads)?;
            self.state.release(index, gathered);
        }
        self.mark("layers recompute and backward");
        Ok(())
    }

    /// The input embedding (its `<image>` / `<|endofchunk|>` rows), with
    /// the head's gradient of the same unit.
    fn embedding_backward(
        &mut self,
        batch: &TrainBatch,
        fetch: &mut Prefetcher,
        backward: &mut Backward,
    ) -> Result<(), TrainError> {
        let device = batch.input_ids.device();
        let (index, gathered) = self.acquire(fetch)?;
        let embedded = self.bf16(device, || Ok(self.model.embed(&batch.input_ids)))?;
        let (_, grads) = self.backward_unit(index, &embedded, &backward.upstream, &[])?;
        for (sum, grad) in backward.text_grads.iter_mut().zip(grads) {
            *sum = match (sum.take(), grad) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
        }
        self.state
            .sink(index, std::mem::take(&mut backward.text_grads))?;
        self.state.release(index, gathered);
        Ok(())
    }

    /// The perceiver, from the media latents' summed gradient.
    fn perceiver_backward(
        &mut self,
        fetch: &mut Prefetcher,
        features: &Tensor,
        media_grad: Option<Tensor>,
    ) -> Result<(), TrainError> {
        let device = features.device();
        let (index, gathered) = self.acquire(fetch)?;
        if let Some(media_grad) = media_grad {
            let resampled = self.bf16(device, || Ok(self.model.perceive(features)?))?;
            let (_, grads) = self.backward_unit(index, &resampled, &media_grad, &[])?;
            self.state.sink(index, grads)?;
        }
        self.state.release(index, gathered);
        self.mark("embedding and perceiver backward");
        Ok(())
    }
}

/// What the forward half keeps for the backward half.
struct Forward {
    features: Tensor,
    /// The media latents as the layers' (detached) input.
    media_leaf: Tensor,
    inputs: flamingo_model::TextInputs,
    /// Recomputing: each layer's input.
    layer_inputs: Vec<Tensor>,
    last: Tensor,
    /// Keeping graphs: each unit's.
    kept: Option<Kept>,
}

/// A unit whose forward graph is kept: its parked buffers, its detached
/// input (a layer's) and its output.
struct KeptUnit {
    index: usize,
    parked: Option<Gathered>,
    input: Option<Tensor>,
    output: Tensor,
}

/// The kept units of a pass.
#[derive(Default)]
struct Kept {
    perceiver: Option<KeptUnit>,
    embedding: Option<KeptUnit>,
    layers: Vec<KeptUnit>,
}

/// How the head's part ended.
enum Head {
    Finite(Backward),
    /// The loss (the global mean) is not finite: the step is skipped.
    NonFinite(f64),
}

/// The gradient flowing back through the pass.
struct Backward {
    mean: f64,
    /// The gradient of the next unit's output (the hidden state).
    upstream: Tensor,
    /// The text unit's weight gradients from the head (the embedding adds
    /// its own before they are sunk).
    text_grads: Vec<Option<Tensor>>,
    media_grad: Option<Tensor>,
}
