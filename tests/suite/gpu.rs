//! The wgpu device (`--features wgpu`): EfficientNet-Lite0 within 1e-3 of the golden tensors on
//! every adapter kind this machine has (Mesa's software Vulkan, `wgpu-cpu`, at least: the test
//! fails when there is no adapter at all rather than passing without running), the featurizer
//! stage on it equal to the CPU's, and a clear error for a device name with no adapter.

use crate::common;

use common::{max_abs_diff, read_tensors};
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Float32Type;
use deep_pipelines::models::{device, load_model};
use deep_pipelines::prelude::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn golden(name: &str) -> Vec<f32> {
    let mut tensors = read_tensors(&format!("{FIXTURES}/reference_chelsea.safetensors"));
    tensors.remove(name).expect("golden tensor").1
}

/// The wgpu device names this machine has an adapter for.
fn wgpu_devices() -> Vec<&'static str> {
    let found: Vec<&str> = ["wgpu-cpu", "wgpu"]
        .into_iter()
        .filter(|name| device(name).is_ok())
        .collect();
    assert!(
        !found.is_empty(),
        "no wgpu adapter at all: {} (install a Vulkan driver, e.g. Debian's mesa-vulkan-drivers)",
        device("wgpu-cpu").unwrap_err()
    );
    found
}

#[test]
fn golden_features_and_logits_on_wgpu_within_1e_3() {
    for name in wgpu_devices() {
        let model = load_model("EfficientNetLite0", name).unwrap();
        let input = golden("input_chelsea");
        let flipped: Vec<f32> = input.iter().map(|v| -v).collect();
        let mut two = input.clone();
        two.extend_from_slice(&flipped);
        let features = model.features(two, 2).unwrap();
        let logits = model.logits(input, 1).unwrap();
        let cpu = load_model("EfficientNetLite0", "cpu").unwrap();
        let (f_diff, l_diff, flipped_diff) = (
            max_abs_diff(&features[..1280], &golden("features_chelsea")),
            max_abs_diff(&logits, &golden("logits_chelsea")),
            max_abs_diff(&features[1280..], &cpu.features(flipped, 1).unwrap()),
        );
        println!(
            "{}: max |diff| features {f_diff:e}, logits {l_diff:e}, second image vs cpu {flipped_diff:e}",
            deep_pipelines::models::device_label(name)
        );
        assert!(f_diff <= 1e-3, "{name}: features differ by {f_diff}");
        assert!(l_diff <= 1e-3, "{name}: logits differ by {l_diff}");
        assert!(
            flipped_diff <= 1e-3,
            "{name}: batch of 2 differs by {flipped_diff}"
        );
    }
}

#[tokio::test]
async fn the_featurizer_on_wgpu_equals_the_cpu_featurizer() {
    let ctx = SessionContext::new();
    let images = common::images(&ctx, "test", 0.02);
    let on_cpu = DeepImageFeaturizer::new().with_batch_size(4);
    // Partitions finish in any order: compare rows by origin.
    let by_origin = |df: DataFrame| df.sort(vec![col("origin").sort(true, false)]).unwrap();
    let expected = common::collect(by_origin(on_cpu.transform(images.clone()).unwrap())).await;
    for name in wgpu_devices() {
        let on_gpu = DeepImageFeaturizer::new()
            .with_device(name)
            .with_batch_size(4);
        let out = common::collect(by_origin(on_gpu.transform(images.clone()).unwrap())).await;
        let (a, b) = (
            out.column_by_name("features").unwrap().as_fixed_size_list(),
            expected
                .column_by_name("features")
                .unwrap()
                .as_fixed_size_list(),
        );
        assert_eq!(a.len(), b.len());
        assert!(a.len() >= 4, "too few images sampled: {}", a.len());
        let mut worst = 0.0f32;
        for r in 0..a.len() {
            assert_eq!(a.is_null(r), b.is_null(r));
            let (x, y) = (a.value(r), b.value(r));
            worst = worst.max(max_abs_diff(
                x.as_primitive::<Float32Type>().values(),
                y.as_primitive::<Float32Type>().values(),
            ));
        }
        let stats = on_gpu.metrics();
        println!(
            "{name}: {} rows, max |diff| vs cpu {worst:e}; {stats}",
            a.len()
        );
        assert!(
            worst <= 1e-3,
            "{name}: features differ from the CPU's by {worst}"
        );
        assert!(
            stats.device.starts_with(&format!("{name}: ")),
            "{}",
            stats.device
        );
        assert_eq!(stats.images as usize, a.len());
    }
}

#[tokio::test]
async fn a_device_name_with_no_adapter_is_an_error_naming_what_was_found() {
    let found = wgpu_devices();
    let gpus = (0..8)
        .take_while(|n| device(&format!("wgpu:{n}")).is_ok())
        .count();
    let missing = format!("wgpu:{gpus}");
    println!("{gpus} GPU adapter(s): {found:?}");
    // Planning needs no adapter (a Spark driver may have none): the model loads, its first
    // batch says what is missing.
    let model = load_model("EfficientNetLite0", &missing).unwrap();
    let err = model
        .features(golden("input_chelsea"), 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("device `{missing}` needs")) && err.contains("wgpu found"),
        "{err}"
    );
    let df = DeepImageFeaturizer::new()
        .with_device(&missing)
        .transform(common::images(&SessionContext::new(), "test", 0.01))
        .unwrap();
    let err = df.collect().await.unwrap_err().to_string();
    assert!(err.contains("GPU adapter"), "{err}");
    let err = load_model("EfficientNetLite0", "wgpu:x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown device `wgpu:x`"), "{err}");
}
