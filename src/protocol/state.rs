//! Session state encoding (version 1), so that sessions survive restarts.
//!
//! All integers big-endian. The encoding holds secret keys: store it
//! encrypted, and drop it promptly (it is returned in a zeroizing buffer).
//!
//! ```text
//! version (1) = 0x01
//! role    (1) = 0x00 initiator | 0x01 responder
//! flags   (1) = bit 0: remote ratchet key present (always, in a stored session)
//!               bit 1: sending chain present
//!               bit 2: receiving chain present
//!               bit 3: initiator still sends prekey messages
//!               bit 4: ... and they name a one-time prekey
//!               bit 5: our ratchet key pair present
//! local identity (32) || remote identity (32) || ephemeral EK_A (32)
//! [spk_id (4) [|| opk_id (4)]]                  if bit 3 [and bit 4]
//! root key (32)
//! our ratchet secret (32) || our ratchet public (32)   if bit 5
//! remote ratchet key (32)                       if bit 0
//! sending chain key (32)                        if bit 1
//! ns (4) || pn (4)
//! receiving chain key (32)                      if bit 2
//! nr (4)
//! max_skip (4) || max_skipped_keys (4)
//! chain count (4), then per chain, oldest first:
//!   ratchet key (32) || key count (4) || key count x (n (4) || message key (32))
//! ```
//!
//! Decoding checks every length against the remaining input before it
//! allocates, rejects unknown versions, flags, trailing bytes, empty or
//! repeated chains, a current receiving chain that is not the newest,
//! unsorted counters, more stored keys than the cap, and
//! limits above [`SessionConfig::LIMIT_MAX_SKIP`] and
//! [`SessionConfig::LIMIT_MAX_SKIPPED_KEYS`] (a corrupted state must not turn
//! one message into an unbounded amount of work).

use alloc::boxed::Box;
use alloc::collections::{BTreeSet, VecDeque};
use alloc::vec::Vec;

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::protocol::keys::{IdentityKey, KeyPair};
use crate::protocol::ratchet::{
    ChainKey, MessageKey, Ratchet, RootKey, SessionConfig, SkippedChain, SkippedKeys,
};
use crate::protocol::session::{Role, Session};
use crate::protocol::wire::Reader;

/// The current state encoding version.
pub const STATE_VERSION: u8 = 1;

const HAS_DHR: u8 = 1;
const HAS_SENDING: u8 = 2;
const HAS_RECEIVING: u8 = 4;
const PENDING_PREKEY: u8 = 8;
const PENDING_OPK: u8 = 16;
const HAS_DHS: u8 = 32;

pub(crate) fn encode(s: &Session) -> Zeroizing<Vec<u8>> {
    let r = &s.ratchet;
    let mut out = Zeroizing::new(Vec::with_capacity(
        400 + r.skipped.len * 36 + r.skipped.chains.len() * 36,
    ));
    let mut flags = 0;
    if r.dhr.is_some() {
        flags |= HAS_DHR;
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
    out.push(STATE_VERSION);
    out.push(match s.role {
        Role::Initiator => 0,
        Role::Responder => 1,
    });
    out.push(flags);
    out.extend_from_slice(s.local.as_bytes());
    out.extend_from_slice(s.remote.as_bytes());
    out.extend_from_slice(&s.ephemeral);
    if let Some((spk, opk)) = s.pending_prekey {
        out.extend_from_slice(&spk.to_be_bytes());
        if let Some(opk) = opk {
            out.extend_from_slice(&opk.to_be_bytes());
        }
    }
    out.extend_from_slice(&r.root.0);
    if let Some(dhs) = &r.dhs {
        out.extend_from_slice(dhs.secret.as_bytes());
        out.extend_from_slice(&dhs.public);
    }
    if let Some(dhr) = &r.dhr {
        out.extend_from_slice(dhr);
    }
    if let Some(ck) = &r.sending {
        out.extend_from_slice(&ck.0);
    }
    out.extend_from_slice(&r.ns.to_be_bytes());
    out.extend_from_slice(&r.pn.to_be_bytes());
    if let Some(ck) = &r.receiving {
        out.extend_from_slice(&ck.0);
    }
    out.extend_from_slice(&r.nr.to_be_bytes());
    out.extend_from_slice(&r.config.max_skip.to_be_bytes());
    out.extend_from_slice(&r.config.max_skipped_keys.to_be_bytes());
    out.extend_from_slice(&(r.skipped.chains.len() as u32).to_be_bytes());
    for chain in &r.skipped.chains {
        out.extend_from_slice(&chain.ratchet_key);
        out.extend_from_slice(&(chain.keys.len() as u32).to_be_bytes());
        for (n, mk) in &chain.keys {
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&mk.0);
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
    fn identity(&mut self, what: &'static str) -> Result<IdentityKey> {
        IdentityKey::from_array(&self.key(what)?).map_err(|_| Error::State(what))
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Session> {
    let mut r = StateReader(Reader::new(bytes));
    if r.u8("state version")? != STATE_VERSION {
        return Err(Error::State("state version"));
    }
    let role = match r.u8("state role")? {
        0 => Role::Initiator,
        1 => Role::Responder,
        _ => return Err(Error::State("state role")),
    };
    let flags = r.u8("state flags")?;
    if flags & !(HAS_DHR | HAS_SENDING | HAS_RECEIVING | PENDING_PREKEY | PENDING_OPK | HAS_DHS)
        != 0
        || flags & HAS_DHR == 0
        || (flags & HAS_SENDING != 0 && flags & HAS_DHS == 0)
        || (flags & PENDING_OPK != 0 && flags & PENDING_PREKEY == 0)
        || (flags & PENDING_PREKEY != 0 && role != Role::Initiator)
    {
        return Err(Error::State("state flags"));
    }
    let local = r.identity("state local identity")?;
    let remote = r.identity("state remote identity")?;
    let ephemeral = r.key("state ephemeral key")?;
    let pending_prekey = if flags & PENDING_PREKEY != 0 {
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
    let root = RootKey(*r.secret("state root key")?);
    let dhs = if flags & HAS_DHS != 0 {
        Some(KeyPair {
            secret: StaticSecret::from(*r.secret("state ratchet secret")?),
            public: r.key("state ratchet public")?,
        })
    } else {
        None
    };
    let dhr = Some(r.key("state remote ratchet key")?);
    let sending = if flags & HAS_SENDING != 0 {
        Some(ChainKey(*r.secret("state sending chain")?))
    } else {
        None
    };
    let ns = r.u32("state ns")?;
    let pn = r.u32("state pn")?;
    let receiving = if flags & HAS_RECEIVING != 0 {
        Some(ChainKey(*r.secret("state receiving chain")?))
    } else {
        None
    };
    let nr = r.u32("state nr")?;
    let config = SessionConfig {
        max_skip: r.u32("state max_skip")?,
        max_skipped_keys: r.u32("state max_skipped_keys")?,
    };
    if config != config.clamped() {
        return Err(Error::State("state limits"));
    }
    let chain_count = r.u32("state chain count")? as usize;
    if chain_count > config.max_skipped_keys as usize {
        return Err(Error::State("state chain count"));
    }
    let mut skipped = SkippedKeys::default();
    let mut seen_chains = BTreeSet::new();
    for _ in 0..chain_count {
        let ratchet_key = r.key("state skipped chain key")?;
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
        skipped.chains.push_back(SkippedChain { ratchet_key, keys });
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
        local,
        remote,
        ephemeral,
        pending_prekey,
        ratchet: Ratchet {
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
        },
    })
}
