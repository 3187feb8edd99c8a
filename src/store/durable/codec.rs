//! How the embedded store lays its records out in redb: the tables, the
//! on-disk form of an identity (its fingerprint stored once, by hash), and
//! loading every record into memory at start.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::credential::PinKey;
use crate::fingerprint::Fingerprint;
use crate::identity::{ExitId, Identity, IdentityId, Pin, Retirement, SessionId};
use crate::store::memory::MemoryStore;

/// Identities by id (their fingerprint by hash).
pub(super) const IDENTITIES: TableDefinition<u64, &[u8]> = TableDefinition::new("identities");
/// Fingerprints by hash: a fleet has few, each stored once.
pub(super) const FINGERPRINTS: TableDefinition<&[u8; 16], &[u8]> =
    TableDefinition::new("fingerprints");
/// Pins by key.
pub(super) const PINS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("pins");
/// When each exit last died.
pub(super) const EXIT_DEATHS: TableDefinition<&str, u64> = TableDefinition::new("exit_deaths");

/// An identity on disk: like [`Identity`], with its fingerprint stored once
/// in its own table and referred to by hash.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct StoredIdentity {
    exit: ExitId,
    session: SessionId,
    session_started_ms: u64,
    created_ms: u64,
    last_used_ms: u64,
    requests: u64,
    worked: bool,
    egress_ip: Option<IpAddr>,
    retired: Option<Retirement>,
    fingerprint: [u8; 16],
}

/// A fingerprint's key in [`FINGERPRINTS`] and its encoding.
pub(super) fn fingerprint_hash(fingerprint: &Fingerprint) -> Result<([u8; 16], Vec<u8>), String> {
    let bytes = postcard::to_stdvec(fingerprint).map_err(|e| e.to_string())?;
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&blake3::hash(&bytes).as_bytes()[..16]);
    Ok((hash, bytes))
}

impl StoredIdentity {
    /// The on-disk form of `identity`, whose fingerprint hashes to
    /// `fingerprint`.
    pub(super) fn of(identity: Identity, fingerprint: [u8; 16]) -> StoredIdentity {
        StoredIdentity {
            exit: identity.exit,
            session: identity.session,
            session_started_ms: identity.session_started_ms,
            created_ms: identity.created_ms,
            last_used_ms: identity.last_used_ms,
            requests: identity.requests,
            worked: identity.worked,
            egress_ip: identity.egress_ip,
            retired: identity.retired,
            fingerprint,
        }
    }
}

/// Loads every record into memory.
pub(super) fn load(db: &Database) -> Result<MemoryStore, String> {
    use redb::ReadableTableMetadata as _;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    // Create the tables on first start.
    {
        txn.open_table(IDENTITIES).map_err(|e| e.to_string())?;
        txn.open_table(PINS).map_err(|e| e.to_string())?;
        txn.open_table(FINGERPRINTS).map_err(|e| e.to_string())?;
        txn.open_table(EXIT_DEATHS).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())?;
    let read = db.begin_read().map_err(|e| e.to_string())?;
    let identities = read.open_table(IDENTITIES).map_err(|e| e.to_string())?;
    let pins = read.open_table(PINS).map_err(|e| e.to_string())?;
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let memory = MemoryStore::with_capacity(
        size(pins.len().map_err(|e| e.to_string())?),
        size(identities.len().map_err(|e| e.to_string())?),
    );
    let mut fingerprints = HashMap::new();
    let table = read.open_table(FINGERPRINTS).map_err(|e| e.to_string())?;
    for row in table.iter().map_err(|e| e.to_string())? {
        let (hash, value) = row.map_err(|e| e.to_string())?;
        let fingerprint =
            Fingerprint::decode(value.value()).map_err(|e| format!("corrupt fingerprint: {e}"))?;
        fingerprints.insert(*hash.value(), Arc::new(fingerprint));
    }
    for row in identities.iter().map_err(|e| e.to_string())? {
        let (id, value) = row.map_err(|e| e.to_string())?;
        let stored: StoredIdentity =
            postcard::from_bytes(value.value()).map_err(|e| format!("corrupt identity: {e}"))?;
        memory.insert_identity(&Identity {
            id: IdentityId(id.value()),
            exit: stored.exit,
            session: stored.session,
            session_started_ms: stored.session_started_ms,
            created_ms: stored.created_ms,
            egress_ip: stored.egress_ip,
            fingerprint: fingerprints
                .get(&stored.fingerprint)
                .cloned()
                .unwrap_or_default(),
            last_used_ms: stored.last_used_ms,
            requests: stored.requests,
            worked: stored.worked,
            retired: stored.retired,
        });
    }
    for row in pins.iter().map_err(|e| e.to_string())? {
        let (key, value) = row.map_err(|e| e.to_string())?;
        let pin: Pin =
            postcard::from_bytes(value.value()).map_err(|e| format!("corrupt pin: {e}"))?;
        memory.insert_pin(PinKey::from_bytes(*key.value()), &pin);
    }
    let deaths = read.open_table(EXIT_DEATHS).map_err(|e| e.to_string())?;
    for row in deaths.iter().map_err(|e| e.to_string())? {
        let (exit, at) = row.map_err(|e| e.to_string())?;
        memory.set_exit_death(&ExitId::new(exit.value()), at.value());
    }
    Ok(memory)
}
