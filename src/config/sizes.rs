//! Bounds on the sizes and counts a config file gives.
//!
//! A limit far past any real need is not harmless. hyper sizes a
//! connection's read buffer from the header limit, and one past its own
//! arithmetic made every client connection panic; a header count is an
//! array hyper allocates for every request, and a billion aborted the
//! daemon on its first request; a connection count past tokio's semaphore
//! panicked every accept. So each is checked once here, at load and on
//! every reload, and a value out of range is refused with its key, its
//! value and the range it must be in.

use super::{Config, ConfigError};

/// Most bytes `limits.max_header_bytes` may allow: sixteen times the
/// default, past a browser's largest `Cookie` header (about 180 cookies of
/// 4 KiB each).
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// Most header fields `limits.max_headers` may allow: hyper allocates
/// room for this many on every request.
pub const MAX_HEADERS: usize = 10_000;

/// Most client connections `limits.max_connections` may allow: more than
/// a machine has file descriptors for, far below what tokio's semaphore
/// can count.
pub const MAX_CONNECTIONS: usize = 10_000_000;

/// Most bytes of a body `identities.scan_limit` may scan for invalidation
/// markers: each scanned answer holds that many decoded bytes while it
/// streams.
pub const MAX_SCAN_BYTES: usize = 1 << 20;

/// Checks every size and count in `config` against its range.
pub(super) fn check(config: &Config) -> Result<(), ConfigError> {
    let limits = &config.limits;
    let settings = [
        (
            "limits.max_header_bytes",
            limits.max_header_bytes,
            1024,
            MAX_HEADER_BYTES,
        ),
        ("limits.max_headers", limits.max_headers, 1, MAX_HEADERS),
        (
            "limits.max_connections",
            limits.max_connections,
            1,
            MAX_CONNECTIONS,
        ),
        (
            "identities.scan_limit",
            config.identities.scan_limit,
            0,
            MAX_SCAN_BYTES,
        ),
    ];
    for (key, value, least, most) in settings {
        if !(least..=most).contains(&value) {
            return Err(ConfigError::Limit(format!(
                "{key} = {value} is out of range: it must be {least} to {most}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(edit: impl FnOnce(&mut Config)) -> Option<String> {
        let mut config = Config::default();
        edit(&mut config);
        check(&config).err().map(|error| error.to_string())
    }

    #[test]
    fn each_bound_is_admitted_and_one_past_it_refused() {
        assert_eq!(refusal(|_| {}), None, "the defaults are in range");
        assert_eq!(refusal(|c| c.limits.max_header_bytes = 1024), None);
        assert_eq!(
            refusal(|c| c.limits.max_header_bytes = MAX_HEADER_BYTES),
            None
        );
        assert_eq!(refusal(|c| c.limits.max_headers = MAX_HEADERS), None);
        assert_eq!(
            refusal(|c| c.limits.max_connections = MAX_CONNECTIONS),
            None
        );
        assert_eq!(refusal(|c| c.identities.scan_limit = 0), None);
        assert_eq!(refusal(|c| c.identities.scan_limit = MAX_SCAN_BYTES), None);

        let refused = [
            (
                refusal(|c| c.limits.max_header_bytes = 1023),
                "limits.max_header_bytes = 1023 is out of range: it must be 1024 to 1048576",
            ),
            (
                refusal(|c| c.limits.max_header_bytes = i64::MAX as usize),
                "limits.max_header_bytes = 9223372036854775807 is out of range: it must be 1024 to 1048576",
            ),
            (
                refusal(|c| c.limits.max_headers = 0),
                "limits.max_headers = 0 is out of range: it must be 1 to 10000",
            ),
            (
                refusal(|c| c.limits.max_headers = 1_000_000_000),
                "limits.max_headers = 1000000000 is out of range: it must be 1 to 10000",
            ),
            (
                refusal(|c| c.limits.max_connections = 0),
                "limits.max_connections = 0 is out of range: it must be 1 to 10000000",
            ),
            (
                refusal(|c| c.limits.max_connections = MAX_CONNECTIONS + 1),
                "limits.max_connections = 10000001 is out of range: it must be 1 to 10000000",
            ),
            (
                refusal(|c| c.identities.scan_limit = MAX_SCAN_BYTES + 1),
                "identities.scan_limit = 1048577 is out of range: it must be 0 to 1048576",
            ),
        ];
        for (got, want) in refused {
            let got = got.unwrap_or_default();
            assert!(got.contains(want), "{got:?} should say {want:?}");
        }
    }
}
