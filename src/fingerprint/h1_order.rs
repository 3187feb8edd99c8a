//! Header order of an HTTP/1.1 request.
//!
//! Input: the raw bytes of a request head as read from the (decrypted)
//! client stream; bytes after the head are ignored. Output: the header names
//! in wire order with their original case (`User-Agent` vs `user-agent` tells
//! clients apart). Values are not returned: they may carry credentials.
//! Invariant: at most [`MAX_HEADERS`] headers are read; more is an error.

/// Most headers read from one request head.
pub const MAX_HEADERS: usize = 128;

/// Header names of the request head at the start of `head`, in order and
/// with their original case; `Ok(None)` while the head is incomplete.
pub fn header_names(head: &[u8]) -> Result<Option<Vec<String>>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(_) => Ok(Some(
            request.headers.iter().map(|h| h.name.to_owned()).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_case() {
        let head = b"GET / HTTP/1.1\r\nHost: x.example\r\nuser-agent: curl/7.88.1\r\nAccept: */*\r\n\r\nbody";
        assert_eq!(
            header_names(head).ok().flatten(),
            Some(vec![
                "Host".to_owned(),
                "user-agent".to_owned(),
                "Accept".to_owned()
            ])
        );
    }

    #[test]
    fn partial_and_garbage() {
        assert_eq!(header_names(b"GET / HTTP/1.1\r\nHost: x"), Ok(None));
        assert!(header_names(b"\x16\x03\x01\x00\x05hello\r\n\r\n").is_err());
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            header_names(many.as_bytes()),
            Err(httparse::Error::TooManyHeaders)
        );
    }
}
