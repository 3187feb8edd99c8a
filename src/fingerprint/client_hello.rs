//! The TLS ClientHello: when it is complete, and what it says.
//!
//! Input: the bytes read so far from a client's TCP stream, starting at its
//! first byte: TLS records of content type 22 (handshake). A modern browser's
//! hello (post-quantum key shares, ECH GREASE) is about 2 KB; it may arrive
//! in several TCP segments, and a client may split the handshake message over
//! several records, even inside its 4-byte header.
//!
//! Output: [`handshake_len_needed`] says whether the whole hello is buffered
//! (and how many bytes of records it took), more bytes are needed, or the
//! bytes are not a ClientHello. [`parse`] reassembles the message and
//! returns a [`ClientHello`].
//!
//! Invariants:
//! - hellos over [`MAX_HELLO_LEN`] bytes, or spread over more than
//!   [`MAX_RECORDS`] records, are refused, so a client cannot make the proxy
//!   buffer without bound;
//! - the outer structure (records, handshake header, fixed fields, extension
//!   framing) must be exact, or parsing fails; an extension whose *payload*
//!   does not decode is kept raw, listed in
//!   [`ClientHello::malformed_extensions`], and its decoded view is left
//!   empty, so an odd extension does not cost the whole fingerprint;
//! - no secret or per-connection random material is kept (see
//!   [`ClientHello`]); GREASE values are kept as sent, in place, because
//!   their positions are what an upstream hello must reproduce.

use serde::{Deserialize, Serialize};

use super::reader::{u16_list, Reader};
use super::Progress;

/// Largest ClientHello handshake message accepted, header included. Real
/// hellos are under 3 KB; TLS allows 16 MB, which no proxy should buffer.
pub const MAX_HELLO_LEN: usize = 64 * 1024;

/// Most TLS records a hello may be spread over. Real clients use one; the
/// bound stops a client from sending a hello one byte per record.
pub const MAX_RECORDS: usize = 64;

/// TLS record content type of handshake messages.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type of ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Length of a TLS record header (type, version, length).
const RECORD_HEADER_LEN: usize = 5;
/// Length of a handshake message header (type, 24-bit length).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest plaintext record fragment (RFC 8446, section 5.1).
const MAX_FRAGMENT_LEN: usize = 1 << 14;

/// Extension type codes this module decodes or redacts (IANA "TLS
/// ExtensionType Values").
pub mod ext {
    /// server_name (SNI), RFC 6066.
    pub const SERVER_NAME: u16 = 0;
    /// status_request (OCSP stapling), RFC 6066.
    pub const STATUS_REQUEST: u16 = 5;
    /// supported_groups, RFC 8422 / RFC 8446.
    pub const SUPPORTED_GROUPS: u16 = 10;
    /// ec_point_formats, RFC 8422.
    pub const EC_POINT_FORMATS: u16 = 11;
    /// signature_algorithms, RFC 8446.
    pub const SIGNATURE_ALGORITHMS: u16 = 13;
    /// application_layer_protocol_negotiation (ALPN), RFC 7301.
    pub const ALPN: u16 = 16;
    /// signed_certificate_timestamp (SCT), RFC 6962.
    pub const SCT: u16 = 18;
    /// padding, RFC 7685.
    pub const PADDING: u16 = 21;
    /// encrypt_then_mac, RFC 7366.
    pub const ENCRYPT_THEN_MAC: u16 = 22;
    /// extended_master_secret, RFC 7627.
    pub const EXTENDED_MASTER_SECRET: u16 = 23;
    /// compress_certificate, RFC 8879.
    pub const COMPRESS_CERTIFICATE: u16 = 27;
    /// record_size_limit, RFC 8449.
    pub const RECORD_SIZE_LIMIT: u16 = 28;
    /// delegated_credential, RFC 9345.
    pub const DELEGATED_CREDENTIALS: u16 = 34;
    /// session_ticket, RFC 5077.
    pub const SESSION_TICKET: u16 = 35;
    /// pre_shared_key, RFC 8446.
    pub const PRE_SHARED_KEY: u16 = 41;
    /// early_data, RFC 8446.
    pub const EARLY_DATA: u16 = 42;
    /// supported_versions, RFC 8446.
    pub const SUPPORTED_VERSIONS: u16 = 43;
    /// cookie, RFC 8446.
    pub const COOKIE: u16 = 44;
    /// psk_key_exchange_modes, RFC 8446.
    pub const PSK_KEY_EXCHANGE_MODES: u16 = 45;
    /// post_handshake_auth, RFC 8446.
    pub const POST_HANDSHAKE_AUTH: u16 = 49;
    /// key_share, RFC 8446.
    pub const KEY_SHARE: u16 = 51;
    /// application_settings (ALPS), the codepoint Chrome used first.
    pub const ALPS_OLD: u16 = 17513;
    /// application_settings (ALPS), the codepoint Chrome uses since 2024.
    pub const ALPS: u16 = 17613;
    /// encrypted_client_hello (ECH), RFC 9849.
    pub const ECH: u16 = 0xfe0d;
    /// renegotiation_info, RFC 5746.
    pub const RENEGOTIATION_INFO: u16 = 0xff01;
}

/// Why bytes are not (or not yet acceptable as) a ClientHello.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A record's content type is not handshake (22).
    #[error("TLS record content type {0} is not handshake (22)")]
    NotHandshake(u8),
    /// A record's version does not start with 3 (SSL 3 / TLS): an SSLv2 hello
    /// or not TLS at all.
    #[error("record version major {0} is not TLS")]
    BadRecordVersion(u8),
    /// A record is empty or longer than 2^14 bytes.
    #[error("TLS record length {0} out of range")]
    BadRecordLength(usize),
    /// The handshake message is not a ClientHello.
    #[error("handshake message type {0} is not ClientHello (1)")]
    NotClientHello(u8),
    /// The hello is longer than [`MAX_HELLO_LEN`].
    #[error("ClientHello of {0} bytes exceeds the {MAX_HELLO_LEN}-byte limit")]
    TooLarge(usize),
    /// The hello is spread over more than [`MAX_RECORDS`] records.
    #[error("ClientHello spread over more than {MAX_RECORDS} records")]
    TooManyRecords,
    /// The input ends before the hello does.
    #[error("input ends before the ClientHello does")]
    Truncated,
    /// A field of the hello is inconsistent; the text names it.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// What a connection is for, where that changes what a client's hello
/// says (see [`ClientHello::on`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occasion {
    /// The connection offers HTTP/1.1 alone (a WebSocket's).
    pub http1_only: bool,
    /// It goes to an IP address, to which no SNI is sent.
    pub to_address: bool,
}

/// One extension, in wire order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extension {
    /// Extension type; may be a GREASE value.
    pub kind: u16,
    /// Payload length on the wire.
    pub len: u16,
    /// The payload as sent, or `None` where it is a per-connection secret or
    /// noise: key_share (public keys), pre_shared_key (identities, binders),
    /// session_ticket (a resumption ticket), cookie, encrypted_client_hello
    /// (encrypted or random) and padding (zeros).
    pub data: Option<Vec<u8>>,
}

/// The protocols one ALPS extension lists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Alps {
    /// Which codepoint carried it: [`ext::ALPS_OLD`] or [`ext::ALPS`].
    pub codepoint: u16,
    /// Protocols, in order (e.g. `h2`).
    pub protocols: Vec<Vec<u8>>,
}

/// What the session_ticket extension says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionTicket {
    /// Not sent.
    Absent,
    /// Sent empty: the client supports tickets but has none for this server.
    Empty,
    /// Sent with a ticket (not kept): the client is resuming.
    NonEmpty,
}

/// A parsed ClientHello, without its secrets.
///
/// Kept: every field that is a property of the client software. Not kept:
/// the random, the session id bytes (only their length), key share public
/// keys (only the groups), PSK identities and binders, ticket, cookie and
/// ECH payloads (see [`Extension::data`]).
///
/// Lists keep the wire order and GREASE values as sent (see [`is_grease`]).
/// The decoded views are `None` when their extension is absent or its
/// payload did not decode, and are taken from the first copy of an
/// extension sent twice (a protocol error that is kept in `extensions`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientHello {
    /// `legacy_version` (0x0303 for TLS 1.2 and 1.3 clients).
    pub legacy_version: u16,
    /// Length of `legacy_session_id` (32 for TLS 1.3 middlebox compatibility).
    pub session_id_len: u8,
    /// Cipher suites, in order.
    pub cipher_suites: Vec<u16>,
    /// Compression methods, in order (`[0]` for every modern client).
    pub compression_methods: Vec<u8>,
    /// Extensions, in order.
    pub extensions: Vec<Extension>,
    /// Types of the extensions whose payload did not decode, in order.
    pub malformed_extensions: Vec<u16>,
    /// SNI: the first `host_name` of server_name (0).
    pub server_name: Option<String>,
    /// supported_groups (10).
    pub supported_groups: Option<Vec<u16>>,
    /// The groups of key_share (51), in order; the keys are not kept.
    pub key_share_groups: Option<Vec<u16>>,
    /// signature_algorithms (13).
    pub signature_algorithms: Option<Vec<u16>>,
    /// ALPN protocol names (16), in order.
    pub alpn: Option<Vec<Vec<u8>>>,
    /// supported_versions (43).
    pub supported_versions: Option<Vec<u16>>,
    /// psk_key_exchange_modes (45).
    pub psk_key_exchange_modes: Option<Vec<u8>>,
    /// compress_certificate algorithms (27).
    pub compress_certificate: Option<Vec<u16>>,
    /// ALPS extensions (17513, 17613), in wire order.
    pub alps: Vec<Alps>,
    /// record_size_limit (28).
    pub record_size_limit: Option<u16>,
    /// ec_point_formats (11).
    pub ec_point_formats: Option<Vec<u8>>,
    /// Length of the padding extension's payload (21).
    pub padding_len: Option<u16>,
    /// Signature algorithms of delegated_credential (34).
    pub delegated_credentials: Option<Vec<u16>>,
}

/// True for a GREASE value of a two-byte field (RFC 8701): `0x?A?A` with both
/// bytes equal (0x0A0A, 0x1A1A, ... 0xFAFA). Used for cipher suites,
/// extensions, groups, versions and signature algorithms.
pub fn is_grease(value: u16) -> bool {
    let [hi, lo] = value.to_be_bytes();
    hi == lo && lo & 0x0f == 0x0a
}

/// True for a GREASE psk_key_exchange_modes value (RFC 8701, section 2):
/// 0x0B, 0x2A, 0x49, 0x68, 0x87, 0xA6, 0xC5, 0xE4 (`0x1F * n + 0x0B`).
pub fn is_grease_psk_mode(value: u8) -> bool {
    value
        .checked_sub(0x0b)
        .is_some_and(|d| d.checked_rem(0x1f) == Some(0))
}

/// True for a GREASE ALPN protocol name (RFC 8701, section 2): the two bytes
/// of a GREASE `u16`, e.g. `"\x0A\x0A"`.
pub fn is_grease_alpn(name: &[u8]) -> bool {
    match name {
        [hi, lo] => is_grease(u16::from_be_bytes([*hi, *lo])),
        _ => false,
    }
}

/// Where a hello carries GREASE: indices into the corresponding lists of
/// [`ClientHello`]. An upstream hello made to look like the client's must
/// put GREASE at the same places.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreasePositions {
    /// Indices into `cipher_suites`.
    pub cipher_suites: Vec<usize>,
    /// Indices into `extensions`.
    pub extensions: Vec<usize>,
    /// Indices into `supported_groups`.
    pub supported_groups: Vec<usize>,
    /// Indices into `key_share_groups`.
    pub key_share_groups: Vec<usize>,
    /// Indices into `supported_versions`.
    pub supported_versions: Vec<usize>,
    /// Indices into `signature_algorithms`.
    pub signature_algorithms: Vec<usize>,
    /// Indices into `delegated_credentials`.
    pub delegated_credentials: Vec<usize>,
    /// Indices into `compress_certificate`.
    pub compress_certificate: Vec<usize>,
    /// Indices into `psk_key_exchange_modes`.
    pub psk_key_exchange_modes: Vec<usize>,
    /// Indices into `alpn`.
    pub alpn: Vec<usize>,
    /// For each entry of `alps`, the indices into its `protocols`.
    pub alps: Vec<Vec<usize>>,
}

impl GreasePositions {
    /// True when the hello carries GREASE anywhere.
    pub fn any(&self) -> bool {
        !(self.cipher_suites.is_empty()
            && self.extensions.is_empty()
            && self.supported_groups.is_empty()
            && self.key_share_groups.is_empty()
            && self.supported_versions.is_empty()
            && self.signature_algorithms.is_empty()
            && self.delegated_credentials.is_empty()
            && self.compress_certificate.is_empty()
            && self.psk_key_exchange_modes.is_empty()
            && self.alpn.is_empty()
            && self.alps.iter().all(Vec::is_empty))
    }
}

/// Indices of the items of `list` that satisfy `grease`.
fn positions<T>(list: &[T], grease: impl Fn(&T) -> bool) -> Vec<usize> {
    list.iter()
        .enumerate()
        .filter(|(_, item)| grease(item))
        .map(|(i, _)| i)
        .collect()
}

/// [`positions`] of an optional list; empty when the list is absent.
fn opt_positions<T>(list: &Option<Vec<T>>, grease: impl Fn(&T) -> bool) -> Vec<usize> {
    list.as_deref()
        .map(|l| positions(l, grease))
        .unwrap_or_default()
}

impl ClientHello {
    /// The first extension of type `kind`, if sent.
    pub fn extension(&self, kind: u16) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.kind == kind)
    }

    /// True when an extension of type `kind` was sent.
    pub fn has_extension(&self, kind: u16) -> bool {
        self.extension(kind).is_some()
    }

    /// Extension types in wire order (GREASE included).
    pub fn extension_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.extensions.iter().map(|e| e.kind)
    }

    /// status_request (5) sent.
    pub fn status_request(&self) -> bool {
        self.has_extension(ext::STATUS_REQUEST)
    }

    /// signed_certificate_timestamp (18) sent.
    pub fn signed_certificate_timestamp(&self) -> bool {
        self.has_extension(ext::SCT)
    }

    /// Notes that the client sends SNI to names, for a hello it sent to an
    /// address without one: RFC 6066 has no place for an address, so no
    /// client sends one there, and whether a hello carries SNI says where it
    /// went, not who sent it. An identity records what its client sends to
    /// names (an identity founded on an address would otherwise send no SNI
    /// to any name, and its client would drift from itself between the
    /// two); its connections to an address send none, as the TLS stacks
    /// leave SNI out for an address whatever they are told
    /// ([`Occasion::to_address`]).
    pub fn presume_sni_for_names(&mut self) {
        if !self.has_extension(ext::SERVER_NAME) {
            self.extensions.push(Extension {
                kind: ext::SERVER_NAME,
                len: 0,
                data: None,
            });
        }
    }

    /// The hello as its client says it on `occasion`: without SNI to an
    /// address, and offering HTTP/1.1 alone where the connection is for
    /// HTTP/1.1 only (Chromium's WebSocket tunnels). Borrowed when the
    /// occasion changes nothing.
    pub fn on(&self, occasion: Occasion) -> std::borrow::Cow<'_, ClientHello> {
        use std::borrow::Cow;
        let mut view = Cow::Borrowed(self);
        if occasion.http1_only {
            if let Some(http1) = self.http1_only_view() {
                view = Cow::Owned(http1);
            }
        }
        if occasion.to_address && view.has_extension(ext::SERVER_NAME) {
            let hello = view.to_mut();
            hello.extensions.retain(|e| e.kind != ext::SERVER_NAME);
            hello.server_name = None;
        }
        view
    }

    /// Whether the hello offers HTTP/1.1 and nothing else by ALPN.
    pub fn offers_http1_only(&self) -> bool {
        self.alpn
            .as_deref()
            .is_some_and(|alpn| alpn.len() == 1 && alpn[0] == b"http/1.1")
    }

    /// The hello as its client sends it on a connection for HTTP/1.1 only,
    /// where it offers more: ALPN `http/1.1` alone, and no ALPS for the
    /// protocols it no longer offers (what Chromium sends for a WebSocket,
    /// and what pinproxy's stacks send for one). `None` when the hello
    /// offers no `http/1.1`, or nothing else.
    pub fn http1_only_view(&self) -> Option<ClientHello> {
        const HTTP1: &[u8] = b"http/1.1";
        let alpn = self.alpn.as_ref()?;
        if !alpn.iter().any(|p| p == HTTP1) || alpn.iter().all(|p| p == HTTP1) {
            return None;
        }
        let mut view = self.clone();
        view.alpn = Some(vec![HTTP1.to_vec()]);
        view.alps
            .retain(|alps| alps.protocols.iter().all(|p| p == HTTP1));
        let kept_alps: Vec<u16> = view.alps.iter().map(|a| a.codepoint).collect();
        view.extensions.retain(|e| {
            !matches!(e.kind, ext::ALPS | ext::ALPS_OLD) || kept_alps.contains(&e.kind)
        });
        // The ALPN payload: a u16-prefixed list of one u8-prefixed name.
        let mut payload = Vec::with_capacity(3 + HTTP1.len());
        payload.extend_from_slice(&(1 + HTTP1.len() as u16).to_be_bytes());
        payload.push(HTTP1.len() as u8);
        payload.extend_from_slice(HTTP1);
        for extension in view.extensions.iter_mut().filter(|e| e.kind == ext::ALPN) {
            extension.len = payload.len() as u16;
            if extension.data.is_some() {
                extension.data = Some(payload.clone());
            }
        }
        Some(view)
    }

    /// The hello as the client software sends it on a fresh connection to
    /// any host, so that two connections of one client compare equal:
    /// - without its SNI host name, and without padding bytes (their count
    ///   follows the host name's length);
    /// - without what resumption adds (pre_shared_key, early_data, a ticket);
    /// - without the length of an ECH extension (a GREASE payload's size is
    ///   drawn per handshake);
    /// - with every GREASE value as `0x0a0a` (`0x0b` for PSK modes): clients
    ///   draw them at random per connection;
    /// - with its extensions in type order: most clients (Chrome, rustls)
    ///   permute them per connection, and JA4 ignores their order.
    ///
    /// This is what an identity records and what pinproxy imitates.
    pub fn fresh_and_anonymous(mut self) -> ClientHello {
        const GREASE: u16 = 0x0a0a;
        let grease = |list: &mut Vec<u16>| {
            for value in list.iter_mut().filter(|v| is_grease(**v)) {
                *value = GREASE;
            }
        };
        self.server_name = None;
        self.padding_len = self.padding_len.map(|_| 0);
        grease(&mut self.cipher_suites);
        for list in [
            &mut self.supported_groups,
            &mut self.key_share_groups,
            &mut self.signature_algorithms,
            &mut self.supported_versions,
            &mut self.compress_certificate,
            &mut self.delegated_credentials,
        ]
        .into_iter()
        .flatten()
        {
            grease(list);
        }
        if let Some(modes) = self.psk_key_exchange_modes.as_mut() {
            for mode in modes.iter_mut().filter(|m| is_grease_psk_mode(**m)) {
                *mode = 0x0b;
            }
        }
        // A resuming client may leave session_ticket out (rustls does); on a
        // fresh connection a client that resumes offers it.
        let resumed = self.pre_shared_key();
        let offers_tls12 = self
            .supported_versions
            .as_ref()
            .is_none_or(|versions| versions.contains(&0x0303));
        if resumed && offers_tls12 && !self.has_extension(ext::SESSION_TICKET) {
            self.extensions.push(Extension {
                kind: ext::SESSION_TICKET,
                len: 0,
                data: None,
            });
        }
        self.extensions
            .retain(|e| e.kind != ext::PRE_SHARED_KEY && e.kind != ext::EARLY_DATA);
        for extension in &mut self.extensions {
            if is_grease(extension.kind) {
                extension.kind = GREASE;
                extension.data = None;
            }
            // Lengths drawn per connection: the host name's, the padding's,
            // a ticket's, and the ECH GREASE payload's (BoringSSL draws one
            // of four sizes per handshake, so Chromium's hellos would
            // differ from one another three times in four).
            if matches!(
                extension.kind,
                ext::SERVER_NAME | ext::PADDING | ext::SESSION_TICKET | ext::ECH
            ) {
                extension.len = 0;
                extension.data = None;
            }
            // Lists carried raw mirror the decoded views above.
            if matches!(
                extension.kind,
                ext::SUPPORTED_GROUPS
                    | ext::SIGNATURE_ALGORITHMS
                    | ext::SUPPORTED_VERSIONS
                    | ext::PSK_KEY_EXCHANGE_MODES
                    | ext::COMPRESS_CERTIFICATE
                    | ext::DELEGATED_CREDENTIALS
            ) {
                extension.data = None;
            }
        }
        self.extensions.sort_by_key(|e| e.kind);
        self
    }

    /// What session_ticket (35) says.
    pub fn session_ticket(&self) -> SessionTicket {
        match self.extension(ext::SESSION_TICKET) {
            None => SessionTicket::Absent,
            Some(e) if e.len == 0 => SessionTicket::Empty,
            Some(_) => SessionTicket::NonEmpty,
        }
    }

    /// encrypted_client_hello (0xfe0d) sent (real or GREASE ECH).
    pub fn ech(&self) -> bool {
        self.has_extension(ext::ECH)
    }

    /// The hello without what resuming adds (pre_shared_key, early_data):
    /// what the same client sends on a connection that resumes nothing,
    /// to the same host. Borrowed when there is nothing to take out.
    pub fn without_resumption(&self) -> std::borrow::Cow<'_, ClientHello> {
        if !self.pre_shared_key() && !self.early_data() {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut fresh = self.clone();
        fresh
            .extensions
            .retain(|e| e.kind != ext::PRE_SHARED_KEY && e.kind != ext::EARLY_DATA);
        std::borrow::Cow::Owned(fresh)
    }

    /// pre_shared_key (41) sent: the client is resuming.
    pub fn pre_shared_key(&self) -> bool {
        self.has_extension(ext::PRE_SHARED_KEY)
    }

    /// early_data (42) sent.
    pub fn early_data(&self) -> bool {
        self.has_extension(ext::EARLY_DATA)
    }

    /// extended_master_secret (23) sent.
    pub fn extended_master_secret(&self) -> bool {
        self.has_extension(ext::EXTENDED_MASTER_SECRET)
    }

    /// renegotiation_info (0xff01) sent.
    pub fn renegotiation_info(&self) -> bool {
        self.has_extension(ext::RENEGOTIATION_INFO)
    }

    /// encrypt_then_mac (22) sent.
    pub fn encrypt_then_mac(&self) -> bool {
        self.has_extension(ext::ENCRYPT_THEN_MAC)
    }

    /// post_handshake_auth (49) sent.
    pub fn post_handshake_auth(&self) -> bool {
        self.has_extension(ext::POST_HANDSHAKE_AUTH)
    }

    /// Where the hello carries GREASE.
    pub fn grease_positions(&self) -> GreasePositions {
        let grease16 = |v: &u16| is_grease(*v);
        GreasePositions {
            cipher_suites: positions(&self.cipher_suites, grease16),
            extensions: positions(&self.extensions, |e| is_grease(e.kind)),
            supported_groups: opt_positions(&self.supported_groups, grease16),
            key_share_groups: opt_positions(&self.key_share_groups, grease16),
            supported_versions: opt_positions(&self.supported_versions, grease16),
            signature_algorithms: opt_positions(&self.signature_algorithms, grease16),
            delegated_credentials: opt_positions(&self.delegated_credentials, grease16),
            compress_certificate: opt_positions(&self.compress_certificate, grease16),
            psk_key_exchange_modes: opt_positions(&self.psk_key_exchange_modes, |m| {
                is_grease_psk_mode(*m)
            }),
            alpn: opt_positions(&self.alpn, |p| is_grease_alpn(p)),
            alps: self
                .alps
                .iter()
                .map(|a| positions(&a.protocols, |p| is_grease_alpn(p)))
                .collect(),
        }
    }

    /// True when the hello carries GREASE anywhere; the upstream hello must
    /// then GREASE too.
    pub fn greases(&self) -> bool {
        self.grease_positions().any()
    }
}

/// Where the record walk stopped.
enum Walk {
    /// More bytes are needed.
    NeedMore,
    /// The hello ends inside the records `buf[..records_len]`; the handshake
    /// message (header included) is `message_len` bytes.
    Complete {
        records_len: usize,
        message_len: usize,
    },
    /// Not a (acceptable) ClientHello.
    Failed(ParseError),
}

/// Walks the TLS records at the start of `buf`, handing each complete
/// record's fragment to `sink`, until the ClientHello they carry is complete.
///
/// Checks what it can as early as it can (content type, version, handshake
/// type, declared length) so that a non-TLS client is told apart after one or
/// two bytes, not after a timeout.
fn walk_records<'a>(buf: &'a [u8], mut sink: impl FnMut(&'a [u8])) -> Walk {
    let mut rest = buf;
    let mut records_len = 0usize;
    // The handshake header may be split across records: gather its 4 bytes.
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut header_have = 0usize;
    let mut message_len: Option<usize> = None;
    // Handshake bytes carried by the complete records so far.
    let mut carried = 0usize;

    for _ in 0..MAX_RECORDS {
        if let Some(&content_type) = rest.first() {
            if content_type != CONTENT_HANDSHAKE {
                return Walk::Failed(ParseError::NotHandshake(content_type));
            }
        }
        if let Some(&major) = rest.get(1) {
            if major != 3 {
                return Walk::Failed(ParseError::BadRecordVersion(major));
            }
        }
        let mut r = Reader::new(rest);
        let Some(record_header) = r.take(RECORD_HEADER_LEN) else {
            return Walk::NeedMore;
        };
        let &[_, _, _, len_hi, len_lo] = record_header else {
            return Walk::NeedMore;
        };
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len == 0 || len > MAX_FRAGMENT_LEN {
            // RFC 8446 forbids empty handshake fragments; they would also let
            // a client stretch the walk without sending any hello bytes.
            return Walk::Failed(ParseError::BadRecordLength(len));
        }
        let after_header = rest.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let available = after_header.get(..len).unwrap_or(after_header);

        for &byte in available {
            let Some(slot) = header.get_mut(header_have) else {
                break;
            };
            *slot = byte;
            header_have = header_have.saturating_add(1);
        }
        if header_have >= 1 && header[0] != HANDSHAKE_CLIENT_HELLO {
            return Walk::Failed(ParseError::NotClientHello(header[0]));
        }
        if header_have == HANDSHAKE_HEADER_LEN && message_len.is_none() {
            let [_, a, b, c] = header;
            let body_len = u32::from_be_bytes([0, a, b, c]);
            let total = usize::try_from(body_len)
                .unwrap_or(usize::MAX)
                .saturating_add(HANDSHAKE_HEADER_LEN);
            if total > MAX_HELLO_LEN {
                return Walk::Failed(ParseError::TooLarge(total));
            }
            message_len = Some(total);
        }
        if available.len() < len {
            return Walk::NeedMore;
        }

        sink(available);
        carried = carried.saturating_add(len);
        records_len = records_len.saturating_add(RECORD_HEADER_LEN.saturating_add(len));
        rest = after_header.get(len..).unwrap_or_default();
        if let Some(message_len) = message_len {
            if carried >= message_len {
                return Walk::Complete {
                    records_len,
                    message_len,
                };
            }
        }
    }
    Walk::Failed(ParseError::TooManyRecords)
}

/// Whether `buf`, the bytes read so far from a client, holds a whole
/// ClientHello.
///
/// `Complete { consumed }`: the hello ends within the first `consumed` bytes,
/// which are whole TLS records; anything after them (0-RTT data, say) is not
/// part of it. `NeedMore`: a valid beginning; read more. `Failed`: not a
/// ClientHello, or over a limit; do not wait for more.
pub fn handshake_len_needed(buf: &[u8]) -> Progress<ParseError> {
    match walk_records(buf, |_| {}) {
        Walk::NeedMore => Progress::NeedMore,
        Walk::Complete { records_len, .. } => Progress::Complete {
            consumed: records_len,
        },
        Walk::Failed(e) => Progress::Failed(e),
    }
}

/// Parses the ClientHello carried by the TLS records at the start of
/// `records` (one or more; bytes after the hello are ignored).
pub fn parse(records: &[u8]) -> Result<ClientHello, ParseError> {
    let mut message = Vec::new();
    match walk_records(records, |fragment| message.extend_from_slice(fragment)) {
        Walk::NeedMore => Err(ParseError::Truncated),
        Walk::Failed(e) => Err(e),
        Walk::Complete { message_len, .. } => {
            // The last record may carry bytes after the hello: drop them.
            message.truncate(message_len);
            parse_handshake(&message)
        }
    }
}

/// Parses a ClientHello handshake message (4-byte header included), as
/// reassembled from records or as carried in a QUIC CRYPTO frame.
pub fn parse_handshake(message: &[u8]) -> Result<ClientHello, ParseError> {
    let mut r = Reader::new(message);
    let msg_type = r.u8().ok_or(ParseError::Truncated)?;
    if msg_type != HANDSHAKE_CLIENT_HELLO {
        return Err(ParseError::NotClientHello(msg_type));
    }
    let len = r.u24().ok_or(ParseError::Truncated)?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len.saturating_add(HANDSHAKE_HEADER_LEN) > MAX_HELLO_LEN {
        return Err(ParseError::TooLarge(
            len.saturating_add(HANDSHAKE_HEADER_LEN),
        ));
    }
    let body = r.take(len).ok_or(ParseError::Truncated)?;
    parse_body(body)
}

/// Most extensions a hello pinproxy reads may carry. A browser's has about
/// twenty and the registry holds about sixty; a hello with thousands is
/// not a client to mirror, and each is kept with the connection and looked
/// up among the others.
pub const MAX_EXTENSIONS: usize = 128;

/// Most entries of any list in a hello pinproxy reads (cipher suites,
/// groups, signature algorithms, versions, ...): about a hundred ciphers is
/// the most a real client offers, and every entry an upstream stack cannot
/// say becomes a gap.
pub const MAX_LIST: usize = 256;

/// A list of `u16` of at most [`MAX_LIST`] entries.
fn short_u16_list(bytes: &[u8]) -> Option<Vec<u16>> {
    if bytes.len() / 2 > MAX_LIST {
        return None;
    }
    u16_list(bytes)
}

/// Parses the body of a ClientHello (after the handshake header).
fn parse_body(body: &[u8]) -> Result<ClientHello, ParseError> {
    use ParseError::Malformed;
    let mut r = Reader::new(body);
    let legacy_version = r.u16().ok_or(Malformed("legacy_version"))?;
    // The random is per-connection: skipped, never stored.
    r.take(32).ok_or(Malformed("random"))?;
    let session_id = r.vec_u8().ok_or(Malformed("legacy_session_id"))?;
    let session_id_len =
        u8::try_from(session_id.len()).map_err(|_| Malformed("legacy_session_id"))?;
    if session_id_len > 32 {
        return Err(Malformed("legacy_session_id longer than 32 bytes"));
    }
    let suites = r.vec_u16().ok_or(Malformed("cipher_suites"))?;
    if suites.len() / 2 > MAX_LIST {
        return Err(Malformed("more than 256 cipher_suites"));
    }
    let cipher_suites = u16_list(suites).ok_or(Malformed("cipher_suites odd length"))?;
    if cipher_suites.is_empty() {
        return Err(Malformed("no cipher_suites"));
    }
    let compression_methods = r
        .vec_u8()
        .ok_or(Malformed("legacy_compression_methods"))?
        .to_vec();
    if compression_methods.is_empty() {
        return Err(Malformed("no legacy_compression_methods"));
    }

    let mut hello = ClientHello {
        legacy_version,
        session_id_len,
        cipher_suites,
        compression_methods,
        extensions: Vec::new(),
        malformed_extensions: Vec::new(),
        server_name: None,
        supported_groups: None,
        key_share_groups: None,
        signature_algorithms: None,
        alpn: None,
        supported_versions: None,
        psk_key_exchange_modes: None,
        compress_certificate: None,
        alps: Vec::new(),
        record_size_limit: None,
        ec_point_formats: None,
        padding_len: None,
        delegated_credentials: None,
    };

    // A TLS 1.2 hello may end here with no extensions block at all.
    if r.is_empty() {
        return Ok(hello);
    }
    let block = r.vec_u16().ok_or(Malformed("extensions length"))?;
    if !r.is_empty() {
        return Err(Malformed("bytes after the extensions"));
    }
    let mut exts = Reader::new(block);
    // Each extension takes at least 4 bytes, so the block bounds the loop;
    // the explicit bound keeps that visible.
    for _ in 0..=block.len() / 4 {
        if exts.is_empty() {
            break;
        }
        if hello.extensions.len() == MAX_EXTENSIONS {
            return Err(Malformed("more than 128 extensions"));
        }
        let kind = exts.u16().ok_or(Malformed("extension type"))?;
        let data = exts.vec_u16().ok_or(Malformed("extension length"))?;
        let len = u16::try_from(data.len()).map_err(|_| Malformed("extension length"))?;
        let first = !hello.has_extension(kind);
        let decoded = if first {
            decode_extension(&mut hello, kind, data)
        } else {
            Some(())
        };
        if decoded.is_none() {
            hello.malformed_extensions.push(kind);
        }
        hello.extensions.push(Extension {
            kind,
            len,
            data: (!redacted(kind)).then(|| data.to_vec()),
        });
    }
    if !exts.is_empty() {
        return Err(Malformed("extensions block"));
    }
    // Kept with the client's connection for its lifetime: no spare room
    // (a browser's 16 to 18 extensions would otherwise sit in room for 32).
    hello.extensions.shrink_to_fit();
    hello.malformed_extensions.shrink_to_fit();
    Ok(hello)
}

/// Extensions whose payload is a per-connection secret or noise.
fn redacted(kind: u16) -> bool {
    matches!(
        kind,
        ext::KEY_SHARE
            | ext::PRE_SHARED_KEY
            | ext::SESSION_TICKET
            | ext::COOKIE
            | ext::ECH
            | ext::PADDING
    )
}

/// Decodes the view of one extension into `hello`; `None` when the payload
/// is malformed (the view is then left empty).
fn decode_extension(hello: &mut ClientHello, kind: u16, data: &[u8]) -> Option<()> {
    match kind {
        ext::SERVER_NAME => hello.server_name = Some(decode_sni(data)?),
        ext::SUPPORTED_GROUPS => hello.supported_groups = Some(u16_vector(data)?),
        ext::KEY_SHARE => hello.key_share_groups = Some(decode_key_share(data)?),
        ext::SIGNATURE_ALGORITHMS => hello.signature_algorithms = Some(u16_vector(data)?),
        ext::ALPN => hello.alpn = Some(decode_protocols(data)?),
        ext::SUPPORTED_VERSIONS => {
            let mut r = Reader::new(data);
            let list = short_u16_list(r.vec_u8()?)?;
            r.is_empty().then_some(())?;
            hello.supported_versions = Some(list);
        }
        ext::PSK_KEY_EXCHANGE_MODES => {
            let mut r = Reader::new(data);
            let modes = r.vec_u8()?.to_vec();
            r.is_empty().then_some(())?;
            hello.psk_key_exchange_modes = Some(modes);
        }
        ext::COMPRESS_CERTIFICATE => {
            let mut r = Reader::new(data);
            let list = short_u16_list(r.vec_u8()?)?;
            r.is_empty().then_some(())?;
            hello.compress_certificate = Some(list);
        }
        ext::ALPS_OLD | ext::ALPS => hello.alps.push(Alps {
            codepoint: kind,
            protocols: decode_protocols(data)?,
        }),
        ext::RECORD_SIZE_LIMIT => {
            let mut r = Reader::new(data);
            let limit = r.u16()?;
            r.is_empty().then_some(())?;
            hello.record_size_limit = Some(limit);
        }
        ext::EC_POINT_FORMATS => {
            let mut r = Reader::new(data);
            let formats = r.vec_u8()?.to_vec();
            r.is_empty().then_some(())?;
            hello.ec_point_formats = Some(formats);
        }
        ext::PADDING => hello.padding_len = Some(u16::try_from(data.len()).ok()?),
        ext::DELEGATED_CREDENTIALS => hello.delegated_credentials = Some(u16_vector(data)?),
        // Presence-only extensions and unknown ones have no view.
        _ => {}
    }
    Some(())
}

/// A `u16` list with a two-byte length prefix that fills `data` exactly.
fn u16_vector(data: &[u8]) -> Option<Vec<u16>> {
    let mut r = Reader::new(data);
    let list = short_u16_list(r.vec_u16()?)?;
    r.is_empty().then_some(list)
}

/// The first host_name of a server_name extension.
fn decode_sni(data: &[u8]) -> Option<String> {
    let mut r = Reader::new(data);
    let list = r.vec_u16()?;
    if !r.is_empty() {
        return None;
    }
    let mut names = Reader::new(list);
    let mut host = None;
    // Each entry takes at least 3 bytes.
    for _ in 0..=list.len() / 3 {
        if names.is_empty() {
            break;
        }
        let name_type = names.u8()?;
        let name = names.vec_u16()?;
        if name_type == 0 && host.is_none() {
            host = Some(String::from_utf8(name.to_vec()).ok()?);
        }
    }
    if !names.is_empty() {
        return None;
    }
    host
}

/// The groups of a key_share extension; the key bytes are skipped.
fn decode_key_share(data: &[u8]) -> Option<Vec<u16>> {
    let mut r = Reader::new(data);
    let list = r.vec_u16()?;
    if !r.is_empty() {
        return None;
    }
    let mut shares = Reader::new(list);
    let mut groups = Vec::new();
    // Each entry takes at least 4 bytes.
    for _ in 0..=list.len() / 4 {
        if shares.is_empty() {
            break;
        }
        if groups.len() == MAX_LIST {
            return None;
        }
        groups.push(shares.u16()?);
        shares.vec_u16()?;
    }
    shares.is_empty().then_some(groups)
}

/// A `ProtocolNameList` (ALPN, ALPS): u16-prefixed list of u8-prefixed names.
fn decode_protocols(data: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut r = Reader::new(data);
    let list = r.vec_u16()?;
    if !r.is_empty() {
        return None;
    }
    let mut names = Reader::new(list);
    let mut protocols = Vec::new();
    // Each entry takes at least 1 byte.
    for _ in 0..=list.len() {
        if names.is_empty() {
            break;
        }
        if protocols.len() == MAX_LIST {
            return None;
        }
        protocols.push(names.vec_u8()?.to_vec());
    }
    names.is_empty().then_some(protocols)
}

/// A ClientHello of `tests/fixtures/hello`, as captured (for tests).
#[cfg(test)]
#[allow(clippy::panic)]
pub(crate) fn fixture(name: &str) -> ClientHello {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hello")
        .join(name)
        .with_extension("hex");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let bytes: Vec<u8> = digits
        .chunks(2)
        .filter_map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect();
    match parse(&bytes) {
        Ok(hello) => hello,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body (no handshake header) offering `ciphers` cipher
    /// suites and carrying `extensions` (type, data).
    fn hello_body(ciphers: usize, extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(0); // no session id
        let suites: Vec<u8> = (0..ciphers)
            .flat_map(|i| (0x1301 + i as u16).to_be_bytes())
            .collect();
        body.extend_from_slice(&(suites.len() as u16).to_be_bytes());
        body.extend_from_slice(&suites);
        body.extend_from_slice(&[1, 0]); // null compression
        let mut block = Vec::new();
        for (kind, data) in extensions {
            block.extend_from_slice(&kind.to_be_bytes());
            block.extend_from_slice(&(data.len() as u16).to_be_bytes());
            block.extend_from_slice(data);
        }
        body.extend_from_slice(&(block.len() as u16).to_be_bytes());
        body.extend_from_slice(&block);
        body
    }

    /// A `u16` vector with its two-byte length, as a group or signature
    /// algorithm list is sent.
    fn u16_vector_of(count: usize) -> Vec<u8> {
        let mut data = ((count * 2) as u16).to_be_bytes().to_vec();
        data.extend((0..count).flat_map(|i| (0x0100 + i as u16).to_be_bytes()));
        data
    }

    #[test]
    fn a_hello_is_read_within_its_extension_and_list_bounds() {
        // Unknown extensions, none repeated: the most a hello may carry.
        let unknown = |n: usize| -> Vec<(u16, Vec<u8>)> {
            (0..n).map(|i| (0x7000 + i as u16, Vec::new())).collect()
        };
        let hello = parse_body(&hello_body(4, &unknown(MAX_EXTENSIONS))).unwrap();
        assert_eq!(hello.extensions.len(), MAX_EXTENSIONS);
        assert_eq!(
            parse_body(&hello_body(4, &unknown(MAX_EXTENSIONS + 1))).err(),
            Some(ParseError::Malformed("more than 128 extensions"))
        );
        // Thousands of them (a 64 KiB hello) are refused as quickly.
        assert!(parse_body(&hello_body(4, &unknown(16_000))).is_err());

        assert_eq!(
            parse_body(&hello_body(MAX_LIST, &[]))
                .unwrap()
                .cipher_suites
                .len(),
            256
        );
        assert_eq!(
            parse_body(&hello_body(MAX_LIST + 1, &[])).err(),
            Some(ParseError::Malformed("more than 256 cipher_suites"))
        );
        // A list inside an extension past the bound: that extension is
        // malformed, the hello still read.
        let groups = |n| hello_body(4, &[(ext::SUPPORTED_GROUPS, u16_vector_of(n))]);
        let hello = parse_body(&groups(MAX_LIST)).unwrap();
        assert_eq!(hello.supported_groups.map(|g| g.len()), Some(MAX_LIST));
        let hello = parse_body(&groups(MAX_LIST + 1)).unwrap();
        assert_eq!(hello.supported_groups, None);
        assert_eq!(hello.malformed_extensions, [ext::SUPPORTED_GROUPS]);
    }

    #[test]
    fn grease_values() {
        let all: Vec<u16> = (0..=u16::MAX).filter(|v| is_grease(*v)).collect();
        assert_eq!(all.len(), 16);
        assert_eq!(all[0], 0x0a0a);
        assert_eq!(all[15], 0xfafa);
        assert!(!is_grease(0x0a1a));
        let modes: Vec<u8> = (0..=u8::MAX).filter(|v| is_grease_psk_mode(*v)).collect();
        assert_eq!(modes, [0x0b, 0x2a, 0x49, 0x68, 0x87, 0xa6, 0xc5, 0xe4]);
        assert!(is_grease_alpn(b"\x3a\x3a"));
        assert!(!is_grease_alpn(b"h2"));
    }

    #[test]
    fn rejects_non_tls_early() {
        assert_eq!(
            handshake_len_needed(b"G"),
            Progress::Failed(ParseError::NotHandshake(b'G'))
        );
        assert_eq!(
            handshake_len_needed(&[22, 2]),
            Progress::Failed(ParseError::BadRecordVersion(2))
        );
        assert_eq!(handshake_len_needed(&[22, 3, 1, 0]), Progress::NeedMore);
        assert_eq!(
            handshake_len_needed(&[22, 3, 1, 0, 4, 2]),
            Progress::Failed(ParseError::NotClientHello(2))
        );
        assert_eq!(handshake_len_needed(&[]), Progress::NeedMore);
    }

    #[test]
    fn refuses_oversized_and_empty_records() {
        // Handshake header declaring 16 MB.
        assert_eq!(
            handshake_len_needed(&[22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]),
            Progress::Failed(ParseError::TooLarge(0xff_ffff + 4))
        );
        assert_eq!(
            handshake_len_needed(&[22, 3, 1, 0, 0]),
            Progress::Failed(ParseError::BadRecordLength(0))
        );
        assert_eq!(
            handshake_len_needed(&[22, 3, 1, 0x40, 0x01]),
            Progress::Failed(ParseError::BadRecordLength(0x4001))
        );
    }

    #[test]
    fn refuses_one_byte_records_past_the_bound() {
        // A 40 000-byte hello declared, then sent one byte per record.
        let mut buf = vec![22, 3, 1, 0, 4, 1, 0, 0x9c, 0x40];
        for _ in 0..MAX_RECORDS {
            buf.extend_from_slice(&[22, 3, 1, 0, 1, 0]);
        }
        assert_eq!(
            handshake_len_needed(&buf),
            Progress::Failed(ParseError::TooManyRecords)
        );
    }
}
