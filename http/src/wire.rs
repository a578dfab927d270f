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
//! ```
//!
//! Both decoders are total: any input gives a value or a typed error, never
//! a panic, and they allocate nothing.

use std::fmt::Write;

use cubbyhole::transport::TransportError;

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
}
