//! A stored entry: one key's CRDT value(s) and its causal context.
//!
//! An entry is the product of one optional component per value kind (a
//! multi-value register, a last-writer-wins register, a PN-counter and an
//! observed-remove set, all from the `crdts` crate) plus the key's causal
//! context. Merging merges component-wise and joins the contexts, so the laws
//! hold because they hold for each component: merge is commutative,
//! associative and idempotent.
//!
//! A key holds one kind: a local write of another kind is refused. Two
//! replicas that create the same key concurrently as different kinds end up
//! with both components after they sync; nothing is dropped, and a read shows
//! the first in [`ValueKind`] order with the others beside it.
//!
//! Invariants (checked by [`Entry::validate`] on anything read from disk or
//! received from a peer):
//! - the context is non-empty and holds no zero counter;
//! - every register sibling's clock is non-empty and covered by the context;
//! - every set add dot is covered by the context.
//!
//! The highest dot of each node in the context names the entry in the
//! change index. A store that has incorporated all of those writes has a
//! state at least as new as this entry (each such write was made on top of
//! its node's whole state of the key, and entries move whole), which is what
//! lets sync send an entry only when one of those dots is missing.

use super::{CausalContext, Dot, HlcTimestamp, NodeId};
use crdts::ctx::AddCtx;
use crdts::{CmRDT, CvRDT, LWWReg, Orswot, PNCounter, VClock};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Version byte in front of every encoded entry.
pub(crate) const ENTRY_FORMAT: u8 = 1;
/// The version of an entry that devices pushed writes to: format 1's
/// fields, then the devices' applied sequences. Entries no device wrote
/// keep format 1, byte for byte.
pub(crate) const ENTRY_FORMAT_DEVICES: u8 = 2;

/// A register sibling or LWW value: `None` is a delete (tombstone).
type Slot = Option<Vec<u8>>;

/// The kinds of value a key can hold.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ValueKind {
    /// Multi-value register: concurrent writes are kept as siblings.
    Register,
    /// Last-writer-wins register ordered by hybrid logical clock.
    Lww,
    /// PN-counter.
    Counter,
    /// Observed-remove set of byte strings.
    Set,
}

impl ValueKind {
    /// Every kind, in the order reads report them.
    pub const ALL: [ValueKind; 4] = [
        ValueKind::Register,
        ValueKind::Lww,
        ValueKind::Counter,
        ValueKind::Set,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ValueKind::Register => "register",
            ValueKind::Lww => "lww",
            ValueKind::Counter => "counter",
            ValueKind::Set => "set",
        }
    }
}

impl fmt::Display for ValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A value as read.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Value {
    /// The register's siblings: one value unless writes were concurrent.
    /// Sorted and without duplicates.
    Register(Vec<Vec<u8>>),
    Lww(Vec<u8>),
    Counter(i64),
    /// The set's members, sorted.
    Set(Vec<Vec<u8>>),
}

impl Value {
    pub fn kind(&self) -> ValueKind {
        match self {
            Value::Register(_) => ValueKind::Register,
            Value::Lww(_) => ValueKind::Lww,
            Value::Counter(_) => ValueKind::Counter,
            Value::Set(_) => ValueKind::Set,
        }
    }
}

/// What a read returns for a live key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub value: Value,
    /// Hand this back with the next write to supersede what was read.
    pub context: CausalContext,
    /// Values of other kinds, present only when replicas created the key
    /// concurrently as different kinds. Normally empty.
    pub other_kinds: Vec<Value>,
}

/// Order of LWW writes: hybrid logical time, then node id to break ties.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub(crate) struct LwwMarker {
    pub(crate) time: HlcTimestamp,
    pub(crate) node: NodeId,
}

/// Why an entry could not be decoded or failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EntryError {
    #[error("empty entry")]
    Empty,
    #[error("entry format version {0} is not supported (expected {ENTRY_FORMAT} or {ENTRY_FORMAT_DEVICES})")]
    Format(u8),
    #[error("undecodable entry: {0}")]
    Decode(String),
    #[error("invalid entry: {0}")]
    Invalid(&'static str),
}

/// Why a local counter add was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CounterOverflow;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) context: CausalContext,
    register: Option<Siblings>,
    #[serde(with = "slot_bytes::lww")]
    lww: Option<LWWReg<Slot, LwwMarker>>,
    // Boxed: they are rare and large, and an entry moves several times on
    // every read.
    counter: Option<Box<PNCounter<NodeId>>>,
    set: Option<Box<Orswot<Vec<u8>, NodeId>>>,
    /// Per device that pushed writes of this key, the highest sequence of
    /// its operations applied (merged by maximum): a push of an operation
    /// at or below it changes nothing, so a retried push applies once.
    /// Encoded after the other fields, under format 2 (see `encode`).
    #[serde(skip)]
    devices: BTreeMap<u64, u64>,
}

impl Entry {
    /// The highest sequence of `device`'s operations applied to this key.
    pub(crate) fn device_seq(&self, device: u64) -> u64 {
        self.devices.get(&device).copied().unwrap_or(0)
    }

    /// Records that `device`'s operation `seq` is applied.
    pub(crate) fn note_device_seq(&mut self, device: u64, seq: u64) {
        let held = self.devices.entry(device).or_insert(0);
        *held = (*held).max(seq);
    }

    fn is_live(&self, kind: ValueKind) -> bool {
        match kind {
            ValueKind::Register => self.register.as_ref().is_some_and(Siblings::is_live),
            ValueKind::Lww => self.lww.as_ref().is_some_and(|l| l.val.is_some()),
            ValueKind::Counter => self.counter.is_some(),
            ValueKind::Set => self.set.is_some(),
        }
    }

    /// The kinds holding a live value, in [`ValueKind`] order. None for a
    /// deleted key (a tombstone).
    pub(crate) fn live_kinds(&self) -> impl Iterator<Item = ValueKind> + '_ {
        ValueKind::ALL.into_iter().filter(|&k| self.is_live(k))
    }

    pub(crate) fn is_tombstone(&self) -> bool {
        self.live_kinds().next().is_none()
    }

    /// A local write of `kind` is allowed unless the key is live as another kind.
    pub(crate) fn check_writable(&self, kind: ValueKind) -> Result<(), ValueKind> {
        match self.live_kinds().next() {
            Some(found) if !self.is_live(kind) => Err(found),
            _ => Ok(()),
        }
    }

    /// The dots that index this entry: the highest of each node.
    pub(crate) fn index_dots(&self) -> Vec<Dot> {
        self.context.dots().collect()
    }

    /// Writes (or, with `None`, deletes) the register. The write supersedes
    /// the siblings `seen` covers; others stay as siblings.
    pub(crate) fn write_register(&mut self, value: Slot, dot: Dot, seen: &CausalContext) {
        self.register
            .get_or_insert_with(Siblings::default)
            .write(dot, value, seen);
        self.context.join(seen);
        self.context.apply(dot);
    }

    /// Writes (or, with `None`, deletes) the LWW register.
    pub(crate) fn write_lww(&mut self, value: Slot, dot: Dot, time: HlcTimestamp) {
        let marker = LwwMarker {
            time,
            node: dot.node,
        };
        match &mut self.lww {
            Some(reg) => reg.update(value, marker),
            None => self.lww = Some(LWWReg { val: value, marker }),
        }
        self.context.apply(dot);
    }

    /// The newest LWW timestamp held, to feed the hybrid clock.
    pub(crate) fn lww_time(&self) -> Option<HlcTimestamp> {
        self.lww.as_ref().map(|l| l.marker.time)
    }

    /// Adds `amount` to the counter. Refused if this node's tally would
    /// overflow or the value would leave the `i64` range.
    pub(crate) fn counter_add(&mut self, amount: i64, dot: Dot) -> Result<i64, CounterOverflow> {
        let counter = self.counter.get_or_insert_with(Default::default);
        let current = i64::try_from(counter.read()).map_err(|_| CounterOverflow)?;
        let new_value = current.checked_add(amount).ok_or(CounterOverflow)?;
        let steps = amount.unsigned_abs();
        // An op of zero steps carries this node's current tally in its dot.
        let op = if amount >= 0 {
            let tally = counter.inc_many(dot.node, 0).dot.counter;
            tally.checked_add(steps).ok_or(CounterOverflow)?;
            counter.inc_many(dot.node, steps)
        } else {
            let tally = counter.dec_many(dot.node, 0).dot.counter;
            tally.checked_add(steps).ok_or(CounterOverflow)?;
            counter.dec_many(dot.node, steps)
        };
        counter.apply(op);
        self.context.apply(dot);
        Ok(new_value)
    }

    pub(crate) fn set_add(&mut self, member: Vec<u8>, dot: Dot) {
        let set = self.set.get_or_insert_with(Default::default);
        let crdt_dot = crdts::Dot::new(dot.node, dot.seq);
        let op = set.add(
            member,
            AddCtx {
                clock: VClock::new(),
                dot: crdt_dot,
            },
        );
        set.apply(op);
        self.context.apply(dot);
    }

    /// Removes the additions of `member` this entry has observed. The remove
    /// gets its own dot in the context so that it replicates like any write.
    pub(crate) fn set_remove(&mut self, member: Vec<u8>, dot: Dot) {
        let set = self.set.get_or_insert_with(Default::default);
        let rm_ctx = set.contains(&member).derive_rm_ctx();
        let op = set.rm(member, rm_ctx);
        set.apply(op);
        self.context.apply(dot);
    }

    /// Merges another replica's state of the same key into this one.
    pub(crate) fn merge(&mut self, other: Entry) {
        match (&mut self.register, other.register) {
            (Some(mine), Some(theirs)) => mine.merge(&self.context, theirs, &other.context),
            (None, Some(theirs)) => {
                // Siblings this entry has seen superseded stay superseded.
                let mut kept = Siblings::default();
                kept.merge(&self.context, theirs, &other.context);
                self.register = Some(kept);
            }
            (_, None) => {}
        }
        // Histories that cannot happen (each side superseding the other's
        // sibling) could leave no sibling; keep the entry well-formed.
        if self.register.as_ref().is_some_and(|r| r.0.is_empty()) {
            self.register = None;
        }
        self.context.join(&other.context);
        merge_option(&mut self.lww, other.lww);
        merge_boxed(&mut self.counter, other.counter);
        merge_boxed(&mut self.set, other.set);
        for (device, seq) in other.devices {
            let held = self.devices.entry(device).or_insert(0);
            *held = (*held).max(seq);
        }
    }

    /// The read view, or `None` for a tombstone.
    pub(crate) fn into_record(mut self) -> Option<Record> {
        // Normally one kind is live: no allocation beyond its value.
        let mut value = None;
        let mut other_kinds = Vec::new();
        for kind in ValueKind::ALL {
            if !self.is_live(kind) {
                continue;
            }
            let v = match kind {
                ValueKind::Register => {
                    let siblings = self.register.take().map(|r| r.0).unwrap_or_default();
                    let mut values = Vec::with_capacity(siblings.len());
                    values.extend(siblings.into_iter().filter_map(|(_, v)| v));
                    if values.len() > 1 {
                        values.sort();
                        values.dedup();
                    }
                    Value::Register(values)
                }
                ValueKind::Lww => {
                    Value::Lww(self.lww.take().and_then(|l| l.val).unwrap_or_default())
                }
                ValueKind::Counter => Value::Counter(self.counter_value()),
                ValueKind::Set => Value::Set(self.members()),
            };
            match value {
                None => value = Some(v),
                Some(_) => other_kinds.push(v),
            }
        }
        Some(Record {
            value: value?,
            context: self.context,
            other_kinds,
        })
    }

    /// The counter's value. Replicas cannot push it out of range through
    /// local adds; a sum of concurrent adds beyond `i64` saturates.
    pub(crate) fn counter_value(&self) -> i64 {
        let Some(counter) = &self.counter else {
            return 0;
        };
        let value = counter.read();
        i64::try_from(&value).unwrap_or(if value.sign() == num_bigint::Sign::Minus {
            i64::MIN
        } else {
            i64::MAX
        })
    }

    pub(crate) fn members(&self) -> Vec<Vec<u8>> {
        let mut members: Vec<Vec<u8>> = self
            .set
            .as_ref()
            .map(|s| s.read().val.into_iter().collect())
            .unwrap_or_default();
        members.sort();
        members
    }

    pub(crate) fn validate(&self) -> Result<(), EntryError> {
        if self.context.is_empty() {
            return Err(EntryError::Invalid("empty causal context"));
        }
        if self.context.dots().any(|d| d.seq == 0) {
            return Err(EntryError::Invalid("zero counter in causal context"));
        }
        if let Some(reg) = &self.register {
            if reg.0.is_empty() {
                return Err(EntryError::Invalid("register without siblings"));
            }
            if !reg.0.windows(2).all(|w| w[0].0 < w[1].0) {
                return Err(EntryError::Invalid("register siblings not sorted by dot"));
            }
            if reg.0.iter().any(|(dot, _)| dot.seq == 0) {
                return Err(EntryError::Invalid("register sibling with sequence 0"));
            }
            if !reg.0.iter().all(|(dot, _)| self.context.covers(*dot)) {
                return Err(EntryError::Invalid(
                    "register sibling not covered by the causal context",
                ));
            }
        }
        if let Some(set) = &self.set {
            if !covered_by(&set.clock(), &self.context.0) {
                return Err(EntryError::Invalid(
                    "set addition not covered by the causal context",
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let devices = Some(&self.devices).filter(|d| !d.is_empty());
        let format = match devices {
            None => ENTRY_FORMAT,
            Some(_) => ENTRY_FORMAT_DEVICES,
        };
        let mut out = vec![format];
        // Serializing plain data into a Vec does not fail.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        if let Some(devices) = devices {
            out.extend(postcard::to_allocvec(devices).unwrap_or_default());
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Entry, EntryError> {
        let (&format, body) = bytes.split_first().ok_or(EntryError::Empty)?;
        if format != ENTRY_FORMAT && format != ENTRY_FORMAT_DEVICES {
            return Err(EntryError::Format(format));
        }
        let (mut entry, mut rest): (Entry, _) =
            postcard::take_from_bytes(body).map_err(|e| EntryError::Decode(e.to_string()))?;
        if format == ENTRY_FORMAT_DEVICES {
            let (devices, after): (BTreeMap<u64, u64>, _) =
                postcard::take_from_bytes(rest).map_err(|e| EntryError::Decode(e.to_string()))?;
            // One encoding per entry: format 2 only with some device.
            if devices.is_empty() {
                return Err(EntryError::Invalid("format 2 entry without devices"));
            }
            entry.devices = devices;
            rest = after;
        }
        if !rest.is_empty() {
            return Err(EntryError::Decode(format!("{} trailing bytes", rest.len())));
        }
        entry.validate()?;
        Ok(entry)
    }
}

/// The register: a dotted version vector set. Each sibling is a write
/// named by its dot; the entry's causal context is the set's causal past.
///
/// A write supersedes exactly the siblings its context covers, and a merge
/// keeps a sibling unless the other side's context covers its dot and the
/// other side no longer holds it (it was superseded there). Comparing dots
/// with contexts, rather than whole clocks as `crdts::MVReg` does, is what
/// keeps a write made through node A with an older context from wiping out
/// A's own concurrent writes.
///
/// Kept sorted by dot, dots unique.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Siblings(#[serde(with = "slot_bytes::siblings")] Vec<(Dot, Slot)>);

impl Siblings {
    fn is_live(&self) -> bool {
        self.0.iter().any(|(_, v)| v.is_some())
    }

    fn write(&mut self, dot: Dot, value: Slot, seen: &CausalContext) {
        self.0.retain(|(d, _)| !seen.covers(*d));
        self.0.push((dot, value));
        self.0.sort_by_key(|(d, _)| *d);
    }

    fn merge(
        &mut self,
        my_context: &CausalContext,
        theirs: Siblings,
        their_context: &CausalContext,
    ) {
        let mine = std::mem::take(&mut self.0);
        let held_by =
            |list: &[(Dot, Slot)], dot: Dot| list.binary_search_by_key(&dot, |(d, _)| *d).is_ok();
        let mut merged: Vec<(Dot, Slot)> = mine
            .iter()
            .filter(|(d, _)| held_by(&theirs.0, *d) || !their_context.covers(*d))
            .cloned()
            .collect();
        merged.extend(
            theirs
                .0
                .into_iter()
                .filter(|(d, _)| !held_by(&mine, *d) && !my_context.covers(*d)),
        );
        merged.sort_by_key(|(d, _)| *d);
        self.0 = merged;
    }
}

/// The encoding of slots. postcard writes a byte string exactly as it
/// writes a sequence of `u8` (a varint length, then the bytes), so these
/// make the same bytes as the derived impls of `Option<Vec<u8>>`, but decode
/// a value with one copy instead of one `u8` at a time (which was most of
/// the cost of decoding an entry).
mod slot_bytes {
    use super::{LWWReg, LwwMarker, Slot};
    use crate::crdt::Dot;
    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;
    use serde::{Deserialize, Serialize};
    use std::fmt;

    struct SlotRef<'a>(&'a Slot);

    impl Serialize for SlotRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            struct Bytes<'a>(&'a [u8]);
            impl Serialize for Bytes<'_> {
                fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_bytes(self.0)
                }
            }
            match self.0 {
                Some(v) => s.serialize_some(&Bytes(v)),
                None => s.serialize_none(),
            }
        }
    }

    struct SlotBuf(Slot);

    impl<'de> Deserialize<'de> for SlotBuf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Buf;
            impl<'de> Visitor<'de> for Buf {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(v.to_vec())
                }
                fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                    Ok(v)
                }
                // Formats that write bytes as a sequence.
                fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<u8>, A::Error> {
                    Vec::<u8>::deserialize(de::value::SeqAccessDeserializer::new(seq))
                }
            }
            struct Opt;
            impl<'de> Visitor<'de> for Opt {
                type Value = Slot;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an optional byte string")
                }
                fn visit_none<E: de::Error>(self) -> Result<Slot, E> {
                    Ok(None)
                }
                fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Slot, D::Error> {
                    d.deserialize_byte_buf(Buf).map(Some)
                }
            }
            d.deserialize_option(Opt).map(SlotBuf)
        }
    }

    /// `Siblings`: a sequence of (dot, slot) pairs.
    pub(super) mod siblings {
        use super::*;

        pub(in crate::crdt) fn serialize<S: Serializer>(
            list: &[(Dot, Slot)],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_seq(list.iter().map(|(dot, slot)| (dot, SlotRef(slot))))
        }

        pub(in crate::crdt) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<(Dot, Slot)>, D::Error> {
            let list = Vec::<(Dot, SlotBuf)>::deserialize(d)?;
            Ok(list.into_iter().map(|(dot, slot)| (dot, slot.0)).collect())
        }
    }

    /// The LWW register: an option of the struct (val, marker), whose fields
    /// postcard writes in order like a tuple's.
    pub(super) mod lww {
        use super::*;

        pub(in crate::crdt) fn serialize<S: Serializer>(
            reg: &Option<LWWReg<Slot, LwwMarker>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            reg.as_ref()
                .map(|r| (SlotRef(&r.val), &r.marker))
                .serialize(s)
        }

        pub(in crate::crdt) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<LWWReg<Slot, LwwMarker>>, D::Error> {
            let reg = Option::<(SlotBuf, LwwMarker)>::deserialize(d)?;
            Ok(reg.map(|(val, marker)| LWWReg { val: val.0, marker }))
        }
    }
}

fn covered_by(clock: &VClock<NodeId>, by: &VClock<NodeId>) -> bool {
    clock.iter().all(|d| by.get(d.actor) >= d.counter)
}

fn merge_option<T: CvRDT>(mine: &mut Option<T>, theirs: Option<T>) {
    match (mine.as_mut(), theirs) {
        (Some(m), Some(t)) => m.merge(t),
        (None, Some(t)) => *mine = Some(t),
        (_, None) => {}
    }
}

fn merge_boxed<T: CvRDT>(mine: &mut Option<Box<T>>, theirs: Option<Box<T>>) {
    match (mine.as_mut(), theirs) {
        (Some(m), Some(t)) => m.merge(*t),
        (None, Some(t)) => *mine = Some(t),
        (_, None) => {}
    }
}

#[cfg(test)]
mod laws {
    //! The CRDT laws for whole entries, on states reached by random
    //! operations on three replicas with random merges between them.
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Put(usize, bool),
        Delete(usize),
        Lww(usize),
        Add(usize, i64),
        SetAdd(usize, u8),
        SetRemove(usize, u8),
        Device(usize, u64, u64),
        Merge(usize, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        let r = 0usize..3;
        prop_oneof![
            (r.clone(), any::<bool>()).prop_map(|(r, blind)| Step::Put(r, blind)),
            r.clone().prop_map(Step::Delete),
            r.clone().prop_map(Step::Lww),
            (r.clone(), -5i64..5).prop_map(|(r, n)| Step::Add(r, n)),
            (r.clone(), 0u8..3).prop_map(|(r, m)| Step::SetAdd(r, m)),
            (r.clone(), 0u8..3).prop_map(|(r, m)| Step::SetRemove(r, m)),
            (r.clone(), 1u64..3, 1u64..5).prop_map(|(r, d, s)| Step::Device(r, d, s)),
            (r.clone(), r).prop_map(|(a, b)| Step::Merge(a, b)),
        ]
    }

    fn replicas(steps: &[Step]) -> [Entry; 3] {
        let mut replicas: [Entry; 3] = Default::default();
        let mut seqs = [0u64; 3];
        let mut time = 0u64;
        for (i, step) in steps.iter().enumerate() {
            let r = match step {
                Step::Merge(a, b) => {
                    let other = replicas[*b].clone();
                    replicas[*a].merge(other);
                    continue;
                }
                Step::Device(r, device, seq) => {
                    replicas[*r].note_device_seq(*device, *seq);
                    continue;
                }
                Step::Put(r, _)
                | Step::Delete(r)
                | Step::Lww(r)
                | Step::Add(r, _)
                | Step::SetAdd(r, _)
                | Step::SetRemove(r, _) => *r,
            };
            seqs[r] += 1;
            time += 1;
            let dot = Dot::new(NodeId(r as u64 + 1), seqs[r]);
            let e = &mut replicas[r];
            match step {
                Step::Put(_, blind) => {
                    let seen = if *blind {
                        CausalContext::new()
                    } else {
                        e.context.clone()
                    };
                    e.write_register(Some(vec![i as u8]), dot, &seen);
                }
                Step::Delete(_) => {
                    let seen = e.context.clone();
                    e.write_register(None, dot, &seen);
                }
                Step::Lww(_) => e.write_lww(Some(vec![i as u8]), dot, HlcTimestamp(time)),
                Step::Add(_, n) => {
                    e.counter_add(*n, dot).unwrap();
                }
                Step::SetAdd(_, m) => e.set_add(vec![*m], dot),
                Step::SetRemove(_, m) => e.set_remove(vec![*m], dot),
                Step::Merge(..) | Step::Device(..) => unreachable!("handled above"),
            }
        }
        replicas
    }

    fn merged(a: &Entry, b: &Entry) -> Entry {
        let mut m = a.clone();
        m.merge(b.clone());
        m
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_and_idempotent(
            steps in proptest::collection::vec(step(), 0..40)
        ) {
            let [a, b, c] = replicas(&steps);
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
            // Merging never loses what either side had.
            let ab = merged(&a, &b);
            prop_assert_eq!(merged(&ab, &a), ab.clone());
            for e in [&a, &b, &c, &ab] {
                if !e.context.is_empty() {
                    prop_assert!(e.validate().is_ok());
                    prop_assert_eq!(&Entry::decode(&e.encode()).unwrap(), e);
                }
                // The encoding is the one the derived impls make, then
                // (format 2) the devices.
                let derived = postcard::to_allocvec(&Derived::from(e)).unwrap();
                let encoded = e.encode();
                prop_assert_eq!(&encoded[1..=derived.len()], &derived[..]);
                let (back, rest): (Derived, _) =
                    postcard::take_from_bytes(&encoded[1..]).unwrap();
                let mut back = back.into_entry();
                if encoded[0] == ENTRY_FORMAT_DEVICES {
                    back.devices = postcard::from_bytes(rest).unwrap();
                } else {
                    prop_assert!(rest.is_empty());
                }
                prop_assert_eq!(&back, e);
            }
        }
    }

    /// `Entry` with the derived encoding of every field, as it was before
    /// slots were decoded as byte strings: the file format they must keep.
    #[derive(Serialize, Deserialize)]
    struct Derived {
        context: CausalContext,
        register: Option<Vec<(Dot, Slot)>>,
        lww: Option<LWWReg<Slot, LwwMarker>>,
        counter: Option<PNCounter<NodeId>>,
        set: Option<Orswot<Vec<u8>, NodeId>>,
    }

    impl From<&Entry> for Derived {
        fn from(e: &Entry) -> Self {
            let e = e.clone();
            Derived {
                context: e.context,
                register: e.register.map(|r| r.0),
                lww: e.lww,
                counter: e.counter.map(|c| *c),
                set: e.set.map(|s| *s),
            }
        }
    }

    impl Derived {
        fn into_entry(self) -> Entry {
            Entry {
                context: self.context,
                register: self.register.map(Siblings),
                lww: self.lww,
                counter: self.counter.map(Box::new),
                set: self.set.map(Box::new),
                devices: BTreeMap::new(),
            }
        }
    }

    #[test]
    fn the_encoding_is_pinned() {
        let mut e = Entry::default();
        e.write_register(
            Some(b"ab".to_vec()),
            Dot::new(NodeId(1), 1),
            &CausalContext::new(),
        );
        e.write_register(None, Dot::new(NodeId(2), 1), &CausalContext::new());
        // format; context {1: 1, 2: 1}; register: two siblings, (1:1, "ab")
        // and (2:1, deleted); no lww, counter or set.
        let register = [
            1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 1, 2, b'a', b'b', 2, 1, 0, 0, 0, 0,
        ];
        assert_eq!(e.encode(), register);
        assert_eq!(Entry::decode(&register).unwrap(), e);
        let mut e = Entry::default();
        e.write_lww(Some(b"x".to_vec()), Dot::new(NodeId(1), 2), HlcTimestamp(5));
        // format; context {1: 2}; no register; lww "x" at time 5 by node 1.
        let lww = [1, 1, 1, 2, 0, 1, 1, 1, b'x', 5, 1, 0, 0];
        assert_eq!(e.encode(), lww);
        assert_eq!(Entry::decode(&lww).unwrap(), e);
        // A device's applied sequence: format 2, format 1's bytes, then
        // the devices {7: 3}.
        e.note_device_seq(7, 3);
        let mut pushed = lww.to_vec();
        pushed[0] = ENTRY_FORMAT_DEVICES;
        pushed.extend([1, 7, 3]);
        assert_eq!(e.encode(), pushed);
        assert_eq!(Entry::decode(&pushed).unwrap(), e);
        let mut no_devices = lww.to_vec();
        no_devices[0] = ENTRY_FORMAT_DEVICES;
        no_devices.push(0);
        assert!(matches!(
            Entry::decode(&no_devices),
            Err(EntryError::Invalid(_))
        ));
        // A value cut short is an error, whatever length it claims.
        assert!(matches!(
            Entry::decode(&register[..13]),
            Err(EntryError::Decode(_))
        ));
        let mut huge = lww.to_vec();
        huge.splice(7..9, [0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(Entry::decode(&huge), Err(EntryError::Decode(_))));
    }

    #[test]
    fn decode_rejects_what_it_cannot_trust() {
        assert_eq!(Entry::decode(&[]), Err(EntryError::Empty));
        assert_eq!(Entry::decode(&[9, 0]), Err(EntryError::Format(9)));
        assert!(matches!(
            Entry::decode(&[ENTRY_FORMAT, 200]),
            Err(EntryError::Decode(_))
        ));
        // A well-formed encoding of an entry with an empty context.
        let empty = Entry::default().encode();
        assert_eq!(
            Entry::decode(&empty),
            Err(EntryError::Invalid("empty causal context"))
        );
        // A sibling whose dot the context does not cover.
        let mut e = Entry::default();
        e.write_register(
            Some(b"v".to_vec()),
            Dot::new(NodeId(1), 5),
            &CausalContext::new(),
        );
        e.context = CausalContext::new();
        e.context.apply(Dot::new(NodeId(1), 1));
        assert!(matches!(
            Entry::decode(&e.encode()),
            Err(EntryError::Invalid(_))
        ));
    }
}
