//! How the Redis store's records are written and read: pin values, the
//! identity hash's fields, and the shapes of Redis replies; and how a
//! failure becomes a [`StoreError`] of the right kind.

use std::sync::Arc;

use redis::Value;

use crate::identity::{Identity, IdentityId, Pin};
use crate::store::{Binding, StoreError, StoreErrorKind};

/// A Redis error, by kind: connection trouble makes the store unreachable.
pub(super) fn redis_error(e: &redis::RedisError) -> StoreError {
    let kind = if is_connection_error(e) {
        StoreErrorKind::Unreachable
    } else {
        StoreErrorKind::Protocol
    };
    StoreError::new(kind, format!("redis: {e}"))
}

pub(super) fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// A record that cannot be decoded.
pub(super) fn corrupt(detail: impl std::fmt::Display) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, format!("redis: {detail}"))
}

/// An answer of the wrong shape.
pub(super) fn unexpected(detail: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Protocol, format!("redis: {detail}"))
}

/// A script's reply split (see `scripts`): the epoch, the sequence, the
/// script's own result, and this replica's write count where the script
/// answers it.
pub(super) struct GenerationReply {
    pub epoch: Option<String>,
    pub seq: u64,
    pub result: Value,
    pub writes: Option<u64>,
}

/// Splits a script's reply `{epoch, seq, result}` or `{epoch, seq,
/// result, writes}` (see `scripts`).
pub(super) fn generation_reply(reply: Value) -> Result<GenerationReply, StoreError> {
    let Value::Array(mut parts) = reply else {
        return Err(unexpected("a script answered without its generation"));
    };
    let writes = match parts.len() {
        3 => None,
        4 => match parts.pop() {
            Some(Value::Int(writes)) => Some(u64::try_from(writes).unwrap_or(0)),
            _ => {
                return Err(unexpected(
                    "a script answered a write count that is not a number",
                ))
            }
        },
        _ => return Err(unexpected("a script answered without its generation")),
    };
    let result = parts.pop().unwrap_or(Value::Nil);
    let seq = parts
        .pop()
        .as_ref()
        .and_then(bulk)
        .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let epoch = parts
        .pop()
        .as_ref()
        .and_then(bulk)
        .map(|b| String::from_utf8_lossy(b).into_owned());
    Ok(GenerationReply {
        epoch,
        seq,
        result,
        writes,
    })
}

/// A pin (its identity's id in 16 hex digits, then the record) and the
/// fields of its identity's hash.
pub(super) fn decode_binding(pin: &[u8], fields: &Value) -> Result<Binding, StoreError> {
    let (prefix, record) = pin
        .split_at_checked(16)
        .ok_or_else(|| corrupt("short pin record"))?;
    let pin: Pin = postcard::from_bytes(record).map_err(|e| corrupt(format!("pin: {e}")))?;
    let prefix = std::str::from_utf8(prefix).map_err(corrupt)?;
    if IdentityId(u64::from_str_radix(prefix, 16).map_err(corrupt)?) != pin.identity {
        return Err(corrupt("pin prefix and record disagree"));
    }
    let identity = decode_identity(fields)?;
    // The exit comes from the identity's record: one that names another
    // identity than the pin (a damaged or hand-edited key) decides nothing.
    if identity.as_ref().is_some_and(|i| i.id != pin.identity) {
        return Err(corrupt("the pin's identity and its record disagree"));
    }
    Ok(Binding {
        pin,
        identity: identity.map(Arc::new),
    })
}

/// An identity's egress address as a script argument: empty for none.
pub(super) fn encode_address(address: Option<std::net::IpAddr>) -> Vec<u8> {
    address
        .map(|ip| ip.to_string().into_bytes())
        .unwrap_or_default()
}

/// The value of a pin key: its identity's id in 16 hex digits, then the
/// record, so a script can find the identity without decoding.
pub(super) fn encode_pin(pin: &Pin) -> Result<Vec<u8>, StoreError> {
    let mut bytes = pin.identity.to_string().into_bytes();
    bytes.extend(postcard::to_stdvec(pin).map_err(corrupt)?);
    Ok(bytes)
}

/// The fields of `HGETALL` as (name, bytes) pairs.
fn hash_fields(value: &Value) -> Vec<(String, Vec<u8>)> {
    let items: &[Value] = match value {
        Value::Array(items) => items,
        Value::Map(pairs) => {
            return pairs
                .iter()
                .filter_map(|(k, v)| Some((bulk_text(k)?, bulk(v)?.to_vec())))
                .collect()
        }
        _ => return Vec::new(),
    };
    items
        .chunks(2)
        .filter_map(|pair| match pair {
            [k, v] => Some((bulk_text(k)?, bulk(v)?.to_vec())),
            _ => None,
        })
        .collect()
}

pub(super) fn bulk(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn bulk_text(value: &Value) -> Option<String> {
    bulk(value).map(|b| String::from_utf8_lossy(b).into_owned())
}

pub(super) fn decode_identity(fields: &Value) -> Result<Option<Identity>, StoreError> {
    let fields = hash_fields(fields);
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    };
    let Some(record) = get("rec") else {
        return Ok(None);
    };
    let mut identity = Identity::decode(record).map_err(|e| corrupt(format!("identity: {e}")))?;
    let number = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
    };
    if let Some(last) = get("last").and_then(number) {
        identity.last_used_ms = identity.last_used_ms.max(last);
    }
    if let Some(requests) = get("reqs").and_then(number) {
        identity.requests = requests;
    }
    identity.worked |= get("worked").is_some();
    // An address that does not read is no answer, never "none recorded"
    // (every tunnel would then be accepted).
    if let Some(egress) = get("egress") {
        let ip = std::str::from_utf8(egress)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| corrupt("identity: an egress address that does not read"))?;
        identity.egress_ip = Some(ip);
    }
    if let Some(retired) = get("retired") {
        identity.retired =
            Some(postcard::from_bytes(retired).map_err(|e| corrupt(format!("retirement: {e}")))?);
    }
    Ok(Some(identity))
}

/// The 16 bytes of a 32-hex-digit pin key.
pub(super) fn parse_hex16(hex: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    if hex.len() != 32 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;
    use crate::identity::{ExitId, SessionId};

    fn fields(egress: &[u8]) -> Value {
        let identity = Identity::new(
            ExitId::new("e1"),
            SessionId(1),
            5,
            Fingerprint::of_user_agent("agent"),
            5,
        );
        let record = postcard::to_stdvec(&identity).unwrap_or_default();
        Value::Array(vec![
            Value::BulkString(b"rec".to_vec()),
            Value::BulkString(record),
            Value::BulkString(b"egress".to_vec()),
            Value::BulkString(egress.to_vec()),
        ])
    }

    /// An egress address that does not read is an error: taken as none
    /// recorded, every tunnel of the identity would be accepted.
    #[test]
    fn an_unreadable_egress_address_is_corrupt_not_absent() {
        let read = decode_identity(&fields(b"127.0.0.2")).unwrap().unwrap();
        assert_eq!(read.egress_ip, Some(std::net::IpAddr::from([127, 0, 0, 2])));
        let error = decode_identity(&fields(b"127.0.0.300")).unwrap_err();
        assert_eq!(error.kind, StoreErrorKind::Corrupt, "{error}");
    }
}
