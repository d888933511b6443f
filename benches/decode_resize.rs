//! Decode + resize + crop + normalise throughput on camera-sized JPEGs (12 MP, generated
//! deterministically), i.e. the CPU work the featurizer does per image before the network.
//! `cargo bench --bench decode_resize`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deep_pipelines::image::{DecodeLimits, decode_rgb8};
use deep_pipelines::models::manifest;
use deep_pipelines::preprocess::preprocess;

/// A 4032x3024 JPEG (quality 90) with smooth gradients plus texture, like a photo.
fn camera_jpeg(seed: u32) -> Vec<u8> {
    let (w, h) = (4032, 3024);
    let mut state = seed.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 24) as u8;
        image::Rgb([
            ((x * 255 / w) as u8).saturating_add(noise),
            ((y * 255 / h) as u8).saturating_add(noise / 2),
            (((x + y + seed) / 16 % 256) as u8).saturating_add(noise),
        ])
    });
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    img.write_with_encoder(encoder).expect("encode JPEG");
    out
}

fn bench_decode_resize(c: &mut Criterion) {
    let jpegs: Vec<Vec<u8>> = (0..3).map(camera_jpeg).collect();
    let (manifest, _) = manifest("EfficientNetLite0").expect("bundled manifest");
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("decode_resize");
    group.sample_size(10);
    group.throughput(Throughput::Elements(jpegs.len() as u64));
    group.bench_function("jpeg_4032x3024_to_224_input", |b| {
        b.iter(|| {
            for jpeg in &jpegs {
                let rgb = decode_rgb8(jpeg, "bench.jpg", &limits).expect("rgb");
                preprocess(&rgb, &manifest).expect("preprocess");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decode_resize);
criterion_main!(benches);
