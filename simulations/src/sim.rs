//! The deterministic driver: many replication cores, one virtual clock, one
//! seeded RNG, and a network that loses, duplicates, delays and reorders
//! messages and can be cut between groups of nodes.
//!
//! Every message crosses the "wire" as postcard bytes (so decoding runs and
//! sizes are real) and is counted by kind. Same seed, same run.
//!
//! Each node also runs the request [`Coordinator`], fed by client calls
//! ([`Sim::call`]) and a virtual disk: storage jobs wait a drawn latency
//! and are then committed together (group commit), as the node's storage
//! thread does; a crash loses the jobs not yet committed and the calls in
//! flight, never what was committed.

use gossipkv::client::{Call, Response};
use gossipkv::replication::coordinator::{
    Caller, CoordMessage, CoordOutput, Coordinator, CoordinatorConfig, StoreApplied, StoreDone,
    StoreJob,
};
use gossipkv::replication::layout::NodeSpec;
use gossipkv::replication::layout_state::LayoutState;
use gossipkv::replication::membership::{Addr, MembershipConfig, NodeMeta};
use gossipkv::replication::message::Message;
use gossipkv::replication::replica::{Output, Replica, ReplicaConfig, Timer};
use gossipkv::{NodeId, Store, StoreOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

/// Faults of the simulated network.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub loss: f64,
    pub duplicate: f64,
    /// Each message takes a delay drawn uniformly from this range, which
    /// also reorders messages.
    pub delay_ms: (u64, u64),
    /// A storage commit takes a time drawn from this range.
    pub disk_ms: (u64, u64),
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            loss: 0.0,
            duplicate: 0.0,
            delay_ms: (1, 10),
            disk_ms: (1, 4),
        }
    }
}

enum Event {
    Deliver {
        from: NodeId,
        to: Addr,
        bytes: Vec<u8>,
        kind: &'static str,
    },
    Timer {
        node: NodeId,
        epoch: u64,
        timer: Timer,
    },
    /// The node's virtual disk applies what is queued, as one group.
    Commit { node: NodeId, epoch: u64 },
    /// The group applied last is durable.
    Flushed { node: NodeId, epoch: u64 },
    /// The node's coordinator has calls whose time may be up.
    Deadline { node: NodeId, epoch: u64 },
}

/// Message bytes on the simulated wire: a tag, then the postcard encoding.
const TAG_CORE: u8 = 0;
const TAG_COORD: u8 = 1;

/// A client call's answer, and when it came.
#[derive(Clone, Debug)]
pub struct Reply {
    pub at: Duration,
    pub response: Response,
}

struct SimNode {
    replica: Option<Replica>,
    coordinator: Coordinator<u64>,
    /// Storage jobs waiting for the next commit.
    disk: Vec<StoreJob>,
    /// A group is being applied or flushed (the next waits for it).
    commit_scheduled: bool,
    /// The completions of the group being flushed.
    flushing: Vec<StoreDone>,
    /// The bytes the store's file holds.
    file: SimFile,
    /// The file before the group being flushed, and its write count after
    /// the group: a crash before the flush may lose the group, if nothing
    /// was written since (see `crash`).
    before_flush: Option<(Vec<u8>, u64)>,
    /// The group being flushed has client writes whose entries went out.
    flushing_sent: bool,
    /// The store has recorded that it exposes writes (see
    /// `Store::commit_group_exposed`): that record is durable before the
    /// first exposed group, so only later groups can be lost.
    exposure_recorded: bool,
    /// The earliest coordinator deadline an event is scheduled for.
    deadline_scheduled: Option<Duration>,
    /// This node's commit latency, when not the network config's.
    disk_ms: Option<(u64, u64)>,
    store: Arc<Store>,
    addr: Addr,
    incarnation: u32,
    epoch: u64,
    meta: NodeMeta,
    /// The layout state saved at a crash, as a real node would persist it.
    saved_layout: Option<LayoutState>,
}

/// Bytes delivered, by message kind and by receiving node.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    pub by_kind: BTreeMap<&'static str, u64>,
    pub received: BTreeMap<(NodeId, &'static str), u64>,
    pub messages: u64,
}

pub struct Sim {
    pub now: Duration,
    rng: StdRng,
    seed: u64,
    nodes: BTreeMap<NodeId, SimNode>,
    by_addr: HashMap<Addr, NodeId>,
    queue: BTreeMap<(Duration, u64), Event>,
    next_event: u64,
    pub net: NetConfig,
    cut: BTreeSet<(NodeId, NodeId)>,
    pub traffic: Traffic,
    pub config: ReplicaConfig,
    pub partitions: u16,
    pub replicas: u8,
    pub errors: u64,
    pub coordinator: CoordinatorConfig,
    next_ticket: u64,
    replies: HashMap<u64, Reply>,
    /// Tickets answered more than once (must stay empty).
    pub answered_twice: Vec<u64>,
    /// Crashes that lost a group whose entries had gone out (see `crash`).
    pub flushes_lost: u64,
    /// Nodes that layout messages do not reach (a node slow to hear of a
    /// new layout); everything else reaches them.
    pub withhold_layout: BTreeSet<NodeId>,
}

fn encode<T: serde::Serialize>(tag: u8, message: &T) -> postcard::Result<Vec<u8>> {
    let mut bytes = vec![tag];
    bytes.extend(postcard::to_allocvec(message)?);
    Ok(bytes)
}

/// A synthetic address: never used for real traffic, only as a name.
fn addr_of(id: NodeId) -> Addr {
    let n = id.0 as u32;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 1, (n >> 8) as u8, n as u8),
        7000,
    ))
}

pub fn default_meta() -> NodeMeta {
    NodeMeta {
        capacity: 100,
        zone: None,
        name: None,
        load: Default::default(),
    }
}

impl Sim {
    pub fn new(seed: u64, nodes: usize, partitions: u16, replicas: u8) -> Sim {
        let config = ReplicaConfig {
            membership: MembershipConfig::simulation(nodes.max(2)),
            migration_timeout: Duration::from_secs(5),
            purge_interval: Duration::from_secs(10),
            remove_down_after: Duration::from_secs(600),
            ..ReplicaConfig::default()
        };
        Sim {
            now: Duration::ZERO,
            rng: StdRng::seed_from_u64(seed),
            seed,
            nodes: BTreeMap::new(),
            by_addr: HashMap::new(),
            queue: BTreeMap::new(),
            next_event: 0,
            net: NetConfig::default(),
            cut: BTreeSet::new(),
            traffic: Traffic::default(),
            config,
            partitions,
            replicas,
            errors: 0,
            coordinator: CoordinatorConfig::default(),
            next_ticket: 0,
            replies: HashMap::new(),
            answered_twice: Vec::new(),
            flushes_lost: 0,
            withhold_layout: BTreeSet::new(),
        }
    }

    /// Starts `n` nodes (ids 1..=n) as a new cluster sharing a bootstrap
    /// layout, joined through node 1.
    pub fn bootstrap(&mut self, n: usize) {
        let specs: Vec<NodeSpec> = (1..=n as u64)
            .map(|i| NodeSpec {
                id: NodeId(i),
                capacity: 100,
                zone: None,
            })
            .collect();
        let layout = LayoutState::bootstrap(self.partitions, self.replicas, &specs);
        for i in 1..=n as u64 {
            self.add_node(NodeId(i), default_meta(), layout.clone());
        }
        let seed = addr_of(NodeId(1));
        for i in 2..=n as u64 {
            self.join(NodeId(i), seed);
        }
    }

    fn add_node(&mut self, id: NodeId, meta: NodeMeta, layout: LayoutState) {
        let options = StoreOptions::default()
            .node_id(id)
            .partitions(self.partitions);
        let file = SimFile::default();
        let store = Arc::new(Store::open_with_backend(file.clone(), options).expect("sim store"));
        let addr = addr_of(id);
        self.by_addr.insert(addr, id);
        self.nodes.insert(
            id,
            SimNode {
                replica: None,
                coordinator: Coordinator::new(self.coordinator.clone(), 0),
                disk: Vec::new(),
                commit_scheduled: false,
                flushing: Vec::new(),
                file,
                before_flush: None,
                flushing_sent: false,
                exposure_recorded: false,
                deadline_scheduled: None,
                disk_ms: None,
                store,
                addr,
                incarnation: 1,
                epoch: 0,
                meta,
                saved_layout: Some(layout),
            },
        );
        self.boot(id);
    }

    fn boot(&mut self, id: NodeId) {
        let seed = self.seed ^ id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let config = self.config.clone();
        let (partitions, replicas) = (self.partitions, self.replicas);
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.epoch += 1;
        // A fresh run: nothing in flight, call ids unlike the last run's.
        let first_id = node.epoch << 40;
        node.coordinator = Coordinator::new(self.coordinator.clone(), first_id);
        node.disk.clear();
        node.commit_scheduled = false;
        node.deadline_scheduled = None;
        let layout = node
            .saved_layout
            .take()
            .unwrap_or_else(|| LayoutState::new(partitions, replicas));
        let mut replica = Replica::new(
            node.store.clone(),
            node.addr,
            node.incarnation,
            node.meta.clone(),
            layout,
            config,
            seed ^ u64::from(node.incarnation),
        );
        let outputs = replica.start(self.now);
        node.replica = Some(replica);
        self.carry_out(id, outputs);
    }

    /// A brand-new node joins through `seed`.
    pub fn add_joining_node(&mut self, id: NodeId, meta: NodeMeta, seed: Addr) {
        let layout = LayoutState::new(self.partitions, self.replicas);
        self.add_node(id, meta, layout);
        self.join(id, seed);
    }

    pub fn join(&mut self, id: NodeId, seed: Addr) {
        let now = self.now;
        let outputs = match self.replica_mut(id) {
            Some(r) => r.join(now, seed),
            None => return,
        };
        self.carry_out(id, outputs);
    }

    pub fn leave(&mut self, id: NodeId) {
        let now = self.now;
        let outputs = match self.replica_mut(id) {
            Some(r) => r.leave(now),
            None => return,
        };
        self.carry_out(id, outputs);
    }

    pub fn set_capacity(&mut self, id: NodeId, capacity: u32) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.meta.capacity = capacity;
        let meta = node.meta.clone();
        let outputs = match node.replica.as_mut() {
            Some(r) => r.set_meta(now, meta),
            None => return,
        };
        self.carry_out(id, outputs);
    }

    /// The virtual clock.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Sets every node's migration budget (bytes/s; `None`: unlimited),
    /// and the budget of nodes started later.
    pub fn set_migration_budget(&mut self, budget: Option<u64>) {
        self.config.migration_budget = budget;
        let now = self.now;
        for id in self.node_ids() {
            let outputs = match self.replica_mut(id) {
                Some(r) => r.set_migration_budget(now, budget),
                None => continue,
            };
            self.carry_out(id, outputs);
        }
    }

    /// Applies load-planner moves on `id` (see
    /// `Replica::apply_layout_moves`).
    pub fn apply_layout_moves(
        &mut self,
        id: NodeId,
        base: u64,
        moves: &[gossipkv::replication::layout::LayoutMove],
    ) -> Result<(), String> {
        let now = self.now;
        let replica = self
            .replica_mut(id)
            .ok_or_else(|| format!("node {id} is down"))?;
        let outputs = replica.apply_layout_moves(now, base, moves)?;
        self.carry_out(id, outputs);
        Ok(())
    }

    /// Migration chunk bytes each node has sent (the pacer's count).
    pub fn migration_bytes_sent(&self) -> u64 {
        self.nodes
            .values()
            .filter_map(|n| n.replica.as_ref())
            .map(|r| r.stats().migration_bytes_sent)
            .sum()
    }

    /// Stops a node's core at once, keeping its layout as persisted and
    /// its store as the disk holds it: committed data, less the group
    /// being flushed if the draw says the crash lost it (half the time,
    /// when nothing was written since). The store is reopened from those
    /// bytes, as a restarted process would.
    pub fn crash(&mut self, id: NodeId) {
        // Drawn apart from the main generator, so that adding this draw
        // left every other scenario's sequence as it was.
        let draw = (self.seed ^ id.0.rotate_left(17) ^ self.now.as_nanos() as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let lose = draw >> 63 == 1;
        let partitions = self.partitions;
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(replica) = node.replica.take() {
                node.saved_layout = Some(replica.layout().clone());
            }
            let image = match node.before_flush.take() {
                Some((before, writes)) if lose && node.file.writes() == writes => {
                    self.flushes_lost += 1;
                    before
                }
                _ => node.file.bytes(),
            };
            node.file = SimFile::from_bytes(image);
            let options = StoreOptions::default().node_id(id).partitions(partitions);
            node.store = Arc::new(
                Store::open_with_backend(node.file.clone(), options).expect("sim store reopens"),
            );
            node.exposure_recorded = false;
            // Jobs not committed are lost with the process; their calls
            // were never answered.
            node.disk.clear();
            node.flushing.clear();
            node.commit_scheduled = false;
            node.deadline_scheduled = None;
            node.coordinator = Coordinator::new(self.coordinator.clone(), 0);
            node.epoch += 1;
        }
    }

    /// Stops a node cleanly (SIGTERM): what it committed is durable and
    /// its store records a clean close, so it restarts under the same
    /// writer. Calls in flight are lost as with a crash.
    pub fn stop(&mut self, id: NodeId) {
        if let Some(node) = self.nodes.get_mut(&id) {
            // A clean stop waits for the group being flushed.
            node.before_flush = None;
            if let Err(e) = node.store.close() {
                panic!("a simulated store failed to close: {e}");
            }
        }
        self.crash(id);
    }

    /// Restarts a crashed node with a higher incarnation and rejoins.
    pub fn restart(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.replica.is_some() {
            return;
        }
        node.incarnation += 1;
        self.boot(id);
        let seed = self
            .nodes
            .keys()
            .copied()
            .find(|&n| n != id && self.is_up(n))
            .map(addr_of);
        if let Some(seed) = seed {
            self.join(id, seed);
        }
    }

    /// Whether `id` is flushing a group whose client writes went out
    /// (a crash now may lose it; see `crash`).
    pub fn is_flushing_exposed(&self, id: NodeId) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.before_flush.is_some() && n.flushing_sent)
    }

    /// Gives `node` its own commit latency (`None`: the network config's).
    pub fn set_disk_ms(&mut self, node: NodeId, disk_ms: Option<(u64, u64)>) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.disk_ms = disk_ms;
        }
    }

    /// Changes at each crash and each start of the node.
    pub fn epoch(&self, id: NodeId) -> u64 {
        self.nodes.get(&id).map_or(0, |n| n.epoch)
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.replica.is_some())
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn up_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .keys()
            .copied()
            .filter(|&n| self.is_up(n))
            .collect()
    }

    pub fn replica(&self, id: NodeId) -> Option<&Replica> {
        self.nodes.get(&id).and_then(|n| n.replica.as_ref())
    }

    fn replica_mut(&mut self, id: NodeId) -> Option<&mut Replica> {
        self.nodes.get_mut(&id).and_then(|n| n.replica.as_mut())
    }

    pub fn store(&self, id: NodeId) -> Option<&Arc<Store>> {
        self.nodes.get(&id).map(|n| &n.store)
    }

    pub fn addr(&self, id: NodeId) -> Addr {
        addr_of(id)
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Cuts every link between the two groups (both directions).
    pub fn split(&mut self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    fn push(&mut self, at: Duration, event: Event) {
        self.next_event += 1;
        self.queue.insert((at, self.next_event), event);
    }

    fn carry_out(&mut self, from: NodeId, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, message } => {
                    let withheld = matches!(message, Message::Layout(_))
                        && self
                            .by_addr
                            .get(&to)
                            .is_some_and(|id| self.withhold_layout.contains(id));
                    if withheld {
                        continue;
                    }
                    if let Ok(bytes) = encode(TAG_CORE, &message) {
                        self.send(from, to, bytes, message.kind());
                    }
                }
                Output::Schedule { after, timer } => {
                    let epoch = self.nodes.get(&from).map_or(0, |n| n.epoch);
                    self.push(
                        self.now + after,
                        Event::Timer {
                            node: from,
                            epoch,
                            timer,
                        },
                    );
                }
                Output::Event(_) => {}
                Output::Store { token, write } => self.queue_job(
                    from,
                    StoreJob {
                        token,
                        writes: vec![write],
                        client: false,
                        replica: true,
                    },
                ),
            }
        }
    }

    /// Queues a storage job on `id`'s virtual disk, starting a group if
    /// none is being applied or flushed.
    fn queue_job(&mut self, id: NodeId, job: StoreJob) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.disk.push(job);
        if !node.commit_scheduled {
            node.commit_scheduled = true;
            let epoch = node.epoch;
            self.push(now, Event::Commit { node: id, epoch });
        }
    }

    fn send(&mut self, from: NodeId, to: Addr, bytes: Vec<u8>, kind: &'static str) {
        if self.rng.random_bool(self.net.loss) {
            return;
        }
        let copies = if self.rng.random_bool(self.net.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let (lo, hi) = self.net.delay_ms;
            let delay = Duration::from_millis(self.rng.random_range(lo..=hi.max(lo)));
            self.push(
                self.now + delay,
                Event::Deliver {
                    from,
                    to,
                    bytes: bytes.clone(),
                    kind,
                },
            );
        }
    }

    /// Runs events until `until` (virtual time).
    pub fn run_until(&mut self, until: Duration) {
        while let Some(entry) = self.queue.first_entry() {
            let (at, _) = *entry.key();
            if at > until {
                break;
            }
            let event = entry.remove();
            self.now = at;
            match event {
                Event::Timer { node, epoch, timer } => {
                    let now = self.now;
                    let Some(n) = self.nodes.get_mut(&node) else {
                        continue;
                    };
                    if n.epoch != epoch {
                        continue; // a timer of a crashed incarnation
                    }
                    let Some(replica) = n.replica.as_mut() else {
                        continue;
                    };
                    let outputs = replica.handle_timer(now, timer);
                    self.carry_out(node, outputs);
                }
                Event::Deliver {
                    from,
                    to,
                    bytes,
                    kind,
                } => {
                    let Some(&dest) = self.by_addr.get(&to) else {
                        continue;
                    };
                    if self.cut.contains(&(from, dest)) || !self.is_up(from) {
                        continue;
                    }
                    *self.traffic.by_kind.entry(kind).or_default() += bytes.len() as u64;
                    *self.traffic.received.entry((dest, kind)).or_default() += bytes.len() as u64;
                    self.traffic.messages += 1;
                    self.deliver(from, dest, &bytes);
                }
                Event::Commit { node, epoch } => self.commit(node, epoch),
                Event::Flushed { node, epoch } => self.flushed(node, epoch),
                Event::Deadline { node, epoch } => {
                    let now = self.now;
                    let Some(n) = self.nodes.get_mut(&node) else {
                        continue;
                    };
                    if n.epoch != epoch {
                        continue;
                    }
                    n.deadline_scheduled = None;
                    let Some(replica) = n.replica.as_ref() else {
                        continue;
                    };
                    let outputs = n.coordinator.expire(replica, now);
                    self.carry_coord(node, outputs);
                }
            }
        }
        self.now = until;
    }

    fn deliver(&mut self, from: NodeId, dest: NodeId, bytes: &[u8]) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(&dest) else {
            return;
        };
        let Some(replica) = node.replica.as_mut() else {
            return;
        };
        match bytes.split_first() {
            Some((&TAG_CORE, body)) => {
                let Ok(message) = postcard::from_bytes::<Message>(body) else {
                    self.errors += 1;
                    return;
                };
                match replica.handle_message(now, from, message) {
                    Ok(outputs) => self.carry_out(dest, outputs),
                    Err(_) => self.errors += 1,
                }
            }
            Some((&TAG_COORD, body)) => {
                let Ok(message) = postcard::from_bytes::<CoordMessage>(body) else {
                    self.errors += 1;
                    return;
                };
                let outputs = node.coordinator.message(replica, now, from, message);
                self.carry_coord(dest, outputs);
            }
            _ => self.errors += 1,
        }
    }

    /// A client call on `node`; its answer is read with [`Sim::reply`].
    /// `None` if the node is down.
    pub fn call(&mut self, node: NodeId, call: Call) -> Option<u64> {
        let now = self.now;
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let n = self.nodes.get_mut(&node)?;
        let replica = n.replica.as_ref()?;
        let outputs = n
            .coordinator
            .call(replica, now, call, Caller::Client(ticket));
        self.carry_coord(node, outputs);
        Some(ticket)
    }

    pub fn reply(&self, ticket: u64) -> Option<&Reply> {
        self.replies.get(&ticket)
    }

    /// Runs until `ticket` is answered, for at most `limit`.
    pub fn wait_reply(&mut self, ticket: u64, limit: Duration) -> Option<Reply> {
        let step = Duration::from_millis(5);
        self.run_until_condition(step, limit, |s| s.replies.contains_key(&ticket))?;
        self.replies.get(&ticket).cloned()
    }

    fn carry_coord(&mut self, from: NodeId, outputs: Vec<CoordOutput<u64>>) {
        for output in outputs {
            match output {
                CoordOutput::Send { to, message } => {
                    if let Ok(bytes) = encode(TAG_COORD, &message) {
                        self.send(from, addr_of(to), bytes, message.kind());
                    }
                }
                CoordOutput::Store(job) => self.queue_job(from, job),
                CoordOutput::Reply { to, response } => {
                    let reply = Reply {
                        at: self.now,
                        response,
                    };
                    if self.replies.insert(to, reply).is_some() {
                        self.answered_twice.push(to);
                    }
                }
                CoordOutput::Inspected { .. } | CoordOutput::Refused { .. } => {}
            }
        }
        let Some(node) = self.nodes.get_mut(&from) else {
            return;
        };
        if let Some(at) = node.coordinator.next_deadline() {
            if node.deadline_scheduled.is_none_or(|s| at < s) {
                node.deadline_scheduled = Some(at);
                let epoch = node.epoch;
                self.push(at.max(self.now), Event::Deadline { node: from, epoch });
            }
        }
    }

    /// The virtual disk applies every queued job in one group, as the
    /// storage thread does, reports the client writes applied (their
    /// entries go out while the group flushes) and flushes for a drawn
    /// latency. A crash during the flush loses the completions, and may
    /// lose the group itself (see `crash`).
    fn commit(&mut self, id: NodeId, epoch: u64) {
        let (lo, hi) = self
            .nodes
            .get(&id)
            .and_then(|n| n.disk_ms)
            .unwrap_or(self.net.disk_ms);
        let latency = Duration::from_millis(self.rng.random_range(lo..=hi.max(lo)));
        let now = self.now;
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.epoch != epoch {
            return;
        }
        let jobs = std::mem::take(&mut node.disk);
        let writes: Vec<_> = jobs.iter().flat_map(|j| j.writes.iter().cloned()).collect();
        let before = node.exposure_recorded.then(|| node.file.bytes());
        let mut applied = Vec::new();
        let result = node.store.commit_group_exposed(&writes, |outcomes| {
            let jobs = jobs.iter().map(|j| (j.token, j.writes.len(), j.client));
            applied = StoreApplied::of_group(jobs, outcomes);
        });
        let done: Vec<StoreDone> = match result {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                jobs.iter()
                    .map(|job| StoreDone {
                        token: job.token,
                        replica: job.replica,
                        outcome: Ok(outcomes.by_ref().take(job.writes.len()).collect()),
                    })
                    .collect()
            }
            Err(e) => jobs
                .iter()
                .map(|job| StoreDone {
                    token: job.token,
                    replica: job.replica,
                    outcome: Err(e.to_string()),
                })
                .collect(),
        };
        node.flushing = done;
        node.before_flush = before.map(|b| (b, node.file.writes()));
        node.flushing_sent = !applied.is_empty();
        node.exposure_recorded = true;
        self.push(now + latency, Event::Flushed { node: id, epoch });
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(replica) = node.replica.as_ref() else {
            return;
        };
        if !applied.is_empty() {
            let outputs = node.coordinator.applied(replica, applied);
            self.carry_coord(id, outputs);
        }
    }

    /// The group applied last is durable: its jobs complete, and the next
    /// group starts if jobs are waiting.
    fn flushed(&mut self, id: NodeId, epoch: u64) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.epoch != epoch {
            return;
        }
        let done = std::mem::take(&mut node.flushing);
        node.before_flush = None;
        node.commit_scheduled = !node.disk.is_empty();
        if node.commit_scheduled {
            self.push(now, Event::Commit { node: id, epoch });
        }
        let (replicas, done): (Vec<_>, Vec<_>) = done.into_iter().partition(|d| d.replica);
        for done in replicas {
            let token = done.token;
            let outputs = match self.replica_mut(id) {
                Some(r) => r.stored(now, token, done.single()),
                None => return,
            };
            self.carry_out(id, outputs);
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(replica) = node.replica.as_ref() else {
            return;
        };
        let outputs = node.coordinator.stored(replica, done);
        self.carry_coord(id, outputs);
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Runs until `done` holds, checking every `step`, for at most `limit`.
    /// Returns the virtual time it took, or `None` on timeout.
    pub fn run_until_condition(
        &mut self,
        step: Duration,
        limit: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        loop {
            if done(self) {
                return Some(self.now - start);
            }
            if self.now - start >= limit {
                return None;
            }
            self.run_for(step);
        }
    }

    /// True when every up holder of every partition (in every up node's
    /// view, old and new replicas) has the same version vector, every up
    /// node has the same layout, no layout change is in progress, and no
    /// node keeps data of a partition it does not hold.
    pub fn converged(&self) -> bool {
        self.divergence().is_none()
    }

    /// Why the cluster has not converged, in one line; `None` once it has.
    pub fn divergence(&self) -> Option<String> {
        let up = self.up_nodes();
        let first = up.first().and_then(|&n| self.replica(n))?;
        let layout = first.layout();
        if layout.in_transition() {
            let pending: Vec<String> = up
                .iter()
                .map(|&n| {
                    let own = self.replica(n).map(|r| {
                        (
                            r.layout().summary(),
                            r.layout().pending_migrations(n),
                            r.migrating(),
                            r.membership().alive().len(),
                        )
                    });
                    format!("{n}:{:?} own {:?}", layout.pending_migrations(n), own)
                })
                .collect();
            return Some(format!(
                "layout v{} still in transition from v{} (pending per node {})",
                layout.current().version(),
                layout.completed().version(),
                pending.join(" ")
            ));
        }
        for &n in &up {
            let other = self.replica(n).map(|r| r.layout());
            if other != Some(layout) {
                let o = other.map(|l| (l.current().version(), l.completed().version()));
                return Some(format!(
                    "node {n} sees layout {o:?}, node {} sees ({}, {})",
                    up[0],
                    layout.current().version(),
                    layout.completed().version()
                ));
            }
        }
        let versions: BTreeMap<NodeId, Vec<gossipkv::VersionVector>> = up
            .iter()
            .filter_map(|&n| Some((n, self.store(n)?.partition_versions().ok()?)))
            .collect();
        for p in 0..self.partitions {
            let holders: Vec<NodeId> = layout
                .holders(p)
                .into_iter()
                .filter(|n| up.contains(n))
                .collect();
            for (n, v) in &versions {
                if !holders.contains(n) && !v[usize::from(p)].is_empty() {
                    return Some(format!(
                        "node {n} still holds partition {p}, held by {holders:?}"
                    ));
                }
            }
            let vs: Vec<_> = holders
                .iter()
                .filter_map(|n| versions.get(n).map(|v| (n, &v[usize::from(p)])))
                .collect();
            if vs.windows(2).any(|w| w[0].1 != w[1].1) {
                return Some(format!("partition {p} differs between holders {:?}", vs));
            }
        }
        None
    }

    /// The layout as the lowest up node sees it.
    pub fn layout(&self) -> Option<&LayoutState> {
        self.up_nodes()
            .first()
            .and_then(|&n| self.replica(n))
            .map(|r| r.layout())
    }

    pub fn bytes_of(&self, kind: &str) -> u64 {
        self.traffic.by_kind.get(kind).copied().unwrap_or(0)
    }

    pub fn bytes_received(&self, node: NodeId, kinds: &[&str]) -> u64 {
        kinds
            .iter()
            .map(|k| self.traffic.received.get(&(node, *k)).copied().unwrap_or(0))
            .sum()
    }
}

/// A store file in memory whose bytes the simulator can copy and restore
/// (to model a crash that loses the commit being flushed).
#[derive(Clone, Default)]
pub struct SimFile(Arc<std::sync::Mutex<FileState>>);

#[derive(Default)]
struct FileState {
    bytes: Vec<u8>,
    writes: u64,
}

impl SimFile {
    fn from_bytes(bytes: Vec<u8>) -> Self {
        SimFile(Arc::new(std::sync::Mutex::new(FileState {
            bytes,
            writes: 0,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bytes(&self) -> Vec<u8> {
        self.state().bytes.clone()
    }

    /// Writes so far (a change tells that something was committed).
    fn writes(&self) -> u64 {
        self.state().writes
    }
}

impl std::fmt::Debug for SimFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sim file ({} bytes)", self.state().bytes.len())
    }
}

impl redb::StorageBackend for SimFile {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.state().bytes.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let state = self.state();
        let offset = usize::try_from(offset).map_err(std::io::Error::other)?;
        let bytes = state
            .bytes
            .get(offset..offset + out.len())
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        let mut state = self.state();
        state.bytes.resize(len, 0);
        state.writes += 1;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let offset = usize::try_from(offset).map_err(std::io::Error::other)?;
        let mut state = self.state();
        let target = state
            .bytes
            .get_mut(offset..offset + data.len())
            .ok_or_else(|| std::io::Error::other("write past the end"))?;
        target.copy_from_slice(data);
        state.writes += 1;
        Ok(())
    }
}
