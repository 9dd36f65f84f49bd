//! The JSON shapes of the HTTP API: values as they travel, records, and
//! errors with their HTTP status.
//!
//! Bytes (keys, values, set members) are a JSON string when they are valid
//! UTF-8 and `{"base64": "..."}` (standard alphabet, padded) otherwise; a
//! request may use either form anywhere bytes are expected. Readable for
//! `curl` users, binary-safe for programs.

use crate::client::{ErrorCode, Failure, WireRecord};
use crate::crdt::Value;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The header carrying a causal context token, in requests and responses.
pub const CONTEXT_HEADER: &str = "gossipkv-context";

/// Bytes in JSON (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonBytes(pub Vec<u8>);

impl Serialize for JsonBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&self.0);
                #[derive(Serialize)]
                struct Base64<'a> {
                    base64: &'a str,
                }
                Base64 { base64: &encoded }.serialize(serializer)
            }
        }
    }
}

impl<'de> Deserialize<'de> for JsonBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Base64 { base64: String },
        }
        match Form::deserialize(deserializer)
            .map_err(|_| D::Error::custom("expected a string or {\"base64\": \"...\"}"))?
        {
            Form::Text(text) => Ok(JsonBytes(text.into_bytes())),
            Form::Base64 { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64.as_bytes())
                .map(JsonBytes)
                .map_err(|e| D::Error::custom(format!("invalid base64: {e}"))),
        }
    }
}

fn bytes_list(values: &[Vec<u8>]) -> Vec<JsonBytes> {
    values.iter().cloned().map(JsonBytes).collect()
}

/// One value of a key, by kind.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JsonValue {
    /// Several values when writes were concurrent (siblings).
    Register {
        values: Vec<JsonBytes>,
    },
    Lww {
        value: JsonBytes,
    },
    Counter {
        value: i64,
    },
    Set {
        members: Vec<JsonBytes>,
    },
}

impl From<&Value> for JsonValue {
    fn from(value: &Value) -> JsonValue {
        match value {
            Value::Register(values) => JsonValue::Register {
                values: bytes_list(values),
            },
            Value::Lww(value) => JsonValue::Lww {
                value: JsonBytes(value.clone()),
            },
            Value::Counter(value) => JsonValue::Counter { value: *value },
            Value::Set(members) => JsonValue::Set {
                members: bytes_list(members),
            },
        }
    }
}

/// A read: the key, its value, the context to write back with, and any
/// other kinds the key also holds (written concurrently as another kind).
#[derive(Debug, Serialize)]
pub struct JsonRecord {
    pub key: JsonBytes,
    #[serde(flatten)]
    pub value: JsonValue,
    pub context: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_kinds: Vec<JsonValue>,
}

impl JsonRecord {
    pub fn new(key: &[u8], record: &WireRecord) -> JsonRecord {
        JsonRecord {
            key: JsonBytes(key.to_vec()),
            value: JsonValue::from(&record.value),
            context: context_text(&record.context),
            other_kinds: record.other_kinds.iter().map(JsonValue::from).collect(),
        }
    }
}

/// A context token's text form (URL-safe base64), from its bytes.
pub fn context_text(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A failed HTTP request: status, a stable code for programs, a message
/// for people, and for `quorum_not_met` how many replicas were reached.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub quorum: Option<(u8, u8)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            quorum: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The HTTP form of a node's answer.
    pub fn of(failure: Failure) -> ApiError {
        let (status, code) = match failure.code {
            ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorCode::WrongType => (StatusCode::CONFLICT, "wrong_type"),
            ErrorCode::BadToken => (StatusCode::BAD_REQUEST, "bad_context"),
            ErrorCode::QuorumNotMet { .. } => (StatusCode::SERVICE_UNAVAILABLE, "quorum_not_met"),
            ErrorCode::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ErrorCode::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ErrorCode::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let quorum = match failure.code {
            ErrorCode::QuorumNotMet { reached, needed } => Some((reached, needed)),
            _ => None,
        };
        ApiError {
            status,
            code,
            message: failure.message,
            quorum,
        }
    }

    /// The JSON body: `{"error": {"code", "message"[, "reached", "needed"]}}`.
    pub fn body(&self) -> serde_json::Value {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some((reached, needed)) = self.quorum {
            error["reached"] = reached.into();
            error["needed"] = needed.into();
        }
        serde_json::json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        let mut response = (self.status, json_body(&self.body())).into_response();
        if retry {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        response
    }
}

/// A JSON response body with its content type.
pub fn json_body(value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            [(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the response failed: {e}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_text_when_utf8_and_base64_otherwise_both_ways() {
        let text = serde_json::to_string(&JsonBytes(b"hello".to_vec())).unwrap();
        assert_eq!(text, "\"hello\"");
        let binary = serde_json::to_string(&JsonBytes(vec![0xff, 0])).unwrap();
        assert_eq!(binary, r#"{"base64":"/wA="}"#);
        for json in [text, binary] {
            let back: JsonBytes = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        assert!(serde_json::from_str::<JsonBytes>(r#"{"base64":"%%"}"#).is_err());
        assert!(serde_json::from_str::<JsonBytes>("12").is_err());
    }

    #[test]
    fn quorum_failures_say_how_many_replicas_hold_the_write() {
        let error = ApiError::of(Failure::new(
            ErrorCode::QuorumNotMet {
                reached: 1,
                needed: 2,
            },
            "1 of 2",
        ));
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        let body = error.body();
        assert_eq!(body["error"]["code"], "quorum_not_met");
        assert_eq!(body["error"]["reached"], 1);
        assert_eq!(body["error"]["needed"], 2);
    }
}
