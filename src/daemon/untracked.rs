//! Pins of cookie names the configuration no longer tracks, or keys
//! otherwise.
//!
//! Which cookies are pinned comes from `track_cookies` alone: a name
//! dropped from it (an edit, or one `--track-cookie` flag, which replaces
//! the file's whole list) stops being read off requests, so the cookies
//! pinned under it would leave through whichever exit rotation picks,
//! silently. So would, for cookies sent in the new spelling, an exact name
//! respelt (its pins are keyed in the policy's spelling) or one a pattern
//! now covers instead (a pattern keys names lowercased). The store knows
//! the names it holds pins for, so a start or reload that would leave some
//! of them untracked or keyed otherwise is refused, naming them, unless
//! `identities.release_untracked_pins` says it is meant. A start judges
//! the keying against the patterns the store records its pins were keyed
//! under (each start and reload records its own): a respelling a reload
//! refused is refused at the next start too. A Redis replica judges the
//! pins its journal holds (those it made or read) by what the journal
//! records; Redis holds the fleet's and lists none of them cheaply, so a
//! replica's change is also judged, by patterns alone, against those the
//! fleet last put in force ([`check_fleet`]). An import is judged by the
//! export's record (see `store::transfer`).

use std::fmt;

use std::sync::Arc;

use crate::proxy::credentials::cookies::{self, CookiePolicy};
use crate::store::pinnable::{NameTest, PinnableNames};
use crate::store::{patterns_only_in, Store};

/// The most names an error lists (the rest are counted).
const NAMES_LISTED: usize = 20;

/// Pins the store holds of cookie names no longer tracked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct UntrackedPins {
    /// The names, sorted.
    pub names: Vec<String>,
    /// At a start, the `track_cookies` the store records its pins were
    /// keyed under (its patterns beyond the built-in set), so that "as
    /// they were" can be read off the error.
    pub keyed_under: Option<Vec<String>>,
}

impl fmt::Display for UntrackedPins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the pin store holds pins of cookies whose names track_cookies no longer matches, \
             or matches otherwise (an exact name respelt, or one a pattern covers instead), so \
             that their pins would not be found ({}): those cookies would leave through any \
             exit, not the one they are pinned to. Track the names again as they were (a \
             --track-cookie flag replaces the file's whole list), or set \
             identities.release_untracked_pins = true to leave their pins unenforced",
            self.listed()
        )?;
        if let Some(keyed_under) = &self.keyed_under {
            write!(
                f,
                ". The store records that its pins were keyed under track_cookies = {keyed_under:?} \
                 (besides the built-in set)"
            )?;
        }
        Ok(())
    }
}

impl UntrackedPins {
    /// The names, at most [`NAMES_LISTED`] of them.
    pub fn listed(&self) -> String {
        let mut listed = self
            .names
            .iter()
            .take(NAMES_LISTED)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if self.names.len() > NAMES_LISTED {
            listed.push_str(&format!(" and {} more", self.names.len() - NAMES_LISTED));
        }
        listed
    }
}

/// The test of the names pins may be made of under `cookies`: those it
/// tracks, and the token names pinned whatever it tracks. The one the
/// check below judges held names by, so a name it lets the store pin never
/// fails the check.
pub fn pinnable(cookies: &CookiePolicy) -> Arc<Box<NameTest>> {
    let cookies = cookies.clone();
    Arc::new(Box::new(move |name: &str| {
        cookies.is_tracked(name) || cookies::pinned_whatever_tracked(name)
    }))
}

/// A cookie policy whose requests may still run, and how to tell.
pub type Running = (CookiePolicy, Box<dyn Fn() -> bool + Send + Sync>);

/// The test of the names pins may be made of while `new` cookies are in
/// force and requests begun under the policies of `older` may still run
/// (each with its test): those `new` tracks, but for the names whose pins
/// it would not find from a policy still running (keyed otherwise, see
/// [`CookiePolicy::finds_pins_of`]): a pin of such a name made by a
/// request of either would be one of the two keyings, which the other
/// misses. Once none of them runs, `new`'s names alone.
pub fn pinnable_during(new: &CookiePolicy, older: Vec<Running>) -> Arc<Box<NameTest>> {
    let new = new.clone();
    Arc::new(Box::new(move |name: &str| {
        cookies::pinned_whatever_tracked(name)
            || (new.is_tracked(name)
                && older.iter().all(|(old, runs)| {
                    // Both ways: a request of either may look up a pin the
                    // other made (one of a name the old policy does not
                    // track it does not look up at all, as after any
                    // reload that adds a name).
                    !runs()
                        || (new.finds_pins_of(old, name)
                            && (!old.is_tracked(name) || old.finds_pins_of(&new, name)))
                }))
    }))
}

/// A change of the names pins may be made of, made before a reload's walk
/// of the store: put back when dropped unless kept (a reload refused, or
/// given up while it waited).
pub struct NamesChange<'a> {
    names: &'a PinnableNames,
    before: Option<Option<Arc<Box<NameTest>>>>,
}

impl<'a> NamesChange<'a> {
    /// Makes `test` the names pinned, at once.
    pub fn make(names: &'a PinnableNames, test: Arc<Box<NameTest>>) -> NamesChange<'a> {
        let before = names.swap(Some(test));
        NamesChange {
            names,
            before: Some(before),
        }
    }

    /// Returns once every pin write admitted under the names before has
    /// ended (see [`PinnableNames::wait_out`]).
    pub async fn wait_out(&self) {
        self.names.wait_out().await;
    }

    /// Keeps the change (the reload went through).
    pub fn keep(mut self) {
        self.before = None;
    }
}

impl Drop for NamesChange<'_> {
    fn drop(&mut self) {
        if let Some(before) = self.before.take() {
            self.names.swap(before);
        }
    }
}

/// The names `store` holds pins for that `cookies` would not find: names
/// it does not track, and, after the policies `olds` (a reload: the one in
/// force and those whose requests may still run), names it keys otherwise
/// than one of them (with Redis, of the pins this replica made or read:
/// its journal's).
pub fn untracked(store: &Store, cookies: &CookiePolicy, olds: &[CookiePolicy]) -> Vec<String> {
    let found = |name: &str| {
        cookies::pinned_whatever_tracked(name)
            || (cookies.is_tracked(name) && olds.iter().all(|old| cookies.finds_pins_of(old, name)))
    };
    let mut names: Vec<String> = store
        .held_cookie_names()
        .unwrap_or_default()
        .iter()
        .filter(|name| !found(name))
        .map(|name| name.to_string())
        .collect();
    names.sort();
    names
}

/// The tracked-cookie patterns a store records cannot be read as a
/// cookie policy (a file written by a release that reads patterns
/// otherwise, or damaged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the pin store records the tracked-cookie patterns its pins were keyed under, and one \
     of them cannot be read ({0}), so whether track_cookies finds those pins cannot be \
     told: start the pinproxy release that wrote the store, or set \
     identities.release_untracked_pins = true to judge the pins by their names alone"
)]
pub struct UnreadableRecord(String);

/// The check of a start: pins the store holds that `cookies` would not
/// find, keyed as the store records its pins were (the patterns of the run
/// before, or of its last reload; the names alone where it records none),
/// refused unless `release`.
pub fn check_at_start(
    store: &Store,
    cookies: &CookiePolicy,
    release: bool,
) -> Result<(), crate::daemon::StartError> {
    let recorded = store.tracking_on_record();
    let before = match &recorded {
        None => None,
        Some(patterns) => match CookiePolicy::of_patterns(patterns.iter().map(String::as_str)) {
            Ok(before) => Some(before),
            // Nothing to judge by it: a store that holds no cookie pin.
            Err(_)
                if store
                    .held_cookie_names()
                    .unwrap_or_default()
                    .iter()
                    .all(|name| cookies::pinned_whatever_tracked(name)) =>
            {
                None
            }
            Err(e) if release => {
                tracing::warn!(
                    error = %e,
                    "the pin store's record of its tracked-cookie patterns cannot be read; \
                     identities.release_untracked_pins judges its pins by their names alone"
                );
                None
            }
            Err(e) => return Err(UnreadableRecord(e.to_string()).into()),
        },
    };
    check(store, cookies, before.as_slice(), release).map_err(|mut found| {
        found.keyed_under = recorded.map(beyond_defaults);
        found.into()
    })
}

/// A change of the tracked cookies that may miss pins of a Redis fleet:
/// Redis cannot list the names of the fleet's pins, so a replica's change
/// is judged against the patterns the fleet last put in force.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FleetTracking {
    /// The change drops or rekeys names the fleet tracks.
    #[error(
        "a replica of the fleet put in force tracked-cookie patterns of which this \
         configuration drops or keys otherwise some names (an exact name dropped or respelt, \
         a pattern dropped or changed; only the fleet's: {fleet:?}; only this \
         configuration's: {ours:?}). Redis cannot list the fleet's pins to tell whether any \
         is held under them, and this replica would not find those pins: their cookies would \
         leave through any exit. Keep the fleet's names as they are (adding names or \
         patterns is fine, but for an exact name with capitals that a pattern covered, whose \
         pins were keyed lowercased), or set identities.release_untracked_pins = true to \
         leave such pins unenforced (the fleet then records this configuration)"
    )]
    Rekeyed {
        /// Patterns only the fleet's record has.
        fleet: Vec<String>,
        /// Patterns only this configuration has.
        ours: Vec<String>,
    },
    /// The fleet's patterns cannot be read as a cookie policy.
    #[error(
        "the tracked-cookie patterns the fleet last put in force (in Redis) cannot be read \
         ({0}): run the pinproxy release the fleet runs, or set \
         identities.release_untracked_pins = true to leave the fleet's pins of names this \
         configuration keys otherwise unenforced"
    )]
    Unreadable(String),
    /// Redis did not answer.
    #[error("cannot read or write the tracked-cookie patterns the fleet put in force: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Other replicas kept changing the fleet's record.
    #[error(
        "other replicas kept changing the tracked-cookie patterns the fleet put in force \
         while this one judged its own: try again once the fleet's rollout has settled"
    )]
    Contended,
}

/// The patterns of `patterns` beyond the built-in set.
fn beyond_defaults(patterns: impl IntoIterator<Item = impl AsRef<str>>) -> Vec<String> {
    patterns
        .into_iter()
        .filter(|pattern| !cookies::DEFAULT_TRACKED.contains(&pattern.as_ref()))
        .map(|pattern| pattern.as_ref().to_owned())
        .collect()
}

/// The fleet's record a change was judged against (`None`: there was
/// none), for [`claim_fleet`].
pub type Judged = Option<Vec<String>>;

/// Refuses `cookies` on a store shared by a fleet (Redis) if it drops or
/// rekeys names of the patterns the fleet last put in force
/// ([`CookiePolicy::keeps_keys_of`]), unless `release` (then warns).
/// Returns the record it judged, which [`claim_fleet`] replaces.
pub async fn check_fleet(
    store: &Store,
    cookies: &CookiePolicy,
    release: bool,
) -> Result<Judged, FleetTracking> {
    let judged = store.fleet_tracking().await?;
    if let Some(fleet) = &judged {
        judge_fleet(fleet, cookies, release)?;
    }
    Ok(judged)
}

/// Makes `cookies` the fleet's record if it is still the one `judged`;
/// else judges it again against the record now (another replica changed
/// it meanwhile), a few times at most.
pub async fn claim_fleet(
    store: &Store,
    cookies: &CookiePolicy,
    mut judged: Judged,
    release: bool,
) -> Result<(), FleetTracking> {
    for _ in 0..CLAIMS {
        match store
            .claim_fleet_tracking(judged.as_deref(), cookies.patterns())
            .await?
        {
            None => return Ok(()),
            Some(now) => {
                judge_fleet(&now, cookies, release)?;
                judged = Some(now);
            }
        }
    }
    Err(FleetTracking::Contended)
}

/// Tries of [`claim_fleet`] before it gives up.
const CLAIMS: usize = 5;

/// [`check_fleet`] against the record `fleet`.
fn judge_fleet(
    fleet: &[String],
    cookies: &CookiePolicy,
    release: bool,
) -> Result<(), FleetTracking> {
    let refusal = match CookiePolicy::of_patterns(fleet.iter().map(String::as_str)) {
        Ok(policy) if cookies.keeps_keys_of(&policy) => return Ok(()),
        Ok(_) => {
            let ours: Vec<String> = cookies.patterns().iter().map(|p| p.to_string()).collect();
            FleetTracking::Rekeyed {
                fleet: patterns_only_in(fleet, &ours),
                ours: patterns_only_in(&ours, fleet),
            }
        }
        Err(e) => FleetTracking::Unreadable(e.to_string()),
    };
    if !release {
        return Err(refusal);
    }
    tracing::warn!(
        refusal = %refusal,
        "identities.release_untracked_pins: the fleet's pins of names this configuration \
         drops or keys otherwise are left unenforced"
    );
    Ok(())
}

/// Refuses pins `cookies` would not find (see [`untracked`]) unless
/// `release` (then warns of them).
pub fn check(
    store: &Store,
    cookies: &CookiePolicy,
    olds: &[CookiePolicy],
    release: bool,
) -> Result<(), UntrackedPins> {
    let names = untracked(store, cookies, olds);
    if names.is_empty() {
        return Ok(());
    }
    let found = UntrackedPins {
        names,
        keyed_under: None,
    };
    if !release {
        return Err(found);
    }
    tracing::warn!(
        names = %found.listed(),
        "the pin store holds pins of cookie names no longer tracked; \
         identities.release_untracked_pins leaves them unenforced: those cookies leave \
         through any exit"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::credential::{Credential, PinHasher};
    use crate::fingerprint::Fingerprint;
    use crate::identity::{ExitId, Identity, Pin, SessionId};
    use crate::store::memory::MemoryStore;
    use crate::store::PinStore as _;

    /// A memory store holding one identity, and the identity.
    async fn store_with_an_identity() -> (Store, Identity) {
        let store = Store::Memory(MemoryStore::new());
        let identity = Identity::new(
            ExitId::new("e1"),
            SessionId(1),
            5,
            Fingerprint::of_user_agent("agent"),
            7,
        );
        store.create_identity(&identity).await.unwrap();
        (store, identity)
    }

    #[tokio::test]
    async fn pins_of_names_no_longer_tracked_are_found() {
        let (store, identity) = store_with_an_identity().await;
        let hasher = PinHasher::new([1; 32]);
        let pinned = |name: &str| {
            let credential = Credential::cookie(name, hasher.cookie(name, "v"));
            (credential.key, Pin::new(identity.id, &credential, 10, None))
        };
        let session_key = Credential {
            kind: crate::credential::PinKind::SessionKey,
            name: "session-key".into(),
            key: hasher.session_key("k1"),
        };
        // Tokens carried in headers are pinned whatever the policy says.
        let pins = [
            pinned("session_abc"),
            pinned("datadome"),
            pinned("x-kpsdk-ct"),
            pinned("x-px-authorization"),
            (
                session_key.key,
                Pin::new(identity.id, &session_key, 10, None),
            ),
        ];
        store.pin_all_if_absent(&pins).await.unwrap();
        let with_pattern = CookiePolicy::with_extra(&["session_*".into()]).unwrap();
        assert!(check(&store, &with_pattern, &[], false).is_ok());
        let without = CookiePolicy::with_extra(&[]).unwrap();
        let refused = check(&store, &without, &[], false).unwrap_err();
        assert_eq!(
            refused.names,
            ["session_abc"],
            "session keys name no cookie"
        );
        assert!(refused.to_string().contains("session_abc"), "{refused}");
        assert!(check(&store, &without, &[], true).is_ok(), "released");
    }

    /// A reload that respells an exact name keys it otherwise: pins of the
    /// cookie sent in the new spelling would not be found, as if the name
    /// were dropped. Sent in the old spelling, they are.
    #[tokio::test]
    async fn pins_a_respelt_name_would_not_find_are_found() {
        let (store, identity) = store_with_an_identity().await;
        let hasher = PinHasher::new([1; 32]);
        // Pinned under `sid` by an answer that spelt it `Sid`.
        let credential = Credential::cookie("Sid", hasher.cookie("sid", "v"));
        let pins = [(credential.key, Pin::new(identity.id, &credential, 10, None))];
        store.pin_all_if_absent(&pins).await.unwrap();
        let old = CookiePolicy::with_extra(&["sid".into()]).unwrap();
        let respelt = CookiePolicy::with_extra(&["Sid".into()]).unwrap();
        assert!(check(&store, &old, std::slice::from_ref(&old), false).is_ok());
        assert!(
            check(&store, &respelt, &[], false).is_ok(),
            "a start sees names"
        );
        let refused = check(&store, &respelt, std::slice::from_ref(&old), false).unwrap_err();
        assert_eq!(refused.names, ["Sid"]);
        assert!(refused.to_string().contains("respelt"), "{refused}");
        assert!(
            check(&store, &respelt, std::slice::from_ref(&old), true).is_ok(),
            "released"
        );
    }

    /// A record of patterns this release cannot read (written by another,
    /// or damaged) cannot tell how the pins were keyed: a start is refused,
    /// saying so, unless released (then the names alone are judged).
    #[tokio::test]
    async fn a_record_that_cannot_be_read_refuses_the_start_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::store::durable::STORE_FILE);
        let cookies = CookiePolicy::with_extra(&[]).unwrap();
        {
            let store = crate::store::durable::DurableStore::open(&path).unwrap();
            store.record_tracking(&["sid=".into()]).await.unwrap();
            store.close().await;
        }
        let store = Store::Durable(crate::store::durable::DurableStore::open(&path).unwrap());
        assert!(
            check_at_start(&store, &cookies, false).is_ok(),
            "no cookie pin to judge by it"
        );
        let hasher = PinHasher::new([1; 32]);
        let identity = Identity::new(
            ExitId::new("e1"),
            SessionId(1),
            5,
            Fingerprint::of_user_agent("agent"),
            7,
        );
        store.create_identity(&identity).await.unwrap();
        let credential = Credential::cookie("sid", hasher.cookie("sid", "v"));
        let pins = [(credential.key, Pin::new(identity.id, &credential, 10, None))];
        store.pin_all_if_absent(&pins).await.unwrap();
        let refused = check_at_start(&store, &cookies, false).unwrap_err();
        assert!(
            matches!(refused, crate::daemon::StartError::TrackingRecord(_)),
            "{refused}"
        );
        assert!(refused.to_string().contains("\"sid=\""), "{refused}");
        assert!(check_at_start(&store, &cookies, true).is_ok(), "released");
        store.close().await;
    }

    /// While requests of the configuration before a reload run, a name the
    /// two configurations key otherwise is pinned by neither; after, as
    /// the new one says.
    #[test]
    fn names_keyed_otherwise_are_not_pinned_while_the_old_configuration_runs() {
        let old = CookiePolicy::with_extra(&["sid".into()]).unwrap();
        let new = CookiePolicy::with_extra(&["Sid".into(), "fresh".into()]).unwrap();
        let runs = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let running = {
            let runs = runs.clone();
            move || runs.load(std::sync::atomic::Ordering::Acquire)
        };
        let test = pinnable_during(&new, vec![(old, Box::new(running))]);
        assert!(!test("Sid"), "respelt: refused while the old one runs");
        assert!(!test("sid"), "a quoted value's key differs too");
        assert!(test("datadome") && test("fresh") && test("x-kpsdk-ct"));
        assert!(!test("other"));
        runs.store(false, std::sync::atomic::Ordering::Release);
        assert!(test("Sid"), "the new one's alone once the old is gone");
        // Each policy still running counts: a second reload, keyed as the
        // first, still refuses what the first's predecessor keys otherwise.
        let older = CookiePolicy::with_extra(&["sid".into()]).unwrap();
        let first = CookiePolicy::with_extra(&["Sid".into()]).unwrap();
        let second = CookiePolicy::with_extra(&["Sid".into(), "other".into()]).unwrap();
        let test = pinnable_during(
            &second,
            vec![(older, Box::new(|| true)), (first, Box::new(|| false))],
        );
        assert!(!test("Sid"), "the first's predecessor still runs");
        assert!(test("other"));
    }

    fn pin_of(name: &str) -> (crate::credential::PinKey, Pin) {
        let key = PinHasher::new([2; 32]).cookie(name, "v");
        let credential = Credential::cookie(name, key);
        (
            key,
            Pin::new(crate::identity::IdentityId(4), &credential, 1, None),
        )
    }

    /// A reload refused (or given up) after it changed the names puts
    /// the old ones back: pins of the names it would have dropped are made
    /// again.
    #[tokio::test]
    async fn a_change_of_names_not_kept_is_put_back() {
        let names = PinnableNames::default();
        let before = CookiePolicy::with_extra(&["session_*".into()]).unwrap();
        let after = CookiePolicy::with_extra(&[]).unwrap();
        names.set(Some(pinnable(&before))).await;
        async fn admitted(names: &PinnableNames) -> bool {
            let (key, pin) = pin_of("session_tok");
            names.admit([(&key, &pin)]).await.is_ok()
        }
        assert!(admitted(&names).await);
        let change = NamesChange::make(&names, pinnable(&after));
        change.wait_out().await;
        assert!(!admitted(&names).await, "dropped while the change stands");
        drop(change);
        assert!(admitted(&names).await, "put back");
        NamesChange::make(&names, pinnable(&after)).keep();
        assert!(!admitted(&names).await, "kept");
    }
}
