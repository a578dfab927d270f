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
//! given delivery order, and the error kind of every negative case. After
//! each rejected message the receiver's whole state (identity, every
//! prekey, the session, all serialized) must be unchanged, and the rest of
//! its session case is then played to the end from that state.
//!
//! `every_field_is_checked` proves the "every field" claim on the files at
//! hand: each field of each file (by pattern, sampled instances) is changed
//! one at a time, and the case must then fail. A field the test reads
//! without checking, or one it does not know, fails it. The few fields where
//! one changed value may leave the outcome as it was are listed in `LOOSE`
//! with the reason; at least one change of each must still be noticed.
//!
//! `frames.json` holds the crate's client frames (`src/client/frame.rs`),
//! which are not part of the profile: each valid case is decoded and
//! encoded, each invalid one must be refused. A directory without
//! `frames.json` (another implementation's) has that test reported as
//! ignored: the file runs under its own harness (`libtest-mimic`), which
//! decides at run time what the directory holds.
//!
//! `devices.json` holds the device lists of SPEC.md section 25: valid
//! chains, every field rebuilt from the seeds, and refused lists with their
//! error kinds. A directory without it (the interop vectors predate it) has
//! `device_vectors` reported as ignored.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::client::frame::{BadFrame, Frame};
use cubbyhole::devices::{
    AccountId, DeviceEntry, DeviceList, DeviceListChain, DeviceListError, UnsignedDeviceList,
    VerifiedDeviceList,
};
use cubbyhole::transport::AccessKey;
use cubbyhole::{
    hazmat, Error, IdentityKey, IdentityKeyPair, Incoming, OneTimePrekey, PrekeyBundle,
    PrekeyStore, SafetyNumber, Session, SessionConfig, SignedPrekey,
};
use serde_json::Value;
use zeroize::Zeroizing;

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

/// The cases of a file that are not skipped.
fn cases(file: &Value) -> impl Iterator<Item = &Value> {
    file["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| !skipped(c["name"].as_str().unwrap_or("")))
}

fn x3dh_case(case: &Value) {
    let name = case["name"].as_str().expect("name");
    let s = setup(case);
    check_x3dh(name, case, &s);
    // The bundle verifies at its creation time.
    s.bundle
        .clone()
        .verify(s.bundle.signed_prekey_created(), FreshnessPolicy::default())
        .expect("bundle verifies");
}

fn x3dh_vectors() {
    let file = load("x3dh.json");
    let checked = cases(&file).inspect(|c| x3dh_case(c)).count();
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

    /// Everything a rejected input must leave unchanged: the whole state
    /// of the party, serialized (identity seed, every prekey with its
    /// secret, the session with its chains and skipped keys).
    fn state(&self) -> PartyState {
        PartyState {
            identity: self.identity.seed(),
            prekeys: self.prekeys.as_ref().map(PrekeyStore::to_bytes),
            session: self.session.as_ref().map(Session::to_bytes),
        }
    }
}

/// A party's whole state, serialized ([`Party::state`]).
#[derive(PartialEq, Eq)]
struct PartyState {
    identity: Zeroizing<[u8; 32]>,
    prekeys: Option<Zeroizing<Vec<u8>>>,
    session: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for PartyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = |b: &Option<Zeroizing<Vec<u8>>>| b.as_ref().map(|b| hex::encode(&b[..]));
        f.debug_struct("PartyState")
            .field("identity", &hex::encode(&self.identity[..]))
            .field("prekeys", &hex(&self.prekeys))
            .field("session", &hex(&self.session))
            .finish()
    }
}

/// A session case replayed event by event.
#[derive(Clone)]
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

/// Replays a session case to its end; returns the number of messages.
fn session_case(case: &Value) -> usize {
    let mut replay = Replay::new(case);
    replay.finish();
    replay.wires.len()
}

fn session_vectors() {
    let file = load("session.json");
    let (mut checked, mut messages) = (0, 0);
    for case in cases(&file) {
        messages += session_case(case);
        checked += 1;
    }
    eprintln!("session.json: {checked} cases, {messages} messages checked");
}

fn error_kind(e: &Error) -> &'static str {
    e.profile_kind()
        .unwrap_or_else(|| panic!("error {e:?} has no profile kind"))
}

/// Replays of the session cases of session.json, stopped at the points
/// negative cases need (each session case is replayed once for all its
/// points; a point not prepared is replayed on demand).
struct Snapshots<'a> {
    sessions: &'a Value,
    at: BTreeMap<(String, usize), Replay<'a>>,
}

impl<'a> Snapshots<'a> {
    fn new(sessions: &'a Value) -> Self {
        Snapshots {
            sessions,
            at: BTreeMap::new(),
        }
    }

    fn session_case(&self, name: &str) -> &'a Value {
        self.sessions["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("session case {name} not in session.json"))
    }

    /// Prepares every point the negative cases of `file` need.
    fn prepare(&mut self, file: &Value) {
        let mut wanted: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for c in cases(file) {
            if matches!(c["kind"].as_str(), Some("message" | "prekey_message")) {
                let sc = c["session_case"].as_str().expect("session_case");
                wanted
                    .entry(sc)
                    .or_default()
                    .push(num(&c["after_deliveries"]) as usize);
            }
        }
        for (sc, mut ks) in wanted {
            ks.sort_unstable();
            ks.dedup();
            let mut replay = Replay::new(self.session_case(sc));
            for k in ks {
                replay.run_to(k);
                self.at.insert((sc.to_owned(), k), replay.clone());
            }
        }
    }

    /// The replay of session case `sc` after `k` deliveries.
    fn get(&self, sc: &str, k: usize) -> Replay<'a> {
        if let Some(replay) = self.at.get(&(sc.to_owned(), k)) {
            return replay.clone();
        }
        let mut replay = Replay::new(self.session_case(sc));
        replay.run_to(k);
        replay
    }
}

fn negative_case(c: &Value, snapshots: &Snapshots<'_>) {
    let name = c["name"].as_str().expect("name");
    let expected = c["error"].as_str().expect("error");
    let input = unhex(&c["input"]);
    let mut rest = None;
    let result: Result<(), Error> = match c["kind"].as_str() {
        Some("bundle") => PrekeyBundle::decode(&input).and_then(|b| {
            b.verify(num(&c["now"]), FreshnessPolicy::max_age(num(&c["max_age"])))
                .map(drop)
        }),
        Some("identity_key") => IdentityKey::from_bytes(&input).map(drop),
        Some("message" | "prekey_message") => {
            let sc = c["session_case"].as_str().expect("session_case");
            let k = num(&c["after_deliveries"]) as usize;
            let mut replay = snapshots.get(sc, k);
            let party = replay.parties.get_mut(role(&c["receiver"])).expect("party");
            let before = party.state();
            let result = party.receive(&input).map(drop);
            assert_eq!(
                party.state(),
                before,
                "{name}: the rejected input changed the receiver's state"
            );
            rest = Some(replay);
            result
        }
        other => panic!("{name}: unknown kind {other:?}"),
    };
    match result {
        Ok(()) => panic!("{name}: accepted, expected {expected}"),
        Err(e) => assert_eq!(error_kind(&e), expected, "{name}: error kind ({e:?})"),
    }
    // The receiver goes on as if the input had never come: the rest of the
    // session case plays out to the last byte.
    if let Some(mut replay) = rest {
        replay.finish();
    }
}

fn negative_vectors() {
    let file = load("negative.json");
    let sessions = load("session.json");
    let mut snapshots = Snapshots::new(&sessions);
    snapshots.prepare(&file);
    let checked = cases(&file)
        .inspect(|c| negative_case(c, &snapshots))
        .count();
    let played = cases(&file)
        .filter(|c| c.get("session_case").is_some())
        .count();
    eprintln!(
        "negative.json: {checked} cases checked; after each of the {played} rejected \
         messages the receiver's whole state was unchanged and the rest of its \
         session case played out"
    );
}

fn fingerprint_case(case: &Value) {
    let name = case["name"].as_str().unwrap_or("fingerprint case");
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
}

fn fingerprint_vectors() {
    let file = load("fingerprint.json");
    let checked = cases(&file).inspect(|c| fingerprint_case(c)).count();
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
        access: (!case["access"].is_null()).then(|| {
            let epoch = u32::try_from(num(&case["access"]["epoch"])).expect("u32 epoch");
            (epoch, AccessKey::from_bytes(hex16(&case["access"]["key"])))
        }),
        inbox: (!case["inbox"].is_null()).then(|| {
            let bytes = hex::decode(case["inbox"]["mailbox"].as_str().expect("inbox mailbox"))
                .expect("hex inbox");
            (
                <[u8; 32]>::try_from(bytes.as_slice()).expect("32-byte inbox"),
                AccessKey::from_bytes(hex16(&case["inbox"]["key"])),
            )
        }),
        receipts: hex16_list(&case["receipts"]),
        message: (!message.is_null()).then(|| {
            (
                (!message["id"].is_null()).then(|| hex16(&message["id"])),
                unhex(&message["body"]),
            )
        }),
    }
}

/// Checks one case of frames.json; true if it is a valid frame.
fn frame_case(case: &Value) -> bool {
    let name = case["name"].as_str().expect("name");
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
            true
        }
        Some("bad_frame") => {
            assert_eq!(Frame::decode(encoding), Err(BadFrame), "{name}: refused");
            false
        }
        Some(other) => panic!("{name}: unknown error {other:?}"),
    }
}

fn frame_vectors() {
    let Some(file) = load_optional("frames.json") else {
        panic!("frames.json: not in {}", dir().display());
    };
    let (mut valid, mut invalid) = (0, 0);
    for case in cases(&file) {
        if frame_case(case) {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    eprintln!("frames.json: {valid} valid and {invalid} invalid cases checked");
}

/// `SHA-256(label || body)`, written out from SPEC.md 25.3 (not through
/// the crate).
fn device_list_hash(body: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::new()
        .chain_update(b"cubbyhole/v1 device list hash")
        .chain_update(body)
        .finalize()
        .into()
}

/// Checks a valid chain of devices.json: every step rebuilt from its seeds
/// and device numbers, byte for byte, and verified.
fn device_chain_case(name: &str, case: &Value) {
    let steps = case["steps"].as_array().expect("steps");
    assert!(!steps.is_empty(), "{name}: no steps");
    let mut head: Option<VerifiedDeviceList> = None;
    let mut account: Option<AccountId> = None;
    for (i, step) in steps.iter().enumerate() {
        let what = format!("{name} step {i}");
        let mut entries = Vec::new();
        let mut keys = Vec::new();
        for d in step["devices"].as_array().expect("devices") {
            let key = IdentityKeyPair::from_seed(&unhex32(&d["seed"]));
            check_hex(&what, "identity", &d["identity"], key.public().as_bytes());
            entries.push(DeviceEntry {
                identity: *key.public(),
                device_id: u32::try_from(num(&d["device_id"])).expect("u32 device_id"),
            });
            keys.push(key);
        }
        let account_id = *account.get_or_insert_with(|| {
            assert_eq!(entries.len(), 1, "{what}: a first version lists one device");
            AccountId::of_founder(&entries[0].identity)
        });
        check_hex(
            &what,
            "account_id",
            &step["account_id"],
            account_id.as_bytes(),
        );
        let previous = head
            .as_ref()
            .map_or([0; 32], |h| device_list_hash(h.body()));
        check_hex(&what, "previous", &step["previous"], &previous);
        let version = num(&step["version"]);
        let mut unsigned = UnsignedDeviceList::new(account_id, version, previous, &entries)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        check_hex(&what, "body", &step["body"], unsigned.body());
        check_hex(
            &what,
            "body_hash",
            &step["body_hash"],
            &device_list_hash(unsigned.body()),
        );
        for s in step["signers"].as_array().expect("signers") {
            let signer = keys.get(num(s) as usize).expect("signer index");
            unsigned
                .sign(signer)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        let list = unsigned.into_list().expect("signed");
        let order: Vec<_> = list.devices().iter().map(|d| d.identity).collect();
        let given: Vec<_> = entries.iter().map(|d| d.identity).collect();
        assert_eq!(order, given, "{what}: devices not in the list's order");
        let signatures = step["signatures"].as_array().expect("signatures");
        assert_eq!(
            signatures.len(),
            list.signatures().len(),
            "{what}: signatures"
        );
        for (s, (index, signature)) in signatures.iter().zip(list.signatures()) {
            assert_eq!(
                num(&s["index"]),
                u64::from(*index),
                "{what}: signature index"
            );
            check_hex(&what, "signature", &s["signature"], signature);
        }
        let signed = unhex(&step["signed"]);
        check_hex(&what, "signed", &step["signed"], &list.encode());
        assert_eq!(
            DeviceList::decode(&signed).as_ref(),
            Ok(&list),
            "{what}: decode"
        );
        let verified = match &head {
            None => list.verify_genesis(),
            Some(h) => list.verify_successor(h),
        };
        head = Some(verified.unwrap_or_else(|e| panic!("{what}: refused: {e}")));
    }
    let account = account.expect("an account");
    let peer = AccountId(unhex32(&case["peer_account_id"]));
    assert_eq!(
        cubbyhole::Fingerprint::of_account(&account).as_str(),
        case["account_fingerprint"],
        "{name}: account_fingerprint"
    );
    assert_eq!(
        cubbyhole::Fingerprint::of_account(&peer).as_str(),
        case["peer_fingerprint"],
        "{name}: peer_fingerprint"
    );
    for (x, y) in [(&account, &peer), (&peer, &account)] {
        assert_eq!(
            SafetyNumber::for_accounts(x, y).as_str(),
            case["account_safety_number"],
            "{name}: account_safety_number"
        );
    }
}

/// Checks one case of devices.json.
fn device_case(case: &Value) {
    let name = case["name"].as_str().expect("name");
    if case["error"].is_null() {
        return device_chain_case(name, case);
    }
    let expected = case["error"].as_str().expect("error");
    let decode =
        |v: &Value| DeviceList::decode(&unhex(v)).unwrap_or_else(|e| panic!("{name}: decode: {e}"));
    let mut head: Option<VerifiedDeviceList> = None;
    for list in case["known"].as_array().expect("known") {
        let list = decode(list);
        let verified = match &head {
            None => list.verify_genesis(),
            Some(h) => list.verify_successor(h),
        };
        head = Some(verified.unwrap_or_else(|e| panic!("{name}: known list refused: {e}")));
    }
    let got: DeviceListError = match case["check"].as_str().expect("check") {
        "decode" => DeviceList::decode(&unhex(&case["input"]))
            .err()
            .unwrap_or_else(|| panic!("{name}: decode: accepted, expected {expected}")),
        "genesis" => decode(&case["input"])
            .verify_genesis()
            .err()
            .unwrap_or_else(|| panic!("{name}: genesis: accepted, expected {expected}")),
        "successor" => decode(&case["input"])
            .verify_successor(head.as_ref().expect("successor: known is empty"))
            .err()
            .unwrap_or_else(|| panic!("{name}: successor: accepted, expected {expected}")),
        "chain" => {
            let offered: Vec<DeviceList> = case["offered"]
                .as_array()
                .expect("offered")
                .iter()
                .map(decode)
                .collect();
            DeviceListChain::accept(head.as_ref(), &offered)
                .err()
                .unwrap_or_else(|| panic!("{name}: chain: accepted, expected {expected}"))
        }
        other => panic!("{name}: unknown check {other:?}"),
    };
    assert_eq!(got.profile_kind(), expected, "{name}: error kind");
    if let DeviceListError::Conflict { ours, theirs } = &got {
        check_hex(
            name,
            "conflict_ours",
            &case["conflict_ours"],
            &ours.encode(),
        );
        check_hex(
            name,
            "conflict_theirs",
            &case["conflict_theirs"],
            &theirs.encode(),
        );
    } else {
        assert!(
            case["conflict_ours"].is_null(),
            "{name}: evidence without a conflict"
        );
        assert!(
            case["conflict_theirs"].is_null(),
            "{name}: evidence without a conflict"
        );
    }
}

fn device_vectors() {
    let Some(file) = load_optional("devices.json") else {
        panic!("devices.json: not in {}", dir().display());
    };
    assert_eq!(file["profile"], "cubbyhole/v1", "devices.json: profile");
    let (mut valid, mut refused) = (0, 0);
    for case in cases(&file) {
        device_case(case);
        if case["error"].is_null() {
            valid += 1;
        } else {
            refused += 1;
        }
    }
    assert!(
        valid > 0 && refused > 0,
        "devices.json: valid and refused cases"
    );
    eprintln!("devices.json: {valid} valid chains and {refused} refused lists checked");
}

/// Fields that are names or prose: no check can depend on them.
const FREE_TEXT: &[&str] = &["name", "description", "generator"];

/// Fields where one changed value may legitimately leave the outcome as it
/// was, with the reason: for these, at least one of the sampled changes
/// must be noticed (for every other field, every sampled change must be).
const LOOSE: &[(&str, &str, &str)] = &[
    (
        "frames.json",
        "decode_only",
        "false -> true only skips the re-encoding check; true -> false is noticed",
    ),
    (
        "frames.json",
        "encoding",
        "a refused encoding with one more bit flipped is still refused",
    ),
    (
        "session.json",
        "delivery[].index",
        "in cases that drop messages, the next index may be another message never \
         delivered, which decrypts as well",
    ),
    (
        "devices.json",
        "input",
        "a refused list with one more bit flipped is often refused for the same reason",
    ),
    (
        "devices.json",
        "offered[]",
        "a refused list with one more bit flipped is often refused for the same reason",
    ),
    (
        "sealed.json",
        "classes[].length",
        "every length up to 512 has the class 512",
    ),
    (
        "sealed.json",
        "messages[].envelope_id",
        "a sealed prekey message's id is 16 random bytes, fed to the crate and given back; \
         a chain message's (its tag) is recomputed",
    ),
    (
        "sealed.json",
        "receiver",
        "an envelope rejected by its format is rejected the same way by either party",
    ),
    (
        "sealed.json",
        "payload",
        "a rejected envelope with one more bit flipped is often rejected for the same reason",
    ),
    (
        "sealed.json",
        "after_deliveries",
        "the same bad envelope is often rejected the same way one delivery later",
    ),
    (
        "sealed.json",
        "envelope_id",
        "the id of a sealed prekey message is not looked at, and a chain message's \
         unexpected id stays unexpected with one more bit flipped",
    ),
    (
        "negative.json",
        "input",
        "a rejected input with one more bit flipped is often rejected for the same reason",
    ),
    (
        "negative.json",
        "after_deliveries",
        "the same bad input is often rejected the same way one delivery later",
    ),
    (
        "negative.json",
        "receiver",
        "an input rejected by its format is rejected the same way by either party",
    ),
    (
        "negative.json",
        "now",
        "a bundle that fails an earlier check (format, signature) never reaches the \
         freshness check",
    ),
    (
        "negative.json",
        "max_age",
        "a bundle that fails an earlier check (format, signature) never reaches the \
         freshness check",
    ),
];

/// A leaf of a case: its pattern (`messages[].wire`) and its JSON pointer
/// (`/messages/3/wire`).
fn leaves(v: &Value, pattern: &str, pointer: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if pattern.is_empty() {
                    k.clone()
                } else {
                    format!("{pattern}.{k}")
                };
                leaves(x, &p, &format!("{pointer}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                leaves(x, &format!("{pattern}[]"), &format!("{pointer}/{i}"), out);
            }
        }
        Value::Null => {}
        _ => out.push((pattern.to_owned(), pointer.to_owned())),
    }
}

/// Changed copies of a leaf value: [`mutated`], and for a number also
/// minus one, zero and half (a bound like `now` may need a big step to
/// cross).
fn mutations(v: &Value) -> Vec<Value> {
    let mut all = vec![mutated(v)];
    if let Some(n) = v.as_u64() {
        all.extend([n.saturating_sub(1), 0, n / 2].map(Value::from));
        all.retain(|m| m != v);
    }
    all
}

/// A changed copy of a leaf value: a hex string with one bit flipped in its
/// middle byte (not a bit X25519 clamps away), a party swapped, any other
/// string with its last character changed, a number plus one, a boolean
/// negated.
fn mutated(v: &Value) -> Value {
    match v {
        Value::String(t) if t == "initiator" => "responder".into(),
        Value::String(t) if t == "responder" => "initiator".into(),
        Value::String(t) if !t.is_empty() && t.len() % 2 == 0 && hex::decode(t).is_ok() => {
            let mut b = hex::decode(t).expect("hex");
            let mid = b.len() / 2;
            b[mid] ^= 0x01;
            hex::encode(b).into()
        }
        Value::String(t) => {
            let mut t = t.clone();
            let last = t.pop().unwrap_or('x');
            t.push(match last.to_digit(10) {
                Some(d) => char::from_digit((d + 1) % 10, 10).expect("digit"),
                None if last == 'x' => 'y',
                None => 'x',
            });
            t.into()
        }
        Value::Number(n) => (n.as_u64().expect("unsigned") + 1).into(),
        Value::Bool(b) => (!b).into(),
        other => panic!("not a leaf: {other}"),
    }
}

thread_local! {
    /// Panics on this thread are expected and not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether `check` fails (panics) on `case`, without printing the panic.
fn fails(check: &dyn Fn(&Value), case: &Value) -> bool {
    QUIET.with(|q| q.set(true));
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(case))).is_err();
    QUIET.with(|q| q.set(false));
    failed
}

/// Samples of a field's instances: the first, middle and last, or (for a
/// loose field) up to 24 spread over all of them.
fn samples<T: Clone>(all: &[T], loose: bool) -> Vec<T> {
    let n = all.len();
    let want = if loose { 24 } else { 3 };
    let mut idx: Vec<usize> = (0..want.min(n))
        .map(|i| i * (n - 1) / (want.min(n) - 1).max(1))
        .collect();
    idx.dedup();
    idx.into_iter().map(|i| all[i].clone()).collect()
}

/// The check of one case of a file (panics if the case fails).
type CaseCheck<'a> = Box<dyn Fn(&Value) + 'a>;

/// Every field of every vector file is checked: for each field (by pattern),
/// sampled instances are changed one at a time and the case must then fail
/// its check. A field the test reads but does not check, or a field it does
/// not know, is reported.
fn every_field_is_checked() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !QUIET.with(|q| q.get()) {
            default_hook(info);
        }
    }));
    let sessions = load("session.json");
    let negative = load("negative.json");
    let mut snapshots = Snapshots::new(&sessions);
    snapshots.prepare(&negative);
    let x3dh = load("x3dh.json");
    let fingerprint = load("fingerprint.json");
    let frames = load_optional("frames.json");
    let devices = load_optional("devices.json");
    let sealed = load_optional("sealed.json");
    let mut files: Vec<(&str, &Value, CaseCheck<'_>)> = vec![
        ("x3dh.json", &x3dh, Box::new(x3dh_case)),
        ("fingerprint.json", &fingerprint, Box::new(fingerprint_case)),
        (
            "session.json",
            &sessions,
            Box::new(|c| {
                session_case(c);
            }),
        ),
        (
            "negative.json",
            &negative,
            Box::new(|c| negative_case(c, &snapshots)),
        ),
    ];
    if let Some(frames) = &frames {
        files.push((
            "frames.json",
            frames,
            Box::new(|c| {
                frame_case(c);
            }),
        ));
    }
    if let Some(devices) = &devices {
        files.push(("devices.json", devices, Box::new(device_case)));
    }
    if let Some(sealed) = &sealed {
        files.push((
            "sealed.json",
            sealed,
            Box::new(move |c| sealed_case(c, sealed)),
        ));
    }

    let mut unchecked = Vec::new();
    let (mut tried, mut noticed_all) = (0, 0);
    for (file_name, file, check) in &files {
        // Every instance of every field, by pattern.
        let mut fields: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
        for (i, case) in cases(file).enumerate() {
            let mut out = Vec::new();
            leaves(case, "", "", &mut out);
            for (pattern, pointer) in out {
                fields.entry(pattern).or_default().push((i, pointer));
            }
        }
        let all: Vec<&Value> = cases(file).collect();
        for (pattern, instances) in fields {
            if FREE_TEXT.contains(&pattern.as_str()) {
                continue;
            }
            let loose = LOOSE
                .iter()
                .any(|(f, p, _)| f == file_name && *p == pattern);
            let mut noticed = 0;
            let picked = samples(&instances, loose);
            'instances: for (i, pointer) in &picked {
                let original = all[*i].pointer(pointer).expect("leaf");
                let changes = if loose {
                    mutations(original)
                } else {
                    vec![mutated(original)]
                };
                for change in changes {
                    let mut case = all[*i].clone();
                    *case.pointer_mut(pointer).expect("leaf") = change;
                    tried += 1;
                    if fails(&**check, &case) {
                        noticed += 1;
                        noticed_all += 1;
                        if loose {
                            break 'instances;
                        }
                    } else if !loose {
                        unchecked.push(format!(
                            "{file_name}: {pattern} (case {:?}, {pointer}) changed, still passes",
                            all[*i]["name"].as_str().unwrap_or("?")
                        ));
                    }
                }
            }
            if loose && noticed == 0 {
                unchecked.push(format!(
                    "{file_name}: {pattern}: none of {} changes noticed",
                    picked.len()
                ));
            }
        }
    }
    assert!(
        unchecked.is_empty(),
        "fields not checked:\n{}",
        unchecked.join("\n")
    );
    eprintln!(
        "{tried} changed fields tried, {noticed_all} noticed: every sampled change of \
         every strict field, and at least one of each loose field ({} loose)",
        LOOSE.len()
    );
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
    let devices = dir().join("devices.json").exists();
    if !devices {
        eprintln!(
            "note: device_vectors ignored: no devices.json in {}",
            dir().display()
        );
    }
    let sealed = dir().join("sealed.json").exists();
    if !sealed {
        eprintln!(
            "note: sealed_vectors ignored: no sealed.json in {}",
            dir().display()
        );
    }
    let trials = vec![
        trial("x3dh_vectors", x3dh_vectors),
        trial("session_vectors", session_vectors),
        trial("negative_vectors", negative_vectors),
        trial("fingerprint_vectors", fingerprint_vectors),
        trial("frame_vectors", frame_vectors).with_ignored_flag(!frames),
        trial("device_vectors", device_vectors).with_ignored_flag(!devices),
        trial("sealed_vectors", sealed_vectors).with_ignored_flag(!sealed),
        trial("every_field_is_checked", every_field_is_checked),
    ];
    libtest_mimic::run(&Arguments::from_args(), trials).exit();
}

// ------------------------------------------------------------ sealed.json

/// The routing window of the replay (SPEC 26.6's default).
const V2_WINDOW: u32 = 32;

/// Profile v2's primitives, written out here from SPEC.md with hmac, hkdf,
/// sha2, aes-gcm, x25519-dalek and ed25519-dalek: nothing of
/// `cubbyhole::sealed`, so no expected value is computed by the code under
/// test.
mod v2 {
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
    pub fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
        let mut okm = vec![0u8; len];
        hkdf::Hkdf::<Sha256>::new(Some(salt), ikm)
            .expand(info, &mut okm)
            .expect("length");
        okm
    }
    /// AES-256-GCM: ciphertext || tag.
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
        x25519(private, &x25519_dalek::X25519_BASEPOINT_BYTES)
    }
    /// An identity key's X25519 private scalar (SPEC 2.1).
    pub fn identity_x25519_private(seed: &[u8; 32]) -> [u8; 32] {
        use sha2::Digest;
        let digest = sha2::Sha512::digest(seed);
        let mut k: [u8; 32] = digest[..32].try_into().expect("32");
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        k
    }
    pub fn header_key(rk: &[u8]) -> [u8; 32] {
        hmac(rk, &[b"cubbyhole/v2 header key"])
    }
    pub fn tag(hk: &[u8], n: u32) -> Vec<u8> {
        hmac(hk, &[b"cubbyhole/v2 tag", &n.to_be_bytes()])[..16].to_vec()
    }
    pub fn header_aead_key(hk: &[u8], n: u32) -> [u8; 32] {
        hmac(hk, &[b"cubbyhole/v2 header", &n.to_be_bytes()])
    }
    /// PADMÉ (SPEC 26), with the floor of 512, by counting bits.
    pub fn size_class(len: u64) -> u64 {
        if len <= 512 {
            return 512;
        }
        let log2 = |x: u64| 63 - u64::from(x.leading_zeros());
        let e = log2(len);
        let s = log2(e) + 1;
        let low = e - s;
        len.div_ceil(1 << low) << low
    }
}

/// An RNG that yields the given bytes (any lengths) and fails the test if
/// asked for more.
fn fixed_bytes(bytes: Vec<u8>) -> FixedRng {
    FixedRng(bytes.into())
}

fn v2_error_kind(e: &Error) -> &'static str {
    match e {
        Error::SessionMismatch => "session_mismatch",
        e => error_kind(e),
    }
}

fn sealed_header_keys_case(case: &Value) {
    let name = case["name"].as_str().expect("name");
    let hk = v2::header_key(&unhex(&case["root_key"]));
    check_hex(name, "header_key", &case["header_key"], &hk);
    let tags = case["tags"].as_array().expect("tags");
    assert!(!tags.is_empty(), "{name}: tags");
    for t in tags {
        let n = u32::try_from(num(&t["n"])).expect("u32 n");
        check_hex(name, &format!("tags[{n}].tag"), &t["tag"], &v2::tag(&hk, n));
        check_hex(
            name,
            &format!("tags[{n}].header_aead_key"),
            &t["header_aead_key"],
            &v2::header_aead_key(&hk, n),
        );
    }
}

fn sealed_padding_case(case: &Value) {
    let name = case["name"].as_str().expect("name");
    for c in case["classes"].as_array().expect("classes") {
        let len = num(&c["length"]);
        assert_eq!(
            num(&c["class"]),
            v2::size_class(len),
            "{name}: class of {len}"
        );
        // The crate agrees.
        assert_eq!(
            cubbyhole::sealed::size_class(len as usize) as u64,
            num(&c["class"]),
            "{name}: the crate's class of {len}"
        );
    }
    for p in case["padding"].as_array().expect("padding") {
        let (overhead, len) = (num(&p["overhead"]), num(&p["plaintext_length"]));
        assert!(
            [74, 177, 181].contains(&overhead),
            "{name}: overhead {overhead} is none of the profile's"
        );
        let payload = v2::size_class(overhead + len + 1);
        assert_eq!(num(&p["payload_length"]), payload, "{name}: payload_length");
        assert_eq!(
            num(&p["padding_length"]),
            payload - overhead - len,
            "{name}: padding_length"
        );
        assert_eq!(
            cubbyhole::sealed::padding_len(overhead as usize, len as usize) as u64,
            num(&p["padding_length"]),
            "{name}: the crate's padding_length"
        );
    }
}

/// The sending side of the conversation recomputed from the primitives,
/// field by field (nothing of the crate).
fn sealed_conversation_primitives(case: &Value) {
    let name = case["name"].as_str().expect("name");
    let chk = |field: &str, v: &Value, actual: &[u8]| check_hex(name, field, v, actual);
    let seed_a = unhex32(&case["initiator_identity_seed"]);
    let seed_b = unhex32(&case["responder_identity_seed"]);
    let sign_b = ed25519_dalek::SigningKey::from_bytes(&seed_b);
    let ik_a = ed25519_dalek::SigningKey::from_bytes(&seed_a)
        .verifying_key()
        .to_bytes();
    let ik_b = sign_b.verifying_key().to_bytes();
    chk(
        "initiator_identity_public",
        &case["initiator_identity_public"],
        &ik_a,
    );
    chk(
        "responder_identity_public",
        &case["responder_identity_public"],
        &ik_b,
    );
    let xa = v2::identity_x25519_private(&seed_a);
    let xb = v2::identity_x25519_private(&seed_b);
    chk(
        "initiator_identity_x25519_public",
        &case["initiator_identity_x25519_public"],
        &v2::x25519_public(&xa),
    );
    chk(
        "responder_identity_x25519_public",
        &case["responder_identity_x25519_public"],
        &v2::x25519_public(&xb),
    );
    let spk = unhex32(&case["signed_prekey_private"]);
    let spk_pub = v2::x25519_public(&spk);
    chk(
        "signed_prekey_public",
        &case["signed_prekey_public"],
        &spk_pub,
    );
    let spk_id = u32::try_from(num(&case["signed_prekey_id"])).expect("u32");
    let signed = [
        &b"cubbyhole/v1 signed prekey"[..],
        &spk_id.to_be_bytes(),
        &num(&case["signed_prekey_created"]).to_be_bytes(),
        &spk_pub,
    ]
    .concat();
    use ed25519_dalek::Signer;
    chk(
        "signed_prekey_signature",
        &case["signed_prekey_signature"],
        &sign_b.sign(&signed).to_bytes(),
    );
    let opk = unhex32(&case["one_time_prekey_private"]);
    let opk_pub = v2::x25519_public(&opk);
    chk(
        "one_time_prekey_public",
        &case["one_time_prekey_public"],
        &opk_pub,
    );
    let opk_id = u32::try_from(num(&case["one_time_prekey_id"])).expect("u32");
    let ek = unhex32(&case["initiator_ephemeral_private"]);
    let ek_pub = v2::x25519_public(&ek);
    chk(
        "initiator_ephemeral_public",
        &case["initiator_ephemeral_public"],
        &ek_pub,
    );
    // X3DH, from both sides.
    let dhs = [
        (
            v2::x25519(&xa, &spk_pub),
            v2::x25519(&spk, &v2::x25519_public(&xa)),
        ),
        (
            v2::x25519(&ek, &v2::x25519_public(&xb)),
            v2::x25519(&xb, &ek_pub),
        ),
        (v2::x25519(&ek, &spk_pub), v2::x25519(&spk, &ek_pub)),
        (v2::x25519(&ek, &opk_pub), v2::x25519(&opk, &ek_pub)),
    ];
    let mut ikm = vec![0xff; 32];
    for (i, (a, b)) in dhs.iter().enumerate() {
        assert_eq!(a, b, "{name}: dh{} differs between the sides", i + 1);
        chk(&format!("dh{}", i + 1), &case[format!("dh{}", i + 1)], a);
        ikm.extend_from_slice(a);
    }
    let sk = v2::hkdf(&[0; 32], &ikm, b"cubbyhole/v1 x3dh", 32);
    chk("shared_secret", &case["shared_secret"], &sk);
    let ad = [ik_a, ik_b].concat();
    chk("associated_data", &case["associated_data"], &ad);

    // The messages, in sending order: the ratchet of both sides.
    let deliveries = case["delivery"].as_array().expect("delivery");
    let mut rk: Vec<u8> = sk;
    let mut last_chain: Option<(&str, [u8; 32])> = None;
    // Per sender: (public, next chain key, next n, HK, pn).
    type Chain = ([u8; 32], [u8; 32], u32, [u8; 32], u32);
    let mut chains: BTreeMap<&str, Chain> = BTreeMap::new();
    let mut privates: BTreeMap<[u8; 32], [u8; 32]> = BTreeMap::new();
    privates.insert(spk_pub, spk);
    for (i, m) in case["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .enumerate()
    {
        let f = |field: &str| format!("messages[{i}].{field}");
        let sender = role(&m["sender"]);
        let after = num(&m["after_deliveries"]) as usize;
        let prekey = sender == "initiator"
            && !deliveries[..after.min(deliveries.len())]
                .iter()
                .any(|d| role(&d["receiver"]) == "initiator");
        assert_eq!(
            m["kind"],
            if prekey { "sealed_prekey" } else { "chain" },
            "{name}: {}",
            f("kind")
        );
        if last_chain.is_none_or(|(who, _)| who != sender) {
            // A DH ratchet step: this message starts the sender's next chain.
            let private = unhex32(&m["ratchet_private"]);
            let public = v2::x25519_public(&private);
            let peer = last_chain.map_or(spk_pub, |(_, p)| p);
            let dh = v2::x25519(&private, &peer);
            assert_eq!(
                dh,
                v2::x25519(&privates[&peer], &public),
                "{name}: {}",
                f("ratchet_dh")
            );
            chk(&f("root_key_in"), &m["root_key_in"], &rk);
            chk(&f("ratchet_dh"), &m["ratchet_dh"], &dh);
            let okm = v2::hkdf(&rk, &dh, b"cubbyhole/v1 root", 64);
            chk(&f("root_key_out"), &m["root_key_out"], &okm[..32]);
            let hk = v2::header_key(&rk);
            let pn = chains.get(sender).map_or(0, |c| c.2);
            chains.insert(
                sender,
                (public, okm[32..].try_into().expect("32"), 0, hk, pn),
            );
            privates.insert(public, private);
            last_chain = Some((sender, public));
            rk = okm[..32].to_vec();
        } else {
            for field in [
                "ratchet_private",
                "root_key_in",
                "ratchet_dh",
                "root_key_out",
            ] {
                assert!(
                    m[field].is_null(),
                    "{name}: {} in a running chain",
                    f(field)
                );
            }
        }
        let chain = chains.get_mut(sender).expect("chain");
        let (public, ck, n, hk, pn) = *chain;
        let mk = v2::hmac(&ck, &[&[0x01]]);
        chain.1 = v2::hmac(&ck, &[&[0x02]]);
        chain.2 += 1;
        assert_eq!(num(&m["n"]), u64::from(n), "{name}: {}", f("n"));
        assert_eq!(num(&m["pn"]), u64::from(pn), "{name}: {}", f("pn"));
        chk(&f("ratchet_public"), &m["ratchet_public"], &public);
        let header = [&public[..], &pn.to_be_bytes(), &n.to_be_bytes()].concat();
        chk(&f("header"), &m["header"], &header);
        chk(&f("header_key"), &m["header_key"], &hk);
        chk(&f("chain_key"), &m["chain_key"], &ck);
        chk(&f("message_key"), &m["message_key"], &mk);
        let keys = v2::hkdf(&[0; 32], &mk, b"cubbyhole/v1 message", 44);
        chk(&f("message_aes_key"), &m["message_aes_key"], &keys[..32]);
        chk(&f("message_nonce"), &m["message_nonce"], &keys[32..]);
        let plaintext = unhex(&m["plaintext"]);
        let overhead: u64 = if prekey { 181 } else { 74 };
        let plen = plaintext.len() as u64;
        let padding = v2::size_class(overhead + plen + 1) - overhead - plen;
        assert_eq!(
            num(&m["padding_length"]),
            padding,
            "{name}: {}",
            f("padding_length")
        );
        let mut padded = plaintext.clone();
        padded.push(0x80);
        padded.resize((plen + padding) as usize, 0);
        let id = unhex(&m["envelope_id"]);
        assert_eq!(id.len(), 16, "{name}: {}", f("envelope_id"));
        let payload = if prekey {
            let prefix = [
                &[0x02, 0x03][..],
                &ik_a,
                &ek_pub,
                &spk_id.to_be_bytes(),
                &[0x01],
                &opk_id.to_be_bytes(),
                &header,
            ]
            .concat();
            let aad = [&ad[..], &prefix].concat();
            chk(&f("aead_associated_data"), &m["aead_associated_data"], &aad);
            let body = v2::aead(&keys[..32], &keys[32..], &aad, &padded);
            chk(&f("body"), &m["body"], &body);
            let inner = [prefix, body].concat();
            chk(&f("inner"), &m["inner"], &inner);
            let e = unhex32(&m["seal_ephemeral_private"]);
            let e_pub = v2::x25519_public(&e);
            chk(
                &f("seal_ephemeral_public"),
                &m["seal_ephemeral_public"],
                &e_pub,
            );
            let sdh = v2::x25519(&e, &spk_pub);
            assert_eq!(sdh, v2::x25519(&spk, &e_pub), "{name}: {}", f("seal_dh"));
            chk(&f("seal_dh"), &m["seal_dh"], &sdh);
            let info = [&b"cubbyhole/v2 seal"[..], &e_pub, &spk_pub].concat();
            let okm = v2::hkdf(&[0; 32], &sdh, &info, 44);
            chk(&f("seal_key"), &m["seal_key"], &okm[..32]);
            chk(&f("seal_nonce"), &m["seal_nonce"], &okm[32..]);
            let sealed = v2::aead(
                &okm[..32],
                &okm[32..],
                &[&[0x02, 0x01][..], &e_pub].concat(),
                &inner,
            );
            [&[0x02, 0x01][..], &e_pub, &sealed].concat()
        } else {
            let aad = [&ad[..], &[0x02, 0x02], &header].concat();
            chk(&f("aead_associated_data"), &m["aead_associated_data"], &aad);
            let body = v2::aead(&keys[..32], &keys[32..], &aad, &padded);
            chk(&f("body"), &m["body"], &body);
            chk(&f("envelope_id"), &m["envelope_id"], &v2::tag(&hk, n));
            let hkey = v2::header_aead_key(&hk, n);
            chk(&f("header_aead_key"), &m["header_aead_key"], &hkey);
            let eh = v2::aead(&hkey, &[0; 12], &[&[0x02, 0x02][..], &id].concat(), &header);
            chk(&f("encrypted_header"), &m["encrypted_header"], &eh);
            [&[0x02, 0x02][..], &eh, &body].concat()
        };
        assert_eq!(
            payload.len() as u64,
            v2::size_class(payload.len() as u64),
            "{name}: {} is not a size class",
            f("payload")
        );
        chk(&f("payload"), &m["payload"], &payload);
    }
}

/// The conversation of sealed.json played through the crate's API: the
/// listed random bytes fed to it, every envelope compared byte for byte,
/// every delivery opened in the listed order.
#[derive(Clone)]
struct V2Replay<'a> {
    name: &'a str,
    case: &'a Value,
    alice: IdentityKeyPair,
    bob: IdentityKeyPair,
    alice_session: Session,
    bob_prekeys: PrekeyStore,
    bob_session: Option<Session>,
    sent: Vec<([u8; 16], Vec<u8>)>,
    delivered: usize,
}

impl<'a> V2Replay<'a> {
    fn new(case: &'a Value) -> Self {
        let name = case["name"].as_str().expect("name");
        let s = setup_v2(case);
        let messages = case["messages"].as_array().expect("messages");
        let first = unhex32(&messages[0]["ratchet_private"]);
        let mut rng = FixedRng::new(&[&s.ephemeral, &first]);
        let bundle = s
            .bundle
            .clone()
            .verify(s.bundle.signed_prekey_created(), FreshnessPolicy::default())
            .expect("bundle verifies");
        let alice_session =
            Session::initiate_sealed(&mut rng, &s.initiator, &bundle, SessionConfig::default())
                .expect("initiate_sealed");
        rng.assert_used_up(name);
        let mut bob_prekeys = PrekeyStore::with_signed_prekey(s.signed_prekey);
        if let Some(k) = s.one_time_prekey {
            bob_prekeys.insert_one_time_prekey(k);
        }
        V2Replay {
            name,
            case,
            alice: s.initiator,
            bob: s.responder,
            alice_session,
            bob_prekeys,
            bob_session: None,
            sent: Vec::new(),
            delivered: 0,
        }
    }

    fn session(&mut self, who: &str) -> Option<&mut Session> {
        match who {
            "initiator" => Some(&mut self.alice_session),
            _ => self.bob_session.as_mut(),
        }
    }

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

    fn receive_chain(
        &mut self,
        who: &str,
        id: &[u8; 16],
        payload: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let s = self.session(who).ok_or(Error::SessionMismatch)?;
        let mut out = Vec::new();
        s.open(id, payload, V2_WINDOW, &mut out)?;
        Ok(out)
    }

    /// Both parties' whole state, serialized.
    fn state(&self) -> Vec<u8> {
        let mut all = self.alice.seed().to_vec();
        all.extend_from_slice(&self.bob.seed()[..]);
        all.extend_from_slice(&self.alice_session.to_bytes());
        all.extend_from_slice(&self.bob_prekeys.to_bytes());
        if let Some(s) = &self.bob_session {
            all.extend_from_slice(&s.to_bytes());
        }
        all
    }

    fn send_due(&mut self) {
        let messages = self.case["messages"].as_array().expect("messages");
        while let Some(m) = messages.get(self.sent.len()) {
            let after = num(&m["after_deliveries"]) as usize;
            if after > self.delivered {
                break;
            }
            assert_eq!(
                after, self.delivered,
                "{}: after_deliveries must not decrease",
                self.name
            );
            let i = self.sent.len();
            let mut draws = Vec::new();
            if i != 0 {
                if let Some(k) = opt_hex32(&m["ratchet_private"]) {
                    draws.extend_from_slice(&k);
                }
            }
            if m["kind"] == "sealed_prekey" {
                draws.extend_from_slice(&unhex32(&m["seal_ephemeral_private"]));
                draws.extend_from_slice(&hex16(&m["envelope_id"]));
            }
            let mut rng = fixed_bytes(draws);
            let plaintext = unhex(&m["plaintext"]);
            let name = self.name;
            let sealed = self
                .session(role(&m["sender"]))
                .expect("the sender has a session")
                .seal(&mut rng, &plaintext)
                .unwrap_or_else(|e| panic!("{name}: seal message {i}: {e}"));
            rng.assert_used_up(&format!("{name}: message {i}"));
            check_hex(
                name,
                &format!("messages[{i}].envelope_id"),
                &m["envelope_id"],
                &sealed.id,
            );
            check_hex(
                name,
                &format!("messages[{i}].payload"),
                &m["payload"],
                &sealed.payload,
            );
            self.sent.push((sealed.id, sealed.payload));
        }
    }

    /// Applies delivery events until `k` have been applied, then sends
    /// what is due.
    fn run_to(&mut self, k: usize) {
        let deliveries = self.case["delivery"].as_array().expect("delivery");
        assert!(
            k <= deliveries.len(),
            "{}: after_deliveries {k} out of range",
            self.name
        );
        self.send_due();
        while self.delivered < k {
            let event = &deliveries[self.delivered];
            let index = num(&event["index"]) as usize;
            let receiver = role(&event["receiver"]);
            let m = &self.case["messages"][index];
            assert_ne!(
                role(&m["sender"]),
                receiver,
                "{}: delivery to the sender",
                self.name
            );
            let (id, payload) = self.sent.get(index).cloned().unwrap_or_else(|| {
                panic!(
                    "{}: message {index} delivered before it was sent",
                    self.name
                )
            });
            let name = self.name;
            let got = if m["kind"] == "sealed_prekey" {
                assert_eq!(
                    receiver, "responder",
                    "{name}: sealed prekey messages go to Bob"
                );
                self.receive_sealed_prekey(&payload)
            } else {
                let expected = self
                    .session(receiver)
                    .map(|s| s.routing_tags(V2_WINDOW).contains(&id));
                assert_eq!(
                    expected,
                    Some(true),
                    "{name}: message {index}: its tag is not expected"
                );
                self.receive_chain(receiver, &id, &payload)
            }
            .unwrap_or_else(|e| {
                panic!(
                    "{name}: delivery {} (message {index}): {e:?}",
                    self.delivered
                )
            });
            check_hex(
                name,
                &format!("messages[{index}].plaintext"),
                &m["plaintext"],
                &got,
            );
            self.delivered += 1;
            self.send_due();
        }
    }

    fn finish(&mut self) {
        let n = self.case["delivery"].as_array().expect("delivery").len();
        self.run_to(n);
        assert_eq!(
            self.sent.len(),
            self.case["messages"].as_array().expect("messages").len(),
            "{}: messages left unsent",
            self.name
        );
    }
}

/// The keys of the conversation, built by the crate from the listed
/// private keys (their public halves are checked from the primitives in
/// [`sealed_conversation_primitives`]; the crate must agree).
fn setup_v2(case: &Value) -> Setup {
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
    let signed_prekey = SignedPrekey::from_secret(
        &responder,
        u32::try_from(num(&case["signed_prekey_id"])).expect("u32 id"),
        num(&case["signed_prekey_created"]),
        unhex32(&case["signed_prekey_private"]),
    )
    .expect("time in unix seconds");
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
    let bundle = PrekeyBundle::new(&responder, &signed_prekey, one_time_prekey.as_ref());
    Setup {
        initiator,
        responder,
        signed_prekey,
        one_time_prekey,
        ephemeral: unhex32(&case["initiator_ephemeral_private"]),
        bundle,
    }
}

fn sealed_conversation_case(case: &Value) {
    sealed_conversation_primitives(case);
    V2Replay::new(case).finish();
}

/// A rejected envelope: the conversation replayed to `after_deliveries`,
/// the envelope given to `receiver`, the error kind compared, both
/// parties' states unchanged, and the rest of the conversation played out.
fn sealed_negative_case(c: &Value, conversation: &Value) {
    let name = c["name"].as_str().expect("name");
    assert_eq!(
        c["conversation"], conversation["name"],
        "{name}: conversation"
    );
    let expected = c["error"].as_str().expect("error");
    let payload = unhex(&c["payload"]);
    let id = hex16(&c["envelope_id"]);
    let mut replay = V2Replay::new(conversation);
    replay.run_to(num(&c["after_deliveries"]) as usize);
    let before = replay.state();
    let receiver = role(&c["receiver"]);
    let result = match c["envelope"].as_str() {
        Some("sealed_prekey") => {
            assert_eq!(
                receiver, "responder",
                "{name}: sealed prekey messages go to Bob"
            );
            replay.receive_sealed_prekey(&payload)
        }
        Some("chain") => replay.receive_chain(receiver, &id, &payload),
        other => panic!("{name}: unknown envelope {other:?}"),
    };
    match result {
        Ok(_) => panic!("{name}: accepted, expected {expected}"),
        Err(e) => assert_eq!(v2_error_kind(&e), expected, "{name}: error kind ({e:?})"),
    }
    assert!(
        replay.state() == before,
        "{name}: the rejected envelope changed a state"
    );
    replay.finish();
}

fn sealed_case(case: &Value, file: &Value) {
    match case["kind"].as_str() {
        Some("header_keys") => sealed_header_keys_case(case),
        Some("padding") => sealed_padding_case(case),
        Some("conversation") => sealed_conversation_case(case),
        Some("negative") => {
            let conversation = cases(file)
                .find(|c| c["kind"] == "conversation" && c["name"] == case["conversation"])
                .unwrap_or_else(|| panic!("{}: no such conversation", case["name"]));
            sealed_negative_case(case, conversation)
        }
        other => panic!("unknown sealed.json case kind {other:?}"),
    }
}

fn sealed_vectors() {
    let Some(file) = load_optional("sealed.json") else {
        panic!("sealed.json: not in {}", dir().display());
    };
    assert_eq!(file["profile"], "cubbyhole/v2", "sealed.json: profile");
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for case in cases(&file) {
        sealed_case(case, &file);
        *kinds
            .entry(case["kind"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    for kind in ["header_keys", "padding", "conversation", "negative"] {
        assert!(kinds.contains_key(kind), "sealed.json: no {kind} case");
    }
    eprintln!("sealed.json: cases checked by kind: {kinds:?}");
}
