//! The Redis pin store, for a fleet of replicas that must agree on every pin.
//!
//! Keys (all under the configured namespace `NS`):
//! - `NS:hash-key`: the pin-hashing key every replica uses (the first
//!   replica's key wins, `SET NX`), so the same cookie hashes alike everywhere;
//! - `NS:pin:HASH`: one pin; the value starts with the 16 hex digits of its
//!   identity, then the pin record. Written with `SET NX PX`, so pin-if-absent
//!   is atomic on the server and the first pin wins across replicas;
//! - `NS:id:IDENTITY`: a hash: `rec` (the identity as created), `last`,
//!   `reqs`, `worked`, `egress`, `retired` (the mutable parts);
//! - `NS:exit-deaths`: a hash of exit id → when it last died.
//!
//! A lookup is one round trip (a script reads the pins and their identities).
//! Every key expires (`PX`): pins and identities after the longest identity
//! lifetime plus the time retired credentials are remembered; a retired
//! identity after the remembering time. The server must not evict keys
//! early (`maxmemory-policy noeviction`); pinproxy warns at start if it may.
//! Retirement is shared by the identity record, so a credential retired on
//! one replica is not pinned anew on another.
//!
//! When Redis cannot answer, commands fail within a second and the store is
//! marked unavailable until a background ping succeeds again; the pipeline
//! then refuses requests (fail closed). No cache is kept: pins never move,
//! but identity state (retirement) must be read fresh.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};
use tokio_util::task::TaskTracker;

mod codec;
mod scripts;

use super::{Binding, Counts, Listing, PinStore, StoreError};
use crate::credential::PinKey;
use crate::identity::{ExitId, Identity, IdentityId, Pin, RetireReason, Retirement};
use codec::{
    bulk, corrupt, decode_binding, decode_identity, encode_pin, is_connection_error, parse_hex16,
    redis_error, unexpected,
};

/// How long a command may take before the store counts as unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an unavailable store is pinged.
const PING_INTERVAL: Duration = Duration::from_millis(500);

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: ConnectionManager,
    namespace: String,
    /// Lifetime of pins and live identities, in ms.
    pin_ttl_ms: u64,
    /// How long retired identities are remembered, in ms.
    keep_retired_ms: u64,
    available: AtomicBool,
    /// Writes sent off the request path (touches), awaited at shutdown.
    tasks: TaskTracker,
    lookup: Script,
    pin_if_absent: Script,
    exit_death: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.inner.namespace)
            .field("available", &self.is_available())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects lazily to `url` (the daemon starts even while Redis is
    /// down, and refuses requests until it answers). `pin_ttl_ms` bounds
    /// pins and live identities, `keep_retired_ms` retired ones. Writes
    /// sent off the request path run on `tasks`.
    pub fn connect(
        url: &str,
        namespace: &str,
        pin_ttl_ms: u64,
        keep_retired_ms: u64,
        tasks: TaskTracker,
    ) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| redis_error(&e))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| redis_error(&e))?;
        let store = RedisStore {
            inner: Arc::new(Inner {
                connection,
                namespace: namespace.to_owned(),
                pin_ttl_ms,
                keep_retired_ms,
                available: AtomicBool::new(false),
                tasks,
                lookup: Script::new(scripts::LOOKUP),
                pin_if_absent: Script::new(scripts::PIN_IF_ABSENT),
                exit_death: Script::new(scripts::EXIT_DEATH),
            }),
        };
        tokio::spawn(ping_loop(Arc::downgrade(&store.inner)));
        Ok(store)
    }

    /// Whether the last command (or ping) succeeded.
    pub fn is_available(&self) -> bool {
        self.inner.available.load(Ordering::Relaxed)
    }

    fn connection(&self) -> ConnectionManager {
        self.inner.connection.clone()
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.inner.namespace)
    }

    fn identity_key(&self, id: IdentityId) -> String {
        self.key("id", &id.to_string())
    }

    fn pin_key(&self, key: &PinKey) -> String {
        self.key("pin", &key.to_hex())
    }

    /// Records the outcome of a command for the availability flag.
    fn note<T>(&self, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        match result {
            Ok(value) => {
                self.inner.available.store(true, Ordering::Relaxed);
                Ok(value)
            }
            Err(e) => {
                if is_connection_error(&e) {
                    self.inner.available.store(false, Ordering::Relaxed);
                }
                Err(redis_error(&e))
            }
        }
    }

    /// The fleet's pin-hashing key: `local` unless another replica set one
    /// first.
    pub async fn shared_hash_key(&self, local: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let key = format!("{}:hash-key", self.inner.namespace);
        let mut connection = self.connection();
        let _: Option<String> = self.note(
            redis::cmd("SET")
                .arg(&key)
                .arg(&local[..])
                .arg("NX")
                .query_async(&mut connection)
                .await,
        )?;
        let stored: Vec<u8> = self.note(connection.get(&key).await)?;
        stored
            .as_slice()
            .try_into()
            .map_err(|_| corrupt(format!("{key} does not hold a 32-byte key")))
    }

    /// Warns when the server may evict pinproxy's keys before they expire.
    pub async fn check_eviction_policy(&self) {
        let mut connection = self.connection();
        let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut connection)
            .await;
        if let Ok(pair) = policy {
            if let Some(policy) = pair.get(1).filter(|p| p.as_str() != "noeviction") {
                tracing::warn!(
                    %policy,
                    "Redis may evict pins under memory pressure; a lost pin lets a cookie go out through \
                     another exit. Set maxmemory-policy noeviction (or give Redis room)."
                );
            }
        }
    }
}

/// Pings until the store is dropped, keeping the availability flag current.
async fn ping_loop(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut connection = inner.connection.clone();
        let pong: redis::RedisResult<String> =
            redis::cmd("PING").query_async(&mut connection).await;
        let was = inner.available.swap(pong.is_ok(), Ordering::Relaxed);
        if was != pong.is_ok() {
            match pong {
                Ok(_) => tracing::info!("redis pin store reachable again"),
                Err(e) => tracing::warn!(error = %e, "redis pin store unreachable"),
            }
        }
    }
}

impl PinStore for RedisStore {
    async fn lookup(&self, keys: &[PinKey]) -> Result<Vec<Option<Binding>>, StoreError> {
        let mut invocation = self.inner.lookup.prepare_invoke();
        for key in keys {
            invocation.key(self.pin_key(key));
        }
        invocation.arg(format!("{}:id:", self.inner.namespace));
        let mut connection = self.connection();
        let reply: Value = self.note(invocation.invoke_async(&mut connection).await)?;
        let Value::Array(rows) = reply else {
            return Err(unexpected("unexpected lookup reply"));
        };
        rows.iter()
            .map(|row| match row {
                Value::Array(parts) => match parts.as_slice() {
                    [pin, fields] => {
                        let pin = bulk(pin).ok_or_else(|| unexpected("pin is not a string"))?;
                        decode_binding(pin, fields).map(Some)
                    }
                    _ => Err(unexpected("unexpected lookup row")),
                },
                _ => Ok(None),
            })
            .collect()
    }

    async fn create_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let record = postcard::to_stdvec(identity).map_err(corrupt)?;
        let key = self.identity_key(identity.id);
        let mut connection = self.connection();
        self.note(
            redis::pipe()
                .atomic()
                .hset(&key, "rec", record)
                .hset(&key, "last", identity.last_used_ms)
                .pexpire(&key, self.inner.pin_ttl_ms as i64)
                .exec_async(&mut connection)
                .await,
        )
    }

    async fn discard_identity(&self, id: IdentityId) -> Result<(), StoreError> {
        let mut connection = self.connection();
        self.note(connection.del::<_, ()>(self.identity_key(id)).await)
    }

    async fn pin_if_absent(&self, key: PinKey, pin: &Pin) -> Result<Binding, StoreError> {
        let value = encode_pin(pin)?;
        let mut invocation = self.inner.pin_if_absent.prepare_invoke();
        invocation
            .key(self.pin_key(&key))
            .arg(value)
            .arg(self.inner.pin_ttl_ms)
            .arg(format!("{}:id:", self.inner.namespace));
        let mut connection = self.connection();
        let reply: Value = self.note(invocation.invoke_async(&mut connection).await)?;
        match reply {
            Value::Array(parts) => match parts.as_slice() {
                [_, pin, fields] => {
                    let pin = bulk(pin).ok_or_else(|| unexpected("pin is not a string"))?;
                    decode_binding(pin, fields)
                }
                _ => Err(unexpected("unexpected pin reply")),
            },
            _ => Err(unexpected("unexpected pin reply")),
        }
    }

    async fn touch(&self, id: IdentityId, now_ms: u64, worked: bool) -> Result<(), StoreError> {
        // Best effort and off the response path: a lost touch only makes an
        // identity look idle earlier.
        let store = self.clone();
        self.inner.tasks.spawn(async move {
            let key = store.identity_key(id);
            let mut pipe = redis::pipe();
            pipe.hset(&key, "last", now_ms).hincr(&key, "reqs", 1);
            if worked {
                pipe.hset(&key, "worked", 1);
            }
            let mut connection = store.connection();
            let result: redis::RedisResult<()> = pipe.exec_async(&mut connection).await;
            let _ = store.note(result);
        });
        Ok(())
    }

    async fn record_egress(
        &self,
        id: IdentityId,
        ip: IpAddr,
    ) -> Result<Option<IpAddr>, StoreError> {
        let key = self.identity_key(id);
        let mut connection = self.connection();
        let (_, recorded): (bool, Option<String>) = self.note(
            redis::pipe()
                .hset_nx(&key, "egress", ip.to_string())
                .hget(&key, "egress")
                .query_async(&mut connection)
                .await,
        )?;
        Ok(recorded.and_then(|r| r.parse().ok()))
    }

    async fn retire(&self, id: IdentityId, retirement: &Retirement) -> Result<(), StoreError> {
        let key = self.identity_key(id);
        let record = postcard::to_stdvec(retirement).map_err(corrupt)?;
        let mut connection = self.connection();
        // The first retirement stands; the record then lives as long as
        // retired credentials are remembered.
        self.note(
            redis::pipe()
                .hset_nx(&key, "retired", record)
                .pexpire(&key, self.inner.keep_retired_ms as i64)
                .exec_async(&mut connection)
                .await,
        )
    }

    async fn list(&self) -> Result<Vec<Listing>, StoreError> {
        let mut connection = self.connection();
        let pattern = format!("{}:id:*", self.inner.namespace);
        let ids: Vec<String> = self.note(scan(&mut connection, &pattern).await)?;
        let mut listings = Vec::new();
        for key in ids {
            let fields: Value = self.note(connection.hgetall(&key).await)?;
            if let Some(identity) = decode_identity(&fields)? {
                listings.push(Listing {
                    identity,
                    pins: Vec::new(),
                });
            }
        }
        let pattern = format!("{}:pin:*", self.inner.namespace);
        let pins: Vec<String> = self.note(scan(&mut connection, &pattern).await)?;
        for key in pins {
            let Some(hex) = key.rsplit(':').next() else {
                continue;
            };
            let value: Option<Vec<u8>> = self.note(connection.get(&key).await)?;
            let Some(value) = value else { continue };
            let binding = decode_binding(&value, &Value::Nil)?;
            let Some(bytes) = parse_hex16(hex) else {
                continue;
            };
            if let Some(listing) = listings
                .iter_mut()
                .find(|l| l.identity.id == binding.pin.identity)
            {
                listing.pins.push((PinKey::from_bytes(bytes), binding.pin));
            }
        }
        Ok(listings)
    }

    async fn count(&self) -> Result<Counts, StoreError> {
        let listings = self.list().await?;
        Ok(Counts {
            pins: listings.iter().map(|l| l.pins.len() as u64).sum(),
            identities: listings.len() as u64,
            retired: listings
                .iter()
                .filter(|l| l.identity.retired.is_some())
                .count() as u64,
        })
    }

    async fn sweep(
        &self,
        _now_ms: u64,
        _keep_retired_ms: u64,
        _expiry: &(dyn Fn(&Identity) -> Option<RetireReason> + Sync),
    ) -> Result<super::Swept, StoreError> {
        // Keys expire on the server; expired identities are retired when
        // next used (every replica applies the same rules).
        Ok(super::Swept::default())
    }

    async fn record_exit_death(&self, exit: &ExitId, at_ms: u64) -> Result<(), StoreError> {
        let mut invocation = self.inner.exit_death.prepare_invoke();
        invocation
            .key(format!("{}:exit-deaths", self.inner.namespace))
            .arg(exit.as_str())
            .arg(at_ms);
        let mut connection = self.connection();
        self.note(invocation.invoke_async::<i64>(&mut connection).await)
            .map(|_| ())
    }

    async fn exit_deaths(&self) -> Result<Vec<(ExitId, u64)>, StoreError> {
        let mut connection = self.connection();
        let deaths: Vec<(String, u64)> = self.note(
            connection
                .hgetall(format!("{}:exit-deaths", self.inner.namespace))
                .await,
        )?;
        Ok(deaths
            .into_iter()
            .map(|(e, at)| (ExitId::new(&e), at))
            .collect())
    }
}

async fn scan(
    connection: &mut ConnectionManager,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}
