//! Bootstrap tokens: `tether1.<ca-sha256>.<id>.<secret>`. The CA hash lets a
//! fresh edge pin the cloud's CA before it trusts anything; the id names the
//! token in the cloud's store; the secret proves possession. The cloud keeps
//! only a hash of the secret. Debug never prints the secret.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;

/// Errors reading a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the form `tether1.<64 hex>.<16 hex>.<32 hex>`.
    #[error("malformed bootstrap token (want tether1.<ca-hash>.<id>.<secret>)")]
    Malformed,
}

/// A bootstrap token.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// SHA-256 of the cloud CA certificate (DER).
    pub ca_hash: [u8; 32],
    /// Public token id (16 hex digits).
    pub id: String,
    secret: String,
}

const PREFIX: &str = "tether1";

impl BootstrapToken {
    /// A new random token for the CA `ca`.
    pub fn generate(ca: &CertificateDer<'_>) -> Self {
        let rand = ring::rand::SystemRandom::new();
        let mut id = [0u8; 8];
        let mut secret = [0u8; 16];
        ring::rand::SecureRandom::fill(&rand, &mut id).expect("system randomness");
        ring::rand::SecureRandom::fill(&rand, &mut secret).expect("system randomness");
        Self {
            ca_hash: ca_hash(ca),
            id: hex(&id),
            secret: hex(&secret),
        }
    }

    /// SHA-256 of the secret, hex: what the cloud stores.
    pub fn secret_hash(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.secret.as_bytes()).as_ref())
    }

    /// True when `hash` (from the store) matches this token's secret, in
    /// constant time.
    pub fn secret_matches(&self, hash: &str) -> bool {
        let mine = self.secret_hash();
        mine.len() == hash.len()
            && mine
                .bytes()
                .zip(hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The full token text, to hand to an operator once.
    pub fn expose(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}",
            hex(&self.ca_hash),
            self.id,
            self.secret
        )
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

impl FromStr for BootstrapToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(hash), Some(id), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let is_hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if !is_hex(hash, 64) || !is_hex(id, 16) || !is_hex(secret, 32) {
            return Err(TokenError::Malformed);
        }
        let mut ca_hash = [0u8; 32];
        for (i, byte) in ca_hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16)
                .map_err(|_| TokenError::Malformed)?;
        }
        Ok(Self {
            ca_hash,
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// SHA-256 of a certificate's DER.
pub fn ca_hash(cert: &CertificateDer<'_>) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_masks() {
        let ca = crate::Ca::generate("t").unwrap();
        let t = BootstrapToken::generate(ca.cert_der());
        let text = t.expose();
        let back: BootstrapToken = text.parse().unwrap();
        assert_eq!(back, t);
        assert_eq!(back.ca_hash, ca_hash(ca.cert_der()));
        assert!(t.secret_matches(&t.secret_hash()));
        assert!(!t.secret_matches(&"0".repeat(64)));
        let dbg = format!("{t:?}");
        assert!(dbg.contains(&t.id) && !dbg.contains(&t.secret));
        assert_eq!(
            "tether1.xx".parse::<BootstrapToken>(),
            Err(TokenError::Malformed)
        );
        assert!(
            text.replace("tether1", "tether2")
                .parse::<BootstrapToken>()
                .is_err()
        );
    }
}
