//! The body type that flows through the pipeline in both directions.
//!
//! Client and origin bodies are streamed as they arrive (never collected);
//! pinproxy's own answers are small, complete bodies.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Error type of a [`Body`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body streamed from a peer.
pub fn streaming(incoming: hyper::body::Incoming) -> Body {
    incoming.map_err(BoxError::from).boxed()
}

/// Any body of bytes, boxed.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}
