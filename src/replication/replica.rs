//! One node's replication core: membership, layout, anti-entropy,
//! migration, hand-off and purge, driven by messages and timers.
//!
//! The driver (the QUIC node or the simulator) calls [`Replica::start`],
//! then feeds every received message to [`Replica::handle_message`] and
//! every due timer to [`Replica::handle_timer`], each with the current time,
//! and carries out the returned [`Output`]s: send a message, schedule a
//! timer, report an event. Nothing here reads a clock or touches a socket.
//!
//! Anti-entropy, each round: pick a peer (one that shares partitions when
//! there is one), send one hash over the version vectors of the partitions
//! both hold. Equal: the peer answers `InSync` and the round ends. Else the
//! peer sends per-partition hashes, the initiator sends the vectors of the
//! partitions that differ, and each side streams `changes_since` the other's
//! vector: both directions repair, and only what differs moves.
//!
//! Migration, for each partition this node gained in the current layout:
//! phase 1 asks a complete replica for everything its vector lacks; phase 2
//! asks again with the vector phase 1 left, catching writes made meanwhile;
//! then the node marks itself ready, which spreads with the layout. A
//! stream cut short keeps what arrived, and the retry asks only for the rest.
//!
//! Hand-off: a node holding data of a partition it no longer holds pushes it
//! to a current replica and drops it only once that replica's vector covers
//! its own, so writes it took late in a transition are not lost.
//!
//! Purge: when the vectors of every holder of a partition are known, their
//! meet is causally stable and tombstones it covers are removed.

use super::layout::NodeSpec;
use super::layout_state::LayoutState;
use super::membership::{
    Addr, MemberState, Membership, MembershipConfig, MembershipError, MembershipEvent,
    MembershipOutput, MembershipTimer, NodeMeta,
};
use super::message::{LayoutSummary, Message, StreamPurpose};
use super::tokens::{TokenError, TokenRecord, TokenRegistry};
use crate::crdt::{NodeId, VersionVector};
use crate::store::{ChangeChunk, ChunkLimits, GroupOutcome, GroupWrite, Store};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Tuning of the replication core.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Time between anti-entropy rounds.
    pub anti_entropy_interval: Duration,
    /// Time between maintenance passes (layout, migrations, hand-off).
    pub maintenance_interval: Duration,
    /// Partitions migrating into this node at once.
    pub migration_parallelism: usize,
    /// A migration stream silent this long is asked for again.
    pub migration_timeout: Duration,
    /// Time between tombstone purges.
    pub purge_interval: Duration,
    /// A member down this long is taken out of the layout. A member of the
    /// layout this node has not heard from since it started counts as down
    /// since then.
    pub remove_down_after: Duration,
    /// For a node that starts a new cluster: make the first layout once
    /// this many members (itself included) are alive. `None` for a node
    /// that joins an existing cluster: it waits to receive the layout.
    pub bootstrap_expect: Option<usize>,
    pub chunk_limits: ChunkLimits,
    pub membership: MembershipConfig,
    /// Bytes per second this node sends migration chunks at, all streams
    /// together (`None`: as fast as it can). Changed at run time with
    /// [`Replica::set_migration_budget`].
    pub migration_budget: Option<u64>,
    /// A migration stream without progress this long is shown as stalled
    /// (it is asked for again after `migration_timeout`).
    pub migration_stall_after: Duration,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            anti_entropy_interval: Duration::from_secs(1),
            maintenance_interval: Duration::from_secs(1),
            migration_parallelism: 8,
            migration_timeout: Duration::from_secs(10),
            purge_interval: Duration::from_secs(30),
            remove_down_after: Duration::from_secs(300),
            bootstrap_expect: None,
            chunk_limits: ChunkLimits::default(),
            membership: MembershipConfig::default(),
            migration_budget: None,
            migration_stall_after: Duration::from_secs(5),
        }
    }
}

/// Timers the core asks the driver to fire.
#[derive(Clone, Debug)]
pub enum Timer {
    AntiEntropy,
    Maintenance,
    /// Release paced migration chunks.
    Pace,
    Purge,
    Membership(MembershipTimer),
}

/// What the driver must do.
#[derive(Debug)]
pub enum Output {
    Send {
        to: Addr,
        message: Message,
    },
    Schedule {
        after: Duration,
        timer: Timer,
    },
    Event(ReplicaEvent),
    /// A write to commit with the node's other writes (a chunk, a purge, a
    /// drop); its outcome comes back through [`Replica::stored`], in the
    /// order queued.
    Store {
        token: u64,
        write: GroupWrite,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaEvent {
    Membership(MembershipEventKind),
    /// The API token registry changed (to be persisted and enforced).
    TokensChanged {
        tokens: usize,
    },
    LayoutChanged {
        version: u64,
        completed: u64,
    },
    MigrationStarted {
        partition: u16,
        source: NodeId,
    },
    MigrationDone {
        partition: u16,
    },
    PartitionDropped {
        partition: u16,
    },
    Purged {
        partition: u16,
        tombstones: usize,
    },
    /// A decommission finished: this node holds nothing and left.
    SafeToStop,
    /// A store write of the replica failed (a peer's chunk that does not
    /// check, or a storage error); what it was for did not happen.
    StoreFailed {
        partition: u16,
        reason: String,
    },
}

/// A membership change, as reported in events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEventKind {
    Up(NodeId),
    Down(NodeId),
    Left(NodeId),
    MetaChanged(NodeId),
    Rejoined,
}

/// Why a message was refused. No state changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    #[error("membership payload refused: {0}")]
    Membership(#[from] MembershipError),
    #[error("store: {0}")]
    Store(#[from] crate::Error),
    #[error("peer {peer} sent {what} for partition {partition}, which is out of range")]
    PartitionOutOfRange {
        peer: NodeId,
        what: &'static str,
        partition: u16,
    },
    #[error("peer {peer} sent a layout that is invalid: {reason}")]
    BadLayout { peer: NodeId, reason: String },
    #[error("peer {peer} sent an API token registry that is invalid: {reason}")]
    BadTokens { peer: NodeId, reason: String },
}

/// Counters for metrics and simulations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    pub rounds_started: u64,
    pub rounds_in_sync: u64,
    pub repair_entries_received: u64,
    pub migration_entries_received: u64,
    /// Key and entry bytes of migration chunks sent to other nodes.
    pub migration_bytes_sent: u64,
    pub migrations_done: u64,
    pub partitions_dropped: u64,
    pub tombstones_purged: u64,
    pub streams_broken: u64,
    /// Migration streams asked for again (a gap, a silent source).
    pub migration_restarts: u64,
}

struct Inbound {
    next: u32,
    last_chunk: Duration,
}

/// What a store write queued by the replica was for.
enum StoreWait {
    Chunk {
        from: NodeId,
        stream: u64,
        partition: u16,
        /// The migration phase it belongs to, if any.
        migration: Option<u8>,
        entries: u64,
        bytes: u64,
        /// The source's vector, on a stream's last chunk.
        complete: Option<VersionVector>,
        /// The layout version of the push fence it answers, if any.
        fence: Option<u64>,
    },
    /// Everything queued before it is committed: answer a fence request.
    FenceBarrier {
        from: NodeId,
        stream: u64,
        partition: u16,
        layout: u64,
        since: VersionVector,
    },
    Purge {
        partition: u16,
    },
    Drop {
        partition: u16,
    },
}

/// Progress of the migrations into this node for the current layout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationProgress {
    /// Layout version these figures are for.
    pub layout_version: u64,
    /// Partitions this node gains in that layout.
    pub total: usize,
    /// Of those, ready.
    pub done: usize,
    /// Entries merged and key + entry bytes received by migration streams.
    pub entries: u64,
    pub bytes: u64,
    /// Since the layout change began, in the driver's time.
    pub elapsed: Duration,
}

struct Migration {
    phase: u8,
    stream: u64,
    source: NodeId,
    last_progress: Duration,
    /// When this stream was asked for.
    started: Duration,
    /// What the source announced it sends (entries, bytes).
    announced: Option<(u64, u64)>,
    /// Entries and bytes of this stream applied.
    entries: u64,
    bytes: u64,
    /// Streams for this partition asked for again after a stall.
    restarts: u32,
    /// When the source last sent anything for this stream (chunk,
    /// announcement or heartbeat): a stream is asked for again only when
    /// this is old, not when the source is pacing it.
    last_heard: Duration,
    /// What the source's last heartbeat said it still holds back.
    source_queued: Option<u64>,
    /// When the stream was last asked for.
    requested_at: Duration,
}

impl Migration {
    fn new(phase: u8, stream: u64, source: NodeId, now: Duration, restarts: u32) -> Migration {
        Migration {
            phase,
            stream,
            source,
            last_progress: now,
            started: now,
            announced: None,
            entries: 0,
            bytes: 0,
            restarts,
            last_heard: now,
            source_queued: None,
            requested_at: now,
        }
    }
}

/// A migration stream into this node, for `kvctl migrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationStream {
    pub partition: u16,
    pub phase: u8,
    pub source: NodeId,
    /// What the source announced (entries, bytes), once it has.
    pub announced: Option<(u64, u64)>,
    pub entries: u64,
    pub bytes: u64,
    pub running_for: Duration,
    pub since_progress: Duration,
    pub restarts: u32,
    /// Why it is stalled, when it has made no progress for
    /// `migration_stall_after`.
    pub stalled: Option<String>,
}

/// A migration request whose source answers an older stream instead is
/// sent again after this long.
const REQUEST_AGAIN_AFTER: Duration = Duration::from_millis(500);

/// The smallest migration chunk under a budget, in payload bytes.
const MIN_PACED_CHUNK_BYTES: usize = 4096;

/// Peers a node passes a token registry change on to.
const TOKEN_FANOUT: usize = 3;

pub struct Replica {
    id: NodeId,
    store: Arc<Store>,
    membership: Membership,
    layout: LayoutState,
    /// The cluster's API tokens (see `tokens`).
    tokens: TokenRegistry,
    config: ReplicaConfig,
    rng: StdRng,
    now: Duration,
    next_id: u64,
    /// Anti-entropy rounds this node opened: round -> (peer, when).
    rounds: HashMap<u64, (NodeId, Duration)>,
    /// Chunk streams being received, by (sender, stream).
    inbound: HashMap<(NodeId, u64), Inbound>,
    migrations: BTreeMap<u16, Migration>,
    /// Progress figures and when the current round of migrations began.
    progress: MigrationProgress,
    progress_started: Duration,
    /// Migration chunks this node sends, within its budget.
    pacer: super::pacing::Pacer,
    pace_scheduled: bool,
    /// The latest version vector each peer reported per partition: a lower
    /// bound of what it holds (vectors only grow).
    peer_versions: HashMap<(u16, NodeId), VersionVector>,
    down_since: HashMap<NodeId, Duration>,
    /// Members of the layout this node has no metadata for (not heard from
    /// since it started), and since when.
    unknown_since: HashMap<NodeId, Duration>,
    /// When an anti-entropy round with each peer last began.
    last_contact: HashMap<NodeId, Duration>,
    leaving: bool,
    left: bool,
    stats: ReplicaStats,
    out: Vec<Output>,
    /// Store writes queued, by token.
    storing: HashMap<u64, StoreWait>,
    /// Per partition this node is the primary replica of: its push fence
    /// (see `push_fenced`).
    fences: BTreeMap<u16, PushFence>,
}

/// A primary replica's confirmation that no other node still applies
/// pushed writes of a partition, for one layout version.
#[derive(Debug)]
struct PushFence {
    layout: u64,
    /// Nodes that answered: they knew the layout and sent what they held.
    answered: std::collections::BTreeSet<NodeId>,
    /// Carried from the first layout, before which no node was a primary:
    /// nothing to wait for.
    from_first: bool,
    started: Duration,
    asked: Option<Duration>,
}

impl Replica {
    /// A core for `store`'s node at `addr`. `layout` is the layout state to
    /// start from: a bootstrap layout for a new cluster, the persisted one
    /// after a restart, or an empty one for a node that will join.
    pub fn new(
        store: Arc<Store>,
        addr: Addr,
        incarnation: u32,
        meta: NodeMeta,
        layout: LayoutState,
        config: ReplicaConfig,
        seed: u64,
    ) -> Self {
        let id = store.node_id();
        let membership =
            Membership::new(id, addr, incarnation, meta, config.membership.clone(), seed);
        let budget = config.migration_budget;
        Replica {
            id,
            store,
            membership,
            layout,
            tokens: TokenRegistry::new(),
            config,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed_1e55),
            now: Duration::ZERO,
            next_id: 1,
            rounds: HashMap::new(),
            inbound: HashMap::new(),
            migrations: BTreeMap::new(),
            progress: MigrationProgress::default(),
            progress_started: Duration::ZERO,
            pacer: {
                let mut pacer = super::pacing::Pacer::default();
                pacer.set_budget(budget, Duration::ZERO);
                pacer
            },
            pace_scheduled: false,
            peer_versions: HashMap::new(),
            down_since: HashMap::new(),
            unknown_since: HashMap::new(),
            last_contact: HashMap::new(),
            leaving: false,
            left: false,
            stats: ReplicaStats::default(),
            out: Vec::new(),
            storing: HashMap::new(),
            fences: BTreeMap::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn layout(&self) -> &LayoutState {
        &self.layout
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn stats(&self) -> &ReplicaStats {
        &self.stats
    }

    /// Partitions migrating into this node now.
    pub fn migrating(&self) -> Vec<u16> {
        self.migrations.keys().copied().collect()
    }

    /// How far the migrations into this node have come.
    pub fn migration_progress(&self) -> MigrationProgress {
        let pending = self.layout.pending_migrations(self.id).len();
        MigrationProgress {
            done: self.progress.total.saturating_sub(pending),
            elapsed: self.now.saturating_sub(self.progress_started),
            ..self.progress.clone()
        }
    }

    /// Migrations in flight: (partition, source node).
    pub fn migration_sources(&self) -> Vec<(u16, NodeId)> {
        self.migrations
            .iter()
            .map(|(&p, m)| (p, m.source))
            .collect()
    }

    /// Schedules the first rounds, spread so that nodes do not beat in step.
    #[must_use]
    pub fn start(&mut self, now: Duration) -> Vec<Output> {
        self.now = now;
        let jitter = |rng: &mut StdRng, d: Duration| d.mul_f64(rng.random_range(0.0..1.0));
        let ae = jitter(&mut self.rng, self.config.anti_entropy_interval);
        let mt = jitter(&mut self.rng, self.config.maintenance_interval);
        self.schedule(ae, Timer::AntiEntropy);
        self.schedule(mt, Timer::Maintenance);
        self.schedule(self.config.purge_interval, Timer::Purge);
        self.drain()
    }

    /// Joins the cluster through a seed address.
    #[must_use]
    pub fn join(&mut self, now: Duration, seed: Addr) -> Vec<Output> {
        self.now = now;
        let outputs = self.membership.join(seed);
        self.absorb_membership(outputs);
        self.drain()
    }

    /// Decommissions this node: it announces capacity 0 so that the layout
    /// moves every partition away, keeps serving while they migrate, hands
    /// off what it still holds, and only then leaves the membership and
    /// reports [`ReplicaEvent::SafeToStop`].
    #[must_use]
    pub fn leave(&mut self, now: Duration) -> Vec<Output> {
        self.now = now;
        if !self.leaving {
            self.leaving = true;
            let mut meta = self.membership.meta().clone();
            meta.capacity = 0;
            let outputs = self.membership.set_meta(meta);
            self.absorb_membership(outputs);
        }
        self.drain()
    }

    /// Whether this node is leaving the cluster (it applies no pushed
    /// writes from then on: see `push_fenced`).
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// True once a decommission finished: nothing is held, the membership
    /// was told, the process may stop.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Changes this node's capacity, zone or load figures.
    #[must_use]
    pub fn set_meta(&mut self, now: Duration, meta: NodeMeta) -> Vec<Output> {
        self.now = now;
        let outputs = self.membership.set_meta(meta);
        self.absorb_membership(outputs);
        self.drain()
    }

    /// The members as the layout sees them now (what the planner plans
    /// for).
    pub fn layout_specs(&mut self, now: Duration) -> Vec<NodeSpec> {
        self.now = now;
        self.desired_specs()
    }

    /// Applies the load planner's `moves` to the current layout, which must
    /// still be version `base` and not changing. The new layout spreads by
    /// gossip like any other; [`Layout::next`] keeps it (see
    /// `Layout::with_moves`).
    pub fn apply_layout_moves(
        &mut self,
        now: Duration,
        base: u64,
        moves: &[super::layout::LayoutMove],
    ) -> Result<Vec<Output>, String> {
        self.now = now;
        let current = self.layout.current().version();
        if self.layout.in_transition() {
            return Err(format!(
                "layout v{current} is still being applied (complete up to v{}): wait until it completes",
                self.layout.completed().version()
            ));
        }
        if current != base {
            return Err(format!(
                "the layout changed since the plan was made (v{base}, now v{current}): make a new plan"
            ));
        }
        // A move to a node this node does not see up would leave the
        // partition waiting for it: plan from a node that sees the cluster.
        let alive = self.membership.alive();
        for m in moves {
            let (super::layout::LayoutMove::Lead { to, .. }
            | super::layout::LayoutMove::Replace { to, .. }) = *m;
            if to != self.id && !alive.contains(&to) {
                return Err(format!(
                    "node {to} is not up as this node sees it: make a new plan once it is"
                ));
            }
        }
        let specs = self.desired_specs();
        let next = self
            .layout
            .current()
            .with_moves(&specs, moves)
            .map_err(|e| format!("the plan no longer fits the cluster: {e}; make a new plan"))?;
        if !self.layout.install(next) {
            return Err("the layout changed while the plan was applied: make a new plan".into());
        }
        self.layout_changed();
        Ok(self.drain())
    }

    #[must_use]
    pub fn handle_timer(&mut self, now: Duration, timer: Timer) -> Vec<Output> {
        self.now = now;
        match timer {
            Timer::AntiEntropy => {
                self.anti_entropy_round();
                self.schedule(self.config.anti_entropy_interval, Timer::AntiEntropy);
            }
            Timer::Pace => {
                self.pace_scheduled = false;
                self.pace();
            }
            Timer::Maintenance => {
                self.maintenance();
                self.schedule(self.config.maintenance_interval, Timer::Maintenance);
            }
            Timer::Purge => {
                self.purge();
                self.schedule(self.config.purge_interval, Timer::Purge);
            }
            Timer::Membership(t) => {
                let outputs = self.membership.handle_timer(t);
                self.absorb_membership(outputs);
            }
        }
        self.drain()
    }

    /// Handles a message from `from`. On error nothing changed; the driver
    /// should log it and drop the message.
    pub fn handle_message(
        &mut self,
        now: Duration,
        from: NodeId,
        message: Message,
    ) -> Result<Vec<Output>, ReplicaError> {
        self.now = now;
        let result = self.dispatch(from, message);
        let outputs = self.drain();
        result.map(|()| outputs)
    }

    fn dispatch(&mut self, from: NodeId, message: Message) -> Result<(), ReplicaError> {
        match message {
            Message::Membership(payload) => {
                let outputs = self.membership.handle_payload(&payload)?;
                self.absorb_membership(outputs);
            }
            Message::Digest {
                round,
                layout,
                hash,
                tokens,
            } => {
                if tokens != self.tokens.hash() {
                    self.send(from, Message::Tokens(self.tokens.clone()));
                }
                self.on_digest(from, round, layout, hash)?
            }
            Message::Tokens(registry) => self.on_tokens(from, registry)?,
            Message::InSync { round } => self.on_in_sync(from, round)?,
            Message::PartitionHashes { round, hashes } => self.on_hashes(from, round, hashes)?,
            Message::Versions {
                round,
                versions,
                reply,
            } => self.on_versions(from, round, versions, reply)?,
            Message::Chunk {
                stream,
                index,
                purpose,
                chunk,
            } => self.on_chunk(from, stream, index, purpose, chunk)?,
            Message::MigrateRequest {
                stream,
                partition,
                phase,
                since,
            } => {
                self.check_partition(from, "a migration request", partition)?;
                let purpose = StreamPurpose::Migration { phase };
                self.stream_changes(from, stream, partition, &since, purpose)?;
            }
            Message::MigrateStart {
                stream,
                partition,
                entries,
                bytes,
            } => {
                self.check_partition(from, "a migration announcement", partition)?;
                if let Some(m) = self
                    .migrations
                    .get_mut(&partition)
                    .filter(|m| m.stream == stream && m.source == from)
                {
                    m.announced = Some((entries, bytes));
                    m.last_progress = self.now;
                    m.last_heard = self.now;
                }
            }
            Message::MigrateCancel { stream } => self.pacer.cancel(from, stream),
            Message::MigrateWaiting {
                stream,
                partition,
                bytes_queued,
            } => {
                self.check_partition(from, "a migration heartbeat", partition)?;
                if let Some(m) = self
                    .migrations
                    .get_mut(&partition)
                    .filter(|m| m.stream == stream && m.source == from)
                {
                    m.last_heard = self.now;
                    m.source_queued = Some(bytes_queued);
                    // The stream is alive: keep its place in the order.
                    if let Some(inbound) = self.inbound.get_mut(&(from, stream)) {
                        inbound.last_chunk = self.now;
                    }
                } else {
                    self.unwanted_stream(from, stream, partition);
                }
            }
            Message::FenceRequest {
                stream,
                partition,
                layout,
                since,
            } => {
                self.check_partition(from, "a fence request", partition)?;
                self.on_fence_request(from, stream, partition, layout, since);
            }
            Message::Layout(state) => self.on_layout(from, state)?,
        }
        Ok(())
    }

    // ---- anti-entropy ----

    fn anti_entropy_round(&mut self) {
        let alive = self.membership.alive();
        if alive.is_empty() {
            return;
        }
        let sharing: Vec<NodeId> = alive
            .iter()
            .copied()
            .filter(|&n| !self.shared_partitions(n).is_empty())
            .collect();
        // Mostly the peer sharing partitions that was synced with longest
        // ago (either side opening the round counts), so every pair of
        // co-replicas meets at least once per that many rounds; now and
        // then anyone, so that layout news reaches nodes that hold nothing
        // in common with us.
        let peer = if sharing.is_empty() || self.rng.random_range(0..8) == 0 {
            let Some(&peer) = alive.choose(&mut self.rng) else {
                return;
            };
            peer
        } else {
            let oldest = sharing
                .iter()
                .map(|n| self.last_contact.get(n).copied().unwrap_or_default())
                .min();
            let stale: Vec<NodeId> = sharing
                .iter()
                .copied()
                .filter(|n| Some(self.last_contact.get(n).copied().unwrap_or_default()) == oldest)
                .collect();
            let Some(&peer) = stale.choose(&mut self.rng) else {
                return;
            };
            peer
        };
        self.last_contact.insert(peer, self.now);
        let Ok(hash) = self.shared_hash(peer) else {
            return;
        };
        let round = self.fresh_id();
        self.rounds.insert(round, (peer, self.now));
        self.stats.rounds_started += 1;
        let layout = self.layout.summary();
        let tokens = self.tokens.hash();
        self.send(
            peer,
            Message::Digest {
                round,
                layout,
                hash,
                tokens,
            },
        );
    }

    /// Partitions both this node and `peer` hold, leaving out those either
    /// is migrating in (migration moves them; repairing them too would send
    /// the same entries twice).
    fn shared_partitions(&self, peer: NodeId) -> Vec<u16> {
        let mine_pending = self.layout.pending_migrations(self.id);
        let theirs_pending = self.layout.pending_migrations(peer);
        (0..self.layout.current().partitions())
            .filter(|&p| self.layout.holds(self.id, p) && self.layout.holds(peer, p))
            .filter(|p| !mine_pending.contains(p) && !theirs_pending.contains(p))
            .collect()
    }

    fn partition_hashes(&self, partitions: &[u16]) -> Result<Vec<(u16, u64)>, crate::Error> {
        let versions = self.store.partition_versions()?;
        Ok(partitions
            .iter()
            .map(|&p| (p, vector_hash(&versions[usize::from(p)])))
            .collect())
    }

    fn shared_hash(&self, peer: NodeId) -> Result<u64, crate::Error> {
        let hashes = self.partition_hashes(&self.shared_partitions(peer))?;
        let bytes: Vec<u8> = hashes
            .iter()
            .flat_map(|(p, h)| p.to_le_bytes().into_iter().chain(h.to_le_bytes()))
            .collect();
        Ok(xxhash_rust::xxh3::xxh3_64(&bytes))
    }

    fn on_digest(
        &mut self,
        from: NodeId,
        round: u64,
        layout: LayoutSummary,
        hash: u64,
    ) -> Result<(), ReplicaError> {
        self.last_contact.insert(from, self.now);
        if layout != self.layout.summary() {
            self.send(from, Message::Layout(self.layout.clone()));
        }
        let shared = self.shared_partitions(from);
        if self.shared_hash(from)? == hash {
            // Equal hashes: the peer's vectors are ours.
            let versions = self.store.partition_versions()?;
            for p in shared {
                self.peer_versions
                    .insert((p, from), versions[usize::from(p)].clone());
            }
            self.send(from, Message::InSync { round });
        } else {
            let hashes = self.partition_hashes(&shared)?;
            self.send(from, Message::PartitionHashes { round, hashes });
        }
        Ok(())
    }

    fn on_in_sync(&mut self, from: NodeId, round: u64) -> Result<(), ReplicaError> {
        if self.rounds.remove(&round).map(|(peer, _)| peer) == Some(from) {
            self.stats.rounds_in_sync += 1;
            let versions = self.store.partition_versions()?;
            for p in self.shared_partitions(from) {
                self.peer_versions
                    .insert((p, from), versions[usize::from(p)].clone());
            }
        }
        Ok(())
    }

    fn on_hashes(
        &mut self,
        from: NodeId,
        round: u64,
        hashes: Vec<(u16, u64)>,
    ) -> Result<(), ReplicaError> {
        if self.rounds.remove(&round).map(|(peer, _)| peer) != Some(from) {
            return Ok(()); // late or unsolicited
        }
        for &(p, _) in &hashes {
            self.check_partition(from, "a partition hash", p)?;
        }
        let versions = self.store.partition_versions()?;
        let differing: Vec<(u16, VersionVector)> = hashes
            .into_iter()
            .filter(|&(p, h)| {
                self.layout.holds(self.id, p) && vector_hash(&versions[usize::from(p)]) != h
            })
            .map(|(p, _)| (p, versions[usize::from(p)].clone()))
            .collect();
        if !differing.is_empty() {
            self.send(
                from,
                Message::Versions {
                    round,
                    versions: differing,
                    reply: true,
                },
            );
        }
        Ok(())
    }

    fn on_versions(
        &mut self,
        from: NodeId,
        round: u64,
        versions: Vec<(u16, VersionVector)>,
        reply: bool,
    ) -> Result<(), ReplicaError> {
        for (p, _) in &versions {
            self.check_partition(from, "a version vector", *p)?;
        }
        let mine = self.store.partition_versions()?;
        let mut answer = Vec::new();
        for (p, mut theirs) in versions {
            theirs.normalize();
            let own = &mine[usize::from(p)];
            if !theirs.dominates(own) {
                let stream = self.fresh_id();
                self.stream_changes(from, stream, p, &theirs, StreamPurpose::Repair)?;
            }
            if reply {
                answer.push((p, own.clone()));
            }
            let known = self.peer_versions.entry((p, from)).or_default();
            known.join(&theirs);
        }
        if reply && !answer.is_empty() {
            self.send(
                from,
                Message::Versions {
                    round,
                    versions: answer,
                    reply: false,
                },
            );
        }
        Ok(())
    }

    /// Sends `changes_since(partition, since)` to `to` as a chunk stream.
    fn stream_changes(
        &mut self,
        to: NodeId,
        stream: u64,
        partition: u16,
        since: &VersionVector,
        purpose: StreamPurpose,
    ) -> Result<(), ReplicaError> {
        let migration = matches!(purpose, StreamPurpose::Migration { .. });
        let mut limits = self.config.chunk_limits;
        if let (true, Some(budget)) = (migration, self.pacer.budget()) {
            // Under a budget, chunks of about a quarter second each: a
            // large chunk would go out on credit and leave every other
            // stream silent long enough to look stalled.
            let quarter = usize::try_from(budget / 4).unwrap_or(usize::MAX);
            limits.max_bytes = limits.max_bytes.min(quarter.max(MIN_PACED_CHUNK_BYTES));
        }
        let chunks = self.store.changes_since_with(partition, since, limits)?;
        if !migration {
            for (index, chunk) in chunks.enumerate() {
                let chunk = chunk?;
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                self.send(
                    to,
                    Message::Chunk {
                        stream,
                        index,
                        purpose,
                        chunk,
                    },
                );
            }
            return Ok(());
        }
        // A migration: announce what comes, then send it within the
        // migration budget.
        let mut paced = Vec::new();
        let (mut entries, mut bytes) = (0u64, 0u64);
        for (index, chunk) in chunks.enumerate() {
            let chunk = chunk?;
            let size = chunk.payload_bytes() as u64;
            entries += chunk.entries.len() as u64;
            bytes += size;
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let message = Message::Chunk {
                stream,
                index,
                purpose,
                chunk,
            };
            paced.push((message, size));
        }
        self.send(
            to,
            Message::MigrateStart {
                stream,
                partition,
                entries,
                bytes,
            },
        );
        self.pacer.push(to, stream, partition, paced, self.now);
        self.pace();
        Ok(())
    }

    /// Sends what the migration budget lets out now, and comes back for
    /// the rest.
    fn pace(&mut self) {
        for (to, message) in self.pacer.release(self.now) {
            self.send(to, message);
        }
        self.stats.migration_bytes_sent = self.pacer.released_bytes;
        if !self.pacer.is_empty() && !self.pace_scheduled {
            self.pace_scheduled = true;
            self.schedule(super::pacing::PACE_INTERVAL, Timer::Pace);
        }
    }

    /// Sets the bytes per second this node sends migration chunks at
    /// (`None` or 0: unlimited).
    #[must_use]
    pub fn set_migration_budget(&mut self, now: Duration, budget: Option<u64>) -> Vec<Output> {
        self.now = now;
        self.pacer.set_budget(budget, now);
        self.pace();
        self.drain()
    }

    pub fn migration_budget(&self) -> Option<u64> {
        self.pacer.budget()
    }

    /// Migration chunk bytes waiting for the budget.
    pub fn migration_bytes_queued(&self) -> u64 {
        self.pacer.queued_bytes()
    }

    /// Every migration stream into this node, with its progress and, if it
    /// is stalled, why.
    pub fn migration_streams(&self) -> Vec<MigrationStream> {
        let alive = self.membership.alive();
        self.migrations
            .iter()
            .map(|(&partition, m)| {
                let since_progress = self.now.saturating_sub(m.last_progress);
                let stalled = (since_progress >= self.config.migration_stall_after).then(|| {
                    let secs = since_progress.as_secs();
                    if !alive.contains(&m.source) {
                        format!("its source is not reachable ({secs} s without progress); it is asked of another holder after {} s", self.config.migration_timeout.as_secs())
                    } else if m.announced.is_none() {
                        format!("its source has not answered the request for {secs} s; it is asked again after {} s", self.config.migration_timeout.as_secs())
                    } else if let (Some(queued), true) = (m.source_queued, self.now.saturating_sub(m.last_heard) < self.config.migration_stall_after) {
                        format!("no chunk for {secs} s: its source holds {queued} bytes of it back for its migration budget")
                    } else {
                        format!("no chunk and no word from its source for {secs} s; it is asked again after {} s without word", self.config.migration_timeout.as_secs())
                    }
                });
                MigrationStream {
                    partition,
                    phase: m.phase,
                    source: m.source,
                    announced: m.announced,
                    entries: m.entries,
                    bytes: m.bytes,
                    running_for: self.now.saturating_sub(m.started),
                    since_progress,
                    restarts: m.restarts,
                    stalled,
                }
            })
            .collect()
    }

    fn on_chunk(
        &mut self,
        from: NodeId,
        stream: u64,
        index: u32,
        purpose: StreamPurpose,
        chunk: ChangeChunk,
    ) -> Result<(), ReplicaError> {
        let partition = chunk.partition;
        self.check_partition(from, "a chunk", partition)?;
        // Chunks apply only in order: a final chunk's claim is safe only
        // after every chunk before it. A gap breaks the stream; what was
        // applied stays, and the next exchange asks for the rest.
        let key = (from, stream);
        let expected = self.inbound.get(&key).map_or(0, |s| s.next);
        if index != expected {
            let broken = index > expected && self.inbound.remove(&key).is_some();
            if broken {
                self.stats.streams_broken += 1;
            }
            // A migration stream with a gap is asked for again at once,
            // from what was applied, rather than after the stall timeout:
            // the source replaces the rest of the broken stream with the
            // new one, so the gap costs one round trip, not the timeout's
            // worth of chunks that would be thrown away.
            let current = self
                .migrations
                .get(&partition)
                .filter(|m| m.stream == stream && m.source == from && index > expected);
            if let (StreamPurpose::Migration { .. }, Some(m)) = (purpose, current) {
                let (phase, restarts) = (m.phase, m.restarts + 1);
                self.migrations.remove(&partition);
                let alive = self.membership.alive();
                self.begin_migration(partition, phase, &alive, restarts);
            }
            return Ok(());
        }
        let migration = match purpose {
            StreamPurpose::Migration { phase } => {
                let current = self.migrations.get(&partition);
                if !current.is_some_and(|m| m.stream == stream && m.phase == phase) {
                    // A stream this node no longer waits for. If its source
                    // is the one asked for the current stream, that request
                    // was probably lost (a cut): ask again now, so the
                    // source replaces the old stream instead of spending its
                    // budget on chunks that are thrown away.
                    self.unwanted_stream(from, stream, partition);
                    return Ok(());
                }
                Some(phase)
            }
            StreamPurpose::Repair | StreamPurpose::Fence { .. } => {
                if !self.layout.holds(self.id, partition) {
                    return Ok(());
                }
                None
            }
        };
        let fence = match purpose {
            StreamPurpose::Fence { layout } => Some(layout),
            _ => None,
        };
        // Committed with the node's other writes; the chunks of a stream
        // commit in the order queued, so the last one's claim still comes
        // after every earlier chunk.
        let complete = chunk.complete.clone();
        if complete.is_none() {
            self.inbound.insert(
                key,
                Inbound {
                    next: expected + 1,
                    last_chunk: self.now,
                },
            );
        } else {
            self.inbound.remove(&key);
        }
        let wait = StoreWait::Chunk {
            from,
            stream,
            partition,
            migration,
            entries: chunk.entries.len() as u64,
            bytes: chunk.payload_bytes() as u64,
            complete,
            fence,
        };
        self.queue_store(GroupWrite::Chunk(chunk), wait);
        Ok(())
    }

    /// The outcome of a store write this replica queued (see
    /// [`Output::Store`]), once durable or failed.
    pub fn stored(
        &mut self,
        now: Duration,
        token: u64,
        outcome: Result<GroupOutcome, String>,
    ) -> Vec<Output> {
        self.now = now;
        if let Some(wait) = self.storing.remove(&token) {
            self.on_stored(wait, outcome);
        }
        self.drain()
    }

    fn on_stored(&mut self, wait: StoreWait, outcome: Result<GroupOutcome, String>) {
        let partition = match &wait {
            StoreWait::Chunk { partition, .. }
            | StoreWait::FenceBarrier { partition, .. }
            | StoreWait::Purge { partition }
            | StoreWait::Drop { partition } => *partition,
        };
        match (wait, outcome) {
            (
                StoreWait::Chunk {
                    from,
                    stream,
                    partition,
                    migration,
                    entries,
                    bytes,
                    complete,
                    fence,
                },
                Ok(GroupOutcome::Applied(report)),
            ) => {
                let merged = report.merged as u64;
                let current = self
                    .migrations
                    .get_mut(&partition)
                    .filter(|m| Some(m.phase) == migration && m.stream == stream);
                match migration {
                    Some(_) => {
                        self.stats.migration_entries_received += merged;
                        self.progress.entries += merged;
                        self.progress.bytes += bytes;
                    }
                    None => self.stats.repair_entries_received += merged,
                }
                let migrating = current.is_some();
                if let Some(m) = current {
                    m.last_progress = self.now;
                    m.last_heard = self.now;
                    m.entries += entries;
                    m.bytes += bytes;
                }
                if let Some(source_version) = complete {
                    self.peer_versions
                        .entry((partition, from))
                        .or_default()
                        .join(&source_version);
                    if let Some(layout) = fence {
                        if let Some(f) = self.fences.get_mut(&partition) {
                            if f.layout == layout {
                                f.answered.insert(from);
                            }
                        }
                    }
                    if let (Some(phase), true) = (migration, migrating) {
                        if let Err(e) = self.migration_phase_done(partition, phase) {
                            self.out.push(Output::Event(ReplicaEvent::StoreFailed {
                                partition,
                                reason: e.to_string(),
                            }));
                        }
                    }
                }
            }
            (
                StoreWait::FenceBarrier {
                    from,
                    stream,
                    partition,
                    layout,
                    since,
                },
                Ok(_),
            ) => {
                let purpose = StreamPurpose::Fence { layout };
                if let Err(e) = self.stream_changes(from, stream, partition, &since, purpose) {
                    self.out.push(Output::Event(ReplicaEvent::StoreFailed {
                        partition,
                        reason: e.to_string(),
                    }));
                }
            }
            (StoreWait::Purge { partition }, Ok(GroupOutcome::Purged(purged))) => {
                if purged > 0 {
                    self.stats.tombstones_purged += purged as u64;
                    self.out.push(Output::Event(ReplicaEvent::Purged {
                        partition,
                        tombstones: purged,
                    }));
                }
            }
            (StoreWait::Drop { partition }, Ok(GroupOutcome::Dropped(dropped))) => {
                if dropped.is_some() {
                    self.stats.partitions_dropped += 1;
                    self.out
                        .push(Output::Event(ReplicaEvent::PartitionDropped { partition }));
                }
            }
            (wait, outcome) => {
                if let StoreWait::Chunk { from, stream, .. } = wait {
                    // What arrived after it cannot be applied in order.
                    if self.inbound.remove(&(from, stream)).is_some() {
                        self.stats.streams_broken += 1;
                    }
                }
                let reason = match outcome {
                    Err(reason) => reason,
                    Ok(other) => format!("unexpected outcome {other:?}"),
                };
                self.out.push(Output::Event(ReplicaEvent::StoreFailed {
                    partition,
                    reason,
                }));
            }
        }
    }

    /// Whether a purge or drop of `partition` is queued already.
    fn storing_partition(&self, partition: u16) -> bool {
        self.storing.values().any(|w| {
            matches!(w, StoreWait::Purge { partition: p } | StoreWait::Drop { partition: p } if *p == partition)
        })
    }

    fn queue_store(&mut self, write: GroupWrite, wait: StoreWait) {
        let token = self.fresh_id();
        self.storing.insert(token, wait);
        self.out.push(Output::Store { token, write });
    }

    // ---- push fences ----
    //
    // A device's pushed write is applied by one replica only, the
    // partition's primary (first replica of the current layout), so that a
    // retry meets the record of the first attempt. When the primary moves,
    // a node that has not heard of the new layout yet still applies pushes
    // as the old primary. So a new primary applies none until every other
    // node it can reach has answered a fence request: the answer is sent
    // once that node knows the new layout (it applies no more pushes of
    // the partition) and has committed what it took before, and streams
    // what the new primary lacks. A retry then meets the first attempt's
    // record here. A member that is down, or cut off from here while
    // devices still reach it, is waited for until it would leave the
    // layout. A leaving node applies no pushes.

    /// Whether this node may apply pushed writes of `partition` now: it is
    /// the primary replica and its fence for the current layout is done.
    /// The first layout needs none (no earlier primary existed).
    pub fn push_fenced(&self, partition: u16) -> bool {
        let version = self.layout.current().version();
        if version <= 1 {
            return true;
        }
        self.fences
            .get(&partition)
            .is_some_and(|f| f.layout == version && self.fence_waiting(f).is_empty())
    }

    /// Partitions this node is the primary of and still fences: (partition,
    /// nodes yet to answer).
    pub fn push_fences_pending(&self) -> Vec<(u16, Vec<NodeId>)> {
        let version = self.layout.current().version();
        if version <= 1 {
            return Vec::new();
        }
        self.fences
            .iter()
            .filter(|(_, f)| f.layout == version)
            .map(|(&p, f)| (p, self.fence_waiting(f)))
            .filter(|(_, waiting)| !waiting.is_empty())
            .collect()
    }

    /// The nodes a fence still needs an answer from: every member up;
    /// every member down for less than `remove_down_after` (a node cut off
    /// from this one may be up for devices and still apply pushes as an
    /// old primary, of a partition it may have dropped here since; one
    /// down that long leaves the layout); and members of the layout not
    /// heard from yet, for a while.
    fn fence_waiting(&self, fence: &PushFence) -> Vec<NodeId> {
        if fence.from_first {
            return Vec::new();
        }
        let mut nodes: std::collections::BTreeSet<NodeId> = Default::default();
        for member in self.membership.members() {
            let waited = match member.state {
                MemberState::Alive | MemberState::Suspect => true,
                // Down since the last maintenance pass counts from now.
                MemberState::Down => {
                    let down_for = self
                        .down_since
                        .get(&member.id)
                        .map_or(Duration::ZERO, |&t| self.now.saturating_sub(t));
                    down_for < self.config.remove_down_after
                }
                MemberState::Left => false,
            };
            if waited {
                nodes.insert(member.id);
            }
        }
        if self.now.saturating_sub(fence.started) < self.config.migration_timeout {
            let layout_nodes = self.layout.current().nodes();
            let old_nodes = self.layout.completed().nodes();
            for n in layout_nodes.into_iter().chain(old_nodes) {
                if self.membership.addr_of(n).is_none() {
                    nodes.insert(n);
                }
            }
        }
        nodes.remove(&self.id);
        nodes.retain(|n| !fence.answered.contains(n));
        nodes.into_iter().collect()
    }

    /// Starts a fence for each partition this node became the primary of,
    /// and asks the nodes that have not answered (again, after a while).
    fn drive_fences(&mut self) {
        let version = self.layout.current().version();
        let me = self.id;
        let primary: std::collections::BTreeSet<u16> = (0..self.store.partitions())
            .filter(|&p| self.layout.current().replicas(p).first() == Some(&me))
            .collect();
        // A partition this node was the primary of in the layout just
        // before keeps its fence: no other node was its primary in between,
        // and the nodes that answered know that layout (so they apply no
        // pushes there as an older primary). Any other gap starts afresh.
        let now = self.now;
        self.fences.retain(|p, f| {
            primary.contains(p) && (f.layout == version || f.layout.saturating_add(1) == version)
        });
        for f in self.fences.values_mut() {
            if f.layout != version {
                f.layout = version;
                f.started = now;
                f.asked = None;
            }
        }
        if version <= 1 {
            for &p in &primary {
                self.fences.entry(p).or_insert_with(|| PushFence {
                    layout: version,
                    answered: Default::default(),
                    from_first: true,
                    started: now,
                    asked: None,
                });
            }
            return;
        }
        let retry = self.config.maintenance_interval * 2;
        let mut requests = Vec::new();
        for p in primary {
            self.fences.entry(p).or_insert_with(|| PushFence {
                layout: version,
                answered: Default::default(),
                from_first: false,
                started: now,
                asked: None,
            });
            let fence = &self.fences[&p];
            if fence.asked.is_some_and(|t| now.saturating_sub(t) < retry) {
                continue;
            }
            let waiting = self.fence_waiting(fence);
            if !waiting.is_empty() {
                requests.push((p, waiting));
            }
        }
        if requests.is_empty() {
            return;
        }
        let Ok(versions) = self.store.partition_versions() else {
            return;
        };
        for (p, waiting) in requests {
            if let Some(f) = self.fences.get_mut(&p) {
                f.asked = Some(now);
            }
            for n in waiting {
                if self.membership.addr_of(n).is_none() {
                    continue;
                }
                let stream = self.fresh_id();
                let message = Message::FenceRequest {
                    stream,
                    partition: p,
                    layout: version,
                    since: versions[usize::from(p)].clone(),
                };
                self.send(n, message);
            }
        }
    }

    /// Answers a fence request once this node knows the layout it names
    /// (until then it may still apply pushes as an earlier primary; the
    /// requester asks again) and every write queued before is committed.
    fn on_fence_request(
        &mut self,
        from: NodeId,
        stream: u64,
        partition: u16,
        layout: u64,
        since: VersionVector,
    ) {
        if self.layout.current().version() < layout {
            return;
        }
        let barrier = ChangeChunk {
            partition,
            entries: Vec::new(),
            complete: None,
            purged: None,
        };
        let wait = StoreWait::FenceBarrier {
            from,
            stream,
            partition,
            layout,
            since,
        };
        self.queue_store(GroupWrite::Chunk(barrier), wait);
    }

    // ---- API tokens ----

    /// Starts from the registry this node persisted.
    pub fn load_tokens(&mut self, registry: TokenRegistry) {
        self.tokens = registry;
    }

    pub fn tokens(&self) -> &TokenRegistry {
        &self.tokens
    }

    /// Adds a token made here and tells every member at once (digests
    /// catch up any that miss it).
    pub fn create_token(
        &mut self,
        now: Duration,
        record: TokenRecord,
    ) -> Result<Vec<Output>, TokenError> {
        self.now = now;
        self.tokens.insert(record)?;
        self.tokens_changed(None);
        Ok(self.drain())
    }

    /// Revokes the tokens named `name_or_id` everywhere; how many were in
    /// force.
    pub fn revoke_token(&mut self, now: Duration, name_or_id: &str) -> (usize, Vec<Output>) {
        self.now = now;
        let revoked = self.tokens.revoke(name_or_id);
        if revoked > 0 {
            self.tokens_changed(None);
        }
        (revoked, self.drain())
    }

    /// Sends the registry to every alive member (`fanout` None: a change
    /// made here) or to that many of them picked at random (passing on a
    /// change learnt from a peer: each node passes a change on once, so
    /// it floods in a few hops at `fanout` messages per node).
    fn tokens_changed(&mut self, fanout: Option<usize>) {
        let mut peers: Vec<NodeId> = self
            .membership
            .alive()
            .into_iter()
            .filter(|&p| p != self.id)
            .collect();
        if let Some(fanout) = fanout {
            peers.shuffle(&mut self.rng);
            peers.truncate(fanout);
        }
        for peer in peers {
            self.send(peer, Message::Tokens(self.tokens.clone()));
        }
        self.out.push(Output::Event(ReplicaEvent::TokensChanged {
            tokens: self.tokens.tokens().count(),
        }));
    }

    fn on_tokens(&mut self, from: NodeId, registry: TokenRegistry) -> Result<(), ReplicaError> {
        registry.validate().map_err(|e| ReplicaError::BadTokens {
            peer: from,
            reason: e.to_string(),
        })?;
        let changed = self.tokens.merge(&registry);
        if self.tokens != registry {
            // We knew something the peer did not: tell it back.
            self.send(from, Message::Tokens(self.tokens.clone()));
        }
        if changed {
            self.tokens_changed(Some(TOKEN_FANOUT));
        }
        Ok(())
    }

    // ---- layout ----

    fn on_layout(&mut self, from: NodeId, state: LayoutState) -> Result<(), ReplicaError> {
        let partitions = self.store.partitions();
        state
            .validate(partitions)
            .map_err(|e| ReplicaError::BadLayout {
                peer: from,
                reason: e.to_string(),
            })?;
        if state.current().partitions() != partitions {
            return Err(ReplicaError::BadLayout {
                peer: from,
                reason: format!(
                    "{} partitions, this node has {partitions}",
                    state.current().partitions()
                ),
            });
        }
        let before = self.layout.summary();
        self.layout.merge(&state);
        if self.layout != state {
            // We knew something the peer did not: tell it back.
            self.send(from, Message::Layout(self.layout.clone()));
        }
        if self.layout.summary() != before {
            self.layout_changed();
        }
        Ok(())
    }

    fn layout_changed(&mut self) {
        let event = ReplicaEvent::LayoutChanged {
            version: self.layout.current().version(),
            completed: self.layout.completed().version(),
        };
        self.out.push(Output::Event(event));
        // A new layout starts a new round of progress figures.
        let version = self.layout.current().version();
        if self.progress.layout_version != version {
            // What this node gains from the last completed layout.
            let total = self.layout.pending_migrations(self.id).len();
            self.progress = MigrationProgress {
                layout_version: version,
                total,
                ..MigrationProgress::default()
            };
            self.progress_started = self.now;
        }
        // Migrations of partitions no longer gained stop.
        let pending = self.layout.pending_migrations(self.id);
        self.migrations.retain(|p, _| pending.contains(p));
        self.drive_fences();
    }

    /// The member specs the layout should be computed from: live members
    /// with known metadata, plus members down for less than
    /// `remove_down_after` (a restart should not move data twice).
    fn desired_specs(&mut self) -> Vec<NodeSpec> {
        let now = self.now;
        let own = self.membership.meta();
        let mut specs = vec![NodeSpec {
            id: self.id,
            capacity: own.capacity,
            zone: own.zone.clone(),
        }];
        for member in self.membership.members() {
            match member.state {
                MemberState::Alive | MemberState::Suspect => {
                    self.down_since.remove(&member.id);
                }
                MemberState::Down => {
                    let since = *self.down_since.entry(member.id).or_insert(now);
                    if now.saturating_sub(since) >= self.config.remove_down_after {
                        continue;
                    }
                }
                MemberState::Left => continue,
            }
            if let Some(meta) = member.meta {
                specs.push(NodeSpec {
                    id: member.id,
                    capacity: meta.capacity,
                    zone: meta.zone,
                });
            }
        }
        specs.sort_by_key(|s| s.id);
        specs
    }

    /// The coordinator is the live member with the lowest id.
    fn is_coordinator(&self) -> bool {
        self.membership.alive().iter().all(|&n| n > self.id)
    }

    /// Whether this node's view of the cluster is enough to change the
    /// layout to one computed from `specs` (see ARCHITECTURE.md, "Layout
    /// changes only from a sufficient view"):
    /// - the first layout of a new cluster is made only by the node that
    ///   starts it, once `bootstrap_expect` members (itself included) are
    ///   known with their metadata;
    /// - later ones only by a coordinator that sees a strict majority of
    ///   the members of the current and completed layouts alive, so a node
    ///   cut off or freshly restarted never reshapes the cluster, and two
    ///   sides of a split never both do;
    /// - never while a member of the layout has not been heard from since
    ///   this node started, unless for `remove_down_after` (a restarted
    ///   node knows nobody at first; that is not the same as down);
    /// - never removing, as down, a majority of the current layout at once.
    fn view_is_sufficient(&mut self, specs: &[NodeSpec]) -> bool {
        let current = self.layout.current();
        let mut members: Vec<NodeId> = current.nodes();
        for n in self.layout.completed().nodes() {
            if !members.contains(&n) {
                members.push(n);
            }
        }
        if members.is_empty() {
            // Counted from the specs: a member whose metadata has not
            // arrived yet would be left out of the first layout.
            return self
                .config
                .bootstrap_expect
                .is_some_and(|n| specs.len() >= n);
        }
        if !self.is_coordinator() {
            return false;
        }
        let alive = self.membership.alive();
        let seen_alive = members
            .iter()
            .filter(|&&n| n == self.id || alive.contains(&n))
            .count();
        if 2 * seen_alive <= members.len() {
            return false;
        }
        let now = self.now;
        let wait = self.config.remove_down_after;
        let known: Vec<NodeId> = specs.iter().map(|s| s.id).collect();
        self.unknown_since.retain(|n, _| !known.contains(n));
        for &n in &members {
            let has_meta =
                n == self.id || self.membership.member(n).is_some_and(|m| m.meta.is_some());
            if has_meta {
                self.unknown_since.remove(&n);
            } else {
                let since = *self.unknown_since.entry(n).or_insert(now);
                if now.saturating_sub(since) < wait {
                    return false;
                }
            }
        }
        let current_nodes = current.nodes();
        let removed = current_nodes.iter().filter(|n| !known.contains(n)).count();
        2 * removed < current_nodes.len()
    }

    // ---- maintenance: layout, migrations, hand-off ----

    fn maintenance(&mut self) {
        // Forget rounds and streams whose answers were lost, so neither
        // table grows with message loss.
        let horizon = self.now.saturating_sub(self.config.migration_timeout);
        self.rounds.retain(|_, (_, started)| *started >= horizon);
        self.inbound.retain(|_, s| s.last_chunk >= horizon);
        // Chunks for a node that went away would only spend the budget.
        let alive = self.membership.alive();
        self.pacer.retain_receivers(|n| alive.contains(&n));
        let specs = self.desired_specs();
        if self.view_is_sufficient(&specs) {
            let changed = if self.layout.current().version() == 0 {
                // Nothing is stored anywhere yet: the first layout is
                // complete as soon as it exists.
                self.layout = LayoutState::bootstrap(
                    self.layout.current().partitions(),
                    self.layout.current().replication_factor(),
                    &specs,
                );
                true
            } else {
                self.layout.propose(&specs)
            };
            if changed {
                self.layout_changed();
            }
        }
        self.drive_migrations();
        self.drive_fences();
        self.hand_off();
        self.finish_leaving();
    }

    fn finish_leaving(&mut self) {
        if !self.leaving || self.left {
            return;
        }
        let holds_nothing =
            (0..self.layout.current().partitions()).all(|p| !self.layout.holds(self.id, p));
        let empty = self
            .store
            .partition_versions()
            .is_ok_and(|versions| versions.iter().all(VersionVector::is_empty));
        if holds_nothing && empty && self.layout.current().version() > 0 {
            self.left = true;
            let outputs = self.membership.leave();
            self.absorb_membership(outputs);
            self.out.push(Output::Event(ReplicaEvent::SafeToStop));
        }
    }

    fn drive_migrations(&mut self) {
        let pending = self.layout.pending_migrations(self.id);
        let alive = self.membership.alive();
        // Restart stalled streams (lost messages, a source that went away).
        let timeout = self.config.migration_timeout;
        let stalled: Vec<u16> = self
            .migrations
            .iter()
            .filter(|(_, m)| {
                self.now.saturating_sub(m.last_heard) >= timeout || !alive.contains(&m.source)
            })
            .map(|(&p, _)| p)
            .collect();
        for p in stalled {
            if let Some(m) = self.migrations.remove(&p) {
                self.begin_migration(p, m.phase, &alive, m.restarts + 1);
            }
        }
        for p in pending {
            if self.migrations.len() >= self.config.migration_parallelism {
                break;
            }
            if !self.migrations.contains_key(&p) {
                self.begin_migration(p, 1, &alive, 0);
            }
        }
    }

    fn begin_migration(&mut self, partition: u16, phase: u8, alive: &[NodeId], restarts: u32) {
        if restarts > 0 {
            self.stats.migration_restarts += 1;
        }
        let sources: Vec<NodeId> = self
            .layout
            .holders(partition)
            .into_iter()
            .filter(|&n| n != self.id && alive.contains(&n))
            .filter(|&n| self.layout.is_complete_replica(n, partition))
            .collect();
        let Some(&source) = sources.choose(&mut self.rng) else {
            if self
                .layout
                .holders(partition)
                .iter()
                .all(|&n| n == self.id || !self.layout.is_complete_replica(n, partition))
            {
                // Nobody holds the data (a new cluster, or every holder is
                // gone for good): there is nothing to wait for.
                if self.layout.mark_ready(partition, self.id) {
                    self.layout_changed();
                }
            }
            return;
        };
        let Ok(since) = self.store.partition_version(partition) else {
            return;
        };
        let stream = self.fresh_id();
        self.migrations.insert(
            partition,
            Migration::new(phase, stream, source, self.now, restarts),
        );
        if phase == 1 {
            self.out.push(Output::Event(ReplicaEvent::MigrationStarted {
                partition,
                source,
            }));
        }
        self.send(
            source,
            Message::MigrateRequest {
                stream,
                partition,
                phase,
                since,
            },
        );
    }

    /// Chunks or a heartbeat of `stream` from `from` arrived, a stream this
    /// node no longer waits for: cancel it at its source, or, if `from` is
    /// the source of the current stream, ask for that one again.
    fn unwanted_stream(&mut self, from: NodeId, stream: u64, partition: u16) {
        let current_source = self.migrations.get(&partition).map(|m| m.source);
        if current_source == Some(from) {
            self.ask_again_if_lost(from, partition);
        } else {
            self.send(from, Message::MigrateCancel { stream });
        }
    }

    fn ask_again_if_lost(&mut self, from: NodeId, partition: u16) {
        let Some(m) = self.migrations.get_mut(&partition) else {
            return;
        };
        if m.source != from
            || m.announced.is_some()
            || self.now.saturating_sub(m.requested_at) < REQUEST_AGAIN_AFTER
        {
            return;
        }
        m.requested_at = self.now;
        let (stream, phase) = (m.stream, m.phase);
        let Ok(since) = self.store.partition_version(partition) else {
            return;
        };
        self.send(
            from,
            Message::MigrateRequest {
                stream,
                partition,
                phase,
                since,
            },
        );
    }

    fn migration_phase_done(&mut self, partition: u16, phase: u8) -> Result<(), ReplicaError> {
        let Some(m) = self.migrations.remove(&partition) else {
            return Ok(());
        };
        if phase < 2 {
            // Phase 2: the same exchange again, for writes made during phase 1.
            let since = self.store.partition_version(partition)?;
            let stream = self.fresh_id();
            let source = m.source;
            self.migrations.insert(
                partition,
                Migration::new(2, stream, source, self.now, m.restarts),
            );
            self.send(
                source,
                Message::MigrateRequest {
                    stream,
                    partition,
                    phase: 2,
                    since,
                },
            );
        } else {
            self.stats.migrations_done += 1;
            self.out
                .push(Output::Event(ReplicaEvent::MigrationDone { partition }));
            if self.layout.mark_ready(partition, self.id) {
                self.layout_changed();
            }
            // Keep the pipeline full rather than waiting for maintenance.
            self.drive_migrations();
        }
        Ok(())
    }

    /// Pushes data of partitions this node no longer holds to a current
    /// replica, and drops it once that replica covers it.
    fn hand_off(&mut self) {
        let Ok(versions) = self.store.partition_versions() else {
            return;
        };
        let alive = self.membership.alive();
        for (p, own) in versions.iter().enumerate() {
            let p = p as u16;
            if own.is_empty() || self.layout.holds(self.id, p) {
                continue;
            }
            let targets: Vec<NodeId> = self
                .layout
                .current()
                .replicas(p)
                .iter()
                .copied()
                .filter(|n| alive.contains(n))
                .collect();
            let covered_by = targets.iter().find_map(|&n| {
                self.peer_versions
                    .get(&(p, n))
                    .filter(|v| v.dominates(own))
                    .cloned()
            });
            if let Some(covered_by) = covered_by {
                if !self.storing_partition(p) {
                    self.queue_store(
                        GroupWrite::Drop {
                            partition: p,
                            covered_by,
                        },
                        StoreWait::Drop { partition: p },
                    );
                }
            } else if let Some(&target) = targets.choose(&mut self.rng) {
                let round = self.fresh_id();
                self.send(
                    target,
                    Message::Versions {
                        round,
                        versions: vec![(p, own.clone())],
                        reply: true,
                    },
                );
            }
        }
    }

    /// The last version vector `node` reported for `partition` (anti-entropy
    /// exchanges them), if any: a lower bound of what it holds.
    pub fn peer_version(&self, partition: u16, node: NodeId) -> Option<&VersionVector> {
        self.peer_versions.get(&(partition, node))
    }

    fn purge(&mut self) {
        let Ok(versions) = self.store.partition_versions() else {
            return;
        };
        for (p, own) in versions.iter().enumerate() {
            let p = p as u16;
            if own.is_empty() || !self.layout.holds(self.id, p) || self.layout.in_transition() {
                continue;
            }
            let mut stable = own.clone();
            let mut known = true;
            for n in self.layout.holders(p) {
                if n == self.id {
                    continue;
                }
                match self.peer_versions.get(&(p, n)) {
                    Some(v) => stable = stable.meet(v),
                    None => known = false,
                }
            }
            if !known {
                continue;
            }
            if !self.storing_partition(p) && self.store.has_tombstones(p).unwrap_or(true) {
                self.queue_store(
                    GroupWrite::Purge {
                        partition: p,
                        stable,
                    },
                    StoreWait::Purge { partition: p },
                );
            }
        }
    }

    // ---- plumbing ----

    fn absorb_membership(&mut self, outputs: Vec<MembershipOutput>) {
        for output in outputs {
            match output {
                MembershipOutput::Send { to, payload } => self.out.push(Output::Send {
                    to,
                    message: Message::Membership(payload),
                }),
                MembershipOutput::Schedule { after, timer } => {
                    self.schedule(after, Timer::Membership(timer))
                }
                MembershipOutput::Event(event) => {
                    let kind = match event {
                        MembershipEvent::Up(n) => MembershipEventKind::Up(n),
                        MembershipEvent::Down(n) => MembershipEventKind::Down(n),
                        MembershipEvent::Left(n) => MembershipEventKind::Left(n),
                        MembershipEvent::MetaChanged(n) => MembershipEventKind::MetaChanged(n),
                        MembershipEvent::Rejoined => MembershipEventKind::Rejoined,
                    };
                    self.out.push(Output::Event(ReplicaEvent::Membership(kind)));
                }
            }
        }
    }

    fn check_partition(
        &self,
        peer: NodeId,
        what: &'static str,
        partition: u16,
    ) -> Result<(), ReplicaError> {
        if partition >= self.store.partitions() {
            return Err(ReplicaError::PartitionOutOfRange {
                peer,
                what,
                partition,
            });
        }
        Ok(())
    }

    fn send(&mut self, to: NodeId, message: Message) {
        if let Some(member) = self.membership.member(to) {
            self.out.push(Output::Send {
                to: member.addr,
                message,
            });
        }
    }

    fn schedule(&mut self, after: Duration, timer: Timer) {
        self.out.push(Output::Schedule { after, timer });
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn drain(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }
}

/// A stable hash of a version vector (its postcard encoding is canonical:
/// ordered maps and sets, normalized form).
pub fn vector_hash(vv: &VersionVector) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&postcard::to_allocvec(vv).unwrap_or_default())
}
