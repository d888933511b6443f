//! Bounded preprocessing and trusted-nothing loading (issue 11): extreme aspect ratios are
//! resized in source coordinates (checked against a PIL-style resampler written here, and by the
//! largest allocation they make), image structs from any source are checked before a pixel is
//! read (null rows with the reason in `errorCol`), an 8,192-row record batch costs no more peak
//! memory than a 32-row one (`VmHWM` of child processes), alpha is composited over a background
//! and `resizeMode = pad` letterboxes (against references computed here, and in accuracy on
//! generated transparent objects), saved models cannot name files outside their folder, and the
//! model cache notices a replaced weight file.

use crate::common;
use crate::hostile_input::{MeanChannels, encode, largest_allocation_in, user_manifest};

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use burn::prelude::Device;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Int32Array, RecordBatch, StringArray, StructArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::functions::expr_fn::{left, right};
use datafusion::logical_expr::cast;
use deep_pipelines::image::{ImageView, MODE_BGR8, MODE_BGRA8, image_fields, image_type};
use deep_pipelines::models::{Manifest, ResizeFilter, manifest, register_network, replace_network};
use deep_pipelines::persistence::{self, SavedStage};
use deep_pipelines::prelude::*;
use deep_pipelines::preprocess::{AlphaBackground, PreprocessOptions, ResizeMode, fit_to_input};
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, Rgba};

// ---------------------------------------------------------------------------------------------
// A reference resampler: Pillow's convolution (`precompute_coeffs`) in f64, no intermediate
// rounding, written from its definition rather than taken from the crate under test.
// ---------------------------------------------------------------------------------------------

fn bilinear(x: f64) -> f64 {
    (1.0 - x.abs()).max(0.0)
}

fn bicubic(x: f64) -> f64 {
    let (a, x) = (-0.5, x.abs());
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// For each of `out` output pixels: the first input pixel and the normalised weights, mapping
/// the input span `[in0, in1)` of an axis of `in_size` pixels onto `out` pixels.
fn coefficients(
    in_size: u32,
    in0: f64,
    in1: f64,
    out: u32,
    filter: ResizeFilter,
) -> Vec<(usize, Vec<f64>)> {
    let (f, support): (fn(f64) -> f64, f64) = match filter {
        ResizeFilter::Bilinear => (bilinear, 1.0),
        ResizeFilter::Bicubic => (bicubic, 2.0),
        ResizeFilter::Nearest => unreachable!("not used by these tests"),
    };
    let scale = (in1 - in0) / f64::from(out);
    let fs = scale.max(1.0);
    (0..out)
        .map(|i| {
            let centre = in0 + (f64::from(i) + 0.5) * scale;
            let lo = (centre - support * fs).floor().max(0.0) as usize;
            let hi = ((centre + support * fs).ceil() as usize).min(in_size as usize);
            let w: Vec<f64> = (lo..hi)
                .map(|x| f((x as f64 + 0.5 - centre) / fs))
                .collect();
            let sum: f64 = w.iter().sum();
            (lo, w.into_iter().map(|v| v / sum).collect())
        })
        .collect()
}

/// `rgb` (row-major RGB, `w` x `h`) resampled from the source box `[x0, x1) x [y0, y1)` to
/// `out_w` x `out_h`, placed at `at` on a `size` x `size` canvas of `pad`.
#[allow(clippy::too_many_arguments)]
fn reference(
    rgb: &[[f64; 3]],
    (w, h): (u32, u32),
    (x0, x1, y0, y1): (f64, f64, f64, f64),
    (out_w, out_h): (u32, u32),
    at: (u32, u32),
    size: u32,
    pad: [u8; 3],
    filter: ResizeFilter,
) -> Vec<u8> {
    let cx = coefficients(w, x0, x1, out_w, filter);
    let cy = coefficients(h, y0, y1, out_h, filter);
    let mut out: Vec<u8> = pad.repeat((size * size) as usize);
    for (oy, (ystart, wy)) in cy.iter().enumerate() {
        for (ox, (xstart, wx)) in cx.iter().enumerate() {
            let mut acc = [0.0f64; 3];
            for (j, vy) in wy.iter().enumerate() {
                for (i, vx) in wx.iter().enumerate() {
                    let p = rgb[(ystart + j) * w as usize + xstart + i];
                    for c in 0..3 {
                        acc[c] += vy * vx * p[c];
                    }
                }
            }
            let at = ((at.1 as usize + oy) * size as usize + at.0 as usize + ox) * 3;
            for c in 0..3 {
                out[at + c] = acc[c].round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// torchvision's `Resize(256)` + `CenterCrop(size)` as a source box (Python's rounding).
fn torchvision_crop_box(w: u32, h: u32, shorter: u32, size: u32) -> (f64, f64, f64, f64) {
    let (rw, rh) = if w <= h {
        (
            shorter,
            (u64::from(h) * u64::from(shorter) / u64::from(w)) as u32,
        )
    } else {
        (
            (u64::from(w) * u64::from(shorter) / u64::from(h)) as u32,
            shorter,
        )
    };
    let offset = |side: u32| (f64::from(side - size) / 2.0).round_ties_even();
    let (sx, sy) = (f64::from(w) / f64::from(rw), f64::from(h) / f64::from(rh));
    let (left, top) = (offset(rw), offset(rh));
    (
        left * sx,
        (left + f64::from(size)) * sx,
        top * sy,
        (top + f64::from(size)) * sy,
    )
}

/// A BGRA image of smooth waves in every channel and in alpha (a period of about 20 pixels, no
/// value near 0 or 255): resamplers that round or clip at different steps agree on it, so a
/// difference means a misplaced pixel.
fn bgra(w: u32, h: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity((w * h * 4) as usize);
    for y in 0..h {
        for x in 0..w {
            let (x, y) = (f64::from(x), f64::from(y));
            let wave = |fx: f64, fy: f64, phase: f64, amplitude: f64| {
                (128.0 + amplitude * (fx * x + fy * y + phase).sin()).round() as u8
            };
            data.extend_from_slice(&[
                wave(0.30, 0.23, 0.0, 90.0),
                wave(0.21, 0.31, 1.0, 90.0),
                wave(0.27, 0.19, 2.0, 90.0),
                wave(0.11, 0.13, 0.5, 120.0),
            ]);
        }
    }
    data
}

/// The RGB a viewer shows for BGRA `px` over `background` (`None`: alpha ignored), in f64.
fn shown(px: &[u8], background: Option<[u8; 3]>) -> [f64; 3] {
    let rgb = [px[2], px[1], px[0]].map(f64::from);
    match background {
        None => rgb,
        Some(b) => {
            let a = f64::from(px[3]) / 255.0;
            // Composited then stored as 8 bits, as PIL's alpha_composite does.
            std::array::from_fn(|c| (rgb[c] * a + f64::from(b[c]) * (1.0 - a)).round())
        }
    }
}

fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn lite0_with(filter: ResizeFilter) -> Manifest {
    let (mut m, _) = manifest("EfficientNetLite0").unwrap();
    m.preprocess.filter = filter;
    m
}

#[test]
fn extreme_aspect_ratios_crop_in_source_coordinates_like_torchvision() {
    for filter in [ResizeFilter::Bicubic, ResizeFilter::Bilinear] {
        let m = lite0_with(filter);
        for (w, h) in [(4000u32, 3u32), (3, 4000), (640, 480), (301, 999)] {
            let data = bgra(w, h);
            let view = ImageView::from_row(
                h as i32,
                w as i32,
                4,
                MODE_BGRA8,
                &data,
                &Default::default(),
            )
            .unwrap();
            let options = PreprocessOptions {
                resize_mode: ResizeMode::Crop,
                alpha_background: AlphaBackground::Ignore,
            };
            let (ours, largest) =
                largest_allocation_in(|| fit_to_input(&view, &m, &options).unwrap());
            let rgb: Vec<[f64; 3]> = data.chunks_exact(4).map(|p| shown(p, None)).collect();
            let expected = reference(
                &rgb,
                (w, h),
                torchvision_crop_box(w, h, 256, 224),
                (224, 224),
                (0, 0),
                224,
                [0, 0, 0],
                filter,
            );
            let diff = max_level_diff(&ours.data, &expected);
            println!(
                "{filter:?} {w}x{h}: max {diff} level(s) from the reference, largest allocation {largest} bytes"
            );
            assert!(diff <= 2, "{filter:?} {w}x{h}: {diff} levels off");
            // Output (150 KB) plus the source region the crop reads, never the full resize
            // (a 4000x3 image resized to shorter side 256 is 341,333 x 256 x 3 = 262 MB).
            let source = (w * h * 3) as usize;
            assert!(
                largest <= source.max(224 * 224 * 3) + 4096,
                "{w}x{h}: {largest} bytes"
            );
        }
    }
}

#[test]
fn a_16384x1_image_allocates_kilobytes_not_gigabytes() {
    let m = lite0_with(ResizeFilter::Bicubic);
    for (w, h) in [(16_384u32, 1u32), (1, 16_384)] {
        let data = vec![200u8; (w * h * 3) as usize];
        let view =
            ImageView::from_row(h as i32, w as i32, 3, MODE_BGR8, &data, &Default::default())
                .unwrap();
        for resize_mode in [ResizeMode::Crop, ResizeMode::Pad] {
            let options = PreprocessOptions {
                resize_mode,
                ..Default::default()
            };
            let (out, largest) =
                largest_allocation_in(|| fit_to_input(&view, &m, &options).unwrap());
            assert_eq!((out.width, out.height), (224, 224));
            // Before: a 4,194,304 x 256 RGB buffer (3.2 GB) for the crop.
            assert!(
                largest < 1 << 20,
                "{w}x{h} {resize_mode:?}: {largest} bytes"
            );
        }
    }
}

#[test]
fn alpha_is_composited_and_pad_letterboxes_like_the_reference() {
    let m = lite0_with(ResizeFilter::Bicubic);
    let cases = [
        ("white", Some([255u8, 255, 255])),
        ("black", Some([0, 0, 0])),
        ("#3366cc", Some([0x33, 0x66, 0xcc])),
        ("none", None),
    ];
    for (w, h) in [(300u32, 120u32), (90, 250), (64, 64)] {
        let data = bgra(w, h);
        let view = ImageView::from_row(
            h as i32,
            w as i32,
            4,
            MODE_BGRA8,
            &data,
            &Default::default(),
        )
        .unwrap();
        for (name, background) in cases {
            let alpha_background = AlphaBackground::parse(name).unwrap();
            let rgb: Vec<[f64; 3]> = data.chunks_exact(4).map(|p| shown(p, background)).collect();
            let pad = background.unwrap_or([0, 0, 0]);
            // Crop: the manifest's resize + centre crop of the composited image.
            let ours = fit_to_input(
                &view,
                &m,
                &PreprocessOptions {
                    resize_mode: ResizeMode::Crop,
                    alpha_background,
                },
            )
            .unwrap();
            let expected = reference(
                &rgb,
                (w, h),
                torchvision_crop_box(w, h, 256, 224),
                (224, 224),
                (0, 0),
                224,
                pad,
                ResizeFilter::Bicubic,
            );
            let diff = max_level_diff(&ours.data, &expected);
            assert!(diff <= 2, "crop {name} {w}x{h}: {diff} levels off");
            // Pad: longer side to 224, centred on the background colour.
            let long = w.max(h) as f64;
            let fit = |side: u32| ((f64::from(side) * 224.0 / long).round() as u32).max(1);
            let out = (fit(w), fit(h));
            let ours = fit_to_input(
                &view,
                &m,
                &PreprocessOptions {
                    resize_mode: ResizeMode::Pad,
                    alpha_background,
                },
            )
            .unwrap();
            let expected = reference(
                &rgb,
                (w, h),
                (0.0, f64::from(w), 0.0, f64::from(h)),
                out,
                ((224 - out.0) / 2, (224 - out.1) / 2),
                224,
                pad,
                ResizeFilter::Bicubic,
            );
            let diff = max_level_diff(&ours.data, &expected);
            println!("pad {name} {w}x{h} -> {out:?}: max {diff} level(s) from the reference");
            assert!(diff <= 2, "pad {name} {w}x{h}: {diff} levels off");
        }
    }
    for bad in ["", "grey", "#12345", "#12345g", "#1234567", "rgb(1,2,3)"] {
        assert!(AlphaBackground::parse(bad).is_none(), "{bad:?} parsed");
    }
}

// ---------------------------------------------------------------------------------------------
// Image structs from any source: checked before any pixel is read.
// ---------------------------------------------------------------------------------------------

/// An image column from raw `(height, width, nChannels, mode, data)` rows, as Parquet, Spark or
/// a caller could hand it over (nothing checked).
fn image_struct(rows: Vec<(i32, i32, i32, i32, Vec<u8>)>) -> ArrayRef {
    let n = rows.len();
    let origin: StringArray = (0..n).map(|i| Some(format!("row{i}"))).collect();
    let height = Int32Array::from_iter_values(rows.iter().map(|r| r.0));
    let width = Int32Array::from_iter_values(rows.iter().map(|r| r.1));
    let channels = Int32Array::from_iter_values(rows.iter().map(|r| r.2));
    let mode = Int32Array::from_iter_values(rows.iter().map(|r| r.3));
    let data = BinaryArray::from_iter_values(rows.iter().map(|r| r.4.as_slice()));
    Arc::new(StructArray::new(
        image_fields(),
        vec![
            Arc::new(origin) as ArrayRef,
            Arc::new(height),
            Arc::new(width),
            Arc::new(channels),
            Arc::new(mode),
            Arc::new(data),
        ],
        None,
    ))
}

fn image_frame(ctx: &SessionContext, images: ArrayRef) -> DataFrame {
    let schema = Arc::new(Schema::new(vec![Field::new("image", image_type(), true)]));
    ctx.read_batch(RecordBatch::try_new(schema, vec![images]).unwrap())
        .unwrap()
}

#[tokio::test]
async fn hostile_struct_rows_are_null_with_the_reason_in_error_col() {
    let ok = vec![90u8; 40 * 30 * 3];
    let rows = vec![
        (30, 40, 3, MODE_BGR8, ok.clone()),
        // 1 x 10^7 pixels carrying all its bytes: over the 16,384 px per side limit.
        (1, 10_000_000, 3, MODE_BGR8, vec![7u8; 30_000_000]),
        // Claims 10^6 x 10^6 pixels, carries 12 bytes.
        (1_000_000, 1_000_000, 3, MODE_BGR8, vec![0u8; 12]),
        // Fields that disagree with the buffer, the mode, or themselves.
        (30, 40, 3, MODE_BGR8, ok[..100].to_vec()),
        (30, 40, 4, MODE_BGR8, ok.clone()),
        (30, 40, 3, 99, ok.clone()),
        (-30, 40, 3, MODE_BGR8, ok.clone()),
        (0, 0, 3, MODE_BGR8, Vec::new()),
    ];
    let expected = [
        None,
        Some("over the limit of 16384 px per side"),
        Some("over the limit of 16384 px per side"),
        Some("data has 100 bytes, expected 40x30x3 = 3600"),
        Some("nChannels 4 does not match mode 16"),
        Some("unsupported image mode 99"),
        Some("image has no pixels"),
        Some("image has no pixels"),
    ];
    let ctx = SessionContext::new();
    let featurizer = DeepImageFeaturizer::new().with_error_col("image_error");
    let out = common::collect(
        featurizer
            .transform(image_frame(&ctx, image_struct(rows)))
            .unwrap(),
    )
    .await;
    let features = out.column_by_name("features").unwrap();
    let errors = out
        .column_by_name("image_error")
        .unwrap()
        .as_string::<i32>();
    for (row, want) in expected.iter().enumerate() {
        let got = errors.is_valid(row).then(|| errors.value(row));
        println!("row {row}: {got:?}");
        match want {
            None => assert!(
                got.is_none() && features.is_valid(row),
                "row {row}: {got:?}"
            ),
            Some(text) => {
                assert!(features.is_null(row), "row {row} has features");
                assert!(
                    got.is_some_and(|g| g.contains(text)),
                    "row {row}: {got:?}, want {text}"
                );
            }
        }
    }
    assert_eq!(featurizer.images_processed(), 1);
}

// ---------------------------------------------------------------------------------------------
// Peak memory, measured as `VmHWM` of a child process running one case.
// ---------------------------------------------------------------------------------------------

const RSS_CASE: &str = "DP_TEST_RSS_CASE";
const RSS_ARG: &str = "DP_TEST_RSS_ARG";

fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Runs in a child started by [`peak_rss_kb`]; prints `VmHWM` after the case. Does nothing
/// when run on its own.
#[tokio::test]
async fn rss_child_process_entry() {
    let (Ok(case), Ok(arg)) = (std::env::var(RSS_CASE), std::env::var(RSS_ARG)) else {
        return;
    };
    let ctx = SessionContext::new();
    let (features, nulls) = match case.as_str() {
        "folder" => {
            let images = read_images(&ctx, &arg, ReadImagesOptions::default()).unwrap();
            let out = DeepImageFeaturizer::new()
                .with_error_col("reason")
                .transform(images)
                .unwrap();
            let out = common::collect(out).await;
            let f = out.column_by_name("features").unwrap();
            (f.len() - f.null_count(), f.null_count())
        }
        "rows" => {
            let rows: usize = arg.parse().unwrap();
            // A network that costs nothing, so the case measures preprocessing.
            register_network(
                user_manifest("ChannelMeans", 3),
                Arc::new(MeanChannels(3)),
                &Device::flex(),
            )
            .unwrap();
            // 8 x 8 BGR images: the batch itself is small (192 bytes a row), each network input
            // is 224 x 224 x 3 floats (602 KB).
            let images = image_struct(
                (0..rows)
                    .map(|i| (8, 8, 3, MODE_BGR8, vec![(i % 251) as u8; 192]))
                    .collect(),
            );
            let out = DeepImageFeaturizer::new()
                .with_model_name("ChannelMeans")
                .transform(image_frame(&ctx, images))
                .unwrap();
            let out = common::collect(out).await;
            let f = out.column_by_name("features").unwrap();
            (f.len() - f.null_count(), f.null_count())
        }
        other => panic!("unknown case {other}"),
    };
    println!(
        "RSS_RESULT features={features} nulls={nulls} vmhwm_kb={}",
        vm_hwm_kb()
    );
}

/// Peak RSS (kB) of a child process running `case` on `arg`, and the rows it featurized.
fn peak_rss_kb(case: &str, arg: &str) -> (u64, usize) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "bounded_input::rss_child_process_entry",
            "--exact",
            "--nocapture",
        ])
        .env(RSS_CASE, case)
        .env(RSS_ARG, arg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child {case} {arg} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RSS_RESULT"))
        .unwrap_or_else(|| panic!("no result from child {case} {arg}: {stdout}"));
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    (field("vmhwm_kb="), field("features=") as usize)
}

#[test]
fn peak_memory_is_bounded_by_the_batch_size_not_the_record_batch_or_the_aspect_ratio() {
    // Extreme aspect ratios, through the decoder and the real network.
    let dir = tempfile::tempdir().unwrap();
    let tall = dir.path().join("extreme");
    let ordinary = dir.path().join("ordinary");
    std::fs::create_dir_all(&tall).unwrap();
    std::fs::create_dir_all(&ordinary).unwrap();
    let stripe = |w: u32, h: u32| {
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
            Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        }))
    };
    std::fs::write(
        tall.join("wide.png"),
        encode(&stripe(16_384, 1), ImageFormat::Png),
    )
    .unwrap();
    std::fs::write(
        tall.join("tall.png"),
        encode(&stripe(1, 16_384), ImageFormat::Png),
    )
    .unwrap();
    std::fs::write(
        ordinary.join("photo.png"),
        encode(&stripe(400, 300), ImageFormat::Png),
    )
    .unwrap();
    let (extreme_kb, extreme_rows) = peak_rss_kb("folder", tall.to_str().unwrap());
    let (ordinary_kb, ordinary_rows) = peak_rss_kb("folder", ordinary.to_str().unwrap());
    println!(
        "peak RSS: 16384x1 + 1x16384 PNGs {extreme_kb} kB ({extreme_rows} featurized), one 400x300 PNG {ordinary_kb} kB"
    );
    assert_eq!((extreme_rows, ordinary_rows), (2, 1));
    assert!(extreme_kb < 600 * 1024, "{extreme_kb} kB");

    // One 8,192-row record batch against one of 32 rows: preprocessing streams batchSize
    // images at a time (before: 8,192 x 602 KB = 4.9 GB of network inputs at once).
    let (small_kb, small_rows) = peak_rss_kb("rows", "32");
    let (large_kb, large_rows) = peak_rss_kb("rows", "8192");
    println!("peak RSS: 32-row batch {small_kb} kB, 8192-row batch {large_kb} kB");
    assert_eq!((small_rows, large_rows), (32, 8192));
    assert!(
        (large_kb as f64) < 1.25 * small_kb as f64,
        "8192 rows: {large_kb} kB, 32 rows: {small_kb} kB"
    );
}

// ---------------------------------------------------------------------------------------------
// Alpha and letterbox: accuracy on generated transparent objects.
// ---------------------------------------------------------------------------------------------

/// `per_class` RGBA PNGs of each of three shapes (disc, square, ring) in random colours, at
/// random positions and scales on wide or tall transparent canvases whose transparent pixels
/// hold random garbage, as files in `dir/<shape>/`.
fn transparent_objects(dir: &Path, per_class: usize) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % u64::from(n)) as u32
    };
    for shape in ["disc", "square", "ring"] {
        std::fs::create_dir_all(dir.join(shape)).unwrap();
        for i in 0..per_class {
            let (w, h) = if next(2) == 0 { (360, 160) } else { (160, 360) };
            let r = 18 + next(30) as i64;
            let cx = r + next(w - 2 * r as u32) as i64;
            let cy = r + next(h - 2 * r as u32) as i64;
            let colour = [next(256) as u8, next(256) as u8, next(256) as u8];
            let img = ImageBuffer::from_fn(w, h, |x, y| {
                let (dx, dy) = (x as i64 - cx, y as i64 - cy);
                let d2 = dx * dx + dy * dy;
                let inside = match shape {
                    "disc" => d2 <= r * r,
                    "square" => dx.abs() <= r * 4 / 5 && dy.abs() <= r * 4 / 5,
                    _ => d2 <= r * r && d2 >= (r * 3 / 5) * (r * 3 / 5),
                };
                let g = (x
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(y.wrapping_mul(40_503))
                    >> 7) as u8;
                if inside {
                    Rgba([colour[0], colour[1], colour[2], 255])
                } else {
                    Rgba([g, g.wrapping_mul(3), g.wrapping_add(91), 0])
                }
            });
            let png = encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png);
            std::fs::write(dir.join(shape).join(format!("{i:03}.png")), png).unwrap();
        }
    }
}

async fn cross_validated_accuracy(images: &DataFrame, featurizer: DeepImageFeaturizer) -> f64 {
    let lr = LogisticRegression::new()
        .with_label_col("labelIndex")
        .with_reg_param(1e-2);
    let pipeline = Pipeline::new()
        .with_estimator(
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("labelIndex"),
        )
        .with_transformer(featurizer)
        .with_estimator(lr);
    let lr_uid = pipeline.stage_uids()[2].to_string();
    let grid = ParamGridBuilder::new()
        .add_grid(&lr_uid, "regParam", [1e-2])
        .build();
    let evaluator = MulticlassClassificationEvaluator::new()
        .with_label_col("labelIndex")
        .with_metric_name("accuracy");
    // Folds by file number (`007.png` -> 7 % 3), not by a hash of the temporary folder's path:
    // the same folds, and so the same figures, on every run.
    let fold = cast(left(right(col("origin"), lit(7)), lit(3)), DataType::Int64) % lit(3i64);
    let images = images.clone().with_column("fold", fold).unwrap();
    let cv = CrossValidator::new(pipeline, grid, evaluator)
        .with_num_folds(3)
        .with_fold_col("fold");
    cv.fit(&images).await.unwrap().avg_metrics()[0]
}

#[tokio::test]
async fn pad_over_white_beats_crop_with_dropped_alpha_on_transparent_objects() {
    let dir = tempfile::tempdir().unwrap();
    transparent_objects(dir.path(), 30);
    let ctx = SessionContext::new();
    let options = ReadImagesOptions::default().with_label_from_folder(true);
    let images = read_images(&ctx, dir.path().to_str().unwrap(), options)
        .unwrap()
        .cache()
        .await
        .unwrap();
    let dropped = cross_validated_accuracy(
        &images,
        DeepImageFeaturizer::new()
            .with_resize_mode("crop")
            .with_alpha_background("none"),
    )
    .await;
    let padded = cross_validated_accuracy(
        &images,
        DeepImageFeaturizer::new()
            .with_resize_mode("pad")
            .with_alpha_background("white"),
    )
    .await;
    // Each change alone, for the record.
    let mut alone = Vec::new();
    for (mode, background) in [("crop", "white"), ("pad", "none")] {
        let featurizer = DeepImageFeaturizer::new()
            .with_resize_mode(mode)
            .with_alpha_background(background);
        let accuracy = cross_validated_accuracy(&images, featurizer).await;
        alone.push(format!("{mode} + {background} {accuracy:.3}"));
    }
    println!(
        "3-fold accuracy on 90 transparent objects: crop + alpha dropped {dropped:.3}, pad + white {padded:.3} ({})",
        alone.join(", ")
    );
    assert!(
        padded > dropped,
        "pad + white {padded} <= crop + dropped alpha {dropped}"
    );
}

#[test]
fn resize_mode_and_alpha_background_are_validated_params() {
    let err = DeepImageFeaturizer::new()
        .with_resize_mode("stretch")
        .params()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("resizeMode") && err.contains("stretch"),
        "{err}"
    );
    let err = DeepImagePredictor::new()
        .with_alpha_background("#12345")
        .params()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("alphaBackground") && err.contains("#rrggbb"),
        "{err}"
    );
    let p = DeepImagePredictor::new()
        .with_resize_mode("pad")
        .with_alpha_background("#102030");
    assert!(p.params().validate().is_ok());
    assert_eq!(p.params().network.resize_mode, ResizeMode::Pad);
}

// ---------------------------------------------------------------------------------------------
// Saved models name only files inside their folder.
// ---------------------------------------------------------------------------------------------

fn saved_stage_with_data(dir: &Path) -> std::path::PathBuf {
    let stage = SavedStage::new("my_crate.Holder", "Holder_1")
        .with_data("model.safetensors", b"weights".to_vec());
    let pipeline = SavedStage::container("my_crate.Chain", "Chain_1", vec![stage]);
    let path = dir.join("saved");
    persistence::save(&pipeline, &path, false).unwrap();
    path
}

fn rewrite(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn saved_models_cannot_name_files_outside_their_folder() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, b"weights").unwrap();
    let good = saved_stage_with_data(dir.path());
    assert!(persistence::read(&good).is_ok());
    let stage_meta = good.join("stages/0_Holder_1/metadata.json");

    // A data file name that climbs out of the folder (its sha256 is right: the attacker wrote
    // both), then an absolute one.
    for name in ["../../../../secret.txt", secret.to_str().unwrap()] {
        let text = std::fs::read_to_string(&stage_meta).unwrap();
        std::fs::write(
            &stage_meta,
            text.replacen("\"model.safetensors\"", &format!("{name:?}"), 1),
        )
        .unwrap();
        let err = persistence::read(&good).unwrap_err().to_string();
        println!("{err}");
        assert!(
            err.contains("metadata.json") && err.contains("not a plain file name"),
            "{err}"
        );
        rewrite(&stage_meta, &format!("{name:?}"), "\"model.safetensors\"");
        assert!(persistence::read(&good).is_ok());
    }

    // A stage uid that climbs out, in the pipeline's list and in the stage itself.
    rewrite(&good.join("metadata.json"), "\"Holder_1\"", "\"../../x\"");
    let err = PipelineModel::load(&good).unwrap_err().to_string();
    assert!(
        err.contains("metadata.json") && err.contains("../../x"),
        "{err}"
    );
    rewrite(&good.join("metadata.json"), "\"../../x\"", "\"Holder_1\"");
    rewrite(&stage_meta, "\"uid\": \"Holder_1\"", "\"uid\": \"/etc\"");
    let err = persistence::read(&good).unwrap_err().to_string();
    assert!(err.contains("not a plain file name"), "{err}");

    // The writer refuses what the reader would.
    let bad = SavedStage::new("my_crate.Holder", "../escape");
    let err = persistence::save(&bad, &dir.path().join("w"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("../escape"), "{err}");
    let bad = SavedStage::new("my_crate.Holder", "Holder_2").with_data("../x", Vec::new());
    let err = persistence::save(&bad, &dir.path().join("w"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"../x\""), "{err}");
    assert!(!dir.path().join("w").exists() && !dir.path().join("x").exists());
}

#[test]
fn a_failed_overwrite_leaves_the_previous_model_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_stage_with_data(dir.path());
    // Fails while writing (a uid the writer refuses), after the old model exists.
    let bad = SavedStage::new("my_crate.Holder", "bad/uid");
    assert!(persistence::save(&bad, &path, true).is_err());
    let back = persistence::read(&path).unwrap();
    assert_eq!(
        back.stages[0].data_file("model.safetensors").unwrap(),
        b"weights"
    );
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// ---------------------------------------------------------------------------------------------
// The model registry and cache.
// ---------------------------------------------------------------------------------------------

#[test]
fn registering_a_name_twice_is_an_error_unless_replacing() {
    let device = Device::flex();
    let m = user_manifest("TwiceRegistered", 3);
    register_network(m.clone(), Arc::new(MeanChannels(3)), &device).unwrap();
    let err = register_network(m.clone(), Arc::new(MeanChannels(3)), &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TwiceRegistered") && err.contains("replace_network"),
        "{err}"
    );
    replace_network(m, Arc::new(MeanChannels(3)), &device).unwrap();
}

#[tokio::test]
async fn the_model_cache_reloads_a_replaced_weight_file() {
    // A private copy of EfficientNet-Lite0 whose weights are replaced by SqueezeNet-sized
    // garbage: the cached model must not be served for the new file.
    let dir = tempfile::tempdir().unwrap();
    let lite0 = deep_pipelines::models::model_dir().join("efficientnet_lite0");
    let copy = dir.path().join("efficientnet_lite0");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&lite0).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let dir_str = dir.path().to_str().unwrap();
    let first = deep_pipelines::models::load_model_in("EfficientNetLite0", "cpu", Some(dir.path()))
        .unwrap();
    let again = deep_pipelines::models::load_model_in("EfficientNetLite0", "cpu", Some(dir.path()))
        .unwrap();
    assert!(Arc::ptr_eq(&first, &again), "cached model not reused");
    // Replace the weight file (new size and time): the next lookup is a new model, whose
    // network fails loudly when it is built.
    let (m, _) = manifest("EfficientNetLite0").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(copy.join(&m.weights.file), b"not safetensors").unwrap();
    let replaced =
        deep_pipelines::models::load_model_in("EfficientNetLite0", "cpu", Some(dir.path()))
            .unwrap();
    assert!(
        !Arc::ptr_eq(&first, &replaced),
        "the cache served a model whose weight file changed ({dir_str})"
    );
    let err = replaced.network().unwrap_err().to_string();
    println!("{err}");
}

// ---------------------------------------------------------------------------------------------
// The new params travel: saved and loaded with the stage, used by SQL functions made from it.
// ---------------------------------------------------------------------------------------------

/// The rows' features as f32 values, null rows as empty.
fn feature_rows(batch: &RecordBatch, column: &str) -> Vec<Vec<f32>> {
    let list = batch.column_by_name(column).unwrap().as_fixed_size_list();
    (0..list.len())
        .map(|r| {
            if list.is_null(r) {
                return Vec::new();
            }
            let values = list.value(r);
            values
                .as_primitive::<datafusion::arrow::datatypes::Float32Type>()
                .values()
                .to_vec()
        })
        .collect()
}

#[tokio::test]
async fn preprocessing_params_are_saved_and_used_by_sql_functions() {
    let dir = tempfile::tempdir().unwrap();
    let images_dir = dir.path().join("images");
    transparent_objects(&images_dir, 2);
    let ctx = SessionContext::new();
    deep_pipelines::register_images_table(
        &ctx,
        "images",
        &images_dir,
        ReadImagesOptions::default(),
    )
    .unwrap();
    let featurizer = DeepImageFeaturizer::new()
        .with_resize_mode("pad")
        .with_alpha_background("#102030");
    let model = PipelineModel::new("PipelineModel_pad", vec![Arc::new(featurizer.clone())]);
    let saved = dir.path().join("model");
    model.save(&saved).unwrap();
    let loaded = PipelineModel::load(&saved).unwrap();
    let stage = loaded.stage::<DeepImageFeaturizer>().unwrap();
    assert_eq!(stage.params(), featurizer.params());

    deep_pipelines::sql::register_featurizer(&ctx, "padded", stage).unwrap();
    let sql = ctx
        .sql("SELECT origin, padded(image) AS features FROM images ORDER BY origin")
        .await
        .unwrap();
    let via_sql = feature_rows(&common::collect(sql).await, "features");
    let sorted = |df: DataFrame| df.sort(vec![col("origin").sort(true, false)]).unwrap();
    let table = ctx.table("images").await.unwrap();
    let direct = common::collect(sorted(featurizer.transform(table.clone()).unwrap())).await;
    let direct = feature_rows(&direct, "features");
    let cropped =
        common::collect(sorted(DeepImageFeaturizer::new().transform(table).unwrap())).await;
    let cropped = feature_rows(&cropped, "features");
    assert_eq!(via_sql.len(), 6);
    let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
            .fold(0.0f32, f32::max)
    };
    assert!(max_diff(&via_sql, &direct) <= 1e-5);
    assert!(
        max_diff(&direct, &cropped) > 0.1,
        "pad + #102030 gave the default's features"
    );
}
