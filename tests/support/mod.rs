//! Shared test harness: pinproxy started in-process on 127.0.0.1:0, test
//! origins and exits on loopback, and a client that goes through the proxy.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod exit;
pub mod origin;

use std::time::Duration;

use pinproxy::config::{Config, ExitConfig};
use pinproxy::Daemon;

pub use client::{Conn, Jar, ProxyClient, Reply};
pub use exit::TestExit;
pub use origin::Origin;

/// A pinproxy running in this process with its own data directory.
pub struct Proxy {
    /// The daemon.
    pub daemon: Daemon,
    /// A client that trusts its CA.
    pub client: ProxyClient,
    /// The data directory (deleted on drop).
    pub data_dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts pinproxy with these `(id, url)` exits, trusting `origin`'s CA;
    /// `tweak` adjusts the configuration first.
    pub async fn start(
        exits: &[(String, String)],
        origin: &Origin,
        tweak: impl FnOnce(&mut Config),
    ) -> Proxy {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: Some(data_dir.path().to_owned()),
            upstream_ca: vec![origin.pki.ca_file.clone()],
            exits: exits
                .iter()
                .map(|(id, url)| ExitConfig {
                    id: id.clone(),
                    url: url.clone(),
                })
                .collect(),
            ..Config::default()
        };
        tweak(&mut config);
        let daemon = Daemon::start(&config).await.expect("pinproxy starts");
        let client = ProxyClient::new(daemon.local_addr(), daemon.ca_cert_pem());
        Proxy {
            daemon,
            client,
            data_dir,
        }
    }

    /// Stops the daemon.
    pub async fn stop(self) {
        self.daemon.shutdown(Duration::from_secs(5)).await;
    }
}

/// Starts `n` test exits egressing from 127.0.0.2, 127.0.0.3, ... and
/// returns them with their `(id, url)` pairs.
pub async fn exits(n: usize) -> (Vec<TestExit>, Vec<(String, String)>) {
    let mut running = Vec::new();
    let mut config = Vec::new();
    for i in 0..n {
        let exit = TestExit::start(&format!("127.0.0.{}", i + 2)).await;
        config.push((format!("exit{}", i + 1), exit.url()));
        running.push(exit);
    }
    (running, config)
}
