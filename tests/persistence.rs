//! Saving and loading: a fitted [StringIndexer, DeepImageFeaturizer, LogisticRegression]
//! reloaded in a fresh process predicts bit for bit the same; tampered, partial and
//! interrupted saves are refused with an error naming the file.

mod common;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::process::Command;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Float64Type;
use deep_pipelines::persistence::{self, LoadedStage};
use deep_pipelines::prelude::*;

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
        .args(["roundtrip_child_process_entry", "--exact", "--nocapture"])
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
    match persistence::load(&path).unwrap() {
        LoadedStage::Estimator(_) => {}
        LoadedStage::Transformer(_) => panic!("a Pipeline loads as an estimator"),
    }
    // Params survive: refit the loaded pipeline's logistic regression params.
    let saved = persistence::read(&path).unwrap();
    assert_eq!(saved.stages[2].params["regParam"], 1e-3);
    assert_eq!(saved.stages[2].params["standardization"], false);
}
