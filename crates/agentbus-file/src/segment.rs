//! Segment files: naming, the segment header, and reading a whole log back with the
//! recovery rules of `docs/DURABLE_LOG.md`.
//!
//! A log is a run of files `00000000000000000001.seg`, `…02.seg`, … with no gap. Each
//! starts with a 20-byte header (magic `AGBUSLG1`, the segment's index, a CRC32C of
//! both) followed by frames. Only the last segment is ever appended to; a segment is
//! synced before the next one is created, so every earlier segment is whole.

use std::fmt;

use crate::codec::{read_frame, Frame, Op, FRAME_HEADER};
use crate::storage::Storage;

/// The magic at the start of every segment.
pub const MAGIC: &[u8; 8] = b"AGBUSLG1";

/// Bytes of a segment header.
pub const SEGMENT_HEADER: usize = 20;

/// The file name of segment `index`.
pub fn segment_name(index: u64) -> String {
    format!("{index:020}.seg")
}

/// The index of a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    parse_indexed_name(name, ".seg")
}

/// The index in a `<20 digits><extension>` file name (segments, checkpoints).
pub(crate) fn parse_indexed_name(name: &str, extension: &str) -> Option<u64> {
    let stem = name.strip_suffix(extension)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The header of segment `index`.
pub fn segment_header(index: u64) -> [u8; SEGMENT_HEADER] {
    indexed_header(MAGIC, index)
}

/// A 20-byte file header: `magic`, `index` (u64 LE), and a CRC32C of both.
pub(crate) fn indexed_header(magic: &[u8; 8], index: u64) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[..8].copy_from_slice(magic);
    header[8..16].copy_from_slice(&index.to_le_bytes());
    let crc = crc32c::crc32c(&header[..16]);
    header[16..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Where a log is damaged, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub file: String,
    /// The byte offset in it where the damage starts.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at offset {}: {}", self.file, self.offset, self.what)
    }
}

/// A torn tail found (and, when opening read-write, cut off) by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The last segment's file.
    pub file: String,
    /// Where the whole records end.
    pub offset: u64,
    /// How many bytes after it were dropped.
    pub dropped_bytes: u64,
    /// What the bytes looked like (`incomplete record`, `zero-filled`…).
    pub what: String,
}

/// One segment as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Its index.
    pub index: u64,
    /// Its file name.
    pub name: String,
    /// Bytes of whole records (header included): where appending continues.
    pub valid_len: u64,
}

/// What reading a whole log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// The segments, in order (an unreadable empty last segment is not listed).
    pub segments: Vec<SegmentInfo>,
    /// How many records were read.
    pub records: u64,
    /// The torn tail, if the last segment had one.
    pub torn: Option<TornTail>,
    /// A last segment whose header was never completely written (removed on open).
    pub empty_last: Option<String>,
}

/// Why a log cannot be read.
#[derive(Debug)]
pub enum ScanError {
    /// Reading or listing failed.
    Io(String, std::io::Error),
    /// A checksum mismatch or impossible record before the tail, a damaged header, a
    /// missing segment or a record that does not decode: never skipped.
    Damaged(Damage),
    /// The callback refused a record (the state machine diverged from the journal).
    Rejected(Damage),
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::Io(what, e) => write!(f, "{what}: {e}"),
            ScanError::Damaged(d) | ScanError::Rejected(d) => d.fmt(f),
        }
    }
}

/// The segment files of `storage`, sorted by index.
///
/// # Errors
/// [`ScanError::Io`] when the directory cannot be listed.
pub fn list_segments(storage: &dyn Storage) -> Result<Vec<(u64, String)>, ScanError> {
    let mut segments: Vec<(u64, String)> = storage
        .list()
        .map_err(|e| ScanError::Io(format!("listing {}", storage.describe()), e))?
        .into_iter()
        .filter_map(|name| parse_segment_name(&name).map(|i| (i, name)))
        .collect();
    segments.sort();
    Ok(segments)
}

/// Reads every record of the log from segment `from` on (1: the whole log; a
/// checkpoint's index: what came after it) in order, calling `apply` with each, and
/// applies the recovery rules: a torn tail of the last segment is reported in
/// [`Scan::torn`] (not cut here); any other damage, a missing segment included, is an
/// error naming the file and offset. Segments before `from` are not read.
///
/// # Errors
/// See [`ScanError`].
pub fn scan(
    storage: &dyn Storage,
    from: u64,
    apply: impl FnMut(Op) -> Result<(), String>,
) -> Result<Scan, ScanError> {
    let segments = segments_from(storage, from)?;
    scan_segments(&segments, |name| read_whole(storage, name), apply)
}

/// The segments a scan from segment `from` reads, in order, after checking that the
/// log's first one is there.
fn segments_from(storage: &dyn Storage, from: u64) -> Result<Vec<(u64, String)>, ScanError> {
    let mut segments = list_segments(storage)?;
    segments.retain(|(index, _)| *index >= from);
    // A checkpoint is written only after the segment it continues in was created and
    // synced, so that segment must exist (a brand-new log has none at all).
    if from > 1 && segments.is_empty() {
        return Err(ScanError::Damaged(Damage {
            file: segment_name(from),
            offset: 0,
            what: format!(
                "segment {} is missing: the log continues there after checkpoint {}",
                segment_name(from),
                crate::checkpoint::checkpoint_name(from)
            ),
        }));
    }
    if let Some((first, name)) = segments.first() {
        if *first != from {
            return Err(ScanError::Damaged(Damage {
                file: segment_name(from),
                offset: 0,
                what: format!(
                    "segment {} is missing: the log {} continues there, but the first \
                     segment present is {name}",
                    segment_name(from),
                    if from == 1 {
                        "starts".to_string()
                    } else {
                        format!(
                            "after checkpoint {}",
                            crate::checkpoint::checkpoint_name(from)
                        )
                    },
                ),
            }));
        }
    }
    Ok(segments)
}

/// Applies the recovery rules to `segments` (from [`segments_from`]), getting each
/// file's bytes from `read`, in order.
fn scan_segments(
    segments: &[(u64, String)],
    mut read: impl FnMut(&str) -> Result<bytes::Bytes, ScanError>,
    mut apply: impl FnMut(Op) -> Result<(), String>,
) -> Result<Scan, ScanError> {
    let mut scan = Scan::default();
    for (position, (index, name)) in segments.iter().enumerate() {
        let last = position + 1 == segments.len();
        if position > 0 {
            let previous = segments[position - 1].0;
            if *index != previous + 1 {
                return Err(ScanError::Damaged(Damage {
                    file: segment_name(previous + 1),
                    offset: 0,
                    what: format!(
                        "segment {} is missing between {} and {}: the log has a hole",
                        segment_name(previous + 1),
                        segments[position - 1].1,
                        name
                    ),
                }));
            }
        }
        let bytes = read(name)?;
        let damaged = |offset: usize, what: String| {
            ScanError::Damaged(Damage {
                file: name.clone(),
                offset: offset as u64,
                what,
            })
        };
        // The header.
        if bytes.len() < SEGMENT_HEADER || bytes[..SEGMENT_HEADER].iter().all(|&b| b == 0) {
            if last && bytes.iter().all(|&b| b == 0) {
                scan.empty_last = Some(name.clone());
                continue;
            }
            if last && bytes.len() < SEGMENT_HEADER && segment_header(*index).starts_with(&bytes) {
                scan.empty_last = Some(name.clone());
                continue;
            }
            return Err(damaged(
                0,
                "the segment header is missing or cut short".into(),
            ));
        }
        if bytes[..SEGMENT_HEADER] != segment_header(*index) {
            return Err(damaged(
                0,
                "the segment header is damaged or belongs to another segment".into(),
            ));
        }
        let mut offset = SEGMENT_HEADER;
        while offset < bytes.len() {
            match read_frame(&bytes[offset..]) {
                Frame::Ok(payload, len) => {
                    let payload = bytes.slice_ref(payload);
                    let op = Op::decode_shared(&payload).map_err(|e| {
                        damaged(
                            offset,
                            format!("a record with a valid checksum does not decode: {e}"),
                        )
                    })?;
                    apply(op).map_err(|what| {
                        ScanError::Rejected(Damage {
                            file: name.clone(),
                            offset: offset as u64,
                            what,
                        })
                    })?;
                    scan.records += 1;
                    offset += len;
                }
                Frame::Incomplete | Frame::Zeros if last => {
                    let what = if matches!(read_frame(&bytes[offset..]), Frame::Zeros) {
                        "zero-filled tail"
                    } else {
                        "incomplete last record"
                    };
                    scan.torn = Some(TornTail {
                        file: name.clone(),
                        offset: offset as u64,
                        dropped_bytes: (bytes.len() - offset) as u64,
                        what: what.into(),
                    });
                    break;
                }
                Frame::Incomplete => {
                    return Err(damaged(
                        offset,
                        "a sealed segment ends inside a record".into(),
                    ))
                }
                Frame::Zeros => {
                    return Err(damaged(offset, "a sealed segment ends in zeros".into()))
                }
                Frame::Corrupt(what) if last && torn_by_zeros(&bytes, offset) => {
                    scan.torn = Some(TornTail {
                        file: name.clone(),
                        offset: offset as u64,
                        dropped_bytes: (bytes.len() - offset) as u64,
                        what: format!(
                            "last record zero-filled from a sector boundary to the end ({what})"
                        ),
                    });
                    break;
                }
                Frame::Corrupt(what) => return Err(damaged(offset, what)),
            }
        }
        scan.segments.push(SegmentInfo {
            index: *index,
            name: name.clone(),
            valid_len: offset as u64,
        });
    }
    Ok(scan)
}

/// How many segment files a [`ReadAhead`] may hold read but not yet scanned (64 MiB
/// each at the default size): enough to keep the reader busy while the scan decodes,
/// little enough that a long history is not all in memory at once.
const READ_AHEAD_FILES: usize = 4;

/// A scan whose segment files are read on a thread of their own, ahead of the
/// decoding, so that on a multi-core machine the kernel's copying of the files (most
/// of the cost of opening a large live backlog) overlaps with decoding and replaying
/// them, and with loading the checkpoint that precedes them.
///
/// Start it before loading the checkpoint; dropping it stops the reader.
pub(crate) struct ReadAhead {
    segments: Vec<(u64, String)>,
    files: std::sync::mpsc::Receiver<Result<bytes::Bytes, ScanError>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ReadAhead {
    /// Lists the segments from `from` on (checking, as [`scan`] does, that the first
    /// is there) and starts reading them.
    ///
    /// # Errors
    /// As [`scan`], for the listing; [`ScanError::Io`] if the thread cannot start.
    pub(crate) fn start(
        storage: std::sync::Arc<dyn Storage>,
        from: u64,
    ) -> Result<ReadAhead, ScanError> {
        let segments = segments_from(&*storage, from)?;
        let names: Vec<String> = segments.iter().map(|(_, name)| name.clone()).collect();
        let (sender, files) = std::sync::mpsc::sync_channel(READ_AHEAD_FILES);
        let reader = std::thread::Builder::new()
            .name("agentbus-read-ahead".into())
            .spawn(move || {
                for name in names {
                    let bytes = read_whole(&*storage, &name);
                    let failed = bytes.is_err();
                    // The scan stopped (damage found, or it is done): so do we.
                    if sender.send(bytes).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| ScanError::Io("starting the segment reader thread".into(), e))?;
        Ok(ReadAhead {
            segments,
            files,
            reader: Some(reader),
        })
    }

    /// Runs the scan (see [`scan`]) on the files as they are read.
    ///
    /// # Errors
    /// See [`ScanError`].
    pub(crate) fn scan(
        mut self,
        apply: impl FnMut(Op) -> Result<(), String>,
    ) -> Result<Scan, ScanError> {
        let segments = std::mem::take(&mut self.segments);
        let files = &self.files;
        scan_segments(
            &segments,
            |name| {
                files.recv().unwrap_or_else(|_| {
                    Err(ScanError::Io(
                        format!("reading {name}"),
                        std::io::Error::other("the segment reader thread stopped"),
                    ))
                })
            },
            apply,
        )
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Disconnect first, so a reader blocked on a full queue gives up.
        let (_, closed) = std::sync::mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.files, closed));
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The whole content of a log file, as a buffer record payloads can share.
pub(crate) fn read_whole(storage: &dyn Storage, name: &str) -> Result<bytes::Bytes, ScanError> {
    storage
        .read(name)
        .map(bytes::Bytes::from)
        .map_err(|e| ScanError::Io(format!("reading {name}"), e))
}

/// Disks write whole sectors: a write cut short by a power loss can leave the file
/// extended with zeros from a sector boundary on. A record that fails its checksum is
/// such a torn write, not damage, when the bytes from a 512-byte-aligned offset inside
/// it (its header, if the header is what fails) to the end of the file are all zero.
/// A flipped bit leaves no such run of zeros, so it is still refused.
fn torn_by_zeros(bytes: &[u8], offset: usize) -> bool {
    const SECTOR: usize = 512;
    let zeros_from = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last_nonzero| last_nonzero + 1);
    let aligned = zeros_from.div_ceil(SECTOR) * SECTOR;
    if aligned >= bytes.len() || aligned <= offset {
        return false;
    }
    let rest = &bytes[offset..];
    let header_ok =
        rest.len() >= FRAME_HEADER && crc32c::crc32c(&rest[..4]).to_le_bytes() == rest[4..8];
    let frame_end = if header_ok {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        offset + FRAME_HEADER + len
    } else {
        offset + FRAME_HEADER
    };
    aligned < frame_end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_from_a_sector_boundary_inside_the_last_record_are_a_torn_write() {
        use crate::codec::write_frame;
        let mut file = vec![1u8; 500];
        let at = file.len();
        write_frame(&mut file, &[7u8; 100]);
        // Zero the record from the sector boundary at 512 on, and add zeros after.
        for b in &mut file[512..] {
            *b = 0;
        }
        file.resize(1024, 0);
        assert!(torn_by_zeros(&file, at));
        // A flipped bit instead: no zero run, so damage.
        let mut flipped = vec![1u8; 500];
        write_frame(&mut flipped, &[7u8; 100]);
        flipped[at + 50] ^= 1;
        assert!(!torn_by_zeros(&flipped, at));
        // Zeros that start after the record end are not its tear.
        let mut clean = vec![1u8; 500];
        write_frame(&mut clean, &[7u8; 100]);
        clean[at + 20] ^= 1;
        clean.resize(2048, 0);
        assert!(!torn_by_zeros(&clean, at));
    }

    /// A log of `segments` files with `per_segment` `Open` records each.
    fn log(segments: u64, per_segment: u64) -> crate::fault::FaultyStorage {
        use crate::codec::write_frame;
        let storage = crate::fault::FaultyStorage::new(1);
        for index in 1..=segments {
            let mut file = storage.create(&segment_name(index)).unwrap();
            let mut bytes = segment_header(index).to_vec();
            for n in 0..per_segment {
                let mut op = Vec::new();
                Op::Open {
                    now: chrono::DateTime::UNIX_EPOCH,
                    max_dead_letters: index * 1_000 + n,
                }
                .encode(&mut op);
                write_frame(&mut bytes, &op);
            }
            file.write_all(&bytes).unwrap();
            file.sync().unwrap();
        }
        storage.sync_dir().unwrap();
        storage
    }

    fn opened(op: Op) -> u64 {
        match op {
            Op::Open {
                max_dead_letters, ..
            } => max_dead_letters,
            other => panic!("unexpected record {other:?}"),
        }
    }

    #[test]
    fn read_ahead_scans_what_the_plain_scan_scans() {
        let storage = log(9, 5);
        let mut plain = Vec::new();
        let plain_scan = scan(&storage, 3, |op| {
            plain.push(opened(op));
            Ok(())
        })
        .unwrap();
        let mut ahead = Vec::new();
        let ahead_scan = ReadAhead::start(std::sync::Arc::new(storage), 3)
            .unwrap()
            .scan(|op| {
                ahead.push(opened(op));
                Ok(())
            })
            .unwrap();
        assert_eq!(plain_scan, ahead_scan);
        assert_eq!(plain, ahead);
        assert_eq!(plain.len(), 7 * 5);
        assert_eq!(plain.first(), Some(&3_000));
    }

    #[test]
    fn read_ahead_stops_at_damage_and_when_dropped_early() {
        let storage = log(9, 5);
        storage
            .damage(&segment_name(4), |bytes| {
                let at = bytes.len() - 3;
                bytes[at] ^= 0x40;
            })
            .unwrap();
        let plain = scan(&storage, 1, |_| Ok(())).unwrap_err().to_string();
        let shared: std::sync::Arc<dyn Storage> = std::sync::Arc::new(storage);
        let ahead = ReadAhead::start(shared.clone(), 1)
            .unwrap()
            .scan(|_| Ok(()))
            .unwrap_err()
            .to_string();
        assert_eq!(plain, ahead);
        assert!(ahead.contains(&segment_name(4)), "{ahead}");
        // Never scanned: the reader, blocked on its full queue, must let go.
        drop(ReadAhead::start(shared.clone(), 1).unwrap());
        // A missing first segment is found by the listing, before any reading.
        assert!(ReadAhead::start(shared, 20).is_err());
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(7), "00000000000000000007.seg");
        assert_eq!(parse_segment_name(&segment_name(7)), Some(7));
        assert_eq!(parse_segment_name("LOCK"), None);
        assert_eq!(parse_segment_name("7.seg"), None);
    }
}
