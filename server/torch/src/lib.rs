//! libtorch (tch) backends for the HNDSR inference server.
//!
//! - [`device`]: `cpu` / `cuda` / `cuda:N` selection, loading libtorch's CUDA
//!   backend at start-up when a GPU is asked for.
//! - [`tiling`]: overlapping tiles, batched, blended without seams, with a
//!   cancellation check between batches; generic over the model.
//! - [`bicubic`]: the bicubic upscaler (`upsample_bicubic2d`).
//! - [`consistency`]: the training degradation and the projection of an
//!   upscaled image onto the images that degrade exactly to its input.
//! - [`stream`]: one CUDA stream per inference thread.
//! - [`batch`]: dynamic batching of concurrent callers' work into one call.
//! - [`error`]: one error type; out-of-memory is its own variant.
//!
//! Threading: `tch::Tensor` is `Send` but not `Sync`, and grad mode is
//! thread-local. The public types here hold no tensors; work runs on the
//! caller's thread under `tch::no_grad_guard()`.
//!
//! Out of memory: libtorch's CUDA caching allocator already releases its
//! cached blocks and retries before it reports an OOM, and every tensor of
//! a failed call is dropped when the call returns, so after
//! [`TorchError::OutOfMemory`] the device is as free as before the call.

pub mod batch;
pub mod bicubic;
pub mod consistency;
pub mod device;
pub mod error;
pub mod hndsr;
pub mod stream;
pub mod tiling;

pub use bicubic::{BICUBIC_TILES, BicubicUpscaler, upsample_bicubic};
pub use device::{DeviceSpec, device_name, open_device};
pub use error::TorchError;
pub use tch;
pub use tiling::{TileConfig, run_tiled, tile_starts};
