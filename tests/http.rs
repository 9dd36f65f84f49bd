//! The HTTP/JSON API through a real HTTPS client (reqwest) against real
//! `gossipkv serve` processes on loopback: every route, causal contexts and
//! siblings, exact counters, sets, batches, the documented errors for bad
//! input, and who may connect at all.

mod common;

use common::{eventually, started, Cluster, SLOTS};
use gossipkv::client::{Request, Response as NodeResponse};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const CONTEXT: &str = "gossipkv-context";

/// An HTTPS client presenting the certificate in `dir` (any of the test
/// cluster's: client, admin, a node's) and trusting the cluster CA.
fn https(cluster: &Cluster, dir: &Path) -> Client {
    let ca = std::fs::read(cluster.path().join("client/ca.pem")).unwrap();
    let mut pem = std::fs::read(dir.join("cert.pem")).unwrap();
    pem.extend(std::fs::read(dir.join("key.pem")).unwrap());
    Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

fn url(cluster: &Cluster, node: usize, path: &str) -> String {
    format!("https://{}{path}", cluster.http[node])
}

/// Status and JSON body.
async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.bytes().await.unwrap();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, value)
}

async fn put(http: &Client, at: String, value: &str, context: Option<&str>) -> String {
    let mut request = http.put(at).body(value.to_string());
    if let Some(context) = context {
        request = request.header(CONTEXT, context);
    }
    let (status, body) = json_of(request.send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["context"].as_str().unwrap().to_string()
}

fn sorted_values(record: &Value) -> Vec<String> {
    let mut values: Vec<String> = record["values"]
        .as_array()
        .unwrap_or_else(|| panic!("no values in {record}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    values.sort();
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_counters_sets_and_batches_over_https_through_any_node() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, _clients) = started(3).await;
    let http = https(&cluster, &cluster.path().join("client"));

    // A put through one node (all three replicas before the answer) is
    // read through another; the context comes in the body and a header.
    let context = put(
        &http,
        url(&cluster, 0, "/v1/kv/greeting?w=3"),
        "hello",
        None,
    )
    .await;
    let response = http
        .get(url(&cluster, 2, "/v1/kv/greeting"))
        .send()
        .await
        .unwrap();
    let header = response.headers()[CONTEXT].to_str().unwrap().to_string();
    let (status, record) = json_of(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(record["kind"], "register");
    assert_eq!(sorted_values(&record), ["hello"]);
    assert_eq!(record["context"], header.as_str());
    assert_eq!(header, context);

    // The raw form.
    let raw = http
        .get(url(&cluster, 1, "/v1/kv/greeting"))
        .header("accept", "application/octet-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::OK);
    assert_eq!(raw.bytes().await.unwrap().as_ref(), b"hello");

    // Two writes made with the same (now stale) context are concurrent:
    // both survive as siblings, through whichever node they went.
    put(
        &http,
        url(&cluster, 0, "/v1/kv/greeting?w=3"),
        "bonjour",
        Some(&context),
    )
    .await;
    put(
        &http,
        url(&cluster, 1, "/v1/kv/greeting?w=3"),
        "hola",
        Some(&context),
    )
    .await;
    let (status, record) = json_of(
        http.get(url(&cluster, 2, "/v1/kv/greeting"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sorted_values(&record), ["bonjour", "hola"]);
    // Raw, siblings are 300 Multiple Choices with the JSON record.
    let (status, siblings) = json_of(
        http.get(url(&cluster, 0, "/v1/kv/greeting"))
            .header("accept", "application/octet-stream")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::MULTIPLE_CHOICES);
    assert_eq!(sorted_values(&siblings), ["bonjour", "hola"]);
    // A write with the context of that read replaces exactly both.
    let read_context = record["context"].as_str().unwrap();
    put(
        &http,
        url(&cluster, 2, "/v1/kv/greeting?w=3"),
        "hi",
        Some(read_context),
    )
    .await;
    let (_, record) = json_of(
        http.get(url(&cluster, 0, "/v1/kv/greeting"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(sorted_values(&record), ["hi"]);

    // Puts without a context supersede what their node has seen: sent at
    // the same time through three nodes (w=1), those that did not see
    // each other survive side by side as siblings; none is lost and none
    // is made up.
    let mut with_siblings = 0;
    for k in 0..20 {
        let path = format!("/v1/kv/race%2F{k}");
        let racers: Vec<_> = (0..3)
            .map(|node| {
                let http = http.clone();
                let at = url(&cluster, node, &format!("{path}?w=1"));
                tokio::spawn(async move {
                    let response = http.put(at).body(format!("from-{node}")).send().await;
                    response.unwrap().status()
                })
            })
            .collect();
        for racer in racers {
            assert_eq!(racer.await.unwrap(), StatusCode::OK);
        }
        let (status, record) = json_of(
            http.get(url(&cluster, 0, &format!("{path}?r=3")))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{record}");
        let values = sorted_values(&record);
        assert!(!values.is_empty());
        for value in &values {
            assert!(
                ["from-0", "from-1", "from-2"].contains(&value.as_str()),
                "{value} was never written"
            );
        }
        with_siblings += usize::from(values.len() > 1);
    }
    assert!(
        with_siblings > 0,
        "twenty races of three puts without a context never left siblings"
    );

    // Keys are any bytes: '/' inside a key, percent-encoded bytes that are
    // not UTF-8 (shown back as base64).
    put(
        &http,
        url(&cluster, 0, "/v1/kv/user/42/name?w=3"),
        "ada",
        None,
    )
    .await;
    let (_, record) = json_of(
        http.get(url(&cluster, 1, "/v1/kv/user%2F42%2Fname"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(record["key"], "user/42/name");
    put(&http, url(&cluster, 0, "/v1/kv/%FF%00bin?w=3"), "x", None).await;
    let (_, record) = json_of(
        http.get(url(&cluster, 2, "/v1/kv/%ff%00bin"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(record["key"], json!({ "base64": "/wBiaW4=" }));

    // Delete: the key is gone everywhere; 404 with a code.
    let response = http
        .delete(url(&cluster, 1, "/v1/kv/user/42/name?w=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, body) = json_of(
        http.get(url(&cluster, 2, "/v1/kv/user/42/name"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");

    // LWW: the latest write wins, no siblings, no context.
    for value in ["one", "two"] {
        let response = http
            .put(url(&cluster, 0, "/v1/kv/lww-key?lww=true&w=3"))
            .body(value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let (_, record) = json_of(
        http.get(url(&cluster, 1, "/v1/kv/lww-key"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(record["kind"], "lww");
    assert_eq!(record["value"], "two");

    // Counters: concurrent adds through all three nodes sum exactly.
    let mut adds = tokio::task::JoinSet::new();
    let mut expected = 0i64;
    for i in 0..30i64 {
        let amount = if i % 4 == 0 { -i } else { i + 1 };
        expected += amount;
        let http = http.clone();
        let at = url(&cluster, i as usize % 3, "/v1/counters/hits?w=2");
        adds.spawn(async move {
            let response = http
                .post(at)
                .json(&json!({ "add": amount }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        });
    }
    while let Some(done) = adds.join_next().await {
        done.unwrap();
    }
    let (status, counter) = json_of(
        http.get(url(&cluster, 2, "/v1/counters/hits?r=3"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counter["value"], expected);
    // The generic read shows the counter too.
    let (_, record) = json_of(
        http.get(url(&cluster, 0, "/v1/kv/hits?r=3"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(record["kind"], "counter");
    assert_eq!(record["value"], expected);

    // Sets: add through two nodes, remove through a third.
    for (node, change) in [
        (0, json!({ "add": "red" })),
        (1, json!({ "add": { "base64": "/wE=" } })),
        (0, json!({ "add": "blue" })),
        (2, json!({ "remove": "red" })),
    ] {
        let response = http
            .post(url(&cluster, node, "/v1/sets/colours?w=3"))
            .json(&change)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{change}");
    }
    let (_, set) = json_of(
        http.get(url(&cluster, 1, "/v1/sets/colours"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(set["members"], json!(["blue", { "base64": "/wE=" }]));

    // A batch: one result per operation, in order; operations on one key
    // run in the order given.
    let (status, batch) = json_of(
        http.post(url(&cluster, 2, "/v1/batch"))
            .json(&json!({ "ops": [
                { "op": "put", "key": "b/1", "value": "first", "w": 3 },
                { "op": "get", "key": "b/1" },
                { "op": "counter_add", "key": "b/n", "amount": 7 },
                { "op": "get", "key": "b/missing" },
                { "op": "counter_add", "key": "greeting", "amount": 1 },
                { "op": "set_add", "key": "b/s", "member": "m" },
                { "op": "set_members", "key": "b/s" },
            ]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results.len(), 7);
    assert_eq!(results[0]["status"], 200);
    assert!(results[0]["result"]["context"].is_string());
    assert_eq!(results[1]["result"]["values"], json!(["first"]));
    assert_eq!(results[2]["result"]["value"], 7);
    assert_eq!(results[3]["status"], 404);
    assert_eq!(results[3]["error"]["code"], "not_found");
    assert_eq!(results[4]["status"], 409);
    assert_eq!(results[4]["error"]["code"], "wrong_type");
    assert_eq!(results[6]["result"]["members"], json!(["m"]));

    // Watches: held until the key moves past the given context (here by a
    // write through another node), or 304 at the timeout.
    let (_, record) = json_of(
        http.get(url(&cluster, 0, "/v1/kv/greeting"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let seen = record["context"].as_str().unwrap().to_string();
    let watcher = {
        let http = http.clone();
        let at = url(
            &cluster,
            0,
            &format!("/v1/kv/greeting?watch={seen}&timeout=60"),
        );
        tokio::spawn(async move { json_of(http.get(at).send().await.unwrap()).await })
    };
    let created = {
        let http = http.clone();
        let at = url(&cluster, 1, "/v1/kv/later?watch=&timeout=60");
        tokio::spawn(async move { json_of(http.get(at).send().await.unwrap()).await })
    };
    // Nothing moved yet: a short watch of the same context times out.
    let response = http
        .get(url(
            &cluster,
            0,
            &format!("/v1/kv/greeting?watch={seen}&timeout=0.5"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    assert!(!watcher.is_finished());
    put(
        &http,
        url(&cluster, 2, "/v1/kv/greeting?w=3"),
        "watched",
        Some(&seen),
    )
    .await;
    put(&http, url(&cluster, 2, "/v1/kv/later?w=3"), "now", None).await;
    // Node 0 reads every partition itself (3 nodes, 3 replicas) and the
    // write is on its disk (w=3): its commit wakes the watch, which never
    // re-reads on a timer here (the bound is far below the 60 s timeout
    // and the 5 s re-read of nodes that do not read locally).
    let (status, record) = tokio::time::timeout(Duration::from_secs(4), watcher)
        .await
        .expect("a held watch is woken by the write, not by a timer")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(sorted_values(&record), ["watched"]);
    let (status, record) = created.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(sorted_values(&record), ["now"]);
    // A watch of a context the key has already moved past answers at once.
    let (status, record) = json_of(
        http.get(url(
            &cluster,
            1,
            &format!("/v1/kv/greeting?watch={seen}&timeout=60"),
        ))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sorted_values(&record), ["watched"]);

    // Node status, for health checks.
    let (status, body) = json_of(
        http.get(url(&cluster, 0, "/v1/status"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["members_alive"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_status_and_code_and_strangers_are_refused() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (cluster, _clients) = started(1).await;
    let http = https(&cluster, &cluster.path().join("client"));
    put(&http, url(&cluster, 0, "/v1/kv/text"), "v", None).await;
    let long_key = format!("/v1/kv/{}", "k".repeat(8 * 1024 + 1));
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            http.post(url(&cluster, 0, "/v1/batch"))
                .body("{\"ops\": [ nope"),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            http.post(url(&cluster, 0, "/v1/counters/c"))
                .json(&json!({ "add": "one" })),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            http.put(url(&cluster, 0, "/v1/kv/k"))
                .header(CONTEXT, "not a token!")
                .body("v"),
            StatusCode::BAD_REQUEST,
            "bad_context",
        ),
        (
            http.put(url(&cluster, 0, "/v1/kv/k"))
                .header(CONTEXT, "AQ")
                .body("v"),
            StatusCode::BAD_REQUEST,
            "bad_context",
        ),
        (
            http.put(url(&cluster, 0, "/v1/kv/big"))
                .body(vec![b'x'; 4 * 1024 * 1024 + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            http.get(url(&cluster, 0, &long_key)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            http.get(url(&cluster, 0, "/v1/kv/a%2")),
            StatusCode::BAD_REQUEST,
            "bad_encoding",
        ),
        (
            http.get(url(&cluster, 0, "/v1/kv/a%zz")),
            StatusCode::BAD_REQUEST,
            "bad_encoding",
        ),
        (
            http.get(url(&cluster, 0, "/v1/kv/text?R=2")),
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
        (
            http.put(url(&cluster, 0, "/v1/kv/text?w=0")).body("v"),
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
        (
            http.put(url(&cluster, 0, "/v1/kv/text?w=9")).body("v"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            http.get(url(&cluster, 0, "/v1/kv/text?watch=&timeout=301")),
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
        (
            http.get(url(&cluster, 0, "/v1/kv/text?watch=zz")),
            StatusCode::BAD_REQUEST,
            "bad_context",
        ),
        (
            http.get(url(&cluster, 0, "/v2/kv/x")),
            StatusCode::NOT_FOUND,
            "no_route",
        ),
        (
            http.patch(url(&cluster, 0, "/v1/kv/x")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            http.post(url(&cluster, 0, "/v1/counters/text"))
                .json(&json!({ "add": 1 })),
            StatusCode::CONFLICT,
            "wrong_type",
        ),
        (
            http.get(url(&cluster, 0, "/v1/kv/absent")),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            http.get(url(&cluster, 0, "/v1/counters/text")),
            StatusCode::CONFLICT,
            "wrong_type",
        ),
    ];
    // A body of the wrong shape names the field that was wrong.
    for (request, field) in [
        (
            http.post(url(&cluster, 0, "/v1/counters/c"))
                .json(&json!({ "add": "one" })),
            "`add`",
        ),
        (
            http.post(url(&cluster, 0, "/v1/batch")).json(&json!({
                "ops": [{ "op": "get", "key": "a" }, { "op": "counter_add", "key": "c", "amount": "x" }]
            })),
            "`ops[1]",
        ),
    ] {
        let (got, body) = json_of(request.send().await.unwrap()).await;
        assert_eq!(got, StatusCode::BAD_REQUEST, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{field} not named: {body}");
    }
    for (request, status, code) in cases {
        let request = request.build().unwrap();
        let what = format!("{} {}", request.method(), request.url().path());
        let (got, body) = json_of(http.execute(request).await.unwrap()).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            !body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{what}: {body}"
        );
    }
    // A batch over the limit.
    let ops: Vec<Value> = (0..129)
        .map(|i| json!({ "op": "get", "key": format!("k{i}") }))
        .collect();
    let (status, body) = json_of(
        http.post(url(&cluster, 0, "/v1/batch"))
            .json(&json!({ "ops": ops }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    // Who may connect: a node's certificate, a certificate of another CA
    // and plain HTTP are refused; an admin one works.
    let ca = std::fs::read(cluster.path().join("client/ca.pem")).unwrap();
    let anonymous = Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    // Without a certificate TLS works, but every request needs a token,
    // and the refusal does not depend on whether the key exists.
    for path in ["/v1/kv/text", "/v1/kv/absent", "/v1/status"] {
        let (status, body) =
            json_of(anonymous.get(url(&cluster, 0, path)).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let node = https(&cluster, &cluster.path().join("node-1/tls"));
    assert!(node
        .get(url(&cluster, 0, "/v1/kv/text"))
        .send()
        .await
        .is_err());
    let other = tempfile::tempdir().unwrap();
    gossipkv::certs::init_ca(&other.path().join("ca"), "other").unwrap();
    gossipkv::certs::issue(
        &other.path().join("ca"),
        "client",
        gossipkv::certs::Role::Client,
        30,
        &other.path().join("client"),
    )
    .unwrap();
    let stranger = https(&cluster, &other.path().join("client"));
    assert!(stranger
        .get(url(&cluster, 0, "/v1/kv/text"))
        .send()
        .await
        .is_err());
    let plain = Client::new();
    assert!(plain
        .get(format!("http://{}/v1/kv/text", cluster.http[0]))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success()));
    let admin = https(&cluster, &cluster.path().join("admin"));
    let response = admin
        .get(url(&cluster, 0, "/v1/kv/text"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The node served everything above and still does.
    let (status, _) = json_of(
        http.get(url(&cluster, 0, "/v1/kv/text"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// An HTTPS client with no certificate (it trusts the cluster CA): what an
/// app holding only a token uses.
fn tokened(cluster: &Cluster) -> Client {
    let ca = std::fs::read(cluster.path().join("client/ca.pem")).unwrap();
    Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap()
}

async fn create_token(
    admin: &gossipkv::client::Client,
    name: &str,
    prefixes: &[&str],
    read: bool,
    write: bool,
    expires_in_seconds: Option<u64>,
) -> String {
    let response = admin
        .request(&Request::TokenCreate {
            name: name.into(),
            prefixes: prefixes.iter().map(|p| p.as_bytes().to_vec()).collect(),
            read,
            write,
            expires_in_seconds,
        })
        .await
        .unwrap();
    let NodeResponse::TokenCreated { secret, .. } = response else {
        panic!("unexpected answer {response:?}");
    };
    secret
}

/// The status of a GET (or a PUT, with `put`) of `path` at `node`.
async fn status_with(
    http: &Client,
    cluster: &Cluster,
    node: usize,
    token: &str,
    put: bool,
    path: &str,
) -> StatusCode {
    let request = if put {
        http.put(url(cluster, node, path)).body("v")
    } else {
        http.get(url(cluster, node, path))
    };
    request.bearer_auth(token).send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_scoped_to_prefixes_and_rights_and_revocation_reaches_every_node() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, clients) = started(3).await;
    let admin =
        gossipkv::client::Client::connect_admin(cluster.addr(0), Some(&cluster.admin_tls()))
            .await
            .unwrap();
    let certified = https(&cluster, &cluster.path().join("client"));
    put(
        &certified,
        url(&cluster, 0, "/v1/kv/app2/secret?w=3"),
        "s",
        None,
    )
    .await;
    let writer = create_token(&admin, "app1", &["app1/"], true, true, None).await;
    let reader = create_token(&admin, "app1-ro", &["app1/"], true, false, None).await;
    let http = tokened(&cluster);

    // Made at node 0, every node enforces it (a broadcast, not a round).
    for node in 0..3 {
        let path = format!("/v1/kv/app1/from-{node}?w=3");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = status_with(&http, &cluster, node, &writer, true, &path).await;
            if status == StatusCode::OK {
                break;
            }
            assert_eq!(status, StatusCode::UNAUTHORIZED, "node {node}");
            assert!(
                Instant::now() < deadline,
                "node {node} never took the token"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let path = format!("/v1/kv/app1/from-{node}");
        assert_eq!(
            status_with(&http, &cluster, node, &reader, false, &path).await,
            StatusCode::OK
        );
    }
    // Read-only cannot write; app1 cannot touch app2, whether or not the
    // key exists (the same 403 either way); counters and batches are
    // checked the same way, each batch operation on its own.
    assert_eq!(
        status_with(&http, &cluster, 1, &reader, true, "/v1/kv/app1/x").await,
        StatusCode::FORBIDDEN
    );
    // The change feed too: only within the token's prefixes.
    for (path, expected) in [
        ("/v1/changes?prefix=app1%2F", StatusCode::OK),
        ("/v1/changes?prefix=app1%2Fsub%2F", StatusCode::OK),
        ("/v1/changes?prefix=app2%2F", StatusCode::FORBIDDEN),
        ("/v1/changes", StatusCode::FORBIDDEN),
        ("/v1/changes?prefix=app", StatusCode::FORBIDDEN),
    ] {
        assert_eq!(
            status_with(&http, &cluster, 0, &reader, false, path).await,
            expected,
            "{path}"
        );
    }
    let mut bodies = Vec::new();
    for key in ["/v1/kv/app2/secret", "/v1/kv/app2/absent"] {
        let response = http
            .get(url(&cluster, 2, key))
            .bearer_auth(&writer)
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{key}");
        assert_eq!(body["error"]["code"], "forbidden");
        bodies.push(body);
    }
    assert_eq!(
        bodies[0], bodies[1],
        "a refusal must not tell whether the key exists"
    );
    let response = http
        .post(url(&cluster, 0, "/v1/counters/app2/n"))
        .bearer_auth(&writer)
        .json(&json!({ "add": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let (_, batch) = json_of(
        http.post(url(&cluster, 1, "/v1/batch"))
            .bearer_auth(&writer)
            .json(&json!({ "ops": [
                { "op": "put", "key": "app1/b", "value": "ok" },
                { "op": "get", "key": "app2/secret" },
            ]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(batch["results"][0]["status"], 200);
    assert_eq!(batch["results"][1]["status"], 403);
    assert!(batch["results"][1].get("result").is_none());
    // A certificate connection that also sends a token gets the token's
    // rights (how to give a certificate holder narrower rights).
    let response = certified
        .get(url(&cluster, 0, "/v1/kv/app2/secret"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Bad tokens: 401.
    let tampered = format!("{}x", &writer[..writer.len() - 1]);
    for bad in ["", "gkv_00", tampered.as_str()] {
        assert_eq!(
            status_with(&http, &cluster, 0, bad, false, "/v1/kv/app1/from-0").await,
            StatusCode::UNAUTHORIZED,
            "{bad:?}"
        );
    }

    // A node joining later learns the tokens from its peers.
    cluster.add_node();
    let joined = common::client(cluster.addr(3), &cluster.client_tls()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_with(&http, &cluster, 3, &reader, false, "/v1/status").await != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "the new node never learnt the tokens"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(joined);

    // Revoked at node 1: refused on every node, and how long that took.
    let revoked_at = Instant::now();
    let response =
        gossipkv::client::Client::connect_admin(cluster.addr(1), Some(&cluster.admin_tls()))
            .await
            .unwrap()
            .request(&Request::TokenRevoke {
                name_or_id: "app1-ro".into(),
            })
            .await
            .unwrap();
    assert_eq!(response, NodeResponse::Revoked(1));
    let mut refused = [false; 4];
    while refused.iter().any(|r| !r) {
        for (node, done) in refused.iter_mut().enumerate() {
            if !*done {
                *done = status_with(&http, &cluster, node, &reader, false, "/v1/status").await
                    == StatusCode::UNAUTHORIZED;
            }
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(30),
            "revocation did not reach every node: {refused:?}"
        );
    }
    eprintln!(
        "revocation refused on all 4 nodes after {:?}",
        revoked_at.elapsed()
    );
    // The other token still works; the revocation survives a restart.
    assert_eq!(
        status_with(&http, &cluster, 2, &writer, false, "/v1/kv/app1/from-0").await,
        StatusCode::OK
    );
    cluster.kill(2);
    cluster.restart(2);
    eventually("node 2 serves HTTP again", || async {
        match http
            .get(url(&cluster, 2, "/v1/status"))
            .bearer_auth(&writer)
            .send()
            .await
        {
            Ok(response) => response.status() == StatusCode::OK,
            Err(_) => false,
        }
    })
    .await;
    assert_eq!(
        status_with(&http, &cluster, 2, &reader, false, "/v1/status").await,
        StatusCode::UNAUTHORIZED
    );

    // An expiring token works until it expires (4 s lifetime), then is
    // refused everywhere.
    let brief = create_token(&admin, "brief", &[""], true, true, Some(4)).await;
    assert_eq!(
        status_with(&http, &cluster, 0, &brief, false, "/v1/kv/app2/secret").await,
        StatusCode::OK,
        "a token not yet expired works on the node that made it"
    );
    eventually("the short-lived token expires on every node", || async {
        for node in 0..4 {
            if status_with(&http, &cluster, node, &brief, false, "/v1/status").await
                != StatusCode::UNAUTHORIZED
            {
                return false;
            }
        }
        true
    })
    .await;
    // Tokens are the admins' business: a client certificate can neither
    // make nor list nor revoke them.
    for request in [
        Request::TokenCreate {
            name: "mine".into(),
            prefixes: vec![Vec::new()],
            read: true,
            write: true,
            expires_in_seconds: None,
        },
        Request::TokenList,
        Request::TokenRevoke {
            name_or_id: "app1".into(),
        },
    ] {
        let response = clients[0].request(&request).await;
        assert!(
            response.is_err(),
            "a client certificate was answered {response:?} to {request:?}"
        );
    }
    // A duplicate name is refused with a reason.
    let response = admin
        .request(&Request::TokenCreate {
            name: "app1".into(),
            prefixes: vec![b"x".to_vec()],
            read: true,
            write: false,
            expires_in_seconds: None,
        })
        .await;
    assert!(response.is_err_and(|e| e.to_string().contains("exists")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_pages_through_every_key_of_the_cluster_not_just_the_nodes() {
    let _slot = SLOTS.acquire().await.unwrap();
    // One replica per partition: each node holds a third of the keys, so
    // a listing through any node must ask the others.
    let mut cluster = Cluster::forming_with_config(3, Some("replicas = 1\n"));
    cluster.add_node();
    cluster.add_node();
    let tls = cluster.client_tls();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(common::client(cluster.addr(i), &tls).await);
    }
    eventually("three members and a complete layout", || async {
        for c in &clients {
            match c.status().await {
                Ok(s)
                    if s.members_alive == 3
                        && s.layout_version > 0
                        && s.layout_version == s.layout_completed => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    let mut expected: Vec<String> = (0..250).map(|i| format!("list/{i:04}")).collect();
    for (i, key) in expected.iter().enumerate() {
        clients[i % 3]
            .put(key.as_bytes(), b"v", None)
            .await
            .unwrap();
    }
    for i in 0..20 {
        clients[0]
            .put(format!("other/{i}").as_bytes(), b"v", None)
            .await
            .unwrap();
    }
    // Deleted keys are not listed.
    clients[1].delete(b"list/0100", None).await.unwrap();
    expected.retain(|k| k != "list/0100");
    for c in &clients {
        let held = c.status().await.unwrap().entries_held;
        assert!(
            held < 250,
            "a node holds {held} entries: the test needs spread keys"
        );
    }

    let http = https(&cluster, &cluster.path().join("client"));
    // Watches held on node 0 of keys it mostly holds no replica of (one
    // replica each): its own commits do not show their writes, so it
    // subscribes at the replicas, whose commits wake it. Each answers once
    // its key exists, long before its timeout and the 60 s re-read that
    // covers a lost subscription. A long-polled change feed there too.
    let poll = {
        let http = http.clone();
        let at = url(
            &cluster,
            0,
            "/v1/changes?prefix=watched%2F&since=now&feed=longpoll&timeout=60",
        );
        tokio::spawn(async move { json_of(http.get(at).send().await.unwrap()).await })
    };
    let watchers: Vec<_> = (0..6)
        .map(|i| {
            let http = http.clone();
            let at = url(
                &cluster,
                0,
                &format!("/v1/kv/watched%2F{i}?watch=&timeout=60"),
            );
            tokio::spawn(async move { json_of(http.get(at).send().await.unwrap()).await })
        })
        .collect();
    for i in 0..6 {
        put(
            &http,
            url(&cluster, 1, &format!("/v1/kv/watched%2F{i}")),
            &format!("w{i}"),
            None,
        )
        .await;
    }
    for (i, watcher) in watchers.into_iter().enumerate() {
        let (status, record) = tokio::time::timeout(Duration::from_secs(15), watcher)
            .await
            .expect("a watch on a node without the key's replica is woken")
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{record}");
        assert_eq!(sorted_values(&record), [format!("w{i}")]);
    }
    let (status, page) = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("a long poll on a node missing partitions is woken")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(!page["changes"].as_array().unwrap().is_empty(), "{page}");
    for node in 0..3 {
        let mut listed = Vec::new();
        let mut next: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut at = "/v1/kv?prefix=list%2F&limit=100".to_string();
            if let Some(after) = &next {
                at.push_str(&format!("&start_after={}", after.replace('/', "%2F")));
            }
            let (status, page) =
                json_of(http.get(url(&cluster, node, &at)).send().await.unwrap()).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            pages += 1;
            for entry in page["keys"].as_array().unwrap() {
                assert_eq!(entry["kind"], "register");
                listed.push(entry["key"].as_str().unwrap().to_string());
            }
            match page["next"].as_str() {
                Some(after) => next = Some(after.to_string()),
                None => break,
            }
            assert!(pages < 10, "the listing does not end");
        }
        assert_eq!(listed, expected, "through node {node}");
        assert_eq!(pages, 3);
    }
    let (status, body) = json_of(
        http.get(url(&cluster, 0, "/v1/kv?limit=0"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "bad_query");
    let (_, page) = json_of(
        http.get(url(&cluster, 2, "/v1/kv?prefix=other"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(page["keys"].as_array().unwrap().len(), 20);
    assert!(page["next"].is_null());
}

/// A change feed reader: the state of each key it has seen, every
/// (key, context) it was sent, and its cursor.
#[derive(Default)]
struct Reader {
    cursor: Option<String>,
    /// key -> (deleted, sorted values)
    state: std::collections::BTreeMap<String, (bool, Vec<String>)>,
    versions: std::collections::BTreeSet<(String, String)>,
    /// How many versions of each key it was sent.
    sent: std::collections::BTreeMap<String, usize>,
}

impl Reader {
    /// Follows the feed through `node` until a page says nothing more is
    /// waiting; pages alternate between GET and POST. Returns the changes seen.
    async fn follow(
        &mut self,
        http: &Client,
        cluster: &Cluster,
        node: usize,
        prefix: &str,
    ) -> usize {
        let mut seen = 0;
        for page_no in 0.. {
            assert!(page_no < 500, "the feed does not end");
            let request = if page_no % 2 == 0 {
                let mut at = format!("/v1/changes?prefix={}&limit=7", prefix.replace('/', "%2F"));
                if let Some(cursor) = &self.cursor {
                    at.push_str(&format!("&since={cursor}"));
                }
                http.get(url(cluster, node, &at))
            } else {
                http.post(url(cluster, node, "/v1/changes"))
                    .json(&json!({ "prefix": prefix, "since": self.cursor, "limit": 7 }))
            };
            let (status, page) = json_of(request.send().await.unwrap()).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            let changes = page["changes"].as_array().unwrap();
            assert!(changes.len() <= 7, "a page holds at most its limit");
            for change in changes {
                let key = change["key"].as_str().unwrap().to_string();
                assert!(key.starts_with(prefix), "{key} is outside {prefix}");
                let context = change["context"].as_str().unwrap().to_string();
                assert!(
                    self.versions.insert((key.clone(), context)),
                    "{key}: the same version was sent twice: {change}"
                );
                let deleted = change["deleted"] == true;
                let values = if deleted {
                    Vec::new()
                } else {
                    sorted_values(change)
                };
                self.state.insert(key.clone(), (deleted, values));
                *self.sent.entry(key).or_default() += 1;
                seen += 1;
            }
            self.cursor = Some(page["next"].as_str().unwrap().to_string());
            if page["more"] == false && changes.is_empty() {
                return seen;
            }
        }
        unreachable!()
    }
}

/// The cluster's state of every key under `prefix`, read at r=all through
/// `node` after it settled: key -> (deleted, sorted values).
async fn cluster_state(
    http: &Client,
    cluster: &Cluster,
    node: usize,
    keys: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeMap<String, (bool, Vec<String>)> {
    let mut state = std::collections::BTreeMap::new();
    for key in keys {
        let at = url(cluster, node, &format!("/v1/kv/{key}?r=3"));
        let (status, body) = json_of(http.get(at).send().await.unwrap()).await;
        let entry = match status {
            StatusCode::NOT_FOUND => (true, Vec::new()),
            StatusCode::OK => (false, sorted_values(&body)),
            other => panic!("{key}: {other} {body}"),
        };
        state.insert(key.clone(), entry);
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_feed_reader_sees_every_version_once_across_a_restart_and_a_join() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, mut clients) = started(3).await;
    let http = https(&cluster, &cluster.path().join("client"));
    let mut reader = Reader::default();
    let mut written = std::collections::BTreeSet::new();
    let mut version = 0u32;
    let mut write = |i: u32| {
        version += 1;
        (format!("feed/{i:03}"), format!("v{version}"))
    };

    // Keys written once, some written again and some deleted, through
    // every node; keys outside the prefix the reader must never see.
    for i in 0..60 {
        let (key, value) = write(i);
        clients[(i % 3) as usize]
            .put(key.as_bytes(), value.as_bytes(), None)
            .await
            .unwrap();
        written.insert(key);
        clients[0]
            .put(format!("elsewhere/{i}").as_bytes(), b"x", None)
            .await
            .unwrap();
    }
    assert!(reader.follow(&http, &cluster, 0, "feed/").await >= 60);
    for i in 0..10 {
        let (key, value) = write(i);
        let context = clients[1]
            .get(key.as_bytes())
            .await
            .unwrap()
            .unwrap()
            .context;
        let context = gossipkv::CausalContext::from_bytes(&context).unwrap();
        clients[1]
            .put(key.as_bytes(), value.as_bytes(), Some(&context))
            .await
            .unwrap();
    }
    for i in 10..15 {
        clients[2]
            .delete(format!("feed/{i:03}").as_bytes(), None)
            .await
            .unwrap();
    }
    reader.follow(&http, &cluster, 1, "feed/").await;

    // A node killed and restarted: writes go on meanwhile; the reader goes
    // on through another node, then through the restarted one.
    cluster.kill(1);
    for i in 60..90 {
        let (key, value) = write(i);
        clients[0]
            .put(key.as_bytes(), value.as_bytes(), None)
            .await
            .unwrap();
        written.insert(key);
    }
    reader.follow(&http, &cluster, 2, "feed/").await;
    cluster.restart(1);
    clients[1] = common::client(cluster.addr(1), &cluster.client_tls()).await;
    common::settled(&clients, 3).await;
    for i in 90..100 {
        let (key, value) = write(i);
        clients[1]
            .put(key.as_bytes(), value.as_bytes(), None)
            .await
            .unwrap();
        written.insert(key);
    }
    reader.follow(&http, &cluster, 1, "feed/").await;

    // A fourth node joins; the same cursor goes on through it.
    cluster.add_node();
    let fourth = common::client(cluster.addr(3), &cluster.client_tls()).await;
    eventually("the fourth node is in a completed layout", || async {
        fourth.status().await.is_ok_and(|s| {
            s.members_alive == 4 && s.layout_version > 1 && s.layout_version == s.layout_completed
        })
    })
    .await;
    for i in 100..120 {
        let (key, value) = write(i);
        fourth
            .put(key.as_bytes(), value.as_bytes(), None)
            .await
            .unwrap();
        written.insert(key);
    }
    // Once every replica has every write, a reader caught up through any
    // node holds exactly the cluster's state.
    let expected = cluster_state(&http, &cluster, 0, &written).await;
    reader.follow(&http, &cluster, 3, "feed/").await;
    // Replication to the node read last may still be under way (writes
    // were acknowledged at w=1): the reader converges, it never diverges.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        reader.follow(&http, &cluster, 0, "feed/").await;
        if reader.state == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reader never reached the cluster's state"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Keys written once were sent once, however many pages and nodes.
    for i in (15..60).chain(60..120) {
        let key = format!("feed/{i:03}");
        assert_eq!(reader.sent[&key], 1, "{key}");
    }
    let later = reader.follow(&http, &cluster, 2, "feed/").await;
    assert_eq!(later, 0, "a caught-up reader gets nothing new");

    // Long poll: held until a write under the prefix, through another node.
    let cursor = reader.cursor.clone().unwrap();
    let poll = {
        let http = http.clone();
        let at = url(
            &cluster,
            2,
            &format!("/v1/changes?prefix=feed%2F&feed=longpoll&timeout=60&since={cursor}"),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let (status, page) = json_of(http.get(at).send().await.unwrap()).await;
            (status, page, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    clients[0].put(b"elsewhere/late", b"x", None).await.unwrap();
    clients[0].put(b"feed/late", b"late", None).await.unwrap();
    let (status, page, waited) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{page}");
    let changes = page["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{page}");
    assert_eq!(changes[0]["key"], "feed/late");
    assert!(
        waited < Duration::from_secs(30),
        "the long poll answered after {waited:?}"
    );
    // And at its timeout, an empty page with a cursor to go on from.
    let at = url(
        &cluster,
        2,
        &format!(
            "/v1/changes?prefix=feed%2F&feed=longpoll&timeout=1&since={}",
            page["next"].as_str().unwrap()
        ),
    );
    let (status, empty) = json_of(http.get(at).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(empty["changes"].as_array().unwrap().is_empty());
    assert!(empty["next"].is_string());

    // A cursor is refused for a wider prefix, and a bad one names the fault.
    for (at, code) in [
        (format!("/v1/changes?prefix=&since={cursor}"), "bad_cursor"),
        ("/v1/changes?since=%21%21".to_string(), "bad_cursor"),
        ("/v1/changes?feed=sometimes".to_string(), "bad_query"),
        ("/v1/changes?limit=0".to_string(), "bad_query"),
    ] {
        let (status, body) = json_of(http.get(url(&cluster, 0, &at)).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{at}: {body}");
        assert_eq!(body["error"]["code"], code, "{at}: {body}");
    }
    // The listing a reconciling reader makes: from replicas that have
    // caught up with its cursor; the keys it holds live are the listed ones.
    let at = url(
        &cluster,
        1,
        &format!("/v1/kv?prefix=feed%2F&limit=1000&cursor={cursor}"),
    );
    let (status, listed) = json_of(http.get(at).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let listed: std::collections::BTreeSet<String> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap().to_string())
        .collect();
    let mut live: std::collections::BTreeSet<String> = reader
        .state
        .iter()
        .filter(|(_, (deleted, _))| !deleted)
        .map(|(k, _)| k.clone())
        .collect();
    live.insert("feed/late".into()); // seen by the long poll
    assert_eq!(listed, live);
    let at = url(&cluster, 1, &format!("/v1/kv?prefix=other&cursor={cursor}"));
    let (status, body) = json_of(http.get(at).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "bad_cursor");
    // since=now: nothing of what is there, then only what comes after.
    let at = url(&cluster, 2, "/v1/changes?prefix=feed%2F&since=now");
    let (status, now) = json_of(http.get(at).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{now}");
    assert!(now["changes"].as_array().unwrap().is_empty(), "{now}");
    assert_eq!(now["more"], false);
    clients[1]
        .put(b"feed/after-now", b"new", None)
        .await
        .unwrap();
    let next = now["next"].as_str().unwrap();
    let at = url(
        &cluster,
        1,
        &format!("/v1/changes?prefix=feed%2F&since={next}"),
    );
    let (_, after) = json_of(http.get(at).send().await.unwrap()).await;
    let keys: Vec<&str> = after["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["feed/after-now"], "{after}");
    // A narrower prefix may go on from a wider prefix's cursor.
    let at = url(
        &cluster,
        0,
        &format!("/v1/changes?prefix=feed%2F1&since={cursor}"),
    );
    let (status, body) = json_of(http.get(at).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changes"].as_array().unwrap().len(), 0, "{body}");
}

/// A device's push (a batch naming the device, a `seq` on every write).
async fn push(http: &Client, cluster: &Cluster, node: usize, ops: Value) -> Vec<Value> {
    let (status, body) = json_of(
        http.post(url(cluster, node, "/v1/batch"))
            .json(&json!({ "device": "d1ce", "ops": ops }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["results"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_write_is_applied_once_however_often_and_wherever_it_is_retried() {
    let _slot = SLOTS.acquire().await.unwrap();
    let (mut cluster, _clients) = started(3).await;
    let http = https(&cluster, &cluster.path().join("client"));
    let ops = json!([
        { "op": "counter_add", "key": "dev/count", "amount": 5, "seq": 1 },
        { "op": "put", "key": "dev/note", "value": "draft", "seq": 2 },
        { "op": "set_add", "key": "dev/tags", "member": "red", "seq": 3 },
    ]);
    // The answer was lost (say): the device pushes the same again, through
    // every node.
    for node in [0, 1, 2, 0] {
        for result in push(&http, &cluster, node, ops.clone()).await {
            assert_eq!(result["status"], 200, "{result}");
        }
    }
    let read = |path: &'static str| {
        let http = http.clone();
        let at = url(&cluster, 1, path);
        async move { json_of(http.get(at).send().await.unwrap()).await.1 }
    };
    assert_eq!(read("/v1/counters/dev/count?r=3").await["value"], 5);
    assert_eq!(sorted_values(&read("/v1/kv/dev/note?r=3").await), ["draft"]);
    assert_eq!(
        read("/v1/sets/dev/tags?r=3").await["members"],
        json!(["red"])
    );

    // A cluster write replaces the pushed value; the push retried after
    // that does not bring the old value back.
    let note = read("/v1/kv/dev/note?r=3").await;
    put(
        &http,
        url(&cluster, 2, "/v1/kv/dev/note?w=3"),
        "final",
        note["context"].as_str(),
    )
    .await;
    push(&http, &cluster, 1, ops.clone()).await;
    assert_eq!(sorted_values(&read("/v1/kv/dev/note?r=3").await), ["final"]);
    assert_eq!(read("/v1/counters/dev/count?r=3").await["value"], 5);

    // A later operation of the device applies, once.
    let later = json!([{ "op": "counter_add", "key": "dev/count", "amount": 2, "seq": 4 }]);
    push(&http, &cluster, 2, later.clone()).await;
    push(&http, &cluster, 0, later).await;
    assert_eq!(read("/v1/counters/dev/count?r=3").await["value"], 7);

    // A device's writes of a key apply in order or not at all: after one
    // is refused, the later ones of that key wait for the next push.
    let results = push(
        &http,
        &cluster,
        1,
        json!([
            { "op": "put", "key": "dev/count", "value": "not a counter", "seq": 30 },
            { "op": "counter_add", "key": "dev/count", "amount": 1, "seq": 31 },
        ]),
    )
    .await;
    assert_eq!(results[0]["status"], 409, "{}", results[0]);
    assert_eq!(results[1]["status"], 503, "{}", results[1]);
    assert_eq!(read("/v1/counters/dev/count?r=3").await["value"], 7);
    let again = json!([{ "op": "counter_add", "key": "dev/count", "amount": 1, "seq": 31 }]);
    assert_eq!(push(&http, &cluster, 2, again).await[0]["status"], 200);
    assert_eq!(read("/v1/counters/dev/count?r=3").await["value"], 8);

    // Malformed pushes are refused per operation.
    let results = push(
        &http,
        &cluster,
        0,
        json!([
            { "op": "put", "key": "dev/x", "value": "v" },
            { "op": "put", "key": "dev/x", "value": "v", "seq": 0 },
            { "op": "get", "key": "dev/note" },
        ]),
    )
    .await;
    assert_eq!(results[0]["status"], 400, "{}", results[0]);
    assert_eq!(results[1]["status"], 400, "{}", results[1]);
    assert_eq!(results[2]["status"], 200, "{}", results[2]);
    let (status, body) = json_of(
        http.post(url(&cluster, 0, "/v1/batch"))
            .json(&json!({ "ops": [{ "op": "put", "key": "k", "value": "v", "seq": 1 }] }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["results"][0]["status"], 400,
        "seq without device: {body}"
    );

    // With a node down, the writes whose primary replica it is are
    // refused (the device keeps them), the others applied; pushed again
    // once it is back, each counts exactly once.
    cluster.kill(2);
    let many: Vec<Value> = (0..24)
        .map(|i| json!({ "op": "counter_add", "key": format!("dev/n{i}"), "amount": i + 1, "seq": 10 + i }))
        .collect();
    let mut refused = 0;
    for result in push(&http, &cluster, 0, json!(many)).await {
        match result["status"].as_u64() {
            Some(200) => {}
            // Refused (its primary is known down), or timed out (not yet
            // known down): either way the device pushes it again.
            Some(503) | Some(504) => refused += 1,
            _ => panic!("a push with a node down answered {result}"),
        }
    }
    cluster.restart(2);
    eventually(
        "every write of the push is applied once node 2 is back",
        || async {
            push(&http, &cluster, 1, json!(many))
                .await
                .iter()
                .all(|r| r["status"] == 200)
        },
    )
    .await;
    push(&http, &cluster, 0, json!(many)).await;
    assert!(refused > 0, "node 2 is the primary of none of 24 keys");
    for i in 0..24u64 {
        let at = url(&cluster, 0, &format!("/v1/counters/dev/n{i}?r=3"));
        let (_, body) = json_of(http.get(at).send().await.unwrap()).await;
        assert_eq!(
            body["value"],
            i + 1,
            "dev/n{i} ({refused} refused while node 2 was down)"
        );
    }
}
