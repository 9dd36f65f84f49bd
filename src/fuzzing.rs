//! Entry points for the cargo-fuzz targets in `fuzz/` and for the replay of
//! their corpora in `tests/fuzz_corpus.rs`: one function per decoder of
//! outside input, running it as production does. Whatever the bytes, each
//! returns; a panic or a hang is a bug. Not a stable API.

use crate::client::{Call, Request, Response};
use crate::crdt::NodeId;
use crate::node::config::{FileConfig, NodeConfig};
use crate::replication::layout_state::LayoutState;
use crate::replication::membership::{Membership, MembershipConfig, NodeMeta};
use crate::store::{decode_record, ChangeChunk};
use crate::transport::frame;
use crate::{CausalContext, Store, StoreOptions, VersionVector};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The names of the targets, as `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/`.
pub const TARGETS: &[&str] = &[
    "peer_frame",
    "client_request",
    "client_response",
    "context_token",
    "stored_entry",
    "change_chunk",
    "membership_payload",
    "layout_state",
    "node_config",
    "store_file",
    "feed_cursor",
    "write_ahead_log",
];

/// Runs the target called `name` (see [`TARGETS`]) on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "peer_frame" => peer_frame(data),
        "client_request" => client_request(data),
        "client_response" => client_response(data),
        "context_token" => context_token(data),
        "stored_entry" => stored_entry(data),
        "change_chunk" => change_chunk(data),
        "membership_payload" => membership_payload(data),
        "layout_state" => layout_state(data),
        "node_config" => node_config(data),
        "store_file" => store_file(data),
        "feed_cursor" => feed_cursor(data),
        "write_ahead_log" => write_ahead_log(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// A peer stream's bytes, decoded frame by frame as a node does.
pub fn peer_frame(data: &[u8]) {
    let _ = crate::node::decode_peer_frame(data);
}

/// A client stream: one [`Call`] frame, checked and its tokens decoded as a
/// node does before serving it.
pub fn client_request(data: &[u8]) {
    let mut bytes = data;
    if let Ok(Some((call, _))) = frame::read_from_slice::<Call>(&mut bytes) {
        let Call { request, .. } = call;
        let _ = (request.key(), request.is_write(), request.is_admin());
        if let Request::Put {
            context: Some(token),
            ..
        }
        | Request::Delete {
            context: Some(token),
            ..
        } = &request
        {
            let _ = CausalContext::from_bytes(token);
        }
    }
}

/// A node's answer: one [`Response`] frame, and the tokens in it decoded as
/// the client does.
pub fn client_response(data: &[u8]) {
    let mut bytes = data;
    if let Ok(Some((response, _))) = frame::read_from_slice::<Response>(&mut bytes) {
        match response {
            Response::Context(token) => {
                let _ = CausalContext::from_bytes(&token);
            }
            Response::Record(Some(record)) => {
                let _ = CausalContext::from_bytes(&record.context);
            }
            Response::Changes(page) => {
                for entry in &page.entries {
                    let _ = crate::store::decode_change(&entry.key, &entry.entry);
                }
            }
            Response::Inspect(views) => {
                for record in views.iter().filter_map(|v| v.record.as_ref()) {
                    let _ = CausalContext::from_bytes(&record.context);
                }
            }
            _ => {}
        }
    }
}

/// A causal context token, as bytes and (if UTF-8) as text. A token that
/// decodes encodes back to itself.
pub fn context_token(data: &[u8]) {
    if let Ok(ctx) = CausalContext::from_bytes(data) {
        assert_eq!(
            CausalContext::from_bytes(&ctx.to_bytes()).as_ref(),
            Ok(&ctx)
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ctx) = text.parse::<CausalContext>() {
            assert_eq!(ctx.to_string().parse::<CausalContext>().as_ref(), Ok(&ctx));
        }
    }
}

/// A stored entry's bytes (as another replica sends them for inspection).
pub fn stored_entry(data: &[u8]) {
    if let Ok(Some(record)) = decode_record(b"k", data) {
        let _ = record.context.to_bytes();
    }
}

fn fresh_store() -> Store {
    let options = StoreOptions::default().node_id(NodeId(1)).partitions(4);
    Store::open_in_memory(options).expect("an in-memory store opens")
}

/// A change chunk from a peer, applied to a fresh store, which must stay
/// readable and writable.
pub fn change_chunk(data: &[u8]) {
    let Ok(chunk) = postcard::from_bytes::<ChangeChunk>(data) else {
        return;
    };
    let store = fresh_store();
    let _ = store.apply(&chunk);
    read_everything(&store);
    store
        .put(b"after", b"fuzz", None)
        .expect("the store still takes writes");
}

/// A membership payload (a SWIM message or a metadata exchange) handed to a
/// fresh node's membership.
pub fn membership_payload(data: &[u8]) {
    let meta = NodeMeta {
        capacity: 100,
        zone: None,
        name: None,
        load: Default::default(),
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 7000));
    let mut membership = Membership::new(NodeId(1), addr, 1, meta, MembershipConfig::lan(16), 7);
    let _ = membership.handle_payload(data);
    let _ = membership.members();
}

/// A saved layout state, decoded and validated as a node loads it (against
/// the partition count it declares), then queried as the node does.
pub fn layout_state(data: &[u8]) {
    let Ok(state) = postcard::from_bytes::<LayoutState>(data) else {
        return;
    };
    let partitions = state.current().partitions();
    if state.validate(partitions).is_err() {
        return;
    }
    let _ = (state.summary(), state.in_transition());
    for partition in 0..partitions {
        for node in state.holders(partition) {
            let _ = state.is_complete_replica(node, partition);
            let _ = state.pending_migrations(node);
        }
    }
    // A merge may normalise a state no node would make (say, `ready` pairs
    // outside `current`); once merged, merging again changes nothing.
    let mut merged = state.clone();
    merged.merge(&state);
    let again = merged.clone();
    assert!(!merged.merge(&again), "layout merge is not idempotent");
}

/// A change feed cursor as a client sends it (`since`): decoded as the
/// HTTP API does; one that decodes encodes back to the same frontier, and
/// reading a store's feed from it returns.
pub fn feed_cursor(data: &[u8]) {
    use crate::node::http::changes::{decode_cursor, encode_cursor};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cursor) = decode_cursor(text, 4, b"user/") else {
        return;
    };
    let again = encode_cursor(4, b"user/", cursor.clone());
    assert_eq!(
        decode_cursor(&again, 4, b"user/").ok().as_ref(),
        Some(&cursor)
    );
    let store = fresh_store();
    let _ = store.put(b"user/1", b"v", None);
    for (partition, since) in &cursor.frontier {
        let _ = store.feed_page(*partition, b"user/", since, Default::default());
    }
}

/// A cursor's text, for the seed corpus of [`feed_cursor`].
pub fn encode_feed_cursor(
    partitions: u16,
    prefix: &[u8],
    frontier: Vec<(u16, VersionVector)>,
) -> String {
    let cursor = crate::node::http::changes::FeedCursor {
        frontier,
        reconcile_pending: false,
    };
    crate::node::http::changes::encode_cursor(partitions, prefix, cursor)
}

/// A node's TOML config file.
pub fn node_config(data: &[u8]) {
    // The file is read with `read_to_string`: not UTF-8 is an error there.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = FileConfig::parse(text, Path::new("fuzz.toml")) {
        let _ = NodeConfig::from_file(file);
    }
}

/// A database file: opened as a store, then read in full.
pub fn store_file(data: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "gossipkv-fuzz-{}-{}.redb",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::write(&path, data).is_ok() {
        if let Ok(store) = Store::open(&path, StoreOptions::default()) {
            read_everything(&store);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A write-ahead log's bytes beside a new store (generation 0), opened
/// with the log as a node opens its store after a crash: decoded, every
/// entry checked and merged.
pub fn write_ahead_log(data: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Ok(dir) = tempfile_dir(&NEXT) else {
        return;
    };
    let path = dir.join("store.redb");
    let options = StoreOptions::default()
        .node_id(NodeId(1))
        .partitions(4)
        .verify_on_open(false);
    let created = Store::open(&path, options.clone()).is_ok();
    if created && std::fs::write(crate::store::wal_path(&path), data).is_ok() {
        if let Ok(store) = Store::open(&path, options.write_ahead_log(true)) {
            read_everything(&store);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir(next: &AtomicU64) -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "gossipkv-fuzz-wal-{}-{}",
        std::process::id(),
        next.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Every read a node makes of its store: all keys, every partition's
/// version and change index, and each key by itself.
fn read_everything(store: &Store) {
    let mut keys = Vec::new();
    if let Ok(rows) = store.scan_prefix(b"") {
        for (key, _) in rows.flatten() {
            keys.push(key);
        }
    }
    for partition in 0..store.partitions() {
        let _ = store.partition_version(partition);
        if let Ok(chunks) = store.changes_since(partition, &VersionVector::new()) {
            for chunk in chunks.flatten() {
                keys.extend(chunk.entries.into_iter().map(|e| e.key));
            }
        }
    }
    for key in keys {
        let _ = store.get(&key);
    }
}
