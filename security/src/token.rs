//! A rank's credential: which job and attempt it belongs to, until when,
//! signed (HMAC-SHA256) with the cluster's rank key. The coordinator mints
//! one per (job, attempt) and the agent hands it to the attempt's ranks in
//! `FLAMINGO_RANK_TOKEN`; the coordinator and the data service check it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::identity::hex;
use crate::pki::unix_now;
use crate::{Result, SecurityError};

/// A verified rank credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankToken {
    pub job_id: String,
    pub attempt: u32,
    /// Unix seconds.
    pub expires: i64,
}

impl RankToken {
    /// `v1:<job>:<attempt>:<expires>:<mac>`.
    pub fn mint(secret: &[u8], job_id: &str, attempt: u32, valid_seconds: i64) -> String {
        let expires = unix_now() + valid_seconds;
        let body = format!("v1:{job_id}:{attempt}:{expires}");
        format!("{body}:{}", hex(&mac(secret, &body)))
    }

    /// Checks the signature and the expiry.
    pub fn verify(secret: &[u8], token: &str) -> Result<Self> {
        let (body, signature) = token
            .rsplit_once(':')
            .ok_or_else(|| SecurityError::Token("malformed".into()))?;
        let expected = hex(&mac(secret, body));
        // Compared in constant time through the MAC itself.
        let mut check = Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|_| SecurityError::Token("bad key".into()))?;
        check.update(body.as_bytes());
        if signature.len() != expected.len() || check.verify_slice(&unhex(signature)?).is_err() {
            return Err(SecurityError::Token("bad signature".into()));
        }
        let mut fields = body.splitn(2, ':');
        if fields.next() != Some("v1") {
            return Err(SecurityError::Token("unknown version".into()));
        }
        let rest = fields.next().unwrap_or_default();
        let mut tail = rest.rsplitn(3, ':');
        let expires: i64 = tail
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| SecurityError::Token("malformed expiry".into()))?;
        let attempt: u32 = tail
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| SecurityError::Token("malformed attempt".into()))?;
        let job_id = tail.next().unwrap_or_default().to_string();
        if expires < unix_now() {
            return Err(SecurityError::Token(format!(
                "expired (job {job_id}, attempt {attempt})"
            )));
        }
        Ok(Self {
            job_id,
            attempt,
            expires,
        })
    }
}

fn mac(secret: &[u8], body: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return Err(SecurityError::Token("malformed signature".into()));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| SecurityError::Token("malformed signature".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_key_and_unchanged() {
        let key = b"0123456789abcdef0123456789abcdef";
        let token = RankToken::mint(key, "job-7:x", 3, 60);
        let verified = RankToken::verify(key, &token).unwrap();
        assert_eq!((verified.job_id.as_str(), verified.attempt), ("job-7:x", 3));
        assert!(RankToken::verify(b"another key of enough length!!!!", &token).is_err());
        let forged = token.replacen(":3:", ":4:", 1);
        assert!(RankToken::verify(key, &forged)
            .unwrap_err()
            .to_string()
            .contains("signature"));
        let expired = RankToken::mint(key, "job", 1, -1);
        assert!(RankToken::verify(key, &expired)
            .unwrap_err()
            .to_string()
            .contains("expired"));
    }
}
