//! The client's decoder of the node's membership filter: a filter that decodes must
//! answer lookups without panicking (no index outside its fingerprints).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::discovery::MembershipFilter;

fuzz_target!(|data: &[u8]| {
    if let Ok(filter) = MembershipFilter::decode(data) {
        for seed in [0u8, 0x5a, 0xff] {
            let mut prf = [seed; 32];
            prf[..data.len().min(32)].copy_from_slice(&data[..data.len().min(32)]);
            let _ = filter.contains(&prf);
        }
    }
});
