//! What route each exit id had, remembered in the data directory.
//!
//! Identities refer to their exit by id. When an exit's route changes under
//! its id (another host, port, user name, password or fingerprint mode: as
//! far as pinproxy can tell, another pool of IPs or another face), the
//! identities founded before would go on through wherever the new route
//! leads, their cookies with them. Only the operator knows whether it is the
//! same pool (a renamed gateway, a rotated password), so pinproxy does not
//! guess: each id's route key ([`ExitSpec::route_key`], hashed again with
//! the pin key, as an identity's [`FoundingRoute`] is: the file alone
//! gives no way to test a password guess) and fingerprint mode are kept in
//! `DATA_DIR/exit-routes.json` and compared at
//! every start and reload, and a change retires the identities founded
//! before it (`exit-changed`, see `routing::lifecycle::ends`), unless the
//! exit sets `keep_identities_on_route_change` (which never covers the
//! fingerprint mode). Ids no longer configured stay in the book: one that
//! comes back on another route has changed too.
//!
//! The option vouches for the change the book sees, not for any route: the
//! book keeps, per id, the routes kept changes led from to the one in
//! force, and an identity founded on a route it differs from continues only
//! when its route is one of them. A replica still on the old route, or one
//! whose book never saw the change, cannot vouch for the new route: the
//! identities founded there retire when they come to it, as they would
//! without the option. A route another exit has, or keeps identities from,
//! is never kept (two exits that swap URLs, in one reload or over two, each
//! lead to the other's IPs). A book that cannot be written refuses the
//! change: kept only in memory, it would be forgotten at the next start.
//!
//! Requests still on an exit a reload replaced run to their end on it,
//! unless their identity retires first (while one waits for its connection,
//! see `upstream::retired`); an identity they found after the change
//! retires at once (see `Exit::superseded`).
//!
//! The book is per replica: replicas of a fleet that restart with a changed
//! route each retire the identities founded before their own restart, and
//! a retirement is shared through the store.
//!
//! The book cannot see a change made while it was not there (a data
//! directory restored without it, an import into a new one, the first
//! start of a release that keeps it) nor another replica's routes (a
//! fleet half-way through a rollout). So each identity also carries the
//! route it was founded on ([`FoundingRoute`], from [`founding_route`]),
//! and one whose exit's route differs at its next use retires as well,
//! whichever replica, restart or directory it comes to.
//!
//! [`FoundingRoute`]: crate::identity::FoundingRoute
//! [`ExitSpec::route_key`]: super::spec::ExitSpec::route_key

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::spec::ExitSpec;
use super::ExitSet;
use crate::credential::PinHasher;
use crate::identity::{ExitId, FoundingRoute, RouteHash};
use crate::upstream::FingerprintMode;

/// The file in the data directory that remembers the exits' routes.
pub const ROUTE_FILE: &str = "exit-routes.json";

/// The route identities founded on the exit `spec` describes are founded
/// on: its route key and its face, each hashed with the pin key
/// `hasher` holds (the fleet's, on a shared store). The face of chrome mode
/// names its profile, so a release with another one is a change.
pub fn founding_route(spec: &ExitSpec, hasher: &PinHasher) -> FoundingRoute {
    let face = match spec.options.fingerprint {
        FingerprintMode::Chrome => format!(
            "chrome {}",
            crate::fingerprint::profile::chrome_profile_id()
        ),
        mode => mode.label().to_owned(),
    };
    FoundingRoute {
        route: route_hash(hasher, "route", &spec.route_key()),
        face: route_hash(hasher, "face", &face),
    }
}

/// Gives each exit of `exits` its [`founding_route`] (once: an exit kept
/// whole across a reload has it already, and the same).
pub fn found_on(exits: &ExitSet, hasher: &PinHasher) {
    for exit in exits.iter() {
        exit.set_founding_route(founding_route(&exit.spec, hasher));
    }
}

/// `text`, one `part` of a route, hashed with the pin key.
fn route_hash(hasher: &PinHasher, part: &str, text: &str) -> RouteHash {
    let mut keyed = blake3::Hasher::new_keyed(&hasher.key_bytes());
    keyed.update(b"pinproxy exit route v1\0");
    keyed.update(part.as_bytes());
    keyed.update(b"\0");
    keyed.update(text.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&keyed.finalize().as_bytes()[..8]);
    RouteHash(u64::from_le_bytes(out))
}

/// How the book holds an exit's route: [`founding_route`]'s route hash
/// (hex), keyed with the pin key.
fn book_route(spec: &ExitSpec, hasher: &PinHasher) -> String {
    route_hash(hasher, "route", &spec.route_key()).to_string()
}

/// How the book holds the part of an exit's credentials that carries
/// `{session}`: `none` without a placeholder, else a keyed hash of the
/// user name and password templates that hold it (either may be a
/// credential). A route change that keeps it reaches the provider's same
/// sessions; one that changes it gives every identity a session, and so
/// an IP, the provider has never seen.
fn book_session(spec: &ExitSpec, hasher: &PinHasher) -> String {
    use crate::upstream::dial::SESSION_PLACEHOLDER;
    let Some(credentials) = spec.kind.credentials() else {
        return "none".into();
    };
    let carrying = |part: &str| {
        if part.contains(SESSION_PLACEHOLDER) {
            part.to_owned()
        } else {
            String::new()
        }
    };
    let (user, password) = (carrying(&credentials.user), carrying(&credentials.password));
    if user.is_empty() && password.is_empty() {
        return "none".into();
    }
    route_hash(hasher, "session", &format!("{user}\n{password}")).to_string()
}

/// What the book writes of the pin key its routes are hashed with, so that
/// a book read under another key (a data directory moved to another store
/// or fleet, a new `pin-key`) is not compared hash for hash: every exit
/// would look changed, and every identity founded before, the whole
/// fleet's on a shared store, would retire.
fn key_check(hasher: &PinHasher) -> String {
    route_hash(hasher, "book key", "").to_string()
}

/// One exit id's route, as remembered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    /// In a book written before routes were keyed, the bare
    /// [`ExitSpec::route_key`](super::spec::ExitSpec::route_key) (and
    /// `kept_from` holds such keys too), which [`BookFile::keyed`] keys;
    /// never written. (A release before this one, which needs it, refuses
    /// a book without it, naming the file, rather than taking every exit
    /// for changed.)
    #[serde(default, skip_serializing)]
    route: Option<String>,
    /// Set beside `route` by development builds that wrote it keyed but
    /// with no record of the key: such a route cannot be compared, nor
    /// keyed again; never written.
    #[serde(default, skip_serializing)]
    keyed: bool,
    /// The route, as [`book_route`] writes it.
    #[serde(default)]
    route_hash: String,
    /// The [`key_check`] of the pin key `route_hash` and `kept_from` are
    /// hashed with.
    #[serde(default)]
    key: String,
    /// The fingerprint mode (`mirror`, `chrome`, `rustls`; empty in books
    /// written before it was kept).
    #[serde(default)]
    face: String,
    /// The route's address without credentials, for messages.
    #[serde(default)]
    address: String,
    /// The part of its credentials that carries `{session}`, as
    /// [`book_session`] writes it (empty in books written before it was
    /// kept).
    #[serde(default)]
    session: String,
    /// When the route last changed under the id (Unix ms, 0: never).
    #[serde(default)]
    changed_ms: u64,
    /// The routes (as `route_hash`) whose identities continue on this one: the
    /// routes kept changes led from to it, oldest first (at most
    /// [`MAX_KEPT_FROM`]); a change not kept empties it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    kept_from: Vec<String>,
}

/// Most earlier routes an id's identities are kept from.
const MAX_KEPT_FROM: usize = 16;

/// A route that changed under its exit's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    /// The exit.
    pub exit: ExitId,
    /// Whether its identities are kept (`keep_identities_on_route_change`).
    pub kept: bool,
}

/// What a set of exits changes in the book, not applied yet: see
/// [`RouteBook::plan`]. Changes are dated by [`RoutePlan::date`], after
/// the exits being replaced are marked (see `daemon::live`).
#[derive(Debug)]
pub struct RoutePlan {
    next: BTreeMap<String, Remembered>,
    /// The routes that changed under their ids.
    pub changes: Vec<RouteChange>,
    /// Whether the book changes (new ids, changed routes): to be saved.
    pub dirty: bool,
}

impl RoutePlan {
    /// Dates the changes whose identities retire at `now_ms`.
    pub fn date(&mut self, now_ms: u64) {
        for change in self.changes.iter().filter(|c| !c.kept) {
            if let Some(entry) = self.next.get_mut(change.exit.as_str()) {
                entry.changed_ms = now_ms.max(1);
            }
        }
    }

    /// Marks each exit of `exits` with its route's last change, if any
    /// ([`Exit::mark_route_changed`]).
    ///
    /// [`Exit::mark_route_changed`]: super::Exit::mark_route_changed
    pub fn mark(&self, exits: &ExitSet) {
        for exit in exits.iter() {
            if let Some(entry) = self.next.get(exit.id().as_str()) {
                if entry.changed_ms > 0 {
                    exit.mark_route_changed(entry.changed_ms);
                }
            }
        }
    }

    /// Gives each exit of `exits` the routes its identities are kept from
    /// ([`Exit::vouches_for`]): the book holds them hashed as founding
    /// routes are.
    ///
    /// [`Exit::vouches_for`]: super::Exit::vouches_for
    pub fn vouch(&self, exits: &ExitSet) {
        for exit in exits.iter() {
            exit.set_kept_routes(self.kept_from(exit.id().as_str()));
        }
    }

    /// The founding routes the identities of exit `id` are kept from.
    fn kept_from(&self, id: &str) -> Box<[RouteHash]> {
        self.next
            .get(id)
            .map(|entry| {
                entry
                    .kept_from
                    .iter()
                    .filter_map(|route| u64::from_str_radix(route, 16).ok())
                    .map(RouteHash)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The exits' remembered routes (see the module doc).
#[derive(Debug)]
pub struct RouteBook {
    path: PathBuf,
    /// The pin key the routes are hashed with.
    hasher: PinHasher,
    known: Mutex<BTreeMap<String, Remembered>>,
    /// The file holds routes unkeyed, or keyed with another key: the next
    /// commit writes it, changed or not.
    unkeyed_on_file: AtomicBool,
}

/// The book as read from its file, before the pin key is known (see
/// [`BookFile::keyed`]).
#[derive(Debug)]
pub struct BookFile {
    path: PathBuf,
    known: BTreeMap<String, Remembered>,
}

impl BookFile {
    /// The book in `data_dir` (empty when there is none yet). A book that
    /// is there but cannot be read is an error, not an empty book: taken as
    /// empty, a route changed meanwhile would go unnoticed. Blocking: call
    /// it off the runtime.
    pub fn read(data_dir: &Path) -> std::io::Result<BookFile> {
        let path = data_dir.join(ROUTE_FILE);
        let known = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}: {e} (put back a good copy; deleting it forgets which routes the exits' \
                         identities were founded on)",
                        path.display()
                    ),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(BookFile { path, known })
    }

    /// The book, its routes hashed with the pin key `hasher` holds (the one
    /// identities' founding routes are hashed with). Routes written before
    /// they were keyed are keyed here. Routes hashed with another key
    /// cannot be compared: their ids are taken as new ones (no change, and
    /// no kept routes), with a warning; the identities founded on them
    /// carry their own founding routes, which still retire those whose exit
    /// left theirs. Either way the book is written at the next commit.
    pub fn keyed(self, hasher: &PinHasher) -> RouteBook {
        let BookFile { path, mut known } = self;
        let check = key_check(hasher);
        let mut rewrite = false;
        let mut foreign = Vec::new();
        known.retain(|id, entry| {
            if entry.route.is_some() && entry.keyed {
                foreign.push(id.clone());
                rewrite = true;
                return false;
            }
            if let Some(bare) = entry.route.take() {
                // An unkeyed route is the route key a keyed one hashes.
                let key = |route: &str| route_hash(hasher, "route", route).to_string();
                entry.route_hash = key(&bare);
                for route in &mut entry.kept_from {
                    *route = key(route);
                }
                entry.key = check.clone();
                rewrite = true;
                true
            } else if entry.key != check {
                foreign.push(id.clone());
                rewrite = true;
                false
            } else {
                true
            }
        });
        if !foreign.is_empty() {
            tracing::warn!(
                exits = ?foreign, file = %path.display(),
                "the exits' remembered routes were hashed with another pin key (the data \
                 directory was used with another store or fleet, or its pin-key is new): they \
                 are recorded afresh, as new exits' are; identities keep to the routes they \
                 were founded on"
            );
        }
        RouteBook {
            path,
            hasher: hasher.clone(),
            known: Mutex::new(known),
            unkeyed_on_file: AtomicBool::new(rewrite),
        }
    }
}

impl RouteBook {
    /// [`BookFile::read`] then [`BookFile::keyed`]. Blocking: call it off
    /// the runtime.
    pub fn load(data_dir: &Path, hasher: &PinHasher) -> std::io::Result<RouteBook> {
        Ok(BookFile::read(data_dir)?.keyed(hasher))
    }

    /// Compares `specs` with the book: an id not in it is taken as it is, a
    /// changed route is a change (undated until [`RoutePlan::date`]). The
    /// book itself is unchanged until [`RouteBook::commit`].
    pub fn plan(&self, specs: &[&ExitSpec]) -> RoutePlan {
        // The book before this plan (held while it is made: no await), and
        // the plan's copy of it.
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = known.clone();
        let mut changes = Vec::new();
        let mut dirty = self.unkeyed_on_file.load(Ordering::Relaxed);
        for spec in specs {
            let route = book_route(spec, &self.hasher);
            let session = book_session(spec, &self.hasher);
            let face = spec.options.fingerprint.label();
            let address = spec.kind.public_url();
            let entry = next.entry(spec.id.as_str().to_owned()).or_insert_with(|| {
                dirty = true;
                Remembered {
                    route: None,
                    keyed: false,
                    route_hash: route.clone(),
                    key: key_check(&self.hasher),
                    face: face.to_owned(),
                    address: address.clone(),
                    session: session.clone(),
                    changed_ms: 0,
                    kept_from: Vec::new(),
                }
            });
            let face_changed = !entry.face.is_empty() && entry.face != face;
            if entry.route_hash == route && !face_changed {
                if entry.face.is_empty() {
                    entry.face = face.to_owned();
                    dirty = true;
                }
                if entry.session.is_empty() {
                    entry.session = session;
                    dirty = true;
                }
                continue;
            }
            // Nor for a change of what carries `{session}`: the provider
            // has never seen the sessions it now names.
            let session_changed = !entry.session.is_empty() && entry.session != session;
            // The operator can vouch for the IPs, never for the face: an
            // identity shown with another fingerprint is another client to
            // the origin, whatever the option says.
            // Nor for a route another exit has, or keeps identities from:
            // that exit's IPs, not this one's (two exits that swap URLs, in
            // one reload or over two).
            let taken_from = known
                .iter()
                .find(|(id, other)| {
                    id.as_str() != spec.id.as_str()
                        && (other.route_hash == route || other.kept_from.contains(&route))
                })
                .map(|(id, _)| id.clone());
            let kept = spec.options.keep_identities_on_route_change
                && !face_changed
                && !session_changed
                && taken_from.is_none();
            if session_changed && spec.options.keep_identities_on_route_change {
                tracing::warn!(
                    exit = %spec.id, was = %entry.address, now = %address,
                    "the part of the exit's credentials that carries {{session}} changed: its \
                     identities retire (exit-changed) despite keep_identities_on_route_change, \
                     since the provider has never seen the sessions it now names"
                );
            }
            if let (Some(other), true) = (&taken_from, spec.options.keep_identities_on_route_change)
            {
                tracing::warn!(
                    exit = %spec.id, was = %entry.address, now = %address, taken_from = %other,
                    "exit route changed under the same id to a route exit {other} had: its \
                     identities retire (exit-changed) despite keep_identities_on_route_change, \
                     since they would leave from that exit's IPs"
                );
            }
            if kept {
                tracing::warn!(
                    exit = %spec.id, was = %entry.address, now = %address,
                    "exit route (URL, credentials or fingerprint mode) changed under the same \
                     id: its identities continue through the new route, as \
                     keep_identities_on_route_change says"
                );
            } else {
                tracing::warn!(
                    exit = %spec.id, was = %entry.address, now = %address,
                    "exit route (URL, credentials or fingerprint mode) changed under the same \
                     id: the identities founded on the old route retire (exit-changed), since \
                     the new one may leave from other IPs; set keep_identities_on_route_change \
                     on the exit if it reaches the same IPs"
                );
            }
            let was = std::mem::replace(&mut entry.route_hash, route);
            if kept {
                // The route it kept its identities from, and the ones that
                // one kept them from.
                entry
                    .kept_from
                    .retain(|r| *r != was && *r != entry.route_hash);
                entry.kept_from.push(was);
                let excess = entry.kept_from.len().saturating_sub(MAX_KEPT_FROM);
                entry.kept_from.drain(..excess);
            } else {
                entry.kept_from.clear();
            }
            entry.face = face.to_owned();
            entry.address = address;
            entry.session = session;
            changes.push(RouteChange {
                exit: spec.id.clone(),
                kept,
            });
            dirty = true;
        }
        RoutePlan {
            next,
            changes,
            dirty,
        }
    }

    /// Writes `plan`'s book (atomically, mode 0600) if it changed, then
    /// takes it as the book. A book that cannot be written changes nothing:
    /// a change only in memory would be forgotten at the next start, and
    /// the identities founded on the old route would go on through the new
    /// one after it. Blocking: call it off the runtime.
    pub fn commit(&self, plan: &RoutePlan) -> std::io::Result<()> {
        if !plan.dirty {
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(&plan.next).map_err(std::io::Error::other)?;
        crate::fsutil::replace_private(&self.path, &text).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot write {}: {e}", self.path.display()),
            )
        })?;
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) = plan.next.clone();
        self.unkeyed_on_file.store(false, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pin key of the tests' books.
    fn hasher() -> PinHasher {
        PinHasher::new([7; 32])
    }

    fn specs(urls: &[(&str, &str)]) -> Vec<ExitSpec> {
        urls.iter()
            .map(|(id, url)| ExitSpec::parse(id, url).unwrap())
            .collect()
    }

    /// Plans `specs` at `now`, commits, and answers each one's date, the
    /// changes and whether the book changed.
    fn apply(
        book: &RouteBook,
        specs: &[ExitSpec],
        now: u64,
    ) -> (Vec<Option<u64>>, Vec<RouteChange>, bool) {
        let mut plan = book.plan(&specs.iter().collect::<Vec<_>>());
        plan.date(now);
        book.commit(&plan).unwrap();
        let dates = specs
            .iter()
            .map(|s| {
                plan.next
                    .get(s.id.as_str())
                    .and_then(|e| (e.changed_ms > 0).then_some(e.changed_ms))
            })
            .collect();
        (dates, plan.changes, plan.dirty)
    }

    #[test]
    fn a_route_changed_under_its_id_is_dated_once_and_a_kept_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        let first = specs(&[("a", "http://u:p@gate:1"), ("b", "http://gate:2")]);
        assert_eq!(
            apply(&book, &first, 100),
            (vec![None, None], vec![], true),
            "new ids"
        );

        // Only the password differs: a change. Read again: no new one.
        let second = specs(&[("a", "http://u:q@gate:1"), ("b", "http://gate:2")]);
        let changed = RouteChange {
            exit: ExitId::new("a"),
            kept: false,
        };
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        assert_eq!(
            apply(&book, &second, 200),
            (vec![Some(200), None], vec![changed], true)
        );
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        assert_eq!(
            apply(&book, &second, 300),
            (vec![Some(200), None], vec![], false)
        );

        // Kept: the new route is taken, and dated no later.
        let mut third = specs(&[("a", "http://u:q@gate:1"), ("b", "http://gate2:2")]);
        third[1].options.keep_identities_on_route_change = true;
        let kept = RouteChange {
            exit: ExitId::new("b"),
            kept: true,
        };
        assert_eq!(
            apply(&book, &third, 400),
            (vec![Some(200), None], vec![kept], true)
        );

        // Gone and back on another route: a change.
        assert!(!apply(&book, &third[..1], 500).2);
        let fourth = specs(&[("a", "http://u:q@gate:1"), ("b", "http://gate3:2")]);
        assert_eq!(apply(&book, &fourth, 600).0, vec![Some(200), Some(600)]);
    }

    /// `keep_identities_on_route_change` vouches for the IPs: a password
    /// rotated under one session template keeps them, a change of what
    /// carries `{session}` cannot (the provider never saw those sessions).
    #[test]
    fn a_kept_change_never_keeps_a_new_session_template() {
        let dir = tempfile::tempdir().unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        let keeping = |url: &str| {
            let mut spec = specs(&[("g", url)]);
            spec[0].options.keep_identities_on_route_change = true;
            spec
        };
        let change = |kept| {
            vec![RouteChange {
                exit: ExitId::new("g"),
                kept,
            }]
        };
        apply(&book, &keeping("http://u-session-{session}:p@gate:1"), 100);
        let rotated = keeping("http://u-session-{session}:q@gate:1");
        assert_eq!(
            apply(&book, &rotated, 200).1,
            change(true),
            "password rotated"
        );
        let renamed = keeping("http://u-sessid-{session}:q@gate:1");
        assert_eq!(
            apply(&book, &renamed, 300).1,
            change(false),
            "template changed"
        );
        let dropped = keeping("http://u:q@gate:1");
        assert_eq!(
            apply(&book, &dropped, 400).1,
            change(false),
            "placeholder dropped"
        );
        let moved = keeping("http://u:q@gate2:1");
        assert_eq!(
            apply(&book, &moved, 500).1,
            change(true),
            "no session either side"
        );
        // What the book holds of the last: no placeholder.
        let known = book.known.lock().unwrap()["g"].session.clone();
        assert_eq!(known, "none");
    }

    /// The routes an id's identities are kept from, as the book holds them.
    fn kept_from(book: &RouteBook, id: &str) -> Vec<String> {
        book.known.lock().unwrap()[id].kept_from.clone()
    }

    /// A kept change remembers the route it kept identities from, and the
    /// ones that route kept them from; it survives a restart; a change not
    /// kept forgets them all. A route another exit has is never kept.
    #[test]
    fn kept_changes_remember_the_routes_they_kept_identities_from() {
        let dir = tempfile::tempdir().unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        let keeping = |url: &str| {
            let mut spec = specs(&[("a", url), ("b", "http://other:9")]);
            spec[0].options.keep_identities_on_route_change = true;
            spec
        };
        let key = |url: &str| book_route(&keeping(url)[0], &hasher());
        apply(&book, &keeping("http://gate:1"), 100);
        assert!(kept_from(&book, "a").is_empty());
        apply(&book, &keeping("http://gate:2"), 200);
        assert_eq!(kept_from(&book, "a"), [key("http://gate:1")]);
        apply(&book, &keeping("http://gate:3"), 300);
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        assert_eq!(
            kept_from(&book, "a"),
            [key("http://gate:1"), key("http://gate:2")]
        );
        // Back to the first: not kept from itself.
        apply(&book, &keeping("http://gate:1"), 400);
        assert_eq!(
            kept_from(&book, "a"),
            [key("http://gate:2"), key("http://gate:3")]
        );
        let mut unkept = keeping("http://gate:4");
        unkept[0].options.keep_identities_on_route_change = false;
        assert_eq!(apply(&book, &unkept, 500).0[0], Some(500));
        assert!(kept_from(&book, "a").is_empty());

        // b's route, taken by a: a change, kept or not.
        let (_, changes, _) = apply(&book, &keeping("http://other:9"), 600);
        assert_eq!(
            changes,
            [RouteChange {
                exit: ExitId::new("a"),
                kept: false
            }]
        );
        assert!(kept_from(&book, "a").is_empty());
    }

    /// Two exits that swap URLs lead each to the other's IPs: neither
    /// change is kept, whatever the option says.
    #[test]
    fn exits_that_swap_urls_never_keep_their_identities() {
        let dir = tempfile::tempdir().unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        let keeping = |a: &str, b: &str| {
            let mut spec = specs(&[("a", a), ("b", b)]);
            for s in &mut spec {
                s.options.keep_identities_on_route_change = true;
            }
            spec
        };
        apply(&book, &keeping("http://gate:1", "http://gate:2"), 100);
        let (dates, changes, _) = apply(&book, &keeping("http://gate:2", "http://gate:1"), 200);
        assert_eq!(dates, [Some(200), Some(200)]);
        assert!(changes.iter().all(|c| !c.kept), "{changes:?}");

        // Over two reloads: a leaves gate:1 (kept), then b takes it.
        let dir = tempfile::tempdir().unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        apply(&book, &keeping("http://gate:1", "http://gate:2"), 100);
        let (_, changes, _) = apply(&book, &keeping("http://gate:3", "http://gate:2"), 200);
        assert!(changes[0].kept, "{changes:?}");
        let (_, changes, _) = apply(&book, &keeping("http://gate:3", "http://gate:1"), 300);
        assert_eq!(
            changes,
            [RouteChange {
                exit: ExitId::new("b"),
                kept: false
            }]
        );
    }

    #[test]
    fn a_book_that_cannot_be_written_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        apply(&book, &specs(&[("a", "http://gate:1")]), 100);
        // The temporary file's place is taken: the write fails.
        std::fs::create_dir_all(dir.path().join(format!("{ROUTE_FILE}.tmp/x"))).unwrap();
        let moved = specs(&[("a", "http://gate:2")]);
        let mut plan = book.plan(&moved.iter().collect::<Vec<_>>());
        plan.date(200);
        let error = book.commit(&plan).unwrap_err();
        assert!(error.to_string().contains(ROUTE_FILE), "{error}");
        // Still the old route: planned again, it is still a change.
        assert_eq!(
            book.plan(&moved.iter().collect::<Vec<_>>()).changes.len(),
            1
        );
    }

    #[test]
    fn a_fingerprint_change_is_a_change_the_exit_cannot_keep() {
        let dir = tempfile::tempdir().unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        let mut spec = specs(&[("a", "http://gate:1")]);
        assert!(!spec[0].route_key().contains("gate"), "a hash, not the URL");
        apply(&book, &spec, 100);
        spec[0].options.fingerprint = crate::upstream::FingerprintMode::Rustls;
        spec[0].options.keep_identities_on_route_change = true;
        let changed = RouteChange {
            exit: ExitId::new("a"),
            kept: false,
        };
        assert_eq!(
            apply(&book, &spec, 200),
            (vec![Some(200)], vec![changed], true)
        );
    }

    #[test]
    fn a_founding_route_follows_the_route_the_face_and_the_key() {
        let hasher = PinHasher::new([1; 32]);
        let of = |url: &str, mode| {
            let mut spec = ExitSpec::parse("a", url).unwrap();
            spec.options.fingerprint = mode;
            founding_route(&spec, &hasher)
        };
        let base = of("http://u:p@gate:1", FingerprintMode::Mirror);
        assert_eq!(base, of("http://u:p@gate:1", FingerprintMode::Mirror));
        // Another password, host or port: another route, the same face.
        for url in [
            "http://u:q@gate:1",
            "http://u:p@gate2:1",
            "http://u:p@gate:2",
        ] {
            let other = of(url, FingerprintMode::Mirror);
            assert_ne!(other.route, base.route, "{url}");
            assert_eq!(other.face, base.face, "{url}");
        }
        // Another mode: the same route, another face.
        let faces: Vec<RouteHash> = [FingerprintMode::Chrome, FingerprintMode::Rustls]
            .into_iter()
            .map(|mode| {
                let other = of("http://u:p@gate:1", mode);
                assert_eq!(other.route, base.route);
                other.face
            })
            .collect();
        assert!(faces[0] != base.face && faces[1] != base.face && faces[0] != faces[1]);
        // Keyed: another fleet's key gives other hashes.
        let spec = ExitSpec::parse("a", "http://u:p@gate:1").unwrap();
        let elsewhere = founding_route(&spec, &PinHasher::new([2; 32]));
        assert!(elsewhere.route != base.route && elsewhere.face != base.face);
    }

    /// The file holds no value a password guess can be tested against
    /// without the pin key: not the route key (an unkeyed hash of the URL
    /// and its credentials), not the URL. A book written unkeyed is keyed
    /// at its next commit, and its routes and the routes they kept
    /// identities from are the same routes still: no change, and the exit
    /// vouches for the same founding routes.
    #[test]
    fn the_book_holds_routes_keyed_with_the_pin_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = specs(&[("a", "http://u:hunter2@gate:1")]);
        spec[0].options.keep_identities_on_route_change = true;
        let earlier = specs(&[("a", "http://u:hunter1@gate:1")]);
        let file = dir.path().join(ROUTE_FILE);
        let unkeyed = format!(
            r#"{{"a": {{"route": "{}", "face": "mirror", "address": "http://gate:1",
                "changed_ms": 0, "kept_from": ["{}"]}}}}"#,
            spec[0].route_key(),
            earlier[0].route_key()
        );
        std::fs::write(&file, unkeyed).unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        let (dates, changes, dirty) = apply(&book, &spec, 100);
        assert_eq!((dates, changes, dirty), (vec![None], vec![], true));
        let text = std::fs::read_to_string(&file).unwrap();
        for secret in [
            spec[0].route_key(),
            earlier[0].route_key(),
            "hunter".to_owned(),
        ] {
            assert!(!text.contains(&secret), "{secret} in {text}");
        }
        let founded = |spec: &ExitSpec| founding_route(spec, &hasher()).route;
        let plan = book.plan(&spec.iter().collect::<Vec<_>>());
        assert_eq!(&*plan.kept_from("a"), [founded(&earlier[0])]);
        // Written keyed, it is read as it is: nothing to write. A release
        // before this one, which needs the bare route, refuses it.
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        assert_eq!(apply(&book, &spec, 200), (vec![None], vec![], false));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
        assert!(!text.contains("\"route\""), "{text}");
    }

    /// A book read under another pin key (the data directory moved to
    /// another store or fleet) cannot be compared hash for hash: its ids
    /// are taken as new ones, with no change (which would retire every
    /// identity founded before, the fleet's on a shared store) and no
    /// routes kept from; it is written under the new key.
    #[test]
    fn a_book_hashed_with_another_key_is_recorded_afresh() {
        // Development builds wrote a keyed route as `route`, marked
        // `keyed`, without the key: not compared, not keyed again.
        let dir = tempfile::tempdir().unwrap();
        let spec = specs(&[("a", "http://gate:1")]);
        std::fs::write(
            dir.path().join(ROUTE_FILE),
            format!(
                r#"{{"a": {{"route": "{}", "keyed": true, "face": "mirror"}}}}"#,
                book_route(&spec[0], &hasher())
            ),
        )
        .unwrap();
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        assert_eq!(apply(&book, &spec, 100), (vec![None], vec![], true));

        let dir = tempfile::tempdir().unwrap();
        let mut keeping = specs(&[("a", "http://gate:1"), ("b", "http://gate:2")]);
        keeping[0].options.keep_identities_on_route_change = true;
        let book = RouteBook::load(dir.path(), &hasher()).unwrap();
        apply(&book, &keeping, 100);
        keeping[0] = specs(&[("a", "http://gate:3")]).remove(0);
        keeping[0].options.keep_identities_on_route_change = true;
        apply(&book, &keeping, 200);
        assert_eq!(kept_from(&book, "a").len(), 1);

        let other = PinHasher::new([8; 32]);
        let book = RouteBook::load(dir.path(), &other).unwrap();
        let (dates, changes, dirty) = apply(&book, &keeping, 300);
        assert_eq!((dates, changes, dirty), (vec![None, None], vec![], true));
        assert!(kept_from(&book, "a").is_empty());
        // Under the new key from now on: a change is a change again.
        let book = RouteBook::load(dir.path(), &other).unwrap();
        assert_eq!(
            apply(&book, &keeping, 400),
            (vec![None, None], vec![], false)
        );
        let moved = specs(&[("a", "http://gate:3"), ("b", "http://gate:4")]);
        assert_eq!(apply(&book, &moved, 500).0, [None, Some(500)]);
    }

    #[test]
    fn a_book_that_cannot_be_read_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ROUTE_FILE), b"{not json").unwrap();
        let error = RouteBook::load(dir.path(), &hasher()).unwrap_err();
        assert!(error.to_string().contains(ROUTE_FILE), "{error}");
    }
}
