//! Third-party programs used as real peers: tinyproxy exits, and the path
//! checks that tell a developer what `scripts/test.sh` would have installed.
//! Every process is started by the test, waited for by a readiness signal
//! (a line it prints), and killed by its own handle when dropped.

use std::path::PathBuf;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The path of `program`, or a panic saying how to get it.
pub fn require(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{program} is not installed: run scripts/test.sh, which installs every test dependency"
        )
    })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a `pinproxy` command (a tool: `store`, `pins`, ...) to its end and
/// returns its standard output; panics with its standard error if it fails.
pub async fn pinproxy_tool(args: &[&std::ffi::OsStr]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "pinproxy {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Starts `command` and waits (bounded) until a line of its output contains
/// `ready`; the rest of its output is drained in the background.
pub async fn spawn_until(command: Command, ready: &str, stderr: bool) -> Child {
    spawn_recording(command, ready, stderr, None).await
}

/// Every line a process printed, shared with the task that reads them.
pub type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`spawn_until`], keeping every line of the output in `record` too.
pub async fn spawn_recording(
    command: Command,
    ready: &str,
    stderr: bool,
    record: Option<Lines>,
) -> Child {
    spawn_reading(command, ready, 0, stderr, record).await.0
}

/// How long a spawned process (pinproxy included) has to print its ready
/// line. A bound, not a wait: a ready process goes on at once. Headless
/// Chromium's first start (a fresh profile) once took more than 20 s while
/// the whole suite ran on two cores, and passed alone in seconds.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// [`spawn_recording`] that also returns the ready line and the `more`
/// lines after it (a banner printing the addresses actually bound). On
/// failure the panic shows what the process printed and how it exited.
async fn spawn_reading(
    mut command: Command,
    ready: &str,
    more: usize,
    stderr: bool,
    record: Option<Lines>,
) -> (Child, Vec<String>) {
    command.kill_on_drop(true).stdin(Stdio::null());
    if stderr {
        command.stderr(Stdio::piped()).stdout(Stdio::null());
    } else {
        command.stdout(Stdio::piped()).stderr(Stdio::null());
    }
    let mut child = command.spawn().expect("spawn");
    let output: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let mut lines = BufReader::new(output).lines();
    let keep = record.clone();
    let keep = move |line: &str| {
        if let Some(record) = &keep {
            record.lock().unwrap().push(line.to_owned());
        }
    };
    let mut printed = Vec::new();
    let mut banner: Vec<String> = Vec::new();
    let wait = async {
        while let Ok(Some(line)) = lines.next_line().await {
            keep(&line);
            printed.push(line.clone());
            if !banner.is_empty() || line.contains(ready) {
                banner.push(line);
                if banner.len() > more {
                    return true;
                }
            }
        }
        false
    };
    let ok = tokio::time::timeout(READY_WITHIN, wait).await;
    if !matches!(ok, Ok(true)) {
        let status = match ok {
            Ok(_) => format!("{:?}", child.wait().await),
            Err(_) => format!("still running after {} s", READY_WITHIN.as_secs()),
        };
        panic!(
            "{command:?} never printed {ready:?} ({status}); it printed:\n{}",
            printed.join("\n")
        );
    }
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            keep(&line);
        }
    });
    (child, banner)
}

/// The address after `label` in a line of pinproxy's start-up banner
/// (`pinproxy listening on ADDR`, `  admin: http://ADDR/ ...`).
fn banner_addr(line: &str, label: &str) -> std::net::SocketAddr {
    let rest = line
        .split_once(label)
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
        .1;
    let addr = rest
        .split(|c: char| c == '/' || c.is_whitespace())
        .find(|part| !part.is_empty())
        .unwrap_or_default();
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} in {line:?} is not an address: {e}"))
}

/// A tinyproxy exit whose outgoing connections come from `bind`.
pub struct Tinyproxy {
    /// Its listening port on 127.0.0.1.
    pub port: u16,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts tinyproxy with `Bind bind`.
    pub async fn start(bind: &str) -> Tinyproxy {
        let program = require("tinyproxy");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListen 127.0.0.1\nBind {bind}\nTimeout 60\nAllow 127.0.0.1\n\
                 MaxClients 200\nLogLevel Info\nDisableViaHeader Yes\n"
            ),
        )
        .unwrap();
        let mut command = Command::new(program);
        command.arg("-d").arg("-c").arg(&config);
        let child = spawn_until(command, "Accepting connections", false).await;
        Tinyproxy {
            port,
            _child: child,
            _dir: dir,
        }
    }

    /// The exit URL for pinproxy.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where it listens, as a client's HTTP proxy.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A redis-server on a free loopback port, persisting every write (AOF,
/// fsync always) in its own directory, so a restart keeps its data.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a fresh server.
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let mut command = Command::new(require("redis-server"));
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args([
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
            ])
            .arg("--dir")
            .arg(self.dir.path());
        self.child = Some(spawn_until(command, "Ready to accept connections", false).await);
    }

    /// The store URL for pinproxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }
}

/// `pinproxy run --listen 127.0.0.1:PORT --admin ADMIN|off --data-dir DIR
/// ARGS...` with `RUST_LOG=rust_log`.
fn pinproxy_run(
    port: u16,
    admin: Option<std::net::SocketAddr>,
    data_dir: &std::path::Path,
    args: &[String],
    rust_log: &str,
) -> Command {
    let admin = admin.map_or_else(|| "off".to_owned(), |a| a.to_string());
    let mut command = Command::new(env!("CARGO_BIN_EXE_pinproxy"));
    command
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            &admin,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", rust_log);
    command
}

/// Runs `pinproxy run` on `data_dir` with `args` expecting it to refuse
/// to start: waits (bounded by `within`) for it to exit, asserts it failed,
/// and returns what it wrote to stderr.
pub async fn pinproxy_refuses_to_start(
    data_dir: &std::path::Path,
    args: &[String],
    within: Duration,
) -> String {
    let mut command = pinproxy_run(0, None, data_dir, args, "warn");
    command.kill_on_drop(true).stdin(Stdio::null());
    let output = tokio::time::timeout(within, command.output())
        .await
        .expect("pinproxy kept running")
        .unwrap();
    assert!(!output.status.success(), "pinproxy started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A pinproxy started as its own process, the way users run it.
pub struct PinproxyProcess {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its admin endpoint, when started with one.
    pub admin: Option<std::net::SocketAddr>,
    child: Child,
}

impl PinproxyProcess {
    /// Runs `pinproxy run --listen 127.0.0.1:PORT --data-dir DIR --admin off ARGS...`
    /// and waits until it says it is listening.
    pub async fn start(data_dir: &std::path::Path, args: &[String]) -> PinproxyProcess {
        PinproxyProcess::start_logging(data_dir, args, "warn", None).await
    }

    /// [`PinproxyProcess::start`] with `RUST_LOG=rust_log`, every line it
    /// logs kept in `record`.
    pub async fn start_logging(
        data_dir: &std::path::Path,
        args: &[String],
        rust_log: &str,
        record: Option<Lines>,
    ) -> PinproxyProcess {
        PinproxyProcess::launch(data_dir, args, rust_log, record, false).await
    }

    /// [`PinproxyProcess::start`] with an admin endpoint on a free port.
    pub async fn start_with_admin(data_dir: &std::path::Path, args: &[String]) -> PinproxyProcess {
        PinproxyProcess::launch(data_dir, args, "warn", None, true).await
    }

    /// [`PinproxyProcess::start_with_admin`] with `RUST_LOG=rust_log`,
    /// every line it logs kept in `record`.
    pub async fn start_with_admin_logging(
        data_dir: &std::path::Path,
        args: &[String],
        rust_log: &str,
        record: Lines,
    ) -> PinproxyProcess {
        PinproxyProcess::launch(data_dir, args, rust_log, Some(record), true).await
    }

    async fn launch(
        data_dir: &std::path::Path,
        args: &[String],
        rust_log: &str,
        record: Option<Lines>,
        with_admin: bool,
    ) -> PinproxyProcess {
        // Port 0: the system picks free ports and the banner names them, so
        // no other test can take them between a probe and the bind.
        let admin = with_admin.then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let command = pinproxy_run(0, admin, data_dir, args, rust_log);
        let more = usize::from(with_admin);
        let (child, banner) =
            spawn_reading(command, "pinproxy listening on", more, true, record).await;
        PinproxyProcess {
            addr: banner_addr(&banner[0], "pinproxy listening on "),
            data_dir: data_dir.to_owned(),
            admin: with_admin.then(|| banner_addr(&banner[1], "admin: http://")),
            child,
        }
    }

    /// [`PinproxyProcess::start_logging`] whose stderr nobody reads after
    /// the start line: the pipe stays open (the returned reader, held and
    /// never read) and fills up, as with a log shipper that stopped reading.
    pub async fn start_unread(
        data_dir: &std::path::Path,
        args: &[String],
        rust_log: &str,
    ) -> (
        PinproxyProcess,
        tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    ) {
        let mut command = pinproxy_run(0, None, data_dir, args, rust_log);
        command
            .kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let started = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("pinproxy listening on") {
                    return Some(line);
                }
            }
            None
        };
        let ok = tokio::time::timeout(READY_WITHIN, started).await;
        let Ok(Some(banner)) = ok else {
            panic!("pinproxy never said it listens")
        };
        let proxy = PinproxyProcess {
            addr: banner_addr(&banner, "pinproxy listening on "),
            data_dir: data_dir.to_owned(),
            admin: None,
            child,
        };
        (proxy, lines)
    }

    /// `GET http://ADMIN{path}`: the body of the admin endpoint's answer.
    pub async fn admin_get(&self, path: &str) -> String {
        let admin = self.admin.expect("started with an admin endpoint");
        let output = tokio::time::timeout(
            Duration::from_secs(10),
            Command::new(require("curl"))
                .args(["-sS", "--fail", "--noproxy", "*"])
                .arg(format!("http://{admin}{path}"))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the admin endpoint answers within 10 s")
        .unwrap();
        assert!(
            output.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// `METHOD http://ADMIN{path}` (POST and DELETE included): the status
    /// and the body of the admin endpoint's answer.
    pub async fn admin_send(&self, method: &str, path: &str) -> (u16, String) {
        let admin = self.admin.expect("started with an admin endpoint");
        let output = tokio::time::timeout(
            Duration::from_secs(20),
            Command::new(require("curl"))
                .args(["-sS", "--noproxy", "*", "-X", method])
                .args(["-w", "\n%{http_code}"])
                .arg(format!("http://{admin}{path}"))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the admin endpoint answers within 20 s")
        .unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let (body, status) = text.rsplit_once('\n').unwrap();
        (status.trim().parse().unwrap(), body.to_owned())
    }

    /// How many file descriptors the process holds open.
    pub fn open_fds(&self) -> usize {
        let pid = self.child.id().expect("running");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }

    /// Sends the signal `name` (`HUP`, `TERM`, ...) with `kill`.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {name} {pid} failed");
    }

    /// Waits (bounded by `within`) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("pinproxy did not exit within {within:?}"))
            .unwrap()
    }

    /// `kill -9`.
    pub async fn kill9(mut self) {
        let _ = self.child.kill().await;
    }

    /// The process's resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Its peak resident memory so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// A `kB` field of `/proc/PID/status`.
    fn status_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// The CA the process uses.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("ca.pem")).unwrap()
    }
}

/// Waits (bounded) until something accepts connections on 127.0.0.1:`port`:
/// for programs that print no readiness line.
pub async fn wait_for_port(port: u16) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

/// A microsocks SOCKS5 exit whose outgoing connections come from `bind`.
pub struct Microsocks {
    /// Its port on 127.0.0.1.
    pub port: u16,
    _child: Child,
}

impl Microsocks {
    /// Starts microsocks, requiring `user:password` when given.
    pub async fn start(bind: &str, credentials: Option<(&str, &str)>) -> Microsocks {
        let port = free_port();
        let mut command = Command::new(require("microsocks"));
        command
            .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-b", bind])
            .kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((user, password)) = credentials {
            command.args(["-u", user, "-P", password]);
        }
        let child = command.spawn().expect("spawn microsocks");
        wait_for_port(port).await;
        Microsocks {
            port,
            _child: child,
        }
    }

    /// The exit URL for pinproxy.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((user, password)) => format!("socks5://{user}:{password}@127.0.0.1:{}", self.port),
            None => format!("socks5://127.0.0.1:{}", self.port),
        }
    }
}

/// A Dante SOCKS5 exit whose outgoing connections come from `external`; its
/// replies state that address (BND.ADDR), unlike microsocks.
pub struct Dante {
    /// Its port on 127.0.0.1.
    pub port: u16,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl Dante {
    /// Starts danted.
    pub async fn start(external: &str) -> Dante {
        let program = require("danted");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("danted.conf");
        std::fs::write(
            &config,
            format!(
                "logoutput: stderr\ninternal: 127.0.0.1 port = {port}\nexternal: {external}\n\
                 clientmethod: none\nsocksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
                 client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\nsocks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n"
            ),
        )
        .unwrap();
        let mut command = Command::new(program);
        command.arg("-f").arg(&config).args(["-N", "1"]);
        let child = spawn_until(command, "running", true).await;
        Dante {
            port,
            _child: child,
            _dir: dir,
        }
    }

    /// The exit URL for pinproxy.
    pub fn url(&self) -> String {
        format!("socks5://127.0.0.1:{}", self.port)
    }
}

/// Runs `command` to its end, killing it after `timeout`; panics unless it
/// succeeds.
pub async fn run_bounded(command: Command, timeout: Duration) -> std::process::Output {
    let (command, output) = run_output(command, timeout).await;
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// How a process ended and what it printed (as text).
#[derive(Debug)]
pub struct Finished {
    /// Its exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Finished {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `command` to its end, killing it after `timeout` (and panicking
/// then), whatever its exit status: for commands expected to fail.
pub async fn run_to_end(command: Command, timeout: Duration) -> Finished {
    let (_, output) = run_output(command, timeout).await;
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn run_output(mut command: Command, timeout: Duration) -> (Command, std::process::Output) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawn");
    // On timeout the future is dropped, and with it the child, which
    // kill_on_drop kills.
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not finish within {timeout:?}"))
        .unwrap();
    (command, output)
}

/// A fresh directory holding a CA made by `pinproxy ca` (what a fleet's
/// replicas share, as sidecars would from one secret).
pub fn shared_ca_dir() -> tempfile::TempDir {
    let shared = tempfile::tempdir().unwrap();
    let ca = std::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .args(["ca", "--data-dir"])
        .arg(shared.path())
        .output()
        .unwrap();
    assert!(ca.status.success(), "pinproxy ca failed");
    shared
}
