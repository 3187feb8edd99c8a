//! The command line: the arguments of every subcommand, and [`run()`], which
//! dispatches to the subcommand's own module. Flags overlay the TOML file
//! given by `--config` (flags win; a repeatable flag given at all replaces
//! the file's list).

pub mod ca;
pub mod pins;
pub mod run;
pub mod runtime;
pub mod selftest;
pub mod store;
pub mod user;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, ExitConfig};
use crate::exits::{ExitSpec, ExitUrlError};

/// Runs the subcommand `cli` names.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Ca(args) => ca::ca(args),
        Command::Pins(args) => pins::run(args),
        Command::Store(args) => store::store(args),
        Command::User(args) => user::user(args),
        Command::Selftest(args) => selftest::selftest(args),
    }
}

/// pinproxy: a MITM forward proxy that pins every anti-bot session cookie to
/// the exit that earned it.
#[derive(Debug, Parser)]
#[command(
    name = "pinproxy",
    version,
    after_help = "Quick start:\n  pinproxy run --exit http://user:pass@proxy1:8080 --exit http://proxy2:8080\n  \
                  curl -x http://127.0.0.1:8080 --cacert \"$(pinproxy ca)\" https://example.com/"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Print the path of the CA certificate clients must trust (created if missing).
    Ca(CaArgs),
    /// List identities (exit, age, last use, requests, credentials) from a running daemon.
    Pins(PinsArgs),
    /// Inspect or move the pin store (stop the daemon first for the embedded store).
    Store(StoreArgs),
    /// Proxy users: `user add NAME` prints an [[auth.users]] entry.
    User(UserArgs),
    /// Send canary requests through each exit to a local echo origin and
    /// report what arrived (egress address, headers, TLS); fails on a leak.
    Selftest(SelftestArgs),
}

/// `pinproxy selftest`.
#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Configuration file (its exits are tested).
    #[command(flatten)]
    pub common: CommonArgs,
    /// Exit to test instead of the configured ones, repeatable: [ID=]URL.
    #[arg(long = "exit", value_name = "[ID=]URL")]
    pub exits: Vec<String>,
    /// Where the echo origin listens; exits must be able to reach it.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub echo_listen: SocketAddr,
    /// The name exits reach the echo origin by [default: localhost on loopback, else its IP].
    #[arg(long, value_name = "HOST")]
    pub echo_host: Option<String>,
    /// Print one JSON object per exit instead of the report.
    #[arg(long)]
    pub json: bool,
}

/// `pinproxy user`.
#[derive(Debug, Args)]
pub struct UserArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: UserAction,
}

/// `pinproxy user` actions.
#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Read a password (from the terminal without echo, or --password-stdin)
    /// and print the [[auth.users]] entry with its argon2id hash.
    Add {
        /// The user name (clients send NAME or NAME-session-KEY).
        #[arg(value_name = "NAME")]
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Exit id the user may use, repeatable [default: every exit].
        #[arg(long = "exit", value_name = "ID")]
        exits: Vec<String>,
    },
}

/// `pinproxy store`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Configuration file, data directory and store.
    #[command(flatten)]
    pub common: CommonArgs,
    /// What to do.
    #[command(subcommand)]
    pub action: StoreAction,
}

/// `pinproxy store` actions.
#[derive(Debug, Subcommand)]
pub enum StoreAction {
    /// How many pins and identities the store holds.
    Stats,
    /// Write every identity and pin (hashes only) as JSON lines.
    Export {
        /// Output file [default: standard output].
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Read an export into the store (existing pins win).
    Import {
        /// The export file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Measure how fast the store takes new pins (writes synthetic pins, so
    /// it needs an empty store); prints one JSON line.
    Bench {
        /// Pins to write.
        #[arg(long, default_value_t = 20_000)]
        pins: u64,
        /// Concurrent writers.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
}

/// Options shared by every subcommand that reads the configuration.
#[derive(Debug, Args, Default)]
pub struct CommonArgs {
    /// TOML configuration file (see config/pinproxy.example.toml).
    #[arg(long, value_name = "FILE", env = "PINPROXY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Directory for the CA, the pin-hashing key and pins [default: ~/.local/share/pinproxy].
    #[arg(long, value_name = "DIR", env = "PINPROXY_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Pin store: embedded (durable file in the data directory), memory, or redis://host:port/db.
    #[arg(long, value_name = "URL", env = "PINPROXY_STORE", global = true)]
    pub store: Option<String>,
    /// Directory holding the CA (ca.pem, ca-key.pem), shared by a fleet's replicas
    /// [default: the data directory].
    #[arg(long, value_name = "DIR", env = "PINPROXY_CA_DIR", global = true)]
    pub ca_dir: Option<PathBuf>,
}

/// `pinproxy run`.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Configuration file and data directory.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback admin endpoint (it has no authentication).
    #[arg(long)]
    pub allow_remote: bool,
    /// Allow a non-loopback proxy listener without [[auth.users]]: an open proxy.
    #[arg(long)]
    pub insecure_open_proxy: bool,
    // The brackets are the help text's (clap shows this comment), not a link.
    #[allow(rustdoc::broken_intra_doc_links)]
    /// Upstream exit, repeatable: http://[user:pass@]host:port, direct:// or direct://SOURCE_IP,
    /// optionally named ID=URL [default id: host:port]. None: one built-in `direct` exit.
    #[arg(long = "exit", value_name = "[ID=]URL")]
    pub exits: Vec<String>,
    /// Extra PEM file of CA certificates to trust for origins, repeatable.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// Extra cookie name or glob to pin (added to the built-in anti-bot set), repeatable.
    #[arg(long = "track-cookie", value_name = "PATTERN")]
    pub track_cookies: Vec<String>,
    /// Admin endpoint address (metrics, identities) [default: 127.0.0.1:8081]; `off` disables it.
    #[arg(long, value_name = "ADDR|off")]
    pub admin: Option<String>,
    /// Log line format: text or json (one object per line) [default: text].
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<crate::telemetry::LogFormat>,
    /// One info line per request (exit, identity, cookie names, pin decision, status, timings) [default: on].
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    pub access_log: Option<String>,
    /// Write the CA certificate clients trust (the bundle during a rotation) to FILE at start,
    /// readable by all: for a client container, without the data directory's secrets.
    #[arg(long, value_name = "FILE", env = "PINPROXY_PUBLISH_CA")]
    pub publish_ca: Option<PathBuf>,
}

/// `pinproxy pins`.
#[derive(Debug, Args)]
pub struct PinsArgs {
    /// The daemon's admin endpoint.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    pub admin: SocketAddr,
    /// Print JSON (one object per identity) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Include retired identities.
    #[arg(long)]
    pub all: bool,
}

/// `pinproxy ca`.
#[derive(Debug, Args, Default)]
pub struct CaArgs {
    /// Configuration file and data directory.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print the PEM itself instead of its path.
    #[arg(long)]
    pub pem: bool,
    /// Domain a newly created (or rotated) CA may sign for, repeatable (X.509
    /// name constraints) [default: ca.permitted_domains; none: unconstrained].
    #[arg(long = "permitted-domain", value_name = "DOMAIN")]
    pub permitted_domains: Vec<String>,
    /// Install the CA into a client's trust store instead of printing it.
    #[command(subcommand)]
    pub action: Option<CaAction>,
}

/// `pinproxy ca` actions.
#[derive(Debug, Subcommand)]
pub enum CaAction {
    /// Trust the CA in an NSS database (Chromium: ~/.pki/nssdb; Firefox: the
    /// profile directory) with certutil from libnss3-tools, creating the
    /// database if needed; without certutil, print the commands to run.
    Install {
        /// The NSS database directory.
        #[arg(long, value_name = "DIR")]
        nssdb: PathBuf,
    },
    /// Start a CA rotation: make the next CA beside the current one (which
    /// keeps signing) and a bundle of both for clients to trust.
    Rotate {
        /// Finish the rotation: the next CA becomes the CA (restart pinproxy after).
        #[arg(long)]
        finish: bool,
    },
}

/// A command line that cannot be turned into a configuration.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An `--admin` value is malformed.
    #[error("--admin {0:?}: expected ADDR (e.g. 127.0.0.1:8081) or off")]
    Admin(String),
    /// An `--exit` value is malformed.
    #[error("--exit {value:?}: {source}")]
    Exit {
        /// The flag's value (credentials redacted).
        value: String,
        /// Why.
        source: ExitUrlError,
    },
}

impl CommonArgs {
    /// The file configuration (or defaults), with `--data-dir` applied.
    pub fn load(&self) -> Result<Config, CliError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(dir) = &self.data_dir {
            config.data_dir = Some(dir.clone());
        }
        if let Some(store) = &self.store {
            config.store.url = store.clone();
        }
        if let Some(dir) = &self.ca_dir {
            config.ca.dir = Some(dir.clone());
        }
        Ok(config)
    }
}

impl RunArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> Result<Config, CliError> {
        let mut config = self.common.load()?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if self.allow_remote {
            config.allow_remote = true;
        }
        if self.insecure_open_proxy {
            config.insecure_open_proxy = true;
        }
        if !self.exits.is_empty() {
            config.exits = self
                .exits
                .iter()
                .map(|value| parse_exit_flag(value))
                .collect::<Result<_, _>>()?;
        }
        if !self.upstream_ca.is_empty() {
            config.upstream_ca = self.upstream_ca.clone();
        }
        if !self.track_cookies.is_empty() {
            config.track_cookies = self.track_cookies.clone();
        }
        match self.admin.as_deref() {
            None => {}
            Some("off") => config.admin.listen = None,
            Some(addr) => {
                config.admin.listen =
                    Some(addr.parse().map_err(|_| CliError::Admin(addr.to_owned()))?)
            }
        }
        if let Some(format) = self.log_format {
            config.log.format = format;
        }
        if let Some(access) = self.access_log.as_deref() {
            config.log.access = access == "on";
        }
        if let Some(path) = &self.publish_ca {
            config.ca.publish = Some(path.clone());
        }
        Ok(config)
    }
}

/// Parses `URL` or `ID=URL`.
fn parse_exit_flag(value: &str) -> Result<ExitConfig, CliError> {
    let (id, url) = match value.split_once('=') {
        // An '=' inside the URL (in a password, say) is not an id separator.
        Some((id, url)) if !id.contains("://") => (Some(id.to_owned()), url),
        _ => (None, value),
    };
    let error = |source| CliError::Exit {
        value: redact_userinfo(value),
        source,
    };
    let id = match id {
        Some(id) => id,
        None => ExitSpec::default_id(url).map_err(error)?,
    };
    Ok(ExitConfig::new(&id, url))
}

/// `value` (`URL` or `ID=URL`) with whatever stands before the URL's last
/// `@` written as `***`: the user and password, with or without a scheme.
fn redact_userinfo(value: &str) -> String {
    let Some(at) = value.rfind('@') else {
        // No '@': `user:pass` with its host forgotten, or credentials that
        // lost their '@', read as the host and port. Quoted only when it
        // is a host and port (or holds no ':' at all).
        let start = authority_start(value);
        let authority = &value[start..];
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        if authority.contains(':') && crate::net::HostPort::parse(authority).is_err() {
            return format!("{}***", &value[..start]);
        }
        return value.to_owned();
    };
    let start = authority_start(&value[..at]);
    format!("{}***{}", &value[..start], &value[at..])
}

/// Where the authority of `value` (`URL` or `ID=URL`, with or without a
/// scheme) starts.
fn authority_start(value: &str) -> usize {
    match (value.find("://"), value.find('=')) {
        (Some(scheme), _) => scheme + 3,
        // `ID=` before a URL without a scheme; an id holds no `:`, so an
        // `=` after one is inside the password.
        (None, Some(id)) if !value[..id].contains(':') => id + 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_flags_with_and_without_ids() {
        let e = parse_exit_flag("tiny=http://u:p=q@127.0.0.2:8888").unwrap();
        assert_eq!(
            (e.id.as_str(), e.url.as_str()),
            ("tiny", "http://u:p=q@127.0.0.2:8888")
        );
        let e = parse_exit_flag("http://u:p=q@127.0.0.2:8888").unwrap();
        assert_eq!(e.id, "127.0.0.2:8888");
        let err = parse_exit_flag("http://user:secret@host")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        let err = parse_exit_flag("user:secret@host:7000")
            .map(drop)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret") && err.contains("***@host"), "{err}");
        assert_eq!(redact_userinfo("id=u:secret@h:1"), "id=***@h:1");
        assert_eq!(redact_userinfo("user:se=cret@h:1"), "***@h:1");
        assert_eq!(redact_userinfo("id=http://u:s=t@h:1"), "id=http://***@h:1");
        // Without an '@', what cannot be a host and port is not quoted.
        let err = parse_exit_flag("http://user:S3cret")
            .map(drop)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("S3cret"), "{err}");
        assert_eq!(
            redact_userinfo("x=http://user:S3cret:gate.example:7000"),
            "x=http://***"
        );
        assert_eq!(
            redact_userinfo("http://gate.example:7000"),
            "http://gate.example:7000"
        );
        assert_eq!(
            redact_userinfo("socks9://[::1]:1080"),
            "socks9://[::1]:1080"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\ntrack_cookies = [\"a\"]\n[[exits]]\nid = \"x\"\nurl = \"http://127.0.0.9:1\"\n",
        )
        .unwrap();
        let args = RunArgs {
            common: CommonArgs {
                config: Some(path),
                ..CommonArgs::default()
            },
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            exits: vec!["http://127.0.0.2:3".into()],
            ..RunArgs::default()
        };
        let config = args.config().unwrap();
        assert_eq!(config.listen.port(), 9001);
        assert_eq!(config.exits.len(), 1);
        assert_eq!(config.exits[0].id, "127.0.0.2:3");
        assert_eq!(config.track_cookies, ["a"]);
    }
}
