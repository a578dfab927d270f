//! The benchmark report: each protocol step's median beside the sum of the
//! floor operations it performs, and the ratio of the two; the skip
//! linearity check; the backlog rates. Reads criterion's results, it runs
//! nothing itself:
//!
//! ```text
//! scripts/bench-report.sh                   # runs the benches, then this
//! cargo run --example bench_report          # the table from the last runs
//! cargo run --example bench_report -- --since 1700000000 --dir DIR [--dir DIR2 ...]
//! ```
//!
//! Every figure is criterion's median (`median.point_estimate`, in ns, of
//! `<dir>/**/new/estimates.json`), found by the `full_id` of the
//! `benchmark.json` beside it. `<dir>` is `$CARGO_TARGET_DIR/criterion`,
//! else `target/criterion` of this workspace. Given several `--dir` (copies
//! of the results of several passes, as `scripts/bench-report.sh --passes N`
//! makes), a bench's figure is the median of its medians over the
//! directories that hold it, and the range column shows the lowest and
//! highest of them. With `--since SECS` (unix time), results written before
//! it are marked stale. The output is a Markdown table (BENCHMARKS.md holds
//! one).
//!
//! # The floor of each step
//!
//! A step's floor is the sum of the medians of the `floor/*` benches (the
//! primitives called directly on x25519-dalek, ed25519-dalek, hkdf, hmac,
//! sha2 and aes-gcm) for the operations the step's code really performs, as
//! read in `src/protocol/` (the comment on each bench in `benches/protocol.rs`
//! says the same). The terms:
//!
//! | term | floor bench | what it is |
//! |---|---|---|
//! | KG | `x25519_keygen` | 32 random bytes, clamping, one fixed-base scalar multiplication |
//! | DH | `x25519_dh` | one variable-base X25519 |
//! | VERIFY | `ed25519_verify_strict_70B` | verify_strict of the 70-byte signed prekey message, key decoded |
//! | DECOMPRESS | `ed25519_decompress` | Ed25519 point decompression (`VerifyingKey::from_bytes`) |
//! | MONT | `ed25519_to_montgomery` | Edwards to Montgomery u (one field inversion): X25519 with the identity key |
//! | HKDF(L) | `hkdf_sha256/L` | HKDF-SHA-256, 32-byte ikm and salt, L = 32, 44, 64 bytes |
//! | HKDF(32, ikm N) | `hkdf_sha256_ikmN/32` | X3DH's SK: ikm of 128 (no OPK) or 160 bytes (OPK) |
//! | KDF_CK | `hmac_sha256_1B_pair` | one chain step: one HMAC key setup, the MACs of 0x01 and 0x02 |
//! | SEAL(n), OPEN(n) | `aes256gcm_seal/n`, `aes256gcm_open/n` | AES-256-GCM with its key setup, 106-byte AAD |
//!
//! Decoding an identity key (every bundle, first prekey message and session
//! state) is DECOMPRESS + MONT: the profile's identity keys are Ed25519 keys
//! also used for X25519 (SPEC.md 2.4), so a minimal implementation pays both
//! too. KDF_CK is `hmac_sha256_1B_pair`, not two `hmac_sha256_1B`, because
//! the ratchet computes the two MACs from one keyed state (the ipad and opad
//! blocks are hashed once); counting two full HMACs would credit a chain step
//! with two SHA-256 blocks it never computes. A message key expansion is
//! HKDF(44) (SPEC.md 5.1, `keys(mk)`); a root step KDF_RK is HKDF(64).
//!
//! Not in any floor, so part of the "overhead" a ratio shows: parsing and
//! encoding, the AAD copy, allocations (the output `Vec`, boxed skipped keys),
//! zeroizing, the small-order check of a decoded identity key (three point
//! doublings) and, for a first message, the AAD being 175 or 179 bytes
//! instead of 106 (a few GHASH blocks).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

const KG: &str = "floor/x25519_keygen";
const DH: &str = "floor/x25519_dh";
const VERIFY: &str = "floor/ed25519_verify_strict_70B";
const DECOMPRESS: &str = "floor/ed25519_decompress";
const MONT: &str = "floor/ed25519_to_montgomery";
const HKDF44: &str = "floor/hkdf_sha256/44";
const HKDF64: &str = "floor/hkdf_sha256/64";
const HKDF_IKM128: &str = "floor/hkdf_sha256_ikm128/32";
const HKDF_IKM160: &str = "floor/hkdf_sha256_ikm160/32";
const KDF_CK: &str = "floor/hmac_sha256_1B_pair";
const SEAL64: &str = "floor/aes256gcm_seal/64";
const SEAL1K: &str = "floor/aes256gcm_seal/1024";
const SEAL16K: &str = "floor/aes256gcm_seal/16384";
const OPEN64: &str = "floor/aes256gcm_open/64";
const OPEN1K: &str = "floor/aes256gcm_open/1024";
const OPEN16K: &str = "floor/aes256gcm_open/16384";

/// The floor benches, in the order they are listed.
const FLOOR: &[(&str, &str)] = &[
    (KG, "KG"),
    (DH, "DH"),
    (VERIFY, "VERIFY"),
    (DECOMPRESS, "DECOMPRESS"),
    (MONT, "MONT"),
    ("floor/hkdf_sha256/32", "HKDF(32)"),
    (HKDF44, "HKDF(44)"),
    (HKDF64, "HKDF(64)"),
    (HKDF_IKM128, "HKDF(32, ikm 128)"),
    (HKDF_IKM160, "HKDF(32, ikm 160)"),
    ("floor/hmac_sha256_1B", "HMAC(1 B)"),
    (KDF_CK, "KDF_CK"),
    (SEAL64, "SEAL(64)"),
    (SEAL1K, "SEAL(1 KiB)"),
    (SEAL16K, "SEAL(16 KiB)"),
    (OPEN64, "OPEN(64)"),
    (OPEN1K, "OPEN(1 KiB)"),
    (OPEN16K, "OPEN(16 KiB)"),
];

/// A protocol step: its bench, the floor operations it performs (count,
/// floor bench) and the issue's target for its ratio, if any.
struct Step {
    id: &'static str,
    floor: &'static [(u32, &'static str)],
    target: Option<f64>,
}

const fn step(
    id: &'static str,
    floor: &'static [(u32, &'static str)],
    target: Option<f64>,
) -> Step {
    Step { id, floor, target }
}

/// The decompositions, read from the code (see the module docs and the
/// comments in `benches/protocol.rs`).
const STEPS: &[Step] = &[
    // IdentityKey::from_bytes: decompression, small-order check, Montgomery form.
    step(
        "protocol/identity_key_decode",
        &[(1, DECOMPRESS), (1, MONT)],
        None,
    ),
    // PrekeyBundle::decode: the identity key + parsing.
    step(
        "protocol/bundle_decode",
        &[(1, DECOMPRESS), (1, MONT)],
        None,
    ),
    // decode + verify: + verify_strict of the 70-byte signed message.
    step(
        "protocol/bundle_decode_verify",
        &[(1, DECOMPRESS), (1, MONT), (1, VERIFY)],
        None,
    ),
    // Bundle decode + verify, EK_A keygen, DH1..DH4, SK = HKDF(ikm 160).
    step(
        "protocol/x3dh_initiator/opk",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (1, VERIFY),
            (1, KG),
            (4, DH),
            (1, HKDF_IKM160),
        ],
        Some(1.10),
    ),
    // The same without DH4, SK = HKDF(ikm 128).
    step(
        "protocol/x3dh_initiator/no_opk",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (1, VERIFY),
            (1, KG),
            (3, DH),
            (1, HKDF_IKM128),
        ],
        Some(1.10),
    ),
    // IK_A decode, DH1..DH4 with the private halves, SK.
    step(
        "protocol/x3dh_responder/opk",
        &[(1, DECOMPRESS), (1, MONT), (4, DH), (1, HKDF_IKM160)],
        Some(1.10),
    ),
    step(
        "protocol/x3dh_responder/no_opk",
        &[(1, DECOMPRESS), (1, MONT), (3, DH), (1, HKDF_IKM128)],
        Some(1.10),
    ),
    // X3DH initiator + RatchetInitAlice: first ratchet key (KG), DH with
    // SPK_B, KDF_RK = HKDF(64).
    step(
        "protocol/initiate/opk",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (1, VERIFY),
            (2, KG),
            (5, DH),
            (1, HKDF_IKM160),
            (1, HKDF64),
        ],
        None,
    ),
    step(
        "protocol/initiate/no_opk",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (1, VERIFY),
            (2, KG),
            (4, DH),
            (1, HKDF_IKM128),
            (1, HKDF64),
        ],
        None,
    ),
    // initiate + the first message: KDF_CK, keys(mk) = HKDF(44), seal.
    step(
        "protocol/first_message/opk",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (1, VERIFY),
            (2, KG),
            (5, DH),
            (1, HKDF_IKM160),
            (1, HKDF64),
            (1, KDF_CK),
            (1, HKDF44),
            (1, SEAL64),
        ],
        None,
    ),
    step(
        "protocol/first_message/no_opk",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (1, VERIFY),
            (2, KG),
            (4, DH),
            (1, HKDF_IKM128),
            (1, HKDF64),
            (1, KDF_CK),
            (1, HKDF44),
            (1, SEAL64),
        ],
        None,
    ),
    // X3DH responder + the first receiving chain (a DH ratchet step with
    // SPK_B as DHs: DH + KDF_RK) + the first message's chain step, keys, open.
    step(
        "protocol/accept/opk",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (5, DH),
            (1, HKDF_IKM160),
            (1, HKDF64),
            (1, KDF_CK),
            (1, HKDF44),
            (1, OPEN64),
        ],
        None,
    ),
    step(
        "protocol/accept/no_opk",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (4, DH),
            (1, HKDF_IKM128),
            (1, HKDF64),
            (1, KDF_CK),
            (1, HKDF44),
            (1, OPEN64),
        ],
        None,
    ),
    // Steady state: one chain step, keys(mk), the AEAD.
    step(
        "protocol/encrypt/64",
        &[(1, KDF_CK), (1, HKDF44), (1, SEAL64)],
        Some(1.25),
    ),
    step(
        "protocol/encrypt/1024",
        &[(1, KDF_CK), (1, HKDF44), (1, SEAL1K)],
        None,
    ),
    step(
        "protocol/encrypt/16384",
        &[(1, KDF_CK), (1, HKDF44), (1, SEAL16K)],
        None,
    ),
    step(
        "protocol/decrypt/64",
        &[(1, KDF_CK), (1, HKDF44), (1, OPEN64)],
        Some(1.25),
    ),
    step(
        "protocol/decrypt/1024",
        &[(1, KDF_CK), (1, HKDF44), (1, OPEN1K)],
        None,
    ),
    step(
        "protocol/decrypt/16384",
        &[(1, KDF_CK), (1, HKDF44), (1, OPEN16K)],
        None,
    ),
    // A→B→A: each encrypt runs the lazy sending half (KG + DH + KDF_RK),
    // each decrypt the receiving half (DH + KDF_RK), each message a chain
    // step, keys(mk) and its AEAD.
    step(
        "protocol/ping_pong",
        &[
            (2, KG),
            (4, DH),
            (4, HKDF64),
            (4, KDF_CK),
            (4, HKDF44),
            (2, SEAL64),
            (2, OPEN64),
        ],
        Some(1.15),
    ),
    // The last of N first: N chain steps (N-1 keys stored); every message:
    // keys(mk) and open.
    step(
        "protocol/skip/100",
        &[(100, KDF_CK), (100, HKDF44), (100, OPEN64)],
        None,
    ),
    step(
        "protocol/skip/1000",
        &[(1000, KDF_CK), (1000, HKDF44), (1000, OPEN64)],
        None,
    ),
    // No cryptography.
    step("protocol/state_encode/steady", &[], None),
    step("protocol/state_encode/skipped_999", &[], None),
    // State encoding v2: the identity keys are given, not decoded; our
    // ratchet public key is recomputed (one fixed-base multiplication) only
    // when the state holds our ratchet secret. Both measured sessions have
    // just received (the DH ratchet step dropped that secret), so decoding
    // them is parsing and copying only: no floor.
    step("protocol/state_decode/steady", &[], None),
    step("protocol/state_decode/skipped_999", &[], None),
];

/// Skip linearity: the cost per message at N = 1000 over that at N = 100.
const SKIP_LINEARITY_TARGET: f64 = 1.20;

/// The backlog benches, what they run, and their targets (messages per
/// second): `benches/backlog.rs`, `benches/backlog_sqlite.rs` and
/// `relay/benches/backlog_http.rs`.
const BACKLOG: &[(&str, &str, Option<f64>)] = &[
    (
        "backlog/memory",
        "in-process relay (memory); memory store",
        None,
    ),
    (
        "backlog/sqlite",
        "in-process relay (memory); SQLite store",
        Some(50_000.0),
    ),
    (
        "backlog_http/memory",
        "HTTP relay on loopback (SQLite in memory); memory store",
        Some(20_000.0),
    ),
    (
        "backlog_http/sqlite",
        "HTTP relay on loopback (SQLite in memory); SQLite store",
        Some(20_000.0),
    ),
    (
        "backlog_http/sqlite_relay_file",
        "HTTP relay on loopback (SQLite file); SQLite store",
        Some(20_000.0),
    ),
];

/// One criterion result, or the combination of several passes' results.
struct Estimate {
    /// Median, ns (of one pass; over several, the median of their medians).
    median: f64,
    /// 95% confidence interval of the median, ns (over several passes, the
    /// lowest and highest median).
    low: f64,
    high: f64,
    /// How many passes the figure combines.
    passes: usize,
    /// Elements per iteration, if the bench declared a throughput.
    elements: Option<f64>,
    /// When the estimates were written (unix seconds).
    written: u64,
}

fn number(value: &serde_json::Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(serde_json::Value::as_f64)
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every `new/benchmark.json` under `dir`, by `full_id`.
fn collect(dir: &Path, out: &mut HashMap<String, Estimate>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let (Some(benchmark), Some(estimates)) = (
                read_json(&path.join("benchmark.json")),
                read_json(&path.join("estimates.json")),
            ) else {
                continue;
            };
            let (Some(id), Some(median), Some(low), Some(high)) = (
                benchmark.get("full_id").and_then(|v| v.as_str()),
                number(&estimates, &["median", "point_estimate"]),
                number(
                    &estimates,
                    &["median", "confidence_interval", "lower_bound"],
                ),
                number(
                    &estimates,
                    &["median", "confidence_interval", "upper_bound"],
                ),
            ) else {
                continue;
            };
            let written = std::fs::metadata(path.join("estimates.json"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            out.insert(
                id.to_owned(),
                Estimate {
                    median,
                    low,
                    high,
                    passes: 1,
                    elements: number(&benchmark, &["throughput", "Elements"]),
                    written,
                },
            );
        } else {
            collect(&path, out);
        }
    }
}

/// Combines the results of several passes: per bench, the median of the
/// medians, the range of the medians, the oldest write time.
fn combine(passes: Vec<HashMap<String, Estimate>>) -> HashMap<String, Estimate> {
    let mut all: HashMap<String, Vec<Estimate>> = HashMap::new();
    for pass in passes {
        for (id, e) in pass {
            all.entry(id).or_default().push(e);
        }
    }
    all.into_iter()
        .filter_map(|(id, mut list)| {
            if list.len() == 1 {
                return list.pop().map(|e| (id, e));
            }
            list.sort_by(|a, b| a.median.total_cmp(&b.median));
            let n = list.len();
            let median = if n % 2 == 1 {
                list[n / 2].median
            } else {
                (list[n / 2 - 1].median + list[n / 2].median) / 2.0
            };
            let estimate = Estimate {
                median,
                low: list[0].median,
                high: list[n - 1].median,
                passes: n,
                elements: list[0].elements,
                written: list.iter().map(|e| e.written).min().unwrap_or(0),
            };
            Some((id, estimate))
        })
        .collect()
}

/// A duration in ns, with a unit that keeps 3 or 4 significant digits.
fn time(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.3} s", ns / 1e9)
    }
}

/// A count, rounded, with thousands separators.
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn short(floor_id: &str) -> &str {
    FLOOR
        .iter()
        .find(|(id, _)| *id == floor_id)
        .map_or(floor_id, |(_, name)| name)
}

fn decomposition(floor: &[(u32, &str)]) -> String {
    if floor.is_empty() {
        return "(no cryptography)".to_owned();
    }
    floor
        .iter()
        .map(|(n, id)| match n {
            1 => short(id).to_owned(),
            n => format!("{n} {}", short(id)),
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

struct Report {
    results: HashMap<String, Estimate>,
    since: Option<u64>,
    stale: usize,
    missing: usize,
    met: usize,
    missed: usize,
}

impl Report {
    /// The median of `id`, marked when stale; `None` if it was never run.
    fn get(&mut self, id: &str) -> Option<(f64, &'static str)> {
        let e = self.results.get(id)?;
        let stale = self.since.is_some_and(|s| e.written < s);
        if stale {
            self.stale += 1;
        }
        Some((e.median, if stale { " (stale)" } else { "" }))
    }

    fn floor_sum(&mut self, floor: &[(u32, &str)]) -> Option<f64> {
        let mut sum = 0.0;
        for (n, id) in floor {
            sum += f64::from(*n) * self.get(id)?.0;
        }
        Some(sum)
    }

    fn verdict(&mut self, ok: bool) -> &'static str {
        if ok {
            self.met += 1;
            "ok"
        } else {
            self.missed += 1;
            "**missed**"
        }
    }

    fn floor_table(&mut self, out: &mut String) {
        out.push_str("### Floor (primitives)\n\n");
        out.push_str(
            "| term | bench | median | 95% CI of the median, or range over passes |\n\
             |---|---|---:|---|\n",
        );
        for (id, name) in FLOOR {
            let row = match self.results.get(*id) {
                Some(e) => {
                    let (low, high, passes) = (e.low, e.high, e.passes);
                    let (median, mark) = self.get(id).unwrap_or((f64::NAN, ""));
                    let range = if passes > 1 {
                        format!("{} – {} over {passes} passes", time(low), time(high))
                    } else {
                        format!("{} – {}", time(low), time(high))
                    };
                    format!("| {name} | `{id}` | {}{mark} | {range} |", time(median))
                }
                None => {
                    self.missing += 1;
                    format!("| {name} | `{id}` | not run | |")
                }
            };
            let _ = writeln!(out, "{row}");
        }
        out.push('\n');
    }

    fn steps_table(&mut self, out: &mut String) {
        out.push_str("### Protocol steps\n\n");
        out.push_str(
            "| step | median | floor | ratio | target | | ratio range | floor operations |\n\
             |---|---:|---:|---:|---:|---|---:|---|\n",
        );
        for s in STEPS {
            let name = s.id.trim_start_matches("protocol/");
            let ops = decomposition(s.floor);
            let Some((median, mark)) = self.get(s.id) else {
                self.missing += 1;
                let _ = writeln!(out, "| {name} | not run | | | | | | {ops} |");
                continue;
            };
            let floor = if s.floor.is_empty() {
                None
            } else {
                self.floor_sum(s.floor)
            };
            let (floor_text, ratio_text, ratio) = match floor {
                Some(f) => (time(f), format!("{:.2}x", median / f), Some(median / f)),
                None if s.floor.is_empty() => ("–".to_owned(), "–".to_owned(), None),
                None => ("floor not run".to_owned(), String::new(), None),
            };
            let (target_text, verdict) = match (s.target, ratio) {
                (Some(t), Some(r)) => (format!("≤ {t:.2}x"), self.verdict(r <= t)),
                (Some(t), None) => (format!("≤ {t:.2}x"), ""),
                (None, _) => (String::new(), ""),
            };
            // The spread of the ratio: over several passes, the lowest and
            // highest median of the step against the floor; for one pass,
            // the step's 95% confidence interval against the floor.
            let range_text = match (floor, self.results.get(s.id)) {
                (Some(f), Some(e)) => format!("{:.2}–{:.2}", e.low / f, e.high / f),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "| {name} | {}{mark} | {floor_text} | {ratio_text} | {target_text} | {verdict} | {range_text} | {ops} |",
                time(median)
            );
        }
        out.push('\n');
    }

    fn skip_linearity(&mut self, out: &mut String) {
        out.push_str("### Skip: linear in the number of messages\n\n");
        let (Some((m100, mark100)), Some((m1000, mark1000))) = (
            self.get("protocol/skip/100"),
            self.get("protocol/skip/1000"),
        ) else {
            self.missing += 1;
            out.push_str("`protocol/skip/100` or `protocol/skip/1000` not run.\n\n");
            return;
        };
        let (per100, per1000) = (m100 / 100.0, m1000 / 1000.0);
        let growth = per1000 / per100;
        let floor = self.floor_sum(&[(1, KDF_CK), (1, HKDF44), (1, OPEN64)]);
        let verdict = self.verdict(growth <= SKIP_LINEARITY_TARGET);
        out.push_str(
            "| per message | skip 100 | skip 1000 | 1000 / 100 | target | | floor per message |\n\
             |---|---:|---:|---:|---:|---|---:|\n",
        );
        let _ = writeln!(
            out,
            "| median / N | {}{mark100} | {}{mark1000} | {growth:.2}x | ≤ {SKIP_LINEARITY_TARGET:.2}x | {verdict} | {} |\n",
            time(per100),
            time(per1000),
            floor.map_or_else(|| "floor not run".to_owned(), time),
        );
    }

    fn backlog_table(&mut self, out: &mut String) {
        out.push_str("### Client layer: receiving a backlog\n\n");
        out.push_str(
            "| bench | relay; receiver's store | median | messages/s | target | |\n\
             |---|---|---:|---:|---:|---|\n",
        );
        for (id, what, target) in BACKLOG {
            let elements = self.results.get(*id).and_then(|e| e.elements);
            let Some((median, mark)) = self.get(id) else {
                self.missing += 1;
                let _ = writeln!(out, "| `{id}` | {what} | not run | | | |");
                continue;
            };
            let messages = elements.unwrap_or(10_000.0);
            let rate = messages / (median / 1e9);
            let (target_text, verdict) = match target {
                Some(t) => (format!("≥ {}", thousands(*t)), self.verdict(rate >= *t)),
                None => (String::new(), ""),
            };
            let _ = writeln!(
                out,
                "| `{id}` | {what} | {}{mark} for {} | {} | {target_text} | {verdict} |",
                time(median),
                thousands(messages),
                thousands(rate),
            );
        }
        out.push('\n');
    }
}

fn default_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion")
}

fn main() -> ExitCode {
    let mut dirs = Vec::new();
    let mut since = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--dir", Some(d)) => dirs.push(PathBuf::from(d)),
            ("--since", Some(s)) => match s.parse::<u64>() {
                Ok(s) => since = Some(s),
                Err(_) => {
                    eprintln!("--since: expected unix seconds, got {s:?}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("usage: bench_report [--dir CRITERION_DIR]... [--since UNIX_SECONDS]");
                return ExitCode::from(2);
            }
        }
    }
    if dirs.is_empty() {
        dirs.push(default_dir());
    }
    let passes = dirs
        .iter()
        .map(|dir| {
            let mut results = HashMap::new();
            collect(dir, &mut results);
            results
        })
        .collect::<Vec<_>>();
    let results = combine(passes);
    let shown = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if results.is_empty() {
        eprintln!(
            "no criterion results under {shown}: run scripts/bench-report.sh (or cargo bench) first"
        );
        return ExitCode::FAILURE;
    }
    let mut report = Report {
        results,
        since,
        stale: 0,
        missing: 0,
        met: 0,
        missed: 0,
    };
    let mut out = String::new();
    report.steps_table(&mut out);
    report.skip_linearity(&mut out);
    report.backlog_table(&mut out);
    report.floor_table(&mut out);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = writeln!(
        out,
        "Medians from {shown} (report at unix time {now}). Targets: {} met, {} missed.{}{}",
        report.met,
        report.missed,
        if report.missing > 0 {
            format!(" {} figures not run.", report.missing)
        } else {
            String::new()
        },
        if report.stale > 0 {
            " Figures marked (stale) predate --since: they are from an earlier run."
        } else {
            ""
        },
    );
    print!("{out}");
    ExitCode::SUCCESS
}
