//! A store that counts its write transactions, for the structural checks
//! of the `fanout` bench and the `catch_up` example: every call is passed
//! to the wrapped store (including the trait's provided methods, so the
//! wrapped store's own versions run), and each writing call adds one to
//! `writes` (one transaction, one fsync with `SqliteStore`'s
//! `synchronous = FULL`). The outbox commits are counted apart:
//! `commit_send` calls, `commit_send_many` calls and the copies those
//! carried; so is the deposits' bookkeeping: `remove_outbox` and
//! `update_sent` calls, `commit_deposits` calls and the deposits those
//! recorded. The cost is a few relaxed atomic additions per write.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use cubbyhole::storage::{
    AccountRecord, BlockingStore, ContactRecord, DepositDone, InboxMessage, LocalIdentity,
    MessageId, OutboxEntry, PeerRecord, PrekeyState, Quarantined, ReceiveCommit, SendCopy,
    SentMessage, SessionRecord, StoreError,
};
use cubbyhole::transport::{DeviceAddress, EnvelopeId};
use cubbyhole::AccountId;

/// What a [`Counted`] store has seen since its counts were last taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Writing calls (transactions).
    pub writes: usize,
    /// `commit_send` calls (one outbox entry each).
    pub commit_send: usize,
    /// `commit_send_many` calls.
    pub commit_send_many: usize,
    /// Copies carried by the `commit_send_many` calls.
    pub copies: usize,
    /// `commit_receive` calls.
    pub commit_receive: usize,
    /// `remove_outbox` calls.
    pub remove_outbox: usize,
    /// `update_sent` calls.
    pub update_sent: usize,
    /// `commit_deposits` calls.
    pub commit_deposits: usize,
    /// Deposits recorded by the `commit_deposits` calls.
    pub deposits: usize,
}

/// `S`, counting its writes.
pub struct Counted<S> {
    inner: S,
    writes: AtomicUsize,
    commit_send: AtomicUsize,
    commit_send_many: AtomicUsize,
    copies: AtomicUsize,
    commit_receive: AtomicUsize,
    remove_outbox: AtomicUsize,
    update_sent: AtomicUsize,
    commit_deposits: AtomicUsize,
    deposits: AtomicUsize,
}

impl<S> Counted<S> {
    /// Wraps `inner`, all counts zero.
    pub fn new(inner: S) -> Self {
        Counted {
            inner,
            writes: AtomicUsize::new(0),
            commit_send: AtomicUsize::new(0),
            commit_send_many: AtomicUsize::new(0),
            copies: AtomicUsize::new(0),
            commit_receive: AtomicUsize::new(0),
            remove_outbox: AtomicUsize::new(0),
            update_sent: AtomicUsize::new(0),
            commit_deposits: AtomicUsize::new(0),
            deposits: AtomicUsize::new(0),
        }
    }

    /// The counts so far, which are reset to zero.
    pub fn take(&self) -> Counts {
        Counts {
            writes: self.writes.swap(0, Relaxed),
            commit_send: self.commit_send.swap(0, Relaxed),
            commit_send_many: self.commit_send_many.swap(0, Relaxed),
            copies: self.copies.swap(0, Relaxed),
            commit_receive: self.commit_receive.swap(0, Relaxed),
            remove_outbox: self.remove_outbox.swap(0, Relaxed),
            update_sent: self.update_sent.swap(0, Relaxed),
            commit_deposits: self.commit_deposits.swap(0, Relaxed),
            deposits: self.deposits.swap(0, Relaxed),
        }
    }

    fn write(&self) {
        self.writes.fetch_add(1, Relaxed);
    }
}

impl<S: BlockingStore> BlockingStore for Counted<S> {
    fn own_access_key(&self) -> Result<Option<cubbyhole::storage::AccessKeyRecord>, StoreError> {
        self.inner.own_access_key()
    }
    fn set_own_access_key(
        &mut self,
        key: &cubbyhole::storage::AccessKeyRecord,
    ) -> Result<(), StoreError> {
        self.write();
        self.inner.set_own_access_key(key)
    }
    fn peer_access(
        &self,
        peer: &DeviceAddress,
    ) -> Result<cubbyhole::storage::PeerAccess, StoreError> {
        self.inner.peer_access(peer)
    }
    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &cubbyhole::storage::AccessKeyRecord,
    ) -> Result<(), StoreError> {
        self.write();
        self.inner.set_peer_access_key(peer, key)
    }
    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> Result<(), StoreError> {
        self.write();
        self.inner.set_peer_excluded(peer, excluded)
    }
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError> {
        self.inner.identity()
    }
    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError> {
        self.write();
        self.inner.set_identity(identity)
    }
    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError> {
        self.inner.prekeys()
    }
    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
        self.write();
        self.inner.set_prekeys(state)
    }
    fn session(&self, peer: &DeviceAddress) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.session(peer)
    }
    fn sessions(
        &self,
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        self.inner.sessions()
    }
    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.write();
        self.inner.set_session(peer, record)
    }
    fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError> {
        self.write();
        self.inner.remove_session(peer)
    }
    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.write();
        self.inner.quarantine_session(peer, now, reason)
    }
    fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.inner.quarantined()
    }
    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError> {
        self.inner.peer(device)
    }
    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        self.write();
        self.inner.set_peer(peer)
    }
    fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        self.inner.peers()
    }
    fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, StoreError> {
        self.inner.contact(name)
    }
    fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError> {
        self.write();
        self.inner.set_contact(contact)
    }
    fn contacts(&self) -> Result<Vec<ContactRecord>, StoreError> {
        self.inner.contacts()
    }
    fn peers_with_identity(&self, identity: &[u8; 32]) -> Result<Vec<PeerRecord>, StoreError> {
        self.inner.peers_with_identity(identity)
    }
    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        self.write();
        self.commit_send.fetch_add(1, Relaxed);
        self.inner.commit_send(record, entry, sent)
    }
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.inner.outbox()
    }
    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.write();
        self.remove_outbox.fetch_add(1, Relaxed);
        self.inner.remove_outbox(id)
    }
    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        self.inner.is_processed(id)
    }
    fn processed_among(&self, ids: &[EnvelopeId]) -> Result<Vec<bool>, StoreError> {
        self.inner.processed_among(ids)
    }
    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError> {
        self.write();
        self.commit_receive.fetch_add(1, Relaxed);
        self.inner.commit_receive(batch)
    }
    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError> {
        self.write();
        self.inner.prune_processed(before)
    }
    fn sent_messages(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.inner.sent_messages()
    }
    fn pending_sent(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.inner.pending_sent()
    }
    fn last_pending_to(&self, to: &DeviceAddress) -> Result<Option<MessageId>, StoreError> {
        self.inner.last_pending_to(to)
    }
    fn sent_message(&self, id: &MessageId) -> Result<Option<SentMessage>, StoreError> {
        self.inner.sent_message(id)
    }
    fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError> {
        self.write();
        self.update_sent.fetch_add(1, Relaxed);
        self.inner.update_sent(message)
    }
    fn prune_sent(&mut self, before: u64) -> Result<(), StoreError> {
        self.write();
        self.inner.prune_sent(before)
    }
    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError> {
        self.inner.inbox()
    }
    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.write();
        self.inner.remove_inbox(id)
    }
    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        self.inner.sessions_with_identity(identity)
    }
    fn route_ratchet_keys(&self, keys: &[[u8; 32]]) -> Result<Vec<DeviceAddress>, StoreError> {
        self.inner.route_ratchet_keys(keys)
    }
    fn awaiting_ratchet_key(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        self.inner.awaiting_ratchet_key()
    }
    fn commit_send_many(&mut self, copies: &[SendCopy]) -> Result<(), StoreError> {
        self.write();
        self.commit_send_many.fetch_add(1, Relaxed);
        self.copies.fetch_add(copies.len(), Relaxed);
        self.inner.commit_send_many(copies)
    }
    fn commit_deposits(&mut self, done: &[DepositDone]) -> Result<(), StoreError> {
        self.write();
        self.commit_deposits.fetch_add(1, Relaxed);
        self.deposits.fetch_add(done.len(), Relaxed);
        self.inner.commit_deposits(done)
    }
    fn own_account(&self) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.own_account()
    }
    fn set_own_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        self.write();
        self.inner.set_own_account(record)
    }
    fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.account(account)
    }
    fn set_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        self.write();
        self.inner.set_account(record)
    }
    fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        self.inner.accounts()
    }
}
