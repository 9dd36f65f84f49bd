//! Mutual TLS over QUIC on loopback: a certificate from the cluster CA gets
//! in; one from another CA, or none, is refused during the handshake; a
//! malformed frame ends its stream with an error.

use gossipkv::certs;
use gossipkv::transport::tls::{client_config, server_config, TlsIdentity};
use gossipkv::transport::{frame, ALPN_PEER};
use std::net::SocketAddr;
use std::path::Path;

fn issue(ca: &Path, name: &str, client: bool) -> TlsIdentity {
    let out = ca.parent().unwrap().join(name);
    let role = if client {
        certs::Role::Client
    } else {
        certs::Role::Node
    };
    certs::issue(ca, name, role, certs::DEFAULT_DAYS, &out).unwrap();
    TlsIdentity::load(&out).unwrap()
}

async fn server(identity: &TlsIdentity) -> (quinn::Endpoint, SocketAddr) {
    let config = server_config(Some(identity), &[ALPN_PEER]).unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

async fn connect(
    identity: Option<&TlsIdentity>,
    addr: SocketAddr,
) -> Result<quinn::Connection, String> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(identity, ALPN_PEER).unwrap());
    let connecting = endpoint
        .connect(addr, certs::SERVER_NAME)
        .map_err(|e| e.to_string())?;
    let connection = connecting.await.map_err(|e| e.to_string())?;
    // The server checks the client's certificate after the client's side
    // of the handshake completes: a refused client sees its first stream fail.
    let mut send = connection.open_uni().await.map_err(|e| e.to_string())?;
    send.write_all(&frame::encode(&"hello").unwrap())
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    send.stopped().await.map_err(|e| e.to_string())?;
    Ok(connection)
}

#[tokio::test]
async fn only_certificates_from_the_cluster_ca_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::init_ca(&ca, "test").unwrap();
    let other_ca = dir.path().join("other-ca");
    certs::init_ca(&other_ca, "other").unwrap();
    assert!(matches!(
        certs::init_ca(&ca, "again"),
        Err(certs::CertError::Exists { .. })
    ));

    let node = issue(&ca, "node-a", false);
    let friend = issue(&ca, "node-b", false);
    let stranger = issue(&other_ca, "node-x", false);
    let (endpoint, addr) = server(&node).await;
    let accept = tokio::spawn(async move {
        let mut accepted = 0;
        while let Some(incoming) = endpoint.accept().await {
            let Ok(connection) = incoming.await else {
                continue;
            };
            if let Ok(mut recv) = connection.accept_uni().await {
                let got: Option<String> = frame::read(&mut recv).await.unwrap_or(None);
                if got.as_deref() == Some("hello") {
                    accepted += 1;
                    return accepted;
                }
            }
        }
        accepted
    });
    assert!(
        connect(Some(&stranger), addr).await.is_err(),
        "a certificate from another CA got in"
    );
    assert!(
        connect(None, addr).await.is_err(),
        "a client without a certificate got in"
    );
    connect(Some(&friend), addr)
        .await
        .expect("a cluster member is refused");
    assert_eq!(accept.await.unwrap(), 1);
}

#[test]
fn bad_certificate_names_and_missing_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::init_ca(&ca, "test").unwrap();
    let err = certs::issue(
        &ca,
        "bad name!",
        certs::Role::Node,
        30,
        &dir.path().join("x"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("bad name!"), "{err}");
    let err = TlsIdentity::load(&dir.path().join("nowhere")).unwrap_err();
    assert!(err.to_string().contains("ca.pem"), "{err}");
}
