//! README's promises under test: every ```rust block of README.md is pasted below verbatim
//! (`readme_code_blocks_are_compiled_here` checks that, so an edited README that no longer
//! compiles fails), the main example reaches the accuracy README states, and the SQL example
//! runs the network once per row.

#[allow(dead_code)]
#[path = "../../examples/transfer_learning.rs"]
mod transfer_learning;

#[allow(dead_code)]
#[path = "../../examples/sql_udf.rs"]
mod sql_udf;

#[allow(dead_code)]
#[path = "../../examples/fine_tuning.rs"]
mod fine_tuning;

use datafusion::arrow::datatypes::DataType;
use deep_pipelines::prelude::*;

/// The README's code blocks, each in a function whose arguments are what the block assumes.
/// Functions that need data the README only names (`photos/...`) are compiled, not run.
#[rustfmt::skip]
#[allow(dead_code, unused_variables, unused_imports, clippy::unused_async)]
mod blocks {
    use deep_pipelines::Result;
    use deep_pipelines::prelude::*;

    pub async fn api_tour() -> Result<()> {
        use deep_pipelines::prelude::*;

        let ctx = SessionContext::new();
        let opts = ReadImagesOptions::default().with_label_from_folder(true);
        let train = read_images(&ctx, "photos/train", opts.clone())?;     // lazy: lists files only
        let test = read_images(&ctx, "photos/test", opts)?;

        let pipeline = Pipeline::new()
            .with_estimator(StringIndexer::new().with_input_col("label").with_output_col("labelIndex"))
            .with_transformer(DeepImageFeaturizer::new().with_model_name("EfficientNetLite0"))
            .with_estimator(LogisticRegression::new().with_label_col("labelIndex").with_reg_param(1e-3));
        let model = pipeline.fit(&train).await?;                         // PipelineModel
        let predictions = model.transform(test)?;                        // lazy again
        let f1 = MulticlassClassificationEvaluator::new().with_label_col("labelIndex").evaluate(&predictions).await?;
        Ok(())
    }

    pub fn predicting_imagenet_classes(images: DataFrame) -> Result<DataFrame> {
        use deep_pipelines::prelude::*;
        let predictor = DeepImagePredictor::new()          // modelName defaults to EfficientNetLite0
            .with_model_name("EfficientNetLite0")
            .with_top_k(5);
        let predictions = predictor.transform(images)?;    // adds `predicted_labels`
        Ok(predictions)
    }

    pub fn your_own_network() -> Result<DeepImageFeaturizer> {
        use std::sync::Arc;
        use burn::nn::pool::{AvgPool2d, AvgPool2dConfig};
        use burn::prelude::*;
        use deep_pipelines::models::{ImageNetwork, manifest, register_network};
        use deep_pipelines::prelude::*;

        /// The mean colour of each 32x32 patch: stands in for your own burn layers.
        #[derive(burn::module::Module, Debug)]
        struct MyNet {
            pool: AvgPool2d,
        }

        impl ImageNetwork for MyNet {
            fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
                self.pool.forward(input) // [N, 3, 224, 224] -> [N, 3, 7, 7]
            }
        }

        let my_net = MyNet { pool: AvgPool2dConfig::new([32, 32]).with_strides([32, 32]).init() };
        let (mut m, _) = manifest("ResNet50")?;   // start from a known preprocessing (224 px, ImageNet mean/std)
        m.name = "MyNet".into();
        m.feature_map = [3, 7, 7];                // what feature_map returns for one image
        m.feature_dim = 3;                        // pooled features: the map's mean per channel
        m.num_classes = 0;                        // no logits: a featurizer, not a predictor
        m.labels = None;                          // and so no class names
        register_network(m, Arc::new(my_net), &Device::flex())?;
        let featurizer = DeepImageFeaturizer::new().with_model_name("MyNet");
        Ok(featurizer)
    }

    pub async fn sql(ctx: SessionContext, model: PipelineModel) -> Result<()> {
        use deep_pipelines::prelude::*;

        register_images_table(&ctx, "images", "photos/test", ReadImagesOptions::default())?;
        register_model(&ctx, "classify", &model)?;                        // a fitted PipelineModel
        register_featurizer(&ctx, "embed", &DeepImageFeaturizer::new())?;  // image -> features
        let df = ctx.sql("SELECT origin, classify(image)['label'] AS label FROM images").await?;
        Ok(())
    }

    pub async fn tuning(
        lr: LogisticRegression,
        pipeline: Pipeline,
        evaluator: MulticlassClassificationEvaluator,
        train: DataFrame,
    ) -> Result<()> {
        let grid = ParamGridBuilder::new()
            .add_grid(Estimator::uid(&lr), "regParam", [1e-4, 1e-3, 1e-2])
            .add_grid(Estimator::uid(&lr), "elasticNetParam", [0.0, 0.5])
            .build();
        let cv = CrossValidator::new(pipeline, grid, evaluator).with_num_folds(3);
        let tuned = cv.fit(&train).await?;          // tuned.best_model() is a PipelineModel
        Ok(())
    }

    pub async fn fine_tuning(indexer: StringIndexer, train: DataFrame) -> Result<()> {
        let classifier = DeepImageClassifier::new()
            .with_model_name("EfficientNetLite0")       // EfficientNetLite0/1/2, EfficientNetB0, MobileNetV2
            .with_label_col("labelIndex")
            .with_trainable_blocks(2)                   // the head conv and the last inverted residual
            .with_progress(|epoch| eprintln!("{epoch}"));
        let pipeline = Pipeline::new().with_estimator(indexer).with_estimator(classifier);
        let model = pipeline.fit(&train).await?;        // prediction, probability, rawPrediction
        Ok(())
    }
}

/// Lines of text without indentation or blank lines, so a block indented into a function body
/// still matches the README.
fn normalised(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn readme_code_blocks_are_compiled_here() {
    let readme = include_str!("../../README.md");
    let this_file = normalised(include_str!("readme.rs"));
    let mut blocks = 0;
    let mut rest = readme;
    while let Some(start) = rest.find("```rust\n") {
        let body = &rest[start + "```rust\n".len()..];
        let end = body.find("```").expect("closed code block");
        let block = normalised(&body[..end]);
        assert!(
            this_file
                .windows(block.len())
                .any(|w| w == block.as_slice()),
            "this README block is not compiled by tests/suite/readme.rs; paste it into `mod blocks`:\n{}",
            &body[..end]
        );
        blocks += 1;
        rest = &body[end + 3..];
    }
    assert_eq!(blocks, 6, "README's ```rust blocks");
}

/// The README block for users' own networks registers a network that featurizes real photos.
#[tokio::test]
async fn readme_own_network_block_runs() {
    let featurizer = blocks::your_own_network().unwrap();
    let ctx = SessionContext::new();
    let photos = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/photos");
    let images = read_images(&ctx, photos, ReadImagesOptions::default()).unwrap();
    let batches = featurizer
        .transform(images)
        .unwrap()
        .collect()
        .await
        .unwrap();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 2);
    let features = batches[0].column_by_name("features").unwrap();
    assert!(
        matches!(features.data_type(), DataType::FixedSizeList(_, 3)),
        "{:?}",
        features.data_type()
    );
}

/// README: "test accuracy 0.852" for the main job.
#[tokio::test]
async fn transfer_learning_example_reaches_readme_accuracy() {
    let report = transfer_learning::run().await.unwrap();
    assert_eq!(report.test_images, 500);
    assert!(
        report.test_accuracy >= 0.84,
        "transfer_learning test accuracy {}",
        report.test_accuracy
    );
}

/// README: fine-tuning's test accuracy (0.892 on the 2-core machine; the issue's bar is 0.88).
/// The floor here leaves room for another CPU's float kernels, as the test above does.
#[tokio::test]
async fn fine_tuning_example_beats_the_frozen_features() {
    let report = fine_tuning::run(fine_tuning::DEFAULT_BLOCKS, fine_tuning::DEFAULT_SEED)
        .await
        .unwrap();
    assert_eq!(report.test_images, 500);
    assert_eq!(
        report.trunk_images, 2000,
        "each training image and its mirror, once"
    );
    assert!(
        report.test_accuracy >= 0.87,
        "fine_tuning test accuracy {}",
        report.test_accuracy
    );
}

/// README: the `sql_udf` example "counts 100 forward passes for 100 rows".
#[tokio::test]
async fn sql_example_runs_the_network_once_per_row() {
    let report = sql_udf::run().await.unwrap();
    assert_eq!(report.rows, 100, "bag and sneaker test images");
    assert_eq!(
        report.forward_passes, report.rows as u64,
        "the network must run once per row"
    );
}
