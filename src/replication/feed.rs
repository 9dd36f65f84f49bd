//! The cluster-wide change feed, the part the coordinator delegates: which
//! replica reads which partition, what each reads, and how the pages of
//! several replicas become one answer.
//!
//! A page asks each partition's source (this node where it holds a complete
//! copy, else a live complete replica) for the entries past the reader's
//! frontier, one message per node. The page's `limit` is split evenly
//! between those nodes (at least one entry each), and so are its bytes; a
//! node reads its partitions in order until its share is used up. The
//! answer's frontier is the reader's, advanced for every partition read
//! (see `store::feed` for what a partition's frontier claims); partitions
//! a node did not reach keep theirs, and `more` says the reader should ask
//! again at once. A replica behind the reader's frontier for a partition
//! does not read it (see `store::feed`): the coordinator reads such a
//! partition from another live complete replica where it is one itself,
//! and a replica asked anyway answers `behind`; the partition then waits
//! for a later page.

use crate::client::ChangesPage;
use crate::crdt::{NodeId, VersionVector};
use crate::error::Result;
use crate::store::{ChunkLimits, FeedPage, Store};
use std::collections::{BTreeMap, BTreeSet};

/// The most entries one page of the change feed may ask for.
pub const MAX_CHANGES_LIMIT: u32 = 1000;

/// Entry bytes one page carries at most, split between the nodes read (an
/// entry larger than a node's share still goes out, alone).
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// Reads `partitions` (each with the reader's frontier) in order until
/// `max_entries` or `max_bytes` are used up: the partitions read, each with
/// its page. Partitions after the one that filled the share are not read.
/// `max_entries` 0: every partition, no entries, frontiers covering what
/// the store holds (a reader starting from now).
pub fn serve(
    store: &Store,
    partitions: &[(u16, VersionVector)],
    prefix: &[u8],
    max_entries: usize,
    max_bytes: usize,
) -> Result<Vec<(u16, FeedPage)>> {
    let mut entries_left = max_entries.max(1);
    let mut bytes_left = max_bytes.max(1);
    let mut pages = Vec::new();
    if max_entries == 0 {
        for (partition, since) in partitions {
            let limits = ChunkLimits {
                max_entries: 0,
                max_bytes,
            };
            pages.push((
                *partition,
                store.feed_page(*partition, prefix, since, limits)?,
            ));
        }
        return Ok(pages);
    }
    for (partition, since) in partitions {
        if entries_left == 0 || bytes_left == 0 {
            break;
        }
        let limits = ChunkLimits {
            max_entries: entries_left,
            max_bytes: bytes_left,
        };
        let page = store.feed_page(*partition, prefix, since, limits)?;
        if page.behind {
            pages.push((*partition, page));
            continue;
        }
        entries_left = entries_left.saturating_sub(page.entries.len());
        let bytes: usize = page
            .entries
            .iter()
            .map(|e| e.key.len() + e.entry.len())
            .sum();
        bytes_left = bytes_left.saturating_sub(bytes);
        let complete = page.complete;
        pages.push((*partition, page));
        if !complete {
            break;
        }
    }
    Ok(pages)
}

/// A page being gathered from the nodes it asked.
pub struct Gathering {
    partitions: u16,
    since: BTreeMap<u16, VersionVector>,
    pages: BTreeMap<u16, FeedPage>,
    pub waiting: BTreeSet<NodeId>,
}

impl Gathering {
    pub fn new(partitions: u16, since: BTreeMap<u16, VersionVector>) -> Gathering {
        Gathering {
            partitions,
            since,
            pages: BTreeMap::new(),
            waiting: BTreeSet::new(),
        }
    }

    /// The reader's frontier of a partition (empty: nothing seen).
    pub fn since(&self, partition: u16) -> VersionVector {
        self.since.get(&partition).cloned().unwrap_or_default()
    }

    /// Takes a node's pages; only partitions that were asked of it count.
    pub fn add(&mut self, asked: &BTreeSet<u16>, pages: Vec<(u16, FeedPage)>) {
        for (partition, mut page) in pages {
            if !asked.contains(&partition) || self.pages.contains_key(&partition) {
                continue;
            }
            // A frontier never goes back, whatever the node sent.
            page.frontier.join(&self.since(partition));
            page.frontier.normalize();
            self.pages.insert(partition, page);
        }
    }

    /// The answer: every page's entries in partition order, the frontier
    /// with every page applied, whether any partition is unfinished, and
    /// whether the reader must reconcile now (it has caught up and a purge
    /// it missed was found on this page or an earlier one: `pending`).
    pub fn page(mut self, pending: bool) -> ChangesPage {
        let mut entries = Vec::new();
        let mut complete = 0u16;
        let mut reconcile = false;
        for (partition, page) in std::mem::take(&mut self.pages) {
            reconcile |= page.reconcile;
            entries.extend(page.entries);
            complete += u16::from(page.complete);
            self.since.insert(partition, page.frontier);
        }
        let frontier = self
            .since
            .into_iter()
            .filter(|(_, vv)| !vv.is_empty())
            .collect();
        let more = complete < self.partitions;
        let found = reconcile || pending;
        ChangesPage {
            entries,
            frontier,
            more,
            reconcile: found && !more,
            reconcile_pending: found && more,
        }
    }
}
