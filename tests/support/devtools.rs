//! Headless Chromium driven over the DevTools protocol, for what
//! `--dump-dom` cannot do: answering proxy authentication challenges, and
//! reading the network error of a failed navigation.
//!
//! Chromium has no command-line flag for proxy credentials. Playwright's
//! `proxy: {username, password}` answers the browser's `407` through the
//! DevTools protocol, and so does [`Devtools::proxy_credentials`]:
//! `Fetch.enable` with `handleAuthRequests: true`, then every
//! `Fetch.authRequired` (the proxy's challenge) is answered with
//! `Fetch.continueWithAuth` and the credentials, and every paused request
//! is continued untouched. Chromium itself then retries the request with
//! `Proxy-Authorization`, exactly as it would with a user typing the
//! credentials into its prompt.
//!
//! The browser is kept on loopback the way [`super::browser`] keeps it:
//! the caller passes the same proxy bypass list and host resolver rules
//! (and a [`super::browser::ConnectTap`] in front of the proxy). The
//! DevTools endpoint listens on 127.0.0.1 on a port Chromium picks, read
//! from the line it prints; every call has a deadline and the process is
//! killed when the handle is dropped.

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::browser::HEADLESS_FLAGS;
use super::procs::{require, spawn_recording, Lines};

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium and a DevTools connection to one of its pages.
pub struct Devtools {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: String,
    credentials: Option<(String, String)>,
    /// Every `Fetch.authRequired` challenge seen (its `authChallenge`).
    pub challenges: Vec<Value>,
    _child: Child,
}

impl Devtools {
    /// Starts Chromium with `HOME=home` (so it trusts what is in
    /// `home/.pki/nssdb`), a fresh profile in `profile`, and `args` (proxy,
    /// resolver rules); opens a page and attaches to it.
    pub async fn launch(home: &Path, profile: &Path, args: &[String]) -> Devtools {
        let mut command = Command::new(require("chromium"));
        command
            .env("HOME", home)
            .args(HEADLESS_FLAGS)
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg("about:blank");
        let lines = Lines::default();
        let child =
            spawn_recording(command, "DevTools listening on", true, Some(lines.clone())).await;
        let url = lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| {
                l.split("DevTools listening on ")
                    .nth(1)
                    .map(str::trim)
                    .map(String::from)
            })
            .expect("the DevTools address");
        let (ws, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .expect("DevTools answers")
            .expect("DevTools websocket");
        let mut devtools = Devtools {
            ws,
            next_id: 0,
            session: String::new(),
            credentials: None,
            challenges: Vec::new(),
            _child: child,
        };
        let target = devtools
            .browser_call("Target.createTarget", json!({ "url": "about:blank" }))
            .await
            .unwrap();
        let attached = devtools
            .browser_call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await
            .unwrap();
        devtools.session = attached["sessionId"].as_str().unwrap().to_owned();
        devtools.call("Page.enable", json!({})).await.unwrap();
        devtools
    }

    /// Answers every proxy (and server) authentication challenge with
    /// `user`:`password`, as Playwright's `proxy: {username, password}`
    /// does; `None` cancels every challenge.
    pub async fn proxy_credentials(&mut self, credentials: Option<(&str, &str)>) {
        self.credentials = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
        self.call(
            "Fetch.enable",
            json!({ "handleAuthRequests": true, "patterns": [{ "urlPattern": "*" }] }),
        )
        .await
        .unwrap();
    }

    /// Navigates to `url`; `Err` with Chromium's network error
    /// (`net::ERR_...`) when the navigation failed.
    pub async fn navigate(&mut self, url: &str) -> Result<(), String> {
        let result = self.call("Page.navigate", json!({ "url": url })).await?;
        match result["errorText"].as_str() {
            Some(error) if !error.is_empty() => Err(error.to_owned()),
            _ => Ok(()),
        }
    }

    /// Evaluates `expression` in the page; its value (`null` while the page
    /// is being replaced by a navigation).
    pub async fn evaluate(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        match result {
            Ok(result) => result["result"]["value"].clone(),
            Err(error) if error.contains("navigated or closed") => Value::Null,
            Err(error) => panic!("{error}"),
        }
    }

    /// Polls (every 100 ms, at most `within`) until `expression` is a
    /// non-empty string in the page; that string, or `None`.
    pub async fn wait_for_text(&mut self, expression: &str, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(text) = self.evaluate(expression).await.as_str() {
                if !text.is_empty() {
                    return Some(text.to_owned());
                }
            }
            // The next evaluation answers what paused meanwhile.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Calls `method` on the page.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let session = self.session.clone();
        self.call_in(Some(session), method, params).await
    }

    /// Calls `method` on the browser itself.
    async fn browser_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.call_in(None, method, params).await
    }

    async fn call_in(
        &mut self,
        session: Option<String>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.send(session.as_deref(), method, params).await;
        let wait = async {
            loop {
                let message = self.pump().await;
                if message["id"].as_u64() == Some(id) {
                    return match message.get("error") {
                        Some(error) => Err(format!("{method}: {error}")),
                        None => Ok(message["result"].clone()),
                    };
                }
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| panic!("DevTools call {method} took longer than {CALL_TIMEOUT:?}"))
    }

    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> u64 {
        self.next_id += 1;
        let mut message = json!({ "id": self.next_id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::text(message.to_string()))
            .await
            .expect("DevTools send");
        self.next_id
    }

    /// Reads the next message, answering `Fetch` pauses and challenges on
    /// the way (those are handled here and returned too).
    async fn pump(&mut self) -> Value {
        let text = loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => break text.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("the DevTools connection ended: {other:?}"),
            }
        };
        let message: Value = serde_json::from_str(&text).unwrap();
        let session = message["sessionId"].as_str().map(str::to_owned);
        let request_id = message["params"]["requestId"].clone();
        match message["method"].as_str() {
            Some("Fetch.requestPaused") => {
                self.send(
                    session.as_deref(),
                    "Fetch.continueRequest",
                    json!({ "requestId": request_id }),
                )
                .await;
            }
            Some("Fetch.authRequired") => {
                self.challenges
                    .push(message["params"]["authChallenge"].clone());
                let response = match &self.credentials {
                    Some((user, password)) => json!({
                        "response": "ProvideCredentials", "username": user, "password": password,
                    }),
                    None => json!({ "response": "CancelAuth" }),
                };
                self.send(
                    session.as_deref(),
                    "Fetch.continueWithAuth",
                    json!({ "requestId": request_id, "authChallengeResponse": response }),
                )
                .await;
            }
            _ => {}
        }
        message
    }
}
