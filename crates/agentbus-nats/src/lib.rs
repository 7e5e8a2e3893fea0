//! The NATS JetStream backend of agentbus.
//!
//! [`NatsTransport::connect`] opens a [`agentbus::Transport`] on a NATS server with
//! JetStream: channels are subjects (`<prefix>.<lane>.<channel>`, our `*`/`>` are
//! NATS's), one stream holds them all, each group is a set of durable pull consumers
//! (one per priority lane) with JetStream's ack wait, `Nats-Msg-Id` dedup and start
//! positions; priority lanes, deadlines, delayed delivery, max deliveries, per-channel
//! retention and dead letters are added on top so the whole delivery contract holds.
//! docs/NATS.md has the layout, how each rule maps to JetStream, and the defaults.
//!
//! ```no_run
//! use agentbus::Bus;
//! use agentbus_nats::{NatsOptions, NatsTransport};
//!
//! # async fn run() -> agentbus::Result<()> {
//! let transport = NatsTransport::connect("nats://127.0.0.1:4222", NatsOptions::default()).await?;
//! let bus = Bus::new(std::sync::Arc::new(transport));
//! # let _ = bus;
//! # Ok(())
//! # }
//! ```

mod consumer;
mod doctor;
mod options;
mod transport;
mod wire;

pub use options::{NatsOptions, NatsStorage, DEFAULT_MAX_PAYLOAD_BYTES};
pub use transport::NatsTransport;
