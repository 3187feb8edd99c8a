//! The HTTP/2 client-preface parser: arbitrary bytes after the connection
//! preface, parsed whole and fed in pieces (the first byte picks the piece
//! size). Checks: no panic; both ways agree when both finish.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinproxy::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(rest);
    if let (Some(whole), Some(fed)) = fuzzing::h2_preface(&bytes, usize::from(split % 32) + 1) {
        assert_eq!(whole, fed);
    }
});
