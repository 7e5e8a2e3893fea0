//! The bus and the agent runtime open `tracing` spans for publish, deliver and handle,
//! carrying channel, kind, correlation id and traceparent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentbus::{Agent, AgentDescriptor, Bus, ChannelName, Context, Message, PublishOptions};
use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::Layer;

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug)]
struct Job {
    n: u32,
}
impl Message for Job {
    const KIND: &'static str = "spans.job";
}

type Seen = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;

struct Record(Seen);

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Record {
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: LayerContext<'_, S>) {
        let mut fields = Fields(BTreeMap::new());
        attrs.record(&mut fields);
        self.0
            .lock()
            .push((attrs.metadata().name().to_string(), fields.0));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn publish_deliver_and_handle_have_spans() {
    let seen: Seen = Arc::default();
    let subscriber = tracing_subscriber::registry()
        .with(Record(seen.clone()))
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    let _guard = tracing::subscriber::set_default(subscriber);

    let bus = Bus::memory();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let agent = Agent::builder(AgentDescriptor::new("worker", "worker"))
        .handle("spans.jobs", move |_ctx: Context, job: Job| {
            let tx = tx.clone();
            async move {
                tracing::info!("inside the handler");
                tx.send(job.n).await?;
                Ok(())
            }
        })
        .spawn(&bus)
        .await
        .unwrap();
    bus.publish_with(
        &ChannelName::new("spans.jobs").unwrap(),
        &Job { n: 7 },
        &PublishOptions::new().correlation("thread-9"),
    )
    .await
    .unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap(),
        Some(7)
    );
    agent.shutdown(Duration::from_secs(1)).await;

    let seen = seen.lock().clone();
    for name in ["agentbus.publish", "agentbus.deliver", "agentbus.handle"] {
        let (_, fields) = seen
            .iter()
            .find(|(n, f)| n == name && f.get("channel").map(String::as_str) == Some("spans.jobs"))
            .unwrap_or_else(|| panic!("no {name} span in {seen:#?}"));
        assert_eq!(fields["kind"], "spans.job", "{name}");
        assert_eq!(fields["correlation_id"], "thread-9", "{name}");
        assert!(
            fields["traceparent"].starts_with("00-"),
            "{name}: {fields:?}"
        );
    }
    let handle = &seen.iter().find(|(n, _)| n == "agentbus.handle").unwrap().1;
    assert_eq!(handle["agent"], "worker");
    // The delivery and the handling see the traceparent the publish stamped.
    let publish = &seen
        .iter()
        .find(|(n, _)| n == "agentbus.publish")
        .unwrap()
        .1;
    assert_eq!(handle["traceparent"], publish["traceparent"]);
}
