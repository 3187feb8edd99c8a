//! `pinproxy selftest`: proves, before a crawl, that the configured exits
//! leak nothing. For each exit it starts a pinproxy with that exit alone
//! (in this process, memory store, scratch CA) and sends canary requests
//! through it to an echo origin it starts itself; it prints, per exit, the
//! egress address the origin saw, any forwarded or proxy header that
//! arrived, the TLS version and JA4 that left, and the round-trip times,
//! and fails when anything leaked.
//!
//! A leak is: a forwarded-for, `Via`, proxy-credential or `X-Pinproxy-*`
//! header at the origin, a header value carrying the client's canary
//! address or session key, or (for an exit that is not `direct://`) an
//! egress address that is one of this machine's own: the exit did not hide
//! it. The echo origin listens on 127.0.0.1 by default, which exits running
//! on this machine (or reachable through a tunnel) can reach; for exits
//! elsewhere, `--echo-listen` and `--echo-host` publish it.

mod canary;
mod echo;

use std::net::{IpAddr, SocketAddr};

use super::{parse_exit_flag, SelftestArgs};
use canary::ExitReport;
use echo::EchoOrigin;

/// Runs `pinproxy selftest`.
pub fn selftest(args: SelftestArgs) -> anyhow::Result<()> {
    let mut config = args.common.load()?;
    if !args.exits.is_empty() {
        config.exits = args
            .exits
            .iter()
            .map(|value| parse_exit_flag(value))
            .collect::<Result<_, _>>()?;
    }
    if config.exits.is_empty() {
        config.exits = vec![crate::config::ExitConfig::new("direct", "direct://")];
    }
    let host = args
        .echo_host
        .clone()
        .unwrap_or_else(|| default_host(args.echo_listen));
    let runtime = super::runtime::multi_thread()?;
    let reports = runtime.block_on(async {
        let echo = EchoOrigin::start(args.echo_listen, &host).await?;
        let local = local_addresses();
        let mut reports = Vec::new();
        for exit in &config.exits {
            reports.push(canary::run(&config, exit, &echo, &local).await);
        }
        Ok::<_, anyhow::Error>(reports)
    })?;
    if args.json {
        for report in &reports {
            println!("{}", serde_json::to_string(report)?);
        }
    } else {
        print!("{}", table(&reports));
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.exit.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {} exits failed the self-test: {}",
            failed.len(),
            reports.len(),
            failed.join(", ")
        )
    }
}

/// The echo origin's name when none is given: `localhost` on loopback.
fn default_host(listen: SocketAddr) -> String {
    if listen.ip().is_loopback() {
        "localhost".into()
    } else {
        listen.ip().to_string()
    }
}

/// This machine's interface addresses.
fn local_addresses() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|interfaces| interfaces.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default()
}

/// The human-readable report.
fn table(reports: &[ExitReport]) -> String {
    let mut out = String::new();
    for report in reports {
        let verdict = if report.passed() { "ok" } else { "FAILED" };
        out.push_str(&format!(
            "exit {} ({}): {verdict}\n",
            report.exit, report.url
        ));
        if let Some(seen) = &report.seen {
            out.push_str(&format!(
                "  egress address seen by the origin: {}\n",
                seen.peer
            ));
            out.push_str(&format!(
                "  TLS: {} ALPN {} JA4 {}\n",
                seen.tls_version,
                seen.alpn.as_deref().unwrap_or("-"),
                seen.ja4.as_deref().unwrap_or("-")
            ));
            let forwarded: Vec<&str> = seen
                .headers
                .iter()
                .map(|(name, _)| name.as_str())
                .filter(|name| {
                    crate::proxy::egress::FORWARDING_HEADERS.contains(name)
                        || name.starts_with("proxy-")
                })
                .collect();
            out.push_str(&format!(
                "  forwarded/proxy headers that arrived: {}\n",
                if forwarded.is_empty() {
                    "none".into()
                } else {
                    forwarded.join(", ")
                }
            ));
        }
        if let (Some(cold), Some(warm)) = (report.cold_ms, report.warm_ms) {
            out.push_str(&format!(
                "  round trip: {cold:.1} ms (new tunnel), {warm:.1} ms (same tunnel)\n"
            ));
        }
        for leak in &report.leaks {
            out.push_str(&format!("  LEAK: {leak}\n"));
        }
        if let Some(error) = &report.error {
            out.push_str(&format!("  error: {error}\n"));
        }
    }
    out
}
