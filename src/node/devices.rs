//! The device ledger in memory: the HTTP routes record here each device's
//! pushes and pulls through this node; `save_every` writes the changed
//! rows to the store (`Store::save_devices`) every few seconds, and the
//! node saves the rest when it stops.
//!
//! Bounded: past `MAX_DEVICES` devices a new one is not recorded (its
//! syncs work as before); the ledger is a report, never consulted to
//! apply a write.

use crate::store::{DeviceRecord, Store};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tracing::warn;

/// Devices one node's ledger keeps (about 100 bytes each).
pub(super) const MAX_DEVICES: usize = 1_000_000;
/// How often changed rows are saved.
const SAVE_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Inner {
    records: HashMap<u64, DeviceRecord>,
    dirty: HashSet<u64>,
    full_warned: bool,
}

#[derive(Default)]
pub(super) struct DeviceLedger {
    inner: Mutex<Inner>,
}

impl DeviceLedger {
    pub(super) fn load(store: &Store) -> crate::error::Result<DeviceLedger> {
        let records = store.devices()?.into_iter().collect();
        Ok(DeviceLedger {
            inner: Mutex::new(Inner {
                records,
                ..Inner::default()
            }),
        })
    }

    fn touch(
        &self,
        id: u64,
        token: Option<String>,
        now_ms: u64,
        f: impl FnOnce(&mut DeviceRecord),
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if !inner.records.contains_key(&id) && inner.records.len() >= MAX_DEVICES {
            if !inner.full_warned {
                inner.full_warned = true;
                warn!("the device ledger holds {MAX_DEVICES} devices, its most: new devices sync but are not listed by kvctl devices");
            }
            return;
        }
        let record = inner.records.entry(id).or_insert_with(|| DeviceRecord {
            first_seen_ms: now_ms,
            ..DeviceRecord::default()
        });
        if token.is_some() {
            record.token = token;
        }
        f(record);
        inner.dirty.insert(id);
    }

    /// A push answered: `applied` writes applied, the highest at `max_seq`.
    pub(super) fn pushed(
        &self,
        id: u64,
        token: Option<String>,
        now_ms: u64,
        applied: u64,
        max_seq: u64,
    ) {
        self.touch(id, token, now_ms, |r| {
            r.last_push_ms = now_ms;
            r.pushed_writes += applied;
            r.max_seq = r.max_seq.max(max_seq);
        });
    }

    /// A pulled page sent: `entries` in it; `caught_up` when it said
    /// `more: false`; `reconcile` when it told the device to reconcile.
    pub(super) fn pulled(
        &self,
        id: u64,
        token: Option<String>,
        now_ms: u64,
        entries: usize,
        caught_up: bool,
        reconcile: bool,
    ) {
        self.touch(id, token, now_ms, |r| {
            r.last_pull_ms = now_ms;
            r.pulled_entries += entries as u64;
            if caught_up {
                r.caught_up_ms = now_ms;
            }
            r.reconciles += u64::from(reconcile);
        });
    }

    pub(super) fn snapshot(&self) -> Vec<(u64, DeviceRecord)> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rows: Vec<_> = inner
            .records
            .iter()
            .map(|(id, r)| (*id, r.clone()))
            .collect();
        rows.sort_unstable_by_key(|(id, _)| *id);
        rows
    }

    fn take_dirty(&self) -> Vec<(u64, DeviceRecord)> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let dirty = std::mem::take(&mut inner.dirty);
        dirty
            .into_iter()
            .filter_map(|id| inner.records.get(&id).map(|r| (id, r.clone())))
            .collect()
    }

    /// Saves the changed rows now; on failure they stay to be saved again.
    pub(super) fn save(&self, store: &Store) {
        let rows = self.take_dirty();
        if let Err(e) = store.save_devices(&rows) {
            warn!("could not save the device ledger: {e}");
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.dirty.extend(rows.into_iter().map(|(id, _)| id));
        }
    }
}

/// Saves the ledger's changed rows every `SAVE_EVERY`, off the event loop.
pub(super) async fn save_every(ledger: Arc<DeviceLedger>, store: Arc<Store>) {
    let mut tick = tokio::time::interval(SAVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (ledger, store) = (ledger.clone(), store.clone());
        let _ = tokio::task::spawn_blocking(move || ledger.save(&store)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_recorded_once_and_only_changed_rows_are_saved() {
        let ledger = DeviceLedger::default();
        ledger.pushed(1, Some("phone".into()), 100, 3, 7);
        ledger.pulled(1, None, 200, 10, true, false);
        ledger.pulled(2, None, 300, 0, false, true);
        let rows = ledger.snapshot();
        assert_eq!(rows.len(), 2);
        let one = &rows[0].1;
        assert_eq!(
            (one.first_seen_ms, one.last_push_ms, one.caught_up_ms),
            (100, 100, 200)
        );
        assert_eq!(
            (one.pushed_writes, one.max_seq, one.pulled_entries),
            (3, 7, 10)
        );
        assert_eq!(one.token.as_deref(), Some("phone"));
        assert_eq!((rows[1].1.caught_up_ms, rows[1].1.reconciles), (0, 1));
        assert_eq!(ledger.take_dirty().len(), 2);
        assert!(ledger.take_dirty().is_empty());
        ledger.pulled(2, None, 400, 1, true, false);
        assert_eq!(
            ledger.take_dirty().iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![2]
        );
    }
}
