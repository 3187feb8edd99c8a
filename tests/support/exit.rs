//! Test exits: real CONNECT proxies whose outgoing connections leave from a
//! chosen source address (127.0.0.2, 127.0.0.3, ...), so the origin sees a
//! different IP per exit. Each records the CONNECT requests it received.
//! Names that are not IP literals resolve to 127.0.0.1, where test origins
//! listen.
//!
//! A [`Gateway`] exit behaves like a commercial sticky-session provider: the
//! user name's `-session-NAME` picks an egress address that sticks to the
//! name, until the session sits idle too long or, at random, moves; every
//! CONNECT answer states the address in `X-Exit-IP`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// One CONNECT as the exit saw it.
#[derive(Clone, Debug)]
pub struct ConnectSeen {
    /// The requested target (`host:port`).
    pub target: String,
    /// The Proxy-Authorization header, if any.
    pub proxy_authorization: Option<String>,
    /// The user name in it, decoded.
    pub user: Option<String>,
    /// The egress address used.
    pub egress: IpAddr,
}

/// Sticky-session provider behaviour.
pub struct Gateway {
    /// Addresses sessions are given, in turn.
    pub addresses: Vec<IpAddr>,
    /// A session idle this long moves to the next address.
    pub idle_move: Option<Duration>,
    /// Chance that a new tunnel of a session moves it anyway.
    pub random_move: f64,
    state: Mutex<GatewayState>,
}

#[derive(Default)]
struct GatewayState {
    sessions: HashMap<String, (IpAddr, Instant)>,
    forced: std::collections::HashSet<String>,
    next: usize,
    rng: u64,
}

impl Gateway {
    /// A gateway over `addresses`; `seed` makes random moves repeatable.
    pub fn new(
        addresses: &[&str],
        idle_move: Option<Duration>,
        random_move: f64,
        seed: u64,
    ) -> Gateway {
        Gateway {
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            idle_move,
            random_move,
            state: Mutex::new(GatewayState {
                rng: seed.max(1),
                ..GatewayState::default()
            }),
        }
    }

    /// The address for a new tunnel of `session` (a fresh one per tunnel
    /// without a session: rotation).
    fn egress(&self, session: Option<&str>) -> IpAddr {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        let addresses = &self.addresses;
        let next_address = |next: &mut usize| {
            let ip = addresses[*next % addresses.len()];
            *next += 1;
            ip
        };
        let Some(session) = session else {
            return next_address(&mut state.next);
        };
        // xorshift: repeatable "random" moves for a given seed.
        state.rng ^= state.rng << 13;
        state.rng ^= state.rng >> 7;
        state.rng ^= state.rng << 17;
        let roll = (state.rng % 10_000) as f64 / 10_000.0;
        let now = Instant::now();
        let current = state.sessions.get(session).copied();
        let forced = state.forced.remove(session);
        let idle = |last: Instant| {
            self.idle_move
                .is_some_and(|idle| now.duration_since(last) >= idle)
        };
        let ip = match current {
            Some((ip, last)) if !forced && !idle(last) && roll >= self.random_move => ip,
            _ => next_address(&mut state.next),
        };
        state.sessions.insert(session.to_owned(), (ip, now));
        ip
    }

    /// Makes every known session move to a new address on its next tunnel.
    pub fn move_all(&self) {
        let mut state = self.state.lock().unwrap();
        let known: Vec<String> = state.sessions.keys().cloned().collect();
        state.forced.extend(known);
    }
}

/// A running test exit.
pub struct TestExit {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Source address of its outgoing connections (the first address for a gateway).
    pub source: IpAddr,
    /// Sticky-session behaviour, for gateway exits.
    pub gateway: Option<Arc<Gateway>>,
    connects: Arc<Mutex<Vec<ConnectSeen>>>,
    tunnels: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    /// While true, CONNECTs are recorded but not answered.
    hold: Arc<tokio::sync::watch::Sender<bool>>,
}

impl TestExit {
    /// Starts an exit egressing from `source` (e.g. "127.0.0.2").
    pub async fn start(source: &str) -> TestExit {
        Self::start_full(source, None, None).await
    }

    /// Starts an exit that demands `user:pass` Basic credentials.
    pub async fn start_with_auth(source: &str, credentials: Option<&str>) -> TestExit {
        Self::start_full(source, credentials, None).await
    }

    /// Starts a sticky-session gateway exit.
    pub async fn start_gateway(gateway: Gateway) -> TestExit {
        let first = gateway.addresses[0].to_string();
        Self::start_full(&first, None, Some(Arc::new(gateway))).await
    }

    async fn start_full(
        source: &str,
        credentials: Option<&str>,
        gateway: Option<Arc<Gateway>>,
    ) -> TestExit {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: IpAddr = source.parse().unwrap();
        let connects = Arc::new(Mutex::new(Vec::new()));
        let tunnels: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let hold = Arc::new(tokio::sync::watch::channel(false).0);
        let expected_auth = credentials.map(|c| {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        let accept = {
            let connects = connects.clone();
            let tunnels = tunnels.clone();
            let gateway = gateway.clone();
            let hold = hold.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let connects = connects.clone();
                    let expected_auth = expected_auth.clone();
                    let gateway = gateway.clone();
                    let held = hold.subscribe();
                    let task = tokio::spawn(async move {
                        let _ =
                            tunnel(client, source, connects, expected_auth, gateway, held).await;
                    });
                    let mut tunnels = tunnels.lock().unwrap();
                    tunnels.retain(|t| !t.is_finished());
                    tunnels.push(task);
                }
            })
        };
        TestExit {
            addr,
            source,
            gateway,
            connects,
            tunnels,
            accept,
            hold,
        }
    }

    /// Records CONNECTs but answers none until [`TestExit::release`] (a
    /// slow provider): a request is then held between its routing and
    /// its first byte upstream.
    pub fn hold(&self) {
        self.hold.send_replace(true);
    }

    /// Answers the held CONNECTs, and the next ones at once.
    pub fn release(&self) {
        self.hold.send_replace(false);
    }

    /// The exit URL for pinproxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The CONNECTs received so far.
    pub fn connects(&self) -> Vec<ConnectSeen> {
        self.connects.lock().unwrap().clone()
    }

    /// How many tunnels are open now (closed by neither side yet).
    pub fn open_tunnels(&self) -> usize {
        let mut tunnels = self.tunnels.lock().unwrap();
        tunnels.retain(|t| !t.is_finished());
        tunnels.len()
    }

    /// Waits (bounded: 10 s, polling: the exit has no signal for a tunnel
    /// pinproxy closes) until at most `open` tunnels are open, and fails
    /// the test if more still are.
    pub async fn assert_open_tunnels_fall_to(&self, open: usize) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.open_tunnels() > open && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let now = self.open_tunnels();
        assert!(now <= open, "{now} tunnels open, at most {open} expected");
    }

    /// Cuts every open tunnel (as providers do with idle ones); the exit
    /// keeps accepting new ones.
    pub fn close_tunnels(&self) {
        for task in self.tunnels.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Stops the exit: the port closes and open tunnels are cut.
    pub fn kill(&self) {
        self.accept.abort();
        self.close_tunnels();
    }
}

impl Drop for TestExit {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The user name of a Basic `Proxy-Authorization` value.
pub fn basic_user(value: &str) -> Option<String> {
    use base64::Engine as _;
    let token = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split(':').next().unwrap_or("").to_owned())
}

async fn tunnel(
    mut client: TcpStream,
    source: IpAddr,
    connects: Arc<Mutex<Vec<ConnectSeen>>>,
    expected_auth: Option<String>,
    gateway: Option<Arc<Gateway>>,
    mut held: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_len = loop {
        let mut chunk = [0u8; 1024];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(len) =
            request.parse(&buf).map_err(std::io::Error::other)?
        {
            break len;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    request
        .parse(&buf[..head_len])
        .map_err(std::io::Error::other)?;
    let target = request.path.unwrap_or("").to_owned();
    let auth = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned());
    let user = auth.as_deref().and_then(basic_user);
    let source = match &gateway {
        Some(g) => {
            let session = user
                .as_deref()
                .and_then(|u| u.split_once("-session-"))
                .map(|(_, s)| s);
            g.egress(session)
        }
        None => source,
    };
    connects.lock().unwrap().push(ConnectSeen {
        target: target.clone(),
        proxy_authorization: auth.clone(),
        user,
        egress: source,
    });
    // Bounded by the test's own timeouts: the sender lives as long as the
    // exit.
    let _ = held.wait_for(|held| !*held).await;
    if request.method != Some("CONNECT") {
        client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    if expected_auth.is_some() && auth != expected_auth {
        client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    let Some((host, port)) = target.rsplit_once(':') else {
        client
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = host.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let port: u16 = port.parse().map_err(std::io::Error::other)?;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut upstream = match socket.connect(SocketAddr::new(ip, port)).await {
        Ok(s) => s,
        Err(_) => {
            client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(());
        }
    };
    let answer = match &gateway {
        Some(_) => format!("HTTP/1.1 200 Connection established\r\nX-Exit-IP: {source}\r\n\r\n"),
        None => "HTTP/1.1 200 Connection established\r\n\r\n".to_owned(),
    };
    client.write_all(answer.as_bytes()).await?;
    if buf.len() > head_len {
        upstream.write_all(&buf[head_len..]).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
