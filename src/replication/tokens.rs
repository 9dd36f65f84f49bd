//! API tokens: bearer secrets for the HTTP API, each scoped to key prefixes
//! and to reading, writing or both, optionally expiring.
//!
//! The registry is cluster metadata, like the layout: every node holds all
//! of it (every node must enforce every token, and a keyspace in the store
//! would live on only N replicas), it is gossiped (a hash in every digest,
//! the whole registry to a peer whose hash differs, and to every member at
//! once when a token is created or revoked) and persisted by each node.
//! It is never reachable through client requests.
//!
//! Invariants: the registry is a CRDT. Tokens are keyed by a random id;
//! a record's fields are fixed when it is made, except `revoked`, which
//! only goes from false to true, so merging is a union in which
//! revocation wins, whatever the order messages arrive in. Only the
//! SHA-256 of a secret is stored or sent; a secret is checked in constant
//! time.

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Tokens a registry may hold (revoked ones included: they stay, so that
/// a revocation cannot be undone by an old copy).
pub const MAX_TOKENS: usize = 10_000;
/// Prefixes one token may name.
pub const MAX_PREFIXES: usize = 64;
/// Bytes of one prefix.
pub const MAX_PREFIX_BYTES: usize = 1024;
/// Bytes of a token's name.
pub const MAX_NAME_BYTES: usize = 64;
/// What every secret starts with, so that a leaked one is recognisable
/// (secret scanners, logs).
pub const SECRET_PREFIX: &str = "gkv_";

/// A token's id: random, public (shown by `kvctl token list`, part of the
/// secret).
pub type TokenId = [u8; 16];

/// What a token allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: TokenId,
    pub name: String,
    /// SHA-256 of the secret's random part.
    pub secret_hash: [u8; 32],
    /// Keys starting with one of these are in scope (an empty prefix: all).
    pub prefixes: Vec<Vec<u8>>,
    pub read: bool,
    pub write: bool,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked: bool,
}

/// Why a request with a token is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No such token, a wrong secret, expired or revoked: 401. The message
    /// does not say which for an unknown id, so ids cannot be probed.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token that does not cover the key or the operation: 403.
    #[error("{0}")]
    Forbidden(String),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token registry has {0} tokens, more than {MAX_TOKENS}")]
    TooMany(usize),
    #[error("token {id}: {reason}")]
    Invalid { id: String, reason: String },
}

/// Every token of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRegistry {
    tokens: BTreeMap<TokenId, TokenRecord>,
}

pub fn hex(id: &TokenId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(text: &str) -> Option<TokenId> {
    if text.len() != 32 || !text.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

/// The secret a client presents: `gkv_<id in hex>_<random part in hex>`.
pub fn secret_text(id: &TokenId, random: &[u8; 32]) -> String {
    format!(
        "{SECRET_PREFIX}{}_{}",
        hex(id),
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// SHA-256 of a secret's random part, as stored.
pub fn hash_secret(random: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, random).as_ref());
    out
}

/// `a == b` without an early exit.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a request does to a key, for [`TokenRegistry::authorize`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl TokenRecord {
    fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(format!("name must be 1 to {MAX_NAME_BYTES} bytes"));
        }
        if self.prefixes.is_empty() || self.prefixes.len() > MAX_PREFIXES {
            return Err(format!("must name 1 to {MAX_PREFIXES} prefixes"));
        }
        if self.prefixes.iter().any(|p| p.len() > MAX_PREFIX_BYTES) {
            return Err(format!("a prefix is longer than {MAX_PREFIX_BYTES} bytes"));
        }
        if !self.read && !self.write {
            return Err("allows neither reading nor writing".into());
        }
        Ok(())
    }

    /// Whether it is in force at `now_ms`.
    pub fn active(&self, now_ms: u64) -> bool {
        !self.revoked && self.expires_ms.is_none_or(|at| now_ms < at)
    }

    pub fn covers(&self, key: &[u8]) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p))
    }
}

impl TokenRegistry {
    pub fn new() -> TokenRegistry {
        TokenRegistry::default()
    }

    /// Adds a token made here. Its id is random, so it cannot collide with
    /// one made elsewhere; a collision is refused all the same.
    pub fn insert(&mut self, record: TokenRecord) -> Result<(), TokenError> {
        record.check().map_err(|reason| TokenError::Invalid {
            id: hex(&record.id),
            reason,
        })?;
        if self.tokens.len() >= MAX_TOKENS {
            return Err(TokenError::TooMany(self.tokens.len() + 1));
        }
        if self.tokens.contains_key(&record.id) {
            return Err(TokenError::Invalid {
                id: hex(&record.id),
                reason: "a token with this id exists".into(),
            });
        }
        self.tokens.insert(record.id, record);
        Ok(())
    }

    /// Revokes the tokens named `name_or_id` (an id in hex, or a name);
    /// returns how many were in force before.
    pub fn revoke(&mut self, name_or_id: &str) -> usize {
        let id = parse_hex(name_or_id);
        let mut revoked = 0;
        for record in self.tokens.values_mut() {
            if Some(record.id) == id || record.name == name_or_id {
                revoked += usize::from(!record.revoked);
                record.revoked = true;
            }
        }
        revoked
    }

    pub fn tokens(&self) -> impl Iterator<Item = &TokenRecord> {
        self.tokens.values()
    }

    /// Checks a peer's registry before merging it.
    pub fn validate(&self) -> Result<(), TokenError> {
        if self.tokens.len() > MAX_TOKENS {
            return Err(TokenError::TooMany(self.tokens.len()));
        }
        for (id, record) in &self.tokens {
            if *id != record.id {
                return Err(TokenError::Invalid {
                    id: hex(id),
                    reason: "filed under another id".into(),
                });
            }
            record.check().map_err(|reason| TokenError::Invalid {
                id: hex(id),
                reason,
            })?;
        }
        Ok(())
    }

    /// Merges another registry in: a union, revocation wins. Returns
    /// whether anything changed here.
    pub fn merge(&mut self, other: &TokenRegistry) -> bool {
        let mut changed = false;
        for (id, theirs) in &other.tokens {
            if self.tokens.len() >= MAX_TOKENS && !self.tokens.contains_key(id) {
                break;
            }
            match self.tokens.get_mut(id) {
                Some(ours) => {
                    if theirs.revoked && !ours.revoked {
                        ours.revoked = true;
                        changed = true;
                    }
                }
                None => {
                    self.tokens.insert(*id, theirs.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    /// A hash of the whole registry: digests carry it, so two nodes notice
    /// that theirs differ.
    pub fn hash(&self) -> u64 {
        if self.tokens.is_empty() {
            return 0;
        }
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }

    /// Checks `secret` (as a client sends it) and whether its token allows
    /// `access` to `key` at `now_ms`; returns the token's name.
    pub fn authorize(
        &self,
        secret: &str,
        key: &[u8],
        access: Access,
        now_ms: u64,
    ) -> Result<&str, Denied> {
        let record = self.authenticate(secret, now_ms)?;
        let allowed = match access {
            Access::Read => record.read,
            Access::Write => record.write,
        };
        if !allowed {
            return Err(Denied::Forbidden(format!(
                "token {:?} does not allow {}",
                record.name,
                match access {
                    Access::Read => "reading",
                    Access::Write => "writing",
                }
            )));
        }
        if !record.covers(key) {
            return Err(Denied::Forbidden(format!(
                "token {:?} does not cover this key (its prefixes: {})",
                record.name,
                record
                    .prefixes
                    .iter()
                    .map(|p| format!("{:?}", String::from_utf8_lossy(p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(&record.name)
    }

    /// The token `secret` names, if the secret is right and the token in
    /// force.
    pub fn authenticate(&self, secret: &str, now_ms: u64) -> Result<&TokenRecord, Denied> {
        let bad = || Denied::Unauthenticated("the token is not valid".into());
        let rest = secret.strip_prefix(SECRET_PREFIX).ok_or_else(bad)?;
        let (id, random) = rest.split_once('_').ok_or_else(bad)?;
        let id = parse_hex(id).ok_or_else(bad)?;
        let record = self.tokens.get(&id).ok_or_else(bad)?;
        if !same(&hash_secret(random.as_bytes()), &record.secret_hash) {
            return Err(bad());
        }
        if record.revoked {
            return Err(Denied::Unauthenticated(format!(
                "token {:?} is revoked",
                record.name
            )));
        }
        if !record.active(now_ms) {
            return Err(Denied::Unauthenticated(format!(
                "token {:?} has expired",
                record.name
            )));
        }
        Ok(record)
    }
}

/// A new token's record and secret, from 48 random bytes (id, secret).
pub fn mint(
    randomness: &[u8; 48],
    name: String,
    prefixes: Vec<Vec<u8>>,
    read: bool,
    write: bool,
    created_ms: u64,
    expires_ms: Option<u64>,
) -> (TokenRecord, String) {
    let mut id = [0u8; 16];
    id.copy_from_slice(&randomness[..16]);
    let mut random = [0u8; 32];
    random.copy_from_slice(&randomness[16..]);
    let secret = secret_text(&id, &random);
    // The hash is of the random part as the client sends it (hex text).
    let random_text = secret.rsplit('_').next().unwrap_or_default();
    let record = TokenRecord {
        id,
        name,
        secret_hash: hash_secret(random_text.as_bytes()),
        prefixes,
        read,
        write,
        created_ms,
        expires_ms,
        revoked: false,
    };
    (record, secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(
        seed: u8,
        prefixes: &[&str],
        read: bool,
        write: bool,
        expires: Option<u64>,
    ) -> (TokenRecord, String) {
        mint(
            &[seed; 48],
            format!("t{seed}"),
            prefixes.iter().map(|p| p.as_bytes().to_vec()).collect(),
            read,
            write,
            1_000,
            expires,
        )
    }

    #[test]
    fn a_token_allows_only_its_prefixes_its_operations_and_its_lifetime() {
        let mut registry = TokenRegistry::new();
        let (app1, secret1) = token(1, &["app1/"], true, false, Some(5_000));
        let (all, secret_all) = token(2, &[""], true, true, None);
        registry.insert(app1).unwrap();
        registry.insert(all).unwrap();
        assert!(registry
            .authorize(&secret1, b"app1/x", Access::Read, 2_000)
            .is_ok());
        assert!(matches!(
            registry.authorize(&secret1, b"app2/x", Access::Read, 2_000),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            registry.authorize(&secret1, b"app1/x", Access::Write, 2_000),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            registry.authorize(&secret1, b"app1/x", Access::Read, 5_000),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(registry
            .authorize(&secret_all, b"anything", Access::Write, 9_999_999)
            .is_ok());
        // A wrong secret for a real id, garbage, and another id.
        let wrong = format!("{}0", &secret_all[..secret_all.len() - 1]);
        for bad in [wrong.as_str(), "", "gkv_", "gkv_zz_zz", "Bearer x"] {
            assert!(
                matches!(
                    registry.authenticate(bad, 0),
                    Err(Denied::Unauthenticated(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(registry.revoke("t2"), 1);
        assert!(registry.authenticate(&secret_all, 0).is_err());
    }

    #[test]
    fn merging_is_a_union_in_which_revocation_wins_in_any_order() {
        let (a, _) = token(1, &["a/"], true, true, None);
        let (b, _) = token(2, &["b/"], true, true, None);
        let mut one = TokenRegistry::new();
        one.insert(a.clone()).unwrap();
        let mut two = TokenRegistry::new();
        two.insert(a).unwrap();
        two.insert(b).unwrap();
        two.revoke(&hex(&[1; 16]));
        let mut left = one.clone();
        assert!(left.merge(&two));
        let mut right = two.clone();
        assert!(!right.merge(&one));
        assert_eq!(left, right);
        assert_eq!(left.hash(), right.hash());
        assert!(left.tokens().any(|t| t.name == "t1" && t.revoked));
        // An old copy does not bring a revoked token back.
        assert!(!left.merge(&one));
    }

    #[test]
    fn bad_records_from_a_peer_are_refused() {
        let (mut record, _) = token(3, &["x/"], true, true, None);
        record.prefixes.clear();
        let mut registry = TokenRegistry::new();
        assert!(registry.insert(record.clone()).is_err());
        registry.tokens.insert(record.id, record);
        assert!(registry.validate().is_err());
    }
}
