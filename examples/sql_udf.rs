//! A fitted pipeline as a SQL function: register the test images as a table, the model as
//! `classify`, query it, and write the predictions to Parquet.
//!
//! Run: `cargo run --release --example sql_udf`

use std::time::Instant;

use datafusion::dataframe::DataFrameWriteOptions;
use deep_pipelines::prelude::*;

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/fashion-mnist-small"
);

#[tokio::main]
async fn main() -> deep_pipelines::Result<()> {
    run().await.map(|_| ())
}

/// What the example counted; `tests/suite/readme.rs` checks README's "once per row" against it.
pub struct Report {
    /// Rows the materialised query returned.
    pub rows: usize,
    /// Images the network processed for them.
    pub forward_passes: u64,
}

/// Fits the example pipeline, queries it with SQL, writes the predictions to Parquet.
pub async fn run() -> deep_pipelines::Result<Report> {
    let ctx = SessionContext::new();
    let options = ReadImagesOptions::default().with_label_from_folder(true);
    let train = read_images(&ctx, format!("{DATA}/train"), options.clone())?;

    println!(
        "fitting [StringIndexer, DeepImageFeaturizer(EfficientNetLite0), LogisticRegression] on train/ ..."
    );
    let started = Instant::now();
    // A clone shares the stage's forward counter, so it counts what the SQL function runs.
    let featurizer = DeepImageFeaturizer::new();
    let model = Pipeline::new()
        .with_estimator(
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("labelIndex")
                .with_string_order_type("alphabetAsc"),
        )
        .with_transformer(featurizer.clone())
        .with_estimator(
            LogisticRegression::new()
                .with_label_col("labelIndex")
                .with_reg_param(1e-3)
                .with_standardization(false)
                .with_max_iter(200),
        )
        .fit(&train)
        .await?;
    println!("fitted in {:.1} s", started.elapsed().as_secs_f64());

    register_images_table(&ctx, "images", format!("{DATA}/test"), options)?;
    register_model(&ctx, "classify", &model)?;

    // Two fields of one call: the function runs once per row (`register_model` sets the session
    // up for it), whatever fields a query reads.
    let query = "SELECT origin, label, classify(image)['label'] AS predicted, \
                 classify(image)['probability'] AS probability FROM images \
                 WHERE label IN ('bag', 'sneaker')";
    println!("\n{query}");
    let before = featurizer.images_processed();
    let started = Instant::now();
    // Cached: shown, then written to Parquet, without running the network again.
    let predictions = ctx.sql(query).await?.cache().await?;
    let report = Report {
        rows: predictions.clone().count().await?,
        forward_passes: featurizer.images_processed() - before,
    };
    println!(
        "ran in {:.1} s: {} rows, {} images through the network",
        started.elapsed().as_secs_f64(),
        report.rows,
        report.forward_passes
    );
    predictions.clone().limit(0, Some(6))?.show().await?;

    let summary = "SELECT label, \
                   avg(CASE WHEN classify(image)['label'] = label THEN 1.0 ELSE 0.0 END) AS accuracy, \
                   count(*) AS images FROM images GROUP BY label ORDER BY label";
    println!("\n{summary}");
    ctx.sql(summary).await?.show().await?;

    println!("\nEXPLAIN names the network behind the function:");
    ctx.sql("EXPLAIN SELECT classify(image) FROM images")
        .await?
        .show()
        .await?;

    let out = std::env::temp_dir().join("deep_pipelines_predictions.parquet");
    predictions
        .write_parquet(
            &out.to_string_lossy(),
            DataFrameWriteOptions::new().with_single_file_output(true),
            None,
        )
        .await?;
    println!("predictions written to {}", out.display());
    Ok(report)
}
