//! The HTTP/1 framing scanner (request smuggling checks): arbitrary bytes
//! as requests or responses (first byte), whole and in pieces. Checks: no
//! panic; the scanner reads the bytes the same however reads split them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinproxy::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let [whole, pieces] = fuzzing::framing(rest, mode & 1 == 1, usize::from(mode >> 1) + 1);
    assert_eq!(whole, pieces);
});
