//! The two small single-threaded primitives the JavaScript API needs: an
//! [`Interrupt`] that ends a receive's long poll when the page wants the
//! device for something else, and [`first`], which runs two futures and
//! keeps the one that finishes first.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A flag with a waker: [`Interrupt::fire`] wakes the task waiting in
/// [`Interrupt::wait`]. Cloning shares it.
#[derive(Clone, Default)]
pub(crate) struct Interrupt(Rc<InterruptState>);

#[derive(Default)]
struct InterruptState {
    fired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Interrupt {
    /// Wakes the current waiter (or the next one, if none waits now).
    pub(crate) fn fire(&self) {
        self.0.fired.set(true);
        if let Some(waker) = self.0.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Clears a pending [`Interrupt::fire`].
    pub(crate) fn clear(&self) {
        self.0.fired.set(false);
    }

    /// Ready once fired (clearing the flag).
    pub(crate) fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.0.fired.replace(false) {
                Poll::Ready(())
            } else {
                *self.0.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// Which of two futures finished first.
pub(crate) enum First<A, B> {
    /// The first one, with its output (the second was dropped).
    Left(A),
    /// The second one, with its output (the first was dropped).
    Right(B),
}

/// Polls `a` then `b` until one is ready; the other is dropped.
pub(crate) async fn first<A: Future, B: Future>(a: A, b: B) -> First<A::Output, B::Output> {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    std::future::poll_fn(move |cx: &mut Context<'_>| {
        if let Poll::Ready(out) = Pin::new(&mut a).poll(cx) {
            return Poll::Ready(First::Left(out));
        }
        if let Poll::Ready(out) = Pin::new(&mut b).poll(cx) {
            return Poll::Ready(First::Right(out));
        }
        Poll::Pending
    })
    .await
}
