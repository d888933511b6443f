//! [`DeepImagePredictor`]: a pretrained classifier as a [`Transformer`](crate::Transformer)
//! that adds the top-K classes of each image (sparkdl's `DeepImagePredictor` with
//! `decodePredictions`): its params and its per-image output (the stage itself is a
//! [`NetworkTransformer`]).

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int32Array, ListArray, StringArray, StructArray,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::LoadedModel;
use crate::network_stage::{NetworkOutput, NetworkParams};
use crate::network_transformer::{NetworkStageParams, NetworkTransformer};
use crate::params::{Params, check, setters, string_setters};

/// Params of [`DeepImagePredictor`] (sparkdl names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeepImagePredictorParams {
    /// `inputCol`, `modelName`, `batchSize`, `device`, ... (saved flat, as Spark names).
    #[serde(flatten)]
    pub network: NetworkParams,
    pub output_col: String,
    /// `true`: top-K `(class, label, probability)`; `false`: all class probabilities.
    pub decode_predictions: bool,
    pub top_k: usize,
}

impl Default for DeepImagePredictorParams {
    fn default() -> Self {
        DeepImagePredictorParams {
            network: NetworkParams::default(),
            output_col: "predicted_labels".into(),
            decode_predictions: true,
            top_k: 5,
        }
    }
}

impl AsRef<NetworkParams> for DeepImagePredictorParams {
    fn as_ref(&self) -> &NetworkParams {
        &self.network
    }
}

impl AsMut<NetworkParams> for DeepImagePredictorParams {
    fn as_mut(&mut self) -> &mut NetworkParams {
        &mut self.network
    }
}

impl Params for DeepImagePredictorParams {
    const STAGE: &'static str = "DeepImagePredictor";

    fn docs() -> &'static [(&'static str, &'static str)] {
        static DOCS: LazyLock<Vec<(&str, &str)>> = LazyLock::new(|| {
            NetworkParams::docs_with(&[
                (
                    "modelName",
                    "named pretrained classifier, e.g. EfficientNetLite0",
                ),
                ("outputCol", "prediction column to add"),
                (
                    "decodePredictions",
                    "true: array<struct<class, label, probability>> of the topK classes; false: all class probabilities",
                ),
                ("topK", "classes kept per image when decoding"),
            ])
        });
        &DOCS
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        self.network.validate(s)?;
        check::non_empty(s, "outputCol", &self.output_col)?;
        check::in_range(s, "topK", self.top_k as f64, 1.0, 1e6)
    }
}

impl NetworkStageParams for DeepImagePredictorParams {
    type Output = Predictions;

    fn output_col(&self) -> &str {
        &self.output_col
    }

    fn output(&self, model: &LoadedModel) -> Result<Predictions> {
        let classes = model.manifest.num_classes;
        if classes == 0 {
            return Err(Error::param(
                Self::STAGE,
                if self.network.model_file.is_empty() {
                    "modelName"
                } else {
                    "modelFile"
                },
                format!(
                    "model `{}` has no classifier head{}",
                    model.manifest.name,
                    if self.network.model_file.is_empty() {
                        ""
                    } else {
                        " (name the logits output in onnx.logits of its description)"
                    }
                ),
            ));
        }
        Ok(Predictions {
            top_k: self.top_k.min(classes),
            decode: self.decode_predictions,
        })
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
pub type DeepImagePredictor = NetworkTransformer<DeepImagePredictorParams>;

impl DeepImagePredictor {
    string_setters! { with_output_col: output_col }
    setters! {
        with_top_k: top_k: usize,
        with_decode_predictions: decode_predictions: bool,
    }
}

/// The predictor's output: softmax probabilities of every class, or the top K decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Predictions {
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
