//! Session records: everything a device keeps of its sessions with one peer
//! device, the current session and the archived ones (SPEC.md, "Session
//! records").
//!
//! Which session is current is not remembered but computed, by a rule both
//! devices apply to the same facts: among the sessions not superseded, the
//! one with the greatest `(generation, reset, initiator address, id)`. The
//! generation is chosen by the initiator (at least its clock, above every
//! generation it knows for the peer) and carried inside the session's first
//! messages, so once both devices have seen the same sessions they pick the
//! same one, whatever order the messages came in: simultaneous first
//! messages converge within one round trip. An archived session keeps
//! decrypting (messages in flight are not lost); only the current one
//! encrypts.

use std::vec::Vec;

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::protocol::keys::IdentityKey;
use crate::protocol::session::{Role, Session};
use crate::protocol::state::STATE_VERSION;
use crate::transport::DeviceAddress;

use super::Cursor;

/// First byte of [`SessionRecord::to_bytes`] (distinct from every session
/// state version, so a bare session state, as stored before records, still
/// decodes: as a record of one session of generation 0).
pub const RECORD_VERSION: u8 = 0x80;

/// Default number of archived sessions kept beside the current one (as
/// libsignal keeps 40 archived states).
pub const DEFAULT_ARCHIVED_SESSIONS: usize = 40;

const SUPERSEDED: u8 = 1;
const RESET: u8 = 2;

type Rank = (u64, bool, DeviceAddress, [u8; 16]);

/// One session with a peer device and what the record rule needs of it.
#[derive(Clone)]
pub struct SessionEntry {
    /// The session.
    pub session: Session,
    /// Its name, [`Session::id`] at creation (both sides know it).
    pub id: [u8; 16],
    /// The generation its initiator chose (SPEC.md, "Session records").
    pub generation: u64,
    /// Never current again (the peer said it lost it, or we restored a
    /// backup): it may still decrypt, it never encrypts.
    pub superseded: bool,
    /// Its initiator had lost its earlier sessions with the other side: its
    /// prekey messages carry the frame's `RESET` flag (set by the initiator
    /// when it starts the session, by the responder when it accepts it).
    pub reset: bool,
    /// When it was created here (unix seconds).
    pub created: u64,
    /// When a message last decrypted under it (0: never).
    pub last_received: u64,
}

impl core::fmt::Debug for SessionEntry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SessionEntry")
            .field("id", &self.id)
            .field("role", &self.session.role())
            .field("generation", &self.generation)
            .field("superseded", &self.superseded)
            .field("reset", &self.reset)
            .field("created", &self.created)
            .field("last_received", &self.last_received)
            .finish_non_exhaustive()
    }
}

impl SessionEntry {
    /// A new entry for a session created now.
    pub fn new(session: Session, generation: u64, now: u64) -> Self {
        SessionEntry {
            id: session.id(),
            session,
            generation,
            superseded: false,
            reset: false,
            created: now,
            last_received: 0,
        }
    }

    /// The record rule's sort key: `(generation, reset, initiator address,
    /// id)`. Both devices know every part of it, so they rank alike.
    fn rank(&self, local: &DeviceAddress, peer: &DeviceAddress) -> Rank {
        let initiator = match self.session.role() {
            Role::Initiator => *local,
            Role::Responder => *peer,
        };
        (self.generation, self.reset, initiator, self.id)
    }
}

/// A peer device's sessions: at most one current, a bounded number archived.
#[derive(Clone, Debug, Default)]
pub struct SessionRecord {
    entries: Vec<SessionEntry>,
}

impl SessionRecord {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// A record holding one session (a session stored before records).
    pub fn single(entry: SessionEntry) -> Self {
        SessionRecord {
            entries: vec![entry],
        }
    }

    /// Every session, in no particular order.
    pub fn entries(&self) -> &[SessionEntry] {
        &self.entries
    }

    /// Every session, mutably (the caller must not change ids).
    pub fn entries_mut(&mut self) -> &mut [SessionEntry] {
        &mut self.entries
    }

    /// The route keys of the record: what a store indexes to route a
    /// message to its record ([`Store::route_ratchet_keys`]). For v1
    /// sessions, the peer's ratchet public keys they can decrypt under
    /// without a DH ratchet step ([`Session::receiving_ratchet_keys`]); for
    /// v2 sessions, the routing tags they expect
    /// ([`Session::routing_tags`] with [`ROUTING_WINDOW`]), each as
    /// [`tag_route_key`] (SPEC.md 26.6).
    ///
    /// [`Store::route_ratchet_keys`]: super::Store::route_ratchet_keys
    pub fn ratchet_keys(&self) -> impl Iterator<Item = [u8; 32]> + '_ {
        self.entries.iter().flat_map(|e| {
            let v1 = e.session.receiving_ratchet_keys().copied();
            let v2 = e
                .session
                .routing_tags(ROUTING_WINDOW)
                .into_iter()
                .map(|t| tag_route_key(&t));
            v1.chain(v2)
        })
    }

    /// Whether one of the record's sessions awaits a new ratchet key from
    /// the peer ([`Session::awaits_new_ratchet_key`]): only such a record
    /// can own a message whose ratchet key no record knows.
    pub fn awaits_ratchet_key(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.session.awaits_new_ratchet_key())
    }

    /// Whether the record holds no session.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The index of the current session: the greatest rank among those not
    /// superseded. `local` is this device, `peer` the record's peer.
    pub fn current_index(&self, local: &DeviceAddress, peer: &DeviceAddress) -> Option<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.superseded)
            .max_by(|(_, a), (_, b)| a.rank(local, peer).cmp(&b.rank(local, peer)))
            .map(|(i, _)| i)
    }

    /// The current session, if any.
    pub fn current(&self, local: &DeviceAddress, peer: &DeviceAddress) -> Option<&SessionEntry> {
        self.current_index(local, peer).map(|i| &self.entries[i])
    }

    /// The current session, mutably.
    pub fn current_mut(
        &mut self,
        local: &DeviceAddress,
        peer: &DeviceAddress,
    ) -> Option<&mut SessionEntry> {
        let i = self.current_index(local, peer)?;
        Some(&mut self.entries[i])
    }

    /// The session with this id.
    pub fn find(&self, id: &[u8; 16]) -> Option<&SessionEntry> {
        self.entries.iter().find(|e| &e.id == id)
    }

    /// The greatest generation of any session held (0 if none).
    pub fn max_generation(&self) -> u64 {
        self.entries.iter().map(|e| e.generation).max().unwrap_or(0)
    }

    /// Adds a session, then drops archived sessions beyond `max_archived`:
    /// superseded ones first, then those least recently used. The current
    /// session is never dropped.
    pub fn insert(
        &mut self,
        entry: SessionEntry,
        max_archived: usize,
        local: &DeviceAddress,
        peer: &DeviceAddress,
    ) {
        self.entries.retain(|e| e.id != entry.id);
        self.entries.push(entry);
        while self.entries.len() > max_archived.saturating_add(1) {
            let current = self.current_index(local, peer);
            let victim = self
                .entries
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != current)
                .min_by_key(|(_, e)| (!e.superseded, e.last_received.max(e.created)))
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    self.entries.remove(i);
                }
                None => break,
            }
        }
    }

    /// Applies a `RESET` carried by the session `id` (the peer lost its
    /// earlier sessions with us): every session ranked below it is
    /// superseded. Sessions ranked above it were created after it (the peer
    /// started them knowing it, or we did after receiving it) or cross it
    /// with a later generation; the peer may hold them, so they stay.
    pub fn apply_reset(&mut self, id: &[u8; 16], local: &DeviceAddress, peer: &DeviceAddress) {
        let Some(top) = self.find(id).map(|e| e.rank(local, peer)) else {
            return;
        };
        for e in &mut self.entries {
            if e.rank(local, peer) < top {
                e.superseded = true;
            }
        }
    }

    /// Marks the session with this id superseded; returns whether one was.
    pub fn supersede(&mut self, id: &[u8; 16]) -> bool {
        let mut hit = false;
        for e in self.entries.iter_mut().filter(|e| &e.id == id) {
            hit |= !e.superseded;
            e.superseded = true;
        }
        hit
    }

    /// Marks every session superseded (after restoring a backup: none may
    /// encrypt again).
    pub fn supersede_all(&mut self) {
        for e in &mut self.entries {
            e.superseded = true;
        }
    }

    /// Serializes the record (secret keys included: store it encrypted):
    ///
    /// ```text
    /// 0x80 || count (2) || count x ( flags (1) || id (16) || generation (8)
    ///   || created (8) || last_received (8) || length (4) || session state )
    /// ```
    ///
    /// `flags` bit 0 is "superseded", bit 1 "reset"; the other bits are
    /// zero.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let states: Vec<_> = self.entries.iter().map(|e| e.session.to_bytes()).collect();
        let len = 3 + states.iter().map(|s| 45 + s.len()).sum::<usize>();
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        out.push(RECORD_VERSION);
        out.extend_from_slice(&(self.entries.len() as u16).to_be_bytes());
        for (e, state) in self.entries.iter().zip(&states) {
            out.push(if e.superseded { SUPERSEDED } else { 0 } | if e.reset { RESET } else { 0 });
            out.extend_from_slice(&e.id);
            out.extend_from_slice(&e.generation.to_be_bytes());
            out.extend_from_slice(&e.created.to_be_bytes());
            out.extend_from_slice(&e.last_received.to_be_bytes());
            out.extend_from_slice(&(state.len() as u32).to_be_bytes());
            out.extend_from_slice(state);
        }
        out
    }

    /// Restores [`Self::to_bytes`]; a bare session state (the stored form
    /// before records) decodes as a record of that one session, generation
    /// 0.
    ///
    /// # Errors
    /// [`Error::State`] for malformed input.
    pub fn from_bytes(bytes: &[u8], local: &IdentityKey, remote: &IdentityKey) -> Result<Self> {
        let bad = Error::State("session record");
        match bytes.first() {
            Some(&STATE_VERSION) => {
                let session = Session::from_bytes(bytes, local, remote)?;
                return Ok(SessionRecord::single(SessionEntry::new(session, 0, 0)));
            }
            Some(&RECORD_VERSION) => {}
            _ => return Err(bad),
        }
        let mut r = Cursor(&bytes[1..]);
        let count = usize::from(r.u16().ok_or(bad)?);
        if count > r.0.len() / 45 {
            return Err(bad);
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = r.u8().ok_or(bad)?;
            if flags & !(SUPERSEDED | RESET) != 0 {
                return Err(bad);
            }
            let id = r.array::<16>().ok_or(bad)?;
            let generation = r.u64().ok_or(bad)?;
            let created = r.u64().ok_or(bad)?;
            let last_received = r.u64().ok_or(bad)?;
            let len = r.u32().ok_or(bad)? as usize;
            let state = r.take(len).ok_or(bad)?;
            let session = Session::from_bytes(state, local, remote)?;
            if entries.iter().any(|e: &SessionEntry| e.id == id) {
                return Err(bad);
            }
            entries.push(SessionEntry {
                session,
                id,
                generation,
                superseded: flags & SUPERSEDED != 0,
                reset: flags & RESET != 0,
                created,
                last_received,
            });
        }
        if !r.0.is_empty() {
            return Err(bad);
        }
        Ok(SessionRecord { entries })
    }
}

/// How many messages ahead in a chain (and from the start of the peer's
/// next chain) a v2 session's routing tags reach (SPEC.md 26.6): the
/// receiver's window `W`. A message further ahead is not routable.
pub const ROUTING_WINDOW: u32 = 32;

/// The route key of a v2 routing tag: the tag followed by 16 zero bytes,
/// so that tags and v1 ratchet keys share one index (a ratchet key with 16
/// trailing zero bytes is not a key anyone holds the secret of, and a tag
/// is 128 pseudorandom bits).
pub fn tag_route_key(tag: &[u8; 16]) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(tag);
    key
}
