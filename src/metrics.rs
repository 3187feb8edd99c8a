//! Counters and gauges, exported in the Prometheus text format by the admin
//! endpoint. One registry per daemon (no global state), so several daemons
//! in one test process do not mix their numbers.
//!
//! Labels are static strings (error codes, reasons, policy names) or exit
//! ids, never cookie values.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A label set with one static label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `forwarded`, or the error code.
    pub outcome: &'static str,
}

/// Labelled by a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The reason label.
    pub reason: &'static str,
}

/// Labelled by a policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Policy {
    /// The policy in force.
    pub policy: &'static str,
}

/// Labelled by an invalidation rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rule {
    /// The rule's name.
    pub rule: String,
}

/// Labelled by an exit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitLabel {
    /// The exit id.
    pub exit: String,
}

/// Labelled by a kind of fingerprint gap (what the upstream TLS stack could
/// not say: `cipher`, `extension`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GapLabel {
    /// The gap's kind.
    pub kind: &'static str,
}

/// Every metric pinproxy keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests handled, by outcome.
    pub requests: Family<Outcome, Counter>,
    /// Identities created.
    pub identities_created: Counter,
    /// Identities retired, by reason.
    pub identities_retired: Family<Reason, Counter>,
    /// Requests whose credentials belonged to different identities, by policy.
    pub conflicts: Family<Policy, Counter>,
    /// Requests whose fingerprint differed from their identity's, by policy.
    pub fingerprint_drift: Family<Policy, Counter>,
    /// Origin answers that matched an invalidation rule, by rule.
    pub invalidations: Family<Rule, Counter>,
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
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pinproxy");
        let requests = Family::default();
        registry.register("requests", "Requests handled, by outcome", requests.clone());
        let identities_created = Counter::default();
        registry.register(
            "identities_created",
            "Identities created",
            identities_created.clone(),
        );
        let identities_retired = Family::default();
        registry.register(
            "identities_retired",
            "Identities retired, by reason",
            identities_retired.clone(),
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
            "Origin answers that matched an invalidation rule",
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
        let store_wait_timeouts = Counter::default();
        registry.register(
            "store_wait_timeouts",
            "New pins not acknowledged by store.wait_replicas in time",
            store_wait_timeouts.clone(),
        );
        Metrics {
            registry,
            store_losses,
            store_restored_pins,
            store_quarantined,
            store_conflicts,
            store_wait_timeouts,
            fingerprint_mismatches,
            fingerprint_gaps,
            chrome_user_agent_mismatches,
            requests,
            identities_created,
            identities_retired,
            conflicts,
            fingerprint_drift,
            invalidations,
            exit_state,
            exit_failures,
        }
    }

    /// Counts a handled request.
    pub fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&Outcome { outcome }).inc();
    }

    /// Counts a retirement.
    pub fn retired(&self, reason: &'static str) {
        self.identities_retired
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_up_in_the_text() {
        let m = Metrics::new();
        m.request("forwarded");
        m.retired("exit-down");
        let text = m.encode();
        assert!(
            text.contains("pinproxy_requests_total{outcome=\"forwarded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pinproxy_identities_retired_total{reason=\"exit-down\"} 1"),
            "{text}"
        );
    }
}
