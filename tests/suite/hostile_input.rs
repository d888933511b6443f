//! Hostile and broken input: a folder of decompression bombs, truncated files of every format,
//! empty and random files, edge-case images and odd pixel formats, featurized in one job. The job
//! completes; broken rows are null with a message; valid rows equal their stand-alone features.
//! Pixel formats and EXIF orientations are checked pixel by pixel against values worked out by
//! hand; bombs are checked with a counting allocator (this binary's global allocator) to make no
//! large allocation. Hostile networks: one that panics, and ones whose outputs disagree with
//! their manifests, fail the query with an error and leave the process running. The corpus is
//! generated here (three fixtures the Rust encoders cannot write come from `fuzz/make_corpus.py`).

use crate::common;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use burn::prelude::{Device, Tensor};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray, RecordBatch};
use datafusion::arrow::datatypes::Float32Type;
use deep_pipelines::image::{
    DecodeLimits, MODE_BGR8, MODE_BGRA8, MODE_GRAY8, ProblemKind, decode_binary_array,
    decode_image, decode_rgb8,
};
use deep_pipelines::models::{ImageNetwork, Manifest, load_model, manifest, register_network};
use deep_pipelines::prelude::*;
use deep_pipelines::preprocess::preprocess;
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};

/// A global allocator that records the largest single allocation (or reallocation) made by
/// threads that opted in, so one test can ask "did this call allocate anything large?" while
/// the other tests of this binary run concurrently on their own threads.
mod allocation_probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub struct LargestAllocation;

    thread_local! {
        // Const-initialised and without a destructor: reading it never allocates.
        static WATCHED: Cell<bool> = const { Cell::new(false) };
    }
    static LARGEST: AtomicUsize = AtomicUsize::new(0);
    /// One measuring window at a time, so two watched threads never share `LARGEST`.
    static WINDOW: Mutex<()> = Mutex::new(());

    fn note(size: usize) {
        if WATCHED.try_with(Cell::get).unwrap_or(false) {
            LARGEST.fetch_max(size, Ordering::SeqCst);
        }
    }

    unsafe impl GlobalAlloc for LargestAllocation {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    struct Unwatch;
    impl Drop for Unwatch {
        fn drop(&mut self) {
            WATCHED.set(false);
        }
    }

    /// Runs `f` on this thread and returns its result with the largest single allocation that
    /// this thread made meanwhile (allocations of other threads are not counted).
    pub fn largest_allocation_in<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let _window = WINDOW.lock().unwrap_or_else(|p| p.into_inner());
        LARGEST.store(0, Ordering::SeqCst);
        WATCHED.set(true);
        let unwatch = Unwatch;
        let result = f();
        drop(unwatch);
        (result, LARGEST.load(Ordering::SeqCst))
    }
}

#[global_allocator]
static ALLOCATOR: allocation_probe::LargestAllocation = allocation_probe::LargestAllocation;

pub(crate) use allocation_probe::largest_allocation_in;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images");

fn photo(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    }))
}

pub(crate) fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid small PNG whose IHDR now claims `width` x `height` pixels (CRC fixed up).
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode(&photo(16, 16), ImageFormat::Png);
    // Signature (8), IHDR length (4), "IHDR" (4), width, height, ...; CRC after 13 data bytes.
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A valid small JPEG whose SOF0 frame header now claims `width` x `height` pixels.
fn jpeg_bomb(width: u16, height: u16) -> Vec<u8> {
    let mut jpeg = encode(&photo(16, 16), ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    // FF C0, length (2), precision (1), height (2), width (2).
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

/// One PNG chunk: length, type, data, CRC of type + data.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(&body);
    chunk.extend_from_slice(&crc32(&body).to_be_bytes());
    chunk
}

/// A zlib stream holding `raw` in one stored (uncompressed) deflate block.
fn zlib_stored(raw: &[u8]) -> Vec<u8> {
    let len = u16::try_from(raw.len()).unwrap();
    let mut out = vec![0x78, 0x01, 0x01];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(raw);
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in raw {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// An indexed-colour PNG (colour type 3) written byte by byte: `palette` (PLTE), optional
/// per-entry alpha (tRNS), `bit_depth` bits per index packed most significant first.
fn palette_png(
    (width, height): (u32, u32),
    bit_depth: u8,
    palette: &[[u8; 3]],
    alpha: Option<&[u8]>,
    index: impl Fn(u32, u32) -> u8,
) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, 3, 0, 0, 0]);
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"PLTE", &palette.concat()));
    if let Some(alpha) = alpha {
        png.extend(png_chunk(b"tRNS", alpha));
    }
    let mut raw = Vec::new();
    for y in 0..height {
        raw.push(0); // filter type None
        let (mut bits, mut count) = (0u32, 0u8);
        for x in 0..width {
            bits = (bits << bit_depth) | u32::from(index(x, y));
            count += bit_depth;
            if count == 8 {
                raw.push(bits as u8);
                (bits, count) = (0, 0);
            }
        }
        if count > 0 {
            raw.push((bits << (8 - count)) as u8);
        }
    }
    png.extend(png_chunk(b"IDAT", &zlib_stored(&raw)));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// A TIFF structure as EXIF stores it, holding one tag: Orientation (0x0112, SHORT) = `value`.
fn exif_orientation(value: u16, big_endian: bool) -> Vec<u8> {
    let u16_bytes = |v: u16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let u32_bytes = |v: u32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let mut tiff = if big_endian {
        b"MM".to_vec()
    } else {
        b"II".to_vec()
    };
    tiff.extend_from_slice(&u16_bytes(42));
    tiff.extend_from_slice(&u32_bytes(8)); // IFD0 right after this header
    tiff.extend_from_slice(&u16_bytes(1)); // one entry
    tiff.extend_from_slice(&u16_bytes(0x0112)); // Orientation
    tiff.extend_from_slice(&u16_bytes(3)); // SHORT
    tiff.extend_from_slice(&u32_bytes(1)); // one value
    tiff.extend_from_slice(&u16_bytes(value));
    tiff.extend_from_slice(&[0, 0]); // value padded to 4 bytes
    tiff.extend_from_slice(&u32_bytes(0)); // no next IFD
    tiff
}

/// `jpeg` with an APP1 `Exif` segment holding `tiff`, after SOI (and after APP0 if present).
fn jpeg_with_exif(jpeg: &[u8], tiff: &[u8]) -> Vec<u8> {
    let mut at = 2;
    if jpeg[2..4] == [0xFF, 0xE0] {
        at = 4 + usize::from(u16::from_be_bytes([jpeg[4], jpeg[5]]));
    }
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(tiff);
    let mut out = jpeg[..at].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&u16::try_from(payload.len() + 2).unwrap().to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[at..]);
    out
}

/// `png` with an `eXIf` chunk holding `tiff`, right after IHDR.
fn png_with_exif(png: &[u8], tiff: &[u8]) -> Vec<u8> {
    let after_ihdr = 8 + 25;
    let mut out = png[..after_ihdr].to_vec();
    out.extend(png_chunk(b"eXIf", tiff));
    out.extend_from_slice(&png[after_ihdr..]);
    out
}

fn animated_gif() -> Vec<u8> {
    let frame = |v: u8| {
        image::Frame::new(ImageBuffer::from_fn(20, 10, move |_, _| {
            Rgba([v, 255 - v, 40, 255])
        }))
    };
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        encoder.encode_frames([frame(200), frame(10)]).unwrap();
    }
    out
}

/// What each file is and whether it must decode.
struct Case {
    bytes: Vec<u8>,
    valid: Option<bool>,
}

fn corpus() -> BTreeMap<String, Case> {
    let mut cases = BTreeMap::new();
    let mut add = |name: &str, bytes: Vec<u8>, valid: Option<bool>| {
        cases.insert(name.to_string(), Case { bytes, valid });
    };
    add("bomb.png", png_bomb(50_000, 50_000), Some(false));
    add("bomb.jpg", jpeg_bomb(50_000, 50_000), Some(false));
    add("empty.png", Vec::new(), Some(false));
    add("empty.jpg", Vec::new(), Some(false));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    for ext in ["png", "jpg", "gif", "bmp", "webp"] {
        add(&format!("random.{ext}"), random.clone(), Some(false));
    }
    let source = photo(64, 48);
    for (ext, format) in [
        ("png", ImageFormat::Png),
        ("jpg", ImageFormat::Jpeg),
        ("gif", ImageFormat::Gif),
        ("bmp", ImageFormat::Bmp),
        ("webp", ImageFormat::WebP),
    ] {
        let img = if format == ImageFormat::WebP {
            DynamicImage::ImageRgba8(source.to_rgba8())
        } else {
            source.clone()
        };
        let full = encode(&img, format);
        add(&format!("whole.{ext}"), full.clone(), Some(true));
        // Cut in the header, early, in the middle and just before the end. A decoder may
        // recover a partial image from a late cut; anything it returns must be consistent.
        for cut in [8, full.len() / 4, full.len() / 2, full.len() - 3] {
            let valid = (cut <= 8).then_some(false);
            add(
                &format!("truncated_{cut:05}.{ext}"),
                full[..cut].to_vec(),
                valid,
            );
        }
    }
    add(
        "one_pixel.png",
        encode(&photo(1, 1), ImageFormat::Png),
        Some(true),
    );
    add(
        "huge_allowed.jpg",
        encode(&photo(6000, 4000), ImageFormat::Jpeg),
        Some(true),
    );
    let grey = DynamicImage::ImageLuma8(ImageBuffer::from_fn(30, 20, |x, _| Luma([(x * 8) as u8])));
    add("grey.png", encode(&grey, ImageFormat::Png), Some(true));
    add(
        "grey_alpha.png",
        encode(
            &DynamicImage::ImageLumaA8(grey.to_luma_alpha8()),
            ImageFormat::Png,
        ),
        Some(true),
    );
    add(
        "rgba.png",
        encode(
            &DynamicImage::ImageRgba8(source.to_rgba8()),
            ImageFormat::Png,
        ),
        Some(true),
    );
    let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_fn(30, 20, |x, _| {
        Luma([(x * 2000) as u16])
    }));
    add("grey16.png", encode(&grey16, ImageFormat::Png), Some(true));
    add(
        "rgb16.png",
        encode(
            &DynamicImage::ImageRgb16(source.to_rgb16()),
            ImageFormat::Png,
        ),
        Some(true),
    );
    add("animated.gif", animated_gif(), Some(true));
    for fixture in ["cmyk.jpg", "exif_rotated.jpg", "palette.png"] {
        add(
            fixture,
            std::fs::read(Path::new(FIXTURES).join(fixture)).unwrap(),
            Some(true),
        );
    }
    cases
}

fn standalone_features(bytes: &[u8]) -> Vec<f32> {
    let model = load_model("EfficientNetLite0", "cpu").unwrap();
    let rgb = decode_rgb8(bytes, "x", &DecodeLimits::default()).unwrap();
    model
        .features(preprocess(&rgb, &model.manifest).unwrap(), 1)
        .unwrap()
}

#[tokio::test]
async fn a_folder_of_hostile_files_featurizes_with_errors_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let cases = corpus();
    for (name, case) in &cases {
        std::fs::write(dir.path().join(name), &case.bytes).unwrap();
    }
    // Plus real images.
    for file in ["00000.png", "00023.png"] {
        let bytes = std::fs::read(format!("{}/test/ankle-boot/{file}", common::DATA)).unwrap();
        std::fs::write(dir.path().join(format!("real_{file}")), bytes).unwrap();
    }

    let ctx = SessionContext::new();
    let images = read_images(&ctx, dir.path(), ReadImagesOptions::default()).unwrap();
    let out = common::collect(DeepImageFeaturizer::new().transform(images).unwrap()).await;
    assert_eq!(out.num_rows(), cases.len() + 2);

    let origins = out.column_by_name("origin").unwrap().as_string::<i32>();
    let errors = out
        .column_by_name("image_error")
        .unwrap()
        .as_string::<i32>();
    let image = out.column_by_name("image").unwrap().as_struct();
    let features = out.column_by_name("features").unwrap().as_fixed_size_list();
    let (mut valid, mut invalid) = (0, 0);
    for row in 0..out.num_rows() {
        let path = origins.value(row);
        let name = Path::new(path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let expected = cases.get(&name).map_or(Some(true), |c| c.valid);
        if image.is_valid(row) {
            assert_ne!(expected, Some(false), "{name} must not decode");
            assert!(errors.is_null(row) && features.is_valid(row), "{name}");
            let got = features.value(row);
            let got = got.as_primitive::<Float32Type>().values();
            let alone = standalone_features(&std::fs::read(path).unwrap());
            let diff = got
                .iter()
                .zip(&alone)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff <= 1e-5,
                "{name}: features differ from stand-alone by {diff}"
            );
            valid += 1;
        } else {
            assert_ne!(
                expected,
                Some(true),
                "{name} must decode: {:?}",
                errors.value(row)
            );
            assert!(
                features.is_null(row),
                "{name}: null image, so null features"
            );
            assert!(!errors.value(row).is_empty(), "{name}: error message");
            println!("{name}: {}", errors.value(row));
            invalid += 1;
        }
    }
    println!("{valid} valid rows, {invalid} invalid rows");
    let message = |name: &str| {
        (0..out.num_rows())
            .find(|&r| origins.value(r).ends_with(name))
            .map(|r| errors.value(r).to_string())
            .unwrap()
    };
    assert!(
        message("bomb.png").contains("limit"),
        "{}",
        message("bomb.png")
    );
    assert!(
        message("bomb.jpg").contains("limit"),
        "{}",
        message("bomb.jpg")
    );
    assert_eq!(message("empty.png"), "empty: 0 bytes");
    // Memory: `bombs_are_refused_before_any_large_allocation` measures what a bomb allocates.
}

fn decoded(bytes: &[u8]) -> deep_pipelines::image::ImageRow {
    decode_image(bytes, "x", &DecodeLimits::default()).unwrap()
}

/// Pixel `(x, y)` of an `ImageSchema` row: its `channels` bytes (B, G, R[, A] or grey).
fn pixel(img: &deep_pipelines::image::ImageRow, x: u32, y: u32) -> &[u8] {
    let c = img.channels as usize;
    let at = (y as usize * img.width as usize + x as usize) * c;
    &img.data[at..at + c]
}

/// 16-bit samples and the 8-bit values they must become, worked out by hand. The rule: a 16-bit
/// value v becomes the nearest 8-bit value of v * 255 / 65535 = v / 257 (65535 = 255 * 257),
/// so an 8-bit value stored as v * 257 comes back unchanged. 128 / 257 = 0.498 -> 0,
/// 129 / 257 = 0.502 -> 1, 200 / 257 = 0.78 -> 1, 385 / 257 = 1.498 -> 1, 386 / 257 = 1.502 -> 2,
/// 32767 / 257 = 127.498 -> 127, 32896 / 257 = 128, 65280 / 257 = 254.008 -> 254.
/// (Keeping the high byte, v >> 8, would give 0 for 129 and 200, 1 for 386, 255 for 65280.)
const V16: [u16; 10] = [0, 128, 129, 200, 385, 386, 32767, 32896, 65280, 65535];
const V8: [u8; 10] = [0, 0, 1, 1, 1, 2, 127, 128, 254, 255];

#[test]
fn pixel_formats_convert_as_documented() {
    let cases = corpus();
    let grey = decoded(&cases["grey.png"].bytes);
    assert_eq!((grey.mode, grey.channels), (MODE_GRAY8, 1));
    assert_eq!(grey.data[3], 24); // x = 3 -> 3 * 8
    let grey16 = decoded(&cases["grey16.png"].bytes);
    assert_eq!((grey16.mode, grey16.channels), (MODE_GRAY8, 1));
    // The corpus ramp: 2000 * x, so round(2000 * x / 257), e.g. x = 10: 20000 / 257 = 77.8 -> 78.
    assert_eq!(grey16.data[10], 78);

    // 16 bits -> 8 bits, value by value (see V16 / V8), in every 16-bit PNG layout.
    let n = V16.len() as u32;
    let v16 = |i: u32| V16[i as usize % V16.len()];
    let v8 = |i: u32| V8[i as usize % V8.len()];
    let img = decoded(&encode(
        &DynamicImage::ImageLuma16(ImageBuffer::from_fn(n, 1, |x, _| Luma([v16(x)]))),
        ImageFormat::Png,
    ));
    assert_eq!((img.mode, img.channels), (MODE_GRAY8, 1));
    assert_eq!(img.data, V8, "grey 16 -> 8 bits");
    // RGB: pixel x = (V16[x], V16[x + 3], V16[x + 6]) -> BGR (V8[x + 6], V8[x + 3], V8[x]).
    let img = decoded(&encode(
        &DynamicImage::ImageRgb16(ImageBuffer::from_fn(n, 1, |x, _| {
            Rgb([v16(x), v16(x + 3), v16(x + 6)])
        })),
        ImageFormat::Png,
    ));
    assert_eq!((img.mode, img.channels), (MODE_BGR8, 3));
    for x in 0..n {
        assert_eq!(
            pixel(&img, x, 0),
            [v8(x + 6), v8(x + 3), v8(x)],
            "RGB16 x = {x}"
        );
    }
    // RGBA: alpha reduced the same way, BGRA out.
    let img = decoded(&encode(
        &DynamicImage::ImageRgba16(ImageBuffer::from_fn(n, 1, |x, _| {
            Rgba([v16(x), v16(x + 3), v16(x + 6), v16(x + 8)])
        })),
        ImageFormat::Png,
    ));
    assert_eq!((img.mode, img.channels), (MODE_BGRA8, 4));
    for x in 0..n {
        let expected = [v8(x + 6), v8(x + 3), v8(x), v8(x + 8)];
        assert_eq!(pixel(&img, x, 0), expected, "RGBA16 x = {x}");
    }
    // Grey + alpha: BGRA with the grey value in B, G and R.
    let img = decoded(&encode(
        &DynamicImage::ImageLumaA16(ImageBuffer::from_fn(n, 1, |x, _| {
            LumaA([v16(x), v16(x + 5)])
        })),
        ImageFormat::Png,
    ));
    assert_eq!((img.mode, img.channels), (MODE_BGRA8, 4));
    for x in 0..n {
        let expected = [v8(x), v8(x), v8(x), v8(x + 5)];
        assert_eq!(pixel(&img, x, 0), expected, "grey+alpha 16 x = {x}");
    }

    // 8-bit grey + alpha and RGBA: BGRA, values unchanged (the corpus images are opaque).
    let img = decoded(&cases["grey_alpha.png"].bytes);
    assert_eq!((img.mode, img.channels), (MODE_BGRA8, 4));
    assert_eq!(pixel(&img, 3, 2), [24, 24, 24, 255]);
    let img = decoded(&cases["rgba.png"].bytes);
    assert_eq!((img.mode, img.channels), (MODE_BGRA8, 4));
    // photo(): (7x mod 256, 5y mod 256, x + y) at (40, 9) = (280 - 256, 45, 49) = (24, 45, 49).
    assert_eq!(pixel(&img, 40, 9), [49, 45, 24, 255]);
    let rgb16 = decoded(&cases["rgb16.png"].bytes);
    assert_eq!((rgb16.mode, rgb16.channels), (MODE_BGR8, 3));
    assert_eq!(
        pixel(&rgb16, 40, 9),
        [49, 45, 24],
        "8 -> 16 -> 8 bits is lossless"
    );

    // Indexed colour, PNGs written byte by byte: each index becomes its PLTE entry, as B, G, R.
    let palette = [[10, 100, 200], [250, 5, 60], [0, 0, 0], [255, 255, 255]];
    let index = |x: u32, y: u32| ((x + 2 * y) % 4) as u8;
    // 2 bits per index, 5 per row: rows end mid-byte.
    let img = decoded(&palette_png((5, 3), 2, &palette, None, index));
    assert_eq!(
        (img.mode, img.channels, img.width, img.height),
        (MODE_BGR8, 3, 5, 3)
    );
    for (x, y) in (0..3).flat_map(|y| (0..5).map(move |x| (x, y))) {
        let [r, g, b] = palette[usize::from(index(x, y))];
        assert_eq!(pixel(&img, x, y), [b, g, r], "palette pixel ({x}, {y})");
    }
    // 8 bits per index with a tRNS chunk: BGRA, alpha per entry; entries past tRNS are opaque.
    let alpha = [255, 128, 0];
    let img = decoded(&palette_png((7, 2), 8, &palette, Some(&alpha), index));
    assert_eq!(
        (img.mode, img.channels, img.width, img.height),
        (MODE_BGRA8, 4, 7, 2)
    );
    for (x, y) in (0..2).flat_map(|y| (0..7).map(move |x| (x, y))) {
        let i = usize::from(index(x, y));
        let [r, g, b] = palette[i];
        let a = alpha.get(i).copied().unwrap_or(255);
        assert_eq!(
            pixel(&img, x, y),
            [b, g, r, a],
            "palette+tRNS pixel ({x}, {y})"
        );
    }
    // Pillow's palette PNG (fuzz/make_corpus.py) decodes too.
    let palette = decoded(&cases["palette.png"].bytes);
    assert!(palette.mode == MODE_BGR8 || palette.mode == MODE_BGRA8);

    let cmyk = decoded(&cases["cmyk.jpg"].bytes);
    assert_eq!((cmyk.mode, cmyk.width, cmyk.height), (MODE_BGR8, 12, 9));
    // The fixture is a gradient converted to CMYK: pixel (0, 0) was (0, 0, 0) -> near black.
    assert!(
        cmyk.data[..3].iter().all(|&v| v < 40),
        "{:?}",
        &cmyk.data[..3]
    );

    // Animated: the first frame, RGB (200, 55, 40) -> BGRA (40, 55, 200, 255); the second
    // frame is (10, 245, 40).
    let gif = decoded(&cases["animated.gif"].bytes);
    assert_eq!((gif.width, gif.height), (20, 10));
    let px = pixel(&gif, 0, 0);
    let expected = [40, 55, 200, 255];
    assert!(
        px.iter().zip(expected).all(|(&a, b)| a.abs_diff(b) <= 8),
        "{px:?}"
    );

    let one = decoded(&cases["one_pixel.png"].bytes);
    assert_eq!((one.width, one.height), (1, 1));
}

/// The stored pixel shown at `(xd, yd)` of a `wd` x `hd` upright image, for an EXIF Orientation
/// value. The tag (EXIF 2.32, 0x0112) says where the stored 0th row and 0th column are shown.
fn stored_pixel(orientation: u16, (xd, yd): (u32, u32), (wd, hd): (u32, u32)) -> (u32, u32) {
    match orientation {
        1 => (xd, yd),                   // row 0 at the top, column 0 on the left
        2 => (wd - 1 - xd, yd),          // row 0 at the top, column 0 on the right
        3 => (wd - 1 - xd, hd - 1 - yd), // row 0 at the bottom, column 0 on the right
        4 => (xd, hd - 1 - yd),          // row 0 at the bottom, column 0 on the left
        5 => (yd, xd),                   // row 0 on the left, column 0 at the top
        6 => (yd, wd - 1 - xd),          // row 0 on the right, column 0 at the top
        7 => (hd - 1 - yd, wd - 1 - xd), // row 0 on the right, column 0 at the bottom
        8 => (hd - 1 - yd, xd),          // row 0 on the left, column 0 at the bottom
        other => panic!("no orientation {other}"),
    }
}

#[test]
fn exif_orientation_puts_every_pixel_where_the_tag_says() {
    // Stored 64 x 32, four quadrants of distinct colours (16 x 16 JPEG blocks: no colour
    // bleeds across a quadrant edge except in the blocks' ringing).
    const QUADRANTS: [[u8; 3]; 4] = [[220, 30, 40], [30, 200, 50], [40, 60, 210], [235, 235, 235]];
    let (w, h) = (64u32, 32u32);
    let colour = |x: u32, y: u32| QUADRANTS[usize::from(x >= w / 2) + 2 * usize::from(y >= h / 2)];
    let stored = DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| Rgb(colour(x, y))));
    let (jpeg, png) = (
        encode(&stored, ImageFormat::Jpeg),
        encode(&stored, ImageFormat::Png),
    );
    for orientation in 1..=8u16 {
        // Both TIFF byte orders, as cameras write both.
        let tiff = exif_orientation(orientation, orientation % 2 == 0);
        // JPEG is lossy: away from quadrant edges, within 12 (measured: 4 at most). PNG: exact.
        for (format, bytes, margin, tolerance) in [
            ("JPEG", jpeg_with_exif(&jpeg, &tiff), 3, 12),
            ("PNG", png_with_exif(&png, &tiff), 0, 0),
        ] {
            let img = decoded(&bytes);
            let shown = if orientation <= 4 { (w, h) } else { (h, w) };
            assert_eq!(
                (img.width, img.height, img.mode),
                (shown.0, shown.1, MODE_BGR8),
                "{format} orientation {orientation}"
            );
            let near_edge = |v: u32, mid: u32| v + margin >= mid && v < mid + margin;
            let mut checked = 0;
            for (xd, yd) in (0..shown.1).flat_map(|y| (0..shown.0).map(move |x| (x, y))) {
                let (x, y) = stored_pixel(orientation, (xd, yd), shown);
                if near_edge(x, w / 2) || near_edge(y, h / 2) {
                    continue;
                }
                let [r, g, b] = colour(x, y);
                let got = pixel(&img, xd, yd);
                assert!(
                    got.iter()
                        .zip([b, g, r])
                        .all(|(&v, e)| v.abs_diff(e) <= tolerance),
                    "{format} orientation {orientation}: pixel ({xd}, {yd}) is {got:?}, \
                     stored ({x}, {y}) was RGB {:?}",
                    [r, g, b]
                );
                checked += 1;
            }
            assert!(checked >= (w * h / 2) as usize, "{checked} pixels checked");
        }
    }

    // Pillow's fixture (fuzz/make_corpus.py): stored 16 x 8, pixel (x, y) = (20x mod 256,
    // 25y mod 256, xy mod 256), JPEG quality 90, orientation 6. Mean error against that formula:
    // 9.0 with Pillow's own decoder; the other layouts of an 8 x 16 result give 34 to 69.
    let img = decoded(&std::fs::read(Path::new(FIXTURES).join("exif_rotated.jpg")).unwrap());
    assert_eq!((img.width, img.height), (8, 16));
    let mut total = 0u32;
    for (xd, yd) in (0..16).flat_map(|y| (0..8).map(move |x| (x, y))) {
        let (x, y) = stored_pixel(6, (xd, yd), (8, 16));
        let rgb = [x * 20 % 256, y * 25 % 256, x * y % 256];
        let got = pixel(&img, xd, yd);
        total += (0..3)
            .map(|c| u32::from(got[2 - c]).abs_diff(rgb[c]))
            .sum::<u32>();
    }
    let mean = f64::from(total) / (8.0 * 16.0 * 3.0);
    println!("exif_rotated.jpg: mean error {mean:.1} against the upright gradient");
    assert!(
        mean < 16.0,
        "mean error {mean} against the upright gradient"
    );
}

#[test]
fn bombs_are_refused_before_any_large_allocation() {
    // A "large" allocation: anything near a pixel buffer. The smallest bomb below would decode
    // to 360 MB; 1 MiB is under 2 of its rows.
    const LARGE: usize = 1 << 20;
    let limits = DecodeLimits::default();

    // The probe sees a decoder's pixel buffer: a real 2000 x 1000 RGB PNG needs 6,000,000 bytes.
    let real = encode(&photo(2000, 1000), ImageFormat::Png);
    let (row, largest) = largest_allocation_in(|| decode_image(&real, "real.png", &limits));
    assert_eq!(row.unwrap().data.len(), 6_000_000);
    assert!(largest >= 6_000_000, "largest allocation {largest}");
    // ... and only this thread's: 64 MiB allocated by another thread meanwhile is not counted.
    let (_, largest) = largest_allocation_in(|| {
        std::thread::spawn(|| std::hint::black_box(vec![7u8; 64 << 20]).len())
            .join()
            .unwrap()
    });
    assert!(largest < LARGE, "largest allocation {largest}");

    // Bombs against each limit (16,384 px per side, 512 MiB decoded): both, the side alone
    // (60,000 x 2,000 x 3 = 360 MB), the size alone (16,000 x 16,000 x 3 = 768 MB).
    let bombs = [
        ("50000x50000.png", png_bomb(50_000, 50_000)),
        ("60000x2000.png", png_bomb(60_000, 2_000)),
        ("16000x16000.png", png_bomb(16_000, 16_000)),
        ("50000x50000.jpg", jpeg_bomb(50_000, 50_000)),
        ("60000x2000.jpg", jpeg_bomb(60_000, 2_000)),
        ("16000x16000.jpg", jpeg_bomb(16_000, 16_000)),
    ];
    for (name, bytes) in &bombs {
        assert!(bytes.len() < 1000, "{name}: a small file");
        let (result, largest) = largest_allocation_in(|| decode_image(bytes, name, &limits));
        let err = result.unwrap_err();
        assert_eq!(err.kind, ProblemKind::OverLimits, "{name}: {err}");
        println!("{name}: largest allocation {largest} bytes: {err}");
        assert!(
            largest < LARGE,
            "{name}: allocated {largest} bytes at once before refusing"
        );
    }

    // The same bytes through the batch decoder behind SQL functions called on raw bytes (it
    // decodes on rayon): on a one-thread pool, whose thread is the watched one.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let array: ArrayRef = Arc::new(BinaryArray::from(
        bombs
            .iter()
            .map(|(_, b)| Some(b.as_slice()))
            .collect::<Vec<_>>(),
    ));
    let (images, largest) =
        pool.install(|| largest_allocation_in(|| decode_binary_array(&array, &limits).unwrap()));
    assert_eq!(
        images.null_count(),
        bombs.len(),
        "every bomb gives a null image"
    );
    assert!(
        largest < LARGE,
        "batch decoder: allocated {largest} bytes at once"
    );
}

#[test]
fn limits_are_configurable_and_checked_before_decoding() {
    let small = DecodeLimits {
        max_side: 32,
        max_decoded_bytes: 1 << 20,
    };
    let png = encode(&photo(40, 10), ImageFormat::Png);
    let err = decode_image(&png, "x", &small).unwrap_err();
    assert_eq!(err.kind, ProblemKind::OverLimits, "{err}");
    let tight = DecodeLimits {
        max_side: 1024,
        max_decoded_bytes: 40 * 10 * 3 - 1,
    };
    let err = decode_image(&png, "x", &tight).unwrap_err();
    assert!(
        err.to_string().starts_with("over the decode limits: "),
        "{err}"
    );
    assert!(decode_image(&png, "x", &DecodeLimits::default()).is_ok());
}

#[tokio::test]
async fn every_transformer_names_stage_column_and_types_when_planning() {
    let ctx = SessionContext::new();
    let df = ctx
        .sql("SELECT 1.5 AS image, 'x' AS features, named_struct('a', 1) AS label, 'p' AS prediction")
        .await
        .unwrap();

    let featurizer = DeepImageFeaturizer::new();
    let err = featurizer.transform(df.clone()).unwrap_err().to_string();
    assert!(
        err.contains(featurizer.uid()) && err.contains("`image`"),
        "{err}"
    );
    assert!(
        err.contains("expected an image struct") && err.contains("Float64"),
        "{err}"
    );
    let err = DeepImageFeaturizer::new()
        .with_input_col("pixels")
        .transform(df.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`pixels`") && err.contains("not found") && err.contains("image, features"),
        "{err}"
    );

    let indexer = deep_pipelines::StringIndexerModel::from_labels(
        deep_pipelines::feature::StringIndexerParams::default(),
        vec!["a".into()],
    )
    .unwrap();
    let err = indexer.transform(df.clone()).unwrap_err().to_string();
    assert!(
        err.contains(indexer.uid()) && err.contains("`label`") && err.contains("Struct"),
        "{err}"
    );

    let names = IndexToString::new().with_labels(&["a".to_string()]);
    let err = names.transform(df.clone()).unwrap_err().to_string();
    assert!(
        err.contains(names.uid()) && err.contains("`prediction`") && err.contains("Utf8"),
        "{err}"
    );

    // A fitted logistic model, applied to a DataFrame whose `features` is a string.
    let train = ctx
        .sql("SELECT make_array(CAST(x AS FLOAT), 1.0) AS features, CAST(x % 2 AS DOUBLE) AS label FROM (VALUES (0), (1), (2), (3)) t(x)")
        .await
        .unwrap();
    let lr = LogisticRegression::new().fit(&train).await.unwrap();
    let err = lr.transform(df.clone()).unwrap_err().to_string();
    assert!(
        err.contains(lr.uid()) && err.contains("`features`") && err.contains("Utf8"),
        "{err}"
    );

    // Estimators check too, before reading any row.
    let estimator = LogisticRegression::new();
    let err = estimator.fit(&df).await.unwrap_err().to_string();
    assert!(
        err.contains(Estimator::uid(&estimator)) && err.contains("`features`"),
        "{err}"
    );

    // A whole fitted pipeline reports the first stage that cannot plan.
    let model = PipelineModel::new("PipelineModel_t", vec![std::sync::Arc::new(featurizer)]);
    assert!(
        model
            .transform(df)
            .unwrap_err()
            .to_string()
            .contains("expected an image struct")
    );
}

#[test]
fn tampered_weight_headers_are_rejected_without_allocating() {
    use deep_pipelines::models::{Architecture, check_safetensors_header};
    let header = |json: &str, data: usize| {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        bytes
    };
    let max = 5_000_000;
    // Oversized shape (with offsets to match): larger than the whole model.
    let huge = header(
        r#"{"w":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}"#,
        16,
    );
    let err = check_safetensors_header(&huge, max, "w.safetensors").unwrap_err();
    assert!(err.contains("w.safetensors"), "{err}");
    // A shape larger than the whole model, even with the bytes to back it.
    let large = header(
        r#"{"w":{"dtype":"F32","shape":[100,100],"data_offsets":[0,40000]}}"#,
        40_000,
    );
    let err = check_safetensors_header(&large, 1_000, "w.safetensors").unwrap_err();
    assert!(err.contains("larger than the whole model"), "{err}");
    // Offsets past the end of the file.
    let past = header(
        r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        8,
    );
    assert!(check_safetensors_header(&past, max, "w").is_err());
    // Header length past the end of the file.
    let mut lying = header("{}", 0);
    lying[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(check_safetensors_header(&lying, max, "w").is_err());
    // Wrong dtype.
    let f64s = header(
        r#"{"w":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}}"#,
        16,
    );
    let err = check_safetensors_header(&f64s, max, "w").unwrap_err();
    assert!(err.contains("F64"), "{err}");
    // A consistent file passes.
    let ok = header(
        r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        16,
    );
    assert!(check_safetensors_header(&ok, max, "w").is_ok());

    // Through the real loader: a tampered file is an error naming the file, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    std::fs::write(&path, &huge).unwrap();
    let device = burn::prelude::Device::flex();
    let lite0 = deep_pipelines::models::efficientnet_lite::EfficientNetLiteConfig::lite0();
    let mut net = lite0.init(&device);
    let names = lite0.weight_names();
    let err =
        deep_pipelines::models::load_safetensors(&mut net, &path, &names.0, "EfficientNetLite0")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("weights.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
    // Valid header, wrong shapes for the architecture: named tensor by tensor.
    let wrong = header(
        r#"{"_conv_stem.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        16,
    );
    std::fs::write(&path, &wrong).unwrap();
    let err =
        deep_pipelines::models::load_safetensors(&mut net, &path, &names.0, "EfficientNetLite0")
            .unwrap_err()
            .to_string();
    assert!(err.contains("conv_stem"), "{err}");
}

/// A manifest for a small user network: EfficientNet-Lite0's preprocessing, `channels` outputs
/// (features, feature map `[channels, 1, 1]` and classes).
pub(crate) fn user_manifest(name: &str, channels: usize) -> Manifest {
    let (mut m, _) = manifest("EfficientNetLite0").unwrap();
    m.name = name.into();
    m.architecture = "custom".into();
    m.feature_dim = channels;
    m.feature_map = [channels, 1, 1];
    m.num_classes = channels;
    m.labels = None;
    m
}

/// A network that panics in its forward pass, as a bug in a user's module or a kernel would.
#[derive(Debug)]
struct Exploding;

impl ImageNetwork for Exploding {
    fn feature_map(&self, _input: Tensor<4>) -> Tensor<4> {
        panic!("Exploding: deliberate failure in the forward pass")
    }

    fn logits(&self, _map: Tensor<4>) -> Option<Tensor<2>> {
        unreachable!("feature_map panics first")
    }
}

/// The mean of each input channel, repeated (R, G, B, R, G, B) and cut to `.0` channels:
/// `[N, .0, 1, 1]`; logits are the same values.
#[derive(Debug)]
pub(crate) struct MeanChannels(pub usize);

impl ImageNetwork for MeanChannels {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let [n, c, _, _] = input.dims();
        input
            .mean_dim(3)
            .mean_dim(2)
            .reshape([n, c, 1, 1])
            .repeat_dim(1, 2)
            .narrow(1, 0, self.0)
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        let [n, c, _, _] = map.dims();
        Some(map.reshape([n, c]))
    }
}

/// Three small valid PNGs.
fn small_images() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, (w, h)) in [(40, 30), (24, 50), (33, 33)].into_iter().enumerate() {
        let png = encode(&photo(w, h), ImageFormat::Png);
        std::fs::write(dir.path().join(format!("{i}.png")), png).unwrap();
    }
    dir
}

/// Runs `df`, which must fail, and returns the error's message.
async fn query_error(df: DataFrame) -> String {
    match df.collect().await {
        Ok(batches) => panic!(
            "expected an error, got {} rows",
            batches.iter().map(|b| b.num_rows()).sum::<usize>()
        ),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_panicking_network_fails_the_query_and_the_process_goes_on() {
    let device = Device::flex();
    register_network(user_manifest("Exploding", 3), Arc::new(Exploding), &device).unwrap();
    register_network(
        user_manifest("SteadyMean", 3),
        Arc::new(MeanChannels(3)),
        &device,
    )
    .unwrap();
    let dir = small_images();
    let ctx = SessionContext::new();
    let images = read_images(&ctx, dir.path(), ReadImagesOptions::default()).unwrap();
    let featurizer = DeepImageFeaturizer::new().with_model_name("Exploding");
    let predictor = DeepImagePredictor::new()
        .with_model_name("Exploding")
        .with_top_k(1);

    // Through `transform`: the plan builds; running it is an error that says what panicked.
    for (stage, df) in [
        ("featurizer", featurizer.transform(images.clone()).unwrap()),
        ("predictor", predictor.transform(images.clone()).unwrap()),
    ] {
        let err = query_error(df).await;
        println!("{stage}: {err}");
        assert!(
            err.contains("panicked") && err.contains("deliberate failure in the forward pass"),
            "{stage}: {err}"
        );
    }

    // Through SQL: a featurizer and a fitted pipeline registered as functions.
    register_images_table(&ctx, "hostile", dir.path(), ReadImagesOptions::default()).unwrap();
    register_featurizer(&ctx, "explode_features", &featurizer).unwrap();
    let pipeline = PipelineModel::new("explode_pipeline", vec![Arc::new(predictor)]);
    register_model(&ctx, "explode_top1", &pipeline).unwrap();
    for sql in [
        "SELECT explode_features(image) FROM hostile",
        "SELECT origin, explode_top1(image) AS p FROM hostile",
    ] {
        let err = query_error(ctx.sql(sql).await.unwrap()).await;
        println!("{sql}: {err}");
        assert!(
            err.contains("panicked") && err.contains("deliberate failure in the forward pass"),
            "{sql}: {err}"
        );
    }

    // The process, its runtime and the session go on: the same images through a working
    // network, both ways.
    let steady = DeepImageFeaturizer::new().with_model_name("SteadyMean");
    let out = common::collect(steady.transform(images).unwrap()).await;
    let features = out.column_by_name("features").unwrap().as_fixed_size_list();
    assert_eq!((out.num_rows(), features.null_count()), (3, 0));
    assert_eq!(features.value_length(), 3);
    register_featurizer(&ctx, "steady_features", &steady).unwrap();
    let out = common::collect(
        ctx.sql("SELECT steady_features(image) AS f FROM hostile")
            .await
            .unwrap(),
    )
    .await;
    let features = out.column_by_name("f").unwrap().as_fixed_size_list();
    assert_eq!((out.num_rows(), features.null_count()), (3, 0));
}

#[tokio::test]
async fn a_network_whose_outputs_disagree_with_its_manifest_is_an_error() {
    let device = Device::flex();
    // Each manifest promises 3 outputs; the networks return 2, 4 and 3.
    for (name, channels) in [
        ("TwoForThree", 2),
        ("FourForThree", 4),
        ("ThreeForThree", 3),
    ] {
        register_network(
            user_manifest(name, 3),
            Arc::new(MeanChannels(channels)),
            &device,
        )
        .unwrap();
    }
    let dir = small_images();
    let ctx = SessionContext::new();
    let images = read_images(&ctx, dir.path(), ReadImagesOptions::default()).unwrap();
    for name in ["TwoForThree", "FourForThree"] {
        let featurizer = DeepImageFeaturizer::new().with_model_name(name);
        let runs = [
            ("pooled features", featurizer.transform(images.clone())),
            (
                "flattened feature map",
                featurizer
                    .clone()
                    .with_feature_mode("flattened")
                    .transform(images.clone()),
            ),
            (
                "predictor logits",
                DeepImagePredictor::new()
                    .with_model_name(name)
                    .with_top_k(1)
                    .transform(images.clone()),
            ),
        ];
        for (what, df) in runs {
            let err = query_error(df.unwrap()).await;
            println!("{name}, {what}: {err}");
            assert!(
                err.contains(&format!("model `{name}`")) && err.contains("the manifest says"),
                "{name}, {what}: {err}"
            );
            assert!(
                !err.contains("panicked"),
                "{name}, {what}: found by the check, not by a panic: {err}"
            );
        }
    }
    // With outputs that match its manifest, the same network runs: 3 values per image.
    for mode in ["pooled", "flattened"] {
        let featurizer = DeepImageFeaturizer::new()
            .with_model_name("ThreeForThree")
            .with_feature_mode(mode);
        let out = common::collect(featurizer.transform(images.clone()).unwrap()).await;
        let features = out.column_by_name("features").unwrap().as_fixed_size_list();
        assert_eq!((out.num_rows(), features.null_count()), (3, 0), "{mode}");
        assert_eq!(features.value_length(), 3, "{mode}");
    }
}

/// Planning reads the manifest only (a Spark driver or Connect client plans without the weights):
/// a corrupt weight file plans, and the first batch fails naming the model.
#[tokio::test]
async fn planning_reads_no_weights_and_the_first_batch_reports_a_corrupt_file() {
    let models = tempfile::tempdir().unwrap();
    let folder = models.path().join("efficientnet_lite0");
    std::fs::create_dir(&folder).unwrap();
    let bundled = deep_pipelines::models::model_dir().join("efficientnet_lite0");
    std::fs::copy(bundled.join("manifest.json"), folder.join("manifest.json")).unwrap();
    std::fs::write(folder.join("weights.safetensors"), b"not safetensors").unwrap();
    let images = small_images();
    let ctx = SessionContext::new();
    let df = read_images(&ctx, images.path(), ReadImagesOptions::default()).unwrap();
    let stage = DeepImageFeaturizer::new().with_model_dir(models.path().display().to_string());
    let planned = stage.transform(df).unwrap();
    let field = planned
        .schema()
        .field_with_unqualified_name("features")
        .unwrap();
    assert!(
        matches!(
            field.data_type(),
            datafusion::arrow::datatypes::DataType::FixedSizeList(_, 1280)
        ),
        "{field:?}"
    );
    let err = query_error(planned).await;
    assert!(err.contains("EfficientNetLite0"), "{err}");
}

/// The five files of a hostile folder: a PNG bomb, a photo cut after 60 bytes, an empty file,
/// a text file, a good photo; with the kind each row's reason starts with (None: features).
fn five_files() -> Vec<(&'static str, Vec<u8>, Option<&'static str>)> {
    let photo = encode(&photo(64, 48), ImageFormat::Jpeg);
    vec![
        (
            "bomb.png",
            png_bomb(40_000, 40_000),
            Some("over the decode limits: "),
        ),
        ("cut.jpg", photo[..60].to_vec(), Some("truncated: ")),
        ("empty.png", Vec::new(), Some("empty: ")),
        (
            "notes.png",
            b"a text file, not an image\n".to_vec(),
            Some("unsupported format: "),
        ),
        ("photo.jpg", photo, None),
    ]
}

/// Each row's reason in `errorCol` (None where the row has features), by file name.
async fn reasons(df: DataFrame, names: &[String]) -> Vec<Option<String>> {
    let out = common::collect(df).await;
    let features = out.column_by_name("features").unwrap();
    let why = out.column_by_name("why").unwrap().as_string::<i32>();
    for (row, name) in names.iter().enumerate() {
        assert_eq!(features.is_null(row), why.is_valid(row), "{name}");
    }
    (0..out.num_rows())
        .map(|row| why.is_valid(row).then(|| why.value(row).to_string()))
        .collect()
}

#[tokio::test]
async fn every_null_row_says_why_from_a_folder_and_from_bytes() {
    let files = five_files();
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, _) in &files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let names: Vec<String> = files.iter().map(|(n, _, _)| n.to_string()).collect();
    let check = |path: &str, got: &[Option<String>]| {
        for ((name, _, kind), reason) in files.iter().zip(got) {
            println!("{path} {name}: {reason:?}");
            match kind {
                Some(kind) => assert!(
                    reason.as_deref().is_some_and(|r| r.starts_with(kind)),
                    "{path} {name}: {reason:?}, expected {kind}..."
                ),
                None => assert!(reason.is_none(), "{path} {name}: {reason:?}"),
            }
        }
    };
    let featurizer = DeepImageFeaturizer::new().with_error_col("why");

    // A folder: the scan's `image_error` is the stage's reason.
    let ctx = SessionContext::new();
    let images = read_images(&ctx, dir.path(), ReadImagesOptions::default())
        .unwrap()
        .sort(vec![col("origin").sort(true, false)])
        .unwrap();
    let scanned = common::collect(images.clone()).await;
    let image_error = scanned
        .column_by_name("image_error")
        .unwrap()
        .as_string::<i32>();
    let from_folder = reasons(featurizer.transform(images).unwrap(), &names).await;
    check("folder", &from_folder);
    for (row, reason) in from_folder.iter().enumerate() {
        assert_eq!(
            reason.as_deref(),
            image_error.is_valid(row).then(|| image_error.value(row))
        );
    }

    // Encoded bytes (Binary, LargeBinary, BinaryView): the decoder's reasons, the same words.
    let column: Vec<Option<&[u8]>> = files.iter().map(|(_, b, _)| Some(b.as_slice())).collect();
    let arrays: [ArrayRef; 3] = [
        Arc::new(BinaryArray::from(column.clone())),
        Arc::new(datafusion::arrow::array::LargeBinaryArray::from(
            column.clone(),
        )),
        Arc::new(datafusion::arrow::array::BinaryViewArray::from(column)),
    ];
    for array in arrays {
        let kind = array.data_type().to_string();
        let batch = RecordBatch::try_from_iter([("content", array)]).unwrap();
        let df = SessionContext::new().read_batch(batch.clone()).unwrap();
        let stage = featurizer.clone().with_input_col("content");
        let planned = stage.transform(df).unwrap();
        // Decoded once per row, for both the features and the reason.
        let plan = planned.clone().create_physical_plan().await.unwrap();
        let plan = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(false)
            .to_string();
        assert_eq!(plan.matches("decode_image(").count(), 1, "{plan}");
        let got = reasons(planned, &names).await;
        check(&kind, &got);
        assert_eq!(got, from_folder, "{kind}: the folder's words");
        // SQL's image_error(bytes): the same words, without a network.
        let ctx = SessionContext::new();
        ctx.register_udf(deep_pipelines::image::image_error_function());
        ctx.register_batch("files", batch).unwrap();
        let out = common::collect(
            ctx.sql("SELECT image_error(content) FROM files")
                .await
                .unwrap(),
        )
        .await;
        let sql = out.column(0).as_string::<i32>();
        let sql: Vec<Option<String>> = (0..sql.len())
            .map(|r| sql.is_valid(r).then(|| sql.value(r).to_string()))
            .collect();
        assert_eq!(sql, from_folder, "{kind}: SQL image_error");
    }
    let stats = featurizer.metrics();
    for kind in [
        "over the decode limits",
        "truncated",
        "empty",
        "unsupported format",
    ] {
        assert_eq!(stats.null_rows.get(kind), Some(&4), "{kind}: {stats:?}");
    }
}
