//! [`NetworkTransformer`]: a network stage made of its params type alone. The featurizer and the
//! predictor are `NetworkTransformer<DeepImageFeaturizerParams>` and
//! `NetworkTransformer<DeepImagePredictorParams>`; what differs between them is their params'
//! [`NetworkStageParams::output`], and everything a stage does besides (transform, save and
//! load, tuning copies, the `network` capability, the shared setters) is written here once.
//! Apart from `network_stage`, which the stage traits depend on: this module depends on them.

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use datafusion::prelude::DataFrame;

use crate::error::Result;
use crate::models::LoadedModel;
use crate::network_stage::{
    NetworkMetrics, NetworkOutput, NetworkParams, NetworkStage, network_setters,
};
use crate::params::{AnyParams, ParamMap, Params, new_uid};
use crate::persistence::SavedStage;
use crate::registry::{LoadedStage, PersistedStage, StageRegistry};
use crate::stage::Transformer;

/// The params type of a network stage: the shared [`NetworkParams`] (its `AsRef` / `AsMut`),
/// the column it adds and the [`NetworkOutput`] it computes. Its [`Params::STAGE`] is the
/// stage's class name (saved, and the uid prefix).
pub trait NetworkStageParams:
    Params + AsRef<NetworkParams> + AsMut<NetworkParams> + Debug + Send + Sync + 'static
{
    /// What the stage computes per image.
    type Output: NetworkOutput;

    /// The column the stage adds.
    fn output_col(&self) -> &str;

    /// The output for `model`; an error when the model cannot give it (e.g. no classifier
    /// head), naming the param.
    fn output(&self, model: &LoadedModel) -> Result<Self::Output>;
}

/// A network stage: adds [`NetworkStageParams::output`] of each image of `inputCol` as
/// `outputCol`, lazily, `batchSize` images per forward pass.
#[derive(Debug, Clone)]
pub struct NetworkTransformer<P> {
    uid: String,
    /// Written by the stage-specific setters in each params type's module.
    pub(crate) params: P,
    pub(crate) metrics: NetworkMetrics,
}

impl<P: NetworkStageParams> Default for NetworkTransformer<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: NetworkStageParams> NetworkTransformer<P> {
    /// The stage with its default params.
    pub fn new() -> Self {
        Self::from_params(P::default())
    }

    pub fn from_params(params: P) -> Self {
        Self::with_uid(new_uid(P::STAGE), params)
    }

    fn with_uid(uid: String, params: P) -> Self {
        NetworkTransformer {
            uid,
            params,
            metrics: NetworkMetrics::default(),
        }
    }

    pub fn params(&self) -> &P {
        &self.params
    }

    network_setters!();
}

impl<P: NetworkStageParams> Transformer for NetworkTransformer<P> {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        let p = &self.params;
        p.validate()?;
        let output_col = p.output_col();
        p.as_ref()
            .add_column(&self.uid, output_col, df, &self.metrics, |model| {
                p.output(model)
            })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn network(&self) -> Option<&dyn NetworkStage> {
        Some(self)
    }

    fn save_stage(&self) -> Result<SavedStage> {
        let p = &self.params;
        p.as_ref().save(P::STAGE, &self.uid, p)
    }

    /// Tuning copies count into this stage's metrics.
    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        Ok(Arc::new(NetworkTransformer {
            params: overrides.apply(&self.uid, &self.params)?,
            ..self.clone()
        }))
    }
}

impl<P: NetworkStageParams> NetworkStage for NetworkTransformer<P> {
    fn network_params(&self) -> &NetworkParams {
        self.params.as_ref()
    }

    fn params(&self) -> &dyn AnyParams {
        &self.params
    }

    fn meter(&self) -> &NetworkMetrics {
        &self.metrics
    }
}

impl<P: NetworkStageParams> PersistedStage for NetworkTransformer<P> {
    const CLASS: &'static str = P::STAGE;

    fn restore(saved: &SavedStage, _: &StageRegistry) -> Result<Self> {
        Ok(Self::with_uid(
            saved.uid.clone(),
            NetworkParams::restore(saved)?,
        ))
    }

    fn from_params_json(params: serde_json::Value) -> Result<Self> {
        Ok(Self::from_params(P::from_json(params)?))
    }

    fn into_stage(self) -> LoadedStage {
        LoadedStage::Transformer(Arc::new(self))
    }
}
