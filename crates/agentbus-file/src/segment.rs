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
    mut apply: impl FnMut(Op) -> Result<(), String>,
) -> Result<Scan, ScanError> {
    let mut segments = list_segments(storage)?;
    segments.retain(|(index, _)| *index >= from);
    let mut scan = Scan::default();
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
                    "segment {} is missing: the log {} continues there, but the first                      segment present is {name}",
                    segment_name(from),
                    if from == 1 {
                        "starts".to_string()
                    } else {
                        format!("after checkpoint {}", crate::checkpoint::checkpoint_name(from))
                    },
                ),
            }));
        }
    }
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
        let bytes = read_whole(storage, name)?;
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

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(7), "00000000000000000007.seg");
        assert_eq!(parse_segment_name(&segment_name(7)), Some(7));
        assert_eq!(parse_segment_name("LOCK"), None);
        assert_eq!(parse_segment_name("7.seg"), None);
    }
}
