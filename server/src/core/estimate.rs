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
        *self.model.lock() = Model {
            fixed_s,
            per_mpx_s,
            speed: 1.0,
            calibrated: true,
        };
    }

    /// The estimated service time of a request with `out_pixels` output
    /// pixels.
    #[must_use]
    pub fn service(&self, out_pixels: u64) -> Duration {
        let m = *self.model.lock();
        secs(m.speed * m.shape(out_pixels))
    }

    /// The estimated service time of `work` on this pod alone, at its
    /// warm-up pace (without the slowdown other requests' share of the
    /// cores adds): what the pod can do at best.
    #[must_use]
    pub fn solo(&self, work: u64) -> Duration {
        let m = *self.model.lock();
        secs(m.shape(work))
    }

    /// Folds in a measured service time.
    pub fn observe(&self, out_pixels: u64, took: Duration) {
        let mut m = self.model.lock();
        let shape = m.shape(out_pixels);
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
    pub fn observe_at_least(&self, out_pixels: u64, ran: Duration) {
        if self.service(out_pixels) < ran {
            self.observe(out_pixels, ran);
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

/// The computations admitted and not finished, with their estimates.
#[derive(Debug, Default)]
pub struct Backlog {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Waiting for a permit, by arrival (ids grow): estimated seconds.
    waiting: BTreeMap<u64, f64>,
    /// Holding a permit: estimated seconds and start.
    running: BTreeMap<u64, (f64, Instant)>,
}

/// One computation's place in the [`Backlog`]; leaves it on drop.
#[derive(Debug)]
pub struct Entry {
    backlog: Arc<Backlog>,
    id: u64,
}

impl Backlog {
    /// An empty backlog.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a computation waiting for a permit.
    #[must_use]
    pub fn enqueue(self: &Arc<Self>, estimate: Duration) -> Entry {
        let mut s = self.state.lock();
        let id = s.next;
        s.next += 1;
        s.waiting.insert(id, estimate.as_secs_f64());
        Entry {
            backlog: Arc::clone(self),
            id,
        }
    }

    /// The estimated wait for a permit of a computation arriving `now`,
    /// with `slots` permits: the FIFO schedule of the work ahead.
    #[must_use]
    pub fn wait(&self, slots: usize, now: Instant) -> Duration {
        let s = self.state.lock();
        let slots = slots.max(1);
        if s.running.len() + s.waiting.len() < slots {
            return Duration::ZERO;
        }
        // When each slot frees, earliest first (a small sorted vector:
        // slots and the queue are tens at most).
        let mut free: Vec<f64> = s
            .running
            .values()
            .map(|(est, started)| {
                (est - now.saturating_duration_since(*started).as_secs_f64()).max(0.0)
            })
            .collect();
        free.resize(slots.max(free.len()), 0.0);
        free.sort_by(f64::total_cmp);
        for est in s.waiting.values() {
            // The earliest slot takes the next waiting computation.
            let start = free.remove(0);
            let end = start + est;
            let at = free.partition_point(|t| *t <= end);
            free.insert(at, end);
        }
        secs(free.first().copied().unwrap_or(0.0))
    }

    /// Computations waiting and running.
    #[must_use]
    pub fn len(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.waiting.len(), s.running.len())
    }
}

impl Entry {
    /// The computation got its permit and runs from now.
    pub fn start(&self) {
        let mut s = self.backlog.state.lock();
        if let Some(est) = s.waiting.remove(&self.id) {
            s.running.insert(self.id, (est, Instant::now()));
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut s = self.backlog.state.lock();
        s.waiting.remove(&self.id);
        s.running.remove(&self.id);
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
            e.observe(MPX, Duration::from_secs(2));
        }
        let est = e.service(MPX).as_secs_f64();
        assert!((est - 2.0).abs() < 0.03, "{est}");
        let est = e.service(4 * MPX).as_secs_f64();
        assert!((est - 8.0).abs() < 0.1, "{est}");
        // Back to normal: down again.
        for _ in 0..20 {
            e.observe(MPX, Duration::from_secs(1));
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
            e.observe(MPX, Duration::from_secs(3));
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
        e.observe(MPX, Duration::from_secs(1000));
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
        e.observe_at_least(MPX, Duration::from_millis(100));
        assert!(
            close(e.service(MPX), 1.0),
            "a short cancelled run says nothing"
        );
        e.observe_at_least(MPX, Duration::from_secs(5));
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
        let a = b.enqueue(Duration::from_secs(10));
        a.start();
        assert_eq!(b.wait(2, now), Duration::ZERO);
        let _c = b.enqueue(Duration::from_secs(10));
        assert!(
            b.wait(2, now) > Duration::ZERO,
            "both slots taken or promised"
        );
    }

    #[test]
    fn the_wait_is_the_fifo_schedule_of_the_work_ahead() {
        let b = Backlog::new();
        let run1 = b.enqueue(Duration::from_secs(4));
        run1.start();
        let run2 = b.enqueue(Duration::from_secs(2));
        run2.start();
        let now = Instant::now();
        // Two slots free after ~2 s and ~4 s.
        let w = b.wait(2, now).as_secs_f64();
        assert!((w - 2.0).abs() < 0.25, "{w}");
        // A 3 s computation waiting takes the slot freed at 2 s (to 5 s):
        // the next one starts at 4 s.
        let _q = b.enqueue(Duration::from_secs(3));
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
            let e = b.enqueue(Duration::from_secs(1));
            e.start();
            let _w = b.enqueue(Duration::from_secs(1));
            assert_eq!(b.len(), (1, 1));
        }
        assert_eq!(b.len(), (0, 0));
    }
}
