//! After Redis forgot: never re-pin a lost credential.
//!
//! When a reply shows a loss (see `generation`), this replica:
//! 1. starts the quarantine (`store.loss_quarantine`), counts the event,
//!    and writes the quarantine's end to Redis (`NS:quarantine-until`),
//!    where a replica started or restarted during it finds it;
//! 2. gives the namespace a new epoch, unless another replica already did
//!    (then the new epoch is how this replica learnt of the loss), so every
//!    replica notices at its next round trip;
//! 3. writes the pin-hashing key back, then every pin and identity its
//!    journal holds; a pin that another replica restored to another
//!    identity retires both identities (`store-lost`): a guess is never
//!    made about which one is right.
//!
//! A replica that starts with no history and finds Redis holding no
//! generation, or one founded moments ago, cannot tell a new fleet from a
//! wipe nobody has noticed yet: it waits for the running replicas to report
//! a loss before it serves (see [`RedisStore::wait_out_founding`]).
//!
//! During the quarantine a credential Redis does not know at lookup is
//! restored from this replica's journal if it is there, and otherwise
//! pinned to a retired tombstone (`store-lost`), so it is answered as
//! retired, on every replica, until the client drops it. Credentials first
//! seen in a Set-Cookie pin normally: they cannot have been lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::generation::Loss;
use super::RedisStore;
use crate::clock::Clock;
use crate::credential::{Credential, PinKey, PinKind};
use crate::fingerprint::Fingerprint;
use crate::identity::{ExitId, Identity, Pin, RetireReason, Retirement, SessionId};
use crate::store::{Binding, Bindings, PinStore as _, StoreError};

/// The exit a tombstone identity names (it never carries traffic).
const NO_EXIT: &str = "store-lost";
/// How many times a restore is tried before giving up.
const RESTORE_ATTEMPTS: u32 = 60;
/// How many restores run one after another, each for a loss seen during
/// the one before, before giving up until the next loss.
const RESTORES_IN_A_ROW: u32 = 10;
/// How long after the namespace's generation was founded a replica without
/// history waits before it serves ([`RedisStore::wait_out_founding`]): six
/// background checks of the running replicas, each a round trip well under
/// one.
const FOUNDING_WAIT: Duration = super::CHECK_INTERVAL.saturating_mul(6);
/// How far beyond now a replica that restores keeps the fleet's quarantine
/// (see [`RedisStore::check_fleet_quarantine`]): several background checks
/// of the other replicas, so that a restore still running is never
/// outlived by their quarantine.
const RESTORE_HOLD: Duration = super::CHECK_INTERVAL.saturating_mul(10);

/// Whether `binding` pins its credential to a tombstone: the identity a
/// quarantine pins a lost credential to, retired (`store-lost`), on no
/// exit. Retired either way: an identity on an exit someone named like
/// the tombstones' is taken for one only once it can carry nothing.
fn is_tombstone(binding: &Binding) -> bool {
    binding.identity.as_deref().is_some_and(|identity| {
        identity.exit.as_str() == NO_EXIT
            && identity
                .retired
                .as_ref()
                .is_some_and(|retired| retired.reason == RetireReason::StoreLost)
    })
}

/// The last loss, for the admin listing.
#[derive(Clone, Debug, Serialize)]
pub struct LossReport {
    /// What was seen.
    pub what: String,
    /// When it was noticed (Unix ms).
    pub at_ms: u64,
    /// Until when unknown credentials are answered as lost (Unix ms).
    pub quarantine_until_ms: u64,
    /// Pins written back from this replica's journal.
    pub restored: u64,
    /// Credentials answered as lost (tombstoned) since.
    pub quarantined: u64,
    /// Identities retired because two replicas' journals disagreed.
    pub conflicts: u64,
    /// Whether the restore has finished.
    pub restore_done: bool,
}

pub(super) fn now_ms() -> u64 {
    Clock::system().now_ms()
}

/// The monotonic clock, in ms (see [`Clock::elapsed_ms`]).
fn steady_ms() -> u64 {
    Clock::system().elapsed_ms()
}

/// A journaled identity as a restore writes it back. Without a retirement
/// for idleness: the journal saw only this replica's uses (journals written
/// before `RedisStore::sweep` stopped judging idleness there may hold one),
/// and the identity may have been busy through other replicas. Idleness is
/// judged again at its next use, from the last use the restores merged
/// (the latest any journal holds).
fn restorable(identity: &Identity) -> Identity {
    let mut identity = identity.clone();
    if identity
        .retired
        .as_ref()
        .is_some_and(|r| r.reason == RetireReason::IdleExpired)
    {
        identity.retired = None;
    }
    identity
}

impl RedisStore {
    /// The last loss this replica noticed, if any.
    pub fn loss_report(&self) -> Option<LossReport> {
        self.inner
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update_report(&self, change: impl FnOnce(&mut LossReport)) {
        if let Some(report) = self
            .inner
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            change(report);
        }
    }

    /// How many losses of Redis's data this replica has noticed since it
    /// opened, counting the fleet's quarantines it joined. A pin written
    /// on the strength of a lookup made before the count moved may be a
    /// lost credential founded anew (the lookup missed it, and the restore
    /// has not written it back yet): the router does not write it
    /// (see `Router::route_within`), and a request's pin write during which
    /// the count moved is refused ([`RedisStore::unless_lost_meanwhile`]).
    pub fn losses_noticed(&self) -> u64 {
        self.inner.losses_noticed.load(Ordering::Acquire)
    }

    /// Whether unknown credentials are to be treated as lost now: during
    /// the quarantine, and for as long as a restore runs (with a
    /// `store.loss_quarantine` shorter than the restore, a credential whose
    /// pin is still to be written back would otherwise be pinned anew).
    /// Timed on the monotonic clock: a wall clock stepped forward does not
    /// end it.
    pub(super) fn quarantined(&self) -> bool {
        self.inner.recovering.load(Ordering::Acquire)
            || steady_ms()
                < self
                    .inner
                    .quarantine_until_steady_ms
                    .load(Ordering::Relaxed)
    }

    /// How long this replica's quarantine lasts from now (0: none).
    fn quarantine_left_ms(&self) -> u64 {
        self.inner
            .quarantine_until_steady_ms
            .load(Ordering::Relaxed)
            .saturating_sub(steady_ms())
    }

    /// Makes this replica's quarantine last at least `left_ms` more, and
    /// answers its end as the wall clock reads it (for the report).
    fn quarantine_for(&self, left_ms: u64) -> u64 {
        self.inner
            .quarantine_until_steady_ms
            .fetch_max(steady_ms().saturating_add(left_ms), Ordering::Relaxed);
        now_ms().saturating_add(self.quarantine_left_ms())
    }

    /// Makes the fleet's quarantine last at least `left_ms` more (0: only
    /// reads it) and takes what is left of it as this replica's too;
    /// answers that, in ms. It lives in Redis (`NS:quarantine-until`, as a
    /// time to live: see [`scripts::QUARANTINE`]), so that a replica
    /// started or restarted during it, which did not see the loss,
    /// quarantines as well: in memory alone, a restart or a new replica
    /// ended it.
    ///
    /// [`scripts::QUARANTINE`]: super::scripts::QUARANTINE
    pub(super) async fn share_quarantine(&self, left_ms: u64) -> Result<u64, StoreError> {
        let key = self.quarantine_key();
        let result = self
            .run_script(
                &self.inner.quarantine,
                &[key],
                &[
                    left_ms.to_string().into_bytes(),
                    now_ms().saturating_add(left_ms).to_string().into_bytes(),
                ],
                super::Counting::None,
            )
            .await?;
        let left = match result {
            redis::Value::Int(left) => u64::try_from(left).unwrap_or(0),
            _ => {
                return Err(super::codec::unexpected(
                    "the quarantine's end is not a number",
                ))
            }
        };
        self.quarantine_for(left);
        Ok(left)
    }

    /// At every background check: takes the fleet's quarantine when
    /// another replica started one. A replica learns of most losses itself,
    /// at its next round trip, but not of one whose only trace is a
    /// generation it founded: a new pod that found Redis wiped while every
    /// replica with history was cut off from it, which then pins lost
    /// credentials anew until a replica with history comes back, notices,
    /// and writes the quarantine's end to Redis. And while this replica
    /// restores, it keeps the fleet's quarantine running at least
    /// [`RESTORE_HOLD`] beyond now, so that no replica ends its quarantine
    /// while pins are still being written back.
    pub(super) async fn check_fleet_quarantine(&self) -> Result<(), StoreError> {
        let restoring = self.inner.recovering.load(Ordering::Acquire);
        let before = self.quarantine_left_ms();
        let hold_ms = u64::try_from(RESTORE_HOLD.as_millis()).unwrap_or(u64::MAX);
        let wanted = if restoring && before < hold_ms {
            hold_ms
        } else {
            0
        };
        let left = self.share_quarantine(wanted).await?;
        // (A tail shorter than a check is the end of a quarantine this
        // replica already kept, read a moment after its own clock ended it.)
        let check_ms = u64::try_from(super::CHECK_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if before == 0 && left > check_ms && !restoring {
            self.joined_quarantine(left);
        }
        Ok(())
    }

    /// This replica found a quarantine of the fleet's with `left_ms` to
    /// run, which it had not started: says so, forgets the cached pins (a
    /// restore may retire what they answer live) and reports it.
    fn joined_quarantine(&self, left_ms: u64) {
        self.inner.losses_noticed.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(
            remaining = ?Duration::from_millis(left_ms),
            "the fleet is in quarantine after a loss of the Redis pin store: credentials Redis \
             does not know are answered as lost until it ends"
        );
        if let Some(cache) = &self.inner.cache {
            cache.reset();
        }
        let at = now_ms();
        let until = at.saturating_add(left_ms);
        let mut report = self.inner.report.lock().unwrap_or_else(|e| e.into_inner());
        match report.as_mut() {
            Some(report) => report.quarantine_until_ms = report.quarantine_until_ms.max(until),
            None => {
                *report = Some(LossReport {
                    what: "joined the quarantine another replica started".into(),
                    at_ms: at,
                    quarantine_until_ms: until,
                    restored: 0,
                    quarantined: 0,
                    conflicts: 0,
                    restore_done: true,
                })
            }
        }
    }

    /// At start: takes the fleet's quarantine, if one is running.
    pub(super) async fn join_quarantine(&self) -> Result<(), StoreError> {
        let left = self.share_quarantine(0).await?;
        if left > 0 {
            self.joined_quarantine(left);
        }
        Ok(())
    }

    /// A loss was seen: quarantine, and restore in the background.
    /// `sent_epoch` is the epoch (its hash) the command whose reply showed
    /// it was sent under; `None` when no command's reply did (an eviction
    /// count, a journal check).
    ///
    /// While a restore runs, replies to commands sent before it took its
    /// epoch keep showing the loss it restores: they change nothing. A
    /// loss it may not cover is kept for another restore once it ends (see
    /// [`Self::lost_during_restore`]).
    pub(super) fn on_loss(&self, loss: Loss, seen_epoch: Option<String>, sent_epoch: Option<u64>) {
        self.inner.losses_noticed.fetch_add(1, Ordering::AcqRel);
        if self.inner.recovering.swap(true, Ordering::AcqRel) {
            self.lost_during_restore(loss, seen_epoch, sent_epoch);
            return;
        }
        let until = self.start_quarantine();
        tracing::error!(
            %loss,
            quarantine = ?Duration::from_millis(self.inner.quarantine_ms),
            "the Redis pin store lost data: restoring from this replica's journal; \
             credentials Redis does not know are answered as lost until the quarantine ends"
        );
        *self.inner.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(LossReport {
            what: loss.to_string(),
            at_ms: now_ms(),
            quarantine_until_ms: until,
            restored: 0,
            quarantined: 0,
            conflicts: 0,
            restore_done: false,
        });
        let store = self.clone();
        self.inner.tasks.spawn(async move {
            store.restore_until_whole(loss, seen_epoch).await;
        });
    }

    /// Starts (or prolongs) this replica's quarantine from now, counts the
    /// loss and forgets the cached pins; returns the quarantine's end.
    fn start_quarantine(&self) -> u64 {
        let until = self.quarantine_for(self.inner.quarantine_ms);
        self.inner.metrics.store_losses.inc();
        if let Some(cache) = &self.inner.cache {
            cache.reset();
        }
        until
    }

    /// A loss seen while a restore runs. The restore writes the whole
    /// journal after it has taken its epoch, so a loss that happened
    /// before that is covered. One that happened after may have taken pins
    /// the restore had already written back (other replicas then find them
    /// neither in Redis nor, once the quarantine ends, in any quarantine):
    /// - a reply to a command sent under the restore's own epoch shows a
    ///   loss of what was written under it;
    /// - an eviction count or a journal check that cannot be placed in
    ///   time counts once the restore has taken its epoch.
    ///
    /// Such a loss prolongs the quarantine at once and brings another
    /// restore when this one ends.
    fn lost_during_restore(&self, loss: Loss, seen_epoch: Option<String>, sent_epoch: Option<u64>) {
        // Under the lock the restore's end takes too (`restore_until_whole`):
        // a loss is either kept for the running restore, or finds it ended
        // and starts one of its own; never neither.
        let ended = {
            let mut again = self
                .inner
                .lost_again
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if self.inner.recovering.load(Ordering::Acquire) {
                let restoring_under = self.inner.restore_epoch.load(Ordering::Acquire);
                let after_the_restore_began_writing =
                    restoring_under != 0 && sent_epoch.is_none_or(|sent| sent == restoring_under);
                if !after_the_restore_began_writing || again.is_some() {
                    return;
                }
                *again = Some((loss.clone(), seen_epoch.clone()));
                false
            } else {
                true
            }
        };
        if ended {
            self.on_loss(loss, seen_epoch, sent_epoch);
            return;
        }
        let until = self.start_quarantine();
        self.update_report(|report| {
            // The first loss stays named (at most one more per round).
            report.what = format!("{}; then, while it was restored: {loss}", report.what);
            report.at_ms = now_ms();
            report.quarantine_until_ms = report.quarantine_until_ms.max(until);
            report.restore_done = false;
        });
        tracing::error!(
            %loss,
            "the Redis pin store lost data again while this replica restored it: the quarantine \
             starts again, and the restore runs again when this one ends"
        );
    }

    /// Restores after `loss`, then again for every loss seen meanwhile
    /// that the restore may not cover (at most [`RESTORES_IN_A_ROW`]).
    async fn restore_until_whole(&self, mut loss: Loss, mut seen_epoch: Option<String>) {
        for round in 1..=RESTORES_IN_A_ROW {
            self.restore_with_retries(&loss, seen_epoch.as_deref())
                .await;
            let next = {
                let mut again = self
                    .inner
                    .lost_again
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let next = again.take();
                if next.is_none() || round == RESTORES_IN_A_ROW {
                    // Ended under the lock (see `lost_during_restore`).
                    self.inner.restore_epoch.store(0, Ordering::Release);
                    self.inner.recovering.store(false, Ordering::Release);
                }
                next
            };
            let Some((next, next_seen)) = next else {
                return;
            };
            if round == RESTORES_IN_A_ROW {
                tracing::error!(
                    restores = RESTORES_IN_A_ROW,
                    "Redis lost data during every restore; giving up until the next loss is seen \
                     (the quarantine goes on): check its memory and persistence"
                );
                // Still to be done: at the next start, if not sooner.
                self.inner.generation.mark_restore(true);
                self.save_generation(true).await;
                return;
            }
            // The next round writes under an epoch of its own.
            self.inner.restore_epoch.store(0, Ordering::Release);
            loss = next;
            seen_epoch = next_seen;
        }
    }

    /// One restore, tried up to [`RESTORE_ATTEMPTS`] times.
    async fn restore_with_retries(&self, loss: &Loss, seen_epoch: Option<&str>) {
        for attempt in 1..=RESTORE_ATTEMPTS {
            match self.recover(loss, seen_epoch).await {
                Ok(()) => return,
                // Refused for good: retrying cannot help (logged once).
                Err(_) if self.key_conflict().is_some() => return,
                Err(e) if attempt < RESTORE_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "restoring the pin store failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "restoring the pin store failed; giving up")
                }
            }
        }
    }

    /// Replaces the epoch `seen` (`None`: the server has none) with a new
    /// one unless another replica already did; adopts the one in force. An
    /// epoch founded where there was none sets the founding mark (see
    /// [`Self::wait_out_founding`]).
    pub(super) async fn replace_epoch(&self, seen: Option<&str>) -> Result<(), StoreError> {
        let fresh = format!("{:032x}", rand::random::<u128>());
        let wait_ms = u64::try_from(FOUNDING_WAIT.as_millis()).unwrap_or(u64::MAX);
        let args = [
            seen.unwrap_or("").as_bytes().to_vec(),
            fresh.into_bytes(),
            wait_ms.to_string().into_bytes(),
        ];
        let mut invocation = self.inner.new_epoch.prepare_invoke();
        invocation
            .key(self.epoch_key())
            .key(self.seq_key())
            .key(self.founding_key());
        for arg in &args {
            invocation.arg(arg.as_slice());
        }
        let mut connection = self.connection()?;
        let reply = self.note(invocation.invoke_async(&mut connection).await)?;
        let super::codec::GenerationReply { epoch, seq, .. } =
            super::codec::generation_reply(reply)?;
        if let Some(epoch) = epoch {
            self.inner.generation.adopt(&epoch, seq);
            *self.inner.epoch.lock().unwrap_or_else(|e| e.into_inner()) = Some(epoch);
        }
        Ok(())
    }

    /// `NS:founding`: set for [`FOUNDING_WAIT`] when an epoch is founded
    /// where there was none.
    fn founding_key(&self) -> String {
        format!("{}:founding", self.inner.prefix)
    }

    /// At start, for a replica without history of the namespace: while its
    /// generation is younger than [`FOUNDING_WAIT`] (the founding mark
    /// lives), gives the replicas already running the time to report a
    /// loss before this one serves. A new fleet and a wipe that no running
    /// replica has noticed yet look the same from here; in the second case
    /// a replica that served at once would pin lost cookies anew, through
    /// whatever exit rotation picks. That holds for the replica that founded
    /// the generation and for any that starts during the wait: the mark is
    /// set in the same step as the epoch. A running replica notices at its
    /// next round trip (the background check runs every
    /// [`super::CHECK_INTERVAL`]) and writes the quarantine's end first,
    /// which [`Self::join_quarantine`] then reads. A new fleet pays the
    /// wait once, at its first start.
    pub(super) async fn wait_out_founding(&self) -> Result<(), StoreError> {
        let mut connection = self.connection()?;
        let left: i64 = self.note(
            redis::cmd("PTTL")
                .arg(self.founding_key())
                .query_async(&mut connection)
                .await,
        )?;
        // -2: no mark (an older generation), -1: a mark without expiry,
        // which pinproxy never writes.
        let Ok(left) = u64::try_from(left) else {
            return Ok(());
        };
        let wait = Duration::from_millis(left).min(FOUNDING_WAIT);
        tracing::info!(
            ?wait,
            "Redis's generation for this namespace was founded moments ago, by a new fleet or \
             after a wipe the running replicas have not noticed yet; waiting for them to report \
             a loss before serving"
        );
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// Takes the epoch and sequence the server holds as the history.
    async fn adopt_current(&self) -> Result<(), StoreError> {
        let mut invocation = self.inner.check.prepare_invoke();
        invocation.key(self.epoch_key()).key(self.seq_key());
        let mut connection = self.connection()?;
        let reply = self.note(invocation.invoke_async(&mut connection).await)?;
        let super::codec::GenerationReply { epoch, seq, .. } =
            super::codec::generation_reply(reply)?;
        match epoch {
            Some(epoch) => {
                self.inner.generation.adopt(&epoch, seq);
                *self.inner.epoch.lock().unwrap_or_else(|e| e.into_inner()) = Some(epoch);
                Ok(())
            }
            None => self.replace_epoch(None).await,
        }
    }

    /// One restore: new epoch, hashing key, then the journal.
    async fn recover(&self, loss: &Loss, seen_epoch: Option<&str>) -> Result<(), StoreError> {
        // Saved before the new epoch is: a restore this process does not
        // live to finish is finished at its next start.
        self.inner.generation.mark_restore(true);
        self.save_generation(true).await;
        // The quarantine first, before the new epoch tells the fleet of the
        // loss: a replica starting in between would otherwise see a history
        // it takes as whole and no quarantine.
        let left = self.share_quarantine(self.quarantine_left_ms()).await?;
        let until = now_ms().saturating_add(left);
        self.update_report(|report| report.quarantine_until_ms = until);
        match loss {
            // Another replica replaced the epoch (or the server holds
            // another history): take the one in force.
            Loss::EpochChanged => self.adopt_current().await?,
            Loss::EpochMissing => self.replace_epoch(seen_epoch).await?,
            // The loss it followed already gave the fleet a new epoch (the
            // start found it in force, or would have taken this as that
            // loss): the journal is written back under it, and the other
            // replicas, which restored theirs then, are not told of a loss
            // again (a replica failing to finish at every restart would
            // otherwise quarantine the fleet at every start).
            Loss::RestoreUnfinished => {}
            Loss::WentBack { .. }
            | Loss::OwnWritesWentBack { .. }
            | Loss::JournaledPinGone
            | Loss::Evicted { .. }
            | Loss::ClockJumped { .. } => {
                let known = self
                    .inner
                    .epoch
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                self.replace_epoch(known.as_deref()).await?;
            }
        }
        // From here on the journal is written under this epoch: a loss of
        // it is one this restore may not cover (see `lost_during_restore`).
        self.inner
            .restore_epoch
            .store(self.inner.generation.epoch(), Ordering::Release);
        let hash_key = *self
            .inner
            .hash_key
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(in_use) = hash_key {
            self.reassert_hash_key(in_use).await?;
        }
        let Some(journal) = &self.inner.journal else {
            self.inner.generation.mark_restore(false);
            self.save_generation(true).await;
            return Ok(());
        };
        // The fleet's tracked cookies went with the rest: put back, or a
        // replica started next would judge a change of them by nothing
        // (see `RedisStore::fleet_tracking`).
        if let Some(patterns) = journal.tracking_on_record() {
            self.restore_fleet_tracking(&patterns).await;
        }
        let listings = journal.list().await?;
        let mut restored = 0u64;
        for listing in listings {
            self.write_identity(&restorable(&listing.identity)).await?;
            if listing.pins.is_empty() {
                continue;
            }
            let winners = self.pin_all_raw(&listing.pins).await?;
            for ((key, pin), winner) in listing.pins.iter().zip(winners) {
                if winner.pin.identity == pin.identity {
                    restored += 1;
                } else if is_tombstone(&winner) {
                    // Another replica answered the credential as lost
                    // during the quarantine, before this restore reached
                    // it: it stays lost (it leaves through no exit), and
                    // this identity's other credentials, never in doubt,
                    // keep it. Retiring it would end every identity whose
                    // cookie a client happened to send elsewhere first.
                    tracing::info!(
                        pin = %key, ours = %listing.identity.id,
                        "a credential this replica journaled was answered as lost meanwhile: it \
                         stays lost, its identity goes on"
                    );
                } else {
                    self.retire_conflict(*key, &listing.identity, &winner)
                        .await?;
                }
            }
        }
        self.inner.metrics.store_restored_pins.inc_by(restored);
        self.update_report(|r| {
            r.restored += restored;
            r.restore_done = true;
        });
        tracing::warn!(restored, "pin store restored from this replica's journal");
        self.inner.generation.mark_restore(false);
        self.save_generation(true).await;
        Ok(())
    }

    /// Two journals disagree about a pin: neither identity is trusted.
    async fn retire_conflict(
        &self,
        key: PinKey,
        ours: &Identity,
        theirs: &Binding,
    ) -> Result<(), StoreError> {
        let retirement = Retirement {
            reason: RetireReason::StoreLost,
            at_ms: now_ms(),
        };
        self.retire(ours.id, &retirement).await?;
        self.retire(theirs.pin.identity, &retirement).await?;
        self.inner.metrics.store_conflicts.inc();
        self.update_report(|r| r.conflicts += 1);
        tracing::warn!(
            pin = %key, ours = %ours.id, theirs = %theirs.pin.identity,
            "after the loss, two replicas restored one pin to two identities: both retired"
        );
        Ok(())
    }

    /// During the quarantine: every credential Redis does not know is
    /// restored from the journal, or else answered as lost.
    pub(super) async fn quarantine(
        &self,
        keys: &[PinKey],
        bindings: &mut [Option<Binding>],
    ) -> Result<(), StoreError> {
        let missing: Vec<PinKey> = keys
            .iter()
            .zip(bindings.iter())
            .filter(|(_, b)| b.is_none())
            .map(|(key, _)| *key)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let journaled = match &self.inner.journal {
            Some(journal) => journal.lookup(&missing).await?,
            None => Bindings::from_elem(None, missing.len()),
        };
        for (key, journaled) in missing.iter().zip(journaled) {
            let binding = match journaled {
                Some(Binding {
                    pin,
                    identity: Some(identity),
                }) => {
                    self.write_identity(&restorable(&identity)).await?;
                    let ours = pin.identity;
                    let winner = self.pin_all_raw(&[(*key, pin)]).await?;
                    match winner.into_iter().next() {
                        Some(winner) if winner.pin.identity == ours => {
                            self.update_report(|r| r.restored += 1);
                            self.inner.metrics.store_restored_pins.inc();
                            Some(winner)
                        }
                        // Answered as lost meanwhile by a replica whose
                        // journal does not hold it (a page's requests
                        // spread over replicas): it stays lost, and its
                        // identity goes on, as in a full restore.
                        Some(winner) if is_tombstone(&winner) => Some(winner),
                        // Pinned meanwhile to another identity (by a
                        // replica that had not noticed the loss): as in a
                        // full restore, neither is trusted, and the
                        // credential is answered as lost, not followed.
                        Some(mut winner) => {
                            self.retire_conflict(*key, &identity, &winner).await?;
                            if let Some(theirs) = winner.identity.as_mut() {
                                Arc::make_mut(theirs).retired = Some(Retirement {
                                    reason: RetireReason::StoreLost,
                                    at_ms: now_ms(),
                                });
                            }
                            Some(winner)
                        }
                        None => None,
                    }
                }
                _ => Some(self.tombstone(*key).await?),
            };
            if let Some(slot) = keys
                .iter()
                .position(|k| k == key)
                .and_then(|i| bindings.get_mut(i))
            {
                *slot = binding;
            }
        }
        Ok(())
    }

    /// Pins `key` to a retired identity (`store-lost`): answered as
    /// retired on every replica for as long as retired credentials are
    /// remembered.
    async fn tombstone(&self, key: PinKey) -> Result<Binding, StoreError> {
        let now = now_ms();
        let mut identity = Identity::new(
            ExitId::new(NO_EXIT),
            SessionId(0),
            now,
            Arc::new(Fingerprint::default()),
            now,
        );
        identity.retired = Some(Retirement {
            reason: RetireReason::StoreLost,
            at_ms: now,
        });
        self.write_identity(&identity).await?;
        let credential = Credential {
            kind: PinKind::Cookie,
            name: Arc::from("lost"),
            key,
        };
        let pin = Pin::new(identity.id, &credential, now, None);
        let winner = self
            .pin_all_raw(&[(key, pin)])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| super::codec::unexpected("a tombstone vanished"))?;
        if let Some(journal) = &self.inner.journal {
            journal.bindings(&[(key, &winner)]).await?;
        }
        self.inner.metrics.store_quarantined.inc();
        self.update_report(|r| r.quarantined += 1);
        tracing::warn!(credential = %key, "a credential the pin store lost is answered as retired (store-lost)");
        Ok(winner)
    }
}
