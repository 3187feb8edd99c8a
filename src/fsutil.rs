//! Small filesystem helpers for secrets in the data directory.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Creates `path` for writing with mode 0600, failing if it already exists,
/// so a secret is never readable by others, not even for a moment.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Reads a secret: `None` when there is no file; refused when the group or
/// others may read it (whoever can read a pin key can link every pin to
/// the cookie values it was hashed from).
pub fn read_private(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::os::unix::fs::PermissionsExt;
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} has mode {mode:04o}: it must be readable by its owner alone (run `chmod 600 {}`)",
                path.display(),
                path.display()
            ),
        ));
    }
    Ok(Some(bytes))
}

/// Creates a directory (and parents) with mode 0700 where it does not exist.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Replaces `path` with `bytes` atomically, mode 0644 (readable by all)
/// from the start (see [`Replacement::begin_public`]).
pub fn replace_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut replacement = Replacement::begin_public(path)?;
    replacement.file().write_all(bytes)?;
    replacement.commit()
}

/// Replaces `path` with `bytes` atomically (a crash leaves the old file or
/// the new one), mode 0600 (see [`Replacement`]).
pub fn replace_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut replacement = Replacement::begin(path)?;
    replacement.file().write_all(bytes)?;
    replacement.commit()
}

/// A file that takes the place of `path` whole or not at all, mode 0600:
/// written to `PATH.tmp`, synced, renamed over `path`, and the directory
/// synced so the rename survives a power loss. A `PATH.tmp` a crash (or an
/// abandoned replacement) left behind is replaced, never an obstacle; two
/// writers of one file must take turns (the temporary file is shared).
#[derive(Debug)]
pub struct Replacement {
    path: PathBuf,
    temp: PathBuf,
    file: File,
}

impl Replacement {
    /// Starts writing the file that will replace `path`.
    pub fn begin(path: &Path) -> std::io::Result<Replacement> {
        Replacement::begin_as(path, ".tmp", create_private)
    }

    /// The same for a file readable by all (mode 0644 from its creation,
    /// whatever the umask), through a temporary file of this process's
    /// own: several processes (replicas publishing one certificate) may
    /// replace it at once, the last rename winning.
    pub fn begin_public(path: &Path) -> std::io::Result<Replacement> {
        use std::os::unix::fs::PermissionsExt as _;
        let suffix = format!(".{}.tmp", std::process::id());
        Replacement::begin_as(path, &suffix, |temp| {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(temp)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            Ok(file)
        })
    }

    /// Starts writing `path` + `suffix`, made by `create` (a leftover one
    /// removed first), to replace `path`.
    fn begin_as(
        path: &Path,
        suffix: &str,
        create: impl FnOnce(&Path) -> std::io::Result<File>,
    ) -> std::io::Result<Replacement> {
        let mut temp = path.as_os_str().to_owned();
        temp.push(suffix);
        let temp = PathBuf::from(temp);
        match std::fs::remove_file(&temp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = create(&temp)?;
        Ok(Replacement {
            path: path.to_owned(),
            temp,
            file,
        })
    }

    /// The file being written.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Syncs the file and puts it in place of `path`.
    pub fn commit(self) -> std::io::Result<()> {
        self.file.sync_all()?;
        drop(self.file);
        std::fs::rename(&self.temp, &self.path)?;
        sync_parent(&self.path);
        Ok(())
    }
}

/// Syncs the directory holding `path`, so that a file just created or
/// renamed there survives a power loss by name, not only by content (on
/// some file systems, btrfs among them, syncing one file does not persist
/// another's directory entry). Best effort: the file is in place either
/// way, and some file systems refuse to sync a directory.
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = File::open(dir).and_then(|dir| dir.sync_all()) {
            tracing::debug!(error = %e, dir = %dir.display(), "could not sync the directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary file a crash left behind does not stop the next write,
    /// and the file written is its owner's alone.
    #[test]
    fn a_replacement_survives_a_stale_temporary_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(dir.path().join("state.json.tmp"), b"half").unwrap();
        replace_private(&path, b"one").unwrap();
        replace_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("state.json.tmp").exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A secret others may read is refused, one that is missing is none.
    #[test]
    fn a_secret_is_read_only_when_its_owner_alone_may_read_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet-pin-key");
        assert!(read_private(&path).unwrap().is_none());
        replace_private(&path, b"key").unwrap();
        assert_eq!(read_private(&path).unwrap().as_deref(), Some(&b"key"[..]));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let refused = read_private(&path).unwrap_err().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
    }
}
