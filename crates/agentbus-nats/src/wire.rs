//! How an envelope travels in a NATS message, and how names map to subjects.
//!
//! A message on the stream has the subject `<prefix>.<lane>.<channel>` (lane = the
//! priority digit, 4 = critical … 1 = low) and, as its payload, the "frame": the
//! envelope's header in a compact text form (below), a line feed, then the envelope's
//! payload (see [`encode_frame`]). Its only NATS header is the id as `Nats-Msg-Id`
//! (JetStream's dedup key), on channels that dedup. Core requests and replies (never
//! stored) carry the same frame. The header is not a NATS header because async-nats
//! builds a hash map for every message that has headers: on the consume path that was
//! about 4,900 instructions per message, the largest cost agentbus added over raw
//! async-nats (docs/NATS.md "The frame").
//!
//! # The header (version 1)
//!
//! `1;id=<uuid>;ts=<secs>.<nanos>;kind=<kind>;p=<1-4>[;<key>=<value>]…`: a version
//! token, then `key=value` fields separated by `;`. It replaced a JSON header
//! (`Agentbus-Header`) because JSON cost about 9,000 instructions to encode and about
//! 7,500 to decode per message (chrono's RFC 3339 formatting and parsing, string
//! escaping): four times per request/reply round trip. This form is read in one pass
//! with no allocation beyond the header's own strings, and stays readable in
//! `nats sub` output.
//!
//! - Times are Unix seconds and nanoseconds (`1764117773.560487515`): exact for every
//!   instant chrono can hold, and integers are cheaper than RFC 3339 both ways.
//! - Optional fields, written only when set: `corr` (correlation id), `cause`
//!   (causation id), `from` (sender), `to` (receiver), `reply` (reply_to), `dl`
//!   (deadline), `nb` (not_before), `att` (attempt, when not 0), `tenant`, `tp` (W3C
//!   traceparent), `ct` (content type, when not `application/json`), and one
//!   `h.<name>=<value>` per free header.
//! - In names and values, `%`, `;`, `=`, space, control characters and every
//!   non-ASCII byte are percent-encoded (`%3B`), so a value can hold any text and the
//!   header stays plain ASCII on one line: the frame's first line feed ends it.
//! - A decoder ignores keys it does not know (a later minor addition is dropped, not
//!   fatal); anything whose meaning would change for an old reader gets a new version
//!   token, which old readers refuse with a `Schema` error.
//!
//! Messages written before the frame are still read: those whose header is the NATS
//! header `Agentbus` (this same text) or, older still, the JSON `Agentbus-Header`;
//! their payload is the NATS payload, untouched.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use agentbus::{
    ChannelName, Envelope, Error, ErrorKind, Header, MessageId, Priority, Result, CONTENT_TYPE_JSON,
};
use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};

/// The NATS header that carried the agentbus header (compact form, see the module
/// documentation) before the frame; still read.
pub(crate) const HEADER: &str = "Agentbus";

/// [`HEADER`] as a header name made once: a `&str` key is copied into a new name on
/// every insert and lookup.
const HEADER_NAME: HeaderName = HeaderName::from_static(HEADER);

/// The JSON header of messages written before the compact form; still decoded.
pub(crate) const LEGACY_HEADER: &str = "Agentbus-Header";

/// The version token the compact form starts with.
const VERSION: &str = "1";

/// Priority lanes, highest first: the order a consumer looks at them.
pub(crate) const LANES: [Priority; 4] = [
    Priority::Critical,
    Priority::High,
    Priority::Normal,
    Priority::Low,
];

/// The subject a channel's messages of `priority` are stored under.
pub(crate) fn subject(prefix: &str, priority: Priority, channel: &str) -> String {
    lane_subject(prefix, priority, channel)
}

/// The subject filter of one lane of a pattern (our `*`/`>` are NATS's).
pub(crate) fn lane_filter(prefix: &str, priority: Priority, pattern: &str) -> String {
    lane_subject(prefix, priority, pattern)
}

/// `<prefix>.<lane digit>.<rest>`, built by hand: with `format!`'s machinery a
/// publish cost about 1,300 instructions more (callgrind), once per message.
fn lane_subject(prefix: &str, priority: Priority, rest: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + rest.len() + 3);
    out.push_str(prefix);
    out.push('.');
    out.push(char::from(b'0' + priority.as_u8()));
    out.push('.');
    out.push_str(rest);
    out
}

/// The channel part of a stored subject, or `None` for a subject outside the layout.
pub(crate) fn channel_str<'s>(prefix: &str, subject: &'s str) -> Option<&'s str> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (lane, channel) = rest.split_once('.')?;
    if lane.len() == 1 && matches!(lane.as_bytes()[0], b'1'..=b'4') {
        Some(channel)
    } else {
        None
    }
}

/// The channel a stored subject belongs to, or `None` for a subject outside the layout.
pub(crate) fn channel_of(prefix: &str, subject: &str) -> Option<String> {
    channel_str(prefix, subject).map(str::to_string)
}

/// A message as it is stored: the frame (see [`encode_frame`]) as the payload and,
/// with `dedup`, the id as JetStream's dedup key `Nats-Msg-Id`, the only NATS header
/// (none for a channel whose dedup window is zero: a message without headers is the
/// cheapest NATS message to send and to read).
pub(crate) fn encode(envelope: &Envelope, dedup: bool) -> (Option<HeaderMap>, Bytes) {
    let headers = dedup.then(|| {
        let mut headers = HeaderMap::new();
        let mut id = uuid::Uuid::encode_buffer();
        let id = envelope.header.id.0.hyphenated().encode_lower(&mut id);
        headers.insert(NATS_MESSAGE_ID, &*id);
        headers
    });
    (headers, encode_frame(envelope))
}

/// The compact text form of `header` (see the module documentation), as a string of
/// its own: what messages written before the frame carried as the `Agentbus` NATS
/// header (the tests write such messages).
#[cfg(test)]
pub(crate) fn encode_header(header: &Header) -> String {
    let mut out = String::with_capacity(192);
    push_header(&mut out, header);
    out
}

/// An envelope as one NATS payload, the "frame": the compact header, a line feed,
/// then the envelope's payload. Stored messages, core requests and replies all use
/// it; it saves async-nats's header handling (building a `HeaderMap`, writing it,
/// and parsing it on the other side: about 7,000 instructions per message sent and
/// received, callgrind).
pub(crate) fn encode_frame(envelope: &Envelope) -> Bytes {
    let mut out =
        String::with_capacity(header_size_hint(&envelope.header) + envelope.payload.len());
    push_header(&mut out, &envelope.header);
    // The header is printable ASCII (control characters are percent-encoded), so the
    // first line feed ends it.
    out.push('\n');
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&envelope.payload);
    Bytes::from(bytes)
}

/// About how long `header`'s compact form is (exact unless values need escaping):
/// one allocation for the frame, where a fixed guess was short of every message
/// with a trace context and grew the buffer, copying it (about 350 instructions per
/// round trip, callgrind).
fn header_size_hint(header: &Header) -> usize {
    // `1;id=<36>;ts=<20>;kind=;p=<1>` and the line feed, then each optional field:
    // its key and separators (at most 8 bytes) and its value.
    let text = |v: &Option<String>| v.as_ref().map_or(0, |v| v.len() + 8);
    let time = |v: &Option<DateTime<Utc>>| v.map_or(0, |_| 30);
    let free: usize = header
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 4)
        .sum();
    80 + header.kind.len()
        + text(&header.correlation_id)
        + header.causation_id.map_or(0, |_| 43)
        + text(&header.sender)
        + text(&header.receiver)
        + header.reply_to.as_ref().map_or(0, |r| r.as_str().len() + 7)
        + time(&header.deadline)
        + time(&header.not_before)
        + 16
        + text(&header.tenant)
        + text(&header.trace)
        + header.content_type.len()
        + 4
        + free
}

fn push_header(out: &mut String, header: &Header) {
    out.push_str(VERSION);
    out.push_str(";id=");
    push_id(out, header.id);
    out.push_str(";ts=");
    push_time(out, &header.timestamp);
    out.push_str(";kind=");
    push_escaped(out, &header.kind);
    out.push_str(";p=");
    out.push(char::from(b'0' + header.priority.as_u8()));
    if let Some(v) = &header.correlation_id {
        push_field(out, "corr", v);
    }
    if let Some(v) = header.causation_id {
        out.push_str(";cause=");
        push_id(out, v);
    }
    if let Some(v) = &header.sender {
        push_field(out, "from", v);
    }
    if let Some(v) = &header.receiver {
        push_field(out, "to", v);
    }
    if let Some(v) = &header.reply_to {
        // Channel names are `[A-Za-z0-9_-]` tokens and dots: nothing to escape.
        out.push_str(";reply=");
        out.push_str(v.as_str());
    }
    if let Some(v) = &header.deadline {
        out.push_str(";dl=");
        push_time(out, v);
    }
    if let Some(v) = &header.not_before {
        out.push_str(";nb=");
        push_time(out, v);
    }
    if header.attempt != 0 {
        let _ = write!(out, ";att={}", header.attempt);
    }
    if let Some(v) = &header.tenant {
        push_field(out, "tenant", v);
    }
    if let Some(v) = &header.trace {
        push_field(out, "tp", v);
    }
    if header.content_type != CONTENT_TYPE_JSON {
        push_field(out, "ct", &header.content_type);
    }
    for (k, v) in &header.headers {
        out.push_str(";h.");
        push_escaped(out, k);
        out.push('=');
        push_escaped(out, v);
    }
}

fn push_field(out: &mut String, key: &str, value: &str) {
    out.push(';');
    out.push_str(key);
    out.push('=');
    push_escaped(out, value);
}

fn push_id(out: &mut String, id: MessageId) {
    let mut buf = uuid::Uuid::encode_buffer();
    out.push_str(id.0.hyphenated().encode_lower(&mut buf));
}

fn push_time(out: &mut String, t: &DateTime<Utc>) {
    let secs = t.timestamp();
    if secs < 0 {
        out.push('-');
    }
    push_digits(out, secs.unsigned_abs(), 1);
    out.push('.');
    push_digits(out, u64::from(t.timestamp_subsec_nanos()), 9);
}

/// `n` in decimal, zero-padded to at least `width` digits. `itoa`: formatting
/// machinery cost several times this per number (every message carries two or
/// three), and a hand-written loop still checked its digits as UTF-8 (about 120
/// instructions of ~250 per number).
fn push_digits(out: &mut String, n: u64, width: usize) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(n);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// Whether `b` must be percent-encoded in a name or value.
fn needs_escape(b: u8) -> bool {
    ESCAPED[usize::from(b)]
}

/// [`needs_escape`] as a table: one load per byte instead of four comparisons and a
/// range check (the kind and the 55-byte traceparent are checked in every frame).
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = matches!(c, b'%' | b';' | b'=' | b' ') || c < 0x20 || c >= 0x7f;
        b += 1;
    }
    table
};

fn push_escaped(out: &mut String, s: &str) {
    if !s.bytes().any(needs_escape) {
        out.push_str(s);
        return;
    }
    for b in s.bytes() {
        if needs_escape(b) {
            let _ = write!(out, "%{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
}

/// The text `value` stands for, percent-decoding it; `None` for a bad escape or
/// bytes that are not UTF-8.
fn unescape(value: &[u8]) -> Option<String> {
    if memchr::memchr(b'%', value).is_none() {
        return std::str::from_utf8(value).ok().map(str::to_string);
    }
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        if b == b'%' {
            let high = hex_digit(*value.get(i + 1)?)?;
            let low = hex_digit(*value.get(i + 2)?)?;
            out.push(high << 4 | low);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Reads the header at the start of `line`, in the compact text form, into `header`
/// (a blank one, see [`blank_header`]) and returns where it ends: at the first line
/// feed (a frame's header line) or at the end of `line` (the `Agentbus` NATS header
/// of older messages). The error says what is wrong (the caller adds where the
/// message came from); `header` is then partly filled and not to be used.
///
/// One pass over the bytes: each value is read by its own grammar where the field
/// says what it is (an id is 36 bytes; a time's digits end it), so most of the line
/// is never searched for separators. Splitting on `;` and `=` first, then parsing
/// each piece, cost about 2,300 instructions per header, a tenth of a request/reply
/// round trip (callgrind).
fn parse_header(line: &[u8], header: &mut Header) -> std::result::Result<usize, String> {
    let mut at = field_end(line, 0);
    if &line[..at] != VERSION.as_bytes() {
        let version =
            std::str::from_utf8(&line[..at]).map_err(|_| "its header line is not text")?;
        return Err(format!(
            "its version '{}' is not one this agentbus reads (1); upgrade agentbus",
            version.chars().take(16).collect::<String>()
        ));
    }
    let mut id = None;
    let mut timestamp = None;
    let mut kind = None;
    // Into the caller's header: a header returned by value was copied twice more on
    // its way into the envelope.
    while line.get(at) == Some(&b';') {
        let start = at + 1;
        let key_end = start
            + line[start..]
                .iter()
                .position(|&b| matches!(b, b'=' | b';' | b'\n'))
                .unwrap_or(line.len() - start);
        if line.get(key_end) != Some(&b'=') {
            return Err(format!(
                "field '{}' has no '='",
                clip(&line[start..key_end])
            ));
        }
        let key = &line[start..key_end];
        let from = key_end + 1;
        // Where the value ends and what it is; `None`: not of its field's form.
        let text_end = || field_end(line, from);
        let parsed: Option<usize> = match key {
            b"id" => parse_id(line, from).map(|(v, end)| {
                id = Some(v);
                end
            }),
            b"cause" => parse_id(line, from).map(|(v, end)| {
                header.causation_id = Some(v);
                end
            }),
            b"ts" | b"dl" | b"nb" => parse_time(line, from).map(|(v, end)| {
                match key {
                    b"ts" => timestamp = Some(v),
                    b"dl" => header.deadline = Some(v),
                    _ => header.not_before = Some(v),
                }
                end
            }),
            b"p" => {
                let end = text_end();
                match &line[from..end] {
                    [digit] => Priority::from_u8(digit.wrapping_sub(b'0')).ok().map(|p| {
                        header.priority = p;
                        end
                    }),
                    _ => None,
                }
            }
            b"att" => {
                let end = text_end();
                std::str::from_utf8(&line[from..end])
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .map(|v| {
                        header.attempt = v;
                        end
                    })
            }
            b"reply" => {
                let end = text_end();
                std::str::from_utf8(&line[from..end])
                    .ok()
                    .and_then(|v| ChannelName::new(v).ok())
                    .map(|v| {
                        header.reply_to = Some(v);
                        end
                    })
            }
            _ => {
                let end = text_end();
                let value = &line[from..end];
                let slot = match key {
                    b"kind" => Some(&mut kind),
                    b"corr" => Some(&mut header.correlation_id),
                    b"from" => Some(&mut header.sender),
                    b"to" => Some(&mut header.receiver),
                    b"tenant" => Some(&mut header.tenant),
                    b"tp" => Some(&mut header.trace),
                    _ => None,
                };
                match (slot, key) {
                    (Some(slot), _) => unescape(value).map(|v| {
                        *slot = Some(v);
                        end
                    }),
                    (None, b"ct") => unescape(value).map(|v| {
                        header.content_type = v.into();
                        end
                    }),
                    (None, _) => match key.strip_prefix(b"h.") {
                        Some(name) => {
                            let name = unescape(name).ok_or_else(|| {
                                format!("free header name '{}' is bad", clip(name))
                            })?;
                            unescape(value).map(|v| {
                                header.headers.insert(name, v);
                                end
                            })
                        }
                        // Unknown keys: a later minor addition, ignored (see the
                        // module docs).
                        None => Some(end),
                    },
                }
            }
        };
        at = parsed.ok_or_else(|| {
            format!(
                "field '{}' has a bad value '{}'",
                String::from_utf8_lossy(key),
                clip(&line[from..field_end(line, from)])
            )
        })?;
    }
    if !matches!(line.get(at), None | Some(b'\n')) {
        // Only a value's parser stops early, and it then fails; kept as a guard.
        return Err(format!(
            "it has stray text '{}'",
            clip(&line[at..field_end(line, at)])
        ));
    }
    header.id = id.ok_or("it has no id")?;
    header.timestamp = timestamp.ok_or("it has no timestamp (ts)")?;
    header.kind = kind.ok_or("it has no kind")?;
    Ok(at)
}

/// A header with no fields set, for [`parse_header`] to fill.
fn blank_header() -> Header {
    Header {
        id: MessageId(uuid::Uuid::nil()),
        correlation_id: None,
        causation_id: None,
        timestamp: DateTime::<Utc>::UNIX_EPOCH,
        sender: None,
        receiver: None,
        kind: String::new(),
        priority: Priority::Normal,
        reply_to: None,
        deadline: None,
        not_before: None,
        attempt: 0,
        tenant: None,
        trace: None,
        headers: BTreeMap::new(),
        content_type: std::borrow::Cow::Borrowed(CONTENT_TYPE_JSON),
    }
}

/// The header in the compact text form `raw` (an `Agentbus` NATS header).
pub(crate) fn decode_header(raw: &str) -> std::result::Result<Header, String> {
    let mut header = blank_header();
    match parse_header(raw.as_bytes(), &mut header)? {
        end if end == raw.len() => Ok(header),
        _ => Err("it holds a line feed".into()),
    }
}

/// Where the field starting at `from` ends: at the next `;`, line feed, or the end.
fn field_end(line: &[u8], from: usize) -> usize {
    memchr::memchr2(b';', b'\n', &line[from.min(line.len())..]).map_or(line.len(), |i| from + i)
}

/// Whether a value ending at `end` ends there: the line, a field or the header ends.
fn ends_value(line: &[u8], end: usize) -> bool {
    matches!(line.get(end), None | Some(b';' | b'\n'))
}

/// A hyphenated UUID at `from` (always 36 bytes), and where it ends.
fn parse_id(line: &[u8], from: usize) -> Option<(MessageId, usize)> {
    let end = from + 36;
    let text = line.get(from..end)?;
    if !ends_value(line, end) {
        return None;
    }
    uuid::Uuid::try_parse_ascii(text)
        .ok()
        .map(|id| (MessageId(id), end))
}

/// A time at `from`, `<secs>.<nanos>` (seconds may be negative), and where it ends.
fn parse_time(line: &[u8], from: usize) -> Option<(DateTime<Utc>, usize)> {
    let negative = line.get(from) == Some(&b'-');
    let (magnitude, at) = parse_digits(line, from + usize::from(negative), 19)?;
    if line.get(at) != Some(&b'.') {
        return None;
    }
    // At most 10 digits of nanoseconds (a leap second's reach 1,999,999,999).
    let (nanos, end) = parse_digits(line, at + 1, 10)?;
    if !ends_value(line, end) {
        return None;
    }
    let magnitude = i64::try_from(magnitude).ok()?;
    let secs = if negative { -magnitude } else { magnitude };
    DateTime::from_timestamp(secs, u32::try_from(nanos).ok()?).map(|t| (t, end))
}

/// The run of 1 to `max` (at most 19) ASCII digits at `from` as a number, and where
/// it ends.
fn parse_digits(line: &[u8], from: usize, max: usize) -> Option<(u64, usize)> {
    let mut n = 0u64;
    let mut at = from;
    while let Some(&b) = line.get(at).filter(|b| b.is_ascii_digit()) {
        if at - from == max {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
        at += 1;
    }
    (at > from).then_some((n, at))
}

/// At most 40 characters of `bytes`, for error messages about garbage.
fn clip(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(40).collect()
}

/// The agentbus header in `headers`: the compact form, or the JSON of messages
/// written before it. `place` says where the message was, for an error (a closure:
/// formatting it for every message would cost an allocation each).
fn header_of(headers: Option<&HeaderMap>, place: impl Fn() -> String) -> Result<Header> {
    let schema = |why: String| Error::new(ErrorKind::Schema, why);
    if let Some(raw) = headers.and_then(|h| h.get(HEADER_NAME)) {
        return decode_header(raw.as_str()).map_err(|why| {
            schema(format!(
                "the {HEADER} header of a message {} is not valid: {why}",
                place()
            ))
        });
    }
    if let Some(raw) = headers.and_then(|h| h.get(LEGACY_HEADER)) {
        return serde_json::from_str(raw.as_str()).map_err(|e| {
            schema(format!(
                "the {LEGACY_HEADER} header of a message {} is not valid: {e}",
                place()
            ))
        });
    }
    Err(schema(format!(
        "a message {} has no {HEADER} header: it was not published by agentbus; \
         publish through agentbus or to another subject",
        place()
    )))
}

/// The envelope carried by a stored message: from its frame, or from the `Agentbus`
/// NATS header of a message written before the frame. `last` is the channel of the
/// previous message decoded by this caller: a consumer reads one channel again and
/// again, so a name equal to it is not validated and allocated again.
///
/// # Errors
/// [`ErrorKind::Schema`] when the message was not written by agentbus (no frame and
/// no `Agentbus` header, or a bad one) or its subject is outside the layout, naming
/// the subject.
pub(crate) fn decode(
    prefix: &str,
    subject: &str,
    last: &mut Option<ChannelName>,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<Envelope> {
    let name = channel_str(prefix, subject).ok_or_else(|| {
        Error::new(
            ErrorKind::Schema,
            format!("subject '{subject}' is not of the form '{prefix}.<lane 1-4>.<channel>'"),
        )
    })?;
    let channel = known_channel(name, last)?;
    envelope_of(
        channel,
        headers,
        payload,
        || format!("on '{subject}'"),
        |why| {
            format!(
                "a message on '{subject}' was not published by agentbus: {why}; publish \
                 through agentbus or to another subject"
            )
        },
    )
}

/// The envelope of a message on `channel`: from the `Agentbus` NATS header (or the
/// older JSON one) of a message written before the frame, its payload untouched;
/// else from the frame. `place` says where the message was, for a bad header;
/// `not_ours` turns what is wrong with a payload that is no frame into the error.
fn envelope_of(
    channel: ChannelName,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    place: impl Fn() -> String,
    not_ours: impl FnOnce(String) -> String,
) -> Result<Envelope> {
    if written_before_frame(headers) {
        return Ok(Envelope {
            channel,
            header: header_of(headers, place)?,
            payload,
        });
    }
    let mut envelope = Envelope {
        channel,
        header: blank_header(),
        payload: Bytes::new(),
    };
    envelope.payload = split_frame(payload, &mut envelope.header)
        .map_err(|why| Error::new(ErrorKind::Schema, not_ours(why)))?;
    Ok(envelope)
}

/// Whether a message with these NATS headers was written before the frame: its
/// header is the `Agentbus` (or older JSON) NATS header, its payload untouched.
fn written_before_frame(headers: Option<&HeaderMap>) -> bool {
    headers.is_some_and(|h| h.get(HEADER_NAME).is_some() || h.get(LEGACY_HEADER).is_some())
}

/// `name` as a channel: `last` again when it is the same name (no validation and no
/// allocation), else validated and remembered in `last`.
fn known_channel(name: &str, last: &mut Option<ChannelName>) -> Result<ChannelName> {
    match last {
        Some(known) if known.as_str() == name => Ok(known.clone()),
        _ => {
            let channel = ChannelName::new(name)?;
            *last = Some(channel.clone());
            Ok(channel)
        }
    }
}

/// The envelope carried by a core NATS message (a request on
/// `<prefix>_rq.<channel>`, or a reply on an inbox subject): `channel` is the
/// agentbus channel it belongs to; `last`, as for [`decode`], the channel of the
/// previous message of this caller. The envelope comes from the core frame (see
/// [`encode_frame`]), or from the `Agentbus` NATS header of a message written before
/// it (which has headers; a frame never has).
///
/// # Errors
/// [`ErrorKind::Schema`] without a valid frame or `Agentbus` header; `InvalidChannel`
/// for a subject that is no channel name.
pub(crate) fn decode_core(
    channel: &str,
    last: &mut Option<ChannelName>,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<Envelope> {
    envelope_of(
        known_channel(channel, last)?,
        headers,
        payload,
        || format!("for '{channel}'"),
        |why| {
            format!(
                "a core message for '{channel}' is not an agentbus request or reply: \
                 {why}; send requests with agentbus (a process older than the core \
                 frame cannot talk to a newer one: upgrade both)"
            )
        },
    )
}

/// The payload of a frame, its header read into `header` (see [`encode_frame`]).
fn split_frame(frame: Bytes, header: &mut Header) -> std::result::Result<Bytes, String> {
    let no_line = "it has no header line";
    match parse_header(&frame, header) {
        Ok(end) if end < frame.len() => Ok(frame.slice(end + 1..)),
        Ok(_) => Err(no_line.into()),
        Err(_) if memchr::memchr(b'\n', &frame).is_none() => Err(no_line.into()),
        Err(why) if why.contains("not text") => Err(why),
        Err(why) => Err(format!("its header is not valid: {why}")),
    }
}

/// The payload of a core reply without reading its header: after the frame's header
/// line (which must start with this version's token), or the NATS payload of a
/// reply written before the frame (which has the `Agentbus` header). `None` when it
/// is neither: [`decode_core`] then says what is wrong.
pub(crate) fn frame_payload(headers: Option<&HeaderMap>, payload: &Bytes) -> Option<Bytes> {
    if written_before_frame(headers) {
        return Some(payload.clone());
    }
    let header = payload.strip_prefix(VERSION.as_bytes())?;
    if !header.starts_with(b";") {
        return None;
    }
    let end = memchr::memchr(b'\n', payload)?;
    Some(payload.slice(end + 1..))
}

/// The core NATS subject requests on `channel_or_pattern` travel on (outside the
/// stream, so they are never stored).
pub(crate) fn request_subject(prefix: &str, channel_or_pattern: &str) -> String {
    // Not `format!`: this runs once per request (see `lane_subject`).
    let mut out = String::with_capacity(prefix.len() + channel_or_pattern.len() + 4);
    out.push_str(prefix);
    out.push_str("_rq.");
    out.push_str(channel_or_pattern);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subjects_round_trip() {
        let s = subject("ab", Priority::High, "orders.eu");
        assert_eq!(s, "ab.3.orders.eu");
        assert_eq!(channel_of("ab", &s).as_deref(), Some("orders.eu"));
        assert_eq!(channel_of("ab", "ab.9.x"), None);
        assert_eq!(channel_of("ab", "abc.1.x"), None);
        assert_eq!(
            lane_filter("ab", Priority::Low, "orders.>"),
            "ab.1.orders.>"
        );
    }

    #[test]
    fn digits_are_written_in_full_and_padded() {
        for (n, width, text) in [
            (0, 1, "0"),
            (0, 9, "000000000"),
            (7, 1, "7"),
            (10, 1, "10"),
            (99, 1, "99"),
            (100, 1, "100"),
            (560_487_515, 9, "560487515"),
            (5, 9, "000000005"),
            (1_764_117_773, 1, "1764117773"),
            (u64::MAX, 1, "18446744073709551615"),
        ] {
            let mut out = String::new();
            push_digits(&mut out, n, width);
            assert_eq!(out, text, "{n} at width {width}");
        }
    }

    #[test]
    fn core_frames_round_trip_and_reject_what_is_not_one() {
        let channel = ChannelName::new("a.b").unwrap();
        // A payload with line feeds and non-UTF-8 bytes: only the first line feed,
        // the header's end, counts.
        let mut envelope = Envelope::new(channel, "k", b"x\ny\n\xff".to_vec());
        envelope.header.sender = Some("agent 7;\n".into());
        envelope
            .header
            .headers
            .insert("n\nm".into(), "v\r\n".into());
        let frame = encode_frame(&envelope);
        let line = frame.split(|&b| b == b'\n').next().unwrap();
        assert_eq!(line, encode_header(&envelope.header).as_bytes());
        let back = decode_core("a.b", &mut None, None, frame.clone()).unwrap();
        assert_eq!(back, envelope);
        // An empty header map (what async-nats may hand over) is no header either.
        let back = decode_core("a.b", &mut None, Some(&HeaderMap::new()), frame).unwrap();
        assert_eq!(back, envelope);
        // Written before the frame: the `Agentbus` NATS header, the payload untouched.
        let back = decode_core(
            "a.b",
            &mut None,
            Some(&header_map(&envelope.header)),
            envelope.payload.clone(),
        )
        .unwrap();
        assert_eq!(back, envelope);
        for (bad, says) in [
            (&b""[..], "no header line"),
            (&b"hello"[..], "no header line"),
            (&b"\xff\xfe\npayload"[..], "not text"),
            (&b"2;id=x\npayload"[..], "version"),
            (&b"{\"data\":\"x\"}\n"[..], "not valid"),
        ] {
            let e = decode_core("a.b", &mut None, None, Bytes::from_static(bad)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Schema, "{bad:?}");
            assert!(e.message().contains(says), "{bad:?}: {}", e.message());
        }
    }

    #[test]
    fn a_replys_payload_is_found_without_reading_its_header() {
        let channel = ChannelName::new("a.b").unwrap();
        let envelope = Envelope::new(channel, "k", b"{\"n\":1}\nmore".to_vec());
        let frame = encode_frame(&envelope);
        assert_eq!(
            frame_payload(None, &frame).as_deref(),
            Some(&b"{\"n\":1}\nmore"[..])
        );
        // Written before the frame: the NATS payload is the payload.
        let old = header_map(&envelope.header);
        assert_eq!(
            frame_payload(Some(&old), &envelope.payload),
            Some(envelope.payload.clone())
        );
        // Anything else goes to the full decode, which says what is wrong.
        for bad in [
            &b""[..],
            b"{\"n\":1}",
            b"1;id=x",
            b"12;id=x\n{}",
            b"2;id=x\n{}",
            b"1\n{}",
        ] {
            assert_eq!(
                frame_payload(None, &Bytes::from_static(bad)),
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn envelopes_round_trip() {
        let channel = ChannelName::new("a.b").unwrap();
        let envelope =
            Envelope::new(channel, "k", b"{\"n\":1}".to_vec()).with_priority(Priority::Low);
        let (headers, frame) = encode(&envelope, true);
        let headers = headers.expect("dedup sends Nats-Msg-Id");
        assert_eq!(
            headers.get(NATS_MESSAGE_ID).map(|v| v.as_str().to_string()),
            Some(envelope.header.id.to_string())
        );
        // The dedup key is the only NATS header; without dedup there is none.
        assert!(headers.get(HEADER_NAME).is_none());
        assert!(encode(&envelope, false).0.is_none());
        let subject = subject("p", envelope.header.priority, envelope.channel.as_str());
        let mut last = None;
        let back = decode("p", &subject, &mut last, Some(&headers), frame.clone()).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(last.as_ref(), Some(&envelope.channel));
        assert_eq!(
            decode("p", &subject, &mut last, None, frame.clone()).unwrap(),
            envelope
        );
        // The remembered channel is reused only for the same name.
        let other = self::subject("p", Priority::Low, "a.c");
        let back = decode("p", &other, &mut last, None, frame.clone()).unwrap();
        assert_eq!(back.channel.as_str(), "a.c");
        // Not written by agentbus: neither a frame nor an `Agentbus` header.
        for (headers, payload) in [
            (None, Bytes::new()),
            (Some(&headers), Bytes::from_static(b"{\"n\":1}")),
        ] {
            let e = decode("p", &subject, &mut last, headers, payload).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Schema);
            assert!(
                e.message().contains("not published by agentbus"),
                "{}",
                e.message()
            );
        }
        let e = decode("p", "q.2.a.b", &mut last, None, frame).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Schema);
        // Written before the frame: the `Agentbus` NATS header, the payload untouched.
        let old = header_map(&envelope.header);
        let back = decode(
            "p",
            &subject,
            &mut last,
            Some(&old),
            envelope.payload.clone(),
        )
        .unwrap();
        assert_eq!(back, envelope);
    }

    /// The NATS headers of a message written before the frame: the compact header as
    /// the `Agentbus` NATS header.
    fn header_map(header: &Header) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_NAME, encode_header(header));
        headers
    }

    #[test]
    fn the_compact_form_is_what_the_docs_say() {
        let mut header = Header::new("vehicle.data");
        header.timestamp = DateTime::from_timestamp(1_764_117_773, 5).unwrap();
        header.id = MessageId(uuid::Uuid::from_u128(
            0x0192_f3a0_c2d4_7b1e_9a3c_5d7e_9f1a_2b3c,
        ));
        header.sender = Some("agent 7;x=1%".into());
        header.attempt = 3;
        assert_eq!(
            encode_header(&header),
            "1;id=0192f3a0-c2d4-7b1e-9a3c-5d7e9f1a2b3c;ts=1764117773.000000005;\
             kind=vehicle.data;p=2;from=agent%207%3Bx%3D1%25;att=3"
        );
    }

    #[test]
    fn the_size_hint_covers_a_header_whose_values_need_no_escaping() {
        let mut header = Header::new("vehicle.data");
        let hint = |h: &Header| (header_size_hint(h), encode_header(h).len() + 1);
        let (guess, size) = hint(&header);
        assert!(guess >= size, "{guess} < {size}");
        header.correlation_id = Some("order-1".into());
        header.causation_id = Some(MessageId::new());
        header.sender = Some("agent-7".into());
        header.receiver = Some("planner".into());
        header.reply_to = Some(ChannelName::new("_INBOX.abc.def").unwrap());
        header.deadline = Some(DateTime::<Utc>::MAX_UTC);
        header.not_before = Some(DateTime::<Utc>::MIN_UTC);
        header.attempt = u32::MAX;
        header.tenant = Some("acme".into());
        header.trace = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        header.content_type = "application/x-protobuf".into();
        header
            .headers
            .insert("trace.parent_span_id".into(), "00f067aa0ba902b7".into());
        let (guess, size) = hint(&header);
        assert!(guess >= size, "{guess} < {size}");
    }

    #[test]
    fn headers_written_as_json_before_the_compact_form_are_still_read() {
        let header = Header::new("old.kind");
        let mut headers = HeaderMap::new();
        headers.insert(
            LEGACY_HEADER,
            serde_json::to_string(&header).unwrap().as_str(),
        );
        let back = decode_core("a.b", &mut None, Some(&headers), Bytes::new()).unwrap();
        assert_eq!(back.header, header);
        let mut bad = HeaderMap::new();
        bad.insert(LEGACY_HEADER, "{not json");
        let e = decode_core("a.b", &mut None, Some(&bad), Bytes::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Schema);
    }

    #[test]
    fn bad_headers_are_schema_errors_that_say_what_is_wrong() {
        let good = encode_header(&Header::new("k"));
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "version"),
            ("2;id=x".into(), "version '2'"),
            (good.replacen("1;", "1;junk;", 1), "no '='"),
            (good.replacen(";id=", ";x=", 1), "no id"),
            (good.replacen(";ts=", ";x=", 1), "no timestamp"),
            (good.replacen(";kind=", ";x=", 1), "no kind"),
            (format!("{good};p=5"), "'p'"),
            (format!("{good};p="), "'p'"),
            (format!("{good};att=-1"), "'att'"),
            (format!("{good};dl=1"), "'dl'"),
            (format!("{good};dl=1."), "'dl'"),
            (format!("{good};dl=99999999999999999.0"), "'dl'"),
            (format!("{good};dl=1.12345678901"), "'dl'"),
            (format!("{good};cause=nope"), "'cause'"),
            // Values read by their own grammar must still end where the field does.
            (
                format!("{good};cause=0192f3a0-c2d4-7b1e-9a3c-5d7e9f1a2b3cd"),
                "'cause'",
            ),
            (format!("{good};nb=1.5x"), "'nb'"),
            (format!("{good};nb=-.5"), "'nb'"),
            (format!("{good};p=22"), "'p'"),
            (format!("{good};p=+2"), "'p'"),
            (format!("{good};from=%4"), "'from'"),
            (format!("{good};from=%G1"), "'from'"),
            (format!("{good};from=%FF"), "'from'"),
            (format!("{good};reply=a..b"), "'reply'"),
            (format!("{good};h.%ZZ=v"), "free header name"),
        ];
        for (raw, says) in cases {
            let why = decode_header(&raw).expect_err(&raw);
            assert!(why.contains(says), "{raw:?}: {why}");
            let mut headers = HeaderMap::new();
            headers.insert(HEADER, raw.as_str());
            let e = decode_core("a.b", &mut None, Some(&headers), Bytes::new()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Schema, "{raw:?}");
        }
        // Keys a later minor version may add are skipped.
        assert!(decode_header(&format!("{good};future=1")).is_ok());
    }

    fn channel() -> impl Strategy<Value = ChannelName> {
        "[_a-z][a-z0-9_-]{0,6}(\\.[A-Za-z0-9_-]{1,6}){0,3}"
            .prop_filter_map("a valid channel name", |s| ChannelName::new(s).ok())
    }

    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        let (min, max) = (
            DateTime::<Utc>::MIN_UTC.timestamp(),
            DateTime::<Utc>::MAX_UTC.timestamp(),
        );
        prop_oneof![
            (min..=max, 0u32..1_000_000_000),
            (1_600_000_000i64..2_000_000_000, 0u32..1_000_000_000),
        ]
        .prop_filter_map("a representable instant", |(s, n)| {
            DateTime::from_timestamp(s, n)
        })
    }

    fn id() -> impl Strategy<Value = MessageId> {
        any::<u128>().prop_map(|n| MessageId(uuid::Uuid::from_u128(n)))
    }

    prop_compose! {
        fn header()(
            id in id(),
            timestamp in time(),
            kind in any::<String>(),
            priority in 1u8..=4,
            correlation_id in proptest::option::of(any::<String>()),
            causation_id in proptest::option::of(id()),
            sender in proptest::option::of(any::<String>()),
            receiver in proptest::option::of(any::<String>()),
            reply_to in proptest::option::of(channel()),
            deadline in proptest::option::of(time()),
            not_before in proptest::option::of(time()),
            attempt in any::<u32>(),
            tenant in proptest::option::of(any::<String>()),
            trace in proptest::option::of(any::<String>()),
            headers in proptest::collection::btree_map(any::<String>(), any::<String>(), 0..4),
            content_type in prop_oneof![Just(CONTENT_TYPE_JSON.to_string()), any::<String>()],
        ) -> Header {
            Header {
                id, correlation_id, causation_id, timestamp, sender, receiver, kind,
                priority: Priority::from_u8(priority).unwrap(),
                reply_to, deadline, not_before, attempt, tenant, trace, headers, content_type: content_type.into(),
            }
        }
    }

    proptest! {
        #[test]
        fn every_header_round_trips_through_a_nats_header(header in header()) {
            let raw = encode_header(&header);
            // One line of printable ASCII: what a NATS header value may hold and
            // async-nats gives back unchanged.
            prop_assert!(raw.bytes().all(|b| (0x21..0x7f).contains(&b)), "{}", raw);
            prop_assert_eq!(decode_header(&raw), Ok(header.clone()));
            let envelope = Envelope {
                channel: ChannelName::new("a.b").unwrap(),
                header,
                payload: Bytes::from_static(b"x"),
            };
            let back = decode_core(
                "a.b", &mut None, Some(&header_map(&envelope.header)), envelope.payload.clone()
            ).unwrap();
            prop_assert_eq!(&back, &envelope);
            // And as stored now: the frame, with the dedup key as the only header.
            let (headers, frame) = encode(&envelope, true);
            let back = decode("p", "p.2.a.b", &mut None, headers.as_ref(), frame).unwrap();
            prop_assert_eq!(back, envelope);
        }

        #[test]
        fn stored_garbage_never_panics(raw in any::<Vec<u8>>()) {
            let _ = decode("p", "p.2.a.b", &mut None, None, Bytes::from(raw));
        }

        #[test]
        fn garbage_never_panics(raw in any::<String>()) {
            let _ = decode_header(&raw);
            let _ = decode_header(&format!("1;{raw}"));
        }

        #[test]
        fn core_frame_garbage_never_panics(raw in any::<Vec<u8>>()) {
            let _ = decode_core("a.b", &mut None, None, Bytes::from(raw.clone()));
            let mut framed = b"1;".to_vec();
            framed.extend_from_slice(&raw);
            let _ = decode_core("a.b", &mut None, None, Bytes::from(framed));
        }

        #[test]
        fn damaged_headers_never_panic(header in header(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let raw = encode_header(&header);
            let at = cut.index(raw.len() + 1);
            let _ = decode_header(&raw[..at]);
            let mut bytes = raw.into_bytes();
            if at < bytes.len() {
                bytes[at] = byte;
            }
            if let Ok(text) = String::from_utf8(bytes) {
                let _ = decode_header(&text);
            }
        }
    }
}
