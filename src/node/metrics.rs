//! Prometheus metrics: counters the node's tasks bump, gauges the core loop
//! refreshes, rendered as text on `GET /metrics` at `--metrics-listen`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::warn;

/// Message kinds as the replication core names them, and request coordination.
pub const KINDS: [&str; 6] = [
    "membership",
    "digest",
    "repair",
    "migration",
    "layout",
    "coordination",
];

#[derive(Default)]
pub struct Metrics {
    pub peer_bytes_sent: [AtomicU64; 6],
    pub peer_bytes_received: [AtomicU64; 6],
    pub client_requests: AtomicU64,
    /// Client request latency at the node, from request to answer.
    pub request_latency: Histogram,
    pub client_errors: AtomicU64,
    /// Connections refused by the connection caps (node/limits.rs).
    pub connections_refused: AtomicU64,
    /// Frames dropped: stalled past the read deadline, or over a limit.
    pub frames_dropped: AtomicU64,
    /// Outgoing peer frames dropped because the peer's queue of that lane
    /// was full (membership, requests, sync).
    pub peer_queue_drops: [AtomicU64; 3],
    /// Gauge: response bytes encoded and not yet read by their clients.
    pub response_bytes_held: AtomicU64,
    /// Gauges and core counters, refreshed by the core loop.
    pub core: Mutex<BTreeMap<&'static str, u64>>,
    /// This node's name and id, for `gossipkv_node_info`.
    pub node: std::sync::OnceLock<(String, String)>,
}

impl Metrics {
    pub fn kind_index(kind: &str) -> usize {
        KINDS.iter().position(|k| *k == kind).unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(
                out,
                "# HELP gossipkv_{name} {help}\n# TYPE gossipkv_{name} {kind}"
            );
            for (labels, value) in rows {
                let _ = writeln!(out, "gossipkv_{name}{labels} {value}");
            }
        };
        let by_kind = |values: &[AtomicU64; 6]| -> Vec<(String, u64)> {
            KINDS
                .iter()
                .zip(values)
                .map(|(k, v)| (format!("{{kind=\"{k}\"}}"), v.load(Ordering::Relaxed)))
                .collect()
        };
        if let Some((name, id)) = self.node.get() {
            // Names are checked to letters, digits, '-' and '.': no escaping.
            counter(
                "node_info",
                "This node's name (its certificate's) and id.",
                "gauge",
                vec![(format!("{{name=\"{name}\",id=\"{id}\"}}"), 1)],
            );
        }
        counter(
            "peer_bytes_sent_total",
            "Bytes of peer frames sent, by message kind.",
            "counter",
            by_kind(&self.peer_bytes_sent),
        );
        counter(
            "peer_bytes_received_total",
            "Bytes of peer frames received, by message kind.",
            "counter",
            by_kind(&self.peer_bytes_received),
        );
        counter(
            "client_requests_total",
            "Client requests served.",
            "counter",
            vec![(String::new(), self.client_requests.load(Ordering::Relaxed))],
        );
        counter(
            "client_errors_total",
            "Client requests that failed.",
            "counter",
            vec![(String::new(), self.client_errors.load(Ordering::Relaxed))],
        );
        counter(
            "connections_refused_total",
            "Connections refused by the connection limits.",
            "counter",
            vec![(
                String::new(),
                self.connections_refused.load(Ordering::Relaxed),
            )],
        );
        counter(
            "frames_dropped_total",
            "Frames dropped: stalled past frame_read_timeout_ms, or over a size limit.",
            "counter",
            vec![(String::new(), self.frames_dropped.load(Ordering::Relaxed))],
        );
        counter(
            "peer_queue_drops_total",
            "Frames to peers dropped because the peer's queue of that lane was full (the peer is slow or away).",
            "counter",
            ["membership", "requests", "sync"]
                .iter()
                .zip(&self.peer_queue_drops)
                .map(|(lane, n)| (format!("{{lane=\"{lane}\"}}"), n.load(Ordering::Relaxed)))
                .collect(),
        );
        counter(
            "response_bytes_held",
            "Response bytes encoded and not yet acknowledged by their clients.",
            "gauge",
            vec![(
                String::new(),
                self.response_bytes_held.load(Ordering::Relaxed),
            )],
        );
        let core = self.core.lock().map(|c| c.clone()).unwrap_or_default();
        for (name, value) in core {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            counter(
                name,
                "See ARCHITECTURE.md, replication core.",
                kind,
                vec![(String::new(), value)],
            );
        }
        self.request_latency.render(
            "client_request_duration_seconds",
            "Client request latency at the node, including quorum waits.",
            &mut out,
        );
        out
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 8] = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];

/// A Prometheus histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    /// Observations at or below each bound (cumulative when rendered).
    buckets: [AtomicU64; 8],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: std::time::Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP gossipkv_{name} {help}\n# TYPE gossipkv_{name} histogram"
        );
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "gossipkv_{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "gossipkv_{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "gossipkv_{name}_sum {sum}\ngossipkv_{name}_count {count}"
        );
    }
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    socket.read(&mut request),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let head = String::from_utf8_lossy(&request[..n]);
                let response = if head.starts_with("GET /metrics ") {
                    let body = metrics.render();
                    format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                };
                if let Err(e) = socket.write_all(response.as_bytes()).await {
                    warn!("metrics response failed: {e}");
                }
            });
        }
    });
    Ok(())
}
