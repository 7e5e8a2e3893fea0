//! Printing: the human forms and the JSON forms of what the commands show.
//!
//! Rules: results go to stdout, everything else (errors, logs) to stderr. With
//! `--json` every value is printed as compact JSON on one line, so a stream of messages
//! is JSON Lines and every output can be piped into `jq`. Human output keeps one line
//! per message; text that came off the bus (kinds, headers, non-JSON payloads) has its
//! control characters escaped so a message can never break the line or the terminal.
//!
//! Everything here builds `String`s or `serde_json::Value`s; the commands write them,
//! so the formats are unit-tested without a process.

use std::borrow::Cow;
use std::io::Write;

use agentbus::{DeadLetter, Envelope, PublishReceipt};
use serde::Serialize;
use serde_json::{json, Value};

/// Writes one line to stdout. A closed pipe comes back as an `io::Error` of kind
/// `BrokenPipe`, which `main` treats as a quiet end.
pub(crate) fn line(text: impl AsRef<str>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_ref().as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Writes `value` as one line of compact JSON to stdout.
pub(crate) fn json_line(value: &impl Serialize) -> anyhow::Result<()> {
    line(serde_json::to_string(value)?)
}

/// The payload as a JSON value: the JSON itself when it is JSON, otherwise the same
/// `{"$bytes": [...]}` form the envelope's own JSON uses.
pub(crate) fn payload_value(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or_else(|_| json!({ "$bytes": payload }))
}

/// The payload for humans: compact JSON, or a quoted string when it is text that is
/// not JSON, or its size when it is binary.
pub(crate) fn payload_text(payload: &[u8]) -> String {
    match serde_json::from_slice::<Value>(payload) {
        Ok(value) => value.to_string(),
        Err(_) => match std::str::from_utf8(payload) {
            // Serialized as a JSON string: quoted, with newlines and controls escaped.
            Ok(text) => Value::String(text.to_string()).to_string(),
            Err(_) => format!("<{} bytes, not UTF-8>", payload.len()),
        },
    }
}

/// The JSON form of a received message, as printed by `sub --json` and `req --json`
/// (one object per line). Absent optional fields are `null`, so every object has
/// every key.
pub(crate) fn envelope_json(envelope: &Envelope) -> Value {
    let header = &envelope.header;
    json!({
        "id": header.id,
        "channel": envelope.channel,
        "kind": header.kind,
        "priority": header.priority,
        "correlation_id": header.correlation_id,
        "sender": header.sender,
        "attempt": header.attempt,
        "headers": header.headers,
        "payload": payload_value(&envelope.payload),
    })
}

/// A received message on one human-readable line:
/// `channel  kind  payload  id=… priority=… attempt=… [correlation=…] [sender=…] [k=v…]`.
pub(crate) fn envelope_line(envelope: &Envelope) -> String {
    let header = &envelope.header;
    let mut text = format!(
        "{}  {}  {}  id={} priority={} attempt={}",
        envelope.channel,
        safe(&header.kind),
        payload_text(&envelope.payload),
        header.id,
        header.priority,
        header.attempt,
    );
    if let Some(correlation) = &header.correlation_id {
        text.push_str(&format!(" correlation={}", safe(correlation)));
    }
    if let Some(sender) = &header.sender {
        text.push_str(&format!(" sender={}", safe(sender)));
    }
    for (key, value) in &header.headers {
        text.push_str(&format!(" {}={}", safe(key), safe(value)));
    }
    text
}

/// A publish receipt in one human line.
pub(crate) fn receipt_line(verb: &str, receipt: &PublishReceipt) -> String {
    if receipt.duplicate {
        format!(
            "duplicate {} on {}: already stored as sequence {}, not stored again",
            receipt.id, receipt.channel, receipt.sequence
        )
    } else {
        format!(
            "{verb} {} on {}: sequence {}, {} group{} subscribed",
            receipt.id,
            receipt.channel,
            receipt.sequence,
            receipt.groups,
            if receipt.groups == 1 { "" } else { "s" }
        )
    }
}

/// Dead letters as a table, oldest first.
pub(crate) fn dead_letter_table(letters: &[DeadLetter]) -> String {
    let rows = letters
        .iter()
        .map(|letter| {
            vec![
                letter.id.to_string(),
                letter.envelope.channel.to_string(),
                safe(&letter.envelope.header.kind).into_owned(),
                letter.reason.to_string(),
                letter.attempts.to_string(),
                letter.dead_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                letter
                    .last_error
                    .as_deref()
                    .map(|e| truncate(&safe(e), 60))
                    .unwrap_or_default(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "ID",
            "CHANNEL",
            "KIND",
            "REASON",
            "ATTEMPTS",
            "DEAD AT (UTC)",
            "LAST ERROR",
        ],
        &rows,
    )
}

/// One dead letter in full, for `dlq show`.
pub(crate) fn dead_letter_detail(letter: &DeadLetter) -> String {
    let header = &letter.envelope.header;
    let mut fields: Vec<(&str, String)> = vec![
        ("dead letter", letter.id.to_string()),
        ("reason", letter.reason.to_string()),
        ("attempts", letter.attempts.to_string()),
        ("dead at", letter.dead_at.to_rfc3339()),
        (
            "group",
            if letter.group.is_empty() {
                "-".into()
            } else {
                safe(&letter.group).into_owned()
            },
        ),
        (
            "last error",
            letter
                .last_error
                .as_deref()
                .map(|e| safe(e).into_owned())
                .unwrap_or_else(|| "-".into()),
        ),
        ("message id", header.id.to_string()),
        ("channel", letter.envelope.channel.to_string()),
        ("kind", safe(&header.kind).into_owned()),
        ("priority", header.priority.to_string()),
        ("timestamp", header.timestamp.to_rfc3339()),
    ];
    let optional = [
        ("correlation", header.correlation_id.clone()),
        ("causation", header.causation_id.map(|id| id.to_string())),
        ("sender", header.sender.clone()),
        ("receiver", header.receiver.clone()),
        ("reply to", header.reply_to.as_ref().map(|c| c.to_string())),
        ("deadline", header.deadline.map(|d| d.to_rfc3339())),
        ("tenant", header.tenant.clone()),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            fields.push((name, safe(&value).into_owned()));
        }
    }
    for (key, value) in &header.headers {
        fields.push(("header", format!("{}={}", safe(key), safe(value))));
    }
    fields.push(("payload", payload_text(&letter.envelope.payload)));
    let width = fields.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    fields
        .iter()
        .map(|(name, value)| format!("{name:<width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A plain text table: a header row, then one row per entry, columns separated by two
/// spaces and padded to the widest cell. Prints `(none)` under the header when empty.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let render = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            if i + 1 < cells.len() {
                let pad = width.saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text
    };
    let mut lines = vec![render(headers.to_vec())];
    if rows.is_empty() {
        lines.push("(none)".to_string());
    }
    for row in rows {
        lines.push(render(row.iter().map(String::as_str).collect()));
    }
    lines.join("\n")
}

/// `text` with control characters escaped, so it stays on its line.
pub(crate) fn safe(text: &str) -> Cow<'_, str> {
    if text.chars().any(char::is_control) {
        Cow::Owned(
            text.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    }
}

/// At most `max` characters of `text`, with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbus::{ChannelName, DeadReason, MessageId, Priority};

    fn sample() -> Envelope {
        let mut envelope = Envelope::new(
            ChannelName::new("orders.created").unwrap(),
            "order.created",
            &br#"{"n":1,"items":["a"]}"#[..],
        )
        .with_priority(Priority::High)
        .with_correlation("wf-7")
        .with_sender("shop");
        envelope.header.attempt = 2;
        envelope
            .header
            .headers
            .insert("source".into(), "cli".into());
        envelope
    }

    #[test]
    fn envelope_json_has_exactly_the_contract_fields() {
        let envelope = sample();
        let value = envelope_json(&envelope);
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "attempt",
                "channel",
                "correlation_id",
                "headers",
                "id",
                "kind",
                "payload",
                "priority",
                "sender"
            ]
        );
        assert_eq!(value["id"], envelope.header.id.to_string());
        assert_eq!(value["channel"], "orders.created");
        assert_eq!(value["kind"], "order.created");
        assert_eq!(value["priority"], "high");
        assert_eq!(value["correlation_id"], "wf-7");
        assert_eq!(value["sender"], "shop");
        assert_eq!(value["attempt"], 2);
        assert_eq!(value["headers"], json!({"source": "cli"}));
        assert_eq!(value["payload"], json!({"n": 1, "items": ["a"]}));
        // One line when printed.
        assert!(!serde_json::to_string(&value).unwrap().contains('\n'));
    }

    #[test]
    fn envelope_json_uses_null_for_absent_fields_and_bytes_for_binary() {
        let envelope = Envelope::new(ChannelName::new("raw").unwrap(), "bin", vec![0u8, 255]);
        let value = envelope_json(&envelope);
        assert_eq!(value["correlation_id"], Value::Null);
        assert_eq!(value["sender"], Value::Null);
        assert_eq!(value["headers"], json!({}));
        assert_eq!(value["payload"], json!({"$bytes": [0, 255]}));
    }

    #[test]
    fn envelope_line_is_one_readable_line() {
        let envelope = sample();
        let text = envelope_line(&envelope);
        assert_eq!(
            text,
            format!(
                "orders.created  order.created  {{\"items\":[\"a\"],\"n\":1}}  id={} \
                 priority=high attempt=2 correlation=wf-7 sender=shop source=cli",
                envelope.header.id
            )
        );
        let mut nasty = Envelope::new(ChannelName::new("x").unwrap(), "k\nk", &b"not\njson"[..]);
        nasty
            .header
            .headers
            .insert("h".into(), "a\u{1b}[31m".into());
        let text = envelope_line(&nasty);
        assert!(!text.contains('\n') && !text.contains('\u{1b}'), "{text}");
        assert!(text.contains(r#""not\njson""#), "{text}");
    }

    #[test]
    fn payload_text_forms() {
        assert_eq!(payload_text(b"{ \"a\" : 1 }"), r#"{"a":1}"#);
        assert_eq!(payload_text(b"plain"), r#""plain""#);
        assert_eq!(payload_text(&[0xff, 0xfe]), "<2 bytes, not UTF-8>");
    }

    #[test]
    fn receipt_lines() {
        let mut receipt = PublishReceipt {
            id: MessageId::new(),
            channel: ChannelName::new("a.b").unwrap(),
            sequence: 7,
            duplicate: false,
            groups: 1,
        };
        assert_eq!(
            receipt_line("published", &receipt),
            format!(
                "published {} on a.b: sequence 7, 1 group subscribed",
                receipt.id
            )
        );
        receipt.duplicate = true;
        assert!(receipt_line("published", &receipt).starts_with("duplicate"));
    }

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["NAME", "N"],
            &[
                vec!["long-name".into(), "1".into()],
                vec!["x".into(), "22".into()],
            ],
        );
        assert_eq!(text, "NAME       N\nlong-name  1\nx          22");
        assert_eq!(table(&["A", "B"], &[]), "A  B\n(none)");
    }

    #[test]
    fn dead_letter_forms() {
        let letter = DeadLetter {
            id: MessageId::new(),
            envelope: sample(),
            group: "workers".into(),
            reason: DeadReason::MaxDeliveries,
            attempts: 5,
            last_error: Some("boom\nagain".into()),
            dead_at: chrono::Utc::now(),
        };
        let listed = dead_letter_table(std::slice::from_ref(&letter));
        assert_eq!(listed.lines().count(), 2);
        assert!(listed.contains("max_deliveries") && listed.contains(r"boom\nagain"));
        let detail = dead_letter_detail(&letter);
        assert!(detail.contains("group        workers"), "{detail}");
        assert!(detail.contains("header       source=cli"), "{detail}");
        assert!(
            detail.ends_with(r#"payload      {"items":["a"],"n":1}"#),
            "{detail}"
        );
    }

    #[test]
    fn truncation_and_escaping() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(safe("plain"), "plain");
        assert_eq!(safe("a\tb"), r"a\tb");
    }
}
