//! Writing webdataset shards, with their indexes: what `flamingoctl data
//! pack` and `data synth` use. A shard is built in memory (shards are sized
//! to a few hundred MB at most), then stored with one request, index next.

use crate::error::Result;
use crate::index::{group, ShardIndex};
use crate::store::Storage;
use crate::tar::{self, BLOCK};

/// A ustar header for a regular file (GNU long-name entries for names of
/// 100 bytes or more).
fn header(name: &str, size: u64, typeflag: u8) -> [u8; 512] {
    let mut header = [0u8; 512];
    let bytes = name.as_bytes();
    let length = bytes.len().min(100);
    header[..length].copy_from_slice(&bytes[..length]);
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = typeflag;
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|byte| u32::from(*byte)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    header
}

fn pad(out: &mut Vec<u8>) {
    let padded = (out.len() as u64).div_ceil(BLOCK) * BLOCK;
    out.resize(padded as usize, 0);
}

/// Appends one file entry to a tar being built.
pub fn append_file(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    if name.len() >= 100 {
        let mut long = name.as_bytes().to_vec();
        long.push(0);
        out.extend_from_slice(&header("././@LongLink", long.len() as u64, b'L'));
        out.extend_from_slice(&long);
        pad(out);
    }
    out.extend_from_slice(&header(name, data.len() as u64, b'0'));
    out.extend_from_slice(data);
    pad(out);
}

/// Writes samples into numbered shards: `pattern` holds `{}` where the
/// shard number goes (`out/shard-{}.tar`, zero-padded to 5 digits).
#[derive(Debug)]
pub struct ShardWriter<'a> {
    storage: &'a Storage,
    pattern: String,
    per_shard: usize,
    shard: usize,
    buffer: Vec<u8>,
    in_shard: usize,
    written: Vec<String>,
    samples: u64,
}

impl<'a> ShardWriter<'a> {
    pub fn new(storage: &'a Storage, pattern: &str, per_shard: usize) -> Self {
        Self {
            storage,
            pattern: pattern.to_string(),
            per_shard: per_shard.max(1),
            shard: 0,
            buffer: Vec::new(),
            in_shard: 0,
            written: Vec::new(),
            samples: 0,
        }
    }

    pub async fn add(&mut self, key: &str, members: &[(String, Vec<u8>)]) -> Result<()> {
        for (suffix, data) in members {
            append_file(&mut self.buffer, &format!("{key}.{suffix}"), data);
        }
        self.in_shard += 1;
        self.samples += 1;
        if self.in_shard >= self.per_shard {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.in_shard == 0 {
            return Ok(());
        }
        let mut bytes = std::mem::take(&mut self.buffer);
        bytes.extend_from_slice(&[0u8; 1024]);
        let parsed = tar::parse(&bytes, 0, true);
        let index = ShardIndex::from_groups(bytes.len() as u64, &group(&parsed.members), None);
        let url = self.pattern.replace("{}", &format!("{:05}", self.shard));
        let location = self.storage.resolve(&url)?;
        location.write(bytes.into()).await?;
        index.write(&location).await?;
        self.written.push(url);
        self.shard += 1;
        self.in_shard = 0;
        Ok(())
    }

    /// Writes the last shard; returns every shard's URL and the sample count.
    pub async fn finish(mut self) -> Result<(Vec<String>, u64)> {
        self.flush().await?;
        Ok((self.written, self.samples))
    }

    /// The brace pattern naming the shards written so far.
    pub fn brace_pattern(pattern: &str, shards: usize) -> String {
        if shards <= 1 {
            pattern.replace("{}", "00000")
        } else {
            pattern.replace("{}", &format!("{{00000..{:05}}}", shards - 1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn written_shards_read_back_with_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::default();
        let pattern = format!("{}/s-{{}}.tar", dir.path().display());
        let mut writer = ShardWriter::new(&storage, &pattern, 2);
        let long_key = "k".repeat(120);
        for key in ["a", "b", long_key.as_str()] {
            writer
                .add(
                    key,
                    &[
                        ("txt".into(), key.as_bytes().to_vec()),
                        ("jpg".into(), vec![1; 700]),
                    ],
                )
                .await
                .unwrap();
        }
        let (shards, samples) = writer.finish().await.unwrap();
        assert_eq!(samples, 3);
        assert_eq!(shards.len(), 2);
        let second = storage.resolve(&shards[1]).unwrap();
        let stored = ShardIndex::read(&second).await.unwrap().unwrap();
        let rebuilt = ShardIndex::build(&second).await.unwrap();
        assert_eq!(stored, rebuilt);
        assert_eq!(stored.samples[0].key, long_key);
        assert_eq!(
            ShardWriter::brace_pattern(&pattern, 2),
            format!("{}/s-{{00000..00001}}.tar", dir.path().display())
        );
    }
}
