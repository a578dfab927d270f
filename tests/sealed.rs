//! Profile v2 sessions (SPEC.md section 26): sealed prekey messages, chain
//! messages routed by their tags, padding, and state encoding version 3.

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::sealed::{self, size_class, CHAIN_OVERHEAD, MIN_CLASS};
use cubbyhole::{
    Error, IdentityKeyPair, Incoming, PrekeyBundle, PrekeyStore, Session, SessionConfig,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const NOW: u64 = 1_800_000_000;
const W: u32 = 32;

struct Pair {
    rng: ChaCha20Rng,
    alice: IdentityKeyPair,
    bob: IdentityKeyPair,
    bob_prekeys: PrekeyStore,
}

fn pair(seed: u64, one_time_prekeys: u32) -> Pair {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = IdentityKeyPair::generate(&mut rng);
    let mut bob_prekeys = PrekeyStore::new(&mut rng, &bob, NOW).unwrap();
    bob_prekeys.generate_one_time_prekeys(&mut rng, one_time_prekeys);
    Pair {
        rng,
        alice,
        bob,
        bob_prekeys,
    }
}

impl Pair {
    fn initiate(&mut self) -> Session {
        let bundle = PrekeyBundle::decode(&self.bob_prekeys.bundle(&self.bob).encode())
            .unwrap()
            .verify(NOW, FreshnessPolicy::default())
            .unwrap();
        Session::initiate_sealed(
            &mut self.rng,
            &self.alice,
            &bundle,
            SessionConfig::default(),
        )
        .unwrap()
    }
    fn accept(&mut self, payload: &[u8]) -> Result<(Session, Vec<u8>), Error> {
        let inner = self.bob_prekeys.open_sealed(payload)?;
        let incoming = Incoming::decode(&inner)?;
        let a = self
            .bob_prekeys
            .accept(&self.bob, &incoming, SessionConfig::default())?;
        Ok((a.session, a.plaintext))
    }
}

fn open(s: &mut Session, m: &cubbyhole::Sealed) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    s.open(&m.id, &m.payload, W, &mut out)?;
    Ok(out)
}

/// The sessions' states compared through their encodings.
fn same(a: &Session, b: &Session) -> bool {
    *a.to_bytes() == *b.to_bytes()
}

#[test]
fn a_conversation_round_trips_with_sealed_envelopes() {
    let mut p = pair(1, 2);
    let mut alice = p.initiate();
    assert!(alice.is_sealed());
    let first = alice.seal(&mut p.rng, b"hello bob").unwrap();
    assert_eq!(first.payload.len(), MIN_CLASS);
    assert_eq!(&first.payload[..2], &[0x02, 0x01]);
    // Nothing of Alice's identity or ephemeral key is in the envelope.
    let ik = alice.local_identity().as_bytes();
    assert!(!first.payload.windows(32).any(|w| w == ik));
    let (mut bob, plain) = p.accept(&first.payload).unwrap();
    assert_eq!(plain, b"hello bob");
    assert!(bob.is_sealed());

    // A second prekey message of the same session opens and continues it.
    let second = alice.seal(&mut p.rng, b"again").unwrap();
    assert_ne!(
        first.payload[2..34],
        second.payload[2..34],
        "fresh E per envelope"
    );
    let inner = p.bob_prekeys.open_sealed(&second.payload).unwrap();
    let incoming = Incoming::decode(&inner).unwrap();
    assert!(bob.matches(&incoming));
    let mut out = Vec::new();
    bob.decrypt_incoming(&incoming, &mut out).unwrap();
    assert_eq!(out, b"again");

    // Bob's reply is a chain message whose id Alice expects.
    let reply = bob.seal(&mut p.rng, b"hi alice").unwrap();
    assert_eq!(&reply.payload[..2], &[0x02, 0x02]);
    assert_eq!(reply.payload.len(), MIN_CLASS);
    assert!(alice.routing_tags(W).contains(&reply.id));
    assert_eq!(open(&mut alice, &reply).unwrap(), b"hi alice");
    assert!(!alice.sends_prekey_messages());

    // Many turns, with messages out of order within a chain.
    for round in 0..5u8 {
        let a: Vec<_> = (0..4u8)
            .map(|i| alice.seal(&mut p.rng, &[round, i]).unwrap())
            .collect();
        for i in [2usize, 0, 3, 1] {
            assert!(
                bob.routing_tags(W).contains(&a[i].id),
                "round {round} message {i}"
            );
            assert_eq!(open(&mut bob, &a[i]).unwrap(), [round, i as u8]);
        }
        let b = bob.seal(&mut p.rng, &[round]).unwrap();
        assert_eq!(open(&mut alice, &b).unwrap(), [round]);
    }
}

#[test]
fn every_tag_is_single_use_and_ids_do_not_repeat() {
    let mut p = pair(2, 0);
    let mut alice = p.initiate();
    let first = alice.seal(&mut p.rng, b"x").unwrap();
    let (mut bob, _) = p.accept(&first.payload).unwrap();
    let mut ids = std::collections::HashSet::new();
    for _ in 0..50 {
        let m = bob.seal(&mut p.rng, b"m").unwrap();
        assert!(ids.insert(m.id));
        let before = alice.to_bytes();
        open(&mut alice, &m).unwrap();
        // Opening it again: its tag is no longer expected.
        assert_eq!(open(&mut alice, &m), Err(Error::SessionMismatch));
        assert_ne!(*before, *alice.to_bytes());
    }
}

#[test]
fn a_failed_open_leaves_the_session_unchanged() {
    let mut p = pair(3, 0);
    let mut alice = p.initiate();
    let first = alice.seal(&mut p.rng, b"x").unwrap();
    let (mut bob, _) = p.accept(&first.payload).unwrap();
    let m = bob.seal(&mut p.rng, b"secret").unwrap();
    let keep = alice.clone();
    for i in 0..m.payload.len() {
        let mut bad = m.payload.clone();
        bad[i] ^= 1;
        let mut out = Vec::new();
        let e = alice.open(&m.id, &bad, W, &mut out).unwrap_err();
        assert!(
            matches!(e, Error::Auth | Error::Decode(_)),
            "byte {i}: {e:?}"
        );
        assert!(out.is_empty());
        assert!(same(&alice, &keep), "byte {i}");
    }
    let mut id = m.id;
    id[0] ^= 1;
    assert_eq!(
        alice.open(&id, &m.payload, W, &mut Vec::new()),
        Err(Error::SessionMismatch)
    );
    assert_eq!(
        alice.open(&m.id, &m.payload[..CHAIN_OVERHEAD - 1], W, &mut Vec::new()),
        Err(Error::Decode("chain message length"))
    );
    assert!(same(&alice, &keep));
    assert_eq!(open(&mut alice, &m).unwrap(), b"secret");
}

#[test]
fn sealed_prekey_messages_need_the_signed_prekey() {
    let mut p = pair(4, 0);
    let mut alice = p.initiate();
    let m = alice.seal(&mut p.rng, b"x").unwrap();
    // Another device's prekeys cannot open it.
    let other = pair(5, 0);
    assert_eq!(
        other.bob_prekeys.open_sealed(&m.payload).unwrap_err(),
        Error::Auth
    );
    // Tampering anywhere fails the seal.
    for i in [2usize, 20, 40, 200, m.payload.len() - 1] {
        let mut bad = m.payload.clone();
        bad[i] ^= 0x40;
        let e = p.bob_prekeys.open_sealed(&bad).unwrap_err();
        assert!(
            matches!(e, Error::Auth | Error::InvalidKey),
            "byte {i}: {e:?}"
        );
    }
    // A small-order ephemeral key.
    let mut bad = m.payload.clone();
    bad[2..34].copy_from_slice(&[0; 32]);
    assert_eq!(
        p.bob_prekeys.open_sealed(&bad).unwrap_err(),
        Error::InvalidKey
    );
    let mut bad = m.payload.clone();
    bad[0] = 0x01;
    assert_eq!(
        p.bob_prekeys.open_sealed(&bad).unwrap_err(),
        Error::Decode("version")
    );
    bad[0] = 0x02;
    bad[1] = 0x02;
    assert_eq!(
        p.bob_prekeys.open_sealed(&bad).unwrap_err(),
        Error::Decode("kind")
    );
    assert_eq!(
        p.bob_prekeys.open_sealed(&m.payload[..176]).unwrap_err(),
        Error::Decode("sealed prekey message length")
    );
    // After a rotation the retained prekey still opens it.
    p.bob_prekeys
        .rotate_signed_prekey(&mut p.rng, &p.bob, NOW + 10)
        .unwrap();
    assert!(p.accept(&m.payload).is_ok());
}

#[test]
fn states_round_trip_with_header_keys() {
    let mut p = pair(6, 1);
    let mut alice = p.initiate();
    let bytes = alice.to_bytes();
    assert_eq!(bytes[0], 3);
    let restored =
        Session::from_bytes(&bytes, alice.local_identity(), alice.remote_identity()).unwrap();
    assert!(same(&alice, &restored));
    let first = alice.seal(&mut p.rng, b"x").unwrap();
    let (mut bob, _) = p.accept(&first.payload).unwrap();
    // Skipped keys with header keys survive a restore.
    let msgs: Vec<_> = (0..5)
        .map(|_| bob.seal(&mut p.rng, b"y").unwrap())
        .collect();
    open(&mut alice, &msgs[4]).unwrap();
    let mut alice = Session::from_bytes(
        &alice.to_bytes(),
        alice.local_identity(),
        alice.remote_identity(),
    )
    .unwrap();
    for m in &msgs[..4] {
        assert!(alice.routing_tags(W).contains(&m.id));
        open(&mut alice, m).unwrap();
    }
    // A v1 session still encodes as version 2, and the two do not mix.
    let mut q = pair(7, 0);
    let bundle = PrekeyBundle::decode(&q.bob_prekeys.bundle(&q.bob).encode())
        .unwrap()
        .verify(NOW, FreshnessPolicy::default())
        .unwrap();
    let mut v1 =
        Session::initiate(&mut q.rng, &q.alice, &bundle, SessionConfig::default()).unwrap();
    assert_eq!(v1.to_bytes()[0], 2);
    assert!(!v1.is_sealed());
    assert!(v1.routing_tags(W).is_empty());
    assert!(v1.seal(&mut q.rng, b"x").is_err());
    assert!(alice.encrypt(&mut q.rng, b"x").is_err());
    let wire = v1.encrypt(&mut q.rng, b"v1").unwrap();
    assert_eq!(
        q.bob_prekeys
            .accept(
                &q.bob,
                &Incoming::decode(&wire).unwrap(),
                SessionConfig::default()
            )
            .map(|a| a.session.is_sealed()),
        Ok(false)
    );
}

#[test]
fn payloads_are_padded_to_their_size_class() {
    let mut p = pair(8, 1);
    let mut alice = p.initiate();
    for len in [0usize, 64, 300, 1024, 5000, 65_536] {
        let m = alice.seal(&mut p.rng, &vec![1; len]).unwrap();
        assert_eq!(m.payload.len(), size_class(181 + len + 1), "prekey {len}");
    }
    let first = alice.seal(&mut p.rng, b"x").unwrap();
    let (mut bob, _) = p.accept(&first.payload).unwrap();
    for len in [0usize, 64, 437, 438, 1024, 5000, 65_536] {
        let m = bob.seal(&mut p.rng, &vec![2; len]).unwrap();
        assert_eq!(
            m.payload.len(),
            size_class(CHAIN_OVERHEAD + len + 1),
            "chain {len}"
        );
        assert_eq!(open(&mut alice, &m).unwrap(), vec![2; len]);
    }
    assert_eq!(
        sealed::padding_len(CHAIN_OVERHEAD, 0),
        MIN_CLASS - CHAIN_OVERHEAD
    );
}

/// Forward secrecy of seals (SPEC.md 26.10): a sealed prekey message is
/// sealed to the signed prekey, not to the identity key, so once the signed
/// prekey is deleted nothing the recipient still holds opens it, its
/// identity key included.
#[test]
fn a_deleted_signed_prekey_takes_its_seals_with_it() {
    let mut p = pair(9, 0);
    let mut alice = p.initiate();
    let recorded = alice.seal(&mut p.rng, b"recorded by the relay").unwrap();
    let old = p.bob_prekeys.current_signed_prekey().id();
    p.bob_prekeys
        .rotate_signed_prekey(&mut p.rng, &p.bob, NOW + 10)
        .unwrap();
    assert!(
        p.bob_prekeys.open_sealed(&recorded.payload).is_ok(),
        "retained"
    );
    assert!(p.bob_prekeys.remove_retired_signed_prekey(old));
    assert_eq!(
        p.bob_prekeys.open_sealed(&recorded.payload).unwrap_err(),
        Error::Auth
    );
    // A fresh prekey store for the same identity (what a thief of the
    // identity key could build) does not open it either.
    let thief = PrekeyStore::new(&mut p.rng, &p.bob, NOW).unwrap();
    assert_eq!(
        thief.open_sealed(&recorded.payload).unwrap_err(),
        Error::Auth
    );
}

/// Header keys are forward secret per chain: once both sides have moved to
/// later chains, a recorded chain message is expected by no session (its
/// tag is gone) and its header key is no longer held.
#[test]
fn a_recorded_chain_message_is_not_expected_after_the_conversation_moves_on() {
    let mut p = pair(10, 0);
    let mut alice = p.initiate();
    let first = alice.seal(&mut p.rng, b"x").unwrap();
    let (mut bob, _) = p.accept(&first.payload).unwrap();
    let recorded = bob.seal(&mut p.rng, b"old chain").unwrap();
    let keep = alice.clone();
    open(&mut alice, &recorded).unwrap();
    for i in 0..3u8 {
        let a = alice.seal(&mut p.rng, &[i]).unwrap();
        open(&mut bob, &a).unwrap();
        let b = bob.seal(&mut p.rng, &[i]).unwrap();
        open(&mut alice, &b).unwrap();
    }
    assert!(!alice.routing_tags(W).contains(&recorded.id));
    assert_eq!(open(&mut alice, &recorded), Err(Error::SessionMismatch));
    // The state from before opened it: the difference is the state alone.
    assert_eq!(open(&mut keep.clone(), &recorded).unwrap(), b"old chain");
}
