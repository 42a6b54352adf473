//! Acceptance indexes: which samples of a shard pass the filters, decided
//! once by a validating pass (`flamingoctl data index --accept`) and stored
//! next to the shard as `<shard>.accept-<fingerprint>.json`.
//!
//! A global batch ends at its `B`-th accepted sample, so without this
//! record the only way to know where a batch (and so a rank's slice)
//! starts is to preprocess every sample before it. With it, any replica
//! plans a batch — its accepted samples, its skipped ones with their
//! reasons, its end — from the verdicts alone, and preprocesses only the
//! part it serves. That is what lets K replicas split one job's work.
//!
//! A verdict does not depend on the seeded decisions except for MMC4's
//! random drop of single-image documents, so that one is recorded as "a
//! single image" and the drop is drawn when the batch is planned, exactly
//! as preprocessing draws it. The fingerprint covers everything else a
//! verdict depends on (the dataset kind, its filter options, the image
//! size, the tokenizer's files): change any of them and the stored
//! verdicts no longer apply, and batches are computed the old way until
//! the pass runs again.

use std::collections::BTreeMap;

use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::order::SampleRef;
use crate::prepare::{Decisions, Preparer, SINGLE_AT_END, SINGLE_DROPPED};
use crate::reader::Dataset;
use crate::sample::{RawSample, Reject, RejectReason};
use crate::spec::{DataSpec, DatasetKind};
use crate::store::Location;

const FORMAT: &str = "flamingo-accept/1";
/// Bumped whenever preprocessing changes what it accepts.
const RULES_VERSION: u32 = 1;

/// What preprocessing decides about one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// One image: accepted unless the seeded single-image drop falls.
    Single,
    /// One image, and it is the last token: rejected whichever way the
    /// drop falls (and which reason depends on it).
    SingleAtEnd,
    Reject(Reject),
}

impl Verdict {
    /// The outcome under `decisions`: accepted, or why not.
    pub fn outcome(&self, decisions: Decisions) -> std::result::Result<(), Reject> {
        match self {
            Verdict::Accept => Ok(()),
            Verdict::Single if !decisions.drop_if_single_image => Ok(()),
            Verdict::Single | Verdict::SingleAtEnd if decisions.drop_if_single_image => Err(
                Reject::new(RejectReason::SingleImageDropped, SINGLE_DROPPED),
            ),
            Verdict::Single | Verdict::SingleAtEnd => {
                Err(Reject::new(RejectReason::ImageAtEnd, SINGLE_AT_END))
            }
            Verdict::Reject(reject) => Err(reject.clone()),
        }
    }
}

impl Preparer {
    /// The sample's verdict: prepared once without the drop, and once more
    /// with it when the result holds a single `<image>` (MMC4 only).
    pub fn verdict(&self, raw: &RawSample) -> Verdict {
        let kept = Decisions::default();
        match self.prepare(raw, kept) {
            Ok(prepared) => {
                if self.spec().dataset == DatasetKind::Mmc4
                    && self.media_tokens(&prepared.input_ids) == 1
                {
                    let dropped = Decisions {
                        drop_if_single_image: true,
                        ..kept
                    };
                    if let Err(reject) = self.prepare(raw, dropped) {
                        if reject.reason == RejectReason::SingleImageDropped {
                            return Verdict::Single;
                        }
                    }
                }
                Verdict::Accept
            }
            Err(reject) if reject.reason == RejectReason::ImageAtEnd => Verdict::SingleAtEnd,
            Err(reject) => Verdict::Reject(reject),
        }
    }
}

/// A rejected sample in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Rejected {
    reason: String,
    detail: String,
}

/// One shard's verdicts, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptIndex {
    format: String,
    /// The shard's size when it was judged (a changed shard is judged
    /// again).
    pub shard_bytes: u64,
    pub fingerprint: String,
    /// One letter per sample of the shard index: `a` accepted, `s` a
    /// single image (accepted unless dropped), `e` a single image at the
    /// end, `r` rejected (why: `rejects`).
    verdicts: String,
    /// Sample number → why it was rejected.
    rejects: BTreeMap<u64, Rejected>,
}

impl AcceptIndex {
    pub fn new(shard_bytes: u64, fingerprint: &str, verdicts: &[Verdict]) -> Self {
        let mut letters = String::with_capacity(verdicts.len());
        let mut rejects = BTreeMap::new();
        for (sample, verdict) in verdicts.iter().enumerate() {
            letters.push(match verdict {
                Verdict::Accept => 'a',
                Verdict::Single => 's',
                Verdict::SingleAtEnd => 'e',
                Verdict::Reject(reject) => {
                    rejects.insert(
                        sample as u64,
                        Rejected {
                            reason: reject.reason.as_str().to_string(),
                            detail: reject.detail.clone(),
                        },
                    );
                    'r'
                }
            });
        }
        Self {
            format: FORMAT.to_string(),
            shard_bytes,
            fingerprint: fingerprint.to_string(),
            verdicts: letters,
            rejects,
        }
    }

    /// The verdicts, one per sample; fails on a damaged file.
    pub fn verdicts(&self, url: &str) -> Result<Vec<Verdict>> {
        let damaged = |message: String| DataError::Index {
            url: url.to_string(),
            message,
        };
        self.verdicts
            .chars()
            .enumerate()
            .map(|(sample, letter)| match letter {
                'a' => Ok(Verdict::Accept),
                's' => Ok(Verdict::Single),
                'e' => Ok(Verdict::SingleAtEnd),
                'r' => {
                    let rejected = self.rejects.get(&(sample as u64)).ok_or_else(|| {
                        damaged(format!("sample {sample} is rejected without a reason"))
                    })?;
                    let reason = RejectReason::from_name(&rejected.reason).ok_or_else(|| {
                        damaged(format!(
                            "sample {sample}: unknown reason '{}'",
                            rejected.reason
                        ))
                    })?;
                    Ok(Verdict::Reject(Reject::new(
                        reason,
                        rejected.detail.clone(),
                    )))
                }
                other => Err(damaged(format!(
                    "sample {sample}: unknown verdict '{other}'"
                ))),
            })
            .collect()
    }

    /// Where `shard`'s verdicts under `fingerprint` are stored.
    pub fn location(shard: &Location, fingerprint: &str) -> Location {
        shard.with_suffix(&format!(".accept-{fingerprint}.json"))
    }

    /// The stored verdicts for `shard` under `fingerprint`, if there are
    /// current ones (same shard size, same number of samples).
    pub async fn read(
        shard: &Location,
        fingerprint: &str,
        shard_bytes: u64,
        samples: usize,
    ) -> Result<Option<Vec<Verdict>>> {
        let location = Self::location(shard, fingerprint);
        let Some(bytes) = location.read_if_exists().await? else {
            return Ok(None);
        };
        let index: Self = serde_json::from_slice(&bytes).map_err(|error| DataError::Index {
            url: location.url().to_string(),
            message: format!("not an acceptance index ({error})"),
        })?;
        if index.format != FORMAT || index.fingerprint != fingerprint {
            return Err(DataError::Index {
                url: location.url().to_string(),
                message: format!(
                    "format '{}' with fingerprint {} (expected '{FORMAT}' with {fingerprint})",
                    index.format, index.fingerprint
                ),
            });
        }
        if index.shard_bytes != shard_bytes || index.verdicts.len() != samples {
            tracing::warn!(
                shard = shard.url(),
                "acceptance index is stale (the shard changed); run `flamingoctl data index --accept` again"
            );
            return Ok(None);
        }
        index.verdicts(location.url()).map(Some)
    }

    pub async fn write(&self, shard: &Location) -> Result<()> {
        let bytes = serde_json::to_vec(self).map_err(|error| DataError::Index {
            url: shard.url().to_string(),
            message: error.to_string(),
        })?;
        Self::location(shard, &self.fingerprint)
            .write(bytes.into())
            .await
    }
}

/// What a verdict depends on besides the shard's bytes, as 16 hex digits.
pub fn fingerprint(spec: &DataSpec) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(RULES_VERSION.to_le_bytes());
    let options = serde_json::json!({
        "dataset": spec.dataset,
        "image_size": spec.image_size,
        "laion": spec.laion,
        "mmc4": spec.mmc4,
    });
    hash.update(options.to_string().as_bytes());
    let dir = std::path::Path::new(&spec.tokenizer);
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                hash.update(name.as_bytes());
                hash.update((bytes.len() as u64).to_le_bytes());
                hash.update(&bytes);
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(DataError::Tokenizer {
                    path: path.display().to_string(),
                    message: error.to_string(),
                })
            }
        }
    }
    let digest = hash.finalize();
    Ok(digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// Samples read and judged at once.
const JUDGE_CHUNK: u64 = 256;

/// Judges every sample of shard `shard` of `dataset`: reads it as training
/// reads it and preprocesses it on `pool`. `progress` hears the samples
/// judged so far.
pub async fn judge_shard(
    dataset: &Dataset,
    shard: usize,
    preparer: &Arc<Preparer>,
    pool: &Arc<rayon::ThreadPool>,
    mut progress: impl FnMut(u64),
) -> Result<Vec<Verdict>> {
    let samples = dataset.shards[shard].index.samples.len() as u64;
    let mut verdicts = Vec::with_capacity(samples as usize);
    let mut next = 0u64;
    while next < samples {
        let end = (next + JUDGE_CHUNK).min(samples);
        let refs: Vec<SampleRef> = (next..end)
            .map(|sample| SampleRef {
                shard: shard as u32,
                sample,
            })
            .collect();
        let raws = dataset.read(&refs).await?;
        let (preparer, pool) = (preparer.clone(), pool.clone());
        let judged = tokio::task::spawn_blocking(move || {
            pool.install(|| {
                raws.into_par_iter()
                    .map(|raw| match raw {
                        Ok(raw) => preparer.verdict(&raw),
                        Err(skipped) => Verdict::Reject(skipped.reject),
                    })
                    .collect::<Vec<_>>()
            })
        })
        .await
        .map_err(|error| DataError::Storage {
            url: "preprocessing".into(),
            message: error.to_string(),
        })?;
        verdicts.extend(judged);
        next = end;
        progress(next);
    }
    Ok(verdicts)
}

/// What [`judge_dataset`] did.
#[derive(Debug, Clone)]
pub struct Judged {
    pub fingerprint: String,
    /// Shards judged in this pass (their index written).
    pub judged_shards: usize,
    /// Shards whose stored index was already current.
    pub current_shards: usize,
    /// Every shard's verdicts, in the dataset's order.
    pub verdicts: Vec<Vec<Verdict>>,
}

/// Judges every shard of `dataset` whose acceptance index is missing or
/// stale (every shard when `force`) on `threads` threads and stores each
/// index next to its shard: the pass `flamingoctl data index --accept`
/// runs. `progress` hears the samples done so far and the shard at hand.
pub async fn judge_dataset(
    spec: &DataSpec,
    dataset: &Dataset,
    threads: usize,
    force: bool,
    mut progress: impl FnMut(u64, &str),
) -> Result<Judged> {
    let preparer = Arc::new(Preparer::new(spec)?);
    let fingerprint = fingerprint(spec)?;
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|error| DataError::Storage {
                url: "preprocessing".into(),
                message: error.to_string(),
            })?,
    );
    let mut judged = Judged {
        fingerprint,
        judged_shards: 0,
        current_shards: 0,
        verdicts: Vec::with_capacity(dataset.shards.len()),
    };
    let mut done = 0u64;
    for (number, shard) in dataset.shards.iter().enumerate() {
        let samples = shard.index.samples.len();
        let stored = if force {
            None
        } else {
            AcceptIndex::read(
                &shard.location,
                &judged.fingerprint,
                shard.index.shard_bytes,
                samples,
            )
            .await
            .unwrap_or(None)
        };
        let url = shard.location.url();
        let verdicts = match stored {
            Some(verdicts) => {
                judged.current_shards += 1;
                verdicts
            }
            None => {
                let before = done;
                let verdicts = judge_shard(dataset, number, &preparer, &pool, |count| {
                    progress(before + count, url)
                })
                .await?;
                AcceptIndex::new(shard.index.shard_bytes, &judged.fingerprint, &verdicts)
                    .write(&shard.location)
                    .await?;
                judged.judged_shards += 1;
                verdicts
            }
        };
        done += samples as u64;
        progress(done, url);
        judged.verdicts.push(verdicts);
    }
    Ok(judged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_survive_the_file_and_draw_the_drop_like_preprocessing() {
        let verdicts = vec![
            Verdict::Accept,
            Verdict::Single,
            Verdict::SingleAtEnd,
            Verdict::Reject(Reject::new(RejectReason::BadImage, "image 2: truncated")),
        ];
        let index = AcceptIndex::new(4096, "00ff", &verdicts);
        let text = serde_json::to_vec(&index).unwrap();
        let back: AcceptIndex = serde_json::from_slice(&text).unwrap();
        assert_eq!(back.verdicts("x").unwrap(), verdicts);
        let drop = Decisions {
            drop_if_single_image: true,
            flip: false,
        };
        let keep = Decisions::default();
        assert!(verdicts[0].outcome(drop).is_ok());
        assert!(verdicts[1].outcome(keep).is_ok());
        assert_eq!(
            verdicts[1].outcome(drop).unwrap_err().reason,
            RejectReason::SingleImageDropped
        );
        assert_eq!(
            verdicts[2].outcome(keep).unwrap_err().reason,
            RejectReason::ImageAtEnd
        );
        assert_eq!(
            verdicts[2].outcome(drop).unwrap_err().reason,
            RejectReason::SingleImageDropped
        );
        assert_eq!(
            verdicts[3].outcome(keep).unwrap_err().detail,
            "image 2: truncated"
        );
    }

    #[test]
    fn a_damaged_file_is_named() {
        let mut index = AcceptIndex::new(1, "00", &[Verdict::Accept]);
        index.verdicts = "ar".into();
        let error = index.verdicts("s3://b/shard.accept-00.json").unwrap_err();
        assert!(
            error.to_string().contains("s3://b/shard.accept-00.json")
                && error.to_string().contains("sample 1"),
            "{error}"
        );
    }
}
