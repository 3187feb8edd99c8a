//! CONNECT authority, absolute-form targets, `host:port` and SNI / leaf
//! names: arbitrary text. Checks: no panic; a parsed `host:port` prints
//! back to text that parses to the same address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinproxy::fuzzing;
use pinproxy::net::HostPort;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let hosts = fuzzing::hosts(text);
    for parsed in [hosts.host_port, hosts.connect].into_iter().flatten() {
        let printed = parsed.to_string();
        assert_eq!(HostPort::parse(&printed).as_ref(), Ok(&parsed), "{text:?} -> {printed:?}");
    }
});
