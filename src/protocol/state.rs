//! Session state encoding (version 2 for profile v1 sessions, version 3
//! for profile v2 sessions: version 2's layout with the header keys after
//! the chain keys they belong to and one per skipped chain, SPEC.md 26.9),
//! so that sessions survive restarts.
//!
//! All integers big-endian. The encoding holds secret keys: store it
//! encrypted, and drop it promptly (it is returned in a zeroizing buffer).
//! It holds nothing the owner of the session already knows: the two
//! identity keys (the caller gives them back to [`Session::from_bytes`]; a session
//! restored with the wrong ones decrypts nothing and its messages are
//! rejected by the peer, as the identities are part of every message's
//! associated data), our ratchet public key (recomputed from its secret),
//! default limits and an empty skipped-key store. Without skipped keys a
//! state is at most 190 bytes (198 with non-default limits).
//!
//! ```text
//! version (1) = 0x02
//! flags   (1) = bit 0: responder (else initiator)
//!               bit 1: sending chain present (requires bit 5)
//!               bit 2: receiving chain present
//!               bit 3: initiator still sends prekey messages
//!               bit 4: ... and they name a one-time prekey
//!               bit 5: our ratchet secret present
//!               bit 6: limits other than the defaults
//!               bit 7: skipped message keys present
//! EK_A (32) || spk_id (4) [|| opk_id (4)]      if bit 3 [and bit 4]
//! SHA-256(EK_A)[..16] (16)                     if responder (bit 0)
//! root key (32)
//! our ratchet secret (32)                      if bit 5
//! remote ratchet key (32)
//! sending chain key (32)                       if bit 1
//! ns (4) || pn (4)
//! receiving chain key (32)                     if bit 2
//! nr (4)
//! max_skip (4) || max_skipped_keys (4)         if bit 6
//! chain count (4, >= 1), then per chain,       if bit 7
//!   oldest first: ratchet key (32) || key count (4)
//!                 || key count x (n (4) || message key (32))
//! ```
//!
//! The responder keeps a 16-byte digest of EK_A instead of EK_A: all it
//! needs is to recognise further prekey messages of this session
//! ([`Session::matches`]), and telling two ephemeral keys apart by the
//! digest fails only for a second preimage of a 128-bit truncated SHA-256.
//!
//! Decoding checks every length against the remaining input before it
//! allocates, rejects unknown versions, flags, trailing bytes, default
//! limits marked as non-default, empty or repeated chains, a current
//! receiving chain that is not the newest, unsorted counters, more stored
//! keys than the cap, and limits above [`SessionConfig::LIMIT_MAX_SKIP`] and
//! [`SessionConfig::LIMIT_MAX_SKIPPED_KEYS`] (a corrupted state must not turn
//! one message into an unbounded amount of work). The encoding is
//! canonical: a state that decodes encodes to the same bytes.

use alloc::boxed::Box;
use alloc::collections::{BTreeSet, VecDeque};
use alloc::vec::Vec;

use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::protocol::keys::{IdentityKey, KeyPair};
use crate::protocol::ratchet::{
    copy, ChainKey, HeaderKey, HeaderKeys, MessageKey, Ratchet, RootKey, SessionConfig,
    SkippedChain, SkippedKeys,
};
use crate::protocol::session::{Role, Session};
use crate::protocol::wire::Reader;

/// The state encoding version of profile v1 sessions.
pub const STATE_VERSION: u8 = 2;
/// The state encoding version of profile v2 sessions: version 2's layout
/// with the header keys added (SPEC.md 26.9).
pub const STATE_VERSION_SEALED: u8 = 3;

/// Bytes of the digest of EK_A a responder keeps to recognise its
/// session's prekey messages.
pub(crate) const SESSION_TAG_LEN: usize = 16;

/// The first [`SESSION_TAG_LEN`] bytes of SHA-256(EK_A).
pub(crate) fn session_tag(ephemeral: &[u8; 32]) -> [u8; SESSION_TAG_LEN] {
    let mut tag = [0u8; SESSION_TAG_LEN];
    copy(&mut tag, Sha256::digest(ephemeral));
    tag
}

const RESPONDER: u8 = 1;
const HAS_SENDING: u8 = 2;
const HAS_RECEIVING: u8 = 4;
const PENDING_PREKEY: u8 = 8;
const PENDING_OPK: u8 = 16;
const HAS_DHS: u8 = 32;
const CUSTOM_LIMITS: u8 = 64;
const HAS_SKIPPED: u8 = 128;

pub(crate) fn encode(s: &Session) -> Zeroizing<Vec<u8>> {
    let r = &s.ratchet;
    let mut out = Zeroizing::new(Vec::with_capacity(
        200 + r.skipped.len * 36 + r.skipped.chains.len() * 36,
    ));
    let mut flags = 0;
    if s.role == Role::Responder {
        flags |= RESPONDER;
    }
    if r.dhs.is_some() {
        flags |= HAS_DHS;
    }
    if r.sending.is_some() {
        flags |= HAS_SENDING;
    }
    if r.receiving.is_some() {
        flags |= HAS_RECEIVING;
    }
    if let Some((_, opk)) = s.pending_prekey {
        flags |= PENDING_PREKEY;
        if opk.is_some() {
            flags |= PENDING_OPK;
        }
    }
    if r.config != SessionConfig::default() {
        flags |= CUSTOM_LIMITS;
    }
    if !r.skipped.chains.is_empty() {
        flags |= HAS_SKIPPED;
    }
    let header = r.header.as_ref();
    out.push(if header.is_some() {
        STATE_VERSION_SEALED
    } else {
        STATE_VERSION
    });
    out.push(flags);
    if let Some((spk, opk)) = s.pending_prekey {
        out.extend_from_slice(&s.ephemeral);
        out.extend_from_slice(&spk.to_be_bytes());
        if let Some(opk) = opk {
            out.extend_from_slice(&opk.to_be_bytes());
        }
    }
    if s.role == Role::Responder {
        out.extend_from_slice(&s.tag);
    }
    out.extend_from_slice(&r.root.0);
    if let Some(dhs) = &r.dhs {
        out.extend_from_slice(dhs.secret.as_bytes());
    }
    // A stored session always has a remote ratchet key (SPK_B at first).
    out.extend_from_slice(r.dhr.as_ref().unwrap_or(&[0; 32]));
    if let Some(ck) = &r.sending {
        out.extend_from_slice(&ck.0);
        if let Some(h) = header {
            out.extend_from_slice(h.sending.as_ref().map_or(&[0; 32], |k| &k.0));
        }
    }
    out.extend_from_slice(&r.ns.to_be_bytes());
    out.extend_from_slice(&r.pn.to_be_bytes());
    if let Some(ck) = &r.receiving {
        out.extend_from_slice(&ck.0);
        if let Some(h) = header {
            out.extend_from_slice(h.receiving.as_ref().map_or(&[0; 32], |k| &k.0));
        }
    }
    out.extend_from_slice(&r.nr.to_be_bytes());
    if flags & CUSTOM_LIMITS != 0 {
        out.extend_from_slice(&r.config.max_skip.to_be_bytes());
        out.extend_from_slice(&r.config.max_skipped_keys.to_be_bytes());
    }
    if flags & HAS_SKIPPED != 0 {
        out.extend_from_slice(&(r.skipped.chains.len() as u32).to_be_bytes());
        for chain in &r.skipped.chains {
            out.extend_from_slice(&chain.ratchet_key);
            if header.is_some() {
                out.extend_from_slice(chain.header_key.as_ref().map_or(&[0; 32], |k| &k.0));
            }
            out.extend_from_slice(&(chain.keys.len() as u32).to_be_bytes());
            for (n, mk) in &chain.keys {
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(&mk.0);
            }
        }
    }
    out
}

/// A reader whose errors are [`Error::State`].
struct StateReader<'a>(Reader<'a>);

impl<'a> StateReader<'a> {
    fn map<T>(r: Result<T>) -> Result<T> {
        r.map_err(|e| match e {
            Error::Decode(what) => Error::State(what),
            other => other,
        })
    }
    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Self::map(self.0.u8(what))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Self::map(self.0.u32(what))
    }
    fn key(&mut self, what: &'static str) -> Result<[u8; 32]> {
        Self::map(self.0.array(what))
    }
    fn secret(&mut self, what: &'static str) -> Result<Zeroizing<[u8; 32]>> {
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(Self::map(self.0.take(32, what))?);
        Ok(out)
    }
    fn key16(&mut self, what: &'static str) -> Result<[u8; 16]> {
        Self::map(self.0.array(what))
    }
}

pub(crate) fn decode(bytes: &[u8], local: &IdentityKey, remote: &IdentityKey) -> Result<Session> {
    let mut r = StateReader(Reader::new(bytes));
    let v2 = match r.u8("state version")? {
        STATE_VERSION => false,
        STATE_VERSION_SEALED => true,
        _ => return Err(Error::State("state version")),
    };
    let mut header = v2.then(HeaderKeys::default);
    let flags = r.u8("state flags")?;
    let role = if flags & RESPONDER != 0 {
        Role::Responder
    } else {
        Role::Initiator
    };
    if (flags & HAS_SENDING != 0 && flags & HAS_DHS == 0)
        || (flags & PENDING_OPK != 0 && flags & PENDING_PREKEY == 0)
        || (flags & PENDING_PREKEY != 0 && role != Role::Initiator)
    {
        return Err(Error::State("state flags"));
    }
    let mut ephemeral = [0u8; 32];
    let mut tag = [0u8; SESSION_TAG_LEN];
    let pending_prekey = if flags & PENDING_PREKEY != 0 {
        ephemeral = r.key("state ephemeral key")?;
        tag = session_tag(&ephemeral);
        let spk = r.u32("state signed prekey id")?;
        let opk = if flags & PENDING_OPK != 0 {
            Some(r.u32("state one-time prekey id")?)
        } else {
            None
        };
        Some((spk, opk))
    } else {
        None
    };
    if role == Role::Responder {
        tag = r.key16("state session tag")?;
    }
    let root = RootKey(*r.secret("state root key")?);
    let dhs = if flags & HAS_DHS != 0 {
        let secret = StaticSecret::from(*r.secret("state ratchet secret")?);
        let public = PublicKey::from(&secret).to_bytes();
        Some(KeyPair { secret, public })
    } else {
        None
    };
    let dhr = Some(r.key("state remote ratchet key")?);
    let sending = if flags & HAS_SENDING != 0 {
        let ck = ChainKey(*r.secret("state sending chain")?);
        if let Some(h) = header.as_mut() {
            h.sending = Some(HeaderKey(*r.secret("state sending header key")?));
        }
        Some(ck)
    } else {
        None
    };
    let ns = r.u32("state ns")?;
    let pn = r.u32("state pn")?;
    let receiving = if flags & HAS_RECEIVING != 0 {
        let ck = ChainKey(*r.secret("state receiving chain")?);
        if let Some(h) = header.as_mut() {
            h.receiving = Some(HeaderKey(*r.secret("state receiving header key")?));
        }
        Some(ck)
    } else {
        None
    };
    let nr = r.u32("state nr")?;
    let config = if flags & CUSTOM_LIMITS != 0 {
        let config = SessionConfig {
            max_skip: r.u32("state max_skip")?,
            max_skipped_keys: r.u32("state max_skipped_keys")?,
        };
        if config != config.clamped() || config == SessionConfig::default() {
            return Err(Error::State("state limits"));
        }
        config
    } else {
        SessionConfig::default()
    };
    let chain_count = if flags & HAS_SKIPPED != 0 {
        let count = r.u32("state chain count")? as usize;
        if count == 0 || count > config.max_skipped_keys as usize {
            return Err(Error::State("state chain count"));
        }
        count
    } else {
        0
    };
    let mut skipped = SkippedKeys::default();
    let mut seen_chains = BTreeSet::new();
    for _ in 0..chain_count {
        let ratchet_key = r.key("state skipped chain key")?;
        let header_key = if v2 {
            Some(HeaderKey(*r.secret("state skipped chain header key")?))
        } else {
            None
        };
        let count = r.u32("state skipped key count")? as usize;
        if count == 0
            || skipped.len + count > config.max_skipped_keys as usize
            || count > r.0.remaining() / 36
            || !seen_chains.insert(ratchet_key)
        {
            return Err(Error::State("state skipped key count"));
        }
        let mut keys = VecDeque::with_capacity(count);
        let mut last: Option<u32> = None;
        for _ in 0..count {
            let n = r.u32("state skipped key n")?;
            if last.is_some_and(|l| n <= l) {
                return Err(Error::State("state skipped key order"));
            }
            last = Some(n);
            keys.push_back((
                n,
                Box::new(MessageKey(*r.secret("state skipped message key")?)),
            ));
        }
        skipped.len += count;
        skipped.chains.push_back(SkippedChain {
            ratchet_key,
            header_key,
            keys,
        });
    }
    // Keys are stored chain by chain, and the chain of the current
    // receiving key is the newest: if it has stored keys, it is the last.
    // (The ratchet appends later skips of the current chain to that chain.)
    if let Some(pos) = skipped
        .chains
        .iter()
        .position(|c| Some(c.ratchet_key) == dhr)
    {
        if pos + 1 != skipped.chains.len() {
            return Err(Error::State("state skipped chain order"));
        }
    }
    StateReader::map(r.0.finish("state trailing bytes"))?;
    Ok(Session {
        role,
        local: *local,
        remote: *remote,
        ephemeral,
        tag,
        pending_prekey,
        ratchet: Box::new(Ratchet {
            root,
            dhs,
            dhr,
            sending,
            ns,
            pn,
            receiving,
            nr,
            skipped,
            config,
            header,
        }),
    })
}
