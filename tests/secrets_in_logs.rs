//! Never log a secret: a cookie-heavy run of the real binary, logging at
//! every level, and not one raw cookie value, session key or exit
//! credential in what it printed. Credentials appear as `name#hash8`,
//! exits by id and redacted URL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::sync::{Arc, Mutex};

use support::origin::Origin;
use support::procs::PinproxyProcess;
use support::{Jar, ProxyClient, TestExit};

/// Values no log line may contain.
const EXIT_PASSWORD: &str = "ExitPassw0rd-7731";
const SESSION_KEY: &str = "SessionKey-5c1e";
const HEADER_SESSION_KEY: &str = "HeaderKey-9a3f";
const CLEARANCE: &str = "CfClearanceValue-77e1";
const CLIENT_ID: &str = "ClientIdValue-0b2d";
const UNTRACKED: &str = "UntrackedSid-4c4c";
const PX_TOKEN: &str = "PxToken-31d7";
const PX_ORIGINAL: &str = "PxOriginal-8e02";
const KASADA_TOKEN: &str = "KasadaCt-6f19";
const BAD_TOKEN: &str = "PxBadToken-2a2a";
const BAD_SESSION_KEY: &str = "BadSessionKey-3e3e";
const QUERY_TOKEN: &str = "QueryToken-5d5d";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_heavy_run_logs_no_raw_value_or_credential() {
    let origin = Origin::start().await;
    let guarded =
        TestExit::start_with_auth("127.0.0.2", Some(&format!("exituser:{EXIT_PASSWORD}"))).await;
    let open = TestExit::start("127.0.0.3").await;
    let data_dir = tempfile::tempdir().unwrap();
    let args = vec![
        "--upstream-ca".into(),
        origin.pki.ca_file.display().to_string(),
        "--exit".into(),
        format!("guarded=http://exituser:{EXIT_PASSWORD}@{}", guarded.addr),
        "--exit".into(),
        format!("open=http://{}", open.addr),
        // An exit that is down, named with credentials: its errors too.
        "--exit".into(),
        format!("down=http://exituser:{EXIT_PASSWORD}@127.0.0.1:9"),
    ];
    let lines = Arc::new(Mutex::new(Vec::new()));
    let proxy =
        PinproxyProcess::start_logging(data_dir.path(), &args, "trace", Some(lines.clone())).await;
    let client = ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let https = origin.https.port();

    // Identities earned from Set-Cookie, then reused with extra cookies.
    let mut issued = Vec::new();
    for round in 0..6 {
        let mut jar = Jar::default();
        // The down exit takes its turn in rotation until it is found dead.
        for _ in 0..8 {
            let mut conn = client.tunnel("localhost", https).await;
            if conn.get_with_jar("/login", &mut jar).await.status == 200 {
                break;
            }
        }
        issued.push(
            jar.get("datadome")
                .expect("a login through a live exit")
                .to_owned(),
        );
        jar.set("cf_clearance", &format!("{CLEARANCE}{round}"));
        jar.set("sid", UNTRACKED);
        for _ in 0..3 {
            let mut conn = client.tunnel("localhost", https).await;
            conn.get_with_jar("/page", &mut jar).await;
        }
        // DataDome's header carrier.
        let mut conn = client.tunnel("localhost", https).await;
        conn.get(
            "/page",
            &[("x-datadome-clientid", &format!("{CLIENT_ID}{round}"))],
        )
        .await;
        // The SDK token headers of PerimeterX and Kasada.
        let mut conn = client.tunnel("localhost", https).await;
        conn.get(
            "/page",
            &[
                ("x-px-authorization", &format!("3:{PX_TOKEN}{round}")),
                ("x-px-original-token", &format!("3:{PX_ORIGINAL}{round}")),
                ("x-kpsdk-ct", &format!("{KASADA_TOKEN}{round}")),
            ],
        )
        .await;
    }
    // Session keys, on the CONNECT and in the header.
    let mut conn = client
        .tunnel_as(&format!("session-{SESSION_KEY}"), "localhost", https)
        .await;
    conn.get("/page", &[]).await;
    let mut conn = client.tunnel("localhost", https).await;
    conn.get("/page", &[("x-pinproxy-session", HEADER_SESSION_KEY)])
        .await;
    // Error answers: a conflict between two identities' cookies, and a
    // malformed session key carrying a secret-looking value.
    let mut conn = client.tunnel("localhost", https).await;
    let both = format!("datadome={}; cf_clearance={CLEARANCE}5", issued[0]);
    let conflict = conn.get("/page", &[("cookie", &both)]).await;
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    assert!(!conflict.body.contains(&issued[0]), "{}", conflict.body);
    // A token header and a session key refused for a byte that is not
    // visible ASCII: the refusal names the header, never its value.
    let mut conn = client.tunnel("localhost", https).await;
    let refused = conn
        .get(
            "/page",
            &[("x-px-authorization", &format!("3:{BAD_TOKEN}\u{e9}"))],
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(!refused.body.contains(BAD_TOKEN), "{}", refused.body);
    let mut conn = client.tunnel("localhost", https).await;
    let refused = conn
        .get(
            "/page",
            &[("x-pinproxy-session", &format!("{BAD_SESSION_KEY}\u{e9}"))],
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(!refused.body.contains(BAD_SESSION_KEY), "{}", refused.body);
    // Plain HTTP too.
    let mut plain = client.plain("localhost", origin.http.port()).await;
    plain
        .get(
            "/page",
            &[(
                "cookie",
                &format!("cf_clearance={CLEARANCE}p; sid={UNTRACKED}"),
            )],
        )
        .await;
    // A request sent as to an origin (a path, no host): refused, and its
    // path and query, which may carry a token, are not logged.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(
            format!(
                "GET /api?token={QUERY_TOKEN} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tcp.read_to_end(&mut answer),
        )
        .await;
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        // Its refusal is logged (at debug) before the process goes.
        let logged = || {
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("not a proxy request"))
        };
        for _ in 0..200 {
            if logged() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert!(logged(), "the refusal was logged");
    }
    drop(proxy);

    let lines = lines.lock().unwrap().clone();
    assert!(
        lines.len() > 50,
        "the run logged too little to mean anything: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("datadome#")),
        "credentials are logged as name#hash"
    );
    assert!(
        lines.iter().any(|l| l.contains("x-px-authorization#")),
        "SDK tokens are read as credentials, and logged as name#hash"
    );
    let mut secrets: Vec<String> = issued;
    secrets.extend(
        [
            EXIT_PASSWORD,
            SESSION_KEY,
            HEADER_SESSION_KEY,
            CLEARANCE,
            CLIENT_ID,
            UNTRACKED,
            PX_TOKEN,
            PX_ORIGINAL,
            KASADA_TOKEN,
            BAD_TOKEN,
            BAD_SESSION_KEY,
            QUERY_TOKEN,
        ]
        .map(String::from),
    );
    for line in &lines {
        for secret in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "a log line holds a secret ({secret}): {line}"
            );
        }
    }
}
