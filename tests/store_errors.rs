use gossipkv::crdt::NodeId;
use gossipkv::store::{Store, StoreOptions};
use redb::{MultimapTableDefinition, ReadableDatabase, TableDefinition, TableHandle};

fn probe(p: &std::path::Path) -> String {
    let r = std::panic::catch_unwind(|| match Store::open(p, StoreOptions::default()) {
        Ok(s) => {
            let g = s.get(b"key/00001");
            let n = s
                .scan_prefix(b"")
                .map(|it| it.map(|r| r.is_ok()).collect::<Vec<_>>());
            let pv = s.partition_version(0);
            let w = s.put(b"new", b"x", None);
            format!(
                "OK get={:?} scan={:?} pv={:?} write={:?}",
                g.map(|o| o.is_some()),
                n.map(|v| (v.len(), v.iter().filter(|x| **x).count())),
                pv.map(|v| v.max_seq(NodeId(1))),
                w.map(|_| ())
            )
        }
        Err(e) => format!("ERR {e:?}"),
    });
    format!("{r:?}")
}

#[test]
fn explore_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let p1 = dir.path().join("mm.redb");
    {
        let db = redb::Database::create(&p1).unwrap();
        let t = db.begin_write().unwrap();
        t.open_multimap_table(MultimapTableDefinition::<&str, u64>::new("things"))
            .unwrap()
            .insert("a", 1)
            .unwrap();
        t.commit().unwrap();
    }
    eprintln!("multimap only: {}", probe(&p1));
    {
        let db = redb::Database::open(&p1).unwrap();
        let t = db.begin_read().unwrap();
        eprintln!(
            "tables after: {:?}",
            t.list_tables()
                .unwrap()
                .map(|h| h.name().to_string())
                .collect::<Vec<_>>()
        );
    }
    let p2 = dir.path().join("meta.redb");
    {
        let db = redb::Database::create(&p2).unwrap();
        let t = db.begin_write().unwrap();
        t.open_table(TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
            .insert("a", 1)
            .unwrap();
        t.commit().unwrap();
    }
    eprintln!("meta of other type: {}", probe(&p2));
    let p3 = dir.path().join("empty.redb");
    {
        redb::Database::create(&p3).unwrap();
    }
    eprintln!("empty redb: {}", probe(&p3));
    let p4 = dir.path().join("emptymeta.redb");
    {
        let db = redb::Database::create(&p4).unwrap();
        let t = db.begin_write().unwrap();
        t.open_table(TableDefinition::<&str, &[u8]>::new("meta"))
            .unwrap();
        t.commit().unwrap();
    }
    eprintln!("empty meta table: {}", probe(&p4));
    // real store with garbage after first 4096 bytes
    let p5 = dir.path().join("s.redb");
    {
        let s = Store::open(
            &p5,
            StoreOptions::default().node_id(NodeId(1)).partitions(16),
        )
        .unwrap();
        let mut b = gossipkv::Batch::new();
        for i in 0..2000u32 {
            b.put(format!("key/{i:05}"), vec![7u8; 32]);
        }
        s.write(&b).unwrap();
    }
    let full = std::fs::read(&p5).unwrap();
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for keep in [64usize, 512, 4096, 8192] {
        let mut bytes = full.clone();
        for b in bytes[keep..].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let p = dir.path().join(format!("g{keep}.redb"));
        std::fs::write(&p, &bytes).unwrap();
        eprintln!("header {keep} + garbage: {}", probe(&p));
    }
}
