//! [`DeepImagePredictor`]: a pretrained classifier as a [`Transformer`] that adds the top-K
//! classes of each image (sparkdl's `DeepImagePredictor` with `decodePredictions`).

use std::any::Any;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int32Array, ListArray, StringArray, StructArray,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::prelude::DataFrame;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::featurizer::{
    Head, check_model_params, check_model_reference, require_image_column, saved_network_stage,
    stage_model, with_network_column,
};
use crate::models::LoadedModel;
use crate::params::{ParamMap, Params, check, new_uid, setters, string_setters};
use crate::persistence::SavedStage;
use crate::pipeline::Transformer;

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
            ("device", "cpu, or wgpu when built with the wgpu feature"),
            (
                "modelDir",
                "folder with <model>/manifest.json + weights; empty = default",
            ),
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        check::non_empty(s, "inputCol", &self.input_col)?;
        check::non_empty(s, "outputCol", &self.output_col)?;
        check_model_params(s, &self.model_name, self.batch_size, &self.device)?;
        check::in_range(s, "topK", self.top_k as f64, 1.0, 1e6)?;
        Ok(())
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
        DeepImagePredictor {
            uid: new_uid("DeepImagePredictor"),
            params,
        }
    }

    pub fn params(&self) -> &DeepImagePredictorParams {
        &self.params
    }

    string_setters! {
        with_input_col: input_col,
        with_output_col: output_col,
        with_model_name: model_name,
        with_device: device,
        with_model_dir: model_dir,
    }
    setters! {
        with_top_k: top_k: usize,
        with_batch_size: batch_size: usize,
        with_decode_predictions: decode_predictions: bool,
    }

    pub(crate) fn from_saved(saved: &SavedStage) -> Result<Self> {
        let params: DeepImagePredictorParams = saved.params()?;
        check_model_reference(saved, &params.model_name, &params.model_dir)?;
        Ok(DeepImagePredictor {
            uid: saved.uid.clone(),
            params,
        })
    }
}

pub(crate) const CLASS_DEEP_IMAGE_PREDICTOR: &str = "DeepImagePredictor";

impl Transformer for DeepImagePredictor {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        self.params.validate()?;
        require_image_column(&df, &self.params.input_col).map_err(|e| e.in_stage(&self.uid))?;
        let p = &self.params;
        let model = stage_model(&p.model_name, &p.device, &p.model_dir)?;
        if model.manifest.num_classes == 0 {
            return Err(Error::param(
                CLASS_DEEP_IMAGE_PREDICTOR,
                "modelName",
                format!("model `{}` has no classifier head", self.params.model_name),
            ));
        }
        let head = Head::Predictions {
            top_k: p.top_k.min(model.manifest.num_classes),
            decode: p.decode_predictions,
        };
        with_network_column(df, &p.input_col, &p.output_col, model, p.batch_size, head)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn save_stage(&self) -> Result<SavedStage> {
        let p = &self.params;
        saved_network_stage(
            CLASS_DEEP_IMAGE_PREDICTOR,
            &self.uid,
            p,
            &p.model_name,
            &p.model_dir,
        )
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        Ok(Arc::new(DeepImagePredictor {
            uid: self.uid.clone(),
            params: overrides.apply(&self.uid, &self.params)?,
        }))
    }
}

/// The fields of one decoded prediction.
fn prediction_fields() -> Fields {
    Fields::from(vec![
        Field::new("class", DataType::Int32, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("probability", DataType::Float32, false),
    ])
}

/// The predictor's output column type.
pub(crate) fn predictions_type(decode: bool, classes: usize) -> DataType {
    if decode {
        DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(prediction_fields()),
            true,
        )))
    } else {
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float32, true)),
            classes as i32,
        )
    }
}

/// Softmax of every row's logits, then either all probabilities or the top K decoded
/// (class names from the model's labels, null without them). Invalid rows are null.
pub(crate) fn predictions(
    model: &LoadedModel,
    top_k: usize,
    decode: bool,
    logits: Vec<f32>,
    valid: Vec<bool>,
) -> Result<ArrayRef> {
    let classes = model.manifest.num_classes;
    let probabilities: Vec<f32> = logits.chunks(classes).flat_map(softmax).collect();
    let nulls = Some(NullBuffer::from(valid.clone()));
    let field = match predictions_type(decode, classes) {
        DataType::List(field) | DataType::FixedSizeList(field, _) => field,
        _ => unreachable!("predictions are a list"),
    };
    if !decode {
        let values = Arc::new(Float32Array::from(probabilities));
        return Ok(Arc::new(FixedSizeListArray::try_new(
            field,
            classes as i32,
            values,
            nulls,
        )?));
    }
    let labels = model.labels.as_deref();
    let (mut class, mut label, mut probability) = (Vec::new(), Vec::new(), Vec::new());
    let mut lengths = Vec::with_capacity(valid.len());
    for (row, p) in probabilities.chunks(classes).enumerate() {
        if !valid[row] {
            lengths.push(0);
            continue;
        }
        for c in top_k_indices(p, top_k) {
            class.push(c as i32);
            label.push(labels.and_then(|l| l.get(c)).cloned());
            probability.push(p[c]);
        }
        lengths.push(top_k);
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
        field,
        OffsetBuffer::from_lengths(lengths),
        Arc::new(entries),
        nulls,
    )?))
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
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_value_then_index() {
        assert_eq!(top_k_indices(&[0.1, 0.5, 0.2, 0.5], 3), vec![1, 3, 2]);
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[0] - 0.5).abs() < 1e-6 && p[2] == 0.0);
    }
}
