//! The client protocol and a small Rust client.
//!
//! One request per QUIC bidirectional stream on the client ALPN: the client
//! writes a [`Request`] frame and finishes its side; the node answers with
//! one [`Response`] frame. Any node takes any request.

use crate::certs::SERVER_NAME;
use crate::crdt::{CausalContext, Value};
use crate::replication::membership::LoadFigures;
use crate::transport::tls::{client_config, refusal, CertProblem, Refusal, TlsIdentity};
use crate::transport::{frame, ALPN_ADMIN, ALPN_CLIENT};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// `context` is a causal context token's bytes.
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        #[serde(with = "serde_bytes")]
        context: Option<Vec<u8>>,
    },
    PutLww {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        context: Option<Vec<u8>>,
    },
    CounterAdd {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        amount: i64,
    },
    CounterGet {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    SetAdd {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        member: Vec<u8>,
    },
    SetRemove {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        member: Vec<u8>,
    },
    SetMembers {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Status,
    /// One page of the live keys starting with `prefix` across the whole
    /// cluster, in key order, after `start_after`: each partition is
    /// listed by one of its replicas.
    List {
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        #[serde(with = "serde_bytes")]
        start_after: Option<Vec<u8>>,
        limit: u32,
        /// A change feed reader's frontier: list each partition only on a
        /// replica that covers it (what a reader reconciling after a purge
        /// needs, see `store::feed`). Empty: any complete replica.
        since: Vec<(u16, crate::crdt::VersionVector)>,
    },
    /// One page of the change feed under `prefix`: the entries whose
    /// writes `since` (per partition; absent ones: nothing seen) does not
    /// cover, and the frontier to ask with next. See
    /// `replication::feed`.
    Changes {
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        since: Vec<(u16, crate::crdt::VersionVector)>,
        limit: u32,
        /// A page since the last reconciliation said deletes may have been
        /// missed (`ChangesPage::reconcile_pending`).
        reconcile_pending: bool,
        /// Skip what is there: no entries, a frontier covering everything
        /// the sources hold (`since=now`: follow only later changes).
        from_now: bool,
    },
    /// Live keys this node holds, in key order.
    Keys {
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        limit: u32,
    },
    // Admin and inspection (admin ALPN only).
    /// Every member this node knows, with state and metadata.
    ClusterMembers,
    /// The layout: replicas per partition and the change in progress.
    Layout,
    /// The partitions this node holds: size, vector and its digest.
    Partitions,
    /// The key as each of its replicas holds it.
    Inspect {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Partitions migrating into this node.
    Migrations,
    /// Join the cluster through `seed` (a node started without seeds).
    Join {
        seed: SocketAddr,
    },
    /// Decommission: hand every partition off, then leave.
    Leave,
    /// Make an API token for the HTTP API (admin certificates only); the
    /// answer carries its secret, which is shown once and stored nowhere.
    TokenCreate {
        name: String,
        prefixes: Vec<Vec<u8>>,
        read: bool,
        write: bool,
        /// Seconds from now until it expires; `None`: never.
        expires_in_seconds: Option<u64>,
    },
    /// Every API token (without secrets), revoked ones included.
    TokenList,
    /// Revoke the tokens with this name or id, on every node.
    TokenRevoke {
        name_or_id: String,
    },
    /// A write a device made offline, pushed: `op` (a write) applied at
    /// most once per (`device`, `seq`), however often the push is retried
    /// and through whichever node. Coordinated only by the key's first
    /// replica in the layout (see docs/device-sync.md).
    Pushed {
        device: u64,
        seq: u64,
        op: Box<Request>,
    },
    /// The device ledger of the node asked (the devices that synced
    /// through it), and what holds back its tombstone purges.
    Devices,
    /// A load-balancing plan for the current layout (nothing changes).
    LayoutPlan,
    /// Apply the plan with this id, made by the node asked.
    LayoutApply {
        id: u64,
    },
    /// Set the bytes per second the node asked sends migration chunks at
    /// (0: unlimited), until it restarts.
    SetMigrationBudget {
        bytes_per_sec: u64,
    },
    /// Set the capacity of the node asked (kept across restarts, over the
    /// configuration's); the layout follows.
    SetCapacity {
        capacity: u32,
    },
    /// Set the zone of the node asked (`None`: no zone), kept likewise.
    SetZone {
        zone: Option<String>,
    },
}

impl Request {
    /// The key the request is about (`None` for node-level requests).
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Request::Get { key }
            | Request::Put { key, .. }
            | Request::PutLww { key, .. }
            | Request::Delete { key, .. }
            | Request::CounterAdd { key, .. }
            | Request::CounterGet { key }
            | Request::SetAdd { key, .. }
            | Request::SetRemove { key, .. }
            | Request::SetMembers { key } => Some(key),
            Request::Inspect { key } => Some(key),
            Request::Pushed { op, .. } => op.key(),
            Request::Status
            | Request::List { .. }
            | Request::Changes { .. }
            | Request::Keys { .. }
            | Request::ClusterMembers
            | Request::Layout
            | Request::Partitions
            | Request::Migrations
            | Request::Join { .. }
            | Request::Leave
            | Request::TokenCreate { .. }
            | Request::TokenList
            | Request::TokenRevoke { .. }
            | Request::Devices
            | Request::LayoutPlan
            | Request::LayoutApply { .. }
            | Request::SetMigrationBudget { .. }
            | Request::SetCapacity { .. }
            | Request::SetZone { .. } => None,
        }
    }

    /// Whether the request changes data (and so waits for `w` replicas).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Put { .. }
                | Request::PutLww { .. }
                | Request::Delete { .. }
                | Request::CounterAdd { .. }
                | Request::SetAdd { .. }
                | Request::SetRemove { .. }
                | Request::Pushed { .. }
        )
    }

    /// Requests that change the cluster or its credentials (listing the
    /// tokens included): admin certificates only.
    pub fn changes_cluster(&self) -> bool {
        matches!(
            self,
            Request::Join { .. }
                | Request::Leave
                | Request::TokenCreate { .. }
                | Request::TokenList
                | Request::TokenRevoke { .. }
                | Request::LayoutApply { .. }
                | Request::SetMigrationBudget { .. }
                | Request::SetCapacity { .. }
                | Request::SetZone { .. }
        )
    }

    /// Admin and inspection requests, served on the admin ALPN only.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::ClusterMembers
                | Request::Layout
                | Request::Partitions
                | Request::Inspect { .. }
                | Request::Migrations
                | Request::Join { .. }
                | Request::Leave
                | Request::TokenCreate { .. }
                | Request::TokenList
                | Request::TokenRevoke { .. }
                | Request::Devices
                | Request::LayoutPlan
                | Request::LayoutApply { .. }
                | Request::SetMigrationBudget { .. }
                | Request::SetCapacity { .. }
                | Request::SetZone { .. }
        )
    }
}

/// A request with its quorums: the replicas that must acknowledge a write
/// (`w`) or answer a read (`r`) before the node replies. 1 means the
/// coordinating replica alone: available whenever one replica is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub request: Request,
    pub w: u8,
    pub r: u8,
}

/// A read as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    pub value: Value,
    /// Causal context token bytes.
    #[serde(with = "serde_bytes")]
    pub context: Vec<u8>,
    pub other_kinds: Vec<Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name (its certificate's; with --insecure and no name, its id).
    pub node_id: String,
    /// The gossipkv version the node runs.
    pub version: String,
    pub uptime_seconds: u64,
    pub members_alive: usize,
    pub members_total: usize,
    pub layout_version: u64,
    pub layout_completed: u64,
    pub partitions_held: usize,
    pub migrations_in_flight: usize,
    pub anti_entropy_rounds: u64,
    /// Entries anti-entropy brought in that this node lacked.
    pub repaired_entries: u64,
    /// True once a decommission finished: the node holds nothing and left.
    pub decommissioned: bool,
    /// Entries and key + entry bytes in the partitions this node holds.
    pub entries_held: u64,
    pub bytes_held: u64,
    /// When the node's certificate expires (RFC 3339, UTC); `None` without TLS.
    pub cert_expires: Option<String>,
    /// Whole days until then (negative once expired).
    pub cert_expires_in_days: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The node's id (16 hex digits), derived from its name.
    pub id: String,
    /// The node's name, as its certificate carries it.
    pub name: String,
    pub addr: String,
    /// alive, suspect, down or left (this node: "self").
    pub state: String,
    pub zone: Option<String>,
    pub capacity: Option<u32>,
    pub partitions_held: usize,
    /// Load figures the member last gossiped (keys, bytes, client ops/s).
    pub load: Option<LoadFigures>,
    /// Milliseconds since this node last received a message from it.
    pub last_heard_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutInfo {
    pub version: u64,
    pub completed: u64,
    /// Per partition, its replicas (node ids) in the current layout.
    pub replicas: Vec<Vec<String>>,
    /// Replicas gaining a partition that are not ready yet: (partition, node).
    pub pending: Vec<(u16, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u16,
    pub entries: u64,
    pub bytes: u64,
    /// The hash anti-entropy compares.
    pub digest: u64,
    /// The version vector: per node, the contiguous base and any dots above it.
    pub version: Vec<(String, u64, Vec<u64>)>,
}

/// Migrations into a node for its current layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationsInfo {
    pub layout_version: u64,
    /// (partition, source node) of streams in flight.
    pub in_flight: Vec<(u16, String)>,
    /// Partitions this node gains in the layout, and how many are ready.
    pub total: usize,
    pub done: usize,
    pub entries: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
    /// Each stream in flight into this node.
    pub streams: Vec<MigrationStreamInfo>,
    /// This node's budget for sending migration chunks (bytes/s; `None`:
    /// unlimited), and the chunk bytes waiting for it.
    pub budget_bytes_per_sec: Option<u64>,
    pub bytes_queued_to_send: u64,
}

/// One migration stream into the node asked (`Request::Migrations`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStreamInfo {
    pub partition: u16,
    pub phase: u8,
    pub source: String,
    /// What the source announced, once it has.
    pub entries_total: Option<u64>,
    pub bytes_total: Option<u64>,
    pub entries_done: u64,
    pub bytes_done: u64,
    pub running_ms: u64,
    pub since_progress_ms: u64,
    pub restarts: u32,
    /// Why the stream is stalled, if it is.
    pub stalled: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub node: String,
    /// False if the replica did not answer in time.
    pub answered: bool,
    pub record: Option<WireRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Record(Option<WireRecord>),
    Context(#[serde(with = "serde_bytes")] Vec<u8>),
    Counter(i64),
    Members(Vec<Vec<u8>>),
    Status(NodeStatus),
    ClusterMembers(Vec<MemberInfo>),
    Layout(LayoutInfo),
    Partitions(Vec<PartitionInfo>),
    Inspect(Vec<ReplicaView>),
    Migrations(MigrationsInfo),
    Done,
    /// Keys with the kind of value each holds.
    Keys(Vec<(Vec<u8>, String)>),
    /// The request failed: its kind, and a message saying why.
    Error(Failure),
    /// One page of the change feed.
    Changes(ChangesPage),
    /// A token made: its id and the secret (shown once).
    TokenCreated {
        id: String,
        secret: String,
    },
    Tokens(Vec<TokenInfo>),
    /// How many tokens a revoke took out of force.
    Revoked(u32),
    Devices(DevicesInfo),
    LayoutPlan(PlanInfo),
    /// A plan was applied: the layout version it made.
    LayoutApplied {
        version: u64,
    },
}

/// A load-balancing plan (`Request::LayoutPlan`), nodes by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanInfo {
    /// What `kvctl layout apply` takes (16 hex digits).
    pub id: String,
    pub layout_version: u64,
    pub summary: String,
    pub moves: Vec<PlanMove>,
    pub nodes: Vec<PlanNode>,
    pub max_ratio_before: f64,
    pub max_ratio_after: f64,
}

// The planner's figures are finite (never NaN), so equality is total.
impl Eq for PlanInfo {}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanMove {
    /// "lead" (the coordinating role moves, no data) or "replica".
    pub kind: String,
    pub partition: u16,
    pub from: String,
    pub to: String,
    pub ops_per_sec: f64,
    pub keys: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanNode {
    pub node: String,
    /// Its share of the cluster's work by capacity (ops/s).
    pub target: f64,
    pub before: f64,
    pub after: f64,
}

/// One node's device ledger (`Request::Devices`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesInfo {
    pub node: String,
    /// The node's clock (Unix ms), for the ages of its records.
    pub now_ms: u64,
    pub devices: Vec<(u64, crate::store::DeviceRecord)>,
    /// Partitions of this node that hold tombstones it cannot purge yet,
    /// and why. Devices never hold a purge back: one away across a purge
    /// reconciles its prefixes (docs/device-sync.md).
    pub purge_held: Vec<PurgeHold>,
    /// Partitions this node became the primary replica of whose pushed
    /// writes wait for its push fence, and the nodes it waits for.
    pub push_held: Vec<PushHold>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushHold {
    pub partition: u16,
    pub waiting_for: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeHold {
    pub partition: u16,
    pub reason: String,
}

/// One page of the change feed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesPage {
    /// The changed entries (values, or tombstones for deleted keys), each
    /// state once, encoded as stores keep them.
    pub entries: Vec<crate::store::RemoteEntry>,
    /// What the reader has seen after this page: pass it back as `since`.
    /// Partitions with an empty vector are left out.
    pub frontier: Vec<(u16, crate::crdt::VersionVector)>,
    /// Some partitions were not read to their end (the page was full):
    /// ask again at once with `frontier`.
    pub more: bool,
    /// Reconcile now: tombstones the reader had not seen were purged while
    /// it caught up, so it may hold keys deleted since. List the prefix's
    /// live keys with this page's `frontier` (`Request::List::since`) and
    /// drop those it holds that are not listed, before asking again.
    pub reconcile: bool,
    /// Such a purge was found but the reader has not caught up yet: pass
    /// it back with the next request (`reconcile` comes once it has).
    pub reconcile_pending: bool,
}

/// An API token as `kvctl token list` shows it (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// The prefixes, lossily as text.
    pub prefixes: Vec<String>,
    pub read: bool,
    pub write: bool,
    /// RFC 3339, UTC.
    pub created: String,
    pub expires: Option<String>,
    /// active, expired or revoked.
    pub state: String,
}

/// A failed request: what kind of failure (for programs to act on) and a
/// message (for people).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// The kinds of failure a node answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is malformed or out of bounds (empty or oversized key,
    /// oversized value, W or R above the replica count, a counter add that
    /// would overflow, a delete of a counter or set). Retrying is useless.
    BadRequest,
    /// The key holds another kind of value.
    WrongType,
    /// The causal context token is malformed or claims writes never made.
    BadToken,
    /// Fewer replicas than the quorum answered or acknowledged in time.
    /// For a write, `reached` replicas hold it (it is kept there and
    /// spreads; retrying with the same context is safe); for a read,
    /// `reached` answered.
    QuorumNotMet { reached: u8, needed: u8 },
    /// The node coordinating the call did not answer in time; the outcome
    /// is unknown.
    Timeout,
    /// The node's write queue is full; retry after a pause.
    Overloaded,
    /// No replica can take the call now (no layout yet, no replica
    /// reachable, a replica still receiving its partition); retry shortly.
    Unavailable,
    /// The connection's certificate does not allow the request.
    Forbidden,
    /// The node failed (storage error, shutting down).
    Internal,
}

impl ErrorCode {
    /// Whether the same request may succeed if sent again later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::QuorumNotMet { .. }
                | ErrorCode::Timeout
                | ErrorCode::Overloaded
                | ErrorCode::Unavailable
                | ErrorCode::Internal
        )
    }

    /// The store error's kind.
    pub fn of(error: &crate::Error) -> ErrorCode {
        use crate::Error as E;
        match error {
            E::WrongType { .. } => ErrorCode::WrongType,
            E::BadToken(_) | E::UnissuedWrite { .. } => ErrorCode::BadToken,
            E::OwnWritesMissing { .. } => ErrorCode::Unavailable,
            E::InvalidKey(_)
            | E::TooLarge { .. }
            | E::DeleteUnsupported { .. }
            | E::CounterOverflow { .. }
            | E::PartitionOutOfRange { .. }
            | E::MisroutedEntry { .. }
            | E::InvalidEntry { .. } => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The handshake or the connection was refused over a certificate (or
    /// by role); `reason` says whose and why.
    #[error("{reason}")]
    Refused { addr: SocketAddr, reason: String },
    #[error("request to {addr} failed: {reason}")]
    Request { addr: SocketAddr, reason: String },
    /// The node answered with a failure.
    #[error("{0}")]
    Node(Failure),
    #[error("the node sent an unexpected response: {0:?}")]
    Unexpected(Box<Response>),
    #[error("TLS: {0}")]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error("bad causal context token: {0}")]
    Token(#[from] crate::crdt::TokenError),
}

/// A connection to one node.
pub struct Client {
    addr: SocketAddr,
    connection: quinn::Connection,
    /// The TLS directory the certificates came from, named in refusals.
    tls_dir: Option<std::path::PathBuf>,
    timeout: std::time::Duration,
    w: u8,
    r: u8,
    _endpoint: quinn::Endpoint,
}

/// How long connecting may take before it fails.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a request may take before it fails (a node that died without
/// closing its connection is otherwise noticed only at the idle timeout).
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Client {
    /// Connects with a client certificate (`tls`), or insecurely with `None`.
    pub async fn connect(
        addr: SocketAddr,
        tls: Option<&TlsIdentity>,
    ) -> Result<Client, ClientError> {
        Self::connect_on(addr, tls, ALPN_CLIENT).await
    }

    /// Connects for admin and inspection requests (what kvctl uses).
    pub async fn connect_admin(
        addr: SocketAddr,
        tls: Option<&TlsIdentity>,
    ) -> Result<Client, ClientError> {
        Self::connect_on(addr, tls, ALPN_ADMIN).await
    }

    async fn connect_on(
        addr: SocketAddr,
        tls: Option<&TlsIdentity>,
        alpn: &[u8],
    ) -> Result<Client, ClientError> {
        let connect_err = |reason: String| ClientError::Connect { addr, reason };
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        }
        .parse()
        .map_err(|e: std::net::AddrParseError| connect_err(e.to_string()))?;
        let bind = if addr.ip().is_loopback() {
            bind
        } else {
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0)
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
        endpoint.set_default_client_config(client_config(tls, alpn)?);
        let connecting = endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| connect_err(e.to_string()))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| connect_err(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| refused(addr, tls, &e).unwrap_or_else(|| connect_err(e.to_string())))?;
        Ok(Client {
            addr,
            connection,
            tls_dir: tls.map(|t| t.dir().to_path_buf()),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            w: 1,
            r: 1,
            _endpoint: endpoint,
        })
    }

    /// A request failure: the refusal that closed the connection, if that
    /// is what happened (a node checks a client's certificate after the
    /// client's side of the handshake completed, so a refused client learns
    /// of it on its first request), else `reason`.
    fn failed(&self, reason: String) -> ClientError {
        let close = self.connection.close_reason();
        if let Some(refused) = close
            .as_ref()
            .and_then(|e| refused_in(self.addr, self.tls_dir.as_deref(), e))
        {
            return refused;
        }
        // A connection the node closed says why (e.g. a connection cap).
        ClientError::Request {
            addr: self.addr,
            reason: match close {
                Some(close) => format!("{reason} ({close})"),
                None => reason,
            },
        }
    }

    pub fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.timeout = timeout;
    }

    /// Write and read quorums for the following requests (default 1 and 1).
    pub fn set_quorum(&mut self, w: u8, r: u8) {
        self.w = w.max(1);
        self.r = r.max(1);
    }

    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(result) => result,
            Err(_) => Err(self.failed(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Closes the connection and waits (at most 1 s) until the node was
    /// told. A process that exits without this leaves its connection open
    /// on the node until the idle timeout, counted against the node's
    /// per-identity connection cap (see `node::limits`).
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self._endpoint.wait_idle(),
        )
        .await;
    }

    async fn exchange(&self, request: &Request) -> Result<Response, ClientError> {
        let fail = |reason: String| self.failed(reason);
        let (mut send, mut recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| fail(e.to_string()))?;
        frame::write(
            &mut send,
            &Call {
                request: request.clone(),
                w: self.w,
                r: self.r,
            },
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        send.finish().map_err(|e| fail(e.to_string()))?;
        match frame::read::<Response, _>(&mut recv)
            .await
            .map_err(|e| fail(e.to_string()))?
        {
            Some(Response::Error(failure)) => Err(ClientError::Node(failure)),
            Some(response) => Ok(response),
            None => Err(fail("the node closed the stream without answering".into())),
        }
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<WireRecord>, ClientError> {
        match self.request(&Request::Get { key: key.to_vec() }).await? {
            Response::Record(record) => Ok(record),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        context: Option<&CausalContext>,
    ) -> Result<CausalContext, ClientError> {
        let request = Request::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            context: context.map(CausalContext::to_bytes),
        };
        self.context_of(request).await
    }

    pub async fn delete(
        &self,
        key: &[u8],
        context: Option<&CausalContext>,
    ) -> Result<CausalContext, ClientError> {
        let request = Request::Delete {
            key: key.to_vec(),
            context: context.map(CausalContext::to_bytes),
        };
        self.context_of(request).await
    }

    pub async fn counter_add(&self, key: &[u8], amount: i64) -> Result<i64, ClientError> {
        match self
            .request(&Request::CounterAdd {
                key: key.to_vec(),
                amount,
            })
            .await?
        {
            Response::Counter(n) => Ok(n),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    pub async fn counter(&self, key: &[u8]) -> Result<i64, ClientError> {
        match self
            .request(&Request::CounterGet { key: key.to_vec() })
            .await?
        {
            Response::Counter(n) => Ok(n),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        match self.request(&Request::Status).await? {
            Response::Status(status) => Ok(status),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    async fn context_of(&self, request: Request) -> Result<CausalContext, ClientError> {
        match self.request(&request).await? {
            Response::Context(bytes) => Ok(CausalContext::from_bytes(&bytes)?),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }
}

fn refused(
    addr: SocketAddr,
    tls: Option<&TlsIdentity>,
    error: &quinn::ConnectionError,
) -> Option<ClientError> {
    refused_in(addr, tls.map(TlsIdentity::dir), error)
}

/// The one-line explanation of a refused handshake or connection: whose
/// certificate was refused and why, naming the files concerned.
fn refused_in(
    addr: SocketAddr,
    dir: Option<&std::path::Path>,
    error: &quinn::ConnectionError,
) -> Option<ClientError> {
    use crate::certs::{CA_CERT, CERT, CRL};
    let file = |name: &str| match dir {
        Some(dir) => dir.join(name).display().to_string(),
        None => name.to_string(),
    };
    let reason = match refusal(error)? {
        Refusal::OursRefused(CertProblem::UnknownCa) => format!(
            "the node at {addr} refused this client's certificate ({}): it is not from the cluster's CA, or the node cannot tell whether it is revoked",
            file(CERT)
        ),
        Refusal::OursRefused(problem) => format!(
            "the node at {addr} refused this client's certificate ({}): {problem}",
            file(CERT)
        ),
        Refusal::TheirsRefused {
            problem: CertProblem::UnknownCa,
            ..
        } => format!(
            "the certificate of the node at {addr} is not from the cluster CA in {}",
            file(CA_CERT)
        ),
        Refusal::TheirsRefused {
            problem: CertProblem::Expired,
            ..
        } => format!("the certificate of the node at {addr} has expired (or is not valid yet)"),
        Refusal::TheirsRefused {
            problem: CertProblem::Revoked,
            ..
        } => format!(
            "the certificate of the node at {addr} is revoked (by {})",
            file(CRL)
        ),
        Refusal::TheirsRefused { problem, detail } => format!(
            "the certificate of the node at {addr} was refused: {problem} ({detail})"
        ),
        Refusal::Closed(reason) => format!("the node at {addr} refused the connection: {reason}"),
    };
    Some(ClientError::Refused { addr, reason })
}
