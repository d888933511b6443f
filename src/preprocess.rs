//! Image -> network input, as a model's manifest says (resize with its filter, centre crop,
//! per-channel normalisation, CHW float layout), plus a stage's [`PreprocessOptions`]:
//! transparent pixels composited over a background, and an optional letterbox instead of the crop.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::image::{ImageView, Rgb8};
use crate::models::{Layout, Manifest, ResizeFilter};

crate::params::choice! {
    /// `resizeMode`: how an image of any aspect ratio becomes the network's square input.
    #[derive(Default)]
    pub enum ResizeMode {
        /// The manifest's canonical preprocessing: shorter side resized, centre crop (what the
        /// network was trained with; the edges of wide or tall images are cut off).
        #[default]
        Crop = "crop",
        /// Letterbox: the longer side resized to the input size, the rest padded with the
        /// background colour; nothing is cut off.
        Pad = "pad",
    }
}

/// `alphaBackground`: what transparent pixels are composited over, before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlphaBackground {
    /// Alpha is dropped: transparent pixels keep the colour the file stores (often black,
    /// sometimes garbage). Letterbox padding is black.
    Ignore,
    /// Composited over this RGB colour; letterbox padding is this colour too.
    Colour([u8; 3]),
}

impl Default for AlphaBackground {
    fn default() -> Self {
        AlphaBackground::Colour([255, 255, 255])
    }
}

impl AlphaBackground {
    /// Parses `white`, `black`, `#rrggbb` or `none`.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = |s: &str| u8::from_str_radix(s, 16).ok();
        match text.trim().to_ascii_lowercase().as_str() {
            "white" => Some(AlphaBackground::Colour([255, 255, 255])),
            "black" => Some(AlphaBackground::Colour([0, 0, 0])),
            "none" => Some(AlphaBackground::Ignore),
            s if s.len() == 7 && s.starts_with('#') && s.is_ascii() => {
                Some(AlphaBackground::Colour([
                    hex(&s[1..3])?,
                    hex(&s[3..5])?,
                    hex(&s[5..7])?,
                ]))
            }
            _ => None,
        }
    }

    fn colour(self) -> Option<[u8; 3]> {
        match self {
            AlphaBackground::Ignore => None,
            AlphaBackground::Colour(c) => Some(c),
        }
    }
}

/// What a network stage's params add to the manifest's preprocessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PreprocessOptions {
    pub resize_mode: ResizeMode,
    pub alpha_background: AlphaBackground,
}

/// How the input is made from the source: the region `left, top, width, height` (source
/// pixels, fractional) is resized to `out`; of that, `take` (x, y, width, height) is placed at
/// `at` on the square input, the rest of which is background.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Placement {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    out: (u32, u32),
    take: (u32, u32, u32, u32),
    at: (u32, u32),
}

/// Largest resized image (RGB bytes) that the crop mode makes whole before cropping, as it always
/// did: inputs stay bit for bit what they were (and what saved models predicted) for every
/// image up to an aspect ratio of about 21:1. Beyond, only the cropped region is resized.
const FULL_RESIZE_MAX_BYTES: u64 = 4 << 20;

/// Size after torchvision's `Resize(shorter_side)`: the shorter side becomes `shorter_side`,
/// the longer one `floor(long * shorter_side / short)`.
fn shorter_side_size(width: u32, height: u32, shorter_side: u32) -> (u32, u32) {
    let scale = |long: u32, short: u32| {
        (u64::from(long) * u64::from(shorter_side) / u64::from(short)) as u32
    };
    if width <= height {
        (shorter_side, scale(height, width))
    } else {
        (scale(width, height), shorter_side)
    }
}

/// torchvision's `CenterCrop` offset: `int(round((side - size) / 2))`, where Python's `round`
/// takes halves to the even neighbour (a 385-wide image cropped to 224 starts at 80, not 81).
fn centre_offset(side: u32, size: u32) -> u32 {
    (f64::from(side - size) / 2.0).round_ties_even() as u32
}

/// Where the input's pixels come from. Crop mode is torchvision's resize + centre crop; when the
/// resized image would be larger than [`FULL_RESIZE_MAX_BYTES`] (a 16384x1 image would need a
/// 4,194,304 x 256 one), the crop box is mapped back through the resize onto the source and only
/// that region is resized: the same pixels up to rounding, without the full resize.
fn placement(
    width: u32,
    height: u32,
    manifest: &Manifest,
    mode: ResizeMode,
) -> Result<Placement, String> {
    let size = manifest.input_size;
    let spec = &manifest.preprocess;
    let whole = |out: (u32, u32), take: (u32, u32, u32, u32), at: (u32, u32)| Placement {
        left: 0.0,
        top: 0.0,
        width: f64::from(width),
        height: f64::from(height),
        out,
        take,
        at,
    };
    match mode {
        ResizeMode::Pad => {
            let long = width.max(height);
            let fit = |side: u32| {
                ((u64::from(side) * u64::from(size) + u64::from(long) / 2) / u64::from(long))
                    .clamp(1, u64::from(size)) as u32
            };
            let out = (fit(width), fit(height));
            let at = ((size - out.0) / 2, (size - out.1) / 2);
            Ok(whole(out, (0, 0, out.0, out.1), at))
        }
        ResizeMode::Crop if spec.resize_shorter_side == 0 => {
            Ok(whole((size, size), (0, 0, size, size), (0, 0)))
        }
        ResizeMode::Crop => {
            if spec.crop != "center" {
                return Err(format!("unsupported crop `{}` in manifest", spec.crop));
            }
            let (w, h) = shorter_side_size(width, height, spec.resize_shorter_side);
            if w < size || h < size {
                return Err(format!(
                    "resized image {w}x{h} is smaller than the {size}x{size} crop"
                ));
            }
            let (left, top) = (centre_offset(w, size), centre_offset(h, size));
            if u64::from(w) * u64::from(h) * 3 <= FULL_RESIZE_MAX_BYTES {
                return Ok(whole((w, h), (left, top, size, size), (0, 0)));
            }
            let (sx, sy) = (
                f64::from(width) / f64::from(w),
                f64::from(height) / f64::from(h),
            );
            Ok(Placement {
                left: f64::from(left) * sx,
                top: f64::from(top) * sy,
                width: f64::from(size) * sx,
                height: f64::from(size) * sy,
                out: (size, size),
                take: (0, 0, size, size),
                at: (0, 0),
            })
        }
    }
}

/// Checks that `image` can be preprocessed for `manifest` (reads no pixel).
pub fn check_fits(
    image: &ImageView<'_>,
    manifest: &Manifest,
    options: &PreprocessOptions,
) -> Result<(), String> {
    placement(image.width, image.height, manifest, options.resize_mode).map(|_| ())
}

/// The filter's algorithm and its support radius in source pixels at scale 1.
fn algorithm(filter: ResizeFilter) -> (ResizeAlg, f64) {
    match filter {
        ResizeFilter::Nearest => (ResizeAlg::Nearest, 0.5),
        ResizeFilter::Bilinear => (ResizeAlg::Convolution(FilterType::Bilinear), 1.0),
        ResizeFilter::Bicubic => (ResizeAlg::Convolution(FilterType::CatmullRom), 2.0),
    }
}

/// Integer source span `[start, end)` that holds every pixel the filter reads for the
/// fractional span `[from, from + len)` resized to `out` pixels.
fn source_span(from: f64, len: f64, out: u32, side: u32, support: f64) -> (u32, u32) {
    let reach = support * (len / f64::from(out)).max(1.0) + 1.0;
    let start = (from - reach).floor().max(0.0) as u32;
    let end = ((from + len + reach).ceil() as u64).min(u64::from(side)) as u32;
    (start.min(side.saturating_sub(1)), end.max(start + 1))
}

/// Resizes `image` to the model's square input as 8-bit RGB: alpha composited over the
/// background, then the manifest's resize + centre crop (`Crop`) or a letterbox (`Pad`).
/// Allocates the output, the part of the source the output reads (converted to RGB: never more
/// than the source itself) and at most [`FULL_RESIZE_MAX_BYTES`] of resized image, whatever the
/// aspect ratio.
pub fn fit_to_input(
    image: &ImageView<'_>,
    manifest: &Manifest,
    options: &PreprocessOptions,
) -> Result<Rgb8, String> {
    let size = manifest.input_size;
    let place = placement(image.width, image.height, manifest, options.resize_mode)?;
    let (alg, support) = algorithm(manifest.preprocess.filter);
    let (x0, x1) = source_span(place.left, place.width, place.out.0, image.width, support);
    let (y0, y1) = source_span(place.top, place.height, place.out.1, image.height, support);
    let background = options.alpha_background.colour();
    let mut window = Vec::with_capacity((x1 - x0) as usize * (y1 - y0) as usize * 3);
    for y in y0..y1 {
        image.row_rgb_into(y, (x0, x1), background, &mut window);
    }
    let source = ImageRef::new(x1 - x0, y1 - y0, &window, PixelType::U8x3)
        .map_err(|e| format!("resize: {e}"))?;
    let mut resized = Image::new(place.out.0, place.out.1, PixelType::U8x3);
    // The mapped crop box may end a rounding error past the image's edge.
    let crop = ResizeOptions::new().resize_alg(alg).crop(
        place.left - f64::from(x0),
        place.top - f64::from(y0),
        place.width.min(f64::from(x1) - place.left),
        place.height.min(f64::from(y1) - place.top),
    );
    Resizer::new()
        .resize(&source, &mut resized, &crop)
        .map_err(|e| format!("resize: {e}"))?;
    if place.out == (size, size) && place.take == (0, 0, size, size) {
        return Ok(Rgb8 {
            width: size,
            height: size,
            data: resized.into_vec(),
        });
    }
    let pad = background.unwrap_or([0, 0, 0]);
    let mut data: Vec<u8> = pad.repeat((size * size) as usize);
    let (tx, ty, tw, th) = place.take;
    let (stride, row) = (place.out.0 as usize * 3, tw as usize * 3);
    for y in 0..th as usize {
        let from = (ty as usize + y) * stride + tx as usize * 3;
        let to = ((place.at.1 as usize + y) * size as usize + place.at.0 as usize) * 3;
        data[to..to + row].copy_from_slice(&resized.buffer()[from..from + row]);
    }
    Ok(Rgb8 {
        width: size,
        height: size,
        data,
    })
}

/// Writes `(pixel - mean) / std` into `out` (length 3 x size x size) in the manifest's channel
/// order (RGB or BGR) and layout (CHW, or HWC for an NHWC model).
pub fn normalise_into(image: &Rgb8, manifest: &Manifest, out: &mut [f32]) {
    let plane = (image.width * image.height) as usize;
    let (mean, std) = (manifest.preprocess.mean, manifest.preprocess.std);
    // Output channel c reads source channel `from[c]`.
    let from = if manifest.preprocess.channel_order == "BGR" {
        [2, 1, 0]
    } else {
        [0, 1, 2]
    };
    match manifest.input_layout() {
        Layout::Nchw => {
            for (i, px) in image.data.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * plane + i] = (f32::from(px[from[c]]) - mean[c]) / std[c];
                }
            }
        }
        Layout::Nhwc => {
            for (dst, px) in out.chunks_exact_mut(3).zip(image.data.chunks_exact(3)) {
                for c in 0..3 {
                    dst[c] = (f32::from(px[from[c]]) - mean[c]) / std[c];
                }
            }
        }
    }
}

/// The full preprocessing of one image with a stage's options: fit, normalise -> CHW floats
/// written into `out` (length 3 x size x size).
pub fn preprocess_into(
    image: &ImageView<'_>,
    manifest: &Manifest,
    options: &PreprocessOptions,
    out: &mut [f32],
) -> Result<(), String> {
    let fitted = fit_to_input(image, manifest, options)?;
    if out.len() != fitted.data.len() {
        return Err(format!(
            "input buffer holds {} values, the image gives {}",
            out.len(),
            fitted.data.len()
        ));
    }
    normalise_into(&fitted, manifest, out);
    Ok(())
}

/// [`preprocess_into`] a new vector.
pub fn preprocess_with(
    image: &ImageView<'_>,
    manifest: &Manifest,
    options: &PreprocessOptions,
) -> Result<Vec<f32>, String> {
    let size = manifest.input_size as usize;
    let mut out = vec![0.0; 3 * size * size];
    preprocess_into(image, manifest, options, &mut out)?;
    Ok(out)
}

/// The manifest's canonical preprocessing of an RGB image: resize, centre crop, normalise.
pub fn preprocess(image: &Rgb8, manifest: &Manifest) -> Result<Vec<f32>, String> {
    preprocess_with(&image.view(), manifest, &PreprocessOptions::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_side_matches_torchvision() {
        assert_eq!(shorter_side_size(451, 300, 256), (384, 256));
        assert_eq!(shorter_side_size(300, 451, 256), (256, 384));
        assert_eq!(shorter_side_size(28, 28, 256), (256, 256));
    }

    #[test]
    fn centre_offset_rounds_halves_to_even_like_torchvision() {
        // Python: int(round((385 - 224) / 2)) == 80, int(round((387 - 224) / 2)) == 82.
        assert_eq!(centre_offset(385, 224), 80);
        assert_eq!(centre_offset(387, 224), 82);
        assert_eq!(centre_offset(384, 224), 80);
        assert_eq!(centre_offset(342, 299), 22); // round(21.5) == 22
        assert_eq!(centre_offset(224, 224), 0);
    }
}
