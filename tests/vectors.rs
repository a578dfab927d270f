//! Checks a directory of `cubbyhole/v1` test vectors against the crate.
//!
//! The directory is `$CUBBYHOLE_VECTORS` (default `test-vectors/`). The test
//! depends on nothing but the schema of `protocol-profile.md`, so vectors of
//! another implementation can be checked the same way:
//!
//! ```text
//! CUBBYHOLE_VECTORS=../shared/interop-vectors cargo test --test vectors
//! ```
//!
//! Every field is recomputed from the inputs: keys, signatures, bundles, DH
//! outputs, SK, AD, message keys, wire bytes byte for byte, plaintexts in the
//! given delivery order, and the error kind of every negative case (with the
//! receiver's state checked unchanged after each rejection).
//!
//! `frames.json` holds the crate's client frames (`src/client/frame.rs`),
//! which are not part of the profile: each valid case is decoded and
//! encoded, each invalid one must be refused. A directory without
//! `frames.json` (another implementation's) has that test reported as
//! ignored: the file runs under its own harness (`libtest-mimic`), which
//! decides at run time what the directory holds.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::client::frame::{BadFrame, Frame};
use cubbyhole::{
    hazmat, Error, IdentityKey, IdentityKeyPair, Incoming, OneTimePrekey, PrekeyBundle,
    PrekeyStore, SafetyNumber, Session, SessionConfig, SignedPrekey,
};
use serde_json::Value;

/// Vector cases that are skipped, by name, with the reason. Empty: every
/// case of every directory checked so far is accepted.
const SKIPPED: &[(&str, &str)] = &[];

fn dir() -> PathBuf {
    std::env::var_os("CUBBYHOLE_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("test-vectors"))
}

fn load(name: &str) -> Value {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["profile"], "cubbyhole/v1", "{name}: profile");
    assert!(
        !v["cases"].as_array().expect("cases").is_empty(),
        "{name}: no cases"
    );
    v
}

/// Like [`load`] for a file outside the profile (no `profile` key): `None`
/// when the directory does not have it.
fn load_optional(name: &str) -> Option<Value> {
    let path = dir().join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    };
    let v: Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(
        !v["cases"].as_array().expect("cases").is_empty(),
        "{name}: no cases"
    );
    Some(v)
}

fn skipped(name: &str) -> bool {
    SKIPPED.iter().any(|(n, _)| *n == name)
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(
        v.as_str()
            .unwrap_or_else(|| panic!("hex string expected, got {v}")),
    )
    .expect("valid hex")
}

fn unhex32(v: &Value) -> [u8; 32] {
    unhex(v).try_into().expect("32 bytes")
}

fn opt_hex32(v: &Value) -> Option<[u8; 32]> {
    (!v.is_null()).then(|| unhex32(v))
}

fn num(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("number expected, got {v}"))
}

fn check_hex(name: &str, field: &str, expected: &Value, actual: &[u8]) {
    assert_eq!(
        hex::encode(actual),
        expected.as_str().unwrap_or("<not a string>"),
        "{name}: field {field}"
    );
}

/// An RNG that yields exactly the bytes it was given, and fails the test if
/// asked for more.
struct FixedRng(VecDeque<u8>);

impl FixedRng {
    fn new(chunks: &[&[u8; 32]]) -> Self {
        FixedRng(chunks.iter().flat_map(|c| c.iter().copied()).collect())
    }
    fn assert_used_up(&self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: the crate drew fewer random bytes than the vector provides \
             (a ratchet_private it did not use)"
        );
    }
}

impl rand_core::RngCore for FixedRng {
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
        for d in dest {
            *d = self.0.pop_front().expect(
                "the crate drew a random byte the vector does not provide \
                 (a ratchet step the vector does not make)",
            );
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl rand_core::CryptoRng for FixedRng {}

/// The keys of an x3dh case (and of the setup of a session case), checked
/// field by field against the case.
struct Setup {
    initiator: IdentityKeyPair,
    responder: IdentityKeyPair,
    signed_prekey: SignedPrekey,
    one_time_prekey: Option<OneTimePrekey>,
    ephemeral: [u8; 32],
    bundle: PrekeyBundle,
}

fn setup(case: &Value) -> Setup {
    let name = case["name"].as_str().expect("name");
    let initiator = IdentityKeyPair::from_seed(&unhex32(&case["initiator_identity_seed"]));
    let responder = IdentityKeyPair::from_seed(&unhex32(&case["responder_identity_seed"]));
    check_hex(
        name,
        "initiator_identity_public",
        &case["initiator_identity_public"],
        initiator.public().as_bytes(),
    );
    check_hex(
        name,
        "responder_identity_public",
        &case["responder_identity_public"],
        responder.public().as_bytes(),
    );
    check_hex(
        name,
        "initiator_identity_x25519_public",
        &case["initiator_identity_x25519_public"],
        initiator.public().x25519_bytes(),
    );
    check_hex(
        name,
        "responder_identity_x25519_public",
        &case["responder_identity_x25519_public"],
        responder.public().x25519_bytes(),
    );
    let signed_prekey = SignedPrekey::from_secret(
        &responder,
        u32::try_from(num(&case["signed_prekey_id"])).expect("u32 id"),
        num(&case["signed_prekey_created"]),
        unhex32(&case["signed_prekey_private"]),
    )
    .expect("time in unix seconds");
    check_hex(
        name,
        "signed_prekey_public",
        &case["signed_prekey_public"],
        signed_prekey.public(),
    );
    check_hex(
        name,
        "signed_prekey_signature",
        &case["signed_prekey_signature"],
        signed_prekey.signature(),
    );
    let one_time_prekey = opt_hex32(&case["one_time_prekey_private"]).map(|secret| {
        OneTimePrekey::from_secret(
            u32::try_from(num(&case["one_time_prekey_id"])).expect("u32 id"),
            secret,
        )
    });
    match &one_time_prekey {
        Some(k) => check_hex(
            name,
            "one_time_prekey_public",
            &case["one_time_prekey_public"],
            k.public(),
        ),
        None => {
            assert!(
                case["one_time_prekey_public"].is_null(),
                "{name}: one_time_prekey_public"
            );
            assert!(
                case["one_time_prekey_id"].is_null(),
                "{name}: one_time_prekey_id"
            );
        }
    }
    let built = PrekeyBundle::new(&responder, &signed_prekey, one_time_prekey.as_ref());
    check_hex(name, "bundle", &case["bundle"], &built.encode());
    let bundle = PrekeyBundle::decode(&unhex(&case["bundle"])).expect("bundle decodes");
    assert_eq!(bundle, built, "{name}: decoded bundle");
    Setup {
        initiator,
        responder,
        signed_prekey,
        one_time_prekey,
        ephemeral: unhex32(&case["initiator_ephemeral_private"]),
        bundle,
    }
}

/// The X3DH values of a case (`dh1`..`dh4`, `shared_secret`,
/// `associated_data`), recomputed on both sides.
fn check_x3dh(name: &str, case: &Value, s: &Setup) {
    let init =
        hazmat::x3dh_initiator(&s.initiator, &s.ephemeral, &s.bundle).expect("initiator X3DH");
    let ephemeral_public = *OneTimePrekey::from_secret(0, s.ephemeral).public();
    let resp = hazmat::x3dh_responder(
        &s.responder,
        &s.signed_prekey,
        s.one_time_prekey.as_ref(),
        s.initiator.public(),
        &ephemeral_public,
    )
    .expect("responder X3DH");
    for v in [&init, &resp] {
        check_hex(name, "dh1", &case["dh1"], v.dh1.as_ref());
        check_hex(name, "dh2", &case["dh2"], v.dh2.as_ref());
        check_hex(name, "dh3", &case["dh3"], v.dh3.as_ref());
        match &v.dh4 {
            Some(dh4) => check_hex(name, "dh4", &case["dh4"], dh4.as_ref()),
            None => assert!(case["dh4"].is_null(), "{name}: dh4"),
        }
        check_hex(
            name,
            "shared_secret",
            &case["shared_secret"],
            v.shared_secret.as_ref(),
        );
        check_hex(
            name,
            "associated_data",
            &case["associated_data"],
            &v.associated_data,
        );
    }
}

fn x3dh_vectors() {
    let file = load("x3dh.json");
    let mut checked = 0;
    for case in file["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        if skipped(name) {
            continue;
        }
        let s = setup(case);
        check_x3dh(name, case, &s);
        // The bundle verifies at its creation time.
        s.bundle
            .clone()
            .verify(s.bundle.signed_prekey_created(), FreshnessPolicy::default())
            .expect("bundle verifies");
        checked += 1;
    }
    eprintln!("x3dh.json: {checked} cases checked");
}

/// One party of a replayed session case.
#[derive(Clone)]
struct Party {
    identity: IdentityKeyPair,
    prekeys: Option<PrekeyStore>,
    session: Option<Session>,
}

impl Party {
    /// Receives a wire message as a device would: a prekey message goes to
    /// the session it belongs to if there is one, else it starts a session
    /// from the prekeys; a normal message goes to the session.
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

    /// Everything a rejected input must leave unchanged.
    fn fingerprint(&self) -> (Option<Vec<u8>>, Option<usize>) {
        (
            self.session.as_ref().map(|s| s.to_bytes().to_vec()),
            self.prekeys
                .as_ref()
                .map(PrekeyStore::one_time_prekey_count),
        )
    }
}

/// A session case replayed event by event.
struct Replay<'a> {
    name: &'a str,
    case: &'a Value,
    parties: BTreeMap<&'static str, Party>,
    wires: Vec<Vec<u8>>,
    delivered: usize,
}

fn role(v: &Value) -> &'static str {
    match v.as_str() {
        Some("initiator") => "initiator",
        Some("responder") => "responder",
        other => panic!("unknown party {other:?}"),
    }
}

impl<'a> Replay<'a> {
    fn new(case: &'a Value) -> Self {
        let name = case["name"].as_str().expect("name");
        let s = setup(case);
        // A session case carries its X3DH values too: checked, not ignored.
        check_x3dh(name, case, &s);
        let messages = case["messages"].as_array().expect("messages");
        assert_eq!(
            role(&messages[0]["sender"]),
            "initiator",
            "{name}: the first message is the initiator's"
        );
        // Session::initiate draws EK_A, then the first ratchet key.
        let first_ratchet = unhex32(&messages[0]["ratchet_private"]);
        let mut rng = FixedRng::new(&[&s.ephemeral, &first_ratchet]);
        let bundle = s
            .bundle
            .clone()
            .verify(s.bundle.signed_prekey_created(), FreshnessPolicy::default())
            .expect("bundle verifies");
        let session = Session::initiate(&mut rng, &s.initiator, &bundle, SessionConfig::default())
            .expect("initiate");
        rng.assert_used_up(name);
        let mut prekeys = PrekeyStore::with_signed_prekey(s.signed_prekey);
        if let Some(k) = s.one_time_prekey {
            prekeys.insert_one_time_prekey(k);
        }
        let mut parties = BTreeMap::new();
        parties.insert(
            "initiator",
            Party {
                identity: s.initiator,
                prekeys: None,
                session: Some(session),
            },
        );
        parties.insert(
            "responder",
            Party {
                identity: s.responder,
                prekeys: Some(prekeys),
                session: None,
            },
        );
        Replay {
            name,
            case,
            parties,
            wires: Vec::new(),
            delivered: 0,
        }
    }

    fn messages(&self) -> &'a [Value] {
        self.case["messages"].as_array().expect("messages")
    }

    fn deliveries(&self) -> &'a [Value] {
        self.case["delivery"].as_array().expect("delivery")
    }

    /// Sends every message whose `after_deliveries` has been reached.
    fn send_due(&mut self) {
        let messages = self.messages();
        while let Some(m) = messages.get(self.wires.len()) {
            let after = num(&m["after_deliveries"]) as usize;
            if after > self.delivered {
                break;
            }
            assert_eq!(
                after, self.delivered,
                "{}: after_deliveries must not decrease",
                self.name
            );
            let i = self.wires.len();
            let sender = self.parties.get_mut(role(&m["sender"])).expect("party");
            let session = sender.session.as_mut().expect("sender has a session");
            let ratchet = opt_hex32(&m["ratchet_private"]).filter(|_| i != 0);
            let mut rng = FixedRng::new(&ratchet.iter().collect::<Vec<_>>());
            let plaintext = unhex(&m["plaintext"]);
            let (wire, mk) = hazmat::encrypt_exposing_message_key(session, &mut rng, &plaintext)
                .unwrap_or_else(|e| panic!("{}: encrypt message {i}: {e}", self.name));
            rng.assert_used_up(&format!("{}: message {i}", self.name));
            check_hex(
                self.name,
                &format!("messages[{i}].message_key"),
                &m["message_key"],
                mk.as_ref(),
            );
            check_hex(self.name, &format!("messages[{i}].wire"), &m["wire"], &wire);
            self.wires.push(wire);
        }
    }

    /// Applies delivery events until `k` have been applied, sending each
    /// message as soon as its `after_deliveries` is reached (and not the
    /// messages due right after event `k`).
    fn run_to(&mut self, k: usize) {
        assert!(
            k <= self.deliveries().len(),
            "{}: after_deliveries {k} out of range",
            self.name
        );
        while self.delivered < k {
            self.send_due();
            let event = &self.deliveries()[self.delivered];
            let index = num(&event["index"]) as usize;
            let receiver = role(&event["receiver"]);
            let m = &self.messages()[index];
            assert_ne!(
                role(&m["sender"]),
                receiver,
                "{}: delivery to the sender",
                self.name
            );
            let wire = self
                .wires
                .get(index)
                .unwrap_or_else(|| {
                    panic!(
                        "{}: message {index} delivered before it was sent",
                        self.name
                    )
                })
                .clone();
            let total = self.deliveries().len();
            let party = self.parties.get_mut(receiver).expect("party");
            let plaintext = party.receive(&wire).unwrap_or_else(|e| {
                panic!(
                    "{}: delivery {} (message {index}): {e:?}",
                    self.name, self.delivered
                )
            });
            check_hex(
                self.name,
                &format!("messages[{index}].plaintext"),
                &m["plaintext"],
                &plaintext,
            );
            self.delivered += 1;
            // The state survives serialization at every step (sampled, to keep
            // the long cases fast).
            if self.delivered % 7 == 0 || self.delivered == total {
                if let Some(s) = party.session.as_mut() {
                    let bytes = s.to_bytes();
                    let restored =
                        Session::from_bytes(&bytes, s.local_identity(), s.remote_identity())
                            .expect("state decodes");
                    assert_eq!(
                        *restored.to_bytes(),
                        *bytes,
                        "{}: state round trip",
                        self.name
                    );
                    *s = restored;
                }
            }
        }
    }

    fn finish(&mut self) {
        let n = self.deliveries().len();
        self.run_to(n);
        self.send_due();
        assert_eq!(
            self.wires.len(),
            self.messages().len(),
            "{}: messages left unsent",
            self.name
        );
    }
}

fn session_vectors() {
    let file = load("session.json");
    let mut checked = 0;
    let mut messages = 0;
    for case in file["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        if skipped(name) {
            continue;
        }
        let mut replay = Replay::new(case);
        replay.finish();
        checked += 1;
        messages += replay.wires.len();
    }
    eprintln!("session.json: {checked} cases, {messages} messages checked");
}

fn error_kind(e: &Error) -> &'static str {
    e.profile_kind()
        .unwrap_or_else(|| panic!("error {e:?} has no profile kind"))
}

fn negative_vectors() {
    let file = load("negative.json");
    let sessions = load("session.json");
    let cases = file["cases"].as_array().expect("cases");
    let session_case = |name: &str| -> &Value {
        sessions["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("session case {name} not in session.json"))
    };

    // Replay each session case once, taking a snapshot of both parties at
    // every point some negative case needs.
    let mut wanted: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for c in cases {
        if matches!(c["kind"].as_str(), Some("message" | "prekey_message")) {
            let sc = c["session_case"].as_str().expect("session_case");
            wanted
                .entry(sc)
                .or_default()
                .push(num(&c["after_deliveries"]) as usize);
        }
    }
    let mut snapshots: BTreeMap<(&str, usize), BTreeMap<&'static str, Party>> = BTreeMap::new();
    for (sc, mut ks) in wanted {
        ks.sort_unstable();
        ks.dedup();
        let mut replay = Replay::new(session_case(sc));
        for k in ks {
            replay.run_to(k);
            snapshots.insert((sc, k), replay.parties.clone());
        }
    }

    let mut checked = 0;
    for c in cases {
        let name = c["name"].as_str().expect("name");
        if skipped(name) {
            continue;
        }
        let expected = c["error"].as_str().expect("error");
        let input = unhex(&c["input"]);
        let result: Result<(), Error> = match c["kind"].as_str() {
            Some("bundle") => PrekeyBundle::decode(&input).and_then(|b| {
                b.verify(num(&c["now"]), FreshnessPolicy::max_age(num(&c["max_age"])))
                    .map(drop)
            }),
            Some("identity_key") => IdentityKey::from_bytes(&input).map(drop),
            Some("message" | "prekey_message") => {
                let sc = c["session_case"].as_str().expect("session_case");
                let k = num(&c["after_deliveries"]) as usize;
                let mut party = snapshots[&(sc, k)][role(&c["receiver"])].clone();
                let before = party.fingerprint();
                let result = party.receive(&input).map(drop);
                assert_eq!(
                    party.fingerprint(),
                    before,
                    "{name}: the rejected input changed the receiver's state"
                );
                result
            }
            other => panic!("{name}: unknown kind {other:?}"),
        };
        match result {
            Ok(()) => panic!("{name}: accepted, expected {expected}"),
            Err(e) => assert_eq!(error_kind(&e), expected, "{name}: error kind ({e:?})"),
        }
        checked += 1;
    }
    eprintln!("negative.json: {checked} cases checked");
}

fn fingerprint_vectors() {
    let file = load("fingerprint.json");
    let mut checked = 0;
    for case in file["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().unwrap_or("fingerprint case");
        if skipped(name) {
            continue;
        }
        let a = IdentityKey::from_bytes(&unhex(&case["identity_a"])).expect("identity_a");
        let b = IdentityKey::from_bytes(&unhex(&case["identity_b"])).expect("identity_b");
        assert_eq!(
            cubbyhole::Fingerprint::of(&a).as_str(),
            case["fingerprint_a"],
            "{name}: fingerprint_a"
        );
        assert_eq!(
            cubbyhole::Fingerprint::of(&b).as_str(),
            case["fingerprint_b"],
            "{name}: fingerprint_b"
        );
        assert_eq!(
            SafetyNumber::new(&a, &b).as_str(),
            case["safety_number"],
            "{name}: safety_number"
        );
        assert_eq!(
            SafetyNumber::new(&b, &a).as_str(),
            case["safety_number"],
            "{name}: symmetric"
        );
        checked += 1;
    }
    eprintln!("fingerprint.json: {checked} cases checked");
}

fn hex16(v: &Value) -> [u8; 16] {
    unhex(v).try_into().expect("16 bytes")
}

fn hex16_list(v: &Value) -> Vec<[u8; 16]> {
    v.as_array()
        .unwrap_or_else(|| panic!("array expected, got {v}"))
        .iter()
        .map(hex16)
        .collect()
}

/// The fields of a valid case of frames.json.
fn frame_fields(case: &Value) -> Frame {
    let message = &case["message"];
    Frame {
        device_id: u32::try_from(num(&case["device_id"])).expect("u32 device_id"),
        generation: (!case["generation"].is_null()).then(|| num(&case["generation"])),
        reset: case["reset"].as_bool().expect("reset"),
        dead: hex16_list(&case["dead"]),
        receipts: hex16_list(&case["receipts"]),
        message: (!message.is_null()).then(|| {
            (
                (!message["id"].is_null()).then(|| hex16(&message["id"])),
                unhex(&message["body"]),
            )
        }),
    }
}

fn frame_vectors() {
    let Some(file) = load_optional("frames.json") else {
        panic!("frames.json: not in {}", dir().display());
    };
    let (mut valid, mut invalid) = (0, 0);
    for case in file["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        if skipped(name) {
            continue;
        }
        let encoding = unhex(&case["encoding"]);
        match case["error"].as_str() {
            None => {
                assert!(case["error"].is_null(), "{name}: error");
                let fields = frame_fields(case);
                assert_eq!(
                    Frame::decode(encoding.clone()).as_ref(),
                    Ok(&fields),
                    "{name}: decode"
                );
                if !case["decode_only"].as_bool().expect("decode_only") {
                    check_hex(name, "encoding", &case["encoding"], &fields.encode());
                }
                valid += 1;
            }
            Some("bad_frame") => {
                assert_eq!(Frame::decode(encoding), Err(BadFrame), "{name}: refused");
                invalid += 1;
            }
            Some(other) => panic!("{name}: unknown error {other:?}"),
        }
    }
    eprintln!("frames.json: {valid} valid and {invalid} invalid cases checked");
}

/// The tests, and which of them this directory can run: a test whose file
/// is missing is reported as ignored, never as passed (`--include-ignored`
/// runs it, and it fails saying what is missing).
fn main() {
    use libtest_mimic::{Arguments, Trial};
    let trial = |name: &'static str, test: fn()| {
        Trial::test(name, move || {
            test();
            Ok(())
        })
    };
    let frames = dir().join("frames.json").exists();
    if !frames {
        eprintln!(
            "note: frame_vectors ignored: no frames.json in {}",
            dir().display()
        );
    }
    let trials = vec![
        trial("x3dh_vectors", x3dh_vectors),
        trial("session_vectors", session_vectors),
        trial("negative_vectors", negative_vectors),
        trial("fingerprint_vectors", fingerprint_vectors),
        trial("frame_vectors", frame_vectors).with_ignored_flag(!frames),
    ];
    libtest_mimic::run(&Arguments::from_args(), trials).exit();
}
