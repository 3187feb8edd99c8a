//! Observing identities: the `pins` command lists them by exit and hashed
//! credential (never a raw value), as a table or JSON, and metrics count
//! them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::Setup;

#[tokio::test]
async fn identities_are_listed_by_the_pins_command_and_counted_in_metrics() {
    let s = Setup::start(2).await;
    let (jar, peer) = s.login("/login").await;
    let admin = s.proxy.daemon.admin_addr().unwrap();
    let bin = env!("CARGO_BIN_EXE_pinproxy");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["pins", "--admin", &admin.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8(output.stdout).unwrap();
    let exit = format!("exit{}", s.exit_of(peer) + 1);
    assert!(
        table.contains(&exit) && table.contains("datadome#"),
        "{table}"
    );
    assert!(
        !table.contains(jar.get("datadome").unwrap()),
        "raw cookie value in the listing"
    );

    let json = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["pins", "--json", "--admin", &admin.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let line = String::from_utf8(json.stdout).unwrap();
    let view: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(view["exit"], exit);
    assert_eq!(view["requests"], 1);

    let metrics = s.proxy.daemon.admin().metrics.encode();
    assert!(
        metrics.contains("pinproxy_identities_created_total 1"),
        "{metrics}"
    );
    s.stop().await;
}
