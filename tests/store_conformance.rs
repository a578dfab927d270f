//! The `Store` conformance suite (`cubbyhole::storage::conformance`): the
//! in-memory and SQLite stores pass it, and deliberately broken stores fail
//! it, each at the check that covers its fault.

use cubbyhole::client::block_on;
use cubbyhole::storage::conformance::{self, Violation, CHECKS};
use cubbyhole::storage::{
    AccountRecord, BlockingStore, ContactRecord, DeliveryState, InboxMessage, LocalIdentity,
    MemoryStore, MessageId, OutboxEntry, PairingRecord, PeerRecord, PrekeyState, Quarantined,
    ReceiveCommit, SendCopy, SentMessage, SessionRecord, StoreError,
};
use cubbyhole::transport::{DeviceAddress, EnvelopeId};
use cubbyhole::AccountId;

#[test]
fn the_memory_store_conforms() {
    conformance::run(MemoryStore::new);
}

#[test]
fn every_check_has_a_distinct_name_and_runs_alone() {
    let mut names: Vec<&str> = CHECKS.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CHECKS.len(), "duplicate check names");
    for check in CHECKS {
        check.run(&mut MemoryStore::new()).wait().unwrap();
    }
    conformance::check_commit_send(&mut MemoryStore::new())
        .wait()
        .unwrap();
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use cubbyhole::storage::conformance;
    use cubbyhole::storage::SqliteStore;

    const KEY: [u8; 32] = [0x3c; 32];

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "cubbyhole-store-conformance-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_sqlite_store_in_memory_conforms() {
        conformance::run(|| SqliteStore::open_in_memory(&KEY).unwrap());
    }

    #[test]
    fn the_sqlite_store_on_a_file_conforms() {
        let dir = TempDir::new();
        let mut n = 0;
        conformance::run(|| {
            n += 1;
            SqliteStore::open(dir.0.join(format!("store-{n}.db")), &KEY).unwrap()
        });
        assert_eq!(n, conformance::CHECKS.len(), "one fresh file per check");
    }

    /// Makes the `n`-th row written to the store's file from now on fail
    /// (a trigger on every table, counting down in a table of its own),
    /// through a second connection to the file.
    fn injector(path: PathBuf) -> impl FnMut(&mut SqliteStore, Option<u32>) {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        move |_, n| {
            let tables: Vec<String> = conn
                .prepare(
                    "SELECT name FROM sqlite_schema WHERE type = 'table'
                     AND name NOT LIKE 'sqlite_%' AND name != 'fault'",
                )
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let mut sql = String::from("BEGIN;");
            for t in &tables {
                for op in ["INSERT", "UPDATE", "DELETE"] {
                    sql.push_str(&format!("DROP TRIGGER IF EXISTS fault_{t}_{op};"));
                }
            }
            sql.push_str("DROP TABLE IF EXISTS fault;");
            if let Some(n) = n {
                sql.push_str(&format!(
                    "CREATE TABLE fault (n INTEGER NOT NULL); INSERT INTO fault VALUES ({n});"
                ));
                for t in &tables {
                    for op in ["INSERT", "UPDATE", "DELETE"] {
                        sql.push_str(&format!(
                            "CREATE TRIGGER fault_{t}_{op} BEFORE {op} ON {t} BEGIN
                                 SELECT RAISE(ABORT, 'injected fault')
                                     WHERE (SELECT n FROM fault) = 0;
                                 UPDATE fault SET n = n - 1;
                             END;"
                        ));
                    }
                }
            }
            sql.push_str("COMMIT;");
            conn.execute_batch(&sql).unwrap();
        }
    }

    #[test]
    fn sqlite_commits_are_all_or_nothing_whichever_write_fails() {
        let dir = TempDir::new();
        let path = dir.0.join("atomic.db");
        let mut store = SqliteStore::open(&path, &KEY).unwrap();
        cubbyhole::client::block_on(conformance::check_atomicity(&mut store, injector(path)))
            .unwrap();
    }

    /// The injector really fails writes: with a fault at the first write
    /// nothing can be stored.
    #[test]
    fn the_sqlite_injector_fails_writes() {
        use cubbyhole::storage::{BlockingStore, PeerRecord, Trust};
        use cubbyhole::transport::DeviceAddress;
        let dir = TempDir::new();
        let path = dir.0.join("inject.db");
        let mut store = SqliteStore::open(&path, &KEY).unwrap();
        let mut inject = injector(path);
        let peer = PeerRecord {
            address: DeviceAddress {
                identity: [1; 32],
                device_id: 1,
            },
            trust: Trust::Unvalidated,
            first_seen: 5,
        };
        inject(&mut store, Some(0));
        assert!(store.set_peer(&peer).is_err());
        inject(&mut store, None);
        store.set_peer(&peer).unwrap();
        assert_eq!(store.peers().unwrap(), [peer]);
    }
}

/// What a [`Broken`] store gets wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// None: the wrapper is faithful.
    None,
    /// `prune_sent` also deletes old pending messages.
    PruneSentDropsPending,
    /// `commit_send` stores the record and the entry but not the sent
    /// message.
    CommitSendDropsSent,
    /// `quarantine_session` is not supported (a backend error).
    QuarantineUnsupported,
    /// `commit_receive` ignores the peer records.
    ReceiveDropsPeer,
    /// `prune_processed` forgets the marks at `before` too.
    PruneProcessedInclusive,
    /// `outbox` lists the entries by envelope id.
    OutboxSortedById,
    /// The stores made are not empty (left over from an earlier test).
    NotFresh,
    /// The routing index is not updated by `commit_send`.
    RoutesMissCommitSend,
    /// `awaiting_ratchet_key` lists nothing.
    AwaitingNone,
    /// `sessions_with_identity` returns one device of the identity only.
    IdentityFindsOneDevice,
    /// `commit_receive` applies the batch commit by commit, so an injected
    /// failure leaves the commits before it applied.
    ReceiveNotAtomic,
    /// `commit_send` stores the record before the outbox entry, in two
    /// writes.
    SendNotAtomic,
}

/// The memory store with one fault.
struct Broken {
    inner: MemoryStore,
    fault: Fault,
    /// Peers whose record `commit_send` wrote.
    sent_to: Vec<DeviceAddress>,
    /// The injected failure: writes left before one fails.
    fail_in: Option<u32>,
}

impl Broken {
    /// One write: fails if the injected fault is due.
    fn write(&mut self) -> Result<(), StoreError> {
        match &mut self.fail_in {
            Some(0) => Err(StoreError::Backend("injected fault".to_string())),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Broken {
    fn new(fault: Fault) -> Broken {
        let mut inner = MemoryStore::new();
        if fault == Fault::NotFresh {
            let message = InboxMessage {
                envelope_id: EnvelopeId([1; 16]),
                from: DeviceAddress {
                    identity: [2; 32],
                    device_id: 3,
                },
                body: b"left over".to_vec(),
                received_at: 4,
            };
            inner
                .commit_receive(&[ReceiveCommit {
                    envelope_id: message.envelope_id,
                    processed_at: 4,
                    session: None,
                    prekeys: None,
                    peer: None,
                    message: Some(&message),
                    sent: None,
                    access: None,
                }])
                .unwrap();
        }
        Broken {
            inner,
            fault,
            sent_to: Vec::new(),
            fail_in: None,
        }
    }
    fn maker(fault: Fault) -> impl FnMut() -> Broken {
        move || Broken::new(fault)
    }
}

impl BlockingStore for Broken {
    fn own_access_key(&self) -> Result<Option<cubbyhole::storage::AccessKeyRecord>, StoreError> {
        self.inner.own_access_key()
    }
    fn set_own_access_key(
        &mut self,
        key: &cubbyhole::storage::AccessKeyRecord,
    ) -> Result<(), StoreError> {
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
        self.inner.set_peer_access_key(peer, key)
    }
    fn set_peer_excluded(
        &mut self,
        peer: &DeviceAddress,
        excluded: bool,
    ) -> Result<(), StoreError> {
        self.inner.set_peer_excluded(peer, excluded)
    }
    fn identity(&self) -> Result<Option<LocalIdentity>, StoreError> {
        self.inner.identity()
    }
    fn set_identity(&mut self, identity: &LocalIdentity) -> Result<(), StoreError> {
        self.inner.set_identity(identity)
    }
    fn prekeys(&self) -> Result<Option<PrekeyState>, StoreError> {
        self.inner.prekeys()
    }
    fn set_prekeys(&mut self, state: &PrekeyState) -> Result<(), StoreError> {
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
        self.inner.set_session(peer, record)
    }
    fn remove_session(&mut self, peer: &DeviceAddress) -> Result<(), StoreError> {
        self.inner.remove_session(peer)
    }
    fn quarantine_session(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        if self.fault == Fault::QuarantineUnsupported {
            return Err(StoreError::Backend("quarantine not supported".into()));
        }
        self.inner.quarantine_session(peer, now, reason)
    }
    fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.inner.quarantined()
    }
    fn peer(&self, device: &DeviceAddress) -> Result<Option<PeerRecord>, StoreError> {
        self.inner.peer(device)
    }
    fn set_peer(&mut self, peer: &PeerRecord) -> Result<(), StoreError> {
        self.inner.set_peer(peer)
    }
    fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, StoreError> {
        self.inner.contact(name)
    }
    fn set_contact(&mut self, contact: &ContactRecord) -> Result<(), StoreError> {
        self.inner.set_contact(contact)
    }
    fn contacts(&self) -> Result<Vec<ContactRecord>, StoreError> {
        self.inner.contacts()
    }
    fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        self.inner.peers()
    }
    fn commit_send_many(&mut self, copies: &[SendCopy]) -> Result<(), StoreError> {
        self.inner.commit_send_many(copies)
    }
    fn own_account(&self) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.own_account()
    }
    fn set_own_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        self.inner.set_own_account(record)
    }
    fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.account(account)
    }
    fn set_account(&mut self, record: &AccountRecord) -> Result<(), StoreError> {
        self.inner.set_account(record)
    }
    fn pairing(&self) -> Result<Option<PairingRecord>, StoreError> {
        self.inner.pairing()
    }
    fn set_pairing(&mut self, record: Option<&PairingRecord>) -> Result<(), StoreError> {
        self.inner.set_pairing(record)
    }
    fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        self.inner.accounts()
    }
    fn commit_send(
        &mut self,
        record: &SessionRecord,
        entry: &OutboxEntry,
        sent: Option<&SentMessage>,
    ) -> Result<(), StoreError> {
        let sent = sent.filter(|_| self.fault != Fault::CommitSendDropsSent);
        self.sent_to.push(entry.to);
        if self.fault == Fault::SendNotAtomic {
            self.write()?;
            self.inner.set_session(&entry.to, record)?;
            self.write()?;
            return self.inner.commit_send(record, entry, sent);
        }
        self.write()?;
        self.write()?;
        self.inner.commit_send(record, entry, sent)
    }
    fn route_ratchet_keys(&self, keys: &[[u8; 32]]) -> Result<Vec<DeviceAddress>, StoreError> {
        let mut found = self.inner.route_ratchet_keys(keys)?;
        if self.fault == Fault::RoutesMissCommitSend {
            found.retain(|a| !self.sent_to.contains(a));
        }
        Ok(found)
    }
    fn awaiting_ratchet_key(&self) -> Result<Vec<DeviceAddress>, StoreError> {
        if self.fault == Fault::AwaitingNone {
            return Ok(Vec::new());
        }
        self.inner.awaiting_ratchet_key()
    }
    #[allow(clippy::type_complexity)]
    fn sessions_with_identity(
        &self,
        identity: &[u8; 32],
    ) -> Result<Vec<(DeviceAddress, Result<SessionRecord, StoreError>)>, StoreError> {
        let mut found = self.inner.sessions_with_identity(identity)?;
        if self.fault == Fault::IdentityFindsOneDevice {
            found.truncate(1);
        }
        Ok(found)
    }
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut outbox = self.inner.outbox()?;
        if self.fault == Fault::OutboxSortedById {
            outbox.sort_by_key(|e| e.envelope.id);
        }
        Ok(outbox)
    }
    fn remove_outbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.inner.remove_outbox(id)
    }
    fn is_processed(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        self.inner.is_processed(id)
    }
    fn commit_receive(&mut self, batch: &[ReceiveCommit<'_>]) -> Result<(), StoreError> {
        if self.fault == Fault::ReceiveNotAtomic {
            for c in batch {
                self.write()?;
                self.inner.commit_receive(std::slice::from_ref(c))?;
            }
            return Ok(());
        }
        // Atomic: every write is checked before anything is applied.
        for _ in batch {
            self.write()?;
        }
        if self.fault != Fault::ReceiveDropsPeer {
            return self.inner.commit_receive(batch);
        }
        let batch: Vec<ReceiveCommit<'_>> = batch
            .iter()
            .map(|c| ReceiveCommit { peer: None, ..*c })
            .collect();
        self.inner.commit_receive(&batch)
    }
    fn prune_processed(&mut self, before: u64) -> Result<(), StoreError> {
        let before = match self.fault {
            Fault::PruneProcessedInclusive => before.saturating_add(1),
            _ => before,
        };
        self.inner.prune_processed(before)
    }
    fn sent_messages(&self) -> Result<Vec<SentMessage>, StoreError> {
        self.inner.sent_messages()
    }
    fn sent_message(&self, id: &MessageId) -> Result<Option<SentMessage>, StoreError> {
        self.inner.sent_message(id)
    }
    fn update_sent(&mut self, message: &SentMessage) -> Result<(), StoreError> {
        self.inner.update_sent(message)
    }
    fn prune_sent(&mut self, before: u64) -> Result<(), StoreError> {
        if self.fault == Fault::PruneSentDropsPending {
            // Old pending messages are treated as finished.
            for m in self.inner.sent_messages()? {
                if m.state.is_pending() && m.created < before {
                    self.inner.update_sent(&SentMessage {
                        state: DeliveryState::Delivered,
                        ..m
                    })?;
                }
            }
        }
        self.inner.prune_sent(before)
    }
    fn inbox(&self) -> Result<Vec<InboxMessage>, StoreError> {
        self.inner.inbox()
    }
    fn remove_inbox(&mut self, id: &EnvelopeId) -> Result<(), StoreError> {
        self.inner.remove_inbox(id)
    }
}

/// The failures of a broken store (it must fail).
fn violations(fault: Fault) -> Vec<Violation> {
    match conformance::try_run(Broken::maker(fault)) {
        Ok(()) => panic!("a store with the fault {fault:?} passed the suite"),
        Err(v) => v,
    }
}

fn failed_checks(v: &[Violation]) -> Vec<&'static str> {
    v.iter().map(|v| v.check).collect()
}

#[test]
fn the_wrapper_without_a_fault_conforms() {
    // So the failures below are the faults', not the wrapper's.
    conformance::try_run(Broken::maker(Fault::None)).unwrap();
}

#[test]
fn pruning_pending_sent_messages_fails_prune_sent() {
    let v = violations(Fault::PruneSentDropsPending);
    assert!(failed_checks(&v).contains(&"prune_sent"), "{v:#?}");
    let prune = v.iter().find(|v| v.check == "prune_sent").unwrap();
    assert!(
        prune.message.contains("pending messages are never pruned"),
        "{prune}"
    );
    assert!(
        prune
            .to_string()
            .starts_with("store conformance: prune_sent: "),
        "{prune}"
    );
}

#[test]
fn dropping_the_sent_message_fails_commit_send_and_run_panics_naming_it() {
    let v = violations(Fault::CommitSendDropsSent);
    assert!(failed_checks(&v).contains(&"commit_send"), "{v:#?}");
    let commit = v.iter().find(|v| v.check == "commit_send").unwrap();
    assert_eq!(
        commit.to_string(),
        "store conformance: commit_send: after commit_send: the sent message is missing"
    );

    let panic = std::panic::catch_unwind(|| {
        conformance::run(Broken::maker(Fault::CommitSendDropsSent));
    })
    .expect_err("run must panic on a broken store");
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap();
    assert!(
        message.contains(
            "store conformance: commit_send: after commit_send: the sent message is missing"
        ),
        "{message}"
    );
}

#[test]
fn an_unsupported_method_fails_clearly() {
    let v = violations(Fault::QuarantineUnsupported);
    let checks = failed_checks(&v);
    assert!(checks.contains(&"quarantine"), "{v:#?}");
    let q = v.iter().find(|v| v.check == "quarantine").unwrap();
    assert!(
        q.message
            .contains("Store::quarantine_session returned an error: storage backend: quarantine not supported"),
        "{q}"
    );
}

#[test]
fn other_faults_fail_the_checks_that_cover_them() {
    for (fault, check) in [
        (Fault::ReceiveDropsPeer, "commit_receive"),
        (Fault::PruneProcessedInclusive, "processed"),
        // The suite's ids descend as they are added: sorting shows.
        (Fault::OutboxSortedById, "outbox"),
        (Fault::NotFresh, "empty"),
        (Fault::RoutesMissCommitSend, "routes"),
        (Fault::AwaitingNone, "routes"),
        (Fault::IdentityFindsOneDevice, "routes"),
    ] {
        let v = violations(fault);
        assert!(failed_checks(&v).contains(&check), "{fault:?}: {v:#?}");
    }
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}

/// The injector of [`Broken`]: the `n`-th write from now on fails.
fn inject_broken(store: &mut Broken, n: Option<u32>) {
    store.fail_in = n;
}

#[test]
fn atomicity_holds_for_the_memory_store_and_the_faithful_wrapper() {
    // The memory store cannot fail: its first attempt succeeds.
    block_on(conformance::check_atomicity(
        &mut MemoryStore::new(),
        |_, _| {},
    ))
    .unwrap();
    // The wrapper fails whole commits: each attempt fails, then one passes.
    block_on(conformance::check_atomicity(
        &mut Broken::new(Fault::None),
        inject_broken,
    ))
    .unwrap();
}

#[test]
fn a_commit_applied_in_parts_fails_the_atomicity_check() {
    for (fault, what) in [
        (
            Fault::ReceiveNotAtomic,
            "commit_receive failed at injected write 1",
        ),
        (
            Fault::SendNotAtomic,
            "commit_send failed at injected write 1",
        ),
    ] {
        let v = block_on(conformance::check_atomicity(
            &mut Broken::new(fault),
            inject_broken,
        ))
        .expect_err("a store applying its commit in parts passed");
        assert_eq!(v.check, "atomicity");
        assert!(v.message.contains(what), "{fault:?}: {v}");
    }
}

/// Not a contract of the suite ([`BlockingStore::awaiting_ratchet_key`]
/// only asks for it: the order decides the cost, not the outcome), but the
/// memory store's own: the most recently written awaiting record first,
/// whatever the addresses' order, and a rewrite moves a record to the front.
#[test]
fn the_memory_store_lists_the_most_recently_written_awaiting_record_first() {
    use cubbyhole::storage::SessionEntry;
    use cubbyhole::{
        FreshnessPolicy, IdentityKeyPair, PrekeyBundle, PrekeyStore, Session, SessionConfig,
    };
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const NOW: u64 = 1_700_000_000;
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let me = IdentityKeyPair::generate(&mut rng);
    let mut peers = Vec::new();
    for device_id in 1..=3 {
        let them = IdentityKeyPair::generate(&mut rng);
        let theirs = PrekeyStore::new(&mut rng, &them, NOW).expect("time in unix seconds");
        let bundle = PrekeyBundle::decode(&theirs.bundle(&them).encode())
            .unwrap()
            .verify(NOW, FreshnessPolicy::default())
            .unwrap();
        let mut s = Session::initiate(&mut rng, &me, &bundle, SessionConfig::default()).unwrap();
        s.encrypt(&mut rng, b"hello").unwrap();
        let record = SessionRecord::single(SessionEntry::new(s, 1, NOW));
        assert!(record.awaits_ratchet_key(), "building the test data");
        peers.push((DeviceAddress::new(them.public(), device_id), record));
    }
    peers.sort_by_key(|(a, _)| *a);
    let [(a, ra), (b, rb), (c, rc)] = <[_; 3]>::try_from(peers).ok().unwrap();

    let mut store = MemoryStore::new();
    // Written in neither the addresses' order nor its reverse.
    store.set_session(&a, &ra).unwrap();
    store.set_session(&c, &rc).unwrap();
    store.set_session(&b, &rb).unwrap();
    assert_eq!(store.awaiting_ratchet_key().unwrap(), [b, c, a]);
    store.set_session(&a, &ra).unwrap();
    assert_eq!(store.awaiting_ratchet_key().unwrap(), [a, b, c]);
}
