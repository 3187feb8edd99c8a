//! The ClientHello parser (records and bare handshake messages): arbitrary
//! bytes. Checks: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinproxy::fuzzing;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::client_hello(data);
});
