//! `pinproxy ca install --nssdb DIR`: trusting the CA in an NSS database,
//! the trust store of Chromium on Linux (`$HOME/.pki/nssdb`) and of Firefox
//! profiles.
//!
//! The work is NSS's own `certutil` (Debian: libnss3-tools): the database
//! format is NSS's business, so pinproxy only runs the two commands a user
//! would type. When `certutil` is not installed, the error carries those
//! exact commands so the user can run them elsewhere or after installing it.
//!
//! Runs from the command line only, never on the proxy's runtime: it blocks
//! on child processes.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustls_pki_types::CertificateDer;

/// What `install` did.
#[derive(Debug)]
pub struct Installed {
    /// The database, as certutil names it (`sql:DIR`).
    pub database: String,
    /// The nickname the CA was stored under (its subject common name).
    pub nickname: String,
    /// Whether the database had to be created first.
    pub created: bool,
}

/// Why the CA could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum NssError {
    /// `certutil` is not on `PATH`.
    #[error(
        "certutil not found on PATH (Debian/Ubuntu: apt-get install libnss3-tools; \
         Fedora: dnf install nss-tools). To do it by hand, run:\n{commands}"
    )]
    CertutilMissing {
        /// The commands that would have been run, one per line.
        commands: String,
    },
    /// The database directory cannot be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// certutil ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Certutil {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on standard error.
        stderr: String,
    },
    /// certutil could not be started.
    #[error("cannot run certutil: {0}")]
    Spawn(std::io::Error),
}

/// The nickname the CA is stored under: its subject common name, which is
/// unique per installation ("pinproxy CA 1a2b3c4d"), so two pinproxy CAs
/// in one database never overwrite each other.
pub fn nickname(ca_der: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(ca_der)
        .ok()
        .and_then(|(_, cert)| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok().map(str::to_owned))
        })
        .unwrap_or_else(|| "pinproxy CA".to_owned())
}

/// Trusts the CA at `ca_path` for TLS servers in the NSS database in
/// `db_dir`, creating the directory and an empty-password database first
/// when there is none. Running it twice is harmless: certutil replaces the
/// entry.
pub fn install(
    ca_path: &Path,
    ca_der: &CertificateDer<'_>,
    db_dir: &Path,
) -> Result<Installed, NssError> {
    let nickname = nickname(ca_der);
    let database = format!("sql:{}", db_dir.display());
    let create = create_args(&database);
    let add = add_args(&database, &nickname, ca_path);
    let needs_create = !db_dir.join("cert9.db").exists();

    let Some(certutil) = find_on_path("certutil") else {
        let mut commands = Vec::new();
        if needs_create {
            commands.push(format!("mkdir -p {}", shell_quote(db_dir.as_os_str())));
            commands.push(command_line(&create));
        }
        commands.push(command_line(&add));
        return Err(NssError::CertutilMissing {
            commands: commands.join("\n"),
        });
    };
    if needs_create {
        std::fs::create_dir_all(db_dir).map_err(|source| NssError::CreateDir {
            path: db_dir.to_owned(),
            source,
        })?;
        run(&certutil, &create)?;
    }
    run(&certutil, &add)?;
    Ok(Installed {
        database,
        nickname,
        created: needs_create,
    })
}

fn create_args(database: &str) -> Vec<String> {
    ["certutil", "-N", "-d", database, "--empty-password"]
        .map(str::to_owned)
        .to_vec()
}

fn add_args(database: &str, nickname: &str, ca_path: &Path) -> Vec<String> {
    // "C,,": a trusted CA for TLS servers only (not e-mail, not code signing).
    let ca_path = ca_path.display().to_string();
    [
        "certutil", "-A", "-d", database, "-n", nickname, "-t", "C,,", "-i", &ca_path,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn run(certutil: &Path, args: &[String]) -> Result<(), NssError> {
    let output = Command::new(certutil)
        .args(&args[1..])
        .output()
        .map_err(NssError::Spawn)?;
    if output.status.success() {
        return Ok(());
    }
    Err(NssError::Certutil {
        command: command_line(args),
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn command_line(args: &[String]) -> String {
    args.iter()
        .map(|arg| shell_quote(OsStr::new(arg)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes `word` for a POSIX shell when it needs it.
fn shell_quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:,=@%+".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_the_shell_would_split() {
        assert_eq!(
            shell_quote(OsStr::new("sql:/home/a/.pki/nssdb")),
            "sql:/home/a/.pki/nssdb"
        );
        assert_eq!(
            shell_quote(OsStr::new("pinproxy CA 1a")),
            "'pinproxy CA 1a'"
        );
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(shell_quote(OsStr::new("")), "''");
    }
}
