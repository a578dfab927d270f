//! The SQLite store's layout at rest, recomputed from SPEC.md (20.2, 20.3)
//! with the primitives directly (hkdf, hmac, sha2, aes-gcm), not through the
//! crate's helpers: the key derivations, the associated data of each row,
//! the routing index's digests, and fresh nonces for every sealed value.
//! Also the mailbox id (SPEC 14.1) from its formula.

use std::collections::HashSet;
use std::path::PathBuf;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::storage::{
    BlockingStore, LocalIdentity, PeerRecord, SessionEntry, SessionRecord, SqliteStore, Trust,
};
use cubbyhole::transport::DeviceAddress;
use cubbyhole::{IdentityKeyPair, PrekeyStore, Session, SessionConfig};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

const APP_KEY: [u8; 32] = [0x5e; 32];
const NOW: u64 = 1_800_000_000;

struct TempDb(PathBuf);

impl TempDb {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("cubbyhole-at-rest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDb(dir)
    }
    fn path(&self) -> PathBuf {
        self.0.join("store.db")
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SPEC 20.3: HKDF-SHA256, no salt, the application's key, an info label.
fn derive(info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(None, &APP_KEY)
        .expand(info, &mut out)
        .unwrap();
    out
}

/// SPEC 20.3: opens `nonce (12) || ciphertext || tag (16)` under the
/// derived key, with aad = "cubbyhole/v1 sqlite" || 0 || table || 0 || row.
fn open(table: &str, row: &[u8], sealed: &[u8]) -> Vec<u8> {
    let k = derive(b"cubbyhole/v1 sqlite store at-rest key");
    let mut aad = b"cubbyhole/v1 sqlite".to_vec();
    aad.push(0);
    aad.extend_from_slice(table.as_bytes());
    aad.push(0);
    aad.extend_from_slice(row);
    Aes256Gcm::new((&k).into())
        .decrypt(
            Nonce::from_slice(&sealed[..12]),
            Payload {
                msg: &sealed[12..],
                aad: &aad,
            },
        )
        .unwrap_or_else(|_| panic!("the {table} row does not open as SPEC 20.3 says"))
}

fn raw(path: &PathBuf) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

fn blob(c: &rusqlite::Connection, sql: &str) -> Vec<u8> {
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// A session we initiated with a new peer (device 2 of its key).
fn session(rng: &mut ChaCha20Rng, me: &IdentityKeyPair) -> (DeviceAddress, SessionRecord) {
    let them = IdentityKeyPair::generate(rng);
    let theirs = PrekeyStore::new(rng, &them, NOW).unwrap();
    let bundle = theirs
        .bundle(&them)
        .verify(NOW, FreshnessPolicy::default())
        .unwrap();
    let mut s = Session::initiate(rng, me, &bundle, SessionConfig::default()).unwrap();
    s.encrypt(rng, b"hello").unwrap();
    (
        DeviceAddress::new(them.public(), 2),
        SessionRecord::single(SessionEntry::new(s, 1, NOW)),
    )
}

#[test]
fn every_row_opens_as_spec_20_3_says() {
    let db = TempDb::new("layout");
    let mut rng = ChaCha20Rng::seed_from_u64(20);
    let keys = IdentityKeyPair::generate(&mut rng);
    let me = LocalIdentity {
        keys: keys.clone(),
        device_id: 7,
    };
    let mut store = SqliteStore::open(db.path(), &APP_KEY).unwrap();
    store.set_identity(&me).unwrap();
    let (peer, record) = session(&mut rng, &keys);
    store.set_session(&peer, &record).unwrap();
    let p = PeerRecord {
        address: peer,
        trust: Trust::Validated,
        first_seen: 1_234,
    };
    store.set_peer(&p).unwrap();
    let c = raw(&db.path());

    // The key check row.
    let sealed = blob(&c, "SELECT value FROM meta WHERE name = 'key_check'");
    assert_eq!(
        open("meta", b"key_check", &sealed),
        b"cubbyhole sqlite store key check v1"
    );
    // The identity: seed || device_id, bound to row 1.
    let sealed = blob(&c, "SELECT secret FROM identity WHERE id = 1");
    let mut want = keys.seed().to_vec();
    want.extend_from_slice(&7u32.to_be_bytes());
    assert_eq!(open("identity", &1u32.to_be_bytes(), &sealed), want);
    // The session record, bound to identity || device_id.
    let sealed = blob(&c, "SELECT state FROM sessions");
    let mut row = peer.identity.to_vec();
    row.extend_from_slice(&peer.device_id.to_be_bytes());
    assert_eq!(open("sessions", &row, &sealed), record.to_bytes().to_vec());
    // The peer: a tag over identity || device_id || trust || first_seen.
    let sealed = blob(&c, "SELECT auth FROM peers");
    assert_eq!(sealed.len(), 28);
    let mut row = peer.identity.to_vec();
    row.extend_from_slice(&peer.device_id.to_be_bytes());
    row.push(1); // validated
    row.extend_from_slice(&1_234u64.to_be_bytes());
    assert!(open("peers", &row, &sealed).is_empty());
}

#[test]
fn the_routing_index_holds_hmac_digests_of_the_ratchet_keys() {
    let db = TempDb::new("routes");
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    let keys = IdentityKeyPair::generate(&mut rng);
    let mut store = SqliteStore::open(db.path(), &APP_KEY).unwrap();
    store
        .set_identity(&LocalIdentity {
            keys: keys.clone(),
            device_id: 1,
        })
        .unwrap();
    let (peer, record) = session(&mut rng, &keys);
    store.set_session(&peer, &record).unwrap();

    // SPEC 20.2: key = HMAC-SHA256(k_route, ratchet key)[0..16].
    let k_route = derive(b"cubbyhole/v1 sqlite store route key");
    let mut want: Vec<Vec<u8>> = record
        .ratchet_keys()
        .map(|key| {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&k_route).unwrap();
            mac.update(&key);
            mac.finalize().into_bytes()[..16].to_vec()
        })
        .collect();
    want.sort();
    let c = raw(&db.path());
    let mut got: Vec<Vec<u8>> = c
        .prepare("SELECT key FROM routes WHERE identity = ?1 AND device_id = ?2")
        .unwrap()
        .query_map(rusqlite::params![&peer.identity[..], peer.device_id], |r| {
            r.get(0)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    got.sort();
    assert!(!want.is_empty());
    assert_eq!(got, want);
    // No ratchet key is stored in the clear.
    for key in record.ratchet_keys() {
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM routes WHERE key = ?1",
                [&key[..16]],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0);
    }
}

#[test]
fn no_two_sealed_values_share_a_nonce() {
    let db = TempDb::new("nonces");
    let mut rng = ChaCha20Rng::seed_from_u64(22);
    let keys = IdentityKeyPair::generate(&mut rng);
    let mut store = SqliteStore::open(db.path(), &APP_KEY).unwrap();
    store
        .set_identity(&LocalIdentity {
            keys: keys.clone(),
            device_id: 1,
        })
        .unwrap();
    let (peer, record) = session(&mut rng, &keys);
    // The same value sealed twice: the stored bytes differ.
    store.set_session(&peer, &record).unwrap();
    let first = blob(&raw(&db.path()), "SELECT state FROM sessions");
    store.set_session(&peer, &record).unwrap();
    let second = blob(&raw(&db.path()), "SELECT state FROM sessions");
    assert_ne!(
        first[..12],
        second[..12],
        "the same value sealed twice reused its nonce"
    );
    // Many values: every sealed value in the file has its own nonce.
    for i in 0..20 {
        let (peer, record) = session(&mut rng, &keys);
        store.set_session(&peer, &record).unwrap();
        store
            .set_peer(&PeerRecord {
                address: peer,
                trust: Trust::Unvalidated,
                first_seen: i,
            })
            .unwrap();
    }
    let c = raw(&db.path());
    let mut nonces = HashSet::new();
    let mut count = 0;
    for sql in [
        "SELECT value FROM meta",
        "SELECT secret FROM identity",
        "SELECT state FROM sessions",
        "SELECT auth FROM peers",
    ] {
        let mut stmt = c.prepare(sql).unwrap();
        for sealed in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
            let sealed = sealed.unwrap();
            count += 1;
            assert!(
                nonces.insert(sealed[..12].to_vec()),
                "a nonce repeats ({sql})"
            );
        }
    }
    assert!(count >= 42, "{count} sealed values");
}

#[test]
fn the_mailbox_id_is_sha256_of_its_label_identity_and_device() {
    let mut rng = ChaCha20Rng::seed_from_u64(23);
    let keys = IdentityKeyPair::generate(&mut rng);
    let address = DeviceAddress::new(keys.public(), 0x0102_0304);
    let mut h = Sha256::new();
    h.update(b"cubbyhole/v1 mailbox");
    h.update(keys.public().as_bytes());
    h.update([1, 2, 3, 4]);
    let want: [u8; 32] = h.finalize().into();
    assert_eq!(address.mailbox().0, want);
}

#[test]
fn the_directory_upload_is_built_and_signed_as_spec_15_2_says() {
    use cubbyhole::transport::BundleSetUpload;
    use cubbyhole::SignedPrekey;
    use ed25519_dalek::{Signer, SigningKey};

    let seed = [0x42; 32];
    let identity = IdentityKeyPair::from_seed(&seed);
    let spk = SignedPrekey::from_secret(&identity, 9, NOW, [0x17; 32]).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(24);
    let mut pool = PrekeyStore::new(&mut rng, &identity, NOW).unwrap();
    pool.generate_one_time_prekeys(&mut rng, 2);
    let opks: Vec<_> = pool.one_time_prekeys().collect();

    // SPEC 15.2, field by field.
    let mut body = vec![0x01];
    body.extend_from_slice(identity.public().as_bytes());
    body.extend_from_slice(&3u32.to_be_bytes()); // device_id
    body.extend_from_slice(&77u64.to_be_bytes()); // counter
    body.extend_from_slice(&9u32.to_be_bytes());
    body.extend_from_slice(&NOW.to_be_bytes());
    body.extend_from_slice(spk.public());
    body.extend_from_slice(spk.signature());
    body.push(0x01); // replace
    body.extend_from_slice(&(opks.len() as u16).to_be_bytes());
    for k in &opks {
        body.extend_from_slice(&k.id().to_be_bytes());
        body.extend_from_slice(k.public());
    }
    // signature = Ed25519(IK, "cubbyhole/v1 directory upload" || body),
    // IK's signing key being the identity seed (SPEC 2.1).
    let mut message = b"cubbyhole/v1 directory upload".to_vec();
    message.extend_from_slice(&body);
    let signature = SigningKey::from_bytes(&seed).sign(&message);
    let mut want = body;
    want.extend_from_slice(&signature.to_bytes());
    assert_eq!(want.len(), 220 + 36 * opks.len());

    let got = BundleSetUpload::new(3, &identity, 77, &spk, &opks, true).sign(&identity);
    assert_eq!(got, want, "the crate's upload differs from SPEC 15.2");
    let decoded = BundleSetUpload::decode_verified(&want).unwrap();
    assert_eq!(decoded.counter, 77);
    assert!(decoded.replace_one_time_prekeys);
    assert_eq!(decoded.one_time_prekeys.len(), 2);
}
