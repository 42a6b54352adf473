//! OpenFlamingo's preprocessing (`open_flamingo/train/data.py`, reference
//! §3): LAION pairs and MMC4 (and ChatGPT-generated) interleaved documents
//! into tokens, labels and CLIP-sized images. Pure functions of the sample
//! bytes and the seeded decisions, run on worker threads.

use base64::Engine as _;
use flamingo_preprocess::FlamingoTokenizer;
use flamingo_preprocess::{clip_image, RgbImage};
use serde_json::Value;

use crate::assignment::one_to_one;
use crate::error::{DataError, Result};
use crate::labels::{interleaved_labels, laion_labels, python_strip};
use crate::sample::{Prepared, RawSample, Reject, RejectReason};
use crate::spec::{Assignment, DataSpec, DatasetKind};

const EOC: &str = "<|endofchunk|>";
const MEDIA: &str = "<image>";
/// Why MMC4's single-image rules reject (the acceptance index repeats them).
pub(crate) const SINGLE_DROPPED: &str = "seeded 0.5 drop";
pub(crate) const SINGLE_AT_END: &str = "the only <image> is the last token";

/// The random decisions for one sample, drawn by the caller from seeded
/// streams (see [`flamingo_common::rng`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decisions {
    /// Mirror the sample's images.
    pub flip: bool,
    /// Drop the sample if it has exactly one image.
    pub drop_if_single_image: bool,
}

#[derive(Debug)]
pub struct Preparer {
    spec: DataSpec,
    tokenizer: FlamingoTokenizer,
    eos: String,
    pad: i64,
    media: i64,
    end_of_chunk: i64,
}

impl Preparer {
    pub fn new(spec: &DataSpec) -> Result<Self> {
        let dir = std::path::Path::new(&spec.tokenizer);
        let max_tokens = match spec.dataset {
            DatasetKind::Laion => spec.laion.max_tokens,
            DatasetKind::Mmc4 => spec.mmc4.max_tokens,
        };
        let tokenizer = FlamingoTokenizer::from_dir(dir)
            .and_then(|tokenizer| tokenizer.with_truncation(max_tokens as usize))
            .map_err(|error| DataError::Tokenizer {
                path: spec.tokenizer.clone(),
                message: error.to_string(),
            })?;
        let eos = tokenizer
            .eos_token()
            .ok_or_else(|| DataError::Tokenizer {
                path: spec.tokenizer.clone(),
                message: "the tokenizer declares no eos_token (tokenizer_config.json), which every sample ends with".into(),
            })?
            .to_string();
        Ok(Self {
            spec: spec.clone(),
            eos,
            pad: i64::from(tokenizer.pad_token_id()),
            media: i64::from(tokenizer.media_token_id()),
            end_of_chunk: i64::from(tokenizer.end_of_chunk_token_id()),
            tokenizer,
        })
    }

    pub fn pad_token_id(&self) -> i64 {
        self.pad
    }

    pub fn spec(&self) -> &DataSpec {
        &self.spec
    }

    /// How many `<image>` tokens `input_ids` holds.
    pub fn media_tokens(&self, input_ids: &[i64]) -> usize {
        input_ids.iter().filter(|id| **id == self.media).count()
    }

    pub fn prepare(&self, raw: &RawSample, decisions: Decisions) -> Result<Prepared, Reject> {
        match self.spec.dataset {
            DatasetKind::Laion => self.laion(raw, decisions),
            DatasetKind::Mmc4 => self.interleaved(raw, decisions),
        }
    }

    fn encode(&self, text: &str) -> Result<Vec<i64>, Reject> {
        self.tokenizer
            .encode(text, true)
            .map(|ids| ids.into_iter().map(i64::from).collect())
            .map_err(|error| Reject::new(RejectReason::BadText, error.to_string()))
    }

    /// Decoded, resized, center-cropped and mirrored if `flip` (only the
    /// part of a JPEG that the crop reads is decoded).
    fn image(&self, bytes: &[u8], which: &str, flip: bool) -> Result<RgbImage, Reject> {
        clip_image(bytes, self.spec.image_size as usize, flip)
            .map_err(|error| Reject::new(RejectReason::BadImage, format!("{which}: {error}")))
    }

    /// `<image>{caption.strip()}<|endofchunk|>{eos}`, truncated to
    /// `laion.max_tokens`; the batch pads.
    fn laion(&self, raw: &RawSample, decisions: Decisions) -> Result<Prepared, Reject> {
        let text = raw
            .members
            .get("txt")
            .ok_or_else(|| Reject::new(RejectReason::MissingText, "no .txt member"))?;
        // to_tuple("jpg;png;jpeg", …) takes the first present.
        let (suffix, image) = ["jpg", "png", "jpeg"]
            .iter()
            .find_map(|suffix| raw.members.get(*suffix).map(|bytes| (*suffix, bytes)))
            .ok_or_else(|| Reject::new(RejectReason::MissingImage, "no .jpg/.png/.jpeg member"))?;
        let caption = std::str::from_utf8(text)
            .map_err(|error| Reject::new(RejectReason::BadText, format!("txt: {error}")))?;
        let cropped = self.image(image, suffix, decisions.flip)?;
        let input_ids = self.encode(&format!(
            "{MEDIA}{}{EOC}{}",
            python_strip(caption),
            self.eos
        ))?;
        let labels = laion_labels(&input_ids, self.pad, self.media);
        Ok(Prepared {
            shard: raw.shard.clone(),
            key: raw.key.clone(),
            images: vec![cropped],
            image_order: vec![0],
            attention_mask: vec![1; input_ids.len()],
            input_ids,
            labels,
        })
    }

    fn interleaved(&self, raw: &RawSample, decisions: Decisions) -> Result<Prepared, Reject> {
        let json = raw
            .members
            .get("json")
            .ok_or_else(|| Reject::new(RejectReason::MissingJson, "no .json member"))?;
        let info: Value = serde_json::from_slice(json)
            .map_err(|error| Reject::new(RejectReason::BadJson, error.to_string()))?;
        if info.get("is_gpt").is_some() {
            return self.chatgpt(raw, &info, decisions);
        }
        let bad = |what: &str| Reject::new(RejectReason::BadJson, what.to_string());
        let mut sentences: Vec<String> = info
            .get("text_list")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no text_list array"))?
            .iter()
            .map(|sentence| sentence.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("text_list holds a non-string"))?;
        let image_info = info
            .get("image_info")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no image_info array"))?;
        let similarity = info
            .get("similarity_matrix")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no similarity_matrix array"))?;
        let mmc4 = &self.spec.mmc4;
        let rows: Vec<Vec<f64>> = image_info
            .iter()
            .zip(similarity)
            .map(|(_, row)| {
                row.as_array()
                    .map(|values| values.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default()
            })
            .collect();
        let assigned = match mmc4.assignment {
            Assignment::BestSentence => None,
            Assignment::OneToOne => {
                if rows.iter().any(|row| row.len() != sentences.len()) {
                    return Err(bad(
                        "similarity_matrix rows must each have one value per sentence",
                    ));
                }
                Some(one_to_one(&rows))
            }
        };
        // (index in image_info, decoded image, sentence)
        let mut kept: Vec<(usize, RgbImage, usize)> = Vec::new();
        for (index, (image, row)) in image_info.iter().zip(&rows).enumerate() {
            let Some(encoded) = image.get("image_base64") else {
                continue;
            };
            let encoded = encoded
                .as_str()
                .ok_or_else(|| bad("image_base64 is not a string"))?;
            let bytes = decode_base64(encoded).map_err(|error| {
                Reject::new(RejectReason::BadBase64, format!("image {index}: {error}"))
            })?;
            let (sentence, score) = match &assigned {
                Some(assigned) => match assigned[index] {
                    Some(sentence) => (sentence, row[sentence]),
                    // More images than sentences: this one got none.
                    None => continue,
                },
                // np.argmax: the first maximum.
                None => row
                    .iter()
                    .copied()
                    .enumerate()
                    .fold(
                        None,
                        |best: Option<(usize, f64)>, (position, value)| match best {
                            Some((_, top)) if top >= value => best,
                            _ => Some((position, value)),
                        },
                    )
                    .ok_or_else(|| bad(&format!("similarity_matrix row {index} is empty")))?,
            };
            if (bytes.len() as u64) / 1000 <= mmc4.min_image_kb {
                continue;
            }
            if score < mmc4.sim_threshold {
                continue;
            }
            let decoded = self.image(&bytes, &format!("image {index}"), decisions.flip)?;
            kept.push((index, decoded, sentence));
        }
        if kept.is_empty() {
            return Err(Reject::new(
                RejectReason::NoImages,
                "no image passed the filters",
            ));
        }
        kept.truncate(mmc4.max_images as usize);
        for (_, _, sentence) in &kept {
            let text = sentences
                .get_mut(*sentence)
                .ok_or_else(|| bad("similarity_matrix has more columns than text_list"))?;
            *text = format!("{EOC}{MEDIA}{text}");
        }
        let text = clean_interleaved(&sentences.join(" "));
        // Images follow their sentences, so the k-th <image> is the k-th
        // image (upstream keeps image order here and mis-pairs when the
        // best sentences are not in image order).
        kept.sort_by_key(|(_, _, sentence)| *sentence);
        self.finish_interleaved(raw, &text, kept, decisions, true)
    }

    /// ChatGPT-generated sequences (reference §3.4): placeholders become
    /// `<|endofchunk|><image>`, no filters, no random drop.
    fn chatgpt(
        &self,
        raw: &RawSample,
        info: &Value,
        decisions: Decisions,
    ) -> Result<Prepared, Reject> {
        let bad = |what: &str| Reject::new(RejectReason::BadJson, what.to_string());
        let example = info
            .get("example")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no example string"))?;
        let image_map = info
            .get("image_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no image_map object"))?;
        let mut kept = Vec::new();
        for number in 1..=image_map.len() {
            let placeholder = format!("_!_IMAGE{number}_!_");
            let encoded = image_map
                .get(&placeholder)
                .and_then(|entry| entry.get("base64_image"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&format!("image_map[{placeholder}].base64_image missing")))?;
            let bytes = decode_base64(encoded).map_err(|error| {
                Reject::new(RejectReason::BadBase64, format!("{placeholder}: {error}"))
            })?;
            kept.push((
                number - 1,
                self.image(&bytes, &placeholder, decisions.flip)?,
                number - 1,
            ));
        }
        kept.truncate(self.spec.mmc4.max_images as usize);
        let mut text = replace_placeholders(example);
        text = clean_interleaved(&text);
        let starts: Vec<usize> = text.match_indices(MEDIA).map(|(at, _)| at).collect();
        let max_images = self.spec.mmc4.max_images as usize;
        if starts.len() > max_images {
            text.truncate(starts[max_images - 1]);
        }
        self.finish_interleaved(raw, &text, kept, decisions, false)
    }

    fn finish_interleaved(
        &self,
        raw: &RawSample,
        text: &str,
        kept: Vec<(usize, RgbImage, usize)>,
        decisions: Decisions,
        single_image_rules: bool,
    ) -> Result<Prepared, Reject> {
        let max_tokens = self.spec.mmc4.max_tokens as usize;
        let mut input_ids = self.encode(&format!("{text}{EOC}{}", self.eos))?;
        let real = input_ids.len();
        input_ids.resize(max_tokens.max(real), self.pad);
        let mut attention_mask = vec![1; real];
        attention_mask.resize(input_ids.len(), 0);
        let images = input_ids.iter().filter(|id| **id == self.media).count();
        if images < self.spec.mmc4.min_images as usize {
            return Err(Reject::new(
                RejectReason::TooFewImages,
                format!("{images} <image> token(s) after truncation"),
            ));
        }
        if single_image_rules && images == 1 {
            if decisions.drop_if_single_image {
                return Err(Reject::new(
                    RejectReason::SingleImageDropped,
                    SINGLE_DROPPED,
                ));
            }
            if input_ids.last() == Some(&self.media) {
                return Err(Reject::new(RejectReason::ImageAtEnd, SINGLE_AT_END));
            }
        }
        let labels = interleaved_labels(&input_ids, self.pad, self.media, self.end_of_chunk);
        let mut image_order = Vec::with_capacity(kept.len());
        let mut cropped = Vec::with_capacity(kept.len());
        for (index, image, _) in kept {
            image_order.push(index);
            cropped.push(image);
        }
        Ok(Prepared {
            shard: raw.shard.clone(),
            key: raw.key.clone(),
            images: cropped,
            image_order,
            input_ids,
            attention_mask,
            labels,
        })
    }
}

/// Drops the first `<|endofchunk|>` and the spaces around special tokens,
/// as upstream does after joining the sentences.
fn clean_interleaved(text: &str) -> String {
    text.replacen(EOC, "", 1)
        .replace(&format!(" {EOC}"), EOC)
        .replace(&format!("{MEDIA} "), MEDIA)
        .replace(&format!(" {MEDIA}"), MEDIA)
}

/// `re.sub(r"_!_IMAGE\d+_!_", "<|endofchunk|><image>", text)`.
fn replace_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("_!_IMAGE") {
        let after = &rest[start + 8..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && after[digits..].starts_with("_!_") {
            out.push_str(&rest[..start]);
            out.push_str(EOC);
            out.push_str(MEDIA);
            rest = &after[digits + 3..];
        } else {
            out.push_str(&rest[..start + 8]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Python's `base64.b64decode` without `validate`: characters outside the
/// alphabet (newlines, spaces) are discarded first.
fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    // Python accepts nonzero bits after the last whole byte ("QR==" is
    // b"A"); padding it requires, as the default does.
    const ENGINE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let engine = ENGINE;
    // Text in the alphabet alone decodes directly; anything else (newlines,
    // spaces) is filtered out first. Non-ASCII characters are bytes ≥ 0x80
    // in UTF-8, none of them in the alphabet.
    engine
        .decode(text)
        .or_else(|_| {
            let cleaned: Vec<u8> = text
                .bytes()
                .filter(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/' | b'='))
                .collect();
            engine.decode(cleaned)
        })
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preparer(extra: &str) -> (tempfile::TempDir, Preparer) {
        let dir = tempfile::tempdir().unwrap();
        crate::synthetic::write_tokenizer(&dir.path().join("lm")).unwrap();
        let spec = DataSpec::from_toml(
            &format!(
                "dataset = \"mmc4\"\nshards = \"x\"\ntokenizer = \"{}\"\nimage_size = 8\naugment = false\n{extra}",
                dir.path().join("lm").display()
            ),
            None,
        )
        .unwrap();
        (dir, Preparer::new(&spec).unwrap())
    }

    #[test]
    fn one_to_one_assignment_gives_each_image_its_own_sentence() {
        // Both images are most similar to sentence 0; one-to-one pairs
        // image 0 with sentence 1 (0.5 + 0.8 beats 0.9 + 0.1).
        let (_, members) = crate::synthetic::mmc4_sample(1, 0, 96);
        let mut doc: Value = serde_json::from_slice(&members[0].1).unwrap();
        let images: Vec<Value> = doc["image_info"].as_array().unwrap()[..2].to_vec();
        doc["image_info"] = Value::Array(images);
        doc["text_list"] = serde_json::json!(["a red circle .", "a blue square ."]);
        doc["similarity_matrix"] = serde_json::json!([[0.9, 0.5], [0.8, 0.1]]);
        let raw = RawSample {
            shard: "s".into(),
            key: "k".into(),
            members: [("json".to_string(), bytes::Bytes::from(doc.to_string()))]
                .into_iter()
                .collect(),
        };
        let media = |prepared: &Prepared, preparer: &Preparer| {
            // Token positions of <image>, to see which sentence each precedes.
            prepared
                .input_ids
                .iter()
                .enumerate()
                .filter(|(_, id)| **id == preparer.media)
                .map(|(position, _)| position)
                .collect::<Vec<_>>()
        };
        let (_dir, best) = preparer("");
        let shared = best.prepare(&raw, Decisions::default()).unwrap();
        // "<image><|endofchunk|><image>a red circle . a blue square ."
        assert_eq!(media(&shared, &best), [0, 2], "both before sentence 0");
        assert_eq!(shared.image_order, [0, 1]);
        let (_dir, paired) = preparer("[mmc4]\nassignment = \"one_to_one\"\n");
        let split = paired.prepare(&raw, Decisions::default()).unwrap();
        // Image 1 before sentence 0, image 0 before sentence 1.
        assert_eq!(split.image_order, [1, 0]);
        assert_eq!(media(&split, &paired).len(), 2);
        assert!(media(&split, &paired)[1] > 2);
    }

    #[test]
    fn text_cleanup_and_placeholders_follow_upstream() {
        let joined = format!("A {EOC}{MEDIA}b c. {EOC}{MEDIA} d");
        assert_eq!(
            clean_interleaved(&joined),
            format!("A{MEDIA}b c.{EOC}{MEDIA}d")
        );
        assert_eq!(
            replace_placeholders("x _!_IMAGE1_!_ y _!_IMAGEx_!_ _!_IMAGE12_!_"),
            format!("x {EOC}{MEDIA} y _!_IMAGEx_!_ {EOC}{MEDIA}")
        );
        assert_eq!(decode_base64("aGVs\nbG8=").unwrap(), b"hello");
        assert!(decode_base64("aGVsbG8").is_err());
        // Python's b64decode("QR==") is b"A": the trailing bits are dropped.
        assert_eq!(decode_base64("QR==").unwrap(), b"A");
    }
}
