//! Low-level access to intermediate values, for test vectors and interop
//! checks against other implementations of the profile.
//!
//! Nothing here is needed to use cubbyhole, and everything here exposes
//! secrets that the normal API keeps inside: use it only to check vectors.

use alloc::vec::Vec;

use rand_core::CryptoRngCore;
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::error::Result;
use crate::protocol::bundle::PrekeyBundle;
use crate::protocol::keys::{IdentityKey, IdentityKeyPair, OneTimePrekey, SignedPrekey};
use crate::protocol::ratchet::SessionConfig;
use crate::protocol::session::{PrekeyLookup, Session};
use crate::protocol::x3dh;

/// Every value X3DH computes.
pub struct X3dhValues {
    /// DH1 = X25519(IK_A, SPK_B).
    pub dh1: Zeroizing<[u8; 32]>,
    /// DH2 = X25519(EK_A, IK_B).
    pub dh2: Zeroizing<[u8; 32]>,
    /// DH3 = X25519(EK_A, SPK_B).
    pub dh3: Zeroizing<[u8; 32]>,
    /// DH4 = X25519(EK_A, OPK_B), when a one-time prekey was used.
    pub dh4: Option<Zeroizing<[u8; 32]>>,
    /// The shared secret SK.
    pub shared_secret: Zeroizing<[u8; 32]>,
    /// AD = IK_A || IK_B.
    pub associated_data: [u8; 64],
}

impl core::fmt::Debug for X3dhValues {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("X3dhValues").finish_non_exhaustive()
    }
}

fn values(out: x3dh::X3dhOutput) -> X3dhValues {
    let [dh1, dh2, dh3, dh4] = out.dh;
    X3dhValues {
        dh1,
        dh2,
        dh3,
        dh4: out.has_dh4.then_some(dh4),
        shared_secret: out.shared_secret,
        associated_data: out.associated_data,
    }
}

/// X3DH as the initiator with a given ephemeral private key, on a bundle
/// whose signature is *not* checked here.
///
/// # Errors
/// [`crate::Error::InvalidKey`] for a non-contributory DH.
pub fn x3dh_initiator(
    identity: &IdentityKeyPair,
    ephemeral_private: &[u8; 32],
    bundle: &PrekeyBundle,
) -> Result<X3dhValues> {
    let ek = StaticSecret::from(*ephemeral_private);
    x3dh::initiator(
        identity,
        &ek,
        bundle.identity(),
        bundle.signed_prekey(),
        bundle.one_time_prekey().map(|(_, k)| k),
    )
    .map(values)
}

/// X3DH as the responder.
///
/// # Errors
/// [`crate::Error::InvalidKey`] for a non-contributory DH.
pub fn x3dh_responder(
    identity: &IdentityKeyPair,
    signed_prekey: &SignedPrekey,
    one_time_prekey: Option<&OneTimePrekey>,
    initiator: &IdentityKey,
    initiator_ephemeral: &[u8; 32],
) -> Result<X3dhValues> {
    x3dh::responder(
        identity,
        signed_prekey.secret(),
        one_time_prekey.map(|k| k.secret()),
        initiator,
        initiator_ephemeral,
    )
    .map(values)
}

/// [`Session::encrypt`], also returning the message key `mk` it used.
///
/// # Errors
/// As [`Session::encrypt`].
pub fn encrypt_exposing_message_key(
    session: &mut Session,
    rng: &mut impl CryptoRngCore,
    plaintext: &[u8],
) -> Result<(Vec<u8>, Zeroizing<[u8; 32]>)> {
    let mut out = Vec::new();
    let mk = session.encrypt_with_key(rng, plaintext, &mut out)?;
    Ok((out, Zeroizing::new(mk.0)))
}

/// Deniability, made concrete: builds, from the **responder's** keys and the
/// initiator's **public** identity key only, an initiator-side session whose
/// prekey messages the responder's own [`Session::accept`] accepts as coming
/// from `initiator`.
///
/// This works because X3DH authenticates with Diffie-Hellman, not with
/// signatures: DH1 = X25519(IK_A, SPK_B) is also X25519(SPK_B, IK_A), and
/// every other input is the fabricator's own choice. So a transcript of
/// cubbyhole messages proves nothing to a third party about who wrote it.
/// It exists for tests and for readers of SPEC.md; applications never need it.
///
/// # Errors
/// [`crate::Error::UnknownPrekey`] if a named prekey is not in `prekeys`,
/// [`crate::Error::InvalidKey`] for a non-contributory DH.
pub fn simulate_initiator(
    rng: &mut impl CryptoRngCore,
    responder: &IdentityKeyPair,
    prekeys: &impl PrekeyLookup,
    signed_prekey_id: u32,
    one_time_prekey_id: Option<u32>,
    initiator: &IdentityKey,
    config: SessionConfig,
) -> Result<Session> {
    Session::simulate_initiator(
        rng,
        responder,
        prekeys,
        signed_prekey_id,
        one_time_prekey_id,
        initiator,
        config,
        false,
    )
}

/// [`simulate_initiator`] for a profile v2 session (SPEC.md 26.10): the
/// fabricated session seals its prekey messages ([`Session::seal`]) to the
/// responder's signed prekey, which the responder's own
/// [`PrekeyStore::open_sealed`](crate::PrekeyStore::open_sealed) and
/// [`Session::accept`] take as coming from `initiator`. Sealing adds no
/// signature: v2 is exactly as deniable as v1.
///
/// # Errors
/// As [`simulate_initiator`].
pub fn simulate_initiator_sealed(
    rng: &mut impl CryptoRngCore,
    responder: &IdentityKeyPair,
    prekeys: &impl PrekeyLookup,
    signed_prekey_id: u32,
    one_time_prekey_id: Option<u32>,
    initiator: &IdentityKey,
    config: SessionConfig,
) -> Result<Session> {
    Session::simulate_initiator(
        rng,
        responder,
        prekeys,
        signed_prekey_id,
        one_time_prekey_id,
        initiator,
        config,
        true,
    )
}
