//! The whole conformance suite through the observing wrapper: observing a transport
//! must not change its delivery contract in any way.

use std::sync::Arc;

use agentbus::{
    BusEvent, BusObserver, MemoryEngine, MetricsObserver, ObservedTransport, SystemClock, Transport,
};
use agentbus_testkit::TransportFactory;
use futures::future::BoxFuture;

/// Sees every event and touches every field, as a real sink would.
#[derive(Debug, Default)]
struct Touch;

impl BusObserver for Touch {
    fn on_event(&self, event: &BusEvent<'_>) {
        let _ = (event.name(), event.at(), event.envelope().header.id);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct ObservedMemory;

impl TransportFactory for ObservedMemory {
    fn name(&self) -> &str {
        "observed-memory"
    }

    fn create(&self) -> BoxFuture<'static, agentbus::Result<Arc<dyn Transport>>> {
        Box::pin(async {
            Ok(Arc::new(ObservedTransport::new(
                Arc::new(MemoryEngine::new()),
                vec![Arc::new(MetricsObserver), Arc::new(Touch)],
                Arc::new(SystemClock),
            )) as Arc<dyn Transport>)
        })
    }
}

agentbus_testkit::conformance_tests!(ObservedMemory);
