//! A counting TCP relay: put between a client and a server (pinproxy and
//! its Redis), it forwards bytes both ways untouched and counts the client's
//! round trips, i.e. each time the client sends after the server last spoke
//! (or first) on a connection. A pipeline of commands sent together is one
//! round trip; a command sent after the previous answer arrived is another.
//!
//! Concurrent requests sharing one multiplexed connection are batched by the
//! client into fewer round trips than they would cost one at a time, so the
//! count per request is exact only with one request in flight. A
//! `stats` line on stdin prints the totals so far as one JSON line.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// What crossed the relay so far.
#[derive(Debug, Default)]
pub struct Counters {
    round_trips: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    connections: AtomicU64,
}

/// The totals so far.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RelayStats {
    /// Client sends that followed a server answer (or opened a connection).
    pub round_trips: u64,
    /// Bytes from client to server.
    pub bytes_up: u64,
    /// Bytes from server to client.
    pub bytes_down: u64,
    /// Connections relayed.
    pub connections: u64,
}

impl Counters {
    /// The totals so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            round_trips: self.round_trips.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }

    /// Answers `stats` lines on stdin with one JSON [`RelayStats`] line each,
    /// until stdin ends.
    pub async fn report_on_stdin(self: Arc<Self>) {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "stats" {
                if let Ok(json) = serde_json::to_string(&self.stats()) {
                    println!("{json}");
                }
            }
        }
    }
}

/// Relays every connection accepted on `listener` to `to`, counting, until
/// the process ends.
pub async fn serve(listener: TcpListener, to: SocketAddr, counters: Arc<Counters>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("relay: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let counters = counters.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(to).await else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            counters.connections.fetch_add(1, Ordering::Relaxed);
            // Whether the server spoke last on this connection: the next
            // client send then starts a new round trip.
            let server_spoke = Arc::new(AtomicBool::new(true));
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(
                client_read,
                server_write,
                counters.clone(),
                server_spoke.clone(),
                true,
            );
            let down = pump(server_read, client_write, counters, server_spoke, false);
            let _ = tokio::join!(up, down);
        });
    }
}

/// Copies one direction until it ends, counting bytes and, upward, round
/// trips.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    counters: Arc<Counters>,
    server_spoke: Arc<AtomicBool>,
    upward: bool,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if upward {
            if server_spoke.swap(false, Ordering::Relaxed) {
                counters.round_trips.fetch_add(1, Ordering::Relaxed);
            }
            counters.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            server_spoke.store(true, Ordering::Relaxed);
            counters.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_a_pipeline_as_one_round_trip() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        // An echo server answering each read.
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        tokio::spawn(serve(relay, server_addr, counters.clone()));

        let mut c = TcpStream::connect(relay_addr).await.unwrap();
        let mut buf = [0u8; 64];
        // Two exchanges, each a request then its answer.
        for msg in [&b"PING\r\n"[..], &b"GET a\r\nGET b\r\n"[..]] {
            c.write_all(msg).await.unwrap();
            let mut got = 0;
            while got < msg.len() {
                got += c.read(&mut buf).await.unwrap();
            }
        }
        let stats = counters.stats();
        assert_eq!(stats.round_trips, 2);
        assert_eq!(stats.bytes_up, 6 + 14);
        assert_eq!(stats.bytes_down, 6 + 14);
        assert_eq!(stats.connections, 1);
    }
}
