//! Moving pins between stores: `pinproxy store export` writes JSON lines,
//! `pinproxy store import` reads them.
//!
//! The first line names the format and the id of the pin-hashing key the
//! pins were made with (never the key itself); the last line counts what
//! the export holds, so that an export cut short (a full disk, a killed
//! process, a pipe that broke) is refused whole rather than imported in
//! part: a cookie whose pin is missing from an import looks new and may be
//! pinned anew on any exit. An import into a store whose
//! key differs is refused: its pins would never match a cookie again, and
//! worse, a reader might think they do. So is one whose pins were keyed
//! under other tracked-cookie patterns than the target's, which holds
//! cookie pins of its own: a start judges a change of `track_cookies`
//! against one recorded keying (see `daemon::untracked`), and would miss
//! the pins of the other. Cookie values never appear, only their hashes.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use super::{PinStore, Store, StoreError};
use crate::credential::PinKey;
use crate::identity::{ExitId, Identity, Pin};

/// The export format version: 2 ends with [`Record::End`]; 1 (no end
/// line) is still read, without the check for completeness.
pub const FORMAT: u32 = 2;

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Record {
    /// The first line.
    Header {
        /// Format version.
        format: u32,
        /// Id of the pin-hashing key.
        key_id: String,
        /// The tracked-cookie patterns the source records its pins were
        /// keyed under (`CookiePolicy::patterns`), if it records any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracked_cookies: Option<Vec<String>>,
    },
    /// An identity.
    Identity(Identity),
    /// A pin (its key as 32 hex digits).
    Pin {
        /// The pin key.
        key: String,
        /// The pin.
        pin: Pin,
    },
    /// An exit death.
    ExitDeath {
        /// The exit.
        exit: ExitId,
        /// When, Unix ms.
        at_ms: u64,
    },
    /// The last line: how many records of each kind came before it.
    End {
        /// Identities.
        identities: u64,
        /// Pins.
        pins: u64,
        /// Exit deaths.
        exit_deaths: u64,
    },
}

/// What a whole export holds, read by [`check`] before anything is written.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Its format version.
    pub format: u32,
    /// Identities.
    pub identities: u64,
    /// Pins.
    pub pins: u64,
    /// Exit deaths.
    pub exit_deaths: u64,
    /// Whether its end line vouches that nothing is missing (format 1
    /// exports have none).
    pub complete: bool,
}

/// What a transfer moved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Identities.
    pub identities: u64,
    /// Pins.
    pub pins: u64,
    /// Pins the target already had for another identity (kept as they were).
    pub conflicts: u64,
}

/// A transfer that cannot proceed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A line is not a record.
    #[error("line {line}: {reason}")]
    Format {
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
    /// The pins were keyed under other tracked-cookie patterns than the
    /// target's own pins.
    #[error(
        "the export's pins were keyed under other tracked-cookie patterns than this store's \
         (only the export's: {exported:?}; only this store's: {ours:?}): a start judges a \
         change of track_cookies against one of them, and would miss the other's pins of a \
         name the two key otherwise. Import into an empty store, or into one whose pinproxy \
         ran with the export's track_cookies"
    )]
    Keying {
        /// Patterns only the export's keying has.
        exported: Vec<String>,
        /// Patterns only the target's has.
        ours: Vec<String>,
    },
    /// A replica recorded the fleet's keying while the import judged it.
    #[error(
        "a replica recorded the fleet's tracked cookies while this import judged them: run \
         the import again"
    )]
    KeyingChanged,
    /// The target holds pins and records no keying of them.
    #[error(
        "this store holds pins but records no tracked-cookie patterns they were keyed under \
         (an earlier release wrote them): the export's, keyed under its own, could not be \
         judged beside them at a start. Start pinproxy on this store once, with its own \
         configuration, so that it records them, then import again"
    )]
    KeyingUnknown,
    /// The pins were hashed with another key.
    #[error(
        "the export was made with pin-hashing key {exported}, this store uses {ours}: its pins \
         would never match a cookie here (copy the source's DATA_DIR/pin-key, or export from the \
         same deployment)"
    )]
    KeyMismatch {
        /// The export's key id.
        exported: String,
        /// The target's key id.
        ours: String,
    },
}

impl TransferError {
    /// A format error placed at `line` (1-based) if it has no line yet.
    fn at(self, line: usize) -> TransferError {
        match self {
            TransferError::Format { line: 0, reason } => TransferError::Format { line, reason },
            other => other,
        }
    }
}

fn line(out: &mut impl Write, record: &Record) -> Result<(), TransferError> {
    let text = serde_json::to_string(record).map_err(|e| TransferError::Format {
        line: 0,
        reason: e.to_string(),
    })?;
    writeln!(out, "{text}")?;
    Ok(())
}

/// Writes every identity, pin and exit death of `store`.
pub async fn export(
    store: &Store,
    key_id: &str,
    out: &mut impl Write,
) -> Result<Moved, TransferError> {
    line(
        out,
        &Record::Header {
            format: FORMAT,
            key_id: key_id.to_owned(),
            tracked_cookies: store.keying_on_record().await?,
        },
    )?;
    let mut moved = Moved::default();
    for listing in store.list().await? {
        line(out, &Record::Identity(listing.identity))?;
        moved.identities += 1;
        for (key, pin) in listing.pins {
            line(
                out,
                &Record::Pin {
                    key: key.to_hex(),
                    pin,
                },
            )?;
            moved.pins += 1;
        }
    }
    let mut exit_deaths = 0;
    for (exit, at_ms) in store.exit_deaths().await? {
        line(out, &Record::ExitDeath { exit, at_ms })?;
        exit_deaths += 1;
    }
    line(
        out,
        &Record::End {
            identities: moved.identities,
            pins: moved.pins,
            exit_deaths,
        },
    )?;
    Ok(moved)
}

fn check_header(version: u32, exported: String, key_id: &str) -> Result<(), TransferError> {
    if version != 1 && version != FORMAT {
        return Err(TransferError::Format {
            line: 0,
            reason: format!("unknown export format {version}"),
        });
    }
    if exported != key_id {
        return Err(TransferError::KeyMismatch {
            exported,
            ours: key_id.to_owned(),
        });
    }
    Ok(())
}

/// How far in the future a record's creation may lie (clocks of two hosts
/// disagree by that much at most).
const CLOCK_SKEW_MS: u64 = 5 * 60_000;

/// Reads a whole export without writing anything: every line a record,
/// the header first with a key id of `key_id`, from format 2 on an end
/// line last whose counts match the records before it, and no identity or
/// pin created after `now_ms` (give or take the clocks' skew). Run before
/// [`import`], which writes as it reads.
///
/// A pin's creation bounds how long routing trusts it (its expiry is
/// capped at creation plus the longest lifetime): one dated in the future
/// would outlive its key in Redis, and its cookie, once the key expired,
/// would look new and could be pinned anew on another exit.
pub fn check(input: impl BufRead, key_id: &str, now_ms: u64) -> Result<Checked, TransferError> {
    let latest = now_ms.saturating_add(CLOCK_SKEW_MS);
    let future = |what: &str, at_ms: u64| {
        format!(
            "{what} dated {at_ms} (Unix ms), after now ({now_ms}): the export was made on a \
             host whose clock is ahead, or edited; fix the clock and export again"
        )
    };
    let mut checked = Checked::default();
    let mut header_seen = false;
    let mut ended = false;
    let mut last_line = 0;
    // What the import would otherwise settle silently: an identity twice
    // (a merge keeps the first exit, and every pin of the second follows
    // it), a pin twice (whichever write lands first wins), a pin whose
    // identity is not in the file (imported, then forgotten at the first
    // sweep, though counted as imported). Real exports hold none of them.
    let mut identities_seen = std::collections::HashSet::new();
    let mut pins_seen = std::collections::HashSet::new();
    let mut pinned_to = std::collections::HashMap::new();
    for (n, text) in input.lines().enumerate() {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        last_line = n + 1;
        let format = |reason: String| TransferError::Format {
            line: n + 1,
            reason,
        };
        let record: Record = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        if ended {
            return Err(format("a record after the end line".into()));
        }
        match record {
            Record::Header {
                format: version,
                key_id: exported,
                ..
            } if !header_seen => {
                check_header(version, exported, key_id).map_err(|e| e.at(n + 1))?;
                checked.format = version;
                header_seen = true;
            }
            _ if !header_seen => return Err(format("the export has no header line".into())),
            Record::Header { .. } => return Err(format("a second header line".into())),
            Record::Identity(identity) => {
                if identity.created_ms > latest {
                    return Err(format(future("an identity", identity.created_ms)));
                }
                if let Some(retired) = &identity.retired {
                    if retired.at_ms > latest {
                        return Err(format(future("a retirement", retired.at_ms)));
                    }
                }
                if !identities_seen.insert(identity.id) {
                    return Err(format(format!(
                        "identity {} appears twice: the export is damaged or was edited",
                        identity.id
                    )));
                }
                checked.identities += 1;
            }
            Record::Pin { key, pin } => {
                let parsed =
                    parse_key(&key).ok_or_else(|| format(format!("bad pin key {key:?}")))?;
                if pin.created_ms > latest {
                    return Err(format(future("a pin", pin.created_ms)));
                }
                if !pins_seen.insert(parsed) {
                    return Err(format(format!(
                        "pin {}#{parsed} appears twice: the export is damaged or was edited",
                        pin.name
                    )));
                }
                pinned_to.entry(pin.identity).or_insert(n + 1);
                checked.pins += 1;
            }
            Record::ExitDeath { exit, at_ms } => {
                if at_ms > latest {
                    return Err(format(future(&format!("exit {exit}'s death"), at_ms)));
                }
                checked.exit_deaths += 1
            }
            Record::End {
                identities,
                pins,
                exit_deaths,
            } => {
                let counted = (checked.identities, checked.pins, checked.exit_deaths);
                if (identities, pins, exit_deaths) != counted {
                    return Err(format(format!(
                        "the end line counts {identities} identities, {pins} pins and \
                         {exit_deaths} exit deaths, the export holds {}, {} and {}: it is \
                         damaged",
                        counted.0, counted.1, counted.2
                    )));
                }
                ended = true;
            }
        }
    }
    if !header_seen {
        return Err(TransferError::Format {
            line: last_line,
            reason: "the export is empty".into(),
        });
    }
    checked.complete = ended;
    let orphan = pinned_to
        .iter()
        .filter(|(identity, _)| !identities_seen.contains(*identity))
        .min_by_key(|(_, line)| **line);
    if let Some((identity, line)) = orphan {
        return Err(TransferError::Format {
            line: *line,
            reason: format!(
                "a pin of identity {identity}, which the export does not hold: it is damaged \
                 or was edited"
            ),
        });
    }
    if checked.format >= 2 && !ended {
        return Err(TransferError::Format {
            line: last_line,
            reason: "the export ends before its end line: it was cut short (a full disk, a \
                     killed export, a broken pipe); export again"
                .into(),
        });
    }
    Ok(checked)
}

fn parse_key(hex: &str) -> Option<PinKey> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(PinKey::from_bytes(bytes))
}

/// Pins imported at once: enough for the durable store to commit them in
/// large groups, few enough to bound memory.
const IMPORT_CONCURRENCY: usize = 256;

/// Reads an export into `store` (whose pin-hashing key has id `key_id`).
/// Existing pins win over imported ones: pins never move. A record created
/// after `now_ms` (within the skew [`check`] allows) is taken as created
/// now.
pub async fn import(
    store: &Store,
    key_id: &str,
    input: impl BufRead,
    now_ms: u64,
) -> Result<Moved, TransferError> {
    use futures_util::stream::{FuturesUnordered, StreamExt};

    let mut moved = Moved::default();
    let mut header_seen = false;
    let mut in_flight = FuturesUnordered::new();
    for (n, text) in input.lines().enumerate() {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        let format = |reason: String| TransferError::Format {
            line: n + 1,
            reason,
        };
        let record: Record = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        match record {
            Record::Header {
                format: version,
                key_id: exported,
                tracked_cookies,
            } => {
                check_header(version, exported, key_id).map_err(|e| e.at(n + 1))?;
                adopt_keying(store, tracked_cookies).await?;
                header_seen = true;
            }
            _ if !header_seen => return Err(format("the export has no header line".into())),
            // An identity is written before any pin that points to it (the
            // export lists it first), and its write is queued first.
            Record::Identity(mut identity) => {
                // No time of it later than now (`check` let through the
                // clocks' skew): a session started in the future would
                // stretch its sticky window by as much.
                identity.created_ms = identity.created_ms.min(now_ms);
                identity.session_started_ms = identity.session_started_ms.min(now_ms);
                identity.last_used_ms = identity.last_used_ms.min(now_ms);
                store.create_identity(&identity).await?;
                moved.identities += 1;
            }
            Record::Pin { key, mut pin } => {
                // No later than now (`check` let through the clocks'
                // skew): the pin's creation bounds how long it is trusted,
                // and Redis keeps its key from now on.
                pin.created_ms = pin.created_ms.min(now_ms);
                let key = parse_key(&key).ok_or_else(|| format(format!("bad pin key {key:?}")))?;
                in_flight.push(async move {
                    let kept = store.pin_if_absent(key, &pin).await?;
                    Ok::<bool, StoreError>(kept.pin.identity == pin.identity)
                });
                if in_flight.len() >= IMPORT_CONCURRENCY {
                    count(&mut moved, in_flight.next().await)?;
                }
            }
            Record::ExitDeath { exit, at_ms } => store.record_exit_death(&exit, at_ms).await?,
            // Checked by `check` before anything was written.
            Record::End { .. } => {}
        }
    }
    while let Some(done) = in_flight.next().await {
        count(&mut moved, Some(done))?;
    }
    Ok(moved)
}

/// Before anything is imported: the target records the keying of the
/// export's pins (`exported`) where it holds no cookie pin of its own, and
/// refuses an export keyed otherwise than the cookie pins it holds. An
/// export that records none (made by an earlier release) is taken as keyed
/// as the target's pins, and said so.
async fn adopt_keying(store: &Store, exported: Option<Vec<String>>) -> Result<(), TransferError> {
    if let Some(bad) = exported
        .iter()
        .flatten()
        .find(|p| p.is_empty() || p.chars().any(char::is_whitespace))
    {
        return Err(TransferError::Format {
            line: 1,
            reason: format!(
                "the header's tracked cookies hold a pattern that cannot be one: {bad:?}"
            ),
        });
    }
    let Some(exported) = exported else {
        tracing::warn!(
            "the export does not record the tracked-cookie patterns its pins were keyed \
             under (an earlier release made it): a start judges them as this store's own"
        );
        return Ok(());
    };
    let ours = store.keying_on_record().await?;
    let only = super::patterns_only_in;
    let alike =
        |ours: &[String]| only(&exported, ours).is_empty() && only(ours, &exported).is_empty();
    if ours.as_deref().is_some_and(alike) {
        return Ok(());
    }
    match &ours {
        Some(ours) if store.may_hold_pins().await? => {
            return Err(TransferError::Keying {
                exported: only(&exported, ours),
                ours: only(ours, &exported),
            })
        }
        None if store.may_hold_pins().await? => return Err(TransferError::KeyingUnknown),
        _ => {}
    }
    let patterns: Vec<Box<str>> = exported.iter().map(|p| p.as_str().into()).collect();
    store.record_tracking(&patterns).await?;
    match store
        .claim_fleet_tracking(ours.as_deref(), &patterns)
        .await?
    {
        None => Ok(()),
        Some(_) => Err(TransferError::KeyingChanged),
    }
}

fn count(moved: &mut Moved, done: Option<Result<bool, StoreError>>) -> Result<(), StoreError> {
    match done {
        Some(Ok(true)) => moved.pins += 1,
        Some(Ok(false)) => moved.conflicts += 1,
        Some(Err(e)) => return Err(e),
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::PinKind;
    use crate::fingerprint::Fingerprint;
    use crate::identity::{ExitId, SessionId};
    use crate::store::memory::MemoryStore;
    use std::sync::Arc;

    /// An identity on exit `e1` in `store`, with one `datadome` pin.
    async fn pinned_identity(store: &Store) -> (Identity, PinKey) {
        let identity = Identity::new(
            ExitId::new("e1"),
            SessionId(1),
            5,
            Arc::new(Fingerprint::default()),
            5,
        );
        store.create_identity(&identity).await.unwrap();
        let pin = Pin {
            identity: identity.id,
            kind: PinKind::Cookie,
            name: Arc::from("datadome"),
            created_ms: 5,
            expires_ms: None,
        };
        let key = PinKey::from_bytes([9; 16]);
        store.pin_if_absent(key, &pin).await.unwrap();
        (identity, key)
    }

    #[tokio::test]
    async fn export_then_import_round_trips_and_checks_the_key() {
        let source = Store::Memory(MemoryStore::new());
        let (identity, key) = pinned_identity(&source).await;
        source
            .record_exit_death(&ExitId::new("e2"), 77)
            .await
            .unwrap();

        let mut file = Vec::new();
        let exported = export(&source, "k1", &mut file).await.unwrap();
        assert_eq!((exported.identities, exported.pins), (1, 1));
        let text = String::from_utf8(file.clone()).unwrap();
        assert!(
            text.starts_with("{\"header\":{\"format\":2,\"key_id\":\"k1\"}}"),
            "{text}"
        );
        assert!(
            text.contains(&format!("\"id\":\"{}\"", identity.id)),
            "ids are hex strings: {text}"
        );

        let target = Store::Memory(MemoryStore::new());
        let wrong = import(&target, "k2", file.as_slice(), NOW).await;
        assert!(matches!(wrong, Err(TransferError::KeyMismatch { .. })));
        let imported = import(&target, "k1", file.as_slice(), NOW).await.unwrap();
        assert_eq!(
            imported,
            Moved {
                identities: 1,
                pins: 1,
                conflicts: 0
            }
        );
        let found = target.lookup(&[key]).await.unwrap();
        assert_eq!(
            found[0].as_ref().unwrap().identity.as_ref().unwrap().exit,
            ExitId::new("e1")
        );
        assert_eq!(
            target.exit_deaths().await.unwrap(),
            vec![(ExitId::new("e2"), 77)]
        );
    }

    /// An export says how its pins were keyed: a store holding cookie
    /// pins keyed otherwise refuses it before anything is written; one
    /// holding none takes its keying, which the next start judges by.
    #[tokio::test]
    async fn an_import_keyed_otherwise_than_the_stores_own_pins_is_refused() {
        use crate::store::durable::{DurableStore, STORE_FILE};
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| Store::Durable(DurableStore::open(&dir.path().join(name)).unwrap());
        let source = open("source");
        source
            .record_tracking(&["datadome".into(), "sid".into()])
            .await
            .unwrap();
        pinned_identity(&source).await;
        let mut file = Vec::new();
        export(&source, "k1", &mut file).await.unwrap();
        let text = String::from_utf8(file.clone()).unwrap();
        assert!(
            text.contains(r#""tracked_cookies":["datadome","sid"]"#),
            "{text}"
        );

        let target = open(STORE_FILE);
        target
            .record_tracking(&["datadome".into(), "Sid".into()])
            .await
            .unwrap();
        let (_, key) = pinned_identity(&target).await;
        let refused = import(&target, "k1", file.as_slice(), NOW)
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, TransferError::Keying { exported, ours }
                if exported == &["sid"] && ours == &["Sid"]),
            "{refused}"
        );
        assert_eq!(target.list().await.unwrap().len(), 1, "nothing imported");

        let unrecorded = open("unrecorded");
        pinned_identity(&unrecorded).await;
        let refused = import(&unrecorded, "k1", file.as_slice(), NOW)
            .await
            .unwrap_err();
        assert!(matches!(refused, TransferError::KeyingUnknown), "{refused}");
        assert_eq!(unrecorded.keying_on_record().await.unwrap(), None);

        // The same patterns in another order key alike.
        let reordered = open("reordered");
        reordered
            .record_tracking(&["sid".into(), "datadome".into()])
            .await
            .unwrap();
        pinned_identity(&reordered).await;
        import(&reordered, "k1", file.as_slice(), NOW)
            .await
            .unwrap();

        let empty = open("empty");
        empty
            .record_tracking(&["datadome".into(), "Sid".into()])
            .await
            .unwrap();
        import(&empty, "k1", file.as_slice(), NOW).await.unwrap();
        assert_eq!(
            empty.keying_on_record().await.unwrap(),
            Some(vec!["datadome".to_owned(), "sid".to_owned()])
        );
        assert!(empty.lookup(&[key]).await.unwrap()[0].is_some());
    }

    /// "Now" for the checks: the fixture's records were made at 5 ms.
    const NOW: u64 = 10;

    /// An export is checked whole before anything is written: cut short,
    /// miscounted or with a line after its end, it is refused; a format 1
    /// export (no end line) is read but not vouched for.
    #[tokio::test]
    async fn an_export_cut_short_is_refused_before_anything_is_written() {
        let source = Store::Memory(MemoryStore::new());
        pinned_identity(&source).await;
        let mut file = Vec::new();
        export(&source, "k1", &mut file).await.unwrap();
        let text = String::from_utf8(file).unwrap();
        let checked = check(text.as_bytes(), "k1", NOW).unwrap();
        assert_eq!(
            checked,
            Checked {
                format: 2,
                identities: 1,
                pins: 1,
                exit_deaths: 0,
                complete: true
            }
        );
        let lines: Vec<&str> = text.lines().collect();
        let cut = lines[..lines.len() - 1].join("\n");
        let refused = check(cut.as_bytes(), "k1", NOW).unwrap_err().to_string();
        assert!(refused.contains("cut short"), "{refused}");
        let without_pin = [lines[0], lines[1], lines[3]].join("\n");
        let refused = check(without_pin.as_bytes(), "k1", NOW)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("damaged"), "{refused}");
        let after_end = format!("{text}{}\n", lines[2]);
        let refused = check(after_end.as_bytes(), "k1", NOW)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("after the end line"), "{refused}");
        assert!(matches!(
            check(text.as_bytes(), "k2", NOW),
            Err(TransferError::KeyMismatch { .. })
        ));
        assert!(check(&b""[..], "k1", NOW).is_err());

        let version_one =
            lines[..lines.len() - 1]
                .join("\n")
                .replacen("\"format\":2", "\"format\":1", 1);
        let checked = check(version_one.as_bytes(), "k1", NOW).unwrap();
        assert_eq!((checked.format, checked.complete), (1, false));
        let target = Store::Memory(MemoryStore::new());
        let imported = import(&target, "k1", version_one.as_bytes(), NOW)
            .await
            .unwrap();
        assert_eq!(imported.pins, 1);

        // Made on a host whose clock was a day ahead.
        let skewed = check(text.as_bytes(), "k1", 0).map(drop);
        assert!(skewed.is_ok(), "5 ms ahead is within the clocks' skew");
        // Within the skew: imported as created now, never later.
        let target = Store::Memory(MemoryStore::new());
        import(&target, "k1", text.as_bytes(), 2).await.unwrap();
        let listed = target.list().await.unwrap();
        assert_eq!(listed[0].identity.created_ms, 2);
        // Its session's start too (a start in the future would stretch
        // its sticky window), and its last use.
        let imported = &listed[0].identity;
        assert_eq!((imported.session_started_ms, imported.last_used_ms), (2, 2));
        assert_eq!(listed[0].pins[0].1.created_ms, 2);
        let ahead = text.replace("\"created_ms\":5", "\"created_ms\":86400005");
        let refused = check(ahead.as_bytes(), "k1", NOW).unwrap_err().to_string();
        assert!(refused.contains("after now"), "{refused}");
    }

    /// What no export holds, and an import would settle silently, is
    /// refused before anything is written: an identity or a pin twice, a
    /// pin of an identity the file does not hold, a retirement or an exit
    /// death dated in the future.
    #[tokio::test]
    async fn records_no_export_holds_are_refused() {
        use crate::identity::{RetireReason, Retirement};
        let source = Store::Memory(MemoryStore::new());
        let (identity, _) = pinned_identity(&source).await;
        source
            .record_exit_death(&ExitId::new("e2"), 7)
            .await
            .unwrap();
        let mut file = Vec::new();
        export(&source, "k1", &mut file).await.unwrap();
        let text = String::from_utf8(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Format 1 has no end line to count against.
        let header = lines[0].replacen("\"format\":2", "\"format\":1", 1);
        let (ident, pin, death) = (lines[1], lines[2], lines[3]);
        let refused = |records: &[&str]| {
            let file = std::iter::once(header.as_str())
                .chain(records.iter().copied())
                .collect::<Vec<_>>()
                .join("\n");
            check(file.as_bytes(), "k1", NOW)
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert_eq!(refused(&[ident, pin, death]), Ok(()));
        let elsewhere = ident.replace("\"e1\"", "\"e2\"");
        let twice = refused(&[ident, pin, &elsewhere]).unwrap_err();
        assert!(
            twice.contains("appears twice") && twice.contains("line 4"),
            "{twice}"
        );
        let twice = refused(&[ident, pin, pin]).unwrap_err();
        assert!(twice.contains("appears twice"), "{twice}");
        let orphan = refused(&[pin]).unwrap_err();
        assert!(
            orphan.contains("does not hold") && orphan.contains("line 2"),
            "{orphan}"
        );
        let mut retired = identity.clone();
        retired.retired = Some(Retirement {
            reason: RetireReason::Evicted,
            at_ms: 86_400_000,
        });
        let retired = serde_json::to_string(&Record::Identity(retired)).unwrap();
        let ahead = refused(&[&retired, pin]).unwrap_err();
        assert!(ahead.contains("after now"), "{ahead}");
        let dead = death.replace("\"at_ms\":7", "\"at_ms\":86400000");
        let ahead = refused(&[ident, pin, &dead]).unwrap_err();
        assert!(ahead.contains("after now"), "{ahead}");
    }

    /// An older export imported into the store it came from brings back no
    /// identity retired since: the retirement stands, as on Redis.
    #[tokio::test]
    async fn an_import_never_undoes_a_retirement() {
        use crate::identity::{RetireReason, Retirement};
        let store = Store::Memory(MemoryStore::new());
        let (identity, key) = pinned_identity(&store).await;
        let mut file = Vec::new();
        export(&store, "k1", &mut file).await.unwrap();
        let evicted = Retirement {
            reason: RetireReason::Evicted,
            at_ms: 9,
        };
        store.retire(identity.id, &evicted).await.unwrap();

        import(&store, "k1", file.as_slice(), NOW).await.unwrap();
        let found = store.lookup(&[key]).await.unwrap();
        let now = found[0].as_ref().unwrap().identity.clone().unwrap();
        assert_eq!(now.retired, Some(evicted));
    }
}
