//! The header part of a client's fingerprint: `User-Agent`, the
//! `sec-ch-ua` client hints and `Accept-Language`, recorded when an
//! identity is created and compared on every later request (the
//! comparison's policy is applied by pipeline stage 5).

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// The headers that make up the fingerprint, in this order.
pub const FINGERPRINT_HEADERS: [&str; 5] = [
    "user-agent",
    "sec-ch-ua",
    "sec-ch-ua-platform",
    "sec-ch-ua-mobile",
    "accept-language",
];

/// What to do with a request whose fingerprint differs from its identity's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FingerprintPolicy {
    /// Count it and send the request as it is.
    #[default]
    Warn,
    /// Answer 409 and send nothing.
    Reject,
    /// Rewrite the headers back to the recorded values.
    Restore,
}

impl FingerprintPolicy {
    /// A short, stable label (metrics).
    pub fn label(self) -> &'static str {
        match self {
            FingerprintPolicy::Warn => "warn",
            FingerprintPolicy::Reject => "reject",
            FingerprintPolicy::Restore => "restore",
        }
    }
}

/// Recorded fingerprint header values (`None`: the header was absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HeaderValues {
    values: [Option<String>; 5],
}

/// [`FINGERPRINT_HEADERS`] as header names, so lookups on the request path
/// need not parse the name each time.
const HEADER_NAMES: [HeaderName; 5] = [
    HeaderName::from_static("user-agent"),
    HeaderName::from_static("sec-ch-ua"),
    HeaderName::from_static("sec-ch-ua-platform"),
    HeaderName::from_static("sec-ch-ua-mobile"),
    HeaderName::from_static("accept-language"),
];

fn value_text(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

/// The first value of each fingerprint header in `headers`, found in one
/// pass over the map: five lookups would hash five names on every request.
/// (A map's iteration gives a name's values in order, so the first one seen
/// is what `get` returns.)
fn present(headers: &HeaderMap) -> [Option<&HeaderValue>; 5] {
    let mut found = [None; 5];
    for (name, value) in headers {
        if let Some(slot) = HEADER_NAMES.iter().position(|n| n == name) {
            found[slot].get_or_insert(value);
        }
    }
    found
}

/// A request's fingerprint header values, held as the request's own values
/// (a reference count each, no copy) until an identity records them: most
/// requests found no identity, and a browser's five values cost five
/// allocations to record. The price: while a request is in flight they keep
/// the buffer its head was read into referenced (for HTTP/1.1, hyper's read
/// buffer, which hyper then cannot reclaim in place when it needs room for
/// the request's body: at most one new buffer per such request).
#[derive(Clone, Debug, Default)]
pub struct HeldValues {
    values: [Option<HeaderValue>; 5],
}

impl HeldValues {
    /// The fingerprint header values of a request.
    pub fn of(headers: &HeaderMap) -> HeldValues {
        HeldValues {
            values: present(headers).map(|value| value.cloned()),
        }
    }

    /// What an identity records of them: [`HeaderValues::of`] the request.
    pub fn record(&self) -> HeaderValues {
        HeaderValues {
            values: self
                .values
                .each_ref()
                .map(|value| value.as_ref().map(value_text)),
        }
    }
}

impl HeaderValues {
    /// The fingerprint of a request.
    pub fn of(headers: &HeaderMap) -> HeaderValues {
        HeaderValues {
            values: present(headers).map(|value| value.map(value_text)),
        }
    }

    /// The recorded value of header `name`, if it was present.
    pub fn get(&self, name: &str) -> Option<&str> {
        let index = FINGERPRINT_HEADERS.iter().position(|h| *h == name)?;
        self.values[index].as_deref()
    }

    /// The headers of `headers` that differ from the recording. A header
    /// differs when the request sends another value, or sends one where none
    /// was recorded; a missing header differs only for `User-Agent` (browsers
    /// leave some hints off some requests, never the User-Agent).
    pub fn drifted(&self, headers: &HeaderMap) -> Vec<&'static str> {
        // Runs on every request of every identity: compare without copying.
        FINGERPRINT_HEADERS
            .iter()
            .zip(present(headers))
            .zip(&self.values)
            .filter(|((name, now), recorded)| match (now, recorded) {
                // Bytes first: the lossy text only matters when they differ.
                (Some(now), Some(then)) => {
                    now.as_bytes() != then.as_bytes()
                        && String::from_utf8_lossy(now.as_bytes()) != then.as_str()
                }
                (Some(_), None) => true,
                (None, Some(_)) => **name == "user-agent",
                (None, None) => false,
            })
            .map(|((name, _), _)| *name)
            .collect()
    }

    /// Rewrites the fingerprint headers of `headers` to the recording.
    pub fn restore(&self, headers: &mut HeaderMap) {
        for (name, recorded) in FINGERPRINT_HEADERS.iter().zip(&self.values) {
            match recorded.as_deref().map(HeaderValue::from_str) {
                Some(Ok(value)) => {
                    headers.insert(*name, value);
                }
                // A recorded value that is not a valid header cannot have
                // come from a header; leave the request's value.
                Some(Err(_)) => {}
                None => {
                    super::header_order::remove(headers, &HeaderName::from_static(name));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn one_pass_finds_what_get_finds() {
        let mut h = headers(&[
            ("accept", "*/*"),
            ("sec-ch-ua-mobile", "?0"),
            ("user-agent", "Chrome/156"),
            ("x-other", "1"),
        ]);
        h.append("user-agent", HeaderValue::from_static("second"));
        h.append("accept-language", HeaderValue::from_static("en"));
        h.append("accept-language", HeaderValue::from_static("de"));
        let expected = HEADER_NAMES.each_ref().map(|name| h.get(name));
        assert_eq!(present(&h), expected);
        assert_eq!(
            present(&h).map(|v| v.map(|v| v.to_str().unwrap())),
            [Some("Chrome/156"), None, None, Some("?0"), Some("en")]
        );
    }

    #[test]
    fn held_values_record_what_the_request_had() {
        let mut h = headers(&[
            ("user-agent", "Chrome/156"),
            ("sec-ch-ua-platform", "\"Linux\""),
            ("accept", "*/*"),
        ]);
        h.append("user-agent", HeaderValue::from_static("second"));
        h.insert(
            "accept-language",
            HeaderValue::from_bytes(b"de-\xffCH").unwrap(),
        );
        let held = HeldValues::of(&h);
        // Later changes to the request do not reach what was held.
        h.insert("user-agent", HeaderValue::from_static("changed"));
        let recorded = held.record();
        assert_eq!(recorded.get("user-agent"), Some("Chrome/156"));
        assert_eq!(recorded.get("sec-ch-ua-platform"), Some("\"Linux\""));
        assert_eq!(recorded.get("sec-ch-ua"), None);
        assert_eq!(recorded.get("accept-language"), Some("de-\u{fffd}CH"));
        h.insert("user-agent", HeaderValue::from_static("Chrome/156"));
        assert_eq!(recorded, HeaderValues::of(&h));
        assert_eq!(HeldValues::default().record(), HeaderValues::default());
    }

    #[test]
    fn drift_and_restore() {
        let recorded = HeaderValues::of(&headers(&[
            ("user-agent", "Chrome/156"),
            ("accept-language", "en-GB"),
        ]));
        assert!(recorded
            .drifted(&headers(&[("user-agent", "Chrome/156")]))
            .is_empty());
        assert_eq!(
            recorded.drifted(&headers(&[
                ("user-agent", "Firefox/140"),
                ("sec-ch-ua", "x")
            ])),
            ["user-agent", "sec-ch-ua"]
        );
        assert_eq!(recorded.drifted(&headers(&[])), ["user-agent"]);

        let mut h = headers(&[
            ("user-agent", "Firefox/140"),
            ("sec-ch-ua", "x"),
            ("cookie", "a=b"),
        ]);
        recorded.restore(&mut h);
        assert_eq!(h["user-agent"], "Chrome/156");
        assert_eq!(h["accept-language"], "en-GB");
        assert!(h.get("sec-ch-ua").is_none());
        assert_eq!(h["cookie"], "a=b");
        assert!(recorded.drifted(&h).is_empty());
    }
}
