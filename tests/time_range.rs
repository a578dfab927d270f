//! The checked range of times: every protocol-core function that takes a
//! time refuses one above `MAX_TIMESTAMP` (a millisecond clock) with
//! `Error::TimeOutOfRange`, and accepts the whole range `0..=MAX_TIMESTAMP`.

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::{
    check_timestamp, Error, IdentityKeyPair, PrekeyBundle, PrekeyStore, SignedPrekey, MAX_TIMESTAMP,
};
use ed25519_dalek::{Signer, SigningKey};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// 2023-11-14 22:13:20 UTC in seconds.
const NOW: u64 = 1_700_000_000;
/// The same instant read from a millisecond clock.
const NOW_MS: u64 = 1_700_000_000_000;
/// The same instant read from a microsecond clock.
const NOW_US: u64 = 1_700_000_000_000_000;

/// The times every entry point must refuse.
const OUT_OF_RANGE: [u64; 4] = [MAX_TIMESTAMP + 1, NOW_MS, NOW_US, u64::MAX];

#[test]
fn the_bound_is_the_documented_one() {
    // 2^34 - 1, written out, not computed by the crate.
    assert_eq!(MAX_TIMESTAMP, 17_179_869_183);
    // 2500-01-01T00:00:00Z in seconds is accepted (five centuries ahead).
    assert_eq!(check_timestamp(16_725_225_600), Ok(16_725_225_600));
    // 1971-01-01T00:00:00Z read from a millisecond clock is refused.
    assert_eq!(check_timestamp(31_536_000_000), Err(Error::TimeOutOfRange));
}

#[test]
fn check_timestamp_boundaries() {
    for t in [0, 1, NOW, MAX_TIMESTAMP - 1, MAX_TIMESTAMP] {
        assert_eq!(check_timestamp(t), Ok(t), "{t}");
    }
    for t in OUT_OF_RANGE {
        assert_eq!(check_timestamp(t), Err(Error::TimeOutOfRange), "{t}");
    }
}

#[test]
fn the_error_is_crate_side_and_says_what_is_wrong() {
    assert_eq!(Error::TimeOutOfRange.profile_kind(), None);
    let text = Error::TimeOutOfRange.to_string();
    assert!(text.contains("unix seconds"), "{text}");
    assert!(text.contains("millisecond"), "{text}");
}

/// The next 8 bytes `rng` would give, without advancing it.
fn peek(rng: &ChaCha20Rng) -> u64 {
    rng.clone().next_u64()
}

#[test]
fn prekey_store_new_refuses_and_draws_nothing() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let bob = IdentityKeyPair::generate(&mut rng);
    for t in OUT_OF_RANGE {
        let before = peek(&rng);
        assert_eq!(
            PrekeyStore::new(&mut rng, &bob, t).err(),
            Some(Error::TimeOutOfRange),
            "{t}"
        );
        assert_eq!(peek(&rng), before, "randomness drawn for a refused time");
    }
    for t in [0, NOW, MAX_TIMESTAMP] {
        let store = PrekeyStore::new(&mut rng, &bob, t).expect("in range");
        assert_eq!(store.current_signed_prekey().created(), t);
    }
}

#[test]
fn rotation_refuses_and_changes_nothing() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let bob = IdentityKeyPair::generate(&mut rng);
    let mut store = PrekeyStore::new(&mut rng, &bob, NOW).expect("in range");
    let saved = store.to_bytes();
    for t in OUT_OF_RANGE {
        let before = peek(&rng);
        assert_eq!(
            store.rotate_signed_prekey(&mut rng, &bob, t),
            Err(Error::TimeOutOfRange),
            "{t}"
        );
        assert_eq!(peek(&rng), before, "randomness drawn for a refused time");
        assert_eq!(
            store.to_bytes(),
            saved,
            "store changed by a refused rotation"
        );
    }
    store
        .rotate_signed_prekey(&mut rng, &bob, MAX_TIMESTAMP)
        .expect("MAX_TIMESTAMP is in range");
    assert_eq!(store.current_signed_prekey().id(), 2);
    assert_eq!(store.current_signed_prekey().created(), MAX_TIMESTAMP);
}

#[test]
fn forgetting_refuses_and_drops_nothing() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let bob = IdentityKeyPair::generate(&mut rng);
    let mut store = PrekeyStore::new(&mut rng, &bob, NOW).expect("in range");
    store
        .rotate_signed_prekey(&mut rng, &bob, NOW + 10)
        .expect("in range");
    for t in OUT_OF_RANGE {
        // A millisecond cutoff would otherwise drop every retired key.
        assert_eq!(
            store.forget_retired_before(t),
            Err(Error::TimeOutOfRange),
            "{t}"
        );
        assert_eq!(store.signed_prekeys().count(), 2);
    }
    store.forget_retired_before(NOW).expect("in range");
    assert_eq!(store.signed_prekeys().count(), 2, "created at NOW is kept");
    store
        .forget_retired_before(MAX_TIMESTAMP)
        .expect("in range");
    assert_eq!(store.signed_prekeys().count(), 1);
}

#[test]
fn signed_prekey_constructors_refuse() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let bob = IdentityKeyPair::generate(&mut rng);
    for t in OUT_OF_RANGE {
        let before = peek(&rng);
        assert_eq!(
            SignedPrekey::generate(&mut rng, &bob, 1, t).err(),
            Some(Error::TimeOutOfRange),
            "{t}"
        );
        assert_eq!(peek(&rng), before, "randomness drawn for a refused time");
        assert_eq!(
            SignedPrekey::from_secret(&bob, 1, t, [9; 32]).err(),
            Some(Error::TimeOutOfRange),
            "{t}"
        );
    }
    let spk = SignedPrekey::from_secret(&bob, 1, MAX_TIMESTAMP, [9; 32]).expect("in range");
    assert_eq!(spk.created(), MAX_TIMESTAMP);
}

/// A bundle's bytes (SPEC 3.1), signed here with ed25519-dalek directly
/// over the signed prekey message of SPEC 2.2, so that any creation time
/// can be put in, including those the crate refuses to sign.
fn bundle_bytes(seed: &[u8; 32], spk_id: u32, created: u64, bad_signature: bool) -> Vec<u8> {
    let signing = SigningKey::from_bytes(seed);
    let spk_public = [0x42; 32];
    let mut message = b"cubbyhole/v1 signed prekey".to_vec();
    message.extend_from_slice(&spk_id.to_be_bytes());
    message.extend_from_slice(&created.to_be_bytes());
    message.extend_from_slice(&spk_public);
    let mut signature = signing.sign(&message).to_bytes();
    if bad_signature {
        signature[0] ^= 1;
    }
    let mut out = vec![0x01];
    out.extend_from_slice(signing.verifying_key().as_bytes());
    out.extend_from_slice(&spk_id.to_be_bytes());
    out.extend_from_slice(&created.to_be_bytes());
    out.extend_from_slice(&spk_public);
    out.extend_from_slice(&signature);
    out.push(0);
    out
}

fn verify(bytes: &[u8], now: u64, max_age: u64) -> Result<(), Error> {
    PrekeyBundle::decode(bytes)?
        .verify(now, FreshnessPolicy::max_age(max_age))
        .map(|_| ())
}

#[test]
fn the_hand_made_bundle_is_a_real_one() {
    // The helper agrees with the crate's own encoding, so the refusals
    // below are about the time alone.
    let seed = [5; 32];
    let bob = IdentityKeyPair::from_seed(&seed);
    let mut secret = [0u8; 32];
    ChaCha20Rng::seed_from_u64(5).fill_bytes(&mut secret);
    let spk = SignedPrekey::from_secret(&bob, 3, NOW, secret).expect("in range");
    let ours = PrekeyBundle::new(&bob, &spk, None).encode();
    let mut theirs = bundle_bytes(&seed, 3, NOW, false);
    // Only the signed prekey's public key differs (and so the signature).
    theirs[45..77].copy_from_slice(spk.public());
    let signature = SigningKey::from_bytes(&seed).sign(&{
        let mut m = b"cubbyhole/v1 signed prekey".to_vec();
        m.extend_from_slice(&3u32.to_be_bytes());
        m.extend_from_slice(&NOW.to_be_bytes());
        m.extend_from_slice(spk.public());
        m
    });
    theirs[77..141].copy_from_slice(&signature.to_bytes());
    assert_eq!(theirs, ours);
    assert_eq!(verify(&theirs, NOW, 0), Ok(()));
}

#[test]
fn verify_refuses_a_millisecond_now() {
    let bytes = bundle_bytes(&[6; 32], 1, NOW, false);
    assert_eq!(verify(&bytes, NOW, 60), Ok(()));
    for now in OUT_OF_RANGE {
        // Not "stale": the caller's clock is wrong, not the bundle.
        assert_eq!(
            verify(&bytes, now, u64::MAX),
            Err(Error::TimeOutOfRange),
            "{now}"
        );
    }
    // The caller's time is checked before the signature.
    let forged = bundle_bytes(&[6; 32], 1, NOW, true);
    assert_eq!(verify(&forged, NOW, 60), Err(Error::Signature));
    assert_eq!(verify(&forged, NOW_MS, 60), Err(Error::TimeOutOfRange));
}

#[test]
fn verify_refuses_a_bundle_signed_with_a_millisecond_clock() {
    for created in OUT_OF_RANGE {
        let bytes = bundle_bytes(&[7; 32], 1, created, false);
        // Accepted before this check: a future creation time is not stale.
        assert_eq!(
            verify(&bytes, NOW, 60),
            Err(Error::TimeOutOfRange),
            "{created}"
        );
        assert_eq!(
            verify(&bytes, MAX_TIMESTAMP, 60),
            Err(Error::TimeOutOfRange),
            "{created}"
        );
        // The signature is checked first (SPEC 8.1): a forged bundle is a
        // forgery whatever its time.
        let forged = bundle_bytes(&[7; 32], 1, created, true);
        assert_eq!(verify(&forged, NOW, 60), Err(Error::Signature), "{created}");
    }
}

#[test]
fn verify_accepts_the_whole_range() {
    let at_max = bundle_bytes(&[8; 32], 1, MAX_TIMESTAMP, false);
    assert_eq!(verify(&at_max, MAX_TIMESTAMP, 0), Ok(()));
    // A creation time in the future is still accepted.
    assert_eq!(verify(&at_max, NOW, 0), Ok(()));
    let at_zero = bundle_bytes(&[8; 32], 1, 0, false);
    assert_eq!(verify(&at_zero, 0, 0), Ok(()));
    assert_eq!(verify(&at_zero, MAX_TIMESTAMP, MAX_TIMESTAMP), Ok(()));
    assert_eq!(
        verify(&at_zero, MAX_TIMESTAMP, MAX_TIMESTAMP - 1),
        Err(Error::StaleBundle)
    );
}

#[test]
fn the_client_refuses_a_millisecond_clock_before_doing_anything() {
    use cubbyhole::client::{block_on, Client, ClientConfig, ClientError};
    use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
    use cubbyhole::storage::MemoryStore;
    use std::error::Error as _;

    let relay = InProcessRelay::new(Relay::new(
        MemoryRelayStorage::new(),
        RelayConfig::unpriced(),
    ));
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let mut c = block_on(Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay,
        ClientConfig::default(),
        &mut rng,
    ))
    .unwrap();
    let ms = 1_700_000_000_000;
    let me = c.address();
    let refused = |r: Result<(), ClientError>| match r {
        Err(e @ ClientError::Protocol(Error::TimeOutOfRange)) => {
            // The chain names the cause.
            assert!(e.source().is_some(), "{e}");
        }
        other => panic!("expected TimeOutOfRange, got {other:?}"),
    };
    refused(block_on(c.maintain_prekeys(&mut rng, ms)).map(drop));
    refused(block_on(c.send(&mut rng, &me, b"x", ms)).map(drop));
    refused(block_on(c.receive(&mut rng, ms)).map(drop));
    refused(block_on(c.resend(&mut rng, ms)).map(drop));
    refused(block_on(c.receive_waiting(&mut rng, ms, 0)).map(drop));
    refused(block_on(c.restored_from_backup(&mut rng, ms)));
    refused(block_on(c.set_trust(&me, cubbyhole::storage::Trust::Validated, ms)).map(drop));
    refused(block_on(c.save_contact(b"me", &me, ms)).map(drop));
    // Nothing was published: the check came first.
    assert!(block_on(c.maintain_prekeys(&mut rng, 1_700_000_000)).is_ok());
}
