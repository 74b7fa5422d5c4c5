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
        if !self.shared.batcher.runs_alone(weight) {
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
                    forward(model, merged, steps, seed, observe)
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
///
/// With other members on CUDA, the pass ran on this thread's stream over
/// tiles from theirs: it is waited for before their tiles are let go (the
/// memory goes back to their streams, which may reuse it at once) and
/// before they get their shares, whatever the outcome.
fn forward(
    model: &HndsrModel,
    merged: Merged<'_, Tensor>,
    steps: u32,
    seed: u64,
    observe: Option<&PassObserver>,
) -> Result<Vec<Tensor>, Arc<TorchError>> {
    let Merged {
        inputs,
        all_cancelled,
    } = merged;
    let outputs = pass(model, &inputs, steps, seed, all_cancelled, observe);
    if let [first, _, ..] = inputs.as_slice() {
        stream::synchronize(first.device()).map_err(Arc::new)?;
    }
    drop(inputs);
    outputs
}

/// The merged pass itself, split back into one output per input.
fn pass(
    model: &HndsrModel,
    inputs: &[Tensor],
    steps: u32,
    seed: u64,
    all_cancelled: &dyn Fn() -> bool,
    observe: Option<&PassObserver>,
) -> Result<Vec<Tensor>, Arc<TorchError>> {
    let sizes: Vec<i64> = inputs.iter().map(|t| t.size()[0]).collect();
    let all = match inputs {
        [only] => only.shallow_clone(),
        _ => Tensor::f_cat(inputs, 0)
            .op("merge tile batches")
            .map_err(Arc::new)?,
    };
    if let Some(observe) = observe {
        observe(sizes.iter().sum::<i64>().try_into().unwrap_or(usize::MAX));
    }
    let out = model
        .upscale(&all, steps, seed, all_cancelled)
        .map_err(Arc::new)?;
    if sizes.len() == 1 {
        return Ok(vec![out]);
    }
    out.f_split_with_sizes(&sizes, 0)
        .op("split merged tiles")
        .map_err(Arc::new)
}
