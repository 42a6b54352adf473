//! Shard indexes: each shard's samples (webdataset grouping by key) with the
//! byte range that holds each one, stored next to the shard as
//! `<shard>.index.json`. With it, a sample is one range read, the number of
//! samples is known before reading, and the epoch order can address
//! samples directly.

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::store::Location;
use crate::tar::{self, Member};

pub const INDEX_SUFFIX: &str = ".index.json";
const FORMAT: &str = "flamingo-shard-index/1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleSpan {
    pub key: String,
    /// First byte of the sample's first entry.
    pub start: u64,
    /// One past the last byte of its last entry (block-padded).
    pub end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    /// The shard's size when it was indexed (a changed shard is reindexed).
    pub shard_bytes: u64,
    pub samples: Vec<SampleSpan>,
    /// Where the shard stops being a readable tar, if it does: the samples
    /// before that point are indexed, the rest are lost.
    #[serde(default)]
    pub error: Option<String>,
}

/// webdataset's `base_plus_ext`: the key is the path up to the first dot of
/// the file name, the suffix (lower-cased) is the rest.
pub fn split_key(name: &str) -> Option<(&str, String)> {
    let file_start = name.rfind('/').map_or(0, |slash| slash + 1);
    let dot = name[file_start..].find('.')? + file_start;
    if dot == file_start {
        return None;
    }
    Some((&name[..dot], name[dot + 1..].to_lowercase()))
}

/// webdataset's default `skip_meta` (`re.match(r"__[^/]*__($|/)", name)`):
/// an entry named `__x__`, or under a `__x__/` folder, is not data.
fn is_meta(name: &str) -> bool {
    let first = name.split('/').next().unwrap_or_default();
    first.len() >= 4 && first.starts_with("__") && first.ends_with("__")
}

/// One sample's members, grouped as webdataset's `group_by_keys` does: a new
/// sample starts when the key changes or a suffix repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub key: String,
    pub start: u64,
    pub end: u64,
    /// (suffix, member)
    pub members: Vec<(String, Member)>,
}

pub fn group(members: &[Member]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for member in members {
        if is_meta(&member.name) {
            continue;
        }
        let Some((key, suffix)) = split_key(&member.name) else {
            continue;
        };
        let continues = groups.last().is_some_and(|last| {
            last.key == key && !last.members.iter().any(|(seen, _)| *seen == suffix)
        });
        if !continues {
            groups.push(Group {
                key: key.to_string(),
                start: member.header_offset,
                end: member.end(),
                members: Vec::new(),
            });
        }
        if let Some(last) = groups.last_mut() {
            last.end = member.end();
            last.members.push((suffix, member.clone()));
        }
    }
    groups
}

impl ShardIndex {
    pub fn from_groups(shard_bytes: u64, groups: &[Group], error: Option<String>) -> Self {
        Self {
            format: FORMAT.to_string(),
            shard_bytes,
            samples: groups
                .iter()
                .map(|group| SampleSpan {
                    key: group.key.clone(),
                    start: group.start,
                    end: group.end,
                })
                .collect(),
            error,
        }
    }

    /// Reads the shard once, front to back, and indexes it.
    pub async fn build(shard: &Location) -> Result<Self> {
        let mut stream = shard.stream().await?;
        let mut buffer: Vec<u8> = Vec::new();
        let mut base: u64 = 0;
        let mut members = Vec::new();
        let mut error = None;
        let mut total: u64 = 0;
        let mut finished = false;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            total += chunk.len() as u64;
            if finished || error.is_some() {
                continue;
            }
            buffer.extend_from_slice(&chunk);
            let parsed = tar::parse(&buffer, base, false);
            members.extend(parsed.members);
            finished = parsed.finished;
            if let Some(tar_error) = parsed.error {
                error = Some(tar_error.to_string());
            }
            buffer.drain(..parsed.consumed as usize);
            base += parsed.consumed;
        }
        if !finished && error.is_none() {
            let parsed = tar::parse(&buffer, base, true);
            members.extend(parsed.members);
            if let Some(tar_error) = parsed.error {
                error = Some(tar_error.to_string());
            }
        }
        Ok(Self::from_groups(total, &group(&members), error))
    }

    /// The index stored next to `shard`, if there is a current one.
    pub async fn read(shard: &Location) -> Result<Option<Self>> {
        let location = shard.with_suffix(INDEX_SUFFIX);
        let Some(bytes) = location.read_if_exists().await? else {
            return Ok(None);
        };
        let index: Self = serde_json::from_slice(&bytes).map_err(|error| DataError::Index {
            url: location.url().to_string(),
            message: format!("not a shard index ({error})"),
        })?;
        if index.format != FORMAT {
            return Err(DataError::Index {
                url: location.url().to_string(),
                message: format!("format '{}' (expected '{FORMAT}')", index.format),
            });
        }
        Ok(Some(index))
    }

    pub async fn write(&self, shard: &Location) -> Result<()> {
        let bytes = serde_json::to_vec(self).map_err(|error| DataError::Index {
            url: shard.url().to_string(),
            message: error.to_string(),
        })?;
        shard.with_suffix(INDEX_SUFFIX).write(bytes.into()).await
    }

    /// The stored index when it matches the shard's size, else a new one,
    /// stored if the storage allows (a read-only store keeps it in memory).
    pub async fn load_or_build(shard: &Location) -> Result<Self> {
        let size = shard.size().await?;
        if let Some(index) = Self::read(shard).await? {
            if index.shard_bytes == size {
                return Ok(index);
            }
            tracing::warn!(
                shard = shard.url(),
                "index is stale (shard size changed); reindexing"
            );
        }
        let index = Self::build(shard).await?;
        if let Err(error) = index.write(shard).await {
            tracing::warn!(shard = shard.url(), %error, "could not store the index; keeping it in memory");
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::tests::archive;

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(
            split_key("a/b.c/000123.JPG"),
            Some(("a/b.c/000123", "jpg".into()))
        );
        assert_eq!(split_key("k.seg.json"), Some(("k", "seg.json".into())));
        assert_eq!(split_key("README"), None);
        assert_eq!(split_key("dir/.hidden"), None);
    }

    #[test]
    fn grouping_follows_webdataset() {
        let data = archive(&[
            ("k0.jpg", b"i"),
            ("k0.txt", b"t"),
            ("__meta__/k9.json", b"{}"),
            ("k1.txt", b"t"),
            ("k1.txt", b"again"),
            ("nodot", b"x"),
        ]);
        let parsed = tar::parse(&data, 0, true);
        let groups = group(&parsed.members);
        let keys: Vec<(&str, usize)> = groups
            .iter()
            .map(|g| (g.key.as_str(), g.members.len()))
            .collect();
        // A repeated suffix starts a new sample with the same key.
        assert_eq!(keys, [("k0", 2), ("k1", 1), ("k1", 1)]);
        assert_eq!(groups[0].start, 0);
        assert_eq!(groups[0].end, 2048);
    }
}
