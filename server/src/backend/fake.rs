//! A scriptable backend for tests of the core and the HTTP layer.
//!
//! It is compiled into the library (integration tests link the library
//! without `cfg(test)`) but the binary never offers it: `--backend` only
//! names real backends. The test controls the per-call delay and the next
//! calls' failure mode, and reads the number of calls, the concurrency
//! high-water mark and how many calls saw their cancel token fire.
//!
//! The output is a nearest-neighbour enlargement, so results are exact and
//! easy to assert on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Backend, BackendError, BackendInfo, CancellationToken, Job, Planar};

/// What the next call does instead of succeeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Return [`BackendError::OutOfMemory`].
    OutOfMemory,
    /// Panic.
    Panic,
    /// Return [`BackendError::Internal`].
    Internal,
    /// Return [`BackendError::DeviceLost`], as a CUDA context that is gone.
    DeviceLost,
}

/// The fake backend. Share it as `Arc<FakeBackend>` and keep a clone to
/// steer and inspect it.
#[derive(Debug)]
pub struct FakeBackend {
    delay: Mutex<Duration>,
    per_output_mpx: Mutex<Duration>,
    cores: Mutex<Option<usize>>,
    failures: Mutex<VecDeque<Failure>>,
    calls: AtomicUsize,
    running: AtomicUsize,
    max_running: AtomicUsize,
    cancelled: AtomicUsize,
    warm_ups: AtomicUsize,
    thread_inits: AtomicUsize,
    hold_warm_up: AtomicBool,
    fail_warm_up: AtomicBool,
}

/// Step between cancel-token checks, like a tile or a diffusion step.
const STEP: Duration = Duration::from_millis(5);

impl FakeBackend {
    /// A backend whose calls take `delay`.
    #[must_use]
    pub fn new(delay: Duration) -> Self {
        Self {
            delay: Mutex::new(delay),
            per_output_mpx: Mutex::new(Duration::ZERO),
            cores: Mutex::new(None),
            failures: Mutex::new(VecDeque::new()),
            calls: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            warm_ups: AtomicUsize::new(0),
            thread_inits: AtomicUsize::new(0),
            hold_warm_up: AtomicBool::new(false),
            fail_warm_up: AtomicBool::new(false),
        }
    }

    /// While `true`, `warm_up` fails with [`BackendError::Load`].
    pub fn fail_warm_up(&self, fail: bool) {
        self.fail_warm_up.store(fail, Ordering::SeqCst);
    }

    /// While `true`, `warm_up` does not return (checked every few ms).
    pub fn hold_warm_up(&self, hold: bool) {
        self.hold_warm_up.store(hold, Ordering::SeqCst);
    }

    /// Changes the per-call delay; running calls see the change too (set
    /// it to zero to release them).
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock() = delay;
    }

    /// Adds `per_mpx` to each call's delay per megapixel (10⁶ pixels) of
    /// its output, as a real model's time grows with the image.
    pub fn set_delay_per_output_megapixel(&self, per_mpx: Duration) {
        *self.per_output_mpx.lock() = per_mpx;
    }

    /// Makes calls share `cores` cores, as CPU inference does: with more
    /// calls running than cores, each advances at cores ÷ running of its
    /// pace alone (processor sharing). `None`: every call as if alone.
    pub fn share_cores(&self, cores: Option<usize>) {
        *self.cores.lock() = cores;
    }

    /// Makes the next call fail this way (failures queue up in order).
    pub fn fail_next(&self, failure: Failure) {
        self.failures.lock().push_back(failure);
    }

    /// Zeroes the call, concurrency and cancellation counts (after the
    /// server's start-up calibration, so a test counts its own calls).
    pub fn reset_counts(&self) {
        self.calls.store(0, Ordering::SeqCst);
        self.max_running.store(0, Ordering::SeqCst);
        self.cancelled.store(0, Ordering::SeqCst);
    }

    /// `upscale` calls so far.
    #[must_use]
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls running right now.
    #[must_use]
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// The most calls that ever ran at once.
    #[must_use]
    pub fn max_running(&self) -> usize {
        self.max_running.load(Ordering::SeqCst)
    }

    /// Calls that stopped because their cancel token fired.
    #[must_use]
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// `warm_up` calls so far.
    #[must_use]
    pub fn warm_ups(&self) -> usize {
        self.warm_ups.load(Ordering::SeqCst)
    }

    /// `init_thread` calls so far (one per inference thread started).
    #[must_use]
    pub fn thread_inits(&self) -> usize {
        self.thread_inits.load(Ordering::SeqCst)
    }
}

/// Decrements the running count even when the call panics.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Backend for FakeBackend {
    fn init_thread(&self) {
        self.thread_inits.fetch_add(1, Ordering::SeqCst);
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "fake".to_owned(),
            model: "fake-nearest".to_owned(),
            model_digest: "0".repeat(64),
            device: "cpu".to_owned(),
            precision: "fp32".to_owned(),
            scales: vec![1, 2, 3, 4, 8],
            profile: None,
            default_steps: 0,
            self_ensemble: false,
            tile: None,
            projection_steps: 0,
            batch_tiles: 0,
        }
    }

    fn warm_up(&self) -> Result<(), BackendError> {
        self.warm_ups.fetch_add(1, Ordering::SeqCst);
        while self.hold_warm_up.load(Ordering::SeqCst) {
            std::thread::sleep(STEP);
        }
        if self.fail_warm_up.load(Ordering::SeqCst) {
            return Err(BackendError::Load("the fake warm-up failed".to_owned()));
        }
        Ok(())
    }

    fn upscale(&self, job: &Job, cancel: &CancellationToken) -> Result<Planar, BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = Running(&self.running);
        self.max_running.fetch_max(now, Ordering::SeqCst);

        match self.failures.lock().pop_front() {
            Some(Failure::OutOfMemory) => {
                return Err(BackendError::OutOfMemory(
                    "fake: 1 GiB requested".to_owned(),
                ));
            }
            Some(Failure::Internal) => {
                return Err(BackendError::Internal("fake failure".to_owned()));
            }
            Some(Failure::DeviceLost) => {
                return Err(BackendError::DeviceLost(
                    "fake: CUDA error: an illegal memory access was encountered".to_owned(),
                ));
            }
            Some(Failure::Panic) => panic!("fake backend panic"),
            None => {}
        }

        let out_mpx =
            f64::from(job.image.width * job.scale) * f64::from(job.image.height * job.scale) / 1e6;
        let per_size = self.per_output_mpx.lock().mul_f64(out_mpx);
        // The work done so far, in seconds of a call running alone.
        let mut done = Duration::ZERO;
        let mut last = Instant::now();
        loop {
            if cancel.is_cancelled() {
                self.cancelled.fetch_add(1, Ordering::SeqCst);
                return Err(BackendError::Cancelled);
            }
            let now = Instant::now();
            let share = match *self.cores.lock() {
                #[allow(clippy::cast_precision_loss)]
                Some(cores) => (cores as f64 / self.running().max(1) as f64).min(1.0),
                None => 1.0,
            };
            done += now.duration_since(last).mul_f64(share);
            last = now;
            let left = (*self.delay.lock() + per_size).saturating_sub(done);
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.div_f64(share).min(STEP));
        }
        Ok(nearest(&job.image, job.scale))
    }
}

/// Nearest-neighbour enlargement by `scale`.
fn nearest(src: &Planar, scale: u32) -> Planar {
    let (w, h) = (src.width * scale, src.height * scale);
    let plane = src.width as usize * src.height as usize;
    let mut data = Vec::with_capacity(usize::from(src.channels) * w as usize * h as usize);
    for c in 0..usize::from(src.channels) {
        for y in 0..h {
            for x in 0..w {
                let i = (y / scale) as usize * src.width as usize + (x / scale) as usize;
                data.push(src.data[c * plane + i]);
            }
        }
    }
    Planar {
        channels: src.channels,
        width: w,
        height: h,
        data,
    }
}
