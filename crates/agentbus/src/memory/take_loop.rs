//! The consumer side every engine on the shared state machine runs the same way.

use std::sync::Arc;

use tokio::sync::Notify;

use super::state::{Handout, Take};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Delivery, Settler};

/// Takes the next batch for a consumer, waiting on its group's waker until something
/// is ready.
///
/// `waker` returns the group's [`Notify`], `None` once the group was deleted (an
/// error for the consumer), or why the consumer cannot go on (the engine closed);
/// `take` runs [`State::take`](super::state::State::take)
/// under the engine's lock. The waiter is registered *before* each take, so a wake-up
/// between an empty take and the wait is not lost. When a batch leaves more ready
/// behind it, the other members of the group are woken to take it.
///
/// # Errors
/// Whatever `waker` or `take` returns.
pub async fn take_or_wait(
    group: &Arc<str>,
    settler: &Arc<dyn Settler>,
    mut waker: impl FnMut() -> Result<Option<Arc<Notify>>>,
    mut take: impl FnMut() -> Result<Take>,
) -> Result<Vec<Delivery>> {
    loop {
        let notify = waker()?.ok_or_else(|| {
            Error::new(
                ErrorKind::Closed,
                "this subscription's group was deleted; subscribe again",
            )
        })?;
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match take()? {
            Take::Some(handouts, more) => {
                if more {
                    notify.notify_waiters();
                }
                return Ok(Handout::into_deliveries(handouts, group, settler));
            }
            Take::Empty | Take::PrefetchFull => notified.await,
        }
    }
}
