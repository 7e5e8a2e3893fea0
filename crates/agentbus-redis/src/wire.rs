//! The stored form of a message: one stream-entry field `m` holding a compact binary
//! header followed by the payload bytes.
//!
//! Why not JSON: encoding and decoding the JSON header of every envelope was about a
//! tenth of the client's CPU in the Redis benchmark, and a larger entry costs the
//! server on every `XADD` and `XREADGROUP` (`docs/PERFORMANCE.md`, `## Redis`). One
//! field instead of several also means fewer reply strings for the client to parse.
//!
//! Layout (version 1; integers little-endian, `str` = LEB128 length + UTF-8 bytes):
//!
//! | bytes | what |
//! | --- | --- |
//! | 1 | version (1) |
//! | 2 | flags: which optional fields follow |
//! | 1 | priority 1–4 |
//! | 16 | id |
//! | 8 + 4 | timestamp: seconds, nanoseconds |
//! | LEB128 | attempt |
//! | str | kind |
//! | … | the optional fields, in flag order (see `F_*`) |
//! | rest | payload |
//!
//! The version byte lets the format evolve: a reader refuses a version it does not
//! know instead of misreading it. Decoding never panics: every length is checked
//! against what is left, and a bad entry is a [`WireError`].

use std::collections::BTreeMap;

use agentbus::{ChannelName, Header, MessageId, Priority};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The format version this code writes and reads.
pub(crate) const VERSION: u8 = 1;

const F_CORRELATION: u16 = 1 << 0;
const F_CAUSATION: u16 = 1 << 1;
const F_SENDER: u16 = 1 << 2;
const F_RECEIVER: u16 = 1 << 3;
const F_REPLY_TO: u16 = 1 << 4;
const F_DEADLINE: u16 = 1 << 5;
const F_NOT_BEFORE: u16 = 1 << 6;
const F_TENANT: u16 = 1 << 7;
const F_TRACE: u16 = 1 << 8;
const F_HEADERS: u16 = 1 << 9;
const F_CONTENT_TYPE: u16 = 1 << 10;
const KNOWN_FLAGS: u16 = (1 << 11) - 1;

/// The content type a header has when the flag is absent (the common case).
const DEFAULT_CONTENT_TYPE: &str = agentbus::envelope::CONTENT_TYPE_JSON;

/// Why a stored entry does not decode as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    /// The entry has no bytes at all.
    #[error("the entry is empty")]
    Empty,
    /// Written by a newer (or unrelated) writer.
    #[error("format version {0} is unknown (this reader knows version {VERSION})")]
    UnknownVersion(u8),
    /// Flags this reader does not know: a newer writer, or damage.
    #[error("unknown header flags {0:#06x}")]
    UnknownFlags(u16),
    /// The entry ends inside a field.
    #[error("the entry ends inside the {0}")]
    Truncated(&'static str),
    /// A length or number does not fit.
    #[error("the {0} is too large")]
    TooLarge(&'static str),
    /// Not a priority 1–4.
    #[error("priority {0} is not 1-4")]
    BadPriority(u8),
    /// A text field that is not UTF-8.
    #[error("the {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A time outside what a timestamp can hold.
    #[error("the {0} is not a valid time")]
    BadTime(&'static str),
    /// A `reply_to` that is not a valid channel name.
    #[error("reply_to is not a valid channel name: {0}")]
    BadChannel(String),
}

/// Encodes `header` and `payload` into one stored value.
#[cfg(test)]
pub(crate) fn encode(header: &Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + header.kind.len() + payload.len());
    encode_to(header, payload, &mut out);
    out
}

/// The stored value of a message as a command argument, written straight into the
/// command (no vector of its own).
pub(crate) struct Stored<'a> {
    /// The header.
    pub(crate) header: &'a Header,
    /// The payload bytes.
    pub(crate) payload: &'a [u8],
}

impl redis::ToRedisArgs for Stored<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        encode_to(self.header, self.payload, &mut Sink(&mut arg));
    }
}

/// Where `encode_to` writes: a vector, or a command's argument writer (which writes
/// into memory and cannot fail).
trait Put {
    fn put(&mut self, bytes: &[u8]);
    fn byte(&mut self, b: u8) {
        self.put(&[b]);
    }
}

impl Put for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

struct Sink<'a, W: std::io::Write>(&'a mut W);

impl<W: std::io::Write> Put for Sink<'_, W> {
    fn put(&mut self, bytes: &[u8]) {
        // redis-rs's argument writer appends to the command's buffer: it never fails.
        let _ = self.0.write_all(bytes);
    }
}

fn encode_to(header: &Header, payload: &[u8], out: &mut impl Put) {
    let mut flags = 0u16;
    let mut set = |present: bool, flag: u16| {
        if present {
            flags |= flag;
        }
    };
    set(header.correlation_id.is_some(), F_CORRELATION);
    set(header.causation_id.is_some(), F_CAUSATION);
    set(header.sender.is_some(), F_SENDER);
    set(header.receiver.is_some(), F_RECEIVER);
    set(header.reply_to.is_some(), F_REPLY_TO);
    set(header.deadline.is_some(), F_DEADLINE);
    set(header.not_before.is_some(), F_NOT_BEFORE);
    set(header.tenant.is_some(), F_TENANT);
    set(header.trace.is_some(), F_TRACE);
    set(!header.headers.is_empty(), F_HEADERS);
    set(header.content_type != DEFAULT_CONTENT_TYPE, F_CONTENT_TYPE);

    // The fixed part in one write.
    let mut fixed = [0u8; 32];
    fixed[0] = VERSION;
    fixed[1..3].copy_from_slice(&flags.to_le_bytes());
    fixed[3] = header.priority.as_u8();
    fixed[4..20].copy_from_slice(header.id.0.as_bytes());
    fixed[20..28].copy_from_slice(&header.timestamp.timestamp().to_le_bytes());
    fixed[28..32].copy_from_slice(&header.timestamp.timestamp_subsec_nanos().to_le_bytes());
    out.put(&fixed);
    put_varint(out, u64::from(header.attempt));
    put_str(out, &header.kind);
    if let Some(c) = &header.correlation_id {
        put_str(out, c);
    }
    if let Some(c) = &header.causation_id {
        out.put(c.0.as_bytes());
    }
    if let Some(s) = &header.sender {
        put_str(out, s);
    }
    if let Some(r) = &header.receiver {
        put_str(out, r);
    }
    if let Some(r) = &header.reply_to {
        put_str(out, r.as_str());
    }
    if let Some(t) = header.deadline {
        put_time(out, t);
    }
    if let Some(t) = header.not_before {
        put_time(out, t);
    }
    if let Some(t) = &header.tenant {
        put_str(out, t);
    }
    if let Some(t) = &header.trace {
        put_str(out, t);
    }
    if !header.headers.is_empty() {
        put_varint(out, header.headers.len() as u64);
        for (k, v) in &header.headers {
            put_str(out, k);
            put_str(out, v);
        }
    }
    if flags & F_CONTENT_TYPE != 0 {
        put_str(out, &header.content_type);
    }
    out.put(payload);
}

/// Decodes a stored value into its header and payload; the payload shares `blob`'s
/// memory (no copy).
///
/// # Errors
/// A [`WireError`] saying what is wrong; never a panic, whatever the bytes.
pub(crate) fn decode(blob: &Bytes) -> Result<(Header, Bytes), WireError> {
    let mut r = Reader { buf: blob, at: 0 };
    let version = r.byte("version").map_err(|_| WireError::Empty)?;
    if version != VERSION {
        return Err(WireError::UnknownVersion(version));
    }
    let flags = u16::from_le_bytes(r.array("flags")?);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    let priority = r.byte("priority")?;
    let priority = Priority::from_u8(priority).map_err(|_| WireError::BadPriority(priority))?;
    let id = MessageId(Uuid::from_bytes(r.array("id")?));
    let timestamp = r.time("timestamp")?;
    let attempt =
        u32::try_from(r.varint("attempt")?).map_err(|_| WireError::TooLarge("attempt"))?;
    let kind = r.string("kind")?;
    let has = |flag: u16| flags & flag != 0;
    let correlation_id = has(F_CORRELATION)
        .then(|| r.string("correlation id"))
        .transpose()?;
    let causation_id = has(F_CAUSATION)
        .then(|| {
            r.array("causation id")
                .map(|b| MessageId(Uuid::from_bytes(b)))
        })
        .transpose()?;
    let sender = has(F_SENDER).then(|| r.string("sender")).transpose()?;
    let receiver = has(F_RECEIVER).then(|| r.string("receiver")).transpose()?;
    let reply_to = has(F_REPLY_TO)
        .then(|| {
            let name = r.string("reply_to")?;
            ChannelName::new(&name).map_err(|_| WireError::BadChannel(name))
        })
        .transpose()?;
    let deadline = has(F_DEADLINE).then(|| r.time("deadline")).transpose()?;
    let not_before = has(F_NOT_BEFORE)
        .then(|| r.time("not_before"))
        .transpose()?;
    let tenant = has(F_TENANT).then(|| r.string("tenant")).transpose()?;
    let trace = has(F_TRACE).then(|| r.string("trace")).transpose()?;
    let mut headers = BTreeMap::new();
    if has(F_HEADERS) {
        let n = r.varint("header count")?;
        for _ in 0..n {
            let k = r.string("header name")?;
            let v = r.string("header value")?;
            headers.insert(k, v);
        }
    }
    let content_type = if has(F_CONTENT_TYPE) {
        r.string("content type")?.into()
    } else {
        std::borrow::Cow::Borrowed(DEFAULT_CONTENT_TYPE)
    };
    let payload = blob.slice(r.at..);
    Ok((
        Header {
            id,
            correlation_id,
            causation_id,
            timestamp,
            sender,
            receiver,
            kind,
            priority,
            reply_to,
            deadline,
            not_before,
            attempt,
            tenant,
            trace,
            headers,
            content_type,
        },
        payload,
    ))
}

fn put_varint(out: &mut impl Put, mut n: u64) {
    while n >= 0x80 {
        out.byte((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.byte(n as u8);
}

fn put_str(out: &mut impl Put, s: &str) {
    put_varint(out, s.len() as u64);
    out.put(s.as_bytes());
}

fn put_time(out: &mut impl Put, t: DateTime<Utc>) {
    out.put(&t.timestamp().to_le_bytes());
    out.put(&t.timestamp_subsec_nanos().to_le_bytes());
}

/// A cursor over an entry that checks every length against what is left.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], WireError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(WireError::Truncated(what))?;
        let bytes = &self.buf[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte(what)?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(WireError::TooLarge(what));
            }
            n |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(WireError::TooLarge(what))
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = usize::try_from(self.varint(what)?).map_err(|_| WireError::TooLarge(what))?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::NotUtf8(what))
    }

    fn time(&mut self, what: &'static str) -> Result<DateTime<Utc>, WireError> {
        let secs = i64::from_le_bytes(self.array(what)?);
        let nanos = u32::from_le_bytes(self.array(what)?);
        DateTime::from_timestamp(secs, nanos).ok_or(WireError::BadTime(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full_header() -> Header {
        let mut h = Header::new("vehicle.data");
        h.correlation_id = Some("thread-7".into());
        h.causation_id = Some(MessageId::new());
        h.sender = Some("agent-a".into());
        h.receiver = Some("agent-b".into());
        h.priority = Priority::Critical;
        h.reply_to = Some(ChannelName::new("_inbox.abc").unwrap());
        h.deadline = Some(h.timestamp + chrono::Duration::seconds(30));
        h.not_before = Some(h.timestamp + chrono::Duration::milliseconds(5));
        h.attempt = 3;
        h.tenant = Some("acme".into());
        h.trace = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        h.headers.insert("k".into(), "v".into());
        h.headers.insert("ü".into(), String::new());
        h.content_type = "application/x-protobuf".into();
        h
    }

    #[test]
    fn a_full_header_round_trips_and_the_payload_is_shared() {
        let h = full_header();
        let blob = Bytes::from(encode(&h, b"payload"));
        let (back, payload) = decode(&blob).unwrap();
        assert_eq!(back, h);
        assert_eq!(&payload[..], b"payload");
        assert_eq!(payload.as_ptr(), blob[blob.len() - 7..].as_ptr(), "no copy");
    }

    #[test]
    fn the_command_argument_is_the_encoded_message() {
        let h = full_header();
        let mut cmd = redis::cmd("X");
        cmd.arg(Stored {
            header: &h,
            payload: b"body",
        });
        let args: Vec<&[u8]> = cmd
            .args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(b),
                _ => None,
            })
            .collect();
        assert_eq!(args[1], &encode(&h, b"body")[..]);
    }

    #[test]
    fn a_plain_header_is_small() {
        let h = Header::new("bench");
        let blob = encode(&h, b"");
        // version, flags, priority, id, timestamp, attempt, kind
        assert_eq!(blob.len(), 1 + 2 + 1 + 16 + 12 + 1 + 1 + 5);
        assert_eq!(decode(&Bytes::from(blob)).unwrap().0, h);
    }

    #[test]
    fn damaged_entries_are_errors_not_panics() {
        let blob = encode(&full_header(), b"xyz");
        assert_eq!(decode(&Bytes::new()), Err(WireError::Empty));
        let mut other = blob.clone();
        other[0] = 9;
        assert_eq!(
            decode(&Bytes::from(other)),
            Err(WireError::UnknownVersion(9))
        );
        let mut flags = blob.clone();
        flags[2] = 0xf8;
        assert!(matches!(
            decode(&Bytes::from(flags)),
            Err(WireError::UnknownFlags(_))
        ));
        let mut prio = blob.clone();
        prio[3] = 7;
        assert_eq!(decode(&Bytes::from(prio)), Err(WireError::BadPriority(7)));
        // Every cut inside the header is an error (the payload may be cut anywhere).
        let header_len = blob.len() - 3;
        for cut in 1..header_len {
            assert!(
                decode(&Bytes::copy_from_slice(&blob[..cut])).is_err(),
                "a header cut at {cut} of {header_len} bytes decoded"
            );
        }
        let mut long = vec![VERSION, 0, 0, 2];
        long.extend_from_slice(&[0; 28]);
        long.extend_from_slice(&[0xff; 11]);
        assert!(matches!(
            decode(&Bytes::from(long)),
            Err(WireError::TooLarge(_))
        ));
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(".{0,40}")
    }

    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        (-62_000_000_000i64..250_000_000_000i64, 0u32..1_000_000_000)
            .prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap())
    }

    prop_compose! {
        fn header()(
            id in any::<u128>(),
            cause in proptest::option::of(any::<u128>()),
            timestamp in time(),
            correlation_id in opt_text(),
            sender in opt_text(),
            receiver in opt_text(),
            kind in ".{0,30}",
            priority in 1u8..=4,
            reply_to in proptest::option::of("[a-z0-9_-]{1,8}(\\.[a-z0-9_-]{1,8}){0,3}"),
            deadline in proptest::option::of(time()),
            not_before in proptest::option::of(time()),
            attempt in any::<u32>(),
            tenant in opt_text(),
            trace in opt_text(),
            headers in proptest::collection::btree_map(".{0,10}", ".{0,20}", 0..4),
            content_type in prop_oneof![Just(DEFAULT_CONTENT_TYPE.to_string()), ".{0,20}"],
        ) -> Header {
            Header {
                id: MessageId(Uuid::from_u128(id)),
                correlation_id,
                causation_id: cause.map(|c| MessageId(Uuid::from_u128(c))),
                timestamp,
                sender,
                receiver,
                kind,
                priority: Priority::from_u8(priority).unwrap(),
                reply_to: reply_to.map(|r| ChannelName::new(r).unwrap()),
                deadline,
                not_before,
                attempt,
                tenant,
                trace,
                headers,
                content_type: content_type.into(),
            }
        }
    }

    proptest! {
        #[test]
        fn any_header_round_trips(h in header(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let blob = Bytes::from(encode(&h, &payload));
            let (back, body) = decode(&blob).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(&body[..], &payload[..]);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&Bytes::from(bytes));
        }

        #[test]
        fn damaged_headers_never_panic(h in header(), at in any::<usize>(), byte in any::<u8>()) {
            let mut blob = encode(&h, b"p");
            let i = at % blob.len();
            blob[i] = byte;
            let _ = decode(&Bytes::from(blob));
        }
    }
}
