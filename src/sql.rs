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
//! inputs give NULL; `image_error(x)`, registered with them, says why in the reasons' words
//! ([`crate::image::ImageProblem`]). `EXPLAIN` shows the function as `name[stages]`, naming the
//! network.
//!
//! The pipeline is planned once, when the function is made; each batch only runs that plan, on
//! the calling thread (no thread, runtime or session per batch).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, StructArray, UInt32Array,
};
use datafusion::arrow::compute::{concat_batches, take};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Float64Type, Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, exec_err, plan_err};
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, Projection, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility,
};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream, collect};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::batch::{image_input_col, run_blocking};
use crate::error::{Error, Result};
use crate::featurizer::DeepImageFeaturizer;
use crate::image::{
    DecodeLimits, ReadImagesOptions, image_array, image_error_function, image_folder_table,
    image_type,
};
use crate::pipeline::{PipelineModel, Transformer};

/// DataFusion's option that, when on (its default), moves each `get_field` of a struct-valued
/// function down to a copy of the call of its own: `SELECT f(image)['label'],
/// f(image)['probability']` would run the network twice per row (measured: 48 forward passes
/// for 24 images).
pub const LEAF_EXPRESSION_PUSHDOWN: &str = "datafusion.optimizer.enable_leaf_expression_pushdown";

/// A session config for queries that call models: [`LEAF_EXPRESSION_PUSHDOWN`] off, so a
/// registered model runs once per row whatever fields of its result a query reads.
///
/// ```
/// let ctx = datafusion::prelude::SessionContext::new_with_config(
///     deep_pipelines::sql::session_config().with_target_partitions(4),
/// );
/// # let _ = ctx;
/// ```
pub fn session_config() -> SessionConfig {
    SessionConfig::new().set_bool(LEAF_EXPRESSION_PUSHDOWN, false)
}

/// Makes registered models run once per row on an existing session, whatever fields of their
/// result a query reads: turns [`LEAF_EXPRESSION_PUSHDOWN`] off and adds the optimizer rule that
/// computes repeated model calls of a projection once (`f(image)['a'], f(image)['b']`). The
/// `register_*` functions of this module call it on the session they register into.
pub fn one_call_per_row(ctx: &SessionContext) {
    let has_rule = {
        let state = ctx.state_ref();
        let mut state = state.write();
        state
            .config_mut()
            .options_mut()
            .optimizer
            .enable_leaf_expression_pushdown = false;
        state
            .optimizers()
            .iter()
            .any(|r| r.name() == ModelCallsOnce::NAME)
    };
    if !has_rule {
        ctx.add_optimizer_rule(Arc::new(ModelCallsOnce));
    }
}

/// Computes each model call that a projection repeats once: `SELECT f(image)['label'],
/// f(image)['probability']` becomes a projection of `f(image)` below one that reads its fields.
/// Model calls are volatile, which keeps other rules from copying them but also keeps
/// DataFusion's common-subexpression elimination away: this rule does that one job, for model
/// functions only.
#[derive(Debug)]
struct ModelCallsOnce;

impl ModelCallsOnce {
    const NAME: &str = "deep_pipelines_model_calls_once";
}

fn is_model_call(expr: &Expr) -> bool {
    matches!(expr, Expr::ScalarFunction(f) if f.func.inner().is::<ModelFunction>())
}

impl OptimizerRule for ModelCallsOnce {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> datafusion::common::Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Projection(projection) = plan else {
            return Ok(Transformed::no(plan));
        };
        let mut calls: Vec<(Expr, usize)> = Vec::new();
        for expr in &projection.expr {
            expr.apply(|e| {
                if !is_model_call(e) {
                    return Ok(TreeNodeRecursion::Continue);
                }
                match calls.iter_mut().find(|(call, _)| call == e) {
                    Some((_, n)) => *n += 1,
                    None => calls.push((e.clone(), 1)),
                }
                Ok(TreeNodeRecursion::Jump)
            })?;
        }
        let repeated: Vec<Expr> = calls
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(call, _)| call)
            .collect();
        if repeated.is_empty() {
            return Ok(Transformed::no(LogicalPlan::Projection(projection)));
        }
        let Projection { expr, input, .. } = projection;
        let taken: Vec<String> = input
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut names = Vec::new();
        let mut i = 0;
        while names.len() < repeated.len() {
            let name = format!("__model_call_{i}");
            if !taken.contains(&name) {
                names.push(name);
            }
            i += 1;
        }
        let mut inner: Vec<Expr> = input
            .schema()
            .iter()
            .map(|(qualifier, field)| Expr::Column(Column::new(qualifier.cloned(), field.name())))
            .collect();
        inner.extend(
            repeated
                .iter()
                .zip(&names)
                .map(|(call, name)| call.clone().alias(name)),
        );
        let inner = LogicalPlan::Projection(Projection::try_new(inner, input)?);
        let preserver = NamePreserver::new_for_projection();
        let outer = expr
            .into_iter()
            .map(|e| {
                let saved = preserver.save(&e);
                let rewritten = e
                    .transform_down(|e| match repeated.iter().position(|call| *call == e) {
                        Some(k) => Ok(Transformed::new(
                            Expr::Column(Column::new_unqualified(&names[k])),
                            true,
                            TreeNodeRecursion::Jump,
                        )),
                        None => Ok(Transformed::no(e)),
                    })?
                    .data;
                Ok(saved.restore(rewritten))
            })
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        Ok(Transformed::yes(LogicalPlan::Projection(
            Projection::try_new(outer, Arc::new(inner))?,
        )))
    }
}

/// Registers the images under `path` as table `name` (columns as [`crate::read_images`] gives
/// them; each file decoded once, only when `image` or `image_error` is read).
pub fn register_images_table(
    ctx: &SessionContext,
    name: &str,
    path: impl AsRef<Path>,
    options: ReadImagesOptions,
) -> Result<()> {
    ctx.register_table(name, Arc::new(image_folder_table(path, options)?))?;
    ctx.register_udf(image_error_function());
    Ok(())
}

/// Registers `featurizer` as SQL function `name`: image -> `FixedSizeList<Float32>` features.
pub fn register_featurizer(
    ctx: &SessionContext,
    name: &str,
    featurizer: &DeepImageFeaturizer,
) -> Result<()> {
    let model = PipelineModel::of(Arc::new(featurizer.clone()));
    ctx.register_udf(model_function(name, &model)?);
    ctx.register_udf(image_error_function());
    one_call_per_row(ctx);
    Ok(())
}

/// Registers a fitted pipeline as SQL function `name`.
///
/// A pipeline with a classifier (a stage with [`Transformer::classifier`]: a logistic
/// regression or a fine-tuned network) returns a struct
/// `{prediction: Float64, label: Utf8, probability: Float64}` (label from the stage that
/// indexed the label column, [`Transformer::labels_of`], when it has one; probability of the
/// predicted class); any other
/// pipeline returns the column that its last stage adds.
///
/// Also turns [`LEAF_EXPRESSION_PUSHDOWN`] off on `ctx` ([`one_call_per_row`]), so the pipeline
/// runs once per row however many fields of its result a query reads.
pub fn register_model(ctx: &SessionContext, name: &str, model: &PipelineModel) -> Result<()> {
    ctx.register_udf(model_function(name, model)?);
    ctx.register_udf(image_error_function());
    one_call_per_row(ctx);
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

/// A fitted pipeline as a function of one image column, outside any SQL engine: what
/// [`register_model`] registers, for a caller that holds Arrow arrays (the Python package's
/// Spark SQL functions). Planned once; each call runs one batch on the calling thread.
#[derive(Debug)]
pub struct ImageFunction(ModelFunction);

impl ImageFunction {
    /// `name`: lower-case, used in errors. The pipeline needs a featurizer or predictor stage.
    pub fn new(name: &str, model: &PipelineModel) -> Result<Self> {
        ModelFunction::new(name, model).map(ImageFunction)
    }

    /// The type of [`ImageFunction::call`]'s output: `{prediction, label, probability}` for a
    /// classifier pipeline, else the pipeline's last column's type.
    pub fn return_type(&self) -> DataType {
        self.0.output_type()
    }

    /// One value per row of `images` (an image struct, Spark's or ours, or encoded bytes);
    /// null where the image is null or undecodable.
    pub fn call(&self, images: &ArrayRef) -> Result<ArrayRef> {
        self.0.call(images, images.len())
    }
}

const ROW: &str = "__row";

#[derive(Debug)]
struct ModelFunction {
    /// Name used in SQL (registered as an alias).
    sql_name: Vec<String>,
    /// `sql_name[stages]`: what EXPLAIN shows.
    display_name: String,
    model: PipelineModel,
    output: Output,
    plan: PlannedPipeline,
    signature: Signature,
}

/// The pipeline planned once (logical + physical, optimised) over an [`InputSlot`]; a run
/// executes a fresh copy of the plan with its batch in the task's config.
#[derive(Debug)]
struct PlannedPipeline {
    plan: Arc<dyn ExecutionPlan>,
    input_schema: SchemaRef,
    /// The planning session's config, session id and runtime env, reused by every run.
    config: SessionConfig,
    session_id: String,
    runtime_env: Arc<RuntimeEnv>,
}

/// The batch a run feeds to the plan, as an extension of its task's [`SessionConfig`].
#[derive(Debug)]
struct InputBatch(RecordBatch);

/// The plan's input: yields the batch of the task that executes it.
#[derive(Debug)]
struct InputSlot {
    schema: SchemaRef,
}

impl PartitionStream for InputSlot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = match ctx.session_config().get_extension::<InputBatch>() {
            Some(input) => Ok(input.0.clone()),
            None => exec_err!("a SQL function's plan ran without its input batch"),
        };
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::iter([batch]),
        ))
    }
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
        let input_col = image_input_col(model).ok_or_else(|| {
            Error::param(
                "register_model",
                "model",
                "the pipeline has no network stage (DeepImageFeaturizer, DeepImagePredictor, ...) to feed images to",
            )
        })?;
        // One partition: a run is one batch, already on a worker of the calling query.
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        let schema = input_schema(&input_col);
        let slot = InputSlot {
            schema: Arc::clone(&schema),
        };
        let input = StreamingTable::try_new(Arc::clone(&schema), vec![Arc::new(slot)])?;
        let planned = model.transform(ctx.read_table(Arc::new(input))?)?;
        let output = match model.classifier() {
            Some(classifier) => Output::Prediction {
                labels: model
                    .labels_of(&classifier.label_col)
                    .map(<[String]>::to_vec),
                prediction_col: classifier.prediction_col,
                probability_col: classifier.probability_col,
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
        let planned = planned.select_columns(&output_columns(&output))?;
        let plan = run_blocking(
            name,
            async move { Ok(planned.create_physical_plan().await?) },
        )?;
        let state = ctx.state();
        Ok(ModelFunction {
            sql_name: vec![name.to_string()],
            display_name: format!("{name}[{}]", model.describe()),
            model: model.clone(),
            output,
            plan: PlannedPipeline {
                plan,
                input_schema: schema,
                config: state.config().clone(),
                session_id: state.session_id().to_string(),
                runtime_env: Arc::clone(state.runtime_env()),
            },
            // Volatile: no rule may copy the call (e.g. into a filter pushed below the
            // projection that computes it). DataFusion's common-subexpression elimination skips
            // volatile calls, so `ModelCallsOnce` does that job for model functions.
            signature: Signature::any(1, Volatility::Volatile),
        })
    }

    /// The function's value for each of `rows` images (an image struct or encoded bytes).
    fn call(&self, input: &ArrayRef, rows: usize) -> Result<ArrayRef> {
        let images = image_array(&self.sql_name[0], input, &DecodeLimits::default())?;
        let out = self.run(images)?;
        self.result(&out, rows)
    }

    fn output_type(&self) -> DataType {
        match &self.output {
            Output::Prediction { .. } => prediction_type(),
            Output::Column { data_type, .. } => data_type.clone(),
        }
    }

    /// Runs the planned pipeline on one batch of images, in one batch (`batch_size` = rows).
    fn run(&self, images: ArrayRef) -> Result<RecordBatch> {
        let planned = &self.plan;
        let rows = images.len();
        let row_ids = UInt32Array::from_iter_values(0..rows as u32);
        let batch = RecordBatch::try_new(
            Arc::clone(&planned.input_schema),
            vec![images, Arc::new(row_ids)],
        )?;
        let config = planned
            .config
            .clone()
            .with_batch_size(rows.max(1))
            .with_extension(Arc::new(InputBatch(batch)));
        // Executed plans keep state (a join's build side, metrics): each run gets a fresh copy.
        let plan = reset_plan_states(Arc::clone(&planned.plan))?;
        // No function registry: a physical plan holds the functions it calls.
        let task = Arc::new(TaskContext::new(
            None,
            planned.session_id.clone(),
            config,
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
            Arc::clone(&planned.runtime_env),
        ));
        let schema = plan.schema();
        let batches = run_blocking(
            &self.sql_name[0],
            async move { Ok(collect(plan, task).await?) },
        )?;
        Ok(concat_batches(&schema, &batches)?)
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

/// The pipeline's columns a run keeps: the row id, then what [`Output`] reads.
fn output_columns(output: &Output) -> Vec<&str> {
    match output {
        Output::Prediction {
            prediction_col,
            probability_col,
            ..
        } => vec![ROW, prediction_col, probability_col],
        Output::Column { name, .. } => vec![ROW, name],
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
        Ok(self.output_type())
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let result = self
                .call(&arrays[0], args.number_rows)
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            Ok(ColumnarValue::Array(result))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined<T>(r: std::result::Result<T, tokio::task::JoinError>) -> Result<T> {
        r.map_err(|e| Error::Fit(e.to_string()))
    }

    /// `tokio::test` is single-threaded: its only worker is the thread that waits, so a task
    /// the run spawns must go elsewhere.
    #[tokio::test]
    async fn a_run_that_spawns_finishes_on_a_single_threaded_runtime() {
        let out = run_blocking("f", async { joined(tokio::spawn(async { 7 }).await) });
        assert_eq!(out.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_run_called_from_a_run_on_our_runtime_finishes() {
        let out = run_blocking("outer", async {
            let inner = tokio::spawn(async {
                run_blocking("inner", async { joined(tokio::spawn(async { 5 }).await) })
            });
            joined(inner.await)?
        });
        assert_eq!(out.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_panicking_run_is_an_error() {
        let err = run_blocking::<()>("f", async { panic!("bad stage") }).unwrap_err();
        assert!(
            err.to_string()
                .contains("SQL function `f` panicked: bad stage"),
            "{err}"
        );
    }
}
