//! Several devices per person (issue 15):
//!
//! ```text
//! cargo run --example devices
//! ```
//!
//! Alice has a phone and a laptop, Bob one device. Alice's phone creates her
//! account; the laptop joins it by pairing (it shows a payload, the phone
//! sends it the next version of the device list with the pairing code
//! through the relay, the laptop countersigns and publishes it). Bob fetches Alice's list from
//! the directory and sends to the person: one copy per device of Alice's,
//! each through its own pairwise session. Alice's laptop is offline for a
//! week meanwhile; when it comes back it gets everything, and the copies of
//! what her phone sent ("sent" copies). Then the laptop is stolen: the
//! phone removes it. Once Bob has the new list, nothing more goes to the
//! laptop and what it sends is refused.
//!
//! The output shows who receives what; the example checks it and exits
//! with an error if anything is off.

use std::error::Error;
use std::sync::{Arc, Mutex};

use cubbyhole::client::accounts::AccountChange;
use cubbyhole::client::pairing::PairingOutcome;
use cubbyhole::client::{block_on, Client, ClientConfig, Rejection};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{MemoryStore, Trust};
use cubbyhole::{AccountId, OsRng};

type Relayed = InProcessRelay<MemoryRelayStorage>;
type Device = Client<MemoryStore, Relayed, Relayed>;

const DAY: u64 = 24 * 3600;

/// The example's clock, which it moves (the relay reads the same one).
#[derive(Clone)]
struct Clock(Arc<Mutex<u64>>);

impl Clock {
    fn now(&self) -> u64 {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn advance(&self, by: u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

fn open(relay: &Relayed, clock: &Clock, device_id: u32) -> Result<Device, Box<dyn Error>> {
    let mut device = block_on(Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay.clone(),
        ClientConfig {
            device_id,
            ..ClientConfig::default()
        },
        &mut OsRng,
    ))?;
    block_on(device.maintain_prekeys(&mut OsRng, clock.now()))?;
    Ok(device)
}

/// Receives what is waiting and prints it; returns the bodies shown.
fn receive(name: &str, device: &mut Device, clock: &Clock) -> Result<Vec<String>, Box<dyn Error>> {
    let before = block_on(device.account_inbox(clock.now()))?.len();
    let report = block_on(device.receive(&mut OsRng, clock.now()))?;
    let refused = report
        .rejected
        .iter()
        .filter(|(_, why)| *why == Rejection::Compromised)
        .count();
    let inbox = block_on(device.account_inbox(clock.now()))?;
    let mut shown = Vec::new();
    for m in &inbox[before..] {
        let body = String::from_utf8_lossy(&m.body).into_owned();
        let kind = if m.sent_copy {
            "sent copy (by her own account)"
        } else {
            "received"
        };
        println!("   {name:<14} {kind:<31} {body:?}");
        shown.push(body);
    }
    if shown.is_empty() {
        println!("   {name:<14} nothing new");
    }
    if refused > 0 {
        println!("   {name:<14} refused {refused} envelope(s) from a revoked device");
    }
    Ok(shown)
}

fn check(what: &str, ok: bool) -> Result<(), Box<dyn Error>> {
    if ok {
        Ok(())
    } else {
        Err(format!("the example's claim failed: {what}").into())
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let clock = Clock(Arc::new(Mutex::new(1_900_000_000)));
    let c = clock.clone();
    let relay = InProcessRelay::with_clock(
        Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
        Arc::new(move || c.now()),
    );

    println!("1. Alice's phone creates her account; her laptop joins it by pairing");
    let mut phone = open(&relay, &clock, 1)?;
    let mut laptop = open(&relay, &clock, 2)?;
    let alice: AccountId = block_on(phone.create_account(clock.now()))?;
    // The laptop shows a pairing payload (a QR code); the phone scans it and
    // sends the laptop the next device list with the code, through the relay.
    let offer = block_on(laptop.pairing_offer(&mut OsRng, clock.now()))?;
    block_on(phone.pair(&mut OsRng, &offer.encode(), clock.now()))?;
    block_on(laptop.receive(&mut OsRng, clock.now()))?;
    let paired = block_on(laptop.take_pairings(clock.now()))?;
    check(
        "the laptop joined Alice's account through the pairing message",
        matches!(paired[..], [(_, PairingOutcome::Joined { version: 2, .. })]),
    )?;
    block_on(phone.refresh_own_account(clock.now()))?;
    let list = block_on(phone.own_account())?.ok_or("no account")?;
    println!(
        "   account {}.., device list version {}, {} devices",
        &alice.to_string()[..16],
        list.version(),
        list.devices().len()
    );

    println!("2. Bob (one device) looks Alice up and validates her");
    let mut bob = open(&relay, &clock, 1)?;
    let bob_account = block_on(bob.create_account(clock.now()))?;
    let report = block_on(bob.refresh_account(&alice, clock.now()))?;
    check(
        "Bob sees Alice's account as new",
        report.change == AccountChange::New,
    )?;
    let number = block_on(bob.account_safety_number(&alice))?;
    println!("   safety number (stays the same when Alice's devices change): {number}");
    block_on(bob.set_account_trust(&alice, Trust::Validated, clock.now()))?;
    block_on(phone.refresh_account(&bob_account, clock.now()))?;

    println!("3. Alice's laptop goes offline for a week; Bob and her phone write");
    let sent = block_on(bob.send_to_account(&mut OsRng, &alice, b"hello Alice", clock.now()))?;
    println!(
        "   Bob's message went as {} copies (one per device of Alice's), one commit",
        sent.copies.len()
    );
    check("one copy per device of Alice's", sent.copies.len() == 2)?;
    let got = receive("Alice's phone", &mut phone, &clock)?;
    check("the phone got Bob's message", got == ["hello Alice"])?;
    let reply = block_on(phone.send_to_account(&mut OsRng, &bob_account, b"hi Bob", clock.now()))?;
    println!(
        "   the phone's reply went as {} copies (Bob's device, and Alice's laptop as a sent copy)",
        reply.copies.len()
    );
    let got = receive("Bob", &mut bob, &clock)?;
    check("Bob got the reply", got == ["hi Bob"])?;
    clock.advance(7 * DAY);

    println!("4. A week later the laptop comes back online");
    block_on(laptop.refresh_account(&bob_account, clock.now()))?;
    let mut got = receive("Alice's laptop", &mut laptop, &clock)?;
    // Two senders: the order between them is the order fetched (a first
    // message waits in the published mailbox, the rest in the private
    // inbox, SPEC.md 26.11); each sender's own order is kept.
    got.sort();
    check(
        "the laptop got Bob's message and the phone's sent copy, once each",
        got == ["hello Alice", "hi Bob"],
    )?;

    println!("5. The laptop is stolen; Alice's phone removes it from her account");
    let report = block_on(phone.remove_device(&laptop.address(), clock.now()))?;
    println!(
        "   device list version {}, removed {} device(s)",
        report.version,
        report.removed.len()
    );
    let report = block_on(bob.refresh_account(&alice, clock.now()))?;
    println!(
        "   Bob fetches the new list: {:?}, Alice stays {:?}",
        report.change, report.trust
    );
    check(
        "Bob verifies the removal through the chain and keeps Alice validated",
        report.change == AccountChange::Verified && report.trust == Trust::Validated,
    )?;
    let sent = block_on(bob.send_to_account(&mut OsRng, &alice, b"are you ok?", clock.now()))?;
    println!(
        "   Bob's next message goes as {} copy (the phone only)",
        sent.copies.len()
    );
    check("the laptop is no recipient", sent.copies.len() == 1)?;
    let thief =
        block_on(laptop.send_to_account(&mut OsRng, &bob_account, b"send money", clock.now()))?;
    println!(
        "   the thief sends from the laptop ({} copies)",
        thief.copies.len()
    );
    let got = receive("Bob", &mut bob, &clock)?;
    check("Bob shows nothing from the thief", got.is_empty())?;
    let got = receive("Alice's phone", &mut phone, &clock)?;
    check(
        "the phone shows Bob's message and nothing from the thief",
        got == ["are you ok?"],
    )?;
    let got = receive("Alice's laptop", &mut laptop, &clock)?;
    check("the stolen laptop gets nothing new", got.is_empty())?;
    println!("ok: every claim above was checked");
    Ok(())
}
