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
//! Each unit of the chain keeps what its backward needs in one of three
//! ways ([`Keeping`], chosen per unit by [`Policies`] from
//! `--recompute_policy`):
//! - **graph** (policy `none`, as torch FSDP without activation
//!   checkpointing): the unit's forward keeps its graph, and its gathered
//!   weights' bytes are freed right after it ([`crate::units::park`]: the
//!   buffers, which the graph's saved views point into, stay); before the
//!   unit's backward the same buffers are gathered into again, the next
//!   unit's gather running meanwhile;
//! - **selective** (`selective`): as graph, and the cheap outputs the unit
//!   recorded (LayerNorm, GELU, concatenation, gated residual: see
//!   `flamingo_model::recompute`) lose their bytes too, to be computed
//!   again into the same storage just before the unit's backward; matmuls
//!   and attention never run twice;
//! - **input** (`full`, `--gradient_checkpointing`): the forward runs
//!   without a graph, keeping the unit's input, and the unit runs again
//!   with a graph just before its backward.
//!
//! Policy `auto` runs its first micro-batch with every unit on input,
//! measuring while each unit runs again what its graph holds, what
//! selective would free of it and how long the forward took; then it
//! keeps graphs where the budget (`--activation_budget_gib`) allows,
//! selective next, and recomputes the units that free the most bytes per
//! second of forward last.

use flamingo_collectives::ProcessGroup;
use flamingo_common::train::RecomputePolicy;
use flamingo_model::recompute::{self as cheap, Recorded};
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
    pub(crate) policies: &'a mut Policies,
}

/// How a unit of the chain keeps what its backward needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keeping {
    /// Its whole graph.
    Graph,
    /// Its graph, the recorded cheap outputs' bytes freed until its
    /// backward.
    Selective,
    /// Its input; it runs again before its backward.
    Input,
}

/// What a unit's graph held, measured while `auto` ran it again.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Bytes the graph and outputs held beyond the input.
    graph: i64,
    /// Of those, the bytes selective frees.
    frees: i64,
    /// Seconds the forward took.
    seconds: f64,
}

/// What `auto` decided, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecomputePlan {
    /// Units of the chain keeping their graph, selective, and run again.
    pub graph: usize,
    pub selective: usize,
    pub input: usize,
    /// Bytes every measured unit's graph held, and of those what selective
    /// frees.
    pub graph_bytes: i64,
    pub selective_bytes: i64,
    /// Bytes the plan keeps.
    pub kept_bytes: i64,
}

/// Each unit's [`Keeping`] for the run.
pub(crate) struct Policies {
    policy: RecomputePolicy,
    budget: i64,
    /// `auto`: per unit, once decided.
    chosen: Option<Vec<Keeping>>,
    plan: Option<RecomputePlan>,
    /// `auto`, until decided: per unit, what it held.
    measured: Vec<Option<Measured>>,
}

impl Policies {
    pub(crate) fn new(config: &TrainConfig, units: usize) -> Self {
        Self {
            policy: config.recompute(),
            budget: (config.activation_budget_gib * (1u64 << 30) as f64) as i64,
            chosen: None,
            plan: None,
            measured: vec![None; units],
        }
    }

    /// How unit `index` keeps its backward's needs in this pass.
    fn keeping(&self, index: usize) -> Keeping {
        match self.policy {
            RecomputePolicy::None => Keeping::Graph,
            RecomputePolicy::Selective => Keeping::Selective,
            RecomputePolicy::Full => Keeping::Input,
            RecomputePolicy::Auto => self
                .chosen
                .as_ref()
                .map_or(Keeping::Input, |chosen| chosen[index]),
        }
    }

    /// `auto`'s decision, once made.
    pub(crate) fn plan(&self) -> Option<RecomputePlan> {
        self.plan
    }

    /// Whether this pass measures (`auto`, not yet decided).
    fn measuring(&self) -> bool {
        self.policy == RecomputePolicy::Auto && self.chosen.is_none()
    }

    /// `auto`, after the measuring pass: graphs everywhere while they fit
    /// the budget; past it, selective where it frees the most bytes, then
    /// input where it frees the most bytes per second of forward.
    fn decide(&mut self) {
        if !self.measuring() {
            return;
        }
        let mut chosen = vec![Keeping::Input; self.measured.len()];
        let measured: Vec<(usize, Measured)> = self
            .measured
            .iter()
            .enumerate()
            .filter_map(|(index, measured)| measured.map(|measured| (index, measured)))
            .collect();
        if measured.is_empty() {
            // Nothing ran again (no media, say): measure again next pass.
            return;
        }
        let mut kept: i64 = measured.iter().map(|(_, m)| m.graph).sum();
        for (index, _) in &measured {
            chosen[*index] = Keeping::Graph;
        }
        let mut by_frees = measured.clone();
        by_frees.sort_by_key(|(_, m)| std::cmp::Reverse(m.frees));
        for (index, m) in &by_frees {
            if kept <= self.budget || m.frees <= 0 {
                break;
            }
            chosen[*index] = Keeping::Selective;
            kept -= m.frees;
        }
        let holds = |index: usize, m: &Measured, chosen: &[Keeping]| match chosen[index] {
            Keeping::Selective => m.graph - m.frees,
            _ => m.graph,
        };
        let mut by_rate = measured.clone();
        by_rate.sort_by(|(a_index, a), (b_index, b)| {
            let rate =
                |index: usize, m: &Measured| holds(index, m, &chosen) as f64 / m.seconds.max(1e-9);
            rate(*b_index, b).total_cmp(&rate(*a_index, a))
        });
        for (index, m) in &by_rate {
            if kept <= self.budget {
                break;
            }
            kept -= holds(*index, m, &chosen);
            chosen[*index] = Keeping::Input;
        }
        let count = |keeping: Keeping| {
            measured
                .iter()
                .filter(|(index, _)| chosen[*index] == keeping)
                .count()
        };
        let plan = RecomputePlan {
            graph: count(Keeping::Graph),
            selective: count(Keeping::Selective),
            input: count(Keeping::Input),
            graph_bytes: measured.iter().map(|(_, m)| m.graph).sum(),
            selective_bytes: measured.iter().map(|(_, m)| m.frees).sum(),
            kept_bytes: kept.max(0),
        };
        let gib = |bytes: i64| bytes as f64 / (1u64 << 30) as f64;
        eprintln!(
            "recompute_policy auto: {} units keep their graph, {} selective, {} run again; {:.3} GiB of activations kept against a budget of {:.3} GiB (all graphs: {:.3} GiB, of which selective frees {:.3} GiB)",
            plan.graph,
            plan.selective,
            plan.input,
            gib(plan.kept_bytes),
            gib(self.budget),
            gib(plan.graph_bytes),
            gib(plan.selective_bytes),
        );
        self.chosen = Some(chosen);
        self.plan = Some(plan);
    }
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
    /// Selective: the recorded outputs whose bytes were freed.
    freed: Vec<Recorded>,
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
        let mut fetch = Prefetcher {
            order: at.forward_order(),
            position: 0,
            ahead: None,
        };
        let Forward { sides, links, last } =
            self.forward(batch, &mut fetch, true, embedding_trains)?;
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
        self.chain_backward(links, &sides, &mut backward)?;
        self.policies.decide();
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
    /// layer, each unit kept for its backward as [`Self::keeping`] says
    /// (with no `graphs`, for a loss alone, each runs without a graph).
    /// The embedding joins the chain only when it trains.
    fn forward(
        &mut self,
        batch: &TrainBatch,
        fetch: &mut Prefetcher,
        graphs: bool,
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
        let keep = self.keeping(graphs, index) != Keeping::Input;
        let (tokens, latents) =
            self.bf16(device, || Ok(self.model.perceiver_inputs(&features)?))?;
        let tokens_leaf = tokens.detach();
        let tokens_leaf = if tokens.requires_grad() && graphs {
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
            Vec::new(),
        )?);
        drop(tokens);
        for layer in 0..self.model.perceiver_depth() {
            latents_out = self.chain_unit(
                fetch,
                (Role::PerceiverLayer(layer), &latents_out),
                (graphs, device),
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
        let keep = self.keeping(graphs, index) != Keeping::Input;
        let embed = |pass: &Self| pass.bf16(device, || Ok(pass.model.embed(&batch.input_ids)));
        let mut hidden = if embedding_trains && keep {
            let output = embed(self)?;
            let detached = output.detach();
            links.push(self.link(
                (index, gathered),
                Role::Embedding,
                None,
                Some(vec![output]),
                Vec::new(),
            )?);
            detached
        } else {
            let output = tch::no_grad(|| embed(self))?;
            if embedding_trains {
                links.push(self.link(
                    (index, gathered),
                    Role::Embedding,
                    None,
                    None,
                    Vec::new(),
                )?);
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
                    (graphs, device),
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
                (graphs, device),
                &mut links,
                |model, input| Ok(model.decoder_layer(layer, input, &inputs)?),
            )?;
        }
        self.mark("embedding and layers forward");
        Ok(Forward {
            sides: Sides {
                features,
                tokens: tokens_leaf,
                media_leaf,
                inputs,
                input_ids: batch.input_ids.shallow_clone(),
            },
            links,
            last: hidden,
        })
    }

    /// How unit `index` keeps its backward's needs in this pass: as the
    /// policies say, or on its input alone when the pass makes no `graphs`.
    fn keeping(&self, graphs: bool, index: usize) -> Keeping {
        if graphs {
            self.policies.keeping(index)
        } else {
            Keeping::Input
        }
    }

    /// Gathers the pass's next unit and runs it, as `role`, on `input`,
    /// kept as [`Self::keeping`] says: with a graph from a leaf of its own,
    /// the unit parked (and, selective, its recorded cheap outputs freed);
    /// or without a graph, the input kept for the recompute and the unit
    /// released. Its link joins `links`; returns the output, detached.
    fn chain_unit(
        &mut self,
        fetch: &mut Prefetcher,
        (role, input): (Role, &Tensor),
        (graphs, device): (bool, tch::Device),
        links: &mut Vec<Link>,
        forward: impl Fn(&Flamingo, &Tensor) -> Result<Tensor, TrainError>,
    ) -> Result<Tensor, TrainError> {
        let unit = self.acquire(fetch)?;
        let model = self.model;
        let keeping = self.keeping(graphs, unit.0);
        let (output, link) = if keeping == Keeping::Input {
            let output = tch::no_grad(|| self.bf16(device, || forward(model, input)))?;
            (
                output,
                self.link(unit, role, Some(input.shallow_clone()), None, Vec::new())?,
            )
        } else {
            let leaf = input.detach().set_requires_grad(true);
            let (output, recorded) = if keeping == Keeping::Selective {
                let (output, recorded) =
                    cheap::recording(|| self.bf16(device, || forward(model, &leaf)));
                (output?, recorded)
            } else {
                (self.bf16(device, || forward(model, &leaf))?, Vec::new())
            };
            let (freed, _) = units::free_activations(recorded, &[&output]);
            let detached = output.detach();
            (
                detached,
                self.link(unit, role, Some(leaf), Some(vec![output]), freed)?,
            )
        };
        links.push(link);
        Ok(output)
    }

    /// A unit's link: with its outputs' graph (`outputs`) the unit is
    /// parked, without it is released; `freed`: its recorded outputs whose
    /// bytes were freed.
    fn link(
        &mut self,
        (index, gathered): (usize, Gathered),
        role: Role,
        input: Option<Tensor>,
        outputs: Option<Vec<Tensor>>,
        freed: Vec<Recorded>,
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
            freed,
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

    /// Backpropagates the chain, last unit to first. Each unit's weights
    /// are gathered again before its backward (into its parked buffers
    /// when it kept a graph), the unit before it gathering meanwhile when
    /// the state prefetches.
    fn chain_backward(
        &mut self,
        mut links: Vec<Link>,
        sides: &Sides,
        backward: &mut Backward,
    ) -> Result<(), TrainError> {
        let recomputes = links
            .iter()
            .any(|link| link.outputs.is_empty() || !link.freed.is_empty());
        let layers_phase = if recomputes {
            "layers recompute and backward"
        } else {
            "layers backward"
        };
        let mut text_side = true;
        let mut regathering = match links.pop() {
            Some(last) => Some(self.regather(last)?),
            None => None,
        };
        while let Some((link, started)) = regathering.take() {
            let overlaps = links
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
            let gathered = self.state.install(started, ahead)?;
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

    /// Starts gathering a link's unit for its backward: into its parked
    /// buffers when it kept a graph, afresh when it runs again.
    fn regather(&self, mut link: Link) -> Result<(Link, Gathered), TrainError> {
        let gathered = match link.parked.take() {
            Some(parked) => self.state.start_regather(link.index, parked)?,
            None => self.state.start_gather(link.index)?,
        };
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
            freed,
            ..
        } = link;
        if role.is_perceiver() && backward.latents_grad.is_none() {
            backward.latents_grad = backward.media_grad.take();
            if backward.latents_grad.is_none() {
                return Ok(Vec::new());
            }
        }
        let (input, outputs) = if outputs.is_empty() {
            self.recompute(index, role, input, sides)?
        } else {
            let device = sides.input_ids.device();
            units::restore_activations(&freed, |entry| {
                crate::autocast::bf16(self.config.amp_bf16, device, || entry.op.run())
            })?;
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

    /// Unit `index` of the chain run again, with a graph from its kept
    /// `input` (made a leaf): (the leaf, the outputs). While `auto`
    /// measures, it records what the graph holds, what selective would
    /// free of it and how long the forward took.
    fn recompute(
        &mut self,
        index: usize,
        role: Role,
        input: Option<Tensor>,
        sides: &Sides,
    ) -> Result<(Option<Tensor>, Vec<Tensor>), TrainError> {
        let device = sides.input_ids.device();
        if !self.policies.measuring() {
            return self.run_again(role, input, sides);
        }
        let synchronize = || {
            if let tch::Device::Cuda(ordinal) = device {
                tch::Cuda::synchronize(ordinal as i64);
            }
        };
        synchronize();
        let before = units::allocated_bytes(device);
        let started = std::time::Instant::now();
        let (result, recorded) = cheap::recording(|| self.run_again(role, input, sides));
        let (leaf, outputs) = result?;
        synchronize();
        let seconds = started.elapsed().as_secs_f64();
        let graph = match (before, units::allocated_bytes(device)) {
            (Some(before), Some(after)) => (after - before).max(0),
            _ => 0,
        };
        let output_refs: Vec<&Tensor> = outputs.iter().collect();
        let frees = units::freeable_bytes(recorded, &output_refs).min(graph);
        self.policies.measured[index] = Some(Measured {
            graph,
            frees,
            seconds,
        });
        Ok((leaf, outputs))
    }

    /// [`Self::recompute`]'s forward.
    fn run_again(
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
