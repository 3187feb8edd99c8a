//! How an HTTP/2 client's header names are written to an HTTP/1.1 origin.
//!
//! HTTP/2 names are lower case. The same clients over HTTP/1.1 write most
//! names capitalised (`User-Agent`, `Accept-Language`), which hyper's
//! client writes for a name its request's case map does not spell
//! (`title_case_headers`), but not all: Chromium writes its client hints in
//! lower case over HTTP/1.1 too (`sec-ch-ua`, `dpr`), and everyone writes
//! `DNT` and `TE` in capitals. hyper keeps its case map private, and makes one only by
//! parsing a head; so the map for those names is made that way, once
//! ([`case_map`]), and a request that came over HTTP/2 gets a copy.
//!
//! A request that came over HTTP/1.1 has its client's own map, and keeps
//! it: only the names pinproxy adds to it (a `Connection` from a
//! `Proxy-Connection`, a `Host` for an HTTP/1.0 client) are capitalised.

use std::convert::Infallible;
use std::sync::Mutex;

use bytes::Bytes;
use http::{Extensions, Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

/// The names an HTTP/2 client's request does not take capitalised towards
/// an HTTP/1.1 origin, spelled as its family writes them there: Chromium's
/// client hints (its constants for them are lower case on every protocol,
/// the legacy `dpr`, `rtt`, ... as well as the `sec-ch-*` ones an origin's
/// `Accept-CH` asks for), `DNT` and `TE`.
const SPELLED: &[u8] = b"GET / HTTP/1.1\r\n\
    sec-ch-ua: x\r\n\
    sec-ch-ua-mobile: x\r\n\
    sec-ch-ua-platform: x\r\n\
    sec-ch-ua-arch: x\r\n\
    sec-ch-ua-bitness: x\r\n\
    sec-ch-ua-form-factors: x\r\n\
    sec-ch-ua-full-version: x\r\n\
    sec-ch-ua-full-version-list: x\r\n\
    sec-ch-ua-model: x\r\n\
    sec-ch-ua-platform-version: x\r\n\
    sec-ch-ua-wow64: x\r\n\
    sec-ch-device-memory: x\r\n\
    sec-ch-dpr: x\r\n\
    sec-ch-viewport-width: x\r\n\
    sec-ch-viewport-height: x\r\n\
    sec-ch-width: x\r\n\
    sec-ch-prefers-color-scheme: x\r\n\
    sec-ch-prefers-reduced-motion: x\r\n\
    sec-ch-prefers-reduced-transparency: x\r\n\
    sec-ch-save-data: x\r\n\
    device-memory: x\r\n\
    dpr: x\r\n\
    width: x\r\n\
    viewport-width: x\r\n\
    rtt: x\r\n\
    downlink: x\r\n\
    ect: x\r\n\
    DNT: x\r\n\
    TE: x\r\n\r\n";

/// Request extensions holding hyper's case map for [`SPELLED`]'s names
/// (`None` if hyper could not be made to read it, which would be a bug:
/// the names are then capitalised).
static CASE_MAP: OnceCell<Option<Extensions>> = OnceCell::const_new();

/// The extensions to give an HTTP/2 client's request bound for an
/// HTTP/1.1 origin (see the module docs); read once, on first use.
pub async fn case_map() -> Option<&'static Extensions> {
    CASE_MAP.get_or_init(read_case_map).await.as_ref()
}

/// Has hyper's HTTP/1.1 server, which records the case of the names it
/// reads, read [`SPELLED`] over an in-memory pipe; returns the request's
/// extensions (only the case map: the upgrade handle goes).
async fn read_case_map() -> Option<Extensions> {
    let (mut client, server) = tokio::io::duplex(4096);
    let seen: Mutex<Option<Extensions>> = Mutex::new(None);
    let seen = std::sync::Arc::new(seen);
    let recorder = seen.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let mut extensions = request.extensions().clone();
        extensions.remove::<hyper::upgrade::OnUpgrade>();
        if let Ok(mut slot) = recorder.lock() {
            *slot = Some(extensions);
        }
        async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
    });
    let serve = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(server), service);
    let ask = async move {
        client.write_all(SPELLED).await.ok()?;
        // The answer's first bytes say the request was read.
        let mut answer = [0u8; 12];
        client.read_exact(&mut answer).await.ok()?;
        Some(())
    };
    // The server ends when the pipe's client half is dropped.
    let (_, asked) = tokio::join!(serve, ask);
    asked?;
    let extensions = seen.lock().ok()?.take();
    extensions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper's client writes the names the map spells as spelled there,
    /// the others capitalised (`title_case_headers`).
    #[tokio::test]
    async fn an_h2_request_is_written_with_the_spelled_names() {
        let map = case_map().await.expect("hyper read the names");
        let (client, mut server) = tokio::io::duplex(4096);
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .title_case_headers(true)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut request = Request::get("/")
            .header("host", "a.test")
            .header("sec-ch-ua", "\"Chromium\"")
            .header("user-agent", "u")
            .header("dnt", "1")
            .header("sec-ch-viewport-height", "900")
            .header("te", "trailers")
            .header("sec-fetch-site", "none")
            .body(Empty::<Bytes>::new())
            .unwrap();
        request.extensions_mut().extend(map.clone());
        tokio::spawn(sender.send_request(request));
        let mut head = vec![0u8; 4096];
        let mut read = 0;
        while !head[..read].ends_with(b"\r\n\r\n") && read < head.len() {
            let n = server.read(&mut head[read..]).await.unwrap();
            assert!(n > 0, "the head ended early");
            read += n;
        }
        assert_eq!(
            String::from_utf8_lossy(&head[..read]),
            "GET / HTTP/1.1\r\nHost: a.test\r\nsec-ch-ua: \"Chromium\"\r\nUser-Agent: u\r\n\
             DNT: 1\r\nsec-ch-viewport-height: 900\r\nTE: trailers\r\nSec-Fetch-Site: none\r\n\r\n"
        );
    }
}
