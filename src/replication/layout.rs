//! The partition layout: which nodes hold the replicas of each partition.
//!
//! A [`Layout`] maps every partition to an ordered list of distinct nodes.
//! [`Layout::next`] computes the layout for a member set from the current
//! one. It is a pure function of (current layout, member set): no I/O, no
//! clock, no randomness but hashing, and the order of the member list does
//! not matter. Layouts are versioned and gossiped (postcard); a layout from
//! a peer is checked with [`Layout::validate`] before use.
//!
//! # Terms
//!
//! - *Eligible* nodes are the members with capacity >= 1; capacity 0 drains
//!   a node. If a node id appears twice, the entry with the larger capacity
//!   (then the smaller zone) counts.
//! - `r = min(replication factor, eligible nodes)` replicas per partition.
//! - *Zones* are failure domains. A node without a zone is a zone of its
//!   own, so without zones the zone rules reduce to "distinct nodes".
//! - *Zone bounds*: let `c` be the smallest number with
//!   `sum over zones of min(c, zone size) >= r`. A partition holds at most
//!   `hi(z) = min(c, size(z))` and at least `lo(z) = min(c - 1, size(z))`
//!   replicas in zone `z`. With at least `r` zones that is one replica per
//!   zone; with fewer it is the most even spread the zone sizes allow.
//! - *Score*: weighted rendezvous hashing,
//!   `score(n, p) = capacity(n) / -ln(u)` with `u` in (0, 1) taken from
//!   `xxh3_64(node id LE ++ partition LE)` ([`rendezvous_score`]), and a
//!   logarithm built from IEEE basic operations so every platform agrees.
//!   Ties go to the smaller node id.
//! - *Quota*: the replica slots a node should hold ([`Layout::quotas`]):
//!   `partitions * r` slots shared in proportion to capacity, by largest
//!   remainder (ties to the smaller node id), first among zones then among
//!   each zone's nodes. A share that no layout can reach is clamped and the
//!   rest shared among the others: a node holds at most one replica of a
//!   partition (at most `partitions` slots), a zone between
//!   `partitions * lo(z)` and `partitions * hi(z)`.
//!
//! # Algorithm of `next`
//!
//! 1. Compute the quotas of the new member set.
//! 2. Keep the current assignment, minus replicas on nodes that are gone or
//!    have capacity 0. Where a partition breaks a zone bound (zones changed),
//!    drop its lowest-scoring replicas in the offending zones until the
//!    partition can be completed within the bounds.
//! 3. Fill the empty slots, one per partition per round, each with the
//!    highest-scoring node that is under quota and keeps the zone bounds
//!    reachable. If a slot has no such node, look for a chain of hand-overs
//!    that ends at a node under quota and moves no more data: each node on
//!    it gives up a slot it gained in this call, or returns to a partition
//!    it held before. Failing that, take the best node over quota: zone
//!    bounds are hard, quotas are a target.
//! 4. Hand over excess: while a node is over quota, give its
//!    lowest-scoring slot that some node under quota can take (directly, or
//!    through a chain as in 3) to the highest-scoring such node. Excess
//!    slots are handed over, never just dropped, so a partition is never
//!    left short of replicas for the sake of balance. Only if no such chain
//!    exists may a chain pass through kept replicas, one extra move each
//!    (shortest chain first): this is what lets a node whose quota is every
//!    partition enter a partition whose replicas are all at quota.
//!
//! Unless step 3 falls back to a node over quota or step 4 goes through
//! kept replicas, only nodes under quota gain and only nodes over quota (or
//! ineligible, or breaking a zone bound) lose, so the move count is the
//! least that reaches the quotas: on a join only the new node gains; on a
//! leave only the leaving node's partitions change, one replica each. The
//! fallbacks are rare: against an exact min-cost flow on random clusters
//! without zones, about 0.1% of single-node leaves move one replica more
//! than needed, and no join does (the tests check "at most one more").
//!
//! # Invariants of a layout `next` returns
//!
//! 1. Every partition has `r` distinct eligible nodes, in order: a kept
//!    replica keeps its place, a replacement takes the place of the replica
//!    it replaces, new replicas are appended.
//! 2. Every partition keeps the zone bounds.
//! 3. Every node holds its quota, unless the zone bounds leave no chain of
//!    hand-overs that gets it there (step 4 ran to its end).
//! 4. `next` is idempotent: applied again with the same members it changes
//!    nothing but the version, since steps 2 to 4 find nothing to do.
//!
//! # Cost
//!
//! Each partition that needs a slot sorts the members by score once
//! (`O(n log n)`); a chain search visits each node once and each of its
//! slots once. 1,000 nodes x 256 partitions x 3 replicas: about 25 ms for a
//! first layout, 1 ms for a join or a leave (release build).

use crate::crdt::NodeId;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use xxhash_rust::xxh3::xxh3_64;

/// A member as the layout sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: NodeId,
    /// Relative weight: twice the capacity, twice the replica slots. 0 means
    /// the node holds nothing (it is draining).
    pub capacity: u32,
    /// Failure domain. A node without a zone is a zone of its own.
    pub zone: Option<String>,
}

impl NodeSpec {
    pub fn new(id: NodeId, capacity: u32) -> Self {
        NodeSpec {
            id,
            capacity,
            zone: None,
        }
    }

    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }
}

/// Partitions mapped to replica nodes, with a version that grows by one per
/// [`next`](Layout::next).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    version: u64,
    replicas: u8,
    /// Per partition, its replicas in order (see the module's invariant 1).
    assignment: Vec<Vec<NodeId>>,
}

/// How one partition's replica set differs between two layouts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartitionChange {
    pub partition: u16,
    /// Nodes that hold the partition in the newer layout only, by id.
    pub gained: Vec<NodeId>,
    /// Nodes that hold the partition in the older layout only, by id.
    pub lost: Vec<NodeId>,
}

/// What is wrong with a layout (typically one received from a peer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error("the layout has {found} partitions but this cluster has {expected}")]
    PartitionCount { expected: u16, found: usize },
    #[error("the layout's replication factor is 0")]
    ZeroReplicationFactor,
    #[error("partition {partition} names node {node} more than once")]
    DuplicateReplica { partition: u16, node: NodeId },
    #[error("partition {partition} has {found} replicas but the replication factor is {max}")]
    TooManyReplicas {
        partition: u16,
        found: usize,
        max: u8,
    },
}

impl Layout {
    /// Version 0: no partition has a replica.
    pub fn empty(partitions: u16, replicas: u8) -> Layout {
        Layout {
            version: 0,
            replicas,
            assignment: vec![Vec::new(); usize::from(partitions)],
        }
    }

    /// The next layout (version + 1) for this member set, moving as few
    /// partition replicas as possible (see the module doc for how).
    pub fn next(&self, nodes: &[NodeSpec]) -> Layout {
        let members = Members::new(self.replicas, nodes);
        let mut plan = Planner::new(&members, &self.assignment);
        plan.drop_invalid();
        plan.fill();
        plan.hand_over();
        Layout {
            // Saturates rather than wraps: 2^64 layouts will not happen, and
            // a wrapped version would lose to every older layout.
            version: self.version.saturating_add(1),
            replicas: self.replicas,
            assignment: plan.finish(),
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn partitions(&self) -> u16 {
        // Only an invalid layout from a peer can exceed u16; validate says so.
        u16::try_from(self.assignment.len()).unwrap_or(u16::MAX)
    }

    pub fn replication_factor(&self) -> u8 {
        self.replicas
    }

    /// The replicas of `partition` in order; empty if it has none or does
    /// not exist.
    pub fn replicas(&self, partition: u16) -> &[NodeId] {
        self.assignment
            .get(usize::from(partition))
            .map_or(&[], Vec::as_slice)
    }

    pub fn holds(&self, node: NodeId, partition: u16) -> bool {
        self.replicas(partition).contains(&node)
    }

    /// The partitions `node` holds, ascending.
    pub fn partitions_of(&self, node: NodeId) -> Vec<u16> {
        (0..self.partitions())
            .filter(|&p| self.holds(node, p))
            .collect()
    }

    /// The nodes holding at least one replica, ascending.
    pub fn nodes(&self) -> Vec<NodeId> {
        let set: BTreeSet<NodeId> = self.assignment.iter().flatten().copied().collect();
        set.into_iter().collect()
    }

    /// The number of replicas each node holds (nodes holding none are absent).
    pub fn slot_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for &node in self.assignment.iter().flatten() {
            *counts.entry(node).or_insert(0) += 1;
        }
        counts
    }

    /// Per partition whose replica set differs (order aside): the nodes that
    /// gain it and the nodes that lose it. Ascending by partition.
    pub fn changes_to(&self, next: &Layout) -> Vec<PartitionChange> {
        let len = self
            .assignment
            .len()
            .max(next.assignment.len())
            .min(1 << 16);
        let mut changes = Vec::new();
        for p in 0..len {
            let old = self.assignment.get(p).map_or(&[][..], Vec::as_slice);
            let new = next.assignment.get(p).map_or(&[][..], Vec::as_slice);
            let gained = sorted_difference(new, old);
            let lost = sorted_difference(old, new);
            if gained.is_empty() && lost.is_empty() {
                continue;
            }
            // `len` is capped at 2^16 above, so p fits.
            let partition = u16::try_from(p).unwrap_or(u16::MAX);
            changes.push(PartitionChange {
                partition,
                gained,
                lost,
            });
        }
        changes
    }

    /// The replica slots each node should hold for these capacities; see the
    /// module doc. Every node of `nodes` is a key (capacity 0 gets 0); the
    /// quotas add up to `partitions * min(replicas, eligible nodes)`.
    pub fn quotas(partitions: u16, replicas: u8, nodes: &[NodeSpec]) -> BTreeMap<NodeId, usize> {
        let members = Members::new(replicas, nodes);
        let mut quotas: BTreeMap<NodeId, usize> = nodes.iter().map(|s| (s.id, 0)).collect();
        for (i, quota) in members
            .quotas(usize::from(partitions))
            .into_iter()
            .enumerate()
        {
            quotas.insert(members.ids[i], quota);
        }
        quotas
    }

    /// Checks a layout received from a peer: the partition count is this
    /// cluster's, the replication factor is at least 1, and every partition
    /// has at most that many replicas, all distinct.
    pub fn validate(&self, partitions: u16) -> Result<(), LayoutError> {
        if self.assignment.len() != usize::from(partitions) {
            return Err(LayoutError::PartitionCount {
                expected: partitions,
                found: self.assignment.len(),
            });
        }
        if self.replicas == 0 {
            return Err(LayoutError::ZeroReplicationFactor);
        }
        for (partition, replicas) in (0..partitions).zip(&self.assignment) {
            if replicas.len() > usize::from(self.replicas) {
                return Err(LayoutError::TooManyReplicas {
                    partition,
                    found: replicas.len(),
                    max: self.replicas,
                });
            }
            for (i, &node) in replicas.iter().enumerate() {
                if replicas[..i].contains(&node) {
                    return Err(LayoutError::DuplicateReplica { partition, node });
                }
            }
        }
        Ok(())
    }
}

/// A change the load planner makes to a layout (see `rebalance.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LayoutMove {
    /// `to`, already a replica of `partition`, becomes its first replica
    /// (the one that coordinates its writes) in place of `from`. No data
    /// moves.
    Lead {
        partition: u16,
        from: NodeId,
        to: NodeId,
    },
    /// `to`, not a replica of `partition`, takes the place of replica
    /// `from` (same position in the order): `to` receives the partition.
    Replace {
        partition: u16,
        from: NodeId,
        to: NodeId,
    },
}

impl LayoutMove {
    pub fn partition(&self) -> u16 {
        match *self {
            LayoutMove::Lead { partition, .. } | LayoutMove::Replace { partition, .. } => partition,
        }
    }
}

/// Why a set of [`LayoutMove`]s cannot be applied to a layout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    #[error("partition {partition} does not exist")]
    NoPartition { partition: u16 },
    #[error("node {node} is not a replica of partition {partition}")]
    NotReplica { partition: u16, node: NodeId },
    #[error("node {node} is not the first replica of partition {partition}")]
    NotFirst { partition: u16, node: NodeId },
    #[error("node {node} already holds partition {partition}")]
    AlreadyReplica { partition: u16, node: NodeId },
    #[error("node {node} is not a member with capacity")]
    NotEligible { node: NodeId },
    #[error("partition {partition} would break its zone bounds")]
    ZoneBounds { partition: u16 },
    #[error("node {node} would hold {after} replicas instead of {before}: a plan must keep every node's replica count, or the next layout would undo it")]
    SlotCount {
        node: NodeId,
        before: usize,
        after: usize,
    },
}

/// The zone bounds of a member set, to check a replica set against
/// without building a layout.
pub struct ZoneRules {
    members: Members,
}

impl ZoneRules {
    pub fn new(replicas: u8, nodes: &[NodeSpec]) -> ZoneRules {
        ZoneRules {
            members: Members::new(replicas, nodes),
        }
    }

    /// Whether `node` is a member with capacity >= 1.
    pub fn eligible(&self, node: NodeId) -> bool {
        self.members.ids.binary_search(&node).is_ok()
    }

    /// Whether `replicas` (eligible nodes) keeps every zone within its
    /// bounds. A node that is not eligible breaks them.
    pub fn allows(&self, replicas: &[NodeId]) -> bool {
        let mut per_zone = vec![0usize; self.members.zones.len()];
        for node in replicas {
            let Ok(i) = self.members.ids.binary_search(node) else {
                return false;
            };
            per_zone[self.members.zone_of[i]] += 1;
        }
        let full = replicas.len() >= self.members.r;
        per_zone
            .iter()
            .enumerate()
            .all(|(z, &n)| n <= self.members.zone_hi[z] && (!full || n >= self.members.zone_lo[z]))
    }
}

impl Layout {
    /// This layout with `moves` applied in order, as the next version.
    /// Refused unless every move names replicas as they are at its turn,
    /// every partition keeps its zone bounds, and every node ends with
    /// as many replicas as it began with: then [`Layout::next`] with the
    /// same members finds nothing to undo (its steps 2 to 4 act only on
    /// gone nodes, broken zone bounds and slot counts off quota).
    pub fn with_moves(
        &self,
        nodes: &[NodeSpec],
        moves: &[LayoutMove],
    ) -> Result<Layout, MoveError> {
        let rules = ZoneRules::new(self.replicas, nodes);
        let mut next = self.clone();
        for m in moves {
            let p = m.partition();
            let replicas = next
                .assignment
                .get_mut(usize::from(p))
                .ok_or(MoveError::NoPartition { partition: p })?;
            match *m {
                LayoutMove::Lead {
                    partition,
                    from,
                    to,
                } => {
                    if replicas.first() != Some(&from) {
                        return Err(MoveError::NotFirst {
                            partition,
                            node: from,
                        });
                    }
                    let at =
                        replicas
                            .iter()
                            .position(|&n| n == to)
                            .ok_or(MoveError::NotReplica {
                                partition,
                                node: to,
                            })?;
                    replicas.swap(0, at);
                }
                LayoutMove::Replace {
                    partition,
                    from,
                    to,
                } => {
                    if !rules.eligible(to) {
                        return Err(MoveError::NotEligible { node: to });
                    }
                    if replicas.contains(&to) {
                        return Err(MoveError::AlreadyReplica {
                            partition,
                            node: to,
                        });
                    }
                    let at =
                        replicas
                            .iter()
                            .position(|&n| n == from)
                            .ok_or(MoveError::NotReplica {
                                partition,
                                node: from,
                            })?;
                    replicas[at] = to;
                    if !rules.allows(replicas) {
                        return Err(MoveError::ZoneBounds { partition });
                    }
                }
            }
        }
        let before = self.slot_counts();
        let after = next.slot_counts();
        for node in before.keys().chain(after.keys()) {
            let (b, a) = (
                before.get(node).copied().unwrap_or(0),
                after.get(node).copied().unwrap_or(0),
            );
            if a != b {
                return Err(MoveError::SlotCount {
                    node: *node,
                    before: b,
                    after: a,
                });
            }
        }
        next.version = self.version.saturating_add(1);
        Ok(next)
    }
}

/// The elements of `a` not in `b`, ascending and distinct.
fn sorted_difference(a: &[NodeId], b: &[NodeId]) -> Vec<NodeId> {
    let set: BTreeSet<NodeId> = a.iter().filter(|n| !b.contains(n)).copied().collect();
    set.into_iter().collect()
}

/// Weighted rendezvous score of `node` for `partition`: the higher, the more
/// the partition prefers the node. `capacity / -ln(u)` with `u` uniform in
/// (0, 1) makes a node's chance to score highest proportional to its
/// capacity.
pub fn rendezvous_score(node: NodeId, capacity: u32, partition: u16) -> f64 {
    let mut bytes = [0u8; 10];
    bytes[..8].copy_from_slice(&node.0.to_le_bytes());
    bytes[8..].copy_from_slice(&partition.to_le_bytes());
    let hash = xxh3_64(&bytes);
    // The top 53 bits, centred in their interval, so u is never 0 or 1.
    let u = ((hash >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    f64::from(capacity) / -ln_unit(u)
}

/// The natural logarithm of `x` in (0, 1), normal, from IEEE basic
/// operations only. `f64::ln` comes from the platform's libm and may differ
/// in the last bit between platforms; layouts must not.
fn ln_unit(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut mantissa = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    if mantissa > std::f64::consts::SQRT_2 {
        mantissa *= 0.5;
        exponent += 1;
    }
    // ln(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with |s| <= 0.172,
    // so twelve terms reach f64 precision.
    let s = (mantissa - 1.0) / (mantissa + 1.0);
    let s2 = s * s;
    let mut series = 0.0;
    for k in (0..12u32).rev() {
        series = series * s2 + 1.0 / f64::from(2 * k + 1);
    }
    exponent as f64 * std::f64::consts::LN_2 + 2.0 * s * series
}

/// Orders zones; a node without a zone is a zone of its own.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ZoneKey<'a> {
    Named(&'a str),
    Own(NodeId),
}

/// The eligible members of one call in canonical order (by id), with their
/// zones and the zone bounds.
struct Members {
    ids: Vec<NodeId>,
    capacities: Vec<u32>,
    zone_of: Vec<usize>,
    /// Per zone, its members.
    zones: Vec<Vec<usize>>,
    /// Per zone, the fewest and most replicas of a partition it holds.
    zone_lo: Vec<usize>,
    zone_hi: Vec<usize>,
    /// Sum of `zone_lo`; 0 when at least `r` zones exist, which lets the
    /// common case skip counting deficits.
    lo_total: usize,
    /// Replicas per partition.
    r: usize,
}

impl Members {
    fn new(replicas: u8, nodes: &[NodeSpec]) -> Members {
        let mut specs: Vec<&NodeSpec> = nodes.iter().filter(|s| s.capacity > 0).collect();
        // A duplicated id counts once, by a rule that ignores input order.
        specs.sort_by(|a, b| {
            a.id.cmp(&b.id)
                .then(b.capacity.cmp(&a.capacity))
                .then(a.zone.cmp(&b.zone))
        });
        specs.dedup_by_key(|s| s.id);
        let r = usize::from(replicas).min(specs.len());

        let mut by_zone: BTreeMap<ZoneKey<'_>, Vec<usize>> = BTreeMap::new();
        for (i, spec) in specs.iter().enumerate() {
            let key = spec
                .zone
                .as_deref()
                .map_or(ZoneKey::Own(spec.id), ZoneKey::Named);
            by_zone.entry(key).or_default().push(i);
        }
        let zones: Vec<Vec<usize>> = by_zone.into_values().collect();
        let mut zone_of = vec![0; specs.len()];
        for (z, members) in zones.iter().enumerate() {
            for &i in members {
                zone_of[i] = z;
            }
        }
        let mut most = 1;
        while most < r && zones.iter().map(|m| m.len().min(most)).sum::<usize>() < r {
            most += 1;
        }
        let zone_hi: Vec<usize> = zones.iter().map(|m| m.len().min(most)).collect();
        let zone_lo: Vec<usize> = zones.iter().map(|m| m.len().min(most - 1)).collect();
        Members {
            ids: specs.iter().map(|s| s.id).collect(),
            capacities: specs.iter().map(|s| s.capacity).collect(),
            zone_of,
            lo_total: zone_lo.iter().sum(),
            zones,
            zone_lo,
            zone_hi,
            r,
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// Quotas by member index; see the module doc.
    fn quotas(&self, partitions: usize) -> Vec<usize> {
        let mut quotas = vec![0; self.len()];
        if self.r == 0 {
            return quotas;
        }
        let p = partitions as u64;
        let zone_shares: Vec<Share> = (0..self.zones.len())
            .map(|z| Share {
                weight: self.zones[z]
                    .iter()
                    .map(|&i| u64::from(self.capacities[i]))
                    .sum(),
                lo: p * self.zone_lo[z] as u64,
                hi: p * self.zone_hi[z] as u64,
            })
            .collect();
        let zone_totals = apportion(p * self.r as u64, &zone_shares);
        for (members, total) in self.zones.iter().zip(zone_totals) {
            let shares: Vec<Share> = members
                .iter()
                .map(|&i| Share {
                    weight: u64::from(self.capacities[i]),
                    lo: 0,
                    hi: p,
                })
                .collect();
            for (&i, quota) in members.iter().zip(apportion(total, &shares)) {
                quotas[i] = usize::try_from(quota).unwrap_or(usize::MAX);
            }
        }
        quotas
    }

    fn score(&self, node: usize, partition: usize) -> f64 {
        // Partition indices come from a layout of at most 2^16 partitions
        // (a longer one from a peer fails validation; here it only hashes
        // oddly, it cannot panic).
        rendezvous_score(self.ids[node], self.capacities[node], partition as u16)
    }

    /// The order in which `partition` prefers nodes: highest score first,
    /// ties to the smaller id.
    fn prefers(&self, partition: usize, a: usize, b: usize) -> Ordering {
        self.score(b, partition)
            .total_cmp(&self.score(a, partition))
            .then(a.cmp(&b))
    }

    /// How many more replicas the zone minimums still need, for a partition
    /// holding `replicas`.
    fn zone_deficit(&self, replicas: impl Iterator<Item = usize>) -> usize {
        if self.lo_total == 0 {
            return 0;
        }
        let mut zones: Vec<usize> = replicas.map(|n| self.zone_of[n]).collect();
        zones.sort_unstable();
        let mut covered = 0;
        for run in zones.chunk_by(|a, b| a == b) {
            covered += run.len().min(self.zone_lo[run[0]]);
        }
        self.lo_total - covered
    }
}

/// One share of an apportionment: a weight and the bounds of the result.
struct Share {
    weight: u64,
    lo: u64,
    hi: u64,
}

/// Splits `total` in proportion to the weights, each part clamped to its
/// bounds, rounding by largest remainder with ties to the lower index.
/// Exact integer arithmetic, so every platform agrees. Expects weights >= 1
/// and `sum(lo) <= total <= sum(hi)` (the callers' bounds make it so).
fn apportion(total: u64, shares: &[Share]) -> Vec<u64> {
    let mut fixed: Vec<Option<u64>> = vec![None; shares.len()];
    // Find the scale factor by fixing parts at their bounds. If the parts
    // above their upper bound overshoot by at least as much as the parts
    // below their lower bound undershoot, the true factor is no smaller, so
    // those above stay above: fix them at `hi` (and symmetrically for `lo`).
    // Each round fixes at least one part.
    loop {
        let (rest, weight) = remaining(total, shares, &fixed);
        let (mut over, mut under) = (0u128, 0u128);
        for (share, _) in shares.iter().zip(&fixed).filter(|(_, f)| f.is_none()) {
            let scaled = rest * u128::from(share.weight);
            let (lo, hi) = (u128::from(share.lo) * weight, u128::from(share.hi) * weight);
            over += scaled.saturating_sub(hi);
            under += lo.saturating_sub(scaled);
        }
        if over == 0 && under == 0 {
            break;
        }
        for (share, f) in shares
            .iter()
            .zip(fixed.iter_mut())
            .filter(|(_, f)| f.is_none())
        {
            let scaled = rest * u128::from(share.weight);
            if over >= under && scaled > u128::from(share.hi) * weight {
                *f = Some(share.hi);
            } else if over < under && scaled < u128::from(share.lo) * weight {
                *f = Some(share.lo);
            }
        }
    }
    let (rest, weight) = remaining(total, shares, &fixed);
    let mut parts: Vec<u64> = fixed.iter().map(|f| f.unwrap_or(0)).collect();
    let mut remainders = Vec::new();
    let mut handed = 0u128;
    for (i, share) in shares
        .iter()
        .enumerate()
        .filter(|(i, _)| fixed[*i].is_none())
    {
        // weight > 0 here: this part is free and weights are >= 1.
        let scaled = rest * u128::from(share.weight);
        let floor = scaled / weight;
        handed += floor;
        parts[i] = u64::try_from(floor).unwrap_or(u64::MAX);
        remainders.push((scaled % weight, i));
    }
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let extra = usize::try_from(rest.saturating_sub(handed)).unwrap_or(usize::MAX);
    for &(_, i) in remainders.iter().take(extra) {
        parts[i] += 1;
    }
    parts
}

/// What is left to share among the parts not yet fixed, and their weight.
fn remaining(total: u64, shares: &[Share], fixed: &[Option<u64>]) -> (u128, u128) {
    let taken: u64 = fixed.iter().flatten().sum();
    let weight = shares
        .iter()
        .zip(fixed)
        .filter(|(_, f)| f.is_none())
        .map(|(s, _)| u128::from(s.weight))
        .sum();
    (u128::from(total.saturating_sub(taken)), weight)
}

/// Which slots an intermediate node of a chain may give up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Through {
    /// Only what moves no extra data: a slot it gained in this call, or any
    /// slot if it returns to a partition it held before.
    Gained,
    /// Any slot.
    Any,
}

/// A slot to hand to another node in a chain search: in `partition`,
/// either empty (`leaving` is None) or held by `leaving`.
#[derive(Clone, Copy)]
struct Slot {
    partition: usize,
    leaving: Option<usize>,
    /// The slot whose taker is `leaving` (the previous link of the chain).
    parent: Option<usize>,
}

/// The working state of one `next` call, by member index.
struct Planner<'a> {
    members: &'a Members,
    quota: Vec<usize>,
    /// Per node, the partitions it holds, ascending: its count is the
    /// length, and a chain search expands a node in time of what it holds.
    held: Vec<Vec<usize>>,
    assign: Vec<Vec<usize>>,
    /// Each partition's eligible replicas before this call: holding a
    /// partition not listed here means moving its data.
    before: Vec<Vec<usize>>,
    /// Per partition, all members in its order of preference; computed on
    /// first use.
    preference: Vec<Option<Rc<[usize]>>>,
}

impl<'a> Planner<'a> {
    fn new(members: &'a Members, assignment: &[Vec<NodeId>]) -> Planner<'a> {
        let mut assign = Vec::with_capacity(assignment.len());
        for replicas in assignment {
            let mut kept: Vec<usize> = Vec::with_capacity(replicas.len());
            for node in replicas {
                if let Ok(i) = members.ids.binary_search(node) {
                    // A duplicate can only come from an invalid layout.
                    if !kept.contains(&i) {
                        kept.push(i);
                    }
                }
            }
            assign.push(kept);
        }
        let mut held = vec![Vec::new(); members.len()];
        for (p, replicas) in assign.iter().enumerate() {
            for &i in replicas {
                held[i].push(p);
            }
        }
        Planner {
            members,
            quota: members.quotas(assignment.len()),
            held,
            before: assign.clone(),
            assign,
            preference: vec![None; assignment.len()],
        }
    }

    fn finish(self) -> Vec<Vec<NodeId>> {
        let ids = &self.members.ids;
        self.assign
            .into_iter()
            .map(|replicas| replicas.into_iter().map(|i| ids[i]).collect())
            .collect()
    }

    fn preference(&mut self, partition: usize) -> Rc<[usize]> {
        if let Some(order) = &self.preference[partition] {
            return Rc::clone(order);
        }
        let members = self.members;
        let mut scored: Vec<(f64, usize)> = (0..members.len())
            .map(|i| (members.score(i, partition), i))
            .collect();
        scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let order: Rc<[usize]> = scored.into_iter().map(|(_, i)| i).collect();
        self.preference[partition] = Some(Rc::clone(&order));
        order
    }

    /// The replica of `partition` among `candidates` it prefers least.
    fn weakest(&self, partition: usize, candidates: impl Iterator<Item = usize>) -> Option<usize> {
        candidates.max_by(|&a, &b| self.members.prefers(partition, a, b))
    }

    fn zone_count(&self, partition: usize, zone: usize) -> usize {
        self.assign[partition]
            .iter()
            .filter(|&&n| self.members.zone_of[n] == zone)
            .count()
    }

    /// Whether `partition` can still be completed within the zone bounds
    /// after `add` joins it in place of `leaving` (or in an empty slot).
    fn fits(&self, partition: usize, leaving: Option<usize>, add: usize) -> bool {
        let m = self.members;
        let staying = || {
            self.assign[partition]
                .iter()
                .copied()
                .filter(move |&n| Some(n) != leaving)
        };
        let zone = m.zone_of[add];
        if staying().filter(|&n| m.zone_of[n] == zone).count() >= m.zone_hi[zone] {
            return false;
        }
        let open = m.r.saturating_sub(staying().count() + 1);
        m.zone_deficit(staying().chain(std::iter::once(add))) <= open
    }

    /// Step 2: drop what breaks the zone bounds or cannot be completed
    /// within them, lowest scores first. Without zones this only trims
    /// partitions with more than `r` replicas.
    fn drop_invalid(&mut self) {
        let m = self.members;
        for p in 0..self.assign.len() {
            loop {
                let over = self.assign[p]
                    .iter()
                    .copied()
                    .filter(|&n| self.zone_count(p, m.zone_of[n]) > m.zone_hi[m.zone_of[n]]);
                let Some(victim) = self.weakest(p, over) else {
                    break;
                };
                self.remove(p, victim);
            }
            // Too many replicas, or too many in zones above their minimum
            // to leave room for the zones below theirs. Some replica is in a
            // zone above its minimum then, since the minimums add up to
            // less than r.
            while self.assign[p].len() + m.zone_deficit(self.assign[p].iter().copied()) > m.r {
                let trimmable = self.assign[p]
                    .iter()
                    .copied()
                    .filter(|&n| self.zone_count(p, m.zone_of[n]) > m.zone_lo[m.zone_of[n]]);
                let Some(victim) = self.weakest(p, trimmable) else {
                    break;
                };
                self.remove(p, victim);
            }
        }
    }

    fn count(&self, node: usize) -> usize {
        self.held[node].len()
    }

    fn under_quota(&self, node: usize) -> bool {
        self.count(node) < self.quota[node]
    }

    fn remove(&mut self, partition: usize, node: usize) {
        self.assign[partition].retain(|&n| n != node);
        self.held[node].retain(|&p| p != partition);
    }

    /// Puts `node` into `partition`, in place of `leaving` if given.
    fn put(&mut self, partition: usize, leaving: Option<usize>, node: usize) {
        let replicas = &mut self.assign[partition];
        match leaving.and_then(|l| replicas.iter().position(|&n| n == l)) {
            Some(i) => replicas[i] = node,
            None => replicas.push(node),
        }
        if let Some(l) = leaving {
            self.held[l].retain(|&p| p != partition);
        }
        if let Err(i) = self.held[node].binary_search(&partition) {
            self.held[node].insert(i, partition);
        }
    }

    /// The node `partition` prefers for a slot (empty, or held by
    /// `leaving`) among those `eligible` allows.
    fn best_taker(
        &mut self,
        partition: usize,
        leaving: Option<usize>,
        eligible: impl Fn(&Self, usize) -> bool,
    ) -> Option<usize> {
        let order = self.preference(partition);
        order.iter().copied().find(|&n| {
            Some(n) != leaving
                && !self.assign[partition].contains(&n)
                && eligible(self, n)
                && self.fits(partition, leaving, n)
        })
    }

    /// Step 3: fill every partition up to `r` replicas.
    fn fill(&mut self) {
        let r = self.members.r;
        let partitions = self.assign.len();
        // Round robin, so that no partition is last to choose every time.
        let mut stuck = vec![false; partitions];
        loop {
            let mut progress = false;
            for (p, stuck) in stuck.iter_mut().enumerate() {
                if *stuck || self.assign[p].len() >= r {
                    continue;
                }
                match self.best_taker(p, None, |s, n| s.under_quota(n)) {
                    Some(n) => {
                        self.put(p, None, n);
                        progress = true;
                    }
                    None => *stuck = true,
                }
            }
            if !progress {
                break;
            }
        }
        for p in 0..partitions {
            while self.assign[p].len() < r {
                let empty = Slot {
                    partition: p,
                    leaving: None,
                    parent: None,
                };
                if self.augment(vec![empty], Through::Gained) {
                    continue;
                }
                // Zone bounds before quotas: take the best node over quota.
                // There is one, since the bounds are reachable (step 2).
                let Some(n) = self.best_taker(p, None, |_, _| true) else {
                    break;
                };
                self.put(p, None, n);
            }
        }
    }

    /// Step 4: hand slots of nodes over quota to nodes under quota, until
    /// no hand-over is possible.
    fn hand_over(&mut self) {
        loop {
            if !(0..self.members.len()).any(|n| self.under_quota(n)) {
                return;
            }
            let mut progress = false;
            for node in 0..self.members.len() {
                while self.count(node) > self.quota[node] {
                    let members = self.members;
                    let mut held: Vec<(f64, usize)> = self.held[node]
                        .iter()
                        .map(|&p| (members.score(node, p), p))
                        .collect();
                    // Lowest score first: the slots the node cares least about.
                    held.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    let starts = held
                        .into_iter()
                        .map(|(_, p)| Slot {
                            partition: p,
                            leaving: Some(node),
                            parent: None,
                        })
                        .collect::<Vec<Slot>>();
                    // A chain through kept replicas moves more data: only
                    // when there is no other way to reach the quotas.
                    if !self.augment(starts.clone(), Through::Gained)
                        && !self.augment(starts, Through::Any)
                    {
                        break;
                    }
                    progress = true;
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Breadth-first search for a chain that hands one of `starts` to a node
    /// under quota: the slot goes to a node n1 that fits; if n1 is not under
    /// quota it gives up another slot to n2, and so on. Only the taker at
    /// the end gains a slot overall and the node leaving the first slot (if
    /// any) loses one. With `Through::Gained` an intermediate node gives up
    /// a slot it gained in this call, or any slot if it returns to a
    /// partition it held before, so the chain moves no more data than the
    /// last hand-over. With `Through::Any` each kept slot given up for a new
    /// one is one more move; breadth first finds the shortest chain.
    /// Applies the chain if found.
    fn augment(&mut self, starts: Vec<Slot>, through: Through) -> bool {
        let mut slots = starts;
        // Per node: 0 not expanded, 1 its gained slots queued, 2 all queued.
        let mut expanded = vec![0u8; self.members.len()];
        let mut next = 0;
        while next < slots.len() {
            let at = next;
            next += 1;
            let (partition, leaving) = (slots[at].partition, slots[at].leaving);
            let order = self.preference(partition);
            for &taker in order.iter() {
                if Some(taker) == leaving || self.assign[partition].contains(&taker) {
                    continue;
                }
                let under = self.under_quota(taker);
                // A node returning to a partition it held before moves no
                // data, so it may give up a kept slot in exchange.
                let wide = through == Through::Any || self.before[partition].contains(&taker);
                let level = if wide { 2 } else { 1 };
                let queued = expanded[taker];
                // Checked before `fits`, which costs more: most candidates
                // of a long search are nodes already expanded.
                if (!under && queued >= level) || !self.fits(partition, leaving, taker) {
                    continue;
                }
                if under {
                    self.apply(&slots, at, taker);
                    return true;
                }
                expanded[taker] = level;
                for i in 0..self.held[taker].len() {
                    let q = self.held[taker][i];
                    let gained = !self.before[q].contains(&taker);
                    let movable = (wide || gained) && !(queued == 1 && gained);
                    if movable && !on_chain(&slots, at, q) {
                        slots.push(Slot {
                            partition: q,
                            leaving: Some(taker),
                            parent: Some(at),
                        });
                    }
                }
            }
        }
        false
    }

    /// Gives slot `at` to `taker`, then each earlier slot of the chain to
    /// the node that left the later one.
    fn apply(&mut self, slots: &[Slot], mut at: usize, mut taker: usize) {
        loop {
            let slot = &slots[at];
            self.put(slot.partition, slot.leaving, taker);
            match (slot.parent, slot.leaving) {
                (Some(parent), Some(leaving)) => {
                    at = parent;
                    taker = leaving;
                }
                _ => return,
            }
        }
    }
}

/// Whether `partition` is already on the chain ending at slot `at`: each
/// partition may change once per chain, so the fit checks stay valid.
fn on_chain(slots: &[Slot], mut at: usize, partition: usize) -> bool {
    loop {
        if slots[at].partition == partition {
            return true;
        }
        match slots[at].parent {
            Some(parent) => at = parent,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `n` nodes of capacity 1 with ids that are not in hash order.
    fn equal(n: u64) -> Vec<NodeSpec> {
        (1..=n)
            .map(|i| NodeSpec::new(NodeId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)), 1))
            .collect()
    }

    fn replicas_per_partition(replicas: u8, nodes: &[NodeSpec]) -> usize {
        let eligible: BTreeSet<NodeId> = nodes
            .iter()
            .filter(|s| s.capacity > 0)
            .map(|s| s.id)
            .collect();
        usize::from(replicas).min(eligible.len())
    }

    /// Invariants 1 and 2 of the module doc, checked without the planner:
    /// `r` distinct eligible nodes per partition, and zones as even as the
    /// zone sizes allow (no replica could move to another zone and make the
    /// spread more even).
    fn check_complete(layout: &Layout, nodes: &[NodeSpec]) {
        let members = Members::new(layout.replicas, nodes);
        let r = replicas_per_partition(layout.replicas, nodes);
        for p in 0..layout.partitions() {
            let replicas = layout.replicas(p);
            assert_eq!(replicas.len(), r, "partition {p}: {replicas:?}");
            let set: BTreeSet<NodeId> = replicas.iter().copied().collect();
            assert_eq!(set.len(), r, "partition {p} repeats a node");
            let mut per_zone = vec![0usize; members.zones.len()];
            for node in replicas {
                let i = members
                    .ids
                    .binary_search(node)
                    .expect("replica is an eligible member");
                per_zone[members.zone_of[i]] += 1;
            }
            for (y, &ny) in per_zone.iter().enumerate() {
                for (z, &nz) in per_zone.iter().enumerate() {
                    let z_full = nz == members.zones[z].len();
                    assert!(
                        ny <= nz + 1 || z_full,
                        "partition {p}: zone {y} has {ny}, zone {z} only {nz}"
                    );
                }
            }
        }
    }

    fn moved(changes: &[PartitionChange]) -> usize {
        changes.iter().map(|c| c.gained.len()).sum()
    }

    fn gainers(changes: &[PartitionChange]) -> BTreeSet<NodeId> {
        changes
            .iter()
            .flat_map(|c| c.gained.iter().copied())
            .collect()
    }

    /// Quotas without the zeros, to compare with `slot_counts`.
    fn positive(quotas: BTreeMap<NodeId, usize>) -> BTreeMap<NodeId, usize> {
        quotas.into_iter().filter(|&(_, q)| q > 0).collect()
    }

    fn assert_within_one(layout: &Layout, nodes: &[NodeSpec]) {
        let counts = layout.slot_counts();
        for (node, quota) in Layout::quotas(layout.partitions(), layout.replicas, nodes) {
            let count = counts.get(&node).copied().unwrap_or(0);
            assert!(
                count.abs_diff(quota) <= 1,
                "node {node}: {count} slots, quota {quota}"
            );
        }
    }

    #[test]
    fn empty_layout_holds_nothing() {
        let layout = Layout::empty(16, 3);
        assert_eq!(
            (
                layout.version(),
                layout.partitions(),
                layout.replication_factor()
            ),
            (0, 16, 3)
        );
        assert!(layout.replicas(0).is_empty() && layout.replicas(999).is_empty());
        assert!(layout.nodes().is_empty());
        assert_eq!(layout.validate(16), Ok(()));
        let next = layout.next(&[]);
        assert_eq!(next.version(), 1);
        assert!(next.nodes().is_empty() && layout.changes_to(&next).is_empty());
    }

    #[test]
    fn initial_layout_is_complete_and_balanced() {
        for n in [1, 2, 3, 4, 5, 7, 10, 33] {
            let nodes = equal(n);
            let layout = Layout::empty(256, 3).next(&nodes);
            check_complete(&layout, &nodes);
            assert_within_one(&layout, &nodes);
            let counts = layout.slot_counts();
            assert_eq!(
                counts,
                Layout::quotas(256, 3, &nodes),
                "{n} nodes reach their quotas exactly"
            );
        }
    }

    #[test]
    fn join_moves_only_to_the_new_node() {
        let five = equal(5);
        let six = equal(6);
        let new = six[5].id;
        let before = Layout::empty(256, 3).next(&five);
        let after = before.next(&six);
        check_complete(&after, &six);
        let changes = before.changes_to(&after);
        for change in &changes {
            assert_eq!(change.gained, vec![new], "partition {}", change.partition);
            assert_eq!(change.lost.len(), 1);
        }
        assert_eq!(gainers(&changes), BTreeSet::from([new]));
        let ideal = Layout::quotas(256, 3, &six)[&new];
        let ratio = moved(&changes) as f64 / ideal as f64;
        println!(
            "join 5 -> 6: moved {} slots, ideal {ideal}, ratio {ratio}",
            moved(&changes)
        );
        assert!(ratio <= 1.05, "ratio {ratio}");
        assert_eq!(after.slot_counts(), Layout::quotas(256, 3, &six));
    }

    #[test]
    fn leave_changes_only_the_partitions_of_the_leaver() {
        let six = equal(6);
        let gone = six[2].id;
        let five: Vec<NodeSpec> = six.iter().filter(|s| s.id != gone).cloned().collect();
        let before = Layout::empty(256, 3).next(&six);
        let after = before.next(&five);
        check_complete(&after, &five);
        let changes = before.changes_to(&after);
        assert_eq!(changes.len(), before.partitions_of(gone).len());
        for change in &changes {
            assert!(before.holds(gone, change.partition));
            assert_eq!(change.lost, vec![gone]);
            assert_eq!(change.gained.len(), 1);
        }
        assert_eq!(after.slot_counts(), Layout::quotas(256, 3, &five));
    }

    #[test]
    fn doubling_a_capacity_moves_slots_only_to_that_node() {
        // With 5 nodes the doubled node's share is every partition.
        for n in [4, 5, 6, 9] {
            let nodes = equal(n);
            let before = Layout::empty(256, 3).next(&nodes);
            let mut doubled = nodes.clone();
            doubled[1].capacity = 2;
            let big = doubled[1].id;
            let after = before.next(&doubled);
            check_complete(&after, &doubled);
            let changes = before.changes_to(&after);
            assert_eq!(gainers(&changes), BTreeSet::from([big]), "{n} nodes");
            let quota = Layout::quotas(256, 3, &doubled)[&big];
            assert!(after.slot_counts()[&big].abs_diff(quota) <= 1);
            assert_eq!(moved(&changes), quota - before.slot_counts()[&big]);
        }
    }

    #[test]
    fn capacity_zero_drains_a_node() {
        let mut nodes = equal(5);
        let before = Layout::empty(64, 3).next(&nodes);
        nodes[0].capacity = 0;
        let drained = nodes[0].id;
        let after = before.next(&nodes);
        assert!(after.partitions_of(drained).is_empty());
        assert!(!after.nodes().contains(&drained));
        check_complete(&after, &nodes);
        assert_eq!(Layout::quotas(64, 3, &nodes)[&drained], 0);
        for change in before.changes_to(&after) {
            assert_eq!(change.lost, vec![drained]);
        }
    }

    fn zoned(sizes: &[usize]) -> Vec<NodeSpec> {
        let mut nodes = Vec::new();
        for (z, &size) in sizes.iter().enumerate() {
            for i in 0..size {
                let id = NodeId((z * 100 + i + 1) as u64);
                nodes.push(NodeSpec::new(id, 1).with_zone(format!("zone-{z}")));
            }
        }
        nodes
    }

    fn zones_of(layout: &Layout, nodes: &[NodeSpec], partition: u16) -> Vec<String> {
        let mut zones: Vec<String> = layout
            .replicas(partition)
            .iter()
            .map(|id| {
                nodes
                    .iter()
                    .find(|s| s.id == *id)
                    .and_then(|s| s.zone.clone())
                    .unwrap_or_default()
            })
            .collect();
        zones.sort();
        zones
    }

    #[test]
    fn three_zones_get_one_replica_each() {
        for sizes in [[2, 2, 2], [2, 3, 4], [1, 5, 5]] {
            let nodes = zoned(&sizes);
            let layout = Layout::empty(256, 3).next(&nodes);
            check_complete(&layout, &nodes);
            for p in 0..256 {
                assert_eq!(
                    zones_of(&layout, &nodes, p),
                    ["zone-0", "zone-1", "zone-2"],
                    "{sizes:?}"
                );
            }
            // Quotas follow the zones: each zone holds every partition once.
            assert_eq!(
                layout.slot_counts(),
                Layout::quotas(256, 3, &nodes),
                "{sizes:?}"
            );
            assert!(layout.changes_to(&layout.next(&nodes)).is_empty());
        }
    }

    #[test]
    fn two_zones_are_both_used() {
        for sizes in [[3, 3], [2, 5], [1, 4]] {
            let nodes = zoned(&sizes);
            let layout = Layout::empty(256, 3).next(&nodes);
            check_complete(&layout, &nodes);
            for p in 0..256 {
                let zones: BTreeSet<String> = zones_of(&layout, &nodes, p).into_iter().collect();
                assert_eq!(zones.len(), 2, "{sizes:?} partition {p}");
            }
            assert!(layout.changes_to(&layout.next(&nodes)).is_empty());
        }
    }

    #[test]
    fn adding_zones_to_a_layout_spreads_it() {
        let plain = equal(6);
        let before = Layout::empty(128, 3).next(&plain);
        let zoned: Vec<NodeSpec> = plain
            .iter()
            .enumerate()
            .map(|(i, s)| s.clone().with_zone(format!("z{}", i % 3)))
            .collect();
        let after = before.next(&zoned);
        check_complete(&after, &zoned);
        for p in 0..128 {
            let zones: BTreeSet<String> = zones_of(&after, &zoned, p).into_iter().collect();
            assert_eq!(zones.len(), 3);
        }
    }

    #[test]
    fn input_order_does_not_matter_and_next_is_idempotent() {
        let mut nodes = equal(7);
        nodes[3].capacity = 3;
        nodes[5] = nodes[5].clone().with_zone("a");
        let layout = Layout::empty(256, 3).next(&nodes);
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        shuffled.rotate_left(3);
        assert_eq!(Layout::empty(256, 3).next(&shuffled), layout);
        let again = layout.next(&shuffled);
        assert_eq!(again.version(), layout.version() + 1);
        assert!(layout.changes_to(&again).is_empty());
        assert_eq!(again.assignment, layout.assignment);
    }

    #[test]
    fn duplicate_specs_count_once() {
        let mut nodes = equal(4);
        nodes.push(NodeSpec::new(nodes[0].id, 5));
        let mut reversed = nodes.clone();
        reversed.reverse();
        let layout = Layout::empty(64, 3).next(&nodes);
        assert_eq!(layout, Layout::empty(64, 3).next(&reversed));
        assert_eq!(Layout::quotas(64, 3, &nodes).len(), 4);
        check_complete(&layout, &nodes);
    }

    #[test]
    fn changes_to_reports_gains_and_losses() {
        let (a, b, c, d) = (NodeId(1), NodeId(2), NodeId(3), NodeId(4));
        let old = Layout {
            version: 1,
            replicas: 2,
            assignment: vec![vec![a, b], vec![a, c], vec![], vec![d]],
        };
        let new = Layout {
            version: 2,
            replicas: 2,
            assignment: vec![vec![b, a], vec![d, c], vec![a, b], vec![]],
        };
        assert_eq!(
            old.changes_to(&new),
            vec![
                PartitionChange {
                    partition: 1,
                    gained: vec![d],
                    lost: vec![a]
                },
                PartitionChange {
                    partition: 2,
                    gained: vec![a, b],
                    lost: vec![]
                },
                PartitionChange {
                    partition: 3,
                    gained: vec![],
                    lost: vec![d]
                },
            ]
        );
        assert!(new.changes_to(&new).is_empty());
        assert_eq!(old.partitions_of(a), vec![0, 1]);
        assert_eq!(old.nodes(), vec![a, b, c, d]);
        assert!(old.holds(c, 1) && !old.holds(c, 0) && !old.holds(c, 77));
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let (a, b) = (NodeId(1), NodeId(2));
        let layout = Layout {
            version: 3,
            replicas: 2,
            assignment: vec![vec![a, b], vec![b]],
        };
        assert_eq!(layout.validate(2), Ok(()));
        assert_eq!(
            layout.validate(3),
            Err(LayoutError::PartitionCount {
                expected: 3,
                found: 2
            })
        );
        let dup = Layout {
            version: 3,
            replicas: 2,
            assignment: vec![vec![a], vec![b, b]],
        };
        assert_eq!(
            dup.validate(2),
            Err(LayoutError::DuplicateReplica {
                partition: 1,
                node: b
            })
        );
        let many = Layout {
            version: 3,
            replicas: 2,
            assignment: vec![vec![a, b, NodeId(3)], vec![]],
        };
        assert_eq!(
            many.validate(2),
            Err(LayoutError::TooManyReplicas {
                partition: 0,
                found: 3,
                max: 2
            })
        );
        let zero = Layout {
            version: 3,
            replicas: 0,
            assignment: vec![vec![], vec![]],
        };
        assert_eq!(zero.validate(2), Err(LayoutError::ZeroReplicationFactor));
        // `next` repairs what it can of an invalid layout instead of panicking.
        let nodes = [NodeSpec::new(a, 1), NodeSpec::new(b, 1)];
        let repaired = many.next(&nodes);
        assert_eq!(repaired.validate(2), Ok(()));
        check_complete(&repaired, &nodes);
    }

    #[test]
    fn layouts_round_trip_through_postcard() {
        let layout = Layout::empty(32, 3).next(&equal(4));
        let bytes = postcard::to_allocvec(&layout).expect("encode");
        let back: Layout = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, layout);
    }

    #[test]
    fn quotas_follow_capacity() {
        let mut nodes = equal(6);
        nodes[0].capacity = 2;
        let quotas = Layout::quotas(70, 3, &nodes);
        // 210 slots, weights 2:1:1:1:1:1.
        assert_eq!(quotas[&nodes[0].id], 60);
        assert!(nodes[1..].iter().all(|s| quotas[&s.id] == 30));
        let mut nodes = equal(4);
        // A share above one replica per partition is capped and the rest
        // shared: weights 10:1:1:1 want 230 of 300, the node can hold 100.
        nodes[0].capacity = 10;
        let quotas = Layout::quotas(100, 3, &nodes);
        assert_eq!(quotas[&nodes[0].id], 100);
        assert_eq!(quotas.values().sum::<usize>(), 300);
        assert!(nodes[1..].iter().all(|s| quotas[&s.id].abs_diff(67) <= 1));
        // Remainders go to the smaller ids: 10 slots among 3 equal nodes.
        let three = [
            NodeSpec::new(NodeId(9), 1),
            NodeSpec::new(NodeId(3), 1),
            NodeSpec::new(NodeId(5), 1),
        ];
        let quotas = Layout::quotas(10, 1, &three);
        assert_eq!(
            quotas.into_iter().collect::<Vec<_>>(),
            vec![(NodeId(3), 4), (NodeId(5), 3), (NodeId(9), 3)]
        );
        assert!(Layout::quotas(10, 3, &[]).is_empty());
    }

    #[test]
    fn portable_ln_matches_std() {
        let mut x = 1e-16;
        while x < 1.0 {
            let (ours, std) = (ln_unit(x), x.ln());
            assert!(
                (ours - std).abs() <= 4.0 * f64::EPSILON * std.abs().max(1e-300),
                "{x}: {ours} vs {std}"
            );
            x *= 1.013;
        }
        let near_one = 1.0 - f64::EPSILON / 2.0;
        assert!(ln_unit(near_one) < 0.0);
    }

    #[test]
    fn a_thousand_nodes() {
        let nodes = equal(1000);
        let start = std::time::Instant::now();
        let layout = Layout::empty(256, 3).next(&nodes);
        let first = start.elapsed();
        check_complete(&layout, &nodes);
        assert_eq!(layout.slot_counts().len(), 768);
        let joined = equal(1001);
        let start = std::time::Instant::now();
        let after = layout.next(&joined);
        let join = start.elapsed();
        check_complete(&after, &joined);
        let changes = layout.changes_to(&after);
        println!(
            "1000 nodes: first layout {first:?}, join {join:?}, moved {}",
            moved(&changes)
        );
        assert!(moved(&changes) <= 1);
    }

    /// The fewest replicas that must move from `before` to any layout
    /// (without zones) where every node holds its quota: a min-cost flow
    /// source -> partition (r) -> node (1, cost 0 if it held the partition
    /// else 1) -> sink (quota), by successive shortest paths.
    fn fewest_moves(before: &Layout, quotas: &BTreeMap<NodeId, usize>, r: usize) -> usize {
        struct Edge {
            to: usize,
            cap: i64,
            cost: i64,
        }
        let nodes: Vec<NodeId> = quotas.keys().copied().collect();
        let partitions = usize::from(before.partitions());
        let (source, sink) = (partitions + nodes.len(), partitions + nodes.len() + 1);
        let mut edges: Vec<Edge> = Vec::new();
        let mut out: Vec<Vec<usize>> = vec![Vec::new(); sink + 1];
        let mut add = |from: usize, to: usize, cap: usize, cost: i64| {
            out[from].push(edges.len());
            edges.push(Edge {
                to,
                cap: cap as i64,
                cost,
            });
            out[to].push(edges.len());
            edges.push(Edge {
                to: from,
                cap: 0,
                cost: -cost,
            });
        };
        for p in 0..partitions {
            add(source, p, r, 0);
        }
        for (j, node) in nodes.iter().enumerate() {
            add(partitions + j, sink, quotas[node], 0);
            for p in 0..partitions {
                add(
                    p,
                    partitions + j,
                    1,
                    i64::from(!before.holds(*node, p as u16)),
                );
            }
        }
        let (mut flow, mut cost) = (0, 0);
        loop {
            // Bellman-Ford: residual costs can be negative.
            let mut dist = vec![i64::MAX; sink + 1];
            let mut via = vec![usize::MAX; sink + 1];
            dist[source] = 0;
            let mut changed = true;
            while changed {
                changed = false;
                for u in 0..=sink {
                    if dist[u] == i64::MAX {
                        continue;
                    }
                    for &e in &out[u] {
                        let Edge { to, cap, cost } = edges[e];
                        if cap > 0 && dist[u] + cost < dist[to] {
                            dist[to] = dist[u] + cost;
                            via[to] = e;
                            changed = true;
                        }
                    }
                }
            }
            if dist[sink] == i64::MAX {
                break;
            }
            let mut v = sink;
            while v != source {
                let e = via[v];
                edges[e].cap -= 1;
                edges[e ^ 1].cap += 1;
                v = edges[e ^ 1].to;
            }
            flow += 1;
            cost += dist[sink];
        }
        assert_eq!(flow, partitions * r, "the quotas are reachable");
        cost as usize
    }

    /// Members drawn from a small id space so that sets overlap between steps.
    fn arb_nodes() -> impl Strategy<Value = Vec<NodeSpec>> {
        let spec = (0u64..24, 0u32..4, proptest::option::weighted(0.5, 0u8..4)).prop_map(
            |(id, capacity, zone)| NodeSpec {
                id: NodeId(id),
                capacity,
                zone: zone.map(|z| format!("z{z}")),
            },
        );
        proptest::collection::vec(spec, 0..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn every_layout_keeps_the_invariants(
            partitions in 1u16..48,
            replicas in 1u8..5,
            steps in proptest::collection::vec(arb_nodes(), 1..5),
            rotate in 0usize..12,
        ) {
            let mut layout = Layout::empty(partitions, replicas);
            for nodes in &steps {
                let next = layout.next(nodes);
                prop_assert_eq!(next.validate(partitions), Ok(()));
                check_complete(&next, nodes);
                if layout.version() == 0 {
                    assert_within_one(&next, nodes);
                }
                let mut shuffled = nodes.clone();
                shuffled.reverse();
                if !shuffled.is_empty() {
                    let k = rotate % shuffled.len();
                    shuffled.rotate_left(k);
                }
                prop_assert_eq!(&layout.next(&shuffled), &next);
                let again = next.next(&shuffled);
                prop_assert!(next.changes_to(&again).is_empty());
                let quotas = Layout::quotas(partitions, replicas, nodes);
                let r = replicas_per_partition(replicas, nodes);
                prop_assert_eq!(quotas.values().sum::<usize>(), usize::from(partitions) * r);
                prop_assert!(quotas.values().all(|&q| q <= usize::from(partitions)));
                layout = next;
            }
        }

        /// Without zones every node reaches its quota, and the moves are
        /// within one of the fewest that reach the quotas (an exact
        /// min-cost flow). Measured over 120,000 random steps: above the
        /// optimum in about 0.1% of leaves and never by more than one.
        #[test]
        fn moves_are_near_the_optimum_without_zones(
            partitions in 1u16..24,
            replicas in 1u8..5,
            steps in proptest::collection::vec(arb_nodes(), 1..4),
        ) {
            let mut layout = Layout::empty(partitions, replicas);
            for nodes in &steps {
                let nodes: Vec<NodeSpec> =
                    nodes.iter().map(|s| NodeSpec { zone: None, ..s.clone() }).collect();
                let next = layout.next(&nodes);
                let quotas = Layout::quotas(partitions, replicas, &nodes);
                prop_assert_eq!(next.slot_counts(), positive(quotas.clone()));
                let best = fewest_moves(&layout, &quotas, replicas_per_partition(replicas, &nodes));
                let moved = moved(&layout.changes_to(&next));
                prop_assert!(best <= moved && moved <= best + 1, "moved {} of at best {}", moved, best);
                layout = next;
            }
        }
    }
}
