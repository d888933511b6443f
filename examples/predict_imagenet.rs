//! ImageNet predictions with `DeepImagePredictor`: the top-5 classes of each photo in a folder,
//! with each bundled EfficientNet-Lite, as a DataFrame and from SQL.
//!
//! Run: `cargo run --release --example predict_imagenet [folder]` (default: the two test photos)

use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::util::pretty::print_batches;
use datafusion::functions::core::expr_ext::FieldAccessor;
use deep_pipelines::prelude::*;

#[tokio::main]
async fn main() -> deep_pipelines::Result<()> {
    let folder = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/photos").to_string()
    });
    let ctx = SessionContext::new();
    let images = read_images(&ctx, &folder, ReadImagesOptions::default())?;

    for model in [
        "EfficientNetLite0",
        "EfficientNetLite1",
        "EfficientNetLite2",
    ] {
        let started = Instant::now();
        let predictor = DeepImagePredictor::new()
            .with_model_name(model)
            .with_top_k(3);
        let predictions = predictor
            .transform(images.clone())?
            .select(vec![
                col("image").field("origin").alias("origin"),
                col("predicted_labels"),
            ])?
            .sort_by(vec![col("origin")])?
            .collect()
            .await?;
        println!("{model} ({:.1} s):", started.elapsed().as_secs_f64());
        print_batches(&predictions)?;
    }

    // The same predictor as a SQL function: the top class of each photo.
    let predictor = DeepImagePredictor::new().with_top_k(1);
    let model = PipelineModel::new("top1", vec![Arc::new(predictor)]);
    register_model(&ctx, "top1", &model)?;
    register_images_table(&ctx, "photos", &folder, ReadImagesOptions::default())?;
    let sql = "SELECT image.origin AS origin, top1(image)[1]['label'] AS label \
               FROM photos ORDER BY origin";
    println!("{sql}");
    print_batches(&ctx.sql(sql).await?.collect().await?)?;
    Ok(())
}
