//! [`DeepImageFeaturizer`]: a pretrained CNN as a feature-extracting [`Transformer`].
//!
//! The output column is added lazily as a UDF: when the plan runs, each record batch is
//! preprocessed in parallel and pushed through the network `batchSize` images at a time, with the
//! model loaded once per process. Null (or undecodable) images give null features.

use std::any::Any;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, FixedSizeListArray, Float32Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::prelude::DataFrame;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::models::{FeatureMode, LoadedModel};
use crate::network_stage::{
    NetworkMetrics, NetworkOutput, NetworkParams, NetworkStats, check_model_params,
    check_model_reference, preprocess_options, saved_network_params,
};
use crate::params::{
    Choice, ParamMap, Params, Rejected, check, choice, choice_setters, new_uid, setters,
    string_setters,
};
use crate::persistence::SavedStage;
use crate::pipeline::Transformer;
use crate::preprocess::ResizeMode;

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
    pub input_col: String,
    pub output_col: String,
    pub model_name: String,
    pub batch_size: usize,
    pub device: String,
    /// `pooled` (the manifest's feature vector) or `flattened` (the last feature map).
    pub feature_mode: FeatureMode,
    /// `float32` or `float16` (half the memory and Parquet size).
    pub output_type: OutputType,
    /// Folder holding `<model>/manifest.json` and weights; empty = `$DEEP_PIPELINES_MODEL_DIR`
    /// or the bundled `models/`.
    pub model_dir: String,
    /// `crop` (the manifest's resize + centre crop) or `pad` (letterbox, nothing cut off).
    pub resize_mode: ResizeMode,
    /// Colour transparent pixels are composited over (and letterbox padding): `white`,
    /// `black`, `#rrggbb`, or `none` (drop alpha, keep the stored colour).
    pub alpha_background: String,
    /// Column to add with the reason for each null output; empty = none.
    pub error_col: String,
    /// Strings the setters could not parse, reported by `validate`.
    #[serde(skip)]
    #[doc(hidden)]
    pub rejected: Rejected,
}

impl Default for DeepImageFeaturizerParams {
    fn default() -> Self {
        DeepImageFeaturizerParams {
            input_col: "image".into(),
            output_col: "features".into(),
            model_name: "EfficientNetLite0".into(),
            batch_size: 32,
            device: "cpu".into(),
            feature_mode: FeatureMode::Pooled,
            output_type: OutputType::Float32,
            model_dir: String::new(),
            resize_mode: ResizeMode::Crop,
            alpha_background: "white".into(),
            error_col: String::new(),
            rejected: Rejected::default(),
        }
    }
}

impl Params for DeepImageFeaturizerParams {
    const STAGE: &'static str = "DeepImageFeaturizer";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("inputCol", "image column (ImageSchema struct)"),
            (
                "outputCol",
                "feature column to add (FixedSizeList<Float32>)",
            ),
            (
                "modelName",
                "named pretrained model, e.g. EfficientNetLite0",
            ),
            ("batchSize", "images per forward pass"),
            (
                "device",
                "cpu, or (built with the wgpu feature) wgpu (a GPU) or wgpu-cpu (software Vulkan)",
            ),
            (
                "featureMode",
                "pooled (feature vector, default) or flattened (last feature map)",
            ),
            ("outputType", "float32 (default) or float16"),
            (
                "modelDir",
                "folder with <model>/manifest.json + weights; empty = default",
            ),
            (
                "resizeMode",
                "crop (the model's resize + centre crop, default) or pad (letterbox, nothing cut off)",
            ),
            (
                "alphaBackground",
                "colour transparent pixels are composited over, and letterbox padding: white (default), black, #rrggbb, none (drop alpha)",
            ),
            (
                "errorCol",
                "column to add with the reason of each null output (null image, inconsistent or oversized struct); empty = none",
            ),
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        check::non_empty(s, "inputCol", &self.input_col)?;
        check::non_empty(s, "outputCol", &self.output_col)?;
        check_model_params(s, &self.model_name, self.batch_size, &self.device)?;
        preprocess_options(s, self.resize_mode, &self.alpha_background)?;
        self.rejected.check(s)
    }

    fn rejected(&self) -> &Rejected {
        &self.rejected
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
#[derive(Debug, Clone)]
pub struct DeepImageFeaturizer {
    uid: String,
    params: DeepImageFeaturizerParams,
    metrics: NetworkMetrics,
}

impl Default for DeepImageFeaturizer {
    fn default() -> Self {
        Self::new()
    }
}

impl DeepImageFeaturizer {
    pub fn new() -> Self {
        Self::from_params(DeepImageFeaturizerParams::default())
    }

    pub fn from_params(params: DeepImageFeaturizerParams) -> Self {
        Self::with_uid(new_uid("DeepImageFeaturizer"), params)
    }

    fn with_uid(uid: String, params: DeepImageFeaturizerParams) -> Self {
        DeepImageFeaturizer {
            uid,
            params,
            metrics: NetworkMetrics::default(),
        }
    }

    pub fn params(&self) -> &DeepImageFeaturizerParams {
        &self.params
    }

    /// Images this stage (with its clones and tuning copies) has run through the network: a
    /// cost meter, e.g. to check that tuning featurizes each row once.
    pub fn images_processed(&self) -> u64 {
        self.metrics.images()
    }

    /// What this stage (with its clones and tuning copies) has done since it was made, loaded
    /// or reset: rows, images, null rows and why, seconds in preprocessing and in the network,
    /// images/s and the device.
    pub fn metrics(&self) -> NetworkStats {
        self.metrics.snapshot()
    }

    /// Sets [`Self::metrics`] back to zero (e.g. between two runs of one fitted stage).
    pub fn reset_metrics(&self) {
        self.metrics.reset();
    }

    string_setters! {
        with_input_col: input_col,
        with_output_col: output_col,
        with_model_name: model_name,
        with_device: device,
        with_model_dir: model_dir,
        with_alpha_background: alpha_background,
        with_error_col: error_col,
    }
    setters! { with_batch_size: batch_size: usize }
    choice_setters! {
        with_feature_mode: feature_mode: FeatureMode = "featureMode",
        with_output_type: output_type: OutputType = "outputType",
        with_resize_mode: resize_mode: ResizeMode = "resizeMode",
    }

    fn network(&self) -> NetworkParams<'_> {
        let p = &self.params;
        NetworkParams {
            uid: &self.uid,
            input_col: &p.input_col,
            output_col: &p.output_col,
            model_name: &p.model_name,
            device: &p.device,
            model_dir: &p.model_dir,
            batch_size: p.batch_size,
            resize_mode: p.resize_mode,
            alpha_background: &p.alpha_background,
            error_col: &p.error_col,
        }
    }

    pub(crate) fn from_saved(saved: &SavedStage) -> Result<Self> {
        let params: DeepImageFeaturizerParams = saved_network_params(saved)?;
        check_model_reference(saved, &params.model_name, &params.model_dir)?;
        Ok(Self::with_uid(saved.uid.clone(), params))
    }
}

impl Transformer for DeepImageFeaturizer {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        self.params.validate()?;
        let output = Features {
            mode: self.params.feature_mode,
            output_type: self.params.output_type,
        };
        self.network().add_column(df, &self.metrics, |_| Ok(output))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn save_stage(&self) -> Result<SavedStage> {
        self.network().save(
            <Self as crate::registry::PersistedStage>::CLASS,
            &self.params,
        )
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        Ok(Arc::new(DeepImageFeaturizer {
            params: overrides.apply(&self.uid, &self.params)?,
            ..self.clone()
        }))
    }
}

/// The featurizer's output: the pooled features or the flattened last feature map, per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Features {
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

// --- persistence registry (helper B) ---
impl crate::registry::PersistedStage for DeepImageFeaturizer {
    const CLASS: &'static str = "DeepImageFeaturizer";

    fn restore(
        saved: &crate::persistence::SavedStage,
        _: &crate::registry::StageRegistry,
    ) -> crate::Result<Self> {
        Self::from_saved(saved)
    }

    fn into_stage(self) -> crate::registry::LoadedStage {
        crate::registry::LoadedStage::Transformer(std::sync::Arc::new(self))
    }
}
