//! The whole conformance suite against the real nats-server with JetStream
//! (`AGENTBUS_NATS_URL`, default nats://127.0.0.1:4222). Every rule runs on its own
//! stream and subject prefix, deleted afterwards.

use std::sync::Arc;

use agentbus::Transport;
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};
use agentbus_testkit::TransportFactory;
use futures::future::BoxFuture;
use parking_lot::Mutex;

fn url() -> String {
    std::env::var("AGENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// A transport per rule on a fresh prefix; `cleanup` deletes the prefixes it made.
#[derive(Default)]
struct Factory {
    prefixes: Arc<Mutex<Vec<String>>>,
    /// Requests through the stream instead of core NATS request/reply.
    stream_requests: bool,
}

impl TransportFactory for Factory {
    fn name(&self) -> &str {
        "nats"
    }

    fn create(&self) -> BoxFuture<'static, agentbus::Result<Arc<dyn Transport>>> {
        let prefix = format!("abt{}", uuid::Uuid::new_v4().simple());
        self.prefixes.lock().push(prefix.clone());
        let core_requests = !self.stream_requests;
        Box::pin(async move {
            let mut options = NatsOptions::default()
                .prefix(prefix)
                .storage(NatsStorage::Memory);
            options.core_requests = core_requests;
            let transport = NatsTransport::connect(&url(), options).await?;
            Ok(Arc::new(transport) as Arc<dyn Transport>)
        })
    }

    fn cleanup<'a>(&'a self, _namespace: &'a str) -> BoxFuture<'a, agentbus::Result<()>> {
        Box::pin(async move {
            let prefixes: Vec<String> = self.prefixes.lock().drain(..).collect();
            if prefixes.is_empty() {
                return Ok(());
            }
            let client = async_nats::connect(url()).await.map_err(|e| {
                agentbus::Error::new(
                    agentbus::ErrorKind::Backend,
                    format!("cleanup connect: {e}"),
                )
            })?;
            for prefix in prefixes {
                NatsTransport::delete_prefix(&client, &prefix).await?;
            }
            Ok(())
        })
    }

    fn max_payload_bytes(&self) -> usize {
        agentbus_nats::DEFAULT_MAX_PAYLOAD_BYTES
    }
}

agentbus_testkit::conformance_tests!(Factory::default());

/// The whole suite again with `core_requests = false`: requests and replies through
/// the stream and the bus's inbox channel.
mod stream_requests {
    use super::Factory;

    agentbus_testkit::conformance_tests!(Factory {
        stream_requests: true,
        ..Factory::default()
    });
}
