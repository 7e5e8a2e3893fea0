//! Feeds arbitrary bytes, behind a valid checkpoint header, to the checkpoint reader
//! on the simulated disk, and restores whatever it accepts. Neither may panic: a
//! damaged checkpoint is refused (`Damaged`), an inconsistent one `Corrupt`.
#![no_main]

use agentbus::engine_core::State;
use agentbus_file::checkpoint::{checkpoint_name, read_checkpoint, write_checkpoint};
use agentbus_file::fault::FaultyStorage;
use agentbus_file::Storage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let storage = FaultyStorage::new(0);
    // A valid empty checkpoint gives the header; the fuzzer's bytes replace the rest.
    write_checkpoint(&storage, 2, &Default::default()).expect("the simulated disk works");
    let name = checkpoint_name(2);
    let mut bytes = storage.read(&name).expect("just written");
    bytes.truncate(agentbus_file::checkpoint::CHECKPOINT_HEADER);
    bytes.extend_from_slice(data);
    let mut file = storage.create(&name).expect("the simulated disk works");
    file.write_all(&bytes).expect("the simulated disk works");
    if let Ok(image) = read_checkpoint(&storage, &name, 2) {
        let _ = State::from_image(image);
    }
});
