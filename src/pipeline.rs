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
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::prelude::DataFrame;

use crate::error::{Error, Result};
use crate::network_stage::NetworkStage;
use crate::params::{ParamMap, new_uid};
use crate::persistence::SavedStage;
use crate::registry::{LoadedStage, PersistedStage, StageRegistry};
pub use crate::stage::{AnyEstimator, ClassifierColumns, Estimator, PipelineStage, Transformer};

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

    // `Pipeline::load` (the built-in stages) is in the `builtin` module, above every stage.

    /// [`Pipeline::load`] for a pipeline holding stages of your own, registered in `registry`.
    pub fn load_with(path: impl AsRef<std::path::Path>, registry: &StageRegistry) -> Result<Self> {
        registry.load_estimator_as(path)
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
        Ok(SavedStage::container(Self::CLASS, &self.uid, stages))
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

impl PersistedStage for Pipeline {
    const CLASS: &'static str = "Pipeline";

    fn restore(saved: &SavedStage, registry: &StageRegistry) -> Result<Self> {
        let stages = saved
            .stages
            .iter()
            .map(|s| registry.build(s))
            .collect::<Result<_>>()?;
        Ok(Pipeline::from_stages(saved.uid.clone(), stages))
    }

    fn into_stage(self) -> LoadedStage {
        LoadedStage::Estimator(Arc::new(self))
    }
}

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

    /// `stage` as a pipeline: itself if it is a fitted pipeline, else a one-stage pipeline.
    pub fn of(stage: Arc<dyn Transformer>) -> Self {
        match stage.as_any().downcast_ref::<PipelineModel>() {
            Some(model) => model.clone(),
            None => PipelineModel::new(format!("{}_pipeline", stage.uid()), vec![stage]),
        }
    }

    /// This pipeline with its network stages on `device` moved to `to`, e.g. from `wgpu` (the
    /// first GPU) to `wgpu:1`, the GPU Spark gave a task; the other stages are shared.
    pub fn with_device(&self, device: &str, to: &str) -> Result<PipelineModel> {
        let overrides = self
            .stages
            .iter()
            .filter(|s| {
                s.network()
                    .is_some_and(|n| n.network_params().device == device)
            })
            .fold(ParamMap::new(), |m, s| m.put(s.uid(), "device", to));
        self.with_params(&overrides)
    }

    /// A copy with the params of `overrides` set on the stages they name; the others shared.
    fn with_params(&self, overrides: &ParamMap) -> Result<PipelineModel> {
        Ok(PipelineModel {
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
        })
    }

    /// The fitted stages, in order.
    pub fn stages(&self) -> &[Arc<dyn Transformer>] {
        &self.stages
    }

    /// The stages that run a network, in order.
    pub fn network_stages(&self) -> impl Iterator<Item = &dyn NetworkStage> {
        self.stages.iter().filter_map(|s| s.network())
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

    // `PipelineModel::load` (the built-in stages) is in the `builtin` module, above every stage.

    /// [`PipelineModel::load`] for a model holding stages of your own, registered in
    /// `registry`.
    pub fn load_with(path: impl AsRef<std::path::Path>, registry: &StageRegistry) -> Result<Self> {
        registry.load_transformer_as(path)
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

    /// The first network stage's.
    fn network(&self) -> Option<&dyn NetworkStage> {
        self.stages.iter().find_map(|s| s.network())
    }

    /// The first classifier's.
    fn classifier(&self) -> Option<ClassifierColumns> {
        self.stages.iter().find_map(|s| s.classifier())
    }

    fn labels_of(&self, column: &str) -> Option<&[String]> {
        self.stages.iter().find_map(|s| s.labels_of(column))
    }

    /// Its stages' descriptions, joined by ` -> `.
    fn describe(&self) -> String {
        let stages: Vec<String> = self.stages.iter().map(|s| s.describe()).collect();
        stages.join(" -> ")
    }

    fn save_stage(&self) -> Result<SavedStage> {
        let stages = self
            .stages
            .iter()
            .map(|s| s.save_stage())
            .collect::<Result<Vec<_>>>()?;
        Ok(SavedStage::container(Self::CLASS, &self.uid, stages))
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        Ok(Arc::new(self.with_params(overrides)?))
    }
}

impl PersistedStage for PipelineModel {
    const CLASS: &'static str = "PipelineModel";

    fn restore(saved: &SavedStage, registry: &StageRegistry) -> Result<Self> {
        let stages = saved
            .stages
            .iter()
            .map(|s| match registry.build(s)? {
                LoadedStage::Transformer(t) => Ok(t),
                LoadedStage::Estimator(e) => Err(Error::Persistence(format!(
                    "PipelineModel `{}`: stage `{}` is not fitted",
                    saved.uid,
                    e.uid()
                ))),
            })
            .collect::<Result<_>>()?;
        Ok(PipelineModel::new(saved.uid.clone(), stages))
    }

    fn into_stage(self) -> LoadedStage {
        LoadedStage::Transformer(Arc::new(self))
    }
}
