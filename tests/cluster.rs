//! Real `gossipkv serve` processes on loopback, talking QUIC with mutual TLS.

mod common;

use common::*;
use gossipkv::certs;
use gossipkv::client::Client;
use gossipkv::transport::tls::{client_config, TlsIdentity};
use gossipkv::transport::ALPN_PEER;
use gossipkv::Value;
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_node_is_read_through_the_others_and_concurrent_writes_are_siblings() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, clients) = started(3).await;

    clients[0].put(b"greeting", b"hello", None).await.unwrap();
    for c in &clients[1..] {
        eventually("the write reaches every node", || async {
            matches!(c.get(b"greeting").await, Ok(Some(r)) if r.value == Value::Register(vec![b"hello".to_vec()]))
        })
        .await;
    }

    // Two nodes write the same key, each on top of the same state and
    // neither seeing the other's write (both name the context of that
    // state, so however the two race, neither supersedes the other).
    clients[0].put(b"doc", b"draft", None).await.unwrap();
    for c in &clients {
        eventually("the draft reaches every node", || async {
            matches!(c.get(b"doc").await, Ok(Some(r)) if r.value == Value::Register(vec![b"draft".to_vec()]))
        })
        .await;
    }
    let seen = clients[2].get(b"doc").await.unwrap().unwrap().context;
    let seen = gossipkv::CausalContext::from_bytes(&seen).unwrap();
    let (a, b) = tokio::join!(
        clients[0].put(b"doc", b"from node 1", Some(&seen)),
        clients[1].put(b"doc", b"from node 2", Some(&seen))
    );
    a.unwrap();
    b.unwrap();
    let both = Value::Register(vec![b"from node 1".to_vec(), b"from node 2".to_vec()]);
    for c in &clients {
        eventually("both concurrent writes are siblings everywhere", || async {
            matches!(c.get(b"doc").await, Ok(Some(r)) if r.value == both)
        })
        .await;
    }

    let text = scrape(cluster.metrics[0]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        metric(&text, "gossipkv_client_requests_total").unwrap() > 0.0,
        "{text}"
    );
    assert!(
        metric(&text, "gossipkv_peer_bytes_received_total{kind=\"digest\"}").unwrap() > 0.0,
        "{text}"
    );
    assert_eq!(metric(&text, "gossipkv_members_alive"), Some(3.0));
    let info = format!(
        "gossipkv_node_info{{name=\"node-1\",id=\"{}\"}}",
        gossipkv::NodeId::from_name("node-1")
    );
    assert_eq!(metric(&text, &info), Some(1.0), "{text}");
    assert!(metric(&text, "gossipkv_entries_held").is_some(), "{text}");
    // A healthy cluster's peers keep up: nothing dropped on any lane.
    for lane in ["membership", "requests", "sync"] {
        let name = format!("gossipkv_peer_queue_drops_total{{lane=\"{lane}\"}}");
        assert_eq!(metric(&text, &name), Some(0.0), "{text}");
    }
    assert!(
        metric(&text, "gossipkv_client_request_duration_seconds_count").unwrap() > 0.0,
        "{text}"
    );

    clients[2].counter_add(b"visits", 5).await.unwrap();
    clients[0].counter_add(b"visits", -2).await.unwrap();
    for c in &clients {
        eventually("counters sum exactly", || async {
            c.counter(b"visits").await.ok() == Some(3)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_garbage_are_refused_without_harming_the_node() {
    let _slot = SLOTS.acquire().await.unwrap();
    let cluster = Cluster::start(1);
    let tls = cluster.client_tls();
    let good = client(cluster.addr(0), &tls).await;

    // A client certificate from another CA, and no certificate at all.
    let other = cluster.path().join("other-ca");
    certs::init_ca(&other, "other").unwrap();
    certs::issue(
        &other,
        "intruder",
        certs::Role::Client,
        30,
        &cluster.path().join("intruder"),
    )
    .unwrap();
    let intruder = TlsIdentity::load(&cluster.path().join("intruder")).unwrap();
    for identity in [Some(&intruder), None] {
        let refused = match Client::connect(cluster.addr(0), identity).await {
            Ok(c) => c.status().await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a client without a cluster certificate was served");
    }

    // Garbage on the peer ALPN, from a legitimate node certificate.
    let node_dir = cluster.path().join("node-9");
    certs::issue(
        &cluster.path().join("ca"),
        "node-9",
        certs::Role::Node,
        30,
        &node_dir,
    )
    .unwrap();
    let node_tls = TlsIdentity::load(&node_dir).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(Some(&node_tls), ALPN_PEER).unwrap());
    let connection = endpoint
        .connect(cluster.addr(0), certs::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    for garbage in [
        &b"not a frame at all"[..],
        b"GKV\x01\xff\xff\xff\xff",
        b"GKV\x01\0\0\0\x05junk!",
    ] {
        let mut stream = connection.open_uni().await.unwrap();
        let _ = stream.write_all(garbage).await;
        let _ = stream.finish();
    }
    // Garbage on the client ALPN.
    let (mut send, mut recv) = good_connection_bi(&cluster, &tls).await;
    send.write_all(b"GKV\x01\0\0\0\x03xyz").await.unwrap();
    send.finish().unwrap();
    let answer: Option<gossipkv::client::Response> =
        gossipkv::transport::frame::read(&mut recv).await.unwrap();
    assert!(
        matches!(answer, Some(gossipkv::client::Response::Error(f)) if f.code == gossipkv::client::ErrorCode::BadRequest && f.message.contains("bad request"))
    );

    // The node still serves everyone else.
    good.put(b"still", b"here", None).await.unwrap();
    assert!(good.get(b"still").await.unwrap().is_some());
}

async fn good_connection_bi(
    cluster: &Cluster,
    tls: &TlsIdentity,
) -> (quinn::SendStream, quinn::RecvStream) {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(
        client_config(Some(tls), gossipkv::transport::ALPN_CLIENT).unwrap(),
    );
    let connection = endpoint
        .connect(cluster.addr(0), certs::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    // Keep the endpoint alive with the streams.
    Box::leak(Box::new(endpoint));
    connection.open_bi().await.unwrap()
}

#[test]
fn bad_flags_and_config_files_fail_with_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "data_dir = \"d\"\ninsecure = true\nlisten = \"not an address\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gossipkv"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_gossipkv"))
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls_dir"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_minus_nine_and_counters_sum_exactly() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, _clients) = started(3).await;
    let tls = cluster.client_tls();
    let mut writer = client(cluster.addr(1), &tls).await;
    writer.set_timeout(Duration::from_secs(2));
    // A bounded writer; node 2 dies under it after 60 acknowledgements.
    let mut acknowledged = Vec::new();
    let mut adds = 0i64;
    for i in 0..200u32 {
        if i == 60 {
            cluster.kill(1);
        }
        let key = format!("key-{i:04}");
        match writer
            .put(key.as_bytes(), format!("value-{i}").as_bytes(), None)
            .await
        {
            Ok(_) => acknowledged.push(key),
            Err(_) => break,
        }
        if writer.counter_add(b"acks", 1).await.is_ok() {
            adds += 1;
        }
    }
    assert!(
        acknowledged.len() >= 60,
        "the writer stopped before the kill"
    );
    cluster.restart(1);
    all_hold(&cluster, &tls, 1, &acknowledged, b"acks", adds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_at_w2_stay_available_and_survive_when_a_replica_is_killed() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, _clients) = started(3).await;
    let tls = cluster.client_tls();
    let mut writer = client(cluster.addr(0), &tls).await;
    writer.set_quorum(2, 1);
    writer.set_timeout(Duration::from_secs(8));
    let mut acknowledged = Vec::new();
    let mut adds = 0i64;
    for i in 0..120u32 {
        if i == 40 {
            cluster.kill(1);
        }
        let key = format!("w2-{i:04}");
        if writer.put(key.as_bytes(), b"v", None).await.is_ok() {
            acknowledged.push(key);
        }
        if writer.counter_add(b"w2-adds", 1).await.is_ok() {
            adds += 1;
        }
    }
    // Two replicas remain: W=2 keeps being met.
    assert!(
        acknowledged.len() >= 110,
        "only {} of 120 writes met W=2 with one replica down",
        acknowledged.len()
    );
    cluster.restart(1);
    all_hold(&cluster, &tls, 2, &acknowledged, b"w2-adds", adds).await;
    // A quorum larger than the replica count is a clear error.
    let mut greedy = client(cluster.addr(0), &tls).await;
    greedy.set_quorum(4, 1);
    let err = greedy.put(b"k", b"v", None).await.unwrap_err().to_string();
    assert!(err.contains("w=4 exceeds the 3 replicas"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_receives_only_its_share() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, mut clients) = started(3).await;
    let tls = cluster.client_tls();
    let keys = 1_500u32;
    load(&clients, "join", keys, &[7; 64]).await;
    cluster.add_node();
    let newcomer = client(cluster.addr(3), &tls).await;
    clients.push(newcomer);
    eventually(
        "four members, the layout change complete, partitions handed off",
        || async {
            for c in &clients {
                let Ok(s) = c.status().await else {
                    return false;
                };
                if s.members_alive != 4
                    || s.layout_version != s.layout_completed
                    || s.partitions_held != 192
                    || s.migrations_in_flight > 0
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let status = clients[3].status().await.unwrap();
    // Migration progress as kvctl shows it: every gained partition done.
    let admin = Client::connect_admin(cluster.addr(3), Some(&tls))
        .await
        .unwrap();
    let gossipkv::client::Response::Migrations(progress) = admin
        .request(&gossipkv::client::Request::Migrations)
        .await
        .unwrap()
    else {
        panic!("migrations")
    };
    assert_eq!((progress.total, progress.done), (192, 192), "{progress:?}");
    assert!(
        progress.entries > 0 && progress.in_flight.is_empty(),
        "{progress:?}"
    );
    let received = data_bytes_received(cluster.metrics[3]);
    let share = status.bytes_held as f64;
    println!(
        "join: received {received} bytes for a share of {share} ({:.3})",
        received / share
    );
    assert!(
        status.entries_held > 0 && status.entries_held < u64::from(keys),
        "{status:?}"
    );
    // Framing and the version vectors of each stream add a little; a full
    // copy of the data set would be four thirds of the share.
    assert!(
        received <= 1.25 * share,
        "received {received} bytes for a share of {share}"
    );
    assert!(
        received >= 0.9 * share,
        "received {received} bytes for a share of {share}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_show_members_layout_partitions_and_a_key_on_each_replica() {
    let _slot = SLOTS.acquire().await.unwrap();
    use gossipkv::client::{Request, Response};
    let (cluster, clients) = started(3).await;
    let tls = cluster.client_tls();
    clients[0].put(b"shown", b"everywhere", None).await.unwrap();
    let admin = Client::connect_admin(cluster.addr(1), Some(&tls))
        .await
        .unwrap();

    // Metadata spreads by gossip: wait until node 2 knows everyone's.
    eventually(
        "members with their state, capacity and partitions",
        || async {
            let Ok(Response::ClusterMembers(members)) =
                admin.request(&Request::ClusterMembers).await
            else {
                return false;
            };
            members.len() == 3
                && members.iter().filter(|m| m.state == "alive").count() == 2
                && members
                    .iter()
                    .all(|m| m.partitions_held == 256 && m.capacity == Some(100))
        },
    )
    .await;

    let Response::Layout(layout) = admin.request(&Request::Layout).await.unwrap() else {
        panic!("layout")
    };
    assert_eq!(layout.replicas.len(), 256);
    assert!(layout.replicas.iter().all(|r| r.len() == 3));
    assert!(layout.pending.is_empty() && layout.version == layout.completed);

    let Response::Partitions(partitions) = admin.request(&Request::Partitions).await.unwrap()
    else {
        panic!("partitions")
    };
    assert_eq!(partitions.len(), 256);

    eventually("every replica agrees on the key", || async {
        match admin
            .request(&Request::Inspect {
                key: b"shown".to_vec(),
            })
            .await
        {
            Ok(Response::Inspect(views)) => {
                views.len() == 3
                    && views.iter().all(|v| {
                        v.answered
                            && v.record.as_ref().map(|r| &r.value)
                                == Some(&Value::Register(vec![b"everywhere".to_vec()]))
                    })
            }
            _ => false,
        }
    })
    .await;

    // Admin requests are refused on the client protocol.
    let err = clients[0]
        .request(&Request::Layout)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("admin protocol"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_downtime_receives_only_what_changed() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, clients) = started(3).await;
    let tls = cluster.client_tls();
    let keys = 1_500u32;
    load(&clients, "r", keys, &[3; 64]).await;
    cluster.kill(2);
    // 1% of the keys change while node 3 is away.
    for i in (0..keys).step_by(100) {
        clients[0]
            .put(format!("r-{i:05}").as_bytes(), &[4; 64], None)
            .await
            .unwrap();
    }
    cluster.restart(2);
    let back = client(cluster.addr(2), &tls).await;
    let changed = format!("r-{:05}", 100);
    eventually("the returning node has the changes", || async {
        matches!(back.get(changed.as_bytes()).await, Ok(Some(r)) if r.value == Value::Register(vec![vec![4; 64]]))
            && back.status().await.is_ok_and(|s| s.entries_held == u64::from(keys))
    })
    .await;
    // The restarted process's counters start at zero: all it received.
    let received = data_bytes_received(cluster.metrics[2]);
    let share = back.status().await.unwrap().bytes_held as f64;
    println!(
        "rejoin: received {received} bytes, {:.3} of a full copy ({share})",
        received / share
    );
    assert!(
        received <= 0.1 * share,
        "a rejoin moved {received} bytes of a {share}-byte share"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_node_cleanly_keeping_its_writer_and_kill_minus_nine_takes_a_new_one() {
    let _slot = SLOTS.acquire().await.unwrap();
    let mut cluster = Cluster::start(1);
    let tls = cluster.client_tls();
    let c = client(cluster.addr(0), &tls).await;
    c.put(b"kept", b"across a restart", None).await.unwrap();
    let pid = cluster.nodes[0].0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = cluster.nodes[0].0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the node ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "the node exited with {status}");
    cluster.restart(0);
    let c = client(cluster.addr(0), &tls).await;
    let record = c
        .get(b"kept")
        .await
        .unwrap()
        .expect("data kept across a restart");
    assert_eq!(
        record.value,
        Value::Register(vec![b"across a restart".to_vec()])
    );
    // A clean stop keeps the writer: new writes carry the same origin.
    let before = writers(&cluster).await;
    assert_eq!(before.len(), 1, "one writer so far: {before:?}");
    c.put(b"after a clean stop", b"v", None).await.unwrap();
    assert_eq!(writers(&cluster).await, before);
    // kill -9 after writes went out before their flush: the restarted
    // node writes under a new writer id, and keeps what it had.
    cluster.kill(0);
    cluster.restart(0);
    let c = client(cluster.addr(0), &tls).await;
    c.put(b"after kill -9", b"v", None).await.unwrap();
    let after = writers(&cluster).await;
    assert!(
        after.len() == 2 && after.is_superset(&before),
        "a new writer beside the old one: {after:?}"
    );
    for key in [&b"kept"[..], b"after a clean stop", b"after kill -9"] {
        assert!(c.get(key).await.unwrap().is_some(), "{key:?} kept");
    }
}

/// The writers named in a one-node cluster's partition vectors.
async fn writers(cluster: &Cluster) -> std::collections::BTreeSet<String> {
    let admin = Client::connect_admin(cluster.addr(0), Some(&cluster.admin_tls()))
        .await
        .unwrap();
    use gossipkv::client::{Request, Response};
    let Response::Partitions(partitions) = admin.request(&Request::Partitions).await.unwrap()
    else {
        panic!("partitions")
    };
    admin.close().await;
    partitions
        .into_iter()
        .flat_map(|p| p.version.into_iter().map(|(writer, _, _)| writer))
        .collect()
}

/// A node killed and restarted at once, before its peers noticed it was
/// gone: peers still hold connections to the dead process. The restarted
/// node answers their packets with stateless resets (its reset key is kept
/// in the data dir), so they dial afresh and a write needing every replica
/// succeeds again. Prints how long that took (`restart_rejoin_seconds`);
/// the figure in the issue 8 note comes from this line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_at_once_is_talking_to_its_peers_again() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, mut clients) = started(3).await;
    clients[0].set_quorum(3, 1);
    clients[0].put(b"before", b"1", None).await.unwrap();
    cluster.kill(2);
    cluster.restart(2);
    let began = Instant::now();
    let writer = &clients[0];
    eventually("a write at w=3 through node 1 succeeds", || async {
        writer.put(b"after", b"2", None).await.is_ok()
    })
    .await;
    println!(
        "metric: restart_rejoin_seconds {:.1}",
        began.elapsed().as_secs_f64()
    );
}

/// The other timing of a kill: the node stays dead until its peers have
/// noticed (suspected or declared it down), then restarts. Its new
/// incarnation must replace what they remember of the old one, so a write
/// that needs all three replicas succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_its_peers_noticed_is_talking_to_them_again() {
    let _slot = SLOTS.acquire().await.unwrap();
    use gossipkv::client::{Request, Response};
    let (mut cluster, mut clients) = started(3).await;
    clients[0].set_quorum(3, 1);
    clients[0].put(b"before", b"1", None).await.unwrap();
    let tls = cluster.client_tls();
    let admin = Client::connect_admin(cluster.addr(0), Some(&tls))
        .await
        .unwrap();
    let dead = cluster.addr(2).to_string();
    cluster.kill(2);
    eventually("node 1 no longer counts node 3 alive", || async {
        let Ok(Response::ClusterMembers(members)) = admin.request(&Request::ClusterMembers).await
        else {
            return false;
        };
        members.iter().any(|m| m.addr == dead && m.state != "alive")
    })
    .await;
    cluster.restart(2);
    let began = Instant::now();
    let writer = &clients[0];
    eventually("a write at w=3 through node 1 succeeds", || async {
        writer.put(b"after", b"2", None).await.is_ok()
    })
    .await;
    println!(
        "metric: restart_after_suspicion_rejoin_seconds {:.1}",
        began.elapsed().as_secs_f64()
    );
}

/// A cluster forming with `--expect-nodes 3`: before the others are up the
/// first node refuses keyed requests with a clear error (it has no layout,
/// and must not serve from a one-replica one); once all three are up the
/// very first layout places every partition on all three (version 1: no
/// smaller layout came before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forming_cluster_waits_for_its_expected_nodes_before_the_first_layout() {
    let _slot = SLOTS.acquire().await.unwrap();
    let mut forming = Cluster::forming(3);
    let tls = forming.client_tls();
    let first = client(forming.addr(0), &tls).await;
    let refused = first.put(b"early", b"1", None).await;
    let message = format!("{refused:?}");
    assert!(
        message.contains("no layout yet"),
        "a write before the first layout: {message}"
    );
    assert_eq!(first.status().await.unwrap().layout_version, 0);
    forming.add_node();
    forming.add_node();
    let mut clients = vec![first];
    for i in 1..3 {
        clients.push(client(forming.addr(i), &tls).await);
    }
    settled(&clients, 3).await;
    for c in &clients {
        assert_eq!(c.status().await.unwrap().layout_version, 1);
    }
    let mut w3 = client(forming.addr(0), &tls).await;
    w3.set_quorum(3, 3);
    w3.put(b"now", b"1", None).await.unwrap();
}
