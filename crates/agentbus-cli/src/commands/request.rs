//! `agentbus req`: send a request, wait for one reply, print it.

use std::time::Duration;

use agentbus::{Bus, ChannelName, Envelope};
use bytes::Bytes;
use clap::Args;

use crate::commands::{parse_positive_duration, read_payload};
use crate::{backend, output, Global};

/// Arguments of `agentbus req`.
#[derive(Debug, Args)]
#[command(after_help = "\
Prints the reply's payload (pretty JSON); with --json, the whole reply as one JSON object
with the same keys as `sub --json`. No responder (exit 1 at once where the backend can
tell) or no reply within --timeout (exit 1) is a one-line error.

Example:
  agentbus req scheduling.request '{\"vehicle\":\"V-17\"}' --timeout 5s")]
pub(crate) struct ReqArgs {
    /// The channel to send the request on.
    #[arg(value_name = "CHANNEL")]
    pub(crate) channel: ChannelName,

    /// The request payload: JSON text, @FILE to read a file, or - to read stdin.
    #[arg(value_name = "PAYLOAD", allow_negative_numbers = true)]
    pub(crate) payload: String,

    /// How long to wait for the reply, e.g. 500ms or 10s. Also the request's deadline:
    /// responders never see it after that.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_positive_duration)]
    pub(crate) timeout: Duration,

    /// The message kind of the request.
    #[arg(long, value_name = "K", default_value = crate::DEFAULT_KIND)]
    pub(crate) kind: String,
}

/// Sends `payload` as the request `args` describe on `bus` and waits for the reply.
///
/// # Errors
/// `NoResponders` and `Timeout` (exit 1), bad input (exit 2), publish errors.
pub(crate) async fn request(bus: &Bus, args: &ReqArgs, payload: Bytes) -> anyhow::Result<Envelope> {
    let mut envelope = Envelope::new(args.channel.clone(), args.kind.clone(), payload);
    envelope.header.timestamp = bus.clock().now();
    Ok(bus.request_envelope(envelope, args.timeout).await?)
}

/// Runs `agentbus req`.
pub(crate) async fn run(global: &Global, args: ReqArgs) -> anyhow::Result<()> {
    // Read the payload first: bad input is reported before any backend is touched.
    let payload = read_payload(&args.payload).await?;
    let bus = Bus::new(backend::open(&global.backend).await?);
    let reply = request(&bus, &args, payload).await?;
    if global.json {
        output::json_line(&output::envelope_json(&reply))
    } else {
        match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
            Ok(value) => output::line(serde_json::to_string_pretty(&value)?),
            Err(_) => output::line(output::payload_text(&reply.payload)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbus::{ChannelPattern, ErrorKind, MemoryEngine, SubscribeOptions};
    use clap::Parser;
    use std::sync::Arc;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ReqArgs,
    }

    async fn send(bus: &Bus, argv: &[&str]) -> anyhow::Result<Envelope> {
        let args = args(argv);
        let payload = read_payload(&args.payload).await?;
        request(bus, &args, payload).await
    }

    fn args(argv: &[&str]) -> ReqArgs {
        let mut full = vec!["req"];
        full.extend_from_slice(argv);
        Wrapper::try_parse_from(full).unwrap().args
    }

    #[tokio::test]
    async fn gets_the_reply_from_a_responder() {
        let bus = Bus::new(Arc::new(MemoryEngine::new()));
        let mut requests = bus
            .subscribe(SubscribeOptions::new(
                ChannelPattern::new("math.double").unwrap(),
            ))
            .await
            .unwrap();
        let responder = bus.clone();
        tokio::spawn(async move {
            let delivery = requests.next().await.unwrap();
            let request = delivery.envelope();
            let n: i64 = request.decode_json::<serde_json::Value>().unwrap()["n"]
                .as_i64()
                .unwrap();
            let mut reply = Envelope::json(
                request.header.reply_to.clone().unwrap(),
                "math.result",
                &serde_json::json!({ "n": n * 2 }),
            )
            .unwrap();
            reply.header.causation_id = Some(request.header.id);
            responder.publish_envelope(reply).await.unwrap();
            delivery.ack().await.unwrap();
        });
        let reply = send(&bus, &["math.double", r#"{"n":21}"#]).await.unwrap();
        assert_eq!(reply.header.kind, "math.result");
        assert_eq!(
            output::payload_value(&reply.payload),
            serde_json::json!({"n": 42})
        );
    }

    #[tokio::test]
    async fn no_responders_and_timeouts_are_failures() {
        let bus = Bus::new(Arc::new(MemoryEngine::new()));
        let error = send(&bus, &["nobody.home", "{}"]).await.unwrap_err();
        let kind = error.downcast_ref::<agentbus::Error>().unwrap().kind();
        assert_eq!(kind, ErrorKind::NoResponders);

        let _silent = bus
            .subscribe(SubscribeOptions::new(
                ChannelPattern::new("silent").unwrap(),
            ))
            .await
            .unwrap();
        let error = send(&bus, &["silent", "{}", "--timeout", "50ms"])
            .await
            .unwrap_err();
        let kind = error.downcast_ref::<agentbus::Error>().unwrap().kind();
        assert_eq!(kind, ErrorKind::Timeout);
    }

    #[test]
    fn timeout_must_be_positive() {
        assert_eq!(args(&["a", "1"]).timeout, Duration::from_secs(2));
        assert!(Wrapper::try_parse_from(["req", "a", "{}", "--timeout", "0s"]).is_err());
    }
}
