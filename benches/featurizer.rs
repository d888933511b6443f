//! Featurizer throughput: EfficientNet-Lite0, batch 32, 224x224, on the CPU (flex) device.
//! `cargo bench --bench featurizer`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deep_pipelines::models::load_model;

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
    let mut group = c.benchmark_group("featurizer");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("efficientnet_lite0_batch32_224", |b| {
        b.iter(|| model.features(inputs.clone(), batch).expect("forward pass"))
    });
    group.finish();
}

criterion_group!(benches, bench_featurizer);
criterion_main!(benches);
