//! What is on the wire, seen from both sides, on the real nats-server
//! (`AGENTBUS_NATS_URL`, default nats://127.0.0.1:4222): messages stored by earlier
//! versions (the envelope header as the NATS header `Agentbus`, or as the JSON
//! `Agentbus-Header`) are still consumed; a message agentbus did not write is dropped
//! without stopping the consumer; and a NATS-native reader sees an agentbus message
//! as the header line, a line feed, then the payload (docs/NATS.md "The frame").

use std::time::Duration;

use agentbus::{
    ack_all, ChannelName, ChannelPattern, Envelope, Header, StartPosition, SubscribeOptions,
    Transport,
};
use agentbus_bench::Echo;
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};
use futures::StreamExt;

fn url() -> String {
    std::env::var("AGENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// A transport on a prefix of its own (memory storage).
async fn connect() -> (String, NatsTransport) {
    let prefix = format!("abwire{}", uuid::Uuid::new_v4().simple());
    let transport = NatsTransport::connect(
        &url(),
        NatsOptions::default()
            .prefix(prefix.clone())
            .storage(NatsStorage::Memory),
    )
    .await
    .expect("nats-server with JetStream at AGENTBUS_NATS_URL");
    (prefix, transport)
}

#[tokio::test]
async fn old_formats_are_read_foreign_messages_skipped_and_the_frame_is_plain_text() {
    let (prefix, transport) = connect().await;
    let channel = ChannelName::new("orders.compat").unwrap();
    let subject = format!("{prefix}.2.orders.compat");
    let js = async_nats::jetstream::new(transport.client().clone());
    // A NATS-native reader of the channel's normal lane, started first.
    let mut native = transport
        .client()
        .subscribe(subject.clone())
        .await
        .expect("subscribe");

    // Stored by an earlier agentbus: the compact header as the NATS header `Agentbus`.
    let old_id = "0192f3a0-c2d4-7b1e-9a3c-5d7e9f1a2b3c";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Agentbus",
        format!("1;id={old_id};ts=1764117773.000000005;kind=test.old;p=2").as_str(),
    );
    js.publish_with_headers(subject.clone(), headers, "old".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    // Older still: the JSON header.
    let legacy = Header::new("test.legacy");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Agentbus-Header",
        serde_json::to_string(&legacy).unwrap().as_str(),
    );
    js.publish_with_headers(subject.clone(), headers, "legacy".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    // Not written by agentbus at all.
    js.publish(subject.clone(), "hello from elsewhere".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    // Written now.
    let current = Envelope::new(
        channel.clone(),
        "test.new",
        b"new\nwith a line feed".to_vec(),
    );
    transport.publish(current.clone()).await.expect("publish");

    let mut consumer = transport
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .group("compat")
                .start(StartPosition::Earliest),
        )
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    while got.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(10), consumer.next_batch(8))
            .await
            .expect("the readable messages come, the foreign one does not stop them")
            .expect("next_batch");
        for delivery in &batch {
            let e = delivery.envelope();
            got.push((e.header.kind.clone(), e.header.id, e.payload.clone()));
        }
        ack_all(&batch).await.expect("ack");
    }
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].0, "test.old");
    assert_eq!(got[0].1.to_string(), old_id);
    assert_eq!(&got[0].2[..], b"old");
    assert_eq!(got[1].0, "test.legacy");
    assert_eq!(got[1].1, legacy.id);
    assert_eq!(&got[1].2[..], b"legacy");
    assert_eq!(got[2].0, "test.new");
    assert_eq!(got[2].1, current.header.id);
    assert_eq!(&got[2].2[..], b"new\nwith a line feed");
    // Nothing else: the foreign message was dropped (and terminated).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), consumer.next_batch(8))
            .await
            .is_err(),
        "the foreign message was delivered"
    );

    // What a NATS-native reader saw of the message written now: no NATS headers (the
    // channel dedups, so only `Nats-Msg-Id`), the header line, then the payload.
    let mut frame = None;
    while frame.is_none() {
        let message = tokio::time::timeout(Duration::from_secs(5), native.next())
            .await
            .expect("the native reader got every message")
            .expect("subscription open");
        if message.payload.starts_with(b"1;id=") {
            frame = Some(message);
        }
    }
    let frame = frame.unwrap();
    let headers = frame.headers.clone().unwrap_or_default();
    assert!(headers.get("Agentbus").is_none());
    assert_eq!(
        headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_string()),
        Some(current.header.id.to_string())
    );
    let text = String::from_utf8(frame.payload.to_vec()).expect("the frame is text here");
    let (line, payload) = text.split_once('\n').expect("a header line");
    assert!(
        line.contains(&format!("id={}", current.header.id)),
        "{line}"
    );
    assert!(line.contains(";kind=test.new;"), "{line}");
    assert_eq!(payload, "new\nwith a line feed");

    drop(consumer);
    transport.close().await.expect("close");
    NatsTransport::delete_prefix(transport.client(), &prefix)
        .await
        .expect("delete the test prefix");
}

/// The typed `Bus::request` reads only a reply's payload (the header is skipped):
/// a good frame still gives the typed reply, and what is not one still fails with a
/// `Schema` error that says what is wrong.
#[tokio::test]
async fn typed_requests_read_the_reply_payload_and_still_refuse_what_is_no_reply() {
    let (prefix, transport) = connect().await;
    let client = transport.client().clone();
    let bus = agentbus::Bus::new(std::sync::Arc::new(transport));
    // A NATS-native responder: the first reply a good frame, then a plain JSON body
    // (no frame), then a frame whose payload is no `Echo`.
    let mut requests = client
        .subscribe(format!("{prefix}_rq.svc.ping"))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let responder = tokio::spawn(async move {
        let mut answers = vec![
            b"1;id=0192f3a0-c2d4-7b1e-9a3c-5d7e9f1a2b3c;ts=1764117773.000000005;kind=bench.echo;p=2\n{\"data\":\"8\"}".to_vec(),
            b"{\"data\":\"9\"}".to_vec(),
            b"1;id=0192f3a0-c2d4-7b1e-9a3c-5d7e9f1a2b3d;ts=1764117773.000000005;kind=bench.echo;p=2\n[1,2]".to_vec(),
        ]
        .into_iter();
        while let Some(request) = requests.next().await {
            let (Some(reply), Some(answer)) = (request.reply, answers.next()) else {
                return;
            };
            client.publish(reply, answer.into()).await.expect("reply");
        }
    });
    let channel = ChannelName::new("svc.ping").unwrap();
    let question = Echo { data: "1".into() };
    let ask = || bus.request::<Echo, Echo>(&channel, &question, Duration::from_secs(5));
    assert_eq!(ask().await.expect("a framed reply").data, "8");
    let e = ask().await.expect_err("a reply without a frame");
    assert_eq!(e.kind(), agentbus::ErrorKind::Schema, "{e}");
    assert!(
        e.message().contains("not an agentbus request or reply"),
        "{e}"
    );
    let e = ask().await.expect_err("a payload that is no Echo");
    assert_eq!(e.kind(), agentbus::ErrorKind::Schema, "{e}");
    assert!(
        e.message().contains("does not decode as 'bench.echo'"),
        "{e}"
    );
    responder.abort();
    NatsTransport::delete_prefix_at(&url(), &prefix)
        .await
        .expect("delete the test prefix");
}
