//! pinproxy patch (new file): the stream dependency Chromium gives each of
//! its requests, so that a connection speaking for Chromium gives its own
//! requests the same.
//!
//! Chromium (`net/spdy/http2_priority_dependencies.cc`) sends every
//! HEADERS with its priority fields set: exclusive, a weight from the
//! request's priority (`Spdy3PriorityToHttp2Weight`: 256, 220, 183, 147,
//! 110, 74, 37, 1 for priorities 0 to 7), and, as the stream it depends on,
//! the newest open stream of the same priority, else of the nearest more
//! urgent one, else none (0): its open streams form one chain. A stream
//! leaves the chain when it closes. Chromium's priority for a request is
//! also the urgency of the `priority` header it sends with it (RFC 9218;
//! `u=0, i` for a page, `u=1, i` for a `fetch`), which is how the
//! connection learns it here. Chromium leaves out what is the default
//! (urgency 3, not incremental), so a request without the header, or
//! with one that states no urgency (`i`), has urgency 3, as Chromium's
//! would.

use http::HeaderMap;

use crate::frame::{StreamDependency, StreamId};

/// The least urgent priority Chromium (and RFC 9218) states.
const LEAST_URGENT: u8 = 7;
/// RFC 9218's default urgency, which Chromium leaves unstated.
const DEFAULT_URGENCY: u8 = 3;

/// A connection's open streams that have a Chromium priority, oldest
/// first.
#[derive(Debug, Default)]
pub(crate) struct ChromiumDependencies {
    open: Vec<(StreamId, u8)>,
}

impl ChromiumDependencies {
    /// The urgency `headers`' `priority` field states (`u=N`, 0 to 7), or
    /// the default (3) when there is none or it states none it may.
    pub(crate) fn urgency(headers: &HeaderMap) -> u8 {
        let stated = headers
            .get("priority")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value.split(',').find_map(|member| {
                    let digits = member.trim().strip_prefix("u=")?;
                    let urgency: u8 = digits.parse().ok()?;
                    (urgency <= LEAST_URGENT).then_some(urgency)
                })
            });
        stated.unwrap_or(DEFAULT_URGENCY)
    }

    /// Chromium's HTTP/2 weight (1 to 256) for `urgency`.
    pub(crate) fn weight(urgency: u8) -> u16 {
        let steps = 255.9_f32 / 7.0;
        // Truncation is Chromium's (`static_cast<int>`).
        (steps * f32::from(LEAST_URGENT - urgency.min(LEAST_URGENT))) as u16 + 1
    }

    /// The dependency of the new stream `id` with `urgency`, which joins the
    /// chain. `is_open` says whether a stream of the chain is still open;
    /// the closed ones leave it first.
    pub(crate) fn on_stream_creation(
        &mut self,
        id: StreamId,
        urgency: u8,
        mut is_open: impl FnMut(StreamId) -> bool,
    ) -> StreamDependency {
        self.open.retain(|&(stream, _)| is_open(stream));
        let parent = (0..=urgency)
            .rev()
            .find_map(|level| {
                self.open
                    .iter()
                    .rev()
                    .find(|&&(_, u)| u == level)
                    .map(|&(stream, _)| stream)
            })
            .unwrap_or_else(StreamId::zero);
        self.open.push((id, urgency));
        // The frame holds the weight less one (0 to 255).
        let wire = u8::try_from(Self::weight(urgency) - 1).unwrap_or(u8::MAX);
        StreamDependency::new(parent, wire, true)
    }
}
