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
    let trials = vec![
        trial("x3dh_vectors", x3dh_vectors),
        trial("session_vectors", session_vectors),
        trial("negative_vectors", negative_vectors),
        trial("fingerprint_vectors", fingerprint_vectors),
        trial("frame_vectors", frame_vectors).with_ignored_flag(!frames),
        trial("device_vectors", device_vectors).with_ignored_flag(!devices),
        trial("every_field_is_checked", every_field_is_checked),
    ];
    libtest_mimic::run(&Arguments::from_args(), trials).exit();
}
