//! The key-value store (`KvStore`) over the in-memory backend (`MemoryKv`):
//! the conformance suite, atomicity under injected backend failures,
//! reopening (every list and record, in order), the key check, damaged
//! records, the format at rest (read back here with an independent
//! implementation of the documented format), no plaintext in the backend,
//! and two clients over it that restart and talk on.

use std::future::Future;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::protocol::devices::AccountId;
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::conformance;
use cubbyhole::storage::{
    AccessKeyRecord, AccountRecord, ContactRecord, DeliveryState, DepositDone, Failure,
    InboxMessage, KvBackend, KvKey, KvOp, KvStore, LocalIdentity, MemoryKv, MemoryStore, MessageId,
    OutboxEntry, PairingRecord, PeerAccess, PeerRecord, PrekeyState, ReceiveCommit, SentMessage,
    SessionEntry, SessionRecord, Store, StoreError, Trust,
};
use cubbyhole::transport::{AccessKey, DeviceAddress, Envelope, EnvelopeId};
use cubbyhole::{
    FreshnessPolicy, IdentityKeyPair, PrekeyBundle, PrekeyStore, Session, SessionConfig,
};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;

const NOW: u64 = 1_800_000_000;
const KEY: [u8; 32] = [0x4b; 32];

/// Awaits a store call that must succeed.
fn ok<T>(f: impl Future<Output = Result<T, StoreError>>) -> T {
    block_on(f).unwrap()
}

fn open(kv: &MemoryKv) -> KvStore<MemoryKv> {
    block_on(KvStore::open(kv.clone(), &KEY)).unwrap()
}

fn records(kv: &MemoryKv) -> Vec<(KvKey, Vec<u8>)> {
    block_on(kv.load()).unwrap()
}

#[test]
fn conformance_suite() {
    if let Err(violations) =
        conformance::try_run(|| block_on(KvStore::open(MemoryKv::new(), &KEY)).unwrap())
    {
        for v in &violations {
            eprintln!("{v}");
        }
        panic!("{} checks failed", violations.len());
    }
}

#[test]
fn conformance_suite_on_any_executor() {
    let result = block_on(conformance::try_run_async(|| {
        block_on(KvStore::open(MemoryKv::new(), &KEY)).unwrap()
    }));
    assert_eq!(result, Ok(()));
}

#[test]
fn every_commit_is_all_or_none_under_backend_failures() {
    let mut store = open(&MemoryKv::new());
    block_on(conformance::check_atomicity(&mut store, |s, n| {
        s.backend().fail_after(n)
    }))
    .unwrap();
}

#[test]
fn a_failed_write_changes_nothing_and_the_store_stays_usable() {
    let kv = MemoryKv::new();
    let mut store = open(&kv);
    let w = world(3);
    ok(store.set_identity(&w.me));
    let before = records(&kv);
    kv.fail_after(Some(0));
    let err = block_on(store.set_prekeys(&w.prekeys)).unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(ok(store.prekeys()).is_none());
    assert_eq!(records(&kv), before);
    kv.fail_after(None);
    ok(store.set_prekeys(&w.prekeys));
    assert_eq!(
        ok(store.prekeys()).unwrap().to_bytes(),
        w.prekeys.to_bytes()
    );
    assert_eq!(
        ok(open(&kv).prekeys()).unwrap().to_bytes(),
        w.prekeys.to_bytes()
    );
}

/// The futures of a store over a `Send` backend are `Send` (a client over
/// it can be spawned on a multi-threaded runtime).
#[test]
fn futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let mut store = open(&MemoryKv::new());
    let w = world(4);
    let f = store.set_identity(&w.me);
    send(&f);
    drop(f);
    let f = KvStore::open(MemoryKv::new(), &KEY);
    send(&f);
}

// A world of test data: an identity, prekeys, sessions with three peers.

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
    fn record(&mut self, i: usize) -> SessionRecord {
        let mut s = self.peers[i].1.clone();
        s.encrypt(&mut self.rng, b"more").unwrap();
        self.peers[i].1 = s.clone();
        SessionRecord::single(SessionEntry::new(s, 1, NOW))
    }
    fn two_sessions(&self, i: usize) -> SessionRecord {
        let (a, s) = &self.peers[i];
        let local = DeviceAddress::new(self.me.keys.public(), self.me.device_id);
        let mut r = SessionRecord::single(SessionEntry::new(self.extra[i].clone(), 4, NOW - 9));
        r.insert(SessionEntry::new(s.clone(), 5, NOW), 40, &local, a);
        r.supersede(&self.extra[i].id());
        r.entries_mut()[0].last_received = NOW - 1;
        r
    }
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

fn access(epoch: u32, byte: u8, inbox: bool) -> AccessKeyRecord {
    AccessKeyRecord {
        epoch,
        key: AccessKey::from_bytes([byte; 16]),
        inbox: inbox.then(|| ([byte ^ 0xff; 32], AccessKey::from_bytes([byte ^ 0x0f; 16]))),
    }
}

fn account(byte: u8, trust: Trust) -> AccountRecord {
    AccountRecord {
        account: AccountId([byte; 32]),
        head: vec![byte; 40],
        parent: (byte % 2 == 0).then(|| vec![byte ^ 1; 30]),
        trust,
        evidence: (trust == Trust::Compromised).then(|| (vec![1; 10], vec![2; 11])),
        updated_at: NOW + u64::from(byte),
    }
}

/// What the exercise used, to snapshot with.
struct Keys {
    addresses: Vec<DeviceAddress>,
    ids: Vec<EnvelopeId>,
    message_ids: Vec<MessageId>,
    ratchet_keys: Vec<[u8; 32]>,
    contacts: Vec<Vec<u8>>,
    accounts: Vec<AccountId>,
}

/// Drives a store through every write method (the sequence of the SQLite
/// store's test, with contacts, access keys, accounts and a pairing offer).
fn exercise<S: Store>(store: &mut S, w: &mut World) -> Keys {
    let ids: Vec<EnvelopeId> = (0..12).map(|_| w.id()).collect();
    let mut mids: Vec<MessageId> = (0..9).map(|_| w.message_id()).collect();
    mids[7] = MessageId([0; 16]);
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    let other = DeviceAddress {
        identity: a[0].identity,
        device_id: 77,
    };
    let gone = DeviceAddress {
        identity: a[2].identity,
        device_id: 78,
    };
    let mut ratchet_keys = Vec::new();
    let mut keep = |r: &SessionRecord| ratchet_keys.extend(r.ratchet_keys());

    ok(store.set_identity(&w.me));
    ok(store.set_prekeys(&w.prekeys));
    for (address, trust, first_seen) in [
        (a[0], Trust::Unvalidated, NOW),
        (a[0], Trust::Validated, NOW),
        (a[1], Trust::Compromised, u64::MAX),
        (other, Trust::Validated, 1 << 63),
        (a[2], Trust::Compromised, NOW),
        (a[2], Trust::Validated, NOW + 1),
    ] {
        ok(store.set_peer(&PeerRecord {
            address,
            trust,
            first_seen,
        }));
    }

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
        keep(&r);
        let entry = OutboxEntry {
            to: a[i],
            envelope: Envelope {
                id: ids[n],
                payload: vec![n as u8; 10 + n],
            },
            created: NOW + n as u64,
            message: sent.map(|m| m.id),
        };
        ok(store.commit_send(&r, &entry, sent));
    }
    let two = w.two_sessions(0);
    keep(&two);
    ok(store.commit_send(
        &two,
        &OutboxEntry {
            to: other,
            envelope: Envelope {
                id: ids[8],
                payload: vec![8; 3],
            },
            created: NOW,
            message: Some(MessageId([8; 16])),
        },
        None,
    ));
    // The first envelope again, replaced in place (same position,
    // before a later one).
    let r = w.record(2);
    keep(&r);
    ok(store.commit_send(
        &r,
        &OutboxEntry {
            to: a[2],
            envelope: Envelope {
                id: ids[0],
                payload: vec![0xee; 5],
            },
            created: NOW + 9,
            message: None,
        },
        None,
    ));
    ok(store.remove_outbox(&ids[1]));
    ok(store.remove_outbox(&w.id()));

    ok(store.update_sent(&SentMessage {
        state: DeliveryState::Deposited,
        ..s1.clone()
    }));
    let s2 = sent(mids[2], a[2], b"m2", DeliveryState::Stored, NOW + 3);
    ok(store.update_sent(&s2));
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
        ok(store.update_sent(m));
    }

    let r1 = w.record(1);
    keep(&r1);
    ok(store.set_session(&a[1], &r1));
    ok(store.quarantine_session(&a[1], NOW + 20, "did not decrypt"));
    ok(store.quarantine_session(&a[1], NOW + 21, "absent"));
    let r1 = w.record(1);
    keep(&r1);
    ok(store.set_session(&a[1], &r1));
    let r_gone = SessionRecord::single(SessionEntry::new(w.extra[2].clone(), 1, NOW));
    ok(store.set_session(&gone, &r_gone));
    ok(store.remove_session(&gone));
    ok(store.remove_session(&gone));
    ok(store.quarantine_session(&other, 1 << 63, ""));
    ok(store.set_session(&other, &two));

    // Access keys.
    ok(store.set_own_access_key(&access(1, 0x11, false)));
    ok(store.set_own_access_key(&access(2, 0x12, false)));
    ok(store.set_peer_access_key(&a[0], &access(3, 0x21, true)));
    ok(store.set_peer_excluded(&a[0], true));
    ok(store.set_peer_excluded(&a[1], true));
    ok(store.set_peer_excluded(&a[1], false));

    // The receive batch of the SQLite test, with access keys.
    let s2a = w.record(2);
    let s2b = w.record(2);
    keep(&s2a);
    keep(&s2b);
    let mut prekeys2 = w.prekeys.clone();
    prekeys2.upload_counter += 1;
    prekeys2.accepted.push((3, [0xae; 16]));
    let peer2 = PeerRecord {
        address: a[2],
        trust: Trust::Compromised,
        first_seen: NOW + 7,
    };
    let m3 = message(ids[3], a[2], b"first", NOW + 10);
    let m4 = message(ids[4], a[2], b"", NOW + 11);
    let m4dup = message(ids[4], a[2], b"dup body ignored", NOW + 12);
    let m5 = message(ids[5], a[1], &[0xff; 3000], 1 << 63);
    let m9 = message(ids[9], a[0], b"later", NOW + 13);
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
    let (k1, k2) = (access(4, 0x31, true), access(5, 0x32, false));
    let batch = [
        ReceiveCommit {
            session: Some((&a[2], &s2a)),
            prekeys: Some(&prekeys2),
            peer: Some(&peer2),
            message: Some(&m3),
            sent: Some(&delivered1),
            access: Some((&a[0], &k1)),
            ..mark(ids[3], NOW + 10)
        },
        ReceiveCommit {
            session: Some((&a[2], &s2b)),
            message: Some(&m4),
            sent: Some(&s5),
            access: Some((&a[2], &k2)),
            ..mark(ids[4], NOW + 11)
        },
        ReceiveCommit {
            message: Some(&m4dup),
            sent: Some(&failed2),
            ..mark(ids[6], NOW + 12)
        },
        ReceiveCommit {
            sent: Some(&s7),
            ..mark(ids[7], 3)
        },
        ReceiveCommit {
            message: Some(&m5),
            sent: Some(&s5_deposited),
            ..mark(ids[5], u64::MAX)
        },
    ];
    ok(store.commit_receive(&batch));
    ok(store.commit_receive(&[]));
    ok(store.commit_receive(&[ReceiveCommit {
        message: Some(&m9),
        ..mark(ids[9], NOW + 13)
    }]));
    w.prekeys = prekeys2;

    // A fan-out and its deposits.
    let copies: Vec<_> = [0usize, 1]
        .into_iter()
        .enumerate()
        .map(|(n, i)| {
            let r = w.record(i);
            let m = sent(mids[8 - n], a[i], b"fan", DeliveryState::Stored, NOW + 30);
            (
                r,
                OutboxEntry {
                    to: a[i],
                    envelope: Envelope {
                        id: ids[10 + n],
                        payload: vec![0xf0 + n as u8; 7],
                    },
                    created: NOW + 30,
                    message: Some(m.id),
                },
                Some(m),
            )
        })
        .collect();
    for (r, _, _) in &copies {
        keep(r);
    }
    ok(store.commit_send_many(&copies));
    ok(store.commit_deposits(&[
        DepositDone {
            envelope: ids[10],
            sent: Some(SentMessage {
                state: DeliveryState::Deposited,
                ..copies[0].2.clone().unwrap()
            }),
        },
        DepositDone {
            envelope: ids[2],
            sent: None,
        },
    ]));
    ok(store.commit_deposits(&[]));

    // Contacts, accounts, a pairing offer.
    let contacts = vec![b"zed".to_vec(), b"ann".to_vec(), Vec::new()];
    for (n, name) in contacts.iter().enumerate() {
        ok(store.set_contact(&ContactRecord {
            name: name.clone(),
            devices: a[..n + 1].to_vec(),
            previous: vec![[n as u8; 32]; n],
            changed_at: n as u64,
        }));
    }
    ok(store.set_contact(&ContactRecord {
        name: b"ann".to_vec(),
        devices: vec![other],
        previous: Vec::new(),
        changed_at: 99,
    }));
    ok(store.set_own_account(&account(1, Trust::Validated)));
    for (byte, trust) in [(9, Trust::Unvalidated), (4, Trust::Compromised)] {
        ok(store.set_account(&account(byte, trust)));
    }
    ok(store.set_account(&account(9, Trust::Validated)));
    ok(store.set_pairing(Some(&PairingRecord {
        code: [5; 16].into(),
        created_at: NOW,
        expires_at: NOW + 600,
    })));
    ok(store.set_pairing(None));
    ok(store.set_pairing(Some(&PairingRecord {
        code: [6; 16].into(),
        created_at: NOW + 1,
        expires_at: NOW + 601,
    })));

    ok(store.prune_processed(NOW));
    ok(store.prune_sent(NOW));
    ok(store.remove_inbox(&ids[3]));
    Keys {
        addresses: vec![a[0], a[1], a[2], other, gone],
        ids,
        message_ids: mids,
        ratchet_keys,
        contacts: contacts.into_iter().chain([b"nobody".to_vec()]).collect(),
        accounts: [1u8, 4, 9, 10].map(|b| AccountId([b; 32])).to_vec(),
    }
}

/// Everything observable through the trait, in comparable form (the
/// awaiting list in its exact order).
#[derive(Debug, PartialEq)]
struct Snapshot {
    identity: Option<([u8; 32], u32)>,
    prekeys: Option<Vec<u8>>,
    sessions: Vec<(DeviceAddress, Vec<u8>)>,
    session: Vec<Option<Vec<u8>>>,
    with_identity: Vec<Vec<DeviceAddress>>,
    routes: Vec<DeviceAddress>,
    awaiting: Vec<DeviceAddress>,
    quarantined: Vec<(DeviceAddress, u64, String, Vec<u8>)>,
    peer: Vec<Option<PeerRecord>>,
    peers: Vec<PeerRecord>,
    peers_with_identity: Vec<Vec<PeerRecord>>,
    outbox: Vec<OutboxEntry>,
    processed: Vec<bool>,
    inbox: Vec<InboxMessage>,
    sent: Vec<SentMessage>,
    pending: Vec<SentMessage>,
    last_pending: Vec<Option<MessageId>>,
    sent_by_id: Vec<Option<SentMessage>>,
    own_access: Option<AccessKeyRecord>,
    peer_access: Vec<PeerAccess>,
    contacts: Vec<ContactRecord>,
    contact: Vec<Option<ContactRecord>>,
    own_account: Option<AccountRecord>,
    accounts: Vec<AccountRecord>,
    account: Vec<Option<AccountRecord>>,
    pairing: Option<([u8; 16], u64, u64)>,
}

/// Asserts two snapshots are equal, naming the fields that differ.
fn assert_same(got: &Snapshot, want: &Snapshot, when: &str) {
    macro_rules! differing {
        ($($f:ident),*) => {{
            let mut d = Vec::new();
            $(if got.$f != want.$f { d.push(stringify!($f)); })*
            d
        }};
    }
    let d = differing!(
        identity,
        prekeys,
        sessions,
        session,
        with_identity,
        routes,
        awaiting,
        quarantined,
        peer,
        peers,
        peers_with_identity,
        outbox,
        processed,
        inbox,
        sent,
        pending,
        last_pending,
        sent_by_id,
        own_access,
        peer_access,
        contacts,
        contact,
        own_account,
        accounts,
        account,
        pairing
    );
    assert!(d.is_empty(), "{when}: differs in {d:?}");
    assert_eq!(got, want, "{when}");
}

fn snapshot<S: Store>(store: &S, k: &Keys) -> Snapshot {
    let bytes = |r: SessionRecord| r.to_bytes().to_vec();
    let mut routes = ok(store.route_ratchet_keys(&k.ratchet_keys));
    routes.sort_unstable();
    Snapshot {
        identity: ok(store.identity()).map(|i| (*i.keys.seed(), i.device_id)),
        prekeys: ok(store.prekeys()).map(|p| p.to_bytes().to_vec()),
        sessions: ok(store.sessions())
            .into_iter()
            .map(|(a, r)| (a, bytes(r.unwrap())))
            .collect(),
        session: k
            .addresses
            .iter()
            .map(|a| ok(store.session(a)).map(bytes))
            .collect(),
        with_identity: k
            .addresses
            .iter()
            .map(|a| {
                ok(store.sessions_with_identity(&a.identity))
                    .into_iter()
                    .map(|(a, r)| {
                        r.unwrap();
                        a
                    })
                    .collect()
            })
            .collect(),
        routes,
        awaiting: ok(store.awaiting_ratchet_key()),
        quarantined: ok(store.quarantined())
            .into_iter()
            .map(|q| (q.peer, q.at, q.reason, q.bytes.to_vec()))
            .collect(),
        peer: k.addresses.iter().map(|a| ok(store.peer(a))).collect(),
        peers: ok(store.peers()),
        peers_with_identity: k
            .addresses
            .iter()
            .map(|a| ok(store.peers_with_identity(&a.identity)))
            .collect(),
        outbox: ok(store.outbox()),
        processed: ok(store.processed_among(&k.ids)),
        inbox: ok(store.inbox()),
        sent: ok(store.sent_messages()),
        pending: ok(store.pending_sent()),
        last_pending: k
            .addresses
            .iter()
            .map(|a| ok(store.last_pending_to(a)))
            .collect(),
        sent_by_id: k
            .message_ids
            .iter()
            .map(|i| ok(store.sent_message(i)))
            .collect(),
        own_access: ok(store.own_access_key()),
        peer_access: k
            .addresses
            .iter()
            .map(|a| ok(store.peer_access(a)))
            .collect(),
        contacts: ok(store.contacts()),
        contact: k.contacts.iter().map(|n| ok(store.contact(n))).collect(),
        own_account: ok(store.own_account()),
        accounts: ok(store.accounts()),
        account: k.accounts.iter().map(|i| ok(store.account(i))).collect(),
        pairing: ok(store.pairing()).map(|p| (*p.code, p.created_at, p.expires_at)),
    }
}

#[test]
fn reopening_keeps_everything_in_order() {
    let mut reference = MemoryStore::new();
    let k = exercise(&mut reference, &mut world(11));
    let expected = snapshot(&reference, &k);

    let kv = MemoryKv::new();
    let mut store = open(&kv);
    let k2 = exercise(&mut store, &mut world(11));
    assert_eq!(k.ids, k2.ids);
    assert_same(&snapshot(&store, &k), &expected, "written");

    // The test would prove little if the lists were short or unordered.
    assert!(expected.awaiting.len() >= 3, "{:?}", expected.awaiting);
    assert!(expected.outbox.len() >= 3);
    assert!(expected.inbox.len() >= 3);
    assert!(expected.sent.len() >= 5);
    assert_eq!(expected.quarantined.len(), 2);
    assert!(expected.peers.iter().any(|p| p.trust == Trust::Compromised));
    assert!(expected.peer_access.iter().any(|p| p.excluded));
    assert!(expected.pairing.is_some() && expected.own_account.is_some());

    drop(store);
    let reopened = open(&kv);
    assert!(reopened.corrupted_records().is_empty());
    assert_same(&snapshot(&reopened, &k), &expected, "reopened");

    // And the reopened store writes on in the same order as the reference.
    let mut reopened = reopened;
    let mut w = world(12);
    let (a0, a1) = (k.addresses[0], k.addresses[1]);
    let r = w.record(0);
    for s in [&mut reopened as &mut dyn WriteOn, &mut reference] {
        s.write_on(&a1, &r);
    }
    let expected = snapshot(&reference, &k);
    assert_same(&snapshot(&reopened, &k), &expected, "reopened");
    assert_same(&snapshot(&open(&kv), &k), &expected, "reopened again");
    assert_eq!(expected.awaiting.first(), Some(&a1));
    assert_ne!(a0, a1);
}

/// The writes made after reopening, on either store.
trait WriteOn {
    fn write_on(&mut self, peer: &DeviceAddress, record: &SessionRecord);
}

impl<S: Store> WriteOn for S {
    fn write_on(&mut self, peer: &DeviceAddress, record: &SessionRecord) {
        ok(self.set_session(peer, record));
        ok(self.commit_send(
            record,
            &OutboxEntry {
                to: *peer,
                envelope: Envelope {
                    id: EnvelopeId([0x77; 16]),
                    payload: vec![1, 2],
                },
                created: NOW + 50,
                message: None,
            },
            Some(&sent(
                MessageId([0x78; 16]),
                *peer,
                b"after",
                DeliveryState::Stored,
                NOW + 50,
            )),
        ));
        ok(self.commit_receive(&[ReceiveCommit {
            message: Some(&message(EnvelopeId([0x79; 16]), *peer, b"in", NOW + 51)),
            ..mark(EnvelopeId([0x79; 16]), NOW + 51)
        }]));
    }
}

#[test]
fn an_empty_backend_gets_a_key_check_and_a_wrong_key_is_refused() {
    let kv = MemoryKv::new();
    let mut store = open(&kv);
    assert_eq!(kv.len(), 1, "only the key check record");
    ok(store.set_identity(&world(1).me));
    drop(store);
    let before = records(&kv);
    let err = block_on(KvStore::open(kv.clone(), &[0x4c; 32])).unwrap_err();
    assert!(matches!(err, StoreError::WrongKey), "{err:?}");
    assert_eq!(records(&kv), before, "a wrong key writes nothing");
    // The right key still opens it.
    assert!(ok(open(&kv).identity()).is_some());
}

#[test]
fn debug_prints_no_secret() {
    let kv = MemoryKv::new();
    let mut store = open(&kv);
    let w = world(2);
    ok(store.set_identity(&w.me));
    let shown = format!("{store:?} {kv:?}");
    let hex: String =
        w.me.keys
            .seed()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
    assert!(!shown.contains(&hex), "{shown}");
    assert!(!shown.contains(&format!("{:?}", KEY)), "{shown}");
    assert!(!shown.contains("75, 75, 75"), "{shown}");
}

/// `needle` nowhere in `hay`.
fn absent(hay: &[u8], needle: &[u8]) -> bool {
    !hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_backend_sees_no_plaintext() {
    let kv = MemoryKv::new();
    let mut store = open(&kv);
    let mut w = world(5);
    let k = exercise(&mut store, &mut w);
    let body = b"a message body nobody but the two devices may read".to_vec();
    let peer = k.addresses[1];
    ok(store.commit_receive(&[ReceiveCommit {
        message: Some(&message(EnvelopeId([0x55; 16]), peer, &body, NOW)),
        ..mark(EnvelopeId([0x55; 16]), NOW)
    }]));
    ok(store.update_sent(&sent(
        MessageId([0x56; 16]),
        peer,
        &body,
        DeliveryState::Stored,
        NOW,
    )));
    let session = ok(store.session(&k.addresses[0])).unwrap().to_bytes();
    let mut needles: Vec<Vec<u8>> = vec![
        w.me.keys.seed().to_vec(),
        w.me.keys.public().as_bytes().to_vec(),
        body.clone(),
        session[..64].to_vec(),
        w.prekeys.to_bytes()[..64].to_vec(),
        [0x21; 16].to_vec(), // a peer's access key
        [0x77; 16].to_vec(),
    ];
    needles.extend(k.addresses.iter().map(|a| a.identity.to_vec()));
    needles.extend(k.ids.iter().map(|i| i.0.to_vec()));
    let all = records(&kv);
    assert!(all.len() > 30, "{} records", all.len());
    for (key, value) in &all {
        for n in &needles {
            assert!(absent(key, n) && absent(value, n), "{n:02x?} at rest");
        }
        // Every value is nonce || ciphertext || tag.
        assert!(value.len() >= 12 + 16 + 12);
    }
    // The values the test sealed itself would show it (the scan can fail).
    let mut plain = body.clone();
    plain.extend_from_slice(&[0; 8]);
    assert!(!absent(&plain, &body));
}

// The format at rest, implemented here from the module's documentation.

mod at_rest {
    use super::*;

    pub const INBOX: u8 = 12;
    pub const SESSION: u8 = 3;
    pub const KEY_CHECK: u8 = 0;

    pub fn derived(key: &[u8; 32], info: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        Hkdf::<Sha256>::new(None, key)
            .expand(info, &mut out)
            .unwrap();
        out
    }

    pub fn name(key: &[u8; 32], kind: u8, record: &[u8]) -> KvKey {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&derived(key, b"cubbyhole/v1 kv store name"))
                .unwrap();
        mac.update(&[kind]);
        mac.update(record);
        mac.finalize().into_bytes().into()
    }

    fn cipher(key: &[u8; 32]) -> Aes256Gcm {
        Aes256Gcm::new(&derived(key, b"cubbyhole/v1 kv store seal").into())
    }

    pub fn seal(key: &[u8; 32], name: &KvKey, plain: &[u8]) -> Vec<u8> {
        let nonce = [0x5e; 12];
        let mut out = nonce.to_vec();
        out.extend(
            cipher(key)
                .encrypt(
                    Nonce::from_slice(&nonce),
                    aes_gcm::aead::Payload {
                        msg: plain,
                        aad: name,
                    },
                )
                .unwrap(),
        );
        out
    }

    pub fn open(key: &[u8; 32], name: &KvKey, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, rest) = sealed.split_at(12);
        cipher(key)
            .decrypt(
                Nonce::from_slice(nonce),
                aes_gcm::aead::Payload {
                    msg: rest,
                    aad: name,
                },
            )
            .ok()
    }

    pub fn plaintext(kind: u8, record: &[u8], seq: u64, body: &[u8]) -> Vec<u8> {
        let mut out = vec![1, kind];
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(record.len() as u16).to_be_bytes());
        out.extend_from_slice(record);
        out.extend_from_slice(body);
        out
    }

    pub fn address(a: &DeviceAddress) -> Vec<u8> {
        let mut out = a.identity.to_vec();
        out.extend_from_slice(&a.device_id.to_be_bytes());
        out
    }
}

#[test]
fn records_at_rest_are_as_documented() {
    let kv = MemoryKv::new();
    let mut store = open(&kv);
    let w = world(6);
    let from = w.peers[0].0;
    let id = EnvelopeId([0xab; 16]);
    ok(store.commit_receive(&[ReceiveCommit {
        message: Some(&message(id, from, b"body", NOW + 3)),
        ..mark(id, NOW)
    }]));
    let all = records(&kv);
    let name = at_rest::name(&KEY, at_rest::INBOX, &id.0);
    let (_, sealed) = all
        .iter()
        .find(|(k, _)| *k == name)
        .expect("the inbox record");
    let plain = at_rest::open(&KEY, &name, sealed).expect("opens under the documented keys");
    assert_eq!(plain[..2], [1, at_rest::INBOX]);
    let seq = u64::from_be_bytes(plain[2..10].try_into().unwrap());
    let mut body = at_rest::address(&from);
    body.extend_from_slice(&(NOW + 3).to_be_bytes());
    body.extend_from_slice(b"body");
    assert_eq!(plain, at_rest::plaintext(at_rest::INBOX, &id.0, seq, &body));
    // Moved to another key, it does not open.
    let elsewhere = at_rest::name(&KEY, at_rest::INBOX, &[0xac; 16]);
    assert!(at_rest::open(&KEY, &elsewhere, sealed).is_none());
    // The key check record.
    let check = at_rest::name(&KEY, at_rest::KEY_CHECK, &[]);
    let (_, sealed) = all.iter().find(|(k, _)| *k == check).expect("key check");
    let plain = at_rest::open(&KEY, &check, sealed).unwrap();
    let mut value = b"cubbyhole kv store key check v1".to_vec();
    value.extend_from_slice(&1u32.to_be_bytes());
    assert_eq!(
        plain,
        at_rest::plaintext(at_rest::KEY_CHECK, &[], 0, &value)
    );
}

#[test]
fn a_newer_schema_is_refused() {
    let kv = MemoryKv::new();
    drop(open(&kv));
    let check = at_rest::name(&KEY, at_rest::KEY_CHECK, &[]);
    let mut value = b"cubbyhole kv store key check v1".to_vec();
    value.extend_from_slice(&2u32.to_be_bytes());
    let plain = at_rest::plaintext(at_rest::KEY_CHECK, &[], 0, &value);
    ok(kv.write(&[KvOp::Put {
        key: check,
        value: at_rest::seal(&KEY, &check, &plain),
    }]));
    let err = block_on(KvStore::open(kv.clone(), &KEY)).unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedSchema(2)), "{err:?}");
    // A cut key check record is damage, not a wrong key.
    ok(kv.write(&[KvOp::Put {
        key: check,
        value: vec![0; 20],
    }]));
    let err = block_on(KvStore::open(kv.clone(), &KEY)).unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupted { table: "meta", .. }),
        "{err:?}"
    );
}

/// A store with sessions with three peers (and their peer records),
/// an outbox entry and an inbox message.
fn three_sessions(kv: &MemoryKv, w: &mut World) -> Vec<DeviceAddress> {
    let mut store = open(kv);
    ok(store.set_identity(&w.me));
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    for (i, address) in a.iter().enumerate() {
        ok(store.set_peer(&PeerRecord {
            address: *address,
            trust: Trust::Unvalidated,
            first_seen: NOW,
        }));
        let r = w.record(i);
        ok(store.set_session(address, &r));
    }
    ok(store.commit_send(
        &w.record(2),
        &OutboxEntry {
            to: a[2],
            envelope: Envelope {
                id: EnvelopeId([0x0b; 16]),
                payload: vec![3; 9],
            },
            created: NOW,
            message: None,
        },
        None,
    ));
    ok(store.commit_receive(&[ReceiveCommit {
        message: Some(&message(EnvelopeId([0x1b; 16]), a[1], b"hi", NOW)),
        ..mark(EnvelopeId([0x1b; 16]), NOW)
    }]));
    a
}

fn flip_last_byte(kv: &MemoryKv, name: &KvKey) -> Vec<u8> {
    let (_, mut value) = records(kv).into_iter().find(|(k, _)| k == name).unwrap();
    *value.last_mut().unwrap() ^= 1;
    ok(kv.write(&[KvOp::Put {
        key: *name,
        value: value.clone(),
    }]));
    value
}

fn assert_corrupted(e: &StoreError, want_table: &str, want_row: &str) {
    match e {
        StoreError::Corrupted { table, row, .. } => {
            assert_eq!((*table, row.as_str()), (want_table, want_row), "{e}")
        }
        other => panic!("expected Corrupted, got {other:?}"),
    }
}

fn row_name(a: &DeviceAddress) -> String {
    let hex: String = a.identity.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}/{}", a.device_id)
}

#[test]
fn an_altered_session_record_is_an_error_for_it_alone_and_is_quarantined() {
    let kv = MemoryKv::new();
    let mut w = world(7);
    let a = three_sessions(&kv, &mut w);
    let name = at_rest::name(&KEY, at_rest::SESSION, &at_rest::address(&a[1]));
    let altered = flip_last_byte(&kv, &name);

    let mut store = open(&kv);
    let found = store.corrupted_records();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_corrupted(&found[0], "sessions", &row_name(&a[1]));
    assert_corrupted(
        &block_on(store.session(&a[1])).unwrap_err(),
        "sessions",
        &row_name(&a[1]),
    );
    assert!(ok(store.session(&a[0])).is_some());
    assert!(ok(store.session(&a[2])).is_some());
    let sessions = ok(store.sessions());
    let mut want = a.clone();
    want.sort();
    assert_eq!(sessions.iter().map(|(a, _)| *a).collect::<Vec<_>>(), want);
    for (address, r) in &sessions {
        assert_eq!(r.is_err(), *address == a[1], "{address:?}");
    }
    // Routing finds it, so that a receive needing it quarantines it.
    assert!(ok(store.route_ratchet_keys(&[[0; 32]])).contains(&a[1]));
    assert_eq!(ok(store.awaiting_ratchet_key()).first(), Some(&a[1]));
    // The other lists are unharmed.
    assert_eq!(ok(store.outbox()).len(), 1);
    assert_eq!(ok(store.inbox()).len(), 1);
    assert_eq!(ok(store.peers()).len(), 3);

    ok(store.quarantine_session(&a[1], NOW + 5, "altered"));
    let q = ok(store.quarantined());
    assert_eq!(q.len(), 1);
    assert_eq!((q[0].peer, q[0].at), (a[1], NOW + 5));
    assert_eq!(&q[0].bytes[..], &altered[..], "the bytes as found");
    assert!(store.corrupted_records().is_empty());
    assert!(ok(store.sessions()).iter().all(|(_, r)| r.is_ok()));

    let reopened = open(&kv);
    assert!(reopened.corrupted_records().is_empty());
    assert_eq!(ok(reopened.sessions()).len(), 2);
    assert_eq!(&ok(reopened.quarantined())[0].bytes[..], &altered[..]);
}

#[test]
fn a_record_that_opens_but_does_not_decode_is_named_and_can_be_removed() {
    let kv = MemoryKv::new();
    let mut w = world(8);
    let a = three_sessions(&kv, &mut w);
    let id = EnvelopeId([0xcd; 16]);
    let name = at_rest::name(&KEY, at_rest::INBOX, &id.0);
    let plain = at_rest::plaintext(at_rest::INBOX, &id.0, 1000, b"cut");
    ok(kv.write(&[KvOp::Put {
        key: name,
        value: at_rest::seal(&KEY, &name, &plain),
    }]));

    let mut store = open(&kv);
    let hex: String = id.0.iter().map(|b| format!("{b:02x}")).collect();
    assert_corrupted(&block_on(store.inbox()).unwrap_err(), "inbox", &hex);
    // Nothing else is harmed.
    assert_eq!(ok(store.sessions()).len(), 3);
    assert!(ok(store.sessions()).iter().all(|(_, r)| r.is_ok()));
    assert_eq!(ok(store.outbox()).len(), 1);
    assert!(ok(store.session(&a[0])).is_some());
    assert_eq!(store.corrupted_records().len(), 1);
    // Removing it is the recovery.
    ok(store.remove_inbox(&id));
    assert_eq!(ok(store.inbox()).len(), 1);
    assert!(store.corrupted_records().is_empty());
    assert!(open(&kv).corrupted_records().is_empty());
}

#[test]
fn an_unrecognisable_record_is_set_aside_and_can_be_discarded() {
    let kv = MemoryKv::new();
    let mut w = world(9);
    three_sessions(&kv, &mut w);
    let id = EnvelopeId([0x1b; 16]);
    let name = at_rest::name(&KEY, at_rest::INBOX, &id.0);
    flip_last_byte(&kv, &name);
    ok(kv.write(&[KvOp::Put {
        key: [0xee; 32],
        value: vec![1; 3],
    }]));
    let before = kv.len();

    let mut store = open(&kv);
    let found = store.corrupted_records();
    assert_eq!(found.len(), 2, "{found:?}");
    for e in &found {
        assert!(
            matches!(
                e,
                StoreError::Corrupted {
                    table: "unknown",
                    ..
                }
            ),
            "{e:?}"
        );
    }
    // Indistinguishable from a deleted record: the inbox is empty.
    assert!(ok(store.inbox()).is_empty());
    assert_eq!(ok(store.sessions()).len(), 3);
    assert_eq!(ok(store.discard_unreadable()), 2);
    assert_eq!(kv.len(), before - 2);
    assert!(store.corrupted_records().is_empty());
    assert!(open(&kv).corrupted_records().is_empty());
}

#[test]
fn a_rolled_back_peer_record_keeps_its_compromised_mark() {
    let kv = MemoryKv::new();
    let mut store = open(&kv);
    let w = world(10);
    let a = w.peers[0].0;
    let p = |trust| PeerRecord {
        address: a,
        trust,
        first_seen: NOW,
    };
    ok(store.set_peer(&p(Trust::Unvalidated)));
    let name = at_rest::name(&KEY, 5, &at_rest::address(&a));
    let (_, old) = records(&kv).into_iter().find(|(k, _)| *k == name).unwrap();
    ok(store.set_peer(&p(Trust::Compromised)));
    // The backend puts the older peer record back.
    ok(kv.write(&[KvOp::Put {
        key: name,
        value: old,
    }]));
    let store = open(&kv);
    assert_eq!(ok(store.peer(&a)).unwrap().trust, Trust::Compromised);
}

// Two clients over KvStores.

type KvClient = Client<
    KvStore<MemoryKv>,
    InProcessRelay<MemoryRelayStorage>,
    InProcessRelay<MemoryRelayStorage>,
>;

struct Net {
    relay: InProcessRelay<MemoryRelayStorage>,
    clock: Arc<Mutex<u64>>,
    rng: ChaCha20Rng,
}

impl Net {
    fn now(&self) -> u64 {
        *self.clock.lock().unwrap()
    }
    fn device(&mut self, kv: &MemoryKv, key: &[u8; 32]) -> KvClient {
        let store = block_on(KvStore::open(kv.clone(), key)).unwrap();
        let mut c = block_on(Client::open(
            store,
            self.relay.clone(),
            self.relay.clone(),
            ClientConfig::default(),
            &mut self.rng,
        ))
        .unwrap();
        let now = self.now();
        block_on(c.maintain_prekeys(&mut self.rng, now)).unwrap();
        c
    }
    fn send(&mut self, from: &mut KvClient, to: &DeviceAddress, body: &[u8]) {
        let now = self.now();
        let sent = block_on(from.send(&mut self.rng, to, body, now)).unwrap();
        assert!(sent.deposited);
    }
    fn receive(&mut self, c: &mut KvClient) -> usize {
        *self.clock.lock().unwrap() += 10;
        let now = self.now();
        block_on(c.receive(&mut self.rng, now)).unwrap().received
    }
}

fn take_all(c: &mut KvClient) -> Vec<Vec<u8>> {
    let msgs = block_on(c.inbox()).unwrap();
    for m in &msgs {
        block_on(c.remove_from_inbox(&m.envelope_id)).unwrap();
    }
    msgs.into_iter().map(|m| m.body).collect()
}

#[test]
fn two_clients_talk_restart_from_their_backends_and_talk_on() {
    let clock = Arc::new(Mutex::new(NOW));
    let c = clock.clone();
    let relay = InProcessRelay::with_clock(
        Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
        Arc::new(move || *c.lock().unwrap()),
    );
    let mut net = Net {
        relay,
        clock,
        rng: ChaCha20Rng::seed_from_u64(21),
    };
    let (alice_kv, bob_kv) = (MemoryKv::new(), MemoryKv::new());
    let (alice_key, bob_key) = ([0xa1; 32], [0xb0; 32]);
    let mut alice = net.device(&alice_kv, &alice_key);
    let mut bob = net.device(&bob_kv, &bob_key);
    let (alice_at, bob_at) = (alice.address(), bob.address());

    for i in 0..3u8 {
        net.send(&mut alice, &bob_at, &[b'a', i]);
    }
    assert_eq!(net.receive(&mut bob), 3);
    assert_eq!(
        take_all(&mut bob),
        (0..3u8).map(|i| vec![b'a', i]).collect::<Vec<_>>()
    );
    net.send(&mut bob, &alice_at, b"reply");
    assert_eq!(net.receive(&mut alice), 1);
    assert_eq!(take_all(&mut alice), vec![b"reply".to_vec()]);
    // One message left unread in Bob's inbox across the restart.
    net.send(&mut alice, &bob_at, b"unread");
    assert_eq!(net.receive(&mut bob), 1);

    // Both restart from their backends.
    drop((alice, bob));
    let mut alice = net.device(&alice_kv, &alice_key);
    let mut bob = net.device(&bob_kv, &bob_key);
    assert_eq!((alice.address(), bob.address()), (alice_at, bob_at));
    assert_eq!(take_all(&mut bob), vec![b"unread".to_vec()]);
    for round in 0..3u8 {
        net.send(&mut alice, &bob_at, &[round]);
        assert_eq!(net.receive(&mut bob), 1);
        assert_eq!(take_all(&mut bob), vec![vec![round]]);
        net.send(&mut bob, &alice_at, &[round, round]);
        assert_eq!(net.receive(&mut alice), 1);
        assert_eq!(take_all(&mut alice), vec![vec![round, round]]);
    }
    // Receipts came back: nothing Alice sent is pending any more.
    let pending = ok(alice.store().pending_sent());
    assert!(pending.is_empty(), "{pending:?}");
    assert!(alice.store().corrupted_records().is_empty());
    // Nothing of the conversation is in the clear in the backends.
    for kv in [&alice_kv, &bob_kv] {
        for (_, value) in records(kv) {
            assert!(absent(&value, b"unread") && absent(&value, b"reply"));
        }
    }
}
