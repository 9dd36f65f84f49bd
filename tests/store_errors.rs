//! What a user can rely on when things go wrong: a store survives being
//! closed and reopened, refuses files and inputs it cannot trust with a typed
//! error (never a panic), and a rejected write or chunk changes nothing.

use gossipkv::crdt::{
    CausalContext, Dot, NodeId, Record, TokenError, Value, ValueKind, VersionVector, WallClock,
};
use gossipkv::store::{
    Batch, ChangeChunk, RemoteEntry, Store, StoreOptions, MAX_KEY_BYTES, MAX_VALUE_BYTES,
};
use gossipkv::Error;
use redb::{ReadableDatabase, TableDefinition, TableHandle};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A wall clock that never moves, so LWW order depends on the hybrid clock alone.
struct FixedClock(u64);

impl WallClock for FixedClock {
    fn now_ms(&self) -> u64 {
        self.0
    }
}

fn memory_store(node: u64, partitions: u16) -> Store {
    Store::open_in_memory(
        StoreOptions::default()
            .node_id(NodeId(node))
            .partitions(partitions),
    )
    .expect("an in-memory store opens")
}

/// Everything a reader can see: live keys with their records, and every
/// partition's version vector.
#[derive(Debug, PartialEq)]
struct Snapshot {
    records: Vec<(Vec<u8>, Record)>,
    versions: Vec<VersionVector>,
}

fn snapshot(store: &Store) -> Snapshot {
    let records = store
        .scan_prefix(b"")
        .expect("scan starts")
        .collect::<Result<Vec<_>, _>>()
        .expect("scan reads");
    let versions = (0..store.partitions())
        .map(|p| store.partition_version(p).expect("version reads"))
        .collect();
    Snapshot { records, versions }
}

/// `count` distinct keys `{prefix}{i}` that hash to `partition`.
fn keys_in_partition(store: &Store, partition: u16, prefix: &str, count: usize) -> Vec<Vec<u8>> {
    (0u32..)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .filter(|k| store.partition_of(k) == partition)
        .take(count)
        .collect()
}

/// A fixed-seed xorshift byte stream: reproducible "random" garbage.
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn register(values: &[&[u8]]) -> Value {
    Value::Register(values.iter().map(|v| v.to_vec()).collect())
}

// 1. Reopening

#[test]
fn a_file_store_reads_back_identically_after_it_is_closed_and_reopened() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let clock: Arc<dyn WallClock> = Arc::new(FixedClock(1_000_000));
    let reg_context;
    let before;
    {
        let store = Store::open(
            &path,
            StoreOptions::default()
                .node_id(NodeId(42))
                .partitions(16)
                .clock(clock.clone()),
        )?;
        store.put(b"reg", b"v1", None)?;
        reg_context = store.put(b"reg", b"v2", None)?;
        store.put_lww(b"lww", b"l1")?;
        assert_eq!(store.counter_add(b"ctr", 5)?, 5);
        assert_eq!(store.counter_add(b"ctr", -7)?, -2);
        store.set_add(b"set", b"a")?;
        store.set_add(b"set", b"b")?;
        store.set_remove(b"set", b"a")?;
        store.put(b"gone", b"x", None)?;
        store.delete(b"gone", None)?;
        let mut batch = Batch::new();
        batch
            .put("batch/reg", "r")
            .put_lww("batch/lww", "l")
            .counter_add("batch/ctr", 9)
            .set_add("batch/set", "m");
        assert_eq!(store.write(&batch)?.len(), 4);
        before = snapshot(&store);
        assert_eq!(before.records.len(), 8, "{:?}", before.records);
    }

    // Default options: node id and partition count come from the file.
    {
        let store = Store::open(&path, StoreOptions::default())?;
        assert_eq!(store.node_id(), NodeId(42));
        assert_eq!(store.partitions(), 16);
        assert_eq!(snapshot(&store), before);
        let reg = store.get(b"reg")?.expect("reg survives");
        assert_eq!(reg.value, register(&[b"v2"]));
        assert_eq!(reg.context, reg_context);
        assert_eq!(
            store.get(b"lww")?.map(|r| r.value),
            Some(Value::Lww(b"l1".to_vec()))
        );
        assert_eq!(store.counter(b"ctr")?, -2);
        assert_eq!(store.set_members(b"set")?, vec![b"b".to_vec()]);
        assert_eq!(store.get(b"gone")?, None);
        assert_eq!(store.counter(b"batch/ctr")?, 9);
        assert_eq!(store.set_members(b"batch/set")?, vec![b"m".to_vec()]);
    }

    // The partition count and node id are fixed when the store is created.
    match Store::open(&path, StoreOptions::default().partitions(8)) {
        Err(Error::PartitionCountMismatch { stored, requested }) => {
            assert_eq!((stored, requested), (16, 8));
        }
        other => panic!("expected PartitionCountMismatch, got {other:?}"),
    }
    match Store::open(&path, StoreOptions::default().node_id(NodeId(43))) {
        Err(err @ Error::NodeIdMismatch { .. }) => {
            let Error::NodeIdMismatch { stored, requested } = &err else {
                unreachable!()
            };
            assert_eq!((*stored, *requested), (NodeId(42), NodeId(43)));
            assert!(err.to_string().contains(&NodeId(43).to_string()), "{err}");
        }
        other => panic!("expected NodeIdMismatch, got {other:?}"),
    }

    // The refused opens changed nothing, and writing resumes where it left
    // off: the old context is not "from the future", and the hybrid clock
    // was persisted, so an LWW write under the same frozen wall clock still
    // wins over the one made before the restart.
    let store = Store::open(
        &path,
        StoreOptions::default()
            .node_id(NodeId(42))
            .partitions(16)
            .clock(clock),
    )?;
    assert_eq!(snapshot(&store), before);
    store.put(b"reg", b"v3", Some(&reg_context))?;
    assert_eq!(
        store.get(b"reg")?.map(|r| r.value),
        Some(register(&[b"v3"]))
    );
    store.put_lww(b"lww", b"l2")?;
    assert_eq!(
        store.get(b"lww")?.map(|r| r.value),
        Some(Value::Lww(b"l2".to_vec()))
    );
    Ok(())
}

// 2. Garbage files

#[test]
fn a_file_of_random_bytes_is_refused_with_a_typed_error_and_left_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    for (name, len) in [("big.bin", 64 * 1024), ("tiny.bin", 7), ("page.bin", 4096)] {
        let path = dir.path().join(name);
        let bytes = garbage(len, 0x5eed_0000 + len as u64);
        std::fs::write(&path, &bytes)?;
        let err = Store::open(&path, StoreOptions::default()).expect_err("garbage must not open");
        assert!(
            matches!(
                err,
                Error::Open { .. } | Error::NotAStore { .. } | Error::Corrupt { .. }
            ),
            "{name}: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        // Observed with redb 4.5: the magic number is checked first.
        match &err {
            Error::Open {
                path: reported,
                source: redb::Error::Io(io),
            } => {
                assert_eq!(reported, &path);
                assert_eq!(io.kind(), std::io::ErrorKind::InvalidData, "{io}");
                assert!(message.contains("magic number"), "{message}");
            }
            other => panic!("{name}: expected Open with an I/O error, got {other:?}"),
        }
        assert_eq!(std::fs::read(&path)?, bytes, "{name} was modified");
    }
    Ok(())
}

/// redb 4.5 trusts page contents once the header checks out: a file whose
/// header is intact but whose pages were overwritten panics inside
/// `redb::Database::new` (`unreachable!()` in `Btree::get_helper`, reached
/// from `get_allocator_state_table`). `Store::open` must turn that into an
/// error.
#[test]
fn a_store_file_with_garbage_after_its_header_gives_a_typed_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    {
        let store = Store::open(&path, StoreOptions::default().partitions(4))?;
        for i in 0..200u32 {
            store.put(format!("k{i}").as_bytes(), b"value", None)?;
        }
    }
    let mut bytes = std::fs::read(&path)?;
    let tail = garbage(bytes.len() - 4096, 7);
    bytes[4096..].copy_from_slice(&tail);
    std::fs::write(&path, &bytes)?;
    let outcome = std::panic::catch_unwind(|| Store::open(&path, StoreOptions::default()).err());
    match outcome {
        Ok(Some(err)) => assert!(!err.to_string().is_empty()),
        Ok(None) => {}
        Err(_) => panic!("Store::open panicked on a damaged file"),
    }
    Ok(())
}

/// Pages damaged after a clean close, with the header intact: redb 4.5
/// can open such a file without complaint and panic on the first read of
/// a damaged page. The page checksums verified at open (the default)
/// refuse it up front with an error naming the file. Damage that lands
/// in free pages is harmless, and then every record must read back as
/// written: never a panic, never a silently different record.
#[test]
fn a_store_file_with_damaged_data_pages_is_refused_at_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_, clean) = store_file_images(dir.path())?;
    let written = {
        let path = dir.path().join("intact.redb");
        std::fs::write(&path, &clean)?;
        snapshot(&Store::open(&path, StoreOptions::default())?)
    };
    assert_eq!(written.records.len(), 2000);
    let reproducer = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions/store_file/crash-629e4685ecd540f9dc2d364a6d99134a19a89e5b");
    // The fuzzer's reproducer (a file Store::open used to accept, and whose
    // first scan panicked) and images of our own store with 64 bytes
    // overwritten at points spread through its pages.
    let mut images = vec![(
        "fuzz reproducer".to_string(),
        std::fs::read(reproducer)?,
        true,
    )];
    for i in 1..16 {
        let at = clean.len() * i / 16;
        let mut bytes = clean.clone();
        bytes[at..at + 64].copy_from_slice(&garbage(64, 11 + i as u64));
        images.push((format!("damaged at byte {at}"), bytes, false));
    }
    let mut refused = 0;
    for (name, bytes, must_refuse) in images {
        let path = dir.path().join("damaged.redb");
        std::fs::write(&path, &bytes)?;
        let outcome = std::panic::catch_unwind(|| {
            Store::open(&path, StoreOptions::default()).map(|s| snapshot(&s))
        });
        match outcome {
            Ok(Err(err)) => {
                let message = err.to_string();
                assert!(
                    message.contains(&path.display().to_string()),
                    "{name}: {message}"
                );
                refused += 1;
            }
            Ok(Ok(seen)) => {
                assert!(
                    !must_refuse,
                    "{name}: opened and read {} records",
                    seen.records.len()
                );
                assert!(
                    seen == written,
                    "{name}: opened and read records that differ from those written"
                );
            }
            Err(_) => panic!("{name}: opening or reading a damaged file panicked"),
        }
    }
    // Most of a freshly written store is live pages: damage spread through
    // it must be caught somewhere, not only in the reproducer.
    assert!(
        refused > 1,
        "only {refused} of 16 damaged images were refused"
    );
    Ok(())
}

// 3. Truncated files

/// Writes 2000 keys; returns the file as it was while the store was still
/// open (what a crash leaves: redb's "recovery required" flag is set) and
/// after a clean close.
fn store_file_images(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), Box<dyn std::error::Error>> {
    let path = dir.join("source.redb");
    let store = Store::open(
        &path,
        StoreOptions::default().node_id(NodeId(1)).partitions(16),
    )?;
    for chunk in 0..4u32 {
        let mut batch = Batch::new();
        for i in 0..500 {
            batch.put(format!("key/{:05}", chunk * 500 + i), [7u8; 32]);
        }
        store.write(&batch)?;
    }
    let crashed = std::fs::read(&path)?;
    drop(store);
    let clean = std::fs::read(&path)?;
    Ok((crashed, clean))
}

#[test]
fn a_truncated_store_file_is_refused_with_a_typed_error_and_not_repaired() -> TestResult {
    // What redb 4.5 does, observed and pinned here:
    // - It never repairs a truncated file. After a clean close the header's
    //   layout is trusted, and any file shorter than it is refused with
    //   `Corrupted("File truncated below stored layout: file_len=…,
    //   layout_len=…")`.
    // - After a crash (recovery flag set) it rebuilds the layout from the
    //   file length instead; a length below the minimum layout (1000 bytes)
    //   is `Corrupted("File truncated below the minimum layout …")`, and a
    //   longer one fails reading missing pages with an I/O `UnexpectedEof`
    //   ("failed to fill whole buffer").
    // - An empty file exists, so `Store::open` opens rather than creates it,
    //   and redb refuses it: I/O `InvalidData`, "Database file is empty and
    //   creating a new database was not requested".
    // - A failed open leaves the file as it was, except in the crashed case
    //   that gets as far as reading pages: before failing, redb rewrites the
    //   layout fields of its header (bytes 28..30 of the file) to match the
    //   shorter length. The length and every other byte are unchanged, and
    //   opening again fails the same way.
    let dir = tempfile::tempdir()?;
    let (crashed, clean) = store_file_images(dir.path())?;
    assert!(clean.len() > 2000, "store file is {} bytes", clean.len());

    // Untruncated, both images open with all 2000 keys: redb recovers the
    // crashed one, so committed writes survive a crash.
    for (name, image) in [("crashed", &crashed), ("clean", &clean)] {
        let path = dir.path().join(format!("{name}-whole.redb"));
        std::fs::write(&path, image)?;
        let store = Store::open(&path, StoreOptions::default())?;
        assert_eq!(store.scan_prefix(b"key/")?.count(), 2000, "{name}");
        assert!(store.get(b"key/01999")?.is_some(), "{name}");
    }

    enum Expect {
        Corrupted(&'static str),
        Io(std::io::ErrorKind),
    }
    let half_clean = clean.len() / 2;
    let half_crashed = crashed.len() / 2;
    let cases = [
        (
            "clean",
            &clean,
            half_clean,
            Expect::Corrupted("truncated below stored layout"),
        ),
        (
            "clean",
            &clean,
            1000,
            Expect::Corrupted("truncated below stored layout"),
        ),
        (
            "clean",
            &clean,
            0,
            Expect::Io(std::io::ErrorKind::InvalidData),
        ),
        (
            "crashed",
            &crashed,
            half_crashed,
            Expect::Io(std::io::ErrorKind::UnexpectedEof),
        ),
        (
            "crashed",
            &crashed,
            1000,
            Expect::Corrupted("truncated below the minimum layout"),
        ),
        (
            "crashed",
            &crashed,
            0,
            Expect::Io(std::io::ErrorKind::InvalidData),
        ),
    ];
    for (name, image, len, expect) in cases {
        let rewrites_header = name == "crashed" && len == half_crashed;
        let path = dir.path().join(format!("{name}-{len}.redb"));
        std::fs::write(&path, &image[..len])?;
        let err = Store::open(&path, StoreOptions::default())
            .expect_err("redb 4.5 does not open a truncated file");
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "{name} {len}: {message}"
        );
        match (&err, expect) {
            (
                Error::Open {
                    source: redb::Error::Corrupted(reason),
                    ..
                },
                Expect::Corrupted(fragment),
            ) => assert!(reason.contains(fragment), "{name} {len}: {reason}"),
            (
                Error::Open {
                    source: redb::Error::Io(io),
                    ..
                },
                Expect::Io(kind),
            ) => assert_eq!(io.kind(), kind, "{name} {len}: {io}"),
            (other, _) => panic!("{name} {len}: unexpected {other:?}"),
        }
        // Whether the file is left as it was: see the comment at the top.
        let now = std::fs::read(&path)?;
        assert_eq!(now.len(), len, "{name} {len}: the file changed length");
        let changed: Vec<usize> = (0..len).filter(|&i| now[i] != image[i]).collect();
        if rewrites_header {
            assert!(
                !changed.is_empty(),
                "{name} {len}: expected a header rewrite"
            );
            assert!(
                changed.iter().all(|&i| i < 64),
                "{name} {len}: bytes changed beyond redb's header: {changed:?}"
            );
            // Opening again fails the same way.
            let again = Store::open(&path, StoreOptions::default());
            assert!(
                matches!(
                    &again,
                    Err(Error::Open { source: redb::Error::Io(io), .. })
                        if io.kind() == std::io::ErrorKind::UnexpectedEof
                ),
                "{name} {len}: {again:?}"
            );
        } else {
            assert!(
                changed.is_empty(),
                "{name} {len}: bytes changed: {changed:?}"
            );
        }
    }
    Ok(())
}

// 4. Other redb databases

#[test]
fn a_redb_database_of_another_application_is_not_a_store_and_is_left_untouched() -> TestResult {
    const USERS: TableDefinition<&str, u64> = TableDefinition::new("users");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(USERS)?.insert("alice", 7)?;
        txn.commit()?;
    }
    for options in [
        StoreOptions::default(),
        StoreOptions::default().node_id(NodeId(5)).partitions(4),
    ] {
        let err = Store::open(&path, options).expect_err("a foreign database must not open");
        match &err {
            Error::NotAStore {
                path: reported,
                reason,
            } => {
                assert_eq!(reported, &path.display().to_string());
                assert!(!reason.is_empty());
            }
            other => panic!("expected NotAStore, got {other:?}"),
        }
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    // The refused open rolled back: no gossipkv table was added.
    let db = redb::Database::open(&path)?;
    let txn = db.begin_read()?;
    let tables: Vec<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
    assert_eq!(tables, vec!["users".to_string()]);
    assert_eq!(
        txn.open_table(USERS)?.get("alice")?.map(|v| v.value()),
        Some(7)
    );
    Ok(())
}

/// `list_tables()` leaves out multimap tables: a database holding only
/// those must not be taken for an empty one and turned into a store.
#[test]
fn a_redb_database_with_only_multimap_tables_is_not_a_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("multimap.redb");
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.open_multimap_table(redb::MultimapTableDefinition::<&str, u64>::new("tags"))?
            .insert("a", 1)?;
        txn.commit()?;
    }
    let outcome = Store::open(&path, StoreOptions::default());
    assert!(
        matches!(outcome, Err(Error::NotAStore { .. })),
        "{outcome:?}"
    );
    Ok(())
}

/// A database with its own table named `meta` of other key/value types is
/// not a store (rather than a storage error about table types).
#[test]
fn a_redb_database_with_a_foreign_meta_table_is_not_a_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("meta.redb");
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(TableDefinition::<&str, u64>::new("meta"))?
            .insert("a", 1)?;
        txn.commit()?;
    }
    let outcome = Store::open(&path, StoreOptions::default());
    assert!(
        matches!(outcome, Err(Error::NotAStore { .. })),
        "{outcome:?}"
    );
    Ok(())
}

// 5. Causal context tokens

#[test]
fn malformed_context_tokens_are_refused_with_a_reason() {
    let refused = |token: &str| {
        let err = token
            .parse::<CausalContext>()
            .expect_err("a bad token must not parse");
        assert!(!err.to_string().is_empty());
        let wrapped = Error::from(err.clone());
        assert!(matches!(wrapped, Error::BadToken(_)));
        assert!(wrapped.to_string().contains(&err.to_string()));
        err
    };
    assert!(matches!(refused("not base64!"), TokenError::Base64(_)));
    assert_eq!(refused(""), TokenError::Empty);
    assert_eq!(refused("   "), TokenError::Empty);
    // Valid base64 (URL-safe, no padding) of garbage bytes.
    assert_eq!(refused("3q2-7w"), TokenError::Version(0xde)); // de ad be ef
    assert!(matches!(refused("Af__"), TokenError::Malformed(_))); // 01 ff ff
    assert!(matches!(refused("AQAA"), TokenError::Malformed(_))); // 01 00 00: trailing
    assert_eq!(refused("AQEHAA"), TokenError::ZeroCounter(NodeId(7))); // node 7, seq 0
}

#[test]
fn a_context_that_claims_writes_this_node_never_made_is_refused() -> TestResult {
    // Store A writes five times; store B reuses A's node id (a mistake the
    // check exists for) and is handed A's context for the same key.
    let a = memory_store(1, 16);
    let mut context = CausalContext::new();
    for i in 0..5u8 {
        context = a.put(b"key", &[i], None)?;
    }
    assert_eq!(context.get(NodeId(1)), 5);
    let token = context.to_string();
    let parsed: CausalContext = token.parse()?;
    assert_eq!(parsed, context);
    // A's own token is accepted by A.
    a.put(b"key", b"fine", Some(&parsed))?;

    let b = memory_store(1, 16);
    let before = snapshot(&b);
    let check = |result: Result<CausalContext, Error>| match result {
        Err(err @ Error::UnissuedWrite { .. }) => {
            let Error::UnissuedWrite {
                node,
                claimed,
                issued,
                ..
            } = &err
            else {
                unreachable!()
            };
            assert_eq!((*node, *claimed, *issued), (NodeId(1), 5, 0));
            assert!(err.to_string().contains("\"key\""), "{err}");
        }
        other => panic!("expected UnissuedWrite, got {other:?}"),
    };
    check(b.put(b"key", b"v", Some(&parsed)));
    check(b.delete(b"key", Some(&parsed)));
    let mut batch = Batch::new();
    batch
        .put("other", "x")
        .put_with_context("key", "v", parsed.clone());
    match b.write(&batch) {
        Err(Error::UnissuedWrite { claimed: 5, .. }) => {}
        other => panic!("expected UnissuedWrite, got {other:?}"),
    }
    assert_eq!(snapshot(&b), before, "a refused write changed the store");
    // B's own writes are unaffected.
    let own = b.put(b"key", b"mine", None)?;
    assert_eq!(own.get(NodeId(1)), 1);
    Ok(())
}

// 6. Value kinds

#[test]
fn a_key_keeps_its_kind_until_it_is_deleted() -> TestResult {
    let store = memory_store(1, 16);
    store.put(b"reg", b"v", None)?;
    store.put_lww(b"lww", b"l")?;
    store.counter_add(b"ctr", 3)?;
    store.set_add(b"set", b"m")?;
    let before = snapshot(&store);

    let wrong = |result: Result<(), Error>, want_expected, want_found| match result {
        Err(err @ Error::WrongType { .. }) => {
            let Error::WrongType {
                key,
                expected,
                found,
            } = &err
            else {
                unreachable!()
            };
            assert_eq!((*expected, *found), (want_expected, want_found), "{err}");
            assert!(!key.is_empty());
            assert!(err.to_string().contains(key.as_str()), "{err}");
        }
        other => panic!("expected WrongType {want_expected}/{want_found}, got {other:?}"),
    };
    use ValueKind::*;
    wrong(store.counter_add(b"reg", 1).map(drop), Counter, Register);
    wrong(store.set_add(b"reg", b"x").map(drop), Set, Register);
    wrong(store.set_remove(b"reg", b"x").map(drop), Set, Register);
    wrong(store.put_lww(b"reg", b"x").map(drop), Lww, Register);
    wrong(store.put(b"lww", b"x", None).map(drop), Register, Lww);
    wrong(store.put(b"ctr", b"x", None).map(drop), Register, Counter);
    wrong(store.set_add(b"ctr", b"x").map(drop), Set, Counter);
    wrong(store.counter_add(b"set", 1).map(drop), Counter, Set);
    wrong(store.counter(b"reg").map(drop), Counter, Register);
    wrong(store.set_members(b"reg").map(drop), Set, Register);
    wrong(store.counter(b"set").map(drop), Counter, Set);
    wrong(store.set_members(b"ctr").map(drop), Set, Counter);

    for (key, kind) in [(&b"ctr"[..], Counter), (&b"set"[..], Set)] {
        match store.delete(key, None) {
            Err(err @ Error::DeleteUnsupported { .. }) => {
                assert!(matches!(err, Error::DeleteUnsupported { kind: k, .. } if k == kind));
                assert!(!err.to_string().is_empty());
            }
            other => panic!("expected DeleteUnsupported, got {other:?}"),
        }
    }
    assert_eq!(
        snapshot(&store),
        before,
        "a refused write changed the store"
    );
    assert_eq!(store.counter(b"ctr")?, 3);

    // A set emptied by removals is still a set.
    store.set_remove(b"set", b"m")?;
    assert!(store.set_members(b"set")?.is_empty());
    assert!(matches!(
        store.delete(b"set", None),
        Err(Error::DeleteUnsupported { kind: Set, .. })
    ));

    // A deleted register or LWW key may come back as any kind.
    store.delete(b"reg", None)?;
    assert_eq!(store.get(b"reg")?, None);
    assert_eq!(store.counter(b"reg")?, 0);
    assert_eq!(store.counter_add(b"reg", 4)?, 4);
    let record = store.get(b"reg")?.expect("the counter is live");
    assert_eq!(record.value, Value::Counter(4));
    assert!(record.other_kinds.is_empty());
    store.delete(b"lww", None)?;
    store.set_add(b"lww", b"now a set")?;
    assert_eq!(store.set_members(b"lww")?, vec![b"now a set".to_vec()]);
    Ok(())
}

// 7. Sizes

#[test]
fn empty_and_oversized_keys_and_values_are_refused() -> TestResult {
    let store = memory_store(1, 16);
    let before = snapshot(&store);
    let empty_key = [
        store.put(b"", b"v", None).map(drop),
        store.put_lww(b"", b"v").map(drop),
        store.delete(b"", None).map(drop),
        store.counter_add(b"", 1).map(drop),
        store.set_add(b"", b"m").map(drop),
        store.set_remove(b"", b"m").map(drop),
        store
            .write(Batch::new().put("ok", "v").put("", "v"))
            .map(drop),
    ];
    for result in empty_key {
        assert!(matches!(result, Err(Error::InvalidKey(_))), "{result:?}");
    }

    let long_key = vec![b'k'; MAX_KEY_BYTES + 1];
    let key_results = [
        store.put(&long_key, b"v", None).map(drop),
        store.counter_add(&long_key, 1).map(drop),
        store.set_add(&long_key, b"m").map(drop),
        store.delete(&long_key, None).map(drop),
    ];
    for result in key_results {
        match result {
            Err(Error::TooLarge { what, len, max }) => {
                assert_eq!((what, len, max), ("key", MAX_KEY_BYTES + 1, MAX_KEY_BYTES));
            }
            other => panic!("expected TooLarge key, got {other:?}"),
        }
    }

    let big_value = vec![0u8; MAX_VALUE_BYTES + 1];
    let value_results = [
        ("value", store.put(b"k", &big_value, None)),
        ("value", store.put_lww(b"l", &big_value)),
        ("set member", store.set_add(b"s", &big_value)),
    ];
    for (want, result) in value_results {
        match result {
            Err(err @ Error::TooLarge { .. }) => {
                let Error::TooLarge { what, len, max } = &err else {
                    unreachable!()
                };
                assert_eq!(
                    (*what, *len, *max),
                    (want, MAX_VALUE_BYTES + 1, MAX_VALUE_BYTES)
                );
                assert!(err.to_string().contains(want), "{err}");
            }
            other => panic!("expected TooLarge {want}, got {other:?}"),
        }
    }
    assert_eq!(
        snapshot(&store),
        before,
        "a refused write changed the store"
    );

    // The limits themselves are accepted.
    let max_key = vec![b'k'; MAX_KEY_BYTES];
    store.put(&max_key, b"v", None)?;
    assert!(store.get(&max_key)?.is_some());
    let max_value = vec![9u8; MAX_VALUE_BYTES];
    store.put(b"big", &max_value, None)?;
    assert_eq!(
        store.get(b"big")?.map(|r| r.value),
        Some(Value::Register(vec![max_value]))
    );
    Ok(())
}

// 8. Remote chunks

#[test]
fn a_bad_remote_chunk_is_rejected_whole_and_changes_nothing() -> TestResult {
    const PARTITIONS: u16 = 8;
    let source = memory_store(1, PARTITIONS);
    let target = memory_store(2, PARTITIONS);
    let p: u16 = 3;
    let q: u16 = 5;
    for key in keys_in_partition(&source, p, "src/", 4) {
        source.put(&key, b"from source", None)?;
    }
    source.counter_add(&keys_in_partition(&source, p, "ctr/", 1)[0], 11)?;
    let q_key = keys_in_partition(&source, q, "src/", 1).remove(0);
    source.put(&q_key, b"other partition", None)?;
    // The target has data of its own, some of it in the same partition.
    for key in keys_in_partition(&target, p, "dst/", 3) {
        target.put(&key, b"target's", None)?;
    }
    target.set_add(b"dst/set", b"m")?;

    let chunks = |partition| -> Result<Vec<ChangeChunk>, Error> {
        source
            .changes_since(partition, &VersionVector::new())?
            .collect()
    };
    let good = chunks(p)?.pop().expect("one chunk");
    assert_eq!(good.entries.len(), 5);
    assert!(good.complete.is_some());
    let foreign = chunks(q)?.pop().expect("one chunk").entries.remove(0);
    assert_eq!(foreign.key, q_key);
    let valid = good.entries[0].entry.clone();
    let spare_key = keys_in_partition(&source, p, "spare/", 1).remove(0);

    let before = snapshot(&target);
    let rejected = |chunk: &ChangeChunk| -> Error {
        let err = target
            .apply(chunk)
            .expect_err("a bad chunk must be rejected");
        assert!(!err.to_string().is_empty());
        assert_eq!(
            snapshot(&target),
            before,
            "a rejected chunk changed the store"
        );
        err
    };

    for partition in [PARTITIONS, u16::MAX] {
        let chunk = ChangeChunk {
            partition,
            ..good.clone()
        };
        match rejected(&chunk) {
            Error::PartitionOutOfRange {
                partition: got,
                count,
            } => {
                assert_eq!((got, count), (partition, PARTITIONS));
            }
            other => panic!("expected PartitionOutOfRange, got {other:?}"),
        }
    }

    // Valid entries first, the bad one last: nothing of the chunk lands.
    let with_last = |bad: RemoteEntry| {
        let mut chunk = good.clone();
        chunk.entries.push(bad);
        chunk
    };
    match rejected(&with_last(foreign.clone())) {
        Error::MisroutedEntry {
            claimed, actual, ..
        } => assert_eq!((claimed, actual), (p, q)),
        other => panic!("expected MisroutedEntry, got {other:?}"),
    }
    // The whole chunk sent under the wrong partition number.
    let relabelled = ChangeChunk {
        partition: q,
        ..good.clone()
    };
    assert!(matches!(
        rejected(&relabelled),
        Error::MisroutedEntry { claimed, actual, .. } if claimed == q && actual == p
    ));

    let mut wrong_version = valid.clone();
    wrong_version[0] = 2;
    let mut trailing = valid.clone();
    trailing.push(0);
    let bad_bytes: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", garbage(200, 99)),
        ("truncated", valid[..valid.len() / 2].to_vec()),
        ("version byte only", valid[..1].to_vec()),
        ("empty", Vec::new()),
        ("wrong format version", wrong_version),
        ("trailing bytes", trailing),
    ];
    for (what, entry) in bad_bytes {
        let bad = RemoteEntry {
            key: spare_key.clone(),
            entry,
        };
        match rejected(&with_last(bad)) {
            Error::InvalidEntry { key, reason } => {
                assert!(key.contains("spare/"), "{what}: {key}");
                assert!(!reason.is_empty(), "{what}");
            }
            other => panic!("{what}: expected InvalidEntry, got {other:?}"),
        }
    }

    let empty_key = RemoteEntry {
        key: Vec::new(),
        entry: valid.clone(),
    };
    assert!(matches!(
        rejected(&with_last(empty_key)),
        Error::InvalidKey(_)
    ));
    let long_key = RemoteEntry {
        key: vec![b'k'; MAX_KEY_BYTES + 1],
        entry: valid.clone(),
    };
    assert!(matches!(
        rejected(&with_last(long_key)),
        Error::TooLarge { what: "key", .. }
    ));

    // The good chunk applies, once.
    let report = target.apply(&good)?;
    assert_eq!((report.merged, report.skipped), (5, 0));
    let again = target.apply(&good)?;
    assert_eq!((again.merged, again.skipped), (0, 5));
    assert!(target
        .partition_version(p)?
        .dominates(&source.partition_version(p)?));
    for entry in &good.entries {
        assert_eq!(
            target.get(&entry.key)?.map(|r| r.value),
            source.get(&entry.key)?.map(|r| r.value)
        );
    }
    for (key, record) in &before.records {
        assert_eq!(target.get(key)?.as_ref(), Some(record));
    }
    Ok(())
}

/// The shape of `VersionVector` on the wire, to build one a peer could send
/// that is not in normal form.
#[derive(serde::Serialize)]
struct RawVersionVector {
    base: BTreeMap<u64, u64>,
    extra: BTreeMap<u64, BTreeSet<u64>>,
}

#[test]
fn a_complete_vector_not_in_normal_form_is_normalized_and_the_store_reopens() -> TestResult {
    let raw = RawVersionVector {
        // Node 1: base 2, extras 0, 1 and 3 at or below base + 1, and 7 above.
        // Node 9: a zero base. Node 5: an empty extra set.
        base: [(1, 2), (9, 0)].into_iter().collect(),
        extra: [
            (1, [0, 1, 3, 7].into_iter().collect()),
            (5, BTreeSet::new()),
        ]
        .into_iter()
        .collect(),
    };
    let odd: VersionVector = postcard::from_bytes(&postcard::to_allocvec(&raw)?)?;
    let mut normal = VersionVector::new();
    normal.raise_base(NodeId(1), 3);
    normal.add(Dot::new(NodeId(1), 7));
    assert_ne!(odd, normal);
    let mut normalized = odd.clone();
    assert!(normalized.normalize());
    assert_eq!(normalized, normal);

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let p = 2;
    {
        let store = Store::open(
            &path,
            StoreOptions::default().node_id(NodeId(3)).partitions(4),
        )?;
        // A stream with an abnormal `since` is answered too.
        let chunks: Vec<ChangeChunk> = store.changes_since(p, &odd)?.collect::<Result<_, _>>()?;
        assert_eq!(chunks.len(), 1);
        let report = store.apply(&ChangeChunk {
            partition: p,
            entries: Vec::new(),
            complete: Some(odd.clone()),
            purged: None,
        })?;
        assert_eq!((report.merged, report.skipped), (0, 0));
        assert_eq!(store.partition_version(p)?, normal);
    }
    // The stored vector is in normal form, which opening checks.
    let store = Store::open(&path, StoreOptions::default())?;
    assert_eq!(store.partition_version(p)?, normal);
    Ok(())
}

// 9. Batches

#[test]
fn a_batch_whose_later_op_fails_commits_none_of_its_ops() -> TestResult {
    let store = memory_store(1, 16);
    store.put(b"existing", b"old", None)?;
    store.counter_add(b"ctr", 1)?;
    let before = snapshot(&store);

    let ops = |batch: &mut Batch| {
        batch
            .put("new/reg", "1")
            .put_lww("new/lww", "l")
            .counter_add("ctr", 10)
            .set_add("new/set", "m")
            .put("existing", "overwritten")
            .delete("existing", None)
            .put("existing", "again");
    };
    let mut wrong_type = Batch::new();
    ops(&mut wrong_type);
    wrong_type.counter_add("existing", 1);
    match store.write(&wrong_type) {
        Err(Error::WrongType {
            expected, found, ..
        }) => assert_eq!((expected, found), (ValueKind::Counter, ValueKind::Register)),
        other => panic!("expected WrongType, got {other:?}"),
    }

    let mut too_large = Batch::new();
    ops(&mut too_large);
    too_large.put("new/big", vec![0u8; MAX_VALUE_BYTES + 1]);
    assert!(matches!(
        store.write(&too_large),
        Err(Error::TooLarge { .. })
    ));

    let mut overflow = Batch::new();
    ops(&mut overflow);
    overflow.counter_add("ctr", i64::MAX);
    assert!(matches!(
        store.write(&overflow),
        Err(Error::CounterOverflow { .. })
    ));

    assert_eq!(
        snapshot(&store),
        before,
        "a failed batch left changes behind"
    );
    assert_eq!(store.get(b"new/reg")?, None);
    assert_eq!(store.counter(b"ctr")?, 1);
    assert!(store.set_members(b"new/set")?.is_empty());
    assert_eq!(
        store.get(b"existing")?.map(|r| r.value),
        Some(register(&[b"old"]))
    );

    // The failed batches used up no sequence numbers: the same ops without
    // the bad one commit, each taking the next dot of its key's partition,
    // and every partition's vector stays contiguous.
    let mut good = Batch::new();
    ops(&mut good);
    assert_eq!(store.write(&good)?.len(), good.len());
    let mut expected: Vec<u64> = before
        .versions
        .iter()
        .map(|v| v.max_seq(NodeId(1)))
        .collect();
    let keys = [
        "new/reg", "new/lww", "ctr", "new/set", "existing", "existing", "existing",
    ];
    assert_eq!(keys.len(), good.len());
    for key in keys {
        expected[usize::from(store.partition_of(key.as_bytes()))] += 1;
    }
    let after: Vec<u64> = (0..store.partitions())
        .map(|p| store.partition_version(p).map(|v| v.max_seq(NodeId(1))))
        .collect::<Result<_, _>>()?;
    assert_eq!(after, expected);
    assert_eq!(store.counter(b"ctr")?, 11);
    assert_eq!(
        store.get(b"existing")?.map(|r| r.value),
        Some(register(&[b"again"]))
    );
    for (p, vv) in snapshot(&store).versions.iter().enumerate() {
        assert_eq!(vv.extra_len(), 0, "partition {p}: {vv:?}");
    }
    Ok(())
}

// 10. Counters

#[test]
fn a_counter_add_that_would_overflow_is_refused_and_the_value_kept() -> TestResult {
    let store = memory_store(1, 16);
    assert_eq!(store.counter_add(b"up", i64::MAX)?, i64::MAX);
    match store.counter_add(b"up", 1) {
        Err(err @ Error::CounterOverflow { .. }) => {
            assert!(err.to_string().contains("\"up\""), "{err}");
        }
        other => panic!("expected CounterOverflow, got {other:?}"),
    }
    assert!(matches!(
        store.counter_add(b"up", i64::MAX),
        Err(Error::CounterOverflow { .. })
    ));
    assert_eq!(store.counter(b"up")?, i64::MAX);
    assert_eq!(store.counter_add(b"up", -1)?, i64::MAX - 1);

    assert_eq!(store.counter_add(b"down", i64::MIN)?, i64::MIN);
    assert_eq!(store.counter(b"down")?, i64::MIN);
    assert!(matches!(
        store.counter_add(b"down", -1),
        Err(Error::CounterOverflow { .. })
    ));
    assert!(matches!(
        store.counter_add(b"down", i64::MIN),
        Err(Error::CounterOverflow { .. })
    ));
    assert_eq!(store.counter(b"down")?, i64::MIN);
    assert_eq!(store.counter_add(b"down", 1)?, i64::MIN + 1);
    assert_eq!(
        store.get(b"down")?.map(|r| r.value),
        Some(Value::Counter(i64::MIN + 1))
    );
    Ok(())
}
