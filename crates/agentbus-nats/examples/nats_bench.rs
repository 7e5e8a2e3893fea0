//! agentbus over NATS next to raw async-nats, same workloads, one run, 256-byte
//! payloads:
//!
//! 1. request/reply round trip (sequential; p50/p99): raw = core NATS `request` to a
//!    core responder; agentbus = `Bus::request` to a `Bus` responder;
//! 2. JetStream publish with a synchronous ack (sequential; msg/s): raw =
//!    `jetstream.publish(..).await?.await?`; agentbus = `Transport::publish`;
//! 3. consume + ack (msg/s) of a pre-published backlog: raw = a durable pull
//!    consumer fetching batches of 64 and acking each message; agentbus = a group with
//!    prefetch 64, `next_batch(64)` and `ack_all`.
//!
//! ```text
//! cargo run --release -p agentbus-nats --example nats_bench -- [nats://127.0.0.1:4222] [N]
//! ```
//!
//! Every run uses fresh streams (memory storage, so the disk does not dominate) and
//! deletes them at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{ack_all, Bus, ChannelName, ChannelPattern, Envelope, SubscribeOptions, Transport};
use agentbus_bench::Echo;
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use hdrhistogram::Histogram;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const PAYLOAD: usize = 256;

struct Row {
    workload: &'static str,
    raw: String,
    agentbus: String,
    overhead: String,
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
    let mut args = std::env::args().skip(1);
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

    // 1. Request/reply.
    let raw_rr = {
        let mut responder = client.subscribe(format!("{raw_stream}.rr")).await?;
        let answering = client.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = responder.next().await {
                if let Some(reply) = m.reply {
                    let _ = answering.publish(reply, m.payload).await;
                }
            }
        });
        client.flush().await?;
        let mut h = histogram();
        let body = bytes::Bytes::from(payload.clone());
        for _ in 0..50 {
            client
                .request(format!("{raw_stream}.rr"), body.clone())
                .await?;
        }
        for _ in 0..rr_n {
            let t = Instant::now();
            client
                .request(format!("{raw_stream}.rr"), body.clone())
                .await?;
            h.record(t.elapsed().as_micros() as u64)?;
        }
        task.abort();
        h
    };
    let ours_rr = {
        let bus = Bus::new(transport.clone() as Arc<dyn Transport>);
        let channel = ChannelName::new("bench.rr")?;
        let mut sub = bus
            .subscribe(SubscribeOptions::new(ChannelPattern::from(channel.clone())).group("echo"))
            .await?;
        let answering = bus.clone();
        let task = tokio::spawn(async move {
            while let Ok(delivery) = sub.next().await {
                let request = delivery.envelope().clone();
                let _ = delivery.ack().await;
                if let Ok(e) = request.decode_json::<Echo>() {
                    let _ = answering.reply(&request, &e).await;
                }
            }
        });
        let mut h = histogram();
        for _ in 0..50 {
            let _: Echo = bus
                .request(&channel, &echo, Duration::from_secs(10))
                .await?;
        }
        for _ in 0..rr_n {
            let t = Instant::now();
            let _: Echo = bus
                .request(&channel, &echo, Duration::from_secs(10))
                .await?;
            h.record(t.elapsed().as_micros() as u64)?;
        }
        task.abort();
        h
    };
    for (q, name) in [
        (0.5, "request/reply p50 (µs)"),
        (0.99, "request/reply p99 (µs)"),
    ] {
        let (r, o) = (micros(&raw_rr, q), micros(&ours_rr, q));
        rows.push(Row {
            workload: name,
            raw: format!("{r:.0}"),
            agentbus: format!("{o:.0}"),
            overhead: overhead(r, o, true),
        });
    }

    // 2. JetStream publish, sync ack.
    let mut raw_js = js
        .get_or_create_stream(stream::Config {
            name: raw_stream.clone(),
            subjects: vec![format!("{raw_stream}.js.>")],
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let body = bytes::Bytes::from(payload.clone());
    let t = Instant::now();
    for _ in 0..n {
        js.publish(format!("{raw_stream}.js.x"), body.clone())
            .await?
            .await?;
    }
    let raw_pub = n as f64 / t.elapsed().as_secs_f64();
    let channel = ChannelName::new("bench.js")?;
    let group = SubscribeOptions::new(ChannelPattern::from(channel.clone()))
        .group("consumers")
        .prefetch(64)
        .start(agentbus::StartPosition::Earliest);
    drop(transport.subscribe(group.clone()).await?);
    let t = Instant::now();
    for _ in 0..n {
        transport
            .publish(Envelope::new(
                channel.clone(),
                "bench.blob",
                payload.clone().into_bytes(),
            ))
            .await?;
    }
    let ours_pub = n as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        workload: "JetStream publish, sync ack (msg/s)",
        raw: format!("{raw_pub:.0}"),
        agentbus: format!("{ours_pub:.0}"),
        overhead: overhead(raw_pub, ours_pub, false),
    });

    // 3. Consume + ack.
    let consumer = raw_js
        .create_consumer(pull::Config {
            durable_name: Some("raw".to_string()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let t = Instant::now();
    let mut got = 0;
    while got < n {
        let mut batch = consumer.fetch().max_messages(64).messages().await?;
        while let Some(m) = batch.next().await {
            m?.ack().await?;
            got += 1;
        }
    }
    let raw_consume = n as f64 / t.elapsed().as_secs_f64();
    let mut ours = transport.subscribe(group).await?;
    let t = Instant::now();
    let mut got = 0;
    while got < n {
        let batch = ours.next_batch(64).await?;
        got += batch.len() as u64;
        ack_all(&batch).await?;
    }
    let ours_consume = n as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        workload: "consume + ack (msg/s)",
        raw: format!("{raw_consume:.0}"),
        agentbus: format!("{ours_consume:.0}"),
        overhead: overhead(raw_consume, ours_consume, false),
    });
    drop(ours);
    let _ = raw_js.info().await;

    println!(
        "NATS benchmark: {n} messages ({rr_n} round trips), {PAYLOAD}-byte payloads, memory storage, {url}"
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
    js.delete_stream(&raw_stream).await?;
    NatsTransport::delete_prefix(&client, &prefix).await?;
    Ok(())
}
