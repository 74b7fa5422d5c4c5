//! Bicubic upscaling with libtorch's `upsample_bicubic2d`
//! (`align_corners = false`, Keys kernel with a = -0.75), clamped to [0, 1].

use tch::{Device, Kind, Tensor};

use crate::error::{TchResultExt, TorchError};
use crate::tiling::{TileConfig, run_tiled};

/// Default tiling for bicubic: the 4-tap kernel reaches 2 input pixels past
/// the one it interpolates, so a 2-pixel margin makes tiled output match
/// the whole-image output up to float rounding. Tiles are large because
/// bicubic is cheap; tiling only bounds peak memory on big images.
pub const BICUBIC_TILES: TileConfig = TileConfig {
    tile: 512,
    overlap: 8,
    margin: 2,
    batch: 4,
};

/// Upsamples an NCHW float tensor by `scale` with libtorch's bicubic
/// kernel. Not clamped: bicubic overshoots near edges.
pub fn upsample_bicubic(x: &Tensor, scale: i64) -> Result<Tensor, TorchError> {
    let (_, _, h, w) = x
        .size4()
        .map_err(|_| TorchError::InvalidInput(format!("expected NCHW, got {:?}", x.size())))?;
    x.f_upsample_bicubic2d([h * scale, w * scale], false, None::<f64>, None::<f64>)
        .op("upsample_bicubic2d")
}

/// A bicubic upscaler bound to one device. Holds no tensors, so it is
/// `Send + Sync` and can be shared between inference threads.
#[derive(Debug, Clone)]
pub struct BicubicUpscaler {
    device: Device,
    tiles: TileConfig,
}

impl BicubicUpscaler {
    /// An upscaler running on `device`, tiling with `tiles`.
    pub fn new(device: Device, tiles: TileConfig) -> Result<Self, TorchError> {
        tiles.validate()?;
        Ok(Self { device, tiles })
    }

    /// The device the work runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Upscales `image` (`[1, C, H, W]`, f32 in [0, 1], any device) by
    /// `scale`; returns `[1, C, H * scale, W * scale]` on the CPU, clamped
    /// to [0, 1]. Checks `is_cancelled` between tile batches. Runs under a
    /// no-grad guard on the calling thread.
    pub fn upscale(
        &self,
        image: &Tensor,
        scale: i64,
        is_cancelled: impl FnMut() -> bool,
    ) -> Result<Tensor, TorchError> {
        let _no_grad = tch::no_grad_guard();
        if image.kind() != Kind::Float {
            return Err(TorchError::InvalidInput(format!(
                "expected f32 samples, got {:?}",
                image.kind()
            )));
        }
        if scale < 1 {
            return Err(TorchError::InvalidInput(format!(
                "scale must be at least 1, got {scale}"
            )));
        }
        let x = image.f_to_device(self.device).op("copy input to device")?;
        let y = run_tiled(
            &x,
            scale,
            &self.tiles,
            |batch| upsample_bicubic(&batch, scale),
            is_cancelled,
        )?;
        y.f_clamp(0.0, 1.0)
            .and_then(|y| y.f_to_device(Device::Cpu))
            .op("clamp and copy output to host")
    }
}
