//! What an attacker holding an ordinary certificate of the cluster can and
//! cannot do, against real nodes on loopback: a client certificate cannot
//! act as a node, a node certificate cannot speak for another node, only an
//! admin certificate changes the cluster, and a node refuses to start under
//! a name or certificate that is not its own.

mod common;

use common::*;
use gossipkv::certs::{self, Role};
use gossipkv::client::{Client, ClientError, ErrorCode, Failure, Request, Response};
use gossipkv::store::{Store, StoreOptions};
use gossipkv::transport::tls::{client_config, TlsIdentity};
use gossipkv::transport::{ALPN_ADMIN, ALPN_PEER};
use gossipkv::{NodeId, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// An entry for `key` holding `value`, written by a store that claims to be
/// node `name`: its first dot in the key's partition is what that node's
/// next real write there will get.
fn forged_entry(name: &str, key: &[u8], value: &[u8]) -> (u16, Vec<u8>) {
    let store =
        Store::open_in_memory(StoreOptions::default().node_id(NodeId::from_name(name))).unwrap();
    store.put(key, value, None).unwrap();
    (
        store.partition_of(key),
        store.entry_bytes(key).unwrap().unwrap(),
    )
}

async fn peer_connection(
    tls: &TlsIdentity,
    addr: SocketAddr,
    alpn: &[u8],
) -> Option<quinn::Connection> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(Some(tls), alpn).unwrap());
    endpoint
        .connect(addr, certs::SERVER_NAME)
        .unwrap()
        .await
        .ok()
}

/// Sends `frame` on a new stream and waits (bounded) for the node to close
/// the connection; its reason.
async fn send_and_await_close(connection: &quinn::Connection, frame: &[u8]) -> String {
    if let Ok(mut stream) = connection.open_uni().await {
        let _ = stream.write_all(frame).await;
        let _ = stream.finish();
    }
    match tokio::time::timeout(Duration::from_secs(20), connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        Ok(other) => format!("{other}"),
        Err(_) => panic!("the node kept a connection that forged a peer message"),
    }
}

/// Every node answers `key` with the register value `value` alone, and
/// every replica holds the same entry.
async fn everywhere_exactly(cluster: &Cluster, tls: &TlsIdentity, key: &[u8], value: &[u8]) {
    for i in 0..cluster.nodes.len() {
        let c = client(cluster.addr(i), tls).await;
        let record = c.get(key).await.unwrap().expect("the key is readable");
        assert_eq!(
            record.value,
            Value::Register(vec![value.to_vec()]),
            "node {} holds another value",
            i + 1
        );
    }
    let admin = Client::connect_admin(cluster.addr(0), Some(tls))
        .await
        .unwrap();
    let Response::Inspect(views) = admin
        .request(&Request::Inspect { key: key.to_vec() })
        .await
        .unwrap()
    else {
        panic!("inspect failed")
    };
    assert_eq!(views.len(), 3);
    assert!(views.iter().all(|v| v.answered));
    assert!(
        views.windows(2).all(|w| w[0].record == w[1].record),
        "replicas differ: {views:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_peer_messages_are_refused_and_replicas_stay_equal() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, clients) = started(3).await;
    let tls = cluster.client_tls();

    // 1. A client certificate on the peer protocol, replaying the issue's
    //    attack: a Replicate claiming node-2's first dot in the key's
    //    partition.
    let key = b"victim";
    let (partition, entry) = forged_entry("node-2", key, b"forged");
    let frame = gossipkv::node::replicate_frame(NodeId::from_name("node-2"), partition, key, entry)
        .unwrap();
    match peer_connection(&tls, cluster.addr(0), ALPN_PEER).await {
        None => {} // refused during the handshake: as good
        Some(connection) => {
            let reason = send_and_await_close(&connection, &frame).await;
            assert!(reason.contains("node certificates only"), "{reason}");
        }
    }

    // 2. A node certificate of the cluster (a node that is not a member)
    //    claiming to be node-2.
    let rogue = cluster.path().join("node-9");
    certs::issue(&cluster.path().join("ca"), "node-9", Role::Node, 30, &rogue).unwrap();
    let rogue = TlsIdentity::load(&rogue).unwrap();
    let connection = peer_connection(&rogue, cluster.addr(0), ALPN_PEER)
        .await
        .expect("a node certificate of the cluster gets in");
    let reason = send_and_await_close(&connection, &frame).await;
    assert!(reason.contains("does not match"), "{reason}");

    // 3. A node certificate naming the node it connects to.
    let own = TlsIdentity::load(&cluster.path().join("node-1").join("tls")).unwrap();
    if let Some(connection) = peer_connection(&own, cluster.addr(0), ALPN_PEER).await {
        let reason = send_and_await_close(&connection, &frame).await;
        assert!(reason.contains("own name"), "{reason}");
    }

    // node-2's real write gets the dot the forgeries claimed; every replica
    // must hold it, and only it.
    clients[1].put(key, b"real", None).await.unwrap();
    eventually("every replica holds the real write", || async {
        for c in &clients {
            match c.get(key).await {
                Ok(Some(r)) if r.value == Value::Register(vec![b"real".to_vec()]) => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    everywhere_exactly(&cluster, &tls, key, b"real").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_certificates_change_the_cluster() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, _clients) = started(1).await;
    let seed: SocketAddr = "127.0.0.1:9".parse().unwrap();

    // A client certificate inspects, and cannot join or leave.
    let client_tls = cluster.client_tls();
    let as_client = Client::connect_admin(cluster.addr(0), Some(&client_tls))
        .await
        .unwrap();
    assert!(matches!(
        as_client.request(&Request::Layout).await.unwrap(),
        Response::Layout(_)
    ));
    for request in [Request::Join { seed }, Request::Leave] {
        match as_client.request(&request).await {
            Err(ClientError::Node(e)) => {
                assert_eq!(e.code, ErrorCode::Forbidden, "{e}");
                assert!(e.message.contains("admin certificate"), "{e}")
            }
            other => panic!("a client certificate ran {request:?}: {other:?}"),
        }
    }
    // Not through the client protocol either.
    let plain = Client::connect(cluster.addr(0), Some(&client_tls))
        .await
        .unwrap();
    assert!(matches!(
        plain.request(&Request::Leave).await,
        Err(ClientError::Node(Failure {
            code: ErrorCode::Forbidden,
            ..
        }))
    ));

    // A node certificate is not an admin one (nor a client one).
    let node_tls = TlsIdentity::load(&cluster.path().join("node-1").join("tls")).unwrap();
    if let Some(connection) = peer_connection(&node_tls, cluster.addr(0), ALPN_ADMIN).await {
        let closed = tokio::time::timeout(Duration::from_secs(20), connection.closed())
            .await
            .expect("the node kept an admin connection from a node certificate");
        assert!(closed.to_string().contains("node certificate"), "{closed}");
    }

    // An admin certificate may: a join through an unreachable seed is
    // accepted as a request (the node answers, not with a refusal).
    let admin = Client::connect_admin(cluster.addr(0), Some(&cluster.admin_tls()))
        .await
        .unwrap();
    if let Err(e) = admin.request(&Request::Join { seed }).await {
        assert!(!e.to_string().contains("admin certificate"), "{e}");
    }
    let status = admin.status().await.unwrap();
    assert!(!status.decommissioned, "nothing left the cluster");
}

/// Runs `gossipkv serve` with `args`, expecting it to exit at once with
/// one line of error that contains `says`; the data dir is not created.
fn refused_start(dir: &Path, tls: &Path, args: &[&str], says: &str) {
    let data = dir.join(format!("data-{}", says.replace(' ', "-")));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gossipkv"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--tls-dir")
        .arg(tls)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(stderr.contains(says), "expected {says:?} in {stderr:?}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!data.exists(), "a refused start created {}", data.display());
}

#[test]
fn a_node_starts_only_under_its_own_certified_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::init_ca(&ca, "test").unwrap();
    let node = dir.path().join("node-1");
    certs::issue(&ca, "node-1", Role::Node, 30, &node).unwrap();
    let client = dir.path().join("client");
    certs::issue(&ca, "client", Role::Client, 30, &client).unwrap();

    refused_start(
        dir.path(),
        &node,
        &["--node-id", "node-2"],
        "does not match",
    );
    refused_start(dir.path(), &client, &[], "not a node certificate");
    refused_start(dir.path(), &node, &["--node-id", "node 1"], "node_id");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = node.join(certs::KEY);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        refused_start(dir.path(), &node, &[], "chmod 600");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    // A certificate without a gossipkv role (another tool's, or an older
    // release's) is refused by name.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["node-1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::copy(node.join(certs::CA_CERT), foreign.join(certs::CA_CERT)).unwrap();
    std::fs::write(foreign.join(certs::CERT), cert.pem()).unwrap();
    std::fs::write(foreign.join(certs::KEY), key.serialize_pem()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            foreign.join(certs::KEY),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    refused_start(dir.path(), &foreign, &[], "no gossipkv role");
}

#[test]
fn issued_certificates_carry_role_name_and_a_bounded_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::init_ca(&ca, "test").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (role, name, days) in [
        (Role::Node, "eu-west-a-3", 365),
        (Role::Client, "app-server", 30),
        (Role::Admin, "ops", 7),
    ] {
        let out = dir.path().join(name);
        certs::issue(&ca, name, role, days, &out).unwrap();
        let identity = TlsIdentity::load(&out).unwrap().identity().clone();
        assert_eq!((identity.role, identity.name.as_str()), (role, name));
        let left = identity.not_after - now;
        assert!(
            (i64::from(days) * 86_400 - 60..=i64::from(days) * 86_400 + 60).contains(&left),
            "{name}: expires in {left} s"
        );
    }
    let err = certs::issue(&ca, "x", Role::Node, 0, &dir.path().join("x")).unwrap_err();
    assert!(err.to_string().contains("lifetime"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_under_a_live_nodes_name_is_noticed_and_refused() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, clients) = started(2).await;
    // A copy of node-1's certificate, run elsewhere with a fresh store.
    let twin = cluster.path().join("twin");
    let log = cluster.path().join("twin.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gossipkv"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(twin.join("data"))
        .arg("--tls-dir")
        .arg(cluster.path().join("node-1").join("tls"))
        .args(["--seeds", &cluster.addr(1).to_string()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    eventually("the twin is told another node holds its name", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("claims this node's name")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    // The real node-1 was never replaced: both nodes still see two members
    // and serve writes.
    for c in &clients {
        assert_eq!(c.status().await.unwrap().members_alive, 2);
    }
    clients[0].put(b"after-twin", b"v", None).await.unwrap();
}
