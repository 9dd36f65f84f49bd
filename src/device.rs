//! The device side of device sync (docs/device-sync.md): what a phone or
//! edge box embeds to work offline and sync with a cluster over its HTTP
//! API.
//!
//! A [`Device`] keeps, in one local redb file:
//! - a replica of the entries under the prefixes it pulled, as the cluster
//!   sent them (`format=binary` pages of the change feed), merged like any
//!   replica merges, and the feed cursor of each prefix, saved with the
//!   page it ends (a checkpoint inside the stream, not only at its end);
//! - a log of the writes made here, each with the causal context of the
//!   key the device had seen and a sequence number of the device. Reads
//!   scan the log, which is meant to stay small (it empties at each sync).
//!
//! Invariants:
//! - the device never mints dots: its writes become cluster writes when
//!   pushed, so the cluster's vectors and cursors do not grow with devices;
//! - a push is applied at most once per (device, sequence), however often
//!   it is sent (the cluster records each device's highest applied
//!   sequence in the key's entry), and a key's writes apply in order: a
//!   push stops at the first write that must be sent again;
//! - a logged write leaves the log only once a pulled entry records it as
//!   applied, so reads never lose sight of it in between;
//! - reads show the replica with the logged writes applied on top (on a
//!   copy, with a dot of [`SHADOW`] that is never stored or sent).
//!
//! A device's id is drawn at random when its file is created: a device
//! that loses its file starts over as a new device and claims nothing.

use crate::crdt::entry::Entry;
use crate::crdt::{CausalContext, Dot, NodeId, Record};
use crate::node::http::changes::BinaryPage;
use base64::Engine;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("device_entries");
const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("device_pending");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("device_meta");

/// The node id of the dots that show logged writes in reads; never stored.
pub const SHADOW: NodeId = NodeId(u64::MAX);

/// Operations per push request (the cluster's batch limit).
const PUSH_BATCH: usize = 128;
/// Changes per pulled page, by default: each page is a checkpoint.
const PULL_PAGE: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device store: {0}")]
    Store(String),
    #[error("cannot reach the cluster: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the cluster answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the cluster sent what this device cannot read: {0}")]
    Protocol(String),
    #[error("key {key:?}: {reason}")]
    Write { key: String, reason: String },
}

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for DeviceError {
            fn from(e: $t) -> Self {
                DeviceError::Store(e.to_string())
            }
        }
    )*};
}
store_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A write made on the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
    CounterAdd { key: Vec<u8>, amount: i64 },
    SetAdd { key: Vec<u8>, member: Vec<u8> },
    SetRemove { key: Vec<u8>, member: Vec<u8> },
}

impl DeviceOp {
    pub fn key(&self) -> &[u8] {
        match self {
            DeviceOp::Put { key, .. }
            | DeviceOp::Delete { key }
            | DeviceOp::CounterAdd { key, .. }
            | DeviceOp::SetAdd { key, .. }
            | DeviceOp::SetRemove { key, .. } => key,
        }
    }
}

/// A logged write: the operation, the context of the key it supersedes,
/// whether it was ever sent, and once the cluster applied it, the key's
/// context it answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Logged {
    op: DeviceOp,
    context: Vec<u8>,
    sent: bool,
    answered: Option<Vec<u8>>,
}

impl Logged {
    fn is_register(&self) -> bool {
        matches!(self.op, DeviceOp::Put { .. } | DeviceOp::Delete { .. })
    }
}

fn context_of(bytes: &[u8]) -> CausalContext {
    CausalContext::from_bytes(bytes).unwrap_or_default()
}

/// What a push did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Writes in the log when the push started: the total the other
    /// counts move towards.
    pub total: usize,
    /// Writes sent so far (a write sent again counts again).
    pub sent: usize,
    /// Request bodies sent, in bytes.
    pub bytes: u64,
    /// Writes the cluster applied (or had applied already).
    pub applied: usize,
    /// Writes left for a later push (a replica was unreachable).
    pub deferred: usize,
    /// Writes the cluster refused for good, with its reason; they leave
    /// the log.
    pub rejected: Vec<(DeviceOp, String)>,
}

/// What a pull did; `bytes` counts the response bodies received. A pull
/// has no total: the cluster does not count ahead of a cursor (that would
/// cost the reads the cursor saves), and `more` on each page says whether
/// another follows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PullReport {
    pub pages: usize,
    pub entries: usize,
    pub bytes: u64,
    /// Deletes were purged on the cluster before this device saw them: it
    /// listed the prefix and dropped what was not listed.
    pub reconciled: bool,
}

/// Where a sync is, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub enum SyncProgress<'a> {
    /// Pushing the log: `sent` and `applied` of `total` writes.
    Push(&'a PushReport),
    /// Pulling `prefix`: pages, entries and bytes so far.
    Pull {
        prefix: &'a [u8],
        report: &'a PullReport,
    },
}

/// A device's local store and its way to the cluster.
pub struct Device {
    db: Database,
    id: u64,
    http: reqwest::Client,
    /// `https://host:port`, without a trailing `/`.
    base: String,
    token: Option<String>,
    page: u32,
}

fn key_json(key: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(key) {
        Ok(text) => serde_json::Value::String(text.to_string()),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(key)
        }),
    }
}

/// A key as the HTTP API writes it (a string, or `{"base64": ...}`).
fn key_of(value: &serde_json::Value) -> Result<Vec<u8>, DeviceError> {
    match value {
        serde_json::Value::String(s) => Ok(s.as_bytes().to_vec()),
        other => other["base64"]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or_else(|| DeviceError::Protocol(format!("a key: {other}"))),
    }
}

fn percent(bytes: &[u8]) -> String {
    percent_encoding::percent_encode(bytes, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Device {
    /// Opens (or creates) the device's file; `base` is a node's HTTP API
    /// (`https://host:port`), `http` a client that trusts the cluster CA,
    /// `token` the API token it sends.
    pub fn open(
        path: impl AsRef<Path>,
        base: &str,
        http: reqwest::Client,
        token: Option<String>,
    ) -> Result<Device, DeviceError> {
        let db = Database::create(path.as_ref())?;
        let txn = db.begin_write()?;
        let id = {
            txn.open_table(ENTRIES)?;
            txn.open_table(PENDING)?;
            let mut meta = txn.open_table(META)?;
            let stored = meta
                .get("id")?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_le_bytes);
            match stored {
                Some(id) => id,
                None => {
                    let id = rand::random::<u64>().max(1);
                    meta.insert("id", id.to_le_bytes().as_slice())?;
                    id
                }
            }
        };
        txn.commit()?;
        Ok(Device {
            db,
            id,
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
            page: PULL_PAGE,
        })
    }

    /// Changes per pulled page (1 to 1,000): smaller pages checkpoint more
    /// often on a connection that drops.
    pub fn set_page_size(&mut self, changes: u32) {
        self.page = changes.clamp(1, 1000);
    }

    /// This device's id (what its pushes carry).
    pub fn id(&self) -> u64 {
        self.id
    }

    fn entry(&self, key: &[u8]) -> Result<Option<Entry>, DeviceError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let Some(bytes) = table.get(key)? else {
            return Ok(None);
        };
        Entry::decode(bytes.value())
            .map(Some)
            .map_err(|e| DeviceError::Store(format!("a stored entry does not decode: {e}")))
    }

    fn logged(&self) -> Result<Vec<(u64, Logged)>, DeviceError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PENDING)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (seq, bytes) = row?;
            let logged = postcard::from_bytes(bytes.value())
                .map_err(|e| DeviceError::Store(format!("a logged write does not decode: {e}")))?;
            out.push((seq.value(), logged));
        }
        Ok(out)
    }

    /// The size of `key`'s entry as pulled (what the cluster encodes), if
    /// the device holds it.
    pub fn entry_bytes(&self, key: &[u8]) -> Result<Option<usize>, DeviceError> {
        Ok(self.entry(key)?.map(|e| e.encode().len()))
    }

    /// Writes still to be pushed or seen back.
    pub fn pending(&self) -> Result<usize, DeviceError> {
        Ok(self.logged()?.len())
    }

    /// Applies `op` to `entry` as the device's shadow write `seq`.
    fn apply_shadow(entry: &mut Entry, op: &DeviceOp, seq: u64, seen: &CausalContext) {
        let dot = Dot::new(SHADOW, seq);
        match op {
            DeviceOp::Put { value, .. } => entry.write_register(Some(value.clone()), dot, seen),
            DeviceOp::Delete { .. } => entry.write_register(None, dot, seen),
            DeviceOp::CounterAdd { amount, .. } => {
                let _ = entry.counter_add(*amount, dot);
            }
            DeviceOp::SetAdd { member, .. } => entry.set_add(member.clone(), dot),
            DeviceOp::SetRemove { member, .. } => entry.set_remove(member.clone(), dot),
        }
    }

    /// The key as this device sees it: the pulled entry with the logged
    /// writes on top. `None` if absent or deleted.
    pub fn get(&self, key: &[u8]) -> Result<Option<Record>, DeviceError> {
        let mut entry = self.entry(key)?.unwrap_or_default();
        // Each logged write has seen the device's earlier ones.
        let mut shadows = CausalContext::new();
        for (seq, logged) in self.logged()? {
            if logged.op.key() == key {
                let mut seen = context_of(&logged.context);
                seen.join(&shadows);
                Self::apply_shadow(&mut entry, &logged.op, seq, &seen);
                shadows.apply(Dot::new(SHADOW, seq));
            }
        }
        let mut record = entry.into_record();
        if let Some(record) = &mut record {
            // The shadow dots name nothing outside this device.
            record.context = record.context.without(SHADOW);
        }
        Ok(record)
    }

    /// Logs a write made on the device; it supersedes what the device has
    /// seen of the key (its pulled entry and its own earlier writes).
    pub fn write(&self, op: DeviceOp) -> Result<u64, DeviceError> {
        let key = op.key().to_vec();
        let entry = self.entry(&key)?;
        if let Some(entry) = &entry {
            let kind = match &op {
                DeviceOp::Put { .. } | DeviceOp::Delete { .. } => crate::ValueKind::Register,
                DeviceOp::CounterAdd { .. } => crate::ValueKind::Counter,
                DeviceOp::SetAdd { .. } | DeviceOp::SetRemove { .. } => crate::ValueKind::Set,
            };
            if let Err(found) = entry.check_writable(kind) {
                return Err(DeviceError::Write {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: format!("it holds a {found}, not a {kind}"),
                });
            }
        }
        let mut context = entry.map(|e| e.context).unwrap_or_default();
        // A register write supersedes the device's earlier one of the key:
        // one never sent is replaced (no one else saw its value), and one
        // applied already is covered by the context it answered. One sent
        // without an answer may or may not be applied: it stays, and if it
        // was applied, its value may stay beside this one as a sibling.
        let mut replaced = None;
        if matches!(op, DeviceOp::Put { .. } | DeviceOp::Delete { .. }) {
            for (seq, logged) in self.logged()? {
                if logged.op.key() != key.as_slice() || !logged.is_register() {
                    continue;
                }
                match &logged.answered {
                    Some(answered) => context.join(&context_of(answered)),
                    None if logged.sent => {}
                    None => {
                        context.join(&context_of(&logged.context));
                        replaced = Some(seq);
                    }
                }
            }
        }
        let txn = self.db.begin_write()?;
        let seq = {
            let mut meta = txn.open_table(META)?;
            let next = meta
                .get("next_seq")?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map_or(1, u64::from_le_bytes);
            meta.insert("next_seq", (next + 1).to_le_bytes().as_slice())?;
            let logged = Logged {
                op,
                context: context.to_bytes(),
                sent: false,
                answered: None,
            };
            let logged =
                postcard::to_allocvec(&logged).map_err(|e| DeviceError::Store(e.to_string()))?;
            let mut pending = txn.open_table(PENDING)?;
            if let Some(old) = replaced {
                pending.remove(old)?;
            }
            pending.insert(next, logged.as_slice())?;
            next
        };
        txn.commit()?;
        Ok(seq)
    }

    fn request(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// GETs `url`: its body if answered 200, counted in `report.bytes`
    /// either way.
    async fn get_counted(
        &self,
        url: String,
        report: &mut PullReport,
    ) -> Result<Vec<u8>, DeviceError> {
        let response = self.request(self.http.get(url)).send().await?;
        let status = response.status().as_u16();
        let body = response.bytes().await?;
        report.bytes += body.len() as u64;
        if status != 200 {
            return Err(DeviceError::Refused {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(body.to_vec())
    }

    /// Sends the logged writes, in order, [`PUSH_BATCH`] at a time. Sending
    /// again what was applied changes nothing, so a push cut anywhere is
    /// simply pushed again.
    pub async fn push(&self) -> Result<PushReport, DeviceError> {
        self.push_with_progress(|_| {}).await
    }

    /// [`Device::push`], telling `progress` after each request what was
    /// sent and answered out of the total.
    pub async fn push_with_progress(
        &self,
        mut progress: impl FnMut(&PushReport),
    ) -> Result<PushReport, DeviceError> {
        let logged = self.logged()?;
        let mut report = PushReport {
            total: logged.len(),
            ..PushReport::default()
        };
        for chunk in logged.chunks(PUSH_BATCH) {
            // Marked sent first: a write that may have been applied is
            // never replaced by a later one (see `write`).
            let txn = self.db.begin_write()?;
            {
                let mut pending = txn.open_table(PENDING)?;
                for (seq, logged) in chunk.iter().filter(|(_, l)| !l.sent) {
                    let sent = Logged {
                        sent: true,
                        ..logged.clone()
                    };
                    let bytes = postcard::to_allocvec(&sent)
                        .map_err(|e| DeviceError::Store(e.to_string()))?;
                    pending.insert(*seq, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            let ops: Vec<serde_json::Value> = chunk
                .iter()
                .map(|(seq, l)| {
                    let key = key_json(l.op.key());
                    let mut op = match &l.op {
                        DeviceOp::Put { value, .. } => serde_json::json!({
                            "op": "put", "key": key, "value": key_json(value),
                        }),
                        DeviceOp::Delete { .. } => {
                            serde_json::json!({ "op": "delete", "key": key })
                        }
                        DeviceOp::CounterAdd { amount, .. } => serde_json::json!({
                            "op": "counter_add", "key": key, "amount": amount,
                        }),
                        DeviceOp::SetAdd { member, .. } => serde_json::json!({
                            "op": "set_add", "key": key, "member": key_json(member),
                        }),
                        DeviceOp::SetRemove { member, .. } => serde_json::json!({
                            "op": "set_remove", "key": key, "member": key_json(member),
                        }),
                    };
                    op["seq"] = serde_json::json!(seq);
                    if matches!(l.op, DeviceOp::Put { .. } | DeviceOp::Delete { .. })
                        && !l.context.is_empty()
                    {
                        op["context"] = serde_json::Value::String(
                            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&l.context),
                        );
                    }
                    op
                })
                .collect();
            let body = serde_json::json!({ "device": format!("{:x}", self.id), "ops": ops });
            let body = serde_json::to_vec(&body).map_err(|e| DeviceError::Store(e.to_string()))?;
            report.sent += chunk.len();
            report.bytes += body.len() as u64;
            let response = self
                .request(self.http.post(format!("{}/v1/batch", self.base)))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await?;
            let status = response.status().as_u16();
            let text = response.text().await?;
            if status != 200 {
                return Err(DeviceError::Refused { status, body: text });
            }
            let answer: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| DeviceError::Protocol(format!("a push answer: {e}")))?;
            let results = answer["results"].as_array().cloned().unwrap_or_default();
            if results.len() != chunk.len() {
                return Err(DeviceError::Protocol(format!(
                    "{} results for {} writes",
                    results.len(),
                    chunk.len()
                )));
            }
            let txn = self.db.begin_write()?;
            {
                let mut pending = txn.open_table(PENDING)?;
                for ((seq, logged), result) in chunk.iter().zip(results) {
                    match result["status"].as_u64() {
                        Some(200) => {
                            report.applied += 1;
                            let answered = result["result"]["context"]
                                .as_str()
                                .and_then(|c| {
                                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                                        .decode(c)
                                        .ok()
                                })
                                .unwrap_or_default();
                            let logged = Logged {
                                sent: true,
                                answered: Some(answered),
                                ..logged.clone()
                            };
                            let bytes = postcard::to_allocvec(&logged)
                                .map_err(|e| DeviceError::Store(e.to_string()))?;
                            pending.insert(*seq, bytes.as_slice())?;
                        }
                        Some(s) if s == 503 || s == 504 || s == 429 => report.deferred += 1,
                        _ => {
                            pending.remove(*seq)?;
                            report
                                .rejected
                                .push((logged.op.clone(), result["error"].to_string()));
                        }
                    }
                }
            }
            txn.commit()?;
            progress(&report);
            // The key records only the highest write applied: a later write
            // of a key whose earlier one was deferred must wait for it.
            if report.deferred > 0 {
                break;
            }
        }
        Ok(report)
    }

    /// Pulls what changed under `prefix` since this device's cursor for it,
    /// page by page, saving the cursor with each page; `progress` is told
    /// the entries and bytes received so far. Logged writes the pulled
    /// entries record as applied leave the log.
    pub async fn pull(
        &self,
        prefix: &[u8],
        mut progress: impl FnMut(&PullReport),
    ) -> Result<PullReport, DeviceError> {
        let mut report = PullReport::default();
        let cursor_key = format!("cursor:{}", percent(prefix));
        loop {
            let cursor = {
                let txn = self.db.begin_read()?;
                let meta = txn.open_table(META)?;
                meta.get(cursor_key.as_str())?
                    .map(|v| String::from_utf8_lossy(v.value()).into_owned())
            };
            let mut url = format!(
                "{}/v1/changes?format=binary&limit={}&device={:x}&prefix={}",
                self.base,
                self.page,
                self.id,
                percent(prefix)
            );
            if let Some(cursor) = &cursor {
                url.push_str(&format!("&since={cursor}"));
            }
            let body = self.get_counted(url, &mut report).await?;
            let page: BinaryPage = postcard::from_bytes(&body)
                .map_err(|e| DeviceError::Protocol(format!("a feed page: {e}")))?;
            // An empty `next`: the cursor asked with is still the one.
            let next = match (page.next.as_str(), &cursor) {
                ("", Some(cursor)) => cursor.as_str(),
                ("", None) => {
                    return Err(DeviceError::Protocol(
                        "a first page without a cursor".into(),
                    ))
                }
                (next, _) => next,
            };
            let changes = &page.changes;
            // Deletes were purged before this device saw them: once caught
            // up, drop what the cluster no longer lists, then save the
            // cursor (a pull cut half way is told again).
            let reconcile = page.reconcile;
            // Every page is a checkpoint; every 8th, and the last, is also
            // flushed to disk. A crash loses at most the pages since (their
            // cursor with them, so they are pulled again), and a long pull
            // does not wait for a disk flush per page.
            let durable = !page.more || reconcile || report.pages % 8 == 7;
            self.apply_page(
                changes,
                (!reconcile).then_some((&cursor_key, next)),
                durable,
            )?;
            if reconcile {
                let kept = self.list(prefix, next, &mut report).await?;
                self.drop_unlisted(prefix, &kept, &cursor_key, next)?;
                report.reconciled = true;
            }
            report.pages += 1;
            report.entries += changes.len();
            progress(&report);
            // Caught up: nothing more waits now.
            if !page.more {
                return Ok(report);
            }
        }
    }

    /// Every live key under `prefix`, listed by replicas that have caught
    /// up with `cursor`.
    async fn list(
        &self,
        prefix: &[u8],
        cursor: &str,
        report: &mut PullReport,
    ) -> Result<std::collections::BTreeSet<Vec<u8>>, DeviceError> {
        let mut keys = std::collections::BTreeSet::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/v1/kv?limit=1000&prefix={}&cursor={cursor}",
                self.base,
                percent(prefix)
            );
            if let Some(after) = &after {
                url.push_str(&format!("&start_after={after}"));
            }
            let body = self.get_counted(url, report).await?;
            let page: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| DeviceError::Protocol(format!("a listing: {e}")))?;
            for listed in page["keys"].as_array().into_iter().flatten() {
                keys.insert(key_of(&listed["key"])?);
            }
            match &page["next"] {
                serde_json::Value::Null => return Ok(keys),
                next => after = Some(percent(&key_of(next)?)),
            }
        }
    }

    /// Drops the entries under `prefix` that are not in `kept` (deleted
    /// and purged on the cluster), and saves the cursor.
    fn drop_unlisted(
        &self,
        prefix: &[u8],
        kept: &std::collections::BTreeSet<Vec<u8>>,
        cursor_key: &str,
        next: &str,
    ) -> Result<(), DeviceError> {
        let txn = self.db.begin_write()?;
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut gone = Vec::new();
            for row in entries.range(prefix..)? {
                let (key, _) = row?;
                let key = key.value().to_vec();
                if !key.starts_with(prefix) {
                    break;
                }
                if !kept.contains(&key) {
                    gone.push(key);
                }
            }
            for key in gone {
                entries.remove(key.as_slice())?;
            }
            txn.open_table(META)?.insert(cursor_key, next.as_bytes())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Merges a page's entries and, with `cursor`, saves it, in one
    /// transaction.
    fn apply_page(
        &self,
        changes: &[(Vec<u8>, Vec<u8>)],
        cursor: Option<(&str, &str)>,
        durable: bool,
    ) -> Result<(), DeviceError> {
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| DeviceError::Store(e.to_string()))?;
        }
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut pending = txn.open_table(PENDING)?;
            let mut logged_keys: std::collections::HashMap<Vec<u8>, Vec<u64>> =
                std::collections::HashMap::new();
            for row in pending.iter()? {
                let (seq, logged) = row?;
                if let Ok(logged) = postcard::from_bytes::<Logged>(logged.value()) {
                    logged_keys
                        .entry(logged.op.key().to_vec())
                        .or_default()
                        .push(seq.value());
                }
            }
            let mut done: Vec<u64> = Vec::new();
            // In key order: neighbouring inserts share B-tree pages.
            let mut sorted: Vec<&(Vec<u8>, Vec<u8>)> = changes.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, bytes) in sorted {
                crate::store::write::check_key(key)
                    .map_err(|e| DeviceError::Protocol(format!("a change's key: {e}")))?;
                let theirs = Entry::decode(bytes)
                    .map_err(|e| DeviceError::Protocol(format!("an entry: {e}")))?;
                let stored = entries
                    .get(key.as_slice())?
                    .map(|b| Entry::decode(b.value()))
                    .transpose()
                    .map_err(|e| DeviceError::Store(format!("a stored entry: {e}")))?;
                let entry = match stored {
                    Some(mut entry) => {
                        entry.merge(theirs);
                        entries.insert(key.as_slice(), entry.encode().as_slice())?;
                        entry
                    }
                    // A key new here is stored as sent (it decoded whole).
                    None => {
                        entries.insert(key.as_slice(), bytes.as_slice())?;
                        theirs
                    }
                };
                let applied = entry.device_seq(self.id);
                if let Some(seqs) = logged_keys.get(key) {
                    done.extend(seqs.iter().filter(|&&seq| seq <= applied));
                }
            }
            for seq in done {
                pending.remove(seq)?;
            }
            if let Some((cursor_key, next)) = cursor {
                txn.open_table(META)?.insert(cursor_key, next.as_bytes())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Unsubscribes from `prefix`: drops its cursor and the entries under
    /// it that none of the prefixes in `kept` covers (their keys' logged
    /// writes stay until pushed). Returns how many entries were dropped.
    pub fn forget(&self, prefix: &[u8], kept: &[&[u8]]) -> Result<usize, DeviceError> {
        let txn = self.db.begin_write()?;
        let dropped = {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut gone = Vec::new();
            for row in entries.range(prefix..)? {
                let (key, _) = row?;
                let key = key.value().to_vec();
                if !key.starts_with(prefix) {
                    break;
                }
                if !kept.iter().any(|k| key.starts_with(k)) {
                    gone.push(key);
                }
            }
            for key in &gone {
                entries.remove(key.as_slice())?;
            }
            txn.open_table(META)?
                .remove(format!("cursor:{}", percent(prefix)).as_str())?;
            gone.len()
        };
        txn.commit()?;
        Ok(dropped)
    }

    /// Pushes, then pulls each prefix.
    pub async fn sync(&self, prefixes: &[&[u8]]) -> Result<(PushReport, PullReport), DeviceError> {
        self.sync_with_progress(prefixes, |_| {}).await
    }

    /// [`Device::sync`], telling `progress` after each request.
    pub async fn sync_with_progress(
        &self,
        prefixes: &[&[u8]],
        mut progress: impl FnMut(SyncProgress<'_>),
    ) -> Result<(PushReport, PullReport), DeviceError> {
        let pushed = self
            .push_with_progress(|r| progress(SyncProgress::Push(r)))
            .await?;
        let mut pulled = PullReport::default();
        for prefix in prefixes {
            let r = self
                .pull(prefix, |r| {
                    progress(SyncProgress::Pull { prefix, report: r })
                })
                .await?;
            pulled.pages += r.pages;
            pulled.entries += r.entries;
            pulled.bytes += r.bytes;
            pulled.reconciled |= r.reconciled;
        }
        Ok((pushed, pulled))
    }
}
