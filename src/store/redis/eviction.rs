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

/// What the last reading showed: the server (its `run_id`, new at every
/// start) and how many keys it had evicted.
#[derive(Debug, Default)]
pub(super) struct EvictionWatch {
    last: Mutex<Option<(String, u64)>>,
}

impl EvictionWatch {
    /// Takes the first reading; whether `info` holds what is watched.
    pub(super) fn baseline(&self, info: &str) -> bool {
        let readable = parse(info).is_some();
        self.observe(info);
        readable
    }

    /// Takes a reading of `INFO` (`info`): the keys evicted since the last
    /// reading of the same server, if any. A reading of another server (a
    /// failover, a restart) counts every key it ever evicted: what the
    /// change itself lost, the generation shows, but not what the new
    /// primary evicted since (a replica promoted with more data than its
    /// `maxmemory` evicts at once, since replicas ignore it by default),
    /// and its count cannot tell when. A restarted server counts from 0.
    pub(super) fn observe(&self, info: &str) -> Option<u64> {
        let (server, evicted) = parse(info)?;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let grown = match last.as_ref() {
            Some((seen, before)) if *seen == server => {
                evicted.checked_sub(*before).filter(|grown| *grown > 0)
            }
            Some(_) => Some(evicted).filter(|evicted| *evicted > 0),
            None => None,
        };
        *last = Some((server, evicted));
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
        format!("# Server\r\nredis_version:7.0.15\r\nrun_id:{run_id}\r\n# Stats\r\nevicted_keys:{evicted}\r\nevicted_clients:0\r\n")
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
        assert_eq!(watch.observe(&info("b", 11)), Some(11));
        assert_eq!(watch.observe("no fields"), None);
        assert_eq!(
            watch.observe(&info("b", 12)),
            Some(1),
            "an unreadable answer changes nothing"
        );
    }
}
