//! Replays every checked-in fuzz corpus file (`fuzz/corpus/<target>/*`)
//! through the target's logic, on the stable compiler, without libFuzzer or
//! sanitizers. The targets' bodies live in `fuzz/src/targets.rs`.
//!
//! A missing or empty corpus directory fails the test. To regenerate the seed
//! files (after a change of the wire or state encoding), run
//!
//! ```text
//! cargo test --test fuzz_corpus -- --ignored regenerate_seed_corpus
//! ```
//!
//! which rewrites the `seed-*` files and leaves every other file (inputs
//! found by the fuzzer, crash reproducers) alone.

#[path = "../fuzz/src/targets.rs"]
mod targets;

/// The decoder targets check that allocation stays bounded by the input's
/// size; the metering allocator makes the replay check it too.
#[global_allocator]
static ALLOCATOR: targets::MeteredAllocator = targets::MeteredAllocator;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target)
}

fn replay(target: &str) {
    let dir = corpus_dir(target);
    let entries = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );
    let mut failed = Vec::new();
    for file in &files {
        let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            data.len() < 8192,
            "{}: corpus files stay under 8 KiB",
            file.display()
        );
        if catch_unwind(AssertUnwindSafe(|| targets::run(target, &data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: failing corpus files: {failed:#?}"
    );
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The checked-in corpus files that are meant to stop at their target's
/// decoder: `(target, file name, the decoder's error as Debug prints it)`.
/// Every other file must get past the decoder (`Reach::Decoded`), so a
/// seed gone stale (an encoding changed under it, and it now exercises only
/// an early decode error) fails `seeds_reach_past_their_decoders`.
const INTENDED_DECODE_ERRORS: &[(&str, &str, &str)] = &[
    ("decode_incoming", "seed-empty", "Decode(\"version\")"),
    (
        "decode_incoming",
        "seed-message-short-by-one",
        "Decode(\"tag\")",
    ),
    ("decode_incoming", "seed-unknown-kind", "Decode(\"kind\")"),
    (
        "decode_incoming",
        "seed-unknown-version",
        "Decode(\"version\")",
    ),
    ("decode_incoming", "seed-version-only", "Decode(\"kind\")"),
    ("decode_bundle", "seed-empty", "Decode(\"bundle version\")"),
    (
        "decode_bundle",
        "seed-trailing-byte",
        "Decode(\"bundle trailing bytes\")",
    ),
    (
        "decode_bundle",
        "seed-unknown-version",
        "Decode(\"bundle version\")",
    ),
    (
        "decode_bundle",
        "seed-version-only",
        "Decode(\"bundle identity key\")",
    ),
    (
        "decode_state",
        "seed-bob-truncated",
        "State(\"state skipped key count\")",
    ),
    ("decode_state", "seed-empty", "State(\"state version\")"),
    (
        "decode_state",
        "seed-unknown-version",
        "State(\"state flags\")",
    ),
    (
        "decode_state",
        "seed-version-only",
        "State(\"state version\")",
    ),
    ("decrypt_session", "seed-empty", "Decode(\"version\")"),
    (
        "decrypt_session",
        "seed-message-short-by-one",
        "Decode(\"tag\")",
    ),
    ("decrypt_session", "seed-unknown-kind", "Decode(\"kind\")"),
    (
        "decrypt_session",
        "seed-unknown-version",
        "Decode(\"version\")",
    ),
    ("decrypt_session", "seed-version-only", "Decode(\"kind\")"),
    ("accept_prekey", "seed-empty", "Decode(\"version\")"),
    (
        "accept_prekey",
        "seed-message-short-by-one",
        "Decode(\"tag\")",
    ),
    ("accept_prekey", "seed-unknown-kind", "Decode(\"kind\")"),
    (
        "accept_prekey",
        "seed-unknown-version",
        "Decode(\"version\")",
    ),
    ("accept_prekey", "seed-version-only", "Decode(\"kind\")"),
    ("two_party", "seed-empty", "no operations"),
    ("decode_prekeys", "seed-empty", "State(\"prekeys version\")"),
    (
        "decode_prekeys",
        "seed-huge-signed-count",
        "State(\"prekeys signed count\")",
    ),
    (
        "decode_prekeys",
        "seed-no-signed-prekey",
        "State(\"prekeys signed count\")",
    ),
    (
        "decode_prekeys",
        "seed-one-time-repeated",
        "State(\"prekeys one-time order\")",
    ),
    (
        "decode_prekeys",
        "seed-one-time-unsorted",
        "State(\"prekeys one-time order\")",
    ),
    (
        "decode_prekeys",
        "seed-trailing-byte",
        "State(\"prekeys trailing bytes\")",
    ),
    (
        "decode_prekeys",
        "seed-truncated",
        "State(\"prekeys one-time count\")",
    ),
    (
        "decode_prekey_state",
        "seed-bad-pending-flag",
        "State(\"prekey state\")",
    ),
    (
        "decode_prekey_state",
        "seed-empty",
        "State(\"prekey state\")",
    ),
    (
        "decode_prekey_state",
        "seed-huge-list-count",
        "State(\"prekey state\")",
    ),
    (
        "decode_prekey_state",
        "seed-truncated",
        "State(\"prekeys one-time count\")",
    ),
    (
        "decode_prekey_state",
        "seed-version-1",
        "State(\"prekey state\")",
    ),
    (
        "decode_identity",
        "seed-empty",
        "State(\"local identity length\")",
    ),
    (
        "decode_identity",
        "seed-long",
        "State(\"local identity length\")",
    ),
    (
        "decode_identity",
        "seed-short",
        "State(\"local identity length\")",
    ),
    ("decode_upload", "seed-bad-signature", "Unauthorized"),
    ("decode_upload", "seed-bad-signed-prekey", "Unauthorized"),
    (
        "decode_upload",
        "seed-count-overrun",
        "BadRequest(\"upload length\")",
    ),
    (
        "decode_upload",
        "seed-truncated",
        "BadRequest(\"upload length\")",
    ),
    (
        "decode_mailbox_auth",
        "seed-bad-op",
        "BadRequest(\"auth op\")",
    ),
    (
        "decode_mailbox_auth",
        "seed-truncated",
        "BadRequest(\"auth\")",
    ),
    (
        "decode_envelope",
        "seed-bad-version",
        "BadRequest(\"envelope version\")",
    ),
    (
        "decode_envelope",
        "seed-short-id",
        "BadRequest(\"envelope id\")",
    ),
    (
        "decode_envelope_list",
        "seed-length-overrun",
        "BadRequest(\"envelope list length\")",
    ),
    (
        "decode_envelope_list",
        "seed-short-length",
        "BadRequest(\"envelope list length\")",
    ),
    (
        "decode_envelope_list",
        "seed-truncated",
        "BadRequest(\"envelope list length\")",
    ),
    (
        "decode_envelope_list",
        "seed-zero-length",
        "BadRequest(\"envelope version\")",
    ),
    (
        "decode_acknowledge",
        "seed-bad-op",
        "BadRequest(\"auth op\")",
    ),
    (
        "decode_acknowledge",
        "seed-count-mismatch",
        "BadRequest(\"acknowledgement: the id count does not match the body length\")",
    ),
    (
        "decode_acknowledge",
        "seed-proof-only",
        "BadRequest(\"acknowledgement: expected proof (133) || count (2) || ids\")",
    ),
    (
        "decode_fetch_query",
        "seed-eleven-digits",
        "BadRequest(\"limit: expected a decimal u32\")",
    ),
    (
        "decode_fetch_query",
        "seed-empty-value",
        "BadRequest(\"limit: expected a decimal u32\")",
    ),
    (
        "decode_fetch_query",
        "seed-negative",
        "BadRequest(\"wait_ms: expected a decimal u32\")",
    ),
    (
        "decode_fetch_query",
        "seed-no-equals",
        "BadRequest(\"wait_ms: expected a decimal u32\")",
    ),
    ("decode_fetch_query", "seed-not-utf8", "not UTF-8"),
    (
        "decode_fetch_query",
        "seed-overflow",
        "BadRequest(\"limit: expected a decimal u32\")",
    ),
    (
        "decode_fetch_query",
        "seed-plus",
        "BadRequest(\"limit: expected a decimal u32\")",
    ),
    ("decode_frame", "seed-zero-count", "BadFrame"),
    (
        "decode_record",
        "seed-truncated",
        "State(\"session record\")",
    ),
    ("decode_device_list", "seed-empty", "Malformed"),
    ("decode_device_list", "seed-truncated", "Malformed"),
    ("decode_device_list", "seed-trailing-byte", "Malformed"),
    ("decode_device_list", "seed-zero-count", "Malformed"),
    ("decode_device_list", "seed-keys-unsorted", "Malformed"),
    ("decode_device_list", "seed-version-zero", "Malformed"),
    (
        "decode_device_list",
        "seed-signature-index-out-of-range",
        "Malformed",
    ),
    ("decode_account_header", "seed-short-by-one", "None"),
    ("decode_account_header", "seed-bad-magic", "None"),
    ("decode_account_header", "seed-kind-0", "None"),
    ("decode_account_header", "seed-kind-3", "None"),
    ("decode_account_header", "seed-empty", "None"),
    ("decode_pairing_message", "seed-trailing-byte", "Malformed"),
    (
        "decode_pairing_message",
        "seed-account-mismatch",
        "Malformed",
    ),
    ("decode_pairing_message", "seed-bad-trust", "Malformed"),
    (
        "decode_pairing_message",
        "seed-count-without-contacts",
        "Malformed",
    ),
    (
        "decode_pairing_message",
        "seed-too-many-contacts",
        "Malformed",
    ),
    (
        "decode_pairing_message",
        "seed-list-length-overrun",
        "Malformed",
    ),
    (
        "decode_pairing_message",
        "seed-account-message",
        "Malformed",
    ),
    // Found by cargo-fuzz: a contact count with too few bytes behind it made
    // the decoder reserve room for every contact (src/client/pairing.rs).
    (
        "decode_pairing_message",
        "crash-contact-count-allocation",
        "Malformed",
    ),
    ("decode_pairing_offer", "seed-short", "Length(52)"),
    ("decode_pairing_offer", "seed-long", "Length(54)"),
    ("decode_pairing_offer", "seed-format-2", "Format(2)"),
    ("decode_pairing_offer", "seed-bad-key", "IdentityKey"),
    ("decode_pairing_offer", "seed-empty", "Length(0)"),
];

/// Every corpus file reaches past its target's decoder, or is listed in
/// [`INTENDED_DECODE_ERRORS`] with the error it gets; and every listed
/// file exists and gets exactly that error.
#[test]
fn seeds_reach_past_their_decoders() {
    let mut problems = Vec::new();
    let mut listed_seen = Vec::new();
    for target in targets::TARGETS {
        let (mut decoded, mut refused) = (0, 0);
        for file in corpus_files(target) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let data = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let reach = targets::run(target, &data);
            let listed = INTENDED_DECODE_ERRORS
                .iter()
                .find(|(t, f, _)| *t == target && *f == name);
            match (&reach, listed) {
                (targets::Reach::Decoded, None) => decoded += 1,
                (targets::Reach::Rejected(error), Some((_, _, expected))) if error == expected => {
                    refused += 1;
                    listed_seen.push((target, name.to_string()));
                }
                (targets::Reach::Rejected(error), None) => problems.push(format!(
                    "{target}/{name}: stopped at the decoder with {error} (a stale seed? \
                     regenerate it, or list it as intended)"
                )),
                (reach, Some((_, _, expected))) => {
                    listed_seen.push((target, name.to_string()));
                    problems.push(format!(
                        "{target}/{name}: listed as refused with {expected}, got {reach:?}"
                    ))
                }
            }
        }
        assert!(decoded > 0, "{target}: no seed gets past the decoder");
        let _ = refused;
    }
    for (target, name, _) in INTENDED_DECODE_ERRORS {
        if !listed_seen.iter().any(|(t, n)| t == target && n == name) {
            problems.push(format!("{target}/{name}: listed, but no such corpus file"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn targets_match_fuzz_crate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    let manifest = fs::read_to_string(dir.join("../Cargo.toml")).expect("fuzz/Cargo.toml");
    for target in targets::TARGETS {
        assert!(
            manifest.contains(&format!(
                "name = \"{target}\"\npath = \"fuzz_targets/{target}.rs\""
            )),
            "fuzz/Cargo.toml has no [[bin]] for {target}"
        );
        let shim = dir.join(format!("{target}.rs"));
        let text = fs::read_to_string(&shim).unwrap_or_else(|e| panic!("{}: {e}", shim.display()));
        assert!(
            text.contains(&format!("targets::{target}(data)")),
            "{} does not call targets::{target}",
            shim.display()
        );
    }
}

#[test]
fn decode_incoming() {
    replay("decode_incoming");
}

#[test]
fn sealed() {
    replay("sealed");
}

#[test]
fn decode_bundle() {
    replay("decode_bundle");
}

#[test]
fn decode_state() {
    replay("decode_state");
}

#[test]
fn decrypt_session() {
    replay("decrypt_session");
}

#[test]
fn accept_prekey() {
    replay("accept_prekey");
}

#[test]
fn two_party() {
    replay("two_party");
}

#[test]
fn decode_prekeys() {
    replay("decode_prekeys");
}

#[test]
fn decode_prekey_state() {
    replay("decode_prekey_state");
}

#[test]
fn decode_identity() {
    replay("decode_identity");
}

#[test]
fn decode_frame() {
    replay("decode_frame");
}

#[test]
fn decode_record() {
    replay("decode_record");
}

#[test]
fn decode_upload() {
    replay("decode_upload");
}

#[test]
fn decode_mailbox_auth() {
    replay("decode_mailbox_auth");
}

#[test]
fn decode_envelope() {
    replay("decode_envelope");
}

#[test]
fn decode_envelope_list() {
    replay("decode_envelope_list");
}

#[test]
fn decode_acknowledge() {
    replay("decode_acknowledge");
}

#[test]
fn decode_fetch_query() {
    replay("decode_fetch_query");
}

#[test]
fn decode_device_list() {
    replay("decode_device_list");
}

#[test]
fn device_list_chain() {
    replay("device_list_chain");
}

#[test]
fn decode_account_header() {
    replay("decode_account_header");
}

#[test]
fn decode_pairing_message() {
    replay("decode_pairing_message");
}

#[test]
fn decode_pairing_offer() {
    replay("decode_pairing_offer");
}

/// The allocation bounds of the decoder targets are checked in this
/// replay: the metering allocator is installed and sees allocations.
#[test]
fn allocation_meter_is_installed() {
    let (buffer, stats) = targets::measure(|| Vec::<u8>::with_capacity(100_000));
    drop(buffer);
    let stats = stats.expect("the metering allocator is installed");
    assert_eq!(stats.largest, 100_000);
    assert!(stats.largest > targets::max_allocation(4096));
    let (_, nothing) = targets::measure(|| ());
    assert_eq!(nothing.map(|s| s.total), Some(0));
}

/// Every target has a replay test above (the list is kept by hand).
#[test]
fn every_target_is_replayed() {
    let source = include_str!("fuzz_corpus.rs");
    for target in targets::TARGETS {
        assert!(
            source.contains(&format!("replay(\"{target}\")")),
            "no replay test for {target}"
        );
    }
}

/// The fixtures the seeds are built from are deterministic: building the
/// seed corpus twice gives the same bytes.
#[test]
fn seed_corpus_is_deterministic() {
    let a = targets::seed_corpus();
    let b = targets::seed_corpus();
    assert_eq!(a, b);
    for target in targets::TARGETS {
        assert!(
            a.iter().filter(|(t, _, _)| *t == target).count() >= 3,
            "{target}: too few seeds"
        );
    }
}

#[test]
#[ignore = "rewrites fuzz/corpus/*/seed-*: CUBBYHOLE_REGENERATE_CORPUS=1 cargo test --test fuzz_corpus -- --ignored regenerate_seed_corpus"]
fn regenerate_seed_corpus() {
    // `--include-ignored` must not rewrite checked-in files by accident.
    assert!(
        std::env::var_os("CUBBYHOLE_REGENERATE_CORPUS").is_some_and(|v| v == "1"),
        "regenerate_seed_corpus rewrites the checked-in seeds: run it with \
         CUBBYHOLE_REGENERATE_CORPUS=1"
    );
    for target in targets::TARGETS {
        let dir = corpus_dir(target);
        fs::create_dir_all(&dir).expect("create corpus directory");
        for entry in fs::read_dir(&dir).expect("read corpus directory") {
            let path = entry.expect("entry").path();
            let is_seed = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"));
            if is_seed {
                fs::remove_file(&path).expect("remove old seed");
            }
        }
    }
    for (target, name, bytes) in targets::seed_corpus() {
        targets::run(target, &bytes);
        fs::write(corpus_dir(target).join(format!("seed-{name}")), bytes).expect("write seed");
    }
}
