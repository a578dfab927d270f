//! An in-memory [`Store`], for tests and for applications that persist
//! elsewhere. Every commit is trivially atomic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::vec::Vec;

use super::{
    InboxMessage, LocalIdentity, OutboxEntry, PeerRecord, PrekeyState, ReceiveCommit, Store,
    StoreError,
};
use crate::protocol::session::Session;
use crate::transport::{DeviceAddress, EnvelopeId};

/// A [`Store`] in memory.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    identity: Option<LocalIdentity>,
    prekeys: Option<PrekeyState>,
    sessions: BTreeMap<DeviceAddress, Session>,
    peers: BTreeMap<DeviceAddress, PeerRecord>,
    outbox: Vec<OutboxEntry>,
    processed: HashMap<EnvelopeId, u64>,
    inbox: Vec<InboxMessage>,
    inbox_ids: BTreeSet<EnvelopeId>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError> {
        Ok(self.identity.clone())
    }
    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError> {
        self.identity = Some(identity.clone());
        Ok(())
    }
    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError> {
        Ok(self.prekeys.clone())
    }
    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
        self.prekeys = Some(state.clone());
        Ok(())
    }
    fn session(&self, peer: &DeviceAddress) -> Result<Option<Session>, StoreError> {
        Ok(self.sessions.get(peer).cloned())
    }
    fn sessions(&self) -> Result<Vec<(DeviceAddress, Session)>, StoreError> {
        Ok(self.sessions.iter().map(|(a, s)| (*a, s.clone())).collect())
    }
    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError> {
        Ok(self.peers.get(device).cloned())
    }
    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        self.peers.insert(peer.address, peer.clone());
        Ok(())
    }
    fn commit_send(&mut self, session: &Session, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.sessions.insert(entry.to, session.clone());
        self.outbox.push(entry.clone());
        Ok(())
    }
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        Ok(self.outbox.clone())
    }
    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.outbox.retain(|e| &e.envelope.id != id);
        Ok(())
    }
    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        Ok(self.processed.contains_key(id))
    }
    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError> {
        for c in batch {
            if let Some((peer, session)) = c.session {
                self.sessions.insert(*peer, session.clone());
            }
            if let Some(prekeys) = c.prekeys {
                self.prekeys = Some(prekeys.clone());
            }
            if let Some(peer) = c.peer {
                self.peers.insert(peer.address, peer.clone());
            }
            if let Some(m) = c.message {
                if self.inbox_ids.insert(m.envelope_id) {
                    self.inbox.push(m.clone());
                }
            }
            self.processed.insert(c.envelope_id, c.processed_at);
        }
        Ok(())
    }
    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError> {
        self.processed.retain(|_, at| *at >= before);
        Ok(())
    }
    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError> {
        Ok(self.inbox.clone())
    }
    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.inbox.retain(|m| &m.envelope_id != id);
        self.inbox_ids.remove(id);
        Ok(())
    }
}
