//! Safety numbers: what two people compare out of band to check each
//! other's identity key.
//!
//! ```text
//! h = SHA-512("cubbyhole/v1 fingerprint" || IK); 5200 times h = SHA-512(h || IK)
//! fingerprint = first 30 bytes of h as six 5-byte big-endian integers,
//!               each mod 100000, as 5 zero-padded digits   (30 digits)
//! safety number = both fingerprints, numerically smaller first (60 digits)
//! ```
//!
//! Accounts (SPEC.md 25.8) have the same construction over the 32-byte
//! account id with the label `"cubbyhole/v1 account fingerprint"`:
//! [`Fingerprint::of_account`], [`SafetyNumber::for_accounts`].

use core::fmt;

use sha2::{Digest, Sha512};

use crate::protocol::devices::{AccountId, ACCOUNT_FINGERPRINT_LABEL};
use crate::protocol::keys::IdentityKey;

const LABEL: &[u8] = b"cubbyhole/v1 fingerprint";
const ITERATIONS: usize = 5200;

/// A 30-digit fingerprint of one identity key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint([u8; 30]);

impl Fingerprint {
    /// Computes the fingerprint of an identity key.
    pub fn of(identity: &IdentityKey) -> Self {
        Self::iterated(LABEL, identity.as_bytes())
    }

    /// Computes the fingerprint of an account id (label
    /// `"cubbyhole/v1 account fingerprint"`, SPEC.md 25.8).
    pub fn of_account(account: &AccountId) -> Self {
        Self::iterated(ACCOUNT_FINGERPRINT_LABEL, account.as_bytes())
    }

    /// `h = SHA-512(label || input)`, 5200 times `h = SHA-512(h || input)`,
    /// then the digits of the first 30 bytes.
    fn iterated(label: &[u8], input: &[u8; 32]) -> Self {
        let mut h: [u8; 64] = Sha512::new()
            .chain_update(label)
            .chain_update(input)
            .finalize()
            .into();
        for _ in 0..ITERATIONS {
            h = Sha512::new()
                .chain_update(h)
                .chain_update(input)
                .finalize()
                .into();
        }
        let mut digits = [0u8; 30];
        for (chunk, out) in h[..30].chunks_exact(5).zip(digits.chunks_exact_mut(5)) {
            let mut v = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)) % 100_000;
            for d in out.iter_mut().rev() {
                *d = b'0' + (v % 10) as u8;
                v /= 10;
            }
        }
        Fingerprint(digits)
    }

    /// The 30 ASCII digits.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.as_str())
    }
}

/// The 60-digit safety number two parties compare: both fingerprints, the
/// numerically smaller first, so both sides display the same digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SafetyNumber([u8; 60]);

impl SafetyNumber {
    /// The safety number of two identity keys (order does not matter).
    pub fn new(a: &IdentityKey, b: &IdentityKey) -> Self {
        Self::of_fingerprints(Fingerprint::of(a), Fingerprint::of(b))
    }

    /// The account safety number of two accounts (order does not matter,
    /// SPEC.md 25.8): it does not change when their devices change.
    pub fn for_accounts(a: &AccountId, b: &AccountId) -> Self {
        Self::of_fingerprints(Fingerprint::of_account(a), Fingerprint::of_account(b))
    }

    fn of_fingerprints(fa: Fingerprint, fb: Fingerprint) -> Self {
        // Equal-length digit strings compare numerically as bytes.
        let (lo, hi) = if fa <= fb { (fa, fb) } else { (fb, fa) };
        let mut out = [0u8; 60];
        out[..30].copy_from_slice(&lo.0);
        out[30..].copy_from_slice(&hi.0);
        SafetyNumber(out)
    }

    /// The 60 ASCII digits.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for SafetyNumber {
    /// Twelve groups of five digits, as people read them aloud.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, group) in self.0.chunks(5).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(core::str::from_utf8(group).unwrap_or(""))?;
        }
        Ok(())
    }
}

impl fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SafetyNumber({})", self.as_str())
    }
}
