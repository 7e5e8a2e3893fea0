//! OTLP export against an in-process collector: the spans of a request going through
//! two agents arrive over HTTP as one trace with correct parent links.
#![cfg(feature = "otlp")]

use std::sync::Arc;
use std::time::Duration;

use agentbus::{Agent, AgentDescriptor, Bus, ChannelName, Context, MemoryEngine, Message};
use agentbus_observe::otlp::{OtlpConfig, OtlpExporter};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug)]
struct Ask {
    n: u32,
}
impl Message for Ask {
    const KIND: &'static str = "otlp.ask";
}
#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug)]
struct Answer {
    n: u32,
}
impl Message for Answer {
    const KIND: &'static str = "otlp.answer";
}

/// A minimal OTLP/HTTP collector: keeps every posted body and the request path.
async fn collector() -> (String, Arc<Mutex<Vec<(String, Value)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                let (head_end, length, path) = loop {
                    let n = stream.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the request ended early");
                    data.extend_from_slice(&buf[..n]);
                    if let Some(pos) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&data[..pos]).to_string();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .trim()
                            .parse()
                            .unwrap();
                        let path = head.split_whitespace().nth(1).unwrap().to_string();
                        break (pos + 4, length, path);
                    }
                };
                while data.len() < head_end + length {
                    let n = stream.read(&mut buf).await.unwrap();
                    data.extend_from_slice(&buf[..n]);
                }
                let body: Value =
                    serde_json::from_slice(&data[head_end..head_end + length]).unwrap();
                store.lock().push((path, body));
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    )
                    .await
                    .unwrap();
            });
        }
    });
    (format!("http://{addr}"), received)
}

#[tokio::test]
async fn spans_of_a_request_arrive_as_one_trace() {
    let (endpoint, received) = collector().await;
    let exporter = Arc::new(OtlpExporter::start(OtlpConfig::new(&endpoint)).unwrap());
    let bus = Bus::builder(Arc::new(MemoryEngine::new()))
        .observer(exporter.clone())
        .build();
    let back = Agent::builder(AgentDescriptor::new("back", "back").sends::<Answer>())
        .handle("otlp.back", |ctx: Context, ask: Ask| async move {
            ctx.reply(&Answer { n: ask.n * 2 }).await?;
            Ok(())
        })
        .spawn(&bus)
        .await
        .unwrap();
    let front = Context::new(
        bus.clone(),
        AgentDescriptor::new("front", "front").sends::<Ask>(),
    );
    let answer: Answer = front
        .request(
            &ChannelName::new("otlp.back").unwrap(),
            &Ask { n: 21 },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(answer.n, 42);
    back.shutdown(Duration::from_secs(1)).await;
    exporter.flush().await.unwrap();

    let received = received.lock().clone();
    assert!(!received.is_empty());
    assert!(received.iter().all(|(path, _)| path == "/v1/traces"));
    let spans: Vec<Value> = received
        .iter()
        .flat_map(|(_, body)| {
            assert_eq!(
                body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
                "agentbus"
            );
            body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .unwrap()
                .clone()
        })
        .collect();
    let named = |name: &str| -> Value {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no span '{name}' in {spans:#?}"))
            .clone()
    };
    let publish_ask = named("publish otlp.back");
    let process_ask = named("process otlp.back");
    let inbox_publish = spans
        .iter()
        .find(|s| s["name"].as_str().unwrap().starts_with("publish _inbox."))
        .unwrap();
    let trace = publish_ask["traceId"].as_str().unwrap();
    assert_eq!(trace.len(), 32);
    for span in [&process_ask, inbox_publish] {
        assert_eq!(span["traceId"], trace, "{span}");
    }
    assert_eq!(publish_ask["kind"], 4);
    assert_eq!(process_ask["kind"], 5);
    assert_eq!(process_ask["parentSpanId"], publish_ask["spanId"]);
    assert_eq!(process_ask["status"]["code"], 1);
    // The reply continues the request's span.
    assert_eq!(inbox_publish["parentSpanId"], publish_ask["spanId"]);
    assert_eq!(exporter.counts(), (spans.len() as u64, 0, 0));
}

#[tokio::test]
async fn a_collector_that_is_down_is_counted_not_fatal() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exporter =
        Arc::new(OtlpExporter::start(OtlpConfig::new(format!("http://127.0.0.1:{port}"))).unwrap());
    let bus = Bus::builder(Arc::new(MemoryEngine::new()))
        .observer(exporter.clone())
        .build();
    bus.publish(&ChannelName::new("otlp.nobody").unwrap(), &Ask { n: 1 })
        .await
        .unwrap();
    exporter.flush().await.unwrap();
    assert_eq!(exporter.counts(), (0, 0, 1));
}
