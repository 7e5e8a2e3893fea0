//! The on-disk encoding: record framing and the journal's record types.
//!
//! A frame is `len: u32 LE | header_crc: u32 LE | payload_crc: u32 LE | payload`, where
//! `header_crc` is the CRC32C of the four `len` bytes and `payload_crc` the CRC32C of
//! the payload. The separate header checksum lets recovery tell a torn tail (a valid
//! header whose payload runs past the end of the file) from a damaged length field.
//!
//! A payload is one [`Op`]: a tag byte followed by its fields, little-endian integers,
//! length-prefixed strings and byte strings. The encoding is hand-written rather than
//! derived so that it is stable across serde and crate versions: it is a compatibility
//! promise (`docs/DURABLE_LOG.md` lists every record type).

use std::collections::BTreeMap;
use std::time::Duration;

use agentbus::{
    ChannelConfig, ChannelName, ChannelPattern, DeadLetterFilter, DeadReason, Discard, Envelope,
    Header, MessageId, Priority, Settlement, StartPosition, SubscribeOptions,
};
use chrono::{DateTime, Utc};

/// Bytes of a frame header: length, header CRC, payload CRC.
pub const FRAME_HEADER: usize = 12;

/// The largest payload a frame may carry (a 1 MiB message plus its header fits with
/// a wide margin); a longer length field is damage, not a record.
pub const MAX_RECORD: usize = 64 * 1024 * 1024;

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the field or frame does.
    Truncated,
    /// A field holds a value no encoder writes; the text says which.
    Invalid(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("the record ends early"),
            DecodeError::Invalid(why) => f.write_str(why),
        }
    }
}

pub(crate) type DResult<T> = Result<T, DecodeError>;

/// What reading a frame at some offset found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole frame with matching checksums: its payload and total length.
    Ok(&'a [u8], usize),
    /// The bytes end inside the frame (a header, or a valid header whose payload runs
    /// past the end): what a write cut short by a crash leaves.
    Incomplete,
    /// Every remaining byte is zero: what a file extended but never written leaves.
    Zeros,
    /// A header or payload whose checksum does not match, or an impossible length.
    Corrupt(String),
}

/// Appends one frame holding `payload` to `out`.
pub fn write_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32c::crc32c(&len).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Reads the frame at the start of `bytes` (which must not be empty).
pub fn read_frame(bytes: &[u8]) -> Frame<'_> {
    if bytes.iter().all(|&b| b == 0) {
        return Frame::Zeros;
    }
    if bytes.len() < FRAME_HEADER {
        return Frame::Incomplete;
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let len = word(0);
    if crc32c::crc32c(&bytes[..4]) != word(4) {
        return Frame::Corrupt("the frame header's checksum does not match".into());
    }
    let len = len as usize;
    if len == 0 || len > MAX_RECORD {
        return Frame::Corrupt(format!("impossible record length {len}"));
    }
    let Some(payload) = bytes.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Frame::Incomplete;
    };
    if crc32c::crc32c(payload) != word(8) {
        return Frame::Corrupt("the record's checksum does not match its contents".into());
    }
    Frame::Ok(payload, FRAME_HEADER + len)
}

/// One journaled call of the delivery state machine. Replaying the calls in order,
/// with the same arguments and the same `now`, rebuilds the state exactly.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // Ops are built one at a time, never stored in bulk.
pub enum Op {
    /// The engine opened (after a restart): every member of the previous process
    /// leaves; the state-machine settings in force from here.
    Open {
        /// When.
        now: DateTime<Utc>,
        /// The most dead letters kept.
        max_dead_letters: u64,
    },
    /// `State::publish`; `expect` is the receipt's sequence (0 when it failed), so
    /// replay can check that it took the same path.
    Publish {
        /// When.
        now: DateTime<Utc>,
        /// The message as published.
        envelope: Envelope,
        /// The sequence the publish got, or 0 if it failed.
        expect: u64,
    },
    /// `State::join`.
    Join {
        /// When.
        now: DateTime<Utc>,
        /// The subscription.
        options: SubscribeOptions,
    },
    /// `State::leave`.
    Leave {
        /// The group's id.
        group: u64,
        /// The member's id.
        member: u64,
    },
    /// `State::fire_timers` then `State::take`; `expect` is how many deliveries it
    /// handed out.
    Take {
        /// When.
        now: DateTime<Utc>,
        /// The group's id.
        group: u64,
        /// The member's id.
        member: u64,
        /// The most deliveries asked for.
        max: u64,
        /// How many it handed out.
        expect: u64,
    },
    /// `State::settle`.
    Settle {
        /// When.
        now: DateTime<Utc>,
        /// The group's id.
        group: u64,
        /// The delivery token.
        key: u64,
        /// How.
        settlement: Settlement,
    },
    /// `State::fire_timers`.
    FireTimers {
        /// When.
        now: DateTime<Utc>,
    },
    /// `State::configure`.
    Configure {
        /// Which channels.
        pattern: ChannelPattern,
        /// Their settings.
        config: ChannelConfig,
    },
    /// `State::delete_group`.
    DeleteGroup {
        /// The group's name.
        name: String,
    },
    /// A dead letter published again: take it, publish it with `new_id`, put it back
    /// if that publish fails. One record, so a crash never loses the letter half-way.
    ReplayDeadLetter {
        /// When.
        now: DateTime<Utc>,
        /// The dead letter's id.
        id: MessageId,
        /// The id of the new message.
        new_id: MessageId,
        /// The sequence its publish got, or 0 if it failed.
        expect: u64,
    },
    /// `State::purge_dead_letters`.
    PurgeDeadLetters {
        /// Which.
        filter: DeadLetterFilter,
    },
}

const OP_OPEN: u8 = 1;
const OP_PUBLISH: u8 = 2;
const OP_JOIN: u8 = 3;
const OP_LEAVE: u8 = 4;
const OP_TAKE: u8 = 5;
const OP_SETTLE: u8 = 6;
const OP_FIRE: u8 = 7;
const OP_CONFIGURE: u8 = 8;
const OP_DELETE_GROUP: u8 = 9;
const OP_REPLAY_DEAD: u8 = 10;
const OP_PURGE_DEAD: u8 = 11;

/// Where a publish record keeps its `expect` field (after the tag and `now`), so the
/// engine can fill it in after applying the publish without encoding twice.
pub const PUBLISH_EXPECT_AT: usize = 1 + 12;

/// Encodes a publish record: the same bytes as `Op::Publish { .. }.encode`.
pub fn encode_publish(out: &mut Vec<u8>, now: DateTime<Utc>, expect: u64, envelope: &Envelope) {
    let mut w = W(out);
    w.u8(OP_PUBLISH);
    w.time(now);
    w.u64(expect);
    w.envelope(envelope);
}

impl Op {
    /// Appends the op's encoding (no frame) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = W(out);
        match self {
            Op::Open {
                now,
                max_dead_letters,
            } => {
                w.u8(OP_OPEN);
                w.time(*now);
                w.u64(*max_dead_letters);
            }
            Op::Publish {
                now,
                envelope,
                expect,
            } => encode_publish(w.0, *now, *expect, envelope),
            Op::Join { now, options } => {
                w.u8(OP_JOIN);
                w.time(*now);
                w.str(options.pattern.as_str());
                w.opt_str(options.group.as_deref());
                match options.start {
                    StartPosition::New => w.u8(0),
                    StartPosition::Earliest => w.u8(1),
                    StartPosition::Time(t) => {
                        w.u8(2);
                        w.time(t);
                    }
                    StartPosition::Sequence(s) => {
                        w.u8(3);
                        w.u64(s);
                    }
                }
                w.duration(options.ack_wait);
                w.u32(options.max_deliveries);
                w.u64(options.prefetch as u64);
            }
            Op::Leave { group, member } => {
                w.u8(OP_LEAVE);
                w.u64(*group);
                w.u64(*member);
            }
            Op::Take {
                now,
                group,
                member,
                max,
                expect,
            } => {
                w.u8(OP_TAKE);
                w.time(*now);
                w.u64(*group);
                w.u64(*member);
                w.u64(*max);
                w.u64(*expect);
            }
            Op::Settle {
                now,
                group,
                key,
                settlement,
            } => {
                w.u8(OP_SETTLE);
                w.time(*now);
                w.u64(*group);
                w.u64(*key);
                match settlement {
                    Settlement::Ack => w.u8(0),
                    Settlement::Nack { delay, error } => {
                        w.u8(1);
                        w.duration(*delay);
                        w.opt_str(error.as_deref());
                    }
                    Settlement::Reject { reason, error } => {
                        w.u8(2);
                        w.u8(reason_code(reason));
                        w.str(error);
                    }
                }
            }
            Op::FireTimers { now } => {
                w.u8(OP_FIRE);
                w.time(*now);
            }
            Op::Configure { pattern, config } => {
                w.u8(OP_CONFIGURE);
                w.str(pattern.as_str());
                w.config(config);
            }
            Op::DeleteGroup { name } => {
                w.u8(OP_DELETE_GROUP);
                w.str(name);
            }
            Op::ReplayDeadLetter {
                now,
                id,
                new_id,
                expect,
            } => {
                w.u8(OP_REPLAY_DEAD);
                w.time(*now);
                w.id(*id);
                w.id(*new_id);
                w.u64(*expect);
            }
            Op::PurgeDeadLetters { filter } => {
                w.u8(OP_PURGE_DEAD);
                w.opt_str(filter.pattern.as_ref().map(|p| p.as_str()));
                match &filter.reason {
                    None => w.u8(0),
                    Some(r) => w.u8(1 + reason_code(r)),
                }
                w.opt_u64(filter.limit.map(|l| l as u64));
            }
        }
    }

    /// Decodes one op from a whole record payload.
    ///
    /// # Errors
    /// [`DecodeError`] for bytes no encoder writes, including trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Op, DecodeError> {
        Self::decode_with(R(bytes, None))
    }

    /// Decodes one op from a whole record payload held in `bytes`; message payloads
    /// share its buffer instead of being copied (what recovery uses).
    ///
    /// # Errors
    /// As [`Op::decode`].
    pub fn decode_shared(bytes: &bytes::Bytes) -> Result<Op, DecodeError> {
        Self::decode_with(R(bytes, Some(bytes)))
    }

    fn decode_with(mut r: R<'_>) -> Result<Op, DecodeError> {
        let op = match r.u8()? {
            OP_OPEN => Op::Open {
                now: r.time()?,
                max_dead_letters: r.u64()?,
            },
            OP_PUBLISH => Op::Publish {
                now: r.time()?,
                expect: r.u64()?,
                envelope: r.envelope()?,
            },
            OP_JOIN => {
                let now = r.time()?;
                let pattern = pattern(r.str()?)?;
                let group = r.opt_str()?;
                let start = match r.u8()? {
                    0 => StartPosition::New,
                    1 => StartPosition::Earliest,
                    2 => StartPosition::Time(r.time()?),
                    3 => StartPosition::Sequence(r.u64()?),
                    n => return Err(invalid(format!("unknown start position {n}"))),
                };
                let mut options = SubscribeOptions::new(pattern)
                    .start(start)
                    .ack_wait(r.duration()?)
                    .max_deliveries(r.u32()?)
                    .prefetch(usize::try_from(r.u64()?).unwrap_or(usize::MAX));
                options.group = group;
                Op::Join { now, options }
            }
            OP_LEAVE => Op::Leave {
                group: r.u64()?,
                member: r.u64()?,
            },
            OP_TAKE => Op::Take {
                now: r.time()?,
                group: r.u64()?,
                member: r.u64()?,
                max: r.u64()?,
                expect: r.u64()?,
            },
            OP_SETTLE => {
                let now = r.time()?;
                let group = r.u64()?;
                let key = r.u64()?;
                let settlement = match r.u8()? {
                    0 => Settlement::Ack,
                    1 => Settlement::Nack {
                        delay: r.duration()?,
                        error: r.opt_str()?,
                    },
                    2 => Settlement::Reject {
                        reason: reason_from(r.u8()?)?,
                        error: r.str()?,
                    },
                    n => return Err(invalid(format!("unknown settlement {n}"))),
                };
                Op::Settle {
                    now,
                    group,
                    key,
                    settlement,
                }
            }
            OP_FIRE => Op::FireTimers { now: r.time()? },
            OP_CONFIGURE => {
                let pattern = pattern(r.str()?)?;
                let config = r.config()?;
                Op::Configure { pattern, config }
            }
            OP_DELETE_GROUP => Op::DeleteGroup { name: r.str()? },
            OP_REPLAY_DEAD => Op::ReplayDeadLetter {
                now: r.time()?,
                id: r.id()?,
                new_id: r.id()?,
                expect: r.u64()?,
            },
            OP_PURGE_DEAD => {
                let pattern = r.opt_str()?.map(pattern).transpose()?;
                let reason = match r.u8()? {
                    0 => None,
                    n => Some(reason_from(n - 1)?),
                };
                let limit = r
                    .opt_u64()?
                    .map(|l| usize::try_from(l).unwrap_or(usize::MAX));
                Op::PurgeDeadLetters {
                    filter: DeadLetterFilter {
                        pattern,
                        reason,
                        limit,
                    },
                }
            }
            n => return Err(invalid(format!("unknown record type {n}"))),
        };
        if !r.0.is_empty() {
            return Err(invalid(format!(
                "{} bytes left over after the record",
                r.0.len()
            )));
        }
        Ok(op)
    }
}

pub(crate) fn invalid(why: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(why.into())
}

pub(crate) fn pattern(text: String) -> DResult<ChannelPattern> {
    ChannelPattern::new(&text).map_err(|e| invalid(format!("bad channel pattern: {e}")))
}

pub(crate) fn reason_code(reason: &DeadReason) -> u8 {
    match reason {
        DeadReason::MaxDeliveries => 0,
        DeadReason::Expired => 1,
        DeadReason::Schema => 2,
        DeadReason::Rejected => 3,
    }
}

pub(crate) fn reason_from(code: u8) -> DResult<DeadReason> {
    Ok(match code {
        0 => DeadReason::MaxDeliveries,
        1 => DeadReason::Expired,
        2 => DeadReason::Schema,
        3 => DeadReason::Rejected,
        n => return Err(invalid(format!("unknown dead-letter reason {n}"))),
    })
}

/// A writer of the encoding's fields onto a buffer.
pub(crate) struct W<'a>(pub(crate) &'a mut Vec<u8>);

impl W<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
    }
    pub(crate) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub(crate) fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    pub(crate) fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(n) => {
                self.u8(1);
                self.u64(n);
            }
        }
    }
    pub(crate) fn time(&mut self, t: DateTime<Utc>) {
        self.u64(t.timestamp() as u64);
        self.u32(t.timestamp_subsec_nanos());
    }
    pub(crate) fn opt_time(&mut self, t: Option<DateTime<Utc>>) {
        match t {
            None => self.u8(0),
            Some(t) => {
                self.u8(1);
                self.time(t);
            }
        }
    }
    pub(crate) fn duration(&mut self, d: Duration) {
        self.u64(d.as_secs());
        self.u32(d.subsec_nanos());
    }
    pub(crate) fn opt_duration(&mut self, d: Option<Duration>) {
        match d {
            None => self.u8(0),
            Some(d) => {
                self.u8(1);
                self.duration(d);
            }
        }
    }
    pub(crate) fn id(&mut self, id: MessageId) {
        self.0.extend_from_slice(id.0.as_bytes());
    }
    pub(crate) fn config(&mut self, config: &ChannelConfig) {
        self.opt_duration(config.max_age);
        self.opt_u64(config.max_bytes);
        self.opt_u64(config.max_messages);
        self.u8(match config.discard {
            Discard::RejectNew => 0,
            Discard::DropOldest => 1,
        });
        self.duration(config.dedup_window);
    }
    pub(crate) fn envelope(&mut self, e: &Envelope) {
        let h = &e.header;
        self.str(e.channel.as_str());
        self.id(h.id);
        self.opt_str(h.correlation_id.as_deref());
        match h.causation_id {
            None => self.u8(0),
            Some(id) => {
                self.u8(1);
                self.id(id);
            }
        }
        self.time(h.timestamp);
        self.opt_str(h.sender.as_deref());
        self.opt_str(h.receiver.as_deref());
        self.str(&h.kind);
        self.u8(h.priority as u8);
        self.opt_str(h.reply_to.as_ref().map(|c| c.as_str()));
        self.opt_time(h.deadline);
        self.opt_time(h.not_before);
        self.u32(h.attempt);
        self.opt_str(h.tenant.as_deref());
        self.opt_str(h.trace.as_deref());
        self.u32(u32::try_from(h.headers.len()).unwrap_or(u32::MAX));
        for (k, v) in &h.headers {
            self.str(k);
            self.str(v);
        }
        self.str(&h.content_type);
        self.bytes(&e.payload);
    }
}

/// A reader over `.0`; when `.1` is the buffer `.0` lies in, byte strings are
/// sliced from it rather than copied.
pub(crate) struct R<'a>(pub(crate) &'a [u8], pub(crate) Option<&'a bytes::Bytes>);

impl<'a> R<'a> {
    pub(crate) fn take(&mut self, n: usize) -> DResult<&'a [u8]> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> DResult<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self) -> DResult<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> DResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> DResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn flag(&mut self) -> DResult<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(invalid(format!("bad option flag {n}"))),
        }
    }
    pub(crate) fn bytes(&mut self) -> DResult<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    pub(crate) fn str(&mut self) -> DResult<String> {
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| invalid("a text field is not UTF-8"))
    }
    pub(crate) fn opt_str(&mut self) -> DResult<Option<String>> {
        if self.flag()? {
            self.str().map(Some)
        } else {
            Ok(None)
        }
    }
    pub(crate) fn opt_u64(&mut self) -> DResult<Option<u64>> {
        if self.flag()? {
            self.u64().map(Some)
        } else {
            Ok(None)
        }
    }
    pub(crate) fn time(&mut self) -> DResult<DateTime<Utc>> {
        let secs = self.u64()? as i64;
        let nanos = self.u32()?;
        DateTime::from_timestamp(secs, nanos)
            .ok_or_else(|| invalid(format!("timestamp {secs}.{nanos} is out of range")))
    }
    pub(crate) fn opt_time(&mut self) -> DResult<Option<DateTime<Utc>>> {
        if self.flag()? {
            self.time().map(Some)
        } else {
            Ok(None)
        }
    }
    pub(crate) fn duration(&mut self) -> DResult<Duration> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(invalid(format!(
                "duration nanoseconds {nanos} out of range"
            )));
        }
        Ok(Duration::new(secs, nanos))
    }
    pub(crate) fn opt_duration(&mut self) -> DResult<Option<Duration>> {
        if self.flag()? {
            self.duration().map(Some)
        } else {
            Ok(None)
        }
    }
    pub(crate) fn id(&mut self) -> DResult<MessageId> {
        Ok(MessageId(uuid::Uuid::from_bytes(self.array()?)))
    }
    pub(crate) fn channel(&mut self) -> DResult<ChannelName> {
        let text = self.str()?;
        ChannelName::new(&text).map_err(|e| invalid(format!("bad channel name: {e}")))
    }
    pub(crate) fn config(&mut self) -> DResult<ChannelConfig> {
        Ok(ChannelConfig {
            max_age: self.opt_duration()?,
            max_bytes: self.opt_u64()?,
            max_messages: self.opt_u64()?,
            discard: match self.u8()? {
                0 => Discard::RejectNew,
                1 => Discard::DropOldest,
                n => return Err(invalid(format!("unknown discard policy {n}"))),
            },
            dedup_window: self.duration()?,
        })
    }
    /// Fails unless every byte was read.
    pub(crate) fn finish(&self, what: &str) -> DResult<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(invalid(format!(
                "{} bytes left over after the {what}",
                self.0.len()
            )))
        }
    }
    pub(crate) fn envelope(&mut self) -> DResult<Envelope> {
        let channel = self.channel()?;
        let id = self.id()?;
        let correlation_id = self.opt_str()?;
        let causation_id = if self.flag()? { Some(self.id()?) } else { None };
        let timestamp = self.time()?;
        let sender = self.opt_str()?;
        let receiver = self.opt_str()?;
        let kind = self.str()?;
        let priority =
            Priority::from_u8(self.u8()?).map_err(|e| invalid(format!("bad priority: {e}")))?;
        let reply_to = if self.flag()? {
            Some(self.channel()?)
        } else {
            None
        };
        let deadline = self.opt_time()?;
        let not_before = self.opt_time()?;
        let attempt = self.u32()?;
        let tenant = self.opt_str()?;
        let trace = self.opt_str()?;
        let count = self.u32()?;
        let mut headers = BTreeMap::new();
        for _ in 0..count {
            let k = self.str()?;
            let v = self.str()?;
            // Keys are written sorted and unique; anything else is not our encoding.
            if headers.last_key_value().is_some_and(|(last, _)| *last >= k) {
                return Err(invalid("header keys out of order or repeated"));
            }
            headers.insert(k, v);
        }
        let content_type = self.str()?;
        let raw = self.bytes()?;
        let payload = match self.1 {
            Some(base) if !raw.is_empty() => base.slice_ref(raw),
            _ => bytes::Bytes::copy_from_slice(raw),
        };
        Ok(Envelope {
            channel,
            header: Header {
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
                content_type: content_type.into(),
            },
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_damage() {
        let mut out = Vec::new();
        write_frame(&mut out, b"hello");
        assert_eq!(read_frame(&out), Frame::Ok(b"hello", out.len()));
        assert_eq!(read_frame(&out[..out.len() - 1]), Frame::Incomplete);
        assert_eq!(read_frame(&out[..5]), Frame::Incomplete);
        assert_eq!(read_frame(&[0u8; 40]), Frame::Zeros);
        let mut flipped = out.clone();
        flipped[FRAME_HEADER + 1] ^= 0x10;
        assert!(matches!(read_frame(&flipped), Frame::Corrupt(_)));
        let mut flipped = out.clone();
        flipped[0] ^= 0x01;
        assert!(matches!(read_frame(&flipped), Frame::Corrupt(_)));
    }
}
