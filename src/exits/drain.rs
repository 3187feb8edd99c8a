//! Drained exits, remembered in the data directory.
//!
//! An operator drains an exit before maintenance (`POST /exits/ID/drain`):
//! it takes no new identities and no rotated traffic, while the identities
//! it carries continue. A drain is meant to hold until the operator undoes
//! it, so it outlives reloads (the exit keeps its state) and restarts (the
//! ids are kept in `DATA_DIR/drained-exits.json`, read at start). An exit
//! that is removed from the configuration is forgotten here too.

use std::path::{Path, PathBuf};

use super::{ExitSet, LiveExits};

/// The file in the data directory that lists drained exit ids.
pub const DRAIN_FILE: &str = "drained-exits.json";

/// Where the drained exits are written; writes are serialised.
#[derive(Debug)]
pub struct DrainBook {
    path: PathBuf,
    writing: tokio::sync::Mutex<()>,
}

impl DrainBook {
    /// The book in `data_dir`.
    pub fn new(data_dir: &Path) -> DrainBook {
        DrainBook {
            path: data_dir.join(DRAIN_FILE),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// The exit ids drained when the daemon last wrote the book (none when
    /// there is no book). Blocking: call it at start, off the runtime.
    pub fn read(&self) -> std::io::Result<Vec<String>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Drains the exits of `exits` the book lists; returns the ids it
    /// listed that are not configured (now forgotten).
    pub fn apply(&self, listed: &[String], exits: &ExitSet) -> Vec<String> {
        let mut unknown = Vec::new();
        for id in listed {
            match exits.iter().find(|e| e.id().as_str() == id) {
                Some(exit) => {
                    exit.set_drained(true);
                }
                None => unknown.push(id.clone()),
            }
        }
        unknown
    }

    /// Writes the drained exits of the set in force (atomically: a crash
    /// leaves the old book or the new one). The set is read once this
    /// write's turn has come: a drain and a reload writing at once would
    /// otherwise let the later write carry the earlier set, losing the
    /// other's change at the next start.
    pub async fn write(&self, exits: &LiveExits) -> std::io::Result<()> {
        let _one_at_a_time = self.writing.lock().await;
        let drained = exits.load().drained();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&path, &drained))
            .await
            .map_err(std::io::Error::other)?
    }
}

fn write_atomically(path: &Path, drained: &[String]) -> std::io::Result<()> {
    let text = serde_json::to_vec(drained).map_err(std::io::Error::other)?;
    crate::fsutil::replace_private(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_book_round_trips_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let book = DrainBook::new(dir.path());
        assert!(book.read().unwrap().is_empty());
        write_atomically(&dir.path().join(DRAIN_FILE), &["res1".into()]).unwrap();
        assert_eq!(book.read().unwrap(), ["res1"]);
    }
}
