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
/// Facts about the store itself: [`PIN_KEY_ID`].
pub(super) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// [`META`]'s row naming the pin key the store's pins were hashed with
/// (`PinHasher::key_id`, a non-secret fingerprint of the key).
const PIN_KEY_ID: &str = "pin-key-id";

/// The pin key id the store records, if any (stores written before it was
/// recorded have none).
pub(super) fn recorded_key_id(db: &Database) -> Result<Option<String>, String> {
    let read = db.begin_read().map_err(|e| e.to_string())?;
    let meta = match read.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let id = meta.get(PIN_KEY_ID).map_err(|e| e.to_string())?;
    Ok(id.map(|id| id.value().to_owned()))
}

/// Records `key_id` as the pin key the store's pins are hashed with.
pub(super) fn record_key_id(db: &Database, key_id: &str) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        meta.insert(PIN_KEY_ID, key_id).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())
}

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

/// The fingerprint hash of an identity as stored: its encoding's last 16
/// bytes (postcard writes the hash, the last field, as its bytes alone), so
/// the writer reads what an identity it replaces referred to without
/// decoding it. `None` for a value too short to be an identity.
pub(super) fn stored_fingerprint(stored: &[u8]) -> Option<[u8; 16]> {
    let start = stored.len().checked_sub(16)?;
    stored.get(start..)?.try_into().ok()
}

/// How many identities on disk refer to each stored fingerprint. The
/// writer keeps it as it writes, and a fingerprint's row goes with the
/// last identity referring to it: a fleet that gives each identity a
/// `User-Agent` of its own brings a fingerprint with every identity, and
/// the table would otherwise keep them all.
#[derive(Debug, Default)]
pub(super) struct FingerprintRefs(HashMap<[u8; 16], u32>);

impl FingerprintRefs {
    /// Counts one more reference to `hash`; true when it is the first.
    pub(super) fn add(&mut self, hash: [u8; 16]) -> bool {
        let count = self.0.entry(hash).or_insert(0);
        *count = count.saturating_add(1);
        *count == 1
    }

    /// Counts one reference to `hash` less; true when it was the last (a
    /// hash not counted is left alone).
    pub(super) fn remove(&mut self, hash: [u8; 16]) -> bool {
        let Some(count) = self.0.get_mut(&hash) else {
            return false;
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return false;
        }
        self.0.remove(&hash);
        true
    }

    /// Whether an identity refers to `hash`.
    pub(super) fn refers_to(&self, hash: &[u8; 16]) -> bool {
        self.0.contains_key(hash)
    }
}

/// Loads every record into memory, and counts the references to each
/// stored fingerprint. Fingerprints no identity refers to (left by versions
/// that never deleted them) are deleted on the way.
pub(super) fn load(db: &Database) -> Result<(MemoryStore, FingerprintRefs), String> {
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
    let mut refs = FingerprintRefs::default();
    for row in identities.iter().map_err(|e| e.to_string())? {
        let (id, value) = row.map_err(|e| e.to_string())?;
        let stored: StoredIdentity =
            postcard::from_bytes(value.value()).map_err(|e| format!("corrupt identity: {e}"))?;
        refs.add(stored.fingerprint);
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
    let orphans: Vec<[u8; 16]> = fingerprints
        .into_keys()
        .filter(|hash| !refs.refers_to(hash))
        .collect();
    drop((identities, pins, deaths, table, read));
    if !orphans.is_empty() {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(FINGERPRINTS).map_err(|e| e.to_string())?;
            for hash in &orphans {
                table.remove(hash).map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())?;
        tracing::info!(
            deleted = orphans.len(),
            "pin store: deleted fingerprints no identity refers to"
        );
    }
    Ok((memory, refs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::RetireReason;

    #[test]
    fn an_identitys_fingerprint_hash_is_its_encodings_last_16_bytes() {
        let retirement = Retirement {
            reason: RetireReason::Invalidated {
                rule: "datadome-challenge".into(),
            },
            at_ms: 1_700_000_000_123,
        };
        for (n, (egress_ip, retired)) in [
            (None, None),
            (Some(IpAddr::from([127, 0, 0, 2])), None),
            (
                Some(IpAddr::from([0xfe80, 0, 0, 0, 0, 0, 0, 1])),
                Some(retirement),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let hash = [u8::try_from(n)
                .unwrap_or(0)
                .wrapping_mul(37)
                .wrapping_add(200); 16];
            let stored = StoredIdentity {
                exit: ExitId::new("residential-1"),
                session: SessionId(u64::MAX - 3),
                session_started_ms: 5,
                created_ms: 1_700_000_000_000,
                last_used_ms: 1_700_000_000_999,
                requests: 123_456,
                worked: true,
                egress_ip,
                retired,
                fingerprint: hash,
            };
            let bytes = postcard::to_stdvec(&stored).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(stored_fingerprint(&bytes), Some(hash), "case {n}");
        }
        assert_eq!(stored_fingerprint(&[0; 15]), None);
    }

    #[test]
    fn a_fingerprint_counts_its_references() {
        let mut refs = FingerprintRefs::default();
        assert!(refs.add([1; 16]), "the first");
        assert!(!refs.add([1; 16]));
        assert!(!refs.remove([1; 16]));
        assert!(refs.remove([1; 16]), "the last");
        assert!(!refs.remove([1; 16]), "not counted: left alone");
        assert!(refs.add([1; 16]), "the first again");
    }
}
