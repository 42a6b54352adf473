//! Beam search as OpenFlamingo runs it: Hugging Face `generate` with
//! `num_beams > 1`, `early_stopping = False`, EOS = `<|endofchunk|>`
//! (transformers' vectorised `_beam_search`, v4.57).
//!
//! Per step: the running beams' log-probabilities (fp32 log-softmax plus the
//! beam's score) are ranked over `beams × vocab`; the top `2·beams`
//! candidates are kept. Those that end (EOS, or the length limit) and are
//! among the top `beams` may enter the finished set with score
//! `sum_logprobs / generated_len^length_penalty`; the best `beams`
//! candidates that did not end keep running. The search stops when no
//! running beam can beat the worst finished one (HF's heuristic: the best
//! running score divided by the current generated length), or when every
//! candidate ended. The best finished hypothesis wins.

use tch::{Kind, Tensor};

use crate::flamingo::Flamingo;
use crate::{ModelError, Result};

const NEG_INF: f64 = -1.0e9;

/// Beam search settings.
#[derive(Debug, Clone, Copy)]
pub struct BeamSettings {
    pub num_beams: i64,
    pub max_new_tokens: i64,
    pub length_penalty: f64,
    pub eos_token_id: i64,
    /// Fills positions after a shorter hypothesis ended (HF: pad, else EOS).
    pub pad_token_id: i64,
}

impl Flamingo {
    /// Returns the new tokens `[batch, longest]` of each row's best
    /// hypothesis, padded with `pad_token_id`.
    pub fn generate_beam(
        &self,
        vision_x: &Tensor,
        lang_x: &Tensor,
        attention_mask: Option<&Tensor>,
        settings: BeamSettings,
    ) -> Result<Tensor> {
        let beams = settings.num_beams;
        if beams < 1 || settings.max_new_tokens < 1 {
            return Err(ModelError::Input {
                input: "settings",
                message: "num_beams and max_new_tokens must be at least 1".into(),
            });
        }
        let batch = lang_x.size()[0];
        // Every beam carries its own copy of the media and the prompt.
        let media = self.encode_vision(vision_x)?;
        self.check_image_count(&media, lang_x)?;
        let media = media.repeat_interleave_self_int(beams, 0, None);
        let prompt = lang_x.repeat_interleave_self_int(beams, 0, None);
        let mut search = Search::new(batch, settings, lang_x.device());
        let mask = attention_mask.map(|mask| mask.repeat_interleave_self_int(beams, 0, None));
        let (mut logits, mut state) = self.start_decoding(&prompt, &media, mask.as_ref())?;
        for step in 0..settings.max_new_tokens {
            let Some((sources, next)) = search.step(&logits, step) else {
                break;
            };
            // Reorder the cache to the chosen beams and feed their tokens.
            logits = self.continue_decoding(&mut state, &next, &media, Some(&sources))?;
        }
        Ok(search.best())
    }
}

/// The beams of every row, as transformers' `_beam_search` keeps them.
struct Search {
    settings: BeamSettings,
    batch: i64,
    device: tch::Device,
    /// `[batch, beams, max_new]` generated tokens of the running beams,
    /// filled with pad, and their scores.
    running: Tensor,
    running_scores: Tensor,
    /// The finished hypotheses, their scores, whether each slot holds one,
    /// and their generated lengths.
    finished: Tensor,
    finished_scores: Tensor,
    is_finished: Tensor,
    finished_lengths: Tensor,
    /// Rows whose running beams can still beat their finished ones.
    unsatisfied: Tensor,
    /// `[2·beams]`: the candidates among the top `beams`.
    top_mask: Tensor,
    /// Each row's first beam in the flattened `[batch · beams]` cache.
    batch_offset: Tensor,
}

/// One step's `2·beams` best candidates per row.
struct Candidates {
    scores: Tensor,
    source_beams: Tensor,
    tokens: Tensor,
    sequences: Tensor,
    /// Whether each candidate ended (EOS, or the length limit).
    hits: Tensor,
}

impl Search {
    fn new(batch: i64, settings: BeamSettings, device: tch::Device) -> Self {
        let (beams, max_new) = (settings.num_beams, settings.max_new_tokens);
        let pad =
            |shape: [i64; 3]| Tensor::full(shape, settings.pad_token_id, (Kind::Int64, device));
        let running_scores = Tensor::zeros([batch, beams], (Kind::Float, device));
        if beams > 1 {
            let _ = running_scores.narrow(1, 1, beams - 1).fill_(NEG_INF);
        }
        let top_mask = Tensor::cat(
            &[
                Tensor::ones([beams], (Kind::Bool, device)),
                Tensor::zeros([beams], (Kind::Bool, device)),
            ],
            0,
        );
        Self {
            settings,
            batch,
            device,
            running: pad([batch, beams, max_new]),
            running_scores,
            finished: pad([batch, beams, max_new]),
            finished_scores: Tensor::full([batch, beams], NEG_INF, (Kind::Float, device)),
            is_finished: Tensor::zeros([batch, beams], (Kind::Bool, device)),
            finished_lengths: Tensor::zeros([batch, beams], (Kind::Int64, device)),
            unsatisfied: Tensor::ones([batch, 1], (Kind::Bool, device)),
            top_mask,
            batch_offset: Tensor::arange(batch, (Kind::Int64, device)).view([batch, 1]) * beams,
        }
    }

    /// Takes the step's `logits`; returns the cache rows to continue from
    /// and their next tokens, or `None` when the search is over.
    fn step(&mut self, logits: &Tensor, step: i64) -> Option<(Tensor, Tensor)> {
        let candidates = self.candidates(logits, step);
        let (chosen_sources, chosen_tokens) = self.keep_running(&candidates);
        self.merge_finished(&candidates, step);
        if self.done(&candidates, step) {
            return None;
        }
        let (batch, beams) = (self.batch, self.settings.num_beams);
        let sources = (chosen_sources + &self.batch_offset).view([-1]);
        Some((sources, chosen_tokens.view([batch * beams, 1])))
    }

    /// The running beams' log-probabilities (fp32 log-softmax plus the
    /// beam's score) ranked over `beams × vocab`: the top `2·beams`.
    fn candidates(&self, logits: &Tensor, step: i64) -> Candidates {
        let (batch, beams, max_new) = (
            self.batch,
            self.settings.num_beams,
            self.settings.max_new_tokens,
        );
        let keep = 2 * beams;
        let vocab = logits.size()[2];
        let log_probs = logits
            .select(1, -1)
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float);
        let accumulated = (log_probs.view([batch, beams, vocab])
            + self.running_scores.unsqueeze(2))
        .view([batch, beams * vocab]);
        let (scores, top_indices) = accumulated.topk(keep, -1, true, true);
        let source_beams = top_indices.divide_scalar_mode(vocab, "floor");
        let tokens = top_indices.remainder(vocab);
        // Candidate sequences: the source beam's tokens plus the new one.
        let sequences = self.running.gather(
            1,
            &source_beams
                .unsqueeze(2)
                .expand([batch, keep, max_new], false),
            false,
        );
        sequences.select(2, step).copy_(&tokens);
        let hits = if step + 1 >= max_new {
            Tensor::ones([batch, keep], (Kind::Bool, self.device))
        } else {
            tokens.eq(self.settings.eos_token_id)
        };
        Candidates {
            scores,
            source_beams,
            tokens,
            sequences,
            hits,
        }
    }

    /// The beams that keep running: the best candidates that did not end.
    /// Returns their source beams and new tokens.
    fn keep_running(&mut self, candidates: &Candidates) -> (Tensor, Tensor) {
        let (batch, beams, max_new) = (
            self.batch,
            self.settings.num_beams,
            self.settings.max_new_tokens,
        );
        let running_candidates =
            &candidates.scores + candidates.hits.to_kind(Kind::Float) * NEG_INF;
        let (next_scores, next_positions) = running_candidates.topk(beams, -1, true, true);
        self.running = candidates.sequences.gather(
            1,
            &next_positions
                .unsqueeze(2)
                .expand([batch, beams, max_new], false),
            false,
        );
        self.running_scores = next_scores;
        (
            candidates.source_beams.gather(1, &next_positions, false),
            candidates.tokens.gather(1, &next_positions, false),
        )
    }

    /// Merges the candidates that just ended (among the top `beams`) into
    /// the finished set, scored `sum_logprobs / generated_len^length_penalty`.
    fn merge_finished(&mut self, candidates: &Candidates, step: i64) {
        let (batch, beams, max_new) = (
            self.batch,
            self.settings.num_beams,
            self.settings.max_new_tokens,
        );
        let generated_len = (step + 1) as f64;
        let mut candidate_scores =
            &candidates.scores / generated_len.powf(self.settings.length_penalty);
        candidate_scores += self.unsatisfied.logical_not().to_kind(Kind::Float) * NEG_INF;
        let just_finished = candidates.hits.logical_and(&self.top_mask.unsqueeze(0));
        candidate_scores += just_finished.logical_not().to_kind(Kind::Float) * NEG_INF;
        let merged_sequences = Tensor::cat(&[&self.finished, &candidates.sequences], 1);
        let merged_scores = Tensor::cat(&[&self.finished_scores, &candidate_scores], 1);
        let merged_finished = Tensor::cat(&[&self.is_finished, &just_finished], 1);
        let lengths = Tensor::full([batch, 2 * beams], step + 1, (Kind::Int64, self.device));
        let merged_lengths = Tensor::cat(&[&self.finished_lengths, &lengths], 1);
        let (best_scores, best_positions) = merged_scores.topk(beams, -1, true, true);
        self.finished = merged_sequences.gather(
            1,
            &best_positions
                .unsqueeze(2)
                .expand([batch, beams, max_new], false),
            false,
        );
        self.finished_scores = best_scores;
        self.is_finished = merged_finished.gather(1, &best_positions, false);
        self.finished_lengths = merged_lengths.gather(1, &best_positions, false);
    }

    /// HF's early-stop heuristic (`early_stopping = False`): over when no
    /// running beam can beat the worst finished one (the best running score
    /// divided by the current length), or every candidate ended.
    fn done(&mut self, candidates: &Candidates, step: i64) -> bool {
        let (batch, beams) = (self.batch, self.settings.num_beams);
        let current_len = (step + 1) as f64;
        let best_running =
            self.running_scores.narrow(1, 0, 1) / current_len.powf(self.settings.length_penalty);
        let lowest_finished = self
            .finished_scores
            .min_dim(1, true)
            .0
            .expand([batch, beams], false);
        let worst_finished = lowest_finished.where_self(
            &self.is_finished,
            &Tensor::full_like(&lowest_finished, NEG_INF),
        );
        self.unsatisfied = self
            .unsatisfied
            .logical_and(&best_running.gt_tensor(&worst_finished).any_dim(1, true));
        let improvement_possible = self.unsatisfied.any().int64_value(&[]) == 1;
        let valid_continuations = candidates.hits.all().int64_value(&[]) == 0;
        !(improvement_possible && valid_continuations)
    }

    /// The best finished hypothesis of each row, cropped to the longest.
    fn best(&self) -> Tensor {
        let best = self.finished.select(1, 0);
        let longest = self.finished_lengths.select(1, 0).max().int64_value(&[]);
        best.narrow(1, 0, longest.max(0))
    }
}
