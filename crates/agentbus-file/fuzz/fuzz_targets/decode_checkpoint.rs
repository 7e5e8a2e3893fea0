//! Feeds arbitrary records to the checkpoint reader on the simulated disk, and restores
//! whatever it accepts. Neither may panic: a damaged checkpoint is refused
//! (`Damaged`), an inconsistent one `Corrupt`.
//!
//! The input is cut into records at `0xFF 0xFE` markers and each is framed with valid
//! checksums behind a valid header, so the fuzzer reaches the record decoder instead
//! of stopping at the first checksum; an input starting with `0x00` is used raw (frame
//! headers, lengths and checksums fuzzed too).
#![no_main]

use agentbus::engine_core::State;
use agentbus_file::checkpoint::{checkpoint_name, read_checkpoint, write_checkpoint, CHECKPOINT_HEADER};
use agentbus_file::codec::write_frame;
use agentbus_file::fault::FaultyStorage;
use agentbus_file::Storage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let storage = FaultyStorage::new(0);
    // A valid empty checkpoint gives the header; the fuzzer's records replace the rest.
    write_checkpoint(&storage, 2, &Default::default()).expect("the simulated disk works");
    let name = checkpoint_name(2);
    let mut bytes = storage.read(&name).expect("just written");
    bytes.truncate(CHECKPOINT_HEADER);
    match data.split_first() {
        Some((0, raw)) => bytes.extend_from_slice(raw),
        _ => {
            let mut rest = data;
            while !rest.is_empty() {
                let end = rest
                    .windows(2)
                    .position(|w| w == [0xFF, 0xFE])
                    .unwrap_or(rest.len());
                if end > 0 {
                    write_frame(&mut bytes, &rest[..end]);
                }
                rest = rest.get(end + 2..).unwrap_or(&[]);
            }
        }
    }
    let mut file = storage.create(&name).expect("the simulated disk works");
    file.write_all(&bytes).expect("the simulated disk works");
    if let Ok(image) = read_checkpoint(&storage, &name, 2) {
        let _ = State::from_image(image);
    }
});
