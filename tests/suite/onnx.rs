//! ONNX model files as networks (`modelFile`): parity with PyTorch on the fixtures of
//! `tests/fixtures/onnx/make_fixtures.py` (a CNN with BatchNorm, a ConvNeXt block in BGR with a
//! fixed batch of 2, a small ViT taking NHWC), hostile model files, saving a pipeline that
//! carries its model, and the command line.

use std::path::{Path, PathBuf};
use std::process::Command;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::Float32Type;
use deep_pipelines::models::load_model_file;
use deep_pipelines::prelude::*;
use serde_json::Value;

use super::common::{cli_binary, collect, max_abs_diff, read_parquet};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/onnx");

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

/// The fixture images in a folder of their own.
fn image_folder(dir: &Path) -> PathBuf {
    let out = dir.join("images");
    std::fs::create_dir_all(&out).unwrap();
    for i in 0..5 {
        let name = format!("img{i}.png");
        std::fs::copy(fixture(&name), out.join(&name)).unwrap();
    }
    out
}

/// Rows of a list column by image name (`img<k>.png`, from `origin`).
fn rows_by_image(batch: &RecordBatch, column: &str) -> Vec<(String, Vec<f32>)> {
    let origin = datafusion::arrow::compute::cast(
        batch.column_by_name("origin").unwrap(),
        &datafusion::arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    let origin = origin.as_string::<i32>();
    let values = batch.column_by_name(column).unwrap();
    let list: Vec<Option<Vec<f32>>> = match values.data_type() {
        datafusion::arrow::datatypes::DataType::FixedSizeList(..) => {
            let l = values.as_fixed_size_list();
            (0..l.len())
                .map(|r| {
                    l.is_valid(r)
                        .then(|| l.value(r).as_primitive::<Float32Type>().values().to_vec())
                })
                .collect()
        }
        _ => {
            let l = values.as_list::<i32>();
            (0..l.len())
                .map(|r| {
                    l.is_valid(r)
                        .then(|| l.value(r).as_primitive::<Float32Type>().values().to_vec())
                })
                .collect()
        }
    };
    let mut rows: Vec<_> = (0..origin.len())
        .map(|r| {
            let name = origin.value(r).rsplit('/').next().unwrap().to_string();
            (name, list[r].clone().expect("no null row"))
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Runs the command line with `args`, which must succeed.
fn run_cli(args: &[&str]) {
    let run = Command::new(cli_binary()).args(args).output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let e: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

#[tokio::test]
async fn onnx_models_match_pytorch_through_the_featurizer_and_predictor() {
    let dir = tempfile::tempdir().unwrap();
    let images = image_folder(dir.path());
    let expected = expected();
    let ctx = SessionContext::new();
    for model in ["cnn_bn", "convnext_block", "tiny_vit"] {
        let want = &expected["models"][model];
        let df = read_images(&ctx, &images, ReadImagesOptions::default()).unwrap();
        let featurizer = DeepImageFeaturizer::new()
            .with_model_file(fixture(&format!("{model}.onnx")))
            .with_batch_size(3);
        let predictor = DeepImagePredictor::new()
            .with_model_file(fixture(&format!("{model}.onnx")))
            .with_decode_predictions(false)
            .with_output_col("probabilities");
        let df = predictor
            .transform(featurizer.transform(df).unwrap())
            .unwrap();
        let batch = collect(df).await;
        let features = rows_by_image(&batch, "features");
        let probabilities = rows_by_image(&batch, "probabilities");
        assert_eq!(features.len(), 5);
        for (k, ((name, ours), (_, probs))) in features.iter().zip(&probabilities).enumerate() {
            assert_eq!(name, &format!("img{k}.png"));
            let diff = max_abs_diff(ours, &floats(&want["pooled"][k]));
            assert!(diff < 1e-4, "{model} {name}: features differ by {diff}");
            let torch = softmax(&floats(&want["logits"][k]));
            let diff = max_abs_diff(probs, &torch);
            assert!(
                diff < 1e-4,
                "{model} {name}: probabilities differ by {diff}"
            );
        }
    }
    // The feature map, flattened.
    let df = read_images(&ctx, &images, ReadImagesOptions::default()).unwrap();
    let featurizer = DeepImageFeaturizer::new()
        .with_model_file(fixture("cnn_bn.onnx"))
        .with_feature_mode("flattened");
    let batch = collect(featurizer.transform(df).unwrap()).await;
    let rows = rows_by_image(&batch, "features");
    for k in 0..2 {
        let want = floats(&expected["models"]["cnn_bn"]["flattened"][k]);
        assert_eq!(rows[k].1.len(), 32 * 16 * 16);
        let diff = max_abs_diff(&rows[k].1, &want);
        assert!(diff < 1e-4, "flattened img{k}: {diff}");
    }
}

#[tokio::test]
async fn a_model_file_without_a_description_is_described_by_its_graph() {
    // Only the .onnx: input size, layout and output widths from the graph, ImageNet
    // preprocessing (resize 73 -> crop 64); the labels' file is not there to name.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bare.onnx");
    std::fs::copy(fixture("tiny_vit.onnx"), &file).unwrap();
    let model = load_model_file(&file, "", "cpu").unwrap();
    let m = &model.manifest;
    assert_eq!((m.input_size, m.feature_dim, m.num_classes), (64, 64, 10));
    assert_eq!(m.input_layout(), deep_pipelines::models::Layout::Nhwc);
    assert_eq!(m.preprocess.resize_shorter_side, 73);
    // modelManifest over it: no resize, so the features are PyTorch's again.
    let overrides = r#"{"preprocess": {"resize_shorter_side": 0}, "name": "vit"}"#;
    let model = load_model_file(&file, overrides, "cpu").unwrap();
    assert_eq!(model.manifest.name, "vit");
    let ctx = SessionContext::new();
    let images = image_folder(dir.path());
    let df = read_images(&ctx, &images, ReadImagesOptions::default()).unwrap();
    let featurizer = DeepImageFeaturizer::new()
        .with_model_file(file.to_str().unwrap())
        .with_model_manifest(overrides);
    let rows = rows_by_image(
        &collect(featurizer.transform(df).unwrap()).await,
        "features",
    );
    let want = floats(&expected()["models"]["tiny_vit"]["pooled"][0]);
    assert!(max_abs_diff(&rows[0].1, &want) < 1e-4);
    // A model file on another device, or a modelManifest alone, is refused with the param.
    let e = load_model_file(&file, "", "wgpu").unwrap_err().to_string();
    assert!(e.contains("cpu"), "{e}");
    use deep_pipelines::params::Params;
    let e = DeepImageFeaturizer::new()
        .with_model_manifest("{}")
        .params()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("modelManifest"), "{e}");
}

/// The error of running the model file `path` described by `overrides` (at planning, or on
/// its first batch: where the file is opened).
async fn run_error_with(path: &Path, overrides: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let images = image_folder(dir.path());
    let ctx = SessionContext::new();
    let df = read_images(&ctx, &images, ReadImagesOptions::default()).unwrap();
    let planned = DeepImageFeaturizer::new()
        .with_model_file(path.to_str().unwrap())
        .with_model_manifest(overrides)
        .transform(df);
    match planned {
        Err(e) => e.to_string(),
        Ok(df) => df.collect().await.unwrap_err().to_string(),
    }
}

/// [`run_error_with`] a description that needs nothing from the graph.
async fn run_error(path: &Path) -> String {
    let overrides = r#"{"input_size": 64, "feature_dim": 4, "num_classes": 0,
        "onnx": {"features": "features"}}"#;
    run_error_with(path, overrides).await
}

#[tokio::test]
async fn hostile_model_files_are_refused_naming_the_file_and_opening_nothing_outside() {
    let hostile = Path::new(FIXTURES).join("hostile");
    for (file, why) in [
        ("truncated.onnx", "truncated"),
        ("garbage.onnx", "not a valid ONNX file"),
        ("absurd_dims.onnx", "over the"),
        (
            "external_outside.onnx",
            "external data must be a file in the model's folder",
        ),
        (
            "external_absolute.onnx",
            "external data must be a file in the model's folder",
        ),
        ("text_input.onnx", "not an image model"),
    ] {
        let e = run_error(&hostile.join(file)).await;
        assert!(e.contains(file), "{file}: the error names no file: {e}");
        assert!(e.contains(why), "{file}: expected `{why}` in: {e}");
    }
    // A link in the model's folder leading out of it is refused too.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("models");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        hostile.join("external_inside.onnx"),
        model.join("linked.onnx"),
    )
    .unwrap();
    std::fs::write(dir.path().join("secret.bin"), [0u8; 48]).unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("secret.bin"),
        model.join("external_inside.bin"),
    )
    .unwrap();
    let e = run_error(&model.join("linked.onnx")).await;
    assert!(e.contains("outside the model's folder"), "{e}");
    // External data inside the folder is a model like any other.
    let inside = load_model_file(
        &hostile.join("external_inside.onnx"),
        r#"{"input_size": 64}"#,
        "cpu",
    )
    .unwrap();
    let out = inside.features(vec![0.5; 3 * 64 * 64], 1).unwrap();
    assert_eq!(out.len(), 4);
    // Labels named outside the folder are refused before anything is read.
    let e = load_model_file(
        &Path::new(FIXTURES).join("cnn_bn.onnx"),
        r#"{"labels": "../../Cargo.toml"}"#,
        "cpu",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("must be a file in the model's folder"), "{e}");
    // A description whose sha256 is not the file's.
    let e = run_error_with(
        &Path::new(FIXTURES).join("cnn_bn.onnx"),
        r#"{"weights": {"sha256": "00"}}"#,
    )
    .await;
    assert!(e.contains("sha256"), "{e}");
}

#[tokio::test]
async fn a_saved_pipeline_carries_its_model_file_and_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let images = image_folder(dir.path());
    // The model in a folder that is gone once the pipeline is saved.
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    for f in ["convnext_block.onnx", "convnext_block.json", "labels.txt"] {
        std::fs::copy(fixture(f), source.join(f)).unwrap();
    }
    let featurizer = DeepImageFeaturizer::new()
        .with_model_file(source.join("convnext_block.onnx").to_str().unwrap());
    let model = PipelineModel::new("onnx", vec![std::sync::Arc::new(featurizer)]);
    let saved = dir.path().join("saved");
    model.save(&saved).unwrap();
    std::fs::remove_dir_all(&source).unwrap();

    let loaded = PipelineModel::load(&saved).unwrap();
    let ctx = SessionContext::new();
    let df = read_images(&ctx, &images, ReadImagesOptions::default()).unwrap();
    let rows = rows_by_image(&collect(loaded.transform(df).unwrap()).await, "features");
    let want = floats(&expected()["models"]["convnext_block"]["pooled"][3]);
    assert!(max_abs_diff(&rows[3].1, &want) < 1e-4);

    // In a fresh process: the command line applies the saved pipeline.
    let out = dir.path().join("out.parquet");
    run_cli(&[
        "apply",
        saved.to_str().unwrap(),
        images.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let rows = rows_by_image(&read_parquet(&out).await, "features");
    assert!(max_abs_diff(&rows[3].1, &want) < 1e-4);

    // A model file changed after saving is refused on load.
    let file = std::fs::read_dir(saved.join("stages"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("data/model.onnx");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let e = PipelineModel::load(&saved).unwrap_err().to_string();
    assert!(e.contains("sha256"), "{e}");
}

#[test]
fn the_command_line_featurizes_with_a_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let images = image_folder(dir.path());
    let out = dir.path().join("features.parquet");
    run_cli(&[
        "featurize",
        images.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--model-file",
        &fixture("tiny_vit.onnx"),
    ]);
    let batch = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(read_parquet(&out));
    let rows = rows_by_image(&batch, "features");
    let want = floats(&expected()["models"]["tiny_vit"]["pooled"][2]);
    assert!(max_abs_diff(&rows[2].1, &want) < 1e-4);
}

#[tokio::test]
async fn sql_runs_a_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let images = image_folder(dir.path());
    let ctx = SessionContext::new();
    deep_pipelines::register_images_table(&ctx, "photos", &images, ReadImagesOptions::default())
        .unwrap();
    let featurizer = DeepImageFeaturizer::new().with_model_file(fixture("cnn_bn.onnx"));
    deep_pipelines::sql::register_featurizer(&ctx, "embed", &featurizer).unwrap();
    let df = ctx
        .sql("SELECT origin, embed(image) AS features FROM photos")
        .await
        .unwrap();
    let rows = rows_by_image(&collect(df).await, "features");
    let want = floats(&expected()["models"]["cnn_bn"]["pooled"][1]);
    assert!(max_abs_diff(&rows[1].1, &want) < 1e-4);
}
