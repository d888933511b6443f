//! Parity of the burn EfficientNet-Lite0 with the reference framework (golden tensors), and the
//! whole path from photo files through our own decode + preprocessing to ImageNet predictions.

use deep_pipelines::image::{DecodeLimits, decode_rgb8};
use deep_pipelines::models::load_model;
use deep_pipelines::preprocess::preprocess;
use safetensors::SafeTensors;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn golden(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(format!("{FIXTURES}/reference_chelsea.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn golden_features_and_logits_within_1e_4() {
    let model = load_model("EfficientNetLite0", "cpu").unwrap();
    let input = golden("input_chelsea");
    assert_eq!(input.len(), 3 * 224 * 224);
    let features = model.features(input.clone(), 1).unwrap();
    let logits = model.logits(input, 1).unwrap();
    let (f_diff, l_diff) = (
        max_abs_diff(&features, &golden("features_chelsea")),
        max_abs_diff(&logits, &golden("logits_chelsea")),
    );
    println!("max |diff|: features {f_diff:e}, logits {l_diff:e}");
    assert_eq!(features.len(), 1280);
    assert_eq!(logits.len(), 1000);
    assert!(f_diff <= 1e-4, "features differ by {f_diff}");
    assert!(l_diff <= 1e-4, "logits differ by {l_diff}");
}

#[test]
fn batched_forward_equals_single_forward() {
    let model = load_model("EfficientNetLite0", "cpu").unwrap();
    let one = golden("input_chelsea");
    let flipped: Vec<f32> = one.iter().map(|v| -v).collect();
    let mut two = one.clone();
    two.extend_from_slice(&flipped);
    let batched = model.features(two, 2).unwrap();
    let single = model.features(one, 1).unwrap();
    assert!(max_abs_diff(&batched[..1280], &single) <= 1e-5);
    assert!(max_abs_diff(&batched[1280..], &model.features(flipped, 1).unwrap()) <= 1e-5);
}

fn top5(photo: &str) -> Vec<(usize, f32)> {
    let model = load_model("EfficientNetLite0", "cpu").unwrap();
    let path = format!("{FIXTURES}/photos/{photo}");
    let bytes = std::fs::read(&path).unwrap();
    let rgb = decode_rgb8(&bytes, &path, &DecodeLimits::default()).unwrap();
    let input = preprocess(&rgb, &model.manifest).unwrap();
    let logits = model.logits(input, 1).unwrap();
    let mut ranked: Vec<(usize, f32)> = logits.into_iter().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(5);
    println!("{photo}: {ranked:?}");
    ranked
}

fn check_photo(photo: &str, classes: [usize; 5], top1_logit: f32) {
    let ranked = top5(photo);
    let got: Vec<usize> = ranked.iter().map(|r| r.0).collect();
    assert_eq!(got, classes, "{photo}: top-5 classes");
    let diff = (ranked[0].1 - top1_logit).abs();
    assert!(
        diff <= 0.25,
        "{photo}: top-1 logit {} vs {top1_logit}",
        ranked[0].1
    );
}

#[test]
fn chelsea_photo_top5_matches_reference() {
    check_photo("chelsea.png", [282, 285, 281, 287, 904], 9.1667);
}

#[test]
fn coffee_photo_top5_matches_reference() {
    check_photo("coffee.png", [967, 968, 925, 960, 504], 11.4004);
}
