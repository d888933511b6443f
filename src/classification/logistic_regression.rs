//! [`LogisticRegression`] (Estimator) and [`LogisticRegressionModel`] (Transformer) over
//! DataFrame columns, with Spark's params and defaults. The maths is in `logistic_math`.
//!
//! Near 700 lines on purpose: params, the estimator, the fitted model and its persistence are
//! one stage pair that Spark keeps in one file too (`LogisticRegression.scala`); the maths is
//! already apart.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Float64Array,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type};
use datafusion::common::exec_err;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, ident};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::logistic_math::{Dataset, Family, FitSettings, FittedLogistic, argmax, fit};
use crate::columns::require_column;
use crate::error::{Error, Result};
use crate::params::{ParamMap, Params, check, new_uid, setters, string_setters};
use crate::persistence::SavedStage;
use crate::registry::{
    LoadedStage, PersistedStage, StageRegistry, params_stage_methods, params_stage_persisted,
};
use crate::stage::{ClassifierColumns, Estimator, Transformer};
use safetensors::{Dtype, tensor::TensorView};

/// Params of [`LogisticRegression`], with Spark's names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogisticRegressionParams {
    pub max_iter: usize,
    pub reg_param: f64,
    pub elastic_net_param: f64,
    pub tol: f64,
    pub fit_intercept: bool,
    pub standardization: bool,
    pub family: Family,
    pub features_col: String,
    pub label_col: String,
    pub weight_col: String,
    pub prediction_col: String,
    pub probability_col: String,
    pub raw_prediction_col: String,
}

impl Default for LogisticRegressionParams {
    fn default() -> Self {
        LogisticRegressionParams {
            max_iter: 100,
            reg_param: 0.0,
            elastic_net_param: 0.0,
            tol: 1e-6,
            fit_intercept: true,
            standardization: true,
            family: Family::Auto,
            features_col: "features".into(),
            label_col: "label".into(),
            weight_col: String::new(),
            prediction_col: "prediction".into(),
            probability_col: "probability".into(),
            raw_prediction_col: "rawPrediction".into(),
        }
    }
}

impl Params for LogisticRegressionParams {
    const STAGE: &'static str = "LogisticRegression";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("maxIter", "maximum number of optimiser iterations (>= 0)"),
            ("regParam", "regularisation strength lambda (>= 0)"),
            (
                "elasticNetParam",
                "alpha in [0, 1]: 0 = L2 (ridge), 1 = L1 (lasso)",
            ),
            (
                "tol",
                "convergence tolerance on the relative objective change (>= 0)",
            ),
            ("fitIntercept", "whether to fit intercepts"),
            (
                "standardization",
                "standardise features before fitting (coefficients are returned on the original scale)",
            ),
            ("family", "auto, binomial or multinomial"),
            ("featuresCol", "feature vector column"),
            ("labelCol", "label column: class indices 0..k-1"),
            ("weightCol", "row weight column (empty = all 1)"),
            ("predictionCol", "predicted class index column"),
            ("probabilityCol", "class probability vector column"),
            ("rawPredictionCol", "margin vector column"),
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        check::at_least(s, "regParam", self.reg_param, 0.0)?;
        check::in_range(s, "elasticNetParam", self.elastic_net_param, 0.0, 1.0)?;
        check::at_least(s, "tol", self.tol, 0.0)?;
        check::non_empty(s, "featuresCol", &self.features_col)?;
        check::non_empty(s, "labelCol", &self.label_col)?;
        check::non_empty(s, "predictionCol", &self.prediction_col)?;
        check::non_empty(s, "probabilityCol", &self.probability_col)?;
        check::non_empty(s, "rawPredictionCol", &self.raw_prediction_col)
    }
}

impl LogisticRegressionParams {
    fn settings(&self) -> FitSettings {
        FitSettings {
            max_iter: self.max_iter,
            reg_param: self.reg_param,
            elastic_net_param: self.elastic_net_param,
            tol: self.tol,
            fit_intercept: self.fit_intercept,
            standardization: self.standardization,
            family: self.family,
        }
    }
}

/// Logistic regression (binomial or multinomial) with L2, L1 or elastic-net regularisation.
#[derive(Debug, Clone)]
pub struct LogisticRegression {
    uid: String,
    params: LogisticRegressionParams,
}

impl Default for LogisticRegression {
    fn default() -> Self {
        Self::new()
    }
}

impl LogisticRegression {
    pub fn new() -> Self {
        Self::from_params(LogisticRegressionParams::default())
    }

    pub fn from_params(params: LogisticRegressionParams) -> Self {
        LogisticRegression {
            uid: new_uid("LogisticRegression"),
            params,
        }
    }

    pub fn params(&self) -> &LogisticRegressionParams {
        &self.params
    }

    setters! {
        with_max_iter: max_iter: usize,
        with_reg_param: reg_param: f64,
        with_elastic_net_param: elastic_net_param: f64,
        with_tol: tol: f64,
        with_fit_intercept: fit_intercept: bool,
        with_standardization: standardization: bool,
        with_family: family: Family,
    }

    string_setters! {
        with_features_col: features_col,
        with_label_col: label_col,
        with_weight_col: weight_col,
        with_prediction_col: prediction_col,
        with_probability_col: probability_col,
        with_raw_prediction_col: raw_prediction_col,
    }
}

/// Reads row `row` of a vector column (FixedSizeList or List of floats) as f32 values.
fn vector_values(array: &ArrayRef, row: usize) -> Option<Vec<f32>> {
    if array.is_null(row) {
        return None;
    }
    let values = match array.data_type() {
        DataType::FixedSizeList(..) => array.as_fixed_size_list().value(row),
        DataType::List(..) => array.as_list::<i32>().value(row),
        DataType::LargeList(..) => array.as_list::<i64>().value(row),
        _ => return None,
    };
    let values = cast(&values, &DataType::Float32).ok()?;
    let values = values.as_any().downcast_ref::<Float32Array>()?;
    Some(values.values().to_vec())
}

fn require_vector_column(df: &DataFrame, name: &str) -> Result<()> {
    let t = require_column(df, name)?;
    let ok = match &t {
        DataType::FixedSizeList(f, _) | DataType::List(f) | DataType::LargeList(f) => {
            f.data_type().is_floating() || f.data_type().is_integer()
        }
        _ => false,
    };
    if !ok {
        return Err(Error::column(
            name,
            format!("expected a vector column (list of numbers), got {t}"),
        ));
    }
    Ok(())
}

#[async_trait]
impl Estimator for LogisticRegression {
    type Model = LogisticRegressionModel;

    fn uid(&self) -> &str {
        &self.uid
    }

    async fn fit(&self, df: &DataFrame) -> Result<LogisticRegressionModel> {
        self.fit_columns(df)
            .await
            .map_err(|e| e.in_stage(&self.uid))
    }

    params_stage_methods!(estimator);
}

params_stage_persisted!(LogisticRegression, "LogisticRegression", Estimator);

impl LogisticRegression {
    async fn fit_columns(&self, df: &DataFrame) -> Result<LogisticRegressionModel> {
        let p = &self.params;
        p.validate()?;
        require_vector_column(df, &p.features_col)?;
        let label_type = require_column(df, &p.label_col)?;
        if !label_type.is_numeric() {
            return Err(Error::column(
                &p.label_col,
                format!(
                    "expected numeric class indices 0..k-1, got {label_type} (index strings with StringIndexer)"
                ),
            ));
        }
        let mut columns = vec![ident(p.features_col.as_str()), ident(p.label_col.as_str())];
        if !p.weight_col.is_empty() {
            let t = require_column(df, &p.weight_col)?;
            if !t.is_numeric() {
                return Err(Error::column(
                    &p.weight_col,
                    format!("expected numbers, got {t}"),
                ));
            }
            columns.push(ident(p.weight_col.as_str()));
        }

        // Partitions are read concurrently but concatenated in partition order: the same
        // rows in the same order on every run, so the fit is reproducible.
        let streams = df
            .clone()
            .select(columns)?
            .execute_stream_partitioned()
            .await?;
        let parts =
            futures::future::try_join_all(streams.into_iter().map(|s| read_rows(s, p))).await?;
        let (mut x, mut y, mut w) = (Vec::new(), Vec::new(), Vec::new());
        let mut d: Option<usize> = None;
        let mut skipped = 0usize;
        for part in parts {
            skipped += part.skipped;
            if part.y.is_empty() {
                continue;
            }
            match d {
                Some(d) if d != part.d => {
                    return Err(Error::column(
                        &p.features_col,
                        format!("vectors have different sizes: {d} and {}", part.d),
                    ));
                }
                _ => d = Some(part.d),
            }
            x.extend_from_slice(&part.x);
            y.extend_from_slice(&part.y);
            w.extend_from_slice(&part.w);
        }
        let Some(d) = d else {
            return Err(Error::Fit(format!(
                "LogisticRegression: no rows with non-null `{}` and `{}` to fit on",
                p.features_col, p.label_col
            )));
        };
        let data = Dataset {
            x: &x,
            y: &y,
            w: (!p.weight_col.is_empty()).then_some(w.as_slice()),
            n: y.len(),
            d,
        };
        let fitted = fit(&p.settings(), &data, None)
            .map_err(|e| Error::Fit(format!("LogisticRegression: {e}")))?;
        Ok(LogisticRegressionModel {
            uid: self.uid.clone(),
            params: p.clone(),
            fitted: Arc::new(fitted),
            num_skipped_rows: skipped,
        })
    }
}

const MODEL_DATA: &str = "model.safetensors";

/// What `extra` holds for a saved model; the coefficients go to safetensors (exact f64 bits).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModelFacts {
    num_classes: usize,
    num_features: usize,
    multinomial: bool,
    iterations: usize,
    converged: bool,
    objective_history: Vec<f64>,
}

fn f64_tensor(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn read_f64_tensor(
    tensors: &safetensors::SafeTensors,
    name: &str,
    shape: &[usize],
) -> std::result::Result<Vec<f64>, String> {
    let view = tensors
        .tensor(name)
        .map_err(|e| format!("tensor `{name}`: {e}"))?;
    if view.dtype() != safetensors::Dtype::F64 || view.shape() != shape {
        return Err(format!(
            "tensor `{name}` is {:?} {:?}, expected F64 {shape:?}",
            view.dtype(),
            view.shape()
        ));
    }
    Ok(view
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect())
}

/// The training rows of one partition: features, labels, weights.
#[derive(Default)]
struct Rows {
    x: Vec<f32>,
    y: Vec<f64>,
    w: Vec<f64>,
    d: usize,
    skipped: usize,
}

/// Reads (features, label[, weight]) batches; rows with a null vector or label are skipped.
async fn read_rows(
    mut stream: datafusion::execution::SendableRecordBatchStream,
    p: &LogisticRegressionParams,
) -> Result<Rows> {
    let mut rows = Rows::default();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let labels = cast(batch.column(1), &DataType::Float64)?;
        let labels = labels.as_primitive::<Float64Type>();
        let weights = match batch.columns().get(2) {
            Some(c) => Some(cast(c, &DataType::Float64)?),
            None => None,
        };
        for row in 0..batch.num_rows() {
            let Some(features) = vector_values(batch.column(0), row) else {
                rows.skipped += 1;
                continue;
            };
            if labels.is_null(row) {
                rows.skipped += 1;
                continue;
            }
            if rows.y.is_empty() {
                rows.d = features.len();
            } else if rows.d != features.len() {
                return Err(Error::column(
                    &p.features_col,
                    format!(
                        "vectors have different sizes: {} and {}",
                        rows.d,
                        features.len()
                    ),
                ));
            }
            rows.x.extend_from_slice(&features);
            rows.y.push(labels.value(row));
            if let Some(weights) = &weights {
                let weights = weights.as_primitive::<Float64Type>();
                rows.w.push(if weights.is_null(row) {
                    0.0
                } else {
                    weights.value(row)
                });
            }
        }
    }
    Ok(rows)
}

/// A fitted logistic regression: adds `rawPrediction`, `probability` and `prediction`.
#[derive(Debug, Clone)]
pub struct LogisticRegressionModel {
    uid: String,
    params: LogisticRegressionParams,
    fitted: Arc<FittedLogistic>,
    num_skipped_rows: usize,
}

impl LogisticRegressionModel {
    /// Rebuilds a model from its params and fitted coefficients (e.g. when loading).
    pub fn new(uid: String, params: LogisticRegressionParams, fitted: FittedLogistic) -> Self {
        LogisticRegressionModel {
            uid,
            params,
            fitted: Arc::new(fitted),
            num_skipped_rows: 0,
        }
    }
    pub fn params(&self) -> &LogisticRegressionParams {
        &self.params
    }
    /// Coefficients, intercepts and the optimiser's history.
    pub fn fitted(&self) -> &FittedLogistic {
        &self.fitted
    }
    pub fn num_classes(&self) -> usize {
        self.fitted.num_classes
    }
    pub fn num_features(&self) -> usize {
        self.fitted.num_features
    }
    /// Training rows skipped because their features or label were null (e.g. bad images).
    pub fn num_skipped_rows(&self) -> usize {
        self.num_skipped_rows
    }

    // `LogisticRegressionModel::load` is in the `builtin` module, above every stage.

    /// Saves the model: params in `metadata.json`, coefficients in `data/model.safetensors`.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::persistence::save(&self.save_stage()?, path.as_ref(), false)
    }
}

impl PersistedStage for LogisticRegressionModel {
    const CLASS: &'static str = "LogisticRegressionModel";

    fn restore(saved: &SavedStage, _: &StageRegistry) -> Result<Self> {
        let facts: ModelFacts = saved.extra_field("model")?;
        let bytes = saved.data_file(MODEL_DATA)?;
        let bad = |m: String| {
            Error::Persistence(format!(
                "LogisticRegressionModel `{}`: data/{MODEL_DATA}: {m}",
                saved.uid
            ))
        };
        let tensors =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let rows = if facts.multinomial {
            facts.num_classes
        } else {
            1
        };
        let coefficients =
            read_f64_tensor(&tensors, "coefficients", &[rows, facts.num_features]).map_err(bad)?;
        let intercepts = read_f64_tensor(&tensors, "intercepts", &[rows]).map_err(bad)?;
        let fitted = FittedLogistic {
            num_classes: facts.num_classes,
            num_features: facts.num_features,
            multinomial: facts.multinomial,
            coefficients,
            intercepts,
            objective_history: facts.objective_history,
            iterations: facts.iterations,
            converged: facts.converged,
        };
        Ok(Self::new(saved.uid.clone(), saved.params()?, fitted))
    }

    fn into_stage(self) -> LoadedStage {
        LoadedStage::Transformer(Arc::new(self))
    }
}

impl Transformer for LogisticRegressionModel {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        let p = &self.params;
        require_vector_column(&df, &p.features_col).map_err(|e| e.in_stage(&self.uid))?;
        let mut df = df;
        for (output, name) in [
            (Output::Raw, &p.raw_prediction_col),
            (Output::Probability, &p.probability_col),
            (Output::Prediction, &p.prediction_col),
        ] {
            let udf = ScalarUDF::new_from_impl(PredictUdf {
                fitted: Arc::clone(&self.fitted),
                output,
                signature: Signature::any(1, Volatility::Immutable),
            });
            df = df.with_column(name, udf.call(vec![ident(p.features_col.as_str())]))?;
        }
        Ok(df)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn classifier(&self) -> Option<ClassifierColumns> {
        let p = &self.params;
        Some(ClassifierColumns::new(
            &p.prediction_col,
            &p.probability_col,
            &p.label_col,
        ))
    }

    fn describe(&self) -> String {
        format!("LogisticRegressionModel({} classes)", self.num_classes())
    }

    fn save_stage(&self) -> Result<SavedStage> {
        let f = &self.fitted;
        let rows = f.intercepts.len();
        let coefficients = f64_tensor(&f.coefficients);
        let intercepts = f64_tensor(&f.intercepts);
        let tensors = [
            (
                "coefficients",
                TensorView::new(Dtype::F64, vec![rows, f.num_features], &coefficients),
            ),
            (
                "intercepts",
                TensorView::new(Dtype::F64, vec![rows], &intercepts),
            ),
        ];
        let mut views = Vec::new();
        for (name, view) in tensors {
            let view =
                view.map_err(|e| Error::Persistence(format!("{}: {name}: {e}", self.uid)))?;
            views.push((name, view));
        }
        let data = safetensors::serialize(views, None)
            .map_err(|e| Error::Persistence(format!("{}: {e}", self.uid)))?;
        let facts = ModelFacts {
            num_classes: f.num_classes,
            num_features: f.num_features,
            multinomial: f.multinomial,
            iterations: f.iterations,
            converged: f.converged,
            objective_history: f.objective_history.clone(),
        };
        Ok(SavedStage::of(Self::CLASS, &self.uid, &self.params)
            .with_extra(serde_json::json!({ "model": facts }))
            .with_data(MODEL_DATA, data))
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        let mut copy = self.clone();
        copy.params = overrides.apply(&self.uid, &self.params)?;
        Ok(Arc::new(copy))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Output {
    Raw,
    Probability,
    Prediction,
}

#[derive(Debug)]
struct PredictUdf {
    fitted: Arc<FittedLogistic>,
    output: Output,
    signature: Signature,
}

impl PartialEq for PredictUdf {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.fitted, &other.fitted) && self.output == other.output
    }
}
impl Eq for PredictUdf {}
impl Hash for PredictUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.fitted).hash(state);
        self.output.hash(state);
    }
}

impl PredictUdf {
    fn vector_type(&self) -> DataType {
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float64, true)),
            self.fitted.num_classes as i32,
        )
    }
}

impl ScalarUDFImpl for PredictUdf {
    fn name(&self) -> &str {
        match self.output {
            Output::Raw => "logistic_raw_prediction",
            Output::Probability => "logistic_probability",
            Output::Prediction => "logistic_prediction",
        }
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(match self.output {
            Output::Prediction => DataType::Float64,
            _ => self.vector_type(),
        })
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let features = &arrays[0];
            let k = self.fitted.num_classes;
            let n = features.len();
            let mut values = Vec::with_capacity(
                n * if self.output == Output::Prediction {
                    1
                } else {
                    k
                },
            );
            let mut valid = Vec::with_capacity(n);
            for row in 0..n {
                let Some(x) = vector_values(features, row) else {
                    values.extend(std::iter::repeat_n(
                        0.0,
                        if self.output == Output::Prediction {
                            1
                        } else {
                            k
                        },
                    ));
                    valid.push(false);
                    continue;
                };
                if x.len() != self.fitted.num_features {
                    return exec_err!(
                        "LogisticRegressionModel: feature vector has {} values, the model was fitted on {}",
                        x.len(),
                        self.fitted.num_features
                    );
                }
                let raw = self.fitted.raw_prediction(&x);
                match self.output {
                    Output::Raw => values.extend(raw),
                    Output::Probability => values.extend(self.fitted.probability(&raw)),
                    Output::Prediction => values.push(argmax(&raw) as f64),
                }
                valid.push(true);
            }
            let nulls = Some(NullBuffer::from(valid));
            let array: ArrayRef = match self.output {
                Output::Prediction => Arc::new(Float64Array::new(values.into(), nulls)),
                _ => {
                    let DataType::FixedSizeList(field, size) = self.vector_type() else {
                        unreachable!("vector_type is a FixedSizeList")
                    };
                    Arc::new(FixedSizeListArray::try_new(
                        field,
                        size,
                        Arc::new(Float64Array::from(values)),
                        nulls,
                    )?)
                }
            };
            Ok(ColumnarValue::Array(array))
        })
    }
}
