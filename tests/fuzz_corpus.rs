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
