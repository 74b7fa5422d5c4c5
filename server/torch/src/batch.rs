//! Dynamic batching across requests: work items of concurrent callers that
//! share a key go through one call, up to a maximum size and a maximum
//! wait (what Triton's dynamic batcher and Ray Serve's `@serve.batch` do).
//!
//! No thread of its own: the first caller of a group is its leader. It
//! waits until the group is full or `max_wait` has passed, then runs the
//! merged call on its own thread (with its own model replica) and hands
//! every other member its share; the members block meanwhile, so each
//! keeps its GPU permit until its work has really finished. A member's
//! cancellation does not stop the merged call while another member still
//! wants it: the call sees "cancelled" only once every member is.
//!
//! Generic and torch-free, so its rules are tested with plain values.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Whether a member's request has been cancelled.
pub type Cancelled = Box<dyn Fn() -> bool + Send>;

/// Batches calls that share a key `K`; items are `T`, errors `E`.
pub struct Batcher<K, T, E> {
    max_items: usize,
    max_wait: Duration,
    open: Mutex<HashMap<K, Arc<Group<T, E>>>>,
}

impl<K, T, E> std::fmt::Debug for Batcher<K, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_items", &self.max_items)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

struct Group<T, E> {
    state: Mutex<Members<T, E>>,
    closed: Condvar,
}

struct Members<T, E> {
    /// Inputs in arrival order; the leader's is first.
    inputs: Vec<T>,
    /// Where each follower's share goes (index i+1 of the outputs).
    replies: Vec<mpsc::Sender<Result<T, E>>>,
    cancelled: Vec<Cancelled>,
    /// Sum of the members' weights (tiles).
    weight: usize,
    closed: bool,
}

/// What the merged call gets: every member's input and a check that is
/// true once every member is cancelled.
pub struct Merged<'a, T> {
    /// The inputs, the leader's first.
    pub inputs: Vec<T>,
    /// True once every member's request is cancelled.
    pub all_cancelled: &'a dyn Fn() -> bool,
}

impl<T> std::fmt::Debug for Merged<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merged")
            .field("inputs", &self.inputs.len())
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone, T: Send, E: Clone + Send> Batcher<K, T, E> {
    /// Groups of at most `max_items` weight, formed within `max_wait`.
    #[must_use]
    pub fn new(max_items: usize, max_wait: Duration) -> Self {
        Self {
            max_items: max_items.max(1),
            max_wait,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a call of `weight` items runs alone, at once: it fills a
    /// batch by itself, or batching is off (no wait).
    #[must_use]
    pub fn runs_alone(&self, weight: usize) -> bool {
        weight >= self.max_items || self.max_wait.is_zero()
    }

    /// Runs `input` (of `weight` items) as part of a batch of calls with the
    /// same `key`. The member that opens a group leads it: it runs `exec`
    /// with every member's input and must return one output per input, in
    /// order. Followers' `exec` is never called.
    ///
    /// # Errors
    /// What `exec` returns (every member gets a clone), or `lost(...)` when
    /// the leader went away without answering (it panicked).
    pub fn submit(
        &self,
        key: K,
        input: T,
        weight: usize,
        cancelled: Cancelled,
        exec: impl FnOnce(Merged<'_, T>) -> Result<Vec<T>, E>,
        lost: impl FnOnce(&str) -> E,
    ) -> Result<T, E> {
        if self.runs_alone(weight) {
            let all_cancelled = || cancelled();
            return exec(Merged {
                inputs: vec![input],
                all_cancelled: &all_cancelled,
            })
            .and_then(|mut out| out.pop().ok_or_else(|| lost("the batch returned nothing")));
        }
        let group = {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(group) = open.get(&key).cloned() {
                let mut m = group.state.lock().unwrap_or_else(PoisonError::into_inner);
                if !m.closed && m.weight + weight <= self.max_items {
                    let (tx, rx) = mpsc::channel();
                    m.inputs.push(input);
                    m.replies.push(tx);
                    m.cancelled.push(cancelled);
                    m.weight += weight;
                    if m.weight >= self.max_items {
                        m.closed = true;
                        open.remove(&key);
                        group.closed.notify_all();
                    }
                    drop(m);
                    drop(open);
                    return rx
                        .recv()
                        .unwrap_or_else(|_| Err(lost("the batch's leader went away")));
                }
                // Full: close it for its leader, and open a new one.
                m.closed = true;
                group.closed.notify_all();
                drop(m);
                open.remove(&key);
            }
            let group = Arc::new(Group {
                state: Mutex::new(Members {
                    inputs: vec![input],
                    replies: Vec::new(),
                    cancelled: vec![cancelled],
                    weight,
                    closed: false,
                }),
                closed: Condvar::new(),
            });
            open.insert(key.clone(), Arc::clone(&group));
            group
        };
        self.lead(&key, &group, exec, lost)
    }

    fn lead(
        &self,
        key: &K,
        group: &Arc<Group<T, E>>,
        exec: impl FnOnce(Merged<'_, T>) -> Result<Vec<T>, E>,
        lost: impl FnOnce(&str) -> E,
    ) -> Result<T, E> {
        let deadline = Instant::now() + self.max_wait;
        let mut m = group.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !m.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            m = group
                .closed
                .wait_timeout(m, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        m.closed = true;
        let inputs = std::mem::take(&mut m.inputs);
        let replies = std::mem::take(&mut m.replies);
        let cancelled = std::mem::take(&mut m.cancelled);
        drop(m);
        {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            if open.get(key).is_some_and(|g| Arc::ptr_eq(g, group)) {
                open.remove(key);
            }
        }
        let all_cancelled = || cancelled.iter().all(|c| c());
        let n = inputs.len();
        match exec(Merged {
            inputs,
            all_cancelled: &all_cancelled,
        }) {
            Ok(outputs) if outputs.len() == n => {
                let mut outputs = outputs.into_iter();
                let own = outputs.next();
                for (reply, out) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(out));
                }
                own.ok_or_else(|| lost("the batch returned nothing"))
            }
            Ok(outputs) => {
                let e = lost(&format!(
                    "the batch returned {} outputs for {n} inputs",
                    outputs.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
                Err(e)
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use super::*;

    type B = Batcher<u32, Vec<i32>, String>;

    /// `exec` that doubles every value and counts its calls and batch sizes.
    fn doubling(
        calls: &AtomicUsize,
        sizes: &Mutex<Vec<usize>>,
    ) -> impl FnOnce(Merged<'_, Vec<i32>>) -> Result<Vec<Vec<i32>>, String> {
        move |m| {
            calls.fetch_add(1, Ordering::SeqCst);
            sizes
                .lock()
                .unwrap()
                .push(m.inputs.iter().map(Vec::len).sum());
            Ok(m.inputs
                .into_iter()
                .map(|v| v.into_iter().map(|x| 2 * x).collect())
                .collect())
        }
    }

    fn never() -> Cancelled {
        Box::new(|| false)
    }

    #[test]
    fn concurrent_callers_share_one_call_and_get_their_own_share() {
        let b: Arc<B> = Arc::new(Batcher::new(8, Duration::from_secs(5)));
        let calls = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let start = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (b, calls, sizes, start) =
                    (b.clone(), calls.clone(), sizes.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    b.submit(
                        0,
                        vec![i, 10 * i],
                        2,
                        never(),
                        doubling(&calls, &sizes),
                        str::to_owned,
                    )
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let i = i32::try_from(i).unwrap();
            assert_eq!(h.join().unwrap().unwrap(), vec![2 * i, 20 * i]);
        }
        // Four members of weight 2 fill the group of 8 at once: one call,
        // long before the 5 s wait.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(*sizes.lock().unwrap(), vec![8]);
    }

    #[test]
    fn different_keys_never_share_a_call() {
        let b: Arc<B> = Arc::new(Batcher::new(8, Duration::from_millis(200)));
        let calls = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = (0..2u32)
            .map(|k| {
                let (b, calls, sizes) = (b.clone(), calls.clone(), sizes.clone());
                std::thread::spawn(move || {
                    b.submit(
                        k,
                        vec![1],
                        1,
                        never(),
                        doubling(&calls, &sizes),
                        str::to_owned,
                    )
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), vec![2]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_lone_caller_runs_after_the_wait_and_a_full_one_at_once() {
        let b: B = Batcher::new(4, Duration::from_millis(50));
        let (calls, sizes) = (AtomicUsize::new(0), Mutex::new(Vec::new()));
        let started = Instant::now();
        assert_eq!(
            b.submit(
                0,
                vec![3],
                1,
                never(),
                doubling(&calls, &sizes),
                str::to_owned
            )
            .unwrap(),
            vec![6]
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        let started = Instant::now();
        b.submit(
            0,
            vec![1; 4],
            4,
            never(),
            doubling(&calls, &sizes),
            str::to_owned,
        )
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "a full batch does not wait"
        );
    }

    #[test]
    fn the_call_is_cancelled_only_when_every_member_is() {
        let b: Arc<B> = Arc::new(Batcher::new(2, Duration::from_secs(5)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let start = Arc::new(Barrier::new(2));
        let handles: Vec<_> = [true, false]
            .into_iter()
            .map(|gone| {
                let (b, seen, start) = (b.clone(), seen.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    b.submit(
                        0,
                        vec![1],
                        1,
                        Box::new(move || gone),
                        |m| {
                            seen.lock().unwrap().push((m.all_cancelled)());
                            Ok(m.inputs)
                        },
                        str::to_owned,
                    )
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        assert_eq!(
            *seen.lock().unwrap(),
            vec![false],
            "one member still wants it"
        );
    }

    #[test]
    fn a_failure_reaches_every_member() {
        let b: Arc<B> = Arc::new(Batcher::new(2, Duration::from_secs(5)));
        let start = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (b, start) = (b.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    b.submit(
                        0,
                        vec![1],
                        1,
                        never(),
                        |_| Err("out of memory".to_owned()),
                        str::to_owned,
                    )
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap_err(), "out of memory");
        }
    }
}
