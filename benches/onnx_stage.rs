//! An ONNX model file through our stage's engine against the same network built in, and against
//! ONNX Runtime's own Python session: driven by `benches/onnx_resnet50.py`, which exports a
//! seeded random torchvision ResNet-50 (`.pth` + `.onnx`, neither committed) and runs
//!
//! `cargo bench --bench onnx_stage -- <model_dir> <file.onnx> <photo>...`
//!
//! This prints one JSON line: the largest |logit| difference, on the photos, between the ONNX
//! stage and our built-in ResNet-50 loaded from `<model_dir>/resnet50/` (the `.pth`). It then
//! answers one request per line on stdin, so the script can interleave it with ONNX Runtime's
//! Python session: `time <batch>` prints the seconds of one forward pass (preprocessed input to
//! logits) through the model file's `LoadedModel`, the path a stage's batches take.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use deep_pipelines::image::{DecodeLimits, decode_rgb8};
use deep_pipelines::models::{LoadedModel, load_model_file, load_model_in};
use deep_pipelines::preprocess::preprocess;

fn inputs(model: &LoadedModel, photos: &[String]) -> Vec<f32> {
    photos
        .iter()
        .flat_map(|p| {
            let bytes = std::fs::read(p).expect("photo");
            let rgb = decode_rgb8(&bytes, p, &DecodeLimits::default()).expect("decodes");
            preprocess(&rgb, &model.manifest).expect("preprocesses")
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [model_dir, file, photos @ ..] = args.as_slice() else {
        eprintln!("usage: cargo bench --bench onnx_stage -- <model_dir> <file.onnx> <photo>...");
        return;
    };
    let built_in = load_model_in("ResNet50", "cpu", Some(Path::new(model_dir))).expect("ResNet50");
    let onnx = load_model_file(Path::new(file), "", "cpu").expect("model file");
    let n = photos.len();
    let ours = built_in
        .logits(inputs(&built_in, photos), n)
        .expect("built-in logits");
    let theirs = onnx.logits(inputs(&onnx, photos), n).expect("ONNX logits");
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = ours.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    println!(
        "{{\"photos\": {n}, \"max_abs_logit_diff\": {diff}, \"max_abs_logit\": {scale}, \"threads\": {}}}",
        rayon::current_num_threads()
    );
    std::io::stdout().flush().unwrap();
    let size = onnx.manifest.input_size as usize;
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let Some(batch) = line
            .strip_prefix("time ")
            .and_then(|b| b.trim().parse().ok())
        else {
            break;
        };
        let input: Vec<f32> = (0..batch * 3 * size * size)
            .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
            .collect();
        let started = Instant::now();
        onnx.logits(input, batch).expect("forward");
        println!("{}", started.elapsed().as_secs_f64());
        std::io::stdout().flush().unwrap();
    }
}
