//! The `site` label: the registrable domain of an origin (`shop.example.co.uk`
//! for `www.shop.example.co.uk`, by the public suffix list compiled into the
//! `psl` crate; no network), bounded to `max_sites` labelled sites.
//!
//! Which sites get a label of their own: the first `max_sites` seen fill the
//! table; after that, sites without a label count under `other` and, in a
//! bounded candidate table, by name. At most once a minute (when metrics are
//! scraped) the busiest candidate replaces the quietest labelled site if it
//! had more than twice its requests since the last re-ranking (and at least
//! [`MIN_PROMOTION`]); the replaced site's series are removed and it counts
//! under `other` from then on. Per request this costs one suffix lookup, one
//! sharded map lookup and one atomic add, and never allocates for a labelled
//! site.
//!
//! A label is a host name part only: never a path, a query or a port.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::LabelValue;

/// The label of every site beyond the labelled ones.
pub const OTHER: &str = "other";
/// How often the labelled sites are re-ranked against the candidates.
pub const RERANK_INTERVAL: Duration = Duration::from_secs(60);
/// Requests a candidate needs within one ranking window to be promoted.
pub const MIN_PROMOTION: u64 = 10;
/// Candidates counted per labelled site (bounds the candidate table).
const CANDIDATES_PER_SITE: usize = 4;

/// The registrable domain of `host`: the public suffix plus one label,
/// lowercased; the host itself for IP literals and for names that have no
/// registrable part (`localhost`, a bare suffix).
pub fn registrable(host: &str) -> Cow<'_, str> {
    let host = host.trim_end_matches('.');
    if host.parse::<IpAddr>().is_ok() {
        return Cow::Borrowed(host);
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        let lower = host.to_ascii_lowercase();
        let domain = psl::domain_str(&lower).unwrap_or(&lower).to_owned();
        return Cow::Owned(domain);
    }
    Cow::Borrowed(psl::domain_str(host).unwrap_or(host))
}

/// A site with a label of its own.
#[derive(Debug)]
struct Labelled {
    label: LabelValue,
    /// Requests since the last re-ranking.
    window: AtomicU64,
}

/// The bounded table of site labels.
#[derive(Debug)]
pub struct Sites {
    max: usize,
    labelled: DashMap<Box<str>, Arc<Labelled>>,
    labelled_count: AtomicUsize,
    candidates: DashMap<Box<str>, AtomicU64>,
    candidate_count: AtomicUsize,
    other: LabelValue,
    last_rerank: Mutex<Instant>,
}

impl Sites {
    /// A table giving at most `max` sites a label of their own.
    pub fn new(max: usize) -> Sites {
        Sites {
            max,
            labelled: DashMap::new(),
            labelled_count: AtomicUsize::new(0),
            candidates: DashMap::new(),
            candidate_count: AtomicUsize::new(0),
            other: LabelValue::new(OTHER),
            last_rerank: Mutex::new(Instant::now()),
        }
    }

    /// The label for a request to `host`, counting the request.
    pub fn label(&self, host: &str) -> LabelValue {
        let site = registrable(host);
        if let Some(labelled) = self.labelled.get(site.as_ref()) {
            labelled.window.fetch_add(1, Ordering::Relaxed);
            return labelled.label.clone();
        }
        if self.labelled_count.load(Ordering::Relaxed) < self.max {
            if let Some(label) = self.admit(&site) {
                return label;
            }
        }
        self.count_candidate(&site);
        self.other.clone()
    }

    /// Gives `site` a label if there is room.
    fn admit(&self, site: &str) -> Option<LabelValue> {
        match self.labelled.entry(site.into()) {
            dashmap::Entry::Occupied(entry) => {
                entry.get().window.fetch_add(1, Ordering::Relaxed);
                Some(entry.get().label.clone())
            }
            dashmap::Entry::Vacant(entry) => {
                if self.labelled_count.fetch_add(1, Ordering::Relaxed) >= self.max {
                    self.labelled_count.fetch_sub(1, Ordering::Relaxed);
                    return None;
                }
                let label = LabelValue::new(site);
                entry.insert(Arc::new(Labelled {
                    label: label.clone(),
                    window: AtomicU64::new(1),
                }));
                Some(label)
            }
        }
    }

    fn count_candidate(&self, site: &str) {
        if let Some(count) = self.candidates.get(site) {
            count.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let limit = self.max.saturating_mul(CANDIDATES_PER_SITE).max(16);
        if self.candidate_count.load(Ordering::Relaxed) >= limit {
            return;
        }
        if let dashmap::Entry::Vacant(entry) = self.candidates.entry(site.into()) {
            self.candidate_count.fetch_add(1, Ordering::Relaxed);
            entry.insert(AtomicU64::new(1));
        }
    }

    /// Re-ranks when [`RERANK_INTERVAL`] has passed since the last time
    /// (`now` is the caller's clock); returns the labels that lost their
    /// place, whose series the caller removes.
    pub fn rerank(&self, now: Instant) -> Vec<LabelValue> {
        {
            let mut last = self.last_rerank.lock().unwrap_or_else(|e| e.into_inner());
            if now.saturating_duration_since(*last) < RERANK_INTERVAL {
                return Vec::new();
            }
            *last = now;
        }
        let mut quiet: Vec<(Box<str>, u64)> = self
            .labelled
            .iter()
            .map(|e| (e.key().clone(), e.value().window.swap(0, Ordering::Relaxed)))
            .collect();
        quiet.sort_by_key(|(_, n)| *n);
        let mut busy: Vec<(Box<str>, u64)> = self
            .candidates
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect();
        busy.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        self.candidates.clear();
        self.candidate_count.store(0, Ordering::Relaxed);

        let mut evicted = Vec::new();
        for ((candidate, requests), (site, site_requests)) in busy.into_iter().zip(quiet) {
            if requests < MIN_PROMOTION || requests <= site_requests.saturating_mul(2) {
                break;
            }
            if let Some((_, old)) = self.labelled.remove(&site) {
                evicted.push(old.label.clone());
            }
            let label = LabelValue::new(&candidate);
            self.labelled.insert(
                candidate,
                Arc::new(Labelled {
                    label,
                    window: AtomicU64::new(0),
                }),
            );
        }
        evicted
    }

    /// The labelled sites now.
    pub fn labelled(&self) -> Vec<String> {
        self.labelled.iter().map(|e| e.key().to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrable_domains_follow_the_public_suffix_list() {
        assert_eq!(registrable("www.shop.example.co.uk"), "example.co.uk");
        assert_eq!(registrable("api.Example.COM"), "example.com");
        assert_eq!(registrable("a.b.github.io"), "b.github.io");
        assert_eq!(registrable("origin.test"), "origin.test");
        assert_eq!(registrable("localhost"), "localhost");
        assert_eq!(registrable("127.0.0.1"), "127.0.0.1");
        assert_eq!(registrable("::1"), "::1");
        assert_eq!(registrable("example.com."), "example.com");
    }

    #[test]
    fn the_first_sites_get_labels_and_the_rest_fold_into_other() {
        let sites = Sites::new(2);
        assert_eq!(sites.label("www.a.com").as_str(), "a.com");
        assert_eq!(sites.label("b.com").as_str(), "b.com");
        assert_eq!(sites.label("img.a.com").as_str(), "a.com");
        assert_eq!(sites.label("c.com").as_str(), OTHER);
        let mut labelled = sites.labelled();
        labelled.sort();
        assert_eq!(labelled, ["a.com", "b.com"]);
    }

    #[test]
    fn a_busy_folded_site_replaces_the_quietest_one() {
        let sites = Sites::new(2);
        let start = Instant::now();
        sites.label("a.com");
        sites.label("b.com");
        for _ in 0..5 {
            sites.label("a.com");
        }
        for _ in 0..30 {
            sites.label("c.com");
        }
        // Not yet: ranking waits for its interval.
        assert!(sites.rerank(start).is_empty());
        let evicted = sites.rerank(start + RERANK_INTERVAL * 2);
        assert_eq!(
            evicted.iter().map(|l| l.as_str()).collect::<Vec<_>>(),
            ["b.com"]
        );
        assert_eq!(sites.label("c.com").as_str(), "c.com");
        assert_eq!(sites.label("b.com").as_str(), OTHER);
        // A candidate with few requests never displaces anyone.
        sites.label("d.com");
        assert!(sites.rerank(start + RERANK_INTERVAL * 4).is_empty());
    }

    #[test]
    fn no_site_labels_when_max_is_zero() {
        let sites = Sites::new(0);
        assert_eq!(sites.label("a.com").as_str(), OTHER);
    }
}
