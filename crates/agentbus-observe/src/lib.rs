//! Observability and memory for agentbus (DESIGN §6 shared context, §7).
//!
//! Everything here plugs into a bus through the one hook of the core,
//! [`agentbus::BusObserver`], and works on any [`agentbus::Transport`]:
//!
//! - [`prometheus`]: the `/metrics` endpoint for the core's [`agentbus::MetricsObserver`]
//!   counters and histograms, plus engine gauges (queue depth, dead letters, expired).
//!
//! Design decisions are in `docs/OBSERVABILITY.md`.

pub mod prometheus;

pub use prometheus::{EngineGauges, PrometheusEndpoint};
