//! Does decoding overlap the network? Three rates over the same folder of 640x480 JPEGs, each
//! measured alone, in one run:
//! - decode + resize only: the folder scan and the featurizer's preprocessing, with a network
//!   that costs nothing (the channel means);
//! - network only: EfficientNet-Lite0 forward passes (batch 32) on ready inputs;
//! - end to end: `read_images` -> `DeepImageFeaturizer` (EfficientNet-Lite0), as the CLI runs it.
//!
//! With overlap, end to end approaches the slower of the two; run one after the other it would
//! be 1 / (1/decode + 1/network). Prints the rates and end-to-end / min(decode, network).
//!
//! `cargo bench --bench overlap` (env `OVERLAP_IMAGES`, default 384; `OVERLAP_ROUNDS`, default 2:
//! the best round of each is kept).

use std::sync::Arc;
use std::time::Instant;

use burn::prelude::{Device, Tensor};
use deep_pipelines::models::{ImageNetwork, load_model, manifest, register_network};
use deep_pipelines::prelude::*;

mod common;

/// A 640x480 JPEG (quality 90): smooth gradients plus texture, like a photo.
fn photo_jpeg(seed: u32) -> Vec<u8> {
    let (w, h) = (640, 480);
    let mut state = seed.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 24) as u8;
        image::Rgb([
            ((x * 255 / w) as u8).saturating_add(noise),
            ((y * 255 / h) as u8).saturating_add(noise / 2),
            (((x + y + seed * 7) / 16 % 256) as u8).saturating_add(noise),
        ])
    });
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    img.write_with_encoder(encoder).expect("encode JPEG");
    out
}

/// The mean of each input channel: a network whose cost is nil next to preprocessing.
#[derive(Debug)]
struct ChannelMeans;

impl ImageNetwork for ChannelMeans {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let [n, c, _, _] = input.dims();
        input.mean_dim(3).mean_dim(2).reshape([n, c, 1, 1])
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        let [n, c, _, _] = map.dims();
        Some(map.reshape([n, c]))
    }
}

/// Images per second of featurizing the folder with `featurizer` (all rows collected).
fn featurize_rate(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    featurizer: &DeepImageFeaturizer,
    images: usize,
) -> f64 {
    let started = Instant::now();
    let rows = runtime.block_on(async {
        let ctx = SessionContext::new();
        let df = read_images(&ctx, dir, ReadImagesOptions::default()).expect("read_images");
        let out = featurizer.transform(df).expect("transform");
        let batches = out
            .select_columns(&["features"])
            .expect("select")
            .collect()
            .await
            .expect("collect");
        batches.iter().map(|b| b.num_rows()).sum::<usize>()
    });
    assert_eq!(rows, images);
    images as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let count: usize = std::env::var("OVERLAP_IMAGES").map_or(384, |v| v.parse().expect("a count"));
    let rounds: usize = std::env::var("OVERLAP_ROUNDS").map_or(2, |v| v.parse().expect("a count"));
    let dir = tempfile::tempdir().expect("temp dir");
    let jpegs: Vec<Vec<u8>> = (0..16).map(photo_jpeg).collect();
    for i in 0..count {
        std::fs::write(
            dir.path().join(format!("{i:05}.jpg")),
            &jpegs[i % jpegs.len()],
        )
        .expect("write JPEG");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{count} JPEGs of 640x480 in {}, {cores} cores, batch 32",
        dir.path().display()
    );

    let (mut means, _) = manifest("EfficientNetLite0").expect("bundled manifest");
    means.name = "ChannelMeans".into();
    means.architecture = "custom".into();
    means.feature_dim = 3;
    means.feature_map = [3, 1, 1];
    means.num_classes = 3;
    means.labels = None;
    register_network(means, Arc::new(ChannelMeans), &Device::flex()).expect("register");
    let preprocess_only = DeepImageFeaturizer::new().with_model_name("ChannelMeans");
    let end_to_end = DeepImageFeaturizer::new();
    let model = load_model("EfficientNetLite0", "cpu").expect("EfficientNetLite0 weights");
    let input_len = 3 * 224 * 224;
    let batch = 32;
    let inputs = common::inputs(batch * input_len);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let (mut decode, mut network, mut both) = (0.0f64, 0.0f64, 0.0f64);
    for round in 1..=rounds {
        let d = featurize_rate(&runtime, dir.path(), &preprocess_only, count);
        let started = Instant::now();
        let mut done = 0;
        while done < count {
            let n = batch.min(count - done);
            model
                .features(inputs[..n * input_len].to_vec(), n)
                .expect("forward");
            done += n;
        }
        let n = count as f64 / started.elapsed().as_secs_f64();
        let e = featurize_rate(&runtime, dir.path(), &end_to_end, count);
        println!(
            "round {round}: decode+resize {d:.1} img/s, network {n:.1} img/s, end to end {e:.1} img/s"
        );
        decode = decode.max(d);
        network = network.max(n);
        both = both.max(e);
    }
    let slower = decode.min(network);
    let serial = 1.0 / (1.0 / decode + 1.0 / network);
    println!("best of {rounds} rounds (img/s):");
    println!("  decode+resize only  {decode:8.1}");
    println!("  network only        {network:8.1}");
    println!("  end to end          {both:8.1}");
    println!("  one after the other would give {serial:.1}");
    println!(
        "end to end / min(decode+resize, network) = {:.3}",
        both / slower
    );
}
