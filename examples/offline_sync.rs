//! Two devices write offline, then sync: concurrent edits survive as
//! siblings, counters add up, set additions and removals merge, and only
//! what each side lacks moves.
//!
//! Run: `cargo run --example offline_sync [DIR]` (default: a temporary directory).

use gossipkv::sync::sync;
use gossipkv::{NodeId, Store, StoreOptions, Value};
use std::error::Error;

fn show(store: &Store, name: &str, key: &[u8]) -> Result<(), Box<dyn Error>> {
    let shown = match store.get(key)?.map(|r| r.value) {
        None => "(none)".to_string(),
        Some(Value::Register(siblings)) => {
            let texts: Vec<_> = siblings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            if texts.len() == 1 {
                format!("{:?}", texts[0])
            } else {
                format!("{} siblings: {texts:?}", texts.len())
            }
        }
        Some(Value::Lww(v)) => format!("{:?}", String::from_utf8_lossy(&v)),
        Some(Value::Counter(n)) => n.to_string(),
        Some(Value::Set(members)) => {
            let texts: Vec<_> = members
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            format!("{texts:?}")
        }
    };
    println!("  {name:<7} {:<14} {shown}", String::from_utf8_lossy(key));
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let temp;
    let dir = match std::env::args().nth(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let phone = Store::open(
        dir.join("phone.redb"),
        StoreOptions::default().node_id(NodeId(1)),
    )?;
    let laptop = Store::open(
        dir.join("laptop.redb"),
        StoreOptions::default().node_id(NodeId(2)),
    )?;
    println!("stores in {}", dir.display());

    // Both start from a shared note.
    phone.put(b"note:groceries", b"milk", None)?;
    sync(&phone, &laptop)?;

    // Offline: both edit the same note, count steps, and edit a shared set.
    let seen = laptop.get(b"note:groceries")?.map(|r| r.context);
    phone.put(b"note:groceries", b"milk, eggs", None)?;
    laptop.put(b"note:groceries", b"milk, bread", seen.as_ref())?;
    phone.counter_add(b"steps", 4_000)?;
    laptop.counter_add(b"steps", 2_500)?;
    phone.set_add(b"tags", b"home")?;
    laptop.set_add(b"tags", b"work")?;
    laptop.put_lww(b"profile:name", b"Ada")?;

    println!("before sync:");
    for (name, store) in [("phone", &phone), ("laptop", &laptop)] {
        for key in [&b"note:groceries"[..], b"steps", b"tags"] {
            show(store, name, key)?;
        }
    }

    let report = sync(&phone, &laptop)?;
    println!(
        "synced: {} partitions, {} entries, {} bytes moved",
        report.partitions, report.entries, report.bytes
    );

    println!("after sync:");
    for (name, store) in [("phone", &phone), ("laptop", &laptop)] {
        for key in [&b"note:groceries"[..], b"steps", b"tags", b"profile:name"] {
            show(store, name, key)?;
        }
    }

    // Resolve the siblings: a write with the read context supersedes both.
    let record = phone.get(b"note:groceries")?.ok_or("note missing")?;
    phone.put(
        b"note:groceries",
        b"milk, eggs, bread",
        Some(&record.context),
    )?;
    let report = sync(&phone, &laptop)?;
    println!(
        "resolved on the phone and synced ({} entry moved):",
        report.entries
    );
    show(&laptop, "laptop", b"note:groceries")?;

    let again = sync(&phone, &laptop)?;
    println!("a second sync moves {} entries", again.entries);
    assert_eq!(phone.counter(b"steps")?, 6_500);
    assert_eq!(again.entries, 0);
    Ok(())
}
