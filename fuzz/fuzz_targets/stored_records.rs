//! The store's decoders of values read from disk. A damaged data dir must give
//! `StoreError::Corrupt`, never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::store::records::{
    self, AccountRecord, CodeRecord, DeviceKeysRecord, DeviceRecord, StoredKey,
};

fuzz_target!(|data: &[u8]| {
    let _ = records::decode_queued(data);
    let _ = records::decode::<AccountRecord>(data, "account");
    let _ = records::decode::<DeviceRecord>(data, "device");
    let _ = records::decode::<CodeRecord>(data, "code");
    let _ = records::decode::<DeviceKeysRecord>(data, "device keys");
    let _ = records::decode::<StoredKey>(data, "one-time key");
});
