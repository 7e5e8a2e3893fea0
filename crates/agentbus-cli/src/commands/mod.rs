//! One module per command, and the argument parsers they share.
//!
//! Parsers used as clap `value_parser`s return a `String` error: clap prefixes it with
//! the flag's name and exits 2. Parsing that needs I/O (the payload) happens after clap
//! and raises a [`CliError`] with exit 2 itself.

pub(crate) mod bench;
pub(crate) mod coordination;
pub(crate) mod dlq;
pub(crate) mod doctor;
pub(crate) mod observe;
pub(crate) mod publish;
pub(crate) mod repair;
pub(crate) mod request;
pub(crate) mod stats;
pub(crate) mod subscribe;

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use crate::CliError;

/// The longest duration accepted anywhere. Deadlines are computed as `now + duration`
/// and must stay inside the calendar the library can represent; a century is far
/// beyond any sensible TTL, delay or timeout.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Parses a human duration such as `250ms`, `5s`, `2m` or `1h 30m` (humantime).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration '{text}' ({e}): use a number and a unit, e.g. 250ms, 5s, 2m, 1h")
    })?;
    if duration > MAX_DURATION {
        return Err(format!(
            "duration '{text}' is too long: the most accepted is 100 years"
        ));
    }
    Ok(duration)
}

/// Parses a duration that must be longer than zero (TTLs, request timeouts).
pub(crate) fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!(
            "duration '{text}' must be longer than zero, e.g. 2s"
        ));
    }
    Ok(duration)
}

/// Parses a `key=value` header. The value may be empty and may contain `=`.
pub(crate) fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!(
            "invalid header '{text}': use key=value, e.g. --header source=cli"
        )),
    }
}

/// Reads a payload argument: JSON text, `@file` for a file's contents, or `-` for
/// standard input. The result must be valid JSON; it is kept as given (minus the
/// surrounding whitespace), so key order and number formatting survive.
///
/// # Errors
/// Exit 2 when the file or stdin cannot be read or the text is not JSON, saying which
/// source it was and what to pass instead.
pub(crate) async fn read_payload(arg: &str) -> Result<Bytes, CliError> {
    let (raw, source) = if arg == "-" {
        let mut buffer = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut buffer)
            .await
            .map_err(|e| CliError::usage(format!("could not read the payload from stdin: {e}")))?;
        (buffer, "the payload from stdin".to_string())
    } else if let Some(path) = arg.strip_prefix('@') {
        if path.is_empty() {
            return Err(CliError::usage(
                "payload '@' names no file: use @path/to/file.json",
            ));
        }
        // Read before anything else runs, so blocking here holds nobody up.
        let buffer = std::fs::read(path).map_err(|e| {
            CliError::usage(format!(
                "could not read the payload file '{path}': {e}; check the path after '@'"
            ))
        })?;
        (buffer, format!("the payload in file '{path}'"))
    } else {
        (arg.as_bytes().to_vec(), "the payload".to_string())
    };
    let trimmed = raw.trim_ascii();
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(trimmed) {
        return Err(CliError::usage(format!(
            "{source} is not valid JSON ({e}); pass JSON text such as '{{\"n\":1}}' or \
             '\"hello\"' (mind the shell quoting), @FILE for a file, or - for stdin"
        )));
    }
    Ok(Bytes::copy_from_slice(trimmed))
}

/// Publishes `value` as JSON of kind `test` in unit tests (`Bus::publish` wants a
/// typed `Message`).
#[cfg(test)]
pub(crate) async fn publish_json(
    bus: &agentbus::Bus,
    channel: &str,
    value: serde_json::Value,
    options: &agentbus::PublishOptions,
) -> agentbus::PublishReceipt {
    let channel = agentbus::ChannelName::new(channel).unwrap();
    let mut envelope = agentbus::Envelope::json(channel, "test", &value).unwrap();
    envelope.header = options.to_header("test", bus.clock().now());
    bus.publish_envelope(envelope).await.unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("5").unwrap_err().contains("e.g. 250ms"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1000000years")
            .unwrap_err()
            .contains("too long"));
        assert!(parse_positive_duration("0ms").is_err());
        assert!(parse_positive_duration("1ms").is_ok());
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_header("a="), Ok(("a".into(), String::new())));
        assert!(parse_header("=b").is_err());
        assert!(parse_header("ab").is_err());
    }

    #[tokio::test]
    async fn payloads() {
        assert_eq!(
            &read_payload(" {\"a\": 1} ").await.unwrap()[..],
            b"{\"a\": 1}"
        );
        assert_eq!(&read_payload("\"text\"").await.unwrap()[..], b"\"text\"");
        for bad in ["", "{", "hello", "@"] {
            assert_eq!(read_payload(bad).await.unwrap_err().code(), 2, "{bad}");
        }
        let missing = read_payload("@/definitely/not/here.json")
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("/definitely/not/here.json"));
    }
}
