//! Small helpers: reading script replies, times, errors.

use std::collections::HashMap;

use agentbus::{Error, ErrorKind};
use chrono::{DateTime, Utc};
use redis::Value;

/// Milliseconds since the epoch.
pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// A duration in milliseconds that the scripts' numbers (doubles) hold exactly and
/// Redis accepts as a 64-bit integer: durations beyond 2^53 ms (285,000 years) are
/// clamped.
pub(crate) fn lua_ms(d: std::time::Duration) -> u64 {
    d.as_millis().min(1 << 53) as u64
}

/// The elements of an array reply (empty for anything else).
pub(crate) fn arr(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// An integer reply, or a string holding one; 0 otherwise.
pub(crate) fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        Value::SimpleString(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// The bytes of a string reply.
pub(crate) fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A reply as text (lossy).
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::Int(n) => n.to_string(),
        other => bytes(other)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
    }
}

/// A reply as text, `none` when empty.
pub(crate) fn str_of(v: &Value) -> String {
    let t = text(v);
    if t.is_empty() {
        "none".into()
    } else {
        t
    }
}

/// A flat `[name, value, name, value…]` reply (or a RESP3 map) as a map.
pub(crate) fn value_map(v: &Value) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    match v {
        Value::Map(pairs) => {
            for (k, v) in pairs {
                out.insert(text(k), text_bytes(v));
            }
        }
        other => {
            for pair in arr(other).chunks(2) {
                if let [k, v] = pair {
                    out.insert(text(k), text_bytes(v));
                }
            }
        }
    }
    out
}

fn text_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::Int(n) => n.to_string().into_bytes(),
        other => bytes(other).map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

/// A redis failure as a `Backend` error that says what was attempted and what to do.
pub(crate) fn backend_error(url: &str, op: &str, e: redis::RedisError) -> Error {
    let temporary =
        e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal();
    Error::new(
        ErrorKind::Backend,
        format!(
            "redis {op} at {url} failed: {e}; {}",
            if temporary {
                "the server is unreachable or restarting — the client reconnects with backoff, \
                 retry the operation (a failed publish may or may not have been stored)"
            } else {
                "check the server's logs and that it is Redis 7 or later"
            }
        ),
    )
    .with_context("backend", "redis")
    .set_temporary(temporary)
    .with_source(e)
}
