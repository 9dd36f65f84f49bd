//! The gossipkv node: a tokio runtime that owns the store, drives the
//! replication core over QUIC, and serves clients.
//!
//! One task (the core loop) owns the [`Replica`]: it takes peer messages and
//! client requests from a channel, fires due timers, and hands the core's
//! outputs to the transport. Connection tasks only read frames and forward
//! them. Each peer gets one outgoing connection with one ordered stream, fed
//! by a bounded queue: when a peer is slow or away its queue fills and
//! further messages to it are dropped, which the core tolerates (it retries
//! rounds and migrations).
//!
//! Client requests: any node takes any request; a replica of the key
//! coordinates it (see "request coordination" below), with per-request
//! write and read quorums (default 1 and 1). A write for a replica that is
//! down reaches it later through anti-entropy from the replicas that took
//! it, or, if no replica was reachable, through the hand-off of the node
//! that took it (hinted hand-off).

pub mod config;
mod coordinate;
pub mod limits;
pub mod metrics;
mod reload;
mod storage;

use crate::client::{
    Call, ErrorCode, Failure, LayoutInfo, MemberInfo, MigrationsInfo, NodeStatus, PartitionInfo,
    ReplicaView, Request, Response, WireRecord,
};
use crate::crdt::NodeId;
use crate::replication::layout::NodeSpec;
use crate::replication::layout_state::LayoutState;
use crate::replication::membership::{LoadFigures, MemberState, MembershipConfig, NodeMeta};
use crate::replication::message::Message;
use crate::replication::replica::{
    MembershipEventKind, Output, Replica, ReplicaConfig, ReplicaEvent, Timer,
};
use crate::store::{Store, StoreOptions};
use crate::transport::tls::{client_config, TlsIdentity, REFUSED};
use crate::transport::{frame, ALPN_ADMIN, ALPN_CLIENT, ALPN_PEER};
use config::{NodeConfig, Security};
use coordinate::Pending;
use limits::{ConnResponses, Identity, Limits, Refusal};
use metrics::Metrics;
use reload::LiveTls;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

const LAYOUT_FILE: &str = "layout.bin";
const INCARNATION_FILE: &str = "incarnation";
const STORE_FILE: &str = "store.redb";
const RESET_KEY_FILE: &str = "reset-key";
const PEERS_FILE: &str = "peers";
/// Frames queued per peer before further ones are dropped.
const PEER_QUEUE: usize = 256;

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

/// What a peer stream carries: the sender's id and one payload.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    from: NodeId,
    payload: Payload,
}

/// Peer payloads: the replication core's messages, and the request
/// coordination between nodes (see `coordinate`).
#[derive(Debug, Serialize, Deserialize)]
enum Payload {
    Core(Message),
    /// Coordinate this client call (the sender holds no replica of its key).
    Coordinate {
        id: u64,
        call: Call,
    },
    Coordinated {
        id: u64,
        response: Response,
    },
    /// Merge these entries (the coordinators' state of each key after a
    /// write, or read repairs), in one transaction; acknowledge those that
    /// ask, in one `Replicated`, once they are durable.
    Replicate {
        items: Vec<ReplicateItem>,
    },
    /// The writes of a `Replicate` that asked, and whether each was taken.
    Replicated {
        acks: Vec<(u64, bool)>,
    },
    /// Send your entry of this key (a read at R > 1).
    Fetch {
        id: u64,
        key: Vec<u8>,
    },
    Fetched {
        id: u64,
        entry: Option<Vec<u8>>,
    },
}

/// One entry of a `Replicate`.
#[derive(Debug, Serialize, Deserialize)]
struct ReplicateItem {
    /// The write's call id at the coordinator (0 for a read repair).
    id: u64,
    partition: u16,
    key: Vec<u8>,
    entry: Vec<u8>,
    ack: bool,
}

/// Decodes the frames of one peer stream held in memory, as `serve_peer`
/// does; for fuzzing. The count of frames read, or why the stream ends.
#[doc(hidden)]
pub fn decode_peer_frame(mut bytes: &[u8]) -> Result<usize, frame::FrameError> {
    let mut frames = 0;
    while let Some((Envelope { payload, .. }, _)) = frame::read_from_slice(&mut bytes)? {
        let _ = Metrics::kind_index(payload.kind());
        frames += 1;
    }
    Ok(frames)
}

/// A peer frame asking the receiver to merge `entry` as key `key` of
/// `partition`, claiming to come from `from`: what a coordinator sends its
/// co-replicas after a write. For attack tests (a forged sender).
#[doc(hidden)]
pub fn replicate_frame(
    from: NodeId,
    partition: u16,
    key: &[u8],
    entry: Vec<u8>,
) -> Result<Vec<u8>, frame::FrameError> {
    frame::encode(&Envelope {
        from,
        payload: Payload::Replicate {
            items: vec![ReplicateItem {
                id: 1,
                partition,
                key: key.to_vec(),
                entry,
                ack: false,
            }],
        },
    })
}

impl Payload {
    fn kind(&self) -> &'static str {
        match self {
            Payload::Core(message) => message.kind(),
            _ => "coordination",
        }
    }
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
}

/// Where an answer goes: a client waiting on this node, or the node that
/// forwarded the call here.
enum ReplyTo {
    Client(oneshot::Sender<Response>),
    Peer { node: NodeId, id: u64 },
}

/// How often the sizes held are counted (it scans the held partitions) and
/// the load figures gossiped.
const SIZES_INTERVAL: Duration = Duration::from_secs(30);

/// How long a call may wait for other replicas.
const QUORUM_TIMEOUT: Duration = Duration::from_secs(5);

fn file_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::File {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A restart must use a higher incarnation than the last run, or peers
/// that saw this node go down would not take it back.
fn next_incarnation(dir: &Path) -> Result<u32, NodeError> {
    let path = dir.join(INCARNATION_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u32>().map_err(|e| NodeError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(file_err("read", &path)(e)),
    };
    let next = last.saturating_add(1);
    std::fs::write(&path, next.to_string()).map_err(file_err("write", &path))?;
    Ok(next)
}

/// The secret QUIC stateless resets are derived from, kept across restarts.
/// With it a restarted node answers packets of its previous process's
/// connections with a stateless reset, so peers drop those dead connections
/// at once and dial afresh, instead of sending into them until the idle
/// timeout (about 30 s) while the node looks isolated.
fn reset_key(dir: &Path) -> Result<ring::hmac::Key, NodeError> {
    let path = dir.join(RESET_KEY_FILE);
    let secret = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => bytes,
        Ok(bytes) => {
            return Err(NodeError::Damaged {
                path,
                reason: format!("{} bytes, expected 32", bytes.len()),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; 32] = rand::random();
            let tmp = dir.join("reset-key.tmp");
            std::fs::write(&tmp, secret).map_err(file_err("write", &tmp))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                    .map_err(file_err("protect", &tmp))?;
            }
            std::fs::rename(&tmp, &path).map_err(file_err("write", &path))?;
            secret.to_vec()
        }
        Err(e) => return Err(file_err("read", &path)(e)),
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret))
}

/// Addresses of the peers this node last knew, one per line. A restarted
/// node joins through them as well as through its seeds: the node that
/// started the cluster has no seeds, and without them it would wait,
/// cut off with stale data, until a peer happened to probe it.
fn load_peers(dir: &Path) -> Vec<SocketAddr> {
    let path = dir.join(PEERS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .filter_map(|line| match line.trim().parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    warn!("ignoring {line:?} in {}: not an address", path.display());
                    None
                }
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warn!("cannot read {}: {e}", path.display());
            Vec::new()
        }
    }
}

fn save_peers(dir: &Path, peers: &[SocketAddr]) {
    let path = dir.join(PEERS_FILE);
    let tmp = dir.join("peers.tmp");
    let text: String = peers.iter().map(|a| format!("{a}\n")).collect();
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
        warn!("cannot save peers to {}: {e}", path.display());
    }
}

fn load_layout(dir: &Path, partitions: u16) -> Result<Option<LayoutState>, NodeError> {
    let path = dir.join(LAYOUT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err("read", &path)(e)),
    };
    let state: LayoutState = postcard::from_bytes(&bytes).map_err(|e| NodeError::Damaged {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    state.validate(partitions).map_err(|e| NodeError::Damaged {
        path,
        reason: e.to_string(),
    })?;
    Ok(Some(state))
}

fn save_layout(dir: &Path, state: &LayoutState) {
    let path = dir.join(LAYOUT_FILE);
    let tmp = dir.join("layout.bin.tmp");
    let Ok(bytes) = postcard::to_allocvec(state) else {
        return;
    };
    // Write then rename, so a crash leaves the old layout or the new one.
    if let Err(e) = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)) {
        warn!("cannot save layout to {}: {e}", path.display());
    }
}

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
        ..StoreOptions::default()
    };
    let store_path = config.data_dir.join(STORE_FILE);
    if let Ok(meta) = std::fs::metadata(&store_path) {
        // Every page checksum is verified at open: about 0.6 ms per MB.
        info!(path = %store_path.display(), bytes = meta.len(), "verifying the store file");
    }
    let store = Arc::new(Store::open(&store_path, options)?);
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
    let meta = NodeMeta {
        capacity: config.capacity,
        zone: config.zone.clone(),
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
        ..ReplicaConfig::default()
    };
    let seed = u64::from(incarnation) ^ id.0 ^ u64::from(std::process::id());
    let replica = Replica::new(
        store.clone(),
        config.advertise,
        incarnation,
        meta,
        layout,
        replica_config,
        seed,
    );

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
    let limits = Limits::new(config.limits.clone(), metrics.clone());
    let accept = tokio::spawn(accept_loop(
        endpoint.clone(),
        core_tx.clone(),
        metrics.clone(),
        id,
        identity.is_some(),
        live.clone(),
        limits,
    ));
    let (stored_tx, stored_rx) = mpsc::unbounded_channel();
    let storage =
        storage::Storage::start(store.clone(), stored_tx).map_err(NodeError::StorageThread)?;
    let core = Core {
        storage,
        writing: HashMap::new(),
        outbox: HashMap::new(),
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
        },
        data_dir: config.data_dir.clone(),
        metrics,
        pending: HashMap::new(),
        last_heard: HashMap::new(),
        requests_at_publish: 0,
        sizes_refreshed: None,
        deadlines: Default::default(),
        next_call: 0,
        name: name.clone(),
        twin_warned: None,
        named: Default::default(),
        downs_seen: 0,
    };
    let mut seeds = config.seeds.clone();
    for peer in load_peers(&config.data_dir) {
        if !seeds.contains(&peer) && peer != config.advertise {
            seeds.push(peer);
        }
    }
    core.run(core_rx, stored_rx, &seeds, shutdown).await;
    accept.abort();
    #[cfg(unix)]
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    endpoint.close(0u32.into(), b"shutting down");
    endpoint.wait_idle().await;
    info!(node = %id, "node stopped");
    Ok(())
}

struct Peers {
    endpoint: quinn::Endpoint,
    /// The peer client configuration (replaced by a TLS reload), and where
    /// refusals are logged and connections tracked.
    tls: Arc<LiveTls>,
    queues: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
}

impl Peers {
    fn send(&mut self, to: SocketAddr, frame: Vec<u8>) {
        let Some(queue) = self.queues.get(&to) else {
            self.spawn_writer(to, frame);
            return;
        };
        match queue.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                debug!(peer = %to, "peer queue full: message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(frame)) => {
                self.queues.remove(&to);
                self.spawn_writer(to, frame);
            }
        }
    }

    fn spawn_writer(&mut self, to: SocketAddr, first: Vec<u8>) {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PEER_QUEUE);
        let _ = tx.try_send(first);
        self.queues.insert(to, tx);
        let endpoint = self.endpoint.clone();
        let tls = self.tls.clone();
        tokio::spawn(async move {
            let connecting =
                match endpoint.connect_with(tls.peer_config(), to, crate::certs::SERVER_NAME) {
                    Ok(connecting) => connecting,
                    Err(e) => return debug!(peer = %to, "cannot dial the peer: {e}"),
                };
            let connection = match connecting.await {
                Ok(connection) => connection,
                // Our side refused the peer's certificate, or a timeout.
                Err(e) => return tls.peer_failed(to, &e),
            };
            let _tracked = tls.track(&connection);
            let result: Result<(), String> = async {
                let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
                while let Some(frame) = rx.recv().await {
                    stream.write_all(&frame).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            .await;
            // The peer refuses our certificate after our side of the
            // handshake completed: that shows as the connection's close.
            match (connection.close_reason(), result) {
                (Some(reason), _) => tls.peer_failed(to, &reason),
                (None, Err(e)) => debug!(peer = %to, "peer stream ended: {e}"),
                (None, Ok(())) => {}
            }
        });
    }
}

struct Core {
    replica: Replica,
    /// Commits the node's writes (see `storage`).
    storage: storage::Storage,
    /// Jobs on the storage thread, by token.
    writing: HashMap<u64, coordinate::Writing>,
    /// Entries to send each co-replica at the end of this turn.
    outbox: HashMap<NodeId, Vec<ReplicateItem>>,
    id: NodeId,
    /// The address peers reach this node at.
    addr: SocketAddr,
    started: Instant,
    timers: BTreeMap<(Instant, u64), Timer>,
    next_timer: u64,
    peers: Peers,
    data_dir: PathBuf,
    metrics: Arc<Metrics>,
    pending: HashMap<u64, Pending>,
    /// When a message from each peer last arrived.
    last_heard: HashMap<NodeId, Instant>,
    /// Client requests served when the load figures were last published.
    requests_at_publish: u64,
    sizes_refreshed: Option<Instant>,
    deadlines: std::collections::BTreeSet<(Instant, u64)>,
    next_call: u64,
    /// This node's name (its certificate's).
    name: String,
    /// The twin (see `Membership::twin`) last reported, so it is logged once.
    twin_warned: Option<SocketAddr>,
    /// Peers whose name has been logged.
    named: std::collections::HashSet<NodeId>,
    /// Members this node has declared down, ever.
    downs_seen: u64,
}

impl Core {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<CoreInput>,
        mut stored: mpsc::UnboundedReceiver<Vec<storage::Done>>,
        seeds: &[SocketAddr],
        shutdown: impl Future<Output = ()>,
    ) {
        let outputs = self.replica.start(self.now());
        self.carry_out(outputs);
        for &seed in seeds {
            let outputs = self.replica.join(self.now(), seed);
            self.carry_out(outputs);
        }
        tokio::pin!(shutdown);
        loop {
            let next_timer = self.timers.keys().next().map(|(at, _)| *at);
            let next_deadline = self.deadlines.iter().next().map(|(at, _)| *at);
            let next = match (next_timer, next_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = tokio::time::sleep_until(
                next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                () = &mut shutdown => break,
                done = stored.recv() => match done {
                    Some(done) => self.on_stored(done),
                    None => {
                        tracing::error!(node = %self.name, "the storage thread stopped: this node cannot write any more; stopping");
                        break;
                    }
                },
                input = rx.recv() => match input {
                    Some(CoreInput::Peer { from, payload }) => self.on_peer(from, payload),
                    Some(CoreInput::Client { call, reply }) => self.on_call(call, ReplyTo::Client(reply)),
                    None => break,
                },
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
                    self.expire_pending(now);
                    self.refresh_metrics();
                }
            }
            self.flush_outbox();
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
        match frame::encode(&Envelope {
            from: self.id,
            payload,
        }) {
            Ok(frame) => {
                self.metrics.peer_bytes_sent[kind].fetch_add(frame.len() as u64, Relaxed);
                self.peers.send(to, frame)
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
                Output::Event(event) => self.on_event(event),
            }
        }
    }

    /// Acts on a replica event and logs it in words an operator reads:
    /// membership and layout milestones at info, routine ones at debug.
    fn on_event(&mut self, event: ReplicaEvent) {
        match event {
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
                        // A peer that comes back may be a new process: the old
                        // connection to its address is dead but would take
                        // an idle timeout to notice. Start afresh.
                        if let Some(addr) = self.replica.membership().addr_of(peer) {
                            self.peers.queues.remove(&addr);
                        }
                        info!(node = %self.name, "{} is up", self.node_name(peer));
                    }
                    MembershipEventKind::Down(peer) => {
                        self.downs_seen += 1;
                        info!(node = %self.name, "{} is down", self.node_name(peer))
                    }
                    MembershipEventKind::Left(peer) => {
                        info!(node = %self.name, "{} left the cluster", self.node_name(peer))
                    }
                    MembershipEventKind::MetaChanged(peer) => {
                        // Up often comes before the metadata that names the
                        // peer: say the name once it is known.
                        let name = self.node_name(peer);
                        if name != peer.to_string() && self.named.insert(peer) {
                            info!(node = %self.name, "{peer} is {name}");
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
            // Peers forward the calls of clients that reached them; admin
            // requests are never forwarded, so a peer sending one is not
            // relaying a client: refuse it.
            Payload::Coordinate { id, call } if call.request.is_admin() => {
                warn!(peer = %from, "refused an admin request sent by a peer");
                let response = Response::Error(Failure::new(
                    ErrorCode::Forbidden,
                    "admin requests are not taken from peers",
                ));
                self.answer(ReplyTo::Peer { node: from, id }, response);
            }
            Payload::Coordinate { id, call } => {
                self.on_call(call, ReplyTo::Peer { node: from, id })
            }
            Payload::Coordinated { id, response } => {
                if let Some(Pending::Forwarded { reply }) = self.pending.remove(&id) {
                    self.answer(reply, response);
                }
            }
            Payload::Replicate { items } => self.on_replicate(from, items),
            Payload::Replicated { acks } => self.on_replicated(acks),
            Payload::Fetch { id, key } => {
                let entry = self.replica.store().entry_bytes(&key).ok().flatten();
                self.send_to_node(from, Payload::Fetched { id, entry });
            }
            Payload::Fetched { id, entry } => self.on_fetched(from, id, entry),
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

    fn admin(&mut self, request: Request, reply: ReplyTo) {
        let layout = self.replica.layout().clone();
        let store = self.replica.store().clone();
        let response = match request {
            Request::ClusterMembers => {
                let mut members = vec![MemberInfo {
                    id: self.id.to_string(),
                    name: self.name.clone(),
                    addr: self.addr.to_string(),
                    state: "self".into(),
                    zone: self.replica.membership().meta().zone.clone(),
                    capacity: Some(self.replica.membership().meta().capacity),
                    partitions_held: layout.current().partitions_of(self.id).len(),
                    load: Some(self.replica.membership().meta().load.clone()),
                    last_heard_ms: Some(0),
                }];
                for m in self.replica.membership().members() {
                    members.push(MemberInfo {
                        id: m.id.to_string(),
                        name: self.node_name(m.id),
                        addr: m.addr.to_string(),
                        state: format!("{:?}", m.state).to_lowercase(),
                        zone: m.meta.as_ref().and_then(|meta| meta.zone.clone()),
                        capacity: m.meta.as_ref().map(|meta| meta.capacity),
                        partitions_held: layout.current().partitions_of(m.id).len(),
                        load: m.meta.as_ref().map(|meta| meta.load.clone()),
                        last_heard_ms: self
                            .last_heard
                            .get(&m.id)
                            .map(|at| at.elapsed().as_millis() as u64),
                    });
                }
                Response::ClusterMembers(members)
            }
            Request::Layout => {
                let current = layout.current();
                let replicas = (0..current.partitions())
                    .map(|p| {
                        current
                            .replicas(p)
                            .iter()
                            .map(|&n| self.node_name(n))
                            .collect()
                    })
                    .collect();
                let pending = current
                    .nodes()
                    .into_iter()
                    .flat_map(|n| {
                        layout
                            .pending_migrations(n)
                            .into_iter()
                            .map(move |p| (p, n))
                    })
                    .map(|(p, n)| (p, self.node_name(n)))
                    .collect();
                Response::Layout(LayoutInfo {
                    version: current.version(),
                    completed: layout.completed().version(),
                    replicas,
                    pending,
                })
            }
            Request::Partitions => match store.partition_versions() {
                Ok(versions) => {
                    let mut rows = Vec::new();
                    for (p, vv) in versions.iter().enumerate() {
                        let p = p as u16;
                        if !layout.holds(self.id, p) && vv.is_empty() {
                            continue;
                        }
                        let stats = store.partition_stats(p).unwrap_or_default();
                        let version = vv
                            .nodes()
                            .map(|n| (self.node_name(n), vv.base(n), vv.extra(n).collect()))
                            .collect();
                        rows.push(PartitionInfo {
                            partition: p,
                            entries: stats.entries,
                            bytes: stats.bytes,
                            digest: crate::replication::replica::vector_hash(vv),
                            version,
                        });
                    }
                    Response::Partitions(rows)
                }
                Err(e) => Response::Error(Failure::new(ErrorCode::of(&e), e.to_string())),
            },
            Request::Inspect { key } => {
                let partition = store.partition_of(&key);
                let holders = layout.holders(partition);
                let mine = if holders.contains(&self.id) {
                    Some(store.entry_bytes(&key).ok().flatten())
                } else {
                    None
                };
                let id = self.fresh_call_id();
                let mut waiting = Vec::new();
                let me = self.id;
                for node in holders.into_iter().filter(|&n| n != me) {
                    if self.send_to_node(
                        node,
                        Payload::Fetch {
                            id,
                            key: key.clone(),
                        },
                    ) {
                        waiting.push(node);
                    }
                }
                let answers: Vec<(NodeId, Option<Vec<u8>>)> =
                    mine.map(|m| (self.id, m)).into_iter().collect();
                if waiting.is_empty() {
                    return self.finish_inspect(reply, &key, answers, Vec::new());
                }
                self.wait(
                    id,
                    Pending::Inspect {
                        reply,
                        key,
                        answers,
                        waiting,
                    },
                );
                return;
            }
            Request::Migrations => {
                let progress = self.replica.migration_progress();
                Response::Migrations(MigrationsInfo {
                    layout_version: progress.layout_version,
                    in_flight: self
                        .replica
                        .migration_sources()
                        .into_iter()
                        .map(|(p, n)| (p, self.node_name(n)))
                        .collect(),
                    total: progress.total,
                    done: progress.done,
                    entries: progress.entries,
                    bytes: progress.bytes,
                    elapsed_ms: progress.elapsed.as_millis() as u64,
                })
            }
            Request::Join { seed } => {
                let outputs = self.replica.join(self.now(), seed);
                self.carry_out(outputs);
                Response::Done
            }
            Request::Leave => {
                let outputs = self.replica.leave(self.now());
                self.carry_out(outputs);
                Response::Done
            }
            other => Response::Error(Failure::new(
                ErrorCode::BadRequest,
                format!("{other:?} is not an admin request"),
            )),
        };
        self.answer(reply, response);
    }

    fn finish_inspect(
        &mut self,
        reply: ReplyTo,
        key: &[u8],
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
        silent: Vec<NodeId>,
    ) {
        let mut views: Vec<ReplicaView> = answers
            .into_iter()
            .map(|(node, entry)| {
                let record = entry
                    .and_then(|bytes| crate::store::decode_record(key, &bytes).ok().flatten())
                    .map(|r| WireRecord {
                        value: r.value,
                        context: r.context.to_bytes(),
                        other_kinds: r.other_kinds,
                    });
                ReplicaView {
                    node: self.node_name(node),
                    answered: true,
                    record,
                }
            })
            .collect();
        views.extend(silent.into_iter().map(|n| ReplicaView {
            node: self.node_name(n),
            answered: false,
            record: None,
        }));
        views.sort_by(|a, b| a.node.cmp(&b.node));
        self.answer(reply, Response::Inspect(views));
    }

    /// Gossips this node's load with its metadata (every 30 s, with sizes).
    fn publish_load(&mut self, keys: u64, bytes: u64) {
        let requests = self.metrics.client_requests.load(Relaxed);
        let elapsed = SIZES_INTERVAL.as_secs().max(1);
        let ops_per_sec = requests.saturating_sub(self.requests_at_publish) / elapsed;
        self.requests_at_publish = requests;
        let mut meta = self.replica.membership().meta().clone();
        meta.load = LoadFigures {
            keys,
            bytes,
            ops_per_sec,
        };
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
        if sizes {
            self.publish_load(status.entries_held, status.bytes_held);
        }
    }

    /// The node's status; `sizes` also counts the entries and bytes held,
    /// which scans the held partitions (for status requests, not metrics).
    fn status(&self, sizes: bool) -> NodeStatus {
        let layout = self.replica.layout();
        let members = self.replica.membership().members();
        let (mut entries_held, mut bytes_held) = (0, 0);
        for p in 0..layout.current().partitions() {
            if sizes && layout.holds(self.id, p) {
                if let Ok(stats) = self.replica.store().partition_stats(p) {
                    entries_held += stats.entries;
                    bytes_held += stats.bytes;
                }
            }
        }
        NodeStatus {
            node_id: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            members_alive: self.replica.membership().alive().len() + 1,
            members_total: members.len() + 1,
            layout_version: layout.current().version(),
            layout_completed: layout.completed().version(),
            partitions_held: (0..layout.current().partitions())
                .filter(|&p| layout.holds(self.id, p))
                .count(),
            migrations_in_flight: self.replica.migrating().len(),
            anti_entropy_rounds: self.replica.stats().rounds_started,
            repaired_entries: self.replica.stats().repair_entries_received,
            decommissioned: self.replica.has_left(),
            entries_held,
            bytes_held,
            cert_expires: self.peers.tls.not_after().map(crate::certs::rfc3339),
            cert_expires_in_days: self.peers.tls.not_after().map(crate::certs::days_left),
        }
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    core: mpsc::Sender<CoreInput>,
    metrics: Arc<Metrics>,
    me: NodeId,
    secure: bool,
    tls: Arc<LiveTls>,
    limits: Arc<Limits>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        // Counted from before the handshake, so handshakes in progress
        // count too.
        let mut slot = match limits.open() {
            Ok(slot) => slot,
            Err(refusal) => {
                if let Refusal::First(reason) = refusal {
                    warn!(%remote, "refusing connections: {reason}");
                }
                incoming.refuse();
                continue;
            }
        };
        let core = core.clone();
        let metrics = metrics.clone();
        let tls = tls.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => {
                    warn!(%remote, "refused a connection: {e}");
                    return;
                }
            };
            let identity = Identity::of(&connection);
            if let Err(refusal) = limits.identify(&mut slot, identity) {
                let reason = match refusal {
                    Refusal::First(reason) => {
                        warn!(%remote, %identity, "refusing connections: {reason}");
                        reason
                    }
                    Refusal::Again(reason) => reason,
                };
                connection.close(REFUSED, reason.as_bytes());
                return;
            }
            let alpn = connection
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol);
            let alpn = match alpn.as_deref() {
                Some(ALPN_PEER) => Alpn::Peer,
                Some(ALPN_CLIENT) => Alpn::Client,
                Some(ALPN_ADMIN) => Alpn::Admin,
                _ => return connection.close(1u32.into(), b"unknown protocol"),
            };
            let role = match admit(&connection, alpn, me, secure) {
                Ok(role) => role,
                Err(reason) => {
                    warn!(%remote, "refused a connection: {reason}");
                    connection.close(REFUSED, reason.as_bytes());
                    return;
                }
            };
            // Tracked while served, so that revoking its certificate closes it.
            let _tracked = tls.track(&connection);
            match (alpn, role) {
                (Alpn::Peer, Admitted::Node(sender)) => {
                    serve_peer(connection, core, metrics, sender, &limits).await
                }
                (Alpn::Peer, _) => serve_peer(connection, core, metrics, None, &limits).await,
                (Alpn::Client, _) => serve_client(connection, core, metrics, None, &limits).await,
                (Alpn::Admin, role) => {
                    serve_client(connection, core, metrics, Some(role), &limits).await
                }
            }
            drop(slot);
        });
    }
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum Alpn {
    Peer,
    Client,
    Admin,
}

/// What the verified certificate of an admitted connection allows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Admitted {
    /// A node: every peer message on the connection is from this id
    /// (`None` in the insecure mode, where nothing is verified).
    Node(Option<NodeId>),
    /// Reads, writes and read-only inspection.
    Client,
    /// Also join and leave.
    Admin,
}

/// Decides by the verified certificate whether a connection on `alpn` is
/// allowed: the peer protocol takes node certificates only (and never one
/// naming this node), the client protocol client and admin certificates,
/// the admin protocol client certificates (read-only) and admin ones.
/// Without TLS (`secure` false) everything is allowed, as documented for
/// the insecure mode.
fn admit(
    connection: &quinn::Connection,
    alpn: Alpn,
    me: NodeId,
    secure: bool,
) -> Result<Admitted, String> {
    use crate::certs::Role;
    if !secure {
        return Ok(match alpn {
            Alpn::Peer => Admitted::Node(None),
            _ => Admitted::Admin,
        });
    }
    let identity = match crate::transport::tls::peer_identity(connection) {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => return Err(format!("unusable certificate: {e}")),
        None => return Err("no certificate".into()),
    };
    match (alpn, identity.role) {
        (Alpn::Peer, Role::Node) => {
            let id = NodeId::from_name(&identity.name);
            if id == me {
                return Err(format!(
                    "another node presents this node's own name {:?}: two nodes run with the same certificate or name",
                    identity.name
                ));
            }
            Ok(Admitted::Node(Some(id)))
        }
        (Alpn::Peer, _) => Err(format!(
            "the peer protocol takes node certificates only; this is the {identity}"
        )),
        (_, Role::Node) => Err(format!(
            "a node certificate ({:?}) cannot be used by a client or kvctl: use a client or admin certificate",
            identity.name
        )),
        (_, Role::Admin) => Ok(Admitted::Admin),
        (_, Role::Client) => Ok(Admitted::Client),
    }
}

/// Logs a connection's first dropped frame or refused request at warn and
/// the rest at debug: once per offender, not once per frame.
#[derive(Default)]
struct WarnOnce(std::sync::atomic::AtomicBool);

impl WarnOnce {
    fn first(&self) -> bool {
        !self.0.swap(true, Relaxed)
    }
}

fn dropped(metrics: &Metrics, e: &frame::FrameError) {
    if matches!(
        e,
        frame::FrameError::Stalled(_)
            | frame::FrameError::OverLimit { .. }
            | frame::FrameError::TooLarge(_)
    ) {
        metrics.frames_dropped.fetch_add(1, Relaxed);
    }
}

async fn serve_peer(
    connection: quinn::Connection,
    core: mpsc::Sender<CoreInput>,
    metrics: Arc<Metrics>,
    sender: Option<NodeId>,
    limits: &Limits,
) {
    // Peers open unidirectional streams only.
    connection.set_max_concurrent_bi_streams(0u32.into());
    let remote = connection.remote_address();
    let read_limits = frame::ReadLimits {
        max_len: crate::transport::MAX_FRAME_BYTES,
        timeout: Some(limits.config.frame_read_timeout()),
        budget: Some(limits.inbound.clone()),
    };
    let warned = Arc::new(WarnOnce::default());
    while let Ok(mut stream) = connection.accept_uni().await {
        let core = core.clone();
        let metrics = metrics.clone();
        let connection = connection.clone();
        let read_limits = read_limits.clone();
        let warned = warned.clone();
        tokio::spawn(async move {
            loop {
                match frame::read_limited::<Envelope, _>(&mut stream, &read_limits).await {
                    Ok(Some((Envelope { from, payload }, size))) => {
                        if let Some(certified) = sender.filter(|&c| c != from) {
                            // The sender of a peer message is the node its
                            // certificate names; a claim to be another is
                            // an impersonation attempt (or a bug): close.
                            warn!(%remote, certified = %certified, claimed = %from, "closed a peer connection: a message claims another sender than its certificate names");
                            connection
                                .close(REFUSED, b"message sender does not match the certificate");
                            return;
                        }
                        let kind = Metrics::kind_index(payload.kind());
                        metrics.peer_bytes_received[kind].fetch_add(size as u64, Relaxed);
                        if core.send(CoreInput::Peer { from, payload }).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        dropped(&metrics, &e);
                        if matches!(e, frame::FrameError::Io(_)) {
                            // The connection went away (restart, idle
                            // timeout, network): not the peer's fault.
                            debug!(%remote, "closed a peer stream: {e}");
                        } else if warned.first() {
                            warn!(%remote, "closed a peer stream: {e} (further ones from this connection logged at debug)");
                        } else {
                            debug!(%remote, "closed a peer stream: {e}");
                        }
                        let _ = stream.stop(2u32.into());
                        return;
                    }
                }
            }
        });
    }
}

/// Serves client requests on one connection, or, with `admin` (the admin
/// protocol), inspection and, for an admin certificate, cluster changes.
///
/// Each stream waits for response budget before reading its request (see
/// `limits`), and holds its response's bytes until the client has them.
async fn serve_client(
    connection: quinn::Connection,
    core: mpsc::Sender<CoreInput>,
    metrics: Arc<Metrics>,
    admin: Option<Admitted>,
    limits: &Limits,
) {
    // Clients open bidirectional streams only.
    connection.set_max_concurrent_uni_streams(0u32.into());
    let remote = connection.remote_address();
    let read_limits = frame::ReadLimits {
        max_len: limits::CLIENT_FRAME_BYTES,
        timeout: Some(limits.config.frame_read_timeout()),
        budget: Some(limits.inbound.clone()),
    };
    let responses: Arc<ConnResponses> = limits.responses();
    let warned = Arc::new(WarnOnce::default());
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        let core = core.clone();
        let metrics = metrics.clone();
        let admin = admin.clone();
        let read_limits = read_limits.clone();
        let responses = responses.clone();
        let warned = warned.clone();
        tokio::spawn(async move {
            // Before reading the request: a connection whose answers are not
            // read stops being read, and flow control stops its sender.
            let mut ticket = responses.admit().await;
            let started = Instant::now();
            let response = match frame::read_limited::<Call, _>(&mut recv, &read_limits).await {
                Ok(Some((call, _))) if call.request.is_admin() && admin.is_none() => Response::Error(Failure::new(
                    ErrorCode::Forbidden,
                    "admin requests are served on the admin protocol (kvctl), not the client one",
                )),
                Ok(Some((call, _)))
                    if call.request.changes_cluster() && admin != Some(Admitted::Admin) =>
                {
                    Response::Error(Failure::new(
                        ErrorCode::Forbidden,
                        "changing the cluster (join, leave) needs an admin certificate (`gossipkv certs issue --role admin`); this connection's certificate is a client one",
                    ))
                }
                Ok(Some((call, _))) => {
                    let (reply, answer) = oneshot::channel();
                    if core.send(CoreInput::Client { call, reply }).await.is_err() {
                        return;
                    }
                    answer
                        .await
                        .unwrap_or_else(|_| {
                            Response::Error(Failure::new(
                                ErrorCode::Internal,
                                "the node is shutting down",
                            ))
                        })
                }
                Ok(None) => return,
                Err(e) => {
                    dropped(&metrics, &e);
                    if warned.first() {
                        warn!(%remote, "refused a client request: {e} (further ones from this connection logged at debug)");
                    } else {
                        debug!(%remote, "refused a client request: {e}");
                    }
                    Response::Error(Failure::new(
                        ErrorCode::BadRequest,
                        format!("bad request: {e}"),
                    ))
                }
            };
            metrics.request_latency.observe(started.elapsed());
            let Ok(bytes) = frame::encode(&response) else {
                return;
            };
            // One copy only from here on.
            drop(response);
            ticket.hold(bytes.len() as u64);
            if send.write_all(&bytes).await.is_ok() {
                drop(bytes);
                if send.finish().is_ok() {
                    // Held until the client acknowledged every byte (QUIC's
                    // send buffer is part of what a slow reader makes us hold).
                    let _ = send.stopped().await;
                }
            }
            drop(ticket);
        });
    }
}
