//! Talking to a pinproxy's admin endpoint over a real socket, the way an
//! operator's tools do: one request per connection, the whole answer read.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One admin answer.
pub struct AdminReply {
    /// The status code.
    pub status: u16,
    /// The head (status line and headers) as sent.
    pub head: String,
    /// The body.
    pub body: String,
}

impl AdminReply {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `METHOD path` on the admin endpoint at `addr` (bounded to 20 s).
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> AdminReply {
    request_with(addr, method, path, &[]).await
}

/// The status of a `GET path` addressed to `host` (its `Host` header),
/// whatever the address it is sent to.
pub async fn status_for_host(addr: SocketAddr, path: &str, host: &str) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer))
        .await
        .expect("the admin endpoint answers within 20 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.split(' ').nth(1).unwrap().parse().unwrap()
}

/// [`request`] with extra request headers (`Origin`, say).
pub async fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> AdminReply {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Content-Length: 0\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer))
        .await
        .expect("the admin endpoint answers within 20 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    AdminReply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// `GET path`, which must answer 200: the body.
pub async fn get(addr: SocketAddr, path: &str) -> String {
    let reply = request(addr, "GET", path).await;
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    reply.body
}
