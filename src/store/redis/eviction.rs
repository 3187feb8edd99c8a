//! What `INFO` tells of the server: its version (checked once, at start)
//! and its evictions.
//!
//! Noticing evictions: a Redis whose `maxmemory-policy` lets it drop keys
//! under memory pressure can drop pins while the namespace's epoch and
//! sequence (which have no time to live) stay, so the generation alone
//! never shows it. The server counts what it evicted (`INFO`'s
//! `evicted_keys`, readable where `CONFIG` is refused, as on managed
//! services); a count that grows on the same server is taken as a loss,
//! and so is any count on a server newly taken over (see
//! [`EvictionWatch::observe`]).
//! It counts every key the server evicted, pinproxy's or not: a server
//! that evicts anything may have evicted pins, and the restore and
//! quarantine that follow are what a loss calls for.

use std::sync::Mutex;

use crate::store::{StoreError, StoreErrorKind};

/// The oldest Redis pinproxy runs on: its scripts use `SET ... PXAT`
/// (6.2) and `KEEPTTL` (6.0), and its tests run on 7.
pub const MIN_VERSION: (u32, u32) = (6, 2);

/// How many servers' last readings are kept (a Sentinel group or a
/// cluster's failovers move between a few).
const SERVERS_KEPT: usize = 8;

/// What the last readings showed: each server seen (its `run_id`, new at
/// every start) and how many keys it had evicted, the latest last.
#[derive(Debug, Default)]
pub(super) struct EvictionWatch {
    last: Mutex<Vec<(String, u64)>>,
}

impl EvictionWatch {
    /// Takes the first reading; whether `info` holds what is watched.
    pub(super) fn baseline(&self, info: &str) -> bool {
        let readable = parse(info).is_some();
        self.observe(info);
        readable
    }

    /// Takes a reading of `INFO` (`info`): the keys evicted since the last
    /// reading of the same server, if any. A server read before (a
    /// failover back, a moment on the demoted primary) is compared with
    /// its own last reading. One never read before (a failover to it) is a
    /// loss if it has evicted anything and still may (its
    /// `maxmemory-policy` is not `noeviction`): what the change itself
    /// lost, the generation shows, but not what the new primary evicted
    /// once it took over (a replica promoted with more data than its
    /// `maxmemory` evicts at once, since replicas ignore it by default),
    /// and its count cannot tell when. The first reading of all is a
    /// baseline. A restarted server counts from 0.
    pub(super) fn observe(&self, info: &str) -> Option<u64> {
        let (server, evicted) = parse(info)?;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let first_reading = last.is_empty();
        let seen = last.iter().position(|(id, _)| *id == server);
        let grown = match seen.and_then(|at| last.get(at)) {
            Some((_, before)) => evicted.checked_sub(*before).filter(|grown| *grown > 0),
            None if first_reading => None,
            None => {
                let may_evict = field(info, "maxmemory_policy") != Some("noeviction");
                Some(evicted).filter(|evicted| *evicted > 0 && may_evict)
            }
        };
        if let Some(at) = seen {
            last.remove(at);
        }
        if last.len() >= SERVERS_KEPT {
            last.remove(0);
        }
        last.push((server, evicted));
        grown
    }
}

/// Refuses a server older than [`MIN_VERSION`]; one whose `INFO` names no
/// version (a proxy in front of Redis, say) is taken as it is.
pub(super) fn check_version(info: &str) -> Result<(), StoreError> {
    let Some(version) = field(info, "redis_version") else {
        return Ok(());
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found >= MIN_VERSION {
        return Ok(());
    }
    Err(StoreError::new(
        StoreErrorKind::Protocol,
        format!(
            "Redis {version} is older than {}.{}, which pinproxy's scripts need (a restore after \
             a loss would fail): upgrade Redis",
            MIN_VERSION.0, MIN_VERSION.1
        ),
    ))
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// `run_id` and `evicted_keys` from an `INFO` answer.
fn parse(info: &str) -> Option<(String, u64)> {
    let server = field(info, "run_id")?.to_owned();
    let evicted = field(info, "evicted_keys")?.parse().ok()?;
    Some((server, evicted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(run_id: &str, evicted: u64) -> String {
        info_with_policy(run_id, evicted, "allkeys-lru")
    }

    fn info_with_policy(run_id: &str, evicted: u64, policy: &str) -> String {
        format!("# Server\r\nredis_version:7.0.15\r\nrun_id:{run_id}\r\n# Memory\r\nmaxmemory_policy:{policy}\r\n# Stats\r\nevicted_keys:{evicted}\r\nevicted_clients:0\r\n")
    }

    /// A failover back to a server read before, or a moment on the demoted
    /// primary, compares each server with its own last reading: its whole
    /// count again would be a loss (a restore, a day of quarantine) for
    /// nothing. A new server under `noeviction` cannot have evicted since
    /// it took over.
    #[test]
    fn a_server_read_before_is_compared_with_its_own_reading() {
        let watch = EvictionWatch::default();
        assert_eq!(watch.observe(&info("a", 5)), None);
        assert_eq!(watch.observe(&info("b", 9)), Some(9));
        assert_eq!(watch.observe(&info("a", 5)), None, "back to a: nothing new");
        assert_eq!(watch.observe(&info("b", 9)), None);
        assert_eq!(watch.observe(&info("a", 7)), Some(2));
        assert_eq!(
            watch.observe(&info_with_policy("c", 40, "noeviction")),
            None,
            "evicted before its policy changed"
        );
        assert_eq!(
            watch.observe(&info_with_policy("c", 41, "noeviction")),
            Some(1)
        );
        // Only the last few servers are kept.
        for n in 0..SERVERS_KEPT {
            watch.observe(&info_with_policy(&format!("s{n}"), 0, "noeviction"));
        }
        assert_eq!(
            watch.observe(&info("a", 7)),
            Some(7),
            "forgotten: new again"
        );
    }

    #[test]
    fn only_growth_on_the_same_server_is_an_eviction() {
        let watch = EvictionWatch::default();
        assert_eq!(
            watch.observe(&info("a", 3)),
            None,
            "the first reading is the baseline"
        );
        assert_eq!(watch.observe(&info("a", 3)), None);
        assert_eq!(watch.observe(&info("a", 5)), Some(2));
        assert_eq!(
            watch.observe(&info("b", 9)),
            Some(9),
            "another server: every key it evicted (a replica promoted evicts at once)"
        );
        assert_eq!(watch.observe(&info("b", 10)), Some(1));
        assert_eq!(
            watch.observe(&info("c", 0)),
            None,
            "a server that evicted nothing"
        );
        assert_eq!(watch.observe(&info("c", 1)), Some(1));
        assert_eq!(watch.observe(&info("b", 11)), Some(1), "b, read before");
        assert_eq!(watch.observe("no fields"), None);
        assert_eq!(
            watch.observe(&info("b", 12)),
            Some(1),
            "an unreadable answer changes nothing"
        );
    }
}
