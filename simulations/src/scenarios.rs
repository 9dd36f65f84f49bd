//! The scenarios: each sets up a cluster, applies a workload and faults,
//! checks its invariants and reports figures.

use crate::ledger::{counter_key, register_key, set_key, Ledger};
use crate::sim::{default_meta, NetConfig, Sim};
use gossipkv::replication::layout::Layout;
use gossipkv::NodeId;
use rand::Rng;
use std::time::Duration;

pub const SCENARIOS: &[&str] = &[
    "converge",
    "steady",
    "partition",
    "churn",
    "join",
    "rejoin",
    "rebalance",
    "isolated-restart",
    "quorum",
    "feed",
    "push-handover",
    "hotspot",
    "noise",
    "shifting",
    "join-interrupted",
];

/// What a scenario is run with.
#[derive(Clone, Debug)]
pub struct Params {
    pub nodes: Option<usize>,
    pub seed: u64,
    pub keys: Option<u64>,
    pub sweep: bool,
    pub partitions: u16,
    pub replicas: u8,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            nodes: None,
            seed: 1,
            keys: None,
            sweep: false,
            partitions: 256,
            replicas: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub metrics: Vec<Metric>,
}

impl Report {
    pub(crate) fn metric(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        self.metrics.push(Metric {
            name: name.into(),
            value,
            unit,
        });
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }
}

/// An invariant that did not hold, in one line.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation(pub String);

pub(crate) type Outcome = Result<Report, Violation>;

pub(crate) const ROUND: Duration = Duration::from_secs(1);

pub(crate) fn fail(reason: impl Into<String>) -> Violation {
    Violation(reason.into())
}

pub fn run(name: &str, params: &Params) -> Outcome {
    match name {
        "converge" => converge(params),
        "steady" => steady(params),
        "partition" => partition(params),
        "churn" => churn(params),
        "join" => join(params),
        "rejoin" => rejoin(params),
        "rebalance" => rebalance(params),
        "isolated-restart" => isolated_restart(params),
        "quorum" => crate::quorum::quorum(params),
        "feed" => crate::feed::feed(params),
        "push-handover" => crate::push::push_handover(params),
        "hotspot" => crate::load::hotspot(params),
        "noise" => crate::load::noise(params),
        "shifting" => crate::load::shifting(params),
        "join-interrupted" => join_interrupted(params),
        other => Err(fail(format!(
            "unknown scenario {other:?}; scenarios: {}",
            SCENARIOS.join(", ")
        ))),
    }
}

/// A cluster of `n` nodes whose membership has settled.
pub(crate) fn cluster(params: &Params, n: usize) -> Result<Sim, Violation> {
    let mut sim = Sim::new(params.seed, n, params.partitions, params.replicas);
    sim.bootstrap(n);
    let limit = Duration::from_secs(60 + 2 * n as u64);
    sim.run_until_condition(ROUND, limit, |s| {
        s.up_nodes().iter().all(|&id| {
            s.replica(id)
                .is_some_and(|r| r.membership().alive().len() + 1 == n)
        })
    })
    .ok_or_else(|| {
        fail(format!(
            "membership of {n} nodes did not settle in {limit:?}"
        ))
    })?;
    Ok(sim)
}

pub(crate) fn settle(sim: &mut Sim, limit: Duration, what: &str) -> Result<Duration, Violation> {
    sim.run_until_condition(ROUND, limit, Sim::converged)
        .ok_or_else(|| {
            fail(format!(
                "{what}: replicas did not converge within {limit:?}: {}",
                sim.divergence().unwrap_or_default()
            ))
        })
}

fn rounds(d: Duration) -> f64 {
    d.as_secs_f64() / ROUND.as_secs_f64()
}

fn converge_once(params: &Params, n: usize, keys: u64) -> Result<f64, Violation> {
    let mut sim = cluster(params, n)?;
    let up = sim.up_nodes();
    let mut ledger = Ledger::default();
    let keys: Vec<Vec<u8>> = (0..keys).map(register_key).collect();
    ledger.put_many(&mut sim, &keys, &up);
    let took = settle(&mut sim, Duration::from_secs(600), "converge")?;
    ledger.check(&sim).map_err(fail)?;
    Ok(rounds(took))
}

/// Random writes on random replicas, then quiet: every replica of every
/// key ends equal; how many anti-entropy rounds that takes.
fn converge(params: &Params) -> Outcome {
    let mut report = Report::default();
    let keys = params.keys.unwrap_or(1_000);
    if params.sweep {
        for n in [10usize, 100, 1_000] {
            let r = converge_once(params, n, keys)?;
            report.metric(format!("rounds_to_converge_n{n}"), r, "rounds");
            report.metric(format!("log2_n{n}"), (n as f64).log2(), "rounds");
        }
    } else {
        let n = params.nodes.unwrap_or(10);
        let r = converge_once(params, n, keys)?;
        report.metric("rounds_to_converge", r, "rounds");
        report.metric("log2_n", (n as f64).log2(), "rounds");
    }
    Ok(report)
}

/// An in-sync cluster: what anti-entropy costs when nothing differs.
fn steady(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(10);
    let mut sim = cluster(params, n)?;
    let up = sim.up_nodes();
    let mut ledger = Ledger::default();
    let keys: Vec<Vec<u8>> = (0..params.keys.unwrap_or(1_000))
        .map(register_key)
        .collect();
    ledger.put_many(&mut sim, &keys, &up);
    settle(&mut sim, Duration::from_secs(300), "steady")?;
    let before = sim.bytes_of("digest");
    let repair_before = sim.bytes_of("repair");
    let measured = 20u32;
    sim.run_for(ROUND * measured);
    let digest = sim.bytes_of("digest") - before;
    let repair = sim.bytes_of("repair") - repair_before;
    if repair > 0 {
        return Err(fail(format!(
            "an in-sync cluster sent {repair} repair bytes"
        )));
    }
    let mut report = Report::default();
    report.metric(
        "digest_bytes_per_node_round",
        digest as f64 / (n as f64 * f64::from(measured)),
        "bytes",
    );
    Ok(report)
}

/// Split in two while both sides write the same keys and add to the same
/// counters; heal; everything converges with nothing acknowledged lost.
fn partition(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(6);
    let mut sim = cluster(params, n)?;
    let nodes = sim.up_nodes();
    let (left, right) = nodes.split_at(n / 2);
    let (left, right) = (left.to_vec(), right.to_vec());
    let mut ledger = Ledger::default();
    let keys = params.keys.unwrap_or(200);
    let all: Vec<Vec<u8>> = (0..keys).map(register_key).collect();
    ledger.put_many(&mut sim, &all, &nodes);
    settle(
        &mut sim,
        Duration::from_secs(300),
        "partition (before split)",
    )?;

    sim.split(&left, &right);
    for step in 0..20 {
        for side in [&left, &right] {
            for _ in 0..(keys / 10).max(1) {
                let k = sim.rng().random_range(0..keys);
                if sim.rng().random_range(0..5) == 0 {
                    ledger.delete(&mut sim, &register_key(k), side);
                } else {
                    ledger.put(&mut sim, &register_key(k), side);
                }
            }
            for c in 0..4 {
                let amount = sim.rng().random_range(-5..=10);
                ledger.add(&mut sim, &counter_key(c), amount, side);
            }
        }
        let _ = step;
        sim.run_for(ROUND);
    }
    sim.heal();
    let took = settle(&mut sim, Duration::from_secs(600), "partition (after heal)")?;
    ledger.check(&sim).map_err(fail)?;
    // Once every replica has seen the deletes, their tombstones go.
    let purge_wait = sim.config.purge_interval * 3;
    sim.run_for(purge_wait);
    ledger.check(&sim).map_err(fail)?;
    let purged: u64 = sim
        .up_nodes()
        .iter()
        .filter_map(|&n| sim.replica(n))
        .map(|r| r.stats().tombstones_purged)
        .sum();
    if ledger.deletes > 0 && purged == 0 {
        return Err(fail(
            "no tombstone was purged although every replica saw the deletes",
        ));
    }
    let mut report = Report::default();
    report.metric("tombstones_purged", purged as f64, "tombstones");
    report.metric("rounds_to_converge_after_heal", rounds(took), "rounds");
    report.metric("acknowledged_writes", ledger.acknowledged as f64, "writes");
    Ok(report)
}

/// Crashes, restarts, joins and leaves under loss, duplication and
/// reordering, with writes throughout; after quiet, all converge and
/// nothing acknowledged is lost.
fn churn(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(8);
    let mut sim = cluster(params, n)?;
    sim.net = NetConfig {
        loss: 0.05,
        duplicate: 0.05,
        delay_ms: (1, 80),
        ..NetConfig::default()
    };
    let mut ledger = Ledger::default();
    let keys = params.keys.unwrap_or(300);
    let mut next_id = n as u64 + 1;
    let mut crashed: Vec<NodeId> = Vec::new();
    let mut leaving: Vec<NodeId> = Vec::new();
    for step in 0..60u32 {
        let up: Vec<NodeId> = sim
            .up_nodes()
            .into_iter()
            .filter(|n| !leaving.contains(n))
            .collect();
        for _ in 0..5 {
            let k = sim.rng().random_range(0..keys);
            if sim.rng().random_range(0..6) == 0 {
                ledger.delete(&mut sim, &register_key(k), &up);
            } else {
                ledger.put(&mut sim, &register_key(k), &up);
            }
        }
        let amount = sim.rng().random_range(1..=3);
        ledger.add(&mut sim, &counter_key(0), amount, &up);
        if step % 6 == 3 {
            match sim.rng().random_range(0..4) {
                0 if crashed.len() < 2 && up.len() > 4 => {
                    let victim = up[sim.rng().random_range(1..up.len())];
                    sim.crash(victim);
                    crashed.push(victim);
                }
                1 if !crashed.is_empty() => {
                    let back = crashed.remove(0);
                    sim.restart(back);
                }
                2 => {
                    let id = NodeId(next_id);
                    next_id += 1;
                    let seed = sim.addr(up[0]);
                    sim.add_joining_node(id, default_meta(), seed);
                }
                _ if leaving.is_empty() && up.len() > 4 => {
                    let goer = up[sim.rng().random_range(1..up.len())];
                    sim.leave(goer);
                    leaving.push(goer);
                }
                _ => {}
            }
        }
        sim.run_for(ROUND);
    }
    // Quiet: crashed nodes come back, the network heals.
    for id in crashed.drain(..) {
        sim.restart(id);
    }
    sim.net = NetConfig::default();
    let took = settle(&mut sim, Duration::from_secs(900), "churn")?;
    // A node that left hands everything off, then says it may stop.
    for id in &leaving {
        sim.run_until_condition(ROUND, Duration::from_secs(60), |s| {
            s.replica(*id).is_none_or(|r| r.has_left())
        })
        .ok_or_else(|| fail(format!("node {id} never finished leaving")))?;
        sim.crash(*id);
    }
    ledger.check(&sim).map_err(fail)?;
    let mut report = Report::default();
    report.metric("rounds_to_converge_after_churn", rounds(took), "rounds");
    report.metric("acknowledged_writes", ledger.acknowledged as f64, "writes");
    report.metric(
        "streams_broken",
        sim.up_nodes()
            .iter()
            .filter_map(|&n| sim.replica(n))
            .map(|r| r.stats().streams_broken)
            .sum::<u64>() as f64,
        "streams",
    );
    Ok(report)
}

/// Sum of key and entry bytes of the partitions `node` holds.
fn share_bytes(sim: &Sim, node: NodeId) -> Result<u64, Violation> {
    let (Some(replica), Some(store)) = (sim.replica(node), sim.store(node)) else {
        return Err(fail(format!("node {node} is down")));
    };
    let mut bytes = 0;
    for p in replica.layout().current().partitions_of(node) {
        bytes += store
            .partition_stats(p)
            .map_err(|e| fail(e.to_string()))?
            .bytes;
    }
    Ok(bytes)
}

fn loaded_cluster(params: &Params, n: usize) -> Result<(Sim, Ledger), Violation> {
    let mut sim = cluster(params, n)?;
    let up = sim.up_nodes();
    let mut ledger = Ledger::default();
    let keys: Vec<Vec<u8>> = (0..params.keys.unwrap_or(100_000))
        .map(register_key)
        .collect();
    ledger.put_many(&mut sim, &keys, &up);
    settle(&mut sim, Duration::from_secs(900), "initial load")?;
    Ok((sim, ledger))
}

fn current_layout(sim: &Sim) -> Result<Layout, Violation> {
    sim.layout()
        .map(|l| l.current().clone())
        .ok_or_else(|| fail("no node is up to report a layout"))
}

/// The replica slots `node` gained between two layouts; a violation if any
/// other node gained one.
fn only_gainer(
    before: &Layout,
    after: &Layout,
    node: NodeId,
    what: &str,
) -> Result<usize, Violation> {
    let mut gained = std::collections::BTreeMap::<NodeId, usize>::new();
    for change in before.changes_to(after) {
        for n in change.gained {
            *gained.entry(n).or_default() += 1;
        }
    }
    if gained.keys().any(|&g| g != node) {
        return Err(fail(format!(
            "{what} moved partitions to nodes other than {node}: {gained:?}"
        )));
    }
    Ok(gained.get(&node).copied().unwrap_or(0))
}

/// A node joins under a migration budget while its links are cut every few
/// seconds and it crashes once half-way: every stream resumes from what it
/// applied, so the bytes it receives stay near its share (a restart from
/// zero would multiply them), the sources stay within their budget, and
/// nothing written is lost.
fn join_interrupted(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(5);
    let (mut sim, ledger) = loaded_cluster(params, n)?;
    let newcomer = NodeId(n as u64 + 1);
    // The budget: the newcomer's share (about r/(n+1) of the data) in
    // roughly 40 s from the n sources together.
    let data: u64 = sim
        .up_nodes()
        .iter()
        .filter_map(|&id| share_bytes(&sim, id).ok())
        .sum();
    let share = data / (n as u64 + 1);
    let budget = (share / 40 / n as u64).max(512);
    sim.set_migration_budget(Some(budget));
    let sent_before = sim.migration_bytes_sent();
    let seed = sim.addr(NodeId(1));
    sim.add_joining_node(newcomer, default_meta(), seed);
    let others: Vec<NodeId> = (1..=n as u64).map(NodeId).collect();
    let started = sim.now();
    let mut cuts = 0;
    let mut crashed = false;
    // Cut the newcomer off for 2 s in every 6, for two minutes; crash and
    // restart it once, 20 s in.
    for round in 0..20 {
        sim.run_for(Duration::from_secs(4));
        sim.split(&[newcomer], &others);
        cuts += 1;
        sim.run_for(Duration::from_secs(2));
        sim.heal();
        if round == 3 && !crashed {
            sim.crash(newcomer);
            sim.run_for(Duration::from_secs(1));
            sim.restart(newcomer);
            crashed = true;
        }
        if sim.converged() {
            break;
        }
    }
    settle(&mut sim, Duration::from_secs(1800), "join-interrupted")?;
    let elapsed = sim.now().saturating_sub(started).as_secs_f64().max(1.0);
    ledger.check(&sim).map_err(fail)?;
    let received = sim.bytes_received(newcomer, &["migration", "repair"]);
    let own = share_bytes(&sim, newcomer)?;
    let sent = sim.migration_bytes_sent().saturating_sub(sent_before);
    let mut report = Report::default();
    let ratio = received as f64 / own.max(1) as f64;
    report.metric("join_interrupted_bytes_ratio", ratio, "ratio");
    report.metric("join_interrupted_cuts", f64::from(cuts), "cuts");
    report.metric(
        "join_interrupted_migration_bytes",
        sim.bytes_received(newcomer, &["migration"]) as f64,
        "bytes",
    );
    report.metric(
        "join_interrupted_repair_bytes",
        sim.bytes_received(newcomer, &["repair"]) as f64,
        "bytes",
    );
    report.metric("join_interrupted_share_bytes", own as f64, "bytes");
    if let Some(r) = sim.replica(newcomer) {
        let st = r.stats();
        report.metric(
            "newcomer_streams_broken",
            st.streams_broken as f64,
            "streams",
        );
        report.metric(
            "newcomer_migration_entries_merged",
            st.migration_entries_received as f64,
            "entries",
        );
        report.metric(
            "newcomer_migrations_done",
            st.migrations_done as f64,
            "partitions",
        );
        report.metric(
            "newcomer_migration_restarts",
            st.migration_restarts as f64,
            "streams",
        );
    }
    report.metric("sources_migration_payload_sent", sent as f64, "bytes");
    report.metric("join_interrupted_seconds", elapsed, "s");
    report.metric("migration_budget_bytes_per_sec", budget as f64, "bytes/s");
    report.metric(
        "migration_sent_bytes_per_sec_per_node",
        sent as f64 / elapsed / n as f64,
        "bytes/s",
    );
    // Frames cost more than their payload, a crash may lose a flushed
    // group, and each cut throws away the chunks in flight: 1.3-1.5x here
    // (seeds 1-5). Streams asked for again from an empty vector instead of
    // what was applied measure 2.4-2.6x.
    if ratio > 1.75 {
        return Err(fail(format!(
            "the newcomer received {received} bytes for a share of {own}: streams restarted instead of resuming"
        )));
    }
    // Each source within its budget plus a second's burst and one chunk.
    let chunk = gossipkv::store::ChunkLimits::default().max_bytes as f64;
    let allowed = n as f64 * (budget as f64 * (elapsed + 1.0) + chunk);
    if sent as f64 > allowed {
        return Err(fail(format!(
            "the sources sent {sent} migration bytes in {elapsed:.0} s, over their budget of {budget} bytes/s each"
        )));
    }
    Ok(report)
}

/// Five nodes hold the data; a sixth joins and receives only its share.
fn join(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(5);
    let (mut sim, ledger) = loaded_cluster(params, n)?;
    let before = current_layout(&sim)?;
    let newcomer = NodeId(n as u64 + 1);
    let seed = sim.addr(NodeId(1));
    sim.add_joining_node(newcomer, default_meta(), seed);
    settle(&mut sim, Duration::from_secs(1800), "join")?;
    ledger.check(&sim).map_err(fail)?;
    let after = current_layout(&sim)?;
    let moved = only_gainer(&before, &after, newcomer, "a join")?;
    let specs: Vec<_> = after
        .nodes()
        .into_iter()
        .map(|id| gossipkv::replication::layout::NodeSpec {
            id,
            capacity: 100,
            zone: None,
        })
        .collect();
    let ideal = Layout::quotas(after.partitions(), after.replication_factor(), &specs)
        .get(&newcomer)
        .copied()
        .unwrap_or(0);
    let received = sim.bytes_received(newcomer, &["migration", "repair"]);
    let share = share_bytes(&sim, newcomer)?;
    let mut report = Report::default();
    report.metric(
        "join_bytes_ratio",
        received as f64 / share.max(1) as f64,
        "ratio",
    );
    report.metric(
        "join_partitions_moved_ratio",
        moved as f64 / ideal.max(1) as f64,
        "ratio",
    );
    report.metric("join_bytes_received", received as f64, "bytes");
    report.metric(
        "join_migration_bytes",
        sim.bytes_received(newcomer, &["migration"]) as f64,
        "bytes",
    );
    report.metric(
        "join_repair_bytes",
        sim.bytes_received(newcomer, &["repair"]) as f64,
        "bytes",
    );
    report.metric("join_share_bytes", share as f64, "bytes");
    Ok(report)
}

/// A node goes away, 1% of keys change, it comes back: it receives only
/// what changed.
fn rejoin(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(5);
    let keys = params.keys.unwrap_or(100_000);
    let (mut sim, mut ledger) = loaded_cluster(params, n)?;
    let away = NodeId(n as u64);
    sim.crash(away);
    let others: Vec<NodeId> = sim.up_nodes();
    let changed: Vec<Vec<u8>> = (0..keys).step_by(100).map(register_key).collect();
    ledger.put_many(&mut sim, &changed, &others);
    sim.run_for(ROUND * 10);
    let before = sim.bytes_received(away, &["migration", "repair"]);
    sim.restart(away);
    settle(&mut sim, Duration::from_secs(900), "rejoin")?;
    ledger.check(&sim).map_err(fail)?;
    let received = sim.bytes_received(away, &["migration", "repair"]) - before;
    let share = share_bytes(&sim, away)?;
    let mut report = Report::default();
    report.metric(
        "rejoin_bytes_fraction",
        received as f64 / share.max(1) as f64,
        "ratio",
    );
    report.metric("rejoin_bytes_received", received as f64, "bytes");
    report.metric("rejoin_share_bytes", share as f64, "bytes");
    Ok(report)
}

/// One node's capacity doubles: partitions move only toward it.
fn rebalance(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(5);
    let (mut sim, ledger) = loaded_cluster(params, n)?;
    let before = current_layout(&sim)?;
    let grown = NodeId(1);
    sim.set_capacity(grown, 200);
    sim.run_until_condition(ROUND, Duration::from_secs(120), |s| {
        s.layout()
            .is_some_and(|l| l.current().version() > before.version())
    })
    .ok_or_else(|| fail("the capacity change produced no new layout"))?;
    settle(&mut sim, Duration::from_secs(1800), "rebalance")?;
    ledger.check(&sim).map_err(fail)?;
    let after = current_layout(&sim)?;
    let moved = only_gainer(&before, &after, grown, "a rebalance")?;
    if moved == 0 {
        return Err(fail("doubling a node's capacity moved nothing to it"));
    }
    let mut report = Report::default();
    report.metric("rebalance_slots_moved", moved as f64, "slots");
    report.metric(
        "rebalance_share_after",
        after.partitions_of(grown).len() as f64 / before.partitions_of(grown).len().max(1) as f64,
        "ratio",
    );
    Ok(report)
}

/// Issue 8's incident. A cluster grows from 3 nodes to `nodes` under set
/// and counter adds, so old replicas hand partitions off and drop them.
/// One that dropped partitions is killed, cut off from every peer and
/// restarted; writes are tried on it directly (as a node that takes a
/// write it should route would), on keys of partitions it dropped and of
/// partitions it holds, while the majority keeps writing. Then heal.
/// - The cut-off node must not change the layout (no one-replica layout).
/// - It must refuse writes to partitions whose own earlier writes it no
///   longer holds: taking one would claim those writes and make every
///   replica drop acknowledged set members and counter increments.
/// - After heal, nothing acknowledged is lost and nothing else appears.
fn isolated_restart(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(5).max(4);
    let first = 3;
    let sets = params.keys.unwrap_or(64).max(8);
    let mut sim = cluster(params, first)?;
    let mut ledger = Ledger::default();
    let mut member = 0u64;
    let write_round = |sim: &mut Sim, ledger: &mut Ledger, member: &mut u64, among: &[NodeId]| {
        for _ in 0..sets / 4 {
            let k = sim.rng().random_range(0..sets);
            *member += 1;
            ledger.set_add(sim, &set_key(k), format!("m{member}").as_bytes(), among);
            let c = sim.rng().random_range(0..sets);
            ledger.add(sim, &counter_key(c), 1, among);
        }
    };
    for _ in 0..5 {
        let up = sim.up_nodes();
        write_round(&mut sim, &mut ledger, &mut member, &up);
        sim.run_for(ROUND);
    }
    let seed = sim.addr(NodeId(1));
    for id in first as u64 + 1..=n as u64 {
        sim.add_joining_node(NodeId(id), default_meta(), seed);
        for _ in 0..5 {
            let up = sim.up_nodes();
            write_round(&mut sim, &mut ledger, &mut member, &up);
            sim.run_for(ROUND);
        }
    }
    settle(&mut sim, Duration::from_secs(1800), "growth")?;
    // Hand-off drops a partition once a current replica covers it.
    sim.run_for(sim.config.maintenance_interval * 5);
    let victim = (1..=first as u64)
        .map(NodeId)
        .max_by_key(|&id| sim.replica(id).map_or(0, |r| r.stats().partitions_dropped))
        .ok_or_else(|| fail("no node"))?;
    let Some(replica) = sim.replica(victim) else {
        return Err(fail("the victim is not up"));
    };
    let layout_before = replica.layout().summary();
    let partitions = replica.store().partitions();
    let dropped: Vec<u16> = (0..partitions)
        .filter(|&p| !replica.layout().holds(victim, p))
        .collect();
    if replica.stats().partitions_dropped == 0 || dropped.is_empty() {
        return Err(fail("no old replica dropped a partition after the growth"));
    }

    // Even seeds stop the node cleanly (it keeps its writer), odd ones
    // crash it (it restarts under a new writer).
    if params.seed.is_multiple_of(2) {
        sim.stop(victim);
    } else {
        sim.crash(victim);
    }
    let others: Vec<NodeId> = sim.up_nodes();
    sim.split(&[victim], &others);
    sim.restart(victim);
    let (mut refused, mut taken, mut taken_on_dropped) = (0u64, 0u64, 0u64);
    // Killed after its writes went out ahead of their flush, the node
    // restarts under a new writer (ARCHITECTURE.md, "Writer epochs"),
    // whose writes claim none of the old writer's: then its dropped
    // partitions take writes, and those must survive like any other.
    let rotated = sim.store(victim).is_some_and(|s| s.writer_id() != victim);
    for _ in 0..30 {
        for k in 0..sets {
            let key = set_key(k);
            let Some(store) = sim.store(victim) else {
                continue;
            };
            let p = store.partition_of(&key);
            member += 1;
            let m = format!("m{member}");
            let outcome = ledger.set_add_on(&sim, victim, &key, m.as_bytes());
            let counted = ledger.add_on(&sim, victim, &counter_key(k), 1);
            for result in [outcome, counted] {
                match result {
                    Ok(()) if dropped.contains(&p) => {
                        taken += 1;
                        taken_on_dropped += 1
                    }
                    Ok(()) => taken += 1,
                    Err(gossipkv::Error::OwnWritesMissing { .. }) if dropped.contains(&p) => {
                        refused += 1
                    }
                    Err(gossipkv::Error::OwnWritesMissing { .. }) => {}
                    Err(e) => return Err(fail(format!("a write on node {victim} failed: {e}"))),
                }
            }
        }
        write_round(&mut sim, &mut ledger, &mut member, &others);
        sim.run_for(ROUND);
        let Some(replica) = sim.replica(victim) else {
            return Err(fail("the victim went down"));
        };
        if replica.layout().summary() != layout_before {
            return Err(fail(format!(
                "node {victim}, restarted while cut off, changed the layout from v{} to v{}",
                layout_before.version,
                replica.layout().current().version()
            )));
        }
        for &o in &others {
            if sim.replica(o).map(|r| r.layout().summary()) != Some(layout_before) {
                return Err(fail(format!(
                    "node {o} changed the layout while one of {n} nodes was cut off"
                )));
            }
        }
    }
    if rotated && (refused > 0 || taken_on_dropped == 0) {
        return Err(fail(format!(
            "node {victim}, restarted under a new writer, refused {refused} writes to the partitions it dropped and took {taken_on_dropped}"
        )));
    }
    if !rotated && refused == 0 {
        return Err(fail(format!(
            "node {victim} refused no write to the partitions it dropped"
        )));
    }
    sim.heal();
    let took = settle(
        &mut sim,
        Duration::from_secs(900),
        "isolated restart (after heal)",
    )?;
    ledger.check(&sim).map_err(fail)?;
    let mut report = Report::default();
    report.metric("acknowledged_writes", ledger.acknowledged as f64, "writes");
    report.metric(
        "writes_refused_on_dropped_partitions",
        refused as f64,
        "writes",
    );
    report.metric("writes_taken_by_cut_off_node", taken as f64, "writes");
    report.metric(
        "writes_taken_on_dropped_partitions",
        taken_on_dropped as f64,
        "writes",
    );
    report.metric(
        "restarted_under_a_new_writer",
        f64::from(u8::from(rotated)),
        "",
    );
    report.metric("rounds_to_converge_after_heal", rounds(took), "rounds");
    Ok(report)
}
