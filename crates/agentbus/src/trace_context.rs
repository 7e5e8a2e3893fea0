//! W3C trace context (`traceparent`) on envelopes, so one trace follows a request
//! through several agents on any engine (the header travels with the message).
//!
//! Every publish through the [`Bus`](crate::Bus) stamps the header:
//!
//! - no (valid) `trace` yet: a new trace starts, `00-<trace-id>-<span-id>-01`;
//! - a `trace` already there (set by the caller, or copied by the agent runtime from
//!   the message being handled, or by a reply from its request): the trace id is kept,
//!   a new span id stands for this publish, and the previous span id is kept in the
//!   free header [`PARENT_SPAN_HEADER`], so exporters can link the hop to its parent.
//!
//! The span id in a message's `traceparent` is the id of its publish span; the
//! handling of the message is a child of it. A malformed `trace` is replaced by a new
//! root (and the bad value dropped), as the W3C spec asks of a receiver.

use std::fmt;

use crate::envelope::Header;

/// The free header that keeps the span id of the previous hop.
pub const PARENT_SPAN_HEADER: &str = "trace.parent_span_id";

/// A parsed `traceparent` (version 00).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace id: 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The span id: 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

fn hex<const N: usize, const TWICE: usize>(bytes: &[u8; N]) -> String {
    let mut out = [0u8; TWICE];
    write_hex(&mut out, bytes);
    ascii_string(&out)
}

/// Writes `bytes` as lowercase hex into `out` (twice their length). Into a buffer,
/// not a `String` a character at a time: every request and reply is stamped, and
/// per-character pushes cost four times as much (callgrind).
fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// `bytes` (hex digits and dashes) as a `String`.
fn ascii_string(bytes: &[u8]) -> String {
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .unwrap_or_default()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let (high, low) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
        // Non-digits are 0x10 and up: one check for the whole text, after the loop.
        bad |= high | low;
        *byte = high << 4 | (low & 0xf);
    }
    (bad < 0x10).then_some(out)
}

/// The value of each lowercase hex digit; 0x10 for every other byte.
const HEX: [u8; 256] = {
    let mut table = [0x10u8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let bytes = fastrand::u64(..).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        if out.iter().any(|b| *b != 0) {
            return out;
        }
    }
}

impl TraceParent {
    /// A new sampled trace with a new span.
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: random_nonzero(),
            span_id: random_nonzero(),
            flags: 1,
        }
    }

    /// The same trace, a new span.
    pub fn child(&self) -> Self {
        TraceParent {
            span_id: random_nonzero(),
            ..*self
        }
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (lowercase). Other versions are accepted
    /// when their first four fields have this form, as the spec asks.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        // Version 00, what agentbus writes: fixed positions, no splitting.
        if let Some(fields) = text.strip_prefix("00-").filter(|f| f.len() == 52) {
            let (trace_id, span_id, flags) = (
                unhex::<16>(fields.get(..32)?)?,
                unhex::<8>(fields.get(33..49)?)?,
                unhex::<1>(fields.get(50..)?)?[0],
            );
            let dashes = fields.as_bytes()[32] == b'-' && fields.as_bytes()[49] == b'-';
            let nonzero = trace_id.iter().any(|b| *b != 0) && span_id.iter().any(|b| *b != 0);
            return (dashes && nonzero).then_some(TraceParent {
                trace_id,
                span_id,
                flags,
            });
        }
        let mut parts = text.split('-');
        let version = parts.next()?;
        let trace_id = unhex::<16>(parts.next()?)?;
        let span_id = unhex::<8>(parts.next()?)?;
        let flags = unhex::<1>(parts.next()?)?[0];
        let version = unhex::<1>(version)?[0];
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        if trace_id.iter().all(|b| *b == 0) || span_id.iter().all(|b| *b == 0) {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The `traceparent` text, `00-<trace id>-<span id>-<flags>` (55 bytes).
    pub fn encode(&self) -> String {
        let mut out = *b"00-________________________________-________________-__";
        write_hex(&mut out[3..35], &self.trace_id);
        write_hex(&mut out[36..52], &self.span_id);
        write_hex(&mut out[53..55], &[self.flags]);
        ascii_string(&out)
    }

    /// The trace id as 32 hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex::<16, 32>(&self.trace_id)
    }

    /// The span id as 16 hex digits.
    pub fn span_id_hex(&self) -> String {
        hex::<8, 16>(&self.span_id)
    }
}

/// Stamps `header` for a publish: a new root, or a child of the trace it carries.
pub fn stamp(header: &mut Header) {
    match header.trace.as_deref().and_then(TraceParent::parse) {
        Some(parent) => {
            header
                .headers
                .insert(PARENT_SPAN_HEADER.to_string(), parent.span_id_hex());
            header.trace = Some(parent.child().encode());
        }
        None => {
            header.headers.remove(PARENT_SPAN_HEADER);
            header.trace = Some(TraceParent::new_root().encode());
        }
    }
}

/// The trace id of `header`'s `traceparent`, if it has a valid one.
pub fn trace_id(header: &Header) -> Option<String> {
    header
        .trace
        .as_deref()
        .and_then(TraceParent::parse)
        .map(|t| t.trace_id_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_spec_example() {
        let text = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let parsed = TraceParent::parse(text).unwrap();
        assert_eq!(parsed.to_string(), text);
        assert_eq!(parsed.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(parsed.flags, 1);
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        for _ in 0..200 {
            let root = TraceParent::new_root();
            let child = root.child();
            assert_eq!(TraceParent::parse(&root.encode()), Some(root));
            assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
            assert_eq!(child.span_id_hex().len(), 16);
        }
        // A later version with more fields is read for its first four.
        assert!(
            TraceParent::parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x")
                .is_some()
        );
    }

    #[test]
    fn stamping_starts_a_trace_or_continues_it() {
        let mut header = Header::new("k");
        stamp(&mut header);
        let root = TraceParent::parse(header.trace.as_deref().unwrap()).unwrap();
        assert!(!header.headers.contains_key(PARENT_SPAN_HEADER));
        stamp(&mut header);
        let child = TraceParent::parse(header.trace.as_deref().unwrap()).unwrap();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(header.headers[PARENT_SPAN_HEADER], root.span_id_hex());
        header.trace = Some("garbage".into());
        stamp(&mut header);
        let fresh = TraceParent::parse(header.trace.as_deref().unwrap()).unwrap();
        assert_ne!(fresh.trace_id, root.trace_id);
        assert!(!header.headers.contains_key(PARENT_SPAN_HEADER));
    }
}
