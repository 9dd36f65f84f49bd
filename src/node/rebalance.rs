//! The node's side of load-aware rebalancing: it meters its work per
//! partition, gossips the bounded report with its load figures, and makes
//! and applies plans (`kvctl layout plan` / `apply`) with the sans-IO
//! planner (`replication::rebalance`).
//!
//! Invariants:
//! - A plan is applied only by the node that made it, only once, and only
//!   to the layout it was made from (same version, no change in
//!   progress); anything else is refused with one line saying why.
//! - Plans are refused until the current layout has been complete for
//!   `settle_secs`: loads measured across a layout change describe
//!   neither layout.
//! - The cool-down and the "continuing" state of the planner live here, in
//!   memory: a restarted node forgets which partitions moved recently.

use super::Core;
use crate::client::{ErrorCode, Failure, PlanInfo, PlanMove, PlanNode, Response};
use crate::replication::layout::LayoutMove;
use crate::replication::rebalance::{
    self, record_moves, Cooling, LoadReport, PartitionMeter, Plan, RebalanceConfig,
};
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// The `[rebalance]` table. Every field has a default.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebalanceSettings {
    /// How often the node measures and gossips its load (default 30000 ms).
    pub load_report_interval_ms: u64,
    /// Half-life of the decayed per-partition rates (default 60 s).
    pub half_life_secs: u64,
    /// Plan when a node's load exceeds this times its share (default 1.25).
    pub trigger: f64,
    /// Then move until every node is under this times its share (1.10).
    pub aim: f64,
    /// A partition that moved stays put this long (default 600 s).
    pub cooldown_secs: u64,
    /// Most moves in one plan, a swap counting two (default 8).
    pub max_moves: usize,
    /// A layout must have been complete this long before a plan (default
    /// 120 s).
    pub settle_secs: u64,
    /// Bytes per second this node sends migration chunks at, all streams
    /// together; 0 (the default): unlimited. `kvctl migrations --budget`
    /// changes it at run time.
    pub migration_budget_bytes_per_sec: u64,
    /// A migration stream into this node without progress this long is
    /// shown as stalled by `kvctl migrations`, with the reason (default 5).
    pub migration_stall_secs: u64,
    /// Plan and apply without an operator (default false): the live member
    /// with the smallest id does, at most once per report interval.
    pub auto: bool,
}

impl Default for RebalanceSettings {
    fn default() -> Self {
        let planner = RebalanceConfig::default();
        RebalanceSettings {
            load_report_interval_ms: 30_000,
            half_life_secs: 60,
            trigger: planner.trigger,
            aim: planner.aim,
            cooldown_secs: planner.cooldown.as_secs(),
            max_moves: planner.max_moves,
            settle_secs: 120,
            migration_budget_bytes_per_sec: 0,
            migration_stall_secs: 5,
            auto: false,
        }
    }
}

impl RebalanceSettings {
    /// Checks the values; the error names the field and what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.load_report_interval_ms < 100 {
            return Err((
                "rebalance.load_report_interval_ms",
                "must be at least 100".into(),
            ));
        }
        if self.half_life_secs == 0 {
            return Err(("rebalance.half_life_secs", "must be at least 1".into()));
        }
        if !(self.aim.is_finite() && self.aim >= 1.0) {
            return Err((
                "rebalance.aim",
                format!("{} is not a ratio >= 1.0", self.aim),
            ));
        }
        if !(self.trigger.is_finite() && self.trigger > self.aim) {
            return Err((
                "rebalance.trigger",
                format!("{} must be a ratio above aim ({})", self.trigger, self.aim),
            ));
        }
        if self.migration_stall_secs == 0 {
            return Err((
                "rebalance.migration_stall_secs",
                "must be at least 1".into(),
            ));
        }
        if self.max_moves == 0 || self.max_moves > 1024 {
            return Err((
                "rebalance.max_moves",
                format!("{} is not in 1..=1024", self.max_moves),
            ));
        }
        Ok(())
    }

    pub fn planner(&self) -> RebalanceConfig {
        RebalanceConfig {
            trigger: self.trigger,
            aim: self.aim,
            margin: RebalanceConfig::default().margin,
            cooldown: Duration::from_secs(self.cooldown_secs),
            max_moves: self.max_moves,
            settle: Duration::from_secs(self.settle_secs),
        }
    }

    pub fn report_interval(&self) -> Duration {
        Duration::from_millis(self.load_report_interval_ms)
    }
}

/// Plans kept for `apply`, and plans applied, per node.
const KEPT_PLANS: usize = 16;

pub(super) struct Rebalancing {
    pub(super) meter: PartitionMeter,
    auto: bool,
    /// `load_report_interval_ms`: how often load is gossiped, and how
    /// often automatic mode plans.
    pub(super) interval: Duration,
    last_auto: Option<Instant>,
    config: RebalanceConfig,
    cooling: Cooling,
    continuing: bool,
    plans: VecDeque<Plan>,
    /// (plan id, layout version it made).
    applied: VecDeque<(u64, u64)>,
    /// When this node first saw the completed layout version (version, at).
    layout_seen: Option<(u64, Instant)>,
}

impl Rebalancing {
    pub(super) fn new(partitions: u16, settings: &RebalanceSettings) -> Self {
        Rebalancing {
            meter: PartitionMeter::new(partitions, Duration::from_secs(settings.half_life_secs)),
            auto: settings.auto,
            interval: settings.report_interval(),
            last_auto: None,
            config: settings.planner(),
            cooling: Cooling::new(),
            continuing: false,
            plans: VecDeque::new(),
            applied: VecDeque::new(),
            layout_seen: None,
        }
    }

    /// How long the completed layout `version` has been in force here.
    pub(super) fn layout_age(&mut self, version: u64) -> Duration {
        match self.layout_seen {
            Some((v, at)) if v == version => at.elapsed(),
            _ => {
                self.layout_seen = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }
}

fn refuse(message: String) -> Response {
    Response::Error(Failure::new(ErrorCode::BadRequest, message))
}

impl Core {
    /// Folds the work counted since the last report into the decayed
    /// rates and returns the report to gossip.
    pub(super) fn load_report(&mut self) -> LoadReport {
        for (partition, work) in self.coordinator.take_work() {
            self.rebalancing.meter.count(partition, work);
        }
        self.rebalancing.meter.tick(self.now());
        let held = self.replica.layout().current().partitions_of(self.id);
        let store = self.replica.store().clone();
        self.rebalancing.meter.report(&held, |p| {
            store
                .partition_stats(p)
                .map_or((0, 0), |s| (s.entries, s.bytes))
        })
    }

    fn plan_info(&self, plan: &Plan) -> PlanInfo {
        PlanInfo {
            id: plan.id_hex(),
            layout_version: plan.base_version,
            summary: plan.summary.clone(),
            moves: plan
                .moves
                .iter()
                .map(|m| {
                    let (kind, from, to) = match m.change {
                        LayoutMove::Lead { from, to, .. } => ("lead", from, to),
                        LayoutMove::Replace { from, to, .. } => ("replica", from, to),
                    };
                    PlanMove {
                        kind: kind.into(),
                        partition: m.change.partition(),
                        from: self.node_name(from),
                        to: self.node_name(to),
                        ops_per_sec: m.ops_per_sec,
                        keys: m.keys,
                        bytes: m.bytes,
                    }
                })
                .collect(),
            nodes: plan
                .nodes
                .iter()
                .map(|n| PlanNode {
                    node: self.node_name(n.node),
                    target: n.target,
                    before: n.before,
                    after: n.after,
                })
                .collect(),
            max_ratio_before: plan.max_ratio_before,
            max_ratio_after: plan.max_ratio_after,
        }
    }

    /// Automatic mode (`rebalance.auto`): one proposer at a time, the live
    /// member with the smallest id, as for capacity layouts; it plans at
    /// most once per report interval and applies what it plans.
    pub(super) fn auto_rebalance(&mut self) {
        let r = &mut self.rebalancing;
        if !r.auto || r.last_auto.is_some_and(|at| at.elapsed() < r.interval) {
            return;
        }
        r.last_auto = Some(Instant::now());
        let lowest = self
            .replica
            .membership()
            .alive()
            .into_iter()
            .chain([self.id])
            .min();
        if lowest != Some(self.id) {
            return;
        }
        let Response::LayoutPlan(plan) = self.plan_layout() else {
            return; // a layout change in progress, or loads still settling
        };
        if plan.moves.is_empty() {
            return;
        }
        let Ok(id) = u64::from_str_radix(&plan.id, 16) else {
            return;
        };
        if let Response::Error(e) = self.apply_plan(id) {
            tracing::warn!(
                "automatic rebalancing could not apply its plan: {}",
                e.message
            );
        }
    }

    /// `kvctl layout plan`.
    pub(super) fn plan_layout(&mut self) -> Response {
        let layout = self.replica.layout().clone();
        let version = layout.current().version();
        if layout.in_transition() {
            return refuse(format!(
                "layout v{version} is still being applied (complete up to v{}): plan once it completes",
                layout.completed().version()
            ));
        }
        let age = self.rebalancing.layout_age(version);
        if age < self.rebalancing.config.settle {
            return refuse(format!(
                "layout v{version} has been complete for {}s here; loads are measured for {}s after a change completes before planning (rebalance.settle_secs)",
                age.as_secs(),
                self.rebalancing.config.settle.as_secs()
            ));
        }
        let now = self.now();
        let specs = self.replica.layout_specs(now);
        let own = self.load_report();
        let mut reports: BTreeMap<_, _> = self
            .replica
            .membership()
            .members()
            .into_iter()
            .filter_map(|m| Some((m.id, m.meta?.load.partitions)))
            .collect();
        reports.insert(self.id, own);
        // A node that has not reported yet (it just started, or its report
        // has not spread) would count as idle and draw every move.
        let current = layout.current();
        let silent = specs.iter().map(|s| s.id).find(|&id| {
            !current.partitions_of(id).is_empty() && reports.get(&id).is_none_or(|r| r.held == 0)
        });
        if let Some(id) = silent {
            return refuse(format!(
                "no load report from node {id} yet (nodes report every {} ms, rebalance.load_report_interval_ms): plan once every node holding partitions has reported",
                self.rebalancing.interval.as_millis()
            ));
        }
        let plan = rebalance::plan(
            layout.current(),
            &specs,
            &reports,
            &self.rebalancing.cooling,
            self.rebalancing.continuing,
            now,
            &self.rebalancing.config,
        );
        let info = self.plan_info(&plan);
        if !plan.moves.is_empty() {
            let plans = &mut self.rebalancing.plans;
            plans.retain(|p| p.id != plan.id);
            if plans.len() == KEPT_PLANS {
                plans.pop_front();
            }
            plans.push_back(plan);
        }
        Response::LayoutPlan(info)
    }

    /// `kvctl node set-capacity` / `set-zone`: saved first (so a restart
    /// keeps it), then gossiped; the layout follows like after any change
    /// of capacity or zone.
    pub(super) fn set_placement(
        &mut self,
        capacity: Option<u32>,
        zone: Option<Option<String>>,
    ) -> Response {
        if capacity == Some(0) {
            return refuse(
                "capacity must be at least 1 (decommission a node with `kvctl leave`)".into(),
            );
        }
        if let Some(Some(z)) = &zone {
            if let Err(reason) = crate::replication::membership::check_zone(z) {
                return refuse(reason);
            }
        }
        let mut placement = match super::files::load_placement(&self.data_dir) {
            Ok(p) => p,
            Err(e) => return Response::Error(Failure::new(ErrorCode::Internal, e.to_string())),
        };
        if capacity.is_some() {
            placement.capacity = capacity;
        }
        if zone.is_some() {
            placement.zone = zone.clone();
        }
        if let Err(e) = super::files::save_placement(&self.data_dir, &placement) {
            return Response::Error(Failure::new(
                ErrorCode::Internal,
                format!(
                    "could not save {}: {e}; nothing changed",
                    super::files::PLACEMENT_FILE
                ),
            ));
        }
        let mut meta = self.replica.membership().meta().clone();
        if let Some(c) = capacity {
            meta.capacity = c;
        }
        if let Some(z) = zone {
            meta.zone = z;
        }
        tracing::info!(capacity = meta.capacity, zone = ?meta.zone, "placement set by an operator");
        let outputs = self.replica.set_meta(self.now(), meta);
        self.carry_out(outputs);
        Response::Done
    }

    /// `kvctl layout apply ID`.
    pub(super) fn apply_plan(&mut self, id: u64) -> Response {
        if let Some(&(_, version)) = self.rebalancing.applied.iter().find(|(a, _)| *a == id) {
            return refuse(format!(
                "plan {id:016x} was already applied (it made layout v{version}): make a new plan"
            ));
        }
        let Some(at) = self.rebalancing.plans.iter().position(|p| p.id == id) else {
            return refuse(format!(
                "no plan {id:016x} on this node: a plan is applied on the node that made it (plans are kept in memory, the last {KEPT_PLANS}); run `kvctl layout plan` again"
            ));
        };
        let plan = self.rebalancing.plans[at].clone();
        let now = self.now();
        let moves = plan.layout_moves();
        match self
            .replica
            .apply_layout_moves(now, plan.base_version, &moves)
        {
            Ok(outputs) => {
                self.rebalancing.plans.remove(at);
                let version = self.replica.layout().current().version();
                let r = &mut self.rebalancing;
                record_moves(&mut r.cooling, &moves, now, &r.config);
                r.continuing = plan.continues;
                if r.applied.len() == KEPT_PLANS {
                    r.applied.pop_front();
                }
                r.applied.push_back((id, version));
                tracing::info!(
                    plan = %plan.id_hex(),
                    "applied a load plan: layout v{version}, {}",
                    plan.summary
                );
                self.carry_out(outputs);
                Response::LayoutApplied { version }
            }
            Err(reason) => refuse(format!("plan {id:016x} refused: {reason}")),
        }
    }
}
