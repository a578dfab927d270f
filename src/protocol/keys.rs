//! Key types: identity keys (Ed25519 with an X25519 form), signed prekeys,
//! one-time prekeys and ratchet keys.
//!
//! Public key types validate on construction; private key types zeroize on
//! drop and never print their secret in `Debug`.

use alloc::boxed::Box;
use core::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha512};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::protocol::time::check_timestamp;

/// Prefix of the message an identity key signs for a signed prekey.
const SPK_SIGNATURE_LABEL: &[u8] = b"cubbyhole/v1 signed prekey";

/// Draws 32 bytes from `rng` and makes an X25519 secret of them (clamped on
/// use). Exactly 32 bytes are consumed, which keeps test vectors reproducible.
pub(crate) fn random_x25519(rng: &mut impl CryptoRngCore) -> StaticSecret {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(bytes.as_mut());
    StaticSecret::from(*bytes)
}

/// X25519 with the profile's contributory check: an all-zero output (the
/// peer's key is of small order) is [`Error::InvalidKey`].
pub(crate) fn dh(secret: &StaticSecret, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>> {
    let shared = secret.diffie_hellman(&XPublic::from(*public));
    if !shared.was_contributory() {
        return Err(Error::InvalidKey);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// A peer's public identity key: a validated Ed25519 public key together with
/// its X25519 (Montgomery) form.
///
/// Construction rejects encodings that do not decompress, are not canonical
/// (y ≥ p, or x = 0 with the sign bit set) or are of small order.
#[derive(Clone, Copy)]
pub struct IdentityKey {
    ed25519: VerifyingKey,
    x25519: [u8; 32],
}

impl IdentityKey {
    /// Parses and validates a 32-byte Ed25519 public key.
    ///
    /// # Errors
    /// [`Error::Decode`] if `bytes` is not 32 bytes long;
    /// [`Error::InvalidKey`] if it does not decompress, is not canonical or is
    /// of small order.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let array: &[u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::Decode("identity key length"))?;
        Self::from_array(array)
    }

    pub(crate) fn from_array(bytes: &[u8; 32]) -> Result<Self> {
        // Canonical encoding: y < p = 2^255 - 19. (A set sign bit with x = 0
        // only occurs for y = 1 or y = -1, points of small order, rejected
        // below.) This byte check spares re-encoding the point.
        if y_at_least_p(bytes) {
            return Err(Error::InvalidKey);
        }
        let ed25519 = VerifyingKey::from_bytes(bytes).map_err(|_| Error::InvalidKey)?;
        if ed25519.is_weak() {
            return Err(Error::InvalidKey);
        }
        Ok(IdentityKey {
            ed25519,
            x25519: ed25519.to_montgomery().to_bytes(),
        })
    }

    /// The 32-byte Ed25519 encoding (the wire form).
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.ed25519.as_bytes()
    }

    /// The X25519 form: the Montgomery u-coordinate of the Edwards point.
    pub fn x25519_bytes(&self) -> &[u8; 32] {
        &self.x25519
    }

    pub(crate) fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> Result<()> {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.ed25519
            .verify_strict(message, &signature)
            .map_err(|_| Error::Signature)
    }
}

impl PartialEq for IdentityKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for IdentityKey {}

impl core::hash::Hash for IdentityKey {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// Whether the little-endian y-coordinate in `bytes` (sign bit masked) is
/// at least p = 2^255 - 19, that is, not canonically encoded.
fn y_at_least_p(bytes: &[u8; 32]) -> bool {
    let [low, middle @ .., high] = bytes;
    high & 0x7f == 0x7f && middle.iter().all(|b| *b == 0xff) && *low >= 0xed
}

/// A device's own identity key pair: an Ed25519 signing key, and its X25519
/// form (the clamped first half of SHA-512(seed), as libsodium's
/// `crypto_sign_ed25519_sk_to_curve25519`), used only inside X3DH.
pub struct IdentityKeyPair {
    signing: SigningKey,
    x25519: StaticSecret,
    public: IdentityKey,
}

impl IdentityKeyPair {
    /// Generates a new identity from 32 random bytes.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// Restores an identity from its 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let mut hash = Sha512::digest(seed);
        let mut scalar = Zeroizing::new([0u8; 32]);
        crate::protocol::ratchet::copy(scalar.as_mut(), hash.iter().copied());
        hash.as_mut_slice().zeroize();
        // The clamping of RFC 7748 (x25519-dalek clamps again on use).
        let [first, .., last]: &mut [u8; 32] = &mut scalar;
        *first &= 248;
        *last &= 127;
        *last |= 64;
        let x25519 = StaticSecret::from(*scalar);
        let verifying = signing.verifying_key();
        let public = IdentityKey {
            ed25519: verifying,
            x25519: verifying.to_montgomery().to_bytes(),
        };
        IdentityKeyPair {
            signing,
            x25519,
            public,
        }
    }

    /// The 32-byte seed, for storage. Keep it secret; it is zeroized when the
    /// returned wrapper drops.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The public identity key.
    pub fn public(&self) -> &IdentityKey {
        &self.public
    }

    /// The X25519 private scalar (clamped), for test vectors and interop
    /// checks.
    pub(crate) fn x25519_secret(&self) -> &StaticSecret {
        &self.x25519
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

impl Clone for IdentityKeyPair {
    fn clone(&self) -> Self {
        Self::from_seed(&self.seed())
    }
}

impl fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// The message an identity key signs for a signed prekey.
pub(crate) fn spk_signed_message(id: u32, created: u64, public: &[u8; 32]) -> [u8; 70] {
    let mut m = [0u8; 70];
    let (id, created) = (id.to_be_bytes(), created.to_be_bytes());
    let parts = SPK_SIGNATURE_LABEL
        .iter()
        .chain(&id)
        .chain(&created)
        .chain(public)
        .copied();
    crate::protocol::ratchet::copy(&mut m, parts);
    m
}

/// A signed prekey pair held by its owner: X25519 key pair, id, creation time
/// (unix seconds) and the identity key's signature over them.
#[derive(Clone)]
pub struct SignedPrekey {
    id: u32,
    created: u64,
    /// Boxed, as the one-time prekey's: moving the prekey (in a growing
    /// `Vec`, between map nodes) moves a pointer, and the one copy of the
    /// secret is wiped when the prekey drops.
    secret: Box<StaticSecret>,
    public: [u8; 32],
    signature: [u8; 64],
}

impl SignedPrekey {
    /// Generates a fresh signed prekey with the given id, created at `now`
    /// (unix seconds).
    ///
    /// # Errors
    /// [`Error::TimeOutOfRange`] if `now` is above
    /// [`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP); nothing is drawn from `rng`
    /// then.
    pub fn generate(
        rng: &mut impl CryptoRngCore,
        identity: &IdentityKeyPair,
        id: u32,
        now: u64,
    ) -> Result<Self> {
        check_timestamp(now)?;
        let secret = random_x25519(rng);
        Self::from_secret(identity, id, now, secret.to_bytes())
    }

    /// Rebuilds (and re-signs) a signed prekey from its private key. Ed25519
    /// signatures are deterministic, so the result equals the original.
    ///
    /// # Errors
    /// [`Error::TimeOutOfRange`] if `created` (unix seconds) is above
    /// [`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP).
    pub fn from_secret(
        identity: &IdentityKeyPair,
        id: u32,
        created: u64,
        secret: [u8; 32],
    ) -> Result<Self> {
        check_timestamp(created)?;
        let secret = Box::new(StaticSecret::from(secret));
        let public = XPublic::from(&*secret).to_bytes();
        let signature = identity.sign(&spk_signed_message(id, created, &public));
        Ok(SignedPrekey {
            id,
            created,
            secret,
            public,
            signature,
        })
    }

    /// Rebuilds a signed prekey from stored parts, without recomputing
    /// (the caller's storage must be authenticated).
    pub(crate) fn from_parts(
        id: u32,
        created: u64,
        secret: [u8; 32],
        public: [u8; 32],
        signature: [u8; 64],
    ) -> Self {
        SignedPrekey {
            id,
            created,
            secret: Box::new(StaticSecret::from(secret)),
            public,
            signature,
        }
    }

    /// The prekey id.
    pub fn id(&self) -> u32 {
        self.id
    }
    /// Creation time, unix seconds.
    pub fn created(&self) -> u64 {
        self.created
    }
    /// The X25519 public key.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }
    /// The Ed25519 signature over the prekey.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }
    /// The private key bytes, for storage.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }
    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.secret
    }
}

impl fmt::Debug for SignedPrekey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedPrekey")
            .field("id", &self.id)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// A one-time prekey pair held by its owner. Its private half must be deleted
/// once a session has used it.
#[derive(Clone)]
pub struct OneTimePrekey {
    id: u32,
    /// Boxed: a collection of prekeys (the `PrekeyStore`'s map, whose nodes
    /// split and shift) moves pointers, never copies of the secret, so no
    /// stale copy is left in memory the collection frees.
    secret: Box<StaticSecret>,
    public: [u8; 32],
}

impl OneTimePrekey {
    /// Generates a fresh one-time prekey with the given id.
    pub fn generate(rng: &mut impl CryptoRngCore, id: u32) -> Self {
        Self::from_secret(id, random_x25519(rng).to_bytes())
    }

    /// Rebuilds a one-time prekey from its private key.
    pub fn from_secret(id: u32, secret: [u8; 32]) -> Self {
        let secret = Box::new(StaticSecret::from(secret));
        let public = XPublic::from(&*secret).to_bytes();
        OneTimePrekey { id, secret, public }
    }

    /// Rebuilds a one-time prekey from stored parts, without recomputing.
    pub(crate) fn from_parts(id: u32, secret: [u8; 32], public: [u8; 32]) -> Self {
        OneTimePrekey {
            id,
            secret: Box::new(StaticSecret::from(secret)),
            public,
        }
    }

    /// The prekey id.
    pub fn id(&self) -> u32 {
        self.id
    }
    /// The X25519 public key.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }
    /// The private key bytes, for storage.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }
    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.secret
    }
}

impl fmt::Debug for OneTimePrekey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneTimePrekey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// An X25519 key pair used as a ratchet key (or an X3DH ephemeral key).
#[derive(Clone)]
pub(crate) struct KeyPair {
    pub(crate) secret: StaticSecret,
    pub(crate) public: [u8; 32],
}

impl KeyPair {
    pub(crate) fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self::from_secret(random_x25519(rng))
    }
    pub(crate) fn from_secret(secret: StaticSecret) -> Self {
        let public = XPublic::from(&secret).to_bytes();
        KeyPair { secret, public }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_y_boundary() {
        let mut p_minus_1 = [0xffu8; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        assert!(!y_at_least_p(&p_minus_1));
        let mut p = p_minus_1;
        p[0] = 0xed;
        assert!(y_at_least_p(&p));
        let mut max = p;
        max[0] = 0xff;
        assert!(y_at_least_p(&max));
        // The sign bit does not take part.
        let mut p_signed = p;
        p_signed[31] = 0xff;
        assert!(y_at_least_p(&p_signed));
        let mut low = p;
        low[17] = 0xfe;
        assert!(!y_at_least_p(&low));
    }

    #[test]
    fn x25519_form_matches_the_ed25519_form() {
        // The X25519 public key computed from the clamped SHA-512(seed) half
        // equals the Montgomery form of the Ed25519 public key.
        let pair = IdentityKeyPair::from_seed(&[42; 32]);
        let from_secret = XPublic::from(pair.x25519_secret()).to_bytes();
        assert_eq!(&from_secret, pair.public().x25519_bytes());
    }
}
