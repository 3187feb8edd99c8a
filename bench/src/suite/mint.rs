//! The leaf-minting phase (last in the report's scale chapter): what minting
//! a leaf for a new host costs next to a cached one, as a client sees it
//! (`pinbench handshakes` through a running pinproxy) and, when pinbench is
//! built with the `library` feature, in-process (`pinbench mint`).

use std::fmt::Write as _;
use std::process::{Command, Stdio};

use anyhow::Result;

use super::procs::path_str;
use super::{Phase, Suite};
use crate::mint::MintReport;
use crate::report::{ns, Goal, Results};

/// The leaf-minting phase.
pub const PHASE: Phase = Phase {
    key: "mint",
    name: "leaf minting",
    chapter: None,
    run,
    goals,
    render,
};

/// No goal is set for leaf minting; the table shows what it costs.
fn goals(_: &Results) -> Vec<Goal> {
    Vec::new()
}

/// Runs the phase: the library view (when built in), then the client-side
/// view through a fresh pinproxy.
fn run(suite: &mut Suite) -> Result<()> {
    let count = suite.config.mint_count.to_string();
    let out = Command::new(&suite.exe)
        .args(["mint", "--count", &count, "--cached-per-new", "20"])
        .stderr(if cfg!(feature = "library") {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .output()?;
    if out.status.success() {
        suite.results.mint_library = Some(serde_json::from_slice::<MintReport>(&out.stdout)?);
    } else if cfg!(feature = "library") {
        suite.results.notes.push(format!(
            "leaf minting, library view: pinbench mint failed ({}); see its error in the \
             run's output",
            out.status
        ));
    }
    let proxy = suite.start_pinproxy("pinproxy-mint", None)?;
    let out = Command::new(&suite.exe)
        .arg("handshakes")
        .args(["--proxy", &proxy.addr.to_string()])
        .args(["--ca", path_str(proxy.ca()?)?])
        .args(["--count", &count])
        .stderr(Stdio::inherit())
        .output()?;
    if out.status.success() {
        suite.results.mint_handshake = Some(serde_json::from_slice::<MintReport>(&out.stdout)?);
    } else {
        suite
            .results
            .notes
            .push(format!("pinbench handshakes failed ({})", out.status));
    }
    for (view, r) in views(&suite.results) {
        if let Some(r) = r {
            suite.progress.say(format!(
                "leaf ({view}): new host p50 {} ns, cached p50 {} ns",
                r.new_host.p50_ns, r.cached_host.p50_ns
            ));
        }
    }
    Ok(())
}

/// The two views with their labels, in table order.
fn views(results: &Results) -> [(&'static str, Option<&MintReport>); 2] {
    [
        ("library", results.mint_library.as_ref()),
        ("client-side", results.mint_handshake.as_ref()),
    ]
}

/// The leaf certificate table.
fn render(results: &Results, out: &mut String) {
    let _ = writeln!(out, "### Leaf certificates\n");
    let _ = writeln!(
        out,
        "New hosts and a cached host, interleaved. *client-side* times `CONNECT` plus the \
         TLS handshake through a running pinproxy with a new SNI name versus a cached one: \
         the difference is what minting adds to a tunnel's first handshake. *library* (only \
         when pinbench is built with `--features library`, e.g. `PINBENCH_LIBRARY=1 \
         bench/run.sh`) times `CertCache::server_config` in-process.\n"
    );
    let _ = writeln!(
        out,
        "| view | samples | new host p50 | new host p99 | cached host p50 | cached host p99 | new/cached (p50) |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (view, r) in views(results) {
        if let Some(r) = r {
            let _ = writeln!(
                out,
                "| {view} | {} + {} | {} | {} | {} | {} | {:.1}× |",
                r.new_host.count,
                r.cached_host.count,
                ns(r.new_host.p50_ns),
                ns(r.new_host.p99_ns),
                ns(r.cached_host.p50_ns),
                ns(r.cached_host.p99_ns),
                r.new_host.p50_ns as f64 / r.cached_host.p50_ns.max(1) as f64,
            );
        }
    }
    let _ = writeln!(out);
}
