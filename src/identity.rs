//! Shared vocabulary: what an identity is.
//!
//! An identity is one cookie jar, one exit (and sticky upstream session),
//! one egress address and one client fingerprint, bound together from the
//! first request to the end and retired together. Pins map credentials
//! (tracked cookies, client session keys) to an identity; the identity says
//! where its traffic goes.
//!
//! Invariant: an identity never moves. Its exit and upstream session are
//! set at creation and never change; when it cannot continue on its exit it
//! is retired, and its credentials are remembered as retired so they are
//! never pinned elsewhere. The records here are what every pin store keeps;
//! the decisions about them live in `routing`.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::credential::{Credential, PinKind};
use crate::fingerprint::{Fingerprint, HeaderValues};

/// The id of an identity: random, never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(pub u64);

impl IdentityId {
    /// A fresh random id.
    pub fn random() -> IdentityId {
        // Zero is kept out so a zeroed record is never a valid id.
        IdentityId(rand::random::<u64>().max(1))
    }
}

/// The stable name of an exit.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitId(Arc<str>);

impl ExitId {
    /// Wraps a validated id.
    pub fn new(id: &str) -> ExitId {
        ExitId(Arc::from(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ExitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl Serialize for ExitId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ExitId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ExitId, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(ExitId::new(&text))
    }
}

/// The upstream session id an identity fills into an exit's `{session}`
/// placeholder, so the provider keeps one IP for it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

/// Ids are 64-bit: a number in binary formats, 16 hex digits in text ones
/// (JSON tools lose precision on integers above 2^53) and when shown
/// (lowercase: a session id is accepted by every provider's session-name
/// charset).
macro_rules! hex_id {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.serialize_str(&self.to_string())
                } else {
                    serializer.serialize_u64(self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let text = String::deserialize(deserializer)?;
                    u64::from_str_radix(&text, 16)
                        .map($name)
                        .map_err(serde::de::Error::custom)
                } else {
                    u64::deserialize(deserializer).map($name)
                }
            }
        }
    };
}

hex_id!(IdentityId);
hex_id!(SessionId);
hex_id!(RouteHash);

/// A short keyed hash of one part of an exit's route (see
/// [`FoundingRoute`]): equal for the same text under the same pin key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteHash(pub u64);

/// The route an identity was founded on, as its exit had it then: where
/// its traffic left (the exit's address and credentials) and with which
/// face (the fingerprint mode, and the browser profile it imitates). Each
/// is a hash keyed with the pin key, so an export or the embedded store
/// holds nothing an exit password could be guessed from without the key
/// (Redis holds the fleet's key itself). An identity whose
/// exit's route is no longer the one it was founded on retires
/// (`exit-changed`): whatever a replica, a restart or a restored data
/// directory remembers about the exit's earlier routes, the identity
/// carries its own (see `exits::routes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FoundingRoute {
    /// The exit's address and credentials.
    pub route: RouteHash,
    /// Its fingerprint mode and profile.
    pub face: RouteHash,
}

/// Why an identity was retired.
// Externally tagged (serde's default): the compact binary format of the
// durable store cannot read internally tagged enums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetireReason {
    /// Its exit was declared dead by health checks.
    ExitDown,
    /// Its exit is no longer configured.
    ExitRemoved,
    /// The exit's sticky-session window has passed: the provider may have
    /// moved the session to another IP.
    StickyExpired,
    /// Unused for longer than the idle timeout.
    IdleExpired,
    /// Older than the maximum lifetime.
    LifetimeExpired,
    /// The origin answered with an invalidation (challenge, block, ...).
    Invalidated {
        /// The rule that matched.
        rule: String,
    },
    /// A new tunnel of the identity left from another address.
    ExitIpDrift {
        /// The address the identity was created on.
        expected: IpAddr,
        /// The address the new tunnel reported.
        observed: IpAddr,
    },
    /// Retired by an operator (`DELETE /identities/ID` or `/pins/NAME#HASH`
    /// on the admin endpoint). Stored records keep the variant's place;
    /// `manual` is its name in exports written before it was renamed.
    #[serde(alias = "manual")]
    Evicted,
    /// The identity's record is gone (its pins outlived it).
    Forgotten,
    /// Not the identity: this cookie's own `Max-Age`/`Expires` has passed.
    CookieExpired,
    /// The pin store lost the credential's pin (a wipe, a failover to a
    /// replica that missed writes) and no replica's journal had it, or two
    /// journals disagreed: it is never pinned anew.
    StoreLost,
    /// Its exit's route (URL, credentials or fingerprint mode) changed under
    /// the exit's id since it was founded: the new route may leave from
    /// other IPs. (Last: stored records name variants by place.)
    ExitChanged,
}

impl RetireReason {
    /// A short, stable label (metrics, headers).
    pub fn label(&self) -> &'static str {
        match self {
            RetireReason::ExitDown => "exit-down",
            RetireReason::ExitRemoved => "exit-removed",
            RetireReason::StickyExpired => "sticky-expired",
            RetireReason::IdleExpired => "idle-expired",
            RetireReason::LifetimeExpired => "lifetime-expired",
            RetireReason::Invalidated { .. } => "invalidated",
            RetireReason::ExitIpDrift { .. } => "exit-ip-drift",
            RetireReason::Evicted => "evicted",
            RetireReason::Forgotten => "forgotten",
            RetireReason::CookieExpired => "cookie-expired",
            RetireReason::StoreLost => "store-lost",
            RetireReason::ExitChanged => "exit-changed",
        }
    }
}

impl fmt::Display for RetireReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetireReason::Invalidated { rule } => write!(f, "invalidated by the origin ({rule})"),
            RetireReason::ExitIpDrift { expected, observed } => {
                write!(
                    f,
                    "exit-ip-drift (created on {expected}, new tunnel from {observed})"
                )
            }
            RetireReason::Evicted => f.write_str("evicted by an operator"),
            other => f.write_str(other.label()),
        }
    }
}

/// When and why an identity was retired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retirement {
    /// Why.
    pub reason: RetireReason,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

/// An identity as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Its id.
    pub id: IdentityId,
    /// The exit it is bound to.
    pub exit: ExitId,
    /// Its upstream session (used where the exit has `{session}`).
    pub session: SessionId,
    /// When the upstream session started (the sticky window counts from here).
    pub session_started_ms: u64,
    /// When the identity was created.
    pub created_ms: u64,
    /// The address its first tunnel left from, once known.
    pub egress_ip: Option<IpAddr>,
    /// The client fingerprint recorded at creation.
    pub fingerprint: Arc<Fingerprint>,
    /// Last request, in Unix milliseconds.
    pub last_used_ms: u64,
    /// Requests sent.
    pub requests: u64,
    /// Whether it ever got a 2xx answer (a later 401 then means invalidation).
    pub worked: bool,
    /// Set once retired.
    pub retired: Option<Retirement>,
    /// The route it was founded on (`None` for identities founded before
    /// identities carried it, and for exits without one: see
    /// [`FoundingRoute`]). The last field: a binary record written with it
    /// reads, without it, in a release that does not know it.
    #[serde(default)]
    pub route: Option<FoundingRoute>,
}

impl Identity {
    /// A new identity on `exit`, created now.
    pub fn new(
        exit: ExitId,
        session: SessionId,
        session_started_ms: u64,
        fingerprint: Arc<Fingerprint>,
        now_ms: u64,
    ) -> Identity {
        Identity {
            id: IdentityId::random(),
            exit,
            session,
            session_started_ms,
            created_ms: now_ms,
            egress_ip: None,
            fingerprint,
            last_used_ms: now_ms,
            requests: 0,
            worked: false,
            retired: None,
            route: None,
        }
    }
}

impl Identity {
    /// Decodes a stored record (postcard), in the current layout, the one
    /// written before identities carried their route, or the one written
    /// before fingerprints held TLS and HTTP/2. A record of an older layout
    /// is shorter than the newer ones read it as, so it never reads as one;
    /// read as an older one, a record must end where it does (a current
    /// record whose route is damaged is an error, not one without a route).
    /// The current layout may be followed by fields a later release added.
    /// Its recorded hello is renewed (see [`Fingerprint::renew_stored_hello`]).
    pub fn decode(bytes: &[u8]) -> Result<Identity, postcard::Error> {
        let mut identity = match postcard::from_bytes::<Identity>(bytes) {
            Ok(identity) => identity,
            Err(current) => whole::<UnroutedIdentity>(bytes)
                .map(Identity::from)
                .or_else(|_| whole::<LegacyIdentity>(bytes).map(Identity::from))
                .map_err(|_| current)?,
        };
        if identity.fingerprint.tls.is_some() {
            Arc::make_mut(&mut identity.fingerprint).renew_stored_hello();
        }
        Ok(identity)
    }
}

/// A `T` that is the whole of `bytes`.
pub(crate) fn whole<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    match postcard::take_from_bytes::<T>(bytes)? {
        (value, []) => Ok(value),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

/// [`Identity`] as stored before identities carried their route; with a
/// fingerprint `F` of headers alone, as stored before fingerprints carried
/// TLS and HTTP/2 ([`LegacyIdentity`]).
#[derive(Deserialize)]
struct UnroutedIdentity<F = Arc<Fingerprint>> {
    id: IdentityId,
    exit: ExitId,
    session: SessionId,
    session_started_ms: u64,
    created_ms: u64,
    egress_ip: Option<IpAddr>,
    fingerprint: F,
    last_used_ms: u64,
    requests: u64,
    worked: bool,
    retired: Option<Retirement>,
}

/// [`Identity`] as stored before fingerprints carried TLS and HTTP/2.
type LegacyIdentity = UnroutedIdentity<HeaderValues>;

/// A fingerprint as an older layout stored it.
trait StoredFingerprint {
    /// The same fingerprint as identities hold it now.
    fn current(self) -> Arc<Fingerprint>;
}

impl StoredFingerprint for Arc<Fingerprint> {
    fn current(self) -> Arc<Fingerprint> {
        self
    }
}

impl StoredFingerprint for HeaderValues {
    fn current(self) -> Arc<Fingerprint> {
        Arc::new(Fingerprint {
            headers: self,
            tls: None,
            h2: None,
        })
    }
}

impl<F: StoredFingerprint> From<UnroutedIdentity<F>> for Identity {
    fn from(old: UnroutedIdentity<F>) -> Identity {
        Identity {
            id: old.id,
            exit: old.exit,
            session: old.session,
            session_started_ms: old.session_started_ms,
            created_ms: old.created_ms,
            egress_ip: old.egress_ip,
            fingerprint: old.fingerprint.current(),
            last_used_ms: old.last_used_ms,
            requests: old.requests,
            worked: old.worked,
            retired: old.retired,
            route: None,
        }
    }
}

/// A credential's binding to an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The identity.
    pub identity: IdentityId,
    /// Cookie or session key.
    pub kind: PinKind,
    /// The cookie's name (`session` for session keys); never the value.
    pub name: Arc<str>,
    /// When pinned.
    pub created_ms: u64,
    /// When the cookie itself expires (from `Max-Age`/`Expires`), if known.
    pub expires_ms: Option<u64>,
}

impl Pin {
    /// The pin of `credential` to `identity`, made at `now_ms`. Only a
    /// cookie can expire on its own (`expires_ms`, from its Set-Cookie).
    pub fn new(
        identity: IdentityId,
        credential: &Credential,
        now_ms: u64,
        expires_ms: Option<u64>,
    ) -> Pin {
        Pin {
            identity,
            kind: credential.kind,
            name: Arc::clone(&credential.name),
            created_ms: now_ms,
            expires_ms: match credential.kind {
                PinKind::Cookie => expires_ms,
                PinKind::SessionKey => None,
            },
        }
    }

    /// Whether the credential has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|at| at <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of each layout reads as what was written: the current one
    /// with its route, the one before routes without (it is the current
    /// one without the route's tag), and a release without routes reads
    /// a current record's every other field.
    #[test]
    fn identities_read_in_every_layout() {
        let fingerprint = Fingerprint::of_user_agent("agent");
        let mut identity = Identity::new(ExitId::new("e1"), SessionId(3), 5, fingerprint, 7);
        identity.retired = Some(Retirement {
            reason: RetireReason::ExitChanged,
            at_ms: 9,
        });
        identity.route = Some(FoundingRoute {
            route: RouteHash(u64::MAX),
            face: RouteHash(1),
        });
        let routed = postcard::to_stdvec(&identity).unwrap();
        assert_eq!(Identity::decode(&routed).unwrap(), identity);

        let unrouted_identity = Identity {
            route: None,
            ..identity.clone()
        };
        let unrouted = postcard::to_stdvec(&unrouted_identity).unwrap();
        let old = &unrouted[..unrouted.len() - 1];
        assert_eq!(Identity::decode(old).unwrap(), unrouted_identity);

        let before: UnroutedIdentity = postcard::from_bytes(&routed).unwrap();
        assert_eq!(Identity::from(before), unrouted_identity);
        assert!(Identity::decode(&old[..old.len() - 1]).is_err());
        // A damaged route (its tag, or cut short) is an error, never an
        // identity without a route.
        let mut bad_tag = unrouted.clone();
        *bad_tag.last_mut().unwrap() = 2;
        assert!(Identity::decode(&bad_tag).is_err());
        assert!(Identity::decode(&routed[..routed.len() - 1]).is_err());
    }
}
