//! The machine and software facts at the top of the report.

use std::process::Command;

use anyhow::Result;

use super::procs::path_str;
use super::SuiteConfig;
use crate::report::Machine;

/// The trimmed standard output of `program args`, if it runs.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_owned())
}

/// Cores, CPU, memory, kernel, date, and the pinproxy, mitmproxy and peer versions.
pub(super) fn facts(config: &SuiteConfig) -> Result<Machine> {
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
    let peer = match (&config.peer, &config.peer_missing) {
        (Some(_), _) => config
            .peer_label
            .clone()
            .unwrap_or_else(|| "hudsucker (version unknown)".into()),
        (None, Some(why)) => format!("not built: {why}"),
        (None, None) => "not built (no --peer)".into(),
    };
    Ok(Machine {
        peer,
        cores,
        cpu_model,
        kernel,
        memory,
        date,
        revision: config.revision.clone(),
        mitmproxy,
    })
}
