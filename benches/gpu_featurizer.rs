//! EfficientNet-Lite0 features on a wgpu device: parity with the golden tensors, then forward
//! throughput at batch 32, 128 and 512 (img/s, median of `GPU_REPEATS` timed passes after one
//! warm-up pass per size), next to the CPU at batch 32 in the same run. A batch the device
//! cannot allocate is reported, not fatal.
//!
//! `cargo bench --features wgpu --bench gpu_featurizer` (env `GPU_DEVICE`: `wgpu`, the default,
//! or `wgpu-cpu`; `GPU_BATCHES`, default `32,128,512`; `GPU_REPEATS`, default 5).

use std::time::Instant;

use deep_pipelines::models::{device_label, load_model};

mod common;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let device = std::env::var("GPU_DEVICE").unwrap_or_else(|_| "wgpu".into());
    let repeats: usize = std::env::var("GPU_REPEATS").map_or(5, |v| v.parse().expect("a count"));
    let batches: Vec<usize> = std::env::var("GPU_BATCHES")
        .unwrap_or_else(|_| "32,128,512".into())
        .split(',')
        .map(|b| b.trim().parse().expect("a batch size"))
        .collect();
    let model = match load_model("EfficientNetLite0", &device) {
        Ok(model) => model,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    println!("device {}", device_label(&device));

    let golden = safetensors_golden();
    let features = model.features(golden.0.clone(), 1).expect("forward");
    let diff = features
        .iter()
        .zip(&golden.1)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("parity: max |features - golden| = {diff:e} (tolerance 1e-3)");

    let input_len = 3 * 224 * 224;
    let cpu = load_model("EfficientNetLite0", "cpu").expect("cpu model");
    let run = |model: &deep_pipelines::models::LoadedModel, batch: usize| -> Option<f64> {
        let inputs = common::inputs(batch * input_len);
        model.features(inputs.clone(), batch).ok()?; // warm-up (and autotune)
        let times: Vec<f64> = (0..repeats)
            .map(|_| {
                let started = Instant::now();
                model.features(inputs.clone(), batch).expect("forward");
                started.elapsed().as_secs_f64()
            })
            .collect();
        Some(batch as f64 / median(times))
    };
    let cpu_rate = run(&cpu, 32).expect("cpu forward");
    println!("cpu, batch 32: {cpu_rate:.1} img/s");
    for batch in batches {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&model, batch))) {
            Ok(Some(rate)) => println!(
                "{device}, batch {batch}: {rate:.1} img/s ({:.2}x the cpu at batch 32)",
                rate / cpu_rate
            ),
            _ => println!("{device}, batch {batch}: failed (device memory?)"),
        }
    }
}

/// The golden input and features of `tests/fixtures/reference_chelsea.safetensors`.
fn safetensors_golden() -> (Vec<f32>, Vec<f32>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/reference_chelsea.safetensors"
    );
    let bytes = std::fs::read(path).expect("golden tensors");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let read = |name: &str| -> Vec<f32> {
        tensors
            .tensor(name)
            .expect("tensor")
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    (read("input_chelsea"), read("features_chelsea"))
}
