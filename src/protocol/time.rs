//! The range of the times the protocol takes: unix seconds, checked.
//!
//! Every time the crate takes (the `now` of [`PrekeyBundle::verify`],
//! [`PrekeyStore::new`], [`PrekeyStore::rotate_signed_prekey`],
//! [`SignedPrekey::generate`], the creation time of
//! [`SignedPrekey::from_secret`], the cutoff of
//! [`PrekeyStore::forget_retired_before`], and the signed creation time
//! inside a bundle) is a `u64` count of **seconds** since the Unix epoch.
//! A clock in milliseconds or microseconds is a `u64` too, and without a
//! check it would be taken as a date tens of thousands of years ahead: a
//! bundle signed with it would never go stale. So each of those functions
//! first checks the time with [`check_timestamp`] and refuses anything above
//! [`MAX_TIMESTAMP`] with [`Error::TimeOutOfRange`].
//!
//! [`PrekeyBundle::verify`]: crate::PrekeyBundle::verify
//! [`PrekeyStore::new`]: crate::PrekeyStore::new
//! [`PrekeyStore::rotate_signed_prekey`]: crate::PrekeyStore::rotate_signed_prekey
//! [`PrekeyStore::forget_retired_before`]: crate::PrekeyStore::forget_retired_before
//! [`SignedPrekey::generate`]: crate::SignedPrekey::generate
//! [`SignedPrekey::from_secret`]: crate::SignedPrekey::from_secret

use crate::error::{Error, Result};

/// The largest time the crate accepts: 2^34 - 1 = 17,179,869,183 unix
/// seconds, which is 2514-05-30 01:53:03 UTC.
///
/// Why this bound: a clock in seconds stays below it for the next five
/// centuries, while a clock in milliseconds passed it 199 days after the
/// epoch (2^34 ms is 1970-07-19), and one in microseconds or nanoseconds
/// even earlier. So every seconds clock of a working device is accepted and
/// every millisecond (or finer) clock since 1971 is refused; the range
/// `0..=MAX_TIMESTAMP` itself is accepted in full (a device whose clock
/// reads 0, never set, is not a unit error; freshness deals with it).
pub const MAX_TIMESTAMP: u64 = (1 << 34) - 1;

/// Checks that `time` is in unix seconds: returns it if it is at most
/// [`MAX_TIMESTAMP`].
///
/// The protocol core calls it on every time it takes; the client and relay
/// layers (and applications with their own clock) can call it on their
/// clock reading once, to fail early with the same error.
///
/// ```
/// use cubbyhole::{check_timestamp, Error, MAX_TIMESTAMP};
/// assert_eq!(check_timestamp(1_700_000_000), Ok(1_700_000_000));
/// assert_eq!(check_timestamp(MAX_TIMESTAMP), Ok(MAX_TIMESTAMP));
/// // The same instant read from a millisecond clock:
/// assert_eq!(check_timestamp(1_700_000_000_000), Err(Error::TimeOutOfRange));
/// ```
///
/// # Errors
/// [`Error::TimeOutOfRange`] if `time > MAX_TIMESTAMP`.
pub fn check_timestamp(time: u64) -> Result<u64> {
    if time > MAX_TIMESTAMP {
        return Err(Error::TimeOutOfRange);
    }
    Ok(time)
}
