//! The Double Ratchet (Signal's specification, section 3) with the profile's
//! functions:
//!
//! ```text
//! KDF_RK(rk, dh) = HKDF(salt = rk, ikm = dh, info = "cubbyhole/v1 root", L = 64)
//!                  -> (new rk = [0..32], chain key = [32..64])
//! KDF_CK(ck)     = (mk = HMAC(ck, 0x01), next ck = HMAC(ck, 0x02))
//! keys(mk)       = HKDF(salt = 0^32, ikm = mk, info = "cubbyhole/v1 message", L = 44)
//!                  -> (aes_key = [0..32], nonce = [32..44])
//! ```
//!
//! Decryption is staged: everything a message would change (skipped keys,
//! new chains, a new root key) is computed into locals, and committed only
//! after the AEAD tag verifies, so a rejected message leaves the state as it
//! was.
//!
//! The sending half of a DH ratchet step is lazy: after receiving a new
//! ratchet key the new sending key pair is generated just before the next
//! send (the profile allows this; the bytes on the wire are the same).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::CryptoRngCore;
use sha2::Sha256;
use x25519_dalek::StaticSecret;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};
use crate::protocol::keys::{dh, KeyPair};
use crate::protocol::wire::Header;

const ROOT_INFO: &[u8] = b"cubbyhole/v1 root";
/// A fixed X25519 scalar used only to test whether a peer's ratchet key is
/// of small order (the result is all-zero exactly then, whatever the
/// clamped scalar) when there is no ratchet secret to use.
const CONTRIBUTORY_PROBE: [u8; 32] = [0x5a; 32];
const MESSAGE_INFO: &[u8] = b"cubbyhole/v1 message";
/// HK's label (profile v2): 23 bytes, never the length of KDF_RK's input
/// (a 32-byte DH output) under the same HMAC key.
pub(crate) const HEADER_KEY_INFO: &[u8] = b"cubbyhole/v2 header key";

/// Limits on skipped message keys. Values above the hard maxima
/// ([`Self::LIMIT_MAX_SKIP`], [`Self::LIMIT_MAX_SKIPPED_KEYS`]) are clamped
/// when a session is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// How many message keys may be derived ahead in one chain for one
    /// incoming message (a message with `n = Nr + max_skip` is accepted,
    /// `Nr + max_skip + 1` is not). Profile default 1000.
    pub max_skip: u32,
    /// How many skipped message keys a session keeps in all; the oldest are
    /// evicted first. Profile default 2000.
    pub max_skipped_keys: u32,
}

impl SessionConfig {
    /// The profile's `MAX_SKIP`.
    pub const DEFAULT_MAX_SKIP: u32 = 1000;
    /// The profile's per-session cap on stored skipped keys.
    pub const DEFAULT_MAX_SKIPPED_KEYS: u32 = 2000;
    /// The largest `max_skip` a session accepts; larger values are clamped
    /// to it (one message may cost `max_skip` HMACs and 36 bytes each).
    pub const LIMIT_MAX_SKIP: u32 = 100_000;
    /// The largest `max_skipped_keys` a session accepts; larger values are
    /// clamped to it (36 bytes of memory per stored key).
    pub const LIMIT_MAX_SKIPPED_KEYS: u32 = 1_000_000;

    /// The configuration with both limits clamped to the hard maxima.
    pub fn clamped(self) -> Self {
        SessionConfig {
            max_skip: self.max_skip.min(Self::LIMIT_MAX_SKIP),
            max_skipped_keys: self.max_skipped_keys.min(Self::LIMIT_MAX_SKIPPED_KEYS),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_skip: Self::DEFAULT_MAX_SKIP,
            max_skipped_keys: Self::DEFAULT_MAX_SKIPPED_KEYS,
        }
    }
}

macro_rules! secret32 {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub(crate) struct $name(pub(crate) [u8; 32]);

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret32!(
    /// The root key.
    RootKey
);
secret32!(
    /// A sending or receiving chain key.
    ChainKey
);
secret32!(
    /// A message key: single use.
    MessageKey
);
secret32!(
    /// A header key (profile v2): names and encrypts the headers of one
    /// chain.
    HeaderKey
);

type HmacSha256 = Hmac<Sha256>;

/// HKDF-SHA-256 (RFC 5869) into a fixed-size, zeroizing output.
pub(crate) fn hkdf<const N: usize>(salt: &[u8], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; N]> {
    const { assert!(N <= 255 * 32, "HKDF-SHA-256 output too long") };
    let mut okm = Zeroizing::new([0u8; N]);
    // Reasoned exception: `expand` fails only for outputs over 255 * 32
    // bytes, which the compile-time assertion above excludes.
    #[allow(clippy::expect_used)]
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, okm.as_mut())
        .expect("HKDF output length checked at compile time");
    okm
}

/// HMAC-SHA-256 over the concatenation of `parts`.
pub(crate) fn hmac32(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // Reasoned exception: HMAC accepts keys of any length, so
    // `new_from_slice` cannot fail.
    #[allow(clippy::expect_used)]
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Copies `src` into `dst` as far as both go (no index can panic).
pub(crate) fn copy(dst: &mut [u8], src: impl IntoIterator<Item = u8>) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s;
    }
}

impl RootKey {
    /// HK(rk) (profile v2): the header key of the chain that `KDF_RK(rk, ..)`
    /// creates.
    pub(crate) fn header_key(&self) -> HeaderKey {
        HeaderKey(hmac32(&self.0, &[HEADER_KEY_INFO]))
    }

    /// KDF_RK.
    fn step(&self, dh_out: &[u8; 32]) -> (RootKey, ChainKey) {
        let okm = hkdf::<64>(&self.0, dh_out, ROOT_INFO);
        let mut rk = RootKey([0; 32]);
        let mut ck = ChainKey([0; 32]);
        copy(&mut rk.0, okm.iter().copied());
        copy(&mut ck.0, okm.iter().copied().skip(32));
        (rk, ck)
    }
}

impl ChainKey {
    /// KDF_CK: the message key for this position and the next chain key.
    pub(crate) fn step(&self) -> (MessageKey, ChainKey) {
        // Reasoned exception: HMAC accepts keys of any length, so
        // `new_from_slice` cannot fail.
        #[allow(clippy::expect_used)]
        let keyed =
            <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        let mut mac = keyed.clone();
        mac.update(&[0x01]);
        let mk = MessageKey(mac.finalize().into_bytes().into());
        let mut mac = keyed;
        mac.update(&[0x02]);
        let ck = ChainKey(mac.finalize().into_bytes().into());
        (mk, ck)
    }

    /// Advances from index `from` to index `to` (`from <= to`), returning
    /// the message keys of `from..to`, the key of `to` and the chain key of
    /// `to + 1`.
    fn derive(&self, from: u32, to: u32) -> (Vec<StoredKey>, MessageKey, ChainKey) {
        let mut skipped = Vec::with_capacity((to - from) as usize);
        let (mut mk, mut ck) = self.step();
        for n in from..to {
            skipped.push((n, Box::new(mk)));
            (mk, ck) = ck.step();
        }
        (skipped, mk, ck)
    }

    /// The message keys of `from..until` (empty when `until <= from`).
    fn skip(&self, from: u32, until: u32) -> Vec<StoredKey> {
        let mut skipped = Vec::with_capacity(until.saturating_sub(from) as usize);
        let mut ck = self.clone();
        for n in from..until {
            let (mk, next) = ck.step();
            skipped.push((n, Box::new(mk)));
            ck = next;
        }
        skipped
    }
}

impl MessageKey {
    /// keys(mk): the AES-256-GCM key and nonce.
    fn expand(&self) -> (Zeroizing<[u8; 32]>, [u8; 12]) {
        let okm = hkdf::<44>(&[0u8; 32], &self.0, MESSAGE_INFO);
        let mut key = Zeroizing::new([0u8; 32]);
        copy(key.as_mut(), okm.iter().copied());
        let mut nonce = [0u8; 12];
        copy(&mut nonce, okm.iter().copied().skip(32));
        (key, nonce)
    }

    /// Encrypts `buf` in place and returns the tag.
    pub(crate) fn seal(&self, aad: &[u8], buf: &mut [u8]) -> Result<[u8; 16]> {
        let (key, nonce) = self.expand();
        let cipher = Aes256Gcm::new(key.as_ref().into());
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, buf)
            .map_err(|_| Error::PlaintextTooLong)?;
        Ok(tag.into())
    }

    /// Verifies `tag` and decrypts `buf` in place.
    pub(crate) fn open(&self, aad: &[u8], buf: &mut [u8], tag: &[u8]) -> Result<()> {
        if tag.len() != 16 {
            return Err(Error::Auth);
        }
        let (key, nonce) = self.expand();
        let cipher = Aes256Gcm::new(key.as_ref().into());
        cipher
            .decrypt_in_place_detached(Nonce::from_slice(&nonce), aad, buf, Tag::from_slice(tag))
            .map_err(|_| Error::Auth)
    }
}

/// A skipped message key and its `n`. The key is boxed so that moving it
/// between collections (growth, shifts on removal) moves a pointer, never a
/// copy of the key: the one heap copy is zeroized when it drops.
pub(crate) type StoredKey = (u32, Box<MessageKey>);

/// Skipped message keys of one receiving chain, in increasing `n`.
#[derive(Clone)]
pub(crate) struct SkippedChain {
    pub(crate) ratchet_key: [u8; 32],
    /// The chain's header key (profile v2 sessions only).
    pub(crate) header_key: Option<HeaderKey>,
    pub(crate) keys: VecDeque<StoredKey>,
}

/// All skipped message keys of a session, oldest first. Keys are stored
/// chain by chain and in increasing `n` within a chain, so the order of
/// storage is the order of the chains and then of `n`: eviction pops from
/// the front.
#[derive(Clone, Default)]
pub(crate) struct SkippedKeys {
    pub(crate) chains: VecDeque<SkippedChain>,
    pub(crate) len: usize,
}

impl SkippedKeys {
    fn chain_index(&self, ratchet_key: &[u8; 32]) -> Option<usize> {
        // The most recent chains are the likeliest; search from the back.
        self.chains
            .iter()
            .rposition(|c| &c.ratchet_key == ratchet_key)
    }

    fn find(&self, ratchet_key: &[u8; 32], n: u32) -> Option<(usize, usize)> {
        let ci = self.chain_index(ratchet_key)?;
        let ki = self
            .chains
            .get(ci)?
            .keys
            .binary_search_by_key(&n, |(k, _)| *k)
            .ok()?;
        Some((ci, ki))
    }

    fn get(&self, ci: usize, ki: usize) -> Option<&MessageKey> {
        self.chains.get(ci)?.keys.get(ki).map(|(_, k)| &**k)
    }

    fn remove(&mut self, ci: usize, ki: usize) {
        let Some(chain) = self.chains.get_mut(ci) else {
            return;
        };
        if chain.keys.remove(ki).is_some() {
            self.len -= 1;
        }
        if chain.keys.is_empty() {
            self.chains.remove(ci);
        }
    }

    fn append(
        &mut self,
        ratchet_key: &[u8; 32],
        header_key: Option<&HeaderKey>,
        keys: Vec<StoredKey>,
    ) {
        if keys.is_empty() {
            return;
        }
        self.len += keys.len();
        match self.chains.back_mut() {
            Some(last) if &last.ratchet_key == ratchet_key => last.keys.extend(keys),
            _ => self.chains.push_back(SkippedChain {
                ratchet_key: *ratchet_key,
                header_key: header_key.cloned(),
                keys: keys.into_iter().collect(),
            }),
        }
    }

    fn evict_to(&mut self, cap: usize) {
        while self.len > cap {
            let Some(front) = self.chains.front_mut() else {
                break;
            };
            front.keys.pop_front();
            self.len -= 1;
            if front.keys.is_empty() {
                self.chains.pop_front();
            }
        }
    }
}

/// The Double Ratchet state of one session.
#[derive(Clone)]
pub(crate) struct Ratchet {
    pub(crate) root: RootKey,
    /// Our ratchet key pair while it is needed: the pair of the current
    /// sending chain, or, for a responder before its first message, the
    /// signed prekey. It is dropped at a DH ratchet step: the next pair is
    /// generated just before the next send, and until then no legitimate
    /// message can carry a new ratchet key (the peer has not seen ours).
    /// So no copy of the signed prekey outlives the session's first message,
    /// and no old ratchet secret waits for our next send.
    pub(crate) dhs: Option<KeyPair>,
    /// The peer's current ratchet key (`None` only for a responder before
    /// its first message).
    pub(crate) dhr: Option<[u8; 32]>,
    pub(crate) sending: Option<ChainKey>,
    pub(crate) ns: u32,
    pub(crate) pn: u32,
    pub(crate) receiving: Option<ChainKey>,
    pub(crate) nr: u32,
    pub(crate) skipped: SkippedKeys,
    pub(crate) config: SessionConfig,
    /// Header keys (profile v2 sessions only): `Some` exactly for v2.
    pub(crate) header: Option<HeaderKeys>,
}

/// The header keys of a profile v2 session (SPEC 26.3): the current
/// sending chain's and the current receiving chain's. The header key of
/// the peer's next chain is `HK(root)`, derived when needed.
#[derive(Clone, Default)]
pub(crate) struct HeaderKeys {
    pub(crate) sending: Option<HeaderKey>,
    pub(crate) receiving: Option<HeaderKey>,
}

/// What a message would change, computed before the AEAD check.
enum Plan {
    /// Use the stored skipped key at (chain, index).
    Stored(usize, usize),
    /// A message in the current receiving chain.
    Current {
        skipped: Vec<StoredKey>,
        mk: MessageKey,
        next: ChainKey,
    },
    /// A message with a new ratchet key: a DH ratchet step.
    NewChain {
        old_skipped: Vec<StoredKey>,
        /// The new receiving chain's header key (v2): HK(old root).
        header_key: Option<HeaderKey>,
        root: RootKey,
        skipped: Vec<StoredKey>,
        mk: MessageKey,
        next: ChainKey,
    },
}

impl Ratchet {
    /// RatchetInitAlice with an eagerly generated first ratchet key pair.
    pub(crate) fn initiator(
        rng: &mut impl CryptoRngCore,
        shared_secret: &[u8; 32],
        their_signed_prekey: [u8; 32],
        config: SessionConfig,
        v2: bool,
    ) -> Result<Self> {
        let dhs = KeyPair::generate(rng);
        let sk = RootKey(*shared_secret);
        let (root, sending) = sk.step(&*dh(&dhs.secret, &their_signed_prekey)?);
        let header = v2.then(|| HeaderKeys {
            sending: Some(sk.header_key()),
            receiving: None,
        });
        Ok(Ratchet {
            header,
            root,
            dhs: Some(dhs),
            dhr: Some(their_signed_prekey),
            sending: Some(sending),
            ns: 0,
            pn: 0,
            receiving: None,
            nr: 0,
            skipped: SkippedKeys::default(),
            config: config.clamped(),
        })
    }

    /// RatchetInitBob: the initial ratchet key pair is the signed prekey.
    pub(crate) fn responder(
        shared_secret: &[u8; 32],
        signed_prekey: KeyPair,
        config: SessionConfig,
        v2: bool,
    ) -> Self {
        Ratchet {
            header: v2.then(HeaderKeys::default),
            root: RootKey(*shared_secret),
            dhs: Some(signed_prekey),
            dhr: None,
            sending: None,
            ns: 0,
            pn: 0,
            receiving: None,
            nr: 0,
            skipped: SkippedKeys::default(),
            config: config.clamped(),
        }
    }

    /// Performs the lazy sending half of a DH ratchet step if one is due,
    /// then returns the header and message key of the next message and
    /// advances the sending chain.
    pub(crate) fn next_sending_key(
        &mut self,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Header, MessageKey)> {
        if self.ns == u32::MAX {
            return Err(Error::CounterExhausted);
        }
        let (mk, next, ratchet_key) = match (&self.sending, &self.dhs) {
            (Some(chain), Some(dhs)) => {
                let (mk, next) = chain.step();
                (mk, next, dhs.public)
            }
            _ => {
                // The sending half of a DH ratchet step, due since the last
                // step (or, for a responder, since its session began).
                let dhr = self.dhr.ok_or(Error::State("no remote ratchet key"))?;
                let dhs = KeyPair::generate(rng);
                let (root, chain) = self.root.step(&*dh(&dhs.secret, &dhr)?);
                let (mk, next) = chain.step();
                let public = dhs.public;
                if let Some(header) = self.header.as_mut() {
                    header.sending = Some(self.root.header_key());
                }
                self.root = root;
                self.dhs = Some(dhs);
                (mk, next, public)
            }
        };
        let header = Header {
            ratchet_key,
            pn: self.pn,
            n: self.ns,
        };
        self.sending = Some(next);
        self.ns += 1;
        Ok((header, mk))
    }

    /// The profile's ratchet checks, in order, without changing anything.
    fn plan(&self, header: &Header) -> Result<Plan> {
        let key = &header.ratchet_key;
        let n = header.n;
        let current = self.dhr.as_ref() == Some(key);
        // 1. duplicate
        if let Some((ci, ki)) = self.skipped.find(key, n) {
            return Ok(Plan::Stored(ci, ki));
        }
        if (current && n < self.nr) || (!current && self.skipped.chain_index(key).is_some()) {
            return Err(Error::Duplicate);
        }
        let max_skip = u64::from(self.config.max_skip);
        if current {
            if u64::from(n) > u64::from(self.nr) + max_skip {
                return Err(Error::TooManySkipped);
            }
            let chain = self.receiving.as_ref().ok_or(Error::Auth)?;
            if n == u32::MAX {
                return Err(Error::CounterExhausted);
            }
            let (skipped, mk, next) = chain.derive(self.nr, n);
            return Ok(Plan::Current { skipped, mk, next });
        }
        // A new ratchet key: DH ratchet step.
        if u64::from(header.pn) > u64::from(self.nr) + max_skip {
            return Err(Error::TooManySkipped);
        }
        let dh_out = match &self.dhs {
            Some(dhs) => Some(dh(&dhs.secret, key)?),
            None => {
                // Our next key pair does not exist yet, so the peer cannot
                // have answered it: this message is not authentic. Keep the
                // profile's order of checks: contributory, then n, then auth.
                dh(&StaticSecret::from(CONTRIBUTORY_PROBE), key)?;
                None
            }
        };
        if u64::from(n) > max_skip {
            return Err(Error::TooManySkipped);
        }
        let dh_out = dh_out.ok_or(Error::Auth)?;
        if n == u32::MAX {
            return Err(Error::CounterExhausted);
        }
        let (root, chain) = self.root.step(&dh_out);
        let old_skipped = match &self.receiving {
            Some(old) => old.skip(self.nr, header.pn),
            None => Vec::new(),
        };
        let (skipped, mk, next) = chain.derive(0, n);
        Ok(Plan::NewChain {
            old_skipped,
            header_key: self.header.as_ref().map(|_| self.root.header_key()),
            root,
            skipped,
            mk,
            next,
        })
    }

    /// Decrypts a message's ciphertext, appending the plaintext to `out`.
    /// `finish` sees the plaintext before anything is committed and returns
    /// how many of its bytes to keep (v2: the length without padding), or
    /// an error. On any error `self` and `out` are unchanged.
    pub(crate) fn decrypt(
        &mut self,
        header: &Header,
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut Vec<u8>,
        finish: impl FnOnce(&[u8]) -> Result<usize>,
    ) -> Result<()> {
        let plan = self.plan(header)?;
        let mk = match &plan {
            Plan::Stored(ci, ki) => self
                .skipped
                .get(*ci, *ki)
                .ok_or(Error::State("skipped key index"))?,
            Plan::Current { mk, .. } | Plan::NewChain { mk, .. } => mk,
        };
        let start = out.len();
        out.extend_from_slice(ciphertext);
        let opened = match out.get_mut(start..) {
            Some(buf) => mk.open(aad, buf, tag),
            None => Err(Error::Auth),
        };
        let kept = opened.and_then(|()| finish(out.get(start..).unwrap_or_default()));
        match kept {
            Ok(len) => {
                // Padding is zeroized as it is cut (it holds no secret,
                // but the buffer may be reused).
                out.truncate(start + len);
            }
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
        // Commit.
        let cap = self.config.max_skipped_keys as usize;
        match plan {
            Plan::Stored(ci, ki) => self.skipped.remove(ci, ki),
            Plan::Current { skipped, next, .. } => {
                if let Some(dhr) = self.dhr {
                    let hk = self.header.as_ref().and_then(|h| h.receiving.as_ref());
                    self.skipped.append(&dhr, hk, skipped);
                }
                self.skipped.evict_to(cap);
                self.receiving = Some(next);
                self.nr = header.n + 1;
            }
            Plan::NewChain {
                old_skipped,
                header_key,
                root,
                skipped,
                next,
                ..
            } => {
                if let Some(old) = self.dhr {
                    let hk = self.header.as_ref().and_then(|h| h.receiving.as_ref());
                    self.skipped.append(&old, hk, old_skipped);
                }
                self.skipped
                    .append(&header.ratchet_key, header_key.as_ref(), skipped);
                if let Some(h) = self.header.as_mut() {
                    h.receiving = header_key;
                }
                self.skipped.evict_to(cap);
                self.root = root;
                self.dhr = Some(header.ratchet_key);
                self.receiving = Some(next);
                self.nr = header.n + 1;
                self.dhs = None;
                if let Some(h) = self.header.as_mut() {
                    h.sending = None;
                }
                if self.sending.take().is_some() {
                    self.pn = self.ns;
                    self.ns = 0;
                }
            }
        }
        Ok(())
    }
}
