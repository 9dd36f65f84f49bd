//! The node's side of request coordination: it hands client calls and the
//! peers' coordination messages to the sans-IO
//! [`Coordinator`](crate::replication::coordinator) and carries out what it
//! returns (peer sends, storage jobs, answers). Admin requests and requests
//! without a key (status, key listing) are served here, from this node.

use super::storage::Stored;
use super::{Core, Payload};
use crate::client::{Call, ErrorCode, Failure, Request, Response};
use crate::crdt::NodeId;
use crate::replication::coordinator::{Caller, CoordMessage, CoordOutput};
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// Where a client waiting on this node is answered.
pub(super) type ClientReply = oneshot::Sender<Response>;

fn fail(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(Failure::new(code, message))
}

impl Core {
    /// A client's call on this node.
    pub(super) fn on_call(&mut self, call: Call, reply: ClientReply) {
        if call.request.is_admin() {
            return self.admin(call.request, reply);
        }
        if call.request.key().is_none()
            && !matches!(call.request, Request::List { .. } | Request::Changes { .. })
        {
            let response = self.serve(call.request);
            return self.answer(reply, response);
        }
        let outputs = self
            .coordinator
            .call(&self.replica, self.now(), call, Caller::Client(reply));
        self.carry_coord(outputs);
    }

    pub(super) fn on_coord_message(&mut self, from: NodeId, message: CoordMessage) {
        // Peers forward the calls of clients that reached them; admin
        // requests are never forwarded, so a peer sending one is not
        // relaying a client (the coordinator refuses it).
        if let CoordMessage::Coordinate { call, .. } = &message {
            if call.request.is_admin() {
                warn!(peer = %self.node_name(from), "refused an admin request sent by a peer");
            }
        }
        let outputs = self
            .coordinator
            .message(&self.replica, self.now(), from, message);
        self.carry_coord(outputs);
    }

    pub(super) fn on_stored(&mut self, stored: Stored) {
        let outputs = match stored {
            Stored::Applied(applied) => self.coordinator.applied(&self.replica, applied),
            Stored::Durable(done) => {
                let (replicas, done): (Vec<_>, Vec<_>) = done.into_iter().partition(|d| d.replica);
                for done in replicas {
                    let token = done.token;
                    let outputs = self.replica.stored(self.now(), token, done.single());
                    self.carry_out(outputs);
                }
                self.coordinator.stored(&self.replica, done)
            }
        };
        self.carry_coord(outputs);
    }

    pub(super) fn expire_calls(&mut self) {
        let outputs = self.coordinator.expire(&self.replica, self.now());
        self.carry_coord(outputs);
    }

    pub(super) fn carry_coord(&mut self, outputs: Vec<CoordOutput<ClientReply>>) {
        for output in outputs {
            match output {
                CoordOutput::Send { to, message } => {
                    self.send_to_node(to, Payload::Coord(message));
                }
                CoordOutput::Store(job) => self.storage.submit(job),
                CoordOutput::Reply { to, response } => {
                    let _ = to.send(response);
                }
                CoordOutput::Inspected {
                    to,
                    key,
                    answers,
                    silent,
                } => self.finish_inspect(to, &key, answers, silent),
                CoordOutput::Refused { from, reason } => {
                    debug!(peer = %self.node_name(from), "refused a replica's entry: {reason}")
                }
            }
        }
        self.count_requests();
    }

    /// Client requests and errors for metrics: the coordinator's and those
    /// served here.
    fn count_requests(&self) {
        let stats = self.coordinator.stats();
        self.metrics
            .client_requests
            .store(stats.requests + self.local_requests, Relaxed);
        self.metrics
            .client_errors
            .store(stats.errors + self.local_errors, Relaxed);
    }

    /// Answers a client of this node with what was served here.
    pub(super) fn answer(&mut self, reply: ClientReply, response: Response) {
        if matches!(response, Response::Error(_)) {
            self.local_errors += 1;
        }
        let _ = reply.send(response);
        self.count_requests();
    }

    /// Serves a request without a key from this node's store alone
    /// (status, key listing).
    pub(super) fn serve(&mut self, request: Request) -> Response {
        self.local_requests += 1;
        let store = self.replica.store().clone();
        let result: Result<Response, crate::Error> = (|| {
            Ok(match request {
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
        result.unwrap_or_else(|e| fail(ErrorCode::of(&e), e.to_string()))
    }
}
