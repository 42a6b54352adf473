//! The unit-by-unit pass (`full`, `hybrid`, `--gradient_checkpointing`).
//!
//! The vision tower runs forward only, a unit at a time. From the
//! perceiver on, the pass is a chain of units: the perceiver's inputs
//! (latents, and the media tokens every perceiver layer attends to), each
//! perceiver layer, the input embedding, and each decoder layer preceded
//! by its cross-attention block. The loss and the head's backward follow;
//! then the chain is backpropagated a unit at a time, last to first, the
//! media latents' gradient summed over the cross-attention blocks and the
//! media tokens' over the perceiver layers. Units are gathered in the order
//! the pass uses them, one ahead.
//!
//! With `--gradient_checkpointing` the forward runs without a graph,
//! keeping each unit's input, and each unit is recomputed with a graph just
//! before its backward.
//!
//! Without it (`full` and `hybrid`), nothing is recomputed, as torch FSDP
//! without activation checkpointing: each unit's forward keeps its graph,
//! and its gathered weights' bytes are freed right after it
//! ([`crate::units::park`]: the buffers, which the graph's saved views
//! point into, stay); before the unit's backward the same buffers are
//! gathered into again, the next unit's gather running meanwhile.

use flamingo_collectives::ProcessGroup;
use flamingo_model::{Flamingo, TextInputs, Unit};
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
    perceiver_layers: Vec<usize>,
    text: usize,
    /// Per decoder layer: its cross-attention block's unit, if it has one,
    /// and its own.
    layers: Vec<(Option<usize>, usize)>,
}

impl Indices {
    /// The units of the forward pass and the head, in order: the vision
    /// tower's ends, its blocks, its ends again (the patch tokens), the
    /// perceiver's inputs and layers, the embedding, each layer's
    /// cross-attention block and the layer, the head.
    fn forward_order(&self) -> Vec<usize> {
        let mut order = vec![self.vision];
        order.extend(&self.vision_blocks);
        order.extend([self.vision, self.perceiver]);
        order.extend(&self.perceiver_layers);
        order.push(self.text);
        for (cross_attention, layer) in &self.layers {
            order.extend(cross_attention);
            order.push(*layer);
        }
        order.push(self.text);
        order
    }

    /// The units of a recomputing backward, in order: the chain backwards
    /// (the embedding only when it trains).
    fn backward_order(&self, embedding_trains: bool) -> Vec<usize> {
        let mut order = Vec::new();
        for (cross_attention, layer) in self.layers.iter().rev() {
            order.push(*layer);
            order.extend(cross_attention);
        }
        if embedding_trains {
            order.push(self.text);
        }
        order.extend(self.perceiver_layers.iter().rev());
        order.push(self.perceiver);
        order
    }
}

/// What a unit of the chain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Features → (media tokens, latents).
    PerceiverStart,
    PerceiverLayer(usize),
    Embedding,
    CrossAttention(usize),
    Decoder(usize),
}

impl Role {
    fn is_perceiver(self) -> bool {
        matches!(self, Role::PerceiverStart | Role::PerceiverLayer(_))
    }
}

/// A unit of the chain as its forward left it for its backward.
struct Link {
    index: usize,
    role: Role,
    /// The unit's input (a hidden state, or the latents before a perceiver
    /// layer): a leaf whose gradient is asked for when the graph is kept,
    /// a plain tensor when the unit is recomputed.
    input: Option<Tensor>,
    /// Keeping graphs: the unit's outputs with their graph (the perceiver
    /// start's: media tokens, then latents), and its parked buffers.
    outputs: Vec<Tensor>,
    parked: Option<Gathered>,
}

/// What the chain's units take besides their own input.
struct Sides {
    /// The perceiver start's input.
    features: Tensor,
    /// The media tokens as the perceiver layers' input: a leaf asking for
    /// its gradient when they depend on trained weights (frame or time
    /// embeddings).
    tokens: Tensor,
    /// The media latents as the cross-attention blocks' input.
    media_leaf: Tensor,
    inputs: TextInputs,
    input_ids: Tensor,
}

impl Pass<'_> {
    fn indices(&self) -> Indices {
        let index = |unit: Unit| self.state.plans().iter().position(|plan| plan.unit == unit);
        let expect = |unit: Unit| index(unit).expect("every unit has a plan");
        Indices {
            vision: expect(Unit::Vision),
            vision_blocks: (0..self.model.vision_block_count())
                .map(|block| expect(Unit::VisionBlock(block)))
                .collect(),
            perceiver: expect(Unit::Perceiver),
            perceiver_layers: (0..self.model.perceiver_depth())
                .map(|layer| expect(Unit::PerceiverLayer(layer)))
                .collect(),
            text: expect(Unit::Text),
            layers: (0..self.model.layer_count())
                .map(|layer| {
                    let cross_attention = self
                        .model
                        .layer_sees_media(layer)
                        .then(|| expect(Unit::CrossAttention(layer)));
                    (cross_attention, expect(Unit::Layer(layer)))
                })
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
            if self.state.prefetches(index, next) {
                fetch.ahead = Some(self.state.start_gather(next)?);
            }
        }
        let ahead = fetch.ahead.as_ref().map_or(0, |gathered| gathered.bytes);
        Ok((index, self.state.install(current, ahead)?))
    }

    fn mark(&mut self, phase: &'static str) {
        mark(self.phases, phase);
    }

    fn bf16<T>(
        &self,
        device: tch::Device,
        f: impl FnOnce() -> Result<T, TrainError>,
    ) -> Result<T, TrainError> {
        crate::autocast::bf16(self.config.amp_bf16, device, f)
    }

    /// Backpropagates each output's upstream gradient (`outputs`: the
    /// output with its graph, its upstream) into the `leading` inputs and
    /// the trainable weights of unit `index`: (the inputs' gradients, the
    /// weights' gradients), `None` where one took no part.
    #[allow(clippy::type_complexity)]
    fn backward_unit(
        &self,
        index: usize,
        outputs: &[(&Tensor, &Tensor)],
        leading: &[&Tensor],
    ) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>), TrainError> {
        let mut wrt = leading.to_vec();
        wrt.extend(
            self.state.plans()[index]
                .trainable
                .iter()
                .map(|member| &member.tensor),
        );
        let upstreams: Vec<Tensor> = outputs
            .iter()
            .map(|(output, upstream)| upstream.to_kind(output.kind()))
            .collect();
        let output_refs: Vec<&Tensor> = outputs.iter().map(|(output, _)| *output).collect();
        let upstream_refs: Vec<&Tensor> = upstreams.iter().collect();
        let mut grads = units::gradients(&output_refs, &upstream_refs, &wrt)?;
        let weights = grads.split_off(leading.len());
        Ok((grads, weights))
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
            order.extend(at.backward_order(embedding_trains));
        }
        let mut fetch = Prefetcher {
            order,
            position: 0,
            ahead: None,
        };
        let Forward { sides, links, last } =
            self.forward(batch, &mut fetch, keep, embedding_trains)?;
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
        self.chain_backward(links, &sides, &mut backward, &mut fetch, keep)?;
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
        drop(forward.links);
        let device = batch.input_ids.device();
        let (index, gathered) = self.acquire(&mut fetch)?;
        let logits = tch::no_grad(|| self.bf16(device, || Ok(self.model.head(&forward.last))))?;
        let loss = token_loss(self.group, &logits, &batch.labels)?;
        self.state.release(index, gathered);
        Ok(loss.mean())
    }

    /// The vision tower, then the chain from the perceiver to the last
    /// layer. Keeping graphs (`keep`), each unit of the chain runs with a
    /// graph on a detached input of its own and is parked until its
    /// backward; otherwise without a graph, keeping its input, and is
    /// released. The embedding joins the chain only when it trains.
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

        // The perceiver's inputs run with a graph either way, which tells
        // whether the media tokens depend on trained weights; unkept, the
        // graph goes at once.
        let mut links = Vec::new();
        let (index, gathered) = self.acquire(fetch)?;
        let (tokens, latents) =
            self.bf16(device, || Ok(self.model.perceiver_inputs(&features)?))?;
        let tokens_leaf = tokens.detach();
        let tokens_leaf = if tokens.requires_grad() && keep {
            tokens_leaf.set_requires_grad(true)
        } else {
            tokens_leaf
        };
        // The latents are a view of the unit's weights, whose bytes go
        // when the unit is parked or released: the layers get a copy.
        let mut latents_out = latents.detach().copy();
        links.push(self.link(
            (index, gathered),
            Role::PerceiverStart,
            None,
            keep.then(|| vec![tokens.shallow_clone(), latents]),
        )?);
        let tokens_train = tokens.requires_grad();
        drop(tokens);
        for layer in 0..self.model.perceiver_depth() {
            latents_out = self.chain_unit(
                fetch,
                (Role::PerceiverLayer(layer), &latents_out),
                (keep, device),
                &mut links,
                |model, latents| Ok(model.perceiver_layer(layer, &tokens_leaf, latents)),
            )?;
        }
        self.mark("perceiver forward");
        let media = latents_out;
        let media_leaf = media.detach().set_requires_grad(true);
        let inputs =
            self.model
                .text_inputs(&batch.input_ids, Some(&batch.attention_mask), &media)?;
        let (index, gathered) = self.acquire(fetch)?;
        let embed = |pass: &Self| pass.bf16(device, || Ok(pass.model.embed(&batch.input_ids)));
        let mut hidden = if embedding_trains && keep {
            let output = embed(self)?;
            let detached = output.detach();
            links.push(self.link((index, gathered), Role::Embedding, None, Some(vec![output]))?);
            detached
        } else {
            let output = tch::no_grad(|| embed(self))?;
            if embedding_trains {
                links.push(self.link((index, gathered), Role::Embedding, None, None)?);
            } else {
                self.state.release(index, gathered);
            }
            output
        };
        for layer in 0..self.model.layer_count() {
            if self.model.layer_sees_media(layer) {
                hidden = self.chain_unit(
                    fetch,
                    (Role::CrossAttention(layer), &hidden),
                    (keep, device),
                    &mut links,
                    |model, input| {
                        Ok(model
                            .cross_attend(layer, input, &media_leaf, &inputs)?
                            .unwrap_or_else(|| input.shallow_clone()))
                    },
                )?;
            }
            hidden = self.chain_unit(
                fetch,
                (Role::Decoder(layer), &hidden),
                (keep, device),
                &mut links,
                |model, input| Ok(model.decoder_layer(layer, input, &inputs)?),
            )?;
        }
        self.mark("embedding and layers forward");
        let tokens = if tokens_train && !keep {
            tokens_leaf.set_requires_grad(true)
        } else {
            tokens_leaf
        };
        Ok(Forward {
            sides: Sides {
                features,
                tokens,
                media_leaf,
                inputs,
                input_ids: batch.input_ids.shallow_clone(),
            },
            links,
            last: hidden,
        })
    }

    /// Gathers the pass's next unit and runs it, as `role`, on `input`:
    /// keeping (`keep`), with a graph from a leaf of its own, the unit
    /// parked; otherwise without a graph, the input kept for the recompute
    /// and the unit released. Its link joins `links`; returns the output,
    /// detached.
    fn chain_unit(
        &mut self,
        fetch: &mut Prefetcher,
        (role, input): (Role, &Tensor),
        (keep, device): (bool, tch::Device),
        links: &mut Vec<Link>,
        forward: impl Fn(&Flamingo, &Tensor) -> Result<Tensor, TrainError>,
    ) -> Result<Tensor, TrainError> {
        let unit = self.acquire(fetch)?;
        let model = self.model;
        let (output, link) = if keep {
            let leaf = input.detach().set_requires_grad(true);
            let output = self.bf16(device, || forward(model, &leaf))?;
            let detached = output.detach();
            (
                detached,
                self.link(unit, role, Some(leaf), Some(vec![output]))?,
            )
        } else {
            let output = tch::no_grad(|| self.bf16(device, || forward(model, input)))?;
            (
                output,
                self.link(unit, role, Some(input.shallow_clone()), None)?,
            )
        };
        links.push(link);
        Ok(output)
    }

    /// A unit's link: with its outputs' graph (`outputs`) the unit is
    /// parked, without it is released.
    fn link(
        &mut self,
        (index, gathered): (usize, Gathered),
        role: Role,
        input: Option<Tensor>,
        outputs: Option<Vec<Tensor>>,
    ) -> Result<Link, TrainError> {
        let (outputs, parked) = match outputs {
            Some(outputs) => (outputs, Some(self.state.park(index, gathered)?)),
            None => {
                self.state.release(index, gathered);
                (Vec::new(), None)
            }
        };
        Ok(Link {
            index,
            role,
            input,
            outputs,
            parked,
        })
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
            self.backward_unit(index, &[(&loss.summed, &scale)], &[&last])?;
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
            latents_grad: None,
            tokens_grad: None,
        }))
    }

    /// Backpropagates the chain, last unit to first. Kept graphs: each
    /// unit's buffers are gathered again before its backward, the unit
    /// before it gathering meanwhile. Recomputing: each unit, gathered
    /// through the pass's prefetcher, first runs again with a graph from
    /// its kept input.
    fn chain_backward(
        &mut self,
        mut links: Vec<Link>,
        sides: &Sides,
        backward: &mut Backward,
        fetch: &mut Prefetcher,
        keep: bool,
    ) -> Result<(), TrainError> {
        let layers_phase = if keep {
            "layers backward"
        } else {
            "layers recompute and backward"
        };
        let mut text_side = true;
        let mut regathering = None;
        if keep {
            if let Some(last) = links.pop() {
                regathering = Some(self.regather(last)?);
            }
        }
        loop {
            let mut overlaps = true;
            let (link, gathered) = if keep {
                let Some((link, started)) = regathering.take() else {
                    break;
                };
                overlaps = links
                    .last()
                    .is_none_or(|previous| self.state.prefetches(link.index, previous.index));
                if overlaps {
                    regathering = match links.pop() {
                        Some(previous) => Some(self.regather(previous)?),
                        None => None,
                    };
                }
                let ahead = regathering
                    .as_ref()
                    .map_or(0, |(_, gathered)| gathered.bytes);
                (link, self.state.install(started, ahead)?)
            } else {
                let Some(link) = links.pop() else {
                    break;
                };
                let (index, gathered) = self.acquire(fetch)?;
                debug_assert_eq!(index, link.index, "the prefetch order follows the chain");
                (link, gathered)
            };
            if text_side && !matches!(link.role, Role::CrossAttention(_) | Role::Decoder(_)) {
                self.mark(layers_phase);
                text_side = false;
            }
            let index = link.index;
            let grads = self.link_backward(link, sides, backward)?;
            // The weights are done with before their gradients are
            // reduced.
            self.state.release(index, gathered);
            if !grads.is_empty() {
                self.state.sink(index, grads)?;
            }
            if !overlaps {
                if let Some(previous) = links.pop() {
                    regathering = Some(self.regather(previous)?);
                }
            }
        }
        if text_side {
            self.mark(layers_phase);
        }
        self.mark("embedding and perceiver backward");
        Ok(())
    }

    /// Starts gathering a kept unit's parked buffers again.
    fn regather(&self, mut link: Link) -> Result<(Link, Gathered), TrainError> {
        let parked = link.parked.take().expect("a kept unit is parked");
        let gathered = self.state.start_regather(link.index, parked)?;
        Ok((link, gathered))
    }

    /// Backpropagates one unit of the chain (recomputed first if its graph
    /// was not kept): its weights' gradients. The perceiver's units start
    /// from the media latents' summed gradient; without one (no block saw
    /// media) they are skipped, with no gradients.
    fn link_backward(
        &mut self,
        link: Link,
        sides: &Sides,
        backward: &mut Backward,
    ) -> Result<Vec<Option<Tensor>>, TrainError> {
        let Link {
            index,
            role,
            input,
            outputs,
            ..
        } = link;
        if role.is_perceiver() && backward.latents_grad.is_none() {
            backward.latents_grad = backward.media_grad.take();
            if backward.latents_grad.is_none() {
                return Ok(Vec::new());
            }
        }
        let (input, outputs) = if outputs.is_empty() {
            self.recompute(role, input, sides)?
        } else {
            (input, outputs)
        };
        let grads = match role {
            Role::Decoder(_) | Role::CrossAttention(_) => {
                let input = input.expect("a layer keeps its input");
                let sees_media = matches!(role, Role::CrossAttention(_));
                let mut leading = vec![&input];
                if sees_media {
                    leading.push(&sides.media_leaf);
                }
                let (mut inputs_grads, grads) =
                    self.backward_unit(index, &[(&outputs[0], &backward.upstream)], &leading)?;
                backward.upstream = inputs_grads
                    .remove(0)
                    .expect("a layer's output depends on its input");
                if let Some(grad) = inputs_grads.pop().flatten().filter(|_| sees_media) {
                    let grad = grad.to_kind(Kind::Float);
                    backward.media_grad = Some(match backward.media_grad.take() {
                        Some(sum) => sum + grad,
                        None => grad,
                    });
                }
                grads
            }
            Role::Embedding => {
                let (_, grads) =
                    self.backward_unit(index, &[(&outputs[0], &backward.upstream)], &[])?;
                for (sum, grad) in backward.text_grads.iter_mut().zip(grads) {
                    *sum = match (sum.take(), grad) {
                        (Some(a), Some(b)) => Some(a + b),
                        (a, b) => a.or(b),
                    };
                }
                std::mem::take(&mut backward.text_grads)
            }
            Role::PerceiverLayer(_) => {
                let input = input.expect("a perceiver layer keeps its input");
                let upstream = backward.latents_grad.take().expect("set above");
                let mut leading = vec![&input];
                if sides.tokens.requires_grad() {
                    leading.push(&sides.tokens);
                }
                let (mut inputs_grads, grads) =
                    self.backward_unit(index, &[(&outputs[0], &upstream)], &leading)?;
                backward.latents_grad = inputs_grads.remove(0);
                if let Some(grad) = inputs_grads.pop().flatten() {
                    backward.tokens_grad = Some(match backward.tokens_grad.take() {
                        Some(sum) => sum + grad,
                        None => grad,
                    });
                }
                grads
            }
            Role::PerceiverStart => {
                let upstream = backward.latents_grad.take().expect("set above");
                let tokens_grad = backward.tokens_grad.take();
                let mut pairs = vec![(&outputs[1], &upstream)];
                if let Some(grad) = tokens_grad.as_ref().filter(|_| outputs[0].requires_grad()) {
                    pairs.push((&outputs[0], grad));
                }
                self.backward_unit(index, &pairs, &[])?.1
            }
        };
        Ok(grads)
    }

    /// A unit of the chain run again, with a graph from its kept `input`
    /// (made a leaf): (the leaf, the outputs).
    fn recompute(
        &self,
        role: Role,
        input: Option<Tensor>,
        sides: &Sides,
    ) -> Result<(Option<Tensor>, Vec<Tensor>), TrainError> {
        let device = sides.input_ids.device();
        let model = self.model;
        let leaf = input.map(|input| input.set_requires_grad(true));
        let input = || leaf.as_ref().expect("this unit keeps its input");
        let outputs = match role {
            Role::PerceiverStart => {
                let (tokens, latents) =
                    self.bf16(device, || Ok(model.perceiver_inputs(&sides.features)?))?;
                vec![tokens, latents]
            }
            Role::PerceiverLayer(layer) => vec![self.bf16(device, || {
                Ok(model.perceiver_layer(layer, &sides.tokens, input()))
            })?],
            Role::Embedding => vec![self.bf16(device, || Ok(model.embed(&sides.input_ids)))?],
            Role::CrossAttention(layer) => vec![self.bf16(device, || {
                Ok(model
                    .cross_attend(layer, input(), &sides.media_leaf, &sides.inputs)?
                    .unwrap_or_else(|| input().shallow_clone()))
            })?],
            Role::Decoder(layer) => vec![self.bf16(device, || {
                Ok(model.decoder_layer(layer, input(), &sides.inputs)?)
            })?],
        };
        Ok((leaf, outputs))
    }
}

/// What the forward half keeps for the backward half.
struct Forward {
    sides: Sides,
    /// The chain's units, first to last.
    links: Vec<Link>,
    /// The last layer's output.
    last: Tensor,
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
    /// The media latents' gradient, summed over the cross-attention blocks.
    media_grad: Option<Tensor>,
    /// The perceiver: the gradient of the latents after the unit being
    /// backpropagated (the media latents' at first).
    latents_grad: Option<Tensor>,
    /// The media tokens' gradient, summed over the perceiver layers.
    tokens_grad: Option<Tensor>,
}
