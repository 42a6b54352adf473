//! Newtypes for identifiers, so a job id is never passed where a node id goes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl JobId {
    /// A fresh id that sorts by creation time: `job-<unix ms base36>-<random>`.
    pub fn generate(unix_ms: i64) -> Self {
        let random: u32 = rand::random::<u32>() & 0xfffff;
        Self(format!("job-{}-{random:05x}", to_base36(unix_ms as u64)))
    }
}

/// `value` in base 36 (digits, then lower-case letters): short, sortable
/// by length then text.
pub fn to_base36(mut value: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(value % 36) as usize]);
        value /= 36;
        if value == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base36 digits are ascii")
}

macro_rules! id_impls {
    ($name:ident) => {
        impl std::fmt::Display for $name {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(&self.0)
            }
        }
        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                Self(text.to_string())
            }
        }
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}
id_impls!(JobId);
id_impls!(NodeId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_sort_by_creation_time() {
        let earlier = JobId::generate(1_700_000_000_000);
        let later = JobId::generate(1_700_000_000_001 + 36);
        assert!(earlier.0.len() == later.0.len());
        assert!(earlier.0[..12] < later.0[..12], "{earlier} {later}");
    }
}
