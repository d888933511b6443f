//! The stage traits of the Spark-ML contract: a [`Transformer`] maps a DataFrame to a
//! DataFrame (lazily), an [`Estimator`] learns from one and returns a fitted `Transformer`;
//! [`PipelineStage`] holds either. Apart from the `pipeline` module, so that stage modules and
//! the registry depend on these traits, not on pipelines.
//!
//! Code that holds stages as `dyn Transformer` asks them for capabilities
//! ([`Transformer::network`], [`Transformer::classifier`], [`Transformer::labels_of`]) instead
//! of downcasting to a list of concrete types, so a new stage needs no edit there.

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::prelude::DataFrame;

use crate::error::{Error, Result};
use crate::network_stage::NetworkStage;
use crate::params::ParamMap;
use crate::persistence::SavedStage;

/// A stage that maps a DataFrame to a new DataFrame (lazily where possible).
pub trait Transformer: Send + Sync + Debug + Any {
    /// Unique id of this stage, e.g. `DeepImageFeaturizer_3f2a...`.
    fn uid(&self) -> &str;

    /// Returns `df` with this stage's output column(s) added.
    fn transform(&self, df: DataFrame) -> Result<DataFrame>;

    /// For downcasting a stage of a fitted [`PipelineModel`] back to its concrete type (in the
    /// stage's own module and the registry; elsewhere, ask a capability below).
    fn as_any(&self) -> &dyn Any;

    /// Capability: the stage runs a network over an image column (featurizer, predictor,
    /// fine-tuned classifier, yours): its shared params, every param and its counters.
    fn network(&self) -> Option<&dyn NetworkStage> {
        None
    }

    /// Capability: the stage is a classifier; where it writes its outputs.
    fn classifier(&self) -> Option<ClassifierColumns> {
        None
    }

    /// Capability: the string labels of the indices this stage writes to `column` (a fitted
    /// `StringIndexer`).
    fn labels_of(&self, _column: &str) -> Option<&[String]> {
        None
    }

    /// One line for EXPLAIN and logs, e.g. `DeepImageFeaturizer(EfficientNetLite0)`; by
    /// default the class part of the uid.
    fn describe(&self) -> String {
        let uid = self.uid();
        let class = uid.rsplit_once('_').map_or(uid, |(class, _)| class);
        match self.network() {
            Some(network) => format!("{class}({})", network.network_params().model_label()),
            None => class.to_string(),
        }
    }

    /// Params and model data for [`crate::persistence`]. The default: this stage cannot be saved.
    fn save_stage(&self) -> Result<SavedStage> {
        Err(not_saveable(self.uid()))
    }

    /// A copy with the params of `overrides` that name this stage set (same uid), for tuning.
    /// The default accepts only an empty set: this stage has no params to tune.
    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        Err(no_params(self.uid(), overrides))
    }
}

/// Where a classifier (a logistic regression, a fine-tuned network) writes its outputs, and
/// the label column it was fitted on.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierColumns {
    pub prediction_col: String,
    pub probability_col: String,
    pub label_col: String,
}

impl ClassifierColumns {
    pub fn new(prediction_col: &str, probability_col: &str, label_col: &str) -> Self {
        ClassifierColumns {
            prediction_col: prediction_col.to_string(),
            probability_col: probability_col.to_string(),
            label_col: label_col.to_string(),
        }
    }
}

fn not_saveable(uid: &str) -> Error {
    Error::Persistence(format!(
        "stage `{uid}` does not implement saving (Transformer::save_stage / Estimator::save_stage)"
    ))
}

fn no_params(uid: &str, overrides: &ParamMap) -> Error {
    Error::param(
        uid,
        &overrides.names_for(uid).join(", "),
        "this stage has no settable params",
    )
}

/// A stage that learns from a DataFrame and returns a fitted [`Transformer`].
#[async_trait]
pub trait Estimator: Send + Sync + Debug {
    /// The fitted model type.
    type Model: Transformer;

    /// Unique id of this stage.
    fn uid(&self) -> &str;

    /// Runs over `df` (executing the plan) and returns the fitted model.
    async fn fit(&self, df: &DataFrame) -> Result<Self::Model>;

    /// Params for [`crate::persistence`]. The default: this stage cannot be saved.
    fn save_stage(&self) -> Result<SavedStage> {
        Err(not_saveable(Estimator::uid(self)))
    }

    /// A copy with the params of `overrides` that name this stage set (same uid), for tuning.
    fn copy_with(&self, overrides: &ParamMap) -> Result<Self>
    where
        Self: Sized,
    {
        Err(no_params(Estimator::uid(self), overrides))
    }
}

/// Object-safe view of an [`Estimator`], so a pipeline can hold estimators of different types.
#[async_trait]
pub trait AnyEstimator: Send + Sync + Debug {
    fn uid(&self) -> &str;
    async fn fit_any(&self, df: &DataFrame) -> Result<Arc<dyn Transformer>>;
    fn save_stage(&self) -> Result<SavedStage>;
    fn copy_with_any(&self, overrides: &ParamMap) -> Result<Arc<dyn AnyEstimator>>;
    /// For downcasting back to the concrete estimator type.
    fn as_any(&self) -> &dyn Any;
}

#[async_trait]
impl<E: Estimator + 'static> AnyEstimator for E {
    fn uid(&self) -> &str {
        Estimator::uid(self)
    }

    async fn fit_any(&self, df: &DataFrame) -> Result<Arc<dyn Transformer>> {
        Ok(Arc::new(self.fit(df).await?))
    }

    fn save_stage(&self) -> Result<SavedStage> {
        Estimator::save_stage(self)
    }

    fn copy_with_any(&self, overrides: &ParamMap) -> Result<Arc<dyn AnyEstimator>> {
        Ok(Arc::new(self.copy_with(overrides)?))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// One stage of a `Pipeline`.
#[derive(Debug, Clone)]
pub enum PipelineStage {
    Transformer(Arc<dyn Transformer>),
    Estimator(Arc<dyn AnyEstimator>),
}

impl PipelineStage {
    /// The stage's uid.
    pub fn uid(&self) -> &str {
        match self {
            PipelineStage::Transformer(t) => t.uid(),
            PipelineStage::Estimator(e) => e.uid(),
        }
    }

    /// This stage with the params of `overrides` that name it set; untouched stages are shared.
    pub fn copy_with(&self, overrides: &ParamMap) -> Result<PipelineStage> {
        if overrides.names_for(self.uid()).is_empty() {
            return Ok(self.clone());
        }
        Ok(match self {
            PipelineStage::Transformer(t) => PipelineStage::Transformer(t.copy_with(overrides)?),
            PipelineStage::Estimator(e) => PipelineStage::Estimator(e.copy_with_any(overrides)?),
        })
    }

    /// The stage's `save_stage`, whichever kind it is.
    pub(crate) fn save_stage(&self) -> Result<SavedStage> {
        match self {
            PipelineStage::Transformer(t) => t.save_stage(),
            PipelineStage::Estimator(e) => e.save_stage(),
        }
    }
}
