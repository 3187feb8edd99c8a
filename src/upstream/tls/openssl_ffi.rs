//! The system's OpenSSL (`libssl.so.3`), loaded at run time: the only
//! `unsafe` code of the OpenSSL upstream stack ([`super::openssl_stack`]).
//!
//! Why at run time and not through `openssl-sys`: `boring-sys` declares
//! `links = "boringssl"` and its static archives export the same unprefixed
//! `SSL_*`/`CRYPTO_*` names OpenSSL does, so linking `openssl-sys` next to
//! it resolves OpenSSL's symbols to BoringSSL's archives (measured in the
//! upstream-fingerprint prototype). Loading `libssl.so.3` with `dlopen`
//! instead keeps the two apart:
//!
//! - the pinproxy executable exports no BoringSSL symbol dynamically (a
//!   Rust executable is linked without `-rdynamic`; `nm -D
//!   target/debug/pinproxy` lists only imports from libc, libstdc++ and
//!   libgcc, and `nm -D target/debug/pinproxy | grep -c ' SSL_new'` is 0),
//!   so the global symbol scope the dynamic linker searches first holds no
//!   `SSL_*`, `CRYPTO_*` or `EVP_*` definition, and libssl's references
//!   bind to its own dependency, `libcrypto.so.3` (the only `OPENSSL_*`
//!   names `nm -D` shows are BoringSSL's own undefined weak hooks,
//!   `OPENSSL_memory_*`, bound once at start, before OpenSSL is loaded);
//! - the libraries are opened with `RTLD_NOW | RTLD_LOCAL`: every symbol is
//!   bound at load (a missing one fails the load, not a later call) and
//!   none of OpenSSL's symbols joins the global scope, so nothing else in
//!   the process (BoringSSL's code, linked statically) can bind to them;
//! - before loading, [`load`] checks the global scope once more for a
//!   symbol only BoringSSL has (`SSL_CTX_set_grease_enabled`) and for
//!   `SSL_CTX_new`: if a build ever exports them (`-rdynamic`, a cdylib),
//!   the OpenSSL stack stays off rather than risk a mixed binding.
//!   `RTLD_DEEPBIND` would also make libssl prefer its own dependencies, but
//!   it breaks symbol interposition for the whole library (an `LD_PRELOAD`
//!   allocator, sanitizers refuse it outright) and is not needed while the
//!   check above holds, so it is not used.
//!
//! Each function is resolved once into a table of typed pointers ([`Api`],
//! kept for the life of the process in a `OnceLock`; the libraries are
//! never closed, so the pointers never dangle). If a library or a symbol is
//! missing the stack is unavailable and mirror mode stays on BoringSSL.
//!
//! Many OpenSSL "functions" are macros over `SSL_CTX_ctrl`/`SSL_ctrl`/
//! `BIO_ctrl`; those are called with the command numbers of OpenSSL 3.0's
//! headers, named below (they are ABI: unchanged from 1.1.1 to 3.5).
//!
//! Ownership: every pointer is held by a small RAII wrapper whose `Drop`
//! frees it ([`Ctx`], [`Store`], [`Ssl`], and the private `X509`/`Bio`
//! holders); the memory BIOs an [`Ssl`] pumps belong to its `SSL*` after
//! `SSL_set_bio` and are freed by `SSL_free`.
//!
//! OpenSSL's error queue is per thread: every call that can fail is
//! preceded by `ERR_clear_error` and its queue is read right after it, in
//! the same synchronous function, so a task moving between threads at an
//! `.await` cannot mix queues.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_long, c_uint, c_ulong, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

/// `SSL_CTRL_MODE` (`SSL_CTX_set_mode`).
const SSL_CTRL_MODE: c_int = 33;
/// `SSL_CTRL_SET_SESS_CACHE_MODE` (`SSL_CTX_set_session_cache_mode`).
const SSL_CTRL_SET_SESS_CACHE_MODE: c_int = 44;
/// `SSL_CTRL_SET_TLSEXT_HOSTNAME` (`SSL_set_tlsext_host_name`).
const SSL_CTRL_SET_TLSEXT_HOSTNAME: c_int = 55;
/// `SSL_CTRL_SET_TLSEXT_STATUS_REQ_TYPE` (`SSL_CTX_set_tlsext_status_type`).
const SSL_CTRL_SET_TLSEXT_STATUS_REQ_TYPE: c_int = 65;
/// `SSL_CTRL_SET_GROUPS_LIST` (`SSL_CTX_set1_groups_list`).
const SSL_CTRL_SET_GROUPS_LIST: c_int = 92;
/// `SSL_CTRL_SET_SIGALGS_LIST` (`SSL_CTX_set1_sigalgs_list`).
const SSL_CTRL_SET_SIGALGS_LIST: c_int = 98;
/// `SSL_CTRL_SET_MIN_PROTO_VERSION` (`SSL_CTX_set_min_proto_version`).
const SSL_CTRL_SET_MIN_PROTO_VERSION: c_int = 123;
/// `SSL_CTRL_SET_MAX_PROTO_VERSION` (`SSL_CTX_set_max_proto_version`).
const SSL_CTRL_SET_MAX_PROTO_VERSION: c_int = 124;
/// `BIO_C_SET_BUF_MEM_EOF_RETURN` (`BIO_set_mem_eof_return`).
const BIO_C_SET_BUF_MEM_EOF_RETURN: c_int = 130;
/// `TLSEXT_NAMETYPE_host_name`.
const TLSEXT_NAMETYPE_HOST_NAME: c_long = 0;
/// `TLSEXT_STATUSTYPE_ocsp`.
const TLSEXT_STATUSTYPE_OCSP: c_long = 1;
/// `TLS1_3_VERSION`, as `SSL_SESSION_get_protocol_version` returns it.
const TLS1_3_VERSION: c_int = 0x0304;
/// `SSL_SESS_CACHE_OFF`.
const SSL_SESS_CACHE_OFF: c_long = 0;
/// `SSL_VERIFY_PEER`.
const SSL_VERIFY_PEER: c_int = 1;
/// `X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS`: `f*.example.com` does not match.
const X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS: c_uint = 0x4;
/// `OPENSSL_VERSION` (`OpenSSL_version`'s "OpenSSL 3.0.19 27 Jan 2026").
const OPENSSL_VERSION: c_int = 0;
/// `OPENSSL_INIT_NO_ATEXIT`: no cleanup handler at process exit, where it
/// would free OpenSSL's state under runtime threads still holding
/// connections (the library is never unloaded either).
const OPENSSL_INIT_NO_ATEXIT: u64 = 0x0008_0000;
/// First OpenSSL 3 release number (`OpenSSL_version_num`).
const OPENSSL_3: c_ulong = 0x3000_0000;

/// `SSL_get_error` results.
const SSL_ERROR_SSL: c_int = 1;
const SSL_ERROR_WANT_READ: c_int = 2;
const SSL_ERROR_WANT_WRITE: c_int = 3;
const SSL_ERROR_SYSCALL: c_int = 5;
const SSL_ERROR_ZERO_RETURN: c_int = 6;

/// `SSL_OP_*` bits this stack sets or clears (OpenSSL 3.0 `ssl.h`).
pub mod op {
    /// Leave extended_master_secret (23) out.
    pub const NO_EXTENDED_MASTER_SECRET: u64 = 1 << 0;
    /// Pad the hello to 512 bytes when it is 256-511 (padding, 21).
    pub const TLSEXT_PADDING: u64 = 1 << 4;
    /// A peer closing without close_notify ends the stream (as BoringSSL
    /// streams do in `boring`), not an error.
    pub const IGNORE_UNEXPECTED_EOF: u64 = 1 << 7;
    /// Leave session_ticket (35) out.
    pub const NO_TICKET: u64 = 1 << 14;
    /// Leave encrypt_then_mac (22) out.
    pub const NO_ENCRYPT_THEN_MAC: u64 = 1 << 19;
    /// A 32-byte legacy session id (TLS 1.3 middlebox compatibility).
    pub const ENABLE_MIDDLEBOX_COMPAT: u64 = 1 << 20;
    /// Refuse a renegotiation the server asks for (BoringSSL refuses it
    /// by default): each would be a full handshake an origin could repeat
    /// without end on a pooled connection.
    pub const NO_RENEGOTIATION: u64 = 1 << 30;
}

/// `SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER`:
/// a write may be retried with another buffer (an async caller's buffer
/// moves between polls).
const SSL_MODE_PARTIAL_AND_MOVING: c_long = 0x1 | 0x2;

// Opaque C types: only ever behind pointers.
#[repr(C)]
struct SslMethod {
    _opaque: [u8; 0],
}
#[repr(C)]
struct SslCtxC {
    _opaque: [u8; 0],
}
#[repr(C)]
struct SslC {
    _opaque: [u8; 0],
}
#[repr(C)]
struct SslCipherC {
    _opaque: [u8; 0],
}
#[repr(C)]
struct SslSessionC {
    _opaque: [u8; 0],
}
#[repr(C)]
struct BioC {
    _opaque: [u8; 0],
}
#[repr(C)]
struct BioMethod {
    _opaque: [u8; 0],
}
#[repr(C)]
struct X509StoreC {
    _opaque: [u8; 0],
}
#[repr(C)]
struct X509C {
    _opaque: [u8; 0],
}

type VerifyCallback = Option<unsafe extern "C" fn(c_int, *mut c_void) -> c_int>;

/// The OpenSSL functions this stack calls, with OpenSSL 3.0's signatures.
struct Api {
    // libcrypto
    openssl_version: unsafe extern "C" fn(c_int) -> *const c_char,
    openssl_version_num: unsafe extern "C" fn() -> c_ulong,
    err_get_error: unsafe extern "C" fn() -> c_ulong,
    err_error_string_n: unsafe extern "C" fn(c_ulong, *mut c_char, usize),
    err_clear_error: unsafe extern "C" fn(),
    bio_s_mem: unsafe extern "C" fn() -> *const BioMethod,
    bio_new: unsafe extern "C" fn(*const BioMethod) -> *mut BioC,
    bio_free: unsafe extern "C" fn(*mut BioC) -> c_int,
    bio_read: unsafe extern "C" fn(*mut BioC, *mut c_void, c_int) -> c_int,
    bio_write: unsafe extern "C" fn(*mut BioC, *const c_void, c_int) -> c_int,
    bio_ctrl: unsafe extern "C" fn(*mut BioC, c_int, c_long, *mut c_void) -> c_long,
    bio_ctrl_pending: unsafe extern "C" fn(*mut BioC) -> usize,
    x509_store_new: unsafe extern "C" fn() -> *mut X509StoreC,
    x509_store_free: unsafe extern "C" fn(*mut X509StoreC),
    x509_store_add_cert: unsafe extern "C" fn(*mut X509StoreC, *mut X509C) -> c_int,
    d2i_x509: unsafe extern "C" fn(*mut *mut X509C, *mut *const u8, c_long) -> *mut X509C,
    x509_free: unsafe extern "C" fn(*mut X509C),
    x509_verify_cert_error_string: unsafe extern "C" fn(c_long) -> *const c_char,
    // libssl
    openssl_init_ssl: unsafe extern "C" fn(u64, *const c_void) -> c_int,
    tls_client_method: unsafe extern "C" fn() -> *const SslMethod,
    ssl_ctx_new: unsafe extern "C" fn(*const SslMethod) -> *mut SslCtxC,
    ssl_ctx_free: unsafe extern "C" fn(*mut SslCtxC),
    ssl_ctx_ctrl: unsafe extern "C" fn(*mut SslCtxC, c_int, c_long, *mut c_void) -> c_long,
    ssl_ctx_set_cipher_list: unsafe extern "C" fn(*mut SslCtxC, *const c_char) -> c_int,
    ssl_ctx_set_ciphersuites: unsafe extern "C" fn(*mut SslCtxC, *const c_char) -> c_int,
    ssl_ctx_set_options: unsafe extern "C" fn(*mut SslCtxC, u64) -> u64,
    ssl_ctx_clear_options: unsafe extern "C" fn(*mut SslCtxC, u64) -> u64,
    ssl_ctx_get_security_level: unsafe extern "C" fn(*const SslCtxC) -> c_int,
    ssl_ctx_set_security_level: unsafe extern "C" fn(*mut SslCtxC, c_int),
    ssl_ctx_set_post_handshake_auth: unsafe extern "C" fn(*mut SslCtxC, c_int),
    ssl_ctx_set_alpn_protos: unsafe extern "C" fn(*mut SslCtxC, *const u8, c_uint) -> c_int,
    ssl_ctx_set_verify: unsafe extern "C" fn(*mut SslCtxC, c_int, VerifyCallback),
    ssl_ctx_set1_cert_store: unsafe extern "C" fn(*mut SslCtxC, *mut X509StoreC),
    ssl_new: unsafe extern "C" fn(*mut SslCtxC) -> *mut SslC,
    ssl_free: unsafe extern "C" fn(*mut SslC),
    ssl_ctrl: unsafe extern "C" fn(*mut SslC, c_int, c_long, *mut c_void) -> c_long,
    ssl_set_bio: unsafe extern "C" fn(*mut SslC, *mut BioC, *mut BioC),
    ssl_set1_host: unsafe extern "C" fn(*mut SslC, *const c_char) -> c_int,
    ssl_set_hostflags: unsafe extern "C" fn(*mut SslC, c_uint),
    ssl_connect: unsafe extern "C" fn(*mut SslC) -> c_int,
    ssl_read: unsafe extern "C" fn(*mut SslC, *mut c_void, c_int) -> c_int,
    ssl_write: unsafe extern "C" fn(*mut SslC, *const c_void, c_int) -> c_int,
    ssl_shutdown: unsafe extern "C" fn(*mut SslC) -> c_int,
    ssl_get_error: unsafe extern "C" fn(*const SslC, c_int) -> c_int,
    ssl_get0_alpn_selected: unsafe extern "C" fn(*const SslC, *mut *const u8, *mut c_uint),
    ssl_get_verify_result: unsafe extern "C" fn(*const SslC) -> c_long,
    ssl_cipher_find: unsafe extern "C" fn(*mut SslC, *const u8) -> *const SslCipherC,
    ssl_cipher_get_name: unsafe extern "C" fn(*const SslCipherC) -> *const c_char,
    ssl_set_session: unsafe extern "C" fn(*mut SslC, *mut SslSessionC) -> c_int,
    ssl_get_session: unsafe extern "C" fn(*const SslC) -> *mut SslSessionC,
    ssl_session_reused: unsafe extern "C" fn(*const SslC) -> c_int,
    ssl_session_free: unsafe extern "C" fn(*mut SslSessionC),
    i2d_ssl_session: unsafe extern "C" fn(*const SslSessionC, *mut *mut u8) -> c_int,
    d2i_ssl_session:
        unsafe extern "C" fn(*mut *mut SslSessionC, *mut *const u8, c_long) -> *mut SslSessionC,
    ssl_session_is_resumable: unsafe extern "C" fn(*const SslSessionC) -> c_int,
    ssl_session_has_ticket: unsafe extern "C" fn(*const SslSessionC) -> c_int,
    ssl_session_get_protocol_version: unsafe extern "C" fn(*const SslSessionC) -> c_int,
    /// Keep the libraries (and so every pointer above) loaded for ever.
    _libssl: Library,
    _libcrypto: Library,
    /// `OpenSSL_version(OPENSSL_VERSION)`.
    version: String,
}

/// Resolves `name` in `lib` as a `T`.
///
/// # Safety
/// `T` must be the exact C type of the symbol `name` (a function pointer
/// with its signature), and `lib` must stay loaded while the result is
/// used.
unsafe fn symbol<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    let mut bytes = Vec::with_capacity(name.len().saturating_add(1));
    bytes.extend_from_slice(name.as_bytes());
    bytes.push(0);
    // SAFETY: the caller vouches for `T`; `bytes` is NUL-terminated. glibc's
    // dlsym never returns NULL for a function it defines, and an undefined
    // name is an error (dlerror), not a null pointer.
    unsafe { lib.get::<T>(&bytes) }
        .map(|found| *found)
        .map_err(|e| format!("{name}: {e}"))
}

/// Symbols only BoringSSL defines (and one both define): found in the
/// process's global scope they mean this executable exports BoringSSL
/// dynamically, and a dlopened libssl could bind to it.
const EXPORTED_BORINGSSL_PROBES: [&str; 2] = ["SSL_CTX_set_grease_enabled", "SSL_CTX_new"];

/// Loads `libssl.so.3` and `libcrypto.so.3` and resolves [`Api`].
fn load() -> Result<Api, String> {
    let this = Library::this();
    for probe in EXPORTED_BORINGSSL_PROBES {
        // SAFETY: the symbol is only looked up, never called or read: a
        // `*mut c_void` is the right type for any symbol.
        if unsafe { symbol::<*mut c_void>(&this, probe) }.is_ok() {
            return Err(format!(
                "this executable exports {probe} dynamically (BoringSSL): a dlopened OpenSSL could bind to it"
            ));
        }
    }
    // SAFETY: loading runs the libraries' ELF constructors; OpenSSL's only
    // register its own state (and an atexit cleanup). RTLD_LOCAL keeps
    // their symbols out of the global scope.
    let libcrypto = unsafe { Library::open(Some("libcrypto.so.3"), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|e| format!("libcrypto.so.3: {e}"))?;
    // SAFETY: as above.
    let libssl = unsafe { Library::open(Some("libssl.so.3"), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|e| format!("libssl.so.3: {e}"))?;
    let (c, s) = (&libcrypto, &libssl);
    // SAFETY: every type below is copied from the declaration of the same
    // name in OpenSSL 3.0's headers (crypto.h, err.h, bio.h, x509.h,
    // x509_vfy.h, ssl.h); both libraries are stored in the returned `Api`
    // next to the pointers and never unloaded.
    let api = unsafe {
        Api {
            openssl_version: symbol(c, "OpenSSL_version")?,
            openssl_version_num: symbol(c, "OpenSSL_version_num")?,
            err_get_error: symbol(c, "ERR_get_error")?,
            err_error_string_n: symbol(c, "ERR_error_string_n")?,
            err_clear_error: symbol(c, "ERR_clear_error")?,
            bio_s_mem: symbol(c, "BIO_s_mem")?,
            bio_new: symbol(c, "BIO_new")?,
            bio_free: symbol(c, "BIO_free")?,
            bio_read: symbol(c, "BIO_read")?,
            bio_write: symbol(c, "BIO_write")?,
            bio_ctrl: symbol(c, "BIO_ctrl")?,
            bio_ctrl_pending: symbol(c, "BIO_ctrl_pending")?,
            x509_store_new: symbol(c, "X509_STORE_new")?,
            x509_store_free: symbol(c, "X509_STORE_free")?,
            x509_store_add_cert: symbol(c, "X509_STORE_add_cert")?,
            d2i_x509: symbol(c, "d2i_X509")?,
            x509_free: symbol(c, "X509_free")?,
            x509_verify_cert_error_string: symbol(c, "X509_verify_cert_error_string")?,
            openssl_init_ssl: symbol(s, "OPENSSL_init_ssl")?,
            tls_client_method: symbol(s, "TLS_client_method")?,
            ssl_ctx_new: symbol(s, "SSL_CTX_new")?,
            ssl_ctx_free: symbol(s, "SSL_CTX_free")?,
            ssl_ctx_ctrl: symbol(s, "SSL_CTX_ctrl")?,
            ssl_ctx_set_cipher_list: symbol(s, "SSL_CTX_set_cipher_list")?,
            ssl_ctx_set_ciphersuites: symbol(s, "SSL_CTX_set_ciphersuites")?,
            ssl_ctx_set_options: symbol(s, "SSL_CTX_set_options")?,
            ssl_ctx_clear_options: symbol(s, "SSL_CTX_clear_options")?,
            ssl_ctx_get_security_level: symbol(s, "SSL_CTX_get_security_level")?,
            ssl_ctx_set_security_level: symbol(s, "SSL_CTX_set_security_level")?,
            ssl_ctx_set_post_handshake_auth: symbol(s, "SSL_CTX_set_post_handshake_auth")?,
            ssl_ctx_set_alpn_protos: symbol(s, "SSL_CTX_set_alpn_protos")?,
            ssl_ctx_set_verify: symbol(s, "SSL_CTX_set_verify")?,
            ssl_ctx_set1_cert_store: symbol(s, "SSL_CTX_set1_cert_store")?,
            ssl_new: symbol(s, "SSL_new")?,
            ssl_free: symbol(s, "SSL_free")?,
            ssl_ctrl: symbol(s, "SSL_ctrl")?,
            ssl_set_bio: symbol(s, "SSL_set_bio")?,
            ssl_set1_host: symbol(s, "SSL_set1_host")?,
            ssl_set_hostflags: symbol(s, "SSL_set_hostflags")?,
            ssl_connect: symbol(s, "SSL_connect")?,
            ssl_read: symbol(s, "SSL_read")?,
            ssl_write: symbol(s, "SSL_write")?,
            ssl_shutdown: symbol(s, "SSL_shutdown")?,
            ssl_get_error: symbol(s, "SSL_get_error")?,
            ssl_get0_alpn_selected: symbol(s, "SSL_get0_alpn_selected")?,
            ssl_get_verify_result: symbol(s, "SSL_get_verify_result")?,
            ssl_cipher_find: symbol(s, "SSL_CIPHER_find")?,
            ssl_cipher_get_name: symbol(s, "SSL_CIPHER_get_name")?,
            ssl_set_session: symbol(s, "SSL_set_session")?,
            ssl_get_session: symbol(s, "SSL_get_session")?,
            ssl_session_reused: symbol(s, "SSL_session_reused")?,
            ssl_session_free: symbol(s, "SSL_SESSION_free")?,
            i2d_ssl_session: symbol(s, "i2d_SSL_SESSION")?,
            d2i_ssl_session: symbol(s, "d2i_SSL_SESSION")?,
            ssl_session_is_resumable: symbol(s, "SSL_SESSION_is_resumable")?,
            ssl_session_has_ticket: symbol(s, "SSL_SESSION_has_ticket")?,
            ssl_session_get_protocol_version: symbol(s, "SSL_SESSION_get_protocol_version")?,
            _libssl: libssl,
            _libcrypto: libcrypto,
            version: String::new(),
        }
    };
    // SAFETY: the first initialisation call, with no settings (NULL): it
    // loads the system configuration as any OpenSSL client's first call
    // does, without registering the exit handler.
    if unsafe { (api.openssl_init_ssl)(OPENSSL_INIT_NO_ATEXIT, std::ptr::null()) } != 1 {
        return Err("OPENSSL_init_ssl failed".into());
    }
    // SAFETY: a plain getter without arguments.
    let number = unsafe { (api.openssl_version_num)() };
    // SAFETY: OpenSSL_version returns a pointer to a static NUL-terminated
    // string (never NULL for OPENSSL_VERSION).
    let text = unsafe { c_text((api.openssl_version)(OPENSSL_VERSION)) };
    if number < OPENSSL_3 {
        return Err(format!("{text}: OpenSSL 3 is needed"));
    }
    Ok(Api {
        version: text,
        ..api
    })
}

/// Copies a C string OpenSSL returned (empty for NULL).
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn c_text(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: as the caller vouches.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn api() -> Result<&'static Api, Error> {
    API.get_or_init(load)
        .as_ref()
        .map_err(|why| Error(why.clone()))
}

/// Which OpenSSL was loaded (`OpenSSL 3.0.19 27 Jan 2026`), or why none
/// could be. Loads it on the first call.
pub fn version() -> Result<&'static str, Error> {
    api().map(|api| api.version.as_str())
}

/// For tests of what needs the system OpenSSL: whether it loaded. A
/// machine without it fails them (a skip would pass them unseen, and the
/// clients it says are curl, Python and Node), unless
/// `PINPROXY_TEST_WITHOUT_OPENSSL` is set, which skips them out loud.
#[cfg(test)]
pub(crate) fn loaded_for_tests() -> bool {
    match version() {
        Ok(_) => true,
        Err(why) if std::env::var_os("PINPROXY_TEST_WITHOUT_OPENSSL").is_some() => {
            eprintln!("OpenSSL unavailable ({why}): skipped (PINPROXY_TEST_WITHOUT_OPENSSL)");
            false
        }
        Err(why) => panic!(
            "OpenSSL unavailable ({why}): install libssl3 (scripts/test.sh does), or set \
             PINPROXY_TEST_WITHOUT_OPENSSL=1 to skip the tests that need it"
        ),
    }
}

/// OpenSSL failed or refused something; the text says what, with
/// OpenSSL's own error strings where it left any.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

/// Empties this thread's OpenSSL error queue.
fn clear_errors(api: &Api) {
    // SAFETY: no arguments; touches only this thread's queue.
    unsafe { (api.err_clear_error)() }
}

/// Most queued OpenSSL errors read into one message.
const MAX_QUEUED_ERRORS: usize = 8;

/// Drains this thread's OpenSSL error queue into one line.
fn queued_errors(api: &Api) -> String {
    let mut out = Vec::new();
    for _ in 0..MAX_QUEUED_ERRORS {
        // SAFETY: no arguments; pops from this thread's queue.
        let code = unsafe { (api.err_get_error)() };
        if code == 0 {
            break;
        }
        let mut buf = [0 as c_char; 256];
        // SAFETY: `buf` is writable for its length; OpenSSL writes at most
        // `len` bytes including the terminating NUL.
        let text = unsafe {
            (api.err_error_string_n)(code, buf.as_mut_ptr(), buf.len());
            c_text(buf.as_ptr())
        };
        out.push(text);
    }
    clear_errors(api);
    out.join("; ")
}

fn failed(api: &Api, what: &str) -> Error {
    let queued = queued_errors(api);
    if queued.is_empty() {
        Error(format!("OpenSSL refused {what}"))
    } else {
        Error(format!("OpenSSL refused {what}: {queued}"))
    }
}

fn c_string(text: &str) -> Result<CString, Error> {
    CString::new(text).map_err(|_| Error(format!("{text:?} holds a NUL byte")))
}

// ---------------------------------------------------------------- X509_STORE

/// An `X509_STORE` of trusted roots, shared by every [`Ctx`] (each holds a
/// reference of its own).
pub struct Store {
    api: &'static Api,
    ptr: NonNull<X509StoreC>,
}

// SAFETY: an X509_STORE is reference-counted and locks internally for
// lookups; certificates are only added through `&mut self` before the
// store is shared.
unsafe impl Send for Store {}
// SAFETY: as above: shared use is read-only and locked by OpenSSL.
unsafe impl Sync for Store {}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a live store we hold one reference to.
        unsafe { (self.api.x509_store_free)(self.ptr.as_ptr()) }
    }
}

/// An `X509` being added to a store.
struct X509 {
    api: &'static Api,
    ptr: NonNull<X509C>,
}

impl Drop for X509 {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a live certificate we hold one reference to.
        unsafe { (self.api.x509_free)(self.ptr.as_ptr()) }
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Result<Store, Error> {
        let api = api()?;
        // SAFETY: no arguments; returns a new store or NULL.
        let ptr = unsafe { (api.x509_store_new)() };
        NonNull::new(ptr)
            .map(|ptr| Store { api, ptr })
            .ok_or_else(|| failed(api, "a new X509_STORE"))
    }

    /// Trusts the DER certificate `der`.
    pub fn add_der(&mut self, der: &[u8]) -> Result<(), Error> {
        let api = self.api;
        let len = c_long::try_from(der.len()).map_err(|_| Error("certificate too large".into()))?;
        let mut cursor = der.as_ptr();
        clear_errors(api);
        // SAFETY: `cursor` points to `len` readable bytes; d2i_X509 with a
        // NULL first argument allocates a new X509 (or returns NULL) and
        // only advances `cursor`.
        let cert = unsafe { (api.d2i_x509)(std::ptr::null_mut(), &mut cursor, len) };
        let cert = NonNull::new(cert)
            .map(|ptr| X509 { api, ptr })
            .ok_or_else(|| failed(api, "a certificate"))?;
        // SAFETY: both pointers are live; the store takes its own reference
        // to the certificate, ours is released when `cert` drops.
        let added = unsafe { (api.x509_store_add_cert)(self.ptr.as_ptr(), cert.ptr.as_ptr()) };
        if added == 1 {
            Ok(())
        } else {
            Err(failed(api, "a root certificate"))
        }
    }
}

// ---------------------------------------------------------------- SSL_CTX

/// An `SSL_CTX` for client connections: configured through `&mut self`,
/// then shared read-only by every connection made from it.
pub struct Ctx {
    api: &'static Api,
    ptr: NonNull<SslCtxC>,
}

// SAFETY: an SSL_CTX is reference-counted and OpenSSL locks what SSL_new
// reads from it; after configuration (through `&mut self` only) it is
// used only as the argument of SSL_new.
unsafe impl Send for Ctx {}
// SAFETY: as above.
unsafe impl Sync for Ctx {}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a live SSL_CTX we hold one reference to (each
        // SSL made from it holds its own).
        unsafe { (self.api.ssl_ctx_free)(self.ptr.as_ptr()) }
    }
}

impl Ctx {
    /// A new client context (`TLS_client_method`), with OpenSSL's
    /// defaults as the system configuration leaves them.
    pub fn new_client() -> Result<Ctx, Error> {
        let api = api()?;
        clear_errors(api);
        // SAFETY: TLS_client_method returns a static method table;
        // SSL_CTX_new returns a new context or NULL.
        let ptr = unsafe { (api.ssl_ctx_new)((api.tls_client_method)()) };
        NonNull::new(ptr)
            .map(|ptr| Ctx { api, ptr })
            .ok_or_else(|| failed(api, "a new SSL_CTX"))
    }

    fn ctrl(&mut self, cmd: c_int, larg: c_long, parg: *mut c_void) -> c_long {
        // SAFETY: `ptr` is a live SSL_CTX; every caller passes a command
        // whose `parg` is NULL or a NUL-terminated string that outlives the
        // call (OpenSSL copies what it keeps).
        unsafe { (self.api.ssl_ctx_ctrl)(self.ptr.as_ptr(), cmd, larg, parg) }
    }

    fn ctrl_text(&mut self, cmd: c_int, text: &str, what: &str) -> Result<(), Error> {
        let text = c_string(text)?;
        clear_errors(self.api);
        if self.ctrl(cmd, 0, text.as_ptr().cast_mut().cast()) == 1 {
            Ok(())
        } else {
            Err(failed(self.api, what))
        }
    }

    /// The TLS 1.2 cipher list (`SSL_CTX_set_cipher_list`), OpenSSL names
    /// separated by `:`.
    pub fn set_cipher_list(&mut self, list: &str) -> Result<(), Error> {
        let text = c_string(list)?;
        clear_errors(self.api);
        // SAFETY: live SSL_CTX and a NUL-terminated string OpenSSL parses
        // during the call.
        let ok = unsafe { (self.api.ssl_ctx_set_cipher_list)(self.ptr.as_ptr(), text.as_ptr()) };
        if ok == 1 {
            Ok(())
        } else {
            Err(failed(self.api, "the cipher list"))
        }
    }

    /// The TLS 1.3 suites (`SSL_CTX_set_ciphersuites`), in order.
    pub fn set_ciphersuites(&mut self, list: &str) -> Result<(), Error> {
        let text = c_string(list)?;
        clear_errors(self.api);
        // SAFETY: live SSL_CTX and a NUL-terminated string OpenSSL parses
        // during the call.
        let ok = unsafe { (self.api.ssl_ctx_set_ciphersuites)(self.ptr.as_ptr(), text.as_ptr()) };
        if ok == 1 {
            Ok(())
        } else {
            Err(failed(self.api, "the TLS 1.3 suites"))
        }
    }

    /// supported_groups (`SSL_CTX_set1_groups_list`), names separated by
    /// `:` (a `*` before a name asks for its key share on OpenSSL 3.5+).
    pub fn set_groups_list(&mut self, list: &str) -> Result<(), Error> {
        self.ctrl_text(SSL_CTRL_SET_GROUPS_LIST, list, "the groups")
    }

    /// signature_algorithms (`SSL_CTX_set1_sigalgs_list`), in order.
    pub fn set_sigalgs_list(&mut self, list: &str) -> Result<(), Error> {
        self.ctrl_text(SSL_CTRL_SET_SIGALGS_LIST, list, "the signature algorithms")
    }

    /// The lowest and highest protocol versions (`0x0301`..`0x0304`).
    pub fn set_proto_versions(&mut self, min: u16, max: u16) -> Result<(), Error> {
        clear_errors(self.api);
        let min_ok = self.ctrl(
            SSL_CTRL_SET_MIN_PROTO_VERSION,
            c_long::from(min),
            std::ptr::null_mut(),
        );
        let max_ok = self.ctrl(
            SSL_CTRL_SET_MAX_PROTO_VERSION,
            c_long::from(max),
            std::ptr::null_mut(),
        );
        if min_ok == 1 && max_ok == 1 {
            Ok(())
        } else {
            Err(failed(self.api, "the protocol versions"))
        }
    }

    /// Sets the `SSL_OP_*` bits `set` and clears those of `clear` (see
    /// [`op`]).
    pub fn set_options(&mut self, set: u64, clear: u64) {
        // SAFETY: live SSL_CTX; plain bit operations on its options.
        unsafe {
            (self.api.ssl_ctx_clear_options)(self.ptr.as_ptr(), clear);
            (self.api.ssl_ctx_set_options)(self.ptr.as_ptr(), set);
        }
    }

    /// The security level in force (0 to 5: what the system's OpenSSL
    /// configuration set, or [`Ctx::set_security_level`]).
    pub fn security_level(&self) -> c_int {
        // SAFETY: live SSL_CTX; reads a field.
        unsafe { (self.api.ssl_ctx_get_security_level)(self.ptr.as_ptr()) }
    }

    /// Sets the security level (`SSL_CTX_set_security_level`): from 1 up,
    /// no suite without authentication or encryption and no key under 80
    /// bits is offered or accepted.
    pub fn set_security_level(&mut self, level: c_int) {
        // SAFETY: live SSL_CTX; sets a field.
        unsafe { (self.api.ssl_ctx_set_security_level)(self.ptr.as_ptr(), level) }
    }

    /// Offers post_handshake_auth (49).
    pub fn set_post_handshake_auth(&mut self, on: bool) {
        // SAFETY: live SSL_CTX; sets a flag.
        unsafe { (self.api.ssl_ctx_set_post_handshake_auth)(self.ptr.as_ptr(), c_int::from(on)) }
    }

    /// ALPN, in wire form (each name prefixed by its length).
    pub fn set_alpn_protos(&mut self, wire: &[u8]) -> Result<(), Error> {
        let len = c_uint::try_from(wire.len()).map_err(|_| Error("ALPN list too long".into()))?;
        clear_errors(self.api);
        // SAFETY: live SSL_CTX; `wire` is readable for `len` bytes and
        // OpenSSL copies it.
        let result =
            unsafe { (self.api.ssl_ctx_set_alpn_protos)(self.ptr.as_ptr(), wire.as_ptr(), len) };
        // Unlike most of OpenSSL, 0 is success here.
        if result == 0 {
            Ok(())
        } else {
            Err(failed(self.api, "the ALPN list"))
        }
    }

    /// Asks for an OCSP staple (status_request, 5).
    pub fn request_ocsp(&mut self) -> Result<(), Error> {
        clear_errors(self.api);
        if self.ctrl(
            SSL_CTRL_SET_TLSEXT_STATUS_REQ_TYPE,
            TLSEXT_STATUSTYPE_OCSP,
            std::ptr::null_mut(),
        ) == 1
        {
            Ok(())
        } else {
            Err(failed(self.api, "the OCSP status request"))
        }
    }

    /// No session cache of the context's (a session is resumed only when
    /// offered with [`Ssl::offer_session`]) and writes that may be retried
    /// from a moved buffer.
    pub fn set_no_cache_and_async_writes(&mut self) {
        self.ctrl(
            SSL_CTRL_SET_SESS_CACHE_MODE,
            SSL_SESS_CACHE_OFF,
            std::ptr::null_mut(),
        );
        self.ctrl(
            SSL_CTRL_MODE,
            SSL_MODE_PARTIAL_AND_MOVING,
            std::ptr::null_mut(),
        );
    }

    /// Verifies the server's chain against `store` (`SSL_VERIFY_PEER`):
    /// a chain that does not verify fails the handshake.
    pub fn verify_with(&mut self, store: &Store) {
        // SAFETY: live SSL_CTX and store; set1 takes its own reference to
        // the store; no callback (OpenSSL's verdict stands).
        unsafe {
            (self.api.ssl_ctx_set1_cert_store)(self.ptr.as_ptr(), store.ptr.as_ptr());
            (self.api.ssl_ctx_set_verify)(self.ptr.as_ptr(), SSL_VERIFY_PEER, None);
        }
    }
}

// ---------------------------------------------------------------- BIO

/// A memory BIO not yet handed to an `SSL`.
struct Bio {
    api: &'static Api,
    ptr: NonNull<BioC>,
}

impl Bio {
    fn new_mem(api: &'static Api) -> Result<Bio, Error> {
        // SAFETY: BIO_s_mem returns a static method table; BIO_new returns
        // a new BIO or NULL.
        let ptr = unsafe { (api.bio_new)((api.bio_s_mem)()) };
        NonNull::new(ptr)
            .map(|ptr| Bio { api, ptr })
            .ok_or_else(|| failed(api, "a memory BIO"))
    }

    /// Gives up ownership (to `SSL_set_bio`).
    fn into_raw(self) -> NonNull<BioC> {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

impl Drop for Bio {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a live BIO this holder owns.
        unsafe { (self.api.bio_free)(self.ptr.as_ptr()) };
    }
}

// ---------------------------------------------------------------- SSL

/// What one `SSL_connect`/`SSL_read`/`SSL_write`/`SSL_shutdown` came to.
#[derive(Debug)]
pub enum Step<T> {
    /// It completed with this value.
    Done(T),
    /// It needs more bytes from the peer in the read BIO.
    WantRead,
    /// It needs its output taken (not with memory BIOs, which grow).
    WantWrite,
    /// The peer closed: close_notify, or the transport ended (with
    /// [`op::IGNORE_UNEXPECTED_EOF`]).
    Closed,
    /// A fatal error; the connection is unusable.
    Failed(Error),
}

/// A TLS session an origin issued, serialized (`i2d_SSL_SESSION`), to be
/// offered on a later connection ([`Ssl::offer_session`]). Serialized, as
/// Node keeps its sessions: a live `SSL_SESSION` holds the origin's
/// certificates parsed, several times the bytes. Each offer parses a
/// session of its own, so nothing one connection does to its session
/// (OpenSSL marks it unresumable when the connection is freed without a
/// close_notify) reaches the next.
#[derive(Clone)]
pub struct SavedSession {
    /// Shared by the slot and the offers being parsed from it.
    der: Arc<[u8]>,
}

impl SavedSession {
    /// Whether `other` is this very session (not an equal one).
    pub fn is(&self, other: &SavedSession) -> bool {
        Arc::ptr_eq(&self.der, &other.der)
    }

    /// A session of these bytes, whatever they are.
    #[cfg(test)]
    pub fn of_bytes(der: &[u8]) -> SavedSession {
        SavedSession { der: der.into() }
    }
}

/// One reference to an `SSL_SESSION`, freed on drop.
struct Session {
    api: &'static Api,
    ptr: NonNull<SslSessionC>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: we own one reference to a live SSL_SESSION.
        unsafe { (self.api.ssl_session_free)(self.ptr.as_ptr()) }
    }
}

/// An `SSL` connection over two memory BIOs: ciphertext from the peer is
/// written into it with [`Ssl::feed`], ciphertext for the peer is taken
/// out with [`Ssl::take_output`].
pub struct Ssl {
    api: &'static Api,
    ptr: NonNull<SslC>,
    /// Owned by the SSL (freed by SSL_free); valid while `ptr` is.
    rbio: NonNull<BioC>,
    /// Owned by the SSL (freed by SSL_free); valid while `ptr` is.
    wbio: NonNull<BioC>,
}

// SAFETY: an SSL object may move between threads; it is used by one
// thread at a time, which `&mut self` on every call that touches it
// guarantees (Ssl is not Sync).
unsafe impl Send for Ssl {}

impl Drop for Ssl {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a live SSL we own; SSL_free also frees both BIOs.
        unsafe { (self.api.ssl_free)(self.ptr.as_ptr()) }
    }
}

impl Ssl {
    /// A new connection from `ctx`, over fresh memory BIOs.
    pub fn new(ctx: &Ctx) -> Result<Ssl, Error> {
        let api = ctx.api;
        clear_errors(api);
        let rbio = Bio::new_mem(api)?;
        let wbio = Bio::new_mem(api)?;
        // SAFETY: `ctx.ptr` is a live SSL_CTX; SSL_new returns a new SSL
        // (holding its own reference to the context) or NULL.
        let ptr = unsafe { (api.ssl_new)(ctx.ptr.as_ptr()) };
        let ptr = NonNull::new(ptr).ok_or_else(|| failed(api, "a new SSL"))?;
        let (rbio, wbio) = (rbio.into_raw(), wbio.into_raw());
        // SAFETY: all three are live; SSL_set_bio takes ownership of both
        // BIOs (we gave ours up above) and SSL_free will free them.
        unsafe { (api.ssl_set_bio)(ptr.as_ptr(), rbio.as_ptr(), wbio.as_ptr()) };
        Ok(Ssl {
            api,
            ptr,
            rbio,
            wbio,
        })
    }

    /// Sends `name` as SNI (server_name, 0).
    pub fn set_sni(&mut self, name: &str) -> Result<(), Error> {
        let text = c_string(name)?;
        clear_errors(self.api);
        // SAFETY: live SSL; `text` is NUL-terminated and OpenSSL copies it.
        let ok = unsafe {
            (self.api.ssl_ctrl)(
                self.ptr.as_ptr(),
                SSL_CTRL_SET_TLSEXT_HOSTNAME,
                TLSEXT_NAMETYPE_HOST_NAME,
                text.as_ptr().cast_mut().cast(),
            )
        };
        if ok == 1 {
            Ok(())
        } else {
            Err(failed(self.api, "the SNI name"))
        }
    }

    /// Requires the server's certificate to be valid for `host` (a DNS
    /// name or an IP literal), without partial wildcards.
    pub fn set_verify_host(&mut self, host: &str) -> Result<(), Error> {
        // OpenSSL takes an empty name as "no name to check".
        if host.is_empty() {
            return Err(Error("an empty host name cannot be verified".into()));
        }
        let text = c_string(host)?;
        clear_errors(self.api);
        // SAFETY: live SSL; `text` is NUL-terminated and OpenSSL copies it
        // into the SSL's verification parameters.
        let ok = unsafe {
            (self.api.ssl_set_hostflags)(self.ptr.as_ptr(), X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
            (self.api.ssl_set1_host)(self.ptr.as_ptr(), text.as_ptr())
        };
        if ok == 1 {
            Ok(())
        } else {
            Err(failed(self.api, "the host name to verify"))
        }
    }

    /// OpenSSL's name of the cipher suite `id` (`ECDHE-RSA-AES128-GCM-SHA256`,
    /// `TLS_AES_128_GCM_SHA256`), if this OpenSSL has it.
    pub fn cipher_name(&mut self, id: u16) -> Option<String> {
        let bytes = id.to_be_bytes();
        // SAFETY: live SSL; `bytes` holds the two bytes SSL_CIPHER_find
        // reads. The result is NULL or a static SSL_CIPHER whose name is
        // a static string.
        let name = unsafe {
            let cipher = (self.api.ssl_cipher_find)(self.ptr.as_ptr(), bytes.as_ptr());
            if cipher.is_null() {
                return None;
            }
            c_text((self.api.ssl_cipher_get_name)(cipher))
        };
        (!name.is_empty()).then_some(name)
    }

    /// What an I/O call that returned `ret` came to.
    fn step<T>(&mut self, ret: c_int, done: impl FnOnce(c_int) -> T) -> Step<T> {
        if ret > 0 {
            return Step::Done(done(ret));
        }
        // SAFETY: live SSL; `ret` is what the call just returned, on this
        // thread, with the error queue cleared before the call.
        let code = unsafe { (self.api.ssl_get_error)(self.ptr.as_ptr(), ret) };
        match code {
            SSL_ERROR_WANT_READ => Step::WantRead,
            SSL_ERROR_WANT_WRITE => Step::WantWrite,
            SSL_ERROR_ZERO_RETURN => Step::Closed,
            SSL_ERROR_SYSCALL | SSL_ERROR_SSL => {
                let queued = queued_errors(self.api);
                if queued.is_empty() && code == SSL_ERROR_SYSCALL {
                    // No error and no bytes: the memory BIO reported EOF.
                    Step::Closed
                } else if queued.is_empty() {
                    Step::Failed(Error("OpenSSL failed without saying why".into()))
                } else {
                    Step::Failed(Error(queued))
                }
            }
            other => {
                clear_errors(self.api);
                Step::Failed(Error(format!("OpenSSL: SSL_get_error {other}")))
            }
        }
    }

    /// Runs (or continues) the client handshake.
    pub fn connect(&mut self) -> Step<()> {
        clear_errors(self.api);
        // SAFETY: live SSL with both BIOs set.
        let ret = unsafe { (self.api.ssl_connect)(self.ptr.as_ptr()) };
        self.step(ret, |_| ())
    }

    /// Reads plaintext into `buf` (at most `i32::MAX` bytes at a time).
    pub fn read(&mut self, buf: &mut [u8]) -> Step<usize> {
        let len = c_int::try_from(buf.len()).unwrap_or(c_int::MAX);
        clear_errors(self.api);
        // SAFETY: live SSL; `buf` is writable for `len` bytes.
        let ret = unsafe { (self.api.ssl_read)(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), len) };
        self.step(ret, |n| usize::try_from(n).unwrap_or(0))
    }

    /// Encrypts plaintext from `buf` (at most `i32::MAX` bytes at a time)
    /// into the write BIO; returns how much it took.
    pub fn write(&mut self, buf: &[u8]) -> Step<usize> {
        let len = c_int::try_from(buf.len()).unwrap_or(c_int::MAX);
        clear_errors(self.api);
        // SAFETY: live SSL; `buf` is readable for `len` bytes.
        let ret = unsafe { (self.api.ssl_write)(self.ptr.as_ptr(), buf.as_ptr().cast(), len) };
        self.step(ret, |n| usize::try_from(n).unwrap_or(0))
    }

    /// Sends close_notify (does not wait for the peer's).
    pub fn shutdown(&mut self) -> Step<()> {
        clear_errors(self.api);
        // SAFETY: live SSL.
        let ret = unsafe { (self.api.ssl_shutdown)(self.ptr.as_ptr()) };
        // 0: ours sent, the peer's not yet received, which is all we want.
        if ret == 0 {
            return Step::Done(());
        }
        self.step(ret, |_| ())
    }

    /// Hands ciphertext from the peer to the connection; returns how many
    /// bytes the read BIO took (all of them: a memory BIO grows).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        let len = c_int::try_from(bytes.len()).map_err(|_| Error("chunk too large".into()))?;
        if len == 0 {
            return Ok(0);
        }
        clear_errors(self.api);
        // SAFETY: `rbio` is live while the SSL is; `bytes` is readable for
        // `len` bytes and the BIO copies them.
        let n = unsafe { (self.api.bio_write)(self.rbio.as_ptr(), bytes.as_ptr().cast(), len) };
        usize::try_from(n).map_err(|_| failed(self.api, "bytes into the read BIO"))
    }

    /// Tells the connection the peer's stream has ended: once the read
    /// BIO is drained, reads see EOF instead of "want more".
    pub fn feed_eof(&mut self) {
        // SAFETY: `rbio` is live; BIO_set_mem_eof_return takes an integer.
        unsafe {
            (self.api.bio_ctrl)(
                self.rbio.as_ptr(),
                BIO_C_SET_BUF_MEM_EOF_RETURN,
                0,
                std::ptr::null_mut(),
            )
        };
    }

    /// Bytes waiting in the write BIO for the peer.
    pub fn pending_output(&mut self) -> usize {
        // SAFETY: `wbio` is live while the SSL is.
        unsafe { (self.api.bio_ctrl_pending)(self.wbio.as_ptr()) }
    }

    /// Moves ciphertext for the peer from the write BIO into `buf`;
    /// returns how many bytes (0: none waiting).
    pub fn take_output(&mut self, buf: &mut [u8]) -> usize {
        let len = c_int::try_from(buf.len()).unwrap_or(c_int::MAX);
        if self.pending_output() == 0 || len == 0 {
            return 0;
        }
        // SAFETY: `wbio` is live; `buf` is writable for `len` bytes.
        let n = unsafe { (self.api.bio_read)(self.wbio.as_ptr(), buf.as_mut_ptr().cast(), len) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Offers `session` in the handshake (`SSL_set_session`, a session
    /// parsed for this connection; before [`Ssl::connect`] is first
    /// called): the connection resumes it if the server accepts, else runs
    /// a full handshake. The caller passes only a session made by a
    /// connection of this connection's `SSL_CTX`.
    pub fn offer_session(&mut self, session: &SavedSession) -> Result<(), Error> {
        clear_errors(self.api);
        let length = c_long::try_from(session.der.len())
            .map_err(|_| failed(self.api, "the session to resume (too long)"))?;
        let mut input = session.der.as_ptr();
        // SAFETY: `input` points at `length` readable bytes, which
        // d2i_SSL_SESSION only reads (advancing `input`); with a NULL first
        // argument it returns a new session (one reference, which `parsed`
        // then owns and frees) or NULL.
        let parsed = NonNull::new(unsafe {
            (self.api.d2i_ssl_session)(std::ptr::null_mut(), &mut input, length)
        })
        .ok_or_else(|| failed(self.api, "the session to resume"))?;
        let parsed = Session {
            api: self.api,
            ptr: parsed,
        };
        // SAFETY: live SSL and session; SSL_set_session takes its own
        // reference to the session (and drops the SSL's previous session).
        let ok = unsafe { (self.api.ssl_set_session)(self.ptr.as_ptr(), parsed.ptr.as_ptr()) };
        if ok == 1 {
            Ok(())
        } else {
            Err(failed(self.api, "the session to resume"))
        }
    }

    /// The connection's session, serialized, when it is another than the
    /// one `seen` last (its address; 0 at first) and can be resumed: a
    /// TLS 1.2 session from the handshake on; in TLS 1.3 each ticket the
    /// server sends, once a read has taken it in. Checking the address
    /// first keeps this to one call per read while nothing changes.
    pub fn new_resumable_session(&mut self, seen: &mut usize) -> Option<SavedSession> {
        // SAFETY: live SSL; SSL_get_session returns the SSL's own session
        // (no reference taken), or NULL; it stays valid while the SSL is
        // not used otherwise, which `&mut self` guarantees for this call.
        let own = NonNull::new(unsafe { (self.api.ssl_get_session)(self.ptr.as_ptr()) })?;
        let address = own.as_ptr() as usize;
        if address == *seen {
            return None;
        }
        // SAFETY: a live SSL_SESSION; the calls only read it.
        let (resumable, ticket, version) = unsafe {
            (
                (self.api.ssl_session_is_resumable)(own.as_ptr()) == 1,
                (self.api.ssl_session_has_ticket)(own.as_ptr()) == 1,
                (self.api.ssl_session_get_protocol_version)(own.as_ptr()),
            )
        };
        // A TLS 1.3 session resumes by ticket only: before the server's
        // ticket it holds the echoed legacy session id, which OpenSSL
        // counts as resumable but never offers. Not marked seen then: the
        // ticket may come into this same session.
        if !(resumable && (ticket || version < TLS1_3_VERSION)) {
            return None;
        }
        *seen = address;
        // SAFETY: a live SSL_SESSION, which i2d_SSL_SESSION only reads;
        // with a NULL output it returns the length it would write. Nothing
        // else can change the session before the second call writes it:
        // `&mut self` holds the connection, and it is not shared.
        clear_errors(self.api);
        let length = unsafe { (self.api.i2d_ssl_session)(own.as_ptr(), std::ptr::null_mut()) };
        // The origin chooses the size; past the bound it is not kept.
        let length_ok = |&n: &usize| n > 0 && n <= super::MAX_KEPT_SESSION;
        let mut der = vec![0u8; usize::try_from(length).ok().filter(length_ok)?];
        let mut output = der.as_mut_ptr();
        // SAFETY: `output` points at `length` writable bytes, which
        // i2d_SSL_SESSION fills (advancing `output`); it reads the session.
        let written = unsafe { (self.api.i2d_ssl_session)(own.as_ptr(), &mut output) };
        (written == length).then(|| SavedSession { der: der.into() })
    }

    /// Whether the handshake resumed a session.
    pub fn session_reused(&self) -> bool {
        // SAFETY: live SSL; the call only reads it.
        unsafe { (self.api.ssl_session_reused)(self.ptr.as_ptr()) == 1 }
    }

    /// The protocol the server chose by ALPN.
    pub fn alpn_selected(&self) -> Option<Vec<u8>> {
        let mut data: *const u8 = std::ptr::null();
        let mut len: c_uint = 0;
        // SAFETY: live SSL; OpenSSL stores a pointer into the SSL's own
        // memory (or NULL) and its length; it is copied before `self` can
        // change.
        unsafe {
            (self.api.ssl_get0_alpn_selected)(self.ptr.as_ptr(), &mut data, &mut len);
            if data.is_null() || len == 0 {
                return None;
            }
            let len = usize::try_from(len).ok()?;
            Some(std::slice::from_raw_parts(data, len).to_vec())
        }
    }

    /// Why the server's certificate did not verify, if it did not.
    pub fn verify_failure(&self) -> Option<String> {
        // SAFETY: live SSL; the error string is static.
        unsafe {
            let code = (self.api.ssl_get_verify_result)(self.ptr.as_ptr());
            if code == 0 {
                return None;
            }
            let reason = c_text((self.api.x509_verify_cert_error_string)(code));
            Some(format!("{reason} (X509 error {code})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_exports_no_tls_symbol() {
        let this = Library::this();
        for probe in EXPORTED_BORINGSSL_PROBES {
            // SAFETY: looked up only.
            let found = unsafe { symbol::<*mut c_void>(&this, probe) };
            assert!(found.is_err(), "{probe} is exported by the test binary");
        }
    }

    #[test]
    fn openssl_loads_and_knows_its_ciphers() {
        if !loaded_for_tests() {
            return;
        }
        let Ok(version) = version() else {
            unreachable!("loaded above");
        };
        assert!(version.starts_with("OpenSSL 3."), "{version}");
        let Ok(ctx) = Ctx::new_client() else {
            panic!("SSL_CTX_new");
        };
        let Ok(mut ssl) = Ssl::new(&ctx) else {
            panic!("SSL_new");
        };
        assert_eq!(
            ssl.cipher_name(0xccaa).as_deref(),
            Some("DHE-RSA-CHACHA20-POLY1305")
        );
        assert_eq!(
            ssl.cipher_name(0x1302).as_deref(),
            Some("TLS_AES_256_GCM_SHA384")
        );
        assert_eq!(ssl.cipher_name(0x0a0a), None);
    }
}
