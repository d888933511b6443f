//! Image -> network input, exactly as a model's manifest says: resize (shorter side, filter),
//! centre crop, per-channel normalisation, CHW float layout.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::image::Rgb8;
use crate::models::{Manifest, ResizeFilter};

fn resize(src: &Rgb8, width: u32, height: u32, filter: ResizeFilter) -> Result<Rgb8, String> {
    if (src.width, src.height) == (width, height) {
        return Ok(src.clone());
    }
    let source = ImageRef::new(src.width, src.height, &src.data, PixelType::U8x3)
        .map_err(|e| format!("resize: {e}"))?;
    let mut target = Image::new(width, height, PixelType::U8x3);
    let algorithm = match filter {
        ResizeFilter::Nearest => ResizeAlg::Nearest,
        ResizeFilter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        ResizeFilter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
    };
    Resizer::new()
        .resize(
            &source,
            &mut target,
            &ResizeOptions::new().resize_alg(algorithm),
        )
        .map_err(|e| format!("resize: {e}"))?;
    Ok(Rgb8 {
        width,
        height,
        data: target.into_vec(),
    })
}

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
fn centre_offset(side: u32, size: u32) -> usize {
    (f64::from(side - size) / 2.0).round_ties_even() as usize
}

/// Resizes and crops `image` to the model's square input, still as 8-bit RGB.
pub fn resize_and_crop(image: &Rgb8, manifest: &Manifest) -> Result<Rgb8, String> {
    let size = manifest.input_size;
    let spec = &manifest.preprocess;
    if spec.resize_shorter_side == 0 {
        return resize(image, size, size, spec.filter);
    }
    if spec.crop != "center" {
        return Err(format!("unsupported crop `{}` in manifest", spec.crop));
    }
    let (w, h) = shorter_side_size(image.width, image.height, spec.resize_shorter_side);
    if w < size || h < size {
        return Err(format!(
            "resized image {w}x{h} is smaller than the {size}x{size} crop"
        ));
    }
    let resized = resize(image, w, h, spec.filter)?;
    let (top, left) = (centre_offset(h, size), centre_offset(w, size));
    let (size, w) = (size as usize, w as usize);
    let mut data = Vec::with_capacity(size * size * 3);
    for row in top..top + size {
        let start = (row * w + left) * 3;
        data.extend_from_slice(&resized.data[start..start + size * 3]);
    }
    Ok(Rgb8 {
        width: size as u32,
        height: size as u32,
        data,
    })
}

/// Writes `(pixel - mean) / std` in CHW order into `out` (length 3 x size x size).
pub fn normalise_into(image: &Rgb8, manifest: &Manifest, out: &mut [f32]) {
    let plane = (image.width * image.height) as usize;
    let (mean, std) = (manifest.preprocess.mean, manifest.preprocess.std);
    for (i, px) in image.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) - mean[c]) / std[c];
        }
    }
}

/// The full preprocessing of one image: resize, crop, normalise -> CHW floats.
pub fn preprocess(image: &Rgb8, manifest: &Manifest) -> Result<Vec<f32>, String> {
    let cropped = resize_and_crop(image, manifest)?;
    let mut out = vec![0.0; cropped.data.len()];
    normalise_into(&cropped, manifest, &mut out);
    Ok(out)
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
