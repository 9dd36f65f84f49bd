//! SWIM membership: who is in the cluster, who is up, and what each node
//! declares about itself (capacity, zone, load). A sans-IO state machine over
//! the `foca` crate (SWIM with suspicion and infection-style dissemination),
//! plus node metadata and graceful leave (DESIGN.md, "membership").
//!
//! # Driving it
//! Every `&mut self` method returns [`MembershipOutput`]s in order; act on all
//! of them, in that order:
//! - `Send { to, payload }`: deliver `payload` to the node at `to`, which
//!   passes it to [`Membership::handle_payload`]. Delivery may be lost, late,
//!   duplicated or reordered; SWIM tolerates that. A payload is at most
//!   [`MembershipConfig::max_payload_len`] bytes.
//! - `Schedule { after, timer }`: once `after` has elapsed, call
//!   [`Membership::handle_timer`] with `timer` on this same instance. Deliver
//!   every timer (late is fine, dropped ones stall probing); never hand one to
//!   another instance, e.g. after a restart drop the old instance's timers.
//! - `Event(e)`: a change in this node's view, for the application.
//!
//! Call [`Membership::join`] once after [`Membership::new`] (a seed may pass
//! its own address: that is a no-op). Time enters only through timers and
//! randomness only from the seed given to `new`: the same inputs in the same
//! order give the same outputs, so the simulator replays a run from its seed.
//!
//! # Invariants
//! - A node id has one identity `(id, addr, incarnation)` in the view; a
//!   higher incarnation replaces a lower one (a restart, or a rejoin after
//!   being declared down).
//! - Events are edge-triggered: `Up` when a member becomes up or comes back
//!   with a higher incarnation; `Down` when an up member is declared down;
//!   `Left` when a member we saw announces its leave. A leave notice outranks
//!   `Down` for the same incarnation; if the notice arrives after the member
//!   was declared down, `Down` is followed by `Left`.
//! - A node's metadata only moves forward, ordered by `(incarnation, seq)`.
//!   `MetaChanged` is emitted for members in the view when their metadata
//!   changes; metadata that arrives before the member is seen is kept, and
//!   [`Membership::member`] shows it once `Up` is emitted.
//! - Input from the network never panics. A payload that fails the frame
//!   checks (magic, version, checksum) changes nothing.
//! - After [`Membership::leave`] the instance is inert: every input returns no
//!   outputs. (Fed on, foca would learn it is down and rejoin by itself.)
//!
//! # Wire
//! `frame = "GKVM" | version u8 | kind u8 | body | xxh3_64(all before) u64le`.
//! Kind 0 carries a foca message (postcard), led by the sender's metadata
//! `Stamp`; its custom broadcasts are `Notice`s (metadata, leave). Kinds 1
//! and 2 carry a `MetaBundle`: a direct metadata request (answered) and its
//! reply, which let a node that joined late, or missed a broadcast, catch up.
//! Kinds 3 and 4 ask and answer whether a member that went down had left (a
//! `LeaveQuery`, a `Notice`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use foca::{
    BroadcastHandler, Foca, Invalidates, Notification, OwnedNotification, PostcardCodec, Runtime,
};
use rand::{Rng, RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::crdt::NodeId;

/// A node's network address.
pub type Addr = std::net::SocketAddr;

/// Load a node reports about itself, for the rebalance planner.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadFigures {
    pub keys: u64,
    pub bytes: u64,
    pub ops_per_sec: u64,
    /// Work per partition, for the load planner (bounded size).
    pub partitions: super::rebalance::LoadReport,
}

/// What a node declares about itself; disseminated to every member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Relative weight in the layout (virtual nodes).
    pub capacity: u32,
    /// Failure zone; at most [`MAX_ZONE_BYTES`] bytes are kept (longer names
    /// are cut at a character boundary so the metadata fits in one packet).
    pub zone: Option<String>,
    /// The node's name (its certificate's), shown by kvctl, logs and
    /// metrics; cut to [`MAX_ZONE_BYTES`] like the zone. The id is what
    /// the protocol goes by.
    pub name: Option<String>,
    pub load: LoadFigures,
}

/// Longest zone name kept in [`NodeMeta::zone`], in bytes.
pub const MAX_ZONE_BYTES: usize = 64;

/// Checks a zone name an operator gives: 1 to [`MAX_ZONE_BYTES`] bytes,
/// no control characters.
pub fn check_zone(zone: &str) -> Result<(), String> {
    if zone.is_empty() || zone.len() > MAX_ZONE_BYTES {
        return Err(format!("zone {zone:?} must be 1 to {MAX_ZONE_BYTES} bytes"));
    }
    if zone.chars().any(char::is_control) {
        return Err(format!("zone {zone:?} has control characters"));
    }
    Ok(())
}

/// A member's state as this node sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Failed a probe; still counted as up until the suspicion times out.
    Suspect,
    /// Declared down by the failure detector.
    Down,
    /// Announced its departure.
    Left,
}

/// Another node in this node's view.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub id: NodeId,
    pub addr: Addr,
    pub state: MemberState,
    /// `None` until its metadata has reached us.
    pub meta: Option<NodeMeta>,
}

/// Configuration: foca's SWIM parameters plus this module's own pacing.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// SWIM parameters. `max_packet_size` bounds foca's message; the frame
    /// adds [`FRAME_OVERHEAD`] bytes.
    pub swim: foca::Config,
    /// How often to announce to the seed again while no member is known;
    /// also the pace of the settling announces.
    pub join_retry: Duration,
    /// Once in, announce to this many random members, one per `join_retry`:
    /// each answers with a packet's worth of the members it sees up, which
    /// fills a new node's view faster than gossip alone (nodes that joined at
    /// the same time as us are not in the seed's first answer).
    pub join_settle_announces: u32,
    /// Period of the metadata-pull tick.
    pub meta_tick: Duration,
    /// Direct metadata requests sent per tick (bounds the burst when a node
    /// joins a large cluster and sees every member at once).
    pub meta_requests_per_tick: u32,
    /// Nodes whose metadata one request asks for. It goes to the first one's
    /// owner, who answers with every card it has among them (a packet's
    /// worth), so a node new to a settled cluster learns it all in a few
    /// round trips.
    pub meta_wants_per_request: u32,
    /// Ticks to wait for a reply before asking the same member again.
    pub meta_retry_ticks: u64,
    /// Ticks between noticing missing metadata and asking for it, time for
    /// the broadcast usually already on its way to arrive.
    pub meta_pull_grace_ticks: u64,
    /// Members asked whether a member that went down had left instead.
    pub leave_query_fanout: u32,
}

impl MembershipConfig {
    /// foca's LAN settings (memberlist's defaults: 1 s probe period, 200 ms
    /// gossip to 3 members, suspicion and retransmissions scaled to
    /// `log10(cluster_size)`), with packets sized so a frame fits in 1400
    /// bytes.
    pub fn lan(cluster_size: usize) -> Self {
        let size = NonZeroU32::new(u32::try_from(cluster_size).unwrap_or(u32::MAX).max(1))
            .unwrap_or(NonZeroU32::MIN);
        let mut swim = foca::Config::new_lan(size);
        // foca has no push-pull state sync (memberlist's repair for rumours
        // that miss a node), so send each rumour more often than its
        // 4 * log10(n + 1). In 40 seeded 20-node runs without loss, a leave
        // notice missed some node in 4 with foca's factor, in none with 6.
        let max_tx = (6.0 * ((cluster_size as f64) + 1.0).log10()).ceil();
        swim.max_transmissions = std::num::NonZeroU8::new(max_tx.clamp(1.0, 255.0) as u8)
            .unwrap_or(swim.max_transmissions);
        // Announcing to down members is how two sides of a healed partition
        // find each other again (neither probes members it holds down); at
        // foca's 65 s a partition outlives its cause by up to a minute. Every
        // 10 s to 2 of them costs a node 0.2 messages/s while any is down.
        swim.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: std::num::NonZeroUsize::MIN.saturating_add(1),
        });
        swim.max_packet_size = swim
            .max_packet_size
            .get()
            .checked_sub(FRAME_OVERHEAD)
            .and_then(std::num::NonZeroUsize::new)
            .unwrap_or(swim.max_packet_size);
        Self {
            swim,
            join_retry: Duration::from_secs(1),
            join_settle_announces: 3,
            meta_tick: Duration::from_millis(200),
            meta_requests_per_tick: 2,
            meta_wants_per_request: 32,
            meta_retry_ticks: 5,
            meta_pull_grace_ticks: 5,
            leave_query_fanout: 3,
        }
    }

    /// The LAN protocol, for the deterministic simulator: identical timing
    /// (so simulated figures transfer), but down members are never forgotten
    /// (no day-long `RemoveDown` timers in the event queue, and a checker can
    /// see every member that ever went down).
    pub fn simulation(cluster_size: usize) -> Self {
        let mut config = Self::lan(cluster_size);
        config.swim.remove_down_after = None;
        config
    }

    /// Largest payload [`Membership`] sends or accepts.
    pub fn max_payload_len(&self) -> usize {
        self.swim.max_packet_size.get() + FRAME_OVERHEAD
    }
}

impl Default for MembershipConfig {
    /// [`MembershipConfig::lan`] for a cluster of 16.
    fn default() -> Self {
        Self::lan(16)
    }
}

/// A change in this node's view of the cluster.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// The member became up: first seen, back after Down or Left, or
    /// restarted with a higher incarnation.
    Up(NodeId),
    /// The member was up and has been declared down.
    Down(NodeId),
    /// The member announced its leave.
    Left(NodeId),
    /// The member's metadata changed; read it with [`Membership::member`].
    MetaChanged(NodeId),
    /// The cluster declared this node down; it renewed its identity (see
    /// [`Membership::incarnation`], worth persisting) and is rejoining.
    Rejoined,
}

/// A timer to hand back through [`Membership::handle_timer`].
#[derive(Clone, Debug)]
pub struct MembershipTimer(TimerKind);

#[derive(Clone, Debug)]
enum TimerKind {
    /// For the foca instance of this generation (see `restart_swim`).
    Swim {
        generation: u64,
        timer: foca::Timer<Ident>,
    },
    /// Announce to the seed again; stale when `epoch` is not current.
    JoinRetry {
        epoch: u64,
    },
    MetaTick,
}

/// What the driver must do; see the module documentation.
#[derive(Clone, Debug)]
pub enum MembershipOutput {
    Send {
        to: Addr,
        payload: Vec<u8>,
    },
    Schedule {
        after: Duration,
        timer: MembershipTimer,
    },
    Event(MembershipEvent),
}

/// Why [`Membership::handle_payload`] refused a payload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// Shorter than a frame's header and checksum. Doesn't affect state.
    #[error("payload of {len} bytes is shorter than a membership frame")]
    Truncated { len: usize },
    /// Longer than [`MembershipConfig::max_payload_len`]. Doesn't affect state.
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// Doesn't start with the membership magic. Doesn't affect state.
    #[error("not a membership frame (bad magic)")]
    BadMagic,
    /// A frame of another protocol version. Doesn't affect state.
    #[error("unsupported membership protocol version {0}")]
    UnsupportedVersion(u8),
    /// The checksum doesn't match: corrupted or truncated. Doesn't affect state.
    #[error("membership frame checksum mismatch")]
    Checksum,
    /// A frame kind this version doesn't know. Doesn't affect state.
    #[error("unknown membership frame kind {0}")]
    UnknownKind(u8),
    /// A frame whose body doesn't decode (its metadata card, or the
    /// metadata stamp before a SWIM message). Doesn't affect state.
    #[error("malformed membership frame body")]
    Malformed(#[source] postcard::Error),
    /// foca refused a well-formed frame's SWIM message (a peer sending
    /// nonsense, or a message from this node's own address). foca may have
    /// applied the cluster updates that preceded the fault; the outputs they
    /// caused are kept and returned by the next call.
    #[error("SWIM message rejected")]
    Swim(#[source] foca::Error),
}

/// Most bytes a frame adds around foca's message: magic, version, kind,
/// the sender's metadata stamp, checksum.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + MAX_STAMP_LEN + CHECKSUM_LEN;
/// A postcard `Stamp` at its largest: varints of a u64, a u32 and a u64.
const MAX_STAMP_LEN: usize = 10 + 5 + 10;
const MAGIC: [u8; 4] = *b"GKVM";
const PROTOCOL_VERSION: u8 = 1;
const HEADER_LEN: usize = MAGIC.len() + 2;
const CHECKSUM_LEN: usize = 8;
const KIND_SWIM: u8 = 0;
const KIND_META_REQUEST: u8 = 1;
const KIND_META_REPLY: u8 = 2;
const KIND_LEAVE_QUERY: u8 = 3;
const KIND_LEAVE_REPLY: u8 = 4;

/// Rounds of "reconcile what foca reported, act on it" per input. Three
/// suffice: a leave notice marks the leaver down in foca, whose report then
/// needs one more; a foca restart reports the members it starts from.
const MAX_ABSORB_ROUNDS: usize = 4;

/// This node's SWIM membership. See the module documentation.
pub struct Membership {
    foca: Swim,
    rt: Collector,
    /// Shared with the broadcast handler that foca owns (foca gives no access
    /// to it): metadata and leave notices learned from the cluster.
    knowledge: Arc<Mutex<Knowledge>>,
    /// Everyone but us that we have seen, by id.
    peers: BTreeMap<NodeId, Peer>,
    /// foca's view of each address (identity, up?), mirrored from its
    /// notifications so reconciling costs no scan of foca's member list.
    liveness: BTreeMap<Addr, (Ident, bool)>,
    config: MembershipConfig,
    meta: NodeMeta,
    meta_version: MetaVersion,
    pull: MetaPull,
    seed: Option<Addr>,
    join_epoch: u64,
    /// Settling announces still to make (see `join_settle_announces`).
    settle_left: u32,
    /// Members we lost all at once (we went idle): announced to in turn,
    /// besides the seed, until one answers.
    fallback: Vec<Addr>,
    fallback_next: usize,
    /// Picks settling-announce targets; foca's generator is out of reach.
    rng: rand::rngs::StdRng,
    left: bool,
    /// An up member with our id at another address: two nodes run with the
    /// same name (a copied certificate or data directory).
    twin: Option<Addr>,
    /// Outputs produced before an input failed; returned by the next call.
    carry: Vec<MembershipOutput>,
}

impl Membership {
    /// A node that knows no one yet; [`Membership::join`] makes it known.
    ///
    /// `incarnation` distinguishes restarts of the same node id: a restarted
    /// node must pass a higher incarnation than its previous run used (see
    /// [`Membership::incarnation`]) so that it wins its address back and can
    /// rejoin after having been declared down.
    pub fn new(
        id: NodeId,
        addr: Addr,
        incarnation: u32,
        meta: NodeMeta,
        config: MembershipConfig,
        rng_seed: u64,
    ) -> Self {
        let identity = Ident {
            id,
            addr,
            incarnation,
        };
        let knowledge = Arc::new(Mutex::new(Knowledge::new(id)));
        let foca = new_foca(identity, &config, &knowledge, rng_seed);
        // A second stream from the same seed (a fixed odd constant apart).
        let rng = rand::rngs::StdRng::seed_from_u64(rng_seed ^ 0x9E37_79B9_7F4A_7C15);
        let mut membership = Self {
            foca,
            rt: Collector {
                own_addr: addr,
                generation: 0,
                stamp: Vec::new(),
                out: Vec::new(),
                notes: Vec::new(),
            },
            knowledge,
            peers: BTreeMap::new(),
            liveness: BTreeMap::new(),
            pull: MetaPull::default(),
            config,
            meta: clamp_meta(meta),
            meta_version: MetaVersion {
                incarnation,
                seq: 0,
            },
            seed: None,
            join_epoch: 0,
            settle_left: 0,
            fallback: Vec::new(),
            fallback_next: 0,
            rng,
            left: false,
            twin: None,
            carry: Vec::new(),
        };
        // Queued now, sent with the first messages once we are in.
        membership.queue_own_meta();
        membership
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.foca.identity().id
    }

    /// This node's current incarnation: the one given to `new`, or higher
    /// after a [`MembershipEvent::Rejoined`]. A restart must use a higher one.
    pub fn incarnation(&self) -> u32 {
        self.foca.identity().incarnation
    }

    /// Join the cluster through a seed address (whose node id we need not
    /// know). Retried every [`MembershipConfig::join_retry`] until some
    /// member answers. Joining through our own address does nothing: that
    /// node is the seed and waits to be joined.
    #[must_use]
    pub fn join(&mut self, seed: Addr) -> Vec<MembershipOutput> {
        let mut out = std::mem::take(&mut self.carry);
        if self.left || seed == self.rt.own_addr {
            return out;
        }
        self.seed = Some(seed);
        self.start_joining(&mut out);
        out
    }

    /// Handle a payload some node sent us (see the module documentation).
    pub fn handle_payload(
        &mut self,
        payload: &[u8],
    ) -> Result<Vec<MembershipOutput>, MembershipError> {
        if self.left {
            return Ok(Vec::new());
        }
        let (kind, body) = decode_frame(payload, self.config.max_payload_len())?;
        match kind {
            KIND_SWIM => {
                let (stamp, message): (Stamp, &[u8]) =
                    postcard::take_from_bytes(body).map_err(MembershipError::Malformed)?;
                let mut out = std::mem::take(&mut self.carry);
                let result = self.foca.handle_data(message, &mut self.rt);
                // Every SWIM message says which metadata its sender has: a
                // node that missed a metadata broadcast notices here and asks.
                if stamp.node != self.id()
                    && lock(&self.knowledge).version(stamp.node) < Some(stamp.version)
                {
                    self.pull
                        .want(stamp.node, stamp.version, self.config.meta_pull_grace_ticks);
                }
                self.absorb(&mut out);
                match result {
                    Ok(()) => Ok(out),
                    Err(e) => {
                        self.carry = out;
                        Err(MembershipError::Swim(e))
                    }
                }
            }
            KIND_META_REQUEST | KIND_META_REPLY => {
                let bundle: MetaBundle = decode_exact(body).map_err(MembershipError::Malformed)?;
                let mut out = std::mem::take(&mut self.carry);
                if bundle.from.id == self.id() {
                    // Our own bundle echoed back (a peer with our address?):
                    // nothing to learn, and answering would loop.
                    return Ok(out);
                }
                {
                    let mut knowledge = lock(&self.knowledge);
                    for card in bundle.cards {
                        knowledge.learn_meta(card.node, card.version, card.meta);
                    }
                }
                // A bundle is as good a sign of life as a SWIM header (foca
                // takes those as "alive" too), and it often comes from a node
                // that saw us before we saw it: a restarted node asking
                // around, when the news of its return missed us.
                let _ = self.foca.apply_many(
                    std::iter::once(foca::Member::alive(bundle.from.clone())),
                    true,
                    &mut self.rt,
                );
                if kind == KIND_META_REQUEST {
                    let reply = self.meta_bundle(&bundle.wants);
                    out.push(MembershipOutput::Send {
                        to: bundle.from.addr,
                        payload: encode_frame(
                            KIND_META_REPLY,
                            &postcard::to_allocvec(&reply).unwrap_or_default(),
                        ),
                    });
                }
                self.absorb(&mut out);
                Ok(out)
            }
            KIND_LEAVE_QUERY => {
                let query: LeaveQuery = decode_exact(body).map_err(MembershipError::Malformed)?;
                let mut out = std::mem::take(&mut self.carry);
                let left = lock(&self.knowledge).leaves.get(&query.node).copied();
                if let Some(incarnation) = left.filter(|&inc| inc >= query.incarnation) {
                    let notice = Notice::Leave {
                        node: query.node,
                        incarnation,
                    };
                    out.push(MembershipOutput::Send {
                        to: query.from,
                        payload: encode_frame(
                            KIND_LEAVE_REPLY,
                            &postcard::to_allocvec(&notice).unwrap_or_default(),
                        ),
                    });
                }
                Ok(out)
            }
            KIND_LEAVE_REPLY => {
                let notice: Notice = decode_exact(body).map_err(MembershipError::Malformed)?;
                let mut out = std::mem::take(&mut self.carry);
                if lock(&self.knowledge).learn(notice.clone()) {
                    // We had missed it, so others may have too: spread it.
                    if let Ok(bytes) = postcard::to_allocvec(&notice) {
                        let _ = self.foca.add_broadcast(&bytes);
                    }
                }
                self.absorb(&mut out);
                Ok(out)
            }
            other => Err(MembershipError::UnknownKind(other)),
        }
    }

    /// Handle a timer scheduled by an earlier output of this instance.
    #[must_use]
    pub fn handle_timer(&mut self, timer: MembershipTimer) -> Vec<MembershipOutput> {
        let mut out = std::mem::take(&mut self.carry);
        if self.left {
            return out;
        }
        match timer.0 {
            TimerKind::Swim { generation, timer } if generation == self.rt.generation => {
                // Errors here are foca's own consistency checks (a probe cycle
                // that did not complete, a timer from before going idle); it
                // recovers by itself and there is nothing for the driver to do.
                let _ = self.foca.handle_timer(timer, &mut self.rt);
                self.absorb(&mut out);
            }
            TimerKind::JoinRetry { epoch } if epoch == self.join_epoch => {
                if self.foca.num_members() == 0 {
                    self.announce_for_join(&mut out);
                } else if self.settle_left > 0 {
                    self.settle_left -= 1;
                    self.announce_to_random_member(&mut out);
                }
            }
            TimerKind::Swim { .. } | TimerKind::JoinRetry { .. } => {}
            TimerKind::MetaTick => self.on_meta_tick(&mut out),
        }
        out
    }

    /// Change this node's metadata and disseminate it: a versioned custom
    /// broadcast, so a newer version replaces an older one still in flight.
    #[must_use]
    pub fn set_meta(&mut self, meta: NodeMeta) -> Vec<MembershipOutput> {
        let mut out = std::mem::take(&mut self.carry);
        self.meta = clamp_meta(meta);
        self.meta_version.seq += 1;
        if self.left {
            return out;
        }
        self.queue_own_meta();
        // Push it now rather than waiting for the next gossip round.
        let _ = self.foca.broadcast(&mut self.rt);
        self.absorb(&mut out);
        out
    }

    /// Leave gracefully: others see [`MemberState::Left`], not `Down`. The
    /// instance is inert afterwards; drop it once the outputs are sent.
    #[must_use]
    pub fn leave(&mut self) -> Vec<MembershipOutput> {
        let mut out = std::mem::take(&mut self.carry);
        if self.left {
            return out;
        }
        let notice = Notice::Leave {
            node: self.id(),
            incarnation: self.incarnation(),
        };
        // Queued first so it rides on the same messages as foca's own
        // "down" update, and receivers see both at once (Left, not Down).
        if let Ok(bytes) = postcard::to_allocvec(&notice) {
            let _ = self.foca.add_broadcast(&bytes);
        }
        let _ = self.foca.leave_cluster(&mut self.rt);
        // leave_cluster tells a few members; a second round reaches a few
        // more, so a lost message rarely turns a leave into a Down.
        let _ = self.foca.gossip(&mut self.rt);
        self.left = true;
        // Only the sends matter now; notifications (Defunct) are ours.
        self.rt.notes.clear();
        out.extend(
            self.rt
                .out
                .drain(..)
                .filter(|o| matches!(o, MembershipOutput::Send { .. })),
        );
        out
    }

    /// The address of another live node that claims this node's id, if
    /// one was seen: its messages are not taken as a peer's.
    pub fn twin(&self) -> Option<Addr> {
        self.twin
    }

    /// Every other member this node knows of, in any state, sorted by id.
    pub fn members(&self) -> Vec<Member> {
        let swim = self.swim_states();
        let knowledge = lock(&self.knowledge);
        self.peers
            .iter()
            .map(|(id, peer)| self.member_view(*id, peer, &swim, &knowledge))
            .collect()
    }

    /// Other members currently up (Alive or Suspect), sorted by id.
    pub fn alive(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.status == Status::Up)
            .map(|(id, _)| *id)
            .collect()
    }

    /// One other member, if known. Costs a scan of foca's member list (to
    /// tell Suspect from Alive).
    pub fn member(&self, id: NodeId) -> Option<Member> {
        let peer = self.peers.get(&id)?;
        let swim: HashMap<Addr, (&Ident, foca::State)> = self
            .foca
            .iter_membership_state()
            .find(|m| m.id().addr == peer.identity.addr)
            .map(|m| (m.id().addr, (m.id(), m.state())))
            .into_iter()
            .collect();
        let knowledge = lock(&self.knowledge);
        Some(self.member_view(id, peer, &swim, &knowledge))
    }

    /// Where a known member listens; cheap (no scan), for routing.
    pub fn addr_of(&self, id: NodeId) -> Option<Addr> {
        self.peers.get(&id).map(|p| p.identity.addr)
    }

    /// This node's own metadata.
    pub fn meta(&self) -> &NodeMeta {
        &self.meta
    }

    fn swim_states(&self) -> HashMap<Addr, (&Ident, foca::State)> {
        self.foca
            .iter_membership_state()
            .map(|m| (m.id().addr, (m.id(), m.state())))
            .collect()
    }

    fn member_view(
        &self,
        id: NodeId,
        peer: &Peer,
        swim: &HashMap<Addr, (&Ident, foca::State)>,
        knowledge: &Knowledge,
    ) -> Member {
        let state = match peer.status {
            Status::Left => MemberState::Left,
            Status::Down => MemberState::Down,
            Status::Up => match swim.get(&peer.identity.addr) {
                Some((ident, foca::State::Suspect)) if **ident == peer.identity => {
                    MemberState::Suspect
                }
                _ => MemberState::Alive,
            },
        };
        Member {
            id,
            addr: peer.identity.addr,
            state,
            meta: knowledge.metas.get(&id).map(|(_, meta)| meta.clone()),
        }
    }

    fn start_joining(&mut self, out: &mut Vec<MembershipOutput>) {
        self.join_epoch += 1;
        self.settle_left = self.config.join_settle_announces;
        self.announce_for_join(out);
    }

    /// Start over with a fresh foca instance, after going idle (every member
    /// down: most likely we were the one cut off) or being declared down.
    /// The old instance's view is stale in ways foca cannot undo: members it
    /// declared down stay down for those identities (each would have to
    /// renew its identity to be seen again, a cascade of renewals across the
    /// cluster), suspicions it raised before an identity change never
    /// conclude (their timers are void), and its backlog of "down" rumours
    /// would get healthy nodes declared down once the link is back. The new
    /// instance starts from the members we still see up, and announces to
    /// the seed and the members we lost until someone answers.
    fn restart_swim(&mut self, out: &mut Vec<MembershipOutput>) {
        let own_addr = self.rt.own_addr;
        self.fallback = self
            .peers
            .values()
            .map(|p| p.identity.addr)
            .filter(|addr| *addr != own_addr)
            .collect();
        self.fallback.sort();
        self.fallback.dedup();
        let up: Vec<Ident> = self
            .peers
            .values()
            .filter(|p| p.status == Status::Up)
            .map(|p| p.identity.clone())
            .collect();
        let identity = self.foca.identity().clone();
        self.foca = new_foca(identity, &self.config, &self.knowledge, self.rng.random());
        // The old instance's timers must not reach the new one.
        self.rt.generation += 1;
        self.liveness.clear();
        self.queue_own_meta();
        if !up.is_empty() {
            // Not rumoured: this is our view, not news.
            let _ =
                self.foca
                    .apply_many(up.into_iter().map(foca::Member::alive), false, &mut self.rt);
        }
        self.start_joining(out);
    }

    fn announce_to_random_member(&mut self, out: &mut Vec<MembershipOutput>) {
        let up: Vec<&Ident> = self.foca.iter_members().map(|m| m.id()).collect();
        if up.is_empty() {
            return;
        }
        let target = up[self.rng.random_range(0..up.len())].clone();
        let _ = self.foca.announce(target, &mut self.rt);
        out.append(&mut self.rt.out);
        self.schedule_join_retry(out);
    }

    fn schedule_join_retry(&mut self, out: &mut Vec<MembershipOutput>) {
        out.push(MembershipOutput::Schedule {
            after: self.config.join_retry,
            timer: MembershipTimer(TimerKind::JoinRetry {
                epoch: self.join_epoch,
            }),
        });
    }

    /// Announce to the seed and to one of the members we lost (if we went
    /// idle), then check back after `join_retry`.
    fn announce_for_join(&mut self, out: &mut Vec<MembershipOutput>) {
        let fallback = (!self.fallback.is_empty()).then(|| {
            self.fallback_next = (self.fallback_next + 1) % self.fallback.len();
            self.fallback[self.fallback_next]
        });
        let targets: Vec<Addr> = self.seed.iter().copied().chain(fallback).collect();
        if targets.is_empty() {
            return;
        }
        for addr in targets {
            // foca accepts an Announce addressed to any identity with its
            // address, and the reply (a Feed) comes from the real identity,
            // which is how we learn it. The id here is never stored.
            let placeholder = Ident {
                id: NodeId(0),
                addr,
                incarnation: 0,
            };
            let _ = self.foca.announce(placeholder, &mut self.rt);
        }
        // Announcing only sends; nothing for absorb to turn into events.
        out.append(&mut self.rt.out);
        self.schedule_join_retry(out);
    }

    fn queue_own_meta(&mut self) {
        let stamp = Stamp {
            node: self.id(),
            version: self.meta_version,
        };
        self.rt.stamp = postcard::to_allocvec(&stamp).unwrap_or_default();
        let notice = Notice::Meta {
            node: self.id(),
            version: self.meta_version,
            meta: self.meta.clone(),
        };
        // Fails only if the metadata exceeded a packet, which clamp_meta
        // rules out.
        if let Ok(bytes) = postcard::to_allocvec(&notice) {
            let _ = self.foca.add_broadcast(&bytes);
        }
    }

    /// Our own card, then the cards we hold among `wants` (at the wanted
    /// version or newer), as many as fit in a packet.
    fn meta_bundle(&self, wants: &[Want]) -> MetaBundle {
        let own = Card {
            node: self.id(),
            version: self.meta_version,
            meta: self.meta.clone(),
        };
        let mut bundle = MetaBundle {
            from: self.foca.identity().clone(),
            cards: vec![own],
            wants: Vec::new(),
        };
        let budget = self.config.swim.max_packet_size.get();
        let mut len = postcard::to_allocvec(&bundle).map_or(0, |b| b.len());
        let knowledge = lock(&self.knowledge);
        for want in wants {
            let Some((version, meta)) = knowledge.metas.get(&want.node) else {
                continue;
            };
            if *version < want.version {
                continue;
            }
            let card = Card {
                node: want.node,
                version: *version,
                meta: meta.clone(),
            };
            // +1: the cards' length prefix may grow a byte.
            let card_len = postcard::to_allocvec(&card).map_or(usize::MAX, |b| b.len() + 1);
            if len.saturating_add(card_len) > budget {
                break;
            }
            len += card_len;
            bundle.cards.push(card);
        }
        bundle
    }

    /// Turn what foca and the broadcast handler reported during the last call
    /// into peer states and events. Acting on them (marking a leaver down in
    /// foca, restarting foca) makes more reports, hence rounds; anything left
    /// after the last round is taken up by the next call.
    fn absorb(&mut self, out: &mut Vec<MembershipOutput>) {
        for _ in 0..MAX_ABSORB_ROUNDS {
            out.append(&mut self.rt.out);
            let notes = std::mem::take(&mut self.rt.notes);
            let (meta_changed, left) = {
                let mut k = lock(&self.knowledge);
                (
                    std::mem::take(&mut k.meta_changed),
                    std::mem::take(&mut k.left),
                )
            };
            if notes.is_empty() && meta_changed.is_empty() && left.is_empty() {
                break;
            }

            // Latest identity per touched id; the state is then read from
            // foca's final view, so a batch of notifications about one member
            // yields at most one event.
            let mut touched: BTreeMap<NodeId, Ident> = BTreeMap::new();
            let mut restart = false;
            let mut touch = |ident: Ident| {
                touched
                    .entry(ident.id)
                    .and_modify(|cur| {
                        if ident.incarnation >= cur.incarnation {
                            *cur = ident.clone();
                        }
                    })
                    .or_insert(ident);
            };
            for note in notes {
                match note {
                    OwnedNotification::MemberUp(ident) => {
                        self.liveness.insert(ident.addr, (ident.clone(), true));
                        touch(ident);
                    }
                    OwnedNotification::MemberDown(ident) => {
                        self.liveness.insert(ident.addr, (ident.clone(), false));
                        touch(ident);
                    }
                    OwnedNotification::Rename(before, after) => {
                        // The newcomer inherits the liveness; an Up or Down
                        // follows if that changed. A member foca registered
                        // as down without telling us is absent here: inactive.
                        let active = self
                            .liveness
                            .get(&before.addr)
                            .is_some_and(|(known, active)| *known == before && *active);
                        self.liveness.insert(after.addr, (after.clone(), active));
                        touch(before);
                        touch(after);
                    }
                    OwnedNotification::Rejoin(_) => {
                        self.on_rejoin(out);
                        restart = true;
                    }
                    // Acted on once this batch is reconciled against the
                    // instance that reported it.
                    OwnedNotification::Idle => restart = true,
                    // Active: we are in; Defunct cannot happen while renew()
                    // succeeds (incarnation below u32::MAX).
                    _ => {}
                }
            }
            for (node, _) in left {
                if let Some(peer) = self.peers.get(&node) {
                    touch(peer.identity.clone());
                }
            }

            let mut to_down = Vec::new();
            let mut went_down = Vec::new();
            if !touched.is_empty() {
                let knowledge = lock(&self.knowledge);
                let own = self.id();
                let own_addr = self.foca.identity().addr;
                // A stale identity of our own (a previous run at our
                // address, or a misconfigured twin) is not a peer; a twin
                // that is up elsewhere is remembered for the operator.
                if let Some(twin) = touched.get(&own).filter(|i| i.addr != own_addr) {
                    let up = self
                        .liveness
                        .get(&twin.addr)
                        .is_some_and(|(known, active)| known == twin && *active);
                    self.twin = up.then_some(twin.addr);
                }
                for (id, mut ident) in touched.into_iter().filter(|(id, _)| *id != own) {
                    let previous = self.peers.get(&id);
                    if let Some(p) = previous {
                        if p.identity.incarnation > ident.incarnation {
                            ident = p.identity.clone();
                        }
                    }
                    let active = self
                        .liveness
                        .get(&ident.addr)
                        .is_some_and(|(known, active)| *known == ident && *active);
                    let has_left = knowledge
                        .leaves
                        .get(&id)
                        .is_some_and(|&inc| inc >= ident.incarnation);
                    let status = if has_left {
                        Status::Left
                    } else if active {
                        Status::Up
                    } else {
                        Status::Down
                    };
                    let event = match (previous.map(|p| (p.status, p.identity.incarnation)), status)
                    {
                        (Some((Status::Up, inc)), Status::Up) if inc == ident.incarnation => None,
                        (_, Status::Up) => Some(MembershipEvent::Up(id)),
                        (Some((Status::Up, _)), Status::Down) => Some(MembershipEvent::Down(id)),
                        (Some((Status::Up | Status::Down, _)), Status::Left) => {
                            Some(MembershipEvent::Left(id))
                        }
                        _ => None,
                    };
                    if let Some(event) = event {
                        if event == MembershipEvent::Down(id) {
                            went_down.push(ident.clone());
                        }
                        out.push(MembershipOutput::Event(event));
                    }
                    if status == Status::Left && active {
                        // foca still probes it; tell it (and, through its
                        // dissemination, everyone) that it is gone.
                        to_down.push(ident.clone());
                    }
                    let run_start = MetaVersion {
                        incarnation: ident.incarnation,
                        seq: 0,
                    };
                    if status == Status::Up && knowledge.version(id) < Some(run_start) {
                        self.pull
                            .want(id, run_start, self.config.meta_pull_grace_ticks);
                    }
                    self.peers.insert(
                        id,
                        Peer {
                            identity: ident,
                            status,
                        },
                    );
                }
            }
            for id in meta_changed {
                if self.peers.contains_key(&id) {
                    out.push(MembershipOutput::Event(MembershipEvent::MetaChanged(id)));
                }
            }
            if !to_down.is_empty() {
                let _ = self.foca.apply_many(
                    to_down.into_iter().map(foca::Member::down),
                    true,
                    &mut self.rt,
                );
            }
            for ident in went_down {
                self.ask_whether_left(&ident, out);
            }
            if restart {
                self.restart_swim(out);
            }
        }
        out.append(&mut self.rt.out);
        self.arm_meta_tick(out);
    }

    /// A member went down with no leave notice. Notices spread like rumours
    /// and can miss a node, which then sees the leaver stop answering: ask a
    /// few members whether it left (kind 3). Costs a few messages per crash.
    fn ask_whether_left(&mut self, ident: &Ident, out: &mut Vec<MembershipOutput>) {
        let up: Vec<Addr> = self
            .peers
            .values()
            .filter(|p| p.status == Status::Up)
            .map(|p| p.identity.addr)
            .collect();
        let query = LeaveQuery {
            from: self.rt.own_addr,
            node: ident.id,
            incarnation: ident.incarnation,
        };
        let body = postcard::to_allocvec(&query).unwrap_or_default();
        let asked = (self.config.leave_query_fanout as usize).min(up.len());
        for addr in rand::seq::index::sample(&mut self.rng, up.len(), asked)
            .into_iter()
            .map(|i| up[i])
        {
            out.push(MembershipOutput::Send {
                to: addr,
                payload: encode_frame(KIND_LEAVE_QUERY, &body),
            });
        }
    }

    fn on_rejoin(&mut self, out: &mut Vec<MembershipOutput>) {
        // Others compare metadata versions against our new incarnation, so
        // restamp it (otherwise they would keep asking for it).
        self.meta_version = MetaVersion {
            incarnation: self.incarnation(),
            seq: self.meta_version.seq + 1,
        };
        self.queue_own_meta();
        out.push(MembershipOutput::Event(MembershipEvent::Rejoined));
    }

    /// Keep the metadata tick running while requests are owed. Only the tick
    /// walks the pending set: doing it per message costs O(members) each.
    fn arm_meta_tick(&mut self, out: &mut Vec<MembershipOutput>) {
        if !self.left && !self.pull.armed && !self.pull.pending.is_empty() {
            self.pull.armed = true;
            out.push(MembershipOutput::Schedule {
                after: self.config.meta_tick,
                timer: MembershipTimer(TimerKind::MetaTick),
            });
        }
    }

    /// Ask up members whose metadata we lack for it, at most
    /// `meta_requests_per_tick` of them.
    fn on_meta_tick(&mut self, out: &mut Vec<MembershipOutput>) {
        self.pull.armed = false;
        self.pull.tick += 1;
        let tick = self.pull.tick;
        let retry = self.config.meta_retry_ticks.max(1);
        let per_request = self.config.meta_wants_per_request.max(1) as usize;
        let limit = per_request.saturating_mul(self.config.meta_requests_per_tick as usize);
        let mut wants = Vec::new();
        {
            let knowledge = lock(&self.knowledge);
            while wants.len() < limit {
                let Some(&(due, node)) = self.pull.schedule.first() else {
                    break;
                };
                if due > tick {
                    break;
                }
                self.pull.schedule.pop_first();
                let Some(&want) = self.pull.pending.get(&node) else {
                    continue;
                };
                let needed = self
                    .peers
                    .get(&node)
                    .is_some_and(|p| p.status == Status::Up)
                    && knowledge.version(node) < Some(want);
                if needed {
                    wants.push(Want {
                        node,
                        version: want,
                    });
                    self.pull.schedule.insert((tick + retry, node));
                } else {
                    self.pull.pending.remove(&node);
                }
            }
        }
        for wants in wants.chunks(per_request) {
            // Ask the first one's owner: it surely has its own, and likely
            // many of the others.
            let Some(target) = self.peers.get(&wants[0].node) else {
                continue;
            };
            let to = target.identity.addr;
            // Our own card rides along, so the owner learns ours in passing.
            let mut bundle = self.meta_bundle(&[]);
            bundle.wants = wants.to_vec();
            out.push(MembershipOutput::Send {
                to,
                payload: encode_frame(
                    KIND_META_REQUEST,
                    &postcard::to_allocvec(&bundle).unwrap_or_default(),
                ),
            });
        }
        self.arm_meta_tick(out);
    }
}

type Swim = Foca<Ident, PostcardCodec, FocaRng, NoticeHandler>;

fn new_foca(
    identity: Ident,
    config: &MembershipConfig,
    knowledge: &Arc<Mutex<Knowledge>>,
    rng_seed: u64,
) -> Swim {
    let handler = NoticeHandler {
        knowledge: Arc::clone(knowledge),
    };
    let rng = FocaRng(rand::rngs::StdRng::seed_from_u64(rng_seed));
    Foca::with_custom_broadcast(identity, config.swim.clone(), rng, PostcardCodec, handler)
}

/// foca's identity for a node: its id, where it listens, and which run of it
/// this is. foca keys members by address; on an address conflict the higher
/// `(incarnation, id)` wins, so a restart or a renewal replaces the old run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Ident {
    id: NodeId,
    addr: Addr,
    incarnation: u32,
}

impl foca::Identity for Ident {
    type Addr = Addr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            incarnation: self.incarnation.checked_add(1)?,
            ..self.clone()
        })
    }

    fn addr(&self) -> Addr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.incarnation, self.id) > (adversary.incarnation, adversary.id)
    }
}

#[derive(Clone, Debug)]
struct Peer {
    identity: Ident,
    status: Status,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Status {
    Up,
    Down,
    Left,
}

/// Pacing of direct metadata requests.
#[derive(Debug, Default)]
struct MetaPull {
    /// Members whose metadata we lack, up to at least this version. An entry
    /// is dropped when its turn comes and it is no longer needed.
    pending: BTreeMap<NodeId, MetaVersion>,
    /// When to ask for each pending entry (again): `(tick, node)`, so a tick
    /// only looks at what is due.
    schedule: BTreeSet<(u64, NodeId)>,
    tick: u64,
    armed: bool,
}

impl MetaPull {
    /// Owe a request for `node`'s metadata up to `want`; the first one goes
    /// out after `grace_ticks`, time for a broadcast in flight to land.
    fn want(&mut self, node: NodeId, want: MetaVersion, grace_ticks: u64) {
        match self.pending.get_mut(&node) {
            Some(known) => *known = (*known).max(want),
            None => {
                self.pending.insert(node, want);
                self.schedule.insert((self.tick + grace_ticks, node));
            }
        }
    }
}

/// Orders a node's metadata: a later run (higher incarnation) beats anything
/// an earlier run said, then the sequence within a run.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct MetaVersion {
    incarnation: u32,
    seq: u64,
}

/// A custom broadcast, disseminated by foca along with its own updates.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Notice {
    Meta {
        node: NodeId,
        version: MetaVersion,
        meta: NodeMeta,
    },
    Leave {
        node: NodeId,
        incarnation: u32,
    },
}

/// Which metadata the sender of a SWIM message has; leads its body.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stamp {
    node: NodeId,
    version: MetaVersion,
}

/// "Did `node` leave?", asked of a few members when it goes down without a
/// leave notice; one that knows answers with the `Notice` (kind 4).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LeaveQuery {
    from: Addr,
    node: NodeId,
    incarnation: u32,
}

/// Metadata sent directly: a request (kind 1) carries the sender's card and
/// its wants; the reply (kind 2) the responder's card and those it had.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MetaBundle {
    from: Ident,
    cards: Vec<Card>,
    wants: Vec<Want>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Card {
    node: NodeId,
    version: MetaVersion,
    meta: NodeMeta,
}

/// "Send me `node`'s metadata, at `version` or newer."
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Want {
    node: NodeId,
    version: MetaVersion,
}

/// foca's key for a `Notice` in its dissemination backlog: a notice replaces
/// a queued one about the same node that it ranks at least as high. Ranks
/// order by run (incarnation) first; within a run a leave outranks any
/// metadata (no point spreading that of a node that left), and metadata by
/// sequence.
#[derive(Debug)]
struct NoticeKey {
    node: NodeId,
    rank: (u32, u8, u64),
}

impl NoticeKey {
    fn of(notice: &Notice) -> Self {
        match notice {
            Notice::Meta { node, version, .. } => Self {
                node: *node,
                rank: (version.incarnation, 0, version.seq),
            },
            Notice::Leave { node, incarnation } => Self {
                node: *node,
                rank: (*incarnation, 1, u64::MAX),
            },
        }
    }
}

impl Invalidates for NoticeKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.rank >= other.rank
    }
}

/// What the cluster has told us about nodes beyond SWIM state.
#[derive(Debug)]
struct Knowledge {
    own: NodeId,
    metas: BTreeMap<NodeId, (MetaVersion, NodeMeta)>,
    /// Highest incarnation of each node that announced its leave.
    leaves: BTreeMap<NodeId, u32>,
    /// Changes not yet turned into events, in arrival order.
    meta_changed: Vec<NodeId>,
    left: Vec<(NodeId, u32)>,
}

impl Knowledge {
    fn new(own: NodeId) -> Self {
        Self {
            own,
            metas: BTreeMap::new(),
            leaves: BTreeMap::new(),
            meta_changed: Vec::new(),
            left: Vec::new(),
        }
    }

    /// Keeps `meta` if newer than what we have; says whether it was.
    fn learn_meta(&mut self, node: NodeId, version: MetaVersion, meta: NodeMeta) -> bool {
        if node == self.own {
            return false;
        }
        let changed = match self.metas.get(&node) {
            Some((known, _)) if *known >= version => return false,
            Some((_, old)) => *old != meta,
            None => true,
        };
        self.metas.insert(node, (version, meta));
        if changed {
            self.meta_changed.push(node);
        }
        true
    }

    fn learn(&mut self, notice: Notice) -> bool {
        match notice {
            Notice::Meta {
                node,
                version,
                meta,
            } => self.learn_meta(node, version, meta),
            Notice::Leave { node, incarnation } => {
                if node == self.own || self.leaves.get(&node).is_some_and(|&i| i >= incarnation) {
                    return false;
                }
                self.leaves.insert(node, incarnation);
                self.left.push((node, incarnation));
                true
            }
        }
    }

    /// The version of `node`'s metadata we hold.
    fn version(&self, node: NodeId) -> Option<MetaVersion> {
        self.metas.get(&node).map(|(version, _)| *version)
    }
}

struct NoticeHandler {
    knowledge: Arc<Mutex<Knowledge>>,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed membership notice")]
struct NoticeError(#[source] postcard::Error);

impl BroadcastHandler<Ident> for NoticeHandler {
    type Key = NoticeKey;
    type Error = NoticeError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Ident>,
    ) -> Result<Option<NoticeKey>, NoticeError> {
        let notice: Notice = decode_exact(data).map_err(NoticeError)?;
        let key = NoticeKey::of(&notice);
        if sender.is_none() {
            // Our own notice (add_broadcast): always disseminate it, even
            // when re-queued unchanged.
            return Ok(Some(key));
        }
        // Relay only what was news to us; that is what ends an epidemic.
        Ok(lock(&self.knowledge).learn(notice).then_some(key))
    }
}

/// Collects what foca asks for during one call.
struct Collector {
    own_addr: Addr,
    /// Which foca instance the timers it schedules belong to.
    generation: u64,
    /// Our `Stamp`, encoded, to lead every SWIM message.
    stamp: Vec<u8>,
    out: Vec<MembershipOutput>,
    notes: Vec<OwnedNotification<Ident>>,
}

impl Runtime<Ident> for Collector {
    fn notify(&mut self, notification: Notification<'_, Ident>) {
        self.notes.push(notification.to_owned());
    }

    fn send_to(&mut self, to: Ident, data: &[u8]) {
        // foca may keep a stale identity at our own address (our previous
        // run, declared down) and announce to it; that would only come back
        // as an error.
        if to.addr != self.own_addr {
            let mut body = Vec::with_capacity(self.stamp.len() + data.len());
            body.extend_from_slice(&self.stamp);
            body.extend_from_slice(data);
            self.out.push(MembershipOutput::Send {
                to: to.addr,
                payload: encode_frame(KIND_SWIM, &body),
            });
        }
    }

    fn submit_after(&mut self, event: foca::Timer<Ident>, after: Duration) {
        self.out.push(MembershipOutput::Schedule {
            after,
            timer: MembershipTimer(TimerKind::Swim {
                generation: self.generation,
                timer: event,
            }),
        });
    }
}

/// foca 2 takes a `rand` 0.10 generator; the crate's seeded generator is
/// `rand` 0.9's `StdRng`, so this bridges the two `rand_core` versions.
struct FocaRng(rand::rngs::StdRng);

impl rand_core::TryRng for FocaRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.0.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

fn lock(knowledge: &Mutex<Knowledge>) -> MutexGuard<'_, Knowledge> {
    // Nothing panics while holding the lock, and the data stays consistent
    // between statements anyway: a poisoned lock is still usable.
    knowledge.lock().unwrap_or_else(PoisonError::into_inner)
}

fn clamp_meta(mut meta: NodeMeta) -> NodeMeta {
    for zone in [&mut meta.zone, &mut meta.name].into_iter().flatten() {
        if zone.len() > MAX_ZONE_BYTES {
            let mut end = MAX_ZONE_BYTES;
            while !zone.is_char_boundary(end) {
                end -= 1;
            }
            zone.truncate(end);
        }
    }
    meta
}

fn encode_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_OVERHEAD + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.push(PROTOCOL_VERSION);
    frame.push(kind);
    frame.extend_from_slice(body);
    let checksum = xxhash_rust::xxh3::xxh3_64(&frame);
    frame.extend_from_slice(&checksum.to_le_bytes());
    frame
}

fn decode_frame(payload: &[u8], max: usize) -> Result<(u8, &[u8]), MembershipError> {
    let len = payload.len();
    if len < HEADER_LEN + CHECKSUM_LEN {
        return Err(MembershipError::Truncated { len });
    }
    if len > max {
        return Err(MembershipError::TooLarge { len, max });
    }
    if payload[..MAGIC.len()] != MAGIC {
        return Err(MembershipError::BadMagic);
    }
    let version = payload[MAGIC.len()];
    if version != PROTOCOL_VERSION {
        return Err(MembershipError::UnsupportedVersion(version));
    }
    let (covered, checksum) = payload.split_at(len - CHECKSUM_LEN);
    let mut expected = [0u8; CHECKSUM_LEN];
    expected.copy_from_slice(checksum);
    if xxhash_rust::xxh3::xxh3_64(covered) != u64::from_le_bytes(expected) {
        return Err(MembershipError::Checksum);
    }
    Ok((payload[MAGIC.len() + 1], &covered[HEADER_LEN..]))
}

/// Decode one value that must span all of `bytes`.
fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    match postcard::take_from_bytes(bytes)? {
        (value, []) => Ok(value),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore};
    use std::cmp::{Ordering, Reverse};
    use std::collections::BinaryHeap;

    const SEED: u64 = 0x5EED_CAFE;
    /// Virtual time between two checks of a scenario's condition.
    const CHECK_EVERY_MS: u64 = 50;

    fn addr(i: usize) -> Addr {
        let i = u16::try_from(i).expect("test clusters are small");
        Addr::from(([10, 0, (i >> 8) as u8, i as u8], 7000))
    }

    fn node_id(i: usize) -> NodeId {
        NodeId(0xA000 + i as u64)
    }

    fn meta_of(i: usize, generation: u64) -> NodeMeta {
        NodeMeta {
            capacity: 100 + i as u32,
            zone: Some(format!("zone-{}", i % 3)),
            name: None,
            load: LoadFigures {
                keys: generation,
                bytes: 1000 * generation,
                ops_per_sec: i as u64,
                // A full report with the largest figures: what a busy node
                // gossips must still fit the packets these tests send.
                partitions: crate::replication::rebalance::LoadReport {
                    work: u64::MAX,
                    held: u32::MAX,
                    hot: (0..crate::replication::rebalance::MAX_HOT_PARTITIONS as u16)
                        .map(|p| crate::replication::rebalance::PartitionLoad {
                            partition: u16::MAX - p,
                            ops_per_sec: u64::MAX,
                            keys: u64::MAX,
                            bytes: u64::MAX,
                        })
                        .collect(),
                },
            },
        }
    }

    enum Item {
        Payload(Vec<u8>),
        Timer {
            generation: u64,
            timer: MembershipTimer,
        },
    }

    struct Queued {
        at_ms: u64,
        seq: u64,
        node: usize,
        item: Item,
    }

    impl PartialEq for Queued {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other) == Ordering::Equal
        }
    }
    impl Eq for Queued {}
    impl PartialOrd for Queued {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Queued {
        fn cmp(&self, other: &Self) -> Ordering {
            (self.at_ms, self.seq).cmp(&(other.at_ms, other.seq))
        }
    }

    /// A deterministic in-memory network of membership nodes: virtual time in
    /// ms, one queue of deliveries and timers, seeded latency and loss.
    struct Sim {
        now_ms: u64,
        seq: u64,
        rng: StdRng,
        loss: f64,
        config: MembershipConfig,
        nodes: Vec<Option<Membership>>,
        /// Bumped on crash and restart so a dead run's timers are dropped.
        generation: Vec<u64>,
        /// The metadata each node last declared (what others must converge to).
        declared: Vec<NodeMeta>,
        by_addr: HashMap<Addr, usize>,
        queue: BinaryHeap<Reverse<Queued>>,
        events: Vec<Vec<(u64, MembershipEvent)>>,
        errors: u64,
        messages: u64,
        /// Partition label of each node: traffic between different labels is
        /// dropped both ways.
        side: Vec<u8>,
    }

    impl Sim {
        fn new(n: usize, loss: f64, seed: u64) -> Self {
            let mut sim = Sim {
                now_ms: 0,
                seq: 0,
                rng: StdRng::seed_from_u64(seed),
                loss,
                config: MembershipConfig::simulation(n),
                nodes: (0..n).map(|_| None).collect(),
                generation: vec![0; n],
                declared: (0..n).map(|i| meta_of(i, 0)).collect(),
                by_addr: (0..n).map(|i| (addr(i), i)).collect(),
                queue: BinaryHeap::new(),
                events: vec![Vec::new(); n],
                errors: 0,
                messages: 0,
                side: vec![0; n],
            };
            for i in 0..n {
                sim.start(i, 0, meta_of(i, 0));
            }
            sim
        }

        /// (Re)start node `i` and join it through node 0.
        fn start(&mut self, i: usize, incarnation: u32, meta: NodeMeta) {
            self.generation[i] += 1;
            self.declared[i] = meta.clone();
            let seed = self.rng.random();
            let mut node = Membership::new(
                node_id(i),
                addr(i),
                incarnation,
                meta,
                self.config.clone(),
                seed,
            );
            let out = node.join(addr(0));
            self.nodes[i] = Some(node);
            self.apply(i, out);
        }

        fn crash(&mut self, i: usize) {
            self.nodes[i] = None;
            self.generation[i] += 1;
        }

        fn push(&mut self, at_ms: u64, node: usize, item: Item) {
            self.seq += 1;
            self.queue.push(Reverse(Queued {
                at_ms,
                seq: self.seq,
                node,
                item,
            }));
        }

        fn apply(&mut self, i: usize, outputs: Vec<MembershipOutput>) {
            for output in outputs {
                match output {
                    MembershipOutput::Send { to, payload } => {
                        self.messages += 1;
                        assert!(payload.len() <= self.config.max_payload_len());
                        let Some(&dst) = self.by_addr.get(&to) else {
                            continue;
                        };
                        if self.rng.random_bool(self.loss) || self.side[i] != self.side[dst] {
                            continue;
                        }
                        let latency_ms = self.rng.random_range(1..=5);
                        self.push(self.now_ms + latency_ms, dst, Item::Payload(payload));
                    }
                    MembershipOutput::Schedule { after, timer } => {
                        let at_ms = self.now_ms + after.as_millis() as u64;
                        let generation = self.generation[i];
                        self.push(at_ms, i, Item::Timer { generation, timer });
                    }
                    MembershipOutput::Event(event) => self.events[i].push((self.now_ms, event)),
                }
            }
        }

        fn step(&mut self) -> bool {
            let Some(Reverse(next)) = self.queue.pop() else {
                return false;
            };
            self.now_ms = next.at_ms;
            let i = next.node;
            let Some(node) = self.nodes[i].as_mut() else {
                return true;
            };
            let outputs = match next.item {
                Item::Payload(payload) => match node.handle_payload(&payload) {
                    Ok(outputs) => outputs,
                    Err(_) => {
                        self.errors += 1;
                        return true;
                    }
                },
                Item::Timer { generation, timer } => {
                    if generation != self.generation[i] {
                        return true;
                    }
                    node.handle_timer(timer)
                }
            };
            self.apply(i, outputs);
            true
        }

        /// Runs until `done` holds (checked every few ms of virtual time) and
        /// returns the virtual time it took, or `None` past `limit_ms`.
        fn run_until(&mut self, limit_ms: u64, done: impl Fn(&Sim) -> bool) -> Option<u64> {
            let start = self.now_ms;
            let mut next_check = start;
            loop {
                if self.now_ms >= next_check {
                    self.live().for_each(|(_, n)| n.assert_mirror());
                    if done(self) {
                        return Some(self.now_ms - start);
                    }
                    next_check = self.now_ms + CHECK_EVERY_MS;
                }
                if self.now_ms - start > limit_ms || !self.step() {
                    return None;
                }
            }
        }

        fn run_for(&mut self, ms: u64) {
            let end = self.now_ms + ms;
            while self.queue.peek().is_some_and(|Reverse(q)| q.at_ms <= end) {
                self.step();
            }
            self.now_ms = end;
        }

        fn live(&self) -> impl Iterator<Item = (usize, &Membership)> {
            self.nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
        }

        /// Every live node sees every other live node Alive with the metadata
        /// it declared last.
        fn converged(&self) -> bool {
            let live: Vec<usize> = self.live().map(|(i, _)| i).collect();
            self.live().all(|(i, node)| {
                let members = node.members();
                live.iter().filter(|&&j| j != i).all(|&j| {
                    members.iter().any(|m| {
                        m.id == node_id(j)
                            && m.addr == addr(j)
                            && m.state == MemberState::Alive
                            && m.meta.as_ref() == Some(&self.declared[j])
                    })
                }) && node.alive().len() == live.len() - 1
            })
        }

        /// Every live node other than `j` sees `j` in `state`.
        fn all_see(&self, j: usize, state: MemberState) -> bool {
            self.live()
                .filter(|(i, _)| *i != j)
                .all(|(_, node)| node.member(node_id(j)).is_some_and(|m| m.state == state))
        }

        /// Events any node emitted about node `j` since `since_ms`.
        fn events_about(&self, j: usize, since_ms: u64) -> Vec<MembershipEvent> {
            let id = node_id(j);
            self.events
                .iter()
                .flatten()
                .filter(|(at_ms, _)| *at_ms >= since_ms)
                .map(|(_, e)| *e)
                .filter(|e| match e {
                    MembershipEvent::Up(x)
                    | MembershipEvent::Down(x)
                    | MembershipEvent::Left(x)
                    | MembershipEvent::MetaChanged(x) => *x == id,
                    MembershipEvent::Rejoined => false,
                })
                .collect()
        }
    }

    impl Membership {
        /// The notification mirror agrees with foca's own member list.
        fn assert_mirror(&self) {
            for m in self.foca.iter_membership_state() {
                let active = m.state() != foca::State::Down;
                match self.liveness.get(&m.id().addr) {
                    Some((ident, up)) => assert!(
                        ident == m.id() && *up == active,
                        "{:?}: mirror {ident:?} {up}, foca {m:?}",
                        self.id()
                    ),
                    None => assert!(!active, "{:?}: missing {m:?}", self.id()),
                }
            }
        }
    }

    impl Sim {
        /// What keeps the cluster from having converged, for failure messages.
        fn lagging(&self) -> Vec<String> {
            let live: Vec<usize> = self.live().map(|(i, _)| i).collect();
            let mut lagging = Vec::new();
            for (i, node) in self.live() {
                let members = node.members();
                for &j in live.iter().filter(|&&j| j != i) {
                    match members.iter().find(|m| m.id == node_id(j)) {
                        None => lagging.push(format!("{i} doesn't know {j}")),
                        Some(m) if m.state != MemberState::Alive => {
                            lagging.push(format!("{i} sees {j} {:?}", m.state))
                        }
                        Some(m) if m.meta.as_ref() != Some(&self.declared[j]) => {
                            lagging.push(format!("{i} has stale metadata of {j}"))
                        }
                        _ => {}
                    }
                }
            }
            lagging
        }

        fn converge(&mut self, limit_ms: u64, what: &str) -> u64 {
            self.run_until(limit_ms, Sim::converged)
                .unwrap_or_else(|| panic!("{what}: {:?}", self.lagging()))
        }
    }

    /// The whole life cycle (join, crash, leave, restart, metadata change)
    /// under several seeds and loss rates, with the virtual time each step
    /// may take.
    #[test]
    fn scenarios_hold_across_seeds() {
        for seed in 0..8u64 {
            for loss in [0.0, 0.05] {
                let ctx = format!("seed {seed}, loss {loss}");
                let mut sim = Sim::new(20, loss, seed);
                assert!(sim.converge(15_000, &ctx) <= 15_000);
                sim.crash(7);
                sim.run_until(30_000, |s| s.all_see(7, MemberState::Down))
                    .unwrap_or_else(|| panic!("{ctx}: crash not detected"));
                let out = sim.nodes[5].as_mut().expect("live").leave();
                sim.apply(5, out);
                sim.crash(5);
                sim.run_until(10_000, |s| s.all_see(5, MemberState::Left))
                    .unwrap_or_else(|| panic!("{ctx}: leave not seen"));
                sim.start(7, 1, meta_of(7, 1));
                sim.converge(15_000, &ctx);
                let out = sim.nodes[2].as_mut().expect("live").set_meta(meta_of(2, 5));
                sim.apply(2, out);
                sim.declared[2] = meta_of(2, 5);
                sim.converge(30_000, &ctx);
            }
        }
    }

    #[test]
    fn partitioned_groups_heal() {
        let (mut sim, _) = converged_cluster(20, 0.0);
        for side in &mut sim.side[15..] {
            *side = 1;
        }
        let apart = |s: &Sim| {
            s.live().all(|(i, node)| {
                s.live()
                    .filter(|(j, _)| s.side[*j] != s.side[i])
                    .all(|(j, _)| {
                        node.member(node_id(j))
                            .is_some_and(|m| m.state == MemberState::Down)
                    })
            })
        };
        sim.run_until(60_000, apart)
            .expect("each side sees the other down");
        sim.run_for(10_000);
        sim.side.fill(0);
        let healed_at = sim.now_ms;
        let took_ms = sim.converge(60_000, "healed partition");
        // Each side declared the other down, which foca makes final for those
        // identities: nodes come back by renewing theirs.
        let renewed = sim
            .events
            .iter()
            .filter(|events| {
                events
                    .iter()
                    .any(|(at, e)| *at >= healed_at && *e == MembershipEvent::Rejoined)
            })
            .count();
        println!("15/5 partition healed after {took_ms} ms virtual, {renewed} nodes renewed");
        assert!(took_ms <= 20_000, "took {took_ms} ms");
    }

    /// Figures for large clusters; run with
    /// `MS_NODES=1000 cargo test --release --lib membership::tests::scale -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn scale() {
        let n: usize = std::env::var("MS_NODES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        let wall = std::time::Instant::now();
        let mut sim = Sim::new(n, 0.0, SEED);
        let converged = |s: &Sim| {
            s.live().all(|(_, node)| {
                node.alive().len() == n - 1 && lock(&node.knowledge).metas.len() == n - 1
            })
        };
        let took_ms = sim.run_until(600_000, converged).expect("converges");
        println!(
            "{n} nodes: all up with metadata after {took_ms} ms virtual, {} messages, {:?} wall",
            sim.messages,
            wall.elapsed()
        );
        sim.crash(7);
        let took_ms = sim
            .run_until(120_000, |s| s.all_see(7, MemberState::Down))
            .expect("crash detected");
        println!(
            "crash seen by all after {took_ms} ms virtual, {:?} wall",
            wall.elapsed()
        );
    }

    fn converged_cluster(n: usize, loss: f64) -> (Sim, u64) {
        let mut sim = Sim::new(n, loss, SEED);
        let took = sim.converge(60_000, "cluster converges");
        (sim, took)
    }

    #[test]
    fn twenty_nodes_join_through_one_seed() {
        let (sim, took_ms) = converged_cluster(20, 0.0);
        println!(
            "20 nodes: all Alive with metadata after {took_ms} ms virtual, {} messages",
            sim.messages
        );
        assert!(took_ms <= 10_000, "took {took_ms} ms");
        assert_eq!(sim.errors, 0);
        // Each node saw every other come up exactly once.
        for (i, events) in sim.events.iter().enumerate() {
            let ups = events
                .iter()
                .filter(|(_, e)| matches!(e, MembershipEvent::Up(_)))
                .count();
            assert_eq!(ups, 19, "node {i}: {events:?}");
        }
    }

    #[test]
    fn crashed_node_is_seen_down_by_all() {
        let (mut sim, _) = converged_cluster(20, 0.0);
        let since_ms = sim.now_ms;
        sim.crash(7);
        let took_ms = sim
            .run_until(60_000, |s| s.all_see(7, MemberState::Down))
            .expect("crash detected");
        println!("crash of 1 in 20 seen Down by all after {took_ms} ms virtual");
        assert!(took_ms <= 20_000, "took {took_ms} ms");
        let downs = sim
            .events_about(7, since_ms)
            .into_iter()
            .filter(|e| *e == MembershipEvent::Down(node_id(7)))
            .count();
        assert_eq!(downs, 19);
        assert!(!sim.live().any(|(_, n)| n.alive().contains(&node_id(7))));
    }

    #[test]
    fn leaving_node_is_seen_left_not_down() {
        let (mut sim, _) = converged_cluster(20, 0.0);
        let since_ms = sim.now_ms;
        let out = sim.nodes[5].as_mut().expect("live").leave();
        sim.apply(5, out);
        // Inert after leave: stop it like a process that exits.
        sim.crash(5);
        let took_ms = sim
            .run_until(30_000, |s| s.all_see(5, MemberState::Left))
            .expect("leave seen");
        println!("leave seen Left by all after {took_ms} ms virtual");
        // Still Left (not Down) once suspicion timers would have fired.
        sim.run_for(20_000);
        assert!(sim.all_see(5, MemberState::Left));
        assert_eq!(
            sim.events_about(5, since_ms),
            vec![MembershipEvent::Left(node_id(5)); 19]
        );
    }

    #[test]
    fn restarted_node_with_higher_incarnation_is_alive_again() {
        let (mut sim, _) = converged_cluster(20, 0.0);
        sim.crash(3);
        sim.run_until(60_000, |s| s.all_see(3, MemberState::Down))
            .expect("crash detected");
        sim.start(3, 1, meta_of(3, 1));
        let took_ms = sim
            .run_until(30_000, Sim::converged)
            .expect("restarted node back, with its new metadata");
        println!("restart seen Alive (new metadata) by all after {took_ms} ms virtual");
        let node = sim.nodes[3].as_ref().expect("live");
        assert_eq!(node.incarnation(), 1);
        for (i, other) in sim.live().filter(|(i, _)| *i != 3) {
            let seen = other.member(node_id(3)).expect("known");
            assert_eq!(seen.state, MemberState::Alive, "node {i}");
        }
    }

    #[test]
    fn node_cut_off_then_healed_rejoins() {
        let (mut sim, _) = converged_cluster(20, 0.0);
        sim.side[11] = 1;
        sim.run_until(60_000, |s| s.all_see(11, MemberState::Down))
            .expect("cut-off node declared down");
        sim.side[11] = 0;
        let took_ms = sim
            .run_until(60_000, Sim::converged)
            .expect("healed node back in everyone's view, and everyone in its");
        println!("cut-off node back after healing: {took_ms} ms virtual");
        let node = sim.nodes[11].as_ref().expect("live");
        assert!(node.incarnation() > 0, "renewed its identity");
        assert!(sim.events[11]
            .iter()
            .any(|(_, e)| *e == MembershipEvent::Rejoined));
    }

    /// The leave notice's late paths, driven by hand: a notice for a member
    /// still up marks it Left at once; one for a member already down upgrades
    /// it to Left; a node that knows answers "did it leave?".
    #[test]
    fn leave_notice_outranks_down_and_is_answered() {
        let (mut sim, _) = converged_cluster(4, 0.0);
        let reply = |node: usize| {
            let notice = Notice::Leave {
                node: node_id(node),
                incarnation: 0,
            };
            encode_frame(
                KIND_LEAVE_REPLY,
                &postcard::to_allocvec(&notice).expect("encodes"),
            )
        };
        let since_ms = sim.now_ms;
        let out = sim.nodes[0]
            .as_mut()
            .expect("live")
            .handle_payload(&reply(3));
        sim.apply(0, out.expect("accepted"));
        assert_eq!(
            sim.events_about(3, since_ms),
            vec![MembershipEvent::Left(node_id(3))]
        );
        let node = sim.nodes[0].as_ref().expect("live");
        assert_eq!(
            node.member(node_id(3)).map(|m| m.state),
            Some(MemberState::Left)
        );
        assert!(!node.alive().contains(&node_id(3)));

        sim.crash(2);
        sim.run_until(30_000, |s| s.all_see(2, MemberState::Down))
            .expect("crash detected");
        let since_ms = sim.now_ms;
        let out = sim.nodes[1]
            .as_mut()
            .expect("live")
            .handle_payload(&reply(2));
        sim.apply(1, out.expect("accepted"));
        assert_eq!(
            sim.events_about(2, since_ms),
            vec![MembershipEvent::Left(node_id(2))]
        );

        // Node 1 now knows node 2 left: it answers node 0's question.
        let query = LeaveQuery {
            from: addr(0),
            node: node_id(2),
            incarnation: 0,
        };
        let query = encode_frame(
            KIND_LEAVE_QUERY,
            &postcard::to_allocvec(&query).expect("encodes"),
        );
        let out = sim.nodes[1].as_mut().expect("live").handle_payload(&query);
        let answered = out.expect("accepted").into_iter().any(|o| {
            matches!(o, MembershipOutput::Send { to, ref payload }
                if to == addr(0) && decode_frame(payload, usize::MAX).is_ok_and(|(k, _)| k == KIND_LEAVE_REPLY))
        });
        assert!(answered);
    }

    #[test]
    fn set_meta_reaches_everyone() {
        let (mut sim, _) = converged_cluster(20, 0.0);
        // Two changes in a row: the newer must replace the older everywhere.
        let out = sim.nodes[2].as_mut().expect("live").set_meta(meta_of(2, 1));
        sim.apply(2, out);
        sim.run_for(3);
        let out = sim.nodes[2].as_mut().expect("live").set_meta(meta_of(2, 2));
        sim.apply(2, out);
        sim.declared[2] = meta_of(2, 2);
        let took_ms = sim.run_until(30_000, Sim::converged).expect("meta spread");
        println!("set_meta seen by all after {took_ms} ms virtual");
        assert_eq!(sim.nodes[2].as_ref().expect("live").meta(), &meta_of(2, 2));
        // And stays there: nothing older comes back.
        sim.run_for(5_000);
        assert!(sim.converged());
        assert!(sim
            .events_about(2, 0)
            .contains(&MembershipEvent::MetaChanged(node_id(2))));
    }

    #[test]
    fn converges_with_five_percent_loss() {
        let (mut sim, took_ms) = converged_cluster(20, 0.05);
        println!("20 nodes, 5% loss: converged after {took_ms} ms virtual");
        assert!(took_ms <= 30_000, "took {took_ms} ms");
        let out = sim.nodes[9].as_mut().expect("live").set_meta(meta_of(9, 1));
        sim.apply(9, out);
        sim.declared[9] = meta_of(9, 1);
        sim.run_until(30_000, Sim::converged)
            .expect("meta spreads despite loss");
        sim.crash(4);
        sim.run_until(60_000, |s| s.all_see(4, MemberState::Down))
            .expect("crash detected despite loss");
    }

    #[test]
    fn same_seed_same_run() {
        let run = || {
            let mut sim = Sim::new(8, 0.05, 7);
            sim.run_for(5_000);
            (sim.now_ms, sim.messages, sim.events)
        };
        assert_eq!(run(), run());
    }

    /// Payloads `node` received during a short run, to corrupt.
    fn captured_payloads(sim: &mut Sim, node: usize) -> Vec<Vec<u8>> {
        let mut captured = Vec::new();
        let end = sim.now_ms + 3_000;
        while let Some(Reverse(next)) = sim.queue.peek() {
            if next.at_ms > end {
                break;
            }
            if let (true, Item::Payload(p)) = (next.node == node, &next.item) {
                captured.push(p.clone());
            }
            sim.step();
        }
        captured
    }

    #[test]
    fn garbage_and_truncated_payloads_are_refused_without_effect() {
        let (mut sim, _) = converged_cluster(6, 0.0);
        let captured = captured_payloads(&mut sim, 1);
        assert!(!captured.is_empty());
        let node = sim.nodes[1].as_mut().expect("live");
        let members = node.members();
        let mut rng = StdRng::seed_from_u64(SEED);
        let refuse = |node: &mut Membership, payload: &[u8]| {
            let result = node.handle_payload(payload);
            assert!(result.is_err(), "accepted {payload:?}");
            assert_eq!(node.members(), members);
        };
        for len in [0, 1, 5, 13, 14, 15, 100, 1000] {
            let mut garbage = vec![0u8; len];
            rng.fill_bytes(&mut garbage);
            refuse(node, &garbage);
            // Garbage behind a correct magic and version too.
            if len >= HEADER_LEN {
                garbage[..MAGIC.len()].copy_from_slice(&MAGIC);
                garbage[MAGIC.len()] = PROTOCOL_VERSION;
                refuse(node, &garbage);
            }
        }
        refuse(node, &vec![0u8; node.config.max_payload_len() + 1]);
        for payload in &captured {
            for cut in 0..payload.len() {
                refuse(node, &payload[..cut]);
            }
            let mut flipped = payload.clone();
            let at = rng.random_range(0..flipped.len());
            flipped[at] ^= 1 << rng.random_range(0..8);
            refuse(node, &flipped);
        }
        let mut other_version = encode_frame(KIND_SWIM, b"anything");
        other_version[MAGIC.len()] = PROTOCOL_VERSION + 1;
        assert!(matches!(
            node.handle_payload(&other_version),
            Err(MembershipError::UnsupportedVersion(_))
        ));
        assert!(matches!(
            node.handle_payload(&encode_frame(9, b"")),
            Err(MembershipError::UnknownKind(9))
        ));
        assert!(matches!(
            node.handle_payload(&encode_frame(KIND_META_REPLY, b"\xff\xff")),
            Err(MembershipError::Malformed(_))
        ));
        // The node still works: the cluster stays converged.
        sim.run_for(5_000);
        assert!(sim.converged());
    }

    #[test]
    fn joining_through_own_address_is_a_no_op() {
        let config = MembershipConfig::simulation(1);
        let mut node = Membership::new(node_id(0), addr(0), 0, meta_of(0, 0), config, 1);
        assert!(node.join(addr(0)).is_empty());
        assert!(node.members().is_empty());
    }

    #[test]
    fn long_zone_is_cut_at_a_char_boundary() {
        let mut meta = meta_of(0, 0);
        meta.zone = Some("é".repeat(MAX_ZONE_BYTES));
        let node = Membership::new(node_id(0), addr(0), 0, meta, MembershipConfig::default(), 1);
        let zone = node.meta().zone.as_deref().unwrap_or_default();
        assert!(zone.len() <= MAX_ZONE_BYTES && zone.chars().all(|c| c == 'é'));
    }

    #[test]
    fn membership_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Membership>();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut node = Membership::new(
                node_id(0), addr(0), 0, meta_of(0, 0), MembershipConfig::simulation(4), 1,
            );
            prop_assert!(node.handle_payload(&bytes).is_err());
            prop_assert!(node.members().is_empty());
        }

        /// Well-framed bodies reach foca's and postcard's decoders: whatever
        /// they make of them, nothing panics.
        #[test]
        fn framed_garbage_never_panics(
            kind in 0u8..4,
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut node = Membership::new(
                node_id(0), addr(0), 0, meta_of(0, 0), MembershipConfig::simulation(4), 1,
            );
            let _ = node.handle_payload(&encode_frame(kind, &body));
            let _ = node.members();
        }
    }
}
