//! Forward-pass throughput of the zoo's architectures to ImageNet logits on the CPU device, as
//! the featurizer runs them: BatchNorm folded into the convolutions and the NHWC CPU plan.
//! Random weights for the torchvision architectures (speed does not depend on the values),
//! EfficientNet-Lite0 with its bundled weights.
//!
//! `cargo bench --bench zoo` measures batch 8 and 32 with criterion. With `--serve` it instead
//! answers one request per line on stdin, so that `benches/compare_torchvision.py` can time
//! ours between PyTorch and ONNX Runtime in one interleaved run:
//! - `time <model> <batch>`: seconds of one forward pass (input to logits), on its own line;
//! - `gemm <size>`: GFLOP/s of one `size`^3 f32 GEMM through the plan's GEMM on every thread;
//! - `info`: the SIMD level the CPU plan's kernels run and the thread count.
//!
//! `ZOO_PRECISION=bfloat16` builds the plans with bfloat16 GEMMs (the stages' `precision`).

mod common;

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Instant;

use burn::prelude::*;
use criterion::{BatchSize, Criterion, Throughput};
use deep_pipelines::models::cpu::{Precision, gemm, inference_network, kernels};
use deep_pipelines::models::efficientnet::EfficientNetConfig;
use deep_pipelines::models::inception_v3::InceptionV3Config;
use deep_pipelines::models::mobilenet_v2::MobileNetV2Config;
use deep_pipelines::models::mobilenet_v3::MobileNetV3Config;
use deep_pipelines::models::resnet::ResNetConfig;
use deep_pipelines::models::squeezenet::SqueezeNetConfig;
use deep_pipelines::models::{Architecture, BurnEngine, Engine, Head, ImageNetwork, load_model_as};
use rayon::prelude::*;

/// The precision the plans multiply in: `ZOO_PRECISION=bfloat16` in the environment, else
/// float32 (the stages' `precision` param).
fn precision() -> Precision {
    let name = std::env::var("ZOO_PRECISION").unwrap_or_else(|_| "float32".into());
    Precision::parse(&name).unwrap_or_else(|| panic!("ZOO_PRECISION={name}: float32 or bfloat16"))
}

/// The zoo's names (torchvision's), input sizes and networks, built on first use.
fn network(name: &str) -> Option<(usize, Arc<dyn ImageNetwork>)> {
    let device = Device::flex();
    fn build<A: Architecture>(a: A, device: &Device) -> Arc<dyn ImageNetwork> {
        inference_network(a.init(device), device, precision())
    }
    Some(match name {
        "efficientnet_lite0" => (
            224,
            load_model_as("EfficientNetLite0", "cpu", None, precision())
                .expect("bundled model loads")
                .network()
                .expect("bundled weights build"),
        ),
        "resnet18" => (224, build(ResNetConfig::resnet18(), &device)),
        "resnet50" => (224, build(ResNetConfig::resnet50(), &device)),
        "mobilenet_v2" => (224, build(MobileNetV2Config::mobilenet_v2(), &device)),
        "mobilenet_v3_large" => (224, build(MobileNetV3Config::large(), &device)),
        "squeezenet1_1" => (224, build(SqueezeNetConfig::squeezenet1_1(), &device)),
        "efficientnet_b0" => (224, build(EfficientNetConfig::b0(), &device)),
        "inception_v3" => (299, build(InceptionV3Config::inception_v3(), &device)),
        _ => return None,
    })
}

const MODELS: &[&str] = &[
    "efficientnet_lite0",
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "squeezenet1_1",
    "efficientnet_b0",
    "inception_v3",
];

/// One forward pass to logits, through the engine the featurizer and predictor run. The engine
/// takes the batch's buffer as the featurizer hands it over: callers copy theirs before timing
/// (a copy ONNX Runtime's timed `run` does not make either).
fn forward(net: &Arc<dyn ImageNetwork>, inputs: Vec<f32>, batch: usize, size: usize) -> Vec<f32> {
    let engine = BurnEngine {
        network: Arc::clone(net),
        device: Device::flex(),
    };
    engine
        .run(inputs, batch, size, Head::Logits)
        .expect("logits")
        .0
}

/// GFLOP/s of a `size`^3 product through the plan's GEMM (weights packed beforehand, as a plan
/// does), blocks of rows split over every thread as the plan splits a convolution's.
fn gemm_gflops(size: usize) -> f64 {
    let a = common::inputs(size * size);
    let weights = gemm::PackedWeights::new(&common::inputs(size * size), size, size);
    let bias = vec![0.0; size];
    let mut c = vec![0.0f32; size * size];
    let rows = 256;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        c.par_chunks_mut(rows * size)
            .enumerate()
            .for_each(|(i, block)| {
                let epilogue = gemm::Epilogue {
                    bias: &bias,
                    residual: None,
                    act: None,
                };
                let m = block.len() / size;
                gemm::multiply(
                    m,
                    &a[i * rows * size..],
                    size,
                    &weights,
                    block,
                    size,
                    epilogue,
                );
            });
        best = best.min(start.elapsed().as_secs_f64());
    }
    2.0 * (size as f64).powi(3) / best / 1e9
}

fn serve() {
    let mut nets = std::collections::HashMap::new();
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["time", name, batch] => {
                let batch: usize = batch.parse().expect("batch");
                let entry = nets
                    .entry(name.to_string())
                    .or_insert_with(|| network(name));
                match entry {
                    Some((size, net)) => {
                        let inputs = common::inputs(batch * 3 * *size * *size);
                        let start = Instant::now();
                        std::hint::black_box(forward(net, inputs, batch, *size));
                        format!("{}", start.elapsed().as_secs_f64())
                    }
                    None => format!("error unknown model {name}"),
                }
            }
            ["gemm", size] => format!("{}", gemm_gflops(size.parse().expect("size"))),
            ["info"] => format!("{:?} {}", kernels::level(), rayon::current_num_threads()),
            _ => format!("error unknown request `{line}`"),
        };
        let mut out = stdout.lock();
        writeln!(out, "{answer}")
            .and_then(|_| out.flush())
            .expect("stdout");
    }
}

fn bench_zoo(c: &mut Criterion) {
    let mut group = c.benchmark_group("zoo");
    group.sample_size(10);
    for name in MODELS {
        let (size, net) = network(name).expect("listed");
        for batch in [8, 32] {
            let inputs = common::inputs(batch * 3 * size * size);
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(format!("{name}_batch{batch}_{size}"), |b| {
                b.iter_batched(
                    || inputs.clone(),
                    |inputs| forward(&net, inputs, batch, size),
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

fn main() {
    if std::env::args().any(|a| a == "--serve") {
        return serve();
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_zoo(&mut criterion);
    criterion.final_summary();
}
