//! Fine-tuning on real images: the last blocks of EfficientNet-Lite0 train with a new
//! classifier head on the bundled Fashion-MNIST folders (transfer learning gets 0.852 with a
//! logistic regression on the frozen features; see `transfer_learning.rs`).
//!
//! Run: `cargo run --release --example fine_tuning [-- <trainableBlocks> [<seed>]]`

use std::time::Instant;

use deep_pipelines::prelude::*;

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/fashion-mnist-small"
);

#[tokio::main]
async fn main() -> deep_pipelines::Result<()> {
    let blocks = std::env::args()
        .nth(1)
        .map(|b| b.parse().expect("trainableBlocks: a number"))
        .unwrap_or(DEFAULT_BLOCKS);
    let seed = std::env::args()
        .nth(2)
        .map(|s| s.parse().expect("seed: a number"))
        .unwrap_or(DEFAULT_SEED);
    run(blocks, seed).await.map(|_| ())
}

/// The trainableBlocks and seed README reports.
pub const DEFAULT_BLOCKS: usize = 2;
pub const DEFAULT_SEED: u64 = 42;

/// What the example measured.
pub struct Report {
    pub test_accuracy: f64,
    pub test_images: usize,
    pub fit_seconds: f64,
    pub trunk_images: u64,
}

/// Fit on `train/` (the labels indexed alphabetically), evaluate on `test/`.
pub async fn run(trainable_blocks: usize, seed: u64) -> deep_pipelines::Result<Report> {
    let ctx = SessionContext::new();
    let options = ReadImagesOptions::default().with_label_from_folder(true);
    let train = read_images(&ctx, format!("{DATA}/train"), options.clone())?;
    let test = read_images(&ctx, format!("{DATA}/test"), options)?;

    let classifier = DeepImageClassifier::new()
        .with_model_name("EfficientNetLite0")
        .with_label_col("labelIndex")
        .with_trainable_blocks(trainable_blocks)
        .with_seed(seed)
        .with_progress(|epoch| println!("  {epoch}"));
    let pipeline = Pipeline::new()
        .with_estimator(
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("labelIndex")
                .with_string_order_type("alphabetAsc"),
        )
        .with_estimator(classifier.clone());

    println!(
        "fitting [StringIndexer, DeepImageClassifier(EfficientNetLite0, trainableBlocks {trainable_blocks})] ..."
    );
    let started = Instant::now();
    let model = pipeline.fit(&train).await?;
    let fit_seconds = started.elapsed().as_secs_f64();
    let fitted = model
        .stage::<DeepImageClassifierModel>()
        .expect("the pipeline has a classifier");
    let facts = fitted.fit_facts();
    println!(
        "fit: {fit_seconds:.1} s; {} images through the frozen trunk, {} epochs, kept epoch {}",
        classifier.trunk_images(),
        facts.history.len(),
        facts.best_epoch
    );

    let predictions = model.transform(test)?.cache().await?;
    let test_images = predictions.clone().count().await?;
    let accuracy = MulticlassClassificationEvaluator::new()
        .with_label_col("labelIndex")
        .with_metric_name("accuracy")
        .evaluate(&predictions)
        .await?;
    println!("\ntest accuracy: {accuracy:.4} ({test_images} images)");
    Ok(Report {
        test_accuracy: accuracy,
        test_images,
        fit_seconds,
        trunk_images: classifier.trunk_images(),
    })
}
