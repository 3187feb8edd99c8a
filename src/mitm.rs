//! TLS interception (MITM): the local CA, leaf certificates minted per host,
//! and serving the HTTP requests found inside CONNECT tunnels.
//!
//! Input: an upgraded CONNECT tunnel and its target. Output: each request in
//! the tunnel, handed to the pipeline as if it were a plain proxy request
//! for the tunnel's target.
//!
//! Invariant: opening a tunnel dials nothing upstream. The leaf is chosen
//! from the client's SNI (or the CONNECT host when there is none) alone.

pub mod ca;
pub mod cert_cache;
pub mod leaf;
mod serve;

pub use serve::serve_tunnel;

use cert_cache::CertCache;

/// ALPN protocols offered to clients inside tunnels, in preference order.
pub const CLIENT_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// TLS interception state shared by all tunnels.
#[derive(Debug)]
pub struct Mitm {
    /// Leaf certificates per host.
    pub certs: CertCache,
}
