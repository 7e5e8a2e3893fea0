//! Turning `--backend B` into a [`Transport`].
//!
//! The accepted forms are fixed here so every command reads them the same way. Built
//! in: the embedded `memory` engine, the durable log (`file:DIR`, `agentbus-file`) and
//! `redis://` / `rediss://` (`agentbus-redis`; `?prefix=NAME` picks the key prefix)
//! and `nats://` (`agentbus-nats`, JetStream). The other forms are recognized so that a user gets "not available in this build
//! yet" (exit 1) rather than "bad backend" (exit 2) for a spelling that will work once
//! that backend arrives.

use std::path::PathBuf;
use std::sync::Arc;

use agentbus::{MemoryEngine, Transport};

use crate::CliError;

/// The forms `--backend` accepts, for error messages and help.
const ACCEPTED: &str = "memory, file:DIR, redis://…, nats://…, amqp://…, kafka://… or postgres://…";

/// A parsed `--backend` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BackendSpec {
    /// The in-process memory engine.
    Memory,
    /// The durable log engine in a directory.
    File(PathBuf),
    /// A remote backend: its short name (`redis`, `nats`…) and the URL as given.
    Remote {
        /// `redis`, `nats`, `amqp`, `kafka` or `postgres`.
        name: &'static str,
        /// The whole URL.
        url: String,
    },
}

/// URL schemes and the backend each stands for.
const SCHEMES: &[(&str, &str)] = &[
    ("redis", "redis"),
    ("rediss", "redis"),
    ("nats", "nats"),
    ("amqp", "amqp"),
    ("amqps", "amqp"),
    ("kafka", "kafka"),
    ("postgres", "postgres"),
    ("postgresql", "postgres"),
];

impl BackendSpec {
    /// Parses a `--backend` value.
    ///
    /// # Errors
    /// A usage error (exit 2) listing the accepted forms for anything unrecognized.
    pub(crate) fn parse(spec: &str) -> Result<Self, CliError> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("memory") {
            return Ok(BackendSpec::Memory);
        }
        if let Some(dir) = spec.strip_prefix("file:") {
            if dir.is_empty() {
                return Err(CliError::usage(
                    "backend 'file:' needs a directory, e.g. --backend file:./data",
                ));
            }
            return Ok(BackendSpec::File(PathBuf::from(dir)));
        }
        if let Some((scheme, rest)) = spec.split_once("://") {
            let scheme = scheme.to_ascii_lowercase();
            if let Some((_, name)) = SCHEMES.iter().find(|(s, _)| *s == scheme) {
                if rest.is_empty() {
                    return Err(CliError::usage(format!(
                        "backend '{spec}' has no address after '://', e.g. --backend {scheme}://localhost"
                    )));
                }
                return Ok(BackendSpec::Remote {
                    name,
                    url: spec.to_string(),
                });
            }
        }
        Err(CliError::usage(format!(
            "unknown backend '{spec}': use {ACCEPTED} (or set AGENTBUS_BACKEND)"
        )))
    }

    /// The backend's short name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            BackendSpec::Memory => "memory",
            BackendSpec::File(_) => "file",
            BackendSpec::Remote { name, .. } => name,
        }
    }
}

/// Opens the backend `spec` names.
///
/// # Errors
/// Exit 2 for a value that is not a backend at all; exit 1 for a recognized backend
/// that this build cannot open yet.
pub(crate) async fn open(spec: &str) -> Result<Arc<dyn Transport>, CliError> {
    match BackendSpec::parse(spec)? {
        BackendSpec::Memory => Ok(Arc::new(MemoryEngine::new())),
        BackendSpec::File(dir) => open_file(dir).await,
        BackendSpec::Remote { name: "redis", url } => {
            let redis = agentbus_redis::RedisTransport::connect(
                &url,
                agentbus_redis::RedisOptions::default(),
            )
            .await
            .map_err(|e| CliError::failed(e.to_string()))?;
            Ok(Arc::new(redis))
        }
        BackendSpec::Remote { name: "nats", url } => {
            match agentbus_nats::NatsTransport::connect_url(&url).await {
                Ok(transport) => Ok(Arc::new(transport)),
                Err(e) if e.kind() == agentbus::ErrorKind::InvalidInput => {
                    Err(CliError::usage(e.to_string()))
                }
                Err(e) => Err(CliError::failed(e.to_string())),
            }
        }
        other => Err(CliError::failed(format!(
            "backend '{}' is not available in this build yet; use --backend memory for now",
            other.name()
        ))),
    }
}

/// Opens the durable log in `dir`. Options follow a `?`, `&`-separated:
/// `fsync=always|never|interval(100ms)` (default `always`), `checkpoint=64MiB|off`
/// (log bytes between checkpoints; `off` replays the whole log at open and never
/// deletes a segment), `segment=64MiB` (segment size) and `sync_acks=true|false`
/// (whether an ack waits for its record to be synced; default `true`).
///
/// # Errors
/// Exit 2 for an unknown or malformed option; exit 1 when the directory is locked by
/// another process, damaged (the message says to run `agentbus repair DIR`) or
/// unreadable.
async fn open_file(dir: PathBuf) -> Result<Arc<dyn Transport>, CliError> {
    let text = dir.to_string_lossy().into_owned();
    let (path, options) = match text.split_once('?') {
        Some((path, query)) => (PathBuf::from(path), file_options(query)?),
        None => (dir, agentbus_file::FileOptions::default()),
    };
    let engine =
        tokio::task::spawn_blocking(move || agentbus_file::FileEngine::open(path, options))
            .await
            .map_err(|e| CliError::failed(format!("opening the durable log failed: {e}")))?
            .map_err(|e| CliError::failed(e.to_string()))?;
    Ok(Arc::new(engine))
}

/// The options of a `file:DIR?…` backend string.
fn file_options(query: &str) -> Result<agentbus_file::FileOptions, CliError> {
    let mut options = agentbus_file::FileOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = |what: &str| {
            CliError::usage(format!(
                "bad file backend option '{pair}': {what}. Options: fsync=always|never|\
                 interval(100ms), checkpoint=64MiB|off, segment=64MiB, sync_acks=true|false"
            ))
        };
        match key {
            "fsync" => {
                options = options.fsync(
                    value
                        .parse()
                        .map_err(|e: agentbus::Error| CliError::usage(e.to_string()))?,
                )
            }
            "checkpoint" => {
                options = options.checkpoint_bytes(if value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    Some(parse_bytes(value).ok_or_else(|| bad("expected a size or off"))?)
                })
            }
            "segment" => {
                options = options.segment_bytes(
                    parse_bytes(value).ok_or_else(|| bad("expected a size such as 64MiB"))?,
                )
            }
            "sync_acks" => {
                options = options
                    .sync_settlements(value.parse().map_err(|_| bad("expected true or false"))?)
            }
            _ => return Err(bad("unknown option")),
        }
    }
    Ok(options)
}

/// `4096`, `512KiB`, `64MiB`, `1GiB` (also `KB`/`MB`/`GB`, read as powers of 1024).
fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    number.checked_mul(1 << shift).filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_form() {
        assert_eq!(BackendSpec::parse("memory").unwrap(), BackendSpec::Memory);
        assert_eq!(BackendSpec::parse(" MEMORY ").unwrap(), BackendSpec::Memory);
        assert_eq!(
            BackendSpec::parse("file:/tmp/bus").unwrap(),
            BackendSpec::File(PathBuf::from("/tmp/bus"))
        );
        for (url, name) in [
            ("redis://localhost:6379", "redis"),
            ("rediss://h", "redis"),
            ("nats://127.0.0.1:4222", "nats"),
            ("amqp://guest:guest@h/%2f", "amqp"),
            ("kafka://broker:9092", "kafka"),
            ("postgres://u@h/db", "postgres"),
            ("postgresql://u@h/db", "postgres"),
        ] {
            assert_eq!(BackendSpec::parse(url).unwrap().name(), name, "{url}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("512KiB"), Some(512 << 10));
        assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("1gb"), Some(1 << 30));
        for bad in ["", "0", "MiB", "12 parsecs", "-1"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn rejects_unknown_forms_with_the_list() {
        for bad in ["", "mem", "file:", "http://x", "redis://", "sqlite:db"] {
            let error = BackendSpec::parse(bad).unwrap_err();
            assert_eq!(error.code(), 2, "{bad}");
        }
        let error = BackendSpec::parse("mongo://x").unwrap_err();
        assert!(error.to_string().contains("file:DIR"), "{error}");
    }

    #[tokio::test]
    async fn memory_and_file_open() {
        let engine = open("memory").await.unwrap();
        assert_eq!(engine.name(), "memory");
        let error = open("kafka://localhost").await.unwrap_err();
        assert_eq!(error.code(), 1);
        assert_eq!(
            error.to_string(),
            "backend 'kafka' is not available in this build yet; use --backend memory for now"
        );
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("file:{}?fsync=interval(50ms)", dir.path().display());
        let engine = open(&spec).await.unwrap();
        assert_eq!(engine.name(), "file");
        assert_eq!(
            engine.stats().await.unwrap().details["fsync"],
            "interval(50ms)"
        );
        let bad = format!("file:{}?fsync=sometimes", dir.path().display());
        assert_eq!(open(&bad).await.unwrap_err().code(), 2);
        engine.close().await.unwrap();
        let spec = format!(
            "file:{}?checkpoint=off&fsync=never&segment=1MiB&sync_acks=false",
            dir.path().display()
        );
        let engine = open(&spec).await.unwrap();
        let details = engine.stats().await.unwrap().details;
        assert_eq!(details["checkpoint_every_bytes"], "off");
        assert_eq!(details["fsync"], "never");
        engine.close().await.unwrap();
        for bad in [
            "checkpoint=lots",
            "segment=0",
            "sync_acks=maybe",
            "colour=blue",
        ] {
            let spec = format!("file:{}?{bad}", dir.path().display());
            let error = open(&spec).await.unwrap_err();
            assert_eq!(error.code(), 2, "{bad}");
            assert!(
                error.to_string().contains("checkpoint=64MiB|off"),
                "{error}"
            );
        }
        assert_eq!(open("bogus").await.unwrap_err().code(), 2);
    }
}
