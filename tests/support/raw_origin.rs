//! A plain-HTTP origin that records each request head byte for byte (case
//! and order of header names included) and answers `ok`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running raw origin.
pub struct RawOrigin {
    /// Where it listens.
    pub addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl RawOrigin {
    /// Starts it on 127.0.0.1.
    pub async fn start() -> RawOrigin {
        RawOrigin::start_answering(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
        )
        .await
    }

    /// Starts one that answers every request with `answer`, byte for
    /// byte; after a `101` it holds the connection (at most 10 s) until the
    /// peer sends something or closes it.
    pub async fn start_answering(answer: &'static [u8]) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
                        match tcp.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    recorded
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    if tcp.write_all(answer).await.is_ok() && answer.starts_with(b"HTTP/1.1 101") {
                        // Held (bounded): the protocols were switched.
                        let mut rest = [0u8; 1024];
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            tcp.read(&mut rest),
                        )
                        .await;
                    }
                });
            }
        });
        RawOrigin { addr, heads, task }
    }

    /// Every request head received, in order.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The header names of a head, in order, as written.
pub fn header_names(head: &str) -> Vec<String> {
    head.split("\r\n")
        .skip(1)
        .filter(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':').map(|(name, _)| name.to_owned()))
        .collect()
}
