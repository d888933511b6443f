//! Transfer learning on real images with a real pretrained network:
//! Fashion-MNIST folders -> EfficientNet-Lite0 features -> logistic regression.
//!
//! Run: `cargo run --release --example transfer_learning`

use std::time::Instant;

use deep_pipelines::evaluation::confusion_matrix;
use deep_pipelines::prelude::*;

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/fashion-mnist-small"
);

#[tokio::main]
async fn main() -> deep_pipelines::Result<()> {
    run().await.map(|_| ())
}

/// What the example measured; `tests/suite/readme.rs` checks README's figures against it.
pub struct Report {
    pub test_accuracy: f64,
    pub test_images: usize,
}

/// The whole job: fit on `train/`, evaluate on `test/`, print what a user wants to see.
pub async fn run() -> deep_pipelines::Result<Report> {
    let ctx = SessionContext::new();
    let options = ReadImagesOptions::default().with_label_from_folder(true);
    let train = read_images(&ctx, format!("{DATA}/train"), options.clone())?;
    let test = read_images(&ctx, format!("{DATA}/test"), options)?;
    let (n_train, n_test) = (train.clone().count().await?, test.clone().count().await?);
    println!("train: {n_train} images, test: {n_test} images (10 classes, 28x28 grey)");

    let pipeline = Pipeline::new()
        .with_estimator(
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("labelIndex")
                .with_string_order_type("alphabetAsc"),
        )
        .with_transformer(
            DeepImageFeaturizer::new()
                .with_model_name("EfficientNetLite0")
                .with_output_col("features")
                .with_batch_size(32),
        )
        .with_estimator(
            LogisticRegression::new()
                .with_label_col("labelIndex")
                .with_reg_param(1e-3)
                .with_standardization(false)
                .with_max_iter(200),
        );

    println!(
        "fitting [StringIndexer, DeepImageFeaturizer(EfficientNetLite0), LogisticRegression] ..."
    );
    let started = Instant::now();
    let model = pipeline.fit(&train).await?;
    let fit_secs = started.elapsed().as_secs_f64();
    let lr = model
        .stage::<LogisticRegressionModel>()
        .expect("the pipeline has a logistic regression");
    let fitted = lr.fitted();
    println!(
        "fit: {fit_secs:.1} s ({:.1} images/s featurized); logistic regression: {} features, {} iterations, {}, objective {:.5}",
        n_train as f64 / fit_secs,
        lr.num_features(),
        fitted.iterations,
        if fitted.converged {
            "converged"
        } else {
            "stopped at maxIter"
        },
        fitted.objective_history.last().copied().unwrap_or(f64::NAN),
    );

    let labels = model
        .stage::<StringIndexerModel>()
        .expect("the pipeline has a string indexer")
        .labels()
        .to_vec();
    let names = IndexToString::new()
        .with_input_col("prediction")
        .with_output_col("predictedLabel")
        .with_labels(&labels);

    let started = Instant::now();
    // Materialise the predictions once; every metric below reads them.
    let predictions = names.transform(model.transform(test)?)?.cache().await?;
    let predict_secs = started.elapsed().as_secs_f64();
    println!(
        "predict: {predict_secs:.1} s ({:.1} images/s)",
        n_test as f64 / predict_secs
    );

    let metrics = MulticlassClassificationEvaluator::new()
        .with_label_col("labelIndex")
        .evaluate_all(&predictions)
        .await?;
    println!("\ntest accuracy: {:.4}", metrics["accuracy"]);
    println!("test f1 (weighted): {:.4}", metrics["f1"]);
    println!("test logLoss: {:.4}", metrics["logLoss"]);

    let matrix = confusion_matrix(&predictions, "labelIndex", "prediction")
        .await?
        .with_labels(&labels);
    println!("\nconfusion matrix (rows: actual, columns: predicted)\n{matrix}");

    println!("a few test predictions:");
    predictions
        .select(vec![col("origin"), col("label"), ident("predictedLabel")])?
        .limit(0, Some(8))?
        .show()
        .await?;
    println!(
        "\ntotal wall time: {:.1} s for {} images ({:.1} images/s end to end)",
        fit_secs + predict_secs,
        n_train + n_test,
        (n_train + n_test) as f64 / (fit_secs + predict_secs)
    );
    Ok(Report {
        test_accuracy: metrics["accuracy"],
        test_images: n_test,
    })
}
