//! Standard Webhooks signatures: HMAC-SHA256 over `id.timestamp.body`, `whsec_` secrets,
//! `v1,<base64>` signatures (several, space-separated, for key rotation), and a timestamp tolerance.
//!
//! Written here rather than taken from the `standardwebhooks` crate, whose 1.0.1 release panics on
//! a crafted timestamp. Every comparison of a signature is constant-time.
//! Which secret belongs to which connector is the caller's business.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// A webhook signing or verification key, parsed from `whsec_<base64>`. Its `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

/// Why a secret or a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The secret is not `whsec_` followed by non-empty base64.
    #[error("a webhook secret must be \"whsec_\" followed by base64 (at least 16 bytes)")]
    MalformedSecret,
    /// A required header is absent or not text.
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not a whole number of seconds, written in plain decimal digits.
    #[error("the webhook-timestamp header is not a Unix time in seconds")]
    InvalidTimestamp,
    /// The timestamp is further from now than the tolerance allows.
    #[error("the webhook-timestamp is {skew_seconds} s away from now; at most {tolerance_seconds} s is accepted")]
    StaleTimestamp {
        /// How far off it is.
        skew_seconds: u64,
        /// The tolerance.
        tolerance_seconds: u64,
    },
    /// No `v1` signature in the header matches.
    #[error("no signature in webhook-signature matches the body")]
    NoMatchingSignature,
}

const PREFIX: &str = "whsec_";

impl WebhookSecret {
    /// Parses `whsec_<base64>`.
    ///
    /// # Errors
    /// [`SignatureError::MalformedSecret`] when the prefix is missing, the base64 is invalid,
    /// or the key is shorter than 16 bytes.
    pub fn parse(value: &str) -> Result<Self, SignatureError> {
        let encoded = value
            .strip_prefix(PREFIX)
            .ok_or(SignatureError::MalformedSecret)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SignatureError::MalformedSecret)?;
        if key.len() < 16 {
            return Err(SignatureError::MalformedSecret);
        }
        Ok(Self(key))
    }

    /// The raw HMAC over `id.timestamp.body`.
    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// The `webhook-signature` header value for this message: `v1,<base64>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", STANDARD.encode(self.mac(id, timestamp, body)))
    }

    /// Checks a signed message against this secret.
    ///
    /// `signatures` is the `webhook-signature` header: space-separated `version,base64` entries;
    /// one matching `v1` entry suffices. The timestamp must be within `tolerance_seconds` of `now`
    /// (Unix seconds) in either direction.
    ///
    /// # Errors
    /// The first check that fails, as a [`SignatureError`].
    pub fn verify(
        &self,
        id: &str,
        timestamp: &str,
        signatures: &str,
        body: &[u8],
        now: i64,
        tolerance_seconds: u64,
    ) -> Result<(), SignatureError> {
        if id.is_empty() {
            return Err(SignatureError::MissingHeader("webhook-id"));
        }
        // Only the plain decimal form: the signature covers the header's text, which is then
        // the number's own, so "+1614265330" or "01614265330" cannot pass as 1614265330.
        let canonical = timestamp.bytes().all(|byte| byte.is_ascii_digit())
            && (timestamp == "0" || !timestamp.starts_with('0'));
        let timestamp: i64 = canonical
            .then(|| timestamp.parse().ok())
            .flatten()
            .ok_or(SignatureError::InvalidTimestamp)?;
        let skew_seconds = now.abs_diff(timestamp);
        if skew_seconds > tolerance_seconds {
            return Err(SignatureError::StaleTimestamp {
                skew_seconds,
                tolerance_seconds,
            });
        }
        let expected = self.mac(id, timestamp, body);
        let mut matched = subtle::Choice::from(0);
        for entry in signatures.split(' ').filter(|entry| !entry.is_empty()) {
            let Some(("v1", encoded)) = entry.split_once(',') else {
                continue;
            };
            let Ok(candidate) = STANDARD.decode(encoded) else {
                continue;
            };
            if candidate.len() == expected.len() {
                matched |= candidate.ct_eq(&expected);
            }
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(SignatureError::NoMatchingSignature)
        }
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests;
