//! A real network partition: three nodes in network namespaces this test
//! creates (`ip netns`, veth, a bridge), split 2/1 by taking node 3's bridge
//! port down, written on both sides, healed; everything converges with no
//! acknowledged write lost. Needs root and iproute2; without them the test
//! says so and skips. All addresses belong to the test's own namespaces.

use gossipkv::certs;
use gossipkv::client::Client;
use gossipkv::transport::tls::TlsIdentity;
use gossipkv::Value;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces and the root-side interfaces; removed on drop, nodes first.
struct Net {
    tag: String,
    nodes: Vec<Child>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for child in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in ["b", "n1", "n2", "n3"] {
            let _ = ip(&["netns", "del", &format!("{}{ns}", self.tag)]);
        }
        // Deleting a namespace deletes its veth ends and their peers.
        for dev in ["c", "d"] {
            let _ = ip(&["link", "del", &format!("{}{dev}", self.tag)]);
        }
    }
}

fn build(tag: &str, subnet: u8) -> Result<(), String> {
    let ns = |n: &str| format!("{tag}{n}");
    for n in ["b", "n1", "n2", "n3"] {
        ip(&["netns", "add", &ns(n)])?;
        ip(&["-n", &ns(n), "link", "set", "lo", "up"])?;
    }
    ip(&["-n", &ns("b"), "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ns("b"), "link", "set", "br0", "up"])?;
    for i in 1..=3 {
        let (host, port) = (format!("{tag}a{i}"), format!("{tag}p{i}"));
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &port])?;
        ip(&["link", "set", &host, "netns", &ns(&format!("n{i}"))])?;
        ip(&["link", "set", &port, "netns", &ns("b")])?;
        ip(&["-n", &ns("b"), "link", "set", &port, "master", "br0", "up"])?;
        let node = ns(&format!("n{i}"));
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("10.203.{subnet}.{i}/24"),
            "dev",
            &host,
        ])?;
        ip(&["-n", &node, "link", "set", &host, "up"])?;
    }
    // The test's own interface on the bridge, to reach nodes 1 and 2.
    let (client, port) = (format!("{tag}c"), format!("{tag}pc"));
    ip(&[
        "link", "add", &client, "type", "veth", "peer", "name", &port,
    ])?;
    ip(&["link", "set", &port, "netns", &ns("b")])?;
    ip(&["-n", &ns("b"), "link", "set", &port, "master", "br0", "up"])?;
    ip(&[
        "addr",
        "add",
        &format!("10.203.{subnet}.100/24"),
        "dev",
        &client,
    ])?;
    ip(&["link", "set", &client, "up"])?;
    // A direct link to node 3, so the test can write on its side of the split.
    let (direct, far) = (format!("{tag}d"), format!("{tag}e"));
    ip(&["link", "add", &direct, "type", "veth", "peer", "name", &far])?;
    ip(&["link", "set", &far, "netns", &ns("n3")])?;
    ip(&[
        "-n",
        &ns("n3"),
        "addr",
        "add",
        &format!("10.204.{subnet}.3/24"),
        "dev",
        &far,
    ])?;
    ip(&["-n", &ns("n3"), "link", "set", &far, "up"])?;
    ip(&[
        "addr",
        "add",
        &format!("10.204.{subnet}.100/24"),
        "dev",
        &direct,
    ])?;
    ip(&["link", "set", &direct, "up"])?;
    Ok(())
}

/// Takes node 3's port on the bridge down (the split) or up (the heal).
fn set_node3_port(tag: &str, state: &str) {
    ip(&[
        "-n",
        &format!("{tag}b"),
        "link",
        "set",
        &format!("{tag}p3"),
        state,
    ])
    .unwrap();
}

async fn connect(addr: SocketAddr, tls: &TlsIdentity) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = Client::connect(addr, Some(tls)).await {
            if c.status().await.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "node {addr} did not answer");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_one_split_heals_and_converges_without_losing_writes() {
    let id = std::process::id() % 10_000;
    let tag = format!("g{id}");
    let subnet = (id % 200 + 20) as u8;
    let mut net = Net {
        tag: tag.clone(),
        nodes: Vec::new(),
    };
    if let Err(reason) = build(&tag, subnet) {
        eprintln!("SKIPPED netns partition test: cannot build network namespaces ({reason}); it needs root and iproute2");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::init_ca(&ca, "netns").unwrap();
    certs::issue(
        &ca,
        "client",
        certs::Role::Admin,
        30,
        &dir.path().join("client"),
    )
    .unwrap();
    let tls = TlsIdentity::load(&dir.path().join("client")).unwrap();
    for i in 1..=3u8 {
        let node_dir = dir.path().join(format!("node-{i}"));
        certs::issue(
            &ca,
            &format!("node-{i}"),
            certs::Role::Node,
            30,
            &node_dir.join("tls"),
        )
        .unwrap();
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &format!("{tag}n{i}"),
                env!("CARGO_BIN_EXE_gossipkv"),
                "serve",
            ])
            .args([
                "--node-id",
                &format!("node-{i}"),
                "--listen",
                "0.0.0.0:7000",
            ])
            .args(["--advertise", &format!("10.203.{subnet}.{i}:7000")])
            .arg("--data-dir")
            .arg(node_dir.join("data"))
            .arg("--tls-dir")
            .arg(node_dir.join("tls"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if i > 1 {
            command.args(["--seeds", &format!("10.203.{subnet}.1:7000")]);
        }
        net.nodes.push(command.spawn().unwrap());
    }
    let left = connect(format!("10.203.{subnet}.1:7000").parse().unwrap(), &tls).await;
    let right = connect(format!("10.204.{subnet}.3:7000").parse().unwrap(), &tls).await;
    eventually(
        "three members and a settled layout",
        Duration::from_secs(60),
        || async {
            for c in [&left, &right] {
                let Ok(s) = c.status().await else {
                    return false;
                };
                if s.members_alive != 3
                    || s.layout_version != s.layout_completed
                    || s.partitions_held != 256
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
    left.put(b"before", b"split", None).await.unwrap();
    eventually(
        "the first write reaches node 3",
        Duration::from_secs(30),
        || async { matches!(right.get(b"before").await, Ok(Some(_))) },
    )
    .await;

    // Split 2/1: node 3's port on the bridge goes down.
    set_node3_port(&tag, "down");
    left.put(b"doc", b"left side", None).await.unwrap();
    right.put(b"doc", b"right side", None).await.unwrap();
    left.counter_add(b"count", 5).await.unwrap();
    right.counter_add(b"count", 7).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // the split lasts a while
    assert_eq!(
        left.counter(b"count").await.unwrap(),
        5,
        "the split did not cut node 3 off"
    );

    set_node3_port(&tag, "up");
    let both = Value::Register(vec![b"left side".to_vec(), b"right side".to_vec()]);
    for c in [&left, &right] {
        eventually(
            "both sides' writes are siblings everywhere",
            Duration::from_secs(90),
            || async { matches!(c.get(b"doc").await, Ok(Some(r)) if r.value == both) },
        )
        .await;
        eventually(
            "the counter sums both sides",
            Duration::from_secs(90),
            || async { c.counter(b"count").await.ok() == Some(12) },
        )
        .await;
    }
}
