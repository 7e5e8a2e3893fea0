//! Observability and memory for agentbus (DESIGN §6 shared context, §7).
//!
//! Everything here plugs into a bus through the one hook of the core,
//! [`agentbus::BusObserver`], and works on any [`agentbus::Transport`]:
//!
//! - [`prometheus`]: the `/metrics` endpoint for the core's [`agentbus::MetricsObserver`]
//!   counters and histograms, plus engine gauges (queue depth, dead letters, expired).
//!
//! - [`audit`]: JSON Lines files per category and UTC day, written off the hot path,
//!   with rotation and retention.
//! - [`store`]: the SQLite interaction store (every message with its header), with
//!   queries by agent, thread, kind and time, timelines and workflow status.
//! - [`context`]: seed 004's context service: peers answer context requests from
//!   their own interaction history; the requester merges the replies.
//! - [`ueba`]: per-agent baselines (kinds, peers, rate) and anomaly events on
//!   `_sys.security.anomaly`.
//! - `otlp` (cargo feature `otlp`): OpenTelemetry spans of every message, exported to
//!   an OTLP/HTTP collector.
//!
//! Design decisions are in `docs/OBSERVABILITY.md`.

pub mod audit;
pub mod context;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod prometheus;
pub mod store;
pub mod ueba;

pub use prometheus::{EngineGauges, PrometheusEndpoint};

/// Who took a delivery: the agent instance the runtime reported, else the agent name
/// read from its group.
pub fn handler_of(agent: Option<&str>, group: &str) -> Option<String> {
    agent.or_else(|| agent_of_group(group)).map(str::to_owned)
}

/// The agent behind a group name made by the agent runtime (`agent-<name>--<pattern>`),
/// if it is one.
pub fn agent_of_group(group: &str) -> Option<&str> {
    let rest = group.strip_prefix("agent-")?;
    Some(rest.split_once("--").map_or(rest, |(name, _)| name))
}
