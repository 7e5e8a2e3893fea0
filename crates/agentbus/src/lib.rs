//! agentbus: a message bus for multi-agent systems.
//!
//! Typed messages on named channels with priorities, deadlines, request/reply,
//! scatter-gather, retries and dead letters, and an agent runtime on top. It runs
//! embedded in one process (the [`MemoryEngine`]) and, through the [`Transport`] trait,
//! on other engines and backends with the same delivery contract.
//!
//! Start with [`Bus`]: register message types, publish, subscribe, request, gather.

pub mod agent;
pub mod bus;
pub mod channel;
pub mod clock;
pub mod coordination;
pub mod envelope;
pub mod error;
pub mod memory;
pub mod message;
pub mod observe;
pub mod trace_context;
pub mod transport;

/// The memory engine's delivery state machine, for engines that reuse it (the
/// durable log in `agentbus-file` replays its journal through it). Not a stable API.
#[doc(hidden)]
pub mod engine_core {
    pub use crate::memory::state::*;
    pub use crate::memory::take_loop::take_or_wait;
}

pub use agent::{
    Agent, AgentBuilder, AgentDescriptor, Backoff, Context, HandlerError, HandlerOptions,
    HandlerResult, Reject, ShutdownReport,
};
pub use bus::{
    Bus, BusBuilder, GatherResult, GatherSpec, PublishOptions, Subscription, Typed,
    TypedSubscription,
};
pub use channel::{parse_channel, Channel, ChannelName, ChannelPattern, Direction, ParsedChannel};
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use envelope::{DeadReason, Envelope, Header, MessageId, Priority, CONTENT_TYPE_JSON};
pub use error::{Error, ErrorKind, Result};
pub use memory::{MemoryEngine, MemoryEngineBuilder};
pub use message::{KindRegistry, Message};
pub use observe::{BusEvent, BusObserver, MetricsObserver, ObservedTransport};
pub use transport::{
    ack_all, Capabilities, ChannelConfig, ChannelStats, Consumer, DeadLetter, DeadLetterFilter,
    Delivery, DeliveryHandle, Discard, DurabilityReport, EngineStats, GroupStats, PublishLimits,
    PublishReceipt, Settlement, Settler, StartPosition, SubscribeOptions, Transport,
};
