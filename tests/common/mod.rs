//! Shared by the multi-process tests: real `gossipkv serve` processes on
//! loopback, their certificates, clients and bounded waits.
#![allow(dead_code, unreachable_pub)]

use gossipkv::certs;
use gossipkv::client::Client;
use gossipkv::transport::tls::TlsIdentity;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// At most two clusters run at once: on a 2-core machine more would starve
/// them, and timing-sensitive checks (quorum timeouts) would fail for that
/// reason alone.
pub static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Child processes, killed when the test ends however it ends.
pub struct Cluster {
    pub nodes: Vec<(Child, SocketAddr)>,
    pub metrics: Vec<SocketAddr>,
    /// Where each node serves the HTTP API (HTTPS, client certificates).
    pub http: Vec<SocketAddr>,
    pub dir: tempfile::TempDir,
}

pub fn serve_command(
    node_dir: &Path,
    i: usize,
    addr: SocketAddr,
    metrics: SocketAddr,
    seed: Option<SocketAddr>,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gossipkv"));
    command
        .args([
            "serve",
            "--node-id",
            &format!("node-{i}"),
            "--listen",
            &addr.to_string(),
        ])
        .arg("--data-dir")
        .arg(node_dir.join("data"))
        .arg("--tls-dir")
        .arg(node_dir.join("tls"))
        .args(["--metrics-listen", &metrics.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(seed) = seed {
        command.args(["--seeds", &seed.to_string()]);
    }
    command
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback port free for TCP now.
pub fn free_tcp_port() -> u16 {
    pick_port(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// Picks ports below Linux's ephemeral range (32768-60999): a port the
/// kernel handed out for `:0` could be taken by a client's own socket (the
/// QUIC clients bind `:0`) before the node that was to bind it starts.
/// Each test process takes its own window, walked in turn, so two tests of
/// one process never get the same port.
fn pick_port(free: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const WINDOW: u32 = 500;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 10_000 + (std::process::id() % 40) * WINDOW;
    for _ in 0..WINDOW * 4 {
        let port = (base + NEXT.fetch_add(1, Ordering::Relaxed) % WINDOW) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free loopback port in {base}..{}", base + WINDOW);
}

/// The Prometheus text a node serves.
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// A metric's value in Prometheus text (`name` includes any labels).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A loopback port free for UDP (QUIC) now.
pub fn free_port() -> u16 {
    pick_port(|port| std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        let mut cluster = Cluster::forming(n);
        for _ in 1..n {
            cluster.add_node();
        }
        cluster
    }

    /// `n` nodes, each reading `config` (TOML) through `--config`.
    pub fn start_with_config(n: usize, config: &str) -> Cluster {
        let mut cluster = Cluster::forming_with_config(n, Some(config));
        for _ in 1..n {
            let seed = cluster.nodes.first().map(|(_, a)| *a);
            cluster.spawn_node(seed, 1, Some(config));
        }
        cluster
    }

    /// Only the first node of a new cluster, which makes the first layout
    /// once `expect_nodes` nodes are up (`--expect-nodes`), so that the
    /// first layout already has every node.
    pub fn forming(expect_nodes: usize) -> Cluster {
        Cluster::forming_with_config(expect_nodes, None)
    }

    /// [`Cluster::forming`], the first node reading `config` (TOML) through
    /// `--config`; flags still give the rest.
    pub fn forming_with_config(expect_nodes: usize, config: Option<&str>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        certs::init_ca(&ca, "test").unwrap();
        certs::issue(
            &ca,
            "client",
            certs::Role::Client,
            30,
            &dir.path().join("client"),
        )
        .unwrap();
        certs::issue(
            &ca,
            "admin",
            certs::Role::Admin,
            30,
            &dir.path().join("admin"),
        )
        .unwrap();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            metrics: Vec::new(),
            http: Vec::new(),
            dir,
        };
        cluster.spawn_node(None, expect_nodes, config);
        cluster
    }

    /// Starts one more node, joining through the first.
    pub fn add_node(&mut self) {
        let seed = self.nodes.first().map(|(_, a)| *a);
        self.add_node_with_seed(seed);
    }

    /// Starts one more node joining through `seed`, or, with `None`, a node
    /// that starts a cluster of its own (same CA, so clients reach both).
    pub fn add_node_with_seed(&mut self, seed: Option<SocketAddr>) {
        self.spawn_node(seed, 1, None);
    }

    fn spawn_node(&mut self, seed: Option<SocketAddr>, expect_nodes: usize, config: Option<&str>) {
        let i = self.nodes.len() + 1;
        let node_dir = self.dir.path().join(format!("node-{i}"));
        certs::issue(
            &self.dir.path().join("ca"),
            &format!("node-{i}"),
            certs::Role::Node,
            30,
            &node_dir.join("tls"),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        self.metrics.push(metrics);
        let http: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        self.http.push(http);
        let mut command = serve_command(&node_dir, i, addr, metrics, seed);
        command.args(["--expect-nodes", &expect_nodes.to_string()]);
        command.args(["--http-listen", &http.to_string()]);
        if let Some(config) = config {
            let path = node_dir.join("config.toml");
            std::fs::write(&path, config).unwrap();
            command.arg("--config").arg(path);
        }
        self.nodes.push((command.spawn().unwrap(), addr));
    }

    /// kill -9: no shutdown, no flush beyond what was committed.
    pub fn kill(&mut self, i: usize) {
        let (child, _) = &mut self.nodes[i];
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM: a clean stop (the node saves what it keeps in memory).
    /// Panics if the node has not exited 20 s later, or exits with an error.
    pub fn stop(&mut self, i: usize) {
        let (child, _) = &mut self.nodes[i];
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the node ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "the node exited with {status}");
    }

    pub fn restart(&mut self, i: usize) {
        let node_dir = self.dir.path().join(format!("node-{}", i + 1));
        let seed = self
            .nodes
            .iter()
            .enumerate()
            .find(|(j, _)| *j != i)
            .map(|(_, (_, a))| *a);
        let addr = self.nodes[i].1;
        let mut command = serve_command(&node_dir, i + 1, addr, self.metrics[i], seed);
        if let Some(http) = self.http.get(i) {
            command.args(["--http-listen", &http.to_string()]);
        }
        self.nodes[i].0 = command.spawn().unwrap();
    }

    pub fn client_tls(&self) -> TlsIdentity {
        TlsIdentity::load(&self.dir.path().join("client")).unwrap()
    }

    /// An admin certificate: join, leave and the other cluster changes.
    pub fn admin_tls(&self) -> TlsIdentity {
        TlsIdentity::load(&self.dir.path().join("admin")).unwrap()
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].1
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub async fn client(addr: SocketAddr, tls: &TlsIdentity) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match Client::connect(addr, Some(tls)).await {
            Ok(c) => match c.status().await {
                Ok(_) => return c,
                Err(e) => {
                    // Closed at once: a connection left open counts against
                    // the node's per-certificate cap until its idle timeout.
                    c.close().await;
                    e.to_string()
                }
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            panic!("node {addr} did not come up: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node sees `n` members and a layout whose change has
/// completed, with every partition held everywhere (3 nodes, 3 replicas).
pub async fn settled(clients: &[Client], n: usize) {
    eventually(
        "every node sees the members and a settled layout",
        || async {
            for c in clients {
                let Ok(s) = c.status().await else {
                    return false;
                };
                // Every node holds every partition with 3 nodes or fewer;
                // with more, some (each partition has 3 replicas).
                let held_all = s.partitions_held == 256;
                if s.members_alive != n
                    || s.layout_version != s.layout_completed
                    || s.layout_version == 0
                    || (n <= 3 && !held_all)
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// Waits until every node answers every acknowledged key (read at `r`) and
/// `counter` equals the acknowledged adds.
pub async fn all_hold(
    cluster: &Cluster,
    tls: &TlsIdentity,
    r: u8,
    keys: &[String],
    counter: &[u8],
    adds: i64,
) {
    for node in 0..cluster.nodes.len() {
        let mut c = client(cluster.addr(node), tls).await;
        c.set_quorum(1, r);
        for key in keys {
            eventually(
                "every acknowledged write is readable on every node",
                || async { matches!(c.get(key.as_bytes()).await, Ok(Some(_))) },
            )
            .await;
        }
        eventually("the counter equals the acknowledged adds", || async {
            c.counter(counter).await.ok() == Some(adds)
        })
        .await;
    }
}

/// Polls `check` until it holds, for at most 60 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A settled cluster of `n` nodes and a client to each.
pub async fn started(n: usize) -> (Cluster, Vec<Client>) {
    let cluster = Cluster::start(n);
    let tls = cluster.client_tls();
    let mut clients = Vec::new();
    for i in 0..n {
        clients.push(client(cluster.addr(i), &tls).await);
    }
    settled(&clients, n).await;
    (cluster, clients)
}

/// Writes `keys` keys named `prefix-N` through the first client and waits
/// until every node holds them all.
pub async fn load(clients: &[Client], prefix: &str, keys: u32, value: &[u8]) {
    for i in 0..keys {
        let key = format!("{prefix}-{i:05}");
        clients[0].put(key.as_bytes(), value, None).await.unwrap();
    }
    for c in clients {
        eventually("every node holds every key", || async {
            c.status()
                .await
                .is_ok_and(|s| s.entries_held == u64::from(keys))
        })
        .await;
    }
}

/// Bytes of migration and repair frames a node received, from its metrics.
pub fn data_bytes_received(metrics: SocketAddr) -> f64 {
    let text = scrape(metrics);
    ["migration", "repair"]
        .iter()
        .map(|kind| {
            metric(
                &text,
                &format!("gossipkv_peer_bytes_received_total{{kind=\"{kind}\"}}"),
            )
            .unwrap_or(0.0)
        })
        .sum()
}
