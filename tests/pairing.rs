//! Pairing a new device over the relay (issue 15, SPEC.md 25.9): the new
//! device shows a payload, an existing device sends it the next list with
//! the code and the account's contacts, the new device countersigns and
//! publishes; refusals (wrong code, expired or used offer, a stranger, a
//! list without the device, malformed bytes) change nothing.

use std::sync::{Arc, Mutex};

use cubbyhole::client::pairing::{
    PairingContact, PairingMessage, PairingOffer, PairingOutcome, PairingRefusal, PayloadError,
    PAIRING_TTL,
};
use cubbyhole::client::{block_on, Client, ClientConfig, ClientError};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{MemoryStore, MessageId, Trust};
use cubbyhole::transport::{DeviceAddress, DeviceDirectory, EnvelopeId};
use cubbyhole::{AccountId, DeviceList};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

type Relayed = InProcessRelay<MemoryRelayStorage>;
type Device = Client<MemoryStore, Relayed, Relayed>;

const T0: u64 = 1_900_000_000;

struct World {
    relay: Relayed,
    clock: Arc<Mutex<u64>>,
    rng: ChaCha20Rng,
}

impl World {
    fn new(seed: u64) -> World {
        let clock = Arc::new(Mutex::new(T0));
        let c = clock.clone();
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
            Arc::new(move || *c.lock().unwrap()),
        );
        World {
            relay,
            clock,
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }
    fn now(&self) -> u64 {
        *self.clock.lock().unwrap()
    }
    fn advance(&self, by: u64) {
        *self.clock.lock().unwrap() += by;
    }
    fn open_store(&mut self, store: MemoryStore, device_id: u32) -> Device {
        let mut d = block_on(Client::open(
            store,
            self.relay.clone(),
            self.relay.clone(),
            ClientConfig {
                device_id,
                ..ClientConfig::default()
            },
            &mut self.rng,
        ))
        .unwrap();
        let now = self.now();
        block_on(d.maintain_prekeys(&mut self.rng, now)).unwrap();
        d
    }
    fn open(&mut self, device_id: u32) -> Device {
        self.open_store(MemoryStore::new(), device_id)
    }
    /// Receives, then takes the pairing messages.
    fn receive(&mut self, d: &mut Device) -> Vec<(EnvelopeId, PairingOutcome)> {
        let now = self.now();
        block_on(d.receive(&mut self.rng, now)).unwrap();
        block_on(d.take_pairings(now)).unwrap()
    }
    fn versions(&self, account: &AccountId) -> Vec<u64> {
        block_on(self.relay.fetch_device_lists(account, 0))
            .unwrap()
            .iter()
            .map(|l| DeviceList::decode(l).unwrap().version())
            .collect()
    }
}

/// Alice's phone with an account that knows Bob's account; Bob; a laptop
/// (device 2) without account.
fn setup(seed: u64) -> (World, Device, Device, Device, AccountId, AccountId) {
    let mut w = World::new(seed);
    let mut phone = w.open(1);
    let mut bob = w.open(1);
    let laptop = w.open(2);
    let now = w.now();
    let alice = block_on(phone.create_account(now)).unwrap();
    let bob_account = block_on(bob.create_account(now)).unwrap();
    block_on(phone.refresh_account(&bob_account, now)).unwrap();
    (w, phone, bob, laptop, alice, bob_account)
}

fn refused(outcomes: &[(EnvelopeId, PairingOutcome)]) -> Vec<PairingRefusal> {
    outcomes
        .iter()
        .map(|(_, o)| match o {
            PairingOutcome::Refused(why) => why.clone(),
            other => panic!("expected a refusal, got {other:?}"),
        })
        .collect()
}

/// Nothing changed on the laptop: no account, the offer still pending
/// (unless `offer_kept` is false), the directory still at version 1.
fn unchanged(w: &World, laptop: &Device, alice: &AccountId, offer_kept: bool) {
    assert!(block_on(laptop.own_account()).unwrap().is_none());
    assert_eq!(
        block_on(laptop.pending_pairing()).unwrap().is_some(),
        offer_kept
    );
    assert_eq!(w.versions(alice), vec![1]);
}

#[test]
fn pairing_happy_path_survives_a_restart_and_gets_messages() {
    let (mut w, mut phone, mut bob, laptop, alice, bob_account) = setup(1);
    let now = w.now();
    let mut laptop = laptop;
    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    let payload = offer.encode().to_vec();
    assert_eq!(payload.len(), 53);
    assert_eq!(payload[0], 0x01);
    assert_eq!(&payload[1..33], &laptop.address().identity);
    assert_eq!(&payload[33..37], &2u32.to_be_bytes());
    // The laptop restarts between showing the code and the pairing.
    let laptop_store = laptop.into_store();
    let mut laptop = w.open_store(laptop_store, 2);
    let pending = block_on(laptop.pending_pairing()).unwrap().unwrap();
    assert_eq!(pending.encode().to_vec(), payload);

    w.advance(60);
    let now = w.now();
    block_on(phone.pair(&mut w.rng, &payload, now)).unwrap();
    let outcomes = w.receive(&mut laptop);
    assert_eq!(outcomes.len(), 1);
    assert_eq!(
        outcomes[0].1,
        PairingOutcome::Joined {
            account: alice,
            version: 2,
            contacts: 1,
            trusted: 0
        }
    );
    // The laptop holds the account at version 2 listing both devices.
    let own = block_on(laptop.own_account()).unwrap().unwrap();
    assert_eq!(*own.account_id(), alice);
    assert_eq!(own.version(), 2);
    let listed: Vec<DeviceAddress> = own
        .devices()
        .iter()
        .map(|e| DeviceAddress::new(&e.identity, e.device_id))
        .collect();
    assert!(listed.contains(&laptop.address()) && listed.contains(&phone.address()));
    // The directory serves version 2, countersigned by the laptop.
    assert_eq!(w.versions(&alice), vec![1, 2]);
    // The contact came along, the offer is gone, the inbox is empty.
    assert!(block_on(laptop.account(&bob_account)).unwrap().is_some());
    assert!(block_on(laptop.pending_pairing()).unwrap().is_none());
    assert!(block_on(laptop.inbox()).unwrap().is_empty());
    // The phone sees the new version; Bob's next message reaches the laptop.
    let report = block_on(phone.refresh_own_account(now)).unwrap();
    assert_eq!(report.version, 2);
    block_on(bob.refresh_account(&alice, now)).unwrap();
    let sent = block_on(bob.send_to_account(&mut w.rng, &alice, b"hi both", now)).unwrap();
    assert_eq!(sent.copies.len(), 2);
    block_on(laptop.receive(&mut w.rng, now)).unwrap();
    let inbox = block_on(laptop.account_inbox(now)).unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].body, b"hi both");
    assert_eq!(inbox[0].account, Some(bob_account));
}

#[test]
fn wrong_code_is_refused() {
    let (mut w, mut phone, _bob, mut laptop, alice, _) = setup(2);
    let now = w.now();
    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    let mut payload = offer.encode().to_vec();
    payload[52] ^= 1;
    block_on(phone.pair(&mut w.rng, &payload, now)).unwrap();
    assert_eq!(
        refused(&w.receive(&mut laptop)),
        vec![PairingRefusal::WrongCode]
    );
    unchanged(&w, &laptop, &alice, true);
}

#[test]
fn expired_offer_is_refused() {
    let (mut w, mut phone, _bob, mut laptop, alice, _) = setup(3);
    let now = w.now();
    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    block_on(phone.pair(&mut w.rng, &offer.encode(), now)).unwrap();
    w.advance(PAIRING_TTL + 1);
    assert_eq!(
        refused(&w.receive(&mut laptop)),
        vec![PairingRefusal::Expired]
    );
    // The expired offer is dropped.
    unchanged(&w, &laptop, &alice, false);
}

#[test]
fn a_used_offer_takes_no_second_pairing_message() {
    let (mut w, mut phone, _bob, mut laptop, alice, _) = setup(4);
    let now = w.now();
    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    let payload = offer.encode().to_vec();
    block_on(phone.pair(&mut w.rng, &payload, now)).unwrap();
    let outcomes = w.receive(&mut laptop);
    assert!(matches!(outcomes[..], [(_, PairingOutcome::Joined { .. })]));
    let before = block_on(laptop.own_account()).unwrap().unwrap().encode();
    // The phone sends the same pairing again (same payload, its own list
    // still at version 1: the same version 2): refused, nothing changes.
    block_on(phone.pair(&mut w.rng, &payload, now)).unwrap();
    assert_eq!(
        refused(&w.receive(&mut laptop)),
        vec![PairingRefusal::NoOffer]
    );
    assert_eq!(
        block_on(laptop.own_account()).unwrap().unwrap().encode(),
        before
    );
    assert_eq!(w.versions(&alice), vec![1, 2]);
}

#[test]
fn no_offer_pending_is_refused() {
    let (mut w, mut phone, _bob, mut laptop, alice, _) = setup(5);
    let now = w.now();
    // A payload for the laptop, made up by someone else: the laptop never
    // offered.
    let offer = PairingOffer {
        device: laptop.address(),
        code: [7u8; 16].into(),
        expires_at: 0,
    };
    block_on(phone.pair(&mut w.rng, &offer.encode(), now)).unwrap();
    assert_eq!(
        refused(&w.receive(&mut laptop)),
        vec![PairingRefusal::NoOffer]
    );
    unchanged(&w, &laptop, &alice, false);
}

#[test]
fn a_strangers_pairing_message_is_refused() {
    let (mut w, mut phone, _bob, mut laptop, alice, _) = setup(6);
    let now = w.now();
    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    // The stranger saw the code and holds a valid version 2 signed by the
    // phone (the best case for it): it is not a device of the account.
    let list = block_on(phone.add_device(&laptop.address())).unwrap();
    let mut stranger = w.open(9);
    let message = PairingMessage {
        message: MessageId([1; 16]),
        code: offer.code.clone(),
        list,
        contacts: Vec::new(),
    };
    block_on(stranger.send(&mut w.rng, &laptop.address(), &message.encode(), now)).unwrap();
    assert_eq!(
        refused(&w.receive(&mut laptop)),
        vec![PairingRefusal::Stranger]
    );
    unchanged(&w, &laptop, &alice, true);
}

#[test]
fn a_list_without_this_device_is_refused() {
    let (mut w, mut phone, _bob, mut laptop, alice, _) = setup(7);
    let now = w.now();
    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    let other = w.open(3);
    let list = block_on(phone.add_device(&other.address())).unwrap();
    let message = PairingMessage {
        message: MessageId([2; 16]),
        code: offer.code.clone(),
        list,
        contacts: Vec::new(),
    };
    block_on(phone.send(&mut w.rng, &laptop.address(), &message.encode(), now)).unwrap();
    assert_eq!(
        refused(&w.receive(&mut laptop)),
        vec![PairingRefusal::NotListed]
    );
    unchanged(&w, &laptop, &alice, true);
}

#[test]
fn malformed_payloads_give_typed_errors() {
    let (mut w, mut phone, _bob, mut laptop, alice, _) = setup(8);
    let now = w.now();
    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    let good = offer.encode().to_vec();
    assert_eq!(PairingOffer::decode(&[]), Err(PayloadError::Length(0)));
    assert_eq!(
        PairingOffer::decode(&good[..52]),
        Err(PayloadError::Length(52))
    );
    let mut long = good.clone();
    long.push(0);
    assert_eq!(PairingOffer::decode(&long), Err(PayloadError::Length(54)));
    let mut format = good.clone();
    format[0] = 0x02;
    assert_eq!(PairingOffer::decode(&format), Err(PayloadError::Format(2)));
    let mut key = good.clone();
    key[1..33].copy_from_slice(&[0u8; 32]); // a point of small order
    assert_eq!(PairingOffer::decode(&key), Err(PayloadError::IdentityKey));
    key[1..33].copy_from_slice(&[0xffu8; 32]); // not canonical
    assert_eq!(PairingOffer::decode(&key), Err(PayloadError::IdentityKey));
    assert!(matches!(
        block_on(phone.pair(&mut w.rng, &good[..10], now)),
        Err(ClientError::Payload(PayloadError::Length(10)))
    ));
    assert!(matches!(
        block_on(phone.pair(&mut w.rng, &format, now)),
        Err(ClientError::Payload(PayloadError::Format(2)))
    ));
    // Every truncation and every single-bit flip decodes or gives a typed
    // error (a panic fails the test); the error is the one the position
    // calls for.
    for n in 0..good.len() {
        assert_eq!(
            PairingOffer::decode(&good[..n]),
            Err(PayloadError::Length(n))
        );
    }
    for bit in 0..good.len() * 8 {
        let mut b = good.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        match PairingOffer::decode(&b) {
            Ok(_) => assert!(bit / 8 >= 1, "format byte flip accepted"),
            Err(PayloadError::Format(_)) => assert_eq!(bit / 8, 0),
            Err(PayloadError::IdentityKey) => assert!((1..33).contains(&(bit / 8))),
            Err(e) => panic!("unexpected {e:?} at bit {bit}"),
        }
    }
    unchanged(&w, &laptop, &alice, true);
}

#[test]
fn malformed_pairing_messages_are_refused_and_never_panic() {
    let (mut w, mut phone, _bob, mut laptop, alice, bob_account) = setup(10);
    let now = w.now();
    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    let list = block_on(phone.add_device(&laptop.address())).unwrap();
    let message = PairingMessage {
        message: MessageId([3; 16]),
        code: offer.code.clone(),
        list,
        contacts: vec![PairingContact {
            account: bob_account,
            trust: Trust::Validated,
            version: 1,
            head_hash: [7; 32],
        }],
    };
    let good = message.encode().to_vec();
    assert_eq!(PairingMessage::decode(&good).unwrap(), message);
    for n in 0..good.len() {
        assert_eq!(
            PairingMessage::decode(&good[..n]),
            Err(PairingRefusal::Malformed),
            "truncated to {n}"
        );
    }
    for bit in 0..good.len() * 8 {
        let mut b = good.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        let _ = PairingMessage::decode(&b);
    }
    // One malformed message through the relay: refused, nothing changes.
    block_on(phone.send(&mut w.rng, &laptop.address(), &good[..good.len() - 1], now)).unwrap();
    assert_eq!(
        refused(&w.receive(&mut laptop)),
        vec![PairingRefusal::Malformed]
    );
    unchanged(&w, &laptop, &alice, true);
}

/// The pending offer survives reopening a SQLite store, sealed: the code
/// is not in the file in the clear, and `Debug` does not show it.
#[cfg(feature = "sqlite")]
#[test]
fn the_offer_survives_a_sqlite_restart_sealed() {
    use cubbyhole::storage::{BlockingStore, PairingRecord, SqliteStore};
    let dir = std::env::temp_dir().join(format!("cubbyhole-pairing-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let key = [5u8; 32];
    let record = PairingRecord {
        code: [0xa7u8; 16].into(),
        created_at: T0,
        expires_at: T0 + PAIRING_TTL,
    };
    {
        let mut store = SqliteStore::open(&dir, &key).unwrap();
        assert!(store.pairing().unwrap().is_none());
        store.set_pairing(Some(&record)).unwrap();
    }
    let bytes = std::fs::read(&dir).unwrap();
    assert!(!bytes.windows(16).any(|w| w == [0xa7u8; 16]));
    let mut store = SqliteStore::open(&dir, &key).unwrap();
    assert_eq!(store.pairing().unwrap(), Some(record.clone()));
    assert!(!format!("{record:?}").contains("167"));
    store.set_pairing(None).unwrap();
    assert!(store.pairing().unwrap().is_none());
    drop(store);
    let _ = std::fs::remove_file(&dir);
}

/// The new device takes the pairing device's trust in each contact (SPEC
/// 25.9): validated when it fetches the very list the phone validated,
/// compromised always; a contact whose list moved on since the phone
/// validated it stays unvalidated (the new device did not see what was
/// compared), as does one the phone never validated.
#[test]
fn the_new_device_takes_the_trust_in_contacts_it_can_match() {
    let (mut w, mut phone, _bob, laptop, alice, bob_account) = setup(11);
    let mut laptop = laptop;
    let now = w.now();
    let (mut carol, mut dave, mut erin) = (w.open(1), w.open(1), w.open(1));
    let carol_account = block_on(carol.create_account(now)).unwrap();
    let dave_account = block_on(dave.create_account(now)).unwrap();
    let erin_account = block_on(erin.create_account(now)).unwrap();
    for a in [&carol_account, &dave_account, &erin_account] {
        block_on(phone.refresh_account(a, now)).unwrap();
    }
    // Bob and Dave validated, Carol compromised, Erin left unvalidated.
    block_on(phone.set_account_trust(&bob_account, Trust::Validated, now)).unwrap();
    block_on(phone.set_account_trust(&dave_account, Trust::Validated, now)).unwrap();
    block_on(phone.set_account_trust(&carol_account, Trust::Compromised, now)).unwrap();
    // Dave adds a device after the phone validated him: the directory
    // serves version 2, the phone holds version 1.
    let dave2 = w.open(2);
    let list = block_on(dave.add_device(&dave2.address())).unwrap();
    let mut dave2 = dave2;
    block_on(dave2.join_account(&list, now)).unwrap();

    let offer = block_on(laptop.pairing_offer(&mut w.rng, now)).unwrap();
    block_on(phone.pair(&mut w.rng, &offer.encode(), now)).unwrap();
    let outcomes = w.receive(&mut laptop);
    assert_eq!(
        outcomes[0].1,
        PairingOutcome::Joined {
            account: alice,
            version: 2,
            contacts: 4,
            trusted: 2
        }
    );
    let trust = |a: &AccountId| block_on(laptop.account(a)).unwrap().unwrap().trust;
    assert_eq!(trust(&bob_account), Trust::Validated);
    assert_eq!(trust(&carol_account), Trust::Compromised);
    assert_eq!(
        trust(&dave_account),
        Trust::Unvalidated,
        "the list moved on"
    );
    assert_eq!(trust(&erin_account), Trust::Unvalidated);
}
