//! Profile `cubbyhole/v2` (SPEC.md section 26): what a relay sees of a
//! message is a padded, sealed envelope.
//!
//! ```text
//! chain message          id = tag(HKs, n)
//!                        payload = 0x02 || 0x02 || EH (40) || HT (16) || C || T (16)
//! sealed prekey message  id = 16 random bytes
//!                        payload = 0x02 || 0x01 || E (32) || S || ST (16)
//!                        S || ST seals inner = 0x02 || 0x03 || (the v1 prekey layout)
//!
//! HK(rk)       = HMAC-SHA-256(rk, "cubbyhole/v2 header key")
//! tag(HK, n)   = HMAC-SHA-256(HK, "cubbyhole/v2 tag" || n)[..16]
//! hkey(HK, n)  = HMAC-SHA-256(HK, "cubbyhole/v2 header" || n)       EH || HT: AES-256-GCM,
//!                                                                   nonce 0^12, aad 0x02 0x02 || tag
//! seal(e, SPK) = HKDF-SHA-256(salt 0^32, DH(e, SPK), "cubbyhole/v2 seal" || E || SPK, 44)
//!                                                                   S || ST: AES-256-GCM, aad 0x02 0x01 || E
//! ```
//!
//! Padding is inside the ratchet's plaintext: `plaintext || 0x80 || 0x00*`
//! up to the size class of the whole payload ([`size_class`]).
//!
//! [`PrekeyStore::signed_prekeys`]: crate::PrekeyStore::signed_prekeys

use alloc::vec::Vec;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use rand_core::CryptoRngCore;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::protocol::keys::{dh, SignedPrekey};
use crate::protocol::ratchet::{copy, hkdf, hmac32, HeaderKey};
use crate::protocol::wire::{Header, HEADER_LEN, TAG_LEN};

/// The version byte of every v2 payload.
pub const VERSION_2: u8 = 0x02;
/// The kind byte of a sealed prekey message.
pub const KIND_SEALED_PREKEY: u8 = 0x01;
/// The kind byte of a chain message.
pub const KIND_CHAIN: u8 = 0x02;
/// The kind byte of the inner prekey message a seal holds.
pub const KIND_INNER_PREKEY: u8 = 0x03;

/// Bytes of a chain message around its padded plaintext: version, kind,
/// the encrypted header and its tag, the body's tag.
pub const CHAIN_OVERHEAD: usize = 2 + HEADER_LEN + TAG_LEN + TAG_LEN;
/// Bytes of a sealed prekey message around its padded plaintext, without a
/// one-time prekey id: 2 + 32 (E) + 16 (ST) + the inner's 111 bytes of
/// prefix + 16 (T).
pub const SEALED_PREKEY_OVERHEAD: usize = 177;
/// [`SEALED_PREKEY_OVERHEAD`] with a one-time prekey id (4 bytes more).
pub const SEALED_PREKEY_OVERHEAD_OPK: usize = 181;
/// The smallest size class: every payload of up to this many bytes is
/// padded to exactly this many.
pub const MIN_CLASS: usize = 512;
/// Bytes of a routing tag (the envelope id of a chain message).
pub const TAG_BYTES: usize = 16;

const TAG_INFO: &[u8] = b"cubbyhole/v2 tag";
const HEADER_INFO: &[u8] = b"cubbyhole/v2 header";
const SEAL_INFO: &[u8] = b"cubbyhole/v2 seal";

/// The size class of a payload of `len` bytes: [`MIN_CLASS`] up to it,
/// PADMÉ above (Nikitin et al., "Reducing Metadata Leakage from Encrypted
/// Files and Communication with PURBs", 2019): the length rounded up so that
/// only its top `floor(log2 E) + 1` bits (`E = floor(log2 len)`) may be
/// non-zero. At most 11.1 % above `len` beyond 512 bytes (12 % bound in
/// general), and `O(log log len)` bits of the length remain visible.
pub fn size_class(len: usize) -> usize {
    if len <= MIN_CLASS {
        return MIN_CLASS;
    }
    let e = usize::BITS - 1 - len.leading_zeros(); // floor(log2 len), >= 9
    let s = u32::BITS - e.leading_zeros(); // floor(log2 e) + 1
    let mask = (1usize << (e - s)) - 1;
    // `len + mask` cannot overflow for any length a message can have
    // (callers bound plaintexts to 2^36 bytes); saturate regardless.
    len.saturating_add(mask) & !mask
}

/// How many bytes of padding (`0x80 || 0x00*`, at least 1) bring a payload
/// of `overhead + plaintext` bytes to its size class.
pub fn padding_len(overhead: usize, plaintext: usize) -> usize {
    let unpadded = overhead.saturating_add(plaintext).saturating_add(1);
    // `size_class` never rounds down below 2^62 bytes; beyond, saturate
    // rather than underflow (no message is that long: `Session::seal`
    // refuses plaintexts above AES-GCM's limit first).
    size_class(unpadded).saturating_sub(unpadded) + 1
}

/// Appends the padding for a payload of `overhead` bytes around `out[start..]`.
pub(crate) fn pad(out: &mut Vec<u8>, start: usize, overhead: usize) {
    let len = padding_len(overhead, out.len() - start);
    out.reserve(len);
    out.push(0x80);
    out.resize(out.len() + len - 1, 0);
}

/// The length of `padded` without its padding.
///
/// # Errors
/// `Decode("padding")` unless `padded` ends with `0x80` followed only by
/// zero bytes.
pub fn unpadded_len(padded: &[u8]) -> Result<usize> {
    let last = padded
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(Error::Decode("padding"))?;
    if padded.get(last) == Some(&0x80) {
        Ok(last)
    } else {
        Err(Error::Decode("padding"))
    }
}

/// `tag(HK, n)`: the envelope id of message `n` of the chain with header
/// key `hk`.
pub(crate) fn tag(hk: &HeaderKey, n: u32) -> [u8; TAG_BYTES] {
    let mac = Zeroizing::new(hmac32(&hk.0, &[TAG_INFO, &n.to_be_bytes()]));
    let mut out = [0u8; TAG_BYTES];
    copy(&mut out, mac.iter().copied());
    out
}

fn header_cipher(hk: &HeaderKey, n: u32) -> Aes256Gcm {
    let key = Zeroizing::new(hmac32(&hk.0, &[HEADER_INFO, &n.to_be_bytes()]));
    Aes256Gcm::new(key.as_ref().into())
}

/// `EH || HT`: the header of message `n` encrypted under `hkey(HK, n)`.
pub(crate) fn seal_header(
    hk: &HeaderKey,
    tag: &[u8; TAG_BYTES],
    header: &Header,
    out: &mut Vec<u8>,
) -> Result<()> {
    let mut buf = header.encoded();
    let aad = aad2(KIND_CHAIN, tag);
    let t = header_cipher(hk, header.n)
        .encrypt_in_place_detached(Nonce::from_slice(&[0; 12]), &aad, &mut buf)
        .map_err(|_| Error::PlaintextTooLong)?;
    out.extend_from_slice(&buf);
    out.extend_from_slice(&t);
    Ok(())
}

/// Opens `EH || HT` as message `n` of the chain with header key `hk`.
pub(crate) fn open_header(
    hk: &HeaderKey,
    n: u32,
    tag: &[u8; TAG_BYTES],
    sealed: &[u8],
) -> Result<Header> {
    let (eh, ht) = sealed.split_at(HEADER_LEN.min(sealed.len()));
    if eh.len() != HEADER_LEN || ht.len() != TAG_LEN {
        return Err(Error::Decode("sealed header"));
    }
    let mut buf = [0u8; HEADER_LEN];
    copy(&mut buf, eh.iter().copied());
    let aad = aad2(KIND_CHAIN, tag);
    header_cipher(hk, n)
        .decrypt_in_place_detached(
            Nonce::from_slice(&[0; 12]),
            &aad,
            &mut buf,
            Tag::from_slice(ht),
        )
        .map_err(|_| Error::Auth)?;
    let mut ratchet_key = [0u8; 32];
    copy(&mut ratchet_key, buf.iter().copied());
    let word = |at: usize| {
        let mut w = [0u8; 4];
        copy(&mut w, buf.iter().skip(at).copied());
        u32::from_be_bytes(w)
    };
    let header = Header {
        ratchet_key,
        pn: word(32),
        n: word(36),
    };
    buf.zeroize();
    if header.n != n {
        return Err(Error::Auth);
    }
    Ok(header)
}

/// `0x02 || kind || rest` for `rest` of up to 32 bytes (a tag or E), on
/// the stack: the per-message path does not allocate for it.
fn aad2(kind: u8, rest: &[u8]) -> AadBuf {
    let mut buf = [0u8; 34];
    let len = 2 + rest.len().min(32);
    copy(
        &mut buf,
        [VERSION_2, kind].into_iter().chain(rest.iter().copied()),
    );
    AadBuf { buf, len }
}

/// A short associated-data buffer ([`aad2`]).
struct AadBuf {
    buf: [u8; 34],
    len: usize,
}

impl core::ops::Deref for AadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

fn seal_cipher(shared: &[u8; 32], e: &[u8; 32], spk: &[u8; 32]) -> (Aes256Gcm, [u8; 12]) {
    let mut info = [0u8; 17 + 64];
    copy(
        &mut info,
        SEAL_INFO.iter().chain(e.iter()).chain(spk.iter()).copied(),
    );
    let okm = hkdf::<44>(&[0u8; 32], shared, &info);
    let mut key = Zeroizing::new([0u8; 32]);
    copy(key.as_mut(), okm.iter().copied());
    let mut nonce = [0u8; 12];
    copy(&mut nonce, okm.iter().copied().skip(32));
    (Aes256Gcm::new(key.as_ref().into()), nonce)
}

/// Seals `inner` (an inner prekey message) to the signed prekey `spk` with
/// a fresh ephemeral key drawn from `rng` (32 bytes), appending the payload
/// `0x02 || 0x01 || E || S || ST` to `out`.
pub(crate) fn seal_prekey(
    rng: &mut impl CryptoRngCore,
    spk: &[u8; 32],
    inner: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let e = StaticSecret::random_from_rng(&mut *rng);
    let public = PublicKey::from(&e).to_bytes();
    let shared = dh(&e, spk)?;
    let (cipher, nonce) = seal_cipher(&shared, &public, spk);
    out.reserve(2 + 32 + inner.len() + TAG_LEN);
    out.push(VERSION_2);
    out.push(KIND_SEALED_PREKEY);
    out.extend_from_slice(&public);
    let start = out.len();
    out.extend_from_slice(inner);
    let aad = aad2(KIND_SEALED_PREKEY, &public);
    let t = match out.get_mut(start..) {
        Some(buf) => cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, buf)
            .map_err(|_| Error::PlaintextTooLong)?,
        None => return Err(Error::State("output buffer")),
    };
    out.extend_from_slice(&t);
    Ok(())
}

/// The smallest sealed prekey payload: an inner message without a one-time
/// prekey and with an empty (unpadded) plaintext.
pub const MIN_SEALED_PREKEY_LEN: usize = 177;

/// Opens a sealed prekey message with the first of `signed_prekeys` that
/// opens it (a device tries its current signed prekey, then the retained
/// ones: [`PrekeyStore::signed_prekeys`](crate::PrekeyStore::signed_prekeys)), returning the inner prekey message and the index
/// of that prekey. Order of checks: length, version and kind (`Decode`); no
/// signed prekey (`UnknownPrekey`); a non-contributory `DH(spk, E)`
/// (`InvalidKey`, found with the first prekey); no prekey opens it
/// (`Auth`); the opened message does not begin with `0x02 0x03`
/// (`Decode("inner message")`). Costs one X25519, one HKDF and one AES-GCM tag check per
/// prekey tried.
pub fn open_sealed_prekey<'k>(
    payload: &[u8],
    signed_prekeys: impl IntoIterator<Item = &'k SignedPrekey>,
) -> Result<(Zeroizing<Vec<u8>>, usize)> {
    if payload.len() < MIN_SEALED_PREKEY_LEN {
        return Err(Error::Decode("sealed prekey message length"));
    }
    match payload {
        [VERSION_2, KIND_SEALED_PREKEY, rest @ ..] => {
            let (e, sealed) = rest.split_at(32);
            let (body, st) = sealed.split_at(sealed.len() - TAG_LEN);
            let mut public = [0u8; 32];
            copy(&mut public, e.iter().copied());
            let aad = aad2(KIND_SEALED_PREKEY, &public);
            let mut any = false;
            for (i, prekey) in signed_prekeys.into_iter().enumerate() {
                any = true;
                let spk = prekey.public();
                let shared = dh(prekey.secret(), &public)?;
                let (cipher, nonce) = seal_cipher(&shared, &public, spk);
                let mut buf = Zeroizing::new(body.to_vec());
                if cipher
                    .decrypt_in_place_detached(
                        Nonce::from_slice(&nonce),
                        &aad,
                        &mut buf,
                        Tag::from_slice(st),
                    )
                    .is_ok()
                {
                    // The seal holds an inner prekey message (0x02 0x03),
                    // never a v1 message: a v2 session only.
                    if buf.get(..2) != Some(&[VERSION_2, KIND_INNER_PREKEY][..]) {
                        return Err(Error::Decode("inner message"));
                    }
                    return Ok((buf, i));
                }
            }
            Err(if any {
                Error::Auth
            } else {
                Error::UnknownPrekey
            })
        }
        [VERSION_2, _, ..] => Err(Error::Decode("kind")),
        _ => Err(Error::Decode("version")),
    }
}

/// The fields of a chain message's payload.
pub(crate) struct ChainParts<'a> {
    pub(crate) sealed_header: &'a [u8],
    pub(crate) ciphertext: &'a [u8],
    pub(crate) tag: &'a [u8],
}

/// Decodes a chain message: `Decode` unless it is at least
/// [`CHAIN_OVERHEAD`] bytes with version 0x02 and kind 0x02.
pub(crate) fn chain_parts(payload: &[u8]) -> Result<ChainParts<'_>> {
    if payload.len() < CHAIN_OVERHEAD {
        return Err(Error::Decode("chain message length"));
    }
    match payload {
        [VERSION_2, KIND_CHAIN, rest @ ..] => {
            let (sealed_header, body) = rest.split_at(HEADER_LEN + TAG_LEN);
            let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
            Ok(ChainParts {
                sealed_header,
                ciphertext,
                tag,
            })
        }
        [VERSION_2, _, ..] => Err(Error::Decode("kind")),
        _ => Err(Error::Decode("version")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PADMÉ, written from the paper's pseudocode with floating point, as
    /// an independent reference.
    fn padme_reference(l: usize) -> usize {
        let e = (l as f64).log2().floor() as u32;
        let s = (e as f64).log2().floor() as u32 + 1;
        let last_bits = e - s;
        let bit_mask = (1usize << last_bits) - 1;
        (l + bit_mask) & !bit_mask
    }

    #[test]
    fn size_classes_are_padme_above_the_floor() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(512), 512);
        for l in (513..300_000).step_by(7) {
            assert_eq!(size_class(l), padme_reference(l), "{l}");
            assert!(size_class(l) >= l);
        }
        // 1 KiB + 1 rounds to a multiple of 64; 64 KiB + 74 to one of 2048.
        assert_eq!(size_class(1025), 1088);
        assert_eq!(size_class(65_536 + 74), 67_584);
    }

    #[test]
    fn padding_round_trips_and_rejects_other_endings() {
        for len in [0usize, 1, 100, 437, 438, 439, 5000] {
            let mut buf = alloc::vec![7u8; len];
            pad(&mut buf, 0, CHAIN_OVERHEAD);
            assert_eq!(
                size_class(buf.len() + CHAIN_OVERHEAD),
                buf.len() + CHAIN_OVERHEAD
            );
            assert_eq!(unpadded_len(&buf), Ok(len));
        }
        assert_eq!(unpadded_len(&[]), Err(Error::Decode("padding")));
        assert_eq!(unpadded_len(&[0, 0]), Err(Error::Decode("padding")));
        assert_eq!(unpadded_len(&[1, 0x81, 0]), Err(Error::Decode("padding")));
        assert_eq!(unpadded_len(&[0x80]), Ok(0));
    }
}
