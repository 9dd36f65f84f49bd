//! The replication core: pure state machines that take messages and time
//! in and return messages out. No sockets, no clocks, no tokio: the same
//! code runs under the QUIC node and under the deterministic simulator.
//! The core reads and writes its node's [`Store`](crate::Store) directly;
//! that is local, synchronous and deterministic.

pub mod coordinator;
pub mod feed;
pub mod layout;
pub mod layout_state;
pub mod membership;
pub mod message;
pub mod pacing;
pub mod rebalance;
pub mod replica;
pub mod tokens;
