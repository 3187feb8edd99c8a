//! The OpenSSL upstream stack: the system's own OpenSSL (loaded at run time
//! by [`super::openssl_ffi`]) says the ClientHello of a client built on
//! OpenSSL (curl, Python, Node), which BoringSSL cannot: cipher 0xccaa and
//! the other DHE, CBC-SHA384, ARIA and CCM suites, the renegotiation SCSV,
//! encrypt_then_mac (22), post_handshake_auth (49), OpenSSL's signature
//! algorithms (ed448, rsa_pss_pss_*, SHA-224, DSA), x448 and the ffdhe
//! groups, and OpenSSL's padding to 512 bytes. With the same OpenSSL as
//! the client (same machine, same 3.0.x) the hello is the client's, byte
//! for byte but the random, key share and session id.
//!
//! From a recorded hello ([`Shape`]) an `SSL_CTX` is configured: versions,
//! the TLS 1.2 cipher list and the TLS 1.3 suites in the client's order,
//! groups, signature algorithms, ALPN, encrypt_then_mac,
//! extended_master_secret, post_handshake_auth, session_ticket, padding,
//! status_request and the session id length. What OpenSSL would then send
//! is not assumed: one ClientHello is written into a memory BIO (no
//! network) and compared with the client's, and every difference is a
//! [`Gap`] (GREASE, ALPS, certificate compression on OpenSSL 3.0, key
//! shares other than OpenSSL's choice, ...). The context and its gaps are
//! cached per distinct hello, like the BoringSSL stack's connectors.
//!
//! Extension order: identities record their hello with the extensions in
//! type order ([`ClientHello::fresh_and_anonymous`]), so the client's own
//! order cannot be compared; OpenSSL sends its one fixed order, which is
//! the order of every OpenSSL client of the same version. A client that
//! GREASEs permutes its extensions per connection, which OpenSSL cannot:
//! that is reported as an `extension-order` gap.
//!
//! The handshake and the records run over any async transport by pumping
//! the `SSL`'s two memory BIOs ([`OpensslStream`]); nothing blocks, and at
//! most one TLS record of ciphertext is buffered each way beyond what
//! OpenSSL holds.

use std::collections::hash_map::DefaultHasher;
use std::future::poll_fn;
use std::hash::{Hash as _, Hasher as _};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::openssl_ffi::{self, op, Ctx, Ssl, Step, Store};
use super::tap::{HelloTap, SentHello};
use super::{Gap, KeptSession as Kept, SessionSlot, Shape, TlsConn, TlsSetupError};
use crate::fingerprint::client_hello::{self, ext, is_grease, is_grease_alpn, ClientHello};

/// Most distinct hellos whose contexts are kept.
const MAX_CONTEXTS: u64 = 1024;
/// Most plaintext bytes encrypted per write: one full TLS record.
const MAX_PLAINTEXT_CHUNK: usize = 16 * 1024;
/// Ciphertext buffers: one largest TLS record (16 KiB of plaintext plus
/// header, padding and tag) each way.
const RECORD_BUF: usize = 16 * 1024 + 2048;
/// Most steps one poll takes before it yields; each step moves bytes or
/// ends, so this only bounds the work done per wake-up.
const MAX_STEPS: usize = 64;

/// Most ciphertext for the peer that may wait unwritten while the stream
/// still reads from it: a few records' worth.
const MAX_UNSENT: usize = 64 * 1024;
/// The SNI the trial hello carries (only its presence matters to the
/// comparison; padding, whose size follows the name's length, is not
/// compared).
const TRIAL_SNI: &str = "pinproxy.invalid";

/// A configured context for one hello, and what it cannot say.
struct Prepared {
    ctx: Ctx,
    /// Send SNI (the client did).
    sni: bool,
    gaps: Arc<[Gap]>,
}

/// A session an origin issued on a connection, with the context (the
/// `SSL_CTX`) that made the connection: offered only on that context's
/// connections. Reused until the origin issues a newer one, as OpenSSL
/// clients that resume (Node's agent) do.
pub(super) struct KeptSession {
    session: openssl_ffi::SavedSession,
    prepared: Arc<Prepared>,
}

/// Where a connection keeps the sessions its origin issues.
struct Keep {
    slot: Arc<SessionSlot>,
    prepared: Arc<Prepared>,
    /// The address of the connection's session last kept (0: none yet).
    seen: usize,
}

/// OpenSSL connections shaped like a given ClientHello.
pub struct OpensslClient {
    roots: Store,
    version: &'static str,
    contexts: moka::sync::Cache<u64, Arc<Prepared>>,
}

impl std::fmt::Debug for OpensslClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpensslClient")
            .field("version", &self.version)
            .field("contexts", &self.contexts.entry_count())
            .finish_non_exhaustive()
    }
}

impl OpensslClient {
    /// A client trusting the public web roots plus `extra_ca_files` (the
    /// same roots as the BoringSSL stack), or `None` when this machine has
    /// no usable `libssl.so.3`; which OpenSSL was loaded, or why none, is
    /// logged. Blocking (reads files).
    pub fn new(extra_ca_files: &[PathBuf]) -> Result<Option<OpensslClient>, TlsSetupError> {
        let version = match openssl_ffi::version() {
            Ok(version) => version,
            Err(why) => {
                tracing::info!(
                    reason = %why,
                    "upstream TLS: no system OpenSSL; OpenSSL-family clients (curl, Python, Node) are mirrored by BoringSSL, with gaps"
                );
                return Ok(None);
            }
        };
        let mut roots = Store::new().map_err(setup_error)?;
        for der in super::unconstrained_roots() {
            // A root this OpenSSL cannot read is skipped: the others work.
            let _ = roots.add_der(der);
        }
        for path in extra_ca_files {
            add_ca_file(&mut roots, path)?;
        }
        tracing::info!(
            openssl = version,
            "upstream TLS: the system's OpenSSL speaks for OpenSSL-family clients (curl, Python, Node) in mirror mode"
        );
        Ok(Some(OpensslClient {
            roots,
            version,
            contexts: moka::sync::Cache::new(MAX_CONTEXTS),
        }))
    }

    /// What OpenSSL cannot say of `shape`'s hello (an error when it cannot
    /// be configured at all).
    pub fn gaps(&self, shape: Shape<'_>) -> Result<Arc<[Gap]>, String> {
        self.prepared(shape).map(|p| p.gaps.clone())
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
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let prepared = self.prepared(shape).map_err(io::Error::other)?;
        let mut ssl = Ssl::new(&prepared.ctx).map_err(io::Error::other)?;
        // Clients send no SNI for an address, and OpenSSL would.
        if prepared.sni && host.parse::<IpAddr>().is_err() {
            ssl.set_sni(host).map_err(io::Error::other)?;
        }
        ssl.set_verify_host(host).map_err(io::Error::other)?;
        let keep = match shape.sessions {
            Some(slot) => {
                offer_kept(slot, &prepared, &mut ssl);
                Some(Keep {
                    slot: slot.clone(),
                    prepared: prepared.clone(),
                    seen: 0,
                })
            }
            None => None,
        };
        let sent = SentHello::default();
        let mut stream = OpensslStream::new(ssl, HelloTap::new(transport, sent.clone()));
        stream.keep = keep;
        stream.handshake(host).await?;
        let h2 = stream.ssl.alpn_selected().as_deref() == Some(b"h2");
        let resumed = stream.ssl.session_reused();
        let sent = sent.lock().ok().and_then(|mut s| s.take());
        Ok((
            TlsConn::new(Box::new(stream), h2)
                .with_sent_hello(sent)
                .with_resumed(resumed),
            prepared.gaps.clone(),
        ))
    }

    fn prepared(&self, shape: Shape<'_>) -> Result<Arc<Prepared>, String> {
        let mut hasher = DefaultHasher::new();
        shape.hello.hash(&mut hasher);
        shape.http1_only.hash(&mut hasher);
        let key = hasher.finish();
        self.contexts
            .try_get_with(key, || prepare(&self.roots, shape).map(Arc::new))
            .map_err(|e| (*e).clone())
    }
}

/// Offers the session `slot` keeps for `prepared`'s connections on `ssl`,
/// parsed outside the slot's lock. One OpenSSL cannot take leaves the slot
/// (else every later dial would meet it) and is not offered: the
/// connection runs a full handshake, as with no session kept.
fn offer_kept(slot: &SessionSlot, prepared: &Arc<Prepared>, ssl: &mut Ssl) {
    let saved = match slot.newest().as_ref() {
        Some(Kept::Openssl(kept)) if Arc::ptr_eq(&kept.prepared, prepared) => kept.session.clone(),
        _ => return,
    };
    if let Err(error) = ssl.offer_session(&saved) {
        tracing::debug!(%error, "a kept TLS session could not be offered (OpenSSL); dropped, a full handshake instead");
        let mut newest = slot.newest();
        if matches!(newest.as_ref(), Some(Kept::Openssl(kept)) if kept.session.is(&saved)) {
            *newest = None;
        }
    }
}

fn setup_error(e: openssl_ffi::Error) -> TlsSetupError {
    TlsSetupError::Openssl(e.0)
}

fn add_ca_file(roots: &mut Store, path: &Path) -> Result<(), TlsSetupError> {
    let error = |reason: String| TlsSetupError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let mut added = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| error(e.to_string()))? {
        let cert = cert.map_err(|e| error(e.to_string()))?;
        roots.add_der(cert.as_ref()).map_err(|e| error(e.0))?;
        added += 1;
    }
    if added == 0 {
        return Err(error("no PEM certificate in the file".into()));
    }
    Ok(())
}

// ---------------------------------------------------------------- configuration

/// The ALPN list a connection offers: the client's, or `http/1.1` alone
/// when the connection must be HTTP/1.1 and the client offered ALPN at all
/// (a client offering none, like Node's `https`, keeps offering none).
fn alpn_offer(hello: &ClientHello, http1_only: bool) -> Vec<Vec<u8>> {
    let listed: Vec<Vec<u8>> = hello
        .alpn
        .iter()
        .flatten()
        .filter(|p| !is_grease_alpn(p))
        .cloned()
        .collect();
    if http1_only && !listed.is_empty() {
        vec![b"http/1.1".to_vec()]
    } else {
        listed
    }
}

fn non_grease(list: Option<&[u16]>) -> Vec<u16> {
    list.unwrap_or_default()
        .iter()
        .copied()
        .filter(|v| !is_grease(*v))
        .collect()
}

/// The versions a hello offers (supported_versions, else legacy_version).
fn versions(hello: &ClientHello) -> Vec<u16> {
    match hello.supported_versions.as_deref() {
        Some(list) => non_grease(Some(list)),
        None => vec![hello.legacy_version],
    }
}

/// Builds the context for `shape` and measures what it sends.
fn prepare(roots: &Store, shape: Shape<'_>) -> Result<Prepared, String> {
    // The same view of the hello identities record, whatever the caller
    // passes (idempotent).
    let want = shape.hello.clone().fresh_and_anonymous();
    let alpn = alpn_offer(&want, shape.http1_only);
    let mut ctx = configure(&want, &alpn).map_err(|e| e.0)?;
    ctx.verify_with(roots);
    let sni = want.has_extension(ext::SERVER_NAME);
    let got = trial_hello(&ctx, sni.then_some(TRIAL_SNI)).map_err(|e| e.0)?;
    Ok(Prepared {
        ctx,
        sni,
        gaps: super::bounded_gaps(differences(&want, &got.fresh_and_anonymous(), &alpn)),
    })
}

/// An `SSL_CTX` saying as much of `hello` as OpenSSL can, offering `alpn`.
fn configure(hello: &ClientHello, alpn: &[Vec<u8>]) -> Result<Ctx, openssl_ffi::Error> {
    let mut ctx = Ctx::new_client()?;

    // Versions: the range the client lists (OpenSSL lists every version
    // between, highest first, as OpenSSL clients do).
    let offered: Vec<u16> = versions(hello)
        .into_iter()
        .filter(|v| (0x0301..=0x0304).contains(v))
        .collect();
    if let (Some(&min), Some(&max)) = (offered.iter().min(), offered.iter().max()) {
        ctx.set_proto_versions(min, max)?;
    }

    // Cipher suites, by OpenSSL's own names (SSL_CIPHER_find) in the
    // client's order: TLS 1.3 suites apart, the SCSV left to OpenSSL (it
    // adds 0x00ff itself). A suite this OpenSSL lacks is left out and
    // shows as a gap.
    let scratch_ctx = Ctx::new_client()?;
    let mut scratch = Ssl::new(&scratch_ctx)?;
    let mut tls12 = Vec::new();
    let mut tls13 = Vec::new();
    for id in non_grease(Some(&hello.cipher_suites)) {
        if id == SCSV {
            continue;
        }
        if let Some(name) = scratch.cipher_name(id) {
            if id >> 8 == 0x13 {
                tls13.push(name);
            } else {
                tls12.push(name);
            }
        }
    }
    // Level 0 (a recipe for reaching old TLS 1.0 servers) would let a
    // client's hello make this stack offer unauthenticated suites.
    if ctx.security_level() < 1 {
        ctx.set_security_level(1);
    }
    ctx.set_ciphersuites(&tls13.join(":"))?;
    if !tls12.is_empty() {
        // Never a suite without authentication or encryption, whatever the
        // client lists: an anonymous suite would let whoever sits between
        // the exit and the origin answer without a certificate (at
        // security level 0 OpenSSL would offer one named explicitly). Left
        // out, they show as gaps.
        ctx.set_cipher_list(&format!("{}:!aNULL:!eNULL", tls12.join(":")))?;
    }

    // Groups, probed one by one (OpenSSL refuses a whole list for one
    // name it does not know).
    let mut groups: Vec<(u16, &str)> = Vec::new();
    for id in non_grease(hello.supported_groups.as_deref()) {
        if let Some(name) = group_name(id) {
            if ctx.set_groups_list(name).is_ok() {
                groups.push((id, name));
            }
        }
    }
    if !groups.is_empty() {
        let plain: Vec<&str> = groups.iter().map(|(_, name)| *name).collect();
        let shares = non_grease(hello.key_share_groups.as_deref());
        let first_only =
            shares.len() == 1 && groups.first().map(|(id, _)| *id) == shares.first().copied();
        // OpenSSL 3.0 shares the first group only; 3.5 takes `*` marks for
        // the groups to share. Without the marks the list still holds.
        let marked: Vec<String> = groups
            .iter()
            .map(|(id, name)| {
                if shares.contains(id) {
                    format!("*{name}")
                } else {
                    (*name).to_owned()
                }
            })
            .collect();
        if first_only || ctx.set_groups_list(&marked.join(":")).is_err() {
            ctx.set_groups_list(&plain.join(":"))?;
        }
    }

    // Signature algorithms, in order, each under the first of its names
    // this OpenSSL accepts.
    let mut sigalgs: Vec<&str> = Vec::new();
    for id in non_grease(hello.signature_algorithms.as_deref()) {
        if let Some(name) = sigalg_names(id)
            .iter()
            .find(|name| ctx.set_sigalgs_list(name).is_ok())
        {
            sigalgs.push(name);
        }
    }
    if !sigalgs.is_empty() {
        ctx.set_sigalgs_list(&sigalgs.join(":"))?;
    }

    if !alpn.is_empty() {
        let mut wire = Vec::new();
        for protocol in alpn {
            if let Ok(len) = u8::try_from(protocol.len()) {
                wire.push(len);
                wire.extend_from_slice(protocol);
            }
        }
        ctx.set_alpn_protos(&wire)?;
    }

    // Extensions OpenSSL adds unless told not to, and the rest.
    let mut set = op::IGNORE_UNEXPECTED_EOF | op::NO_RENEGOTIATION;
    let mut clear = 0;
    let mut toggle = |on: bool, bit: u64| {
        if on {
            set |= bit;
        } else {
            clear |= bit;
        }
    };
    toggle(hello.padding_len.is_some(), op::TLSEXT_PADDING);
    toggle(!hello.encrypt_then_mac(), op::NO_ENCRYPT_THEN_MAC);
    toggle(
        !hello.extended_master_secret(),
        op::NO_EXTENDED_MASTER_SECRET,
    );
    toggle(
        hello.session_ticket() == client_hello::SessionTicket::Absent,
        op::NO_TICKET,
    );
    toggle(hello.session_id_len > 0, op::ENABLE_MIDDLEBOX_COMPAT);
    ctx.set_options(set, clear);
    ctx.set_post_handshake_auth(hello.post_handshake_auth());
    if hello.status_request() {
        ctx.request_ocsp()?;
    }
    // No session cache of the context's (one context serves every lane
    // presenting its hello): a connection keeps its session in its own
    // slot (see `OpensslStream::keep_session`).
    ctx.set_no_cache_and_async_writes();
    Ok(ctx)
}

/// The ClientHello `ctx` sends (with SNI `sni`), written into a memory BIO
/// and parsed: nothing leaves the process.
fn trial_hello(ctx: &Ctx, sni: Option<&str>) -> Result<ClientHello, openssl_ffi::Error> {
    let mut ssl = Ssl::new(ctx)?;
    if let Some(name) = sni {
        ssl.set_sni(name)?;
    }
    match ssl.connect() {
        Step::WantRead => {}
        Step::Failed(e) => return Err(e),
        other => return Err(openssl_ffi::Error(format!("trial handshake: {other:?}"))),
    }
    let mut records = Vec::new();
    let mut chunk = vec![0u8; RECORD_BUF];
    for _ in 0..MAX_STEPS {
        let n = ssl.take_output(&mut chunk);
        if n == 0 {
            break;
        }
        records.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    client_hello::parse(&records)
        .map_err(|e| openssl_ffi::Error(format!("OpenSSL's own hello does not parse: {e}")))
}

/// The renegotiation SCSV, which OpenSSL appends to every cipher list.
const SCSV: u16 = 0x00ff;

/// OpenSSL's name of a named group (its TLS name, which 3.0 to 3.5 take).
fn group_name(id: u16) -> Option<&'static str> {
    Some(match id {
        0x0012 => "secp192k1",
        0x0013 => "prime192v1",
        0x0014 => "secp224k1",
        0x0015 => "secp224r1",
        0x0016 => "secp256k1",
        0x0017 => "secp256r1",
        0x0018 => "secp384r1",
        0x0019 => "secp521r1",
        0x001a => "brainpoolP256r1",
        0x001b => "brainpoolP384r1",
        0x001c => "brainpoolP512r1",
        0x001d => "x25519",
        0x001e => "x448",
        0x001f => "brainpoolP256r1tls13",
        0x0020 => "brainpoolP384r1tls13",
        0x0021 => "brainpoolP512r1tls13",
        0x0100 => "ffdhe2048",
        0x0101 => "ffdhe3072",
        0x0102 => "ffdhe4096",
        0x0103 => "ffdhe6144",
        0x0104 => "ffdhe8192",
        0x0200 => "MLKEM512",
        0x0201 => "MLKEM768",
        0x0202 => "MLKEM1024",
        0x11eb => "SecP256r1MLKEM768",
        0x11ec => "X25519MLKEM768",
        0x11ed => "SecP384r1MLKEM1024",
        _ => return None,
    })
}

/// The names OpenSSL may know a signature algorithm by: its TLS name, and
/// the `SIG+HASH` form for the ones OpenSSL 3.0 lists without a name
/// (SHA-224, SHA-1 and DSA).
fn sigalg_names(id: u16) -> &'static [&'static str] {
    match id {
        0x0201 => &["rsa_pkcs1_sha1", "RSA+SHA1"],
        0x0202 => &["dsa_sha1", "DSA+SHA1"],
        0x0203 => &["ecdsa_sha1", "ECDSA+SHA1"],
        0x0301 => &["rsa_pkcs1_sha224", "RSA+SHA224"],
        0x0302 => &["dsa_sha224", "DSA+SHA224"],
        0x0303 => &["ecdsa_sha224", "ECDSA+SHA224"],
        0x0401 => &["rsa_pkcs1_sha256"],
        0x0402 => &["dsa_sha256", "DSA+SHA256"],
        0x0403 => &["ecdsa_secp256r1_sha256"],
        0x0501 => &["rsa_pkcs1_sha384"],
        0x0502 => &["dsa_sha384", "DSA+SHA384"],
        0x0503 => &["ecdsa_secp384r1_sha384"],
        0x0601 => &["rsa_pkcs1_sha512"],
        0x0602 => &["dsa_sha512", "DSA+SHA512"],
        0x0603 => &["ecdsa_secp521r1_sha512"],
        0x0804 => &["rsa_pss_rsae_sha256"],
        0x0805 => &["rsa_pss_rsae_sha384"],
        0x0806 => &["rsa_pss_rsae_sha512"],
        0x0807 => &["ed25519"],
        0x0808 => &["ed448"],
        0x0809 => &["rsa_pss_pss_sha256"],
        0x080a => &["rsa_pss_pss_sha384"],
        0x080b => &["rsa_pss_pss_sha512"],
        0x081a => &["ecdsa_brainpoolP256r1_sha256"],
        0x081b => &["ecdsa_brainpoolP384r1_sha384"],
        0x081c => &["ecdsa_brainpoolP512r1_sha512"],
        0x0904 => &["mldsa44"],
        0x0905 => &["mldsa65"],
        0x0906 => &["mldsa87"],
        _ => &[],
    }
}

// ---------------------------------------------------------------- gaps

/// Readable names of the extensions a gap may name.
fn extension_name(kind: u16) -> Option<&'static str> {
    Some(match kind {
        ext::SERVER_NAME => "server_name",
        ext::STATUS_REQUEST => "status_request",
        ext::SUPPORTED_GROUPS => "supported_groups",
        ext::EC_POINT_FORMATS => "ec_point_formats",
        ext::SIGNATURE_ALGORITHMS => "signature_algorithms",
        ext::ALPN => "alpn",
        ext::SCT => "signed_certificate_timestamp",
        ext::ENCRYPT_THEN_MAC => "encrypt_then_mac",
        ext::EXTENDED_MASTER_SECRET => "extended_master_secret",
        ext::COMPRESS_CERTIFICATE => "compress_certificate",
        ext::RECORD_SIZE_LIMIT => "record_size_limit",
        ext::DELEGATED_CREDENTIALS => "delegated_credentials",
        ext::SESSION_TICKET => "session_ticket",
        ext::SUPPORTED_VERSIONS => "supported_versions",
        ext::PSK_KEY_EXCHANGE_MODES => "psk_key_exchange_modes",
        ext::POST_HANDSHAKE_AUTH => "post_handshake_auth",
        ext::KEY_SHARE => "key_share",
        ext::ALPS_OLD | ext::ALPS => "application_settings",
        ext::ECH => "encrypted_client_hello",
        ext::RENEGOTIATION_INFO => "renegotiation_info",
        _ => return None,
    })
}

/// Differences of one list: what the client sends that OpenSSL does not,
/// what OpenSSL adds, and (for the items both send) another order.
fn list_gaps(gaps: &mut Vec<Gap>, kind: &'static str, what: &str, want: &[u16], got: &[u16]) {
    for id in want.iter().filter(|id| !got.contains(id)) {
        gaps.push(Gap {
            kind,
            detail: format!("{what} {id:#06x}"),
        });
    }
    for id in got.iter().filter(|id| !want.contains(id)) {
        gaps.push(Gap {
            kind,
            detail: format!("{what} {id:#06x} is sent (the client does not send it)"),
        });
    }
    let common_want: Vec<u16> = want.iter().copied().filter(|id| got.contains(id)).collect();
    let common_got: Vec<u16> = got.iter().copied().filter(|id| want.contains(id)).collect();
    if common_want != common_got {
        gaps.push(Gap {
            kind,
            detail: format!("{what} order (OpenSSL sends {common_got:04x?})"),
        });
    }
}

/// Every way `got` (OpenSSL's hello) differs from `want` (the client's),
/// both as [`ClientHello::fresh_and_anonymous`] makes them; `alpn` is the
/// list meant to be offered. Padding is not compared: whether it is sent
/// follows the SNI's length, and it is configured from the client's.
fn differences(want: &ClientHello, got: &ClientHello, alpn: &[Vec<u8>]) -> Vec<Gap> {
    let mut gaps = Vec::new();
    if want.greases() {
        gaps.push(Gap {
            kind: "grease",
            detail: "GREASE values (OpenSSL sends none)".into(),
        });
        gaps.push(Gap {
            kind: "extension-order",
            detail: "the client's per-connection extension permutation (OpenSSL keeps one order)"
                .into(),
        });
    }
    list_gaps(
        &mut gaps,
        "version",
        "version",
        &versions(want),
        &versions(got),
    );
    list_gaps(
        &mut gaps,
        "cipher",
        "cipher",
        &non_grease(Some(&want.cipher_suites)),
        &non_grease(Some(&got.cipher_suites)),
    );
    let extensions = |hello: &ClientHello| -> Vec<u16> {
        let mut kinds: Vec<u16> = hello
            .extension_types()
            .filter(|k| !is_grease(*k) && *k != ext::PADDING)
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    };
    let (want_ext, got_ext) = (extensions(want), extensions(got));
    for &kind in want_ext.iter().filter(|k| !got_ext.contains(k)) {
        let gap_kind = if kind == ext::COMPRESS_CERTIFICATE {
            "certificate-compression"
        } else {
            "extension"
        };
        gaps.push(Gap {
            kind: gap_kind,
            detail: match extension_name(kind) {
                Some(name) => format!("extension {kind} ({name})"),
                None => format!("extension {kind}"),
            },
        });
    }
    for &kind in got_ext.iter().filter(|k| !want_ext.contains(k)) {
        gaps.push(Gap {
            kind: "extension",
            detail: format!("extension {kind} is sent (the client does not send it)"),
        });
    }
    list_gaps(
        &mut gaps,
        "group",
        "group",
        &non_grease(want.supported_groups.as_deref()),
        &non_grease(got.supported_groups.as_deref()),
    );
    let (want_shares, got_shares) = (
        non_grease(want.key_share_groups.as_deref()),
        non_grease(got.key_share_groups.as_deref()),
    );
    if want_shares != got_shares {
        gaps.push(Gap {
            kind: "key-share",
            detail: format!("key shares {want_shares:04x?} (OpenSSL sends {got_shares:04x?})"),
        });
    }
    list_gaps(
        &mut gaps,
        "signature-algorithm",
        "signature algorithm",
        &non_grease(want.signature_algorithms.as_deref()),
        &non_grease(got.signature_algorithms.as_deref()),
    );
    let got_alpn: Vec<Vec<u8>> = got.alpn.clone().unwrap_or_default();
    if got_alpn != alpn {
        gaps.push(Gap {
            kind: "extension",
            detail: "the ALPN list".into(),
        });
    }
    if want.ec_point_formats.is_some()
        && got.ec_point_formats.is_some()
        && want.ec_point_formats != got.ec_point_formats
    {
        gaps.push(Gap {
            kind: "extension",
            detail: format!("ec_point_formats {:?}", want.ec_point_formats),
        });
    }
    if want.psk_key_exchange_modes.is_some()
        && got.psk_key_exchange_modes.is_some()
        && want.psk_key_exchange_modes != got.psk_key_exchange_modes
    {
        gaps.push(Gap {
            kind: "extension",
            detail: format!("psk_key_exchange_modes {:?}", want.psk_key_exchange_modes),
        });
    }
    if want.session_id_len != got.session_id_len {
        gaps.push(Gap {
            kind: "session-id",
            detail: format!(
                "a {}-byte legacy session id (OpenSSL sends {} bytes)",
                want.session_id_len, got.session_id_len
            ),
        });
    }
    gaps
}

// ---------------------------------------------------------------- the stream

/// A TLS connection made by OpenSSL over an async transport: the `SSL`'s
/// memory BIOs are pumped to and from `io` as OpenSSL asks.
///
/// Meant to be polled from one task (as hyper's connections and the h2
/// connection task do): a read may write (our pending records, a TLS 1.2
/// renegotiation) and a write may read, each registering the waker at
/// hand, so two tasks sharing it through `tokio::io::split` could take
/// each other's wake-up.
///
/// Bounds: a write takes at most one record of plaintext, and only once
/// the previous ciphertext has left; bytes are read from `io` only when
/// OpenSSL wants more, one buffer at a time.
pub struct OpensslStream<T> {
    ssl: Ssl,
    io: T,
    /// Bytes read from `io`, on their way into the read BIO.
    incoming: Box<[u8]>,
    /// Ciphertext taken from the write BIO: `outgoing[out_start..out_end]`
    /// is still to be written to `io`.
    outgoing: Box<[u8]>,
    out_start: usize,
    out_end: usize,
    /// `io` has ended.
    eof: bool,
    /// OpenSSL reported a fatal error: no close_notify may follow.
    fatal: bool,
    /// close_notify was queued.
    closing: bool,
    /// Where the sessions the origin issues go (`None`: the connection
    /// keeps none).
    keep: Option<Keep>,
}

impl<T> std::fmt::Debug for OpensslStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpensslStream")
            .field("eof", &self.eof)
            .field("fatal", &self.fatal)
            .finish_non_exhaustive()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> OpensslStream<T> {
    fn new(ssl: Ssl, io: T) -> OpensslStream<T> {
        OpensslStream {
            ssl,
            io,
            incoming: vec![0; RECORD_BUF].into_boxed_slice(),
            outgoing: vec![0; RECORD_BUF].into_boxed_slice(),
            out_start: 0,
            out_end: 0,
            eof: false,
            fatal: false,
            closing: false,
            keep: None,
        }
    }

    /// Keeps the connection's session, after a read that returned data,
    /// when it is a new one that can be resumed: a TLS 1.2 session from
    /// the handshake on, each TLS 1.3 ticket once a read has taken it in
    /// (an origin sends its tickets before its first answer). The newest
    /// replaces the slot's.
    fn keep_session(&mut self) {
        let Some(keep) = &mut self.keep else {
            return;
        };
        if let Some(session) = self.ssl.new_resumable_session(&mut keep.seen) {
            let kept = KeptSession {
                session,
                prepared: keep.prepared.clone(),
            };
            *keep.slot.newest() = Some(Kept::Openssl(kept));
        }
    }

    /// Runs the client handshake to its end and sends its last flight.
    async fn handshake(&mut self, host: &str) -> io::Result<()> {
        let outcome = poll_fn(|cx| self.poll_drive(cx, Ssl::connect)).await;
        match outcome {
            Ok(Some(())) => {}
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{host} closed the connection during the TLS handshake (OpenSSL)"),
                ))
            }
            Err(e) => {
                if let Some(why) = self.ssl.verify_failure() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the certificate of {host} did not verify (OpenSSL): {why}"),
                    ));
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("TLS handshake with {host} (OpenSSL): {e}"),
                ));
            }
        }
        poll_fn(|cx| self.poll_flush_out(cx)).await?;
        poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await
    }

    /// Writes the ciphertext OpenSSL has produced to `io`; ready once all
    /// of it is written.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for _ in 0..MAX_STEPS {
            if self.out_start >= self.out_end {
                let n = self.ssl.take_output(&mut self.outgoing);
                if n == 0 {
                    return Poll::Ready(Ok(()));
                }
                self.out_start = 0;
                self.out_end = n;
            }
            let pending = self
                .outgoing
                .get(self.out_start..self.out_end)
                .unwrap_or_default();
            match ready!(Pin::new(&mut self.io).poll_write(cx, pending)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.out_start = self.out_start.saturating_add(n).min(self.out_end),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Ciphertext produced for the peer and not yet written to `io`.
    fn unsent(&mut self) -> usize {
        let taken = self.out_end.saturating_sub(self.out_start);
        self.ssl.pending_output().saturating_add(taken)
    }

    /// Reads once from `io` into the read BIO (or tells OpenSSL `io` ended).
    fn poll_fill_in(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut buf = ReadBuf::new(&mut self.incoming);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let filled = buf.filled();
        if filled.is_empty() {
            self.eof = true;
            self.ssl.feed_eof();
        } else {
            self.ssl.feed(filled).map_err(io::Error::other)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Runs `op` until it completes, feeding OpenSSL what it asks for.
    /// `Ok(None)`: the peer closed.
    fn poll_drive<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&mut Ssl) -> Step<R>,
    ) -> Poll<io::Result<Option<R>>> {
        for _ in 0..MAX_STEPS {
            match op(&mut self.ssl) {
                Step::Done(value) => return Poll::Ready(Ok(Some(value))),
                Step::Closed => return Poll::Ready(Ok(None)),
                Step::Failed(e) => {
                    self.fatal = true;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e.0)));
                }
                Step::WantWrite => ready!(self.poll_flush_out(cx))?,
                Step::WantRead => {
                    // Our flight first: the peer may be waiting for it. If
                    // `io` cannot take it yet, read all the same (both
                    // wake-ups are registered), unless too much already
                    // waits: a peer that sends without reading (KeyUpdates
                    // asking for an answer each) would otherwise grow the
                    // write BIO for as long as it kept sending.
                    match self.poll_flush_out(cx) {
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending if self.unsent() > MAX_UNSENT => return Poll::Pending,
                        _ => {}
                    }
                    if self.eof {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    ready!(self.poll_fill_in(cx))?;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for OpensslStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let dst = buf.initialize_unfilled();
        let read = ready!(this.poll_drive(cx, |ssl| ssl.read(dst)))?;
        // Output a read produced (a KeyUpdate answer) goes out when it can.
        if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
            return Poll::Ready(Err(e));
        }
        if let Some(n) = read {
            buf.advance(n);
            this.keep_session();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for OpensslStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // The previous record must be out before another is made.
        ready!(this.poll_flush_out(cx))?;
        let chunk = buf.get(..MAX_PLAINTEXT_CHUNK).unwrap_or(buf);
        match ready!(this.poll_drive(cx, |ssl| ssl.write(chunk)))? {
            Some(n) => {
                if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
            None => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the origin closed the TLS connection",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing && !this.fatal {
            this.closing = true;
            // close_notify into the write BIO; a failure here (the peer
            // already gone) leaves only the transport to close.
            if let Step::Failed(_) = this.ssl.shutdown() {
                this.fatal = true;
            }
        }
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::ja4;
    use crate::upstream::tls::tests::fixture;

    fn available() -> bool {
        openssl_ffi::loaded_for_tests()
    }

    /// The context for `name`'s hello, its gaps, and the hello it sends to
    /// `x.example` (the fixtures' SNI, so padding compares too).
    fn said(name: &str, http1_only: bool) -> (Vec<Gap>, ClientHello, ClientHello) {
        said_of(fixture(name), name, http1_only)
    }

    /// [`said`] for the hello `client`.
    fn said_of(
        client: ClientHello,
        name: &str,
        http1_only: bool,
    ) -> (Vec<Gap>, ClientHello, ClientHello) {
        let recorded = client.clone().fresh_and_anonymous();
        let roots = match Store::new() {
            Ok(store) => store,
            Err(e) => panic!("{e}"),
        };
        let shape = Shape {
            hello: &recorded,
            http1_only,
            alps_settings: &[],
            sessions: None,
        };
        let prepared = match prepare(&roots, shape) {
            Ok(p) => p,
            Err(e) => panic!("{name}: {e}"),
        };
        let sent = match trial_hello(&prepared.ctx, prepared.sni.then_some("x.example")) {
            Ok(hello) => hello,
            Err(e) => panic!("{name}: {e}"),
        };
        (prepared.gaps.to_vec(), client, sent)
    }

    #[test]
    fn openssl_clients_are_said_exactly() {
        if !available() {
            return;
        }
        for name in [
            "curl_h2",
            "curl_h1",
            "python_requests",
            "python_requests_debian",
            "python_ssl",
        ] {
            let (gaps, client, sent) = said(name, false);
            assert_eq!(gaps, [], "{name}");
            assert_eq!(ja4::ja4(&sent), ja4::ja4(&client), "{name}");
            assert_eq!(ja4::ja4_r(&sent), ja4::ja4_r(&client), "{name}");
            // The same lists in the same order, the same size.
            assert_eq!(sent.cipher_suites, client.cipher_suites, "{name}");
            assert_eq!(
                sent.extension_types().collect::<Vec<_>>(),
                client.extension_types().collect::<Vec<_>>(),
                "{name}: OpenSSL's own extension order"
            );
            assert_eq!(sent.supported_groups, client.supported_groups, "{name}");
            assert_eq!(sent.key_share_groups, client.key_share_groups, "{name}");
            assert_eq!(sent.padding_len, client.padding_len, "{name}");
        }
    }

    /// A client may list suites without authentication or encryption
    /// (anonymous Diffie-Hellman, NULL): they are never offered to an
    /// origin, whatever OpenSSL's security level, and show as gaps.
    #[test]
    fn suites_without_authentication_or_encryption_are_never_offered() {
        if !available() {
            return;
        }
        const UNSAFE: [u16; 3] = [0x0034, 0xc018, 0x003b];
        let mut client = fixture("curl_h1");
        client.cipher_suites.extend(UNSAFE);
        let (gaps, _, sent) = said_of(client.clone(), "curl_h1 with anonymous suites", false);
        for suite in UNSAFE {
            assert!(!sent.cipher_suites.contains(&suite), "{suite:#06x} offered");
        }
        assert!(!gaps.is_empty(), "what was left out is a gap");
        // Even where the level is 0 once configured (a system
        // configuration read later, say), the list itself leaves them out.
        let roots = match Store::new() {
            Ok(store) => store,
            Err(e) => panic!("{e}"),
        };
        let recorded = client.fresh_and_anonymous();
        let shape = Shape {
            hello: &recorded,
            http1_only: false,
            alps_settings: &[],
            sessions: None,
        };
        let mut prepared = match prepare(&roots, shape) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        prepared.ctx.set_security_level(0);
        let sent = match trial_hello(&prepared.ctx, Some("x.example")) {
            Ok(hello) => hello,
            Err(e) => panic!("{e}"),
        };
        for suite in UNSAFE {
            assert!(
                !sent.cipher_suites.contains(&suite),
                "{suite:#06x} offered at level 0"
            );
        }
    }

    #[test]
    fn the_mapping_follows_the_hello() {
        if !available() {
            return;
        }
        let (_, client, sent) = said("curl_h2", false);
        assert!(sent.cipher_suites.contains(&0xccaa));
        assert!(sent.cipher_suites.ends_with(&[SCSV]));
        assert!(sent.encrypt_then_mac() && sent.post_handshake_auth());
        assert_eq!(sent.session_ticket(), client_hello::SessionTicket::Absent);
        assert_eq!(sent.alpn, client.alpn);
        // Python's own context: TLS 1.2 and up, no encrypt_then_mac.
        let (_, client, sent) = said("python_requests", false);
        assert_eq!(sent.supported_versions, client.supported_versions);
        assert_eq!(sent.encrypt_then_mac(), client.encrypt_then_mac());
        assert_eq!(sent.alpn.as_deref(), Some(&[b"http/1.1".to_vec()][..]));
    }

    #[test]
    fn http1_only_offers_http1_when_the_client_offers_alpn() {
        if !available() {
            return;
        }
        let (gaps, _, sent) = said("curl_h2", true);
        assert_eq!(gaps, []);
        assert_eq!(sent.alpn.as_deref(), Some(&[b"http/1.1".to_vec()][..]));
        let (gaps, client, sent) = said("python_ssl", true);
        assert_eq!(gaps, []);
        assert_eq!(client.alpn, None);
        assert_eq!(sent.alpn, None, "no ALPN offered, none added");
    }

    #[test]
    fn chromium_is_beyond_openssl() {
        if !available() {
            return;
        }
        let (gaps, _, _) = said("chromium_1", false);
        let kinds: Vec<&str> = gaps.iter().map(|g| g.kind).collect();
        for kind in [
            "grease",
            "extension-order",
            "certificate-compression",
            "key-share",
        ] {
            assert!(kinds.contains(&kind), "{kind}: {gaps:?}");
        }
        assert!(
            gaps.iter().any(|g| g.detail.starts_with("extension 17613")),
            "ALPS: {gaps:?}"
        );
    }

    #[test]
    fn differences_name_each_item() {
        let client = fixture("curl_h2").fresh_and_anonymous();
        let mut other = client.clone();
        other.cipher_suites.retain(|c| *c != 0xccaa);
        other.cipher_suites.push(0xc0ff);
        let alpn = alpn_offer(&client, false);
        let gaps = differences(&client, &other, &alpn);
        let details: Vec<&str> = gaps.iter().map(|g| g.detail.as_str()).collect();
        assert_eq!(
            details,
            [
                "cipher 0xccaa",
                "cipher 0xc0ff is sent (the client does not send it)"
            ]
        );
        assert_eq!(differences(&client, &client, &alpn), []);
    }

    // ------------------------------------------------------------ the stream

    use crate::upstream::tls::tests::{acceptor, pki, Pki};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// An OpenSSL client trusting `ca` only.
    fn client(ca: Option<&[u8]>) -> OpensslClient {
        let mut roots = Store::new().unwrap_or_else(|e| panic!("{e}"));
        if let Some(ca) = ca {
            roots.add_der(ca).unwrap_or_else(|e| panic!("{e}"));
        }
        OpensslClient {
            roots,
            version: openssl_ffi::version().unwrap_or_default(),
            contexts: moka::sync::Cache::new(8),
        }
    }

    const MIB: usize = 1 << 20;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// A megabyte each way, both directions at once, over a pipe that
    /// takes 997 bytes at a time (partial writes and reads everywhere);
    /// close_notify both ways at the end.
    async fn a_megabyte_each_way(tls12: bool) {
        if !available() {
            return;
        }
        let pki = pki();
        let (near, far) = tokio::io::duplex(997);
        let acceptor = acceptor(&pki, tls12);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(far).await?;
            let mut received = Vec::new();
            // Echo until close_notify, then close.
            let mut buf = vec![0u8; 8192];
            loop {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                received.extend_from_slice(&buf[..n]);
                tls.write_all(&buf[..n]).await?;
            }
            tls.shutdown().await?;
            Ok::<_, io::Error>(received)
        });
        let hello = fixture("curl_h2").fresh_and_anonymous();
        let shape = Shape {
            hello: &hello,
            http1_only: false,
            alps_settings: &[],
            sessions: None,
        };
        let (conn, gaps) = client(Some(&pki.ca))
            .connect("localhost", near, shape)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(gaps.len(), 0);
        assert!(conn.negotiated_h2());
        let sent = conn.sent_hello().map(ja4::ja4);
        assert_eq!(
            sent,
            Some(ja4::ja4(&fixture("curl_h2"))),
            "the tap saw curl's hello"
        );
        let data = pattern(MIB);
        // Both directions from one task, as hyper and the h2 connection
        // drive a connection.
        let (mut reader, mut writer) = tokio::io::split(conn);
        let writing = async {
            // Uneven chunks, larger than a record.
            for chunk in data.chunks(20_000) {
                writer.write_all(chunk).await?;
            }
            writer.flush().await?;
            writer.shutdown().await
        };
        let mut echoed = Vec::new();
        let reading = reader.read_to_end(&mut echoed);
        let (written, read) = tokio::join!(writing, reading);
        written.unwrap_or_else(|e| panic!("{e}"));
        read.unwrap_or_else(|e| panic!("{e}"));
        let received = server
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(received == data, "the server got what was sent");
        assert!(echoed == data, "the client got what was echoed");
    }

    #[tokio::test]
    async fn tls13_carries_a_megabyte_each_way_through_a_narrow_pipe() {
        a_megabyte_each_way(false).await;
    }

    #[tokio::test]
    async fn tls12_carries_a_megabyte_each_way_through_a_narrow_pipe() {
        a_megabyte_each_way(true).await;
    }

    /// Connects to a rustls server for `pki` as `host`, trusting `ca`, as
    /// Python would. The server writes `hello` and leaves without
    /// close_notify; also returns the SNI it saw (`None`: no handshake).
    async fn handshake(
        pki: &Pki,
        ca: Option<&[u8]>,
        host: &str,
    ) -> (io::Result<TlsConn>, Option<Option<String>>) {
        let (near, far) = tokio::io::duplex(4096);
        let acceptor = acceptor(pki, false);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(far).await.ok()?;
            let sni = tls.get_ref().1.server_name().map(str::to_owned);
            tls.write_all(b"hello").await.ok()?;
            drop(tls);
            Some(sni)
        });
        let hello = fixture("python_requests").fresh_and_anonymous();
        let shape = Shape {
            hello: &hello,
            http1_only: false,
            alps_settings: &[],
            sessions: None,
        };
        let result = client(ca).connect(host, near, shape).await;
        let sni = server.await.ok().flatten();
        (result.map(|(conn, _)| conn), sni)
    }

    /// A connection given a slot offers the session the slot keeps (a
    /// TLS 1.3 ticket its predecessor took in with its first read) and
    /// keeps the one its origin issues there; one without a slot, and one
    /// with another slot, run full handshakes. The resumed hello is the
    /// fresh one with a pre_shared_key. A kept session that does not parse
    /// is dropped for a full handshake.
    #[tokio::test]
    async fn a_connection_resumes_the_session_its_slot_keeps_and_no_other() {
        use crate::fingerprint::ja4::ja4;
        use crate::upstream::tls::SessionSlot;
        use tokio::io::AsyncReadExt as _;
        if !available() {
            return;
        }
        let pki = pki();
        let client = client(Some(&pki.ca));
        // One acceptor, so one rustls session store: it resumes the
        // tickets it issued on an earlier connection.
        let acceptor = acceptor(&pki, false);
        let hello = fixture("python_requests").fresh_and_anonymous();
        // `read`: read the server's greeting (taking in its tickets) before
        // the connection is dropped, without a close_notify either way.
        let connect = |sessions: Option<Arc<SessionSlot>>, http1_only: bool, read: bool| {
            let (client, acceptor, hello) = (&client, acceptor.clone(), &hello);
            async move {
                let (near, far) = tokio::io::duplex(1 << 16);
                let server = tokio::spawn(async move {
                    let mut tls = acceptor.accept(far).await.ok()?;
                    tls.write_all(b"hello").await.ok()?;
                    tls.flush().await.ok()?;
                    // Held open until the client has read.
                    let mut rest = Vec::new();
                    let _ = tls.read_to_end(&mut rest).await;
                    Some(())
                });
                let shape = Shape {
                    hello,
                    http1_only,
                    alps_settings: &[],
                    sessions: sessions.as_ref(),
                };
                let (mut conn, _) = client
                    .connect("localhost", near, shape)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                if read {
                    let mut greeting = [0u8; 5];
                    conn.read_exact(&mut greeting)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
                let sent = conn.sent_hello().cloned();
                let sent = sent.unwrap_or_else(|| panic!("no hello recorded"));
                let resumed = conn.resumed();
                drop(conn);
                let _ = server.await;
                (resumed, sent)
            }
        };
        let slot = Arc::new(SessionSlot::default());
        let (resumed, first) = connect(Some(slot.clone()), false, true).await;
        assert!(!resumed && !first.pre_shared_key(), "nothing to resume yet");
        assert!(slot.holds(), "the origin's ticket is kept");
        // Resumed, then dropped before reading (so before any new ticket):
        // what OpenSSL does to that connection's session on the way out
        // does not reach the slot's.
        let (resumed, second) = connect(Some(slot.clone()), false, false).await;
        assert!(
            second.pre_shared_key(),
            "the second connection offers the ticket"
        );
        assert!(resumed, "the second connection resumes");
        assert_eq!(ja4(&second.without_resumption()), ja4(&first));
        let (_, third) = connect(Some(slot.clone()), false, true).await;
        assert!(
            third.pre_shared_key(),
            "the slot's session is offered again"
        );
        let (resumed, without) = connect(None, false, true).await;
        assert!(!resumed && !without.pre_shared_key(), "no slot: no session");
        let (resumed, other) = connect(Some(Arc::new(SessionSlot::default())), false, true).await;
        assert!(
            !resumed && !other.pre_shared_key(),
            "another slot's session"
        );
        let (resumed, websocket) = connect(Some(slot.clone()), true, true).await;
        assert!(
            !resumed && !websocket.pre_shared_key(),
            "another context's session"
        );

        // A kept session OpenSSL cannot parse is dropped: the connection
        // runs a full handshake (it does not fail), and keeps its own. (A
        // session of the first context first: the WebSocket's took the
        // slot.)
        let _ = connect(Some(slot.clone()), false, true).await;
        match slot.newest().as_mut() {
            Some(Kept::Openssl(kept)) => {
                kept.session = openssl_ffi::SavedSession::of_bytes(b"not a session");
            }
            _ => panic!("no session kept"),
        }
        let (resumed, unparsed) = connect(Some(slot.clone()), false, true).await;
        assert!(!resumed && !unparsed.pre_shared_key(), "nothing offered");
        let (resumed, _) = connect(Some(slot.clone()), false, true).await;
        assert!(resumed, "the full handshake's session was kept");
    }

    #[tokio::test]
    async fn an_untrusted_certificate_fails_naming_the_host() {
        if !available() {
            return;
        }
        let pki = pki();
        let error = handshake(&pki, None, "localhost")
            .await
            .0
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("certificate of localhost did not verify"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_fails() {
        if !available() {
            return;
        }
        let pki = pki();
        let error = handshake(&pki, Some(&pki.ca), "origin.invalid")
            .await
            .0
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("certificate of origin.invalid did not verify")
                && error.contains("mismatch"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_ip_origin_is_verified_by_its_address_and_a_missing_close_notify_ends_the_stream() {
        if !available() {
            return;
        }
        let pki = pki();
        let (conn, sni) = handshake(&pki, Some(&pki.ca), "127.0.0.1").await;
        let mut conn = conn.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sni, Some(None), "no SNI for an address");
        let (conn_by_name, sni) = handshake(&pki, Some(&pki.ca), "localhost").await;
        assert!(conn_by_name.is_ok());
        assert_eq!(sni, Some(Some("localhost".to_owned())));
        let mut got = Vec::new();
        conn.read_to_end(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn a_peer_gone_during_the_handshake_is_an_error() {
        if !available() {
            return;
        }
        let (near, far) = tokio::io::duplex(4096);
        drop(far);
        let hello = fixture("curl_h1").fresh_and_anonymous();
        let shape = Shape {
            hello: &hello,
            http1_only: false,
            alps_settings: &[],
            sessions: None,
        };
        let error = client(None)
            .connect("localhost", near, shape)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!error.is_empty());
    }
}
