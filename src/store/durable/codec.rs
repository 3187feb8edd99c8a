//! How the embedded store lays its records out in redb: the tables, the
//! on-disk form of an identity (its fingerprint stored once, by hash), and
//! loading every record into memory at start.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::credential::PinKey;
use crate::fingerprint::Fingerprint;
use crate::identity::{
    ExitId, FoundingRoute, Identity, IdentityId, Pin, RetireReason, Retirement, SessionId,
};
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
/// Facts about the store itself: [`PIN_KEY_ID`], [`STORE_ID`],
/// [`TRACKED_COOKIES`].
pub(super) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// [`META`]'s row naming the pin key the store's pins were hashed with
/// (`PinHasher::key_id`, a non-secret fingerprint of the key).
const PIN_KEY_ID: &str = "pin-key-id";

/// [`META`]'s row naming the store itself: a random id drawn when the
/// store was made, which its `.made` marker repeats, so that a file
/// emptied or swapped for another store is told from the one made there.
const STORE_ID: &str = "store-id";

/// The pin key id the store records, if any (stores written before it was
/// recorded have none).
pub(super) fn recorded_key_id(db: &Database) -> Result<Option<String>, String> {
    meta(db, PIN_KEY_ID)
}

/// Records `key_id` as the pin key the store's pins are hashed with.
pub(super) fn record_key_id(db: &Database, key_id: &str) -> Result<(), String> {
    set_meta(db, PIN_KEY_ID, key_id)
}

/// [`META`]'s row recording the tracked-cookie patterns the store's pins
/// were keyed under (`CookiePolicy::patterns`, joined by spaces): a start
/// with patterns that key a held name otherwise is refused, as a reload is.
pub(super) const TRACKED_COOKIES: &str = "tracked-cookies";

/// The tracked-cookie patterns the store records, if any (stores written
/// before they were recorded have none).
pub(super) fn recorded_tracking(db: &Database) -> Result<Option<Vec<String>>, String> {
    Ok(meta(db, TRACKED_COOKIES)?.map(|line| crate::store::patterns_of_line(&line)))
}

/// The store's id, if it records one (stores made before ids have none).
pub(super) fn recorded_store_id(db: &Database) -> Result<Option<String>, String> {
    meta(db, STORE_ID)
}

/// Records `id` as the store's id.
pub(super) fn record_store_id(db: &Database, id: &str) -> Result<(), String> {
    set_meta(db, STORE_ID, id)
}

fn meta(db: &Database, row: &str) -> Result<Option<String>, String> {
    let read = db.begin_read().map_err(|e| e.to_string())?;
    let meta = match read.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let value = meta.get(row).map_err(|e| e.to_string())?;
    Ok(value.map(|value| value.value().to_owned()))
}

fn set_meta(db: &Database, row: &str, value: &str) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        meta.insert(row, value).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())
}

/// An identity on disk: like [`Identity`], with its fingerprint stored once
/// in its own table and referred to by hash.
///
/// Postcard writes a struct's fields one after the other, a nested one's
/// inline: this is the layout written before identities carried their
/// route ([`StoredFields`]) followed by the route. A release that does not
/// know the route reads every field before it as it always did (a route
/// placed before the hash would be read as the hash, and the identity
/// would lose its fingerprint), and a record without it is shorter by the
/// route's tag, so it never reads as the current layout.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct StoredIdentity {
    fields: StoredFields,
    route: Option<FoundingRoute>,
}

/// [`StoredIdentity`]'s fields but its route: the whole record as stored
/// before identities carried their route.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredFields {
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

impl StoredIdentity {
    /// The on-disk form of `identity`, whose fingerprint hashes to
    /// `fingerprint`.
    pub(super) fn of(identity: Identity, fingerprint: [u8; 16]) -> StoredIdentity {
        StoredIdentity {
            fields: StoredFields {
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
            },
            route: identity.route,
        }
    }

    /// Decodes a record, in the current layout or the one written before
    /// identities carried their route.
    pub(super) fn decode(bytes: &[u8]) -> Result<StoredIdentity, postcard::Error> {
        postcard::from_bytes::<StoredIdentity>(bytes).or_else(|current| {
            // Read as the older layout, the record must end where it does:
            // a damaged route is an error, not an identity without one.
            crate::identity::whole::<StoredFields>(bytes)
                .map(|fields| StoredIdentity {
                    fields,
                    route: None,
                })
                .map_err(|_| current)
        })
    }

    /// The hash of its fingerprint.
    pub(super) fn fingerprint(&self) -> [u8; 16] {
        self.fields.fingerprint
    }

    /// The identity `id` this record is, with `fingerprint` (the one its
    /// hash refers to).
    fn into_identity(self, id: IdentityId, fingerprint: Arc<Fingerprint>) -> Identity {
        let fields = self.fields;
        Identity {
            id,
            exit: fields.exit,
            session: fields.session,
            session_started_ms: fields.session_started_ms,
            created_ms: fields.created_ms,
            egress_ip: fields.egress_ip,
            fingerprint,
            last_used_ms: fields.last_used_ms,
            requests: fields.requests,
            worked: fields.worked,
            retired: fields.retired,
            route: self.route,
        }
    }
}

/// A fingerprint's key in [`FINGERPRINTS`] and its encoding.
pub(super) fn fingerprint_hash(fingerprint: &Fingerprint) -> Result<([u8; 16], Vec<u8>), String> {
    let bytes = postcard::to_stdvec(fingerprint).map_err(|e| e.to_string())?;
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&blake3::hash(&bytes).as_bytes()[..16]);
    Ok((hash, bytes))
}

/// The fingerprint hash of an identity as stored, so the writer knows what
/// an identity it replaces referred to. `None` for a value that is not an
/// identity.
pub(super) fn stored_fingerprint(stored: &[u8]) -> Option<[u8; 16]> {
    StoredIdentity::decode(stored).ok().map(|s| s.fingerprint())
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

/// Loads every record into memory (at `now_ms`, when an identity whose
/// fingerprint is missing retires), and counts the references to each
/// stored fingerprint. Fingerprints no identity refers to (left by versions
/// that never deleted them) are deleted on the way.
pub(super) fn load(db: &Database, now_ms: u64) -> Result<(MemoryStore, FingerprintRefs), String> {
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
    let mut faceless = 0usize;
    // The latest time any record was stamped with (see
    // `MemoryStore::newest_loaded_ms`).
    let mut newest = 0u64;
    for row in identities.iter().map_err(|e| e.to_string())? {
        let (id, value) = row.map_err(|e| e.to_string())?;
        let stored =
            StoredIdentity::decode(value.value()).map_err(|e| format!("corrupt identity: {e}"))?;
        refs.add(stored.fingerprint());
        let found = fingerprints.get(&stored.fingerprint()).cloned();
        let missing = found.is_none();
        let mut identity = stored.into_identity(IdentityId(id.value()), found.unwrap_or_default());
        // As written (a retirement dated below is now, not a record's).
        newest = newest
            .max(identity.created_ms)
            .max(identity.last_used_ms)
            .max(identity.retired.as_ref().map_or(0, |r| r.at_ms));
        // Its fingerprint's row is gone (a damaged file, a writer of
        // another release): shown with another face (in mirror mode,
        // pinproxy's own), its cookies would give it away. It retires as
        // lost to the store, which keeps its cookies from being pinned
        // anywhere else.
        if missing && identity.retired.is_none() {
            faceless += 1;
            identity.retired = Some(Retirement {
                reason: RetireReason::StoreLost,
                at_ms: now_ms,
            });
        }
        memory.insert_identity(&identity);
    }
    if faceless > 0 {
        tracing::warn!(
            identities = faceless,
            "pin store: identities whose recorded fingerprint is missing from the file retire \
             (store-lost): they cannot be shown to origins with the face they were founded with"
        );
    }
    for row in pins.iter().map_err(|e| e.to_string())? {
        let (key, value) = row.map_err(|e| e.to_string())?;
        let pin: Pin =
            postcard::from_bytes(value.value()).map_err(|e| format!("corrupt pin: {e}"))?;
        newest = newest.max(pin.created_ms);
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
    memory.set_newest_loaded_ms(newest);
    Ok((memory, refs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{RetireReason, RouteHash};

    #[test]
    fn an_identity_reads_in_either_layout_with_its_fingerprint_hash() {
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
            let fields = StoredFields {
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
            let old = postcard::to_stdvec(&fields).unwrap_or_else(|e| panic!("{e}"));
            let route = FoundingRoute {
                route: RouteHash(u64::MAX - n as u64),
                face: RouteHash(7),
            };
            let stored = StoredIdentity {
                fields,
                route: Some(route),
            };
            let routed = postcard::to_stdvec(&stored).unwrap_or_else(|e| panic!("{e}"));
            for (bytes, want) in [(&routed, Some(route)), (&old, None)] {
                assert_eq!(stored_fingerprint(bytes), Some(hash), "case {n}");
                let read = StoredIdentity::decode(bytes).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    (read.route, read.fields.requests),
                    (want, 123_456),
                    "case {n}"
                );
            }
            // A damaged route is an error, never an identity without one.
            let mut bad_tag = old.clone();
            bad_tag.push(2);
            assert!(StoredIdentity::decode(&bad_tag).is_err(), "case {n}");
            assert!(StoredIdentity::decode(&routed[..routed.len() - 1]).is_err());
            // The route comes after every field a release without it reads.
            let before: StoredFields =
                postcard::from_bytes(&routed).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(before.fingerprint, hash, "case {n}");
            assert!(
                routed.starts_with(&old) && routed.len() > old.len(),
                "case {n}"
            );
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
