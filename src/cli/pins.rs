//! `pinproxy pins`: the identities of a running daemon, read from its
//! admin endpoint and shown as a table or JSON lines (credentials as
//! `name#hash` only).

use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::PinsArgs;
use crate::admin::IdentityView;
use crate::clock::Clock;

/// Runs `pinproxy pins`.
pub fn run(args: PinsArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let views = runtime.block_on(fetch_identities(args.admin, args.all))?;
    if args.json {
        for view in &views {
            println!("{}", serde_json::to_string(view)?);
        }
    } else {
        print!("{}", render_table(&views, Clock::system().now_ms()));
    }
    Ok(())
}

/// The admin endpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// No connection.
    #[error("cannot reach the admin endpoint at {addr} (is pinproxy running with --admin {addr}?): {source}")]
    Connect {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin endpoint: {0}")]
    Http(#[from] hyper::Error),
    /// A non-200 answer.
    #[error("admin endpoint answered {0}")]
    Status(StatusCode),
    /// The answer is not the expected JSON.
    #[error("admin endpoint sent unreadable JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Fetches the identity listing from a running daemon's admin endpoint.
pub async fn fetch_identities(
    addr: std::net::SocketAddr,
    all: bool,
) -> Result<Vec<IdentityView>, AdminClientError> {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| AdminClientError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let path = if all {
        "/identities?all=1"
    } else {
        "/identities"
    };
    let request = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|_| AdminClientError::Status(StatusCode::BAD_REQUEST))?;
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        return Err(AdminClientError::Status(response.status()));
    }
    let body = response.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// Renders identities as a table for humans.
pub fn render_table(views: &[IdentityView], now_ms: u64) -> String {
    let mut out = format!(
        "{:<16}  {:<14}  {:<8}  {:>8}  {:>8}  {:>6}  {:<15}  {:<36}  {:<36}  {}\n",
        "IDENTITY",
        "EXIT",
        "STATE",
        "AGE",
        "IDLE",
        "REQS",
        "EGRESS",
        "CLIENT JA4",
        "SENT JA4",
        "CREDENTIALS"
    );
    for v in views {
        let credentials: Vec<String> = v
            .credentials
            .iter()
            .map(|c| format!("{}#{}", printable(&c.name), c.hash))
            .collect();
        let state = match &v.reason {
            Some(reason) => format!("{} ({reason})", v.state),
            None => v.state.clone(),
        };
        out.push_str(&format!(
            "{:<16}  {:<14}  {:<8}  {:>8}  {:>8}  {:>6}  {:<15}  {:<36}  {:<36}  {}\n",
            v.identity,
            v.exit,
            state,
            human(now_ms.saturating_sub(v.created_ms)),
            human(now_ms.saturating_sub(v.last_used_ms)),
            v.requests,
            v.egress_ip.as_deref().unwrap_or("-"),
            v.client_ja4.as_deref().unwrap_or("-"),
            v.sent_ja4.as_deref().unwrap_or("-"),
            credentials.join(" "),
        ));
    }
    out
}

/// `name` as a terminal shows it faithfully: a name an origin chose
/// (matched by a glob such as `_px*`) may hold control characters (a C1
/// `CSI` some terminals obey), bidirectional overrides that would
/// rearrange the table, or invisible ones; those (and `\`, so that an
/// escape cannot be forged) are written as `\u{...}` escapes.
fn printable(name: &str) -> std::borrow::Cow<'_, str> {
    let shown_as_is = |c: char| {
        (c.is_ascii_graphic() && c != '\\')
            || (!c.is_ascii() && !c.is_control() && !is_format_control(c))
    };
    if name.chars().all(shown_as_is) {
        return name.into();
    }
    name.chars()
        .map(|c| {
            if shown_as_is(c) {
                c.to_string()
            } else {
                c.escape_unicode().to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// The formatting characters a terminal shows as nothing, or that reorder
/// the text around them (bidirectional controls, zero-width characters,
/// the soft hyphen, the byte-order mark).
fn is_format_control(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

fn human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::CredentialView;

    #[test]
    fn tables_show_names_and_hashes_only() {
        let view = IdentityView {
            identity: "00000000000000aa".into(),
            exit: "res1".into(),
            session: "s".into(),
            state: "active".into(),
            reason: None,
            created_ms: 0,
            last_used_ms: 90_000,
            requests: 7,
            egress_ip: Some("127.0.0.2".into()),
            client_ja4: Some("t13d1517h2_8daaf6152771_cb7bf5808d99".into()),
            client_http2: None,
            sent_ja4: None,
            credentials: vec![CredentialView {
                kind: "cookie".into(),
                name: "datadome".into(),
                hash: "1a2b3c4d".into(),
                expires_ms: None,
            }],
        };
        let table = render_table(&[view], 3_700_000);
        assert!(table.contains("datadome#1a2b3c4d"), "{table}");
        assert!(
            table.contains("t13d1517h2_8daaf6152771_cb7bf5808d99"),
            "{table}"
        );
        assert!(table.contains("1h01m"), "{table}");
        assert!(table.contains("1h00m"), "{table}");
    }

    /// Names an origin chose are shown, not obeyed: controls and
    /// bidirectional overrides are escaped.
    #[test]
    fn names_with_controls_are_escaped() {
        assert_eq!(printable("incap_ses_1.2"), "incap_ses_1.2");
        assert_eq!(printable("_px_é"), "_px_é");
        assert_eq!(printable("_px\u{9b}31m"), "_px\\u{9b}31m");
        assert_eq!(printable("_px\u{202e}kcab"), "_px\\u{202e}kcab");
        assert_eq!(printable("_px\u{1b}[2J"), "_px\\u{1b}[2J");
        assert_eq!(printable("a b"), "a\\u{20}b");
        assert_eq!(printable("a\u{200b}b"), "a\\u{200b}b");
        assert_eq!(printable("a\\u{41}"), "a\\u{5c}u{41}");
    }
}
