//! Request coordination: which replica takes a client call, quorums, reads
//! merged across replicas with read repair, and the write path through the
//! storage thread.
//!
//! A write is made once, by a replica of the key (so it gets one dot), and
//! committed through the storage thread with the other writes queued at the
//! time (group commit). Only once that commit is durable is the entry sent
//! to the co-replicas, batched per replica (one frame, one transaction on
//! the receiver, one acknowledgement naming the writes it covers), and the
//! call answered after `w` replicas hold it. Sending before the local commit
//! is durable would let a crash lose a dot that another replica already
//! holds, and the restarted node would issue it again for another write
//! (see `Store::make_durable`).
//!
//! A read merges the entries of `r` replicas with this node's in memory and
//! answers from the result; the other replicas' entries are merged in here
//! through the storage thread, and replicas that were behind get the merged
//! entry (read repair). A node that holds no replica of the key forwards
//! the call to one; a forwarded call is never forwarded again. Writes that
//! cannot reach their quorum in time fail with `QuorumNotMet`, saying how
//! many replicas hold them; those copies stay and spread.

use super::storage::{Done, Job, Overloaded};
use super::{Core, Payload, ReplicateItem, ReplyTo, QUORUM_TIMEOUT};
use crate::client::{Call, ErrorCode, Failure, Request, Response, WireRecord};
use crate::crdt::{CausalContext, NodeId};
use crate::store::{GroupOutcome, GroupWrite, MergedView, Op};
use std::sync::atomic::Ordering::Relaxed;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Frames of replicated entries are cut at about this many bytes.
const REPLICATE_FRAME_BYTES: usize = 4 << 20;

/// A call waiting for other replicas.
pub(super) enum Pending {
    /// Forwarded to a replica, which coordinates it.
    Forwarded { reply: ReplyTo },
    /// Written here; waiting for `needed` more acknowledgements.
    Write {
        reply: ReplyTo,
        response: Response,
        needed: usize,
        acks: usize,
        w: u8,
    },
    /// Showing a key on each replica; waiting for `waiting` to answer.
    Inspect {
        reply: ReplyTo,
        key: Vec<u8>,
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
        waiting: Vec<NodeId>,
    },
    /// Read here; waiting for `needed` more replicas' entries.
    Read {
        reply: ReplyTo,
        call: Call,
        partition: u16,
        needed: usize,
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
    },
}

/// A job queued on the storage thread, by its token.
pub(super) enum Writing {
    /// A client write coordinated here; `reply` is `None` once the caller
    /// was told the write is taking too long (it is still replicated).
    Call {
        reply: Option<ReplyTo>,
        /// When the call arrived: its whole wait is bounded from here.
        arrived: Instant,
        counter: bool,
        others: Vec<NodeId>,
        quorum: usize,
        w: u8,
        partition: u16,
        key: Vec<u8>,
    },
    /// Entries a coordinator sent: acknowledge those that asked.
    Replicas {
        from: NodeId,
        items: Vec<(u64, bool)>,
    },
    /// Other replicas' entries merged in after a read; nothing waits.
    Repair,
}

fn fail(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(Failure::new(code, message))
}

fn store_failure(e: crate::Error) -> Response {
    fail(ErrorCode::of(&e), e.to_string())
}

/// The store operation a write request makes.
fn op_of(request: Request) -> Result<Op, Failure> {
    let context = |bytes: Option<Vec<u8>>| {
        bytes
            .map(|b| CausalContext::from_bytes(&b))
            .transpose()
            .map_err(|e| {
                Failure::new(
                    ErrorCode::BadToken,
                    format!("bad causal context token: {e}"),
                )
            })
    };
    Ok(match request {
        Request::Put {
            key,
            value,
            context: c,
        } => Op::Put {
            key,
            value,
            context: context(c)?,
        },
        Request::PutLww { key, value } => Op::PutLww { key, value },
        Request::Delete { key, context: c } => Op::Delete {
            key,
            context: context(c)?,
        },
        Request::CounterAdd { key, amount } => Op::CounterAdd { key, amount },
        Request::SetAdd { key, member } => Op::SetAdd { key, member },
        Request::SetRemove { key, member } => Op::SetRemove { key, member },
        other => {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("{other:?} is not a write"),
            ))
        }
    })
}

fn record(r: crate::crdt::Record) -> WireRecord {
    WireRecord {
        value: r.value,
        context: r.context.to_bytes(),
        other_kinds: r.other_kinds,
    }
}

impl Core {
    pub(super) fn fresh_call_id(&mut self) -> u64 {
        self.next_call += 1;
        self.next_call
    }

    pub(super) fn wait(&mut self, id: u64, pending: Pending) {
        self.pending.insert(id, pending);
        self.deadlines.insert((Instant::now() + QUORUM_TIMEOUT, id));
    }

    pub(super) fn answer(&mut self, reply: ReplyTo, response: Response) {
        if matches!(response, Response::Error(_)) {
            self.metrics.client_errors.fetch_add(1, Relaxed);
        }
        match reply {
            ReplyTo::Client(sender) => {
                let _ = sender.send(response);
            }
            ReplyTo::Peer { node, id } => {
                self.send_to_node(node, Payload::Coordinated { id, response });
            }
        }
    }

    /// Replicas of `partition` that are up, this node first if it is one
    /// that can write the partition (it holds all of its own earlier writes
    /// there; see `Store::writable`), else last.
    pub(super) fn live_replicas(&self, partition: u16) -> Vec<NodeId> {
        let alive = self.replica.membership().alive();
        let mut nodes: Vec<NodeId> = self
            .replica
            .layout()
            .holders(partition)
            .into_iter()
            .filter(|n| *n == self.id || alive.contains(n))
            .collect();
        // A gained replica still migrating may lack this node's own earlier
        // writes (a node name reused with a fresh store): its next dot could
        // repeat one. It coordinates only once its copy is complete.
        let writable = self.replica.store().writable(partition)
            && self
                .replica
                .layout()
                .is_complete_replica(self.id, partition);
        nodes.sort_by_key(|&n| if n == self.id { !writable } else { writable });
        nodes
    }

    pub(super) fn on_call(&mut self, call: Call, reply: ReplyTo) {
        if call.request.is_admin() {
            return self.admin(call.request, reply);
        }
        let Some(key) = call.request.key().map(<[u8]>::to_vec) else {
            let response = self.serve(call.request);
            return self.answer(reply, response);
        };
        if self.replica.layout().current().version() == 0 {
            let response = fail(
                ErrorCode::Unavailable,
                "the cluster has no layout yet: it is forming (the node that starts it waits for --expect-nodes nodes) or this node has not heard from it; retry shortly",
            );
            return self.answer(reply, response);
        }
        let partition = self.replica.store().partition_of(&key);
        let replicas = self.live_replicas(partition);
        let is_write = call.request.is_write();
        let quorum = usize::from(if is_write { call.w } else { call.r }).max(1);
        let total = self
            .replica
            .layout()
            .current()
            .replicas(partition)
            .len()
            .max(1);
        if quorum > total {
            let what = if is_write { "w" } else { "r" };
            let response = fail(
                ErrorCode::BadRequest,
                format!("{what}={quorum} exceeds the {total} replicas of this key"),
            );
            return self.answer(reply, response);
        }
        if replicas.first() != Some(&self.id) {
            // This node is not the replica to coordinate here: it holds no
            // replica of the key, or holds one it cannot write yet (it
            // dropped the partition and has not synced its own writes
            // back). A client's call goes to the first live replica; a
            // forwarded call is never forwarded again (no loops between two
            // views of the layout) and never written by a non-replica, which
            // would mint dots outside the key's replica set.
            let is_replica = replicas.contains(&self.id);
            let version = self.replica.layout().current().version();
            match replicas.first().copied() {
                Some(target) if !matches!(reply, ReplyTo::Peer { .. }) => {
                    let id = self.fresh_call_id();
                    if self.send_to_node(target, Payload::Coordinate { id, call }) {
                        self.wait(id, Pending::Forwarded { reply });
                        return;
                    }
                    let response = fail(
                        ErrorCode::Unavailable,
                        "no replica of this key is reachable",
                    );
                    return self.answer(reply, response);
                }
                // A replica that cannot write answers with the store's
                // reason (`OwnWritesMissing`: sync the partition back
                // first); reads it can serve from what it holds.
                _ if is_replica
                    && is_write
                    && !self
                        .replica
                        .layout()
                        .is_complete_replica(self.id, partition) =>
                {
                    let response = fail(
                        ErrorCode::Unavailable,
                        format!("this node is still receiving partition {partition} (layout v{version}) and no replica holding it completely is reachable; retry shortly"),
                    );
                    return self.answer(reply, response);
                }
                _ if is_replica && quorum == 1 => {}
                _ if is_replica => {
                    let response = fail(
                        ErrorCode::QuorumNotMet {
                            reached: 0,
                            needed: quorum as u8,
                        },
                        format!("no other replica of this key is reachable to meet a quorum of {quorum}"),
                    );
                    return self.answer(reply, response);
                }
                _ => {
                    let response = fail(
                        ErrorCode::Unavailable,
                        format!("no replica of this key is reachable (this node holds no replica of its partition {partition} in layout v{version})"),
                    );
                    return self.answer(reply, response);
                }
            }
        }
        let others: Vec<NodeId> = replicas[1..].to_vec();
        if is_write {
            self.start_write(call, reply, key, partition, others, quorum);
        } else {
            self.start_read(call, reply, key, partition, others, quorum);
        }
    }

    fn start_write(
        &mut self,
        call: Call,
        reply: ReplyTo,
        key: Vec<u8>,
        partition: u16,
        others: Vec<NodeId>,
        quorum: usize,
    ) {
        self.metrics.client_requests.fetch_add(1, Relaxed);
        let counter = matches!(call.request, Request::CounterAdd { .. });
        let op = match op_of(call.request) {
            Ok(op) => op,
            Err(failure) => return self.answer(reply, Response::Error(failure)),
        };
        let token = self.fresh_call_id();
        let job = Job {
            token,
            writes: vec![GroupWrite::Local(op)],
        };
        match self.storage.submit_client(job) {
            Ok(()) => {
                // A write waits for the disk a bounded time (see
                // `expire_pending`).
                self.deadlines
                    .insert((Instant::now() + QUORUM_TIMEOUT, token));
                self.writing.insert(
                    token,
                    Writing::Call {
                        reply: Some(reply),
                        arrived: Instant::now(),
                        counter,
                        others,
                        quorum,
                        w: call.w,
                        partition,
                        key,
                    },
                );
            }
            Err(Overloaded { queued }) => {
                let response = fail(
                    ErrorCode::Overloaded,
                    format!(
                        "this node has {queued} writes waiting for the disk; retry after a pause"
                    ),
                );
                self.answer(reply, response);
            }
        }
    }

    fn start_read(
        &mut self,
        call: Call,
        reply: ReplyTo,
        key: Vec<u8>,
        partition: u16,
        others: Vec<NodeId>,
        quorum: usize,
    ) {
        let needed = quorum - 1;
        if needed == 0 {
            let response = self.serve(call.request);
            return self.answer(reply, response);
        }
        let id = self.fresh_call_id();
        let mut sent = 0;
        for node in others {
            if self.send_to_node(
                node,
                Payload::Fetch {
                    id,
                    key: key.clone(),
                },
            ) {
                sent += 1;
            }
        }
        if sent < needed {
            let response = fail(
                ErrorCode::QuorumNotMet {
                    reached: sent as u8 + 1,
                    needed: quorum as u8,
                },
                format!(
                    "only {sent} of the {needed} more replicas needed for r={quorum} are reachable"
                ),
            );
            return self.answer(reply, response);
        }
        self.wait(
            id,
            Pending::Read {
                reply,
                call,
                partition,
                needed,
                answers: Vec::new(),
            },
        );
    }

    /// Queues `key`'s entry for each of `nodes` (sent at the end of the
    /// turn); returns to how many, leaving out those whose address is
    /// unknown.
    fn replicate_to_all(
        &mut self,
        nodes: &[NodeId],
        id: u64,
        partition: u16,
        key: &[u8],
        entry: &[u8],
        ack: bool,
    ) -> usize {
        let mut sent = 0;
        for &node in nodes {
            if self.replica.membership().addr_of(node).is_none() {
                continue;
            }
            self.outbox.entry(node).or_default().push(ReplicateItem {
                id,
                partition,
                key: key.to_vec(),
                entry: entry.to_vec(),
                ack,
            });
            sent += 1;
        }
        sent
    }

    /// Sends the entries queued for each co-replica: one frame per replica
    /// (cut at `REPLICATE_FRAME_BYTES`). Called once per turn of the loop.
    pub(super) fn flush_outbox(&mut self) {
        for (node, items) in std::mem::take(&mut self.outbox) {
            let mut frame = Vec::new();
            let mut bytes = 0;
            for item in items {
                bytes += item.key.len() + item.entry.len();
                frame.push(item);
                if bytes >= REPLICATE_FRAME_BYTES {
                    let items = std::mem::take(&mut frame);
                    self.send_to_node(node, Payload::Replicate { items });
                    bytes = 0;
                }
            }
            if !frame.is_empty() {
                self.send_to_node(node, Payload::Replicate { items: frame });
            }
        }
    }

    /// A peer's batch of entries: merged in one job, acknowledged together
    /// once durable.
    pub(super) fn on_replicate(&mut self, from: NodeId, items: Vec<ReplicateItem>) {
        let token = self.fresh_call_id();
        let mut acks = Vec::with_capacity(items.len());
        let writes = items
            .into_iter()
            .map(|item| {
                acks.push((item.id, item.ack));
                GroupWrite::Merge {
                    partition: item.partition,
                    key: item.key,
                    entry: item.entry,
                }
            })
            .collect();
        self.storage.submit_peer(Job { token, writes });
        self.writing
            .insert(token, Writing::Replicas { from, items: acks });
    }

    pub(super) fn on_replicated(&mut self, acks: Vec<(u64, bool)>) {
        for (id, ok) in acks {
            let done = match self.pending.get_mut(&id) {
                Some(Pending::Write { acks, needed, .. }) if ok => {
                    *acks += 1;
                    *acks >= *needed
                }
                _ => false,
            };
            if done {
                if let Some(Pending::Write {
                    reply, response, ..
                }) = self.pending.remove(&id)
                {
                    self.answer(reply, response);
                }
            }
        }
    }

    /// Commits the storage thread finished (durable, or failed).
    pub(super) fn on_stored(&mut self, done: Vec<Done>) {
        for Done { token, outcome } in done {
            let Some(writing) = self.writing.remove(&token) else {
                continue;
            };
            match writing {
                Writing::Call {
                    reply,
                    arrived,
                    counter,
                    others,
                    quorum,
                    w,
                    partition,
                    key,
                } => {
                    let Some(reply) = reply else {
                        // The caller was answered `Timeout`: spread the write.
                        if let Ok(Some(Ok(GroupOutcome::Local {
                            entry: Some(entry), ..
                        }))) = outcome.map(|mut r| r.pop())
                        {
                            self.replicate_to_all(&others, 0, partition, &key, &entry, false);
                        }
                        continue;
                    };
                    let result = match outcome {
                        Err(reason) => Err(fail(ErrorCode::Internal, reason)),
                        Ok(mut results) => match results.pop() {
                            Some(Ok(outcome)) => Ok(outcome),
                            Some(Err(e)) => Err(store_failure(e)),
                            None => Err(fail(ErrorCode::Internal, "the write had no outcome")),
                        },
                    };
                    match result {
                        Ok(GroupOutcome::Local {
                            context,
                            counter: value,
                            entry,
                        }) => {
                            let response = if counter {
                                Response::Counter(value.unwrap_or_default())
                            } else {
                                Response::Context(context.to_bytes())
                            };
                            self.replicate_write(
                                reply, arrived, response, entry, others, quorum, w, partition, key,
                            );
                        }
                        Ok(GroupOutcome::Merged { .. }) => {
                            self.answer(reply, fail(ErrorCode::Internal, "unexpected outcome"))
                        }
                        Err(response) => self.answer(reply, response),
                    }
                }
                Writing::Replicas { from, items } => {
                    let oks: Vec<bool> = match &outcome {
                        Err(_) => vec![false; items.len()],
                        Ok(results) => results
                            .iter()
                            .map(|r| match r {
                                Ok(_) => true,
                                Err(e) => {
                                    warn!(peer = %self.node_name(from), "refused a replicated entry: {e}");
                                    false
                                }
                            })
                            .collect(),
                    };
                    let acks: Vec<(u64, bool)> = items
                        .into_iter()
                        .zip(oks)
                        .filter(|((_, ack), _)| *ack)
                        .map(|((id, _), ok)| (id, ok))
                        .collect();
                    if !acks.is_empty() {
                        self.send_to_node(from, Payload::Replicated { acks });
                    }
                }
                Writing::Repair => {
                    if let Ok(results) = &outcome {
                        for e in results.iter().filter_map(|r| r.as_ref().err()) {
                            debug!("a replica's entry for a read was refused: {e}");
                        }
                    }
                }
            }
        }
    }

    /// After the local commit of a client write: sends the entry to the
    /// co-replicas and answers once `quorum` replicas hold it.
    #[allow(clippy::too_many_arguments)]
    fn replicate_write(
        &mut self,
        reply: ReplyTo,
        arrived: Instant,
        response: Response,
        entry: Option<Vec<u8>>,
        others: Vec<NodeId>,
        quorum: usize,
        w: u8,
        partition: u16,
        key: Vec<u8>,
    ) {
        let Some(entry) = entry else {
            return self.answer(reply, response); // a no-op delete
        };
        let id = self.fresh_call_id();
        let sent = self.replicate_to_all(&others, id, partition, &key, &entry, true);
        let needed = quorum - 1;
        if needed == 0 {
            return self.answer(reply, response);
        }
        if sent < needed {
            let response = fail(
                ErrorCode::QuorumNotMet {
                    reached: 1,
                    needed: quorum as u8,
                },
                format!("written on 1 replica, but only {sent} of the {needed} more needed for w={quorum} are reachable"),
            );
            return self.answer(reply, response);
        }
        // Counted from the call's arrival, not from the local commit: the
        // client hears within QUORUM_TIMEOUT plus one turn of the loop.
        self.pending.insert(
            id,
            Pending::Write {
                reply,
                response,
                needed,
                acks: 0,
                w,
            },
        );
        self.deadlines.insert((arrived + QUORUM_TIMEOUT, id));
    }

    pub(super) fn on_fetched(&mut self, from: NodeId, id: u64, entry: Option<Vec<u8>>) {
        if let Some(Pending::Inspect {
            answers, waiting, ..
        }) = self.pending.get_mut(&id)
        {
            waiting.retain(|&n| n != from);
            answers.push((from, entry));
            if waiting.is_empty() {
                if let Some(Pending::Inspect {
                    reply,
                    key,
                    answers,
                    ..
                }) = self.pending.remove(&id)
                {
                    self.finish_inspect(reply, &key, answers, Vec::new());
                }
            }
            return;
        }
        let done = match self.pending.get_mut(&id) {
            Some(Pending::Read {
                answers, needed, ..
            }) => {
                answers.push((from, entry));
                answers.len() >= *needed
            }
            _ => false,
        };
        if done {
            if let Some(Pending::Read {
                reply,
                call,
                partition,
                answers,
                ..
            }) = self.pending.remove(&id)
            {
                self.finish_read(reply, call, partition, answers);
            }
        }
    }

    fn finish_read(
        &mut self,
        reply: ReplyTo,
        call: Call,
        partition: u16,
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
    ) {
        let store = self.replica.store().clone();
        let Some(key) = call.request.key().map(<[u8]>::to_vec) else {
            return;
        };
        self.metrics.client_requests.fetch_add(1, Relaxed);
        let remote: Vec<Vec<u8>> = answers.iter().filter_map(|(_, e)| e.clone()).collect();
        let view = match store.merged_view(&key, &remote) {
            Ok(view) => view,
            // A replica sent an undecodable entry: read what this node has.
            Err(e) => {
                warn!("a replica's entry for a read was refused: {e}");
                match store.merged_view(&key, &[]) {
                    Ok(view) => view,
                    Err(e) => return self.answer(reply, store_failure(e)),
                }
            }
        };
        let response = read_response(&call.request, &view);
        // Merge what the others had into this replica, and repair those
        // whose entry differs from the merged one.
        let local = store.entry_bytes(&key).ok().flatten();
        let merged = view.encoded().map(<[u8]>::to_vec);
        let behind_here: Vec<GroupWrite> = remote
            .into_iter()
            .filter(|e| Some(e) != local.as_ref())
            .map(|entry| GroupWrite::Merge {
                partition,
                key: key.clone(),
                entry,
            })
            .collect();
        if !behind_here.is_empty() {
            let token = self.fresh_call_id();
            self.storage.submit_peer(Job {
                token,
                writes: behind_here,
            });
            self.writing.insert(token, Writing::Repair);
        }
        if let Some(merged) = merged {
            let behind: Vec<NodeId> = answers
                .into_iter()
                .filter(|(_, entry)| entry.as_deref() != Some(merged.as_slice()))
                .map(|(node, _)| node)
                .collect();
            self.replicate_to_all(&behind, 0, partition, &key, &merged, false);
        }
        self.answer(reply, response);
    }

    pub(super) fn expire_pending(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.deadlines.iter().next() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, id));
            let (reply, response) = match self.pending.remove(&id) {
                None => {
                    // A client write still waiting for its local commit.
                    if let Some(Writing::Call { reply, .. }) = self.writing.get_mut(&id) {
                        if let Some(reply) = reply.take() {
                            let response = fail(
                                ErrorCode::Timeout,
                                format!("the write was not on disk here within {QUORUM_TIMEOUT:?} (the node is overloaded); it is still queued and may be applied"),
                            );
                            self.answer(reply, response);
                        }
                    }
                    continue;
                }
                Some(Pending::Forwarded { reply }) => (
                    reply,
                    fail(
                        ErrorCode::Timeout,
                        "the replica coordinating this call did not answer in time",
                    ),
                ),
                Some(Pending::Write { reply, acks, w, .. }) => (
                    reply,
                    fail(
                        ErrorCode::QuorumNotMet {
                            reached: acks as u8 + 1,
                            needed: w,
                        },
                        format!(
                            "only {} of w={w} replicas acknowledged in time; the write is kept on those and will spread",
                            acks + 1
                        ),
                    ),
                ),
                Some(Pending::Inspect {
                    reply,
                    key,
                    answers,
                    waiting,
                }) => {
                    self.finish_inspect(reply, &key, answers, waiting);
                    continue;
                }
                Some(Pending::Read {
                    reply,
                    call,
                    answers,
                    ..
                }) => (
                    reply,
                    fail(
                        ErrorCode::QuorumNotMet {
                            reached: answers.len() as u8 + 1,
                            needed: call.r,
                        },
                        format!(
                            "only {} of r={} replicas answered in time",
                            answers.len() + 1,
                            call.r
                        ),
                    ),
                ),
            };
            self.answer(reply, response);
        }
    }

    /// Serves a request from this node's store alone: a read at R=1, or a
    /// request with no key (status, key listing).
    pub(super) fn serve(&mut self, request: Request) -> Response {
        self.metrics.client_requests.fetch_add(1, Relaxed);
        let store = self.replica.store().clone();
        let result: Result<Response, crate::Error> = (|| {
            Ok(match request {
                Request::Get { key } => Response::Record(store.get(&key)?.map(record)),
                Request::CounterGet { key } => Response::Counter(store.counter(&key)?),
                Request::SetMembers { key } => Response::Members(store.set_members(&key)?),
                Request::Status => Response::Status(self.status(true)),
                Request::Keys { prefix, limit } => {
                    let mut keys = Vec::new();
                    for row in store.scan_prefix(&prefix)? {
                        if keys.len() >= limit as usize {
                            break;
                        }
                        let (key, record) = row?;
                        keys.push((key, record.value.kind().name().to_string()));
                    }
                    Response::Keys(keys)
                }
                other => {
                    return Ok(fail(
                        ErrorCode::BadRequest,
                        format!("{other:?} is not served from the local store"),
                    ))
                }
            })
        })();
        result.unwrap_or_else(store_failure)
    }
}

/// The answer to a read at R > 1 from the merged view.
fn read_response(request: &Request, view: &MergedView) -> Response {
    let result = match request {
        Request::Get { .. } => Ok(Response::Record(view.record().map(record))),
        Request::CounterGet { .. } => view.counter().map(Response::Counter),
        Request::SetMembers { .. } => view.members().map(Response::Members),
        other => return fail(ErrorCode::BadRequest, format!("{other:?} is not a read")),
    };
    result.unwrap_or_else(store_failure)
}
