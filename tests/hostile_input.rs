//! Hostile and broken input: a folder of decompression bombs, truncated files of every format,
//! empty and random files, edge-case images and odd pixel formats, featurized in one job. The job
//! completes; broken rows are null with a message; valid rows equal their stand-alone features;
//! peak memory stays under 1 GiB. The corpus is generated here (three fixtures the Rust encoders
//! cannot write come from `fuzz/make_corpus.py`).

mod common;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Float32Type;
use deep_pipelines::image::{
    DecodeLimits, MODE_BGR8, MODE_BGRA8, MODE_GRAY8, decode_image, decode_rgb8,
};
use deep_pipelines::models::load_model;
use deep_pipelines::prelude::*;
use deep_pipelines::preprocess::preprocess;
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, Rgba};

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

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
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

/// A valid small PNG whose IHDR now claims `side` x `side` pixels (CRC fixed up).
fn png_bomb(side: u32) -> Vec<u8> {
    let mut png = encode(&photo(16, 16), ImageFormat::Png);
    // Signature (8), IHDR length (4), "IHDR" (4), width, height, ...; CRC after 13 data bytes.
    png[16..20].copy_from_slice(&side.to_be_bytes());
    png[20..24].copy_from_slice(&side.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A valid small JPEG whose SOF0 frame header now claims `side` x `side` pixels.
fn jpeg_bomb(side: u16) -> Vec<u8> {
    let mut jpeg = encode(&photo(16, 16), ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    // FF C0, length (2), precision (1), height (2), width (2).
    jpeg[sof + 5..sof + 7].copy_from_slice(&side.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&side.to_be_bytes());
    jpeg
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
    add("bomb.png", png_bomb(50_000), Some(false));
    add("bomb.jpg", jpeg_bomb(50_000), Some(false));
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

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
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
    assert_eq!(message("empty.png"), "empty file (0 bytes)");

    let peak = peak_rss_bytes();
    println!("peak RSS {:.0} MiB", peak as f64 / (1 << 20) as f64);
    assert!(peak < 1 << 30, "peak RSS {peak} bytes");
}

fn decoded(bytes: &[u8]) -> deep_pipelines::image::ImageRow {
    decode_image(bytes, "x", &DecodeLimits::default()).unwrap()
}

#[test]
fn pixel_formats_convert_as_documented() {
    let cases = corpus();
    let grey = decoded(&cases["grey.png"].bytes);
    assert_eq!((grey.mode, grey.channels), (MODE_GRAY8, 1));
    assert_eq!(grey.data[3], 24); // x = 3 -> 3 * 8
    let grey16 = decoded(&cases["grey16.png"].bytes);
    assert_eq!((grey16.mode, grey16.channels), (MODE_GRAY8, 1));
    // 16 bits -> 8 bits: 2000 * x / 257, rounded.
    assert!(
        (i32::from(grey16.data[10]) - 78).abs() <= 1,
        "{}",
        grey16.data[10]
    );
    let rgb16 = decoded(&cases["rgb16.png"].bytes);
    assert_eq!((rgb16.mode, rgb16.channels), (MODE_BGR8, 3));
    for name in ["grey_alpha.png", "rgba.png"] {
        let img = decoded(&cases[name].bytes);
        assert_eq!((img.mode, img.channels), (MODE_BGRA8, 4), "{name}");
    }
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

    // Stored 16 x 8 with orientation 6 (rotate 90 clockwise): decoded upright as 8 x 16.
    let rotated = decoded(&cases["exif_rotated.jpg"].bytes);
    assert_eq!((rotated.width, rotated.height), (8, 16));

    // Animated: the first frame (BGRA of (200, 55, 40)).
    let gif = decoded(&cases["animated.gif"].bytes);
    assert_eq!((gif.width, gif.height), (20, 10));
    let px = &gif.data[..gif.channels as usize];
    assert!((i32::from(px[2]) - 200).abs() <= 8, "{px:?}");

    let one = decoded(&cases["one_pixel.png"].bytes);
    assert_eq!((one.width, one.height), (1, 1));
}

#[test]
fn limits_are_configurable_and_checked_before_decoding() {
    let small = DecodeLimits {
        max_side: 32,
        max_decoded_bytes: 1 << 20,
    };
    let png = encode(&photo(40, 10), ImageFormat::Png);
    let err = decode_image(&png, "x", &small).unwrap_err();
    assert!(err.contains("limit"), "{err}");
    let tight = DecodeLimits {
        max_side: 1024,
        max_decoded_bytes: 40 * 10 * 3 - 1,
    };
    let err = decode_image(&png, "x", &tight).unwrap_err();
    assert!(err.contains("limit"), "{err}");
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
    use deep_pipelines::models::check_safetensors_header;
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
    let mut net =
        deep_pipelines::models::efficientnet_lite::EfficientNetLiteConfig::lite0().init(&device);
    let err = deep_pipelines::models::load_safetensors(
        &mut net,
        &path,
        deep_pipelines::models::efficientnet_lite::WEIGHT_NAME_MAP,
        "EfficientNetLite0",
    )
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
    let err = deep_pipelines::models::load_safetensors(
        &mut net,
        &path,
        deep_pipelines::models::efficientnet_lite::WEIGHT_NAME_MAP,
        "EfficientNetLite0",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("conv_stem"), "{err}");
}
