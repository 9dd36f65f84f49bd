//! Deterministic simulations of gossipkv's replication core.
//!
//! Many [`Replica`](gossipkv::replication::replica::Replica)s with real
//! (in-memory) stores run against one virtual clock and a seeded network
//! that loses, duplicates, delays and reorders messages, splits and heals.
//! Scenarios check invariants (convergence, no acknowledged write lost,
//! exact counters) and report figures. Same seed, same output.

pub mod feed;
pub mod ledger;
pub mod load;
pub mod push;
pub mod quorum;
pub mod scenarios;
pub mod sim;
