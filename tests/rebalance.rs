//! Load-aware rebalancing on a real 4-node cluster: a skewed client load
//! makes one node hot, `layout plan` proposes moves off it, `apply` makes
//! them, the hot node's share of the work falls, nothing acknowledged is
//! lost, and a plan cannot be applied twice.

mod common;

use common::{client, eventually, settled, Cluster};
use gossipkv::client::{Client, Request, Response};
use gossipkv::{Store, StoreOptions};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONFIG: &str = "[rebalance]\nload_report_interval_ms = 300\nhalf_life_secs = 2\nsettle_secs = 2\ncooldown_secs = 600\n";

/// Each node's share of the cluster's work, as its gossiped load says.
async fn shares(admin: &Client) -> Vec<(String, f64)> {
    let Ok(Response::ClusterMembers(members)) = admin.request(&Request::ClusterMembers).await
    else {
        return Vec::new();
    };
    let work: Vec<(String, f64)> = members
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                m.load.as_ref().map_or(0.0, |l| l.partitions.work as f64),
            )
        })
        .collect();
    let total: f64 = work.iter().map(|(_, w)| w).sum();
    work.into_iter()
        .map(|(n, w)| (n, if total > 0.0 { w / total } else { 0.0 }))
        .collect()
}

type Counts = Arc<std::sync::Mutex<HashMap<String, i64>>>;

/// A 4-node cluster under a skewed load: counter adds to 200 keys in four
/// partitions that node-1 coordinates, through every node, until `stop`.
struct Skewed {
    cluster: Cluster,
    clients: Vec<Arc<Client>>,
    admin: Client,
    stop: Arc<AtomicBool>,
    load: tokio::task::JoinSet<()>,
    acknowledged: Counts,
    attempted: Counts,
    layout_version: u64,
}

const HOT_NODE: &str = "node-1";

async fn skewed(config: &str) -> Skewed {
    let cluster = Cluster::start_with_config(4, config);
    let tls = cluster.client_tls();
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(client(cluster.addr(i), &tls).await);
    }
    settled(&clients, 4).await;
    let clients: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
    let admin = Client::connect_admin(cluster.addr(0), Some(&cluster.admin_tls()))
        .await
        .unwrap();
    let Ok(Response::Layout(layout)) = admin.request(&Request::Layout).await else {
        panic!("no layout");
    };
    // Hot keys: those whose partition node-1 coordinates (its first
    // replica), in four partitions.
    let partitions = layout.replicas.len() as u16;
    let dir = tempfile::tempdir().unwrap();
    let local = Store::open(
        dir.path().join("p.redb"),
        StoreOptions::default().partitions(partitions),
    )
    .unwrap();
    let hot_node = HOT_NODE;
    let mut hot_partitions = Vec::new();
    let mut hot_keys = Vec::new();
    for i in 0..100_000u32 {
        let key = format!("hot-{i}");
        let p = local.partition_of(key.as_bytes());
        if layout.replicas[usize::from(p)].first().map(String::as_str) != Some(hot_node) {
            continue;
        }
        if !hot_partitions.contains(&p) {
            if hot_partitions.len() == 4 {
                continue;
            }
            hot_partitions.push(p);
        }
        hot_keys.push(key);
        if hot_keys.len() == 200 {
            break;
        }
    }
    assert_eq!(hot_partitions.len(), 4, "{hot_partitions:?}");

    // The load: puts to the hot keys through every node, bounded in count
    // and time, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let attempted = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let mut load = tokio::task::JoinSet::new();
    for (w, c) in clients.iter().enumerate() {
        let c = c.clone();
        let keys = hot_keys.clone();
        let stop = stop.clone();
        let acknowledged = acknowledged.clone();
        let attempted = attempted.clone();
        load.spawn(async move {
            let started = Instant::now();
            for n in 0..200_000usize {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(120) {
                    break;
                }
                let key = &keys[(n * 7 + w) % keys.len()];
                attempted
                    .lock()
                    .unwrap()
                    .entry(key.clone())
                    .and_modify(|a| *a += 1)
                    .or_insert(1i64);
                if c.counter_add(key.as_bytes(), 1).await.is_ok() {
                    *acknowledged
                        .lock()
                        .unwrap()
                        .entry(key.clone())
                        .or_insert(0i64) += 1;
                }
            }
        });
    }

    Skewed {
        cluster,
        clients,
        admin,
        stop,
        load,
        acknowledged,
        attempted,
        layout_version: layout.version,
    }
}

impl Skewed {
    /// Stops the load, then checks that every counter holds at least the
    /// adds acknowledged and at most those attempted.
    async fn nothing_lost(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        while self.load.join_next().await.is_some() {}
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        let attempted = self.attempted.lock().unwrap().clone();
        assert!(!acknowledged.is_empty());
        let reader = &self.clients[2];
        for (key, &acked) in &acknowledged {
            let tried = attempted.get(key).copied().unwrap_or(0);
            eventually("every counter holds its acknowledged adds", || async {
                reader
                    .counter(key.as_bytes())
                    .await
                    .is_ok_and(|v| v >= acked && v <= tried)
            })
            .await;
        }
        drop(self.cluster);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_takes_load_off_the_hot_node_and_applies_once() {
    let skewed = skewed(CONFIG).await;
    let admin = &skewed.admin;
    let hot_node = HOT_NODE;
    // The hot node does more than its share, and a plan moves work off it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let plan = loop {
        assert!(
            Instant::now() < deadline,
            "no plan with moves off node-1 in 90 s"
        );
        if let Ok(Response::LayoutPlan(p)) = admin.request(&Request::LayoutPlan).await {
            // The busiest node is the hot one, and moves take work off it.
            let busiest = p
                .nodes
                .iter()
                .max_by(|a, b| (a.before / a.target).total_cmp(&(b.before / b.target)))
                .map(|n| n.node.clone());
            if busiest.as_deref() == Some(hot_node) && p.moves.iter().any(|m| m.from == hot_node) {
                break p;
            }
            eprintln!("plan: {}", p.summary);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The plan may come from the first reports, before the node the admin
    // asks has heard any load: wait for figures to compare against.
    let mut before = shares(admin).await;
    while before.iter().all(|(_, share)| *share == 0.0) {
        assert!(
            Instant::now() < deadline,
            "no member's load was gossiped in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        before = shares(admin).await;
    }
    let hot_before = before
        .iter()
        .find(|(n, _)| n == hot_node)
        .map_or(0.0, |s| s.1);
    eprintln!(
        "plan {}: {}; node shares before {before:?}",
        plan.id, plan.summary
    );
    assert!(plan.max_ratio_before > 1.25, "{plan:?}");
    assert!(plan.max_ratio_after < plan.max_ratio_before);

    let id = u64::from_str_radix(&plan.id, 16).unwrap();
    let applied = admin.request(&Request::LayoutApply { id }).await.unwrap();
    let Response::LayoutApplied { version } = applied else {
        panic!("{applied:?}")
    };
    assert!(version > plan.layout_version);
    // Twice: refused, saying so.
    let again = admin.request(&Request::LayoutApply { id }).await;
    let message = format!("{again:?}");
    assert!(message.contains("already applied"), "{message}");
    let unknown = admin.request(&Request::LayoutApply { id: id ^ 1 }).await;
    assert!(format!("{unknown:?}").contains("no plan"), "{unknown:?}");

    // The hot node's share falls under the trigger (1.25x a quarter). A
    // plan is bounded (8 moves) and estimates loads, so, as an operator
    // would, apply the next plans too until it does.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = shares(admin).await;
        let hot = now.iter().find(|(n, _)| n == hot_node).map_or(1.0, |s| s.1);
        if hot < 0.25 * 1.25 && hot < hot_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-1's share is still {hot:.2} of the work 90 s after the plan"
        );
        if let Ok(Response::LayoutPlan(p)) = admin.request(&Request::LayoutPlan).await {
            if let (false, Ok(id)) = (p.moves.is_empty(), u64::from_str_radix(&p.id, 16)) {
                eprintln!("next plan {}: {}", p.id, p.summary);
                let _ = admin.request(&Request::LayoutApply { id }).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    skewed.nothing_lost().await;
}

/// With `rebalance.auto = true` nobody applies anything: the lowest live
/// node plans and applies on its own, and the hot node's share falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_mode_takes_load_off_the_hot_node_by_itself() {
    let config = format!("{CONFIG}auto = true\n");
    let skewed = skewed(&config).await;
    let admin = &skewed.admin;
    eventually("the automatic planner moves work off node-1", || async {
        let Ok(Response::Layout(layout)) = admin.request(&Request::Layout).await else {
            return false;
        };
        let now = shares(admin).await;
        let hot = now.iter().find(|(n, _)| n == HOT_NODE).map_or(1.0, |s| s.1);
        layout.version > skewed.layout_version
            && layout.version == layout.completed
            && hot < 0.25 * 1.25
    })
    .await;
    skewed.nothing_lost().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_capacity_moves_replicas_and_survives_a_restart() {
    let mut cluster = Cluster::start(4);
    let tls = cluster.client_tls();
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(client(cluster.addr(i), &tls).await);
    }
    settled(&clients, 4).await;
    let admin_tls = cluster.admin_tls();
    let admin = Client::connect_admin(cluster.addr(3), Some(&admin_tls))
        .await
        .unwrap();
    let held = |s: &gossipkv::client::NodeStatus| s.partitions_held;
    let before = held(&clients[3].status().await.unwrap());

    // Refused, with the reason.
    let zero = admin.request(&Request::SetCapacity { capacity: 0 }).await;
    assert!(format!("{zero:?}").contains("at least 1"), "{zero:?}");
    let long = admin
        .request(&Request::SetZone {
            zone: Some("z".repeat(65)),
        })
        .await;
    assert!(format!("{long:?}").contains("1 to 64 bytes"), "{long:?}");

    let done = admin
        .request(&Request::SetCapacity { capacity: 300 })
        .await
        .unwrap();
    assert_eq!(done, Response::Done);
    let done = admin
        .request(&Request::SetZone {
            zone: Some("rack-b".into()),
        })
        .await
        .unwrap();
    assert_eq!(done, Response::Done);
    eventually(
        "node-4 holds more partitions, the layout settled",
        || async {
            clients[3]
                .status()
                .await
                .is_ok_and(|s| held(&s) > before && s.layout_version == s.layout_completed)
        },
    )
    .await;

    // A restart keeps what was set, over the (default) configuration.
    drop(admin);
    cluster.stop(3);
    cluster.restart(3);
    let admin = Client::connect_admin(cluster.addr(0), Some(&admin_tls))
        .await
        .unwrap();
    eventually(
        "the restarted node-4 still says capacity 300 in rack-b",
        || async {
            let Ok(Response::ClusterMembers(members)) =
                admin.request(&Request::ClusterMembers).await
            else {
                return false;
            };
            members.iter().any(|m| {
                m.name == "node-4"
                    && m.state == "alive"
                    && m.capacity == Some(300)
                    && m.zone.as_deref() == Some("rack-b")
            })
        },
    )
    .await;
}

/// Bytes of migration chunks a node has sent, from its metrics.
fn migration_bytes_sent(cluster: &Cluster, i: usize) -> f64 {
    common::scrape(cluster.metrics[i])
        .lines()
        .find(|l| l.starts_with("gossipkv_migration_bytes_sent_total"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_budget_bounds_the_bytes_per_second_a_join_moves() {
    const BUDGET: u64 = 128 << 10;
    let mut cluster = Cluster::start(3);
    let tls = cluster.client_tls();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(client(cluster.addr(i), &tls).await);
    }
    settled(&clients, 3).await;
    let clients = Arc::new(clients);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut loaders = tokio::task::JoinSet::new();
    for t in 0..16 {
        let (clients, next) = (clients.clone(), next.clone());
        loaders.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 12_000 {
                    return;
                }
                let key = format!("budget-{i:06}");
                clients[t % 3]
                    .put(key.as_bytes(), &[b'v'; 100], None)
                    .await
                    .unwrap();
            }
        });
    }
    while loaders.join_next().await.is_some() {}
    let admin_tls = cluster.admin_tls();
    for i in 0..3 {
        let admin = Client::connect_admin(cluster.addr(i), Some(&admin_tls))
            .await
            .unwrap();
        let done = admin
            .request(&Request::SetMigrationBudget {
                bytes_per_sec: BUDGET,
            })
            .await
            .unwrap();
        assert_eq!(done, Response::Done);
        let Ok(Response::Migrations(m)) = admin.request(&Request::Migrations).await else {
            panic!("no migrations answer");
        };
        assert_eq!(m.budget_bytes_per_sec, Some(BUDGET));
    }
    let before: Vec<f64> = (0..3).map(|i| migration_bytes_sent(&cluster, i)).collect();
    let started = Instant::now();
    cluster.add_node();
    let newcomer = client(cluster.addr(3), &tls).await;
    eventually("the fourth node holds its share", || async {
        newcomer.status().await.is_ok_and(|s| {
            s.members_alive == 4 && s.layout_version > 1 && s.layout_version == s.layout_completed
        })
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut total = 0.0;
    for (i, b) in before.iter().enumerate() {
        let sent = migration_bytes_sent(&cluster, i) - b;
        total += sent;
        // A second of burst and a chunk of credit on top of the budget.
        let allowed = BUDGET as f64 * (elapsed + 1.0) + 64.0 * 1024.0;
        assert!(
            sent <= allowed,
            "node {i} sent {sent} bytes in {elapsed:.1} s, budget {BUDGET}/s"
        );
    }
    eprintln!("a join moved {total} bytes in {elapsed:.1} s under {BUDGET} bytes/s per source");
    // The test is real: the join moved more than one second of budget.
    assert!(
        total > 2.0 * BUDGET as f64,
        "the join moved only {total} bytes"
    );
}
