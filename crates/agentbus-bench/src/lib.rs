//! Load generators for agentbus.
//!
//! The same workloads back `agentbus bench` (which prints throughput and p50/p99/p999
//! latency) and the criterion benches in `benches/`. Every workload takes any
//! [`Transport`], so the memory engine and each backend are measured the same way.
//! Latency is measured from just before publish to just after delivery: the publish
//! instant travels in the first 8 bytes of the payload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    Bus, ChannelConfig, ChannelName, ChannelPattern, Discard, Envelope, ErrorKind, Message, Result,
    SubscribeOptions, Transport,
};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// What a workload measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// A short description: workload and shape.
    pub name: String,
    /// Messages (or round trips) completed.
    pub messages: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Messages (or round trips) per second.
    pub throughput: f64,
    /// Latency percentiles in microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
}

impl BenchReport {
    fn new(name: String, messages: u64, elapsed: Duration, latencies: &Histogram<u64>) -> Self {
        let us = |q: f64| latencies.value_at_quantile(q) as f64 / 1_000.0;
        BenchReport {
            name,
            messages,
            elapsed,
            throughput: messages as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
        }
    }

    /// One line for people.
    pub fn line(&self) -> String {
        format!(
            "{:<56} {:>9} msgs {:>8.3} s {:>12.0} msg/s   p50 {:>9.1} µs   p99 {:>9.1} µs   p999 {:>9.1} µs",
            self.name,
            self.messages,
            self.elapsed.as_secs_f64(),
            self.throughput,
            self.p50_us,
            self.p99_us,
            self.p999_us
        )
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Settings of the publish → deliver → ack pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineSpec {
    /// Concurrent publishers.
    pub producers: usize,
    /// Consumers in one group.
    pub consumers: usize,
    /// Messages in total.
    pub messages: u64,
    /// Payload bytes per message.
    pub payload_bytes: usize,
    /// Messages per publish batch and per fetch.
    pub batch: usize,
    /// Unconsumed messages the channel holds before publishers get `Full`.
    pub backlog: u64,
}

impl Default for PipelineSpec {
    fn default() -> Self {
        PipelineSpec {
            producers: 1,
            consumers: 1,
            messages: 1_000_000,
            payload_bytes: 256,
            batch: 256,
            backlog: 8_192,
        }
    }
}

fn payload(created_nanos: u64, size: usize) -> Bytes {
    let mut bytes = BytesMut::with_capacity(size.max(8));
    bytes.put_u64(created_nanos);
    bytes.resize(size.max(8), b'x');
    bytes.freeze()
}

fn sent_at(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Publishes `spec.messages` from `spec.producers` tasks in batches, consumed by
/// `spec.consumers` members of one group that ack every message.
///
/// Producers that meet `Full` back off briefly and retry: the channel's limits are the
/// backpressure, as in production.
///
/// # Errors
/// Any transport error other than `Full`.
pub async fn pipeline(transport: Arc<dyn Transport>, spec: PipelineSpec) -> Result<BenchReport> {
    let prefix = format!("bench{}", std::process::id());
    let channel = ChannelName::new(format!("{prefix}.pipeline"))?;
    transport
        .configure_channels(
            ChannelPattern::from(channel.clone()),
            ChannelConfig {
                // A bounded backlog: producers that run ahead meet `Full` and back off,
                // so the run measures a steady state rather than memory growth.
                max_messages: Some(spec.backlog),
                max_bytes: Some(1 << 30),
                discard: Discard::RejectNew,
                dedup_window: Duration::ZERO,
                ..ChannelConfig::default()
            },
        )
        .await?;
    let group = format!("{prefix}-group");
    let mut consumers = Vec::new();
    for _ in 0..spec.consumers.max(1) {
        consumers.push(
            transport
                .subscribe(
                    SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                        .group(group.clone())
                        .prefetch(spec.batch * 4),
                )
                .await?,
        );
    }
    let base = Instant::now();
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut consumer_tasks = Vec::new();
    for mut consumer in consumers {
        let received = received.clone();
        let total = spec.messages;
        let batch = spec.batch;
        consumer_tasks.push(tokio::spawn(async move {
            let mut latencies = histogram();
            while received.load(std::sync::atomic::Ordering::Relaxed) < total {
                let deliveries = match tokio::time::timeout(
                    Duration::from_millis(200),
                    consumer.next_batch(batch),
                )
                .await
                {
                    Ok(result) => result?,
                    Err(_) => continue,
                };
                let now = base.elapsed().as_nanos() as u64;
                for delivery in &deliveries {
                    let _ = latencies.record(
                        now.saturating_sub(sent_at(&delivery.envelope().payload))
                            .max(1),
                    );
                }
                agentbus::ack_all(&deliveries).await?;
                received.fetch_add(
                    deliveries.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            Ok::<_, agentbus::Error>(latencies)
        }));
    }
    let start = Instant::now();
    let mut producer_tasks = Vec::new();
    let producers = spec.producers.max(1) as u64;
    for p in 0..producers {
        let transport = transport.clone();
        let channel = channel.clone();
        let share = spec.messages / producers + u64::from(p < spec.messages % producers);
        producer_tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < share {
                let n = (share - sent).min(spec.batch as u64) as usize;
                // One timestamp per batch: every message of a batch is created at once.
                let created = base.elapsed().as_nanos() as u64;
                let batch: Vec<Envelope> = (0..n)
                    .map(|_| {
                        Envelope::new(
                            channel.clone(),
                            "bench",
                            payload(created, spec.payload_bytes),
                        )
                    })
                    .collect();
                let mut full = false;
                for result in transport.publish_batch(batch).await {
                    match result {
                        Ok(_) => sent += 1,
                        // Refused messages are rebuilt in the next batch (with a fresh
                        // timestamp) once consumers have made room.
                        Err(e) if e.kind() == ErrorKind::Full => full = true,
                        Err(e) => return Err(e),
                    }
                }
                if full {
                    tokio::task::yield_now().await;
                }
            }
            Ok::<_, agentbus::Error>(())
        }));
    }
    for task in producer_tasks {
        task.await.map_err(join_error)??;
    }
    let mut latencies = histogram();
    for task in consumer_tasks {
        let h = task.await.map_err(join_error)??;
        latencies
            .add(&h)
            .map_err(|e| agentbus::Error::new(ErrorKind::Internal, e.to_string()))?;
    }
    let elapsed = start.elapsed();
    let name = format!(
        "{} publish→deliver→ack {}:{} {}B",
        transport.name(),
        spec.producers,
        spec.consumers,
        spec.payload_bytes
    );
    Ok(BenchReport::new(name, spec.messages, elapsed, &latencies))
}

fn join_error(e: tokio::task::JoinError) -> agentbus::Error {
    agentbus::Error::new(ErrorKind::Internal, format!("benchmark task failed: {e}"))
}

/// The request and reply of the round-trip workload.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Echo {
    /// Opaque bytes.
    pub data: String,
}

impl Message for Echo {
    const KIND: &'static str = "bench.echo";
}

/// `iterations` sequential request/reply round trips through the bus to one echo
/// responder; latency is each round trip.
///
/// # Errors
/// Any bus error.
pub async fn request_reply(
    transport: Arc<dyn Transport>,
    iterations: u64,
    payload_bytes: usize,
) -> Result<BenchReport> {
    let bus = Bus::new(transport.clone());
    let channel = ChannelName::new(format!("bench{}.echo", std::process::id()))?;
    let mut subscription = bus
        .subscribe(SubscribeOptions::new(ChannelPattern::from(channel.clone())).group("echo"))
        .await?;
    let responder_bus = bus.clone();
    let responder = tokio::spawn(async move {
        while let Ok(delivery) = subscription.next().await {
            let request: Echo = match delivery.envelope().decode_json() {
                Ok(r) => r,
                Err(_) => continue,
            };
            if let Ok(reply) = responder_bus.reply_envelope(delivery.envelope(), &request, None) {
                let _ = responder_bus.publish_envelope(reply).await;
            }
            let _ = delivery.ack().await;
        }
    });
    let request = Echo {
        data: "x".repeat(payload_bytes),
    };
    // Warm up the inbox and the responder.
    for _ in 0..100 {
        bus.request::<Echo, Echo>(&channel, &request, Duration::from_secs(5))
            .await?;
    }
    let mut latencies = histogram();
    let start = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        bus.request::<Echo, Echo>(&channel, &request, Duration::from_secs(5))
            .await?;
        let _ = latencies.record((t.elapsed().as_nanos() as u64).max(1));
    }
    let elapsed = start.elapsed();
    responder.abort();
    let name = format!(
        "{} request/reply round trip {}B",
        transport.name(),
        payload_bytes
    );
    Ok(BenchReport::new(name, iterations, elapsed, &latencies))
}
