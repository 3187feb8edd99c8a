//! What can go wrong while carrying a request to its origin, and whose
//! fault each failure is (decided here, once, for the answer, the metric
//! label and the exit's health).

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::fault::{Blame, Fault};
use crate::identity::RetireReason;
use crate::net::HostPort;

/// What failed while reaching an origin through an exit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The exit's proxy could not be reached.
    #[error("cannot reach the exit's proxy at {proxy}: {source}")]
    ExitUnreachable {
        /// The proxy address.
        proxy: HostPort,
        /// Why.
        source: Arc<io::Error>,
    },
    /// The exit answered CONNECT with a non-2xx status.
    #[error("the exit refused CONNECT {target}: {status} {reason}")]
    ExitRefused {
        /// The origin asked for.
        target: HostPort,
        /// The exit's status code.
        status: u16,
        /// The exit's reason phrase.
        reason: String,
    },
    /// The exit's answer was not valid HTTP.
    #[error("the exit's answer to CONNECT is not valid HTTP: {0}")]
    ExitProtocol(String),
    /// A stage ran past the connect deadline.
    #[error("timed out after {after:?} {stage}")]
    Timeout {
        /// What was being waited for.
        stage: Stage,
        /// The deadline.
        after: Duration,
    },
    /// The origin's name could not be resolved (direct exits).
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The origin host.
        host: String,
        /// Why.
        source: Arc<io::Error>,
    },
    /// The origin refused or could not be reached (direct exits).
    #[error("cannot connect to {target}: {source}")]
    OriginUnreachable {
        /// The origin.
        target: HostPort,
        /// Why.
        source: Arc<io::Error>,
    },
    /// The TLS handshake with the origin failed.
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        /// The origin host.
        host: String,
        /// Why.
        source: Arc<io::Error>,
    },
    /// A new tunnel of an identity left from another address than the
    /// identity's first one.
    #[error("the new tunnel leaves from {observed}, but the identity was created on {expected}")]
    ExitIpDrift {
        /// The identity's address.
        expected: IpAddr,
        /// The new tunnel's address.
        observed: IpAddr,
    },
    /// A SOCKS5 exit refused or failed the connection.
    #[error("the SOCKS5 exit could not connect to {target}: {reason}")]
    ExitSocks {
        /// The origin asked for.
        target: HostPort,
        /// Whether authentication failed (the exit's fault, not the origin's).
        auth: bool,
        /// What the exit said.
        reason: String,
    },
    /// The SOCKS5 exit did not keep to SOCKS5: not SOCKS5 at all, a
    /// method it was not offered, `CONNECT` not supported, or a close
    /// before its answer.
    #[error(
        "{}: {reason}",
        if *after_connect {
            "the SOCKS5 exit closed the connection once asked for the origin, without an answer"
        } else {
            "the SOCKS5 exit broke the protocol"
        }
    )]
    ExitSocksProtocol {
        /// What it did.
        reason: String,
        /// It closed after the `CONNECT` was sent: an exit that reached
        /// for a dead origin may close so instead of answering.
        after_connect: bool,
    },
    /// The exit is set up to report its egress address but this tunnel's
    /// could not be learnt, so it cannot be trusted with an identity.
    #[error("cannot learn the tunnel's egress address: {0}")]
    ExitIpUnknown(String),
    /// The direct exit refused the origin's address (SSRF guard): nothing
    /// was sent to it. (Boxed: rare, and every error answer carries the
    /// size of the largest variant.)
    #[error(transparent)]
    Forbidden(Box<crate::upstream::dial::guard::Forbidden>),
}

/// The connect stage a timeout hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TCP connection to the exit's proxy.
    ExitConnect,
    /// The exit's answer to CONNECT.
    ExitReply,
    /// TCP connection to the origin (direct exits).
    OriginConnect,
    /// TLS handshake with the origin.
    TlsHandshake,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::ExitConnect => "connecting to the exit's proxy",
            Stage::ExitReply => "waiting for the exit's answer to CONNECT",
            Stage::OriginConnect => "connecting to the origin",
            Stage::TlsHandshake => "in the TLS handshake with the origin",
        })
    }
}

impl ConnectError {
    /// Whether an exit fault may be the origin's after all: an exit answers
    /// a `CONNECT` only once it reached the origin, so one that took too
    /// long may be waiting on an origin that never answers (see
    /// [`crate::exits::health::Health::doubtful_failure`]).
    pub fn may_be_the_origins(&self) -> bool {
        matches!(
            self,
            ConnectError::Timeout {
                stage: Stage::ExitReply,
                ..
            } | ConnectError::ExitSocksProtocol {
                after_connect: true,
                ..
            }
        )
    }

    /// Whether the exit itself (not the origin) is to blame: the exit is
    /// down, broken, slow or refused its credentials.
    pub fn is_exit_fault(&self) -> bool {
        match self {
            ConnectError::ExitUnreachable { .. }
            | ConnectError::ExitProtocol(_)
            | ConnectError::ExitSocksProtocol { .. } => true,
            ConnectError::ExitSocks { auth, .. } => *auth,
            ConnectError::ExitRefused { status, .. } => *status == 407,
            ConnectError::Timeout { stage, .. } => {
                matches!(stage, Stage::ExitConnect | Stage::ExitReply)
            }
            _ => false,
        }
    }
}

/// What a failed TLS handshake with an origin says about its certificate:
/// the advice differs (an untrusted issuer is fixed with `--upstream-ca`,
/// and retrying never helps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// Signed by a CA pinproxy does not trust (unknown issuer, self-signed).
    UntrustedIssuer,
    /// Not valid for the host name asked for.
    WrongName,
    /// Expired, or not valid yet.
    Expired,
    /// Refused for another reason (bad signature, revoked, unusable key).
    Rejected,
    /// Not about the certificate: no common protocol or cipher, an alert,
    /// not TLS at all.
    Handshake,
}

impl TlsFailure {
    /// Reads a TLS stack's handshake error: rustls' typed error where it is
    /// one, else the verification text BoringSSL and OpenSSL print.
    pub fn of(error: &io::Error) -> TlsFailure {
        if let Some(rustls::Error::InvalidCertificate(e)) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            use rustls::CertificateError as C;
            return match e {
                C::UnknownIssuer => TlsFailure::UntrustedIssuer,
                C::NotValidForName | C::NotValidForNameContext { .. } => TlsFailure::WrongName,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => TlsFailure::Expired,
                _ => TlsFailure::Rejected,
            };
        }
        TlsFailure::of_text(&crate::fault::causes(error))
    }

    fn of_text(text: &str) -> TlsFailure {
        let text = text.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
        if has(&[
            "unable to get local issuer certificate",
            "unable to get issuer certificate",
            "unable to verify the first certificate",
            "self signed certificate",
            "self-signed certificate",
            "unknownissuer",
            "unknown issuer",
            "unknown ca",
        ]) {
            TlsFailure::UntrustedIssuer
        } else if has(&["hostname mismatch", "notvalidforname", "not valid for name"]) {
            TlsFailure::WrongName
        } else if has(&["certificate has expired", "certificate is not yet valid"]) {
            TlsFailure::Expired
        } else if has(&[
            "cert verification failed",
            "certificate verify failed",
            "certificate_verify_failed",
            "invalid peer certificate",
        ]) {
            TlsFailure::Rejected
        } else {
            TlsFailure::Handshake
        }
    }
}

impl ConnectError {
    /// For a failed TLS handshake, what it says about the certificate.
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            ConnectError::Tls { source, .. } => Some(TlsFailure::of(source)),
            _ => None,
        }
    }
}

impl Blame for ConnectError {
    fn fault(&self) -> Fault {
        match self {
            // An exit that refuses CONNECT may be reporting the origin's
            // failure; either way the answer names the exit.
            ConnectError::ExitRefused { .. } => Fault::Exit,
            // The client asked for an address it may not reach.
            ConnectError::Forbidden(_) => Fault::Client,
            _ if self.is_exit_fault() => Fault::Exit,
            _ => Fault::Origin,
        }
    }
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
    /// The lane's identity retired while the request waited for a
    /// connection: nothing was written.
    #[error("its identity was retired while it waited for a connection ({0})")]
    IdentityRetired(RetireReason),
    /// The exchange failed after the connection was open.
    #[error("{detail}")]
    Exchange {
        /// What went wrong.
        kind: ExchangeKind,
        /// The causes, for the log and the error answer.
        detail: String,
    },
}

/// How an exchange on an open connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// The origin closed the connection before its answer was complete.
    OriginClosed,
    /// The origin's answer is not valid HTTP.
    Protocol,
    /// The origin refused or broke a WebSocket upgrade, or switched
    /// protocols unasked.
    Upgrade,
    /// The origin's answer is valid, but sets tracked cookies pinproxy
    /// cannot pin (too many, or a name too long): it was not passed on.
    Unpinnable,
    /// The origin refused the request's HTTP/2 stream (`REFUSED_STREAM`):
    /// it did not process it, and pinproxy did not, or could no longer,
    /// send it again.
    Refused,
    /// Anything else.
    Other,
}

impl UpstreamError {
    /// Whether the failure is evidence against the exit itself (it counts
    /// towards the exit's health), not against the origin.
    pub fn counts_against_exit(&self) -> bool {
        match self {
            UpstreamError::Connect(c) => c.is_exit_fault(),
            _ => false,
        }
    }

    /// Whether a failure that counts against the exit may be the origin's
    /// (see [`ConnectError::may_be_the_origins`]).
    pub fn may_be_the_origins(&self) -> bool {
        matches!(self, UpstreamError::Connect(c) if c.may_be_the_origins())
    }

    /// Classifies a failure of hyper's connection to the origin.
    pub fn from_hyper(error: &hyper::Error) -> UpstreamError {
        let kind = if error.is_incomplete_message() || error.is_closed() || error.is_canceled() {
            ExchangeKind::OriginClosed
        } else if error.is_parse() || error.is_parse_status() {
            ExchangeKind::Protocol
        } else {
            ExchangeKind::Other
        };
        UpstreamError::Exchange {
            kind,
            detail: format!(
                "the origin connection failed: {}",
                crate::fault::causes(error)
            ),
        }
    }

    /// Classifies a failure of the shaped HTTP/2 connection to the origin.
    pub fn from_wreq(error: &wreq_proto::Error) -> UpstreamError {
        let kind = if error.is_incomplete_message() || error.is_closed() || error.is_canceled() {
            ExchangeKind::OriginClosed
        } else if error.is_parse() || error.is_parse_status() {
            ExchangeKind::Protocol
        } else {
            ExchangeKind::Other
        };
        UpstreamError::Exchange {
            kind,
            detail: format!(
                "the origin connection failed: {}",
                crate::fault::causes(error)
            ),
        }
    }
}

impl Blame for UpstreamError {
    fn fault(&self) -> Fault {
        match self {
            UpstreamError::Connect(c) => c.fault(),
            UpstreamError::ResponseTimeout(_) | UpstreamError::Exchange { .. } => Fault::Origin,
            // As when the retirement is seen at routing (`502`); it counts
            // against no exit's health (see `counts_against_exit`).
            UpstreamError::IdentityRetired(_) => Fault::Exit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_read_from_every_stack() {
        let rustls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(TlsFailure::of(&rustls), TlsFailure::UntrustedIssuer);
        // BoringSSL through tokio-boring, OpenSSL 3.
        let boring = io::Error::new(
            io::ErrorKind::InvalidData,
            "TLS handshake failed: cert verification failed - unable to get local issuer \
             certificate [CERTIFICATE_VERIFY_FAILED]",
        );
        assert_eq!(TlsFailure::of(&boring), TlsFailure::UntrustedIssuer);
        let openssl = io::Error::other(
            "error:0A000086:SSL routines::certificate verify failed (self-signed certificate)",
        );
        assert_eq!(TlsFailure::of(&openssl), TlsFailure::UntrustedIssuer);
        let expired = io::Error::other("cert verification failed - certificate has expired");
        assert_eq!(TlsFailure::of(&expired), TlsFailure::Expired);
        let alert = io::Error::other("TLS handshake failed: tlsv1 alert protocol version");
        assert_eq!(TlsFailure::of(&alert), TlsFailure::Handshake);
    }
}
