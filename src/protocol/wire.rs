//! The wire codec: messages and prekey messages (profile "Wire format").
//!
//! ```text
//! message        = 0x01 || 0x02 || header (40) || ciphertext || tag (16)
//! prekey message = 0x01 || 0x01 || IK_A (32) || EK_A (32) || spk_id (4)
//!                  || has_opk (1) || [opk_id (4)] || header (40) || ciphertext || tag (16)
//! header         = ratchet_public (32) || pn (4) || n (4)
//! ```
//!
//! Decoding never panics and never allocates: the decoded values borrow the
//! input. The ciphertext runs to the last 16 bytes, so a message with a byte
//! appended or cut still decodes (and later fails authentication).

use crate::error::{Error, Result};

/// Protocol version byte of cubbyhole/v1.
pub const VERSION: u8 = 0x01;
/// Kind byte of a prekey message.
pub const KIND_PREKEY: u8 = 0x01;
/// Kind byte of a normal message.
pub const KIND_MESSAGE: u8 = 0x02;
/// Length of the ratchet header.
pub const HEADER_LEN: usize = 40;
/// Length of the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Longest prefix (everything before the ciphertext) of any message.
pub(crate) const MAX_PREFIX_LEN: usize = 2 + 32 + 32 + 4 + 1 + 4 + HEADER_LEN;

/// A bounds-checked cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(Error::Decode(what));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::Decode(what)),
        }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }
    pub(crate) fn finish(&self, what: &'static str) -> Result<()> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(Error::Decode(what))
        }
    }
}

/// The Double Ratchet header: sender's ratchet public key, previous chain
/// length `pn`, and message number `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The sender's current ratchet public key.
    pub ratchet_key: [u8; 32],
    /// Length of the sender's previous sending chain.
    pub pn: u32,
    /// Index of this message in its sending chain.
    pub n: u32,
}

impl Header {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Header {
            ratchet_key: r.array("header ratchet key")?,
            pn: r.u32("header pn")?,
            n: r.u32("header n")?,
        })
    }
    pub(crate) fn write(&self, out: &mut alloc::vec::Vec<u8>) {
        out.extend_from_slice(&self.encoded());
    }
    /// The 40-byte encoding, without allocating.
    pub(crate) fn encoded(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        crate::protocol::ratchet::copy(
            &mut out,
            self.ratchet_key
                .iter()
                .copied()
                .chain(self.pn.to_be_bytes())
                .chain(self.n.to_be_bytes()),
        );
        out
    }
}

/// The X3DH fields of a prekey message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrekeyFields {
    /// The initiator's identity key (IK_A), as received. It is validated
    /// only when it would start a new session (profile order of checks: a
    /// repeat is matched against an existing session by its bytes first),
    /// which spares a point decompression per repeated prekey message.
    pub identity: [u8; 32],
    /// The initiator's ephemeral key (EK_A).
    pub ephemeral: [u8; 32],
    /// Id of the responder's signed prekey that was used.
    pub signed_prekey_id: u32,
    /// Id of the responder's one-time prekey that was used, if any.
    pub one_time_prekey_id: Option<u32>,
}

impl PrekeyFields {
    pub(crate) fn write(&self, out: &mut alloc::vec::Vec<u8>) {
        out.extend_from_slice(&self.identity);
        out.extend_from_slice(&self.ephemeral);
        out.extend_from_slice(&self.signed_prekey_id.to_be_bytes());
        match self.one_time_prekey_id {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(&id.to_be_bytes());
            }
            None => out.push(0),
        }
    }
}

/// A decoded message of either kind, borrowing the input bytes.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    version: u8,
    prefix: &'a [u8],
    ciphertext: &'a [u8],
    tag: &'a [u8],
    prekey: Option<PrekeyFields>,
    header: Header,
}

impl<'a> Incoming<'a> {
    /// Decodes a message or prekey message.
    ///
    /// Only the structure is checked here; the initiator's identity key in
    /// a prekey message is validated by [`crate::Session::accept`].
    ///
    /// # Errors
    /// [`Error::Decode`] for an unknown version or kind, a truncated field or
    /// a message shorter than header and tag.
    pub fn decode(raw: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(raw);
        let version = r.u8("version")?;
        if version != VERSION && version != crate::protocol::sealed::VERSION_2 {
            return Err(Error::Decode("version"));
        }
        let kind = r.u8("kind")?;
        // Version 0x02 is decoded here only as the inner prekey message of
        // a sealed prekey message (kind 0x03, SPEC.md 26.4); other v2
        // payloads are not wire messages of this decoder.
        if version == crate::protocol::sealed::VERSION_2
            && kind != crate::protocol::sealed::KIND_INNER_PREKEY
        {
            return Err(Error::Decode("version"));
        }
        let prekey = match (version, kind) {
            (VERSION, KIND_MESSAGE) => None,
            (VERSION, KIND_PREKEY)
            | (crate::protocol::sealed::VERSION_2, crate::protocol::sealed::KIND_INNER_PREKEY) => {
                Some(PrekeyFields {
                    identity: r.array("prekey identity key")?,
                    ephemeral: r.array("prekey ephemeral key")?,
                    signed_prekey_id: r.u32("prekey signed prekey id")?,
                    one_time_prekey_id: if r.bool("prekey has_opk")? {
                        Some(r.u32("prekey one-time prekey id")?)
                    } else {
                        None
                    },
                })
            }
            _ => return Err(Error::Decode("kind")),
        };
        let header = Header::read(&mut r)?;
        let body = r.remaining();
        let ciphertext = r.take(body.saturating_sub(TAG_LEN), "ciphertext")?;
        let tag = r.take(TAG_LEN, "tag")?;
        let (prefix, _) = raw.split_at(raw.len() - body);
        Ok(Incoming {
            version,
            prefix,
            ciphertext,
            tag,
            prekey,
            header,
        })
    }

    /// Whether this is the inner prekey message of a v2 sealed prekey
    /// message (version 0x02, kind 0x03), as [`open_sealed_prekey`] returns
    /// it; such a message starts or continues a v2 session only.
    ///
    /// [`open_sealed_prekey`]: crate::protocol::sealed::open_sealed_prekey
    pub fn is_sealed_inner(&self) -> bool {
        self.version == crate::protocol::sealed::VERSION_2
    }

    /// The X3DH fields, if this is a prekey message.
    pub fn prekey(&self) -> Option<&PrekeyFields> {
        self.prekey.as_ref()
    }

    /// The ratchet header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Every byte before the ciphertext (bound into the AEAD).
    pub(crate) fn prefix(&self) -> &'a [u8] {
        self.prefix
    }

    /// The ciphertext without the tag.
    pub(crate) fn ciphertext(&self) -> &'a [u8] {
        self.ciphertext
    }

    /// The 16-byte tag.
    pub(crate) fn tag(&self) -> &'a [u8] {
        self.tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `MAX_PREFIX_LEN` is exactly the longest prefix (a prekey message
    /// naming a one-time prekey): the associated-data buffers are sized by
    /// it, so a smaller value would cut the AD and a larger one hides a
    /// layout change.
    #[test]
    fn max_prefix_len_is_the_longest_prefix() {
        let mut raw = alloc::vec![VERSION, KIND_PREKEY];
        PrekeyFields {
            identity: [1; 32],
            ephemeral: [2; 32],
            signed_prekey_id: 3,
            one_time_prekey_id: Some(4),
        }
        .write(&mut raw);
        raw.extend_from_slice(&[5; HEADER_LEN]);
        raw.extend_from_slice(&[6; TAG_LEN]);
        let longest = Incoming::decode(&raw).map(|m| m.prefix().len());
        assert_eq!(longest, Ok(MAX_PREFIX_LEN));
        let mut normal = alloc::vec![VERSION, KIND_MESSAGE];
        normal.extend_from_slice(&[5; HEADER_LEN + TAG_LEN]);
        let shortest = Incoming::decode(&normal).map(|m| m.prefix().len());
        assert_eq!(shortest, Ok(2 + HEADER_LEN));
    }
}
