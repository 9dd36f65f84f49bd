//! `kvctl`: look inside a gossipkv cluster and steer it.
//!
//! Tables for people, `--output json` for scripts (one JSON document per
//! command). Exit codes: 0 success, 1 an error (one line on stderr saying
//! what failed and what to try), 2 bad usage.
//!
//! Byte strings (keys, values, members) print as text when they are UTF-8
//! and as `base64:...` otherwise; JSON uses the same strings.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use clap::{Parser, Subcommand, ValueEnum};
use gossipkv::client::{Client, ClientError, PartitionInfo, Request, Response, WireRecord};
use gossipkv::transport::tls::TlsIdentity;
use gossipkv::{CausalContext, Value};
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "kvctl",
    version,
    about = "Inspect and steer a gossipkv cluster",
    after_help = "Examples:\n  kvctl --node 127.0.0.1:7000 --tls-dir tls/client status\n  KVCTL_NODE=127.0.0.1:7000 KVCTL_TLS_DIR=tls/client kvctl put greeting hello\n  kvctl --output json inspect greeting"
)]
struct Cli {
    /// A node's address.
    #[arg(long, env = "KVCTL_NODE", global = true)]
    node: Option<SocketAddr>,
    /// Directory with this client's certificate (from `gossipkv certs issue --client`).
    #[arg(
        long,
        env = "KVCTL_TLS_DIR",
        global = true,
        conflicts_with = "insecure"
    )]
    tls_dir: Option<PathBuf>,
    /// Connect without TLS authentication (nodes started with --insecure).
    #[arg(long, global = true)]
    insecure: bool,
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Node id, version, uptime, members alive, layout, partitions, sizes,
    /// migrations, anti-entropy rounds and repairs.
    ///
    /// Example: kvctl status --output json
    Status,
    /// Every member with its state, zone, capacity, partitions held, load
    /// and when it was last heard from.
    ///
    /// Example: kvctl members
    Members,
    /// Layout version, replicas per partition, pending moves; `layout plan`
    /// and `layout apply PLAN_ID` balance load (docs/rebalancing.md).
    ///
    /// Example: kvctl layout --partition 17
    Layout {
        /// Show one partition only.
        #[arg(long)]
        partition: Option<u16>,
        #[command(subcommand)]
        action: Option<LayoutAction>,
    },
    /// The partitions this node holds: entries, bytes, digest, version vector.
    ///
    /// Example: kvctl partitions --output json
    Partitions,
    /// A key's value (or siblings), kind and causal context token.
    ///
    /// Example: kvctl get greeting
    Get { key: String },
    /// Write a value; with --context, supersede exactly what that read saw.
    ///
    /// Example: kvctl put greeting hello --context AQEBAQ
    Put {
        key: String,
        value: String,
        #[arg(long)]
        context: Option<String>,
        /// Last-writer-wins register instead of the multi-value one.
        #[arg(long)]
        lww: bool,
        /// Replicas that must acknowledge.
        #[arg(long, default_value_t = 1)]
        w: u8,
    },
    /// Delete a register key (a causal tombstone).
    ///
    /// Example: kvctl delete greeting --context AQEBAQ
    Delete {
        key: String,
        #[arg(long)]
        context: Option<String>,
        #[arg(long, default_value_t = 1)]
        w: u8,
    },
    /// Counters: `counter add KEY N`, `counter get KEY`.
    ///
    /// Example: kvctl counter add visits -3
    #[command(subcommand)]
    Counter(CounterCommand),
    /// Sets: `set add KEY MEMBER`, `set remove KEY MEMBER`, `set members KEY`.
    ///
    /// Example: kvctl set add tags blue
    #[command(subcommand)]
    Set(SetCommand),
    /// Live keys across the whole cluster, in key order (one page: go on
    /// with --start-after the last key shown); --local: only the keys this
    /// node holds.
    ///
    /// Example: kvctl keys --prefix user: --limit 20
    Keys {
        #[arg(long, default_value = "")]
        prefix: String,
        /// 1 to 1000.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Keys after this one (the last key of the previous page).
        #[arg(long)]
        start_after: Option<String>,
        /// Only the keys this node holds (no other node is asked).
        #[arg(long, conflicts_with = "start_after")]
        local: bool,
    },
    /// The key on each of its replicas side by side, and whether they agree.
    ///
    /// Example: kvctl inspect greeting
    Inspect { key: String },
    /// Partitions whose contents differ between two nodes, and how many
    /// writes each side lacks, from their version vectors.
    ///
    /// Example: kvctl diff 127.0.0.1:7000 127.0.0.1:7001
    Diff {
        node_a: SocketAddr,
        node_b: SocketAddr,
    },
    /// Migrations into the node: each stream's source, entries and bytes
    /// done of those announced, rate, ETA, and why a stalled one is stalled;
    /// partitions done and left. `--budget` sets how fast the node sends
    /// migration data to others.
    ///
    /// Example: kvctl migrations --watch
    /// Example: kvctl migrations --budget 20M
    Migrations {
        /// Refresh until no migration is left.
        #[arg(long)]
        watch: bool,
        /// Set the node's migration budget in bytes per second (suffixes
        /// k, M, G; "unlimited" or 0 for none), until it restarts.
        #[arg(long, value_parser = parse_budget)]
        budget: Option<u64>,
    },
    /// Join the cluster through a seed (for a node started without seeds).
    ///
    /// Example: kvctl --node 127.0.0.1:7003 join 127.0.0.1:7000
    Join { seed: SocketAddr },
    /// Decommission the node: hand every partition off, then leave. Waits,
    /// showing progress, until it is safe to stop the node.
    ///
    /// Example: kvctl --node 127.0.0.1:7002 leave
    Leave {
        /// Return at once instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Devices that synced with the cluster (docs/device-sync.md), merged
    /// from every node that answers: last push and pull, cursor age (time
    /// since the device was last caught up), writes pushed, and what holds
    /// tombstone purges back (devices never do).
    ///
    /// Example: kvctl devices --output json
    Devices,
    /// The node's own placement: `node set-capacity N`, `node set-zone Z`
    /// (or `--none`). Kept across restarts over the config file's values;
    /// the layout follows, and `layout plan` uses them.
    ///
    /// Example: kvctl --node 127.0.0.1:7001 node set-capacity 200
    #[command(subcommand)]
    Node(NodeCommand),
    /// API tokens for the HTTP API (admin certificate): `token create`,
    /// `token list`, `token revoke NAME_OR_ID`.
    ///
    /// Example: kvctl token create --name app1 --prefix app1/ --read --write --expires 30d
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Relative weight in the layout (>= 1): twice the capacity, twice
    /// the replicas.
    SetCapacity { capacity: u32 },
    /// Failure zone (1 to 64 bytes); `--none` for no zone.
    SetZone {
        #[arg(required_unless_present = "none")]
        zone: Option<String>,
        #[arg(long, conflicts_with = "zone")]
        none: bool,
    },
}

#[derive(Subcommand)]
enum LayoutAction {
    /// Propose moves that take load off overloaded nodes: each move, the
    /// load, keys and bytes it moves, and every node's load before and
    /// after. Changes nothing.
    ///
    /// Example: kvctl layout plan
    Plan,
    /// Apply a plan made by `layout plan` on the same node, exactly as
    /// shown. Refused if it was applied already or the layout changed.
    ///
    /// Example: kvctl layout apply 3f2a9c0d11e4b7a8
    Apply {
        /// The plan's id (16 hex digits).
        plan_id: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token and print its secret (shown once; the cluster keeps
    /// only its hash). Every node enforces it once gossip reaches it (about
    /// 10 ms on a LAN, measured in docs/http-api.md).
    Create {
        /// A name to list and revoke it by (unique).
        #[arg(long)]
        name: String,
        /// Keys it may touch start with this (repeatable; "" for all).
        #[arg(long = "prefix", required = true)]
        prefixes: Vec<String>,
        #[arg(long)]
        read: bool,
        #[arg(long)]
        write: bool,
        /// Lifetime, e.g. 3600s, 90m, 12h, 30d (default: until revoked).
        #[arg(long, value_parser = parse_duration)]
        expires: Option<u64>,
    },
    /// Every token: id, name, prefixes, rights, expiry, state.
    List,
    /// Revoke the token with this name or id on every node.
    Revoke { name_or_id: String },
}

/// A duration like 3600s, 90m, 12h or 30d, in seconds.
fn parse_duration(text: &str) -> Result<u64, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit, like 30d"))?;
    let scale = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use s, m, h or d)"
            ))
        }
    };
    match n.checked_mul(scale) {
        Some(0) | None => Err(format!(
            "{text:?}: expected a positive duration of at most a few centuries"
        )),
        Some(seconds) => Ok(seconds),
    }
}

#[derive(Subcommand)]
enum CounterCommand {
    Add {
        key: String,
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        #[arg(long, default_value_t = 1)]
        w: u8,
    },
    Get {
        key: String,
    },
}

#[derive(Subcommand)]
enum SetCommand {
    Add {
        key: String,
        member: String,
        /// Replicas that must hold the add before it is acknowledged.
        #[arg(long, default_value_t = 1)]
        w: u8,
    },
    Remove {
        key: String,
        member: String,
        /// Replicas that must hold the removal before it is acknowledged.
        #[arg(long, default_value_t = 1)]
        w: u8,
    },
    Members {
        key: String,
    },
}

/// Prints a line; a closed stdout (`kvctl ... | head`) is not an error.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Bytes as text when UTF-8, else `base64:...`.
fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.starts_with("base64:") => text.to_string(),
        _ => format!("base64:{}", STANDARD.encode(bytes)),
    }
}

/// The inverse of `show` for arguments.
fn arg_bytes(text: &str) -> anyhow::Result<Vec<u8>> {
    match text.strip_prefix("base64:") {
        Some(b64) => STANDARD
            .decode(b64)
            .map_err(|e| anyhow::anyhow!("{text:?} is not valid base64: {e}")),
        None => Ok(text.as_bytes().to_vec()),
    }
}

fn token(bytes: &[u8]) -> String {
    CausalContext::from_bytes(bytes)
        .map(|c| c.to_string())
        .unwrap_or_default()
}

fn value_json(value: &Value) -> Json {
    match value {
        Value::Register(siblings) => {
            json!({"kind": "register", "siblings": siblings.iter().map(|s| show(s)).collect::<Vec<_>>()})
        }
        Value::Lww(v) => json!({"kind": "lww", "value": show(v)}),
        Value::Counter(n) => json!({"kind": "counter", "value": n}),
        Value::Set(members) => {
            json!({"kind": "set", "members": members.iter().map(|m| show(m)).collect::<Vec<_>>()})
        }
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::Register(siblings) if siblings.len() == 1 => show(&siblings[0]),
        Value::Register(siblings) => {
            format!(
                "{} siblings: {}",
                siblings.len(),
                siblings
                    .iter()
                    .map(|s| show(s))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
        }
        Value::Lww(v) => show(v),
        Value::Counter(n) => n.to_string(),
        Value::Set(members) => format!(
            "{{{}}}",
            members
                .iter()
                .map(|m| show(m))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn record_json(record: &Option<WireRecord>) -> Json {
    match record {
        None => Json::Null,
        Some(r) => {
            let mut v = value_json(&r.value);
            v["context"] = json!(token(&r.context));
            if !r.other_kinds.is_empty() {
                v["other_kinds"] = json!(r.other_kinds.iter().map(value_json).collect::<Vec<_>>());
            }
            v
        }
    }
}

/// Prints rows as an aligned table.
/// `42s ago`, `5m ago`, `3h ago`, `2d ago`.
fn human_age(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 120.0 {
        format!("{s:.0}s ago")
    } else if s < 7200.0 {
        format!("{:.0}m ago", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.0}h ago", s / 3600.0)
    } else {
        format!("{:.0}d ago", s / 86400.0)
    }
}

/// A stream's rate (bytes/s since it began) and ETA (bytes left at that
/// rate), once its source announced its size.
fn stream_rate(st: &gossipkv::client::MigrationStreamInfo) -> (f64, Option<f64>) {
    let seconds = st.running_ms as f64 / 1e3;
    let rate = if seconds > 0.0 {
        st.bytes_done as f64 / seconds
    } else {
        0.0
    };
    let eta = st
        .bytes_total
        .filter(|_| rate > 0.0)
        .map(|t| t.saturating_sub(st.bytes_done) as f64 / rate);
    (rate, eta)
}

/// A byte rate like `500k`, `20M`, `1G`, `1048576` or `unlimited` (0).
fn parse_budget(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let (digits, scale) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a byte rate: use a number with an optional k, M or G, or \"unlimited\""))
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        say!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

fn version_text(version: &[(String, u64, Vec<u64>)]) -> String {
    version
        .iter()
        .map(|(node, base, extra)| {
            let short = node.trim_start_matches('0');
            let short = if short.is_empty() { "0" } else { short };
            if extra.is_empty() {
                format!("{short}:{base}")
            } else {
                format!("{short}:{base}+{extra:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How many writes `a` has that `b` lacks, per the version vectors.
fn lacking(a: &[(String, u64, Vec<u64>)], b: &[(String, u64, Vec<u64>)]) -> u64 {
    let theirs: BTreeMap<&str, (u64, &Vec<u64>)> = b
        .iter()
        .map(|(n, base, extra)| (n.as_str(), (*base, extra)))
        .collect();
    let none = Vec::new();
    let mut missing = 0;
    for (node, base, extra) in a {
        let (their_base, their_extra) = theirs.get(node.as_str()).copied().unwrap_or((0, &none));
        // Dots their_base+1..=base, less those their extras hold; then our
        // extras above their base that they lack. Counted, not listed.
        let in_range = base.saturating_sub(their_base);
        let held = their_extra
            .iter()
            .filter(|&&x| x > their_base && x <= *base)
            .count() as u64;
        let extras = extra
            .iter()
            .filter(|&&x| x > their_base && !their_extra.contains(&x))
            .count() as u64;
        missing += in_range.saturating_sub(held) + extras;
    }
    missing
}

struct Ctl {
    node: SocketAddr,
    tls: Option<TlsIdentity>,
    json: bool,
}

impl Ctl {
    async fn connect(&self, addr: SocketAddr, admin: bool) -> anyhow::Result<Client> {
        let connected = if admin {
            Client::connect_admin(addr, self.tls.as_ref()).await
        } else {
            Client::connect(addr, self.tls.as_ref()).await
        };
        connected.map_err(|e| match e {
            ClientError::Connect { .. } => {
                anyhow::anyhow!("{e} (is a node listening there? check --node / KVCTL_NODE)")
            }
            e => e.into(),
        })
    }

    async fn call(&self, request: Request, w: u8) -> anyhow::Result<Response> {
        let mut client = self.connect(self.node, request.is_admin()).await?;
        client.set_quorum(w, 1);
        let response = client.request(&request).await;
        // Tell the node now rather than at its idle timeout: scripts run
        // kvctl in loops, and open connections count against a cap.
        client.close().await;
        Ok(response?)
    }

    /// `kvctl devices`: every reachable member's ledger, merged by device.
    async fn devices(&self) -> anyhow::Result<()> {
        let Response::ClusterMembers(members) = self.call(Request::ClusterMembers, 1).await? else {
            anyhow::bail!("unexpected answer")
        };
        // All members at once, each within 5 s: a slow or dead node costs
        // the listing 5 s, not 5 s per node.
        let mut asking = tokio::task::JoinSet::new();
        for (i, m) in members.iter().enumerate() {
            let addr = match m.state.as_str() {
                "self" => Ok(self.node),
                _ => m.addr.parse::<SocketAddr>().map_err(anyhow::Error::from),
            };
            let tls = self.tls.clone();
            asking.spawn(async move {
                let answer = async {
                    let client = Client::connect_admin(addr?, tls.as_ref()).await?;
                    let answer = client.request(&Request::Devices).await;
                    client.close().await;
                    match answer? {
                        Response::Devices(info) => Ok(info),
                        other => anyhow::bail!("unexpected answer {other:?}"),
                    }
                };
                let answer = tokio::time::timeout(Duration::from_secs(5), answer)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in 5 s")));
                (i, answer)
            });
        }
        let mut answered = Vec::new();
        while let Some(joined) = asking.join_next().await {
            answered.push(joined?);
        }
        answered.sort_by_key(|(i, _)| *i);
        let answers: Vec<_> = answered
            .into_iter()
            .map(|(i, answer)| (members[i].name.clone(), answer))
            .collect();
        // Per device: the merged record, each node's clock skew folded in
        // by turning its times into ages at that node.
        let mut merged: BTreeMap<u64, (gossipkv::store::DeviceRecord, Vec<String>)> =
            BTreeMap::new();
        let mut held = Vec::new();
        let mut pushes_held = Vec::new();
        let mut unanswered = Vec::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for (asked_name, answer) in answers {
            let info = match answer {
                Ok(info) => info,
                Err(e) => {
                    unanswered.push((asked_name, e.to_string()));
                    continue;
                }
            };
            // The node's own name: the asked node may not know it yet.
            let name = info.node.clone();
            // Times as this machine's clock would have stamped them.
            let skew = now as i64 - info.now_ms as i64;
            let local = |t: u64| {
                if t == 0 {
                    0
                } else {
                    (t as i64 + skew).max(1) as u64
                }
            };
            for (id, mut record) in info.devices {
                record.first_seen_ms = local(record.first_seen_ms);
                record.last_push_ms = local(record.last_push_ms);
                record.last_pull_ms = local(record.last_pull_ms);
                record.caught_up_ms = local(record.caught_up_ms);
                let slot = merged.entry(id).or_default();
                slot.0.merge(&record);
                slot.1.push(name.clone());
            }
            for hold in info.purge_held {
                held.push((name.clone(), hold));
            }
            for hold in info.push_held {
                pushes_held.push((name.clone(), hold));
            }
        }
        let age = |t: u64| (t > 0).then(|| now.saturating_sub(t) as f64 / 1e3);
        let stamp = |t: u64| (t > 0).then(|| gossipkv::certs::rfc3339((t / 1000) as i64));
        let value = json!({
            "devices": merged.iter().map(|(id, (r, nodes))| json!({
                "device": format!("{id:x}"),
                "token": r.token,
                "first_seen": stamp(r.first_seen_ms),
                "last_push": stamp(r.last_push_ms),
                "last_pull": stamp(r.last_pull_ms),
                "cursor_age_seconds": age(r.caught_up_ms),
                "pushed_writes": r.pushed_writes,
                "max_seq": r.max_seq,
                "pulled_entries": r.pulled_entries,
                "reconciles": r.reconciles,
                "nodes": nodes,
            })).collect::<Vec<_>>(),
            "purge_held": held.iter().map(|(node, h)| json!({
                "node": node, "partition": h.partition, "reason": h.reason,
            })).collect::<Vec<_>>(),
            "push_held": pushes_held.iter().map(|(node, h)| json!({
                "node": node, "partition": h.partition, "waiting_for": h.waiting_for,
            })).collect::<Vec<_>>(),
            "unanswered": unanswered.iter().map(|(node, e)| json!({
                "node": node, "error": e,
            })).collect::<Vec<_>>(),
        });
        let ago = |t: u64| age(t).map_or("never".to_string(), human_age);
        self.emit(value, || {
            let rows = merged
                .iter()
                .map(|(id, (r, nodes))| {
                    vec![
                        format!("{id:x}"),
                        r.token.clone().unwrap_or_else(|| "-".into()),
                        ago(r.last_push_ms),
                        ago(r.last_pull_ms),
                        age(r.caught_up_ms).map_or("never caught up".into(), human_age),
                        r.pushed_writes.to_string(),
                        r.max_seq.to_string(),
                        r.pulled_entries.to_string(),
                        r.reconciles.to_string(),
                        nodes.join(","),
                    ]
                })
                .collect();
            table(
                &[
                    "device",
                    "token",
                    "last push",
                    "last pull",
                    "cursor age",
                    "pushed",
                    "max seq",
                    "pulled",
                    "reconciles",
                    "through",
                ],
                rows,
            );
            say!("");
            if held.is_empty() {
                say!("tombstone purge: nothing held back (devices never hold it back: one away across a purge reconciles)");
            } else {
                say!("tombstone purge held back:");
                let rows = held
                    .iter()
                    .map(|(node, h)| vec![node.clone(), h.partition.to_string(), h.reason.clone()])
                    .collect();
                table(&["node", "partition", "reason"], rows);
            }
            if pushes_held.is_empty() {
                say!("pushed writes: none held back");
            } else {
                say!("pushed writes held back (a new primary confirming that no other node still applies them; devices push again later):");
                let rows = pushes_held
                    .iter()
                    .map(|(node, h)| {
                        vec![node.clone(), h.partition.to_string(), h.waiting_for.join(", ")]
                    })
                    .collect();
                table(&["node", "partition", "waiting for"], rows);
            }
            for (node, e) in &unanswered {
                say!("{node} did not answer ({e}): its devices are missing above");
            }
        });
        Ok(())
    }

    fn emit(&self, value: Json, text: impl FnOnce()) {
        if self.json {
            say!("{value}");
        } else {
            text();
        }
    }

    async fn run(&self, command: Command) -> anyhow::Result<()> {
        match command {
            Command::Status => {
                let Response::Status(s) = self.call(Request::Status, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                let value = serde_json::to_value(&s)?;
                self.emit(value, || {
                    table(
                        &["field", "value"],
                        vec![
                            vec!["node".into(), s.node_id.clone()],
                            vec!["version".into(), s.version.clone()],
                            vec!["uptime".into(), format!("{}s", s.uptime_seconds)],
                            vec![
                                "members alive".into(),
                                format!("{} of {}", s.members_alive, s.members_total),
                            ],
                            vec![
                                "layout".into(),
                                format!(
                                    "v{} (completed v{})",
                                    s.layout_version, s.layout_completed
                                ),
                            ],
                            vec!["partitions held".into(), s.partitions_held.to_string()],
                            vec!["entries".into(), s.entries_held.to_string()],
                            vec!["bytes".into(), s.bytes_held.to_string()],
                            vec![
                                "migrations in flight".into(),
                                s.migrations_in_flight.to_string(),
                            ],
                            vec![
                                "anti-entropy rounds".into(),
                                s.anti_entropy_rounds.to_string(),
                            ],
                            vec!["entries repaired".into(), s.repaired_entries.to_string()],
                            vec![
                                "certificate expires".into(),
                                match (&s.cert_expires, s.cert_expires_in_days) {
                                    (Some(at), Some(days)) if days < 0 => {
                                        format!("{at} (EXPIRED)")
                                    }
                                    (Some(at), Some(days)) => format!("{at} (in {days} days)"),
                                    (Some(at), None) => at.clone(),
                                    (None, _) => "no TLS (insecure mode)".into(),
                                },
                            ],
                        ],
                    )
                });
            }
            Command::Members => {
                let Response::ClusterMembers(members) =
                    self.call(Request::ClusterMembers, 1).await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                let value = serde_json::to_value(&members)?;
                self.emit(value, || {
                    let rows = members
                        .iter()
                        .map(|m| {
                            vec![
                                m.name.clone(),
                                m.id.clone(),
                                m.addr.clone(),
                                m.state.clone(),
                                m.zone.clone().unwrap_or_else(|| "-".into()),
                                m.capacity.map_or("-".into(), |c| c.to_string()),
                                m.partitions_held.to_string(),
                                m.load.as_ref().map_or("-".into(), |l| {
                                    format!(
                                        "{} keys, {} B, {} ops/s",
                                        l.keys, l.bytes, l.ops_per_sec
                                    )
                                }),
                                m.last_heard_ms.map_or("-".into(), |ms| {
                                    format!("{:.1}s ago", ms as f64 / 1e3)
                                }),
                            ]
                        })
                        .collect();
                    table(
                        &[
                            "name",
                            "id",
                            "address",
                            "state",
                            "zone",
                            "capacity",
                            "partitions",
                            "load",
                            "last heard",
                        ],
                        rows,
                    )
                });
            }
            Command::Layout {
                action: Some(LayoutAction::Plan),
                ..
            } => {
                let Response::LayoutPlan(plan) = self.call(Request::LayoutPlan, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                let value = serde_json::to_value(&plan)?;
                self.emit(value, || {
                    say!(
                        "plan {} for layout v{}: {}",
                        plan.id,
                        plan.layout_version,
                        plan.summary
                    );
                    if plan.moves.is_empty() {
                        return;
                    }
                    say!();
                    say!(
                        "{:<8} {:>9} {:<20} {:<20} {:>10} {:>10} {:>12}",
                        "move",
                        "partition",
                        "from",
                        "to",
                        "ops/s",
                        "keys",
                        "bytes"
                    );
                    for m in &plan.moves {
                        say!(
                            "{:<8} {:>9} {:<20} {:<20} {:>10.0} {:>10} {:>12}",
                            m.kind,
                            m.partition,
                            m.from,
                            m.to,
                            m.ops_per_sec,
                            m.keys,
                            m.bytes
                        );
                    }
                    say!();
                    say!(
                        "{:<20} {:>10} {:>10} {:>10} {:>8} {:>8}",
                        "node",
                        "share",
                        "before",
                        "after",
                        "x before",
                        "x after"
                    );
                    for n in &plan.nodes {
                        let x = |l: f64| if n.target > 0.0 { l / n.target } else { 0.0 };
                        say!(
                            "{:<20} {:>10.0} {:>10.0} {:>10.0} {:>8.2} {:>8.2}",
                            n.node,
                            n.target,
                            n.before,
                            n.after,
                            x(n.before),
                            x(n.after)
                        );
                    }
                    say!();
                    say!("apply with: kvctl layout apply {}", plan.id);
                });
            }
            Command::Layout {
                action: Some(LayoutAction::Apply { plan_id }),
                ..
            } => {
                let id = u64::from_str_radix(plan_id.trim(), 16).map_err(|_| {
                    anyhow::anyhow!("{plan_id:?} is not a plan id (16 hex digits, as `kvctl layout plan` prints)")
                })?;
                let Response::LayoutApplied { version } =
                    self.call(Request::LayoutApply { id }, 1).await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                self.emit(json!({"plan": plan_id, "layout_version": version}), || {
                    say!("plan {plan_id} applied: layout v{version} (see kvctl migrations for the data it moves)");
                });
            }
            Command::Layout {
                partition,
                action: None,
            } => {
                let Response::Layout(layout) = self.call(Request::Layout, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                if let Some(p) = partition {
                    let replicas = layout.replicas.get(usize::from(p)).ok_or_else(|| {
                        anyhow::anyhow!(
                            "partition {p} does not exist (the layout has {})",
                            layout.replicas.len()
                        )
                    })?;
                    let pending: Vec<&String> = layout
                        .pending
                        .iter()
                        .filter(|(q, _)| *q == p)
                        .map(|(_, n)| n)
                        .collect();
                    self.emit(json!({"partition": p, "version": layout.version, "replicas": replicas, "pending": pending}), || {
                        say!("partition {p} (layout v{}): {}", layout.version, replicas.join(", "));
                        if !pending.is_empty() {
                            say!("migrating to: {}", pending.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
                        }
                    });
                    return Ok(());
                }
                let value = serde_json::to_value(&layout)?;
                self.emit(value, || {
                    say!(
                        "layout v{} (completed v{}), {} partitions",
                        layout.version,
                        layout.completed,
                        layout.replicas.len()
                    );
                    // Compact: runs of partitions with the same replicas.
                    let mut rows = Vec::new();
                    let mut start = 0usize;
                    for i in 1..=layout.replicas.len() {
                        if i == layout.replicas.len()
                            || layout.replicas[i] != layout.replicas[start]
                        {
                            let range = if i - 1 == start {
                                start.to_string()
                            } else {
                                format!("{start}-{}", i - 1)
                            };
                            rows.push(vec![range, layout.replicas[start].join(", ")]);
                            start = i;
                        }
                    }
                    table(&["partitions", "replicas"], rows);
                    say!("pending moves: {}", layout.pending.len());
                });
            }
            Command::Partitions => {
                let Response::Partitions(parts) = self.call(Request::Partitions, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                let value = serde_json::to_value(&parts)?;
                self.emit(value, || {
                    let rows = parts
                        .iter()
                        .map(|p| {
                            vec![
                                p.partition.to_string(),
                                p.entries.to_string(),
                                p.bytes.to_string(),
                                format!("{:016x}", p.digest),
                                version_text(&p.version),
                            ]
                        })
                        .collect();
                    table(
                        &["partition", "entries", "bytes", "digest", "version vector"],
                        rows,
                    )
                });
            }
            Command::Get { key } => {
                let Response::Record(record) = self
                    .call(
                        Request::Get {
                            key: arg_bytes(&key)?,
                        },
                        1,
                    )
                    .await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                match &record {
                    None if !self.json => anyhow::bail!("key {key} not found"),
                    _ => {}
                }
                self.emit(json!({"key": key, "record": record_json(&record)}), || {
                    if let Some(r) = &record {
                        say!("{}", value_text(&r.value));
                        say!("kind: {}", r.value.kind());
                        say!("context: {}", token(&r.context));
                        for other in &r.other_kinds {
                            say!(
                                "also, created concurrently as {}: {}",
                                other.kind(),
                                value_text(other)
                            );
                        }
                    }
                });
            }
            Command::Put {
                key,
                value,
                context,
                lww,
                w,
            } => {
                let key = arg_bytes(&key)?;
                let value = arg_bytes(&value)?;
                let context = context
                    .map(|t| t.parse::<CausalContext>().map(|c| c.to_bytes()))
                    .transpose()?;
                let request = if lww {
                    Request::PutLww { key, value }
                } else {
                    Request::Put {
                        key,
                        value,
                        context,
                    }
                };
                let Response::Context(ctx) = self.call(request, w).await? else {
                    anyhow::bail!("unexpected answer")
                };
                self.emit(json!({"context": token(&ctx)}), || {
                    say!("ok, context {}", token(&ctx))
                });
            }
            Command::Delete { key, context, w } => {
                let context = context
                    .map(|t| t.parse::<CausalContext>().map(|c| c.to_bytes()))
                    .transpose()?;
                let Response::Context(ctx) = self
                    .call(
                        Request::Delete {
                            key: arg_bytes(&key)?,
                            context,
                        },
                        w,
                    )
                    .await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                self.emit(json!({"context": token(&ctx)}), || {
                    say!("deleted, context {}", token(&ctx))
                });
            }
            Command::Counter(CounterCommand::Add { key, amount, w }) => {
                let Response::Counter(n) = self
                    .call(
                        Request::CounterAdd {
                            key: arg_bytes(&key)?,
                            amount,
                        },
                        w,
                    )
                    .await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                self.emit(json!({"value": n}), || say!("{n}"));
            }
            Command::Counter(CounterCommand::Get { key }) => {
                let Response::Counter(n) = self
                    .call(
                        Request::CounterGet {
                            key: arg_bytes(&key)?,
                        },
                        1,
                    )
                    .await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                self.emit(json!({"value": n}), || say!("{n}"));
            }
            Command::Set(command) => {
                let (request, w) = match command {
                    SetCommand::Add { key, member, w } => (
                        Request::SetAdd {
                            key: arg_bytes(&key)?,
                            member: arg_bytes(&member)?,
                        },
                        w,
                    ),
                    SetCommand::Remove { key, member, w } => (
                        Request::SetRemove {
                            key: arg_bytes(&key)?,
                            member: arg_bytes(&member)?,
                        },
                        w,
                    ),
                    SetCommand::Members { key } => (
                        Request::SetMembers {
                            key: arg_bytes(&key)?,
                        },
                        1,
                    ),
                };
                match self.call(request, w).await? {
                    Response::Members(members) => {
                        let shown: Vec<String> = members.iter().map(|m| show(m)).collect();
                        self.emit(json!({"members": shown}), || {
                            shown.iter().for_each(|m| say!("{m}"))
                        });
                    }
                    Response::Context(ctx) => {
                        self.emit(json!({"context": token(&ctx)}), || say!("ok"))
                    }
                    _ => anyhow::bail!("unexpected answer"),
                }
            }
            Command::Keys {
                prefix,
                limit,
                start_after,
                local,
            } => {
                let prefix = arg_bytes(&prefix)?;
                let request = match local {
                    true => Request::Keys { prefix, limit },
                    false => Request::List {
                        prefix,
                        start_after: start_after.as_deref().map(arg_bytes).transpose()?,
                        limit,
                        since: Vec::new(),
                    },
                };
                let Response::Keys(keys) = self.call(request, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|(k, kind)| vec![show(k), kind.clone()])
                    .collect();
                self.emit(
                    json!(keys
                        .iter()
                        .map(|(k, kind)| json!({"key": show(k), "kind": kind}))
                        .collect::<Vec<_>>()),
                    || table(&["key", "kind"], rows),
                );
            }
            Command::Inspect { key } => {
                let Response::Inspect(views) = self
                    .call(
                        Request::Inspect {
                            key: arg_bytes(&key)?,
                        },
                        1,
                    )
                    .await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                let answered: Vec<_> = views.iter().filter(|v| v.answered).collect();
                let agree = answered.windows(2).all(|w| w[0].record == w[1].record)
                    && answered.len() == views.len();
                let contexts: Vec<Option<CausalContext>> = views
                    .iter()
                    .map(|v| {
                        v.record
                            .as_ref()
                            .and_then(|r| CausalContext::from_bytes(&r.context).ok())
                    })
                    .collect();
                let mut newest = CausalContext::new();
                for c in contexts.iter().flatten() {
                    newest.join(c);
                }
                let behind: Vec<(String, u64)> = views
                    .iter()
                    .zip(&contexts)
                    .map(|(v, c)| {
                        let lacks = newest
                            .dots()
                            .filter(|d| !c.as_ref().is_some_and(|c| c.covers(*d)))
                            .count() as u64;
                        (v.node.clone(), lacks)
                    })
                    .collect();
                let replicas: Vec<Json> = views
                    .iter()
                    .zip(&behind)
                    .map(|(v, (_, lacks))| json!({"node": v.node, "answered": v.answered, "record": record_json(&v.record), "behind_by_writers": lacks}))
                    .collect();
                self.emit(
                    json!({"key": key, "agree": agree, "replicas": replicas}),
                    || {
                        let rows = views
                            .iter()
                            .zip(&behind)
                            .map(|(v, (_, lacks))| {
                                let value = match (&v.record, v.answered) {
                                    (_, false) => "(no answer)".to_string(),
                                    (None, true) => "(absent)".to_string(),
                                    (Some(r), true) => value_text(&r.value),
                                };
                                let context = v
                                    .record
                                    .as_ref()
                                    .map(|r| token(&r.context))
                                    .unwrap_or_default();
                                let state = if *lacks == 0 {
                                    "up to date".to_string()
                                } else {
                                    format!("behind ({lacks} writers' latest)")
                                };
                                vec![v.node.clone(), value, context, state]
                            })
                            .collect();
                        table(&["replica", "value", "context", "state"], rows);
                        say!(
                            "{}",
                            if agree {
                                "replicas agree"
                            } else {
                                "replicas DIFFER"
                            }
                        );
                    },
                );
            }
            Command::Diff { node_a, node_b } => {
                let fetch = |addr| async move {
                    let client = self.connect(addr, true).await?;
                    let response = client.request(&Request::Partitions).await;
                    client.close().await;
                    match response? {
                        Response::Partitions(p) => Ok::<Vec<PartitionInfo>, anyhow::Error>(p),
                        _ => anyhow::bail!("unexpected answer from {addr}"),
                    }
                };
                let (a, b) = (fetch(node_a).await?, fetch(node_b).await?);
                let b_by: BTreeMap<u16, &PartitionInfo> =
                    b.iter().map(|p| (p.partition, p)).collect();
                let mut rows = Vec::new();
                for pa in &a {
                    let Some(pb) = b_by.get(&pa.partition) else {
                        continue;
                    };
                    if pa.digest != pb.digest {
                        rows.push((
                            pa.partition,
                            lacking(&pb.version, &pa.version),
                            lacking(&pa.version, &pb.version),
                        ));
                    }
                }
                let value = json!(rows.iter().map(|(p, a_lacks, b_lacks)| json!({"partition": p, "a_lacks": a_lacks, "b_lacks": b_lacks})).collect::<Vec<_>>());
                self.emit(value, || {
                    if rows.is_empty() {
                        say!("{node_a} and {node_b} agree on every partition both hold");
                    } else {
                        let rows = rows
                            .iter()
                            .map(|(p, x, y)| vec![p.to_string(), x.to_string(), y.to_string()])
                            .collect();
                        table(
                            &[
                                "partition",
                                &format!("{node_a} lacks"),
                                &format!("{node_b} lacks"),
                            ],
                            rows,
                        );
                    }
                });
            }
            Command::Devices => self.devices().await?,
            Command::Node(command) => {
                let (request, what) = match command {
                    NodeCommand::SetCapacity { capacity } => (
                        Request::SetCapacity { capacity },
                        json!({"capacity": capacity}),
                    ),
                    NodeCommand::SetZone { zone, .. } => (
                        Request::SetZone { zone: zone.clone() },
                        json!({"zone": zone}),
                    ),
                };
                let Response::Done = self.call(request, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                self.emit(what.clone(), || {
                    say!(
                        "{} set on {}: the layout follows (kvctl layout, kvctl migrations)",
                        what,
                        self.node
                    );
                });
            }
            Command::Migrations {
                budget: Some(bytes_per_sec),
                ..
            } => {
                let Response::Done = self
                    .call(Request::SetMigrationBudget { bytes_per_sec }, 1)
                    .await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                let shown = if bytes_per_sec == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{bytes_per_sec} bytes/s")
                };
                self.emit(json!({"budget_bytes_per_sec": (bytes_per_sec > 0).then_some(bytes_per_sec)}), || {
                    say!("migration budget of {}: {shown} (until it restarts; set rebalance.migration_budget_bytes_per_sec to keep it)", self.node);
                });
            }
            Command::Migrations {
                watch,
                budget: None,
            } => loop {
                let Response::Migrations(m) = self.call(Request::Migrations, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                let seconds = m.elapsed_ms as f64 / 1e3;
                let left = m.total.saturating_sub(m.done);
                // Rate and ETA in partitions: what is left is known in
                // partitions, not in entries, until each stream is done.
                let rate = if seconds > 0.0 {
                    m.done as f64 / seconds
                } else {
                    0.0
                };
                let eta = (rate > 0.0 && left > 0).then(|| left as f64 / rate);
                let value = json!({
                    "layout_version": m.layout_version,
                    "in_flight": m.in_flight.iter().map(|(p, s)| json!({"partition": p, "source": s})).collect::<Vec<_>>(),
                    "partitions_total": m.total,
                    "partitions_done": m.done,
                    "partitions_left": left,
                    "entries_moved": m.entries,
                    "bytes_moved": m.bytes,
                    "partitions_per_second": rate,
                    "eta_seconds": eta,
                    "streams": m.streams.iter().map(|st| {
                        let (rate, eta) = stream_rate(st);
                        json!({
                            "partition": st.partition, "phase": st.phase, "source": st.source,
                            "entries_total": st.entries_total, "entries_done": st.entries_done,
                            "bytes_total": st.bytes_total, "bytes_done": st.bytes_done,
                            "bytes_per_second": rate, "eta_seconds": eta,
                            "since_progress_ms": st.since_progress_ms, "restarts": st.restarts,
                            "stalled": st.stalled,
                        })
                    }).collect::<Vec<_>>(),
                    "budget_bytes_per_sec": m.budget_bytes_per_sec,
                    "bytes_queued_to_send": m.bytes_queued_to_send,
                });
                self.emit(value, || {
                    if !m.streams.is_empty() {
                        let rows = m
                            .streams
                            .iter()
                            .map(|st| {
                                let (rate, eta) = stream_rate(st);
                                let of = |done: u64, total: Option<u64>| match total {
                                    Some(t) => format!("{done}/{t}"),
                                    None => format!("{done}/?"),
                                };
                                vec![
                                    st.partition.to_string(),
                                    st.source.clone(),
                                    of(st.entries_done, st.entries_total),
                                    of(st.bytes_done, st.bytes_total),
                                    format!("{rate:.0}"),
                                    eta.map_or("-".into(), |e| format!("{e:.0}s")),
                                    st.stalled.clone().unwrap_or_else(|| "-".into()),
                                ]
                            })
                            .collect();
                        table(&["partition", "source", "entries", "bytes", "bytes/s", "eta", "stalled"], rows);
                    }
                    if m.budget_bytes_per_sec.is_some() || m.bytes_queued_to_send > 0 {
                        say!(
                            "sending: budget {}, {} bytes waiting for it",
                            m.budget_bytes_per_sec.map_or("unlimited".into(), |b| format!("{b} bytes/s")),
                            m.bytes_queued_to_send
                        );
                    }
                    let width = 30;
                    let filled = (m.done * width).checked_div(m.total).unwrap_or(width).min(width);
                    say!(
                        "[{}{}] {}/{} partitions (layout v{}), {} entries / {} bytes moved, {:.1} partitions/s{}",
                        "#".repeat(filled),
                        "-".repeat(width - filled),
                        m.done,
                        m.total,
                        m.layout_version,
                        m.entries,
                        m.bytes,
                        rate,
                        eta.map(|e| format!(", ETA {e:.0}s")).unwrap_or_default()
                    );
                });
                if !watch || left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            },
            Command::Token(TokenCommand::Create {
                name,
                prefixes,
                read,
                write,
                expires,
            }) => {
                if !read && !write {
                    anyhow::bail!("a token must allow --read, --write or both");
                }
                let request = Request::TokenCreate {
                    name: name.clone(),
                    prefixes: prefixes.into_iter().map(String::into_bytes).collect(),
                    read,
                    write,
                    expires_in_seconds: expires,
                };
                let Response::TokenCreated { id, secret } = self.call(request, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                self.emit(json!({"id": id, "name": name, "secret": secret}), || {
                    say!("{secret}");
                    eprintln!("token {name:?} (id {id}): the secret above is shown once; send it as `Authorization: Bearer <secret>`");
                });
            }
            Command::Token(TokenCommand::List) => {
                let Response::Tokens(tokens) = self.call(Request::TokenList, 1).await? else {
                    anyhow::bail!("unexpected answer")
                };
                let value = serde_json::to_value(&tokens)?;
                self.emit(value, || {
                    let rows = tokens
                        .iter()
                        .map(|t| {
                            let rights = match (t.read, t.write) {
                                (true, true) => "read, write",
                                (true, false) => "read",
                                _ => "write",
                            };
                            vec![
                                t.name.clone(),
                                t.id.clone(),
                                t.prefixes
                                    .iter()
                                    .map(|p| format!("{p:?}"))
                                    .collect::<Vec<_>>()
                                    .join(" "),
                                rights.into(),
                                t.expires.clone().unwrap_or_else(|| "never".into()),
                                t.state.clone(),
                            ]
                        })
                        .collect();
                    table(
                        &["name", "id", "prefixes", "rights", "expires", "state"],
                        rows,
                    );
                });
            }
            Command::Token(TokenCommand::Revoke { name_or_id }) => {
                let Response::Revoked(n) = self
                    .call(
                        Request::TokenRevoke {
                            name_or_id: name_or_id.clone(),
                        },
                        1,
                    )
                    .await?
                else {
                    anyhow::bail!("unexpected answer")
                };
                self.emit(json!({"revoked": n}), || {
                    if n == 0 {
                        say!("{name_or_id:?} was already revoked")
                    } else {
                        say!("revoked {n} token(s) named {name_or_id:?}; every node refuses it once gossip reaches it (about 10 ms on a LAN)")
                    }
                });
            }
            Command::Join { seed } => {
                self.call(Request::Join { seed }, 1).await?;
                self.emit(json!({"joining": seed.to_string()}), || {
                    say!("joining through {seed}")
                });
            }
            Command::Leave { no_wait } => {
                self.call(Request::Leave, 1).await?;
                if no_wait {
                    self.emit(json!({"leaving": true}), || {
                        say!("decommissioning; `kvctl status` shows when it is done")
                    });
                    return Ok(());
                }
                // Wait until the node has handed everything off and left.
                let started = std::time::Instant::now();
                loop {
                    let Response::Status(s) = self.call(Request::Status, 1).await? else {
                        anyhow::bail!("unexpected answer")
                    };
                    if s.decommissioned {
                        self.emit(
                            json!({"left": true, "seconds": started.elapsed().as_secs()}),
                            || {
                                say!(
                                    "done: the node holds nothing and has left; it is safe to stop"
                                )
                            },
                        );
                        return Ok(());
                    }
                    if !self.json {
                        say!(
                            "{} partitions still held, {} migrating ({}s)",
                            s.partitions_held,
                            s.migrations_in_flight,
                            started.elapsed().as_secs()
                        );
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(node) = cli.node else {
        eprintln!("error: no node given: use --node ADDR or set KVCTL_NODE");
        return ExitCode::from(2);
    };
    let tls = match (&cli.tls_dir, cli.insecure) {
        (Some(dir), _) => match TlsIdentity::load(dir) {
            Ok(tls) => Some(tls),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        },
        (None, true) => None,
        (None, false) => {
            eprintln!("error: no client certificate: use --tls-dir DIR (or KVCTL_TLS_DIR), or --insecure for nodes started with --insecure");
            return ExitCode::from(2);
        }
    };
    let ctl = Ctl {
        node,
        tls,
        json: cli.output == Output::Json,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(ctl.run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(rows: &[(&str, u64, &[u64])]) -> Vec<(String, u64, Vec<u64>)> {
        rows.iter()
            .map(|(n, b, e)| (n.to_string(), *b, e.to_vec()))
            .collect()
    }

    #[test]
    fn lacking_counts_the_writes_one_vector_has_and_the_other_not() {
        let ahead = vv(&[("a", 10, &[]), ("b", 3, &[7])]);
        let behind = vv(&[("a", 6, &[8]), ("b", 3, &[])]);
        // a:7,9,10 and b:7.
        assert_eq!(lacking(&ahead, &behind), 4);
        assert_eq!(lacking(&behind, &ahead), 0);
        assert_eq!(lacking(&ahead, &ahead), 0);
    }

    #[test]
    fn bytes_show_as_text_or_base64_and_parse_back() {
        assert_eq!(show(b"hello"), "hello");
        let odd = [0xff, 0x00];
        assert_eq!(arg_bytes(&show(&odd)).unwrap(), odd);
        assert_eq!(
            arg_bytes(&show(b"base64:looks like")).unwrap(),
            b"base64:looks like"
        );
        assert!(arg_bytes("base64:!!!").is_err());
    }
}
