//! The same workload through agentbus on Redis and through the raw redis-rs client,
//! in one run, with the ratio:
//!
//! ```text
//! cargo run --release -p agentbus-redis --example bench_vs_raw -- [MESSAGES] [URL] [--dedup]
//! ```
//!
//! Workload: publish → consume → ack of 256-byte payloads on one channel and one
//! group, 1 producer : 1 consumer and 8 : 8, batches of 128 (agentbus: `publish_batch`,
//! `next_batch(128)`, `ack_all`; raw: a pipeline of 128 `XADD`s, `XREADGROUP COUNT 128
//! BLOCK`, one `XACK` with every id). Latency is publish-to-receive, per message.
//! Keys live under a fresh prefix and are deleted afterwards. Each run also reports
//! the CPU time per message of the Redis server (`INFO cpu`, which counts every client
//! of the server) and of this process (Linux), so the ratio can be explained.
//!
//! agentbus's channel has dedup off by default here, as a raw client has none;
//! `--dedup` keeps the default dedup window (2 minutes), as users get it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    ack_all, ChannelConfig, ChannelName, ChannelPattern, Discard, Envelope, SubscribeOptions,
    Transport,
};
use agentbus_redis::{RedisOptions, RedisTransport};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

const PAYLOAD: usize = 256;
const BATCH: usize = 128;

struct Figures {
    msgs_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU time per message of the Redis server and of this process during the run.
    cpu: Cpu,
}

/// CPU time per message, in µs: where the time of a run goes.
#[derive(Default)]
struct Cpu {
    server_us: f64,
    client_us: f64,
}

/// CPU seconds used so far by this process (Linux `/proc/self/stat`; 0 elsewhere).
fn own_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, in clock ticks of 1/100 s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds used so far by the Redis server (`INFO cpu`).
async fn server_cpu(url: &str) -> anyhow::Result<f64> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum())
}

/// Runs `run` and measures the CPU both sides used for `messages` messages.
async fn measured<F>(url: &str, messages: u64, run: F) -> anyhow::Result<Figures>
where
    F: std::future::Future<Output = anyhow::Result<Figures>>,
{
    let (server0, client0) = (server_cpu(url).await?, own_cpu());
    let mut figures = run.await?;
    let (server1, client1) = (server_cpu(url).await?, own_cpu());
    figures.cpu = Cpu {
        server_us: (server1 - server0) * 1e6 / messages as f64,
        client_us: (client1 - client0) * 1e6 / messages as f64,
    };
    Ok(figures)
}

fn payload(base: Instant) -> Vec<u8> {
    let mut p = (base.elapsed().as_nanos() as u64).to_be_bytes().to_vec();
    p.resize(PAYLOAD, b'x');
    p
}

fn sent_at(p: &[u8]) -> u64 {
    p.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn percentiles(mut lat: Vec<u64>) -> (f64, f64) {
    lat.sort_unstable();
    let at = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    (at(0.50), at(0.99))
}

async fn through_agentbus(
    url: &str,
    prefix: &str,
    producers: usize,
    consumers: usize,
    messages: u64,
    dedup: bool,
) -> anyhow::Result<Figures> {
    let transport = RedisTransport::connect(url, RedisOptions::default().prefix(prefix)).await?;
    let channel = ChannelName::new("bench.pipeline")?;
    transport
        .configure_channels(
            ChannelPattern::from(channel.clone()),
            ChannelConfig {
                max_messages: Some(10_000_000),
                max_bytes: Some(1 << 32),
                discard: Discard::RejectNew,
                dedup_window: if dedup {
                    ChannelConfig::default().dedup_window
                } else {
                    Duration::ZERO
                },
                ..ChannelConfig::default()
            },
        )
        .await?;
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let mut consumer_tasks = Vec::new();
    for _ in 0..consumers {
        let mut consumer = transport
            .subscribe(
                SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                    .group("bench")
                    .prefetch(BATCH * 2),
            )
            .await?;
        let received = received.clone();
        consumer_tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while received.load(Ordering::Relaxed) < messages {
                let batch = match tokio::time::timeout(
                    Duration::from_millis(200),
                    consumer.next_batch(BATCH),
                )
                .await
                {
                    Ok(b) => b?,
                    Err(_) => continue,
                };
                let now = base.elapsed().as_nanos() as u64;
                for d in &batch {
                    lat.push(now.saturating_sub(sent_at(&d.envelope().payload)));
                }
                ack_all(&batch).await?;
                received.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, agentbus::Error>(lat)
        }));
    }
    let start = Instant::now();
    let mut producer_tasks = Vec::new();
    for p in 0..producers as u64 {
        let transport = transport.clone();
        let channel = channel.clone();
        let share = messages / producers as u64 + u64::from(p < messages % producers as u64);
        producer_tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < share {
                let n = (share - sent).min(BATCH as u64);
                let batch: Vec<Envelope> = (0..n)
                    .map(|_| Envelope::new(channel.clone(), "bench", payload(base)))
                    .collect();
                for r in transport.publish_batch(batch).await {
                    r?;
                }
                sent += n;
            }
            Ok::<_, agentbus::Error>(())
        }));
    }
    // The first failing task ends the run (awaiting in order would wait forever for
    // consumers that can no longer reach the total).
    finish(producer_tasks).await?;
    let lat: Vec<u64> = finish(consumer_tasks)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let elapsed = start.elapsed();
    transport.delete_everything().await?;
    let (p50_us, p99_us) = percentiles(lat);
    Ok(Figures {
        msgs_per_s: messages as f64 / elapsed.as_secs_f64(),
        p50_us,
        p99_us,
        cpu: Cpu::default(),
    })
}

/// The raw client's connections get agentbus's default response timeout (5 s):
/// redis-rs's own default (500 ms) fails blocked reads on a loaded machine, which
/// ended raw consumers early and left the run waiting for them.
fn config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(RedisOptions::default().response_timeout))
}

/// Awaits every task; the first error (of a task or of its join) is returned at once.
async fn finish<T, E>(tasks: Vec<tokio::task::JoinHandle<Result<T, E>>>) -> anyhow::Result<Vec<T>>
where
    E: Into<anyhow::Error>,
{
    futures::future::try_join_all(
        tasks
            .into_iter()
            .map(|t| async move { t.await?.map_err(Into::into) }),
    )
    .await
}

async fn through_raw_client(
    url: &str,
    prefix: &str,
    producers: usize,
    consumers: usize,
    messages: u64,
) -> anyhow::Result<Figures> {
    let client = redis::Client::open(url)?;
    let mut admin = client
        .get_multiplexed_async_connection_with_config(&config())
        .await?;
    let key = format!("{prefix}:raw");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg("bench")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await?;
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let mut consumer_tasks = Vec::new();
    for c in 0..consumers {
        // Blocking reads need a connection each.
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config())
            .await?;
        let received = received.clone();
        let key = key.clone();
        consumer_tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let name = format!("c{c}");
            let options = StreamReadOptions::default()
                .group("bench", &name)
                .count(BATCH)
                .block(100);
            while received.load(Ordering::Relaxed) < messages {
                let reply: StreamReadReply = conn.xread_options(&[&key], &[">"], &options).await?;
                let now = base.elapsed().as_nanos() as u64;
                let mut ids = Vec::new();
                for stream in reply.keys {
                    for entry in stream.ids {
                        if let Some(redis::Value::BulkString(p)) = entry.map.get("p") {
                            lat.push(now.saturating_sub(sent_at(p)));
                        }
                        ids.push(entry.id);
                    }
                }
                if !ids.is_empty() {
                    let _: u64 = conn.xack(&key, "bench", &ids).await?;
                    received.fetch_add(ids.len() as u64, Ordering::Relaxed);
                }
            }
            Ok::<_, redis::RedisError>(lat)
        }));
    }
    let start = Instant::now();
    let mut producer_tasks = Vec::new();
    for p in 0..producers as u64 {
        let mut conn = admin.clone();
        let key = key.clone();
        let share = messages / producers as u64 + u64::from(p < messages % producers as u64);
        producer_tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < share {
                let n = (share - sent).min(BATCH as u64);
                let mut pipe = redis::pipe();
                for _ in 0..n {
                    pipe.xadd(&key, "*", &[("p", payload(base))]).ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
                sent += n;
            }
            Ok::<_, redis::RedisError>(())
        }));
    }
    // The first failing task ends the run (awaiting in order would wait forever for
    // consumers that can no longer reach the total).
    finish(producer_tasks).await?;
    let lat: Vec<u64> = finish(consumer_tasks)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let elapsed = start.elapsed();
    let _: u64 = admin.del(&key).await?;
    let (p50_us, p99_us) = percentiles(lat);
    Ok(Figures {
        msgs_per_s: messages as f64 / elapsed.as_secs_f64(),
        p50_us,
        p99_us,
        cpu: Cpu::default(),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let (flags, mut args): (Vec<String>, Vec<String>) =
        std::env::args().skip(1).partition(|a| a.starts_with("--"));
    let dedup = flags.iter().any(|f| f == "--dedup");
    if let Some(unknown) = flags.iter().find(|f| *f != "--dedup") {
        anyhow::bail!("unknown flag {unknown}: the only flag is --dedup");
    }
    args.reverse();
    let messages: u64 = args.pop().map_or(Ok(50_000), |a| a.parse())?;
    let url = args
        .pop()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string());
    println!(
        "publish → consume → ack, {PAYLOAD} B payloads, batches of {BATCH}, {messages} messages per run, agentbus dedup {}",
        if dedup { "on (2-minute window)" } else { "off" }
    );
    for (producers, consumers) in [(1, 1), (8, 8)] {
        let prefix = format!("abbench-{:08x}", fastrand::u32(..));
        let raw = measured(
            &url,
            messages,
            through_raw_client(&url, &prefix, producers, consumers, messages),
        )
        .await?;
        let bus = measured(
            &url,
            messages,
            through_agentbus(&url, &prefix, producers, consumers, messages, dedup),
        )
        .await?;
        println!(
            "{producers}:{consumers}  raw redis-rs {:>9.0} msg/s (p50 {:>8.0} µs, p99 {:>8.0} µs)   \
             agentbus {:>9.0} msg/s (p50 {:>8.0} µs, p99 {:>8.0} µs)   agentbus/raw throughput {:.2}",
            raw.msgs_per_s,
            raw.p50_us,
            raw.p99_us,
            bus.msgs_per_s,
            bus.p50_us,
            bus.p99_us,
            bus.msgs_per_s / raw.msgs_per_s
        );
        println!(
            "     CPU per message: raw server {:.1} µs + client {:.1} µs   agentbus server {:.1} µs \
             + client {:.1} µs",
            raw.cpu.server_us, raw.cpu.client_us, bus.cpu.server_us, bus.cpu.client_us
        );
    }
    Ok(())
}
