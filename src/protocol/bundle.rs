//! Prekey bundles: what a device publishes to an untrusted directory so that
//! others can start sessions with it while it is offline.
//!
//! ```text
//! bundle = 0x01 || IK (32) || spk_id (4) || spk_created (8) || spk_public (32)
//!          || spk_signature (64) || has_opk (1) || [opk_id (4) || opk_public (32)]
//! ```
//!
//! A sender must not trust a bundle it fetched: [`PrekeyBundle::verify`]
//! checks the signed prekey's signature (`verify_strict`) and its age against
//! a [`FreshnessPolicy`], and only a [`VerifiedBundle`] can start a session.

use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::protocol::keys::{
    spk_signed_message, IdentityKey, IdentityKeyPair, OneTimePrekey, SignedPrekey,
};
use crate::protocol::time::check_timestamp;
use crate::protocol::wire::{Reader, VERSION};

/// Encoded length of a bundle without a one-time prekey.
pub const BUNDLE_LEN_WITHOUT_OPK: usize = 1 + 32 + 4 + 8 + 32 + 64 + 1;
/// Encoded length of a bundle with a one-time prekey.
pub const BUNDLE_LEN_WITH_OPK: usize = BUNDLE_LEN_WITHOUT_OPK + 4 + 32;

/// How old a signed prekey may be before a sender refuses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreshnessPolicy {
    /// Maximum age in seconds: a bundle is stale iff `now - created > max_age`.
    /// A creation time in the future is accepted.
    pub max_age: u64,
}

impl FreshnessPolicy {
    /// 30 days, a little more than the suggested rotation period of a week
    /// plus a generous grace period.
    pub const DEFAULT_MAX_AGE: u64 = 30 * 24 * 60 * 60;

    /// A policy with the given maximum age in seconds.
    pub fn max_age(seconds: u64) -> Self {
        FreshnessPolicy { max_age: seconds }
    }
}

impl Default for FreshnessPolicy {
    fn default() -> Self {
        FreshnessPolicy {
            max_age: Self::DEFAULT_MAX_AGE,
        }
    }
}

/// A decoded, not yet verified, prekey bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeyBundle {
    identity: IdentityKey,
    signed_prekey_id: u32,
    signed_prekey_created: u64,
    signed_prekey: [u8; 32],
    signature: [u8; 64],
    one_time_prekey: Option<(u32, [u8; 32])>,
}

impl PrekeyBundle {
    /// Builds the owner's bundle from its identity, current signed prekey and
    /// optionally one one-time prekey.
    pub fn new(
        identity: &IdentityKeyPair,
        signed_prekey: &SignedPrekey,
        one_time_prekey: Option<&OneTimePrekey>,
    ) -> Self {
        PrekeyBundle {
            identity: *identity.public(),
            signed_prekey_id: signed_prekey.id(),
            signed_prekey_created: signed_prekey.created(),
            signed_prekey: *signed_prekey.public(),
            signature: *signed_prekey.signature(),
            one_time_prekey: one_time_prekey.map(|k| (k.id(), *k.public())),
        }
    }

    /// Decodes a bundle from untrusted bytes. Checks, in the profile's order,
    /// the whole structure (trailing bytes included) and then the identity
    /// key. The signature and freshness are checked by [`Self::verify`].
    ///
    /// # Errors
    /// [`Error::Decode`] for malformed bytes, [`Error::InvalidKey`] for an
    /// invalid identity key.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        if r.u8("bundle version")? != VERSION {
            return Err(Error::Decode("bundle version"));
        }
        let identity: [u8; 32] = r.array("bundle identity key")?;
        let signed_prekey_id = r.u32("bundle signed prekey id")?;
        let signed_prekey_created = r.u64("bundle signed prekey created")?;
        let signed_prekey = r.array("bundle signed prekey")?;
        let signature = r.array("bundle signature")?;
        let one_time_prekey = if r.bool("bundle has_opk")? {
            Some((
                r.u32("bundle one-time prekey id")?,
                r.array("bundle one-time prekey")?,
            ))
        } else {
            None
        };
        r.finish("bundle trailing bytes")?;
        Ok(PrekeyBundle {
            identity: IdentityKey::from_array(&identity)?,
            signed_prekey_id,
            signed_prekey_created,
            signed_prekey,
            signature,
            one_time_prekey,
        })
    }

    /// The wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BUNDLE_LEN_WITH_OPK);
        out.push(VERSION);
        out.extend_from_slice(self.identity.as_bytes());
        out.extend_from_slice(&self.signed_prekey_id.to_be_bytes());
        out.extend_from_slice(&self.signed_prekey_created.to_be_bytes());
        out.extend_from_slice(&self.signed_prekey);
        out.extend_from_slice(&self.signature);
        match &self.one_time_prekey {
            Some((id, key)) => {
                out.push(1);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(key);
            }
            None => out.push(0),
        }
        out
    }

    /// Verifies the signed prekey's signature (strict Ed25519) and then its
    /// freshness at time `now` (unix seconds).
    ///
    /// In order: `now` is checked first (it is the caller's argument, not
    /// the bundle's); then the signature; then the signed creation time
    /// must be at most [`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP) (a bundle
    /// signed with a millisecond clock would otherwise never go stale);
    /// then freshness.
    ///
    /// # Errors
    /// [`Error::TimeOutOfRange`] if `now` or the bundle's creation time is
    /// above [`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP); [`Error::Signature`]
    /// or [`Error::StaleBundle`].
    pub fn verify(self, now: u64, policy: FreshnessPolicy) -> Result<VerifiedBundle> {
        check_timestamp(now)?;
        let message = spk_signed_message(
            self.signed_prekey_id,
            self.signed_prekey_created,
            &self.signed_prekey,
        );
        self.identity.verify_strict(&message, &self.signature)?;
        check_timestamp(self.signed_prekey_created)?;
        if now.saturating_sub(self.signed_prekey_created) > policy.max_age {
            return Err(Error::StaleBundle);
        }
        Ok(VerifiedBundle(self))
    }

    /// The owner's identity key.
    pub fn identity(&self) -> &IdentityKey {
        &self.identity
    }
    /// Id of the signed prekey.
    pub fn signed_prekey_id(&self) -> u32 {
        self.signed_prekey_id
    }
    /// Creation time of the signed prekey (unix seconds).
    pub fn signed_prekey_created(&self) -> u64 {
        self.signed_prekey_created
    }
    /// The signed prekey's X25519 public key.
    pub fn signed_prekey(&self) -> &[u8; 32] {
        &self.signed_prekey
    }
    /// The signature over the signed prekey.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }
    /// The one-time prekey (id, X25519 public key), if the bundle has one.
    pub fn one_time_prekey(&self) -> Option<(u32, &[u8; 32])> {
        self.one_time_prekey.as_ref().map(|(id, k)| (*id, k))
    }
}

/// A bundle whose signature and freshness were checked: the only input from
/// which a session can be initiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBundle(PrekeyBundle);

impl core::ops::Deref for VerifiedBundle {
    type Target = PrekeyBundle;
    fn deref(&self) -> &PrekeyBundle {
        &self.0
    }
}
