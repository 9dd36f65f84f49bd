//! The store's write-ahead log (`StoreOptions::write_ahead_log`): grouped
//! commits are durable through the log between checkpoints, so a crash
//! image (the files as a kill -9 leaves them: everything written, nothing
//! of redb's unflushed pages) reopens with every acknowledged write.

use gossipkv::crdt::NodeId;
use gossipkv::store::wal::HEADER_BYTES;
use gossipkv::store::{wal_path, GroupOutcome, GroupWrite, Op, Store, StoreOptions};
use gossipkv::{Error, Record, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const NODE: NodeId = NodeId(7);

fn options(interval: Duration) -> StoreOptions {
    StoreOptions::default()
        .node_id(NODE)
        .partitions(16)
        .write_ahead_log(true)
        .checkpoint_interval(interval)
}

fn put(i: usize) -> GroupWrite {
    GroupWrite::Local(Op::Put {
        key: format!("key-{i}").into_bytes(),
        value: format!("value-{i}").into_bytes(),
        context: None,
    })
}

/// Commits `n` puts from `from` on, in groups of 10, as the storage
/// thread does; every one must succeed.
fn write(store: &Store, from: usize, n: usize) {
    for group in (from..from + n).collect::<Vec<_>>().chunks(10) {
        let writes: Vec<GroupWrite> = group.iter().map(|&i| put(i)).collect();
        let outcomes = store.commit_group_exposed(&writes, |_| {}).unwrap();
        for outcome in outcomes {
            assert!(
                matches!(outcome, Ok(GroupOutcome::Local { .. })),
                "{outcome:?}"
            );
        }
    }
}

/// The store's file and its log copied as they are now, under `to`: what
/// a process killed at this moment leaves on disk.
fn crash_image(path: &Path, to: &Path) -> PathBuf {
    let copy = to.join("copy.redb");
    std::fs::copy(path, &copy).unwrap();
    std::fs::copy(wal_path(path), wal_path(&copy)).unwrap();
    copy
}

fn value(store: &Store, i: usize) -> Option<Vec<u8>> {
    match store.get(format!("key-{i}").as_bytes()).unwrap() {
        Some(Record {
            value: Value::Register(mut values),
            ..
        }) if values.len() == 1 => values.pop(),
        other => panic!("key-{i}: {other:?}"),
    }
}

fn holds_all(store: &Store, n: usize) {
    for i in 0..n {
        assert_eq!(
            value(store, i),
            Some(format!("value-{i}").into_bytes()),
            "key-{i}"
        );
    }
}

#[test]
fn a_crash_between_checkpoints_loses_no_committed_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    // No checkpoint after the one at open: every group is in the log only.
    let store = Store::open(&path, options(Duration::from_secs(3600))).unwrap();
    write(&store, 0, 200);
    let crashed = tempfile::tempdir().unwrap();
    let image = crash_image(&path, crashed.path());

    // The file alone lacks them (the groups were not flushed): the test
    // exercises the log, not redb's own durability.
    {
        let bare = crashed.path().join("bare.redb");
        std::fs::copy(&image, &bare).unwrap();
        let without_log = Store::open(&bare, StoreOptions::default().node_id(NODE)).unwrap();
        let missing = (0..200)
            .filter(|&i| {
                without_log
                    .get(format!("key-{i}").as_bytes())
                    .unwrap()
                    .is_none()
            })
            .count();
        assert!(
            missing > 100,
            "only {missing} of 200 writes were left to the log"
        );
    }

    let reopened = Store::open(&image, options(Duration::from_secs(3600))).unwrap();
    holds_all(&reopened, 200);
    // The replay made them durable in the file and emptied the log.
    assert_eq!(
        std::fs::metadata(wal_path(&image)).unwrap().len() as usize,
        HEADER_BYTES
    );
    // The partition vectors came back with the entries: new writes go on
    // (after a crash, under a new writer epoch) and nothing is refused.
    write(&reopened, 200, 20);
    holds_all(&reopened, 220);
    // One dot per write, all contiguous per writer.
    let dots: u64 = reopened
        .partition_versions()
        .unwrap()
        .iter()
        .map(|vv| {
            vv.nodes()
                .map(|n| {
                    assert_eq!(vv.extra(n).count(), 0, "a gap in {n}'s dots");
                    vv.base(n)
                })
                .sum::<u64>()
        })
        .sum();
    assert_eq!(dots, 220, "every write's dot is in its partition vector");
}

#[test]
fn checkpoints_move_the_log_into_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    // Interval 0: every group after a logged one flushes.
    let store = Store::open(&path, options(Duration::ZERO)).unwrap();
    write(&store, 0, 100);
    // The last group of ten was a checkpoint: the log is back to its header.
    assert_eq!(
        std::fs::metadata(wal_path(&path)).unwrap().len() as usize,
        HEADER_BYTES
    );
    let crashed = tempfile::tempdir().unwrap();
    let image = crash_image(&path, crashed.path());
    std::fs::remove_file(wal_path(&image)).unwrap();
    let reopened = Store::open(&image, StoreOptions::default().node_id(NODE)).unwrap();
    holds_all(&reopened, 100);
}

#[test]
fn an_explicit_checkpoint_empties_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Store::open(&path, options(Duration::from_secs(3600))).unwrap();
    assert!(!store.checkpoint().unwrap(), "nothing logged yet");
    write(&store, 0, 30);
    assert!(store.checkpoint().unwrap());
    assert_eq!(
        std::fs::metadata(wal_path(&path)).unwrap().len() as usize,
        HEADER_BYTES
    );
    let crashed = tempfile::tempdir().unwrap();
    let image = crash_image(&path, crashed.path());
    std::fs::remove_file(wal_path(&image)).unwrap();
    holds_all(
        &Store::open(&image, StoreOptions::default().node_id(NODE)).unwrap(),
        30,
    );
}

#[test]
fn a_clean_close_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Store::open(&path, options(Duration::from_secs(3600))).unwrap();
    write(&store, 0, 50);
    assert!(std::fs::metadata(wal_path(&path)).unwrap().len() as usize > HEADER_BYTES);
    store.close().unwrap();
    assert_eq!(
        std::fs::metadata(wal_path(&path)).unwrap().len() as usize,
        HEADER_BYTES
    );
    let writer = store.writer_id();
    drop(store);
    let reopened = Store::open(&path, options(Duration::from_secs(3600))).unwrap();
    holds_all(&reopened, 50);
    assert_eq!(
        reopened.writer_id(),
        writer,
        "a clean close keeps the writer"
    );
}

#[test]
fn a_torn_last_record_is_dropped_and_damage_before_it_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Store::open(&path, options(Duration::from_secs(3600))).unwrap();
    write(&store, 0, 30);
    let crashed = tempfile::tempdir().unwrap();
    let image = crash_image(&path, crashed.path());
    let log = std::fs::read(wal_path(&image)).unwrap();

    // A record whose write stopped halfway: the groups before it stay.
    let torn = crashed.path().join("torn.redb");
    std::fs::copy(&image, &torn).unwrap();
    let mut bytes = log.clone();
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3]);
    std::fs::write(wal_path(&torn), &bytes).unwrap();
    let reopened = Store::open(&torn, options(Duration::from_secs(3600))).unwrap();
    holds_all(&reopened, 30);
    drop(reopened);

    // A flipped byte in the first record, with more after it.
    let damaged = crashed.path().join("damaged.redb");
    std::fs::copy(&image, &damaged).unwrap();
    let mut bytes = log.clone();
    bytes[HEADER_BYTES + 12 + 3] ^= 0x40;
    std::fs::write(wal_path(&damaged), &bytes).unwrap();
    let err = Store::open(&damaged, options(Duration::from_secs(3600))).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("damaged.redb-wal") && text.contains("offset 24"),
        "{text}"
    );
}

#[test]
fn a_store_opened_without_the_option_still_replays_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Store::open(&path, options(Duration::from_secs(3600))).unwrap();
    write(&store, 0, 40);
    let crashed = tempfile::tempdir().unwrap();
    let image = crash_image(&path, crashed.path());
    let plain = Store::open(&image, StoreOptions::default().node_id(NODE)).unwrap();
    holds_all(&plain, 40);
    assert!(!wal_path(&image).exists(), "the replayed log is removed");
    drop(plain);
    // And the writes are in the file itself now.
    holds_all(
        &Store::open(&image, StoreOptions::default().node_id(NODE)).unwrap(),
        40,
    );
}

#[test]
fn a_log_needs_a_store_opened_from_a_path() {
    let err = Store::open_in_memory(StoreOptions::default().write_ahead_log(true)).unwrap_err();
    assert!(err.to_string().contains("write_ahead_log"), "{err}");
}
