//! Stamps: a proof of work that pays for a deposit from someone the
//! mailbox's owner has not handed an access key (a first contact), bound to
//! the mailbox, the envelope id, the payload's size and the hour (issue 16;
//! a hashcash-style construction over SHA-256).
//!
//! ```text
//! epoch  = floor(now / STAMP_EPOCH_SECONDS)                        (u64)
//! blocks = max(1, ceil(payload_len / STAMP_BLOCK_BYTES))
//! bits   = difficulty + ceil(log2(blocks))
//! digest = SHA-256(STAMP_LABEL || mailbox (32) || envelope_id (16)
//!                  || payload_len (4, big-endian) || epoch (8, big-endian)
//!                  || nonce (8, big-endian))
//! valid  iff digest has at least `bits` leading zero bits
//!        and epoch is the verifier's epoch or the one before it
//! stamp  = epoch (8, big-endian) || nonce (8, big-endian)           (16 bytes)
//! ```
//!
//! Verifying costs one SHA-256; minting costs `2^bits` of them on average,
//! so a sender pays in proportion to the bytes it deposits (rounded up to a
//! power of two of 4 KiB blocks: at most twice the linear price). A stamp
//! cannot be reused for another envelope, mailbox or size, and is accepted
//! for one to two hours. Nothing here reads a clock or draws randomness:
//! `now` and the first nonce are arguments, and minting works in slices of
//! a given budget so that a caller without threads (a browser) can yield
//! between them.

use sha2::{Digest, Sha256};

use super::{DeviceAddress, EnvelopeId, MailboxId};

/// The domain-separation label of a stamp's digest.
pub const STAMP_LABEL: &[u8] = b"cubbyhole/v1 stamp";
/// The domain-separation label of an identity stamp's digest (the stamp
/// on a device's first directory upload, SPEC.md 16.11).
pub const IDENTITY_STAMP_LABEL: &[u8] = b"cubbyhole/v1 identity stamp";
/// How long one stamp epoch lasts, in seconds (one hour).
pub const STAMP_EPOCH_SECONDS: u64 = 3600;
/// The payload bytes one unit of difficulty pays for.
pub const STAMP_BLOCK_BYTES: u32 = 4096;
/// The most leading zero bits a stamp can be asked for (a SHA-256 digest
/// has 256; a difficulty above this is refused, not ground forever).
pub const MAX_STAMP_BITS: u32 = 64;
/// The encoded length of a [`Stamp`].
pub const STAMP_LEN: usize = 16;

/// A stamp: the epoch it was minted for and the nonce found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// `floor(now / STAMP_EPOCH_SECONDS)` when it was minted.
    pub epoch: u64,
    /// The nonce that makes the digest start with enough zero bits.
    pub nonce: u64,
}

/// Why a stamp was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StampError {
    /// Not [`STAMP_LEN`] bytes.
    Length,
    /// Minted for an epoch other than the verifier's or the one before.
    Epoch,
    /// Its digest has fewer leading zero bits than required.
    Work,
    /// The required number of bits is above [`MAX_STAMP_BITS`].
    Difficulty,
}

impl core::fmt::Display for StampError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            StampError::Length => "stamp length",
            StampError::Epoch => "stamp epoch",
            StampError::Work => "stamp work",
            StampError::Difficulty => "stamp difficulty",
        })
    }
}

/// The leading zero bits a deposit of `payload_len` bytes needs at
/// `difficulty`: `difficulty + ceil(log2(max(1, ceil(payload_len /
/// 4096))))`.
pub fn required_bits(difficulty: u8, payload_len: u32) -> u32 {
    let blocks = payload_len.div_ceil(STAMP_BLOCK_BYTES).max(1);
    // ceil(log2(blocks)): 0 for 1 block, 1 for 2, 2 for 3 and 4, ...
    let log = u32::BITS - (blocks - 1).leading_zeros();
    u32::from(difficulty) + log
}

/// The epoch of time `now` (unix seconds).
pub fn epoch_of(now: u64) -> u64 {
    now / STAMP_EPOCH_SECONDS
}

/// The number of leading zero bits of a digest.
pub fn leading_zero_bits(digest: &[u8; 32]) -> u32 {
    let mut bits = 0;
    for byte in digest {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// SHA-256 of `prefix || nonce` for many nonces at one compression each:
/// the blocks of the prefix that do not change are compressed once (a
/// midstate), and each try compresses only the last block, which holds the
/// rest of the prefix, the nonce and the standard padding (FIPS 180-4,
/// 5.1.1). Used only to search; every digest it accepts is recomputed
/// with [`Sha256`] (and tests compare the two on every length).
struct Midstate {
    /// The state after the prefix's whole blocks.
    state: [u32; 8],
    /// The last block: the prefix's remaining bytes, then (per try) the
    /// nonce at `nonce_at`, 0x80, zeros and the message length in bits.
    block: [u8; 64],
    nonce_at: usize,
}

/// The SHA-256 initial hash value (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

impl Midstate {
    /// For `prefix` followed by an 8-byte nonce; `None` if the nonce and
    /// the padding do not fit in one last block (the prefix's length is
    /// 56 or more modulo 64: never for this module's fixed layouts).
    fn new(prefix: &[u8]) -> Option<Midstate> {
        let whole = prefix.len() / 64 * 64;
        let rest = &prefix[whole..];
        if rest.len() + 8 + 1 + 8 > 64 {
            return None;
        }
        let mut state = SHA256_IV;
        for chunk in prefix[..whole].chunks_exact(64) {
            let mut block = [0u8; 64];
            block.copy_from_slice(chunk);
            sha2::compress256(&mut state, &[block.into()]);
        }
        let mut block = [0u8; 64];
        block[..rest.len()].copy_from_slice(rest);
        let nonce_at = rest.len();
        block[nonce_at + 8] = 0x80;
        let bits = ((prefix.len() + 8) as u64) * 8;
        block[56..].copy_from_slice(&bits.to_be_bytes());
        Some(Midstate {
            state,
            block,
            nonce_at,
        })
    }

    /// The leading zero bits of `SHA-256(prefix || nonce)`.
    fn zero_bits(&mut self, nonce: u64) -> u32 {
        self.block[self.nonce_at..self.nonce_at + 8].copy_from_slice(&nonce.to_be_bytes());
        let mut state = self.state;
        sha2::compress256(&mut state, &[self.block.into()]);
        if state[0] != 0 {
            state[0].leading_zeros()
        } else {
            let mut bits = 32;
            for word in &state[1..] {
                if *word != 0 {
                    return bits + word.leading_zeros();
                }
                bits += 32;
            }
            bits
        }
    }

    /// Tries `budget` nonces from `start`: the first with `bits` leading
    /// zero bits, or where to go on.
    fn search(&mut self, bits: u32, start: u64, budget: u64) -> Result<u64, Unfinished> {
        let mut nonce = start;
        for _ in 0..budget {
            if self.zero_bits(nonce) >= bits {
                return Ok(nonce);
            }
            nonce = nonce.wrapping_add(1);
        }
        Err(Unfinished { next_nonce: nonce })
    }
}

/// The length of a deposit stamp's digest input before the nonce.
const PREFIX_LEN: usize = STAMP_LABEL.len() + 32 + 16 + 4 + 8;
/// The length of an identity stamp's digest input before the nonce.
const IDENTITY_PREFIX_LEN: usize = IDENTITY_STAMP_LABEL.len() + 32 + 4 + 8;

/// Concatenates `parts` into an array of exactly their total length `N`.
fn concat<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut at = 0;
    for part in parts {
        out[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    debug_assert_eq!(at, N);
    out
}

/// The bytes before the nonce of a stamp's digest input (the module docs'
/// layout; the only place it is written).
fn prefix_bytes(
    mailbox: &MailboxId,
    envelope_id: &EnvelopeId,
    payload_len: u32,
    epoch: u64,
) -> [u8; PREFIX_LEN] {
    concat(&[
        STAMP_LABEL,
        &mailbox.0,
        &envelope_id.0,
        &payload_len.to_be_bytes(),
        &epoch.to_be_bytes(),
    ])
}

/// The bytes before the nonce of an identity stamp's digest input.
fn identity_prefix_bytes(device: &DeviceAddress, epoch: u64) -> [u8; IDENTITY_PREFIX_LEN] {
    concat(&[
        IDENTITY_STAMP_LABEL,
        &device.identity,
        &device.device_id.to_be_bytes(),
        &epoch.to_be_bytes(),
    ])
}

/// `SHA-256(prefix || nonce)`, with the hasher.
fn digest(prefix: &[u8], nonce: u64) -> [u8; 32] {
    Sha256::new()
        .chain_update(prefix)
        .chain_update(nonce.to_be_bytes())
        .finalize()
        .into()
}

/// The leading zero bits of `SHA-256(prefix || nonce)`, with the hasher.
fn digest_zero_bits(prefix: &[u8], nonce: u64) -> u32 {
    leading_zero_bits(&digest(prefix, nonce))
}

/// Searches with a midstate where the layout allows (always, for this
/// module's), else with the hasher; the found nonce is checked with
/// [`Sha256`] before it is returned.
fn search(prefix: &[u8], bits: u32, start: u64, budget: u64) -> Result<u64, Unfinished> {
    let fast = Midstate::new(prefix).map(|mut midstate| midstate.search(bits, start, budget));
    let found = match fast {
        Some(Ok(nonce)) if digest_zero_bits(prefix, nonce) >= bits => nonce,
        Some(Err(unfinished)) => return Err(unfinished),
        // No midstate for this layout (or, never seen, a midstate that
        // disagrees with the hasher): the hasher, one digest per try.
        _ => {
            let mut nonce = start;
            let mut hit = None;
            for _ in 0..budget {
                if digest_zero_bits(prefix, nonce) >= bits {
                    hit = Some(nonce);
                    break;
                }
                nonce = nonce.wrapping_add(1);
            }
            hit.ok_or(Unfinished { next_nonce: nonce })?
        }
    };
    Ok(found)
}

/// A stamp's digest (see the module docs).
pub fn stamp_digest(
    mailbox: &MailboxId,
    envelope_id: &EnvelopeId,
    payload_len: u32,
    stamp: &Stamp,
) -> [u8; 32] {
    digest(
        &prefix_bytes(mailbox, envelope_id, payload_len, stamp.epoch),
        stamp.nonce,
    )
}

/// `bits` if a stamp can be asked for that many.
fn checked_bits(bits: u32) -> Result<u32, StampError> {
    if bits > MAX_STAMP_BITS {
        Err(StampError::Difficulty)
    } else {
        Ok(bits)
    }
}

/// Where minting stopped without a stamp: call again from `next_nonce`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unfinished {
    /// The first nonce not tried.
    pub next_nonce: u64,
}

impl Stamp {
    /// Searches nonces `start, start + 1, ...` (at most `budget` of them)
    /// for a stamp on this deposit at `now`'s epoch. `start` should be
    /// random (two senders starting at 0 would only repeat each other's
    /// work, which is harmless but wasteful).
    ///
    /// # Errors
    /// [`StampError::Difficulty`] if the deposit needs more than
    /// [`MAX_STAMP_BITS`]; `Ok(Err(Unfinished))` when the budget ran out.
    pub fn mint(
        mailbox: &MailboxId,
        envelope_id: &EnvelopeId,
        payload_len: u32,
        difficulty: u8,
        now: u64,
        start: u64,
        budget: u64,
    ) -> Result<Result<Stamp, Unfinished>, StampError> {
        let bits = checked_bits(required_bits(difficulty, payload_len))?;
        let epoch = epoch_of(now);
        let bytes = prefix_bytes(mailbox, envelope_id, payload_len, epoch);
        Ok(search(&bytes, bits, start, budget).map(|nonce| Stamp { epoch, nonce }))
    }

    /// Checks the stamp of a deposit at the verifier's time `now`: its
    /// epoch is `now`'s or the one before (in that order of checks: epoch,
    /// then work).
    ///
    /// # Errors
    /// [`StampError::Difficulty`], [`StampError::Epoch`],
    /// [`StampError::Work`].
    pub fn verify(
        &self,
        mailbox: &MailboxId,
        envelope_id: &EnvelopeId,
        payload_len: u32,
        difficulty: u8,
        now: u64,
    ) -> Result<(), StampError> {
        let bits = checked_bits(required_bits(difficulty, payload_len))?;
        self.check_epoch(now)?;
        let bytes = prefix_bytes(mailbox, envelope_id, payload_len, self.epoch);
        self.check_work(&bytes, bits)
    }

    /// Searches for an identity stamp (SPEC.md 16.11) on `device`'s first
    /// upload at `now`'s epoch, as [`Stamp::mint`] does for a deposit:
    /// `SHA-256("cubbyhole/v1 identity stamp" || identity (32) || device_id
    /// (4, big-endian) || epoch (8) || nonce (8))` with at least
    /// `difficulty` leading zero bits.
    ///
    /// # Errors
    /// [`StampError::Difficulty`] if `difficulty` is above
    /// [`MAX_STAMP_BITS`]; `Ok(Err(Unfinished))` when the budget ran out.
    pub fn mint_identity(
        device: &DeviceAddress,
        difficulty: u8,
        now: u64,
        start: u64,
        budget: u64,
    ) -> Result<Result<Stamp, Unfinished>, StampError> {
        let bits = checked_bits(u32::from(difficulty))?;
        let epoch = epoch_of(now);
        let bytes = identity_prefix_bytes(device, epoch);
        Ok(search(&bytes, bits, start, budget).map(|nonce| Stamp { epoch, nonce }))
    }

    /// Checks an identity stamp at the verifier's time `now`, as
    /// [`Stamp::verify`] (epoch, then work).
    ///
    /// # Errors
    /// [`StampError::Difficulty`], [`StampError::Epoch`],
    /// [`StampError::Work`].
    pub fn verify_identity(
        &self,
        device: &DeviceAddress,
        difficulty: u8,
        now: u64,
    ) -> Result<(), StampError> {
        let bits = checked_bits(u32::from(difficulty))?;
        self.check_epoch(now)?;
        self.check_work(&identity_prefix_bytes(device, self.epoch), bits)
    }

    /// The stamp's epoch is `now`'s or the one before.
    fn check_epoch(&self, now: u64) -> Result<(), StampError> {
        let current = epoch_of(now);
        if self.epoch == current || self.epoch.checked_add(1) == Some(current) {
            Ok(())
        } else {
            Err(StampError::Epoch)
        }
    }

    /// `SHA-256(prefix || nonce)` has at least `bits` leading zero bits.
    fn check_work(&self, prefix: &[u8], bits: u32) -> Result<(), StampError> {
        if digest_zero_bits(prefix, self.nonce) >= bits {
            Ok(())
        } else {
            Err(StampError::Work)
        }
    }

    /// `epoch (8, big-endian) || nonce (8, big-endian)`.
    pub fn encode(&self) -> [u8; STAMP_LEN] {
        let mut out = [0u8; STAMP_LEN];
        out[..8].copy_from_slice(&self.epoch.to_be_bytes());
        out[8..].copy_from_slice(&self.nonce.to_be_bytes());
        out
    }

    /// The inverse of [`Stamp::encode`].
    ///
    /// # Errors
    /// [`StampError::Length`] unless exactly [`STAMP_LEN`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<Stamp, StampError> {
        let bytes: &[u8; STAMP_LEN] = bytes.try_into().map_err(|_| StampError::Length)?;
        let (epoch, nonce) = bytes.split_at(8);
        let mut e = [0u8; 8];
        e.copy_from_slice(epoch);
        let mut n = [0u8; 8];
        n.copy_from_slice(nonce);
        Ok(Stamp {
            epoch: u64::from_be_bytes(e),
            nonce: u64::from_be_bytes(n),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const NOW: u64 = 1_900_000_000;
    const MAILBOX: MailboxId = MailboxId([7; 32]);
    const ID: EnvelopeId = EnvelopeId([9; 16]);

    #[test]
    fn required_bits_grow_with_log2_of_the_blocks() {
        let cases = [
            (0, 20),
            (1, 20),
            (4096, 20),
            (4097, 21),
            (8192, 21),
            (8193, 22),
            (16384, 22),
            (16385, 23),
            (256 * 1024, 26),
            (u32::MAX, 40),
        ];
        for (len, bits) in cases {
            assert_eq!(required_bits(20, len), bits, "{len} bytes");
        }
    }

    #[test]
    fn leading_zero_bits_count_across_bytes() {
        let mut d = [0xffu8; 32];
        assert_eq!(leading_zero_bits(&d), 0);
        d[0] = 0x01;
        assert_eq!(leading_zero_bits(&d), 7);
        d[0] = 0;
        d[1] = 0x10;
        assert_eq!(leading_zero_bits(&d), 11);
        assert_eq!(leading_zero_bits(&[0; 32]), 256);
    }

    /// The digest is SHA-256 over exactly the documented bytes (computed
    /// here from the layout, not through `prefix`).
    #[test]
    fn the_digest_covers_the_documented_bytes() {
        let stamp = Stamp {
            epoch: 527_777,
            nonce: 0x0102_0304_0506_0708,
        };
        let mut input = Vec::new();
        input.extend_from_slice(b"cubbyhole/v1 stamp");
        input.extend_from_slice(&[7; 32]);
        input.extend_from_slice(&[9; 16]);
        input.extend_from_slice(&[0, 0, 0x10, 0]);
        input.extend_from_slice(&527_777u64.to_be_bytes());
        input.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let want: [u8; 32] = Sha256::digest(&input).into();
        assert_eq!(stamp_digest(&MAILBOX, &ID, 4096, &stamp), want);
        assert_eq!(
            stamp.encode(),
            [0, 0, 0, 0, 0, 8, 0x0d, 0xa1, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(Stamp::decode(&stamp.encode()), Ok(stamp));
        assert_eq!(Stamp::decode(&[0; 15]), Err(StampError::Length));
        assert_eq!(Stamp::decode(&[0; 17]), Err(StampError::Length));
    }

    #[test]
    fn a_minted_stamp_verifies_for_its_deposit_only() {
        let stamp = Stamp::mint(&MAILBOX, &ID, 100, 12, NOW, 0, 1 << 20)
            .unwrap()
            .expect("found within 2^20 tries");
        assert!(leading_zero_bits(&stamp_digest(&MAILBOX, &ID, 100, &stamp)) >= 12);
        assert_eq!(stamp.verify(&MAILBOX, &ID, 100, 12, NOW), Ok(()));
        // The next epoch still takes it, the one after does not.
        let next = NOW + STAMP_EPOCH_SECONDS;
        assert_eq!(stamp.verify(&MAILBOX, &ID, 100, 12, next), Ok(()));
        assert_eq!(
            stamp.verify(&MAILBOX, &ID, 100, 12, next + STAMP_EPOCH_SECONDS),
            Err(StampError::Epoch)
        );
        // Nor an earlier epoch (a stamp from the future).
        assert_eq!(
            stamp.verify(&MAILBOX, &ID, 100, 12, NOW - STAMP_EPOCH_SECONDS),
            Err(StampError::Epoch)
        );
        // Bound to the mailbox, the envelope id and the size.
        let fails = |mailbox: &MailboxId, id: &EnvelopeId, len: u32| {
            // A different deposit has a 2^-12 chance to pass by luck; the
            // fixed inputs here were checked not to.
            stamp.verify(mailbox, id, len, 12, NOW) == Err(StampError::Work)
        };
        assert!(fails(&MailboxId([8; 32]), &ID, 100));
        assert!(fails(&MAILBOX, &EnvelopeId([10; 16]), 100));
        assert!(fails(&MAILBOX, &ID, 101));
        // A higher difficulty (or a larger payload at the same one) needs
        // more work than this stamp has, unless it happens to have it.
        let bits = leading_zero_bits(&stamp_digest(&MAILBOX, &ID, 100, &stamp));
        let harder = u8::try_from(bits + 1).unwrap();
        assert_eq!(
            stamp.verify(&MAILBOX, &ID, 100, harder, NOW),
            Err(StampError::Work)
        );
    }

    #[test]
    fn identity_stamps_cover_the_documented_bytes_and_the_device() {
        let device = DeviceAddress {
            identity: [3; 32],
            device_id: 5,
        };
        let stamp = Stamp::mint_identity(&device, 12, NOW, 0, 1 << 24)
            .unwrap()
            .unwrap();
        // The digest, recomputed from the definition.
        let mut input = Vec::new();
        input.extend_from_slice(b"cubbyhole/v1 identity stamp");
        input.extend_from_slice(&[3; 32]);
        input.extend_from_slice(&5u32.to_be_bytes());
        input.extend_from_slice(&(NOW / 3600).to_be_bytes());
        input.extend_from_slice(&stamp.nonce.to_be_bytes());
        let digest: [u8; 32] = Sha256::digest(&input).into();
        assert!(leading_zero_bits(&digest) >= 12);
        assert_eq!(stamp.verify_identity(&device, 12, NOW), Ok(()));
        assert_eq!(stamp.verify_identity(&device, 12, NOW + 3600), Ok(()));
        assert_eq!(
            stamp.verify_identity(&device, 12, NOW + 7200),
            Err(StampError::Epoch)
        );
        let other = DeviceAddress {
            device_id: 6,
            ..device
        };
        // Another device: the work does not carry over (12 more bits by
        // chance: 1 in 4096, and this nonce is fixed by the test's inputs).
        assert_eq!(
            stamp.verify_identity(&other, 12, NOW),
            Err(StampError::Work)
        );
        // Not a deposit stamp either.
        assert_eq!(
            stamp.verify(&MAILBOX, &ID, 0, 12, NOW),
            Err(StampError::Work)
        );
    }

    #[test]
    fn the_midstate_is_sha256_for_every_prefix_length() {
        for len in 0..200usize {
            let prefix: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            match Midstate::new(&prefix) {
                Some(mut midstate) => {
                    for nonce in [0u64, 1, 0x0102_0304_0506_0708, u64::MAX] {
                        let mut input = prefix.clone();
                        input.extend_from_slice(&nonce.to_be_bytes());
                        let digest: [u8; 32] = Sha256::digest(&input).into();
                        assert_eq!(
                            midstate.zero_bits(nonce),
                            leading_zero_bits(&digest),
                            "prefix of {len} bytes, nonce {nonce:#x}"
                        );
                    }
                }
                // Exactly the lengths whose nonce and padding spill over.
                None => assert!(len % 64 + 17 > 64, "{len}"),
            }
        }
        // This module's layouts fit: one compression per try.
        let deposit = prefix_bytes(&MAILBOX, &ID, 5, 7);
        assert_eq!(deposit.len(), 78);
        assert!(Midstate::new(&deposit).is_some());
        let device = DeviceAddress {
            identity: [1; 32],
            device_id: 2,
        };
        let identity = identity_prefix_bytes(&device, 7);
        assert_eq!(identity.len(), 71);
        assert!(Midstate::new(&identity).is_some());
    }

    #[test]
    fn a_digest_with_many_zero_bits_counts_across_words() {
        // The midstate counts zero bits over the state words: compare with
        // the byte count on digests with 0 to 40 leading zero bits, found
        // by search at low difficulty and forced by construction.
        let mut midstate = Midstate::new(b"cubbyhole stamp test").unwrap();
        for bits in [0u32, 1, 7, 8, 9, 15, 16, 17] {
            let nonce = midstate.search(bits, 0, 1 << 24).unwrap();
            let mut input = b"cubbyhole stamp test".to_vec();
            input.extend_from_slice(&nonce.to_be_bytes());
            let digest: [u8; 32] = Sha256::digest(&input).into();
            assert!(leading_zero_bits(&digest) >= bits);
            assert_eq!(midstate.zero_bits(nonce), leading_zero_bits(&digest));
        }
    }

    #[test]
    fn minting_resumes_where_the_budget_ran_out() {
        let all = Stamp::mint(&MAILBOX, &ID, 0, 10, NOW, 5, 1 << 16)
            .unwrap()
            .unwrap();
        // In slices of 7 nonces: the same stamp.
        let mut start = 5;
        let sliced = loop {
            match Stamp::mint(&MAILBOX, &ID, 0, 10, NOW, start, 7).unwrap() {
                Ok(stamp) => break stamp,
                Err(Unfinished { next_nonce }) => {
                    assert_eq!(next_nonce, start + 7);
                    start = next_nonce;
                }
            }
        };
        assert_eq!(sliced, all);
    }

    #[test]
    fn an_impossible_difficulty_is_refused() {
        assert_eq!(
            Stamp::mint(&MAILBOX, &ID, 0, 65, NOW, 0, 1),
            Err(StampError::Difficulty)
        );
        let s = Stamp { epoch: 0, nonce: 0 };
        assert_eq!(
            s.verify(&MAILBOX, &ID, 0, 65, NOW),
            Err(StampError::Difficulty)
        );
        // 60 + ceil(log2(blocks of 64 KiB)) = 64: still allowed.
        assert_eq!(required_bits(60, 64 * 1024), 64);
    }
}
