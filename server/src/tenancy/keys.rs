//! API key secrets: making them, parsing them, and checking them against a stored salted hash.
//! A key reads `graft_<id>_<secret>`; `id` is public (listed, used to find the row), `secret`
//! is 256 random bits that only the key's holder knows. Only `SHA-256(salt || secret)` is
//! stored. Comparison is constant-time over the digests.

use rand::RngCore;
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "graft_";

/// A freshly made key: what to store and the secret to show once.
#[derive(Debug, Clone)]
pub struct MintedKey {
    pub id: String,
    pub salt: String,
    pub hash: String,
    /// The whole bearer token, `graft_<id>_<secret>`.
    pub token: String,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `SHA-256(salt || secret)` in hex.
pub fn hash_secret(salt_hex: &str, secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(unhex(salt_hex).unwrap_or_default());
    h.update(secret.as_bytes());
    hex(&h.finalize())
}

pub fn mint() -> MintedKey {
    let id = random_hex(6);
    let secret = random_hex(32);
    let salt = random_hex(16);
    let hash = hash_secret(&salt, &secret);
    MintedKey {
        token: format!("{KEY_PREFIX}{id}_{secret}"),
        id,
        salt,
        hash,
    }
}

/// `(id, secret)` of a token shaped like a graft key.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hexish = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexish(id) && hexish(secret) && id.len() <= 32 && secret.len() <= 128).then_some((id, secret))
}

/// Constant-time equality of two byte strings of the same length (digests).
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `secret` matches a stored salt and hash.
pub fn verify(salt_hex: &str, hash_hex: &str, secret: &str) -> bool {
    same(
        hash_secret(salt_hex, secret).as_bytes(),
        hash_hex.as_bytes(),
    )
}

/// SHA-256 of a whole token (the admin key is compared through this).
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_verify_and_others_do_not() {
        let k = mint();
        let (id, secret) = parse(&k.token).expect("parses");
        assert_eq!(id, k.id);
        assert!(verify(&k.salt, &k.hash, secret));
        let other = mint();
        let (_, other_secret) = parse(&other.token).expect("parses");
        assert!(!verify(&k.salt, &k.hash, other_secret));
        assert!(!k.hash.contains(secret), "the hash is not the secret");
        assert_ne!(k.token, other.token);
    }

    #[test]
    fn same_secret_different_salt_different_hash() {
        assert_ne!(hash_secret("00", "abc"), hash_secret("01", "abc"));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        for t in [
            "",
            "graft_",
            "graft_abc",
            "graft__abc",
            "graft_abc_",
            "graft_zz_00",
            "other_abc_def",
            "graft_abc_def\0",
        ] {
            assert!(parse(t).is_none(), "{t:?}");
        }
    }
}
