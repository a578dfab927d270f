//! Accounts on the client (issue 15: fan-out, trust per person,
//! revocation): Alice with 2 devices, Bob with 1, Carol with 3, over an
//! in-process relay that drops, duplicates, delays and reorders envelopes;
//! device lists go to the same relay's directory (`InProcessRelay`'s
//! `DeviceDirectory`: the real SPEC 25.12 rules), which the test can make
//! withhold versions.
//!
//! - every device of each recipient and every other device of the sender
//!   shows each message exactly once, the sender's own devices as a "sent"
//!   copy attributed to the sender's account;
//! - a device added mid-conversation gets what is sent after its senders
//!   saw it listed, and nothing before;
//! - a removed device gets nothing once the senders have the new list, and
//!   what it sends is refused;
//! - a thief's race (two successors of one version) is reported as a
//!   conflict: the person is compromised, both lists kept, nothing sent;
//! - the fan-out's commit is all or nothing: with a fault injected at
//!   every write of the SQLite store in turn, the outbox holds every copy or
//!   none.
//! - the record of the fan-out's deposits is all or nothing too: a fault
//!   in it leaves every copy queued and stored, `flush_outbox` records them
//!   later, and every device shows each message exactly once.

use cubbyhole::transport::DepositPass;
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use cubbyhole::client::accounts::{copy_id as copy, AccountChange};
use cubbyhole::client::{block_on, Client, ClientConfig, ClientError, Rejection};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
#[cfg(feature = "sqlite")]
use cubbyhole::storage::SqliteStore;
use cubbyhole::storage::{DeliveryState, MemoryStore, MessageId, Store, Trust};
use cubbyhole::transport::{
    DeviceAddress, DeviceDirectory, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxId,
    PrekeyDirectory, TransportError,
};
use cubbyhole::{AccountId, DeviceList};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const T0: u64 = 1_900_000_000;
const HOUR: u64 = 3600;

// ------------------------------------------------------------------ network

struct NetState {
    rng: ChaCha20Rng,
    /// Drops, duplicates, delays and reorders while set.
    faulty: bool,
    /// Every deposit fails (the relay is unreachable).
    down: bool,
    /// The next this many deposits are accepted and lost.
    lose_next: usize,
    /// Every envelope deposited (before any fault), with its mailbox.
    log: Vec<(MailboxId, Envelope)>,
    delayed: Vec<(MailboxId, Envelope, DepositPass)>,
    /// (account, version) the directory withholds from fetches.
    withheld: HashSet<([u8; 32], u64)>,
    dropped: usize,
    duplicated: usize,
}

#[derive(Clone)]
struct Net {
    relay: InProcessRelay<MemoryRelayStorage>,
    clock: Arc<Mutex<u64>>,
    state: Arc<Mutex<NetState>>,
}

impl Net {
    fn new(seed: u64) -> Net {
        let clock = Arc::new(Mutex::new(T0));
        let c = clock.clone();
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
            Arc::new(move || *c.lock().unwrap()),
        );
        Net {
            relay,
            clock,
            state: Arc::new(Mutex::new(NetState {
                rng: ChaCha20Rng::seed_from_u64(seed),
                faulty: false,
                down: false,
                lose_next: 0,
                log: Vec::new(),
                delayed: Vec::new(),
                withheld: HashSet::new(),
                dropped: 0,
                duplicated: 0,
            })),
        }
    }
    fn now(&self) -> u64 {
        *self.clock.lock().unwrap()
    }
    fn advance(&self, by: u64) {
        *self.clock.lock().unwrap() += by;
    }
    fn faulty(&self, on: bool) {
        self.state.lock().unwrap().faulty = on;
    }
    fn put(&self, to: &MailboxId, envelope: &Envelope, pass: &DepositPass) {
        let _ = block_on(self.relay.deposit(to, envelope, pass));
    }
    /// Releases every delayed envelope.
    fn release(&self) {
        let held = std::mem::take(&mut self.state.lock().unwrap().delayed);
        for (to, envelope, pass) in held.into_iter().rev() {
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

/// The relay's own directory (SPEC 25.12, [`InProcessRelay`]'s
/// `DeviceDirectory`): every publish and fetch goes to the real relay
/// rules; the one fault added here is a directory that withholds versions
/// it holds (SPEC 25.12 allows it; 25.7 must notice the gap).
impl DeviceDirectory for Net {
    fn publish_device_list(
        &self,
        signed: &[u8],
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.relay.publish_device_list(signed)
    }
    fn fetch_device_lists(
        &self,
        account: &AccountId,
        after: u64,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, TransportError>> + Send {
        let got = block_on(self.relay.fetch_device_lists(account, after));
        let s = self.state.lock().unwrap();
        let got = got.map(|lists| {
            lists
                .into_iter()
                .filter(|l| {
                    let version = DeviceList::decode(l)
                        .expect("the relay serves lists")
                        .version();
                    !s.withheld.contains(&(account.0, version))
                })
                .collect()
        });
        std::future::ready(got)
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
        let result = {
            let mut s = self.state.lock().unwrap();
            if !s.down {
                s.log.push((*to, envelope.clone()));
            }
            if s.down {
                Err(TransportError::Unavailable("down"))
            } else if s.lose_next > 0 {
                s.lose_next -= 1;
                s.dropped += 1;
                Ok(())
            } else {
                let roll = if s.faulty { s.rng.next_u32() % 100 } else { 99 };
                match roll {
                    0..=14 => s.dropped += 1,
                    15..=29 => s.delayed.push((*to, envelope.clone(), pass.clone())),
                    30..=39 => {
                        s.duplicated += 1;
                        let mut again = envelope.clone();
                        let mut id = [0u8; 16];
                        s.rng.fill_bytes(&mut id);
                        again.id = EnvelopeId(id);
                        copies.push(envelope.clone());
                        copies.push(again);
                    }
                    _ => copies.push(envelope.clone()),
                }
                Ok(())
            }
        };
        for copy in copies {
            self.put(to, &copy, pass);
        }
        std::future::ready(result)
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
            if s.faulty && got.len() > 1 && s.rng.next_u32() % 2 == 0 {
                got.reverse();
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

// ------------------------------------------------------------------ people

type Dev = Client<MemoryStore, Net, Net>;

fn config(device_id: u32) -> ClientConfig {
    ClientConfig {
        device_id,
        resend_after: HOUR,
        resend_max_interval: 2 * HOUR,
        one_time_prekeys: 10,
        refill_below: 3,
        ..ClientConfig::default()
    }
}

fn open<S: Store>(
    store: S,
    net: &Net,
    device_id: u32,
    rng: &mut ChaCha20Rng,
) -> Client<S, Net, Net> {
    let mut c = block_on(Client::open(
        store,
        net.clone(),
        net.clone(),
        config(device_id),
        rng,
    ))
    .unwrap();
    block_on(c.maintain_prekeys(rng, net.now())).unwrap();
    c
}

/// A person: the founder creates the account, each further device joins
/// from it (add_device on the founder, join_account on the new device).
fn person(net: &Net, devices: u32, rng: &mut ChaCha20Rng) -> (AccountId, Vec<Dev>) {
    let mut all: Vec<Dev> = (1..=devices)
        .map(|id| open(MemoryStore::new(), net, id, rng))
        .collect();
    let account = block_on(all[0].create_account(net.now())).unwrap();
    for i in 1..all.len() {
        join(net, &mut all, i);
    }
    (account, all)
}

/// Device `i` joins the account of device 0; every device refreshes.
fn join(net: &Net, all: &mut [Dev], i: usize) {
    let address = all[i].address();
    let list = block_on(all[0].add_device(&address)).unwrap();
    block_on(all[i].join_account(&list, net.now())).unwrap();
    for d in all.iter_mut().take(i) {
        block_on(d.refresh_own_account(net.now())).unwrap();
    }
}

fn refresh_all(net: &Net, devices: &mut [&mut Dev], accounts: &[AccountId]) {
    for d in devices.iter_mut() {
        let own = block_on(d.own_account()).unwrap().unwrap();
        for a in accounts {
            if a != own.account_id() {
                block_on(d.refresh_account(a, net.now())).unwrap();
            }
        }
    }
}

/// Calms the network and lets every device receive (and re-send what
/// lacks a receipt) until nothing moves, advancing the clock past the
/// re-send interval each round.
fn settle(net: &Net, devices: &mut [&mut Dev], rng: &mut ChaCha20Rng) {
    net.faulty(false);
    net.release();
    for _ in 0..12 {
        for d in devices.iter_mut() {
            block_on(d.receive(rng, net.now())).unwrap();
        }
        net.advance(3 * HOUR);
    }
}

/// A device's account messages: (logical id, sender device, sent copy,
/// attributed account, body), in inbox order.
/// (logical id, sender device, sent copy, attributed account, body).
type Shown = (MessageId, DeviceAddress, bool, Option<AccountId>, Vec<u8>);

/// Nothing is listed after a gap here: every message arrives within the
/// hold-back time.
fn shown(d: &Dev, now: u64) -> Vec<Shown> {
    block_on(d.account_inbox(now))
        .unwrap()
        .into_iter()
        .map(|m| {
            assert!(!m.gap_before, "listed after a gap: {m:?}");
            (m.header.message, m.from, m.sent_copy, m.account, m.body)
        })
        .collect()
}

fn ids_shown(d: &Dev, now: u64) -> Vec<MessageId> {
    shown(d, now).into_iter().map(|m| m.0).collect()
}

// ------------------------------------------------------------------ tests

/// Every device of the recipient and every other device of the sender
/// shows each message exactly once, the sender's own devices as a sent
/// copy of its account; with no faults, in each sender's order.
#[test]
fn every_device_of_each_person_shows_each_message_once() {
    for seed in 0..3u64 {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let net = Net::new(seed);
        let (alice, mut a) = person(&net, 2, &mut rng);
        let (bob, mut b) = person(&net, 1, &mut rng);
        let (carol, mut c) = person(&net, 3, &mut rng);
        let accounts = [alice, bob, carol];
        {
            let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut b).chain(&mut c).collect();
            refresh_all(&net, &mut all, &accounts);
        }
        // Who sends to whom: (sender person, device, recipient account).
        let faulty = seed != 0;
        net.faulty(faulty);
        let mut sent: Vec<(usize, usize, AccountId, MessageId)> = Vec::new();
        for round in 0..4u8 {
            let plan = [
                (0usize, 0usize, bob),
                (1, 0, carol),
                (2, 2, alice),
                (0, 1, carol),
                (2, 0, bob),
            ];
            for (k, (p, d, to)) in plan.into_iter().enumerate() {
                let device = match p {
                    0 => &mut a[d],
                    1 => &mut b[d],
                    _ => &mut c[d],
                };
                let body = vec![round, k as u8];
                let out =
                    block_on(device.send_to_account(&mut rng, &to, &body, net.now())).unwrap();
                sent.push((p, d, to, out.message));
            }
            net.advance(60);
            // Some devices receive in between (the others are offline).
            for d in a.iter_mut().take(1).chain(c.iter_mut().skip(1)) {
                block_on(d.receive(&mut rng, net.now())).unwrap();
            }
        }
        {
            let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut b).chain(&mut c).collect();
            settle(&net, &mut all, &mut rng);
        }
        let people: [(&AccountId, &Vec<Dev>); 3] = [(&alice, &a), (&bob, &b), (&carol, &c)];
        for (p, (_, devices)) in people.iter().enumerate() {
            for (i, device) in devices.iter().enumerate() {
                let got = shown(device, net.now());
                let mut expected: Vec<MessageId> = Vec::new();
                for (sp, sd, to, id) in &sent {
                    let to_me = *to == *people[p].0;
                    let own_copy = *sp == p && *sd != i;
                    if to_me || own_copy {
                        expected.push(*id);
                    }
                }
                let mut ids: Vec<MessageId> = got.iter().map(|m| m.0).collect();
                // Across senders the order shown is the order fetched,
                // which with v2 depends on the mailbox each envelope waited
                // in (the published one or a private inbox, SPEC.md 26.11);
                // each sender's own order is kept, faults or not (below).
                // Each sender device's messages in the order it sent them,
                // faults or not (lost ones were re-sent and held behind).
                for (sp, sd) in sent.iter().map(|s| (s.0, s.1)).collect::<HashSet<_>>() {
                    let of_sender =
                        |id: &MessageId| sent.iter().any(|s| s.3 == *id && (s.0, s.1) == (sp, sd));
                    let got_order: Vec<MessageId> =
                        ids.iter().copied().filter(|id| of_sender(id)).collect();
                    let want_order: Vec<MessageId> = expected
                        .iter()
                        .copied()
                        .filter(|id| of_sender(id))
                        .collect();
                    assert_eq!(
                        got_order, want_order,
                        "seed {seed}: person {p} device {i}: the order of sender ({sp}, {sd})"
                    );
                }
                ids.sort();
                let mut want = expected.clone();
                want.sort();
                assert_eq!(
                    ids, want,
                    "seed {seed}: person {p} device {i}: each message exactly once"
                );
                for (id, from, sent_copy, account, _) in &got {
                    let (sp, _, _, _) = sent.iter().find(|s| s.3 == *id).unwrap();
                    assert_eq!(
                        *account,
                        Some(*people[*sp].0),
                        "attributed to the sender's account"
                    );
                    assert_eq!(
                        *sent_copy,
                        *sp == p,
                        "sent copy exactly on the sender's own devices"
                    );
                    assert!(devices_of(people[*sp].1).contains(from));
                }
            }
        }
        if faulty {
            let s = net.state.lock().unwrap();
            assert!(s.dropped > 0 && s.duplicated > 0, "the network was faulty");
        }
    }
}

fn devices_of(devices: &[Dev]) -> Vec<DeviceAddress> {
    devices.iter().map(Client::address).collect()
}

/// A device added to Carol's account mid-conversation gets what Alice and
/// Bob send once they have the new list, and nothing sent before.
#[test]
fn an_added_device_gets_what_is_sent_after_it_is_listed() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let net = Net::new(7);
    let (alice, mut a) = person(&net, 1, &mut rng);
    let (carol, mut c) = person(&net, 2, &mut rng);
    {
        let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut c).collect();
        refresh_all(&net, &mut all, &[alice, carol]);
    }
    let before = block_on(a[0].send_to_account(&mut rng, &carol, b"before", net.now()))
        .unwrap()
        .message;
    let mut c3 = open(MemoryStore::new(), &net, 3, &mut rng);
    let list = block_on(c[0].add_device(&c3.address())).unwrap();
    block_on(c3.join_account(&list, net.now())).unwrap();
    block_on(c[1].refresh_own_account(net.now())).unwrap();
    block_on(c[0].refresh_own_account(net.now())).unwrap();
    block_on(c3.refresh_account(&alice, net.now())).unwrap();
    let report = block_on(a[0].refresh_account(&carol, net.now())).unwrap();
    assert_eq!(report.change, AccountChange::Verified);
    assert_eq!(report.added, vec![c3.address()]);
    assert_eq!(report.trust, Trust::Unvalidated);
    let after = block_on(a[0].send_to_account(&mut rng, &carol, b"after", net.now()))
        .unwrap()
        .message;
    let by_carol = block_on(c[1].send_to_account(&mut rng, &alice, b"from carol", net.now()))
        .unwrap()
        .message;
    c.push(c3);
    let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut c).collect();
    settle(&net, &mut all, &mut rng);
    assert_eq!(ids_shown(&c[0], net.now()), vec![before, after, by_carol]);
    assert_eq!(ids_shown(&c[1], net.now()), vec![before, after]);
    assert_eq!(
        ids_shown(&c[2], net.now()),
        vec![after, by_carol],
        "the new device: only what followed"
    );
    assert!(
        shown(&c[2], net.now())[1].2,
        "Carol's own message is a sent copy on the new device"
    );
}

/// Each sender's order under loss (SPEC 25.13): a message whose
/// predecessor was lost is held back until the re-sent predecessor arrives,
/// then listed after it; a predecessor that never comes holds it back for
/// `hold_back` only, then it is listed with `gap_before`, and the late
/// predecessor after it.
#[test]
fn a_lost_message_holds_back_the_senders_later_ones() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let net = Net::new(7);
    let (alice, mut a) = person(&net, 1, &mut rng);
    let (bob, mut b) = person(&net, 1, &mut rng);
    {
        let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut b).collect();
        refresh_all(&net, &mut all, &[alice, bob]);
    }
    let hold_back = b[0].config().hold_back;
    let (sender, receiver) = (&mut a[0], &mut b[0]);
    let send = |d: &mut Dev, rng: &mut ChaCha20Rng, body: &[u8], lose: bool| {
        net.state.lock().unwrap().lose_next = usize::from(lose);
        block_on(d.send_to_account(rng, &bob, body, net.now()))
            .unwrap()
            .message
    };
    let bodies = |d: &Dev| -> Vec<(Vec<u8>, bool)> {
        block_on(d.account_inbox(net.now()))
            .unwrap()
            .into_iter()
            .map(|m| (m.body, m.gap_before))
            .collect()
    };
    let take_all = |d: &mut Dev| {
        for m in block_on(d.account_inbox(net.now())).unwrap() {
            block_on(d.remove_from_inbox(&m.envelope_id)).unwrap();
        }
    };
    // 1. The first message is lost; the next two arrive and wait for it.
    let m1 = send(sender, &mut rng, b"1", true);
    send(sender, &mut rng, b"2", false);
    send(sender, &mut rng, b"3", false);
    let r = block_on(receiver.receive(&mut rng, net.now())).unwrap();
    assert_eq!(r.received, 2);
    assert_eq!(bodies(receiver), vec![], "2 and 3 wait for 1");
    assert_eq!(
        block_on(receiver.inbox()).unwrap().len(),
        2,
        "kept in the inbox"
    );
    // The sender re-sends 1 (no receipt); it arrives and all three are
    // listed in the order sent.
    net.advance(2 * HOUR);
    let r = block_on(sender.receive(&mut rng, net.now())).unwrap();
    assert!(r.resend.resent >= 1, "1 re-sent (receive re-sends)");
    block_on(receiver.receive(&mut rng, net.now())).unwrap();
    assert_eq!(
        bodies(receiver),
        vec![
            (b"1".to_vec(), false),
            (b"2".to_vec(), false),
            (b"3".to_vec(), false)
        ]
    );
    take_all(receiver);
    block_on(receiver.flush_outbox()).unwrap();
    block_on(sender.receive(&mut rng, net.now())).unwrap();
    assert_eq!(
        block_on(sender.delivery(&copy(&m1, &receiver.address()))).unwrap(),
        Some(DeliveryState::Delivered)
    );
    // 2. The fourth is lost and its sender does not re-send it for a long
    // time: the fifth waits `hold_back`, then is listed with a gap.
    send(sender, &mut rng, b"4", true);
    send(sender, &mut rng, b"5", false);
    block_on(receiver.receive(&mut rng, net.now())).unwrap();
    assert_eq!(bodies(receiver), vec![]);
    net.advance(hold_back - 1);
    assert_eq!(bodies(receiver), vec![], "held until hold_back has passed");
    net.advance(1);
    assert_eq!(bodies(receiver), vec![(b"5".to_vec(), true)]);
    take_all(receiver);
    // The late fourth is then listed after it, once.
    block_on(sender.receive(&mut rng, net.now())).unwrap();
    block_on(sender.resend(&mut rng, net.now())).unwrap();
    block_on(receiver.receive(&mut rng, net.now())).unwrap();
    assert_eq!(bodies(receiver), vec![(b"4".to_vec(), false)]);
    take_all(receiver);
    net.advance(4 * HOUR);
    block_on(sender.resend(&mut rng, net.now())).unwrap();
    block_on(receiver.receive(&mut rng, net.now())).unwrap();
    assert_eq!(bodies(receiver), vec![], "nothing twice");
}

/// Forward secrecy across devices: the keys of a stolen device (its whole
/// store) open nothing addressed to another device. Every envelope that was
/// deposited for Alice's phone and for Bob, account messages, sent copies
/// and a plain message, is given to the laptop (deposited into its own
/// mailbox): it opens none of them and shows nothing new.
#[test]
fn a_stolen_device_opens_nothing_addressed_to_other_devices() {
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let net = Net::new(12);
    let (alice, mut a) = person(&net, 2, &mut rng);
    let (bob, mut b) = person(&net, 1, &mut rng);
    {
        let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut b).collect();
        refresh_all(&net, &mut all, &[alice, bob]);
    }
    for round in 0..3u8 {
        block_on(b[0].send_to_account(&mut rng, &alice, &[1, round], net.now())).unwrap();
        block_on(a[0].send_to_account(&mut rng, &bob, &[2, round], net.now())).unwrap();
        block_on(a[0].send(&mut rng, &b[0].address(), &[3, round], net.now())).unwrap();
        let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut b).collect();
        settle(&net, &mut all, &mut rng);
    }
    let laptop = a[1].address();
    // Their published mailboxes and their private inboxes (v2 chain
    // messages wait there).
    let mut others = vec![a[0].address().mailbox(), b[0].address().mailbox()];
    for device in [&a[0], &b[0]] {
        others.extend(block_on(device.private_inbox()).unwrap());
    }
    let elsewhere: Vec<Envelope> = net
        .state
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|(to, _)| others.contains(to))
        .map(|(_, e)| e.clone())
        .collect();
    assert!(
        elsewhere.len() >= 12,
        "traffic to open: {}",
        elsewhere.len()
    );
    let before = block_on(a[1].inbox()).unwrap();
    assert_eq!(
        before.len(),
        6,
        "the laptop's own copies (3 to Alice, 3 sent)"
    );
    for e in &elsewhere {
        net.put(&laptop.mailbox(), e, &DepositPass::NONE);
    }
    let r = block_on(a[1].receive(&mut rng, net.now())).unwrap();
    assert_eq!(r.received, 0, "nothing opened: {r:?}");
    assert_eq!(r.rejected.len(), elsewhere.len());
    assert_eq!(block_on(a[1].inbox()).unwrap(), before);
}

/// Alice removes her stolen laptop: once Bob has the new list, nothing
/// more goes to it, and what it sends is refused, by Bob and by Alice's
/// phone.
#[test]
fn a_removed_device_gets_nothing_and_is_refused() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let net = Net::new(11);
    let (alice, mut a) = person(&net, 2, &mut rng);
    let (bob, mut b) = person(&net, 1, &mut rng);
    {
        let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut b).collect();
        refresh_all(&net, &mut all, &[alice, bob]);
    }
    let first = block_on(b[0].send_to_account(&mut rng, &alice, b"first", net.now()))
        .unwrap()
        .message;
    {
        let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut b).collect();
        settle(&net, &mut all, &mut rng);
    }
    assert_eq!(ids_shown(&a[1], net.now()), vec![first]);
    let laptop = a[1].address();
    let report = block_on(a[0].remove_device(&laptop, net.now())).unwrap();
    assert_eq!(report.removed, vec![laptop]);
    let report = block_on(b[0].refresh_account(&alice, net.now())).unwrap();
    assert_eq!(report.change, AccountChange::Verified);
    assert_eq!(report.removed, vec![laptop]);
    let second = block_on(b[0].send_to_account(&mut rng, &alice, b"second", net.now())).unwrap();
    assert!(
        second.copies.iter().all(|(d, _)| *d != laptop),
        "the removed device is not a recipient"
    );
    // The thief's laptop still believes it is listed and writes to both.
    let stolen = block_on(a[1].send_to_account(&mut rng, &bob, b"from the thief", net.now()))
        .unwrap()
        .message;
    let mut rejected = 0;
    for d in [&mut a[0], &mut b[0]] {
        for _ in 0..3 {
            let r = block_on(d.receive(&mut rng, net.now())).unwrap();
            rejected += r
                .rejected
                .iter()
                .filter(|(_, why)| *why == Rejection::Compromised)
                .count();
            net.advance(3 * HOUR);
        }
    }
    {
        let mut all: Vec<&mut Dev> = a.iter_mut().chain(&mut b).collect();
        settle(&net, &mut all, &mut rng);
    }
    assert!(
        rejected >= 2,
        "the thief's copies were refused ({rejected})"
    );
    assert!(
        !ids_shown(&b[0], net.now()).contains(&stolen),
        "Bob refused the removed device"
    );
    assert!(
        !ids_shown(&a[0], net.now()).contains(&stolen),
        "the phone refused the removed device"
    );
    assert_eq!(ids_shown(&a[0], net.now()), vec![first, second.message]);
    assert_eq!(
        ids_shown(&a[1], net.now()),
        vec![first],
        "nothing after the removal reached the laptop"
    );
}

/// The thief's race: the stolen device signs a version removing every
/// other device, the owner's phone one removing the thief. Bob holds one
/// and is shown the other: a conflict, the person compromised, both lists
/// kept, nothing sent; never a silent choice.
#[test]
fn a_thief_race_is_a_conflict_never_resolved() {
    for thief_first in [false, true] {
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let net = Net::new(13);
        let (carol, mut c) = person(&net, 3, &mut rng);
        let (bob, mut b) = person(&net, 1, &mut rng);
        {
            let mut all: Vec<&mut Dev> = c.iter_mut().chain(&mut b).collect();
            refresh_all(&net, &mut all, &[carol, bob]);
        }
        block_on(b[0].set_account_trust(&carol, Trust::Validated, net.now())).unwrap();
        let head = block_on(c[0].own_account()).unwrap().unwrap();
        let keys = |d: &Dev| block_on(d.store().identity()).unwrap().unwrap().keys;
        let thief = c[2].address();
        let mut theirs = head
            .successor(
                &head
                    .devices()
                    .iter()
                    .filter(|e| e.device_id == 3)
                    .copied()
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        theirs.sign(&keys(&c[2])).unwrap();
        let theirs = theirs.into_list().unwrap();
        let mut ours = head
            .successor(
                &head
                    .devices()
                    .iter()
                    .filter(|e| e.device_id != 3)
                    .copied()
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        ours.sign(&keys(&c[0])).unwrap();
        let ours = ours.into_list().unwrap();
        let (published, in_band) = if thief_first {
            (&theirs, &ours)
        } else {
            (&ours, &theirs)
        };
        block_on(net.publish_device_list(&published.encode())).unwrap();
        // SPEC 25.12: an authentic second list of a held version is a
        // conflict, and the relay keeps the first.
        assert_eq!(
            block_on(net.publish_device_list(&in_band.encode())),
            Err(TransportError::Conflict)
        );
        assert_eq!(
            block_on(net.fetch_device_lists(&carol, head.version())),
            Ok(vec![published.encode()]),
            "the relay kept the first of the two"
        );
        let report = block_on(b[0].refresh_account(&carol, net.now())).unwrap();
        assert_eq!(report.change, AccountChange::Verified);
        let report =
            block_on(b[0].offer_device_lists(&carol, &[in_band.encode()], net.now())).unwrap();
        assert_eq!(
            report.change,
            AccountChange::Conflict,
            "thief first: {thief_first}"
        );
        assert_eq!(report.trust, Trust::Compromised);
        let record = block_on(b[0].account(&carol)).unwrap().unwrap();
        assert_eq!(record.trust, Trust::Compromised);
        let (e_ours, e_theirs) = record.evidence.clone().expect("evidence kept");
        assert_eq!(e_ours, published.encode());
        assert_eq!(e_theirs, in_band.encode());
        assert!(matches!(
            block_on(b[0].send_to_account(&mut rng, &carol, b"x", net.now())),
            Err(ClientError::Compromised)
        ));
        // A later refresh does not clear it.
        let report = block_on(b[0].refresh_account(&carol, net.now())).unwrap();
        assert_eq!(report.trust, Trust::Compromised);
        assert!(block_on(b[0].account(&carol))
            .unwrap()
            .unwrap()
            .evidence
            .is_some());
        let _ = thief;
    }
}

/// A change Bob cannot verify (versions missing: the directory withheld
/// them) drops Carol to unvalidated; the newest list is taken on trust.
#[test]
fn an_unverifiable_change_drops_the_person_to_unvalidated() {
    let mut rng = ChaCha20Rng::seed_from_u64(17);
    let net = Net::new(17);
    let (carol, mut c) = person(&net, 1, &mut rng);
    let (bob, mut b) = person(&net, 1, &mut rng);
    block_on(b[0].refresh_account(&carol, net.now())).unwrap();
    block_on(b[0].set_account_trust(&carol, Trust::Validated, net.now())).unwrap();
    let mut c2 = open(MemoryStore::new(), &net, 2, &mut rng);
    let list = block_on(c[0].add_device(&c2.address())).unwrap();
    block_on(c2.join_account(&list, net.now())).unwrap();
    block_on(c[0].refresh_own_account(net.now())).unwrap();
    let mut c3 = open(MemoryStore::new(), &net, 3, &mut rng);
    let list = block_on(c[0].add_device(&c3.address())).unwrap();
    block_on(c3.join_account(&list, net.now())).unwrap();
    // The directory withholds version 2.
    net.state.lock().unwrap().withheld.insert((carol.0, 2));
    let report = block_on(b[0].refresh_account(&carol, net.now())).unwrap();
    assert_eq!(report.change, AccountChange::Unverifiable);
    assert_eq!(report.trust, Trust::Unvalidated);
    assert_eq!(report.version, 3);
    let _ = (bob, c2);
}

// ------------------------------------------------------------ atomicity

#[cfg(feature = "sqlite")]
/// Makes the `n`-th row write of the SQLite file fail (a trigger on every
/// table), or removes the fault (`None`).
fn inject(conn: &rusqlite::Connection, n: Option<u32>) {
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
                         SELECT RAISE(ABORT, 'injected fault') WHERE (SELECT n FROM fault) = 0;
                         UPDATE fault SET n = n - 1;
                     END;"
                ));
            }
        }
    }
    sql.push_str("COMMIT;");
    conn.execute_batch(&sql).unwrap();
}

/// The fan-out's commit, with a fault at every write in turn: while it
/// fails, no copy (outbox entry or sent message) is stored; once it
/// succeeds, every copy is, under one logical id.
#[cfg(feature = "sqlite")]
#[test]
fn the_fan_out_commit_stores_every_copy_or_none() {
    let mut rng = ChaCha20Rng::seed_from_u64(19);
    let net = Net::new(19);
    let dir = std::env::temp_dir().join(format!("cubbyhole-accounts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("alice1.db");
    let _ = std::fs::remove_file(&path);
    let key = [7u8; 32];
    let mut a1 = open(SqliteStore::open(&path, &key).unwrap(), &net, 1, &mut rng);
    let alice = block_on(a1.create_account(net.now())).unwrap();
    let mut a2 = open(MemoryStore::new(), &net, 2, &mut rng);
    let list = block_on(a1.add_device(&a2.address())).unwrap();
    block_on(a2.join_account(&list, net.now())).unwrap();
    block_on(a1.refresh_own_account(net.now())).unwrap();
    let (carol, c) = person(&net, 2, &mut rng);
    block_on(a1.refresh_account(&carol, net.now())).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    net.state.lock().unwrap().down = true; // copies stay in the outbox
    let mut done = false;
    for n in 0..200 {
        inject(&conn, Some(n));
        let result = block_on(a1.send_to_account(&mut rng, &carol, b"all or none", net.now()));
        inject(&conn, None);
        let outbox = block_on(a1.store().outbox()).unwrap();
        let sent = block_on(a1.store().sent_messages()).unwrap();
        match result {
            Err(_) => {
                assert!(
                    outbox.is_empty(),
                    "write {n} failed, yet {} copies queued",
                    outbox.len()
                );
                assert!(
                    sent.is_empty(),
                    "write {n} failed, yet {} copies kept",
                    sent.len()
                );
            }
            Ok(out) => {
                assert_eq!(
                    out.copies.len(),
                    3,
                    "Carol's two devices and Alice's laptop"
                );
                assert_eq!(outbox.len(), 3, "every copy queued");
                assert_eq!(sent.len(), 3);
                assert!(n > 0, "the fault was injected at least once");
                done = true;
                break;
            }
        }
    }
    assert!(done, "the send never succeeded");
    let _ = (alice, a2, c, std::fs::remove_dir_all(&dir));
}

/// The fan-out's deposit record (one `Store::commit_deposits`
/// transaction after the copies are deposited), with a fault at every
/// write in turn and the relay up: a send whose record fails has deposited
/// its copies yet keeps every one queued and stored (all or none: never
/// some recorded and some not); `flush_outbox` deposits them again (same
/// envelope ids) and records them all; in the end every device shows each
/// message exactly once, although one recipient device fetched and
/// acknowledged the copies before they were deposited again.
#[cfg(feature = "sqlite")]
#[test]
fn a_failed_deposit_record_loses_and_duplicates_nothing() {
    use cubbyhole::storage::DeliveryState;

    let mut rng = ChaCha20Rng::seed_from_u64(23);
    let net = Net::new(23);
    let dir = std::env::temp_dir().join(format!("cubbyhole-deposits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("alice1.db");
    let _ = std::fs::remove_file(&path);
    let mut a1 = open(
        SqliteStore::open(&path, &[7u8; 32]).unwrap(),
        &net,
        1,
        &mut rng,
    );
    let alice = block_on(a1.create_account(net.now())).unwrap();
    let mut a2 = open(MemoryStore::new(), &net, 2, &mut rng);
    let list = block_on(a1.add_device(&a2.address())).unwrap();
    block_on(a2.join_account(&list, net.now())).unwrap();
    block_on(a1.refresh_own_account(net.now())).unwrap();
    let (carol, mut c) = person(&net, 2, &mut rng);
    block_on(a1.refresh_account(&carol, net.now())).unwrap();
    block_on(a2.refresh_account(&carol, net.now())).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    // The states of a send's copies, by copy id.
    let states = |a1: &Client<SqliteStore, Net, Net>, ids: &[(DeviceAddress, MessageId)]| {
        let sent = block_on(a1.store().sent_messages()).unwrap();
        ids.iter()
            .map(|(_, id)| sent.iter().find(|m| m.id == *id).map(|m| m.state))
            .collect::<Vec<_>>()
    };
    let mut sent = Vec::new();
    let mut record_failed = 0;
    let mut done = false;
    for n in 0..300 {
        let kept = block_on(a1.store().sent_messages()).unwrap().len();
        inject(&conn, Some(n));
        let body = format!("message {n}");
        let result = block_on(a1.send_to_account(&mut rng, &carol, body.as_bytes(), net.now()));
        inject(&conn, None);
        let outbox = block_on(a1.store().outbox()).unwrap();
        let out = match result {
            // The fan-out's commit failed: nothing queued, nothing kept.
            Err(_) => {
                assert!(outbox.is_empty(), "write {n}: {} queued", outbox.len());
                let now = block_on(a1.store().sent_messages()).unwrap().len();
                assert_eq!(now, kept, "write {n}: a failed send kept copies");
                continue;
            }
            Ok(out) => out,
        };
        assert_eq!(
            out.copies.len(),
            3,
            "Carol's two devices and Alice's laptop"
        );
        sent.push(out.message);
        if out.deposited == 0 {
            // Deposited, but the record failed (as a whole: none is
            // counted).
            record_failed += 1;
            assert_eq!(
                outbox.len(),
                3,
                "write {n}: the record failed, yet not every copy is still queued"
            );
            assert_eq!(
                states(&a1, &out.copies),
                vec![Some(DeliveryState::Stored); 3],
                "write {n}: the record failed, yet some copy left Stored"
            );
            // One recipient device takes the copy (and acknowledges it)
            // before it is deposited again.
            block_on(c[0].receive(&mut rng, net.now())).unwrap();
            assert_eq!(block_on(a1.flush_outbox()).unwrap(), 3, "write {n}");
        } else {
            assert_eq!(out.deposited, 3, "write {n}");
            done = true;
        }
        assert!(
            block_on(a1.store().outbox()).unwrap().is_empty(),
            "write {n}: every copy recorded as deposited"
        );
        assert_eq!(
            states(&a1, &out.copies),
            vec![Some(DeliveryState::Deposited); 3],
            "write {n}"
        );
        if done {
            break;
        }
    }
    assert!(done, "the send never succeeded");
    assert!(
        record_failed >= 2,
        "faults fell in the record: {record_failed}"
    );
    let (c0, c1) = c.split_at_mut(1);
    settle(&net, &mut [&mut c0[0], &mut c1[0], &mut a2], &mut rng);
    for (who, d) in [("carol 1", &c0[0]), ("carol 2", &c1[0]), ("alice 2", &a2)] {
        let mut shown = ids_shown(d, net.now());
        shown.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(shown, want, "{who} shows each message exactly once");
    }
    let _ = (alice, std::fs::remove_dir_all(&dir));
}
