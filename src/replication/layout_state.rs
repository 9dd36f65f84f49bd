//! The cluster's layout state as each node knows it, and how two views merge.
//!
//! - `current`: the newest layout, where partitions are going.
//! - `completed`: the last layout whose transition finished: every replica
//!   it names holds its partitions' data.
//! - `ready`: the (partition, node) pairs of `current` whose node gained the
//!   partition and finished migrating it.
//!
//! While `current` differs from `completed`, the holders of a partition are
//! the union of both: old and new replicas all take writes and anti-entropy.
//! When every gained pair is ready, `completed` becomes `current`, and a node
//! that no longer holds a partition may drop it (after handing its last
//! writes to a current replica; see `replica.rs`).
//!
//! Merge takes the newer `current` and `completed` (by version, then by a
//! hash of the content so that two layouts computed concurrently with the
//! same version resolve the same way everywhere) and the union of `ready`
//! restricted to `current`. It is commutative, associative and idempotent,
//! so layout gossip converges like any CRDT.

use super::layout::{Layout, NodeSpec};
use super::message::LayoutSummary;
use crate::crdt::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutState {
    current: Layout,
    completed: Layout,
    ready: BTreeSet<(u16, NodeId)>,
}

/// Orders layouts of the same version by content.
fn layout_rank(layout: &Layout) -> (u64, u64) {
    let bytes = postcard::to_allocvec(layout).unwrap_or_default();
    (layout.version(), xxhash_rust::xxh3::xxh3_64(&bytes))
}

impl LayoutState {
    pub fn new(partitions: u16, replicas: u8) -> Self {
        let empty = Layout::empty(partitions, replicas);
        LayoutState {
            current: empty.clone(),
            completed: empty,
            ready: BTreeSet::new(),
        }
    }

    /// A state whose first layout is already complete: the bootstrap of a
    /// new cluster, where there is no data to move.
    pub fn bootstrap(partitions: u16, replicas: u8, nodes: &[NodeSpec]) -> Self {
        let layout = Layout::empty(partitions, replicas).next(nodes);
        LayoutState {
            current: layout.clone(),
            completed: layout,
            ready: BTreeSet::new(),
        }
    }

    pub fn current(&self) -> &Layout {
        &self.current
    }

    pub fn completed(&self) -> &Layout {
        &self.completed
    }

    pub fn in_transition(&self) -> bool {
        self.current != self.completed
    }

    pub fn summary(&self) -> LayoutSummary {
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        LayoutSummary {
            version: self.current.version(),
            completed: self.completed.version(),
            hash: xxhash_rust::xxh3::xxh3_64(&bytes),
        }
    }

    /// Nodes that hold `partition` now: old and new replicas during a change.
    pub fn holders(&self, partition: u16) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self.current.replicas(partition).to_vec();
        for &n in self.completed.replicas(partition) {
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
        nodes
    }

    pub fn holds(&self, node: NodeId, partition: u16) -> bool {
        self.current.holds(node, partition) || self.completed.holds(node, partition)
    }

    /// Partitions `node` gained in `current` and has not finished migrating.
    pub fn pending_migrations(&self, node: NodeId) -> Vec<u16> {
        self.current
            .partitions_of(node)
            .into_iter()
            .filter(|&p| !self.completed.holds(node, p) && !self.ready.contains(&(p, node)))
            .collect()
    }

    /// Whether `node` is a replica of `partition` with its data complete:
    /// a replica of the completed layout, or a gained replica that is ready.
    pub fn is_complete_replica(&self, node: NodeId, partition: u16) -> bool {
        self.completed.holds(node, partition) || self.ready.contains(&(partition, node))
    }

    /// Records that `node` finished migrating `partition`. Returns true if
    /// that changed the state.
    pub fn mark_ready(&mut self, partition: u16, node: NodeId) -> bool {
        if !self.current.holds(node, partition) || self.completed.holds(node, partition) {
            return false;
        }
        let changed = self.ready.insert((partition, node));
        self.try_complete();
        changed
    }

    /// Adopts a new layout computed from `nodes` (by the coordinator).
    pub fn propose(&mut self, nodes: &[NodeSpec]) -> bool {
        let next = self.current.next(nodes);
        if self.current.changes_to(&next).is_empty() {
            return false;
        }
        self.current = next;
        self.ready.retain(|&(p, n)| self.current.holds(n, p));
        self.try_complete();
        true
    }

    /// Adopts `next`, a layout made from `current` (version + 1) by the
    /// load planner. Refused (false) during a transition or if `next` is
    /// not the next version.
    pub fn install(&mut self, next: Layout) -> bool {
        if self.in_transition() || next.version() != self.current.version().saturating_add(1) {
            return false;
        }
        self.current = next;
        self.ready.clear();
        self.try_complete();
        true
    }

    fn try_complete(&mut self) {
        if !self.in_transition() {
            self.ready.clear();
            return;
        }
        let done = (0..self.current.partitions()).all(|p| {
            self.current
                .replicas(p)
                .iter()
                .all(|&n| self.completed.holds(n, p) || self.ready.contains(&(p, n)))
        });
        if done {
            self.completed = self.current.clone();
            self.ready.clear();
        }
    }

    /// Merges another node's view. Returns true if this view changed.
    pub fn merge(&mut self, other: &LayoutState) -> bool {
        let before = self.clone();
        if layout_rank(&other.completed) > layout_rank(&self.completed) {
            self.completed = other.completed.clone();
        }
        if layout_rank(&other.current) > layout_rank(&self.current) {
            self.current = other.current.clone();
        }
        if self.completed.version() > self.current.version() {
            self.current = self.completed.clone();
        }
        self.ready.extend(other.ready.iter().copied());
        let (current, completed) = (&self.current, &self.completed);
        self.ready
            .retain(|&(p, n)| current.holds(n, p) && !completed.holds(n, p));
        self.try_complete();
        *self != before
    }

    /// Checks a state received from a peer.
    pub fn validate(&self, partitions: u16) -> Result<(), super::layout::LayoutError> {
        self.current.validate(partitions)?;
        self.completed.validate(partitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(ids: &[u64]) -> Vec<NodeSpec> {
        ids.iter()
            .map(|&i| NodeSpec {
                id: NodeId(i),
                capacity: 100,
                zone: None,
            })
            .collect()
    }

    #[test]
    fn a_join_is_in_transition_until_every_gained_replica_is_ready() {
        let mut state = LayoutState::bootstrap(16, 3, &specs(&[1, 2, 3]));
        assert!(!state.in_transition());
        assert!(state.propose(&specs(&[1, 2, 3, 4])));
        assert!(state.in_transition());
        let gained = state.pending_migrations(NodeId(4));
        assert!(!gained.is_empty());
        for &p in &gained {
            // Old and new replicas both hold the partition meanwhile.
            assert!(state.holds(NodeId(4), p));
            assert_eq!(state.holders(p).len(), 4);
        }
        for &p in &gained[..gained.len() - 1] {
            state.mark_ready(p, NodeId(4));
        }
        assert!(state.in_transition());
        state.mark_ready(gained[gained.len() - 1], NodeId(4));
        assert!(!state.in_transition());
        assert!(gained.iter().all(|&p| state.holders(p).len() == 3));
    }

    #[test]
    fn merge_converges_whatever_the_order() {
        let base = LayoutState::bootstrap(16, 3, &specs(&[1, 2, 3]));
        let mut a = base.clone();
        a.propose(&specs(&[1, 2, 3, 4]));
        let mut b = a.clone();
        let gained = b.pending_migrations(NodeId(4));
        b.mark_ready(gained[0], NodeId(4));
        let mut c = base.clone();
        c.propose(&specs(&[1, 2, 3, 5])); // a concurrent proposal, same version
        let views = [base, a, b, c];
        let mut forward = views[0].clone();
        for v in &views[1..] {
            forward.merge(v);
        }
        let mut backward = views[3].clone();
        for v in views[..3].iter().rev() {
            backward.merge(v);
        }
        assert_eq!(forward, backward);
        let again = forward.clone();
        assert!(!forward.merge(&again), "merge is idempotent");
    }

    #[test]
    fn proposing_the_same_members_changes_nothing() {
        let mut state = LayoutState::bootstrap(16, 3, &specs(&[1, 2, 3]));
        assert!(!state.propose(&specs(&[3, 2, 1])));
    }
}
