//! The load planner (`gossipkv::replication::rebalance`) against a load
//! model, round by round (one round = one second of virtual time).
//!
//! Model: `keys` keys with Zipf popularity (exponent 1) share a fixed rate
//! of client operations; each key lives in one partition. A partition's
//! first replica does twice the work of the others (it coordinates every
//! call, the others apply its writes). Each node counts its work per
//! partition into the same decayed [`PartitionMeter`] and builds the same
//! bounded [`LoadReport`] the node gossips. Every `PLAN_EVERY` rounds, when
//! no move is in flight, the planner runs on those reports with the real
//! cool-down and bounds; its plan is applied with [`Layout::with_moves`]. A
//! lead change takes effect at once; a replica move after `MIGRATION`
//! rounds (the old holder keeps the partition's work until then).
//!
//! Scenarios:
//! - `hotspot`: the hottest keys sit in partitions node 0 coordinates, so it
//!   carries at least twice the mean load; the planner must bring the
//!   busiest node to at most 1.25x the mean, in no more moves than a
//!   greedy planner with exact loads and no bound per plan needs (plus
//!   slack of one plan), without moving a partition back.
//! - `noise`: hot keys spread at random, a warm-up lets the planner act
//!   once, then 1,000 rounds in which every partition's rate wanders by up
//!   to ±20%: no move and no flap allowed.
//! - `shifting`: the hot keys move to another node's partitions every 200
//!   rounds; after each shift the planner must bring the busiest node under
//!   the trigger before the next, with a bounded number of moves, and never
//!   move a partition back to the node it left.

use crate::scenarios::{fail, Outcome, Params, Report};
use gossipkv::replication::layout::{Layout, LayoutMove, NodeSpec};
use gossipkv::replication::rebalance::{
    plan, record_moves, Cooling, LoadReport, PartitionLoad, PartitionMeter, RebalanceConfig,
};
use gossipkv::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Duration;

/// Client operations per second over the whole cluster.
const TOTAL_OPS: f64 = 20_000.0;
const PLAN_EVERY: u64 = 10;
const MIGRATION: u64 = 20;
const HALF_LIFE: Duration = Duration::from_secs(5);
/// A partition back where it was within this many rounds is a flap.
const FLAP_WINDOW: u64 = 600;
/// Hot keys placed on purpose (the rest are spread by hash).
const HOT_KEYS: usize = 12;

/// A partition's holders (sorted) and leader.
type Placement = (Vec<NodeId>, NodeId);

struct Model {
    nodes: Vec<NodeSpec>,
    layout: Layout,
    /// What the nodes do until replica moves finish: the previous layout's
    /// holders keep the work of a partition in flight.
    serving: Layout,
    /// Round at which the moves in flight finish.
    landing: Option<(u64, Layout)>,
    /// Round at which the layout served last changed.
    served_since: u64,
    /// Per partition, its share of the operations.
    shares: Vec<f64>,
    /// Per partition, a noise factor (1 ± noise), redrawn every 10 rounds.
    noise: Vec<f64>,
    meters: BTreeMap<NodeId, PartitionMeter>,
    cooling: Cooling,
    config: RebalanceConfig,
    /// Per partition, the holder set and leader before its last move, to
    /// count flaps (a move back to where it was).
    history: BTreeMap<u16, Vec<(u64, Placement)>>,
    /// The last plan stopped short of the aim.
    continuing: bool,
    moves: u64,
    lead_moves: u64,
    flaps: u64,
    plans: u64,
    rng: StdRng,
}

fn zipf_popularity(keys: usize) -> Vec<f64> {
    let weights: Vec<f64> = (1..=keys).map(|k| 1.0 / k as f64).collect();
    let sum: f64 = weights.iter().sum();
    weights.into_iter().map(|w| w / sum).collect()
}

impl Model {
    fn new(params: &Params, n: usize) -> Model {
        let nodes: Vec<NodeSpec> = (1..=n as u64)
            .map(|i| NodeSpec::new(NodeId(i), 1))
            .collect();
        let layout = Layout::empty(params.partitions, params.replicas).next(&nodes);
        let meters = nodes
            .iter()
            .map(|s| (s.id, PartitionMeter::new(params.partitions, HALF_LIFE)))
            .collect();
        Model {
            serving: layout.clone(),
            layout,
            landing: None,
            served_since: 0,
            shares: vec![0.0; usize::from(params.partitions)],
            noise: vec![1.0; usize::from(params.partitions)],
            meters,
            cooling: Cooling::new(),
            config: RebalanceConfig {
                cooldown: Duration::from_secs(60),
                settle: Duration::from_secs(4 * HALF_LIFE.as_secs()),
                ..RebalanceConfig::default()
            },
            history: BTreeMap::new(),
            continuing: false,
            moves: 0,
            lead_moves: 0,
            flaps: 0,
            plans: 0,
            rng: StdRng::seed_from_u64(params.seed),
            nodes,
        }
    }

    /// Key popularity onto partitions: the `HOT_KEYS` hottest keys into
    /// distinct partitions that `hot_node` coordinates (or at random when
    /// `None`), the others by a seeded hash.
    fn place_keys(&mut self, keys: usize, hot_node: Option<NodeId>) {
        let popularity = zipf_popularity(keys);
        let partitions = self.layout.partitions();
        let mut shares = vec![0.0; usize::from(partitions)];
        let mut targets: Vec<u16> = match hot_node {
            Some(node) => (0..partitions)
                .filter(|&p| self.layout.replicas(p).first() == Some(&node))
                .collect(),
            None => Vec::new(),
        };
        // Which of the node's partitions take the hot keys varies by seed.
        for i in (1..targets.len()).rev() {
            let j = self.rng.random_range(0..=i);
            targets.swap(i, j);
        }
        let mut hash = StdRng::seed_from_u64(self.rng.random());
        for (rank, share) in popularity.iter().enumerate() {
            let p = match targets.get(rank) {
                Some(&p) if rank < HOT_KEYS => p,
                _ => hash.random_range(0..partitions),
            };
            shares[usize::from(p)] += share;
        }
        self.shares = shares;
    }

    /// The work of partition `p` on its replica of rank `rank` (the first
    /// replica coordinates: twice the others').
    fn work(&self, p: u16, rank: usize) -> f64 {
        let rate = TOTAL_OPS * self.shares[usize::from(p)] * self.noise[usize::from(p)];
        rate * if rank == 0 { 2.0 } else { 1.0 }
    }

    /// True work per node in the layout being served.
    fn true_loads(&self) -> BTreeMap<NodeId, f64> {
        let mut load: BTreeMap<NodeId, f64> = self.nodes.iter().map(|s| (s.id, 0.0)).collect();
        for p in 0..self.serving.partitions() {
            for (i, n) in self.serving.replicas(p).iter().enumerate() {
                *load.entry(*n).or_default() += self.work(p, i);
            }
        }
        load
    }

    fn max_over_mean(&self) -> f64 {
        let load = self.true_loads();
        let mean = load.values().sum::<f64>() / load.len().max(1) as f64;
        if mean <= 0.0 {
            return 0.0;
        }
        load.values().fold(0.0f64, |a, &b| a.max(b)) / mean
    }

    fn round(&mut self, round: u64, noise: f64) {
        if noise > 0.0 && round.is_multiple_of(10) {
            for f in &mut self.noise {
                *f = 1.0 + noise * (2.0 * self.rng.random::<f64>() - 1.0);
            }
        }
        if let Some((at, layout)) = self.landing.take() {
            if round >= at {
                self.serving = layout;
                self.served_since = round;
            } else {
                self.landing = Some((at, layout));
            }
        }
        let now = Duration::from_secs(round);
        for p in 0..self.serving.partitions() {
            for (i, &n) in self.serving.replicas(p).iter().enumerate() {
                let work = self.work(p, i);
                if let Some(meter) = self.meters.get_mut(&n) {
                    meter.count(p, work.round() as u64);
                }
            }
        }
        for meter in self.meters.values_mut() {
            meter.tick(now);
        }
        let settled = round.saturating_sub(self.served_since) >= self.config.settle.as_secs();
        if round.is_multiple_of(PLAN_EVERY) && self.landing.is_none() && settled {
            self.plan(now);
        }
    }

    fn reports(&self) -> BTreeMap<NodeId, LoadReport> {
        self.meters
            .iter()
            .map(|(&n, meter)| (n, meter.report(&self.serving.partitions_of(n), |_| (0, 0))))
            .collect()
    }

    fn plan(&mut self, now: Duration) {
        let reports = self.reports();
        let plan = plan(
            &self.layout,
            &self.nodes,
            &reports,
            &self.cooling,
            self.continuing,
            now,
            &self.config,
        );
        self.continuing = plan.continues;
        if plan.moves.is_empty() {
            return;
        }
        let moves = plan.layout_moves();
        let Ok(next) = self.layout.with_moves(&self.nodes, &moves) else {
            return;
        };
        self.plans += 1;
        let mut data = false;
        for m in &moves {
            let p = m.partition();
            let holders = |l: &Layout| {
                let mut h = l.replicas(p).to_vec();
                h.sort();
                h
            };
            let (before, after) = (
                (holders(&self.layout), self.layout.replicas(p)[0]),
                (holders(&next), next.replicas(p)[0]),
            );
            let past = self.history.entry(p).or_default();
            if past
                .iter()
                .any(|(at, old)| *old == after && now.as_secs() - at < FLAP_WINDOW)
            {
                self.flaps += 1;
            }
            past.push((now.as_secs(), before));
            self.moves += 1;
            match m {
                LayoutMove::Lead { .. } => self.lead_moves += 1,
                LayoutMove::Replace { .. } => data = true,
            }
        }
        record_moves(&mut self.cooling, &moves, now, &self.config);
        self.layout = next.clone();
        if data {
            self.landing = Some((now.as_secs() + MIGRATION, next));
        } else {
            self.serving = next;
            self.served_since = now.as_secs();
        }
    }

    /// Moves a greedy planner with exact loads, no cool-down and no bound
    /// per plan makes from this state.
    fn greedy_moves(&self) -> usize {
        // Exact: every partition named (the bound on the report is the
        // production planner's handicap, not the reference's).
        let mut reports = BTreeMap::new();
        for s in &self.nodes {
            let held = self.layout.partitions_of(s.id);
            let hot: Vec<PartitionLoad> = held
                .iter()
                .map(|&p| {
                    let rank = self
                        .layout
                        .replicas(p)
                        .iter()
                        .position(|m| *m == s.id)
                        .unwrap_or(1);
                    PartitionLoad {
                        partition: p,
                        ops_per_sec: self.work(p, rank).round() as u64,
                        keys: 0,
                        bytes: 0,
                    }
                })
                .collect();
            let report = LoadReport {
                work: hot.iter().map(|h| h.ops_per_sec).sum(),
                held: u32::try_from(held.len()).unwrap_or(u32::MAX),
                hot,
            };
            reports.insert(s.id, report);
        }
        // The fewest moves that bring every node under the trigger, one
        // best move at a time.
        let config = RebalanceConfig {
            max_moves: 10_000,
            cooldown: Duration::ZERO,
            aim: self.config.trigger,
            ..self.config.clone()
        };
        plan(
            &self.layout,
            &self.nodes,
            &reports,
            &Cooling::new(),
            false,
            Duration::ZERO,
            &config,
        )
        .moves
        .len()
    }
}

fn keys(params: &Params) -> usize {
    params.keys.unwrap_or(10_000).max(100) as usize
}

pub fn hotspot(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(10);
    let mut model = Model::new(params, n);
    model.place_keys(keys(params), Some(NodeId(1)));
    let initial = model.max_over_mean();
    if initial < 2.0 {
        return Err(fail(format!(
            "the hotspot is too mild to test anything: the busiest node carries {initial:.2}x the mean"
        )));
    }
    let greedy = model.greedy_moves();
    let mut settled_at = None;
    for round in 1..=600 {
        model.round(round, 0.0);
        if settled_at.is_none()
            && model.landing.is_none()
            && model.max_over_mean() <= model.config.trigger
        {
            settled_at = Some(round);
        }
    }
    let after = model.max_over_mean();
    let mut report = Report::default();
    report.metric("initial_max_over_mean_load", initial, "ratio");
    report.metric("max_over_mean_load", after, "ratio");
    report.metric("moves", model.moves as f64, "moves");
    report.metric("lead_moves", model.lead_moves as f64, "moves");
    report.metric("greedy_moves", greedy as f64, "moves");
    report.metric("plans", model.plans as f64, "plans");
    report.metric("flaps", model.flaps as f64, "moves");
    report.metric(
        "rounds_to_balance",
        settled_at.unwrap_or(0) as f64,
        "rounds",
    );
    if after > 1.25 {
        return Err(fail(format!(
            "the busiest node still carries {after:.2}x the mean load after 600 rounds"
        )));
    }
    let bound = 2 * greedy as u64 + model.config.max_moves as u64;
    if model.moves > bound {
        return Err(fail(format!(
            "{} moves where a greedy plan with exact loads needs {greedy} (bound {bound})",
            model.moves
        )));
    }
    if model.flaps > 0 {
        return Err(fail(format!(
            "{} moves took a partition back where it was",
            model.flaps
        )));
    }
    Ok(report)
}

pub fn noise(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(10);
    let mut model = Model::new(params, n);
    model.place_keys(keys(params), None);
    let initial = model.max_over_mean();
    let warmup = 400;
    for round in 1..=warmup {
        model.round(round, 0.0);
    }
    let warmup_moves = model.moves;
    let mut highest = 0.0f64;
    for round in warmup + 1..=warmup + 1000 {
        model.round(round, 0.2);
        highest = highest.max(model.max_over_mean());
    }
    let moves = model.moves - warmup_moves;
    let mut report = Report::default();
    report.metric("initial_max_over_mean_load", initial, "ratio");
    report.metric("warmup_moves", warmup_moves as f64, "moves");
    report.metric("highest_max_over_mean_load", highest, "ratio");
    report.metric("moves", moves as f64, "moves");
    report.metric("flaps", model.flaps as f64, "moves");
    if moves > 0 || model.flaps > 0 {
        return Err(fail(format!(
            "±20% noise on a stationary load caused {moves} moves and {} flaps",
            model.flaps
        )));
    }
    Ok(report)
}

pub fn shifting(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(10);
    let shifts = 5u64;
    let period = 200u64;
    let mut model = Model::new(params, n);
    let mut most_per_shift = 0u64;
    let mut worst_settled = 0.0f64;
    let mut report = Report::default();
    for shift in 0..shifts {
        let hot = NodeId(1 + (shift * 3) % n as u64);
        model.place_keys(keys(params), Some(hot));
        let greedy = model.greedy_moves() as u64;
        let before = model.moves;
        for r in 1..=period {
            model.round(shift * period + r, 0.05);
        }
        let settled = model.max_over_mean();
        worst_settled = worst_settled.max(settled);
        let moved = model.moves - before;
        most_per_shift = most_per_shift.max(moved);
        let bound = 2 * greedy + model.config.max_moves as u64;
        if moved > bound {
            return Err(fail(format!(
                "shift {shift}: {moved} moves where one best move at a time needs {greedy} (bound {bound})"
            )));
        }
        if settled > model.config.trigger {
            return Err(fail(format!(
                "shift {shift}: the busiest node carries {settled:.2}x the mean load {period} rounds after the hot set moved"
            )));
        }
    }
    report.metric("moves", model.moves as f64, "moves");
    report.metric("max_moves_per_shift", most_per_shift as f64, "moves");
    report.metric(
        "worst_max_over_mean_load_before_shift",
        worst_settled,
        "ratio",
    );
    report.metric("flaps", model.flaps as f64, "moves");
    if model.flaps > 0 {
        return Err(fail(format!(
            "{} moves took a partition back where it was",
            model.flaps
        )));
    }
    Ok(report)
}
