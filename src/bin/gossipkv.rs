//! `gossipkv`: run a node, make certificates, or start a local dev cluster.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use gossipkv::certs;
use gossipkv::node::config::{FileConfig, NodeConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "gossipkv",
    version,
    about = "A gossip-replicated CRDT key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    ///
    /// Example: gossipkv serve --data-dir /var/lib/gossipkv --listen 127.0.0.1:7000 --tls-dir tls/node-1
    Serve(ServeArgs),
    /// Make a cluster CA and issue node and client certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Start an N-node cluster on loopback with fresh certificates, until Ctrl-C.
    ///
    /// Example: gossipkv dev --nodes 3
    Dev(DevArgs),
}

#[derive(Args, Default)]
struct ServeArgs {
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The node's name, e.g. node-1 (default: the name in its certificate,
    /// which it must match; with --insecure, the store's id).
    #[arg(long, value_name = "NAME")]
    node_id: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on for peers and clients (default 127.0.0.1:7000).
    #[arg(long)]
    listen: Option<String>,
    /// Address peers reach this node at, if not --listen (e.g. with 0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,
    /// Addresses of nodes to join through, comma-separated.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<String>,
    /// Directory with ca.pem, cert.pem and key.pem (from `gossipkv certs issue`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// No TLS authentication: experiments only.
    #[arg(long)]
    insecure: bool,
    /// Capacity weight: a node with twice the capacity holds twice the data.
    #[arg(long)]
    capacity: Option<u32>,
    #[arg(long)]
    zone: Option<String>,
    /// Replicas per partition (used when this node starts a new cluster).
    #[arg(long)]
    replicas: Option<u8>,
    /// Starting a new cluster (no --seeds): make the first layout once this
    /// many nodes are up (default 1).
    #[arg(long)]
    expect_nodes: Option<usize>,
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Serve the HTTP/JSON API here (HTTPS with the node's certificate;
    /// clients present a client certificate). See docs/http-api.md.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    /// Serve the HTTP API as plain HTTP, with no authentication at all:
    /// anyone who reaches the address can read and write. Experiments only.
    #[arg(long)]
    http_plain: bool,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a cluster CA in DIR.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// A name for the cluster, shown in the CA certificate.
        #[arg(long, default_value = "gossipkv")]
        cluster: String,
    },
    /// Issue a certificate signed by the CA in --ca, carrying its role and
    /// name: node (a cluster member; NAME is the node's name), client
    /// (applications, and kvctl's read-only commands) or admin (kvctl,
    /// including join and leave).
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// node, client or admin.
        #[arg(long, default_value = "node", value_parser = parse_role)]
        role: certs::Role,
        /// Same as --role client.
        #[arg(long, conflicts_with = "role")]
        client: bool,
        /// Days the certificate is valid for.
        #[arg(long, default_value_t = certs::DEFAULT_DAYS)]
        days: u32,
    },
    /// Revoke a certificate of the CA in --ca, by file or serial: records it
    /// in CA_DIR/revoked.json and writes CA_DIR/crl.pem, signed by the CA,
    /// listing every revoked certificate. Copy crl.pem into each node's TLS
    /// directory and send the nodes SIGHUP (or restart them): they then
    /// refuse the certificate and close its connections.
    ///
    /// Example: gossipkv certs revoke --ca tls/ca --cert tls/client/cert.pem
    #[command(group(clap::ArgGroup::new("what").required(true).args(["cert", "serial"])))]
    Revoke {
        #[arg(long)]
        ca: PathBuf,
        /// The certificate to revoke (its cert.pem).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// The serial number to revoke, in hex (as `revoke` prints it).
        #[arg(long)]
        serial: Option<String>,
    },
}

#[derive(Args)]
struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// Directory for certificates and data (default: a new one under the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn parse_role(text: &str) -> Result<certs::Role, String> {
    text.parse()
}

fn serve_config(args: ServeArgs) -> Result<NodeConfig> {
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    file.node_id = args.node_id.or(file.node_id);
    file.data_dir = args.data_dir.or(file.data_dir);
    file.listen = args.listen.or(file.listen);
    file.advertise = args.advertise.or(file.advertise);
    if !args.seeds.is_empty() {
        file.seeds = args.seeds;
    }
    file.tls_dir = args.tls_dir.or(file.tls_dir);
    file.insecure |= args.insecure;
    file.capacity = args.capacity.or(file.capacity);
    file.zone = args.zone.or(file.zone);
    file.replicas = args.replicas.or(file.replicas);
    file.expect_nodes = args.expect_nodes.or(file.expect_nodes);
    file.metrics_listen = args.metrics_listen.or(file.metrics_listen);
    file.http_listen = args.http_listen.or(file.http_listen);
    file.http_plain |= args.http_plain;
    Ok(NodeConfig::from_file(file)?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn free_port() -> Result<u16> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(socket.local_addr()?.port())
}

fn free_tcp_port() -> Result<u16> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(socket.local_addr()?.port())
}

async fn dev(args: DevArgs) -> Result<()> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("gossipkv-dev-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = dir.join("ca");
    if !ca.join(certs::CA_CERT).exists() {
        certs::init_ca(&ca, "dev")?;
    }
    let client = dir.join("client");
    if !client.join(certs::CERT).exists() {
        certs::issue(
            &ca,
            "client",
            certs::Role::Client,
            certs::DEFAULT_DAYS,
            &client,
        )?;
    }
    let admin = dir.join("admin");
    if !admin.join(certs::CERT).exists() {
        certs::issue(
            &ca,
            "admin",
            certs::Role::Admin,
            certs::DEFAULT_DAYS,
            &admin,
        )?;
    }
    let exe = std::env::current_exe().context("locating the gossipkv binary")?;
    let mut children = Vec::new();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut https: Vec<SocketAddr> = Vec::new();
    for i in 1..=args.nodes {
        let node_dir = dir.join(format!("node-{i}"));
        let tls = node_dir.join("tls");
        if !tls.join(certs::CERT).exists() {
            certs::issue(
                &ca,
                &format!("node-{i}"),
                certs::Role::Node,
                certs::DEFAULT_DAYS,
                &tls,
            )?;
        }
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
        let mut command = tokio::process::Command::new(&exe);
        command
            .arg("serve")
            .arg("--node-id")
            .arg(format!("node-{i}"))
            .arg("--data-dir")
            .arg(node_dir.join("data"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--tls-dir")
            .arg(&tls)
            .arg("--http-listen")
            .arg(http.to_string())
            .kill_on_drop(true);
        match addrs.first() {
            Some(first) => command.arg("--seeds").arg(first.to_string()),
            // The first node waits for all of them before the first layout.
            None => command.arg("--expect-nodes").arg(args.nodes.to_string()),
        };
        children.push(command.spawn().context("starting a node")?);
        addrs.push(addr);
        https.push(http);
    }
    println!(
        "gossipkv dev cluster: {} nodes, certificates and data in {}",
        args.nodes,
        dir.display()
    );
    for (i, (addr, http)) in addrs.iter().zip(&https).enumerate() {
        println!("  node-{} {addr} (HTTP API https://{http}/v1/)", i + 1);
    }
    let curl = format!(
        "curl --cacert {0}/ca.pem --cert {0}/cert.pem --key {0}/key.pem",
        client.display()
    );
    println!("write and read a key, and add to a counter, over HTTP:");
    println!(
        "  {curl} -X PUT --data world https://{}/v1/kv/hello",
        https[0]
    );
    println!("  {curl} https://{}/v1/kv/hello", https[https.len() - 1]);
    println!(
        "  {curl} -X POST --data '{{\"add\": 5}}' https://{}/v1/counters/hits",
        https[https.len() / 2]
    );
    println!(
        "reach it with: kvctl --node {} --tls-dir {}",
        addrs[0],
        client.display()
    );
    println!(
        "admin commands (join, leave) need the admin certificate: kvctl --node {} --tls-dir {} members",
        addrs[0],
        admin.display()
    );
    println!(
        "a phone and a laptop edit offline and sync through it (docs/device-sync.md):\n  cargo run --example device_sync -- {} https://{} https://{}",
        dir.display(),
        https[0],
        https[https.len() - 1]
    );
    println!("Ctrl-C stops the cluster");
    let mut any_exit = Box::pin(futures_first_exit(&mut children));
    tokio::select! {
        () = shutdown_signal() => {}
        status = &mut any_exit => eprintln!("a node exited ({status}); stopping the cluster"),
    }
    drop(any_exit);
    stop_nodes(&mut children).await;
    Ok(())
}

/// How long `dev` waits for its nodes to stop cleanly before killing them.
const DEV_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks every node to stop (SIGTERM: a clean stop, so a node keeps its
/// writer id; see ARCHITECTURE.md, "Writer epochs"), then kills the ones
/// still running after `DEV_STOP_GRACE`.
async fn stop_nodes(children: &mut [tokio::process::Child]) {
    #[cfg(unix)]
    for child in children.iter() {
        if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = tokio::time::Instant::now() + DEV_STOP_GRACE;
    for child in children.iter_mut() {
        if tokio::time::timeout_at(deadline, child.wait())
            .await
            .is_err()
        {
            eprintln!("a node did not stop within {DEV_STOP_GRACE:?}; killing it");
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// Resolves when the first child process exits.
async fn futures_first_exit(children: &mut [tokio::process::Child]) -> String {
    loop {
        for child in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return status.to_string();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn certs_command(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Init { out, cluster } => {
            certs::init_ca(&out, &cluster)?;
            println!(
                "cluster CA written to {} (keep {} off the nodes)",
                out.display(),
                certs::CA_KEY
            );
        }
        CertsCommand::Issue {
            ca,
            name,
            out,
            role,
            client,
            days,
        } => {
            let role = if client { certs::Role::Client } else { role };
            certs::issue(&ca, &name, role, days, &out)?;
            println!(
                "{role} certificate {name} (valid {days} days) written to {}; use it with --tls-dir {}",
                out.display(),
                out.display()
            );
        }
        CertsCommand::Revoke { ca, cert, serial } => {
            let target = match (cert, serial) {
                (Some(cert), _) => certs::RevokeTarget::Cert(cert),
                (None, Some(serial)) => certs::RevokeTarget::Serial(serial),
                (None, None) => bail!("give --cert or --serial"),
            };
            let done = certs::revoke(&ca, &target)?;
            let what = match &done.revoked.holder {
                Some(holder) => format!("{holder} (serial {})", done.revoked.serial),
                None => format!("serial {}", done.revoked.serial),
            };
            if done.already {
                println!("{what} was already revoked");
            } else {
                println!("revoked {what}");
            }
            println!(
                "{} lists {} revoked certificate(s): copy it into every node's TLS directory (as {}) and send the nodes SIGHUP",
                done.crl.display(),
                done.total,
                certs::CRL
            );
        }
    }
    Ok(())
}

fn check_dir(path: &Path) -> Result<()> {
    if path.exists() && !path.is_dir() {
        bail!("{} is not a directory", path.display());
    }
    Ok(())
}

/// glibc's malloc raises its mmap threshold each time it frees a large
/// mmapped block, after which large buffers (values, frames) come from its
/// heaps and are kept after use: a node that answered a burst of 4 MiB
/// values stayed hundreds of MB above its idle size after the clients left.
/// A fixed threshold (which disables the adjustment) gives such buffers
/// back when freed. glibc reads it from the environment at start only, so
/// `serve` re-executes itself once with it set; a value the operator set
/// is kept as it is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_malloc_threshold() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_MMAP_THRESHOLD_";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // Only returns on failure; the node then runs with glibc's default.
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VAR, "131072")
        .exec();
    eprintln!("warning: cannot re-execute with {VAR} set ({error}); freed large buffers may stay in the process");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_threshold() {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        fix_malloc_threshold();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Certs(command) => certs_command(command),
        Command::Serve(args) => serve_config(args).and_then(|config| {
            check_dir(&config.data_dir)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(gossipkv::node::run(config, shutdown_signal()))?;
            Ok(())
        }),
        Command::Dev(args) => tokio::runtime::Runtime::new()
            .map_err(Into::into)
            .and_then(|rt| rt.block_on(dev(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
