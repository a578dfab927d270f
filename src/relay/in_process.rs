//! A relay in the same process, behind the transport traits.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use std::vec::Vec;

use core::future::{ready, Future};

use rand_core::OsRng;

use super::{Relay, RelayStorage, SweepReport};
use crate::bounds::MaybeSend;
use crate::protocol::devices::AccountId;
use crate::transport::{
    DepositPass, DeviceAddress, DeviceDirectory, Envelope, EnvelopeId, Mailbox, MailboxAuth,
    MailboxId, PrekeyDirectory, TransportError,
};

/// A clock: the current time in unix seconds.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A [`Relay`] shared in the same process, implementing
/// [`PrekeyDirectory`] and [`Mailbox`]. Clones share the relay.
///
/// The time comes from the clock given to [`Self::with_clock`] (the system
/// clock with [`Self::new`]), the randomness for challenges from
/// [`OsRng`]. The relay's storage is synchronous, so each method does its
/// work when called and returns a future that is already ready (and
/// `Send`).
pub struct InProcessRelay<S> {
    relay: Arc<Mutex<Relay<S>>>,
    clock: Clock,
}

impl<S> Clone for InProcessRelay<S> {
    fn clone(&self) -> Self {
        InProcessRelay {
            relay: Arc::clone(&self.relay),
            clock: Arc::clone(&self.clock),
        }
    }
}

impl<S> fmt::Debug for InProcessRelay<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessRelay").finish_non_exhaustive()
    }
}

/// The system clock in unix seconds (0 before the epoch).
fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<S: RelayStorage> InProcessRelay<S> {
    /// Shares `relay`, on the system clock.
    pub fn new(relay: Relay<S>) -> Self {
        Self::with_clock(relay, Arc::new(system_now))
    }

    /// Shares `relay`, on `clock` (tests move time with it).
    pub fn with_clock(relay: Relay<S>, clock: Clock) -> Self {
        InProcessRelay {
            relay: Arc::new(Mutex::new(relay)),
            clock,
        }
    }

    /// The relay's current time.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Runs `f` on the relay (inspection, maintenance).
    ///
    /// # Errors
    /// [`TransportError::Unavailable`] if a previous user panicked while
    /// holding the relay.
    pub fn with_relay<R>(&self, f: impl FnOnce(&mut Relay<S>) -> R) -> Result<R, TransportError> {
        Ok(f(&mut *self.lock()?))
    }

    /// [`Relay::sweep`] at the clock's time.
    ///
    /// # Errors
    /// As [`Relay::sweep`].
    pub fn sweep(&self) -> Result<SweepReport, TransportError> {
        let now = self.now();
        self.lock()?.sweep(now)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Relay<S>>, TransportError> {
        self.relay
            .lock()
            .map_err(|_| TransportError::Unavailable("relay lock poisoned"))
    }

    fn call<R>(
        &self,
        f: impl FnOnce(&mut Relay<S>, u64) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let now = self.now();
        let mut relay = self.lock()?;
        f(&mut relay, now)
    }
}

impl<S: RelayStorage + Send> PrekeyDirectory for InProcessRelay<S> {
    fn publish(
        &self,
        upload: &[u8],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend {
        ready(self.call(|relay, now| relay.publish(now, upload)))
    }

    fn fetch_bundle(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + MaybeSend {
        ready(self.call(|relay, now| relay.fetch_bundle(now, device)))
    }

    fn one_time_prekeys_left(
        &self,
        device: &DeviceAddress,
    ) -> impl Future<Output = Result<u32, TransportError>> + MaybeSend {
        ready(self.call(|relay, _| relay.one_time_prekeys_left(device)))
    }
}

impl<S: RelayStorage + Send> DeviceDirectory for InProcessRelay<S> {
    fn publish_device_list(
        &self,
        signed: &[u8],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend {
        ready(self.call(|relay, _| relay.publish_device_list(signed)))
    }

    fn fetch_device_lists(
        &self,
        account: &AccountId,
        after: u64,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, TransportError>> + MaybeSend {
        ready(self.call(|relay, _| relay.fetch_device_lists(account, after)))
    }
}

impl<S: RelayStorage + Send> Mailbox for InProcessRelay<S> {
    fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend {
        ready(self.call(|relay, now| relay.deposit(now, to, envelope, pass)))
    }

    fn challenge(
        &self,
        mailbox: &MailboxId,
    ) -> impl Future<Output = Result<[u8; 32], TransportError>> + MaybeSend {
        ready(self.call(|relay, now| relay.challenge(now, &mut OsRng, mailbox)))
    }

    fn fetch(
        &self,
        auth: &MailboxAuth,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Envelope>, TransportError>> + MaybeSend {
        ready(self.call(|relay, now| relay.fetch(now, auth, limit)))
    }

    fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> impl Future<Output = Result<(), TransportError>> + MaybeSend {
        ready(self.call(|relay, now| relay.acknowledge(now, auth, ids)))
    }
}
