//! Talks to a running cluster (e.g. `gossipkv dev`) with the Rust client.
//!
//! Run: `cargo run --example cluster_client -- --node 127.0.0.1:PORT --tls-dir DIR/client`
//! with the flags `gossipkv dev` prints.

use gossipkv::client::Client;
use gossipkv::transport::tls::TlsIdentity;
use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    let mut node: Option<SocketAddr> = None;
    let mut tls_dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--node" => node = Some(args.next().ok_or("--node needs an address")?.parse()?),
            "--tls-dir" => tls_dir = Some(args.next().ok_or("--tls-dir needs a directory")?.into()),
            other => {
                return Err(
                    format!("unknown argument {other}; use --node ADDR --tls-dir DIR").into(),
                )
            }
        }
    }
    let node = node.ok_or("give --node ADDR (printed by `gossipkv dev`)")?;
    let tls = tls_dir.map(|d| TlsIdentity::load(&d)).transpose()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = Client::connect(node, tls.as_ref()).await?;
        let status = client.status().await?;
        println!(
            "connected to node {}: {} of {} members alive, layout v{}",
            status.node_id, status.members_alive, status.members_total, status.layout_version
        );
        let context = client.put(b"hello", b"world", None).await?;
        println!("put hello=world, context {context}");
        let record = client.get(b"hello").await?;
        println!("get hello -> {:?}", record.map(|r| r.value));
        println!(
            "counter visits -> {}",
            client.counter_add(b"visits", 1).await?
        );
        Ok(())
    })
}
