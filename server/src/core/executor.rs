//! The dedicated inference threads.
//!
//! `MAX_CONCURRENT` std threads (never tokio workers: backend calls block
//! for seconds) take work from one bounded channel and answer on a oneshot.
//! Each upscale task carries its GPU permit; the thread drops it only once
//! `Backend::upscale` has returned (or unwound), so the number of backend
//! calls in progress never exceeds the number of permits, whatever happened
//! to the request that asked for it. A panic is caught, answered as
//! [`Error::BackendPanic`], and the thread goes on serving.
//!
//! With `HNDSR_INFERENCE_NICE` the threads lower their own OS priority
//! (nice) before they touch the backend, so the libtorch worker threads
//! they start inherit it: on a busy CPU the HTTP threads (probes, refusals,
//! uploads) are then scheduled first.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::backend::{Backend, BackendError, CancellationToken, ConversionCpu, Job, Planar};
use crate::error::Error;
use crate::metrics::Metrics;

/// A backend permit; counts in `hndsr_active_requests` while held.
#[derive(Debug)]
pub(crate) struct Permit {
    _permit: OwnedSemaphorePermit,
    active: IntGauge,
}

impl Permit {
    pub(crate) fn new(permit: OwnedSemaphorePermit, active: IntGauge) -> Self {
        active.inc();
        Self {
            _permit: permit,
            active,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// One upscale, as handed to an inference thread.
#[derive(Debug)]
pub(crate) struct Task {
    pub job: Job,
    pub cancel: CancellationToken,
    pub permit: Permit,
    pub reply: oneshot::Sender<Result<Output, Error>>,
}

/// What an inference thread hands back.
#[derive(Debug)]
pub(crate) struct Output {
    pub image: Planar,
    pub inference: Duration,
    /// CPU time of this thread in the backend call, and of the tensor
    /// conversions within it.
    pub model_cpu: Duration,
    pub conversions: ConversionCpu,
}

#[derive(Debug)]
enum Work {
    WarmUp(oneshot::Sender<Result<(), BackendError>>),
    Upscale(Box<Task>),
}

/// Handle to the inference threads; they stop when it is dropped.
#[derive(Debug)]
pub(crate) struct Executor {
    tx: Sender<Work>,
    threads: usize,
    alive: Arc<AtomicUsize>,
    /// Set for good once the backend reports its device lost.
    device_lost: Arc<AtomicBool>,
}

/// Decrements the live-thread count however the thread ends.
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Executor {
    /// Starts `threads` inference threads, each `nice` steps below the
    /// caller's priority.
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        threads: usize,
        nice: u8,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        // Every queued task holds a permit, so `threads` slots always suffice.
        let (tx, rx) = crossbeam_channel::bounded::<Work>(threads);
        tracing::info!(
            threads,
            nice,
            "inference threads (nice: steps below the HTTP threads)"
        );
        let alive = Arc::new(AtomicUsize::new(0));
        let device_lost = Arc::new(AtomicBool::new(false));
        for i in 0..threads {
            let (rx, backend, metrics) = (rx.clone(), Arc::clone(&backend), metrics.clone());
            let lost = Arc::clone(&device_lost);
            alive.fetch_add(1, Ordering::SeqCst);
            let guard = Alive(Arc::clone(&alive));
            std::thread::Builder::new()
                .name(format!("hndsr-infer-{i}"))
                .spawn(move || {
                    let _alive = guard;
                    lower_priority(nice);
                    worker(&rx, backend.as_ref(), &metrics, &lost);
                })?;
        }
        Ok(Self {
            tx,
            threads,
            alive,
            device_lost,
        })
    }

    /// Whether every inference thread is still running and the device has
    /// not been lost.
    pub(crate) fn healthy(&self) -> bool {
        self.alive.load(Ordering::SeqCst) == self.threads
            && !self.device_lost.load(Ordering::SeqCst)
    }

    /// Runs `Backend::warm_up` on one inference thread.
    pub(crate) async fn warm_up(&self) -> Result<(), BackendError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Work::WarmUp(reply))
            .map_err(|e| BackendError::Load(e.to_string()))?;
        rx.await
            .map_err(|_| BackendError::Load("the inference thread went away".to_owned()))?
    }

    /// Queues an upscale; the answer comes on the task's `reply`.
    pub(crate) fn upscale(&self, task: Task) -> Result<(), Error> {
        self.submit(Work::Upscale(Box::new(task)))
    }

    fn submit(&self, work: Work) -> Result<(), Error> {
        self.tx.try_send(work).map_err(|e| match e {
            TrySendError::Full(_) => Error::Internal("the inference queue is full".to_owned()),
            TrySendError::Disconnected(_) => {
                Error::Internal("the inference threads have stopped".to_owned())
            }
        })
    }
}

/// Lowers the calling thread's priority by `steps` nice values (Linux keeps
/// the nice value per thread, and a thread starts with its creator's).
/// Raising one's nice value needs no privilege; a refusal (a seccomp
/// profile, say) is logged and the thread runs at normal priority.
#[cfg(target_os = "linux")]
fn lower_priority(steps: u8) {
    if steps == 0 {
        return;
    }
    let lowered = rustix::process::getpriority_process(None).and_then(|now| {
        let target = (now + i32::from(steps)).min(i32::from(crate::config::MAX_NICE));
        rustix::process::setpriority_process(None, target).map(|()| target)
    });
    match lowered {
        Ok(nice) => tracing::debug!(nice, "inference thread priority lowered"),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot lower the inference thread's priority; it competes with the HTTP threads"
        ),
    }
}

/// Elsewhere `setpriority(PRIO_PROCESS, 0)` would lower the whole process.
#[cfg(not(target_os = "linux"))]
fn lower_priority(steps: u8) {
    if steps > 0 {
        tracing::warn!("inference thread priority is only lowered on Linux");
    }
}

fn worker(rx: &Receiver<Work>, backend: &dyn Backend, metrics: &Metrics, device_lost: &AtomicBool) {
    backend.init_thread();
    while let Ok(work) = rx.recv() {
        match work {
            Work::WarmUp(reply) => {
                let result =
                    catch_unwind(AssertUnwindSafe(|| backend.warm_up())).unwrap_or_else(|_| {
                        Err(BackendError::Load(
                            "the backend panicked while warming up".to_owned(),
                        ))
                    });
                let _ = reply.send(result);
            }
            Work::Upscale(task) => {
                let Task {
                    job,
                    cancel,
                    permit,
                    reply,
                } = *task;
                let result = catch_unwind(AssertUnwindSafe(|| {
                    run(backend, metrics, &job, &cancel, permit, device_lost)
                }))
                .unwrap_or_else(|_| {
                    tracing::error!("the backend panicked; the inference thread goes on");
                    Err(Error::BackendPanic)
                });
                // The requester may be gone (timeout, disconnect); nothing to do then.
                let _ = reply.send(result);
            }
        }
    }
}

fn run(
    backend: &dyn Backend,
    metrics: &Metrics,
    job: &Job,
    cancel: &CancellationToken,
    permit: Permit,
    device_lost: &AtomicBool,
) -> Result<Output, Error> {
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let started = Instant::now();
    let cpu = cpu_time::ThreadTime::now();
    let _ = crate::backend::take_conversions();
    let result = backend.upscale(job, cancel);
    let inference = started.elapsed();
    let thread_cpu = cpu.elapsed();
    let conversions = crate::backend::take_conversions();
    // The backend has returned: only now may another call start.
    drop(permit);
    metrics.observe_inference(inference);
    if matches!(result, Err(BackendError::DeviceLost(_))) {
        // Sticky: `/healthz` fails from now on and the kubelet restarts the
        // container; a new process gets a new CUDA context.
        device_lost.store(true, Ordering::SeqCst);
    }
    let image = result.map_err(Error::from_backend)?;
    Ok(Output {
        image,
        inference,
        model_cpu: thread_cpu.saturating_sub(conversions.to_tensor + conversions.from_tensor),
        conversions,
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::backend::fake::FakeBackend;
    use crate::backend::{BackendInfo, CancellationToken, Job, Planar};

    /// Records the nice value of the thread that warms it up, and of a
    /// thread that one starts (as libtorch starts its OpenMP workers).
    #[derive(Debug)]
    struct Priorities {
        fake: FakeBackend,
        seen: Mutex<Vec<(i32, i32)>>,
    }

    impl Backend for Priorities {
        fn info(&self) -> BackendInfo {
            self.fake.info()
        }
        fn warm_up(&self) -> Result<(), BackendError> {
            let nice = || rustix::process::getpriority_process(None).expect("getpriority");
            let own = nice();
            let child = std::thread::spawn(nice).join().expect("child thread");
            self.seen.lock().expect("lock").push((own, child));
            Ok(())
        }
        fn upscale(&self, job: &Job, cancel: &CancellationToken) -> Result<Planar, BackendError> {
            self.fake.upscale(job, cancel)
        }
    }

    async fn seen_with(nice: u8) -> (i32, i32) {
        let backend = Arc::new(Priorities {
            fake: FakeBackend::new(Duration::ZERO),
            seen: Mutex::new(Vec::new()),
        });
        let executor = Executor::start(
            Arc::clone(&backend) as Arc<dyn Backend>,
            1,
            nice,
            &Metrics::new(),
        )
        .expect("threads start");
        executor.warm_up().await.expect("warm-up");
        let seen = backend.seen.lock().expect("lock");
        seen[0]
    }

    #[tokio::test]
    async fn inference_threads_and_the_threads_they_start_run_at_lower_priority() {
        let base = rustix::process::getpriority_process(None).expect("getpriority");
        let max = i32::from(crate::config::MAX_NICE);
        let want = (base + 3).min(max);
        assert_eq!(seen_with(3).await, (want, want));
        assert_eq!(
            seen_with(0).await,
            (base, base),
            "0 leaves the priority alone"
        );
        assert_eq!(
            seen_with(19).await,
            (max, max),
            "capped at the lowest priority"
        );
        let after = rustix::process::getpriority_process(None).expect("getpriority");
        assert_eq!(after, base, "the caller's own priority is untouched");
    }
}
