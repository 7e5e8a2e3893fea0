//! The Lua scripts that run the delivery contract atomically on the server. Each is
//! `prelude.lua` (key layout, pattern matching, stream-id helpers) plus its own body.

use std::sync::LazyLock;

use redis::Script;

const PRELUDE: &str = include_str!("prelude.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// Dedup, channel registry, retention, XADD: one publish.
pub(crate) static PUBLISH: LazyLock<Script> = LazyLock::new(|| script(include_str!("publish.lua")));
/// Group creation at the start position, membership.
pub(crate) static JOIN: LazyLock<Script> = LazyLock::new(|| script(include_str!("join.lua")));
/// Hands out deliveries in priority order; redeliveries, delays, expiries.
pub(crate) static TAKE: LazyLock<Script> = LazyLock::new(|| script(include_str!("take.lua")));
/// Nack (park with a due time) and dead-lettering (acks are native, `fast.rs`).
pub(crate) static SETTLE: LazyLock<Script> = LazyLock::new(|| script(include_str!("settle.lua")));
/// The bulk ack of `fast.rs`: one `XACK` per stream while no delivery can have been
/// claimed away. Standalone: it needs no key layout.
pub(crate) static ACK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("ack.lua")));
/// Leave, delete a group, configure channels, read a recorded error.
pub(crate) static ADMIN: LazyLock<Script> = LazyLock::new(|| script(include_str!("admin.lua")));

/// Loads every script so the first calls are plain `EVALSHA`s.
pub(crate) async fn load_all(conn: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<()> {
    for s in [&*PUBLISH, &*JOIN, &*TAKE, &*SETTLE, &*ACK, &*ADMIN] {
        s.load_async(conn).await?;
    }
    Ok(())
}
