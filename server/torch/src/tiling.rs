//! Overlapping tiles for models whose memory grows with the image.
//!
//! The input (NCHW, N = 1) is cut into equal-sized tiles that overlap their
//! neighbours by at least [`TileConfig::overlap`] input pixels. Tiles are
//! sent to the model in batches of [`TileConfig::batch`]; between batches the
//! caller's cancellation check runs. The model's outputs are blended back
//! with per-pixel weights that are products of two 1-D profiles:
//!
//! ```text
//!   weight  1 ┤        ┌──────────────┐
//!             │       ╱                ╲
//!           0 ┼──────┘                  └──────
//!             │margin│ramp│          │ramp│margin│
//!             └ tile edge shared with a neighbour
//! ```
//!
//! Within `margin` input pixels of an edge shared with another tile, a tile
//! contributes nothing (that is where padding artefacts live — for bicubic,
//! the 4-tap kernel reaches 2 pixels); across the rest of the overlap the two
//! neighbours cross-fade linearly, so the weights of neighbours sum to 1 and
//! no seam can appear. Image borders keep full weight: there the tile sees
//! exactly what the whole image would. Weights are normalised by their sum,
//! which also covers pixels that three or more tiles reach.

use tch::{Kind, Tensor};

use crate::error::{TchResultExt, TorchError};

/// How an image is cut into tiles. All sizes are in input pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    /// Tile edge length. An axis no longer than `tile + overlap` is not
    /// cut (see [`axis_tile`]); an image like that in both dimensions is
    /// processed whole.
    pub tile: i64,
    /// Minimum overlap between neighbouring tiles.
    pub overlap: i64,
    /// Pixels at each shared tile edge whose output is discarded; at least
    /// the model's one-sided receptive field for an exact match with the
    /// whole-image result.
    pub margin: i64,
    /// Tiles per model call.
    pub batch: usize,
}

impl TileConfig {
    /// Checks that the parameters can produce a seamless blend.
    pub fn validate(&self) -> Result<(), TorchError> {
        let bad = |msg: String| Err(TorchError::InvalidTiling(msg));
        if self.tile < 1 {
            return bad(format!("tile must be at least 1 pixel, got {}", self.tile));
        }
        if self.overlap < 0 || self.overlap >= self.tile {
            return bad(format!(
                "overlap must be in [0, tile), got {} with tile {}",
                self.overlap, self.tile
            ));
        }
        if self.margin < 0 {
            return bad(format!("margin must not be negative, got {}", self.margin));
        }
        if self.overlap > 0 && 2 * self.margin >= self.overlap {
            return bad(format!(
                "overlap ({}) must exceed twice the margin ({}) to leave room to blend",
                self.overlap, self.margin
            ));
        }
        if self.overlap == 0 && self.margin != 0 {
            return bad("a margin needs an overlap".to_owned());
        }
        if self.batch == 0 {
            return bad("batch must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// The tile length along an axis of `len` pixels: `len` itself when it
/// exceeds `tile` by no more than `overlap` (two tiles would overlap by
/// nearly a whole tile: a 257-pixel axis with 256-pixel tiles would cost two
/// tiles, four for a 257² image, instead of one), else `tile`.
#[must_use]
pub fn axis_tile(len: i64, tile: i64, overlap: i64) -> i64 {
    if len <= tile + overlap { len } else { tile }
}

/// Start offsets of the tiles along an axis of `len` pixels: as few tiles as
/// keep every overlap at least `overlap`, spread evenly so the overlaps are
/// (nearly) equal and no tile is a near-duplicate of its neighbour.
pub fn tile_starts(len: i64, tile: i64, overlap: i64) -> Vec<i64> {
    if len <= tile {
        return vec![0];
    }
    let step = tile - overlap;
    // Smallest n with (n - 1) * step + tile >= len.
    let n = (len - tile + step - 1) / step + 1;
    let span = len - tile;
    (0..n).map(|k| (k * span + (n - 1) / 2) / (n - 1)).collect()
}

/// Blending profile of each tile along one axis, in output pixels.
fn axis_weights(starts: &[i64], tile_len: i64, scale: i64, margin: i64) -> Vec<Vec<f32>> {
    // Linear ramp from 0 (at `a`) to 1 (at `b`), sampled at pixel centres.
    let ramp = |x: i64, a: i64, b: i64| -> f64 {
        if b <= a {
            if x >= a { 1.0 } else { 0.0 }
        } else {
            ((x as f64 + 0.5 - a as f64) / (b - a) as f64).clamp(0.0, 1.0)
        }
    };
    starts
        .iter()
        .enumerate()
        .map(|(k, &start)| {
            let end = start + tile_len;
            let rise = k.checked_sub(1).map(|p| {
                (
                    (start + margin) * scale,
                    (starts[p] + tile_len - margin) * scale,
                )
            });
            let fall = starts
                .get(k + 1)
                .map(|&next| ((next + margin) * scale, (end - margin) * scale));
            (start * scale..end * scale)
                .map(|x| {
                    let up = rise.map_or(1.0, |(a, b)| ramp(x, a, b));
                    let down = fall.map_or(1.0, |(a, b)| 1.0 - ramp(x, a, b));
                    up.min(down) as f32
                })
                .collect()
        })
        .collect()
}

/// Runs `model` over `input` (shape `[1, C, H, W]`) tile by tile and blends
/// the results into one `[1, C', H * scale, W * scale]` f32 tensor on the
/// input's device. Tiles are cut, batched, blended and normalised there:
/// on a GPU nothing crosses to the host per tile, and the caller moves the
/// finished image once. The price is device memory: the accumulator and
/// the weight sum are `(C' + 1) × 4` bytes per output pixel (about 4 GB
/// for a 16 MP input at ×4 in RGB).
///
/// `model` receives a batch `[B, C, t, t]` and must return
/// `[B, C', t * scale, t * scale]`. `is_cancelled` is called before each
/// batch; once it returns true the function returns
/// [`TorchError::Cancelled`] without calling the model again. An image that
/// fits in one tile is passed to the model whole.
pub fn run_tiled<F, C>(
    input: &Tensor,
    scale: i64,
    cfg: &TileConfig,
    mut model: F,
    mut is_cancelled: C,
) -> Result<Tensor, TorchError>
where
    F: FnMut(Tensor) -> Result<Tensor, TorchError>,
    C: FnMut() -> bool,
{
    cfg.validate()?;
    if scale < 1 {
        return Err(TorchError::InvalidInput(format!(
            "scale must be at least 1, got {scale}"
        )));
    }
    let (n, _c, h, w) = input
        .size4()
        .map_err(|_| TorchError::InvalidInput(format!("expected NCHW, got {:?}", input.size())))?;
    if n != 1 || h < 1 || w < 1 {
        return Err(TorchError::InvalidInput(format!(
            "expected one non-empty image, got shape {:?}",
            input.size()
        )));
    }

    let (th, tw) = (
        axis_tile(h, cfg.tile, cfg.overlap),
        axis_tile(w, cfg.tile, cfg.overlap),
    );
    let ys = tile_starts(h, th, cfg.overlap);
    let xs = tile_starts(w, tw, cfg.overlap);
    // Tiles stretched by `axis_tile` are up to (1 + overlap / tile)² the
    // area of a tile: fewer of them per call keeps the pixels of a call.
    let batch = if th * tw <= cfg.tile * cfg.tile {
        cfg.batch
    } else {
        let tile_area = i64::try_from(cfg.batch).unwrap_or(i64::MAX) * cfg.tile * cfg.tile;
        usize::try_from(tile_area / (th * tw)).unwrap_or(1).max(1)
    };

    if ys.len() == 1 && xs.len() == 1 {
        if is_cancelled() {
            return Err(TorchError::Cancelled);
        }
        let out = model(input.shallow_clone())?;
        check_output(&out, 1, th * scale, tw * scale)?;
        return out.f_to_kind(Kind::Float).op("tile output to f32");
    }

    let device = input.device();
    let weights_1d = |starts: &[i64], len: i64| -> Result<Vec<Tensor>, TorchError> {
        axis_weights(starts, len, scale, cfg.margin)
            .iter()
            .map(|v| Tensor::f_from_slice(v.as_slice()).and_then(|t| t.f_to_device(device)))
            .collect::<Result<_, _>>()
            .op("tile weights")
    };
    let wy = weights_1d(&ys, th)?;
    let wx = weights_1d(&xs, tw)?;

    let tiles: Vec<(usize, usize)> = (0..ys.len())
        .flat_map(|iy| (0..xs.len()).map(move |ix| (iy, ix)))
        .collect();
    let mut acc_slot: Option<Tensor> = None;
    let mut wsum = Tensor::f_zeros([1, 1, h * scale, w * scale], (Kind::Float, device))
        .op("allocate tile weight sum")?;

    for batch in tiles.chunks(batch) {
        if is_cancelled() {
            return Err(TorchError::Cancelled);
        }
        let crops = batch
            .iter()
            .map(|&(iy, ix)| input.f_narrow(2, ys[iy], th)?.f_narrow(3, xs[ix], tw))
            .collect::<Result<Vec<_>, _>>()
            .op("cut tiles")?;
        let stacked = Tensor::f_cat(&crops, 0).op("batch tiles")?;
        let out = model(stacked)?;
        check_output(&out, batch.len() as i64, th * scale, tw * scale)?;
        let out = out
            .f_to_device(device)
            .and_then(|o| o.f_to_kind(Kind::Float))
            .op("tile output to f32")?;

        // Allocated on the first batch: the model decides the channel count.
        let acc = match acc_slot.take() {
            Some(acc) => acc,
            None => Tensor::f_zeros(
                [1, out.size()[1], h * scale, w * scale],
                (Kind::Float, device),
            )
            .op("allocate tile accumulator")?,
        };
        for (i, &(iy, ix)) in batch.iter().enumerate() {
            let (y0, x0) = (ys[iy] * scale, xs[ix] * scale);
            let weight = wy[iy]
                .f_outer(&wx[ix])
                .and_then(|w| w.f_view([1, 1, th * scale, tw * scale]))
                .op("tile weight")?;
            let contribution = out
                .f_narrow(0, i as i64, 1)
                .and_then(|o| o.f_mul(&weight))
                .op("weight tile")?;
            // `narrow` returns views: adding in place writes into `acc` / `wsum`.
            let region = |t: &Tensor| t.f_narrow(2, y0, th * scale)?.f_narrow(3, x0, tw * scale);
            let _ = region(&acc)
                .and_then(|mut r| r.f_add_(&contribution))
                .op("blend tile")?;
            let _ = region(&wsum)
                .and_then(|mut r| r.f_add_(&weight))
                .op("blend tile weight")?;
        }
        acc_slot = Some(acc);
    }

    let min_weight = wsum
        .f_min()
        .and_then(|m| m.f_double_value(&[]))
        .op("check tile coverage")?;
    if min_weight <= 0.0 {
        return Err(TorchError::InvalidTiling(format!(
            "some output pixels are covered by no tile (tile {}, overlap {}, margin {})",
            cfg.tile, cfg.overlap, cfg.margin
        )));
    }
    let mut acc = acc_slot.ok_or_else(|| TorchError::InvalidInput("no tiles".to_owned()))?;
    // The weights of a pixel's tiles sum to 1 except where three or more
    // tiles meet; normalising everywhere keeps one code path. In place: no
    // second output-sized buffer.
    wsum = wsum.f_clamp_min(f64::MIN_POSITIVE).op("normalise tiles")?;
    let _ = acc.f_div_(&wsum).op("normalise tiles")?;
    Ok(acc)
}

fn check_output(out: &Tensor, batch: i64, h: i64, w: i64) -> Result<(), TorchError> {
    match out.size4() {
        Ok((b, _, oh, ow)) if b == batch && oh == h && ow == w => Ok(()),
        _ => Err(TorchError::Internal(format!(
            "model returned shape {:?}, expected [{batch}, C, {h}, {w}]",
            out.size()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_cover_the_axis_with_at_least_the_overlap() {
        for len in [1, 7, 64, 65, 100, 511, 512, 513, 1000, 4097] {
            for (tile, overlap) in [(64, 8), (48, 16), (512, 32), (10, 0)] {
                let t = axis_tile(len, tile, overlap);
                let starts = tile_starts(len, t, overlap);
                assert_eq!(starts[0], 0);
                assert_eq!(*starts.last().unwrap() + t, len, "len {len} tile {tile}");
                for pair in starts.windows(2) {
                    assert!(pair[1] > pair[0]);
                    assert!(pair[0] + t - pair[1] >= overlap, "{starts:?}");
                }
            }
        }
    }

    #[test]
    fn an_axis_just_over_the_tile_is_not_cut() {
        assert_eq!(axis_tile(257, 256, 16), 257);
        assert_eq!(tile_starts(257, axis_tile(257, 256, 16), 16), [0]);
        assert_eq!(axis_tile(272, 256, 16), 272);
        assert_eq!(axis_tile(273, 256, 16), 256, "past the overlap: cut");
        assert_eq!(tile_starts(273, 256, 16).len(), 2);
        assert_eq!(axis_tile(100, 256, 16), 100);
    }

    #[test]
    fn neighbour_weights_sum_to_one() {
        let (scale, margin, tile) = (3, 2, 40);
        let starts = tile_starts(100, tile, 12);
        let weights = axis_weights(&starts, tile, scale, margin);
        let mut sum = vec![0.0f64; 100 * 3];
        for (w, &s) in weights.iter().zip(&starts) {
            for (i, v) in w.iter().enumerate() {
                sum[(s * scale) as usize + i] += f64::from(*v);
            }
        }
        for (x, s) in sum.iter().enumerate() {
            assert!((s - 1.0).abs() < 1e-6, "pixel {x}: {s}");
        }
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let ok = TileConfig {
            tile: 64,
            overlap: 8,
            margin: 2,
            batch: 2,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            TileConfig { tile: 0, ..ok },
            TileConfig { overlap: 64, ..ok },
            TileConfig { margin: 4, ..ok },
            TileConfig {
                overlap: 0,
                margin: 1,
                ..ok
            },
            TileConfig { batch: 0, ..ok },
        ] {
            assert!(
                matches!(bad.validate(), Err(TorchError::InvalidTiling(_))),
                "{bad:?}"
            );
        }
    }
}
