//! The version vector of a partition: which dots a store has incorporated.
//!
//! For each origin node it holds `base`, the highest sequence such that every
//! dot `1..=base` is incorporated, and `extra`, the dots above `base` that are
//! incorporated although some below them are not yet (they arrive out of order
//! during a sync that has not completed). Kept normalized: every extra dot is
//! above `base + 1`, so a vector has exactly one representation and two equal
//! vectors compare and hash equal.
//!
//! "Incorporated" means the store's state includes the effect of that write,
//! or of a later write that superseded it. The store maintains this: a dot is
//! only added when the entry carrying it was merged, or when a complete
//! change stream from a source that had incorporated it was applied.

use super::{Dot, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector {
    base: BTreeMap<NodeId, u64>,
    extra: BTreeMap<NodeId, BTreeSet<u64>>,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest contiguous sequence incorporated from `node`.
    pub fn base(&self, node: NodeId) -> u64 {
        self.base.get(&node).copied().unwrap_or(0)
    }

    /// The dots above `base(node)` incorporated out of order.
    pub fn extra(&self, node: NodeId) -> impl Iterator<Item = u64> + '_ {
        self.extra.get(&node).into_iter().flatten().copied()
    }

    /// The highest sequence of `node` incorporated, contiguous or not.
    pub fn max_seq(&self, node: NodeId) -> u64 {
        let extra = self.extra.get(&node).and_then(|s| s.last().copied());
        extra.unwrap_or(0).max(self.base(node))
    }

    /// Every node this vector mentions, in order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        let mut nodes: BTreeSet<NodeId> = self.base.keys().copied().collect();
        nodes.extend(self.extra.keys().copied());
        nodes.into_iter()
    }

    pub fn is_empty(&self) -> bool {
        self.base.is_empty() && self.extra.is_empty()
    }

    pub fn covers(&self, dot: Dot) -> bool {
        dot.seq <= self.base(dot.node)
            || self
                .extra
                .get(&dot.node)
                .is_some_and(|s| s.contains(&dot.seq))
    }

    /// True when every dot `other` covers is covered here too.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.base.iter().all(|(&node, &seq)| {
            let mine = self.base(node);
            // The gap above our base must be filled by extras, one per dot.
            seq <= mine
                || self
                    .extra
                    .get(&node)
                    .is_some_and(|extra| extra.range(mine + 1..=seq).count() as u64 == seq - mine)
        }) && other
            .extra
            .iter()
            .all(|(&node, seqs)| seqs.iter().all(|&s| self.covers(Dot::new(node, s))))
    }

    /// Records one incorporated dot.
    pub fn add(&mut self, dot: Dot) {
        if dot.seq == 0 || self.covers(dot) {
            return;
        }
        if dot.seq == self.base(dot.node).saturating_add(1) {
            self.base.insert(dot.node, dot.seq);
        } else {
            self.extra.entry(dot.node).or_default().insert(dot.seq);
        }
        self.normalize_node(dot.node);
    }

    /// Marks every dot `1..=seq` of `node` incorporated.
    pub fn raise_base(&mut self, node: NodeId, seq: u64) {
        if seq > self.base(node) {
            self.base.insert(node, seq);
            self.normalize_node(node);
        }
    }

    /// Pointwise union: afterwards every dot either vector covered is covered.
    pub fn join(&mut self, other: &VersionVector) {
        for (&node, &seq) in &other.base {
            self.raise_base(node, seq);
        }
        for (&node, seqs) in &other.extra {
            for &seq in seqs {
                self.add(Dot::new(node, seq));
            }
        }
    }

    /// Adds the dots of `node` that `other` covers, up to `upto`.
    pub fn join_node_upto(&mut self, other: &VersionVector, node: NodeId, upto: u64) {
        self.raise_base(node, other.base(node).min(upto));
        for seq in other.extra(node).take_while(|&s| s <= upto) {
            self.add(Dot::new(node, seq));
        }
    }

    /// Pointwise intersection of contiguous parts: the dots both cover for
    /// sure. Used to find causally stable dots.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let base = self
            .base
            .iter()
            .filter_map(|(&node, &seq)| {
                let seq = seq.min(other.base(node));
                (seq > 0).then_some((node, seq))
            })
            .collect();
        VersionVector {
            base,
            extra: BTreeMap::new(),
        }
    }

    /// Puts a vector received from outside into normal form (a peer may send
    /// extras below its base, zero bases or empty sets); true if it was not.
    pub fn normalize(&mut self) -> bool {
        let before = self.clone();
        self.base.retain(|_, seq| *seq > 0);
        self.extra.retain(|_, seqs| {
            seqs.remove(&0);
            !seqs.is_empty()
        });
        let nodes: Vec<NodeId> = self.extra.keys().copied().collect();
        for node in nodes {
            self.normalize_node(node);
        }
        *self != before
    }

    fn normalize_node(&mut self, node: NodeId) {
        let Some(seqs) = self.extra.get_mut(&node) else {
            return;
        };
        let mut base = self.base.get(&node).copied().unwrap_or(0);
        while let Some(&first) = seqs.first() {
            if first <= base.saturating_add(1) {
                base = base.max(first);
                seqs.pop_first();
            } else {
                break;
            }
        }
        if seqs.is_empty() {
            self.extra.remove(&node);
        }
        if base > 0 {
            self.base.insert(node, base);
        }
    }

    /// Number of out-of-order dots held: how far from contiguous this is.
    pub fn extra_len(&self) -> usize {
        self.extra.values().map(BTreeSet::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    #[test]
    fn out_of_order_dots_fold_into_the_base_once_the_gap_fills() {
        let mut vv = VersionVector::new();
        vv.add(Dot::new(A, 3));
        vv.add(Dot::new(A, 2));
        assert_eq!(vv.base(A), 0);
        assert!(vv.covers(Dot::new(A, 3)) && !vv.covers(Dot::new(A, 1)));
        vv.add(Dot::new(A, 1));
        assert_eq!(vv.base(A), 3);
        assert_eq!(vv.extra_len(), 0);
    }

    #[test]
    fn join_and_dominates_agree() {
        let mut a = VersionVector::new();
        a.raise_base(A, 5);
        a.add(Dot::new(B, 4));
        let mut b = VersionVector::new();
        b.raise_base(B, 3);
        assert!(!a.dominates(&b) && !b.dominates(&a));
        let mut j = a.clone();
        j.join(&b);
        assert!(j.dominates(&a) && j.dominates(&b));
        assert_eq!(j.base(B), 4);
    }

    #[test]
    fn normalize_repairs_a_vector_from_outside() {
        let mut vv = VersionVector {
            base: [(A, 2), (B, 0)].into_iter().collect(),
            extra: [(A, [1, 3, 7].into_iter().collect())].into_iter().collect(),
        };
        assert!(vv.normalize());
        assert_eq!(vv.base(A), 3);
        assert_eq!(vv.extra(A).collect::<Vec<_>>(), vec![7]);
        assert!(!vv.normalize());
    }
}
