//! The envelope: a header every message carries, and the payload bytes.
//!
//! The envelope's JSON form is a compatibility promise (it is what the CLI prints, what
//! dead letters keep and what backends store), so fields are only ever added, with
//! defaults, never renamed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::channel::ChannelName;
use crate::error::{Error, ErrorKind, Result};

/// How urgent a message is. Among ready messages, higher priority is delivered first.
///
/// Parses from names (`low`, `normal`, `high`, `critical`, any case) and numbers 1–4.
///
/// # Examples
///
/// ```
/// use agentbus::Priority;
///
/// assert_eq!("critical".parse::<Priority>()?, Priority::Critical);
/// assert_eq!("2".parse::<Priority>()?, Priority::Normal);
/// assert!(Priority::High > Priority::Normal);
/// # Ok::<(), agentbus::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// 1: feedback processing, insights generation.
    Low = 1,
    /// 2: regular work. The default.
    #[default]
    Normal = 2,
    /// 3: predicted failures, urgent scheduling.
    High = 3,
    /// 4: system failures, safety issues.
    Critical = 4,
}

impl Priority {
    /// All priorities, highest first: the order in which lanes are served.
    pub const HIGHEST_FIRST: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    /// The number 1–4.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// The priority numbered `n` (1–4).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] outside 1–4.
    pub fn from_u8(n: u8) -> Result<Self> {
        Ok(match n {
            1 => Priority::Low,
            2 => Priority::Normal,
            3 => Priority::High,
            4 => Priority::Critical,
            _ => return Err(Self::bad(&n.to_string())),
        })
    }

    /// Index 0 (low) to 3 (critical), for lane arrays.
    pub(crate) fn lane(self) -> usize {
        self as usize - 1
    }

    fn bad(input: &str) -> Error {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "invalid priority '{input}': use low, normal, high or critical, or a number 1-4"
            ),
        )
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" | "1" => Ok(Priority::Low),
            "normal" | "2" => Ok(Priority::Normal),
            "high" | "3" => Ok(Priority::High),
            "critical" | "4" => Ok(Priority::Critical),
            _ => Err(Self::bad(s)),
        }
    }
}

impl Serialize for Priority {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Priority {
    /// A name (`"high"`) or a level (`3`). A visitor rather than an untagged enum:
    /// this runs for every header a backend decodes, and an untagged enum buffers the
    /// value and builds an error for each variant that does not match.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Priority;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a priority: low, normal, high, critical or 1-4")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Priority, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Priority, E> {
                u8::try_from(v)
                    .ok()
                    .and_then(|n| Priority::from_u8(n).ok())
                    .ok_or_else(|| E::custom(format!("priority {v} is not 1-4")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Priority, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("priority {v} is not 1-4")))
                    .and_then(|v| self.visit_u64(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A message id: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self::new_at(std::time::SystemTime::now())
    }

    /// A fresh id whose time part is `now`; ids made on one thread in the same
    /// millisecond still sort in creation order.
    ///
    /// Header construction reads the clock once and uses it for both the id and the
    /// timestamp. The counter context is per thread, so making ids never contends on
    /// a lock shared by every thread (as `Uuid::now_v7` does).
    pub fn new_at(now: std::time::SystemTime) -> Self {
        let since_epoch = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self::from_unix(since_epoch.as_secs(), since_epoch.subsec_nanos())
    }

    /// A fresh id whose time part is Unix time `secs` and `nanos`.
    fn from_unix(secs: u64, nanos: u32) -> Self {
        thread_local! {
            static CONTEXT: uuid::ContextV7 = const { uuid::ContextV7::new() };
        }
        let timestamp = CONTEXT.with(|context| uuid::Timestamp::from_unix(context, secs, nanos));
        MessageId(Uuid::new_v7(timestamp))
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl FromStr for MessageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse_str(s.trim()).map(MessageId).map_err(|e| {
            Error::invalid_input(format!("invalid message id '{s}': expected a UUID ({e})"))
        })
    }
}

/// The header every message carries (seeds 000 and 001 merged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Unique, time-ordered id; also the dedup key.
    pub id: MessageId,
    /// The thread or workflow this message belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The id of the message this one answers or was caused by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<MessageId>,
    /// When the message was created.
    pub timestamp: DateTime<Utc>,
    /// The sending agent's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The intended receiving agent's id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver: Option<String>,
    /// The message type name, e.g. `vehicle.data`.
    pub kind: String,
    /// Delivery priority.
    #[serde(default)]
    pub priority: Priority,
    /// Where replies go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ChannelName>,
    /// After this instant the message is never delivered; it is dead-lettered `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// Not delivered before this instant (delayed delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// Delivery count of this delivery, set by the bus: 1 on first delivery.
    #[serde(default)]
    pub attempt: u32,
    /// Tenant for multi-tenant deployments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// W3C `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Free-form headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The payload's media type; `application/json` by default. A `Cow` so that the
    /// default costs no allocation: every header a backend decodes has one.
    #[serde(default = "default_content_type")]
    pub content_type: Cow<'static, str>,
}

fn default_content_type() -> Cow<'static, str> {
    Cow::Borrowed(CONTENT_TYPE_JSON)
}

/// The default content type.
pub const CONTENT_TYPE_JSON: &str = "application/json";

impl Header {
    /// A header with a fresh id, the current time, `kind` and defaults elsewhere.
    pub fn new(kind: impl Into<String>) -> Self {
        Self::new_at(kind, Utc::now())
    }

    /// A header with a fresh id made at `now`, timestamp `now`, `kind` and defaults
    /// elsewhere: what a [`Bus`](crate::Bus) builds with the time of its own clock
    /// (one clock read per message, not three).
    ///
    /// # Examples
    ///
    /// ```
    /// use agentbus::Header;
    /// use chrono::Utc;
    ///
    /// let now = Utc::now();
    /// let header = Header::new_at("vehicle.data", now);
    /// assert_eq!(header.timestamp, now);
    /// assert!(header.id < Header::new_at("vehicle.data", now).id);
    /// ```
    pub fn new_at(kind: impl Into<String>, now: DateTime<Utc>) -> Self {
        // Before 1970 (only a manual clock goes there), the id's time part is 0.
        let secs = u64::try_from(now.timestamp()).unwrap_or(0);
        Header {
            id: MessageId::from_unix(secs, now.timestamp_subsec_nanos()),
            correlation_id: None,
            causation_id: None,
            timestamp: now,
            sender: None,
            receiver: None,
            kind: kind.into(),
            priority: Priority::Normal,
            reply_to: None,
            deadline: None,
            not_before: None,
            attempt: 0,
            tenant: None,
            trace: None,
            headers: BTreeMap::new(),
            content_type: default_content_type(),
        }
    }
}

/// A message as it travels: channel, header and payload bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The channel it is published on.
    pub channel: ChannelName,
    /// The header.
    pub header: Header,
    /// The encoded payload (JSON unless `content_type` says otherwise).
    #[serde(with = "payload_serde")]
    pub payload: Bytes,
}

impl Envelope {
    /// A new envelope with a fresh header of `kind`.
    pub fn new(channel: ChannelName, kind: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Envelope {
            channel,
            header: Header::new(kind),
            payload: payload.into(),
        }
    }

    /// A JSON envelope for `value`.
    ///
    /// # Errors
    /// [`ErrorKind::Schema`] if `value` cannot be serialized.
    pub fn json<T: Serialize>(channel: ChannelName, kind: &str, value: &T) -> Result<Self> {
        Ok(Envelope::new(channel, kind, json_payload(kind, value)?))
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.header.priority = priority;
        self
    }

    /// Sets the deadline to now + `ttl`.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.header.deadline = Some(later(self.header.timestamp, ttl));
        self
    }

    /// Delays delivery until timestamp + `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.header.not_before = Some(later(self.header.timestamp, delay));
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation(mut self, correlation: impl Into<String>) -> Self {
        self.header.correlation_id = Some(correlation.into());
        self
    }

    /// Sets the sender.
    pub fn with_sender(mut self, sender: impl Into<String>) -> Self {
        self.header.sender = Some(sender.into());
        self
    }

    /// Decodes the JSON payload as `T`.
    ///
    /// # Errors
    /// [`ErrorKind::Schema`] naming the kind and the decode error.
    pub fn decode_json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::new(
                ErrorKind::Schema,
                format!(
                    "payload of kind '{}' on channel '{}' does not decode: {e}",
                    self.header.kind, self.channel
                ),
            )
            .with_context("message_id", self.header.id)
        })
    }

    /// The payload's approximate size in memory, for retention accounting.
    pub fn size_bytes(&self) -> usize {
        self.payload.len() + self.header.kind.len() + self.channel.as_str().len() + 160
    }
}

/// `value` as a JSON payload of a message of `kind`.
///
/// # Errors
/// [`ErrorKind::Schema`] if `value` cannot be serialized.
pub(crate) fn json_payload<T: Serialize>(kind: &str, value: &T) -> Result<Bytes> {
    serde_json::to_vec(value).map(Bytes::from).map_err(|e| {
        Error::new(
            ErrorKind::Schema,
            format!("could not encode a '{kind}' payload as JSON: {e}"),
        )
    })
}

/// Converts a std duration into a chrono one, saturating instead of panicking.
pub(crate) fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// `at + d`, saturating at the end of representable time instead of panicking, so a
/// huge ttl or delay means "never" rather than a crash.
pub(crate) fn later(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    at.checked_add_signed(chrono_duration(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `at - d`, saturating at the start of representable time.
pub(crate) fn earlier(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    at.checked_sub_signed(chrono_duration(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The payload is JSON text in the envelope's JSON form when it is valid UTF-8 JSON,
/// and a `{"base64": ...}`-free byte array otherwise, so humans can read what they
/// published.
mod payload_serde {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(payload: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(value) => value.serialize(s),
            Err(_) => serde_json::json!({ "$bytes": payload.to_vec() }).serialize(s),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        if let Some(bytes) = value
            .as_object()
            .filter(|o| o.len() == 1)
            .and_then(|o| o.get("$bytes"))
        {
            let raw: Vec<u8> =
                serde_json::from_value(bytes.clone()).map_err(serde::de::Error::custom)?;
            return Ok(Bytes::from(raw));
        }
        serde_json::to_vec(&value)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// Why a message went to dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// Delivered `max_deliveries` times without being acked.
    MaxDeliveries,
    /// Its deadline passed before it could be delivered.
    Expired,
    /// The payload did not decode for its kind, or the kind is not registered.
    Schema,
    /// A consumer rejected it.
    Rejected,
}

impl DeadReason {
    /// The stable name (`max_deliveries`, `expired`, `schema`, `rejected`).
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadReason::MaxDeliveries => "max_deliveries",
            DeadReason::Expired => "expired",
            DeadReason::Schema => "schema",
            DeadReason::Rejected => "rejected",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_on_one_thread_sort_in_creation_order_and_carry_the_header_time() {
        let ids: Vec<MessageId> = (0..10_000).map(|_| MessageId::new()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids are strictly increasing"
        );
        let header = Header::new("k");
        let id_millis = header.id.0.get_timestamp().unwrap().to_unix();
        let id_millis = id_millis.0 * 1000 + u64::from(id_millis.1) / 1_000_000;
        assert_eq!(id_millis as i64, header.timestamp.timestamp_millis());
    }

    #[test]
    fn priority_parses_names_and_numbers() {
        for (text, p) in [
            ("low", Priority::Low),
            ("NORMAL", Priority::Normal),
            ("3", Priority::High),
            ("critical", Priority::Critical),
        ] {
            assert_eq!(text.parse::<Priority>().unwrap(), p);
        }
        let e = "urgent".parse::<Priority>().unwrap_err();
        assert!(e.to_string().contains("low, normal, high or critical"));
        assert!(Priority::from_u8(0).is_err());
        assert!(Priority::from_u8(5).is_err());
        let p: Priority = serde_json::from_str("4").unwrap();
        assert_eq!(p, Priority::Critical);
        let p: Priority = serde_json::from_str("\"high\"").unwrap();
        assert_eq!(p, Priority::High);
        for bad in ["9", "-1", "\"urgent\"", "true", "1.5"] {
            assert!(serde_json::from_str::<Priority>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn envelope_json_round_trip_keeps_every_field() {
        let mut env = Envelope::json(
            ChannelName::new("a.b").unwrap(),
            "k",
            &serde_json::json!({"x": 1}),
        )
        .unwrap()
        .with_priority(Priority::High)
        .with_ttl(Duration::from_secs(5))
        .with_delay(Duration::from_secs(1))
        .with_correlation("c-1")
        .with_sender("me");
        env.header.headers.insert("h".into(), "v".into());
        env.header.causation_id = Some(MessageId::new());
        env.header.trace = Some("00-abc-def-01".into());
        let text = serde_json::to_string(&env).unwrap();
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back, env);

        let raw = Envelope::new(ChannelName::new("a").unwrap(), "bin", vec![0u8, 255, 3]);
        let back: Envelope = serde_json::from_str(&serde_json::to_string(&raw).unwrap()).unwrap();
        assert_eq!(back.payload, raw.payload);
    }

    #[test]
    fn ids_sort_by_time() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a.0.get_version_num(), 7);
    }
}
