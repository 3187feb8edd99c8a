//! Shared vocabulary: credentials and their pin keys.
//!
//! A credential is a tracked cookie or a client session key. pinproxy never
//! keeps a credential's value: it is turned into a [`PinKey`], a keyed
//! BLAKE3 hash, as soon as it is read, and every later stage (pins, logs,
//! errors, metrics) sees only that key, shown as `name#hash8`.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What kind of credential a pin is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinKind {
    /// A tracked cookie (or DataDome's header carrier of one).
    Cookie,
    /// A session key the client named.
    SessionKey,
}

/// The pin key of one cookie value: a 128-bit keyed BLAKE3 hash of
/// `name=value`. Stable across processes that share the hashing key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinKey([u8; 16]);

impl PinKey {
    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Rebuilds a key from its bytes (stores, exports).
    pub fn from_bytes(bytes: [u8; 16]) -> PinKey {
        PinKey(bytes)
    }

    /// The full hash as 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        for b in self.0 {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

/// The hasher of maps keyed by values that are uniformly random already and
/// that no client can choose: [`PinKey`]s (keyed BLAKE3 outputs: choosing
/// one needs the secret hashing key) and identity ids (random u64s). Their
/// bits are the hash, so a lookup costs no second hash (SipHash's defence
/// against chosen keys buys nothing for keys nobody can choose). Not for
/// anything a client spells out, such as names or hosts.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomKeys;

impl std::hash::BuildHasher for RandomKeys {
    type Hasher = RandomKeysHasher;

    fn build_hasher(&self) -> RandomKeysHasher {
        RandomKeysHasher(0)
    }
}

/// [`RandomKeys`]' hasher: folds the key's bytes, eight at a time.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomKeysHasher(u64);

impl std::hash::Hasher for RandomKeysHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        // Rotating keeps every word's randomness in every bit position
        // (a length prefix written first only shifts the result).
        self.0 = self.0.rotate_left(29) ^ word;
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}

/// Shows the short form (first 8 hex digits), which is what logs and error
/// messages use.
impl fmt::Display for PinKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PinKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinKey({self})")
    }
}

/// Turns cookie values into [`PinKey`]s with a per-deployment secret key, so
/// hashes in logs cannot be matched against guessed values.
#[derive(Clone)]
pub struct PinHasher {
    key: [u8; 32],
}

impl fmt::Debug for PinHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinHasher(..)")
    }
}

/// File in the data directory holding the hashing key.
pub const PIN_KEY_FILE: &str = "pin-key";

impl PinHasher {
    /// A hasher with the given key.
    pub fn new(key: [u8; 32]) -> PinHasher {
        PinHasher { key }
    }

    /// Loads the key from `DATA_DIR/pin-key`, creating it (mode 0600) on
    /// first start. The daemon uses [`PinHasher::load`] and
    /// [`PinHasher::create`] instead where a store is kept beside the key:
    /// a new key next to stored pins would orphan them all.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<PinHasher> {
        match PinHasher::load(data_dir)? {
            Some(hasher) => Ok(hasher),
            None => PinHasher::create(data_dir),
        }
    }

    /// Loads the key from `DATA_DIR/pin-key`; `None` when there is none.
    /// Refuses a key that is not 32 bytes, or that the group or others may
    /// read (as the CA's key is refused): whoever reads it can link every
    /// pin to the cookie values it was hashed from.
    pub fn load(data_dir: &Path) -> std::io::Result<Option<PinHasher>> {
        let path = data_dir.join(PIN_KEY_FILE);
        let Some(bytes) = crate::fsutil::read_private(&path)? else {
            return Ok(None);
        };
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} must hold exactly 32 bytes; it has {} (restore it from backup: \
                     a new key would orphan every stored pin)",
                    path.display(),
                    bytes.len()
                ),
            )
        })?;
        Ok(Some(PinHasher::new(key)))
    }

    /// Creates a new random key in `DATA_DIR/pin-key` (mode 0600); fails if
    /// the file exists.
    pub fn create(data_dir: &Path) -> std::io::Result<PinHasher> {
        let path = data_dir.join(PIN_KEY_FILE);
        let key: [u8; 32] = rand::random();
        let mut file = crate::fsutil::create_private(&path)?;
        file.write_all(&key)?;
        file.sync_all()?;
        // Before any pin is hashed with it: pins on disk without their key
        // could only be let go of.
        crate::fsutil::sync_parent(&path);
        Ok(PinHasher::new(key))
    }

    /// The secret key itself (shared with a fleet's store; never logged).
    pub(crate) fn key_bytes(&self) -> [u8; 32] {
        self.key
    }

    /// A short, non-secret fingerprint of the key: stores and exports
    /// carry it so pins hashed with another key are never mixed in.
    pub fn key_id(&self) -> String {
        blake3::derive_key("pinproxy pin-key id v1", &self.key)[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The pin key of a client session key. The domain tag cannot occur in
    /// a cookie name, so it never equals a cookie's key.
    pub fn session_key(&self, key: &str) -> PinKey {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(b"\0session-key\0");
        hasher.update(key.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        PinKey(out)
    }

    /// The pin key of cookie `name` with `value`.
    pub fn cookie(&self, name: &str, value: &str) -> PinKey {
        // `name=value` hashed in one piece when it fits on the stack (every
        // cookie an anti-bot vendor sets does): the same hash as the
        // streaming hasher's, for about half the instructions (no
        // incremental state to set up and merge).
        let len = name.len() + 1 + value.len();
        let hash = if len <= ONE_PIECE {
            let mut joined = [0u8; ONE_PIECE];
            joined[..name.len()].copy_from_slice(name.as_bytes());
            joined[name.len()] = b'=';
            joined[name.len() + 1..len].copy_from_slice(value.as_bytes());
            blake3::keyed_hash(&self.key, &joined[..len])
        } else {
            let mut hasher = blake3::Hasher::new_keyed(&self.key);
            hasher.update(name.as_bytes());
            hasher.update(b"=");
            hasher.update(value.as_bytes());
            hasher.finalize()
        };
        let mut out = [0u8; 16];
        out.copy_from_slice(&hash.as_bytes()[..16]);
        PinKey(out)
    }
}

/// Longest `name=value` a cookie's key is hashed from in one piece.
const ONE_PIECE: usize = 512;

/// A credential found on a request: a tracked cookie or a session key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Cookie or session key.
    pub kind: PinKind,
    /// Cookie name as sent (`session-key` for session keys). Shared: a
    /// name spelt as the tracking policy spells it is the policy's own copy,
    /// so a request's credentials cost no allocation for their names.
    pub name: Arc<str>,
    /// Keyed hash of `name=value` (or of the session key).
    pub key: PinKey,
}

impl Credential {
    /// A tracked cookie's credential.
    pub fn cookie(name: impl Into<Arc<str>>, key: PinKey) -> Credential {
        Credential {
            kind: PinKind::Cookie,
            name: name.into(),
            key,
        }
    }
}

impl fmt::Display for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.name, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher() -> PinHasher {
        PinHasher::new([7; 32])
    }

    #[test]
    fn keys_are_the_streamed_hash_of_name_equals_value_at_every_length() {
        // Stored pins are keyed by these: the one-piece path must give the
        // streaming hasher's bytes, on both sides of its length limit.
        let h = hasher();
        for len in [0, 1, 40, ONE_PIECE - 9, ONE_PIECE - 8, ONE_PIECE - 7, 3000] {
            let value = "v".repeat(len);
            let mut streamed = blake3::Hasher::new_keyed(&[7; 32]);
            streamed.update(b"datadome=");
            streamed.update(value.as_bytes());
            let expected = streamed.finalize();
            assert_eq!(
                h.cookie("datadome", &value).0,
                expected.as_bytes()[..16],
                "value of {len} bytes"
            );
        }
    }

    #[test]
    fn keys_depend_on_name_value_and_secret() {
        let h = hasher();
        assert_ne!(h.cookie("a", "bc"), h.cookie("ab", "c"));
        assert_ne!(h.cookie("a", "b"), PinHasher::new([8; 32]).cookie("a", "b"));
        assert_eq!(h.cookie("a", "b").to_string().len(), 8);
        assert_eq!(h.cookie("a", "b").to_hex().len(), 32);
    }

    /// Pin keys hashed by `RandomKeys` keep their randomness in the bits
    /// hash tables use: the low bits (bucket) and the top seven (tag).
    #[test]
    fn random_keys_hash_spreads_pin_keys() {
        use std::hash::BuildHasher as _;
        let h = hasher();
        let hashes: Vec<u64> = (0..1000)
            .map(|n| RandomKeys.hash_one(h.cookie("c", &n.to_string())))
            .collect();
        let distinct = |f: fn(u64) -> u64| {
            hashes
                .iter()
                .map(|&x| f(x))
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        assert_eq!(distinct(|x| x), 1000);
        assert_eq!(distinct(|x| x & 0x7f), 128);
        assert_eq!(distinct(|x| x >> 57), 128);
    }

    #[test]
    fn hashing_key_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = PinHasher::load_or_create(dir.path()).unwrap();
        let b = PinHasher::load_or_create(dir.path()).unwrap();
        assert_eq!(a.cookie("x", "y"), b.cookie("x", "y"));
        let mode = std::fs::metadata(dir.path().join(PIN_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_key_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        PinHasher::create(dir.path()).unwrap();
        let path = dir.path().join(PIN_KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = PinHasher::load(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
        assert!(
            PinHasher::create(dir.path()).is_err(),
            "an existing key is never replaced"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(PinHasher::load(dir.path()).unwrap().is_some());
    }
}
