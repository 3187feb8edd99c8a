//! `Expect: 100-continue` to an HTTP/1.1 origin: the body waits for the
//! origin's word.
//!
//! A client that sends `Expect: 100-continue` (curl for uploads over
//! 1 MiB, .NET, the AWS SDKs) writes its head and waits for the origin's
//! `100 Continue` before the body, so an origin that refuses the upload
//! (401, 413, 417) never receives it. hyper's server answers `100
//! Continue` by itself the moment the request body is first read, and
//! hyper's client reads the body as soon as it has written the head:
//! passed straight on, the client would be told to go on at once and the
//! origin would get the body unasked, right behind the head.
//!
//! So the body is held until the origin's own `100` (which hyper's client
//! reports, `hyper::ext::on_informational`); reading it then makes hyper's
//! server tell the client to go on. An origin that answers in full first
//! never gets the body: the client's is let go (hyper's server then drains
//! or closes the client's connection, as the origin would), and the
//! upstream connection closes once its answer is over, its request unsent.
//! An origin that says nothing for [`ORIGIN_SILENCE`] gets the body
//! anyway, as curl then sends it.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{header, Request};
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{Body, BoxError};

/// How long the body waits for an origin that neither asks for it nor
/// answers: curl's own wait before it sends the body unasked.
pub const ORIGIN_SILENCE: Duration = Duration::from_secs(1);

/// Waiting for the origin's word.
const WAITING: u8 = 0;
/// The origin asked for the body (or kept silent too long): it goes.
const OPEN: u8 = 1;
/// The origin answered without asking for it: it never goes.
const REFUSED: u8 = 2;
/// That answer is over: the request ends, unsent, and its connection with
/// it.
const ENDED: u8 = 3;

/// Whether the body of a request goes yet, shared by the body and the
/// request's exchange.
#[derive(Debug, Default)]
pub struct Gate {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Gate {
    /// The origin asked for the body.
    fn open(&self) {
        self.move_from(WAITING, OPEN);
    }

    /// The origin answered with `status` while it had not asked for the
    /// body: an answer of 300 or more (or a switch of protocols, after
    /// which no body can follow) refuses it, as curl and .NET stop
    /// sending then; a 2xx lets it go, as they send on (an origin that
    /// answers at once and reads the body after, streaming, waits for it).
    pub fn answered(&self, status: http::StatusCode) {
        if status == http::StatusCode::SWITCHING_PROTOCOLS || status.as_u16() >= 300 {
            self.move_from(WAITING, REFUSED);
        } else if !status.is_informational() {
            self.move_from(WAITING, OPEN);
        }
    }

    /// The answer is over (or given up): a refused body ends its request,
    /// which closes the connection (hyper's would otherwise wait for it
    /// for ever).
    pub fn answer_over(&self) {
        self.move_from(REFUSED, ENDED);
    }

    fn move_from(&self, from: u8, to: u8) {
        if self
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }
}

/// Holds `request`'s body for the origin's `100 Continue` when it asks
/// for one (see the module documentation); answers the gate the exchange
/// reports the answer to. `None` for any other request.
pub fn hold_body(request: &mut Request<Body>) -> Option<Arc<Gate>> {
    // Most requests have no body: they are not looked through.
    if request.body().is_end_stream() {
        return None;
    }
    // Held already: sent again on another connection, never written on
    // the first (see `Unsent`).
    if let Some(gate) = request.extensions().get::<Arc<Gate>>() {
        return Some(gate.clone());
    }
    let expects = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects {
        return None;
    }
    let gate = Arc::new(Gate::default());
    let told = gate.clone();
    hyper::ext::on_informational(request, move |interim| {
        if interim.status() == http::StatusCode::CONTINUE {
            told.open();
        }
    });
    let body = std::mem::replace(request.body_mut(), crate::body::empty());
    *request.body_mut() = crate::body::boxed(Held {
        body: Some(body),
        gate: gate.clone(),
        silence: None,
    });
    request.extensions_mut().insert(gate.clone());
    Some(gate)
}

/// A request body that goes once its [`Gate`] opens.
struct Held {
    /// The client's body; let go once refused.
    body: Option<Body>,
    gate: Arc<Gate>,
    /// Runs from the first read.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.gate.waker.register(cx.waker());
        match this.gate.state.load(Ordering::Acquire) {
            WAITING => {
                let silence = this
                    .silence
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(ORIGIN_SILENCE)));
                if silence.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.gate.move_from(WAITING, OPEN);
                // Refused meanwhile: read again below.
                if this.gate.state.load(Ordering::Acquire) != OPEN {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            OPEN => {}
            REFUSED => {
                this.body = None;
                return Poll::Pending;
            }
            _ => {
                this.body = None;
                return Poll::Ready(Some(Err(
                    "the origin answered without asking for the request body".into(),
                )));
            }
        }
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn expecting(body: &'static [u8]) -> Request<Body> {
        Request::post("http://a.test/up")
            .header("expect", "100-Continue")
            .body(crate::body::full(Bytes::from_static(body)))
            .unwrap()
    }

    /// Only a request that asks and has a body is held.
    #[test]
    fn only_an_expecting_request_with_a_body_is_held() {
        assert!(hold_body(&mut expecting(b"x")).is_some());
        let mut plain = Request::post("http://a.test/up")
            .body(crate::body::full(Bytes::from_static(b"x")))
            .unwrap();
        assert!(hold_body(&mut plain).is_none());
        let mut empty = Request::post("http://a.test/up")
            .header("expect", "100-continue")
            .body(crate::body::empty())
            .unwrap();
        assert!(hold_body(&mut empty).is_none());
    }

    /// Opened, the body goes whole.
    #[tokio::test]
    async fn an_opened_gate_lets_the_body_go() {
        let mut request = expecting(b"hello");
        let gate = hold_body(&mut request).unwrap();
        gate.open();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
    }

    /// Refused, the body waits until the answer is over, then fails (its
    /// connection closes); the client's body is let go at once.
    #[tokio::test]
    async fn a_refused_body_never_goes() {
        let mut request = expecting(b"hello");
        let gate = hold_body(&mut request).unwrap();
        gate.answered(http::StatusCode::EXPECTATION_FAILED);
        let mut body = request.into_body();
        let first = futures_util::FutureExt::now_or_never(body.frame());
        assert!(first.is_none(), "a refused body sent something");
        gate.answer_over();
        let ended = body.frame().await.unwrap();
        assert!(ended.is_err());
    }

    /// A 2xx answered before the body was asked for lets it go (the origin
    /// reads it after); a switch of protocols refuses it.
    #[tokio::test]
    async fn a_2xx_lets_the_body_go_and_a_switch_refuses_it() {
        let mut request = expecting(b"hello");
        let gate = hold_body(&mut request).unwrap();
        gate.answered(http::StatusCode::OK);
        let body = request.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
        let mut request = expecting(b"hello");
        let gate = hold_body(&mut request).unwrap();
        gate.answered(http::StatusCode::SWITCHING_PROTOCOLS);
        let mut body = request.into_body();
        assert!(futures_util::FutureExt::now_or_never(body.frame()).is_none());
    }

    /// A request held already and sent again (never written on its first
    /// connection) keeps its one hold: the origin's `100` releases it.
    #[tokio::test(start_paused = true)]
    async fn a_request_sent_again_keeps_its_hold() {
        let mut request = expecting(b"hello");
        let first = hold_body(&mut request).unwrap();
        let again = hold_body(&mut request).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        again.open();
        let mut body = request.into_body();
        let frame = futures_util::FutureExt::now_or_never(body.frame());
        assert!(
            matches!(&frame, Some(Some(Ok(f))) if f.data_ref().is_some_and(|d| &d[..] == b"hello")),
            "{frame:?}"
        );
    }

    /// An origin silent past [`ORIGIN_SILENCE`] gets the body.
    #[tokio::test(start_paused = true)]
    async fn a_silent_origin_gets_the_body_after_a_second() {
        let mut request = expecting(b"hello");
        let _gate = hold_body(&mut request).unwrap();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
    }
}
