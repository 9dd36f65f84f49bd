//! The `feed` scenario: a change feed reader follows the cluster through a
//! random node at each step while writers put, overwrite and delete keys
//! under its prefix and outside it, through message loss and duplication,
//! a crash and restart, a cut, and a node joining (partitions move to it).
//!
//! Checks:
//! - no state of a key is sent twice (the same key with the same context),
//!   whatever node served the page;
//! - nothing outside the prefix is sent;
//! - after heal and convergence, a reader caught up through each node in
//!   turn holds, key by key, exactly the state (values, siblings and
//!   context) of one of the key's replicas; a deleted key is gone or a
//!   tombstone on both, also when the tombstone was purged before the
//!   reader saw it: the page then says `reconcile`, and the reader lists
//!   the prefix and drops what is not listed (`feed_reconciliations`).
//!   One replica, not all: replicas can differ in a hidden part of a key's
//!   state, the context of a purged tombstone that a replica which had not
//!   purged it yet merged into a concurrent write.

use crate::ledger::Ledger;
use crate::scenarios::{cluster, fail, settle, Outcome, Params, Report, Violation};
use crate::sim::{default_meta, NetConfig, Sim};
use gossipkv::client::{Call, Request, Response};
use gossipkv::crdt::{CausalContext, Record};
use gossipkv::store::decode_change;
use gossipkv::{NodeId, VersionVector};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const PREFIX: &[u8] = b"feed/";

/// What a reader holds of a key: its record (`None`: deleted) and context.
type Seen = (Option<Record>, CausalContext);

#[derive(Default)]
struct Reader {
    frontier: Vec<(u16, VersionVector)>,
    state: BTreeMap<Vec<u8>, Seen>,
    versions: BTreeSet<(Vec<u8>, Vec<u8>)>,
    pages: u64,
    refused: u64,
    reconciliations: u64,
    reconcile_pending: bool,
}

/// Every live key under the prefix, listed through `node` from replicas
/// that cover the frontier `since`; `None` when a listing page is refused
/// (during faults, or while no replica has caught up).
fn list_all(
    sim: &mut Sim,
    node: NodeId,
    since: &[(u16, VersionVector)],
) -> Option<BTreeSet<Vec<u8>>> {
    let mut keys = BTreeSet::new();
    let mut start_after = None;
    loop {
        let request = Request::List {
            prefix: PREFIX.to_vec(),
            start_after: start_after.clone(),
            limit: 1000,
            since: since.to_vec(),
        };
        let limit = sim.coordinator.quorum_timeout * 2;
        let ticket = sim.call(
            node,
            Call {
                request,
                w: 1,
                r: 1,
            },
        )?;
        let Some(Response::Keys(page)) = sim.wait_reply(ticket, limit).map(|r| r.response) else {
            return None;
        };
        let full = page.len() == 1000;
        start_after = page.last().map(|(k, _)| k.clone());
        keys.extend(page.into_iter().map(|(k, _)| k));
        if !full {
            return Some(keys);
        }
    }
}

impl Reader {
    /// Reads one page through `node`; `Ok(true)` when it says the reader
    /// is caught up (no changes, nothing more).
    fn page(&mut self, sim: &mut Sim, node: NodeId) -> Result<bool, Violation> {
        let request = Request::Changes {
            prefix: PREFIX.to_vec(),
            since: self.frontier.clone(),
            limit: 7,
            reconcile_pending: self.reconcile_pending,
            from_now: false,
        };
        let limit = sim.coordinator.quorum_timeout * 2;
        let Some(ticket) = sim.call(
            node,
            Call {
                request,
                w: 1,
                r: 1,
            },
        ) else {
            return Ok(false);
        };
        let page = match sim.wait_reply(ticket, limit).map(|r| r.response) {
            Some(Response::Changes(page)) => page,
            // Unavailable during faults, or the node crashed: try again.
            Some(Response::Error(_)) | None => {
                self.refused += 1;
                return Ok(false);
            }
            Some(other) => return Err(fail(format!("a feed page was answered {other:?}"))),
        };
        self.pages += 1;
        // Deletes may have been purged unseen: the prefix's live keys, from
        // replicas that cover the page's frontier, before taking anything
        // of the page (a refused listing means asking for the page again).
        let live = match page.reconcile {
            false => None,
            true => match list_all(sim, node, &page.frontier) {
                Some(live) => Some(live),
                None => {
                    self.refused += 1;
                    return Ok(false);
                }
            },
        };
        for entry in &page.entries {
            if !entry.key.starts_with(PREFIX) {
                return Err(fail(format!(
                    "node {node} sent {} outside the prefix",
                    String::from_utf8_lossy(&entry.key)
                )));
            }
            let (record, context) = decode_change(&entry.key, &entry.entry)
                .map_err(|e| fail(format!("a feed entry does not decode: {e}")))?;
            if !self
                .versions
                .insert((entry.key.clone(), context.to_bytes()))
            {
                return Err(fail(format!(
                    "node {node} sent a state of {} the reader already had (context {context})",
                    String::from_utf8_lossy(&entry.key)
                )));
            }
            self.state.insert(entry.key.clone(), (record, context));
        }
        for (p, vv) in &self.frontier {
            let now = page.frontier.iter().find(|(q, _)| q == p);
            if !now.is_some_and(|(_, v)| v.dominates(vv)) {
                return Err(fail(format!("the frontier of partition {p} went back")));
            }
        }
        if let Some(live) = live {
            self.reconciliations += 1;
            for (key, (record, _)) in self.state.iter_mut() {
                if record.is_some() && !live.contains(key) {
                    *record = None;
                }
            }
        }
        let caught_up = page.entries.is_empty() && !page.more && !page.reconcile;
        self.frontier = page.frontier;
        self.reconcile_pending = page.reconcile_pending;
        Ok(caught_up)
    }

    /// Pages through `node` until caught up.
    fn follow(&mut self, sim: &mut Sim, node: NodeId) -> Result<(), Violation> {
        for _ in 0..10_000 {
            if self.page(sim, node)? {
                return Ok(());
            }
        }
        Err(fail(format!(
            "the feed through node {node} never caught up"
        )))
    }
}

pub fn feed(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(4).max(3);
    let keys = params.keys.unwrap_or(80).max(10);
    let mut sim = cluster(params, n)?;
    sim.net = NetConfig {
        loss: 0.03,
        duplicate: 0.1,
        delay_ms: (1, 30),
        disk_ms: (1, 8),
    };
    let mut reader = Reader::default();
    let steps = keys * 3;
    let newcomer = NodeId(n as u64 + 1);
    let mut crashed = None;
    let mut value = 0u64;
    let mut written = BTreeSet::new();
    let mut calls = 0u64;
    for s in 0..steps {
        for _ in 0..3 {
            let up = sim.up_nodes();
            let node = up[sim.rng().random_range(0..up.len())];
            // Every key of the prefix once first, so that every one is
            // checked; then at random, inside the prefix or not.
            let (i, inside) = if calls < keys {
                (calls, true)
            } else {
                (sim.rng().random_range(0..keys), sim.rng().random_bool(0.7))
            };
            calls += 1;
            let key = match inside {
                true => format!("feed/{i:04}").into_bytes(),
                false => format!("other/{i:04}").into_bytes(),
            };
            value += 1;
            let request = match sim.rng().random_range(0..10) {
                0 => Request::Delete {
                    key: key.clone(),
                    context: None,
                },
                _ => Request::Put {
                    key: key.clone(),
                    value: format!("v{value}").into_bytes(),
                    context: None,
                },
            };
            let w = sim.rng().random_range(1..=2u8);
            sim.call(node, Call { request, w, r: 1 });
            if inside {
                written.insert(key);
            }
        }
        let up = sim.up_nodes();
        let node = up[sim.rng().random_range(0..up.len())];
        reader.page(&mut sim, node)?;
        match s {
            _ if s == steps / 5 => {
                let victim = up[sim.rng().random_range(0..up.len())];
                sim.crash(victim);
                crashed = Some(victim);
            }
            _ if s == steps * 2 / 5 => {
                if let Some(id) = crashed.take() {
                    sim.restart(id);
                }
            }
            _ if s == steps / 2 => {
                let (a, b) = up.split_at(1);
                sim.split(a, b);
            }
            _ if s == steps * 3 / 5 => sim.heal(),
            _ if s == steps * 7 / 10 => {
                let seed = sim.addr(NodeId(1));
                sim.add_joining_node(newcomer, default_meta(), seed);
            }
            _ => {}
        }
        sim.run_for(Duration::from_millis(100));
    }
    sim.heal();
    if let Some(id) = crashed.take() {
        sim.restart(id);
    }
    sim.net = NetConfig::default();
    settle(&mut sim, Duration::from_secs(1800), "feed (after heal)")?;
    // Caught up through every node in turn: the same state each time.
    for node in sim.up_nodes() {
        reader.follow(&mut sim, node)?;
        compare(&sim, &reader, &written)?;
    }
    let mut report = Report::default();
    report.metric("feed_pages", reader.pages as f64, "pages");
    report.metric("feed_pages_refused", reader.refused as f64, "pages");
    report.metric("feed_keys_checked", written.len() as f64, "keys");
    report.metric(
        "feed_reconciliations",
        reader.reconciliations as f64,
        "listings",
    );
    Ok(report)
}

/// The reader's state of every key against its replicas'.
fn compare(sim: &Sim, reader: &Reader, written: &BTreeSet<Vec<u8>>) -> Result<(), Violation> {
    let up = sim.up_nodes();
    for key in written {
        let mut held = Vec::new();
        for holder in Ledger::holders(sim, key, &up) {
            let store = sim
                .store(holder)
                .ok_or_else(|| fail("a holder has no store"))?;
            let state = match store.entry_bytes(key) {
                Ok(Some(bytes)) => {
                    Some(decode_change(key, &bytes).map_err(|e| fail(e.to_string()))?)
                }
                Ok(None) => None,
                Err(e) => return Err(fail(e.to_string())),
            };
            held.push((holder, state));
        }
        if held.is_empty() {
            return Err(fail("a key has no replica up"));
        }
        let seen = reader.state.get(key);
        let matches = held.iter().any(|(_, state)| match (state, seen) {
            (Some(state), Some(seen)) => state == seen,
            // Deleted and purged, never seen or seen deleted.
            (None, None) | (None, Some((None, _))) => true,
            _ => false,
        });
        if matches {
            continue;
        }
        return Err(fail(format!(
            "{}: the replicas hold {held:?}, the caught-up reader {seen:?}",
            String::from_utf8_lossy(key)
        )));
    }
    Ok(())
}
