//! pinproxy patch: whose HPACK choices an encoder makes.
//!
//! An origin sees how each header block is encoded as well as what it says:
//! which fields go into the dynamic table, which are sent as literals (and
//! which of those are marked never to be indexed), and whether each string
//! is Huffman-coded. Browsers and libraries choose differently, so an
//! encoder speaking for a client makes the choices of that client's
//! family. The crate's own choices (nghttp2's list, every string
//! Huffman-coded) were nobody's.

use super::Header;
use crate::frame::{PseudoId, PseudoOrder};
use http::header;

/// The HPACK choices of one family of clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Chromium's (QUICHE's `HpackEncoder`, `DefaultPolicy`): every regular
    /// field and `:authority` is added to the table when it fits, the other
    /// pseudo-headers never are; nothing is marked never-indexed; a string
    /// is Huffman-coded only when that makes it shorter; a cookie goes as
    /// crumbs.
    Chromium,
    /// Firefox's (Gecko's `Http2Compressor`): `:path` is never added to the
    /// table, nor an entry larger than half the table (or any, in a table
    /// under 128 bytes); `authorization` and cookies shorter than 20 bytes
    /// are marked never-indexed; every other field is added, pseudo-headers
    /// included; every string is Huffman-coded; a cookie goes as crumbs.
    Firefox,
    /// nghttp2's (curl and most C clients): `:path`, `age`,
    /// `content-length`, `etag`, `if-modified-since`, `if-none-match`,
    /// `location`, `set-cookie` and entries over three quarters of the
    /// table are not added; `authorization` and cookies shorter than 20
    /// bytes are marked never-indexed; a string is Huffman-coded only when
    /// that makes it shorter.
    #[default]
    Nghttp2,
    /// Go's (`net/http`'s HTTP/2 transport and its `hpack` package): every
    /// field that fits the table is added, pseudo-headers included;
    /// nothing is marked never-indexed; a string is Huffman-coded only when
    /// that makes it shorter; a cookie goes as crumbs split at each `;`,
    /// the spaces after it dropped, an empty last crumb left out.
    Go,
}

/// What the encoder does with one field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Refer to an entry that holds the field, or add it to the table.
    Index,
    /// A literal left out of the table; an entry of the static table that
    /// holds the whole field is still referred to.
    Literal,
    /// A literal left out of the table even when an entry holds the whole
    /// field (its name is still referred to).
    LiteralEvenIfHeld,
}

impl Policy {
    /// The policy a connection sending `order` makes: the one set with the
    /// order ([`PseudoOrderBuilder::hpack_policy`]), else the family the
    /// order alone suggests: `m,a,s,p` Chromium's, `m,p,a,s` Firefox's; any
    /// `a,m,p,s` Go's; any other order, or none, nghttp2's. (The order
    /// alone is a weak sign:
    /// Python's h2 sends Chromium's and OkHttp Firefox's, so a caller that
    /// knows more of its client says so.)
    ///
    /// [`PseudoOrderBuilder::hpack_policy`]: crate::frame::PseudoOrderBuilder::hpack_policy
    pub fn for_pseudo_order(order: Option<&PseudoOrder>) -> Policy {
        let Some(order) = order else {
            return Policy::Nghttp2;
        };
        if let Some(policy) = order.hpack_policy() {
            return policy;
        }
        let ids: Vec<PseudoId> = order
            .into_iter()
            .copied()
            .filter(|id| matches!(id, PseudoId::Method | PseudoId::Authority | PseudoId::Scheme | PseudoId::Path))
            .collect();
        use PseudoId::{Authority as A, Method as M, Path as P, Scheme as S};
        match ids.as_slice() {
            [M, A, S, P] => Policy::Chromium,
            [M, P, A, S] => Policy::Firefox,
            [A, M, P, S] => Policy::Go,
            _ => Policy::Nghttp2,
        }
    }

    /// Whether `header` is sent as a never-indexed literal.
    pub(crate) fn never_indexed(self, header: &Header) -> bool {
        match (self, header) {
            (Policy::Chromium | Policy::Go, _) => false,
            (Policy::Firefox | Policy::Nghttp2, Header::Field { name, value }) => {
                *name == header::AUTHORIZATION
                    || (*name == header::COOKIE && value.len() < 20)
            }
            _ => false,
        }
    }

    /// What to do with `header` (not never-indexed) in a table of at most
    /// `max_size` bytes.
    pub(crate) fn choice(self, header: &Header, max_size: usize) -> Choice {
        let size = header.len();
        match self {
            Policy::Chromium => match header {
                Header::Field { .. } | Header::Authority(..) if size <= max_size => Choice::Index,
                _ => Choice::Literal,
            },
            Policy::Firefox => match header {
                Header::Path(..) => Choice::LiteralEvenIfHeld,
                _ if size > max_size / 2 || max_size < 128 => Choice::Literal,
                _ => Choice::Index,
            },
            Policy::Nghttp2 => match header {
                Header::Path(..) => Choice::Literal,
                Header::Field { name, .. }
                    if matches!(
                        *name,
                        header::AGE
                            | header::CONTENT_LENGTH
                            | header::ETAG
                            | header::IF_MODIFIED_SINCE
                            | header::IF_NONE_MATCH
                            | header::LOCATION
                            | header::SET_COOKIE
                    ) =>
                {
                    Choice::Literal
                }
                _ if size * 4 > max_size * 3 => Choice::Literal,
                _ => Choice::Index,
            },
            Policy::Go if size <= max_size => Choice::Index,
            Policy::Go => Choice::Literal,
        }
    }

    /// The crumbs a `cookie` field's value is sent as, when the policy
    /// splits it (RFC 9113 section 8.2.3): Chromium's encoder trims the
    /// value's ends of spaces and tabs and splits at each `;`, dropping one
    /// space after it; Firefox's splits at each `"; "`; nghttp2 sends the
    /// field whole. `None` when the field goes whole and unchanged.
    pub(crate) fn crumbs(self, value: &[u8]) -> Option<Vec<&[u8]>> {
        // What is split, at what, how many spaces after each separator are
        // dropped, and whether an empty last crumb is sent.
        let (mut rest, separator, spaces, empty_last): (&[u8], &[u8], usize, bool) = match self {
            Policy::Chromium => (trim_spaces(value), b";", 1, true),
            Policy::Firefox => (value, b"; ", 0, true),
            Policy::Go => (value, b";", usize::MAX, false),
            Policy::Nghttp2 => return None,
        };
        let mut crumbs = Vec::new();
        while let Some(at) = rest.windows(separator.len()).position(|w| w == separator) {
            crumbs.push(&rest[..at]);
            rest = &rest[at + separator.len()..];
            for _ in 0..spaces {
                match rest {
                    [b' ', after @ ..] => rest = after,
                    _ => break,
                }
            }
        }
        if empty_last || !rest.is_empty() {
            crumbs.push(rest);
        }
        // A value that would go as it is goes whole.
        match crumbs.as_slice() {
            [only] if only.len() == value.len() => None,
            _ => Some(crumbs),
        }
    }

    /// The dynamic table size the family's encoder uses when the origin
    /// allows `allowed` bytes: nghttp2 and Go keep at most 4,096 (their
    /// default limits), Chromium and Firefox take what they are allowed.
    pub(crate) fn table_size(self, allowed: usize) -> usize {
        match self {
            Policy::Nghttp2 | Policy::Go => allowed.min(4096),
            Policy::Chromium | Policy::Firefox => allowed,
        }
    }

    /// Whether a string whose Huffman code is `huffman_len` bytes long, and
    /// `len` bytes raw, is sent Huffman-coded.
    pub(crate) fn huffman(self, huffman_len: usize, len: usize) -> bool {
        match self {
            Policy::Firefox => true,
            Policy::Chromium | Policy::Nghttp2 | Policy::Go => huffman_len < len,
        }
    }
}

/// `value` without the spaces and tabs at its ends.
fn trim_spaces(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}
