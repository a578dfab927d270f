//! A full offline session between Alice and Bob, end to end.
//!
//! Run with `cargo run --example quickstart`.
//!
//! cubbyhole is sans-IO: it never touches the network, the disk or the clock.
//! Everything that would be I/O in a real application is simulated here with
//! plain collections:
//!
//! - a *directory* (`HashMap<&str, Vec<u8>>`) where devices publish prekey
//!   bundles. Nobody trusts it: whatever comes out of it is verified.
//! - a *mailbox* (`Vec<Vec<u8>>`) that holds messages for an offline
//!   recipient and hands them over in whatever order it likes, sometimes
//!   twice.
//! - *disk* (`Vec<u8>`) where sessions are saved between runs.
//!
//! Randomness is the operating system's (`cubbyhole::OsRng`), and the current
//! time is read once by the application and passed in explicitly.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::{SystemTime, UNIX_EPOCH};

use cubbyhole::{
    Error, FreshnessPolicy, IdentityKeyPair, Incoming, OsRng, PrekeyBundle, PrekeyStore,
    SafetyNumber, Session, SessionConfig,
};

const DAY: u64 = 24 * 60 * 60;

fn main() -> Result<(), Box<dyn StdError>> {
    let mut rng = OsRng;
    // The application owns the clock; the crate only ever sees numbers.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();

    // ------------------------------------------------------------------
    // 1. Bob sets up his device and publishes a prekey bundle.
    // ------------------------------------------------------------------
    println!("== Bob publishes a prekey bundle");
    let bob = IdentityKeyPair::generate(&mut rng);
    // The store holds Bob's private prekeys: a signed prekey (id 1, created
    // now) and a batch of one-time prekeys, each usable by one session.
    let mut bob_prekeys = PrekeyStore::new(&mut rng, &bob, now)?;
    bob_prekeys.generate_one_time_prekeys(&mut rng, 5);

    // The untrusted directory: device name -> encoded bundle.
    let mut directory: HashMap<&str, Vec<u8>> = HashMap::new();
    let published = bob_prekeys.bundle(&bob).encode();
    println!(
        "   bundle: {} bytes, {} one-time prekeys held",
        published.len(),
        bob_prekeys.one_time_prekey_count()
    );
    directory.insert("bob", published);

    // ------------------------------------------------------------------
    // 2. Two days later Alice fetches and verifies the bundle.
    // ------------------------------------------------------------------
    println!("== Alice fetches and verifies it (two days later)");
    let alice = IdentityKeyPair::generate(&mut rng);
    let alice_now = now + 2 * DAY;
    let fetched = directory
        .get("bob")
        .ok_or("Bob has not published a bundle")?;

    // The directory could have tampered with the bundle. A single changed
    // byte of the signed prekey breaks Bob's signature over it.
    let mut tampered = fetched.clone();
    tampered[45] ^= 1; // first byte of the signed prekey's public key
    let tampered = PrekeyBundle::decode(&tampered)?.verify(alice_now, FreshnessPolicy::default());
    println!("   tampered copy:        {:?}", tampered.as_ref().err());
    // (Each claim this example prints is also checked: CI runs it, and a
    // wrong claim makes it exit with an error.)
    if !matches!(tampered, Err(Error::Signature)) {
        return Err("a tampered bundle was not refused for its signature".into());
    }
    // A bundle older than the policy allows is refused too (here: 1 day).
    let stale = PrekeyBundle::decode(fetched)?.verify(alice_now, FreshnessPolicy::max_age(DAY));
    println!("   with a 1-day policy:  {:?}", stale.as_ref().err());
    if !matches!(stale, Err(Error::StaleBundle)) {
        return Err("a bundle older than the policy was not refused as stale".into());
    }
    // The real thing: decode (structure + identity key), then verify the
    // signature and the age at `alice_now` (default policy: 30 days).
    let bundle = PrekeyBundle::decode(fetched)?.verify(alice_now, FreshnessPolicy::default())?;
    println!(
        "   verified: signed prekey {}, one-time prekey {:?}",
        bundle.signed_prekey_id(),
        bundle.one_time_prekey().map(|(id, _)| id)
    );

    // ------------------------------------------------------------------
    // 3. Alice starts a session (X3DH) and leaves messages in the mailbox.
    // ------------------------------------------------------------------
    println!("== Alice writes to Bob while he is offline");
    let mut alice_session = Session::initiate(&mut rng, &alice, &bundle, SessionConfig::default())?;
    let mut mailbox: Vec<Vec<u8>> = Vec::new();
    let texts = [
        "hi Bob, it's Alice",
        "got your key from the directory",
        "call me?",
        "ok, bye",
    ];
    for text in texts {
        let wire = alice_session.encrypt(&mut rng, text.as_bytes())?;
        // Until Alice hears back, every message carries the X3DH fields, so
        // Bob can start the session from whichever one reaches him first.
        println!(
            "   sent {:>2} bytes ({}): {text:?}",
            wire.len(),
            kind(&wire)?
        );
        mailbox.push(wire);
    }

    // ------------------------------------------------------------------
    // 4. Bob comes online. The mailbox delivers out of order, once twice.
    // ------------------------------------------------------------------
    println!("== Bob collects his mail: order 2, 0, 3, 0 (again), 1");
    let mut bob_session: Option<Session> = None;
    let mut seen = [false; 4];
    for index in [2, 0, 3, 0, 1] {
        let wire = &mailbox[index];
        let incoming = Incoming::decode(wire)?;
        // Route the message. A prekey message that matches an existing
        // session (same IK_A and EK_A) is a repeat and goes to that session;
        // a new one goes through the prekey store, which creates a session
        // and deletes the one-time prekey it used.
        let result = match bob_session.as_mut() {
            Some(session) if session.matches(&incoming) => {
                let mut plaintext = Vec::new();
                session
                    .decrypt_incoming(&incoming, &mut plaintext)
                    .map(|()| plaintext)
            }
            _ => {
                let accepted = bob_prekeys.accept(&bob, &incoming, SessionConfig::default())?;
                println!(
                    "   new session with identity {}..., one-time prekey {:?} consumed ({} left)",
                    hex_prefix(accepted.session.remote_identity().as_bytes()),
                    accepted.consumed_one_time_prekey,
                    bob_prekeys.one_time_prekey_count()
                );
                bob_session = Some(accepted.session);
                Ok(accepted.plaintext)
            }
        };
        match result {
            Ok(plaintext) => {
                println!("   #{index}: {:?}", String::from_utf8_lossy(&plaintext));
                if plaintext != texts[index].as_bytes() || seen[index] {
                    return Err(format!("message #{index} decrypted wrong or twice").into());
                }
                seen[index] = true;
            }
            // A replay or double delivery: nothing to show, nothing changed.
            Err(Error::Duplicate) if seen[index] => println!("   #{index}: rejected, duplicate"),
            Err(e) => return Err(e.into()),
        }
    }
    if seen != [true; 4] {
        return Err("a message was not delivered".into());
    }
    let mut bob_session = bob_session.ok_or("Bob received no message")?;
    println!(
        "   skipped keys still held by Bob: {}",
        bob_session.skipped_message_keys()
    );

    // ------------------------------------------------------------------
    // 5. Bob replies; Alice stops sending prekey messages.
    // ------------------------------------------------------------------
    println!("== Bob replies");
    let reply = bob_session.encrypt(&mut rng, b"hi Alice! calling you tonight")?;
    println!("   sent {} bytes ({})", reply.len(), kind(&reply)?);
    let plaintext = alice_session.decrypt(&reply)?;
    println!("   Alice reads: {:?}", String::from_utf8_lossy(&plaintext));
    println!(
        "   Alice still sends prekey messages: {}",
        alice_session.sends_prekey_messages()
    );
    if plaintext != b"hi Alice! calling you tonight" || alice_session.sends_prekey_messages() {
        return Err("Alice misread Bob's reply, or still sends prekey messages".into());
    }
    let wire = alice_session.encrypt(&mut rng, b"great, talk tonight")?;
    println!("   Alice sends {} bytes ({})", wire.len(), kind(&wire)?);
    let plaintext = bob_session.decrypt(&wire)?;
    println!("   Bob reads: {:?}", String::from_utf8_lossy(&plaintext));
    if plaintext != b"great, talk tonight" {
        return Err("Bob misread Alice's message".into());
    }

    // ------------------------------------------------------------------
    // 6. Both restart: sessions are saved and restored.
    // ------------------------------------------------------------------
    println!("== Both apps restart");
    // The bytes contain secret keys: a real application stores them
    // encrypted. `to_bytes` returns a buffer that is zeroized on drop. They
    // do not contain the identity keys: the application knows its own, and
    // keys its sessions by the peer's.
    let alice_disk: Vec<u8> = alice_session.to_bytes().to_vec();
    let bob_disk: Vec<u8> = bob_session.to_bytes().to_vec();
    println!(
        "   saved: Alice {} bytes, Bob {} bytes",
        alice_disk.len(),
        bob_disk.len()
    );
    drop((alice_session, bob_session));
    let mut alice_session = Session::from_bytes(&alice_disk, alice.public(), bob.public())?;
    let mut bob_session = Session::from_bytes(&bob_disk, bob.public(), alice.public())?;
    let wire = bob_session.encrypt(&mut rng, b"still here after the restart")?;
    let plaintext = alice_session.decrypt(&wire)?;
    println!(
        "   after restore, Alice reads: {:?}",
        String::from_utf8_lossy(&plaintext)
    );
    if plaintext != b"still here after the restart" {
        return Err("the restored sessions do not talk".into());
    }

    // ------------------------------------------------------------------
    // 7. Out of band, they compare safety numbers.
    // ------------------------------------------------------------------
    println!("== Safety number (read aloud, compare in person)");
    // Each side computes it from the identity keys its session holds; the
    // order of the arguments does not matter.
    let on_alice = SafetyNumber::new(
        alice_session.local_identity(),
        alice_session.remote_identity(),
    );
    let on_bob = SafetyNumber::new(bob_session.remote_identity(), bob_session.local_identity());
    println!("   Alice sees: {on_alice}");
    println!("   Bob sees:   {on_bob}");
    if on_alice != on_bob {
        return Err("safety numbers differ: someone is in the middle".into());
    }
    println!("   match: the directory did not swap any key");
    Ok(())
}

/// Names the kind of a wire message, for the printout.
fn kind(wire: &[u8]) -> Result<&'static str, Error> {
    Ok(match Incoming::decode(wire)?.prekey() {
        Some(_) => "prekey message",
        None => "message",
    })
}

/// The first four bytes of a key in hex, for the printout.
fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}
