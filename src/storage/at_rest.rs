//! The sealed value format the persistent stores share (`SqliteStore`,
//! [`KvStore`](super::KvStore)): `nonce (12, fresh from the OS) ||
//! AES-256-GCM ciphertext || tag (16)`, bound by its associated data to
//! where the value is stored. Each store derives its own cipher key and
//! chooses the binding.

use std::string::ToString;
use std::vec::Vec;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use super::StoreError;

/// The nonce's length.
pub(crate) const NONCE_LEN: usize = 12;
/// The tag's length.
pub(crate) const TAG_LEN: usize = 16;

/// Seals `plaintext` under `cipher`, bound to `aad`. The plaintext is only
/// ever copied into a buffer that is wiped if sealing fails.
pub(crate) fn seal(
    cipher: &Aes256Gcm,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut out = Zeroizing::new(Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN));
    out.resize(NONCE_LEN, 0);
    OsRng
        .try_fill_bytes(&mut out[..NONCE_LEN])
        .map_err(|e| StoreError::Backend(format!("operating system RNG: {e}")))?;
    out.extend_from_slice(plaintext);
    let (nonce, body) = out.split_at_mut(NONCE_LEN);
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, body)
        .map_err(|_| StoreError::Backend("value too long to encrypt".to_string()))?;
    out.extend_from_slice(&tag);
    // The buffer now holds only ciphertext: no need to wipe it.
    Ok(core::mem::take(&mut *out))
}

/// Why a sealed value does not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Shorter than a nonce and a tag (the length).
    TooShort(usize),
    /// The tag does not verify under this key and binding.
    Auth,
}

/// Opens [`seal`]'s output.
pub(crate) fn open(
    cipher: &Aes256Gcm,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(OpenError::TooShort(sealed.len()));
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut plain = Zeroizing::new(body.to_vec());
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            aad,
            &mut plain,
            Tag::from_slice(tag),
        )
        .map_err(|_| OpenError::Auth)?;
    Ok(plain)
}
