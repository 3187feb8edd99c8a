//! A bounds-checked cursor over a byte slice.
//!
//! Input: any byte slice. Output: big-endian integers and sub-slices, each
//! `None` when the slice has too few bytes left. Invariant: a failed read
//! consumes nothing, and no read can panic, whatever length the wire claims.

/// Reads big-endian integers and length-prefixed vectors off a slice.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    /// True when every byte has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Everything not read yet.
    pub(crate) fn rest(self) -> &'a [u8] {
        self.rest
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let head = self.take(N)?;
        head.try_into().ok()
    }

    /// One byte.
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    /// A big-endian `u16`.
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array::<2>().map(u16::from_be_bytes)
    }

    /// A big-endian 24-bit integer.
    pub(crate) fn u24(&mut self) -> Option<u32> {
        self.array::<3>()
            .map(|[a, b, c]| u32::from_be_bytes([0, a, b, c]))
    }

    /// A big-endian `u32`.
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array::<4>().map(u32::from_be_bytes)
    }

    /// A vector with a one-byte length prefix (TLS `opaque x<0..2^8-1>`).
    pub(crate) fn vec_u8(&mut self) -> Option<&'a [u8]> {
        let saved = *self;
        let len = self.u8()?;
        let body = self.take(usize::from(len));
        if body.is_none() {
            *self = saved;
        }
        body
    }

    /// A vector with a two-byte length prefix (TLS `opaque x<0..2^16-1>`).
    pub(crate) fn vec_u16(&mut self) -> Option<&'a [u8]> {
        let saved = *self;
        let len = self.u16()?;
        let body = self.take(usize::from(len));
        if body.is_none() {
            *self = saved;
        }
        body
    }
}

/// The `u16` values of a list of big-endian pairs; `None` when the length is
/// odd.
pub(crate) fn u16_list(bytes: &[u8]) -> Option<Vec<u16>> {
    let pairs = bytes.chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    Some(
        pairs
            .filter_map(|pair| pair.try_into().ok().map(u16::from_be_bytes))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_refuses_short_input() {
        let mut r = Reader::new(&[0x01, 0x02, 0x03, 0x00, 0x05, 0xaa]);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u8(), Some(0x03));
        // Claims 5 bytes, has 1: nothing is consumed.
        assert_eq!(r.vec_u16(), None);
        assert_eq!(r.u24(), Some(0x0005aa));
        assert!(r.is_empty());
        assert_eq!(r.u8(), None);
        assert_eq!(u16_list(&[1, 2, 3]), None);
        assert_eq!(u16_list(&[1, 2, 3, 4]), Some(vec![0x0102, 0x0304]));
    }
}
