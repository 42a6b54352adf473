//! The language model's Hugging Face tokenizer (`tokenizer.json`) with
//! OpenFlamingo's additions (reference §1.5): `<|endofchunk|>` and `<image>`
//! as additional special tokens, and `<PAD>` when the tokenizer has no pad
//! token. Added tokens get the ids after the base vocabulary, in that order,
//! so the embedding matrix grows to [`FlamingoTokenizer::len`] rows.

use std::path::Path;

use tokenizers::{AddedToken, Tokenizer, TruncationParams};

use crate::{PreprocessError, Result};

pub const END_OF_CHUNK: &str = "<|endofchunk|>";
pub const MEDIA: &str = "<image>";
pub const PAD: &str = "<PAD>";

#[derive(Debug, Clone)]
pub struct FlamingoTokenizer {
    inner: Tokenizer,
    media_token_id: u32,
    end_of_chunk_token_id: u32,
    pad_token_id: u32,
    eos_token: Option<String>,
}

/// A special token (`pad_token`, `eos_token`) a Hugging Face model dir
/// declares, if any (`tokenizer_config.json` or `special_tokens_map.json`).
fn declared_token(dir: &Path, field: &str) -> Option<String> {
    ["tokenizer_config.json", "special_tokens_map.json"]
        .iter()
        .filter_map(|name| std::fs::read_to_string(dir.join(name)).ok())
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .find_map(|config| match config.get(field)? {
            serde_json::Value::String(token) => Some(token.clone()),
            serde_json::Value::Object(token) => token.get("content")?.as_str().map(String::from),
            _ => None,
        })
}

impl FlamingoTokenizer {
    /// Loads `<dir>/tokenizer.json` and adds OpenFlamingo's tokens.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = Tokenizer::from_file(&path).map_err(|error| PreprocessError::File {
            path: path.display().to_string(),
            message: format!("{error} (a Hugging Face tokenizer.json is expected)"),
        })?;
        let special = |content: &str| AddedToken::from(content.to_string(), true);
        inner.add_special_tokens(&[special(END_OF_CHUNK), special(MEDIA)]);
        let pad = match declared_token(dir, "pad_token") {
            Some(pad) => pad,
            None => {
                inner.add_special_tokens(&[special(PAD)]);
                PAD.to_string()
            }
        };
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| PreprocessError::Tokenizer {
                    path: path.display().to_string(),
                    message: format!("token {token} has no id"),
                })
        };
        Ok(Self {
            media_token_id: id(MEDIA)?,
            end_of_chunk_token_id: id(END_OF_CHUNK)?,
            pad_token_id: id(&pad)?,
            eos_token: declared_token(dir, "eos_token"),
            inner,
        })
    }

    /// Truncates every encoding to `max_length` tokens, special tokens
    /// included, as Hugging Face's `truncation=True, max_length=…` does.
    pub fn with_truncation(mut self, max_length: usize) -> Result<Self> {
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|error| PreprocessError::Truncation {
                max_length,
                message: error.to_string(),
            })?;
        Ok(self)
    }

    /// The tokenizer's `eos_token` text (Python's `tokenizer.eos_token`),
    /// if the model dir declares one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn media_token_id(&self) -> u32 {
        self.media_token_id
    }

    pub fn end_of_chunk_token_id(&self) -> u32 {
        self.end_of_chunk_token_id
    }

    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    /// Vocabulary size including added tokens (Python's `len(tokenizer)`),
    /// the number of embedding rows the model needs.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token ids of `text`; `add_special_tokens` as Hugging Face's default
    /// (e.g. LLaMA's BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|error| PreprocessError::Encode {
                text: text.to_string(),
                message: error.to_string(),
            })
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|error| PreprocessError::Decode {
                ids: ids.to_vec(),
                message: error.to_string(),
            })
    }
}
