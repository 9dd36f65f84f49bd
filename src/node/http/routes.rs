//! The routes: each HTTP request becomes one client [`Call`] coordinated
//! exactly like a QUIC client request (any node, W and R per request), and
//! its [`Response`] becomes JSON (or raw bytes when asked for).
//!
//! Everything a client sends is checked here before a call is made: the
//! key's percent-encoding, every query parameter (unknown ones are refused,
//! so a typo is not silently ignored), the context header, the JSON body;
//! bodies are capped before they are read.

use super::json::{context_text, json_body, ApiError, JsonBytes, JsonRecord, CONTEXT_HEADER};
use super::watch::{hold, Scope};
use super::{Api, Connection};
use crate::client::{Request, Response, WireRecord};
use crate::crdt::{CausalContext, Value};
use crate::replication::coordinator::MAX_LIST_LIMIT;
use crate::replication::tokens::Access;
use crate::store::{partition_of, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// How long a request body may take to arrive (a slow sender holds a
/// connection slot and memory no longer than this).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a watch waits by default, and at most (seconds).
pub const WATCH_SECONDS: u64 = 30;
pub const MAX_WATCH_SECONDS: u64 = 300;

/// The most operations one batch may carry.
pub const MAX_BATCH_OPS: usize = 128;
/// The largest JSON body (a batch of values, a set member).
const MAX_JSON_BYTES: usize = MAX_VALUE_BYTES + (1 << 20);

const KV: &str = "/v1/kv/";
const COUNTERS: &str = "/v1/counters/";
const SETS: &str = "/v1/sets/";

pub(super) fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route(
            "/v1/kv/{*key}",
            get(get_item).put(put_item).delete(delete_item),
        )
        .route("/v1/counters/{*key}", get(counter_get).post(counter_add))
        .route("/v1/sets/{*key}", get(set_members).post(set_change))
        .route("/v1/kv", get(list))
        .route(
            "/v1/changes",
            get(super::changes::changes_get).post(super::changes::changes_post),
        )
        .route("/v1/batch", post(batch))
        .route("/v1/status", get(status))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(api)
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!(
            "no route {}: see docs/http-api.md for the routes",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Decodes a percent-encoded string strictly: every `%` must start two hex
/// digits (lenient decoders pass broken escapes through as text, which
/// would silently address another key).
pub(super) fn percent_decode(what: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            if hex.is_none() {
                return Err(ApiError::bad_request(
                    "bad_encoding",
                    format!("{what}: '%' at byte {i} is not followed by two hex digits"),
                ));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(percent_encoding::percent_decode(bytes).collect())
}

/// The key in the path after `prefix`: percent-decoded, so any bytes
/// (including `/`) can be a key.
fn key_of(uri: &Uri, prefix: &str) -> Result<Vec<u8>, ApiError> {
    let raw = uri.path().strip_prefix(prefix).unwrap_or_default();
    let key = percent_decode("key", raw)?;
    if key.is_empty() {
        return Err(ApiError::bad_request("bad_key", "the key is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the key is {} bytes; at most {MAX_KEY_BYTES} are allowed",
                key.len()
            ),
        ));
    }
    Ok(key)
}

/// Query parameters, each allowed name at most once: percent-decoded
/// bytes (`raw`), and as text those that are UTF-8.
#[derive(Debug)]
pub(super) struct Query {
    text: HashMap<String, String>,
    pub(super) raw: HashMap<String, Vec<u8>>,
}

impl Query {
    pub(super) fn parse(uri: &Uri, allowed: &[&str]) -> Result<Query, ApiError> {
        let mut params = HashMap::new();
        let mut raw = HashMap::new();
        for pair in uri.query().unwrap_or_default().split('&') {
            if pair.is_empty() {
                continue;
            }
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name =
                String::from_utf8(percent_decode("query parameter name", name)?).map_err(|_| {
                    ApiError::bad_request("bad_query", "a query parameter name is not UTF-8")
                })?;
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!(
                        "unknown query parameter {name:?}; this route takes: {}",
                        if allowed.is_empty() {
                            "none".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                ));
            }
            let value = percent_decode(&name, &value.replace('+', " "))?;
            if let Ok(text) = std::str::from_utf8(&value) {
                params.insert(name.clone(), text.to_string());
            }
            if raw.insert(name.clone(), value).is_some() {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!("query parameter {name:?} is given twice"),
                ));
            }
        }
        Ok(Query { text: params, raw })
    }

    /// A parameter as text; refused if it is not UTF-8.
    pub(super) fn get(&self, name: &str) -> Result<Option<&String>, ApiError> {
        match self.text.get(name) {
            Some(text) => Ok(Some(text)),
            None if self.raw.contains_key(name) => Err(ApiError::bad_request(
                "bad_query",
                format!("query parameter {name:?} is not UTF-8"),
            )),
            None => Ok(None),
        }
    }

    fn quorum(&self, name: &str) -> Result<u8, ApiError> {
        match self.get(name)? {
            None => Ok(1),
            Some(text) => match text.parse::<u8>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(ApiError::bad_request(
                    "bad_query",
                    format!("{name}={text:?}: expected a replica count of at least 1"),
                )),
            },
        }
    }

    /// A number of seconds, `default` when absent, at most `max`.
    pub(super) fn seconds(&self, name: &str, default: u64, max: u64) -> Result<Duration, ApiError> {
        match self.get(name)? {
            None => Ok(Duration::from_secs(default)),
            Some(text) => match text.parse::<f64>() {
                Ok(s) if s.is_finite() && (0.0..=max as f64).contains(&s) => {
                    Ok(Duration::from_secs_f64(s))
                }
                _ => Err(ApiError::bad_request(
                    "bad_query",
                    format!("{name}={text:?}: expected seconds from 0 to {max}"),
                )),
            },
        }
    }

    fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name)?.map(String::as_str) {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(other) => Err(ApiError::bad_request(
                "bad_query",
                format!("{name}={other:?}: expected true or false"),
            )),
        }
    }
}

/// The context header, checked, as token bytes.
fn context_of(headers: &HeaderMap) -> Result<Option<Vec<u8>>, ApiError> {
    let Some(value) = headers.get(CONTEXT_HEADER) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        ApiError::bad_request(
            "bad_context",
            format!("the {CONTEXT_HEADER} header is not text"),
        )
    })?;
    parse_context(text).map(Some)
}

fn parse_context(text: &str) -> Result<Vec<u8>, ApiError> {
    text.parse::<CausalContext>()
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::bad_request("bad_context", format!("bad causal context: {e}")))
}

/// Reads a body of at most `max` bytes: refused by its declared length
/// before a byte is read, or as soon as it grows past `max`.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> Result<Vec<u8>, ApiError> {
    let too_large = |len: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is {len} bytes; at most {max} are allowed here"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(too_large(len.to_string()));
        }
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, max));
    let Ok(read) = read.await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        ));
    };
    match read {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            let length_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if length_limit {
                Err(too_large(format!("more than {max}")))
            } else {
                Err(ApiError::bad_request(
                    "bad_body",
                    format!("reading the body failed: {e}"),
                ))
            }
        }
    }
}

/// The most of an unread body read (and dropped) before an early refusal.
const DRAIN_BYTES: usize = 64 * 1024;

/// `error`, for a request whose body was not read yet: a small body is read
/// and dropped first, because an HTTP/2 answer that comes before the end of
/// its request resets the stream, which some clients (curl 7) report as a
/// framing error instead of the answer. A larger body gets the reset.
pub(super) async fn refuse_unread(headers: &HeaderMap, body: Body, error: ApiError) -> ApiError {
    let _ = read_body(headers, body, DRAIN_BYTES).await;
    error
}

/// Parses a JSON body; the error names the field that was wrong (its path,
/// like `ops[2].amount`) beside serde's reason and position.
pub(super) fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    let bad = |message: String| ApiError::bad_request("bad_json", message);
    let mut reader = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        bad(match path.as_str() {
            "." | "" => format!("the JSON body is invalid: {inner}"),
            field => format!("the JSON body is invalid at `{field}`: {inner}"),
        })
    })?;
    // Trailing bytes after the value.
    reader
        .end()
        .map_err(|e| bad(format!("the JSON body is invalid: {e}")))?;
    Ok(value)
}

fn with_context(mut response: HttpResponse, context: &[u8]) -> HttpResponse {
    if let Ok(value) = HeaderValue::from_str(&context_text(context)) {
        response.headers_mut().insert(CONTEXT_HEADER, value);
    }
    response
}

pub(super) fn unexpected(response: Response) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the node gave an unexpected answer: {response:?}"),
    )
}

fn not_found(key: &[u8]) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("key {} has no value", crate::error::show_key(key)),
    )
}

fn wants_raw(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            let first = accept.split(',').next().unwrap_or_default();
            first.trim().starts_with("application/octet-stream")
        })
}

async fn get_item(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<HttpResponse, ApiError> {
    api.authenticate(connection, &headers)?;
    let key = key_of(&uri, KV)?;
    api.authorize(connection, &headers, &key, Access::Read)?;
    let query = Query::parse(&uri, &["r", "watch", "timeout"])?;
    let r = query.quorum("r")?;
    let record = match query.get("watch")? {
        None => read(&api, &key, r).await?,
        Some(since) => {
            let since = if since.is_empty() {
                CausalContext::new()
            } else {
                since.parse::<CausalContext>().map_err(|e| {
                    ApiError::bad_request("bad_context", format!("watch: bad causal context: {e}"))
                })?
            };
            let timeout = query.seconds("timeout", WATCH_SECONDS, MAX_WATCH_SECONDS)?;
            match watch(&api, &key, r, &since, timeout).await? {
                Some(record) => record,
                None => return Ok(StatusCode::NOT_MODIFIED.into_response()),
            }
        }
    };
    let record = record.ok_or_else(|| not_found(&key))?;
    let json = || json_body(&JsonRecord::new(&key, &record));
    let response = if !wants_raw(&headers) {
        json()
    } else {
        match &record.value {
            Value::Register(values) if values.len() == 1 => raw(values[0].clone()),
            // Siblings: the client must choose (or merge) and write back.
            Value::Register(_) => (StatusCode::MULTIPLE_CHOICES, json()).into_response(),
            Value::Lww(value) => raw(value.clone()),
            other => {
                return Err(ApiError::new(
                    StatusCode::NOT_ACCEPTABLE,
                    "not_acceptable",
                    format!(
                        "the key holds a {}, which has no raw form: ask for application/json",
                        other.kind().name()
                    ),
                ))
            }
        }
    };
    Ok(with_context(response, &record.context))
}

/// A read of `key` at `r`.
async fn read(api: &Api, key: &[u8], r: u8) -> Result<Option<WireRecord>, ApiError> {
    match api.call(Request::Get { key: key.to_vec() }, 1, r).await? {
        Response::Record(record) => Ok(record),
        other => Err(unexpected(other)),
    }
}

/// Whether the key has moved past `since`: it holds a write `since` has
/// not seen, or it is gone though `since` saw something.
fn moved(record: &Option<WireRecord>, since: &CausalContext) -> bool {
    match record {
        None => !since.is_empty(),
        Some(record) => match CausalContext::from_bytes(&record.context) {
            Ok(context) => context.dots().any(|dot| !since.covers(dot)),
            Err(_) => true,
        },
    }
}

/// Waits until `key` moves past `since` (its read, `Some`) or `timeout`
/// passes (`None`), woken by this node's commits of the key (see
/// [`super::watch`] for when it also re-reads).
async fn watch(
    api: &Api,
    key: &[u8],
    r: u8,
    since: &CausalContext,
    timeout: Duration,
) -> Result<Option<Option<WireRecord>>, ApiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let scope = Scope::Partition(partition_of(key, api.partitions));
    let mut local = api.local_reads.clone();
    loop {
        // Registered before the read: a write between the two wakes it.
        let mut watch = api.watches.watch(key).ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                format!("this node holds {} watches, its most", super::MAX_WATCHES),
            )
        })?;
        local.borrow_and_update();
        let here = api.reads_locally(&local, scope);
        api.subscribe(&local, scope, key);
        let record = read(api, key, r).await?;
        if moved(&record, since) {
            return Ok(Some(record));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        hold(&mut watch.woken, &mut local, here, deadline).await;
    }
}

fn raw(value: Vec<u8>) -> HttpResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        value,
    )
        .into_response()
}

fn context_answer(response: Response) -> Result<HttpResponse, ApiError> {
    match response {
        Response::Context(context) => Ok(with_context(
            json_body(&serde_json::json!({ "context": context_text(&context) })),
            &context,
        )),
        other => Err(unexpected(other)),
    }
}

async fn put_item(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<HttpResponse, ApiError> {
    let checked = (|| {
        api.authenticate(connection, &headers)?;
        let key = key_of(&uri, KV)?;
        api.authorize(connection, &headers, &key, Access::Write)?;
        let query = Query::parse(&uri, &["w", "lww"])?;
        let w = query.quorum("w")?;
        let lww = query.flag("lww")?;
        let context = context_of(&headers)?;
        Ok((key, w, lww, context))
    })();
    let (key, w, lww, context) = match checked {
        Ok(checked) => checked,
        Err(e) => return Err(refuse_unread(&headers, body, e).await),
    };
    let value = read_body(&headers, body, MAX_VALUE_BYTES).await?;
    let request = if lww {
        if context.is_some() {
            return Err(ApiError::bad_request(
                "bad_context",
                "an LWW write takes no causal context: the latest write wins",
            ));
        }
        Request::PutLww { key, value }
    } else {
        Request::Put {
            key,
            value,
            context,
        }
    };
    context_answer(api.call(request, w, 1).await?)
}

async fn delete_item(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<HttpResponse, ApiError> {
    api.authenticate(connection, &headers)?;
    let key = key_of(&uri, KV)?;
    api.authorize(connection, &headers, &key, Access::Write)?;
    let w = Query::parse(&uri, &["w"])?.quorum("w")?;
    let context = context_of(&headers)?;
    context_answer(api.call(Request::Delete { key, context }, w, 1).await?)
}

async fn counter_get(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<HttpResponse, ApiError> {
    api.authenticate(connection, &headers)?;
    let key = key_of(&uri, COUNTERS)?;
    api.authorize(connection, &headers, &key, Access::Read)?;
    let r = Query::parse(&uri, &["r"])?.quorum("r")?;
    match api
        .call(Request::CounterGet { key: key.clone() }, 1, r)
        .await?
    {
        Response::Counter(value) => Ok(json_body(
            &serde_json::json!({ "key": JsonBytes(key), "value": value }),
        )),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterAdd {
    add: i64,
}

async fn counter_add(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<HttpResponse, ApiError> {
    let checked = (|| {
        api.authenticate(connection, &headers)?;
        let key = key_of(&uri, COUNTERS)?;
        api.authorize(connection, &headers, &key, Access::Write)?;
        Ok((key, Query::parse(&uri, &["w"])?.quorum("w")?))
    })();
    let (key, w) = match checked {
        Ok(checked) => checked,
        Err(e) => return Err(refuse_unread(&headers, body, e).await),
    };
    let CounterAdd { add } = parse_json(&read_body(&headers, body, 4096).await?)?;
    match api
        .call(
            Request::CounterAdd {
                key: key.clone(),
                amount: add,
            },
            w,
            1,
        )
        .await?
    {
        Response::Counter(value) => Ok(json_body(
            &serde_json::json!({ "key": JsonBytes(key), "value": value }),
        )),
        other => Err(unexpected(other)),
    }
}

async fn set_members(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<HttpResponse, ApiError> {
    api.authenticate(connection, &headers)?;
    let key = key_of(&uri, SETS)?;
    api.authorize(connection, &headers, &key, Access::Read)?;
    let r = Query::parse(&uri, &["r"])?.quorum("r")?;
    match api
        .call(Request::SetMembers { key: key.clone() }, 1, r)
        .await?
    {
        Response::Members(members) => Ok(json_body(&serde_json::json!({
            "key": JsonBytes(key),
            "members": members.into_iter().map(JsonBytes).collect::<Vec<_>>(),
        }))),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum SetChange {
    Add(JsonBytes),
    Remove(JsonBytes),
}

async fn set_change(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<HttpResponse, ApiError> {
    let checked = (|| {
        api.authenticate(connection, &headers)?;
        let key = key_of(&uri, SETS)?;
        api.authorize(connection, &headers, &key, Access::Write)?;
        Ok((key, Query::parse(&uri, &["w"])?.quorum("w")?))
    })();
    let (key, w) = match checked {
        Ok(checked) => checked,
        Err(e) => return Err(refuse_unread(&headers, body, e).await),
    };
    let change: SetChange = parse_json(&read_body(&headers, body, MAX_JSON_BYTES).await?)?;
    let request = match change {
        SetChange::Add(JsonBytes(member)) => Request::SetAdd { key, member },
        SetChange::Remove(JsonBytes(member)) => Request::SetRemove { key, member },
    };
    context_answer(api.call(request, w, 1).await?)
}

/// Keys a page lists when the request does not say.
const LIST_LIMIT: u32 = 100;

/// `GET /v1/kv?prefix=&start_after=&limit=&cursor=`: one page of the live
/// keys across the cluster, and the `next` cursor (the last key) when the
/// page is full. With a change feed `cursor` (a `next` of `/v1/changes`),
/// each partition is listed only by a replica that has caught up with it:
/// the listing a reader told to `reconcile` needs. A token lists only
/// within its prefixes: the listing's prefix must lie inside one of them.
async fn list(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<HttpResponse, ApiError> {
    api.authenticate(connection, &headers)?;
    let query = Query::parse(&uri, &["prefix", "start_after", "limit", "cursor"])?;
    let prefix = query.raw.get("prefix").cloned().unwrap_or_default();
    api.authorize(connection, &headers, &prefix, Access::Read)?;
    let since = match query.get("cursor")?.filter(|c| !c.is_empty()) {
        Some(cursor) => super::changes::decode_cursor(cursor, api.partitions, &prefix)?.frontier,
        None => Vec::new(),
    };
    let start_after = query.raw.get("start_after").cloned();
    let limit = match query.get("limit")? {
        None => LIST_LIMIT,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!("limit={text:?}: expected 1 to {MAX_LIST_LIMIT}"),
                ))
            }
        },
    };
    let request = Request::List {
        prefix,
        start_after,
        limit,
        since,
    };
    match api.call(request, 1, 1).await? {
        Response::Keys(keys) => {
            let next = (keys.len() == limit as usize)
                .then(|| keys.last().map(|(k, _)| JsonBytes(k.clone())))
                .flatten();
            let keys: Vec<_> = keys
                .into_iter()
                .map(|(key, kind)| serde_json::json!({ "key": JsonBytes(key), "kind": kind }))
                .collect();
            Ok(json_body(
                &serde_json::json!({ "keys": keys, "next": next }),
            ))
        }
        other => Err(unexpected(other)),
    }
}

async fn status(
    State(api): State<Arc<Api>>,
    Extension(connection): Extension<Connection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<HttpResponse, ApiError> {
    api.authenticate(connection, &headers)?;
    Query::parse(&uri, &[])?;
    match api.call(Request::Status, 1, 1).await? {
        Response::Status(status) => Ok(json_body(&status)),
        other => Err(unexpected(other)),
    }
}

/// One operation of a batch.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum BatchOp {
    Get {
        key: JsonBytes,
        r: Option<u8>,
    },
    Put {
        key: JsonBytes,
        value: JsonBytes,
        context: Option<String>,
        w: Option<u8>,

        seq: Option<u64>,
    },
    PutLww {
        key: JsonBytes,
        value: JsonBytes,
        w: Option<u8>,

        seq: Option<u64>,
    },
    Delete {
        key: JsonBytes,
        context: Option<String>,
        w: Option<u8>,

        seq: Option<u64>,
    },
    CounterAdd {
        key: JsonBytes,
        amount: i64,
        w: Option<u8>,

        seq: Option<u64>,
    },
    CounterGet {
        key: JsonBytes,
        r: Option<u8>,
    },
    SetAdd {
        key: JsonBytes,
        member: JsonBytes,
        w: Option<u8>,

        seq: Option<u64>,
    },
    SetRemove {
        key: JsonBytes,
        member: JsonBytes,
        w: Option<u8>,

        seq: Option<u64>,
    },
    SetMembers {
        key: JsonBytes,
        r: Option<u8>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    ops: Vec<BatchOp>,
    /// A device pushing the writes it made offline (hex, up to 16 digits):
    /// each write carries its `seq` and is applied at most once.
    device: Option<String>,
}

/// A batch operation's request, W and R.
type BatchCall = (Request, u8, u8);
/// An operation's place in the batch, and its call or why it is invalid.
type IndexedCall = (usize, Result<BatchCall, ApiError>);

impl BatchOp {
    /// A write's sequence in its device's push.
    fn seq(&self) -> Option<u64> {
        match self {
            BatchOp::Put { seq, .. }
            | BatchOp::PutLww { seq, .. }
            | BatchOp::Delete { seq, .. }
            | BatchOp::CounterAdd { seq, .. }
            | BatchOp::SetAdd { seq, .. }
            | BatchOp::SetRemove { seq, .. } => *seq,
            BatchOp::Get { .. } | BatchOp::CounterGet { .. } | BatchOp::SetMembers { .. } => None,
        }
    }

    /// The call, a device's write pushed when the batch names a `device`.
    fn pushed_call(self, device: Option<u64>) -> Result<BatchCall, ApiError> {
        let seq = self.seq();
        let (request, w, r) = self.call()?;
        match (device, seq) {
            (_, Some(0)) => Err(ApiError::bad_request("bad_request", "`seq` starts at 1")),
            (Some(device), Some(seq)) => Ok((
                Request::Pushed {
                    device,
                    seq,
                    op: Box::new(request),
                },
                w,
                r,
            )),
            (Some(_), None) if request.is_write() => Err(ApiError::bad_request(
                "bad_request",
                "a device's push needs a `seq` on every write",
            )),
            (None, Some(_)) => Err(ApiError::bad_request(
                "bad_request",
                "`seq` needs the batch's `device`",
            )),
            _ => Ok((request, w, r)),
        }
    }

    fn call(self) -> Result<BatchCall, ApiError> {
        let context = |c: Option<String>| c.as_deref().map(parse_context).transpose();
        let q = |n: Option<u8>| match n {
            Some(0) => Err(ApiError::bad_request(
                "bad_request",
                "w and r must be at least 1",
            )),
            n => Ok(n.unwrap_or(1)),
        };
        Ok(match self {
            BatchOp::Get { key, r } => (Request::Get { key: key.0 }, 1, q(r)?),
            BatchOp::Put {
                key,
                value,
                context: c,
                w,
                ..
            } => (
                Request::Put {
                    key: key.0,
                    value: value.0,
                    context: context(c)?,
                },
                q(w)?,
                1,
            ),
            BatchOp::PutLww { key, value, w, .. } => (
                Request::PutLww {
                    key: key.0,
                    value: value.0,
                },
                q(w)?,
                1,
            ),
            BatchOp::Delete {
                key, context: c, w, ..
            } => (
                Request::Delete {
                    key: key.0,
                    context: context(c)?,
                },
                q(w)?,
                1,
            ),
            BatchOp::CounterAdd { key, amount, w, .. } => {
                (Request::CounterAdd { key: key.0, amount }, q(w)?, 1)
            }
            BatchOp::CounterGet { key, r } => (Request::CounterGet { key: key.0 }, 1, q(r)?),
            BatchOp::SetAdd { key, member, w, .. } => (
                Request::SetAdd {
                    key: key.0,
                    member: member.0,
                },
                q(w)?,
                1,
            ),
            BatchOp::SetRemove { key, member, w, .. } => (
                Request::SetRemove {
                    key: key.0,
                    member: member.0,
                },
                q(w)?,
                1,
            ),
            BatchOp::SetMembers { key, r } => (Request::SetMembers { key: key.0 }, 1, q(r)?),
        })
    }
}

/// One result of a batch, as JSON: what the single-operation route would
/// answer, with its status.
fn batch_result(key: &[u8], result: Result<Response, ApiError>) -> serde_json::Value {
    let ok = |body: serde_json::Value| serde_json::json!({ "status": 200, "result": body });
    match result {
        Ok(Response::Record(Some(record))) => {
            ok(serde_json::to_value(JsonRecord::new(key, &record)).unwrap_or_default())
        }
        Ok(Response::Record(None)) => {
            let error = not_found(key);
            serde_json::json!({ "status": error.status.as_u16(), "error": error.body()["error"] })
        }
        Ok(Response::Context(context)) => {
            ok(serde_json::json!({ "context": context_text(&context) }))
        }
        Ok(Response::Counter(value)) => {
            ok(serde_json::json!({ "key": JsonBytes(key.to_vec()), "value": value }))
        }
        Ok(Response::Members(members)) => ok(serde_json::json!({
            "key": JsonBytes(key.to_vec()),
            "members": members.into_iter().map(JsonBytes).collect::<Vec<_>>(),
        })),
        Ok(other) => batch_result(key, Err(unexpected(other))),
        Err(error) => {
            serde_json::json!({ "status": error.status.as_u16(), "error": error.body()["error"] })
        }
    }
}

/// A device id as requests carry it: 1 to 16 hex digits.
pub(super) fn device_id(text: &str, code: &'static str) -> Result<u64, ApiError> {
    u64::from_str_radix(text, 16)
        .ok()
        .filter(|_| !text.is_empty() && text.len() <= 16 && !text.starts_with('+'))
        .ok_or_else(|| {
            ApiError::bad_request(
                code,
                format!("device {text:?}: expected 1 to 16 hex digits"),
            )
        })
}

/// Runs a batch: operations on the same key in the order given, operations
/// on different keys concurrently; one result per operation, in order.
async fn batch(
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
    let Batch { ops, device } = parse_json(&read_body(&headers, body, MAX_JSON_BYTES).await?)?;
    let device = device
        .map(|text| device_id(&text, "bad_json"))
        .transpose()?;
    if ops.len() > MAX_BATCH_OPS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the batch has {} operations; at most {MAX_BATCH_OPS} are allowed",
                ops.len()
            ),
        ));
    }
    let count = ops.len();
    // Per key, its operations in order: (index, call or why it is invalid).
    let mut by_key: BTreeMap<Vec<u8>, Vec<IndexedCall>> = BTreeMap::new();
    for (i, op) in ops.into_iter().enumerate() {
        // Each operation is checked against the token on its own.
        let call = op.pushed_call(device).and_then(|(request, w, r)| {
            let access = if request.is_write() {
                Access::Write
            } else {
                Access::Read
            };
            let key = request.key().unwrap_or_default();
            api.authorize(connection, &headers, key, access)?;
            Ok((request, w, r))
        });
        let key = match &call {
            Ok((request, _, _)) => request.key().unwrap_or_default().to_vec(),
            Err(_) => Vec::new(),
        };
        by_key.entry(key).or_default().push((i, call));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (key, calls) in by_key {
        let api = api.clone();
        tasks.spawn(async move {
            let mut results = Vec::new();
            // A device's writes of one key apply in order, or not at all:
            // the key records only the highest one applied, so a later
            // write applied before an earlier one would hide it for good.
            let mut held_back = false;
            for (i, call) in calls {
                let pushed_seq = match &call {
                    Ok((Request::Pushed { seq, .. }, _, _)) => Some(*seq),
                    _ => None,
                };
                let pushed = pushed_seq.is_some();
                let result = match call {
                    Ok(_) if pushed && held_back => Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "an earlier write of this key in this push was not applied; push both again",
                    )),
                    Ok((request, w, r)) => api.call(request, w, r).await,
                    Err(e) => Err(e),
                };
                held_back |= pushed && result.is_err();
                let applied = pushed_seq.filter(|_| result.is_ok());
                results.push((i, batch_result(&key, result), applied));
            }
            results
        });
    }
    let mut results = vec![serde_json::Value::Null; count];
    let (mut applied_writes, mut max_seq) = (0u64, 0u64);
    while let Some(done) = tasks.join_next().await {
        let done = done.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("a batch task failed: {e}"),
            )
        })?;
        for (i, result, applied) in done {
            results[i] = result;
            if let Some(seq) = applied {
                applied_writes += 1;
                max_seq = max_seq.max(seq);
            }
        }
    }
    if let Some(device) = device {
        let token = api.token_name(&headers);
        api.ledger.pushed(
            device,
            token,
            crate::node::admin::unix_ms(),
            applied_writes,
            max_seq,
        );
    }
    Ok(json_body(&serde_json::json!({ "results": results })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_strictly_and_may_hold_any_byte() {
        assert_eq!(percent_decode("key", "a%2Fb%00").unwrap(), b"a/b\0");
        assert_eq!(percent_decode("key", "user/42/x").unwrap(), b"user/42/x");
        for bad in ["%", "%4", "%zz", "a%g1"] {
            let e = percent_decode("key", bad).unwrap_err();
            assert_eq!(e.code, "bad_encoding", "{bad}");
        }
    }

    #[test]
    fn unknown_and_repeated_query_parameters_are_refused() {
        let uri: Uri = "/v1/kv/a?w=2&lww=true".parse().unwrap();
        let q = Query::parse(&uri, &["w", "lww"]).unwrap();
        assert_eq!(q.quorum("w").unwrap(), 2);
        assert!(q.flag("lww").unwrap());
        let uri: Uri = "/v1/kv/a?W=2".parse().unwrap();
        assert!(Query::parse(&uri, &["w"])
            .unwrap_err()
            .message
            .contains("\"W\""));
        let uri: Uri = "/v1/kv/a?w=1&w=2".parse().unwrap();
        assert!(Query::parse(&uri, &["w"]).is_err());
        let uri: Uri = "/v1/kv/a?w=0".parse().unwrap();
        assert!(Query::parse(&uri, &["w"]).unwrap().quorum("w").is_err());
    }
}
