//! HTTP/2 towards origins with a given connection preface: the client's own
//! (mirror mode) or a browser profile's (chrome mode).
//!
//! The preface is the client's first SETTINGS frame (identifiers, values
//! and their order), its connection WINDOW_UPDATE, its PRIORITY frames, the
//! priority its first HEADERS frame carries and its pseudo-header order;
//! the `http2` crate can send all of them, through wreq-proto's hyper-style
//! connection layer. Regular header order is the request's own.
//!
//! Windows, the header list and the HPACK table a client states are offered
//! up to a ceiling ([`MAX_STREAM_WINDOW`], [`MAX_CONNECTION_WINDOW`],
//! [`MAX_HEADER_LIST`], [`MAX_HEADER_TABLE`], [`MAX_FRAME_SIZE`]), at or above what every
//! client seen states: an origin may send that much, and it waits in
//! pinproxy's memory while the client does not read. Server push is never
//! enabled: a preface that enables it, or leaves it at the protocol's
//! default (on) by not stating it, goes out with ENABLE_PUSH 0 (in its
//! place, or after the client's settings). A client that states no header
//! list (Firefox, curl) leaves the crate's own bound, 16 MiB a response
//! head: stating one would add a setting those clients never send.
//!
//! What cannot be said: SETTINGS identifiers other than 1 to 6, 8 and 9
//! (none of the clients pinproxy has seen sends one), the absence of
//! INITIAL_WINDOW_SIZE (4), which wreq-proto always sends (after the
//! client's own settings, at 2 MiB; every client seen sends it), and later
//! WINDOW_UPDATEs and DATA frame sizes, which follow the crate. Header
//! blocks are encoded as the client's family encodes them (Chromium,
//! Firefox, Go or nghttp2; which fields are indexed, which never are, which
//! strings are Huffman-coded, how a cookie is split), by a patched copy of
//! the crate (vendor/http2), told the family ([`hpack_policy`]) with the
//! pseudo-header order.

use std::future::Future;

use http2::frame::{
    Priorities, Priority as FramePriority, PseudoId, PseudoOrder, SettingId, SettingsOrder,
    StreamDependency, StreamId,
};
use http2::HpackPolicy;
use wreq_proto::http2::Http2Options;

use crate::fingerprint::h2_preface::{H2Fingerprint, Priority};

/// The default (and minimum) connection window of HTTP/2.
const DEFAULT_CONNECTION_WINDOW: u32 = 65_535;

/// The largest stream window (setting 4) a client's preface may make
/// pinproxy offer an origin: curl's 32 MiB, the largest of the clients seen
/// (Chrome offers 6 MiB). What an origin sends within the window is held
/// until the client reads it, so a client stating the protocol's 2 GiB
/// could have an origin fill pinproxy's memory; a larger value is offered
/// as this one (and that much of the preface is not the client's).
pub const MAX_STREAM_WINDOW: u32 = 32 << 20;
/// The largest connection window, likewise (curl's is 32 MiB, Chrome's
/// 15 MiB).
pub const MAX_CONNECTION_WINDOW: u32 = 64 << 20;
/// The largest header list (setting 6) an origin may send back (Chrome
/// states 256 KiB).
pub const MAX_HEADER_LIST: u32 = 1 << 20;
/// The largest HPACK table (setting 1) an origin may make pinproxy's decoder
/// keep: Chrome's and Firefox's 64 KiB. It lives as long as the connection,
/// and a client stating the protocol's 4 GiB would let an origin fill it.
pub const MAX_HEADER_TABLE: u32 = 64 << 10;
/// The frame sizes (setting 5) the protocol allows; the crate asserts them.
const FRAME_SIZES: std::ops::RangeInclusive<u32> = 16_384..=16_777_215;
/// The largest frame (setting 5) a client's preface may make pinproxy
/// offer an origin: a frame read is handed to the client's side whole, and
/// waits there whole while the client does not read (and the origin may
/// then show nothing more waiting, so the unread budget would not count
/// it). Firefox states 16 KiB, the protocol's default; no other client
/// seen states one.
pub const MAX_FRAME_SIZE: u32 = 64 << 10;

/// Runs wreq-proto's connection tasks on tokio.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioExec;

impl<F> wreq_proto::rt::Executor<F> for TokioExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(future);
    }
}

/// The highest stream id a recorded PRIORITY frame may name and still be
/// sent (see [`options`]).
const PRIORITY_STREAM_LIMIT: u32 = 1 << 16;

/// The bits of a stream id (the top bit of the 32 is reserved).
const STREAM_ID_MASK: u32 = 0x7fff_ffff;

/// The connection options that make `preface` go out as recorded.
pub fn options(preface: &H2Fingerprint) -> Http2Options {
    let mut builder = Http2Options::builder();
    let mut order = SettingsOrder::builder();
    for &(id, value) in &preface.settings {
        builder = match id {
            1 => builder.header_table_size(value.min(MAX_HEADER_TABLE)),
            // Never on: pushed streams would wait in pinproxy's memory,
            // unread and uncounted (the crate holds every reserved stream).
            2 => builder.enable_push(false),
            3 => builder.max_concurrent_streams(value),
            4 => builder.initial_window_size(value.min(MAX_STREAM_WINDOW)),
            // A front connection refuses a size outside the protocol's
            // range, but a recorded preface may be older or damaged.
            5 if FRAME_SIZES.contains(&value) => builder.max_frame_size(value.min(MAX_FRAME_SIZE)),
            5 => continue,
            6 => builder.max_header_list_size(value.min(MAX_HEADER_LIST)),
            8 => builder.enable_connect_protocol(value != 0),
            9 => builder.no_rfc7540_priorities(value != 0),
            // Not sayable (see the module docs); left out.
            _ => continue,
        };
        order = order.push(SettingId::from(id));
    }
    // A preface without ENABLE_PUSH leaves push on (the protocol's
    // default): it goes out off, after the client's own settings.
    if !preface.settings.iter().any(|&(id, _)| id == 2) {
        builder = builder.enable_push(false);
    }
    builder = builder
        .settings_order(order.build())
        .initial_connection_window_size(
            DEFAULT_CONNECTION_WINDOW
                .saturating_add(preface.window_update)
                .min(MAX_CONNECTION_WINDOW),
        );
    if let Some(priority) = &preface.headers_priority {
        builder = builder.headers_stream_dependency(dependency(priority));
    }
    // Idle streams past the bound are no browser's (Firefox names 3 to 13)
    // and would leave the connection few stream ids, or none: a request
    // would then start past the protocol's last id, which the crate
    // refuses with a panic.
    let sayable: Vec<&Priority> = preface
        .priorities
        .iter()
        .filter(|p| p.stream_id <= PRIORITY_STREAM_LIMIT && p.depends_on <= PRIORITY_STREAM_LIMIT)
        .collect();
    if !sayable.is_empty() {
        let mut priorities = Priorities::builder();
        for priority in &sayable {
            priorities = priorities.push(FramePriority::new(
                StreamId::from(priority.stream_id),
                dependency(priority),
            ));
        }
        builder = builder.priorities(priorities.build());
        // The client's requests start after the idle streams its PRIORITY
        // frames name (older Firefox: 3 to 13, its first request 15); the
        // crate refuses a request on a stream id at or below them.
        let last = sayable.iter().map(|p| p.stream_id).max();
        if let Some(first_free) = last.and_then(|id| id.checked_add(2)) {
            builder = builder.initial_stream_id(first_free | 1);
        }
    }
    let mut pseudo = PseudoOrder::builder().hpack_policy(hpack_policy(preface));
    for letter in &preface.pseudo_order {
        let id = match letter {
            'm' => PseudoId::Method,
            'a' => PseudoId::Authority,
            's' => PseudoId::Scheme,
            'p' => PseudoId::Path,
            _ => PseudoId::Protocol,
        };
        pseudo = pseudo.push(id);
    }
    builder.headers_pseudo_order(pseudo.build()).build()
}

/// The stream window wreq-proto states when a preface has none (see the
/// module docs).
const UNSTATED_STREAM_WINDOW: u32 = 2 << 20;
/// hyper's own stream and connection windows (rustls mode), which its
/// builder is given.
const HYPER_WINDOWS: Windows = Windows {
    stream: 2 << 20,
    connection: 5 << 20,
};

/// The windows a connection offers an origin: what the origin may send
/// on one stream, and on all of them, before pinproxy reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// The window of each stream (setting 4).
    pub stream: u32,
    /// The connection's window.
    pub connection: u32,
}

/// The windows a connection with `preface` (`None`: hyper's own) offers,
/// as [`options`] states them.
pub fn windows(preface: Option<&H2Fingerprint>) -> Windows {
    let Some(preface) = preface else {
        return HYPER_WINDOWS;
    };
    let stream = preface
        .settings
        .iter()
        .rev()
        .find(|&&(id, _)| id == 4)
        .map_or(UNSTATED_STREAM_WINDOW, |&(_, value)| {
            value.min(MAX_STREAM_WINDOW)
        });
    let connection = DEFAULT_CONNECTION_WINDOW
        .saturating_add(preface.window_update)
        .min(MAX_CONNECTION_WINDOW);
    Windows { stream, connection }
}

/// Chromium's connection WINDOW_UPDATE increment (15 MiB less the 65,535
/// every connection starts with), which the browsers built on Chromium
/// send too.
const CHROMIUM_WINDOW_UPDATE: u32 = 15_663_105;
/// Firefox's (12 MiB less 65,535).
const FIREFOX_WINDOW_UPDATE: u32 = 12_517_377;

/// Whose HPACK choices a connection presenting `preface` makes (see
/// vendor/http2/PINPROXY-PATCHES.md): Chromium's for Chromium's pseudo-header
/// order with its connection window, Firefox's for Firefox's order and
/// window, Go's for Go's order (`a,m,p,s`, no one else's), nghttp2's for
/// anything else (curl's library, and the nearest to what OkHttp, Node and
/// Python send). The order alone would mislead: Python's h2 sends
/// Chromium's order and OkHttp Firefox's, with encoders of their own.
pub fn hpack_policy(preface: &H2Fingerprint) -> HpackPolicy {
    match (preface.pseudo_order.as_slice(), preface.window_update) {
        (['m', 'a', 's', 'p'], CHROMIUM_WINDOW_UPDATE) => HpackPolicy::Chromium,
        (['m', 'p', 'a', 's'], FIREFOX_WINDOW_UPDATE) => HpackPolicy::Firefox,
        (['a', 'm', 'p', 's'], _) => HpackPolicy::Go,
        _ => HpackPolicy::Nghttp2,
    }
}

/// A priority's dependency as the crate takes it (the weight as its wire
/// byte, one less than the weight).
fn dependency(priority: &Priority) -> StreamDependency {
    let weight = u8::try_from(priority.weight.saturating_sub(1)).unwrap_or(u8::MAX);
    StreamDependency::new(
        // 31 bits, as on the wire: the crate refuses a larger id with a
        // panic, and a recorded preface may be damaged.
        StreamId::from(priority.depends_on & STREAM_ID_MASK),
        weight,
        priority.exclusive,
    )
}

/// The SETTINGS frame's payload of `preface` (what Chrome sends as its ALPS
/// settings for `h2`).
pub fn settings_payload(preface: &H2Fingerprint) -> Vec<u8> {
    let mut payload = Vec::with_capacity(preface.settings.len() * 6);
    for &(id, value) in &preface.settings {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header blocks of a connection are HPACK-encoded as the client
    /// family of its preface encodes them, and the choice travels with the
    /// pseudo-header order the connection is built with: Chromium's order
    /// and window (Chrome's built-in preface too) as Chromium, Firefox's as
    /// Firefox, Go's as Go, and the same browser orders with other windows
    /// (Python's h2, OkHttp), curl's and Safari's as nghttp2.
    #[test]
    fn a_prefaces_family_picks_its_hpack_choices() {
        let policy = |order: &str, window_update: u32| {
            let preface = H2Fingerprint {
                pseudo_order: order.split(',').filter_map(|l| l.chars().next()).collect(),
                window_update,
                ..H2Fingerprint::default()
            };
            let sent =
                HpackPolicy::for_pseudo_order(options(&preface).headers_pseudo_order.as_ref());
            assert_eq!(sent, hpack_policy(&preface), "{order} {window_update}");
            sent
        };
        assert_eq!(policy("m,a,s,p", 15_663_105), HpackPolicy::Chromium);
        assert_eq!(policy("m,p,a,s", 12_517_377), HpackPolicy::Firefox);
        assert_eq!(policy("m,a,s,p", 0), HpackPolicy::Nghttp2);
        assert_eq!(policy("m,p,a,s", 16_711_681), HpackPolicy::Nghttp2);
        assert_eq!(policy("m,p,s,a", 33_488_897), HpackPolicy::Nghttp2);
        assert_eq!(policy("m,s,p,a", 10_420_225), HpackPolicy::Nghttp2);
        assert_eq!(policy("a,m,p,s", 1_073_741_824), HpackPolicy::Go);
        let chrome = crate::fingerprint::profile::chrome_h2().unwrap();
        assert_eq!(
            HpackPolicy::for_pseudo_order(options(&chrome).headers_pseudo_order.as_ref()),
            HpackPolicy::Chromium
        );
    }

    /// The windows counted against the unread budget are those the
    /// options offer, with or without a stated stream window.
    #[test]
    fn the_windows_counted_are_those_offered() {
        for settings in [
            vec![],
            vec![(4, 6_291_456)],
            vec![(4, 0x7fff_ffff), (4, 65_535)],
        ] {
            for window_update in [0, 15_663_105, 0x7fff_0000] {
                let preface = H2Fingerprint {
                    settings: settings.clone(),
                    window_update,
                    ..H2Fingerprint::default()
                };
                let offered = options(&preface);
                assert_eq!(
                    windows(Some(&preface)),
                    Windows {
                        stream: offered.initial_window_size,
                        connection: offered.initial_conn_window_size,
                    },
                    "{settings:?} {window_update}"
                );
            }
        }
    }

    /// A preface stating the protocol's largest windows and header list is
    /// offered up to the ceilings; curl's and Chrome's go as they are.
    #[test]
    fn a_clients_windows_and_header_list_are_offered_up_to_a_ceiling() {
        let greedy = H2Fingerprint {
            settings: vec![(4, 0x7fff_ffff), (6, u32::MAX), (5, 16_777_215)],
            window_update: 0x7fff_0000,
            ..H2Fingerprint::default()
        };
        let offered = options(&greedy);
        assert_eq!(offered.initial_window_size, MAX_STREAM_WINDOW);
        assert_eq!(offered.initial_conn_window_size, MAX_CONNECTION_WINDOW);
        assert_eq!(offered.max_header_list_size, Some(MAX_HEADER_LIST));
        assert_eq!(offered.max_frame_size, Some(MAX_FRAME_SIZE));

        let curl = H2Fingerprint {
            settings: vec![(3, 100), (4, 33_554_432), (2, 0)],
            window_update: 33_488_897,
            ..H2Fingerprint::default()
        };
        let offered = options(&curl);
        assert_eq!(offered.initial_window_size, 33_554_432);
        assert_eq!(offered.initial_conn_window_size, 33_554_432);
        let chrome = H2Fingerprint {
            settings: vec![(1, 65_536), (2, 0), (4, 6_291_456), (6, 262_144)],
            window_update: 15_663_105,
            ..H2Fingerprint::default()
        };
        let offered = options(&chrome);
        assert_eq!(offered.initial_window_size, 6_291_456);
        assert_eq!(offered.initial_conn_window_size, 15_728_640);
        assert_eq!(offered.max_header_list_size, Some(262_144));
        assert_eq!(offered.header_table_size, Some(65_536));
        assert_eq!(offered.enable_push, Some(false));
    }

    /// A preface with PRIORITY frames on idle streams (older Firefox's
    /// groups) starts its requests after them, as the client did.
    #[test]
    fn requests_start_after_the_streams_priority_frames_name() {
        let priority = |stream_id| Priority {
            stream_id,
            exclusive: false,
            depends_on: 0,
            weight: 201,
        };
        let firefox = H2Fingerprint {
            priorities: (3..=13).step_by(2).map(priority).collect(),
            ..H2Fingerprint::default()
        };
        assert_eq!(options(&firefox).initial_stream_id, Some(15));
        assert_eq!(options(&H2Fingerprint::default()).initial_stream_id, None);
        // Idle streams no browser names (the protocol's last ids) are not
        // sent: a request there would start past the last stream id, which
        // the crate refuses with a panic at the connection's handshake.
        for stream_id in [0x7fff_ffff, 0x7fff_fffe, 0x7fff_fff1, (1 << 16) + 1] {
            let far = H2Fingerprint {
                priorities: vec![priority(3), priority(stream_id)],
                headers_priority: Some(Priority {
                    depends_on: 0xffff_ffff,
                    ..priority(1)
                }),
                ..H2Fingerprint::default()
            };
            let offered = options(&far);
            assert_eq!(offered.initial_stream_id, Some(5), "{stream_id:#x}");
            let mut builder = http2::client::Builder::new();
            builder.initial_stream_id(offered.initial_stream_id.unwrap_or(1));
        }
    }

    /// An HPACK table past the ceiling is offered as the ceiling; push is
    /// never enabled, whether the preface enables it or leaves it unstated;
    /// a frame size outside the protocol's range (a damaged record) is left
    /// out rather than asserted on.
    #[test]
    fn a_preface_never_opens_pinproxy_to_an_origins_table_or_pushes() {
        let greedy = H2Fingerprint {
            settings: vec![(1, u32::MAX), (2, 1), (5, 0)],
            ..H2Fingerprint::default()
        };
        let offered = options(&greedy);
        assert_eq!(offered.header_table_size, Some(MAX_HEADER_TABLE));
        assert_eq!(offered.enable_push, Some(false));
        assert_eq!(offered.max_frame_size, None);
        let silent = H2Fingerprint {
            settings: vec![(4, 65_535)],
            ..H2Fingerprint::default()
        };
        assert_eq!(options(&silent).enable_push, Some(false));
    }

    /// The next frame a server reads from `io`: (type, flags, payload).
    async fn read_frame(io: &mut tokio::io::DuplexStream) -> (u8, u8, Vec<u8>) {
        use tokio::io::AsyncReadExt as _;
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await.unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await.unwrap();
        (head[3], head[4], payload)
    }

    /// The frames a server read from `io` up to and including the first
    /// HEADERS, as (type, flags), and that HEADERS frame's payload; at most
    /// 64 KiB are read, and a client that sends no HEADERS fails the test
    /// after 5 s rather than hanging it.
    async fn frames_to_first_headers(io: &mut tokio::io::DuplexStream) -> (Vec<(u8, u8)>, Vec<u8>) {
        use tokio::io::AsyncReadExt as _;
        let read = async {
            let mut preface = [0u8; 24];
            io.read_exact(&mut preface).await.unwrap();
            assert_eq!(&preface, crate::fingerprint::h2_preface::PREFACE);
            let mut frames = Vec::new();
            for _ in 0..64 {
                let (kind, flags, payload) = read_frame(io).await;
                frames.push((kind, flags));
                if kind == 0x1 {
                    return (frames, payload);
                }
            }
            panic!("no HEADERS in the client's first 64 frames: {frames:?}");
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the client sent no HEADERS")
    }

    /// A stream that records the length of every write made to it.
    struct Writes<T> {
        inner: T,
        lengths: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Writes<T> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Writes<T> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if let std::task::Poll::Ready(Ok(n)) = written {
                self.lengths.lock().unwrap().push(n);
            }
            written
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// pinproxy's patch to the `http2` crate: an upstream connection sends
    /// its opening flight before it reads anything, as browsers, curl and
    /// Go send theirs: the preface, SETTINGS and the connection
    /// WINDOW_UPDATE in one write (so one TLS record), then the first
    /// request's HEADERS in the next. The server's SETTINGS (a 64 KiB HPACK
    /// table) are readable before the connection starts, and the connection
    /// runs with no request for as long as it will: it does not acknowledge
    /// them before that first request, whose header block starts without a
    /// table size update; it acknowledges them after.
    #[tokio::test(flavor = "current_thread")]
    async fn the_first_request_leaves_before_the_servers_settings_are_read() {
        use tokio::io::AsyncWriteExt as _;
        const SETTINGS: u8 = 0x4;
        const WINDOW_UPDATE: u8 = 0x8;
        const HEADERS: u8 = 0x1;
        const ACK: u8 = 0x1;
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let lengths = std::sync::Arc::default();
        let client = Writes {
            inner: client,
            lengths: std::sync::Arc::clone(&lengths),
        };
        // SETTINGS_HEADER_TABLE_SIZE = 65,536.
        server
            .write_all(&[0, 0, 6, SETTINGS, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0])
            .await
            .unwrap();
        // Chromium's choices: its table follows the server's (nghttp2's
        // would stay at 4,096 bytes, with no update to send).
        let chromium = http2::frame::PseudoOrder::builder()
            .hpack_policy(HpackPolicy::Chromium)
            .build();
        let (mut send, connection) = http2::client::Builder::new()
            .initial_connection_window_size(15_728_640)
            .headers_pseudo_order(chromium)
            .handshake::<_, bytes::Bytes>(client)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        // On this one thread, each yield polls the connection once: a
        // connection that reads before it has a request has read the
        // SETTINGS and written its acknowledgement by now.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        let request = http::Request::get("https://a.test/").body(()).unwrap();
        let (_response, _) = send.send_request(request, true).unwrap();
        let (frames, block) = frames_to_first_headers(&mut server).await;
        let flags_of_headers = frames.last().map_or(0, |&(_, flags)| flags);
        assert_eq!(
            frames,
            [
                (SETTINGS, 0),
                (WINDOW_UPDATE, 0),
                (HEADERS, flags_of_headers)
            ],
            "the opening flight, as (type, flags)"
        );
        // A dynamic table size update is 001xxxxx.
        assert_ne!(block.first().map(|b| b & 0xe0), Some(0x20), "{block:?}");
        // The preface, SETTINGS (the crate's default: empty) and
        // WINDOW_UPDATE in one write; HEADERS in the next.
        let written = lengths.lock().unwrap().clone();
        assert_eq!(
            written.get(..2),
            Some(&[24 + 9 + (9 + 4), 9 + block.len()][..])
        );
        // Then it reads, and acknowledges the SETTINGS.
        let mut head = [0u8; 9];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut head)
            .await
            .unwrap();
        assert_eq!((head[3], head[4]), (SETTINGS, ACK));
        connection.abort();
    }

    /// Reads frames from `io` (after the preface is read) until `count`
    /// HEADERS have come, returning each one's priority fields as
    /// (exclusive, the stream it depends on, weight 1 to 256); at most 64
    /// frames, and 5 s, rather than a hang.
    async fn headers_priorities(
        io: &mut tokio::io::DuplexStream,
        count: usize,
    ) -> Vec<Option<(bool, u32, u16)>> {
        let read = async {
            let mut found = Vec::new();
            for _ in 0..64 {
                let (kind, flags, payload) = read_frame(io).await;
                if kind != 0x1 {
                    continue;
                }
                found.push((flags & 0x20 != 0).then(|| {
                    let word = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    (
                        word >> 31 == 1,
                        word & 0x7fff_ffff,
                        u16::from(payload[4]) + 1,
                    )
                }));
                if found.len() == count {
                    return found;
                }
            }
            panic!("fewer than {count} HEADERS in 64 frames: {found:?}");
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the client sent too few HEADERS")
    }

    /// pinproxy's patch to the `http2` crate: the PRIORITY frames of a
    /// client's opening (older Firefox's groups on streams 3 to 13) go out
    /// once, before the first request's HEADERS, as the client sent them;
    /// the crate sent them again before every request's.
    #[tokio::test(flavor = "current_thread")]
    async fn the_openings_priority_frames_go_out_once() {
        const PRIORITY: u8 = 0x2;
        const HEADERS: u8 = 0x1;
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut groups = Priorities::builder();
        for stream in (3..=13).step_by(2) {
            groups = groups.push(FramePriority::new(
                StreamId::from(stream),
                StreamDependency::new(StreamId::zero(), 200, false),
            ));
        }
        let (send, connection) = http2::client::Builder::new()
            .priorities(groups.build())
            .initial_stream_id(15)
            .handshake::<_, bytes::Bytes>(client)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        let request = http::Request::get("https://a.test/").body(()).unwrap();
        let mut send = send.ready().await.unwrap();
        let _first = send.send_request(request.clone(), true).unwrap();
        let (before_first, _) = frames_to_first_headers(&mut server).await;
        let count =
            |frames: &[(u8, u8)]| frames.iter().filter(|(kind, _)| *kind == PRIORITY).count();
        assert_eq!(count(&before_first), 6, "{before_first:?}");
        let mut send = send.ready().await.unwrap();
        let _second = send.send_request(request, true).unwrap();
        let read = async {
            let mut between = Vec::new();
            for _ in 0..64 {
                let (kind, flags, _) = read_frame(&mut server).await;
                if kind == HEADERS {
                    return between;
                }
                between.push((kind, flags));
            }
            panic!("no second HEADERS: {between:?}");
        };
        let between = tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the second request left");
        assert_eq!(count(&between), 0, "{between:?}");
        connection.abort();
    }

    /// pinproxy's patch to the `http2` crate: on a connection that speaks
    /// for Chromium, a request that states its priority (its `priority`
    /// header's urgency, as Chromium sends it) gets Chromium's priority
    /// fields: exclusive, Chromium's weight for the urgency, and as parent
    /// the newest open stream of the same urgency, else of the nearest more
    /// urgent one, else none; a closed stream leaves that chain. A request
    /// without the header has RFC 9218's default urgency, 3, which Chromium
    /// leaves unstated.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_speaking_for_chromium_chains_its_streams_as_chromium() {
        use http2::frame::{PseudoId, PseudoOrder, StreamDependency, StreamId};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let order = PseudoOrder::builder()
            .hpack_policy(HpackPolicy::Chromium)
            .extend([
                PseudoId::Method,
                PseudoId::Authority,
                PseudoId::Scheme,
                PseudoId::Path,
            ])
            .build();
        let (mut send, connection) = http2::client::Builder::new()
            .headers_pseudo_order(order)
            .headers_stream_dependency(StreamDependency::new(StreamId::zero(), 255, true))
            .handshake::<_, bytes::Bytes>(client)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        let mut preface = [0u8; 24];
        server.read_exact(&mut preface).await.unwrap();
        fn request(
            send: &mut http2::client::SendRequest<bytes::Bytes>,
            urgency: Option<u8>,
        ) -> Option<http2::client::ResponseFuture> {
            let mut request = http::Request::get("https://a.test/");
            if let Some(u) = urgency {
                request = request.header("priority", format!("u={u}, i"));
            }
            let (response, _) = send.send_request(request.body(()).unwrap(), true).unwrap();
            Some(response)
        }
        // Streams 1 (u=0), 3 (u=1), 5 (u=0), 7 (u=2), 9 (no header: u=3).
        let mut sent: Vec<_> = [Some(0), Some(1), Some(0), Some(2), None]
            .into_iter()
            .map(|urgency| request(&mut send, urgency))
            .collect();
        assert_eq!(
            headers_priorities(&mut server, 5).await,
            [
                Some((true, 0, 256)),
                Some((true, 1, 220)),
                Some((true, 1, 256)),
                Some((true, 3, 183)),
                Some((true, 7, 147)),
            ]
        );
        // Streams 1 and 5 are answered (`:status: 200`, static entry 8) and
        // so closed: a new u=0 request (11) depends on no stream.
        for stream in [1u8, 5] {
            server
                .write_all(&[0, 0, 1, 0x1, 0x5, 0, 0, 0, stream, 0x88])
                .await
                .unwrap();
        }
        for index in [0, 2] {
            sent[index].take().unwrap().await.unwrap();
        }
        let _last = request(&mut send, Some(0));
        assert_eq!(
            headers_priorities(&mut server, 1).await,
            [Some((true, 0, 256))]
        );
        connection.abort();
    }

    /// A connection whose first request does not come reads after half a
    /// second anyway (a request dropped before it was queued must not leave
    /// a connection blind to the server's SETTINGS and GOAWAY), and
    /// acknowledges the server's SETTINGS then; not before.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_connection_whose_first_request_does_not_come_reads_after_half_a_second() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (client, mut server) = tokio::io::duplex(1 << 16);
        server
            .write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let (_send, connection) = http2::client::handshake(client).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut preface = [0u8; 24];
        server.read_exact(&mut preface).await.unwrap();
        // Its SETTINGS, then (the clock moving on only when every task
        // waits) the acknowledgement of the server's.
        let read = async {
            let mut frames = Vec::new();
            for _ in 0..2 {
                let (kind, flags, _) = read_frame(&mut server).await;
                frames.push((kind, flags));
            }
            frames
        };
        let frames = tokio::time::timeout(std::time::Duration::from_secs(60), read)
            .await
            .expect("the server's SETTINGS were never acknowledged");
        assert_eq!(frames, [(0x4, 0), (0x4, 0x1)]);
        let waited = started.elapsed();
        assert!(
            (500..1000).contains(&waited.as_millis()),
            "acknowledged after {waited:?}"
        );
        connection.abort();
    }

    /// A connection whose every handle is dropped before any request is
    /// not held waiting for one: it ends.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_without_a_request_or_a_handle_ends() {
        let (client, _server) = tokio::io::duplex(1 << 16);
        let (send, connection) = http2::client::handshake(client).await.unwrap();
        let connection = tokio::spawn(connection);
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        drop(send);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    /// An origin that answers with `frame` as DATA frames, as many as it
    /// may (at most `count`, each within a second), to a client that reads
    /// none of them; answers how many it sent and why the client's
    /// connection ended, if it did (within two seconds).
    async fn flood(frame: &'static [u8], count: usize) -> (usize, Option<http2::Reason>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let origin = tokio::spawn(async move {
            let mut conn = ::h2::server::handshake(server).await.unwrap();
            let (_request, mut respond) = conn.accept().await.unwrap().unwrap();
            // The connection goes on only while it is polled.
            let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut sent = 0;
            while sent < count {
                body.reserve_capacity(frame.len().max(1));
                let room = std::future::poll_fn(|cx| body.poll_capacity(cx));
                match tokio::time::timeout(std::time::Duration::from_secs(1), room).await {
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
                if body
                    .send_data(bytes::Bytes::from_static(frame), false)
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            // What is queued goes out while the client reads (or ends it).
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), driver).await;
            sent
        });
        let (mut send, connection) = http2::client::handshake(client).await.unwrap();
        let connection = tokio::spawn(connection);
        let request = http::Request::get("https://a.test/").body(()).unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        // Held unread (the connection may end before it is even read).
        let _unread = response.await;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(2), connection).await;
        let sent = origin.await.unwrap();
        let reason = match ended {
            Ok(Ok(Err(e))) => e.reason(),
            _ => None,
        };
        (sent, reason)
    }

    /// pinproxy's patch to the `http2` crate, after h2 0.4.20: an origin
    /// sending 1-byte DATA frames to an answer nobody reads is cut off
    /// once their framing would cost more than a hundred frames' worth
    /// (the crate held one queue entry per byte of the window), and one
    /// sending empty frames after a hundred (they were queued, costing no
    /// window at all).
    #[tokio::test(flavor = "current_thread")]
    async fn an_origin_flooding_small_or_empty_data_frames_is_cut_off() {
        let calm = Some(http2::Reason::ENHANCE_YOUR_CALM);
        let (_, reason) = flood(b"x", 60_000).await;
        assert_eq!(reason, calm);
        // h2's server sends no empty frame: they are written by hand.
        use tokio::io::AsyncWriteExt as _;
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let (mut send, connection) = http2::client::handshake(client).await.unwrap();
        let connection = tokio::spawn(connection);
        let request = http::Request::get("https://a.test/").body(()).unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        frames_to_first_headers(&mut server).await;
        // SETTINGS, then HEADERS `:status: 200` (static entry 8) on stream
        // 1, then 200 empty DATA frames.
        let mut frames = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
        frames.extend([0, 0, 1, 0x1, 0x4, 0, 0, 0, 1, 0x88]);
        for _ in 0..200 {
            frames.extend([0, 0, 0, 0x0, 0, 0, 0, 0, 1]);
        }
        server.write_all(&frames).await.unwrap();
        let _unread = response.await;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;
        assert!(
            matches!(&ended, Ok(Ok(Err(e))) if e.reason() == calm),
            "{ended:?}"
        );
        // Frames of a fair size fill the window as before.
        let (sent, reason) = flood(&[b'x'; 1024], 60_000).await;
        assert_eq!((sent, reason), (64, None));
    }
}
