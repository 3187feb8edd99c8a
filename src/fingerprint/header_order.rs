//! Editing a header map without reordering it.
//!
//! `HeaderMap::remove` moves the map's last header into the removed
//! header's slot, so removing `Host` or a hop-by-hop header would send the
//! rest in an order no browser uses, and origins compare header order with
//! the browser's. Every stage that drops or rewrites a request header does
//! it through here.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Rewrites every header through `edit`, in place and in order: `None`
/// drops the header, `Some` keeps it with the returned value.
pub fn rewrite(
    headers: &mut HeaderMap,
    mut edit: impl FnMut(&HeaderName, HeaderValue) -> Option<HeaderValue>,
) {
    let old = std::mem::take(headers);
    // Room for the names (repeated values live apart from them); counting
    // every value could ask for more than a map may hold, which `reserve`
    // answers with a panic: a map too big to reserve for just grows.
    let _ = headers.try_reserve(old.keys_len());
    let mut name: Option<HeaderName> = None;
    for (next, value) in old {
        // Extra values of a name come with `None`: they belong to the last one.
        if next.is_some() {
            name = next;
        }
        if let Some(name) = name.as_ref() {
            if let Some(value) = edit(name, value) {
                headers.append(name.clone(), value);
            }
        }
    }
}

/// Keeps the headers `keep` accepts, in their original order.
pub fn retain(headers: &mut HeaderMap, keep: impl Fn(&HeaderName, &HeaderValue) -> bool) {
    if headers.iter().all(|(name, value)| keep(name, value)) {
        return;
    }
    rewrite(headers, |name, value| keep(name, &value).then_some(value));
}

/// Removes every value of `name`, keeping the others' order; returns the
/// first removed value.
pub fn remove(headers: &mut HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let first = headers.get(name)?.clone();
    retain(headers, |n, _| n != name);
    Some(first)
}

/// Renames every value of `from` to `to`, each where it stood; the others
/// keep their order.
pub fn rename(headers: &mut HeaderMap, from: &HeaderName, to: &HeaderName) {
    if !headers.contains_key(from) {
        return;
    }
    let old = std::mem::take(headers);
    let _ = headers.try_reserve(old.keys_len());
    let mut name: Option<HeaderName> = None;
    for (next, value) in old {
        if let Some(next) = next {
            name = Some(if next == from { to.clone() } else { next });
        }
        if let Some(name) = name.as_ref() {
            headers.append(name.clone(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(headers: &HeaderMap) -> Vec<&str> {
        headers.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn removing_the_first_header_keeps_the_rest_in_order() {
        let mut h = map(&[
            ("host", "a"),
            ("user-agent", "u"),
            ("accept", "*/*"),
            ("cookie", "c"),
        ]);
        assert_eq!(
            remove(&mut h, &http::header::HOST)
                .as_ref()
                .map(|v| v.as_bytes()),
            Some(&b"a"[..])
        );
        assert_eq!(names(&h), ["user-agent", "accept", "cookie"]);
        // What `HeaderMap::remove` would have done:
        let mut moved = map(&[
            ("host", "a"),
            ("user-agent", "u"),
            ("accept", "*/*"),
            ("cookie", "c"),
        ]);
        moved.remove(http::header::HOST);
        assert_ne!(names(&moved), ["user-agent", "accept", "cookie"]);
    }

    #[test]
    fn a_map_of_more_values_than_a_map_reserves_for_is_edited_without_a_panic() {
        // One name, 30,000 values and a header to drop: reserving room for
        // every value (past the map's 24,576) panicked.
        let mut h = HeaderMap::new();
        h.append("proxy-authenticate", HeaderValue::from_static("a"));
        for _ in 0..30_000 {
            h.append("x", HeaderValue::from_static("1"));
        }
        remove(&mut h, &http::header::PROXY_AUTHENTICATE);
        assert_eq!((h.len(), h.keys_len()), (30_000, 1));
    }

    #[test]
    fn rewrite_keeps_repeated_values_with_their_name() {
        let mut h = map(&[("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2")]);
        rewrite(&mut h, |name, value| {
            if name == http::header::COOKIE && value.as_bytes() == b"a=1" {
                None
            } else {
                Some(value)
            }
        });
        let pairs: Vec<(&str, &[u8])> = h.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        assert_eq!(pairs, [("cookie", &b"b=2"[..]), ("accept", &b"*/*"[..])]);
    }
}
