//! Models as SQL functions on a DataFusion [`SessionContext`].
//!
//! ```no_run
//! # async fn demo(model: deep_pipelines::PipelineModel) -> deep_pipelines::Result<()> {
//! use deep_pipelines::prelude::*;
//! use deep_pipelines::sql::{register_images_table, register_model};
//!
//! let ctx = SessionContext::new();
//! register_images_table(&ctx, "images", "photos/", ReadImagesOptions::default())?;
//! register_model(&ctx, "classify", &model)?;      // a fitted PipelineModel
//! ctx.sql("SELECT origin, classify(image)['label'] AS label FROM images").await?.show().await?;
//! # Ok(()) }
//! ```
//!
//! A registered function takes one argument, either an image struct (as [`crate::read_images`]
//! makes) or the raw encoded bytes of an image (`Binary`, e.g. a Parquet column of file
//! contents), and runs the fitted pipeline on each record batch at once: the network sees
//! `batchSize` images per forward pass and is loaded once per process. Null or undecodable
//! inputs give NULL. `EXPLAIN` shows the function as `name[stages]`, naming the network.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, StructArray, UInt32Array,
};
use datafusion::arrow::compute::{concat_batches, take};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Float64Type, Schema};
use datafusion::common::{exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};

use crate::classification::LogisticRegressionModel;
use crate::error::{Error, Result};
use crate::feature::StringIndexerModel;
use crate::featurizer::DeepImageFeaturizer;
use crate::image::{DecodeLimits, ReadImagesOptions, decode_binary_array, image_type, read_images};
use crate::pipeline::{PipelineModel, Transformer};
use crate::predictor::DeepImagePredictor;

/// Registers the images under `path` as table `name` (columns as [`read_images`] gives them).
pub fn register_images_table(
    ctx: &SessionContext,
    name: &str,
    path: impl AsRef<Path>,
    options: ReadImagesOptions,
) -> Result<()> {
    let df = read_images(ctx, path, options)?;
    ctx.register_table(name, df.into_view())?;
    Ok(())
}

/// Registers `featurizer` as SQL function `name`: image -> `FixedSizeList<Float32>` features.
pub fn register_featurizer(
    ctx: &SessionContext,
    name: &str,
    featurizer: &DeepImageFeaturizer,
) -> Result<()> {
    let model = PipelineModel::new(
        featurizer.uid().to_string(),
        vec![Arc::new(featurizer.clone())],
    );
    ctx.register_udf(model_function(name, &model)?);
    Ok(())
}

/// Registers a fitted pipeline as SQL function `name`.
///
/// A pipeline ending in a [`LogisticRegressionModel`] returns a struct
/// `{prediction: Float64, label: Utf8, probability: Float64}` (label from the pipeline's
/// [`StringIndexerModel`] when it has one; probability of the predicted class); any other
/// pipeline returns the column that its last stage adds.
pub fn register_model(ctx: &SessionContext, name: &str, model: &PipelineModel) -> Result<()> {
    ctx.register_udf(model_function(name, model)?);
    Ok(())
}

/// The function [`register_model`] registers, for use with the DataFrame API
/// (`udf.call(vec![col("image")])`).
pub fn model_function(name: &str, model: &PipelineModel) -> Result<ScalarUDF> {
    Ok(ScalarUDF::new_from_impl(ModelFunction::new(name, model)?))
}

/// What the function returns, found once from the pipeline's output schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Output {
    /// The pipeline's `prediction` / `probability` columns, plus labels when known.
    Prediction {
        prediction_col: String,
        probability_col: String,
        labels: Option<Vec<String>>,
    },
    /// One column of the pipeline's output, returned as is.
    Column { name: String, data_type: DataType },
}

fn prediction_type() -> DataType {
    DataType::Struct(Fields::from(vec![
        Field::new("prediction", DataType::Float64, true),
        Field::new("label", DataType::Utf8, true),
        Field::new("probability", DataType::Float64, true),
    ]))
}

const ROW: &str = "__row";

#[derive(Debug)]
struct ModelFunction {
    /// Name used in SQL (registered as an alias).
    sql_name: Vec<String>,
    /// `sql_name[stages]`: what EXPLAIN shows.
    display_name: String,
    model: PipelineModel,
    input_col: String,
    output: Output,
    signature: Signature,
}

/// One line per stage for EXPLAIN: the network's name for network stages, the class otherwise.
fn describe(stage: &Arc<dyn Transformer>) -> String {
    if let Some(f) = stage.as_any().downcast_ref::<DeepImageFeaturizer>() {
        return format!("DeepImageFeaturizer({})", f.params().model_name);
    }
    if let Some(p) = stage.as_any().downcast_ref::<DeepImagePredictor>() {
        return format!("DeepImagePredictor({})", p.params().model_name);
    }
    if let Some(lr) = stage.as_any().downcast_ref::<LogisticRegressionModel>() {
        return format!("LogisticRegressionModel({} classes)", lr.num_classes());
    }
    let uid = stage.uid();
    uid.rsplit_once('_')
        .map_or(uid, |(class, _)| class)
        .to_string()
}

impl ModelFunction {
    fn new(name: &str, model: &PipelineModel) -> Result<Self> {
        if name.is_empty() || name != name.to_lowercase() {
            return Err(Error::param(
                "register_model",
                "name",
                format!("`{name}` must be a non-empty lower-case SQL name"),
            ));
        }
        let input_col = model
            .stage::<DeepImageFeaturizer>()
            .map(|f| f.params().input_col.clone())
            .or_else(|| {
                model
                    .stage::<DeepImagePredictor>()
                    .map(|p| p.params().input_col.clone())
            })
            .ok_or_else(|| {
                Error::param(
                    "register_model",
                    "model",
                    "the pipeline has no DeepImageFeaturizer or DeepImagePredictor stage to feed images to",
                )
            })?;
        // Plan once on an empty input: checks the pipeline and finds the output types.
        let probe =
            SessionContext::new().read_batch(RecordBatch::new_empty(input_schema(&input_col)))?;
        let planned = model.transform(probe)?;
        let output = match model.stage::<LogisticRegressionModel>() {
            Some(lr) => Output::Prediction {
                prediction_col: lr.params().prediction_col.clone(),
                probability_col: lr.params().probability_col.clone(),
                labels: model
                    .stages()
                    .iter()
                    .filter_map(|s| s.as_any().downcast_ref::<StringIndexerModel>())
                    .find(|si| si.params().output_col == lr.params().label_col)
                    .map(|si| si.labels().to_vec()),
            },
            None => {
                let field = planned
                    .schema()
                    .fields()
                    .last()
                    .cloned()
                    .ok_or_else(|| Error::Fit("the pipeline outputs no column".into()))?;
                Output::Column {
                    name: field.name().clone(),
                    data_type: field.data_type().clone(),
                }
            }
        };
        let stages: Vec<String> = model.stages().iter().map(describe).collect();
        Ok(ModelFunction {
            sql_name: vec![name.to_string()],
            display_name: format!("{name}[{}]", stages.join(" -> ")),
            model: model.clone(),
            input_col,
            output,
            signature: Signature::any(1, Volatility::Volatile),
        })
    }

    fn output_columns(&self) -> Vec<&str> {
        match &self.output {
            Output::Prediction {
                prediction_col,
                probability_col,
                ..
            } => vec![ROW, prediction_col, probability_col],
            Output::Column { name, .. } => vec![ROW, name],
        }
    }

    /// Runs the pipeline on one batch of images. `invoke` is synchronous and already on an
    /// async worker, so the (async) plan runs to completion on a scoped thread of its own.
    fn run(&self, images: ArrayRef) -> Result<RecordBatch> {
        let rows = images.len();
        let schema = input_schema(&self.input_col);
        let row_ids = UInt32Array::from_iter_values(0..rows as u32);
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![images, Arc::new(row_ids)])?;
        let columns = self.output_columns();
        let outcome = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<RecordBatch> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .map_err(|e| Error::io("tokio runtime", e))?;
                    runtime.block_on(async {
                        let config = SessionConfig::new()
                            .with_target_partitions(1)
                            .with_batch_size(rows.max(1));
                        let ctx = SessionContext::new_with_config(config);
                        let df: DataFrame = self.model.transform(ctx.read_batch(batch)?)?;
                        let df = df.select_columns(&columns)?;
                        let out_schema = Arc::new(df.schema().as_arrow().clone());
                        let batches = df.collect().await?;
                        Ok(concat_batches(&out_schema, &batches)?)
                    })
                })
                .join()
        });
        outcome.unwrap_or_else(|_| {
            Err(Error::Fit(format!(
                "SQL function `{}`: the pipeline panicked",
                self.sql_name[0]
            )))
        })
    }

    /// Puts the pipeline's output rows back in input order (null where a row has no output).
    fn result(&self, out: &RecordBatch, rows: usize) -> Result<ArrayRef> {
        let mut position: Vec<Option<u32>> = vec![None; rows];
        let ids = out
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::UInt32Type>();
        for (j, id) in ids.iter().enumerate() {
            if let Some(slot) = id.and_then(|id| position.get_mut(id as usize)) {
                *slot = Some(j as u32);
            }
        }
        let indices = UInt32Array::from(position);
        let column = |i: usize| -> Result<ArrayRef> { Ok(take(out.column(i), &indices, None)?) };
        match &self.output {
            Output::Column { .. } => column(1),
            Output::Prediction { labels, .. } => {
                let prediction = datafusion::arrow::compute::cast(&column(1)?, &DataType::Float64)?;
                let prediction = prediction.as_primitive::<Float64Type>().clone();
                let probability = column(2)?;
                let probability = probability.as_fixed_size_list();
                let best: Float64Array = (0..rows)
                    .map(|r| {
                        if probability.is_null(r) {
                            return None;
                        }
                        let values = probability.value(r);
                        let values = values.as_primitive_opt::<Float64Type>()?;
                        values.iter().flatten().reduce(f64::max)
                    })
                    .collect();
                let label: StringArray = prediction
                    .iter()
                    .map(|p| {
                        let labels = labels.as_ref()?;
                        labels.get(p? as usize).map(String::as_str)
                    })
                    .collect();
                let DataType::Struct(fields) = prediction_type() else {
                    unreachable!("prediction_type is a struct")
                };
                let nulls = prediction.nulls().cloned();
                Ok(Arc::new(StructArray::try_new(
                    fields,
                    vec![Arc::new(prediction), Arc::new(label), Arc::new(best)],
                    nulls,
                )?))
            }
        }
    }
}

fn input_schema(input_col: &str) -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(input_col, image_type(), true),
        Field::new(ROW, DataType::UInt32, false),
    ]))
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

impl PartialEq for ModelFunction {
    fn eq(&self, other: &Self) -> bool {
        self.display_name == other.display_name
            && self.model.uid() == other.model.uid()
            && self.output == other.output
    }
}

impl Eq for ModelFunction {}

impl Hash for ModelFunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.display_name.hash(state);
        self.model.uid().hash(state);
    }
}

impl ScalarUDFImpl for ModelFunction {
    fn name(&self) -> &str {
        &self.display_name
    }

    fn aliases(&self) -> &[String] {
        &self.sql_name
    }

    /// Output columns are named after the SQL name (`classify(image)`), not the long display name.
    fn schema_name(&self, args: &[Expr]) -> datafusion::common::Result<String> {
        let args: Vec<String> = args.iter().map(|a| a.schema_name().to_string()).collect();
        Ok(format!("{}({})", self.sql_name[0], args.join(",")))
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        match arg_types.first() {
            Some(t) if *t == image_type() || is_binary(t) => {}
            Some(t) => {
                return plan_err!(
                    "{}: expected an image struct (ImageSchema) or encoded image bytes (Binary), got {t}",
                    self.sql_name[0]
                );
            }
            None => return plan_err!("{} takes one argument", self.sql_name[0]),
        }
        Ok(match &self.output {
            Output::Prediction { .. } => prediction_type(),
            Output::Column { data_type, .. } => data_type.clone(),
        })
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let rows = args.number_rows;
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let input = &arrays[0];
            let images = if is_binary(input.data_type()) {
                decode_binary_array(input, &DecodeLimits::default())?
            } else if *input.data_type() == image_type() {
                Arc::clone(input)
            } else {
                return exec_err!(
                    "{}: unexpected input type {}",
                    self.sql_name[0],
                    input.data_type()
                );
            };
            let external = |e: Error| datafusion::error::DataFusionError::External(Box::new(e));
            let out = self.run(images).map_err(external)?;
            let result = self.result(&out, rows).map_err(external)?;
            Ok(ColumnarValue::Array(result))
        })
    }
}
