//! Tunnels pinproxy does not open: hosts excluded from interception
//! (`mitm.exclude`, or not in a non-empty `mitm.include`) are tunnelled raw.
//! They go through the pipeline's own stages (credentials, route, send,
//! capture), so the store policy and routing are the same as for any
//! request; only the tunnel replaces the request.
//!
//! The CONNECT goes through the exit of the client's session key when it
//! named one (a new key founds an identity, as a request would), else
//! through the next exit in rotation, and the tunnel stays on it for its
//! whole life. pinproxy cannot see cookies inside such a tunnel: only the
//! session key keeps it coherent with the client's other traffic. A tunnel
//! that carries nothing either way for `timeouts.relay_idle` is closed, and
//! so is one whose identity is retired (see `routing::relays`).
//!
//! Under a non-empty `mitm.include`, a TLS client's hello (or a plain-HTTP
//! client's first request head) is read before it goes on: one naming a
//! host pinproxy intercepts, in a tunnel to a host it passes through (a
//! CONNECT by address), or one it cannot read, is refused rather than let
//! through unread.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::fingerprint::{read_client_hello, HelloRead};
use super::rewind::Rewind;
use super::tunnel::{refused_tunnel, SAID_SELDOM};
use super::Frontend;
use crate::body::{self, Body};
use crate::fault::{Blame as _, Fault};
use crate::fingerprint::Fingerprint;
use crate::net::relay::relay;
use crate::net::HostPort;
use crate::proxy::target::Principal;
use crate::proxy::{credentials, ProxyError};
use crate::routing::relays::{until_retired, RelayOwner};

/// Answers a CONNECT to a passed-through host: opens the tunnel through the
/// exit first (so a failure can still be answered with a 502), then `200`,
/// then relays bytes until either side closes.
pub async fn connect(
    frontend: Arc<Frontend>,
    request: Request<Incoming>,
    authority: HostPort,
    session_key: Option<String>,
    principal: Principal,
) -> Response<Body> {
    match open(&frontend, request, &authority, session_key, principal).await {
        Ok(response) => response,
        Err(error) => {
            frontend.pipeline.load().metrics.request(error.code());
            // As the pipeline logs a request it refuses: a client's own
            // fault (a denied address, a bad session key) is no operator's
            // business at `warn`, and each retry would be a line.
            match error.fault() {
                Fault::Client => {
                    tracing::debug!(target = %authority, code = error.code(), %error, "passthrough refused")
                }
                _ => {
                    tracing::warn!(target = %authority, code = error.code(), %error, "passthrough failed")
                }
            }
            error.to_response()
        }
    }
}

async fn open(
    frontend: &Arc<Frontend>,
    request: Request<Incoming>,
    authority: &HostPort,
    session_key: Option<String>,
    principal: Principal,
) -> Result<Response<Body>, ProxyError> {
    let pipeline = frontend.pipeline.load_full();
    // Stage 3: only the session key can be read.
    let credentials = credentials::of_connect(
        session_key.as_deref(),
        principal.user.as_deref(),
        &pipeline.hasher,
    );
    // Stage 4. A CONNECT carries the client's User-Agent (browsers and curl
    // send it): the best fingerprint there is for an identity founded here,
    // so its headers go to the router.
    let route = pipeline
        .route(&principal.exits, &credentials, || {
            Fingerprint::of(request.headers())
        })
        .await?;
    // Stage 7: the tunnel itself.
    let (upstream, egress_ip) = match route.exit.client.raw_tunnel(&route.lane, authority).await {
        Ok(opened) => opened,
        Err(error) => return Err(pipeline.upstream_failed(&route, error).await),
    };
    route.exit.health.success();
    // Stage 8: nothing to read but the tunnel's use.
    if let Some(identity) = &route.identity {
        pipeline
            .capture_use(identity, true, egress_ip, None)
            .await?;
    }
    tracing::debug!(target = %authority, exit = %route.exit.id(), "passthrough tunnel open");
    // The tunnel is the client connection from here on: the upgraded
    // stream holds its place among the connection limits.
    let idle = Some(pipeline.relay_idle);
    // The first words are bounded as the relay is (zero: never).
    let opening_limit = Some(pipeline.relay_idle)
        .filter(|limit| !limit.is_zero())
        .unwrap_or(Duration::MAX);
    let tunnel_frontend = frontend.clone();
    let metrics = pipeline.metrics.clone();
    let authority = authority.clone();
    let owner = route.identity.clone().map(|identity| RelayOwner {
        router: pipeline.router.clone(),
        exits: pipeline.live_exits.clone(),
        identity,
    });
    frontend.tasks.spawn(async move {
        let client = match hyper::upgrade::on(request).await {
            Ok(client) => client,
            Err(e) => {
                metrics.request(crate::metrics::CLIENT_GONE);
                return tracing::debug!(error = %e, "client left before the tunnel opened");
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = upstream;
        let policy = &tunnel_frontend.mitm.policy;
        let settings = &tunnel_frontend.settings;
        let judge = policy.lists_intercepted().then_some(Judge {
            intercepted: |host: &str| policy.intercepts(host),
            head_limit: settings.max_header_bytes,
            max_fields: settings.max_headers,
            head_read: settings.header_read,
            idle: opening_limit,
        });
        // The identity's end is watched from here: its client's first words
        // may be a long time coming (up to the relay's idle limit), and
        // must not go on after a retirement meanwhile.
        let reads = AtomicU64::new(0);
        let retired = until_retired(owner, &reads, "passthrough tunnel");
        tokio::pin!(retired);
        // Bounded within: by the relay's idle limit while nothing comes,
        // by `timeouts.header_read` once the client began.
        let opened = tokio::select! {
            opened = first_words(&mut client, &mut upstream, judge) => opened,
            () = &mut retired => return,
        };
        // Counted once judged: a refused tunnel is no passthrough.
        let first_refusal = match &opened {
            Ok(Opening::Intercepted(_)) => {
                static WARNED: AtomicU64 = AtomicU64::new(0);
                refused_tunnel(&tunnel_frontend, &WARNED)
            }
            Ok(Opening::Unreadable) => {
                static WARNED: AtomicU64 = AtomicU64::new(0);
                refused_tunnel(&tunnel_frontend, &WARNED)
            }
            _ => {
                metrics.request("passthrough");
                false
            }
        };
        match opened {
            Ok(Opening::Relay) => {}
            Ok(Opening::Intercepted(named)) => {
                const WHY: &str = "refused a passed-through tunnel whose TLS, or first plain-HTTP request, names a host the mitm policy intercepts (its cookies would leave unread, on any exit); CONNECT the host it names";
                return if first_refusal {
                    tracing::warn!(connect = %authority, named, "{WHY} ({SAID_SELDOM})")
                } else {
                    tracing::debug!(connect = %authority, named, "{WHY}")
                };
            }
            Ok(Opening::Unreadable) => {
                const WHY: &str = "refused a passed-through tunnel whose TLS hello or plain-HTTP head pinproxy cannot read, so cannot tell whether it names a host mitm.include lists";
                return if first_refusal {
                    tracing::warn!(connect = %authority, "{WHY} ({SAID_SELDOM})")
                } else {
                    tracing::debug!(connect = %authority, "{WHY}")
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return tracing::debug!("passthrough tunnel idle (or its client's first words slow) before it carried anything")
            }
            Err(e) => return tracing::debug!(error = %e, "passthrough tunnel ended before it carried anything"),
        }
        relay(&mut client, &mut upstream, idle, &reads, retired)
            .await
            .log("passthrough tunnel");
    });
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}

/// The content type of a TLS handshake record, a ClientHello's first byte.
const TLS_HANDSHAKE: u8 = 22;

/// How a passed-through tunnel's first bytes went.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    /// Sent on: the relay takes over.
    Relay,
    /// The client's TLS hello, or its first plain-HTTP request, names this
    /// host, which `intercepted` says pinproxy would open: nothing was sent
    /// on.
    Intercepted(String),
    /// The client began a TLS handshake whose hello cannot be read, or a
    /// plain-HTTP request whose head cannot (or an HTTP/2 prior-knowledge
    /// preface), while first words are judged: nothing was sent on.
    Unreadable,
}

/// How a passed-through tunnel's first words are judged (under a policy
/// that lists the hosts it intercepts, see
/// `InterceptPolicy::lists_intercepted`).
struct Judge<F> {
    /// Whether pinproxy intercepts a host (`InterceptPolicy::intercepts`).
    intercepted: F,
    /// The longest plain-HTTP head read (`limits.max_header_bytes`).
    head_limit: usize,
    /// The most header fields it may have (`limits.max_headers`).
    max_fields: usize,
    /// How long the client has to say the host once it began
    /// (`timeouts.header_read`), as for any request head.
    head_read: Duration,
    /// How long the tunnel may wait with nothing moving before the client
    /// speaks (`timeouts.relay_idle`; `Duration::MAX`: for ever), as a
    /// relay may.
    idle: Duration,
}

/// As long as pinproxy waits for anything.
const FOREVER: Duration = Duration::from_secs(365 * 86_400);

/// How much a server may send before its client speaks while the client's
/// first words are awaited (a banner is a line or a few).
const SERVER_FIRST_LIMIT: usize = 16 * 1024;

/// What a wait for the client's first bytes brought.
enum Came {
    Client(usize),
    Server(usize),
}

/// Carries a passed-through tunnel's first bytes, judging the client's
/// before any of them goes on when `judge` is given: a TLS hello naming a
/// host pinproxy intercepts was sent through a tunnel whose CONNECT named
/// one it passes through (`CONNECT 203.0.113.7:443` with SNI
/// `www.target.example`, under `mitm.include`), and its cookies would go
/// out unread, through whichever exit rotation picked; a TLS hello that
/// cannot be read cannot be judged, and is refused too. A plain-HTTP
/// request is judged by the host it names (see [`judge_plain_head`]);
/// other bytes are sent on as they are. When the server speaks first (a
/// protocol whose client waits for a banner), its bytes go to the client
/// while the client's first words are awaited, and those are judged all
/// the same (an exit that sent bytes after its `200` must not let them
/// pass unread).
async fn first_words<C, U>(
    client: &mut C,
    upstream: &mut U,
    judge: Option<Judge<impl Fn(&str) -> bool>>,
) -> std::io::Result<Opening>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let Some(judge) = judge else {
        return Ok(Opening::Relay);
    };
    let mut from_client = Vec::with_capacity(2048);
    let mut from_server = vec![0u8; 16 * 1024];
    // Once the server spoke: until when its client is waited for, and how
    // much of the server's it has been handed.
    let mut server_spoke: Option<(tokio::time::Instant, usize)> = None;
    loop {
        // (A year stands for "never": an instant cannot be infinitely far.)
        let wait = tokio::time::Instant::now() + judge.idle.min(FOREVER);
        let until = server_spoke.map_or(wait, |(deadline, _)| deadline.min(wait));
        // Both reads can be dropped unfinished without losing a byte.
        let came = tokio::time::timeout_at(until, async {
            tokio::select! {
                read = client.read_buf(&mut from_client) => read.map(Came::Client),
                read = upstream.read(&mut from_server) => read.map(Came::Server),
            }
        })
        .await;
        let came = match came {
            Ok(came) => came?,
            // A client that waits past the head's deadline after its
            // server spoke speaks a server-first protocol (an HTTP or TLS
            // client never waits for the server): the relay takes over.
            Err(_) if server_spoke.is_some() => return Ok(Opening::Relay),
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        };
        match came {
            Came::Client(0) | Came::Server(0) => {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Came::Client(_) => break,
            Came::Server(read) => {
                let (deadline, handed) = server_spoke
                    .get_or_insert_with(|| (tokio::time::Instant::now() + judge.head_read, 0));
                let deadline = *deadline;
                *handed = handed.saturating_add(read);
                let handed = *handed;
                // Bounded too; a write the deadline cuts short ends the
                // tunnel (the relay could not go on without the bytes it
                // did not write).
                tokio::time::timeout_at(
                    deadline,
                    client.write_all(from_server.get(..read).unwrap_or_default()),
                )
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                // A server that sends this much before its client speaks
                // speaks a protocol of its own, not HTTP or TLS: the relay
                // takes over (with its idle limit and its identity's end).
                if handed > SERVER_FIRST_LIMIT {
                    return Ok(Opening::Relay);
                }
            }
        }
    }
    // Begun: the rest is said within `head_read`, as any request head.
    tokio::time::timeout(
        judge.head_read,
        judge_first_words(Bytes::from(from_client), client, upstream, &judge),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// [`first_words`] once the client began with `first`.
async fn judge_first_words<C, U>(
    first: Bytes,
    client: &mut C,
    upstream: &mut U,
    judge: &Judge<impl Fn(&str) -> bool>,
) -> std::io::Result<Opening>
where
    C: AsyncRead + Unpin,
    U: AsyncWrite + Unpin,
{
    // The rest of the hello, read as a MITM tunnel reads one (bounded by
    // the parser's limits: 64 KiB, a few records).
    let (read, outcome) = read_client_hello(Rewind::new(first, &mut *client)).await;
    let (read, unread) = read.into_parts();
    match outcome {
        HelloRead::Closed => return Err(std::io::ErrorKind::UnexpectedEof.into()),
        HelloRead::Hello(Some(hello)) => {
            if let Some(sni) = hello.server_name.filter(|sni| (judge.intercepted)(sni)) {
                return Ok(Opening::Intercepted(sni));
            }
        }
        // A TLS handshake record that is no hello pinproxy can read (over
        // its limits, damaged) cannot be judged; other bytes are not TLS.
        HelloRead::Hello(None) if read.first() == Some(&TLS_HANDSHAKE) => {
            return Ok(Opening::Unreadable);
        }
        HelloRead::Hello(None) if starts_like_http(&read) => {
            let mut head = read.to_vec();
            let mut rest = unread;
            match judge_plain_head(&mut head, &mut rest, judge).await? {
                Opening::Relay => {}
                refused => return Ok(refused),
            }
            upstream.write_all(&head).await?;
            upstream.write_all(rest.prefix()).await?;
            return Ok(Opening::Relay);
        }
        HelloRead::Hello(None) => {}
    }
    upstream.write_all(&read).await?;
    // What the first read took beyond the bytes the hello needed.
    upstream.write_all(unread.prefix()).await?;
    Ok(Opening::Relay)
}

/// RFC 9110's `tchar`: what a method is made of.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Whether a tunnel's first bytes may begin an HTTP request: after any
/// empty lines (servers skip them), a method (a token) followed by a
/// space, or too few bytes yet to tell. Anything else (a binary protocol,
/// a bare command such as Redis's `PING`, an SSH banner) is not HTTP and
/// goes on without waiting for a line.
fn starts_like_http(first: &[u8]) -> bool {
    let line = first
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .and_then(|start| first.get(start..))
        .unwrap_or_default();
    let method = line.iter().take_while(|&&b| is_tchar(b)).count();
    match line.get(method) {
        None => true,
        // A tab too: some servers (Tomcat, Python's) end a method on one.
        Some(&(b' ' | b'\t')) => method > 0,
        Some(_) => false,
    }
}

/// Reads a plain-HTTP head that began in `head` (from `rest`, at most
/// `judge.head_limit` bytes) and judges the host it names, as a TLS hello
/// is judged by its server name: its absolute-form target's, else its
/// `Host`'s. A tunnel by address carrying `GET / HTTP/1.1` with `Host:
/// www.target.example` would otherwise send a listed host's cookies on
/// unread, through whichever exit rotation picked. Its first line decides
/// whether it is HTTP at all (a method, then ` HTTP/` somewhere in it); a
/// head that is, but cannot be read (malformed, over the limits, without a
/// host), or an HTTP/2 prior-knowledge preface, cannot be judged and is
/// refused. Only the first request is judged, as only a TLS connection's
/// first hello is: a client sends one host's requests on a connection it
/// opened for it.
async fn judge_plain_head<R>(
    head: &mut Vec<u8>,
    rest: &mut R,
    judge: &Judge<impl Fn(&str) -> bool>,
) -> std::io::Result<Opening>
where
    R: AsyncRead + Unpin,
{
    // Only bytes with a line end can finish a line or a head: a client
    // writing a byte at a time has its head parsed once per line.
    let mut new_line = true;
    loop {
        // The first bytes may have been too few to tell (`GE`); once more
        // came, a first word that is no method means no HTTP, line or not
        // (a binary protocol whose first bytes happened to be letters).
        if !starts_like_http(head) {
            return Ok(Opening::Relay);
        }
        if new_line {
            if let Some(verdict) = plain_verdict(head, judge) {
                return Ok(verdict);
            }
        }
        let room = judge.head_limit.saturating_sub(head.len());
        if room == 0 {
            return Ok(Opening::Unreadable);
        }
        let before = head.len();
        let limit = u64::try_from(room).unwrap_or(u64::MAX);
        if AsyncReadExt::take(&mut *rest, limit).read_buf(head).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        new_line = head
            .get(before..)
            .is_some_and(|fresh| fresh.contains(&b'\n'));
    }
}

/// The verdict on a plain-HTTP head read so far, `None` while it is not
/// whole (see [`judge_plain_head`]).
fn plain_verdict(head: &[u8], judge: &Judge<impl Fn(&str) -> bool>) -> Option<Opening> {
    let start = head.iter().position(|b| !matches!(b, b'\r' | b'\n'))?;
    let after_blank = head.get(start..)?;
    if after_blank.starts_with(b"PRI * HTTP/2.0") {
        return Some(Opening::Unreadable);
    }
    let line_end = after_blank.iter().position(|&b| b == b'\n')?;
    let line = after_blank.get(..line_end).unwrap_or_default();
    // After a space or a tab, in any case (lenient servers read both).
    let names_http = line.windows(6).any(|w| {
        matches!(w.first(), Some(b' ' | b'\t'))
            && w.get(1..).is_some_and(|v| v.eq_ignore_ascii_case(b"HTTP/"))
    });
    if !names_http {
        return Some(Opening::Relay);
    }
    let mut fields = vec![httparse::EMPTY_HEADER; judge.max_fields.max(1)];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => Some(match named_host(&request) {
            Some(host) if (judge.intercepted)(&host) => Opening::Intercepted(host),
            Some(_) => Opening::Relay,
            None => Opening::Unreadable,
        }),
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Opening::Unreadable),
    }
}

/// The host a parsed plain-HTTP request names: its absolute-form target's,
/// else its one `Host` field's (`None`: neither, or two `Host` fields).
fn named_host(request: &httparse::Request<'_, '_>) -> Option<String> {
    let authority = match request.path {
        Some(path) if !path.starts_with('/') && path != "*" => {
            let uri: http::Uri = path.parse().ok()?;
            uri.authority()?.as_str().to_owned()
        }
        _ => {
            let mut hosts = request
                .headers
                .iter()
                .filter(|field| field.name.eq_ignore_ascii_case("host"));
            let host = hosts.next()?;
            if hosts.next().is_some() {
                return None;
            }
            std::str::from_utf8(host.value).ok()?.trim().to_owned()
        }
    };
    let uri: http::Uri = format!("http://{authority}/").parse().ok()?;
    HostPort::from_uri(&uri, 80)
        .ok()
        .map(|at| at.host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello naming `sni`, as rustls writes it.
    fn hello(sni: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes).unwrap();
        bytes
    }

    /// Judging with `www.target.example` intercepted (judged as
    /// `InterceptPolicy::intercepts` judges a host).
    fn judge() -> Judge<impl Fn(&str) -> bool> {
        Judge {
            intercepted: |host: &str| {
                host.strip_suffix('.')
                    .unwrap_or(host)
                    .eq_ignore_ascii_case("www.target.example")
            },
            head_limit: 1 << 14,
            max_fields: 100,
            head_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }

    /// Runs [`first_words`] with `client_sends` written by the client
    /// (in two pieces, cut inside the hello), `server_sends` by the
    /// server, and `www.target.example` intercepted; answers the opening
    /// and what each side received.
    async fn open_with(client_sends: &[u8], server_sends: &[u8]) -> (Opening, Vec<u8>, Vec<u8>) {
        let (mut client, mut client_far) = tokio::io::duplex(1 << 16);
        let (mut upstream, mut upstream_far) = tokio::io::duplex(1 << 16);
        upstream_far.write_all(server_sends).await.unwrap();
        let (a, b) = client_sends.split_at(client_sends.len() / 2);
        client_far.write_all(a).await.unwrap();
        // The rest comes later, as a second segment would.
        let rest = b.to_vec();
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            // Bytes after what `first_words` reads are the relay's: the
            // tunnel may be gone by then.
            let _ = client_far.write_all(&rest).await;
            client_far
        });
        let opening = first_words(&mut client, &mut upstream, Some(judge()))
            .await
            .unwrap();
        drop((client, upstream));
        let mut client_far = writer.await.unwrap();
        let mut to_client = Vec::new();
        client_far.read_to_end(&mut to_client).await.unwrap();
        let mut to_upstream = Vec::new();
        upstream_far.read_to_end(&mut to_upstream).await.unwrap();
        (opening, to_client, to_upstream)
    }

    #[tokio::test]
    async fn a_hello_naming_an_intercepted_host_goes_nowhere() {
        let (opening, _, sent) = open_with(&hello("www.target.example"), b"").await;
        assert_eq!(opening, Opening::Intercepted("www.target.example".into()));
        assert!(sent.is_empty(), "{} bytes went on", sent.len());
    }

    #[tokio::test]
    async fn other_first_words_go_on_as_they_are() {
        let other = hello("cdn.other.example");
        let (opening, _, sent) = open_with(&other, b"").await;
        assert_eq!((opening, sent), (Opening::Relay, other));
        let plain = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let (opening, _, sent) = open_with(&plain, b"").await;
        assert_eq!((opening, sent), (Opening::Relay, plain));
        // Both sides speaking at once (SSH): the client's words are judged
        // and go on, whichever came first (the banner reaches the client
        // then or through the relay: `first_words_after_the_server_spoke_
        // are_judged_too` orders them).
        let (opening, _, sent) = open_with(b"SSH-2.0-client\r\n", b"SSH-2.0-x\r\n").await;
        assert_eq!(
            (opening, sent),
            (Opening::Relay, b"SSH-2.0-client\r\n".to_vec())
        );
    }

    /// A plain-HTTP request in a tunnel by address is judged by the host it
    /// names, as a hello by its server name: a listed host's cookies never
    /// go on unread. One whose head cannot be read, or an HTTP/2
    /// prior-knowledge preface, cannot be judged.
    #[tokio::test]
    async fn a_plain_request_naming_an_intercepted_host_goes_nowhere() {
        for request in [
            &b"GET / HTTP/1.1\r\nHost: www.target.example\r\nCookie: datadome=T\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nhost: WWW.Target.Example.:80\r\nCookie: datadome=T\r\n\r\n",
            b"GET http://www.target.example/ HTTP/1.1\r\nHost: x\r\nCookie: datadome=T\r\n\r\n",
            b"POST / HTTP/1.0\nHost: www.target.example\n\n",
            // Lines servers read as requests though they are not written
            // as clients write them: an empty line first, a space after
            // the version, a method that is a token but not letters.
            b"\r\nGET / HTTP/1.1\r\nHost: www.target.example\r\n\r\n",
            b"GET / HTTP/1.1 \r\nHost: www.target.example\r\n\r\n",
            b"M-SEARCH * HTTP/1.1\r\nHost: www.target.example\r\n\r\n",
            b"X_GET2 / HTTP/1.1\r\nHost: www.target.example\r\n\r\n",
            b"GET\t/\tHTTP/1.1\r\nHost: www.target.example\r\n\r\n",
            b"GET /\tHTTP/1.1\r\nHost: www.target.example\r\n\r\n",
            b"GET / http/1.1\r\nHost: www.target.example\r\n\r\n",
        ] {
            let (opening, _, sent) = open_with(request, b"").await;
            // Refused either way: named, or not readable as clients write.
            assert!(
                matches!(&opening, Opening::Intercepted(host) if host.to_ascii_lowercase().starts_with("www.target.example"))
                    || opening == Opening::Unreadable,
                "{opening:?}: {}",
                String::from_utf8_lossy(request)
            );
            assert!(sent.is_empty(), "{} bytes went on", sent.len());
        }
        for request in [
            &b"GET / HTTP/1.1\r\nCookie: datadome=T\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nHost: www.target.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: www.target.example\r\nBad Name: 1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            let (opening, _, sent) = open_with(request, b"").await;
            assert_eq!(
                opening,
                Opening::Unreadable,
                "{}",
                String::from_utf8_lossy(request)
            );
            assert!(sent.is_empty(), "{} bytes went on", sent.len());
        }
        // A head longer than the limit cannot be judged either.
        let mut long = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 1 << 15));
        let (opening, _, sent) = open_with(&long, b"").await;
        assert_eq!(opening, Opening::Unreadable);
        assert!(sent.is_empty());
        // Other first words are not taken for HTTP: a binary protocol, a
        // bare command, a line that is no request line, an SSH banner,
        // binary bytes after letters (split so that the first read holds
        // the letters alone).
        for other in [
            &b"ABCD\x01\x02\x03\x04"[..],
            &b"\0\0\0\x08\x04\xd2\x16\x2f"[..],
            b"PING\r\n",
            b"AUTH secret\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
        ] {
            let (opening, _, sent) = open_with(other, b"").await;
            assert_eq!(opening, Opening::Relay, "{other:?}");
            assert!(other.starts_with(&sent) && !sent.is_empty(), "{sent:?}");
        }
    }

    /// An exit (or a server) that speaks before the client does not let the
    /// client's first words pass unjudged: its bytes reach the client, and
    /// the client's request is judged all the same.
    #[tokio::test]
    async fn first_words_after_the_server_spoke_are_judged_too() {
        for (server, client, refused) in [
            (
                &b"\r\n"[..],
                &b"GET / HTTP/1.1\r\nHost: www.target.example\r\n\r\n"[..],
                true,
            ),
            (b"220 smtp\r\n", b"EHLO client\r\n", false),
        ] {
            let (mut near, mut client_far) = tokio::io::duplex(1 << 16);
            let (mut upstream, mut upstream_far) = tokio::io::duplex(1 << 16);
            upstream_far.write_all(server).await.unwrap();
            let judging = tokio::spawn(async move {
                let opening = first_words(&mut near, &mut upstream, Some(judge())).await;
                drop((near, upstream));
                opening.unwrap()
            });
            // The server's words reach the client before it speaks.
            let mut heard = vec![0u8; server.len()];
            client_far.read_exact(&mut heard).await.unwrap();
            assert_eq!(heard, server);
            client_far.write_all(client).await.unwrap();
            let opening = judging.await.unwrap();
            let mut sent = Vec::new();
            upstream_far.read_to_end(&mut sent).await.unwrap();
            if refused {
                assert!(matches!(opening, Opening::Intercepted(_)), "{opening:?}");
                assert!(sent.is_empty(), "{} bytes went on", sent.len());
            } else {
                assert_eq!((opening, sent), (Opening::Relay, client.to_vec()));
            }
        }
    }

    /// A server that pushes before its client speaks, past a banner's
    /// length or the head's deadline, speaks a protocol of its own: the
    /// relay takes over (with its idle limit and its identity's end),
    /// rather than the judge waiting on the client for ever.
    #[tokio::test(start_paused = true)]
    async fn a_server_that_speaks_on_its_own_is_handed_to_the_relay() {
        // Past the length.
        let (mut near, mut client_far) = tokio::io::duplex(1 << 20);
        let (mut upstream, mut upstream_far) = tokio::io::duplex(1 << 20);
        let push = vec![b'p'; SERVER_FIRST_LIMIT + 1];
        upstream_far.write_all(&push).await.unwrap();
        let opening = first_words(&mut near, &mut upstream, Some(judge()))
            .await
            .unwrap();
        assert_eq!(opening, Opening::Relay);
        let mut heard = vec![0u8; push.len()];
        client_far.read_exact(&mut heard).await.unwrap();
        assert_eq!(heard, push);
        // Past the deadline.
        let (mut near, _client_far) = tokio::io::duplex(1 << 16);
        let (mut upstream, mut upstream_far) = tokio::io::duplex(1 << 16);
        upstream_far.write_all(b"220 banner\r\n").await.unwrap();
        let started = tokio::time::Instant::now();
        let opening = first_words(&mut near, &mut upstream, Some(judge()))
            .await
            .unwrap();
        assert_eq!(opening, Opening::Relay);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
    }

    /// A client that begins a request and stops is held to the head's
    /// deadline, not the relay's idle limit.
    #[tokio::test(start_paused = true)]
    async fn a_head_begun_and_left_unfinished_times_out() {
        let (mut client, mut client_far) = tokio::io::duplex(1 << 16);
        let (mut upstream, _upstream_far) = tokio::io::duplex(1 << 16);
        client_far.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let judge = Judge {
            intercepted: |_: &str| false,
            head_limit: 1 << 14,
            max_fields: 100,
            head_read: Duration::from_secs(10),
            idle: Duration::from_secs(600),
        };
        let started = tokio::time::Instant::now();
        let error = first_words(&mut client, &mut upstream, Some(judge))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(11),
            "{:?}",
            started.elapsed()
        );
    }

    /// A TLS handshake record that holds no hello pinproxy can read cannot
    /// be judged: refused, nothing sent on.
    #[tokio::test]
    async fn an_unreadable_hello_goes_nowhere() {
        let record = [22, 3, 1, 0, 6, 99, 0, 0, 2, 0, 0];
        let (opening, _, sent) = open_with(&record, b"").await;
        assert_eq!(opening, Opening::Unreadable);
        assert!(sent.is_empty());
    }
}
