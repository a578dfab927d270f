//! Small contracts of the public API that the larger suites did not pin
//! (found by cargo-mutants: each test here fails under a mutant that the
//! rest of the suite let through). Equality and hashing of identity keys,
//! key export, what Debug shows, documented constants, the mailbox proof's
//! signed message, the relay body codecs at their boundaries, and how the
//! relay reports a storage failure.

use cubbyhole::transport::DepositPass;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::transport::{
    decode_acknowledge, decode_envelope_list, encode_acknowledge, encode_envelope_list,
    DeviceAddress, Envelope, EnvelopeId, MailboxAuth, MailboxOp,
};
use cubbyhole::{IdentityKeyPair, OneTimePrekey, PrekeyBundle, PrekeyStore, SignedPrekey};
use ed25519_dalek::Signer;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const NOW: u64 = 1_800_000_000;

fn hash_of(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[test]
fn identity_keys_compare_and_hash_by_their_bytes() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let a = IdentityKeyPair::generate(&mut rng);
    let b = IdentityKeyPair::generate(&mut rng);
    let a_again = IdentityKeyPair::from_seed(&a.seed());
    assert_eq!(a.public(), a_again.public());
    assert_ne!(a.public(), b.public());
    assert_eq!(hash_of(a.public()), hash_of(a_again.public()));
    assert_ne!(hash_of(a.public()), hash_of(b.public()));
}

#[test]
fn exported_prekey_secrets_are_the_keys_secrets() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let identity = IdentityKeyPair::generate(&mut rng);
    let spk = SignedPrekey::generate(&mut rng, &identity, 7, NOW).expect("time in unix seconds");
    let opk = OneTimePrekey::generate(&mut rng, 9);
    // The X25519 public key of the exported secret, computed by
    // x25519-dalek directly, is the key's public key.
    let public_of = |secret: [u8; 32]| {
        *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).as_bytes()
    };
    assert_eq!(&public_of(*spk.secret_bytes()), spk.public());
    assert_eq!(&public_of(*opk.secret_bytes()), opk.public());
    // And restoring from it gives the same key.
    let restored = OneTimePrekey::from_secret(9, *opk.secret_bytes());
    assert_eq!(restored.public(), opk.public());
}

#[test]
fn debug_names_keys_by_their_public_parts() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let identity = IdentityKeyPair::generate(&mut rng);
    let hex: String = identity
        .public()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        format!("{:?}", identity.public()),
        format!("IdentityKey({hex})")
    );
    assert_eq!(
        format!("{identity:?}"),
        format!("IdentityKeyPair {{ public: IdentityKey({hex}), .. }}")
    );
    let spk = SignedPrekey::generate(&mut rng, &identity, 7, NOW).expect("time in unix seconds");
    assert_eq!(
        format!("{spk:?}"),
        format!("SignedPrekey {{ id: 7, created: {NOW}, .. }}")
    );
    let opk = OneTimePrekey::generate(&mut rng, 9);
    assert_eq!(format!("{opk:?}"), "OneTimePrekey { id: 9, .. }");
}

#[test]
fn documented_constants() {
    // SPEC: bundles older than 30 days are refused by default.
    assert_eq!(FreshnessPolicy::DEFAULT_MAX_AGE, 2_592_000);
}

#[test]
fn a_bundle_carries_its_signed_prekey_signature() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let bob = IdentityKeyPair::generate(&mut rng);
    let prekeys = PrekeyStore::new(&mut rng, &bob, NOW).expect("time in unix seconds");
    let bundle = PrekeyBundle::decode(&prekeys.bundle(&bob).encode()).unwrap();
    assert_eq!(
        bundle.signature(),
        prekeys.current_signed_prekey().signature()
    );
    assert_ne!(bundle.signature(), &[0; 64]);
}

/// SPEC: the owner proof signs `"cubbyhole/v1 mailbox auth" || mailbox ||
/// op || challenge` with the identity key (Ed25519), op 1 = fetch, 2 =
/// acknowledge. Built here with ed25519-dalek, not with the crate.
#[test]
fn the_mailbox_proof_signs_the_specified_message() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let identity = IdentityKeyPair::generate(&mut rng);
    let device = DeviceAddress::new(identity.public(), 3);
    let signing = ed25519_dalek::SigningKey::from_bytes(&identity.seed());
    let challenge = [0x5c; 32];
    let proof = |op_byte: u8, challenge: &[u8; 32]| {
        let mut message = b"cubbyhole/v1 mailbox auth".to_vec();
        message.extend_from_slice(&device.mailbox().0);
        message.push(op_byte);
        message.extend_from_slice(challenge);
        signing.sign(&message).to_bytes()
    };
    let auth = |op, signature| MailboxAuth {
        device,
        op,
        challenge,
        signature,
    };
    assert_eq!(
        auth(MailboxOp::Fetch, proof(1, &challenge)).verify(),
        Ok(())
    );
    assert_eq!(
        auth(MailboxOp::Acknowledge, proof(2, &challenge)).verify(),
        Ok(())
    );
    // The crate's own proof is that signature (Ed25519 is deterministic).
    assert_eq!(
        MailboxAuth::sign(&identity, 3, MailboxOp::Fetch, challenge).signature,
        proof(1, &challenge)
    );
    // Another op, challenge or mailbox is another message.
    assert!(auth(MailboxOp::Acknowledge, proof(1, &challenge))
        .verify()
        .is_err());
    assert!(auth(MailboxOp::Fetch, proof(1, &[0x5d; 32]))
        .verify()
        .is_err());
    let other = MailboxAuth {
        device: DeviceAddress::new(identity.public(), 4),
        ..auth(MailboxOp::Fetch, proof(1, &challenge))
    };
    assert!(other.verify().is_err());
}

fn envelope(n: u8, len: usize) -> Envelope {
    Envelope {
        id: EnvelopeId([n; 16]),
        payload: vec![n; len],
    }
}

#[test]
fn envelope_lists_round_trip_and_refuse_a_short_last_envelope() {
    for list in [
        vec![],
        vec![envelope(1, 0)],
        vec![envelope(1, 10), envelope(2, 0), envelope(3, 300)],
    ] {
        let encoded = encode_envelope_list(&list);
        assert_eq!(decode_envelope_list(&encoded).unwrap(), list);
        if let Some(last) = encoded.len().checked_sub(1) {
            assert!(decode_envelope_list(&encoded[..last]).is_err());
        }
    }
}

#[test]
fn acknowledgements_round_trip_and_check_their_count() {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let identity = IdentityKeyPair::generate(&mut rng);
    let auth = MailboxAuth::sign(&identity, 1, MailboxOp::Acknowledge, [7; 32]);
    for n in [0u8, 1, 2, 17] {
        let ids: Vec<EnvelopeId> = (0..n).map(|i| EnvelopeId([i; 16])).collect();
        let encoded = encode_acknowledge(&auth, &ids).unwrap();
        let (decoded_auth, decoded_ids) = decode_acknowledge(&encoded).unwrap();
        assert_eq!(decoded_auth.encode(), auth.encode());
        assert_eq!(decoded_ids, ids);
        // One id byte more or less than the count says is refused.
        assert!(decode_acknowledge(&encoded[..encoded.len() - 1]).is_err() || n == 0);
        let mut longer = encoded.clone();
        longer.push(0);
        assert!(decode_acknowledge(&longer).is_err());
    }
}

#[cfg(feature = "sqlite")]
mod storage_failures {
    use super::*;
    use cubbyhole::relay::{Relay, RelayConfig, RelayStorageError, SqliteRelayStorage};
    use cubbyhole::transport::TransportError;

    /// A storage failure answers `Unavailable` and is kept for the
    /// operator's log, with what failed.
    #[test]
    fn the_relay_reports_storage_failures() {
        let path = std::env::temp_dir().join(format!(
            "cubbyhole-contracts-{}-{}.db",
            std::process::id(),
            NOW
        ));
        let config = RelayConfig {
            max_pending_envelopes: 7,
            require_published_mailbox: false,
            ..RelayConfig::unpriced()
        };
        let mut relay = Relay::new(SqliteRelayStorage::open(&path).unwrap(), config.clone());
        assert_eq!(relay.config(), &config);
        assert!(relay.take_storage_error().is_none());
        // Another connection breaks the schema under the relay.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE envelopes")
            .unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let bob = IdentityKeyPair::generate(&mut rng);
        let mailbox = DeviceAddress::new(bob.public(), 1).mailbox();
        let answer = relay.deposit(NOW, &mailbox, &envelope(1, 10), &DepositPass::NONE);
        assert!(
            matches!(answer, Err(TransportError::Unavailable(_))),
            "{answer:?}"
        );
        let error = relay.take_storage_error().expect("the failure is kept");
        assert!(matches!(error, RelayStorageError::Backend(_)), "{error:?}");
        let shown = error.to_string();
        assert!(
            shown.starts_with("relay storage backend: ") && shown.contains("envelopes"),
            "{shown}"
        );
        assert!(relay.take_storage_error().is_none(), "taken once");
        drop(relay);
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
        assert_eq!(
            RelayStorageError::UnsupportedSchema(9).to_string(),
            "unsupported relay schema version 9"
        );
        assert_eq!(
            RelayStorageError::Corrupted("x".into()).to_string(),
            "corrupted relay storage: x"
        );
    }
}
