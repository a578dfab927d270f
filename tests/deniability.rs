//! Deniability: the responder, with only its own keys and the initiator's
//! public identity key, fabricates a transcript that its own session accepts
//! as coming from the initiator. A transcript therefore proves nothing to a
//! third party (see SPEC.md, "Deniability").

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::{
    hazmat, IdentityKeyPair, Incoming, PrekeyBundle, PrekeyLookup, PrekeyStore, Role, Session,
    SessionConfig,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[test]
fn responder_fabricates_a_transcript_from_the_initiator() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let now = 1_800_000_000;
    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = IdentityKeyPair::generate(&mut rng);
    let mut bob_prekeys = PrekeyStore::new(&mut rng, &bob, now).expect("time in unix seconds");
    let opk_id = bob_prekeys.generate_one_time_prekeys(&mut rng, 2)[0].id();

    // Bob has Alice's public identity key only (from a bundle, a directory,
    // an earlier session). Nothing of Alice's private keys is used below.
    let alice_public = *alice.public();
    let spk_id = bob_prekeys.current_signed_prekey().id();
    let mut forged = hazmat::simulate_initiator(
        &mut rng,
        &bob,
        &bob_prekeys,
        spk_id,
        Some(opk_id),
        &alice_public,
        SessionConfig::default(),
    )
    .expect("Bob simulates Alice");
    assert_eq!(forged.role(), Role::Initiator);
    assert_eq!(forged.local_identity(), &alice_public);

    let m1 = forged.encrypt(&mut rng, b"I owe Bob 100 coins").unwrap();
    let m2 = forged.encrypt(&mut rng, b"signed, Alice").unwrap();

    // Bob's ordinary receive path accepts it as a session with Alice.
    let incoming = Incoming::decode(&m1).unwrap();
    assert_eq!(
        &incoming.prekey().unwrap().identity,
        alice_public.as_bytes()
    );
    let accepted = bob_prekeys
        .accept(&bob, &incoming, SessionConfig::default())
        .expect("Bob's session accepts the fabricated prekey message");
    let mut bob_session = accepted.session;
    assert_eq!(accepted.plaintext, b"I owe Bob 100 coins");
    assert_eq!(bob_session.remote_identity(), &alice_public);
    assert_eq!(bob_session.decrypt(&m2).unwrap(), b"signed, Alice");

    // The fabricated transcript continues in both directions.
    let reply = bob_session.encrypt(&mut rng, b"noted").unwrap();
    assert_eq!(forged.decrypt(&reply).unwrap(), b"noted");
    let m3 = forged.encrypt(&mut rng, b"more").unwrap();
    assert_eq!(bob_session.decrypt(&m3).unwrap(), b"more");

    // And it is indistinguishable in form from a real one: a genuine session
    // from Alice to the same bundle produces messages of the same shape, and
    // Bob accepts both.
    let bundle = PrekeyBundle::decode(&bob_prekeys.bundle(&bob).encode())
        .unwrap()
        .verify(now, FreshnessPolicy::default())
        .unwrap();
    let mut real = Session::initiate(&mut rng, &alice, &bundle, SessionConfig::default()).unwrap();
    let r1 = real.encrypt(&mut rng, b"I owe Bob 100 coins").unwrap();
    assert_eq!(r1.len(), m1.len());
    let real_accept = bob_prekeys
        .accept(
            &bob,
            &Incoming::decode(&r1).unwrap(),
            SessionConfig::default(),
        )
        .unwrap();
    assert_eq!(real_accept.plaintext, b"I owe Bob 100 coins");
    assert_eq!(real_accept.session.remote_identity(), &alice_public);
}

#[test]
fn simulation_needs_the_responders_prekeys() {
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = IdentityKeyPair::generate(&mut rng);
    let prekeys = PrekeyStore::new(&mut rng, &bob, 0).expect("time in unix seconds");
    assert!(prekeys.signed_prekey(99).is_none());
    assert_eq!(
        hazmat::simulate_initiator(
            &mut rng,
            &bob,
            &prekeys,
            99,
            None,
            alice.public(),
            SessionConfig::default()
        )
        .unwrap_err(),
        cubbyhole::Error::UnknownPrekey
    );
}

/// Profile v2 (SPEC.md 26.10): sealing adds no signature, so the responder
/// fabricates sealed envelopes "from" the initiator just as well, and its
/// own receive path opens and accepts them.
#[test]
fn responder_fabricates_sealed_envelopes_from_the_initiator() {
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let now = 1_800_000_000;
    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = IdentityKeyPair::generate(&mut rng);
    let mut bob_prekeys = PrekeyStore::new(&mut rng, &bob, now).expect("time in unix seconds");
    let spk_id = bob_prekeys.current_signed_prekey().id();
    let alice_public = *alice.public();
    let mut forged = hazmat::simulate_initiator_sealed(
        &mut rng,
        &bob,
        &bob_prekeys,
        spk_id,
        None,
        &alice_public,
        SessionConfig::default(),
    )
    .expect("Bob simulates Alice");
    assert!(forged.is_sealed());
    let m1 = forged.seal(&mut rng, b"I owe Bob 100 coins").unwrap();
    let inner = bob_prekeys.open_sealed(&m1.payload).unwrap();
    let accepted = bob_prekeys
        .accept(
            &bob,
            &Incoming::decode(&inner).unwrap(),
            SessionConfig::default(),
        )
        .expect("Bob accepts the fabricated sealed prekey message");
    assert_eq!(accepted.plaintext, b"I owe Bob 100 coins");
    assert_eq!(accepted.session.remote_identity(), &alice_public);
    // Its envelope has the form of a real one: same length, same kind.
    let bundle = PrekeyBundle::decode(&bob_prekeys.bundle(&bob).encode())
        .unwrap()
        .verify(now, FreshnessPolicy::default())
        .unwrap();
    let mut real =
        Session::initiate_sealed(&mut rng, &alice, &bundle, SessionConfig::default()).unwrap();
    let r1 = real.seal(&mut rng, b"I owe Bob 100 coins").unwrap();
    assert_eq!(r1.payload.len(), m1.payload.len());
    assert_eq!(r1.payload[..2], m1.payload[..2]);
    // And the fabricated conversation continues with chain messages.
    let mut bob_session = accepted.session;
    let reply = bob_session.seal(&mut rng, b"noted").unwrap();
    let mut out = Vec::new();
    forged
        .open(&reply.id, &reply.payload, 32, &mut out)
        .unwrap();
    assert_eq!(out, b"noted");
}
