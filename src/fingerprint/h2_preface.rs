//! The opening of an HTTP/2 client connection: the Akamai-style fingerprint.
//!
//! Input: the first decrypted bytes a client sends on an h2 connection, in
//! one piece ([`parse`]) or as they are read ([`H2PrefaceParser::feed`]):
//! the 24-byte connection preface, then frames up to the end of the first
//! request's header block (HEADERS plus any CONTINUATION frames).
//!
//! Output: an [`H2Fingerprint`]: the first SETTINGS frame (ids and values in
//! order), the first connection-level WINDOW_UPDATE increment, the PRIORITY
//! frames before the request, the request's HEADERS priority, its
//! pseudo-header order and its regular header names in order; and the
//! Akamai text form `SETTINGS|WINDOW_UPDATE|PRIORITY|PSEUDO_HEADERS`
//! ([`H2Fingerprint::akamai`]), e.g.
//! `1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p` for Chromium.
//!
//! Invariants:
//! - at most [`MAX_PREFACE_LEN`] bytes are read. A first header block that
//!   has not ended by then (a request with a large cookie) is fingerprinted
//!   from the fields read whole before the limit, once they hold every
//!   pseudo-header (the settings, window and priorities come before them).
//!   A client that has not started its first header block by then, or
//!   whose pseudo-headers run past it (a 64 KiB `:path`), gets
//!   [`H2Error::TooLarge`];
//! - at most [`hpack::MAX_HEADERS`](super::hpack) names are kept; the
//!   header order of a longer first request is its first names;
//! - only the frame being read is buffered, plus the header block being
//!   gathered; payloads of frames that do not matter are skipped unbuffered;
//! - header values are skipped, never decoded nor kept: they carry cookies
//!   and credentials (see the private `hpack` module for why HPACK does not
//!   need them here);
//! - garbage yields an error, never a panic; after an error or completion,
//!   further input is not looked at.

use serde::{Deserialize, Serialize};

use super::reader::Reader;
use super::Progress;

/// The client connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most bytes read of a connection's opening. Browsers need a few hundred
/// to end their first request's header block; a block still going at this
/// limit is read up to it (see the module docs).
pub const MAX_PREFACE_LEN: usize = 64 * 1024;

/// Length of an HTTP/2 frame header.
const FRAME_HEADER_LEN: usize = 9;

/// Frame types (RFC 9113, section 6).
const FRAME_HEADERS: u8 = 0x1;
const FRAME_PRIORITY: u8 = 0x2;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_WINDOW_UPDATE: u8 = 0x8;
const FRAME_CONTINUATION: u8 = 0x9;

/// Frame flags.
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Mask of the 31-bit stream ids and increments (the top bit is reserved
/// or, in priority fields, the exclusive flag).
const U31_MASK: u32 = 0x7fff_ffff;

/// A stream dependency, from a PRIORITY frame or a HEADERS frame's priority
/// fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Priority {
    /// The stream the priority is for.
    pub stream_id: u32,
    /// The exclusive flag.
    pub exclusive: bool,
    /// The stream it depends on.
    pub depends_on: u32,
    /// The weight, 1 to 256 (the wire byte plus one, as RFC 9113 defines it
    /// and as the Akamai format prints it).
    pub weight: u16,
}

/// What the opening of an h2 connection says about the client.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct H2Fingerprint {
    /// The first SETTINGS frame: (identifier, value) in wire order.
    pub settings: Vec<(u16, u32)>,
    /// Increment of the first WINDOW_UPDATE on stream 0; 0 when none came
    /// before the request.
    pub window_update: u32,
    /// PRIORITY frames before the first request, in order.
    pub priorities: Vec<Priority>,
    /// The first HEADERS frame's priority fields, when its PRIORITY flag is
    /// set.
    pub headers_priority: Option<Priority>,
    /// Pseudo-header order of the first request: `m` (`:method`), `a`
    /// (`:authority`), `s` (`:scheme`), `p` (`:path`); any other
    /// pseudo-header (`:protocol`) is `?`.
    pub pseudo_order: Vec<char>,
    /// Regular header names of the first request, in order, as sent
    /// (lower case in a valid request).
    pub header_order: Vec<String>,
}

impl H2Fingerprint {
    /// The Akamai text form, `SETTINGS|WINDOW_UPDATE|PRIORITY|PSEUDO`:
    /// settings as `id:value` joined by `;`; the window increment, `00` when
    /// there was none (as in Akamai's white paper); PRIORITY frames as
    /// `stream:exclusive:depends_on:weight` joined by `,`, `0` when there
    /// were none; pseudo-headers joined by `,`.
    pub fn akamai(&self) -> String {
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(id, value)| format!("{id}:{value}"))
            .collect();
        let window = if self.window_update == 0 {
            "00".to_owned()
        } else {
            self.window_update.to_string()
        };
        let priorities = if self.priorities.is_empty() {
            "0".to_owned()
        } else {
            let list: Vec<String> = self
                .priorities
                .iter()
                .map(|p| {
                    format!(
                        "{}:{}:{}:{}",
                        p.stream_id,
                        u8::from(p.exclusive),
                        p.depends_on,
                        p.weight
                    )
                })
                .collect();
            list.join(",")
        };
        let pseudo: Vec<String> = self.pseudo_order.iter().map(char::to_string).collect();
        format!(
            "{}|{window}|{priorities}|{}",
            settings.join(";"),
            pseudo.join(",")
        )
    }
}

/// Why the bytes are not an acceptable h2 connection opening.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum H2Error {
    /// The bytes do not start with the connection preface.
    #[error("not the HTTP/2 connection preface")]
    BadPreface,
    /// The input ended before the first request's header block did.
    #[error("input ends before the first request's header block")]
    Truncated,
    /// No request header block, or none with a whole field, within
    /// [`MAX_PREFACE_LEN`] bytes.
    #[error("no request header fields within {MAX_PREFACE_LEN} bytes")]
    TooLarge,
    /// A frame breaks the protocol; the text says how.
    #[error("malformed HTTP/2 frame: {0}")]
    Malformed(&'static str),
    /// The header block does not decode; the text says why.
    #[error("HPACK: {0}")]
    Hpack(&'static str),
}

/// A frame header.
#[derive(Clone, Copy, Debug)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// What the parser is reading.
#[derive(Clone, Debug)]
enum State {
    /// The preface; `matched` bytes of it seen so far.
    Preface { matched: usize },
    /// A frame header, gathered in `pending`.
    FrameHeader,
    /// The payload of `header`, gathered in `pending`.
    Payload { header: FrameHeader },
    /// A payload that does not matter; `remaining` bytes of it to drop.
    Skip { remaining: usize },
    /// The first header block is complete.
    Done,
    /// The input was refused.
    Failed(H2Error),
}

/// Incremental parser of an h2 connection opening; see the module docs.
#[derive(Debug)]
pub struct H2PrefaceParser {
    state: State,
    /// The part of the current frame header or payload read so far.
    pending: Vec<u8>,
    /// Bytes read so far, preface included.
    seen: usize,
    /// True once a frame has been read (the first must be SETTINGS).
    any_frame: bool,
    settings_seen: bool,
    window_update_seen: bool,
    /// The header block being gathered from HEADERS and CONTINUATION.
    header_block: Vec<u8>,
    /// The stream whose header block awaits CONTINUATION frames; 0 for none.
    continuing: u32,
    fingerprint: H2Fingerprint,
}

impl Default for H2PrefaceParser {
    fn default() -> Self {
        Self::new()
    }
}

/// Outcome of one step of the parser.
enum Step {
    /// Keep going with the remaining input.
    Continue,
    /// The input is used up; more is needed.
    NeedMore,
    /// The first header block is complete.
    Done,
}

impl H2PrefaceParser {
    /// A parser expecting the connection preface.
    pub fn new() -> Self {
        H2PrefaceParser {
            state: State::Preface { matched: 0 },
            pending: Vec::new(),
            seen: 0,
            any_frame: false,
            settings_seen: false,
            window_update_seen: false,
            header_block: Vec::new(),
            continuing: 0,
            fingerprint: H2Fingerprint::default(),
        }
    }

    /// Feeds the next bytes read from the client.
    ///
    /// `Complete { consumed }`: the first request's header block ended after
    /// `consumed` bytes of `bytes` (0 if it was complete before this call);
    /// [`Self::fingerprint`] now returns it. `NeedMore`: feed more.
    /// `Failed`: not an acceptable opening; later calls fail the same way.
    pub fn feed(&mut self, bytes: &[u8]) -> Progress<H2Error> {
        match &self.state {
            State::Done => return Progress::Complete { consumed: 0 },
            State::Failed(e) => return Progress::Failed(e.clone()),
            _ => {}
        }
        let mut input = bytes;
        // Each step consumes input, or ends a frame whose 9-byte header it
        // has just consumed, or returns: at most two steps per byte plus the
        // last. The bound keeps the loop visibly finite; reaching it would be
        // a bug, and fails closed rather than dropping input.
        let max_steps = bytes.len().saturating_mul(2).saturating_add(2);
        for _ in 0..max_steps {
            match self.step(&mut input) {
                Ok(Step::Continue) => {}
                Ok(Step::NeedMore) => return Progress::NeedMore,
                Ok(Step::Done) => {
                    self.state = State::Done;
                    self.pending = Vec::new();
                    self.header_block = Vec::new();
                    return Progress::Complete {
                        consumed: bytes.len().saturating_sub(input.len()),
                    };
                }
                Err(e) => return self.fail(e),
            }
        }
        self.fail(H2Error::Malformed("parser step bound reached"))
    }

    /// Records a refusal and frees the buffers.
    fn fail(&mut self, e: H2Error) -> Progress<H2Error> {
        self.state = State::Failed(e.clone());
        self.pending = Vec::new();
        self.header_block = Vec::new();
        Progress::Failed(e)
    }

    /// The fingerprint, once [`Self::feed`] has returned `Complete`.
    pub fn fingerprint(&self) -> Option<&H2Fingerprint> {
        matches!(self.state, State::Done).then_some(&self.fingerprint)
    }

    /// The fingerprint, once [`Self::feed`] has returned `Complete`.
    pub fn into_fingerprint(self) -> Option<H2Fingerprint> {
        matches!(self.state, State::Done).then_some(self.fingerprint)
    }

    /// Takes up to `want` bytes off `input`, counting them against the
    /// limit.
    fn take<'a>(&mut self, input: &mut &'a [u8], want: usize) -> Result<&'a [u8], H2Error> {
        let n = want.min(input.len());
        let (head, tail) = input.split_at_checked(n).unwrap_or((input, &[]));
        *input = tail;
        self.seen = self.seen.saturating_add(head.len());
        if self.seen > MAX_PREFACE_LEN {
            return Err(H2Error::TooLarge);
        }
        Ok(head)
    }

    /// Bytes that may still be read within [`MAX_PREFACE_LEN`].
    fn budget(&self) -> usize {
        MAX_PREFACE_LEN.saturating_sub(self.seen)
    }

    /// Gathers bytes into `pending` until it holds `target` bytes; true once
    /// it does.
    fn gather(&mut self, input: &mut &[u8], target: usize) -> Result<bool, H2Error> {
        let want = target.saturating_sub(self.pending.len());
        let got = self.take(input, want)?;
        self.pending.extend_from_slice(got);
        Ok(self.pending.len() >= target)
    }

    fn step(&mut self, input: &mut &[u8]) -> Result<Step, H2Error> {
        match self.state.clone() {
            // `feed` does not step a finished parser; answer consistently.
            State::Done => Ok(Step::Done),
            State::Failed(e) => Err(e),
            State::Preface { matched } => {
                let expected = PREFACE.get(matched..).unwrap_or_default();
                let got = self.take(input, expected.len())?;
                if expected.get(..got.len()) != Some(got) {
                    return Err(H2Error::BadPreface);
                }
                let matched = matched.saturating_add(got.len());
                if matched == PREFACE.len() {
                    self.state = State::FrameHeader;
                    Ok(Step::Continue)
                } else {
                    self.state = State::Preface { matched };
                    Ok(Step::NeedMore)
                }
            }
            State::FrameHeader => {
                if self.continuing != 0
                    && self.budget() < FRAME_HEADER_LEN.saturating_sub(self.pending.len())
                {
                    // The block's next CONTINUATION cannot start within the
                    // limit: the block ends here.
                    return self.end_block(true);
                }
                if !self.gather(input, FRAME_HEADER_LEN)? {
                    return Ok(Step::NeedMore);
                }
                let header = parse_frame_header(&self.pending)?;
                self.pending.clear();
                self.start_frame(header)
            }
            State::Payload { header } => {
                if is_header_block(header.kind)
                    && header.len.saturating_sub(self.pending.len()) > self.budget()
                {
                    // The block cannot end within the limit: read up to it,
                    // then fingerprint what was read.
                    let cut_at = self.pending.len().saturating_add(self.budget());
                    if !self.gather(input, cut_at)? {
                        return Ok(Step::NeedMore);
                    }
                    let payload = std::mem::take(&mut self.pending);
                    self.frame_cut(header, &payload)?;
                    return self.end_block(true);
                }
                if !self.gather(input, header.len)? {
                    return Ok(Step::NeedMore);
                }
                let payload = std::mem::take(&mut self.pending);
                self.state = State::FrameHeader;
                self.frame(header, &payload)
            }
            State::Skip { remaining } => {
                let dropped = self.take(input, remaining)?;
                let remaining = remaining.saturating_sub(dropped.len());
                if remaining == 0 {
                    self.state = State::FrameHeader;
                    Ok(Step::Continue)
                } else {
                    self.state = State::Skip { remaining };
                    Ok(Step::NeedMore)
                }
            }
        }
    }

    /// Checks a frame header and decides whether its payload is read or
    /// skipped.
    fn start_frame(&mut self, header: FrameHeader) -> Result<Step, H2Error> {
        if header.len > self.budget() && !is_header_block(header.kind) {
            // It cannot end within the limit: refuse now, not after 64 KiB.
            return Err(H2Error::TooLarge);
        }
        if !self.any_frame {
            self.any_frame = true;
            if header.kind != FRAME_SETTINGS || header.flags & FLAG_ACK != 0 {
                return Err(H2Error::Malformed(
                    "the preface is not followed by SETTINGS",
                ));
            }
        }
        if self.continuing != 0
            && (header.kind != FRAME_CONTINUATION || header.stream != self.continuing)
        {
            return Err(H2Error::Malformed("header block interrupted"));
        }
        let wanted = matches!(
            header.kind,
            FRAME_SETTINGS
                | FRAME_WINDOW_UPDATE
                | FRAME_PRIORITY
                | FRAME_HEADERS
                | FRAME_CONTINUATION
        );
        if !wanted {
            self.state = State::Skip {
                remaining: header.len,
            };
            return Ok(Step::Continue);
        }
        if header.len == 0 {
            self.state = State::FrameHeader;
            return self.frame(header, &[]);
        }
        self.state = State::Payload { header };
        Ok(Step::Continue)
    }

    /// Takes in one whole frame of a wanted type.
    fn frame(&mut self, header: FrameHeader, payload: &[u8]) -> Result<Step, H2Error> {
        use H2Error::Malformed;
        let mut r = Reader::new(payload);
        match header.kind {
            FRAME_SETTINGS => {
                if header.stream != 0 {
                    return Err(Malformed("SETTINGS on a stream"));
                }
                if header.flags & FLAG_ACK != 0 {
                    if !payload.is_empty() {
                        return Err(Malformed("SETTINGS ACK with a payload"));
                    }
                    return Ok(Step::Continue);
                }
                let pairs = payload.chunks_exact(6);
                if !pairs.remainder().is_empty() {
                    return Err(Malformed("SETTINGS length not a multiple of 6"));
                }
                if !self.settings_seen {
                    self.settings_seen = true;
                    for _ in 0..payload.len() / 6 {
                        let id = r.u16().ok_or(Malformed("SETTINGS"))?;
                        let value = r.u32().ok_or(Malformed("SETTINGS"))?;
                        self.fingerprint.settings.push((id, value));
                    }
                }
            }
            FRAME_WINDOW_UPDATE => {
                let increment = r.u32().ok_or(Malformed("WINDOW_UPDATE length"))? & U31_MASK;
                if !r.is_empty() {
                    return Err(Malformed("WINDOW_UPDATE length"));
                }
                if increment == 0 {
                    return Err(Malformed("WINDOW_UPDATE of 0"));
                }
                if header.stream == 0 && !self.window_update_seen {
                    self.window_update_seen = true;
                    self.fingerprint.window_update = increment;
                }
            }
            FRAME_PRIORITY => {
                if header.stream == 0 {
                    return Err(Malformed("PRIORITY on stream 0"));
                }
                let priority = read_priority(&mut r, header.stream)?;
                if !r.is_empty() {
                    return Err(Malformed("PRIORITY length"));
                }
                self.fingerprint.priorities.push(priority);
            }
            FRAME_HEADERS => {
                if header.stream == 0 {
                    return Err(Malformed("HEADERS on stream 0"));
                }
                let pad_len = if header.flags & FLAG_PADDED != 0 {
                    usize::from(r.u8().ok_or(Malformed("HEADERS padding"))?)
                } else {
                    0
                };
                if header.flags & FLAG_PRIORITY != 0 {
                    self.fingerprint.headers_priority = Some(read_priority(&mut r, header.stream)?);
                }
                let rest = r.rest();
                let fragment_len = rest
                    .len()
                    .checked_sub(pad_len)
                    .ok_or(Malformed("HEADERS padding longer than the frame"))?;
                let fragment = rest.get(..fragment_len).unwrap_or_default();
                return self.header_fragment(header, fragment);
            }
            FRAME_CONTINUATION => {
                if self.continuing == 0 || header.stream != self.continuing {
                    return Err(Malformed("CONTINUATION without HEADERS"));
                }
                return self.header_fragment(header, payload);
            }
            _ => {}
        }
        Ok(Step::Continue)
    }

    /// Adds a header block fragment; decodes the block at END_HEADERS.
    fn header_fragment(&mut self, header: FrameHeader, fragment: &[u8]) -> Result<Step, H2Error> {
        self.header_block.extend_from_slice(fragment);
        if header.flags & FLAG_END_HEADERS == 0 {
            self.continuing = header.stream;
            return Ok(Step::Continue);
        }
        self.end_block(false)
    }

    /// Takes in the start of a HEADERS or CONTINUATION frame whose end lies
    /// past the limit: its priority fields and the part of its fragment
    /// in `payload` (the frame's first bytes).
    fn frame_cut(&mut self, header: FrameHeader, payload: &[u8]) -> Result<(), H2Error> {
        if header.kind == FRAME_CONTINUATION {
            if self.continuing == 0 || header.stream != self.continuing {
                return Err(H2Error::Malformed("CONTINUATION without HEADERS"));
            }
            self.header_block.extend_from_slice(payload);
            return Ok(());
        }
        if header.stream == 0 {
            return Err(H2Error::Malformed("HEADERS on stream 0"));
        }
        let mut r = Reader::new(payload);
        let pad_len = if header.flags & FLAG_PADDED != 0 {
            usize::from(r.u8().ok_or(H2Error::TooLarge)?)
        } else {
            0
        };
        if header.flags & FLAG_PRIORITY != 0 {
            self.fingerprint.headers_priority =
                Some(read_priority(&mut r, header.stream).map_err(|_| H2Error::TooLarge)?);
        }
        // The fragment ends where the frame's padding starts.
        let read = payload.len().saturating_sub(r.rest().len());
        let fragment_len = header
            .len
            .saturating_sub(read)
            .saturating_sub(pad_len)
            .min(r.rest().len());
        self.header_block
            .extend_from_slice(r.rest().get(..fragment_len).unwrap_or_default());
        Ok(())
    }

    /// Decodes the gathered header block, whole or `cut` short at the
    /// limit, and completes the fingerprint.
    fn end_block(&mut self, cut: bool) -> Result<Step, H2Error> {
        self.continuing = 0;
        let (pseudo_order, header_order) = header_names(&self.header_block, cut)?;
        // Pseudo-headers come first: a regular field read whole says they
        // were all read. Without one, the cut may have fallen inside one
        // (a 64 KiB `:path`), and a partial order would be presented as
        // the client's: only the four of a request are taken as whole.
        let all_pseudo = ['m', 'a', 's', 'p']
            .iter()
            .all(|p| pseudo_order.contains(p));
        if cut && header_order.is_empty() && !all_pseudo {
            return Err(H2Error::TooLarge);
        }
        self.fingerprint.pseudo_order = pseudo_order;
        self.fingerprint.header_order = header_order;
        Ok(Step::Done)
    }
}

/// Parses a 9-byte frame header.
fn parse_frame_header(bytes: &[u8]) -> Result<FrameHeader, H2Error> {
    let mut r = Reader::new(bytes);
    let len = r.u24().ok_or(H2Error::Malformed("frame header"))?;
    let kind = r.u8().ok_or(H2Error::Malformed("frame header"))?;
    let flags = r.u8().ok_or(H2Error::Malformed("frame header"))?;
    let stream = r.u32().ok_or(H2Error::Malformed("frame header"))? & U31_MASK;
    Ok(FrameHeader {
        len: usize::try_from(len).unwrap_or(usize::MAX),
        kind,
        flags,
        stream,
    })
}

/// Reads the 5 bytes of priority fields (exclusive flag and dependency,
/// weight).
fn read_priority(r: &mut Reader<'_>, stream_id: u32) -> Result<Priority, H2Error> {
    let dependency = r.u32().ok_or(H2Error::Malformed("priority fields"))?;
    let weight = r.u8().ok_or(H2Error::Malformed("priority fields"))?;
    Ok(Priority {
        stream_id,
        exclusive: dependency & !U31_MASK != 0,
        depends_on: dependency & U31_MASK,
        weight: u16::from(weight).saturating_add(1),
    })
}

/// True for the frames that carry a header block.
fn is_header_block(kind: u8) -> bool {
    kind == FRAME_HEADERS || kind == FRAME_CONTINUATION
}

/// HPACK-decodes a header block's names, of a whole block or of one `cut`
/// short (see `hpack::header_names`); returns the pseudo-header order and
/// the regular header names. Values are never decoded.
fn header_names(block: &[u8], cut: bool) -> Result<(Vec<char>, Vec<String>), H2Error> {
    let mut pseudo = Vec::new();
    let mut names = Vec::new();
    for name in super::hpack::header_names(block, cut).map_err(H2Error::Hpack)? {
        if name.first() == Some(&b':') {
            pseudo.push(match &name[..] {
                b":method" => 'm',
                b":authority" => 'a',
                b":scheme" => 's',
                b":path" => 'p',
                _ => '?',
            });
        } else {
            names.push(String::from_utf8_lossy(&name).into_owned());
        }
    }
    Ok((pseudo, names))
}

/// Parses a whole connection opening in one piece.
pub fn parse(bytes: &[u8]) -> Result<H2Fingerprint, H2Error> {
    let mut parser = H2PrefaceParser::new();
    match parser.feed(bytes) {
        Progress::Complete { .. } => parser.into_fingerprint().ok_or(H2Error::Truncated),
        Progress::NeedMore => Err(H2Error::Truncated),
        Progress::Failed(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A Chromium-like opening with literal (non-Huffman) header names.
    fn opening() -> Vec<u8> {
        let mut b = chromium_settings();
        // :method GET (static 2), :authority (name 1) "x", :scheme https
        // (static 7), :path / (static 4), then a literal "user-agent: a".
        let mut block = vec![0x82, 0x41, 0x01, b'x', 0x87, 0x84];
        block.extend_from_slice(&[0x00, 0x0a]);
        block.extend_from_slice(b"user-agent");
        block.extend_from_slice(&[0x01, b'a']);
        // PRIORITY flag: exclusive, depends on 0, weight 256.
        let mut payload = vec![0x80, 0, 0, 0, 255];
        payload.extend_from_slice(&block);
        b.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_PRIORITY | 0x1,
            1,
            &payload,
        ));
        b
    }

    /// The preface, Chromium's SETTINGS and its WINDOW_UPDATE.
    fn chromium_settings() -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        let mut settings = Vec::new();
        for (id, v) in [(1u16, 65536u32), (2, 0), (4, 6291456), (6, 262144)] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&v.to_be_bytes());
        }
        b.extend(frame(FRAME_SETTINGS, 0, 0, &settings));
        b.extend(frame(FRAME_WINDOW_UPDATE, 0, 0, &15663105u32.to_be_bytes()));
        b
    }

    #[test]
    fn chromium_like_opening() {
        let fp = parse(&opening()).unwrap();
        assert_eq!(
            fp.akamai(),
            "1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p"
        );
        assert_eq!(
            fp.headers_priority,
            Some(Priority {
                stream_id: 1,
                exclusive: true,
                depends_on: 0,
                weight: 256
            })
        );
        assert_eq!(fp.header_order, ["user-agent"]);
    }

    #[test]
    fn byte_by_byte_equals_one_piece() {
        let bytes = opening();
        let mut p = H2PrefaceParser::new();
        let mut done_at = None;
        for (i, b) in bytes.iter().enumerate() {
            match p.feed(std::slice::from_ref(b)) {
                Progress::NeedMore => {}
                Progress::Complete { consumed } => {
                    assert_eq!(consumed, 1);
                    done_at = Some(i);
                    break;
                }
                Progress::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(done_at, Some(bytes.len() - 1));
        assert_eq!(p.fingerprint(), Some(&parse(&bytes).unwrap()));
        assert_eq!(p.feed(b"more"), Progress::Complete { consumed: 0 });
    }

    #[test]
    fn consumed_stops_at_the_header_block() {
        let mut bytes = opening();
        let len = bytes.len();
        bytes.extend_from_slice(b"DATA AFTER");
        let mut p = H2PrefaceParser::new();
        assert_eq!(p.feed(&bytes), Progress::Complete { consumed: len });
    }

    #[test]
    fn continuation_padding_and_priority_frames() {
        let mut b = PREFACE.to_vec();
        b.extend(frame(FRAME_SETTINGS, 0, 0, &[0, 4, 0, 2, 0, 0]));
        b.extend(frame(FRAME_PRIORITY, 0, 3, &[0, 0, 0, 0, 200]));
        b.extend(frame(FRAME_PRIORITY, 0, 9, &[0x80, 0, 0, 7, 0]));
        b.extend(frame(6, 0, 0, &[0; 8])); // PING: skipped
                                           // HEADERS, padded (2 bytes), split before :path.
        b.extend(frame(
            FRAME_HEADERS,
            FLAG_PADDED,
            13,
            &[2, 0x82, 0x87, 0, 0],
        ));
        b.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 13, &[0x84]));
        let fp = parse(&b).unwrap();
        assert_eq!(fp.akamai(), "4:131072|00|3:0:0:201,9:1:7:1|m,s,p");
    }

    /// The opening's settings and window, then a first request whose
    /// `cookie` literal makes its header block `cookie_len` bytes long or
    /// more, sent in HEADERS and CONTINUATION frames of at most
    /// `frame_len` bytes. Its names: `user-agent`, `cookie`, `accept`.
    fn opening_with_cookie(cookie_len: usize, frame_len: usize, headers_flags: u8) -> Vec<u8> {
        let mut b = chromium_settings();
        let mut block = vec![0x82, 0x41, 0x01, b'x', 0x87, 0x84, 0x00, 0x0a];
        block.extend_from_slice(b"user-agent");
        block.extend_from_slice(&[0x01, b'a']);
        block.extend(cookie_field(cookie_len));
        block.push(0x93); // accept (static 19)
        let mut prefix = Vec::new();
        if headers_flags & FLAG_PADDED != 0 {
            prefix.push(3);
        }
        if headers_flags & FLAG_PRIORITY != 0 {
            prefix.extend_from_slice(&[0x80, 0, 0, 0, 255]);
        }
        let mut chunks = block.chunks(frame_len).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let end = if chunks.peek().is_none() {
                FLAG_END_HEADERS
            } else {
                0
            };
            if first {
                let mut payload = prefix.clone();
                payload.extend_from_slice(chunk);
                if headers_flags & FLAG_PADDED != 0 {
                    payload.extend_from_slice(&[0, 0, 0]);
                }
                b.extend(frame(FRAME_HEADERS, headers_flags | end, 1, &payload));
                first = false;
            } else {
                b.extend(frame(FRAME_CONTINUATION, end, 1, chunk));
            }
        }
        b
    }

    /// `cookie` (static 32), literal without indexing, with a value of
    /// `len` bytes (at least 255).
    fn cookie_field(len: usize) -> Vec<u8> {
        let mut field = vec![0x0f, 0x11, 0x7f];
        let mut rest = len - 127;
        while rest >= 128 {
            field.push(0x80 | (rest % 128) as u8);
            rest /= 128;
        }
        field.push(rest as u8);
        field.extend(std::iter::repeat_n(b'c', len));
        field
    }

    #[test]
    fn a_first_request_past_the_limit_keeps_its_opening() {
        const CHROME: &str = "1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p";
        // Under the limit, every name; past it, the names read whole before
        // it, over CONTINUATION frames (h2's default 16 KiB frames) or in
        // one HEADERS frame (a peer that allowed larger frames), padded and
        // with priority fields or not.
        for (cookie_len, frame_len, flags, names) in [
            (1000, 16384, 0, &["user-agent", "cookie", "accept"][..]),
            (70_000, 16384, 0, &["user-agent"][..]),
            (70_000, 100_000, 0, &["user-agent"][..]),
            (
                70_000,
                100_000,
                FLAG_PADDED | FLAG_PRIORITY,
                &["user-agent"][..],
            ),
            (70_000, 16384, FLAG_PRIORITY, &["user-agent"][..]),
        ] {
            let bytes = opening_with_cookie(cookie_len, frame_len, flags);
            let fp = parse(&bytes).unwrap();
            assert_eq!(fp.akamai(), CHROME, "{cookie_len} {frame_len} {flags}");
            assert_eq!(fp.header_order, names, "{cookie_len} {frame_len} {flags}");
            assert_eq!(
                fp.headers_priority.is_some(),
                flags & FLAG_PRIORITY != 0,
                "{cookie_len} {frame_len} {flags}"
            );
            // Read in pieces, the same, with nothing read past the limit.
            let mut p = H2PrefaceParser::new();
            let mut fed = 0;
            for piece in bytes.chunks(1000) {
                match p.feed(piece) {
                    Progress::NeedMore => fed += piece.len(),
                    Progress::Complete { consumed } => {
                        fed += consumed;
                        break;
                    }
                    Progress::Failed(e) => panic!("{e}"),
                }
            }
            assert_eq!(p.fingerprint(), Some(&fp));
            assert!(fed <= MAX_PREFACE_LEN, "{fed}");
        }
        // A CONTINUATION whose header would cross the limit ends the block.
        let mut b = PREFACE.to_vec();
        b.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        let ping = frame(6, 0, 0, &[0; 991]);
        while b.len() + ping.len() < MAX_PREFACE_LEN - 2000 {
            b.extend_from_slice(&ping);
        }
        // The HEADERS frame ends 5 bytes before the limit.
        let payload_len = MAX_PREFACE_LEN - 5 - FRAME_HEADER_LEN - b.len();
        let mut headers = vec![0x82, 0x87, 0x84];
        headers.extend(cookie_field(payload_len - 3 - 5));
        assert_eq!(headers.len(), payload_len);
        b.extend(frame(FRAME_HEADERS, 0, 1, &headers));
        b.extend(frame(
            FRAME_CONTINUATION,
            FLAG_END_HEADERS,
            1,
            &[0x01, b'v'],
        ));
        assert_eq!(parse(&b).unwrap().pseudo_order, ['m', 's', 'p']);
    }

    #[test]
    fn a_first_request_with_many_fields_keeps_its_opening() {
        let mut b = chromium_settings();
        let mut block = vec![0x82, 0x41, 0x01, b'x', 0x87, 0x84];
        block.extend(std::iter::repeat_n(0x93, 300)); // accept, 300 times
        b.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
        let fp = parse(&b).unwrap();
        assert_eq!(
            fp.akamai(),
            "1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p"
        );
        assert_eq!(fp.header_order.len(), 256 - 4);
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(H2Error::BadPreface));
        assert_eq!(parse(&PREFACE[..10]), Err(H2Error::Truncated));
        let mut p = PREFACE.to_vec();
        p.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0x82]));
        assert!(matches!(parse(&p), Err(H2Error::Malformed(_))));
        // A frame that cannot end within the limit is refused at its header.
        let mut p = PREFACE.to_vec();
        p.extend_from_slice(&[0xff, 0xff, 0xff, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
        assert_eq!(parse(&p), Err(H2Error::TooLarge));
        // Endless skippable frames hit the limit.
        let mut p = PREFACE.to_vec();
        p.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        for _ in 0..(MAX_PREFACE_LEN / 1000 + 1) {
            p.extend(frame(6, 0, 0, &[0; 991]));
        }
        assert_eq!(parse(&p), Err(H2Error::TooLarge));
        // A block cut inside a pseudo-header (a 70 KB `:path`).
        let mut p = PREFACE.to_vec();
        p.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        let mut block = vec![0x82, 0x41, 0x01, b'x', 0x87, 0x04, 0x7f, 0x80, 0x80, 0x04];
        block.extend(std::iter::repeat_n(b'/', 70_000));
        p.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert_eq!(parse(&p), Err(H2Error::TooLarge));
        // A block cut at the limit with no whole field in it.
        let mut p = PREFACE.to_vec();
        p.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        let mut block = vec![0x00, 0x7f, 0x80, 0x80, 0x04];
        block.extend(std::iter::repeat_n(b'n', 70_000));
        p.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert_eq!(parse(&p), Err(H2Error::TooLarge));
        // CONTINUATION interrupted by another frame.
        let mut p = PREFACE.to_vec();
        p.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        p.extend(frame(FRAME_HEADERS, 0, 1, &[0x82]));
        p.extend(frame(FRAME_PRIORITY, 0, 3, &[0, 0, 0, 0, 1]));
        assert!(matches!(parse(&p), Err(H2Error::Malformed(_))));
        // Bad HPACK.
        let mut p = PREFACE.to_vec();
        p.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        p.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0xff]));
        assert!(matches!(parse(&p), Err(H2Error::Hpack(_))));
    }
}
