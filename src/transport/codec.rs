//! Encodings of the directory upload, the mailbox proof, envelopes, and the
//! bodies and queries of the relay's HTTP API (one implementation for the
//! server and the client; `relay/API.md` describes them).
//!
//! ```text
//! upload = 0x01 || identity (32) || device_id (4) || counter (8)
//!          || spk_id (4) || spk_created (8) || spk_public (32) || spk_signature (64)
//!          || replace_one_time_prekeys (1: 0x00 | 0x01)
//!          || opk_count (2) || opk_count x (opk_id (4) || opk_public (32))
//!          || signature (64)
//!   signature = Ed25519 by the identity key over
//!               "cubbyhole/v1 directory upload" || every byte before it
//!
//! upload v2 = 0x02 || the v1 fields from identity to the one-time prekeys
//!          || has_verifier (1: 0x00 | 0x01) || [access_verifier (32)]
//!          || has_stamp (1: 0x00 | 0x01) || [identity stamp (16)]
//!          || signature (64)        (same label, over every byte before it)
//!   (encoded as v2 exactly when a verifier or a stamp is present;
//!    SPEC.md 16.10, 16.11)
//!
//! auth   = identity (32) || device_id (4) || op (1: 0x01 fetch | 0x02 acknowledge)
//!          || challenge (32) || signature (64)
//!   signature = Ed25519 by the identity key over
//!               "cubbyhole/v1 mailbox auth" || mailbox_id (32) || op || challenge
//!
//! envelope       = 0x01 || id (16) || payload
//! envelope list  = (length (4) || envelope)*         (a fetch answer)
//! acknowledgement = auth (133) || count (2) || count x id (16)
//! (the HTTP API's fetch query is `cubbyhole_http::wire::FetchQuery`)
//! ```
//!
//! Every decoder is total (an error, never a panic, for any input) and
//! allocates no more than the input's size justifies: a count or length
//! field is checked against the bytes actually present before anything is
//! reserved for it.

use alloc::vec::Vec;

use crate::protocol::keys::{
    spk_signed_message, IdentityKey, IdentityKeyPair, OneTimePrekey, SignedPrekey,
};
use crate::protocol::wire::Reader;
use crate::transport::stamp::{Stamp, STAMP_LEN};
use crate::transport::{
    AccessVerifier, DeviceAddress, Envelope, EnvelopeId, MailboxId, TransportError,
};

const UPLOAD_LABEL: &[u8] = b"cubbyhole/v1 directory upload";
const AUTH_LABEL: &[u8] = b"cubbyhole/v1 mailbox auth";
const UPLOAD_VERSION: u8 = 0x01;
const UPLOAD_VERSION_2: u8 = 0x02;

fn bad(what: &'static str) -> impl Fn(crate::Error) -> TransportError {
    move |_| TransportError::BadRequest(what)
}

/// A signed prekey as published: id, creation time, public key, signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedPrekeyRecord {
    /// Prekey id.
    pub id: u32,
    /// Creation time (unix seconds).
    pub created: u64,
    /// X25519 public key.
    pub public: [u8; 32],
    /// Ed25519 signature by the identity key (profile layout).
    pub signature: [u8; 64],
}

impl SignedPrekeyRecord {
    /// The public record of an owner's signed prekey.
    pub fn of(key: &SignedPrekey) -> Self {
        SignedPrekeyRecord {
            id: key.id(),
            created: key.created(),
            public: *key.public(),
            signature: *key.signature(),
        }
    }
}

/// A device's bundle set, as uploaded to the directory: identity, current
/// signed prekey and one-time prekeys, under a counter that must grow with
/// every upload (so an old upload cannot be replayed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleSetUpload {
    /// The uploading device.
    pub device: DeviceAddress,
    /// Must be above the counter of the last accepted upload of the device
    /// (a clock reading in seconds or milliseconds works).
    pub counter: u64,
    /// The current signed prekey.
    pub signed_prekey: SignedPrekeyRecord,
    /// Replace the directory's pool of one-time prekeys instead of adding
    /// to it.
    pub replace_one_time_prekeys: bool,
    /// One-time prekeys (id, X25519 public key).
    pub one_time_prekeys: Vec<(u32, [u8; 32])>,
    /// The verifier of the device mailbox's deposit access key (SPEC.md
    /// 16.6): the relay admits to the contacts' share the deposits that
    /// show the key. `None` keeps the one the relay holds (none for a
    /// first upload: every deposit then needs a stamp).
    pub access_verifier: Option<AccessVerifier>,
    /// The identity stamp a device's first upload needs at a relay that
    /// prices new identities (SPEC.md 16.11); ignored on later uploads.
    pub identity_stamp: Option<Stamp>,
}

impl BundleSetUpload {
    /// Builds an upload of the owner's keys.
    pub fn new(
        device_id: u32,
        identity: &IdentityKeyPair,
        counter: u64,
        signed_prekey: &SignedPrekey,
        one_time_prekeys: &[&OneTimePrekey],
        replace_one_time_prekeys: bool,
    ) -> Self {
        BundleSetUpload {
            device: DeviceAddress::new(identity.public(), device_id),
            counter,
            signed_prekey: SignedPrekeyRecord::of(signed_prekey),
            replace_one_time_prekeys,
            one_time_prekeys: one_time_prekeys
                .iter()
                .map(|k| (k.id(), *k.public()))
                .collect(),
            access_verifier: None,
            identity_stamp: None,
        }
    }

    /// Whether this upload encodes as version 2 (a verifier or a stamp).
    fn is_v2(&self) -> bool {
        self.access_verifier.is_some() || self.identity_stamp.is_some()
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(155 + 36 * self.one_time_prekeys.len() + 64 + 50);
        out.push(if self.is_v2() {
            UPLOAD_VERSION_2
        } else {
            UPLOAD_VERSION
        });
        out.extend_from_slice(&self.device.identity);
        out.extend_from_slice(&self.device.device_id.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        let spk = &self.signed_prekey;
        out.extend_from_slice(&spk.id.to_be_bytes());
        out.extend_from_slice(&spk.created.to_be_bytes());
        out.extend_from_slice(&spk.public);
        out.extend_from_slice(&spk.signature);
        out.push(u8::from(self.replace_one_time_prekeys));
        let count = u16::try_from(self.one_time_prekeys.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for (id, key) in self.one_time_prekeys.iter().take(usize::from(count)) {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(key);
        }
        if self.is_v2() {
            match &self.access_verifier {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&v.0);
                }
                None => out.push(0),
            }
            match &self.identity_stamp {
                Some(stamp) => {
                    out.push(1);
                    out.extend_from_slice(&stamp.encode());
                }
                None => out.push(0),
            }
        }
        out
    }

    /// Encodes and signs the upload with the device's identity key (which
    /// must be the key named in the upload). At most 65535 one-time prekeys
    /// are encoded.
    pub fn sign(&self, identity: &IdentityKeyPair) -> Vec<u8> {
        let mut out = self.body();
        let mut message = Vec::with_capacity(UPLOAD_LABEL.len() + out.len());
        message.extend_from_slice(UPLOAD_LABEL);
        message.extend_from_slice(&out);
        out.extend_from_slice(&identity.sign(&message));
        out
    }

    /// Decodes an upload and checks, in order: structure, identity key,
    /// upload signature, signed-prekey signature.
    ///
    /// # Errors
    /// [`TransportError::BadRequest`] for malformed bytes or an invalid key,
    /// [`TransportError::Unauthorized`] for a signature that fails.
    pub fn decode_verified(bytes: &[u8]) -> Result<Self, TransportError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("upload version").map_err(bad("upload version"))?;
        if version != UPLOAD_VERSION && version != UPLOAD_VERSION_2 {
            return Err(TransportError::BadRequest("upload version"));
        }
        let identity: [u8; 32] = r.array("upload identity").map_err(bad("upload identity"))?;
        let device_id = r.u32("upload device").map_err(bad("upload device"))?;
        let counter = r.u64("upload counter").map_err(bad("upload counter"))?;
        let spk = SignedPrekeyRecord {
            id: r.u32("").map_err(bad("upload signed prekey"))?,
            created: r.u64("").map_err(bad("upload signed prekey"))?,
            public: r.array("").map_err(bad("upload signed prekey"))?,
            signature: r.array("").map_err(bad("upload signed prekey"))?,
        };
        let replace = r.bool("").map_err(bad("upload replace flag"))?;
        let count = usize::from(u16::from_be_bytes(
            r.array("").map_err(bad("upload count"))?,
        ));
        // v1: exactly the prekeys and the signature; v2: at least the two
        // flags besides (their optional fields are checked as read).
        let fixed = count * 36 + 64;
        let length_ok = if version == UPLOAD_VERSION {
            r.remaining() == fixed
        } else {
            r.remaining() >= fixed + 2 && r.remaining() <= fixed + 2 + 32 + STAMP_LEN
        };
        if !length_ok {
            return Err(TransportError::BadRequest("upload length"));
        }
        let mut one_time_prekeys = Vec::with_capacity(count);
        for _ in 0..count {
            let id = r.u32("").map_err(bad("upload one-time prekey"))?;
            let key: [u8; 32] = r.array("").map_err(bad("upload one-time prekey"))?;
            one_time_prekeys.push((id, key));
        }
        let mut access_verifier = None;
        let mut identity_stamp = None;
        if version == UPLOAD_VERSION_2 {
            if r.bool("").map_err(bad("upload verifier flag"))? {
                access_verifier =
                    Some(AccessVerifier(r.array("").map_err(bad("upload verifier"))?));
            }
            if r.bool("").map_err(bad("upload stamp flag"))? {
                let bytes: [u8; STAMP_LEN] = r.array("").map_err(bad("upload stamp"))?;
                identity_stamp = Some(
                    Stamp::decode(&bytes)
                        .map_err(|_| TransportError::BadRequest("upload stamp"))?,
                );
            }
            if r.remaining() != 64 {
                return Err(TransportError::BadRequest("upload length"));
            }
            if access_verifier.is_none() && identity_stamp.is_none() {
                // The encoding of such an upload is v1: one upload, one
                // encoding.
                return Err(TransportError::BadRequest("upload version"));
            }
        }
        let signed_len = bytes.len() - 64;
        let signature: [u8; 64] = r.array("").map_err(bad("upload signature"))?;
        let key = IdentityKey::from_array(&identity).map_err(bad("upload identity key"))?;
        let mut message = Vec::with_capacity(UPLOAD_LABEL.len() + signed_len);
        message.extend_from_slice(UPLOAD_LABEL);
        message.extend_from_slice(&bytes[..signed_len]);
        key.verify_strict(&message, &signature)
            .map_err(|_| TransportError::Unauthorized)?;
        key.verify_strict(
            &spk_signed_message(spk.id, spk.created, &spk.public),
            &spk.signature,
        )
        .map_err(|_| TransportError::Unauthorized)?;
        Ok(BundleSetUpload {
            device: DeviceAddress {
                identity,
                device_id,
            },
            counter,
            signed_prekey: spk,
            replace_one_time_prekeys: replace,
            one_time_prekeys,
            access_verifier,
            identity_stamp,
        })
    }
}

/// Which mailbox operation a proof authorizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxOp {
    /// Fetch pending envelopes.
    Fetch,
    /// Acknowledge (delete) envelopes.
    Acknowledge,
}

impl MailboxOp {
    fn byte(self) -> u8 {
        match self {
            MailboxOp::Fetch => 1,
            MailboxOp::Acknowledge => 2,
        }
    }
}

/// Proof that the requester holds the identity key of a mailbox's owner,
/// over a fresh challenge from the relay, for one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxAuth {
    /// The owner device.
    pub device: DeviceAddress,
    /// The operation.
    pub op: MailboxOp,
    /// The relay's challenge.
    pub challenge: [u8; 32],
    /// Ed25519 signature (see the module docs).
    pub signature: [u8; 64],
}

/// Encoded length of a [`MailboxAuth`].
pub const MAILBOX_AUTH_LEN: usize = 32 + 4 + 1 + 32 + 64;

fn auth_message(mailbox: &MailboxId, op: MailboxOp, challenge: &[u8; 32]) -> Vec<u8> {
    [AUTH_LABEL, &mailbox.0, &[op.byte()], challenge].concat()
}

impl MailboxAuth {
    /// Signs a proof for the owner's mailbox.
    pub fn sign(
        identity: &IdentityKeyPair,
        device_id: u32,
        op: MailboxOp,
        challenge: [u8; 32],
    ) -> Self {
        let device = DeviceAddress::new(identity.public(), device_id);
        let signature = identity.sign(&auth_message(&device.mailbox(), op, &challenge));
        MailboxAuth {
            device,
            op,
            challenge,
            signature,
        }
    }

    /// The mailbox this proof is for.
    pub fn mailbox(&self) -> MailboxId {
        self.device.mailbox()
    }

    /// Checks the signature (not the challenge's freshness: the relay does).
    ///
    /// # Errors
    /// [`TransportError::Unauthorized`].
    pub fn verify(&self) -> Result<(), TransportError> {
        let key = IdentityKey::from_array(&self.device.identity)
            .map_err(|_| TransportError::Unauthorized)?;
        key.verify_strict(
            &auth_message(&self.mailbox(), self.op, &self.challenge),
            &self.signature,
        )
        .map_err(|_| TransportError::Unauthorized)
    }

    /// The encoding (for network transports).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAILBOX_AUTH_LEN);
        out.extend_from_slice(&self.device.identity);
        out.extend_from_slice(&self.device.device_id.to_be_bytes());
        out.push(self.op.byte());
        out.extend_from_slice(&self.challenge);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes (does not verify) a proof.
    ///
    /// # Errors
    /// [`TransportError::BadRequest`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TransportError> {
        let mut r = Reader::new(bytes);
        let identity = r.array("").map_err(bad("auth"))?;
        let device_id = r.u32("").map_err(bad("auth"))?;
        let op = match r.u8("").map_err(bad("auth"))? {
            1 => MailboxOp::Fetch,
            2 => MailboxOp::Acknowledge,
            _ => return Err(TransportError::BadRequest("auth op")),
        };
        let challenge = r.array("").map_err(bad("auth"))?;
        let signature = r.array("").map_err(bad("auth"))?;
        r.finish("").map_err(bad("auth length"))?;
        Ok(MailboxAuth {
            device: DeviceAddress {
                identity,
                device_id,
            },
            op,
            challenge,
            signature,
        })
    }
}

/// Envelope encoding for network transports and stores:
/// `0x01 || id (16) || payload`.
pub fn encode_envelope(envelope: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + envelope.payload.len());
    out.push(0x01);
    out.extend_from_slice(&envelope.id.0);
    out.extend_from_slice(&envelope.payload);
    out
}

/// Decodes [`encode_envelope`].
///
/// # Errors
/// [`TransportError::BadRequest`].
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, TransportError> {
    let mut r = Reader::new(bytes);
    if r.u8("").map_err(bad("envelope version"))? != 0x01 {
        return Err(TransportError::BadRequest("envelope version"));
    }
    let id = r.array("").map_err(bad("envelope id"))?;
    let payload = r.take(r.remaining(), "").map_err(bad("envelope"))?.to_vec();
    Ok(Envelope {
        id: EnvelopeId(id),
        payload,
    })
}

/// Encodes a list of envelopes (the relay's answer to a fetch): for each,
/// `length (4, big-endian) || encode_envelope(envelope)`. An empty list is
/// empty bytes.
pub fn encode_envelope_list(envelopes: &[Envelope]) -> Vec<u8> {
    let mut out = Vec::with_capacity(envelopes.iter().map(|e| 21 + e.payload.len()).sum());
    for envelope in envelopes {
        let encoded = encode_envelope(envelope);
        // An envelope never comes near 4 GiB (the relay bounds payloads).
        let length = u32::try_from(encoded.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&encoded);
    }
    out
}

/// Decodes [`encode_envelope_list`].
///
/// # Errors
/// [`TransportError::BadRequest`] for a length that overruns the bytes, or
/// an envelope that does not decode.
pub fn decode_envelope_list(mut bytes: &[u8]) -> Result<Vec<Envelope>, TransportError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (length, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or(TransportError::BadRequest("envelope list length"))?;
        let length = usize::try_from(u32::from_be_bytes(*length))
            .map_err(|_| TransportError::BadRequest("envelope list length"))?;
        if rest.len() < length {
            return Err(TransportError::BadRequest("envelope list length"));
        }
        let (one, rest) = rest.split_at(length);
        out.push(decode_envelope(one)?);
        bytes = rest;
    }
    Ok(out)
}

/// Most envelope ids one acknowledgement body can carry (its count field
/// is 2 bytes; a relay may accept fewer).
pub const MAX_ACKNOWLEDGE_IDS_ENCODED: usize = u16::MAX as usize;

const ACKNOWLEDGE_MALFORMED: &str = "acknowledgement: expected proof (133) || count (2) || ids";
const ACKNOWLEDGE_COUNT: &str = "acknowledgement: the id count does not match the body length";

/// Encodes an acknowledgement request body:
/// `auth.encode() || count (2, big-endian) || count x id (16)`.
///
/// Returns `None` for more than [`MAX_ACKNOWLEDGE_IDS_ENCODED`] ids.
pub fn encode_acknowledge(auth: &MailboxAuth, ids: &[EnvelopeId]) -> Option<Vec<u8>> {
    let count = u16::try_from(ids.len()).ok()?;
    let mut out = Vec::with_capacity(MAILBOX_AUTH_LEN + 2 + 16 * ids.len());
    out.extend_from_slice(&auth.encode());
    out.extend_from_slice(&count.to_be_bytes());
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    Some(out)
}

/// Decodes [`encode_acknowledge`]: first the structure (proof length, count,
/// ids), then the proof ([`MailboxAuth::decode`]; not verified).
///
/// # Errors
/// [`TransportError::BadRequest`].
pub fn decode_acknowledge(bytes: &[u8]) -> Result<(MailboxAuth, Vec<EnvelopeId>), TransportError> {
    let malformed = TransportError::BadRequest(ACKNOWLEDGE_MALFORMED);
    let (auth, rest) = bytes
        .split_at_checked(MAILBOX_AUTH_LEN)
        .ok_or(malformed.clone())?;
    let (count, ids) = rest.split_first_chunk::<2>().ok_or(malformed)?;
    let count = usize::from(u16::from_be_bytes(*count));
    if ids.len() != count * 16 {
        return Err(TransportError::BadRequest(ACKNOWLEDGE_COUNT));
    }
    let auth = MailboxAuth::decode(auth)?;
    let mut out = Vec::with_capacity(count);
    for chunk in ids.chunks_exact(16) {
        let mut id = [0u8; 16];
        id.copy_from_slice(chunk);
        out.push(EnvelopeId(id));
    }
    Ok((auth, out))
}
