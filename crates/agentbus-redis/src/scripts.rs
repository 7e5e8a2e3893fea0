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

/// An `EVALSHA` of `script` with `keys` keys, for arguments to be written straight
/// into the command. (`Script::prepare_invoke` copies every argument into a vector of
/// its own and then again into the command: for a publish of 128 messages that was
/// 256 allocations and two copies of every message.)
pub(crate) fn evalsha(script: &Script, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

/// Runs an [`evalsha`] command; a server that lost its script cache (`NOSCRIPT`, e.g.
/// after a restart) gets the script loaded and the command once more.
pub(crate) async fn run<T: redis::FromRedisValue>(
    script: &Script,
    cmd: &redis::Cmd,
    conn: &mut impl redis::aio::ConnectionLike,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// Loads every script so the first calls are plain `EVALSHA`s.
pub(crate) async fn load_all(conn: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<()> {
    for s in [&*PUBLISH, &*JOIN, &*TAKE, &*SETTLE, &*ACK, &*ADMIN] {
        s.load_async(conn).await?;
    }
    Ok(())
}
