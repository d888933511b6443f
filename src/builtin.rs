//! The built-in stage table ([`StageRegistry::builtin`]) and the loaders that use it:
//! [`load`], `Pipeline::load`, `PipelineModel::load`, `LogisticRegressionModel::load`. This
//! module sits above every stage module: the stages implement `PersistedStage` and know nothing
//! of this table, so no module depends on one that depends back on it.

use std::path::Path;

use crate::classification::{
    DeepImageClassifier, DeepImageClassifierModel, LogisticRegression, LogisticRegressionModel,
};
use crate::error::Result;
use crate::feature::{IndexToString, StringIndexer, StringIndexerModel};
use crate::featurizer::DeepImageFeaturizer;
use crate::pipeline::{AnyEstimator, Pipeline, PipelineModel, Transformer};
use crate::predictor::DeepImagePredictor;
use crate::registry::{LoadedStage, StageRegistry};

impl StageRegistry {
    /// The stages of this crate: pipelines, feature stages, classifiers and network stages.
    pub fn builtin() -> Self {
        Self::empty()
            .register::<Pipeline>()
            .register::<PipelineModel>()
            .register::<StringIndexer>()
            .register::<StringIndexerModel>()
            .register::<IndexToString>()
            .register::<LogisticRegression>()
            .register::<LogisticRegressionModel>()
            .register::<DeepImageFeaturizer>()
            .register::<DeepImagePredictor>()
            .register::<DeepImageClassifier>()
            .register::<DeepImageClassifierModel>()
    }
}

impl Default for StageRegistry {
    /// [`StageRegistry::builtin`].
    fn default() -> Self {
        Self::builtin()
    }
}

/// Loads any saved stage of this crate.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedStage> {
    StageRegistry::builtin().load(path)
}

/// Loads a saved transformer of this crate of concrete type `T`.
pub fn load_transformer_as<T: Transformer + Clone>(path: impl AsRef<Path>) -> Result<T> {
    StageRegistry::builtin().load_transformer_as(path)
}

/// Loads a saved estimator of this crate of concrete type `E`.
pub fn load_estimator_as<E: AnyEstimator + Clone + 'static>(path: impl AsRef<Path>) -> Result<E> {
    StageRegistry::builtin().load_estimator_as(path)
}

impl Pipeline {
    /// Loads a pipeline written by [`Pipeline::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        load_estimator_as(path)
    }
}

impl PipelineModel {
    /// Loads a fitted pipeline written by [`PipelineModel::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        load_transformer_as(path)
    }
}

impl LogisticRegressionModel {
    /// Loads a model written by [`LogisticRegressionModel::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        load_transformer_as(path)
    }
}

impl DeepImageClassifierModel {
    /// Loads a model written by [`DeepImageClassifierModel::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        load_transformer_as(path)
    }
}
