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
    /// How long a private group's consumers outlive a vanished process (default 5 min).
    pub private_inactive_threshold: Duration,
    /// The NATS monitoring endpoint (`http://host:8222`), read by `durability()` for
    /// the JetStream sync interval; default none (the interval is then reported as
    /// unknown, with the server's default).
    pub monitor_url: Option<String>,
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
            private_inactive_threshold: Duration::from_secs(300),
            monitor_url: None,
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
