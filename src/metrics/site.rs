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
//! site. Requests in a tunnel all go to its one host: a [`SiteSlot`] keeps
//! the site found for the first of them, and the rest cost one atomic add.
//!
//! A label is a host name part only: never a path, a query or a port.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// Lost its place at a re-ranking: slots holding it look again.
    evicted: AtomicBool,
}

impl Labelled {
    fn new(label: LabelValue, window: u64) -> Arc<Labelled> {
        Arc::new(Labelled {
            label,
            window: AtomicU64::new(window),
            evicted: AtomicBool::new(false),
        })
    }
}

/// The labelled site of a stream of requests to one host (a tunnel's),
/// found once: later requests count against it without the suffix lookup
/// and the map. Empty while the host's site has no label of its own (each
/// request then looks again, so a site promoted later is found); a site
/// that loses its label sends the slot's requests back to the full lookup.
#[derive(Debug, Default, Clone)]
pub struct SiteSlot(OnceLock<Arc<Labelled>>);

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
        self.labelled_site(host)
            .map_or_else(|| self.other.clone(), |labelled| labelled.label.clone())
    }

    /// As [`Sites::label`], for a request to `host` of those `slot` keeps
    /// the site of (all of them to `host`).
    pub fn label_in(&self, slot: &SiteSlot, host: &str) -> LabelValue {
        if let Some(labelled) = slot.0.get() {
            if !labelled.evicted.load(Ordering::Relaxed) {
                labelled.window.fetch_add(1, Ordering::Relaxed);
                return labelled.label.clone();
            }
            return self.label(host);
        }
        match self.labelled_site(host) {
            Some(labelled) => {
                let label = labelled.label.clone();
                let _ = slot.0.set(labelled);
                label
            }
            None => self.other.clone(),
        }
    }

    /// The labelled site of `host`, if it has one (or is given one now),
    /// counting the request; otherwise the request counts for its site as
    /// a candidate.
    fn labelled_site(&self, host: &str) -> Option<Arc<Labelled>> {
        let site = registrable(host);
        if let Some(labelled) = self.labelled.get(site.as_ref()) {
            labelled.window.fetch_add(1, Ordering::Relaxed);
            return Some(labelled.clone());
        }
        if self.labelled_count.load(Ordering::Relaxed) < self.max {
            if let Some(labelled) = self.admit(&site) {
                return Some(labelled);
            }
        }
        self.count_candidate(&site);
        None
    }

    /// Gives `site` a label if there is room.
    fn admit(&self, site: &str) -> Option<Arc<Labelled>> {
        match self.labelled.entry(site.into()) {
            dashmap::Entry::Occupied(entry) => {
                entry.get().window.fetch_add(1, Ordering::Relaxed);
                Some(entry.get().clone())
            }
            dashmap::Entry::Vacant(entry) => {
                if self.labelled_count.fetch_add(1, Ordering::Relaxed) >= self.max {
                    self.labelled_count.fetch_sub(1, Ordering::Relaxed);
                    return None;
                }
                let labelled = Labelled::new(LabelValue::new(site), 1);
                entry.insert(labelled.clone());
                Some(labelled)
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
                old.evicted.store(true, Ordering::Relaxed);
                evicted.push(old.label.clone());
            }
            let label = LabelValue::new(&candidate);
            self.labelled.insert(candidate, Labelled::new(label, 0));
        }
        evicted
    }

    /// Whether `label` is a site's label now (or `other`): a label taken
    /// before a re-ranking may have lost its place since.
    pub fn is_live(&self, label: &LabelValue) -> bool {
        label.as_str() == OTHER || self.labelled.contains_key(label.as_str())
    }

    /// The label of the sites without one.
    pub fn other(&self) -> &LabelValue {
        &self.other
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
    fn a_slot_keeps_its_site_until_the_site_loses_its_label() {
        let sites = Sites::new(1);
        let start = Instant::now();
        let (slot, unlabelled) = (SiteSlot::default(), SiteSlot::default());
        for _ in 0..3 {
            assert_eq!(sites.label_in(&slot, "www.a.com").as_str(), "a.com");
        }
        assert!(slot.0.get().is_some());
        // Requests through a slot count for the ranking like any other.
        for _ in 0..30 {
            assert_eq!(sites.label_in(&unlabelled, "b.com").as_str(), OTHER);
        }
        assert!(unlabelled.0.get().is_none(), "no label, nothing kept");
        let evicted = sites.rerank(start + RERANK_INTERVAL * 2);
        assert_eq!(
            evicted.iter().map(|l| l.as_str()).collect::<Vec<_>>(),
            ["a.com"],
            "3 requests of a.com against 30 of b.com"
        );
        // The evicted site's slot looks again; the promoted one is found.
        assert_eq!(sites.label_in(&slot, "www.a.com").as_str(), OTHER);
        assert_eq!(sites.label_in(&unlabelled, "b.com").as_str(), "b.com");
        assert!(unlabelled.0.get().is_some());
    }

    #[test]
    fn no_site_labels_when_max_is_zero() {
        let sites = Sites::new(0);
        assert_eq!(sites.label("a.com").as_str(), OTHER);
    }
}
