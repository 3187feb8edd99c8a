//! What route each exit id had, remembered in the data directory.
//!
//! Identities refer to their exit by id. When an exit's route changes under
//! its id (another host, port, user name, password or fingerprint mode: as
//! far as pinproxy can tell, another pool of IPs or another face), the
//! identities founded before would go on through wherever the new route
//! leads, their cookies with them. Only the operator knows whether it is the
//! same pool (a renamed gateway, a rotated password), so pinproxy does not
//! guess: each id's route key ([`ExitSpec::route_key`], a hash) is kept in
//! `DATA_DIR/exit-routes.json` and compared at every start and reload, and a
//! change retires the identities founded before it (`exit-changed`, see
//! `routing::lifecycle::ends`), unless the exit sets
//! `keep_identities_on_route_change`. Ids no longer configured stay in the
//! book: one that comes back on another route has changed too.
//!
//! The book is per replica: replicas of a fleet that restart with a changed
//! route each retire the identities founded before their own restart, and
//! a retirement is shared through the store.
//!
//! [`ExitSpec::route_key`]: super::spec::ExitSpec::route_key

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::spec::ExitSpec;
use super::ExitSet;
use crate::identity::ExitId;

/// The file in the data directory that remembers the exits' routes.
pub const ROUTE_FILE: &str = "exit-routes.json";

/// One exit id's route, as remembered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    /// [`ExitSpec::route_key`](super::spec::ExitSpec::route_key).
    route: String,
    /// The route's address without credentials, for messages.
    #[serde(default)]
    address: String,
    /// When the route last changed under the id (Unix ms, 0: never).
    #[serde(default)]
    changed_ms: u64,
}

/// A route that changed under its exit's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    /// The exit.
    pub exit: ExitId,
    /// Whether its identities are kept (`keep_identities_on_route_change`).
    pub kept: bool,
}

/// The exits' remembered routes (see the module doc).
#[derive(Debug)]
pub struct RouteBook {
    path: PathBuf,
    known: Mutex<BTreeMap<String, Remembered>>,
}

impl RouteBook {
    /// The book in `data_dir` (empty when there is none yet). A book that
    /// is there but cannot be read is an error, not an empty book: taken as
    /// empty, a route changed meanwhile would go unnoticed. Blocking: call
    /// it off the runtime.
    pub fn load(data_dir: &Path) -> std::io::Result<RouteBook> {
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
        Ok(RouteBook {
            path,
            known: Mutex::new(known),
        })
    }

    /// Compares the routes of `exits` with the book at `now_ms`: an id not
    /// in the book is taken as it is; a changed route is recorded, with the
    /// time unless the exit keeps its identities; every exit is marked with
    /// its last change ([`Exit::mark_route_changed`]). Returns the changes
    /// found, and whether the book changed (to be saved).
    ///
    /// [`Exit::mark_route_changed`]: super::Exit::mark_route_changed
    pub fn reconcile(&self, exits: &ExitSet, now_ms: u64) -> (Vec<RouteChange>, bool) {
        let specs: Vec<&ExitSpec> = exits.iter().map(|exit| &exit.spec).collect();
        let (dates, changes, dirty) = self.compare(&specs, now_ms);
        for (exit, date) in exits.iter().zip(dates) {
            if let Some(at) = date {
                exit.mark_route_changed(at);
            }
        }
        (changes, dirty)
    }

    /// [`RouteBook::reconcile`] on the specs: each one's last change (if
    /// its route ever changed), the changes found now, whether the book
    /// changed.
    fn compare(
        &self,
        specs: &[&ExitSpec],
        now_ms: u64,
    ) -> (Vec<Option<u64>>, Vec<RouteChange>, bool) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut dates = Vec::with_capacity(specs.len());
        let mut changes = Vec::new();
        let mut dirty = false;
        for spec in specs {
            let route = spec.route_key();
            let address = spec.kind.public_url();
            let entry = known.entry(spec.id.as_str().to_owned()).or_insert_with(|| {
                dirty = true;
                Remembered {
                    route: route.clone(),
                    address: address.clone(),
                    changed_ms: 0,
                }
            });
            if entry.route != route {
                let kept = spec.options.keep_identities_on_route_change;
                if kept {
                    tracing::warn!(
                        exit = %spec.id, was = %entry.address, now = %address,
                        "exit route (URL, credentials or fingerprint mode) changed under the same \
                         id: its identities continue through the new route, as \
                         keep_identities_on_route_change says"
                    );
                } else {
                    entry.changed_ms = now_ms.max(1);
                    tracing::warn!(
                        exit = %spec.id, was = %entry.address, now = %address,
                        "exit route (URL, credentials or fingerprint mode) changed under the same \
                         id: the identities founded on the old route retire (exit-changed), since \
                         the new one may leave from other IPs; set keep_identities_on_route_change \
                         on the exit if it reaches the same IPs"
                    );
                }
                entry.route = route;
                entry.address = address;
                changes.push(RouteChange {
                    exit: spec.id.clone(),
                    kept,
                });
                dirty = true;
            }
            dates.push((entry.changed_ms > 0).then_some(entry.changed_ms));
        }
        (dates, changes, dirty)
    }

    /// Writes the book (atomically, mode 0600). Blocking: call it off the
    /// runtime.
    pub fn save(&self) -> std::io::Result<()> {
        let text = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_vec_pretty(&*known).map_err(std::io::Error::other)?
        };
        crate::fsutil::replace_private(&self.path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(urls: &[(&str, &str)]) -> Vec<ExitSpec> {
        urls.iter()
            .map(|(id, url)| ExitSpec::parse(id, url).unwrap())
            .collect()
    }

    fn compare(
        book: &RouteBook,
        specs: &[ExitSpec],
        now: u64,
    ) -> (Vec<Option<u64>>, Vec<RouteChange>, bool) {
        book.compare(&specs.iter().collect::<Vec<_>>(), now)
    }

    #[test]
    fn a_route_changed_under_its_id_is_dated_once_and_a_kept_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let book = RouteBook::load(dir.path()).unwrap();
        let first = specs(&[("a", "http://u:p@gate:1"), ("b", "http://gate:2")]);
        assert_eq!(
            compare(&book, &first, 100),
            (vec![None, None], vec![], true),
            "new ids"
        );
        book.save().unwrap();

        // Only the password differs: a change. Read again: no new one.
        let second = specs(&[("a", "http://u:q@gate:1"), ("b", "http://gate:2")]);
        let changed = RouteChange {
            exit: ExitId::new("a"),
            kept: false,
        };
        let book = RouteBook::load(dir.path()).unwrap();
        assert_eq!(
            compare(&book, &second, 200),
            (vec![Some(200), None], vec![changed], true)
        );
        book.save().unwrap();
        let book = RouteBook::load(dir.path()).unwrap();
        assert_eq!(
            compare(&book, &second, 300),
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
            compare(&book, &third, 400),
            (vec![Some(200), None], vec![kept], true)
        );

        // Gone and back on another route: a change.
        assert!(!compare(&book, &third[..1], 500).2);
        let fourth = specs(&[("a", "http://u:q@gate:1"), ("b", "http://gate3:2")]);
        assert_eq!(compare(&book, &fourth, 600).0, vec![Some(200), Some(600)]);
    }

    #[test]
    fn the_fingerprint_mode_is_part_of_the_route() {
        let mut spec = ExitSpec::parse("a", "http://gate:1").unwrap();
        let before = spec.route_key();
        spec.options.fingerprint = crate::upstream::FingerprintMode::Rustls;
        assert_ne!(spec.route_key(), before);
        assert!(!before.contains("gate"), "a hash, not the URL");
    }

    #[test]
    fn a_book_that_cannot_be_read_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ROUTE_FILE), b"{not json").unwrap();
        let error = RouteBook::load(dir.path()).unwrap_err();
        assert!(error.to_string().contains(ROUTE_FILE), "{error}");
    }
}
