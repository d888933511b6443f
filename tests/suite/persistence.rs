//! Saving and loading: a fitted [StringIndexer, DeepImageFeaturizer, LogisticRegression]
//! reloaded in a fresh process predicts bit for bit the same; tampered, partial and
//! interrupted saves are refused with an error naming the file. An unfitted pipeline reloads
//! with its params and refits to the same model. Models load from `modelDir` or
//! `$DEEP_PIPELINES_MODEL_DIR`, with a `manifest.json` there overriding the bundled one.

use crate::common;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::process::Command;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Float64Type;
use deep_pipelines::builtin;
use deep_pipelines::persistence::{self, SavedStage};
use deep_pipelines::pipeline::PipelineStage;
use deep_pipelines::prelude::*;
use deep_pipelines::registry::{LoadedStage, PersistedStage, StageRegistry};

const CHILD_MODEL: &str = "DP_TEST_ROUNDTRIP_MODEL";
const CHILD_OUT: &str = "DP_TEST_ROUNDTRIP_OUT";

/// Origin, prediction and the exact bits of every probability, sorted by origin.
async fn prediction_bits(model: &PipelineModel) -> Vec<String> {
    let ctx = SessionContext::new();
    let test = common::images(&ctx, "test", 0.05);
    let out = common::collect(
        model
            .transform(test)
            .unwrap()
            .sort(vec![col("origin").sort(true, false)])
            .unwrap(),
    )
    .await;
    let origins = out.column_by_name("origin").unwrap().as_string::<i32>();
    let predictions = out
        .column_by_name("prediction")
        .unwrap()
        .as_primitive::<Float64Type>();
    let probabilities = out
        .column_by_name("probability")
        .unwrap()
        .as_fixed_size_list();
    (0..out.num_rows())
        .map(|r| {
            let p = probabilities.value(r);
            let bits: Vec<String> = p
                .as_primitive::<Float64Type>()
                .values()
                .iter()
                .map(|v| format!("{:016x}", v.to_bits()))
                .collect();
            format!(
                "{} {} {}",
                origins.value(r),
                predictions.value(r),
                bits.join(",")
            )
        })
        .collect()
}

/// Runs in the child process started by `saved_pipeline_predicts_identically_in_a_fresh_process`:
/// loads the saved model and writes its predictions. Does nothing when run on its own.
#[tokio::test]
async fn roundtrip_child_process_entry() {
    let (Ok(model_dir), Ok(out)) = (std::env::var(CHILD_MODEL), std::env::var(CHILD_OUT)) else {
        return;
    };
    let model = PipelineModel::load(&model_dir).unwrap();
    std::fs::write(out, prediction_bits(&model).await.join("\n")).unwrap();
}

#[tokio::test]
async fn saved_pipeline_predicts_identically_in_a_fresh_process() {
    let model = common::fitted_example().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model");
    model.save(&path).unwrap();
    let expected = prediction_bits(&model).await;
    assert!(expected.len() >= 20, "{} test rows", expected.len());

    let out = dir.path().join("child.txt");
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "persistence::roundtrip_child_process_entry",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD_MODEL, &path)
        .env(CHILD_OUT, &out)
        .status()
        .unwrap();
    assert!(status.success());
    let reloaded = std::fs::read_to_string(&out).unwrap();
    let reloaded: Vec<&str> = reloaded.lines().collect();
    assert_eq!(reloaded, expected, "predictions after reload differ");

    // The layout is Spark's: metadata per stage, stages/<idx>_<uid>, model data in safetensors.
    let stages: Vec<String> = std::fs::read_dir(path.join("stages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(stages.len(), 3, "{stages:?}");
    let lr_dir = stage_dir(&path, "2_");
    assert!(lr_dir.join("data/model.safetensors").is_file());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lr_dir.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["class"], "deep_pipelines.LogisticRegressionModel");
    assert_eq!(meta["paramMap"]["regParam"], 1e-3);
    assert_eq!(meta["defaultParamMap"]["regParam"], 0.0);
    assert_eq!(meta["libraryVersion"], env!("CARGO_PKG_VERSION"));
}

fn stage_dir(model: &Path, prefix: &str) -> PathBuf {
    std::fs::read_dir(model.join("stages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn load_error(path: &Path) -> String {
    PipelineModel::load(path).unwrap_err().to_string()
}

#[tokio::test]
async fn tampered_or_partial_saves_are_refused_with_the_file_named() {
    let model = common::fitted_example().await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    model.save(&good).unwrap();
    assert!(PipelineModel::load(&good).is_ok());

    // A featurizer whose weight hash no longer matches the installed model.
    let bad = dir.path().join("weight-hash");
    copy_dir(&good, &bad);
    let meta_path = stage_dir(&bad, "1_").join("metadata.json");
    let meta = std::fs::read_to_string(&meta_path).unwrap();
    let sha = meta
        .split("\"sha256\": \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    std::fs::write(&meta_path, meta.replace(&sha, &"0".repeat(64))).unwrap();
    let err = load_error(&bad);
    assert!(
        err.contains("sha256") && err.contains("EfficientNetLite0"),
        "{err}"
    );

    // Coefficients changed on disk.
    let bad = dir.path().join("coefficients");
    copy_dir(&good, &bad);
    let data = stage_dir(&bad, "2_").join("data/model.safetensors");
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&data, bytes).unwrap();
    let err = load_error(&bad);
    assert!(
        err.contains("model.safetensors") && err.contains("sha256"),
        "{err}"
    );

    // A stage's data file deleted.
    let bad = dir.path().join("deleted-data");
    copy_dir(&good, &bad);
    std::fs::remove_file(stage_dir(&bad, "2_").join("data/model.safetensors")).unwrap();
    let err = load_error(&bad);
    assert!(err.contains("model.safetensors"), "{err}");

    // A stage's metadata deleted.
    let bad = dir.path().join("deleted-stage");
    copy_dir(&good, &bad);
    std::fs::remove_file(stage_dir(&bad, "0_").join("metadata.json")).unwrap();
    let err = load_error(&bad);
    assert!(err.contains("metadata.json"), "{err}");

    // Written by a newer format.
    let bad = dir.path().join("newer");
    copy_dir(&good, &bad);
    let meta = std::fs::read_to_string(bad.join("metadata.json")).unwrap();
    std::fs::write(
        bad.join("metadata.json"),
        meta.replace("\"formatVersion\": 1", "\"formatVersion\": 99"),
    )
    .unwrap();
    let err = load_error(&bad);
    assert!(err.contains("format version 99"), "{err}");

    // A folder whose save never completed (no _SUCCESS), e.g. a crash before the rename.
    let bad = dir.path().join("partial");
    copy_dir(&good, &bad);
    std::fs::remove_file(bad.join("_SUCCESS")).unwrap();
    let err = load_error(&bad);
    assert!(err.contains("incomplete save"), "{err}");

    // Saving over an existing folder needs save_overwrite.
    let err = model.save(&good).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    model.save_overwrite(&good).unwrap();
    assert!(PipelineModel::load(&good).is_ok());
}

/// A stage that cannot be written: stands in for a crash in the middle of a save.
#[derive(Debug)]
struct Unsaveable;

impl Transformer for Unsaveable {
    fn uid(&self) -> &str {
        "Unsaveable_test"
    }
    fn transform(&self, df: DataFrame) -> deep_pipelines::Result<DataFrame> {
        Ok(df)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[tokio::test]
async fn a_save_that_fails_midway_leaves_nothing_loadable() {
    let fitted = common::fitted_example().await;
    let mut stages = fitted.stages().to_vec();
    stages.push(std::sync::Arc::new(Unsaveable));
    let model = PipelineModel::new("PipelineModel_test", stages);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model");
    let err = model.save(&path).unwrap_err().to_string();
    assert!(err.contains("Unsaveable_test"), "{err}");
    assert!(!path.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[tokio::test]
async fn unfitted_pipeline_round_trips_with_params_and_uids() {
    let pipeline = common::example_pipeline();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline");
    pipeline.save(&path).unwrap();
    let loaded = Pipeline::load(&path).unwrap();
    assert_eq!(loaded.uid(), pipeline.uid());
    assert_eq!(loaded.stage_uids(), pipeline.stage_uids());
    // Loading a pipeline as a fitted model is refused.
    let err = PipelineModel::load(&path).unwrap_err().to_string();
    assert!(err.contains("not a PipelineModel"), "{err}");
    match builtin::load(&path).unwrap() {
        LoadedStage::Estimator(_) => {}
        LoadedStage::Transformer(_) => panic!("a Pipeline loads as an estimator"),
    }
    // Params survive, read from the loaded pipeline's own stages: each equals the original's,
    // and the values `common::example_pipeline` sets are there.
    let (original, reloaded) = (pipeline.stages(), loaded.stages());
    assert_eq!(reloaded.len(), 3);
    let indexer =
        |stages: &[PipelineStage]| estimator::<StringIndexer>(&stages[0]).params().clone();
    let featurizer = |stages: &[PipelineStage]| match &stages[1] {
        PipelineStage::Transformer(t) => t
            .as_any()
            .downcast_ref::<DeepImageFeaturizer>()
            .expect("stage 1 is the featurizer")
            .params()
            .clone(),
        PipelineStage::Estimator(e) => panic!("stage 1 is an estimator: {e:?}"),
    };
    let lr =
        |stages: &[PipelineStage]| estimator::<LogisticRegression>(&stages[2]).params().clone();
    assert_eq!(indexer(reloaded), indexer(original));
    assert_eq!(featurizer(reloaded), featurizer(original));
    assert_eq!(lr(reloaded), lr(original));
    let params = indexer(reloaded);
    assert_eq!(
        (
            params.input_col.as_str(),
            params.output_col.as_str(),
            params.string_order_type.as_str()
        ),
        ("label", "labelIndex", "alphabetAsc")
    );
    assert_eq!(featurizer(reloaded).network.model_name, "EfficientNetLite0");
    let params = lr(reloaded);
    assert_eq!(params.reg_param, 1e-3);
    assert!(!params.standardization);
    assert_eq!(params.label_col, "labelIndex");

    // Refitting the loaded pipeline gives the model that fitting the original gives: the same
    // predictions, bit for bit.
    let ctx = SessionContext::new();
    let train = common::images(&ctx, "train", 0.1);
    let from_original = pipeline.fit(&train).await.unwrap();
    let from_loaded = loaded.fit(&train).await.unwrap();
    let expected = prediction_bits(&from_original).await;
    assert!(expected.len() >= 20, "{} test rows", expected.len());
    assert_eq!(prediction_bits(&from_loaded).await, expected);
}

/// The concrete estimator behind a pipeline stage.
fn estimator<T: 'static>(stage: &PipelineStage) -> &T {
    match stage {
        PipelineStage::Estimator(e) => {
            use deep_pipelines::pipeline::AnyEstimator;
            AnyEstimator::as_any(e.as_ref())
                .downcast_ref::<T>()
                .unwrap_or_else(|| {
                    panic!("stage `{}` has another type", AnyEstimator::uid(e.as_ref()))
                })
        }
        PipelineStage::Transformer(t) => panic!("stage `{}` is a transformer", t.uid()),
    }
}

// Where a named model comes from (src/models/mod.rs, `manifest_in`, `LoadedModel::load_from`,
// `load_model_in`), in order:
// 1. A network registered with `register_network` under that name answers first (no folder).
// 2. The model directory: the stage's `modelDir` param when not empty, else the first folder
//    holding the model's sub-folder of `$DEEP_PIPELINES_MODEL_DIR` (when set), `./models` and
//    the folders added with `models::add_model_dir` (`models::model_dirs()`).
// 3. The manifest: `<dir>/<folder>/manifest.json` when that file exists, else the bundled
//    `models/<folder>/manifest.json` (a folder may hold just the weights).
// 4. The weights: `<dir>/<folder>/<manifest's weights.file>`, never the bundled copy, checked
//    against the manifest's sha256 before they are used.
// The tests below check 2 to 4 with a copy of the bundled EfficientNet-Lite0 folder.

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models");
const CHELSEA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/photos/chelsea.png"
);
const CHILD_MODEL_DIR_OUT: &str = "DP_TEST_MODEL_DIR_OUT";

/// The bundled ImageNet class names, index = class.
fn imagenet_names() -> Vec<String> {
    std::fs::read_to_string(format!("{MODELS}/imagenet_classes.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Writes `<dir>/efficientnet_lite0/`: the bundled weights with the classifier bias of class 0
/// (tench) raised by 50, so that class 0 wins on any image, and (with `manifest`) a
/// manifest.json that differs from the bundled one where it shows: input 256 instead of 224
/// (EfficientNet's stride is 32, so the feature map is 1280 x 8 x 8, not 7 x 7), class names
/// from labels.txt (the ImageNet names in upper case), and the changed weights' sha256.
/// Returns the path of the weight file.
fn changed_lite0(dir: &Path, manifest: bool) -> PathBuf {
    use sha2::{Digest, Sha256};
    let folder = dir.join("efficientnet_lite0");
    std::fs::create_dir_all(&folder).unwrap();
    let mut weights =
        std::fs::read(format!("{MODELS}/efficientnet_lite0/weights.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    assert_eq!(header["_fc.bias"]["dtype"], "F32");
    let start = 8 + header_len + header["_fc.bias"]["data_offsets"][0].as_u64().unwrap() as usize;
    let bias = f32::from_le_bytes(weights[start..start + 4].try_into().unwrap());
    weights[start..start + 4].copy_from_slice(&(bias + 50.0).to_le_bytes());
    let path = folder.join("weights.safetensors");
    std::fs::write(&path, &weights).unwrap();
    if manifest {
        let mut m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(format!("{MODELS}/efficientnet_lite0/manifest.json")).unwrap(),
        )
        .unwrap();
        m["input_size"] = 256.into();
        m["feature_map"] = serde_json::json!([1280, 8, 8]);
        m["labels"] = "labels.txt".into();
        m["weights"]["sha256"] = hex::encode(Sha256::digest(&weights)).into();
        std::fs::write(folder.join("manifest.json"), m.to_string()).unwrap();
        let upper: Vec<String> = imagenet_names().iter().map(|n| n.to_uppercase()).collect();
        std::fs::write(folder.join("labels.txt"), upper.join("\n")).unwrap();
    }
    path
}

/// Chelsea's top-k `(class, label, probability)` from `predictor`.
async fn chelsea_top(predictor: DeepImagePredictor) -> Vec<(i32, String, f32)> {
    use datafusion::arrow::array::Array;
    use datafusion::arrow::datatypes::{Float32Type, Int32Type};
    let ctx = SessionContext::new();
    let images = read_images(&ctx, CHELSEA, ReadImagesOptions::default()).unwrap();
    let out = common::collect(predictor.transform(images).unwrap()).await;
    assert_eq!(out.num_rows(), 1);
    let entries = out
        .column_by_name("predicted_labels")
        .unwrap()
        .as_list::<i32>()
        .value(0);
    let entries = entries.as_struct();
    let classes = entries.column(0).as_primitive::<Int32Type>();
    let labels = entries.column(1).as_string::<i32>();
    let probabilities = entries.column(2).as_primitive::<Float32Type>();
    (0..entries.len())
        .map(|i| {
            (
                classes.value(i),
                labels.value(i).to_string(),
                probabilities.value(i),
            )
        })
        .collect()
}

/// Chelsea's features from `featurizer`.
async fn chelsea_features(featurizer: DeepImageFeaturizer) -> Vec<f32> {
    use datafusion::arrow::datatypes::Float32Type;
    let ctx = SessionContext::new();
    let images = read_images(&ctx, CHELSEA, ReadImagesOptions::default()).unwrap();
    let out = common::collect(featurizer.transform(images).unwrap()).await;
    assert_eq!(out.num_rows(), 1);
    let features = out.column_by_name("features").unwrap().as_fixed_size_list();
    features
        .value(0)
        .as_primitive::<Float32Type>()
        .values()
        .to_vec()
}

fn flattened() -> DeepImageFeaturizer {
    DeepImageFeaturizer::new().with_feature_mode("flattened")
}

#[tokio::test]
async fn model_dir_param_gives_the_weights_and_a_manifest_that_overrides_the_bundled_one() {
    let root = tempfile::tempdir().unwrap();
    let changed = root.path().join("changed");
    changed_lite0(&changed, true);
    let changed = changed.to_str().unwrap();

    // The bundled model (README): chelsea is a tiger cat (ImageNet class 282); 1280 x 7 x 7.
    let top = chelsea_top(
        DeepImagePredictor::new()
            .with_model_dir(MODELS)
            .with_top_k(1),
    )
    .await;
    assert_eq!((top[0].0, top[0].1.as_str()), (282, "tiger cat"));
    let bundled = chelsea_features(flattened().with_model_dir(MODELS)).await;
    assert_eq!(bundled.len(), 1280 * 7 * 7);

    // modelDir: its weights (class 0 wins) and its manifest (labels.txt, input 256).
    let top = chelsea_top(
        DeepImagePredictor::new()
            .with_model_dir(changed)
            .with_top_k(3),
    )
    .await;
    assert_eq!((top[0].0, top[0].1.as_str()), (0, "TENCH"), "{top:?}");
    assert!(top[0].2 > 0.99, "{top:?}");
    let names = imagenet_names();
    for (class, label, _) in &top {
        assert_eq!(*label, names[*class as usize].to_uppercase());
    }
    let features = chelsea_features(flattened().with_model_dir(changed)).await;
    assert_eq!(features.len(), 1280 * 8 * 8);

    // A folder holding only weights: the bundled manifest applies, so its sha256 is checked
    // against the file found there, and the changed weights are refused, naming that file.
    let weights_only = root.path().join("weights-only");
    let path = changed_lite0(&weights_only, false);
    let ctx = SessionContext::new();
    let images = read_images(&ctx, CHELSEA, ReadImagesOptions::default()).unwrap();
    // (when the weights load: the first batch)
    let planned = DeepImageFeaturizer::new()
        .with_model_dir(weights_only.to_str().unwrap())
        .transform(images)
        .unwrap();
    let err = planned.collect().await.unwrap_err().to_string();
    let bundled_manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{MODELS}/efficientnet_lite0/manifest.json")).unwrap(),
    )
    .unwrap();
    let bundled_sha = bundled_manifest["weights"]["sha256"].as_str().unwrap();
    assert!(
        err.contains(&path.display().to_string()) && err.contains(bundled_sha),
        "{err}"
    );
    // With the bundled weights there (a hard link, or a copy), it is the bundled model exactly.
    let linked = root.path().join("linked").join("efficientnet_lite0");
    std::fs::create_dir_all(&linked).unwrap();
    let source = format!("{MODELS}/efficientnet_lite0/weights.safetensors");
    let target = linked.join("weights.safetensors");
    if std::fs::hard_link(&source, &target).is_err() {
        std::fs::copy(&source, &target).unwrap();
    }
    let linked = root.path().join("linked");
    let same = chelsea_features(flattened().with_model_dir(linked.to_str().unwrap())).await;
    assert!(same == bundled, "same weights and manifest, other features");
}

/// Runs in the child process started by
/// `model_dir_env_var_gives_the_weights_and_manifest_and_the_param_wins`, whose environment
/// sets $DEEP_PIPELINES_MODEL_DIR: writes what stages without `modelDir` see. Does nothing when
/// run on its own.
#[tokio::test]
async fn model_dir_env_child_process_entry() {
    let Ok(out) = std::env::var(CHILD_MODEL_DIR_OUT) else {
        return;
    };
    let top = chelsea_top(DeepImagePredictor::new().with_top_k(1)).await;
    let from_env = chelsea_features(flattened()).await.len();
    let from_param = chelsea_features(flattened().with_model_dir(MODELS))
        .await
        .len();
    let lines = [
        deep_pipelines::models::model_dir().display().to_string(),
        top[0].0.to_string(),
        top[0].1.clone(),
        from_env.to_string(),
        from_param.to_string(),
    ];
    std::fs::write(out, lines.join("\n")).unwrap();
}

#[tokio::test]
async fn model_dir_env_var_gives_the_weights_and_manifest_and_the_param_wins() {
    // Environment variables are process-wide: the stages run in a child process.
    let root = tempfile::tempdir().unwrap();
    let changed = root.path().join("changed");
    changed_lite0(&changed, true);
    let out = root.path().join("child.txt");
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "persistence::model_dir_env_child_process_entry",
            "--exact",
            "--nocapture",
        ])
        .env(deep_pipelines::models::MODEL_DIR_ENV, &changed)
        .env(CHILD_MODEL_DIR_OUT, &out)
        .status()
        .unwrap();
    assert!(status.success());
    let got = std::fs::read_to_string(&out).unwrap();
    let got: Vec<&str> = got.lines().collect();
    let dir = changed.display().to_string();
    // The changed weights (class 0) and manifest (upper-case labels, 1280 x 8 x 8) from the
    // variable's folder; a `modelDir` param (the bundled folder: 1280 x 7 x 7) wins over it.
    let expected = [dir.as_str(), "0", "TENCH", "81920", "62720"];
    assert_eq!(got, expected);
}

/// Runs in the child process started by
/// `without_model_dir_the_env_var_then_models_then_added_folders_are_searched`, in an empty
/// working directory: writes what a stage without `modelDir` sees before and after the bundled
/// folder is added to the search. Does nothing when run on its own.
#[tokio::test]
async fn model_search_child_process_entry() {
    let Ok(out) = std::env::var(CHILD_MODEL_SEARCH_OUT) else {
        return;
    };
    let before = match DeepImagePredictor::new()
        .transform(read_images(&SessionContext::new(), CHELSEA, Default::default()).unwrap())
    {
        Ok(_) => "loaded".to_string(),
        Err(e) => e.to_string(),
    };
    let dirs: Vec<String> = deep_pipelines::models::model_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    deep_pipelines::models::add_model_dir(std::env::var(CHILD_ADDED_DIR).unwrap());
    let top = chelsea_top(DeepImagePredictor::new().with_top_k(1)).await;
    let lines = [
        before.replace('\n', " "),
        dirs.join(","),
        top[0].0.to_string(),
    ];
    std::fs::write(out, lines.join("\n")).unwrap();
}

const CHILD_MODEL_SEARCH_OUT: &str = "DP_TEST_MODEL_SEARCH_OUT";
const CHILD_ADDED_DIR: &str = "DP_TEST_ADDED_DIR";

/// The search for a model without `modelDir`, in a process whose working directory has no
/// `models/` and whose home is empty: `$DEEP_PIPELINES_MODEL_DIR` (when set), `./models`, the
/// user's data folder, the folders added with `models::add_model_dir` (what the Python package
/// does with the models it ships), then the weights built into the binary.
#[tokio::test]
async fn without_model_dir_the_env_var_then_models_then_added_folders_are_searched() {
    let root = tempfile::tempdir().unwrap();
    let changed = root.path().join("changed");
    changed_lite0(&changed, true);
    let work = root.path().join("work");
    let home = root.path().join("home");
    std::fs::create_dir(&work).unwrap();
    std::fs::create_dir(&home).unwrap();
    let run = |env: Option<&Path>, added: &Path| {
        let out = root.path().join("child.txt");
        let mut child = Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "persistence::model_search_child_process_entry",
                "--exact",
                "--nocapture",
            ])
            .current_dir(&work)
            .env_remove(deep_pipelines::models::MODEL_DIR_ENV)
            .env_remove("XDG_DATA_HOME")
            .env("HOME", &home)
            .env(CHILD_MODEL_SEARCH_OUT, &out)
            .env(CHILD_ADDED_DIR, added);
        if let Some(dir) = env {
            child.env(deep_pipelines::models::MODEL_DIR_ENV, dir);
        }
        assert!(child.status().unwrap().success());
        std::fs::read_to_string(&out).unwrap()
    };
    let user = home.join(".local/share/deep-pipelines/models");
    // No folder has the model: the built-in weights; then an added folder's come first.
    let got = run(None, &changed);
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(got[0], "loaded", "the built-in weights");
    assert_eq!(got[1], format!("models,{}", user.display()));
    assert_eq!(
        got[2], "0",
        "class 0 wins with the added folder's changed weights"
    );
    // The variable's folder comes first: its changed weights win over the added folder's.
    let got = run(Some(&changed), Path::new(MODELS));
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(got[0], "loaded");
    assert_eq!(
        got[1],
        format!("{},models,{}", changed.display(), user.display())
    );
    assert_eq!(got[2], "0", "class 0 wins with the changed weights");
}

/// A user's own stage: adds a constant column. It saves its value in `extra` and, registered,
/// loads back (a dotted class name keeps it out of the library's namespace).
#[derive(Debug, Clone)]
struct AddConstant {
    uid: String,
    value: f64,
}

impl Transformer for AddConstant {
    fn uid(&self) -> &str {
        &self.uid
    }
    fn transform(&self, df: DataFrame) -> deep_pipelines::Result<DataFrame> {
        Ok(df.with_column("constant", lit(self.value))?)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn save_stage(&self) -> deep_pipelines::Result<SavedStage> {
        Ok(SavedStage::new(Self::CLASS, &self.uid)
            .with_extra(serde_json::json!({ "value": self.value })))
    }
}

impl PersistedStage for AddConstant {
    const CLASS: &'static str = "tests.AddConstant";

    fn restore(saved: &SavedStage, _: &StageRegistry) -> deep_pipelines::Result<Self> {
        Ok(AddConstant {
            uid: saved.uid.clone(),
            value: saved.extra_field("value")?,
        })
    }

    fn into_stage(self) -> LoadedStage {
        LoadedStage::Transformer(std::sync::Arc::new(self))
    }
}

#[tokio::test]
async fn a_user_defined_stage_saves_and_loads_through_an_extended_registry() {
    let stage = AddConstant {
        uid: "AddConstant_test".into(),
        value: 2.5,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stage");
    persistence::save(&stage.save_stage().unwrap(), &path, false).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["class"], "tests.AddConstant");

    // The built-in registry does not know it; one extended with it does.
    let err = builtin::load(&path).unwrap_err().to_string();
    assert!(err.contains("unknown class `tests.AddConstant`"), "{err}");
    assert!(err.contains("register"), "{err}");
    let extended = StageRegistry::builtin().register::<AddConstant>();
    let loaded: AddConstant = extended.load_transformer_as(&path).unwrap();
    assert_eq!(
        (loaded.uid.as_str(), loaded.value),
        ("AddConstant_test", 2.5)
    );

    // Inside a fitted pipeline, beside built-in stages.
    let indexer = StringIndexerModel::from_labels(
        deep_pipelines::feature::StringIndexerParams::default(),
        vec!["a".into(), "b".into()],
    )
    .unwrap();
    let model = PipelineModel::new(
        "PipelineModel_user",
        vec![std::sync::Arc::new(indexer), std::sync::Arc::new(stage)],
    );
    let model_path = dir.path().join("model");
    model.save(&model_path).unwrap();
    let err = PipelineModel::load(&model_path).unwrap_err().to_string();
    assert!(err.contains("unknown class `tests.AddConstant`"), "{err}");
    let reloaded = PipelineModel::load_with(&model_path, &extended).unwrap();
    assert_eq!(reloaded.stage::<AddConstant>().unwrap().value, 2.5);
    assert_eq!(
        reloaded.stage::<StringIndexerModel>().unwrap().labels(),
        ["a", "b"]
    );

    let ctx = SessionContext::new();
    let df = ctx.sql("SELECT 'b' AS label").await.unwrap();
    let out = common::collect(reloaded.transform(df).unwrap()).await;
    let value = |name: &str| {
        out.column_by_name(name)
            .unwrap()
            .as_primitive::<Float64Type>()
            .value(0)
    };
    assert_eq!((value("labelIndex"), value("constant")), (1.0, 2.5));
}
