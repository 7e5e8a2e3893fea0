//! How an envelope travels in a NATS message, and how names map to subjects.
//!
//! A message on the stream has the subject `<prefix>.<lane>.<channel>` (lane = the
//! priority digit, 4 = critical … 1 = low), the envelope's header as JSON in the NATS
//! header `Agentbus-Header`, the id in `Nats-Msg-Id` (JetStream's dedup key), and the
//! payload as the NATS payload, untouched.

use agentbus::{ChannelName, Envelope, Error, ErrorKind, Header, Priority, Result};
use async_nats::HeaderMap;
use bytes::Bytes;

/// The NATS header that carries the agentbus header as JSON.
pub(crate) const HEADER: &str = "Agentbus-Header";

/// Priority lanes, highest first: the order a consumer looks at them.
pub(crate) const LANES: [Priority; 4] = [
    Priority::Critical,
    Priority::High,
    Priority::Normal,
    Priority::Low,
];

/// The subject a channel's messages of `priority` are stored under.
pub(crate) fn subject(prefix: &str, priority: Priority, channel: &str) -> String {
    format!("{prefix}.{}.{channel}", priority.as_u8())
}

/// The subject filter of one lane of a pattern (our `*`/`>` are NATS's).
pub(crate) fn lane_filter(prefix: &str, priority: Priority, pattern: &str) -> String {
    format!("{prefix}.{}.{pattern}", priority.as_u8())
}

/// The channel a stored subject belongs to, or `None` for a subject outside the layout.
pub(crate) fn channel_of(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (lane, channel) = rest.split_once('.')?;
    if lane.len() == 1 && matches!(lane.as_bytes()[0], b'1'..=b'4') {
        Some(channel.to_string())
    } else {
        None
    }
}

/// NATS headers for `envelope`; with `dedup`, the id as JetStream's dedup key
/// `Nats-Msg-Id` (left out for a channel whose dedup window is zero).
///
/// # Errors
/// [`ErrorKind::Internal`] if the header cannot be encoded (it always can).
pub(crate) fn encode(envelope: &Envelope, dedup: bool) -> Result<HeaderMap> {
    let json = serde_json::to_string(&envelope.header).map_err(|e| {
        Error::new(ErrorKind::Internal, "could not encode the envelope header").with_source(e)
    })?;
    let mut headers = HeaderMap::new();
    if dedup {
        headers.insert("Nats-Msg-Id", envelope.header.id.to_string().as_str());
    }
    headers.insert(HEADER, json.as_str());
    Ok(headers)
}

/// The envelope carried by a stored message.
///
/// # Errors
/// [`ErrorKind::Schema`] when the message was not written by agentbus (no or a bad
/// `Agentbus-Header`), naming the subject.
pub(crate) fn decode(
    prefix: &str,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<Envelope> {
    let channel = channel_of(prefix, subject).ok_or_else(|| {
        Error::new(
            ErrorKind::Schema,
            format!("subject '{subject}' is not of the form '{prefix}.<lane 1-4>.<channel>'"),
        )
    })?;
    let channel = ChannelName::new(channel)?;
    let raw = headers
        .and_then(|h| h.get(HEADER))
        .map(|v| v.as_str())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Schema,
                format!(
                    "message on '{subject}' has no {HEADER} header: it was not published by \
                     agentbus; publish through agentbus or to another subject"
                ),
            )
        })?;
    let header: Header = serde_json::from_str(raw).map_err(|e| {
        Error::new(
            ErrorKind::Schema,
            format!("the {HEADER} header of a message on '{subject}' is not valid: {e}"),
        )
    })?;
    Ok(Envelope {
        channel,
        header,
        payload,
    })
}

/// The envelope carried by a core NATS message (a request on
/// `<prefix>_rq.<channel>`, or a reply on an inbox subject): `channel` is the
/// agentbus channel it belongs to.
///
/// # Errors
/// [`ErrorKind::Schema`] without a valid `Agentbus-Header`; `InvalidChannel` for a
/// subject that is no channel name.
pub(crate) fn decode_core(
    channel: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<Envelope> {
    let channel = ChannelName::new(channel)?;
    let raw = headers
        .and_then(|h| h.get(HEADER))
        .map(|v| v.as_str())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Schema,
                format!(
                    "a message for '{channel}' has no {HEADER} header: it was not sent by agentbus"
                ),
            )
        })?;
    let header: Header = serde_json::from_str(raw).map_err(|e| {
        Error::new(
            ErrorKind::Schema,
            format!("the {HEADER} header of a message for '{channel}' is not valid: {e}"),
        )
    })?;
    Ok(Envelope {
        channel,
        header,
        payload,
    })
}

/// The core NATS subject requests on `channel_or_pattern` travel on (outside the
/// stream, so they are never stored).
pub(crate) fn request_subject(prefix: &str, channel_or_pattern: &str) -> String {
    format!("{prefix}_rq.{channel_or_pattern}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn envelopes_round_trip() {
        let channel = ChannelName::new("a.b").unwrap();
        let envelope =
            Envelope::new(channel, "k", b"{\"n\":1}".to_vec()).with_priority(Priority::Low);
        let headers = encode(&envelope, true).unwrap();
        let subject = subject("p", envelope.header.priority, envelope.channel.as_str());
        let back = decode("p", &subject, Some(&headers), envelope.payload.clone()).unwrap();
        assert_eq!(back, envelope);
        let e = decode("p", &subject, None, Bytes::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Schema);
    }
}
