//! `pinproxy selftest`, run as a user runs it, against real tinyproxy
//! exits: a clean exit (egress from 127.0.0.2) passes and shows what the
//! origin saw; an exit that egresses from this machine's own address
//! (tinyproxy bound to 127.0.0.1, the loopback interface's address) fails
//! the run, named.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::process::Stdio;
use std::time::Duration;

use support::procs::{run_bounded, Tinyproxy};
use tokio::process::Command;

fn selftest(exits: &[String], json: bool) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pinproxy"));
    command.arg("selftest");
    for exit in exits {
        command.arg("--exit").arg(exit);
    }
    if json {
        command.arg("--json");
    }
    command
        .env_remove("PINPROXY_CONFIG")
        .env("RUST_LOG", "warn");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_passes_and_shows_what_the_origin_saw() {
    let clean = Tinyproxy::start("127.0.0.2").await;
    let output = run_bounded(
        selftest(&[format!("clean={}", clean.url())], true),
        Duration::from_secs(60),
    )
    .await;
    let text = String::from_utf8(output.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(report["exit"], "clean");
    assert_eq!(report["leaks"], serde_json::json!([]), "{report}");
    let seen = &report["seen"];
    assert_eq!(seen["peer"], "127.0.0.2", "{report}");
    assert_eq!(seen["tls_version"], "TLSv1_3");
    assert!(
        seen["ja4"].as_str().is_some_and(|j| j.starts_with("t13")),
        "{report}"
    );
    let names: Vec<&str> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap())
        .collect();
    for forbidden in [
        "x-forwarded-for",
        "forwarded",
        "via",
        "x-real-ip",
        "proxy-authorization",
    ] {
        assert!(
            !names.contains(&forbidden),
            "{forbidden} reached the origin: {names:?}"
        );
    }
    assert!(
        names.contains(&"cookie"),
        "the tracked cookie goes out: {names:?}"
    );
    assert!(report["cold_ms"].as_f64().is_some() && report["warm_ms"].as_f64().is_some());
    // The values reach the report as short hashes only: the canary cookie
    // (or an exit's leaked credentials) must not land in a CI log.
    for pair in seen["headers"].as_array().unwrap() {
        let value = pair[1].as_str().unwrap();
        assert!(
            value.starts_with("hash:") && value.len() == "hash:".len() + 8,
            "{pair}"
        );
    }
    assert!(!text.contains("datadome="), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_that_egresses_from_this_machine_fails_the_run() {
    let clean = Tinyproxy::start("127.0.0.2").await;
    let leaky = Tinyproxy::start("127.0.0.1").await;
    let mut command = selftest(
        &[
            format!("clean={}", clean.url()),
            format!("leaky={}", leaky.url()),
        ],
        false,
    );
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("selftest finishes within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("exit clean (http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("): ok"), "{stdout}");
    assert!(stdout.contains("exit leaky"), "{stdout}");
    assert!(
        stdout.contains("LEAK: the origin saw 127.0.0.1, an address of this machine"),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 of 2 exits failed the self-test: leaky"),
        "{stderr}"
    );
}
