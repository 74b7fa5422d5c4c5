//! Request coalescing: identical concurrent requests share one computation.
//!
//! Hand-written rather than taken from a crate because the semantics are
//! specific: the computation runs in its own task (so the first requester
//! leaving does not stop it), every waiter holds a [`Waiter`] whose drop
//! leaves the flight, and the flight is cancelled only when its last waiter
//! leaves. Joining and leaving happen under one mutex, so a waiter cannot
//! join a flight that is being cancelled. The registry holds at most
//! `capacity` flights; beyond it, requests compute on their own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::backend::CancellationToken;
use crate::error::Error;

/// sha256 of the image bytes, the parameters and the model digest.
pub(crate) type Key = [u8; 32];

/// What a flight produces, shared by all its waiters.
pub(crate) type Shared<T> = Option<Result<Arc<T>, Error>>;

#[derive(Debug)]
struct Slot<T> {
    id: u64,
    waiters: usize,
    token: CancellationToken,
    rx: watch::Receiver<Shared<T>>,
}

/// The bounded registry of flights in progress.
#[derive(Debug)]
pub(crate) struct Coalescer<T> {
    capacity: usize,
    next_id: AtomicU64,
    slots: Mutex<HashMap<Key, Slot<T>>>,
}

/// The result of [`Coalescer::join`].
#[derive(Debug)]
pub(crate) enum Joined<T> {
    /// A new flight: the caller must start the computation and publish its
    /// result through `flight`.
    Leader {
        /// This request's place in the flight.
        waiter: Waiter<T>,
        /// Where to publish.
        flight: Flight<T>,
    },
    /// An identical computation is running; wait for it.
    Follower(Waiter<T>),
}

/// The producer side of a flight.
#[derive(Debug)]
pub(crate) struct Flight<T> {
    coalescer: Arc<Coalescer<T>>,
    key: Key,
    id: u64,
    tx: watch::Sender<Shared<T>>,
    /// Fires when every waiter has left.
    pub token: CancellationToken,
}

impl<T> Flight<T> {
    /// Unregisters the flight (later identical requests start afresh) and
    /// hands the result to every waiter.
    pub(crate) fn publish(self, result: Result<Arc<T>, Error>) {
        self.coalescer.remove_if(&self.key, self.id);
        self.tx.send_replace(Some(result));
    }
}

/// One request's interest in a flight. Dropping it leaves the flight.
#[derive(Debug)]
pub(crate) struct Waiter<T> {
    rx: watch::Receiver<Shared<T>>,
    _leave: Leave<T>,
}

impl<T> Waiter<T> {
    /// Waits for the flight's result.
    pub(crate) async fn wait(mut self) -> Result<Arc<T>, Error> {
        let result =
            self.rx.wait_for(Option::is_some).await.map_err(|_| {
                Error::Internal("the computation ended without a result".to_owned())
            })?;
        result
            .clone()
            .unwrap_or_else(|| Err(Error::Internal("no result".to_owned())))
    }
}

#[derive(Debug)]
struct Leave<T> {
    coalescer: Arc<Coalescer<T>>,
    key: Key,
    id: u64,
    registered: bool,
    token: CancellationToken,
}

impl<T> Drop for Leave<T> {
    fn drop(&mut self) {
        if !self.registered {
            // Sole waiter of an unregistered flight.
            self.token.cancel();
            return;
        }
        let mut slots = self.coalescer.slots.lock();
        if let Some(slot) = slots.get_mut(&self.key).filter(|s| s.id == self.id) {
            slot.waiters -= 1;
            if slot.waiters == 0 {
                slots.remove(&self.key);
                self.token.cancel();
            }
        }
        // Otherwise the flight has published; nothing left to cancel.
    }
}

impl<T> Coalescer<T> {
    /// A registry of at most `capacity` flights.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            next_id: AtomicU64::new(0),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Flights in progress (registered ones).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.lock().len()
    }

    /// Joins the flight for `key`, or starts one.
    pub(crate) fn join(self: &Arc<Self>, key: Key) -> Joined<T> {
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get_mut(&key) {
            slot.waiters += 1;
            return Joined::Follower(Waiter {
                rx: slot.rx.clone(),
                _leave: Leave {
                    coalescer: Arc::clone(self),
                    key,
                    id: slot.id,
                    registered: true,
                    token: slot.token.clone(),
                },
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let token = CancellationToken::new();
        let registered = slots.len() < self.capacity;
        if registered {
            slots.insert(
                key,
                Slot {
                    id,
                    waiters: 1,
                    token: token.clone(),
                    rx: rx.clone(),
                },
            );
        }
        drop(slots);
        Joined::Leader {
            waiter: Waiter {
                rx,
                _leave: Leave {
                    coalescer: Arc::clone(self),
                    key,
                    id,
                    registered,
                    token: token.clone(),
                },
            },
            flight: Flight {
                coalescer: Arc::clone(self),
                key,
                id,
                tx,
                token,
            },
        }
    }

    fn remove_if(&self, key: &Key, id: u64) {
        let mut slots = self.slots.lock();
        if slots.get(key).is_some_and(|s| s.id == id) {
            slots.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(j: Joined<u32>) -> (Waiter<u32>, Flight<u32>) {
        match j {
            Joined::Leader { waiter, flight } => (waiter, flight),
            Joined::Follower(_) => panic!("expected a new flight"),
        }
    }

    #[tokio::test]
    async fn followers_share_and_one_leaving_does_not_cancel() {
        let c = Arc::new(Coalescer::new(8));
        let (first, flight) = leader(c.join([1; 32]));
        let Joined::Follower(second) = c.join([1; 32]) else {
            panic!("expected follower")
        };
        drop(first);
        assert!(
            !flight.token.is_cancelled(),
            "one waiter left, another remains"
        );
        flight.publish(Ok(Arc::new(7)));
        assert_eq!(*second.wait().await.expect("result"), 7);
        assert_eq!(c.len(), 0);
    }

    #[tokio::test]
    async fn last_waiter_leaving_cancels_and_unregisters() {
        let c = Arc::new(Coalescer::<u32>::new(8));
        let (first, flight) = leader(c.join([2; 32]));
        let Joined::Follower(second) = c.join([2; 32]) else {
            panic!("expected follower")
        };
        drop(first);
        drop(second);
        assert!(flight.token.is_cancelled());
        assert_eq!(c.len(), 0);
        // A new identical request starts a fresh flight.
        let (_w, again) = leader(c.join([2; 32]));
        assert!(!again.token.is_cancelled());
    }

    #[tokio::test]
    async fn registry_is_bounded() {
        let c = Arc::new(Coalescer::<u32>::new(1));
        let (_a, _fa) = leader(c.join([3; 32]));
        let (_b, _fb) = leader(c.join([4; 32]));
        // [4; 32] was not registered, so an identical request cannot join it.
        let (_c, _fc) = leader(c.join([4; 32]));
        assert_eq!(c.len(), 1);
    }
}
