//! Bounds on every duration a config file gives.
//!
//! `humantime` reads anything up to `u64::MAX` seconds, so a slip such as
//! `connect = "10y"` for `"10s"` parses. Such a value is worse than a long
//! wait: a deadline is an `Instant` plus the setting, which panics past
//! the clock's range, pin lifetimes become Redis expiries Redis refuses,
//! and an interval of zero turns a background loop into a busy one. So
//! every duration is checked once here, at load and on every reload, and a
//! bad one is refused with its key, its value and the range it must be in.

use std::time::Duration;

use humantime_serde::re::humantime::format_duration;

use super::{Config, ConfigError};

/// Longest wait a timeout may name: past any real connect, handshake or
/// response, and short enough to catch a unit slip.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Longest time an identity, a pin or a retired credential may be kept:
/// far past any cookie's life, yet small enough that every deadline and
/// store expiry built from it stays in range.
/// (Ten of `humantime`'s years of 365.25 days, so it prints as `10years`.)
pub const MAX_RETENTION: Duration = Duration::from_secs(10 * 31_557_600);

/// How a setting's duration is bounded.
#[derive(Clone, Copy)]
enum Bound {
    /// A wait: zero allowed, at most [`MAX_TIMEOUT`].
    Wait,
    /// The period of a background loop: positive, at most [`MAX_TIMEOUT`].
    Period,
    /// A retention time: zero allowed, at most [`MAX_RETENTION`].
    Retention,
}

impl Bound {
    fn check(self, key: &str, value: Duration) -> Result<(), ConfigError> {
        let (max, positive) = match self {
            Bound::Wait => (MAX_TIMEOUT, false),
            Bound::Period => (MAX_TIMEOUT, true),
            Bound::Retention => (MAX_RETENTION, false),
        };
        if positive && value.is_zero() {
            return Err(ConfigError::Limit(format!(
                "{key} must be positive (it is the period of a background loop)"
            )));
        }
        if value > max {
            return Err(ConfigError::Limit(format!(
                "{key} = \"{}\" is too long: at most \"{}\" (a unit slip such as \"10y\" for \"10s\"?)",
                format_duration(value),
                format_duration(max),
            )));
        }
        Ok(())
    }
}

/// Checks every duration in `config` against its bound.
pub(super) fn check(config: &Config) -> Result<(), ConfigError> {
    let t = &config.timeouts;
    let i = &config.identities;
    let h = &config.health;
    let s = &config.store;
    // Zero would turn the slowloris bounds off.
    if t.header_read.is_zero() || t.client_idle.is_zero() {
        return Err(ConfigError::Limit(
            "timeouts.header_read and timeouts.client_idle must be positive".into(),
        ));
    }
    // Its watcher looks once a second: a shorter limit could not be kept.
    if !t.client_stall.is_zero() && t.client_stall < crate::upstream::unread::GRACE {
        return Err(ConfigError::Limit(format!(
            "timeouts.client_stall = {:?} is too short: it must be 0s (never) or at least 1s",
            t.client_stall
        )));
    }
    let settings = [
        ("timeouts.header_read", t.header_read, Bound::Wait),
        ("timeouts.client_idle", t.client_idle, Bound::Wait),
        ("timeouts.connect", t.connect, Bound::Wait),
        ("timeouts.response_head", t.response_head, Bound::Wait),
        ("timeouts.pool_idle", t.pool_idle, Bound::Wait),
        ("timeouts.tls_handshake", t.tls_handshake, Bound::Wait),
        ("timeouts.relay_idle", t.relay_idle, Bound::Wait),
        ("timeouts.client_stall", t.client_stall, Bound::Wait),
        ("timeouts.shutdown", t.shutdown, Bound::Wait),
        ("identities.idle_timeout", i.idle_timeout, Bound::Retention),
        ("identities.max_lifetime", i.max_lifetime, Bound::Retention),
        (
            "identities.remember_retired",
            i.remember_retired,
            Bound::Retention,
        ),
        ("identities.sweep_interval", i.sweep_interval, Bound::Period),
        ("identities.queue_timeout", i.queue_timeout, Bound::Wait),
        ("identities.min_interval", i.min_interval, Bound::Wait),
        (
            "identities.max_pacing_delay",
            i.max_pacing_delay,
            Bound::Wait,
        ),
        ("health.interval", h.interval, Bound::Period),
        ("health.retry_interval", h.retry_interval, Bound::Wait),
        ("store.loss_quarantine", s.loss_quarantine, Bound::Retention),
        ("store.wait_timeout", s.wait_timeout, Bound::Wait),
        ("store.hit_cache", s.hit_cache, Bound::Wait),
    ];
    for (key, value, bound) in settings {
        bound.check(key, value)?;
    }
    // Redis's `WAIT` reads a timeout of 0 ms as "wait forever", and the
    // milliseconds sent are whole: a shorter wait would block every new
    // pin until the replicas answered.
    if s.wait_replicas > 0 && s.wait_timeout < Duration::from_millis(1) {
        return Err(ConfigError::Limit(
            "store.wait_timeout must be at least 1ms when store.wait_replicas is set \
             (Redis's WAIT reads 0 as wait forever)"
                .into(),
        ));
    }
    for exit in &config.exits {
        let per_exit = [
            ("sticky_ttl", exit.sticky_ttl),
            ("idle_timeout", exit.idle_timeout),
            ("max_lifetime", exit.max_lifetime),
        ];
        for (name, value) in per_exit {
            if let Some(value) = value {
                Bound::Retention.check(&format!("exit {:?}: {name}", exit.id), value)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<(), String> {
        let config = Config::from_toml(text).map_err(|e| e.to_string())?;
        config.validate().map(drop).map_err(|e| e.to_string())
    }

    #[test]
    fn a_timeout_past_the_clock_is_refused_with_its_key_and_range() {
        let error = load("[timeouts]\nconnect = \"500000000000y\"").unwrap_err();
        assert!(error.contains("timeouts.connect"), "{error}");
        assert!(error.contains("at most \"1day\""), "{error}");
    }

    /// The stall limit is never or a second at least (its watcher looks
    /// once a second).
    #[test]
    fn a_stall_limit_under_a_second_is_refused() {
        assert!(load("[timeouts]\nclient_stall = \"0s\"").is_ok());
        assert!(load("[timeouts]\nclient_stall = \"1s\"").is_ok());
        let error = load("[timeouts]\nclient_stall = \"500ms\"").unwrap_err();
        assert!(error.contains("timeouts.client_stall"), "{error}");
    }

    #[test]
    fn every_bound_admits_its_edge_and_refuses_past_it() {
        assert!(load("[timeouts]\nresponse_head = \"24h\"").is_ok());
        assert!(load("[timeouts]\nresponse_head = \"24h 1s\"").is_err());
        assert!(load("[identities]\nremember_retired = \"10y\"").is_ok());
        let error = load("[identities]\nremember_retired = \"10y 1s\"").unwrap_err();
        assert!(error.contains("at most \"10years\""), "{error}");
        assert!(error.contains("identities.remember_retired"), "{error}");
        assert!(load("[store]\nloss_quarantine = \"100y\"").is_err());
        assert!(load("[identities]\nmin_interval = \"0s\"").is_ok());
    }

    #[test]
    fn a_background_loop_needs_a_positive_period() {
        let error = load("[identities]\nsweep_interval = \"0s\"").unwrap_err();
        assert!(
            error.contains("identities.sweep_interval must be positive"),
            "{error}"
        );
        assert!(load("[health]\ninterval = \"0s\"").is_err());
    }

    #[test]
    fn a_replica_wait_needs_a_timeout_redis_reads_as_one() {
        let error = load("[store]\nwait_replicas = 1\nwait_timeout = \"0s\"").unwrap_err();
        assert!(
            error.contains("store.wait_timeout must be at least 1ms"),
            "{error}"
        );
        assert!(load("[store]\nwait_replicas = 1\nwait_timeout = \"999us\"").is_err());
        assert!(load("[store]\nwait_replicas = 1\nwait_timeout = \"1ms\"").is_ok());
        // Without replicas to wait for, the timeout is not sent.
        assert!(load("[store]\nwait_timeout = \"0s\"").is_ok());
    }

    #[test]
    fn an_exit_override_is_named_by_its_exit() {
        let text = "[[exits]]\nid = \"a\"\nurl = \"direct://\"\nmax_lifetime = \"20y\"";
        let error = load(text).unwrap_err();
        assert!(error.contains("exit \"a\": max_lifetime"), "{error}");
    }

    #[test]
    fn the_defaults_are_in_range() {
        assert!(check(&Config::default()).is_ok());
    }
}
