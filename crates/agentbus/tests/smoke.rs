//! Quick end-to-end checks of the bus on the memory engine.

use std::time::Duration;

use agentbus::{
    Bus, ChannelName, ChannelPattern, ErrorKind, GatherSpec, Message, SubscribeOptions,
};

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug, PartialEq)]
struct Ping {
    n: u32,
}
impl Message for Ping {
    const KIND: &'static str = "ping";
}

#[tokio::test]
async fn request_reply_and_gather() {
    let bus = Bus::memory();
    let channel = ChannelName::new("svc.echo").unwrap();
    let e = bus
        .request::<Ping, Ping>(&channel, &Ping { n: 1 }, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoResponders);

    for name in ["a", "b"] {
        let mut sub = bus
            .subscribe(SubscribeOptions::new(ChannelPattern::from(channel.clone())))
            .await
            .unwrap();
        let b = bus.clone();
        tokio::spawn(async move {
            while let Ok(d) = sub.next().await {
                let ping: Ping = d.envelope().decode_json().unwrap();
                let reply = b
                    .reply_envelope(d.envelope(), &Ping { n: ping.n + 1 }, Some(name))
                    .unwrap();
                b.publish_envelope(reply).await.unwrap();
                d.ack().await.unwrap();
            }
        });
    }
    let reply: Ping = bus
        .request(&channel, &Ping { n: 1 }, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply, Ping { n: 2 });
    let result = bus
        .gather::<Ping, Ping>(
            &channel,
            &Ping { n: 10 },
            &GatherSpec::new(Duration::from_secs(5)).expect(["a", "b", "c"]),
        )
        .await
        .unwrap();
    assert_eq!(result.replies.len(), 2);
    assert_eq!(result.missing, vec!["c".to_string()]);
    assert!(result.timed_out);
}
