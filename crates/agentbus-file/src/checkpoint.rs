//! Checkpoints: the whole delivery state written down at a segment boundary, so that
//! opening a directory replays only the segments after it.
//!
//! A checkpoint file `<index>.ckpt` holds the state after every record of the segments
//! before `index`; the log continues in segment `index`. It is written to
//! `<index>.ckpt.tmp`, synced, renamed and the directory synced, so a checkpoint is
//! either whole under its final name or absent (a crash leaves at most a `.tmp`, which
//! opening removes).
//!
//! The file is a 20-byte header (magic `AGBUSCP1`, the index, a CRC32C of both)
//! followed by frames in the log's framing (length, CRCs, payload), each payload one
//! record: the settings, each channel, its messages in chunks, each group with its
//! pending entries, ready entries and ack deadlines in chunks, timers, dedup entries,
//! dead letters, and an `End` record with the counts of everything, which must match.
//! Chunks keep every frame near 1 MiB however large the state, so writing and reading
//! stream, and damage is reported at the offset of the frame it is in.
//! `docs/DURABLE_LOG.md` lists every record.

use std::io;

use agentbus::engine_core::{
    ChannelImage, DedupImage, GroupImage, MemberImage, MessageImage, PendingImage,
    PendingImageState, StateImage, TimerImage,
};
use agentbus::{DeadLetter, Priority, PublishReceipt};

use crate::codec::{
    invalid, pattern, read_frame, reason_code, reason_from, write_frame, DResult, DecodeError,
    Frame, R, W,
};
use crate::segment::{Damage, ScanError};
use crate::storage::{Storage, StorageFile};

/// The magic at the start of every checkpoint.
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"AGBUSCP1";

/// Bytes of a checkpoint header.
pub const CHECKPOINT_HEADER: usize = 20;

/// Records are cut into chunks of about this many bytes.
const CHUNK: usize = 1 << 20;

const META: u8 = 1;
const CHANNEL: u8 = 2;
const MESSAGES: u8 = 3;
const DETACHED: u8 = 4;
const GROUP: u8 = 5;
const PENDING: u8 = 6;
const READY: u8 = 7;
const ACK_DEADLINES: u8 = 8;
const TIMERS: u8 = 9;
const DEDUP: u8 = 10;
const DEDUP_ORDER: u8 = 11;
const DEAD: u8 = 12;
const END: u8 = 13;

/// The file name of the checkpoint after which the log continues in segment `index`.
pub fn checkpoint_name(index: u64) -> String {
    format!("{index:020}.ckpt")
}

/// The segment index of a checkpoint file name, if it is one.
pub fn parse_checkpoint_name(name: &str) -> Option<u64> {
    crate::segment::parse_indexed_name(name, ".ckpt")
}

/// Whether a file name is a checkpoint that was never finished.
pub fn is_unfinished_checkpoint(name: &str) -> bool {
    name.strip_suffix(".tmp")
        .is_some_and(|stem| parse_checkpoint_name(stem).is_some())
}

fn header(index: u64) -> [u8; CHECKPOINT_HEADER] {
    crate::segment::indexed_header(CHECKPOINT_MAGIC, index)
}

/// The checkpoints in `storage`, oldest first.
///
/// # Errors
/// [`ScanError::Io`] when the directory cannot be listed.
pub fn list_checkpoints(storage: &dyn Storage) -> Result<Vec<(u64, String)>, ScanError> {
    let mut found: Vec<(u64, String)> = storage
        .list()
        .map_err(|e| ScanError::Io(format!("listing {}", storage.describe()), e))?
        .into_iter()
        .filter_map(|name| parse_checkpoint_name(&name).map(|i| (i, name)))
        .collect();
    found.sort();
    Ok(found)
}

/// How much of everything a checkpoint holds (its `End` record).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    channels: u64,
    messages: u64,
    detached: u64,
    groups: u64,
    pending: u64,
    ready: u64,
    ack_deadlines: u64,
    timers: u64,
    dedup: u64,
    dedup_order: u64,
    dead: u64,
}

impl Counts {
    fn of(image: &StateImage) -> Counts {
        let sum = |f: &dyn Fn(&GroupImage) -> usize| -> u64 {
            image.groups.iter().map(|g| f(g) as u64).sum()
        };
        Counts {
            channels: image.channels.len() as u64,
            messages: image
                .channels
                .iter()
                .map(|c| c.lanes.iter().map(Vec::len).sum::<usize>() as u64)
                .sum(),
            detached: image.detached.len() as u64,
            groups: image.groups.len() as u64,
            pending: sum(&|g| g.pending.len()),
            ready: sum(&|g| g.ready.len()),
            ack_deadlines: sum(&|g| g.ack_deadlines.len()),
            timers: image.timers.len() as u64,
            dedup: image.dedup.len() as u64,
            dedup_order: image.dedup_order.len() as u64,
            dead: image.dead.len() as u64,
        }
    }

    fn fields(&self) -> [u64; 11] {
        [
            self.channels,
            self.messages,
            self.detached,
            self.groups,
            self.pending,
            self.ready,
            self.ack_deadlines,
            self.timers,
            self.dedup,
            self.dedup_order,
            self.dead,
        ]
    }
}

/// Streams records into a file: frames are gathered in `out` and written in ~1 MiB
/// writes.
struct Writer<'a> {
    file: &'a mut dyn StorageFile,
    out: Vec<u8>,
    record: Vec<u8>,
    bytes: u64,
}

impl Writer<'_> {
    fn frame(&mut self) -> io::Result<()> {
        write_frame(&mut self.out, &self.record);
        self.record.clear();
        if self.out.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.write_all(&self.out)?;
        self.bytes += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// One record: `tag` then what `body` writes.
    fn record(&mut self, tag: u8, body: impl FnOnce(&mut W<'_>)) -> io::Result<()> {
        let mut w = W(&mut self.record);
        w.u8(tag);
        body(&mut w);
        self.frame()
    }

    /// Records of `tag` holding `items`, cut into ~1 MiB chunks: each chunk is the tag,
    /// what `prefix` writes, a u32 count and the items. Nothing when there are none.
    fn chunks<T>(
        &mut self,
        tag: u8,
        prefix: impl Fn(&mut W<'_>),
        items: impl IntoIterator<Item = T>,
        mut item: impl FnMut(&mut W<'_>, T),
    ) -> io::Result<()> {
        let mut count_at = None;
        let mut count = 0u32;
        for value in items {
            if count_at.is_none() {
                let mut w = W(&mut self.record);
                w.u8(tag);
                prefix(&mut w);
                count_at = Some(self.record.len());
                W(&mut self.record).u32(0);
            }
            item(&mut W(&mut self.record), value);
            count += 1;
            if self.record.len() >= CHUNK {
                self.end_chunk(count_at.take(), count)?;
                count = 0;
            }
        }
        self.end_chunk(count_at, count)
    }

    fn end_chunk(&mut self, count_at: Option<usize>, count: u32) -> io::Result<()> {
        if let Some(at) = count_at {
            self.record[at..at + 4].copy_from_slice(&count.to_le_bytes());
            self.frame()?;
        }
        Ok(())
    }
}

fn write_message(w: &mut W<'_>, m: &MessageImage) {
    w.u64(m.key);
    w.u64(m.sequence);
    w.u64(m.lane_index);
    w.u64(m.channel);
    w.time(m.stored_at);
    w.u64(m.size);
    w.envelope(&m.envelope);
}

fn read_message(r: &mut R<'_>) -> DResult<MessageImage> {
    Ok(MessageImage {
        key: r.u64()?,
        sequence: r.u64()?,
        lane_index: r.u64()?,
        channel: r.u64()?,
        stored_at: r.time()?,
        size: r.u64()?,
        envelope: std::sync::Arc::new(r.envelope()?),
    })
}

fn write_dead(w: &mut W<'_>, l: &DeadLetter) {
    w.id(l.id);
    w.envelope(&l.envelope);
    w.str(&l.group);
    w.u8(reason_code(&l.reason));
    w.u32(l.attempts);
    w.opt_str(l.last_error.as_deref());
    w.time(l.dead_at);
}

fn read_dead(r: &mut R<'_>) -> DResult<DeadLetter> {
    Ok(DeadLetter {
        id: r.id()?,
        envelope: r.envelope()?,
        group: r.str()?,
        reason: reason_from(r.u8()?)?,
        attempts: r.u32()?,
        last_error: r.opt_str()?,
        dead_at: r.time()?,
    })
}

/// Writes `image` as the checkpoint after which the log continues in segment `index`,
/// durably (temporary file, sync, rename, directory sync). Returns its size in bytes.
///
/// # Errors
/// Any I/O error; a temporary file may be left behind (removed on the next open).
pub fn write_checkpoint(storage: &dyn Storage, index: u64, image: &StateImage) -> io::Result<u64> {
    let name = checkpoint_name(index);
    let tmp = format!("{name}.tmp");
    let mut file = storage.create(&tmp)?;
    let mut out = Writer {
        file: &mut *file,
        out: Vec::with_capacity(CHUNK + CHUNK / 4),
        record: Vec::with_capacity(CHUNK + CHUNK / 4),
        bytes: 0,
    };
    out.out.extend_from_slice(&header(index));
    out.record(META, |w| {
        w.u64(image.next_key);
        w.u64(image.next_group);
        w.u64(image.next_member);
        w.u64(image.rejected_full);
        w.u64(image.expired);
        w.u64(image.max_dead_letters);
        w.u64(image.dead_dropped);
        w.u8(u8::from(image.deterministic_dead_ids));
        w.u64(image.dead_id_counter);
        w.u32(image.channel_configs.len() as u32);
        for (pattern, config) in &image.channel_configs {
            w.str(pattern.as_str());
            w.config(config);
        }
        w.u32(image.aged_channels.len() as u32);
        for &index in &image.aged_channels {
            w.u64(index);
        }
    })?;
    for channel in &image.channels {
        out.record(CHANNEL, |w| {
            w.str(channel.name.as_str());
            w.config(&channel.config);
            for next in channel.lane_next {
                w.u64(next);
            }
            w.u64(channel.next_sequence);
            w.u64(channel.messages);
            w.u64(channel.bytes);
            w.u64(channel.published);
            w.u64(channel.dropped);
            w.u32(channel.groups.len() as u32);
            for &group in &channel.groups {
                w.u64(group);
            }
        })?;
        out.chunks(
            MESSAGES,
            |_| {},
            channel.lanes.iter().flatten(),
            write_message,
        )?;
    }
    out.chunks(DETACHED, |_| {}, &image.detached, write_message)?;
    for group in &image.groups {
        out.record(GROUP, |w| {
            w.u64(group.id);
            w.str(&group.name);
            w.str(group.pattern.as_str());
            w.u8(u8::from(group.ephemeral));
            w.duration(group.ack_wait);
            w.u32(group.max_deliveries);
            w.u64(group.delivered);
            w.u64(group.acked);
            w.u64(group.redelivered);
            w.u64(group.dead_lettered);
            w.u32(group.cursors.len() as u32);
            for (channel, cursor) in &group.cursors {
                w.u64(*channel);
                for c in cursor {
                    w.u64(*c);
                }
            }
            w.u32(group.members.len() as u32);
            for m in &group.members {
                w.u64(m.id);
                w.u64(m.prefetch);
                w.u64(m.in_flight);
            }
        })?;
        let id = group.id;
        out.chunks(
            PENDING,
            |w| w.u64(id),
            &group.pending,
            |w, p| {
                w.u64(p.key);
                w.u32(p.attempts);
                match p.state {
                    PendingImageState::InFlight(member) => {
                        w.u8(0);
                        w.u64(member);
                    }
                    PendingImageState::Scheduled => w.u8(1),
                    PendingImageState::Ready => w.u8(2),
                }
                w.u64(p.generation);
                w.opt_str(p.last_error.as_deref());
            },
        )?;
        out.chunks(
            READY,
            |w| w.u64(id),
            &group.ready,
            |w, (priority, key)| {
                w.u8(*priority as u8);
                w.u64(*key);
            },
        )?;
        out.chunks(
            ACK_DEADLINES,
            |w| w.u64(id),
            &group.ack_deadlines,
            |w, (due, key, generation)| {
                w.time(*due);
                w.u64(*key);
                w.u64(*generation);
            },
        )?;
    }
    out.chunks(
        TIMERS,
        |_| {},
        &image.timers,
        |w, t| {
            w.time(t.due);
            w.u64(t.group);
            w.u64(t.key);
            w.u64(t.generation);
        },
    )?;
    out.chunks(
        DEDUP,
        |_| {},
        &image.dedup,
        |w, d| {
            w.time(d.expires);
            w.id(d.receipt.id);
            w.str(d.receipt.channel.as_str());
            w.u64(d.receipt.sequence);
            w.u64(d.receipt.groups as u64);
        },
    )?;
    out.chunks(
        DEDUP_ORDER,
        |_| {},
        &image.dedup_order,
        |w, (at, id)| {
            w.time(*at);
            w.id(*id);
        },
    )?;
    out.chunks(DEAD, |_| {}, &image.dead, write_dead)?;
    out.record(END, |w| {
        for count in Counts::of(image).fields() {
            w.u64(count);
        }
    })?;
    out.flush()?;
    let bytes = out.bytes;
    file.sync()?;
    drop(file);
    storage.rename(&tmp, &name)?;
    storage.sync_dir()?;
    Ok(bytes)
}

/// Builds an image from a checkpoint's records, checking that they come in an order
/// the writer produces.
struct Reader {
    image: StateImage,
    meta: bool,
    end: bool,
}

impl Reader {
    fn group(&mut self, r: &mut R<'_>) -> DResult<&mut GroupImage> {
        let id = r.u64()?;
        match self.image.groups.last_mut() {
            Some(group) if group.id == id => Ok(group),
            _ => Err(invalid(format!(
                "entries of group {id} do not follow that group's record"
            ))),
        }
    }

    fn record(&mut self, mut r: R<'_>) -> DResult<()> {
        let tag = r.u8()?;
        if self.end {
            return Err(invalid("a record after the end record"));
        }
        if !self.meta && tag != META {
            return Err(invalid("the checkpoint does not start with its settings"));
        }
        let count = |r: &mut R<'_>| r.u32().map(|n| n as usize);
        match tag {
            META if !self.meta => {
                self.meta = true;
                let image = &mut self.image;
                image.next_key = r.u64()?;
                image.next_group = r.u64()?;
                image.next_member = r.u64()?;
                image.rejected_full = r.u64()?;
                image.expired = r.u64()?;
                image.max_dead_letters = r.u64()?;
                image.dead_dropped = r.u64()?;
                image.deterministic_dead_ids = r.flag()?;
                image.dead_id_counter = r.u64()?;
                for _ in 0..count(&mut r)? {
                    let p = pattern(r.str()?)?;
                    image.channel_configs.push((p, r.config()?));
                }
                for _ in 0..count(&mut r)? {
                    image.aged_channels.push(r.u64()?);
                }
            }
            CHANNEL => {
                let name = r.channel()?;
                let config = r.config()?;
                let lane_next = [r.u64()?, r.u64()?, r.u64()?, r.u64()?];
                let mut channel = ChannelImage {
                    name,
                    config,
                    lanes: Default::default(),
                    lane_next,
                    next_sequence: r.u64()?,
                    messages: r.u64()?,
                    bytes: r.u64()?,
                    published: r.u64()?,
                    dropped: r.u64()?,
                    groups: Vec::new(),
                };
                for _ in 0..count(&mut r)? {
                    channel.groups.push(r.u64()?);
                }
                self.image.channels.push(channel);
            }
            MESSAGES => {
                let position = self.image.channels.len();
                let Some(channel) = self.image.channels.last_mut() else {
                    return Err(invalid("messages before any channel"));
                };
                for _ in 0..count(&mut r)? {
                    let m = read_message(&mut r)?;
                    if m.channel + 1 != position as u64 {
                        return Err(invalid(format!(
                            "message {} names channel {} inside channel {}",
                            m.key,
                            m.channel,
                            position - 1
                        )));
                    }
                    channel.lanes[m.envelope.header.priority as usize - 1].push(m);
                }
            }
            DETACHED => {
                for _ in 0..count(&mut r)? {
                    let m = read_message(&mut r)?;
                    self.image.detached.push(m);
                }
            }
            GROUP => {
                let mut group = GroupImage {
                    id: r.u64()?,
                    name: r.str()?,
                    pattern: pattern(r.str()?)?,
                    ephemeral: r.flag()?,
                    ack_wait: r.duration()?,
                    max_deliveries: r.u32()?,
                    cursors: Vec::new(),
                    pending: Vec::new(),
                    ready: Vec::new(),
                    ack_deadlines: Vec::new(),
                    members: Vec::new(),
                    delivered: r.u64()?,
                    acked: r.u64()?,
                    redelivered: r.u64()?,
                    dead_lettered: r.u64()?,
                };
                for _ in 0..count(&mut r)? {
                    let channel = r.u64()?;
                    group
                        .cursors
                        .push((channel, [r.u64()?, r.u64()?, r.u64()?, r.u64()?]));
                }
                for _ in 0..count(&mut r)? {
                    group.members.push(MemberImage {
                        id: r.u64()?,
                        prefetch: r.u64()?,
                        in_flight: r.u64()?,
                    });
                }
                self.image.groups.push(group);
            }
            PENDING => {
                let group = self.group(&mut r)?;
                for _ in 0..count(&mut r)? {
                    let key = r.u64()?;
                    let attempts = r.u32()?;
                    let state = match r.u8()? {
                        0 => PendingImageState::InFlight(r.u64()?),
                        1 => PendingImageState::Scheduled,
                        2 => PendingImageState::Ready,
                        n => return Err(invalid(format!("unknown pending state {n}"))),
                    };
                    group.pending.push(PendingImage {
                        key,
                        attempts,
                        state,
                        generation: r.u64()?,
                        last_error: r.opt_str()?,
                    });
                }
            }
            READY => {
                let group = self.group(&mut r)?;
                for _ in 0..count(&mut r)? {
                    let priority = Priority::from_u8(r.u8()?)
                        .map_err(|e| invalid(format!("bad priority: {e}")))?;
                    group.ready.push((priority, r.u64()?));
                }
            }
            ACK_DEADLINES => {
                let group = self.group(&mut r)?;
                for _ in 0..count(&mut r)? {
                    group.ack_deadlines.push((r.time()?, r.u64()?, r.u64()?));
                }
            }
            TIMERS => {
                for _ in 0..count(&mut r)? {
                    self.image.timers.push(TimerImage {
                        due: r.time()?,
                        group: r.u64()?,
                        key: r.u64()?,
                        generation: r.u64()?,
                    });
                }
            }
            DEDUP => {
                for _ in 0..count(&mut r)? {
                    let expires = r.time()?;
                    let receipt = PublishReceipt {
                        id: r.id()?,
                        channel: r.channel()?,
                        sequence: r.u64()?,
                        duplicate: false,
                        groups: usize::try_from(r.u64()?).unwrap_or(usize::MAX),
                    };
                    self.image.dedup.push(DedupImage { expires, receipt });
                }
            }
            DEDUP_ORDER => {
                for _ in 0..count(&mut r)? {
                    self.image.dedup_order.push((r.time()?, r.id()?));
                }
            }
            DEAD => {
                for _ in 0..count(&mut r)? {
                    self.image.dead.push(read_dead(&mut r)?);
                }
            }
            END => {
                let found = Counts::of(&self.image).fields();
                for (what, have) in found.iter().enumerate() {
                    let expected = r.u64()?;
                    if expected != *have {
                        return Err(invalid(format!(
                            "the end record counts {expected} of item kind {what}, the \
                             checkpoint holds {have}"
                        )));
                    }
                }
                self.end = true;
            }
            n => return Err(invalid(format!("unknown checkpoint record type {n}"))),
        }
        r.finish("checkpoint record")
    }
}

/// Reads the checkpoint `name` (which must be for segment `index`).
///
/// # Errors
/// [`ScanError::Damaged`] naming the file and offset for a damaged header, a checksum
/// mismatch, a record that does not decode, or a checkpoint cut short (no `End`
/// record); [`ScanError::Io`] when it cannot be read.
pub fn read_checkpoint(
    storage: &dyn Storage,
    name: &str,
    index: u64,
) -> Result<StateImage, ScanError> {
    let bytes = crate::segment::read_whole(storage, name)?;
    let damaged = |offset: usize, what: String| {
        ScanError::Damaged(Damage {
            file: name.to_string(),
            offset: offset as u64,
            what,
        })
    };
    if bytes.len() < CHECKPOINT_HEADER || bytes[..CHECKPOINT_HEADER] != header(index) {
        return Err(damaged(
            0,
            "the checkpoint header is missing, damaged or belongs to another checkpoint".into(),
        ));
    }
    let mut reader = Reader {
        image: StateImage::default(),
        meta: false,
        end: false,
    };
    let mut offset = CHECKPOINT_HEADER;
    while offset < bytes.len() {
        match read_frame(&bytes[offset..]) {
            Frame::Ok(payload, len) => {
                reader
                    .record(R(payload, Some(&bytes)))
                    .map_err(|e: DecodeError| {
                        damaged(
                            offset,
                            format!("a checkpoint record with a valid checksum is wrong: {e}"),
                        )
                    })?;
                offset += len;
            }
            Frame::Incomplete => {
                return Err(damaged(
                    offset,
                    "the checkpoint ends inside a record".into(),
                ))
            }
            Frame::Zeros => return Err(damaged(offset, "the checkpoint ends in zeros".into())),
            Frame::Corrupt(what) => return Err(damaged(offset, what)),
        }
    }
    if !reader.end {
        return Err(damaged(
            offset,
            "the checkpoint ends without its end record".into(),
        ));
    }
    Ok(reader.image)
}

/// What deleting what the newest checkpoint made redundant removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Retired {
    /// Segment files deleted.
    pub(crate) segments: u64,
    /// Their bytes.
    pub(crate) segment_bytes: u64,
    /// Older checkpoint files deleted.
    pub(crate) checkpoints: u64,
}

/// Deletes what the checkpoint for segment `newest` made redundant, keeping one
/// checkpoint before it as a fallback: the segments before that previous checkpoint,
/// and every checkpoint older than it. With no previous checkpoint nothing is deleted
/// (the whole log is the newest checkpoint's fallback). Quarantined files are never
/// touched.
///
/// # Errors
/// Any I/O error; what was deleted before it stays deleted, which is safe (every
/// deleted file was covered by both kept checkpoints).
pub(crate) fn retire(storage: &dyn Storage, newest: u64) -> io::Result<Retired> {
    let as_io = |e: ScanError| io::Error::other(e.to_string());
    let checkpoints = list_checkpoints(storage).map_err(as_io)?;
    let Some(previous) = checkpoints
        .iter()
        .map(|(index, _)| *index)
        .filter(|index| *index < newest)
        .max()
    else {
        return Ok(Retired::default());
    };
    let mut retired = Retired::default();
    for (index, name) in crate::segment::list_segments(storage).map_err(as_io)? {
        if index < previous {
            let size = storage.size(&name)?;
            storage.remove(&name)?;
            retired.segments += 1;
            retired.segment_bytes += size;
        }
    }
    for (index, name) in checkpoints {
        if index < previous {
            storage.remove(&name)?;
            retired.checkpoints += 1;
        }
    }
    if retired != Retired::default() {
        storage.sync_dir()?;
    }
    Ok(retired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::FaultyStorage;
    use agentbus::engine_core::{State, Take};
    use agentbus::{
        ChannelConfig, ChannelName, ChannelPattern, DeadReason, Envelope, Settlement,
        StartPosition, SubscribeOptions,
    };
    use chrono::{DateTime, Utc};
    use std::time::Duration;

    /// A state with something in every part of the image: messages in several lanes
    /// and channels, a detached one, in-flight, scheduled and ready entries, timers,
    /// dedup entries, dead letters, configs and an aged channel.
    fn busy_state() -> State {
        let mut state = State::new();
        state.deterministic_dead_ids = true;
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
        let mut wake = Vec::new();
        state.configure(
            ChannelPattern::new("cp.aged").unwrap(),
            ChannelConfig {
                max_age: Some(Duration::from_secs(1)),
                ..ChannelConfig::default()
            },
        );
        let options = SubscribeOptions::new(ChannelPattern::new("cp.>").unwrap())
            .group("g")
            .start(StartPosition::Earliest)
            .ack_wait(Duration::from_secs(5))
            .max_deliveries(2)
            .prefetch(100);
        let (group, member, _) = state.join(&options, t0).unwrap();
        let (_, private, _) = state
            .join(
                &SubscribeOptions::new(ChannelPattern::new("cp.a").unwrap()),
                t0,
            )
            .unwrap();
        for i in 0..40u8 {
            let channel = ["cp.a", "cp.b", "cp.aged"][usize::from(i % 3)];
            let mut e = Envelope::new(ChannelName::new(channel).unwrap(), "k", vec![i; 33])
                .with_priority(agentbus::Priority::from_u8(i % 4 + 1).unwrap());
            e.header.timestamp = at(i64::from(i));
            e.header.headers.insert("h".into(), format!("v{i}"));
            if i % 7 == 0 {
                e.header.deadline = Some(at(50));
            }
            if i % 11 == 0 {
                e.header.not_before = Some(at(10_000));
            }
            state.publish(e, at(i64::from(i)), &mut wake).unwrap();
        }
        let Ok(Take::Some(handouts, _)) = state.take(group, member, 20, at(100)) else {
            panic!("deliveries expected");
        };
        for (n, h) in handouts.iter().enumerate() {
            let settlement = match n % 4 {
                0 => Settlement::Ack,
                1 => Settlement::Nack {
                    delay: Duration::from_millis(300),
                    error: Some("later".into()),
                },
                2 => Settlement::Reject {
                    reason: DeadReason::Rejected,
                    error: "bad".into(),
                },
                _ => continue,
            };
            state
                .settle(group, h.key, settlement, at(120), &mut wake)
                .unwrap();
        }
        let _ = state.take(group, private, 3, at(130));
        // The aged channel trims its log; what the group holds stays (detached).
        state.fire_timers(at(1_500), &mut wake);
        state
    }

    #[test]
    fn a_checkpoint_reads_back_as_the_state_it_pictured() {
        let image = busy_state().image();
        assert!(!image.dead.is_empty() && !image.timers.is_empty() && !image.dedup.is_empty());
        assert!(image.groups.iter().any(|g| !g.pending.is_empty()));
        let storage = FaultyStorage::new(1);
        let bytes = write_checkpoint(&storage, 9, &image).unwrap();
        assert_eq!(storage.size(&checkpoint_name(9)).unwrap(), bytes);
        assert!(storage.list().unwrap().iter().all(|n| !n.ends_with(".tmp")));
        let read = read_checkpoint(&storage, &checkpoint_name(9), 9).unwrap();
        assert_eq!(read, image);
        let restored = State::from_image(read).unwrap();
        assert_eq!(restored.image(), image);
    }

    #[test]
    fn large_states_are_cut_into_chunks_and_read_back() {
        let mut state = State::new();
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        let mut wake = Vec::new();
        let options = SubscribeOptions::new(ChannelPattern::new("big").unwrap())
            .group("g")
            .prefetch(100_000);
        let (group, member, _) = state.join(&options, t0).unwrap();
        for _ in 0..3_000 {
            let e = Envelope::new(ChannelName::new("big").unwrap(), "k", vec![7u8; 1000]);
            state.publish(e, t0, &mut wake).unwrap();
        }
        let _ = state.take(group, member, 2_000, t0);
        let image = state.image();
        let storage = FaultyStorage::new(2);
        let bytes = write_checkpoint(&storage, 3, &image).unwrap();
        assert!(bytes > 3 * CHUNK as u64, "{bytes}");
        assert_eq!(
            read_checkpoint(&storage, &checkpoint_name(3), 3).unwrap(),
            image
        );
    }

    #[test]
    fn every_damaged_byte_is_refused_with_file_and_offset() {
        let image = busy_state().image();
        let storage = FaultyStorage::new(3);
        write_checkpoint(&storage, 4, &image).unwrap();
        let name = checkpoint_name(4);
        let clean = storage.read(&name).unwrap();
        for at in (0..clean.len()).step_by(7) {
            let damaged = FaultyStorage::new(4);
            let mut file = damaged.create(&name).unwrap();
            let mut bytes = clean.clone();
            bytes[at] ^= 0x10;
            file.write_all(&bytes).unwrap();
            match read_checkpoint(&damaged, &name, 4) {
                Err(ScanError::Damaged(d)) => {
                    assert_eq!(d.file, name);
                    assert!(
                        d.offset <= at as u64,
                        "damage at {at} reported at {}",
                        d.offset
                    );
                }
                other => panic!("a flipped bit at {at} was not refused: {other:?}"),
            }
        }
        // Cut short anywhere: refused too (no end record).
        for len in [0, 10, CHECKPOINT_HEADER, clean.len() / 2, clean.len() - 1] {
            let damaged = FaultyStorage::new(5);
            damaged
                .create(&name)
                .unwrap()
                .write_all(&clean[..len])
                .unwrap();
            assert!(
                matches!(
                    read_checkpoint(&damaged, &name, 4),
                    Err(ScanError::Damaged(_))
                ),
                "a checkpoint cut to {len} bytes was accepted"
            );
        }
    }

    #[test]
    fn retire_keeps_the_previous_checkpoint_and_what_it_needs() {
        use crate::segment::{list_segments, segment_name};
        let storage = FaultyStorage::new(6);
        for index in 1..=9 {
            storage
                .create(&segment_name(index))
                .unwrap()
                .write_all(&[1; 10])
                .unwrap();
        }
        let image = StateImage::default();
        write_checkpoint(&storage, 4, &image).unwrap();
        // The first checkpoint: nothing to delete, the whole log is its fallback.
        assert_eq!(retire(&storage, 4).unwrap(), Retired::default());
        write_checkpoint(&storage, 7, &image).unwrap();
        let retired = retire(&storage, 7).unwrap();
        assert_eq!(retired.segments, 3);
        assert_eq!(retired.segment_bytes, 30);
        let left: Vec<u64> = list_segments(&storage)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(left, (4..=9).collect::<Vec<_>>());
        write_checkpoint(&storage, 9, &image).unwrap();
        let retired = retire(&storage, 9).unwrap();
        assert_eq!((retired.segments, retired.checkpoints), (3, 1));
        let checkpoints: Vec<u64> = list_checkpoints(&storage)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(checkpoints, vec![7, 9]);
    }
}
