//! Shared test harness: pinproxy started in-process on 127.0.0.1:0, test
//! origins and exits on loopback, and a client that goes through the proxy.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod exit;
pub mod origin;
pub mod procs;
pub mod raw_origin;

use std::time::Duration;

use pinproxy::clock::Clock;
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
        Proxy::start_clocked(exits, origin, Clock::system(), tweak).await
    }

    /// [`Proxy::start`] with a given clock.
    pub async fn start_clocked(
        exits: &[(String, String)],
        origin: &Origin,
        clock: Clock,
        tweak: impl FnOnce(&mut Config),
    ) -> Proxy {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: Some(data_dir.path().to_owned()),
            upstream_ca: vec![origin.pki.ca_file.clone()],
            admin: pinproxy::config::AdminConfig {
                listen: Some("127.0.0.1:0".parse().unwrap()),
            },
            exits: exits
                .iter()
                .map(|(id, url)| ExitConfig::new(id, url))
                .collect(),
            ..Config::default()
        };
        tweak(&mut config);
        let daemon = Daemon::start_with_clock(&config, clock)
            .await
            .expect("pinproxy starts");
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

/// A test origin, `n` test exits and a pinproxy over them.
pub struct Setup {
    /// The origin.
    pub origin: Origin,
    /// The exits, egressing from 127.0.0.2, 127.0.0.3, ...
    pub exits: Vec<TestExit>,
    /// pinproxy.
    pub proxy: Proxy,
}

impl Setup {
    /// Starts everything with default settings.
    pub async fn start(n: usize) -> Setup {
        Setup::start_with(n, |_| {}).await
    }

    /// Starts everything, `tweak` adjusting pinproxy's configuration.
    pub async fn start_with(n: usize, tweak: impl FnOnce(&mut Config)) -> Setup {
        Setup::start_clocked(n, Clock::system(), tweak).await
    }

    /// Starts everything with a given clock.
    pub async fn start_clocked(n: usize, clock: Clock, tweak: impl FnOnce(&mut Config)) -> Setup {
        let origin = Origin::start().await;
        let (exits, config) = exits(n).await;
        let proxy = Proxy::start_clocked(&config, &origin, clock, tweak).await;
        Setup {
            origin,
            exits,
            proxy,
        }
    }

    /// GETs `path` on a fresh tunnel with extra headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut conn = self
            .proxy
            .client
            .tunnel("localhost", self.origin.https.port())
            .await;
        conn.get(path, headers).await
    }

    /// The index (0-based) of the test exit whose address is `ip`.
    pub fn exit_of(&self, ip: std::net::IpAddr) -> usize {
        self.exits
            .iter()
            .position(|e| e.source == ip)
            .expect("a test exit's address")
    }

    /// GETs `path` on the HTTPS origin in a fresh tunnel with `jar`.
    pub async fn get(&self, path: &str, jar: &mut Jar) -> Reply {
        let mut conn = self
            .proxy
            .client
            .tunnel("localhost", self.origin.https.port())
            .await;
        conn.get_with_jar(path, jar).await
    }

    /// Logs in (`/login` or a variant) in a fresh tunnel: the new jar and
    /// the exit address the cookie is bound to.
    pub async fn login(&self, path: &str) -> (Jar, std::net::IpAddr) {
        let mut jar = Jar::default();
        let reply = self.get(path, &mut jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        (
            jar,
            origin::reported_peer(&reply.body).expect("origin reports the peer"),
        )
    }

    /// The address the origin saw for a reply.
    pub fn peer(reply: &Reply) -> Option<std::net::IpAddr> {
        origin::reported_peer(&reply.body)
    }

    /// Stops pinproxy.
    pub async fn stop(self) {
        self.proxy.stop().await;
    }
}
