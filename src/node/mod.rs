//! The gossipkv node: a tokio runtime that owns the store, drives the
//! replication core over QUIC, and serves clients.
//!
//! One task (the core loop, here) owns the [`Replica`]: it takes peer
//! messages, client requests and storage completions from channels, fires
//! due timers, and hands the outputs to the transport. Where each job is:
//!
//! - `listen`: admits connections by certificate and limits, reads frames
//!   and requests, forwards them to the core loop;
//! - `coordinate`: hands client calls and coordination messages to the
//!   sans-IO [`Coordinator`] (quorums, forwarding, read repair, replication
//!   of writes) and carries out its outputs;
//! - `storage`: the storage thread, which commits every write in groups;
//! - `peers`: the peer wire format and the outgoing queues;
//! - `admin`: admin and inspection requests, the node's status;
//! - `files`: the small files beside the store; `reload`: TLS reloads;
//!   `limits`: resource bounds; `metrics`: the Prometheus endpoint.
//!
//! The core loop never waits for a disk flush: writes go to the storage
//! thread and their answers wait for its completion, while reads, gossip
//! and acknowledgements go on.

mod admin;
pub mod config;
mod coordinate;
mod devices;
mod files;
pub mod http;
pub mod limits;
mod listen;
pub mod metrics;
mod peers;
mod rebalance;
pub use rebalance::RebalanceSettings;
mod reload;
mod remote_watch;
mod storage;

use files::{
    file_err, load_layout, load_peers, load_tokens, next_incarnation, reset_key, save_layout,
    save_peers, save_tokens, STORE_FILE,
};
use listen::accept_loop;
pub use peers::{decode_peer_frame, replicate_frame};
use peers::{Envelope, Payload, Peers};

use crate::client::{Call, Response};
use crate::crdt::NodeId;
use crate::replication::coordinator::{reads_locally, Coordinator, CoordinatorConfig, StoreJob};
use crate::replication::layout::NodeSpec;
use crate::replication::layout_state::LayoutState;
use crate::replication::membership::{MemberState, MembershipConfig, NodeMeta};
use crate::replication::replica::{
    MembershipEventKind, Output, Replica, ReplicaConfig, ReplicaEvent, Timer,
};
use crate::store::{Store, StoreOptions};
use crate::transport::tls::{client_config, TlsIdentity};
use crate::transport::{frame, ALPN_PEER};
use config::{NodeConfig, Security};
use coordinate::ClientReply;
use limits::Limits;
use metrics::Metrics;
use reload::LiveTls;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("store: {0}")]
    Store(#[from] crate::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error("cannot {action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the storage thread: {0}")]
    StorageThread(#[source] std::io::Error),
    #[error("{} is damaged: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },
    #[error("{} is a {identity}, not a node certificate: issue one with `gossipkv certs issue --role node`", path.display())]
    NotANodeCertificate { path: PathBuf, identity: String },
    #[error("--node-id {given} does not match the node certificate {}, which names {certified:?}", path.display())]
    NameMismatch {
        given: String,
        certified: String,
        path: PathBuf,
    },
}

/// The ways into the core loop: membership messages have their own
/// channel, which the loop serves first, so that a backlog of client calls
/// and replicated writes never delays a probe's answer.
#[derive(Clone)]
struct Inbox {
    main: mpsc::Sender<CoreInput>,
    membership: mpsc::Sender<CoreInput>,
}

enum CoreInput {
    Peer {
        from: NodeId,
        payload: Payload,
    },
    Client {
        call: Call,
        reply: oneshot::Sender<Response>,
    },
    /// A held watch here asks to hear of `key`'s commits on the replicas
    /// its reads go to (see `http::watch`).
    Subscribe {
        key: Vec<u8>,
        prefix: bool,
    },
}

/// How often the sizes held are counted (it scans the held partitions) and
/// the load figures gossiped.
const SIZES_INTERVAL: Duration = Duration::from_secs(30);

/// Runs a node until `shutdown` completes.
pub async fn run(
    mut config: NodeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    // Everything that can refuse the start comes before anything is
    // written: a failed start leaves no data directory, store or
    // incarnation bump behind.
    let identity = match &config.security {
        Security::Tls(dir) => Some(TlsIdentity::load(dir)?),
        Security::Insecure => {
            warn!("INSECURE MODE: peers and clients are not authenticated and traffic is readable by anyone on the path; never use this outside experiments");
            None
        }
    };
    let name = match (&identity, &config.node_id, &config.security) {
        (Some(tls), given, Security::Tls(dir)) => {
            let cert = tls.identity();
            if cert.role != crate::certs::Role::Node {
                return Err(NodeError::NotANodeCertificate {
                    path: dir.join(crate::certs::CERT),
                    identity: cert.to_string(),
                });
            }
            if let Some(given) = given.as_ref().filter(|g| **g != cert.name) {
                return Err(NodeError::NameMismatch {
                    given: given.clone(),
                    certified: cert.name.clone(),
                    path: dir.join(crate::certs::CERT),
                });
            }
            Some(cert.name.clone())
        }
        (_, given, _) => given.clone(),
    };
    let peer_client = client_config(identity.as_ref(), ALPN_PEER)?;
    let live = Arc::new(LiveTls::new(
        match (&identity, &config.security) {
            (Some(id), Security::Tls(dir)) => Some((id, dir.as_path())),
            _ => None,
        },
        peer_client,
        Arc::new(
            config
                .limits
                .transport(crate::transport::tls::base_transport()),
        ),
    ));
    let server = live.server_config(identity.as_ref())?;
    if let (Some(id), Security::Tls(dir)) = (&identity, &config.security) {
        reload::warn_if_expiring(id.identity().not_after, &dir.join(crate::certs::CERT));
    }
    // Before the node is reachable (see `reload::hangup`).
    #[cfg(unix)]
    let hangup = reload::hangup();
    let listen = config.listen;
    let listen_err = |source| NodeError::Listen {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(config.listen).map_err(listen_err)?;
    if config.advertise.port() == 0 {
        // `--listen` on port 0 (and no `--advertise`): peers dial the port
        // the system picked.
        let bound = socket.local_addr().map_err(listen_err)?;
        config.advertise.set_port(bound.port());
        config.listen = bound;
    }
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = config.metrics_listen {
        metrics::serve(addr, metrics.clone())
            .await
            .map_err(|source| NodeError::Listen { addr, source })?;
        info!(%addr, "metrics at http://{addr}/metrics");
    }

    std::fs::create_dir_all(&config.data_dir).map_err(file_err("create", &config.data_dir))?;
    let options = StoreOptions {
        node_id: name.as_deref().map(NodeId::from_name),
        write_ahead_log: true,
        checkpoint_interval: config.checkpoint_interval,
        ..StoreOptions::default()
    };
    let store_path = config.data_dir.join(STORE_FILE);
    if let Ok(meta) = std::fs::metadata(&store_path) {
        // Every page checksum is verified at open: about 0.6 ms per MB.
        info!(path = %store_path.display(), bytes = meta.len(), "verifying the store file");
    }
    let store = Arc::new(Store::open(&store_path, options)?);
    let ledger = Arc::new(devices::DeviceLedger::load(&store)?);
    let id = store.node_id();
    let name = name.unwrap_or_else(|| id.to_string());
    let _ = metrics.node.set((name.clone(), id.to_string()));
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::new(Arc::new(reset_key(&config.data_dir)?)),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(listen_err)?;
    let incarnation = next_incarnation(&config.data_dir)?;
    // Capacity and zone an operator set at run time win over the config's.
    let placement = files::load_placement(&config.data_dir)?;
    if placement != files::Placement::default() {
        info!(capacity = ?placement.capacity, zone = ?placement.zone, "capacity or zone set with kvctl ({}) override the configuration", files::PLACEMENT_FILE);
    }
    let meta = NodeMeta {
        capacity: placement.capacity.unwrap_or(config.capacity),
        zone: placement
            .zone
            .clone()
            .unwrap_or_else(|| config.zone.clone()),
        name: Some(name.clone()),
        load: Default::default(),
    };
    let partitions = store.partitions();
    let layout = match load_layout(&config.data_dir, partitions)? {
        Some(layout) => layout,
        None if config.seeds.is_empty() && config.expect_nodes > 1 => {
            info!(
                expect = config.expect_nodes,
                "no seeds and no saved layout: starting a new cluster once {} nodes are up",
                config.expect_nodes
            );
            LayoutState::new(partitions, config.replicas)
        }
        None if config.seeds.is_empty() => {
            info!("no seeds and no saved layout: starting a new cluster");
            let me = NodeSpec {
                id,
                capacity: config.capacity,
                zone: config.zone.clone(),
            };
            LayoutState::bootstrap(partitions, config.replicas, &[me])
        }
        None => LayoutState::new(partitions, config.replicas),
    };
    save_layout(&config.data_dir, &layout);

    info!(node = %name, id = %id, listen = %config.listen, advertise = %config.advertise, incarnation, "node up");

    let replica_config = ReplicaConfig {
        membership: MembershipConfig::lan(16),
        bootstrap_expect: config.seeds.is_empty().then_some(config.expect_nodes),
        migration_budget: Some(config.rebalance.migration_budget_bytes_per_sec).filter(|&b| b > 0),
        migration_stall_after: Duration::from_secs(config.rebalance.migration_stall_secs),
        ..ReplicaConfig::default()
    };
    let seed = u64::from(incarnation) ^ id.0 ^ u64::from(std::process::id());
    let tokens = load_tokens(&config.data_dir)?;
    let (tokens_tx, tokens_rx) = tokio::sync::watch::channel(Arc::new(tokens.clone()));
    let (local_reads_tx, local_reads_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    let mut replica = Replica::new(
        store.clone(),
        config.advertise,
        incarnation,
        meta,
        layout,
        replica_config,
        seed,
    );
    replica.load_tokens(tokens);

    #[cfg(unix)]
    let reloader = hangup.map(|signal| {
        tokio::spawn(reload::reload_on_hangup(
            signal,
            live.clone(),
            endpoint.clone(),
        ))
    });
    if let Some(id) = &identity {
        info!(
            expires = %crate::certs::rfc3339(id.identity().not_after),
            revoked = id.revoked().len(),
            "TLS: certificate expires {}, {} revoked{}; SIGHUP reloads the TLS directory",
            crate::certs::rfc3339(id.identity().not_after),
            id.revoked().len(),
            if id.has_crl() { "" } else { " (no crl.pem)" }
        );
    }
    let (core_tx, core_rx) = mpsc::channel(4096);
    let (membership_tx, membership_rx) = mpsc::channel(1024);
    let inbox = Inbox {
        main: core_tx,
        membership: membership_tx,
    };
    // Held watches: this node's own (HTTP) and other nodes' subscriptions,
    // told of every commit of the store.
    let watches = Arc::new(http::watch::Watches::default());
    let observer = watches.clone();
    store.set_observer(Arc::new(move |keys: &[Vec<u8>]| observer.changed(keys)));
    let (moved_tx, moved_rx) = mpsc::unbounded_channel();
    watches.forward_to(moved_tx);
    let http = match config.http_listen {
        Some(addr) => {
            let security = match (&identity, config.http_plain) {
                (Some(identity), false) => {
                    http::HttpSecurity::tls(identity).map_err(NodeError::Tls)?
                }
                _ => http::HttpSecurity::Plain,
            };
            let plain = matches!(security, http::HttpSecurity::Plain);
            if let http::HttpSecurity::Tls(config) = &security {
                live.serve_https(config.clone());
            }
            let api = http::Api {
                core: inbox.clone(),
                tokens: tokens_rx,
                watches: watches.clone(),
                local_reads: local_reads_rx.clone(),
                partitions: store.partitions(),
                ledger: ledger.clone(),
            };
            let (bound, task) = http::start(addr, security, api)
                .await
                .map_err(|source| NodeError::Listen { addr, source })?;
            if plain {
                warn!(%bound, "the HTTP API is PLAIN HTTP WITH NO AUTHENTICATION: anyone who reaches {bound} can read and write every key (--http-plain)");
            } else {
                info!(%bound, "HTTP API at https://{bound}/v1/ (client certificates of the cluster CA)");
            }
            Some(task)
        }
        None => None,
    };
    let ledger_saver = tokio::spawn(devices::save_every(ledger.clone(), store.clone()));
    let limits = Limits::new(config.limits.clone(), metrics.clone());
    let accept = tokio::spawn(accept_loop(
        endpoint.clone(),
        inbox,
        metrics.clone(),
        id,
        identity.is_some(),
        live.clone(),
        limits,
    ));
    let (stored_tx, stored_rx) = mpsc::unbounded_channel();
    let storage =
        storage::Storage::start(store.clone(), stored_tx).map_err(NodeError::StorageThread)?;
    // Call ids must differ from those of this node's previous runs (peers
    // drop a duplicated forwarded call by its id): start from the clock.
    let first_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let core = Core {
        storage,
        coordinator: Coordinator::new(CoordinatorConfig::default(), first_id),
        local_requests: 0,
        local_errors: 0,
        replica,
        id,
        addr: config.advertise,
        started: Instant::now(),
        timers: BTreeMap::new(),
        next_timer: 0,
        peers: Peers {
            endpoint: endpoint.clone(),
            tls: live,
            queues: HashMap::new(),
            metrics: metrics.clone(),
            drop_warned: HashMap::new(),
        },
        data_dir: config.data_dir.clone(),
        metrics,
        last_heard: HashMap::new(),
        requests_at_publish: 0,
        load_published: None,
        rebalancing: rebalance::Rebalancing::new(partitions, &config.rebalance),
        sizes_refreshed: None,
        name: name.clone(),
        twin_warned: None,
        unnamed_up: Default::default(),
        downs_seen: 0,
        tokens: tokens_tx,
        local_reads: local_reads_tx,
        watches,
        subscriptions: HashMap::new(),
        ledger: ledger.clone(),
    };
    let mut seeds = config.seeds.clone();
    for peer in load_peers(&config.data_dir) {
        if !seeds.contains(&peer) && peer != config.advertise {
            seeds.push(peer);
        }
    }
    core.run(
        core_rx,
        membership_rx,
        stored_rx,
        moved_rx,
        &seeds,
        shutdown,
    )
    .await;
    accept.abort();
    if let Some(http) = http {
        http.abort();
    }
    #[cfg(unix)]
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    endpoint.close(0u32.into(), b"shutting down");
    endpoint.wait_idle().await;
    ledger_saver.abort();
    ledger.save(&store);
    // The core, and with it the storage thread, has finished: every commit
    // is done, so the next start may keep this writer id.
    if let Err(e) = store.close() {
        warn!(node = %id, "could not record a clean close of the store ({e}); the next start takes a new writer id");
    }
    info!(node = %id, "node stopped");
    Ok(())
}

struct Core {
    replica: Replica,
    /// Commits the node's writes (see `storage`).
    storage: storage::Storage,
    coordinator: Coordinator<ClientReply>,
    /// Requests served and errors answered by this node itself (admin,
    /// status, listings), beside the coordinator's.
    local_requests: u64,
    local_errors: u64,
    id: NodeId,
    /// The address peers reach this node at.
    addr: SocketAddr,
    started: Instant,
    timers: BTreeMap<(Instant, u64), Timer>,
    next_timer: u64,
    peers: Peers,
    data_dir: PathBuf,
    metrics: Arc<Metrics>,
    /// When a message from each peer last arrived.
    last_heard: HashMap<NodeId, Instant>,
    /// Client requests served when the load figures were last published.
    requests_at_publish: u64,
    /// When the load figures were last gossiped.
    load_published: Option<Instant>,
    rebalancing: rebalance::Rebalancing,
    sizes_refreshed: Option<Instant>,
    /// This node's name (its certificate's).
    name: String,
    /// The twin (see `Membership::twin`) last reported, so it is logged once.
    twin_warned: Option<SocketAddr>,
    /// Peers seen up before their metadata named them.
    unnamed_up: std::collections::HashSet<NodeId>,
    /// Members this node has declared down, ever.
    downs_seen: u64,
    /// The API token registry as the HTTP API enforces it.
    tokens: tokio::sync::watch::Sender<Arc<crate::replication::tokens::TokenRegistry>>,
    /// The partitions whose reads this node coordinates itself
    /// ([`reads_locally`]), for the HTTP API's held watches.
    local_reads: tokio::sync::watch::Sender<Arc<Vec<bool>>>,
    /// Held watches and other nodes' subscriptions (see `remote_watch`).
    watches: Arc<http::watch::Watches>,
    /// This node's subscriptions at other nodes: (key, prefix, node) ->
    /// when made.
    subscriptions: HashMap<(Vec<u8>, bool, NodeId), Instant>,
    /// Devices that synced through this node (`Request::Devices`).
    ledger: Arc<devices::DeviceLedger>,
}

impl Core {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<CoreInput>,
        mut membership: mpsc::Receiver<CoreInput>,
        mut stored: mpsc::UnboundedReceiver<storage::Stored>,
        mut moved: mpsc::UnboundedReceiver<http::watch::RemoteMoved>,
        seeds: &[SocketAddr],
        shutdown: impl Future<Output = ()>,
    ) {
        let outputs = self.replica.start(self.now());
        self.carry_out(outputs);
        self.publish_local_reads();
        for &seed in seeds {
            let outputs = self.replica.join(self.now(), seed);
            self.carry_out(outputs);
        }
        tokio::pin!(shutdown);
        loop {
            let next_timer = self.timers.keys().next().map(|(at, _)| *at);
            let next_deadline = self.coordinator.next_deadline().map(|at| self.started + at);
            let next = match (next_timer, next_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = tokio::time::sleep_until(
                next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                // In this order: a probe answered late makes its node
                // suspect, whatever else is waiting.
                biased;
                () = &mut shutdown => break,
                Some(CoreInput::Peer { from, payload }) = membership.recv() => self.on_peer(from, payload),
                () = sleep => {
                    let now = Instant::now();
                    while let Some(entry) = self.timers.first_entry() {
                        if entry.key().0 > now {
                            break;
                        }
                        let timer = entry.remove();
                        let outputs = self.replica.handle_timer(self.now(), timer);
                        self.carry_out(outputs);
                    }
                    self.expire_calls();
                    self.refresh_metrics();
                }
                done = stored.recv() => match done {
                    Some(done) => self.on_stored(done),
                    None => {
                        tracing::error!(node = %self.name, "the storage thread stopped: this node cannot write any more; stopping");
                        break;
                    }
                },
                Some(first) = moved.recv() => self.on_moved(first, &mut moved),
                input = rx.recv() => match input {
                    Some(CoreInput::Peer { from, payload }) => self.on_peer(from, payload),
                    Some(CoreInput::Client { call, reply }) => self.on_call(call, reply),
                    Some(CoreInput::Subscribe { key, prefix }) => self.subscribe(key, prefix),
                    None => break,
                },
            }
        }
        // A stop is not a decommission (that is the admin `Leave`): the node
        // keeps its place in the layout, peers see it down, and it catches up
        // when it returns. Its data is on disk; in-flight calls fail.
    }

    fn save_peers(&self) {
        let mut peers: Vec<SocketAddr> = self
            .replica
            .membership()
            .members()
            .into_iter()
            .filter(|m| m.id != self.id && m.state != MemberState::Left)
            .map(|m| m.addr)
            .collect();
        peers.sort();
        peers.dedup();
        save_peers(&self.data_dir, &peers);
    }

    fn send_to(&mut self, to: SocketAddr, payload: Payload) {
        let kind = Metrics::kind_index(payload.kind());
        let lane = peers::Lane::of(&payload);
        match frame::encode(&Envelope {
            from: self.id,
            payload,
        }) {
            Ok(frame) => {
                self.metrics.peer_bytes_sent[kind].fetch_add(frame.len() as u64, Relaxed);
                self.peers.send(to, lane, frame)
            }
            Err(e) => warn!("cannot encode a message to {to}: {e}"),
        }
    }

    fn send_to_node(&mut self, node: NodeId, payload: Payload) -> bool {
        match self.replica.membership().addr_of(node) {
            Some(addr) => {
                self.send_to(addr, payload);
                true
            }
            None => false,
        }
    }

    fn carry_out(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, message } => self.send_to(to, Payload::Core(message)),
                Output::Schedule { after, timer } => {
                    self.next_timer += 1;
                    self.timers
                        .insert((Instant::now() + after, self.next_timer), timer);
                }
                Output::Event(event) => {
                    self.on_event(event);
                    self.publish_local_reads();
                }
                Output::Store { token, write } => self.storage.submit(StoreJob {
                    token,
                    writes: vec![write],
                    client: false,
                    replica: true,
                }),
            }
        }
    }

    /// Publishes which partitions this node reads locally, when it changed
    /// (layout changes, migrations, hand-offs: all come with an event).
    fn publish_local_reads(&mut self) {
        let partitions = self.replica.store().partitions();
        let local: Vec<bool> = (0..partitions)
            .map(|p| reads_locally(&self.replica, p))
            .collect();
        self.local_reads.send_if_modified(|held| {
            if **held == local {
                return false;
            }
            *held = Arc::new(local);
            true
        });
    }

    /// Acts on a replica event and logs it in words an operator reads:
    /// membership and layout milestones at info, routine ones at debug.
    fn on_event(&mut self, event: ReplicaEvent) {
        match event {
            ReplicaEvent::TokensChanged { tokens } => {
                let registry = self.replica.tokens().clone();
                save_tokens(&self.data_dir, &registry);
                self.tokens.send_replace(Arc::new(registry));
                info!(node = %self.name, "API tokens changed ({tokens} known, revoked ones included)");
            }
            ReplicaEvent::LayoutChanged { version, completed } => {
                save_layout(&self.data_dir, self.replica.layout());
                if version == completed {
                    info!(node = %self.name, "layout v{version} complete");
                } else {
                    info!(node = %self.name, "layout v{version} in progress (v{completed} complete)");
                }
            }
            ReplicaEvent::Membership(kind) => {
                match kind {
                    MembershipEventKind::Up(peer) => {
                        self.save_peers();
                        self.peer_back_for_watches(peer);
                        // A peer that comes back may be a new process: the old
                        // connection to its address is dead but would take
                        // an idle timeout to notice. Start afresh.
                        if let Some(addr) = self.replica.membership().addr_of(peer) {
                            self.peers.queues.remove(&addr);
                        }
                        let name = self.node_name(peer);
                        if name == peer.to_string() {
                            // Said with its name once its metadata arrives.
                            self.unnamed_up.insert(peer);
                            debug!(node = %self.name, "{peer} is up");
                        } else {
                            info!(node = %self.name, "{name} is up");
                        }
                    }
                    MembershipEventKind::Down(peer) => {
                        self.downs_seen += 1;
                        self.peer_down_for_watches(peer);
                        info!(node = %self.name, "{} is down", self.node_name(peer))
                    }
                    MembershipEventKind::Left(peer) => {
                        info!(node = %self.name, "{} left the cluster", self.node_name(peer))
                    }
                    MembershipEventKind::MetaChanged(peer) => {
                        // Up often comes before the metadata that names the
                        // peer: say the name once it is known.
                        let name = self.node_name(peer);
                        if name != peer.to_string() && self.unnamed_up.remove(&peer) {
                            info!(node = %self.name, id = %peer, "{name} is up");
                        } else {
                            debug!(node = %self.name, "{name} updated its metadata");
                        }
                    }
                    MembershipEventKind::Rejoined => {
                        info!(node = %self.name, "the cluster had declared this node down; rejoined under a new incarnation")
                    }
                }
            }
            ReplicaEvent::SafeToStop => {
                info!(node = %self.name, "decommission complete: this node holds nothing and is safe to stop")
            }
            ReplicaEvent::Purged {
                partition,
                tombstones,
            } => {
                info!(node = %self.name, "purged {tombstones} tombstones from partition {partition}")
            }
            ReplicaEvent::MigrationStarted { partition, source } => {
                debug!(node = %self.name, "migrating partition {partition} from {}", self.node_name(source))
            }
            ReplicaEvent::MigrationDone { partition } => {
                debug!(node = %self.name, "partition {partition} migrated")
            }
            ReplicaEvent::PartitionDropped { partition } => {
                debug!(node = %self.name, "partition {partition} handed off and dropped")
            }
            ReplicaEvent::StoreFailed { partition, reason } => {
                warn!(node = %self.name, "a write to partition {partition} (anti-entropy, migration, purge or hand-off) failed: {reason}")
            }
        }
    }

    fn on_peer(&mut self, from: NodeId, payload: Payload) {
        self.last_heard.insert(from, Instant::now());
        match payload {
            Payload::Core(message) => {
                match self.replica.handle_message(self.now(), from, message) {
                    Ok(outputs) => self.carry_out(outputs),
                    Err(e) => warn!(peer = %from, "refused a peer message: {e}"),
                }
            }
            Payload::Coord(message) => self.on_coord_message(from, message),
            Payload::Watch(message) => self.on_watch_message(from, message),
        }
    }

    /// A node's name as its metadata gives it (its id's hex form if no
    /// name is known), for what operators read.
    fn node_name(&self, node: NodeId) -> String {
        if node == self.id {
            return self.name.clone();
        }
        self.replica
            .membership()
            .member(node)
            .and_then(|m| m.meta.as_ref()?.name.clone())
            .unwrap_or_else(|| node.to_string())
    }

    /// Gossips this node's load with its metadata: request rate and
    /// per-partition work every `rebalance.load_report_interval_ms`,
    /// sizes as last measured (every 30 s).
    fn publish_load(&mut self, sizes: Option<(u64, u64)>) {
        let now = Instant::now();
        let interval = self.rebalancing.interval;
        let due = self
            .load_published
            .is_none_or(|at| now.duration_since(at) >= interval);
        if !due && sizes.is_none() {
            return;
        }
        let mut meta = self.replica.membership().meta().clone();
        if let Some((keys, bytes)) = sizes {
            meta.load.keys = keys;
            meta.load.bytes = bytes;
        }
        if due {
            let requests = self.metrics.client_requests.load(Relaxed);
            let elapsed = self
                .load_published
                .map_or(interval, |at| now.duration_since(at))
                .as_secs_f64()
                .max(0.001);
            meta.load.ops_per_sec =
                (requests.saturating_sub(self.requests_at_publish) as f64 / elapsed) as u64;
            self.requests_at_publish = requests;
            meta.load.partitions = self.load_report();
            self.load_published = Some(now);
        }
        let outputs = self.replica.set_meta(self.now(), meta);
        self.carry_out(outputs);
    }

    fn refresh_metrics(&mut self) {
        let twin = self.replica.membership().twin();
        if twin.is_some() && twin != self.twin_warned {
            if let Some(addr) = twin {
                tracing::error!(node = %self.name, %addr, "another live node claims this node's name and id: two nodes run with the same certificate or name; its messages are refused, stop one of them");
            }
        }
        self.twin_warned = twin;
        // Sizes scan the held partitions: refresh them every 30 s only.
        let sizes = self
            .sizes_refreshed
            .is_none_or(|at| at.elapsed() >= SIZES_INTERVAL);
        if sizes {
            self.sizes_refreshed = Some(Instant::now());
        }
        let status = self.status(sizes);
        let stats = self.replica.stats().clone();
        let Ok(mut core) = self.metrics.core.lock() else {
            return;
        };
        core.insert("members_alive", status.members_alive as u64);
        if sizes {
            core.insert("entries_held", status.entries_held);
            core.insert("bytes_held", status.bytes_held);
        }
        core.insert("members_known", status.members_total as u64);
        core.insert("members_declared_down_total", self.downs_seen);
        core.insert("layout_version", status.layout_version);
        core.insert("layout_completed_version", status.layout_completed);
        core.insert("partitions_held", status.partitions_held as u64);
        core.insert("migrations_in_flight", status.migrations_in_flight as u64);
        core.insert("anti_entropy_rounds_total", stats.rounds_started);
        core.insert("anti_entropy_rounds_in_sync_total", stats.rounds_in_sync);
        core.insert(
            "repair_entries_received_total",
            stats.repair_entries_received,
        );
        core.insert(
            "migration_entries_received_total",
            stats.migration_entries_received,
        );
        core.insert("migrations_done_total", stats.migrations_done);
        core.insert("migration_bytes_sent_total", stats.migration_bytes_sent);
        core.insert("partitions_dropped_total", stats.partitions_dropped);
        core.insert("tombstones_purged_total", stats.tombstones_purged);
        core.insert("streams_broken_total", stats.streams_broken);
        let storage = &self.storage.stats;
        core.insert("storage_commits_total", storage.commits.load(Relaxed));
        core.insert("storage_writes_total", storage.writes.load(Relaxed));
        core.insert(
            "storage_failed_commits_total",
            storage.failed_commits.load(Relaxed),
        );
        core.insert("storage_queued_writes", storage.queued.load(Relaxed));
        drop(core);
        // Loads describe a layout once its transition is over: time the
        // settling from the completed version.
        let completed = self.replica.layout().completed().version();
        self.rebalancing.layout_age(completed);
        self.publish_load(sizes.then_some((status.entries_held, status.bytes_held)));
        self.auto_rebalance();
    }
}
