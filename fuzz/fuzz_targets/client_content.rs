//! The client's decoders: the plaintext inside an end-to-end envelope (any peer can
//! put any bytes there), a group message's body (the node hands any bytes on) and the
//! values of the home database (a damaged or altered home), and an opened profile
//! (its owner sealed whatever bytes it liked). Errors, never a panic or
//! an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::client::{content::Plaintext, history, messenger, profile, senderkeys};

fuzz_target!(|data: &[u8]| {
    let _ = Plaintext::decode(data, [0; 16], 0);
    let _ = senderkeys::parse_body(data);
    let _ = history::decode_stored(data);
    messenger::decode_stored(data);
    let _ = profile::decode_plain(data);
});
