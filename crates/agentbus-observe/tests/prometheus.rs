//! Scrapes the Prometheus endpoint over HTTP and checks the numbers against the
//! traffic the test made. One test per binary: the recorder is process-wide.

use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    Bus, ChannelName, ChannelPattern, DeadReason, MemoryEngine, Message, MetricsObserver,
    SubscribeOptions,
};
use agentbus_observe::prometheus::poll_once;
use agentbus_observe::PrometheusEndpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug)]
struct Reading {
    n: u32,
}
impl Message for Reading {
    const KIND: &'static str = "test.reading";
}

async fn scrape(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// The value of the series `name{labels}` where every `key="value"` in `labels` is
/// present.
fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_scrape_reports_what_the_bus_did() {
    let endpoint = PrometheusEndpoint::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // A second recorder in one process is refused with a clear error.
    let again = PrometheusEndpoint::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap_err();
    assert!(again.to_string().contains("already installed"), "{again}");

    let engine = MemoryEngine::new();
    let clock = engine.clock();
    let bus = Bus::builder(Arc::new(engine))
        .clock(clock)
        .observer(Arc::new(MetricsObserver))
        .build();
    let channel = ChannelName::new("scrape.readings").unwrap();
    let mut sub = bus
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .group("readers")
                .max_deliveries(2),
        )
        .await
        .unwrap();
    for n in 0..6 {
        bus.publish(&channel, &Reading { n }).await.unwrap();
    }
    // 3 acked, 1 rejected, 1 nacked twice (redelivered once, then dead-lettered),
    // 1 left in flight.
    for _ in 0..3 {
        sub.next().await.unwrap().ack().await.unwrap();
    }
    sub.next()
        .await
        .unwrap()
        .reject(DeadReason::Rejected, "bad reading")
        .await
        .unwrap();
    let nacked = sub.next().await.unwrap();
    nacked
        .nack(Duration::ZERO, Some("try again".into()))
        .await
        .unwrap();
    let held = sub.next().await.unwrap();
    let again = sub.next().await.unwrap();
    assert_eq!(again.attempt(), 2);
    again
        .nack(Duration::ZERO, Some("still bad".into()))
        .await
        .unwrap();
    poll_once(bus.transport().as_ref()).await.unwrap();

    let (head, body) = scrape(endpoint.addr(), "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let ch = ("channel", "scrape.readings");
    let g = ("group", "readers");
    assert_eq!(
        value(
            &body,
            "agentbus_published_total",
            &[ch, ("kind", "test.reading")]
        ),
        Some(6.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "agentbus_delivered_total", &[ch, g]),
        Some(7.0)
    );
    assert_eq!(
        value(&body, "agentbus_redelivered_total", &[ch, g]),
        Some(1.0)
    );
    assert_eq!(value(&body, "agentbus_acked_total", &[ch, g]), Some(3.0));
    assert_eq!(value(&body, "agentbus_nacked_total", &[ch, g]), Some(2.0));
    assert_eq!(value(&body, "agentbus_rejected_total", &[ch, g]), Some(1.0));
    assert_eq!(
        value(
            &body,
            "agentbus_dead_lettered_total",
            &[ch, ("reason", "rejected")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &body,
            "agentbus_dead_lettered_total",
            &[ch, ("reason", "max_deliveries")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&body, "agentbus_publish_to_ack_seconds_count", &[ch]),
        Some(3.0)
    );
    assert_eq!(value(&body, "agentbus_in_flight", &[g]), Some(1.0));
    assert_eq!(value(&body, "agentbus_queue_depth", &[g]), Some(0.0));
    assert_eq!(value(&body, "agentbus_dead_letters", &[]), Some(2.0));
    assert!(body.contains("# TYPE agentbus_publish_to_ack_seconds histogram"));

    let (head, _) = scrape(endpoint.addr(), "/nope").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    held.ack().await.unwrap();
}
