//! What a request will cost, for deadline-aware admission.
//!
//! [`Estimator`]: service time (decode + backend + encode) as `speed × (fixed + per_mpx × output megapixels)`. Warm-up
//! fits the line on two image sizes; every finished request then moves
//! `speed` (an exponentially weighted mean of measured ÷ predicted), so the
//! estimates follow the pod's real pace: other requests sharing the cores,
//! a throttled CPU, a busier GPU. One factor rather than a refit of both
//! terms: requests of one size cannot tell the terms apart, and a slower
//! pod is slower at every size.
//!
//! Admission holds estimates to deadlines with a margin: the 95th
//! percentile of measured ÷ estimated over the last [`ERROR_WINDOW`]
//! computations, at least [`MIN_MARGIN`] (and at most [`MAX_MARGIN`]), so
//! the margin widens where the estimates are poor (mixed sizes sharing
//! cores) and stays thin where they are good.
//!
//! Computations running at once share the device (a CPU's cores, a GPU's
//! streaming multiprocessors), so each runs slower than alone. Warm-up
//! measures that slowdown with every permit busy ([`Sharing`]); measured
//! times are divided by the sharing they ran under before they move
//! `speed`, and a new request is charged for the computations it will run
//! beside. Without this, a burst that starts on an idle pod is estimated at
//! the idle pace until enough of it has finished to move `speed`, and the
//! first requests of the burst are admitted late.
//!
//! Sizes are in *work units*: the output pixels the backend really
//! computes (a tiling backend counts its overlaps, see
//! `Backend::work`), so an image just over the tile edge is not estimated
//! like one just under it.
//!
//! [`Backlog`]: the work ahead of a new request. Computations waiting for a
//! permit and running ones register their estimates; the wait of a new one
//! is what FIFO scheduling of that work on `MAX_CONCURRENT` slots gives.
//!
//! Both are plain data behind a mutex, tested without a backend.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Weight of the newest observation in the running speed factor.
const ALPHA: f64 = 0.2;

/// Bounds of one observation's measured ÷ predicted ratio, so one outlier
/// (a page-faulting first request, a stalled thread) moves the factor by
/// at most ALPHA × the bound.
const RATIO_BOUNDS: (f64, f64) = (0.1, 10.0);

/// Least margin on estimates held against a deadline.
pub const MIN_MARGIN: f64 = 1.2;
/// Most margin (a wider spread says the model is wrong, not that requests
/// are that slow).
pub const MAX_MARGIN: f64 = 4.0;
/// Computations whose estimate error sets the margin.
pub const ERROR_WINDOW: usize = 128;
/// Errors needed before they set the margin.
const MIN_ERRORS: usize = 10;

/// The service-time model of one pod (a pod serves one profile).
#[derive(Debug, Default)]
pub struct Estimator {
    model: Mutex<Model>,
    /// Measured ÷ estimated of the latest computations.
    errors: Mutex<VecDeque<f64>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Model {
    /// Seconds every request costs whatever its size (at warm-up).
    fixed_s: f64,
    /// Seconds per output megapixel (at warm-up).
    per_mpx_s: f64,
    /// Measured ÷ warm-up pace, kept current.
    speed: f64,
    /// Whether warm-up calibrated it; before, every estimate is zero (and
    /// admission by estimate is off).
    calibrated: bool,
    /// How computations running at once slow each other.
    sharing: Sharing,
}

/// How much slower each computation runs when several run at once:
/// `full` with all `slots` busy, linear in between (1 alone). Linear, so the
/// slowdown at a time-averaged concurrency is the time average of the
/// slowdowns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sharing {
    /// Permits (computations that can run at once).
    pub slots: usize,
    /// Slowdown with every permit busy, ≥ 1.
    pub full: f64,
}

impl Default for Sharing {
    /// No slowdown measured: every computation runs as if alone.
    fn default() -> Self {
        Self {
            slots: 1,
            full: 1.0,
        }
    }
}

/// Most slowdown per slot warm-up may record: beyond this the measurement
/// is noise (a stalled machine), not the device sharing out its work.
const MAX_SLOWDOWN_PER_SLOT: f64 = 2.0;

impl Sharing {
    /// From a warm-up measurement: `slots` computations run at once took
    /// `together` on average; one alone took `alone`.
    #[must_use]
    pub fn measured(slots: usize, alone: Duration, together: Duration) -> Self {
        let slots = slots.max(1);
        if slots == 1 || alone.is_zero() {
            return Self { slots, full: 1.0 };
        }
        #[allow(clippy::cast_precision_loss)]
        let cap = MAX_SLOWDOWN_PER_SLOT * slots as f64;
        Self {
            slots,
            full: (together.as_secs_f64() / alone.as_secs_f64()).clamp(1.0, cap),
        }
    }

    /// The slowdown of each of `running` computations running at once
    /// (fractional for a time average; capped at the slots).
    #[must_use]
    pub fn slowdown(&self, running: f64) -> f64 {
        if self.slots <= 1 {
            return 1.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let slots = self.slots as f64;
        let k = running.clamp(1.0, slots);
        1.0 + (self.full - 1.0) * (k - 1.0) / (slots - 1.0)
    }
}

impl Model {
    fn shape(&self, out_pixels: u64) -> f64 {
        self.fixed_s + self.per_mpx_s * mpx(out_pixels)
    }
}

fn mpx(pixels: u64) -> f64 {
    // Precision loss is irrelevant at these magnitudes.
    #[allow(clippy::cast_precision_loss)]
    let p = pixels as f64;
    p / 1e6
}

impl Estimator {
    /// An uncalibrated estimator: estimates are zero until
    /// [`Estimator::calibrate`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Fits the line through two measured points (output pixels, time).
    pub fn calibrate(&self, small: (u64, Duration), large: (u64, Duration)) {
        let (p1, t1) = (mpx(small.0), small.1.as_secs_f64());
        let (p2, t2) = (mpx(large.0), large.1.as_secs_f64());
        let slope = if p2 > p1 {
            ((t2 - t1) / (p2 - p1)).max(0.0)
        } else {
            0.0
        };
        // Two noisy timings can give a flat slope; half the larger point's
        // mean cost per pixel bounds it from below.
        let per_mpx_s = slope.max(if p2 > 0.0 { 0.5 * t2 / p2 } else { 0.0 });
        let fixed_s = (t1 - per_mpx_s * p1).max(0.0);
        let mut m = self.model.lock();
        *m = Model {
            fixed_s,
            per_mpx_s,
            speed: 1.0,
            calibrated: true,
            sharing: m.sharing,
        };
    }

    /// Records how computations running at once slow each other (measured
    /// at warm-up, after [`Estimator::calibrate`]).
    pub fn calibrate_sharing(&self, sharing: Sharing) {
        self.model.lock().sharing = sharing;
    }

    /// How computations running at once slow each other.
    #[must_use]
    pub fn sharing(&self) -> Sharing {
        self.model.lock().sharing
    }

    /// The estimated service time of a request with `out_pixels` output
    /// pixels running alone, at the current pace.
    #[must_use]
    pub fn service(&self, out_pixels: u64) -> Duration {
        self.service_beside(out_pixels, 1)
    }

    /// The estimated service time of a request with `out_pixels` output
    /// pixels that runs while `running` computations (itself included)
    /// share the device, at the current pace.
    #[must_use]
    pub fn service_beside(&self, out_pixels: u64, running: usize) -> Duration {
        let m = *self.model.lock();
        #[allow(clippy::cast_precision_loss)]
        let k = running as f64;
        secs(m.speed * m.sharing.slowdown(k) * m.shape(out_pixels))
    }

    /// The estimated service time of `work` on this pod alone, at its
    /// warm-up pace (without the slowdown other requests' share of the
    /// cores adds): what the pod can do at best.
    #[must_use]
    pub fn solo(&self, work: u64) -> Duration {
        let m = *self.model.lock();
        secs(m.shape(work))
    }

    /// Folds in a measured service time, of a computation that ran beside
    /// `running` others on average (itself included; 1 alone).
    pub fn observe(&self, out_pixels: u64, took: Duration, running: f64) {
        let mut m = self.model.lock();
        let shape = m.shape(out_pixels) * m.sharing.slowdown(running);
        if !m.calibrated || shape <= 0.0 {
            return;
        }
        let ratio = (took.as_secs_f64() / shape).clamp(RATIO_BOUNDS.0, RATIO_BOUNDS.1);
        m.speed += ALPHA * (ratio - m.speed);
    }

    /// Records how far an admission estimate was from the measured time.
    pub fn record_error(&self, estimated: Duration, measured: Duration) {
        if estimated.is_zero() {
            return;
        }
        let mut e = self.errors.lock();
        if e.len() == ERROR_WINDOW {
            e.pop_front();
        }
        e.push_back(measured.as_secs_f64() / estimated.as_secs_f64());
    }

    /// The factor estimates are multiplied by before they are held against
    /// a deadline: the 95th percentile of the recent errors, within
    /// [`MIN_MARGIN`]..=[`MAX_MARGIN`].
    #[must_use]
    pub fn margin(&self) -> f64 {
        let e = self.errors.lock();
        if e.len() < MIN_ERRORS {
            return MIN_MARGIN;
        }
        let mut v: Vec<f64> = e.iter().copied().collect();
        drop(e);
        v.sort_by(f64::total_cmp);
        let p95 = v[(v.len() * 95).div_ceil(100).clamp(1, v.len()) - 1];
        p95.clamp(MIN_MARGIN, MAX_MARGIN)
    }

    /// Folds in a lower bound: a computation cancelled after `ran` without
    /// finishing took at least that long. Raises the estimate when it
    /// predicted less; never lowers it.
    pub fn observe_at_least(&self, out_pixels: u64, ran: Duration, running: f64) {
        let m = *self.model.lock();
        let predicted = m.speed * m.sharing.slowdown(running) * m.shape(out_pixels);
        if predicted < ran.as_secs_f64() {
            self.observe(out_pixels, ran, running);
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

/// The computations admitted and not finished, with their estimates.
#[derive(Debug, Default)]
pub struct Backlog {
    state: Mutex<State>,
}

/// One admitted computation as admission planned it.
#[derive(Debug, Clone, Copy)]
struct Planned {
    /// Estimated service time, seconds.
    estimate: f64,
    /// Computations it was expected to run beside (itself included).
    beside: usize,
    /// When it must be answered.
    deadline: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    plan: Planned,
    started: Instant,
    /// `State::busy` when it started.
    busy_at_start: f64,
    /// `State::progress` when it started.
    progress_at_start: f64,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Waiting for a permit, by arrival (ids grow).
    waiting: BTreeMap<u64, Planned>,
    /// Holding a permit.
    running: BTreeMap<u64, Running>,
    /// ∫ running computations dt in seconds, up to `since`: a computation's
    /// mean concurrency is the growth of this over its run ÷ its duration.
    busy: f64,
    /// ∫ 1 ÷ slowdown(running computations) dt in seconds, up to `since`:
    /// how far each running computation got, in seconds of it alone.
    progress: f64,
    since: Option<Instant>,
    sharing: Sharing,
}

impl State {
    /// Brings `busy` up to `now` (call before `running` changes).
    fn advance(&mut self, now: Instant) {
        if let Some(since) = self.since {
            #[allow(clippy::cast_precision_loss)]
            let k = self.running.len() as f64;
            let dt = now.saturating_duration_since(since).as_secs_f64();
            self.busy += k * dt;
            self.progress += dt / self.sharing.slowdown(k);
        }
        self.since = Some(now);
    }

    /// The slowdown of each running computation now.
    fn slowdown_now(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let k = self.running.len() as f64;
        self.sharing.slowdown(k)
    }

    /// A running computation's work still to do, in seconds of it alone
    /// (`advance` first).
    fn rest(&self, r: &Running) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let alone = r.plan.estimate / self.sharing.slowdown(r.plan.beside as f64);
        (alone - (self.progress - r.progress_at_start)).max(0.0)
    }

    /// The estimated wait for a permit of a computation arriving `now`,
    /// with `slots` permits: the FIFO schedule of the work ahead.
    fn wait(&self, slots: usize) -> f64 {
        let slots = slots.max(1);
        if self.running.len() + self.waiting.len() < slots {
            return 0.0;
        }
        // When each slot frees, earliest first (a small sorted vector:
        // slots and the queue are tens at most).
        let slowdown = self.slowdown_now();
        let mut free: Vec<f64> = self
            .running
            .values()
            .map(|r| self.rest(r) * slowdown)
            .collect();
        free.resize(slots.max(free.len()), 0.0);
        free.sort_by(f64::total_cmp);
        for w in self.waiting.values() {
            // The earliest slot takes the next waiting computation.
            let start = free.remove(0);
            let end = start + w.estimate;
            let at = free.partition_point(|t| *t <= end);
            free.insert(at, end);
        }
        free.first().copied().unwrap_or(0.0)
    }

    /// When a newcomer that runs `joining` seconds (beside them) would
    /// start now beside the running computations, the first of them it
    /// would make late (at `margin`) that is on time without it: how long
    /// that one still needs. While the newcomer runs, each runs at
    /// 1 ÷ `after` of its pace alone instead of 1 ÷ `before`, so it ends
    /// `joining × (1 − before ÷ after)` later (or sooner than that, if it
    /// ends while the newcomer runs). `advance` first.
    fn crowded(&self, slots: usize, joining: f64, margin: f64, now: Instant) -> Option<f64> {
        let running = self.running.len();
        if running == 0 || running + self.waiting.len() >= slots {
            // Alone, or it waits for a permit and slows no one down.
            return None;
        }
        let before = self.slowdown_now();
        #[allow(clippy::cast_precision_loss)]
        let after = self.sharing.slowdown((running + 1) as f64);
        self.running.values().find_map(|r| {
            let left = r
                .plan
                .deadline?
                .saturating_duration_since(now)
                .as_secs_f64();
            let rest = self.rest(r);
            let without = rest * before;
            let with = (rest * after).min(without + joining * (1.0 - before / after));
            (margin * without <= left && margin * with > left).then_some(without)
        })
    }
}

/// Why [`Backlog::admit`] refused a computation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// The wait for a permit plus its own service time, margin applied,
    /// is over what is left of the deadline.
    Late {
        /// Wait + service, margin applied.
        estimate: Duration,
        /// How much of it is over.
        excess: Duration,
    },
    /// Running it now would slow a running computation past its deadline.
    Crowded {
        /// When that computation should be done.
        done_in: Duration,
    },
}

/// What [`Backlog::admit`] needs to know of a newcomer.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// Its work units.
    pub work: u64,
    /// When it must be answered.
    pub deadline: Instant,
    /// Permits (computations that can run at once).
    pub slots: usize,
}

/// One computation's place in the [`Backlog`]; leaves it on drop.
#[derive(Debug)]
pub struct Entry {
    backlog: Arc<Backlog>,
    id: u64,
    estimate: Duration,
}

impl Backlog {
    /// An empty backlog.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Admits a computation if it can finish by its deadline behind the
    /// work ahead, beside the computations it will share the device with,
    /// without making a running one late; registers it as waiting for a
    /// permit. The decision and the registration are one step, so
    /// concurrent admissions see each other.
    ///
    /// # Errors
    /// Why it was refused.
    pub fn admit(
        self: &Arc<Self>,
        estimator: &Estimator,
        req: Request,
        now: Instant,
    ) -> Result<Entry, Refusal> {
        let slots = req.slots.max(1);
        let margin = estimator.margin();
        let mut s = self.state.lock();
        s.advance(now);
        // It runs beside those running now, or, when it has to wait,
        // beside a full set of them.
        let beside = (s.waiting.len() + s.running.len() + 1).min(slots);
        let service = estimator.service_beside(req.work, beside).as_secs_f64();
        let left = req.deadline.saturating_duration_since(now).as_secs_f64();
        let total = margin * (s.wait(slots) + service);
        if total > left {
            return Err(Refusal::Late {
                estimate: secs(total),
                excess: secs(total - left),
            });
        }
        if let Some(rest) = s.crowded(slots, service, margin, now) {
            return Err(Refusal::Crowded {
                done_in: secs(rest),
            });
        }
        let id = s.next;
        s.next += 1;
        s.waiting.insert(
            id,
            Planned {
                estimate: service,
                beside,
                deadline: Some(req.deadline),
            },
        );
        Ok(Entry {
            backlog: Arc::clone(self),
            id,
            estimate: secs(service),
        })
    }

    /// Registers a computation waiting for a permit, with no deadline to
    /// hold it to and no admission check.
    #[cfg(test)]
    #[must_use]
    pub fn enqueue(self: &Arc<Self>, estimate: Duration, beside: usize) -> Entry {
        let mut s = self.state.lock();
        let id = s.next;
        s.next += 1;
        s.waiting.insert(
            id,
            Planned {
                estimate: estimate.as_secs_f64(),
                beside,
                deadline: None,
            },
        );
        Entry {
            backlog: Arc::clone(self),
            id,
            estimate,
        }
    }

    /// The estimated wait for a permit of a computation arriving `now`,
    /// with `slots` permits: the FIFO schedule of the work ahead.
    #[must_use]
    pub fn wait(&self, slots: usize, now: Instant) -> Duration {
        let mut s = self.state.lock();
        s.advance(now);
        secs(s.wait(slots))
    }

    /// Records how computations running at once slow each other (the
    /// estimator's, from warm-up).
    pub fn set_sharing(&self, sharing: Sharing) {
        let mut s = self.state.lock();
        s.advance(Instant::now());
        s.sharing = sharing;
    }

    /// Computations waiting and running.
    #[must_use]
    pub fn len(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.waiting.len(), s.running.len())
    }
}

impl Entry {
    /// Its estimated service time, as admitted.
    #[must_use]
    pub fn estimate(&self) -> Duration {
        self.estimate
    }

    /// The computation got its permit and runs from now.
    pub fn start(&self) {
        self.start_at(Instant::now());
    }

    fn start_at(&self, now: Instant) {
        let mut s = self.backlog.state.lock();
        if let Some(plan) = s.waiting.remove(&self.id) {
            s.advance(now);
            let (busy_at_start, progress_at_start) = (s.busy, s.progress);
            s.running.insert(
                self.id,
                Running {
                    plan,
                    started: now,
                    busy_at_start,
                    progress_at_start,
                },
            );
        }
    }

    /// How many computations ran at once, on average, since this one
    /// started (itself included); 1 before it starts.
    #[must_use]
    pub fn mean_running(&self) -> f64 {
        self.mean_running_at(Instant::now())
    }

    fn mean_running_at(&self, now: Instant) -> f64 {
        let mut s = self.backlog.state.lock();
        s.advance(now);
        let busy = s.busy;
        match s.running.get(&self.id) {
            Some(r) => {
                let ran = now.saturating_duration_since(r.started).as_secs_f64();
                if ran > 0.0 {
                    ((busy - r.busy_at_start) / ran).max(1.0)
                } else {
                    #[allow(clippy::cast_precision_loss)]
                    let k = s.running.len() as f64;
                    k
                }
            }
            None => 1.0,
        }
    }

    fn leave_at(&self, now: Instant) {
        let mut s = self.backlog.state.lock();
        s.waiting.remove(&self.id);
        if s.running.contains_key(&self.id) {
            s.advance(now);
            s.running.remove(&self.id);
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.leave_at(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MPX: u64 = 1_000_000;

    fn close(a: Duration, b: f64) -> bool {
        (a.as_secs_f64() - b).abs() < 1e-6
    }

    #[test]
    fn calibration_fits_a_line_through_two_sizes() {
        let e = Estimator::new();
        assert_eq!(
            e.service(16 * MPX),
            Duration::ZERO,
            "uncalibrated: no estimate"
        );
        e.calibrate(
            (MPX / 4, Duration::from_millis(300)),
            (MPX, Duration::from_millis(900)),
        );
        // 0.8 s per Mpx + 0.1 s.
        assert!(close(e.service(2 * MPX), 1.7), "{:?}", e.service(2 * MPX));
        assert!(close(e.service(0), 0.1));
    }

    #[test]
    fn measurements_pull_the_estimates_towards_the_pods_real_pace() {
        let e = Estimator::new();
        e.calibrate(
            (MPX / 4, Duration::from_millis(250)),
            (MPX, Duration::from_secs(1)),
        );
        // The pod turns out twice as slow (cores shared with other
        // requests): estimates of every size follow within a few requests.
        for _ in 0..20 {
            e.observe(MPX, Duration::from_secs(2), 1.0);
        }
        let est = e.service(MPX).as_secs_f64();
        assert!((est - 2.0).abs() < 0.03, "{est}");
        let est = e.service(4 * MPX).as_secs_f64();
        assert!((est - 8.0).abs() < 0.1, "{est}");
        // Back to normal: down again.
        for _ in 0..20 {
            e.observe(MPX, Duration::from_secs(1), 1.0);
        }
        let est = e.service(MPX).as_secs_f64();
        assert!((est - 1.0).abs() < 0.03, "{est}");
    }

    #[test]
    fn the_solo_estimate_ignores_the_current_pace() {
        let e = Estimator::new();
        e.calibrate(
            (MPX / 4, Duration::from_millis(250)),
            (MPX, Duration::from_secs(1)),
        );
        for _ in 0..20 {
            e.observe(MPX, Duration::from_secs(3), 1.0);
        }
        assert!(e.service(MPX) > Duration::from_millis(2900));
        assert!(close(e.solo(MPX), 1.0));
    }

    #[test]
    fn one_outlier_moves_the_estimate_a_bounded_step() {
        let e = Estimator::new();
        e.calibrate(
            (MPX / 4, Duration::from_millis(250)),
            (MPX, Duration::from_secs(1)),
        );
        e.observe(MPX, Duration::from_secs(1000), 1.0);
        let est = e.service(MPX).as_secs_f64();
        assert!((est - (1.0 + ALPHA * 9.0)).abs() < 1e-6, "{est}");
    }

    #[test]
    fn a_flat_calibration_still_charges_by_size() {
        let e = Estimator::new();
        // Timing noise: the larger image measured no slower.
        e.calibrate(
            (MPX / 4, Duration::from_millis(500)),
            (MPX, Duration::from_millis(500)),
        );
        assert!(
            e.service(16 * MPX) > Duration::from_secs(3),
            "{:?}",
            e.service(16 * MPX)
        );
    }

    #[test]
    fn a_cancelled_computation_only_ever_raises_the_estimate() {
        let e = Estimator::new();
        e.calibrate(
            (MPX / 4, Duration::from_millis(250)),
            (MPX, Duration::from_secs(1)),
        );
        e.observe_at_least(MPX, Duration::from_millis(100), 1.0);
        assert!(
            close(e.service(MPX), 1.0),
            "a short cancelled run says nothing"
        );
        e.observe_at_least(MPX, Duration::from_secs(5), 1.0);
        assert!(e.service(MPX) > Duration::from_secs(1));
    }

    #[test]
    fn the_margin_follows_the_recent_errors() {
        let e = Estimator::new();
        assert!((e.margin() - MIN_MARGIN).abs() < 1e-9, "no errors yet");
        let est = Duration::from_secs(1);
        for _ in 0..100 {
            e.record_error(est, Duration::from_millis(900));
        }
        assert!(
            (e.margin() - MIN_MARGIN).abs() < 1e-9,
            "good estimates: the floor"
        );
        for _ in 0..10 {
            e.record_error(est, Duration::from_millis(1800));
        }
        assert!((e.margin() - 1.8).abs() < 1e-9, "{}", e.margin());
        for _ in 0..ERROR_WINDOW {
            e.record_error(est, Duration::from_secs(100));
        }
        assert!((e.margin() - MAX_MARGIN).abs() < 1e-9, "capped");
        for _ in 0..ERROR_WINDOW {
            e.record_error(est, Duration::from_millis(500));
        }
        assert!(
            (e.margin() - MIN_MARGIN).abs() < 1e-9,
            "old errors leave the window"
        );
    }

    #[test]
    fn no_wait_while_a_slot_is_free() {
        let b = Backlog::new();
        let now = Instant::now();
        let a = b.enqueue(Duration::from_secs(10), 1);
        a.start();
        assert_eq!(b.wait(2, now), Duration::ZERO);
        let _c = b.enqueue(Duration::from_secs(10), 1);
        assert!(
            b.wait(2, now) > Duration::ZERO,
            "both slots taken or promised"
        );
    }

    #[test]
    fn the_wait_is_the_fifo_schedule_of_the_work_ahead() {
        let b = Backlog::new();
        let run1 = b.enqueue(Duration::from_secs(4), 1);
        run1.start();
        let run2 = b.enqueue(Duration::from_secs(2), 1);
        run2.start();
        let now = Instant::now();
        // Two slots free after ~2 s and ~4 s.
        let w = b.wait(2, now).as_secs_f64();
        assert!((w - 2.0).abs() < 0.25, "{w}");
        // A 3 s computation waiting takes the slot freed at 2 s (to 5 s):
        // the next one starts at 4 s.
        let _q = b.enqueue(Duration::from_secs(3), 1);
        let w = b.wait(2, now).as_secs_f64();
        assert!((w - 4.0).abs() < 0.25, "{w}");
        drop(run1);
        // Slots: 2 s (run2), then the waiting 3 s one starts at 0 on the
        // freed slot: next free at 2 s.
        let w = b.wait(2, now).as_secs_f64();
        assert!((w - 2.0).abs() < 0.25, "{w}");
        assert_eq!(b.len(), (1, 1));
    }

    #[test]
    fn entries_leave_on_drop() {
        let b = Backlog::new();
        {
            let e = b.enqueue(Duration::from_secs(1), 1);
            e.start();
            let _w = b.enqueue(Duration::from_secs(1), 1);
            assert_eq!(b.len(), (1, 1));
        }
        assert_eq!(b.len(), (0, 0));
    }

    #[test]
    fn sharing_is_measured_once_and_linear_in_between() {
        let s = Sharing::measured(4, Duration::from_secs(1), Duration::from_secs(3));
        assert!((s.full - 3.0).abs() < 1e-9);
        for (running, slowdown) in [(0.0, 1.0), (1.0, 1.0), (2.5, 2.0), (4.0, 3.0), (9.0, 3.0)] {
            assert!(
                (s.slowdown(running) - slowdown).abs() < 1e-9,
                "{running}: {}",
                s.slowdown(running)
            );
        }
        // Noise cannot make sharing a speed-up, nor a stall a slowdown
        // without bound.
        let quick = Sharing::measured(4, Duration::from_secs(1), Duration::from_millis(900));
        assert!((quick.full - 1.0).abs() < 1e-9);
        let stalled = Sharing::measured(4, Duration::from_secs(1), Duration::from_secs(60));
        assert!((stalled.full - 8.0).abs() < 1e-9);
        let one = Sharing::measured(1, Duration::from_secs(1), Duration::from_secs(3));
        assert!(
            (one.slowdown(4.0) - 1.0).abs() < 1e-9,
            "one slot: no one beside"
        );
    }

    #[test]
    fn a_request_is_charged_for_the_computations_beside_it() {
        let (e, _) = shared();
        // Admitted onto an idle pod, a burst is estimated at once at the
        // pace its computations will share.
        assert!(close(e.service_beside(MPX, 1), 1.0));
        assert!(close(e.service_beside(MPX, 2), 2.0));
        // Measurements that ran shared say the pod's pace is as calibrated:
        // the solo estimate does not drift up to the shared one.
        for _ in 0..20 {
            e.observe(MPX, Duration::from_secs(2), 2.0);
        }
        assert!(close(e.service(MPX), 1.0), "{:?}", e.service(MPX));
        assert!(close(e.service_beside(MPX, 2), 2.0));
        // A slower pod still moves both.
        for _ in 0..40 {
            e.observe(MPX, Duration::from_secs(3), 2.0);
        }
        let est = e.service_beside(MPX, 2).as_secs_f64();
        assert!((est - 3.0).abs() < 0.01, "{est}");
    }

    #[test]
    fn a_computation_knows_how_many_ran_beside_it_on_average() {
        let b = Backlog::new();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let first = b.enqueue(Duration::from_secs(4), 1);
        let second = b.enqueue(Duration::from_secs(2), 1);
        assert!(
            (first.mean_running_at(t0) - 1.0).abs() < 1e-9,
            "not started"
        );
        first.start_at(t0);
        second.start_at(at(1));
        // Alone for 1 s, then two for 2 s.
        let m = second.mean_running_at(at(3));
        assert!((m - 2.0).abs() < 1e-9, "{m}");
        second.leave_at(at(3));
        // 1 s alone, 2 s shared, 1 s alone again: 1.5 on average.
        let m = first.mean_running_at(at(4));
        assert!((m - 1.5).abs() < 1e-9, "{m}");
    }

    /// 1 s per Mpx; two at once run at half speed each.
    fn shared() -> (Estimator, Arc<Backlog>) {
        let e = Estimator::new();
        e.calibrate(
            (MPX / 4, Duration::from_millis(250)),
            (MPX, Duration::from_secs(1)),
        );
        e.calibrate_sharing(Sharing::measured(
            2,
            Duration::from_secs(1),
            Duration::from_secs(2),
        ));
        let b = Backlog::new();
        b.set_sharing(e.sharing());
        (e, b)
    }

    /// The estimate of a [`Refusal::Late`].
    fn late(admitted: Result<Entry, Refusal>) -> Duration {
        match admitted {
            Err(Refusal::Late { estimate, .. }) => estimate,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn admission_counts_the_wait_and_the_sharing_against_the_deadline() {
        let (e, b) = shared();
        let now = Instant::now();
        let req = |mpx: u64, secs: u64| Request {
            work: mpx * MPX,
            deadline: now + Duration::from_secs(secs),
            slots: 2,
        };
        let first = b.admit(&e, req(3, 60), now).expect("alone: 3 s");
        assert!(close(first.estimate(), 3.0));
        first.start_at(now);
        // 3 s alone would fit 5 s; beside the first it is 6 s (7.2 s with
        // the margin).
        let estimate = late(b.admit(&e, req(3, 5), now));
        assert!(close(estimate, 7.2), "{estimate:?}");
        let second = b.admit(&e, req(3, 10), now).expect("6 s shared fits 10 s");
        assert!(close(second.estimate(), 6.0));
        second.start_at(now);
        // Both permits busy, each running at half speed: the first is done
        // in 6 s. A third waits for it, then runs 2 s beside the second,
        // and slows no running one down.
        let estimate = late(b.admit(&e, req(1, 5), now));
        assert!(close(estimate, 9.6), "{estimate:?}");
        let third = b.admit(&e, req(1, 10), now).expect("9.6 s fits 10 s");
        assert!(close(third.estimate(), 2.0));
    }

    #[test]
    fn a_newcomer_that_would_make_a_running_computation_late_is_refused() {
        let (e, b) = shared();
        let now = Instant::now();
        let tight = b
            .admit(
                &e,
                Request {
                    work: 4 * MPX,
                    deadline: now + Duration::from_secs(5),
                    slots: 2,
                },
                now,
            )
            .expect("4 s alone (4.8 s with the margin) fits 5 s");
        tight.start_at(now);
        let beside = |mpx: u64| Request {
            work: mpx * MPX / 10,
            deadline: now + Duration::from_secs(10),
            slots: 2,
        };
        // 1 Mpx fits its own deadline (2 s shared), but the running one
        // would run at half speed for those 2 s: done at 5 s, 6 s with the
        // margin. Refused, with when the running one is done.
        match b.admit(&e, beside(10), now) {
            Err(Refusal::Crowded { done_in }) => assert!(close(done_in, 4.0), "{done_in:?}"),
            other => panic!("{other:?}"),
        }
        // A tenth of that delays it by 0.1 s only: admitted.
        let small = b.admit(&e, beside(1), now).expect("4.1 s × 1.2 fits 5 s");
        drop(small);
        drop(tight);
        // With room in the running one's deadline it is admitted.
        let roomy = b
            .admit(
                &e,
                Request {
                    work: 4 * MPX,
                    deadline: now + Duration::from_secs(20),
                    slots: 2,
                },
                now,
            )
            .expect("fits");
        roomy.start_at(now);
        assert!(b.admit(&e, beside(10), now).is_ok());
    }
}
