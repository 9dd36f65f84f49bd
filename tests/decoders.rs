//! Fuzzing the decoders of outside input inside the test suite: tokens,
//! remote entries and chunks, and version vectors from peers. Whatever the
//! bytes, the answer is a value or a typed error, never a panic, and a
//! store that refused or merged them stays readable and syncable.

use gossipkv::crdt::Dot;
use gossipkv::store::{ChangeChunk, ChunkLimits, RemoteEntry};
use gossipkv::sync::sync;
use gossipkv::{CausalContext, NodeId, Store, StoreOptions, VersionVector};
use proptest::prelude::*;

fn store(node: u64) -> Store {
    let options = StoreOptions::default().node_id(NodeId(node)).partitions(1);
    Store::open_in_memory(options).unwrap()
}

/// Valid encoded entries of every kind, to mutate.
fn valid_entries() -> Vec<RemoteEntry> {
    let s = store(7);
    s.put(b"r", b"value", None).unwrap();
    s.put_lww(b"l", b"value").unwrap();
    s.counter_add(b"c", -3).unwrap();
    s.set_add(b"s", b"m").unwrap();
    s.set_remove(b"s", b"m").unwrap();
    s.put(b"d", b"x", None).unwrap();
    s.delete(b"d", None).unwrap();
    s.changes_since(0, &VersionVector::new())
        .unwrap()
        .flat_map(|c| c.unwrap().entries)
        .collect()
}

fn still_healthy(s: &Store) {
    for row in s.scan_prefix(b"").unwrap() {
        // A row may be an error only if it is reported as one.
        let _ = row;
    }
    let peer = store(99);
    peer.put(b"after", b"fuzz", None).unwrap();
    match sync(s, &peer) {
        Ok(_) => assert!(s.get(b"after").unwrap().is_some()),
        // A mutated entry can claim writes of the peer's node id that the
        // peer never made; the peer rightly refuses it, with a typed error.
        Err(gossipkv::Error::UnissuedWrite { node, .. }) => assert_eq!(node, NodeId(99)),
        Err(e) => panic!("sync after fuzzing failed: {e}"),
    }
    // Whatever came in, the store still takes and serves writes.
    s.put(b"still", b"works", None).unwrap();
    assert!(s.get(b"still").unwrap().is_some());
}

fn vector_from(dots: &[(u64, u64)], bases: &[(u64, u64)]) -> VersionVector {
    let mut vv = VersionVector::new();
    for &(node, seq) in dots {
        vv.add(Dot::new(NodeId(node), seq));
    }
    for &(node, seq) in bases {
        vv.raise_base(NodeId(node), seq);
    }
    vv
}

fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..8, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn tokens_from_any_bytes_or_text_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64), text in ".{0,64}") {
        let _ = CausalContext::from_bytes(&bytes);
        let _ = text.parse::<CausalContext>();
        if let Ok(ctx) = CausalContext::from_bytes(&bytes) {
            prop_assert_eq!(CausalContext::from_bytes(&ctx.to_bytes()).unwrap(), ctx);
        }
    }

    #[test]
    fn random_entry_bytes_are_refused_or_merged_never_a_panic(
        entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 1..4),
    ) {
        let s = store(1);
        let chunk = ChangeChunk {
            partition: 0,
            entries: entries.into_iter().map(|entry| RemoteEntry { key: b"k".to_vec(), entry }).collect(),
            complete: None,
            purged: None,
        };
        let _ = s.apply(&chunk);
        still_healthy(&s);
    }

    #[test]
    fn mutated_valid_entries_are_refused_or_merged_never_a_panic(
        pick in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let valid = valid_entries();
        let mut remote = valid[pick.index(valid.len())].clone();
        for (at, byte) in flips {
            let i = at.index(remote.entry.len());
            remote.entry[i] ^= byte;
        }
        if let Some(cut) = cut {
            remote.entry.truncate(cut.index(remote.entry.len() + 1));
        }
        let s = store(1);
        let _ = s.apply(&ChangeChunk { partition: 0, entries: vec![remote], complete: None, purged: None });
        still_healthy(&s);
    }

    #[test]
    fn version_vectors_from_peers_are_safe_as_since_and_as_complete(
        dots in proptest::collection::vec((0u64..4, seq()), 0..8),
        bases in proptest::collection::vec((0u64..4, seq()), 0..4),
    ) {
        let s = store(1);
        s.put(b"a", b"1", None).unwrap();
        s.put(b"b", b"2", None).unwrap();
        let vv = vector_from(&dots, &bases);
        let listed: usize = s
            .changes_since_with(0, &vv, ChunkLimits { max_entries: 1, max_bytes: 1 })
            .unwrap()
            .map(|c| c.unwrap().entries.len())
            .sum();
        prop_assert!(listed <= 2);
        let receiver = store(2);
        let _ = receiver.apply(&ChangeChunk { partition: 0, entries: vec![], complete: Some(vv.clone()), purged: None });
        still_healthy(&receiver);
        // Decoding a vector from arbitrary bytes is as safe.
        let bytes = postcard::to_allocvec(&vv).unwrap();
        let decoded: VersionVector = postcard::from_bytes(&bytes).unwrap();
        prop_assert!(decoded.dominates(&vv) && vv.dominates(&decoded));
    }

    #[test]
    fn chunks_decoded_from_any_bytes_are_applied_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(chunk) = postcard::from_bytes::<ChangeChunk>(&bytes) {
            let s = store(1);
            let _ = s.apply(&chunk);
            still_healthy(&s);
        }
    }
}

mod replication_messages {
    use super::*;
    use gossipkv::replication::layout::NodeSpec;
    use gossipkv::replication::layout_state::LayoutState;
    use gossipkv::replication::membership::NodeMeta;
    use gossipkv::replication::message::Message;
    use gossipkv::replication::replica::{Replica, ReplicaConfig};
    use std::sync::Arc;
    use std::time::Duration;

    fn replica() -> Replica {
        let options = StoreOptions::default().node_id(NodeId(1)).partitions(8);
        let store = Arc::new(Store::open_in_memory(options).unwrap());
        store.put(b"k", b"v", None).unwrap();
        let specs: Vec<NodeSpec> = (1..=3).map(|i| NodeSpec::new(NodeId(i), 100)).collect();
        let layout = LayoutState::bootstrap(8, 3, &specs);
        let meta = NodeMeta {
            capacity: 100,
            zone: None,
            name: None,
            load: Default::default(),
        };
        let addr = "127.0.0.1:7000".parse().unwrap();
        Replica::new(store, addr, 1, meta, layout, ReplicaConfig::default(), 7)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Whatever a peer sends, the core answers with outputs or a typed
        /// error, and keeps working.
        #[test]
        fn any_peer_message_is_handled_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = replica();
            let _ = r.start(Duration::ZERO);
            if let Ok(message) = postcard::from_bytes::<Message>(&bytes) {
                let _ = r.handle_message(Duration::from_secs(1), NodeId(2), message);
            }
            // Still serves a well-formed message afterwards.
            let digest = Message::Membership(vec![0; 4]);
            let _ = r.handle_message(Duration::from_secs(2), NodeId(2), digest);
            prop_assert!(r.store().get(b"k").unwrap().is_some());
        }
    }

    #[test]
    fn out_of_range_partitions_and_foreign_layouts_are_refused() {
        let mut r = replica();
        let chunk = ChangeChunk {
            partition: 99,
            entries: vec![],
            complete: None,
            purged: None,
        };
        let message = Message::Chunk {
            stream: 1,
            index: 0,
            purpose: gossipkv::replication::message::StreamPurpose::Repair,
            chunk,
        };
        let err = r
            .handle_message(Duration::ZERO, NodeId(2), message)
            .unwrap_err();
        assert!(err.to_string().contains("partition 99"), "{err}");
        let foreign = LayoutState::bootstrap(16, 3, &[NodeSpec::new(NodeId(2), 100)]);
        let err = r
            .handle_message(Duration::ZERO, NodeId(2), Message::Layout(foreign))
            .unwrap_err();
        assert!(err.to_string().contains("layout"), "{err}");
        let err = r
            .handle_message(
                Duration::ZERO,
                NodeId(2),
                Message::Membership(b"garbage".to_vec()),
            )
            .unwrap_err();
        assert!(err.to_string().contains("membership"), "{err}");
    }
}
