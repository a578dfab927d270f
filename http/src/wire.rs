//! What the client and the relay server share of the HTTP API's syntax
//! (`relay/API.md`): the query of a fetch and the decimal numbers of paths
//! and queries. The binary bodies (uploads, proofs, envelopes,
//! acknowledgements) are the protocol crate's
//! [`cubbyhole::transport`] encodings.
//!
//! ```text
//! fetch query = "limit=" decimal [ "&wait_ms=" decimal ]
//!               (as encoded; FetchQuery::decode also takes any order,
//!               repeats and other keys)
//! decimal     = 1 to 10 ASCII digits, at most u32::MAX
//!
//! device-lists query  = "after=" decimal64
//!               (as encoded; DeviceListQuery::decode also takes repeats
//!               and other keys)
//! decimal64   = 1 to 20 ASCII digits, at most u64::MAX
//! device lists answer = *( length (4, u32 big-endian) || signed list )
//!               (at most DEVICE_LIST_RETENTION lists, each at most
//!               MAX_SIGNED_DEVICE_LIST_BYTES)
//! ```
//!
//! Both decoders are total: any input gives a value or a typed error, never
//! a panic, and they allocate nothing.

use std::fmt::Write;

use cubbyhole::protocol::devices::MAX_DEVICES;
use cubbyhole::transport::{TransportError, DEVICE_LIST_RETENTION};

/// The request header carrying a deposit's access key (32 lowercase hex
/// digits; SPEC.md 16.10, relay/API.md).
pub const ACCESS_HEADER: &str = "cubbyhole-access";
/// The request header carrying a deposit's stamp (32 lowercase hex digits:
/// epoch and nonce, SPEC.md 16.11).
pub const STAMP_HEADER: &str = "cubbyhole-stamp";

/// The largest signed device list (SPEC.md 25.3, 25.10): 74 bytes of body
/// header, 36 per device, the signature count, 65 per signature, with
/// [`MAX_DEVICES`] devices all signing: 1691 bytes. The relay's body limit
/// for `PUT /v1/accounts/{account}/devices`.
pub const MAX_SIGNED_DEVICE_LIST_BYTES: usize = 74 + 36 * MAX_DEVICES + 1 + 65 * MAX_DEVICES;

/// Parses a decimal `u32` as the relay's HTTP API writes one (in paths and
/// queries): 1 to 10 ASCII digits, no sign, no spaces, at most
/// `u32::MAX`. Leading zeros are accepted (`"007"` is 7).
pub fn parse_decimal_u32(value: &str) -> Option<u32> {
    let digits =
        !value.is_empty() && value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| value.parse::<u32>().ok()).flatten()
}

/// The query of a fetch request: `limit` (default
/// [`FetchQuery::DEFAULT_LIMIT`]) and `wait_ms` (default 0, no waiting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchQuery {
    /// Most envelopes to return (the relay caps it further).
    pub limit: u32,
    /// How long to wait for an envelope when none is pending
    /// (milliseconds; the relay caps it).
    pub wait_ms: u32,
}

impl Default for FetchQuery {
    fn default() -> Self {
        FetchQuery {
            limit: Self::DEFAULT_LIMIT,
            wait_ms: 0,
        }
    }
}

impl FetchQuery {
    /// The `limit` of a query that names none.
    pub const DEFAULT_LIMIT: u32 = 100;

    /// The query string, without the `?`: `limit=N`, followed by
    /// `&wait_ms=M` when `wait_ms` is not 0.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(32);
        let _ = write!(out, "limit={}", self.limit);
        if self.wait_ms > 0 {
            let _ = write!(out, "&wait_ms={}", self.wait_ms);
        }
        out
    }

    /// Parses a query string (without the `?`): `&`-separated `key=value`
    /// pairs; `limit` and `wait_ms` are decimal `u32`s
    /// ([`parse_decimal_u32`]; the last occurrence counts), other keys and
    /// empty pairs are ignored, a key without `=` has an empty value.
    ///
    /// # Errors
    /// [`TransportError::BadRequest`] naming the parameter whose value is
    /// not a decimal `u32`.
    pub fn decode(query: &str) -> Result<Self, TransportError> {
        let mut out = FetchQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "limit" => {
                    out.limit = parse_decimal_u32(value)
                        .ok_or(TransportError::BadRequest("limit: expected a decimal u32"))?;
                }
                "wait_ms" => {
                    out.wait_ms = parse_decimal_u32(value).ok_or(TransportError::BadRequest(
                        "wait_ms: expected a decimal u32",
                    ))?;
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Parses a decimal `u64` as the relay's HTTP API writes one: 1 to 20
/// ASCII digits, no sign, no spaces, at most `u64::MAX`. Leading zeros are
/// accepted.
pub fn parse_decimal_u64(value: &str) -> Option<u64> {
    let digits =
        !value.is_empty() && value.len() <= 20 && value.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| value.parse::<u64>().ok()).flatten()
}

/// The query of `GET /v1/accounts/{account}/devices`: the lists with a
/// version above `after` (default 0: every retained list).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceListQuery {
    /// Only versions above this one.
    pub after: u64,
}

impl DeviceListQuery {
    /// The query string, without the `?`: `after=N`.
    pub fn encode(&self) -> String {
        format!("after={}", self.after)
    }

    /// Parses a query string (without the `?`): `&`-separated `key=value`
    /// pairs; `after` is a decimal `u64` ([`parse_decimal_u64`]; the last
    /// occurrence counts), other keys and empty pairs are ignored.
    ///
    /// # Errors
    /// [`TransportError::BadRequest`] if `after` is not a decimal `u64`.
    pub fn decode(query: &str) -> Result<Self, TransportError> {
        let mut out = DeviceListQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "after" {
                out.after = parse_decimal_u64(value)
                    .ok_or(TransportError::BadRequest("after: expected a decimal u64"))?;
            }
        }
        Ok(out)
    }
}

/// The answer of `GET /v1/accounts/{account}/devices`: each list as
/// `length (4, u32 big-endian) || signed list`, in the given order.
pub fn encode_device_lists(lists: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lists.iter().map(|l| 4 + l.len()).sum());
    for list in lists {
        // A stored list is at most MAX_SIGNED_DEVICE_LIST_BYTES.
        out.extend_from_slice(&u32::try_from(list.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(list);
    }
    out
}

/// Splits a device-lists answer ([`encode_device_lists`]). The lists are
/// not decoded (the caller verifies them).
///
/// # Errors
/// [`TransportError::Unavailable`] (`"malformed relay answer"`) for a
/// truncated answer, a length of 0 or above
/// [`MAX_SIGNED_DEVICE_LIST_BYTES`], or more than
/// [`DEVICE_LIST_RETENTION`] lists.
pub fn decode_device_lists(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, TransportError> {
    let malformed = TransportError::Unavailable("malformed relay answer");
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (length, rest) = bytes.split_at_checked(4).ok_or(malformed.clone())?;
        let length = u32::from_be_bytes(length.try_into().map_err(|_| malformed.clone())?);
        let length = usize::try_from(length).map_err(|_| malformed.clone())?;
        if length == 0
            || length > MAX_SIGNED_DEVICE_LIST_BYTES
            || out.len() >= DEVICE_LIST_RETENTION
        {
            return Err(malformed);
        }
        let (list, rest) = rest.split_at_checked(length).ok_or(malformed.clone())?;
        out.push(list.to_vec());
        bytes = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_one_to_ten_digits_within_u32() {
        assert_eq!(parse_decimal_u32("0"), Some(0));
        assert_eq!(parse_decimal_u32("0000000042"), Some(42));
        assert_eq!(parse_decimal_u32("4294967295"), Some(u32::MAX));
        for bad in [
            "",
            "4294967296",
            "00000000001",
            "+1",
            "-1",
            " 1",
            "1 ",
            "0x1",
        ] {
            assert_eq!(parse_decimal_u32(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fetch_queries_leave_out_a_zero_wait() {
        let query = |limit, wait_ms| FetchQuery { limit, wait_ms };
        assert_eq!(query(5, 0).encode(), "limit=5");
        assert_eq!(query(5, 1).encode(), "limit=5&wait_ms=1");
        assert_eq!(FetchQuery::decode("limit=5"), Ok(query(5, 0)));
    }

    #[test]
    fn fetch_queries_take_any_order_repeats_and_other_keys() {
        let query = |limit, wait_ms| FetchQuery { limit, wait_ms };
        assert_eq!(FetchQuery::decode(""), Ok(query(100, 0)));
        assert_eq!(
            FetchQuery::decode("wait_ms=5&limit=7&x=y&&"),
            Ok(query(7, 5))
        );
        assert_eq!(FetchQuery::decode("limit=1&limit=2"), Ok(query(2, 0)));
        for bad in ["limit=", "wait_ms", "limit=-1", "wait_ms=4294967296"] {
            assert!(
                matches!(FetchQuery::decode(bad), Err(TransportError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_largest_list_is_1691_bytes() {
        // SPEC.md 25.10: 74 + 36 * 16 + 1 + 65 * 16.
        assert_eq!(MAX_SIGNED_DEVICE_LIST_BYTES, 1691);
    }

    #[test]
    fn device_list_queries() {
        assert_eq!(DeviceListQuery { after: 7 }.encode(), "after=7");
        assert_eq!(
            DeviceListQuery::decode(""),
            Ok(DeviceListQuery { after: 0 })
        );
        assert_eq!(
            DeviceListQuery::decode("x=1&after=3&after=18446744073709551615"),
            Ok(DeviceListQuery { after: u64::MAX })
        );
        for bad in [
            "after=",
            "after",
            "after=-1",
            "after=18446744073709551616",
            "after=1e3",
        ] {
            assert!(
                matches!(
                    DeviceListQuery::decode(bad),
                    Err(TransportError::BadRequest(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn device_list_answers_round_trip_and_refuse_malformed_ones() {
        let lists = vec![vec![1u8; 3], vec![2u8; MAX_SIGNED_DEVICE_LIST_BYTES]];
        let bytes = encode_device_lists(&lists);
        assert_eq!(&bytes[..4], &[0, 0, 0, 3]);
        assert_eq!(decode_device_lists(&bytes).unwrap(), lists);
        assert_eq!(decode_device_lists(&[]).unwrap(), Vec::<Vec<u8>>::new());
        assert!(decode_device_lists(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_device_lists(&[0, 0, 0]).is_err());
        assert!(decode_device_lists(&[0, 0, 0, 0]).is_err());
        let too_long = encode_device_lists(&[vec![0; MAX_SIGNED_DEVICE_LIST_BYTES + 1]]);
        assert!(decode_device_lists(&too_long).is_err());
        let too_many = encode_device_lists(&vec![vec![0]; DEVICE_LIST_RETENTION + 1]);
        assert!(decode_device_lists(&too_many).is_err());
        let most = encode_device_lists(&vec![vec![0]; DEVICE_LIST_RETENTION]);
        assert_eq!(
            decode_device_lists(&most).unwrap().len(),
            DEVICE_LIST_RETENTION
        );
    }
}
