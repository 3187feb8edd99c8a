//! The suite's child processes: spawning them with their output captured,
//! talking to them over stdin/stdout, waiting for servers to listen, and
//! ending every one of them.
//!
//! Every child is owned by a [`Proc`] that kills it (by its PID) when
//! dropped, so an error anywhere still leaves nothing running; the PIDs are
//! also recorded in a file so that a wrapper (`run.sh`) can end them if the
//! suite itself is killed.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;

use crate::procfs::{self, ProcSample};

/// Where the PIDs of long-running children are recorded, if anywhere.
static PID_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Records the PIDs of children in `path` from now on (the first call wins).
pub(super) fn record_pids_in(path: PathBuf) {
    let _ = PID_FILE.set(path);
}

/// Appends `pid` to the PID file, if there is one. Best effort: a child a
/// wrapper could not end is still ended by its [`Proc`].
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
    /// What it is, for messages.
    name: String,
    child: Child,
    /// Its stdin, when kept.
    stdin: Option<ChildStdin>,
    /// Its stdout lines, read on a thread so that waiting for one can time
    /// out.
    lines: Option<mpsc::Receiver<String>>,
    /// Where its stderr goes, when not to ours.
    log: Option<PathBuf>,
}

impl Proc {
    /// Spawns `cmd`. `lines`: read its stdout line by line; `input`: keep a
    /// pipe to its stdin; `log`: send its stderr to this file.
    pub(super) fn spawn(
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
    pub(super) fn next_line(&mut self, timeout: Duration) -> Result<String> {
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

    /// The next stdout line, within `timeout`, parsed as JSON (the tools
    /// report one JSON line per step).
    pub(super) fn next_json<T: DeserializeOwned>(&mut self, timeout: Duration) -> Result<T> {
        Ok(serde_json::from_str(&self.next_line(timeout)?)?)
    }

    /// Writes one line to its stdin.
    pub(super) fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{}: stdin not captured", self.name))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes its stdin and waits up to `timeout` for it to exit, then kills it.
    pub(super) fn finish(mut self, timeout: Duration) {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks it to stop with SIGTERM (through `kill`, by its PID) and waits
    /// up to `timeout` for it to exit; whether it did (else it is killed
    /// when dropped).
    pub(super) fn terminate(&mut self, timeout: Duration) -> bool {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            return self.exited();
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Whether it has exited.
    pub(super) fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of its log (stderr), to explain a failure; empty
    /// without a log.
    pub(super) fn log_tail(&self) -> String {
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

    /// Its memory and CPU counters now.
    pub(super) fn sample(&self) -> Result<ProcSample> {
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

/// Picks a free loopback address (bind to port 0 on 127.0.0.1, release it).
pub(super) fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Runs `cmd` to its end, at most `timeout` (then kills it), and returns
/// its standard output; fails with its standard error when it fails.
pub(super) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<String> {
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
pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Waits until `addr` accepts connections and `extra` holds, or fails when
/// the process exits or `timeout` passes.
pub(super) fn wait_ready(
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

/// `path` as a command-line argument (the tools take UTF-8 paths only).
pub(super) fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}
