//! The causal context a read returns and a write may carry back.
//!
//! It is a version vector over node ids: the join of the clocks of every
//! write the reader's value incorporates. A write that carries it supersedes
//! exactly what it covers; concurrent writes survive as siblings.
//!
//! To a client it is an opaque token: bytes (`to_bytes` / `from_bytes`) or
//! text (`Display` / `FromStr`, URL-safe base64 without padding). The token
//! starts with a format version byte so it can evolve.

use super::{Dot, NodeId};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use crdts::{CmRDT, CvRDT, VClock};
use serde::{Deserialize, Serialize};
use std::fmt;

const TOKEN_VERSION: u8 = 1;
/// A token naming more nodes than this is refused: no real key has been
/// written by that many nodes, and it bounds the work a token can cause.
const TOKEN_MAX_NODES: usize = 4096;

/// Why a causal context token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token is not valid base64: {0}")]
    Base64(String),
    #[error("token is empty")]
    Empty,
    #[error("token format version {0} is not supported (expected {TOKEN_VERSION})")]
    Version(u8),
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token names {0} nodes, more than the limit of {TOKEN_MAX_NODES}")]
    TooManyNodes(usize),
    #[error("token holds a zero counter for node {0}")]
    ZeroCounter(NodeId),
}

/// An opaque causal context: what a reader has seen of a key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CausalContext(pub(crate) VClock<NodeId>);

impl CausalContext {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The highest sequence of `node` this context has seen.
    pub fn get(&self, node: NodeId) -> u64 {
        self.0.get(&node)
    }

    /// True when this context has seen the given write.
    pub fn covers(&self, dot: Dot) -> bool {
        self.0.get(&dot.node) >= dot.seq
    }

    /// The context of a reader who has seen what either context has seen.
    pub fn join(&mut self, other: &CausalContext) {
        self.0.merge(other.0.clone());
    }

    /// The highest dot of each node: for a stored entry these are the writes
    /// that index it in the change index.
    pub fn dots(&self) -> impl Iterator<Item = Dot> + '_ {
        self.0.iter().map(|d| Dot::new(*d.actor, d.counter))
    }

    pub(crate) fn apply(&mut self, dot: Dot) {
        self.0.apply(crdts::Dot::new(dot.node, dot.seq));
    }

    /// This context without what it has seen of `node`.
    pub(crate) fn without(&self, node: NodeId) -> CausalContext {
        let mut out = CausalContext::new();
        for dot in self.dots().filter(|d| d.node != node) {
            out.apply(dot);
        }
        out
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![TOKEN_VERSION];
        // Encoding a BTreeMap of integers into a Vec cannot fail.
        out.extend(postcard::to_allocvec(&self.0.dots).unwrap_or_default());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenError> {
        let (&version, body) = bytes.split_first().ok_or(TokenError::Empty)?;
        if version != TOKEN_VERSION {
            return Err(TokenError::Version(version));
        }
        let (dots, rest): (std::collections::BTreeMap<NodeId, u64>, _) =
            postcard::take_from_bytes(body).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(TokenError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        if dots.len() > TOKEN_MAX_NODES {
            return Err(TokenError::TooManyNodes(dots.len()));
        }
        if let Some((node, _)) = dots.iter().find(|(_, &c)| c == 0) {
            return Err(TokenError::ZeroCounter(*node));
        }
        Ok(CausalContext(VClock { dots }))
    }
}

impl fmt::Display for CausalContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl std::str::FromStr for CausalContext {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|e| TokenError::Base64(e.to_string()))?;
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_through_text() {
        let mut ctx = CausalContext::new();
        ctx.apply(Dot::new(NodeId(7), 3));
        ctx.apply(Dot::new(NodeId(u64::MAX), 1 << 40));
        let text = ctx.to_string();
        assert_eq!(text.parse::<CausalContext>().unwrap(), ctx);
        assert_eq!("".parse::<CausalContext>().unwrap_err(), TokenError::Empty);
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        assert!(matches!(
            "not base64!".parse::<CausalContext>(),
            Err(TokenError::Base64(_))
        ));
        assert_eq!(
            CausalContext::from_bytes(&[9, 0]),
            Err(TokenError::Version(9))
        );
        assert!(matches!(
            CausalContext::from_bytes(&[TOKEN_VERSION, 5, 1]),
            Err(TokenError::Malformed(_))
        ));
        assert_eq!(
            CausalContext::from_bytes(&[TOKEN_VERSION, 1, 7, 0]),
            Err(TokenError::ZeroCounter(NodeId(7)))
        );
    }
}
