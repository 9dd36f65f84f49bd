//! The device ledger: what this node saw of each device that synced
//! through it (docs/device-sync.md, "kvctl devices").
//!
//! Node-local and never replicated: it grows with the devices, which the
//! cluster's vectors, digests and cursors must not, so it lives in its own
//! table. A device talks to any node; `kvctl devices` merges every node's
//! rows. The ledger is a report, not data: losing its last seconds in a
//! crash loses no write.

use super::tables::DEVICES;
use super::Store;
use crate::error::{Error, Result};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

/// One device as this node saw it. Times are Unix milliseconds, 0 for
/// never.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub first_seen_ms: u64,
    pub last_push_ms: u64,
    pub last_pull_ms: u64,
    /// The last pull answered with `more: false`: the device's cursor was
    /// current then, so its age is the time since.
    pub caught_up_ms: u64,
    /// Writes answered applied (a retried write counts again).
    pub pushed_writes: u64,
    /// The highest sequence answered applied.
    pub max_seq: u64,
    /// Entries sent in pulled pages.
    pub pulled_entries: u64,
    /// Pulls told to reconcile: the device missed a tombstone purge.
    pub reconciles: u64,
    /// The API token it last used, by name (none with a certificate).
    pub token: Option<String>,
}

impl DeviceRecord {
    /// Folds another node's record of the same device into this one.
    pub fn merge(&mut self, other: &DeviceRecord) {
        let first = [self.first_seen_ms, other.first_seen_ms]
            .into_iter()
            .filter(|&t| t > 0)
            .min()
            .unwrap_or(0);
        if other.last_push_ms.max(other.last_pull_ms) > self.last_push_ms.max(self.last_pull_ms)
            && other.token.is_some()
        {
            self.token.clone_from(&other.token);
        }
        self.first_seen_ms = first;
        self.last_push_ms = self.last_push_ms.max(other.last_push_ms);
        self.last_pull_ms = self.last_pull_ms.max(other.last_pull_ms);
        self.caught_up_ms = self.caught_up_ms.max(other.caught_up_ms);
        self.pushed_writes += other.pushed_writes;
        self.max_seq = self.max_seq.max(other.max_seq);
        self.pulled_entries += other.pulled_entries;
        self.reconciles += other.reconciles;
    }
}

impl Store {
    /// Every device of the ledger, by id.
    pub fn devices(&self) -> Result<Vec<(u64, DeviceRecord)>> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(DEVICES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in table.iter()? {
            let (id, bytes) = row?;
            let record = postcard::from_bytes(bytes.value()).map_err(|e| Error::Corrupt {
                what: format!("device ledger row {:016x}", id.value()),
                reason: e.to_string(),
            })?;
            out.push((id.value(), record));
        }
        Ok(out)
    }

    /// Writes these devices' rows (whole), durably.
    pub fn save_devices(&self, records: &[(u64, DeviceRecord)]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut table = txn.open_table(DEVICES)?;
            for (id, record) in records {
                let bytes = postcard::to_allocvec(record).map_err(|e| Error::Corrupt {
                    what: format!("device ledger row {id:016x}"),
                    reason: e.to_string(),
                })?;
                table.insert(*id, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::NodeId;
    use crate::store::StoreOptions;

    #[test]
    fn the_ledger_survives_a_reopen_and_rows_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let options = StoreOptions::default().node_id(NodeId(1)).partitions(8);
        let store = Store::open(&path, options.clone()).unwrap();
        assert!(store.devices().unwrap().is_empty());
        let mut a = DeviceRecord {
            first_seen_ms: 5,
            pushed_writes: 3,
            ..Default::default()
        };
        store.save_devices(&[(7, a.clone())]).unwrap();
        a.pushed_writes = 4;
        store.save_devices(&[(7, a.clone())]).unwrap();
        drop(store);
        let store = Store::open(&path, options).unwrap();
        assert_eq!(store.devices().unwrap(), vec![(7, a)]);
    }

    #[test]
    fn merging_two_nodes_rows_adds_counts_and_keeps_the_latest_times() {
        let mut a = DeviceRecord {
            first_seen_ms: 10,
            last_push_ms: 20,
            pushed_writes: 2,
            max_seq: 9,
            token: Some("old".into()),
            ..Default::default()
        };
        let b = DeviceRecord {
            first_seen_ms: 5,
            last_pull_ms: 30,
            caught_up_ms: 30,
            pushed_writes: 1,
            max_seq: 4,
            pulled_entries: 7,
            token: Some("new".into()),
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!(
            (
                a.first_seen_ms,
                a.last_push_ms,
                a.last_pull_ms,
                a.caught_up_ms
            ),
            (5, 20, 30, 30)
        );
        assert_eq!((a.pushed_writes, a.max_seq, a.pulled_entries), (3, 9, 7));
        assert_eq!(a.token.as_deref(), Some("new"));
        // A node that never saw it (first_seen 0) does not make it older.
        a.merge(&DeviceRecord::default());
        assert_eq!(a.first_seen_ms, 5);
    }
}
