//! [`TileRunner`] that merges concurrent callers' tile batches into one
//! forward pass ([`crate::batch::Batcher`]).
//!
//! Batches merge when their tiles have one shape and they ask for the same
//! diffusion steps (and, with diffusion, the same seed: the per-tile noise
//! mixes the request seed with the tile's content, so a tile gets the same
//! noise in any batch). Every layer is per-sample (group norm, no batch
//! norm), so a merged pass gives each caller what a pass of its own would.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use tch::Tensor;

use super::{HndsrModel, TileRunner};
use crate::batch::{Batcher, Merged};
use crate::error::{TchResultExt as _, TorchError};
use crate::stream;

/// What batches may merge on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    height: i64,
    width: i64,
    steps: u32,
    /// The request seed with diffusion; 0 without (it is not used then).
    seed: u64,
}

/// Called with the number of tiles of every forward pass.
pub type PassObserver = Box<dyn Fn(usize) + Send + Sync>;

/// The shared batching state of one model: one per backend, shared by
/// every inference thread.
pub struct TileBatcher {
    batcher: Batcher<Key, Tensor, Arc<TorchError>>,
    observe: Option<PassObserver>,
}

impl std::fmt::Debug for TileBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TileBatcher")
            .field("batcher", &self.batcher)
            .finish_non_exhaustive()
    }
}

impl TileBatcher {
    /// Passes of at most `max_tiles` tiles, formed within `max_wait`
    /// (`max_tiles` ≤ 1 or a zero wait: every caller alone). `observe` sees
    /// the size of every pass.
    #[must_use]
    pub fn new(max_tiles: usize, max_wait: Duration, observe: Option<PassObserver>) -> Self {
        let max_wait = if max_tiles <= 1 {
            Duration::ZERO
        } else {
            max_wait
        };
        Self {
            batcher: Batcher::new(max_tiles, max_wait),
            observe,
        }
    }

    /// The runner for one request, whose cancellation `cancelled` reports.
    #[must_use]
    pub fn runner(&self, cancelled: Arc<dyn Fn() -> bool + Send + Sync>) -> Batched<'_> {
        Batched {
            shared: self,
            cancelled,
        }
    }
}

/// One request's [`TileRunner`] on a [`TileBatcher`].
pub struct Batched<'a> {
    shared: &'a TileBatcher,
    cancelled: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Batched<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batched").finish_non_exhaustive()
    }
}

impl TileRunner for Batched<'_> {
    fn run(
        &self,
        model: &HndsrModel,
        tiles: Tensor,
        steps: u32,
        seed: u64,
        _cancel: &dyn Fn() -> bool,
    ) -> Result<Tensor, TorchError> {
        let size = tiles.size();
        let (n, height, width) = match size.as_slice() {
            [n, _, h, w] => (*n, *h, *w),
            _ => {
                return Err(TorchError::InvalidInput(format!(
                    "expected [B, C, H, W] tiles, got {size:?}"
                )));
            }
        };
        let key = Key {
            height,
            width,
            steps,
            seed: if steps > 0 { seed } else { 0 },
        };
        let device = tiles.device();
        let weight = usize::try_from(n).unwrap_or(usize::MAX);
        if device.is_cuda() && !self.shared.batcher.runs_alone(weight) {
            // The tiles may go to another thread's stream: finished first.
            stream::synchronize(device)?;
        }
        let led = Cell::new(false);
        let cancelled = Arc::clone(&self.cancelled);
        let observe = self.shared.observe.as_ref();
        let out = self
            .shared
            .batcher
            .submit(
                key,
                tiles,
                weight,
                Box::new(move || cancelled()),
                |merged: Merged<'_, Tensor>| {
                    led.set(true);
                    let members = merged.inputs.len();
                    let outputs = forward(model, merged, steps, seed, observe);
                    if members > 1 && device.is_cuda() {
                        // The followers read their shares on their own
                        // streams, and give back the memory of their tiles,
                        // only once this reply arrives.
                        stream::synchronize(device).map_err(Arc::new)?;
                    }
                    outputs
                },
                |why| Arc::new(TorchError::Internal(format!("tile batching: {why}"))),
            )
            .map_err(|e| e.duplicate())?;
        if led.get() || !device.is_cuda() {
            return Ok(out);
        }
        // A share of the leader's output, in memory of the leader's stream,
        // which may reuse it once the last share is dropped: copied onto
        // this thread's stream, and the copy waited for, before letting go.
        let mut own = out.f_empty_like().op("copy a batch share")?;
        own.f_copy_(&out).op("copy a batch share")?;
        stream::synchronize(device)?;
        Ok(own)
    }
}

/// One forward pass over every member's tiles; one output per member.
fn forward(
    model: &HndsrModel,
    merged: Merged<'_, Tensor>,
    steps: u32,
    seed: u64,
    observe: Option<&PassObserver>,
) -> Result<Vec<Tensor>, Arc<TorchError>> {
    let sizes: Vec<i64> = merged.inputs.iter().map(|t| t.size()[0]).collect();
    let mut inputs = merged.inputs;
    let all = match inputs.pop() {
        Some(only) if inputs.is_empty() => only,
        last => {
            inputs.extend(last);
            Tensor::f_cat(&inputs, 0)
                .op("merge tile batches")
                .map_err(Arc::new)?
        }
    };
    if let Some(observe) = observe {
        observe(sizes.iter().sum::<i64>().try_into().unwrap_or(usize::MAX));
    }
    let out = model
        .upscale(&all, steps, seed, merged.all_cancelled)
        .map_err(Arc::new)?;
    if sizes.len() == 1 {
        return Ok(vec![out]);
    }
    out.f_split_with_sizes(&sizes, 0)
        .op("split merged tiles")
        .map_err(Arc::new)
}
