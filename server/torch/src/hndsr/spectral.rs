//! The Fourier layer of the operator encoder.
//!
//! `y = irfft2(W · rfft2(x))` where `W` mixes channels with one complex
//! matrix per kept frequency. Frequencies are kept in the two corners of the
//! `rfft2` half-spectrum: rows `0..m` (non-negative) and `H−m..H` (negative),
//! columns `0..m`. The weights are defined per frequency *index*, so the same
//! weights run on any grid; on a grid too small for `m` modes the layer uses
//! the weights of the frequencies that grid has (`min(m, H/2)` rows from each
//! end, `min(m, W/2+1)` columns).
//!
//! The FFTs always run in fp32: cuFFT has no bf16 and fp16 FFTs need
//! power-of-two sizes, so half-precision inputs are widened here and the
//! result is cast back to the input's kind.

use tch::{Kind, Tensor, nn};

/// Spectral convolution with `modes × modes` kept frequencies per corner.
#[derive(Debug)]
pub struct SpectralConv2d {
    /// Real part, `[in, out, 2·modes, modes]`: rows `0..modes` are the
    /// frequencies `0..modes`, rows `modes..2·modes` are `−modes..−1`.
    pub w_re: Tensor,
    /// Imaginary part, same layout.
    pub w_im: Tensor,
    /// Kept modes per axis.
    pub modes: i64,
}

impl SpectralConv2d {
    /// Registers `w_re` / `w_im` under `vs`; initialised like the FNO paper
    /// (uniform in `[0, 1/(in·out))`).
    pub fn new(vs: &nn::Path, c_in: i64, c_out: i64, modes: i64) -> Self {
        let scale = 1.0 / (c_in * c_out) as f64;
        let init = nn::Init::Uniform { lo: 0.0, up: scale };
        Self {
            w_re: vs.var("w_re", &[c_in, c_out, 2 * modes, modes], init),
            w_im: vs.var("w_im", &[c_in, c_out, 2 * modes, modes], init),
            modes,
        }
    }

    /// `x`: `[B, in, H, W]` (any float kind) → `[B, out, H, W]`, same kind.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let (_, _, h, w) = x.size4().expect("spectral conv input is NCHW");
        let m = self.modes;
        let mh = m.min(h / 2).max(1);
        let mw = m.min(w / 2 + 1);
        let wr = self.w_re.to_kind(Kind::Float);
        let wi = self.w_im.to_kind(Kind::Float);

        let spec = x
            .to_kind(Kind::Float)
            .fft_rfft2(None::<&[i64]>, [-2, -1], "backward");
        // Rows 0..mh and H−mh..H; when the grid is so small that the two
        // corners meet (h < 2), keep only the first.
        let two_corners = h >= 2 * mh && h > 1;
        let top = spec.narrow(2, 0, mh).narrow(3, 0, mw);
        let (wr_top, wi_top) = (wr.narrow(2, 0, mh), wi.narrow(2, 0, mh));
        let wr_top = wr_top.narrow(3, 0, mw);
        let wi_top = wi_top.narrow(3, 0, mw);
        let (top_re, top_im) = complex_mix(&top, &wr_top, &wi_top);

        let c_out = self.w_re.size()[1];
        let (mut re, mut im) = (top_re, top_im);
        if two_corners {
            let bottom = spec.narrow(2, h - mh, mh).narrow(3, 0, mw);
            let wr_bot = wr.narrow(2, 2 * m - mh, mh).narrow(3, 0, mw);
            let wi_bot = wi.narrow(2, 2 * m - mh, mh).narrow(3, 0, mw);
            let (bot_re, bot_im) = complex_mix(&bottom, &wr_bot, &wi_bot);
            let b = x.size()[0];
            let gap = Tensor::zeros([b, c_out, h - 2 * mh, mw], (Kind::Float, x.device()));
            re = Tensor::cat(&[&re, &gap, &bot_re], 2);
            im = Tensor::cat(&[&im, &gap, &bot_im], 2);
        } else {
            re = re.constant_pad_nd([0, 0, 0, h - mh]);
            im = im.constant_pad_nd([0, 0, 0, h - mh]);
        }
        // Zero the columns past the kept modes.
        let half = w / 2 + 1;
        re = re.constant_pad_nd([0, half - mw]);
        im = im.constant_pad_nd([0, half - mw]);
        Tensor::complex(&re, &im)
            .fft_irfft2(Some([h, w].as_slice()), [-2, -1], "backward")
            .to_kind(kind)
    }
}

/// `out[b,o,x,y] = Σ_i spec[b,i,x,y] · (wr + i·wi)[i,o,x,y]`, as real and
/// imaginary parts.
fn complex_mix(spec: &Tensor, wr: &Tensor, wi: &Tensor) -> (Tensor, Tensor) {
    let (sr, si) = (spec.real(), spec.imag());
    let mix = |a: &Tensor, b: &Tensor| Tensor::einsum("bixy,ioxy->boxy", &[a, b], None::<i64>);
    let re = mix(&sr, wr) - mix(&si, wi);
    let im = mix(&sr, wi) + mix(&si, wr);
    (re, im)
}
