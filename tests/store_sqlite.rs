#![cfg(feature = "sqlite")]
//! The SQLite store: round trips against the in-memory reference, reopening
//! from disk, the key check, encryption at rest (corrupted and moved rows),
//! atomic batches, session records (legacy rows, per-row errors, the
//! quarantine), sent messages, peers, schema versions and migrations, and
//! concurrent writers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use cubbyhole::storage::{
    BlockingStore, DeliveryState, Failure, InboxMessage, LocalIdentity, MemoryStore, MessageId,
    OutboxEntry, PeerRecord, PrekeyState, ReceiveCommit, SentMessage, SessionEntry, SessionRecord,
    SqliteStore, StoreError, Trust,
};
use cubbyhole::transport::{DeviceAddress, Envelope, EnvelopeId};
use cubbyhole::{
    FreshnessPolicy, IdentityKeyPair, PrekeyBundle, PrekeyStore, Session, SessionConfig,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const NOW: u64 = 1_800_000_000;
const KEY: [u8; 32] = [0x5a; 32];

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cubbyhole-store-sqlite-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn db(&self) -> PathBuf {
        self.0.join("store.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn raw(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    c
}

/// The store's at-rest format, written independently of it (see
/// `SqliteStore`'s docs): AES-256-GCM under `HKDF-SHA256(key, info)`, the
/// value `nonce || ciphertext || tag`, the associated data
/// `"cubbyhole/v1 sqlite\0" || table || 0 || row`. The tests use it to
/// write rows as older code did (legacy sessions, a version 1 database) and
/// to read quarantined bytes.
mod at_rest {
    use super::*;
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::{Aes256Gcm, Nonce};

    fn cipher(key: &[u8; 32]) -> Aes256Gcm {
        let mut derived = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, key)
            .expand(b"cubbyhole/v1 sqlite store at-rest key", &mut derived)
            .unwrap();
        Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(&derived))
    }

    fn aad(table: &str, row: &[u8]) -> Vec<u8> {
        [b"cubbyhole/v1 sqlite\0", table.as_bytes(), &[0], row].concat()
    }

    pub fn seal(key: &[u8; 32], table: &str, row: &[u8], plaintext: &[u8]) -> Vec<u8> {
        static COUNTER: AtomicU64 = AtomicU64::new(1);
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        let aad = aad(table, row);
        let sealed = cipher(key)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .unwrap();
        [&nonce[..], &sealed].concat()
    }

    pub fn open(key: &[u8; 32], table: &str, row: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, body) = sealed.split_at_checked(12)?;
        let aad = aad(table, row);
        cipher(key)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .ok()
    }

    /// The row key of a session or peer.
    pub fn address(a: &DeviceAddress) -> Vec<u8> {
        [&a.identity[..], &a.device_id.to_be_bytes()].concat()
    }
}

/// Real protocol objects: our identity and prekeys, and sessions with three
/// peer devices (two sessions with each: `extra` is a second one).
struct World {
    rng: ChaCha20Rng,
    me: LocalIdentity,
    prekeys: PrekeyState,
    peers: Vec<(DeviceAddress, Session)>,
    extra: Vec<Session>,
}

fn world(seed: u64) -> World {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let me = IdentityKeyPair::generate(&mut rng);
    let mut my_prekeys = PrekeyStore::new(&mut rng, &me, NOW).expect("time in unix seconds");
    my_prekeys.generate_one_time_prekeys(&mut rng, 5);
    let prekeys = PrekeyState {
        prekeys: my_prekeys,
        upload_counter: 3,
        last_rotation: NOW - 100,
        retired_at: vec![(7, NOW - 50)],
        one_time_retired: vec![(3, NOW - 40)],
        upload_pending: true,
        accepted: vec![(1, [0xac; 16]), (2, [0xad; 16])],
    };
    let mut peers = Vec::new();
    let mut extra = Vec::new();
    for device_id in 1..=3 {
        let them = IdentityKeyPair::generate(&mut rng);
        let mut theirs = PrekeyStore::new(&mut rng, &them, NOW).expect("time in unix seconds");
        theirs.generate_one_time_prekeys(&mut rng, 1);
        let bundle = PrekeyBundle::decode(&theirs.bundle(&them).encode())
            .unwrap()
            .verify(NOW, FreshnessPolicy::default())
            .unwrap();
        let mut s = Session::initiate(&mut rng, &me, &bundle, SessionConfig::default()).unwrap();
        s.encrypt(&mut rng, b"hello").unwrap();
        peers.push((DeviceAddress::new(them.public(), device_id), s));
        let mut x = Session::initiate(&mut rng, &me, &bundle, SessionConfig::default()).unwrap();
        x.encrypt(&mut rng, b"again").unwrap();
        extra.push(x);
    }
    World {
        rng,
        me: LocalIdentity {
            keys: me,
            device_id: 9,
        },
        prekeys,
        peers,
        extra,
    }
}

impl World {
    fn id(&mut self) -> EnvelopeId {
        let mut id = [0u8; 16];
        self.rng.fill_bytes(&mut id);
        EnvelopeId(id)
    }
    fn message_id(&mut self) -> MessageId {
        let mut id = [0u8; 16];
        self.rng.fill_bytes(&mut id);
        MessageId(id)
    }
    /// The session with peer `i`, advanced by one message.
    fn advance(&mut self, i: usize) -> Session {
        let mut s = self.peers[i].1.clone();
        s.encrypt(&mut self.rng, b"more").unwrap();
        self.peers[i].1 = s.clone();
        s
    }
    /// A record of the session with peer `i`, advanced by one message.
    fn record(&mut self, i: usize) -> SessionRecord {
        single(&self.advance(i))
    }
    /// A record of both sessions with peer `i` (the extra one archived
    /// beside the current one).
    fn two_sessions(&self, i: usize) -> SessionRecord {
        let (a, s) = &self.peers[i];
        let local = DeviceAddress::new(self.me.keys.public(), self.me.device_id);
        let mut r = SessionRecord::single(SessionEntry::new(self.extra[i].clone(), 4, NOW - 9));
        r.insert(SessionEntry::new(s.clone(), 5, NOW), 40, &local, a);
        r.supersede(&self.extra[i].id());
        r.entries_mut()[0].last_received = NOW - 1;
        assert_eq!(r.entries().len(), 2);
        r
    }
}

/// A record of one session (generation 1, created at NOW).
fn single(s: &Session) -> SessionRecord {
    SessionRecord::single(SessionEntry::new(s.clone(), 1, NOW))
}

fn bytes(r: &SessionRecord) -> Vec<u8> {
    r.to_bytes().to_vec()
}

fn message(id: EnvelopeId, from: DeviceAddress, body: &[u8], at: u64) -> InboxMessage {
    InboxMessage {
        envelope_id: id,
        from,
        body: body.to_vec(),
        received_at: at,
    }
}

fn sent(
    id: MessageId,
    to: DeviceAddress,
    body: &[u8],
    state: DeliveryState,
    created: u64,
) -> SentMessage {
    SentMessage {
        id,
        to,
        body: body.to_vec(),
        state,
        created,
        last_sent: created,
        sends: 1,
    }
}

/// A receive commit that changes nothing but the processed mark.
fn mark(envelope_id: EnvelopeId, processed_at: u64) -> ReceiveCommit<'static> {
    ReceiveCommit {
        envelope_id,
        processed_at,
        session: None,
        prekeys: None,
        peer: None,
        message: None,
        sent: None,
        access: None,
    }
}

fn outbox_entry(to: DeviceAddress, id: EnvelopeId, payload: Vec<u8>) -> OutboxEntry {
    OutboxEntry {
        to,
        envelope: Envelope { id, payload },
        created: NOW,
        message: Some(MessageId([id.0[0]; 16])),
    }
}

/// Everything observable through the trait, in comparable form (a
/// quarantined record's bytes are not compared: a sealing store keeps them
/// sealed).
#[derive(Debug, PartialEq)]
struct Snapshot {
    identity: Option<([u8; 32], u32)>,
    prekeys: Option<Vec<u8>>,
    sessions: Vec<(DeviceAddress, Vec<u8>)>,
    quarantined: Vec<(DeviceAddress, u64, String)>,
    peer: Vec<Option<PeerRecord>>,
    peers: Vec<PeerRecord>,
    peers_with_identity: Vec<Vec<PeerRecord>>,
    outbox: Vec<OutboxEntry>,
    processed: Vec<bool>,
    inbox: Vec<InboxMessage>,
    sent: Vec<SentMessage>,
    sent_by_id: Vec<Option<SentMessage>>,
}

/// What [`exercise`] used, to snapshot with.
struct Keys {
    addresses: Vec<DeviceAddress>,
    ids: Vec<EnvelopeId>,
    message_ids: Vec<MessageId>,
}

fn snapshot(store: &impl BlockingStore, k: &Keys) -> Snapshot {
    let sessions: Vec<_> = store
        .sessions()
        .unwrap()
        .into_iter()
        .map(|(a, r)| (a, bytes(&r.unwrap())))
        .collect();
    for (a, r) in &sessions {
        assert_eq!(&bytes(&store.session(a).unwrap().unwrap()), r);
    }
    Snapshot {
        identity: store
            .identity()
            .unwrap()
            .map(|i| (*i.keys.seed(), i.device_id)),
        prekeys: store.prekeys().unwrap().map(|p| p.to_bytes().to_vec()),
        sessions,
        quarantined: store
            .quarantined()
            .unwrap()
            .into_iter()
            .map(|q| (q.peer, q.at, q.reason))
            .collect(),
        peer: k.addresses.iter().map(|a| store.peer(a).unwrap()).collect(),
        peers: store.peers().unwrap(),
        peers_with_identity: k
            .addresses
            .iter()
            .map(|a| store.peers_with_identity(&a.identity).unwrap())
            .collect(),
        outbox: store.outbox().unwrap(),
        processed: k
            .ids
            .iter()
            .map(|i| store.is_processed(i).unwrap())
            .collect(),
        inbox: store.inbox().unwrap(),
        sent: store.sent_messages().unwrap(),
        sent_by_id: k
            .message_ids
            .iter()
            .map(|i| store.sent_message(i).unwrap())
            .collect(),
    }
}

/// Drives a store through every method; returns what to snapshot with.
fn exercise(store: &mut impl BlockingStore, w: &mut World) -> Keys {
    let ids: Vec<EnvelopeId> = (0..10).map(|_| w.id()).collect();
    let mut mids: Vec<MessageId> = (0..9).map(|_| w.message_id()).collect();
    // The smallest id, new in a receive batch after another new one: it
    // must still come after it.
    mids[7] = MessageId([0; 16]);
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    // Peer 0's second device, and a device of peer 2 whose session is
    // stored and removed.
    let other = DeviceAddress {
        identity: a[0].identity,
        device_id: 77,
    };
    let gone = DeviceAddress {
        identity: a[2].identity,
        device_id: 78,
    };
    assert!(store.identity().unwrap().is_none());
    assert!(store.prekeys().unwrap().is_none());
    assert!(store.session(&a[0]).unwrap().is_none());
    assert!(store.sessions().unwrap().is_empty());
    assert!(store.quarantined().unwrap().is_empty());
    assert!(store.peer(&a[0]).unwrap().is_none());
    assert!(store.peers().unwrap().is_empty());
    assert!(store
        .peers_with_identity(&a[0].identity)
        .unwrap()
        .is_empty());
    assert!(store.sent_messages().unwrap().is_empty());
    assert!(store.sent_message(&mids[0]).unwrap().is_none());

    store.set_identity(&w.me).unwrap();
    store.set_prekeys(&w.prekeys).unwrap();
    store
        .set_peer(&PeerRecord {
            address: a[0],
            trust: Trust::Unvalidated,
            first_seen: NOW,
        })
        .unwrap();
    store
        .set_peer(&PeerRecord {
            address: a[0],
            trust: Trust::Validated,
            first_seen: NOW,
        })
        .unwrap();
    store
        .set_peer(&PeerRecord {
            address: a[1],
            trust: Trust::Compromised,
            first_seen: u64::MAX,
        })
        .unwrap();
    store
        .set_peer(&PeerRecord {
            address: other,
            trust: Trust::Validated,
            first_seen: 1 << 63,
        })
        .unwrap();

    // Four sends: three new sent messages, one re-send of the first, and a
    // session re-committed with the same peer; the last one with a record
    // of two sessions and no sent message.
    let s0 = sent(mids[0], a[0], b"m0", DeliveryState::Stored, 0);
    let s1 = sent(mids[1], a[1], b"m1", DeliveryState::Stored, NOW + 1);
    let s0_again = SentMessage {
        state: DeliveryState::Resent,
        last_sent: NOW + 2,
        sends: 2,
        ..s0.clone()
    };
    let sends = [(0usize, Some(&s0)), (1, Some(&s1)), (0, Some(&s0_again))];
    for (n, (i, sent)) in sends.into_iter().enumerate() {
        let r = w.record(i);
        let entry = OutboxEntry {
            to: a[i],
            envelope: Envelope {
                id: ids[n],
                payload: vec![n as u8; 10 + n],
            },
            created: NOW + n as u64,
            message: sent.map(|m| m.id),
        };
        store.commit_send(&r, &entry, sent).unwrap();
    }
    let two = w.two_sessions(0);
    store
        .commit_send(&two, &outbox_entry(other, ids[8], vec![8; 3]), None)
        .unwrap();
    store.remove_outbox(&ids[1]).unwrap();
    store.remove_outbox(&w.id()).unwrap();

    // Sent messages updated and added outside a send.
    store
        .update_sent(&SentMessage {
            state: DeliveryState::Deposited,
            ..s1.clone()
        })
        .unwrap();
    let s2 = sent(mids[2], a[2], b"m2", DeliveryState::Stored, NOW + 3);
    store.update_sent(&s2).unwrap();
    // Finished ones: delivered (at a time from 2^63 on), failed, delivered.
    let s3 = sent(mids[3], a[1], b"", DeliveryState::Delivered, 1 << 63);
    let s4 = sent(
        mids[4],
        a[2],
        b"",
        DeliveryState::Failed(Failure::TimedOut),
        5,
    );
    let s6 = sent(mids[6], a[0], b"", DeliveryState::Delivered, NOW - 1);
    for m in [&s3, &s4, &s6] {
        store.update_sent(m).unwrap();
    }

    // Sessions set, quarantined (twice: the second finds nothing), set
    // again, and removed.
    let r1 = w.record(1);
    store.set_session(&a[1], &r1).unwrap();
    store
        .quarantine_session(&a[1], NOW + 20, "did not decrypt")
        .unwrap();
    store.quarantine_session(&a[1], NOW + 21, "absent").unwrap();
    assert!(store.session(&a[1]).unwrap().is_none());
    let r1 = w.record(1);
    store.set_session(&a[1], &r1).unwrap();
    let r_gone = single(&w.extra[2]);
    store.set_session(&gone, &r_gone).unwrap();
    store.remove_session(&gone).unwrap();
    store.remove_session(&gone).unwrap();
    store.quarantine_session(&other, 1 << 63, "").unwrap();
    store.set_session(&other, &two).unwrap();

    // A receive batch: two messages from peer 2, one duplicate message id,
    // a consumed one-time prekey, a new peer, a mark without a message, and
    // receipts: one for a known message, one twice for a new one (last state
    // wins, first position), one failing another.
    let s2a = w.record(2);
    let s2b = w.record(2);
    let mut prekeys2 = w.prekeys.clone();
    prekeys2.upload_counter += 1;
    prekeys2.accepted.push((3, [0xae; 16]));
    let peer2 = PeerRecord {
        address: a[2],
        trust: Trust::Unvalidated,
        first_seen: NOW + 7,
    };
    let m3 = message(ids[3], a[2], b"first", NOW + 10);
    let m4 = message(ids[4], a[2], b"", NOW + 11);
    let m4dup = message(ids[4], a[2], b"dup body ignored", NOW + 12);
    let m5 = message(ids[5], a[1], &[0xff; 3000], 1 << 63);
    let delivered1 = SentMessage {
        body: Vec::new(),
        state: DeliveryState::Delivered,
        ..s1.clone()
    };
    let s5 = sent(mids[5], a[2], b"m5", DeliveryState::Stored, NOW + 4);
    let s5_deposited = SentMessage {
        state: DeliveryState::Deposited,
        ..s5.clone()
    };
    let s7 = sent(mids[7], a[0], b"m7", DeliveryState::Stored, NOW + 5);
    let failed2 = SentMessage {
        body: Vec::new(),
        state: DeliveryState::Failed(Failure::Compromised),
        ..s2.clone()
    };
    let batch = [
        ReceiveCommit {
            envelope_id: ids[3],
            processed_at: NOW + 10,
            session: Some((&a[2], &s2a)),
            prekeys: Some(&prekeys2),
            peer: Some(&peer2),
            message: Some(&m3),
            sent: Some(&delivered1),
            access: None,
        },
        ReceiveCommit {
            envelope_id: ids[4],
            processed_at: NOW + 11,
            session: Some((&a[2], &s2b)),
            prekeys: None,
            peer: None,
            message: Some(&m4),
            sent: Some(&s5),
            access: None,
        },
        ReceiveCommit {
            envelope_id: ids[6],
            processed_at: NOW + 12,
            session: None,
            prekeys: None,
            peer: None,
            message: Some(&m4dup),
            sent: Some(&failed2),
            access: None,
        },
        ReceiveCommit {
            sent: Some(&s7),
            ..mark(ids[7], 3)
        },
        ReceiveCommit {
            envelope_id: ids[5],
            processed_at: u64::MAX,
            session: None,
            prekeys: None,
            peer: None,
            message: Some(&m5),
            sent: Some(&s5_deposited),
            access: None,
        },
    ];
    store.commit_receive(&batch).unwrap();
    store.commit_receive(&[]).unwrap();
    w.prekeys = prekeys2;

    // Prune: only the mark at time 3 is older than NOW; of the sent
    // messages, the finished ones created before NOW (s4, s6), not the
    // pending one created at 0 (s0), nor the delivered one at 2^63 (s3).
    store.prune_processed(NOW).unwrap();
    store.prune_sent(NOW).unwrap();
    store.remove_inbox(&ids[3]).unwrap();
    Keys {
        addresses: vec![a[0], a[1], a[2], other, gone],
        ids,
        message_ids: mids,
    }
}

#[test]
fn round_trips_like_the_memory_store() {
    let mut w = world(1);
    let mut memory = MemoryStore::new();
    let k = exercise(&mut memory, &mut w);
    let expected = snapshot(&memory, &k);

    let mut w = world(1);
    let mut sqlite = SqliteStore::open_in_memory(&KEY).unwrap();
    exercise(&mut sqlite, &mut w);
    let got = snapshot(&sqlite, &k);
    assert_eq!(got, expected);

    // Spot checks of the reference semantics.
    let (a, ids, mids) = (&k.addresses, &k.ids, &k.message_ids);
    assert_eq!(got.identity.unwrap().0, *w.me.keys.seed());
    assert_eq!(got.prekeys.unwrap(), w.prekeys.to_bytes().to_vec());
    assert_eq!(
        got.sessions.iter().map(|s| s.0).collect::<Vec<_>>(),
        [a[0], a[3], a[1], a[2]]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>(),
        "sessions by address, the removed one gone"
    );
    let two = sqlite.session(&a[3]).unwrap().unwrap();
    assert_eq!(two.entries().len(), 2);
    assert_eq!(bytes(&two), bytes(&w.two_sessions(0)));
    assert_eq!(
        got.quarantined,
        [
            (a[1], NOW + 20, "did not decrypt".to_string()),
            (a[3], 1 << 63, String::new())
        ]
    );
    // The quarantined bytes: sealed as they were stored, the same record as
    // the memory store's underneath.
    for (q, m) in sqlite
        .quarantined()
        .unwrap()
        .iter()
        .zip(memory.quarantined().unwrap())
    {
        assert_ne!(q.bytes, m.bytes);
        let opened = at_rest::open(&KEY, "sessions", &at_rest::address(&q.peer), &q.bytes);
        assert_eq!(opened.unwrap(), *m.bytes);
    }
    assert_eq!(
        got.outbox.iter().map(|e| e.envelope.id).collect::<Vec<_>>(),
        [ids[0], ids[2], ids[8]],
        "outbox: commit order, removed entry gone"
    );
    assert_eq!(
        got.processed,
        [false, false, false, true, true, true, true, false, false, false]
    );
    let inbox: Vec<_> = got.inbox.iter().map(|m| m.envelope_id).collect();
    assert_eq!(inbox, [ids[4], ids[5]], "receive order, duplicate ignored");
    assert!(got.inbox[0].body.is_empty());
    assert_eq!(got.peer[1].as_ref().unwrap().first_seen, u64::MAX);
    assert_eq!(got.peers.len(), 4);
    assert_eq!(
        got.peers_with_identity[0]
            .iter()
            .map(|p| p.address)
            .collect::<Vec<_>>(),
        [a[0], a[3]]
    );
    assert!(got.peers_with_identity[4].iter().all(|p| p.address == a[2]));
    let sent: Vec<_> = got.sent.iter().map(|m| (m.id, m.state)).collect();
    assert_eq!(
        sent,
        [
            (mids[0], DeliveryState::Resent),
            (mids[1], DeliveryState::Delivered),
            (mids[2], DeliveryState::Failed(Failure::Compromised)),
            (mids[3], DeliveryState::Delivered),
            (mids[5], DeliveryState::Deposited),
            (mids[7], DeliveryState::Stored),
        ],
        "sent: first-stored order, updated in place, finished ones pruned"
    );
    assert_eq!(got.sent[0].body, b"m0");
    assert_eq!(got.sent[0].sends, 2);
    assert_eq!(got.sent[4].body, b"m5");
    assert!(got.sent_by_id[4].is_none() && got.sent_by_id[6].is_none());
    assert_eq!(got.sent_by_id[7].as_ref().unwrap().body, b"m7");
    assert!(got.sent_by_id[8].is_none(), "never stored");
}

#[test]
fn prune_and_times_use_the_full_u64_range() {
    let mut w = world(2);
    let mut store = SqliteStore::open_in_memory(&KEY).unwrap();
    let times = [
        0u64,
        5,
        NOW,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
    ];
    let ids: Vec<EnvelopeId> = times.iter().map(|_| w.id()).collect();
    let batch: Vec<ReceiveCommit<'_>> = ids.iter().zip(times).map(|(id, t)| mark(*id, t)).collect();
    let alive = |store: &SqliteStore| -> Vec<bool> {
        ids.iter().map(|i| store.is_processed(i).unwrap()).collect()
    };
    store.commit_receive(&batch).unwrap();
    store.prune_processed(0).unwrap();
    assert_eq!(alive(&store), [true; 7]);
    store.prune_processed(6).unwrap();
    assert_eq!(alive(&store), [false, false, true, true, true, true, true]);
    store.prune_processed(1 << 63).unwrap();
    assert_eq!(
        alive(&store),
        [false, false, false, false, true, true, true]
    );
    store.prune_processed(u64::MAX).unwrap();
    assert_eq!(
        alive(&store),
        [false, false, false, false, false, false, true]
    );
}

#[test]
fn reopening_from_disk_keeps_everything() {
    let dir = TempDir::new("reopen");
    let mut w = world(3);
    let (k, before) = {
        let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
        let k = exercise(&mut store, &mut w);
        let snap = snapshot(&store, &k);
        (k, snap)
    };
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_eq!(snapshot(&store, &k), before);
    assert!(store.corrupted_rows().unwrap().is_empty());

    // A second handle on the same file sees the same (WAL: both open).
    let other = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_eq!(snapshot(&other, &k), before);

    let c = raw(&dir.db());
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: u32 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SqliteStore::SCHEMA_VERSION);
    assert_eq!(SqliteStore::SCHEMA_VERSION, 7);
}

#[test]
fn secrets_are_not_on_disk_in_the_clear() {
    let dir = TempDir::new("at-rest");
    let mut w = world(4);
    let marker = b"a very recognisable message body".to_vec();
    let sent_marker = b"an equally recognisable sent body".to_vec();
    let resent_marker = b"the sent body, updated in place".to_vec();
    let receipt_marker = b"a sent body stored by a receipt".to_vec();
    let (a, s) = w.peers[0].clone();
    let two = w.two_sessions(1);
    // Deposit access keys (own and peers'), recognisable bytes.
    let access = |epoch, byte| cubbyhole::storage::AccessKeyRecord {
        epoch,
        key: cubbyhole::transport::AccessKey::from_bytes([byte; 16]),
        inbox: (epoch == 2).then(|| {
            (
                [byte; 32],
                cubbyhole::transport::AccessKey::from_bytes([!byte; 16]),
            )
        }),
    };
    let own_access_key = access(1, 0xa1);
    let peer_access_key = access(2, 0xa2);
    let other_access_key = access(3, 0xa3);
    {
        let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
        store.set_identity(&w.me).unwrap();
        store.set_prekeys(&w.prekeys).unwrap();
        let id = w.id();
        let m = message(id, a, &marker, NOW);
        let mid = w.message_id();
        let by_receipt = sent(mid, a, &receipt_marker, DeliveryState::Deposited, NOW);
        let record = single(&s);
        store
            .commit_receive(&[ReceiveCommit {
                envelope_id: id,
                processed_at: NOW,
                session: Some((&a, &record)),
                prekeys: None,
                peer: None,
                message: Some(&m),
                sent: Some(&by_receipt),
                access: Some((&a, &peer_access_key)),
            }])
            .unwrap();
        store.set_own_access_key(&own_access_key).unwrap();
        store
            .set_peer_access_key(&w.peers[1].0, &other_access_key)
            .unwrap();
        let mid = w.message_id();
        let m = sent(mid, w.peers[1].0, &sent_marker, DeliveryState::Stored, NOW);
        let entry = outbox_entry(w.peers[1].0, w.id(), vec![0; 8]);
        store.commit_send(&two, &entry, Some(&m)).unwrap();
        let mid = w.message_id();
        store
            .update_sent(&sent(mid, a, &resent_marker, DeliveryState::Resent, NOW))
            .unwrap();
    }
    let mut disk = Vec::new();
    for entry in std::fs::read_dir(&dir.0).unwrap() {
        disk.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let contains = |needle: &[u8]| disk.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(&w.peers[0].0.identity),
        "keys are stored in the clear"
    );
    assert!(!contains(&w.me.keys.seed()[..]), "identity seed leaked");
    assert!(!contains(&marker), "message body leaked");
    assert!(!contains(&sent_marker), "sent body leaked");
    assert!(!contains(&resent_marker), "updated sent body leaked");
    assert!(!contains(&receipt_marker), "sent body of a receipt leaked");
    for byte in [0xa1, 0xa2, 0xa3] {
        assert!(!contains(&[byte; 16]), "access key {byte:#x} leaked");
    }
    let otk = w.prekeys.prekeys.one_time_prekeys().next().unwrap();
    assert!(!contains(&otk.secret_bytes()[..]), "prekey secret leaked");
    for state in [s.to_bytes(), w.peers[1].1.to_bytes(), w.extra[1].to_bytes()] {
        assert!(
            !state.chunks(32).any(|c| c.len() == 32 && contains(c)),
            "session state leaked"
        );
    }
}

#[test]
fn wrong_key_is_a_clear_error_and_harms_nothing() {
    let dir = TempDir::new("wrong-key");
    let w = world(5);
    {
        let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
        store.set_identity(&w.me).unwrap();
    }
    let mut other = KEY;
    other[31] ^= 1;
    assert!(matches!(
        SqliteStore::open(dir.db(), &other),
        Err(StoreError::WrongKey)
    ));
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_eq!(
        *store.identity().unwrap().unwrap().keys.seed(),
        *w.me.keys.seed()
    );
    assert_eq!(
        SqliteStore::open(dir.db(), &[0; 32])
            .unwrap_err()
            .to_string(),
        "wrong database key"
    );
}

#[test]
fn sessions_need_the_identity_they_are_restored_with() {
    let dir = TempDir::new("no-identity");
    let mut w = world(12);
    let (a, s) = w.peers[0].clone();
    let record = single(&s);
    let entry = outbox_entry(a, w.id(), vec![1]);
    {
        let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
        store.commit_send(&record, &entry, None).unwrap();
        // No identity yet: the record cannot be restored.
        assert_corrupted(store.session(&a).unwrap_err(), "sessions", &row_name(&a));
        let all = store.sessions().unwrap();
        assert_eq!(all.len(), 1);
        assert_corrupted(
            all.into_iter().next().unwrap().1.unwrap_err(),
            "sessions",
            &row_name(&a),
        );
        store.set_identity(&w.me).unwrap();
        assert_eq!(bytes(&store.session(&a).unwrap().unwrap()), bytes(&record));
    }
    // Reopened, the store reads its identity when it first needs it.
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    let restored = store.session(&a).unwrap().unwrap();
    assert_eq!(bytes(&restored), bytes(&record));
    let session = &restored.entries()[0].session;
    assert_eq!(session.local_identity(), w.me.keys.public());
    assert_eq!(session.remote_identity().as_bytes(), &a.identity);
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    let all = store.sessions().unwrap();
    assert_eq!(bytes(all[0].1.as_ref().unwrap()), bytes(&record));
}

#[test]
fn debug_does_not_print_the_key() {
    let store = SqliteStore::open_in_memory(&[0xab; 32]).unwrap();
    let shown = format!("{store:?}");
    assert!(shown.starts_with("SqliteStore"), "{shown}");
    assert!(
        !shown.contains("ab, ab") && !shown.contains("171"),
        "{shown}"
    );
}

/// Stores records with all three peers (peer 2's holds two sessions),
/// closes the store.
fn three_sessions(dir: &TempDir, w: &mut World) {
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    store.set_identity(&w.me).unwrap();
    for i in 0..3 {
        let r = match i {
            2 => w.two_sessions(2),
            _ => single(&w.peers[i].1),
        };
        let entry = outbox_entry(w.peers[i].0, w.id(), vec![1, 2, 3]);
        store.commit_send(&r, &entry, None).unwrap();
    }
}

fn row_name(a: &DeviceAddress) -> String {
    format!("{}/{}", hex::encode(a.identity), a.device_id)
}

fn assert_corrupted(r: StoreError, want_table: &str, want_row: &str) {
    match r {
        StoreError::Corrupted { table, row, reason } => {
            assert_eq!((table, row.as_str()), (want_table, want_row), "{reason}");
            let shown = StoreError::Corrupted { table, row, reason }.to_string();
            assert!(shown.contains(want_table) && shown.contains(want_row));
        }
        other => panic!("expected Corrupted, got {other:?}"),
    }
}

/// The stored `state` of a session row.
fn stored_state(c: &rusqlite::Connection, a: &DeviceAddress) -> Vec<u8> {
    c.query_row(
        "SELECT state FROM sessions WHERE identity = ?1 AND device_id = ?2",
        rusqlite::params![&a.identity[..], a.device_id],
        |r| r.get(0),
    )
    .unwrap()
}

fn set_stored_state(c: &rusqlite::Connection, a: &DeviceAddress, state: &[u8]) {
    let n = c
        .execute(
            "INSERT INTO sessions (identity, device_id, state) VALUES (?1, ?2, ?3)
             ON CONFLICT (identity, device_id) DO UPDATE SET state = excluded.state",
            rusqlite::params![&a.identity[..], a.device_id, state],
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn a_corrupted_session_row_is_named_and_spares_the_others() {
    let dir = TempDir::new("corrupt");
    let mut w = world(6);
    three_sessions(&dir, &mut w);
    let (bad, good) = (w.peers[0].0, w.peers[1].0);
    {
        let c = raw(&dir.db());
        let mut state = stored_state(&c, &bad);
        let mid = state.len() / 2;
        state[mid] ^= 0x01;
        set_stored_state(&c, &bad, &state);
    }
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_corrupted(
        store.session(&bad).unwrap_err(),
        "sessions",
        &row_name(&bad),
    );
    assert_eq!(
        bytes(&store.session(&good).unwrap().unwrap()),
        bytes(&single(&w.peers[1].1)),
        "a healthy row still loads"
    );
    let all = store.sessions().unwrap();
    assert_eq!(all.len(), 3);
    for (a, r) in all {
        if a == bad {
            assert_corrupted(r.unwrap_err(), "sessions", &row_name(&bad));
        } else {
            assert!(r.is_ok(), "{a:?}: {r:?}");
        }
    }
    assert_eq!(store.session_addresses().unwrap().len(), 3);
    let found = store.corrupted_rows().unwrap();
    assert_eq!(found.len(), 1);
    assert_corrupted(
        found.into_iter().next().unwrap(),
        "sessions",
        &row_name(&bad),
    );
    assert_eq!(store.outbox().unwrap().len(), 3, "other tables unaffected");

    // Recovery: drop the row (or overwrite it with a new record).
    store.remove_session(&bad).unwrap();
    assert_eq!(store.sessions().unwrap().len(), 2);
    assert!(store.corrupted_rows().unwrap().is_empty());

    // A truncated row is named too.
    raw(&dir.db())
        .execute(
            "UPDATE sessions SET state = x'0102' WHERE identity = ?1",
            [&good.identity[..]],
        )
        .unwrap();
    assert_corrupted(
        store.session(&good).unwrap_err(),
        "sessions",
        &row_name(&good),
    );
    let r = w.record(1);
    let entry = outbox_entry(good, w.id(), vec![]);
    store.commit_send(&r, &entry, None).unwrap();
    assert_eq!(bytes(&store.session(&good).unwrap().unwrap()), bytes(&r));
    // So does set_session.
    raw(&dir.db())
        .execute(
            "UPDATE sessions SET state = x'0102' WHERE identity = ?1",
            [&good.identity[..]],
        )
        .unwrap();
    let r = w.record(1);
    store.set_session(&good, &r).unwrap();
    assert_eq!(bytes(&store.session(&good).unwrap().unwrap()), bytes(&r));
}

#[test]
fn sessions_returns_the_healthy_records_and_an_error_per_corrupted_one() {
    let dir = TempDir::new("sessions-per-row");
    let mut w = world(13);
    three_sessions(&dir, &mut w);
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    {
        let c = raw(&dir.db());
        // Row 0 does not authenticate (cut); row 1 authenticates but does
        // not decode as a record (sealed as the store would).
        let state = stored_state(&c, &a[0]);
        set_stored_state(&c, &a[0], &state[..state.len() - 1]);
        let garbage = at_rest::seal(&KEY, "sessions", &at_rest::address(&a[1]), &[0x80, 0, 9]);
        set_stored_state(&c, &a[1], &garbage);
    }
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    let mut all = store.sessions().unwrap();
    all.sort_by_key(|(address, _)| a.iter().position(|x| x == address));
    assert_eq!(all.iter().map(|r| r.0).collect::<Vec<_>>(), a);
    let mut results = all.into_iter().map(|r| r.1);
    let cut = results.next().unwrap().unwrap_err();
    assert!(cut.to_string().contains("authentication failed"), "{cut}");
    assert_corrupted(cut, "sessions", &row_name(&a[0]));
    let undecodable = results.next().unwrap().unwrap_err();
    assert!(
        undecodable.to_string().contains("session record"),
        "{undecodable}"
    );
    assert_corrupted(undecodable, "sessions", &row_name(&a[1]));
    let healthy = results.next().unwrap().unwrap();
    assert_eq!(bytes(&healthy), bytes(&w.two_sessions(2)));
    assert_eq!(store.corrupted_rows().unwrap().len(), 2);

    // Once the corrupted ones are quarantined, only the healthy one is
    // left, and the store is healthy.
    let mut store = store;
    for (i, peer) in a.iter().take(2).enumerate() {
        store
            .quarantine_session(peer, NOW + i as u64, "corrupted")
            .unwrap();
    }
    let all = store.sessions().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, a[2]);
    assert!(store.corrupted_rows().unwrap().is_empty());
}

#[test]
fn a_legacy_session_row_loads_as_a_one_session_record() {
    let dir = TempDir::new("legacy");
    let w = world(14);
    let (a, s) = w.peers[0].clone();
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    store.set_identity(&w.me).unwrap();
    // A row as version 1 wrote it: the bare session state, sealed.
    let legacy = at_rest::seal(&KEY, "sessions", &at_rest::address(&a), &s.to_bytes());
    set_stored_state(&raw(&dir.db()), &a, &legacy);

    let check = |r: &SessionRecord| {
        assert_eq!(r.entries().len(), 1);
        let e = &r.entries()[0];
        assert_eq!(e.session.to_bytes(), s.to_bytes());
        assert_eq!((e.generation, e.superseded), (0, false));
        assert_eq!(e.session.remote_identity().as_bytes(), &a.identity);
    };
    check(&store.session(&a).unwrap().unwrap());
    let all = store.sessions().unwrap();
    assert_eq!(all.len(), 1);
    check(all[0].1.as_ref().unwrap());
    assert!(store.corrupted_rows().unwrap().is_empty());

    // Written back, it is a record (and still the same session).
    let record = store.session(&a).unwrap().unwrap();
    store.set_session(&a, &record).unwrap();
    let stored = stored_state(&raw(&dir.db()), &a);
    let plain = at_rest::open(&KEY, "sessions", &at_rest::address(&a), &stored).unwrap();
    assert_eq!(plain, bytes(&record));
    assert_ne!(plain, s.to_bytes().to_vec());
    check(&store.session(&a).unwrap().unwrap());
    drop(store);
    check(
        &SqliteStore::open(dir.db(), &KEY)
            .unwrap()
            .session(&a)
            .unwrap()
            .unwrap(),
    );
}

#[test]
fn quarantine_moves_the_stored_bytes() {
    let dir = TempDir::new("quarantine");
    let mut w = world(15);
    three_sessions(&dir, &mut w);
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    // Peer 0's row is garbled; peer 1's is healthy (a peer that lost its
    // session is quarantined too).
    let garbled = {
        let c = raw(&dir.db());
        let mut state = stored_state(&c, &a[0]);
        state[20] ^= 0x80;
        set_stored_state(&c, &a[0], &state);
        state
    };
    let healthy = stored_state(&raw(&dir.db()), &a[1]);
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert!(store.quarantined().unwrap().is_empty());
    let reason = store.session(&a[0]).unwrap_err().to_string();
    store.quarantine_session(&a[0], NOW + 5, &reason).unwrap();
    store
        .quarantine_session(&a[1], 1 << 63, "peer lost it")
        .unwrap();
    // Nothing to move: nothing happens.
    store.quarantine_session(&a[0], NOW + 6, "again").unwrap();
    let unknown = DeviceAddress {
        identity: a[1].identity,
        device_id: 999,
    };
    store.quarantine_session(&unknown, NOW, "unknown").unwrap();

    let q = store.quarantined().unwrap();
    assert_eq!(q.len(), 2, "oldest first, no-ops not recorded");
    assert_eq!(
        (q[0].peer, q[0].at, q[0].reason.as_str()),
        (a[0], NOW + 5, reason.as_str())
    );
    assert_eq!(
        *q[0].bytes, garbled,
        "as found, even though it does not open"
    );
    assert_eq!(
        (q[1].peer, q[1].at, q[1].reason.as_str()),
        (a[1], 1 << 63, "peer lost it")
    );
    assert_eq!(*q[1].bytes, healthy, "still sealed");
    let opened = at_rest::open(&KEY, "sessions", &at_rest::address(&a[1]), &q[1].bytes).unwrap();
    assert_eq!(opened, bytes(&single(&w.peers[1].1)));

    assert!(store.session(&a[0]).unwrap().is_none());
    assert!(store.session(&a[1]).unwrap().is_none());
    let all = store.sessions().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, a[2]);
    assert!(store.corrupted_rows().unwrap().is_empty());

    // The peer starts afresh; the quarantine stays (and survives reopening).
    let fresh = single(&w.extra[0]);
    store.set_session(&a[0], &fresh).unwrap();
    drop(store);
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_eq!(store.quarantined().unwrap(), q);
    assert_eq!(
        bytes(&store.session(&a[0]).unwrap().unwrap()),
        bytes(&fresh)
    );

    // The move is one transaction: if the delete fails, nothing moved.
    raw(&dir.db())
        .execute_batch(
            "CREATE TRIGGER keep_sessions BEFORE DELETE ON sessions
             BEGIN SELECT RAISE(ABORT, 'delete refused'); END;",
        )
        .unwrap();
    match store.quarantine_session(&a[2], NOW, "x") {
        Err(StoreError::Backend(e)) => assert!(e.contains("delete refused"), "{e}"),
        other => panic!("expected the injected failure, got {other:?}"),
    }
    assert_eq!(store.quarantined().unwrap(), q);
    assert!(store.session(&a[2]).unwrap().is_some());
}

#[test]
fn a_value_moved_to_another_row_or_table_fails() {
    let dir = TempDir::new("moved");
    let mut w = world(7);
    three_sessions(&dir, &mut w);
    let (a0, a1, a2) = (w.peers[0].0, w.peers[1].0, w.peers[2].0);
    let inbox_id = w.id();
    let (mid0, mid1) = (w.message_id(), w.message_id());
    {
        let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
        store.set_identity(&w.me).unwrap();
        store.set_prekeys(&w.prekeys).unwrap();
        store
            .set_peer(&PeerRecord {
                address: a0,
                trust: Trust::Compromised,
                first_seen: NOW,
            })
            .unwrap();
        let m = message(inbox_id, a0, b"from a0", NOW);
        store
            .commit_receive(&[ReceiveCommit {
                message: Some(&m),
                ..mark(inbox_id, NOW)
            }])
            .unwrap();
        for (id, to) in [(mid0, a0), (mid1, a1)] {
            store
                .update_sent(&sent(id, to, b"to be sent", DeliveryState::Stored, NOW))
                .unwrap();
        }
    }
    let c = raw(&dir.db());
    // Session of a0 copied onto a1's row.
    c.execute(
        "UPDATE sessions SET state = (SELECT state FROM sessions WHERE identity = ?1)
         WHERE identity = ?2",
        [&a0.identity[..], &a1.identity[..]],
    )
    .unwrap();
    // The identity's sealed seed copied into the prekeys row.
    c.execute(
        "UPDATE prekeys SET state = (SELECT secret FROM identity)",
        [],
    )
    .unwrap();
    // A session record copied into an inbox body.
    c.execute(
        "UPDATE inbox SET body = (SELECT state FROM sessions WHERE identity = ?1)",
        [&a2.identity[..]],
    )
    .unwrap();
    // A compromised peer turned validated.
    c.execute("UPDATE peers SET trust = 1", []).unwrap();
    // The body of the message to a0 copied onto the message to a1.
    c.execute(
        "UPDATE sent SET body = (SELECT body FROM sent WHERE id = ?1) WHERE id = ?2",
        [&mid0.0[..], &mid1.0[..]],
    )
    .unwrap();

    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert!(store.session(&a0).unwrap().is_some());
    assert_corrupted(store.session(&a1).unwrap_err(), "sessions", &row_name(&a1));
    assert!(store.session(&a2).unwrap().is_some());
    assert!(store.identity().unwrap().is_some());
    assert_corrupted(store.prekeys().unwrap_err(), "prekeys", "1");
    assert_corrupted(
        store.inbox().unwrap_err(),
        "inbox",
        &hex::encode(inbox_id.0),
    );
    assert_corrupted(store.peer(&a0).unwrap_err(), "peers", &row_name(&a0));
    assert_corrupted(store.peers().unwrap_err(), "peers", &row_name(&a0));
    assert_eq!(
        store.sent_message(&mid0).unwrap().unwrap().body,
        b"to be sent"
    );
    assert_corrupted(
        store.sent_message(&mid1).unwrap_err(),
        "sent",
        &hex::encode(mid1.0),
    );
    assert_corrupted(
        store.sent_messages().unwrap_err(),
        "sent",
        &hex::encode(mid1.0),
    );
    assert_eq!(store.corrupted_rows().unwrap().len(), 5);

    // A sender rewritten on an inbox message is caught as well.
    store.remove_inbox(&inbox_id).unwrap();
    let id = w.id();
    let m = message(id, a0, b"from a0", NOW);
    store
        .commit_receive(&[ReceiveCommit {
            message: Some(&m),
            ..mark(id, NOW)
        }])
        .unwrap();
    assert_eq!(store.inbox().unwrap(), [m]);
    c.execute("UPDATE inbox SET from_device = from_device + 1", [])
        .unwrap();
    assert_corrupted(store.inbox().unwrap_err(), "inbox", &hex::encode(id.0));
}

#[test]
fn a_sent_message_moved_or_altered_fails_to_open() {
    let dir = TempDir::new("sent-moved");
    let mut w = world(16);
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    let ids: Vec<MessageId> = (0..6).map(|_| w.message_id()).collect();
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    let messages: Vec<SentMessage> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| sent(*id, a[i % 3], b"same body", DeliveryState::Deposited, NOW))
        .collect();
    for m in &messages {
        store.update_sent(m).unwrap();
    }
    let c = raw(&dir.db());
    let hexes: Vec<String> = ids.iter().map(|i| hex::encode(i.0)).collect();
    // Each row altered in one column; the same plaintext body everywhere, so
    // only the binding can tell.
    let edits = [
        // 0: the body of message 5 moved here.
        "UPDATE sent SET body = (SELECT body FROM sent WHERE id = ?2) WHERE id = ?1",
        // 1: the recipient changed.
        "UPDATE sent SET to_device = to_device + 100 WHERE id = ?1",
        // 2: the state rolled back from deposited to stored.
        "UPDATE sent SET state = 0 WHERE id = ?1",
        // 3: the creation time changed (to escape, or hasten, pruning).
        "UPDATE sent SET created = created - 1 WHERE id = ?1",
    ];
    for (i, sql) in edits.iter().enumerate() {
        let mut stmt = c.prepare(sql).unwrap();
        let params: Vec<&dyn rusqlite::ToSql> = if sql.contains("?2") {
            vec![&ids[i].0, &ids[5].0]
        } else {
            vec![&ids[i].0]
        };
        assert_eq!(stmt.execute(&params[..]).unwrap(), 1);
    }
    // 4: the row's id changed (its values moved to another key).
    c.execute(
        "UPDATE sent SET id = x'00112233445566778899aabbccddeeff' WHERE id = ?1",
        [&ids[4].0[..]],
    )
    .unwrap();
    for i in 0..4 {
        assert_corrupted(store.sent_message(&ids[i]).unwrap_err(), "sent", &hexes[i]);
    }
    assert_corrupted(
        store
            .sent_message(&MessageId([
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff,
            ]))
            .unwrap_err(),
        "sent",
        "00112233445566778899aabbccddeeff",
    );
    assert!(store.sent_message(&ids[4]).unwrap().is_none());
    assert_eq!(store.sent_message(&ids[5]).unwrap().unwrap(), messages[5]);
    assert_corrupted(store.sent_messages().unwrap_err(), "sent", &hexes[0]);
    assert_eq!(store.corrupted_rows().unwrap().len(), 5);

    // An unknown state code is named too (and not pruned as finished).
    c.execute("UPDATE sent SET state = 99 WHERE id = ?1", [&ids[5].0[..]])
        .unwrap();
    let e = store.sent_message(&ids[5]).unwrap_err();
    assert!(e.to_string().contains("unknown delivery state 99"), "{e}");
    store.prune_sent(u64::MAX).unwrap();
    assert_eq!(store.corrupted_rows().unwrap().len(), 6);

    // Recovery: overwrite or remove each row.
    store.update_sent(&messages[0]).unwrap();
    for id in &ids[1..4] {
        store.remove_sent(id).unwrap();
    }
    store
        .remove_sent(&MessageId([
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ]))
        .unwrap();
    store.remove_sent(&ids[5]).unwrap();
    assert_eq!(store.sent_messages().unwrap(), [messages[0].clone()]);
    assert!(store.corrupted_rows().unwrap().is_empty());
}

#[test]
fn sent_messages_round_trip_update_in_place_and_prune() {
    let dir = TempDir::new("sent");
    let mut w = world(17);
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    let ids: Vec<MessageId> = (0..8).map(|_| w.message_id()).collect();
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    let mut memory = MemoryStore::new();
    let stores: [&mut dyn BlockingStore; 2] = [&mut store, &mut memory];
    let big = vec![0x42u8; 100_000];
    let failed = |f| DeliveryState::Failed(f);
    // (id, state, created): every state, times across the u64 range.
    let cases = [
        (0, DeliveryState::Stored, 0u64),
        (1, DeliveryState::Deposited, 5),
        (2, DeliveryState::Resent, NOW - 1),
        (3, DeliveryState::Delivered, 5),
        (4, failed(Failure::TimedOut), NOW - 1),
        (5, failed(Failure::Refused), NOW),
        (6, DeliveryState::Delivered, 1 << 63),
        (7, failed(Failure::Compromised), u64::MAX),
    ];
    let originals: Vec<SentMessage> = cases
        .iter()
        .map(|&(i, state, created)| SentMessage {
            id: ids[i],
            to: a[i % 3],
            body: if state.is_pending() {
                big[..1000 * i + 1].to_vec()
            } else {
                Vec::new()
            },
            state,
            created,
            last_sent: created.wrapping_add(1),
            sends: u32::MAX - i as u32,
        })
        .collect();
    for s in stores {
        for m in &originals {
            s.update_sent(m).unwrap();
        }
        assert_eq!(s.sent_messages().unwrap(), originals);
        for m in &originals {
            assert_eq!(s.sent_message(&m.id).unwrap().as_ref(), Some(m));
        }
        assert!(s.sent_message(&MessageId([0; 16])).unwrap().is_none());
    }
    // Updated in place: message 0 delivered (body emptied), message 1 with a
    // big body, both keep their positions.
    let mut expected = originals.clone();
    expected[0].state = DeliveryState::Delivered;
    expected[0].body.clear();
    expected[1].body = big.clone();
    expected[1].state = DeliveryState::Resent;
    expected[1].sends += 1;
    for s in [&mut store as &mut dyn BlockingStore, &mut memory] {
        s.update_sent(&expected[1]).unwrap();
        s.update_sent(&expected[0]).unwrap();
        assert_eq!(s.sent_messages().unwrap(), expected);
    }
    drop(store);
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_eq!(store.sent_messages().unwrap(), expected);

    // Pruning: finished messages created before the bound go, pending ones
    // never (whatever their age), and times use the full u64 range.
    let alive = |s: &dyn BlockingStore| -> Vec<usize> {
        s.sent_messages()
            .unwrap()
            .iter()
            .map(|m| ids.iter().position(|i| *i == m.id).unwrap())
            .collect()
    };
    let steps: [(u64, &[usize]); 5] = [
        (0, &[0, 1, 2, 3, 4, 5, 6, 7]),
        (6, &[1, 2, 4, 5, 6, 7]),
        (NOW, &[1, 2, 5, 6, 7]),
        (1 << 63, &[1, 2, 6, 7]),
        (u64::MAX, &[1, 2, 7]),
    ];
    for (before, want) in steps {
        for s in [&mut store as &mut dyn BlockingStore, &mut memory] {
            s.prune_sent(before).unwrap();
            assert_eq!(alive(s), want, "prune_sent({before})");
        }
    }
    // The pending ones are still whole.
    assert_eq!(
        store.sent_messages().unwrap(),
        memory.sent_messages().unwrap()
    );
    assert_eq!(store.sent_message(&ids[1]).unwrap().unwrap().body, big);
    // Re-stored after pruning, a message goes to the end.
    store.update_sent(&originals[3]).unwrap();
    assert_eq!(alive(&store), [1, 2, 7, 3]);
}

#[test]
fn peers_lists_every_peer_and_by_identity() {
    let w = world(18);
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    let mut store = SqliteStore::open_in_memory(&KEY).unwrap();
    let mut memory = MemoryStore::new();
    let mut records = Vec::new();
    for (i, address) in a.iter().enumerate() {
        for device_id in [5u32, 0, u32::MAX, address.device_id] {
            records.push(PeerRecord {
                address: DeviceAddress {
                    identity: address.identity,
                    device_id,
                },
                trust: [Trust::Unvalidated, Trust::Validated, Trust::Compromised][i],
                first_seen: NOW + u64::from(device_id),
            });
        }
    }
    // An update replaces, it does not add.
    records.push(PeerRecord {
        trust: Trust::Compromised,
        ..records[0].clone()
    });
    let unknown = [0x11u8; 32];
    for s in [&mut store as &mut dyn BlockingStore, &mut memory] {
        assert!(s.peers().unwrap().is_empty());
        for r in &records {
            s.set_peer(r).unwrap();
        }
    }
    let all = store.peers().unwrap();
    assert_eq!(all, memory.peers().unwrap());
    assert_eq!(all.len(), 12);
    let mut sorted = all.clone();
    sorted.sort_by_key(|p| p.address);
    assert_eq!(all, sorted, "ordered by address");
    assert_eq!(
        all.iter()
            .find(|p| p.address == records[0].address)
            .unwrap()
            .trust,
        Trust::Compromised
    );
    for address in &a {
        let mine = store.peers_with_identity(&address.identity).unwrap();
        assert_eq!(mine, memory.peers_with_identity(&address.identity).unwrap());
        assert_eq!(
            mine.iter().map(|p| p.address.device_id).collect::<Vec<_>>(),
            [0, address.device_id, 5, u32::MAX]
        );
        assert!(mine.iter().all(|p| p.address.identity == address.identity));
    }
    assert!(store.peers_with_identity(&unknown).unwrap().is_empty());

    // A corrupted row fails the lists that hold it, not the others.
    let dir = TempDir::new("peers");
    {
        let mut file = SqliteStore::open(dir.db(), &KEY).unwrap();
        for r in &records {
            file.set_peer(r).unwrap();
        }
    }
    raw(&dir.db())
        .execute(
            "UPDATE peers SET first_seen = first_seen + 1 WHERE identity = ?1 AND device_id = 0",
            [&a[1].identity[..]],
        )
        .unwrap();
    let file = SqliteStore::open(dir.db(), &KEY).unwrap();
    let bad = DeviceAddress {
        identity: a[1].identity,
        device_id: 0,
    };
    assert_corrupted(file.peers().unwrap_err(), "peers", &row_name(&bad));
    assert_corrupted(
        file.peers_with_identity(&a[1].identity).unwrap_err(),
        "peers",
        &row_name(&bad),
    );
    assert_eq!(file.peers_with_identity(&a[0].identity).unwrap().len(), 4);
    assert_eq!(file.peers_with_identity(&a[2].identity).unwrap().len(), 4);
}

#[test]
fn commit_receive_is_all_or_nothing() {
    let dir = TempDir::new("atomic");
    let mut w = world(8);
    let a = w.peers[0].0;
    let before = single(&w.peers[0].1);
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    store.set_identity(&w.me).unwrap();
    store.set_prekeys(&w.prekeys).unwrap();
    let pending = sent(w.message_id(), a, b"waiting", DeliveryState::Deposited, NOW);
    let entry = outbox_entry(a, w.id(), vec![7]);
    store.commit_send(&before, &entry, Some(&pending)).unwrap();

    let ids: Vec<EnvelopeId> = (0..3).map(|_| w.id()).collect();
    let records: Vec<SessionRecord> = (0..3).map(|_| w.record(0)).collect();
    let messages: Vec<InboxMessage> = ids.iter().map(|id| message(*id, a, b"body", NOW)).collect();
    let mut prekeys = w.prekeys.clone();
    prekeys.upload_counter = 99;
    prekeys.accepted.push((9, [9; 16]));
    let peer = PeerRecord {
        address: a,
        trust: Trust::Unvalidated,
        first_seen: NOW,
    };
    let delivered = SentMessage {
        body: Vec::new(),
        state: DeliveryState::Delivered,
        ..pending.clone()
    };
    let new = sent(w.message_id(), a, b"new", DeliveryState::Stored, NOW + 1);
    let batch: Vec<ReceiveCommit<'_>> = (0..3)
        .map(|i| ReceiveCommit {
            envelope_id: ids[i],
            processed_at: NOW,
            session: Some((&a, &records[i])),
            prekeys: (i == 0).then_some(&prekeys),
            peer: (i == 1).then_some(&peer),
            message: Some(&messages[i]),
            sent: [Some(&delivered), None, Some(&new)][i],
            access: None,
        })
        .collect();

    // Make the last envelope of the batch fail inside the transaction.
    let c = raw(&dir.db());
    c.execute_batch(&format!(
        "CREATE TRIGGER fail_last BEFORE INSERT ON processed
         WHEN NEW.envelope_id = x'{}'
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        hex::encode(ids[2].0)
    ))
    .unwrap();
    match store.commit_receive(&batch) {
        Err(StoreError::Backend(e)) => assert!(e.contains("injected failure"), "{e}"),
        other => panic!("expected the injected failure, got {other:?}"),
    }
    let check_nothing = |store: &SqliteStore| {
        for id in &ids {
            assert!(!store.is_processed(id).unwrap());
        }
        assert!(store.inbox().unwrap().is_empty());
        assert_eq!(bytes(&store.session(&a).unwrap().unwrap()), bytes(&before));
        let p = store.prekeys().unwrap().unwrap();
        assert_eq!((p.upload_counter, p.accepted.len()), (3, 2));
        assert!(store.peer(&a).unwrap().is_none());
        assert_eq!(
            store.sent_messages().unwrap(),
            std::slice::from_ref(&pending)
        );
    };
    check_nothing(&store);
    check_nothing(&SqliteStore::open(dir.db(), &KEY).unwrap());

    // Without the failure the same batch lands whole.
    c.execute_batch("DROP TRIGGER fail_last").unwrap();
    store.commit_receive(&batch).unwrap();
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    for id in &ids {
        assert!(store.is_processed(id).unwrap());
    }
    assert_eq!(store.inbox().unwrap(), messages);
    assert_eq!(
        bytes(&store.session(&a).unwrap().unwrap()),
        bytes(&records[2])
    );
    let p = store.prekeys().unwrap().unwrap();
    assert_eq!(
        (p.upload_counter, p.accepted),
        (99, prekeys.accepted.clone())
    );
    assert_eq!(store.peer(&a).unwrap(), Some(peer));
    assert_eq!(store.sent_messages().unwrap(), [delivered, new]);
}

#[test]
fn commit_send_is_all_or_nothing() {
    let dir = TempDir::new("atomic-send");
    let mut w = world(9);
    let a = w.peers[0].0;
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    store.set_identity(&w.me).unwrap();
    let first = single(&w.peers[0].1);
    let m1 = sent(w.message_id(), a, b"one", DeliveryState::Stored, NOW);
    store
        .commit_send(&first, &outbox_entry(a, w.id(), vec![1]), Some(&m1))
        .unwrap();
    let unchanged = |store: &SqliteStore| {
        assert_eq!(bytes(&store.session(&a).unwrap().unwrap()), bytes(&first));
        assert_eq!(store.outbox().unwrap().len(), 1);
        assert_eq!(store.sent_messages().unwrap(), std::slice::from_ref(&m1));
    };
    // The outbox refuses: neither the record nor the sent message is kept.
    let c = raw(&dir.db());
    c.execute_batch(
        "CREATE TRIGGER no_outbox BEFORE INSERT ON outbox
         BEGIN SELECT RAISE(ABORT, 'outbox refused'); END;",
    )
    .unwrap();
    let second = w.record(0);
    let m2 = sent(w.message_id(), a, b"two", DeliveryState::Stored, NOW);
    assert!(matches!(
        store.commit_send(&second, &outbox_entry(a, w.id(), vec![2]), Some(&m2)),
        Err(StoreError::Backend(_))
    ));
    unchanged(&store);
    // The sent table refuses (a new message, or an update of one): neither
    // the record nor the envelope is kept.
    c.execute_batch(
        "DROP TRIGGER no_outbox;
         CREATE TRIGGER no_sent BEFORE INSERT ON sent
         BEGIN SELECT RAISE(ABORT, 'sent refused'); END;",
    )
    .unwrap();
    let resent = SentMessage {
        state: DeliveryState::Resent,
        sends: 2,
        ..m1.clone()
    };
    for m in [&m2, &resent] {
        match store.commit_send(&second, &outbox_entry(a, w.id(), vec![3]), Some(m)) {
            Err(StoreError::Backend(e)) => assert!(e.contains("sent refused"), "{e}"),
            other => panic!("expected the injected failure, got {other:?}"),
        }
        unchanged(&store);
    }
    unchanged(&SqliteStore::open(dir.db(), &KEY).unwrap());
    // Without a sent message the send does not touch the table.
    store
        .commit_send(&second, &outbox_entry(a, w.id(), vec![4]), None)
        .unwrap();
    assert_eq!(bytes(&store.session(&a).unwrap().unwrap()), bytes(&second));
    assert_eq!(store.outbox().unwrap().len(), 2);
}

/// Schema version 1, as published (`migrate_v1`).
const SCHEMA_V1: &str = "CREATE TABLE meta (
         name TEXT PRIMARY KEY,
         value BLOB NOT NULL
     ) WITHOUT ROWID, STRICT;
     CREATE TABLE identity (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         secret BLOB NOT NULL
     ) STRICT;
     CREATE TABLE prekeys (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         state BLOB NOT NULL
     ) STRICT;
     CREATE TABLE sessions (
         identity BLOB NOT NULL CHECK (length(identity) = 32),
         device_id INTEGER NOT NULL CHECK (device_id BETWEEN 0 AND 4294967295),
         state BLOB NOT NULL,
         PRIMARY KEY (identity, device_id)
     ) WITHOUT ROWID, STRICT;
     CREATE TABLE peers (
         identity BLOB NOT NULL CHECK (length(identity) = 32),
         device_id INTEGER NOT NULL CHECK (device_id BETWEEN 0 AND 4294967295),
         trust INTEGER NOT NULL,
         first_seen INTEGER NOT NULL,
         auth BLOB NOT NULL,
         PRIMARY KEY (identity, device_id)
     ) WITHOUT ROWID, STRICT;
     CREATE TABLE outbox (
         seq INTEGER PRIMARY KEY,
         envelope_id BLOB NOT NULL UNIQUE CHECK (length(envelope_id) = 16),
         to_identity BLOB NOT NULL,
         to_device INTEGER NOT NULL,
         payload BLOB NOT NULL,
         created INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE processed (
         envelope_id BLOB PRIMARY KEY CHECK (length(envelope_id) = 16),
         processed_at INTEGER NOT NULL
     ) WITHOUT ROWID, STRICT;
     CREATE INDEX processed_by_time ON processed (processed_at);
     CREATE TABLE inbox (
         seq INTEGER PRIMARY KEY,
         envelope_id BLOB NOT NULL UNIQUE CHECK (length(envelope_id) = 16),
         from_identity BLOB NOT NULL,
         from_device INTEGER NOT NULL,
         received_at INTEGER NOT NULL,
         body BLOB NOT NULL
     ) STRICT;";

/// What [`version_1_database`] wrote.
struct V1 {
    peer: PeerRecord,
    outbox: OutboxEntry,
    processed: EnvelopeId,
    inbox: InboxMessage,
}

/// A database as version 1 of the store wrote it (in WAL mode, as the
/// store leaves it): the identity, the prekeys, a bare session state with
/// peer 0, a peer, an outbox entry, a processed mark and an inbox message,
/// all sealed as version 1 sealed them.
fn version_1_database(path: &Path, w: &mut World) -> V1 {
    let (a, s) = w.peers[0].clone();
    let c = raw(path);
    let _: String = c
        .query_row("PRAGMA journal_mode = wal", [], |r| r.get(0))
        .unwrap();
    c.execute_batch(SCHEMA_V1).unwrap();
    c.pragma_update(None, "user_version", 1).unwrap();
    let one = 1u32.to_be_bytes();
    let check = at_rest::seal(
        &KEY,
        "meta",
        b"key_check",
        b"cubbyhole sqlite store key check v1",
    );
    c.execute("INSERT INTO meta VALUES ('key_check', ?1)", [check])
        .unwrap();
    let secret = at_rest::seal(&KEY, "identity", &one, &w.me.to_bytes());
    c.execute("INSERT INTO identity VALUES (1, ?1)", [secret])
        .unwrap();
    // The version 1 prekey encoding had no accepted list (version 0x02).
    let mut v2 = w.prekeys.clone();
    v2.accepted.clear();
    let mut prekeys = v2.to_bytes().to_vec();
    assert_eq!(prekeys[0], 3);
    prekeys[0] = 2;
    // The empty accepted list's count, after the header and both lists.
    let at = 18 + 4 + 12 * v2.retired_at.len() + 4 + 12 * v2.one_time_retired.len();
    assert_eq!(prekeys[at..at + 4], [0; 4]);
    prekeys.drain(at..at + 4);
    let state = at_rest::seal(&KEY, "prekeys", &one, &prekeys);
    c.execute("INSERT INTO prekeys VALUES (1, ?1)", [state])
        .unwrap();
    let state = at_rest::seal(&KEY, "sessions", &at_rest::address(&a), &s.to_bytes());
    set_stored_state(&c, &a, &state);
    let peer = PeerRecord {
        address: a,
        trust: Trust::Validated,
        first_seen: NOW - 3,
    };
    let binding = [
        &at_rest::address(&a)[..],
        &[1],
        &peer.first_seen.to_be_bytes(),
    ]
    .concat();
    c.execute(
        "INSERT INTO peers VALUES (?1, ?2, 1, ?3, ?4)",
        rusqlite::params![
            &a.identity[..],
            a.device_id,
            peer.first_seen as i64,
            at_rest::seal(&KEY, "peers", &binding, &[])
        ],
    )
    .unwrap();
    let outbox = outbox_entry(a, w.id(), vec![1, 2, 3]);
    c.execute(
        "INSERT INTO outbox (envelope_id, to_identity, to_device, payload, created)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![
            &outbox.envelope.id.0[..],
            &a.identity[..],
            a.device_id,
            &outbox.envelope.payload[..],
            outbox.created as i64
        ],
    )
    .unwrap();
    let processed = w.id();
    c.execute(
        "INSERT INTO processed VALUES (?1, ?2)",
        rusqlite::params![&processed.0[..], NOW as i64],
    )
    .unwrap();
    let inbox = message(processed, a, b"from version 1", NOW + 1);
    let binding = [
        &inbox.envelope_id.0[..],
        &at_rest::address(&a),
        &inbox.received_at.to_be_bytes(),
    ]
    .concat();
    c.execute(
        "INSERT INTO inbox (envelope_id, from_identity, from_device, received_at, body)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![
            &inbox.envelope_id.0[..],
            &a.identity[..],
            a.device_id,
            inbox.received_at as i64,
            at_rest::seal(&KEY, "inbox", &binding, &inbox.body)
        ],
    )
    .unwrap();
    V1 {
        peer,
        outbox,
        processed,
        inbox,
    }
}

fn tables(c: &rusqlite::Connection) -> Vec<String> {
    let mut stmt = c
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .unwrap();
    let names = stmt.query_map([], |r| r.get(0)).unwrap();
    names.map(Result::unwrap).collect()
}

#[test]
fn a_version_1_database_is_migrated_with_its_data() {
    assert_eq!(SqliteStore::SCHEMA_VERSION, 7);
    let dir = TempDir::new("migrate");
    let mut w = world(19);
    let v1 = version_1_database(&dir.db(), &mut w);
    let a = w.peers[0].0;
    let version = |c: &rusqlite::Connection| -> u32 {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(version(&raw(&dir.db())), 1);
    assert!(!tables(&raw(&dir.db())).contains(&"sent".to_string()));

    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    let c = raw(&dir.db());
    assert_eq!(version(&c), 7);
    // Version 7's tables; a migrated store has no access key yet (the
    // client draws one at its next publish) and knows none of its peers'.
    let names = tables(&c);
    assert!(names.contains(&"own_access".to_string()), "{names:?}");
    assert!(names.contains(&"peer_access".to_string()), "{names:?}");
    assert!(store.own_access_key().unwrap().is_none());
    assert_eq!(store.peer_access(&a).unwrap(), Default::default());
    // Version 6's index, and the "last pending to" query uses it.
    let plan: Vec<String> = c
        .prepare(
            "EXPLAIN QUERY PLAN SELECT id FROM sent WHERE state < 3 AND to_identity = ?1 \
             AND to_device = ?2 ORDER BY seq DESC LIMIT 1",
        )
        .unwrap()
        .query_map([vec![0u8; 32], vec![0u8; 4]], |r| r.get(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        plan.iter()
            .any(|p| p.contains("USING INDEX sent_pending_to")),
        "{plan:?}"
    );
    let names = tables(&c);
    for t in [
        "accounts",
        "pairing",
        "identity",
        "inbox",
        "meta",
        "outbox",
        "peers",
        "prekeys",
        "processed",
        "quarantine",
        "routes",
        "sent",
        "sessions",
    ] {
        assert!(names.contains(&t.to_string()), "{t} missing: {names:?}");
    }
    // Everything version 1 wrote reads back.
    assert!(store.corrupted_rows().unwrap().is_empty());
    assert_eq!(
        *store.identity().unwrap().unwrap().keys.seed(),
        *w.me.keys.seed()
    );
    let prekeys = store.prekeys().unwrap().unwrap();
    assert_eq!(prekeys.upload_counter, w.prekeys.upload_counter);
    assert!(prekeys.accepted.is_empty());
    let record = store.session(&a).unwrap().unwrap();
    assert_eq!(record.entries().len(), 1);
    assert_eq!(
        record.entries()[0].session.to_bytes(),
        w.peers[0].1.to_bytes()
    );
    // Version 3 filled the routing index for the old record.
    let keys: Vec<[u8; 32]> = record.ratchet_keys().collect();
    assert!(!keys.is_empty());
    assert_eq!(store.route_ratchet_keys(&keys).unwrap(), [a]);
    assert_eq!(store.route_ratchet_keys(&[[9; 32]]).unwrap(), []);
    assert_eq!(
        store.awaiting_ratchet_key().unwrap().contains(&a),
        record.awaits_ratchet_key()
    );
    assert_eq!(store.peer(&a).unwrap(), Some(v1.peer.clone()));
    assert_eq!(store.peers().unwrap(), [v1.peer]);
    // A version-1 outbox row carries no message id.
    let v1_outbox = OutboxEntry {
        message: None,
        ..v1.outbox
    };
    assert_eq!(store.outbox().unwrap(), [v1_outbox]);
    assert!(store.is_processed(&v1.processed).unwrap());
    assert_eq!(store.inbox().unwrap(), [v1.inbox]);
    assert!(store.quarantined().unwrap().is_empty());
    assert!(store.sent_messages().unwrap().is_empty());

    // The new tables work, and the migrated store reopens as version 2.
    let m = sent(
        w.message_id(),
        a,
        b"after the migration",
        DeliveryState::Stored,
        NOW,
    );
    store.update_sent(&m).unwrap();
    store.quarantine_session(&a, NOW, "test").unwrap();
    // Version 4: accounts (own and contacts), sealed.
    assert!(store.own_account().unwrap().is_none());
    let genesis = cubbyhole::DeviceList::genesis(&w.me.keys, 1);
    let own = cubbyhole::storage::AccountRecord {
        account: *genesis.account_id(),
        head: genesis.encode(),
        parent: None,
        trust: cubbyhole::storage::Trust::Validated,
        evidence: None,
        updated_at: NOW,
    };
    store.set_own_account(&own).unwrap();
    drop(store);
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_eq!(version(&raw(&dir.db())), 7);
    assert_eq!(store.own_account().unwrap(), Some(own));
    assert!(store.accounts().unwrap().is_empty());
    assert_eq!(store.sent_messages().unwrap(), [m]);
    let q = store.quarantined().unwrap();
    assert_eq!((q.len(), q[0].peer), (1, a));
    assert!(store.session(&a).unwrap().is_none());

    // The wrong key is refused before anything is migrated.
    let dir = TempDir::new("migrate-wrong-key");
    version_1_database(&dir.db(), &mut w);
    assert!(matches!(
        SqliteStore::open(dir.db(), &[1; 32]),
        Err(StoreError::WrongKey)
    ));
    assert_eq!(version(&raw(&dir.db())), 1);
    assert!(!tables(&raw(&dir.db())).contains(&"quarantine".to_string()));
}

#[test]
fn a_failed_migration_leaves_version_1() {
    let dir = TempDir::new("migrate-fails");
    let mut w = world(20);
    version_1_database(&dir.db(), &mut w);
    // A table in the way of the second step's second statement.
    raw(&dir.db())
        .execute_batch("CREATE TABLE sent (x INTEGER) STRICT")
        .unwrap();
    assert!(matches!(
        SqliteStore::open(dir.db(), &KEY),
        Err(StoreError::Backend(_))
    ));
    let c = raw(&dir.db());
    let version: u32 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
    assert!(
        !tables(&c).contains(&"quarantine".to_string()),
        "rolled back"
    );
    // Once the obstacle is gone, the migration runs.
    c.execute_batch("DROP TABLE sent").unwrap();
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert!(store.session(&w.peers[0].0).unwrap().is_some());
    assert!(store.sent_messages().unwrap().is_empty());
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = TempDir::new("schema");
    drop(SqliteStore::open(dir.db(), &KEY).unwrap());
    let newer = SqliteStore::SCHEMA_VERSION + 1;
    raw(&dir.db())
        .pragma_update(None, "user_version", newer)
        .unwrap();
    match SqliteStore::open(dir.db(), &KEY) {
        Err(StoreError::UnsupportedSchema(v)) => assert_eq!(v, newer),
        other => panic!("expected UnsupportedSchema, got {other:?}"),
    }
}

#[test]
fn foreign_and_broken_files_are_refused() {
    let dir = TempDir::new("foreign");
    let other = dir.0.join("other.db");
    raw(&other)
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    assert!(matches!(
        SqliteStore::open(&other, &KEY),
        Err(StoreError::Backend(_))
    ));
    let garbage = dir.0.join("garbage.db");
    std::fs::write(&garbage, [0x42u8; 8192]).unwrap();
    assert!(matches!(
        SqliteStore::open(&garbage, &KEY),
        Err(StoreError::Backend(_))
    ));
    // A store whose key check row is gone is named, not opened.
    drop(SqliteStore::open(dir.db(), &KEY).unwrap());
    raw(&dir.db()).execute("DELETE FROM meta", []).unwrap();
    match SqliteStore::open(dir.db(), &KEY) {
        Err(e) => assert_corrupted(e, "meta", "key_check"),
        Ok(_) => panic!("opened without a key check"),
    }
}

#[test]
fn a_cut_or_extended_key_check_row_is_corrupted_not_a_wrong_key() {
    let dir = TempDir::new("key-check-cut");
    drop(SqliteStore::open(dir.db(), &KEY).unwrap());
    let db = raw(&dir.db());
    let read = || -> Vec<u8> {
        db.query_row("SELECT value FROM meta WHERE name = 'key_check'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let write = |v: &[u8]| {
        db.execute("UPDATE meta SET value = ?1 WHERE name = 'key_check'", [v])
            .unwrap();
    };
    let intact = read();
    // 12-byte nonce, the 35-byte check value, 16-byte tag.
    assert_eq!(intact.len(), 63);
    for len in [0, 1, 27, 28, 29, 40, 62] {
        write(&intact[..len]);
        match SqliteStore::open(dir.db(), &KEY) {
            Err(e) => assert_corrupted(e, "meta", "key_check"),
            Ok(_) => panic!("opened with a key check cut to {len} bytes"),
        }
    }
    let mut longer = intact.clone();
    longer.push(0);
    write(&longer);
    match SqliteStore::open(dir.db(), &KEY) {
        Err(e) => assert_corrupted(e, "meta", "key_check"),
        Ok(_) => panic!("opened with an extended key check"),
    }
    // A row of the right length that does not open cannot be told from a
    // wrong key: it is reported as one.
    let mut flipped = intact.clone();
    flipped[20] ^= 1;
    write(&flipped);
    assert!(matches!(
        SqliteStore::open(dir.db(), &KEY),
        Err(StoreError::WrongKey)
    ));
    write(&intact);
    drop(SqliteStore::open(dir.db(), &KEY).unwrap());
}

#[test]
fn concurrent_writers_wait_for_each_other() {
    let dir = TempDir::new("concurrent");
    drop(SqliteStore::open(dir.db(), &KEY).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let path = dir.db();
            std::thread::spawn(move || {
                let mut store = SqliteStore::open(path, &KEY).unwrap();
                for i in 0..25u8 {
                    let mut id = [t; 16];
                    id[15] = i;
                    store.commit_receive(&[mark(EnvelopeId(id), NOW)]).unwrap();
                    let m = sent(
                        MessageId(id),
                        DeviceAddress {
                            identity: [t; 32],
                            device_id: 1,
                        },
                        b"x",
                        DeliveryState::Stored,
                        NOW,
                    );
                    store.update_sent(&m).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let c = raw(&dir.db());
    for table in ["processed", "sent"] {
        let n: i64 = c
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100, "{table}");
    }
}

/// Putting back an older copy of one row does not undo a Compromised mark:
/// the mark is kept twice (the peer row and the `compromised` meta row),
/// and either copy is enough. Only a rollback of both rows undoes it.
#[test]
fn a_compromised_mark_survives_one_rolled_back_row() {
    let dir = TempDir::new("compromised");
    let w = world(19);
    let a = w.peers[0].0;
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    let record = |trust| PeerRecord {
        address: a,
        trust,
        first_seen: NOW,
    };
    store.set_peer(&record(Trust::Unvalidated)).unwrap();
    let db = raw(&dir.db());
    let old_peer: (i64, i64, Vec<u8>) = db
        .query_row(
            "SELECT trust, first_seen, auth FROM peers WHERE identity = ?1",
            [&a.identity[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    store.set_peer(&record(Trust::Compromised)).unwrap();
    let trust = |store: &SqliteStore| {
        let one = store.peer(&a).unwrap().unwrap().trust;
        assert_eq!(
            store.peers_with_identity(&a.identity).unwrap()[0].trust,
            one
        );
        assert_eq!(store.peers().unwrap()[0].trust, one);
        one
    };
    assert_eq!(trust(&store), Trust::Compromised);

    // The peer row put back as it was (a valid, authenticated old copy).
    let put_back_peer = |db: &rusqlite::Connection| {
        db.execute(
            "UPDATE peers SET trust = ?1, first_seen = ?2, auth = ?3 WHERE identity = ?4",
            rusqlite::params![old_peer.0, old_peer.1, old_peer.2, &a.identity[..]],
        )
        .unwrap();
    };
    put_back_peer(&db);
    assert_eq!(trust(&store), Trust::Compromised, "undone by one row");
    assert!(store.corrupted_rows().unwrap().is_empty());

    // Or the meta row removed (its state before the mark): the peer row
    // still says Compromised.
    store.set_peer(&record(Trust::Compromised)).unwrap();
    let saved_meta: Vec<u8> = db
        .query_row(
            "SELECT value FROM meta WHERE name = 'compromised'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute("DELETE FROM meta WHERE name = 'compromised'", [])
        .unwrap();
    assert_eq!(trust(&store), Trust::Compromised, "undone by the meta row");

    // Both rows put back: that is a rollback of the store, which the
    // application must prevent or detect (SPEC 22.3).
    put_back_peer(&db);
    assert_eq!(trust(&store), Trust::Unvalidated);

    // An honest change of trust updates both copies.
    db.execute(
        "INSERT INTO meta (name, value) VALUES ('compromised', ?1)",
        [&saved_meta],
    )
    .unwrap();
    assert_eq!(trust(&store), Trust::Compromised);
    store.set_peer(&record(Trust::Validated)).unwrap();
    assert_eq!(trust(&store), Trust::Validated);
    // A moved or forged meta value does not open.
    db.execute(
        "UPDATE meta SET value = (SELECT value FROM meta WHERE name = 'key_check')
         WHERE name = 'compromised'",
        [],
    )
    .unwrap();
    assert!(matches!(
        store.peer(&a),
        Err(StoreError::Corrupted { table: "meta", .. })
    ));
}
