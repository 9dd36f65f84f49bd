//! The storage thread: every write of the node (client writes coordinated
//! here, entries replicated from other coordinators, read repairs, and the
//! replica's anti-entropy and migration chunks, purges and drops) is
//! committed by one thread, in groups: each commit takes everything queued
//! when the previous one finished, in one transaction made durable by one
//! synced append to the store's write-ahead log, or every 10 s by a
//! flush of the store's pages (`Store::commit_group_exposed`, `store/wal.rs`). The event loop never waits for a disk
//! flush; it keeps serving reads, gossip and acknowledgements while a group
//! is flushed and the next one fills.
//!
//! Invariants: a job's completion is sent only after the commit holding it
//! is durable (or failed), so whoever answers a client or acknowledges a
//! replica from it never acknowledges a write a crash could lose. Client
//! writes are also reported once applied, before the flush
//! ([`Stored::Applied`]), so their entries reach the other replicas while
//! this disk flushes; the store then takes a new writer id after a crash
//! or a failed commit (`Store::commit_group_exposed`), so a dot that left
//! is never issued again. Jobs are
//! committed in the order they were queued; a job is never dropped, only
//! failed with a reason. How many client writes may wait is the
//! coordinator's to bound (`CoordinatorConfig::max_queued_client_writes`).

use crate::replication::coordinator::{StoreApplied, StoreDone, StoreJob};
use crate::store::{GroupWrite, Store};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use tokio::sync::mpsc;

/// At most this many writes, or bytes, per transaction: bounds the memory
/// and the latency of one commit, which is also how long a write queued
/// behind it waits. At 1,024 small writes a commit takes about 50-100 ms
/// on this 2-core test machine.
const MAX_GROUP_WRITES: usize = 1024;
const MAX_GROUP_BYTES: usize = 16 << 20;
/// After this long with nothing queued, the thread checkpoints the store's
/// write-ahead log (`Store::checkpoint`).
const IDLE_CHECKPOINT: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Default)]
struct Queue {
    jobs: VecDeque<StoreJob>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// What the storage thread reports, in this order for each commit.
#[derive(Debug)]
pub(super) enum Stored {
    /// Client writes applied, their commit flushing.
    Applied(Vec<StoreApplied>),
    /// Every job of the commit: durable, or failed.
    Durable(Vec<StoreDone>),
}

/// Figures for metrics.
#[derive(Default)]
pub(super) struct StorageStats {
    pub commits: AtomicU64,
    pub writes: AtomicU64,
    pub failed_commits: AtomicU64,
    pub queued: AtomicU64,
}

/// The handle the event loop queues jobs through. Dropping it lets the
/// thread finish what is queued and stop.
pub(super) struct Storage {
    shared: Arc<Shared>,
    pub stats: Arc<StorageStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // The thread only moves whole jobs in and out under the lock.
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Storage {
    /// Starts the thread; completions arrive on `done`, one batch per
    /// commit.
    pub(super) fn start(
        store: Arc<Store>,
        done: mpsc::UnboundedSender<Stored>,
    ) -> std::io::Result<Storage> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
        });
        let stats = Arc::new(StorageStats::default());
        let thread = {
            let shared = shared.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("gossipkv-storage".into())
                .spawn(move || run(&store, &shared, &stats, &done))?
        };
        Ok(Storage {
            shared,
            stats,
            thread: Some(thread),
        })
    }

    /// Queues a job (committed in the order queued).
    pub(super) fn submit(&self, job: StoreJob) {
        let mut queue = lock(&self.shared.queue);
        self.stats
            .queued
            .fetch_add(job.writes.len() as u64, Relaxed);
        queue.jobs.push_back(job);
        drop(queue);
        self.shared.ready.notify_one();
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(store: &Store, shared: &Shared, stats: &StorageStats, done: &mpsc::UnboundedSender<Stored>) {
    loop {
        // (token, writes, client, replica) of each job taken, and the
        // writes, in order.
        let mut jobs: Vec<(u64, usize, bool, bool)> = Vec::new();
        let mut writes: Vec<GroupWrite> = Vec::new();
        {
            let mut queue = lock(&shared.queue);
            while queue.jobs.is_empty() && !queue.closed {
                let (next, waited) = shared
                    .ready
                    .wait_timeout(queue, IDLE_CHECKPOINT)
                    .unwrap_or_else(PoisonError::into_inner);
                queue = next;
                if waited.timed_out() && queue.jobs.is_empty() {
                    // Nobody waits on a commit: flush what the log holds.
                    drop(queue);
                    if let Err(e) = store.checkpoint() {
                        tracing::error!("an idle checkpoint of the store failed: {e}");
                    }
                    queue = lock(&shared.queue);
                }
            }
            if queue.jobs.is_empty() {
                return;
            }
            let mut bytes = 0;
            while let Some(job) = queue.jobs.front() {
                let size: usize = job.writes.iter().map(GroupWrite::payload_bytes).sum();
                if !jobs.is_empty()
                    && (writes.len() + job.writes.len() > MAX_GROUP_WRITES
                        || bytes + size > MAX_GROUP_BYTES)
                {
                    break;
                }
                bytes += size;
                let Some(job) = queue.jobs.pop_front() else {
                    break;
                };
                jobs.push((job.token, job.writes.len(), job.client, job.replica));
                writes.extend(job.writes);
            }
        }
        let result = store.commit_group_exposed(&writes, |outcomes| {
            let jobs = jobs
                .iter()
                .map(|&(token, len, client, _)| (token, len, client));
            let applied = StoreApplied::of_group(jobs, outcomes);
            if !applied.is_empty() {
                let _ = done.send(Stored::Applied(applied));
            }
        });
        stats.commits.fetch_add(1, Relaxed);
        stats.writes.fetch_add(writes.len() as u64, Relaxed);
        stats.queued.fetch_sub(writes.len() as u64, Relaxed);
        let completions = match result {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                jobs.into_iter()
                    .map(|(token, len, _, replica)| StoreDone {
                        token,
                        replica,
                        outcome: Ok(outcomes.by_ref().take(len).collect()),
                    })
                    .collect()
            }
            Err(e) => {
                stats.failed_commits.fetch_add(1, Relaxed);
                tracing::error!("a storage commit of {} writes failed: {e}", writes.len());
                let reason = format!("the node could not commit the write: {e}");
                jobs.into_iter()
                    .map(|(token, _, _, replica)| StoreDone {
                        token,
                        replica,
                        outcome: Err(reason.clone()),
                    })
                    .collect()
            }
        };
        if done.send(Stored::Durable(completions)).is_err() {
            return;
        }
    }
}
