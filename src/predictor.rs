//! [`DeepImagePredictor`]: a pretrained classifier as a [`Transformer`] that adds the top-K
//! classes of each image (sparkdl's `DeepImagePredictor` with `decodePredictions`).

use std::any::Any;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int32Array, ListArray, StringArray, StructArray,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields};
use datafusion::prelude::DataFrame;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::LoadedModel;
use crate::network_stage::{
    NetworkMetrics, NetworkOutput, NetworkParams, NetworkStats, check_model_params,
    check_model_reference, preprocess_options, saved_network_params,
};
use crate::params::{
    ParamMap, Params, Rejected, check, choice_setters, new_uid, setters, string_setters,
};
use crate::persistence::SavedStage;
use crate::pipeline::Transformer;
use crate::preprocess::ResizeMode;

/// Params of [`DeepImagePredictor`] (sparkdl names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeepImagePredictorParams {
    pub input_col: String,
    pub output_col: String,
    pub model_name: String,
    /// `true`: top-K `(class, label, probability)`; `false`: all class probabilities.
    pub decode_predictions: bool,
    pub top_k: usize,
    pub batch_size: usize,
    pub device: String,
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

impl Default for DeepImagePredictorParams {
    fn default() -> Self {
        DeepImagePredictorParams {
            input_col: "image".into(),
            output_col: "predicted_labels".into(),
            model_name: "EfficientNetLite0".into(),
            decode_predictions: true,
            top_k: 5,
            batch_size: 32,
            device: "cpu".into(),
            model_dir: String::new(),
            resize_mode: ResizeMode::Crop,
            alpha_background: "white".into(),
            error_col: String::new(),
            rejected: Rejected::default(),
        }
    }
}

impl Params for DeepImagePredictorParams {
    const STAGE: &'static str = "DeepImagePredictor";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("inputCol", "image column (ImageSchema struct)"),
            ("outputCol", "prediction column to add"),
            (
                "modelName",
                "named pretrained classifier, e.g. EfficientNetLite0",
            ),
            (
                "decodePredictions",
                "true: array<struct<class, label, probability>> of the topK classes; false: all class probabilities",
            ),
            ("topK", "classes kept per image when decoding"),
            ("batchSize", "images per forward pass"),
            (
                "device",
                "cpu, or (built with the wgpu feature) wgpu (a GPU) or wgpu-cpu (software Vulkan)",
            ),
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
        check::in_range(s, "topK", self.top_k as f64, 1.0, 1e6)?;
        self.rejected.check(s)
    }

    fn rejected(&self) -> &Rejected {
        &self.rejected
    }
}

/// Adds the most likely classes of each image.
///
/// ```no_run
/// # fn demo(images: datafusion::prelude::DataFrame) -> deep_pipelines::Result<()> {
/// use deep_pipelines::{DeepImagePredictor, Transformer};
/// let predictor = DeepImagePredictor::new()
///     .with_model_name("EfficientNetLite0")
///     .with_top_k(5);
/// // predicted_labels: [{class: 282, label: "tiger cat", probability: 0.41}, ...]
/// let predictions = predictor.transform(images)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeepImagePredictor {
    uid: String,
    params: DeepImagePredictorParams,
    metrics: NetworkMetrics,
}

impl Default for DeepImagePredictor {
    fn default() -> Self {
        Self::new()
    }
}

impl DeepImagePredictor {
    pub fn new() -> Self {
        Self::from_params(DeepImagePredictorParams::default())
    }

    pub fn from_params(params: DeepImagePredictorParams) -> Self {
        Self::with_uid(new_uid("DeepImagePredictor"), params)
    }

    fn with_uid(uid: String, params: DeepImagePredictorParams) -> Self {
        DeepImagePredictor {
            uid,
            params,
            metrics: NetworkMetrics::default(),
        }
    }

    pub fn params(&self) -> &DeepImagePredictorParams {
        &self.params
    }

    /// Images this stage (with its clones and tuning copies) has run through the network.
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
    setters! {
        with_top_k: top_k: usize,
        with_batch_size: batch_size: usize,
        with_decode_predictions: decode_predictions: bool,
    }
    choice_setters! { with_resize_mode: resize_mode: ResizeMode = "resizeMode" }

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
        let params: DeepImagePredictorParams = saved_network_params(saved)?;
        check_model_reference(saved, &params.model_name, &params.model_dir)?;
        Ok(Self::with_uid(saved.uid.clone(), params))
    }
}

impl Transformer for DeepImagePredictor {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        self.params.validate()?;
        let p = &self.params;
        self.network().add_column(df, &self.metrics, |model| {
            let classes = model.manifest.num_classes;
            if classes == 0 {
                return Err(Error::param(
                    <Self as crate::registry::PersistedStage>::CLASS,
                    "modelName",
                    format!("model `{}` has no classifier head", p.model_name),
                ));
            }
            Ok(Predictions {
                top_k: p.top_k.min(classes),
                decode: p.decode_predictions,
            })
        })
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
        Ok(Arc::new(DeepImagePredictor {
            params: overrides.apply(&self.uid, &self.params)?,
            ..self.clone()
        }))
    }
}

/// The predictor's output: softmax probabilities of every class, or the top K decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Predictions {
    top_k: usize,
    decode: bool,
}

/// The fields of one decoded prediction.
fn prediction_fields() -> Fields {
    Fields::from(vec![
        Field::new("class", DataType::Int32, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("probability", DataType::Float32, false),
    ])
}

impl Predictions {
    /// The list item: a decoded prediction, or a probability.
    fn item(&self) -> FieldRef {
        let item = if self.decode {
            DataType::Struct(prediction_fields())
        } else {
            DataType::Float32
        };
        Arc::new(Field::new("item", item, true))
    }

    /// The top K of every valid row, as `(class, label, probability)` list entries.
    fn decoded(
        &self,
        labels: Option<&Vec<String>>,
        probabilities: &[f32],
        classes: usize,
        valid: Vec<bool>,
    ) -> Result<ArrayRef> {
        let (mut class, mut label, mut probability) = (Vec::new(), Vec::new(), Vec::new());
        let mut lengths = Vec::with_capacity(valid.len());
        for (row, p) in probabilities.chunks(classes).enumerate() {
            if !valid[row] {
                lengths.push(0);
                continue;
            }
            for c in top_k_indices(p, self.top_k) {
                class.push(c as i32);
                label.push(labels.and_then(|l| l.get(c)).cloned());
                probability.push(p[c]);
            }
            lengths.push(self.top_k);
        }
        let entries = StructArray::try_new(
            prediction_fields(),
            vec![
                Arc::new(Int32Array::from(class)),
                Arc::new(StringArray::from(label)),
                Arc::new(Float32Array::from(probability)),
            ],
            None,
        )?;
        Ok(Arc::new(ListArray::try_new(
            self.item(),
            OffsetBuffer::from_lengths(lengths),
            Arc::new(entries),
            Some(NullBuffer::from(valid)),
        )?))
    }
}

impl NetworkOutput for Predictions {
    const VERB: &'static str = "predict";

    fn width(&self, model: &LoadedModel) -> usize {
        model.manifest.num_classes
    }

    fn forward(&self, model: &LoadedModel, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        model.logits(inputs, batch)
    }

    fn data_type(&self, model: &LoadedModel) -> DataType {
        if self.decode {
            DataType::List(self.item())
        } else {
            DataType::FixedSizeList(self.item(), self.width(model) as i32)
        }
    }

    /// Softmax of every row's logits, then either all probabilities or the top K decoded
    /// (class names from the model's labels, null without them). Invalid rows are null.
    fn build(&self, model: &LoadedModel, logits: Vec<f32>, valid: Vec<bool>) -> Result<ArrayRef> {
        let classes = self.width(model);
        let probabilities: Vec<f32> = logits.chunks(classes).flat_map(softmax).collect();
        if self.decode {
            return self.decoded(model.labels.as_deref(), &probabilities, classes, valid);
        }
        Ok(Arc::new(FixedSizeListArray::try_new(
            self.item(),
            classes as i32,
            Arc::new(Float32Array::from(probabilities)),
            Some(NullBuffer::from(valid)),
        )?))
    }
}

/// Softmax in f64 (stable: the max logit is subtracted first).
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

#[cfg(test)]
mod tests;

// --- persistence registry (helper B) ---
impl crate::registry::PersistedStage for DeepImagePredictor {
    const CLASS: &'static str = "DeepImagePredictor";

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
