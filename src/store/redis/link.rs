//! How the Redis store reaches its server: the server a `redis://` URL
//! names, the current primary of a Sentinel-managed group
//! (`redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`), or, in a
//! Redis Cluster (`redis+cluster://HOST:PORT[,HOST:PORT...]`), the primary
//! that serves the namespace's slot; both are asked anew after a failover.
//!
//! In a cluster every key of a namespace carries the hash tag `{NS}`, so
//! they all live in one slot: the store's scripts read and write several
//! keys at once (pins, their identities, the generation), which a cluster
//! allows only within one slot. The cluster then gives the namespace
//! failover, not sharding; one node holds it (see the README's scale notes).
//!
//! A command that fails on the connection, lands on a server that has
//! become a replica (`READONLY`), or on a node that no longer serves the
//! slot (`MOVED`, `CLUSTERDOWN`, ...), marks the store unavailable; the
//! store's background check then finds the primary again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::ConnectionAddr;

use super::codec::{is_connection_error, redis_error};
use crate::store::{StoreError, StoreErrorKind};

/// How long a command may take before the store counts as unavailable.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the store's server is. Its `Debug` leaves out the credentials a
/// URL may carry (`redis://:PASSWORD@host`).
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// One server.
    Direct(String),
    /// The primary of a Sentinel group.
    Sentinel {
        /// The sentinels' addresses.
        sentinels: Vec<(String, u16)>,
        /// The group's name (the master name the sentinels monitor).
        service: String,
        /// The database number.
        db: i64,
    },
    /// The primary serving the slot of `slot_key` in a Redis Cluster.
    Cluster {
        /// Seed nodes to ask for the slot map.
        nodes: Vec<(String, u16)>,
        /// A key of the namespace (hash-tagged): its slot is the one used.
        slot_key: String,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Direct(url) => f.debug_tuple("Direct").field(&redacted(url)).finish(),
            Target::Sentinel {
                sentinels,
                service,
                db,
            } => f
                .debug_struct("Sentinel")
                .field("sentinels", sentinels)
                .field("service", service)
                .field("db", db)
                .finish(),
            Target::Cluster { nodes, slot_key } => f
                .debug_struct("Cluster")
                .field("nodes", nodes)
                .field("slot_key", slot_key)
                .finish(),
        }
    }
}

/// `url` with the user information of its authority (a Redis password,
/// with or without a user name) written `***`: what may be logged or
/// printed of a store URL.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((_, hosts)) => format!("{scheme}://***@{hosts}{path}"),
        None => url.to_owned(),
    }
}

impl Target {
    /// The servers the URL names, as `(host, port)`: the server, the
    /// sentinels, or the cluster's seed nodes (a Unix socket names none).
    pub fn servers(&self) -> Vec<(String, u16)> {
        match self {
            Target::Direct(url) => {
                use redis::IntoConnectionInfo as _;
                match url
                    .as_str()
                    .into_connection_info()
                    .map(|info| info.addr().clone())
                {
                    Ok(redis::ConnectionAddr::Tcp(host, port))
                    | Ok(redis::ConnectionAddr::TcpTls { host, port, .. }) => vec![(host, port)],
                    _ => Vec::new(),
                }
            }
            Target::Sentinel { sentinels, .. } => sentinels.clone(),
            Target::Cluster { nodes, .. } => nodes.clone(),
        }
    }

    /// Parses `redis://...`, `rediss://...`,
    /// `redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]` or
    /// `redis+cluster://HOST:PORT[,HOST:PORT...]`; `slot_key` is a key of
    /// the namespace (hash-tagged in a cluster).
    pub fn parse(url: &str, slot_key: &str) -> Result<Target, StoreError> {
        let bad = |why: &str| {
            StoreError::new(
                StoreErrorKind::Protocol,
                format!("store URL {:?}: {why}", redacted(url)),
            )
        };
        let hosts = |list: &str| {
            list.split(',')
                .map(|host| {
                    crate::net::HostPort::parse(host)
                        .map(|hp| (hp.host.to_string(), hp.port))
                        // The reason only: the text may hold a password.
                        .map_err(|e| bad(&format!("{} in its host list", e.reason)))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let list = rest.strip_suffix('/').unwrap_or(rest);
            if list.contains('/') {
                return Err(bad(
                    "a cluster has no databases: redis+cluster://HOST:PORT[,HOST:PORT...]",
                ));
            }
            return Ok(Target::Cluster {
                nodes: hosts(list)?,
                slot_key: slot_key.to_owned(),
            });
        }
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            return Ok(Target::Direct(url.to_owned()));
        };
        let (list, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected redis+sentinel://HOST:PORT,.../SERVICE[/DB]"))?;
        let sentinels = hosts(list)?;
        let (service, db) = match path.split_once('/') {
            Some((service, db)) => (
                service,
                db.parse::<i64>()
                    .map_err(|_| bad("the database must be a number"))?,
            ),
            None => (path, 0),
        };
        if service.is_empty() || sentinels.is_empty() {
            return Err(bad("name at least one sentinel and the service"));
        }
        Ok(Target::Sentinel {
            sentinels,
            service: service.to_owned(),
            db,
        })
    }
}

/// The connections to one server.
#[derive(Clone)]
struct Connections {
    /// The primary's client (subscriptions open their own connection).
    client: redis::Client,
    /// Every command but acknowledged writes.
    commands: ConnectionManager,
    /// Writes followed by `WAIT`, with `store.wait_replicas`: their own
    /// connection, because `WAIT` blocks the connection it runs on and
    /// counts only that connection's writes.
    acknowledged: Option<ConnectionManager>,
}

impl Connections {
    fn open(client: &redis::Client, wait: Option<Duration>) -> Result<Connections, StoreError> {
        let commands = ConnectionManager::new_lazy_with_config(
            client.clone(),
            manager_config(RESPONSE_TIMEOUT),
        )
        .map_err(|e| redis_error(&e))?;
        let acknowledged = wait
            .map(|wait| {
                ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    manager_config(RESPONSE_TIMEOUT + wait),
                )
                .map_err(|e| redis_error(&e))
            })
            .transpose()?;
        Ok(Connections {
            client: client.clone(),
            commands,
            acknowledged,
        })
    }
}

/// The store's connection to its server.
pub struct Link {
    target: Target,
    /// How long `WAIT` may block, when new pins wait for replicas.
    wait: Option<Duration>,
    /// The connections in use (`None` until a Sentinel primary is known).
    current: RwLock<Option<Connections>>,
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    /// The primary's address, with Sentinel.
    address: RwLock<Option<String>>,
    available: AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("target", &self.target)
            .field("available", &self.is_available())
            .finish_non_exhaustive()
    }
}

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(RESPONSE_TIMEOUT))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

impl Link {
    /// Whether the target fails over on its own (a Sentinel group or a
    /// cluster): another server may become the primary.
    pub fn fails_over(&self) -> bool {
        !matches!(self.target, Target::Direct(_))
    }

    /// A link to `target`; nothing is dialled yet. `wait` is how long
    /// `WAIT` may block, when new pins wait for replicas.
    pub fn new(target: Target, wait: Option<Duration>) -> Result<Link, StoreError> {
        let (current, sentinel) = match &target {
            Target::Direct(url) => {
                let client = redis::Client::open(url.as_str()).map_err(|e| redis_error(&e))?;
                (Some(Connections::open(&client, wait)?), None)
            }
            Target::Sentinel {
                sentinels,
                service,
                db,
            } => {
                let addrs = sentinels
                    .iter()
                    .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port));
                let client =
                    SentinelClientBuilder::new(addrs, service.as_str(), SentinelServerType::Master)
                        .map_err(|e| redis_error(&e))?
                        .set_client_to_redis_db(*db)
                        .build()
                        .map_err(|e| redis_error(&e))?;
                (None, Some(tokio::sync::Mutex::new(client)))
            }
            Target::Cluster { .. } => (None, None),
        };
        Ok(Link {
            target,
            wait,
            current: RwLock::new(current),
            sentinel,
            address: RwLock::new(None),
            available: AtomicBool::new(false),
        })
    }

    fn connections(&self) -> Result<Connections, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Unreachable,
                    "no Redis primary known yet (asking the sentinels)",
                )
            })
    }

    /// A client for the current primary (for subscriptions).
    pub fn client(&self) -> Result<redis::Client, StoreError> {
        self.connections().map(|c| c.client)
    }

    /// The current primary's address (empty until one is known).
    pub fn address(&self) -> String {
        self.client()
            .map(|c| c.get_connection_info().addr().to_string())
            .unwrap_or_default()
    }

    /// The connection to use for a command.
    pub fn connection(&self) -> Result<ConnectionManager, StoreError> {
        self.connections().map(|c| c.commands)
    }

    /// The connection for writes followed by `WAIT` (`None` when new pins
    /// do not wait for replicas).
    pub fn acknowledged_connection(&self) -> Result<Option<ConnectionManager>, StoreError> {
        self.connections().map(|c| c.acknowledged)
    }

    /// Whether the last command (or check) succeeded.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    /// Records a command's outcome for the availability flag.
    pub fn note<T>(&self, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        match result {
            Ok(value) => {
                self.available.store(true, Ordering::Relaxed);
                Ok(value)
            }
            Err(e) => {
                if is_connection_error(&e) || is_misrouted(&e) {
                    self.available.store(false, Ordering::Relaxed);
                }
                Err(redis_error(&e))
            }
        }
    }

    /// Marks the store unavailable (a check failed).
    pub fn lost(&self) {
        self.available.store(false, Ordering::Relaxed);
    }

    /// With Sentinel: asks the sentinels for the current primary; in a
    /// cluster: asks the nodes which primary serves the namespace's slot;
    /// switches to it if it moved. A single server: nothing to do.
    pub async fn find_primary(&self) -> Result<(), StoreError> {
        let client = match (&self.target, &self.sentinel) {
            (_, Some(sentinel)) => sentinel
                .lock()
                .await
                .async_get_client()
                .await
                .map_err(|e| redis_error(&e))?,
            (Target::Cluster { nodes, slot_key }, None) => {
                let (host, port) = slot_owner(nodes, slot_key).await?;
                redis::Client::open(ConnectionAddr::Tcp(host, port)).map_err(|e| redis_error(&e))?
            }
            _ => return Ok(()),
        };
        let address = client.get_connection_info().addr().to_string();
        let mut known = self.address.write().unwrap_or_else(|e| e.into_inner());
        if known.as_deref() != Some(address.as_str()) {
            tracing::info!(primary = %address, "Redis primary found");
            let connections = Connections::open(&client, self.wait)?;
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(connections);
            *known = Some(address);
        }
        Ok(())
    }
}

/// Whether a command landed where it may not run: a server that is now a
/// replica, or a cluster node that no longer serves the slot.
fn is_misrouted(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some("READONLY" | "MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN")
    )
}

/// Asks the cluster's nodes, in turn, which primary serves `slot_key`'s
/// slot (`CLUSTER KEYSLOT`, then `CLUSTER SLOTS`).
async fn slot_owner(nodes: &[(String, u16)], slot_key: &str) -> Result<(String, u16), StoreError> {
    let mut last = StoreError::new(StoreErrorKind::Unreachable, "no cluster node given");
    for (host, port) in nodes {
        match ask_slot_owner(host, *port, slot_key).await {
            Ok(owner) => return Ok(owner),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn ask_slot_owner(
    host: &str,
    port: u16,
    slot_key: &str,
) -> Result<(String, u16), StoreError> {
    let client = redis::Client::open(ConnectionAddr::Tcp(host.to_owned(), port))
        .map_err(|e| redis_error(&e))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(RESPONSE_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| redis_error(&e))?;
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(slot_key)
        .query_async(&mut connection)
        .await
        .map_err(|e| redis_error(&e))?;
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut connection)
        .await
        .map_err(|e| redis_error(&e))?;
    owner_in_slot_map(&ranges, slot, host).ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Unreachable,
            format!("cluster node {host}:{port}: no primary serves slot {slot}"),
        )
    })
}

/// The primary of `slot` in a `CLUSTER SLOTS` reply: each entry is
/// `[start, end, [ip, port, id, ...], replicas...]`. An empty ip means the
/// node that answered (`asked`).
fn owner_in_slot_map(ranges: &[redis::Value], slot: i64, asked: &str) -> Option<(String, u16)> {
    use redis::Value;
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    ranges.iter().find_map(|range| {
        let Value::Array(parts) = range else {
            return None;
        };
        let (start, end) = (int(parts.first()?)?, int(parts.get(1)?)?);
        if !(start..=end).contains(&slot) {
            return None;
        }
        let Value::Array(primary) = parts.get(2)? else {
            return None;
        };
        let ip = match primary.first()? {
            Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
            Value::SimpleString(text) => text.clone(),
            _ => return None,
        };
        let port = u16::try_from(int(primary.get(1)?)?).ok()?;
        let ip = if ip.is_empty() { asked.to_owned() } else { ip };
        Some((ip, port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    /// A store URL's password reaches neither `Debug` (what `pinproxy
    /// store stats` prints of the store) nor an error about the URL.
    #[test]
    fn a_store_urls_password_is_never_printed() {
        let direct = Target::parse("redis://:S3cret@redis.local:6379/0", "k");
        let shown = format!("{direct:?}");
        assert!(
            !shown.contains("S3cret") && shown.contains("redis.local:6379/0"),
            "{shown}"
        );
        let named = format!("{:?}", Target::parse("rediss://user:S3cret@h:6380", "k"));
        assert!(
            !named.contains("S3cret") && !named.contains("user"),
            "{named}"
        );
        for bad in [
            "redis+sentinel://:S3cret@h:26379/svc",
            "redis+cluster://:S3cret@h:7000",
        ] {
            let error = Target::parse(bad, "k").map(|_| ()).unwrap_err().to_string();
            assert!(
                !error.contains("S3cret") && error.contains("***@"),
                "{error}"
            );
        }
        assert_eq!(redacted("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redacted("redis://a:b@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redacted("not a url"), "not a url");
    }

    #[test]
    fn cluster_urls_parse_and_refuse_databases() {
        let target = Target::parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/", "{ns}:x");
        assert_eq!(
            target.ok(),
            Some(Target::Cluster {
                nodes: vec![("127.0.0.1".into(), 7000), ("127.0.0.1".into(), 7001)],
                slot_key: "{ns}:x".into(),
            })
        );
        assert!(Target::parse("redis+cluster://127.0.0.1:7000/2", "k").is_err());
    }

    #[test]
    fn the_slot_map_names_the_primary_of_the_slot() {
        let node = |ip: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(ip.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let ranges = vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("", 7001),
                node("127.0.0.1", 7004),
            ]),
        ];
        assert_eq!(
            owner_in_slot_map(&ranges, 0, "h"),
            Some(("127.0.0.1".into(), 7000))
        );
        assert_eq!(
            owner_in_slot_map(&ranges, 6000, "h"),
            Some(("h".into(), 7001))
        );
        assert_eq!(owner_in_slot_map(&ranges, 16000, "h"), None);
    }
}
