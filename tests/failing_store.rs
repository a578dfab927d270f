//! A store that fails: each store operation of a receive is made to fail in
//! turn, and whatever happens nothing the relay was told to delete
//! (acknowledged) is missing from the store, and once the store works again
//! every message arrives exactly once (issue 14: dropping the `?` after
//! `commit_receive` would acknowledge what was never committed).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig, RelayStorage};
use cubbyhole::storage::{
    BlockingStore, ContactRecord, InboxMessage, LocalIdentity, MemoryStore, MessageId, OutboxEntry,
    PeerRecord, PrekeyState, Quarantined, ReceiveCommit, SentMessage, SessionRecord, StoreError,
};
use cubbyhole::transport::{DeviceAddress, EnvelopeId};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const NOW: u64 = 1_900_000_000;
const MESSAGES: usize = 5;

/// A memory store whose `fail_at`-th operation (counted from when it is
/// armed) fails with a backend error; every later one succeeds.
struct FailingStore {
    inner: MemoryStore,
    ops: AtomicU32,
    fail_at: Option<u32>,
    /// The operation that failed, if any.
    failed: std::sync::Mutex<Option<&'static str>>,
}

impl FailingStore {
    fn op(&self, name: &'static str) -> Result<(), StoreError> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if self.fail_at == Some(n) {
            *self.failed.lock().unwrap() = Some(name);
            return Err(StoreError::Backend(format!("injected failure of {name}")));
        }
        Ok(())
    }
}

impl BlockingStore for FailingStore {
    fn own_access_key(&self) -> Result<Option<cubbyhole::storage::AccessKeyRecord>, StoreError> {
        self.op("peer_access")?;
        self.inner.own_access_key()
    }
    fn set_own_access_key(
        &mut self,
        key: &cubbyhole::storage::AccessKeyRecord,
    ) -> Result<(), StoreError> {
        self.op("set_access")?;
        self.inner.set_own_access_key(key)
    }
    fn peer_access(
        &self,
        peer: &DeviceAddress,
    ) -> Result<cubbyhole::storage::PeerAccess, StoreError> {
        self.op("peer_access")?;
        self.inner.peer_access(peer)
    }
    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &cubbyhole::storage::AccessKeyRecord,
    ) -> Result<(), StoreError> {
        self.op("set_access")?;
        self.inner.set_peer_access_key(peer, key)
    }
    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> Result<(), StoreError> {
        self.op("set_access")?;
        self.inner.set_peer_excluded(peer, excluded)
    }
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError> {
        self.op("identity")?;
        self.inner.identity()
    }

    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError> {
        self.op("set_identity")?;
        self.inner.set_identity(identity)
    }

    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError> {
        self.op("prekeys")?;
        self.inner.prekeys()
    }

    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
        self.op("set_prekeys")?;
        self.inner.set_prekeys(state)
    }

    fn session(&self, peer: &DeviceAddress) -> Result<Option<SessionRecord>, StoreError> {
        self.op("session")?;
        self.inner.session(peer)
    }

    fn sessions(
        &self,
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        self.op("sessions")?;
        self.inner.sessions()
    }

    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.op("set_session")?;
        self.inner.set_session(peer, record)
    }

    fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError> {
        self.op("remove_session")?;
        self.inner.remove_session(peer)
    }

    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.op("quarantine_session")?;
        self.inner.quarantine_session(peer, now, reason)
    }

    fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.op("quarantined")?;
        self.inner.quarantined()
    }

    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError> {
        self.op("peer")?;
        self.inner.peer(device)
    }

    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        self.op("set_peer")?;
        self.inner.set_peer(peer)
    }

    fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        self.op("peers")?;
        self.inner.peers()
    }

    fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, StoreError> {
        self.op("contact")?;
        self.inner.contact(name)
    }

    fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError> {
        self.op("set_contact")?;
        self.inner.set_contact(contact)
    }

    fn contacts(&self) -> Result<Vec<ContactRecord>, StoreError> {
        self.op("contacts")?;
        self.inner.contacts()
    }

    fn peers_with_identity(&self, identity: &[u8; 32]) -> Result<Vec<PeerRecord>, StoreError> {
        self.op("peers_with_identity")?;
        self.inner.peers_with_identity(identity)
    }

    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        self.op("commit_send")?;
        self.inner.commit_send(record, entry, sent)
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.op("outbox")?;
        self.inner.outbox()
    }

    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.op("remove_outbox")?;
        self.inner.remove_outbox(id)
    }

    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        self.op("is_processed")?;
        self.inner.is_processed(id)
    }

    fn processed_among(&self, ids: &[EnvelopeId]) -> Result<Vec<bool>, StoreError> {
        self.op("processed_among")?;
        self.inner.processed_among(ids)
    }

    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError> {
        self.op("commit_receive")?;
        self.inner.commit_receive(batch)
    }

    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError> {
        self.op("prune_processed")?;
        self.inner.prune_processed(before)
    }

    fn sent_messages(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.op("sent_messages")?;
        self.inner.sent_messages()
    }

    fn pending_sent(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.op("pending_sent")?;
        self.inner.pending_sent()
    }

    fn last_pending_to(&self, to: &DeviceAddress) -> Result<Option<MessageId>, StoreError> {
        self.op("last_pending_to")?;
        self.inner.last_pending_to(to)
    }

    fn sent_message(&self, id: &MessageId) -> Result<Option<SentMessage>, StoreError> {
        self.op("sent_message")?;
        self.inner.sent_message(id)
    }

    fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError> {
        self.op("update_sent")?;
        self.inner.update_sent(message)
    }

    fn prune_sent(&mut self, before: u64) -> Result<(), StoreError> {
        self.op("prune_sent")?;
        self.inner.prune_sent(before)
    }

    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError> {
        self.op("inbox")?;
        self.inner.inbox()
    }

    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.op("remove_inbox")?;
        self.inner.remove_inbox(id)
    }

    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        self.op("sessions_with_identity")?;
        self.inner.sessions_with_identity(identity)
    }

    fn route_ratchet_keys(&self, keys: &[[u8; 32]]) -> Result<Vec<DeviceAddress>, StoreError> {
        self.op("route_ratchet_keys")?;
        self.inner.route_ratchet_keys(keys)
    }

    fn awaiting_ratchet_key(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        self.op("awaiting_ratchet_key")?;
        self.inner.awaiting_ratchet_key()
    }
}

type Relayed = InProcessRelay<MemoryRelayStorage>;

/// A fresh world: Alice has sent Bob `MESSAGES` messages; Bob's store fails
/// its `fail_at`-th operation of the receive.
fn world(
    fail_at: u32,
) -> (
    Relayed,
    Client<FailingStore, Relayed, Relayed>,
    Vec<EnvelopeId>,
) {
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let relay = InProcessRelay::with_clock(
        Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
        Arc::new(|| NOW),
    );
    let store = FailingStore {
        inner: MemoryStore::new(),
        ops: AtomicU32::new(0),
        fail_at: None,
        failed: std::sync::Mutex::new(None),
    };
    let config = ClientConfig::default();
    let mut bob = block_on(Client::open(
        store,
        relay.clone(),
        relay.clone(),
        config,
        &mut rng,
    ))
    .unwrap();
    block_on(bob.maintain_prekeys(&mut rng, NOW)).unwrap();
    let mut alice = block_on(Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay.clone(),
        config,
        &mut rng,
    ))
    .unwrap();
    block_on(alice.maintain_prekeys(&mut rng, NOW)).unwrap();
    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        let sent = block_on(alice.send(&mut rng, &bob.address(), format!("m{i}").as_bytes(), NOW))
            .unwrap();
        assert!(sent.deposited);
        ids.push(sent.id);
    }
    let store = bob.store_mut();
    store.ops.store(0, Ordering::SeqCst);
    store.fail_at = Some(fail_at);
    (relay, bob, ids)
}

/// The envelopes still pending in Bob's mailbox.
fn pending(relay: &Relayed, bob: &DeviceAddress) -> Vec<EnvelopeId> {
    relay
        .with_relay(|r| {
            r.storage()
                .list_envelopes(&bob.mailbox(), 0, 1_000, u64::MAX)
                .unwrap()
                .into_iter()
                .map(|e| e.id)
                .collect()
        })
        .unwrap()
}

#[test]
fn a_failing_store_never_loses_an_acknowledged_message() {
    for fail_at in 0.. {
        let (relay, mut bob, ids) = world(fail_at);
        let mut rng = ChaCha20Rng::seed_from_u64(u64::from(fail_at));
        let result = block_on(bob.receive(&mut rng, NOW));
        let failed = *bob.store().failed.lock().unwrap();
        let Some(op) = failed else {
            // The fault came after the last operation: the end.
            result.unwrap();
            // Operations 0..fail_at each failed once.
            assert!(fail_at > 10, "only {fail_at} operations were failed");
            eprintln!("{fail_at} operations of the receive failed in turn");
            return;
        };
        // Whatever the receive did, everything acknowledged was committed.
        let left = pending(&relay, &bob.address());
        for id in &ids {
            if !left.contains(id) {
                assert!(
                    bob.store().inner.is_processed(id).unwrap(),
                    "fault at operation {fail_at} ({op}): an envelope was acknowledged \
                     but never committed ({result:?})"
                );
            }
        }
        // The store works again: every message arrives, once.
        block_on(bob.receive(&mut rng, NOW)).unwrap();
        let mut bodies: Vec<Vec<u8>> = bob
            .store()
            .inner
            .inbox()
            .unwrap()
            .into_iter()
            .map(|m| m.body)
            .collect();
        bodies.sort();
        let want: Vec<Vec<u8>> = (0..MESSAGES)
            .map(|i| format!("m{i}").into_bytes())
            .collect();
        assert_eq!(
            bodies, want,
            "fault at operation {fail_at} ({op}): {result:?}"
        );
    }
}
