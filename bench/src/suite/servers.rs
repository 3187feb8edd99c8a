//! The servers the phases measure and the tools they drive them with: the
//! test origin and exit (this binary's own servers), fresh pinproxy
//! instances, and `pinbench load`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::procs::{free_addr, path_str, wait_ready, Proc};
use super::{Suite, BODY_BYTES};
use crate::load::{ConnMode, LoadResult};

/// A server child and where it listens.
pub(super) struct Server {
    pub(super) proc: Proc,
    pub(super) addr: SocketAddr,
    /// CA clients must trust to talk TLS to it (the origin) or through it
    /// (the proxies); none for the bare exit, which tunnels end to end.
    pub(super) ca: Option<PathBuf>,
    /// pinproxy's admin endpoint, when it has one.
    pub(super) admin: Option<SocketAddr>,
}

impl Server {
    /// The CA to trust when talking TLS to it or through it.
    pub(super) fn ca(&self) -> Result<&Path> {
        self.ca.as_deref().ok_or_else(|| anyhow!("no CA"))
    }
}

/// Starts one of this binary's servers and reads its `READY addr` line.
pub(super) fn start_tool(exe: &Path, name: &str, args: &[&str]) -> Result<Server> {
    let mut proc = Proc::spawn(name, Command::new(exe).args(args), true, false, None)?;
    let line = proc.next_line(Duration::from_secs(20))?;
    let addr = line
        .strip_prefix("READY ")
        .ok_or_else(|| anyhow!("{name}: unexpected first line {line:?}"))?
        .trim()
        .parse()?;
    Ok(Server {
        proc,
        addr,
        ca: None,
        admin: None,
    })
}

/// Spawns the server `cmd` as `name`, its stderr going to `log`, and waits
/// up to `timeout` until it accepts connections on `addr` and has written
/// `ca`, the CA certificate clients are to trust, when it makes one.
pub(super) fn start_server(
    name: &str,
    cmd: &mut Command,
    addr: SocketAddr,
    log: &Path,
    timeout: Duration,
    ca: Option<PathBuf>,
) -> Result<Server> {
    let mut proc = Proc::spawn(name, cmd, false, false, Some(log))?;
    let ca_written = || ca.as_ref().is_none_or(|ca| ca.exists());
    wait_ready(&mut proc, addr, timeout, &ca_written)?;
    Ok(Server {
        proc,
        addr,
        ca,
        admin: None,
    })
}

/// Starts `pinbench origin` on a free loopback port with a fresh CA,
/// written to `ca`; `extra` are further arguments.
pub(super) fn start_origin(exe: &Path, name: &str, ca: PathBuf, extra: &[&str]) -> Result<Server> {
    let mut args = vec![
        "origin",
        "--listen",
        "127.0.0.1:0",
        "--ca-out",
        path_str(&ca)?,
    ];
    args.extend_from_slice(extra);
    let server = start_tool(exe, name, &args)?;
    Ok(Server {
        ca: Some(ca),
        ..server
    })
}

impl Suite {
    /// The CA of the test origin, which clients going direct (or through
    /// the bare exit) trust.
    pub(super) fn origin_ca(&self) -> Result<&Path> {
        self.origin
            .ca
            .as_deref()
            .ok_or_else(|| anyhow!("origin CA missing"))
    }

    /// Starts a fresh pinproxy with one exit; `config` is extra TOML.
    pub(super) fn start_pinproxy(&self, name: &str, config: Option<&str>) -> Result<Server> {
        let addr = free_addr()?;
        let data = self.dir.join(format!("{name}-data"));
        let log = self.dir.join(format!("{name}.log"));
        let exit = format!("bench=http://{}", self.exit.addr);
        let mut cmd = Command::new(&self.config.pinproxy);
        cmd.args(["run", "--listen", &addr.to_string()])
            .args(["--data-dir", path_str(&data)?])
            .args(["--upstream-ca", path_str(self.origin_ca()?)?])
            .args(["--exit", &exit]);
        // Newer pinproxy versions open an admin endpoint (127.0.0.1:8081 by
        // default); give each instance its own port so they never collide.
        let admin = if self.pinproxy_has_admin {
            let admin = free_addr()?;
            cmd.args(["--admin", &admin.to_string()]);
            Some(admin)
        } else {
            None
        };
        if let Some(toml) = config {
            let file = self.dir.join(format!("{name}.toml"));
            std::fs::write(&file, toml)?;
            cmd.args(["--config", path_str(&file)?]);
        }
        let ca = Some(data.join("ca.pem"));
        let server = start_server(name, &mut cmd, addr, &log, Duration::from_secs(30), ca)?;
        Ok(Server { admin, ..server })
    }

    /// Runs `pinbench load` once, through `proxy` (its address and the CA
    /// to trust) or directly, and parses its JSON.
    pub(super) fn load(
        &self,
        proxy: Option<(SocketAddr, &Path)>,
        mode: ConnMode,
        concurrency: usize,
        secs: f64,
        cookie_tag: Option<&str>,
        rate: Option<f64>,
    ) -> Result<LoadResult> {
        let ca = match proxy {
            Some((_, ca)) => ca,
            None => self.origin_ca()?,
        };
        let port = self.origin.addr.port();
        let mut cmd = self.target_command("load", port, ca, proxy.map(|(addr, _)| addr))?;
        cmd.args(["--connect-addr", &self.origin.addr.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .args([
                "--mode",
                match mode {
                    ConnMode::KeepAlive => "keep-alive",
                    ConnMode::NewConn => "new-conn",
                },
            ])
            .args(["--requests", &self.config.max_requests.to_string()])
            .args(["--secs", &secs.to_string()])
            .args(["--expect-body", &BODY_BYTES.to_string()]);
        if let Some(tag) = cookie_tag {
            cmd.args(["--cookies", tag]);
        }
        if let Some(rate) = rate {
            cmd.args(["--rate", &rate.to_string()]);
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .context("running pinbench load")?;
        if !out.status.success() {
            bail!("pinbench load failed ({})", out.status);
        }
        serde_json::from_slice(&out.stdout).context("parsing pinbench load output")
    }

    /// `pinbench SUBCOMMAND` aimed at `localhost:port` trusting `ca`,
    /// through `proxy` when given.
    pub(super) fn target_command(
        &self,
        subcommand: &str,
        port: u16,
        ca: &Path,
        proxy: Option<SocketAddr>,
    ) -> Result<Command> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg(subcommand)
            .args(["--target-host", "localhost"])
            .args(["--target-port", &port.to_string()])
            .args(["--ca", path_str(ca)?]);
        if let Some(proxy) = proxy {
            cmd.args(["--proxy", &proxy.to_string()]);
        }
        Ok(cmd)
    }
}
