//! [`StringIndexer`] (labels -> 0..k-1 indices, so folder names become classes) and
//! [`IndexToString`] (predicted indices -> names), with Spark's params and ordering rules.
//!
//! Over 600 lines on purpose: its unit tests (the last ~40 lines) sit with the two stages they
//! pin down; the code itself is ~560 lines, one concern (label <-> index).

use std::any::Any;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, Float64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::exec_err;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, ident};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::columns::require_column;
use crate::error::{Error, Result};
use crate::params::{
    ParamMap, Params, Rejected, check, choice, choice_setters, new_uid, string_setters,
};
use crate::persistence::SavedStage;
use crate::registry::{
    LoadedStage, PersistedStage, StageRegistry, params_stage_methods, params_stage_persisted,
};
use crate::stage::{Estimator, Transformer};

choice! {
    /// `handleInvalid`: what [`StringIndexerModel`] does with unseen or null labels.
    pub enum HandleInvalid {
        /// Fail the query (the default).
        Error = "error",
        /// Drop the row.
        Skip = "skip",
        /// Index k (one past the known labels).
        Keep = "keep",
    }
}

choice! {
    /// `stringOrderType`: the order of [`StringIndexer`]'s labels (ties alphabetical).
    pub enum StringOrderType {
        FrequencyDesc = "frequencyDesc",
        FrequencyAsc = "frequencyAsc",
        AlphabetDesc = "alphabetDesc",
        AlphabetAsc = "alphabetAsc",
    }
}

/// Params of [`StringIndexer`] / [`StringIndexerModel`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StringIndexerParams {
    pub input_col: String,
    pub output_col: String,
    pub handle_invalid: HandleInvalid,
    pub string_order_type: StringOrderType,
    /// Strings the setters could not parse, reported by `validate`.
    #[serde(skip)]
    #[doc(hidden)]
    pub rejected: Rejected,
}

impl Default for StringIndexerParams {
    fn default() -> Self {
        StringIndexerParams {
            input_col: "label".into(),
            output_col: "labelIndex".into(),
            handle_invalid: HandleInvalid::Error,
            string_order_type: StringOrderType::FrequencyDesc,
            rejected: Rejected::default(),
        }
    }
}

impl Params for StringIndexerParams {
    const STAGE: &'static str = "StringIndexer";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("inputCol", "column of labels (cast to string)"),
            ("outputCol", "column of indices (Float64) to add"),
            (
                "handleInvalid",
                "unseen or null labels: error, skip or keep (index = #labels)",
            ),
            (
                "stringOrderType",
                "frequencyDesc, frequencyAsc, alphabetDesc or alphabetAsc (ties alphabetical)",
            ),
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        check::non_empty(s, "inputCol", &self.input_col)?;
        check::non_empty(s, "outputCol", &self.output_col)?;
        self.rejected.check(s)
    }

    fn rejected(&self) -> &Rejected {
        &self.rejected
    }
}

/// Learns the label vocabulary of a column.
#[derive(Debug, Clone)]
pub struct StringIndexer {
    uid: String,
    params: StringIndexerParams,
}

impl Default for StringIndexer {
    fn default() -> Self {
        Self::new()
    }
}

impl StringIndexer {
    pub fn new() -> Self {
        StringIndexer {
            uid: new_uid("StringIndexer"),
            params: StringIndexerParams::default(),
        }
    }
    pub fn params(&self) -> &StringIndexerParams {
        &self.params
    }
    string_setters! {
        with_input_col: input_col,
        with_output_col: output_col,
    }
    choice_setters! {
        with_handle_invalid: handle_invalid: HandleInvalid = "handleInvalid",
        with_string_order_type: string_order_type: StringOrderType = "stringOrderType",
    }
}

/// Checks that column `name` can be read as labels (cast to strings).
fn require_label_column(df: &DataFrame, name: &str) -> Result<()> {
    let t = require_column(df, name)?;
    if !datafusion::arrow::compute::can_cast_types(&t, &DataType::Utf8) {
        return Err(Error::column(
            name,
            format!("expected labels (strings or numbers), found {t}"),
        ));
    }
    Ok(())
}

fn to_strings(array: &ArrayRef) -> datafusion::common::Result<StringArray> {
    let cast = cast(array, &DataType::Utf8)?;
    match cast.as_any().downcast_ref::<StringArray>() {
        Some(s) => Ok(s.clone()),
        None => exec_err!("cannot read {} as strings", array.data_type()),
    }
}

#[async_trait]
impl Estimator for StringIndexer {
    type Model = StringIndexerModel;

    fn uid(&self) -> &str {
        &self.uid
    }

    async fn fit(&self, df: &DataFrame) -> Result<StringIndexerModel> {
        self.params.validate()?;
        let input = &self.params.input_col;
        require_label_column(df, input).map_err(|e| e.in_stage(&self.uid))?;
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut stream = df
            .clone()
            .select(vec![ident(input.as_str())])?
            .execute_stream()
            .await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            for value in to_strings(batch.column(0))?.iter().flatten() {
                *counts.entry(value.to_string()).or_default() += 1;
            }
        }
        if counts.is_empty() {
            return Err(Error::Fit(format!(
                "StringIndexer: column `{input}` has no non-null values"
            )));
        }
        let mut labels: Vec<(String, u64)> = counts.into_iter().collect();
        match self.params.string_order_type {
            StringOrderType::FrequencyDesc => {
                labels.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)))
            }
            StringOrderType::FrequencyAsc => {
                labels.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
            }
            StringOrderType::AlphabetDesc => labels.sort_by(|a, b| b.0.cmp(&a.0)),
            StringOrderType::AlphabetAsc => labels.sort_by(|a, b| a.0.cmp(&b.0)),
        }
        Ok(StringIndexerModel {
            uid: self.uid.clone(),
            params: self.params.clone(),
            labels: labels.into_iter().map(|(l, _)| l).collect(),
        })
    }

    params_stage_methods!(estimator);
}

params_stage_persisted!(StringIndexer, "StringIndexer", Estimator);

/// A fitted [`StringIndexer`]: maps each known label to its index.
#[derive(Debug, Clone)]
pub struct StringIndexerModel {
    uid: String,
    params: StringIndexerParams,
    labels: Vec<String>,
}

impl StringIndexerModel {
    /// A model with a given vocabulary (index = position).
    pub fn from_labels(params: StringIndexerParams, labels: Vec<String>) -> Result<Self> {
        params.validate()?;
        Ok(StringIndexerModel {
            uid: new_uid("StringIndexerModel"),
            params,
            labels,
        })
    }

    /// The labels in index order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn params(&self) -> &StringIndexerParams {
        &self.params
    }
}

impl PersistedStage for StringIndexerModel {
    const CLASS: &'static str = "StringIndexerModel";

    fn restore(saved: &SavedStage, _: &StageRegistry) -> Result<Self> {
        Ok(StringIndexerModel {
            uid: saved.uid.clone(),
            params: saved.params()?,
            labels: saved.extra_field("labels")?,
        })
    }

    fn into_stage(self) -> LoadedStage {
        LoadedStage::Transformer(Arc::new(self))
    }
}

impl Transformer for StringIndexerModel {
    fn uid(&self) -> &str {
        &self.uid
    }

    /// As in Spark, a DataFrame without the input column (e.g. new, unlabelled images) passes
    /// through unchanged.
    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        self.params.validate()?;
        if require_column(&df, &self.params.input_col).is_err() {
            return Ok(df);
        }
        require_label_column(&df, &self.params.input_col).map_err(|e| e.in_stage(&self.uid))?;
        let udf = ScalarUDF::new_from_impl(IndexUdf::new(
            &self.labels,
            self.params.handle_invalid,
            &self.params.input_col,
        ));
        let out = self.params.output_col.as_str();
        let df = df.with_column(out, udf.call(vec![ident(self.params.input_col.as_str())]))?;
        Ok(if self.params.handle_invalid == HandleInvalid::Skip {
            df.filter(ident(out).is_not_null())?
        } else {
            df
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn labels_of(&self, column: &str) -> Option<&[String]> {
        (column == self.params.output_col).then_some(self.labels.as_slice())
    }

    fn save_stage(&self) -> Result<SavedStage> {
        Ok(SavedStage::of(Self::CLASS, &self.uid, &self.params)
            .with_extra(serde_json::json!({ "labels": self.labels })))
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        Ok(Arc::new(StringIndexerModel {
            uid: self.uid.clone(),
            params: overrides.apply(&self.uid, &self.params)?,
            labels: self.labels.clone(),
        }))
    }
}

#[derive(Debug)]
struct IndexUdf {
    index: HashMap<String, f64>,
    labels: Vec<String>,
    handle_invalid: HandleInvalid,
    column: String,
    signature: Signature,
}

impl IndexUdf {
    fn new(labels: &[String], handle_invalid: HandleInvalid, column: &str) -> Self {
        IndexUdf {
            index: labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), i as f64))
                .collect(),
            labels: labels.to_vec(),
            handle_invalid,
            column: column.to_string(),
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl PartialEq for IndexUdf {
    fn eq(&self, other: &Self) -> bool {
        (&self.labels, &self.handle_invalid, &self.column)
            == (&other.labels, &other.handle_invalid, &other.column)
    }
}
impl Eq for IndexUdf {}
impl Hash for IndexUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (&self.labels, &self.handle_invalid, &self.column).hash(state);
    }
}

impl ScalarUDFImpl for IndexUdf {
    fn name(&self) -> &str {
        "string_index"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Float64)
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let strings = to_strings(&arrays[0])?;
            let keep = self.labels.len() as f64;
            let mut out = Vec::with_capacity(strings.len());
            for value in strings.iter() {
                let index = value.and_then(|v| self.index.get(v).copied());
                out.push(match (index, self.handle_invalid) {
                (Some(i), _) => Some(i),
                (None, HandleInvalid::Keep) => Some(keep),
                (None, HandleInvalid::Skip) => None,
                (None, HandleInvalid::Error) => {
                    return exec_err!(
                        "StringIndexer: column `{}` has {} label {:?} (known: {}); set handleInvalid to skip or keep",
                        self.column,
                        if value.is_some() { "unseen" } else { "null" },
                        value.unwrap_or("null"),
                        self.labels.len()
                    );
                }
            });
            }
            Ok(ColumnarValue::Array(
                Arc::new(Float64Array::from(out)) as ArrayRef
            ))
        })
    }
}

/// Params of [`IndexToString`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IndexToStringParams {
    pub input_col: String,
    pub output_col: String,
    pub labels: Vec<String>,
}

impl Default for IndexToStringParams {
    fn default() -> Self {
        IndexToStringParams {
            input_col: "prediction".into(),
            output_col: "predictedLabel".into(),
            labels: Vec::new(),
        }
    }
}

impl Params for IndexToStringParams {
    const STAGE: &'static str = "IndexToString";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("inputCol", "column of indices (numeric)"),
            ("outputCol", "column of names to add"),
            (
                "labels",
                "names in index order, e.g. StringIndexerModel::labels()",
            ),
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        check::non_empty(s, "inputCol", &self.input_col)?;
        check::non_empty(s, "outputCol", &self.output_col)?;
        if self.labels.is_empty() {
            return Err(Error::param(s, "labels", "must not be empty"));
        }
        Ok(())
    }
}

/// Maps indices back to names (e.g. predictions to folder names).
#[derive(Debug, Clone)]
pub struct IndexToString {
    uid: String,
    params: IndexToStringParams,
}

impl Default for IndexToString {
    fn default() -> Self {
        Self::new()
    }
}

impl IndexToString {
    pub fn new() -> Self {
        IndexToString {
            uid: new_uid("IndexToString"),
            params: IndexToStringParams::default(),
        }
    }
    pub fn params(&self) -> &IndexToStringParams {
        &self.params
    }
    string_setters! {
        with_input_col: input_col,
        with_output_col: output_col,
    }
    pub fn with_labels(mut self, labels: &[String]) -> Self {
        self.params.labels = labels.to_vec();
        self
    }
}

impl Transformer for IndexToString {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        self.params.validate()?;
        let input = self.params.input_col.as_str();
        let dtype = require_column(&df, input).map_err(|e| e.in_stage(&self.uid))?;
        if !dtype.is_numeric() {
            return Err(Error::column(
                input,
                format!("expected a numeric index column, got {dtype}"),
            )
            .in_stage(&self.uid));
        }
        let udf = ScalarUDF::new_from_impl(LabelUdf {
            labels: self.params.labels.clone(),
            column: input.to_string(),
            signature: Signature::any(1, Volatility::Immutable),
        });
        Ok(df.with_column(&self.params.output_col, udf.call(vec![ident(input)]))?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    params_stage_methods!(transformer);
}

params_stage_persisted!(IndexToString, "IndexToString", Transformer);

#[derive(Debug, PartialEq, Eq, Hash)]
struct LabelUdf {
    labels: Vec<String>,
    column: String,
    signature: Signature,
}

impl ScalarUDFImpl for LabelUdf {
    fn name(&self) -> &str {
        "index_to_string"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let indices = cast(&arrays[0], &DataType::Float64)?;
            let Some(indices) = indices.as_any().downcast_ref::<Float64Array>() else {
                return exec_err!("IndexToString: cannot read `{}` as numbers", self.column);
            };
            let mut out = Vec::with_capacity(indices.len());
            for index in indices.iter() {
                out.push(match index {
                    None => None,
                    Some(i) if i >= 0.0 && i.fract() == 0.0 && (i as usize) < self.labels.len() => {
                        Some(self.labels[i as usize].as_str())
                    }
                    Some(i) => {
                        return exec_err!(
                            "IndexToString: index {i} in `{}` is not in 0..{}",
                            self.column,
                            self.labels.len()
                        );
                    }
                });
            }
            Ok(ColumnarValue::Array(
                Arc::new(StringArray::from(out)) as ArrayRef
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_keep_their_spark_strings_in_json_and_param_maps() {
        let indexer = StringIndexer::new()
            .with_handle_invalid("skip")
            .with_string_order_type(StringOrderType::AlphabetAsc);
        let json = indexer.params().to_json();
        assert_eq!(json["handleInvalid"], "skip");
        assert_eq!(json["stringOrderType"], "alphabetAsc");

        let uid = Estimator::uid(&indexer);
        let keep = ParamMap::new().put(uid, "handleInvalid", "keep");
        let copy = indexer.copy_with(&keep).unwrap();
        assert_eq!(copy.params().handle_invalid, HandleInvalid::Keep);
        let bad = ParamMap::new()
            .put(uid, "outputCol", "idx")
            .put(uid, "handleInvalid", "bogus");
        match indexer.copy_with(&bad) {
            Err(Error::InvalidParam { stage, param, .. }) => {
                assert_eq!(
                    (stage.as_str(), param.as_str()),
                    ("StringIndexer", "handleInvalid")
                )
            }
            other => panic!("expected an invalid handleInvalid, got {other:?}"),
        }

        // A string a setter could not parse is written as given: a saved copy fails to load.
        let rejected = StringIndexer::new().with_handle_invalid("bogus");
        let json = rejected.params().to_json();
        assert_eq!(json["handleInvalid"], "bogus");
        assert!(StringIndexerParams::from_json(json).is_err());
        let fixed = rejected.with_handle_invalid(HandleInvalid::Error);
        assert!(fixed.params().validate().is_ok());
    }
}
