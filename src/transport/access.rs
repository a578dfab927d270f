//! Deposit access keys and deposit passes (SPEC.md 16.10).
//!
//! A mailbox's owner draws a random [`AccessKey`] and registers only its
//! verifier with the relay (in its signed directory upload):
//!
//! ```text
//! verifier = SHA-256("cubbyhole/v1 deposit access" || mailbox (32) || key (16))
//! ```
//!
//! It hands the key itself to its contacts inside the encrypted session
//! (every frame it sends carries it, with its epoch). A deposit that shows a
//! key whose verifier is the mailbox's (or the previous one, for a grace
//! period after a rotation) goes to the mailbox's contacts' share, which
//! strangers cannot fill; every contact shows the same key, so the relay
//! learns that a deposit comes from *some* contact, never which one. A
//! deposit without a valid key must carry a [`Stamp`] (a proof of work,
//! [`super::stamp`]) and goes to the small strangers' share. Rotating the
//! key (a new one, with the epoch + 1, in one upload) shuts out whoever
//! holds only the old one once the grace period ends.

use core::fmt;

use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::stamp::Stamp;
use super::MailboxId;

/// The domain-separation label of an access key's verifier.
pub const ACCESS_VERIFIER_LABEL: &[u8] = b"cubbyhole/v1 deposit access";
/// The length of an [`AccessKey`].
pub const ACCESS_KEY_LEN: usize = 16;

/// A mailbox's deposit access key: a bearer secret its owner hands to its
/// contacts. Wiped when dropped; compared in constant time; its `Debug`
/// shows nothing of it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct AccessKey([u8; ACCESS_KEY_LEN]);

impl AccessKey {
    /// A fresh random key.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut key = AccessKey([0; ACCESS_KEY_LEN]);
        rng.fill_bytes(&mut key.0);
        key
    }

    /// The key from its bytes.
    pub fn from_bytes(bytes: [u8; ACCESS_KEY_LEN]) -> Self {
        AccessKey(bytes)
    }

    /// The key's bytes (to store it, put it in a frame or a request).
    pub fn as_bytes(&self) -> &[u8; ACCESS_KEY_LEN] {
        &self.0
    }

    /// The verifier the relay keeps for this key on `mailbox`:
    /// `SHA-256("cubbyhole/v1 deposit access" || mailbox || key)`.
    pub fn verifier(&self, mailbox: &MailboxId) -> AccessVerifier {
        let digest = Sha256::new()
            .chain_update(ACCESS_VERIFIER_LABEL)
            .chain_update(mailbox.0)
            .chain_update(self.0)
            .finalize();
        AccessVerifier(digest.into())
    }
}

impl PartialEq for AccessKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for AccessKey {}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessKey(..)")
    }
}

/// What the relay keeps of an access key: its verifier (a hash: it does
/// not give the key). Compared in constant time.
#[derive(Clone, Copy, Eq)]
pub struct AccessVerifier(pub [u8; 32]);

impl PartialEq for AccessVerifier {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl fmt::Debug for AccessVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessVerifier(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// What a deposit shows the relay to be admitted (SPEC.md 16.10): the
/// mailbox's access key, a stamp, both or neither. The relay tries the key
/// first; a deposit whose key is missing or not the mailbox's needs a
/// valid stamp (unless the relay's difficulty is 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DepositPass {
    /// The recipient mailbox's access key, if the sender holds one.
    pub access: Option<AccessKey>,
    /// A stamp on this deposit, if the sender minted one.
    pub stamp: Option<Stamp>,
}

impl DepositPass {
    /// No key, no stamp (admitted only by a relay that asks no work).
    pub const NONE: DepositPass = DepositPass {
        access: None,
        stamp: None,
    };

    /// A pass with an access key.
    pub fn with_access(key: AccessKey) -> Self {
        DepositPass {
            access: Some(key),
            stamp: None,
        }
    }

    /// A pass with a stamp.
    pub fn with_stamp(stamp: Stamp) -> Self {
        DepositPass {
            access: None,
            stamp: Some(stamp),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn verifier_is_the_documented_hash() {
        // Recomputed here from the definition, byte by byte.
        let key = AccessKey::from_bytes([0x11; 16]);
        let mailbox = MailboxId([0x22; 32]);
        let mut input = Vec::new();
        input.extend_from_slice(b"cubbyhole/v1 deposit access");
        input.extend_from_slice(&[0x22; 32]);
        input.extend_from_slice(&[0x11; 16]);
        let expected: [u8; 32] = Sha256::digest(&input).into();
        assert_eq!(key.verifier(&mailbox).0, expected);
        assert_ne!(key.verifier(&MailboxId([0x23; 32])), key.verifier(&mailbox));
    }

    #[test]
    fn debug_shows_no_key() {
        let key = AccessKey::from_bytes([0xab; 16]);
        assert_eq!(format!("{key:?}"), "AccessKey(..)");
        let pass = DepositPass::with_access(key);
        assert!(!format!("{pass:?}").contains("ab, ab") && !format!("{pass:?}").contains("171"));
    }
}
