//! Admin and inspection requests (the admin protocol), and the node's
//! status.

use super::coordinate::ClientReply;
use super::Core;
use crate::client::{
    DevicesInfo, ErrorCode, Failure, LayoutInfo, MemberInfo, MigrationStreamInfo, MigrationsInfo,
    NodeStatus, PartitionInfo, PurgeHold, PushHold, ReplicaView, Request, Response, TokenInfo,
    WireRecord,
};
use crate::crdt::NodeId;
use crate::replication::tokens;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Core {
    pub(super) fn admin(&mut self, request: Request, reply: ClientReply) {
        let layout = self.replica.layout().clone();
        let store = self.replica.store().clone();
        let response = match request {
            Request::ClusterMembers => {
                let mut members = vec![MemberInfo {
                    id: self.id.to_string(),
                    name: self.name.clone(),
                    addr: self.addr.to_string(),
                    state: "self".into(),
                    zone: self.replica.membership().meta().zone.clone(),
                    capacity: Some(self.replica.membership().meta().capacity),
                    partitions_held: layout.current().partitions_of(self.id).len(),
                    load: Some(self.replica.membership().meta().load.clone()),
                    last_heard_ms: Some(0),
                }];
                for m in self.replica.membership().members() {
                    members.push(MemberInfo {
                        id: m.id.to_string(),
                        name: self.node_name(m.id),
                        addr: m.addr.to_string(),
                        state: format!("{:?}", m.state).to_lowercase(),
                        zone: m.meta.as_ref().and_then(|meta| meta.zone.clone()),
                        capacity: m.meta.as_ref().map(|meta| meta.capacity),
                        partitions_held: layout.current().partitions_of(m.id).len(),
                        load: m.meta.as_ref().map(|meta| meta.load.clone()),
                        last_heard_ms: self
                            .last_heard
                            .get(&m.id)
                            .map(|at| at.elapsed().as_millis() as u64),
                    });
                }
                Response::ClusterMembers(members)
            }
            Request::Layout => {
                let current = layout.current();
                let replicas = (0..current.partitions())
                    .map(|p| {
                        current
                            .replicas(p)
                            .iter()
                            .map(|&n| self.node_name(n))
                            .collect()
                    })
                    .collect();
                let pending = current
                    .nodes()
                    .into_iter()
                    .flat_map(|n| {
                        layout
                            .pending_migrations(n)
                            .into_iter()
                            .map(move |p| (p, n))
                    })
                    .map(|(p, n)| (p, self.node_name(n)))
                    .collect();
                Response::Layout(LayoutInfo {
                    version: current.version(),
                    completed: layout.completed().version(),
                    replicas,
                    pending,
                })
            }
            Request::Partitions => match store.partition_versions() {
                Ok(versions) => {
                    let mut rows = Vec::new();
                    for (p, vv) in versions.iter().enumerate() {
                        let p = p as u16;
                        if !layout.holds(self.id, p) && vv.is_empty() {
                            continue;
                        }
                        let stats = store.partition_stats(p).unwrap_or_default();
                        let version = vv
                            .nodes()
                            .map(|n| (self.node_name(n), vv.base(n), vv.extra(n).collect()))
                            .collect();
                        rows.push(PartitionInfo {
                            partition: p,
                            entries: stats.entries,
                            bytes: stats.bytes,
                            digest: crate::replication::replica::vector_hash(vv),
                            version,
                        });
                    }
                    Response::Partitions(rows)
                }
                Err(e) => Response::Error(Failure::new(ErrorCode::of(&e), e.to_string())),
            },
            Request::Inspect { key } => {
                let outputs = self
                    .coordinator
                    .inspect(&self.replica, self.now(), key, reply);
                return self.carry_coord(outputs);
            }
            Request::Migrations => {
                let progress = self.replica.migration_progress();
                Response::Migrations(MigrationsInfo {
                    layout_version: progress.layout_version,
                    in_flight: self
                        .replica
                        .migration_sources()
                        .into_iter()
                        .map(|(p, n)| (p, self.node_name(n)))
                        .collect(),
                    total: progress.total,
                    done: progress.done,
                    entries: progress.entries,
                    bytes: progress.bytes,
                    elapsed_ms: progress.elapsed.as_millis() as u64,
                    streams: self
                        .replica
                        .migration_streams()
                        .into_iter()
                        .map(|m| MigrationStreamInfo {
                            partition: m.partition,
                            phase: m.phase,
                            source: self.node_name(m.source),
                            entries_total: m.announced.map(|a| a.0),
                            bytes_total: m.announced.map(|a| a.1),
                            entries_done: m.entries,
                            bytes_done: m.bytes,
                            running_ms: m.running_for.as_millis() as u64,
                            since_progress_ms: m.since_progress.as_millis() as u64,
                            restarts: m.restarts,
                            stalled: m.stalled,
                        })
                        .collect(),
                    budget_bytes_per_sec: self.replica.migration_budget(),
                    bytes_queued_to_send: self.replica.migration_bytes_queued(),
                })
            }
            Request::LayoutPlan => self.plan_layout(),
            Request::SetCapacity { capacity } => self.set_placement(Some(capacity), None),
            Request::SetZone { zone } => self.set_placement(None, Some(zone)),
            Request::SetMigrationBudget { bytes_per_sec } => {
                let budget = (bytes_per_sec > 0).then_some(bytes_per_sec);
                let outputs = self.replica.set_migration_budget(self.now(), budget);
                self.carry_out(outputs);
                tracing::info!(
                    "migration budget set to {}",
                    budget.map_or("unlimited".into(), |b| format!("{b} bytes/s"))
                );
                Response::Done
            }
            Request::LayoutApply { id } => self.apply_plan(id),
            Request::Devices => Response::Devices(DevicesInfo {
                node: self.name.clone(),
                now_ms: unix_ms(),
                devices: self.ledger.snapshot(),
                purge_held: self.purge_held(),
                push_held: self
                    .replica
                    .push_fences_pending()
                    .into_iter()
                    .map(|(partition, nodes)| PushHold {
                        partition,
                        waiting_for: nodes.into_iter().map(|n| self.node_name(n)).collect(),
                    })
                    .collect(),
            }),
            Request::Join { seed } => {
                let outputs = self.replica.join(self.now(), seed);
                self.carry_out(outputs);
                Response::Done
            }
            Request::Leave => {
                let outputs = self.replica.leave(self.now());
                self.carry_out(outputs);
                Response::Done
            }
            Request::TokenCreate {
                name,
                prefixes,
                read,
                write,
                expires_in_seconds,
            } => self.create_token(name, prefixes, read, write, expires_in_seconds),
            Request::TokenList => {
                let now = unix_ms();
                let ms = |ms: u64| crate::certs::rfc3339((ms / 1000) as i64);
                Response::Tokens(
                    self.replica
                        .tokens()
                        .tokens()
                        .map(|t| TokenInfo {
                            id: tokens::hex(&t.id),
                            name: t.name.clone(),
                            prefixes: t
                                .prefixes
                                .iter()
                                .map(|p| String::from_utf8_lossy(p).into_owned())
                                .collect(),
                            read: t.read,
                            write: t.write,
                            created: ms(t.created_ms),
                            expires: t.expires_ms.map(ms),
                            state: if t.revoked {
                                "revoked"
                            } else if t.active(now) {
                                "active"
                            } else {
                                "expired"
                            }
                            .into(),
                        })
                        .collect(),
                )
            }
            Request::TokenRevoke { name_or_id } => {
                let (revoked, outputs) = self.replica.revoke_token(self.now(), &name_or_id);
                self.carry_out(outputs);
                if revoked == 0
                    && !self
                        .replica
                        .tokens()
                        .tokens()
                        .any(|t| t.name == name_or_id || tokens::hex(&t.id) == name_or_id)
                {
                    Response::Error(Failure::new(
                        ErrorCode::BadRequest,
                        format!("no token is named {name_or_id:?} or has that id"),
                    ))
                } else {
                    Response::Revoked(revoked as u32)
                }
            }
            other => Response::Error(Failure::new(
                ErrorCode::BadRequest,
                format!("{other:?} is not an admin request"),
            )),
        };
        self.answer(reply, response);
    }

    /// Partitions held here with tombstones that the next purge round
    /// would keep, and why (the conditions of `Replica::purge`).
    fn purge_held(&self) -> Vec<PurgeHold> {
        let layout = self.replica.layout();
        let store = self.replica.store();
        let Ok(versions) = store.partition_versions() else {
            return Vec::new();
        };
        let mut held = Vec::new();
        for (p, own) in versions.iter().enumerate() {
            let p = p as u16;
            if !layout.holds(self.id, p) || !store.has_tombstones(p).unwrap_or(false) {
                continue;
            }
            let reason = if layout.in_transition() {
                "the layout is changing: purges wait until every replica is ready".to_string()
            } else {
                let mut unknown = Vec::new();
                let mut behind = Vec::new();
                for n in layout.holders(p).into_iter().filter(|&n| n != self.id) {
                    match self.replica.peer_version(p, n) {
                        None => unknown.push(self.node_name(n)),
                        Some(v) if !v.dominates(own) => behind.push(self.node_name(n)),
                        Some(_) => {}
                    }
                }
                if !unknown.is_empty() {
                    format!(
                        "no version vector from {} yet (down, or anti-entropy has not reached it)",
                        unknown.join(", ")
                    )
                } else if !behind.is_empty() {
                    format!(
                        "{} has not seen every write here: tombstones it lacks wait for anti-entropy",
                        behind.join(", ")
                    )
                } else {
                    continue;
                }
            };
            held.push(PurgeHold {
                partition: p,
                reason,
            });
        }
        held
    }

    fn create_token(
        &mut self,
        name: String,
        prefixes: Vec<Vec<u8>>,
        read: bool,
        write: bool,
        expires_in_seconds: Option<u64>,
    ) -> Response {
        use rand::RngCore;
        if self.replica.tokens().tokens().any(|t| t.name == name) {
            return Response::Error(Failure::new(
                ErrorCode::BadRequest,
                format!("a token named {name:?} exists: revoke it first, or choose another name"),
            ));
        }
        let now = unix_ms();
        let expires_ms = match expires_in_seconds
            .map(|s| s.checked_mul(1000).and_then(|ms| ms.checked_add(now)))
        {
            Some(None) => {
                return Response::Error(Failure::new(
                    ErrorCode::BadRequest,
                    "the expiry is too far away",
                ))
            }
            Some(Some(at)) => Some(at),
            None => None,
        };
        let mut randomness = [0u8; 48];
        rand::rng().fill_bytes(&mut randomness);
        let (record, secret) =
            tokens::mint(&randomness, name, prefixes, read, write, now, expires_ms);
        let id = tokens::hex(&record.id);
        match self.replica.create_token(self.now(), record) {
            Ok(outputs) => {
                self.carry_out(outputs);
                Response::TokenCreated { id, secret }
            }
            Err(e) => Response::Error(Failure::new(ErrorCode::BadRequest, e.to_string())),
        }
    }

    pub(super) fn finish_inspect(
        &mut self,
        reply: ClientReply,
        key: &[u8],
        answers: Vec<(NodeId, Option<Vec<u8>>)>,
        silent: Vec<NodeId>,
    ) {
        let mut views: Vec<ReplicaView> = answers
            .into_iter()
            .map(|(node, entry)| {
                let record = entry
                    .and_then(|bytes| crate::store::decode_record(key, &bytes).ok().flatten())
                    .map(|r| WireRecord {
                        value: r.value,
                        context: r.context.to_bytes(),
                        other_kinds: r.other_kinds,
                    });
                ReplicaView {
                    node: self.node_name(node),
                    answered: true,
                    record,
                }
            })
            .collect();
        views.extend(silent.into_iter().map(|n| ReplicaView {
            node: self.node_name(n),
            answered: false,
            record: None,
        }));
        views.sort_by(|a, b| a.node.cmp(&b.node));
        self.answer(reply, Response::Inspect(views));
    }

    /// The node's status; `sizes` also counts the entries and bytes held,
    /// which scans the held partitions (for status requests, not metrics).
    pub(super) fn status(&self, sizes: bool) -> NodeStatus {
        let layout = self.replica.layout();
        let members = self.replica.membership().members();
        let (mut entries_held, mut bytes_held) = (0, 0);
        for p in 0..layout.current().partitions() {
            if sizes && layout.holds(self.id, p) {
                if let Ok(stats) = self.replica.store().partition_stats(p) {
                    entries_held += stats.entries;
                    bytes_held += stats.bytes;
                }
            }
        }
        NodeStatus {
            node_id: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            members_alive: self.replica.membership().alive().len() + 1,
            members_total: members.len() + 1,
            layout_version: layout.current().version(),
            layout_completed: layout.completed().version(),
            partitions_held: (0..layout.current().partitions())
                .filter(|&p| layout.holds(self.id, p))
                .count(),
            migrations_in_flight: self.replica.migrating().len(),
            anti_entropy_rounds: self.replica.stats().rounds_started,
            repaired_entries: self.replica.stats().repair_entries_received,
            decommissioned: self.replica.has_left(),
            entries_held,
            bytes_held,
            cert_expires: self.peers.tls.not_after().map(crate::certs::rfc3339),
            cert_expires_in_days: self.peers.tls.not_after().map(crate::certs::days_left),
        }
    }
}
