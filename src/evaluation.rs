//! [`MulticlassClassificationEvaluator`] (Spark's metrics: accuracy, f1, weightedPrecision,
//! weightedRecall, logLoss) and a [`ConfusionMatrix`] helper. Both stream the prediction
//! columns: memory is O(classes^2), not O(rows).

use std::fmt;

use datafusion::arrow::array::{Array, AsArray, Float64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::prelude::{DataFrame, ident};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::feature::require_column;
use crate::params::{Params, check};

/// Counts of (actual, predicted) class pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    /// `counts[actual][predicted]`, square, sized to the largest index seen + 1.
    pub counts: Vec<Vec<u64>>,
    /// Optional class names (index order) used when printing.
    pub labels: Vec<String>,
}

impl ConfusionMatrix {
    fn add(&mut self, actual: usize, predicted: usize) {
        let needed = actual.max(predicted) + 1;
        if needed > self.counts.len() {
            for row in &mut self.counts {
                row.resize(needed, 0);
            }
            self.counts.resize(needed, vec![0; needed]);
        }
        self.counts[actual][predicted] += 1;
    }

    /// Number of rows counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Fraction of rows on the diagonal.
    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        correct as f64 / self.total().max(1) as f64
    }

    /// (precision, recall, f1) weighted by each class's share of actual rows, as Spark does.
    pub fn weighted_scores(&self) -> (f64, f64, f64) {
        let n = self.total().max(1) as f64;
        let k = self.counts.len();
        let (mut precision, mut recall, mut f1) = (0.0, 0.0, 0.0);
        for c in 0..k {
            let actual: u64 = self.counts[c].iter().sum();
            if actual == 0 {
                continue;
            }
            let predicted: u64 = (0..k).map(|r| self.counts[r][c]).sum();
            let tp = self.counts[c][c] as f64;
            let p = if predicted == 0 {
                0.0
            } else {
                tp / predicted as f64
            };
            let r = tp / actual as f64;
            let f = if p + r == 0.0 {
                0.0
            } else {
                2.0 * p * r / (p + r)
            };
            let weight = actual as f64 / n;
            precision += p * weight;
            recall += r * weight;
            f1 += f * weight;
        }
        (precision, recall, f1)
    }

    /// Names rows and columns when printing.
    pub fn with_labels(mut self, labels: &[String]) -> Self {
        self.labels = labels.to_vec();
        self
    }
}

impl fmt::Display for ConfusionMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.counts.len();
        let name = |i: usize| self.labels.get(i).cloned().unwrap_or_else(|| i.to_string());
        let width = (0..k).map(|i| name(i).len()).max().unwrap_or(1).max(6);
        write!(f, "{:>width$} |", "actual\\pred")?;
        for c in 0..k {
            write!(f, " {:>5}", abbreviate(&name(c)))?;
        }
        writeln!(f)?;
        for (r, row) in self.counts.iter().enumerate() {
            write!(f, "{:>width$} |", name(r), width = width.max(11))?;
            for count in row {
                write!(f, " {count:>5}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn abbreviate(s: &str) -> String {
    s.chars().take(5).collect()
}

/// Streams (label, prediction[, probability of the label]) and fills a confusion matrix.
async fn accumulate(
    df: &DataFrame,
    label_col: &str,
    prediction_col: &str,
    probability_col: Option<&str>,
) -> Result<(ConfusionMatrix, f64)> {
    let mut columns = vec![ident(label_col), ident(prediction_col)];
    for c in [label_col, prediction_col] {
        let t = require_column(df, c)?;
        if !t.is_numeric() {
            return Err(Error::column(
                c,
                format!("expected a numeric column, got {t}"),
            ));
        }
    }
    if let Some(p) = probability_col {
        require_column(df, p)?;
        columns.push(ident(p));
    }
    let mut matrix = ConfusionMatrix {
        counts: Vec::new(),
        labels: Vec::new(),
    };
    let mut log_loss = 0.0;
    let mut stream = df.clone().select(columns)?.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let labels = cast(batch.column(0), &DataType::Float64)?;
        let predictions = cast(batch.column(1), &DataType::Float64)?;
        let labels = labels.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        let predictions = predictions.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        let probabilities = batch
            .columns()
            .get(2)
            .and_then(|c| c.as_fixed_size_list_opt());
        for row in 0..batch.num_rows() {
            if labels.is_null(row) || predictions.is_null(row) {
                continue;
            }
            let (label, prediction) = (labels.value(row), predictions.value(row));
            let as_class = |v: f64, what: &str| {
                if v >= 0.0 && v.fract() == 0.0 && v < 1e6 {
                    Ok(v as usize)
                } else {
                    Err(Error::column(
                        what,
                        format!("class indices must be integers >= 0, got {v}"),
                    ))
                }
            };
            let label = as_class(label, label_col)?;
            matrix.add(label, as_class(prediction, prediction_col)?);
            if let Some(probs) = probabilities {
                let p = if probs.is_null(row) {
                    0.0
                } else {
                    let values = probs.value(row);
                    let values = cast(&values, &DataType::Float64)?;
                    let values = values
                        .as_any()
                        .downcast_ref::<Float64Array>()
                        .map_or(0.0, |v| if label < v.len() { v.value(label) } else { 0.0 });
                    values
                };
                log_loss -= p.max(1e-15).ln();
            }
        }
    }
    if matrix.total() == 0 {
        return Err(Error::column(
            label_col,
            "no rows with both a label and a prediction to evaluate",
        ));
    }
    let n = matrix.total() as f64;
    Ok((matrix, log_loss / n))
}

/// The confusion matrix of `prediction_col` against `label_col`.
pub async fn confusion_matrix(
    df: &DataFrame,
    label_col: &str,
    prediction_col: &str,
) -> Result<ConfusionMatrix> {
    Ok(accumulate(df, label_col, prediction_col, None).await?.0)
}

/// Params of [`MulticlassClassificationEvaluator`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MulticlassClassificationEvaluatorParams {
    pub metric_name: String,
    pub label_col: String,
    pub prediction_col: String,
    pub probability_col: String,
}

impl Default for MulticlassClassificationEvaluatorParams {
    fn default() -> Self {
        MulticlassClassificationEvaluatorParams {
            metric_name: "f1".into(),
            label_col: "label".into(),
            prediction_col: "prediction".into(),
            probability_col: "probability".into(),
        }
    }
}

/// Metric names accepted by `metricName`.
pub const METRICS: &[&str] = &[
    "f1",
    "accuracy",
    "weightedPrecision",
    "weightedRecall",
    "logLoss",
];

impl Params for MulticlassClassificationEvaluatorParams {
    const STAGE: &'static str = "MulticlassClassificationEvaluator";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            (
                "metricName",
                "f1 (default), accuracy, weightedPrecision, weightedRecall or logLoss",
            ),
            ("labelCol", "true class index column"),
            ("predictionCol", "predicted class index column"),
            ("probabilityCol", "class probability vectors (for logLoss)"),
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        if !METRICS.contains(&self.metric_name.as_str()) {
            return Err(Error::param(
                s,
                "metricName",
                format!(
                    "`{}` is not one of {}",
                    self.metric_name,
                    METRICS.join(", ")
                ),
            ));
        }
        check::non_empty(s, "labelCol", &self.label_col)?;
        check::non_empty(s, "predictionCol", &self.prediction_col)?;
        check::non_empty(s, "probabilityCol", &self.probability_col)
    }
}

/// Scores predictions of a multiclass classifier, as Spark's evaluator of the same name.
#[derive(Debug, Clone, Default)]
pub struct MulticlassClassificationEvaluator {
    params: MulticlassClassificationEvaluatorParams,
}

impl MulticlassClassificationEvaluator {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn params(&self) -> &MulticlassClassificationEvaluatorParams {
        &self.params
    }
    pub fn with_metric_name(mut self, v: impl Into<String>) -> Self {
        self.params.metric_name = v.into();
        self
    }
    pub fn with_label_col(mut self, v: impl Into<String>) -> Self {
        self.params.label_col = v.into();
        self
    }
    pub fn with_prediction_col(mut self, v: impl Into<String>) -> Self {
        self.params.prediction_col = v.into();
        self
    }
    pub fn with_probability_col(mut self, v: impl Into<String>) -> Self {
        self.params.probability_col = v.into();
        self
    }

    /// Whether a larger value of the metric is better (false for logLoss).
    pub fn is_larger_better(&self) -> bool {
        self.params.metric_name != "logLoss"
    }

    /// Runs the plan and returns the metric.
    pub async fn evaluate(&self, df: &DataFrame) -> Result<f64> {
        Ok(self.evaluate_all(df).await?[self.params.metric_name.as_str()])
    }

    /// Runs the plan once and returns every metric by name.
    pub async fn evaluate_all(
        &self,
        df: &DataFrame,
    ) -> Result<std::collections::BTreeMap<&'static str, f64>> {
        self.params.validate()?;
        let p = &self.params;
        let has_probability = df
            .schema()
            .field_with_unqualified_name(&p.probability_col)
            .is_ok();
        if p.metric_name == "logLoss" && !has_probability {
            return Err(Error::column(
                &p.probability_col,
                "logLoss needs a probability column",
            ));
        }
        let probability = has_probability.then_some(p.probability_col.as_str());
        let (matrix, log_loss) =
            accumulate(df, &p.label_col, &p.prediction_col, probability).await?;
        let (precision, recall, f1) = matrix.weighted_scores();
        let mut metrics = std::collections::BTreeMap::new();
        metrics.insert("accuracy", matrix.accuracy());
        metrics.insert("weightedPrecision", precision);
        metrics.insert("weightedRecall", recall);
        metrics.insert("f1", f1);
        metrics.insert("logLoss", if has_probability { log_loss } else { f64::NAN });
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_scores_match_hand_computation() {
        // actual 0: 2 rows (1 right), actual 1: 2 rows (2 right).
        let mut m = ConfusionMatrix {
            counts: vec![],
            labels: vec![],
        };
        for (a, p) in [(0, 0), (0, 1), (1, 1), (1, 1)] {
            m.add(a, p);
        }
        assert_eq!(m.accuracy(), 0.75);
        let (p, r, f) = m.weighted_scores();
        // class 0: p=1, r=.5, f=2/3; class 1: p=2/3, r=1, f=.8; weights .5/.5
        assert!((p - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((r - 0.75).abs() < 1e-12);
        assert!((f - (2.0 / 3.0 + 0.8) / 2.0).abs() < 1e-12);
    }
}
