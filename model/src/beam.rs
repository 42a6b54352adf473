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
            return Err(ModelError::Input(
                "num_beams and max_new_tokens must be at least 1".into(),
            ));
        }
        let device = lang_x.device();
        let batch = lang_x.size()[0];
        let max_new = settings.max_new_tokens;
        let keep = 2 * beams;

        // Every beam carries its own copy of the media and the prompt.
        let media = self.encode_vision(vision_x)?;
        self.check_image_count(&media, lang_x)?;
        let media = media.repeat_interleave_self_int(beams, 0, None);
        let prompt = lang_x.repeat_interleave_self_int(beams, 0, None);

        // [batch, beams, max_new] generated tokens, filled with pad.
        let mut running = Tensor::full(
            [batch, beams, max_new],
            settings.pad_token_id,
            (Kind::Int64, device),
        );
        let mut running_scores = Tensor::zeros([batch, beams], (Kind::Float, device));
        if beams > 1 {
            let _ = running_scores.narrow(1, 1, beams - 1).fill_(NEG_INF);
        }
        let mut finished = Tensor::full(
            [batch, beams, max_new],
            settings.pad_token_id,
            (Kind::Int64, device),
        );
        let mut finished_scores = Tensor::full([batch, beams], NEG_INF, (Kind::Float, device));
        let mut is_finished = Tensor::zeros([batch, beams], (Kind::Bool, device));
        let mut finished_lengths = Tensor::zeros([batch, beams], (Kind::Int64, device));
        let mut unsatisfied = Tensor::ones([batch, 1], (Kind::Bool, device));
        let top_mask = Tensor::cat(
            &[
                Tensor::ones([beams], (Kind::Bool, device)),
                Tensor::zeros([keep - beams], (Kind::Bool, device)),
            ],
            0,
        );
        let batch_offset = Tensor::arange(batch, (Kind::Int64, device)).view([batch, 1]) * beams;

        let mask = attention_mask.map(|mask| mask.repeat_interleave_self_int(beams, 0, None));
        let (mut logits, mut state) = self.start_decoding(&prompt, &media, mask.as_ref())?;
        for step in 0..max_new {
            let vocab = logits.size()[2];
            let log_probs = logits
                .select(1, -1)
                .to_kind(Kind::Float)
                .log_softmax(-1, Kind::Float);
            let accumulated = (log_probs.view([batch, beams, vocab]) + running_scores.unsqueeze(2))
                .view([batch, beams * vocab]);
            let (top_scores, top_indices) = accumulated.topk(keep, -1, true, true);
            let source_beams = top_indices.divide_scalar_mode(vocab, "floor");
            let tokens = top_indices.remainder(vocab);
            // Candidate sequences: the source beam's tokens plus the new one.
            let candidates = running.gather(
                1,
                &source_beams
                    .unsqueeze(2)
                    .expand([batch, keep, max_new], false),
                false,
            );
            candidates.select(2, step).copy_(&tokens);
            let at_limit = step + 1 >= max_new;
            let hits = if at_limit {
                Tensor::ones([batch, keep], (Kind::Bool, device))
            } else {
                tokens.eq(settings.eos_token_id)
            };

            // Beams that keep running: the best candidates that did not end.
            let running_candidates = &top_scores + hits.to_kind(Kind::Float) * NEG_INF;
            let (next_scores, next_positions) = running_candidates.topk(beams, -1, true, true);
            running = candidates.gather(
                1,
                &next_positions
                    .unsqueeze(2)
                    .expand([batch, beams, max_new], false),
                false,
            );
            running_scores = next_scores;
            let chosen_sources = source_beams.gather(1, &next_positions, false);
            let chosen_tokens = tokens.gather(1, &next_positions, false);

            // Finished set: merge the candidates that just ended.
            let generated_len = (step + 1) as f64;
            let mut candidate_scores = &top_scores / generated_len.powf(settings.length_penalty);
            candidate_scores += unsatisfied.logical_not().to_kind(Kind::Float) * NEG_INF;
            let just_finished = hits.logical_and(&top_mask.unsqueeze(0));
            candidate_scores += just_finished.logical_not().to_kind(Kind::Float) * NEG_INF;
            let merged_sequences = Tensor::cat(&[&finished, &candidates], 1);
            let merged_scores = Tensor::cat(&[&finished_scores, &candidate_scores], 1);
            let merged_finished = Tensor::cat(&[&is_finished, &just_finished], 1);
            let merged_lengths = Tensor::cat(
                &[
                    &finished_lengths,
                    &Tensor::full([batch, keep], step + 1, (Kind::Int64, device)),
                ],
                1,
            );
            let (best_scores, best_positions) = merged_scores.topk(beams, -1, true, true);
            finished = merged_sequences.gather(
                1,
                &best_positions
                    .unsqueeze(2)
                    .expand([batch, beams, max_new], false),
                false,
            );
            finished_scores = best_scores;
            is_finished = merged_finished.gather(1, &best_positions, false);
            finished_lengths = merged_lengths.gather(1, &best_positions, false);

            // Early-stop heuristic (early_stopping = False).
            let current_len = (step + 1) as f64;
            let best_running =
                running_scores.narrow(1, 0, 1) / current_len.powf(settings.length_penalty);
            let lowest_finished = finished_scores
                .min_dim(1, true)
                .0
                .expand([batch, beams], false);
            let worst_finished = lowest_finished
                .where_self(&is_finished, &Tensor::full_like(&lowest_finished, NEG_INF));
            unsatisfied =
                unsatisfied.logical_and(&best_running.gt_tensor(&worst_finished).any_dim(1, true));
            let improvement_possible = unsatisfied.any().int64_value(&[]) == 1;
            let valid_continuations = hits.all().int64_value(&[]) == 0;
            if !(improvement_possible && valid_continuations) {
                break;
            }

            // Reorder the cache to the chosen beams and feed their tokens.
            let sources = (chosen_sources + &batch_offset).view([-1]);
            let next = chosen_tokens.view([batch * beams, 1]);
            logits = self.continue_decoding(&mut state, &next, &media, Some(&sources))?;
        }
        // The best finished hypothesis of each row, cropped to the longest.
        let best = finished.select(1, 0);
        let longest = finished_lengths.select(1, 0).max().int64_value(&[]);
        Ok(best.narrow(1, 0, longest.max(0)))
    }
}
