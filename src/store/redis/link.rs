//! How the Redis store reaches its server: the server a `redis://` URL
//! names, or the current primary of a Sentinel-managed group
//! (`redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`), asked anew
//! after a failover.
//!
//! A command that fails on the connection, or lands on a server that has
//! become a replica (`READONLY`), marks the store unavailable; the store's
//! background check then finds the primary again.

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

/// Where the store's server is.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl Target {
    /// Parses `redis://...`, `rediss://...` or
    /// `redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`.
    pub fn parse(url: &str) -> Result<Target, StoreError> {
        let bad = |why: &str| {
            StoreError::new(
                StoreErrorKind::Protocol,
                format!("store URL {url:?}: {why}"),
            )
        };
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            return Ok(Target::Direct(url.to_owned()));
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected redis+sentinel://HOST:PORT,.../SERVICE[/DB]"))?;
        let sentinels = hosts
            .split(',')
            .map(|host| {
                crate::net::HostPort::parse(host)
                    .map(|hp| (hp.host, hp.port))
                    .map_err(|e| bad(&e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
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
                if is_connection_error(&e) || is_read_only(&e) {
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

    /// With Sentinel: asks the sentinels for the current primary and
    /// switches to it if it moved. Without: nothing to do.
    pub async fn find_primary(&self) -> Result<(), StoreError> {
        let Some(sentinel) = &self.sentinel else {
            return Ok(());
        };
        let client = sentinel
            .lock()
            .await
            .async_get_client()
            .await
            .map_err(|e| redis_error(&e))?;
        let address = client.get_connection_info().addr().to_string();
        let mut known = self.address.write().unwrap_or_else(|e| e.into_inner());
        if known.as_deref() != Some(address.as_str()) {
            tracing::info!(primary = %address, "Redis primary (from the sentinels)");
            let connections = Connections::open(&client, self.wait)?;
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(connections);
            *known = Some(address);
        }
        Ok(())
    }
}

/// Whether a write landed on a server that is now a replica.
fn is_read_only(e: &redis::RedisError) -> bool {
    e.code() == Some("READONLY")
}
