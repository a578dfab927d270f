#![cfg(feature = "sqlite")]
//! The SQLite store: round trips against the in-memory reference, reopening
//! from disk, the key check, encryption at rest (corrupted and moved rows),
//! atomic batches, schema versions and concurrent writers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use cubbyhole::storage::{
    InboxMessage, LocalIdentity, MemoryStore, OutboxEntry, PeerRecord, PrekeyState, ReceiveCommit,
    SqliteStore, Store, StoreError, Trust,
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

/// Real protocol objects: our identity and prekeys, and sessions with three
/// peer devices.
struct World {
    rng: ChaCha20Rng,
    me: LocalIdentity,
    prekeys: PrekeyState,
    peers: Vec<(DeviceAddress, Session)>,
}

fn world(seed: u64) -> World {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let me = IdentityKeyPair::generate(&mut rng);
    let mut my_prekeys = PrekeyStore::new(&mut rng, &me, NOW);
    my_prekeys.generate_one_time_prekeys(&mut rng, 5);
    let prekeys = PrekeyState {
        prekeys: my_prekeys,
        upload_counter: 3,
        last_rotation: NOW - 100,
        retired_at: vec![(7, NOW - 50)],
        one_time_retired: vec![(3, NOW - 40)],
        upload_pending: true,
    };
    let mut peers = Vec::new();
    for device_id in 1..=3 {
        let them = IdentityKeyPair::generate(&mut rng);
        let mut theirs = PrekeyStore::new(&mut rng, &them, NOW);
        theirs.generate_one_time_prekeys(&mut rng, 1);
        let bundle = PrekeyBundle::decode(&theirs.bundle(&them).encode())
            .unwrap()
            .verify(NOW, FreshnessPolicy::default())
            .unwrap();
        let mut s = Session::initiate(&mut rng, &me, &bundle, SessionConfig::default()).unwrap();
        s.encrypt(&mut rng, b"hello").unwrap();
        peers.push((DeviceAddress::new(them.public(), device_id), s));
    }
    World {
        rng,
        me: LocalIdentity {
            keys: me,
            device_id: 9,
        },
        prekeys,
        peers,
    }
}

impl World {
    fn id(&mut self) -> EnvelopeId {
        let mut id = [0u8; 16];
        self.rng.fill_bytes(&mut id);
        EnvelopeId(id)
    }
    /// The session with peer `i`, advanced by one message.
    fn advance(&mut self, i: usize) -> Session {
        let mut s = self.peers[i].1.clone();
        s.encrypt(&mut self.rng, b"more").unwrap();
        self.peers[i].1 = s.clone();
        s
    }
}

fn bytes(s: &Session) -> Vec<u8> {
    s.to_bytes().to_vec()
}

fn message(id: EnvelopeId, from: DeviceAddress, body: &[u8], at: u64) -> InboxMessage {
    InboxMessage {
        envelope_id: id,
        from,
        body: body.to_vec(),
        received_at: at,
    }
}

/// Everything observable through the trait, in comparable form.
#[derive(Debug, PartialEq)]
struct Snapshot {
    identity: Option<([u8; 32], u32)>,
    prekeys: Option<Vec<u8>>,
    sessions: Vec<(DeviceAddress, Vec<u8>)>,
    peers: Vec<Option<PeerRecord>>,
    outbox: Vec<OutboxEntry>,
    processed: Vec<bool>,
    inbox: Vec<InboxMessage>,
}

fn snapshot(store: &impl Store, addresses: &[DeviceAddress], ids: &[EnvelopeId]) -> Snapshot {
    let sessions: Vec<_> = store
        .sessions()
        .unwrap()
        .iter()
        .map(|(a, s)| (*a, bytes(s)))
        .collect();
    for (a, s) in &sessions {
        assert_eq!(&bytes(&store.session(a).unwrap().unwrap()), s);
    }
    Snapshot {
        identity: store
            .identity()
            .unwrap()
            .map(|i| (*i.keys.seed(), i.device_id)),
        prekeys: store.prekeys().unwrap().map(|p| p.to_bytes().to_vec()),
        sessions,
        peers: addresses.iter().map(|a| store.peer(a).unwrap()).collect(),
        outbox: store.outbox().unwrap(),
        processed: ids.iter().map(|i| store.is_processed(i).unwrap()).collect(),
        inbox: store.inbox().unwrap(),
    }
}

/// Drives a store through every method; returns what to snapshot with.
fn exercise(store: &mut impl Store, w: &mut World) -> (Vec<DeviceAddress>, Vec<EnvelopeId>) {
    let ids: Vec<EnvelopeId> = (0..8).map(|_| w.id()).collect();
    let a: Vec<DeviceAddress> = w.peers.iter().map(|p| p.0).collect();
    assert!(store.identity().unwrap().is_none());
    assert!(store.prekeys().unwrap().is_none());
    assert!(store.session(&a[0]).unwrap().is_none());
    assert!(store.peer(&a[0]).unwrap().is_none());

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

    // Three sends (one re-committing the session with the same peer).
    for (n, i) in [0usize, 1, 0].into_iter().enumerate() {
        let s = w.advance(i);
        let entry = OutboxEntry {
            to: a[i],
            envelope: Envelope {
                id: ids[n],
                payload: vec![n as u8; 10 + n],
            },
            created: NOW + n as u64,
        };
        store.commit_send(&s, &entry).unwrap();
    }
    store.remove_outbox(&ids[1]).unwrap();
    store.remove_outbox(&w.id()).unwrap();

    // A receive batch: two messages from peer 2, one duplicate message id,
    // a consumed one-time prekey, a new peer, and a mark without a message.
    let s2a = w.advance(2);
    let s2b = w.advance(2);
    let mut prekeys2 = w.prekeys.clone();
    prekeys2.upload_counter += 1;
    let peer2 = PeerRecord {
        address: a[2],
        trust: Trust::Unvalidated,
        first_seen: NOW + 7,
    };
    let m3 = message(ids[3], a[2], b"first", NOW + 10);
    let m4 = message(ids[4], a[2], b"", NOW + 11);
    let m4dup = message(ids[4], a[2], b"dup body ignored", NOW + 12);
    let m5 = message(ids[5], a[1], &[0xff; 3000], 1 << 63);
    let batch = [
        ReceiveCommit {
            envelope_id: ids[3],
            processed_at: NOW + 10,
            session: Some((&a[2], &s2a)),
            prekeys: Some(&prekeys2),
            peer: Some(&peer2),
            message: Some(&m3),
        },
        ReceiveCommit {
            envelope_id: ids[4],
            processed_at: NOW + 11,
            session: Some((&a[2], &s2b)),
            prekeys: None,
            peer: None,
            message: Some(&m4),
        },
        ReceiveCommit {
            envelope_id: ids[6],
            processed_at: NOW + 12,
            session: None,
            prekeys: None,
            peer: None,
            message: Some(&m4dup),
        },
        ReceiveCommit {
            envelope_id: ids[7],
            processed_at: 3,
            session: None,
            prekeys: None,
            peer: None,
            message: None,
        },
        ReceiveCommit {
            envelope_id: ids[5],
            processed_at: u64::MAX,
            session: None,
            prekeys: None,
            peer: None,
            message: Some(&m5),
        },
    ];
    store.commit_receive(&batch).unwrap();
    store.commit_receive(&[]).unwrap();
    w.prekeys = prekeys2;

    // Prune: only the mark at time 3 is older than NOW.
    store.prune_processed(NOW).unwrap();
    store.remove_inbox(&ids[3]).unwrap();
    (a, ids)
}

#[test]
fn round_trips_like_the_memory_store() {
    let mut w = world(1);
    let mut memory = MemoryStore::new();
    let (a, ids) = exercise(&mut memory, &mut w);
    let expected = snapshot(&memory, &a, &ids);

    let mut w = world(1);
    let mut sqlite = SqliteStore::open_in_memory(&KEY).unwrap();
    exercise(&mut sqlite, &mut w);
    let got = snapshot(&sqlite, &a, &ids);
    assert_eq!(got, expected);

    // Spot checks of the reference semantics.
    assert_eq!(got.identity.unwrap().0, *w.me.keys.seed());
    assert_eq!(got.prekeys.unwrap(), w.prekeys.to_bytes().to_vec());
    assert_eq!(got.sessions.len(), 3);
    assert_eq!(
        got.outbox.iter().map(|e| e.envelope.id).collect::<Vec<_>>(),
        [ids[0], ids[2]],
        "outbox: commit order, removed entry gone"
    );
    assert_eq!(
        got.processed,
        [false, false, false, true, true, true, true, false]
    );
    let inbox: Vec<_> = got.inbox.iter().map(|m| m.envelope_id).collect();
    assert_eq!(inbox, [ids[4], ids[5]], "receive order, duplicate ignored");
    assert!(got.inbox[0].body.is_empty());
    assert_eq!(got.peers[1].as_ref().unwrap().first_seen, u64::MAX);
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
    let batch: Vec<ReceiveCommit<'_>> = ids
        .iter()
        .zip(times)
        .map(|(id, t)| ReceiveCommit {
            envelope_id: *id,
            processed_at: t,
            session: None,
            prekeys: None,
            peer: None,
            message: None,
        })
        .collect();
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
    let (a, ids, before) = {
        let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
        let (a, ids) = exercise(&mut store, &mut w);
        let snap = snapshot(&store, &a, &ids);
        (a, ids, snap)
    };
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_eq!(snapshot(&store, &a, &ids), before);
    assert!(store.corrupted_rows().unwrap().is_empty());

    // A second handle on the same file sees the same (WAL: both open).
    let other = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_eq!(snapshot(&other, &a, &ids), before);

    let c = raw(&dir.db());
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: u32 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SqliteStore::SCHEMA_VERSION);
}

#[test]
fn secrets_are_not_on_disk_in_the_clear() {
    let dir = TempDir::new("at-rest");
    let mut w = world(4);
    let marker = b"a very recognisable message body".to_vec();
    {
        let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
        store.set_identity(&w.me).unwrap();
        store.set_prekeys(&w.prekeys).unwrap();
        let (a, s) = w.peers[0].clone();
        let id = w.id();
        let m = message(id, a, &marker, NOW);
        store
            .commit_receive(&[ReceiveCommit {
                envelope_id: id,
                processed_at: NOW,
                session: Some((&a, &s)),
                prekeys: None,
                peer: None,
                message: Some(&m),
            }])
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
    let otk = w.prekeys.prekeys.one_time_prekeys().next().unwrap();
    assert!(!contains(&otk.secret_bytes()[..]), "prekey secret leaked");
    let state = w.peers[0].1.to_bytes();
    assert!(
        !state.chunks(32).any(|c| c.len() == 32 && contains(c)),
        "session state leaked"
    );
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
    let entry = OutboxEntry {
        to: a,
        envelope: Envelope {
            id: w.id(),
            payload: vec![1],
        },
        created: NOW,
    };
    {
        let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
        store.commit_send(&s, &entry).unwrap();
        // No identity yet: the session cannot be restored.
        assert_corrupted(store.session(&a).unwrap_err(), "sessions", &row_name(&a));
        store.set_identity(&w.me).unwrap();
        assert_eq!(bytes(&store.session(&a).unwrap().unwrap()), bytes(&s));
    }
    // Reopened, the store reads its identity when it first needs it.
    let store = SqliteStore::open(dir.db(), &KEY).unwrap();
    let restored = store.session(&a).unwrap().unwrap();
    assert_eq!(bytes(&restored), bytes(&s));
    assert_eq!(restored.local_identity(), w.me.keys.public());
    assert_eq!(restored.remote_identity().as_bytes(), &a.identity);
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

/// Stores sessions with all three peers, closes the store.
fn three_sessions(dir: &TempDir, w: &mut World) {
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    store.set_identity(&w.me).unwrap();
    for i in 0..3 {
        let s = w.peers[i].1.clone();
        let entry = OutboxEntry {
            to: w.peers[i].0,
            envelope: Envelope {
                id: w.id(),
                payload: vec![1, 2, 3],
            },
            created: NOW,
        };
        store.commit_send(&s, &entry).unwrap();
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

#[test]
fn a_corrupted_session_row_is_named_and_spares_the_others() {
    let dir = TempDir::new("corrupt");
    let mut w = world(6);
    three_sessions(&dir, &mut w);
    let (bad, good) = (w.peers[0].0, w.peers[1].0);
    {
        let c = raw(&dir.db());
        let mut state: Vec<u8> = c
            .query_row(
                "SELECT state FROM sessions WHERE identity = ?1 AND device_id = ?2",
                rusqlite::params![&bad.identity[..], bad.device_id],
                |r| r.get(0),
            )
            .unwrap();
        let mid = state.len() / 2;
        state[mid] ^= 0x01;
        c.execute(
            "UPDATE sessions SET state = ?1 WHERE identity = ?2 AND device_id = ?3",
            rusqlite::params![state, &bad.identity[..], bad.device_id],
        )
        .unwrap();
    }
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    assert_corrupted(
        store.session(&bad).unwrap_err(),
        "sessions",
        &row_name(&bad),
    );
    assert_eq!(
        bytes(&store.session(&good).unwrap().unwrap()),
        bytes(&w.peers[1].1),
        "a healthy row still loads"
    );
    assert_corrupted(store.sessions().unwrap_err(), "sessions", &row_name(&bad));
    assert_eq!(store.session_addresses().unwrap().len(), 3);
    let found = store.corrupted_rows().unwrap();
    assert_eq!(found.len(), 1);
    assert_corrupted(
        found.into_iter().next().unwrap(),
        "sessions",
        &row_name(&bad),
    );
    assert_eq!(store.outbox().unwrap().len(), 3, "other tables unaffected");

    // Recovery: drop the row (or overwrite it with a new session).
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
    let s = w.peers[1].1.clone();
    let entry = OutboxEntry {
        to: good,
        envelope: Envelope {
            id: w.id(),
            payload: vec![],
        },
        created: NOW,
    };
    store.commit_send(&s, &entry).unwrap();
    assert_eq!(bytes(&store.session(&good).unwrap().unwrap()), bytes(&s));
}

#[test]
fn a_value_moved_to_another_row_or_table_fails() {
    let dir = TempDir::new("moved");
    let mut w = world(7);
    three_sessions(&dir, &mut w);
    let (a0, a1, a2) = (w.peers[0].0, w.peers[1].0, w.peers[2].0);
    let inbox_id = w.id();
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
                envelope_id: inbox_id,
                processed_at: NOW,
                session: None,
                prekeys: None,
                peer: None,
                message: Some(&m),
            }])
            .unwrap();
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
    // A session state copied into an inbox body.
    c.execute(
        "UPDATE inbox SET body = (SELECT state FROM sessions WHERE identity = ?1)",
        [&a2.identity[..]],
    )
    .unwrap();
    // A compromised peer turned validated.
    c.execute("UPDATE peers SET trust = 1", []).unwrap();

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
    assert_eq!(store.corrupted_rows().unwrap().len(), 4);

    // A sender rewritten on an inbox message is caught as well.
    store.remove_inbox(&inbox_id).unwrap();
    let id = w.id();
    let m = message(id, a0, b"from a0", NOW);
    store
        .commit_receive(&[ReceiveCommit {
            envelope_id: id,
            processed_at: NOW,
            session: None,
            prekeys: None,
            peer: None,
            message: Some(&m),
        }])
        .unwrap();
    assert_eq!(store.inbox().unwrap(), [m]);
    c.execute("UPDATE inbox SET from_device = from_device + 1", [])
        .unwrap();
    assert_corrupted(store.inbox().unwrap_err(), "inbox", &hex::encode(id.0));
}

#[test]
fn commit_receive_is_all_or_nothing() {
    let dir = TempDir::new("atomic");
    let mut w = world(8);
    let a = w.peers[0].0;
    let before = w.peers[0].1.clone();
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    store.set_identity(&w.me).unwrap();
    store.set_prekeys(&w.prekeys).unwrap();
    let entry = OutboxEntry {
        to: a,
        envelope: Envelope {
            id: w.id(),
            payload: vec![7],
        },
        created: NOW,
    };
    store.commit_send(&before, &entry).unwrap();

    let ids: Vec<EnvelopeId> = (0..3).map(|_| w.id()).collect();
    let sessions: Vec<Session> = (0..3).map(|_| w.advance(0)).collect();
    let messages: Vec<InboxMessage> = ids.iter().map(|id| message(*id, a, b"body", NOW)).collect();
    let mut prekeys = w.prekeys.clone();
    prekeys.upload_counter = 99;
    let peer = PeerRecord {
        address: a,
        trust: Trust::Unvalidated,
        first_seen: NOW,
    };
    let batch: Vec<ReceiveCommit<'_>> = (0..3)
        .map(|i| ReceiveCommit {
            envelope_id: ids[i],
            processed_at: NOW,
            session: Some((&a, &sessions[i])),
            prekeys: (i == 0).then_some(&prekeys),
            peer: (i == 1).then_some(&peer),
            message: Some(&messages[i]),
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
        assert_eq!(store.prekeys().unwrap().unwrap().upload_counter, 3);
        assert!(store.peer(&a).unwrap().is_none());
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
        bytes(&sessions[2])
    );
    assert_eq!(store.prekeys().unwrap().unwrap().upload_counter, 99);
    assert_eq!(store.peer(&a).unwrap(), Some(peer));
}

#[test]
fn commit_send_is_all_or_nothing() {
    let dir = TempDir::new("atomic-send");
    let mut w = world(9);
    let a = w.peers[0].0;
    let mut store = SqliteStore::open(dir.db(), &KEY).unwrap();
    store.set_identity(&w.me).unwrap();
    let first = w.peers[0].1.clone();
    let entry = |id| OutboxEntry {
        to: a,
        envelope: Envelope {
            id,
            payload: vec![1],
        },
        created: NOW,
    };
    store.commit_send(&first, &entry(w.id())).unwrap();
    raw(&dir.db())
        .execute_batch(
            "CREATE TRIGGER no_outbox BEFORE INSERT ON outbox
             BEGIN SELECT RAISE(ABORT, 'outbox refused'); END;",
        )
        .unwrap();
    let second = w.advance(0);
    assert!(matches!(
        store.commit_send(&second, &entry(w.id())),
        Err(StoreError::Backend(_))
    ));
    assert_eq!(bytes(&store.session(&a).unwrap().unwrap()), bytes(&first));
    assert_eq!(store.outbox().unwrap().len(), 1);
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
                    store
                        .commit_receive(&[ReceiveCommit {
                            envelope_id: EnvelopeId(id),
                            processed_at: NOW,
                            session: None,
                            prekeys: None,
                            peer: None,
                            message: None,
                        }])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let n: i64 = raw(&dir.db())
        .query_row("SELECT count(*) FROM processed", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 100);
}
