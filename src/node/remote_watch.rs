//! The node's side of held watches across nodes (see `http::watch`): a
//! watch held on a node that does not read its key locally subscribes at
//! the replica its reads go to, and that replica's next commit of the key
//! comes back as `Moved`, which wakes the watch as a local commit would.
//!
//! Invariants:
//! - a subscription is sent before the read it guards, on the same
//!   ordered peer stream (the `Requests` lane), so the replica holds it
//!   before it reads;
//! - one subscription per (key, node) is outstanding at a time, trusted
//!   for [`RECHECK`]; the watches waiting on it are all woken by its
//!   `Moved`, and re-subscribe;
//! - a replica going down, or coming back (perhaps as a new process that
//!   lost them), wakes the watches that relied on it.

use super::http::watch::{RemoteMoved, WatchMessage, MAX_WATCH_KEYS, RECHECK};
use super::{Core, Payload};
use crate::crdt::NodeId;
use crate::replication::coordinator::{live_replicas, reads_locally};
use crate::store::MAX_KEY_BYTES;
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Subscriptions remembered before the stale ones are forgotten.
const MAX_REMEMBERED: usize = 4096;

impl Core {
    /// The nodes a held watch of `key` (or, `prefix`, of keys under it)
    /// reads from and must hear from: the replica that coordinates the
    /// key's reads, or for a prefix, that of every partition this node
    /// does not read itself.
    fn watch_targets(&self, key: &[u8], prefix: bool) -> BTreeSet<NodeId> {
        let first = |p: u16| {
            live_replicas(&self.replica, p)
                .first()
                .copied()
                .filter(|&n| n != self.id)
        };
        if prefix {
            (0..self.replica.store().partitions())
                .filter(|&p| !reads_locally(&self.replica, p))
                .filter_map(first)
                .collect()
        } else {
            first(self.replica.store().partition_of(key))
                .into_iter()
                .collect()
        }
    }

    /// Subscribes where a held watch of `key` needs to hear from, unless a
    /// subscription made there lately is still outstanding.
    pub(super) fn subscribe(&mut self, key: Vec<u8>, prefix: bool) {
        let now = Instant::now();
        if self.subscriptions.len() > MAX_REMEMBERED {
            self.subscriptions
                .retain(|_, made| now.duration_since(*made) < RECHECK);
        }
        for node in self.watch_targets(&key, prefix) {
            let made = self.subscriptions.get(&(key.clone(), prefix, node));
            if made.is_some_and(|made| now.duration_since(*made) < RECHECK) {
                continue;
            }
            let message = WatchMessage::Subscribe {
                keys: vec![key.clone()],
                prefix,
            };
            if self.send_to_node(node, Payload::Watch(message)) {
                self.subscriptions.insert((key.clone(), prefix, node), now);
            }
        }
    }

    pub(super) fn on_watch_message(&mut self, from: NodeId, message: WatchMessage) {
        let (WatchMessage::Subscribe { keys, .. } | WatchMessage::Moved { keys, .. }) = &message;
        if keys.len() > MAX_WATCH_KEYS || keys.iter().any(|k| k.len() > MAX_KEY_BYTES) {
            warn!(peer = %from, "refused a watch message: more than {MAX_WATCH_KEYS} keys or a key over {MAX_KEY_BYTES} bytes");
            return;
        }
        match message {
            WatchMessage::Subscribe { keys, prefix } => {
                for key in keys {
                    if !self.watches.subscribe(from, &key, prefix) {
                        // Its watch re-reads on its own timer.
                        debug!(peer = %from, "a watch subscription was not taken: this node holds its most watches");
                        return;
                    }
                }
            }
            WatchMessage::Moved { keys, prefix } => {
                for key in &keys {
                    self.subscriptions.remove(&(key.clone(), prefix, from));
                }
                self.watches.changed(&keys);
            }
        }
    }

    /// Tells the subscribers of keys that just committed here; `first`
    /// and whatever else is queued go out as one message per node.
    pub(super) fn on_moved(
        &mut self,
        first: RemoteMoved,
        queued: &mut mpsc::UnboundedReceiver<RemoteMoved>,
    ) {
        let mut by_node: BTreeMap<(NodeId, bool), Vec<Vec<u8>>> = BTreeMap::new();
        let mut next = Some(first);
        while let Some((node, key, prefix)) = next {
            let keys = by_node.entry((node, prefix)).or_default();
            keys.push(key);
            if keys.len() >= MAX_WATCH_KEYS {
                let keys = std::mem::take(keys);
                self.send_to_node(node, Payload::Watch(WatchMessage::Moved { keys, prefix }));
            }
            next = queued.try_recv().ok();
        }
        for ((node, prefix), keys) in by_node {
            if !keys.is_empty() {
                self.send_to_node(node, Payload::Watch(WatchMessage::Moved { keys, prefix }));
            }
        }
    }

    /// `peer` is down: the watches here that waited on its subscriptions
    /// read again (and subscribe elsewhere); its own are dropped.
    pub(super) fn peer_down_for_watches(&mut self, peer: NodeId) {
        self.peer_back_for_watches(peer);
        self.watches.forget(peer);
    }

    /// `peer` is up (again): it may be a new process that lost the
    /// subscriptions made at the old one, so the watches here that waited
    /// on them read again and subscribe anew.
    pub(super) fn peer_back_for_watches(&mut self, peer: NodeId) {
        let mut keys = Vec::new();
        self.subscriptions.retain(|(key, _, node), _| {
            let lost = *node == peer;
            if lost {
                keys.push(key.clone());
            }
            !lost
        });
        if !keys.is_empty() {
            self.watches.changed(&keys);
        }
    }
}
