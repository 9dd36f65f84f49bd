//! Request coordination, sans-IO: which replica takes a client call, W and
//! R quorums, reads merged across replicas with read repair, forwarding,
//! and what a call is told when replicas are unreachable or slow.
//!
//! The driver (the QUIC node or the simulator) feeds in client calls, the
//! peers' coordination messages, the storage completions and the time, and
//! carries out the returned [`CoordOutput`]s: send a message, queue a
//! storage job, answer a caller. Nothing here reads a clock, touches a
//! socket or waits for a disk: the node's storage thread and the
//! simulator's virtual disk both take the jobs and report back with
//! [`Coordinator::stored`]. The membership, layout and store it decides from
//! are the node's [`Replica`], passed in by reference.
//!
//! Invariants:
//! - A write is made once, by a replica of the key that can write its
//!   partition (so it gets one dot), and is neither answered nor sent to the
//!   co-replicas before the storage job holding it is durable. Sending
//!   first would let a crash lose a dot that another replica already holds,
//!   and the restarted node would issue it again for another write.
//! - A forwarded call is never forwarded again (no loops between two views
//!   of the layout), and a node that holds no replica never writes.
//! - Every call is answered exactly once, at the latest `quorum_timeout`
//!   after it arrived (plus the driver's timer resolution), unless the node
//!   stops. A write that misses its quorum fails with `QuorumNotMet` saying
//!   how many replicas hold it; those copies stay and spread.
//! - Replicated entries are batched per co-replica per input (one message,
//!   one storage job on the receiver, one acknowledgement naming the writes
//!   it covers).

use super::feed::{self, Gathering, MAX_CHANGES_LIMIT, MAX_PAGE_BYTES};
use super::replica::Replica;
use crate::client::{Call, ErrorCode, Failure, Request, Response, WireRecord};
use crate::crdt::{CausalContext, NodeId, VersionVector};
use crate::store::{FeedPage, GroupOutcome, GroupWrite, MergedView, Op};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

/// Tuning of request coordination.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// How long a call may wait for the disk and for other replicas.
    pub quorum_timeout: Duration,
    /// Client writes queued for storage before new ones are refused as
    /// overloaded. Writes from peers are always taken: they are bounded by
    /// the peers' own queues.
    pub max_queued_client_writes: usize,
    /// Messages of replicated entries are cut at about this many bytes.
    pub replicate_message_bytes: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            quorum_timeout: Duration::from_secs(5),
            max_queued_client_writes: 8192,
            replicate_message_bytes: 4 << 20,
        }
    }
}

/// The coordination messages between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum CoordMessage {
    /// Coordinate this client call (the sender cannot: it holds no
    /// writable replica of its key).
    Coordinate {
        id: u64,
        call: Call,
    },
    Coordinated {
        id: u64,
        response: Response,
    },
    /// Merge these entries (the coordinators' state of each key after a
    /// write, or read repairs), in one storage job; acknowledge those that
    /// ask, in one `Replicated`, once they are durable.
    Replicate {
        items: Vec<ReplicateItem>,
    },
    /// The writes of a `Replicate` that asked, and whether each was taken.
    Replicated {
        acks: Vec<(u64, bool)>,
    },
    /// Send your entry of this key (a read at R > 1, an inspection).
    Fetch {
        id: u64,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Fetched {
        id: u64,
        #[serde(with = "serde_bytes")]
        entry: Option<Vec<u8>>,
    },
    /// List up to `limit` live keys of these partitions (one page of a
    /// cluster-wide listing).
    List {
        id: u64,
        partitions: Vec<u16>,
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        #[serde(with = "serde_bytes")]
        start_after: Option<Vec<u8>>,
        limit: u32,
        /// Frontiers the lister must cover for these partitions (see
        /// `Request::List`).
        since: Vec<(u16, VersionVector)>,
    },
    /// The keys a `List` asked for, with their kinds (`None`: the sender
    /// could not read its store, or is behind a frontier it was given).
    Listed {
        id: u64,
        keys: Option<Vec<(Vec<u8>, String)>>,
    },
    /// Read the change feed of these partitions past each frontier, in
    /// order, until `max_entries` or `max_bytes` are used up.
    Changes {
        id: u64,
        partitions: Vec<(u16, VersionVector)>,
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        max_entries: u32,
        max_bytes: u32,
    },
    /// The partitions a `Changes` read, each with its page (`None`: the
    /// sender could not read its store).
    ChangesFound {
        id: u64,
        pages: Option<Vec<(u16, FeedPage)>>,
    },
}

/// The most keys one page of a listing may ask for.
pub const MAX_LIST_LIMIT: u32 = 1000;

impl CoordMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            CoordMessage::Coordinate { .. } => "coordinate",
            CoordMessage::Coordinated { .. } => "coordinated",
            CoordMessage::Replicate { .. } => "replicate",
            CoordMessage::Replicated { .. } => "replicated",
            CoordMessage::Fetch { .. } => "fetch",
            CoordMessage::Fetched { .. } => "fetched",
            CoordMessage::List { .. } => "list",
            CoordMessage::Listed { .. } => "listed",
            CoordMessage::Changes { .. } => "changes",
            CoordMessage::ChangesFound { .. } => "changes_found",
        }
    }
}

/// One entry of a `Replicate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicateItem {
    /// The write's call id at the coordinator (0 for a read repair).
    pub id: u64,
    pub partition: u16,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub entry: Vec<u8>,
    pub ack: bool,
}

/// Who waits for a call's answer: a client of this node (the driver's
/// handle `C`), or the node that forwarded the call here.
#[derive(Debug)]
pub enum Caller<C> {
    Client(C),
    Peer { node: NodeId, id: u64 },
}

/// Writes to commit together, in one durable commit or several, in the
/// order queued; `token` comes back with the outcome.
#[derive(Debug)]
pub struct StoreJob {
    pub token: u64,
    pub writes: Vec<GroupWrite>,
    /// A client's write (counted against `max_queued_client_writes`).
    pub client: bool,
    /// Queued by the replica ([`Output::Store`](super::replica::Output::Store)):
    /// its outcome goes to `Replica::stored`, not to the coordinator.
    pub replica: bool,
}

/// A client write applied in a commit that is not durable yet: its entry
/// may go to the other replicas while the commit flushes (see
/// [`Store::commit_group_exposed`](crate::store::Store::commit_group_exposed)).
/// Only writes that succeeded and changed the key are reported; the job's
/// [`StoreDone`] follows once the commit is durable or failed.
#[derive(Debug)]
pub struct StoreApplied {
    pub token: u64,
    pub outcome: GroupOutcome,
}

impl StoreApplied {
    /// The client writes among a group's `jobs` (token, writes, whether a
    /// client's) that the group's `outcomes` (in job order) show applied
    /// and changing their key: what a driver reports before the flush.
    pub fn of_group(
        jobs: impl IntoIterator<Item = (u64, usize, bool)>,
        outcomes: &[Result<GroupOutcome, crate::Error>],
    ) -> Vec<StoreApplied> {
        let mut applied = Vec::new();
        let mut at = 0;
        for (token, len, client) in jobs {
            let of_job = outcomes.get(at..at + len).unwrap_or_default();
            at += len;
            if !client {
                continue;
            }
            for outcome in of_job {
                if let Ok(outcome @ GroupOutcome::Local { entry: Some(_), .. }) = outcome {
                    applied.push(StoreApplied {
                        token,
                        outcome: outcome.clone(),
                    });
                }
            }
        }
        applied
    }
}

/// A storage job's outcome, reported once durable: one result per write,
/// or the reason the whole commit failed (nothing of it was written).
#[derive(Debug)]
pub struct StoreDone {
    pub token: u64,
    /// The job was the replica's (see [`StoreJob::replica`]).
    pub replica: bool,
    pub outcome: Result<Vec<Result<GroupOutcome, crate::Error>>, String>,
}

impl StoreDone {
    /// The outcome of a job of one write (as the replica queues them).
    pub fn single(self) -> Result<GroupOutcome, String> {
        self.outcome.and_then(|mut results| match results.pop() {
            Some(Ok(outcome)) => Ok(outcome),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("the write had no outcome".to_string()),
        })
    }
}

/// What the driver must do.
#[derive(Debug)]
pub enum CoordOutput<C> {
    Send {
        to: NodeId,
        message: CoordMessage,
    },
    Store(StoreJob),
    Reply {
        to: C,
        response: Response,
    },
    /// The entries of a key on each of its holders that answered, and the
    /// holders that did not (see [`Coordinator::inspect`]).
    Inspected {
        to: C,
        key: Vec<u8>,
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
        silent: Vec<NodeId>,
    },
    /// A replica's entry was refused (undecodable, or for a partition this
    /// node must not take); the driver logs it.
    Refused {
        from: NodeId,
        reason: String,
    },
}

/// Counts for metrics.
#[derive(Clone, Debug, Default)]
pub struct CoordinatorStats {
    /// Keyed client requests served or coordinated here.
    pub requests: u64,
    /// Answers that were errors (to clients and to forwarding peers).
    pub errors: u64,
}

/// A call waiting for other replicas.
enum Pending<C> {
    /// Forwarded to a replica, which coordinates it.
    Forwarded { caller: Caller<C> },
    /// Written here; waiting until `quorum` replicas hold it durably.
    Write {
        caller: Caller<C>,
        response: Response,
        quorum: usize,
        /// The co-replicas that acknowledged (a duplicate counts once).
        acked: BTreeSet<NodeId>,
        /// The co-replicas that answered, with or without taking it.
        answered: BTreeSet<NodeId>,
        /// How many co-replicas it was sent to.
        sent: usize,
        /// This node's own copy.
        local: LocalCopy,
        w: u8,
    },
    /// Read here; waiting for `needed` more replicas' entries.
    Read {
        caller: Caller<C>,
        call: Call,
        partition: u16,
        needed: usize,
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
    },
    /// A listing; waiting for `waiting` to send their keys.
    List {
        caller: Caller<C>,
        waiting: BTreeSet<NodeId>,
        keys: BTreeMap<Vec<u8>, String>,
        limit: usize,
    },
    /// A change feed page; waiting for `gathering.waiting`.
    Changes {
        caller: Caller<C>,
        gathering: Gathering,
        /// The partitions asked of each node.
        asked: BTreeMap<NodeId, BTreeSet<u16>>,
        reconcile_pending: bool,
    },
    /// Showing a key on each holder; waiting for `waiting` to answer.
    Inspect {
        to: C,
        key: Vec<u8>,
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
        waiting: Vec<NodeId>,
    },
}

/// Whether this node's copy of a write it coordinates is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LocalCopy {
    Flushing,
    Durable,
    /// Its commit failed: other replicas may still hold it.
    Failed,
}

/// A storage job in flight, by its token.
enum Writing<C> {
    /// A client write coordinated here; `caller` is `None` once it was told
    /// the write is taking too long (it is still replicated).
    Call {
        caller: Option<Caller<C>>,
        /// When the call arrived: its whole wait is bounded from here.
        arrived: Duration,
        counter: bool,
        others: Vec<NodeId>,
        quorum: usize,
        w: u8,
        partition: u16,
        key: Vec<u8>,
        /// Its entry went out before the commit was durable: the call id
        /// of its `Pending::Write` (0: replicated without one, the caller
        /// having been answered already).
        exposed: Option<u64>,
    },
    /// Entries a coordinator sent: acknowledge those that asked.
    Replicas {
        from: NodeId,
        items: Vec<(u64, bool)>,
    },
    /// Other replicas' entries merged in after a read; nothing waits.
    Repair,
}

/// One node's request coordination; `C` is the driver's handle on a
/// waiting client.
pub struct Coordinator<C> {
    config: CoordinatorConfig,
    pending: HashMap<u64, Pending<C>>,
    writing: HashMap<u64, Writing<C>>,
    deadlines: BTreeSet<(Duration, u64)>,
    /// Entries to send each co-replica when the current input is done.
    outbox: BTreeMap<NodeId, Vec<ReplicateItem>>,
    out: Vec<CoordOutput<C>>,
    next_id: u64,
    /// Forwarded calls taken lately, by sender and its call id, with when:
    /// a duplicated `Coordinate` must not write twice.
    taken: HashSet<(NodeId, u64)>,
    /// The same, oldest first, to forget them after a while.
    taken_order: VecDeque<(Duration, (NodeId, u64))>,
    queued_client_writes: usize,
    /// Work per partition since `take_work`.
    work: HashMap<u16, u64>,
    stats: CoordinatorStats,
}

fn fail(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(Failure::new(code, message))
}

fn store_failure(e: crate::Error) -> Response {
    fail(ErrorCode::of(&e), e.to_string())
}

/// The store operation a write request makes.
fn op_of(request: Request) -> Result<Op, Failure> {
    let context = |bytes: Option<Vec<u8>>| {
        bytes
            .map(|b| CausalContext::from_bytes(&b))
            .transpose()
            .map_err(|e| {
                Failure::new(
                    ErrorCode::BadToken,
                    format!("bad causal context token: {e}"),
                )
            })
    };
    Ok(match request {
        Request::Put {
            key,
            value,
            context: c,
        } => Op::Put {
            key,
            value,
            context: context(c)?,
        },
        Request::PutLww { key, value } => Op::PutLww { key, value },
        Request::Delete { key, context: c } => Op::Delete {
            key,
            context: context(c)?,
        },
        Request::CounterAdd { key, amount } => Op::CounterAdd { key, amount },
        Request::SetAdd { key, member } => Op::SetAdd { key, member },
        Request::SetRemove { key, member } => Op::SetRemove { key, member },
        other => {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("{other:?} is not a write"),
            ))
        }
    })
}

fn record(r: crate::crdt::Record) -> WireRecord {
    WireRecord {
        value: r.value,
        context: r.context.to_bytes(),
        other_kinds: r.other_kinds,
    }
}

/// The answer to a read from the merged view.
fn read_response(request: &Request, view: &MergedView) -> Response {
    let result = match request {
        Request::Get { .. } => Ok(Response::Record(view.record().map(record))),
        Request::CounterGet { .. } => view.counter().map(Response::Counter),
        Request::SetMembers { .. } => view.members().map(Response::Members),
        other => return fail(ErrorCode::BadRequest, format!("{other:?} is not a read")),
    };
    result.unwrap_or_else(store_failure)
}

/// A change feed page as a client asked for it.
struct FeedRead {
    prefix: Vec<u8>,
    since: Vec<(u16, VersionVector)>,
    limit: u32,
    reconcile_pending: bool,
    from_now: bool,
}

/// A listing as a client asked for it.
struct Listing {
    prefix: Vec<u8>,
    start_after: Option<Vec<u8>>,
    limit: u32,
    since: Vec<(u16, VersionVector)>,
}

/// A reader's frontier by partition, checked: partitions in range, each
/// named once.
fn frontier_of(
    since: Vec<(u16, VersionVector)>,
    partitions: u16,
) -> Result<BTreeMap<u16, VersionVector>, Failure> {
    let mut frontier = BTreeMap::new();
    for (p, mut vv) in since {
        if p >= partitions {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("the cursor names partition {p}; the cluster has {partitions}"),
            ));
        }
        vv.normalize();
        if frontier.insert(p, vv).is_some() {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("the cursor names partition {p} twice"),
            ));
        }
    }
    Ok(frontier)
}

/// Each partition's source for a read of the whole cluster (a listing, a
/// change feed page), grouped by node: this node where it holds a complete
/// copy, else a live complete replica. `Err` is the failure to answer when the
/// cluster has no layout yet or some partition has no such replica:
/// `unless` says what the read would do without it.
fn partition_sources(
    replica: &Replica,
    unless: &str,
) -> Result<BTreeMap<NodeId, Vec<u16>>, Failure> {
    let me = replica.id();
    let layout = replica.layout();
    if layout.current().version() == 0 {
        return Err(Failure::new(
            ErrorCode::Unavailable,
            "the cluster has no layout yet; retry shortly",
        ));
    }
    let partitions = replica.store().partitions();
    let mut by_node: BTreeMap<NodeId, Vec<u16>> = BTreeMap::new();
    let mut missing = 0;
    for p in 0..partitions {
        let source = if layout.is_complete_replica(me, p) {
            Some(me)
        } else {
            live_replicas(replica, p)
                .into_iter()
                .find(|&n| n != me && layout.is_complete_replica(n, p))
        };
        match source {
            Some(node) => by_node.entry(node).or_default().push(p),
            None => missing += 1,
        }
    }
    if missing > 0 {
        return Err(Failure::new(
            ErrorCode::Unavailable,
            format!("{missing} of {partitions} partitions have no reachable complete replica now, so {unless}; retry shortly"),
        ));
    }
    Ok(by_node)
}

/// Replicas of `partition` that are up, this node first if it can
/// coordinate writes there, else last. It can once it holds all of its own
/// earlier writes there (`Store::writable`) and its copy is complete: a
/// gained replica still migrating may lack its own earlier writes (a node
/// name reused with a fresh store), and its next dot could repeat one.
pub fn live_replicas(replica: &Replica, partition: u16) -> Vec<NodeId> {
    let me = replica.id();
    let alive = replica.membership().alive();
    let mut nodes: Vec<NodeId> = replica
        .layout()
        .holders(partition)
        .into_iter()
        .filter(|n| *n == me || alive.contains(n))
        .collect();
    let writable =
        replica.store().writable(partition) && replica.layout().is_complete_replica(me, partition);
    nodes.sort_by_key(|&n| if n == me { !writable } else { writable });
    nodes
}

/// Whether this node coordinates reads of `partition` itself (it is the
/// first of [`live_replicas`]): its own copy is then part of every read
/// it coordinates, so its own commits of a key are all a held watch of
/// the key needs to be woken by.
pub fn reads_locally(replica: &Replica, partition: u16) -> bool {
    live_replicas(replica, partition).first() == Some(&replica.id())
}

impl<C> Coordinator<C> {
    /// `first_id` starts this node's call ids: peers tell calls apart by
    /// (node, id), so a restarted node must not reuse the ids of its
    /// previous run (the driver starts from a random or time-based value).
    pub fn new(config: CoordinatorConfig, first_id: u64) -> Self {
        Coordinator {
            taken: HashSet::new(),
            taken_order: VecDeque::new(),
            config,
            pending: HashMap::new(),
            writing: HashMap::new(),
            deadlines: BTreeSet::new(),
            outbox: BTreeMap::new(),
            out: Vec::new(),
            next_id: first_id,
            queued_client_writes: 0,
            stats: CoordinatorStats::default(),
            work: HashMap::new(),
        }
    }

    pub fn stats(&self) -> &CoordinatorStats {
        &self.stats
    }

    /// Work done per partition since the last call: 2 per call coordinated
    /// here (not forwarded), 1 per replicated entry taken or entry read for
    /// another coordinator.
    pub fn take_work(&mut self) -> HashMap<u16, u64> {
        std::mem::take(&mut self.work)
    }

    /// When [`Coordinator::expire`] has something to do next.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.deadlines.iter().next().map(|(at, _)| *at)
    }

    /// A keyed client call (a read or a write) that reached this node from
    /// a client, or from a peer that forwarded it (`Caller::Peer`).
    /// Requests without a key and admin requests are the driver's.
    pub fn call(
        &mut self,
        replica: &Replica,
        now: Duration,
        call: Call,
        caller: Caller<C>,
    ) -> Vec<CoordOutput<C>> {
        self.on_call(replica, now, call, caller);
        self.finish(replica)
    }

    /// A coordination message from a peer.
    pub fn message(
        &mut self,
        replica: &Replica,
        now: Duration,
        from: NodeId,
        message: CoordMessage,
    ) -> Vec<CoordOutput<C>> {
        match message {
            CoordMessage::Coordinate { id, call } => {
                // A duplicate arrives within a few network delays; the
                // forwarder has given up on the call long before this.
                let horizon = self.config.quorum_timeout * 2;
                while let Some(&(at, seen)) = self.taken_order.front() {
                    if now.saturating_sub(at) < horizon {
                        break;
                    }
                    self.taken.remove(&seen);
                    self.taken_order.pop_front();
                }
                if self.taken.insert((from, id)) {
                    self.taken_order.push_back((now, (from, id)));
                    self.on_call(replica, now, call, Caller::Peer { node: from, id })
                }
            }
            CoordMessage::Coordinated { id, response } => {
                if let Some(Pending::Forwarded { caller }) = self.pending.remove(&id) {
                    self.answer(caller, response);
                }
            }
            CoordMessage::Replicate { items } => self.on_replicate(from, items),
            CoordMessage::Replicated { acks } => self.on_replicated(from, acks),
            CoordMessage::Fetch { id, key } => {
                // Serving a read at R > 1 for a coordinator: one unit.
                *self
                    .work
                    .entry(replica.store().partition_of(&key))
                    .or_insert(0) += 1;
                let entry = replica.store().entry_bytes(&key).ok().flatten();
                self.out.push(CoordOutput::Send {
                    to: from,
                    message: CoordMessage::Fetched { id, entry },
                });
            }
            CoordMessage::Fetched { id, entry } => self.on_fetched(replica, from, id, entry),
            CoordMessage::List {
                id,
                partitions,
                prefix,
                start_after,
                limit,
                since,
            } => {
                let store = replica.store();
                let held = store.partition_versions().unwrap_or_default();
                let behind = since.iter().any(|(p, seen)| {
                    held.get(usize::from(*p))
                        .is_none_or(|held| !held.dominates(seen))
                });
                if behind {
                    self.out.push(CoordOutput::Send {
                        to: from,
                        message: CoordMessage::Listed { id, keys: None },
                    });
                    return self.finish(replica);
                }
                let mut wanted = vec![false; usize::from(store.partitions())];
                for p in partitions {
                    if let Some(w) = wanted.get_mut(usize::from(p)) {
                        *w = true;
                    }
                }
                let limit = limit.min(MAX_LIST_LIMIT) as usize;
                let keys = store
                    .list_keys(&wanted, &prefix, start_after.as_deref(), limit)
                    .ok()
                    .map(|keys| {
                        keys.into_iter()
                            .map(|(k, kind)| (k, kind.name().to_string()))
                            .collect()
                    });
                self.out.push(CoordOutput::Send {
                    to: from,
                    message: CoordMessage::Listed { id, keys },
                });
            }
            CoordMessage::Listed { id, keys } => self.on_listed(from, id, keys),
            CoordMessage::Changes {
                id,
                partitions,
                prefix,
                max_entries,
                max_bytes,
            } => {
                let max_entries = max_entries.min(MAX_CHANGES_LIMIT) as usize;
                let max_bytes = (max_bytes as usize).min(MAX_PAGE_BYTES);
                let pages = feed::serve(
                    replica.store(),
                    &partitions,
                    &prefix,
                    max_entries,
                    max_bytes,
                )
                .ok();
                self.out.push(CoordOutput::Send {
                    to: from,
                    message: CoordMessage::ChangesFound { id, pages },
                });
            }
            CoordMessage::ChangesFound { id, pages } => self.on_changes_found(from, id, pages),
        }
        self.finish(replica)
    }

    /// Client writes applied in a commit still flushing: their entries go
    /// to the other replicas now, so that a write at W > 1 costs one round
    /// trip beside the flushes rather than two flushes in a row.
    pub fn applied(
        &mut self,
        replica: &Replica,
        applied: Vec<StoreApplied>,
    ) -> Vec<CoordOutput<C>> {
        for applied in applied {
            self.on_applied(replica, applied);
        }
        self.finish(replica)
    }

    /// Storage jobs that are durable (or failed).
    pub fn stored(&mut self, replica: &Replica, done: Vec<StoreDone>) -> Vec<CoordOutput<C>> {
        for done in done {
            self.on_stored(replica, done);
        }
        self.finish(replica)
    }

    /// Answers the calls whose time is up.
    pub fn expire(&mut self, replica: &Replica, now: Duration) -> Vec<CoordOutput<C>> {
        while let Some(&(at, id)) = self.deadlines.iter().next() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, id));
            self.expire_one(id);
        }
        self.finish(replica)
    }

    /// Asks every holder of `key`'s partition for its entry; answers with
    /// [`CoordOutput::Inspected`] once all did, or at the timeout.
    pub fn inspect(
        &mut self,
        replica: &Replica,
        now: Duration,
        key: Vec<u8>,
        to: C,
    ) -> Vec<CoordOutput<C>> {
        let me = replica.id();
        let partition = replica.store().partition_of(&key);
        let holders = replica.layout().holders(partition);
        let answers: Vec<(NodeId, Option<Vec<u8>>)> = if holders.contains(&me) {
            vec![(me, replica.store().entry_bytes(&key).ok().flatten())]
        } else {
            Vec::new()
        };
        let id = self.fresh_id();
        let mut waiting = Vec::new();
        for node in holders.into_iter().filter(|&n| n != me) {
            if replica.membership().addr_of(node).is_some() {
                self.out.push(CoordOutput::Send {
                    to: node,
                    message: CoordMessage::Fetch {
                        id,
                        key: key.clone(),
                    },
                });
                waiting.push(node);
            }
        }
        if waiting.is_empty() {
            self.out.push(CoordOutput::Inspected {
                to,
                key,
                answers,
                silent: Vec::new(),
            });
        } else {
            self.wait(
                now,
                id,
                Pending::Inspect {
                    to,
                    key,
                    answers,
                    waiting,
                },
            );
        }
        self.finish(replica)
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn wait(&mut self, now: Duration, id: u64, pending: Pending<C>) {
        self.pending.insert(id, pending);
        self.deadlines
            .insert((now + self.config.quorum_timeout, id));
    }

    fn answer(&mut self, caller: Caller<C>, response: Response) {
        if matches!(response, Response::Error(_)) {
            self.stats.errors += 1;
        }
        self.out.push(match caller {
            Caller::Client(to) => CoordOutput::Reply { to, response },
            Caller::Peer { node, id } => CoordOutput::Send {
                to: node,
                message: CoordMessage::Coordinated { id, response },
            },
        });
    }

    /// Ends an input: the entries queued for each co-replica go out, one
    /// message per replica (cut at `replicate_message_bytes`).
    fn finish(&mut self, replica: &Replica) -> Vec<CoordOutput<C>> {
        for (node, items) in std::mem::take(&mut self.outbox) {
            if replica.membership().addr_of(node).is_none() {
                continue;
            }
            let mut batch = Vec::new();
            let mut bytes = 0;
            for item in items {
                bytes += item.key.len() + item.entry.len();
                batch.push(item);
                if bytes >= self.config.replicate_message_bytes {
                    let items = std::mem::take(&mut batch);
                    self.out.push(CoordOutput::Send {
                        to: node,
                        message: CoordMessage::Replicate { items },
                    });
                    bytes = 0;
                }
            }
            if !batch.is_empty() {
                self.out.push(CoordOutput::Send {
                    to: node,
                    message: CoordMessage::Replicate { items: batch },
                });
            }
        }
        std::mem::take(&mut self.out)
    }

    fn on_call(&mut self, replica: &Replica, now: Duration, call: Call, caller: Caller<C>) {
        if call.request.is_admin() {
            let response = fail(
                ErrorCode::Forbidden,
                "admin requests are not taken from peers or coordinated",
            );
            return self.answer(caller, response);
        }
        if let Request::List {
            prefix,
            start_after,
            limit,
            since,
        } = call.request
        {
            let listing = Listing {
                prefix,
                start_after,
                limit,
                since,
            };
            return self.list(replica, now, listing, caller);
        }
        if let Request::Changes {
            prefix,
            since,
            limit,
            reconcile_pending,
            from_now,
        } = call.request
        {
            let read = FeedRead {
                prefix,
                since,
                limit,
                reconcile_pending,
                from_now,
            };
            return self.changes(replica, now, read, caller);
        }
        let Some(key) = call.request.key().map(<[u8]>::to_vec) else {
            let response = fail(
                ErrorCode::BadRequest,
                format!("{:?} has no key to coordinate", call.request),
            );
            return self.answer(caller, response);
        };
        let me = replica.id();
        let layout = replica.layout();
        let version = layout.current().version();
        if version == 0 {
            let response = fail(
                ErrorCode::Unavailable,
                "the cluster has no layout yet: it is forming (the node that starts it waits for --expect-nodes nodes) or this node has not heard from it; retry shortly",
            );
            return self.answer(caller, response);
        }
        let partition = replica.store().partition_of(&key);
        let replicas = live_replicas(replica, partition);
        let is_write = call.request.is_write();
        let quorum = usize::from(if is_write { call.w } else { call.r }).max(1);
        let total = layout.current().replicas(partition).len().max(1);
        if quorum > total {
            let what = if is_write { "w" } else { "r" };
            let response = fail(
                ErrorCode::BadRequest,
                format!("{what}={quorum} exceeds the {total} replicas of this key"),
            );
            return self.answer(caller, response);
        }
        if matches!(call.request, Request::Pushed { .. }) {
            // A device's pushed operation is applied by one replica only,
            // the partition's first in the layout, so that a retry meets
            // the record of the first attempt (`Entry::device_seq`) rather
            // than being applied a second time elsewhere.
            let primary = layout.current().replicas(partition).first().copied();
            let ready =
                replica.store().writable(partition) && layout.is_complete_replica(me, partition);
            match primary {
                Some(p) if p == me && replica.is_leaving() => {
                    let response = fail(
                        ErrorCode::Unavailable,
                        format!("this node is leaving the cluster and no longer applies pushed writes (partition {partition}); retry the push shortly"),
                    );
                    return self.answer(caller, response);
                }
                Some(p) if p == me && ready && !replica.push_fenced(partition) => {
                    let response = fail(
                        ErrorCode::Unavailable,
                        format!("this node became the primary replica of partition {partition} in layout v{version} and is confirming that no other node still applies pushed writes there; retry the push shortly"),
                    );
                    return self.answer(caller, response);
                }
                Some(p) if p == me && ready => {}
                Some(p) if p == me => {
                    let response = fail(
                        ErrorCode::Unavailable,
                        format!("this node is the primary replica of partition {partition} but is still receiving it (layout v{version}); retry the push shortly"),
                    );
                    return self.answer(caller, response);
                }
                Some(p) if !matches!(caller, Caller::Peer { .. }) => {
                    if replica.membership().addr_of(p).is_none()
                        || !replica.membership().alive().contains(&p)
                    {
                        let response = fail(
                            ErrorCode::Unavailable,
                            format!("node {p}, the only one that applies pushed writes of partition {partition}, is unreachable; the device keeps the write and pushes it again later"),
                        );
                        return self.answer(caller, response);
                    }
                    let id = self.fresh_id();
                    self.out.push(CoordOutput::Send {
                        to: p,
                        message: CoordMessage::Coordinate { id, call },
                    });
                    return self.wait(now, id, Pending::Forwarded { caller });
                }
                _ => {
                    let response = fail(
                        ErrorCode::Unavailable,
                        format!("this node is not the primary replica of partition {partition} in its layout (v{version}); retry the push shortly"),
                    );
                    return self.answer(caller, response);
                }
            }
        }
        if replicas.first() != Some(&me) {
            // This node is not the replica to coordinate here: it holds no
            // replica of the key, or holds one it cannot write yet. A
            // client's call goes to the first live replica; a forwarded
            // call is never forwarded again and never written by a
            // non-replica, which would mint dots outside the key's replicas.
            let is_replica = replicas.contains(&me);
            match replicas.first().copied() {
                Some(target) if !matches!(caller, Caller::Peer { .. }) => {
                    if replica.membership().addr_of(target).is_none() {
                        let response = fail(
                            ErrorCode::Unavailable,
                            "no replica of this key is reachable",
                        );
                        return self.answer(caller, response);
                    }
                    let id = self.fresh_id();
                    self.out.push(CoordOutput::Send {
                        to: target,
                        message: CoordMessage::Coordinate { id, call },
                    });
                    return self.wait(now, id, Pending::Forwarded { caller });
                }
                // Reads a replica that cannot write serves from what it
                // holds; writes it refuses.
                _ if is_replica && is_write && !layout.is_complete_replica(me, partition) => {
                    let response = fail(
                        ErrorCode::Unavailable,
                        format!("this node is still receiving partition {partition} (layout v{version}) and no replica holding it completely is reachable; retry shortly"),
                    );
                    return self.answer(caller, response);
                }
                _ if is_replica && quorum == 1 => {}
                _ if is_replica => {
                    let response = fail(
                        ErrorCode::QuorumNotMet {
                            reached: 0,
                            needed: quorum as u8,
                        },
                        format!("no other replica of this key is reachable to meet a quorum of {quorum}"),
                    );
                    return self.answer(caller, response);
                }
                _ => {
                    let response = fail(
                        ErrorCode::Unavailable,
                        format!("no replica of this key is reachable (this node holds no replica of its partition {partition} in layout v{version})"),
                    );
                    return self.answer(caller, response);
                }
            }
        }
        let others: Vec<NodeId> = replicas[1..].to_vec();
        // Coordinating is the call's own read or write plus the quorum
        // around it: two units of work (see `rebalance`).
        *self.work.entry(partition).or_insert(0) += 2;
        if is_write {
            self.start_write(now, call, caller, key, partition, others, quorum);
        } else {
            self.start_read(replica, now, call, caller, partition, others, quorum);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_write(
        &mut self,
        now: Duration,
        call: Call,
        caller: Caller<C>,
        key: Vec<u8>,
        partition: u16,
        others: Vec<NodeId>,
        quorum: usize,
    ) {
        self.stats.requests += 1;
        let (pushed, request) = match call.request {
            Request::Pushed { device, seq, op } => (Some((device, seq)), *op),
            request => (None, request),
        };
        let counter = matches!(request, Request::CounterAdd { .. });
        if pushed.is_some_and(|(_, seq)| seq == 0) {
            let response = fail(
                ErrorCode::BadRequest,
                "a pushed operation's sequence starts at 1",
            );
            return self.answer(caller, response);
        }
        let mut op = match op_of(request) {
            Ok(op) => op,
            Err(failure) => return self.answer(caller, Response::Error(failure)),
        };
        if pushed.is_some() {
            // A device says what it had seen of the key; one that sends no
            // context had seen nothing, and its write supersedes nothing
            // (not "what this node has seen", as for a client online).
            if let Op::Put { context, .. } | Op::Delete { context, .. } = &mut op {
                context.get_or_insert_with(CausalContext::new);
            }
        }
        let write = match pushed {
            Some((device, seq)) => GroupWrite::Pushed { device, seq, op },
            None => GroupWrite::Local(op),
        };
        if self.queued_client_writes >= self.config.max_queued_client_writes {
            let response = fail(
                ErrorCode::Overloaded,
                format!(
                    "this node has {} writes waiting for the disk; retry after a pause",
                    self.queued_client_writes
                ),
            );
            return self.answer(caller, response);
        }
        let token = self.fresh_id();
        self.queued_client_writes += 1;
        self.out.push(CoordOutput::Store(StoreJob {
            token,
            writes: vec![write],
            client: true,
            replica: false,
        }));
        // A write waits for the disk a bounded time (see `expire_one`).
        self.deadlines
            .insert((now + self.config.quorum_timeout, token));
        self.writing.insert(
            token,
            Writing::Call {
                caller: Some(caller),
                arrived: now,
                counter,
                others,
                quorum,
                w: call.w,
                partition,
                key,
                exposed: None,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn start_read(
        &mut self,
        replica: &Replica,
        now: Duration,
        call: Call,
        caller: Caller<C>,
        partition: u16,
        others: Vec<NodeId>,
        quorum: usize,
    ) {
        let needed = quorum - 1;
        if needed == 0 {
            self.stats.requests += 1;
            let response = serve_read(replica, &call.request);
            return self.answer(caller, response);
        }
        let Some(key) = call.request.key().map(<[u8]>::to_vec) else {
            return;
        };
        let reachable: Vec<NodeId> = others
            .into_iter()
            .filter(|&n| replica.membership().addr_of(n).is_some())
            .collect();
        let sent = reachable.len();
        if sent < needed {
            let response = fail(
                ErrorCode::QuorumNotMet {
                    reached: sent as u8 + 1,
                    needed: quorum as u8,
                },
                format!(
                    "only {sent} of the {needed} more replicas needed for r={quorum} are reachable"
                ),
            );
            return self.answer(caller, response);
        }
        let id = self.fresh_id();
        for node in reachable {
            self.out.push(CoordOutput::Send {
                to: node,
                message: CoordMessage::Fetch {
                    id,
                    key: key.clone(),
                },
            });
        }
        self.wait(
            now,
            id,
            Pending::Read {
                caller,
                call,
                partition,
                needed,
                answers: Vec::new(),
            },
        );
    }

    /// Queues `key`'s entry for each of `nodes`, sent when the input is
    /// done; returns to how many (those with a known address).
    #[allow(clippy::too_many_arguments)]
    fn replicate_to_all(
        &mut self,
        replica: &Replica,
        nodes: &[NodeId],
        id: u64,
        partition: u16,
        key: &[u8],
        entry: &[u8],
        ack: bool,
    ) -> usize {
        let mut sent = 0;
        for &node in nodes {
            if replica.membership().addr_of(node).is_none() {
                continue;
            }
            self.outbox.entry(node).or_default().push(ReplicateItem {
                id,
                partition,
                key: key.to_vec(),
                entry: entry.to_vec(),
                ack,
            });
            sent += 1;
        }
        sent
    }

    /// A peer's batch of entries: merged in one job, acknowledged together
    /// once durable.
    fn on_replicate(&mut self, from: NodeId, items: Vec<ReplicateItem>) {
        let token = self.fresh_id();
        let mut acks = Vec::with_capacity(items.len());
        let writes = items
            .into_iter()
            .map(|item| {
                acks.push((item.id, item.ack));
                *self.work.entry(item.partition).or_insert(0) += 1;
                GroupWrite::Merge {
                    partition: item.partition,
                    key: item.key,
                    entry: item.entry,
                }
            })
            .collect();
        self.out.push(CoordOutput::Store(StoreJob {
            token,
            writes,
            client: false,
            replica: false,
        }));
        self.writing
            .insert(token, Writing::Replicas { from, items: acks });
    }

    fn on_replicated(&mut self, from: NodeId, acks: Vec<(u64, bool)>) {
        for (id, ok) in acks {
            if let Some(Pending::Write {
                acked, answered, ..
            }) = self.pending.get_mut(&id)
            {
                answered.insert(from);
                if ok {
                    acked.insert(from);
                }
                self.settle_write(id, None);
            }
        }
    }

    /// Answers a pending write once `quorum` replicas hold it durably, or
    /// once this node's copy is settled and the quorum can no longer be
    /// reached (`local_failure`: why its own commit failed).
    fn settle_write(&mut self, id: u64, local_failure: Option<&str>) {
        let Some(Pending::Write {
            quorum,
            acked,
            answered,
            sent,
            local,
            w,
            ..
        }) = self.pending.get(&id)
        else {
            return;
        };
        let (quorum, w, sent, local) = (*quorum, *w, *sent, *local);
        let reached = acked.len() + usize::from(local == LocalCopy::Durable);
        let possible = sent + usize::from(local != LocalCopy::Failed);
        let outstanding = sent - answered.len().min(sent);
        let failure = if reached >= quorum {
            None
        } else if local != LocalCopy::Flushing && (possible < quorum || outstanding == 0) {
            let here = match local_failure {
                Some(reason) => format!(" (this node's commit failed: {reason})"),
                None => String::new(),
            };
            Some(if reached > 0 {
                fail(
                    ErrorCode::QuorumNotMet {
                        reached: reached as u8,
                        needed: w,
                    },
                    format!("written on {reached} replica(s), but w={w} needs {quorum} and no more can be reached{here}; the write is kept on those and will spread"),
                )
            } else if outstanding > 0 {
                fail(
                    ErrorCode::Internal,
                    format!("no replica has confirmed the write yet{here}; it may or may not have been applied"),
                )
            } else {
                fail(ErrorCode::Internal, format!("the write was not made{here}"))
            })
        } else {
            return;
        };
        if let Some(Pending::Write {
            caller, response, ..
        }) = self.pending.remove(&id)
        {
            self.answer(caller, failure.unwrap_or(response));
        }
    }

    /// A client write applied here, its commit flushing: replicate now.
    fn on_applied(&mut self, replica: &Replica, StoreApplied { token, outcome }: StoreApplied) {
        let GroupOutcome::Local {
            context,
            counter: value,
            entry: Some(entry),
        } = outcome
        else {
            return;
        };
        let Some(Writing::Call {
            caller,
            arrived,
            counter,
            others,
            quorum,
            w,
            partition,
            key,
            exposed,
        }) = self.writing.get_mut(&token)
        else {
            return;
        };
        if exposed.is_some() {
            return;
        }
        let (others, key, partition, arrived, quorum, w) = (
            others.clone(),
            key.clone(),
            *partition,
            *arrived,
            *quorum,
            *w,
        );
        let Some(caller) = caller.take() else {
            // The caller was answered `Timeout`: spread the write.
            *exposed = Some(0);
            self.replicate_to_all(replica, &others, 0, partition, &key, &entry, false);
            return;
        };
        let response = if *counter {
            Response::Counter(value.unwrap_or_default())
        } else {
            Response::Context(context.to_bytes())
        };
        let id = self.fresh_id();
        if let Some(Writing::Call { exposed, .. }) = self.writing.get_mut(&token) {
            *exposed = Some(id);
        }
        let sent = self.replicate_to_all(replica, &others, id, partition, &key, &entry, true);
        self.pending.insert(
            id,
            Pending::Write {
                caller,
                response,
                quorum,
                acked: BTreeSet::new(),
                answered: BTreeSet::new(),
                sent,
                local: LocalCopy::Flushing,
                w,
            },
        );
        // Counted from the call's arrival: the caller hears within
        // `quorum_timeout`.
        self.deadlines
            .insert((arrived + self.config.quorum_timeout, id));
    }

    fn on_stored(&mut self, replica: &Replica, StoreDone { token, outcome, .. }: StoreDone) {
        let Some(writing) = self.writing.remove(&token) else {
            return;
        };
        match writing {
            Writing::Call {
                caller,
                arrived,
                counter,
                others,
                quorum,
                w,
                partition,
                key,
                exposed,
            } => {
                self.queued_client_writes = self.queued_client_writes.saturating_sub(1);
                if let Some(id) = exposed {
                    let failure = match &outcome {
                        Ok(results) if matches!(results.last(), Some(Ok(_))) => None,
                        Ok(_) => Some("the write failed".to_string()),
                        Err(reason) => Some(reason.clone()),
                    };
                    if let Some(Pending::Write { local, .. }) = self.pending.get_mut(&id) {
                        *local = if failure.is_some() {
                            LocalCopy::Failed
                        } else {
                            LocalCopy::Durable
                        };
                        self.settle_write(id, failure.as_deref());
                    }
                    return;
                }
                let Some(caller) = caller else {
                    // The caller was answered `Timeout`: spread the write.
                    if let Ok(Some(Ok(GroupOutcome::Local {
                        entry: Some(entry), ..
                    }))) = outcome.map(|mut r| r.pop())
                    {
                        self.replicate_to_all(replica, &others, 0, partition, &key, &entry, false);
                    }
                    return;
                };
                let result = match outcome {
                    Err(reason) => Err(fail(ErrorCode::Internal, reason)),
                    Ok(mut results) => match results.pop() {
                        Some(Ok(outcome)) => Ok(outcome),
                        Some(Err(e)) => Err(store_failure(e)),
                        None => Err(fail(ErrorCode::Internal, "the write had no outcome")),
                    },
                };
                match result {
                    Ok(GroupOutcome::Local {
                        context,
                        counter: value,
                        entry,
                    }) => {
                        let response = if counter {
                            Response::Counter(value.unwrap_or_default())
                        } else {
                            Response::Context(context.to_bytes())
                        };
                        let Some(entry) = entry else {
                            return self.answer(caller, response); // a no-op delete
                        };
                        let id = self.fresh_id();
                        let sent = self
                            .replicate_to_all(replica, &others, id, partition, &key, &entry, true);
                        let needed = quorum - 1;
                        if needed == 0 {
                            return self.answer(caller, response);
                        }
                        if sent < needed {
                            let response = fail(
                                ErrorCode::QuorumNotMet {
                                    reached: 1,
                                    needed: quorum as u8,
                                },
                                format!("written on 1 replica, but only {sent} of the {needed} more needed for w={quorum} are reachable"),
                            );
                            return self.answer(caller, response);
                        }
                        // Counted from the call's arrival, not from the local
                        // commit: the caller hears within `quorum_timeout`.
                        self.pending.insert(
                            id,
                            Pending::Write {
                                caller,
                                response,
                                quorum,
                                acked: BTreeSet::new(),
                                answered: BTreeSet::new(),
                                sent,
                                local: LocalCopy::Durable,
                                w,
                            },
                        );
                        self.deadlines
                            .insert((arrived + self.config.quorum_timeout, id));
                    }
                    Ok(_) => self.answer(caller, fail(ErrorCode::Internal, "unexpected outcome")),
                    Err(response) => self.answer(caller, response),
                }
            }
            Writing::Replicas { from, items } => {
                let oks: Vec<bool> = match &outcome {
                    Err(_) => vec![false; items.len()],
                    Ok(results) => results
                        .iter()
                        .map(|r| match r {
                            Ok(_) => true,
                            Err(e) => {
                                self.out.push(CoordOutput::Refused {
                                    from,
                                    reason: e.to_string(),
                                });
                                false
                            }
                        })
                        .collect(),
                };
                let acks: Vec<(u64, bool)> = items
                    .into_iter()
                    .zip(oks)
                    .filter(|((_, ack), _)| *ack)
                    .map(|((id, _), ok)| (id, ok))
                    .collect();
                if !acks.is_empty() {
                    self.out.push(CoordOutput::Send {
                        to: from,
                        message: CoordMessage::Replicated { acks },
                    });
                }
            }
            Writing::Repair => {}
        }
    }

    /// Starts a listing: each partition is listed by one live replica
    /// (this node for those it holds complete), one `List` per node; the
    /// answer is the first `limit` keys of the union.
    fn list(&mut self, replica: &Replica, now: Duration, listing: Listing, caller: Caller<C>) {
        let Listing {
            prefix,
            start_after,
            limit,
            since,
        } = listing;
        let frontier = match frontier_of(since, replica.store().partitions()) {
            Ok(frontier) => frontier,
            Err(failure) => return self.answer(caller, Response::Error(failure)),
        };
        if limit == 0 || limit > MAX_LIST_LIMIT {
            let response = fail(
                ErrorCode::BadRequest,
                format!("limit={limit}: a page lists 1 to {MAX_LIST_LIMIT} keys"),
            );
            return self.answer(caller, response);
        }
        let me = replica.id();
        let partitions = replica.store().partitions();
        let mut by_node = match partition_sources(replica, "a listing would miss keys") {
            Ok(by_node) => by_node,
            Err(failure) => return self.answer(caller, Response::Error(failure)),
        };
        let still_behind = self.avoid_behind(replica, &mut by_node, &frontier);
        if still_behind > 0 {
            let response = fail(
                ErrorCode::Unavailable,
                format!("{still_behind} partitions have no live replica that has caught up with the cursor yet; retry shortly"),
            );
            return self.answer(caller, response);
        }
        let mut keys = BTreeMap::new();
        let limit = limit as usize;
        if let Some(mine) = by_node.remove(&me) {
            let mut wanted = vec![false; usize::from(partitions)];
            for p in mine {
                wanted[usize::from(p)] = true;
            }
            match replica
                .store()
                .list_keys(&wanted, &prefix, start_after.as_deref(), limit)
            {
                Ok(found) => keys.extend(
                    found
                        .into_iter()
                        .map(|(k, kind)| (k, kind.name().to_string())),
                ),
                Err(e) => return self.answer(caller, fail(ErrorCode::of(&e), e.to_string())),
            }
        }
        if by_node.is_empty() {
            let keys = keys.into_iter().take(limit).collect();
            return self.answer(caller, Response::Keys(keys));
        }
        let id = self.fresh_id();
        let waiting = by_node.keys().copied().collect();
        for (node, partitions) in by_node {
            self.out.push(CoordOutput::Send {
                to: node,
                message: CoordMessage::List {
                    id,
                    since: partitions
                        .iter()
                        .filter_map(|p| frontier.get(p).map(|vv| (*p, vv.clone())))
                        .collect(),
                    partitions,
                    prefix: prefix.clone(),
                    start_after: start_after.clone(),
                    limit: limit as u32,
                },
            });
        }
        self.wait(
            now,
            id,
            Pending::List {
                caller,
                waiting,
                keys,
                limit,
            },
        );
    }

    /// Starts a change feed page (see `replication::feed`).
    fn changes(&mut self, replica: &Replica, now: Duration, read: FeedRead, caller: Caller<C>) {
        let FeedRead {
            prefix,
            since,
            limit,
            reconcile_pending,
            from_now,
        } = read;
        if limit == 0 || limit > MAX_CHANGES_LIMIT {
            let response = fail(
                ErrorCode::BadRequest,
                format!("limit={limit}: a page holds 1 to {MAX_CHANGES_LIMIT} changes"),
            );
            return self.answer(caller, response);
        }
        let me = replica.id();
        let partitions = replica.store().partitions();
        let frontier = match frontier_of(since, partitions) {
            Ok(frontier) => frontier,
            Err(failure) => return self.answer(caller, Response::Error(failure)),
        };
        let mut by_node = match partition_sources(replica, "a change feed page would miss changes")
        {
            Ok(by_node) => by_node,
            Err(failure) => return self.answer(caller, Response::Error(failure)),
        };
        // Where no replica has caught up, this node answers `behind`.
        self.avoid_behind(replica, &mut by_node, &frontier);
        // From now: no entries (a share of 0), every partition's frontier.
        let share = match from_now {
            true => 0,
            false => (limit as usize / by_node.len()).max(1),
        };
        let bytes = MAX_PAGE_BYTES / by_node.len();
        let mut gathering = Gathering::new(partitions, frontier);
        if let Some(mine) = by_node.remove(&me) {
            let asked: Vec<_> = mine.iter().map(|&p| (p, gathering.since(p))).collect();
            match feed::serve(replica.store(), &asked, &prefix, share, bytes) {
                Ok(pages) => gathering.add(&mine.into_iter().collect(), pages),
                Err(e) => return self.answer(caller, fail(ErrorCode::of(&e), e.to_string())),
            }
        }
        if by_node.is_empty() {
            let page = gathering.page(reconcile_pending);
            return self.answer(caller, Response::Changes(page));
        }
        let id = self.fresh_id();
        let mut asked = BTreeMap::new();
        for (node, partitions) in by_node {
            let frontiers = partitions
                .iter()
                .map(|&p| (p, gathering.since(p)))
                .collect();
            self.out.push(CoordOutput::Send {
                to: node,
                message: CoordMessage::Changes {
                    id,
                    partitions: frontiers,
                    prefix: prefix.clone(),
                    max_entries: share as u32,
                    max_bytes: bytes as u32,
                },
            });
            gathering.waiting.insert(node);
            asked.insert(node, partitions.into_iter().collect());
        }
        self.wait(
            now,
            id,
            Pending::Changes {
                caller,
                gathering,
                asked,
                reconcile_pending,
            },
        );
    }

    /// Moves the partitions this node is behind the reader's `frontier`
    /// on to another live complete replica (rotating between them; the
    /// replica checks again). Returns how many stay here although behind.
    fn avoid_behind(
        &mut self,
        replica: &Replica,
        by_node: &mut BTreeMap<NodeId, Vec<u16>>,
        frontier: &BTreeMap<u16, VersionVector>,
    ) -> usize {
        let me = replica.id();
        let (Some(mine), false) = (by_node.get(&me), frontier.is_empty()) else {
            return 0;
        };
        let Ok(versions) = replica.store().partition_versions() else {
            return mine.len();
        };
        let mut moved = Vec::new();
        let mut stuck = 0;
        for &p in mine {
            let behind = frontier
                .get(&p)
                .is_some_and(|seen| !versions[usize::from(p)].dominates(seen));
            if !behind {
                continue;
            }
            let others: Vec<NodeId> = live_replicas(replica, p)
                .into_iter()
                .filter(|&n| n != me && replica.layout().is_complete_replica(n, p))
                .collect();
            // One known (from anti-entropy) to have caught up, else any.
            let seen = &frontier[&p];
            let caught_up = others.iter().copied().find(|&n| {
                replica
                    .peer_version(p, n)
                    .is_some_and(|vv| vv.dominates(seen))
            });
            match (caught_up, others.len()) {
                (Some(node), _) => moved.push((p, node)),
                (None, 0) => stuck += 1,
                (None, n) => moved.push((p, others[self.next_id as usize % n])),
            }
        }
        for (p, to) in moved {
            if let Some(mine) = by_node.get_mut(&me) {
                mine.retain(|&q| q != p);
            }
            by_node.entry(to).or_default().push(p);
        }
        by_node.retain(|_, partitions| !partitions.is_empty());
        for partitions in by_node.values_mut() {
            partitions.sort_unstable();
        }
        stuck
    }

    fn on_changes_found(&mut self, from: NodeId, id: u64, pages: Option<Vec<(u16, FeedPage)>>) {
        let Some(Pending::Changes {
            gathering, asked, ..
        }) = self.pending.get_mut(&id)
        else {
            return;
        };
        if !gathering.waiting.remove(&from) {
            return; // a duplicate, or not asked
        }
        let failed = pages.is_none();
        if let (Some(pages), Some(asked)) = (pages, asked.get(&from)) {
            gathering.add(asked, pages);
        }
        if !failed && !gathering.waiting.is_empty() {
            return;
        }
        if let Some(Pending::Changes {
            caller,
            gathering,
            reconcile_pending,
            ..
        }) = self.pending.remove(&id)
        {
            let response = if failed {
                fail(
                    ErrorCode::Unavailable,
                    "a replica could not read its store for the change feed; retry",
                )
            } else {
                Response::Changes(gathering.page(reconcile_pending))
            };
            self.answer(caller, response);
        }
    }

    fn on_listed(&mut self, from: NodeId, id: u64, found: Option<Vec<(Vec<u8>, String)>>) {
        let Some(Pending::List {
            waiting,
            keys,
            limit,
            ..
        }) = self.pending.get_mut(&id)
        else {
            return;
        };
        if !waiting.remove(&from) {
            return; // a duplicate, or not asked
        }
        let Some(found) = found else {
            if let Some(Pending::List { caller, .. }) = self.pending.remove(&id) {
                let response = fail(
                    ErrorCode::Unavailable,
                    "a replica could not read its store for the listing, or is behind the cursor; retry",
                );
                self.answer(caller, response);
            }
            return;
        };
        // At most `limit` per answer: more would only be cut.
        keys.extend(found.into_iter().take(*limit));
        while keys.len() > *limit {
            keys.pop_last();
        }
        if waiting.is_empty() {
            if let Some(Pending::List { caller, keys, .. }) = self.pending.remove(&id) {
                self.answer(caller, Response::Keys(keys.into_iter().collect()));
            }
        }
    }

    fn on_fetched(&mut self, replica: &Replica, from: NodeId, id: u64, entry: Option<Vec<u8>>) {
        let done = match self.pending.get_mut(&id) {
            Some(Pending::Inspect {
                answers, waiting, ..
            }) => {
                if !waiting.contains(&from) {
                    return; // a duplicate, or not asked
                }
                waiting.retain(|&n| n != from);
                answers.push((from, entry));
                waiting.is_empty()
            }
            Some(Pending::Read {
                answers, needed, ..
            }) => {
                // A duplicated answer counts once.
                if answers.iter().any(|(n, _)| *n == from) {
                    return;
                }
                answers.push((from, entry));
                answers.len() >= *needed
            }
            _ => false,
        };
        if !done {
            return;
        }
        match self.pending.remove(&id) {
            Some(Pending::Inspect {
                to, key, answers, ..
            }) => self.out.push(CoordOutput::Inspected {
                to,
                key,
                answers,
                silent: Vec::new(),
            }),
            Some(Pending::Read {
                caller,
                call,
                partition,
                answers,
                ..
            }) => self.finish_read(replica, caller, call, partition, answers),
            _ => {}
        }
    }

    fn finish_read(
        &mut self,
        replica: &Replica,
        caller: Caller<C>,
        call: Call,
        partition: u16,
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
    ) {
        let store = replica.store();
        let Some(key) = call.request.key().map(<[u8]>::to_vec) else {
            return;
        };
        self.stats.requests += 1;
        let remote: Vec<Vec<u8>> = answers.iter().filter_map(|(_, e)| e.clone()).collect();
        let view = match store.merged_view(&key, &remote) {
            Ok(view) => view,
            // A replica sent an undecodable entry: read what this node has.
            Err(e) => {
                for (from, _) in &answers {
                    self.out.push(CoordOutput::Refused {
                        from: *from,
                        reason: format!("its entry for a read: {e}"),
                    });
                }
                match store.merged_view(&key, &[]) {
                    Ok(view) => view,
                    Err(e) => return self.answer(caller, store_failure(e)),
                }
            }
        };
        let response = read_response(&call.request, &view);
        // Merge what the others had into this replica, and repair those
        // whose entry differs from the merged one.
        let local = store.entry_bytes(&key).ok().flatten();
        let merged = view.encoded().map(<[u8]>::to_vec);
        let behind_here: Vec<GroupWrite> = remote
            .into_iter()
            .filter(|e| Some(e) != local.as_ref())
            .map(|entry| GroupWrite::Merge {
                partition,
                key: key.clone(),
                entry,
            })
            .collect();
        if !behind_here.is_empty() {
            let token = self.fresh_id();
            self.out.push(CoordOutput::Store(StoreJob {
                token,
                writes: behind_here,
                client: false,
                replica: false,
            }));
            self.writing.insert(token, Writing::Repair);
        }
        if let Some(merged) = merged {
            let behind: Vec<NodeId> = answers
                .into_iter()
                .filter(|(_, entry)| entry.as_deref() != Some(merged.as_slice()))
                .map(|(node, _)| node)
                .collect();
            self.replicate_to_all(replica, &behind, 0, partition, &key, &merged, false);
        }
        self.answer(caller, response);
    }

    fn expire_one(&mut self, id: u64) {
        let (caller, response) = match self.pending.remove(&id) {
            None => {
                // A client write still waiting for its local commit.
                let timeout = self.config.quorum_timeout;
                if let Some(Writing::Call { caller, .. }) = self.writing.get_mut(&id) {
                    if let Some(caller) = caller.take() {
                        let response = fail(
                            ErrorCode::Timeout,
                            format!("the write was not on disk here within {timeout:?} (the node is overloaded); it is still queued and may be applied"),
                        );
                        self.answer(caller, response);
                    }
                }
                return;
            }
            Some(Pending::Forwarded { caller }) => (
                caller,
                fail(
                    ErrorCode::Timeout,
                    "the replica coordinating this call did not answer in time; the write may or may not have been applied",
                ),
            ),
            Some(Pending::Write {
                caller,
                acked,
                local,
                w,
                ..
            }) => {
                let reached = acked.len() + usize::from(local == LocalCopy::Durable);
                (
                    caller,
                    if reached == 0 {
                        fail(
                            ErrorCode::Timeout,
                            format!("no replica confirmed the write within {:?}; it may or may not have been applied", self.config.quorum_timeout),
                        )
                    } else {
                        fail(
                            ErrorCode::QuorumNotMet {
                                reached: reached as u8,
                                needed: w,
                            },
                            format!(
                                "only {reached} of w={w} replicas acknowledged in time; the write is kept on those and will spread"
                            ),
                        )
                    },
                )
            }
            Some(Pending::List {
                caller, waiting, ..
            }) => (
                caller,
                fail(
                    ErrorCode::Unavailable,
                    format!(
                        "{} node(s) did not send their keys in time, so the listing would miss keys; retry",
                        waiting.len()
                    ),
                ),
            ),
            Some(Pending::Changes {
                caller, gathering, ..
            }) => (
                caller,
                fail(
                    ErrorCode::Unavailable,
                    format!(
                        "{} node(s) did not send their changes in time, so the page would miss changes; retry",
                        gathering.waiting.len()
                    ),
                ),
            ),
            Some(Pending::Inspect {
                to,
                key,
                answers,
                waiting,
            }) => {
                self.out.push(CoordOutput::Inspected {
                    to,
                    key,
                    answers,
                    silent: waiting,
                });
                return;
            }
            Some(Pending::Read {
                caller,
                call,
                answers,
                ..
            }) => (
                caller,
                fail(
                    ErrorCode::QuorumNotMet {
                        reached: answers.len() as u8 + 1,
                        needed: call.r,
                    },
                    format!(
                        "only {} of r={} replicas answered in time",
                        answers.len() + 1,
                        call.r
                    ),
                ),
            ),
        };
        self.answer(caller, response);
    }
}

/// A read served from this node's store alone (R = 1).
pub fn serve_read(replica: &Replica, request: &Request) -> Response {
    let store = replica.store();
    let result = match request {
        Request::Get { key } => store.get(key).map(|r| Response::Record(r.map(record))),
        Request::CounterGet { key } => store.counter(key).map(Response::Counter),
        Request::SetMembers { key } => store.set_members(key).map(Response::Members),
        other => return fail(ErrorCode::BadRequest, format!("{other:?} is not a read")),
    };
    result.unwrap_or_else(store_failure)
}
