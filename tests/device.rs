//! Device sync (`gossipkv::device`) against a real 3-node cluster over
//! HTTPS with an API token: devices edit offline, concurrently with the
//! cluster and with each other, push (again and again) and pull, and end
//! with the cluster's state: concurrent register edits as siblings on both
//! sides, counters exact, nothing outside the subscription.

mod common;

use common::{started, Cluster, SLOTS};
use gossipkv::client::{Request, Response as NodeResponse};
use gossipkv::device::{Device, DeviceOp};
use gossipkv::Value;

fn tokened(cluster: &Cluster) -> reqwest::Client {
    let ca = std::fs::read(cluster.path().join("client/ca.pem")).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap()
}

async fn token(cluster: &Cluster, prefix: &str) -> String {
    let admin =
        gossipkv::client::Client::connect_admin(cluster.addr(0), Some(&cluster.admin_tls()))
            .await
            .unwrap();
    let response = admin
        .request(&Request::TokenCreate {
            name: format!("devices-{prefix}"),
            prefixes: vec![prefix.as_bytes().to_vec()],
            read: true,
            write: true,
            expires_in_seconds: None,
        })
        .await
        .unwrap();
    let NodeResponse::TokenCreated { secret, .. } = response else {
        panic!("unexpected answer {response:?}");
    };
    secret
}

fn values(device: &Device, key: &str) -> Vec<Vec<u8>> {
    match device.get(key.as_bytes()).unwrap().map(|r| r.value) {
        Some(Value::Register(mut v)) => {
            v.sort();
            v
        }
        other => panic!("{key}: {other:?}"),
    }
}

fn counter(device: &Device, key: &str) -> i64 {
    match device.get(key.as_bytes()).unwrap().map(|r| r.value) {
        Some(Value::Counter(n)) => n,
        other => panic!("{key}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_edit_offline_and_converge_with_the_cluster_through_any_node() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, clients) = started(3).await;
    let secret = token(&cluster, "user/1/").await;
    let http = tokened(&cluster);
    let base = |node: usize| format!("https://{}", cluster.http[node]);
    let dir = tempfile::tempdir().unwrap();

    // The cluster holds the user's keys and others'.
    for i in 0..40 {
        clients[i % 3]
            .put(format!("user/1/k{i}").as_bytes(), b"v0", None)
            .await
            .unwrap();
        clients[0]
            .put(format!("user/2/k{i}").as_bytes(), b"other", None)
            .await
            .unwrap();
    }
    // Each device talks to its own node; the token works on all of them
    // once gossip has carried it.
    let phone = Device::open(
        dir.path().join("phone"),
        &base(0),
        http.clone(),
        Some(secret.clone()),
    )
    .unwrap();
    let laptop = Device::open(
        dir.path().join("laptop"),
        &base(2),
        http.clone(),
        Some(secret.clone()),
    )
    .unwrap();
    assert_ne!(phone.id(), laptop.id());
    let mut seen = Vec::new();
    let pulled = phone
        .pull(b"user/1/", |p| seen.push(p.entries))
        .await
        .unwrap();
    assert_eq!(pulled.entries, 40);
    assert!(
        !seen.is_empty() && seen.windows(2).all(|w| w[0] <= w[1]),
        "{seen:?}"
    );
    common::eventually("the token reaches node 2", || async {
        laptop.pull(b"user/1/", |_| {}).await.is_ok()
    })
    .await;
    assert_eq!(values(&laptop, "user/1/k5"), [b"v0".to_vec()]);
    assert!(
        phone.get(b"user/2/k1").unwrap().is_none(),
        "outside the subscription"
    );

    // Offline: the phone, the laptop and the cluster edit the same keys.
    phone
        .write(DeviceOp::Put {
            key: b"user/1/k1".to_vec(),
            value: b"phone".to_vec(),
        })
        .unwrap();
    phone
        .write(DeviceOp::Put {
            key: b"user/1/k2".to_vec(),
            value: b"phone-draft".to_vec(),
        })
        .unwrap();
    phone
        .write(DeviceOp::Put {
            key: b"user/1/k2".to_vec(),
            value: b"phone-final".to_vec(),
        })
        .unwrap();
    for _ in 0..3 {
        phone
            .write(DeviceOp::CounterAdd {
                key: b"user/1/steps".to_vec(),
                amount: 10,
            })
            .unwrap();
    }
    phone
        .write(DeviceOp::SetAdd {
            key: b"user/1/tags".to_vec(),
            member: b"red".to_vec(),
        })
        .unwrap();
    laptop
        .write(DeviceOp::Put {
            key: b"user/1/k1".to_vec(),
            value: b"laptop".to_vec(),
        })
        .unwrap();
    laptop
        .write(DeviceOp::CounterAdd {
            key: b"user/1/steps".to_vec(),
            amount: 5,
        })
        .unwrap();
    laptop
        .write(DeviceOp::SetAdd {
            key: b"user/1/tags".to_vec(),
            member: b"blue".to_vec(),
        })
        .unwrap();
    clients[1]
        .put(b"user/1/k1", b"cluster", None)
        .await
        .unwrap();
    // Reads on a device show its own writes at once.
    assert_eq!(values(&phone, "user/1/k2"), [b"phone-final".to_vec()]);
    assert_eq!(counter(&phone, "user/1/steps"), 30);
    assert_eq!(
        phone.pending().unwrap(),
        6,
        "the replaced draft left the log"
    );

    // The phone pushes twice (the first answer lost, say), the laptop
    // once; then both pull.
    let first = phone.push().await.unwrap();
    assert_eq!(first.applied, 6, "{first:?}");
    assert_eq!(phone.push().await.unwrap().applied, 6);
    laptop.sync(&[b"user/1/"]).await.unwrap();
    phone.sync(&[b"user/1/"]).await.unwrap();
    laptop.sync(&[b"user/1/"]).await.unwrap();

    let k1 = [b"cluster".to_vec(), b"laptop".to_vec(), b"phone".to_vec()];
    for device in [&phone, &laptop] {
        assert_eq!(
            values(device, "user/1/k1"),
            k1,
            "concurrent edits are siblings"
        );
        assert_eq!(values(device, "user/1/k2"), [b"phone-final".to_vec()]);
        assert_eq!(counter(device, "user/1/steps"), 35, "each add counted once");
        match device.get(b"user/1/tags").unwrap().map(|r| r.value) {
            Some(Value::Set(members)) => assert_eq!(members, [b"blue".to_vec(), b"red".to_vec()]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            device.pending().unwrap(),
            0,
            "every write came back applied"
        );
        assert!(device.get(b"user/2/k1").unwrap().is_none());
    }
    // The cluster agrees.
    let record = clients[2].get(b"user/1/k1").await.unwrap().unwrap();
    let mut cluster_k1 = match record.value {
        Value::Register(v) => v,
        other => panic!("{other:?}"),
    };
    cluster_k1.sort();
    assert_eq!(cluster_k1, k1);
    assert_eq!(clients[0].counter(b"user/1/steps").await.unwrap(), 35);

    // A device resolving the siblings replaces exactly them, everywhere.
    phone
        .write(DeviceOp::Put {
            key: b"user/1/k1".to_vec(),
            value: b"merged".to_vec(),
        })
        .unwrap();
    phone.sync(&[b"user/1/"]).await.unwrap();
    laptop.sync(&[b"user/1/"]).await.unwrap();
    assert_eq!(values(&laptop, "user/1/k1"), [b"merged".to_vec()]);

    // A catch-up moves about the changed entries and no more: 20 changed
    // keys of the subscription among 200 writes elsewhere.
    laptop.pull(b"user/1/", |_| {}).await.unwrap();
    for i in 0..200 {
        clients[i % 3]
            .put(format!("user/2/n{i}").as_bytes(), b"elsewhere", None)
            .await
            .unwrap();
    }
    for i in 20..40 {
        clients[i % 3]
            .put(format!("user/1/k{i}").as_bytes(), &[b'x'; 100], None)
            .await
            .unwrap();
    }
    let caught_up = laptop.pull(b"user/1/", |_| {}).await.unwrap();
    assert_eq!(caught_up.entries, 20, "{caught_up:?}");
    let changed: usize = (20..40)
        .map(|i| {
            laptop
                .entry_bytes(format!("user/1/k{i}").as_bytes())
                .unwrap()
                .unwrap()
        })
        .sum();
    // The constant: one page's cursor (a vector per partition, whatever
    // the data).
    assert_eq!(caught_up.pages, 1);
    assert!(
        (caught_up.bytes as f64) <= 1.5 * changed as f64 + 4096.0,
        "{} bytes received for {changed} bytes of changed entries",
        caught_up.bytes
    );

    // Nothing changed: a pull is one page, and small.
    let idle = laptop.pull(b"user/1/", |_| {}).await.unwrap();
    assert_eq!((idle.pages, idle.entries), (1, 0));
    assert!(idle.bytes < 2048, "{idle:?}");
}

/// A device away longer than the cluster keeps tombstones still ends
/// without the deleted keys: the feed says `reconcile` once it has caught
/// up, and the device lists the prefix and drops what is not listed.
/// (Slow: tombstones are purged every 30 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_away_across_a_tombstone_purge_ends_without_the_deleted_keys() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, clients) = started(3).await;
    let secret = token(&cluster, "user/1/").await;
    let http = tokened(&cluster);
    let base = format!("https://{}", cluster.http[0]);
    let dir = tempfile::tempdir().unwrap();
    for i in 0..10 {
        clients[0]
            .put(format!("user/1/k{i}").as_bytes(), b"v", None)
            .await
            .unwrap();
    }
    let away = dir.path().join("away");
    {
        let device = Device::open(&away, &base, http.clone(), Some(secret.clone())).unwrap();
        assert_eq!(device.pull(b"user/1/", |_| {}).await.unwrap().entries, 10);
    }
    for i in [3, 7] {
        let key = format!("user/1/k{i}");
        let context = clients[0]
            .get(key.as_bytes())
            .await
            .unwrap()
            .unwrap()
            .context;
        let context = gossipkv::CausalContext::from_bytes(&context).unwrap();
        clients[0]
            .delete(key.as_bytes(), Some(&context))
            .await
            .unwrap();
    }
    // Until the cluster has purged the tombstones, a device with that
    // state hears of the deletes as usual; probe with copies of it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(150);
    loop {
        let probe = dir.path().join("probe");
        std::fs::copy(&away, &probe).unwrap();
        let device = Device::open(&probe, &base, http.clone(), Some(secret.clone())).unwrap();
        let report = device.pull(b"user/1/", |_| {}).await.unwrap();
        assert!(device.get(b"user/1/k3").unwrap().is_none());
        assert!(device.get(b"user/1/k7").unwrap().is_none());
        assert!(device.get(b"user/1/k4").unwrap().is_some());
        if report.reconciled {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tombstones were never purged"
        );
        drop(device);
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    // The device itself, back after the purge.
    let device = Device::open(&away, &base, http, Some(secret)).unwrap();
    let report = device.pull(b"user/1/", |_| {}).await.unwrap();
    assert!(report.reconciled, "{report:?}");
    for i in 0..10 {
        let held = device.get(format!("user/1/k{i}").as_bytes()).unwrap();
        assert_eq!(held.is_none(), i == 3 || i == 7, "user/1/k{i}");
    }
    // Reconciled once: the next pull is ordinary.
    assert!(!device.pull(b"user/1/", |_| {}).await.unwrap().reconciled);
}

/// A thousand devices writing through the cluster leave its version
/// vectors and a reader's cursor as large as a few writers make them: the
/// cluster mints the dots of devices' writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_leave_vectors_and_cursors_bounded_by_the_nodes() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, _clients) = started(3).await;
    let secret = token(&cluster, "shared/").await;
    let http = tokened(&cluster);
    let dir = tempfile::tempdir().unwrap();
    let reader = Device::open(
        dir.path().join("reader"),
        &format!("https://{}", cluster.http[0]),
        http.clone(),
        Some(secret.clone()),
    )
    .unwrap();
    let cursor_bytes = |report: &gossipkv::device::PullReport| report.bytes;
    let before = cursor_bytes(&reader.pull(b"shared/", |_| {}).await.unwrap());
    let devices: Vec<std::sync::Arc<Device>> = (0..1000)
        .map(|i| {
            std::sync::Arc::new(
                Device::open(
                    dir.path().join(format!("d{i}")),
                    &format!("https://{}", cluster.http[i % 3]),
                    http.clone(),
                    Some(secret.clone()),
                )
                .unwrap(),
            )
        })
        .collect();
    for (i, device) in devices.iter().enumerate() {
        device
            .write(DeviceOp::CounterAdd {
                key: format!("shared/c{}", i % 10).into_bytes(),
                amount: 1,
            })
            .unwrap();
        device
            .write(DeviceOp::SetAdd {
                key: b"shared/who".to_vec(),
                member: format!("d{i}").into_bytes(),
            })
            .unwrap();
    }
    for chunk in devices.chunks(50) {
        let mut pushes = tokio::task::JoinSet::new();
        for device in chunk {
            let device = device.clone();
            pushes.spawn(async move { device.push().await });
        }
        while let Some(report) = pushes.join_next().await {
            assert_eq!(report.unwrap().unwrap().applied, 2);
        }
    }
    // Every add counted once (pushes are answered at w=1: the reader's
    // node may take a moment to hold them all).
    let count = |c: usize| match reader.get(format!("shared/c{c}").as_bytes()).unwrap() {
        Some(record) => match record.value {
            gossipkv::Value::Counter(n) => n,
            other => panic!("{other:?}"),
        },
        None => 0,
    };
    common::eventually("the reader holds every add", || async {
        reader.pull(b"shared/", |_| {}).await.unwrap();
        (0..10).all(|c| count(c) >= 100)
    })
    .await;
    for c in 0..10 {
        assert_eq!(count(c), 100, "shared/c{c}");
    }
    // Vectors: as many writers as nodes (plus one per unclean restart),
    // not per device.
    let admin =
        gossipkv::client::Client::connect_admin(cluster.addr(0), Some(&cluster.admin_tls()))
            .await
            .unwrap();
    let NodeResponse::Partitions(partitions) = admin.request(&Request::Partitions).await.unwrap()
    else {
        panic!("no partitions");
    };
    for p in &partitions {
        assert!(
            p.version.len() <= 3,
            "partition {} has writers {:?}",
            p.partition,
            p.version
        );
    }
    // A caught-up reader's page is no larger than before the devices came.
    let idle = reader.pull(b"shared/", |_| {}).await.unwrap();
    assert_eq!(idle.entries, 0);
    assert!(
        cursor_bytes(&idle) <= before + 256,
        "an idle page grew from {before} to {} bytes",
        idle.bytes
    );
}
