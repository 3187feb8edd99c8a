//! TLS interception (MITM): the local CA ([`ca`]), leaf certificates minted
//! per host ([`leaf`]) and cached ([`cert_cache`]), which hosts are
//! intercepted ([`policy`]), and trusting the CA in NSS databases
//! ([`nssdb`]). Serving the tunnels themselves is the front door's job
//! (`front::tunnel`).
//!
//! Invariant: the leaf is chosen from the client's SNI (or the CONNECT host
//! when there is none) alone; minting one dials nothing upstream.

pub mod ca;
pub mod cert_cache;
pub mod leaf;
pub mod nssdb;
pub mod policy;

use cert_cache::CertCache;

use crate::fingerprint::live_hellos::LiveHellos;
pub use policy::InterceptPolicy;

/// ALPN protocols offered to clients inside tunnels, in preference order.
pub const CLIENT_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// TLS interception state shared by all tunnels.
#[derive(Debug)]
pub struct Mitm {
    /// Leaf certificates per host.
    pub certs: CertCache,
    /// Which hosts are intercepted.
    pub policy: InterceptPolicy,
    /// The ClientHellos of live intercepted connections, one copy each.
    pub hellos: LiveHellos,
}
