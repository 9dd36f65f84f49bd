//! Held watches: which requests wait for which key (or for any key under a
//! prefix: a long-polled change feed), woken by the store's
//! observer (every committed write of this node, whatever brought it:
//! a client write, a replicated one, anti-entropy, migration). A held
//! watch costs a map entry, not a poll.
//!
//! Invariant: a watch is registered before the read it compares against,
//! so a write committed between that read and the wait still wakes it.
//!
//! This node's commits show every write of a key only if the node
//! coordinates the key's reads itself (its copy is in every read it
//! makes, and every write reaches it, through replication or
//! anti-entropy). One that does re-reads only when woken or when that
//! changes (a layout change, a migration, a hand-off). One that does not
//! subscribes, before each read, at the replica its reads go to
//! ([`WatchMessage::Subscribe`], on the same ordered peer stream as the
//! read, so the replica holds the subscription before it reads): that
//! replica's next commit of the key sends [`WatchMessage::Moved`] back,
//! which wakes the watch here as a local commit would. A subscription
//! fires once; the replica going down wakes the watches that relied on
//! it. A subscription frame lost on a full peer queue is covered by a
//! re-read every [`RECHECK`].

use crate::crdt::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// How often a wait re-reads what this node does not read locally, in
/// case a subscription was lost; also how long a subscription is trusted.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// Held watches between nodes (peer payload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchMessage {
    /// Tell me once when one of `keys` (with `prefix`: any key under one
    /// of them) next commits on your node.
    Subscribe { keys: Vec<Vec<u8>>, prefix: bool },
    /// These subscribed keys (or prefixes) committed here.
    Moved { keys: Vec<Vec<u8>>, prefix: bool },
}

/// The most keys one [`WatchMessage`] may name (a peer's frame is refused
/// beyond it).
pub const MAX_WATCH_KEYS: usize = 1024;

/// A subscription of another node that fired: (subscriber, key or prefix,
/// whether a prefix).
pub type RemoteMoved = (NodeId, Vec<u8>, bool);

/// What a held wait reads: one key's partition, or every partition (a
/// long-polled change feed).
#[derive(Clone, Copy, Debug)]
pub(super) enum Scope {
    Partition(u16),
    All,
}

/// Waits until `woken`, until `local` (which partitions this node reads
/// locally; see the module doc) changes, or until `deadline`, and unless
/// what it waits for is read `here`, at most [`RECHECK`]. The caller marks
/// `local` seen before the read it compares against.
pub(super) async fn hold(
    woken: &mut oneshot::Receiver<()>,
    local: &mut watch::Receiver<Arc<Vec<bool>>>,
    here: bool,
    deadline: Instant,
) {
    let wake = if here {
        deadline
    } else {
        deadline.min(Instant::now() + RECHECK)
    };
    let moved = async {
        if local.changed().await.is_err() {
            // The node is stopping: nothing changes any more.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = woken => {}
        () = moved => {}
        () = tokio::time::sleep_until(wake) => {}
    }
}

/// Watches held at once by one node; more are refused as overloaded.
pub const MAX_WATCHES: usize = 65_536;

/// A held watch's id and how to wake it.
type Waker = (u64, oneshot::Sender<()>);

#[derive(Default)]
pub(in crate::node) struct Watches {
    waiting: Mutex<HashMap<Vec<u8>, Vec<Waker>>>,
    /// Prefix watches: few (one per long-polled feed), so a list that each
    /// commit scans while any are held.
    prefixes: Mutex<Vec<(Vec<u8>, Waker)>>,
    /// Other nodes' subscriptions: key -> subscribers.
    remote: Mutex<HashMap<Vec<u8>, HashSet<NodeId>>>,
    /// Other nodes' prefix subscriptions.
    remote_prefixes: Mutex<HashSet<(Vec<u8>, NodeId)>>,
    /// Where fired subscriptions go (the core loop, which tells the nodes).
    forward: OnceLock<mpsc::UnboundedSender<RemoteMoved>>,
    /// Watches and subscriptions registered: lets the observer skip the
    /// locks when none are.
    held: AtomicUsize,
    next: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only whole entries are inserted and removed under the lock.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A registered watch: removed from the map when dropped.
pub(super) struct Watch {
    watches: Arc<Watches>,
    key: Vec<u8>,
    /// Watching every key that starts with `key`.
    prefix: bool,
    id: u64,
    pub(super) woken: oneshot::Receiver<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.prefix {
            let mut prefixes = lock(&self.watches.prefixes);
            let before = prefixes.len();
            prefixes.retain(|(_, (id, _))| *id != self.id);
            if prefixes.len() < before {
                self.watches.held.fetch_sub(1, Relaxed);
            }
            return;
        }
        let mut waiting = lock(&self.watches.waiting);
        if let Some(list) = waiting.get_mut(&self.key) {
            let before = list.len();
            list.retain(|(id, _)| *id != self.id);
            if list.len() < before {
                self.watches.held.fetch_sub(1, Relaxed);
            }
            if list.is_empty() {
                waiting.remove(&self.key);
            }
        }
    }
}

impl Watches {
    /// Wakes every watch of the keys and fires every subscription of them
    /// (called by the store after a commit, and for a peer's `Moved`).
    pub(in crate::node) fn changed(&self, keys: &[Vec<u8>]) {
        if self.held.load(Relaxed) == 0 {
            return;
        }
        {
            let mut waiting = lock(&self.waiting);
            for key in keys {
                if let Some(list) = waiting.remove(key) {
                    self.held.fetch_sub(list.len(), Relaxed);
                    for (_, waker) in list {
                        let _ = waker.send(());
                    }
                }
            }
        }
        {
            let mut prefixes = lock(&self.prefixes);
            if !prefixes.is_empty() {
                let (woken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *prefixes)
                    .into_iter()
                    .partition(|(prefix, _)| keys.iter().any(|k| k.starts_with(prefix)));
                *prefixes = kept;
                self.held.fetch_sub(woken.len(), Relaxed);
                for (_, (_, waker)) in woken {
                    let _ = waker.send(());
                }
            }
        }
        let mut fired = Vec::new();
        {
            let mut remote = lock(&self.remote);
            if !remote.is_empty() {
                for key in keys {
                    if let Some(nodes) = remote.remove(key) {
                        fired.extend(nodes.into_iter().map(|n| (n, key.clone(), false)));
                    }
                }
            }
        }
        {
            let mut prefixes = lock(&self.remote_prefixes);
            if !prefixes.is_empty() {
                prefixes.retain(|(prefix, node)| {
                    let hit = keys.iter().any(|k| k.starts_with(prefix));
                    if hit {
                        fired.push((*node, prefix.clone(), true));
                    }
                    !hit
                });
            }
        }
        if fired.is_empty() {
            return;
        }
        self.held.fetch_sub(fired.len(), Relaxed);
        if let Some(forward) = self.forward.get() {
            for moved in fired {
                let _ = forward.send(moved);
            }
        }
    }

    /// Sends fired subscriptions of other nodes to `forward`.
    pub(in crate::node) fn forward_to(&self, forward: mpsc::UnboundedSender<RemoteMoved>) {
        let _ = self.forward.set(forward);
    }

    /// Holds `node`'s subscription of `key` (or of every key under it);
    /// false when [`MAX_WATCHES`] are held. Subscribing twice holds one.
    pub(in crate::node) fn subscribe(&self, node: NodeId, key: &[u8], prefix: bool) -> bool {
        let added = if prefix {
            let mut prefixes = lock(&self.remote_prefixes);
            if self.held.load(Relaxed) >= MAX_WATCHES {
                return false;
            }
            prefixes.insert((key.to_vec(), node))
        } else {
            let mut remote = lock(&self.remote);
            if self.held.load(Relaxed) >= MAX_WATCHES {
                return false;
            }
            remote.entry(key.to_vec()).or_default().insert(node)
        };
        if added {
            self.held.fetch_add(1, Relaxed);
        }
        true
    }

    /// Drops the subscriptions of `node` (it went down: it would not hear).
    pub(in crate::node) fn forget(&self, node: NodeId) {
        let mut dropped = 0;
        lock(&self.remote).retain(|_, nodes| {
            dropped += usize::from(nodes.remove(&node));
            !nodes.is_empty()
        });
        lock(&self.remote_prefixes).retain(|(_, n)| {
            let hit = *n == node;
            dropped += usize::from(hit);
            !hit
        });
        self.held.fetch_sub(dropped, Relaxed);
    }

    /// Registers a watch of every key under `prefix`; `None` when
    /// [`MAX_WATCHES`] are held.
    pub(super) fn watch_prefix(self: &Arc<Self>, prefix: &[u8]) -> Option<Watch> {
        let mut prefixes = lock(&self.prefixes);
        if self.held.load(Relaxed) >= MAX_WATCHES {
            return None;
        }
        let id = self.next.fetch_add(1, Relaxed) as u64;
        let (waker, woken) = oneshot::channel();
        prefixes.push((prefix.to_vec(), (id, waker)));
        self.held.fetch_add(1, Relaxed);
        Some(Watch {
            watches: self.clone(),
            key: prefix.to_vec(),
            prefix: true,
            id,
            woken,
        })
    }

    /// Registers a watch of `key`; `None` when [`MAX_WATCHES`] are held.
    pub(super) fn watch(self: &Arc<Self>, key: &[u8]) -> Option<Watch> {
        let mut waiting = lock(&self.waiting);
        if self.held.load(Relaxed) >= MAX_WATCHES {
            return None;
        }
        let id = self.next.fetch_add(1, Relaxed) as u64;
        let (waker, woken) = oneshot::channel();
        waiting.entry(key.to_vec()).or_default().push((id, waker));
        self.held.fetch_add(1, Relaxed);
        Some(Watch {
            watches: self.clone(),
            key: key.to_vec(),
            prefix: false,
            id,
            woken,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_wakes_the_watches_of_its_key_only_and_dropped_ones_leave_no_trace() {
        let watches = Arc::new(Watches::default());
        let mut a = watches.watch(b"a").unwrap();
        let mut b = watches.watch(b"b").unwrap();
        let dropped = watches.watch(b"a").unwrap();
        drop(dropped);
        assert_eq!(watches.held.load(Relaxed), 2);
        watches.changed(&[b"a".to_vec(), b"c".to_vec()]);
        assert!(a.woken.try_recv().is_ok());
        assert!(b.woken.try_recv().is_err());
        drop(a);
        drop(b);
        assert_eq!(watches.held.load(Relaxed), 0);
        assert!(lock(&watches.waiting).is_empty());
    }

    #[test]
    fn a_subscription_fires_once_to_its_node_and_a_down_node_leaves_none() {
        let watches = Arc::new(Watches::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        watches.forward_to(tx);
        let (a, b) = (NodeId(1), NodeId(2));
        assert!(watches.subscribe(a, b"k", false));
        assert!(watches.subscribe(a, b"k", false), "twice holds one");
        assert!(watches.subscribe(b, b"user/", true));
        assert!(watches.subscribe(b, b"other", false));
        assert_eq!(watches.held.load(Relaxed), 3);
        watches.changed(&[b"k".to_vec(), b"user/42".to_vec()]);
        let mut fired = vec![rx.try_recv().unwrap(), rx.try_recv().unwrap()];
        fired.sort();
        assert_eq!(
            fired,
            [(a, b"k".to_vec(), false), (b, b"user/".to_vec(), true)]
        );
        assert!(rx.try_recv().is_err());
        watches.changed(&[b"k".to_vec()]);
        assert!(rx.try_recv().is_err(), "a subscription fires once");
        watches.forget(b);
        assert_eq!(watches.held.load(Relaxed), 0);
        watches.changed(&[b"other".to_vec()]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_prefix_watch_wakes_on_any_key_under_it_only() {
        let watches = Arc::new(Watches::default());
        let mut user = watches.watch_prefix(b"user/").unwrap();
        let mut other = watches.watch_prefix(b"other/").unwrap();
        watches.changed(&[b"users".to_vec()]);
        assert!(user.woken.try_recv().is_err());
        watches.changed(&[b"a".to_vec(), b"user/42/x".to_vec()]);
        assert!(user.woken.try_recv().is_ok());
        assert!(other.woken.try_recv().is_err());
        assert_eq!(watches.held.load(Relaxed), 1);
        drop(user);
        drop(other);
        assert_eq!(watches.held.load(Relaxed), 0);
        assert!(lock(&watches.prefixes).is_empty());
    }
}
