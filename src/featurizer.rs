//! [`DeepImageFeaturizer`]: a pretrained CNN as a feature-extracting
//! [`Transformer`](crate::Transformer): its params and its per-image output (the stage itself
//! is a [`NetworkTransformer`]).
//!
//! The output column is added lazily as a UDF: when the plan runs, each record batch is
//! preprocessed in parallel and pushed through the network `batchSize` images at a time, with the
//! model loaded once per process. Null (or undecodable) images give null features.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{ArrayRef, FixedSizeListArray, Float32Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::{FeatureMode, LoadedModel};
use crate::network_stage::{NetworkOutput, NetworkParams};
use crate::network_transformer::{NetworkStageParams, NetworkTransformer};
use crate::params::{Choice, Params, Rejected, check, choice, choice_setters, string_setters};

choice! {
    /// `outputType`: the featurizer's value type; `float16` halves the memory and Parquet size.
    pub enum OutputType {
        Float32 = "float32",
        Float16 = "float16",
    }
}

impl OutputType {
    fn data_type(self) -> DataType {
        match self {
            OutputType::Float32 => DataType::Float32,
            OutputType::Float16 => DataType::Float16,
        }
    }
}

/// `featureMode` (the enum lives with the model code, which computes both modes).
impl Choice for FeatureMode {
    const NAMES: &'static [&'static str] = &["pooled", "flattened"];

    fn from_name(name: &str) -> Option<Self> {
        FeatureMode::parse(name)
    }
}

/// Params of [`DeepImageFeaturizer`] (Spark names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeepImageFeaturizerParams {
    /// `inputCol`, `modelName`, `batchSize`, `device`, ... (saved flat, as Spark names).
    #[serde(flatten)]
    pub network: NetworkParams,
    pub output_col: String,
    /// `pooled` (the manifest's feature vector) or `flattened` (the last feature map).
    pub feature_mode: FeatureMode,
    /// `float32` or `float16` (half the memory and Parquet size).
    pub output_type: OutputType,
    /// Strings the setters could not parse, reported by `validate`.
    #[serde(skip)]
    #[doc(hidden)]
    pub rejected: Rejected,
}

impl Default for DeepImageFeaturizerParams {
    fn default() -> Self {
        DeepImageFeaturizerParams {
            network: NetworkParams::default(),
            output_col: "features".into(),
            feature_mode: FeatureMode::Pooled,
            output_type: OutputType::Float32,
            rejected: Rejected::default(),
        }
    }
}

impl AsRef<NetworkParams> for DeepImageFeaturizerParams {
    fn as_ref(&self) -> &NetworkParams {
        &self.network
    }
}

impl AsMut<NetworkParams> for DeepImageFeaturizerParams {
    fn as_mut(&mut self) -> &mut NetworkParams {
        &mut self.network
    }
}

impl Params for DeepImageFeaturizerParams {
    const STAGE: &'static str = "DeepImageFeaturizer";

    fn docs() -> &'static [(&'static str, &'static str)] {
        static DOCS: LazyLock<Vec<(&str, &str)>> = LazyLock::new(|| {
            NetworkParams::docs_with(&[
                (
                    "outputCol",
                    "feature column to add (FixedSizeList<Float32>)",
                ),
                (
                    "featureMode",
                    "pooled (feature vector, default) or flattened (last feature map)",
                ),
                ("outputType", "float32 (default) or float16"),
            ])
        });
        &DOCS
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        self.network.validate(s)?;
        check::non_empty(s, "outputCol", &self.output_col)?;
        self.rejected.check(s)
    }

    fn rejected(&self) -> &Rejected {
        &self.rejected
    }
}

impl NetworkStageParams for DeepImageFeaturizerParams {
    type Output = Features;

    fn output_col(&self) -> &str {
        &self.output_col
    }

    fn output(&self, _: &LoadedModel) -> Result<Features> {
        Ok(Features {
            mode: self.feature_mode,
            output_type: self.output_type,
        })
    }
}

/// Turns an image column into a feature column with a pretrained network.
///
/// ```no_run
/// # fn demo(images: datafusion::prelude::DataFrame) -> deep_pipelines::Result<()> {
/// use deep_pipelines::{DeepImageFeaturizer, Transformer};
/// let featurizer = DeepImageFeaturizer::new()
///     .with_model_name("EfficientNetLite0")
///     .with_output_col("features")
///     .with_batch_size(32);
/// let with_features = featurizer.transform(images)?; // lazy: nothing has run yet
/// # Ok(()) }
/// ```
pub type DeepImageFeaturizer = NetworkTransformer<DeepImageFeaturizerParams>;

impl DeepImageFeaturizer {
    string_setters! { with_output_col: output_col }
    choice_setters! {
        with_feature_mode: feature_mode: FeatureMode = "featureMode",
        with_output_type: output_type: OutputType = "outputType",
    }
}

/// The featurizer's output: the pooled features or the flattened last feature map, per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Features {
    mode: FeatureMode,
    output_type: OutputType,
}

impl Features {
    fn item(&self) -> FieldRef {
        Arc::new(Field::new("item", self.output_type.data_type(), true))
    }
}

impl NetworkOutput for Features {
    const VERB: &'static str = "featurize";

    fn width(&self, model: &LoadedModel) -> usize {
        model.manifest.output_dim(self.mode)
    }

    fn forward(&self, model: &LoadedModel, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        model.run(inputs, batch, self.mode)
    }

    fn data_type(&self, model: &LoadedModel) -> DataType {
        DataType::FixedSizeList(self.item(), self.width(model) as i32)
    }

    fn build(&self, model: &LoadedModel, values: Vec<f32>, valid: Vec<bool>) -> Result<ArrayRef> {
        let item = self.item();
        let values: ArrayRef = Arc::new(Float32Array::from(values));
        let values = cast(&values, item.data_type())?;
        Ok(Arc::new(FixedSizeListArray::try_new(
            item,
            self.width(model) as i32,
            values,
            Some(NullBuffer::from(valid)),
        )?))
    }
}

#[cfg(test)]
mod tests;
