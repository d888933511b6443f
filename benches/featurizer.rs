//! Featurizer throughput: EfficientNet-Lite0, batch 32, 224x224, on the CPU (flex) device, as
//! the featurizer runs it (BatchNorm folded into the convolutions) and as loaded (BatchNorm
//! layers kept), side by side: the ratio is what the folding buys for one forward pass.
//! `cargo bench --bench featurizer`

mod common;

use burn::prelude::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deep_pipelines::models::efficientnet_lite::EfficientNetLiteConfig;
use deep_pipelines::models::{Architecture, ImageNetwork, load_model, load_safetensors, manifest};

fn bench_featurizer(c: &mut Criterion) {
    let model = load_model("EfficientNetLite0", "cpu").expect("bundled model loads");
    let batch = 32;
    let inputs = common::inputs(batch * 3 * 224 * 224);

    let device = Device::flex();
    let (m, dir) = manifest("EfficientNetLite0").expect("bundled manifest");
    let lite0 = EfficientNetLiteConfig::lite0();
    let mut unfolded = lite0.init(&device);
    load_safetensors(
        &mut unfolded,
        &dir.join(&m.weights.file),
        &lite0.weight_names().0,
        &m.name,
    )
    .expect("weights load");
    let input = || {
        Tensor::<4>::from_data(
            TensorData::new(inputs.clone(), [batch, 3, 224, 224]),
            &device,
        )
    };

    let mut group = c.benchmark_group("featurizer");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("efficientnet_lite0_batch32_224_folded_bn", |b| {
        b.iter(|| model.features(inputs.clone(), batch).expect("forward pass"))
    });
    group.bench_function("efficientnet_lite0_batch32_224_batchnorm_layers", |b| {
        b.iter(|| unfolded.features(unfolded.feature_map(input())).into_data())
    });
    group.finish();
}

criterion_group!(benches, bench_featurizer);
criterion_main!(benches);
