//! X3DH key agreement (Signal's X3DH with the profile's parameters).
//!
//! ```text
//! DH1 = X25519(IK_A.x25519_private, SPK_B)
//! DH2 = X25519(EK_A, IK_B.x25519_public)
//! DH3 = X25519(EK_A, SPK_B)
//! DH4 = X25519(EK_A, OPK_B)            (only with a one-time prekey)
//! SK  = HKDF(salt = 0^32, ikm = 0xFF^32 || DH1 || DH2 || DH3 [|| DH4],
//!            info = "cubbyhole/v1 x3dh", L = 32)
//! AD  = IK_A || IK_B                   (Ed25519 encodings)
//! ```
//!
//! Every DH output is checked to be contributory before it is used.

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::error::Result;
use crate::protocol::keys::{dh, IdentityKey, IdentityKeyPair};
use crate::protocol::ratchet::{copy, hkdf};

const X3DH_INFO: &[u8] = b"cubbyhole/v1 x3dh";

/// Everything X3DH computes; the DH outputs are kept for test vectors only
/// and zeroized on drop.
pub(crate) struct X3dhOutput {
    pub(crate) dh: [Zeroizing<[u8; 32]>; 4],
    pub(crate) has_dh4: bool,
    pub(crate) shared_secret: Zeroizing<[u8; 32]>,
    pub(crate) associated_data: [u8; 64],
}

fn finish(
    dhs: [Zeroizing<[u8; 32]>; 4],
    has_dh4: bool,
    initiator: &IdentityKey,
    responder: &IdentityKey,
) -> X3dhOutput {
    // ikm = 0xFF^32 || DH1 || DH2 || DH3 [|| DH4]
    let mut ikm = Zeroizing::new([0xFFu8; 32 * 5]);
    let n = if has_dh4 { 4 } else { 3 };
    for (chunk, d) in ikm.chunks_exact_mut(32).skip(1).zip(dhs.iter().take(n)) {
        copy(chunk, d.iter().copied());
    }
    let ikm_len = 32 * (n + 1);
    let shared_secret = hkdf::<32>(
        &[0u8; 32],
        ikm.get(..ikm_len).unwrap_or_default(),
        X3DH_INFO,
    );
    let mut associated_data = [0u8; 64];
    copy(
        &mut associated_data,
        initiator
            .as_bytes()
            .iter()
            .chain(responder.as_bytes())
            .copied(),
    );
    X3dhOutput {
        dh: dhs,
        has_dh4,
        shared_secret,
        associated_data,
    }
}

/// The initiator's side. `signed_prekey` must come from a verified bundle.
pub(crate) fn initiator(
    identity: &IdentityKeyPair,
    ephemeral: &StaticSecret,
    responder: &IdentityKey,
    signed_prekey: &[u8; 32],
    one_time_prekey: Option<&[u8; 32]>,
) -> Result<X3dhOutput> {
    let dh1 = dh(identity.x25519_secret(), signed_prekey)?;
    let dh2 = dh(ephemeral, responder.x25519_bytes())?;
    let dh3 = dh(ephemeral, signed_prekey)?;
    let dh4 = match one_time_prekey {
        Some(opk) => dh(ephemeral, opk)?,
        None => Zeroizing::new([0u8; 32]),
    };
    Ok(finish(
        [dh1, dh2, dh3, dh4],
        one_time_prekey.is_some(),
        identity.public(),
        responder,
    ))
}

/// The responder's side.
pub(crate) fn responder(
    identity: &IdentityKeyPair,
    signed_prekey: &StaticSecret,
    one_time_prekey: Option<&StaticSecret>,
    initiator: &IdentityKey,
    ephemeral: &[u8; 32],
) -> Result<X3dhOutput> {
    let dh1 = dh(signed_prekey, initiator.x25519_bytes())?;
    let dh2 = dh(identity.x25519_secret(), ephemeral)?;
    let dh3 = dh(signed_prekey, ephemeral)?;
    let dh4 = match one_time_prekey {
        Some(opk) => dh(opk, ephemeral)?,
        None => Zeroizing::new([0u8; 32]),
    };
    Ok(finish(
        [dh1, dh2, dh3, dh4],
        one_time_prekey.is_some(),
        initiator,
        identity.public(),
    ))
}
