//! The HNDSR network: operator encoder + pixel-shuffle decoder (→ μ) and a
//! time-conditioned U-Net denoiser for the residual `HR − μ`, all on the LR
//! grid. The encoder can also be IMDN's body ([`Encoder::Imdn`]), the
//! literature baseline HNDSR's is measured against, so both train, export,
//! evaluate and serve through the same code.
//!
//! Everything here is batch-independent per sample (group norm, no batch
//! norm), so a tile's output does not depend on what it is batched with.
//! Forward passes use tch's panicking ops; [`super::HndsrModel`] catches
//! those at its public boundary and turns them into errors.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::{Encoder, HndsrConfig};
use super::spectral::SpectralConv2d;

fn conv(vs: nn::Path, c_in: i64, c_out: i64, k: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        padding: k / 2,
        ..Default::default()
    };
    nn::conv2d(vs, c_in, c_out, k, cfg)
}

fn zero_conv(vs: nn::Path, c_in: i64, c_out: i64, k: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        padding: k / 2,
        ws_init: nn::Init::Const(0.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::conv2d(vs, c_in, c_out, k, cfg)
}

fn group_norm(vs: nn::Path, c: i64) -> nn::GroupNorm {
    nn::group_norm(vs, 8.min(c), c, Default::default())
}

/// One Fourier block:
/// `x + gelu(spectral(x) + pw(x) + dw(x) · σ(gate(x)) + l₂(gelu(l₁(x))))`,
/// where the dense 3×3 pair `l₁, l₂` exists when `local > 0` and `l₂`
/// starts at zero (adding it to trained weights leaves their output as it
/// was).
#[derive(Debug)]
struct FourierBlock {
    spectral: Option<SpectralConv2d>,
    pointwise: nn::Conv2D,
    depthwise: nn::Conv2D,
    gate: nn::Conv2D,
    local: Option<(nn::Conv2D, nn::Conv2D)>,
}

impl FourierBlock {
    fn new(vs: &nn::Path, width: i64, modes: i64, local: i64) -> Self {
        let dw = nn::ConvConfig {
            padding: 1,
            groups: width,
            ..Default::default()
        };
        Self {
            spectral: (modes > 0)
                .then(|| SpectralConv2d::new(&(vs / "spectral"), width, width, modes)),
            pointwise: conv(vs / "pointwise", width, width, 1),
            depthwise: nn::conv2d(vs / "depthwise", width, width, 3, dw),
            gate: conv(vs / "gate", width, width, 1),
            local: (local > 0).then(|| {
                (
                    conv(vs / "local1", width, local, 3),
                    zero_conv(vs / "local2", local, width, 3),
                )
            }),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let gated = self.depthwise.forward(x) * self.gate.forward(x).sigmoid();
        let mut y = self.pointwise.forward(x) + gated;
        if let Some(spectral) = &self.spectral {
            y += spectral.forward(x);
        }
        if let Some((l1, l2)) = &self.local {
            y += l2.forward(&l1.forward(x).gelu("none"));
        }
        x + y.gelu("none")
    }
}

/// IMDN's activation: leaky ReLU with slope 0.05 (tch's `leaky_relu` has
/// libtorch's fixed 0.01); for a slope below 1 it is `max(x, 0.05·x)`.
fn lrelu(x: &Tensor) -> Tensor {
    x.maximum(&(x * 0.05))
}

/// Contrast-aware channel attention (IMDN's CCA): each channel is scaled by
/// `σ(up(relu(down(std + mean))))`, with the standard deviation and mean
/// taken over the grid.
#[derive(Debug)]
struct ContrastAttention {
    down: nn::Conv2D,
    up: nn::Conv2D,
}

impl ContrastAttention {
    fn new(vs: &nn::Path, c: i64) -> Self {
        let reduced = (c / 16).max(1);
        Self {
            down: conv(vs / "down", c, reduced, 1),
            up: conv(vs / "up", reduced, c, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mean = x.mean_dim([2i64, 3].as_slice(), true, None);
        let var = (x - &mean)
            .square()
            .mean_dim([2i64, 3].as_slice(), true, None);
        let stats = var.sqrt() + mean;
        let weight = self.up.forward(&self.down.forward(&stats).relu()).sigmoid();
        x * weight
    }
}

/// One information multi-distillation block: three 3×3 convs each keep a
/// quarter of their output ("distilled") and pass the rest on, a fourth
/// conv turns the remainder into a quarter too; the four quarters are
/// concatenated, weighted by [`ContrastAttention`], fused by a 1×1 conv and
/// added to the input.
#[derive(Debug)]
struct ImdBlock {
    convs: [nn::Conv2D; 4],
    attention: ContrastAttention,
    fuse: nn::Conv2D,
    distilled: i64,
}

impl ImdBlock {
    fn new(vs: &nn::Path, c: i64) -> Self {
        let distilled = c / 4;
        let rest = c - distilled;
        Self {
            convs: [
                conv(vs / "conv1", c, c, 3),
                conv(vs / "conv2", rest, c, 3),
                conv(vs / "conv3", rest, c, 3),
                conv(vs / "conv4", rest, distilled, 3),
            ],
            attention: ContrastAttention::new(&(vs / "attention"), c),
            fuse: conv(vs / "fuse", c, c, 1),
            distilled,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let c = x.size()[1];
        let mut kept = Vec::with_capacity(4);
        let mut rest = x.shallow_clone();
        for conv in &self.convs[..3] {
            let out = lrelu(&conv.forward(&rest));
            kept.push(out.narrow(1, 0, self.distilled));
            rest = out.narrow(1, self.distilled, c - self.distilled);
        }
        kept.push(self.convs[3].forward(&rest));
        let joined = Tensor::cat(&kept, 1);
        self.fuse.forward(&self.attention.forward(&joined)) + x
    }
}

/// IMDN's body: head conv, the distillation blocks, a 1×1 fusion of every
/// block's output, a 3×3 conv, and a long skip from the head.
#[derive(Debug)]
struct ImdnBody {
    head: nn::Conv2D,
    blocks: Vec<ImdBlock>,
    fuse: nn::Conv2D,
    tail: nn::Conv2D,
}

impl ImdnBody {
    fn new(vs: &nn::Path, cfg: &HndsrConfig) -> Self {
        let width = cfg.width;
        Self {
            head: conv(vs / "head", cfg.channels, width, 3),
            blocks: (0..cfg.blocks)
                .map(|i| ImdBlock::new(&(vs / format!("block{i}")), width))
                .collect(),
            fuse: conv(vs / "fuse", width * cfg.blocks, width, 1),
            tail: conv(vs / "tail", width, width, 3),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let start = self.head.forward(x);
        let mut f = start.shallow_clone();
        let mut outs = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            f = block.forward(&f);
            outs.push(f.shallow_clone());
        }
        let fused = lrelu(&self.fuse.forward(&Tensor::cat(&outs, 1)));
        self.tail.forward(&fused) + start
    }
}

/// The regression path's body: `lr − 0.5` (reflect-padded) → features of
/// `width` channels on the LR grid.
#[derive(Debug)]
enum Body {
    Fourier {
        lift: nn::Conv2D,
        blocks: Vec<FourierBlock>,
    },
    Imdn(Box<ImdnBody>),
}

impl Body {
    fn new(vs: &nn::Path, cfg: &HndsrConfig) -> Self {
        match cfg.encoder {
            Encoder::Fourier => Body::Fourier {
                lift: conv(vs / "lift", cfg.channels, cfg.width, 3),
                blocks: (0..cfg.blocks)
                    .map(|i| {
                        FourierBlock::new(
                            &(vs / format!("block{i}")),
                            cfg.width,
                            cfg.modes,
                            cfg.local,
                        )
                    })
                    .collect(),
            },
            Encoder::Imdn => Body::Imdn(Box::new(ImdnBody::new(vs, cfg))),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Body::Fourier { lift, blocks } => {
                let mut f = lift.forward(x);
                for block in blocks {
                    f = block.forward(&f);
                }
                f
            }
            Body::Imdn(body) => body.forward(x),
        }
    }
}

/// Encoder body on the LR grid and pixel-shuffle decoder: HNDSR's is a 3×3
/// conv + GELU then the shuffle conv, IMDN's the shuffle conv alone.
#[derive(Debug)]
struct Regressor {
    body: Body,
    hidden: Option<nn::Conv2D>,
    shuffle: nn::Conv2D,
}

/// A U-Net residual block with an additive time embedding.
#[derive(Debug)]
struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    skip: Option<nn::Conv2D>,
}

impl ResBlock {
    fn new(vs: &nn::Path, c_in: i64, c_out: i64, t_dim: i64) -> Self {
        Self {
            norm1: group_norm(vs / "norm1", c_in),
            conv1: conv(vs / "conv1", c_in, c_out, 3),
            time: nn::linear(vs / "time", t_dim, c_out, Default::default()),
            norm2: group_norm(vs / "norm2", c_out),
            conv2: conv(vs / "conv2", c_out, c_out, 3),
            skip: (c_in != c_out).then(|| conv(vs / "skip", c_in, c_out, 1)),
        }
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = h + self.time.forward(temb).unsqueeze(-1).unsqueeze(-1);
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.skip {
            Some(skip) => skip.forward(x) + h,
            None => x + h,
        }
    }
}

/// The residual denoiser: a small U-Net over `pixel_unshuffle(residual)`.
#[derive(Debug)]
struct Denoiser {
    t_in: i64,
    t1: nn::Linear,
    t2: nn::Linear,
    input: nn::Conv2D,
    down: Vec<ResBlock>,
    downsample: Vec<nn::Conv2D>,
    mid: ResBlock,
    up: Vec<ResBlock>,
    upsample: Vec<nn::Conv2D>,
    out_norm: nn::GroupNorm,
    output: nn::Conv2D,
}

/// `x` (NCHW) under one of the eight symmetries of the square: `rot`
/// quarter turns, then a left–right mirror if `flip`.
pub fn transform(x: &Tensor, rot: i64, flip: bool) -> Tensor {
    let x = x.rot90(rot, [2, 3]);
    if flip { x.flip([3]) } else { x }
}

/// Undoes [`transform`].
pub fn untransform(y: &Tensor, rot: i64, flip: bool) -> Tensor {
    let y = if flip { y.flip([3]) } else { y.shallow_clone() };
    y.rot90(-rot, [2, 3])
}

/// What [`HndsrNet::regress_self_ensemble_checked`] returns.
#[derive(Debug)]
pub struct SelfEnsemble {
    /// μ averaged over the eight symmetries: the regression output served.
    pub mean: Tensor,
    /// The untransformed pass's own μ.
    pub identity: Tensor,
    /// The untransformed pass's encoder features. With `identity` they are
    /// a pair the denoiser has seen in training; the mean with these
    /// features is not.
    pub features: Tensor,
}

/// The whole network. Built on a [`nn::Path`] so the trainer and the
/// inference wrapper share one definition and one variable naming.
#[derive(Debug)]
pub struct HndsrNet {
    cfg: HndsrConfig,
    regressor: Regressor,
    denoiser: Denoiser,
}

impl HndsrNet {
    /// Registers every variable under `vs`.
    pub fn new(vs: &nn::Path, cfg: &HndsrConfig) -> Self {
        let c = cfg.channels;
        let s2 = cfg.scale * cfg.scale;
        let regressor = Regressor {
            body: Body::new(&(vs / "encoder"), cfg),
            hidden: (cfg.encoder == Encoder::Fourier)
                .then(|| conv(vs / "decoder" / "conv1", cfg.width, cfg.width, 3)),
            // Zero-initialised: an untrained μ is exactly bicubic.
            shuffle: zero_conv(vs / "decoder" / "conv2", cfg.width, c * s2, 3),
        };

        let den = vs / "denoiser";
        let c0 = cfg.unet[0];
        let t_dim = 4 * c0;
        let cond = cfg.unshuffled_channels() + cfg.width;
        let mut down = Vec::new();
        let mut downsample = Vec::new();
        let mut prev = c0;
        for (i, &ch) in cfg.unet.iter().enumerate() {
            down.push(ResBlock::new(&(&den / format!("down{i}")), prev, ch, t_dim));
            if i + 1 < cfg.unet.len() {
                let stride = nn::ConvConfig {
                    stride: 2,
                    padding: 1,
                    ..Default::default()
                };
                downsample.push(nn::conv2d(
                    &den / format!("downsample{i}"),
                    ch,
                    ch,
                    3,
                    stride,
                ));
            }
            prev = ch;
        }
        let last = *cfg.unet.last().expect("validated: non-empty");
        let mid = ResBlock::new(&(&den / "mid"), last, last, t_dim);
        let mut up = Vec::new();
        let mut upsample = Vec::new();
        let mut cur = last;
        for (i, &ch) in cfg.unet.iter().enumerate().rev() {
            up.push(ResBlock::new(
                &(&den / format!("up{i}")),
                cur + ch,
                ch,
                t_dim,
            ));
            if i > 0 {
                upsample.push(conv(&den / format!("upsample{i}"), ch, ch, 3));
            }
            cur = ch;
        }
        let denoiser = Denoiser {
            t_in: c0,
            t1: nn::linear(&den / "time1", c0, t_dim, Default::default()),
            t2: nn::linear(&den / "time2", t_dim, t_dim, Default::default()),
            input: conv(&den / "input", cfg.unshuffled_channels() + cond, c0, 3),
            down,
            downsample,
            mid,
            up,
            upsample,
            out_norm: group_norm(&den / "out_norm", c0),
            output: zero_conv(&den / "output", c0, cfg.unshuffled_channels(), 3),
        };
        Self {
            cfg: cfg.clone(),
            regressor,
            denoiser,
        }
    }

    /// The configuration this network was built with.
    pub fn config(&self) -> &HndsrConfig {
        &self.cfg
    }

    /// Regression path. `lr`: `[B, C, h, w]` in [0, 1] (any float kind).
    /// Returns `(μ [B, C, s·h, s·w], features [B, width, h, w])`. μ is
    /// bicubic(lr) plus a learned correction and is not clamped.
    pub fn regress(&self, lr: &Tensor) -> (Tensor, Tensor) {
        let r = &self.regressor;
        let (_, _, h, w) = lr.size4().expect("regress input is NCHW");
        let s = self.cfg.scale;
        // Reflect padding needs fewer pixels than the axis has; a thin image
        // pads its long axis in full all the same.
        let (ph, pw) = (
            self.cfg.pad.min(h - 1).max(0),
            self.cfg.pad.min(w - 1).max(0),
        );
        let x = (lr - 0.5).reflection_pad2d([pw, pw, ph, ph]);
        let f = r.body.forward(&x).narrow(2, ph, h).narrow(3, pw, w);
        let hidden = match &r.hidden {
            Some(conv) => conv.forward(&f).gelu("none"),
            None => f.shallow_clone(),
        };
        let detail = r.shuffle.forward(&hidden).pixel_shuffle(s);
        let base = lr.upsample_bicubic2d([h * s, w * s], false, None::<f64>, None::<f64>);
        (base + detail, f)
    }

    /// [`HndsrNet::regress`] with μ averaged over the 8 symmetries of the
    /// square (4 rotations × optional horizontal flip), each mapped back:
    /// "geometric self-ensemble", 8× the regression work for a steadier
    /// estimate. The features are the untransformed pass's. On CUDA the four
    /// transforms of each grid orientation run as one batch; on the CPU one
    /// at a time (measured: batching them doubled the CPU time per tile).
    pub fn regress_self_ensemble(&self, lr: &Tensor) -> (Tensor, Tensor) {
        let e = self
            .regress_self_ensemble_checked(lr, &|| false)
            .expect("never cancelled");
        (e.mean, e.features)
    }

    /// [`HndsrNet::regress_self_ensemble`] that checks `cancel` before each
    /// forward call and returns `None` once it says stop: a self-ensembled
    /// 256² tile is seconds of CPU work. Also keeps the identity pass's own
    /// μ, which the denoiser is conditioned on.
    pub fn regress_self_ensemble_checked(
        &self,
        lr: &Tensor,
        cancel: &dyn Fn() -> bool,
    ) -> Option<SelfEnsemble> {
        let per_call = if lr.device().is_cuda() { 4 } else { 1 };
        self.ensemble(lr, per_call, cancel)
    }

    /// [`HndsrNet::regress_self_ensemble`] with `per_call` (1, 2 or 4)
    /// transforms per forward call.
    ///
    /// # Panics
    /// When `per_call` is not 1, 2 or 4 (the transforms of one call must
    /// share a grid shape).
    pub fn regress_self_ensemble_in(&self, lr: &Tensor, per_call: usize) -> (Tensor, Tensor) {
        let e = self
            .ensemble(lr, per_call, &|| false)
            .expect("never cancelled");
        (e.mean, e.features)
    }

    /// The 8-symmetry mean, `per_call` transforms per forward call, `cancel`
    /// checked before each call.
    fn ensemble(
        &self,
        lr: &Tensor,
        per_call: usize,
        cancel: &dyn Fn() -> bool,
    ) -> Option<SelfEnsemble> {
        assert!(
            matches!(per_call, 1 | 2 | 4),
            "per_call must be 1, 2 or 4, got {per_call}"
        );
        let b = lr.size()[0];
        let mut sum: Option<Tensor> = None;
        let mut identity = None;
        // Rotations k and k + 2, each plain and flipped, share a grid shape.
        let all: Vec<(i64, bool)> = [0, 2, 1, 3]
            .into_iter()
            .flat_map(|rot| [(rot, false), (rot, true)])
            .collect();
        for variants in all.chunks(per_call) {
            if cancel() {
                return None;
            }
            let inputs: Vec<Tensor> = variants
                .iter()
                .map(|&(rot, flip)| transform(lr, rot, flip))
                .collect();
            let (mu, f) = self.regress(&Tensor::cat(&inputs, 0));
            if identity.is_none() {
                identity = Some((mu.narrow(0, 0, b), f.narrow(0, 0, b)));
            }
            for (i, &(rot, flip)) in variants.iter().enumerate() {
                let y = untransform(&mu.narrow(0, i as i64 * b, b), rot, flip);
                sum = Some(match sum {
                    Some(s) => s + y,
                    None => y,
                });
            }
        }
        let (identity, features) = identity.expect("the identity pass ran");
        Some(SelfEnsemble {
            mean: sum.expect("eight variants") / 8.0,
            identity,
            features,
        })
    }

    /// The denoiser's conditioning: encoder features and the unshuffled μ.
    pub fn condition(&self, mu: &Tensor, features: &Tensor) -> Tensor {
        let mu_lr = mu.pixel_unshuffle(self.cfg.scale) - 0.5;
        Tensor::cat(&[&mu_lr, &features.to_kind(mu_lr.kind())], 1)
    }

    /// Denoiser output (v or x₀, per the config) for the noisy unshuffled
    /// residual `x_t` at times `t` (`[B]`, in [0, 1]).
    pub fn denoise(&self, x_t: &Tensor, t: &Tensor, cond: &Tensor) -> Tensor {
        let d = &self.denoiser;
        let levels = self.cfg.unet.len() as i64;
        let multiple = 1i64 << (levels - 1);
        let (_, _, h, w) = x_t.size4().expect("denoiser input is NCHW");
        let (ph, pw) = (
            (multiple - h % multiple) % multiple,
            (multiple - w % multiple) % multiple,
        );
        let x = Tensor::cat(&[x_t, cond], 1);
        let x = if ph > 0 || pw > 0 {
            x.replication_pad2d([0, pw, 0, ph])
        } else {
            x
        };

        let temb = timestep_embedding(&(t * 1000.0), d.t_in).to_kind(x.kind());
        let temb = d.t2.forward(&d.t1.forward(&temb).silu());

        let mut hcur = d.input.forward(&x);
        let mut skips = Vec::new();
        for (i, block) in d.down.iter().enumerate() {
            hcur = block.forward(&hcur, &temb);
            skips.push(hcur.shallow_clone());
            if let Some(ds) = d.downsample.get(i) {
                hcur = ds.forward(&hcur);
            }
        }
        hcur = d.mid.forward(&hcur, &temb);
        for (j, block) in d.up.iter().enumerate() {
            let skip = skips.pop().expect("one skip per level");
            hcur = block.forward(&Tensor::cat(&[&hcur, &skip], 1), &temb);
            if let Some(us) = d.upsample.get(j) {
                let (hh, ww) = (hcur.size()[2] * 2, hcur.size()[3] * 2);
                hcur = us.forward(&hcur.upsample_nearest2d([hh, ww], None::<f64>, None::<f64>));
            }
        }
        let out = d.output.forward(&d.out_norm.forward(&hcur).silu());
        out.narrow(2, 0, h).narrow(3, 0, w)
    }
}

/// Sinusoidal embedding of (scaled) times `t` `[B]` → `[B, dim]`, in fp32.
fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * (-(10_000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], 1)
}
