//! Cookie and Set-Cookie extraction, and stripping: arbitrary header bytes
//! (split on NUL into Cookie / X-DataDome-ClientID / X-PX-AUTHORIZATION /
//! Set-Cookie values). Checks: no panic; when the request is not refused,
//! stripping every tracked cookie and token found leaves none.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinproxy::fuzzing;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0);
    let cookie = parts.next().unwrap_or_default();
    let client_id = parts.next().unwrap_or_default();
    let px = parts.next().unwrap_or_default();
    let sets: Vec<&[u8]> = parts.collect();
    let request = fuzzing::headers([
        ("cookie", cookie),
        ("x-datadome-clientid", client_id),
        ("x-px-authorization", px),
    ]);
    let response = fuzzing::headers(sets.iter().map(|s| ("set-cookie", *s)));
    let now = data.len() as u64 * 1_000_000_007;
    let out = fuzzing::cookies(request, &response, now);
    if out.request.is_none() {
        // Refused (e.g. a header that is not UTF-8): answered 400, nothing
        // is forwarded, so there is nothing to strip.
        return;
    }
    // What is left after stripping carries no tracked cookie or token any
    // more.
    let left = fuzzing::headers(
        out.stripped
            .iter()
            .map(|c| ("cookie", c.as_bytes()))
            .chain(out.tokens.iter().map(|(n, v)| (n.as_str(), v.as_bytes()))),
    );
    let again = fuzzing::cookies(left, &http::HeaderMap::new(), now);
    if let Some(found) = again.request {
        assert!(found.is_empty(), "tracked cookies survived stripping: {found:?}");
    }
});
