//! The two halves of the backlog scenario, shared by the `backlog` and
//! `backlog_sqlite` benches (through `support/backlog.rs`), the relay's
//! `backlog_http` bench and the `backlog` example, which differ only in the
//! relay and stores they run it on: [`publish_and_send`] (Bob and Alice
//! publish, Alice sends Bob the backlog while he is offline) and
//! [`receive_all`] (Bob receives until the whole backlog is in his inbox),
//! plus a temporary directory for file stores.
//!
//! Each includer uses part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cubbyhole::client::Client;
use cubbyhole::storage::{MemoryStore, Store};
use cubbyhole::transport::{Mailbox, PrekeyDirectory};
use rand_chacha::ChaCha20Rng;

/// Body size of each message, in bytes (the client adds a 5-byte frame).
pub const BODY: usize = 64;

/// Alice's body number `i`: its number, big-endian, then `a`s.
pub fn body(i: usize) -> [u8; BODY] {
    let mut body = [0x61u8; BODY];
    body[..4].copy_from_slice(&(i as u32).to_be_bytes());
    body
}

/// Bob and Alice publish their prekeys (Bob's first upload must happen),
/// then Alice sends Bob `messages` messages ([`body`] `0..messages`), each
/// of which must be deposited.
pub async fn publish_and_send<S, D, M, AD, AM>(
    bob: &mut Client<S, D, M>,
    alice: &mut Client<MemoryStore, AD, AM>,
    messages: usize,
    rng: &mut ChaCha20Rng,
    now: u64,
) where
    S: Store,
    D: PrekeyDirectory,
    M: Mailbox,
    AD: PrekeyDirectory,
    AM: Mailbox,
{
    assert!(bob.maintain_prekeys(rng, now).await.expect("bob publishes"));
    alice
        .maintain_prekeys(rng, now)
        .await
        .expect("alice publishes");
    let to = bob.address();
    for i in 0..messages {
        let sent = alice.send(rng, &to, &body(i), now).await.expect("send");
        assert!(sent.deposited, "message {i} was not deposited");
    }
}

/// The timed part: `receive` until `messages` messages are in Bob's inbox
/// (checked after the timing).
pub async fn receive_all<S, D, M>(bob: &mut Client<S, D, M>, messages: usize, now: u64) -> Duration
where
    S: Store,
    D: PrekeyDirectory,
    M: Mailbox,
{
    let start = Instant::now();
    let mut received = 0;
    while received < messages {
        let report = bob
            .receive(&mut cubbyhole::OsRng, now)
            .await
            .expect("receive");
        assert!(
            report.rejected.is_empty(),
            "rejected: {:?}",
            report.rejected
        );
        assert!(report.received > 0, "receive made no progress");
        received += report.received;
    }
    let elapsed = start.elapsed();
    assert_eq!(received, messages);
    assert_eq!(bob.inbox().await.expect("inbox").len(), messages);
    elapsed
}

/// A new temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<temp>/<prefix>-<pid>-<n>`, created.
    pub fn new(prefix: &str) -> TempDir {
        static RUN: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
