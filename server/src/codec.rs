//! Image probing, decoding and encoding (the `image` crate), with budgets.
//!
//! [`probe`] reads only the header (format, dimensions) so oversized images
//! and decompression bombs are refused before any pixel buffer exists.
//! [`decode`] runs with [`image::Limits`] on the decoder as a second line of
//! defence, and turns PNG / JPEG / TIFF in 8 or 16 bits, gray / gray+alpha /
//! RGB / RGBA into a [`Planar`]. [`encode`] writes the backend's output back
//! at the input's bit depth and channel layout: PNG, or TIFF for TIFF input
//! (gray+alpha TIFF comes back as PNG: the TIFF encoder has no such layout),
//! unless the client asked otherwise ([`OutputPrefs`]: an uncompressed TIFF,
//! or another PNG compression level, trade bytes on the wire for CPU time).

use std::io::Cursor;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageError, ImageFormat, ImageReader};

use crate::backend::Planar;
use crate::error::Error;

/// Bytes the decoder may allocate per allowed pixel: 4 channels of 32-bit
/// float (the widest layout `image` produces) with room for its scratch.
const ALLOC_BYTES_PER_PIXEL: u64 = 4 * 4 * 2;

/// Accepted container formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
    /// TIFF.
    Tiff,
}

/// What the header says, learned without decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Container format.
    pub format: Container,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Probe {
    /// `width * height`.
    #[must_use]
    pub const fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// Sample depth of the input, kept for the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitDepth {
    /// 8 bits per sample.
    Eight,
    /// 16 bits per sample (also used for float input).
    Sixteen,
}

/// How the output is to be encoded (mirrors the input unless the client
/// asked otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Input container; TIFF in → TIFF out, else PNG.
    pub format: Container,
    /// Sample depth.
    pub depth: BitDepth,
    /// PNG deflate level.
    pub compression: PngCompression,
}

impl Layout {
    /// This layout with the client's preferences applied.
    #[must_use]
    pub fn with(self, prefs: OutputPrefs) -> Self {
        Self {
            format: prefs.format.unwrap_or(self.format),
            compression: prefs.compression,
            ..self
        }
    }
}

/// How fast the PNG answer is deflated: encoding a 1024² output is most of
/// a bicubic request's CPU time, and a client on a fast link may prefer
/// larger, cheaper answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PngCompression {
    /// Stored blocks, no filtering: the cheapest to produce, ~raw size.
    None,
    /// Fast deflate with adaptive filtering (the default).
    #[default]
    Fast,
    /// Best deflate: smallest answer, several times the encode time.
    Best,
}

impl PngCompression {
    /// A stable tag (the coalescing key, logs).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Fast => "fast",
            Self::Best => "best",
        }
    }
}

/// What the client asked of the answer's encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputPrefs {
    /// The container, when the client chose one (`Accept`); else the
    /// input's.
    pub format: Option<Container>,
    /// PNG deflate level.
    pub compression: PngCompression,
}

/// An encoded image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The file bytes.
    pub bytes: Vec<u8>,
    /// Its media type.
    pub content_type: &'static str,
}

/// A format-sniffing reader over a byte slice.
type Reader<'a> = ImageReader<Cursor<&'a [u8]>>;

fn reader(bytes: &[u8], max_pixels: u64) -> Result<(Reader<'_>, Container), Error> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::CorruptImage(e.to_string()))?;
    let container = match reader.format() {
        Some(ImageFormat::Png) => Container::Png,
        Some(ImageFormat::Jpeg) => Container::Jpeg,
        Some(ImageFormat::Tiff) => Container::Tiff,
        Some(other) => {
            return Err(Error::UnsupportedFormat(format!(
                "{other:?}; send PNG, JPEG or TIFF"
            )));
        }
        None => {
            return Err(Error::UnsupportedFormat(
                "unrecognised data; send PNG, JPEG or TIFF".to_owned(),
            ));
        }
    };
    let mut limits = image::Limits::default();
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(max_pixels.saturating_mul(ALLOC_BYTES_PER_PIXEL));
    reader.limits(limits);
    Ok((reader, container))
}

fn map_image_error(err: ImageError) -> Error {
    match err {
        ImageError::Limits(e) => Error::DecodeLimit(e.to_string()),
        ImageError::Unsupported(e) => Error::UnsupportedFormat(e.to_string()),
        other => Error::CorruptImage(other.to_string()),
    }
}

/// Reads the header: format and dimensions, checked against `max_pixels`.
///
/// # Errors
/// 415 for formats other than PNG/JPEG/TIFF, 400 for an unreadable header,
/// 413 when the announced size exceeds the budget.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<Probe, Error> {
    let (reader, format) = reader(bytes, max_pixels)?;
    let decoder = reader.into_decoder().map_err(map_image_error)?;
    let (width, height) = decoder.dimensions();
    let probe = Probe {
        format,
        width,
        height,
    };
    if width == 0 || height == 0 {
        return Err(Error::CorruptImage(format!(
            "the image is {width}x{height}"
        )));
    }
    if probe.pixels() > max_pixels {
        return Err(Error::ImageTooLarge {
            what: "image",
            width: width.into(),
            height: height.into(),
            pixels: probe.pixels(),
            limit: max_pixels,
        });
    }
    Ok(probe)
}

/// Decodes the image into planar `[0, 1]` samples.
///
/// # Errors
/// As [`probe`]; also 400 for corrupt pixel data and 413 when the decoder
/// would allocate more than the budget allows.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<(Planar, Layout), Error> {
    let (reader, format) = reader(bytes, max_pixels)?;
    let image = reader.decode().map_err(map_image_error)?;
    let depth = match image {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => BitDepth::Eight,
        _ => BitDepth::Sixteen,
    };
    let planar = match image {
        DynamicImage::ImageLuma8(b) => planes(b.width(), b.height(), 1, b.as_raw(), |v| {
            f32::from(v) / 255.0
        }),
        DynamicImage::ImageLumaA8(b) => planes(b.width(), b.height(), 2, b.as_raw(), |v| {
            f32::from(v) / 255.0
        }),
        DynamicImage::ImageRgb8(b) => planes(b.width(), b.height(), 3, b.as_raw(), |v| {
            f32::from(v) / 255.0
        }),
        DynamicImage::ImageRgba8(b) => planes(b.width(), b.height(), 4, b.as_raw(), |v| {
            f32::from(v) / 255.0
        }),
        DynamicImage::ImageLuma16(b) => planes(b.width(), b.height(), 1, b.as_raw(), |v| {
            f32::from(v) / 65535.0
        }),
        DynamicImage::ImageLumaA16(b) => planes(b.width(), b.height(), 2, b.as_raw(), |v| {
            f32::from(v) / 65535.0
        }),
        DynamicImage::ImageRgb16(b) => planes(b.width(), b.height(), 3, b.as_raw(), |v| {
            f32::from(v) / 65535.0
        }),
        DynamicImage::ImageRgba16(b) => planes(b.width(), b.height(), 4, b.as_raw(), |v| {
            f32::from(v) / 65535.0
        }),
        DynamicImage::ImageRgb32F(b) => {
            planes(b.width(), b.height(), 3, b.as_raw(), |v| v.clamp(0.0, 1.0))
        }
        DynamicImage::ImageRgba32F(b) => {
            planes(b.width(), b.height(), 4, b.as_raw(), |v| v.clamp(0.0, 1.0))
        }
        other => {
            let b = other.to_rgba16();
            planes(b.width(), b.height(), 4, b.as_raw(), |v| {
                f32::from(v) / 65535.0
            })
        }
    };
    Ok((
        planar,
        Layout {
            format,
            depth,
            compression: PngCompression::default(),
        },
    ))
}

/// Interleaved (HWC) samples → planar (CHW) `f32`.
fn planes<T: Copy>(
    width: u32,
    height: u32,
    channels: u8,
    raw: &[T],
    to_f32: impl Fn(T) -> f32,
) -> Planar {
    let c = usize::from(channels);
    let plane = raw.len() / c;
    let mut data = vec![0.0_f32; raw.len()];
    for (i, px) in raw.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            data[ch * plane + i] = to_f32(v);
        }
    }
    Planar {
        channels,
        width,
        height,
        data,
    }
}

/// Planar (CHW) `f32` → interleaved (HWC) samples, clamped and rounded.
/// One pass per channel over its plane, without index arithmetic or bounds
/// checks in the loop: on a 1024² answer this is a good share of a bicubic
/// request's CPU.
fn interleave<T: Copy + Default>(p: &Planar, from_f32: impl Fn(f32) -> T) -> Vec<T> {
    let c = usize::from(p.channels).max(1);
    let plane = p.data.len() / c;
    let mut out = vec![T::default(); plane * c];
    for (ch, src) in p.data.chunks_exact(plane.max(1)).enumerate() {
        for (dst, &v) in out[ch..].iter_mut().step_by(c).zip(src) {
            *dst = from_f32(v);
        }
    }
    out
}

/// `v` in [0, 1] scaled to 0..=`max`, rounded half away from zero exactly
/// as `f32::round` does, without its libm call (which keeps the loop
/// scalar): `y - trunc(y)` is exact for these magnitudes.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
#[inline]
fn scale_round(v: f32, max: f32) -> u32 {
    let y = v.clamp(0.0, 1.0) * max;
    let t = y as u32;
    #[allow(clippy::cast_precision_loss)]
    let up = y - t as f32 >= 0.5;
    t + u32::from(up)
}

#[allow(clippy::cast_possible_truncation)]
fn to_u8(v: f32) -> u8 {
    scale_round(v, 255.0) as u8
}

#[allow(clippy::cast_possible_truncation)]
fn to_u16(v: f32) -> u16 {
    scale_round(v, 65535.0) as u16
}

/// Encodes the backend's output with the input's layout.
///
/// # Errors
/// [`Error::Internal`] when the planar buffer is inconsistent or encoding fails.
pub fn encode(p: &Planar, layout: Layout) -> Result<Encoded, Error> {
    let expected = usize::from(p.channels) * p.width as usize * p.height as usize;
    if p.data.len() != expected || !(1..=4).contains(&p.channels) {
        return Err(Error::Internal(format!(
            "backend returned {} samples for {}x{}x{}",
            p.data.len(),
            p.width,
            p.height,
            p.channels
        )));
    }
    let bad = || Error::Internal("output buffer does not match its dimensions".to_owned());
    let (w, h) = (p.width, p.height);
    let image = match (layout.depth, p.channels) {
        (BitDepth::Eight, 1) => DynamicImage::ImageLuma8(
            ImageBuffer::from_raw(w, h, interleave(p, to_u8)).ok_or_else(bad)?,
        ),
        (BitDepth::Eight, 2) => DynamicImage::ImageLumaA8(
            ImageBuffer::from_raw(w, h, interleave(p, to_u8)).ok_or_else(bad)?,
        ),
        (BitDepth::Eight, 3) => DynamicImage::ImageRgb8(
            ImageBuffer::from_raw(w, h, interleave(p, to_u8)).ok_or_else(bad)?,
        ),
        (BitDepth::Eight, _) => DynamicImage::ImageRgba8(
            ImageBuffer::from_raw(w, h, interleave(p, to_u8)).ok_or_else(bad)?,
        ),
        (BitDepth::Sixteen, 1) => DynamicImage::ImageLuma16(
            ImageBuffer::from_raw(w, h, interleave(p, to_u16)).ok_or_else(bad)?,
        ),
        (BitDepth::Sixteen, 2) => DynamicImage::ImageLumaA16(
            ImageBuffer::from_raw(w, h, interleave(p, to_u16)).ok_or_else(bad)?,
        ),
        (BitDepth::Sixteen, 3) => DynamicImage::ImageRgb16(
            ImageBuffer::from_raw(w, h, interleave(p, to_u16)).ok_or_else(bad)?,
        ),
        (BitDepth::Sixteen, _) => DynamicImage::ImageRgba16(
            ImageBuffer::from_raw(w, h, interleave(p, to_u16)).ok_or_else(bad)?,
        ),
    };
    let mut bytes = Cursor::new(Vec::new());
    let (written, content_type) = if layout.format == Container::Tiff && p.channels != 2 {
        (image.write_to(&mut bytes, ImageFormat::Tiff), "image/tiff")
    } else {
        // Fast deflate by default: outputs are large and encoding runs while
        // clients wait; the size difference to the default level is small
        // for photos.
        let (compression, filter) = match layout.compression {
            PngCompression::None => (CompressionType::Uncompressed, FilterType::NoFilter),
            PngCompression::Fast => (CompressionType::Fast, FilterType::Adaptive),
            PngCompression::Best => (CompressionType::Best, FilterType::Adaptive),
        };
        let png = PngEncoder::new_with_quality(&mut bytes, compression, filter);
        (image.write_with_encoder(png), "image/png")
    };
    written.map_err(|e| Error::Internal(format!("encoding the output failed: {e}")))?;
    Ok(Encoded {
        bytes: bytes.into_inner(),
        content_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    #[test]
    fn samples_round_as_f32_round_does() {
        let reference = |v: f32, max: f32| (v.clamp(0.0, 1.0) * max).round() as u32;
        let mut values = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, -1.0, 2.0];
        // Every tie and its neighbours, and a sweep.
        for k in 0..=65535u32 {
            for max in [255.0f32, 65535.0] {
                let tie = (k as f32 + 0.5) / max;
                values.extend([tie, tie.next_up(), tie.next_down()]);
            }
        }
        values.extend((0..=100_000).map(|i| i as f32 / 100_000.0));
        for v in values {
            assert_eq!(u32::from(to_u8(v)), reference(v, 255.0), "{v:e}");
            assert_eq!(u32::from(to_u16(v)), reference(v, 65535.0), "{v:e}");
        }
    }

    #[test]
    fn interleaving_puts_each_channel_in_its_place() {
        for channels in 1..=4u8 {
            let (w, h) = (5u32, 3u32);
            let n = usize::from(channels) * (w * h) as usize;
            #[allow(clippy::cast_precision_loss)]
            let data: Vec<f32> = (0..n).map(|i| i as f32 / 255.0).collect();
            let p = Planar {
                channels,
                width: w,
                height: h,
                data,
            };
            let plane = (w * h) as usize;
            let want: Vec<u8> = (0..plane)
                .flat_map(|i| (0..usize::from(channels)).map(move |ch| ch * plane + i))
                .map(|j| u8::try_from(j).expect("small"))
                .collect();
            assert_eq!(interleave(&p, to_u8), want, "{channels} channels");
        }
    }

    #[test]
    fn the_clients_encoding_is_honoured_and_lossless() {
        let buf = ImageBuffer::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 251) as u8])
        });
        let src = DynamicImage::ImageRgb8(buf);
        let (planar, layout) = decode(&png(&src), 10_000).expect("decode");
        let size = |prefs: OutputPrefs| {
            let out = encode(&planar, layout.with(prefs)).expect("encode");
            let back = image::load_from_memory(&out.bytes).expect("readable");
            assert_eq!(back.to_rgb8(), src.to_rgb8(), "{prefs:?}");
            (out.content_type, out.bytes.len())
        };
        let (ct, none) = size(OutputPrefs {
            compression: PngCompression::None,
            ..OutputPrefs::default()
        });
        assert_eq!(ct, "image/png");
        assert!(none >= 64 * 48 * 3, "stored: {none}");
        let (_, fast) = size(OutputPrefs::default());
        let (_, best) = size(OutputPrefs {
            compression: PngCompression::Best,
            ..OutputPrefs::default()
        });
        assert!(best <= fast && fast < none, "{best} {fast} {none}");
        let (ct, _) = size(OutputPrefs {
            format: Some(Container::Tiff),
            ..OutputPrefs::default()
        });
        assert_eq!(ct, "image/tiff");
    }

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).expect("encode");
        out.into_inner()
    }

    #[test]
    fn rgba16_round_trips_exactly() {
        let buf = ImageBuffer::from_fn(3, 2, |x, y| {
            let v = u16::try_from(x * 20_000 + y * 7).unwrap_or(0);
            image::Rgba([v, 65535 - v, 12_345, 40_000])
        });
        let src = DynamicImage::ImageRgba16(buf);
        let bytes = png(&src);
        let (planar, layout) = decode(&bytes, 100).expect("decode");
        assert_eq!((planar.channels, planar.width, planar.height), (4, 3, 2));
        assert_eq!(layout.depth, BitDepth::Sixteen);
        let out = encode(&planar, layout).expect("encode");
        assert_eq!(out.content_type, "image/png");
        let back = image::load_from_memory(&out.bytes).expect("reload");
        assert_eq!(back, src);
    }

    #[test]
    fn gray_alpha8_round_trips_and_tiff_stays_tiff() {
        let src = DynamicImage::ImageLumaA8(ImageBuffer::from_fn(4, 4, |x, y| {
            image::LumaA([
                u8::try_from(x * 60).unwrap_or(0),
                u8::try_from(y * 60).unwrap_or(0),
            ])
        }));
        let (planar, layout) = decode(&png(&src), 100).expect("decode");
        assert_eq!(planar.channels, 2);
        let back = image::load_from_memory(&encode(&planar, layout).expect("encode").bytes)
            .expect("reload");
        assert_eq!(back, src);

        let rgb = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(2, 2, image::Rgb([1, 2, 3])));
        let mut tiff = Cursor::new(Vec::new());
        rgb.write_to(&mut tiff, ImageFormat::Tiff).expect("tiff");
        let (planar, layout) = decode(tiff.get_ref(), 100).expect("decode tiff");
        let out = encode(&planar, layout).expect("encode");
        assert_eq!(out.content_type, "image/tiff");
        assert_eq!(image::load_from_memory(&out.bytes).expect("reload"), rgb);
    }

    #[test]
    fn jpeg_comes_back_as_png() {
        let rgb =
            DynamicImage::ImageRgb8(ImageBuffer::from_pixel(8, 8, image::Rgb([200, 100, 50])));
        let mut jpeg = Cursor::new(Vec::new());
        rgb.write_to(&mut jpeg, ImageFormat::Jpeg).expect("jpeg");
        let (planar, layout) = decode(jpeg.get_ref(), 100).expect("decode jpeg");
        assert_eq!(
            (planar.channels, layout.format, layout.depth),
            (3, Container::Jpeg, BitDepth::Eight)
        );
        let out = encode(&planar, layout).expect("encode");
        assert_eq!(out.content_type, "image/png");
    }

    #[test]
    fn budget_and_garbage_are_refused_from_the_header() {
        let src = DynamicImage::ImageRgb8(ImageBuffer::new(10, 10));
        assert!(matches!(
            probe(&png(&src), 99),
            Err(Error::ImageTooLarge { pixels: 100, .. })
        ));
        assert!(matches!(
            probe(b"hello world, not an image", 99),
            Err(Error::UnsupportedFormat(_))
        ));
        let mut truncated = png(&src);
        truncated.truncate(20);
        assert!(matches!(
            probe(&truncated, 1000),
            Err(Error::CorruptImage(_))
        ));
    }
}
