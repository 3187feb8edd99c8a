//! Noticing that Redis forgot: the namespace's generation.
//!
//! Two keys say which history the server holds:
//! - `NS:epoch`: a random marker written when the namespace is first used
//!   and replaced after every loss. A server that lost everything (a
//!   restart without persistence, `FLUSHDB`, a failover to an empty
//!   replica) has none, or another one;
//! - `NS:seq`: incremented by every write that decides routing (a pin, an
//!   identity, a retirement). A failover to a replica that missed the last
//!   writes goes back in time: its `seq` is lower than one this replica has
//!   already seen.
//!
//! A sequence every replica moves can be caught up with: after a failover
//! to a replica that missed this replica's last writes, other replicas'
//! new writes can take `seq` past what this replica saw before it next
//! asks, and the loss would go unseen. So each replica (each process) also
//! counts its own pin writes in a key only it increments, `NS:writer:ID`,
//! in the same script as the writes: replication keeps a script's writes
//! together and in order, so a server holding a lower count than this
//! replica was answered has lost writes of this replica. Lookups and the
//! background check read the count; pin writes increment it. The count
//! and its key's id are saved with the history, so a replica that went
//! down together with the primary still notices when it comes back (the
//! writes of its last few seconds before a crash excepted: the file is
//! saved every few seconds, not at every write).
//!
//! Every round trip to Redis returns both, so a replica notices a loss at
//! its next command; whoever notices first replaces the epoch, and every
//! other replica notices the new epoch at its next command. What this
//! replica last saw is also kept in a small file, so a loss that happened
//! while it was down is noticed when it comes back.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// What a reply showed about the server's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The history this replica knows, or a continuation of it.
    Consistent,
    /// The server holds no history yet and this replica knows none either:
    /// a new namespace.
    Fresh,
    /// The server forgot.
    Lost(Loss),
}

/// How the server was seen to forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// No epoch at all where there was one.
    EpochMissing,
    /// Another epoch: the server was wiped (or another replica noticed a
    /// loss first and replaced it).
    EpochChanged,
    /// The same epoch but an older sequence: a failover to a replica that
    /// missed writes.
    WentBack {
        /// The highest sequence this replica had seen.
        seen: u64,
        /// The sequence the server holds now.
        now: u64,
    },
    /// The server holds fewer of this replica's own pin writes than it had
    /// acknowledged: a failover to a replica that missed them (seen even
    /// when other replicas' writes took the sequence past what this one saw).
    OwnWritesWentBack {
        /// How many this replica had been answered for.
        seen: u64,
        /// How many the server holds now.
        now: u64,
    },
    /// A pin this replica's journal holds, young enough that Redis cannot
    /// have let it expire, is gone from the server though the history
    /// looked whole: a failover that lost it, noticed by a replica whose
    /// saved history predates the loss (a restart after `kill -9`).
    JournaledPinGone,
    /// The server evicted keys (see `eviction`): pins may be among them.
    Evicted {
        /// How many keys, since the last reading.
        keys: u64,
    },
    /// The server's clock jumped forward (see `server_clock`): keys whose
    /// time to live was shorter expired at once, pins possibly among them.
    ClockJumped {
        /// By how much, in ms.
        by_ms: u64,
    },
    /// A restore this replica began did not finish (it stopped or crashed
    /// while writing its journal back, or gave up): the history it saved
    /// looks whole, but pins it had not written back are missing.
    RestoreUnfinished,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::EpochMissing => f.write_str("the namespace's epoch is gone (the server was wiped)"),
            Loss::EpochChanged => f.write_str("the namespace's epoch changed (the server was wiped, or another replica noticed a loss)"),
            Loss::WentBack { seen, now } => write!(
                f,
                "the write sequence went back from {seen} to {now} (a failover to a replica that missed writes)"
            ),
            Loss::OwnWritesWentBack { seen, now } => write!(
                f,
                "this replica's pin writes went back from {seen} to {now} (a failover to a replica that missed them)"
            ),
            Loss::JournaledPinGone => f.write_str(
                "a pin this replica's journal holds is gone from the server before it could expire (a failover that lost it)"
            ),
            Loss::Evicted { keys } => write!(
                f,
                "the server evicted {keys} keys under memory pressure (its maxmemory-policy is not noeviction), pins possibly among them"
            ),
            Loss::ClockJumped { by_ms } => write!(
                f,
                "the server's clock jumped {by_ms} ms ahead, expiring keys that early, pins possibly among them"
            ),
            Loss::RestoreUnfinished => f.write_str(
                "a restore this replica began after an earlier loss did not finish (it stopped, crashed or gave up while writing its journal back)"
            ),
        }
    }
}

/// What had been seen when a command left.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    epoch: u64,
    floor: u64,
    /// This replica's own pin writes acknowledged by then.
    own_floor: u64,
}

impl Snapshot {
    /// The hash of the epoch in force when the command left (0: none).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// This replica's own write count in a reply (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnWrites {
    /// Read by a lookup or a check: at least what was acknowledged before
    /// the command left.
    Read(u64),
    /// Incremented by the command's writes: more than that.
    Written(u64),
}

/// The history this replica has seen, updated by every reply.
#[derive(Debug)]
pub struct Generation {
    /// Hash of the epoch seen (0: none yet).
    epoch: AtomicU64,
    /// The highest sequence seen under that epoch.
    max_seq: AtomicU64,
    /// This replica's own pin writes acknowledged under that epoch.
    own_writes: AtomicU64,
    /// When the last of them was acknowledged (Unix ms).
    own_written_ms: AtomicU64,
    /// How long the server keeps the count after the last write (the pins'
    /// lifetime: its pins are gone by then too).
    own_ttl_ms: u64,
    /// The id of this replica's count key (`NS:writer:ID`), kept with the
    /// history.
    writer_id: u64,
    /// Where it is kept between runs (`None`: not kept).
    file: Option<PathBuf>,
    /// The sequence last written to the file.
    saved_seq: AtomicU64,
    /// Held while the file is written: saves run off the runtime, from the
    /// background check, a restore and the close, and share one temporary
    /// file.
    saving: std::sync::Mutex<()>,
    /// The epoch loaded, when the file held it as [`legacy_epoch_hash`]'s
    /// (0: it did not): the epoch in force until a reply names it, and
    /// what snapshots taken before the takeover carry.
    loaded_legacy: u64,
    /// The namespace the history is of.
    namespace: String,
    /// Whether a restore is under way, kept with the history: one the
    /// process did not live to finish is finished at its next start.
    restore_pending: std::sync::atomic::AtomicBool,
}

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    namespace: String,
    epoch: u64,
    /// Whether `epoch` is [`epoch_hash`]'s (files written before it hold
    /// [`legacy_epoch_hash`]'s).
    #[serde(default)]
    stable_hash: bool,
    max_seq: u64,
    /// This replica's own write count (absent in files written before it).
    #[serde(default)]
    writer: Option<SavedWriter>,
    /// A restore was under way (see [`Generation::mark_restore`]).
    #[serde(default)]
    restore_pending: bool,
}

/// This replica's own write count, as saved.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct SavedWriter {
    /// The id of its key.
    id: u64,
    /// Writes acknowledged under the saved epoch.
    writes: u64,
    /// When the last was acknowledged (Unix ms).
    written_ms: u64,
}

/// The hash this module compares epochs by (epochs are random strings):
/// the first 8 bytes of its BLAKE3 hash, the same in every build (it is
/// saved, and compared after an upgrade).
pub fn epoch_hash(epoch: &str) -> u64 {
    let digest = blake3::hash(epoch.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first).max(1)
}

/// The hash files saved before [`epoch_hash`] hold: the standard library's
/// `DefaultHasher`, whose algorithm may change from one Rust release to
/// the next, so a saved epoch compared by it could look like another one
/// after an upgrade (a false loss, and the fleet quarantined). Read only
/// to take such a file over.
fn legacy_epoch_hash(epoch: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    epoch.hash(&mut hasher);
    hasher.finish().max(1)
}

impl Generation {
    /// The history saved in `file` for `namespace` (none if the file is
    /// missing or for another namespace); this replica's own write count
    /// lives `own_ttl_ms` on the server after its last write.
    ///
    /// A file that is there but cannot be read is an error, not "no
    /// history": taken as none, a loss while this replica was down would go
    /// unnoticed, and it would pin the cookies Redis forgot anew.
    pub fn load(
        file: Option<&Path>,
        namespace: &str,
        own_ttl_ms: u64,
    ) -> Result<Generation, String> {
        let saved = match file {
            Some(file) => read_saved(file)?,
            None => None,
        }
        .filter(|s| s.namespace == namespace);
        let (epoch, max_seq) = saved.as_ref().map_or((0, 0), |s| (s.epoch, s.max_seq));
        let legacy = saved
            .as_ref()
            .is_some_and(|s| !s.stable_hash && s.epoch != 0);
        let restore_pending = saved.as_ref().is_some_and(|s| s.restore_pending);
        let writer = saved.and_then(|s| s.writer).unwrap_or_else(|| SavedWriter {
            id: rand::random::<u64>(),
            writes: 0,
            written_ms: 0,
        });
        Ok(Generation {
            epoch: AtomicU64::new(epoch),
            max_seq: AtomicU64::new(max_seq),
            own_writes: AtomicU64::new(writer.writes),
            own_written_ms: AtomicU64::new(writer.written_ms),
            own_ttl_ms,
            writer_id: writer.id,
            file: file.map(Path::to_owned),
            saved_seq: AtomicU64::new(max_seq),
            saving: std::sync::Mutex::new(()),
            loaded_legacy: if legacy { epoch } else { 0 },
            namespace: namespace.to_owned(),
            restore_pending: std::sync::atomic::AtomicBool::new(restore_pending),
        })
    }

    /// The hash of the epoch in force (0: none yet).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// The id of this replica's own write count key (`NS:writer:ID`).
    pub fn writer_id(&self) -> u64 {
        self.writer_id
    }

    /// Whether this replica has seen any history.
    pub fn knows_history(&self) -> bool {
        self.epoch.load(Ordering::Relaxed) != 0
    }

    /// What a command sent now must find at least: taken before it is
    /// sent, compared with its reply by [`Generation::observe`]. (Replies
    /// of concurrent commands arrive in any order; only what had been seen
    /// before a command left can prove the server went back.)
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            epoch: self.epoch.load(Ordering::Relaxed),
            floor: self.max_seq.load(Ordering::Relaxed),
            own_floor: self.own_writes.load(Ordering::Relaxed),
        }
    }

    /// Compares this replica's own write count in a reply (`own`) with what
    /// had been acknowledged when its command left (`sent`), at `now_ms`.
    /// Call after [`Generation::observe`] found the history consistent.
    pub fn observe_own(&self, sent: Snapshot, own: OwnWrites, now_ms: u64) -> Observation {
        let sent = self.taken_over(sent);
        // A reply to a command sent under another epoch says nothing of
        // this one's count.
        if sent.epoch == 0 || sent.epoch != self.epoch.load(Ordering::Relaxed) {
            return Observation::Consistent;
        }
        // Once the pins' lifetime has passed since this replica's last
        // acknowledged write, every pin the count protects has expired:
        // a count that went back (the key expired, or was lost) can no
        // longer hide a lost live pin, so it is taken as it is. (The key
        // itself lives twice that long, so it does not expire first,
        // whatever the two clocks say.)
        let stale =
            now_ms.saturating_sub(self.own_written_ms.load(Ordering::Relaxed)) >= self.own_ttl_ms;
        match own {
            OwnWrites::Written(count) if count > sent.own_floor => {
                self.own_writes.fetch_max(count, Ordering::Relaxed);
                self.own_written_ms.fetch_max(now_ms, Ordering::Relaxed);
                Observation::Consistent
            }
            OwnWrites::Read(count) if count >= sent.own_floor => Observation::Consistent,
            OwnWrites::Written(count) if stale => {
                self.own_writes.store(count, Ordering::Relaxed);
                self.own_written_ms.fetch_max(now_ms, Ordering::Relaxed);
                Observation::Consistent
            }
            OwnWrites::Read(count) if stale => {
                self.own_writes.store(count, Ordering::Relaxed);
                Observation::Consistent
            }
            OwnWrites::Read(count) | OwnWrites::Written(count) => {
                Observation::Lost(Loss::OwnWritesWentBack {
                    seen: sent.own_floor,
                    now: count,
                })
            }
        }
    }

    /// Compares what a reply showed (`epoch`, `seq`) with what had been
    /// seen when its command left (`sent`).
    pub fn observe(&self, sent: Snapshot, epoch: Option<&str>, seq: u64) -> Observation {
        // A history saved by an earlier version: the epoch it names, once
        // a reply shows it, is taken over under the stable hash.
        if self.holds_legacy() {
            if let Some(epoch) = epoch.filter(|e| legacy_epoch_hash(e) == self.loaded_legacy) {
                let _ = self.epoch.compare_exchange(
                    self.loaded_legacy,
                    epoch_hash(epoch),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        let sent = self.taken_over(sent);
        let known = self.epoch.load(Ordering::Relaxed);
        let Some(reply) = epoch.map(epoch_hash) else {
            return if sent.epoch == 0 && known == 0 {
                Observation::Fresh
            } else {
                Observation::Lost(Loss::EpochMissing)
            };
        };
        if known == 0 {
            self.adopt_hash(reply, seq);
            return Observation::Consistent;
        }
        if reply != known {
            // A reply to a command sent before this replica took a new
            // epoch still carries the old one.
            return if reply == sent.epoch {
                Observation::Consistent
            } else {
                Observation::Lost(Loss::EpochChanged)
            };
        }
        self.max_seq.fetch_max(seq, Ordering::Relaxed);
        if sent.epoch == reply && seq < sent.floor {
            Observation::Lost(Loss::WentBack {
                seen: sent.floor,
                now: seq,
            })
        } else {
            Observation::Consistent
        }
    }

    /// Whether the epoch in force is still the one a file of an earlier
    /// version held (by its legacy hash), not yet taken over.
    fn holds_legacy(&self) -> bool {
        self.loaded_legacy != 0 && self.epoch.load(Ordering::Relaxed) == self.loaded_legacy
    }

    /// `sent` as if taken under the stable hash: a command sent before a
    /// saved history's epoch was taken over ([`Generation::observe`])
    /// carries its old hash, and is still checked against what was seen.
    fn taken_over(&self, mut sent: Snapshot) -> Snapshot {
        if sent.epoch != 0 && sent.epoch == self.loaded_legacy {
            sent.epoch = self.epoch.load(Ordering::Relaxed);
        }
        sent
    }

    /// Marks a restore under way (or finished), saved with the history
    /// from the next save: a restore adopts its new epoch before it writes
    /// the journal back, so a process that does not live to finish it
    /// would find, at its next start, a history that looks whole and pins
    /// missing from it.
    pub fn mark_restore(&self, pending: bool) {
        self.restore_pending.store(pending, Ordering::Relaxed);
    }

    /// Whether the history was saved with a restore under way (see
    /// [`Generation::mark_restore`]).
    pub fn restore_pending(&self) -> bool {
        self.restore_pending.load(Ordering::Relaxed)
    }

    /// Takes `epoch` (and `seq`) as the history from now on.
    pub fn adopt(&self, epoch: &str, seq: u64) {
        self.adopt_hash(epoch_hash(epoch), seq);
        self.save(true);
    }

    fn adopt_hash(&self, epoch: u64, seq: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
        self.max_seq.store(seq, Ordering::Relaxed);
        // Under a new history this replica's count starts again from what
        // the server holds.
        self.own_writes.store(0, Ordering::Relaxed);
    }

    /// Writes the history to the file (if kept): always when `now`,
    /// otherwise only if the sequence moved since the last save.
    pub fn save(&self, now: bool) {
        let Some(file) = &self.file else { return };
        let _one_at_a_time = self
            .saving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = self.max_seq.load(Ordering::Relaxed);
        if !now && self.saved_seq.load(Ordering::Relaxed) == seq {
            return;
        }
        let saved = Saved {
            namespace: self.namespace.clone(),
            epoch: self.epoch.load(Ordering::Relaxed),
            stable_hash: !self.holds_legacy(),
            max_seq: seq,
            writer: Some(SavedWriter {
                id: self.writer_id,
                writes: self.own_writes.load(Ordering::Relaxed),
                written_ms: self.own_written_ms.load(Ordering::Relaxed),
            }),
            restore_pending: self.restore_pending.load(Ordering::Relaxed),
        };
        if let Err(e) = write_atomically(file, &saved) {
            tracing::warn!(error = %e, file = %file.display(), "cannot save what the pin store's history was");
            return;
        }
        self.saved_seq.store(seq, Ordering::Relaxed);
    }
}

/// The history in `file`: none if there is no file.
fn read_saved(file: &Path) -> Result<Option<Saved>, String> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(file, &e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| unreadable(file, &e))
}

/// What to tell the user of a history file that cannot be read.
fn unreadable(file: &Path, error: &dyn std::fmt::Display) -> String {
    format!(
        "cannot read {} ({error}): it holds what this replica last saw of the Redis pin store, \
         compared with Redis at start to notice a loss while the replica was down. Put the \
         file back from a backup, or delete it to start without that history: a loss while \
         this replica was down then goes unnoticed unless another replica saw it",
        file.display()
    )
}

fn write_atomically(file: &Path, saved: &Saved) -> std::io::Result<()> {
    let text = serde_json::to_vec(saved).map_err(std::io::Error::other)?;
    crate::fsutil::replace_private(file, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a command sent now, answered with `own`, shows at `now_ms`.
    fn own_at(g: &Generation, own: OwnWrites, now_ms: u64) -> Observation {
        g.observe_own(g.snapshot(), own, now_ms)
    }

    #[test]
    fn losses_are_told_apart() {
        let g = Generation::load(None, "ns", 60_000).unwrap();
        let observe = |epoch, seq| g.observe(g.snapshot(), epoch, seq);
        assert_eq!(observe(None, 0), Observation::Fresh);
        assert_eq!(observe(Some("a"), 5), Observation::Consistent);
        assert_eq!(observe(Some("a"), 9), Observation::Consistent);
        assert_eq!(
            observe(Some("a"), 7),
            Observation::Lost(Loss::WentBack { seen: 9, now: 7 })
        );
        assert_eq!(observe(None, 0), Observation::Lost(Loss::EpochMissing));
        assert_eq!(
            observe(Some("b"), 100),
            Observation::Lost(Loss::EpochChanged)
        );
        g.adopt("b", 100);
        assert_eq!(observe(Some("b"), 101), Observation::Consistent);
    }

    /// A history saved by an earlier version (its epoch hashed by the
    /// standard library's hasher) is taken over, not taken as a loss; what
    /// is saved from then on is the stable hash's, and reads back alike.
    #[test]
    fn a_history_saved_by_an_earlier_version_is_no_loss() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis-generation.json");
        let old = format!(
            "{{\"namespace\":\"ns\",\"epoch\":{},\"max_seq\":7}}",
            legacy_epoch_hash("e1")
        );
        std::fs::write(&file, old).unwrap();
        // The first reply is checked too: a sequence below the saved one
        // is a loss while the replica was down.
        let g = Generation::load(Some(&file), "ns", 60_000).unwrap();
        assert_eq!(
            g.observe(g.snapshot(), Some("e1"), 6),
            Observation::Lost(Loss::WentBack { seen: 7, now: 6 })
        );
        let g = Generation::load(Some(&file), "ns", 60_000).unwrap();
        assert_eq!(
            g.observe(g.snapshot(), Some("e1"), 8),
            Observation::Consistent
        );
        g.save(true);
        let saved = std::fs::read_to_string(&file).unwrap();
        assert!(saved.contains("\"stable_hash\":true"), "{saved}");
        let g = Generation::load(Some(&file), "ns", 60_000).unwrap();
        assert_eq!(
            g.observe(g.snapshot(), Some("e1"), 9),
            Observation::Consistent
        );
        assert_eq!(
            g.observe(g.snapshot(), Some("e2"), 9),
            Observation::Lost(Loss::EpochChanged)
        );
        // A legacy file whose epoch the server no longer holds: a loss.
        let other = format!(
            "{{\"namespace\":\"ns\",\"epoch\":{},\"max_seq\":7}}",
            legacy_epoch_hash("gone")
        );
        std::fs::write(&file, other).unwrap();
        let g = Generation::load(Some(&file), "ns", 60_000).unwrap();
        assert_eq!(
            g.observe(g.snapshot(), Some("e1"), 8),
            Observation::Lost(Loss::EpochChanged)
        );
    }

    #[test]
    fn replies_of_concurrent_commands_may_come_in_any_order() {
        let g = Generation::load(None, "ns", 60_000).unwrap();
        g.adopt("a", 10);
        let early = g.snapshot();
        // A later command saw 12 first...
        assert_eq!(
            g.observe(g.snapshot(), Some("a"), 12),
            Observation::Consistent
        );
        // ...then the reply of one sent before it, with 11: no loss.
        assert_eq!(g.observe(early, Some("a"), 11), Observation::Consistent);
        // A command sent after 12 was seen that finds 11: the server went back.
        assert_eq!(
            g.observe(g.snapshot(), Some("a"), 11),
            Observation::Lost(Loss::WentBack { seen: 12, now: 11 })
        );
        // A reply to a command sent before a new epoch was taken.
        let before = g.snapshot();
        g.adopt("b", 20);
        assert_eq!(g.observe(before, Some("a"), 12), Observation::Consistent);
    }

    #[test]
    fn a_loss_of_this_replica_s_writes_shows_though_others_caught_up() {
        let g = Generation::load(None, "ns", 60_000).unwrap();
        g.adopt("a", 100);
        let now = 1_000_000;
        for count in 1..=3 {
            let sent = g.snapshot();
            assert_eq!(
                g.observe(sent, Some("a"), 100 + count),
                Observation::Consistent
            );
            assert_eq!(
                g.observe_own(sent, OwnWrites::Written(count), now),
                Observation::Consistent
            );
        }
        // A failover: the server holds only the first of this replica's
        // three writes, while others' writes took the sequence past 103.
        let sent = g.snapshot();
        assert_eq!(g.observe(sent, Some("a"), 150), Observation::Consistent);
        assert_eq!(
            g.observe_own(sent, OwnWrites::Read(1), now + 10),
            Observation::Lost(Loss::OwnWritesWentBack { seen: 3, now: 1 })
        );
        // A write answered with a count it had already been answered: lost.
        assert_eq!(
            own_at(&g, OwnWrites::Written(3), now + 10),
            Observation::Lost(Loss::OwnWritesWentBack { seen: 3, now: 3 })
        );
    }

    #[test]
    fn own_writes_in_any_order_and_an_expired_count_are_no_loss() {
        let g = Generation::load(None, "ns", 60_000).unwrap();
        g.adopt("a", 1);
        let now = 1_000_000;
        let early = g.snapshot();
        let late = g.snapshot();
        assert_eq!(
            g.observe_own(late, OwnWrites::Written(2), now),
            Observation::Consistent
        );
        // The reply of a write sent at the same time, counted first.
        assert_eq!(
            g.observe_own(early, OwnWrites::Written(1), now),
            Observation::Consistent
        );
        // A lookup sent before both, read before either write.
        assert_eq!(
            g.observe_own(early, OwnWrites::Read(0), now),
            Observation::Consistent
        );
        // Gone within the pins' lifetime: lost. Gone after it: expired.
        assert!(matches!(
            own_at(&g, OwnWrites::Read(0), now + 59_999),
            Observation::Lost(Loss::OwnWritesWentBack { seen: 2, now: 0 })
        ));
        assert_eq!(
            own_at(&g, OwnWrites::Read(0), now + 60_000),
            Observation::Consistent
        );
        assert_eq!(
            own_at(&g, OwnWrites::Read(0), now + 60_001),
            Observation::Consistent
        );
        // A write after the pins' lifetime, before any read saw the count
        // gone, starts it again: no loss; the next write counts from it.
        let g = Generation::load(None, "ns", 60_000).unwrap();
        g.adopt("a", 1);
        for count in 1..=5 {
            own_at(&g, OwnWrites::Written(count), now);
        }
        for (count, at, want) in [
            (1, now + 60_000, Observation::Consistent),
            (
                1,
                now + 60_001,
                Observation::Lost(Loss::OwnWritesWentBack { seen: 1, now: 1 }),
            ),
            (2, now + 60_002, Observation::Consistent),
        ] {
            assert_eq!(own_at(&g, OwnWrites::Written(count), at), want, "{count}");
        }
        // Under a new epoch the count starts again.
        g.adopt("b", 5);
        assert_eq!(own_at(&g, OwnWrites::Read(0), now), Observation::Consistent);
    }

    #[test]
    fn the_history_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("generation");
        let g = Generation::load(Some(&file), "ns", 60_000).unwrap();
        g.adopt("e1", 10);
        assert_eq!(
            g.observe(g.snapshot(), Some("e1"), 42),
            Observation::Consistent
        );
        g.save(false);
        let again = Generation::load(Some(&file), "ns", 60_000).unwrap();
        assert!(again.knows_history());
        assert_eq!(
            again.observe(again.snapshot(), Some("e1"), 40),
            Observation::Lost(Loss::WentBack { seen: 42, now: 40 })
        );
        assert_eq!(
            again.observe(again.snapshot(), None, 0),
            Observation::Lost(Loss::EpochMissing)
        );
        let other = Generation::load(Some(&file), "other", 60_000).unwrap();
        assert!(!other.knows_history());
    }

    #[test]
    fn a_history_file_that_cannot_be_read_is_an_error_not_no_history() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("generation");
        std::fs::write(&file, b"{\"namespace\":\"ns\",\"epo").unwrap();
        let Err(error) = Generation::load(Some(&file), "ns", 60_000) else {
            panic!("a truncated file was taken");
        };
        assert!(error.contains(&file.display().to_string()), "{error}");
        assert!(error.contains("delete it"), "{error}");
        // A directory where the file should be cannot be read either.
        let Err(error) = Generation::load(Some(dir.path()), "ns", 60_000) else {
            panic!("a directory was taken");
        };
        assert!(error.contains("cannot read"), "{error}");
        // No file at all is no history.
        let none = Generation::load(Some(&dir.path().join("absent")), "ns", 60_000).unwrap();
        assert!(!none.knows_history());
    }

    #[test]
    fn the_own_write_count_and_its_key_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("generation");
        let g = Generation::load(Some(&file), "ns", 60_000).unwrap();
        g.adopt("e1", 10);
        let now = 1_000_000;
        for count in 1..=4 {
            own_at(&g, OwnWrites::Written(count), now);
        }
        g.save(true);
        let again = Generation::load(Some(&file), "ns", 60_000).unwrap();
        assert_eq!(again.writer_id(), g.writer_id());
        let went_back = Observation::Lost(Loss::OwnWritesWentBack { seen: 4, now: 2 });
        assert_eq!(own_at(&again, OwnWrites::Read(2), now + 1), went_back);
        assert_eq!(
            own_at(&again, OwnWrites::Read(4), now + 1),
            Observation::Consistent
        );
        // A file from before the count: a fresh key, nothing to compare.
        std::fs::write(&file, r#"{"namespace":"ns","epoch":7,"max_seq":3}"#).unwrap();
        let old = Generation::load(Some(&file), "ns", 60_000).unwrap();
        assert!(old.knows_history());
        assert_ne!(old.writer_id(), g.writer_id());
    }
}
