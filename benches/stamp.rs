//! Stamps (issue 16): what a stranger's first deposit costs its sender.
//!
//! ```text
//! cargo bench --bench stamp
//! ```
//!
//! - `stamp/tries_65536`: 65,536 nonces tried (a difficulty no nonce meets,
//!   so the whole budget runs): the cost of one try is this / 65,536.
//! - `stamp/floor_sha256`: its floor, one SHA-256 of the same 86 bytes
//!   (label, mailbox, envelope id, length, epoch, nonce) from scratch.
//!   A try reuses the hashed prefix, so it should cost about one
//!   compression: the ratio reads as tries per full hash.
//! - `stamp/verify`: what the relay pays per stamped deposit.
//!
//! The figures to derive (BENCHMARKS.md): at difficulty `d` a deposit of
//! up to 4 KiB needs `2^d` tries on average, so a mebibyte of junk in
//! 4 KiB envelopes (or in any power-of-two size) costs `2^(d + 8)` tries.
//! Checked in every run (`--test` included): a minted stamp verifies and a
//! stamp for another envelope does not.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use cubbyhole::transport::stamp::{required_bits, Stamp, StampError};
use cubbyhole::transport::{EnvelopeId, MailboxId};
use sha2::{Digest, Sha256};

const NOW: u64 = 1_900_000_000;

fn bench(c: &mut Criterion) {
    let mailbox = MailboxId([7; 32]);
    let id = EnvelopeId([9; 16]);
    // Structure: mint at a small difficulty, verify, refuse another id.
    let stamp = Stamp::mint(&mailbox, &id, 64, 8, NOW, 0, 1 << 20)
        .expect("difficulty")
        .expect("a stamp within 2^20 tries at 8 bits");
    assert_eq!(stamp.verify(&mailbox, &id, 64, 8, NOW), Ok(()));
    let other = EnvelopeId([10; 16]);
    assert_eq!(
        stamp.verify(&mailbox, &other, 64, 8, NOW),
        Err(StampError::Work)
    );
    assert_eq!(required_bits(20, 4096), 20);

    let mut g = c.benchmark_group("stamp");
    g.bench_function("tries_65536", |b| {
        b.iter(|| {
            let r = Stamp::mint(&mailbox, &id, 64, 64, NOW, black_box(1), 65_536)
                .expect("64 bits is the ceiling");
            assert!(r.is_err(), "no 64-bit stamp in 65,536 tries");
            r
        })
    });
    let input = [0x5au8; 86];
    g.bench_function("floor_sha256", |b| {
        b.iter(|| Sha256::digest(black_box(&input)))
    });
    g.bench_function("verify", |b| {
        b.iter(|| black_box(stamp).verify(&mailbox, &id, 64, 8, NOW))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
