//! TLS towards origins, behind one interface: [`UpstreamTls::connect`]
//! takes a connected transport and returns an encrypted [`TlsConn`] that
//! says which protocol the origin chose. No TLS library's types leave this
//! module.
//!
//! Three stacks: rustls (pinproxy's own hello), BoringSSL (a hello shaped
//! like a browser's or a client's: [`boring_stack`]) and, where this
//! machine has it, the system's OpenSSL, which says the hellos of
//! OpenSSL-family clients (curl, Python, Node) that BoringSSL cannot
//! ([`openssl_stack`]). A shaped hello goes to whichever of the two says it
//! with fewer [`Gap`]s ([`UpstreamTls::mirror_stack`]): BoringSSL for
//! Chromium (no gap), OpenSSL for curl and Python (no gap either).
//!
//! BoringSSL's reads go through a [`read_gate::ReadGate`], which skips the
//! `SSL_read`s that could only find nothing, and BoringSSL reads its
//! transport through a [`read_ahead::ReadAhead`], so that a small record
//! costs one `recvfrom` rather than two and a failed third.
//!
//! Trust: the public web roots compiled into pinproxy, plus the PEM files
//! given with `--upstream-ca`, for every stack.

pub mod boring_stack;
mod boring_ffi;
mod openssl_ffi;
pub mod openssl_stack;
pub mod read_ahead;
pub mod read_gate;
mod rustls_stack;
pub mod tap;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::fingerprint::client_hello::ClientHello;
use read_gate::ReadReady;

/// Something in a client's ClientHello that the chosen stack cannot say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// What kind of thing (a stable metric label): `cipher`, `group`,
    /// `key-share`, `signature-algorithm`, `extension`, `tls13-order`,
    /// `extension-order`, `certificate-compression`, `version`, and (for
    /// OpenSSL) `grease` and `session-id`.
    pub kind: &'static str,
    /// Which one, e.g. `cipher 0xccaa`.
    pub detail: String,
}

/// Most gaps kept for one hello. Its lists are bounded
/// ([`crate::fingerprint::client_hello::MAX_LIST`]), but a hello of hundreds
/// of unknown entries would still keep a string for each in every cached
/// connector and log line.
pub const MAX_GAPS: usize = 64;

/// The largest TLS session kept for resumption, serialized. The origin
/// chooses its size (a ticket may be 64 KiB, and a BoringSSL session holds
/// the origin's chain, up to 100 KiB), and each identity keeps up to two
/// per origin: a session past this is not kept, and the next connection
/// runs a full handshake, as after a session that cannot be serialized. A
/// public site's session is a few KiB.
pub const MAX_KEPT_SESSION: usize = 16 * 1024;

/// The public web roots both shaping stacks trust: those of
/// `webpki_root_certs` but the ones Mozilla constrains to some names (one
/// today, constrained to `.tr`). rustls reads the constraint from
/// `webpki_roots`; BoringSSL and OpenSSL take whole certificates, where it
/// is not written, and would trust such a root for every name. A
/// certificate is matched to a constrained anchor by its public key, which
/// it holds verbatim.
pub(crate) fn unconstrained_roots() -> impl Iterator<Item = &'static [u8]> {
    let constrained: Vec<&'static [u8]> = webpki_roots::TLS_SERVER_ROOTS
        .iter()
        .filter(|anchor| anchor.name_constraints.is_some())
        .map(|anchor| anchor.subject_public_key_info.as_ref())
        .collect();
    webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|der| der.as_ref())
        .filter(move |der| {
            !constrained
                .iter()
                .any(|spki| der.windows(spki.len()).any(|window| window == *spki))
        })
}

/// `gaps`, at most [`MAX_GAPS`] of them: past that, the last says how many
/// more there were (with the kind of the first it stands for).
pub fn bounded_gaps(mut gaps: Vec<Gap>) -> Arc<[Gap]> {
    if gaps.len() > MAX_GAPS {
        let more = gaps.len() - (MAX_GAPS - 1);
        gaps.truncate(MAX_GAPS);
        if let Some(last) = gaps.last_mut() {
            last.detail = format!("and {more} more");
        }
    }
    gaps.into()
}

/// What a shaped connection says, beyond the hello itself.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    /// The hello to imitate.
    pub hello: &'a ClientHello,
    /// Offer only `http/1.1` whatever the hello lists (WebSocket upgrades).
    pub http1_only: bool,
    /// The client's HTTP/2 SETTINGS payload, sent as its ALPS settings.
    pub alps_settings: &'a [u8],
    /// Where this connection's TLS sessions are kept: one it holds is
    /// offered (the connection resumes), and those the origin issues on
    /// the connection are kept there. `None`: no session is offered or
    /// kept (every handshake is a full one).
    pub sessions: Option<&'a Arc<SessionSlot>>,
}

/// The newest TLS session one identity's connections to one origin were
/// given (with BoringSSL, the two newest TLS 1.3 tickets), offered on the
/// identity's next connection there, as a browser resumes with a ticket
/// its earlier connection to a host received.
///
/// Only an identity's own connections share one (see
/// `upstream::resumption`): a ticket links the connection that offers it to
/// the one it came on, so a ticket kept for a lane shared by several
/// visitors, or across exits, would link what the client never linked. A
/// cookie-less lane's connection keeps its sessions in a slot of its own,
/// passed only to the identity an answer on it founds (which the origin
/// linked to it when it set the cookie there). BoringSSL and the system's
/// OpenSSL offer and keep sessions; rustls connections (pinproxy's own
/// hello) never resume.
#[derive(Default)]
pub struct SessionSlot {
    newest: std::sync::Mutex<Option<KeptSession>>,
}

/// A session kept in a [`SessionSlot`], of the stack that made it (and
/// offered only by that stack, on connections of the same connector).
enum KeptSession {
    Boring(boring_stack::KeptSession),
    Openssl(openssl_stack::KeptSession),
}

impl std::fmt::Debug for SessionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not `holds`: printing must not wait for (or deadlock on) the lock.
        let holds = self.newest.try_lock().ok().map(|newest| newest.is_some());
        f.debug_struct("SessionSlot")
            .field("holds", &holds)
            .finish()
    }
}

impl SessionSlot {
    fn newest(&self) -> std::sync::MutexGuard<'_, Option<KeptSession>> {
        // Every change is one assignment: a panic elsewhere while the lock
        // was held cannot leave it half made.
        self.newest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a session is kept.
    pub fn holds(&self) -> bool {
        self.newest().is_some()
    }

    /// Moves the session kept here to `heir`, unless `heir` holds one of
    /// its own (a newer one). This slot is left empty either way, so the
    /// session goes to one heir at most.
    pub(crate) fn pass_to(&self, heir: &SessionSlot) {
        // One lock at a time: no order between two slots' locks to keep.
        let Some(kept) = self.newest().take() else {
            return;
        };
        let mut theirs = heir.newest();
        if theirs.is_none() {
            *theirs = Some(kept);
        }
    }
}

/// The upstream trust store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// An `--upstream-ca` file could not be read or holds no certificate.
    #[error("upstream CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls rejected the configuration.
    #[error("upstream TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    /// BoringSSL rejected the configuration.
    #[error("upstream TLS settings (BoringSSL): {0}")]
    Boring(String),
    /// The system's OpenSSL rejected the configuration.
    #[error("upstream TLS settings (OpenSSL): {0}")]
    Openssl(String),
}

/// Which stack makes a connection, and what its ClientHello says.
#[derive(Debug, Clone, Copy)]
pub enum Stack<'a> {
    /// rustls, offering `h2` or not: pinproxy's own hello.
    Rustls {
        /// Offer `h2, http/1.1` (else `http/1.1`).
        h2: bool,
    },
    /// Shaped like a client's (or a browser profile's) hello: said by
    /// BoringSSL, or by the system's OpenSSL when that says it with fewer
    /// gaps ([`UpstreamTls::mirror_stack`]).
    Shaped(Shape<'a>),
}

/// Which library says a shaped hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorStack {
    /// BoringSSL (browsers, and every client when OpenSSL is unavailable).
    BoringSsl,
    /// The system's OpenSSL (OpenSSL-family clients).
    OpenSsl,
}

impl MirrorStack {
    /// Short name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            MirrorStack::BoringSsl => "boringssl",
            MirrorStack::OpenSsl => "openssl",
        }
    }

    /// The stack saying a hello, from how many gaps each leaves (`None`:
    /// that stack cannot be configured for it, or is not there). OpenSSL
    /// only when it does strictly better, so a tie (a browser BoringSSL
    /// says in full) stays on BoringSSL. Depends on the hello (and this
    /// machine's OpenSSL) alone, so an identity's recorded hello picks the
    /// same stack after a restart.
    pub fn by_gaps(boring: Option<usize>, openssl: Option<usize>) -> MirrorStack {
        match (boring, openssl) {
            (_, None) => MirrorStack::BoringSsl,
            (None, Some(_)) => MirrorStack::OpenSsl,
            (Some(b), Some(o)) if o < b => MirrorStack::OpenSsl,
            (Some(_), Some(_)) => MirrorStack::BoringSsl,
        }
    }
}

/// ALPN protocols offered to origins by clients that speak HTTP/1.1 only.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN protocols offered to origins when the client offered HTTP/2.
pub const ALPN_H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The upstream TLS client, shared by every exit (cheap to clone).
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    rustls: Arc<rustls_stack::RustlsClient>,
    boring: Arc<boring_stack::BoringClient>,
    /// `None`: this machine has no usable `libssl.so.3`.
    openssl: Option<Arc<openssl_stack::OpensslClient>>,
}

impl UpstreamTls {
    /// A client trusting the public web roots plus `extra_ca_files`.
    /// Loads the system's OpenSSL when there is one (and logs which, or why
    /// not). Blocking (reads files): call it off the async runtime.
    pub fn new(
        provider: Arc<::rustls::crypto::CryptoProvider>,
        extra_ca_files: &[PathBuf],
    ) -> Result<UpstreamTls, TlsSetupError> {
        Ok(UpstreamTls {
            rustls: Arc::new(rustls_stack::RustlsClient::new(provider, extra_ca_files)?),
            boring: Arc::new(boring_stack::BoringClient::new(extra_ca_files)?),
            openssl: openssl_stack::OpensslClient::new(extra_ca_files)?.map(Arc::new),
        })
    }

    /// Which library says `shape`'s hello: the system's OpenSSL when it is
    /// loaded and leaves fewer gaps than BoringSSL, else BoringSSL. Both
    /// answers are cached per hello.
    pub fn mirror_stack(&self, shape: Shape<'_>) -> MirrorStack {
        let Some(openssl) = &self.openssl else {
            return MirrorStack::BoringSsl;
        };
        MirrorStack::by_gaps(
            self.boring.gaps(shape).ok().map(|g| g.len()),
            openssl.gaps(shape).ok().map(|g| g.len()),
        )
    }

    /// Whether BoringSSL says `shape`'s hello with no gap and is the stack
    /// that says it: the hello of a BoringSSL client (Chromium and the
    /// browsers built on it), all of which resume their sessions. Cached
    /// per hello, as [`UpstreamTls::mirror_stack`] is.
    pub fn said_in_full_by_boringssl(&self, shape: Shape<'_>) -> bool {
        self.mirror_stack(shape) == MirrorStack::BoringSsl
            && self.boring.gaps(shape).is_ok_and(|gaps| gaps.is_empty())
    }

    /// Runs the TLS handshake with `host` over `transport`, with the stack
    /// and ClientHello `stack` says.
    pub async fn connect<T>(
        &self,
        host: &str,
        transport: T,
        stack: Stack<'_>,
    ) -> io::Result<TlsConn>
    where
        T: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    {
        // A fully qualified name (`www.example.com.`, as curl sends for
        // `https://www.example.com./`) is sent and checked without its
        // dot: SNI carries none (RFC 6066 §3; browsers and rustls drop it),
        // and certificates name hosts without one, which BoringSSL and
        // OpenSSL compare byte for byte.
        let host = host.strip_suffix('.').unwrap_or(host);
        match stack {
            Stack::Rustls { h2 } => self.rustls.connect(host, transport, h2).await,
            Stack::Shaped(shape) => {
                let chosen = self.mirror_stack(shape);
                tracing::debug!(host, stack = chosen.name(), "upstream TLS handshake");
                let openssl = match chosen {
                    MirrorStack::OpenSsl => self.openssl.as_ref(),
                    MirrorStack::BoringSsl => None,
                };
                let (conn, gaps) = match openssl {
                    Some(openssl) => openssl.connect(host, transport, shape).await?,
                    None => self.boring.connect(host, transport, shape).await?,
                };
                Ok(conn.with_gaps(gaps))
            }
        }
    }
}

/// A byte stream a TLS connection can be read and written through.
pub trait TlsIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> TlsIo for T {}

/// An established TLS connection to an origin, whichever stack made it.
pub struct TlsConn {
    io: Box<dyn TlsIo>,
    h2: bool,
    resumed: bool,
    sent: Option<Box<ClientHello>>,
    gaps: Arc<[Gap]>,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("h2", &self.h2).finish()
    }
}

impl TlsConn {
    /// Wraps a stack's stream; `h2` says whether the origin chose HTTP/2.
    pub fn new(io: Box<dyn TlsIo>, h2: bool) -> TlsConn {
        TlsConn {
            io,
            h2,
            resumed: false,
            sent: None,
            gaps: Arc::new([]),
        }
    }

    /// Records the ClientHello that really left (read off the wire).
    pub fn with_sent_hello(mut self, hello: Option<ClientHello>) -> TlsConn {
        self.sent = hello.map(Box::new);
        self
    }

    /// Records that the handshake resumed a session.
    pub fn with_resumed(mut self, resumed: bool) -> TlsConn {
        self.resumed = resumed;
        self
    }

    /// Whether the handshake resumed a session.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Records what the stack could not mirror.
    pub fn with_gaps(mut self, gaps: Arc<[Gap]>) -> TlsConn {
        self.gaps = gaps;
        self
    }

    /// Whether the origin chose HTTP/2 by ALPN.
    pub fn negotiated_h2(&self) -> bool {
        self.h2
    }

    /// The ClientHello that left, as read off the wire.
    pub fn sent_hello(&self) -> Option<&ClientHello> {
        self.sent.as_deref()
    }

    /// What of the client's hello could not be said.
    pub fn gaps(&self) -> &Arc<[Gap]> {
        &self.gaps
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn gaps_past_the_bound_are_summed_up_in_the_last() {
        let gaps = |n: usize| -> Vec<Gap> {
            (0..n)
                .map(|i| Gap {
                    kind: if i < 70 { "cipher" } else { "group" },
                    detail: format!("cipher {i:#06x}"),
                })
                .collect()
        };
        assert_eq!(&*bounded_gaps(gaps(MAX_GAPS)), &gaps(MAX_GAPS)[..]);
        let bounded = bounded_gaps(gaps(1000));
        assert_eq!(bounded.len(), MAX_GAPS);
        assert_eq!(&bounded[..MAX_GAPS - 1], &gaps(MAX_GAPS - 1)[..]);
        let last = &bounded[MAX_GAPS - 1];
        assert_eq!(
            (last.kind, last.detail.as_str()),
            ("cipher", "and 937 more")
        );
    }
    use rustls_pki_types::CertificateDer;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A CA and a leaf for `localhost` and 127.0.0.1 signed by it.
    pub(crate) struct Pki {
        /// The CA certificate, DER.
        pub(crate) ca: Vec<u8>,
        /// The CA certificate, PEM (for a trust file).
        pub(crate) ca_pem: String,
        /// The leaf, then the CA.
        pub(crate) chain: Vec<CertificateDer<'static>>,
        /// The leaf's key, PKCS#8 DER.
        pub(crate) key: Vec<u8>,
    }

    pub(crate) fn pki() -> Pki {
        let made = (|| -> Result<Pki, rcgen::Error> {
            let ca_key = KeyPair::generate()?;
            let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            // Not rcgen's default name, which the leaf has: a leaf whose
            // issuer is its own name looks self-signed.
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "openssl stack test CA");
            let ca = ca_params.self_signed(&ca_key)?;
            let issuer = Issuer::new(ca_params, ca_key);
            let leaf_key = KeyPair::generate()?;
            let leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
                .signed_by(&leaf_key, &issuer)?;
            Ok(Pki {
                ca: ca.der().to_vec(),
                ca_pem: ca.pem(),
                chain: vec![leaf.der().clone(), ca.der().clone()],
                key: leaf_key.serialize_der(),
            })
        })();
        made.unwrap_or_else(|e| panic!("{e}"))
    }

    /// A rustls server for `pki`'s leaf offering h2 and http/1.1 (TLS 1.2
    /// only when `tls12`).
    pub(crate) fn acceptor(pki: &Pki, tls12: bool) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider);
        let builder = if tls12 {
            builder.with_protocol_versions(&[&rustls::version::TLS12])
        } else {
            builder.with_safe_default_protocol_versions()
        };
        let config = builder.and_then(|b| {
            b.with_no_client_auth().with_single_cert(
                pki.chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
            )
        });
        let mut config = config.unwrap_or_else(|e| panic!("{e}"));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// A ClientHello of `tests/fixtures/hello`, as captured.
    pub(crate) fn fixture(name: &str) -> ClientHello {
        crate::fingerprint::client_hello::fixture(name)
    }

    /// Mozilla constrains one root to `.tr`; the stacks that take whole
    /// certificates would trust it for every name, so they do not trust it.
    #[test]
    fn name_constrained_roots_are_left_out_of_the_shaping_stacks() {
        let constrained: Vec<&[u8]> = webpki_roots::TLS_SERVER_ROOTS
            .iter()
            .filter(|anchor| anchor.name_constraints.is_some())
            .map(|anchor| anchor.subject_public_key_info.as_ref())
            .collect();
        assert!(
            !constrained.is_empty(),
            "webpki-roots still constrains a root"
        );
        let kept: Vec<&[u8]> = unconstrained_roots().collect();
        assert_eq!(
            kept.len() + constrained.len(),
            webpki_root_certs::TLS_SERVER_ROOT_CERTS.len()
        );
        for spki in constrained {
            assert!(!kept
                .iter()
                .any(|der| der.windows(spki.len()).any(|w| w == spki)));
        }
    }

    #[test]
    fn openssl_only_when_it_leaves_fewer_gaps() {
        use MirrorStack::{BoringSsl, OpenSsl};
        assert_eq!(MirrorStack::by_gaps(Some(0), Some(0)), BoringSsl);
        assert_eq!(MirrorStack::by_gaps(Some(0), Some(5)), BoringSsl);
        assert_eq!(MirrorStack::by_gaps(Some(12), Some(0)), OpenSsl);
        assert_eq!(MirrorStack::by_gaps(Some(12), None), BoringSsl);
        assert_eq!(MirrorStack::by_gaps(None, Some(3)), OpenSsl);
        assert_eq!(MirrorStack::by_gaps(None, None), BoringSsl);
    }

    #[test]
    fn each_client_gets_the_stack_that_says_it() {
        let provider = Arc::new(::rustls::crypto::aws_lc_rs::default_provider());
        let tls = match UpstreamTls::new(provider, &[]) {
            Ok(tls) => tls,
            Err(e) => panic!("{e}"),
        };
        let openssl = super::openssl_ffi::loaded_for_tests();
        assert_eq!(
            tls.openssl.is_some(),
            openssl,
            "the system OpenSSL loads, and the upstream TLS has no stack on it"
        );
        if !openssl {
            eprintln!("no system OpenSSL here: every client stays on BoringSSL");
        }
        let chrome = crate::fingerprint::profile::chrome_hello();
        let cases = [
            ("chromium_1", MirrorStack::BoringSsl),
            ("chromium_2", MirrorStack::BoringSsl),
            ("curl_h2", MirrorStack::OpenSsl),
            ("curl_h1", MirrorStack::OpenSsl),
            ("python_requests", MirrorStack::OpenSsl),
            ("python_requests_debian", MirrorStack::OpenSsl),
            ("python_ssl", MirrorStack::OpenSsl),
        ];
        for (name, expected) in cases {
            let hello = fixture(name).fresh_and_anonymous();
            for http1_only in [false, true] {
                let shape = Shape {
                    hello: &hello,
                    http1_only,
                    alps_settings: &[],
                    sessions: None,
                };
                let expected = if openssl {
                    expected
                } else {
                    MirrorStack::BoringSsl
                };
                // Asked twice: the answer is the hello's, not the moment's.
                assert_eq!(tls.mirror_stack(shape), expected, "{name}");
                assert_eq!(tls.mirror_stack(shape), expected, "{name}");
            }
        }
        // A restart (a new client, empty caches) decides the same.
        let provider = Arc::new(::rustls::crypto::aws_lc_rs::default_provider());
        let again = match UpstreamTls::new(provider, &[]) {
            Ok(tls) => tls,
            Err(e) => panic!("{e}"),
        };
        for (name, _) in cases {
            let hello = fixture(name).fresh_and_anonymous();
            let shape = Shape {
                hello: &hello,
                http1_only: false,
                alps_settings: &[],
                sessions: None,
            };
            assert_eq!(again.mirror_stack(shape), tls.mirror_stack(shape), "{name}");
        }
        // Chrome mode's profile stays on BoringSSL.
        if let Some(chrome) = chrome.as_deref() {
            let shape = Shape {
                hello: chrome,
                http1_only: false,
                alps_settings: &[],
                sessions: None,
            };
            assert_eq!(tls.mirror_stack(shape), MirrorStack::BoringSsl);
        }
    }
}
