//! Featurizer throughput: EfficientNet-Lite0, batch 32, 224x224, on the CPU (flex) device, as
//! the featurizer runs it (BatchNorm folded into the convolutions) and as loaded (BatchNorm
//! layers kept), side by side: the ratio is what the folding buys for one forward pass.
//! `cargo bench --bench featurizer`

use burn::prelude::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deep_pipelines::models::efficientnet_lite::{EfficientNetLiteConfig, WEIGHT_NAME_MAP};
use deep_pipelines::models::{load_model, load_safetensors, manifest};

fn bench_featurizer(c: &mut Criterion) {
    let model = load_model("EfficientNetLite0", "cpu").expect("bundled model loads");
    let batch = 32;
    // Deterministic inputs in the network's normalised range.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let inputs: Vec<f32> = (0..batch * 3 * 224 * 224)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 256) as f32 / 128.0 - 1.0
        })
        .collect();

    let device = Device::flex();
    let (m, dir) = manifest("EfficientNetLite0").expect("bundled manifest");
    let mut unfolded = EfficientNetLiteConfig::lite0().init(&device);
    load_safetensors(
        &mut unfolded,
        &dir.join(&m.weights.file),
        WEIGHT_NAME_MAP,
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
        b.iter(|| unfolded.features(input()).into_data())
    });
    group.finish();
}

criterion_group!(benches, bench_featurizer);
criterion_main!(benches);
