//! gossipkv: a gossip-replicated CRDT key-value store.
//!
//! This crate is, first, a local-first embedded store: open a [`Store`],
//! read and write with no network, and reconcile with another store by
//! exchanging version vectors so that only what the other lacks moves
//! ([`sync`]). Concurrent writes are never silently lost: a register keeps
//! them as siblings until a write that has seen them supersedes them.
//!
//! Layers, each a module with one job (see ARCHITECTURE.md):
//! - [`crdt`]: values, causal contexts, version vectors, hybrid clock;
//! - [`store`]: the redb tables, the change index, sync primitives;
//! - [`sync`]: reconciling two stores with those primitives.

pub mod certs;
pub mod client;
pub mod crdt;
pub mod device;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod node;

pub mod replication;
pub mod store;
pub mod sync;
pub mod transport;

pub use crdt::{CausalContext, NodeId, Record, Value, ValueKind, VersionVector};
pub use error::{Error, Result};
pub use store::{Batch, Durability, Store, StoreOptions};

/// The README's tour runs as a doctest, so it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
