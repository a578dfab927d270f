//! Generates `test-vectors/` deterministically:
//!
//! ```text
//! cargo run --example gen_vectors [-- OUTPUT_DIR]
//! ```
//!
//! All randomness comes from a ChaCha20 generator with a fixed seed, so the
//! output is identical on every run. Session cases are scripts of sends and
//! deliveries; negative cases are mutations of their messages (and of
//! bundles and identity keys), each with the error kind that the profile's
//! order of checks gives, worked out by hand and written next to the case in
//! its `description`. The generator refuses to write a negative case that the
//! crate does not reject with that kind, and `tests/vectors.rs` checks every
//! field again from the files.
//!
//! `frames.json` (the client frame of `src/client/frame.rs`, not part of the
//! profile) uses no randomness: ids are SHA-256 of a label, and every
//! expected encoding is written out by hand from the layout, byte field by
//! byte field. The generator then checks that `Frame::decode` gives the
//! fields back and that `Frame::encode` gives the same bytes, and that every
//! negative case is refused with `BadFrame`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::client::frame::{BadFrame, Frame};
use cubbyhole::transport::AccessKey;
use cubbyhole::{
    hazmat, Error, IdentityKey, IdentityKeyPair, Incoming, OneTimePrekey, PrekeyBundle,
    PrekeyStore, SafetyNumber, Session, SessionConfig, SignedPrekey,
};
use rand_chacha::rand_core::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SEED: [u8; 32] = *b"cubbyhole/v1 test vectors seed!!";
const MAX_SKIP: u32 = SessionConfig::DEFAULT_MAX_SKIP;

/// Wraps the generator's RNG and records what the crate draws from it.
struct Recording<'a> {
    inner: &'a mut ChaCha20Rng,
    drawn: Vec<u8>,
}

impl RngCore for Recording<'_> {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.inner.fill_bytes(dest);
        self.drawn.extend_from_slice(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_chacha::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for Recording<'_> {}

fn h(bytes: &[u8]) -> Value {
    Value::String(hex::encode(bytes))
}

fn bytes32(rng: &mut ChaCha20Rng) -> [u8; 32] {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    b
}

/// The keys of one case.
struct Keys {
    initiator_seed: [u8; 32],
    responder_seed: [u8; 32],
    spk_id: u32,
    spk_created: u64,
    spk_private: [u8; 32],
    opk: Option<(u32, [u8; 32])>,
}

impl Keys {
    fn random(rng: &mut ChaCha20Rng, with_opk: bool) -> Self {
        Keys {
            initiator_seed: bytes32(rng),
            responder_seed: bytes32(rng),
            spk_id: rng.next_u32(),
            // Some time between 2021 and 2027.
            spk_created: 1_609_459_200 + rng.next_u64() % 189_302_400,
            spk_private: bytes32(rng),
            opk: with_opk.then(|| (rng.next_u32(), bytes32(rng))),
        }
    }
    fn initiator(&self) -> IdentityKeyPair {
        IdentityKeyPair::from_seed(&self.initiator_seed)
    }
    fn responder(&self) -> IdentityKeyPair {
        IdentityKeyPair::from_seed(&self.responder_seed)
    }
    fn signed_prekey(&self) -> SignedPrekey {
        SignedPrekey::from_secret(
            &self.responder(),
            self.spk_id,
            self.spk_created,
            self.spk_private,
        )
        .expect("time in unix seconds")
    }
    fn one_time_prekey(&self) -> Option<OneTimePrekey> {
        self.opk.map(|(id, k)| OneTimePrekey::from_secret(id, k))
    }
    fn bundle(&self) -> PrekeyBundle {
        PrekeyBundle::new(
            &self.responder(),
            &self.signed_prekey(),
            self.one_time_prekey().as_ref(),
        )
    }

    /// The fields shared by x3dh.json and session.json cases.
    fn setup_json(&self, name: &str, ephemeral: &[u8; 32]) -> serde_json::Map<String, Value> {
        let (init, resp) = (self.initiator(), self.responder());
        let spk = self.signed_prekey();
        let opk = self.one_time_prekey();
        let bundle = self.bundle();
        let x = hazmat::x3dh_initiator(&init, ephemeral, &bundle).expect("X3DH");
        let mut m = serde_json::Map::new();
        m.insert("name".into(), json!(name));
        m.insert("initiator_identity_seed".into(), h(&self.initiator_seed));
        m.insert("responder_identity_seed".into(), h(&self.responder_seed));
        m.insert("signed_prekey_id".into(), json!(self.spk_id));
        m.insert("signed_prekey_created".into(), json!(self.spk_created));
        m.insert("signed_prekey_private".into(), h(&self.spk_private));
        m.insert(
            "one_time_prekey_id".into(),
            json!(self.opk.map(|(id, _)| id)),
        );
        m.insert(
            "one_time_prekey_private".into(),
            self.opk.map_or(Value::Null, |(_, k)| h(&k)),
        );
        m.insert("initiator_ephemeral_private".into(), h(ephemeral));
        m.insert(
            "initiator_identity_public".into(),
            h(init.public().as_bytes()),
        );
        m.insert(
            "responder_identity_public".into(),
            h(resp.public().as_bytes()),
        );
        m.insert(
            "initiator_identity_x25519_public".into(),
            h(init.public().x25519_bytes()),
        );
        m.insert(
            "responder_identity_x25519_public".into(),
            h(resp.public().x25519_bytes()),
        );
        m.insert("signed_prekey_public".into(), h(spk.public()));
        m.insert("signed_prekey_signature".into(), h(spk.signature()));
        m.insert(
            "one_time_prekey_public".into(),
            opk.map_or(Value::Null, |k| h(k.public())),
        );
        m.insert("bundle".into(), h(&bundle.encode()));
        m.insert("dh1".into(), h(x.dh1.as_ref()));
        m.insert("dh2".into(), h(x.dh2.as_ref()));
        m.insert("dh3".into(), h(x.dh3.as_ref()));
        m.insert(
            "dh4".into(),
            x.dh4.as_ref().map_or(Value::Null, |d| h(d.as_ref())),
        );
        m.insert("shared_secret".into(), h(x.shared_secret.as_ref()));
        m.insert("associated_data".into(), h(&x.associated_data));
        m
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Who {
    Initiator,
    Responder,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Initiator => "initiator",
            Who::Responder => "responder",
        }
    }
}

/// One step of a session script.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// The party encrypts a plaintext of this many bytes.
    Send(Who, usize),
    /// The message with this index reaches its receiver.
    Deliver(usize),
}
use Op::{Deliver, Send};
use Who::{Initiator as I, Responder as R};

#[derive(Clone)]
struct Party {
    identity: IdentityKeyPair,
    prekeys: Option<PrekeyStore>,
    session: Option<Session>,
}

impl Party {
    fn receive(&mut self, wire: &[u8]) -> Result<Vec<u8>, Error> {
        let incoming = Incoming::decode(wire)?;
        if let Some(session) = self.session.as_mut().filter(|s| s.matches(&incoming)) {
            let mut out = Vec::new();
            session.decrypt_incoming(&incoming, &mut out)?;
            return Ok(out);
        }
        if incoming.prekey().is_none() {
            return Err(Error::SessionMismatch);
        }
        let prekeys = self.prekeys.as_mut().ok_or(Error::UnknownPrekey)?;
        let accepted = prekeys.accept(&self.identity, &incoming, SessionConfig::default())?;
        self.session = Some(accepted.session);
        Ok(accepted.plaintext)
    }
}

/// A generated session case, with snapshots of both parties after every
/// delivery count that negative cases ask for.
struct Run {
    json: Value,
    wires: Vec<Vec<u8>>,
    senders: Vec<Who>,
    /// Delivery count -> (initiator, responder) before the sends due at it.
    snapshots: BTreeMap<usize, (Party, Party)>,
    keys: Keys,
}

fn run_script(
    rng: &mut ChaCha20Rng,
    name: &str,
    keys: Keys,
    script: &[Op],
    snapshot_at: &[usize],
) -> Run {
    let mut rec = Recording {
        inner: rng,
        drawn: Vec::new(),
    };
    let bundle = keys
        .bundle()
        .verify(keys.spk_created, FreshnessPolicy::default())
        .expect("fresh bundle");
    let session = Session::initiate(
        &mut rec,
        &keys.initiator(),
        &bundle,
        SessionConfig::default(),
    )
    .expect("initiate");
    assert_eq!(
        rec.drawn.len(),
        64,
        "initiate draws EK_A then the first ratchet key"
    );
    let ephemeral: [u8; 32] = rec.drawn[..32].try_into().expect("32");
    let mut pending_ratchet: Option<Vec<u8>> = Some(rec.drawn[32..].to_vec());
    let mut prekeys = PrekeyStore::with_signed_prekey(keys.signed_prekey());
    if let Some(k) = keys.one_time_prekey() {
        prekeys.insert_one_time_prekey(k);
    }
    let mut init = Party {
        identity: keys.initiator(),
        prekeys: None,
        session: Some(session),
    };
    let mut resp = Party {
        identity: keys.responder(),
        prekeys: Some(prekeys),
        session: None,
    };
    let mut messages = Vec::new();
    let mut deliveries = Vec::new();
    let mut wires: Vec<Vec<u8>> = Vec::new();
    let mut senders = Vec::new();
    let mut plaintexts: Vec<Vec<u8>> = Vec::new();
    let mut snapshots = BTreeMap::new();
    let mut delivered_flags = Vec::new();
    let take_snapshot =
        |snapshots: &mut BTreeMap<usize, (Party, Party)>, k: usize, init: &Party, resp: &Party| {
            if snapshot_at.contains(&k) && !snapshots.contains_key(&k) {
                snapshots.insert(k, (init.clone(), resp.clone()));
            }
        };
    take_snapshot(&mut snapshots, 0, &init, &resp);
    for op in script {
        match *op {
            Send(who, len) => {
                let mut plaintext = vec![0u8; len];
                rec.inner.fill_bytes(&mut plaintext);
                let party = if who == I { &mut init } else { &mut resp };
                rec.drawn.clear();
                let (wire, mk) = hazmat::encrypt_exposing_message_key(
                    party.session.as_mut().expect("sender has a session"),
                    &mut rec,
                    &plaintext,
                )
                .expect("encrypt");
                let ratchet_private = if messages.is_empty() {
                    pending_ratchet.take()
                } else {
                    (!rec.drawn.is_empty()).then(|| rec.drawn.clone())
                };
                messages.push(json!({
                    "sender": who.name(),
                    "after_deliveries": deliveries.len(),
                    "ratchet_private": ratchet_private.map_or(Value::Null, |r| h(&r)),
                    "plaintext": h(&plaintext),
                    "message_key": h(mk.as_ref()),
                    "wire": h(&wire),
                }));
                wires.push(wire);
                senders.push(who);
                plaintexts.push(plaintext);
                delivered_flags.push(false);
            }
            Deliver(i) => {
                assert!(!delivered_flags[i], "{name}: message {i} delivered twice");
                delivered_flags[i] = true;
                let receiver = if senders[i] == I { R } else { I };
                let party = if receiver == I { &mut init } else { &mut resp };
                let pt = party
                    .receive(&wires[i])
                    .unwrap_or_else(|e| panic!("{name}: delivering message {i}: {e:?}"));
                assert_eq!(pt, plaintexts[i], "{name}: plaintext of message {i}");
                deliveries.push(json!({"receiver": receiver.name(), "index": i}));
                take_snapshot(&mut snapshots, deliveries.len(), &init, &resp);
            }
        }
    }
    let mut case = keys.setup_json(name, &ephemeral);
    case.insert("messages".into(), Value::Array(messages));
    case.insert("delivery".into(), Value::Array(deliveries));
    Run {
        json: Value::Object(case),
        wires,
        senders,
        snapshots,
        keys,
    }
}

/// Script helpers.
fn ping_pong(rounds: usize, len: usize) -> Vec<Op> {
    let mut ops = Vec::new();
    for r in 0..rounds {
        let who = if r % 2 == 0 { I } else { R };
        ops.push(Send(who, len));
        ops.push(Deliver(r));
    }
    ops
}

/// `count` sends by `who`, starting at message index `first`.
fn burst(who: Who, count: usize, len: usize) -> Vec<Op> {
    vec![Send(who, len); count]
}

fn deliver_all(indices: impl IntoIterator<Item = usize>) -> Vec<Op> {
    indices.into_iter().map(Deliver).collect()
}

/// A negative case: the input, when it is given, and the kind the profile's
/// order of checks gives (worked out by hand in `description`).
struct Neg {
    name: String,
    case: &'static str,
    kind: &'static str,
    receiver: Who,
    after: usize,
    input: Vec<u8>,
    error: &'static str,
    description: String,
}

fn flip(mut bytes: Vec<u8>, bit: usize) -> Vec<u8> {
    bytes[bit / 8] ^= 0x80 >> (bit % 8);
    bytes
}

fn with(mut bytes: Vec<u8>, at: usize, value: &[u8]) -> Vec<u8> {
    bytes[at..at + value.len()].copy_from_slice(value);
    bytes
}

/// Offsets in a prekey message.
const PKM_IK: usize = 2;
const PKM_EK: usize = 34;
const PKM_SPK_ID: usize = 66;
const PKM_HAS_OPK: usize = 70;
/// Offset of the header in a normal message.
const MSG_HEADER: usize = 2;

fn pkm_header(wire: &[u8]) -> usize {
    if wire[PKM_HAS_OPK] == 1 {
        75
    } else {
        71
    }
}

fn main() {
    let out_dir = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("test-vectors"), PathBuf::from);
    std::fs::create_dir_all(&out_dir).expect("create output directory");
    let mut rng = ChaCha20Rng::from_seed(SEED);

    // ---------------------------------------------------------------- x3dh
    let mut x3dh_cases = Vec::new();
    for (name, with_opk) in [
        ("with_one_time_prekey", true),
        ("without_one_time_prekey", false),
        ("with_one_time_prekey_2", true),
        ("without_one_time_prekey_2", false),
    ] {
        let keys = Keys::random(&mut rng, with_opk);
        let ephemeral = bytes32(&mut rng);
        x3dh_cases.push(Value::Object(keys.setup_json(name, &ephemeral)));
    }

    // ------------------------------------------------------------- session
    let mut runs: BTreeMap<&'static str, Run> = BTreeMap::new();
    let mut negs: Vec<Neg> = Vec::new();
    let add = |runs: &mut BTreeMap<&'static str, Run>,
               rng: &mut ChaCha20Rng,
               name: &'static str,
               opk: bool,
               script: Vec<Op>,
               at: &[usize]| {
        let keys = Keys::random(rng, opk);
        let run = run_script(rng, name, keys, &script, at);
        runs.insert(name, run);
    };

    // Ping-pong: a DH ratchet step with every message.
    add(
        &mut runs,
        &mut rng,
        "ping_pong_opk",
        true,
        ping_pong(10, 24),
        &[0, 1, 2, 7, 10],
    );
    add(
        &mut runs,
        &mut rng,
        "ping_pong_no_opk",
        false,
        ping_pong(8, 24),
        &[0, 1, 8],
    );

    // Several prekey messages before the first reply, delivered out of
    // order; then replies, and a late prekey message.
    let mut s = burst(I, 5, 16);
    s.extend(deliver_all([3, 0, 4]));
    s.push(Send(R, 16)); // 5
    s.push(Deliver(5));
    s.push(Send(I, 16)); // 6: a normal message now
    s.extend(deliver_all([1, 6, 2]));
    add(
        &mut runs,
        &mut rng,
        "prekey_messages_out_of_order",
        true,
        s,
        &[1, 3, 7],
    );

    // Long one-way runs.
    let mut s = burst(I, 40, 8);
    s.extend(deliver_all(0..40));
    add(
        &mut runs,
        &mut rng,
        "long_one_way_initiator_prekey",
        true,
        s,
        &[],
    );
    let mut s = vec![Send(I, 8), Deliver(0)];
    s.extend(burst(R, 40, 8));
    s.extend(deliver_all(1..41));
    add(
        &mut runs,
        &mut rng,
        "long_one_way_responder",
        false,
        s,
        &[20, 41],
    );

    // Several DH ratchet steps, out of order within a chain and across
    // chains: messages of an earlier chain arrive after a later chain.
    let s = vec![
        Send(I, 12),
        Send(I, 12),
        Send(I, 12), // 0 1 2   chain A1
        Deliver(2),
        Deliver(0), //         1 is skipped
        Send(R, 12),
        Send(R, 12),
        Send(R, 12), // 3 4 5   chain B1
        Deliver(4),  //         3 skipped
        Send(I, 12),
        Send(I, 12), // 6 7     chain A2 (pn = 3)
        Deliver(7),  //         6 skipped; chain A1 key 1 still stored
        Send(R, 12), // 8       chain B2
        Deliver(8),
        Deliver(3),
        Deliver(1), //         old chains after new
        Deliver(6),
        Deliver(5),
        Send(I, 12),
        Deliver(9), // 9       chain A3
    ];
    add(
        &mut runs,
        &mut rng,
        "ratchet_steps_out_of_order",
        true,
        s,
        &[4, 5, 6, 7, 10],
    );

    // Both parties send before hearing from each other.
    let s = vec![
        Send(I, 10),
        Deliver(0),
        Send(I, 10),
        Send(R, 10), // 1 (prekey message), 2 crossing
        Deliver(2),
        Deliver(1),
        Send(I, 10),
        Send(R, 10),
        Deliver(3),
        Deliver(4),
    ];
    add(&mut runs, &mut rng, "crossing_messages", false, s, &[1, 3]);

    // Empty and 64 KiB plaintexts, both directions.
    let s = vec![
        Send(I, 0),
        Deliver(0),
        Send(R, 65536),
        Deliver(1),
        Send(I, 65536),
        Deliver(2),
        Send(R, 0),
        Deliver(3),
    ];
    add(&mut runs, &mut rng, "empty_and_large", true, s, &[]);

    // A gap of exactly MAX_SKIP: message n = 1000 of a fresh chain arrives
    // first, then every skipped one.
    let gap = MAX_SKIP as usize;
    let mut s = vec![Send(I, 4), Deliver(0)];
    s.extend(burst(R, gap + 1, 4)); // 1 ..= 1001 (n = 0 ..= 1000)
    s.push(Deliver(gap + 1));
    s.extend(deliver_all(1..gap + 1));
    add(&mut runs, &mut rng, "skip_gap_max", false, s, &[1, 2, 3]);

    // Messages the relay dropped: never delivered, their keys stay stored.
    let s = vec![
        Send(I, 20),
        Send(I, 20),
        Send(I, 20),
        Deliver(0),
        Deliver(2), // 1 dropped
        Send(R, 20),
        Send(R, 20),
        Send(R, 20),
        Send(R, 20),
        Deliver(6), // 3 4 5 ; 3 4 dropped
        Send(I, 20),
        Deliver(7),
        Send(R, 20),
        Send(R, 20),
        Deliver(9), // 7; 8 9 ; 8 dropped
        Deliver(5),
        Send(I, 20),
        Send(I, 20),
        Deliver(11), // 10 11; 10 dropped
    ];
    add(
        &mut runs,
        &mut rng,
        "relay_dropped_messages",
        true,
        s,
        &[5, 8, 9],
    );

    // More skipped keys than the cap: three chains of 1001 messages of which
    // only the last arrives (1000 skipped keys each), so the oldest 1000 of
    // the first chain are evicted; then keys of the second chain are used.
    let mut s = vec![Send(I, 1), Deliver(0)];
    let mut idx = 1;
    let mut lasts = Vec::new();
    for round in 0..3 {
        s.extend(burst(R, gap + 1, 1));
        let first = idx;
        idx += gap + 1;
        s.push(Deliver(idx - 1));
        lasts.push((first, idx - 1));
        // The initiator replies so the responder's next burst is a new chain.
        if round < 2 {
            s.push(Send(I, 1));
            s.push(Deliver(idx));
            idx += 1;
        }
    }
    // Chain 2's skipped keys are still there; deliver a few.
    let (c2_first, _) = lasts[1];
    s.extend(deliver_all([c2_first, c2_first + 500, c2_first + 999]));
    // Chain 3's skipped keys too.
    let (c3_first, _) = lasts[2];
    s.push(Deliver(c3_first + 3));
    add(
        &mut runs,
        &mut rng,
        "skipped_keys_evicted",
        true,
        s,
        &[4, 6, 9],
    );

    // Random walks: random sends, deliveries, reorders and drops.
    for (name, steps) in [("random_walk_1", 60), ("random_walk_2", 60)] {
        let mut s = vec![Send(I, 8), Deliver(0)];
        let mut sent: Vec<Who> = vec![I];
        let mut pending: Vec<usize> = Vec::new();
        for _ in 0..steps {
            let r = rng.next_u32() % 10;
            if r < 5 || pending.is_empty() {
                // The responder can only send once it has a session, which it
                // has after delivery 0.
                let who = if rng.next_u32() % 2 == 0 { I } else { R };
                s.push(Send(who, (rng.next_u32() % 48) as usize));
                pending.push(sent.len());
                sent.push(who);
            } else if r < 9 {
                let i = pending.remove((rng.next_u32() as usize) % pending.len());
                s.push(Deliver(i));
            } else {
                // Dropped by the relay.
                pending.remove((rng.next_u32() as usize) % pending.len());
            }
        }
        add(&mut runs, &mut rng, name, true, s, &[7, 20]);
    }

    // ------------------------------------------------------------ negative
    // Prekey messages given to a responder without a session.
    for case in ["ping_pong_opk", "ping_pong_no_opk"] {
        let run = &runs[case];
        let w = run.wires[0].clone();
        let hdr = pkm_header(&w);
        let opk = w[PKM_HAS_OPK] == 1;
        let p = if opk { "pkm_opk" } else { "pkm_no_opk" };
        let mut n = |suffix: &str, input: Vec<u8>, error: &'static str, why: &str| {
            negs.push(Neg {
                case,
                name: format!("{p}_{suffix}"),
                kind: "prekey_message",
                receiver: R,
                after: 0,
                input,
                error,
                description: format!(
                    "first prekey message of {case} (responder has no session): {why}"
                ),
            });
        };
        n(
            "version",
            with(w.clone(), 0, &[0x02]),
            "decode",
            "version byte 0x01 -> 0x02",
        );
        n(
            "kind_unknown",
            with(w.clone(), 1, &[0x03]),
            "decode",
            "kind byte 0x01 -> 0x03",
        );
        n(
            "truncated_in_fields",
            w[..PKM_SPK_ID + 2].to_vec(),
            "decode",
            "cut inside spk_id",
        );
        n(
            "truncated_in_header",
            w[..hdr + 20].to_vec(),
            "decode",
            "cut inside the header",
        );
        n(
            "truncated_tag",
            w[..hdr + 40 + 15].to_vec(),
            "decode",
            "header then only 15 bytes: shorter than the tag",
        );
        n(
            "has_opk_not_boolean",
            with(w.clone(), PKM_HAS_OPK, &[0x02]),
            "decode",
            "has_opk = 0x02",
        );
        n(
            "ik_a_sign_bit",
            flip(w.clone(), PKM_IK * 8 + 248),
            "auth",
            "sign bit of IK_A flipped: the negated point is valid and has the same X25519 form, so X3DH succeeds and gives the same SK, but AD (which holds IK_A) differs: auth",
        );
        n(
            "ik_a_small_order",
            with(w.clone(), PKM_IK, &SMALL_ORDER[0]),
            "invalid_key",
            "IK_A replaced by the identity point (small order)",
        );
        n(
            "ik_a_negative_zero",
            with(w.clone(), PKM_IK, &NEGATIVE_ZERO),
            "invalid_key",
            "IK_A = y 1 with the sign bit set (x = 0): not canonical",
        );
        n(
            "ek_a_zero",
            with(w.clone(), PKM_EK, &[0u8; 32]),
            "invalid_key",
            "EK_A = 0 (small order): DH2 is not contributory",
        );
        n(
            "ek_a_one",
            with(w.clone(), PKM_EK, &X25519_ONE),
            "invalid_key",
            "EK_A = 1 (small order): DH2 is not contributory",
        );
        n(
            "ek_a_bit",
            flip(w.clone(), PKM_EK * 8 + 3),
            "auth",
            "a bit of EK_A flipped: X3DH gives another SK: auth",
        );
        n(
            "spk_id",
            flip(w.clone(), PKM_SPK_ID * 8 + 31),
            "unknown_prekey",
            "spk_id changed: not held",
        );
        if opk {
            n(
                "opk_id",
                flip(w.clone(), (PKM_HAS_OPK + 1) * 8 + 31),
                "unknown_prekey",
                "opk_id changed: not held",
            );
            // has_opk cleared: opk_id is read as the first 4 header bytes, and
            // pn as bytes 28..32 of the real ratchet key.
            let pn = u32::from_be_bytes(w[hdr + 28..hdr + 32].try_into().expect("4"));
            assert!(pn > MAX_SKIP, "choose another seed");
            n("has_opk_cleared", with(w.clone(), PKM_HAS_OPK, &[0]), "too_many_skipped", &format!("has_opk 1 -> 0: the header is read 4 bytes early; its ratchet key is new and pn = {pn} > MAX_SKIP"));
        } else {
            let opk_id = u32::from_be_bytes(w[hdr..hdr + 4].try_into().expect("4"));
            n("has_opk_set", with(w.clone(), PKM_HAS_OPK, &[1]), "unknown_prekey", &format!("has_opk 0 -> 1: opk_id is read from the header ({opk_id}), a one-time prekey not held"));
        }
        n(
            "header_dh_bit",
            flip(w.clone(), hdr * 8 + 100),
            "auth",
            "a bit of the header's ratchet key flipped: another DH: auth",
        );
        n(
            "header_pn_low_bit",
            flip(w.clone(), (hdr + 32) * 8 + 31),
            "auth",
            "pn 0 -> 1: within MAX_SKIP, and in the AD: auth",
        );
        n(
            "header_pn_high_bit",
            flip(w.clone(), (hdr + 32) * 8 + 1),
            "too_many_skipped",
            "pn 0 -> 2^30: beyond MAX_SKIP (checked even without a receiving chain)",
        );
        n(
            "header_n_low_bit",
            flip(w.clone(), (hdr + 36) * 8 + 31),
            "auth",
            "n 0 -> 1: within MAX_SKIP: auth",
        );
        n(
            "header_n_high_bit",
            flip(w.clone(), (hdr + 36) * 8),
            "too_many_skipped",
            "n 0 -> 2^31: beyond MAX_SKIP",
        );
        n(
            "ciphertext_bit",
            flip(w.clone(), (hdr + 41) * 8 + 5),
            "auth",
            "a ciphertext bit flipped",
        );
        n(
            "tag_bit",
            flip(w.clone(), (w.len() - 1) * 8),
            "auth",
            "a tag bit flipped",
        );
        n(
            "truncated_one_byte",
            w[..w.len() - 1].to_vec(),
            "auth",
            "last byte cut: still decodes (ciphertext one shorter): auth",
        );
        let mut t = w.clone();
        t.push(0);
        n(
            "trailing_byte",
            t,
            "auth",
            "one byte appended: still decodes (ciphertext runs to the last 16 bytes): auth",
        );
    }

    // The one-time prekey is consumed: a new session naming it again.
    {
        let case = "ping_pong_opk";
        let run = &runs[case];
        let w = with(run.wires[0].clone(), PKM_EK, &run.keys.initiator_seed); // another EK_A
        negs.push(Neg {
            case,
            name: "pkm_opk_already_used".into(),
            kind: "prekey_message",
            receiver: R,
            after: 1,
            input: w,
            error: "unknown_prekey",
            description: "after the first prekey message was accepted, a prekey message with another EK_A (so no session matches) names the consumed one-time prekey".into(),
        });
    }

    // Repeats of a prekey message with altered fields (the session exists).
    {
        let case = "prekey_messages_out_of_order";
        let w = runs[case].wires[1].clone(); // not yet delivered at 3
        let hdr = pkm_header(&w);
        let mut n = |suffix: &str, input: Vec<u8>, error: &'static str, why: &str| {
            negs.push(Neg {
                case,
                name: format!("pkm_repeat_{suffix}"),
                kind: "prekey_message",
                receiver: R,
                after: 3,
                input,
                error,
                description: format!("{case} message 1 (a prekey message of the existing session, not yet delivered) after 3 deliveries: {why}"),
            });
        };
        n("spk_id", flip(w.clone(), PKM_SPK_ID * 8 + 30), "auth", "spk_id altered: (IK_A, EK_A) names the existing session; the prekey fields are in the AD: auth");
        n(
            "opk_id",
            flip(w.clone(), (PKM_HAS_OPK + 1) * 8 + 30),
            "auth",
            "opk_id altered: same session, the one-time prekey is not looked up again: auth",
        );
        n("ek_a", flip(w.clone(), PKM_EK * 8 + 7), "unknown_prekey", "EK_A altered: no session matches, so a new session is tried, and its one-time prekey was consumed: unknown_prekey");
        n(
            "ik_a_small_order",
            with(w.clone(), PKM_IK, &SMALL_ORDER[1]),
            "invalid_key",
            "IK_A replaced by a small-order point: no session matches; IK_A invalid",
        );
        let pn = u32::from_be_bytes(w[PKM_EK..PKM_EK + 4].try_into().expect("4"));
        assert!(pn > MAX_SKIP + 10);
        n("kind_to_message", with(w.clone(), 1, &[0x02]), "too_many_skipped", &format!("kind 0x01 -> 0x02: read as a message whose header is IK_A || EK_A[0..8]: a new ratchet key with pn = {pn}, beyond MAX_SKIP"));
        n(
            "header_n_bit",
            flip(w.clone(), (hdr + 36) * 8 + 29),
            "auth",
            "n altered within MAX_SKIP: auth",
        );
        negs.push(Neg {
            case,
            name: "pkm_replay_delivered".into(),
            kind: "prekey_message",
            receiver: R,
            after: 3,
            input: runs[case].wires[0].clone(),
            error: "duplicate",
            description: format!("{case}: message 0 (n = 0), already delivered, again: current receiving key, n < Nr, no stored key: duplicate"),
        });
        negs.push(Neg {
            case,
            name: "pkm_replay_first".into(),
            kind: "prekey_message",
            receiver: R,
            after: 1,
            input: runs[case].wires[3].clone(),
            error: "duplicate",
            description: format!(
                "{case}: message 3, the first delivered, again right away: duplicate"
            ),
        });
        negs.push(Neg {
            case,
            name: "pkm_replay_after_new_chain".into(),
            kind: "prekey_message",
            receiver: R,
            after: 7,
            input: runs[case].wires[0].clone(),
            error: "auth",
            description: format!("{case}: message 0 after the initiator's next chain arrived and every key of the first chain was used: no key of that ratchet key is stored, so it is a new ratchet key to the ratchet: auth"),
        });
    }

    // Normal messages.
    {
        let case = "ping_pong_opk";
        let run = &runs[case];
        // Message 7 (responder -> initiator) is delivered as event 7; give it
        // altered at 7 (before delivery): its ratchet key is new.
        let w = run.wires[7].clone();
        assert_eq!(run.senders[7], R);
        let mut n = |suffix: &str, input: Vec<u8>, error: &'static str, why: &str| {
            negs.push(Neg {
                case,
                name: format!("msg_{suffix}"),
                kind: "message",
                receiver: I,
                after: 7,
                input,
                error,
                description: format!("{case} message 7 (a new ratchet key to the initiator) before its delivery: {why}"),
            });
        };
        let h0 = MSG_HEADER;
        n(
            "version",
            with(w.clone(), 0, &[0x00]),
            "decode",
            "version 0x01 -> 0x00",
        );
        n(
            "kind_unknown",
            with(w.clone(), 1, &[0xff]),
            "decode",
            "kind 0x02 -> 0xff",
        );
        n(
            "truncated_header",
            w[..h0 + 39].to_vec(),
            "decode",
            "cut inside the header",
        );
        n(
            "truncated_tag",
            w[..h0 + 40 + 15].to_vec(),
            "decode",
            "header then 15 bytes",
        );
        assert!(w[PKM_HAS_OPK] > 1 || w.len() < 71 + 56);
        n("kind_to_prekey", with(w.clone(), 1, &[0x01]), "decode", "kind 0x02 -> 0x01: read as a prekey message; the byte read as has_opk is neither 0 nor 1 (or the input is too short)");
        n(
            "header_dh_bit",
            flip(w.clone(), h0 * 8 + 77),
            "auth",
            "ratchet key bit flipped: still a new key, pn and n small: auth",
        );
        n(
            "header_pn_high_bit",
            flip(w.clone(), (h0 + 32) * 8 + 2),
            "too_many_skipped",
            "pn + 2^29 with a new ratchet key: beyond MAX_SKIP",
        );
        n(
            "header_pn_low_bit",
            flip(w.clone(), (h0 + 32) * 8 + 30),
            "auth",
            "pn changed by 2: within MAX_SKIP: auth",
        );
        n(
            "header_n_high_bit",
            flip(w.clone(), (h0 + 36) * 8 + 3),
            "too_many_skipped",
            "n + 2^28: beyond MAX_SKIP",
        );
        n(
            "header_n_low_bit",
            flip(w.clone(), (h0 + 36) * 8 + 31),
            "auth",
            "n 0 -> 1: auth",
        );
        n(
            "ciphertext_bit",
            flip(w.clone(), (h0 + 40) * 8),
            "auth",
            "first ciphertext bit flipped",
        );
        n(
            "tag_bit",
            flip(w.clone(), (w.len() - 16) * 8 + 3),
            "auth",
            "a tag bit flipped",
        );
        n(
            "truncated_one_byte",
            w[..w.len() - 1].to_vec(),
            "auth",
            "last byte cut: auth",
        );
        let mut t = w.clone();
        t.push(0xaa);
        n("trailing_byte", t, "auth", "a byte appended: auth");
        n(
            "ratchet_key_zero",
            with(w.clone(), h0, &[0u8; 32]),
            "invalid_key",
            "ratchet key 0 (small order), pn within MAX_SKIP: the DH is not contributory",
        );
        negs.push(Neg {
            case,
            name: "msg_replay_ping_pong".into(),
            kind: "message",
            receiver: R,
            after: 10,
            input: run.wires[8].clone(),
            error: "duplicate",
            description: format!("{case} message 8 (responder's current receiving chain, n = 0 < Nr = 1) delivered again: duplicate"),
        });
        negs.push(Neg {
            case,
            name: "msg_replay_earlier_chain".into(),
            kind: "message",
            receiver: R,
            after: 10,
            input: run.wires[6].clone(),
            error: "auth",
            description: format!("{case} message 6, from a chain of which no key is stored: a new ratchet key to the ratchet (pn within MAX_SKIP), then the AEAD fails: auth"),
        });
        negs.push(Neg {
            case,
            name: "msg_no_receiving_chain".into(),
            kind: "message",
            receiver: I,
            after: 1,
            input: with(run.wires[1].clone(), h0, run.keys.signed_prekey().public()),
            error: "auth",
            description: format!("{case} message 1 (the responder's first reply) with its ratchet key replaced by SPK_B, given to the initiator before any reply: the current receiving key, but no receiving chain: auth"),
        });
    }
    {
        let case = "long_one_way_responder";
        let run = &runs[case];
        // After 20 deliveries the initiator has received responder messages
        // 1..=19 (n = 0..=18) of one chain.
        let w = run.wires[25].clone(); // n = 24, same chain
        let h0 = MSG_HEADER;
        let nr = 19u32;
        let set_n = |n: u32| with(w.clone(), h0 + 36, &n.to_be_bytes());
        negs.push(Neg { case, name: "msg_current_chain_pn_high_bit".into(), kind: "message", receiver: I, after: 20, input: flip(w.clone(), (h0 + 32) * 8), error: "auth", description: format!("{case} message 25 (current receiving chain) with pn + 2^31: pn is only checked for a new ratchet key; auth") });
        negs.push(Neg { case, name: "msg_skip_exactly_max".into(), kind: "message", receiver: I, after: 20, input: set_n(nr + MAX_SKIP), error: "auth", description: format!("{case} message 25 with n set to Nr + MAX_SKIP = {}: allowed, then the AEAD fails: auth", nr + MAX_SKIP) });
        negs.push(Neg {
            case,
            name: "msg_skip_beyond_max".into(),
            kind: "message",
            receiver: I,
            after: 20,
            input: set_n(nr + MAX_SKIP + 1),
            error: "too_many_skipped",
            description: format!(
                "{case} message 25 with n set to Nr + MAX_SKIP + 1 = {}: too_many_skipped",
                nr + MAX_SKIP + 1
            ),
        });
        negs.push(Neg { case, name: "msg_lowered_counter".into(), kind: "message", receiver: I, after: 20, input: set_n(10), error: "duplicate", description: format!("{case} message 25 with n lowered to 10 < Nr = {nr}, no stored key: duplicate (checked before any key derivation)") });
        negs.push(Neg {
            case,
            name: "msg_replay_current_chain".into(),
            kind: "message",
            receiver: I,
            after: 20,
            input: run.wires[5].clone(),
            error: "duplicate",
            description: format!("{case} message 5 (n = 4), delivered, again: duplicate"),
        });
    }
    {
        let case = "ratchet_steps_out_of_order";
        let run = &runs[case];
        // After 5 deliveries (2, 0, 4, 7, 8): the responder holds the skipped
        // key of message 1 (chain A1) and 6 (chain A2).
        negs.push(Neg { case, name: "msg_skipped_key_ciphertext_bit".into(), kind: "prekey_message", receiver: R, after: 5, input: flip(run.wires[1].clone(), (pkm_header(&run.wires[1]) + 40) * 8 + 1), error: "auth", description: format!("{case} message 1, whose skipped key is stored, with a ciphertext bit flipped: the stored key is tried: auth (and stays stored)") });
        negs.push(Neg { case, name: "msg_replay_earlier_chain_keys_stored".into(), kind: "prekey_message", receiver: R, after: 5, input: run.wires[0].clone(), error: "duplicate", description: format!("{case} message 0 again: its chain is not the current one, but a key of it (message 1) is stored: duplicate") });
        negs.push(Neg { case, name: "msg_earlier_chain_unsent_n".into(), kind: "prekey_message", receiver: R, after: 5, input: with(run.wires[0].clone(), pkm_header(&run.wires[0]) + 36, &7u32.to_be_bytes()), error: "duplicate", description: format!("{case} message 0 with n = 7 (never sent): not the current chain, another key of it is stored, none for n = 7: duplicate") });
        negs.push(Neg { case, name: "msg_replay_keys_gone".into(), kind: "message", receiver: R, after: 10, input: run.wires[7].clone(), error: "auth", description: format!("{case} message 7 again after chain A3 arrived and every key of chain A2 was used: a new ratchet key to the ratchet: auth") });
        negs.push(Neg { case, name: "msg_replay_stored_key_used".into(), kind: "prekey_message", receiver: R, after: 7, input: run.wires[1].clone(), error: "auth", description: format!("{case} message 1 again after its stored key was used (chain A1 has no key left): a new ratchet key to the ratchet: auth") });
    }
    {
        let case = "skipped_keys_evicted";
        let run = &runs[case];
        // Deliveries: 0, 1001, 1002, 2003, 2004, 3005 (6 events), then chain 2
        // keys. Chain 1 = messages 1..=1001, chain 2 = 1003..=2003, chain 3 =
        // 2005..=3005. After 6 events: 3000 keys were stored, the 1000 of
        // chain 1 were evicted.
        negs.push(Neg { case, name: "msg_evicted_chain_gone".into(), kind: "message", receiver: I, after: 6, input: run.wires[1].clone(), error: "auth", description: format!("{case} message 1 (chain 1, n = 0), its key evicted by the cap with every other key of chain 1: a new ratchet key to the ratchet: auth") });
        negs.push(Neg { case, name: "msg_stored_chain_2".into(), kind: "message", receiver: I, after: 9, input: flip(run.wires[1004].clone(), (MSG_HEADER + 40) * 8), error: "auth", description: format!("{case} message 1004 (chain 2, n = 1, key stored) with a ciphertext bit flipped: auth") });
        negs.push(Neg { case, name: "msg_replay_stored_chain".into(), kind: "message", receiver: I, after: 9, input: run.wires[1003].clone(), error: "duplicate", description: format!("{case} message 1003 (chain 2, n = 0) again after its stored key was used; other keys of chain 2 are stored: duplicate") });
    }
    {
        // Eviction within the current chain.
        let keys = Keys::random(&mut rng, false);
        let mut s = vec![Send(I, 1), Deliver(0)];
        s.extend(burst(R, 2 * gap + 4, 1)); // 1 ..= 2004: n = 0 ..= 2003
        s.push(Deliver(gap + 1)); // n = 1000: keys 0..=999 stored (1000)
        s.push(Deliver(2 * gap + 2)); // n = 2001: keys 1001..=2000 stored (2000)
        s.push(Deliver(2 * gap + 4)); // n = 2003: key 2002 stored, 2001 > 2000: n = 0 evicted
        s.push(Deliver(2)); // n = 1: still stored
        let case = "skipped_keys_cap_one_chain";
        let run = run_script(&mut rng, case, keys, &s, &[5]);
        negs.push(Neg { case, name: "msg_evicted_current_chain".into(), kind: "message", receiver: I, after: 5, input: run.wires[1].clone(), error: "duplicate", description: "skipped_keys_cap_one_chain message 1 (n = 0), dropped, its key evicted as the oldest when a 2001st key was stored; current receiving chain, n < Nr: duplicate".into() });
        runs.insert("skipped_keys_cap_one_chain", run);
    }
    {
        let case = "crossing_messages";
        // Message 1 is a prekey message the initiator sent before hearing
        // back; it reaches the responder (which has the session) at event 2.
        let w = runs[case].wires[1].clone();
        negs.push(Neg { case, name: "pkm_crossing_repeat_spk_id".into(), kind: "prekey_message", receiver: R, after: 1, input: flip(w.clone(), PKM_SPK_ID * 8 + 20), error: "auth", description: format!("{case} message 1 (second prekey message of the session, not yet delivered) with spk_id altered: (IK_A, EK_A) names the existing session; the prekey fields are in the AD: auth") });
        negs.push(Neg {
            case,
            name: "pkm_crossing_replay".into(),
            kind: "prekey_message",
            receiver: R,
            after: 3,
            input: w,
            error: "duplicate",
            description: format!("{case} message 1 again after its delivery: duplicate"),
        });
    }

    // Bundles.
    let mut bundle_negs = Vec::new();
    {
        let keys = &runs["ping_pong_opk"].keys;
        let b = keys.bundle().encode();
        let now = keys.spk_created + 3600;
        let max_age = FreshnessPolicy::DEFAULT_MAX_AGE;
        let mut n = |name: &str, input: Vec<u8>, now: u64, error: &'static str, why: &str| {
            bundle_negs.push(json!({"name": name, "kind": "bundle", "input": h(&input), "now": now, "max_age": max_age, "error": error, "description": why}));
        };
        n(
            "bundle_version",
            with(b.clone(), 0, &[2]),
            now,
            "decode",
            "version 0x02",
        );
        n(
            "bundle_truncated",
            b[..100].to_vec(),
            now,
            "decode",
            "cut inside the signature",
        );
        let mut t = b.clone();
        t.push(0);
        n(
            "bundle_trailing_byte",
            t,
            now,
            "decode",
            "one byte appended",
        );
        n(
            "bundle_has_opk_not_boolean",
            with(b.clone(), 141, &[7]),
            now,
            "decode",
            "has_opk = 0x07",
        );
        n(
            "bundle_has_opk_cleared",
            with(b.clone(), 141, &[0]),
            now,
            "decode",
            "has_opk 1 -> 0: the one-time prekey is then trailing bytes",
        );
        n(
            "bundle_identity_small_order",
            with(b.clone(), 1, &SMALL_ORDER[2]),
            now,
            "invalid_key",
            "identity key of small order (checked before the signature)",
        );
        n(
            "bundle_identity_not_canonical",
            with(b.clone(), 1, &P_PLUS_ONE),
            now,
            "invalid_key",
            "identity key y = p + 1: not canonical",
        );
        n(
            "bundle_identity_sign_bit",
            flip(b.clone(), 8 + 248),
            now,
            "signature",
            "identity key's sign bit flipped: a valid key, but not the signer",
        );
        n(
            "bundle_spk_id_bit",
            flip(b.clone(), 33 * 8 + 31),
            now,
            "signature",
            "spk_id changed",
        );
        n(
            "bundle_created_bit",
            flip(b.clone(), 37 * 8 + 63),
            now,
            "signature",
            "creation time changed by one second",
        );
        n(
            "bundle_spk_public_bit",
            flip(b.clone(), 45 * 8 + 200),
            now,
            "signature",
            "a bit of the signed prekey flipped",
        );
        n(
            "bundle_signature_bit",
            flip(b.clone(), 77 * 8 + 300),
            now,
            "signature",
            "a bit of the signature flipped",
        );
        n(
            "bundle_signature_s_plus_l",
            with(b.clone(), 77 + 32, &add_l(&b[77 + 32..77 + 64])),
            now,
            "signature",
            "S replaced by S + L: the same scalar, not canonical: verify_strict rejects it",
        );
        let other = IdentityKeyPair::from_seed(&[7; 32]);
        let forged =
            SignedPrekey::from_secret(&other, keys.spk_id, keys.spk_created, keys.spk_private)
                .expect("time in unix seconds");
        n(
            "bundle_signature_other_key",
            with(b.clone(), 77, forged.signature()),
            now,
            "signature",
            "a valid signature by another identity key",
        );
        n(
            "bundle_stale_by_one_second",
            b.clone(),
            keys.spk_created + max_age + 1,
            "stale_bundle",
            "now - created = max_age + 1",
        );
        n(
            "bundle_stale",
            b.clone(),
            keys.spk_created + 10 * max_age,
            "stale_bundle",
            "ten times max_age old",
        );
        let no_opk = runs["ping_pong_no_opk"].keys.bundle().encode();
        let now2 = runs["ping_pong_no_opk"].keys.spk_created;
        n(
            "bundle_has_opk_set_without_opk",
            with(no_opk.clone(), 141, &[1]),
            now2,
            "decode",
            "has_opk 0 -> 1 with no one-time prekey following",
        );
        let mut stale_sig = with(no_opk, 141 - 64, &[0u8; 64]);
        stale_sig[141 - 64] = 1;
        n(
            "bundle_bad_signature_and_stale",
            stale_sig,
            now2 + 100 * max_age,
            "signature",
            "bad signature and stale: the signature is checked first",
        );
    }

    // Identity keys.
    let mut identity_negs = Vec::new();
    for (i, k) in SMALL_ORDER.iter().enumerate() {
        identity_negs.push(json!({"name": format!("identity_small_order_{i}"), "kind": "identity_key", "input": h(k), "error": "invalid_key", "description": "a point of small order"}));
    }
    for (name, k, error, why) in [
        (
            "identity_negative_zero",
            NEGATIVE_ZERO.to_vec(),
            "invalid_key",
            "y = 1 with the sign bit set: x = 0 cannot be negative",
        ),
        (
            "identity_y_equals_p_plus_1",
            P_PLUS_ONE.to_vec(),
            "invalid_key",
            "y = p + 1: not canonical",
        ),
        ("identity_length_31", vec![0x11; 31], "decode", "31 bytes"),
        ("identity_length_33", vec![0x11; 33], "decode", "33 bytes"),
        ("identity_empty", vec![], "decode", "0 bytes"),
    ] {
        identity_negs.push(json!({"name": name, "kind": "identity_key", "input": h(&k), "error": error, "description": why}));
    }

    // Check every session negative against the crate before writing it.
    let mut negative_cases = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for neg in &negs {
        assert!(
            seen.insert(neg.name.clone()),
            "duplicate negative name {}",
            neg.name
        );
        let case = neg.case;
        let run = &runs[case];
        let (init, resp) = run
            .snapshots
            .get(&neg.after)
            .unwrap_or_else(|| panic!("{}: no snapshot of {case} at {}", neg.name, neg.after));
        let mut party = if neg.receiver == I {
            init.clone()
        } else {
            resp.clone()
        };
        let before = party.session.as_ref().map(|s| s.to_bytes().to_vec());
        let got = party.receive(&neg.input);
        let kind = match &got {
            Err(e) => e.profile_kind().unwrap_or("<none>"),
            Ok(_) => "<accepted>",
        };
        assert_eq!(kind, neg.error, "{}: the crate says {got:?}", neg.name);
        assert_eq!(
            party.session.as_ref().map(|s| s.to_bytes().to_vec()),
            before,
            "{}: state changed",
            neg.name
        );
        negative_cases.push(json!({
            "name": neg.name,
            "kind": neg.kind,
            "input": h(&neg.input),
            "session_case": case,
            "after_deliveries": neg.after,
            "receiver": neg.receiver.name(),
            "error": neg.error,
            "description": neg.description,
        }));
    }
    for c in bundle_negs {
        let input = hex::decode(c["input"].as_str().expect("hex")).expect("hex");
        let got = PrekeyBundle::decode(&input).and_then(|b| {
            b.verify(
                c["now"].as_u64().expect("now"),
                FreshnessPolicy::max_age(c["max_age"].as_u64().expect("max_age")),
            )
        });
        assert_eq!(
            got.err().and_then(|e| e.profile_kind()),
            c["error"].as_str(),
            "{}",
            c["name"]
        );
        negative_cases.push(c);
    }
    for c in identity_negs {
        let input = hex::decode(c["input"].as_str().expect("hex")).expect("hex");
        let got = IdentityKey::from_bytes(&input);
        assert_eq!(
            got.err().and_then(|e| e.profile_kind()),
            c["error"].as_str(),
            "{}",
            c["name"]
        );
        negative_cases.push(c);
    }

    // ----------------------------------------------------------- fingerprint
    let mut fingerprint_cases = Vec::new();
    for i in 0..4 {
        let a = IdentityKeyPair::generate(&mut rng);
        let b = IdentityKeyPair::generate(&mut rng);
        let (fa, fb) = (
            cubbyhole::Fingerprint::of(a.public()),
            cubbyhole::Fingerprint::of(b.public()),
        );
        fingerprint_cases.push(json!({
            "name": format!("pair_{i}"),
            "identity_a": h(a.public().as_bytes()),
            "identity_b": h(b.public().as_bytes()),
            "fingerprint_a": fa.as_str(),
            "fingerprint_b": fb.as_str(),
            "safety_number": cubbyhole::SafetyNumber::new(a.public(), b.public()).as_str(),
        }));
    }

    let generator = "cubbyhole examples/gen_vectors.rs (ChaCha20, fixed seed)";
    let write_json = |file: &str, v: Value| {
        let path = out_dir.join(file);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&v).expect("json") + "\n",
        )
        .expect("write");
        println!(
            "wrote {} ({} cases)",
            path.display(),
            v["cases"].as_array().map_or(0, Vec::len)
        );
    };
    let write = |file: &str, cases: Vec<Value>| {
        write_json(
            file,
            json!({"profile": "cubbyhole/v1", "generator": generator, "cases": cases}),
        );
    };
    write("x3dh.json", x3dh_cases);
    write("session.json", runs.into_values().map(|r| r.json).collect());
    write("negative.json", negative_cases);
    write("fingerprint.json", fingerprint_cases);
    // The client frame is the crate's own format, not the profile's: no
    // "profile" key, so that another implementation's directory need not
    // have the file.
    write_json(
        "frames.json",
        json!({
            "description": FRAMES_DESCRIPTION,
            "generator": "cubbyhole examples/gen_vectors.rs (encodings written by hand from the layout)",
            "cases": frame_cases(),
        }),
    );
    // Device lists (SPEC 25): no randomness, so the files above are
    // unchanged by it.
    // Profile v2 (SPEC 26): its own seed, so the files above are unchanged.
    write_json("sealed.json", sealed_vectors());
    write_json(
        "devices.json",
        json!({
            "profile": "cubbyhole/v1",
            "description": DEVICES_DESCRIPTION,
            "generator": "cubbyhole examples/gen_vectors.rs (seeds are SHA-256 of labels)",
            "cases": device_cases(),
        }),
    );
}

/// The eight small-order points of edwards25519 (canonical encodings).
const SMALL_ORDER: [[u8; 32]; 8] = [
    hex32("0100000000000000000000000000000000000000000000000000000000000000"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("0000000000000000000000000000000000000000000000000000000000000000"),
    hex32("0000000000000000000000000000000000000000000000000000000000000080"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
];
/// y = 1 with the sign bit set.
const NEGATIVE_ZERO: [u8; 32] =
    hex32("0100000000000000000000000000000000000000000000000000000000000080");
/// y = p + 1 = 2^255 - 18.
const P_PLUS_ONE: [u8; 32] =
    hex32("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
/// The X25519 point u = 1 (small order).
const X25519_ONE: [u8; 32] =
    hex32("0100000000000000000000000000000000000000000000000000000000000000");

const fn hex32(s: &str) -> [u8; 32] {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("not hex"),
    }
}

/// S + L for a 32-byte little-endian scalar S (L = 2^252 + 27742317777372353535851937790883648493).
fn add_l(s: &[u8]) -> [u8; 32] {
    const L: [u8; 32] = hex32("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010");
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let v = u16::from(s[i]) + u16::from(L[i]) + carry;
        out[i] = v as u8;
        carry = v >> 8;
    }
    out
}

// ------------------------------------------------------------------ frames

const FRAMES_DESCRIPTION: &str = "Client frames (src/client/frame.rs; SPEC.md, \"Client frame\"), \
not part of the cubbyhole/v1 profile. \
v1: 0x01 || device_id (4, big-endian) || body. \
v2: 0x02 || device_id (4, big-endian) || flags (1) || [SESSION] generation (8, big-endian) \
|| [DEAD] count (1, >= 1) || count x session id (16) \
|| [ACCESS] epoch (4, big-endian) || deposit access key (16) \
|| [RECEIPTS] count (2, big-endian, >= 1) || count x message id (16) \
|| [MESSAGE] message id (16) || body (the rest). \
Flags: MESSAGE 0x01, SESSION 0x02, RESET 0x04 (only with SESSION), RECEIPTS 0x08, DEAD 0x10, \
ACCESS 0x20; access is null or {epoch, key}; \
other bits are zero; at least one of MESSAGE, SESSION, RECEIPTS is set; \
without MESSAGE nothing follows the last field. \
A case with error null decodes to its fields (message.id null: a v1 frame) and, \
unless decode_only (v1 frames are never encoded), its fields encode to its encoding. \
A case with error \"bad_frame\" must be refused.";

/// The layout's constants, written out from the comment at the top of
/// `src/client/frame.rs` rather than taken from the crate, so that the
/// expected encodings do not come from the code under test.
mod layout {
    pub const V1: u8 = 0x01;
    pub const V2: u8 = 0x02;
    pub const MESSAGE: u8 = 0x01;
    pub const SESSION: u8 = 0x02;
    pub const RESET: u8 = 0x04;
    pub const RECEIPTS: u8 = 0x08;
    pub const DEAD: u8 = 0x10;
    pub const ACCESS: u8 = 0x20;
    pub const INBOX: u8 = 0x40;
}

/// A 16-byte id: the first half of SHA-256 of a label.
fn frame_id(label: &str) -> [u8; 16] {
    let digest = Sha256::digest(format!("cubbyhole frame vectors: {label}").as_bytes());
    digest[..16].try_into().expect("16 bytes")
}

/// A valid frame: its fields and its encoding, written by hand.
struct GoodFrame {
    name: &'static str,
    description: &'static str,
    frame: Frame,
    encoding: Vec<u8>,
    /// A v1 frame: decoded, never encoded.
    decode_only: bool,
}

fn frame_cases() -> Vec<Value> {
    use layout::{ACCESS, DEAD, INBOX, MESSAGE, RECEIPTS, RESET, SESSION, V1, V2};

    let m = |n: u32| frame_id(&format!("message {n}"));
    let r = |n: u32| frame_id(&format!("received message {n}"));
    let s = |n: u32| frame_id(&format!("dead session {n}"));
    let a = |n: u32| frame_id(&format!("access key {n}"));
    // Generations are seconds (2026-01-01T00:00:00Z and after), and one
    // with seven significant bytes (below 2^53, exact in any JSON reader).
    let g0: u64 = 1_767_225_600;
    let g_big: u64 = 0x0012_3456_789a_bcde;
    let be32 = u32::to_be_bytes;
    let be64 = u64::to_be_bytes;
    let cat = |parts: &[&[u8]]| parts.concat();
    let many: Vec<[u8; 16]> = (0..256).map(r).collect();

    let good = vec![
        GoodFrame {
            name: "message",
            description: "a plain message: MESSAGE",
            frame: Frame {
                device_id: 1,
                message: Some((Some(m(1)), b"hello".to_vec())),
                ..Frame::default()
            },
            encoding: cat(&[&[V2], &be32(1), &[MESSAGE], &m(1), b"hello"]),
            decode_only: false,
        },
        GoodFrame {
            name: "message_empty_body",
            description: "a message with an empty body: MESSAGE, the id ends the frame",
            frame: Frame {
                device_id: 1,
                message: Some((Some(m(2)), Vec::new())),
                ..Frame::default()
            },
            encoding: cat(&[&[V2], &be32(1), &[MESSAGE], &m(2)]),
            decode_only: false,
        },
        GoodFrame {
            name: "prekey_message",
            description: "the frame of a prekey message: SESSION (the generation) and MESSAGE",
            frame: Frame {
                device_id: 2,
                generation: Some(g0),
                message: Some((Some(m(3)), b"first message of a session".to_vec())),
                ..Frame::default()
            },
            encoding: cat(&[
                &[V2],
                &be32(2),
                &[SESSION | MESSAGE],
                &be64(g0),
                &m(3),
                b"first message of a session",
            ]),
            decode_only: false,
        },
        GoodFrame {
            name: "prekey_message_reset",
            description: "a prekey message after the sender lost its sessions: SESSION, RESET and MESSAGE",
            frame: Frame {
                device_id: 3,
                generation: Some(g0 + 1),
                reset: true,
                message: Some((Some(m(4)), b"restored from a backup".to_vec())),
                ..Frame::default()
            },
            encoding: cat(&[
                &[V2],
                &be32(3),
                &[SESSION | RESET | MESSAGE],
                &be64(g0 + 1),
                &m(4),
                b"restored from a backup",
            ]),
            decode_only: false,
        },
        GoodFrame {
            name: "session_only",
            description: "a control frame carrying only its session's generation: SESSION, nothing after the generation",
            frame: Frame {
                device_id: 0x0102_0304,
                generation: Some(g0 + 2),
                ..Frame::default()
            },
            encoding: cat(&[&[V2], &be32(0x0102_0304), &[SESSION], &be64(g0 + 2)]),
            decode_only: false,
        },
        GoodFrame {
            name: "session_reset_only",
            description: "a control frame announcing a reset: SESSION and RESET, nothing after the generation",
            frame: Frame {
                device_id: 4,
                generation: Some(g0 + 3),
                reset: true,
                ..Frame::default()
            },
            encoding: cat(&[&[V2], &be32(4), &[SESSION | RESET], &be64(g0 + 3)]),
            decode_only: false,
        },
        GoodFrame {
            name: "receipts_one",
            description: "one receipt: RECEIPTS, count 1, nothing after the id",
            frame: Frame {
                device_id: 5,
                receipts: vec![r(1)],
                ..Frame::default()
            },
            encoding: cat(&[&[V2], &be32(5), &[RECEIPTS], &[0, 1], &r(1)]),
            decode_only: false,
        },
        GoodFrame {
            name: "receipts_several",
            description: "three receipts: RECEIPTS, count 3",
            frame: Frame {
                device_id: 6,
                receipts: vec![r(1), r(2), r(3)],
                ..Frame::default()
            },
            encoding: cat(&[&[V2], &be32(6), &[RECEIPTS], &[0, 3], &r(1), &r(2), &r(3)]),
            decode_only: false,
        },
        GoodFrame {
            name: "receipts_256",
            description: "256 receipts: RECEIPTS, count 0x0100 (both bytes of the count used)",
            frame: Frame {
                device_id: 7,
                receipts: many.clone(),
                ..Frame::default()
            },
            encoding: cat(&[&[V2], &be32(7), &[RECEIPTS], &[1, 0], &many.concat()]),
            decode_only: false,
        },
        GoodFrame {
            name: "receipts_with_message",
            description: "a message carrying receipts: RECEIPTS and MESSAGE, the receipts before the message id",
            frame: Frame {
                device_id: 8,
                receipts: vec![r(4), r(5)],
                message: Some((Some(m(5)), b"and thanks".to_vec())),
                ..Frame::default()
            },
            encoding: cat(&[
                &[V2],
                &be32(8),
                &[RECEIPTS | MESSAGE],
                &[0, 2],
                &r(4),
                &r(5),
                &m(5),
                b"and thanks",
            ]),
            decode_only: false,
        },
        GoodFrame {
            name: "dead_session_notice",
            description: "a dead-session notice: SESSION and DEAD, one session id, nothing after it",
            frame: Frame {
                device_id: 0xffff_fffe,
                generation: Some(g0 + 4),
                dead: vec![s(1)],
                ..Frame::default()
            },
            encoding: cat(&[
                &[V2],
                &be32(0xffff_fffe),
                &[SESSION | DEAD],
                &be64(g0 + 4),
                &[1],
                &s(1),
            ]),
            decode_only: false,
        },
        GoodFrame {
            name: "everything",
            description: "every flag: MESSAGE, SESSION, RESET, RECEIPTS and DEAD (flags 0x1f), in the order generation, dead ids, receipts, message",
            frame: Frame {
                device_id: 0x8000_0001,
                generation: Some(g_big),
                reset: true,
                dead: vec![s(2), s(3)],
                access: None,
                inbox: None,
                receipts: vec![r(6), r(7), r(8)],
                message: Some((Some(m(6)), b"everything at once".to_vec())),
            },
            encoding: cat(&[
                &[V2],
                &be32(0x8000_0001),
                &[MESSAGE | SESSION | RESET | RECEIPTS | DEAD],
                &be64(g_big),
                &[2],
                &s(2),
                &s(3),
                &[0, 3],
                &r(6),
                &r(7),
                &r(8),
                &m(6),
                b"everything at once",
            ]),
            decode_only: false,
        },
        GoodFrame {
            name: "access_with_message",
            description: "a message carrying the sender's deposit access key: ACCESS and MESSAGE (flags 0x21), epoch then key, before the message",
            frame: Frame {
                device_id: 11,
                access: Some((7, AccessKey::from_bytes(a(1)))),
                message: Some((Some(m(7)), b"with my key".to_vec())),
                ..Frame::default()
            },
            encoding: cat(&[
                &[V2],
                &be32(11),
                &[MESSAGE | ACCESS],
                &be32(7),
                &a(1),
                &m(7),
                b"with my key",
            ]),
            decode_only: false,
        },
        GoodFrame {
            name: "everything_with_access",
            description: "every flag (0x3f), in the order generation, dead ids, access (epoch, key), receipts, message",
            frame: Frame {
                device_id: 12,
                generation: Some(g0 + 9),
                reset: true,
                dead: vec![s(4)],
                access: Some((0xfffe_fffd, AccessKey::from_bytes(a(2)))),
                inbox: None,
                receipts: vec![r(9)],
                message: Some((Some(m(8)), b"all of it".to_vec())),
            },
            encoding: cat(&[
                &[V2],
                &be32(12),
                &[MESSAGE | SESSION | RESET | RECEIPTS | DEAD | ACCESS],
                &be64(g0 + 9),
                &[1],
                &s(4),
                &be32(0xfffe_fffd),
                &a(2),
                &[0, 1],
                &r(9),
                &m(8),
                b"all of it",
            ]),
            decode_only: false,
        },
        GoodFrame {
            name: "everything_with_inbox",
            description: "every flag (0x7f): the private inbox (profile v2: mailbox id, 32 bytes, then its access key, 16 bytes) right after the access key",
            frame: Frame {
                device_id: 13,
                generation: Some(g0 + 10),
                reset: false,
                dead: vec![s(5)],
                access: Some((2, AccessKey::from_bytes(a(4)))),
                inbox: Some(([0x1b; 32], AccessKey::from_bytes(a(5)))),
                receipts: vec![r(10)],
                message: Some((Some(m(9)), b"reply to my inbox".to_vec())),
            },
            encoding: cat(&[
                &[V2],
                &be32(13),
                &[MESSAGE | SESSION | RECEIPTS | DEAD | ACCESS | INBOX],
                &be64(g0 + 10),
                &[1],
                &s(5),
                &be32(2),
                &a(4),
                &[0x1b; 32],
                &a(5),
                &[0, 1],
                &r(10),
                &m(9),
                b"reply to my inbox",
            ]),
            decode_only: false,
        },
        GoodFrame {
            name: "v1_message",
            description: "a v1 frame: decodes as a message without id (decode only: v1 is never encoded)",
            frame: Frame {
                device_id: 9,
                message: Some((None, b"hi".to_vec())),
                ..Frame::default()
            },
            encoding: cat(&[&[V1], &be32(9), b"hi"]),
            decode_only: true,
        },
        GoodFrame {
            name: "v1_empty_body",
            description: "a v1 frame with an empty body: the five header bytes only (decode only)",
            frame: Frame {
                device_id: 10,
                message: Some((None, Vec::new())),
                ..Frame::default()
            },
            encoding: cat(&[&[V1], &be32(10)]),
            decode_only: true,
        },
    ];

    let mut cases = Vec::new();
    for c in good {
        assert_eq!(
            Frame::decode(c.encoding.clone()).as_ref(),
            Ok(&c.frame),
            "{}: Frame::decode of the hand-written encoding",
            c.name
        );
        if !c.decode_only {
            assert_eq!(
                hex::encode(c.frame.encode()),
                hex::encode(&c.encoding),
                "{}: Frame::encode differs from the hand-written encoding",
                c.name
            );
        }
        let f = &c.frame;
        cases.push(json!({
            "name": c.name,
            "description": c.description,
            "device_id": f.device_id,
            "generation": f.generation,
            "reset": f.reset,
            "dead": f.dead.iter().map(|id| h(id)).collect::<Vec<_>>(),
            "access": f.access.as_ref().map_or(Value::Null, |(epoch, key)| json!({
                "epoch": epoch,
                "key": h(key.as_bytes()),
            })),
            "inbox": f.inbox.as_ref().map_or(Value::Null, |(id, key)| json!({
                "mailbox": h(id),
                "key": h(key.as_bytes()),
            })),
            "receipts": f.receipts.iter().map(|id| h(id)).collect::<Vec<_>>(),
            "message": f.message.as_ref().map_or(Value::Null, |(id, body)| json!({
                "id": id.as_ref().map_or(Value::Null, |id| h(id)),
                "body": h(body),
            })),
            "decode_only": c.decode_only,
            "encoding": h(&c.encoding),
            "error": Value::Null,
        }));
    }

    // Negative cases: each is a valid frame (or header) with one thing
    // wrong, said in its description.
    let dev = be32(1);
    let bad: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "version_0x00",
            "version byte 0x00 (a valid v2 message otherwise)",
            cat(&[&[0x00], &dev, &[MESSAGE], &m(1), b"hello"]),
        ),
        (
            "version_0x03",
            "version byte 0x03, unknown (a valid v2 message otherwise)",
            cat(&[&[0x03], &dev, &[MESSAGE], &m(1), b"hello"]),
        ),
        (
            "access_truncated",
            "flags ACCESS | RECEIPTS: the access field has 19 of its 20 bytes",
            cat(&[&[V2], &dev, &[ACCESS | RECEIPTS], &be32(1), &a(3)[..15]]),
        ),
        (
            "access_only",
            "flags ACCESS alone: an access key is not content (a frame needs MESSAGE, SESSION or RECEIPTS)",
            cat(&[&[V2], &dev, &[ACCESS], &be32(1), &a(3)]),
        ),
        (
            "inbox_without_access",
            "flags MESSAGE | INBOX: an inbox rides only beside an access key",
            cat(&[&[V2], &dev, &[MESSAGE | INBOX], &[0x1b; 32], &a(5), &m(1), b"hello"]),
        ),
        (
            "inbox_truncated",
            "flags ACCESS | INBOX | RECEIPTS: the inbox field has 47 of its 48 bytes",
            cat(&[&[V2], &dev, &[ACCESS | INBOX | RECEIPTS], &be32(1), &a(3), &[0x1b; 32], &a(5)[..15]]),
        ),
        (
            "unknown_flag_0x80",
            "flags MESSAGE | 0x80: bit 0x80 is not defined",
            cat(&[&[V2], &dev, &[MESSAGE | 0x80], &m(1), b"hello"]),
        ),
        (
            "no_flags",
            "flags 0x00: none of MESSAGE, SESSION, RECEIPTS",
            cat(&[&[V2], &dev, &[0]]),
        ),
        (
            "dead_without_content_flag",
            "flags DEAD alone, with a well-formed dead list: none of MESSAGE, SESSION, RECEIPTS",
            cat(&[&[V2], &dev, &[DEAD], &[1], &s(1)]),
        ),
        (
            "reset_without_session_message",
            "flags RESET | MESSAGE: RESET without SESSION",
            cat(&[&[V2], &dev, &[RESET | MESSAGE], &m(1), b"hello"]),
        ),
        (
            "reset_without_session_receipts",
            "flags RESET | RECEIPTS: RESET without SESSION",
            cat(&[&[V2], &dev, &[RESET | RECEIPTS], &[0, 1], &r(1)]),
        ),
        (
            "zero_receipt_count",
            "flags RECEIPTS, receipt count 0 (and nothing after it)",
            cat(&[&[V2], &dev, &[RECEIPTS], &[0, 0]]),
        ),
        (
            "zero_receipt_count_with_message",
            "flags RECEIPTS | MESSAGE, receipt count 0, then a well-formed message",
            cat(&[&[V2], &dev, &[RECEIPTS | MESSAGE], &[0, 0], &m(1), b"hello"]),
        ),
        (
            "zero_dead_count",
            "flags SESSION | DEAD, dead count 0 (and nothing after it)",
            cat(&[&[V2], &dev, &[SESSION | DEAD], &be64(g0), &[0]]),
        ),
        (
            "zero_dead_count_with_message",
            "flags SESSION | DEAD | MESSAGE, dead count 0, then a well-formed message",
            cat(&[
                &[V2],
                &dev,
                &[SESSION | DEAD | MESSAGE],
                &be64(g0),
                &[0],
                &m(1),
                b"hello",
            ]),
        ),
        (
            "truncated_generation",
            "flags SESSION, 7 of the 8 generation bytes",
            cat(&[&[V2], &dev, &[SESSION], &be64(g0)[..7]]),
        ),
        (
            "truncated_dead_count",
            "flags SESSION | DEAD, the frame ends after the generation (no dead count)",
            cat(&[&[V2], &dev, &[SESSION | DEAD], &be64(g0)]),
        ),
        (
            "truncated_dead_list",
            "flags SESSION | DEAD, dead count 2, one id and 15 bytes of the second",
            cat(&[&[V2], &dev, &[SESSION | DEAD], &be64(g0), &[2], &s(1), &s(2)[..15]]),
        ),
        (
            "truncated_receipt_count",
            "flags RECEIPTS, one of the two count bytes",
            cat(&[&[V2], &dev, &[RECEIPTS], &[0]]),
        ),
        (
            "truncated_receipt_list",
            "flags RECEIPTS, receipt count 2, one id and 15 bytes of the second",
            cat(&[&[V2], &dev, &[RECEIPTS], &[0, 2], &r(1), &r(2)[..15]]),
        ),
        (
            "receipt_count_exceeds_list",
            "flags RECEIPTS, receipt count 3, two whole ids",
            cat(&[&[V2], &dev, &[RECEIPTS], &[0, 3], &r(1), &r(2)]),
        ),
        (
            "truncated_message_id",
            "flags MESSAGE, 15 of the 16 message id bytes",
            cat(&[&[V2], &dev, &[MESSAGE], &m(1)[..15]]),
        ),
        (
            "trailing_byte_after_receipts",
            "flags RECEIPTS, count 1, one id, then one byte 0x00: without MESSAGE nothing follows the last field",
            cat(&[&[V2], &dev, &[RECEIPTS], &[0, 1], &r(1), &[0]]),
        ),
        (
            "trailing_id_after_receipts",
            "flags RECEIPTS, count 1, then two ids: without MESSAGE nothing follows the last field",
            cat(&[&[V2], &dev, &[RECEIPTS], &[0, 1], &r(1), &r(2)]),
        ),
        (
            "trailing_byte_after_generation",
            "flags SESSION, the generation, then one byte 0x00",
            cat(&[&[V2], &dev, &[SESSION], &be64(g0), &[0]]),
        ),
        (
            "trailing_id_after_dead_list",
            "flags SESSION | DEAD, dead count 1, then two ids",
            cat(&[&[V2], &dev, &[SESSION | DEAD], &be64(g0), &[1], &s(1), &s(2)]),
        ),
        ("empty", "no bytes at all", Vec::new()),
        ("version_only", "the version byte 0x02 alone", vec![V2]),
        (
            "v2_truncated_device_id",
            "0x02 and 3 of the 4 device id bytes",
            cat(&[&[V2], &dev[..3]]),
        ),
        (
            "v2_no_flags",
            "0x02 and the device id, no flags byte",
            cat(&[&[V2], &dev]),
        ),
        (
            "v1_truncated_device_id",
            "0x01 and 3 of the 4 device id bytes (a v1 frame needs 5 bytes)",
            cat(&[&[V1], &dev[..3]]),
        ),
    ];
    for (name, description, encoding) in bad {
        assert_eq!(
            Frame::decode(encoding.clone()),
            Err(BadFrame),
            "{name}: Frame::decode must refuse it"
        );
        cases.push(json!({
            "name": name,
            "description": description,
            "encoding": h(&encoding),
            "error": "bad_frame",
        }));
    }
    cases
}

// ----------------------------------------------------------------- devices

const DEVICES_DESCRIPTION: &str = "Device lists (SPEC.md section 25). \
A case with error null is a valid chain: each step lists its devices (seed, identity, device_id) \
in the list's order (by identity key bytes), the signers (indices into devices), and the \
expected body, body_hash, signatures and signed encoding; step 1 passes verify_genesis and \
each later step verify_successor of the step before it. The account's fingerprint, a peer \
account's fingerprint and the account safety number close the case. \
A case with an error kind checks input (or, for check \"chain\", the offered lists) \
against the chain in known (signed encodings, genesis first, each valid): \
check \"decode\" must refuse it as malformed, \"genesis\" decodes it and verify_genesis gives the \
error, \"successor\" decodes it and verify_successor of the last list of known gives the error, \
\"chain\" gives the offered lists to the chain verifier with the last list of known as the head. \
A conflict carries its evidence: conflict_ours (the verifier's list) and conflict_theirs.";

use cubbyhole::devices::{
    AccountId, DeviceEntry, DeviceList, DeviceListChain, DeviceListError, UnsignedDeviceList,
    VerifiedDeviceList,
};

/// An identity of the device vectors: seed = SHA-256 of a label.
fn device_key(label: &str) -> IdentityKeyPair {
    let seed: [u8; 32] =
        Sha256::digest(format!("cubbyhole device list vectors: {label}").as_bytes()).into();
    IdentityKeyPair::from_seed(&seed)
}

/// A list with the given fields, signed by `signers` (who must be listed).
fn device_list(
    account: AccountId,
    version: u64,
    previous: [u8; 32],
    devices: &[(&IdentityKeyPair, u32)],
    signers: &[&IdentityKeyPair],
) -> DeviceList {
    let entries: Vec<DeviceEntry> = devices
        .iter()
        .map(|(k, id)| DeviceEntry {
            identity: *k.public(),
            device_id: *id,
        })
        .collect();
    let mut u = UnsignedDeviceList::new(account, version, previous, &entries).expect("structure");
    for s in signers {
        u.sign(s).expect("listed signer");
    }
    u.into_list().expect("signed")
}

/// One valid step of a chain: the list and the JSON of it.
fn device_step(
    list: &DeviceList,
    keys: &[&IdentityKeyPair],
    signers: &[&IdentityKeyPair],
) -> Value {
    let seed_of = |ik: &IdentityKey| {
        keys.iter()
            .find(|k| k.public() == ik)
            .map(|k| h(k.seed().as_ref()))
            .expect("a key of the step")
    };
    let devices: Vec<Value> = list
        .devices()
        .iter()
        .map(|d| {
            json!({
                "seed": seed_of(&d.identity),
                "identity": h(d.identity.as_bytes()),
                "device_id": d.device_id,
            })
        })
        .collect();
    let mut signer_indices: Vec<usize> = signers
        .iter()
        .map(|s| {
            list.devices()
                .iter()
                .position(|d| d.identity == *s.public())
                .expect("listed")
        })
        .collect();
    signer_indices.sort_unstable();
    json!({
        "version": list.version(),
        "account_id": h(list.account_id().as_bytes()),
        "previous": h(list.previous()),
        "devices": devices,
        "signers": signer_indices,
        "body": h(list.body()),
        "body_hash": h(list.body_hash()),
        "signatures": list.signatures().iter().map(|(i, s)| json!({"index": i, "signature": h(s)})).collect::<Vec<_>>(),
        "signed": h(&list.encode()),
    })
}

fn device_cases() -> Vec<Value> {
    let a = device_key("A");
    let b = device_key("B");
    let c = device_key("C");
    let d = device_key("D");
    let t = device_key("T (the stolen device)");
    let x = device_key("X (a stranger)");
    let peer = AccountId::of_founder(device_key("peer founder").public());
    let account = AccountId::of_founder(a.public());

    let mut cases = Vec::new();
    // Valid chains. Each step: (devices, signers); step 1 is the genesis of A.
    type Step<'k> = (Vec<(&'k IdentityKeyPair, u32)>, Vec<&'k IdentityKeyPair>);
    let many: Vec<IdentityKeyPair> = (0..15).map(|i| device_key(&format!("M{i}"))).collect();
    let mut sixteen: Vec<(&IdentityKeyPair, u32)> = vec![(&a, 1)];
    sixteen.extend(many.iter().zip(2u32..));
    let mut sixteen_signers: Vec<&IdentityKeyPair> = vec![&a];
    sixteen_signers.extend(many.iter());
    let chains: Vec<(&str, &str, Vec<Step<'_>>)> =
        vec![
        ("genesis", "the first version: A alone, device 1, signed by A", vec![]),
        (
            "add_device",
            "A adds B (device 2): version 2 signed by A (kept) and B (added)",
            vec![(vec![(&a, 1), (&b, 2)], vec![&a, &b])],
        ),
        (
            "remove_device",
            "A adds B; then B removes A, the founder (the account id stays): version 3 signed by B",
            vec![
                (vec![(&a, 1), (&b, 2)], vec![&a, &b]),
                (vec![(&b, 2)], vec![&b]),
            ],
        ),
        (
            "add_two_devices",
            "A adds B and C at once: version 2 signed by A, B and C; then B removes C and adds D \
             (device 4): version 3 signed by A and D",
            vec![
                (vec![(&a, 1), (&b, 2), (&c, 3)], vec![&a, &b, &c]),
                (vec![(&a, 1), (&b, 2), (&d, 4)], vec![&a, &d]),
            ],
        ),
        (
            "sixteen_devices",
            "A adds 15 devices at once (the most a list holds): every one signs",
            vec![(sixteen.clone(), sixteen_signers.clone())],
        ),
    ];
    let all_keys: Vec<&IdentityKeyPair> = [&a, &b, &c, &d].into_iter().chain(many.iter()).collect();
    for (name, description, steps) in chains {
        let genesis = DeviceList::genesis(&a, 1);
        let mut head = genesis.verify_genesis().expect("genesis");
        let mut json_steps = vec![device_step(&genesis, &all_keys, &[&a])];
        for (devices, signers) in &steps {
            let list = device_list(
                account,
                head.version() + 1,
                *head.body_hash(),
                devices,
                signers,
            );
            head = list.verify_successor(&head).expect("valid step");
            json_steps.push(device_step(&list, &all_keys, signers));
        }
        let (fa, fp) = (
            cubbyhole::Fingerprint::of_account(&account),
            cubbyhole::Fingerprint::of_account(&peer),
        );
        cases.push(json!({
            "name": name,
            "description": description,
            "error": null,
            "steps": json_steps,
            "peer_account_id": h(peer.as_bytes()),
            "account_fingerprint": fa.as_str(),
            "peer_fingerprint": fp.as_str(),
            "account_safety_number": SafetyNumber::for_accounts(&account, &peer).as_str(),
        }));
    }

    // The chain the negative cases are checked against: v1 = {A},
    // v2 = {A, B, T}.
    let v1 = DeviceList::genesis(&a, 1);
    let h1 = v1.verify_genesis().expect("v1");
    let v2 = device_list(
        account,
        2,
        *v1.body_hash(),
        &[(&a, 1), (&b, 2), (&t, 3)],
        &[&a, &b, &t],
    );
    let h2 = v2.verify_successor(&h1).expect("v2");
    let known = [h(&v1.encode()), h(&v2.encode())];
    let next = |devices: &[(&IdentityKeyPair, u32)], signers: &[&IdentityKeyPair]| {
        device_list(account, 3, *v2.body_hash(), devices, signers)
    };
    let flip_signature = |list: &DeviceList| {
        // The first byte of the last signature (its R).
        let mut bytes = list.encode();
        let at = bytes.len() - 64;
        bytes[at] ^= 0x01;
        bytes
    };

    struct Neg {
        name: &'static str,
        description: &'static str,
        check: &'static str,
        known: usize,
        input: Vec<u8>,
        offered: Vec<DeviceList>,
        error: &'static str,
    }
    let mut negs: Vec<Neg> = Vec::new();
    let mut neg = |name, description, check, known, input: Vec<u8>, error| {
        negs.push(Neg {
            name,
            description,
            check,
            known,
            input,
            offered: Vec::new(),
            error,
        });
    };

    // Decode: every rule of SPEC 25.4, on v2 (body 182 bytes, 3 signatures).
    let good = v2.encode();
    let body_len = 74 + 3 * 36;
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    neg(
        "decode_empty",
        "no byte: shorter than the 74-byte header",
        "decode",
        0,
        vec![],
        "malformed",
    );
    neg(
        "decode_short_header",
        "73 bytes: shorter than the header",
        "decode",
        0,
        good[..73].to_vec(),
        "malformed",
    );
    neg(
        "decode_format",
        "format byte 0x02",
        "decode",
        0,
        edit(&|b| b[0] = 0x02),
        "malformed",
    );
    neg(
        "decode_count_zero",
        "count 0",
        "decode",
        0,
        edit(&|b| b[73] = 0),
        "malformed",
    );
    neg(
        "decode_count_seventeen",
        "count 17 (above MAX_DEVICES), with enough bytes after it",
        "decode",
        0,
        edit(&|b| {
            b[73] = 17;
            b.resize(74 + 17 * 36 + 1 + 65, 0x11);
        }),
        "malformed",
    );
    neg(
        "decode_body_only",
        "the body without sig_count",
        "decode",
        0,
        good[..body_len].to_vec(),
        "malformed",
    );
    neg(
        "decode_version_zero",
        "version 0",
        "decode",
        0,
        edit(&|b| b[33..41].fill(0)),
        "malformed",
    );
    neg(
        "decode_identity_small_order",
        "the first IK replaced by the identity point (01 00..00, small order)",
        "decode",
        0,
        edit(&|b| {
            b[74..106].fill(0);
            b[74] = 1;
        }),
        "malformed",
    );
    neg(
        "decode_identity_non_canonical",
        "the first IK replaced by y = p + 1 (not canonical)",
        "decode",
        0,
        edit(&|b| b[74..106].copy_from_slice(&P_PLUS_ONE)),
        "malformed",
    );
    neg(
        "decode_identities_not_increasing",
        "the first two entries swapped",
        "decode",
        0,
        edit(&|b| {
            let first = b[74..110].to_vec();
            let second = b[110..146].to_vec();
            b[74..110].copy_from_slice(&second);
            b[110..146].copy_from_slice(&first);
        }),
        "malformed",
    );
    neg(
        "decode_identity_twice",
        "the second entry a copy of the first",
        "decode",
        0,
        edit(&|b| {
            let first = b[74..110].to_vec();
            b[110..146].copy_from_slice(&first);
        }),
        "malformed",
    );
    neg(
        "decode_device_id_twice",
        "the third entry's device id set to the first's",
        "decode",
        0,
        edit(&|b| {
            let id = b[106..110].to_vec();
            b[178..182].copy_from_slice(&id);
        }),
        "malformed",
    );
    neg(
        "decode_sig_count_zero",
        "sig_count 0 and no signature",
        "decode",
        0,
        edit(&|b| {
            b.truncate(body_len + 1);
            b[body_len] = 0;
        }),
        "malformed",
    );
    neg(
        "decode_sig_count_above_count",
        "sig_count 4 with 4 signature records, count 3",
        "decode",
        0,
        edit(&|b| {
            b[body_len] = 4;
            let last = b[b.len() - 65..].to_vec();
            b.extend_from_slice(&last);
        }),
        "malformed",
    );
    neg(
        "decode_trailing_byte",
        "one byte after the last signature",
        "decode",
        0,
        edit(&|b| b.push(0)),
        "malformed",
    );
    neg(
        "decode_truncated_signature",
        "the last signature one byte short",
        "decode",
        0,
        good[..good.len() - 1].to_vec(),
        "malformed",
    );
    neg(
        "decode_index_twice",
        "the second signature's index equal to the first's",
        "decode",
        0,
        edit(&|b| b[body_len + 1 + 65] = b[body_len + 1]),
        "malformed",
    );
    neg(
        "decode_index_out_of_range",
        "the last signature's index 3 (count 3)",
        "decode",
        0,
        edit(&|b| {
            let at = b.len() - 65;
            b[at] = 3;
        }),
        "malformed",
    );

    // Genesis.
    neg(
        "genesis_version_two",
        "version 2, previous zero, A alone, signed by A: not a first version",
        "genesis",
        0,
        device_list(account, 2, [0; 32], &[(&a, 1)], &[&a]).encode(),
        "not_genesis",
    );
    neg(
        "genesis_previous_not_zero",
        "version 1 whose previous is not zero",
        "genesis",
        0,
        device_list(account, 1, [7; 32], &[(&a, 1)], &[&a]).encode(),
        "not_genesis",
    );
    neg(
        "genesis_two_devices",
        "version 1 listing A and B, signed by both: a first version lists one device",
        "genesis",
        0,
        device_list(account, 1, [0; 32], &[(&a, 1), (&b, 2)], &[&a, &b]).encode(),
        "not_genesis",
    );
    neg(
        "genesis_wrong_account",
        "version 1 of B alone under A's account id",
        "genesis",
        0,
        device_list(account, 1, [0; 32], &[(&b, 1)], &[&b]).encode(),
        "wrong_account",
    );
    neg(
        "genesis_bad_signature",
        "A's genesis with a bit of the signature's R flipped",
        "genesis",
        0,
        flip_signature(&v1),
        "bad_signature",
    );

    // Successors of v2 = {A, B, T}.
    neg(
        "successor_wrong_account",
        "version 3 under another account id (X's), previous = hash(v2), signed by A",
        "successor",
        2,
        device_list(
            AccountId::of_founder(x.public()),
            3,
            *v2.body_hash(),
            &[(&a, 1)],
            &[&a],
        )
        .encode(),
        "wrong_account",
    );
    neg(
        "successor_replay",
        "v2 itself offered again: version 2 is not above 2",
        "successor",
        2,
        v2.encode(),
        "stale",
    );
    neg(
        "successor_stale_badly_signed",
        "a version 2 with another previous and a bad signature: the version is checked first",
        "successor",
        2,
        flip_signature(&device_list(account, 2, [9; 32], &[(&a, 1)], &[&a])),
        "stale",
    );
    neg(
        "successor_gap",
        "version 4, previous = hash(v2), signed by A: version 3 is missing",
        "successor",
        2,
        device_list(account, 4, *v2.body_hash(), &[(&a, 1)], &[&a]).encode(),
        "gap",
    );
    neg(
        "successor_bad_signature",
        "version 3 removing T, signed by A, with a bit of A's signature flipped",
        "successor",
        2,
        flip_signature(&next(&[(&a, 1), (&b, 2)], &[&a])),
        "bad_signature",
    );
    neg(
        "successor_forged_conflict",
        "version 3 with a previous that is not hash(v2), signed by A, signature flipped: \
         the signatures are checked before the chain, so it is no conflict",
        "successor",
        2,
        flip_signature(&device_list(account, 3, [9; 32], &[(&a, 1)], &[&a])),
        "bad_signature",
    );
    neg(
        "successor_fork",
        "version 3 with a previous that is not hash(v2), validly signed by A, a device of v2: \
         a conflict, both lists are evidence",
        "successor",
        2,
        device_list(account, 3, [9; 32], &[(&a, 1)], &[&a]).encode(),
        "conflict",
    );
    neg(
        "successor_stranger_fork",
        "version 3 with a previous that is not hash(v2), listing and signed by X only: \
         nobody of v2 signed it, so it is no conflict",
        "successor",
        2,
        device_list(account, 3, [9; 32], &[(&x, 9)], &[&x]).encode(),
        "unauthorized",
    );
    neg(
        "successor_device_id_changed",
        "version 3 keeping A as device 5 (was 1), signed by A",
        "successor",
        2,
        next(&[(&a, 5), (&b, 2), (&t, 3)], &[&a]).encode(),
        "device_id_changed",
    );
    neg(
        "successor_device_id_reused",
        "version 3 removing T (device 3) and adding C as device 3, signed by A and C",
        "successor",
        2,
        next(&[(&a, 1), (&b, 2), (&c, 3)], &[&a, &c]).encode(),
        "device_id_reused",
    );
    neg(
        "successor_only_added_signed",
        "version 3 adding C (device 4), signed by C only: no device of v2 signed",
        "successor",
        2,
        next(&[(&a, 1), (&b, 2), (&t, 3), (&c, 4)], &[&c]).encode(),
        "unauthorized",
    );
    neg(
        "successor_stranger_adds_itself",
        "version 3 = {A, B, T, X}, signed by X only: a stranger cannot add itself",
        "successor",
        2,
        next(&[(&a, 1), (&b, 2), (&t, 3), (&x, 9)], &[&x]).encode(),
        "unauthorized",
    );
    neg(
        "successor_added_did_not_sign",
        "version 3 adding C (device 4) and D (device 5), signed by A and C: D did not sign",
        "successor",
        2,
        next(&[(&a, 1), (&b, 2), (&t, 3), (&c, 4), (&d, 5)], &[&a, &c]).encode(),
        "unauthorized",
    );

    // The chain verifier: the thief's race.
    let thief = next(&[(&t, 3)], &[&t]);
    let honest = next(&[(&a, 1), (&b, 2)], &[&a]);
    let forged = next(&[(&x, 9)], &[&x]);
    let v4 = device_list(account, 4, *honest.body_hash(), &[(&a, 1)], &[&a]);
    let chain_negs: [(&str, &str, Vec<DeviceList>, &str); 4] = [
        (
            "chain_thief_race",
            "offered T's version 3 removing A and B (signed by T) and A's version 3 removing T \
             (signed by A): the first is accepted, the second is another version 3 that verifies \
             against v2: conflict (ours: T's, theirs: A's)",
            vec![thief.clone(), honest.clone()],
            "conflict",
        ),
        (
            "chain_forged_sibling",
            "offered A's version 3, then X's version 3 listing only X (signed by X): \
             not a successor of v2, so no conflict",
            vec![honest.clone(), forged],
            "unauthorized",
        ),
        (
            "chain_gap",
            "offered version 4 (after A's version 3) without version 3",
            vec![v4],
            "gap",
        ),
        (
            "chain_bad_signature",
            "offered A's version 3 with A's signature flipped",
            vec![DeviceList::decode(&flip_signature(&honest)).expect("decodes")],
            "bad_signature",
        ),
    ];
    for (name, description, offered, error) in chain_negs {
        negs.push(Neg {
            name,
            description,
            check: "chain",
            known: 2,
            input: Vec::new(),
            offered,
            error,
        });
    }

    let heads: [Option<&VerifiedDeviceList>; 3] = [None, Some(&h1), Some(&h2)];
    for n in negs {
        let head = heads[n.known];
        let result: Result<(), DeviceListError> = match n.check {
            "decode" => DeviceList::decode(&n.input).map(|_| ()),
            "genesis" => DeviceList::decode(&n.input)
                .expect("decodes")
                .verify_genesis()
                .map(|_| ()),
            "successor" => DeviceList::decode(&n.input)
                .expect("decodes")
                .verify_successor(head.expect("a head"))
                .map(|_| ()),
            "chain" => DeviceListChain::accept(head, &n.offered).map(|_| ()),
            other => panic!("check {other}"),
        };
        let err = result.expect_err(n.name);
        assert_eq!(err.profile_kind(), n.error, "{}", n.name);
        let mut case = json!({
            "name": n.name,
            "description": n.description,
            "check": n.check,
            "known": known[..n.known],
            "error": n.error,
        });
        if n.check == "chain" {
            case["offered"] = n.offered.iter().map(|l| h(&l.encode())).collect();
        } else {
            case["input"] = h(&n.input);
        }
        if let DeviceListError::Conflict { ours, theirs } = &err {
            case["conflict_ours"] = h(&ours.encode());
            case["conflict_theirs"] = h(&theirs.encode());
        }
        cases.push(case);
    }
    cases
}

// ------------------------------------------------------------ sealed (v2)

/// The seed of `sealed.json`'s generator: its own, so that the v1 files
/// are unchanged by it.
const SEED_V2: [u8; 32] = *b"cubbyhole/v2 test vectors seed!!";
/// The routing window the conversation is replayed with (SPEC 26.6).
const WINDOW: u32 = 32;

const SEALED_DESCRIPTION: &str = "Profile cubbyhole/v2 (SPEC.md section 26): header keys and \
    routing tags, size classes and padding, one conversation of sealed prekey messages and \
    chain messages with every intermediate value, and rejected envelopes with their error \
    kinds (session_mismatch: no session expects the envelope id). Intermediate values are \
    computed here with the primitives (hmac, hkdf, aes-gcm, x25519-dalek), and the generator \
    refuses to write a payload the crate does not produce byte for byte.";

/// The primitives of profile v2, written out for the generator (not the
/// crate's code).
mod prim {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::{Aes256Gcm, Nonce};
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
    pub fn hkdf<const N: usize>(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; N] {
        let mut okm = [0u8; N];
        hkdf::Hkdf::<Sha256>::new(Some(salt), ikm)
            .expand(info, &mut okm)
            .expect("length");
        okm
    }
    pub fn aead(key: &[u8], nonce: &[u8], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        Aes256Gcm::new_from_slice(key)
            .expect("32-byte key")
            .encrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("encrypt")
    }
    pub fn x25519(private: &[u8; 32], public: &[u8; 32]) -> [u8; 32] {
        x25519_dalek::x25519(*private, *public)
    }
    pub fn x25519_public(private: &[u8; 32]) -> [u8; 32] {
        x25519_dalek::x25519(*private, x25519_dalek::X25519_BASEPOINT_BYTES)
    }
    pub fn header_key(rk: &[u8; 32]) -> [u8; 32] {
        hmac(rk, &[b"cubbyhole/v2 header key"])
    }
    pub fn tag(hk: &[u8; 32], n: u32) -> [u8; 16] {
        hmac(hk, &[b"cubbyhole/v2 tag", &n.to_be_bytes()])[..16]
            .try_into()
            .expect("16")
    }
    pub fn hkey(hk: &[u8; 32], n: u32) -> [u8; 32] {
        hmac(hk, &[b"cubbyhole/v2 header", &n.to_be_bytes()])
    }
    pub fn kdf_rk(rk: &[u8; 32], dh: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
        let okm = hkdf::<64>(rk, dh, b"cubbyhole/v1 root");
        (
            okm[..32].try_into().expect("32"),
            okm[32..].try_into().expect("32"),
        )
    }
    pub fn kdf_ck(ck: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
        (hmac(ck, &[&[1]]), hmac(ck, &[&[2]]))
    }
    pub fn message_keys(mk: &[u8; 32]) -> [u8; 44] {
        hkdf::<44>(&[0; 32], mk, b"cubbyhole/v1 message")
    }
    pub fn seal_keys(dh: &[u8; 32], e: &[u8; 32], spk: &[u8; 32]) -> [u8; 44] {
        let info = [&b"cubbyhole/v2 seal"[..], e, spk].concat();
        hkdf::<44>(&[0; 32], dh, &info)
    }
    /// PADMÉ above 512 bytes.
    pub fn size_class(len: usize) -> usize {
        if len <= 512 {
            return 512;
        }
        let e = len.ilog2();
        let s = e.ilog2() + 1;
        let mask = (1usize << (e - s)) - 1;
        (len + mask) & !mask
    }
    pub fn pad(plaintext: &[u8], overhead: usize) -> Vec<u8> {
        let class = size_class(overhead + plaintext.len() + 1);
        let mut out = plaintext.to_vec();
        out.push(0x80);
        out.resize(class - overhead, 0);
        out
    }
}

/// One message of the v2 conversation, as the generator's model computes it.
#[derive(Clone)]
struct V2Message {
    sender: Who,
    plaintext: Vec<u8>,
    prekey: bool,
    json: Value,
    header_key: [u8; 32],
    message_key: [u8; 32],
    header: [u8; 40],
    id: [u8; 16],
    payload: Vec<u8>,
    /// The inner message's bytes before its ciphertext (sealed prekey only).
    prefix: Vec<u8>,
    /// E's private key (sealed prekey only).
    seal_private: [u8; 32],
}

/// The parties of the v2 conversation, driven through the crate's API.
#[derive(Clone)]
struct V2Parties {
    bob: IdentityKeyPair,
    alice_session: Session,
    bob_prekeys: PrekeyStore,
    bob_session: Option<Session>,
}

impl V2Parties {
    fn session(&mut self, who: Who) -> Option<&mut Session> {
        match who {
            Who::Initiator => Some(&mut self.alice_session),
            Who::Responder => self.bob_session.as_mut(),
        }
    }

    /// Bob's receipt of a sealed prekey message: opened with his signed
    /// prekeys, then given to the session it continues or accepted.
    fn receive_sealed_prekey(&mut self, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let inner = self.bob_prekeys.open_sealed(payload)?;
        let incoming = Incoming::decode(&inner)?;
        if let Some(s) = self.bob_session.as_mut().filter(|s| s.matches(&incoming)) {
            let mut out = Vec::new();
            s.decrypt_incoming(&incoming, &mut out)?;
            return Ok(out);
        }
        let a = self
            .bob_prekeys
            .accept(&self.bob, &incoming, SessionConfig::default())?;
        self.bob_session = Some(a.session);
        Ok(a.plaintext)
    }

    fn receive_chain(&mut self, who: Who, id: &[u8; 16], payload: &[u8]) -> Result<Vec<u8>, Error> {
        let s = self.session(who).ok_or(Error::SessionMismatch)?;
        let mut out = Vec::new();
        s.open(id, payload, WINDOW, &mut out)?;
        Ok(out)
    }

    fn state(&self) -> Vec<u8> {
        let mut all = self.alice_session.to_bytes().to_vec();
        all.extend_from_slice(&self.bob_prekeys.to_bytes());
        if let Some(s) = &self.bob_session {
            all.extend_from_slice(&s.to_bytes());
        }
        all
    }
}

fn v2_error_kind(e: &Error) -> &'static str {
    match e {
        Error::SessionMismatch => "session_mismatch",
        e => e.profile_kind().expect("a profile kind"),
    }
}

/// The header keys cases: HK(rk), and tag and hkey for several n.
fn v2_header_key_cases(rng: &mut ChaCha20Rng) -> Vec<Value> {
    (0..3)
        .map(|i| {
            let rk = bytes32(rng);
            let hk = prim::header_key(&rk);
            let tags: Vec<Value> = [0u32, 1, 2, 31, 32, 1000, u32::MAX - 1, u32::MAX]
                .into_iter()
                .map(|n| {
                    json!({
                        "n": n,
                        "tag": h(&prim::tag(&hk, n)),
                        "header_aead_key": h(&prim::hkey(&hk, n)),
                    })
                })
                .collect();
            json!({
                "name": format!("header_keys_{i}"),
                "kind": "header_keys",
                "root_key": h(&rk),
                "header_key": h(&hk),
                "tags": tags,
            })
        })
        .collect()
}

/// Size classes and padding lengths, from the crate (the test recomputes
/// them with its own PADMÉ); the generator checks them against its own.
fn v2_padding_case() -> Value {
    let classes: Vec<Value> = [
        0usize,
        1,
        511,
        512,
        513,
        1024,
        1025,
        4096,
        65_536 + 74,
        1 << 20,
    ]
    .into_iter()
    .map(|l| {
        let c = cubbyhole::sealed::size_class(l);
        assert_eq!(c, prim::size_class(l), "size class {l}");
        json!({"length": l, "class": c})
    })
    .collect();
    let mut padding = Vec::new();
    for overhead in [
        cubbyhole::sealed::CHAIN_OVERHEAD,
        cubbyhole::sealed::SEALED_PREKEY_OVERHEAD,
        cubbyhole::sealed::SEALED_PREKEY_OVERHEAD_OPK,
    ] {
        for len in [64usize, 1024, 65_536] {
            let p = cubbyhole::sealed::padding_len(overhead, len);
            assert_eq!(p, prim::pad(&vec![0; len], overhead).len() - len);
            padding.push(json!({
                "overhead": overhead,
                "plaintext_length": len,
                "padding_length": p,
                "payload_length": overhead + len + p,
            }));
        }
    }
    json!({
        "name": "size_classes",
        "kind": "padding",
        "classes": classes,
        "padding": padding,
    })
}

/// The conversation: who sends (and after how many deliveries), and the
/// delivery events (receiver, message index).
#[allow(clippy::type_complexity)]
fn v2_script() -> (Vec<(Who, usize, Vec<u8>)>, Vec<(Who, usize)>) {
    use Who::{Initiator as A, Responder as B};
    let sends = vec![
        (A, 0, b"hello bob: a sealed prekey message".to_vec()),
        (A, 0, b"a second one, with a fresh E".to_vec()),
        (B, 2, b"hi alice: a chain message".to_vec()),
        (B, 2, b"this one arrives after the next".to_vec()),
        (B, 2, vec![0x42; 1000]),
        (
            A,
            5,
            b"a new chain of alice's; its second message arrives first".to_vec(),
        ),
        (A, 5, b"second of the chain, delivered first".to_vec()),
        (B, 7, b"a new chain of bob's".to_vec()),
    ];
    let deliveries = vec![
        (B, 0),
        (B, 1),
        (A, 2),
        (A, 4),
        (A, 3),
        (B, 6),
        (B, 5),
        (A, 7),
    ];
    (sends, deliveries)
}

/// Runs the conversation through the crate (recording what it draws) and
/// through the model (the intermediate values); they must agree on every
/// envelope. Returns the case, the messages and the parties' states after
/// each number of deliveries.
fn v2_conversation(rng: &mut ChaCha20Rng) -> (Value, Vec<V2Message>, Vec<V2Parties>) {
    let keys = Keys::random(rng, true);
    // Alice's session: EK_A, then her first ratchet key.
    let bundle = keys
        .bundle()
        .verify(keys.spk_created, FreshnessPolicy::default())
        .expect("verifies");
    let mut rec = Recording {
        inner: rng,
        drawn: Vec::new(),
    };
    let alice_session = Session::initiate_sealed(
        &mut rec,
        &keys.initiator(),
        &bundle,
        SessionConfig::default(),
    )
    .expect("initiate");
    let ephemeral: [u8; 32] = rec.drawn[..32].try_into().expect("EK_A");
    let alice_first_ratchet: [u8; 32] = rec.drawn[32..64].try_into().expect("32");
    assert_eq!(rec.drawn.len(), 64);
    let mut case = keys.setup_json("conversation", &ephemeral);
    case.remove("bundle");
    case.insert("kind".into(), json!("conversation"));
    case.insert(
        "initiator_ephemeral_public".into(),
        h(&prim::x25519_public(&ephemeral)),
    );
    let bob = keys.responder();
    let x = hazmat::x3dh_initiator(&keys.initiator(), &ephemeral, &keys.bundle()).expect("X3DH");
    let ad = x.associated_data;
    let spk_public = *keys.signed_prekey().public();
    let (opk_id, _) = keys.opk.expect("an OPK");

    let mut prekeys = PrekeyStore::with_signed_prekey(keys.signed_prekey());
    prekeys.insert_one_time_prekey(keys.one_time_prekey().expect("OPK"));
    let mut parties = V2Parties {
        bob,
        alice_session,
        bob_prekeys: prekeys,
        bob_session: None,
    };

    // The model.
    let mut rk = *x.shared_secret;
    let mut last_chain: Option<(Who, [u8; 32])> = None;
    // Per party: (ratchet private, public, next chain key, next n, HK).
    type Chain = ([u8; 32], [u8; 32], [u8; 32], u32, [u8; 32]);
    let mut chains: BTreeMap<Who, Chain> = BTreeMap::new();
    // The peer's ratchet private that answers each ratchet public.
    let mut privates: BTreeMap<[u8; 32], [u8; 32]> = BTreeMap::new();
    privates.insert(spk_public, keys.spk_private);

    let (sends, deliveries) = v2_script();
    let mut messages: Vec<V2Message> = Vec::new();
    let mut snapshots = Vec::new();
    let mut delivered = 0;
    loop {
        // Send what is due.
        while let Some((sender, after, plaintext)) = sends.get(messages.len()) {
            if *after != delivered {
                assert!(*after > delivered);
                break;
            }
            let i = messages.len();
            let mut rec = Recording {
                inner: rng,
                drawn: Vec::new(),
            };
            let sealed = parties
                .session(*sender)
                .expect("sender's session")
                .seal(&mut rec, plaintext)
                .expect("seal");
            let mut drawn = &rec.drawn[..];
            let prekey = *sender == Who::Initiator
                && !deliveries[..delivered]
                    .iter()
                    .any(|(r, _)| *r == Who::Initiator);
            let mut m = serde_json::Map::new();
            m.insert("sender".into(), json!(sender.name()));
            m.insert("after_deliveries".into(), json!(after));
            m.insert("plaintext".into(), h(plaintext));
            m.insert(
                "kind".into(),
                json!(if prekey { "sealed_prekey" } else { "chain" }),
            );
            // A new chain?
            let new_chain = last_chain.is_none_or(|(who, _)| who != *sender);
            if new_chain {
                let private = if i == 0 {
                    alice_first_ratchet
                } else {
                    let p: [u8; 32] = drawn[..32].try_into().expect("a ratchet key drawn");
                    drawn = &drawn[32..];
                    p
                };
                let public = prim::x25519_public(&private);
                let peer = last_chain.map_or(spk_public, |(_, p)| p);
                let dh = prim::x25519(&private, &peer);
                assert_eq!(
                    dh,
                    prim::x25519(&privates[&peer], &public),
                    "both sides' DH"
                );
                let hk = prim::header_key(&rk);
                let (rk_out, ck) = prim::kdf_rk(&rk, &dh);
                m.insert("ratchet_private".into(), h(&private));
                m.insert("root_key_in".into(), h(&rk));
                m.insert("ratchet_dh".into(), h(&dh));
                m.insert("root_key_out".into(), h(&rk_out));
                rk = rk_out;
                privates.insert(public, private);
                let pn = chains.get(sender).map_or(0, |c| c.3);
                chains.insert(*sender, (private, public, ck, 0, hk));
                last_chain = Some((*sender, public));
                m.insert("pn".into(), json!(pn));
            } else {
                m.insert("ratchet_private".into(), Value::Null);
                m.insert("root_key_in".into(), Value::Null);
                m.insert("ratchet_dh".into(), Value::Null);
                m.insert("root_key_out".into(), Value::Null);
            }
            let pn = m
                .get("pn")
                .and_then(Value::as_u64)
                .map(|p| p as u32)
                .unwrap_or_else(|| {
                    // The pn of the chain's first message.
                    messages
                        .iter()
                        .rev()
                        .find(|x| x.sender == *sender)
                        .map(|x| u32::from_be_bytes(x.header[32..36].try_into().expect("4")))
                        .expect("a previous message of the chain")
                });
            m.insert("pn".into(), json!(pn));
            let chain = chains.get_mut(sender).expect("a sending chain");
            let (ratchet_public, ck, n, hk) = (chain.1, chain.2, chain.3, chain.4);
            let (mk, next) = prim::kdf_ck(&ck);
            chain.2 = next;
            chain.3 += 1;
            let mut header = [0u8; 40];
            header[..32].copy_from_slice(&ratchet_public);
            header[32..36].copy_from_slice(&pn.to_be_bytes());
            header[36..].copy_from_slice(&n.to_be_bytes());
            let keys44 = prim::message_keys(&mk);
            m.insert("ratchet_public".into(), h(&ratchet_public));
            m.insert("n".into(), json!(n));
            m.insert("header".into(), h(&header));
            m.insert("header_key".into(), h(&hk));
            m.insert("chain_key".into(), h(&ck));
            m.insert("message_key".into(), h(&mk));
            m.insert("message_aes_key".into(), h(&keys44[..32]));
            m.insert("message_nonce".into(), h(&keys44[32..]));
            let overhead = if prekey {
                cubbyhole::sealed::SEALED_PREKEY_OVERHEAD_OPK
            } else {
                cubbyhole::sealed::CHAIN_OVERHEAD
            };
            let padded = prim::pad(plaintext, overhead);
            m.insert(
                "padding_length".into(),
                json!(padded.len() - plaintext.len()),
            );
            let mut prefix = Vec::new();
            let mut seal_private = [0u8; 32];
            let (id, payload) = if prekey {
                prefix.extend_from_slice(&[0x02, 0x03]);
                prefix.extend_from_slice(keys.initiator().public().as_bytes());
                prefix.extend_from_slice(&prim::x25519_public(&ephemeral));
                prefix.extend_from_slice(&keys.spk_id.to_be_bytes());
                prefix.push(1);
                prefix.extend_from_slice(&opk_id.to_be_bytes());
                prefix.extend_from_slice(&header);
                let aad = [&ad[..], &prefix].concat();
                let body = prim::aead(&keys44[..32], &keys44[32..], &aad, &padded);
                let inner = [&prefix[..], &body].concat();
                seal_private = drawn[..32].try_into().expect("e drawn");
                let id: [u8; 16] = drawn[32..48].try_into().expect("id drawn");
                assert_eq!(drawn.len(), 48, "message {i}: draws");
                let e = prim::x25519_public(&seal_private);
                let sdh = prim::x25519(&seal_private, &spk_public);
                let sk = prim::seal_keys(&sdh, &e, &spk_public);
                let sealed_inner = prim::aead(
                    &sk[..32],
                    &sk[32..],
                    &[&[0x02, 0x01][..], &e].concat(),
                    &inner,
                );
                m.insert("aead_associated_data".into(), h(&aad));
                m.insert("body".into(), h(&body));
                m.insert("inner".into(), h(&inner));
                m.insert("seal_ephemeral_private".into(), h(&seal_private));
                m.insert("seal_ephemeral_public".into(), h(&e));
                m.insert("seal_dh".into(), h(&sdh));
                m.insert("seal_key".into(), h(&sk[..32]));
                m.insert("seal_nonce".into(), h(&sk[32..]));
                (id, [&[0x02, 0x01][..], &e, &sealed_inner].concat())
            } else {
                assert!(drawn.is_empty(), "message {i}: draws");
                let aad = [&ad[..], &[0x02, 0x02], &header].concat();
                let body = prim::aead(&keys44[..32], &keys44[32..], &aad, &padded);
                let id = prim::tag(&hk, n);
                let hkey = prim::hkey(&hk, n);
                let eh = prim::aead(&hkey, &[0; 12], &[&[0x02, 0x02][..], &id].concat(), &header);
                m.insert("aead_associated_data".into(), h(&aad));
                m.insert("body".into(), h(&body));
                m.insert("header_aead_key".into(), h(&hkey));
                m.insert("encrypted_header".into(), h(&eh));
                (id, [&[0x02, 0x02][..], &eh, &body].concat())
            };
            assert_eq!(sealed.id, id, "message {i}: envelope id");
            assert_eq!(
                hex::encode(&sealed.payload),
                hex::encode(&payload),
                "message {i}: the crate's payload differs from the model's"
            );
            m.insert("envelope_id".into(), h(&id));
            m.insert("payload".into(), h(&payload));
            messages.push(V2Message {
                sender: *sender,
                plaintext: plaintext.clone(),
                prekey,
                json: Value::Object(m),
                header_key: hk,
                message_key: mk,
                header,
                id,
                payload,
                prefix,
                seal_private,
            });
        }
        snapshots.push(parties.clone());
        let Some((receiver, index)) = deliveries.get(delivered) else {
            break;
        };
        let msg = &messages[*index];
        assert_ne!(msg.sender, *receiver);
        let got = if msg.prekey {
            parties.receive_sealed_prekey(&msg.payload)
        } else {
            parties.receive_chain(*receiver, &msg.id, &msg.payload)
        }
        .unwrap_or_else(|e| panic!("delivery {delivered}: {e:?}"));
        assert_eq!(got, msg.plaintext, "delivery {delivered}");
        delivered += 1;
    }
    assert_eq!(messages.len(), sends.len(), "every message sent");
    case.insert(
        "messages".into(),
        Value::Array(messages.iter().map(|m| m.json.clone()).collect()),
    );
    case.insert(
        "delivery".into(),
        Value::Array(
            deliveries
                .iter()
                .map(|(r, i)| json!({"receiver": r.name(), "index": i}))
                .collect(),
        ),
    );
    (Value::Object(case), messages, snapshots)
}

/// The rejected envelopes. Each is built from a message of the conversation
/// (by a byte change, or anew with the primitives), given to `receiver`
/// after `after_deliveries` delivery events, and must be rejected with
/// `error`, the state unchanged.
fn v2_negative_cases(
    rng: &mut ChaCha20Rng,
    conversation: &Value,
    messages: &[V2Message],
    snapshots: &[V2Parties],
) -> Vec<Value> {
    let ad: Vec<u8> =
        hex::decode(conversation["associated_data"].as_str().expect("AD")).expect("hex");
    let spk_public: [u8; 32] =
        hex::decode(conversation["signed_prekey_public"].as_str().expect("spk"))
            .expect("hex")
            .try_into()
            .expect("32");
    let m0 = &messages[0];
    let m2 = &messages[2];
    let m3 = &messages[3];
    assert!(m0.prekey && !m2.prekey && !m3.prekey);
    let e0 = prim::x25519_public(&m0.seal_private);
    // A payload sealed to `spk` with m0's E (the inner's bytes given).
    let seal = |spk: &[u8; 32], inner: &[u8]| {
        let sdh = prim::x25519(&m0.seal_private, spk);
        let k = prim::seal_keys(&sdh, &e0, spk);
        let s = prim::aead(
            &k[..32],
            &k[32..],
            &[&[0x02, 0x01][..], &e0].concat(),
            inner,
        );
        [&[0x02, 0x01][..], &e0, &s].concat()
    };
    // A chain payload for `id` with the header `header` sealed under
    // hkey(hk, n), and the body given.
    let chain = |hk: &[u8; 32], n: u32, id: &[u8; 16], header: &[u8; 40], body: &[u8]| {
        let eh = prim::aead(
            &prim::hkey(hk, n),
            &[0; 12],
            &[&[0x02, 0x02][..], id].concat(),
            header,
        );
        [&[0x02, 0x02][..], &eh, body].concat()
    };
    let body_of = |m: &V2Message| m.payload[2 + 56..].to_vec();
    // m's plaintext with a bad ending (0x81 where 0x80 belongs), encrypted
    // under m's message key with the aad of its header.
    let bad_padding = |m: &V2Message, aad: &[u8], overhead: usize| {
        let mut padded = prim::pad(&m.plaintext, overhead);
        padded[m.plaintext.len()] = 0x81;
        let keys = prim::message_keys(&m.message_key);
        prim::aead(&keys[..32], &keys[32..], aad, &padded)
    };
    let flip = |mut b: Vec<u8>, at: usize| {
        b[at] ^= 0x01;
        b
    };
    let other_spk = prim::x25519_public(&bytes32(rng));
    let inner0_bad_padding = {
        let aad = [&ad[..], &m0.prefix].concat();
        let body = bad_padding(m0, &aad, cubbyhole::sealed::SEALED_PREKEY_OVERHEAD_OPK);
        [&m0.prefix[..], &body].concat()
    };
    // m3's header (n = 1) under m2's tag (n = 0): with m3's own body, the
    // envelope would open if the header's n were not compared with the tag's.
    let wrong_n = m3.header;
    assert_eq!(m2.header[..36], m3.header[..36]);
    let mut wrong_key = m3.header;
    wrong_key[..32].copy_from_slice(&e0);

    type Case<'a> = (
        &'a str,
        &'a str,
        usize,
        Who,
        [u8; 16],
        Vec<u8>,
        &'a str,
        &'a str,
    );
    let p0 = m0.payload.clone();
    let p2 = m2.payload.clone();
    let cases: Vec<Case<'_>> = vec![
        ("sealed_prekey_too_short", "sealed_prekey", 0, Who::Responder, m0.id, p0[..176].to_vec(), "decode",
         "176 bytes: one less than the smallest sealed prekey message (177)"),
        ("sealed_prekey_wrong_version", "sealed_prekey", 0, Who::Responder, m0.id, with(p0.clone(), 0, &[0x01]), "decode",
         "version byte 0x01"),
        ("sealed_prekey_wrong_kind", "sealed_prekey", 0, Who::Responder, m0.id, with(p0.clone(), 1, &[0x02]), "decode",
         "kind byte 0x02 (a chain message's) given as a sealed prekey message"),
        ("sealed_prekey_small_order_e", "sealed_prekey", 0, Who::Responder, m0.id, with(p0.clone(), 2, &X25519_ONE), "invalid_key",
         "E = the X25519 point u = 1: DH(SPK, E) is not contributory"),
        ("sealed_prekey_tampered_seal", "sealed_prekey", 0, Who::Responder, m0.id, flip(p0.clone(), 100), "auth",
         "one bit of S flipped: the seal's AEAD fails"),
        ("sealed_prekey_tampered_seal_tag", "sealed_prekey", 0, Who::Responder, m0.id, flip(p0.clone(), p0.len() - 1), "auth",
         "one bit of ST flipped"),
        ("sealed_prekey_unknown_signed_prekey", "sealed_prekey", 0, Who::Responder, m0.id, seal(&other_spk, &inner_of(m0, &ad)), "auth",
         "m0's inner sealed (with its E) to a signed prekey Bob does not hold: no held prekey opens it"),
        ("sealed_prekey_bad_padding", "sealed_prekey", 0, Who::Responder, m0.id, seal(&spk_public, &inner0_bad_padding), "decode",
         "m0's inner with its plaintext padded with 0x81 instead of 0x80, encrypted under m0's message key and sealed to Bob's signed prekey: every AEAD opens, the padding is refused"),
        ("chain_too_short", "chain", 2, Who::Initiator, m2.id, p2[..73].to_vec(), "decode",
         "73 bytes: one less than a chain message's overhead (74)"),
        ("chain_wrong_version", "chain", 2, Who::Initiator, m2.id, with(p2.clone(), 0, &[0x01]), "decode",
         "version byte 0x01"),
        ("chain_wrong_kind", "chain", 2, Who::Initiator, m2.id, with(p2.clone(), 1, &[0x01]), "decode",
         "kind byte 0x01 (a sealed prekey message's) given as a chain message"),
        ("chain_unexpected_tag", "chain", 2, Who::Initiator, { let mut t = m2.id; t[8] ^= 1; t }, p2.clone(), "session_mismatch",
         "m2 with one bit of its envelope id flipped: no tag the session expects"),
        ("chain_replayed", "chain", 3, Who::Initiator, m2.id, p2.clone(), "session_mismatch",
         "m2 again after it was opened: its tag is no longer expected"),
        ("chain_tampered_header", "chain", 2, Who::Initiator, m2.id, flip(p2.clone(), 10), "auth",
         "one bit of EH flipped: the header's AEAD fails"),
        ("chain_tampered_body", "chain", 2, Who::Initiator, m2.id, flip(p2.clone(), p2.len() - 1), "auth",
         "one bit of the body's tag flipped: the header opens, the message AEAD fails"),
        ("chain_header_n_differs", "chain", 2, Who::Initiator, m2.id, chain(&m2.header_key, 0, &m2.id, &wrong_n, &body_of(m3)), "auth",
         "m2's tag (n = 0) with m3's header (n = 1) sealed under hkey(HK, 0), and m3's body: the header opens but names another message than its tag"),
        ("chain_header_ratchet_key_differs", "chain", 4, Who::Initiator, m3.id, chain(&m3.header_key, 1, &m3.id, &wrong_key, &body_of(m3)), "auth",
         "m3's tag (a stored skipped key of Bob's first chain) with a header naming another ratchet key, sealed under hkey(HK, 1): the header opens but names another chain"),
        ("chain_bad_padding", "chain", 2, Who::Initiator, m2.id, chain(&m2.header_key, 0, &m2.id, &m2.header, &bad_padding(m2, &[&ad[..], &[0x02, 0x02], &m2.header].concat(), cubbyhole::sealed::CHAIN_OVERHEAD)), "decode",
         "m2 with its plaintext padded with 0x81 instead of 0x80, encrypted under m2's message key: both AEADs open, the padding is refused"),
    ];
    cases
        .into_iter()
        .map(
            |(name, kind, after, receiver, id, payload, error, description)| {
                let mut parties = snapshots[after].clone();
                let before = parties.state();
                let result = match kind {
                    "sealed_prekey" => parties.receive_sealed_prekey(&payload),
                    _ => parties.receive_chain(receiver, &id, &payload),
                };
                match result {
                    Ok(_) => panic!("{name}: accepted, expected {error}"),
                    Err(e) => assert_eq!(v2_error_kind(&e), error, "{name}: {e:?}"),
                }
                assert_eq!(parties.state(), before, "{name}: state changed");
                json!({
                    "name": name,
                    "kind": "negative",
                    "description": description,
                    "conversation": "conversation",
                    "envelope": kind,
                    "after_deliveries": after,
                    "receiver": receiver.name(),
                    "envelope_id": h(&id),
                    "payload": h(&payload),
                    "error": error,
                })
            },
        )
        .collect()
}

/// The inner message of `m` (a sealed prekey message), rebuilt.
fn inner_of(m: &V2Message, ad: &[u8]) -> Vec<u8> {
    let keys = prim::message_keys(&m.message_key);
    let aad = [ad, &m.prefix].concat();
    let padded = prim::pad(&m.plaintext, cubbyhole::sealed::SEALED_PREKEY_OVERHEAD_OPK);
    [
        &m.prefix[..],
        &prim::aead(&keys[..32], &keys[32..], &aad, &padded),
    ]
    .concat()
}

fn sealed_vectors() -> Value {
    let mut rng = ChaCha20Rng::from_seed(SEED_V2);
    let mut cases = v2_header_key_cases(&mut rng);
    cases.push(v2_padding_case());
    let (conversation, messages, snapshots) = v2_conversation(&mut rng);
    let negative = v2_negative_cases(&mut rng, &conversation, &messages, &snapshots);
    cases.push(conversation);
    cases.extend(negative);
    json!({
        "profile": "cubbyhole/v2",
        "description": SEALED_DESCRIPTION,
        "generator": "cubbyhole examples/gen_vectors.rs (ChaCha20, fixed seed)",
        "cases": cases,
    })
}
