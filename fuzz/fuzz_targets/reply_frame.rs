//! The client's decoder of what a node sends: replies and pushes. A client must
//! survive a hostile or broken node.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::proto::{HARD_MAX_FRAME_BYTES, Push, Reply, frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((reply, _))) = frame::decode::<Reply>(data, HARD_MAX_FRAME_BYTES) {
        let bytes = frame::encode(&reply).expect("a decoded reply encodes");
        let again = frame::decode::<Reply>(&bytes, HARD_MAX_FRAME_BYTES);
        assert!(
            matches!(&again, Ok(Some((r, n))) if *r == reply && *n == bytes.len()),
            "re-encoding changed the value"
        );
    }
    let _ = frame::decode::<Push>(data, HARD_MAX_FRAME_BYTES);
});
