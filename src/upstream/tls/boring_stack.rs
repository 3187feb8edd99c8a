//! The BoringSSL upstream stack: a ClientHello built from the client's own
//! (mirror mode) or from a browser profile (chrome mode).
//!
//! Every ClientHello field BoringSSL can say is set from the recorded one:
//! cipher list and order, versions, supported groups and which get key
//! shares (X25519MLKEM768 included), signature algorithms in order, ALPN,
//! GREASE and extension permutation, certificate compression, ALPS with
//! the client's codepoint, ECH GREASE, OCSP and SCT requests, tickets and
//! the trust anchors Chrome asks for. What BoringSSL cannot say is listed
//! as a [`Gap`] (see README "What is mirrored"): it is logged once per
//! identity and counted, and the JA4 that really left is measured off the
//! wire ([`super::tap`]).
//!
//! A connector (an `SSL_CTX`) is built once per distinct hello and cached;
//! the per-connection settings are applied to each `SSL`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash as _, Hasher as _};
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use boring::ex_data::Index;
use boring::ssl::{
    CertificateCompressionAlgorithm, CertificateCompressor, ConnectConfiguration, Ssl,
    SslConnector, SslContext, SslContextRef, SslMethod, SslOptions, SslRef, SslSession,
    SslSessionCacheMode, SslSignatureAlgorithm, SslVersion,
};
use boring::x509::store::{X509Store, X509StoreBuilder};
use boring::x509::X509;
use tokio::io::{AsyncRead, AsyncWrite};

use super::boring_ffi;
use super::read_ahead::ReadAhead;
use super::read_gate::{ReadGate, ReadReady};
use super::tap::{HelloTap, SentHello};
use super::{Gap, KeptSession as Kept, SessionSlot, Shape, TlsConn, TlsSetupError};
use crate::fingerprint::client_hello::{ext, is_grease, SessionTicket};

/// Most distinct hellos whose connectors are kept.
const MAX_CONNECTORS: u64 = 1024;

/// A connector for one hello, and what each connection made with it sets.
struct Prepared {
    connector: SslConnector,
    key_shares: Vec<u16>,
    /// ALPS protocols with their codepoint (true: the new one, 17613).
    alps: Vec<(Vec<u8>, bool)>,
    trust_anchors: Option<Vec<u8>>,
    ech_grease: bool,
    gaps: Arc<[Gap]>,
}

/// A session an origin issued on a connection, with the connector (the
/// `SSL_CTX`) that made the connection: offered only on that connector's
/// connections (a WebSocket's HTTP/1.1-only hello has a connector of its
/// own, and a connector evicted from the cache and made again is another).
///
/// Kept serialized: a live `SSL_SESSION` holds the origin's certificates
/// parsed, 7.9 KB with the test suite's two small certificates (allocator
/// count) against 0.9 KB serialized, and an identity keeps one or two per
/// origin for as long as its pool lives. It is parsed again when offered,
/// which costs far less than the full handshake it saves.
///
/// Up to two TLS 1.3 tickets, as Chrome's session cache keeps them: the
/// newest, and the one before it (an origin sends two after a handshake),
/// so that two connections opened at once both resume.
pub(super) struct KeptSession {
    der: Box<[u8]>,
    /// A TLS 1.3 ticket: offered once (see [`boring_ffi::single_use`]).
    single_use: bool,
    context: SslContext,
    /// The ticket kept before this one (when both are single-use tickets
    /// of the same connector), offered once this one has been.
    previous: Option<Box<KeptSession>>,
}

/// Where a connection keeps the sessions its origin issues: its
/// [`SessionSlot`], in the connection's ex-data. `None`: BoringSSL had no
/// index to give (no session is then offered or kept).
fn slot_index() -> Option<Index<Ssl, Arc<SessionSlot>>> {
    static INDEX: std::sync::OnceLock<Option<Index<Ssl, Arc<SessionSlot>>>> =
        std::sync::OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

/// BoringSSL's new-session callback: a session (a TLS 1.2 session after
/// the handshake, a TLS 1.3 ticket whenever the origin sends one) goes to
/// the connection's slot as its newest (an identity's, or on a cookie-less
/// lane one of the connection's own, see `SessionSlot`), the ticket there
/// before it kept as the second when both are TLS 1.3 tickets of this
/// connector, anything older let go; a connection without a slot (rustls
/// mode, a WebSocket's) keeps none.
fn keep_session(ssl: &mut SslRef, session: SslSession) {
    let Some(slot) = slot_index().and_then(|index| ssl.ex_data(index)) else {
        return;
    };
    // A session BoringSSL cannot serialize is not kept (the next
    // connection runs a full handshake).
    let Ok(der) = session.to_der() else {
        return;
    };
    if der.len() > super::MAX_KEPT_SESSION {
        return;
    }
    let context = ssl.ssl_context();
    let single_use = boring_ffi::single_use(&session);
    let mut newest = slot.newest();
    // The ticket before stays as the second one; older ones go.
    let previous = match newest.take() {
        Some(Kept::Boring(mut before))
            if single_use && before.single_use && std::ptr::eq(&*before.context, context) =>
        {
            before.previous = None;
            Some(Box::new(before))
        }
        _ => None,
    };
    *newest = Some(Kept::Boring(KeptSession {
        der: der.into_boxed_slice(),
        single_use,
        context: context.to_owned(),
        previous,
    }));
}

/// Offers the session `slot` keeps for `context`'s connections on `ssl`,
/// and has `ssl` keep the ones its origin issues in `slot`. A TLS 1.3
/// ticket is taken out as it is offered (offered once, as browsers do;
/// the one kept before it is then the next to offer); a TLS 1.2 session
/// stays for the next connection too.
fn resume_from(
    slot: &Arc<SessionSlot>,
    config: &mut ConnectConfiguration,
) -> Result<(), boring_ffi::Refused> {
    let Some(index) = slot_index() else {
        return Ok(());
    };
    let offered = {
        let context: &SslContextRef = config.ssl_context();
        let mut newest = slot.newest();
        match newest.as_ref() {
            Some(Kept::Boring(kept)) if std::ptr::eq(&*kept.context, context) => {
                if kept.single_use {
                    match newest.take() {
                        Some(Kept::Boring(kept)) => {
                            *newest = kept.previous.map(|previous| Kept::Boring(*previous));
                            Some(kept.der)
                        }
                        _ => None,
                    }
                } else {
                    Some(kept.der.clone())
                }
            }
            _ => None,
        }
    };
    // Parsed outside the slot's lock. One that does not parse is not
    // offered (a full handshake).
    if let Some(session) = offered.and_then(|der| SslSession::from_der(&der).ok()) {
        boring_ffi::offer_session(config, &session)?;
    }
    config.set_ex_data(index, slot.clone());
    Ok(())
}

/// BoringSSL connections shaped like a given ClientHello.
pub struct BoringClient {
    roots: X509Store,
    connectors: moka::sync::Cache<u64, Arc<Prepared>>,
}

impl std::fmt::Debug for BoringClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoringClient")
            .field("connectors", &self.connectors.entry_count())
            .finish_non_exhaustive()
    }
}

impl BoringClient {
    /// A client trusting the public web roots plus `extra_ca_files`.
    pub fn new(extra_ca_files: &[PathBuf]) -> Result<BoringClient, TlsSetupError> {
        let mut roots = X509StoreBuilder::new().map_err(boring_error)?;
        for der in super::unconstrained_roots() {
            // A root BoringSSL cannot read is skipped: the others still work.
            if let Ok(cert) = X509::from_der(der) {
                let _ = roots.add_cert(cert);
            }
        }
        for path in extra_ca_files {
            add_ca_file(&mut roots, path)?;
        }
        Ok(BoringClient {
            roots: roots.build(),
            connectors: moka::sync::Cache::new(MAX_CONNECTORS),
        })
    }

    /// Runs a handshake with `host` over `transport` whose ClientHello is
    /// shaped like `shape.hello`. Also returns what could not be mirrored.
    pub async fn connect<T>(
        &self,
        host: &str,
        transport: T,
        shape: Shape<'_>,
    ) -> io::Result<(TlsConn, Arc<[Gap]>)>
    where
        T: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    {
        let prepared = self.prepared(shape).map_err(io::Error::other)?;
        let mut config: ConnectConfiguration =
            prepared.connector.configure().map_err(io::Error::other)?;
        // A server name only where the client sent one; the certificate is
        // checked against `host` either way.
        config.set_use_server_name_indication(shape.hello.has_extension(ext::SERVER_NAME));
        let ssl = &mut *config;
        if !prepared.key_shares.is_empty() {
            boring_ffi::set_client_key_shares(ssl, &prepared.key_shares)
                .map_err(io::Error::other)?;
        }
        for (protocol, new_codepoint) in &prepared.alps {
            let settings = if protocol.as_slice() == b"h2" {
                shape.alps_settings
            } else {
                &[]
            };
            boring_ffi::add_application_settings(ssl, protocol, settings, *new_codepoint)
                .map_err(io::Error::other)?;
        }
        if let Some(ids) = &prepared.trust_anchors {
            boring_ffi::set_requested_trust_anchors(ssl, ids).map_err(io::Error::other)?;
        }
        if prepared.ech_grease {
            config.set_enable_ech_grease(true);
        }
        if let Some(slot) = shape.sessions {
            resume_from(slot, &mut config).map_err(io::Error::other)?;
        }
        let sent = SentHello::default();
        let transport = ReadAhead::new(transport);
        let stream = tokio_boring::connect(config, host, HelloTap::new(transport, sent.clone()))
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let h2 = stream.ssl().selected_alpn_protocol() == Some(b"h2");
        let resumed = stream.ssl().session_reused();
        let sent = sent.lock().ok().and_then(|mut s| s.take());
        Ok((
            TlsConn::new(Box::new(ReadGate::new(stream)), h2)
                .with_sent_hello(sent)
                .with_resumed(resumed),
            prepared.gaps.clone(),
        ))
    }

    /// What BoringSSL cannot say of `shape`'s hello (an error when it
    /// cannot be configured at all).
    pub fn gaps(&self, shape: Shape<'_>) -> Result<Arc<[Gap]>, String> {
        self.prepared(shape).map(|p| p.gaps.clone())
    }

    fn prepared(&self, shape: Shape<'_>) -> Result<Arc<Prepared>, String> {
        let mut hasher = DefaultHasher::new();
        shape.hello.hash(&mut hasher);
        shape.http1_only.hash(&mut hasher);
        let key = hasher.finish();
        self.connectors
            .try_get_with(key, || prepare(&self.roots, shape).map(Arc::new))
            .map_err(|e| (*e).clone())
    }
}

fn boring_error(e: boring::error::ErrorStack) -> TlsSetupError {
    TlsSetupError::Boring(e.to_string())
}

fn add_ca_file(roots: &mut X509StoreBuilder, path: &Path) -> Result<(), TlsSetupError> {
    let error = |reason: String| TlsSetupError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no PEM certificate in the file".into()));
    }
    for cert in certs {
        roots.add_cert(cert).map_err(|e| error(e.to_string()))?;
    }
    Ok(())
}

/// Builds the connector for `shape`.
fn prepare(roots: &X509Store, shape: Shape<'_>) -> Result<Prepared, String> {
    let hello = shape.hello;
    let mut gaps = Vec::new();
    let mut gap = |kind: &'static str, detail: String| gaps.push(Gap { kind, detail });
    let mut builder = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
    builder.set_cert_store_ref(roots);
    // Sessions go to the connection's own slot, never to a cache of the
    // connector's (one connector serves every lane presenting its hello).
    builder.set_session_cache_mode(SslSessionCacheMode::CLIENT | SslSessionCacheMode::NO_INTERNAL);
    builder.set_new_session_callback(keep_session);

    // Versions: the contiguous range the client lists.
    let versions: Vec<u16> = hello
        .supported_versions
        .clone()
        .unwrap_or_else(|| vec![hello.legacy_version])
        .into_iter()
        .filter(|v| !is_grease(*v))
        .collect();
    let version = |v: u16| match v {
        0x0301 => Some(SslVersion::TLS1),
        0x0302 => Some(SslVersion::TLS1_1),
        0x0303 => Some(SslVersion::TLS1_2),
        0x0304 => Some(SslVersion::TLS1_3),
        _ => None,
    };
    let known: Vec<u16> = versions
        .iter()
        .copied()
        .filter(|v| version(*v).is_some())
        .collect();
    for &v in versions.iter().filter(|v| version(**v).is_none()) {
        gap("version", format!("version {v:#06x}"));
    }
    let low = known.iter().min().copied().and_then(version);
    let high = known.iter().max().copied().and_then(version);
    builder
        .set_min_proto_version(low)
        .map_err(|e| e.to_string())?;
    builder
        .set_max_proto_version(high)
        .map_err(|e| e.to_string())?;
    let offers_tls12 = versions.iter().any(|v| *v <= 0x0303);

    // Ciphers: TLS 1.2 suites by name in the client's order; BoringSSL
    // orders the TLS 1.3 ones itself (AES-GCM first with AES hardware).
    let mut names = Vec::new();
    let mut tls13 = Vec::new();
    for &id in hello.cipher_suites.iter().filter(|c| !is_grease(**c)) {
        if (0x1301..=0x1303).contains(&id) {
            tls13.push(id);
        } else if let Some(name) = cipher_name(id) {
            names.push(name);
        } else {
            gap("cipher", format!("cipher {id:#06x}"));
        }
    }
    if !tls13.is_empty() && tls13 != [0x1301, 0x1302, 0x1303] {
        gap(
            "tls13-order",
            format!("TLS 1.3 suite order {tls13:04x?} (BoringSSL sends 1301,1302,1303)"),
        );
    }
    if !names.is_empty() {
        builder
            .set_cipher_list(&names.join(":"))
            .map_err(|e| e.to_string())?;
    }

    // Groups and key shares. Each group once (BoringSSL refuses a list
    // with a repeat), probed alone (it refuses a whole list for one name
    // it does not know).
    let mut group_names = Vec::new();
    let mut groups = Vec::new();
    for id in first_of_each(hello.supported_groups.iter().flatten(), &mut gap, "group") {
        match group_name(id).filter(|name| builder.set_curves_list(name).is_ok()) {
            Some(name) => {
                group_names.push(name);
                groups.push(id);
            }
            None => gap("group", format!("group {id:#06x}")),
        }
    }
    if !group_names.is_empty() {
        builder
            .set_curves_list(&group_names.join(":"))
            .map_err(|e| e.to_string())?;
    }
    // Key shares must follow the groups' order, each once, for groups
    // listed: BoringSSL refuses any other list at every connection.
    let wanted_shares: Vec<u16> = hello
        .key_share_groups
        .iter()
        .flatten()
        .copied()
        .filter(|g| !is_grease(*g))
        .collect();
    let key_shares: Vec<u16> = groups
        .iter()
        .copied()
        .filter(|g| wanted_shares.contains(g))
        .collect();
    let wanted_known: Vec<u16> = wanted_shares
        .iter()
        .copied()
        .filter(|g| group_name(*g).is_some())
        .collect();
    if key_shares != wanted_known {
        gap(
            "key-share",
            format!(
                "key shares {wanted_known:04x?} (BoringSSL sends them in the groups' order, each \
                 once, for listed groups: {key_shares:04x?})"
            ),
        );
    }

    // Signature algorithms, in order; ids BoringSSL does not know are left
    // out (it refuses the whole list otherwise).
    let wanted = first_of_each(
        hello.signature_algorithms.iter().flatten(),
        &mut gap,
        "signature-algorithm",
    );
    let mut known = Vec::new();
    for &id in &wanted {
        let one = [SslSignatureAlgorithm::from(id)];
        if builder.set_verify_algorithm_prefs(&one).is_ok() {
            known.push(one[0]);
        } else {
            gap(
                "signature-algorithm",
                format!("signature algorithm {id:#06x}"),
            );
        }
    }
    if !known.is_empty() {
        builder
            .set_verify_algorithm_prefs(&known)
            .map_err(|e| e.to_string())?;
    }

    // ALPN, exactly as listed (only `http/1.1` when this connection must
    // be HTTP/1.1); none for a client that offers none, which speaks
    // HTTP/1.1 without it.
    let alpn: Vec<Vec<u8>> = match &hello.alpn {
        None => Vec::new(),
        Some(_) if shape.http1_only => vec![b"http/1.1".to_vec()],
        Some(listed) => listed.clone(),
    };
    if !alpn.is_empty() {
        let mut wire = Vec::new();
        for protocol in &alpn {
            if let Ok(len) = u8::try_from(protocol.len()) {
                wire.push(len);
                wire.extend_from_slice(protocol);
            }
        }
        builder.set_alpn_protos(&wire).map_err(|e| e.to_string())?;
    }

    // GREASE, and extension order: a client that GREASEs (Chrome and its
    // kin) permutes its extensions on every connection; BoringSSL can do
    // the same, but cannot reproduce a fixed order of another library.
    let greases = hello.greases();
    builder.set_grease_enabled(greases);
    builder.set_permute_extensions(greases);
    if !greases {
        gap(
            "extension-order",
            "the client's fixed extension order (BoringSSL uses its own)".into(),
        );
    }

    // Certificate compression, in the client's order, each once.
    for id in first_of_each(
        hello.compress_certificate.iter().flatten(),
        &mut gap,
        "certificate-compression",
    ) {
        let added = match id {
            1 => builder
                .add_certificate_compression_algorithm(Zlib)
                .map_err(|e| e.to_string()),
            2 => builder
                .add_certificate_compression_algorithm(Brotli)
                .map_err(|e| e.to_string()),
            _ if is_grease(id) => Ok(()),
            _ => {
                gap(
                    "certificate-compression",
                    format!("certificate compression {id}"),
                );
                Ok(())
            }
        };
        added?;
    }

    if hello.status_request() {
        builder.enable_ocsp_stapling();
    }
    if hello.signed_certificate_timestamp() {
        builder.enable_signed_cert_timestamps();
    }
    if hello.session_ticket() == SessionTicket::Absent {
        builder.set_options(SslOptions::NO_TICKET);
    }

    // What BoringSSL adds or leaves out by itself.
    for (present, kind, what) in [
        (
            hello.encrypt_then_mac(),
            ext::ENCRYPT_THEN_MAC,
            "encrypt_then_mac",
        ),
        (
            hello.post_handshake_auth(),
            ext::POST_HANDSHAKE_AUTH,
            "post_handshake_auth",
        ),
        (
            hello.record_size_limit.is_some(),
            ext::RECORD_SIZE_LIMIT,
            "record_size_limit",
        ),
        (
            hello.delegated_credentials.is_some(),
            ext::DELEGATED_CREDENTIALS,
            "delegated_credentials",
        ),
    ] {
        if present {
            gap("extension", format!("extension {kind} ({what})"));
        }
    }
    if offers_tls12 && !hello.renegotiation_info() {
        gap(
            "extension",
            "renegotiation_info is sent (BoringSSL always sends it with TLS 1.2)".into(),
        );
    }
    if offers_tls12 && !hello.extended_master_secret() {
        gap(
            "extension",
            "extended_master_secret is sent (BoringSSL always sends it with TLS 1.2)".into(),
        );
    }
    if versions.contains(&0x0304) && hello.psk_key_exchange_modes.is_none() {
        gap(
            "extension",
            "psk_key_exchange_modes is sent (BoringSSL always sends it with TLS 1.3)".into(),
        );
    }
    for extension in &hello.extensions {
        let kind = extension.kind;
        if !is_grease(kind) && !boring_speaks(kind) {
            gap("extension", format!("extension {kind}"));
        }
    }

    let alps = hello
        .alps
        .iter()
        .flat_map(|a| {
            a.protocols
                .iter()
                .map(move |p| (p.clone(), a.codepoint == ext::ALPS))
        })
        .filter(|(p, _)| !shape.http1_only || p.as_slice() == b"http/1.1")
        .collect();
    let trust_anchors = hello
        .extension(TRUST_ANCHORS)
        .and_then(|e| e.data.as_deref())
        .and_then(|body| body.get(2..))
        .map(<[u8]>::to_vec);
    Ok(Prepared {
        connector: builder.build(),
        key_shares,
        alps,
        trust_anchors,
        ech_grease: hello.ech(),
        gaps: super::bounded_gaps(gaps),
    })
}

/// trust_anchors (draft-ietf-tls-trust-anchor-ids), which Chrome sends.
const TRUST_ANCHORS: u16 = 0xca34;

/// Whether BoringSSL sends extension `kind` when configured to.
/// (Not padding: BoringSSL adds a one-byte padding extension only when its
/// last extension would otherwise be empty, and never pads to 512 bytes as
/// OpenSSL does, so a client's padding is a gap.)
fn boring_speaks(kind: u16) -> bool {
    matches!(
        kind,
        ext::SERVER_NAME
            | ext::STATUS_REQUEST
            | ext::SUPPORTED_GROUPS
            | ext::EC_POINT_FORMATS
            | ext::SIGNATURE_ALGORITHMS
            | ext::ALPN
            | ext::SCT
            | ext::EXTENDED_MASTER_SECRET
            | ext::COMPRESS_CERTIFICATE
            | ext::SESSION_TICKET
            | ext::PRE_SHARED_KEY
            | ext::EARLY_DATA
            | ext::SUPPORTED_VERSIONS
            | ext::COOKIE
            | ext::PSK_KEY_EXCHANGE_MODES
            | ext::ENCRYPT_THEN_MAC
            | ext::POST_HANDSHAKE_AUTH
            | ext::RECORD_SIZE_LIMIT
            | ext::DELEGATED_CREDENTIALS
            | KEY_SHARE
            | ext::ALPS_OLD
            | ext::ALPS
            | ECH
            | TRUST_ANCHORS
            | RENEGOTIATION_INFO
    )
}

const KEY_SHARE: u16 = 51;
const ECH: u16 = 0xfe0d;
const RENEGOTIATION_INFO: u16 = 0xff01;

/// BoringSSL's name of a TLS 1.2 cipher suite id.
fn cipher_name(id: u16) -> Option<&'static str> {
    Some(match id {
        0x000a => "DES-CBC3-SHA",
        0x002f => "AES128-SHA",
        0x0035 => "AES256-SHA",
        0x008c => "PSK-AES128-CBC-SHA",
        0x008d => "PSK-AES256-CBC-SHA",
        0x009c => "AES128-GCM-SHA256",
        0x009d => "AES256-GCM-SHA384",
        0xc009 => "ECDHE-ECDSA-AES128-SHA",
        0xc00a => "ECDHE-ECDSA-AES256-SHA",
        0xc013 => "ECDHE-RSA-AES128-SHA",
        0xc014 => "ECDHE-RSA-AES256-SHA",
        0xc023 => "ECDHE-ECDSA-AES128-SHA256",
        0xc027 => "ECDHE-RSA-AES128-SHA256",
        0xc02b => "ECDHE-ECDSA-AES128-GCM-SHA256",
        0xc02c => "ECDHE-ECDSA-AES256-GCM-SHA384",
        0xc02f => "ECDHE-RSA-AES128-GCM-SHA256",
        0xc030 => "ECDHE-RSA-AES256-GCM-SHA384",
        0xc035 => "ECDHE-PSK-AES128-CBC-SHA",
        0xc036 => "ECDHE-PSK-AES256-CBC-SHA",
        0xcca8 => "ECDHE-RSA-CHACHA20-POLY1305",
        0xcca9 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        0xccac => "ECDHE-PSK-CHACHA20-POLY1305",
        _ => return None,
    })
}

/// The non-GREASE ids of a list, each at its first place: BoringSSL
/// refuses a list that names one twice, so a repeat is left out, as a gap
/// of `kind`.
fn first_of_each<'a>(
    ids: impl Iterator<Item = &'a u16>,
    gap: &mut impl FnMut(&'static str, String),
    kind: &'static str,
) -> Vec<u16> {
    let mut kept: Vec<u16> = Vec::new();
    for &id in ids {
        if is_grease(id) {
            continue;
        }
        if kept.contains(&id) {
            gap(kind, format!("{kind} {id:#06x} listed twice"));
        } else {
            kept.push(id);
        }
    }
    kept
}

/// BoringSSL's name of a named group id.
fn group_name(id: u16) -> Option<&'static str> {
    Some(match id {
        0x0017 => "P-256",
        0x0018 => "P-384",
        0x0019 => "P-521",
        0x001d => "X25519",
        0x11ec => "X25519MLKEM768",
        0x6399 => "X25519Kyber768Draft00",
        0x0202 => "MLKEM1024",
        _ => return None,
    })
}

/// Most bytes a compressed certificate chain may inflate to (TLS caps a
/// handshake message at 2^24 bytes). The decoders stream into the buffer
/// BoringSSL sized from the message's stated length, and stop with an
/// error where it is full: a bomb costs neither memory nor time past that.
const MAX_CERTIFICATE_CHAIN: u64 = 1 << 24;

/// Decompresses brotli-compressed certificates (RFC 8879).
struct Brotli;

impl CertificateCompressor for Brotli {
    const ALGORITHM: CertificateCompressionAlgorithm = CertificateCompressionAlgorithm::BROTLI;
    const CAN_COMPRESS: bool = false;
    const CAN_DECOMPRESS: bool = true;

    fn decompress<W: io::Write>(&self, input: &[u8], output: &mut W) -> io::Result<()> {
        without_unwinding(|| {
            let mut decoder =
                brotli_decompressor::Decompressor::new(input, 4096).take(MAX_CERTIFICATE_CHAIN);
            io::copy(&mut decoder, output).map(drop)
        })
    }
}

/// Decompresses zlib-compressed certificates (RFC 8879).
struct Zlib;

impl CertificateCompressor for Zlib {
    const ALGORITHM: CertificateCompressionAlgorithm = CertificateCompressionAlgorithm::ZLIB;
    const CAN_COMPRESS: bool = false;
    const CAN_DECOMPRESS: bool = true;

    fn decompress<W: io::Write>(&self, input: &[u8], output: &mut W) -> io::Result<()> {
        without_unwinding(|| {
            let mut decoder = flate2::read::ZlibDecoder::new(input).take(MAX_CERTIFICATE_CHAIN);
            io::copy(&mut decoder, output).map(drop)
        })
    }
}

/// Runs a decompression of an origin's bytes inside BoringSSL's callback,
/// which does not catch a panic: one unwinding into C would abort the
/// whole daemon, so a decompressor's panic fails this handshake instead.
fn without_unwinding(decompress: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decompress))
        .unwrap_or_else(|_| Err(io::Error::other("the certificate decompressor failed")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::client_hello::ClientHello;

    /// A decompressor that panics on an origin's bytes fails the
    /// handshake; the panic does not unwind into BoringSSL.
    #[test]
    #[allow(clippy::panic)]
    fn a_panicking_decompressor_is_an_error() {
        let failed = without_unwinding(|| panic!("a decompressor bug"));
        assert_eq!(failed.unwrap_err().kind(), io::ErrorKind::Other);
        assert!(without_unwinding(|| Ok(())).is_ok());
    }

    #[test]
    fn a_compressed_certificate_inflates_into_its_stated_length_and_no_further() {
        use std::io::Write as _;
        let zlib = |data: &[u8]| {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(data).unwrap();
            encoder.finish().unwrap()
        };
        let chain = b"a certificate chain, as the origin sent it".to_vec();
        let mut exact = vec![0u8; chain.len()];
        Zlib.decompress(&zlib(&chain), &mut io::Cursor::new(&mut exact[..]))
            .unwrap();
        assert_eq!(exact, chain);
        // A megabyte of zeros stated as 100 bytes: refused where the
        // buffer ends (it used to be inflated whole first).
        let bomb = zlib(&vec![0; 1 << 20]);
        let mut stated = [0u8; 100];
        let refused = Zlib.decompress(&bomb, &mut io::Cursor::new(&mut stated[..]));
        assert_eq!(refused.map_err(|e| e.kind()), Err(io::ErrorKind::WriteZero));
    }

    fn hello(fixture: &str) -> ClientHello {
        crate::upstream::tls::tests::fixture(fixture)
    }

    fn gaps(fixture: &str) -> Vec<String> {
        let hello = hello(fixture);
        let roots = X509StoreBuilder::new().map(|b| b.build());
        let Ok(roots) = roots else {
            panic!("no X509 store");
        };
        let shape = Shape {
            hello: &hello,
            http1_only: false,
            alps_settings: &[],
            sessions: None,
        };
        match prepare(&roots, shape) {
            Ok(prepared) => prepared.gaps.iter().map(|g| g.detail.clone()).collect(),
            Err(e) => panic!("{fixture}: {e}"),
        }
    }

    /// A client that offers no ALPN gets none offered for it, also on a
    /// connection that must be HTTP/1.1 (a WebSocket's), where BoringSSL
    /// used to offer `http/1.1`.
    #[tokio::test]
    async fn no_alpn_is_offered_for_a_client_that_offers_none() {
        let hello = hello("python_ssl");
        assert_eq!(hello.alpn, None, "the fixture offers no ALPN");
        let sent = sent_to_localhost(&hello, true).await;
        assert_eq!(sent.alpn, None);
    }

    /// Lists BoringSSL refuses as they stand (a group, signature algorithm
    /// or compression named twice, a group it lacks, key shares out of the
    /// groups' order) are said as far as it can, with gaps, and the
    /// handshake goes through: they used to fail every connection of that
    /// client.
    #[tokio::test]
    async fn lists_boringssl_refuses_are_said_as_far_as_it_can() {
        let mut odd = hello("chromium_1");
        // X25519 twice, P-224 (0x0015), then P-256; shares P-256 before X25519.
        odd.supported_groups = Some(vec![0x001d, 0x001d, 0x0015, 0x0017]);
        odd.key_share_groups = Some(vec![0x0017, 0x001d]);
        let sigalgs = odd.signature_algorithms.get_or_insert_with(Vec::new);
        if let Some(&first) = sigalgs.first() {
            sigalgs.push(first);
        }
        odd.compress_certificate = Some(vec![2, 2]);
        let roots = X509StoreBuilder::new().map(|b| b.build());
        let Ok(roots) = roots else {
            panic!("no X509 store");
        };
        let shape = Shape {
            hello: &odd,
            http1_only: false,
            alps_settings: &[],
            sessions: None,
        };
        let gaps: Vec<String> = match prepare(&roots, shape) {
            Ok(prepared) => prepared.gaps.iter().map(|g| g.detail.clone()).collect(),
            Err(e) => panic!("refused: {e}"),
        };
        for said in [
            "group 0x001d listed twice",
            "group 0x0015",
            "key shares",
            "listed twice",
        ] {
            assert!(gaps.iter().any(|g| g.contains(said)), "{said}: {gaps:?}");
        }
        let sent = sent_to_localhost(&odd, false).await;
        let plain = |ids: Option<Vec<u16>>| -> Vec<u16> {
            ids.into_iter()
                .flatten()
                .filter(|id| !is_grease(*id))
                .collect()
        };
        assert_eq!(plain(sent.supported_groups), [0x001d, 0x0017]);
        assert_eq!(plain(sent.key_share_groups), [0x001d, 0x0017]);
    }

    /// A client that sends no server name gets none sent for it, though
    /// pinproxy dials (and checks the certificate of) a named host.
    #[tokio::test]
    async fn no_server_name_is_sent_for_a_client_that_sends_none() {
        let mut nameless = hello("chromium_1");
        assert!(nameless.has_extension(ext::SERVER_NAME));
        nameless.extensions.retain(|e| e.kind != ext::SERVER_NAME);
        nameless.server_name = None;
        let sent = sent_to_localhost(&nameless, false).await;
        assert!(
            !sent.has_extension(ext::SERVER_NAME),
            "{:?}",
            sent.server_name
        );
        // With one, the dialled host's name goes.
        let sent = sent_to_localhost(&hello("chromium_1"), false).await;
        assert_eq!(sent.server_name.as_deref(), Some("localhost"));
    }

    /// A client trusting a fresh test PKI, a listener on 127.0.0.1 and a
    /// rustls acceptor serving that PKI's `localhost` leaf.
    async fn client_and_server() -> (
        BoringClient,
        tokio::net::TcpListener,
        tokio_rustls::TlsAcceptor,
    ) {
        use crate::upstream::tls::tests::{acceptor, pki};
        let pki = pki();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap_or_else(|e| panic!("{e}"));
        // The CA file is read here: the directory may go.
        let client = BoringClient::new(&[ca_file]).unwrap_or_else(|e| panic!("{e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (client, listener, acceptor(&pki, false))
    }

    /// A connection of `client` to the server at `addr` (shaped by `hello`,
    /// keeping its sessions in `sessions`) that has sent a byte and read
    /// its echo: the tickets the server sent before it are taken.
    async fn echoed_connection(
        client: &BoringClient,
        addr: std::net::SocketAddr,
        hello: &ClientHello,
        http1_only: bool,
        sessions: Option<&Arc<SessionSlot>>,
    ) -> TlsConn {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let shape = Shape {
            hello,
            http1_only,
            alps_settings: &[],
            sessions,
        };
        let (mut conn, _) = client
            .connect("localhost", tcp, shape)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        conn.write_all(b"x").await.unwrap_or_else(|e| panic!("{e}"));
        conn.flush().await.unwrap_or_else(|e| panic!("{e}"));
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        conn
    }

    /// Serves `connections` TLS connections (their handshakes done by
    /// `acceptor`), each echoing one byte, so that the client reads (and
    /// BoringSSL takes the tickets sent before it).
    async fn echo_bytes(
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        connections: usize,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        for _ in 0..connections {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut byte = [0u8; 1];
            if tls.read_exact(&mut byte).await.is_ok() {
                let _ = tls.write_all(&byte).await;
                let _ = tls.flush().await;
            }
        }
    }

    /// The hello BoringSSL sends for `hello` in a handshake with a local
    /// server named `localhost`.
    async fn sent_to_localhost(hello: &ClientHello, http1_only: bool) -> ClientHello {
        let (client, listener, acceptor) = client_and_server().await;
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            acceptor.accept(tcp).await.map(drop)
        });
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let shape = Shape {
            hello,
            http1_only,
            alps_settings: &[],
            sessions: None,
        };
        let (conn, _) = client
            .connect("localhost", tcp, shape)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let served = server.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(served.is_ok(), "{served:?}");
        conn.sent_hello()
            .cloned()
            .unwrap_or_else(|| panic!("no hello recorded"))
    }

    /// A connection given a slot offers the session the slot keeps (and
    /// keeps the ones its origin issues there); one without a slot, one
    /// with another slot and one made by another connector (a WebSocket's
    /// HTTP/1.1-only hello) run full handshakes. A TLS 1.3 ticket is
    /// offered once. The resumed hello is the fresh one with a
    /// pre_shared_key: the same JA4 once that is taken out. Two tickets
    /// are kept, so two connections opened at once both resume. A slot's
    /// session passed to another goes to that one alone.
    #[tokio::test]
    async fn a_connection_resumes_the_session_its_slot_keeps_and_no_other() {
        use crate::fingerprint::ja4::ja4;
        let (client, listener, acceptor) = client_and_server().await;
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        // rustls issues TLS 1.3 tickets after each handshake; each
        // connection echoes one byte, so that the client reads (and
        // BoringSSL takes the tickets that came before it).
        let server = tokio::spawn(echo_bytes(listener, acceptor, 11));
        let hello = hello("chromium_1");
        let connect = |sessions: Option<Arc<SessionSlot>>, http1_only: bool| {
            let client = &client;
            let hello = &hello;
            async move {
                let conn =
                    echoed_connection(client, addr, hello, http1_only, sessions.as_ref()).await;
                let sent = conn.sent_hello().cloned();
                let sent = sent.unwrap_or_else(|| panic!("no hello recorded"));
                (conn.resumed(), sent)
            }
        };
        let slot = Arc::new(SessionSlot::default());

        let (resumed, first) = connect(Some(slot.clone()), false).await;
        assert!(!resumed && !first.pre_shared_key(), "nothing to resume yet");
        assert!(slot.holds(), "the origin's ticket is kept");

        let (resumed, second) = connect(Some(slot.clone()), false).await;
        assert!(resumed, "the second connection resumes");
        assert!(second.pre_shared_key());
        assert_eq!(ja4(&second.without_resumption()), ja4(&first));
        assert_ne!(ja4(&second), ja4(&first), "JA4 counts the extension");
        assert!(slot.holds(), "the ticket of the resumed connection is kept");

        let (resumed, without) = connect(None, false).await;
        assert!(!resumed && !without.pre_shared_key(), "no slot: no session");
        let (resumed, other) = connect(Some(Arc::new(SessionSlot::default())), false).await;
        assert!(
            !resumed && !other.pre_shared_key(),
            "another slot's session"
        );
        let (resumed, websocket) = connect(Some(slot.clone()), true).await;
        assert!(
            !resumed && !websocket.pre_shared_key(),
            "another connector's session"
        );
        // That connection's own ticket took the slot: the next connection
        // of the first connector finds none of its own.
        let (resumed, _) = connect(Some(slot.clone()), false).await;
        assert!(!resumed, "a session of another connector is never offered");

        // The origin sends two tickets after a handshake: two connections
        // opened at once both resume, as Chrome's do.
        let pair = Arc::new(SessionSlot::default());
        let _ = connect(Some(pair.clone()), false).await;
        let (one, two) = tokio::join!(
            connect(Some(pair.clone()), false),
            connect(Some(pair.clone()), false)
        );
        assert!(one.0 && two.0, "both resume: {} {}", one.0, two.0);

        // A founding connection's session passed on (to the identity its
        // answer founded) leaves its slot: the heir resumes it, and a
        // second heir gets nothing.
        let founding = Arc::new(SessionSlot::default());
        let _ = connect(Some(founding.clone()), false).await;
        let heir = Arc::new(SessionSlot::default());
        founding.pass_to(&heir);
        assert!(!founding.holds() && heir.holds());
        let second_heir = SessionSlot::default();
        founding.pass_to(&second_heir);
        assert!(!second_heir.holds(), "one heir only");
        let (resumed, _) = connect(Some(heir), false).await;
        assert!(
            resumed,
            "the heir resumes the founding connection's session"
        );
        server.await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// The origin chooses a session's size: one past the bound is not
    /// kept (here a 60 KB ticket), and the next connection runs a full
    /// handshake.
    #[tokio::test]
    async fn an_oversized_session_is_not_kept() {
        #[derive(Debug)]
        struct Padded;
        impl rustls::server::ProducesTickets for Padded {
            fn enabled(&self) -> bool {
                true
            }
            fn lifetime(&self) -> u32 {
                3600
            }
            fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
                let mut ticket = plain.to_vec();
                ticket.resize(60_000, 0);
                Some(ticket)
            }
            fn decrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
                None
            }
        }
        let (client, listener, acceptor) = client_and_server().await;
        let mut config = (**acceptor.config()).clone();
        config.ticketer = Arc::new(Padded);
        config.send_tls13_tickets = 1;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(echo_bytes(listener, acceptor, 1));
        let hello = hello("chromium_1");
        let slot = Arc::new(SessionSlot::default());
        echoed_connection(&client, addr, &hello, false, Some(&slot)).await;
        assert!(!slot.holds(), "a 60 KB ticket is not kept");
        server.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn chromium_has_no_gap() {
        assert_eq!(gaps("chromium_1"), Vec::<String>::new());
        assert_eq!(gaps("chromium_2"), Vec::<String>::new());
    }

    #[test]
    fn openssl_padding_is_reported_as_a_gap() {
        let gaps = gaps("curl_h2");
        assert!(gaps.iter().any(|g| g == "extension 21"), "{gaps:?}");
        assert!(gaps.iter().any(|g| g == "cipher 0xccaa"), "{gaps:?}");
    }
}
