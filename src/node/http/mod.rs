//! The HTTP/JSON API (`--http-listen`): HTTPS with the node's certificate;
//! a client is authenticated by a certificate of the cluster CA (client or
//! admin role, as on the QUIC client protocol: full access) or by a bearer
//! token scoped to key prefixes (`replication::tokens`, checked on every
//! request against the registry the core keeps current). Plain HTTP with
//! no authentication only when asked for by name (`--http-plain`).
//!
//! This module only accepts and serves connections; `routes` turns each
//! request into a client call that the core loop coordinates exactly like
//! a QUIC client request. Bounds: at most [`MAX_CONNECTIONS`] connections,
//! a TLS handshake and a request's headers within [`HANDSHAKE_TIMEOUT`], a
//! request answered within the client request timeout, a connection with
//! no request in flight closed after [`IDLE_TIMEOUT`].

pub(crate) mod changes;
pub mod json;
mod routes;
pub mod watch;

use super::{CoreInput, Inbox};
use crate::client::{Call, ErrorCode, Failure, Request, Response};
use crate::replication::tokens::{Access, Denied, TokenRegistry};
use crate::transport::tls::TlsIdentity;
use axum::http::{HeaderMap, StatusCode};
use json::ApiError;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, warn};

pub use changes::{CHANGES_LIMIT, LONGPOLL_SECONDS, MAX_LONGPOLL_SECONDS};
pub use routes::{MAX_BATCH_OPS, MAX_WATCH_SECONDS, WATCH_SECONDS};
pub use watch::MAX_WATCHES;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a TLS handshake, or a request's headers, may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent requests (HTTP/2 streams) per connection.
const STREAMS_PER_CONNECTION: u32 = 128;
/// A connection with no request in flight for this long is closed
/// (gracefully), so idle keep-alive connections cannot hold every slot.
/// Held watches and long polls are requests in flight.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the routes call the node through.
pub(super) struct Api {
    pub(in crate::node) core: Inbox,
    pub(in crate::node) tokens: tokio::sync::watch::Receiver<Arc<TokenRegistry>>,
    pub(in crate::node) watches: Arc<watch::Watches>,
    /// Per partition, whether this node coordinates its reads itself
    /// (published by the core): then a held watch needs no re-read.
    pub(in crate::node) local_reads: tokio::sync::watch::Receiver<Arc<Vec<bool>>>,
    /// The cluster's partition count (change feed cursors name it).
    pub(in crate::node) partitions: u16,
    /// Devices' pushes and pulls through this node (`kvctl devices`).
    pub(in crate::node) ledger: Arc<crate::node::devices::DeviceLedger>,
}

/// How a connection authenticated, put in each request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Connection {
    /// A client or admin certificate of the cluster CA.
    Certificate,
    /// TLS without a client certificate: each request needs a token.
    Anonymous,
    /// `--http-plain`: nothing is checked.
    Plain,
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// The bearer token of a request, if it carries one.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not text"))?;
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(unauthorized(
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

impl Api {
    /// Whether the request may do `access` to `key`: a certificate or the
    /// plain mode allow everything unless the request also carries a
    /// token, which then limits it; without a certificate a token is
    /// required. Checked before the key is looked at, so a refusal never
    /// tells whether the key exists.
    fn authorize(
        &self,
        connection: Connection,
        headers: &HeaderMap,
        key: &[u8],
        access: Access,
    ) -> Result<(), ApiError> {
        let Some(secret) = bearer(headers)? else {
            return match connection {
                Connection::Certificate | Connection::Plain => Ok(()),
                Connection::Anonymous => Err(unauthorized(
                    "this request needs `Authorization: Bearer <token>` (kvctl token create) or a client certificate",
                )),
            };
        };
        let registry = self.tokens.borrow().clone();
        registry
            .authorize(secret, key, access, super::admin::unix_ms())
            .map(|_| ())
            .map_err(denied)
    }

    /// The name of the token the request carries, if any (for the device
    /// ledger; the request was authorized already).
    fn token_name(&self, headers: &HeaderMap) -> Option<String> {
        let secret = bearer(headers).ok()??;
        let registry = self.tokens.borrow().clone();
        let name = registry
            .authenticate(secret, super::admin::unix_ms())
            .ok()
            .map(|t| t.name.clone());
        name
    }

    /// For node-level routes (status): any valid token, or a certificate.
    fn authenticate(&self, connection: Connection, headers: &HeaderMap) -> Result<(), ApiError> {
        match (bearer(headers)?, connection) {
            (None, Connection::Certificate | Connection::Plain) => Ok(()),
            (None, Connection::Anonymous) => Err(unauthorized(
                "this request needs `Authorization: Bearer <token>` or a client certificate",
            )),
            (Some(secret), _) => {
                let registry = self.tokens.borrow().clone();
                registry
                    .authenticate(secret, super::admin::unix_ms())
                    .map(|_| ())
                    .map_err(denied)
            }
        }
    }

    /// Coordinates `request` at quorums `w` / `r`, as a QUIC client call.
    /// Whether this node coordinates the reads of `scope` itself (see
    /// `watch`).
    fn reads_locally(
        &self,
        local: &tokio::sync::watch::Receiver<Arc<Vec<bool>>>,
        scope: watch::Scope,
    ) -> bool {
        let local = local.borrow();
        match scope {
            watch::Scope::Partition(p) => local.get(usize::from(p)).copied().unwrap_or(false),
            watch::Scope::All => !local.is_empty() && local.iter().all(|&l| l),
        }
    }

    /// Before a read that a held watch compares against, on a node that
    /// does not read `scope` locally: subscribes at the replicas its reads
    /// go to (see `watch`). Best effort: a full core queue leaves the
    /// watch to its re-read.
    fn subscribe(
        &self,
        local: &tokio::sync::watch::Receiver<Arc<Vec<bool>>>,
        scope: watch::Scope,
        key: &[u8],
    ) {
        if self.reads_locally(local, scope) {
            return;
        }
        let _ = self.core.main.try_send(CoreInput::Subscribe {
            key: key.to_vec(),
            prefix: matches!(scope, watch::Scope::All),
        });
    }

    async fn call(&self, request: Request, w: u8, r: u8) -> Result<Response, ApiError> {
        let (reply, answer) = oneshot::channel();
        let call = Call { request, w, r };
        if self
            .core
            .main
            .send(CoreInput::Client { call, reply })
            .await
            .is_err()
        {
            return Err(ApiError::of(shutting_down()));
        }
        // The coordinator answers every call by its quorum timeout; the
        // bound only guards against a bug leaving a request hanging.
        match tokio::time::timeout(crate::client::DEFAULT_REQUEST_TIMEOUT, answer).await {
            Ok(Ok(Response::Error(failure))) => Err(ApiError::of(failure)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(ApiError::of(shutting_down())),
            Err(_) => Err(ApiError::of(Failure::new(
                ErrorCode::Timeout,
                "the node did not answer in time; the outcome is unknown",
            ))),
        }
    }
}

fn denied(denied: Denied) -> ApiError {
    match denied {
        Denied::Unauthenticated(message) => unauthorized(message),
        Denied::Forbidden(message) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
    }
}

fn shutting_down() -> Failure {
    Failure::new(ErrorCode::Internal, "the node is shutting down")
}

/// The HTTPS configuration new connections get: replaced by a TLS reload
/// (SIGHUP), so a renewed certificate or CRL applies to the HTTP API too.
pub(super) type HttpsConfig = Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>;

/// How the HTTP listener secures its connections.
pub(super) enum HttpSecurity {
    /// HTTPS; a client presents a client or admin certificate of the CA,
    /// or none and a bearer token with each request.
    Tls(HttpsConfig),
    /// Plain HTTP, no authentication (`--http-plain`).
    Plain,
}

impl HttpSecurity {
    /// HTTPS with `identity`'s certificate; client certificates are
    /// verified when presented, tokens asked for when not.
    pub(super) fn tls(
        identity: &TlsIdentity,
    ) -> Result<HttpSecurity, crate::transport::tls::TlsError> {
        let config = https_config(identity)?;
        Ok(HttpSecurity::Tls(Arc::new(std::sync::RwLock::new(config))))
    }
}

/// The HTTPS server configuration for `identity`.
pub(super) fn https_config(
    identity: &TlsIdentity,
) -> Result<Arc<rustls::ServerConfig>, crate::transport::tls::TlsError> {
    let mut config = crate::transport::tls::https_server_config(identity, true)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Binds `addr` (before the node reports itself up, so a bad address fails
/// the start) and returns the task serving it.
pub(super) async fn start(
    addr: SocketAddr,
    security: HttpSecurity,
    api: Api,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let router = routes::router(Arc::new(api));
    let security = Arc::new(security);
    let task = tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let router = router.clone();
            let security = security.clone();
            tokio::spawn(async move {
                serve_connection(stream, remote, &security, router).await;
                drop(slot);
            });
        }
    });
    Ok((bound, task))
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    security: &HttpSecurity,
    router: axum::Router,
) {
    match security {
        HttpSecurity::Plain => serve_http(stream, remote, router, Connection::Plain).await,
        HttpSecurity::Tls(config) => {
            let current = config
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let acceptor = tokio_rustls::TlsAcceptor::from(current);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%remote, "HTTPS handshake refused: {e}"),
                Err(_) => return debug!(%remote, "HTTPS handshake timed out"),
            };
            // The verifier checked a presented chain against the cluster
            // CA; the role decides: node certificates are for peers.
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let connection = match leaf.map(|der| crate::certs::identity_of(der)) {
                Some(Ok(identity)) if identity.role != crate::certs::Role::Node => {
                    Connection::Certificate
                }
                Some(Ok(identity)) => {
                    return debug!(%remote, %identity, "HTTPS refused: a node certificate is not a client one")
                }
                Some(Err(e)) => return debug!(%remote, "HTTPS refused: unusable certificate: {e}"),
                None => Connection::Anonymous,
            };
            serve_http(tls, remote, router, connection).await
        }
    }
}

async fn serve_http<S>(stream: S, remote: SocketAddr, router: axum::Router, connection: Connection)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower_service::Service;
    let activity = Arc::new(Activity::default());
    let requests = activity.clone();
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(connection);
            let in_flight = InFlight::new(requests.clone());
            let answer = router.clone().call(request);
            async move {
                let answer = answer.await;
                drop(in_flight);
                answer
            }
        });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(STREAMS_PER_CONNECTION);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let ended = loop {
        tokio::select! {
            ended = connection.as_mut() => break ended,
            () = tokio::time::sleep(IDLE_TIMEOUT / 4) => {
                if activity.idle_for() >= IDLE_TIMEOUT {
                    debug!(%remote, "closing an HTTP connection idle for {IDLE_TIMEOUT:?}");
                    connection.as_mut().graceful_shutdown();
                    break connection.await;
                }
            }
        }
    };
    if let Err(e) = ended {
        debug!(%remote, "HTTP connection ended: {e}");
    }
}

/// Requests in flight on a connection, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    idle_since: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl Activity {
    fn idle_since(&self) -> std::sync::MutexGuard<'_, tokio::time::Instant> {
        self.idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Zero while a request is in flight.
    fn idle_for(&self) -> Duration {
        let since = self.idle_since();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        since.elapsed()
    }
}

/// One request in flight: counted from its start until its answer.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> InFlight {
        {
            // Under the lock, like the drop: `idle_for` sees a consistent pair.
            let _locked = activity.idle_since();
            activity.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut since = self.0.idle_since();
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *since = tokio::time::Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_while_no_request_is_in_flight() {
        let activity = Arc::new(Activity::default());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(activity.idle_for(), Duration::from_secs(5));
        let first = InFlight::new(activity.clone());
        let second = InFlight::new(activity.clone());
        tokio::time::advance(IDLE_TIMEOUT * 2).await;
        assert_eq!(
            activity.idle_for(),
            Duration::ZERO,
            "a long poll is not idle"
        );
        drop(first);
        assert_eq!(activity.idle_for(), Duration::ZERO);
        drop(second);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            activity.idle_for(),
            Duration::from_secs(1),
            "idle from the last answer"
        );
    }
}
