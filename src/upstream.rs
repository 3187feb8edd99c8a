//! Pipeline stage 4: send a request to its origin through the chosen exit.
//!
//! Each exit owns one [`ExitClient`]: a keep-alive connection pool whose
//! connector only ever dials through that exit, so a connection (and the IP
//! it leaves from) is never shared across exits. Bodies stream both ways.
//!
//! Errors name the exit and the stage that failed (see [`UpstreamError`]).

pub mod connect;
pub mod tls;

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;

use crate::body::Body;
use crate::exits::{ExitId, ExitKind};
use connect::{ConnectError, ExitConnector};

/// Pool and timeout settings shared by every exit's client.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Deadline for reaching an origin (exit, CONNECT, TLS).
    pub connect_timeout: Duration,
    /// Deadline for the origin's response head once the request is sent.
    pub response_head_timeout: Duration,
    /// How long idle connections stay pooled.
    pub idle_timeout: Duration,
    /// Most idle connections per origin.
    pub max_idle_per_origin: usize,
}

/// Why a request could not be carried to its origin.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The connection could not be opened.
    #[error(transparent)]
    Connect(ConnectError),
    /// The origin did not start its response in time.
    #[error("the origin sent no response within {0:?}")]
    ResponseTimeout(Duration),
    /// The exchange failed after the connection was open.
    #[error("{0}")]
    Exchange(String),
}

/// The connection pool of one exit.
#[derive(Clone)]
pub struct ExitClient {
    client: Client<ExitConnector, Body>,
    response_head_timeout: Duration,
}

impl std::fmt::Debug for ExitClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitClient").finish_non_exhaustive()
    }
}

impl ExitClient {
    /// A pool for exit `exit` reached as `kind`.
    pub fn new(
        exit: ExitId,
        kind: ExitKind,
        tls: Arc<ClientConfig>,
        settings: &PoolSettings,
    ) -> Self {
        let connector = ExitConnector::new(exit, kind, tls, settings.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.max_idle_per_origin)
            .http1_preserve_header_case(true)
            // The pipeline forwards the client's own Host header.
            .set_host(false)
            .build(connector);
        ExitClient {
            client,
            response_head_timeout: settings.response_head_timeout,
        }
    }

    /// Sends `request` (absolute URI) and waits for the response head; the
    /// body streams afterwards.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let response =
            tokio::time::timeout(self.response_head_timeout, self.client.request(request))
                .await
                .map_err(|_| UpstreamError::ResponseTimeout(self.response_head_timeout))?;
        response.map_err(classify)
    }
}

fn classify(error: hyper_util::client::legacy::Error) -> UpstreamError {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(connect) = cause.downcast_ref::<ConnectError>() {
            return UpstreamError::Connect(connect.clone());
        }
        source = cause.source();
    }
    UpstreamError::Exchange(format!(
        "the origin connection failed: {}",
        crate::error::causes(&error)
    ))
}
