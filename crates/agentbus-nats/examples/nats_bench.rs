//! agentbus over NATS next to raw async-nats, same workloads, one run, 256-byte
//! payloads. Each workload runs in 5 rounds alternating raw and agentbus (so load
//! from elsewhere on a shared machine hits both sides); latencies are over all
//! rounds, rates are the median round.
//!
//! 1. request/reply round trip (sequential; p50/p99) of a typed `Echo` (256 bytes of
//!    JSON): raw = core NATS `request` to a core responder, each side encoding and
//!    decoding the JSON itself with serde_json; agentbus = `Bus::request` to a `Bus`
//!    responder that replies, then acks (the same serde work: encode, decode,
//!    encode, decode);
//! 2. JetStream publish with a synchronous ack (sequential; msg/s): raw =
//!    `jetstream.publish(..).await?.await?`; agentbus = `Transport::publish`; each
//!    stream has a durable consumer of the subject meanwhile (agentbus: a group), so
//!    the server does the same work per stored message;
//! 3. consume + ack (msg/s) of a backlog of 5 × N messages (at most 120,000; the
//!    published ones topped up), read whole by a new consumer or group each round
//!    (so each round reads the whole backlog): raw = a durable pull
//!    consumer fetching batches of 64 (no-wait pulls), acking each message and
//!    flushing the client once per batch; agentbus = a group with prefetch 64,
//!    `next_batch(64)` and `ack_all`. The same ack mode on both sides: an ack is a
//!    publish to the message's reply subject, not confirmed by the server (no
//!    double ack), and `ack_all` returns once the batch's acks were written to the
//!    socket, which the raw side's flush matches.
//!
//! The raw side publishes without `Nats-Msg-Id`, so JetStream does no dedup for it;
//! agentbus's bench channel has dedup off too (`dedup_window` 0: no `Nats-Msg-Id`), as
//! in the Redis bench. `--dedup` keeps agentbus's default window (2 minutes), as users
//! get it: every stored message then carries `Nats-Msg-Id` and JetStream checks it.
//!
//! ```text
//! cargo run --release -p agentbus-nats --example nats_bench -- [nats://127.0.0.1:4222] [N] [--dedup] [--only rr|publish|consume]
//! ```
//!
//! `--only` runs one workload (consume still publishes its backlog first, untimed), and
//! `--side=raw|agentbus` (with `--only=rr` or `--only=consume`) one side of it: for
//! profiling one path,
//! e.g. under `valgrind --tool=callgrind`. Rounds then no longer alternate, so compare
//! rates from full runs only.
//!
//! Every run uses fresh streams (memory storage, so the disk does not dominate) and
//! deletes them at the end. Both sides run in this one process, with mimalloc as the
//! allocator, as `agentbus-cli` does (`--features bench-system-allocator` for the
//! system's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    ack_all, Bus, ChannelConfig, ChannelName, ChannelPattern, Envelope, SubscribeOptions, Transport,
};
use agentbus_bench::Echo;
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use hdrhistogram::Histogram;

/// mimalloc on both sides, as in agentbus's own binary (`agentbus-cli`); with
/// `--features bench-system-allocator` both sides use the system allocator (glibc's
/// here), whose `malloc`/`free` weigh more on agentbus's side: it allocates twice per
/// delivered message (the shared envelope and its kind) where raw async-nats does not.
#[cfg(not(feature = "bench-system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const PAYLOAD: usize = 256;

/// Raw and agentbus alternate in this many rounds per workload, so that a burst of
/// load from elsewhere on the machine hits both sides rather than one.
const ROUNDS: u64 = 5;

/// The most messages the consume workload reads per round: its backlog (5 × N) stays
/// under the bench channel's default `max_bytes` (64 MiB, about 150,000 messages).
const CONSUME_BACKLOG_MAX: u64 = 120_000;

/// The median of `rates` (sorted in place).
fn median(rates: &mut [f64]) -> f64 {
    rates.sort_by(f64::total_cmp);
    // NaN (printed as such) for a side `--side` left out.
    rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Row {
    workload: &'static str,
    raw: String,
    agentbus: String,
    overhead: String,
}

impl Row {
    /// A row of two figures, whole numbers; `lower_is_better` for latencies.
    fn new(workload: &'static str, raw: f64, ours: f64, lower_is_better: bool) -> Row {
        Row {
            workload,
            raw: format!("{raw:.0}"),
            agentbus: format!("{ours:.0}"),
            overhead: overhead(raw, ours, lower_is_better),
        }
    }

    /// The row of a rate workload: the median round of each side.
    fn rates(workload: &'static str, raw: &mut [f64], ours: &mut [f64]) -> Row {
        Row::new(workload, median(raw), median(ours), false)
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

fn overhead(raw: f64, ours: f64, lower_is_better: bool) -> String {
    let pct = if lower_is_better {
        (ours / raw - 1.0) * 100.0
    } else {
        (raw / ours - 1.0) * 100.0
    };
    format!("{pct:+.0}%")
}

#[tokio::main]
async fn main() -> Res<()> {
    let (flags, positional): (Vec<String>, Vec<String>) =
        std::env::args().skip(1).partition(|a| a.starts_with("--"));
    let dedup = flags.iter().any(|f| f == "--dedup");
    let value = |name: &str| {
        flags
            .iter()
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
    };
    let (only, side) = (value("--only="), value("--side="));
    if let Some(unknown) = flags
        .iter()
        .find(|f| *f != "--dedup" && !f.starts_with("--only=") && !f.starts_with("--side="))
    {
        return Err(format!(
            "unknown flag {unknown}: the flags are --dedup, --only=rr|publish|consume and \
             --side=raw|agentbus (with --only=rr or --only=consume)"
        )
        .into());
    }
    if let Some(o) = only
        .as_deref()
        .filter(|o| !["rr", "publish", "consume"].contains(o))
    {
        return Err(format!("--only={o}: pick rr, publish or consume").into());
    }
    if side.is_some() && !matches!(only.as_deref(), Some("rr" | "consume")) {
        return Err("--side needs --only=rr or --only=consume".into());
    }
    if let Some(s) = side.as_deref().filter(|s| !["raw", "agentbus"].contains(s)) {
        return Err(format!("--side={s}: pick raw or agentbus").into());
    }
    let (raw_side, our_side) = (
        side.as_deref() != Some("agentbus"),
        side.as_deref() != Some("raw"),
    );
    let runs = |workload: &str| only.as_deref().is_none_or(|o| o == workload);
    let mut args = positional.into_iter();
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string());
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let rr_n = (n / 2).max(100);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let raw_stream = format!("rawbench{}", &run[..8]);
    let prefix = format!("abbench{}", &run[..8]);

    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client.clone());
    let transport = Arc::new(
        NatsTransport::connect(
            &url,
            NatsOptions::default()
                .prefix(prefix.clone())
                .storage(NatsStorage::Memory),
        )
        .await?,
    );
    let payload = "x".repeat(PAYLOAD);
    let echo = Echo {
        data: "x".repeat(PAYLOAD - 11), // {"data":"…"} is 256 bytes of JSON
    };
    let mut rows = Vec::new();

    // 1. Request/reply: both responders up, then alternating rounds.
    let raw_responder = {
        let mut responder = client.subscribe(format!("{raw_stream}.rr")).await?;
        let answering = client.clone();
        tokio::spawn(async move {
            while let Some(m) = responder.next().await {
                // The same typed work as the `Bus` responder: decode the request,
                // encode the reply.
                if let (Some(reply), Ok(e)) = (m.reply, serde_json::from_slice::<Echo>(&m.payload))
                {
                    if let Ok(body) = serde_json::to_vec(&e) {
                        let _ = answering.publish(reply, body.into()).await;
                    }
                }
            }
        })
    };
    client.flush().await?;
    let bus = Bus::new(transport.clone() as Arc<dyn Transport>);
    let rr_channel = ChannelName::new("bench.rr")?;
    let our_responder = {
        let mut sub = bus
            .subscribe(
                SubscribeOptions::new(ChannelPattern::from(rr_channel.clone())).group("echo"),
            )
            .await?;
        let answering = bus.clone();
        tokio::spawn(async move {
            while let Ok(delivery) = sub.next().await {
                // Reply, then ack: what a handler does (the raw side copies nothing
                // either).
                let request = delivery.envelope();
                if let Ok(e) = request.decode_json::<Echo>() {
                    let _ = answering.reply(request, &e).await;
                }
                let _ = delivery.ack().await;
            }
        })
    };
    let body = bytes::Bytes::from(payload.clone());
    let (mut raw_rr, mut ours_rr) = (histogram(), histogram());
    #[allow(clippy::reversed_empty_ranges)] // no rounds at all when rr is not run
    let rr_rounds = if runs("rr") { 0..=ROUNDS } else { 1..=0 };
    for round in rr_rounds {
        // Round 0 warms both up and is not recorded.
        let count = if round == 0 { 50 } else { rr_n / ROUNDS };
        for _ in 0..if raw_side { count } else { 0 } {
            let t = Instant::now();
            // Typed like `Bus::request`: encode the request, decode the reply.
            let request = serde_json::to_vec(&echo)?;
            let reply = client
                .request(format!("{raw_stream}.rr"), request.into())
                .await?;
            let _: Echo = serde_json::from_slice(&reply.payload)?;
            if round > 0 {
                raw_rr.record(t.elapsed().as_micros() as u64)?;
            }
        }
        for _ in 0..if our_side { count } else { 0 } {
            let t = Instant::now();
            let _: Echo = bus
                .request(&rr_channel, &echo, Duration::from_secs(10))
                .await?;
            if round > 0 {
                ours_rr.record(t.elapsed().as_micros() as u64)?;
            }
        }
    }
    raw_responder.abort();
    our_responder.abort();
    for (q, name) in [
        (0.5, "request/reply p50 (µs)"),
        (0.99, "request/reply p99 (µs)"),
    ]
    .into_iter()
    .filter(|_| runs("rr"))
    {
        rows.push(Row::new(
            name,
            micros(&raw_rr, q),
            micros(&ours_rr, q),
            true,
        ));
    }

    // 2. JetStream publish, sync ack, alternating rounds of n / ROUNDS.
    let mut raw_js = js
        .get_or_create_stream(stream::Config {
            name: raw_stream.clone(),
            subjects: vec![format!("{raw_stream}.js.>")],
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let channel = ChannelName::new("bench.js")?;
    transport
        .configure_channels(
            ChannelPattern::from(channel.clone()),
            ChannelConfig {
                dedup_window: if dedup {
                    ChannelConfig::default().dedup_window
                } else {
                    Duration::ZERO
                },
                ..ChannelConfig::default()
            },
        )
        .await?;
    println!(
        "agentbus dedup on the JetStream channel: {}",
        if dedup {
            "on (default window: Nats-Msg-Id on every message)"
        } else {
            "off, as on the raw side (no Nats-Msg-Id)"
        }
    );
    // A group exists while publishing, so receipts count it as in real use; the raw
    // stream gets a durable consumer of the subject too, so that the server does the
    // same work per stored message on both sides (a stream with consumers whose
    // filter matches does more per publish than one with none).
    drop(
        transport
            .subscribe(
                SubscribeOptions::new(ChannelPattern::from(channel.clone())).group("consumers"),
            )
            .await?,
    );
    raw_js
        .create_consumer(pull::Config {
            durable_name: Some("consumers".into()),
            filter_subject: format!("{raw_stream}.js.x"),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let envelope = || Envelope::new(channel.clone(), "bench.blob", payload.clone().into_bytes());
    if runs("publish") {
        let (mut raw_rates, mut our_rates) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let t = Instant::now();
            for _ in 0..n / ROUNDS {
                js.publish(format!("{raw_stream}.js.x"), body.clone())
                    .await?
                    .await?;
            }
            raw_rates.push((n / ROUNDS) as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..n / ROUNDS {
                transport.publish(envelope()).await?;
            }
            our_rates.push((n / ROUNDS) as f64 / t.elapsed().as_secs_f64());
        }
        rows.push(Row::rates(
            "JetStream publish, sync ack (msg/s)",
            &mut raw_rates,
            &mut our_rates,
        ));
    }
    // The consume backlog, which every round reads whole: what the publish workload
    // stored, topped up (pipelined, untimed) to 5 × N, at most CONSUME_BACKLOG_MAX, so
    // that a round lasts long enough (rounds of 1,000 took under 10 ms, and noise
    // decided the ratio).
    let published = if runs("publish") {
        (n / ROUNDS) * ROUNDS
    } else {
        0
    };
    let total = (n * ROUNDS).clamp(published, CONSUME_BACKLOG_MAX.max(published));
    if runs("consume") {
        let mut have = published;
        while have < total {
            let k = (total - have).min(256);
            let mut acks = Vec::with_capacity(k as usize);
            for _ in 0..k {
                acks.push(
                    js.publish(format!("{raw_stream}.js.x"), body.clone())
                        .await?,
                );
            }
            for ack in acks {
                ack.await?;
            }
            let envelopes = (0..k).map(|_| envelope()).collect();
            for receipt in transport.publish_batch(envelopes).await {
                receipt?;
            }
            have += k;
        }
    }
    if runs("consume") {
        // 3. Consume + ack of the whole backlog, alternating rounds, each with a new
        //    consumer (raw) or group (agentbus) reading from the start.
        let (mut raw_rates, mut our_rates) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            if !raw_side {
                break;
            }
            let consumer = raw_js
                .create_consumer(pull::Config {
                    durable_name: Some(format!("raw{round}")),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ..Default::default()
                })
                .await?;
            let t = Instant::now();
            let mut got = 0;
            while got < total {
                let mut batch = consumer.fetch().max_messages(64).messages().await?;
                while let Some(m) = batch.next().await {
                    m?.ack().await?;
                    got += 1;
                }
                // What `ack_all` promises: the batch's acks were written to the socket.
                client.flush().await?;
            }
            raw_rates.push(total as f64 / t.elapsed().as_secs_f64());
        }
        for round in 0..ROUNDS {
            if !our_side {
                break;
            }
            let group = SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .group(format!("consumers{round}"))
                .prefetch(64)
                .start(agentbus::StartPosition::Earliest);
            let mut ours = transport.subscribe(group).await?;
            let t = Instant::now();
            let mut got = 0;
            while got < total {
                let batch = ours.next_batch(64).await?;
                got += batch.len() as u64;
                ack_all(&batch).await?;
            }
            our_rates.push(total as f64 / t.elapsed().as_secs_f64());
        }
        rows.push(Row::rates(
            "consume + ack (msg/s)",
            &mut raw_rates,
            &mut our_rates,
        ));
    }
    let _ = raw_js.info().await;
    finish(
        rows,
        n,
        rr_n,
        &url,
        transport,
        &js,
        &raw_stream,
        &client,
        &prefix,
    )
    .await
}

/// Prints the table and deletes what the run created.
#[allow(clippy::too_many_arguments)]
async fn finish(
    rows: Vec<Row>,
    n: u64,
    rr_n: u64,
    url: &str,
    transport: Arc<NatsTransport>,
    js: &jetstream::Context,
    raw_stream: &str,
    client: &async_nats::Client,
    prefix: &str,
) -> Res<()> {
    println!(
        "NATS benchmark: {n} messages ({rr_n} round trips), {PAYLOAD}-byte payloads, memory storage, \
         {ROUNDS} alternating rounds per workload (rates: median round), {url}"
    );
    println!(
        "{:<38} {:>12} {:>12} {:>9}",
        "workload", "raw", "agentbus", "overhead"
    );
    for row in rows {
        println!(
            "{:<38} {:>12} {:>12} {:>9}",
            row.workload, row.raw, row.agentbus, row.overhead
        );
    }
    transport.close().await?;
    js.delete_stream(raw_stream).await?;
    NatsTransport::delete_prefix(client, prefix).await?;
    Ok(())
}
