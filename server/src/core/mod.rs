//! The admission core: no HTTP, no torch.
//!
//! A request goes [`Core::admit`] (in-flight counter against
//! `MAX_QUEUE_DEPTH`; full → 503 at once, nothing queued) →
//! [`Core::upscale`]: header probe and budgets → deadline check (the
//! estimated wait for the work ahead plus the request's own estimated
//! service time must fit what is left of its deadline, see [`estimate`]) →
//! coalescing (identical concurrent requests share one flight) → the
//! flight decodes on the blocking pool, waits for one of
//! `MAX_CONCURRENT` permits → an inference thread runs the backend with the
//! flight's cancel token and releases the permit when the backend has
//! returned → the blocking pool encodes. Dropping the `upscale` future (timeout, client
//! disconnect) leaves the flight; the last waiter leaving cancels it.

mod coalesce;
pub mod estimate;
mod executor;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, oneshot};

use self::coalesce::{Coalescer, Joined};
use self::estimate::{Backlog, Entry, Estimator, Refusal};
use self::executor::{Executor, Permit, Task};
use crate::backend::{Backend, BackendError, BackendInfo, CancellationToken, Job, Planar};
use crate::codec;
use crate::config::{Limits, MAX_SAMPLING_STEPS};
use crate::error::{Error, jittered_retry_after};
use crate::metrics::{Metrics, Stage};

/// Bodies above this are hashed on a blocking thread, not a tokio worker.
const INLINE_HASH_BYTES: usize = 256 * 1024;

/// Input edges the warm-up calibration times, smallest first: it stops at
/// the first one that takes [`CALIBRATION_TARGET`] (a slow profile on a
/// CPU) and fits the estimator through the last two.
const CALIBRATION_SIDES: [u32; 4] = [32, 64, 128, 256];
/// See [`CALIBRATION_SIDES`].
const CALIBRATION_TARGET: Duration = Duration::from_millis(500);

/// When a request must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// The instant.
    pub at: Instant,
    /// Its length from the request's arrival (the server's
    /// `REQUEST_TIMEOUT_S`, or shorter when the client asked).
    pub length: Duration,
}

impl Deadline {
    /// A deadline `length` from now.
    #[must_use]
    pub fn after(length: Duration) -> Self {
        Self {
            at: Instant::now() + length,
            length,
        }
    }

    /// What is left of it.
    #[must_use]
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// One upscale request, as the HTTP layer hands it over.
#[derive(Debug, Clone)]
pub struct UpscaleRequest {
    /// The encoded image (PNG, JPEG or TIFF).
    pub image: Bytes,
    /// Upscaling factor; `None` means the configured default.
    pub scale: Option<u32>,
    /// Diffusion steps; `None` means the backend's default.
    pub steps: Option<u32>,
    /// Seed of the stochastic parts.
    pub seed: u64,
    /// When the answer is due.
    pub deadline: Deadline,
    /// How the client wants the answer encoded.
    pub output: codec::OutputPrefs,
}

/// Where the time of a computation went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Waiting for a backend permit.
    pub queue: Duration,
    /// Decoding the input.
    pub decode: Duration,
    /// In the backend.
    pub inference: Duration,
    /// Encoding the output.
    pub encode: Duration,
    /// The service time admission estimated (decode + inference + encode).
    pub estimate: Duration,
}

/// A finished upscale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upscaled {
    /// The encoded output.
    pub image: Bytes,
    /// Its media type (`image/png` or `image/tiff`).
    pub content_type: &'static str,
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// The factor applied.
    pub scale: u32,
    /// Stage timings of the computation.
    pub timings: Timings,
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The result, possibly shared with identical requests.
    pub upscaled: Arc<Upscaled>,
    /// Whether this request joined another's computation.
    pub coalesced: bool,
}

/// Proof of admission: one in-flight slot, freed on drop.
#[derive(Debug)]
pub struct Ticket {
    inner: Arc<Inner>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.inner.metrics.admitted_requests.dec();
    }
}

/// The admission core. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: Limits,
    default_scale: u32,
    info: BackendInfo,
    in_flight: AtomicUsize,
    permits: Arc<Semaphore>,
    /// `HNDSR_MEMORY_BUDGET_MB` as MiB permits; `None`: no budget.
    memory: Option<Arc<Semaphore>>,
    executor: Executor,
    flights: Arc<Coalescer<Upscaled>>,
    estimator: Estimator,
    backlog: Arc<Backlog>,
    /// For [`Backend::work`]; the inference threads hold it too.
    backend: Shared,
    metrics: Metrics,
}

/// The backend, shared with the inference threads (`dyn Backend` has no
/// `Debug`).
struct Shared(Arc<dyn Backend>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Backend")
            .field(&self.0.info().backend)
            .finish()
    }
}

impl std::ops::Deref for Shared {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

/// Decrements `hndsr_queue_depth` however the wait ends.
struct Queued(prometheus::IntGauge);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Core {
    /// Starts the inference threads.
    ///
    /// # Errors
    /// When a thread cannot be spawned, or the default scale is not one the
    /// backend supports.
    pub fn start(
        backend: Arc<dyn Backend>,
        limits: Limits,
        default_scale: u32,
        metrics: Metrics,
    ) -> Result<Self, BackendError> {
        let info = backend.info();
        if !info.scales.contains(&default_scale) {
            return Err(BackendError::Load(format!(
                "default scale {default_scale} is not supported by backend {} (supported: {:?})",
                info.backend, info.scales
            )));
        }
        backend.attach_metrics(&metrics);
        let threads = limits.max_concurrent.get();
        let executor = Executor::start(
            Arc::clone(&backend),
            threads,
            limits.inference_nice,
            &metrics,
        )
        .map_err(|e| BackendError::Load(format!("starting the inference threads: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(threads)),
                memory: limits.memory_budget_mib.map(|mib| {
                    let mib = usize::try_from(mib).unwrap_or(usize::MAX);
                    Arc::new(Semaphore::new(mib.min(Semaphore::MAX_PERMITS)))
                }),
                flights: Arc::new(Coalescer::new(limits.max_queue_depth.get())),
                in_flight: AtomicUsize::new(0),
                estimator: Estimator::new(),
                backlog: Backlog::new(),
                backend: Shared(backend),
                default_scale,
                info,
                executor,
                metrics,
                limits,
            }),
        })
    }

    /// Runs the backend's warm-up on an inference thread, then calibrates
    /// the service-time estimator by timing the request path (decode,
    /// backend, PNG encode) on inputs of growing size.
    ///
    /// # Errors
    /// What the backend's `warm_up` returns, or a failed calibration run.
    pub async fn warm_up(&self) -> Result<(), BackendError> {
        self.inner.executor.warm_up().await?;
        self.calibrate().await
    }

    async fn calibrate(&self) -> Result<(), BackendError> {
        let inner = &self.inner;
        let mut points: Vec<(u32, u64, Duration)> = Vec::new();
        for side in CALIBRATION_SIDES {
            let (work, took) = time_request_path(inner, side).await?;
            points.push((side, work, took));
            if points.len() >= 2 && took >= CALIBRATION_TARGET {
                break;
            }
        }
        let [.., small, large] = points[..] else {
            return Ok(());
        };
        inner
            .estimator
            .calibrate((small.1, small.2), (large.1, large.2));
        // The larger size again, on every permit at once: how much the
        // computations slow each other.
        let slots = inner.limits.max_concurrent.get();
        let sharing = if slots > 1 {
            let runs = (0..slots).map(|_| time_request_path(inner, large.0));
            let together = futures::future::try_join_all(runs).await?;
            let sum: Duration = together.iter().map(|(_, took)| *took).sum();
            let mean = sum / u32::try_from(slots).unwrap_or(u32::MAX);
            estimate::Sharing::measured(slots, large.2, mean)
        } else {
            estimate::Sharing::default()
        };
        inner.estimator.calibrate_sharing(sharing);
        inner.backlog.set_sharing(sharing);
        tracing::info!(
            small_pixels = small.1,
            small_ms = small.2.as_millis(),
            large_pixels = large.1,
            large_ms = large.2.as_millis(),
            one_mpx_ms = inner.estimator.service(1_000_000).as_millis(),
            slots,
            slowdown_with_all_slots_busy = sharing.full,
            "service-time estimator calibrated"
        );
        Ok(())
    }

    /// Whether every inference thread is alive and the device usable.
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.inner.executor.healthy()
    }

    /// The estimated service time of upscaling a `width`×`height` image by
    /// `scale` (zero before warm-up).
    #[must_use]
    pub fn estimate(&self, width: u32, height: u32, scale: u32) -> Duration {
        let work = self.inner.backend.work(width, height, scale, None);
        self.inner.estimator.service(work)
    }

    /// The factor admission multiplies estimates by (see [`estimate`]).
    #[must_use]
    pub fn deadline_margin(&self) -> f64 {
        self.inner.estimator.margin()
    }

    /// How much slower each computation runs with every permit busy than
    /// alone (see [`estimate::Sharing`]).
    #[must_use]
    pub fn shared_slowdown(&self) -> f64 {
        self.inner.estimator.sharing().full
    }

    /// The backend's self-description.
    #[must_use]
    pub fn info(&self) -> &BackendInfo {
        &self.inner.info
    }

    /// The limits in force.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The factor used when a request names none.
    #[must_use]
    pub fn default_scale(&self) -> u32 {
        self.inner.default_scale
    }

    /// Requests admitted and not finished.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Takes an in-flight slot, or refuses at once when `MAX_QUEUE_DEPTH`
    /// requests are in flight.
    ///
    /// # Errors
    /// [`Error::Overloaded`] with a jittered retry hint.
    pub fn admit(&self) -> Result<Ticket, Error> {
        let max = self.inner.limits.max_queue_depth.get();
        self.inner
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| {
                self.inner.metrics.admitted_requests.inc();
                Ticket {
                    inner: Arc::clone(&self.inner),
                }
            })
            .map_err(|_| Error::Overloaded {
                retry_after: jittered_retry_after(),
            })
    }

    /// Upscales one image. Cancel-safe: dropping the future leaves the
    /// computation, which stops once no request waits for it.
    ///
    /// # Errors
    /// Budget and format errors before any work; backend failures after.
    pub async fn upscale(&self, _ticket: &Ticket, req: UpscaleRequest) -> Result<Answer, Error> {
        let inner = &self.inner;
        let scale = req.scale.unwrap_or(inner.default_scale);
        if !inner.info.scales.contains(&scale) {
            return Err(Error::Unprocessable(format!(
                "scale {scale} is not supported; supported: {:?}",
                inner.info.scales
            )));
        }
        if let Some(steps) = req.steps.filter(|s| *s > MAX_SAMPLING_STEPS) {
            return Err(Error::Unprocessable(format!(
                "steps {steps} exceeds the maximum of {MAX_SAMPLING_STEPS}"
            )));
        }
        let probe = codec::probe(&req.image, inner.limits.max_image_pixels)?;
        let factor = u64::from(scale) * u64::from(scale);
        let out_pixels = probe.pixels().saturating_mul(factor);
        if out_pixels > inner.limits.max_output_pixels {
            return Err(Error::ImageTooLarge {
                what: "output",
                width: u64::from(probe.width) * u64::from(scale),
                height: u64::from(probe.height) * u64::from(scale),
                pixels: out_pixels,
                limit: inner.limits.max_output_pixels,
            });
        }

        let need_mib = memory_need_mib(probe.pixels(), out_pixels, inner.info.projection_steps > 0);
        if let Some(budget_mib) = inner.limits.memory_budget_mib
            && need_mib > budget_mib
        {
            return Err(Error::MemoryBudget {
                needed_mib: need_mib,
                budget_mib,
            });
        }

        let work = inner
            .backend
            .work(probe.width, probe.height, scale, req.steps);
        let backlog = self.admit_by_estimate(&req, work, probe, scale)?;

        let key = self.key(&req, scale).await?;
        match inner.flights.join(key) {
            Joined::Follower(waiter) => {
                // It computes nothing: the leader's place is the flight's.
                drop(backlog);
                inner.metrics.inc_coalesced();
                let upscaled = waiter.wait().await?;
                Ok(Answer {
                    upscaled,
                    coalesced: true,
                })
            }
            Joined::Leader { waiter, flight } => {
                let token = flight.token.clone();
                let inner = Arc::clone(inner);
                let cost = Cost {
                    need_mib,
                    work,
                    backlog,
                };
                tokio::spawn(async move {
                    let result = compute(&inner, req, scale, cost, token).await.map(Arc::new);
                    flight.publish(result);
                });
                let upscaled = waiter.wait().await?;
                Ok(Answer {
                    upscaled,
                    coalesced: false,
                })
            }
        }
    }

    /// Refuses at once a request that cannot finish within its deadline:
    /// 422 when it would be over the deadline even alone on this pod, 503
    /// when the work ahead, the computations it would share the device
    /// with and the current pace make it late, or when it would make a
    /// running computation late. Returns its place in the backlog.
    fn admit_by_estimate(
        &self,
        req: &UpscaleRequest,
        work: u64,
        probe: codec::Probe,
        scale: u32,
    ) -> Result<Entry, Error> {
        let inner = &self.inner;
        // 422 only for what this pod cannot do in the deadline even alone;
        // what the current load makes late is the 503 below.
        let solo = inner.estimator.solo(work).mul_f64(estimate::MIN_MARGIN);
        if solo > req.deadline.length {
            return Err(Error::DeadlineTooSlow {
                estimate: solo,
                limit: req.deadline.length,
                server_max: inner.limits.request_timeout,
                out_width: u64::from(probe.width) * u64::from(scale),
                out_height: u64::from(probe.height) * u64::from(scale),
            });
        }
        let now = Instant::now();
        let planned = estimate::Request {
            work,
            deadline: req.deadline.at,
            slots: inner.limits.max_concurrent.get(),
        };
        inner
            .backlog
            .admit(&inner.estimator, planned, now)
            .map_err(|refusal| match refusal {
                Refusal::Late { estimate, excess } => Error::DeadlineWait {
                    estimate,
                    remaining: req.deadline.at.saturating_duration_since(now),
                    // Once the queue ahead has shrunk by the excess, it
                    // would fit.
                    retry_after: whole_seconds(excess),
                },
                Refusal::Crowded { done_in } => Error::DeadlineCrowded {
                    retry_after: whole_seconds(done_in),
                },
            })
    }

    async fn key(&self, req: &UpscaleRequest, scale: u32) -> Result<coalesce::Key, Error> {
        let mut params = Vec::with_capacity(96);
        params.extend_from_slice(&scale.to_le_bytes());
        params.extend_from_slice(&req.steps.map_or(u64::MAX, u64::from).to_le_bytes());
        params.extend_from_slice(&req.seed.to_le_bytes());
        // Answers in another encoding are other answers.
        params.push(match req.output.format {
            None => 0,
            Some(codec::Container::Png) => 1,
            Some(codec::Container::Jpeg) => 2,
            Some(codec::Container::Tiff) => 3,
        });
        params.extend_from_slice(req.output.compression.as_str().as_bytes());
        params.extend_from_slice(self.inner.info.model_digest.as_bytes());
        let image = req.image.clone();
        let hash = move || -> coalesce::Key {
            let mut h = Sha256::new();
            h.update(&params);
            h.update(&image);
            h.finalize().into()
        };
        if req.image.len() <= INLINE_HASH_BYTES {
            Ok(hash())
        } else {
            tokio::task::spawn_blocking(hash)
                .await
                .map_err(|e| Error::Internal(format!("hashing the request: {e}")))
        }
    }
}

/// Host bytes a request holds per input pixel: the decoded planar f32
/// samples and their tensor (4 channels at most, 4 bytes each, twice).
const INPUT_BYTES_PER_PIXEL: u64 = 32;
/// Host bytes per output pixel: the blend accumulator (4 × f32), the
/// weight sum (f32), the planar copy (4 × f32), the encoder's samples (up
/// to 4 × u16) and the alpha and gray intermediates, rounded up (measured:
/// 1.75–1.9× what an RGB request takes, docs/benchmarks.md). On CUDA the
/// blend buffers are in device memory instead, which this budget does not
/// cover (a device out-of-memory answers 503); the charge stays, as an
/// upper bound of the host side.
const OUTPUT_BYTES_PER_PIXEL: u64 = 64;
/// More host bytes per output pixel with the LR-consistency projection on:
/// `Dᵀp` each step, then the correction `Dᵀz` and the corrected image,
/// beside the estimate (2 × 3 × f32; measured: 16 B per output pixel for
/// RGB, docs/benchmarks.md).
const PROJECTION_BYTES_PER_PIXEL: u64 = 24;

/// A grey-to-colour gradient PNG of `side`², the input the calibration
/// times (a real image's decode and encode, not a constant's).
fn calibration_png(side: u32) -> Result<Bytes, BackendError> {
    let n = side as usize * side as usize;
    let mut data = Vec::with_capacity(3 * n);
    for c in 0..3u32 {
        for i in 0..n {
            let (x, y) = ((i % side as usize) as u32, (i / side as usize) as u32);
            let v = ((x * (c + 1) + y * (3 - c)) % 256) as f32 / 255.0;
            data.push(v);
        }
    }
    let planar = Planar {
        channels: 3,
        width: side,
        height: side,
        data,
    };
    let layout = codec::Layout {
        format: codec::Container::Png,
        depth: codec::BitDepth::Eight,
        compression: codec::PngCompression::default(),
    };
    codec::encode(&planar, layout)
        .map(|e| Bytes::from(e.bytes))
        .map_err(|e| BackendError::Load(format!("encoding the calibration image: {e}")))
}

/// What admission decided a computation will cost.
#[derive(Debug)]
struct Cost {
    /// Its share of the memory budget.
    need_mib: u64,
    /// Work units ([`Backend::work`]).
    work: u64,
    /// Its place in the backlog, with its estimated service time.
    backlog: Entry,
}

/// A Retry-After of at least a second, in whole seconds.
fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64)
}

/// The share of the memory budget a request waits for, in MiB (at least 1).
fn memory_need_mib(in_pixels: u64, out_pixels: u64, projection: bool) -> u64 {
    let per_output_pixel = OUTPUT_BYTES_PER_PIXEL
        + if projection {
            PROJECTION_BYTES_PER_PIXEL
        } else {
            0
        };
    let bytes = in_pixels
        .saturating_mul(INPUT_BYTES_PER_PIXEL)
        .saturating_add(out_pixels.saturating_mul(per_output_pixel));
    bytes.div_ceil(1024 * 1024).max(1)
}

/// One flight: wait for its share of the memory budget and a permit (or
/// for every waiter to leave), then run on an inference thread.
async fn compute(
    inner: &Inner,
    req: UpscaleRequest,
    scale: u32,
    cost: Cost,
    cancel: CancellationToken,
) -> Result<Upscaled, Error> {
    inner.metrics.queue_depth.inc();
    let queued = Queued(inner.metrics.queue_depth.clone());
    let Cost {
        need_mib,
        work,
        backlog,
    } = cost;
    let estimate = backlog.estimate();
    // Memory before the permit, always in that order: a request that holds
    // a permit never waits for memory, so the two cannot deadlock.
    let _memory = match &inner.memory {
        None => None,
        Some(budget) => {
            let need = u32::try_from(need_mib).unwrap_or(u32::MAX);
            Some(tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(Error::Cancelled),
                share = Arc::clone(budget).acquire_many_owned(need) => {
                    share.map_err(|_| Error::Internal("the memory semaphore is closed".to_owned()))?
                }
            })
        }
    };
    // Decoded before the permit: the permit (the GPU) is for the backend
    // alone, and decoding overlaps other requests' inference.
    let (image, layout, decode) = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(Error::Cancelled),
        decoded = decode_off_thread(req.image, inner.limits.max_image_pixels, &inner.metrics) => decoded?,
    };
    let queued_at = Instant::now();
    let permit = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(Error::Cancelled),
        permit = Arc::clone(&inner.permits).acquire_owned() => {
            permit.map_err(|_| Error::Internal("the permit semaphore is closed".to_owned()))?
        }
    };
    drop(queued);
    backlog.start();
    let started = Instant::now();
    let queue = queued_at.elapsed();
    inner.metrics.observe_queue_wait(queue);

    let job = Job {
        image,
        scale,
        steps: req.steps,
        seed: req.seed,
    };
    let permit = Permit::new(permit, inner.metrics.active_requests.clone());
    let (out, inference) = match infer(inner, job, cancel, permit).await {
        Ok(out) => out,
        Err(e) => {
            if matches!(e, Error::Cancelled) {
                // It ran this long without finishing: a lower bound.
                inner.estimator.observe_at_least(
                    work,
                    decode + started.elapsed(),
                    backlog.mean_running(),
                );
            }
            return Err(e);
        }
    };
    let running = backlog.mean_running();
    drop(backlog);
    let (width, height) = (out.width, out.height);
    let (encoded, encode) = encode_off_thread(out, layout.with(req.output), &inner.metrics).await?;
    let service = decode + inference + encode;
    inner.estimator.observe(work, service, running);
    inner.estimator.record_error(estimate, service);
    inner.metrics.observe_estimate(estimate, service);
    Ok(Upscaled {
        image: Bytes::from(encoded.bytes),
        content_type: encoded.content_type,
        width,
        height,
        scale,
        timings: Timings {
            queue,
            decode,
            inference,
            encode,
            estimate,
        },
    })
}

/// Times one request's path (decode, backend, encode) on a generated
/// `side`² image at the default scale, for calibration; returns its work
/// units and the time.
async fn time_request_path(inner: &Inner, side: u32) -> Result<(u64, Duration), BackendError> {
    let scale = inner.default_scale;
    let failed = |e: Error| BackendError::Load(format!("calibration at {side}²: {e}"));
    let image = calibration_png(side)?;
    let work = inner.backend.work(side, side, scale, None);
    let (planar, layout, decode) = decode_off_thread(image, u64::MAX, &inner.metrics)
        .await
        .map_err(failed)?;
    let permit = Arc::clone(&inner.permits)
        .acquire_owned()
        .await
        .map_err(|_| BackendError::Load("the permit semaphore is closed".to_owned()))?;
    let job = Job {
        image: planar,
        scale,
        steps: None,
        seed: 0,
    };
    // Not client demand: counted apart from `hndsr_active_requests`, which
    // autoscalers read (with every permit busy at once, a pod warming up
    // would otherwise ask for more replicas).
    let calibrating = prometheus::IntGauge::new(
        "hndsr_calibration_computations",
        "calibration computations running (not exported)",
    )
    .map_err(|e| BackendError::Load(format!("calibration gauge: {e}")))?;
    let (out, inference) = infer(
        inner,
        job,
        CancellationToken::new(),
        Permit::new(permit, calibrating),
    )
    .await
    .map_err(failed)?;
    let (_, encode) = encode_off_thread(out, layout, &inner.metrics)
        .await
        .map_err(failed)?;
    Ok((work, decode + inference + encode))
}

/// Decodes on the blocking pool; returns the image, its layout and the time.
async fn decode_off_thread(
    image: Bytes,
    max_pixels: u64,
    metrics: &Metrics,
) -> Result<(Planar, codec::Layout, Duration), Error> {
    let metrics = metrics.clone();
    tokio::task::spawn_blocking(move || {
        let (started, cpu) = (Instant::now(), cpu_time::ThreadTime::now());
        let decoded = codec::decode(&image, max_pixels);
        metrics.observe_stage_cpu(Stage::Decode, cpu.elapsed());
        decoded.map(|(p, l)| (p, l, started.elapsed()))
    })
    .await
    .map_err(|e| Error::Internal(format!("the decoding task failed: {e}")))?
}

/// Encodes on the blocking pool; returns the file and the time.
async fn encode_off_thread(
    image: Planar,
    layout: codec::Layout,
    metrics: &Metrics,
) -> Result<(codec::Encoded, Duration), Error> {
    let metrics = metrics.clone();
    tokio::task::spawn_blocking(move || {
        let (started, cpu) = (Instant::now(), cpu_time::ThreadTime::now());
        let encoded = codec::encode(&image, layout);
        metrics.observe_stage_cpu(Stage::Encode, cpu.elapsed());
        encoded.map(|e| (e, started.elapsed()))
    })
    .await
    .map_err(|e| Error::Internal(format!("the encoding task failed: {e}")))?
}

/// Runs `job` on an inference thread under `permit`; returns the output
/// (checked against the job's shape) and the time in the backend.
async fn infer(
    inner: &Inner,
    job: Job,
    cancel: CancellationToken,
    permit: Permit,
) -> Result<(Planar, Duration), Error> {
    let (channels, want_w, want_h) = (
        job.image.channels,
        job.image.width * job.scale,
        job.image.height * job.scale,
    );
    let (reply, answer) = oneshot::channel();
    inner.executor.upscale(Task {
        job,
        cancel,
        permit,
        reply,
    })?;
    let out = answer
        .await
        .map_err(|_| Error::Internal("the inference thread dropped the request".to_owned()))??;
    if out.image.channels != channels || out.image.width != want_w || out.image.height != want_h {
        return Err(Error::Internal(format!(
            "backend returned {}x{}x{}, expected {want_w}x{want_h}x{channels}",
            out.image.width, out.image.height, out.image.channels
        )));
    }
    let m = &inner.metrics;
    m.observe_stage_cpu(Stage::ToTensor, out.conversions.to_tensor);
    m.observe_stage_cpu(Stage::Model, out.model_cpu);
    m.observe_stage_cpu(Stage::FromTensor, out.conversions.from_tensor);
    Ok((out.image, out.inference))
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use crate::backend::fake::FakeBackend;

    #[test]
    fn the_memory_charge_covers_the_projection_when_it_is_on() {
        // 1024² in, ×4 out.
        let (input, output) = (1 << 20, 16 << 20);
        assert_eq!(memory_need_mib(input, output, false), 32 + 16 * 64);
        assert_eq!(memory_need_mib(input, output, true), 32 + 16 * (64 + 24));
        assert_eq!(memory_need_mib(1, 16, true), 1, "at least 1 MiB");
    }

    fn core(max_concurrent: usize, max_queue_depth: usize) -> Core {
        let limits = Limits {
            max_concurrent: NonZeroUsize::new(max_concurrent).expect("non-zero"),
            max_queue_depth: NonZeroUsize::new(max_queue_depth).expect("non-zero"),
            request_timeout: Duration::from_secs(5),
            max_image_pixels: 1_000,
            max_output_pixels: 16_000,
            max_payload_bytes: 1 << 20,
            drain: Duration::from_secs(1),
            memory_budget_mib: None,
            inference_nice: 0,
        };
        let backend = Arc::new(FakeBackend::new(Duration::ZERO));
        Core::start(backend, limits, 2, Metrics::new()).expect("core starts")
    }

    #[test]
    fn admission_refuses_at_the_queue_depth_and_frees_on_drop() {
        let core = core(1, 2);
        let a = core.admit().expect("first");
        let _b = core.admit().expect("second");
        let err = core.admit().expect_err("third is over the depth");
        assert_eq!(err.reason(), "overloaded");
        assert!(
            err.retry_after()
                .is_some_and(|d| (1..=3).contains(&d.as_secs()))
        );
        let admitted = || core.inner.metrics.admitted_requests.get();
        assert_eq!(admitted(), 2, "a refusal holds no slot");
        drop(a);
        assert_eq!(core.in_flight(), 1);
        assert_eq!(admitted(), 1);
        assert!(core.admit().is_ok());
    }

    #[test]
    fn default_scale_must_be_offered_by_the_backend() {
        let limits = core(1, 1).limits().clone();
        let backend = Arc::new(FakeBackend::new(Duration::ZERO));
        let err =
            Core::start(backend, limits, 5, Metrics::new()).expect_err("scale 5 is not offered");
        assert!(err.to_string().contains("default scale 5"), "{err}");
    }
}
