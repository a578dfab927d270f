//! Sessions: X3DH joined to the Double Ratchet.
//!
//! The initiator creates a [`Session`] from a [`VerifiedBundle`] and sends
//! prekey messages until it has decrypted a first message from the responder.
//! The responder creates its session from the first prekey message it
//! receives ([`Session::accept`]); repeats of that prekey message (same IK_A
//! and EK_A) belong to the same session and are decrypted by
//! [`Session::decrypt`], without looking the one-time prekey up again.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::protocol::bundle::VerifiedBundle;
use crate::protocol::keys::{IdentityKey, IdentityKeyPair, KeyPair, OneTimePrekey, SignedPrekey};
use crate::protocol::ratchet::{copy, HeaderKey, MessageKey, Ratchet, SessionConfig};
use crate::protocol::sealed::{self, TAG_BYTES};
use crate::protocol::state::{session_tag, SESSION_TAG_LEN};
use crate::protocol::wire::{
    Incoming, PrekeyFields, KIND_MESSAGE, KIND_PREKEY, MAX_PREFIX_LEN, TAG_LEN, VERSION,
};
use crate::protocol::x3dh;

/// AES-GCM's limit on one plaintext (2^36 - 32 bytes).
const MAX_PLAINTEXT: u64 = (1 << 36) - 32;

/// Whether a plaintext of `len` bytes is within AES-GCM's limit.
fn plaintext_fits(len: usize) -> bool {
    len as u64 <= MAX_PLAINTEXT
}

/// Which side of X3DH a session was created on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Created the session from the peer's bundle.
    Initiator,
    /// Created the session from the peer's prekey message.
    Responder,
}

/// Read access to a device's private prekeys, as the responder needs them.
pub trait PrekeyLookup {
    /// The signed prekey with this id, current or retained.
    fn signed_prekey(&self, id: u32) -> Option<&SignedPrekey>;
    /// The one-time prekey with this id, if it is still unused.
    fn one_time_prekey(&self, id: u32) -> Option<&OneTimePrekey>;
}

/// The outcome of [`Session::accept`].
pub struct Accepted {
    /// The new session.
    pub session: Session,
    /// The first message's plaintext.
    pub plaintext: Vec<u8>,
    /// The one-time prekey the session used. The caller must delete its
    /// private half now (after persisting the session).
    pub consumed_one_time_prekey: Option<u32>,
}

/// An end-to-end encrypted session with one peer device.
#[derive(Clone)]
pub struct Session {
    pub(crate) role: Role,
    pub(crate) local: IdentityKey,
    pub(crate) remote: IdentityKey,
    /// EK_A, while the initiator still sends it in prekey messages (a
    /// restored session knows it only then; otherwise zero).
    pub(crate) ephemeral: [u8; 32],
    /// [`session_tag`] of EK_A: with IK_A it names the session, for the
    /// responder's [`Session::matches`].
    pub(crate) tag: [u8; SESSION_TAG_LEN],
    /// Initiator only: the prekey fields sent until the first reply arrives.
    pub(crate) pending_prekey: Option<(u32, Option<u32>)>,
    /// Boxed: every key of the session lives here, so moving a session (in
    /// a growing or shifting `Vec` of a session record) moves a pointer and
    /// leaves no copy of a key in memory the collection frees.
    pub(crate) ratchet: Box<Ratchet>,
}

impl Session {
    /// Starts a session as initiator from a verified bundle: runs X3DH and
    /// the first half of the ratchet. Draws two X25519 keys from `rng`: the
    /// ephemeral key EK_A, then the first ratchet key (in that order).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if a DH output is not contributory.
    pub fn initiate(
        rng: &mut impl CryptoRngCore,
        identity: &IdentityKeyPair,
        bundle: &VerifiedBundle,
        config: SessionConfig,
    ) -> Result<Session> {
        Self::initiate_profile(rng, identity, bundle, config, false)
    }

    /// [`Session::initiate`] for a profile v2 session (SPEC.md section 26):
    /// its messages are sealed envelopes ([`Session::seal`]). Draws the
    /// same randomness as `initiate`.
    ///
    /// # Errors
    /// As [`Session::initiate`].
    pub fn initiate_sealed(
        rng: &mut impl CryptoRngCore,
        identity: &IdentityKeyPair,
        bundle: &VerifiedBundle,
        config: SessionConfig,
    ) -> Result<Session> {
        Self::initiate_profile(rng, identity, bundle, config, true)
    }

    fn initiate_profile(
        rng: &mut impl CryptoRngCore,
        identity: &IdentityKeyPair,
        bundle: &VerifiedBundle,
        config: SessionConfig,
        v2: bool,
    ) -> Result<Session> {
        let ephemeral = KeyPair::generate(rng);
        let x3dh = x3dh::initiator(
            identity,
            &ephemeral.secret,
            bundle.identity(),
            bundle.signed_prekey(),
            bundle.one_time_prekey().map(|(_, k)| k),
        )?;
        let ratchet = Ratchet::initiator(
            rng,
            &x3dh.shared_secret,
            *bundle.signed_prekey(),
            config,
            v2,
        )?;
        Ok(Session {
            role: Role::Initiator,
            local: *identity.public(),
            remote: *bundle.identity(),
            ephemeral: ephemeral.public,
            tag: session_tag(&ephemeral.public),
            pending_prekey: Some((
                bundle.signed_prekey_id(),
                bundle.one_time_prekey().map(|(id, _)| id),
            )),
            ratchet: Box::new(ratchet),
        })
    }

    /// Creates the responder's session from a first prekey message.
    ///
    /// Checks, in the profile's order: IK_A is a valid identity key
    /// (`InvalidKey`), the named signed prekey is held
    /// (`UnknownPrekey`), the named one-time prekey is held
    /// (`UnknownPrekey`), each X3DH DH is contributory (`InvalidKey`), then
    /// the ratchet checks and the AEAD. Nothing is consumed on failure; on
    /// success the caller deletes [`Accepted::consumed_one_time_prekey`].
    ///
    /// The caller must first check that no existing session matches the
    /// message ([`Session::matches`]): a repeated prekey message goes to
    /// [`Session::decrypt`] of the session it created. This routing is what
    /// detects replays of prekey messages: given to `accept` again, a prekey
    /// message without a one-time prekey would start a second session and
    /// yield its plaintext a second time. Keep sessions findable by
    /// (IK_A, EK_A) for as long as the signed prekey they used is held.
    ///
    /// # Errors
    /// [`Error::Decode`] if `message` is not a prekey message, and the errors
    /// above.
    pub fn accept(
        identity: &IdentityKeyPair,
        prekeys: &impl PrekeyLookup,
        message: &Incoming<'_>,
        config: SessionConfig,
    ) -> Result<Accepted> {
        let fields = message
            .prekey()
            .ok_or(Error::Decode("not a prekey message"))?;
        let initiator = IdentityKey::from_array(&fields.identity)?;
        let spk = prekeys
            .signed_prekey(fields.signed_prekey_id)
            .ok_or(Error::UnknownPrekey)?;
        let opk = match fields.one_time_prekey_id {
            Some(id) => Some(prekeys.one_time_prekey(id).ok_or(Error::UnknownPrekey)?),
            None => None,
        };
        let x3dh = x3dh::responder(
            identity,
            spk.secret(),
            opk.map(|k| k.secret()),
            &initiator,
            &fields.ephemeral,
        )?;
        let ratchet = Ratchet::responder(
            &x3dh.shared_secret,
            KeyPair {
                secret: spk.secret().clone(),
                public: *spk.public(),
            },
            config,
            message.is_sealed_inner(),
        );
        let mut session = Session {
            role: Role::Responder,
            local: *identity.public(),
            remote: initiator,
            ephemeral: fields.ephemeral,
            tag: session_tag(&fields.ephemeral),
            pending_prekey: None,
            ratchet: Box::new(ratchet),
        };
        let mut plaintext = Vec::new();
        session.decrypt_incoming(message, &mut plaintext)?;
        Ok(Accepted {
            session,
            plaintext,
            consumed_one_time_prekey: fields.one_time_prekey_id,
        })
    }

    /// See [`crate::hazmat::simulate_initiator`].
    // Reasoned exception: the hazmat functions' arguments plus the profile.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn simulate_initiator(
        rng: &mut impl CryptoRngCore,
        responder: &IdentityKeyPair,
        prekeys: &impl PrekeyLookup,
        signed_prekey_id: u32,
        one_time_prekey_id: Option<u32>,
        initiator: &IdentityKey,
        config: SessionConfig,
        v2: bool,
    ) -> Result<Session> {
        let spk = prekeys
            .signed_prekey(signed_prekey_id)
            .ok_or(Error::UnknownPrekey)?;
        let opk = match one_time_prekey_id {
            Some(id) => Some(prekeys.one_time_prekey(id).ok_or(Error::UnknownPrekey)?),
            None => None,
        };
        let ephemeral = KeyPair::generate(rng);
        // The responder's side of X3DH gives the initiator's SK: DH1 needs
        // only SPK_B's private half and IK_A's public half.
        let x3dh = x3dh::responder(
            responder,
            spk.secret(),
            opk.map(|k| k.secret()),
            initiator,
            &ephemeral.public,
        )?;
        let ratchet = Ratchet::initiator(rng, &x3dh.shared_secret, *spk.public(), config, v2)?;
        Ok(Session {
            role: Role::Initiator,
            local: *initiator,
            remote: *responder.public(),
            ephemeral: ephemeral.public,
            tag: session_tag(&ephemeral.public),
            pending_prekey: Some((signed_prekey_id, one_time_prekey_id)),
            ratchet: Box::new(ratchet),
        })
    }

    /// Whether an incoming prekey message belongs to this session (same
    /// IK_A and EK_A). Normal messages carry no session identifier; the
    /// application knows their sender from outside the message.
    pub fn matches(&self, message: &Incoming<'_>) -> bool {
        match message.prekey() {
            Some(fields) => {
                self.role == Role::Responder
                    && fields.identity == *self.remote.as_bytes()
                    && session_tag(&fields.ephemeral) == self.tag
            }
            None => true,
        }
    }

    /// Encrypts `plaintext` into a new wire message.
    ///
    /// # Errors
    /// See [`Session::encrypt_into`].
    pub fn encrypt(&mut self, rng: &mut impl CryptoRngCore, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encrypt_into(rng, plaintext, &mut out)?;
        Ok(out)
    }

    /// Encrypts `plaintext`, appending the wire message to `out` (one
    /// reservation, no other allocation). Draws 32 bytes from `rng` only when
    /// a DH ratchet step is due. Until the initiator has decrypted a message
    /// from the responder, the output is a prekey message.
    ///
    /// # Errors
    /// [`Error::CounterExhausted`] after 2^32 - 1 messages in one chain,
    /// [`Error::PlaintextTooLong`] for a plaintext longer than AES-GCM allows.
    pub fn encrypt_into(
        &mut self,
        rng: &mut impl CryptoRngCore,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.encrypt_with_key(rng, plaintext, out).map(drop)
    }

    pub(crate) fn encrypt_with_key(
        &mut self,
        rng: &mut impl CryptoRngCore,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<MessageKey> {
        if self.is_sealed() {
            return Err(Error::State("a v2 session encrypts with Session::seal"));
        }
        if !plaintext_fits(plaintext.len()) {
            return Err(Error::PlaintextTooLong);
        }
        let (header, mk) = self.ratchet.next_sending_key(rng)?;
        let start = out.len();
        out.reserve(MAX_PREFIX_LEN + plaintext.len() + TAG_LEN);
        out.push(VERSION);
        match self.pending_prekey {
            Some((signed_prekey_id, one_time_prekey_id)) => {
                out.push(KIND_PREKEY);
                PrekeyFields {
                    identity: *self.local.as_bytes(),
                    ephemeral: self.ephemeral,
                    signed_prekey_id,
                    one_time_prekey_id,
                }
                .write(out);
            }
            None => out.push(KIND_MESSAGE),
        }
        header.write(out);
        let body = out.len();
        let mut aad = [0u8; 64 + MAX_PREFIX_LEN];
        let aad = self.fill_aad(&mut aad, out.get(start..).unwrap_or_default());
        out.extend_from_slice(plaintext);
        let tag = match out.get_mut(body..) {
            Some(buf) => mk.seal(aad, buf)?,
            None => return Err(Error::State("output buffer")),
        };
        out.extend_from_slice(&tag);
        Ok(mk)
    }

    /// Decodes and decrypts a wire message (either kind) from the peer.
    ///
    /// # Errors
    /// [`Error::Decode`], [`Error::SessionMismatch`] for a prekey message of
    /// another session, and the ratchet errors: [`Error::Duplicate`],
    /// [`Error::TooManySkipped`], [`Error::InvalidKey`], [`Error::Auth`].
    /// On error the session is unchanged.
    pub fn decrypt(&mut self, message: &[u8]) -> Result<Vec<u8>> {
        let incoming = Incoming::decode(message)?;
        let mut out = Vec::new();
        self.decrypt_incoming(&incoming, &mut out)?;
        Ok(out)
    }

    /// Decrypts an already decoded message, appending the plaintext to `out`.
    /// On error neither the session nor `out` changes.
    ///
    /// # Errors
    /// As [`Session::decrypt`].
    pub fn decrypt_incoming(&mut self, message: &Incoming<'_>, out: &mut Vec<u8>) -> Result<()> {
        if !self.matches(message) || message.is_sealed_inner() != self.is_sealed() {
            return Err(Error::SessionMismatch);
        }
        let mut aad = [0u8; 64 + MAX_PREFIX_LEN];
        let aad = self.fill_aad(&mut aad, message.prefix());
        let v2 = self.is_sealed();
        self.ratchet.decrypt(
            message.header(),
            aad,
            message.ciphertext(),
            message.tag(),
            out,
            |plain| {
                if v2 {
                    sealed::unpadded_len(plain)
                } else {
                    Ok(plain.len())
                }
            },
        )?;
        // The initiator has heard back: no more prekey messages.
        self.pending_prekey = None;
        Ok(())
    }

    /// AD || prefix into `buf`; returns the part used. A prefix is at most
    /// `MAX_PREFIX_LEN` bytes (the decoder and the encoder guarantee it).
    fn fill_aad<'b>(&self, buf: &'b mut [u8; 64 + MAX_PREFIX_LEN], prefix: &[u8]) -> &'b [u8] {
        let (a, b) = match self.role {
            Role::Initiator => (&self.local, &self.remote),
            Role::Responder => (&self.remote, &self.local),
        };
        let len = (64 + prefix.len()).min(buf.len());
        copy(
            buf,
            a.as_bytes()
                .iter()
                .chain(b.as_bytes())
                .chain(prefix)
                .copied(),
        );
        buf.get(..len).unwrap_or_default()
    }

    /// Whether this is a profile v2 session: its messages are sealed
    /// envelopes ([`Session::seal`], [`Session::open`], SPEC.md section 26).
    pub fn is_sealed(&self) -> bool {
        self.ratchet.header.is_some()
    }

    /// Encrypts `plaintext` into a profile v2 envelope: a sealed prekey
    /// message until the initiator has heard back (to the peer's signed
    /// prekey, with a fresh ephemeral key: 32 bytes from `rng`), a chain
    /// message after that (its id is the routing tag the peer expects).
    /// Either is padded to its size class. Draws 32 more bytes from `rng`
    /// when a DH ratchet step is due.
    ///
    /// # Errors
    /// `State` for a v1 session, and the errors of [`Session::encrypt`].
    pub fn seal(&mut self, rng: &mut impl CryptoRngCore, plaintext: &[u8]) -> Result<Sealed> {
        if !self.is_sealed() {
            return Err(Error::State("a v1 session encrypts with Session::encrypt"));
        }
        if !plaintext_fits(plaintext.len().saturating_add(plaintext.len() / 8 + 1024)) {
            return Err(Error::PlaintextTooLong);
        }
        let (header, mk) = self.ratchet.next_sending_key(rng)?;
        let mut inner = Zeroizing::new(Vec::new());
        let overhead;
        let aad_prefix_len;
        match self.pending_prekey {
            Some((signed_prekey_id, one_time_prekey_id)) => {
                overhead = if one_time_prekey_id.is_some() {
                    sealed::SEALED_PREKEY_OVERHEAD_OPK
                } else {
                    sealed::SEALED_PREKEY_OVERHEAD
                };
                inner.reserve(
                    MAX_PREFIX_LEN
                        + sealed::padding_len(overhead, plaintext.len())
                        + plaintext.len()
                        + TAG_LEN,
                );
                inner.push(sealed::VERSION_2);
                inner.push(sealed::KIND_INNER_PREKEY);
                PrekeyFields {
                    identity: *self.local.as_bytes(),
                    ephemeral: self.ephemeral,
                    signed_prekey_id,
                    one_time_prekey_id,
                }
                .write(&mut inner);
                header.write(&mut inner);
                aad_prefix_len = inner.len();
            }
            None => {
                overhead = sealed::CHAIN_OVERHEAD;
                inner.push(sealed::VERSION_2);
                inner.push(sealed::KIND_CHAIN);
                header.write(&mut inner);
                aad_prefix_len = inner.len();
            }
        }
        let mut aad = [0u8; 64 + MAX_PREFIX_LEN];
        let aad = self.fill_aad(&mut aad, inner.get(..aad_prefix_len).unwrap_or_default());
        let body = inner.len();
        inner.extend_from_slice(plaintext);
        sealed::pad(&mut inner, body, overhead);
        let t = match inner.get_mut(body..) {
            Some(buf) => mk.seal(aad, buf)?,
            None => return Err(Error::State("output buffer")),
        };
        inner.extend_from_slice(&t);
        let mut payload = Vec::new();
        let id = if self.pending_prekey.is_some() {
            let spk = self.ratchet.dhr.ok_or(Error::State("no signed prekey"))?;
            sealed::seal_prekey(rng, &spk, &inner, &mut payload)?;
            let mut id = [0u8; TAG_BYTES];
            rng.fill_bytes(&mut id);
            id
        } else {
            let hk = self
                .ratchet
                .header
                .as_ref()
                .and_then(|h| h.sending.as_ref())
                .ok_or(Error::State("no sending header key"))?;
            let id = sealed::tag(hk, header.n);
            payload.reserve(overhead + inner.len() - aad_prefix_len);
            payload.push(sealed::VERSION_2);
            payload.push(sealed::KIND_CHAIN);
            sealed::seal_header(hk, &id, &header, &mut payload)?;
            payload.extend_from_slice(inner.get(aad_prefix_len..).unwrap_or_default());
            id
        };
        Ok(Sealed { id, payload })
    }

    /// Visits the tags this session expects (SPEC.md 26.6), in the order
    /// `locate` searches them: stored skipped keys (newest chain first,
    /// then increasing n), the current receiving chain within `window` of
    /// its next message, the peer's next chain within `window` of its
    /// start (while a ratchet key pair is held). `visit(hk, n, expected,
    /// tag)` returns `true` to stop. One definition for routing and for
    /// opening, so the two cannot disagree.
    fn visit_expected(
        &self,
        window: u32,
        mut visit: impl FnMut(&HeaderKey, u32, Expected, &[u8; TAG_BYTES]) -> bool,
    ) {
        let Some(h) = self.ratchet.header.as_ref() else {
            return;
        };
        for chain in self.ratchet.skipped.chains.iter().rev() {
            if let Some(hk) = &chain.header_key {
                for (n, _) in &chain.keys {
                    if visit(
                        hk,
                        *n,
                        Expected::Chain(chain.ratchet_key),
                        &sealed::tag(hk, *n),
                    ) {
                        return;
                    }
                }
            }
        }
        if let (Some(hk), Some(dhr), Some(_)) =
            (&h.receiving, self.ratchet.dhr, &self.ratchet.receiving)
        {
            let nr = self.ratchet.nr;
            for n in nr..nr.saturating_add(window) {
                if visit(hk, n, Expected::Chain(dhr), &sealed::tag(hk, n)) {
                    return;
                }
            }
        }
        if self.ratchet.dhs.is_some() {
            let hk = self.ratchet.root.header_key();
            for n in 0..window {
                if visit(&hk, n, Expected::New, &sealed::tag(&hk, n)) {
                    return;
                }
            }
        }
    }

    /// Where a routing tag points in this session, if it is one this session
    /// expects ([`Session::visit_expected`]).
    fn locate(&self, id: &[u8; TAG_BYTES], window: u32) -> Option<(HeaderKey, u32, Expected)> {
        let mut found = None;
        self.visit_expected(window, |hk, n, expected, tag| {
            if tag == id {
                found = Some((hk.clone(), n, expected));
            }
            found.is_some()
        });
        found
    }

    /// The routing tags this session expects (SPEC.md 26.6): those of its
    /// stored skipped keys, of the next `window` messages of its receiving
    /// chain, and of the first `window` messages of the peer's next chain
    /// (while it holds a ratchet key pair). Empty for a v1 session. A client
    /// indexes them to route chain messages without trying sessions.
    pub fn routing_tags(&self, window: u32) -> Vec<[u8; TAG_BYTES]> {
        let mut tags = Vec::new();
        self.visit_expected(window, |_, _, _, tag| {
            tags.push(*tag);
            false
        });
        tags
    }

    /// Opens a v2 chain message whose envelope id is `id`, appending the
    /// plaintext (without padding) to `out`. Order of checks (SPEC.md
    /// 26.7): the payload's structure (`Decode`); `id` is a tag this
    /// session expects within `window` (`SessionMismatch`); the header
    /// opens under its key and names the chain the tag names (`Auth`); the
    /// ratchet checks and the AEAD as for v1 (8.4); the padding
    /// (`Decode`). On error neither the session nor `out` changes.
    ///
    /// # Errors
    /// As above.
    pub fn open(
        &mut self,
        id: &[u8; TAG_BYTES],
        payload: &[u8],
        window: u32,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let parts = sealed::chain_parts(payload)?;
        if !self.is_sealed() {
            return Err(Error::SessionMismatch);
        }
        let (hk, n, expected) = self.locate(id, window).ok_or(Error::SessionMismatch)?;
        let header = sealed::open_header(&hk, n, id, parts.sealed_header)?;
        let chain_ok = match expected {
            Expected::Chain(key) => header.ratchet_key == key,
            Expected::New => Some(header.ratchet_key) != self.ratchet.dhr,
        };
        if !chain_ok {
            return Err(Error::Auth);
        }
        let mut prefix = [0u8; 2 + crate::protocol::wire::HEADER_LEN];
        copy(
            &mut prefix,
            [sealed::VERSION_2, sealed::KIND_CHAIN]
                .into_iter()
                .chain(header.encoded()),
        );
        let mut aad = [0u8; 64 + MAX_PREFIX_LEN];
        let aad = self.fill_aad(&mut aad, &prefix);
        self.ratchet.decrypt(
            &header,
            aad,
            parts.ciphertext,
            parts.tag,
            out,
            sealed::unpadded_len,
        )?;
        self.pending_prekey = None;
        Ok(())
    }

    /// The session's name: the first 16 bytes of SHA-256(EK_A), the same
    /// on both sides. The responder always knows it; the initiator knows it
    /// from [`Session::initiate`] until its first reply arrives (a session
    /// restored after that returns zeros): keep it beside the session if it
    /// is needed later, as the client's session records do.
    pub fn id(&self) -> [u8; 16] {
        self.tag
    }

    /// Which side created the session.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The peer's identity key.
    pub fn remote_identity(&self) -> &IdentityKey {
        &self.remote
    }
    /// Our own identity key.
    pub fn local_identity(&self) -> &IdentityKey {
        &self.local
    }
    /// Whether the next message will be a prekey message (the initiator has
    /// not yet heard back).
    pub fn sends_prekey_messages(&self) -> bool {
        self.pending_prekey.is_some()
    }
    /// The skipped-key limits.
    pub fn config(&self) -> SessionConfig {
        self.ratchet.config
    }
    /// Number of skipped message keys held (messages the counters show were
    /// sent but have not arrived, up to the cap).
    pub fn skipped_message_keys(&self) -> usize {
        self.ratchet.skipped.len
    }
    /// The peer's ratchet public keys this session can still decrypt under
    /// without a DH ratchet step: the current receiving key and the keys of
    /// chains with stored skipped message keys, each once. A client that is
    /// not told which session a message belongs to routes it by its
    /// header's key. (Public keys: compared with `==`.)
    pub fn receiving_ratchet_keys(&self) -> impl Iterator<Item = &[u8; 32]> {
        let current = self.ratchet.dhr.as_ref();
        current.into_iter().chain(
            self.ratchet
                .skipped
                .chains
                .iter()
                .map(|c| &c.ratchet_key)
                .filter(move |key| Some(*key) != current),
        )
    }

    /// How many messages this session has sent in its current sending chain
    /// (0 when a DH ratchet step is due before the next send). With a peer
    /// that never replies, this counts every message ever sent.
    pub fn sending_chain_length(&self) -> u32 {
        if self.ratchet.sending.is_some() {
            self.ratchet.ns
        } else {
            0
        }
    }

    /// Whether the peer may legitimately answer with a new ratchet key (we
    /// have a sending chain the peer may have seen). Only such sessions can
    /// own a message whose ratchet key no session knows yet.
    pub fn awaits_new_ratchet_key(&self) -> bool {
        // A v2 session's new chains are found by their routing tags.
        self.ratchet.sending.is_some() && !self.is_sealed()
    }

    /// Serializes the session state (see SPEC.md, "Session state encoding"
    /// and 26.9): at most 190 bytes without skipped message keys for a v1
    /// session, 254 for a v2 session. The bytes contain
    /// secret keys: store them encrypted. They do not contain the two
    /// identity keys, which [`Session::from_bytes`] takes back.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        crate::protocol::state::encode(self)
    }
    /// Restores a session from [`Session::to_bytes`], with our identity key
    /// and the peer's (the caller keeps them: a store keys its sessions by
    /// the peer's device address, which holds the peer's identity). Given
    /// the wrong identities, the session decrypts nothing (`Auth`) and the
    /// peer rejects what it encrypts: both are in every message's
    /// associated data.
    ///
    /// # Errors
    /// [`Error::State`] for corrupted, truncated or unknown-version input.
    pub fn from_bytes(bytes: &[u8], local: &IdentityKey, remote: &IdentityKey) -> Result<Session> {
        crate::protocol::state::decode(bytes, local, remote)
    }
}

/// A profile v2 envelope ([`Session::seal`]): the envelope id and the
/// payload a relay stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The envelope id: the routing tag of a chain message, 16 random bytes
    /// for a sealed prekey message.
    pub id: [u8; TAG_BYTES],
    /// The padded payload.
    pub payload: Vec<u8>,
}

/// The chain a routing tag names.
enum Expected {
    /// A known chain with this ratchet key.
    Chain([u8; 32]),
    /// The peer's next chain (a new ratchet key).
    New,
}

impl fmt::Debug for Accepted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accepted")
            .field("session", &self.session)
            .field("plaintext_len", &self.plaintext.len())
            .field("consumed_one_time_prekey", &self.consumed_one_time_prekey)
            .finish()
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("remote", &self.remote)
            .field("sends_prekey_messages", &self.sends_prekey_messages())
            .field("skipped_message_keys", &self.ratchet.skipped.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plaintext_limit_is_aes_gcm_s() {
        // 2^36 - 32 bytes: 2^32 - 2 blocks of 16 bytes.
        assert_eq!(MAX_PLAINTEXT, 68_719_476_704);
        assert!(plaintext_fits(0));
        assert!(plaintext_fits(68_719_476_704));
        assert!(!plaintext_fits(68_719_476_705));
        assert!(!plaintext_fits(usize::MAX));
    }
}
