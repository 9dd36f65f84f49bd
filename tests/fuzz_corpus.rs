//! Replays the committed cargo-fuzz corpora (`fuzz/corpus/<target>/`) and
//! crash reproducers (`fuzz/regressions/<target>/`) through the same
//! `gossipkv::fuzzing` functions the fuzz targets call, so what the fuzzer
//! found stays fixed in the ordinary test suite.
//!
//! `write_seed_corpora` (ignored) writes valid encodings of every decoder's
//! input as seeds: `cargo test --test fuzz_corpus -- --ignored`, then
//! `fuzz/run.sh` fuzzes from them and minimises the corpora.

use gossipkv::client::{Call, NodeStatus, Request, Response, WireRecord};
use gossipkv::crdt::Dot;
use gossipkv::fuzzing::{self, TARGETS};
use gossipkv::replication::coordinator::{CoordMessage, ReplicateItem};
use gossipkv::replication::layout::NodeSpec;
use gossipkv::replication::layout_state::LayoutState;
use gossipkv::replication::membership::{Membership, MembershipConfig, MembershipOutput, NodeMeta};
use gossipkv::replication::message::{LayoutSummary, Message, StreamPurpose};
use gossipkv::store::wal::{self, LoggedEntry};
use gossipkv::store::{ChangeChunk, RemoteEntry};
use gossipkv::transport::frame;
use gossipkv::{NodeId, Store, StoreOptions, Value, VersionVector};
use serde::Serialize;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = read
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_reproducer_runs_clean() {
    for target in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(!corpus.is_empty(), "fuzz/corpus/{target}/ is empty");
        let reproducers = files(&fuzz_dir().join("regressions").join(target));
        for file in corpus.iter().chain(&reproducers) {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| fuzzing::run(target, &data));
            assert!(outcome.is_ok(), "{target}: {} panicked", file.display());
        }
    }
}

// Seeds: valid encodings of each input.

/// The wire form of the node's private peer envelope (`node::Envelope`):
/// the same fields and variants in the same order encode the same bytes.
#[derive(Serialize)]
struct Envelope {
    from: NodeId,
    payload: Payload,
}

#[derive(Serialize)]
enum Payload {
    Core(Message),
    Coord(CoordMessage),
}

fn populated_store(path: Option<&Path>) -> Store {
    let options = StoreOptions::default().node_id(NodeId(7)).partitions(4);
    let s = match path {
        Some(path) => Store::open(path, options).unwrap(),
        None => Store::open_in_memory(options).unwrap(),
    };
    s.put(b"r", b"value", None).unwrap();
    s.put_lww(b"l", b"value").unwrap();
    s.counter_add(b"c", -3).unwrap();
    s.set_add(b"s", b"m").unwrap();
    s.set_add(b"s", b"n").unwrap();
    s.set_remove(b"s", b"m").unwrap();
    s.put(b"d", b"x", None).unwrap();
    s.delete(b"d", None).unwrap();
    s
}

fn chunks(s: &Store) -> Vec<ChangeChunk> {
    (0..s.partitions())
        .flat_map(|p| {
            s.changes_since(p, &VersionVector::new())
                .unwrap()
                .map(|c| c.unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn entries(s: &Store) -> Vec<RemoteEntry> {
    chunks(s).into_iter().flat_map(|c| c.entries).collect()
}

fn layouts() -> Vec<LayoutState> {
    let specs: Vec<NodeSpec> = (1..=3).map(|i| NodeSpec::new(NodeId(i), 100)).collect();
    let stable = LayoutState::bootstrap(16, 3, &specs);
    let mut moving = stable.clone();
    let mut more = specs.clone();
    more.push(NodeSpec::new(NodeId(4), 50).with_zone("b"));
    moving.propose(&more);
    if let Some(&p) = moving.pending_migrations(NodeId(4)).first() {
        moving.mark_ready(p, NodeId(4));
    }
    vec![LayoutState::new(16, 3), stable, moving]
}

/// Payloads two memberships exchange while one joins the other and both
/// gossip, plus a leave.
fn membership_payloads() -> Vec<Vec<u8>> {
    let meta = |capacity| NodeMeta {
        capacity,
        zone: Some("a".into()),
        name: None,
        load: Default::default(),
    };
    let addr = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let config = MembershipConfig::lan(16);
    let mut a = Membership::new(NodeId(1), addr(7000), 1, meta(100), config.clone(), 1);
    let mut b = Membership::new(NodeId(2), addr(7001), 1, meta(50), config, 2);
    let mut seen = Vec::new();
    let mut inbox: Vec<(bool, Vec<u8>)> = Vec::new();
    let post = |to_a: bool, out: Vec<MembershipOutput>, inbox: &mut Vec<(bool, Vec<u8>)>| {
        for o in out {
            if let MembershipOutput::Send { payload, .. } = o {
                inbox.push((to_a, payload));
            }
        }
    };
    let _ = a.join(addr(7000));
    let out = b.join(addr(7000));
    post(true, out, &mut inbox);
    let mut rounds = 0;
    while let Some((to_a, payload)) = inbox.pop() {
        seen.push(payload.clone());
        rounds += 1;
        if rounds > 40 {
            break;
        }
        let (node, back) = if to_a {
            (&mut a, false)
        } else {
            (&mut b, true)
        };
        if let Ok(out) = node.handle_payload(&payload) {
            post(back, out, &mut inbox);
        }
    }
    let out = b.set_meta(meta(10));
    post(true, out, &mut inbox);
    let out = b.leave();
    post(true, out, &mut inbox);
    seen.extend(inbox.into_iter().map(|(_, p)| p));
    seen
}

fn calls() -> Vec<Call> {
    let key = b"k".to_vec();
    let token = Some(gossipkv::CausalContext::new().to_bytes());
    let requests = vec![
        Request::Get { key: key.clone() },
        Request::Put {
            key: key.clone(),
            value: b"v".to_vec(),
            context: token.clone(),
        },
        Request::PutLww {
            key: key.clone(),
            value: b"v".to_vec(),
        },
        Request::Delete {
            key: key.clone(),
            context: token,
        },
        Request::CounterAdd {
            key: key.clone(),
            amount: -5,
        },
        Request::CounterGet { key: key.clone() },
        Request::SetAdd {
            key: key.clone(),
            member: b"m".to_vec(),
        },
        Request::SetRemove {
            key: key.clone(),
            member: b"m".to_vec(),
        },
        Request::SetMembers { key: key.clone() },
        Request::Status,
        Request::Keys {
            prefix: b"k".to_vec(),
            limit: 10,
        },
        Request::ClusterMembers,
        Request::Layout,
        Request::Partitions,
        Request::Inspect { key },
        Request::Migrations,
        Request::Join {
            seed: "127.0.0.1:7000".parse().unwrap(),
        },
        Request::Leave,
        Request::TokenCreate {
            name: "app".into(),
            prefixes: vec![b"app/".to_vec()],
            read: true,
            write: true,
            expires_in_seconds: Some(60),
        },
        Request::TokenList,
        Request::LayoutPlan,
        Request::LayoutApply {
            id: 0x3f2a_9c0d_11e4_b7a8,
        },
        Request::SetMigrationBudget {
            bytes_per_sec: 1 << 20,
        },
        Request::SetCapacity { capacity: 200 },
        Request::SetZone {
            zone: Some("rack-b".into()),
        },
        Request::List {
            prefix: b"user/".to_vec(),
            start_after: None,
            limit: 10,
            since: vec![(2, dotted_vector())],
        },
        Request::TokenRevoke {
            name_or_id: "app".into(),
        },
        Request::Changes {
            prefix: b"user/".to_vec(),
            since: vec![(1, dotted_vector())],
            limit: 100,
            reconcile_pending: true,
            from_now: false,
        },
    ];
    requests
        .into_iter()
        .map(|request| Call {
            request,
            w: 2,
            r: 1,
        })
        .collect()
}

fn responses(s: &Store) -> Vec<Response> {
    let record = s.get(b"r").unwrap().unwrap();
    let wire = WireRecord {
        value: record.value.clone(),
        context: record.context.to_bytes(),
        other_kinds: vec![Value::Counter(3)],
    };
    vec![
        Response::Record(Some(wire.clone())),
        Response::Record(None),
        Response::Context(record.context.to_bytes()),
        Response::Counter(-3),
        Response::Members(vec![b"m".to_vec()]),
        Response::Status(NodeStatus {
            node_id: "7".into(),
            version: "0.1.0".into(),
            uptime_seconds: 1,
            members_alive: 3,
            members_total: 3,
            layout_version: 1,
            layout_completed: 1,
            partitions_held: 4,
            migrations_in_flight: 0,
            anti_entropy_rounds: 2,
            repaired_entries: 0,
            decommissioned: false,
            entries_held: 5,
            bytes_held: 100,
            cert_expires: Some("2027-01-01T00:00:00Z".into()),
            cert_expires_in_days: Some(300),
        }),
        Response::Inspect(vec![gossipkv::client::ReplicaView {
            node: "7".into(),
            answered: true,
            record: Some(wire),
        }]),
        Response::Done,
        Response::Keys(vec![(b"k".to_vec(), "register".into())]),
        Response::Changes(gossipkv::client::ChangesPage {
            entries: entries(s),
            frontier: vec![(0, dotted_vector())],
            more: true,
            reconcile: false,
            reconcile_pending: true,
        }),
        Response::Error(gossipkv::client::Failure::new(
            gossipkv::client::ErrorCode::QuorumNotMet {
                reached: 1,
                needed: 2,
            },
            "no",
        )),
    ]
}

/// A vector with a gap: base 3 and dot 5 of node 2.
fn dotted_vector() -> VersionVector {
    let mut vv = VersionVector::new();
    vv.raise_base(NodeId(2), 3);
    vv.add(Dot::new(NodeId(2), 5));
    vv
}

fn framed<T: Serialize>(message: &T) -> Vec<u8> {
    frame::encode(message).unwrap()
}

fn write_seeds(target: &str, seeds: Vec<Vec<u8>>) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, seed) in seeds.iter().enumerate() {
        fuzzing::run(target, seed);
        std::fs::write(dir.join(format!("seed-{i:03}")), seed).unwrap();
    }
}

#[test]
#[ignore = "writes the seed corpora into fuzz/corpus/"]
fn write_seed_corpora() {
    let s = populated_store(None);

    // Peer frames: every payload kind, alone and two in one stream.
    let mut vv = VersionVector::new();
    vv.add(Dot::new(NodeId(7), 1));
    vv.add(Dot::new(NodeId(7), 3));
    let layout = layouts().pop().unwrap();
    let mut core = vec![
        Message::Digest {
            round: 1,
            layout: LayoutSummary {
                version: 1,
                completed: 1,
                hash: 9,
            },
            hash: 3,
            tokens: 5,
        },
        Message::InSync { round: 1 },
        Message::PartitionHashes {
            round: 1,
            hashes: vec![(0, 1), (3, 2)],
        },
        Message::Versions {
            round: 1,
            versions: vec![(0, vv.clone())],
            reply: true,
        },
        Message::MigrateRequest {
            stream: 1,
            partition: 2,
            phase: 1,
            since: vv.clone(),
        },
        Message::FenceRequest {
            stream: 2,
            partition: 1,
            layout: 3,
            since: vv,
        },
        Message::MigrateStart {
            stream: 1,
            partition: 2,
            entries: 1000,
            bytes: 150_000,
        },
        Message::MigrateWaiting {
            stream: 1,
            partition: 2,
            bytes_queued: 4096,
        },
        Message::MigrateCancel { stream: 1 },
        Message::Layout(layout),
        Message::Tokens({
            let mut registry = gossipkv::replication::tokens::TokenRegistry::new();
            let (record, _) = gossipkv::replication::tokens::mint(
                &[7; 48],
                "app".into(),
                vec![b"app/".to_vec()],
                true,
                false,
                1,
                Some(2),
            );
            registry.insert(record).unwrap();
            registry
        }),
    ];
    for (i, chunk) in chunks(&s).into_iter().enumerate().take(3) {
        core.push(Message::Chunk {
            stream: 1,
            index: i as u32,
            purpose: match i {
                0 => StreamPurpose::Repair,
                1 => StreamPurpose::Fence { layout: 3 },
                _ => StreamPurpose::Migration { phase: 2 },
            },
            chunk,
        });
    }
    core.extend(
        membership_payloads()
            .into_iter()
            .take(2)
            .map(Message::Membership),
    );
    let entry = entries(&s).remove(0);
    let mut payloads: Vec<Payload> = core.into_iter().map(Payload::Core).collect();
    let coord = vec![
        CoordMessage::Coordinate {
            id: 1,
            call: calls().remove(1),
        },
        CoordMessage::Coordinated {
            id: 1,
            response: responses(&s).remove(0),
        },
        CoordMessage::Replicate {
            items: vec![ReplicateItem {
                id: 2,
                partition: s.partition_of(&entry.key),
                key: entry.key.clone(),
                entry: entry.entry.clone(),
                ack: true,
            }],
        },
        CoordMessage::Replicated {
            acks: vec![(2, true), (3, false)],
        },
        CoordMessage::Fetch {
            id: 3,
            key: entry.key,
        },
        CoordMessage::Fetched {
            id: 3,
            entry: Some(entry.entry),
        },
        CoordMessage::List {
            id: 4,
            partitions: vec![0, 7],
            prefix: b"user/".to_vec(),
            start_after: Some(b"user/1".to_vec()),
            limit: 100,
            since: vec![(7, dotted_vector())],
        },
        CoordMessage::Listed {
            id: 4,
            keys: Some(vec![(b"user/2".to_vec(), "register".into())]),
        },
        CoordMessage::Changes {
            id: 5,
            partitions: vec![(0, dotted_vector()), (3, VersionVector::new())],
            prefix: b"user/".to_vec(),
            max_entries: 100,
            max_bytes: 1 << 20,
        },
        CoordMessage::ChangesFound {
            id: 5,
            pages: Some(vec![(
                0,
                gossipkv::store::FeedPage {
                    entries: entries(&s),
                    frontier: dotted_vector(),
                    complete: false,
                    behind: false,
                    reconcile: true,
                },
            )]),
        },
    ];
    payloads.extend(coord.into_iter().map(Payload::Coord));
    let mut peer: Vec<Vec<u8>> = payloads
        .into_iter()
        .map(|payload| {
            framed(&Envelope {
                from: NodeId(2),
                payload,
            })
        })
        .collect();
    for frame in &peer {
        let n = gossipkv::node::decode_peer_frame(frame).unwrap();
        assert_eq!(n, 1, "the envelope mirror no longer matches the node's");
    }
    peer.push([peer[0].clone(), peer[1].clone()].concat());
    write_seeds("peer_frame", peer);

    write_seeds("client_request", calls().iter().map(framed).collect());
    write_seeds(
        "client_response",
        responses(&s).iter().map(framed).collect(),
    );

    let mut tokens = Vec::new();
    for key in [b"r".as_slice(), b"c", b"s"] {
        let ctx = s.causal_context(key).unwrap().unwrap();
        tokens.push(ctx.to_bytes());
        tokens.push(ctx.to_string().into_bytes());
    }
    write_seeds("context_token", tokens);

    write_seeds(
        "stored_entry",
        entries(&s).into_iter().map(|e| e.entry).collect(),
    );
    let mut chunk_seeds: Vec<Vec<u8>> = chunks(&s)
        .iter()
        .map(|c| postcard::to_allocvec(c).unwrap())
        .collect();
    let foreign = populated_store(None);
    let mut unseen = chunks(&foreign).remove(0);
    unseen.complete = Some(foreign.partition_version(unseen.partition).unwrap());
    chunk_seeds.push(postcard::to_allocvec(&unseen).unwrap());
    write_seeds("change_chunk", chunk_seeds);

    let mut feed = Vec::new();
    for frontier in [
        Vec::new(),
        vec![(
            s.partition_of(b"r"),
            s.partition_version(s.partition_of(b"r")).unwrap(),
        )],
        (0..4)
            .map(|p| (p, s.partition_version(p).unwrap()))
            .collect(),
    ] {
        feed.push(fuzzing::encode_feed_cursor(4, b"user/", frontier).into_bytes());
    }
    write_seeds("feed_cursor", feed);

    write_seeds("membership_payload", membership_payloads());
    write_seeds(
        "layout_state",
        layouts()
            .iter()
            .map(|l| postcard::to_allocvec(l).unwrap())
            .collect(),
    );
    write_seeds(
        "node_config",
        [
            "data_dir = \"d\"\ninsecure = true\n",
            "node_id = \"a1\"\ndata_dir = \"/var/lib/gossipkv\"\nlisten = \"0.0.0.0:7000\"\n\
             advertise = \"10.0.0.1:7000\"\nseeds = [\"10.0.0.2:7000\", \"[::1]:7000\"]\n\
             tls_dir = \"tls\"\ncapacity = 200\nzone = \"eu-1\"\nreplicas = 3\n\
             expect_nodes = 3\nmetrics_listen = \"127.0.0.1:9100\"\n",
            "data_dir = 'd'\ninsecure = true\nreplicas = 0\n",
        ]
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .collect(),
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    drop(populated_store(Some(&path)));
    let file = std::fs::read(&path).unwrap();
    println!("store file: {} bytes", file.len());
    write_seeds("store_file", vec![file]);

    // Logs of generation 0 (what a new store expects) holding entries of
    // the populated store, whole and with a torn last record.
    let logged: Vec<LoggedEntry> = entries(&s)
        .into_iter()
        .map(|e| LoggedEntry {
            partition: s.partition_of(&e.key),
            key: e.key,
            entry: e.entry,
        })
        .collect();
    let (first, rest) = logged.split_at(logged.len() / 2);
    let whole = wal::encode_log(0, &[first.to_vec(), rest.to_vec()]);
    let torn = whole[..whole.len() - 3].to_vec();
    write_seeds("write_ahead_log", vec![whole, torn]);
}
