//! The client frame: what the client puts inside each ratchet message
//! (SPEC.md, "Client frame"). The relay never sees it.
//!
//! ```text
//! v1: 0x01 || sender device id (4) || body
//! v2: 0x02 || sender device id (4) || flags (1)
//!       || [SESSION]  generation (8)
//!       || [DEAD]     count (1, >= 1) || count x session id (16)
//!       || [ACCESS]   epoch (4) || deposit access key (16)
//!       || [RECEIPTS] count (2, >= 1) || count x message id (16)
//!       || [MESSAGE]  message id (16) || body (the rest)
//! ```
//!
//! Flags: `MESSAGE` 0x01, `SESSION` 0x02, `RESET` 0x04 (only with
//! `SESSION`), `RECEIPTS` 0x08, `DEAD` 0x10, `ACCESS` 0x20; other bits are
//! zero, and at least one of `MESSAGE`, `SESSION`, `RECEIPTS` is set
//! (`ACCESS` and `DEAD` ride along, never alone). Without `MESSAGE`
//! nothing follows the last field. Numbers are big-endian.
//!
//! `ACCESS` carries the sender device's current deposit access key and its
//! epoch (SPEC.md, "Access keys in the client"): the receiver keeps it for
//! the sender device if the epoch is above the one it holds (or it holds
//! none), in the same commit as the message, and shows it when depositing
//! to that device's mailbox.

use std::vec::Vec;

use zeroize::Zeroizing;

use crate::transport::{AccessKey, ACCESS_KEY_LEN};

/// Frame version 1 (device id and body only; still accepted).
pub const V1: u8 = 0x01;
/// Frame version 2.
pub const V2: u8 = 0x02;
/// The frame carries an application message (id and body).
pub const MESSAGE: u8 = 0x01;
/// The frame carries its session's generation (sent in every prekey
/// message, so the responder learns it from whichever arrives first).
pub const SESSION: u8 = 0x02;
/// The sender lost its earlier sessions with the recipient (a restored
/// backup, a quarantined row): every session ranked below this one is
/// superseded.
pub const RESET: u8 = 0x04;
/// The frame carries receipts: ids of messages the sender received.
pub const RECEIPTS: u8 = 0x08;
/// The frame names sessions of the recipient's that the sender could not
/// open (their prekey messages failed): the recipient supersedes them.
pub const DEAD: u8 = 0x10;
/// The frame carries the sender device's deposit access key and its epoch.
pub const ACCESS: u8 = 0x20;
/// The frame carries the sender device's private inbox for its access
/// key's epoch: mailbox id (32) and inbox access key (16) (profile v2,
/// SPEC.md 26.11); only beside `ACCESS`.
pub const INBOX: u8 = 0x40;
const KNOWN: u8 = MESSAGE | SESSION | RESET | RECEIPTS | DEAD | ACCESS | INBOX;
/// The length of the `ACCESS` field: epoch (4) and key (16).
pub const ACCESS_FIELD_LEN: usize = 4 + ACCESS_KEY_LEN;

/// A decoded frame.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// The sender's device number.
    pub device_id: u32,
    /// The session's generation, if carried.
    pub generation: Option<u64>,
    /// The `RESET` flag.
    pub reset: bool,
    /// Session ids the sender could not open.
    pub dead: Vec<[u8; 16]>,
    /// The sender device's deposit access key with its epoch (its `Debug`
    /// shows only the epoch).
    pub access: Option<(u32, AccessKey)>,
    /// The sender device's private inbox (SPEC.md 26.11) for the epoch of
    /// `access`: its mailbox id and the access key deposits into it show
    /// (its `Debug` hides the key).
    pub inbox: Option<([u8; 32], AccessKey)>,
    /// Ids of messages the sender received.
    pub receipts: Vec<[u8; 16]>,
    /// The message: its id (`None` for a v1 frame) and body.
    pub message: Option<(Option<[u8; 16]>, Vec<u8>)>,
}

/// Why a frame does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadFrame;

impl Frame {
    /// Encodes a v2 frame (the caller wipes the bytes once encrypted: they
    /// hold the access key, if any). At most 255 dead ids and 65,535 receipts are
    /// encoded (the caller sends the rest in another frame).
    ///
    /// The caller makes a frame that decodes: at least one of `message`,
    /// `generation` and `receipts` set, `reset` only with a `generation`,
    /// and a message with an id (v1 frames are never written). The client
    /// always does (a frame without a message or receipts goes only in a
    /// new session's first message, which carries its generation); debug
    /// builds check it.
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(
            self.message.is_some() || self.generation.is_some() || !self.receipts.is_empty(),
            "a frame with nothing to carry"
        );
        debug_assert!(
            !self.reset || self.generation.is_some(),
            "RESET without SESSION"
        );
        debug_assert!(
            self.message.as_ref().is_none_or(|(id, _)| id.is_some()),
            "a v2 message without an id"
        );
        let dead = &self.dead[..self.dead.len().min(255)];
        let receipts = &self.receipts[..self.receipts.len().min(65_535)];
        let body_len = self.message.as_ref().map_or(0, |(_, b)| 16 + b.len());
        let mut out = Vec::with_capacity(
            6 + 9
                + 1
                + 16 * dead.len()
                + ACCESS_FIELD_LEN
                + 48
                + 2
                + 16 * receipts.len()
                + body_len,
        );
        let mut flags = 0;
        if self.message.is_some() {
            flags |= MESSAGE;
        }
        if self.generation.is_some() {
            flags |= SESSION;
            if self.reset {
                flags |= RESET;
            }
        }
        if !receipts.is_empty() {
            flags |= RECEIPTS;
        }
        if !dead.is_empty() {
            flags |= DEAD;
        }
        if self.access.is_some() {
            flags |= ACCESS;
            if self.inbox.is_some() {
                flags |= INBOX;
            }
        }
        out.push(V2);
        out.extend_from_slice(&self.device_id.to_be_bytes());
        out.push(flags);
        if let Some(generation) = self.generation {
            out.extend_from_slice(&generation.to_be_bytes());
        }
        if !dead.is_empty() {
            out.push(dead.len() as u8);
            for id in dead {
                out.extend_from_slice(id);
            }
        }
        if let Some((epoch, key)) = &self.access {
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(key.as_bytes());
            if let Some((inbox, key)) = &self.inbox {
                out.extend_from_slice(inbox);
                out.extend_from_slice(key.as_bytes());
            }
        }
        if !receipts.is_empty() {
            out.extend_from_slice(&(receipts.len() as u16).to_be_bytes());
            for id in receipts {
                out.extend_from_slice(id);
            }
        }
        if let Some((id, body)) = &self.message {
            out.extend_from_slice(&id.unwrap_or([0; 16]));
            out.extend_from_slice(body);
        }
        out
    }

    /// Decodes a v1 or v2 frame; consumes the plaintext (the body is split
    /// off it without a copy; the rest, which holds the access key if any,
    /// is wiped).
    ///
    /// # Errors
    /// [`BadFrame`] for an unknown version, a truncated field, an unknown
    /// or inconsistent flag, a zero count or trailing bytes.
    pub fn decode(plaintext: Vec<u8>) -> Result<Frame, BadFrame> {
        let mut plaintext = Zeroizing::new(plaintext);
        let (&version, rest) = plaintext.split_first().ok_or(BadFrame)?;
        let (device, rest) = rest.split_first_chunk::<4>().ok_or(BadFrame)?;
        let device_id = u32::from_be_bytes(*device);
        if version == V1 {
            let body = plaintext.split_off(5);
            return Ok(Frame {
                device_id,
                message: Some((None, body)),
                ..Frame::default()
            });
        }
        if version != V2 {
            return Err(BadFrame);
        }
        let (&flags, mut r) = rest.split_first().ok_or(BadFrame)?;
        if flags & !KNOWN != 0
            || flags & (MESSAGE | SESSION | RECEIPTS) == 0
            || (flags & RESET != 0 && flags & SESSION == 0)
            || (flags & INBOX != 0 && flags & ACCESS == 0)
        {
            return Err(BadFrame);
        }
        let mut frame = Frame {
            device_id,
            reset: flags & RESET != 0,
            ..Frame::default()
        };
        if flags & SESSION != 0 {
            frame.generation = Some(u64::from_be_bytes(take(&mut r)?));
        }
        if flags & DEAD != 0 {
            let [count] = take::<1>(&mut r)?;
            frame.dead = ids(&mut r, usize::from(count))?;
        }
        if flags & ACCESS != 0 {
            let epoch = u32::from_be_bytes(take(&mut r)?);
            let key = Zeroizing::new(take::<ACCESS_KEY_LEN>(&mut r)?);
            frame.access = Some((epoch, AccessKey::from_bytes(*key)));
            if flags & INBOX != 0 {
                let inbox = take::<32>(&mut r)?;
                let key = Zeroizing::new(take::<ACCESS_KEY_LEN>(&mut r)?);
                frame.inbox = Some((inbox, AccessKey::from_bytes(*key)));
            }
        }
        if flags & RECEIPTS != 0 {
            let count = u16::from_be_bytes(take(&mut r)?);
            frame.receipts = ids(&mut r, usize::from(count))?;
        }
        if flags & MESSAGE != 0 {
            let id = take::<16>(&mut r)?;
            let at = plaintext.len() - r.len();
            let body = plaintext.split_off(at);
            frame.message = Some((Some(id), body));
        } else if !r.is_empty() {
            return Err(BadFrame);
        }
        Ok(frame)
    }
}

fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], BadFrame> {
    let (head, tail) = r.split_first_chunk::<N>().ok_or(BadFrame)?;
    *r = tail;
    Ok(*head)
}

fn ids(r: &mut &[u8], count: usize) -> Result<Vec<[u8; 16]>, BadFrame> {
    if count == 0 || count > r.len() / 16 {
        return Err(BadFrame);
    }
    (0..count).map(|_| take::<16>(r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_field() {
        let frame = Frame {
            device_id: 7,
            generation: Some(1_700_000_000),
            reset: true,
            dead: vec![[1; 16]],
            access: Some((0x0102_0304, AccessKey::from_bytes([5; 16]))),
            inbox: Some(([9; 32], AccessKey::from_bytes([6; 16]))),
            receipts: vec![[2; 16], [3; 16]],
            message: Some((Some([4; 16]), b"hi".to_vec())),
        };
        let bytes = frame.encode();
        assert_eq!(bytes.len(), 6 + 8 + 1 + 16 + 20 + 48 + 2 + 32 + 16 + 2);
        assert_eq!(
            bytes[5],
            MESSAGE | SESSION | RESET | RECEIPTS | DEAD | ACCESS | INBOX
        );
        // ACCESS sits after DEAD and before RECEIPTS, INBOX right after it.
        let at = 6 + 8 + 1 + 16;
        assert_eq!(&bytes[at..at + 4], &[1, 2, 3, 4]);
        assert_eq!(&bytes[at + 4..at + 20], &[5; 16]);
        assert_eq!(&bytes[at + 20..at + 52], &[9; 32]);
        assert_eq!(&bytes[at + 52..at + 68], &[6; 16]);
        assert_eq!(&bytes[at + 68..at + 70], &[0, 2]);
        assert_eq!(Frame::decode(bytes.clone()).unwrap(), frame);
        // INBOX without ACCESS is refused, and so is a cut inbox.
        let mut alone = bytes.clone();
        alone[5] &= !ACCESS;
        assert_eq!(Frame::decode(alone), Err(BadFrame));
        let cut = Frame {
            receipts: Vec::new(),
            message: None,
            ..frame.clone()
        }
        .encode();
        for len in 0..cut.len() {
            assert_eq!(Frame::decode(cut[..len].to_vec()), Err(BadFrame), "{len}");
        }
    }

    #[test]
    fn access_rides_with_any_content_and_costs_21_bytes() {
        for content in [
            Frame {
                receipts: vec![[7; 16]],
                ..Frame::default()
            },
            Frame {
                generation: Some(3),
                ..Frame::default()
            },
            Frame {
                message: Some((Some([8; 16]), b"body".to_vec())),
                ..Frame::default()
            },
        ] {
            let with = Frame {
                device_id: 2,
                access: Some((9, AccessKey::from_bytes([0xaa; 16]))),
                ..content.clone()
            };
            let bytes = with.encode();
            assert_eq!(bytes.len(), content.encode().len() + ACCESS_FIELD_LEN);
            assert_eq!(Frame::decode(bytes).unwrap(), with);
        }
        // The field's bytes, in place.
        let receipts = Frame {
            device_id: 1,
            access: Some((1, AccessKey::from_bytes([0xaa; 16]))),
            receipts: vec![[9; 16]],
            ..Frame::default()
        };
        let mut want = vec![2, 0, 0, 0, 1, RECEIPTS | ACCESS, 0, 0, 0, 1];
        want.extend_from_slice(&[0xaa; 16]);
        want.extend_from_slice(&[0, 1]);
        want.extend_from_slice(&[9; 16]);
        assert_eq!(receipts.encode(), want);
    }

    #[test]
    fn malformed_access_is_refused() {
        let good = Frame {
            device_id: 1,
            access: Some((4, AccessKey::from_bytes([3; 16]))),
            receipts: vec![[9; 16]],
            ..Frame::default()
        }
        .encode();
        // Every truncation fails, and ACCESS alone is no content.
        for cut in 6..good.len() {
            assert_eq!(Frame::decode(good[..cut].to_vec()), Err(BadFrame), "{cut}");
        }
        let mut alone = vec![2, 0, 0, 0, 1, ACCESS, 0, 0, 0, 1];
        alone.extend_from_slice(&[3; 16]);
        assert_eq!(Frame::decode(alone), Err(BadFrame));
        // A frame with ACCESS but no message has nothing after its fields.
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(Frame::decode(trailing), Err(BadFrame));
        // Debug shows the epoch, never the key.
        let frame = Frame::decode(good).unwrap();
        let shown = format!("{frame:?}");
        assert!(
            shown.contains("AccessKey(..)") && !shown.contains("3, 3, 3"),
            "{shown}"
        );
    }

    #[test]
    fn malformed_frames_are_refused() {
        // Unknown flag, no content flag, RESET without SESSION, zero count,
        // trailing bytes after a receipt-only frame, truncation.
        for bad in [
            &[2, 0, 0, 0, 1, 0x40][..],
            &[2, 0, 0, 0, 1, 0x80 | RECEIPTS, 0, 1][..],
            &[2, 0, 0, 0, 1, 0][..],
            &[2, 0, 0, 0, 1, RESET | RECEIPTS, 0, 1][..],
            &[2, 0, 0, 0, 1, RECEIPTS, 0, 0][..],
            &[2, 0, 0, 0, 1, MESSAGE, 1, 2, 3][..],
            &[3, 0, 0, 0, 1][..],
            &[2, 0, 0][..],
        ] {
            assert_eq!(Frame::decode(bad.to_vec()), Err(BadFrame), "{bad:?}");
        }
        let mut receipt_only = Frame {
            device_id: 1,
            receipts: vec![[9; 16]],
            ..Frame::default()
        }
        .encode();
        receipt_only.push(0);
        assert_eq!(Frame::decode(receipt_only), Err(BadFrame));
    }

    #[test]
    fn v1_frames_still_decode() {
        let frame = Frame::decode(vec![1, 0, 0, 0, 9, b'x']).unwrap();
        assert_eq!(frame.device_id, 9);
        assert_eq!(frame.message, Some((None, b"x".to_vec())));
    }
}
