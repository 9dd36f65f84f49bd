//! What clients were told: every acknowledged write, and what the replicas
//! must hold because of it.
//!
//! - Register: a write is acknowledged once stored on one replica. It must
//!   be a sibling everywhere until a write that saw it (its context covers
//!   the write's dot) supersedes it. So the expected siblings of a key are
//!   the acknowledged writes no other acknowledged write saw.
//! - Counter: the value must equal the exact sum of acknowledged adds.
//! - Set (adds only): the members must be exactly the acknowledged adds.

use crate::sim::Sim;
use gossipkv::crdt::Dot;
use gossipkv::{Batch, CausalContext, NodeId, Value};
use std::collections::{BTreeMap, BTreeSet};

struct RegisterWrite {
    dot: Dot,
    seen: CausalContext,
    /// `None` for a delete.
    value: Option<Vec<u8>>,
}

/// A key and the value written to it.
type KeyValue = (Vec<u8>, Vec<u8>);

#[derive(Default)]
pub struct Ledger {
    registers: BTreeMap<Vec<u8>, Vec<RegisterWrite>>,
    counters: BTreeMap<Vec<u8>, i64>,
    sets: BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>>,
    pub acknowledged: u64,
    pub deletes: u64,
    next_value: u64,
}

pub fn register_key(i: u64) -> Vec<u8> {
    format!("key-{i:08}").into_bytes()
}

pub fn counter_key(i: u64) -> Vec<u8> {
    format!("counter-{i:04}").into_bytes()
}

pub fn set_key(i: u64) -> Vec<u8> {
    format!("set-{i:04}").into_bytes()
}

impl Ledger {
    /// Up nodes that hold `key`'s partition in their own view.
    pub fn holders(sim: &Sim, key: &[u8], among: &[NodeId]) -> Vec<NodeId> {
        among
            .iter()
            .copied()
            .filter(|&n| {
                sim.replica(n).is_some_and(|r| {
                    let p = r.store().partition_of(key);
                    r.layout().holds(n, p)
                })
            })
            .collect()
    }

    /// A random up node among `among` that holds `key`.
    fn pick_holder(sim: &mut Sim, key: &[u8], among: &[NodeId]) -> Option<NodeId> {
        let holders = Self::holders(sim, key, among);
        if holders.is_empty() {
            return None;
        }
        Some(holders[rand::Rng::random_range(sim.rng(), 0..holders.len())])
    }

    /// Writes a fresh value to `key` on a random holder among `among`.
    /// Returns false if no such node holds the key.
    pub fn put(&mut self, sim: &mut Sim, key: &[u8], among: &[NodeId]) -> bool {
        let Some(node) = Self::pick_holder(sim, key, among) else {
            return false;
        };
        self.next_value += 1;
        let value = format!("v{}", self.next_value).into_bytes();
        let Some(store) = sim.store(node) else {
            return false;
        };
        let Ok(context) = store.put(key, &value, None) else {
            return false;
        };
        self.record(store.writer_id(), key, Some(value), context);
        true
    }

    /// Deletes `key` on a random holder among `among` (a causal tombstone:
    /// it removes what that holder has seen).
    pub fn delete(&mut self, sim: &mut Sim, key: &[u8], among: &[NodeId]) -> bool {
        let Some(node) = Self::pick_holder(sim, key, among) else {
            return false;
        };
        let Some(store) = sim.store(node) else {
            return false;
        };
        let Ok(context) = store.delete(key, None) else {
            return false;
        };
        if !context.is_empty() {
            self.record(store.writer_id(), key, None, context);
            self.deletes += 1;
        }
        true
    }

    /// Writes many keys, each to one random holder, in one batch per node.
    pub fn put_many(&mut self, sim: &mut Sim, keys: &[Vec<u8>], among: &[NodeId]) -> u64 {
        let mut per_node: BTreeMap<NodeId, Vec<KeyValue>> = BTreeMap::new();
        for key in keys {
            let Some(node) = Self::pick_holder(sim, key, among) else {
                continue;
            };
            self.next_value += 1;
            let value = format!("v{}", self.next_value).into_bytes();
            per_node.entry(node).or_default().push((key.clone(), value));
        }
        let mut written = 0;
        for (node, writes) in per_node {
            let Some(store) = sim.store(node).cloned() else {
                continue;
            };
            for chunk in writes.chunks(1000) {
                let mut batch = Batch::new();
                for (key, value) in chunk {
                    batch.put(key.clone(), value.clone());
                }
                let Ok(contexts) = store.write(&batch) else {
                    continue;
                };
                for ((key, value), context) in chunk.iter().zip(contexts) {
                    self.record(store.writer_id(), key, Some(value.clone()), context);
                    written += 1;
                }
            }
        }
        written
    }

    /// `writer`: the writer id of the store that made the write (its node
    /// id, or a new one after an unclean restart).
    fn record(
        &mut self,
        writer: NodeId,
        key: &[u8],
        value: Option<Vec<u8>>,
        context: CausalContext,
    ) {
        let dot = Dot::new(writer, context.get(writer));
        self.registers
            .entry(key.to_vec())
            .or_default()
            .push(RegisterWrite {
                dot,
                seen: context,
                value,
            });
        self.acknowledged += 1;
    }

    /// Adds to a counter on a random holder among `among`.
    pub fn add(&mut self, sim: &mut Sim, key: &[u8], amount: i64, among: &[NodeId]) -> bool {
        let Some(node) = Self::pick_holder(sim, key, among) else {
            return false;
        };
        let Some(store) = sim.store(node) else {
            return false;
        };
        if store.counter_add(key, amount).is_err() {
            return false;
        }
        *self.counters.entry(key.to_vec()).or_default() += amount;
        self.acknowledged += 1;
        true
    }

    /// Adds to a counter on `node` itself, holder or not (as a node that
    /// takes a write it should have routed would). Acknowledged only if the
    /// store took it.
    pub fn add_on(
        &mut self,
        sim: &Sim,
        node: NodeId,
        key: &[u8],
        amount: i64,
    ) -> gossipkv::Result<()> {
        let Some(store) = sim.store(node) else {
            return Ok(());
        };
        store.counter_add(key, amount)?;
        *self.counters.entry(key.to_vec()).or_default() += amount;
        self.acknowledged += 1;
        Ok(())
    }

    /// Adds a member (never added before) to a set on a random holder
    /// among `among`.
    pub fn set_add(&mut self, sim: &mut Sim, key: &[u8], member: &[u8], among: &[NodeId]) -> bool {
        let Some(node) = Self::pick_holder(sim, key, among) else {
            return false;
        };
        self.set_add_on(sim, node, key, member).is_ok()
    }

    /// Adds a member on `node` itself, holder or not; see [`Ledger::add_on`].
    pub fn set_add_on(
        &mut self,
        sim: &Sim,
        node: NodeId,
        key: &[u8],
        member: &[u8],
    ) -> gossipkv::Result<()> {
        let Some(store) = sim.store(node) else {
            return Ok(());
        };
        store.set_add(key, member)?;
        self.sets
            .entry(key.to_vec())
            .or_default()
            .insert(member.to_vec());
        self.acknowledged += 1;
        Ok(())
    }

    /// `None` when every surviving write is a delete.
    fn expected_register(writes: &[RegisterWrite]) -> Option<Value> {
        let mut live: Vec<Vec<u8>> = writes
            .iter()
            .filter(|w| {
                !writes
                    .iter()
                    .any(|o| o.dot != w.dot && o.seen.covers(w.dot))
            })
            .filter_map(|w| w.value.clone())
            .collect();
        live.sort();
        live.dedup();
        (!live.is_empty()).then_some(Value::Register(live))
    }

    /// Checks every key on every up holder of the final layout.
    pub fn check(&self, sim: &Sim) -> Result<(), String> {
        let up = sim.up_nodes();
        for (key, writes) in &self.registers {
            let expected = Self::expected_register(writes);
            let holders = Self::holders(sim, key, &up);
            if holders.is_empty() {
                return Err(format!(
                    "no up replica holds {}",
                    String::from_utf8_lossy(key)
                ));
            }
            for n in holders {
                let got = sim
                    .store(n)
                    .and_then(|s| s.get(key).ok())
                    .flatten()
                    .map(|r| r.value);
                if got != expected {
                    return Err(format!(
                        "node {n} holds {:?} for {}, expected {:?}: an acknowledged write is missing or a superseded one came back",
                        got,
                        String::from_utf8_lossy(key),
                        expected
                    ));
                }
            }
        }
        for (key, members) in &self.sets {
            for n in Self::holders(sim, key, &up) {
                let got: BTreeSet<Vec<u8>> = sim
                    .store(n)
                    .and_then(|s| s.set_members(key).ok())
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                if let Some(lost) = members.difference(&got).next() {
                    return Err(format!(
                        "node {n} lacks the acknowledged member {} of set {} ({} of {} members held)",
                        String::from_utf8_lossy(lost),
                        String::from_utf8_lossy(key),
                        got.len(),
                        members.len()
                    ));
                }
                if let Some(phantom) = got.difference(members).next() {
                    return Err(format!(
                        "node {n} holds {} in set {}, which was never acknowledged",
                        String::from_utf8_lossy(phantom),
                        String::from_utf8_lossy(key)
                    ));
                }
            }
        }
        for (key, sum) in &self.counters {
            for n in Self::holders(sim, key, &up) {
                let got = sim.store(n).and_then(|s| s.counter(key).ok());
                if got != Some(*sum) {
                    return Err(format!(
                        "node {n} counts {:?} for {}, the acknowledged adds sum to {sum}",
                        got,
                        String::from_utf8_lossy(key)
                    ));
                }
            }
        }
        Ok(())
    }
}
