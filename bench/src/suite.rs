//! The orchestrator behind `bench/run.sh`: starts the origin, the exit,
//! pinproxy and mitmproxy as child processes on loopback, runs the load
//! generator and the probes against them (each a child process of this
//! binary), samples pinproxy from `/proc`, and writes `BENCHMARKS.md`.
//!
//! Every child is owned by a [`Proc`] that kills it (by its PID) when
//! dropped, so an error anywhere still leaves nothing running.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::load::{ConnMode, LoadResult};
use crate::mint::MintReport;
use crate::pins::FillReport;
use crate::procfs::{self, ProcSample};
use crate::report::group;
use crate::report::{
    IdentityRow, Machine, PinRow, Results, RunSettings, Sample, Setup, StoreRow, StoreScale,
    TunnelRow, CELLS,
};
use crate::tunnels::StepReport;

/// What to run and where to write.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// The pinproxy binary (release build).
    pub pinproxy: PathBuf,
    /// `mitmdump`, when installed.
    pub mitmdump: Option<PathBuf>,
    /// Why mitmproxy is missing, when it is.
    pub mitmproxy_missing: Option<String>,
    /// Where `BENCHMARKS.md` goes.
    pub out: PathBuf,
    /// Where the raw results (JSON) go.
    pub raw_out: Option<PathBuf>,
    /// Scratch directory (data dirs, logs); a temporary one when `None`.
    /// The PIDs of long-running children are appended to `pids` in it, so a
    /// wrapper can end them if this process is killed.
    pub work_dir: Option<PathBuf>,
    /// Seconds spent installing and building before the suite started.
    pub setup_secs: Option<f64>,
    /// pinproxy revision, for the report.
    pub revision: String,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Timed seconds per load run.
    pub secs: f64,
    /// Request cap per load run.
    pub max_requests: u64,
    /// Total rate of the fixed-rate latency runs.
    pub fixed_rate: f64,
    /// Idle tunnel counts.
    pub tunnel_counts: Vec<usize>,
    /// Cumulative pin counts.
    pub pin_levels: Vec<u64>,
    /// Tracked cookies per request when filling pins.
    pub pins_per_request: usize,
    /// Connections used when filling pins.
    pub pin_concurrency: usize,
    /// New hosts timed for leaf minting.
    pub mint_count: usize,
    /// New identities created (one pin each) for the identity row.
    pub identity_count: u64,
    /// Which phases run (`throughput`, `tunnels`, `pins`, `stores`, `mint`).
    pub phases: Vec<String>,
    /// Pins per concurrent `store bench` run (single-writer runs write a
    /// tenth of it).
    pub store_pins: u64,
    /// Pins the embedded store is filled with for the scale row (0: skip).
    pub store_scale_pins: u64,
}

/// Body size served by the origin.
pub const BODY_BYTES: usize = 1024;
/// Concurrency of the fixed-rate latency runs.
pub const FIXED_RATE_CONCURRENCY: usize = 32;
/// Connections creating identities in the identity measurement.
const IDENTITY_CONCURRENCY: usize = 32;

/// Where the PIDs of long-running children are recorded, if anywhere.
static PID_FILE: OnceLock<PathBuf> = OnceLock::new();

fn record_pid(pid: u32) {
    if let Some(path) = PID_FILE.get() {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut file) = file {
            let _ = writeln!(file, "{pid}");
        }
    }
}

/// A child process that is killed (by PID) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Option<mpsc::Receiver<String>>,
    log: Option<PathBuf>,
}

impl Proc {
    /// Spawns `cmd`. `lines`: read its stdout line by line; `input`: keep a
    /// pipe to its stdin; `log`: send its stderr to this file.
    fn spawn(
        name: &str,
        cmd: &mut Command,
        lines: bool,
        input: bool,
        log: Option<&Path>,
    ) -> Result<Proc> {
        cmd.stdin(if input { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(if lines { Stdio::piped() } else { Stdio::null() });
        match log {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        record_pid(child.id());
        let stdin = child.stdin.take();
        let lines = child.stdout.take().map(|stdout| {
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Ok(Proc {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            log: log.map(Path::to_owned),
        })
    }

    /// The PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, within `timeout`.
    fn next_line(&mut self, timeout: Duration) -> Result<String> {
        let rx = self
            .lines
            .as_ref()
            .ok_or_else(|| anyhow!("{}: stdout not captured", self.name))?;
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "{}: no output within {timeout:?}{}",
                    self.name,
                    self.log_tail()
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait().ok().flatten();
                bail!(
                    "{} exited ({status:?}) without the expected output{}",
                    self.name,
                    self.log_tail()
                )
            }
        }
    }

    /// Writes one line to its stdin.
    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{}: stdin not captured", self.name))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes its stdin and waits up to `timeout` for it to exit, then kills it.
    fn finish(mut self, timeout: Duration) {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(8)..].join("\n    ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its log ends with:\n    {tail}")
        }
    }

    fn sample(&self) -> Result<ProcSample> {
        procfs::sample(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A server child and where it listens.
struct Server {
    proc: Proc,
    addr: SocketAddr,
    /// CA clients must trust to talk TLS through it (proxies only).
    ca: Option<PathBuf>,
    /// pinproxy's admin endpoint, when it has one.
    admin: Option<SocketAddr>,
}

/// The servers of the throughput runs.
struct Servers<'a> {
    exit: &'a Server,
    pinproxy: &'a Server,
    wide: &'a Server,
    mitm: Option<&'a Server>,
    origin_ca: &'a Path,
}

impl Servers<'_> {
    /// The proxy a setup goes through (and whose CPU is measured).
    fn of(&self, setup: Setup) -> Option<&Server> {
        match setup {
            Setup::Direct => None,
            Setup::Exit => Some(self.exit),
            Setup::Pinproxy | Setup::PinproxyCookies => Some(self.pinproxy),
            Setup::PinproxyWidePool => Some(self.wide),
            Setup::Mitmproxy => self.mitm,
        }
    }
}

/// Picks a free loopback port (bind to port 0, release it).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Runs `cmd` to its end, at most `timeout` (then kills it), and returns
/// its standard output; fails with its standard error when it fails.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    record_pid(child.id());
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{:?} did not finish within {timeout:?}", cmd.get_program());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{:?} failed ({status}): {}",
            cmd.get_program(),
            stderr.trim()
        );
    }
    Ok(stdout)
}

/// `name` on `PATH` (and in the sbin folders, where Debian puts servers).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Waits until `addr` accepts connections and `extra` holds, or fails when
/// the process exits or `timeout` passes.
fn wait_ready(
    proc: &mut Proc,
    addr: SocketAddr,
    timeout: Duration,
    extra: &dyn Fn() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if proc.exited() {
            bail!("{} exited during start-up{}", proc.name, proc.log_tail());
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() && extra() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not start listening on {addr} within {timeout:?}{}",
                proc.name,
                proc.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Progress on stderr.
struct Progress {
    start: Instant,
}

impl Progress {
    fn say(&self, message: impl AsRef<str>) {
        eprintln!(
            "[{:>5.0}s] {}",
            self.start.elapsed().as_secs_f64(),
            message.as_ref()
        );
    }
}

struct Suite {
    config: SuiteConfig,
    /// `pinproxy run` takes `--admin`.
    pinproxy_has_admin: bool,
    exe: PathBuf,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    origin: Server,
    exit: Server,
    progress: Progress,
    results: Results,
}

/// Runs the whole suite and writes the report.
pub fn run(config: SuiteConfig) -> Result<()> {
    let progress = Progress {
        start: Instant::now(),
    };
    let exe = std::env::current_exe()?;
    let (dir, temp) = match &config.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new().prefix("pinbench-").tempdir()?;
            (temp.path().to_owned(), Some(temp))
        }
    };
    let _ = PID_FILE.set(dir.join("pids"));
    let origin_ca = dir.join("origin-ca.pem");
    let origin = start_tool(
        &exe,
        "origin",
        &[
            "origin",
            "--listen",
            "127.0.0.1:0",
            "--ca-out",
            path_str(&origin_ca)?,
            "--body-bytes",
            &BODY_BYTES.to_string(),
        ],
    )?;
    let exit = start_tool(&exe, "exit", &["exit", "--listen", "127.0.0.1:0"])?;
    progress.say(format!("origin on {}, exit on {}", origin.addr, exit.addr));
    let machine = machine_facts(&config)?;
    let settings = RunSettings {
        rounds: config.rounds,
        secs: config.secs,
        max_requests: config.max_requests,
        body_bytes: BODY_BYTES,
        fixed_rate: config.fixed_rate,
        fixed_rate_concurrency: FIXED_RATE_CONCURRENCY,
        pins_per_request: config.pins_per_request,
        pin_concurrency: config.pin_concurrency,
    };
    let pinproxy_has_admin = Command::new(&config.pinproxy)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--admin"))
        .unwrap_or(false);
    let mut suite = Suite {
        config,
        pinproxy_has_admin,
        exe,
        dir,
        _temp: temp,
        origin: Server {
            ca: Some(origin_ca),
            ..origin
        },
        exit,
        progress,
        results: Results {
            machine,
            settings,
            ..Results::default()
        },
    };

    type Phase = fn(&mut Suite) -> Result<()>;
    let phases: [(&str, &str, Phase); 5] = [
        ("throughput", "throughput", Suite::throughput),
        ("tunnels", "idle tunnels", Suite::tunnels),
        ("pins", "pins", Suite::pins),
        ("stores", "pin stores", Suite::stores),
        ("mint", "leaf minting", Suite::mint),
    ];
    for (key, name, phase) in phases {
        if !suite.config.phases.iter().any(|p| p == key) {
            continue;
        }
        let started = Instant::now();
        if let Err(e) = phase(&mut suite) {
            let note = format!("phase {name} failed: {e:#}");
            suite.progress.say(&note);
            suite.results.notes.push(note);
        }
        suite
            .results
            .phases
            .push((name.to_owned(), started.elapsed().as_secs_f64()));
    }
    suite.results.setup_secs = suite.config.setup_secs;
    suite.write()
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}

/// Starts one of this binary's servers and reads its `READY addr` line.
fn start_tool(exe: &Path, name: &str, args: &[&str]) -> Result<Server> {
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

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_owned())
}

fn machine_facts(config: &SuiteConfig) -> Result<Machine> {
    let cores = command_line("nproc", &[])
        .and_then(|s| s.parse().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kib / (1024.0 * 1024.0)))
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| "unknown".into());
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let mitmproxy = match (&config.mitmdump, &config.mitmproxy_missing) {
        (Some(path), _) => command_line(path_str(path)?, &["--version"])
            .and_then(|v| v.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "installed (version unknown)".into()),
        (None, Some(why)) => format!("not installable: {why}"),
        (None, None) => "not installable".into(),
    };
    Ok(Machine {
        cores,
        cpu_model,
        kernel,
        memory,
        date,
        revision: config.revision.clone(),
        mitmproxy,
    })
}

impl Suite {
    fn origin_ca(&self) -> Result<&Path> {
        self.origin
            .ca
            .as_deref()
            .ok_or_else(|| anyhow!("origin CA missing"))
    }

    /// Starts a fresh pinproxy with one exit; `config` is extra TOML.
    fn start_pinproxy(&self, name: &str, config: Option<&str>) -> Result<Server> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
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
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
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
        let mut proc = Proc::spawn(name, &mut cmd, false, false, Some(&log))?;
        let ca = data.join("ca.pem");
        wait_ready(&mut proc, addr, Duration::from_secs(30), &|| ca.exists())?;
        Ok(Server {
            proc,
            addr,
            ca: Some(ca),
            admin,
        })
    }

    fn start_mitmproxy(&self, mitmdump: &Path) -> Result<Server> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let confdir = self.dir.join("mitmproxy");
        std::fs::create_dir_all(&confdir)?;
        let log = self.dir.join("mitmproxy.log");
        let mut cmd = Command::new(mitmdump);
        cmd.args(["--mode", &format!("upstream:http://{}", self.exit.addr)])
            .args([
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                &port.to_string(),
            ])
            .args(["--set", &format!("confdir={}", path_str(&confdir)?)])
            .args([
                "--set",
                &format!(
                    "ssl_verify_upstream_trusted_ca={}",
                    path_str(self.origin_ca()?)?
                ),
            ])
            .args(["--set", "termlog_verbosity=error", "--set", "flow_detail=0"]);
        let mut proc = Proc::spawn("mitmproxy", &mut cmd, false, false, Some(&log))?;
        let ca = confdir.join("mitmproxy-ca-cert.pem");
        wait_ready(&mut proc, addr, Duration::from_secs(60), &|| ca.exists())?;
        Ok(Server {
            proc,
            addr,
            ca: Some(ca),
            admin: None,
        })
    }

    /// Runs `pinbench load` once, through `proxy` (its address and the CA
    /// to trust) or directly, and parses its JSON.
    fn load(
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
        let mut cmd = Command::new(&self.exe);
        cmd.arg("load")
            .args(["--target-host", "localhost"])
            .args(["--target-port", &self.origin.addr.port().to_string()])
            .args(["--connect-addr", &self.origin.addr.to_string()])
            .args(["--ca", path_str(ca)?])
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
        if let Some((addr, _)) = proxy {
            cmd.args(["--proxy", &addr.to_string()]);
        }
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

    fn throughput(&mut self) -> Result<()> {
        let pinproxy = self.start_pinproxy("pinproxy-load", None)?;
        let widest = CELLS
            .iter()
            .filter(|(mode, _)| *mode == ConnMode::KeepAlive)
            .map(|&(_, conc)| conc)
            .max()
            .unwrap_or(256);
        let wide = self.start_pinproxy(
            "pinproxy-wide-pool",
            Some(&format!("[limits]\nmax_idle_per_origin = {widest}\n")),
        )?;
        let mitm = match &self.config.mitmdump {
            Some(path) => match self.start_mitmproxy(path) {
                Ok(server) => Some(server),
                Err(e) => {
                    self.results.notes.push(format!(
                        "mitmproxy is installed but did not start, so (e) is missing: {e:#}"
                    ));
                    None
                }
            },
            None => None,
        };
        let mut setups = vec![
            Setup::Direct,
            Setup::Exit,
            Setup::Pinproxy,
            Setup::PinproxyWidePool,
            Setup::PinproxyCookies,
        ];
        if mitm.is_some() {
            setups.push(Setup::Mitmproxy);
        }
        let servers = Servers {
            exit: &self.exit,
            pinproxy: &pinproxy,
            wide: &wide,
            mitm: mitm.as_ref(),
            origin_ca: self.origin_ca()?,
        };
        let rounds = self.config.rounds;
        let mut samples = Vec::new();
        let mut fixed = Vec::new();
        for round in 0..rounds {
            let order: Vec<Setup> = if round % 2 == 0 {
                setups.clone()
            } else {
                setups.iter().rev().copied().collect()
            };
            for &(mode, conc) in &CELLS {
                for &setup in &order {
                    // The wide pool only differs from (c) where the
                    // concurrency exceeds the default pool.
                    if setup == Setup::PinproxyWidePool
                        && !(mode == ConnMode::KeepAlive && conc == widest)
                    {
                        continue;
                    }
                    let sample = self.measure(&servers, setup, mode, conc, round, None)?;
                    samples.push(sample);
                }
            }
            // Latency below saturation, in the same round. mitmproxy is left
            // out: it cannot sustain the rate, so its figures would only show
            // its queue.
            for &setup in &order {
                if matches!(setup, Setup::Mitmproxy | Setup::PinproxyWidePool) {
                    continue;
                }
                let sample = self.measure(
                    &servers,
                    setup,
                    ConnMode::KeepAlive,
                    FIXED_RATE_CONCURRENCY,
                    round,
                    Some(self.config.fixed_rate),
                )?;
                fixed.push(sample);
            }
        }
        let errors: u64 = samples.iter().map(|s| s.result.errors).sum();
        if errors > 0 {
            if let Some(e) = samples.iter().find_map(|s| s.result.first_error.clone()) {
                self.results.notes.push(format!(
                    "{errors} load requests failed in total; the first error: {e}"
                ));
            }
        }
        self.results.throughput = samples;
        self.results.fixed_rate = fixed;
        Ok(())
    }

    /// One load run of `setup`, with the CPU of the proxy under test and
    /// the accept-queue drops during it.
    fn measure(
        &self,
        servers: &Servers<'_>,
        setup: Setup,
        mode: ConnMode,
        conc: usize,
        round: usize,
        rate: Option<f64>,
    ) -> Result<Sample> {
        let measured = servers.of(setup);
        // Through the bare exit, TLS is end to end with the origin.
        let proxy = measured.map(|s| (s.addr, s.ca.as_deref().unwrap_or(servers.origin_ca)));
        // (d): cookie values unique to this run, so each client's first
        // request pins them and the rest are routed by the pin.
        let tag = (setup == Setup::PinproxyCookies).then(|| {
            let mode = match mode {
                ConnMode::KeepAlive => "k",
                ConnMode::NewConn => "n",
            };
            let fixed = if rate.is_some() { "f" } else { "" };
            format!("r{round}{mode}{conc}{fixed}")
        });
        let ticks = procfs::ticks_per_second() as f64;
        let before = measured.map(|s| s.proc.sample()).transpose()?;
        let overflows_before = procfs::listen_overflows().unwrap_or(0);
        let result = self.load(proxy, mode, conc, self.config.secs, tag.as_deref(), rate)?;
        let overflows = procfs::listen_overflows()
            .unwrap_or(0)
            .saturating_sub(overflows_before);
        let after = measured.map(|s| s.proc.sample()).transpose()?;
        let cpu = cpu_per_request(before, after, ticks, &result);
        self.progress.say(format!(
            "round {}/{} {}{:>10} c={conc:<3} ({}) {:>7.0} req/s p50 {:>6.2} ms p99 {:>7.2} ms{}{}",
            round + 1,
            self.config.rounds,
            match rate {
                Some(r) => format!("at {r:.0} req/s "),
                None => String::new(),
            },
            mode.label(),
            setup.letter(),
            result.rps,
            f64::from(result.p50_us) / 1000.0,
            f64::from(result.p99_us) / 1000.0,
            if overflows > 0 {
                format!(" SYN drops {overflows}")
            } else {
                String::new()
            },
            if result.errors > 0 {
                format!(
                    " errors {} ({})",
                    result.errors,
                    result.first_error.clone().unwrap_or_default()
                )
            } else {
                String::new()
            }
        ));
        Ok(Sample {
            setup,
            mode,
            concurrency: conc,
            round,
            result,
            proxy_cpu_us_per_req: cpu,
            listen_overflows: overflows,
        })
    }

    fn tunnels(&mut self) -> Result<()> {
        let counts = self.config.tunnel_counts.clone();
        // The reference first: idle TLS connections to a fresh origin.
        if let Some(&count) = counts.first() {
            let ca = self.dir.join("reference-ca.pem");
            let reference = start_tool(
                &self.exe,
                "reference origin",
                &[
                    "origin",
                    "--listen",
                    "127.0.0.1:0",
                    "--ca-out",
                    path_str(&ca)?,
                ],
            )?;
            let reference = Server {
                ca: Some(ca),
                ..reference
            };
            let row = self.hold_tunnels(&reference, count, true)?;
            self.results.tunnels.push(row);
        }
        for count in counts {
            // Idle tunnels would otherwise be closed by the keep-alive limit
            // (timeouts.header_read) while the large counts are opened.
            let proxy = self.start_pinproxy(
                "pinproxy-tunnels",
                Some("[timeouts]\nheader_read = \"10m\"\n"),
            )?;
            let row = self.hold_tunnels(&proxy, count, false)?;
            self.results.tunnels.push(row);
        }
        Ok(())
    }

    /// Holds `count` idle tunnels through `server` (or, for the reference,
    /// idle TLS connections straight to it) and measures it.
    fn hold_tunnels(
        &mut self,
        server: &Server,
        count: usize,
        reference: bool,
    ) -> Result<TunnelRow> {
        let ticks = procfs::ticks_per_second() as f64;
        let ca = server.ca.as_deref().ok_or_else(|| anyhow!("no CA"))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("tunnels")
            .args(["--target-host", "localhost"])
            .args(["--ca", path_str(ca)?])
            .args(["--count", &count.to_string()])
            .args(["--parallel", "64"])
            .args(["--hold-secs", "300"]);
        if reference {
            cmd.args(["--target-port", &server.addr.port().to_string()]);
        } else {
            cmd.args(["--target-port", &self.origin.addr.port().to_string()])
                .args(["--proxy", &server.addr.to_string()]);
            // Warm up: the leaf is minted, the upstream pool and runtime are up.
            self.load(
                Some((server.addr, ca)),
                ConnMode::KeepAlive,
                8,
                0.5,
                None,
                None,
            )?;
        }
        thread::sleep(Duration::from_millis(500));
        let base = server.proc.sample()?;
        let mut holder = Proc::spawn("tunnel holder", &mut cmd, true, true, None)?;
        let opened: StepReport =
            serde_json::from_str(&holder.next_line(Duration::from_secs(240))?)?;
        thread::sleep(Duration::from_millis(1000));
        let idle = server.proc.sample()?;
        thread::sleep(Duration::from_secs(3));
        let idle_end = server.proc.sample()?;
        holder.send("request")?;
        let requested: StepReport =
            serde_json::from_str(&holder.next_line(Duration::from_secs(240))?)?;
        thread::sleep(Duration::from_millis(1000));
        let after_request = server.proc.sample()?;
        holder.send("close")?;
        let _ = holder.next_line(Duration::from_secs(60));
        holder.finish(Duration::from_secs(10));
        thread::sleep(Duration::from_millis(1000));
        let closed = server.proc.sample()?;
        let row = TunnelRow {
            reference,
            count,
            opened: opened.ok,
            failed: opened.failed,
            open_secs: opened.secs,
            rss_before: base.rss_bytes,
            rss_idle: idle.rss_bytes,
            rss_after_request: after_request.rss_bytes,
            requested_ok: requested.ok,
            rss_closed: closed.rss_bytes,
            threads: idle.threads,
            idle_cpu_percent: idle_end.cpu_ticks.saturating_sub(idle.cpu_ticks) as f64
                / ticks
                / 3.0
                * 100.0,
            open_cpu_us_per_tunnel: if opened.ok > 0 {
                idle.cpu_ticks.saturating_sub(base.cpu_ticks) as f64 / ticks * 1e6
                    / opened.ok as f64
            } else {
                0.0
            },
            first_error: opened.first_error.or(requested.first_error),
        };
        self.progress.say(format!(
            "{}{count} tunnels: opened {} in {:.1} s, RSS {:.1} → {:.1} MiB idle, {:.1} MiB after a request each ({} ok)",
            if reference { "reference: " } else { "" },
            row.opened,
            row.open_secs,
            row.rss_before as f64 / 1048576.0,
            row.rss_idle as f64 / 1048576.0,
            row.rss_after_request as f64 / 1048576.0,
            row.requested_ok
        ));
        if row.failed > 0 || row.requested_ok < row.opened {
            self.results.notes.push(format!(
                "{count} tunnels: {} failed to open, {} of {} requests succeeded; first error: {}",
                row.failed,
                row.requested_ok,
                row.opened,
                row.first_error.clone().unwrap_or_default()
            ));
        }
        Ok(row)
    }

    /// Starts `pinbench pins` against `proxy` with `concurrency` connections.
    fn spawn_filler(
        &self,
        proxy: &Server,
        concurrency: usize,
        per_request: usize,
        anchor: bool,
    ) -> Result<Proc> {
        let ca = proxy.ca.as_deref().ok_or_else(|| anyhow!("no CA"))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("pins")
            .args(["--proxy", &proxy.addr.to_string()])
            .args(["--target-host", "localhost"])
            .args(["--target-port", &self.origin.addr.port().to_string()])
            .args(["--ca", path_str(ca)?])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--per-request", &per_request.to_string()])
            .args(["--fill-limit-secs", "300"])
            .args(["--tag", &format!("p{}x{per_request}", std::process::id())]);
        if anchor {
            cmd.arg("--anchor");
        }
        Proc::spawn("pin filler", &mut cmd, true, true, None)
    }

    fn pins(&mut self) -> Result<()> {
        let ticks = procfs::ticks_per_second() as f64;
        let proxy = self.start_pinproxy("pinproxy-pins", None)?;
        let concurrency = self.config.pin_concurrency;
        let per_request = self.config.pins_per_request;
        let mut filler = self.spawn_filler(&proxy, concurrency, per_request, true)?;
        // Two requests per connection at least, so every connection (and its
        // identity's upstream connection) exists before the baseline.
        let warm = fill(&mut filler, (2 * concurrency * per_request) as u64)?;
        thread::sleep(Duration::from_millis(500));
        let base = proxy.proc.sample()?;
        let mut made = 0u64;
        for &level in &self.config.pin_levels.clone() {
            let before = proxy.proc.sample()?;
            let report = fill(&mut filler, level.saturating_sub(made))?;
            made += report.pins;
            thread::sleep(Duration::from_millis(500));
            let after = proxy.proc.sample()?;
            let row = PinRow {
                pins: made,
                rss_growth: after.rss_bytes.saturating_sub(base.rss_bytes),
                pins_per_sec: report.pins as f64 / report.secs.max(1e-9),
                cpu_us_per_pin: after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / ticks
                    * 1e6
                    / report.pins.max(1) as f64,
                failed: report.failed,
            };
            self.progress.say(format!(
                "{made} pins: RSS +{:.1} MiB ({:.0} B/pin), {:.0} pins/s",
                row.rss_growth as f64 / 1048576.0,
                row.rss_growth as f64 / made.max(1) as f64,
                row.pins_per_sec
            ));
            if report.failed > 0 {
                self.results.notes.push(format!(
                    "pin fill to {level}: {} requests failed; first error: {}",
                    report.failed,
                    report.first_error.clone().unwrap_or_default()
                ));
            }
            self.results.pins.push(row);
            if made < level {
                self.results.notes.push(format!(
                    "pin fill to {level} stopped at {made} (time limit)"
                ));
                break;
            }
        }
        if warm.failed > 0 {
            self.results.notes.push(format!(
                "pin warm-up: {} requests failed; first error: {}",
                warm.failed,
                warm.first_error.unwrap_or_default()
            ));
        }
        filler.finish(Duration::from_secs(10));
        self.results.pin_warmup = warm.pins;
        self.results.pin_identities = proxy
            .admin
            .and_then(|admin| metric(admin, "pinproxy_identities_created_total"));
        drop(proxy);

        // Identities: one new cookie per request, so one new identity each.
        let proxy = self.start_pinproxy("pinproxy-identities", None)?;
        let mut filler = self.spawn_filler(&proxy, IDENTITY_CONCURRENCY, 1, false)?;
        let warm = fill(&mut filler, 2 * IDENTITY_CONCURRENCY as u64)?;
        thread::sleep(Duration::from_millis(500));
        let before = proxy.proc.sample()?;
        let fds_before = procfs::open_fds(proxy.proc.pid())?;
        let report = fill(&mut filler, self.config.identity_count)?;
        thread::sleep(Duration::from_millis(500));
        let after = proxy.proc.sample()?;
        let fds_after = procfs::open_fds(proxy.proc.pid())?;
        let row = IdentityRow {
            identities: report.pins,
            rss_growth: after.rss_bytes.saturating_sub(before.rss_bytes),
            fds_growth: fds_after.saturating_sub(fds_before),
            per_sec: report.pins as f64 / report.secs.max(1e-9),
            cpu_us_per_identity: after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / ticks
                * 1e6
                / report.pins.max(1) as f64,
            failed: report.failed + warm.failed,
        };
        self.progress.say(format!(
            "{} identities: RSS +{:.1} MiB ({:.1} KiB each), {} more descriptors",
            row.identities,
            row.rss_growth as f64 / 1048576.0,
            row.rss_growth as f64 / row.identities.max(1) as f64 / 1024.0,
            row.fds_growth
        ));
        if row.failed > 0 {
            self.results.notes.push(format!(
                "identities: {} requests failed; first error: {}",
                row.failed,
                report.first_error.or(warm.first_error).unwrap_or_default()
            ));
        }
        self.results.identities.push(row);
        filler.finish(Duration::from_secs(10));
        Ok(())
    }

    /// `pinproxy store bench` against each store kind, then the embedded
    /// store at scale: its size, open time and the daemon's RSS over it.
    fn stores(&mut self) -> Result<()> {
        let redis = match find_program("redis-server") {
            Some(program) => Some(self.start_redis(&program)?),
            None => {
                self.results
                    .notes
                    .push("redis-server not found: no Redis row in the pin store table".into());
                None
            }
        };
        let mut kinds: Vec<(&str, Option<String>)> =
            vec![("memory", Some("memory".into())), ("embedded", None)];
        if let Some((_, port)) = &redis {
            kinds.push(("redis", Some(format!("redis://127.0.0.1:{port}"))));
        }
        let mut run = 0;
        for (kind, store) in kinds {
            for concurrency in [1, 64] {
                run += 1;
                let pins = if concurrency == 1 {
                    (self.config.store_pins / 10).max(1)
                } else {
                    self.config.store_pins
                };
                // A scratch store per run: a Redis database of its own, an
                // empty data directory for the others.
                let store = store.as_ref().map(|url| match kind {
                    "redis" => format!("{url}/{run}"),
                    _ => url.clone(),
                });
                let data = self.dir.join(format!("store-bench-{run}"));
                let row = self.store_bench(kind, store.as_deref(), &data, pins, concurrency)?;
                self.progress.say(format!(
                    "{kind} store, {concurrency} writers: {:.0} pins/s, p50 {:.1} µs, p99 {:.1} µs",
                    row.pins_per_sec, row.p50_us, row.p99_us
                ));
                self.results.stores.push(row);
            }
        }
        drop(redis);
        if self.config.store_scale_pins > 0 {
            self.store_scale()?;
        }
        Ok(())
    }

    /// One `pinproxy store bench` run.
    fn store_bench(
        &self,
        kind: &str,
        store: Option<&str>,
        data: &Path,
        pins: u64,
        concurrency: usize,
    ) -> Result<StoreRow> {
        let mut cmd = Command::new(&self.config.pinproxy);
        cmd.args(["store", "--data-dir", path_str(data)?]);
        if let Some(store) = store {
            cmd.args(["--store", store]);
        }
        cmd.args(["bench", "--pins", &pins.to_string()])
            .args(["--concurrency", &concurrency.to_string()]);
        let output = run_bounded(&mut cmd, Duration::from_secs(300))?;
        let report: serde_json::Value = serde_json::from_str(output.trim())
            .with_context(|| format!("store bench output: {output}"))?;
        let number = |field: &str| report[field].as_f64().unwrap_or(0.0);
        Ok(StoreRow {
            store: kind.to_owned(),
            concurrency,
            pins: number("pins") as u64,
            pins_per_sec: number("pins_per_sec"),
            p50_us: number("p50_us"),
            p99_us: number("p99_us"),
            max_us: number("max_us"),
        })
    }

    /// Fills an embedded store to `store_scale_pins`, then times opening it
    /// and measures a daemon running on it.
    fn store_scale(&mut self) -> Result<()> {
        let pins = self.config.store_scale_pins;
        // `start_pinproxy` names its data directory after the instance.
        let data = self.dir.join("pinproxy-store-scale-data");
        let fill = self.store_bench("embedded", None, &data, pins, 256)?;
        let file_bytes = std::fs::metadata(data.join("pins.redb"))
            .map(|m| m.len())
            .unwrap_or(0);
        let started = Instant::now();
        let mut stats = Command::new(&self.config.pinproxy);
        stats.args(["store", "--data-dir", path_str(&data)?, "stats"]);
        let counts = run_bounded(&mut stats, Duration::from_secs(120))?;
        let open_secs = started.elapsed().as_secs_f64();
        let identities = counts
            .lines()
            .find_map(|l| l.strip_prefix("identities: "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);

        let empty = self.start_pinproxy("pinproxy-store-empty", None)?;
        thread::sleep(Duration::from_millis(500));
        let empty_rss_bytes = empty.proc.sample()?.rss_bytes;
        drop(empty);
        let started = Instant::now();
        let daemon = self.start_pinproxy("pinproxy-store-scale", None)?;
        let start_secs = started.elapsed().as_secs_f64();
        thread::sleep(Duration::from_millis(500));
        let rss_bytes = daemon.proc.sample()?.rss_bytes;
        drop(daemon);
        self.progress.say(format!(
            "embedded store at {} pins: file {:.0} MB, open {open_secs:.2} s, start-up \
             {start_secs:.2} s, daemon RSS {:.0} MB",
            group(fill.pins),
            file_bytes as f64 / 1e6,
            rss_bytes as f64 / 1e6
        ));
        self.results.store_scale = Some(StoreScale {
            pins: fill.pins,
            identities,
            fill_pins_per_sec: fill.pins_per_sec,
            file_bytes,
            open_secs,
            start_secs,
            rss_bytes,
            empty_rss_bytes,
        });
        Ok(())
    }

    /// Starts a throwaway `redis-server` (no persistence) on a free port.
    fn start_redis(&self, program: &Path) -> Result<(Proc, u16)> {
        let port = free_port()?;
        let mut cmd = Command::new(program);
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", path_str(&self.dir)?]);
        let log = self.dir.join("redis.log");
        let mut proc = Proc::spawn("redis-server", &mut cmd, false, false, Some(&log))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_ready(&mut proc, addr, Duration::from_secs(20), &|| true)?;
        Ok((proc, port))
    }

    fn mint(&mut self) -> Result<()> {
        let count = self.config.mint_count.to_string();
        let out = Command::new(&self.exe)
            .args(["mint", "--count", &count, "--cached-per-new", "20"])
            .stderr(if cfg!(feature = "library") {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .output()?;
        if out.status.success() {
            self.results.mint_library = Some(serde_json::from_slice::<MintReport>(&out.stdout)?);
        } else if cfg!(feature = "library") {
            self.results.notes.push(format!(
                "leaf minting, library view: pinbench mint failed ({}); see its error in the \
                 run's output",
                out.status
            ));
        }
        let proxy = self.start_pinproxy("pinproxy-mint", None)?;
        let ca = proxy.ca.as_deref().ok_or_else(|| anyhow!("no CA"))?;
        let out = Command::new(&self.exe)
            .arg("handshakes")
            .args(["--proxy", &proxy.addr.to_string()])
            .args(["--ca", path_str(ca)?])
            .args(["--count", &count])
            .stderr(Stdio::inherit())
            .output()?;
        if out.status.success() {
            self.results.mint_handshake = Some(serde_json::from_slice::<MintReport>(&out.stdout)?);
        } else {
            self.results
                .notes
                .push(format!("pinbench handshakes failed ({})", out.status));
        }
        for (view, r) in [
            ("library", &self.results.mint_library),
            ("client-side", &self.results.mint_handshake),
        ] {
            if let Some(r) = r {
                self.progress.say(format!(
                    "leaf ({view}): new host p50 {} ns, cached p50 {} ns",
                    r.new_host.p50_ns, r.cached_host.p50_ns
                ));
            }
        }
        Ok(())
    }

    fn write(&self) -> Result<()> {
        let previous = std::fs::read_to_string(&self.config.out).ok();
        let text = self.results.render(previous.as_deref());
        std::fs::write(&self.config.out, text)
            .with_context(|| format!("writing {}", self.config.out.display()))?;
        if let Some(raw) = &self.config.raw_out {
            if let Some(parent) = raw.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(raw, serde_json::to_string_pretty(&self.results)?)?;
        }
        self.progress
            .say(format!("wrote {}", self.config.out.display()));
        Ok(())
    }
}

/// Asks a filler for `n` more pins and reads its report.
fn fill(filler: &mut Proc, n: u64) -> Result<FillReport> {
    filler.send(&format!("fill {n}"))?;
    Ok(serde_json::from_str(
        &filler.next_line(Duration::from_secs(330))?,
    )?)
}

/// One unlabelled value from pinproxy's admin `/metrics`, if it has it.
fn metric(admin: SocketAddr, name: &str) -> Option<u64> {
    use std::io::Read as _;
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn cpu_per_request(
    before: Option<ProcSample>,
    after: Option<ProcSample>,
    ticks: f64,
    result: &LoadResult,
) -> Option<f64> {
    let (before, after) = (before?, after?);
    let requests = result.ok + result.warmup_ok;
    (requests > 0).then(|| {
        after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / ticks * 1e6 / requests as f64
    })
}
