//! Feeds arbitrary bytes to the record decoder, the frame reader and the segment
//! scanner (behind a valid segment header, on the simulated disk). None may panic;
//! every record that decodes must re-encode to the same bytes.
#![no_main]

use agentbus_file::codec::{read_frame, Frame, Op};
use agentbus_file::fault::FaultyStorage;
use agentbus_file::segment::{scan, segment_header, segment_name};
use agentbus_file::Storage;
use libfuzzer_sys::fuzz_target;

fn check_round_trip(payload: &[u8]) {
    if let Ok(op) = Op::decode(payload) {
        let mut again = Vec::new();
        op.encode(&mut again);
        assert_eq!(again, payload, "a decoded record re-encodes to other bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    check_round_trip(data);
    let mut offset = 0;
    while offset < data.len() {
        match read_frame(&data[offset..]) {
            Frame::Ok(payload, len) => {
                check_round_trip(payload);
                offset += len;
            }
            _ => break,
        }
    }
    let storage = FaultyStorage::new(0);
    let name = segment_name(1);
    if let Ok(mut file) = storage.create(&name) {
        let _ = file.write_all(&segment_header(1));
        let _ = file.write_all(data);
    }
    let _ = scan(&storage, 1, |op| {
        let mut bytes = Vec::new();
        op.encode(&mut bytes);
        match Op::decode(&bytes) {
            Ok(again) if again == op => Ok(()),
            _ => Err("round trip".to_string()),
        }
    });
});
