//! UEBA (seed 000): per-agent baselines of what each agent sends, and anomaly events
//! when it deviates.
//!
//! For every sender the detector learns, over a window that starts with the agent's
//! first message (`learn_for`), three things: the kinds it sends, the peers it sends
//! to (the header's `receiver`), and its message rate in fixed buckets (`bucket`).
//! After the window the baseline is frozen and each published message is checked:
//!
//! - `new_kind`: a kind the agent never sent while learning (reported once per kind);
//! - `new_peer`: a receiver it never sent to while learning (once per peer);
//! - `rate_spike`: the current bucket's count is above `mean + k·σ` of the learned
//!   buckets and at least `min_spike` (once per bucket). σ is floored at √mean (and
//!   1), as for a Poisson rate, so an agent that sent exactly the same number every
//!   bucket does not alarm on one extra message.
//!
//! Anomalies are published as [`Anomaly`] messages (kind `security.anomaly`) on
//! [`ANOMALY_CHANNEL`] by a task started with [`UebaDetector::start_publisher`], and
//! counted in `agentbus_anomalies_total{agent, detector}`. Memory is bounded: at most
//! 100,000 senders (one `too_many_agents` anomaly when exceeded) and 10,000 kinds and
//! peers per sender. The detector runs inline as
//! a bus observer (a map lookup and a few additions per message) and hands anomalies to
//! the publisher through a bounded channel; system channels (`_sys.…`) are ignored, so
//! anomaly events never feed themselves.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::{Bus, BusEvent, BusObserver, ChannelName, Message, Priority, PublishOptions};
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Senders tracked at most.
const MAX_AGENTS: usize = 100_000;
/// Kinds and peers remembered per sender at most (beyond, new ones are not reported).
const MAX_SET: usize = 10_000;

/// Where anomalies are published.
pub const ANOMALY_CHANNEL: &str = "_sys.security.anomaly";

/// An anomaly event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Anomaly {
    /// The agent that deviated.
    pub agent: String,
    /// `new_kind`, `new_peer` or `rate_spike`.
    pub detector: String,
    /// What was seen, in words.
    pub detail: String,
    /// The observed value (messages in the bucket for `rate_spike`, else 1).
    pub observed: f64,
    /// The baseline it was compared with (mean rate for `rate_spike`, else the number
    /// of kinds or peers learned).
    pub baseline: f64,
    /// The message that triggered it.
    pub message_id: String,
    /// When (RFC 3339).
    #[schemars(with = "String")]
    pub at: DateTime<Utc>,
}

impl Message for Anomaly {
    const KIND: &'static str = "security.anomaly";
}

/// Settings of the detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UebaConfig {
    /// How long each agent's baseline is learned, from its first message.
    pub learn_for: Duration,
    /// The rate bucket.
    pub bucket: Duration,
    /// k in `mean + k·σ`.
    pub sigma: f64,
    /// A spike needs at least this many messages in a bucket.
    pub min_spike: u64,
    /// Rate detection needs at least this many learned buckets.
    pub min_buckets: usize,
}

impl Default for UebaConfig {
    /// Learn 10 minutes, 10-second buckets, 3σ, spikes of 20 messages or more, 6
    /// buckets at least.
    fn default() -> Self {
        UebaConfig {
            learn_for: Duration::from_secs(600),
            bucket: Duration::from_secs(10),
            sigma: 3.0,
            min_spike: 20,
            min_buckets: 6,
        }
    }
}

#[derive(Debug)]
struct Baseline {
    started: DateTime<Utc>,
    kinds: HashSet<String>,
    peers: HashSet<String>,
    /// Counts of the completed buckets while learning.
    buckets: Vec<u64>,
    /// Index of the current bucket (since `started`) and its count.
    current: i64,
    count: u64,
    spiked: bool,
    frozen: Option<(f64, f64)>,
}

/// The UEBA detector; register it as a bus observer, then start its publisher.
#[derive(Debug)]
pub struct UebaDetector {
    config: UebaConfig,
    agents: Mutex<HashMap<String, Baseline>>,
    tx: mpsc::Sender<Anomaly>,
    rx: Mutex<Option<mpsc::Receiver<Anomaly>>>,
    detected: AtomicU64,
    dropped: AtomicU64,
    overflowed: AtomicBool,
}

impl UebaDetector {
    /// A detector with `config`.
    pub fn new(config: UebaConfig) -> Arc<UebaDetector> {
        let (tx, rx) = mpsc::channel(1024);
        Arc::new(UebaDetector {
            config,
            agents: Mutex::new(HashMap::new()),
            tx,
            rx: Mutex::new(Some(rx)),
            detected: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            overflowed: AtomicBool::new(false),
        })
    }

    /// Starts the task that publishes anomalies on `bus` (the bus this detector
    /// observes, or another). Call once; later calls return `None`.
    pub fn start_publisher(&self, bus: &Bus) -> Option<JoinHandle<()>> {
        let mut rx = self.rx.lock().take()?;
        let bus = bus.clone();
        Some(tokio::spawn(async move {
            let Ok(channel) = ChannelName::new(ANOMALY_CHANNEL) else {
                return;
            };
            while let Some(anomaly) = rx.recv().await {
                let options = PublishOptions::new()
                    .priority(Priority::High)
                    .sender("ueba");
                if let Err(e) = bus.publish_with(&channel, &anomaly, &options).await {
                    tracing::warn!(error = %e, agent = %anomaly.agent, "anomaly not published");
                }
            }
        }))
    }

    /// Anomalies detected so far, and how many were not published because the
    /// publisher was behind.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.detected.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    fn raise(&self, anomaly: Anomaly) {
        self.detected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            "agentbus_anomalies_total",
            "agent" => anomaly.agent.clone(),
            "detector" => anomaly.detector.clone()
        )
        .increment(1);
        tracing::warn!(agent = %anomaly.agent, detector = %anomaly.detector, detail = %anomaly.detail, "anomaly");
        if self.tx.try_send(anomaly).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn observe(
        &self,
        agent: &str,
        kind: &str,
        peer: Option<&str>,
        message_id: String,
        at: DateTime<Utc>,
    ) {
        let bucket_ms = i64::try_from(self.config.bucket.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let learn_ms = i64::try_from(self.config.learn_for.as_millis()).unwrap_or(i64::MAX);
        let mut raised = Vec::new();
        {
            let mut agents = self.agents.lock();
            if !agents.contains_key(agent) && agents.len() >= MAX_AGENTS {
                // Memory stays bounded even with endless spoofed sender names; the
                // overflow is itself worth an alarm, once.
                drop(agents);
                if !self.overflowed.swap(true, Ordering::Relaxed) {
                    self.raise(Anomaly {
                        agent: agent.to_string(),
                        detector: "too_many_agents".into(),
                        detail: format!(
                            "more than {MAX_AGENTS} distinct senders; new ones are not tracked"
                        ),
                        observed: MAX_AGENTS as f64,
                        baseline: MAX_AGENTS as f64,
                        message_id,
                        at,
                    });
                }
                return;
            }
            let b = agents.entry(agent.to_string()).or_insert_with(|| Baseline {
                started: at,
                kinds: HashSet::new(),
                peers: HashSet::new(),
                buckets: Vec::new(),
                current: 0,
                count: 0,
                spiked: false,
                frozen: None,
            });
            let since = (at - b.started).num_milliseconds().max(0);
            let learning = since < learn_ms;
            let index = since / bucket_ms;
            if index != b.current {
                // Close the current bucket and any empty ones in between, if they
                // lie inside the learning window.
                let learned_end = learn_ms / bucket_ms;
                let mut i = b.current;
                while i < index && i < learned_end {
                    b.buckets.push(if i == b.current { b.count } else { 0 });
                    i += 1;
                }
                b.current = index;
                b.count = 0;
                b.spiked = false;
            }
            b.count += 1;
            if learning {
                b.kinds.insert(kind.to_string());
                if let Some(peer) = peer {
                    b.peers.insert(peer.to_string());
                }
            } else {
                if b.frozen.is_none() {
                    let n = b.buckets.len().max(1) as f64;
                    let mean = b.buckets.iter().sum::<u64>() as f64 / n;
                    let var = b
                        .buckets
                        .iter()
                        .map(|c| (*c as f64 - mean).powi(2))
                        .sum::<f64>()
                        / n;
                    b.frozen = Some((mean, var.sqrt()));
                }
                if b.kinds.len() < MAX_SET && b.kinds.insert(kind.to_string()) {
                    raised.push(("new_kind", format!("agent '{agent}' sent kind '{kind}', which it never sent while learning"), 1.0, (b.kinds.len() - 1) as f64));
                }
                if let Some(peer) = peer {
                    if b.peers.len() < MAX_SET && b.peers.insert(peer.to_string()) {
                        raised.push(("new_peer", format!("agent '{agent}' sent to '{peer}', a peer it never sent to while learning"), 1.0, (b.peers.len() - 1) as f64));
                    }
                }
                if let Some((mean, std)) = b.frozen {
                    let std = std.max(mean.sqrt()).max(1.0);
                    let threshold = mean + self.config.sigma * std;
                    if !b.spiked
                        && b.buckets.len() >= self.config.min_buckets
                        && b.count >= self.config.min_spike
                        && b.count as f64 > threshold
                    {
                        b.spiked = true;
                        raised.push((
                            "rate_spike",
                            format!(
                                "agent '{agent}' sent {} messages in {:?}, over its baseline of {mean:.1} + {}σ (σ {std:.1})",
                                b.count, self.config.bucket, self.config.sigma
                            ),
                            b.count as f64,
                            mean,
                        ));
                    }
                }
            }
        }
        for (detector, detail, observed, baseline) in raised {
            self.raise(Anomaly {
                agent: agent.to_string(),
                detector: detector.into(),
                detail,
                observed,
                baseline,
                message_id: message_id.clone(),
                at,
            });
        }
    }
}

impl BusObserver for UebaDetector {
    fn on_event(&self, event: &BusEvent<'_>) {
        let BusEvent::Published {
            envelope,
            receipt,
            at,
            ..
        } = event
        else {
            return;
        };
        // System traffic (heartbeats, anomalies themselves) is not agent behaviour;
        // replies on `_inbox.*` are.
        if receipt.duplicate || envelope.channel.as_str().starts_with("_sys.") {
            return;
        }
        let Some(agent) = envelope.header.sender.as_deref() else {
            return;
        };
        self.observe(
            agent,
            &envelope.header.kind,
            envelope.header.receiver.as_deref(),
            envelope.header.id.to_string(),
            *at,
        );
    }
}
