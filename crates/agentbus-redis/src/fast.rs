//! The native fast paths: taking new entries with a plain `XREADGROUP` and acking
//! with plain `XACK`s, pipelined, instead of the `take` and `settle` scripts.
//!
//! Why: a script call copies every entry into Lua and back; on a busy channel that
//! cost several times the server time of the commands themselves (`docs/REDIS.md`,
//! "The fast path"). The scripts stay for everything that needs atomic decisions over
//! several keys — redeliveries, ack-wait expiry, delayed entries becoming due, dead
//! letters — and a native take hands over to the script whenever it sees such work.

use std::sync::Arc;

use agentbus::ChannelName;
use bytes::Bytes;
use chrono::Utc;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::Value;

use crate::consumer::{sort_item, Item, ItemKind, Sub, TakeResult};
use crate::scripts;
use crate::util::{arr, bytes, int, millis, text};

/// Adds to a group counter only while the group exists (a plain `HINCRBY` would
/// recreate the hash of a group deleted meanwhile). Tiny, so `EVAL` by body is cheap
/// and survives a server restart that emptied the script cache.
const COUNT: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then \
     return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) end return 0";

/// The most channels a native take reads at once: one `XREADGROUP` reads up to `room`
/// entries from each of the four lanes of each channel and hands the surplus back,
/// which only pays off for a few streams. Wider subscriptions take with the script.
pub(crate) const NATIVE_MAX_CHANNELS: usize = 4;

/// Queues `HINCRBY <group> <field> <n>` (only while the group exists) on `pipe`.
pub(crate) fn count_cmd(pipe: &mut redis::Pipeline, sub: &Sub, field: &str, n: i64) {
    pipe.cmd("EVAL")
        .arg(COUNT)
        .arg(1)
        .arg(format!("{}:g:{}", sub.prefix(), sub.group))
        .arg(field)
        .arg(n);
}

/// Whether a pipeline reply is a server error (e.g. `NOGROUP`).
fn is_error(v: &Value) -> bool {
    matches!(v, Value::ServerError(_))
}

/// The connection acks go over: the subscription's own, or the shared one.
pub(crate) enum AckConn {
    Own(MultiplexedConnection),
    Shared(ConnectionManager),
}

impl ConnectionLike for AckConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            AckConn::Own(c) => c.req_packed_command(cmd),
            AckConn::Shared(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            AckConn::Own(c) => c.req_packed_commands(pipeline, offset, count),
            AckConn::Shared(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AckConn::Own(c) => c.get_db(),
            AckConn::Shared(c) => c.get_db(),
        }
    }
}

impl Sub {
    /// The consumer's own connection when it has one (see `Sub::reader`), else the
    /// shared one.
    pub(crate) fn ack_conn(&self) -> AckConn {
        match &*self.reader.lock() {
            Some(own) => AckConn::Own(own.clone()),
            None => AckConn::Shared(self.shared.conn()),
        }
    }

    /// After an ack failed for a lost connection, acks use the shared connection
    /// (which reconnects by itself) until the consumer opens a new own one.
    fn ack_failed(&self, e: &redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
            *self.reader.lock() = None;
        }
    }

    /// The deliveries of native takes not yet added to the group's `delivered`
    /// counter; the caller adds them.
    pub(crate) fn take_unreported(&self) -> u64 {
        self.unreported.swap(0, std::sync::atomic::Ordering::AcqRel)
    }

    /// Acks held deliveries; true per entry that was acked.
    ///
    /// The common case is one `ack.lua` call: one `XACK` per stream with every id,
    /// the clean-up of parked copies and recorded errors for entries delivered before,
    /// and the `acked` counter. A bulk `XACK` only says how many entries it acked, not
    /// which, so it is used only while no entry of the batch can have been taken over
    /// by another consumer: the script first checks that the group's `claims` counter
    /// (bumped by the take script for every ack-wait claim) still has the value it had
    /// when the deliveries were taken. Otherwise — and for deliveries taken at
    /// different counter values — every entry gets its own `XACK`
    /// ([`Sub::ack_entries`]), whose reply tells an entry settled elsewhere.
    pub(crate) async fn ack_held(
        &self,
        held: &[(&str, &str, Option<u64>, u32)],
    ) -> redis::RedisResult<Vec<bool>> {
        let Some((_, _, Some(claims), _)) = held.first() else {
            return self.ack_each(held).await;
        };
        if held.iter().any(|(_, _, c, _)| *c != Some(*claims)) {
            return self.ack_each(held).await;
        }
        let p = self.prefix();
        let mut streams: Vec<(&str, Vec<&str>)> = Vec::new();
        for (stream, id, _, _) in held {
            match streams.iter_mut().find(|(s, _)| s == stream) {
                Some((_, ids)) => ids.push(id),
                None => streams.push((stream, vec![*id])),
            }
        }
        let mut cmd = scripts::evalsha(&scripts::ACK, 3);
        cmd.arg(format!("{p}:g:{}", self.group))
            .arg(format!("{p}:gs:{}", self.group))
            .arg(format!("{p}:ge:{}", self.group))
            .arg(&*self.group)
            .arg(*claims)
            .arg(self.take_unreported())
            .arg(streams.len());
        for (stream, ids) in &streams {
            cmd.arg(*stream).arg(ids.len()).arg(ids);
        }
        for (stream, id, _, attempt) in held {
            // Only an entry delivered before can have a parked copy or a recorded error.
            if *attempt > 1 {
                cmd.arg(format!("{stream}|{id}"));
            }
        }
        let acked: i64 = scripts::run(&scripts::ACK, &cmd, &mut self.ack_conn())
            .await
            .inspect_err(|e| self.ack_failed(e))?;
        Ok(match acked {
            -1 => return self.ack_each(held).await,
            n if n >= 0 && n as usize == held.len() => vec![true; held.len()],
            // The group is gone, or was deleted and made again (its pending list no
            // longer holds these deliveries): none of them is held any more.
            _ => vec![false; held.len()],
        })
    }

    async fn ack_each(
        &self,
        held: &[(&str, &str, Option<u64>, u32)],
    ) -> redis::RedisResult<Vec<bool>> {
        let pairs: Vec<(&str, &str)> = held.iter().map(|(s, id, _, _)| (*s, *id)).collect();
        self.ack_entries(&pairs).await
    }

    /// Acks entries with one pipelined `XACK` each (its reply says whether the entry
    /// was still pending), removes parked copies and recorded errors, and counts the
    /// acks. True per entry that was acked.
    ///
    /// No script is needed: `XACK` of an entry that is no longer pending does nothing,
    /// and a parked copy of an acked entry is harmless until removed (the take script
    /// drops members whose entry is no longer pending).
    pub(crate) async fn ack_entries(
        &self,
        entries: &[(&str, &str)],
    ) -> redis::RedisResult<Vec<bool>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.prefix();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (stream, id) in entries {
            pipe.cmd("XACK").arg(*stream).arg(&*self.group).arg(*id);
        }
        let members: Vec<String> = entries.iter().map(|(s, id)| format!("{s}|{id}")).collect();
        pipe.cmd("ZREM")
            .arg(format!("{p}:gs:{}", self.group))
            .arg(&members);
        pipe.cmd("HDEL")
            .arg(format!("{p}:ge:{}", self.group))
            .arg(&members);
        count_cmd(&mut pipe, self, "acked", entries.len() as i64);
        let unreported = self.take_unreported();
        if unreported > 0 {
            count_cmd(&mut pipe, self, "delivered", unreported as i64);
        }
        let replies: Vec<Value> = pipe
            .query_async(&mut self.ack_conn())
            .await
            .inspect_err(|e| self.ack_failed(e))?;
        let done: Vec<bool> = replies
            .iter()
            .take(entries.len())
            .map(|v| !is_error(v) && int(v) == 1)
            .collect();
        let missed = done.iter().filter(|d| !**d).count() as i64;
        if missed > 0 {
            // The counter assumed every ack lands; take back the ones that did not.
            let mut fix = redis::pipe();
            count_cmd(&mut fix, self, "acked", -missed);
            let _: redis::RedisResult<Value> = fix.query_async(&mut self.ack_conn()).await;
        }
        Ok(done)
    }
}

/// One entry of a native read: where it is, the stored message and what the take
/// must judge before handing it out.
struct Read {
    /// Index into the streams of the read.
    lane: usize,
    id: String,
    message: Option<Bytes>,
    deadline: Option<i64>,
    not_before: Option<i64>,
}

/// The streams of `channels`, highest priority lane first, channels in the given
/// (sorted) order within a lane: the order the take script serves them in. Stream `i`
/// belongs to channel `i % channels.len()`.
pub(crate) fn lane_streams(prefix: &str, channels: &[String]) -> Vec<Arc<str>> {
    let mut out = Vec::with_capacity(channels.len() * 4);
    for lane in (0..4).rev() {
        for ch in channels {
            out.push(Arc::from(format!("{prefix}:s:{ch}:{lane}")));
        }
    }
    out
}

/// Takes the bytes out of a string reply (no copy).
fn into_bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// The elements of an array reply, taken out of it.
fn into_items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => Vec::new(),
    }
}

/// A number in a string reply.
fn number(v: &Value) -> Option<i64> {
    std::str::from_utf8(bytes(v)?).ok()?.parse().ok()
}

/// Parses an `XREADGROUP` reply (RESP2 array or RESP3 map) into entries, ordered as
/// `streams` (the reply's own stream order is not guaranteed). Moves the message
/// bytes out of the reply instead of copying them.
fn parse_read(reply: Value, streams: &[Arc<str>]) -> Vec<Read> {
    let mut per_stream: Vec<(usize, Vec<Read>)> = Vec::new();
    let mut add = |name: Value, entries: Value| {
        let Some(lane) =
            bytes(&name).and_then(|name| streams.iter().position(|s| s.as_bytes() == name))
        else {
            return;
        };
        let entries = into_items(entries);
        let mut reads = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut parts = into_items(entry).into_iter();
            let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
                continue;
            };
            let mut read = Read {
                lane,
                id: text(&id),
                message: None,
                deadline: None,
                not_before: None,
            };
            let mut flat = into_items(fields).into_iter();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                match bytes(&k) {
                    Some(b"m") => read.message = Some(Bytes::from(into_bytes(v))),
                    Some(b"d") => read.deadline = number(&v),
                    Some(b"n") => read.not_before = number(&v),
                    _ => {}
                }
            }
            reads.push(read);
        }
        per_stream.push((lane, reads));
    };
    match reply {
        Value::Map(pairs) => {
            for (k, v) in pairs {
                add(k, v);
            }
        }
        other => {
            for s in into_items(other) {
                let mut parts = into_items(s).into_iter();
                if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                    add(k, v);
                }
            }
        }
    }
    per_stream.sort_by_key(|(lane, _)| *lane);
    per_stream.into_iter().flat_map(|(_, r)| r).collect()
}

/// Hands entries this consumer read back to the group, due at `due` (ms), with their
/// delivery count reset (they were never delivered): the take script claims them
/// when due, as it does delayed entries. `due` is a score per entry, so entries of one
/// lane keep their stream order.
fn park_cmds(pipe: &mut redis::Pipeline, sub: &Sub, streams: &[Arc<str>], parked: &[(&Read, f64)]) {
    let sched = format!("{}:gs:{}", sub.prefix(), sub.group);
    for (read, due) in parked {
        let stream = &*streams[read.lane];
        pipe.cmd("XCLAIM")
            .arg(stream)
            .arg(&*sub.group)
            .arg("_parked")
            .arg(0)
            .arg(&read.id)
            .arg("JUSTID")
            .arg("RETRYCOUNT")
            .arg(0);
        pipe.cmd("ZADD")
            .arg(&sched)
            .arg(*due)
            .arg(format!("{stream}|{}", read.id));
    }
}

/// Takes up to `room` new entries with one (non-blocking) `XREADGROUP` over the lanes
/// of `channels`, pipelined with what decides whether the script must run instead: the
/// group's existence and `claims` counter, the channel registry version and the
/// earliest parked entry.
///
/// Rules kept here as in the script: entries past their deadline are dead-lettered
/// `expired`, entries not yet due (`not_before`) are parked until due, higher lanes
/// go first and the surplus of the read (several lanes had entries) is handed back in
/// stream order. When a parked entry is already due, everything read is handed back
/// and `script_needed` is set: redeliveries go before new entries of their lane.
pub(crate) async fn run_native_take<C: ConnectionLike + Send>(
    sub: &Sub,
    conn: &mut C,
    channels: &[String],
    room: usize,
) -> agentbus::Result<TakeResult> {
    let p = sub.prefix();
    let streams = lane_streams(p, channels);
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.cmd("GET").arg(format!("{p}:chver"));
    // `ack_wait` is always set while the group exists; `claims` is read before the
    // entries, so a claim of any of them afterwards moves it (see `Sub::ack_held`).
    pipe.cmd("HMGET")
        .arg(format!("{p}:g:{}", sub.group))
        .arg("ack_wait")
        .arg("claims");
    pipe.cmd("ZRANGE")
        .arg(format!("{p}:gs:{}", sub.group))
        .arg(0)
        .arg(0)
        .arg("WITHSCORES");
    let read = pipe
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&*sub.group)
        .arg(&sub.consumer)
        .arg("COUNT")
        .arg(room);
    read.arg("STREAMS");
    for stream in &streams {
        read.arg(&**stream);
    }
    for _ in &streams {
        read.arg(">");
    }
    // The previous native takes' deliveries, counted in this round trip (after the
    // read, so the replies above keep their places).
    let unreported = sub.take_unreported();
    if unreported > 0 {
        count_cmd(&mut pipe, sub, "delivered", unreported as i64);
    }
    let mut replies: Vec<Value> = pipe
        .query_async(conn)
        .await
        .map_err(|e| sub.shared.err("take (XREADGROUP)", e))?;
    let get = |i: usize| replies.get(i).unwrap_or(&Value::Nil);
    let group = arr(get(1));
    let mut result = TakeResult {
        gone: false,
        chver: text(get(0)),
        next_due: None,
        deliver: Vec::new(),
        last_ids: Vec::new(),
        script_needed: false,
        claims: Some(group.get(1).and_then(number).unwrap_or(0).max(0) as u64),
    };
    if result.chver.is_empty() {
        result.chver = "0".into();
    }
    if group.first().is_none_or(|v| matches!(v, Value::Nil)) {
        result.gone = true;
        return Ok(result);
    }
    let earliest = arr(get(2)).get(1).and_then(|s| text(s).parse::<f64>().ok());
    result.next_due = earliest.map(|f| f as i64);
    let due_now = earliest.is_some_and(|e| e <= millis(Utc::now()) as f64);
    if is_error(get(3)) {
        // A stream without the group (it is being created or deleted): the script
        // sorts it out and reports a deleted group.
        result.script_needed = true;
        return Ok(result);
    }
    let read = replies
        .get_mut(3)
        .map_or(Value::Nil, |v| std::mem::replace(v, Value::Nil));
    let reads = parse_read(read, &streams);
    // Deadlines and delays are judged at the time the entries arrived.
    let now = millis(Utc::now());
    if reads.is_empty() {
        result.script_needed = due_now;
        return Ok(result);
    }

    // What to do with each entry, in lane order: hand it out, dead-letter it, or park
    // it until a due time.
    let mut room = if due_now { 0 } else { room };
    let mut park: Vec<(&Read, f64)> = Vec::new();
    let mut kinds: Vec<Option<ItemKind>> = Vec::with_capacity(reads.len());
    // Handed-back entries are due a moment ago, in read order, so the script serves
    // them (after redeliveries already due) before anything newer of their lane.
    let step = 1.0 / 4096.0;
    let mut back = 0u32;
    let mut delivered = 0usize;
    for r in &reads {
        if r.deadline.is_some_and(|d| d <= now) {
            kinds.push(Some(ItemKind::Expired));
        } else if let Some(nb) = r.not_before.filter(|nb| *nb > now) {
            park.push((r, nb as f64));
            kinds.push(None);
        } else if room > 0 {
            room -= 1;
            delivered += 1;
            kinds.push(Some(ItemKind::Deliver));
        } else {
            park.push((r, (now - 1) as f64 + f64::from(back.min(4095)) * step));
            back += 1;
            kinds.push(None);
        }
    }
    result.script_needed = back > 0;
    if !park.is_empty() {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        park_cmds(&mut pipe, sub, &streams, &park);
        if delivered > 0 {
            count_cmd(&mut pipe, sub, "delivered", delivered as i64);
        }
        let _: Vec<Value> = pipe
            .query_async(&mut sub.shared.conn())
            .await
            .map_err(|e| sub.shared.err("take (park)", e))?;
    } else if delivered > 0 {
        // Counted by the next round trip of this subscription (its next take or ack)
        // instead of one more round trip now, which cost a busy consumer a third
        // round trip per batch. `stats` lags by these until then.
        sub.unreported
            .fetch_add(delivered as u64, std::sync::atomic::Ordering::AcqRel);
    }
    // One channel name per channel of the read, not one per entry.
    let names: Vec<Option<ChannelName>> =
        channels.iter().map(|c| ChannelName::new(c).ok()).collect();
    result.deliver.reserve(delivered);
    for (r, kind) in reads.into_iter().zip(kinds) {
        let Some(kind) = kind else { continue };
        let item = Item {
            stream: streams[r.lane].clone(),
            count: 1,
            message: r.message,
            channel: names.get(r.lane % names.len().max(1)).cloned().flatten(),
            id: r.id,
        };
        sort_item(sub, kind, item, &mut result.deliver).await?;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_go_highest_first_and_channels_keep_their_order() {
        let s = lane_streams("P", &["a".into(), "b".into()]);
        let s: Vec<&str> = s.iter().map(|s| &**s).collect();
        assert_eq!(
            s,
            [
                "P:s:a:3", "P:s:b:3", "P:s:a:2", "P:s:b:2", "P:s:a:1", "P:s:b:1", "P:s:a:0",
                "P:s:b:0"
            ]
        );
    }

    #[test]
    fn reads_come_back_in_lane_order_whatever_the_reply_order() {
        let entry = |id: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"m".to_vec()),
                    Value::BulkString(b"msg".to_vec()),
                    Value::BulkString(b"d".to_vec()),
                    Value::BulkString(b"7".to_vec()),
                ]),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::BulkString(b"P:s:a:0".to_vec()),
                Value::Array(vec![entry("1-0"), entry("1-1")]),
            ]),
            Value::Array(vec![
                Value::BulkString(b"P:s:a:3".to_vec()),
                Value::Array(vec![entry("2-0")]),
            ]),
        ]);
        let reads = parse_read(reply, &lane_streams("P", &["a".into()]));
        let ids: Vec<&str> = reads.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["2-0", "1-0", "1-1"]);
        assert_eq!(reads[0].lane, 0);
        assert_eq!(reads[1].lane, 3);
        assert_eq!(reads[0].deadline, Some(7));
        assert_eq!(reads[0].not_before, None);
        assert_eq!(reads[0].message.as_deref(), Some(&b"msg"[..]));
    }
}
