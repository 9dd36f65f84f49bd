//! The change feed's read: the entries of one partition under a key prefix
//! that a reader's frontier does not cover, and the frontier after them.
//!
//! A frontier is a version vector per partition, relative to one prefix: a
//! reader whose frontier covers every dot of an entry under the prefix has
//! seen that entry's state (or a newer one). It names writes, not positions
//! in one node's log, so it stays valid on any replica, across restarts and
//! layout changes: a page read from a replica that lacks some writes claims
//! only the dots that replica holds, and the next page, wherever it is
//! read, sends what is still missing.
//!
//! A page walks the change index origin by origin, from the frontier's base
//! of each, like `changes_since`, and stops at a bound. What it claims:
//! - every dot of every entry it sends (so a later page does not send the
//!   same state again through another of its dots);
//! - for each origin walked to the end, every dot the source holds of it;
//! - for the origin where the bound stopped it, the source's dots below the
//!   row it stopped at; later origins keep the reader's old frontier.
//!
//! A page is read only from a replica whose version vector covers the
//! reader's frontier; a replica behind it answers `behind` and nothing
//! else. That is what makes the feed right for a reader that *replaces*
//! its copy of a key with each state it is sent (a JSON client), not only
//! for one that merges: a replica that covers the frontier holds, for each
//! key, a state that includes every state of it the reader was sent, so
//! the reader's latest copy is always the join of what it saw. (Without
//! the rule, a reader sent a delete by one replica and a concurrent write
//! by another that had not seen the delete would keep the write's state,
//! and the two replicas' merged state, whose dots the frontier already
//! covers, would never be sent.)
//!
//! Purged tombstones: a purge removes a tombstone once every replica has
//! it, and a walk then claims its dots without sending anything. A reader
//! whose frontier did not cover them may hold the key and never hear of
//! the delete. So a page whose source has purged tombstones the frontier
//! does not cover (`purged_versions` not dominated) says `reconcile`; the
//! feed carries that until the reader has caught up, when it must list the
//! prefix's live keys and drop those it holds that are not listed (see
//! `replication::feed`). A reader starting from nothing holds nothing to
//! drop and is not told.
//!
//! Index: `prefix_changes` holds (hash of prefix, partition, origin, seq) ->
//! key, a
//! row for each row of `changes` and each of the key's first
//! [`MAX_FEED_DEPTH`] prefixes that end in `/`. A feed for a prefix walks
//! the rows of its longest such prefix (the partition's `changes` rows when
//! it has none) and skips keys outside the exact prefix: its reads are
//! proportional to the changes under that indexed prefix the frontier does
//! not cover, plus one seek per origin, never to the store; rows not yet
//! folded from the change log are read beside them (`index.rs`).

use super::changes::{ChunkLimits, RemoteEntry};
use super::index::{first_uncovered_is, IndexView};
use super::tables::*;
use super::{decode_entry, read_version, Store};
use crate::crdt::{Dot, VersionVector};
use crate::error::{show_key, Error, Result};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

/// How many `/`-terminated prefixes of a key the feed index holds rows for:
/// `a/b/c/d/e` is indexed under `a/`, `a/b/`, `a/b/c/` and `a/b/c/d/`.
pub const MAX_FEED_DEPTH: usize = 4;

/// The prefixes of `key` the feed index holds rows for, shortest first.
pub(crate) fn feed_prefixes(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    key.iter()
        .enumerate()
        .filter(|(_, &b)| b == b'/')
        .take(MAX_FEED_DEPTH)
        .map(move |(i, _)| &key[..=i])
}

/// The hash a prefix's rows are filed under in `prefix_changes`.
pub(crate) fn prefix_hash(prefix: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(prefix)
}

/// The indexed prefix a feed for `prefix` walks: its longest indexed
/// ancestor (itself when it ends in `/` within the depth); `None`: the
/// whole partition's index.
pub fn feed_index_prefix(prefix: &[u8]) -> Option<&[u8]> {
    feed_prefixes(prefix).last()
}

/// One partition's part of a feed page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedPage {
    /// Entries under the prefix, each once, in index order.
    pub entries: Vec<RemoteEntry>,
    /// The reader's frontier after these entries (see the module docs).
    pub frontier: VersionVector,
    /// The walk reached the end: `frontier` covers every write the source
    /// held in the partition when the page was read.
    pub complete: bool,
    /// The source's vector does not cover the reader's frontier: it is
    /// behind what the reader has seen and sent nothing (ask another
    /// replica, or this one once it caught up).
    pub behind: bool,
    /// The source purged tombstones the reader's frontier did not cover:
    /// the reader may hold keys deleted since (see the module docs).
    pub reconcile: bool,
}

impl Store {
    /// One partition's part of a change feed page: the entries under
    /// `prefix` with a dot `since` does not cover, up to `limits`, and the
    /// frontier after them. See the module docs. `max_entries` 0: none,
    /// and a frontier covering everything the store holds (a reader
    /// starting from now).
    pub fn feed_page(
        &self,
        partition: u16,
        prefix: &[u8],
        since: &VersionVector,
        limits: ChunkLimits,
    ) -> Result<FeedPage> {
        self.check_partition(partition)?;
        let mut since = since.clone();
        since.normalize();
        let txn = self.db.begin_read()?;
        let source = read_version(&txn.open_table(VERSIONS)?, partition)?;
        if !source.dominates(&since) {
            return Ok(FeedPage {
                frontier: since,
                behind: true,
                ..FeedPage::default()
            });
        }
        if limits.max_entries == 0 {
            // From now: what is there counts as seen, nothing is sent.
            since.join(&source);
            return Ok(FeedPage {
                frontier: since,
                complete: true,
                ..FeedPage::default()
            });
        }
        let purged = read_version(&txn.open_table(PURGED)?, partition)?;
        let reconcile = !since.is_empty() && !since.dominates(&purged);
        if since.dominates(&source) {
            // Every entry's dots are in `source`: nothing to send, and no
            // index to read.
            return Ok(FeedPage {
                frontier: since,
                complete: true,
                reconcile,
                ..FeedPage::default()
            });
        }
        let stored = txn.open_table(ENTRIES)?;
        let index = IndexView::open(&txn, self, partition, feed_index_prefix(prefix))?;
        let max_entries = limits.max_entries;
        let max_bytes = limits.max_bytes.max(1);
        let mut page = FeedPage {
            frontier: since.clone(),
            reconcile,
            ..FeedPage::default()
        };
        let mut bytes = 0usize;
        let mut next_origin = index.first_origin_from(0)?;
        while let Some(origin) = next_origin {
            let mut stopped_at = None;
            let from = since.base(origin).saturating_add(1);
            index.walk(origin, from, |seq, key| {
                if page.entries.len() >= max_entries || bytes >= max_bytes {
                    stopped_at = Some(seq);
                    return Ok(false);
                }
                if since.covers(Dot::new(origin, seq)) || !key.starts_with(prefix) {
                    return Ok(true);
                }
                let encoded = stored.get(key)?.ok_or_else(|| Error::Corrupt {
                    what: "change index".into(),
                    reason: format!(
                        "row ({partition}, {origin}, {seq}) names missing key {}",
                        show_key(key)
                    ),
                })?;
                let encoded = encoded.value();
                let entry = decode_entry(key, encoded)?;
                if first_uncovered_is(&entry, &since, origin) {
                    for dot in entry.index_dots() {
                        page.frontier.add(dot);
                    }
                    bytes += key.len() + encoded.len();
                    page.entries.push(RemoteEntry {
                        key: key.to_vec(),
                        entry: encoded.to_vec(),
                    });
                }
                Ok(true)
            })?;
            if let Some(seq) = stopped_at {
                page.frontier.join_node_upto(&source, origin, seq - 1);
                return Ok(page);
            }
            page.frontier.join_node_upto(&source, origin, u64::MAX);
            next_origin = match origin.0.checked_add(1) {
                Some(next) => index.first_origin_from(next)?,
                None => None,
            };
        }
        // Origins without rows here hold nothing under the prefix.
        page.frontier.join(&source);
        page.complete = true;
        Ok(page)
    }
}

/// Fills `prefix_changes` from `changes`: stores written before the feed
/// index existed get it on their first open by this version.
pub(super) fn build_index(txn: &redb::WriteTransaction) -> Result<u64> {
    let changes = txn.open_table(CHANGES)?;
    let mut prefixed = txn.open_table(PREFIX_CHANGES)?;
    let mut rows = 0;
    for row in changes.iter()? {
        let (position, key) = row?;
        let (partition, node, seq) = position.value();
        let key = key.value();
        for p in feed_prefixes(key) {
            prefixed.insert((prefix_hash(p), partition, node, seq), key)?;
            rows += 1;
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::NodeId;
    use crate::store::StoreOptions;

    #[test]
    fn a_key_is_indexed_under_its_first_slash_prefixes() {
        let all: Vec<&[u8]> = feed_prefixes(b"a/b/c/d/e/f").collect();
        assert_eq!(all, vec![&b"a/"[..], b"a/b/", b"a/b/c/", b"a/b/c/d/"]);
        assert_eq!(feed_prefixes(b"plain").count(), 0);
        assert_eq!(feed_index_prefix(b"user/42/no"), Some(&b"user/42/"[..]));
        assert_eq!(feed_index_prefix(b"user"), None);
    }

    /// A one-partition store of node `node`.
    fn store_of(node: u64) -> Store {
        Store::open_in_memory(StoreOptions::default().partitions(1).node_id(NodeId(node))).unwrap()
    }

    fn store() -> Store {
        store_of(1)
    }

    /// Follows the feed to its end in pages of `max` entries; every state
    /// seen, in order.
    fn follow(
        store: &Store,
        prefix: &[u8],
        since: &mut VersionVector,
        max: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut seen = Vec::new();
        loop {
            let limits = ChunkLimits {
                max_entries: max,
                max_bytes: 1 << 20,
            };
            let page = store.feed_page(0, prefix, since, limits).unwrap();
            assert!(page.frontier.dominates(since), "a frontier only grows");
            seen.extend(page.entries.into_iter().map(|e| (e.key, e.entry)));
            *since = page.frontier;
            if page.complete {
                return seen;
            }
        }
    }

    #[test]
    fn a_reader_sees_each_state_once_and_only_under_its_prefix() {
        let a = store();
        for i in 0..30u32 {
            a.put(format!("user/1/{i}").as_bytes(), b"v1", None)
                .unwrap();
            a.put(format!("user/2/{i}").as_bytes(), b"v1", None)
                .unwrap();
            a.put(format!("other{i}").as_bytes(), b"v1", None).unwrap();
        }
        for prefix in [&b"user/1/"[..], b"user/1", b"user/", b""] {
            let mut since = VersionVector::new();
            let seen = follow(&a, prefix, &mut since, 7);
            let keys: std::collections::BTreeSet<_> = seen.iter().map(|(k, _)| k.clone()).collect();
            assert_eq!(keys.len(), seen.len(), "{prefix:?}: a state was sent twice");
            assert!(keys.iter().all(|k| k.starts_with(prefix)));
            let expected = match prefix {
                b"user/1/" | b"user/1" => 30,
                b"user/" => 60,
                _ => 90,
            };
            assert_eq!(keys.len(), expected, "{prefix:?}");
            // Caught up: nothing more, until a write under the prefix.
            assert!(follow(&a, prefix, &mut since, 7).is_empty());
            a.put(b"user/1/0", b"v2", None).unwrap();
            let again = follow(&a, prefix, &mut since, 7);
            assert_eq!(again.len(), 1, "{prefix:?}");
            assert_eq!(again[0].0, b"user/1/0");
        }
    }

    #[test]
    fn a_state_reached_through_two_origins_goes_out_once_across_pages() {
        // Keys written on node 1, then overwritten on node 2 with the
        // context read: each entry then has rows under both origins.
        let one = store();
        let two = store_of(2);
        for i in 0..20u32 {
            one.put(format!("k/{i}").as_bytes(), b"from one", None)
                .unwrap();
        }
        crate::sync::sync(&one, &two).unwrap();
        for i in 0..20u32 {
            let key = format!("k/{i}");
            let context = two.causal_context(key.as_bytes()).unwrap();
            two.put(key.as_bytes(), b"from two", context.as_ref())
                .unwrap();
        }
        for max in [1, 3, 19, 100] {
            let mut since = VersionVector::new();
            let seen = follow(&two, b"k/", &mut since, max);
            assert_eq!(seen.len(), 20, "max {max}: each key once");
            assert_eq!(since, two.partition_version(0).unwrap());
        }
    }

    #[test]
    fn a_page_from_a_replica_missing_writes_claims_only_what_it_holds() {
        let one = store();
        let two = store_of(2);
        one.put(b"k/early", b"1", None).unwrap();
        crate::sync::sync(&one, &two).unwrap();
        one.put(b"k/late", b"2", None).unwrap();
        // Read everything two has, then ask one with the same frontier.
        let mut since = VersionVector::new();
        let from_two = follow(&two, b"k/", &mut since, 10);
        assert_eq!(from_two.len(), 1);
        let from_one = follow(&one, b"k/", &mut since, 10);
        assert_eq!(from_one.len(), 1);
        assert_eq!(from_one[0].0, b"k/late");
    }

    #[test]
    fn a_replica_behind_the_frontier_sends_nothing_and_a_caught_up_one_sends_the_merge() {
        // A delete on one replica, a concurrent write on another.
        let one = store();
        let two = store_of(2);
        one.put(b"k/x", b"first", None).unwrap();
        crate::sync::sync(&one, &two).unwrap();
        one.delete(b"k/x", None).unwrap();
        two.put(b"k/x", b"concurrent", None).unwrap();
        let mut since = VersionVector::new();
        follow(&one, b"k/", &mut since, 10);
        let page = two
            .feed_page(0, b"k/", &since, ChunkLimits::default())
            .unwrap();
        assert!(page.behind && page.entries.is_empty() && !page.complete);
        assert_eq!(page.frontier, since);
        // Once two has the delete, it sends the merged state.
        crate::sync::sync(&one, &two).unwrap();
        let merged = follow(&two, b"k/", &mut since, 10);
        assert_eq!(merged.len(), 1);
        let (record, _) = crate::store::decode_change(&merged[0].0, &merged[0].1).unwrap();
        let values = match record.map(|r| r.value) {
            Some(crate::crdt::Value::Register(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(values, vec![b"concurrent".to_vec()]);
    }

    #[test]
    fn a_reader_behind_a_purge_is_told_to_reconcile_once_on_any_replica() {
        let one = store();
        one.put(b"k/gone", b"v", None).unwrap();
        one.put(b"k/kept", b"v", None).unwrap();
        let mut since = VersionVector::new();
        assert_eq!(follow(&one, b"k/", &mut since, 10).len(), 2);
        one.delete(b"k/gone", None).unwrap();
        // Every replica has the delete (here: the only one): purged.
        let stable = one.partition_version(0).unwrap();
        assert_eq!(one.purge(0, &stable).unwrap(), 1);
        let page = one
            .feed_page(0, b"k/", &since, ChunkLimits::default())
            .unwrap();
        assert!(page.reconcile && page.entries.is_empty());
        let after = page.frontier;
        let again = one
            .feed_page(0, b"k/", &after, ChunkLimits::default())
            .unwrap();
        assert!(!again.reconcile, "said once");
        let fresh = one
            .feed_page(0, b"k/", &VersionVector::new(), ChunkLimits::default())
            .unwrap();
        assert!(
            !fresh.reconcile,
            "a reader with nothing has nothing to drop"
        );
        // A replica that synced from it after the purge says so too.
        let two = store_of(2);
        crate::sync::pull(&one, &two).unwrap();
        let there = two
            .feed_page(0, b"k/", &since, ChunkLimits::default())
            .unwrap();
        assert!(there.reconcile);
    }

    #[test]
    fn a_page_from_now_sends_nothing_and_covers_everything() {
        let one = store();
        one.put(b"k/a", b"1", None).unwrap();
        let limits = ChunkLimits {
            max_entries: 0,
            max_bytes: 1 << 20,
        };
        let page = one
            .feed_page(0, b"k/", &VersionVector::new(), limits)
            .unwrap();
        assert!(page.complete && page.entries.is_empty());
        assert_eq!(page.frontier, one.partition_version(0).unwrap());
        one.put(b"k/b", b"2", None).unwrap();
        let mut since = page.frontier;
        let later = follow(&one, b"k/", &mut since, 10);
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].0, b"k/b");
    }

    #[test]
    fn an_old_store_gets_the_feed_index_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let options = StoreOptions::default().partitions(1).change_log_rows(0);
            let s = Store::open(&path, options).unwrap();
            s.put(b"a/b/c", b"v", None).unwrap();
            s.put(b"a/x", b"v", None).unwrap();
        }
        {
            // Make it look like a store from before the index.
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(PREFIX_CHANGES).unwrap();
            txn.open_table(META)
                .unwrap()
                .remove(META_FEED_INDEX)
                .unwrap();
            txn.commit().unwrap();
        }
        let s = Store::open(&path, StoreOptions::default()).unwrap();
        let mut since = VersionVector::new();
        assert_eq!(follow(&s, b"a/", &mut since, 10).len(), 2);
        let mut since = VersionVector::new();
        assert_eq!(follow(&s, b"a/b/", &mut since, 10).len(), 1);
    }
}
