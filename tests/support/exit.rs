//! Test exits: real CONNECT proxies whose outgoing connections leave from a
//! chosen source address (127.0.0.2, 127.0.0.3, ...), so the origin sees a
//! different IP per exit. Each records the CONNECT requests it received.
//! Names that are not IP literals resolve to 127.0.0.1, where test origins
//! listen.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

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
}

/// A running test exit.
pub struct TestExit {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Source address of its outgoing connections.
    pub source: IpAddr,
    connects: Arc<Mutex<Vec<ConnectSeen>>>,
    tunnels: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl TestExit {
    /// Starts an exit egressing from `source` (e.g. "127.0.0.2").
    pub async fn start(source: &str) -> TestExit {
        Self::start_with_auth(source, None).await
    }

    /// Starts an exit that demands `user:pass` Basic credentials.
    pub async fn start_with_auth(source: &str, credentials: Option<&str>) -> TestExit {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: IpAddr = source.parse().unwrap();
        let connects = Arc::new(Mutex::new(Vec::new()));
        let tunnels: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
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
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let connects = connects.clone();
                    let expected_auth = expected_auth.clone();
                    let task = tokio::spawn(async move {
                        let _ = tunnel(client, source, connects, expected_auth).await;
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
            connects,
            tunnels,
            accept,
        }
    }

    /// The exit URL for pinproxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The CONNECTs received so far.
    pub fn connects(&self) -> Vec<ConnectSeen> {
        self.connects.lock().unwrap().clone()
    }

    /// Stops the exit: the port closes and open tunnels are cut.
    pub fn kill(&self) {
        self.accept.abort();
        for task in self.tunnels.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for TestExit {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn tunnel(
    mut client: TcpStream,
    source: IpAddr,
    connects: Arc<Mutex<Vec<ConnectSeen>>>,
    expected_auth: Option<String>,
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
    connects.lock().unwrap().push(ConnectSeen {
        target: target.clone(),
        proxy_authorization: auth.clone(),
    });
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
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    if buf.len() > head_len {
        upstream.write_all(&buf[head_len..]).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
