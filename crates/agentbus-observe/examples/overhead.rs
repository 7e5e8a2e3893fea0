//! What observing costs on the memory engine: the same publish → deliver → ack
//! pipeline through a `Bus` with no observer, with the metrics observer (Prometheus
//! recorder installed), and with metrics + SQLite interaction store + JSON Lines audit.
//! Also the cost of stamping a `traceparent` on a header.
//!
//! `cargo run --release -p agentbus-observe --example overhead`

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    ack_all, Bus, BusObserver, ChannelName, ChannelPattern, Envelope, MemoryEngine,
    MetricsObserver, SubscribeOptions,
};
use agentbus_observe::audit::{AuditConfig, AuditSink};
use agentbus_observe::store::InteractionStore;
use agentbus_observe::PrometheusEndpoint;

const MESSAGES: usize = 200_000;

async fn run(observers: Vec<Arc<dyn BusObserver>>) -> agentbus::Result<f64> {
    let mut builder = Bus::builder(Arc::new(MemoryEngine::new()));
    for observer in observers {
        builder = builder.observer(observer);
    }
    let bus = builder.build();
    let channel = ChannelName::new("bench.overhead")?;
    let mut sub = bus
        .subscribe(SubscribeOptions::new(ChannelPattern::from(channel.clone())).prefetch(1024))
        .await?;
    let started = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut seen = 0;
        while seen < MESSAGES {
            let batch = sub.next_batch(256).await?;
            seen += batch.len();
            ack_all(&batch).await?;
        }
        Ok::<_, agentbus::Error>(())
    });
    let payload = serde_json::json!({"vehicle": "VEH-1", "speed": 88.5});
    for i in 0..MESSAGES {
        let mut envelope = Envelope::json(channel.clone(), "bench.reading", &payload)?;
        envelope.header.sender = Some(format!("agent-{}", i % 8));
        loop {
            match bus.publish_envelope(envelope.clone()).await {
                Ok(_) => break,
                Err(e) if e.kind() == agentbus::ErrorKind::Full => {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    consumer
        .await
        .map_err(|e| agentbus::Error::new(agentbus::ErrorKind::Internal, e.to_string()))??;
    Ok(MESSAGES as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> agentbus::Result<()> {
    let mut header = agentbus::Header::new("k");
    let n = 1_000_000;
    let started = Instant::now();
    for _ in 0..n {
        header.trace = None;
        agentbus::trace_context::stamp(&mut header);
    }
    let root = started.elapsed().as_nanos() as f64 / n as f64;
    let started = Instant::now();
    for _ in 0..n {
        agentbus::trace_context::stamp(&mut header);
    }
    let child = started.elapsed().as_nanos() as f64 / n as f64;
    println!("traceparent stamp: new root {root:.0} ns, child {child:.0} ns");

    println!("pipeline of {MESSAGES} messages, 1 publisher, 1 consumer (batch 256):");
    let none = run(Vec::new()).await?;
    println!("  no observer                      {none:>10.0} msg/s");
    let endpoint = PrometheusEndpoint::start("127.0.0.1:0".parse().expect("an address")).await?;
    let metrics = run(vec![Arc::new(MetricsObserver)]).await?;
    println!("  metrics (Prometheus recorder)    {metrics:>10.0} msg/s");
    let dir = tempfile::tempdir()
        .map_err(|e| agentbus::Error::new(agentbus::ErrorKind::Internal, e.to_string()))?;
    let store = Arc::new(InteractionStore::open(dir.path().join("bench.db"))?);
    let audit = Arc::new(AuditSink::start(AuditConfig::new(
        dir.path().join("audit"),
    ))?);
    let only_store = Arc::new(InteractionStore::open(dir.path().join("only.db"))?);
    let rate = run(vec![only_store.clone()]).await?;
    only_store.flush()?;
    println!(
        "  store only                       {rate:>10.0} msg/s  ({:?})",
        only_store.stats()
    );
    let only_audit = Arc::new(AuditSink::start(AuditConfig::new(
        dir.path().join("only-audit"),
    ))?);
    let rate = run(vec![only_audit.clone()]).await?;
    only_audit.flush()?;
    println!(
        "  audit only                       {rate:>10.0} msg/s  ({:?})",
        only_audit.stats()
    );
    let all = run(vec![
        Arc::new(MetricsObserver),
        store.clone(),
        audit.clone(),
    ])
    .await?;
    println!("  metrics + store + audit          {all:>10.0} msg/s");
    store.flush()?;
    audit.flush()?;
    println!("  store: {:?}\n  audit: {:?}", store.stats(), audit.stats());
    drop(endpoint);
    Ok(())
}
