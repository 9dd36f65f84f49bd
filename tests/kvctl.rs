//! The real `kvctl` binary against real nodes: each command's table and JSON
//! hold the right facts, and every error path prints one line with the
//! documented exit code (0 ok, 1 error, 2 bad usage).

mod common;

use common::*;
use serde_json::Value as Json;
use std::process::{Command, Output};
use std::time::Duration;

struct Ctl {
    node: std::net::SocketAddr,
    tls: std::path::PathBuf,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .arg("--node")
            .arg(self.node.to_string())
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kvctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Json {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// Runs a failing command: its exit code and its one stderr line.
    fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        (out.status.code().unwrap_or(-1), stderr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_answers_with_the_right_facts_in_table_and_json() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, _clients) = started(3).await;
    let ctl = Ctl {
        node: cluster.addr(0),
        tls: cluster.dir.path().join("client"),
    };
    let other = Ctl {
        node: cluster.addr(1),
        tls: cluster.dir.path().join("client"),
    };

    let status = ctl.ok(&["status"]);
    assert!(
        status.contains("members alive") && status.contains("3 of 3"),
        "{status}"
    );
    assert_eq!(ctl.json(&["status"])["members_alive"], 3);

    let put = ctl.json(&["put", "greeting", "hello", "--w", "3"]);
    let token = put["context"].as_str().unwrap().to_string();
    assert!(!token.is_empty());
    let got = other.json(&["get", "greeting"]);
    assert_eq!(got["record"]["siblings"], serde_json::json!(["hello"]));
    assert_eq!(got["record"]["kind"], "register");
    assert!(other.ok(&["get", "greeting"]).contains("context: "));

    // A write with the read's context replaces what it saw.
    ctl.ok(&["put", "greeting", "hi", "--context", &token, "--w", "3"]);
    let inspect = ctl.json(&["inspect", "greeting"]);
    assert_eq!(inspect["agree"], true, "{inspect}");
    assert_eq!(inspect["replicas"].as_array().unwrap().len(), 3);
    assert!(inspect["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["record"]["siblings"] == serde_json::json!(["hi"])));
    assert!(ctl.ok(&["inspect", "greeting"]).contains("replicas agree"));

    let members = ctl.json(&["members"]);
    assert_eq!(members.as_array().unwrap().len(), 3);
    // Peers were heard from recently; load figures travel with metadata.
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["last_heard_ms"].as_u64().is_some_and(|ms| ms < 30_000)),
        "{members}"
    );
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["load"].is_object()),
        "{members}"
    );
    assert!(ctl.ok(&["members"]).contains("alive"));
    let layout = ctl.json(&["layout"]);
    assert_eq!(layout["replicas"].as_array().unwrap().len(), 256);
    assert_eq!(
        ctl.json(&["layout", "--partition", "7"])["replicas"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(ctl.json(&["partitions"]).as_array().unwrap().len(), 256);

    assert_eq!(ctl.json(&["counter", "add", "visits", "5"])["value"], 5);
    assert_eq!(ctl.json(&["counter", "add", "visits", "-2"])["value"], 3);
    assert_eq!(ctl.json(&["counter", "get", "visits"])["value"], 3);
    ctl.ok(&["set", "add", "tags", "blue"]);
    ctl.ok(&["set", "add", "tags", "green", "--w", "3"]);
    ctl.ok(&["set", "remove", "tags", "blue", "--w", "2"]);
    assert_eq!(
        ctl.json(&["set", "members", "tags"])["members"],
        serde_json::json!(["green"])
    );
    let keys = ctl.json(&["keys", "--prefix", "g"]);
    assert_eq!(
        keys,
        serde_json::json!([{"key": "greeting", "kind": "register"}])
    );
    // Pages of the cluster-wide listing, and the node-local one.
    ctl.ok(&["counter", "add", "gz", "1"]);
    let page = ctl.json(&["keys", "--prefix", "g", "--limit", "1"]);
    assert_eq!(
        page,
        serde_json::json!([{"key": "greeting", "kind": "register"}])
    );
    let next = ctl.json(&["keys", "--prefix", "g", "--start-after", "greeting"]);
    assert_eq!(next, serde_json::json!([{"key": "gz", "kind": "counter"}]));
    let local = ctl.json(&["keys", "--prefix", "g", "--local"]);
    assert_eq!(local.as_array().map(Vec::len), Some(2), "{local}");
    let (code, err) = ctl.fails(&["keys", "--limit", "0"]);
    assert_eq!(code, 2, "{err}");
    ctl.ok(&["delete", "greeting"]);
    let (code, _) = ctl.fails(&["get", "greeting"]);
    assert_eq!(code, 1);

    // Two nodes in sync: diff finds nothing (after the writes spread).
    eventually("the nodes agree", || async {
        let diff = ctl.json(&[
            "diff",
            &cluster.addr(0).to_string(),
            &cluster.addr(1).to_string(),
        ]);
        diff.as_array().is_some_and(|rows| rows.is_empty())
    })
    .await;
    let migrations = ctl.json(&["migrations"]);
    assert_eq!(migrations["in_flight"], serde_json::json!([]));
    assert_eq!(migrations["partitions_left"], 0);
    assert_eq!(migrations["streams"], serde_json::json!([]));
    assert_eq!(migrations["budget_bytes_per_sec"], serde_json::Value::Null);
    assert!(ctl.ok(&["migrations"]).contains("partitions"));

    // Rebalancing: a plan on a layout that has just completed is refused
    // until its loads settle, saying so; changes need an admin certificate
    // and a well-formed value.
    let (code, line) = ctl.fails(&["layout", "plan"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("settle_secs"), "{line}");
    let (code, line) = ctl.fails(&["layout", "apply", "not-hex"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("not a plan id"), "{line}");
    let (code, line) = ctl.fails(&["migrations", "--budget", "1M"]);
    assert_eq!(code, 1, "{line}");
    let (code, line) = ctl.fails(&["migrations", "--budget", "fast"]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("not a byte rate"), "{line}");
    let admin = Ctl {
        node: cluster.addr(0),
        tls: cluster.dir.path().join("admin"),
    };
    let set = admin.json(&["migrations", "--budget", "1M"]);
    assert_eq!(set["budget_bytes_per_sec"], 1 << 20);
    assert_eq!(admin.json(&["migrations"])["budget_bytes_per_sec"], 1 << 20);
    admin.ok(&["migrations", "--budget", "unlimited"]);
    assert_eq!(
        admin.json(&["migrations"])["budget_bytes_per_sec"],
        serde_json::Value::Null
    );
    let (code, line) = admin.fails(&["node", "set-capacity", "0"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("at least 1"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_shows_a_killed_node_suspect_then_down() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, _clients) = started(3).await;
    let ctl = Ctl {
        node: cluster.addr(0),
        tls: cluster.dir.path().join("client"),
    };
    cluster.kill(2);
    let victim = "node-3";
    let state = |ctl: &Ctl| -> String {
        let members = ctl.json(&["members"]);
        members
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == victim)
            .map(|m| m["state"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = state(&ctl);
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if now == "down" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 never went down: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SWIM suspects before it declares a member down; the suspicion lasts
    // seconds, far longer than the polling interval.
    assert_eq!(seen, ["alive", "suspect", "down"], "{seen:?}");
    assert!(ctl.ok(&["members"]).contains("down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_the_documented_exit_code() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, _clients) = started(1).await;
    let ctl = Ctl {
        node: cluster.addr(0),
        tls: cluster.dir.path().join("client"),
    };
    let one_line = |(code, stderr): (i32, String), expected: i32, mentions: &str| {
        assert_eq!(code, expected, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(mentions),
            "{stderr:?} should mention {mentions:?}"
        );
    };
    one_line(ctl.fails(&["get", "nothing-here"]), 1, "not found");
    one_line(
        ctl.fails(&["put", "k", "v", "--context", "not-a-token!"]),
        1,
        "token",
    );
    ctl.ok(&["put", "text", "v"]);
    one_line(ctl.fails(&["counter", "add", "text", "1"]), 1, "register");
    one_line(ctl.fails(&["put", "k", "v", "--w", "2"]), 1, "w=2 exceeds");
    one_line(
        ctl.fails(&["set", "add", "s", "m", "--w", "2"]),
        1,
        "w=2 exceeds",
    );
    one_line(
        ctl.fails(&["set", "remove", "s", "m", "--w", "2"]),
        1,
        "w=2 exceeds",
    );
    one_line(
        ctl.fails(&["layout", "--partition", "999"]),
        1,
        "partition 999",
    );
    let nowhere = Ctl {
        node: "127.0.0.1:9".parse().unwrap(),
        tls: ctl.tls.clone(),
    };
    one_line(nowhere.fails(&["status"]), 1, "cannot reach");
    let no_certs = Ctl {
        node: ctl.node,
        tls: cluster.dir.path().join("missing"),
    };
    one_line(no_certs.fails(&["status"]), 1, "ca.pem");

    // Bad usage: exit code 2.
    let out = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("status")
        .env_remove("KVCTL_NODE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node"));
    let (code, _) = ctl.fails(&["frobnicate"]);
    assert_eq!(code, 2);
    let help = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Examples:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_hands_everything_off_and_returns_when_safe_to_stop() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, _clients) = started(3).await;
    let first = Ctl {
        node: cluster.addr(0),
        tls: cluster.dir.path().join("client"),
    };
    let goer = Ctl {
        node: cluster.addr(2),
        tls: cluster.dir.path().join("client"),
    };
    for i in 0..50 {
        goer.ok(&["put", &format!("k{i}"), "v"]);
    }
    // A client certificate may inspect, not change the cluster.
    let refused = goer.run(&["leave"]);
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("admin certificate"), "{said}");
    assert_eq!(goer.json(&["status"])["decommissioned"], false);
    let goer = Ctl {
        node: cluster.addr(2),
        tls: cluster.dir.path().join("admin"),
    };
    let out = goer.ok(&["leave"]);
    assert!(out.contains("safe to stop"), "{out}");
    let status = goer.json(&["status"]);
    assert_eq!(status["partitions_held"], 0);
    assert_eq!(status["decommissioned"], true);
    // Every write taken by the departed node is on the others.
    for i in 0..50 {
        first.ok(&["get", &format!("k{i}")]);
    }
    eventually("the others see it leave", || async {
        let members = first.json(&["members"]);
        members
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "node-3" && m["state"] == "left")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_reports_the_writes_a_lagging_node_lacks() {
    let _slot = SLOTS.acquire().await.unwrap();
    // Two single-node clusters from the same CA: the second never hears of
    // the first's writes, so it lags by exactly those.
    let mut cluster = Cluster::start(1);
    cluster.add_node_with_seed(None);
    let tls = cluster.client_tls();
    for i in 0..2 {
        client(cluster.addr(i), &tls).await;
    }
    let ctl = Ctl {
        node: cluster.addr(0),
        tls: cluster.dir.path().join("client"),
    };
    for i in 0..20 {
        ctl.ok(&["put", &format!("lag-{i}"), "v"]);
    }
    let (a, b) = (cluster.addr(0).to_string(), cluster.addr(1).to_string());
    let diff = ctl.json(&["diff", &a, &b]);
    let rows = diff.as_array().unwrap();
    assert!(!rows.is_empty(), "{diff}");
    let b_lacks: u64 = rows.iter().map(|r| r["b_lacks"].as_u64().unwrap()).sum();
    let a_lacks: u64 = rows.iter().map(|r| r["a_lacks"].as_u64().unwrap()).sum();
    assert_eq!((b_lacks, a_lacks), (20, 0), "{diff}");
    assert!(ctl.ok(&["diff", &a, &b]).to_lowercase().contains("lacks"));
}
