//! Helpers shared by the integration tests: the bundled data and the example pipeline.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use deep_pipelines::prelude::*;
use safetensors::SafeTensors;

pub const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/fashion-mnist-small"
);

/// The `deep-pipelines` binary of this build (the `cli/` member, built by the same `cargo test`
/// into the folder above this test binary's `deps/`).
pub fn cli_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(format!("deep-pipelines{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not found: run the tests with `cargo test --release` at the workspace root (it builds \
         the command line too), or `cargo build --release -p deep-pipelines-cli` first",
        bin.display()
    );
    bin
}

/// A deterministic sample of the bundled `train` or `test` images, labelled by folder.
pub fn images(ctx: &SessionContext, split: &str, ratio: f64) -> DataFrame {
    let options = ReadImagesOptions::default()
        .with_label_from_folder(true)
        .with_sample(ratio, 7);
    read_images(ctx, format!("{DATA}/{split}"), options).unwrap()
}

/// `[StringIndexer, DeepImageFeaturizer(EfficientNetLite0), LogisticRegression]`.
pub fn example_pipeline() -> Pipeline {
    Pipeline::new()
        .with_estimator(
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("labelIndex")
                .with_string_order_type("alphabetAsc"),
        )
        .with_transformer(DeepImageFeaturizer::new())
        .with_estimator(
            LogisticRegression::new()
                .with_label_col("labelIndex")
                .with_reg_param(1e-3)
                .with_standardization(false),
        )
}

/// [`example_pipeline`] fitted on a 10% sample of the bundled training images.
pub async fn fitted_example() -> PipelineModel {
    let ctx = SessionContext::new();
    example_pipeline()
        .fit(&images(&ctx, "train", 0.1))
        .await
        .unwrap()
}

pub async fn collect(df: DataFrame) -> RecordBatch {
    let batches = df.collect().await.unwrap();
    datafusion::arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// A Parquet file (or folder) read back whole.
pub async fn read_parquet(path: &Path) -> RecordBatch {
    let ctx = SessionContext::new();
    let df = ctx
        .read_parquet(path.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    collect(df).await
}

/// Every f32 tensor of a safetensors file: name -> (shape, values).
pub fn read_tensors(path: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `n` images of each class of the bundled `split`, copied into `dir/split` (same layout).
pub fn few_per_class(dir: &Path, split: &str, n: usize) -> PathBuf {
    let out = dir.join(split);
    for class in std::fs::read_dir(format!("{}/{split}", DATA)).unwrap() {
        let class = class.unwrap().path();
        let target = out.join(class.file_name().unwrap());
        std::fs::create_dir_all(&target).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&class)
            .unwrap()
            .map(|f| f.unwrap().path())
            .collect();
        files.sort();
        for file in files.iter().take(n) {
            std::fs::copy(file, target.join(file.file_name().unwrap())).unwrap();
        }
    }
    out
}
