//! Redis as a fleet runs it, with what goes wrong: servers with or without
//! persistence, a primary and its replica, Sentinels that fail the primary
//! over, and a replica that is made to miss writes (stopped with SIGSTOP,
//! by its own PID), and a three-node Redis Cluster whose slots can be moved
//! between nodes. Every process is started by the test, waited for by a
//! readiness line, and killed by its handle when dropped.

use std::time::Duration;

use tokio::process::{Child, Command};

use super::procs::{free_port, require, spawn_until};

/// One redis-server.
pub struct RedisNode {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    persistent: bool,
    replica_of: Option<u16>,
    cluster: bool,
}

impl RedisNode {
    /// A server with its data in memory only: a restart comes back empty.
    pub async fn volatile() -> RedisNode {
        RedisNode::launch_new(false, None).await
    }

    /// A server with an append-only file.
    pub async fn persistent() -> RedisNode {
        RedisNode::launch_new(true, None).await
    }

    /// A replica of the server on `primary` (no persistence of its own).
    pub async fn replica_of(primary: u16) -> RedisNode {
        RedisNode::launch_new(false, Some(primary)).await
    }

    /// A node of a Redis Cluster (no slots yet: see [`RedisCluster`]).
    pub async fn cluster_member() -> RedisNode {
        RedisNode::launch_with(false, None, true).await
    }

    async fn launch_new(persistent: bool, replica_of: Option<u16>) -> RedisNode {
        RedisNode::launch_with(persistent, replica_of, false).await
    }

    async fn launch_with(persistent: bool, replica_of: Option<u16>, cluster: bool) -> RedisNode {
        let mut node = RedisNode {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            persistent,
            replica_of,
            cluster,
        };
        node.launch().await;
        node
    }

    async fn launch(&mut self) {
        let mut command = Command::new(require("redis-server"));
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--maxmemory-policy", "noeviction"])
            // Redis 7 waits 5 s by default before a diskless full sync,
            // for more replicas to join it: a replica here syncs at once.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(self.dir.path());
        if self.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        if let Some(primary) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        if self.cluster {
            command
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(self.dir.path().join("nodes.conf"));
        }
        self.child = Some(spawn_until(command, "Ready to accept connections", false).await);
    }

    /// The store URL for pinproxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A connection for the test's own commands.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Runs one command and returns its answer.
    pub async fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut connection = self.connection().await;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut connection).await.unwrap()
    }

    /// Keys matching `pattern` (SCAN, bounded).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut connection = self.connection().await;
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        for _ in 0..10_000 {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
        panic!("SCAN did not finish");
    }

    /// Kills the server (SIGKILL).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Kills and starts it again on the same port (and data, if persistent:
    /// a volatile one comes back empty).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets but answers
    /// nothing, replicates nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("a running server");
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (at most 30 s: a loaded machine) until this replica has the
    /// primary's data.
    pub async fn wait_in_sync(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let info: String = self.command(&["INFO", "replication"]).await;
            if info.contains("master_link_status:up") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the replica on {} never synced", self.port);
    }
}

/// A Sentinel watching a primary as `mymaster`.
pub struct Sentinel {
    /// Its port on 127.0.0.1.
    pub port: u16,
    _child: Child,
    _dir: tempfile::TempDir,
}

/// The name the Sentinels know the group by.
pub const SERVICE: &str = "mymaster";

impl Sentinel {
    /// Starts a Sentinel for the primary on `primary` (quorum 2, the
    /// primary is down after 1 s).
    pub async fn start(primary: u16) -> Sentinel {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\nsentinel resolve-hostnames no\n\
                 sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {SERVICE} 1000\n\
                 sentinel failover-timeout {SERVICE} 5000\n\
                 sentinel parallel-syncs {SERVICE} 1\n"
            ),
        )
        .unwrap();
        let mut command = Command::new(require("redis-server"));
        command.arg(&config).arg("--sentinel");
        let child = spawn_until(command, "Sentinel ID is", false).await;
        Sentinel {
            port,
            _child: child,
            _dir: dir,
        }
    }

    /// The port of the primary this Sentinel points to now.
    pub async fn primary_port(&self) -> Option<u16> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).ok()?;
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(SERVICE)
            .query_async(&mut connection)
            .await
            .ok()?;
        addr.get(1)?.parse().ok()
    }
}

/// The store URL of a Sentinel group.
pub fn sentinel_url(sentinels: &[Sentinel]) -> String {
    let hosts: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    format!("redis+sentinel://{}/{SERVICE}", hosts.join(","))
}

/// Three Redis Cluster primaries sharing the 16384 slots evenly.
pub struct RedisCluster {
    /// The nodes, in slot order (node 0 serves slots 0-5460, ...).
    pub nodes: Vec<RedisNode>,
}

impl RedisCluster {
    /// Starts three nodes, introduces them (`CLUSTER MEET`), gives each a
    /// third of the slots and waits (bounded) until the cluster is up.
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisNode::cluster_member().await);
        }
        for other in &nodes[1..] {
            let _: () = nodes[0]
                .command(&["CLUSTER", "MEET", "127.0.0.1", &other.port.to_string()])
                .await;
        }
        for (node, (start, end)) in nodes.iter().zip([(0, 5460), (5461, 10922), (10923, 16383)]) {
            let _: () = node
                .command(&[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &start.to_string(),
                    &end.to_string(),
                ])
                .await;
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_until_up().await;
        cluster
    }

    async fn wait_until_up(&self) {
        for _ in 0..400 {
            let mut up = true;
            for node in &self.nodes {
                let info: String = node.command(&["CLUSTER", "INFO"]).await;
                up &= info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3");
            }
            if up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the cluster never came up");
    }

    /// The store URL naming every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The nodes holding keys that match `pattern`, and how many each.
    pub async fn holders(&self, pattern: &str) -> Vec<(usize, usize)> {
        let mut holders = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let keys = node.keys(pattern).await.len();
            if keys > 0 {
                holders.push((i, keys));
            }
        }
        holders
    }

    /// The slot of `key`.
    pub async fn slot_of(&self, key: &str) -> i64 {
        self.nodes[0].command(&["CLUSTER", "KEYSLOT", key]).await
    }

    /// Moves `slot` with its keys from node `from` to node `to` (the
    /// resharding steps: IMPORTING, MIGRATING, MIGRATE every key, then
    /// SETSLOT NODE on every node).
    pub async fn move_slot(&self, slot: i64, from: usize, to: usize) {
        let slot = slot.to_string();
        let from_id: String = self.nodes[from].command(&["CLUSTER", "MYID"]).await;
        let to_id: String = self.nodes[to].command(&["CLUSTER", "MYID"]).await;
        let _: () = self.nodes[to]
            .command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])
            .await;
        let _: () = self.nodes[from]
            .command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])
            .await;
        let target_port = self.nodes[to].port.to_string();
        for _ in 0..10_000 {
            let keys: Vec<String> = self.nodes[from]
                .command(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                .await;
            if keys.is_empty() {
                break;
            }
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                &target_port,
                "",
                "0",
                "5000",
                "KEYS",
            ];
            args.extend(keys.iter().map(String::as_str));
            let _: String = self.nodes[from].command(&args).await;
        }
        for node in &self.nodes {
            let _: () = node
                .command(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
                .await;
        }
    }
}

/// A loopback relay in front of a Redis that, once told to, shows the
/// server's clock ahead by a set amount in every `INFO` answer
/// (`server_time_usec`, rewritten digit for digit so the reply's length
/// holds): how a replica sees Redis's clock jump forward, which expires
/// keys early, without stepping a clock of the machine.
pub struct ClockShift {
    /// Its port on 127.0.0.1.
    pub port: u16,
    ahead_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    relay: tokio::task::JoinHandle<()>,
}

impl ClockShift {
    /// A relay to the Redis on `target` (showing its clock as it is).
    pub async fn start(target: u16) -> ClockShift {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ahead_us = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let shift = ahead_us.clone();
        let relay = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                tokio::spawn(relay_shifted(client, server, shift.clone()));
            }
        });
        ClockShift {
            port,
            ahead_us,
            relay,
        }
    }

    /// The URL of the relayed server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Shows the server's clock `by` ahead from now on.
    pub fn jump(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap();
        self.ahead_us
            .store(micros, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for ClockShift {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

/// Copies `client`'s bytes to `server` as they are, and the answers back
/// with every `server_time_usec` field moved `ahead_us` on. A field split
/// across two reads is kept back until the next: its number unfinished, or
/// a tail that may be the start of its name.
async fn relay_shifted(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    ahead_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FIELD: &[u8] = b"server_time_usec:";
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match server_read.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        let ahead = ahead_us.load(std::sync::atomic::Ordering::SeqCst);
        let mut at = 0;
        let mut unfinished = None;
        while let Some(found) = pending[at..].windows(FIELD.len()).position(|w| w == FIELD) {
            let digits_at = at + found + FIELD.len();
            let digits = pending[digits_at..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            if digits_at + digits >= pending.len() {
                unfinished = Some(at + found);
                break;
            }
            let text = std::str::from_utf8(&pending[digits_at..digits_at + digits]).unwrap();
            let shifted = (text.parse::<u64>().unwrap() + ahead).to_string();
            assert_eq!(
                shifted.len(),
                digits,
                "the shift changed the field's length"
            );
            pending[digits_at..digits_at + digits].copy_from_slice(shifted.as_bytes());
            at = digits_at + digits;
        }
        let send = unfinished.unwrap_or_else(|| {
            // A tail that is the start of the field's name waits too.
            let tail = (1..FIELD.len())
                .rev()
                .find(|&k| pending.len() >= at + k && pending.ends_with(&FIELD[..k]))
                .unwrap_or(0);
            pending.len() - tail
        });
        if client_write.write_all(&pending[..send]).await.is_err() {
            break;
        }
        pending.drain(..send);
    }
    upstream.abort();
}
