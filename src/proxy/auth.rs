//! Stage 0, client authentication: who may use the proxy. The front door
//! runs it first, on every plain request and every CONNECT, before
//! anything is parsed or dialled; requests inside a tunnel were admitted
//! with their CONNECT.
//!
//! Three modes, from `[auth]`:
//! - **open** (no users, no challenge): every client is admitted; only a
//!   loopback listener may run like this unless `insecure_open_proxy` says
//!   otherwise (checked when the configuration is validated);
//! - **users** (`[[auth.users]]`): `Proxy-Authorization: Basic` must carry a
//!   configured user's name (`NAME`, or `NAME-session-KEY` to name a session
//!   too) and password, or the answer is `407` with
//!   `Proxy-Authenticate: Basic realm="pinproxy"`. The user's `exits` limit
//!   where its requests may go;
//! - **challenge** (`challenge_session_keys`, no users): a client without
//!   `Proxy-Authorization` gets the same `407`, so a browser (which sends
//!   proxy credentials only after a challenge) can name its session as user
//!   name `session-KEY`. Any user name is admitted and the password is
//!   ignored: this names sessions, it does not authenticate.
//!
//! Verifying a password is expensive by design (argon2id). Successes are
//! cached for [`CACHE_TTL`] under a keyed hash of the whole header value
//! (the key is random per process, so the cache holds nothing an attacker
//! could test guesses against), so a keep-alive client does not pay argon2
//! per request; so are they under a keyed hash of the user and password,
//! so a user's next session key costs no second check. Verification runs
//! on the blocking pool, at most one per core at once, so a flood of bad
//! passwords cannot take the runtime's threads or unbounded memory; and
//! fairly: a client address has at most [`CHECKS_PER_PEER`] checks queued
//! for a core at once (its others wait their turn apart), so one flooding
//! address delays another's first login by a few checks, not by its whole
//! flood. Checks of the same user and password at once are one check, and
//! a refused pair is refused again without a check for [`REFUSAL_TTL`].
//! An unknown user name costs the same
//! verification as a wrong password, so timing does not tell which names
//! exist. A failure is logged with the user name and the client's
//! address, never with the password or the header.

pub mod password;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::{HeaderMap, HeaderValue};
use tokio::sync::{OnceCell, Semaphore};

use super::credentials::session_key::{split_user_name, Basic};
use super::target::Principal;
use super::ProxyError;
use crate::exits::scope::ExitScope;
use crate::identity::ExitId;
use password::{PasswordHash, PasswordHashError};

/// The realm of pinproxy's challenge.
pub const REALM: &str = "pinproxy";

/// The `Proxy-Authenticate` value of every `407`.
pub fn challenge() -> HeaderValue {
    HeaderValue::from_static("Basic realm=\"pinproxy\"")
}

/// How long a verified credential is admitted without verifying again.
pub const CACHE_TTL: Duration = Duration::from_secs(300);
/// Most verified credentials remembered.
const CACHE_CAPACITY: u64 = 10_000;

/// How long a refused user name and password are refused again without a
/// check (a client retrying a wrong password in a loop costs one check a
/// minute). A reload builds a new gate, which has checked nothing.
pub const REFUSAL_TTL: Duration = Duration::from_secs(60);

/// Most password checks one client address has queued for a core, or
/// running, at once.
pub const CHECKS_PER_PEER: usize = 2;
/// Longest user name accepted in the configuration.
const MAX_USER_NAME: usize = 64;

/// A configured proxy user.
#[derive(Debug, Clone)]
pub struct User {
    name: Arc<str>,
    hash: PasswordHash,
    /// An id of `hash`, to tell a changed password without keeping it.
    hash_id: u64,
    exits: ExitScope,
}

/// A configured user that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The name is empty, too long, or cannot be told from a session key.
    #[error(
        "auth.users: user name {0:?} must be 1-{MAX_USER_NAME} characters of [A-Za-z0-9._~+=] \
         and -, must not start with \"session-\" nor contain \"-session-\" (that separates the \
         session key: NAME-session-KEY)"
    )]
    Name(String),
    /// The password hash is unusable.
    #[error("auth.users: the password_hash of user {user:?} {source}")]
    Hash {
        /// The user.
        user: String,
        /// Why.
        source: PasswordHashError,
    },
    /// Two users share a name.
    #[error("auth.users: two users are named {0:?}")]
    Duplicate(String),
    /// An exit the user may use is not configured.
    #[error("auth.users: user {user:?} may use exit {exit:?}, which is not configured")]
    UnknownExit {
        /// The user.
        user: String,
        /// The exit id.
        exit: String,
    },
    /// `exits = []`: a user who can use nothing.
    #[error(
        "auth.users: user {0:?} has exits = []; list the exits it may use, or leave the key \
         out to allow every exit"
    )]
    NoExits(String),
}

impl User {
    /// A user named `name` with password hash `hash`, limited to `exits`
    /// (`None`: every exit).
    pub fn new(name: &str, hash: &str, exits: Option<Vec<ExitId>>) -> Result<User, UserError> {
        if !valid_user_name(name) {
            return Err(UserError::Name(name.to_owned()));
        }
        let hash_id = leading_u64(&blake3::hash(hash.as_bytes()));
        let hash = PasswordHash::parse(hash).map_err(|source| UserError::Hash {
            user: name.to_owned(),
            source,
        })?;
        let exits = match exits {
            None => ExitScope::all(),
            Some(ids) if ids.is_empty() => return Err(UserError::NoExits(name.to_owned())),
            Some(ids) => ExitScope::only(name, ids),
        };
        Ok(User {
            name: name.into(),
            hash,
            hash_id,
            exits,
        })
    }

    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exits it may use.
    pub fn exits(&self) -> &ExitScope {
        &self.exits
    }

    fn principal(&self, admitted_by: u64) -> Principal {
        Principal {
            user: Some(self.name.clone()),
            exits: self.exits.clone(),
            admitted_by,
            password: self.hash_id,
        }
    }
}

/// Whether `name` can be a user name: visible ASCII without `:` (Basic
/// credentials split there) and never confusable with a session key.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+=".contains(&b))
        && split_user_name(name) == (Some(name), None)
}

/// `[auth]`, validated.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// The users; none means no authentication.
    pub users: Vec<User>,
    /// Without users: challenge clients that send no credentials.
    pub challenge_session_keys: bool,
}

impl AuthSettings {
    /// Validated users and mode; the users' exits must be among `exits`.
    pub fn new(
        users: Vec<User>,
        challenge_session_keys: bool,
        exits: &[ExitId],
    ) -> Result<AuthSettings, UserError> {
        let mut seen = std::collections::HashSet::new();
        for user in &users {
            if !seen.insert(user.name()) {
                return Err(UserError::Duplicate(user.name().to_owned()));
            }
            if let Some(unknown) = user
                .exits
                .exits()
                .into_iter()
                .flatten()
                .find(|id| !exits.contains(id))
            {
                return Err(UserError::UnknownExit {
                    user: user.name().to_owned(),
                    exit: unknown.to_string(),
                });
            }
        }
        Ok(AuthSettings {
            users,
            challenge_session_keys,
        })
    }

    /// Whether clients must authenticate.
    pub fn required(&self) -> bool {
        !self.users.is_empty()
    }
}

/// Why a client was answered `407`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Proxy-Authorization` while users are configured.
    Missing,
    /// No `Proxy-Authorization` in challenge mode.
    NameYourSession,
    /// `Proxy-Authorization` is not Basic credentials.
    NotBasic,
    /// The user name is `session-KEY`: it names no user.
    NoUser,
    /// Unknown user or wrong password (the answer does not say which).
    Rejected,
    /// The password could not be checked (the daemon is shutting down):
    /// no word on the credentials.
    Unchecked,
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthFailure::Missing => {
                "this proxy requires authentication: send Proxy-Authorization: Basic with a \
                 configured user (user name NAME, or NAME-session-KEY to name a session)"
            }
            AuthFailure::NameYourSession => {
                "this proxy asks clients to name their session: send Proxy-Authorization: Basic \
                 with user name session-KEY (any password)"
            }
            AuthFailure::NotBasic => {
                "Proxy-Authorization must be Basic credentials (base64 of user:password)"
            }
            AuthFailure::NoUser => {
                "the user name session-KEY names no user; authenticate as NAME-session-KEY"
            }
            AuthFailure::Rejected => "wrong user name or password",
            AuthFailure::Unchecked => {
                "the password could not be checked just now (the proxy is shutting down or \
                 overloaded): send the request again"
            }
        })
    }
}

enum Mode {
    Open,
    Challenge,
    Users(HashMap<String, User>),
}

/// The authentication gate: one per pipeline (a reload builds a new one).
pub struct Auth {
    mode: Mode,
    /// This gate among those a reload builds (never 0).
    id: u64,
    /// A configured hash of each cost class (see [`Auth::stand_in`]).
    stand_ins: Vec<PasswordHash>,
    /// Credentials verified lately: keyed hash of the header value → user,
    /// and keyed hash of the user name and password → user (see
    /// [`Auth::login_digest`]).
    verified: moka::sync::Cache<[u8; 32], Principal>,
    cache_key: [u8; 32],
    /// Keyed hashes of user names and passwords refused lately (see
    /// [`REFUSAL_TTL`]).
    refused: moka::sync::Cache<[u8; 32], ()>,
    /// Checks under way, by login digest: those that come meanwhile share
    /// the verdict.
    in_flight: DashMap<[u8; 32], Held<OnceCell<Verdict>>>,
    /// Each client address's turns at a core (see [`CHECKS_PER_PEER`]),
    /// while it has checks waiting or running.
    peers: DashMap<IpAddr, Held<Semaphore>>,
    verifying: Arc<Semaphore>,
    /// Password checks run (each a hash of the user's cost).
    checks: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match &self.mode {
            Mode::Open => "open".to_owned(),
            Mode::Challenge => "challenge".to_owned(),
            Mode::Users(users) => format!("{} users", users.len()),
        };
        f.debug_struct("Auth").field("mode", &mode).finish()
    }
}

impl Auth {
    /// The gate `settings` describe.
    pub fn new(settings: &AuthSettings) -> Auth {
        let mode = if settings.required() {
            Mode::Users(
                settings
                    .users
                    .iter()
                    .map(|u| (u.name().to_owned(), u.clone()))
                    .collect(),
            )
        } else if settings.challenge_session_keys {
            Mode::Challenge
        } else {
            Mode::Open
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        static GATES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut stand_ins: Vec<PasswordHash> = Vec::new();
        for user in &settings.users {
            if !stand_ins
                .iter()
                .any(|h| h.cost_class() == user.hash.cost_class())
            {
                stand_ins.push(user.hash.clone());
            }
        }
        Auth {
            mode,
            stand_ins,
            id: GATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            verified: moka::sync::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(CACHE_TTL)
                .build(),
            cache_key: rand::random(),
            refused: moka::sync::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(REFUSAL_TTL)
                .build(),
            in_flight: DashMap::new(),
            peers: DashMap::new(),
            verifying: Arc::new(Semaphore::new(cores)),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether clients must authenticate as a user.
    pub fn required(&self) -> bool {
        matches!(self.mode, Mode::Users(_))
    }

    /// Admits the client of a plain request or CONNECT with `headers`, sent
    /// from `peer`: who it is and which exits it may use, or the `407`.
    pub async fn admit(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Result<Principal, ProxyError> {
        let (users, value) = match (&self.mode, headers.get(http::header::PROXY_AUTHORIZATION)) {
            (Mode::Open, _) | (Mode::Challenge, Some(_)) => return Ok(Principal::default()),
            (Mode::Challenge, None) => {
                tracing::debug!(%peer, "challenging a client that named no session");
                return Err(ProxyError::AuthRequired(AuthFailure::NameYourSession));
            }
            (Mode::Users(_), None) => {
                tracing::debug!(%peer, "challenging a client without credentials");
                return Err(ProxyError::AuthRequired(AuthFailure::Missing));
            }
            (Mode::Users(users), Some(value)) => (users, value),
        };
        let digest = *blake3::keyed_hash(&self.cache_key, value.as_bytes()).as_bytes();
        if let Some(principal) = self.verified.get(&digest) {
            return Ok(principal);
        }
        // At debug, as a missing header is: an unauthenticated client could
        // otherwise write a warning per request at no cost of its own (the
        // client gets the 407 and its reason; `pinproxy_requests_total`
        // counts them).
        let basic = Basic::decode(value).ok_or_else(|| {
            tracing::debug!(%peer, "proxy authentication failed: Proxy-Authorization is not Basic");
            ProxyError::AuthRequired(AuthFailure::NotBasic)
        })?;
        let Some(name) = basic.user_part() else {
            tracing::debug!(%peer, "proxy authentication failed: the user name names only a session key");
            return Err(ProxyError::AuthRequired(AuthFailure::NoUser));
        };
        let user = users.get(name);
        // A user's next session key (`alice-session-KEY`, often a new one
        // per session) comes with the same name and password: checked once,
        // not once per key, which would cost a hash of the user's cost for
        // every new session.
        let login = self.login_digest(name, &basic.password);
        if let Some(principal) = self.verified.get(&login) {
            self.verified.insert(digest, principal.clone());
            return Ok(principal);
        }
        // An unknown name is verified against a user's hash (the result
        // thrown away), so it costs what a wrong password costs: a hash of
        // one of the configured costs, picked by the name (keyed), so that
        // with users of several costs (bcrypt and argon2id, say) the time
        // a name takes does not tell whether it is a user's.
        let Some(hash) = user.map(|u| u.hash.clone()).or_else(|| self.stand_in(name)) else {
            return Err(ProxyError::AuthRequired(AuthFailure::Rejected));
        };
        // Refused a moment ago: the same answer, at no cost (and logged
        // once, when it was checked).
        if self.refused.contains_key(&login) {
            tracing::debug!(%peer, "proxy authentication failed: refused lately");
            return Err(ProxyError::AuthRequired(AuthFailure::Rejected));
        }
        let verdict = self
            .check_once(login, peer.ip(), hash, basic.password.clone(), user)
            .await;
        let Some(matches) = verdict else {
            tracing::warn!(%peer, "proxy authentication failed: the password check could not run");
            return Err(ProxyError::AuthRequired(AuthFailure::Unchecked));
        };
        match user {
            Some(user) if matches => {
                let principal = user.principal(self.id);
                self.verified.insert(digest, principal.clone());
                Ok(principal)
            }
            Some(user) => {
                tracing::warn!(user = user.name(), %peer, "proxy authentication failed: wrong password");
                Err(ProxyError::AuthRequired(AuthFailure::Rejected))
            }
            None => {
                // Not the name itself: a client that put its password or
                // a token where the user name goes would have it logged.
                tracing::warn!(user_hash = %name_hash(name), %peer, "proxy authentication failed: unknown user");
                Err(ProxyError::AuthRequired(AuthFailure::Rejected))
            }
        }
    }

    /// The hash an unknown `name` is verified against: one per cost class
    /// of the configured hashes, chosen by a keyed hash of the name.
    fn stand_in(&self, name: &str) -> Option<PasswordHash> {
        let n = self.stand_ins.len();
        if n == 0 {
            return None;
        }
        let digest = blake3::keyed_hash(&self.cache_key, name.as_bytes());
        let index = usize::try_from(leading_u64(&digest) % n as u64).unwrap_or(0);
        self.stand_ins.get(index).cloned()
    }

    /// The principal a tunnel's request acts as: the one its CONNECT was
    /// admitted as, unless a reload changed the users since. Then its user
    /// must still be configured with the password it logged in with, and
    /// takes the user's exits as they are now; a tunnel opened without a
    /// user, where users are now required, is refused. (A tunnel lives
    /// for as long as its client keeps it busy: a removed or narrowed user
    /// must not keep what it had.)
    pub fn confirm(&self, admitted: &Principal) -> Result<Principal, ProxyError> {
        if admitted.admitted_by == self.id {
            return Ok(admitted.clone());
        }
        let Mode::Users(users) = &self.mode else {
            // Open or challenge now: what was admitted stands (a user's
            // scope only narrows what open mode would allow).
            return Ok(admitted.clone());
        };
        let Some(name) = admitted.user.as_deref() else {
            return Err(ProxyError::AuthRequired(AuthFailure::Missing));
        };
        match users.get(name) {
            Some(user) if user.hash_id == admitted.password => Ok(user.principal(self.id)),
            Some(user) => {
                tracing::warn!(
                    user = user.name(),
                    "a tunnel's user has another password since a reload; its requests are refused"
                );
                Err(ProxyError::AuthRequired(AuthFailure::Rejected))
            }
            None => {
                tracing::warn!(
                    user = name,
                    "a tunnel's user was removed by a reload; its requests are refused"
                );
                Err(ProxyError::AuthRequired(AuthFailure::Rejected))
            }
        }
    }

    /// The cache key of a user `name` (the user part of the user name) and
    /// `password`, apart from any header value's (a prefix of its own).
    fn login_digest(&self, name: &str, password: &str) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.cache_key);
        hasher.update(b"pinproxy login\0");
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(password.as_bytes());
        *hasher.finalize().as_bytes()
    }

    /// How many password checks have run.
    pub fn checks(&self) -> u64 {
        self.checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks `password` against `hash` for the login `login` of `user`
    /// (`None`: an unknown name) from `peer`: one check for all the
    /// admissions of that login that come while it runs, which share its
    /// verdict. The verdict is remembered (a match of a user's as verified,
    /// anything else that ran as refused) before it is shared, so that an
    /// admission that comes after it finds it there rather than checking
    /// again; a check that could not run is not remembered.
    async fn check_once(
        &self,
        login: [u8; 32],
        peer: IpAddr,
        hash: PasswordHash,
        password: String,
        user: Option<&User>,
    ) -> Verdict {
        let check = Share::of(&self.in_flight, login, OnceCell::new);
        *check
            .held
            .get_or_init(|| async {
                let verdict = self.verify_in_turn(peer, hash, password).await;
                match (verdict, user) {
                    (Some(true), Some(user)) => {
                        self.verified.insert(login, user.principal(self.id));
                    }
                    (Some(_), _) => self.refused.insert(login, ()),
                    (None, _) => {}
                }
                verdict
            })
            .await
    }

    /// [`Auth::verify`] in `peer`'s turn: at most [`CHECKS_PER_PEER`] of an
    /// address's checks wait for a core or run; its others wait here. An
    /// IPv6 address counts by its /64 (one host's, as a rule), an
    /// IPv4-mapped one as the IPv4 address.
    async fn verify_in_turn(&self, peer: IpAddr, hash: PasswordHash, password: String) -> Verdict {
        let turns = Share::of(&self.peers, turn_key(peer), || {
            Semaphore::new(CHECKS_PER_PEER)
        });
        let _turn = turns.held.acquire().await.ok()?;
        self.verify(hash, password).await
    }

    /// Verifies `password` against `hash` on the blocking pool, at most one
    /// verification per core at once; `None` when it could not run.
    async fn verify(&self, hash: PasswordHash, password: String) -> Verdict {
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let permit = self.verifying.clone().acquire_owned().await.ok()?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            hash.verify(password.as_bytes())
        })
        .await
        .ok()
    }
}

/// A password check's outcome: whether the password matched, or `None`
/// when the check could not run.
type Verdict = Option<bool>;

/// The address `peer`'s checks take turns under: a /64 for IPv6.
fn turn_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// A value shared under a key while anyone holds it, with how many do
/// (counted under the map's lock).
struct Held<T> {
    value: Arc<T>,
    holders: usize,
}

/// One hold on the value under `key` in `map`, made when the first comes
/// and forgotten when the last goes, however it goes (a client that leaves
/// mid-check included); a value shared by checks, forgotten as soon as it
/// is set (a [`OnceCell`]), is not found by later ones.
struct Share<'m, K: std::hash::Hash + Eq + Copy, T: Forgettable> {
    held: Arc<T>,
    map: &'m DashMap<K, Held<T>>,
    key: K,
}

/// What a [`Share`] may forget before its last holder goes.
trait Forgettable {
    /// Whether it is done with, whoever still holds it.
    fn settled(&self) -> bool;
}

impl Forgettable for Semaphore {
    fn settled(&self) -> bool {
        false
    }
}

impl<V> Forgettable for OnceCell<V> {
    fn settled(&self) -> bool {
        self.initialized()
    }
}

impl<'m, K: std::hash::Hash + Eq + Copy, T: Forgettable> Share<'m, K, T> {
    fn of(map: &'m DashMap<K, Held<T>>, key: K, make: impl FnOnce() -> T) -> Share<'m, K, T> {
        let mut entry = map.entry(key).or_insert_with(|| Held {
            value: Arc::new(make()),
            holders: 0,
        });
        entry.holders += 1;
        let held = entry.value.clone();
        Share { held, map, key }
    }
}

impl<K: std::hash::Hash + Eq + Copy, T: Forgettable> Drop for Share<'_, K, T> {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut entry) = self.map.entry(self.key) {
            // A value forgotten already may have a successor under the key.
            if Arc::ptr_eq(&entry.get().value, &self.held) {
                let shared = entry.get_mut();
                shared.holders = shared.holders.saturating_sub(1);
                if shared.holders == 0 || shared.value.settled() {
                    entry.remove();
                }
            }
        }
    }
}

/// The first 8 bytes of a BLAKE3 hash as a number.
fn leading_u64(digest: &blake3::Hash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// How an unknown user name a client sent is logged: the first 8 hex
/// digits of its BLAKE3 hash, which an operator can compare with a name's
/// (`printf %s NAME | b3sum`). A secret sent in its place is not shown as
/// sent (a weak one could still be guessed by trying candidates against
/// the hash, as with any short hash).
fn name_hash(name: &str) -> String {
    blake3::hash(name.as_bytes()).to_hex()[..8].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn basic(user_pass: &str) -> HeaderMap {
        let token = base64::engine::general_purpose::STANDARD.encode(user_pass);
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::PROXY_AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {token}")).unwrap(),
        );
        headers
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    fn code(result: Result<Principal, ProxyError>) -> Option<AuthFailure> {
        match result {
            Err(ProxyError::AuthRequired(failure)) => Some(failure),
            Err(other) => panic!("{other}"),
            Ok(_) => None,
        }
    }

    #[test]
    fn user_names_cannot_be_confused_with_session_keys() {
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("team.a-1"));
        for bad in [
            "",
            "a:b",
            "session-x",
            "a-session-b",
            "s p",
            &"x".repeat(65),
        ] {
            assert!(!valid_user_name(bad), "{bad:?}");
        }
    }

    /// With users of several costs, an unknown name is verified against
    /// a hash of one of them, picked by the name: over many names every
    /// cost is used, and one name always gets the same.
    #[test]
    fn unknown_names_cost_what_some_user_costs() {
        let bcrypt_four = bcrypt::hash("pw", 4).unwrap();
        let bcrypt_five = bcrypt::hash("pw", 5).unwrap();
        let also_four = bcrypt::hash("other", 4).unwrap();
        let users = vec![
            User::new("a", &bcrypt_four, None).unwrap(),
            User::new("b", &bcrypt_five, None).unwrap(),
            User::new("c", &also_four, None).unwrap(),
        ];
        let auth = Auth::new(&AuthSettings::new(users, false, &[ExitId::new("a")]).unwrap());
        assert_eq!(auth.stand_ins.len(), 2, "two costs, one hash each");
        let classes: std::collections::HashSet<String> = (0..64)
            .filter_map(|i| auth.stand_in(&format!("nobody{i}")))
            .map(|h| h.cost_class().to_owned())
            .collect();
        assert_eq!(classes.len(), 2, "{classes:?}");
        let once = auth.stand_in("mallory").map(|h| h.cost_class().to_owned());
        assert_eq!(
            once,
            auth.stand_in("mallory").map(|h| h.cost_class().to_owned())
        );
    }

    #[test]
    fn settings_check_names_and_exits() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let exits = [ExitId::new("a")];
        let user = |name, exits| User::new(name, &hash, exits).unwrap();
        assert!(matches!(
            AuthSettings::new(vec![user("u", None), user("u", None)], false, &exits),
            Err(UserError::Duplicate(_))
        ));
        assert!(matches!(
            AuthSettings::new(vec![user("u", Some(vec![ExitId::new("b")]))], false, &exits),
            Err(UserError::UnknownExit { .. })
        ));
        assert!(matches!(
            User::new("u", &hash, Some(vec![])),
            Err(UserError::NoExits(_))
        ));
        assert!(matches!(
            User::new("u", "plain", None),
            Err(UserError::Hash { .. })
        ));
    }

    #[tokio::test]
    async fn users_mode_admits_only_the_right_password_and_caches_it() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users = vec![User::new("alice", &hash, Some(vec![ExitId::new("a")])).unwrap()];
        let auth = Auth::new(&AuthSettings::new(users, false, &[ExitId::new("a")]).unwrap());
        assert_eq!(
            code(auth.admit(&HeaderMap::new(), peer()).await),
            Some(AuthFailure::Missing)
        );
        assert_eq!(
            code(auth.admit(&basic("alice:nope"), peer()).await),
            Some(AuthFailure::Rejected)
        );
        assert_eq!(
            code(auth.admit(&basic("mallory:pw"), peer()).await),
            Some(AuthFailure::Rejected)
        );
        assert_eq!(
            code(auth.admit(&basic("session-k:pw"), peer()).await),
            Some(AuthFailure::NoUser)
        );
        let ok = auth
            .admit(&basic("alice-session-k:pw"), peer())
            .await
            .unwrap();
        assert_eq!(ok.user.as_deref(), Some("alice"));
        assert!(!ok.exits.allows(&ExitId::new("b")));
        auth.verified.run_pending_tasks();
        assert_eq!(
            auth.verified.entry_count(),
            2,
            "the success is cached, by header and by login"
        );
        let checked = auth.checks();
        assert!(auth
            .admit(&basic("alice-session-k:pw"), peer())
            .await
            .is_ok());
        assert_eq!(auth.checks(), checked);
    }

    /// A user's new session key (`alice-session-KEY`, often one per
    /// session) costs no second password check once the user's password
    /// was checked; a wrong password with a new key is checked, and
    /// refused.
    #[tokio::test]
    async fn a_verified_users_new_session_key_costs_no_second_check() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users = vec![User::new("alice", &hash, None).unwrap()];
        let auth = Auth::new(&AuthSettings::new(users, false, &[]).unwrap());
        assert!(auth
            .admit(&basic("alice-session-k1:pw"), peer())
            .await
            .is_ok());
        assert_eq!(auth.checks(), 1);
        for key in ["k2", "k3"] {
            let admitted = auth
                .admit(&basic(&format!("alice-session-{key}:pw")), peer())
                .await
                .unwrap();
            assert_eq!(admitted.user.as_deref(), Some("alice"));
        }
        assert_eq!(auth.checks(), 1);
        assert_eq!(
            code(auth.admit(&basic("alice-session-k4:nope"), peer()).await),
            Some(AuthFailure::Rejected)
        );
        assert_eq!(auth.checks(), 2);
    }

    /// Admissions of one user and password at once (a scraper opening its
    /// connections with a new login) share one check; a refused password
    /// is refused again without a check.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_login_at_once_is_one_check_and_a_refusal_is_remembered() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users = vec![User::new("alice", &hash, None).unwrap()];
        let auth = Arc::new(Auth::new(&AuthSettings::new(users, false, &[]).unwrap()));
        let admissions: Vec<_> = (0..10)
            .map(|i| {
                let auth = auth.clone();
                tokio::spawn(async move {
                    auth.admit(&basic(&format!("alice-session-k{i}:pw")), peer())
                        .await
                        .is_ok()
                })
            })
            .collect();
        for admission in admissions {
            assert!(admission.await.unwrap());
        }
        assert_eq!(auth.checks(), 1);
        for _ in 0..5 {
            assert_eq!(
                code(auth.admit(&basic("alice:wrong"), peer()).await),
                Some(AuthFailure::Rejected)
            );
        }
        assert_eq!(auth.checks(), 2);
        assert!(auth.in_flight.is_empty() && auth.peers.is_empty());
        assert_eq!(
            turn_key("2001:db8::1:2:3:4".parse().unwrap()),
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            turn_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    /// An address flooding wrong passwords has at most
    /// [`CHECKS_PER_PEER`] checks queued for a core: another address's
    /// login waits behind those, not behind the whole flood.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_from_one_address_delays_another_by_a_few_checks() {
        // About 20 ms a check.
        let hash = bcrypt::hash("pw", 8).unwrap();
        let users = vec![User::new("alice", &hash, None).unwrap()];
        let auth = Arc::new(Auth::new(&AuthSettings::new(users, false, &[]).unwrap()));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flooder: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let flood: Vec<_> = (0..20)
            .map(|i| {
                let (auth, done) = (auth.clone(), done.clone());
                tokio::spawn(async move {
                    let _ = auth
                        .admit(&basic(&format!("alice:wrong{i}")), flooder)
                        .await;
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        // Every check of the flood is under way (or done) before the login
        // comes.
        let started = || auth.in_flight.len() + done.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..5_000 {
            if started() == 20 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(started(), 20);
        assert!(auth.admit(&basic("alice:pw"), peer()).await.is_ok());
        let before = done.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            before < 2 + 2 * CHECKS_PER_PEER,
            "{before} of the flood first"
        );
        for check in flood {
            check.await.unwrap();
        }
        assert!(auth.peers.is_empty());
    }

    #[tokio::test]
    async fn challenge_mode_admits_any_credentials_and_open_mode_everyone() {
        let auth = Auth::new(&AuthSettings {
            users: Vec::new(),
            challenge_session_keys: true,
        });
        assert_eq!(
            code(auth.admit(&HeaderMap::new(), peer()).await),
            Some(AuthFailure::NameYourSession)
        );
        let ok = auth.admit(&basic("session-k:"), peer()).await.unwrap();
        assert_eq!(ok.user, None);
        let open = Auth::new(&AuthSettings::default());
        assert!(open.admit(&HeaderMap::new(), peer()).await.is_ok());
    }
}
