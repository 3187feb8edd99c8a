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
use crate::origin::HandshakeReport;
use crate::pins::FillReport;

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

    /// An origin started with `--handshake-stats`: its TLS handshakes since
    /// the last asking.
    pub(super) fn handshakes(&mut self) -> Result<HandshakeReport> {
        self.proc.send("handshakes")?;
        self.proc.next_json(Duration::from_secs(10))
    }
}

/// Starts one of this binary's servers and reads its `READY addr` line.
pub(super) fn start_tool(exe: &Path, name: &str, args: &[&str]) -> Result<Server> {
    start_ready(
        name,
        Command::new(exe).args(args),
        false,
        Duration::from_secs(20),
    )
}

/// Spawns `cmd`, a server that prints `READY addr` once listening, and
/// reads that line within `timeout`; `input`: keep a pipe to its stdin.
pub(super) fn start_ready(
    name: &str,
    cmd: &mut Command,
    input: bool,
    timeout: Duration,
) -> Result<Server> {
    let mut proc = Proc::spawn(name, cmd, true, input, None)?;
    let line = proc.next_line(timeout)?;
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
/// written to `ca`; `extra` are further arguments. With `--handshake-stats`
/// among them its stdin is kept, to ask for the handshake times.
pub(super) fn start_origin(exe: &Path, name: &str, ca: PathBuf, extra: &[&str]) -> Result<Server> {
    let mut cmd = Command::new(exe);
    cmd.args([
        "origin",
        "--listen",
        "127.0.0.1:0",
        "--ca-out",
        path_str(&ca)?,
    ])
    .args(extra);
    let input = extra.contains(&"--handshake-stats");
    let server = start_ready(name, &mut cmd, input, Duration::from_secs(20))?;
    Ok(Server {
        ca: Some(ca),
        ..server
    })
}

/// How a phase wants its pinproxy: which exit, which store, which origin
/// CA, extra configuration.
#[derive(Debug, Clone, Default)]
pub(super) struct PinproxyOptions {
    /// Its built-in direct exit (no `--exit`) instead of the bench exit.
    pub(super) direct: bool,
    /// `--store URL` (the default, embedded store when `None`).
    pub(super) store: Option<String>,
    /// The origin CA to trust (the suite's origin's when `None`).
    pub(super) upstream_ca: Option<PathBuf>,
    /// Extra TOML, written to a configuration file.
    pub(super) config: Option<String>,
}

/// A proxy ready to be started: its command, where it will listen, the CA
/// it will write, its admin endpoint and its log (stderr).
pub(super) struct Launch {
    /// The command (a phase may wrap it, e.g. in valgrind).
    pub(super) cmd: Command,
    /// Where it will listen.
    pub(super) addr: SocketAddr,
    /// The CA certificate it writes, which clients trust.
    pub(super) ca: PathBuf,
    /// pinproxy's admin endpoint, when it has one.
    pub(super) admin: Option<SocketAddr>,
    /// Where its stderr goes.
    pub(super) log: PathBuf,
}

impl Launch {
    /// Starts it and waits up to `timeout` until it listens and has
    /// written its CA.
    pub(super) fn start(mut self, name: &str, timeout: Duration) -> Result<Server> {
        let server = start_server(
            name,
            &mut self.cmd,
            self.addr,
            &self.log,
            timeout,
            Some(self.ca),
        )?;
        Ok(Server {
            admin: self.admin,
            ..server
        })
    }
}

/// The TOML that puts pinproxy in `mode` (`mirror`, `chrome` or `rustls`).
pub(super) fn fingerprint_toml(mode: &str) -> String {
    format!("[upstream]\nfingerprint = \"{mode}\"\n")
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
        self.start_pinproxy_with(
            name,
            PinproxyOptions {
                config: config.map(str::to_owned),
                ..PinproxyOptions::default()
            },
        )
    }

    /// Starts a fresh pinproxy as `options` say.
    pub(super) fn start_pinproxy_with(
        &self,
        name: &str,
        options: PinproxyOptions,
    ) -> Result<Server> {
        self.pinproxy_launch(name, &options)?
            .start(name, Duration::from_secs(30))
    }

    /// How to start a fresh pinproxy as `options` say (not started yet, so
    /// a phase may wrap the command, e.g. in valgrind).
    pub(super) fn pinproxy_launch(&self, name: &str, options: &PinproxyOptions) -> Result<Launch> {
        let addr = free_addr()?;
        let data = self.dir.join(format!("{name}-data"));
        let upstream_ca = match &options.upstream_ca {
            Some(ca) => ca.as_path(),
            None => self.origin_ca()?,
        };
        let mut cmd = Command::new(&self.config.pinproxy);
        cmd.args(["run", "--listen", &addr.to_string()])
            .args(["--data-dir", path_str(&data)?])
            .args(["--upstream-ca", path_str(upstream_ca)?]);
        if !options.direct {
            cmd.args(["--exit", &format!("bench=http://{}", self.exit.addr)]);
        }
        if let Some(store) = &options.store {
            cmd.args(["--store", store]);
        }
        // Newer pinproxy versions open an admin endpoint (127.0.0.1:8081 by
        // default); give each instance its own port so they never collide.
        let admin = if self.pinproxy_has_admin {
            let admin = free_addr()?;
            cmd.args(["--admin", &admin.to_string()]);
            Some(admin)
        } else {
            None
        };
        if let Some(toml) = &options.config {
            let file = self.dir.join(format!("{name}.toml"));
            std::fs::write(&file, toml)?;
            cmd.args(["--config", path_str(&file)?]);
        }
        Ok(Launch {
            cmd,
            addr,
            ca: data.join("ca.pem"),
            admin,
            log: self.dir.join(format!("{name}.log")),
        })
    }

    /// How to start the hudsucker peer (setup (f)) trusting `upstream_ca`,
    /// when it was built.
    pub(super) fn peer_launch(&self, name: &str, upstream_ca: &Path) -> Result<Launch> {
        let peer = self
            .config
            .peer
            .as_ref()
            .ok_or_else(|| anyhow!("the hudsucker peer was not built"))?;
        let addr = free_addr()?;
        let ca = self.dir.join(format!("{name}-ca.pem"));
        // A CA left by an earlier start would make the start look done.
        let _ = std::fs::remove_file(&ca);
        let mut cmd = Command::new(peer);
        cmd.args(["--listen", &addr.to_string()])
            .args(["--ca-out", path_str(&ca)?])
            .args(["--upstream-ca", path_str(upstream_ca)?]);
        Ok(Launch {
            cmd,
            addr,
            ca,
            admin: None,
            log: self.dir.join(format!("{name}.log")),
        })
    }

    /// Starts the hudsucker peer trusting the suite's origin.
    pub(super) fn start_peer(&self, name: &str) -> Result<Server> {
        self.peer_launch(name, self.origin_ca()?)?
            .start(name, Duration::from_secs(30))
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
        let plan = LoadPlan {
            proxy,
            mode,
            concurrency,
            secs,
            cookie_tag,
            rate,
            ..LoadPlan::new(&self.origin, self.config.max_requests)
        };
        run_load(self.load_command(&plan)?)
    }

    /// The `pinbench load` command for `plan`.
    pub(super) fn load_command(&self, plan: &LoadPlan<'_>) -> Result<Command> {
        let ca = match plan.proxy {
            Some((_, ca)) => ca,
            None => plan.origin.ca()?,
        };
        let port = plan.origin.addr.port();
        let mut cmd = self.target_command("load", port, ca, plan.proxy.map(|(addr, _)| addr))?;
        cmd.args(["--connect-addr", &plan.origin.addr.to_string()])
            .args(["--concurrency", &plan.concurrency.to_string()])
            .args([
                "--mode",
                match plan.mode {
                    ConnMode::KeepAlive => "keep-alive",
                    ConnMode::NewConn => "new-conn",
                },
            ])
            .args(["--requests", &plan.max_requests.to_string()])
            .args(["--secs", &plan.secs.to_string()])
            .args(["--expect-body", &BODY_BYTES.to_string()]);
        if let Some(tag) = plan.cookie_tag {
            cmd.args(["--cookies", tag]);
            if plan.untracked_cookies {
                cmd.arg("--untracked-cookies");
            }
            if plan.browser_cookies {
                cmd.arg("--browser-cookies");
            }
            if plan.cookie_crumbs {
                cmd.arg("--cookie-crumbs");
            }
        }
        if let Some(tag) = plan.session_tag {
            cmd.args(["--session-keys", tag]);
        }
        if let Some(rate) = plan.rate {
            cmd.args(["--rate", &rate.to_string()]);
        }
        if plan.http2 {
            cmd.arg("--http2");
            if plan.streams > 1 {
                cmd.args(["--streams", &plan.streams.to_string()]);
            }
        }
        Ok(cmd)
    }

    /// Starts `pinbench pins` through `proxy` to `origin` as `plan` says;
    /// [`fill`] drives it.
    pub(super) fn spawn_filler(
        &self,
        origin: &Server,
        proxy: &Server,
        plan: &FillerPlan,
    ) -> Result<Proc> {
        let mut cmd =
            self.target_command("pins", origin.addr.port(), proxy.ca()?, Some(proxy.addr))?;
        cmd.args(["--concurrency", &plan.concurrency.to_string()])
            .args(["--per-request", &plan.per_request.to_string()])
            .args(["--fill-limit-secs", &plan.limit_secs.to_string()])
            .args(["--tag", &plan.tag]);
        if plan.anchor {
            cmd.arg("--anchor");
        }
        if plan.fresh_clients {
            cmd.arg("--fresh-clients");
        }
        Proc::spawn("pin filler", &mut cmd, true, true, None)
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

/// One `pinbench load` run: the origin, how to reach it and how hard.
pub(super) struct LoadPlan<'a> {
    /// The origin requested.
    pub(super) origin: &'a Server,
    /// The proxy (address and CA to trust), or none to go direct.
    pub(super) proxy: Option<(SocketAddr, &'a Path)>,
    /// Connection reuse.
    pub(super) mode: ConnMode,
    /// Concurrent clients.
    pub(super) concurrency: usize,
    /// Timed seconds.
    pub(super) secs: f64,
    /// Timed requests at most.
    pub(super) max_requests: u64,
    /// Tracked cookies on every request, values tagged with this.
    pub(super) cookie_tag: Option<&'a str>,
    /// The same cookies with names nobody tracks (see `pinbench load
    /// --untracked-cookies`).
    pub(super) untracked_cookies: bool,
    /// The cookies among a browser's untracked ones (see `pinbench load
    /// --browser-cookies`).
    pub(super) browser_cookies: bool,
    /// Each cookie in a `Cookie` field of its own, as a browser sends them
    /// over HTTP/2 (see `pinbench load --cookie-crumbs`).
    pub(super) cookie_crumbs: bool,
    /// Each client connection names a session key of its own, tagged with
    /// this (`pinbench load --session-keys`).
    pub(super) session_tag: Option<&'a str>,
    /// Paced total rate (open loop), or as fast as possible.
    pub(super) rate: Option<f64>,
    /// Offer h2 alone (`pinbench load --http2`): HTTP/2 wherever the proxy
    /// and the origin speak it.
    pub(super) http2: bool,
    /// With `http2`: clients per connection, a stream each (`--streams`).
    pub(super) streams: usize,
}

impl<'a> LoadPlan<'a> {
    /// Keep-alive, 32 clients, 1 s, straight to `origin`: the fields a plan
    /// does not set.
    pub(super) fn new(origin: &'a Server, max_requests: u64) -> Self {
        LoadPlan {
            origin,
            proxy: None,
            mode: ConnMode::KeepAlive,
            concurrency: 32,
            secs: 1.0,
            max_requests,
            cookie_tag: None,
            untracked_cookies: false,
            browser_cookies: false,
            cookie_crumbs: false,
            session_tag: None,
            rate: None,
            http2: false,
            streams: 1,
        }
    }
}

/// Runs a `pinbench load` command to its end and parses its JSON.
pub(super) fn run_load(mut cmd: Command) -> Result<LoadResult> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running pinbench load")?;
    if !out.status.success() {
        bail!("pinbench load failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("parsing pinbench load output")
}

/// A `pinbench pins` filler: its connections, new tracked cookies per
/// request, whether a worker's pins join one identity (`anchor`) or every
/// request founds one, the longest fill, and the tag making its cookie
/// values unique.
pub(super) struct FillerPlan {
    /// Kept-alive connections.
    pub(super) concurrency: usize,
    /// New tracked cookies per request.
    pub(super) per_request: usize,
    /// Each worker's pins join one identity.
    pub(super) anchor: bool,
    /// Longest time one fill may take, seconds.
    pub(super) limit_secs: f64,
    /// Prefix of the cookie values, unique per filler.
    pub(super) tag: String,
    /// Each request from a client of its own: a new connection and a
    /// `User-Agent` of its own (`--fresh-clients`).
    pub(super) fresh_clients: bool,
}

/// Asks a filler for `n` more pins and reads its report.
pub(super) fn fill(filler: &mut Proc, n: u64) -> Result<FillReport> {
    filler.send(&format!("fill {n}"))?;
    filler.next_json(Duration::from_secs(330))
}
