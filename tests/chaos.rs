//! The chaos test: three devices (the third joins later) talk through an
//! in-process relay that drops, duplicates, delays, reorders and replays
//! envelopes (old prekey messages included, after a stranger drained the
//! one-time prekeys), while the schedule injects simultaneous first
//! messages, restores from an old backup, lost prekeys, corrupted session
//! rows and crashes between any two store operations; a compromised key
//! writes under two device numbers. After the faults
//! stop, within a bounded number of rounds, every message an application
//! handed to `send` has been shown exactly once to its recipient (or its
//! sender was told it failed), nothing was shown that was not sent, and no
//! message key was ever used twice.
//!
//! Seeded and reproducible: `CHAOS_SCHEDULES` (default 1,000) schedules
//! from `CHAOS_SEED` (default 0); a failing schedule prints its seed, and
//! `CHAOS_SCHEDULES=1 CHAOS_SEED=<seed>` replays it alone. A longer soak:
//! `CHAOS_SCHEDULES=20000 cargo test --release --test chaos`.

use cubbyhole::transport::DepositPass;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

use cubbyhole::client::{block_on, Client, ClientConfig, ClientError};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::Trust;
use cubbyhole::storage::{
    BlockingStore, ContactRecord, DeliveryState, InboxMessage, LocalIdentity, MemoryStore,
    MessageId, OutboxEntry, PeerRecord, PrekeyState, Quarantined, ReceiveCommit, SentMessage,
    SessionRecord, StoreError,
};
use cubbyhole::transport::{
    DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxId, PrekeyDirectory,
    TransportError,
};
use cubbyhole::{Incoming, PrekeyStore, Role};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const T0: u64 = 1_900_000_000;
const HOUR: u64 = 3600;

// ---------------------------------------------------------------- store

/// Faults a device's store suffers, shared with the test.
#[derive(Default)]
struct StoreFaults {
    /// Writes left before the process "dies" (the write is not applied).
    crash_in: Option<u32>,
    /// The process died: every call fails until it is restarted.
    dead: bool,
    /// Peers whose session row no longer decodes.
    corrupt: HashSet<DeviceAddress>,
}

/// Every session a device ever accepted as responder, kept across
/// restores: a session accepted twice means a replayed first message was
/// taken for a new one.
#[derive(Default)]
struct Accepted {
    ids: HashSet<([u8; 32], [u8; 16])>,
    twice: usize,
}

/// A [`MemoryStore`] (each call atomic) that can die between any two
/// writes and whose session rows can be corrupted.
struct ChaosStore {
    inner: MemoryStore,
    faults: Arc<Mutex<StoreFaults>>,
    accepted: Arc<Mutex<Accepted>>,
}

fn killed() -> StoreError {
    StoreError::Backend("process killed".into())
}

impl ChaosStore {
    fn alive(&self) -> Result<(), StoreError> {
        if self.faults.lock().unwrap().dead {
            return Err(killed());
        }
        Ok(())
    }
    fn write(&self) -> Result<(), StoreError> {
        let mut f = self.faults.lock().unwrap();
        if f.dead {
            return Err(killed());
        }
        if let Some(n) = f.crash_in.as_mut() {
            if *n == 0 {
                f.crash_in = None;
                f.dead = true;
                return Err(killed());
            }
            *n -= 1;
        }
        Ok(())
    }
    fn corrupted(&self, peer: &DeviceAddress) -> Option<StoreError> {
        self.faults
            .lock()
            .unwrap()
            .corrupt
            .contains(peer)
            .then(|| StoreError::Corrupted {
                table: "sessions",
                row: "chaos".into(),
                reason: "bit rot".into(),
            })
    }
    fn heal(&self, peer: &DeviceAddress) {
        self.faults.lock().unwrap().corrupt.remove(peer);
    }
    /// Notes the responder sessions a write adds to a peer's record.
    fn note(&self, peer: &DeviceAddress, record: &SessionRecord) {
        let before = self.inner.session(peer).ok().flatten().unwrap_or_default();
        let mut acc = self.accepted.lock().unwrap();
        for e in record.entries() {
            if e.session.role() == Role::Responder
                && before.find(&e.id).is_none()
                && !acc.ids.insert((peer.identity, e.id))
            {
                acc.twice += 1;
            }
        }
    }
}

impl BlockingStore for ChaosStore {
    fn own_access_key(&self) -> Result<Option<cubbyhole::storage::AccessKeyRecord>, StoreError> {
        self.alive()?;
        self.inner.own_access_key()
    }
    fn set_own_access_key(
        &mut self,
        key: &cubbyhole::storage::AccessKeyRecord,
    ) -> Result<(), StoreError> {
        self.write()?;
        self.inner.set_own_access_key(key)
    }
    fn peer_access(
        &self,
        peer: &DeviceAddress,
    ) -> Result<cubbyhole::storage::PeerAccess, StoreError> {
        self.alive()?;
        self.inner.peer_access(peer)
    }
    fn set_peer_access_key(
        &mut self,
        peer: &DeviceAddress,
        key: &cubbyhole::storage::AccessKeyRecord,
    ) -> Result<(), StoreError> {
        self.write()?;
        self.inner.set_peer_access_key(peer, key)
    }
    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> Result<(), StoreError> {
        self.write()?;
        self.inner.set_peer_excluded(peer, excluded)
    }
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError> {
        self.alive()?;
        self.inner.identity()
    }
    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError> {
        self.write()?;
        self.inner.set_identity(identity)
    }
    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError> {
        self.alive()?;
        self.inner.prekeys()
    }
    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
        self.write()?;
        self.inner.set_prekeys(state)
    }
    fn session(&self, peer: &DeviceAddress) -> Result<Option<SessionRecord>, StoreError> {
        self.alive()?;
        match self.corrupted(peer) {
            Some(e) => Err(e),
            None => self.inner.session(peer),
        }
    }
    fn sessions(
        &self,
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        self.alive()?;
        Ok(self
            .inner
            .sessions()?
            .into_iter()
            .map(|(a, r)| match self.corrupted(&a) {
                Some(e) => (a, Err(e)),
                None => (a, r),
            })
            .collect())
    }
    fn set_session(
        &mut self,
        peer: &DeviceAddress,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.write()?;
        self.heal(peer);
        self.note(peer, record);
        self.inner.set_session(peer, record)
    }
    fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError> {
        self.write()?;
        self.heal(peer);
        self.inner.remove_session(peer)
    }
    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.write()?;
        self.heal(peer);
        self.inner.quarantine_session(peer, now, reason)
    }
    fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.alive()?;
        self.inner.quarantined()
    }
    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError> {
        self.alive()?;
        self.inner.peer(device)
    }
    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        self.write()?;
        self.inner.set_peer(peer)
    }
    fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, StoreError> {
        self.alive()?;
        self.inner.contact(name)
    }
    fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError> {
        self.write()?;
        self.inner.set_contact(contact)
    }
    fn contacts(&self) -> Result<Vec<ContactRecord>, StoreError> {
        self.alive()?;
        self.inner.contacts()
    }
    fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        self.alive()?;
        self.inner.peers()
    }
    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        self.write()?;
        self.heal(&entry.to);
        self.note(&entry.to, record);
        self.inner.commit_send(record, entry, sent)
    }
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.alive()?;
        self.inner.outbox()
    }
    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.write()?;
        self.inner.remove_outbox(id)
    }
    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        self.alive()?;
        self.inner.is_processed(id)
    }
    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError> {
        self.write()?;
        for c in batch {
            if let Some((peer, record)) = c.session {
                self.heal(peer);
                self.note(peer, record);
            }
        }
        self.inner.commit_receive(batch)
    }
    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError> {
        self.write()?;
        self.inner.prune_processed(before)
    }
    fn sent_messages(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.alive()?;
        self.inner.sent_messages()
    }
    fn pending_sent(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.alive()?;
        self.inner.pending_sent()
    }
    fn last_pending_to(&self, to: &DeviceAddress) -> Result<Option<MessageId>, StoreError> {
        self.alive()?;
        self.inner.last_pending_to(to)
    }
    fn sent_message(&self, id: &MessageId) -> Result<Option<SentMessage>, StoreError> {
        self.alive()?;
        self.inner.sent_message(id)
    }
    fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError> {
        self.write()?;
        self.inner.update_sent(message)
    }
    fn prune_sent(&mut self, before: u64) -> Result<(), StoreError> {
        self.write()?;
        self.inner.prune_sent(before)
    }
    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError> {
        self.alive()?;
        self.inner.inbox()
    }
    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.write()?;
        self.inner.remove_inbox(id)
    }
}

// ---------------------------------------------------------------- relay

/// What the relay does to deposits while faults are on.
struct NetState {
    rng: ChaCha20Rng,
    faulty: bool,
    /// Deposits held back, released later in random order.
    delayed: Vec<(MailboxId, Envelope, DepositPass)>,
    /// Everything ever deposited by a device (for replays).
    log: Vec<(MailboxId, Envelope)>,
    /// Per (ratchet key, counter): the payload first seen with it.
    keys_used: HashMap<([u8; 32], u32), Vec<u8>>,
    key_reuse: usize,
    stats: Stats,
}

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    dropped: usize,
    duplicated: usize,
    delayed: usize,
    replayed: usize,
    reordered: usize,
    drained: usize,
    restores: usize,
    lost_prekeys: usize,
    corrupted: usize,
    crashes: usize,
    simultaneous: usize,
    compromised_sends: usize,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.dropped += o.dropped;
        self.duplicated += o.duplicated;
        self.delayed += o.delayed;
        self.replayed += o.replayed;
        self.reordered += o.reordered;
        self.drained += o.drained;
        self.restores += o.restores;
        self.lost_prekeys += o.lost_prekeys;
        self.corrupted += o.corrupted;
        self.crashes += o.crashes;
        self.simultaneous += o.simultaneous;
        self.compromised_sends += o.compromised_sends;
    }
}

#[derive(Clone)]
struct Net {
    relay: InProcessRelay<MemoryRelayStorage>,
    state: Arc<Mutex<NetState>>,
}

fn fresh_id(rng: &mut ChaCha20Rng) -> EnvelopeId {
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    EnvelopeId(id)
}

impl Net {
    fn put(&self, to: &MailboxId, envelope: &Envelope, pass: &DepositPass) {
        // Errors (a full mailbox) are the relay's business; the envelope is
        // then simply not there, like a drop.
        let _ = block_on(self.relay.deposit(to, envelope, pass));
    }

    /// Releases some delayed envelopes and replays some old ones.
    fn churn(&self) {
        let mut out = Vec::new();
        {
            let mut s = self.state.lock().unwrap();
            let n = s.delayed.len();
            for i in (0..n).rev() {
                if s.rng.next_u32() % 3 == 0 {
                    out.push(s.delayed.swap_remove(i));
                }
            }
            if s.faulty && !s.log.is_empty() && s.rng.next_u32() % 4 == 0 {
                let i = s.rng.next_u32() as usize % s.log.len();
                let (to, mut envelope) = s.log[i].clone();
                envelope.id = fresh_id(&mut s.rng);
                s.stats.replayed += 1;
                out.push((to, envelope, DepositPass::NONE));
            }
        }
        for (to, envelope, pass) in out {
            self.put(&to, &envelope, &pass);
        }
    }

    /// The faults stop: everything held back is delivered.
    fn calm(&self) {
        let held = {
            let mut s = self.state.lock().unwrap();
            s.faulty = false;
            std::mem::take(&mut s.delayed)
        };
        for (to, envelope, pass) in held {
            self.put(&to, &envelope, &pass);
        }
    }
}

impl PrekeyDirectory for Net {
    fn publish(&self, upload: &[u8]) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.relay.publish(upload)
    }
    fn fetch_bundle(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send {
        self.relay.fetch_bundle(device)
    }
    fn one_time_prekeys_left(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<u32, TransportError>> + Send {
        self.relay.one_time_prekeys_left(device)
    }
}

impl Mailbox for Net {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let mut copies = Vec::new();
        {
            let mut s = self.state.lock().unwrap();
            // Key reuse: the same (ratchet key, counter) under two payloads.
            if let Ok(incoming) = Incoming::decode(&envelope.payload) {
                let h = incoming.header();
                let key = (h.ratchet_key, h.n);
                match s.keys_used.get(&key) {
                    Some(p) if p != &envelope.payload => s.key_reuse += 1,
                    Some(_) => {}
                    None => {
                        s.keys_used.insert(key, envelope.payload.clone());
                    }
                }
            }
            s.log.push((*to, envelope.clone()));
            let roll = if s.faulty { s.rng.next_u32() % 100 } else { 99 };
            match roll {
                0..=9 => s.stats.dropped += 1,
                10..=19 => {
                    s.stats.delayed += 1;
                    s.delayed.push((*to, envelope.clone(), pass.clone()));
                }
                20..=24 => {
                    s.stats.duplicated += 1;
                    let mut again = envelope.clone();
                    again.id = fresh_id(&mut s.rng);
                    copies.push(envelope.clone());
                    copies.push(again);
                }
                _ => copies.push(envelope.clone()),
            }
        }
        for copy in copies {
            self.put(to, &copy, pass);
        }
        std::future::ready(Ok(()))
    }
    fn challenge(
        &self,
        mailbox: &MailboxId,
    ) -> impl Future<Output = Result<[u8; 32], TransportError>> + Send {
        self.relay.challenge(mailbox)
    }
    fn fetch(
        &self,
        auth: &MailboxAuth,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + Send {
        let got = block_on(self.relay.fetch(auth, limit));
        let mut s = self.state.lock().unwrap();
        let got = got.map(|mut got| {
            if s.faulty && got.len() > 1 && s.rng.next_u32() % 3 == 0 {
                s.stats.reordered += 1;
                got.reverse();
                let i = s.rng.next_u32() as usize % got.len();
                got.rotate_left(i);
            }
            got
        });
        std::future::ready(got)
    }
    fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.relay.acknowledge(auth, ids)
    }
}

// ---------------------------------------------------------------- devices

type Dev = Client<ChaosStore, Net, Net>;

/// What the application behind a device knows: restored with its store.
#[derive(Clone, Default)]
struct App {
    /// Message numbers shown, and the envelopes they came in.
    shown: HashSet<u64>,
    envelopes: HashSet<EnvelopeId>,
    /// Message numbers handed to `send`, with their recipient and id.
    sent: Vec<(u64, DeviceAddress, MessageId)>,
}

struct Device {
    client: Option<Dev>,
    address: DeviceAddress,
    faults: Arc<Mutex<StoreFaults>>,
    accepted: Arc<Mutex<Accepted>>,
    app: App,
    backup: Option<(MemoryStore, App)>,
}

struct World {
    rng: ChaCha20Rng,
    clock: Arc<Mutex<u64>>,
    net: Net,
    config: ClientConfig,
    devices: Vec<Device>,
    next_message: u64,
    /// Every message number ever sent: (from, to).
    ever_sent: HashMap<u64, (DeviceAddress, DeviceAddress)>,
    /// (recipient, number) ever shown.
    ever_shown: HashSet<(DeviceAddress, u64)>,
    violations: Vec<String>,
    stats: Stats,
    /// `CHAOS_VERBOSE=1`: print every step (to replay one seed).
    verbose: bool,
    /// Messages re-sent and sessions started since this was reset.
    busy: usize,
    /// Mallory: one identity key under two device numbers, marked
    /// compromised by Alice and Bob from the start (trust per key).
    mallory: Vec<Client<MemoryStore, Net, Net>>,
    /// Message numbers Mallory sent: none may ever be shown.
    forbidden: HashSet<u64>,
}

impl World {
    fn new(seed: u64) -> Self {
        let clock = Arc::new(Mutex::new(T0));
        let c = clock.clone();
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
            Arc::new(move || *c.lock().unwrap()),
        );
        let net = Net {
            relay,
            state: Arc::new(Mutex::new(NetState {
                rng: ChaCha20Rng::seed_from_u64(seed ^ 0x5eed),
                faulty: true,
                delayed: Vec::new(),
                log: Vec::new(),
                keys_used: HashMap::new(),
                key_reuse: 0,
                stats: Stats::default(),
            })),
        };
        let config = ClientConfig {
            resend_after: HOUR,
            resend_max_interval: 4 * HOUR,
            one_time_prekeys: 5,
            refill_below: 2,
            notice_interval: HOUR,
            ..ClientConfig::default()
        };
        World {
            rng: ChaCha20Rng::seed_from_u64(seed),
            clock,
            net,
            config,
            devices: Vec::new(),
            next_message: 0,
            ever_sent: HashMap::new(),
            ever_shown: HashSet::new(),
            violations: Vec::new(),
            stats: Stats::default(),
            verbose: std::env::var_os("CHAOS_VERBOSE").is_some(),
            busy: 0,
            mallory: Vec::new(),
            forbidden: HashSet::new(),
        }
    }

    fn now(&self) -> u64 {
        *self.clock.lock().unwrap()
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!("[{}] {}", self.now() - T0, what());
        }
    }

    fn advance(&mut self, seconds: u64) {
        *self.clock.lock().unwrap() += seconds;
    }

    fn open(
        &mut self,
        store: MemoryStore,
        faults: Arc<Mutex<StoreFaults>>,
        accepted: Arc<Mutex<Accepted>>,
    ) -> Dev {
        let store = ChaosStore {
            inner: store,
            faults,
            accepted,
        };
        Client::open(
            store,
            self.net.clone(),
            self.net.clone(),
            self.config,
            &mut self.rng,
        )
        .wait()
        .expect("open")
    }

    fn add_device(&mut self) -> usize {
        let faults = Arc::new(Mutex::new(StoreFaults::default()));
        let accepted = Arc::new(Mutex::new(Accepted::default()));
        let mut client = self.open(MemoryStore::new(), faults.clone(), accepted.clone());
        let now = self.now();
        block_on(client.maintain_prekeys(&mut self.rng, now)).expect("first publish");
        self.devices.push(Device {
            address: client.address(),
            client: Some(client),
            faults,
            accepted,
            app: App::default(),
            backup: None,
        });
        self.devices.len() - 1
    }

    /// Runs one client call on device `i`; a killed process is restarted
    /// (a new client over what its store committed).
    fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut Dev, &mut ChaCha20Rng, u64) -> R) -> R {
        let now = self.now();
        let mut client = self.devices[i].client.take().expect("client");
        let r = f(&mut client, &mut self.rng, now);
        let dead = self.devices[i].faults.lock().unwrap().dead;
        if dead {
            let store = client.into_store().inner;
            let faults = self.devices[i].faults.clone();
            faults.lock().unwrap().dead = false;
            let accepted = self.devices[i].accepted.clone();
            client = self.open(store, faults, accepted);
        }
        self.devices[i].client = Some(client);
        r
    }

    fn send(&mut self, from: usize, to: usize) {
        let n = self.next_message;
        self.next_message += 1;
        let to_addr = self.devices[to].address;
        let from_addr = self.devices[from].address;
        // Registered before the call: a message handed over may be shown
        // even if the call then reports an error.
        self.ever_sent.insert(n, (from_addr, to_addr));
        let r = self.with(from, |c, rng, now| {
            block_on(c.send(rng, &to_addr, &n.to_be_bytes(), now))
        });
        self.log(|| format!("{from} sends #{n} to {to}: {r:?}"));
        match r {
            Ok(sent) => {
                self.devices[from].app.sent.push((n, to_addr, sent.message));
            }
            // Not handed over: a crash before the commit, or the bundle
            // could not be fetched (a drained directory, a corrupt row).
            Err(ClientError::Store(_) | ClientError::Transport(_)) => {}
            Err(e) => self.violations.push(format!("send failed: {e}")),
        }
    }

    fn receive(&mut self, i: usize) {
        let r = self.with(i, |c, rng, now| block_on(c.receive(rng, now)));
        self.log(|| format!("{i} receives: {r:?}"));
        if let Ok(r) = &r {
            self.busy += r.resend.resent + r.resend.new_sessions + r.notices.len();
        }
        if let Err(e) = &r {
            if !matches!(e, ClientError::Store(StoreError::Backend(_))) {
                self.violations.push(format!("receive failed: {e}"));
            }
        }
        self.take_inbox(i);
    }

    /// The application shows what is in the inbox, then removes it.
    /// Mallory's two devices; Alice and Bob (devices 0 and 1) mark her key
    /// compromised (under her first device number only: the mark must
    /// cover the other).
    fn add_mallory(&mut self) {
        let now = self.now();
        let mut first = Client::open(
            MemoryStore::new(),
            self.net.clone(),
            self.net.clone(),
            self.config,
            &mut self.rng,
        )
        .wait()
        .expect("mallory");
        let identity = first.store().identity().unwrap().expect("identity");
        let mut store = MemoryStore::new();
        store
            .set_identity(&LocalIdentity {
                keys: identity.keys.clone(),
                device_id: identity.device_id + 1,
            })
            .unwrap();
        let mut second = Client::open(
            store,
            self.net.clone(),
            self.net.clone(),
            self.config,
            &mut self.rng,
        )
        .wait()
        .expect("mallory's second device");
        for m in [&mut first, &mut second] {
            block_on(m.maintain_prekeys(&mut self.rng, now)).expect("publish");
        }
        let marked = first.address();
        for i in [0, 1] {
            let _ = self.with(i, |c, _, now| {
                block_on(c.set_trust(&marked, Trust::Compromised, now))
            });
        }
        self.mallory = vec![first, second];
    }

    /// One of Mallory's devices writes to Alice or Bob.
    fn mallory_sends(&mut self) {
        let n = self.next_message;
        self.next_message += 1;
        self.forbidden.insert(n);
        self.stats.compromised_sends += 1;
        let k = self.rng.next_u32() as usize % 2;
        let to = self.devices[self.rng.next_u32() as usize % 2].address;
        let now = self.now();
        let _ = block_on(self.mallory[k].send(&mut self.rng, &to, &n.to_be_bytes(), now));
    }

    fn take_inbox(&mut self, i: usize) {
        let Ok(inbox) = block_on(self.devices[i].client.as_ref().unwrap().inbox()) else {
            return;
        };
        let me = self.devices[i].address;
        for m in inbox {
            let d = &mut self.devices[i];
            if d.app.envelopes.insert(m.envelope_id) {
                let n = u64::from_be_bytes(m.body[..8].try_into().expect("8 bytes"));
                if self.forbidden.contains(&n) {
                    self.violations
                        .push(format!("shown from a compromised key: {n}"));
                    continue;
                }
                match self.ever_sent.get(&n) {
                    Some((from, to)) if *from == m.from && *to == me => {}
                    _ => self
                        .violations
                        .push(format!("shown but never sent: {n} from {:?}", m.from)),
                }
                if !d.app.shown.insert(n) {
                    self.violations.push(format!("shown twice: {n}"));
                }
                self.ever_shown.insert((me, n));
            }
            let _ = self.with(i, |c, _, _| block_on(c.remove_from_inbox(&m.envelope_id)));
        }
    }

    fn chores(&mut self, i: usize) {
        let _ = self.with(i, |c, _, _| block_on(c.flush_outbox()));
        let r = self.with(i, |c, rng, now| block_on(c.resend(rng, now)));
        self.log(|| format!("{i} resends: {r:?}"));
        if let Ok(r) = &r {
            self.busy += r.resent + r.new_sessions;
        }
        let _ = self.with(i, |c, rng, now| block_on(c.maintain_prekeys(rng, now)));
    }

    fn backup(&mut self, i: usize) {
        self.log(|| format!("{i}: backup"));
        let copy = self.devices[i]
            .client
            .as_ref()
            .unwrap()
            .store()
            .inner
            .clone();
        self.devices[i].backup = Some((copy, self.devices[i].app.clone()));
    }

    fn restore(&mut self, i: usize) {
        self.log(|| format!("{i}: restore"));
        let Some((store, app)) = self.devices[i].backup.clone() else {
            return;
        };
        self.stats.restores += 1;
        let faults = Arc::new(Mutex::new(StoreFaults::default()));
        let accepted = self.devices[i].accepted.clone();
        let client = self.open(store, faults.clone(), accepted);
        self.devices[i].client = Some(client);
        self.devices[i].faults = faults;
        self.devices[i].app = app;
        let r = self.with(i, |c, rng, now| block_on(c.restored_from_backup(rng, now)));
        if let Err(ClientError::Transport(_)) | Ok(()) = r {
        } else {
            // Killed midway: call it again (it is idempotent).
            let _ = self.with(i, |c, rng, now| block_on(c.restored_from_backup(rng, now)));
        }
    }

    fn lose_prekeys(&mut self, i: usize) {
        self.log(|| format!("{i}: lose_prekeys"));
        self.stats.lost_prekeys += 1;
        let _ = self.with(i, |c, rng, now| {
            let identity = c.store().identity()?.expect("identity");
            let old = c.store().prekeys()?.expect("prekeys");
            let fresh = PrekeyState {
                prekeys: PrekeyStore::new(rng, &identity.keys, now).expect("time in unix seconds"),
                upload_counter: old.upload_counter,
                last_rotation: now,
                retired_at: Vec::new(),
                one_time_retired: Vec::new(),
                upload_pending: true,
                accepted: Vec::new(),
            };
            c.store_mut().set_prekeys(&fresh)
        });
    }

    fn corrupt(&mut self, i: usize) {
        self.log(|| format!("{i}: corrupt"));
        let peers: Vec<DeviceAddress> = self.devices[i]
            .client
            .as_ref()
            .unwrap()
            .store()
            .inner
            .sessions()
            .unwrap()
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        if peers.is_empty() {
            return;
        }
        let p = peers[self.rng.next_u32() as usize % peers.len()];
        self.stats.corrupted += 1;
        self.devices[i].faults.lock().unwrap().corrupt.insert(p);
    }

    fn drain(&mut self, i: usize) {
        self.log(|| format!("{i}: drain"));
        let address = self.devices[i].address;
        for _ in 0..8 {
            if block_on(self.net.relay.fetch_bundle(&address)).is_err() {
                break;
            }
        }
        self.stats.drained += 1;
    }

    fn crash_soon(&mut self, i: usize) {
        self.log(|| format!("{i}: crash_soon"));
        let n = self.rng.next_u32() % 6;
        self.devices[i].faults.lock().unwrap().crash_in = Some(n);
        self.stats.crashes += 1;
    }

    fn pick_peer(&mut self, from: usize) -> usize {
        let n = self.devices.len();
        let k = 1 + self.rng.next_u32() as usize % (n - 1);
        (from + k) % n
    }

    /// Messages some application still waits for: (sender, number).
    fn undelivered(&self) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (i, d) in self.devices.iter().enumerate() {
            let client = d.client.as_ref().unwrap();
            for (n, to, id) in &d.app.sent {
                if self.ever_shown.contains(&(*to, *n)) {
                    continue;
                }
                match block_on(client.delivery(id)) {
                    Ok(Some(DeliveryState::Failed(_))) => {}
                    _ => out.push((i, *n)),
                }
            }
        }
        out
    }
}

/// One schedule's outcome.
struct Outcome {
    seed: u64,
    /// Messages `send` accepted (in the applications' final histories).
    handed: usize,
    /// Of those, reported failed to their sender.
    failed: usize,
    /// Messages `send` was called with.
    sent: usize,
    shown: usize,
    recovery_rounds: usize,
    stats: Stats,
}

const FAULT_STEPS: usize = 60;
const MAX_RECOVERY_ROUNDS: usize = 12;

fn run(seed: u64) -> Result<Outcome, String> {
    let mut w = World::new(seed);
    let a = w.add_device();
    let b = w.add_device();
    w.add_mallory();
    // Simultaneous first messages, in half the schedules.
    if w.rng.next_u32() % 2 == 0 {
        w.send(a, b);
        w.send(b, a);
        w.stats.simultaneous += 1;
    }
    let carol_at = 10 + w.rng.next_u32() as usize % 30;
    for step in 0..FAULT_STEPS {
        if step == carol_at {
            w.add_device();
        }
        let i = w.rng.next_u32() as usize % w.devices.len();
        match w.rng.next_u32() % 100 {
            0..=29 => {
                let to = w.pick_peer(i);
                w.send(i, to);
            }
            30..=59 => w.receive(i),
            60..=69 => w.chores(i),
            70..=77 => {
                let dt = u64::from(w.rng.next_u32()) % (2 * HOUR);
                w.advance(dt);
            }
            78..=81 => w.crash_soon(i),
            82..=84 => w.backup(i),
            85..=86 => w.restore(i),
            87..=88 => w.lose_prekeys(i),
            89..=91 => w.corrupt(i),
            92..=94 => w.drain(i),
            95..=96 => w.mallory_sends(),
            _ => {}
        }
        w.net.churn();
    }
    // The faults stop. Recovery: rounds in which every device runs its
    // chores and receives, an hour apart.
    w.net.calm();
    for d in &w.devices {
        let mut f = d.faults.lock().unwrap();
        f.crash_in = None;
        f.corrupt.clear();
    }
    // Every device writes once more to every other: a session that one
    // side lost without knowing it (restored from a backup older than the
    // session) is found out by traffic, like any dead session.
    let n = w.devices.len();
    for i in 0..n {
        for j in 0..n {
            if i != j {
                w.send(i, j);
            }
        }
    }
    let mut rounds = 0;
    loop {
        for i in 0..n {
            w.chores(i);
            w.receive(i);
        }
        if w.undelivered().is_empty() {
            break;
        }
        if rounds == MAX_RECOVERY_ROUNDS {
            return Err(format!(
                "seed {seed}: after {rounds} rounds still undelivered: {:?}",
                w.undelivered()
            ));
        }
        rounds += 1;
        w.advance(HOUR);
    }
    // Everything settles (receipts in flight, late re-sends): nothing more
    // may be shown twice, and each pair encrypts under the same session
    // (the record rule converged).
    // Rounds go on until one passes in which nobody re-sent anything or
    // started a session (a receipt lost on a session its receiver had
    // lost makes the sender try again, once more).
    let mut quiet = false;
    for _ in 0..MAX_RECOVERY_ROUNDS {
        w.advance(4 * HOUR);
        w.busy = 0;
        for i in 0..n {
            w.chores(i);
            w.receive(i);
        }
        if w.busy == 0 {
            quiet = true;
            break;
        }
        rounds += 1;
    }
    if !quiet {
        w.violations.push("never quiet".into());
    }
    for i in 0..n {
        for j in i + 1..n {
            let (x, y) = (&w.devices[i], &w.devices[j]);
            let cx = x.client.as_ref().unwrap().store();
            let cy = y.client.as_ref().unwrap().store();
            let ix = cx.session(&y.address).ok().flatten();
            let iy = cy.session(&x.address).ok().flatten();
            let ix = ix.and_then(|r| r.current(&x.address, &y.address).map(|e| e.id));
            let iy = iy.and_then(|r| r.current(&y.address, &x.address).map(|e| e.id));
            if ix != iy {
                w.violations.push(format!(
                    "devices {i} and {j} did not converge: {ix:?} / {iy:?}"
                ));
            }
        }
    }
    if w.verbose {
        for x in &w.devices {
            for y in &w.devices {
                if let Ok(Some(r)) = x.client.as_ref().unwrap().store().session(&y.address) {
                    let cur = r.current(&x.address, &y.address).map(|e| e.id);
                    eprintln!(
                        "{:?}->{:?} current {cur:?}",
                        &x.address.identity[..2],
                        &y.address.identity[..2]
                    );
                    for e in r.entries() {
                        eprintln!("    {e:?} prekey={}", e.session.sends_prekey_messages());
                    }
                }
            }
        }
    }
    for d in &w.devices {
        let twice = d.accepted.lock().unwrap().twice;
        if twice > 0 {
            w.violations
                .push(format!("{twice} first messages accepted twice"));
        }
    }
    // Every sender was told: delivered (a receipt came) or failed.
    let mut handed = 0;
    let mut failed = 0;
    for d in &w.devices {
        let client = d.client.as_ref().unwrap();
        for (n, to, id) in &d.app.sent {
            handed += 1;
            match block_on(client.delivery(id)) {
                Ok(Some(DeliveryState::Delivered)) => {}
                Ok(Some(DeliveryState::Failed(_))) => failed += 1,
                other => w
                    .violations
                    .push(format!("message {n} to {to:?}: sender sees {other:?}")),
            }
        }
    }
    let net = w.net.state.lock().unwrap();
    if net.key_reuse > 0 {
        w.violations
            .push(format!("{} message keys used twice", net.key_reuse));
    }
    if !w.violations.is_empty() {
        return Err(format!("seed {seed}: {:?}", w.violations));
    }
    let mut stats = w.stats;
    stats.add(&net.stats);
    Ok(Outcome {
        seed,
        handed,
        failed,
        sent: w.ever_sent.len(),
        shown: w.ever_shown.len(),
        recovery_rounds: rounds,
        stats,
    })
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn conversations_survive_chaos() {
    let schedules = env("CHAOS_SCHEDULES", 1000);
    let first = env("CHAOS_SEED", 0);
    let threads = 2;
    let results: Vec<Result<Outcome, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (first..first + schedules)
                        .filter(|seed| seed % threads == t)
                        .map(run)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut failures = Vec::new();
    let mut total = Stats::default();
    let (mut sent, mut shown, mut handed, mut failed) = (0, 0, 0, 0);
    let mut rounds = Vec::new();
    for r in results {
        match r {
            Ok(o) => {
                sent += o.sent;
                shown += o.shown;
                handed += o.handed;
                failed += o.failed;
                rounds.push((o.recovery_rounds, o.seed));
                total.add(&o.stats);
            }
            Err(e) => failures.push(e),
        }
    }
    rounds.sort_unstable();
    eprintln!(
        "chaos: {schedules} schedules, {} failed; {sent} sends, {handed} accepted \
         ({failed} reported failed), {shown} shown once, none twice; \
         recovery rounds median {} max {} (seed {}); faults {total:?}",
        failures.len(),
        rounds.get(rounds.len() / 2).map_or(0, |r| r.0),
        rounds.last().map_or(0, |r| r.0),
        rounds.last().map_or(0, |r| r.1),
    );
    assert!(
        failures.is_empty(),
        "{} schedules failed, first: {}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}
