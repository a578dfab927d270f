//! The owner's side of prekeys: an in-memory set of a device's private
//! prekeys (current and retired signed prekeys, unused one-time prekeys),
//! from which it publishes bundles and answers prekey messages.
//!
//! Persistent stores implement [`PrekeyLookup`] themselves; this type is for
//! tests, embedding and applications that persist the set elsewhere.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use rand_core::CryptoRngCore;

use crate::error::{Error, Result};
use crate::protocol::bundle::PrekeyBundle;
use crate::protocol::keys::{IdentityKeyPair, OneTimePrekey, SignedPrekey};
use crate::protocol::ratchet::SessionConfig;
use crate::protocol::session::{Accepted, PrekeyLookup, Session};
use crate::protocol::time::check_timestamp;
use crate::protocol::wire::{Incoming, Reader};
use zeroize::Zeroizing;

/// A device's private prekeys.
#[derive(Clone, Debug)]
pub struct PrekeyStore {
    current: SignedPrekey,
    retired: Vec<SignedPrekey>,
    one_time: BTreeMap<u32, OneTimePrekey>,
    next_one_time_id: u32,
}

impl PrekeyStore {
    /// A store with a first signed prekey (id 1) created at `now` (unix
    /// seconds).
    ///
    /// # Errors
    /// [`Error::TimeOutOfRange`] if `now` is above
    /// [`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP); nothing is drawn from `rng`
    /// then.
    pub fn new(rng: &mut impl CryptoRngCore, identity: &IdentityKeyPair, now: u64) -> Result<Self> {
        Ok(Self::with_signed_prekey(SignedPrekey::generate(
            rng, identity, 1, now,
        )?))
    }

    /// A store around an existing signed prekey.
    pub fn with_signed_prekey(signed_prekey: SignedPrekey) -> Self {
        PrekeyStore {
            current: signed_prekey,
            retired: Vec::new(),
            one_time: BTreeMap::new(),
            next_one_time_id: 1,
        }
    }

    /// The current signed prekey.
    pub fn current_signed_prekey(&self) -> &SignedPrekey {
        &self.current
    }

    /// Replaces the current signed prekey with a new one created at `now`
    /// (unix seconds); the old one is retained (so late prekey messages
    /// still decrypt) until [`Self::forget_retired_before`] drops it.
    ///
    /// # Errors
    /// [`Error::TimeOutOfRange`] if `now` is above
    /// [`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP); the store is unchanged and
    /// nothing is drawn from `rng` then.
    pub fn rotate_signed_prekey(
        &mut self,
        rng: &mut impl CryptoRngCore,
        identity: &IdentityKeyPair,
        now: u64,
    ) -> Result<()> {
        let id = self.current.id().wrapping_add(1);
        let new = SignedPrekey::generate(rng, identity, id, now)?;
        self.retired
            .push(core::mem::replace(&mut self.current, new));
        Ok(())
    }

    /// Drops a retired signed prekey by id (the current one is never
    /// dropped). Returns whether it was held.
    pub fn remove_retired_signed_prekey(&mut self, id: u32) -> bool {
        let before = self.retired.len();
        self.retired.retain(|k| k.id() != id);
        self.retired.len() != before
    }

    /// Drops retired signed prekeys created before `cutoff` (unix seconds).
    ///
    /// # Errors
    /// [`Error::TimeOutOfRange`] if `cutoff` is above
    /// [`MAX_TIMESTAMP`](crate::MAX_TIMESTAMP) (a millisecond cutoff would
    /// drop every retired key); nothing is dropped then.
    pub fn forget_retired_before(&mut self, cutoff: u64) -> Result<()> {
        check_timestamp(cutoff)?;
        self.retired.retain(|k| k.created() >= cutoff);
        Ok(())
    }

    /// Generates `count` new one-time prekeys and returns them (to publish
    /// their public halves).
    pub fn generate_one_time_prekeys(
        &mut self,
        rng: &mut impl CryptoRngCore,
        count: u32,
    ) -> Vec<&OneTimePrekey> {
        let first = self.next_one_time_id;
        for _ in 0..count {
            let id = self.next_one_time_id;
            self.next_one_time_id = self.next_one_time_id.wrapping_add(1);
            self.one_time.insert(id, OneTimePrekey::generate(rng, id));
        }
        // The new ids are `first..next`, or, if they wrapped past
        // `u32::MAX`, `first..` and then `..next`.
        let next = self.next_one_time_id;
        let (head, tail) = if first <= next {
            (self.one_time.range(first..next), self.one_time.range(..0))
        } else {
            (self.one_time.range(first..), self.one_time.range(..next))
        };
        head.chain(tail).map(|(_, k)| k).collect()
    }

    /// Adds an existing one-time prekey.
    pub fn insert_one_time_prekey(&mut self, key: OneTimePrekey) {
        self.next_one_time_id = self.next_one_time_id.max(key.id().wrapping_add(1));
        self.one_time.insert(key.id(), key);
    }

    /// Deletes a one-time prekey (after a session used it).
    pub fn remove_one_time_prekey(&mut self, id: u32) -> bool {
        self.one_time.remove(&id).is_some()
    }

    /// The current signed prekey, then the retained ones (oldest first).
    pub fn signed_prekeys(&self) -> impl Iterator<Item = &SignedPrekey> {
        core::iter::once(&self.current).chain(self.retired.iter())
    }

    /// The unused one-time prekeys, by id.
    pub fn one_time_prekeys(&self) -> impl Iterator<Item = &OneTimePrekey> {
        self.one_time.values()
    }

    /// The id the next generated one-time prekey will get.
    pub fn next_one_time_prekey_id(&self) -> u32 {
        self.next_one_time_id
    }

    /// Deletes every one-time prekey with an id below `bound`; returns how
    /// many were deleted.
    pub fn remove_one_time_prekeys_below(&mut self, bound: u32) -> usize {
        let keep = self.one_time.split_off(&bound);
        let removed = self.one_time.len();
        self.one_time = keep;
        removed
    }

    /// Number of unused one-time prekeys.
    pub fn one_time_prekey_count(&self) -> usize {
        self.one_time.len()
    }

    /// A bundle with the current signed prekey and, if any is left, the
    /// one-time prekey with the lowest id.
    pub fn bundle(&self, identity: &IdentityKeyPair) -> PrekeyBundle {
        PrekeyBundle::new(identity, &self.current, self.one_time.values().next())
    }

    /// Opens a profile v2 sealed prekey message with the held signed
    /// prekeys ([`open_sealed_prekey`](crate::protocol::sealed::open_sealed_prekey)),
    /// returning the inner prekey message for [`Incoming::decode`] and
    /// [`PrekeyStore::accept`] (or the session it continues).
    ///
    /// # Errors
    /// `Decode`, `InvalidKey` or `Auth`, as `open_sealed_prekey`.
    pub fn open_sealed(&self, payload: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        crate::protocol::sealed::open_sealed_prekey(payload, self.signed_prekeys()).map(|(m, _)| m)
    }

    /// [`Session::accept`] followed by deleting the consumed one-time prekey.
    ///
    /// # Errors
    /// As [`Session::accept`]; nothing is consumed on error.
    pub fn accept(
        &mut self,
        identity: &IdentityKeyPair,
        message: &Incoming<'_>,
        config: SessionConfig,
    ) -> Result<Accepted> {
        let accepted = Session::accept(identity, self, message, config)?;
        if let Some(id) = accepted.consumed_one_time_prekey {
            if !self.remove_one_time_prekey(id) {
                return Err(Error::UnknownPrekey);
            }
        }
        Ok(accepted)
    }
}

const PREKEYS_VERSION: u8 = 1;

impl PrekeyStore {
    /// Serializes the set (secret keys included: store it encrypted).
    ///
    /// ```text
    /// 0x01 || next_one_time_id (4) || signed count (4, >= 1: current first)
    ///   || signed count x (id 4 || created 8 || secret 32 || public 32 || signature 64)
    ///   || one-time count (4) || one-time count x (id 4 || secret 32 || public 32)
    /// ```
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(
            13 + 140 * (1 + self.retired.len()) + 68 * self.one_time.len(),
        ));
        out.push(PREKEYS_VERSION);
        out.extend_from_slice(&self.next_one_time_id.to_be_bytes());
        out.extend_from_slice(&(1 + self.retired.len() as u32).to_be_bytes());
        for k in self.signed_prekeys() {
            out.extend_from_slice(&k.id().to_be_bytes());
            out.extend_from_slice(&k.created().to_be_bytes());
            out.extend_from_slice(k.secret().as_bytes());
            out.extend_from_slice(k.public());
            out.extend_from_slice(k.signature());
        }
        out.extend_from_slice(&(self.one_time.len() as u32).to_be_bytes());
        for k in self.one_time.values() {
            out.extend_from_slice(&k.id().to_be_bytes());
            out.extend_from_slice(k.secret().as_bytes());
            out.extend_from_slice(k.public());
        }
        out
    }

    /// Restores a set from [`Self::to_bytes`]. The encoding is canonical:
    /// whatever decodes re-encodes to the same bytes (one-time prekeys in
    /// strictly increasing id order).
    ///
    /// # Errors
    /// [`Error::State`] for malformed input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = |e: Error| match e {
            Error::Decode(w) => Error::State(w),
            other => other,
        };
        let mut r = Reader::new(bytes);
        if r.u8("prekeys version").map_err(st)? != PREKEYS_VERSION {
            return Err(Error::State("prekeys version"));
        }
        let next_one_time_id = r.u32("prekeys next id").map_err(st)?;
        let signed = r.u32("prekeys signed count").map_err(st)? as usize;
        if signed == 0 || signed > r.remaining() / 140 {
            return Err(Error::State("prekeys signed count"));
        }
        let mut keys = Vec::with_capacity(signed);
        for _ in 0..signed {
            let id = r.u32("prekeys signed").map_err(st)?;
            let created = r.u64("prekeys signed").map_err(st)?;
            let secret = Zeroizing::new(r.array::<32>("prekeys signed").map_err(st)?);
            let public = r.array("prekeys signed").map_err(st)?;
            let signature = r.array("prekeys signed").map_err(st)?;
            keys.push(SignedPrekey::from_parts(
                id, created, *secret, public, signature,
            ));
        }
        let count = r.u32("prekeys one-time count").map_err(st)? as usize;
        if count > r.remaining() / 68 {
            return Err(Error::State("prekeys one-time count"));
        }
        let mut one_time = BTreeMap::new();
        let mut previous = None;
        for _ in 0..count {
            let id = r.u32("prekeys one-time").map_err(st)?;
            // Written in increasing id order, each id once: anything else
            // would lose a key or not re-encode to the same bytes.
            if previous.is_some_and(|p| id <= p) {
                return Err(Error::State("prekeys one-time order"));
            }
            previous = Some(id);
            let secret = Zeroizing::new(r.array::<32>("prekeys one-time").map_err(st)?);
            let public = r.array("prekeys one-time").map_err(st)?;
            one_time.insert(id, OneTimePrekey::from_parts(id, *secret, public));
        }
        r.finish("prekeys trailing bytes").map_err(st)?;
        let mut keys = keys.into_iter();
        let current = keys.next().ok_or(Error::State("prekeys signed count"))?;
        Ok(PrekeyStore {
            current,
            retired: keys.collect(),
            one_time,
            next_one_time_id,
        })
    }
}

impl PrekeyLookup for PrekeyStore {
    fn signed_prekey(&self, id: u32) -> Option<&SignedPrekey> {
        if self.current.id() == id {
            return Some(&self.current);
        }
        self.retired.iter().find(|k| k.id() == id)
    }
    fn one_time_prekey(&self, id: u32) -> Option<&OneTimePrekey> {
        self.one_time.get(&id)
    }
}
