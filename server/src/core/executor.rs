//! The dedicated inference threads.
//!
//! `MAX_CONCURRENT` std threads (never tokio workers: backend calls block
//! for seconds) take work from one bounded channel and answer on a oneshot.
//! Each upscale task carries its GPU permit; the thread drops it only once
//! `Backend::upscale` has returned (or unwound), so the number of backend
//! calls in progress never exceeds the number of permits, whatever happened
//! to the request that asked for it. A panic is caught, answered as
//! [`Error::BackendPanic`], and the thread goes on serving.

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
    /// Starts `threads` inference threads.
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        threads: usize,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        // Every queued task holds a permit, so `threads` slots always suffice.
        let (tx, rx) = crossbeam_channel::bounded::<Work>(threads);
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
