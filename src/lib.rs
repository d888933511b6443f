//! # deep-pipelines
//!
//! Deep Learning Pipelines for the Arrow ecosystem: read images into a DataFusion DataFrame,
//! turn a pretrained CNN into a feature extractor, train a classifier on top (transfer
//! learning), and run the fitted pipeline over millions of rows, batch by batch.
//!
//! ```no_run
//! # async fn demo() -> deep_pipelines::Result<()> {
//! use deep_pipelines::prelude::*;
//!
//! let ctx = SessionContext::new();
//! let opts = ReadImagesOptions::default().with_label_from_folder(true);
//! let train = read_images(&ctx, "examples/data/fashion-mnist-small/train", opts.clone())?;
//! let test = read_images(&ctx, "examples/data/fashion-mnist-small/test", opts)?;
//!
//! let pipeline = Pipeline::new()
//!     .with_estimator(StringIndexer::new().with_input_col("label").with_output_col("labelIndex"))
//!     .with_transformer(DeepImageFeaturizer::new().with_model_name("EfficientNetLite0"))
//!     .with_estimator(LogisticRegression::new().with_label_col("labelIndex").with_reg_param(1e-3));
//! let model = pipeline.fit(&train).await?;
//! let predictions = model.transform(test)?;
//! let accuracy = MulticlassClassificationEvaluator::new()
//!     .with_label_col("labelIndex")
//!     .evaluate(&predictions)
//!     .await?;
//! println!("accuracy {accuracy:.3}");
//! # Ok(()) }
//! ```

pub mod batch;
pub mod builtin;
pub mod classification;
mod columns;
pub mod error;
pub mod evaluation;
pub mod feature;
pub mod featurizer;
pub mod fine_tune;
pub mod image;
pub mod models;
pub mod network_stage;
pub mod network_transformer;
pub mod optim;
pub mod params;
pub mod persistence;
pub mod pipeline;
pub mod predictor;
pub mod preprocess;
pub mod registry;
pub mod split;
pub mod sql;
pub mod stage;
pub mod tuning;

pub use classification::{
    DeepImageClassifier, DeepImageClassifierModel, LogisticRegression, LogisticRegressionModel,
};
pub use error::{Error, Result};
pub use evaluation::{
    BinaryClassificationEvaluator, ConfusionMatrix, Evaluator, MulticlassClassificationEvaluator,
    confusion_matrix,
};
pub use feature::{IndexToString, StringIndexer, StringIndexerModel};
pub use featurizer::DeepImageFeaturizer;
pub use image::{ReadImagesOptions, decode_image_column, read_images};
pub use network_stage::{NetworkParams, NetworkStage, NetworkStats};
pub use params::{ParamMap, Params};
pub use pipeline::{Estimator, Pipeline, PipelineModel, Transformer};
pub use predictor::DeepImagePredictor;
pub use registry::{LoadedStage, PersistedStage, StageRegistry};
pub use split::random_split;
pub use sql::{register_featurizer, register_images_table, register_model};
pub use tuning::{CrossValidator, ParamGridBuilder, TrainValidationSplit};

/// Everything the examples import.
pub mod prelude {
    pub use crate::{
        BinaryClassificationEvaluator, ConfusionMatrix, CrossValidator, DeepImageClassifier,
        DeepImageClassifierModel, DeepImageFeaturizer, DeepImagePredictor, Estimator, Evaluator,
        IndexToString, LogisticRegression, LogisticRegressionModel,
        MulticlassClassificationEvaluator, NetworkStage, ParamGridBuilder, ParamMap, Params,
        Pipeline, PipelineModel, ReadImagesOptions, StringIndexer, StringIndexerModel,
        TrainValidationSplit, Transformer, confusion_matrix, decode_image_column, random_split,
        read_images, register_featurizer, register_images_table, register_model,
    };
    pub use datafusion::prelude::{DataFrame, SessionContext, col, ident, lit};
}
