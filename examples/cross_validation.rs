//! Choosing the logistic head's regularisation by 3-fold cross-validation, with the feature
//! cache: the network runs once per training image, not once per fold and param map.
//!
//! Run: `cargo run --release --example cross_validation`

use std::time::Instant;

use deep_pipelines::prelude::*;

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/fashion-mnist-small"
);

#[tokio::main]
async fn main() -> deep_pipelines::Result<()> {
    let ctx = SessionContext::new();
    let options = ReadImagesOptions::default().with_label_from_folder(true);
    let train = read_images(&ctx, format!("{DATA}/train"), options.clone())?;
    let test = read_images(&ctx, format!("{DATA}/test"), options)?;
    let n_train = train.clone().count().await?;

    let lr = LogisticRegression::new()
        .with_label_col("labelIndex")
        .with_standardization(false)
        .with_max_iter(200);
    let lr_uid = Estimator::uid(&lr).to_string();
    // A clone shares the stage's forward counter: it sees what the tuner's copies run.
    let featurizer = DeepImageFeaturizer::new();
    let pipeline = Pipeline::new()
        .with_estimator(
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("labelIndex")
                .with_string_order_type("alphabetAsc"),
        )
        .with_transformer(featurizer.clone())
        .with_estimator(lr);
    let grid = ParamGridBuilder::new()
        .add_grid(&lr_uid, "regParam", [1e-4, 1e-3, 1e-2])
        .add_grid(&lr_uid, "elasticNetParam", [0.0, 0.5])
        .build();
    let accuracy = || {
        MulticlassClassificationEvaluator::new()
            .with_label_col("labelIndex")
            .with_metric_name("accuracy")
    };
    let cv = CrossValidator::new(pipeline, grid, accuracy())
        .with_num_folds(3)
        .with_seed(1)
        .with_parallelism(2);

    println!("3-fold cross-validation of 6 param maps on {n_train} training images (18 fits) ...");
    let started = Instant::now();
    let model = cv.fit(&train).await?;
    println!(
        "done in {:.1} s; images through the network: {} (feature cache: stages {:?})",
        started.elapsed().as_secs_f64(),
        featurizer.images_processed(),
        model.cached_stages()
    );
    for (map, (mean, std)) in model
        .param_maps()
        .iter()
        .zip(model.avg_metrics().iter().zip(model.std_metrics()))
    {
        let values: Vec<String> = map
            .entries()
            .iter()
            .map(|e| format!("{}={}", e.param, e.value))
            .collect();
        println!(
            "  {:<40} mean accuracy {mean:.4} (std {std:.4})",
            values.join(", ")
        );
    }
    println!(
        "best: {} -> {:.4}",
        model.best_param_map(),
        model.best_metric()
    );

    let test_accuracy = accuracy().evaluate(&model.transform(test)?).await?;
    println!("\nchosen model, test accuracy: {test_accuracy:.4}");
    Ok(())
}
