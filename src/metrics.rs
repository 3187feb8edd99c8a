//! Counters, gauges and histograms, exported in the Prometheus text format
//! by the admin endpoint. One registry per daemon (no global state), so
//! several daemons in one test process do not mix their numbers.
//!
//! Labels are static strings (error codes, reasons, policy names, status
//! classes), exit ids (bounded by the configuration), invalidation rule
//! names (bounded by the configuration) and sites (registrable domains,
//! bounded by `metrics.max_sites`, see [`site`]); never a cookie value, a
//! credential, a path or a full URL.
//!
//! The request path never allocates for a label set it has seen before:
//! exit ids and sites are reference-counted label values ([`LabelValue`]),
//! and each exit's histograms are resolved once ([`ExitInstruments`]).

pub mod site;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::credential::RandomKeys;
use crate::identity::{ExitId, IdentityId};
use site::Sites;

/// Sites labelled by default (`metrics.max_sites`).
pub const DEFAULT_MAX_SITES: usize = 100;
/// Identities whose last status is remembered for the live view; beyond
/// this the memory is cleared and refills from traffic.
const MAX_LAST_STATUS: usize = 65_536;

/// A label value shared by reference: cloning it never allocates.
///
/// It carries a hash of its text, made once: a label set holding it hashes
/// one word for it instead of its text, on every request that counts into
/// a family (the per-request series are looked up by label set). Equal
/// texts have equal hashes, so the map's answers are the same.
#[derive(Clone, Debug)]
pub struct LabelValue {
    text: Arc<str>,
    hash: u64,
}

impl LabelValue {
    /// A label value holding `text`.
    pub fn new(text: &str) -> LabelValue {
        let mut hasher = DefaultHasher::new();
        text.hash(&mut hasher);
        LabelValue {
            text: Arc::from(text),
            hash: hasher.finish(),
        }
    }

    /// The value as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for LabelValue {
    fn eq(&self, other: &LabelValue) -> bool {
        Arc::ptr_eq(&self.text, &other.text) || self.text == other.text
    }
}

impl Eq for LabelValue {}

impl Hash for LabelValue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for LabelValue {
    fn partial_cmp(&self, other: &LabelValue) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LabelValue {
    fn cmp(&self, other: &LabelValue) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.text)
    }
}

/// A label set with one static label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `forwarded`, or the error code.
    pub outcome: &'static str,
}

/// Labelled by a policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Policy {
    /// The policy in force.
    pub policy: &'static str,
}

/// Labelled by an exit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitLabel {
    /// The exit id.
    pub exit: String,
}

/// Labelled by an exit, without allocating.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitValue {
    /// The exit id.
    pub exit: LabelValue,
}

/// Labelled by a kind of fingerprint gap (what the upstream TLS stack could
/// not say: `cipher`, `extension`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GapLabel {
    /// The gap's kind.
    pub kind: &'static str,
}

/// A request, by exit, site and status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteRequest {
    /// The exit id (`none` when the request was not routed).
    pub exit: LabelValue,
    /// The registrable domain, or `other`.
    pub site: LabelValue,
    /// `1xx` ... `5xx` (the origin's answer) or `pinproxy-error`.
    pub status: &'static str,
}

/// An identity created or retired, by exit and reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitReason {
    /// The exit id.
    pub exit: LabelValue,
    /// Created: `request` or `set-cookie`; retired: the retirement reason.
    pub reason: &'static str,
}

/// An answer abandoned because its client did not keep up, by why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AbandonedLabel {
    /// `stall` (`timeouts.client_stall`) or `unread-budget`
    /// (`limits.max_unread_bytes`).
    pub why: &'static str,
}

/// A pin decision, by exit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// The exit id (`none` when the request was not routed).
    pub exit: LabelValue,
    /// `hit`, `new`, `rotated`, `conflict` or `retired`.
    pub decision: &'static str,
}

/// An invalidation, by exit, site and rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvalidationLabel {
    /// The identity's exit.
    pub exit: LabelValue,
    /// The registrable domain, or `other`.
    pub site: LabelValue,
    /// The rule's name.
    pub rule: String,
}

/// What the pin store holds, by state (`pinproxy_store_pins`,
/// `pinproxy_store_identities`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeldState {
    /// `active` (of an identity not retired) or `retired` (remembered for
    /// `identities.remember_retired`).
    pub state: &'static str,
}

/// A pin store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOp {
    /// `memory`, `embedded` or `redis`.
    pub store: &'static str,
    /// The operation (`lookup`, `pin`, `create`, `touch`, ...).
    pub op: &'static str,
}

/// The status class label of an answer: `1xx` ... `5xx`, or
/// [`PINPROXY_ERROR`] for pinproxy's own error answers.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The status class of pinproxy's own error answers.
pub const PINPROXY_ERROR: &str = "pinproxy-error";
/// The status class of a request whose client left before its answer:
/// neither the origin's answer nor pinproxy's.
pub const CLIENT_GONE: &str = "client-gone";
/// Every status class, for removing a site's series.
const STATUS_CLASSES: [&str; 7] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    PINPROXY_ERROR,
    CLIENT_GONE,
];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Upstream connect, TLS and first-byte times: 1 ms to 30 s.
fn upstream_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// Store operations: 25 µs to about 1.6 s.
fn store_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_025, 2.0, 17))
}

/// What one exit's requests update, resolved once per exit.
#[derive(Debug)]
pub struct ExitInstruments {
    /// The exit's label value.
    pub exit: LabelValue,
    /// Transport through the exit: TCP to it and its CONNECT / SOCKS
    /// answer (or TCP to the origin for a direct exit).
    pub connect: Histogram,
    /// TLS handshake with the origin.
    pub tls: Histogram,
    /// TLS handshakes with origins that resumed a session.
    pub tls_resumed: Counter,
    /// From the request handed to a connection to the response head.
    pub ttfb: Histogram,
    /// Requests routed through it (for the live view's rate).
    pub requests: AtomicU64,
    /// Identities created on it.
    pub created: AtomicU64,
    /// Identities retired on it.
    pub retired: AtomicU64,
    /// Its pin decision counters, by [`DECISIONS`] position, resolved in
    /// the family on first use (a hit then costs no label hashing).
    decisions: Decisions,
    /// Its request counters by site, then by [`STATUS_CLASSES`] position,
    /// resolved in the family on first use: the family's lookup hashed the
    /// three labels with SipHash on every request. A site that loses its
    /// label is removed here too ([`Metrics::forget_site`]).
    by_site: DashMap<LabelValue, StatusCounters, foldhash::fast::RandomState>,
}

/// One exit's request counters of one site, by [`STATUS_CLASSES`] position.
type StatusCounters = [OnceLock<Counter>; STATUS_CLASSES.len()];

/// The request outcome of a request pinproxy forwarded and answered.
const FORWARDED: &str = "forwarded";

/// The request outcome of a tunnel closed unrelayed because its TLS hello
/// names a host the intercept policy treats otherwise than its CONNECT
/// host (or, under `mitm.include`, a passed-through hello cannot be read).
pub const TUNNEL_REFUSED: &str = "tunnel-refused";

/// The labels of pin decisions, in the order of a [`Decisions`] table.
pub const DECISIONS: [&str; 5] = ["hit", "new", "rotated", "conflict", "retired"];

/// One label set's pin decision counters, each resolved on first use.
type Decisions = [OnceLock<Counter>; DECISIONS.len()];

/// Timings of one request's trip upstream, where known.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamTimings {
    /// Transport through the exit (a new connection only).
    pub connect: Option<Duration>,
    /// TLS handshake with the origin (a new TLS connection only).
    pub tls: Option<Duration>,
    /// That handshake resumed a session the origin had issued earlier.
    pub tls_resumed: bool,
    /// Request handed to the connection → response head.
    pub ttfb: Option<Duration>,
}

/// Every metric pinproxy keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests handled, by outcome.
    pub requests: Family<Outcome, Counter>,
    /// Requests by exit, site and status class.
    pub exit_requests: Family<SiteRequest, Counter>,
    /// Pin decisions by exit.
    pub pin_decisions: Family<DecisionLabel, Counter>,
    /// Identities created, by exit and how.
    pub identities_created: Family<ExitReason, Counter>,
    /// Identities retired, by exit and reason.
    pub identities_retired: Family<ExitReason, Counter>,
    /// Identities alive (not retired, not ending), by exit: set when
    /// scraped, from a listing of the store.
    pub identities_alive: Family<ExitLabel, Gauge>,
    /// Pins the store holds, by state (from the admin listener's listing).
    pub store_pins: Family<HeldState, Gauge>,
    /// Identities the store holds, by state (likewise).
    pub store_identities: Family<HeldState, Gauge>,
    /// Requests whose credentials belonged to different identities, by policy.
    pub conflicts: Family<Policy, Counter>,
    /// Requests whose fingerprint differed from their identity's, by policy.
    pub fingerprint_drift: Family<Policy, Counter>,
    /// Origin answers that matched an invalidation rule, by exit, site and rule.
    pub invalidations: Family<InvalidationLabel, Counter>,
    /// Exit state: 0 healthy, 1 unhealthy, 2 dead.
    pub exit_state: Family<ExitLabel, Gauge>,
    /// Failures counted against an exit (probes and traffic).
    pub exit_failures: Family<ExitLabel, Counter>,
    /// Identities whose upstream ClientHello left with another JA4 than
    /// their client's, by exit.
    pub fingerprint_mismatches: Family<ExitLabel, Counter>,
    /// Identities whose client's ClientHello had parts the upstream stack
    /// cannot say, by kind of part.
    pub fingerprint_gaps: Family<GapLabel, Counter>,
    /// Requests sent in chrome mode whose User-Agent is not a Chrome's.
    pub chrome_user_agent_mismatches: Counter,
    /// Times the Redis pin store was seen to have lost data.
    pub store_losses: Counter,
    /// Pins written back to the store from this replica's journal.
    pub store_restored_pins: Counter,
    /// Credentials the store had lost and no journal held, answered as
    /// retired (`store-lost`).
    pub store_quarantined: Counter,
    /// Pins two replicas restored to different identities (both retired).
    pub store_conflicts: Counter,
    /// New pins that were not acknowledged by `store.wait_replicas` in time.
    pub store_wait_timeouts: Counter,
    /// Pin lookups answered from the Redis store's hit cache.
    pub store_cache_hits: Counter,
    /// How far Redis's clock reads ahead of this replica's (negative:
    /// behind), in ms, as last measured.
    pub store_clock_offset_ms: Gauge,
    /// Idle HTTP/1.1 connections in tunnels whose HTTP server, with its
    /// buffers, was released until the client's next byte.
    pub client_connections_parked: Counter,
    /// Idle upstream HTTP/1.1 connections whose hyper connection and
    /// buffers were released until their next request.
    pub upstream_connections_parked: Counter,
    /// Requests sent again because the origin closed their idle connection
    /// before answering, or did not process their HTTP/2 stream (refused
    /// it, or left it past the last stream of its `GOAWAY`).
    pub upstream_requests_replayed: Counter,
    /// Answers abandoned because their clients did not keep up.
    pub answers_abandoned: Family<AbandonedLabel, Counter>,
    /// What HTTP/2 answers behind their origins count against
    /// `limits.max_unread_bytes`.
    pub answers_unread_bytes: Gauge,
    /// Upstream transport times, by exit.
    pub upstream_connect: HistogramFamily<ExitValue>,
    /// Upstream TLS handshake times, by exit.
    pub upstream_tls: HistogramFamily<ExitValue>,
    /// Upstream TLS handshakes that resumed an identity's session, by exit.
    pub upstream_tls_resumed: Family<ExitValue, Counter>,
    /// Upstream time to the response head, by exit.
    pub upstream_ttfb: HistogramFamily<ExitValue>,
    /// Time to mint a leaf certificate and its TLS settings.
    pub cert_mint: Histogram,
    /// Leaf certificates cached.
    pub cert_cache_entries: Gauge,
    /// Pin store operation times, by store kind and operation.
    pub store_ops: HistogramFamily<StoreOp>,
    sites: Sites,
    /// Each exit's instruments, looked up once per request. Keyed by exit
    /// ids from the configuration, not by anything a client names, so with
    /// foldhash rather than SipHash.
    exits: DashMap<ExitId, Arc<ExitInstruments>, foldhash::fast::RandomState>,
    none: LabelValue,
    /// Pin decision counters of requests that were not routed.
    none_decisions: Decisions,
    /// The `forwarded` outcome's counter, resolved on first use.
    forwarded: OnceLock<Counter>,
    rules_seen: DashMap<String, ()>,
    /// Read on every request of an identity: keyed by identity ids, random
    /// bits no client chooses, which are their own hash.
    last_status: DashMap<IdentityId, u16, RandomKeys>,
    /// The exits the per-exit gauges were last set for (see
    /// [`Metrics::keep_exit_gauges_of`]).
    gauged_exits: std::sync::Mutex<Vec<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered and the default
    /// number of site labels.
    pub fn new() -> Metrics {
        Metrics::with_max_sites(DEFAULT_MAX_SITES)
    }

    /// A fresh registry giving at most `max_sites` sites a label of their
    /// own (the rest count as `other`).
    pub fn with_max_sites(max_sites: usize) -> Metrics {
        let mut registry = Registry::with_prefix("pinproxy");
        let requests = Family::default();
        registry.register("requests", "Requests handled, by outcome", requests.clone());
        let exit_requests = Family::default();
        registry.register(
            "exit_requests",
            "Requests by exit, site (registrable domain, or other) and status class",
            exit_requests.clone(),
        );
        let pin_decisions = Family::default();
        registry.register(
            "pin_decisions",
            "Pin decisions by exit: hit, new, rotated, conflict, retired",
            pin_decisions.clone(),
        );
        let identities_created = Family::default();
        registry.register(
            "identities_created",
            "Identities created, by exit and how (request, set-cookie)",
            identities_created.clone(),
        );
        let identities_retired = Family::default();
        registry.register(
            "identities_retired",
            "Identities retired, by exit and reason",
            identities_retired.clone(),
        );
        let identities_alive = Family::default();
        registry.register(
            "identities_alive",
            "Identities alive (not retired, not ending), by exit",
            identities_alive.clone(),
        );
        let store_pins = Family::default();
        registry.register(
            "store_pins",
            "Pins the store holds, by the state of their identity: active, or retired (remembered for identities.remember_retired)",
            store_pins.clone(),
        );
        let store_identities = Family::default();
        registry.register(
            "store_identities",
            "Identities the store holds: active (not retired), or retired (remembered for identities.remember_retired)",
            store_identities.clone(),
        );
        let conflicts = Family::default();
        registry.register(
            "pin_conflicts",
            "Requests whose credentials belong to different identities",
            conflicts.clone(),
        );
        let fingerprint_drift = Family::default();
        registry.register(
            "fingerprint_drift",
            "Requests whose client fingerprint differs from their identity's",
            fingerprint_drift.clone(),
        );
        let invalidations = Family::default();
        registry.register(
            "invalidations",
            "Origin answers that matched an invalidation rule, by exit, site and rule",
            invalidations.clone(),
        );
        let exit_state = Family::default();
        registry.register(
            "exit_state",
            "Exit state: 0 healthy, 1 unhealthy, 2 dead",
            exit_state.clone(),
        );
        let exit_failures = Family::default();
        registry.register(
            "exit_failures",
            "Failures counted against an exit",
            exit_failures.clone(),
        );
        let fingerprint_mismatches = Family::default();
        registry.register(
            "fingerprint_mismatches",
            "Identities whose upstream JA4 differs from their client's, by exit",
            fingerprint_mismatches.clone(),
        );
        let fingerprint_gaps = Family::default();
        registry.register(
            "fingerprint_gaps",
            "Identities whose client ClientHello had parts the upstream stack cannot say, by kind",
            fingerprint_gaps.clone(),
        );
        let chrome_user_agent_mismatches = Counter::default();
        registry.register(
            "chrome_user_agent_mismatches",
            "Requests sent with the Chrome profile whose User-Agent is not Chrome's",
            chrome_user_agent_mismatches.clone(),
        );
        let store_losses = Counter::default();
        registry.register(
            "store_losses",
            "Times the Redis pin store was seen to have lost data",
            store_losses.clone(),
        );
        let store_restored_pins = Counter::default();
        registry.register(
            "store_restored_pins",
            "Pins written back to the store from this replica's journal after a loss",
            store_restored_pins.clone(),
        );
        let store_quarantined = Counter::default();
        registry.register(
            "store_quarantined",
            "Credentials the store lost and no journal held, answered as store-lost",
            store_quarantined.clone(),
        );
        let store_conflicts = Counter::default();
        registry.register(
            "store_restore_conflicts",
            "Pins two replicas restored to different identities (both retired)",
            store_conflicts.clone(),
        );
        let store_cache_hits = Counter::default();
        registry.register(
            "store_cache_hits",
            "Pin lookups answered from this replica's hit cache without a round trip (Redis), per credential",
            store_cache_hits.clone(),
        );
        let client_connections_parked = Counter::default();
        registry.register(
            "client_connections_parked",
            "Idle HTTP/1.1 connections in tunnels whose HTTP server and buffers were released until the client's next byte",
            client_connections_parked.clone(),
        );
        let upstream_connections_parked = Counter::default();
        registry.register(
            "upstream_connections_parked",
            "Idle upstream HTTP/1.1 connections whose hyper connection and buffers were released until their next request",
            upstream_connections_parked.clone(),
        );
        let upstream_requests_replayed = Counter::default();
        registry.register(
            "upstream_requests_replayed",
            "Body-less requests sent again (once, or twice when a refused stream's second try then meets a GOAWAY that leaves it out, or the close of a connection that had been idle) because the origin closed their idle connection before any byte of an answer (idempotent methods) or did not process their HTTP/2 stream (REFUSED_STREAM: any method; GOAWAY: idempotent methods)",
            upstream_requests_replayed.clone(),
        );
        let answers_abandoned = Family::<AbandonedLabel, Counter>::default();
        registry.register(
            "answers_abandoned",
            "Answers abandoned (their upstream stream reset or connection closed) because pinproxy could write nothing more of them to their client for timeouts.client_stall (why=stall), or because their client fell behind their origin while others' such answers held limits.max_unread_bytes (why=unread-budget)",
            answers_abandoned.clone(),
        );
        let answers_unread_bytes = Gauge::default();
        registry.register(
            "answers_unread_bytes",
            "What HTTP/2 answers whose clients are slower than their origins (stalled or trickling) count against limits.max_unread_bytes: their upstream stream windows, at most what their connections' windows and their remaining lengths allow",
            answers_unread_bytes.clone(),
        );
        let store_clock_offset_ms = Gauge::default();
        registry.register(
            "store_clock_offset_ms",
            "How far the Redis server's clock reads ahead of this replica's (negative: behind), in ms, as last measured",
            store_clock_offset_ms.clone(),
        );
        let store_wait_timeouts = Counter::default();
        registry.register(
            "store_wait_timeouts",
            "New pins not acknowledged by store.wait_replicas in time",
            store_wait_timeouts.clone(),
        );
        let mut per_exit = |name: &str, help: &str| {
            let family: HistogramFamily<ExitValue> =
                Family::new_with_constructor(upstream_histogram);
            registry.register(name, help, family.clone());
            family
        };
        let upstream_connect = per_exit(
            "upstream_connect_seconds",
            "Transport through the exit (TCP to it and its CONNECT/SOCKS answer), new connections, by exit",
        );
        let upstream_tls = per_exit(
            "upstream_tls_handshake_seconds",
            "TLS handshake with the origin through the exit, new connections, by exit",
        );
        let upstream_ttfb = per_exit(
            "upstream_ttfb_seconds",
            "From the request handed to an upstream connection to the response head, by exit",
        );
        let upstream_tls_resumed = Family::default();
        registry.register(
            "upstream_tls_resumed",
            "TLS handshakes with the origin through the exit that resumed a session the origin had issued to the identity's earlier connection, or to the connection its cookie came on (new connections whose request was answered, as upstream_tls_handshake_seconds counts), by exit",
            upstream_tls_resumed.clone(),
        );
        let cert_mint = Histogram::new(exponential_buckets(0.000_025, 2.0, 14));
        registry.register(
            "cert_mint_seconds",
            "Time to mint a leaf certificate and its TLS settings",
            cert_mint.clone(),
        );
        let cert_cache_entries = Gauge::default();
        registry.register(
            "cert_cache_entries",
            "Leaf certificates cached",
            cert_cache_entries.clone(),
        );
        let store_ops: HistogramFamily<StoreOp> = Family::new_with_constructor(store_histogram);
        registry.register(
            "store_op_seconds",
            "Pin store operation times, by store kind and operation",
            store_ops.clone(),
        );
        Metrics {
            registry,
            requests,
            exit_requests,
            pin_decisions,
            identities_created,
            identities_retired,
            identities_alive,
            store_pins,
            store_identities,
            conflicts,
            fingerprint_drift,
            invalidations,
            exit_state,
            exit_failures,
            fingerprint_mismatches,
            fingerprint_gaps,
            chrome_user_agent_mismatches,
            store_losses,
            store_restored_pins,
            store_quarantined,
            store_conflicts,
            store_wait_timeouts,
            store_cache_hits,
            store_clock_offset_ms,
            client_connections_parked,
            upstream_connections_parked,
            upstream_requests_replayed,
            answers_abandoned,
            answers_unread_bytes,
            upstream_connect,
            upstream_tls,
            upstream_tls_resumed,
            upstream_ttfb,
            cert_mint,
            cert_cache_entries,
            store_ops,
            sites: Sites::new(max_sites),
            exits: DashMap::default(),
            none: LabelValue::new("none"),
            none_decisions: Decisions::default(),
            forwarded: OnceLock::new(),
            rules_seen: DashMap::new(),
            last_status: DashMap::default(),
            gauged_exits: std::sync::Mutex::default(),
        }
    }

    /// Removes the per-exit gauges (`identities_alive`, `exit_state`) of
    /// exits no longer among `current`, the exits the gauges were just set
    /// for: a removed exit's series would keep its last values, and a
    /// dashboard that sums them would count identities and states of exits
    /// long gone.
    pub fn keep_exit_gauges_of(&self, current: Vec<String>) {
        let mut gauged = self
            .gauged_exits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in gauged.iter().filter(|id| !current.contains(id)) {
            let label = ExitLabel { exit: gone.clone() };
            self.identities_alive.remove(&label);
            self.exit_state.remove(&label);
        }
        *gauged = current;
    }

    /// Counts a handled request.
    pub fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&Outcome { outcome }).inc();
    }

    /// Counts a request forwarded and answered: the outcome of nearly every
    /// request, so its counter is resolved once.
    pub fn forwarded(&self) {
        self.forwarded
            .get_or_init(|| {
                self.requests
                    .get_or_create_owned(&Outcome { outcome: FORWARDED })
            })
            .inc();
    }

    /// The instruments of exit `id` (resolved on its first use).
    pub fn exit(&self, id: &ExitId) -> Arc<ExitInstruments> {
        if let Some(found) = self.exits.get(id) {
            return found.clone();
        }
        self.exits
            .entry(id.clone())
            .or_insert_with(|| {
                let exit = LabelValue::new(id.as_str());
                let label = ExitValue { exit: exit.clone() };
                Arc::new(ExitInstruments {
                    connect: self.upstream_connect.get_or_create_owned(&label),
                    tls: self.upstream_tls.get_or_create_owned(&label),
                    tls_resumed: self.upstream_tls_resumed.get_or_create_owned(&label),
                    ttfb: self.upstream_ttfb.get_or_create_owned(&label),
                    exit,
                    requests: AtomicU64::new(0),
                    created: AtomicU64::new(0),
                    retired: AtomicU64::new(0),
                    decisions: Decisions::default(),
                    by_site: DashMap::default(),
                })
            })
            .clone()
    }

    /// The site label of a request to `host` (counted for ranking).
    pub fn site(&self, host: &str) -> LabelValue {
        self.sites.label(host)
    }

    /// As [`Metrics::site`], for a request of a stream to one host whose
    /// site `slot` keeps (a tunnel's).
    pub fn site_in(&self, slot: &site::SiteSlot, host: &str) -> LabelValue {
        self.sites.label_in(slot, host)
    }

    /// Counts a finished request by exit (if routed), site (if known) and
    /// status class.
    pub fn exit_request(
        &self,
        exit: Option<&ExitInstruments>,
        site: Option<&LabelValue>,
        status: &'static str,
    ) {
        let site = site.unwrap_or(&self.none);
        let family = |exit: &LabelValue, site: &LabelValue| SiteRequest {
            exit: exit.clone(),
            site: site.clone(),
            status,
        };
        let Some(exit) = exit else {
            let site = self.live_site(site);
            self.exit_requests
                .get_or_create(&family(&self.none, site))
                .inc();
            return;
        };
        exit.requests.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = STATUS_CLASSES.iter().position(|class| *class == status) else {
            let site = self.live_site(site);
            self.exit_requests
                .get_or_create(&family(&exit.exit, site))
                .inc();
            return;
        };
        let counter = |counters: &StatusCounters, site: &LabelValue| {
            counters[slot]
                .get_or_init(|| {
                    self.exit_requests
                        .get_or_create_owned(&family(&exit.exit, site))
                })
                .inc();
        };
        match exit.by_site.get(site) {
            Some(counters) => counter(&counters, site),
            // A site that lost its label after this request took it counts
            // under `other`: its series were removed, and made again here
            // they would stay for good (a client could grow them without
            // bound by holding requests across re-rankings).
            None => {
                let site = self.live_site(site);
                counter(&exit.by_site.entry(site.clone()).or_default(), site);
            }
        }
    }

    /// `site` if it still has a label of its own (or is `none` or
    /// `other`), else `other`.
    fn live_site<'a>(&'a self, site: &'a LabelValue) -> &'a LabelValue {
        if *site == self.none || self.sites.is_live(site) {
            site
        } else {
            self.sites.other()
        }
    }

    /// Counts a pin decision: `slot` is its position in [`DECISIONS`].
    pub fn pin_decision(&self, exit: Option<&ExitInstruments>, slot: usize) {
        let table = exit.map_or(&self.none_decisions, |e| &e.decisions);
        let Some((counter, &decision)) = table.get(slot).zip(DECISIONS.get(slot)) else {
            return;
        };
        counter
            .get_or_init(|| {
                self.pin_decisions.get_or_create_owned(&DecisionLabel {
                    exit: exit.map_or_else(|| self.none.clone(), |e| e.exit.clone()),
                    decision,
                })
            })
            .inc();
    }

    /// Records the upstream timings of one request through `exit`.
    pub fn upstream(&self, exit: &ExitInstruments, timings: &UpstreamTimings) {
        if let Some(t) = timings.connect {
            exit.connect.observe(t.as_secs_f64());
        }
        if let Some(t) = timings.tls {
            exit.tls.observe(t.as_secs_f64());
        }
        if timings.tls_resumed {
            exit.tls_resumed.inc();
        }
        if let Some(t) = timings.ttfb {
            exit.ttfb.observe(t.as_secs_f64());
        }
    }

    /// Counts an identity created on `exit` (`reason`: `request` or
    /// `set-cookie`).
    pub fn identity_created(&self, exit: &ExitId, reason: &'static str) {
        let exit = self.exit(exit);
        exit.created.fetch_add(1, Ordering::Relaxed);
        self.identities_created
            .get_or_create(&ExitReason {
                exit: exit.exit.clone(),
                reason,
            })
            .inc();
    }

    /// Counts a retirement of an identity of `exit` (once per identity:
    /// see `Router::count_retired`).
    pub fn retired(&self, exit: &ExitId, reason: &'static str) {
        let exit = self.exit(exit);
        exit.retired.fetch_add(1, Ordering::Relaxed);
        self.identities_retired
            .get_or_create(&ExitReason {
                exit: exit.exit.clone(),
                reason,
            })
            .inc();
    }

    /// Counts an invalidation of an identity of `exit` on `site` (`none`
    /// where unknown) by `rule`.
    pub fn invalidated(&self, exit: &ExitId, site: Option<&LabelValue>, rule: &str) {
        if !self.rules_seen.contains_key(rule) {
            self.rules_seen.insert(rule.to_owned(), ());
        }
        let site = site.map_or_else(|| self.none.clone(), |s| self.live_site(s).clone());
        self.invalidations
            .get_or_create(&InvalidationLabel {
                exit: self.exit(exit).exit.clone(),
                site,
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// The histogram of `op` on a store of kind `store`.
    pub fn store_timer(&self, store: &'static str, op: &'static str) -> Histogram {
        self.store_ops.get_or_create_owned(&StoreOp { store, op })
    }

    /// Remembers the last status an identity's request got (live view).
    pub fn note_status(&self, identity: IdentityId, status: u16) {
        match self.last_status.get(&identity).map(|last| *last) {
            Some(last) if last == status => return,
            Some(_) => {
                self.last_status.insert(identity, status);
                return;
            }
            // Counting the entries visits every shard: only for a new
            // identity.
            None => {}
        }
        if self.last_status.len() >= MAX_LAST_STATUS {
            self.last_status.clear();
        }
        self.last_status.insert(identity, status);
    }

    /// The last status an identity's request got, if remembered.
    pub fn last_status(&self, identity: IdentityId) -> Option<u16> {
        self.last_status.get(&identity).map(|s| *s)
    }

    /// The metrics in the Prometheus text format. Site labels are
    /// re-ranked first (at most once a minute, see [`site`]).
    pub fn encode(&self) -> String {
        for evicted in self.sites.rerank(Instant::now()) {
            self.forget_site(&evicted);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Removes the series of a site that lost its label.
    fn forget_site(&self, site: &LabelValue) {
        for exit in self.exits.iter() {
            exit.by_site.remove(site);
        }
        let exits: Vec<LabelValue> = self
            .exits
            .iter()
            .map(|e| e.value().exit.clone())
            .chain(std::iter::once(self.none.clone()))
            .collect();
        let rules: Vec<String> = self.rules_seen.iter().map(|r| r.key().clone()).collect();
        for exit in &exits {
            for status in STATUS_CLASSES {
                self.exit_requests.remove(&SiteRequest {
                    exit: exit.clone(),
                    site: site.clone(),
                    status,
                });
            }
            for rule in &rules {
                self.invalidations.remove(&InvalidationLabel {
                    exit: exit.clone(),
                    site: site.clone(),
                    rule: rule.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_made_apart_find_the_same_series() {
        let family = Family::<SiteRequest, Counter>::default();
        let labels = |exit: &str, site: &str| SiteRequest {
            exit: LabelValue::new(exit),
            site: LabelValue::new(site),
            status: "2xx",
        };
        family.get_or_create(&labels("e1", "a.com")).inc();
        family.get_or_create(&labels("e1", "a.com")).inc();
        family.get_or_create(&labels("e1", "b.com")).inc();
        assert_eq!(family.get_or_create(&labels("e1", "a.com")).get(), 2);
        assert_eq!(family.get_or_create(&labels("e1", "b.com")).get(), 1);
        assert_eq!(family.get_or_create(&labels("e2", "a.com")).get(), 0);
        assert!(LabelValue::new("a") < LabelValue::new("b"));
    }

    #[test]
    fn counters_show_up_in_the_text() {
        let m = Metrics::new();
        m.request("forwarded");
        m.retired(&ExitId::new("res1"), "exit-down");
        let text = m.encode();
        assert!(
            text.contains("pinproxy_requests_total{outcome=\"forwarded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "pinproxy_identities_retired_total{exit=\"res1\",reason=\"exit-down\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn requests_are_labelled_by_exit_site_and_status_class() {
        let m = Metrics::with_max_sites(1);
        let exit = m.exit(&ExitId::new("res1"));
        let site = m.site("www.shop.example.co.uk");
        m.exit_request(Some(&exit), Some(&site), status_class(http::StatusCode::OK));
        let folded = m.site("other.example");
        m.exit_request(Some(&exit), Some(&folded), PINPROXY_ERROR);
        m.exit_request(None, None, PINPROXY_ERROR);
        m.upstream(
            &exit,
            &UpstreamTimings {
                connect: Some(Duration::from_millis(3)),
                tls: None,
                tls_resumed: false,
                ttfb: Some(Duration::from_millis(20)),
            },
        );
        m.upstream(
            &exit,
            &UpstreamTimings {
                connect: Some(Duration::from_millis(3)),
                tls: Some(Duration::from_millis(4)),
                tls_resumed: true,
                ttfb: Some(Duration::from_millis(20)),
            },
        );
        let text = m.encode();
        for line in [
            "pinproxy_exit_requests_total{exit=\"res1\",site=\"example.co.uk\",status=\"2xx\"} 1",
            "pinproxy_exit_requests_total{exit=\"res1\",site=\"other\",status=\"pinproxy-error\"} 1",
            "pinproxy_exit_requests_total{exit=\"none\",site=\"none\",status=\"pinproxy-error\"} 1",
            "pinproxy_upstream_connect_seconds_count{exit=\"res1\"} 2",
            "pinproxy_upstream_ttfb_seconds_count{exit=\"res1\"} 2",
            "pinproxy_upstream_tls_handshake_seconds_count{exit=\"res1\"} 1",
            "pinproxy_upstream_tls_resumed_total{exit=\"res1\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn a_site_that_loses_its_label_loses_its_series() {
        let m = Metrics::with_max_sites(1);
        let exit = m.exit(&ExitId::new("e"));
        let site = m.site("a.com");
        m.exit_request(Some(&exit), Some(&site), "2xx");
        m.invalidated(&ExitId::new("e"), Some(&site), "datadome-challenge");
        // b.com, busier, takes a.com's place at the next re-ranking.
        for _ in 0..=site::MIN_PROMOTION {
            m.site("b.com");
        }
        let later = std::time::Instant::now() + site::RERANK_INTERVAL;
        for lost in m.sites.rerank(later) {
            m.forget_site(&lost);
        }
        let text = m.encode();
        assert!(!text.contains("a.com"), "{text}");
        // Requests that took the label before it was lost count under
        // `other`: their series are not made again (they would stay for
        // good).
        m.exit_request(Some(&exit), Some(&site), "2xx");
        m.exit_request(Some(&exit), Some(&site), "2xx");
        m.exit_request(None, Some(&site), "5xx");
        m.exit_request(Some(&exit), Some(&site), "tunnel");
        m.invalidated(&ExitId::new("e"), Some(&site), "datadome-challenge");
        let text = m.encode();
        assert!(!text.contains("a.com"), "{text}");
        let line = "pinproxy_exit_requests_total{exit=\"e\",site=\"other\",status=\"2xx\"} 2";
        assert!(text.contains(line), "{line} missing from\n{text}");
    }

    #[test]
    fn last_status_is_remembered_per_identity() {
        let m = Metrics::new();
        m.note_status(IdentityId(7), 200);
        m.note_status(IdentityId(7), 403);
        assert_eq!(m.last_status(IdentityId(7)), Some(403));
        assert_eq!(m.last_status(IdentityId(8)), None);
    }
}
