//! The offline story end to end, on real files:
//!
//! ```text
//! cargo run --example offline_chat --features sqlite
//! ```
//!
//! Bob creates his device (an encrypted SQLite store in a temporary
//! directory), publishes prekeys to a relay (itself a SQLite file), and goes
//! offline: his store is closed. Alice sends him several messages. Bob comes
//! back, reopens his store from disk, receives them, and replies; Alice
//! receives the reply. Along the way it prints what the relay holds:
//! addresses and opaque bytes, which is all the untrusted side learns.

use std::error::Error;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, Relay, RelayConfig, RelayStorage, SqliteRelayStorage};
use cubbyhole::storage::{DeliveryState, SqliteStore};
use cubbyhole::transport::DeviceAddress;
use cubbyhole::OsRng;

type Relayed = InProcessRelay<SqliteRelayStorage>;
type Device = Client<SqliteStore, Relayed, Relayed>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn open(dir: &Path, name: &str, key: &[u8; 32], relay: &Relayed) -> Result<Device, Box<dyn Error>> {
    let store = SqliteStore::open(dir.join(format!("{name}.db")), key)?;
    Ok(block_on(Client::open(
        store,
        relay.clone(),
        relay.clone(),
        ClientConfig::default(),
        &mut OsRng,
    ))?)
}

fn show_relay(relay: &Relayed, mailboxes: &[(&str, DeviceAddress)]) -> Result<(), Box<dyn Error>> {
    println!("   -- what the relay holds --");
    relay.with_relay(|r| -> Result<(), Box<dyn Error>> {
        for (name, device) in mailboxes {
            let mailbox = device.mailbox();
            let opks = r.storage().one_time_prekey_count(device)?;
            let envelopes = r.storage().list_envelopes(&mailbox, 0, 100, u64::MAX)?;
            println!(
                "   {name:<5} device {}..  mailbox {}..  {opks} one-time prekeys, {} envelopes",
                &hex(&device.identity)[..16],
                &hex(&mailbox.0)[..16],
                envelopes.len()
            );
            for e in envelopes {
                println!(
                    "           envelope {}..  {} bytes: {}..",
                    &hex(&e.id.0)[..12],
                    e.payload.len(),
                    &hex(&e.payload)[..48]
                );
            }
        }
        Ok(())
    })??;
    Ok(())
}

fn print_inbox(
    device: &mut Device,
    name: &str,
    names: &[(&str, DeviceAddress)],
) -> Result<(), Box<dyn Error>> {
    for m in block_on(device.inbox())? {
        let from = names
            .iter()
            .find(|(_, a)| *a == m.from)
            .map_or("someone", |(n, _)| n);
        println!(
            "   {name} reads from {from}: {}",
            String::from_utf8_lossy(&m.body)
        );
        block_on(device.remove_from_inbox(&m.envelope_id))?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!("cubbyhole-offline-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("files in {}", dir.display());
    let relay: Relayed = InProcessRelay::new(Relay::new(
        SqliteRelayStorage::open(dir.join("relay.db"))?,
        RelayConfig::unpriced(),
    ));
    let (bob_key, alice_key) = ([0xB0; 32], [0xA1; 32]); // from each app's keychain

    println!("\n== Bob sets up his device and publishes prekeys, then goes offline");
    let mut bob = open(&dir, "bob", &bob_key, &relay)?;
    block_on(bob.maintain_prekeys(&mut OsRng, now()))?;
    let bob_address = bob.address();
    drop(bob); // the store is closed; Bob is offline

    println!("\n== Alice sets up her device and writes to Bob");
    let mut alice = open(&dir, "alice", &alice_key, &relay)?;
    block_on(alice.maintain_prekeys(&mut OsRng, now()))?;
    let alice_address = alice.address();
    let names = [("Alice", alice_address), ("Bob", bob_address)];
    let mut sent_ids = Vec::new();
    for text in [
        "Hi Bob, it's Alice.",
        "I got your key from the directory.",
        "Write back when you're online.",
    ] {
        let sent = block_on(alice.send(&mut OsRng, &bob_address, text.as_bytes(), now()))?;
        println!("   Alice -> Bob: {text}  (deposited: {})", sent.deposited);
        sent_ids.push((text, sent.message));
    }
    show_relay(&relay, &names)?;

    println!("\n== Bob comes back: reopens his store from disk and receives");
    let mut bob = open(&dir, "bob", &bob_key, &relay)?;
    let report = block_on(bob.receive(&mut OsRng, now()))?;
    println!(
        "   received {}, redelivered {}, rejected {}, missing {:?} (and a receipt goes back)",
        report.received,
        report.redelivered,
        report.rejected.len(),
        report.missing
    );
    // What this example prints is also checked (CI runs it): a wrong claim
    // makes it exit with an error.
    if report.received != 3 || !report.rejected.is_empty() {
        return Err(format!("Bob received {} of Alice's 3 messages", report.received).into());
    }
    print_inbox(&mut bob, "Bob", &names)?;
    block_on(bob.send(
        &mut OsRng,
        &alice_address,
        b"Hi Alice! Got all three.",
        now(),
    ))?;
    println!("   Bob -> Alice: Hi Alice! Got all three.");
    show_relay(&relay, &names)?;

    println!("\n== Alice receives the reply, and Bob's receipt");
    block_on(alice.receive(&mut OsRng, now()))?;
    print_inbox(&mut alice, "Alice", &names)?;
    for (text, id) in sent_ids {
        let state = block_on(alice.delivery(&id))?.ok_or("a sent message was not kept")?;
        println!("   {text:36} {state:?}");
        if state != DeliveryState::Delivered {
            return Err(format!("{text:?} is {state:?}, not delivered").into());
        }
    }

    println!("\n== Safety number (compare out of band)");
    let (on_alice, on_bob) = (
        alice.safety_number(&bob_address)?,
        bob.safety_number(&alice_address)?,
    );
    println!("   Alice sees: {on_alice}");
    println!("   Bob sees:   {on_bob}");
    if on_alice != on_bob {
        return Err("the safety numbers differ".into());
    }
    show_relay(&relay, &names)?;

    drop((alice, bob, relay));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
