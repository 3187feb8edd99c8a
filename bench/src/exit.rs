//! A minimal CONNECT exit proxy, standing in for a residential proxy
//! gateway: it answers `CONNECT host:port`, dials the target (optionally
//! from a chosen source address such as 127.0.0.2, so the origin sees the
//! exit's own IP) and relays bytes both ways. Nothing else is supported.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Largest `CONNECT` request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Serves `CONNECT` on `listener` until the process ends, egressing from
/// `source` when given.
pub async fn serve(listener: TcpListener, source: Option<IpAddr>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("exit: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = tunnel(client, source).await;
        });
    }
}

async fn tunnel(mut client: TcpStream, source: Option<IpAddr>) -> Result<()> {
    client.set_nodelay(true)?;
    let (target, leftover) =
        match tokio::time::timeout(Duration::from_secs(10), read_connect(&mut client)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                let _ = client
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return Err(e);
            }
            Err(_) => bail!("no CONNECT in time"),
        };
    let mut upstream = match connect_from(&target, source).await {
        Ok(stream) => stream,
        Err(e) => {
            let _ = client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await;
            return Err(e);
        }
    };
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    if !leftover.is_empty() {
        upstream.write_all(&leftover).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Reads the CONNECT head; returns its target and any bytes after it.
async fn read_connect(client: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            bail!("client closed before CONNECT");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf)? {
            httparse::Status::Complete(len) => {
                if request.method != Some("CONNECT") {
                    bail!("not CONNECT");
                }
                let target = request.path.ok_or_else(|| anyhow!("no target"))?.to_owned();
                return Ok((target, buf[len..].to_vec()));
            }
            httparse::Status::Partial if buf.len() > MAX_HEAD => bail!("head too long"),
            httparse::Status::Partial => {}
        }
    }
}

/// Connects to `host:port` (IPv4), from `source` when given.
async fn connect_from(target: &str, source: Option<IpAddr>) -> Result<TcpStream> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("target without port"))?;
    let port: u16 = port.parse().context("bad port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => tokio::net::lookup_host((host, port))
            .await?
            .map(|a| a.ip())
            .find(IpAddr::is_ipv4)
            .ok_or_else(|| anyhow!("{host} has no IPv4 address"))?,
    };
    // Only loopback targets are ever dialled.
    if !ip.is_loopback() {
        bail!("refusing non-loopback target {ip}");
    }
    let stream = match source {
        // Binding a source address makes the kernel pick the local port at
        // bind time, among ports free for every destination: with thousands
        // of short tunnels in TIME_WAIT that search gets slow. SO_REUSEADDR
        // at least lets TIME_WAIT ports be reused (loopback tw_reuse).
        Some(source) => {
            let socket = TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(SocketAddr::new(ip, port)).await?
        }
        None => TcpStream::connect(SocketAddr::new(ip, port)).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}
