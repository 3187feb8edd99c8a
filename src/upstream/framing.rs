//! HTTP/1 message framing that cannot be read two ways: a streaming scanner
//! of message heads and bodies, and the response-side guard that refuses an
//! origin's ambiguous response before hyper reads it.
//!
//! Request smuggling and response splitting live in the gap between two
//! parsers that frame the same bytes differently. hyper's HTTP/1 parser
//! (httparse) refuses some ambiguous messages and quietly normalises
//! others: it accepts `Content-Length` together with `Transfer-Encoding`
//! (dropping the length and re-framing as chunked), a `Transfer-Encoding`
//! whose last coding is `chunked` (`gzip, chunked`), repeated
//! `Transfer-Encoding` lines, bare-LF line endings, and, in responses, a
//! `Content-Length` list of equal values. [`Scanner`] watches the bytes of a
//! connection as they pass, with a few bytes of state and no buffer, and
//! says no where hyper would guess:
//!
//! - `Content-Length` and `Transfer-Encoding` in one message (RFC 9112 §6.1);
//! - a `Transfer-Encoding` that is not exactly one `chunked` (case-insensitive;
//!   one header line, one coding), or any in HTTP/1.0;
//! - a `Content-Length` that is not one decimal number (lists, signs, other
//!   characters) or that repeats with another value (equal repeats are one
//!   length, RFC 9110 §8.6);
//! - obs-fold (a header line starting with SP or HTAB), whitespace between a
//!   field name and its colon, a line without a colon;
//! - a bare LF or bare CR anywhere in the head (and in chunk framing);
//! - NUL or another control character (other than HTAB) in the head.
//!
//! To find every head on a keep-alive connection, the scanner follows the
//! framing it has just validated: `Content-Length` bytes, the chunked
//! coding (sizes, extensions, trailers, the same way hyper decodes it), or,
//! for responses, no body (HEAD, 1xx, 204, 304), a switch of protocols (101)
//! or the rest of the connection. Because a head is judged valid only when
//! its framing is unambiguous, the scanner and hyper agree on where the next
//! message starts; when they could not (a malformed chunk), the scanner
//! stops trusting the connection and says so.
//!
//! Heads are bounded by a byte limit (the caller's), so a head the scanner
//! has not finished judging is never larger than the one hyper would accept.
//!
//! [`ResponseGuard`] applies the scanner to an origin connection: an
//! ambiguous response is a read error before hyper sees a byte of it, so
//! the request fails with `502 origin-failed` and nothing of that response
//! reaches the client. The request side is `front::framing`.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Which messages a scanner reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Requests, as a server reads them.
    Request,
    /// Responses, as a client reads them.
    Response,
}

/// Why a message's framing is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error(
        "the message has both Content-Length and Transfer-Encoding (RFC 9112 section 6.1: a likely smuggling attempt)"
    )]
    LengthAndChunked,
    /// A `Transfer-Encoding` other than exactly `chunked`.
    #[error("Transfer-Encoding must be exactly one \"chunked\"")]
    TransferEncoding,
    /// `Transfer-Encoding` in an HTTP/1.0 message.
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    TransferEncodingHttp10,
    /// A `Content-Length` that is not a single decimal number.
    #[error("Content-Length is not a single decimal number")]
    ContentLength,
    /// `Content-Length` repeated with another value.
    #[error("Content-Length repeated with different values")]
    ContentLengths,
    /// A CONNECT with content.
    #[error("a CONNECT request with content")]
    ConnectBody,
    /// A header line starting with whitespace.
    #[error("obsolete line folding (a header line starting with a space or tab)")]
    ObsFold,
    /// Whitespace between a field name and the colon.
    #[error("whitespace between a header name and its colon")]
    SpaceBeforeColon,
    /// A header line without a colon, or an empty name.
    #[error("a header line without a name and colon")]
    NoColon,
    /// LF not preceded by CR.
    #[error("a bare LF (line feed without carriage return)")]
    BareLf,
    /// CR not followed by LF.
    #[error("a bare CR (carriage return without line feed)")]
    BareCr,
    /// NUL in the head.
    #[error("a NUL byte in the message head")]
    Nul,
    /// Another control character in the head.
    #[error("a control character in the message head")]
    Control,
    /// The head is longer than the limit.
    #[error("the message head is longer than the limit")]
    HeadTooLarge,
    /// A request with more than one `Host` field.
    #[error(
        "more than one Host header (RFC 9112 section 3.2: servers differ on which one counts)"
    )]
    HostTwice,
    /// The chunked coding is malformed.
    #[error("malformed chunked framing")]
    Chunk,
    /// An earlier message on the connection could not be framed; nothing
    /// after it can be trusted.
    #[error("an earlier message on this connection could not be framed")]
    Unverified,
}

/// Where the scanner is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages (empty lines allowed before a request line).
    Between,
    /// Saw CR between messages; LF must follow.
    BetweenCr,
    /// Between messages after a second empty line (the first is passed
    /// as between messages: see `Scanner::blank_seen`): allowed before a
    /// request line, but no longer idle. They count towards the next
    /// head's size and its deadline, so that a client cannot hold its
    /// connection by sending one now and then.
    BetweenBlank,
    /// In the start line.
    StartLine,
    /// At the start of a header line.
    LineStart,
    /// In a header name.
    Name,
    /// In a header value.
    Value,
    /// Saw CR ending a line (`end_of_head`: the empty line); LF must follow.
    LineCr { end_of_head: bool },
    /// In a body of known length: bytes left.
    Fixed(u64),
    /// Before a chunk size (its first hex digit).
    ChunkStart,
    /// In a chunk size.
    ChunkSize(u64),
    /// Whitespace after a chunk size.
    ChunkLws(u64),
    /// In a chunk extension.
    ChunkExt(u64),
    /// CR after a chunk-size line; LF must follow.
    ChunkSizeLf(u64),
    /// In chunk data: bytes left.
    ChunkData(u64),
    /// After chunk data: CR must follow.
    ChunkDataCr,
    /// After chunk data and CR: LF must follow.
    ChunkDataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// In a trailer line.
    Trailer,
    /// CR ending a trailer line; LF must follow.
    TrailerLf,
    /// CR of the final empty line; LF must follow.
    EndLf,
    /// The rest of the connection is not HTTP/1 framing (a body read to
    /// the close, a switched protocol): not scanned.
    Opaque,
    /// A refused message: nothing after it is scanned.
    Refused,
}

/// Which header a name turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Other,
    ContentLength,
    TransferEncoding,
}

/// Whether header `name` is `Host` (compared ignoring case).
#[inline(always)]
fn is_host(name: &[u8]) -> bool {
    name.len() == 4 && name.eq_ignore_ascii_case(b"host")
}

impl Field {
    /// Which header `name` is (compared ignoring case).
    #[inline(always)]
    fn of(name: &[u8]) -> Field {
        // The length first: most names have neither length, and this runs
        // for every header line.
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => Field::ContentLength,
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => Field::TransferEncoding,
            _ => Field::Other,
        }
    }
}

/// A small fixed buffer: the first bytes of a token or value, and whether
/// there were more.
#[derive(Debug, Clone, Copy)]
struct Small<const N: usize> {
    bytes: [u8; N],
    len: u8,
    overflow: bool,
}

impl<const N: usize> Default for Small<N> {
    fn default() -> Self {
        Small {
            bytes: [0; N],
            len: 0,
            overflow: false,
        }
    }
}

impl<const N: usize> Small<N> {
    fn push(&mut self, byte: u8) {
        let len = usize::from(self.len);
        if len < N {
            self.bytes[len] = byte;
            self.len += 1;
        } else {
            self.overflow = true;
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        let len = usize::from(self.len);
        let room = N - len;
        let take = bytes.len().min(room);
        self.bytes[len..len + take].copy_from_slice(&bytes[..take]);
        // `len + take <= N`, and every `N` here is below 256.
        self.len = (len + take) as u8;
        if take < bytes.len() {
            self.overflow = true;
        }
    }

    fn get(&self) -> Option<&[u8]> {
        (!self.overflow).then(|| &self.bytes[..usize::from(self.len)])
    }

    fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }
}

/// What the scanner learns of one head as it passes.
#[derive(Debug, Clone, Default)]
struct Head {
    /// Bytes of the head so far.
    len: usize,
    /// Which space-separated token of the start line we are in: 0, 1,
    /// or 2 for the third and any later one (nothing tells those apart).
    token: u8,
    /// The start line's first token (method or version).
    first: Small<16>,
    /// Its second token (a response's status code).
    second: Small<3>,
    /// Its current (eventually last) token (a request's version).
    last: Small<16>,
    /// The current header name (long enough for the names that matter).
    name: Small<17>,
    /// The current header value, if it matters.
    value: Small<40>,
    /// Which header the current line is.
    field: Option<Field>,
    content_length: Option<u64>,
    transfer_encodings: u8,
    /// `Host` fields so far (a request's).
    hosts: u8,
}

/// What a head said about the message that follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `n` bytes of content follow (0: none).
    Length(u64),
    /// Chunked content follows.
    Chunked,
    /// The rest of the connection belongs to this message (a response
    /// without length, or a switch of protocols).
    Opaque,
    /// A 1xx interim response: another head follows.
    Interim,
}

/// A head the scanner finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Whether it is a CONNECT request.
    pub connect: bool,
    /// How the message is framed.
    pub framing: Framing,
}

/// The streaming framing checker of one connection's incoming direction.
#[derive(Debug, Clone)]
pub struct Scanner {
    side: Side,
    state: State,
    head: Head,
    limit: usize,
    /// Response side: the response answers a HEAD request.
    answers_head: bool,
    /// An empty line came since the last start line: the one a server
    /// should ignore (old clients send CRLF after a POST body) is passed
    /// between messages; any after it begins a head.
    blank_seen: bool,
}

impl Scanner {
    /// A scanner of `side` messages whose heads may be at most `limit` bytes.
    pub fn new(side: Side, limit: usize) -> Scanner {
        Scanner {
            side,
            state: State::Between,
            head: Head::default(),
            limit,
            answers_head: false,
            blank_seen: false,
        }
    }

    /// Response side: whether the next response answers a HEAD request
    /// (and so has no content, whatever its head says).
    pub fn answers_head(&mut self, head: bool) {
        self.answers_head = head;
    }

    /// Whether a head has begun and is not finished.
    pub fn in_head(&self) -> bool {
        matches!(
            self.state,
            State::BetweenCr
                | State::BetweenBlank
                | State::StartLine
                | State::LineStart
                | State::Name
                | State::Value
                | State::LineCr { .. }
        )
    }

    /// Whether every byte scanned so far belongs to a finished message (or to
    /// the empty lines allowed between them).
    pub fn between_messages(&self) -> bool {
        self.state == State::Between
    }

    /// Whether the scanner no longer looks at bytes (an opaque remainder,
    /// or after a refusal).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Opaque | State::Refused)
    }

    /// Stops scanning: the connection now carries something other than
    /// HTTP/1 messages (a tunnel, a WebSocket).
    pub fn stop(&mut self) {
        if self.state != State::Refused {
            self.state = State::Opaque;
        }
    }

    /// Scans `bytes`, calling `on_head` for every head that ends in them.
    /// The first refusal ends scanning for good.
    pub fn scan(
        &mut self,
        mut bytes: &[u8],
        mut on_head: impl FnMut(Finished),
    ) -> Result<(), FramingError> {
        while !bytes.is_empty() {
            match self.state {
                State::Opaque => return Ok(()),
                State::Refused => return Err(FramingError::Unverified),
                // Bulk states: skip what the body covers.
                State::Fixed(left) | State::ChunkData(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    bytes = &bytes[take..];
                    let left = left - take as u64;
                    self.state = match (self.state, left) {
                        (State::Fixed(_), 0) => State::Between,
                        (State::Fixed(_), n) => State::Fixed(n),
                        (_, 0) => State::ChunkDataCr,
                        (_, n) => State::ChunkData(n),
                    };
                    continue;
                }
                _ => {}
            }
            // Bulk: a whole line, when this read holds all of it and it is
            // plain: the start line, a header line (most of a head's
            // lines), or the empty line that ends the head.
            let whole = match self.state {
                State::Between => self.whole_start_line(bytes),
                State::LineStart => match bytes {
                    [b'\r', b'\n', ..] => self.end_of_head(&mut on_head),
                    _ => self.whole_line(bytes),
                },
                _ => Ok(0),
            };
            match whole {
                Ok(0) => {}
                Ok(taken) => {
                    bytes = &bytes[taken..];
                    continue;
                }
                Err(error) => {
                    self.state = State::Refused;
                    return Err(error);
                }
            }
            // Bulk: runs of bytes `step` would take one by one without
            // changing state or refusing any: the value of a field that does
            // not frame (cookies, user agents: most of a head), a header
            // name up to its colon (kept as sent, compared ignoring case at
            // the colon), a start-line token up to a space or the line's end.
            let run = match self.state {
                State::Value if self.head.field == Some(Field::Other) => plain_value_run(bytes),
                State::Name => run_of(bytes, &NAME_BYTES),
                State::StartLine => run_of(bytes, &TOKEN_BYTES),
                _ => 0,
            };
            if run > 0 {
                self.grow_head(run)?;
                let (taken, rest) = bytes.split_at(run);
                match self.state {
                    State::Name => self.head.name.extend(taken),
                    State::StartLine => self.start_line_token(taken),
                    _ => {}
                }
                bytes = rest;
                continue;
            }
            let byte = bytes[0];
            bytes = &bytes[1..];
            if let Err(error) = self.step(byte, &mut on_head) {
                self.state = State::Refused;
                return Err(error);
            }
        }
        Ok(())
    }

    fn step(&mut self, byte: u8, on_head: &mut impl FnMut(Finished)) -> Result<(), FramingError> {
        if self.in_head() || self.state == State::Between {
            self.head.len += 1;
            if self.head.len > self.limit {
                return Err(FramingError::HeadTooLarge);
            }
            check_head_byte(byte)?;
        }
        self.state = match self.state {
            State::Between | State::BetweenBlank => match byte {
                b'\r' => {
                    // The first byte after a message: what its head counted
                    // is the last message's.
                    if self.state == State::Between {
                        self.head.len = 1;
                    }
                    State::BetweenCr
                }
                b'\n' => return Err(FramingError::BareLf),
                b' ' | b'\t' => return Err(FramingError::ObsFold),
                _ => {
                    // Empty lines before it count towards this head.
                    self.blank_seen = false;
                    let len = if self.state == State::BetweenBlank {
                        self.head.len
                    } else {
                        1
                    };
                    self.head = Head {
                        len,
                        ..Head::default()
                    };
                    self.start_line(byte);
                    State::StartLine
                }
            },
            State::BetweenCr => match byte {
                b'\n' if !self.blank_seen => {
                    self.blank_seen = true;
                    self.head.len = 0;
                    State::Between
                }
                b'\n' => State::BetweenBlank,
                _ => return Err(FramingError::BareCr),
            },
            State::StartLine => match byte {
                b'\r' => State::LineCr { end_of_head: false },
                b'\n' => return Err(FramingError::BareLf),
                _ => {
                    self.start_line(byte);
                    State::StartLine
                }
            },
            State::LineStart => match byte {
                b'\r' => State::LineCr { end_of_head: true },
                b'\n' => return Err(FramingError::BareLf),
                b' ' | b'\t' => return Err(FramingError::ObsFold),
                b':' => return Err(FramingError::NoColon),
                _ => {
                    self.head.name.clear();
                    self.head.name.push(byte);
                    State::Name
                }
            },
            State::Name => match byte {
                b':' => {
                    if self.head.name.get().is_some_and(is_host) {
                        self.count_host()?;
                    }
                    // A name longer than the scanner keeps is neither.
                    let field = self.head.name.get().map_or(Field::Other, Field::of);
                    self.head.field = Some(field);
                    self.head.value.clear();
                    State::Value
                }
                b' ' | b'\t' => return Err(FramingError::SpaceBeforeColon),
                b'\r' | b'\n' => return Err(FramingError::NoColon),
                _ => {
                    self.head.name.push(byte);
                    State::Name
                }
            },
            State::Value => match byte {
                b'\r' => {
                    self.end_field()?;
                    State::LineCr { end_of_head: false }
                }
                b'\n' => return Err(FramingError::BareLf),
                _ => {
                    if self.head.field != Some(Field::Other) {
                        self.head.value.push(byte);
                    }
                    State::Value
                }
            },
            State::LineCr { end_of_head } => match byte {
                b'\n' if end_of_head => self.body_after_head(on_head)?,
                b'\n' => State::LineStart,
                _ => return Err(FramingError::BareCr),
            },
            State::ChunkStart => match hex(byte) {
                Some(digit) => State::ChunkSize(u64::from(digit)),
                None => return Err(FramingError::Chunk),
            },
            State::ChunkSize(size) => match (byte, hex(byte)) {
                (_, Some(digit)) => State::ChunkSize(
                    size.checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(digit)))
                        .ok_or(FramingError::Chunk)?,
                ),
                (b' ' | b'\t', _) => State::ChunkLws(size),
                (b';', _) => State::ChunkExt(size),
                (b'\r', _) => State::ChunkSizeLf(size),
                _ => return Err(FramingError::Chunk),
            },
            State::ChunkLws(size) => match byte {
                b' ' | b'\t' => State::ChunkLws(size),
                b';' => State::ChunkExt(size),
                b'\r' => State::ChunkSizeLf(size),
                _ => return Err(FramingError::Chunk),
            },
            State::ChunkExt(size) => match byte {
                b'\r' => State::ChunkSizeLf(size),
                b'\n' => return Err(FramingError::BareLf),
                0 => return Err(FramingError::Nul),
                _ => State::ChunkExt(size),
            },
            State::ChunkSizeLf(size) => match (byte, size) {
                (b'\n', 0) => {
                    self.head.len = 0;
                    State::TrailerStart
                }
                (b'\n', n) => State::ChunkData(n),
                _ => return Err(FramingError::BareCr),
            },
            State::ChunkDataCr => match byte {
                b'\r' => State::ChunkDataLf,
                _ => return Err(FramingError::Chunk),
            },
            State::ChunkDataLf => match byte {
                b'\n' => State::ChunkStart,
                _ => return Err(FramingError::BareCr),
            },
            State::TrailerStart | State::Trailer | State::TrailerLf | State::EndLf => {
                self.head.len += 1;
                if self.head.len > self.limit {
                    return Err(FramingError::HeadTooLarge);
                }
                self.trailer(byte)?
            }
            // Handled in `scan`.
            State::Fixed(_) | State::ChunkData(_) | State::Opaque | State::Refused => self.state,
        };
        Ok(())
    }

    /// The trailer section of a chunked body (its fields are not framing;
    /// only their line structure matters).
    fn trailer(&mut self, byte: u8) -> Result<State, FramingError> {
        Ok(match (self.state, byte) {
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart, b' ' | b'\t') => return Err(FramingError::ObsFold),
            (State::Trailer, b'\r') => State::TrailerLf,
            (State::TrailerStart | State::Trailer, b'\n') => return Err(FramingError::BareLf),
            (State::TrailerStart | State::Trailer, byte) => {
                check_head_byte(byte)?;
                State::Trailer
            }
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::EndLf, b'\n') => {
                self.head.len = 0;
                State::Between
            }
            _ => return Err(FramingError::BareCr),
        })
    }

    /// At the start of a header line: takes the whole line (`name: value`
    /// and its CRLF) at once when `bytes` hold all of it and every byte of
    /// it is one `step` would take without refusing. Returns how many bytes
    /// it took (0: none, the line is left to `step`), or what `step` would
    /// have refused: the same error at the same byte.
    // Inlined into `scan`, like the runs it calls: a call per header line
    // cost about a sixth of the line.
    #[inline(always)]
    fn whole_line(&mut self, bytes: &[u8]) -> Result<usize, FramingError> {
        let name_len = name_run(bytes);
        if name_len == 0 || bytes.get(name_len) != Some(&b':') {
            return Ok(0);
        }
        let value_start = name_len + 1;
        let rest = &bytes[value_start..];
        let value_len = plain_value_run(rest);
        if rest.get(value_len..value_len + 2) != Some(&b"\r\n"[..]) {
            return Ok(0);
        }
        let line_len = value_start + value_len + 2;
        if is_host(&bytes[..name_len]) {
            // As `step` takes it: the bytes up to the colon count first.
            self.grow_head(value_start)?;
            self.count_host()?;
            self.grow_head(line_len - value_start)?;
            return Ok(line_len);
        }
        let field = Field::of(&bytes[..name_len]);
        if field == Field::Other {
            // Nothing to judge at the CR: only the limit, over the line.
            self.grow_head(line_len)?;
            return Ok(line_len);
        }
        // Up to the CR, which ends the field: `step` counts and checks each
        // byte before it judges the field at the CR, and the LF after it.
        self.grow_head(line_len - 1)?;
        let head = &mut self.head;
        head.field = Some(field);
        head.value.clear();
        head.value.extend(&rest[..value_len]);
        self.end_field()?;
        self.grow_head(1)?;
        Ok(line_len)
    }

    /// Between messages: takes a whole start line and its CRLF at once when
    /// `bytes` hold all of it and it is plain (what `step` would take
    /// without refusing, other than the limit). Returns how many bytes it
    /// took (0: none, left to `step`), or the refusal `step` would make.
    /// Only the tokens the side judges at the head's end are kept: the
    /// method and version of a request, the version and status of a
    /// response.
    #[inline(always)]
    fn whole_start_line(&mut self, bytes: &[u8]) -> Result<usize, FramingError> {
        let line_len = plain_value_run(bytes);
        if line_len == 0
            || matches!(bytes[0], b' ' | b'\t')
            || bytes.get(line_len..line_len + 2) != Some(&b"\r\n"[..])
        {
            return Ok(0);
        }
        // Between messages the head counts nothing yet (see `finish_head`
        // and the empty lines' LF).
        self.head = Head::default();
        self.blank_seen = false;
        self.grow_head(line_len + 2)?;
        let line = &bytes[..line_len];
        let head = &mut self.head;
        let first_space = line.iter().position(|&b| b == b' ');
        let first_end = first_space.unwrap_or(line_len);
        head.first.extend(&line[..first_end]);
        if let Some(space) = first_space {
            let after = &line[space + 1..];
            match self.side {
                Side::Request => {
                    // The version: after the last space.
                    let last_space = after.iter().rposition(|&b| b == b' ');
                    head.token = if last_space.is_some() { 2 } else { 1 };
                    head.last.extend(&after[last_space.map_or(0, |i| i + 1)..]);
                }
                Side::Response => {
                    let second_space = after.iter().position(|&b| b == b' ');
                    head.token = if second_space.is_some() { 2 } else { 1 };
                    head.second
                        .extend(&after[..second_space.unwrap_or(after.len())]);
                }
            }
        } else {
            head.last.extend(line);
        }
        self.state = State::LineStart;
        Ok(line_len + 2)
    }

    /// At the start of a line that is the head's last, `\r\n` in `bytes`:
    /// ends the head as `step` would, byte by byte.
    fn end_of_head(&mut self, on_head: &mut impl FnMut(Finished)) -> Result<usize, FramingError> {
        self.grow_head(2)?;
        self.state = self.body_after_head(on_head)?;
        Ok(2)
    }

    /// The head just ended: judges it, tells `on_head`, and returns where
    /// the scanner goes next.
    fn body_after_head(
        &mut self,
        on_head: &mut impl FnMut(Finished),
    ) -> Result<State, FramingError> {
        let finished = self.finish_head()?;
        on_head(finished);
        Ok(match finished.framing {
            Framing::Length(0) | Framing::Interim => State::Between,
            Framing::Length(n) => State::Fixed(n),
            Framing::Chunked => State::ChunkStart,
            Framing::Opaque => State::Opaque,
        })
    }

    /// Counts `run` more bytes of the head, refusing a head over the limit.
    fn grow_head(&mut self, run: usize) -> Result<(), FramingError> {
        if self.head.len + run > self.limit {
            self.state = State::Refused;
            return Err(FramingError::HeadTooLarge);
        }
        self.head.len += run;
        Ok(())
    }

    /// Records bytes of one start-line token (no spaces among them).
    fn start_line_token(&mut self, bytes: &[u8]) {
        let head = &mut self.head;
        match head.token {
            0 => head.first.extend(bytes),
            1 => head.second.extend(bytes),
            _ => {}
        }
        head.last.extend(bytes);
    }

    /// Records a start-line byte in its token.
    fn start_line(&mut self, byte: u8) {
        let head = &mut self.head;
        if byte == b' ' {
            head.token = (head.token + 1).min(2);
            head.last.clear();
            return;
        }
        match head.token {
            0 => head.first.push(byte),
            1 => head.second.push(byte),
            _ => {}
        }
        head.last.push(byte);
    }

    /// Counts a `Host` field: a request's second is refused (RFC 9112
    /// §3.2: a server answers 400). Origins differ on which of two counts,
    /// and an HTTP/2 origin would get the first alone.
    fn count_host(&mut self) -> Result<(), FramingError> {
        if self.side == Side::Request {
            self.head.hosts = self.head.hosts.saturating_add(1);
            if self.head.hosts > 1 {
                return Err(FramingError::HostTwice);
            }
        }
        Ok(())
    }

    /// A header line ended: checks the framing fields.
    fn end_field(&mut self) -> Result<(), FramingError> {
        let head = &mut self.head;
        match head.field.take() {
            Some(Field::ContentLength) => {
                let value = head.value.get().ok_or(FramingError::ContentLength)?;
                let length = parse_length(trim(value)).ok_or(FramingError::ContentLength)?;
                match head.content_length {
                    Some(earlier) if earlier != length => return Err(FramingError::ContentLengths),
                    _ => head.content_length = Some(length),
                }
            }
            Some(Field::TransferEncoding) => {
                head.transfer_encodings = head.transfer_encodings.saturating_add(1);
                let chunked = head
                    .value
                    .get()
                    .is_some_and(|v| trim(v).eq_ignore_ascii_case(b"chunked"));
                if !chunked || head.transfer_encodings > 1 {
                    return Err(FramingError::TransferEncoding);
                }
            }
            Some(Field::Other) | None => {}
        }
        Ok(())
    }

    /// The head is complete: decides its framing, or refuses it.
    fn finish_head(&mut self) -> Result<Finished, FramingError> {
        let head = &self.head;
        let chunked = head.transfer_encodings > 0;
        if chunked && head.content_length.is_some() {
            return Err(FramingError::LengthAndChunked);
        }
        let version = match self.side {
            Side::Request => head.last.get(),
            Side::Response => head.first.get(),
        };
        if chunked && version == Some(b"HTTP/1.0") {
            return Err(FramingError::TransferEncodingHttp10);
        }
        let length = head.content_length;
        let finished = match self.side {
            Side::Request => {
                let connect = head.first.get() == Some(b"CONNECT") && head.token > 0;
                if connect && (chunked || length.is_some_and(|n| n > 0)) {
                    return Err(FramingError::ConnectBody);
                }
                let framing = match (chunked, length) {
                    (true, _) => Framing::Chunked,
                    (false, Some(n)) => Framing::Length(n),
                    (false, None) => Framing::Length(0),
                };
                Finished { connect, framing }
            }
            Side::Response => {
                let status = head.second.get().unwrap_or_default();
                let framing = match status {
                    b"101" => Framing::Opaque,
                    [b'1', _, _] => Framing::Interim,
                    b"204" | b"304" => Framing::Length(0),
                    _ if self.answers_head => Framing::Length(0),
                    _ if chunked => Framing::Chunked,
                    _ => length.map_or(Framing::Opaque, Framing::Length),
                };
                Finished {
                    connect: false,
                    framing,
                }
            }
        };
        self.head.len = 0;
        Ok(finished)
    }
}

/// Bytes no head may carry: NUL and the other controls except HTAB (CR
/// and LF are judged by the line structure).
fn check_head_byte(byte: u8) -> Result<(), FramingError> {
    match byte {
        0 => Err(FramingError::Nul),
        b'\t' | b'\r' | b'\n' => Ok(()),
        0x01..=0x1f | 0x7f => Err(FramingError::Control),
        _ => Ok(()),
    }
}

/// A set of bytes as a lookup table: entry `b` says whether byte `b` is in
/// the set. A run costs one load and one branch per byte, where the
/// predicates it replaces compared each byte with three or four values.
/// The hot runs (names and values of whole lines) go eight bytes at a
/// time while a whole word is left ([`name_run`], [`plain_value_run`]);
/// what is left after the last word comes here.
type ByteSet = [bool; 256];

/// Builds a [`ByteSet`]: visible ASCII and above (not DEL), plus HTAB,
/// SP and the colon where asked.
const fn byte_set(tab: bool, space: bool, colon: bool) -> ByteSet {
    let mut set = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        set[byte] = match byte as u8 {
            b'\t' => tab,
            b' ' => space,
            b':' => colon,
            0x21..=0x7e | 0x80..=0xff => true,
            _ => false,
        };
        byte += 1;
    }
    set
}

/// Bytes `step` would take in a field value without changing state or
/// refusing them: neither CR nor LF, and allowed by [`check_head_byte`].
const PLAIN_VALUE_BYTES: ByteSet = byte_set(true, true, true);

/// Bytes `step` would add to a header name without changing state or
/// refusing them: visible ASCII or above, other than the colon.
const NAME_BYTES: ByteSet = byte_set(false, false, false);

/// Bytes `step` would add to a start-line token without changing state or
/// refusing them: neither a space nor a line end, and allowed by
/// [`check_head_byte`].
const TOKEN_BYTES: ByteSet = byte_set(true, false, true);

/// How many of `bytes`, from the first, are in `set`.
fn run_of(bytes: &[u8], set: &ByteSet) -> usize {
    bytes
        .iter()
        .position(|&b| !set[usize::from(b)])
        .unwrap_or(bytes.len())
}

/// How many of `bytes`, from the first, are in [`NAME_BYTES`]: the same as
/// [`run_of`] with that set, eight bytes at a time while a whole word is
/// left (names are short, but the rest of the head follows them).
fn name_run(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(word) = bytes.get(at..).and_then(|rest| rest.first_chunk::<8>()) {
        let flagged = not_name_bytes_in(u64::from_le_bytes(*word));
        if flagged != 0 {
            // Exact: see `not_name_bytes_in`.
            return at + (flagged.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + run_of(bytes.get(at..).unwrap_or_default(), &NAME_BYTES)
}

/// The high bit of every byte of `word` (little-endian) that is not in
/// [`NAME_BYTES`]: at or below SP, the colon, or DEL. As in
/// [`controls_in`], only the lowest set bit is exact, which is the one
/// read: each test flags falsely only above a byte it flags rightly.
fn not_name_bytes_in(word: u64) -> u64 {
    (below(word, b' ' + 1) | equal_to(word, b':') | equal_to(word, 0x7f)) & HIGHS
}

/// How many of `bytes`, from the first, are in [`PLAIN_VALUE_BYTES`]: the
/// same as [`run_of`] with that set, eight bytes at a time. Field values
/// are the longest runs of a head (cookies, user agents, `Accept` lists),
/// where a byte-by-byte search cost six instructions a byte. Shorter
/// values, and what is left after the last whole word, go byte by byte.
fn plain_value_run(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(word) = bytes.get(at..).and_then(|rest| rest.first_chunk::<8>()) {
        let flagged = controls_in(u64::from_le_bytes(*word));
        if flagged == 0 {
            at += 8;
            continue;
        }
        // The lowest flagged byte is exact (see `controls_in`): the first
        // control of the word, or a tab, which a value may carry.
        let first = at + (flagged.trailing_zeros() / 8) as usize;
        if bytes.get(first) != Some(&b'\t') {
            return first;
        }
        at = first + 1;
    }
    at + run_of(bytes.get(at..).unwrap_or_default(), &PLAIN_VALUE_BYTES)
}

/// The high bit of every byte of `word` (little-endian) that is below
/// 0x20 or is DEL (0x7f). Only the lowest set bit is exact: a byte below
/// 0x20 borrows from the byte above it, which may then be flagged too;
/// bytes below the first flagged one take no borrow and are never flagged.
fn controls_in(word: u64) -> u64 {
    (below(word, b' ') | equal_to(word, 0x7f)) & HIGHS
}

/// A one in every byte of a word.
const ONES: u64 = 0x0101_0101_0101_0101;
/// The high bit of every byte of a word.
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The bytes of `word` below `limit` (at most 0x80), flagged in their high
/// bits once masked with [`HIGHS`]: subtracting `limit` sets the high bit
/// of such a byte, which it did not have (bytes of 0x80 and above are left
/// out by `!word`). Exact up to the lowest such byte, which borrows from
/// the byte above it, so that one may be flagged too.
fn below(word: u64, limit: u8) -> u64 {
    word.wrapping_sub(ONES * u64::from(limit)) & !word
}

/// The bytes of `word` equal to `byte` (those the XOR makes zero),
/// flagged as [`below`] flags, and exact up to the lowest the same way.
fn equal_to(word: u64, byte: u8) -> u64 {
    let xored = word ^ (ONES * u64::from(byte));
    xored.wrapping_sub(ONES) & !xored
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Trims optional whitespace (SP, HTAB) around a field value.
fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// One decimal `Content-Length`: digits only, no sign, no list.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Implements `AsyncWrite` for a read-side adapter (`$ty<T>` with an
/// `inner: T` field) by handing every call to `inner`: the guards here
/// watch what is read and leave writes alone.
macro_rules! delegate_write {
    ($ty:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}
pub(crate) use delegate_write;

/// Upper bound of an origin's response head. No buffer is kept for it; the
/// bound only ends the scan of a head hyper would refuse anyway (its own
/// limit is about 400 KiB).
pub const MAX_RESPONSE_HEAD: usize = 1024 * 1024;

/// The request-side facts a [`ResponseGuard`] needs (whether the request on
/// the wire is a HEAD), and what the pool asks back (whether any byte of
/// its answer has come). Shared with the pool, which sets it before each
/// request (an HTTP/1.1 connection carries one exchange at a time).
#[derive(Debug, Clone, Default)]
pub struct Exchange(Arc<ExchangeState>);

#[derive(Debug, Default)]
struct ExchangeState {
    head: AtomicBool,
    answer_begun: AtomicBool,
}

impl Exchange {
    /// The next response answers a request with this method.
    pub fn request(&self, method: &http::Method) {
        self.0.answer_begun.store(false, Ordering::Relaxed);
        self.0
            .head
            .store(method == http::Method::HEAD, Ordering::Release);
    }

    /// Whether the origin has sent any byte since the last
    /// [`Exchange::request`] (a `1xx`, part of a head): it had begun to
    /// answer, so it read the request.
    pub fn answer_begun(&self) -> bool {
        self.0.answer_begun.load(Ordering::Acquire)
    }
}

/// An origin connection whose responses are scanned before hyper reads
/// them: an ambiguous response becomes a read error (`InvalidData`,
/// carrying the [`FramingError`]).
#[derive(Debug)]
pub struct ResponseGuard<T> {
    inner: T,
    scanner: Scanner,
    exchange: Exchange,
}

impl<T> ResponseGuard<T> {
    /// Guards `inner`; the pool tells each request's method to the returned
    /// [`Exchange`].
    pub fn new(inner: T) -> (ResponseGuard<T>, Exchange) {
        let exchange = Exchange::default();
        let guard = ResponseGuard {
            inner,
            scanner: Scanner::new(Side::Response, MAX_RESPONSE_HEAD),
            exchange: exchange.clone(),
        };
        (guard, exchange)
    }

    /// The guarded stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The guarded stream, for a read that bypasses the scanner (checking
    /// an idle stream; whatever such a read finds, the stream is dropped).
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Whether every response begun has been read to its end (and the
    /// stream's framing is still known): the next bytes would be a new
    /// response's.
    pub fn between_messages(&self) -> bool {
        self.scanner.between_messages()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ResponseGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.scanner.is_done() && this.scanner.state == State::Opaque {
            return Poll::Ready(Ok(()));
        }
        let answers_head = this.exchange.0.head.load(Ordering::Acquire);
        this.scanner.answers_head(answers_head);
        let fresh = &buf.filled()[before..];
        // Read before written: most reads come after the flag is set.
        if !fresh.is_empty() && !this.exchange.0.answer_begun.load(Ordering::Relaxed) {
            this.exchange.0.answer_begun.store(true, Ordering::Release);
        }
        match this.scanner.scan(fresh, |_| {}) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(error) => {
                // Nothing of this read reaches hyper.
                buf.set_filled(before);
                tracing::debug!(%error, "refused the origin's response");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)))
            }
        }
    }
}

delegate_write!(ResponseGuard);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sets_hold_exactly_what_step_takes_without_a_state_change() {
        for byte in 0..=255u8 {
            let visible = byte > 0x20 && byte != 0x7f;
            let value = byte == b'\t' || byte == b' ' || visible;
            assert_eq!(
                PLAIN_VALUE_BYTES[usize::from(byte)],
                value,
                "value {byte:#x}"
            );
            assert_eq!(
                NAME_BYTES[usize::from(byte)],
                visible && byte != b':',
                "name {byte:#x}"
            );
            assert_eq!(
                TOKEN_BYTES[usize::from(byte)],
                byte == b'\t' || visible,
                "token {byte:#x}"
            );
        }
    }

    #[test]
    fn runs_end_at_the_first_byte_outside_the_set_wherever_it_falls() {
        // Short and longer runs, with the stop byte at every position (and
        // none), against a byte-by-byte search.
        for len in 0..24 {
            for stop in 0..=len {
                let mut bytes = vec![b'a'; len];
                if stop < len {
                    bytes[stop] = b'\r';
                }
                let expected = bytes.iter().position(|&b| b == b'\r').unwrap_or(len);
                assert_eq!(run_of(&bytes, &PLAIN_VALUE_BYTES), expected, "{len} {stop}");
            }
        }
    }

    /// Runs of `fills` with every byte value as the stop, at every position
    /// (within a word, at a word's edge, in the tail, and none), and with
    /// `mark` put halfway before the stop: each handed to `check`.
    fn every_stopped_run(fills: [u8; 3], mark: Option<u8>, mut check: impl FnMut(&[u8])) {
        for stop in 0..=255u8 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 31] {
                for at in 0..=len {
                    for fill in fills {
                        let mut bytes = vec![fill; len];
                        if at < len {
                            bytes[at] = stop;
                        }
                        if let Some(mark) = mark.filter(|_| at > 1) {
                            bytes[at / 2] = mark;
                        }
                        check(&bytes);
                    }
                }
            }
        }
    }

    #[test]
    fn plain_value_runs_match_the_byte_by_byte_run() {
        // With a tab before the stop, and bytes above 0x7f around it.
        every_stopped_run([b'a', 0xe9, b' '], Some(b'\t'), |bytes| {
            assert_eq!(
                plain_value_run(bytes),
                run_of(bytes, &PLAIN_VALUE_BYTES),
                "{bytes:?}"
            );
        });
    }

    proptest::proptest! {
        #[test]
        fn plain_value_runs_match_on_any_bytes(
            // Mostly visible bytes, so that runs get long.
            bytes in proptest::collection::vec(
                proptest::prop_oneof![8 => 0x20u8..0x7f, 1 => proptest::num::u8::ANY],
                0..80,
            )
        ) {
            proptest::prop_assert_eq!(plain_value_run(&bytes), run_of(&bytes, &PLAIN_VALUE_BYTES));
        }
    }

    fn scan_all(side: Side, bytes: &[u8]) -> Result<Vec<Finished>, FramingError> {
        let mut scanner = Scanner::new(side, 4096);
        let mut heads = Vec::new();
        scanner.scan(bytes, |h| heads.push(h))?;
        Ok(heads)
    }

    /// Scanning byte by byte must agree with scanning at once.
    fn scan_bytewise(side: Side, bytes: &[u8]) -> Result<Vec<Finished>, FramingError> {
        let mut scanner = Scanner::new(side, 4096);
        let mut heads = Vec::new();
        for b in bytes {
            scanner.scan(std::slice::from_ref(b), |h| heads.push(h))?;
        }
        Ok(heads)
    }

    #[test]
    fn follows_framing_across_keep_alive_requests() {
        let bytes = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n\
            POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length:3\r\n\r\nabc\
            CONNECT a:443 HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        for heads in [
            scan_all(Side::Request, bytes).unwrap(),
            scan_bytewise(Side::Request, bytes).unwrap(),
        ] {
            let framings: Vec<_> = heads.iter().map(|h| h.framing).collect();
            assert_eq!(
                framings,
                [
                    Framing::Length(0),
                    Framing::Chunked,
                    Framing::Length(3),
                    Framing::Length(0)
                ]
            );
            assert!(heads[3].connect && !heads[0].connect);
        }
    }

    #[test]
    fn refuses_ambiguous_requests() {
        let cases: &[(&[u8], FramingError)] = &[
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                FramingError::LengthAndChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                FramingError::TransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                FramingError::TransferEncoding,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                FramingError::TransferEncodingHttp10,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                FramingError::ContentLengths,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                FramingError::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                FramingError::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                FramingError::ContentLength,
            ),
            (b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", FramingError::ObsFold),
            (b"GET / HTTP/1.1\r\nA : b\r\n\r\n", FramingError::SpaceBeforeColon),
            (b"GET / HTTP/1.1\r\nAb\r\n\r\n", FramingError::NoColon),
            (b"GET / HTTP/1.1\nA: b\r\n\r\n", FramingError::BareLf),
            (b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", FramingError::BareCr),
            (b"GET / HTTP/1.1\r\nA: b\0\r\n\r\n", FramingError::Nul),
            (b"GET / HTTP/1.1\r\nA: \x01\r\n\r\n", FramingError::Control),
            (
                b"CONNECT a:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
                FramingError::ConnectBody,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n",
                FramingError::Chunk,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
                FramingError::Chunk,
            ),
        ];
        for (bytes, want) in cases {
            let text = String::from_utf8_lossy(bytes);
            assert_eq!(scan_all(Side::Request, bytes), Err(*want), "{text:?}");
            assert_eq!(scan_bytewise(Side::Request, bytes), Err(*want), "{text:?}");
        }
    }

    #[test]
    fn response_framing_follows_status_and_method() {
        let bytes =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
        let heads = scan_all(Side::Response, bytes).unwrap();
        assert_eq!(heads[0].framing, Framing::Interim);
        assert_eq!(heads[1].framing, Framing::Length(0));
        let mut scanner = Scanner::new(Side::Response, 4096);
        scanner.answers_head(true);
        let mut seen = Vec::new();
        scanner
            .scan(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", |h| {
                seen.push(h)
            })
            .unwrap();
        assert_eq!(seen[0].framing, Framing::Length(0));
        let heads = scan_all(Side::Response, b"HTTP/1.1 200 OK\r\n\r\nanything\0at all").unwrap();
        assert_eq!(heads[0].framing, Framing::Opaque);
    }

    #[test]
    fn heads_are_bounded() {
        let mut scanner = Scanner::new(Side::Request, 32);
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(40));
        assert_eq!(
            scanner.scan(long.as_bytes(), |_| {}),
            Err(FramingError::HeadTooLarge)
        );
    }

    /// Empty lines before a request line are allowed, but after the one
    /// a server should ignore they begin a head: a lone CR, or CRLFs sent
    /// now and then, are not "between messages" (where only the idle limit
    /// applies), and they count towards the head's size.
    #[test]
    fn empty_lines_before_a_request_begin_its_head() {
        let mut scanner = Scanner::new(Side::Request, 32);
        assert!(scanner.between_messages() && !scanner.in_head());
        scanner.scan(b"\r", |_| {}).unwrap();
        assert!(scanner.in_head() && !scanner.between_messages());
        scanner.scan(b"\n", |_| {}).unwrap();
        assert!(scanner.between_messages(), "one empty line is passed");
        scanner.scan(b"\r\n", |_| {}).unwrap();
        assert!(scanner.in_head() && !scanner.between_messages());
        let mut ended = 0;
        scanner
            .scan(b"GET / HTTP/1.1\r\n\r\n", |_| ended += 1)
            .unwrap();
        assert_eq!(ended, 1);
        assert!(scanner.between_messages() && !scanner.in_head());
        // 13 empty lines and a 20-byte head: past 32.
        let mut scanner = Scanner::new(Side::Request, 32);
        let padded = format!("{}GET / HTTP/1.1\r\n\r\n", "\r\n".repeat(13));
        assert_eq!(
            scanner.scan(padded.as_bytes(), |_| {}),
            Err(FramingError::HeadTooLarge)
        );
    }

    /// Whole header lines are taken at once: whatever the head limit, and
    /// wherever a read ends, the verdict is the one of the byte-by-byte
    /// scan.
    #[test]
    fn whole_lines_are_judged_like_single_bytes() {
        let heads: [&[u8]; 7] = [
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\ncontent-length:3 \r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding:\tchunked\r\nX: y\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Lengthy: x\r\nTransfer-Encodings: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\nC:\r\nD: e\x7f\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\nhOST: b\r\n\r\n",
        ];
        for bytes in heads {
            let text = String::from_utf8_lossy(bytes);
            for limit in 1..bytes.len() + 2 {
                for split in 0..bytes.len() {
                    let (a, b) = bytes.split_at(split);
                    let mut split_scanner = Scanner::new(Side::Request, limit);
                    let mut split_heads = Vec::new();
                    let split_result = split_scanner
                        .scan(a, |h| split_heads.push(h))
                        .and_then(|()| split_scanner.scan(b, |h| split_heads.push(h)));
                    let mut bytewise_scanner = Scanner::new(Side::Request, limit);
                    let mut bytewise_heads = Vec::new();
                    let bytewise_result = bytes.iter().try_for_each(|byte| {
                        bytewise_scanner
                            .scan(std::slice::from_ref(byte), |h| bytewise_heads.push(h))
                    });
                    assert_eq!(split_result, bytewise_result, "{text:?} {limit} {split}");
                    assert_eq!(split_heads, bytewise_heads, "{text:?} {limit} {split}");
                }
            }
        }
    }

    /// Values of fields that do not frame are skipped in bulk: the limit,
    /// the byte checks and the end of the line must fall exactly where the
    /// byte-by-byte scan puts them.
    #[test]
    fn long_values_are_checked_like_short_ones() {
        let head = |value: &str| format!("GET / HTTP/1.1\r\nCookie: {value}\r\nA: b\r\n\r\n");
        let fits = head(&"v".repeat(40));
        let limit = fits.len();
        for (bytes, want) in [
            (fits.clone(), Ok(1)),
            (head(&"v".repeat(41)), Err(FramingError::HeadTooLarge)),
            (
                head(&format!("{}\x01", "v".repeat(20))),
                Err(FramingError::Control),
            ),
            (
                head(&format!("{}\rx", "v".repeat(20))),
                Err(FramingError::BareCr),
            ),
            (head("a\tb; c=d"), Ok(1)),
        ] {
            let whole = Scanner::new(Side::Request, limit).scan(bytes.as_bytes(), |_| {});
            let mut scanner = Scanner::new(Side::Request, limit);
            let mut heads = 0;
            let bytewise = bytes
                .as_bytes()
                .iter()
                .try_for_each(|b| scanner.scan(std::slice::from_ref(b), |_| heads += 1));
            assert_eq!(whole.map(|()| 1), want, "{bytes:?}");
            assert_eq!(bytewise.map(|()| heads), want, "{bytes:?}");
        }
    }

    #[test]
    fn name_runs_match_the_byte_by_byte_run() {
        // After bytes above 0x7f, and after a dash (0x2d, near the colon).
        every_stopped_run([b'a', 0xe9, b'-'], None, |bytes| {
            assert_eq!(name_run(bytes), run_of(bytes, &NAME_BYTES), "{bytes:?}");
        });
    }

    /// Start lines for the property below: both sides, odd spacing,
    /// CONNECT, HTTP/1.0, a 101, a line without spaces.
    const START_LINES: &[&[u8]] = &[
        b"GET /bytes HTTP/1.1\r\n",
        b"CONNECT a:443 HTTP/1.1\r\n",
        b"POST  /x  HTTP/1.0\r\n",
        b"GET\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.0 204\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n",
        b"HTTP/1.1  200\tOK\r\n",
    ];

    /// Header lines for the property below: fields that frame (well and
    /// badly) and that do not.
    const FIELDS: &[&[u8]] = &[
        b"host: origin.test:8443\r\n",
        b"Content-Length: 3\r\n",
        b"content-length:3 \r\n",
        b"Content-Length: 0\r\n",
        b"Content-Length: 3, 3\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"TRANSFER-ENCODING:\tgzip\r\n",
        b"x-a-rather-long-header-name: v\tv\r\n",
        b"Cookie: a=b; c=d; e=fffffffffffffffff\r\n",
        b"Content-Lengthy: x\r\n",
        b"A:\r\n",
    ];

    /// What follows a head, and what may be spliced into the bytes
    /// anywhere: bodies, chunks, and what a head must refuse.
    const OTHERS: &[&[u8]] = &[
        b"abc",
        b"3\r\nabc\r\n0\r\n\r\n",
        b"0\r\nT: 1\r\n\r\n",
        b" folded\r\n",
        b"A : b\r\n",
        b"Ab\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"\0",
        b"\x01",
        b"\x7f",
        b"\xe9",
    ];

    /// A message for the property below: a start line, header lines, the
    /// empty line, and perhaps something after it.
    fn message() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::strategy::Strategy as _;
        (
            0..START_LINES.len(),
            proptest::collection::vec(0..FIELDS.len(), 0..5),
            proptest::option::of(0..OTHERS.len()),
        )
            .prop_map(|(start, fields, after)| {
                let mut bytes = START_LINES[start].to_vec();
                for field in fields {
                    bytes.extend_from_slice(FIELDS[field]);
                }
                bytes.extend_from_slice(b"\r\n");
                if let Some(after) = after {
                    bytes.extend_from_slice(OTHERS[after]);
                }
                bytes
            })
    }

    proptest::proptest! {
        /// Whatever the bytes, the limit and where reads end, the scanner's
        /// bulk paths (whole start lines, header lines, the end of a head,
        /// runs) reach the verdict, the heads and the state of the
        /// byte-by-byte scan. Messages are mostly well formed, so that
        /// heads get finished; one piece, or a few random bytes, may be
        /// spliced in anywhere. Every limit up to the length is tried.
        #[test]
        fn any_bytes_are_judged_as_byte_by_byte(
            response: bool,
            messages in proptest::collection::vec(message(), 1..4),
            splice in proptest::option::of((
                0usize..400,
                proptest::prop_oneof![
                    3 => proptest::strategy::Strategy::prop_map(
                        0..OTHERS.len(),
                        |i| OTHERS[i].to_vec(),
                    ),
                    1 => proptest::collection::vec(proptest::num::u8::ANY, 1..4),
                ],
            )),
            split in 0usize..400,
        ) {
            let side = if response { Side::Response } else { Side::Request };
            let mut bytes = messages.concat();
            if let Some((at, piece)) = splice {
                let at = at.min(bytes.len());
                bytes.splice(at..at, piece);
            }
            let scan_whole = |limit: usize, bytes: &[u8], split: usize| {
                let (a, b) = bytes.split_at(split);
                let mut scanner = Scanner::new(side, limit);
                let mut heads = Vec::new();
                let result = scanner
                    .scan(a, |h| heads.push(h))
                    .and_then(|()| scanner.scan(b, |h| heads.push(h)));
                (result, heads, scanner.state)
            };
            for limit in 1..bytes.len() + 2 {
                let mut scanner = Scanner::new(side, limit);
                let mut heads = Vec::new();
                let result = bytes.iter().try_for_each(|byte| {
                    scanner.scan(std::slice::from_ref(byte), |h| heads.push(h))
                });
                let bytewise = (result, heads, scanner.state);
                proptest::prop_assert_eq!(&scan_whole(limit, &bytes, 0), &bytewise, "limit {}", limit);
                let split = split.min(bytes.len());
                proptest::prop_assert_eq!(
                    &scan_whole(limit, &bytes, split),
                    &bytewise,
                    "limit {} split {}",
                    limit,
                    split
                );
            }
        }
    }
}
