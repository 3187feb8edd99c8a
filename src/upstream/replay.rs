//! Sending a request again when the origin left it unanswered.
//!
//! An origin closes an idle keep-alive connection after its timeout, and
//! the close can meet a request just written on it. A request is sent
//! again only when the origin sent no byte of an answer and the request
//! can be sent as it was (it carries no body; not a `CONNECT`), and either
//! it went out on a connection that had been idle (see
//! `pool::REPLAY_AFTER_IDLE`) and the origin closed that connection (an
//! idempotent method: it may have read the request), or the origin said
//! it did not process it, on any HTTP/2 connection, busy ones included: an
//! HTTP/2 `REFUSED_STREAM` (any method), or a `GOAWAY` below the stream
//! (an idempotent method, see [`Unanswered::GoneAway`]; an origin that
//! closes a connection after so many requests, as nginx does, leaves the
//! streams in flight past the last one it names unprocessed). A browser
//! sends such a request again itself; answering it `502` instead would
//! show the origin a client that gave up where a browser never does. The
//! pool sends it once more on the lane's own connections (its exit and
//! fingerprint).
//!
//! This module reads what a failure says ([`Unanswered`]) and keeps the
//! copy ([`Replay`]); `pool::LanePool::send` decides when to keep one.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{Body, BoxError};

/// An ended body that reports the size hint of the one it stands for.
struct Ended(SizeHint);

impl http_body::Body for Ended {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }

    fn size_hint(&self) -> SizeHint {
        self.0
    }
}

/// What a failed exchange, before any response head, says of whether the
/// origin acted on the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unanswered {
    /// Nothing: it may have.
    Unknown,
    /// The origin closed or reset the connection before any byte of an
    /// answer: it may have read the request, so only an idempotent one is
    /// sent again (RFC 9110 §9.2.2), and on another connection.
    Closed,
    /// The origin refused the HTTP/2 stream (`REFUSED_STREAM`), which
    /// says it did not process it (RFC 9113 §8.7): any method, on the
    /// same connection.
    Refused,
    /// The origin's `GOAWAY` named a last stream below this one (both
    /// HTTP/2 stacks give a stream that error then, and a stream opened
    /// after it): not processed (RFC 9113 §6.8), on another connection.
    /// Only an idempotent method all the same: hyper's and wreq's clients
    /// check the connection again right after opening a stream, and a
    /// `GOAWAY` read in between (a graceful shutdown's first, naming the
    /// highest stream id) fails a request whose stream still goes out, and
    /// which the origin then processes.
    GoneAway,
}

impl Unanswered {
    /// Whether a request with `method` may be sent again after this.
    pub(super) fn allows(self, method: &http::Method) -> bool {
        match self {
            Unanswered::Unknown => false,
            Unanswered::Closed | Unanswered::GoneAway => method.is_idempotent(),
            Unanswered::Refused => true,
        }
    }

    /// Whether the origin said it did not process the request (for a
    /// `GOAWAY`, as far as the stacks tell).
    fn unprocessed(self) -> bool {
        matches!(self, Unanswered::Refused | Unanswered::GoneAway)
    }

    /// Whether the connection is done with, so a replay takes another.
    pub(super) fn needs_new_connection(self) -> bool {
        matches!(self, Unanswered::Closed | Unanswered::GoneAway)
    }

    /// Reads hyper's HTTP/1.1 failure of a request with no response head
    /// yet; `answer_begun`: the origin had sent a byte since the request
    /// (a `1xx`, part of a head), so it read it. A close or reset before
    /// that is the origin's keep-alive timeout meeting the request.
    pub(super) fn of_h1(error: &hyper::Error, answer_begun: bool) -> Unanswered {
        if crate::fault::is_benign_disconnect(error) && !answer_begun {
            Unanswered::Closed
        } else {
            Unanswered::Unknown
        }
    }

    /// Reads an HTTP/2 stack's failure of a request with no response head
    /// yet: `E` is that stack's HTTP/2 error (hyper's `h2`, wreq's
    /// `http2`), found among the causes.
    pub(super) fn of_h2<E: H2Cause>(error: &(dyn std::error::Error + 'static)) -> Unanswered {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(said) = e.downcast_ref::<E>().and_then(H2Cause::unanswered) {
                return said;
            }
            current = e.source();
        }
        // Both stacks hand a broken connection's I/O error up as their own.
        if crate::fault::is_benign_disconnect(error) {
            Unanswered::Closed
        } else {
            Unanswered::Unknown
        }
    }
}

/// An HTTP/2 stack's error, as [`Unanswered`] reads it.
pub(super) trait H2Cause: std::error::Error + 'static {
    /// What the origin said with a frame, if it sent one.
    fn unanswered(&self) -> Option<Unanswered>;
}

macro_rules! h2_cause {
    ($error:ty, $reason:ty) => {
        impl H2Cause for $error {
            fn unanswered(&self) -> Option<Unanswered> {
                // A reset or GOAWAY the stack itself sent (a protocol
                // error it found) says nothing of the origin's doing.
                if !self.is_remote() {
                    None
                } else if self.is_reset() && self.reason() == Some(<$reason>::REFUSED_STREAM) {
                    Some(Unanswered::Refused)
                } else if self.is_go_away() {
                    Some(Unanswered::GoneAway)
                } else {
                    None
                }
            }
        }
    };
}
h2_cause!(h2::Error, h2::Reason);
h2_cause!(http2::Error, http2::Reason);

/// A copy of a request kept to send it again, and which failures it is
/// sent again after.
pub(super) struct Replay {
    /// The request's head (its body is made only for a replay). Boxed:
    /// held across the send, it would otherwise grow every request's
    /// future (copied as it moves).
    head: Box<http::request::Parts>,
    /// The replay's body is ended, and as long as the original said it
    /// was: both HTTP/2 stacks add `content-length` to a request whose
    /// body has an exact size, and a client's empty body often has none.
    size: SizeHint,
    /// The request went out on a connection that had been idle, so a close
    /// before any answer is the origin's idle timeout meeting it.
    after_idle: bool,
}

impl Replay {
    /// A copy of `request`, when it carries no body (a body streams once;
    /// keeping one to replay would buffer it) and is no `CONNECT` (whose
    /// body is a tunnel, and which HTTP/2 hands over with an ended one).
    pub(super) fn of(request: &Request<Body>, after_idle: bool) -> Option<Replay> {
        if !request.body().is_end_stream() || request.method() == http::Method::CONNECT {
            return None;
        }
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = request.method().clone();
        head.uri = request.uri().clone();
        head.version = request.version();
        head.headers = request.headers().clone();
        // Every extension: hyper carries an HTTP/1.1 client's header case
        // in one of its own, which a replay going out over HTTP/1.1 must
        // present as the first attempt did (an HTTP/2 client's request
        // carries at most the authority it named).
        head.extensions = request.extensions().clone();
        Some(Replay {
            head: Box::new(head),
            size: request.body().size_hint(),
            after_idle,
        })
    }

    /// Whether the request is sent again after a failure that says
    /// `unanswered`: a close only after idleness, an origin's word that it
    /// did not process the request always (each as the method allows).
    pub(super) fn allows(&self, unanswered: Unanswered) -> bool {
        unanswered.allows(&self.head.method) && (self.after_idle || unanswered.unprocessed())
    }

    /// The request to send again.
    pub(super) fn into_request(self) -> Request<Body> {
        let ended = http_body_util::BodyExt::boxed(Ended(self.size));
        Request::from_parts(*self.head, ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::pool::tests::{names, origin};
    use crate::upstream::ClientAuthority;

    /// An extension pinproxy does not read.
    #[derive(Clone)]
    struct Marker;

    /// A replay's copy is the request as it came, ended as the original
    /// was: an empty body of no known size stays of no known size (both
    /// HTTP/2 stacks add `content-length: 0` for an exact one, a field the
    /// first attempt did not carry). A request with a body has no copy.
    #[test]
    fn a_replay_copy_is_the_request_as_it_came_and_ended_as_it_was() {
        let mut original = Request::options("/p?q")
            .header("origin", "https://a.test")
            .header("access-control-request-method", "PUT")
            .body(http_body_util::BodyExt::boxed(Ended(SizeHint::default())))
            .unwrap();
        let named = ClientAuthority::differing(&"https://www.a.test/p".parse().unwrap(), &origin());
        original.extensions_mut().insert(named.clone().unwrap());
        original.extensions_mut().insert(Marker);
        let copy = Replay::of(&original, true).unwrap().into_request();
        assert_eq!(copy.version(), original.version());
        assert_eq!(copy.method(), http::Method::OPTIONS);
        assert_eq!(copy.uri(), original.uri());
        assert_eq!(names(&copy), ["origin", "access-control-request-method"]);
        assert_eq!(copy.extensions().get::<ClientAuthority>(), named.as_ref());
        // Every extension (hyper's header case map among them).
        assert!(copy.extensions().get::<Marker>().is_some());
        assert!(copy.body().is_end_stream());
        assert_eq!(copy.body().size_hint().exact(), None);

        let empty = Request::get("/").body(crate::body::empty()).unwrap();
        let copy = Replay::of(&empty, true).unwrap().into_request();
        assert_eq!(copy.body().size_hint().exact(), Some(0));

        let upload = Request::put("/").body(crate::body::full("x")).unwrap();
        assert!(Replay::of(&upload, true).is_none());
        assert!(Replay::of(&upload, false).is_none());
        let connect = Request::connect("a.test:443")
            .body(crate::body::empty())
            .unwrap();
        assert!(Replay::of(&connect, false).is_none());
    }

    /// A copy kept on a busy connection is sent again only after the
    /// origin said it did not process the request (a `GOAWAY`: when its
    /// method is idempotent); one kept on a connection that had been idle
    /// also after a close, when the method is idempotent.
    #[test]
    fn a_busy_connections_copy_goes_again_only_for_what_the_origin_did_not_process() {
        let get = Request::get("/").body(crate::body::empty()).unwrap();
        let busy = Replay::of(&get, false).unwrap();
        assert!(busy.allows(Unanswered::Refused));
        assert!(busy.allows(Unanswered::GoneAway));
        assert!(!busy.allows(Unanswered::Closed));
        assert!(!busy.allows(Unanswered::Unknown));
        let after_idle = Replay::of(&get, true).unwrap();
        assert!(after_idle.allows(Unanswered::Closed));
        assert!(!after_idle.allows(Unanswered::Unknown));

        let post = Request::post("/").body(crate::body::empty()).unwrap();
        let post_after_idle = Replay::of(&post, true).unwrap();
        assert!(!post_after_idle.allows(Unanswered::Closed));
        assert!(!post_after_idle.allows(Unanswered::GoneAway));
        assert!(post_after_idle.allows(Unanswered::Refused));
        let post_busy = Replay::of(&post, false).unwrap();
        assert!(post_busy.allows(Unanswered::Refused));
        assert!(post_busy.into_request().method() == http::Method::POST);
    }
}
