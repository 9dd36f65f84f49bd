//! Certificate rotation and revocation on running clusters (real
//! processes on loopback): a node certificate replaced and reloaded with
//! SIGHUP is used for new connections and the cluster keeps replicating;
//! a revoked client is refused and its open connections closed while other
//! clients work; a revoked node cannot rejoin, and clients holding the CRL
//! refuse it; an expired certificate is refused and kvctl says so.

mod common;

use common::{eventually, Cluster};
use gossipkv::certs::{self, RevokeTarget, Role};
use gossipkv::client::Client;
use gossipkv::transport::tls::{client_config, refusal, CertProblem, Refusal, TlsIdentity};
use gossipkv::transport::{frame, ALPN_CLIENT, ALPN_PEER};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// An HTTPS client presenting the certificate in `dir`, trusting the CA.
fn https(cluster: &Cluster, dir: &Path) -> reqwest::Client {
    let ca = std::fs::read(cluster.path().join("client/ca.pem")).unwrap();
    let mut pem = std::fs::read(dir.join("cert.pem")).unwrap();
    pem.extend(std::fs::read(dir.join("key.pem")).unwrap());
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

/// Asks node `i` to reload its TLS directory.
fn hangup(cluster: &Cluster, i: usize) {
    let pid = cluster.nodes[i].0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -HUP {pid} failed");
}

/// Copies the CA's crl.pem into node `i`'s TLS directory and reloads it.
fn distribute_crl(cluster: &Cluster, i: usize) {
    let from = cluster.path().join("ca").join(certs::CRL);
    let to = cluster
        .path()
        .join(format!("node-{}", i + 1))
        .join("tls")
        .join(certs::CRL);
    std::fs::copy(from, to).unwrap();
    hangup(cluster, i);
}

/// kvctl's exit success, stdout and stderr.
fn kvctl(addr: SocketAddr, tls_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(["--node", &addr.to_string()])
        .arg("--tls-dir")
        .arg(tls_dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The error a fresh connection with `tls` gets on its first request to
/// `addr`, or `None` if it is served.
async fn refused(addr: SocketAddr, tls: &TlsIdentity) -> Option<String> {
    match Client::connect(addr, Some(tls)).await {
        Err(e) => Some(e.to_string()),
        Ok(client) => client.status().await.err().map(|e| e.to_string()),
    }
}

/// The certificate node `addr` presents to a new connection.
async fn presented(addr: SocketAddr, tls: &TlsIdentity) -> Vec<u8> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(Some(tls), ALPN_CLIENT).unwrap());
    let connection = endpoint
        .connect(addr, certs::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let chain = connection
        .peer_identity()
        .unwrap()
        .downcast::<Vec<CertificateDer<'static>>>()
        .unwrap();
    chain[0].to_vec()
}

fn cert_der(dir: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(dir.join(certs::CERT))
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_node_certificate_is_used_after_sighup_and_the_cluster_replicates() {
    let _slot = common::SLOTS.acquire().await.unwrap();
    let (mut cluster, clients) = common::started(3).await;
    let tls = cluster.client_tls();
    let before = clients[1].status().await.unwrap();
    // The test cluster's certificates are issued for 30 days.
    assert!(
        matches!(before.cert_expires_in_days, Some(29 | 30)),
        "{before:?}"
    );
    let node_tls = cluster.path().join("node-2").join("tls");
    let old = cert_der(&node_tls);
    assert_eq!(presented(cluster.addr(1), &tls).await, old);

    // Same name, new key, another lifetime (so the new one is recognisable).
    certs::issue(
        &cluster.path().join("ca"),
        "node-2",
        Role::Node,
        10,
        &node_tls,
    )
    .unwrap();
    let new = cert_der(&node_tls);
    assert_ne!(new, old);
    hangup(&cluster, 1);
    eventually("node-2 reports the new certificate's expiry", || async {
        clients[1]
            .status()
            .await
            .is_ok_and(|s| matches!(s.cert_expires_in_days, Some(9 | 10)))
    })
    .await;
    assert_eq!(
        presented(cluster.addr(1), &tls).await,
        new,
        "new handshakes do not present the new certificate"
    );
    let (ok, out, err) = kvctl(cluster.addr(1), &cluster.path().join("client"), &["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("certificate expires")
            && (out.contains("in 9 days") || out.contains("in 10 days")),
        "{out}"
    );

    // Restart node-1: it dials node-2 afresh (checking node-2's new
    // certificate), and node-2 re-dials it (presenting the new one). A
    // write every replica acknowledges needs both directions.
    cluster.kill(0);
    cluster.restart(0);
    let mut writer = common::client(cluster.addr(0), &tls).await;
    writer.set_quorum(3, 1);
    eventually(
        "a write acknowledged by all 3 replicas succeeds",
        || async { writer.put(b"rotated", b"yes", None).await.is_ok() },
    )
    .await;
    let record = clients[1].get(b"rotated").await.unwrap();
    assert!(record.is_some(), "node-2 does not hold the write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_and_its_connections_closed() {
    let _slot = common::SLOTS.acquire().await.unwrap();
    let (cluster, clients) = common::started(3).await;
    let ca = cluster.path().join("ca");
    let other_dir = cluster.path().join("client-2");
    certs::issue(&ca, "client-2", Role::Client, 30, &other_dir).unwrap();
    let other = TlsIdentity::load(&other_dir).unwrap();
    let revoked = cluster.client_tls();

    let done = certs::revoke(
        &ca,
        &RevokeTarget::Cert(cluster.path().join("client").join(certs::CERT)),
    )
    .unwrap();
    assert_eq!(done.total, 1);
    for i in 0..3 {
        distribute_crl(&cluster, i);
    }

    // `clients` hold connections made with the revoked certificate.
    for (i, c) in clients.iter().enumerate() {
        eventually("the revoked client's open connection is closed", || async {
            c.status().await.is_err()
        })
        .await;
        // A closed connection keeps its close reason.
        let last = c.status().await.unwrap_err().to_string();
        assert!(last.contains("revoked"), "node {i}: {last}");
    }
    for i in 0..3 {
        let err = refused(cluster.addr(i), &revoked)
            .await
            .expect("a revoked client was served");
        assert!(
            err.contains("refused this client's certificate") && err.contains("revoked"),
            "{err}"
        );
        let c = common::client(cluster.addr(i), &other).await;
        c.put(format!("k{i}").as_bytes(), b"v", None).await.unwrap();
    }
    // The HTTPS listener took the new CRL with the same SIGHUP.
    for i in 0..3 {
        let at = format!("https://{}/v1/status", cluster.http[i]);
        let revoked = https(&cluster, &cluster.path().join("client"));
        let answer = revoked.get(&at).send().await;
        assert!(
            answer.is_err(),
            "node {i} served a revoked certificate over HTTPS: {answer:?}"
        );
        let status = https(&cluster, &other_dir)
            .get(&at)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, reqwest::StatusCode::OK, "node {i}");
    }
    let (ok, _, err) = kvctl(cluster.addr(0), &cluster.path().join("client"), &["status"]);
    assert!(!ok);
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let (ok, _, err) = kvctl(cluster.addr(0), &other_dir, &["status"]);
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_cannot_rejoin_and_clients_with_the_crl_refuse_it() {
    let _slot = common::SLOTS.acquire().await.unwrap();
    let (mut cluster, clients) = common::started(3).await;
    let ca = cluster.path().join("ca");
    let node3_tls = cluster.path().join("node-3").join("tls");
    certs::revoke(&ca, &RevokeTarget::Cert(node3_tls.join(certs::CERT))).unwrap();
    // node-3 itself does not get the CRL: a revoked node keeps running with
    // what it has (and would refuse to load a CRL revoking itself).
    distribute_crl(&cluster, 0);
    distribute_crl(&cluster, 1);
    for c in &clients[..2] {
        eventually("node-1 and node-2 see node-3 gone", || async {
            c.status().await.is_ok_and(|s| s.members_alive == 2)
        })
        .await;
    }

    // Its certificate is refused on the peer protocol, as revoked.
    let node3 = TlsIdentity::load(&node3_tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(Some(&node3), ALPN_PEER).unwrap());
    let connection = endpoint
        .connect(cluster.addr(0), certs::SERVER_NAME)
        .unwrap()
        .await;
    let reason = match connection {
        Err(e) => refusal(&e),
        Ok(connection) => {
            // The server checks our certificate after our side completed.
            if let Ok(mut send) = connection.open_uni().await {
                let _ = send.write_all(&frame::encode(&"hello").unwrap()).await;
                let _ = send.finish();
                let _ = send.stopped().await;
            }
            connection.closed().await;
            connection.close_reason().and_then(|e| refusal(&e))
        }
    };
    assert_eq!(reason, Some(Refusal::OursRefused(CertProblem::Revoked)));

    // Restarted with its revoked certificate, it stays alone. A negative
    // can only be watched for a while: 5 s is several gossip rounds and
    // far longer than a join takes on loopback.
    cluster.kill(2);
    cluster.restart(2);
    let tls = cluster.client_tls();
    let c3 = common::client(cluster.addr(2), &tls).await;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let s1 = clients[0].status().await.unwrap();
        let s3 = c3.status().await.unwrap();
        assert_eq!(s1.members_alive, 2, "node-1 took the revoked node back");
        assert_eq!(s3.members_alive, 1, "the revoked node rejoined");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A client holding the CRL refuses the revoked node.
    let with_crl = cluster.path().join("client-with-crl");
    std::fs::create_dir_all(&with_crl).unwrap();
    for file in [certs::CA_CERT, certs::CERT, certs::KEY] {
        std::fs::copy(
            cluster.path().join("client").join(file),
            with_crl.join(file),
        )
        .unwrap();
    }
    std::fs::copy(ca.join(certs::CRL), with_crl.join(certs::CRL)).unwrap();
    let tls = TlsIdentity::load(&with_crl).unwrap();
    let err = refused(cluster.addr(2), &tls)
        .await
        .expect("a client holding the CRL was served by a revoked node");
    assert!(
        err.contains("certificate of the node") && err.contains("revoked"),
        "{err}"
    );
    assert!(refused(cluster.addr(0), &tls).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_and_kvctl_says_expired() {
    let _slot = common::SLOTS.acquire().await.unwrap();
    let cluster = Cluster::start(1);
    let tls = cluster.client_tls();
    let status = common::client(cluster.addr(0), &tls)
        .await
        .status()
        .await
        .unwrap();
    assert!(status.cert_expires.is_some_and(|at| at.ends_with('Z')));

    let now = time::OffsetDateTime::now_utc();
    let expired = cluster.path().join("expired");
    certs::issue_with_validity(
        &cluster.path().join("ca"),
        "late",
        Role::Client,
        now - Duration::from_secs(10 * 86_400),
        now - Duration::from_secs(86_400),
        &expired,
    )
    .unwrap();
    let err = refused(cluster.addr(0), &TlsIdentity::load(&expired).unwrap())
        .await
        .expect("an expired certificate was served");
    assert!(
        err.contains("refused this client's certificate") && err.contains("expired"),
        "{err}"
    );
    let (ok, _, err) = kvctl(cluster.addr(0), &expired, &["status"]);
    assert!(!ok);
    assert!(err.contains("expired"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // A certificate from another CA: kvctl names the CA file it trusts.
    let stranger_ca = cluster.path().join("stranger-ca");
    certs::init_ca(&stranger_ca, "stranger").unwrap();
    let stranger = cluster.path().join("stranger");
    certs::issue(&stranger_ca, "x", Role::Client, 30, &stranger).unwrap();
    let (ok, _, err) = kvctl(cluster.addr(0), &stranger, &["status"]);
    assert!(!ok);
    assert!(err.contains("not from the cluster CA"), "{err}");
}
