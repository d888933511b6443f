//! Decoding one encoded image (bytes or a file) into `ImageSchema` layout or 8-bit RGB.

use std::io::Cursor;

use image::ImageDecoder;

use super::problem::{ImageProblem, ProblemKind};
use super::{MODE_BGR8, MODE_BGRA8, MODE_GRAY8};

/// Guards against decompression bombs and absurd inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DecodeLimits {
    /// Largest width or height accepted, in pixels.
    pub max_side: u32,
    /// Largest decoded size accepted, in bytes.
    pub max_decoded_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_side: 16_384,
            max_decoded_bytes: 512 * 1024 * 1024,
        }
    }
}

/// One decoded image in `ImageSchema` layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub origin: String,
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    pub mode: i32,
    /// Row-major pixels, channels interleaved in BGR(A) order (grey for mode 0).
    pub data: Vec<u8>,
}

/// Decodes encoded bytes (PNG, JPEG, GIF, BMP, WebP) into `ImageSchema` layout.
///
/// The error says why, in the reasons' vocabulary ([`ImageProblem`]): empty, unsupported
/// format, truncated, over the decode limits or undecodable.
pub fn decode_image(
    bytes: &[u8],
    origin: &str,
    limits: &DecodeLimits,
) -> std::result::Result<ImageRow, ImageProblem> {
    use ProblemKind as K;
    if bytes.is_empty() {
        return Err(ImageProblem::new(K::Empty, "0 bytes"));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageProblem::new(K::Undecodable, e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageProblem::new(
            K::UnsupportedFormat,
            format!(
                "{} bytes of no image format read here (PNG, JPEG, GIF, BMP, WebP)",
                bytes.len()
            ),
        ));
    }
    let mut reader = reader;
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(image_limits);
    let problem = |e: image::ImageError| decode_problem(e, limits);
    // The header is read and checked against the limits before any pixel buffer exists.
    let mut decoder = reader.into_decoder().map_err(problem)?;
    let (width, height) = decoder.dimensions();
    if decoder.total_bytes() > limits.max_decoded_bytes {
        return Err(ImageProblem::new(
            K::OverLimits,
            format!(
                "image is {width}x{height}: {} bytes decoded, over the limit of {} bytes",
                decoder.total_bytes(),
                limits.max_decoded_bytes
            ),
        ));
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut decoded = image::DynamicImage::from_decoder(decoder).map_err(problem)?;
    decoded.apply_orientation(orientation);
    let (width, height) = (decoded.width(), decoded.height());
    if width == 0 || height == 0 {
        return Err(ImageProblem::new(
            K::Undecodable,
            format!("image has no pixels ({width}x{height})"),
        ));
    }
    let (mode, channels, data) = if decoded.color().has_alpha() {
        let mut px = decoded.into_rgba8().into_raw();
        px.chunks_exact_mut(4).for_each(|p| p.swap(0, 2));
        (MODE_BGRA8, 4, px)
    } else if decoded.color().channel_count() == 1 {
        (MODE_GRAY8, 1, decoded.into_luma8().into_raw())
    } else {
        let mut px = decoded.into_rgb8().into_raw();
        px.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
        (MODE_BGR8, 3, px)
    };
    Ok(ImageRow {
        origin: origin.to_string(),
        height,
        width,
        channels,
        mode,
        data,
    })
}

/// The problem a decoder error means: over the limits, cut short, or otherwise undecodable.
fn decode_problem(e: image::ImageError, limits: &DecodeLimits) -> ImageProblem {
    use ProblemKind as K;
    let text = e.to_string();
    let text = text.trim_end();
    match &e {
        image::ImageError::Limits(_) => ImageProblem::new(
            K::OverLimits,
            format!(
                "{text} (limits: {} px per side, {} bytes decoded)",
                limits.max_side, limits.max_decoded_bytes
            ),
        ),
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageProblem::new(K::Truncated, text)
        }
        _ if ["end of file", "unexpected eof", "not enough bytes"]
            .iter()
            .any(|cut| text.to_ascii_lowercase().contains(cut)) =>
        {
            ImageProblem::new(K::Truncated, text)
        }
        _ => ImageProblem::new(K::Undecodable, text),
    }
}

/// An 8-bit RGB image: `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Decodes an encoded image (with `limits`) straight to 8-bit RGB, through the same
/// `ImageSchema` row the DataFrame path makes.
pub fn decode_rgb8(
    bytes: &[u8],
    origin: &str,
    limits: &DecodeLimits,
) -> std::result::Result<Rgb8, String> {
    let row = decode_image(bytes, origin, limits)?;
    to_rgb8(
        row.height as i32,
        row.width as i32,
        row.channels as i32,
        row.mode,
        &row.data,
    )
}

/// How the bytes of an [`ImageView`] are laid out, per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelLayout {
    /// One grey byte (`ImageSchema` mode 0).
    Grey,
    /// Blue, green, red (`ImageSchema` mode 16).
    Bgr,
    /// Blue, green, red, alpha (`ImageSchema` mode 24).
    Bgra,
    /// Red, green, blue ([`Rgb8`]).
    Rgb,
}

impl PixelLayout {
    /// Bytes per pixel.
    pub fn channels(self) -> usize {
        match self {
            PixelLayout::Grey => 1,
            PixelLayout::Bgr | PixelLayout::Rgb => 3,
            PixelLayout::Bgra => 4,
        }
    }
}

/// A borrowed image whose fields are known to agree: `data.len() == width * height * channels`,
/// both sides at least 1. Made from an `ImageSchema` row by [`ImageView::from_row`], which checks
/// every field before any pixel is read, or from an [`Rgb8`].
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    pub width: u32,
    pub height: u32,
    pub layout: PixelLayout,
    pub data: &'a [u8],
}

impl<'a> ImageView<'a> {
    /// Checks an `ImageSchema` row (a struct from any source: the decoder, Parquet, Spark, a
    /// caller) against itself and against `limits`, touching no pixel. The error is a readable
    /// sentence for the row.
    pub fn from_row(
        height: i32,
        width: i32,
        channels: i32,
        mode: i32,
        data: &'a [u8],
        limits: &DecodeLimits,
    ) -> std::result::Result<Self, ImageProblem> {
        let invalid = |detail: String| ImageProblem::new(ProblemKind::InvalidStruct, detail);
        let over = |detail: String| ImageProblem::new(ProblemKind::OverLimits, detail);
        if (mode, height, width, channels) == (-1, -1, -1, -1) {
            return Err(invalid(
                "Spark's image source could not decode this file (its row for one: mode -1); \
                 read the files with binaryFile instead to learn why"
                    .to_string(),
            ));
        }
        let layout = match mode {
            MODE_GRAY8 => PixelLayout::Grey,
            MODE_BGR8 => PixelLayout::Bgr,
            MODE_BGRA8 => PixelLayout::Bgra,
            other => {
                return Err(invalid(format!(
                    "unsupported image mode {other} (expected 0 = CV_8UC1, 16 = CV_8UC3, 24 = CV_8UC4)"
                )));
            }
        };
        let expected = layout.channels();
        if i64::from(channels) != expected as i64 {
            return Err(invalid(format!(
                "nChannels {channels} does not match mode {mode} ({expected} channels)"
            )));
        }
        if height <= 0 || width <= 0 {
            return Err(invalid(format!("image has no pixels ({width}x{height})")));
        }
        let (width, height) = (width as u32, height as u32);
        if width.max(height) > limits.max_side {
            return Err(over(format!(
                "image is {width}x{height}, over the limit of {} px per side",
                limits.max_side
            )));
        }
        let bytes = u64::from(width) * u64::from(height) * expected as u64;
        if bytes > limits.max_decoded_bytes {
            return Err(over(format!(
                "image is {width}x{height}x{expected}: {bytes} bytes, over the limit of {} bytes",
                limits.max_decoded_bytes
            )));
        }
        if data.len() as u64 != bytes {
            return Err(invalid(format!(
                "data has {} bytes, expected {width}x{height}x{expected} = {bytes}",
                data.len()
            )));
        }
        Ok(ImageView {
            width,
            height,
            layout,
            data,
        })
    }

    /// Appends pixels `x0..x1` of row `y` to `out` as RGB; `background` is what transparent
    /// pixels are composited over (`None`: alpha is dropped and the stored colour kept).
    pub fn row_rgb_into(
        &self,
        y: u32,
        (x0, x1): (u32, u32),
        background: Option<[u8; 3]>,
        out: &mut Vec<u8>,
    ) {
        let c = self.layout.channels();
        let start = y as usize * self.width as usize;
        let row = &self.data[(start + x0 as usize) * c..(start + x1 as usize) * c];
        match (self.layout, background) {
            (PixelLayout::Grey, _) => map_pixels(row, c, out, |p| [p[0], p[0], p[0]]),
            (PixelLayout::Rgb, _) => out.extend_from_slice(row),
            (PixelLayout::Bgr, _) | (PixelLayout::Bgra, None) => {
                map_pixels(row, c, out, |p| [p[2], p[1], p[0]])
            }
            (PixelLayout::Bgra, Some(b)) => map_pixels(row, c, out, |p| {
                let a = u32::from(p[3]);
                let over = |c: u8, b: u8| {
                    ((u32::from(c) * a + u32::from(b) * (255 - a) + 127) / 255) as u8
                };
                [over(p[2], b[0]), over(p[1], b[1]), over(p[0], b[2])]
            }),
        }
    }
}

/// Appends `rgb(pixel)` for each `c`-byte pixel of `row` to `out`: sized once, then written
/// (pushing three bytes at a time was 3% of a whole `featurize` run).
#[inline(always)]
fn map_pixels(row: &[u8], c: usize, out: &mut Vec<u8>, rgb: impl Fn(&[u8]) -> [u8; 3]) {
    let at = out.len();
    out.resize(at + row.len() / c * 3, 0);
    for (dst, p) in out[at..].chunks_exact_mut(3).zip(row.chunks_exact(c)) {
        dst.copy_from_slice(&rgb(p));
    }
}

impl Rgb8 {
    /// This image as an [`ImageView`]. Panics if `data` does not hold `width * height` pixels
    /// (an `Rgb8` that broke its own invariant).
    pub fn view(&self) -> ImageView<'_> {
        assert_eq!(
            self.data.len(),
            self.width as usize * self.height as usize * 3,
            "Rgb8 data length"
        );
        ImageView {
            width: self.width,
            height: self.height,
            layout: PixelLayout::Rgb,
            data: &self.data,
        }
    }
}

/// Converts an `ImageSchema` row (grey, BGR or BGRA) to RGB, checking that the fields agree
/// (alpha is dropped). No size limit applies: use [`ImageView::from_row`] for untrusted rows.
pub fn to_rgb8(
    height: i32,
    width: i32,
    channels: i32,
    mode: i32,
    data: &[u8],
) -> std::result::Result<Rgb8, String> {
    let unlimited = DecodeLimits {
        max_side: u32::MAX,
        max_decoded_bytes: u64::MAX,
    };
    let view = ImageView::from_row(height, width, channels, mode, data, &unlimited)?;
    let mut rgb = Vec::with_capacity(view.width as usize * view.height as usize * 3);
    for y in 0..view.height {
        view.row_rgb_into(y, (0, view.width), None, &mut rgb);
    }
    Ok(Rgb8 {
        width: view.width,
        height: view.height,
        data: rgb,
    })
}

/// Reads and decodes one file; a file over the decoded-size limit is refused before it is read.
pub(super) fn decode_file(
    path: &str,
    limits: &DecodeLimits,
) -> std::result::Result<ImageRow, ImageProblem> {
    let unreadable = |e: std::io::Error| {
        ImageProblem::new(
            ProblemKind::Undecodable,
            format!("cannot read the file: {e}"),
        )
    };
    let len = std::fs::metadata(path).map_err(unreadable)?.len();
    // An encoded image is never larger than its decoded form by more than a small factor.
    if len > limits.max_decoded_bytes {
        return Err(ImageProblem::new(
            ProblemKind::OverLimits,
            format!(
                "file is {len} bytes, over the limit of {} bytes",
                limits.max_decoded_bytes
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    decode_image(&bytes, path, limits)
}
