//! The whole conformance suite against the real Redis at 127.0.0.1:6379 (or
//! `AGENTBUS_REDIS_URL`), every rule on its own random key prefix, deleted afterwards.

use std::sync::Arc;

use agentbus::Transport;
use agentbus_redis::{RedisOptions, RedisTransport};
use agentbus_testkit::TransportFactory;
use futures::future::BoxFuture;

fn url() -> String {
    std::env::var("AGENTBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One random prefix per rule (the macro builds a factory per test).
struct RedisFactory {
    prefix: String,
}

impl RedisFactory {
    fn new() -> Self {
        RedisFactory {
            prefix: format!("abtest-{:016x}", fastrand::u64(..)),
        }
    }
}

impl TransportFactory for RedisFactory {
    fn name(&self) -> &str {
        "redis"
    }

    fn create(&self) -> BoxFuture<'static, agentbus::Result<Arc<dyn Transport>>> {
        let prefix = self.prefix.clone();
        Box::pin(async move {
            let transport =
                RedisTransport::connect(&url(), RedisOptions::default().prefix(prefix)).await?;
            Ok(Arc::new(transport) as Arc<dyn Transport>)
        })
    }

    fn cleanup<'a>(&'a self, _namespace: &'a str) -> BoxFuture<'a, agentbus::Result<()>> {
        Box::pin(async move {
            let transport =
                RedisTransport::connect(&url(), RedisOptions::default().prefix(&self.prefix))
                    .await?;
            // Give dropped subscriptions' hand-back tasks a moment, then delete all.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            transport.delete_everything().await?;
            Ok(())
        })
    }
}

agentbus_testkit::conformance_tests!(RedisFactory::new());
