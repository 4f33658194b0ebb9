//! The node's decoder of untrusted bytes: a request frame from any client.
//! Decoding must never panic or allocate past the frame limit, and whatever decodes
//! must encode to a frame that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::proto::{HARD_MAX_FRAME_BYTES, Request, frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, _))) = frame::decode::<Request>(data, HARD_MAX_FRAME_BYTES) {
        let bytes = frame::encode(&request).expect("a decoded request encodes");
        let again = frame::decode::<Request>(&bytes, HARD_MAX_FRAME_BYTES);
        assert!(
            matches!(&again, Ok(Some((r, n))) if *r == request && *n == bytes.len()),
            "re-encoding changed the value"
        );
    }
});
