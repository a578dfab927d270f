//! Behaviour of sessions, bundles and prekeys beyond the vectors.

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::{
    Error, IdentityKeyPair, Incoming, PrekeyBundle, PrekeyStore, Session, SessionConfig,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const NOW: u64 = 1_800_000_000;

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
    let mut bob_prekeys = PrekeyStore::new(&mut rng, &bob, NOW).expect("time in unix seconds");
    bob_prekeys.generate_one_time_prekeys(&mut rng, one_time_prekeys);
    Pair {
        rng,
        alice,
        bob,
        bob_prekeys,
    }
}

impl Pair {
    fn initiate(&mut self, config: SessionConfig) -> Session {
        let bundle = PrekeyBundle::decode(&self.bob_prekeys.bundle(&self.bob).encode())
            .unwrap()
            .verify(NOW, FreshnessPolicy::default())
            .unwrap();
        Session::initiate(&mut self.rng, &self.alice, &bundle, config).unwrap()
    }
    fn accept(&mut self, wire: &[u8], config: SessionConfig) -> Result<(Session, Vec<u8>), Error> {
        let a = self
            .bob_prekeys
            .accept(&self.bob, &Incoming::decode(wire)?, config)?;
        Ok((a.session, a.plaintext))
    }
}

/// Restores `bytes` with the identities of `like` (a session of the same
/// pair, the same side).
fn restore(bytes: &[u8], like: &Session) -> Result<Session, Error> {
    Session::from_bytes(bytes, like.local_identity(), like.remote_identity())
}

#[test]
fn freshness_boundaries() {
    let p = pair(1, 0);
    let bytes = p.bob_prekeys.bundle(&p.bob).encode();
    let created = p.bob_prekeys.current_signed_prekey().created();
    let policy = FreshnessPolicy::max_age(3600);
    let verify = |now| PrekeyBundle::decode(&bytes).unwrap().verify(now, policy);
    assert!(verify(created + 3600).is_ok(), "exactly max_age is fresh");
    assert_eq!(verify(created + 3601).unwrap_err(), Error::StaleBundle);
    assert!(
        verify(created - 10_000).is_ok(),
        "a creation time in the future is accepted"
    );
    assert!(verify(0).is_ok());
    assert_eq!(
        verify(cubbyhole::MAX_TIMESTAMP).unwrap_err(),
        Error::StaleBundle
    );
    // Beyond MAX_TIMESTAMP the caller's clock is not in seconds.
    assert_eq!(verify(u64::MAX).unwrap_err(), Error::TimeOutOfRange);
}

#[test]
fn bundle_round_trip_with_and_without_one_time_prekey() {
    let mut p = pair(2, 1);
    let with = p.bob_prekeys.bundle(&p.bob);
    assert_eq!(with.encode().len(), cubbyhole::bundle::BUNDLE_LEN_WITH_OPK);
    assert_eq!(PrekeyBundle::decode(&with.encode()).unwrap(), with);
    let s = p.initiate(SessionConfig::default());
    let m = {
        let mut s = s;
        s.encrypt(&mut p.rng, b"x").unwrap()
    };
    p.accept(&m, SessionConfig::default()).unwrap();
    assert_eq!(
        p.bob_prekeys.one_time_prekey_count(),
        0,
        "the one-time prekey is consumed"
    );
    let without = p.bob_prekeys.bundle(&p.bob);
    assert!(without.one_time_prekey().is_none());
    assert_eq!(
        without.encode().len(),
        cubbyhole::bundle::BUNDLE_LEN_WITHOUT_OPK
    );
    // A session still starts without a one-time prekey.
    let mut s = p.initiate(SessionConfig::default());
    let m = s.encrypt(&mut p.rng, b"no opk").unwrap();
    assert_eq!(p.accept(&m, SessionConfig::default()).unwrap().1, b"no opk");
}

#[test]
fn initiator_sends_prekey_messages_until_it_hears_back() {
    let mut p = pair(3, 3);
    let mut alice = p.initiate(SessionConfig::default());
    let m: Vec<Vec<u8>> = (0..3)
        .map(|i| alice.encrypt(&mut p.rng, &[i]).unwrap())
        .collect();
    for w in &m {
        assert!(Incoming::decode(w).unwrap().prekey().is_some());
    }
    let (mut bob, pt) = p.accept(&m[1], SessionConfig::default()).unwrap();
    assert_eq!(pt, [1]);
    // Repeats go to the same session; the one-time prekey is not looked up again.
    assert!(bob.matches(&Incoming::decode(&m[0]).unwrap()));
    assert_eq!(bob.decrypt(&m[0]).unwrap(), [0]);
    assert_eq!(bob.decrypt(&m[2]).unwrap(), [2]);
    assert_eq!(bob.decrypt(&m[2]).unwrap_err(), Error::Duplicate);
    // Replies from Bob make Alice switch to normal messages.
    assert!(alice.sends_prekey_messages());
    let r = bob.encrypt(&mut p.rng, b"r").unwrap();
    assert!(Incoming::decode(&r).unwrap().prekey().is_none());
    assert_eq!(alice.decrypt(&r).unwrap(), b"r");
    assert!(!alice.sends_prekey_messages());
    let n = alice.encrypt(&mut p.rng, b"n").unwrap();
    assert!(Incoming::decode(&n).unwrap().prekey().is_none());
    assert_eq!(bob.decrypt(&n).unwrap(), b"n");
    // A prekey message of another session is refused by this one.
    let mut other = p.initiate(SessionConfig::default());
    let o = other.encrypt(&mut p.rng, b"o").unwrap();
    assert!(!bob.matches(&Incoming::decode(&o).unwrap()));
    assert_eq!(bob.decrypt(&o).unwrap_err(), Error::SessionMismatch);
}

#[test]
fn configurable_skip_limits_and_eviction() {
    let config = SessionConfig {
        max_skip: 5,
        max_skipped_keys: 3,
    };
    let mut p = pair(4, 0);
    let mut alice = p.initiate(config);
    let m: Vec<Vec<u8>> = (0..12u8)
        .map(|i| alice.encrypt(&mut p.rng, &[i]).unwrap())
        .collect();
    // n = 6 with Nr = 0 is beyond max_skip = 5.
    assert_eq!(p.accept(&m[6], config).unwrap_err(), Error::TooManySkipped);
    // n = 5 is allowed: 5 keys derived, only the newest 3 kept.
    let (mut bob, pt) = p.accept(&m[5], config).unwrap();
    assert_eq!(pt, [5]);
    assert_eq!(bob.skipped_message_keys(), 3);
    assert_eq!(bob.decrypt(&m[0]).unwrap_err(), Error::Duplicate, "evicted");
    assert_eq!(bob.decrypt(&m[1]).unwrap_err(), Error::Duplicate, "evicted");
    for (i, w) in m.iter().enumerate().take(5).skip(2) {
        assert_eq!(bob.decrypt(w).unwrap(), [i as u8]);
    }
    assert_eq!(bob.skipped_message_keys(), 0);
    assert_eq!(bob.config(), config);
    // The limits survive serialization.
    let restored = restore(&bob.to_bytes(), &bob).unwrap();
    assert_eq!(restored.config(), config);
}

#[test]
fn retired_signed_prekey_still_accepts_until_forgotten() {
    let mut p = pair(5, 0);
    let mut alice = p.initiate(SessionConfig::default());
    let late = alice.encrypt(&mut p.rng, b"late").unwrap();
    let (rng, bob) = (&mut p.rng, &p.bob);
    p.bob_prekeys
        .rotate_signed_prekey(rng, bob, NOW + 86_400)
        .expect("time in unix seconds");
    let mut check = p.bob_prekeys.clone();
    assert_eq!(
        check
            .accept(
                &p.bob,
                &Incoming::decode(&late).unwrap(),
                SessionConfig::default()
            )
            .unwrap()
            .plaintext,
        b"late"
    );
    p.bob_prekeys
        .forget_retired_before(NOW + 1)
        .expect("time in unix seconds");
    assert_eq!(
        p.accept(&late, SessionConfig::default()).unwrap_err(),
        Error::UnknownPrekey
    );
}

#[test]
fn failed_decrypt_leaves_state_and_buffer_unchanged() {
    let mut p = pair(6, 1);
    let mut alice = p.initiate(SessionConfig::default());
    let m0 = alice.encrypt(&mut p.rng, b"zero").unwrap();
    let m1 = alice.encrypt(&mut p.rng, b"one").unwrap();
    let m2 = alice.encrypt(&mut p.rng, b"two").unwrap();
    let (mut bob, _) = p.accept(&m2, SessionConfig::default()).unwrap();
    let before = bob.to_bytes();
    let mut out = b"prefix".to_vec();
    let mut bad = m1.clone();
    *bad.last_mut().unwrap() ^= 1;
    let incoming = Incoming::decode(&bad).unwrap();
    assert_eq!(
        bob.decrypt_incoming(&incoming, &mut out).unwrap_err(),
        Error::Auth
    );
    assert_eq!(out, b"prefix");
    assert_eq!(*bob.to_bytes(), *before);
    // The real messages still decrypt afterwards, into the caller's buffer.
    bob.decrypt_incoming(&Incoming::decode(&m1).unwrap(), &mut out)
        .unwrap();
    assert_eq!(out, b"prefixone");
    assert_eq!(bob.decrypt(&m0).unwrap(), b"zero");
}

#[test]
fn encrypt_into_appends() {
    let mut p = pair(7, 0);
    let mut alice = p.initiate(SessionConfig::default());
    let mut buf = vec![0xAA; 3];
    alice.encrypt_into(&mut p.rng, b"hello", &mut buf).unwrap();
    assert_eq!(&buf[..3], &[0xAA; 3]);
    let (_, pt) = p.accept(&buf[3..], SessionConfig::default()).unwrap();
    assert_eq!(pt, b"hello");
}

#[test]
fn state_decoding_rejects_every_truncation_and_bad_version() {
    let mut p = pair(8, 1);
    let mut alice = p.initiate(SessionConfig::default());
    let msgs: Vec<Vec<u8>> = (0..4u8)
        .map(|i| alice.encrypt(&mut p.rng, &[i]).unwrap())
        .collect();
    let (bob, _) = p.accept(&msgs[3], SessionConfig::default()).unwrap();
    for session in [&alice, &bob] {
        let bytes = session.to_bytes();
        assert_eq!(*restore(&bytes, session).unwrap().to_bytes(), *bytes);
        for len in 0..bytes.len() {
            assert!(
                matches!(restore(&bytes[..len], session), Err(Error::State(_))),
                "truncated to {len}"
            );
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(matches!(restore(&longer, session), Err(Error::State(_))));
        for version in [0, 1, 4, 0xff] {
            let mut other = bytes.to_vec();
            other[0] = version;
            assert_eq!(
                restore(&other, session).unwrap_err(),
                Error::State("state version")
            );
        }
    }
}

#[test]
fn debug_output_holds_no_secrets() {
    let mut p = pair(9, 1);
    let seed_hex = hex::encode(*p.alice.seed());
    let spk = p.bob_prekeys.current_signed_prekey().clone();
    let spk_hex = hex::encode(*spk.secret_bytes());
    let mut alice = p.initiate(SessionConfig::default());
    let m = alice.encrypt(&mut p.rng, b"secret plaintext").unwrap();
    let accepted = p
        .bob_prekeys
        .clone()
        .accept(
            &p.bob,
            &Incoming::decode(&m).unwrap(),
            SessionConfig::default(),
        )
        .unwrap();
    let state_hex = hex::encode(&*alice.to_bytes());
    let printed = format!(
        "{:?} {:?} {:?} {:?} {:?} {:?}",
        p.alice, spk, p.bob_prekeys, alice, accepted, p.bob
    );
    assert!(!printed.contains(&seed_hex));
    assert!(!printed.contains(&spk_hex));
    assert!(!printed.contains("secret plaintext"));
    assert!(
        !printed.to_lowercase().contains(&state_hex[100..164]),
        "no state bytes"
    );
    for b in [&seed_hex[..16], &spk_hex[..16]] {
        assert!(!printed.contains(b));
    }
}

#[test]
fn identity_key_round_trip_and_seed() {
    let mut rng = ChaCha20Rng::seed_from_u64(10);
    let id = IdentityKeyPair::generate(&mut rng);
    let again = IdentityKeyPair::from_seed(&id.seed());
    assert_eq!(id.public(), again.public());
    let parsed = cubbyhole::IdentityKey::from_bytes(id.public().as_bytes()).unwrap();
    assert_eq!(&parsed, id.public());
    assert_eq!(parsed.x25519_bytes(), id.public().x25519_bytes());
}

#[test]
fn limits_are_clamped_and_checked_in_stored_state() {
    let mut p = pair(11, 0);
    let huge = SessionConfig {
        max_skip: u32::MAX,
        max_skipped_keys: u32::MAX,
    };
    let alice = p.initiate(huge);
    assert_eq!(alice.config().max_skip, SessionConfig::LIMIT_MAX_SKIP);
    assert_eq!(
        alice.config().max_skipped_keys,
        SessionConfig::LIMIT_MAX_SKIPPED_KEYS
    );
    // A stored state (no skipped keys, limits other than the defaults: it
    // ends with max_skip and max_skipped_keys) whose limit was raised is
    // refused, and so are the default limits marked as non-default (the
    // encoding is canonical).
    let mut bytes = alice.to_bytes().to_vec();
    let at = bytes.len() - 8;
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        restore(&bytes, &alice).unwrap_err(),
        Error::State("state limits")
    );
    let defaults = SessionConfig::default();
    bytes[at..at + 4].copy_from_slice(&defaults.max_skip.to_be_bytes());
    bytes[at + 4..].copy_from_slice(&defaults.max_skipped_keys.to_be_bytes());
    assert_eq!(
        restore(&bytes, &alice).unwrap_err(),
        Error::State("state limits")
    );
}

#[test]
fn debug_of_the_offline_layer_holds_no_secrets() {
    use cubbyhole::storage::{LocalIdentity, PrekeyState};
    let mut p = pair(12, 3);
    let identity = LocalIdentity {
        keys: p.alice.clone(),
        device_id: 1,
    };
    let state = PrekeyState {
        prekeys: p.bob_prekeys.clone(),
        upload_counter: 1,
        last_rotation: NOW,
        retired_at: vec![],
        one_time_retired: vec![],
        upload_pending: false,
        accepted: Vec::new(),
    };
    let mut secrets: Vec<String> = vec![hex::encode(*p.alice.seed()), hex::encode(*p.bob.seed())];
    for k in p.bob_prekeys.signed_prekeys() {
        secrets.push(hex::encode(*k.secret_bytes()));
    }
    for k in p.bob_prekeys.one_time_prekeys() {
        secrets.push(hex::encode(*k.secret_bytes()));
    }
    let bundle = p.bob_prekeys.bundle(&p.bob);
    let x3dh = cubbyhole::hazmat::x3dh_initiator(&p.alice, &[9; 32], &bundle).unwrap();
    secrets.push(hex::encode(*x3dh.shared_secret));
    let mut alice = p.initiate(SessionConfig::default());
    let (_, mk) =
        cubbyhole::hazmat::encrypt_exposing_message_key(&mut alice, &mut p.rng, b"m").unwrap();
    secrets.push(hex::encode(*mk));
    let printed = format!("{identity:?} {state:?} {x3dh:?} {alice:?}").to_lowercase();
    // Also as decimal byte lists, the way a derived Debug prints arrays.
    for s in &secrets {
        assert!(!printed.contains(s.as_str()));
        let bytes = hex::decode(s).unwrap();
        let decimal = format!("{:?}", &bytes[..8]);
        assert!(
            !printed.contains(&decimal[1..decimal.len() - 1]),
            "{decimal}"
        );
    }
}

/// Issue 7's bound: without skipped keys a state is at most 200 bytes (the
/// encoding gives at most 190, 198 with non-default limits), at every stage
/// of a session's life and on both sides.
#[test]
fn states_without_skipped_keys_stay_small() {
    for (seed, one_time_prekeys, config) in [
        (20, 1, SessionConfig::default()),
        (21, 0, SessionConfig::default()),
        (
            22,
            1,
            SessionConfig {
                max_skip: 10,
                max_skipped_keys: 20,
            },
        ),
    ] {
        let mut p = pair(seed, one_time_prekeys);
        let bound = if config == SessionConfig::default() {
            190
        } else {
            198
        };
        let mut alice = p.initiate(config);
        let mut sizes = vec![("initiator, before sending", alice.to_bytes().len())];
        let first = alice.encrypt(&mut p.rng, b"one").unwrap();
        sizes.push(("initiator, sending prekey messages", alice.to_bytes().len()));
        let (mut bob, _) = p.accept(&first, config).unwrap();
        sizes.push(("responder, new", bob.to_bytes().len()));
        let reply = bob.encrypt(&mut p.rng, b"two").unwrap();
        sizes.push(("responder, both chains", bob.to_bytes().len()));
        alice.decrypt(&reply).unwrap();
        sizes.push(("initiator, receiving", alice.to_bytes().len()));
        let again = alice.encrypt(&mut p.rng, b"three").unwrap();
        sizes.push(("initiator, both chains", alice.to_bytes().len()));
        bob.decrypt(&again).unwrap();
        sizes.push(("responder, after a step", bob.to_bytes().len()));
        println!("{config:?}, {one_time_prekeys} one-time prekeys: {sizes:?}");
        for (stage, size) in &sizes {
            assert!(*size <= bound, "{stage}: {size} bytes (bound {bound})");
        }
        assert_eq!(bob.skipped_message_keys(), 0);
        // The largest states are the responder's with both chains and the
        // initiator's while it still sends prekey messages.
        assert_eq!(
            sizes.iter().map(|(_, s)| *s).max(),
            Some(bound),
            "{sizes:?}"
        );
    }
}

/// The identities are not in the state: restored with the wrong ones, a
/// session decrypts nothing (they are in the associated data) and leaves
/// the state unchanged; restored with the right ones, it carries on.
#[test]
fn a_state_restored_with_the_wrong_identities_decrypts_nothing() {
    let mut p = pair(23, 0);
    let mut alice = p.initiate(SessionConfig::default());
    let first = alice.encrypt(&mut p.rng, b"one").unwrap();
    let (mut bob, _) = p.accept(&first, SessionConfig::default()).unwrap();
    let reply = bob.encrypt(&mut p.rng, b"two").unwrap();
    alice.decrypt(&reply).unwrap();
    let next = alice.encrypt(&mut p.rng, b"three").unwrap();
    let bytes = bob.to_bytes();
    let mallory = IdentityKeyPair::generate(&mut p.rng);
    for (local, remote) in [
        (bob.local_identity(), mallory.public()),
        (mallory.public(), bob.remote_identity()),
        (bob.remote_identity(), bob.local_identity()),
    ] {
        let mut wrong = Session::from_bytes(&bytes, local, remote).unwrap();
        assert_eq!(wrong.decrypt(&next).unwrap_err(), Error::Auth);
        assert_eq!(*wrong.to_bytes(), *bytes);
    }
    let mut right = restore(&bytes, &bob).unwrap();
    assert_eq!(right.decrypt(&next).unwrap(), b"three");
}

/// The accessors a client routes by, through a session's life.
#[test]
fn routing_accessors_follow_the_ratchet() {
    let mut p = pair(24, 0);
    let mut alice = p.initiate(SessionConfig::default());
    let spk = *p.bob_prekeys.current_signed_prekey().public();
    // A new initiator: a sending chain, nothing sent yet; it receives under
    // SPK_B until Bob answers.
    assert!(alice.awaits_new_ratchet_key());
    assert_eq!(alice.sending_chain_length(), 0);
    assert_eq!(alice.receiving_ratchet_keys().collect::<Vec<_>>(), [&spk]);
    let m0 = alice.encrypt(&mut p.rng, b"0").unwrap();
    let m1 = alice.encrypt(&mut p.rng, b"1").unwrap();
    assert_eq!(alice.sending_chain_length(), 2);
    let (mut bob, _) = p.accept(&m1, SessionConfig::default()).unwrap();
    // Bob has not sent: no key of his can be answered yet; he still holds
    // the key of m0 (skipped) under Alice's ratchet key.
    assert!(!bob.awaits_new_ratchet_key());
    assert_eq!(bob.sending_chain_length(), 0);
    let alice_key = Incoming::decode(&m1).unwrap().header().ratchet_key;
    // (Listed once, although it is both the current receiving key and the
    // key of the chain holding m0's skipped key.)
    assert_eq!(
        bob.receiving_ratchet_keys().collect::<Vec<_>>(),
        [&alice_key]
    );
    assert_eq!(bob.skipped_message_keys(), 1);
    assert_eq!(bob.decrypt(&m0).unwrap(), b"0");
    let r0 = bob.encrypt(&mut p.rng, b"r0").unwrap();
    assert!(bob.awaits_new_ratchet_key());
    assert_eq!(bob.sending_chain_length(), 1);
    alice.decrypt(&r0).unwrap();
    let bob_key = Incoming::decode(&r0).unwrap().header().ratchet_key;
    assert_eq!(
        alice.receiving_ratchet_keys().collect::<Vec<_>>(),
        [&bob_key]
    );
    // Alice's next send starts a new chain (a DH ratchet step is due).
    assert!(!alice.awaits_new_ratchet_key());
    assert_eq!(alice.sending_chain_length(), 0);
}

/// Debug shows what identifies a session (and no secret: see
/// debug_output_holds_no_secrets).
#[test]
fn debug_output_names_the_session() {
    let mut p = pair(25, 0);
    let mut alice = p.initiate(SessionConfig::default());
    let m = alice.encrypt(&mut p.rng, b"hello").unwrap();
    let accepted = p
        .bob_prekeys
        .accept(
            &p.bob,
            &Incoming::decode(&m).unwrap(),
            SessionConfig::default(),
        )
        .unwrap();
    let printed = format!("{alice:?}");
    assert!(printed.starts_with("Session {"), "{printed}");
    assert!(printed.contains("role: Initiator"), "{printed}");
    assert!(printed.contains("sends_prekey_messages: true"), "{printed}");
    let printed = format!("{accepted:?}");
    assert!(printed.starts_with("Accepted {"), "{printed}");
    assert!(printed.contains("role: Responder"), "{printed}");
    assert!(printed.contains("plaintext_len: 5"), "{printed}");
}

/// A chain with skipped keys under an older ratchet key is listed after the
/// current key.
#[test]
fn routing_lists_older_chains_with_skipped_keys() {
    let mut p = pair(25, 0);
    let mut alice = p.initiate(SessionConfig::default());
    let a0 = alice.encrypt(&mut p.rng, b"a0").unwrap();
    let a1 = alice.encrypt(&mut p.rng, b"a1").unwrap();
    let (mut bob, _) = p.accept(&a1, SessionConfig::default()).unwrap();
    let r0 = bob.encrypt(&mut p.rng, b"r0").unwrap();
    alice.decrypt(&r0).unwrap();
    let b0 = alice.encrypt(&mut p.rng, b"b0").unwrap();
    assert_eq!(bob.decrypt(&b0).unwrap(), b"b0");
    let old_key = Incoming::decode(&a1).unwrap().header().ratchet_key;
    let new_key = Incoming::decode(&b0).unwrap().header().ratchet_key;
    assert_ne!(old_key, new_key);
    assert_eq!(
        bob.receiving_ratchet_keys().collect::<Vec<_>>(),
        [&new_key, &old_key]
    );
    // Once the skipped key is used, the old chain is gone.
    assert_eq!(bob.decrypt(&a0).unwrap(), b"a0");
    assert_eq!(bob.receiving_ratchet_keys().collect::<Vec<_>>(), [&new_key]);
}
