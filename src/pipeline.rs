//! The Spark-ML contract: [`Transformer`], [`Estimator`], [`Pipeline`] and [`PipelineModel`].
//!
//! * A `Transformer` maps a DataFrame to a DataFrame, lazily: it adds columns as expressions and
//!   runs nothing until the caller collects.
//! * An `Estimator` runs over a DataFrame to learn something and returns a fitted model, itself a
//!   `Transformer`.
//! * `Pipeline::fit` walks its stages in order: an estimator is fitted on the output of all stages
//!   before it, a transformer passes through; the data is transformed only as far as the last
//!   estimator needs. An empty pipeline fits to the identity.

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::prelude::DataFrame;

use crate::error::{Error, Result};
use crate::params::{ParamMap, new_uid};
use crate::persistence::SavedStage;

/// A stage that maps a DataFrame to a new DataFrame (lazily where possible).
pub trait Transformer: Send + Sync + Debug + Any {
    /// Unique id of this stage, e.g. `DeepImageFeaturizer_3f2a...`.
    fn uid(&self) -> &str;

    /// Returns `df` with this stage's output column(s) added.
    fn transform(&self, df: DataFrame) -> Result<DataFrame>;

    /// For downcasting a stage of a fitted [`PipelineModel`] back to its concrete type.
    fn as_any(&self) -> &dyn Any;

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

/// One stage of a [`Pipeline`].
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

    fn save_stage(&self) -> Result<SavedStage> {
        match self {
            PipelineStage::Transformer(t) => t.save_stage(),
            PipelineStage::Estimator(e) => e.save_stage(),
        }
    }
}

/// An ordered list of stages, itself an [`Estimator`].
#[derive(Debug, Clone)]
pub struct Pipeline {
    uid: String,
    stages: Vec<PipelineStage>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Pipeline {
    /// An empty pipeline (fits to the identity).
    pub fn new() -> Self {
        Pipeline {
            uid: new_uid("Pipeline"),
            stages: Vec::new(),
        }
    }

    /// Appends a transformer stage.
    pub fn with_transformer(mut self, stage: impl Transformer) -> Self {
        self.stages
            .push(PipelineStage::Transformer(Arc::new(stage)));
        self
    }

    /// Appends an estimator stage.
    pub fn with_estimator(mut self, stage: impl Estimator + 'static) -> Self {
        self.stages.push(PipelineStage::Estimator(Arc::new(stage)));
        self
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[PipelineStage] {
        &self.stages
    }

    /// The uids of the stages, in order.
    pub fn stage_uids(&self) -> Vec<&str> {
        self.stages.iter().map(PipelineStage::uid).collect()
    }

    /// Builds a pipeline from stages (e.g. when loading a saved one).
    pub fn from_stages(uid: impl Into<String>, stages: Vec<PipelineStage>) -> Self {
        Pipeline {
            uid: uid.into(),
            stages,
        }
    }

    /// Saves the (unfitted) pipeline: see [`crate::persistence`] for the layout.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::persistence::save(&Estimator::save_stage(self)?, path.as_ref(), false)
    }

    /// [`Pipeline::save`], replacing what is at `path`.
    pub fn save_overwrite(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::persistence::save(&Estimator::save_stage(self)?, path.as_ref(), true)
    }

    /// Loads a pipeline written by [`Pipeline::save`].
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        crate::persistence::load_estimator_as(path.as_ref())
    }
}

#[async_trait]
impl Estimator for Pipeline {
    type Model = PipelineModel;

    fn uid(&self) -> &str {
        &self.uid
    }

    async fn fit(&self, df: &DataFrame) -> Result<PipelineModel> {
        let last_estimator = self
            .stages
            .iter()
            .rposition(|s| matches!(s, PipelineStage::Estimator(_)));
        let mut current = df.clone();
        let mut fitted = Vec::with_capacity(self.stages.len());
        for (index, stage) in self.stages.iter().enumerate() {
            let transformer = match stage {
                PipelineStage::Transformer(t) => Arc::clone(t),
                PipelineStage::Estimator(e) => e.fit_any(&current).await?,
            };
            if last_estimator.is_some_and(|last| index < last) {
                current = transformer.transform(current)?;
            }
            fitted.push(transformer);
        }
        Ok(PipelineModel {
            uid: self.uid.clone(),
            stages: fitted,
        })
    }

    fn save_stage(&self) -> Result<SavedStage> {
        let stages = self
            .stages
            .iter()
            .map(PipelineStage::save_stage)
            .collect::<Result<Vec<_>>>()?;
        Ok(SavedStage::container(CLASS_PIPELINE, &self.uid, stages))
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Self> {
        Ok(Pipeline {
            uid: self.uid.clone(),
            stages: self
                .stages
                .iter()
                .map(|s| s.copy_with(overrides))
                .collect::<Result<_>>()?,
        })
    }
}

pub(crate) const CLASS_PIPELINE: &str = "Pipeline";
pub(crate) const CLASS_PIPELINE_MODEL: &str = "PipelineModel";

/// A fitted pipeline: its stages are all transformers, applied in order.
#[derive(Debug, Clone)]
pub struct PipelineModel {
    uid: String,
    stages: Vec<Arc<dyn Transformer>>,
}

impl PipelineModel {
    /// Builds a fitted pipeline from transformers (e.g. when loading a saved one).
    pub fn new(uid: impl Into<String>, stages: Vec<Arc<dyn Transformer>>) -> Self {
        PipelineModel {
            uid: uid.into(),
            stages,
        }
    }

    /// The fitted stages, in order.
    pub fn stages(&self) -> &[Arc<dyn Transformer>] {
        &self.stages
    }

    /// The first stage of concrete type `T`, e.g. the fitted `LogisticRegressionModel`.
    pub fn stage<T: Transformer>(&self) -> Option<&T> {
        self.stages
            .iter()
            .find_map(|s| s.as_any().downcast_ref::<T>())
    }

    /// Saves the fitted pipeline: see [`crate::persistence`] for the layout.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::persistence::save(&self.save_stage()?, path.as_ref(), false)
    }

    /// [`PipelineModel::save`], replacing what is at `path`.
    pub fn save_overwrite(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::persistence::save(&self.save_stage()?, path.as_ref(), true)
    }

    /// Loads a fitted pipeline written by [`PipelineModel::save`].
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        crate::persistence::load_transformer_as(path.as_ref())
    }
}

impl Transformer for PipelineModel {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        self.stages
            .iter()
            .try_fold(df, |df, stage| stage.transform(df))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn save_stage(&self) -> Result<SavedStage> {
        let stages = self
            .stages
            .iter()
            .map(|s| s.save_stage())
            .collect::<Result<Vec<_>>>()?;
        Ok(SavedStage::container(
            CLASS_PIPELINE_MODEL,
            &self.uid,
            stages,
        ))
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        Ok(Arc::new(PipelineModel {
            uid: self.uid.clone(),
            stages: self
                .stages
                .iter()
                .map(|s| {
                    if overrides.names_for(s.uid()).is_empty() {
                        Ok(Arc::clone(s))
                    } else {
                        s.copy_with(overrides)
                    }
                })
                .collect::<Result<_>>()?,
        }))
    }
}
