//! Configuration parsing and validation (`Config::from_toml` + `validate`):
//! arbitrary text. Checks: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinproxy::fuzzing;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = fuzzing::config(text);
    }
});
