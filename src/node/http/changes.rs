//! `GET /v1/changes` and `POST /v1/changes`: the change feed over HTTP.
//!
//! A page is one coordinated `Request::Changes` (see `replication::feed`).
//! The cursor a page ends with (`next`) is the reader's frontier, encoded:
//! URL-safe base64 of a versioned postcard record holding the partition
//! count, the prefix it was made for and a version vector per partition.
//! Clients treat it as opaque. A cursor made for a prefix is also valid
//! for any longer prefix (what it claims for the wider prefix holds for
//! the narrower), never for a shorter or another one.
//!
//! `since=now`: the first page sends nothing and its cursor covers what the
//! cluster holds, so the reader follows only later changes (with
//! `feed=longpoll`, it is held until the first of them).
//!
//! `feed=longpoll`: a page with no changes is held until a commit under
//! the prefix on this node wakes it, then read again, at most `timeout`
//! seconds; at the timeout the empty page is the answer. A node that does
//! not read every partition locally subscribes at the replicas of those
//! it does not (see [`super::watch`]).

use super::json::{context_text, json_body, ApiError, JsonBytes, JsonRecord};
use super::routes::{parse_json, read_body, refuse_unread, unexpected, Query};
use super::watch::{hold, Scope};
use super::{Api, Connection};
use crate::client::{ChangesPage, Request, Response, WireRecord};
use crate::crdt::{Dot, NodeId, VersionVector};
use crate::replication::feed::MAX_CHANGES_LIMIT;
use crate::replication::tokens::Access;
use crate::store::decode_change;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::response::Response as HttpResponse;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Changes in a page unless `limit` says otherwise.
pub const CHANGES_LIMIT: u32 = 100;
/// How long a long-polled page waits by default, and at most (seconds).
pub const LONGPOLL_SECONDS: u64 = 30;
pub const MAX_LONGPOLL_SECONDS: u64 = 300;
/// The largest `POST /v1/changes` body (a cursor of many partitions).
const MAX_FEED_BODY: usize = 1 << 20;
const CURSOR_VERSION: u8 = 1;

/// A cursor as it travels: node ids once, then per partition each node's
/// base and out-of-order dots by index into them (postcard varints), which
/// keeps a 256-partition cursor of a few nodes to a few kilobytes.
#[derive(Serialize, Deserialize)]
struct Cursor {
    version: u8,
    partitions: u16,
    #[serde(with = "serde_bytes")]
    prefix: Vec<u8>,
    nodes: Vec<u64>,
    frontier: Vec<(u16, Vec<NodeSeqs>)>,
    /// A purge the reader missed was found; it reconciles once caught up.
    reconcile_pending: bool,
}

#[derive(Serialize, Deserialize)]
struct NodeSeqs {
    node: u32,
    base: u64,
    extra: Vec<u64>,
}

/// What a cursor holds: the reader's frontier and whether a reconciliation
/// is pending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FeedCursor {
    pub frontier: Vec<(u16, VersionVector)>,
    pub reconcile_pending: bool,
}

pub(crate) fn encode_cursor(partitions: u16, prefix: &[u8], cursor: FeedCursor) -> String {
    let FeedCursor {
        frontier,
        reconcile_pending,
    } = cursor;
    let mut nodes: Vec<u64> = frontier
        .iter()
        .flat_map(|(_, vv)| vv.nodes().map(|n| n.0).collect::<Vec<_>>())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let index = |node: NodeId| nodes.binary_search(&node.0).unwrap_or_default() as u32;
    let compact = frontier
        .iter()
        .map(|(p, vv)| {
            let seqs = vv
                .nodes()
                .map(|n| NodeSeqs {
                    node: index(n),
                    base: vv.base(n),
                    extra: vv.extra(n).collect(),
                })
                .collect();
            (*p, seqs)
        })
        .collect();
    let cursor = Cursor {
        version: CURSOR_VERSION,
        partitions,
        prefix: prefix.to_vec(),
        nodes: nodes.clone(),
        frontier: compact,
        reconcile_pending,
    };
    // Encoding a plain struct into a Vec cannot fail.
    let bytes = postcard::to_allocvec(&cursor).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn decode_cursor(
    text: &str,
    partitions: u16,
    prefix: &[u8],
) -> Result<FeedCursor, ApiError> {
    let bad = |why: String| ApiError::bad_request("bad_cursor", why);
    let unsupported = |version: u8| {
        bad(format!(
            "cursor version {version} is not supported (this node reads version {CURSOR_VERSION})"
        ))
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| bad(format!("the cursor is not URL-safe base64: {e}")))?;
    let cursor: Cursor = match postcard::from_bytes(&bytes) {
        Ok(c) => c,
        Err(_) if bytes.first().is_some_and(|&v| v != CURSOR_VERSION) => {
            return Err(unsupported(bytes[0]))
        }
        Err(e) => return Err(bad(format!("the cursor does not decode: {e}"))),
    };
    if cursor.version != CURSOR_VERSION {
        return Err(unsupported(cursor.version));
    }
    if cursor.partitions != partitions {
        return Err(bad(format!(
            "the cursor was made by a cluster of {} partitions; this one has {partitions}",
            cursor.partitions
        )));
    }
    if !prefix.starts_with(&cursor.prefix) {
        return Err(bad(format!(
            "the cursor was made for prefix {:?}, which does not contain {:?}; start without `since`",
            String::from_utf8_lossy(&cursor.prefix),
            String::from_utf8_lossy(prefix)
        )));
    }
    let mut frontier = Vec::with_capacity(cursor.frontier.len());
    for (p, seqs) in cursor.frontier {
        let mut vv = VersionVector::new();
        for s in seqs {
            let node = cursor
                .nodes
                .get(s.node as usize)
                .map(|&n| NodeId(n))
                .ok_or_else(|| {
                    bad(format!(
                        "the cursor names node #{} of {}",
                        s.node,
                        cursor.nodes.len()
                    ))
                })?;
            vv.raise_base(node, s.base);
            for seq in s.extra {
                vv.add(Dot::new(node, seq));
            }
        }
        frontier.push((p, vv));
    }
    Ok(FeedCursor {
        frontier,
        reconcile_pending: cursor.reconcile_pending,
    })
}

/// A feed request, from the query or from the JSON body.
struct FeedRequest {
    prefix: Vec<u8>,
    since: Option<String>,
    limit: u32,
    longpoll: bool,
    timeout: Duration,
    format: PageFormat,
    /// The device pulling, if it says (for the device ledger).
    device: Option<u64>,
}

/// How a page is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageFormat {
    /// JSON, values and contexts (`format=values`, the default).
    Values,
    /// JSON, each change with its encoded entry too (`format=entries`), for
    /// devices that merge entries rather than replace values.
    Entries,
    /// A postcard [`BinaryPage`] (`format=binary`): keys and encoded
    /// entries and nothing else, for devices that merge (the Rust one).
    Binary,
}

/// A change feed page in `format=binary`: postcard, as
/// `application/octet-stream`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct BinaryPage {
    /// (key, encoded entry) per change.
    pub(crate) changes: Vec<(Vec<u8>, Vec<u8>)>,
    /// The cursor to ask with next; empty when it is the one asked with.
    pub(crate) next: String,
    pub(crate) more: bool,
    pub(crate) reconcile: bool,
}

fn format_of(format: Option<&str>) -> Result<PageFormat, ApiError> {
    match format {
        None | Some("values") => Ok(PageFormat::Values),
        Some("entries") => Ok(PageFormat::Entries),
        Some("binary") => Ok(PageFormat::Binary),
        Some(other) => Err(ApiError::bad_request(
            "bad_query",
            format!("format={other:?}: expected values, entries or binary"),
        )),
    }
}

fn limit_of(text: Option<&str>) -> Result<u32, ApiError> {
    match text {
        None => Ok(CHANGES_LIMIT),
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_CHANGES_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "bad_query",
                format!("limit={text:?}: expected 1 to {MAX_CHANGES_LIMIT}"),
            )),
        },
    }
}

fn longpoll_of(feed: Option<&str>) -> Result<bool, ApiError> {
    match feed {
        None | Some("normal") => Ok(false),
        Some("longpoll") => Ok(true),
        Some(other) => Err(ApiError::bad_request(
            "bad_query",
            format!("feed={other:?}: expected normal or longpoll"),
        )),
    }
}

/// `GET /v1/changes?prefix=&since=&limit=&feed=normal|longpoll&timeout=`.
pub(super) async fn changes_get(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<HttpResponse, ApiError> {
    api.authenticate(connection, &headers)?;
    let query = Query::parse(
        &uri,
        &[
            "prefix", "since", "limit", "feed", "timeout", "format", "device",
        ],
    )?;
    let request = FeedRequest {
        prefix: query.raw.get("prefix").cloned().unwrap_or_default(),
        since: query.get("since")?.cloned().filter(|s| !s.is_empty()),
        limit: limit_of(query.get("limit")?.map(String::as_str))?,
        longpoll: longpoll_of(query.get("feed")?.map(String::as_str))?,
        timeout: query.seconds("timeout", LONGPOLL_SECONDS, MAX_LONGPOLL_SECONDS)?,
        format: format_of(query.get("format")?.map(String::as_str))?,
        device: query
            .get("device")?
            .map(|d| super::routes::device_id(d, "bad_query"))
            .transpose()?,
    };
    serve(&api, connection, &headers, request).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedBody {
    prefix: Option<JsonBytes>,
    since: Option<String>,
    limit: Option<u32>,
    feed: Option<String>,
    timeout: Option<f64>,
    format: Option<String>,
    device: Option<String>,
}

/// `POST /v1/changes` with `{"prefix", "since", "limit", "feed",
/// "timeout"}`: the same feed, for cursors too long for a URL.
pub(super) async fn changes_post(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<HttpResponse, ApiError> {
    let checked = api
        .authenticate(connection, &headers)
        .and_then(|_| Query::parse(&uri, &[]));
    if let Err(e) = checked {
        return Err(refuse_unread(&headers, body, e).await);
    }
    let body: FeedBody = parse_json(&read_body(&headers, body, MAX_FEED_BODY).await?)?;
    let timeout = match body.timeout {
        None => Duration::from_secs(LONGPOLL_SECONDS),
        Some(s) if s.is_finite() && (0.0..=MAX_LONGPOLL_SECONDS as f64).contains(&s) => {
            Duration::from_secs_f64(s)
        }
        Some(s) => {
            return Err(ApiError::bad_request(
                "bad_json",
                format!("timeout {s}: expected seconds from 0 to {MAX_LONGPOLL_SECONDS}"),
            ))
        }
    };
    let request = FeedRequest {
        prefix: body.prefix.map(|p| p.0).unwrap_or_default(),
        since: body.since.filter(|s| !s.is_empty()),
        limit: limit_of(body.limit.map(|n| n.to_string()).as_deref())?,
        longpoll: longpoll_of(body.feed.as_deref())?,
        timeout,
        format: format_of(body.format.as_deref())?,
        device: body
            .device
            .map(|d| super::routes::device_id(&d, "bad_json"))
            .transpose()?,
    };
    serve(&api, connection, &headers, request).await
}

async fn serve(
    api: &Api,
    connection: Connection,
    headers: &HeaderMap,
    request: FeedRequest,
) -> Result<HttpResponse, ApiError> {
    api.authorize(connection, headers, &request.prefix, Access::Read)?;
    let mut from_now = request.since.as_deref() == Some("now");
    let mut cursor = match &request.since {
        None => FeedCursor::default(),
        Some(_) if from_now => FeedCursor::default(),
        Some(text) => decode_cursor(text, api.partitions, &request.prefix)?,
    };
    let deadline = tokio::time::Instant::now() + request.timeout;
    let mut local = api.local_reads.clone();
    loop {
        // Registered before the read: a commit between the two wakes it.
        let mut watch = match request.longpoll {
            false => None,
            true => Some(api.watches.watch_prefix(&request.prefix).ok_or_else(|| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "overloaded",
                    format!("this node holds {} watches, its most", super::MAX_WATCHES),
                )
            })?),
        };
        local.borrow_and_update();
        let here = api.reads_locally(&local, Scope::All);
        if request.longpoll {
            api.subscribe(&local, Scope::All, &request.prefix);
        }
        let call = Request::Changes {
            prefix: request.prefix.clone(),
            since: cursor.frontier,
            limit: request.limit,
            reconcile_pending: cursor.reconcile_pending,
            from_now,
        };
        from_now = false;
        let page = match api.call(call, 1, 1).await? {
            Response::Changes(page) => page,
            other => return Err(unexpected(other)),
        };
        let now = tokio::time::Instant::now();
        let Some(watch) = watch.as_mut() else {
            return answer(api, headers, &request, page);
        };
        if !page.entries.is_empty() || page.more || now >= deadline {
            return answer(api, headers, &request, page);
        }
        cursor = FeedCursor {
            frontier: page.frontier,
            reconcile_pending: page.reconcile_pending,
        };
        hold(&mut watch.woken, &mut local, here, deadline).await;
    }
}

/// Records the page in the device ledger, if a device asked, and renders
/// it.
fn answer(
    api: &Api,
    headers: &HeaderMap,
    request: &FeedRequest,
    page: ChangesPage,
) -> Result<HttpResponse, ApiError> {
    if let Some(device) = request.device {
        api.ledger.pulled(
            device,
            api.token_name(headers),
            crate::node::admin::unix_ms(),
            page.entries.len(),
            !page.more,
            page.reconcile,
        );
    }
    render(api, request, page)
}

/// `{"changes": [...], "next": cursor, "more": bool}`; a deleted key is
/// `{"key", "deleted": true, "context"}`.
fn render(api: &Api, request: &FeedRequest, page: ChangesPage) -> Result<HttpResponse, ApiError> {
    let prefix = &request.prefix;
    if request.format == PageFormat::Binary {
        let next = FeedCursor {
            frontier: page.frontier,
            reconcile_pending: page.reconcile_pending,
        };
        let mut next = encode_cursor(api.partitions, prefix, next);
        if request.since.as_deref() == Some(next.as_str()) {
            // Unchanged: a caught-up device's idle page carries no cursor.
            next.clear();
        }
        let binary = BinaryPage {
            changes: page.entries.into_iter().map(|e| (e.key, e.entry)).collect(),
            next,
            more: page.more,
            reconcile: page.reconcile,
        };
        let body = postcard::to_allocvec(&binary).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        return Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/octet-stream"),
            )],
            body,
        )
            .into_response());
    }
    let mut changes = Vec::with_capacity(page.entries.len());
    for entry in &page.entries {
        let (record, context) = decode_change(&entry.key, &entry.entry).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("a replica sent an entry that does not decode: {e}"),
            )
        })?;
        let change = match record {
            Some(record) => {
                let wire = WireRecord {
                    value: record.value,
                    context: record.context.to_bytes(),
                    other_kinds: record.other_kinds,
                };
                serde_json::to_value(JsonRecord::new(&entry.key, &wire)).map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?
            }
            None => serde_json::json!({
                "key": JsonBytes(entry.key.clone()),
                "deleted": true,
                "context": context_text(&context.to_bytes()),
            }),
        };
        let mut change = change;
        if request.format == PageFormat::Entries {
            change["entry"] = serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(&entry.entry),
            );
        }
        changes.push(change);
    }
    let next = FeedCursor {
        frontier: page.frontier,
        reconcile_pending: page.reconcile_pending,
    };
    let next = encode_cursor(api.partitions, prefix, next);
    Ok(json_body(&serde_json::json!({
        "changes": changes,
        "next": next,
        "more": page.more,
        "reconcile": page.reconcile,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_is_refused_for_another_cluster_or_a_wider_prefix() {
        let mut vv = VersionVector::new();
        vv.add(Dot::new(NodeId(7), 1));
        vv.add(Dot::new(NodeId(7), 5));
        let cursor = FeedCursor {
            frontier: vec![(3, vv)],
            reconcile_pending: true,
        };
        let text = encode_cursor(64, b"user/", cursor.clone());
        assert_eq!(decode_cursor(&text, 64, b"user/").unwrap(), cursor);
        assert_eq!(decode_cursor(&text, 64, b"user/42/").unwrap(), cursor);
        for (text, partitions, prefix, says) in [
            (text.as_str(), 32, &b"user/"[..], "partitions"),
            (&text, 64, b"", "prefix"),
            (&text, 64, b"other/", "prefix"),
            ("!!!", 64, b"user/", "base64"),
            ("AAAA", 64, b"user/", "version"),
            ("AQ", 64, b"user/", "decode"),
        ] {
            let error = decode_cursor(text, partitions, prefix).unwrap_err();
            assert_eq!(error.code, "bad_cursor");
            assert!(error.message.contains(says), "{says}: {}", error.message);
        }
    }

    #[test]
    fn a_cursor_of_a_large_cluster_fits_in_a_url() {
        // 256 partitions, 5 nodes, ten thousand writes each, a few gaps.
        let frontier: Vec<_> = (0..256u16)
            .map(|p| {
                let mut vv = VersionVector::new();
                for n in 0..5u64 {
                    let node = NodeId(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(n + 1));
                    vv.raise_base(node, 10_000 + u64::from(p));
                    vv.add(Dot::new(node, 10_100 + u64::from(p)));
                }
                (p, vv)
            })
            .collect();
        let cursor = FeedCursor {
            frontier,
            reconcile_pending: false,
        };
        let text = encode_cursor(256, b"user/42/", cursor.clone());
        assert!(text.len() < 16 * 1024, "{} bytes", text.len());
        assert_eq!(decode_cursor(&text, 256, b"user/42/").unwrap(), cursor);
    }
}
