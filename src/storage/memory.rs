//! An in-memory [`Store`](super::Store), for tests and for applications that persist
//! elsewhere. Every commit is trivially atomic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::vec::Vec;

use std::string::ToString;

use super::{
    AccessKeyRecord, AccountRecord, BlockingStore, ContactRecord, InboxMessage, LocalIdentity,
    MessageId, OutboxEntry, PairingRecord, PeerAccess, PeerRecord, PrekeyState, Quarantined,
    ReceiveCommit, SendCopy, SentMessage, SessionRecord, StoreError,
};
use crate::protocol::devices::AccountId;
use crate::transport::{DeviceAddress, EnvelopeId};

/// A [`Store`](super::Store) in memory (a [`BlockingStore`] that never
/// blocks). Routing looks at the decoded records in memory: no index is
/// needed.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    identity: Option<LocalIdentity>,
    prekeys: Option<PrekeyState>,
    sessions: BTreeMap<DeviceAddress, SessionRecord>,
    /// When each record was last written (a counter): the order of
    /// `awaiting_ratchet_key`.
    written: HashMap<DeviceAddress, u64>,
    writes: u64,
    quarantine: Vec<Quarantined>,
    /// Sent messages in the order first stored, with their positions by
    /// id (an update or lookup is not a scan).
    sent: Vec<SentMessage>,
    sent_index: HashMap<MessageId, usize>,
    contacts: BTreeMap<Vec<u8>, ContactRecord>,
    peers: BTreeMap<DeviceAddress, PeerRecord>,
    outbox: Vec<OutboxEntry>,
    processed: HashMap<EnvelopeId, u64>,
    inbox: Vec<InboxMessage>,
    inbox_ids: BTreeSet<EnvelopeId>,
    own_account: Option<AccountRecord>,
    accounts: BTreeMap<[u8; 32], AccountRecord>,
    pairing: Option<PairingRecord>,
    own_access: Option<AccessKeyRecord>,
    peer_access: BTreeMap<DeviceAddress, PeerAccess>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an outbox entry as loaded from a persistent store (which
    /// restores the outbox in its stored order).
    pub(crate) fn restore_outbox(&mut self, entry: OutboxEntry) {
        self.outbox.push(entry);
    }

    /// Appends an inbox message as loaded (in its stored order).
    pub(crate) fn restore_inbox(&mut self, message: InboxMessage) {
        if self.inbox_ids.insert(message.envelope_id) {
            self.inbox.push(message);
        }
    }

    /// Sets a processed mark as loaded, with its time.
    pub(crate) fn restore_processed(&mut self, id: EnvelopeId, at: u64) {
        self.processed.insert(id, at);
    }

    /// Appends a quarantined record as loaded (oldest first), or as moved
    /// there by a store that kept the record outside this cache.
    pub(crate) fn restore_quarantined(&mut self, quarantined: Quarantined) {
        self.quarantine.push(quarantined);
    }

    /// Whether the inbox holds a message of this envelope.
    pub(crate) fn has_inbox(&self, id: &EnvelopeId) -> bool {
        self.inbox_ids.contains(id)
    }

    /// Every processed mark with its time, in no order.
    pub(crate) fn processed_marks(&self) -> impl Iterator<Item = (&EnvelopeId, u64)> + '_ {
        self.processed.iter().map(|(id, at)| (id, *at))
    }

    /// Forgets a sent message, if kept.
    pub(crate) fn remove_sent(&mut self, id: &MessageId) {
        if self.sent_index.remove(id).is_some() {
            self.sent.retain(|m| m.id != *id);
            self.sent_index = self
                .sent
                .iter()
                .enumerate()
                .map(|(i, m)| (m.id, i))
                .collect();
        }
    }

    fn put_session(&mut self, peer: DeviceAddress, record: &SessionRecord) {
        self.writes += 1;
        self.written.insert(peer, self.writes);
        self.sessions.insert(peer, record.clone());
    }
}

impl BlockingStore for MemoryStore {
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
    fn own_access_key(&self) -> Result<Option<AccessKeyRecord>, StoreError> {
        Ok(self.own_access.clone())
    }
    fn set_own_access_key(&mut self, key: &AccessKeyRecord) -> Result<(), StoreError> {
        self.own_access = Some(key.clone());
        Ok(())
    }
    fn peer_access(&self, peer: &DeviceAddress) -> Result<PeerAccess, StoreError> {
        Ok(self.peer_access.get(peer).cloned().unwrap_or_default())
    }
    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &AccessKeyRecord,
    ) -> Result<(), StoreError> {
        self.peer_access.entry(*peer).or_default().key = Some(key.clone());
        Ok(())
    }
    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> Result<(), StoreError> {
        self.peer_access.entry(*peer).or_default().excluded = excluded;
        Ok(())
    }
    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
        self.prekeys = Some(state.clone());
        Ok(())
    }
    fn session(&self, peer: &DeviceAddress) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.sessions.get(peer).cloned())
    }
    fn sessions(
        &self,
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        Ok(self
            .sessions
            .iter()
            .map(|(a, s)| (*a, Ok(s.clone())))
            .collect())
    }
    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.put_session(*peer, record);
        Ok(())
    }
    #[allow(clippy::type_complexity)]
    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        let from = DeviceAddress {
            identity: *identity,
            device_id: 0,
        };
        Ok(self
            .sessions
            .range(from..)
            .take_while(|(a, _)| &a.identity == identity)
            .map(|(a, r)| (*a, Ok(r.clone())))
            .collect())
    }
    fn route_ratchet_keys(&self, keys: &[[u8; 32]]) -> Result<Vec<DeviceAddress>, StoreError> {
        Ok(self
            .sessions
            .iter()
            .filter(|(_, r)| r.ratchet_keys().any(|k| keys.contains(&k)))
            .map(|(a, _)| *a)
            .collect())
    }
    fn awaiting_ratchet_key(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        let mut found: Vec<(u64, DeviceAddress)> = self
            .sessions
            .iter()
            .filter(|(_, r)| r.awaits_ratchet_key())
            .map(|(a, _)| (self.written.get(a).copied().unwrap_or(0), *a))
            .collect();
        // Most recently written first.
        found.sort_unstable_by(|x, y| y.cmp(x));
        Ok(found.into_iter().map(|(_, a)| a).collect())
    }
    fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError> {
        self.sessions.remove(peer);
        Ok(())
    }
    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        if let Some(record) = self.sessions.remove(peer) {
            self.quarantine.push(Quarantined {
                peer: *peer,
                at: now,
                bytes: record.to_bytes(),
                reason: reason.to_string(),
            });
        }
        Ok(())
    }
    fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        Ok(self.quarantine.clone())
    }
    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError> {
        Ok(self.peers.get(device).cloned())
    }
    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        self.peers.insert(peer.address, peer.clone());
        Ok(())
    }
    fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, StoreError> {
        Ok(self.contacts.get(name).cloned())
    }
    fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError> {
        self.contacts.insert(contact.name.clone(), contact.clone());
        Ok(())
    }
    fn contacts(&self) -> Result<Vec<ContactRecord>, StoreError> {
        Ok(self.contacts.values().cloned().collect())
    }
    fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        Ok(self.peers.values().cloned().collect())
    }
    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        self.put_session(entry.to, record);
        // An envelope id already queued is replaced in place (as SQLite).
        match self
            .outbox
            .iter_mut()
            .find(|e| e.envelope.id == entry.envelope.id)
        {
            Some(queued) => *queued = entry.clone(),
            None => self.outbox.push(entry.clone()),
        }
        if let Some(sent) = sent {
            self.update_sent(sent)?;
        }
        Ok(())
    }
    fn commit_send_many(&mut self, copies: &[SendCopy]) -> Result<(), StoreError> {
        // Nothing below fails: all copies are stored, or (an error before
        // this point) none.
        for (record, entry, sent) in copies {
            self.commit_send(record, entry, sent.as_ref())?;
        }
        Ok(())
    }
    fn own_account(&self) -> Result<Option<AccountRecord>, StoreError> {
        Ok(self.own_account.clone())
    }
    fn set_own_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        self.own_account = Some(record.clone());
        Ok(())
    }
    fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        Ok(self.accounts.get(account.as_bytes()).cloned())
    }
    fn set_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        self.accounts.insert(record.account.0, record.clone());
        Ok(())
    }
    fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        Ok(self.accounts.values().cloned().collect())
    }
    fn pairing(&self) -> Result<Option<PairingRecord>, StoreError> {
        Ok(self.pairing.clone())
    }
    fn set_pairing(&mut self, record: Option<&PairingRecord>) -> Result<(), StoreError> {
        self.pairing = record.cloned();
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
            if let Some((peer, record)) = c.session {
                self.put_session(*peer, record);
            }
            if let Some(sent) = c.sent {
                self.update_sent(sent)?;
            }
            if let Some(prekeys) = c.prekeys {
                self.prekeys = Some(prekeys.clone());
            }
            if let Some(peer) = c.peer {
                self.peers.insert(peer.address, peer.clone());
            }
            if let Some((peer, key)) = c.access {
                self.peer_access.entry(*peer).or_default().key = Some(key.clone());
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
    fn sent_messages(&self) -> Result<Vec<SentMessage>, StoreError> {
        Ok(self.sent.clone())
    }
    fn pending_sent(&self) -> Result<Vec<SentMessage>, StoreError> {
        Ok(self
            .sent
            .iter()
            .filter(|m| m.state.is_pending())
            .cloned()
            .collect())
    }
    fn last_pending_to(&self, to: &DeviceAddress) -> Result<Option<MessageId>, StoreError> {
        // From the newest: the last message to `to` is usually recent.
        Ok(self
            .sent
            .iter()
            .rev()
            .find(|m| m.to == *to && m.state.is_pending())
            .map(|m| m.id))
    }
    fn sent_message(&self, id: &MessageId) -> Result<Option<SentMessage>, StoreError> {
        Ok(self.sent_index.get(id).map(|&i| self.sent[i].clone()))
    }
    fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError> {
        match self.sent_index.get(&message.id) {
            Some(&i) => self.sent[i] = message.clone(),
            None => {
                self.sent_index.insert(message.id, self.sent.len());
                self.sent.push(message.clone());
            }
        }
        Ok(())
    }
    fn prune_sent(&mut self, before: u64) -> Result<(), StoreError> {
        let len = self.sent.len();
        self.sent
            .retain(|m| m.state.is_pending() || m.created >= before);
        if self.sent.len() != len {
            self.sent_index = self
                .sent
                .iter()
                .enumerate()
                .map(|(i, m)| (m.id, i))
                .collect();
        }
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
