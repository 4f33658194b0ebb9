//! The backup decoder (`admin restore` reads a file an operator hands it): damage must
//! give an error, never a panic or an allocation beyond the format's bounds; the
//! admin socket's request decoder rides along.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::admin::AdminRequest;
use switchboard::store::backup;

fuzz_target!(|data: &[u8]| {
    let _ = backup::read_backup(data, |_, _| Ok(()));
    let _ = serde_json::from_slice::<AdminRequest>(data);
});
