//! Long-poll wake-ups: one [`Notify`] per mailbox that somebody waits on.
//!
//! A fetch with `wait_ms` registers itself ([`Waiters::register`]) before it
//! first lists the mailbox, so a deposit landing between that listing and
//! the wait is not missed; a deposit (from this process, or reported by the
//! PostgreSQL listener from another one) calls [`Waiters::notify`]. Entries
//! are removed when their last waiter leaves, so the map only holds
//! mailboxes being waited on.
//!
//! A waiter counts as parked ([`Waiter::park`]) once that first listing
//! found the mailbox empty: [`Waiters::parked`] (the
//! `cubbyhole_relay_long_polls` gauge) counts the requests that a deposit
//! made now must wake, which is what an operator watching long polls wants
//! to see, and what the tests wait for before they deposit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cubbyhole::transport::MailboxId;
use tokio::sync::Notify;

/// The waiters of one server.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<MailboxId, Arc<Notify>>>,
    closing: AtomicBool,
    parked: AtomicU64,
}

/// A registered waiter; leaving (dropping it) cleans the map up.
#[derive(Debug)]
pub(crate) struct Waiter {
    waiters: Arc<Waiters>,
    mailbox: MailboxId,
    notify: Arc<Notify>,
    parked: AtomicBool,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<MailboxId, Arc<Notify>>> {
        // Only inserts, removals and wake-ups happen under the lock: no
        // half-done state to fear from poisoning.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a waiter for `mailbox`.
    pub(crate) fn register(self: &Arc<Self>, mailbox: MailboxId) -> Waiter {
        let notify = Arc::clone(
            self.lock()
                .entry(mailbox)
                .or_insert_with(|| Arc::new(Notify::new())),
        );
        Waiter {
            waiters: Arc::clone(self),
            mailbox,
            notify,
            parked: AtomicBool::new(false),
        }
    }

    /// Wakes the waiters of `mailbox` (an envelope arrived).
    pub(crate) fn notify(&self, mailbox: &MailboxId) {
        if let Some(notify) = self.lock().get(mailbox) {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter and makes them return (shutting down).
    pub(crate) fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for notify in self.lock().values() {
            notify.notify_waiters();
        }
    }

    /// Whether [`Self::close_all`] was called.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// How many requests are parked: registered, past their first listing
    /// (which found nothing) and waiting for a wake-up.
    pub(crate) fn parked(&self) -> u64 {
        self.parked.load(Ordering::SeqCst)
    }

    /// How many mailboxes are waited on.
    #[cfg(test)]
    pub(crate) fn mailboxes(&self) -> usize {
        self.lock().len()
    }
}

impl Waiter {
    /// The mailbox's wake-up.
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }

    /// Marks this waiter parked: its first listing found the mailbox empty
    /// and it now waits for [`Waiters::notify`]. Counted in
    /// [`Waiters::parked`] until it is dropped.
    pub(crate) fn park(&self) {
        if !self.parked.swap(true, Ordering::SeqCst) {
            self.waiters.parked.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if *self.parked.get_mut() {
            self.waiters.parked.fetch_sub(1, Ordering::SeqCst);
        }
        let mut map = self.waiters.lock();
        // The map holds one reference, this waiter another: if nobody else
        // waits, the entry goes (clones are only made under the lock).
        let last = map
            .get(&self.mailbox)
            .is_some_and(|n| Arc::ptr_eq(n, &self.notify) && Arc::strong_count(n) == 2);
        if last {
            map.remove(&self.mailbox);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_registered_waiters_and_cleans_up() {
        let waiters = Arc::new(Waiters::default());
        let mailbox = MailboxId([7; 32]);
        let a = waiters.register(mailbox);
        let b = waiters.register(mailbox);
        assert_eq!(waiters.mailboxes(), 1);
        // Registered, not parked yet (their first listing is to come).
        assert_eq!(waiters.parked(), 0);
        a.park();
        a.park();
        b.park();
        assert_eq!(waiters.parked(), 2);
        {
            let notified = a.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            waiters.notify(&MailboxId([8; 32]));
            waiters.notify(&mailbox);
            tokio::time::timeout(Duration::from_secs(5), notified)
                .await
                .expect("woken");
        }
        drop(a);
        assert_eq!(waiters.mailboxes(), 1);
        assert_eq!(waiters.parked(), 1);
        drop(b);
        assert_eq!(waiters.mailboxes(), 0);
        assert_eq!(waiters.parked(), 0);
        // A waiter that leaves unparked (its first listing found
        // envelopes) does not touch the count.
        drop(waiters.register(mailbox));
        assert_eq!(waiters.parked(), 0);
    }
}
