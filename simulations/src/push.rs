//! The `push-handover` scenario: exactly once for devices' pushed writes
//! while the primary replica of their keys moves.
//!
//! A device pushes counter adds, one sequence number after another, each
//! retried until it gets an answer the device sees; half the answers are
//! lost, and the retry goes to another node, as a phone's would after a
//! cut connection. Meanwhile the primary of the keys (the one replica that
//! applies pushes) loses them to a capacity change, and for a while hears
//! nothing of the new layout: it still thinks it is the primary and
//! applies what reaches it, while the new primary takes the retries.
//! On even seeds the old primary is also cut off from every other node
//! for that while (they see it down; devices still reach it). Afterwards
//! every replica's counter must equal the adds pushed: a retry applied by
//! the new primary after the old one applied the first attempt counts
//! twice.

use crate::scenarios::{cluster, fail, settle, Outcome, Params, Report};
use crate::sim::NetConfig;
use gossipkv::client::{Call, Request, Response};
use gossipkv::store::partition_of;
use gossipkv::NodeId;
use rand::Rng;
use std::collections::BTreeMap;
use std::time::Duration;

const DEVICE: u64 = 0xd1ce;

pub fn push_handover(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(4).max(4);
    let mut sim = cluster(params, n)?;
    // Duplicated and reordered messages, none lost: a lost forward costs
    // the device a whole quorum timeout, and the lost answers are drawn
    // below.
    sim.net = NetConfig {
        duplicate: 0.05,
        delay_ms: (1, 30),
        ..NetConfig::default()
    };
    let partitions = sim.partitions;
    let before = sim
        .layout()
        .ok_or_else(|| fail("no layout"))?
        .current()
        .clone();
    // The old primary: not the layout coordinator (the lowest id), which
    // would hear of the layout it proposes.
    let old = NodeId(2);
    sim.withhold_layout.insert(old);
    sim.set_capacity(old, 1);
    let coordinator = NodeId(1);
    let version = before.version();
    sim.run_until_condition(Duration::from_millis(100), Duration::from_secs(30), |s| {
        s.replica(coordinator)
            .is_some_and(|r| r.layout().current().version() > version)
    })
    .ok_or_else(|| fail("the capacity change made no new layout"))?;
    let after = sim
        .replica(coordinator)
        .ok_or_else(|| fail("node 1 is down"))?
        .layout()
        .current()
        .clone();
    let keys: Vec<Vec<u8>> = (0..10_000u32)
        .map(|i| format!("push/{i}").into_bytes())
        .filter(|k| {
            let p = partition_of(k, partitions);
            before.replicas(p).first() == Some(&old) && after.replicas(p).first() != Some(&old)
        })
        .take(6)
        .collect();
    if keys.is_empty() {
        return Err(fail("the capacity change moved no primary off node 2"));
    }
    // Partitions whose primary stayed keep their fence from the layout
    // before: only moved ones wait (here, for node 2).
    let moved: Vec<u16> = (0..partitions)
        .filter(|&p| before.replicas(p).first() != after.replicas(p).first())
        .collect();
    let others: Vec<NodeId> = sim.node_ids().into_iter().filter(|&n| n != old).collect();
    sim.run_until_condition(Duration::from_millis(100), Duration::from_secs(30), |s| {
        others.iter().all(|&n| {
            s.replica(n)
                .is_some_and(|r| r.layout().current().version() > version)
        })
    })
    .ok_or_else(|| fail("the new layout did not reach every node but node 2"))?;
    for &n in &others {
        let replica = sim.replica(n).ok_or_else(|| fail("a node is down"))?;
        for (p, waiting) in replica.push_fences_pending() {
            if !moved.contains(&p) {
                return Err(fail(format!(
                    "node {n} fences partition {p}, whose primary did not move (waiting for {waiting:?})"
                )));
            }
        }
    }
    let cut = params.seed.is_multiple_of(2);
    if cut {
        sim.split(&[old], &others);
    }

    let mut expected: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    let (mut pushes, mut lost, mut refused, mut attempts, mut unanswered) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let start = sim.now;
    let release = start + Duration::from_secs(8);
    let end = start + Duration::from_secs(30);
    let limit = sim.coordinator.quorum_timeout * 2;
    let mut seq = 0u64;
    while sim.now < end {
        seq += 1;
        let key = keys[sim.rng().random_range(0..keys.len())].clone();
        *expected.entry(key.clone()).or_default() += 1;
        pushes += 1;
        let mut tries = 0;
        loop {
            tries += 1;
            if tries > 2_000 {
                return Err(fail(format!(
                    "push {seq} was never answered in 2,000 tries"
                )));
            }
            if !sim.withhold_layout.is_empty() && sim.now >= release {
                sim.withhold_layout.clear();
                sim.heal();
            }
            let up = sim.up_nodes();
            let node = up[sim.rng().random_range(0..up.len())];
            let call = Call {
                request: Request::Pushed {
                    device: DEVICE,
                    seq,
                    op: Box::new(Request::CounterAdd {
                        key: key.clone(),
                        amount: 1,
                    }),
                },
                w: 1,
                r: 1,
            };
            attempts += 1;
            let Some(ticket) = sim.call(node, call) else {
                continue;
            };
            match sim.wait_reply(ticket, limit).map(|r| r.response) {
                Some(Response::Error(_)) => {
                    refused += 1;
                    sim.run_for(Duration::from_millis(50));
                }
                Some(_) if sim.rng().random_bool(0.5) => lost += 1,
                Some(_) => break,
                None => unanswered += 1,
            }
        }
    }
    sim.withhold_layout.clear();
    sim.net = NetConfig::default();
    settle(&mut sim, Duration::from_secs(300), "push-handover")?;

    for (key, &want) in &expected {
        let p = partition_of(key, partitions);
        let layout = sim
            .layout()
            .ok_or_else(|| fail("no layout"))?
            .current()
            .clone();
        for &node in layout.replicas(p) {
            let store = sim
                .store(node)
                .ok_or_else(|| fail(format!("node {node} has no store")))?;
            let got = store.counter(key).map_err(|e| fail(e.to_string()))?;
            if got != want {
                return Err(fail(format!(
                    "key {} on node {node}: counter {got}, but {want} adds were pushed ({} applied twice or lost)",
                    String::from_utf8_lossy(key),
                    got - want
                )));
            }
        }
    }
    let mut report = Report::default();
    report.metric("pushes", pushes as f64, "writes");
    report.metric("push_attempts", attempts as f64, "calls");
    report.metric("answers_lost", lost as f64, "answers");
    report.metric("refused_while_moving", refused as f64, "answers");
    report.metric("unanswered", unanswered as f64, "calls");
    report.metric("old_primary_cut_off", f64::from(u8::from(cut)), "bool");
    report.metric("applied_twice", 0.0, "writes");
    Ok(report)
}
