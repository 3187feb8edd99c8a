//! Resident memory and CPU time of a process, read from `/proc`.

use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Context, Result};

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// Resident set size (`VmRSS`), in bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time of all its threads, in clock ticks.
    pub cpu_ticks: u64,
    /// Number of threads.
    pub threads: u64,
}

impl ProcSample {
    /// CPU time used since `earlier`, in microseconds, at `ticks` clock
    /// ticks per second (see [`ticks_per_second`]).
    pub fn cpu_us_since(&self, earlier: &ProcSample, ticks: f64) -> f64 {
        self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 / ticks * 1e6
    }
}

/// Reads `/proc/PID/status` and `/proc/PID/stat`.
pub fn sample(pid: u32) -> Result<ProcSample> {
    let dir = Path::new("/proc").join(pid.to_string());
    let status = std::fs::read_to_string(dir.join("status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow!("/proc/{pid}/status has no {name}"))?;
        let value = line[name.len()..]
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow!("/proc/{pid}/status: empty {name}"))?;
        Ok(value.parse()?)
    };
    let rss_bytes = field("VmRSS:")? * 1024;
    let threads = field("Threads:")?;
    let stat = std::fs::read_to_string(dir.join("stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat is malformed"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat is short"))?
            .parse::<u64>()
            .map_err(Into::into)
    };
    Ok(ProcSample {
        rss_bytes,
        cpu_ticks: ticks(14)? + ticks(15)?,
        threads,
    })
}

/// Open file descriptors of a process (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> Result<u64> {
    let dir = Path::new("/proc").join(pid.to_string()).join("fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .count() as u64)
}

/// The machine-wide count of connections dropped because an accept queue
/// was full (`TcpExt: ListenOverflows` in `/proc/net/netstat`).
pub fn listen_overflows() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat")?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (
        lines
            .next()
            .ok_or_else(|| anyhow!("no TcpExt in /proc/net/netstat"))?,
        lines.next().ok_or_else(|| anyhow!("no TcpExt values"))?,
    );
    let index = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")
        .ok_or_else(|| anyhow!("no ListenOverflows counter"))?;
    let value = values
        .split_whitespace()
        .nth(index)
        .ok_or_else(|| anyhow!("short TcpExt values"))?;
    Ok(value.parse()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when that fails, which is
/// the value on every Linux architecture in practice).
pub fn ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.threads >= 1);
        assert!(ticks_per_second() > 0);
        assert!(open_fds(std::process::id()).unwrap() >= 3);
        listen_overflows().unwrap();
    }
}
