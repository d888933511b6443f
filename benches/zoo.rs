//! Forward-pass throughput of the zoo's architectures: batch 8 at each model's input size to
//! ImageNet logits, on the CPU (flex) device. Random weights for the torchvision architectures
//! (speed does not depend on the values), BatchNorm folded into the convolutions as the
//! featurizer runs them; EfficientNet-Lite0 with its bundled weights.
//! `benches/compare_torchvision.py` runs PyTorch on the same models next to this bench and
//! prints the ratios.
//! `cargo bench --bench zoo`

mod common;

use std::sync::Arc;

use burn::prelude::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deep_pipelines::models::efficientnet::EfficientNetConfig;
use deep_pipelines::models::inception_v3::InceptionV3Config;
use deep_pipelines::models::layers::FoldBatchNorms;
use deep_pipelines::models::mobilenet_v2::MobileNetV2Config;
use deep_pipelines::models::mobilenet_v3::MobileNetV3Config;
use deep_pipelines::models::resnet::ResNetConfig;
use deep_pipelines::models::squeezenet::SqueezeNetConfig;
use deep_pipelines::models::{Architecture, ImageNetwork, load_model};

const BATCH: usize = 8;

fn bench_zoo(c: &mut Criterion) {
    let device = Device::flex();
    let lite0 = load_model("EfficientNetLite0", "cpu").expect("bundled model loads");
    let models: Vec<(&str, usize, Arc<dyn ImageNetwork>)> = vec![
        (
            "resnet18",
            224,
            Arc::new(ResNetConfig::resnet18().init(&device).fold_batch_norms()),
        ),
        (
            "resnet50",
            224,
            Arc::new(ResNetConfig::resnet50().init(&device).fold_batch_norms()),
        ),
        (
            "mobilenet_v2",
            224,
            Arc::new(
                MobileNetV2Config::mobilenet_v2()
                    .init(&device)
                    .fold_batch_norms(),
            ),
        ),
        (
            "mobilenet_v3_large",
            224,
            Arc::new(MobileNetV3Config::large().init(&device).fold_batch_norms()),
        ),
        (
            "squeezenet1_1",
            224,
            Arc::new(
                SqueezeNetConfig::squeezenet1_1()
                    .init(&device)
                    .fold_batch_norms(),
            ),
        ),
        (
            "efficientnet_b0",
            224,
            Arc::new(EfficientNetConfig::b0().init(&device).fold_batch_norms()),
        ),
        ("efficientnet_lite0", 224, Arc::clone(&lite0.network)),
        (
            "inception_v3",
            299,
            Arc::new(
                InceptionV3Config::inception_v3()
                    .init(&device)
                    .fold_batch_norms(),
            ),
        ),
    ];
    let mut group = c.benchmark_group("zoo");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, size, net) in models {
        let inputs = common::inputs(BATCH * 3 * size * size);
        group.bench_function(format!("{name}_batch{BATCH}_{size}"), |b| {
            b.iter(|| {
                let x = Tensor::<4>::from_data(
                    TensorData::new(inputs.clone(), [BATCH, 3, size, size]),
                    &device,
                );
                net.logits(net.feature_map(x))
                    .expect("has a head")
                    .into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_zoo);
criterion_main!(benches);
