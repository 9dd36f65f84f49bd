//! Migration pacing, sans-IO: the chunks a node sends to nodes taking over
//! its partitions go out within a bandwidth budget (bytes per second), so
//! that a join does not take the disk and network from client requests.
//!
//! Invariants:
//! - Without a budget every chunk is released at once (the behaviour
//!   before budgets existed).
//! - Streams take turns, one chunk each, so every stream progresses and
//!   none looks stalled to its receiver because another one is large.
//! - A stream asked for again (the receiver restarted it) replaces the
//!   one queued for the same receiver and partition: nothing is sent
//!   twice from this queue.
//! - Over any interval the bytes released are at most `budget` per second
//!   plus one second's burst and one chunk.

use super::message::Message;
use crate::crdt::NodeId;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// How often a paced queue is looked at.
pub const PACE_INTERVAL: Duration = Duration::from_millis(50);

/// A stream held back this long gets a [`Message::MigrateWaiting`], so its
/// receiver knows the source is alive and pacing, not gone.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

struct Queued {
    partition: u16,
    chunks: VecDeque<(Message, u64)>,
    /// When a chunk or heartbeat of this stream last went out.
    last_sent: Duration,
}

#[derive(Default)]
pub struct Pacer {
    budget: Option<u64>,
    /// Bytes that may go out now (negative: a chunk went out on credit).
    tokens: f64,
    last: Duration,
    streams: BTreeMap<(NodeId, u64), Queued>,
    turn: VecDeque<(NodeId, u64)>,
    /// Bytes released, for metrics.
    pub released_bytes: u64,
}

impl Pacer {
    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    pub fn set_budget(&mut self, budget: Option<u64>, now: Duration) {
        self.budget = budget.filter(|&b| b > 0);
        self.tokens = 0.0;
        self.last = now;
    }

    /// Chunks waiting.
    pub fn queued_bytes(&self) -> u64 {
        self.streams
            .values()
            .flat_map(|q| q.chunks.iter().map(|(_, b)| b))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Queues a stream's chunks (with their payload bytes), replacing any
    /// stream queued for the same receiver and partition.
    pub fn push(
        &mut self,
        to: NodeId,
        stream: u64,
        partition: u16,
        chunks: Vec<(Message, u64)>,
        now: Duration,
    ) {
        let stale: Vec<(NodeId, u64)> = self
            .streams
            .iter()
            .filter(|((n, _), q)| *n == to && q.partition == partition)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.streams.remove(&key);
        }
        self.turn.retain(|k| self.streams.contains_key(k));
        if chunks.is_empty() {
            return;
        }
        self.streams.insert(
            (to, stream),
            Queued {
                partition,
                chunks: chunks.into(),
                last_sent: now,
            },
        );
        self.turn.push_back((to, stream));
    }

    /// Drops a stream its receiver no longer wants.
    pub fn cancel(&mut self, to: NodeId, stream: u64) {
        self.streams.remove(&(to, stream));
        self.turn.retain(|k| *k != (to, stream));
    }

    /// Forgets the streams to nodes `keep` rejects (they went away).
    pub fn retain_receivers(&mut self, keep: impl Fn(NodeId) -> bool) {
        self.streams.retain(|(n, _), _| keep(*n));
        self.turn.retain(|(n, _)| keep(*n));
    }

    /// The chunks the budget lets out now, streams taking turns.
    pub fn release(&mut self, now: Duration) -> Vec<(NodeId, Message)> {
        let mut out = Vec::new();
        let Some(budget) = self.budget else {
            while let Some(key) = self.turn.pop_front() {
                if let Some(q) = self.streams.remove(&key) {
                    for (m, bytes) in q.chunks {
                        self.released_bytes += bytes;
                        out.push((key.0, m));
                    }
                }
            }
            return out;
        };
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = now;
        let budget = budget as f64;
        // At most one second of unused budget carries over.
        self.tokens = (self.tokens + budget * elapsed).min(budget);
        while self.tokens > 0.0 {
            let Some(key) = self.turn.pop_front() else {
                break;
            };
            let Some(q) = self.streams.get_mut(&key) else {
                continue;
            };
            if let Some((m, bytes)) = q.chunks.pop_front() {
                self.tokens -= bytes as f64;
                self.released_bytes += bytes;
                q.last_sent = now;
                out.push((key.0, m));
            }
            if q.chunks.is_empty() {
                self.streams.remove(&key);
            } else {
                self.turn.push_back(key);
            }
        }
        for (&(to, stream), q) in &mut self.streams {
            if now.saturating_sub(q.last_sent) >= HEARTBEAT {
                q.last_sent = now;
                let bytes_queued = q.chunks.iter().map(|(_, b)| b).sum();
                out.push((
                    to,
                    Message::MigrateWaiting {
                        stream,
                        partition: q.partition,
                        bytes_queued,
                    },
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize, bytes: u64) -> Vec<(Message, u64)> {
        (0..n)
            .map(|_| (Message::Membership(Vec::new()), bytes))
            .collect()
    }

    #[test]
    fn a_budget_bounds_the_bytes_per_second_and_streams_take_turns() {
        let mut pacer = Pacer::default();
        pacer.set_budget(Some(10_000), Duration::ZERO);
        pacer.push(NodeId(1), 1, 0, chunks(100, 1_000), Duration::ZERO);
        pacer.push(NodeId(2), 2, 0, chunks(100, 1_000), Duration::ZERO);
        let mut sent = Vec::new();
        let mut now = Duration::ZERO;
        while now < Duration::from_secs(5) {
            now += PACE_INTERVAL;
            sent.extend(
                pacer
                    .release(now)
                    .into_iter()
                    .filter(|(_, m)| !matches!(m, Message::MigrateWaiting { .. }))
                    .map(|(n, _)| n),
            );
        }
        // 5 s at 10,000 B/s, plus at most one chunk of credit.
        assert!(sent.len() <= 51, "{} chunks", sent.len());
        assert!(sent.len() >= 49, "{} chunks", sent.len());
        let to_one = sent.iter().filter(|n| **n == NodeId(1)).count();
        assert!(to_one.abs_diff(sent.len() - to_one) <= 1);
    }

    #[test]
    fn without_a_budget_everything_goes_and_a_restart_replaces_its_stream() {
        let mut pacer = Pacer::default();
        pacer.set_budget(Some(1), Duration::ZERO);
        pacer.push(NodeId(1), 1, 7, chunks(10, 100), Duration::ZERO);
        pacer.push(NodeId(1), 2, 7, chunks(3, 100), Duration::ZERO);
        assert_eq!(pacer.queued_bytes(), 300);
        pacer.set_budget(None, Duration::ZERO);
        assert_eq!(pacer.release(Duration::from_millis(1)).len(), 3);
        assert!(pacer.is_empty());
    }
}
