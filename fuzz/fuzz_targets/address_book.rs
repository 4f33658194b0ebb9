//! The address-book importer reads files from anywhere (exports of phones and
//! services). Garbage must never crash it, and whatever it returns has a number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::client::import;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = import::parse(&text);
    assert!(parsed.entries.iter().all(|e| !e.number.trim().is_empty()));
});
