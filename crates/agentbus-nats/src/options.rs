//! What a user can set: names, stream storage and limits, consumer defaults.

use std::time::Duration;

use agentbus::{Error, Result};
use serde::{Deserialize, Serialize};

/// Where JetStream keeps the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatsStorage {
    /// On disk (the default): survives a server restart; see `agentbus doctor` for what a
    /// receipt guarantees against a machine crash.
    #[default]
    File,
    /// In the server's memory: lost when the server stops.
    Memory,
}

/// The default payload limit of the NATS backend: 1,000,000 bytes, which leaves room
/// for the headers under NATS's default `max_payload` of 1 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1_000_000;

/// Settings of a [`NatsTransport`](crate::NatsTransport). Every field has a documented
/// default (see docs/NATS.md); build with struct update syntax or the setters.
///
/// # Examples
///
/// ```
/// use agentbus_nats::{NatsOptions, NatsStorage};
///
/// let options = NatsOptions::default()
///     .prefix("orders")
///     .storage(NatsStorage::File)
///     .replicas(3);
/// assert_eq!(options.stream_name(), "orders");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// The first subject token of every channel, and the stream's name (default
    /// `agentbus`). Two transports with different prefixes share nothing.
    pub prefix: String,
    /// Stream storage (default [`NatsStorage::File`]).
    pub storage: NatsStorage,
    /// Stream replicas in a cluster (default 1; use 3 in production clusters).
    pub replicas: usize,
    /// Stream-wide age limit (default none).
    pub max_age: Option<Duration>,
    /// Stream-wide byte limit (default none). At the limit publishes fail with `Full`.
    pub max_bytes: Option<u64>,
    /// Stream-wide message limit (default none). At the limit publishes fail with `Full`.
    pub max_messages: Option<u64>,
    /// JetStream's dedup window for `Nats-Msg-Id` (default 2 minutes).
    pub duplicate_window: Duration,
    /// The most unacknowledged messages one group may have outstanding on the server
    /// (JetStream `max_ack_pending` of each lane consumer; default 20,000).
    pub max_ack_pending: i64,
    /// The largest payload accepted (default [`DEFAULT_MAX_PAYLOAD_BYTES`]).
    pub max_payload_bytes: usize,
    /// Dead letters kept, oldest dropped beyond (default 100,000).
    pub max_dead_letters: u64,
    /// How often an idle consumer looks for redeliveries that no new message announces
    /// (ack-wait expiries, delayed nacks of other processes); default 100 ms.
    pub idle_poll: Duration,
    /// How long a private group's consumers outlive a vanished process (default 30 s).
    pub private_inactive_threshold: Duration,
    /// The NATS monitoring endpoint (`http://host:8222`), read by `durability()` for
    /// the JetStream sync interval; default none (the interval is then reported as
    /// unknown, with the server's default).
    pub monitor_url: Option<String>,
    /// `Bus::request` over core NATS request/reply (default true): low latency, "no
    /// responders" straight from the server, at most once (a request is not stored).
    /// False sends requests through the stream like any message (durable, at least
    /// once, a reply inbox channel).
    pub core_requests: bool,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            prefix: "agentbus".to_string(),
            storage: NatsStorage::File,
            replicas: 1,
            max_age: None,
            max_bytes: None,
            max_messages: None,
            duplicate_window: agentbus::transport::DEFAULT_DEDUP_WINDOW,
            max_ack_pending: 20_000,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_dead_letters: 100_000,
            idle_poll: Duration::from_millis(100),
            private_inactive_threshold: Duration::from_secs(30),
            monitor_url: None,
            core_requests: true,
        }
    }
}

impl NatsOptions {
    /// Sets the subject prefix and stream name.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the stream storage.
    pub fn storage(mut self, storage: NatsStorage) -> Self {
        self.storage = storage;
        self
    }

    /// Sets the stream replicas.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Sets the monitoring endpoint read by `durability()`.
    pub fn monitor_url(mut self, url: impl Into<String>) -> Self {
        self.monitor_url = Some(url.into());
        self
    }

    /// Splits a backend URL into the server address and options. Query parameters set
    /// options: `prefix`, `storage` (`file` | `memory`), `replicas`, `monitor` (the
    /// monitoring endpoint, e.g. `http://127.0.0.1:8222`), `max_age_secs`,
    /// `max_bytes`, `max_messages`; the rest of the URL goes to the client as is.
    ///
    /// ```
    /// use agentbus_nats::{NatsOptions, NatsStorage};
    ///
    /// let (server, options) =
    ///     NatsOptions::from_url("nats://127.0.0.1:4222?prefix=jobs&storage=memory")?;
    /// assert_eq!(server, "nats://127.0.0.1:4222");
    /// assert_eq!(options.prefix, "jobs");
    /// assert_eq!(options.storage, NatsStorage::Memory);
    /// # Ok::<(), agentbus::Error>(())
    /// ```
    ///
    /// # Errors
    /// `InvalidInput` naming an unknown parameter or a bad value.
    pub fn from_url(url: &str) -> Result<(String, NatsOptions)> {
        let mut options = NatsOptions::default();
        let Some((server, query)) = url.split_once('?') else {
            return Ok((url.to_string(), options));
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = |what: &str| {
                value.parse::<u64>().map_err(|_| {
                    invalid_input(format!(
                        "NATS URL parameter {what}={value:?} is not a whole number"
                    ))
                })
            };
            match key {
                "prefix" => options.prefix = value.to_string(),
                "storage" => {
                    options.storage = match value {
                        "file" => NatsStorage::File,
                        "memory" => NatsStorage::Memory,
                        _ => {
                            return Err(invalid_input(format!(
                                "NATS URL parameter storage={value:?}: use file or memory"
                            )))
                        }
                    }
                }
                "replicas" => options.replicas = number("replicas")? as usize,
                "monitor" => options.monitor_url = Some(value.to_string()),
                "core_requests" => {
                    options.core_requests = match value {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(invalid_input(format!(
                                "NATS URL parameter core_requests={value:?}: use true or false"
                            )))
                        }
                    }
                }
                "max_age_secs" => {
                    options.max_age = Some(Duration::from_secs(number("max_age_secs")?))
                }
                "max_bytes" => options.max_bytes = Some(number("max_bytes")?),
                "max_messages" => options.max_messages = Some(number("max_messages")?),
                other => {
                    return Err(invalid_input(format!(
                        "unknown NATS URL parameter '{other}': use prefix, storage, replicas, \
                         monitor, core_requests, max_age_secs, max_bytes or max_messages"
                    )))
                }
            }
        }
        options.validate()?;
        Ok((server.to_string(), options))
    }

    /// The name of the stream holding the channels.
    pub fn stream_name(&self) -> String {
        self.prefix.clone()
    }

    /// The name of the stream holding the dead letters.
    pub fn dead_letter_stream_name(&self) -> String {
        format!("{}_dlq", self.prefix)
    }

    /// The subject prefix of dead letters.
    pub(crate) fn dead_letter_prefix(&self) -> String {
        format!("{}_dlq", self.prefix)
    }

    /// Checks the options.
    ///
    /// # Errors
    /// `InvalidInput` for a prefix that is not one token of `[A-Za-z0-9_-]`, zero
    /// replicas, a zero payload limit or poll interval.
    pub fn validate(&self) -> Result<()> {
        let ok = !self.prefix.is_empty()
            && self.prefix.len() <= 64
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(invalid_input(format!(
                "invalid NATS prefix '{}': use 1-64 characters of [A-Za-z0-9_-] (it is a subject \
                 token and the stream's name)",
                self.prefix
            )));
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(invalid_input(format!(
                "replicas must be 1 to 5 (JetStream's limit), not {}",
                self.replicas
            )));
        }
        if self.max_payload_bytes == 0 || self.idle_poll.is_zero() {
            return Err(invalid_input(
                "max_payload_bytes and idle_poll must be larger than zero",
            ));
        }
        Ok(())
    }
}

/// An `InvalidInput` error with `message`.
pub(crate) fn invalid_input(message: impl Into<String>) -> Error {
    Error::new(agentbus::ErrorKind::InvalidInput, message)
}
