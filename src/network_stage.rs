//! What the network stages ([`crate::DeepImageFeaturizer`], [`crate::DeepImagePredictor`])
//! share: the lazily evaluated network UDF, the batching of images into forward passes, the
//! per-stage forward counter, the model reference written when a stage is saved and the checks of
//! the params every network stage has. A stage differs from another only in its
//! [`NetworkOutput`]: which forward pass it runs and the column it builds from the results.

use std::any::Any;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray, StructArray};
use datafusion::arrow::datatypes::{DataType, Int32Type};
use datafusion::common::exec_err;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, ident};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::{DecodeLimits, ImageView, image_type};
use crate::models::{LoadedModel, available_devices, available_models, load_model_in, model_error};
use crate::params::{Params, check};
use crate::persistence::SavedStage;
use crate::preprocess::{
    AlphaBackground, PreprocessOptions, ResizeMode, check_fits, preprocess_into,
};

/// What a network stage has done: rows seen, images run, null rows and why, and where the time
/// went. Read with `metrics()` on a [`crate::DeepImageFeaturizer`] or
/// [`crate::DeepImagePredictor`] after running a query. Counts since the stage was made or
/// loaded, or since `reset_metrics()`; clones and tuning copies of a stage count into the
/// stage the user holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetworkStats {
    /// Rows of image column the stage was called on.
    pub rows: u64,
    /// Images run through the network (rows with an output).
    pub images: u64,
    /// Forward passes (each up to `batchSize` images).
    pub forward_passes: u64,
    /// Forward passes retried with half the batch after the device failed to allocate.
    pub batch_halvings: u64,
    /// Rows with a null output, by reason: `null image` (no image: a file that did not decode,
    /// a null input), `invalid image struct` (fields that disagree, over the size limits, an
    /// unsupported mode), `does not fit the input` (too extreme an aspect ratio). `errorCol`
    /// gives each row's own sentence.
    pub null_rows: std::collections::BTreeMap<String, u64>,
    /// Seconds spent resizing and normalising, summed over the threads that did it.
    pub preprocess_seconds: f64,
    /// Seconds spent in forward passes (device time included), summed over partitions.
    pub network_seconds: f64,
    /// Seconds from the start of the first call to the end of the last.
    pub wall_seconds: f64,
    /// The device the network ran on (`cpu`, `wgpu`, ...), once it has run.
    pub device: String,
}

impl NetworkStats {
    /// Rows with a null output.
    pub fn null_count(&self) -> u64 {
        self.null_rows.values().sum()
    }

    /// Images per second of wall time (0 before any ran).
    pub fn images_per_second(&self) -> f64 {
        if self.wall_seconds > 0.0 {
            self.images as f64 / self.wall_seconds
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for NetworkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows, {} images in {} forward passes on {} ({:.1} images/s); \
             preprocess {:.1} s, network {:.1} s, wall {:.1} s",
            self.rows,
            self.images,
            self.forward_passes,
            if self.device.is_empty() {
                "-"
            } else {
                &self.device
            },
            self.images_per_second(),
            self.preprocess_seconds,
            self.network_seconds,
            self.wall_seconds
        )?;
        if self.batch_halvings > 0 {
            write!(f, "; {} batch halvings", self.batch_halvings)?;
        }
        for (reason, count) in &self.null_rows {
            write!(f, "; null ({reason}): {count}")?;
        }
        Ok(())
    }
}

/// The shared, updatable counters behind [`NetworkStats`].
#[derive(Debug, Clone, Default)]
pub(crate) struct NetworkMetrics(Arc<Mutex<Counters>>);

#[derive(Debug, Default)]
struct Counters {
    stats: NetworkStats,
    first: Option<Instant>,
}

impl NetworkMetrics {
    pub(crate) fn snapshot(&self) -> NetworkStats {
        self.with(|c| c.stats.clone())
    }

    pub(crate) fn reset(&self) {
        self.with(|c| *c = Counters::default());
    }

    /// Images run through the network.
    pub(crate) fn images(&self) -> u64 {
        self.with(|c| c.stats.images)
    }

    #[cfg(test)]
    pub(crate) fn add_images(&self, images: usize) {
        self.with(|c| c.stats.images += images as u64);
    }

    fn with<T>(&self, f: impl FnOnce(&mut Counters) -> T) -> T {
        // Counters stay consistent even if a thread panicked holding the lock.
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    fn started(&self, at: Instant) {
        self.with(|c| {
            c.first.get_or_insert(at);
        });
    }

    fn record(&self, call: &CallStats) {
        self.with(|c| {
            let s = &mut c.stats;
            s.rows += call.rows;
            s.images += call.images;
            s.forward_passes += call.forward_passes;
            s.batch_halvings += call.batch_halvings;
            s.preprocess_seconds += call.preprocess.as_secs_f64();
            s.network_seconds += call.network.as_secs_f64();
            for reason in &call.nulls {
                *s.null_rows.entry((*reason).to_string()).or_default() += 1;
            }
            if s.device.is_empty() {
                s.device.clone_from(&call.device);
            }
            if let Some(first) = c.first {
                s.wall_seconds = first.elapsed().as_secs_f64();
            }
        });
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What one call of a network UDF did, added to the stage's [`NetworkMetrics`] when it ends.
#[derive(Debug, Default)]
struct CallStats {
    rows: u64,
    images: u64,
    forward_passes: u64,
    batch_halvings: u64,
    preprocess: Duration,
    network: Duration,
    nulls: Vec<&'static str>,
    device: String,
}

/// Checks the params every network stage shares: a known model, a batch size, a device.
pub(crate) fn check_model_params(
    stage: &str,
    model_name: &str,
    batch_size: usize,
    device: &str,
) -> Result<()> {
    if !available_models().iter().any(|m| m == model_name) {
        return Err(Error::param(
            stage,
            "modelName",
            format!(
                "unknown model `{model_name}`; available: {}",
                available_models().join(", ")
            ),
        ));
    }
    check::in_range(stage, "batchSize", batch_size as f64, 1.0, 4096.0)?;
    if !available_devices().contains(&device) {
        return Err(Error::param(
            stage,
            "device",
            format!(
                "unknown device `{device}`; available: {}",
                available_devices().join(", ")
            ),
        ));
    }
    Ok(())
}

/// Checks `alphaBackground` and builds the stage's preprocessing options.
pub(crate) fn preprocess_options(
    stage: &str,
    resize_mode: ResizeMode,
    alpha_background: &str,
) -> Result<PreprocessOptions> {
    let alpha_background = AlphaBackground::parse(alpha_background).ok_or_else(|| {
        Error::param(
            stage,
            "alphaBackground",
            format!("`{alpha_background}` is not a colour: use white, black, #rrggbb or none"),
        )
    })?;
    Ok(PreprocessOptions {
        resize_mode,
        alpha_background,
    })
}

/// Checks that `column` exists and is an image struct.
fn require_image_column(df: &DataFrame, column: &str) -> Result<()> {
    let found = crate::feature::require_column(df, column)?;
    if found != image_type() {
        return Err(Error::column(
            column,
            format!(
                "expected an image struct (ImageSchema: origin, height, width, nChannels, mode, data), got {found}"
            ),
        ));
    }
    Ok(())
}

/// The params every network stage has, borrowed from its (validated) params struct.
pub(crate) struct NetworkParams<'a> {
    pub uid: &'a str,
    pub input_col: &'a str,
    pub output_col: &'a str,
    pub model_name: &'a str,
    pub device: &'a str,
    pub model_dir: &'a str,
    pub batch_size: usize,
    pub resize_mode: ResizeMode,
    pub alpha_background: &'a str,
    /// Column for the reason a row's output is null; empty = no such column.
    pub error_col: &'a str,
}

impl NetworkParams<'_> {
    /// `df` plus `output_col`, a lazy column of `output(model)` for each image of `input_col`.
    /// The model is loaded (and cached) now: a missing or corrupt weight file fails here, not
    /// mid-query.
    pub(crate) fn add_column<O: NetworkOutput>(
        &self,
        df: DataFrame,
        metrics: &NetworkMetrics,
        output: impl FnOnce(&LoadedModel) -> Result<O>,
    ) -> Result<DataFrame> {
        require_image_column(&df, self.input_col).map_err(|e| e.in_stage(self.uid))?;
        let model = load_model_in(
            self.model_name,
            self.device,
            Some(Path::new(self.model_dir)),
        )?;
        let output = output(&model)?;
        let rows = RowCheck {
            options: preprocess_options(self.uid, self.resize_mode, self.alpha_background)?,
            model: Arc::clone(&model),
            limits: DecodeLimits::default(),
        };
        let df = if self.error_col.is_empty() {
            df
        } else {
            let check = ScalarUDF::new_from_impl(ImageProblemUdf::new(rows.clone()));
            df.with_column(self.error_col, check.call(vec![ident(self.input_col)]))?
        };
        let udf = NetworkUdf::new(
            rows,
            self.batch_size,
            output,
            metrics.clone(),
            &crate::models::device_label(self.device),
        );
        let udf = ScalarUDF::new_from_impl(udf);
        Ok(df.with_column(self.output_col, udf.call(vec![ident(self.input_col)]))?)
    }

    /// The stage's params plus a reference to its network (name + weight sha256); the weights
    /// are not copied.
    pub(crate) fn save<P: Params>(&self, class: &str, params: &P) -> Result<SavedStage> {
        let reference = ModelReference::of(self.model_name, self.model_dir)?;
        Ok(SavedStage::of(class, self.uid, params)
            .with_extra(serde_json::json!({ "model": reference })))
    }
}

/// How a saved network stage names its network: loading checks the installed weights are the
/// same (name + weight sha256; weights are not copied).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModelReference {
    name: String,
    weights_file: String,
    sha256: Option<String>,
}

impl ModelReference {
    fn of(model_name: &str, model_dir: &str) -> Result<Self> {
        let (manifest, _) = crate::models::manifest_in(model_name, Some(Path::new(model_dir)))?;
        Ok(ModelReference {
            sha256: manifest.weights.expected_sha256().map(str::to_string),
            name: manifest.name,
            weights_file: manifest.weights.file,
        })
    }
}

/// A saved network stage's params. A stage saved before `alphaBackground` existed dropped
/// alpha: it loads with `none`, so a fitted pipeline keeps preprocessing as it was fitted (the
/// default for new stages is `white`).
pub(crate) fn saved_network_params<P: Params>(saved: &SavedStage) -> Result<P> {
    let mut params = saved.params.clone();
    if let Some(map) = params.as_object_mut() {
        map.entry("alphaBackground")
            .or_insert_with(|| serde_json::Value::from("none"));
    }
    P::from_json(params)
}

/// Checks that the model a stage was saved with is the one installed now.
pub(crate) fn check_model_reference(
    saved: &SavedStage,
    model_name: &str,
    model_dir: &str,
) -> Result<()> {
    let reference: ModelReference = saved.extra_field("model")?;
    let (manifest, dir) = crate::models::manifest_in(model_name, Some(Path::new(model_dir)))?;
    if reference.sha256.as_deref() != manifest.weights.expected_sha256() {
        return Err(Error::Persistence(format!(
            "{} `{}` was saved with {} weights sha256 {}, but the installed model ({}) has sha256 {}",
            saved.class,
            saved.uid,
            reference.name,
            reference.sha256.as_deref().unwrap_or("(none)"),
            dir.join(&manifest.weights.file).display(),
            manifest.weights.expected_sha256().unwrap_or("(none)"),
        )));
    }
    Ok(())
}

/// What a network stage computes per image: the featurizer's features, the predictor's classes.
pub(crate) trait NetworkOutput: Debug + PartialEq + Eq + Hash + Send + Sync + Any {
    /// First word of the UDF's name (`<verb>_<model>`), as EXPLAIN and errors show it.
    const VERB: &'static str;

    /// Values one forward pass gives per image.
    fn width(&self, model: &LoadedModel) -> usize;

    /// Runs `batch` preprocessed images (concatenated) through the network.
    fn forward(&self, model: &LoadedModel, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>>;

    /// The output column's type.
    fn data_type(&self, model: &LoadedModel) -> DataType;

    /// The output column from `width` values per row; rows that are not `valid` are null.
    fn build(&self, model: &LoadedModel, values: Vec<f32>, valid: Vec<bool>) -> Result<ArrayRef>;
}

/// Why a row gets no network output: a short kind (counted in [`NetworkStats::null_rows`]) and
/// the row's own sentence (its `errorCol` value).
#[derive(Debug)]
struct RowProblem {
    kind: &'static str,
    message: String,
}

/// Which rows of an image column a network stage can take, and their network inputs. The
/// network UDF and the `errorCol` UDF both ask it, so a null output and its reason agree.
#[derive(Debug, Clone)]
struct RowCheck {
    model: Arc<LoadedModel>,
    options: PreprocessOptions,
    limits: DecodeLimits,
}

impl RowCheck {
    /// The image of `row`, its fields checked against each other, the limits and the
    /// preprocessing (no pixel read yet); the error is why its output is null.
    fn image<'a>(
        &self,
        images: &'a StructArray,
        row: usize,
    ) -> std::result::Result<ImageView<'a>, RowProblem> {
        let problem = |kind, message| RowProblem { kind, message };
        if images.is_null(row) {
            return Err(problem("null image", "image is null".into()));
        }
        let invalid = |message| problem("invalid image struct", message);
        let int = |name: &str| {
            images
                .column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int32Type>())
                .map(|a| a.value(row))
                .ok_or_else(|| invalid(format!("image struct has no Int32 field `{name}`")))
        };
        let data = images
            .column_by_name("data")
            .and_then(|c| c.as_binary_opt::<i32>())
            .map(|a| a.value(row))
            .ok_or_else(|| invalid("image struct has no Binary field `data`".into()))?;
        let view = ImageView::from_row(
            int("height")?,
            int("width")?,
            int("nChannels")?,
            int("mode")?,
            data,
            &self.limits,
        )
        .map_err(invalid)?;
        check_fits(&view, &self.model.manifest, &self.options)
            .map_err(|message| problem("does not fit the input", message))?;
        Ok(view)
    }

    /// Values in one image's network input.
    fn input_len(&self) -> usize {
        let size = self.model.manifest.input_size as usize;
        3 * size * size
    }

    /// Writes the network input of `row` into `out`; the row must have passed
    /// [`RowCheck::image`].
    fn input_into(&self, images: &StructArray, row: usize, out: &mut [f32]) -> Result<()> {
        let broken = |e: String| {
            model_error(
                &self.model.manifest.name,
                format!("row {row} passed its checks, then failed: {e}"),
            )
        };
        let image = self.image(images, row).map_err(|p| broken(p.message))?;
        preprocess_into(&image, &self.model.manifest, &self.options, out).map_err(broken)
    }

    /// The network inputs of `rows` (which passed [`RowCheck::image`]), made in parallel.
    fn inputs(&self, images: &StructArray, rows: &[usize]) -> Result<Vec<f32>> {
        let input_len = self.input_len();
        let mut inputs = vec![0.0f32; rows.len() * input_len];
        inputs
            .par_chunks_mut(input_len)
            .zip(rows)
            .try_for_each(|(out, &row)| self.input_into(images, row, out))?;
        Ok(inputs)
    }
}

/// Whether a forward pass's error (or panic) says the device could not allocate its memory.
fn is_allocation_failure(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "out of memory",
        "outofmemory",
        "failed to allocate",
        "allocation failed",
        "could not allocate",
    ]
    .iter()
    .any(|p| message.contains(p))
}

/// The UDF behind a network stage: image struct -> one output per row, computed per record batch
/// in `batch_size`-image forward passes. Null, inconsistent or oversized images give null rows.
#[derive(Debug)]
struct NetworkUdf<O> {
    rows: RowCheck,
    batch_size: usize,
    /// Images per forward pass the device has managed: starts at `batch_size`, halved when the
    /// device fails to allocate a batch.
    device_batch: AtomicUsize,
    output: O,
    metrics: NetworkMetrics,
    device: String,
    signature: Signature,
    name: String,
}

impl<O: NetworkOutput> NetworkUdf<O> {
    fn new(
        rows: RowCheck,
        batch_size: usize,
        output: O,
        metrics: NetworkMetrics,
        device: &str,
    ) -> Self {
        NetworkUdf {
            name: format!("{}_{}", O::VERB, rows.model.manifest.name),
            rows,
            batch_size,
            device_batch: AtomicUsize::new(batch_size),
            output,
            metrics,
            device: device.to_string(),
            // Volatile: an expensive call the optimiser must never duplicate or inline twice.
            signature: Signature::exact(vec![image_type()], Volatility::Volatile),
        }
    }

    fn compute(&self, images: &StructArray) -> Result<ArrayRef> {
        self.metrics.started(Instant::now());
        let mut call = CallStats {
            rows: images.len() as u64,
            device: self.device.clone(),
            ..CallStats::default()
        };
        let model = &self.rows.model;
        let width = self.output.width(model);
        let outcome = self
            .run_batched(images, width, &mut call)
            .and_then(|(values, valid)| self.output.build(model, values, valid));
        self.metrics.record(&call);
        outcome
    }

    /// Runs the valid images through the network `batch_size` at a time, each giving `width`
    /// values. Images are preprocessed (in parallel) one forward pass at a time, so at most
    /// `batch_size` network inputs exist at once, whatever the record batch's size (decoding,
    /// the larger cost before the network, is overlapped upstream by the folder scan). Returns
    /// the flat values (zeros for null rows) and the validity of each row.
    fn run_batched(
        &self,
        images: &StructArray,
        width: usize,
        call: &mut CallStats,
    ) -> Result<(Vec<f32>, Vec<bool>)> {
        let mut valid = Vec::with_capacity(images.len());
        for row in 0..images.len() {
            match self.rows.image(images, row) {
                Ok(_) => valid.push(true),
                Err(problem) => {
                    call.nulls.push(problem.kind);
                    valid.push(false);
                }
            }
        }
        let present: Vec<usize> = (0..valid.len()).filter(|&i| valid[i]).collect();
        let mut values = vec![0.0f32; valid.len() * width];
        let per_pass = self.device_batch.load(Ordering::Relaxed).max(1);
        for rows in present.chunks(per_pass) {
            let out = self.forward(images, rows, call)?;
            for (k, &row) in rows.iter().enumerate() {
                values[row * width..(row + 1) * width]
                    .copy_from_slice(&out[k * width..(k + 1) * width]);
            }
        }
        Ok((values, valid))
    }

    /// Preprocesses `rows` and runs them through the network, in passes of at most the device's
    /// batch size. When the device fails to allocate a pass, that size is halved (down to one
    /// image) for this and every later pass, and the rows are preprocessed again in halves (no
    /// second copy of the inputs is kept for the retry).
    fn forward(
        &self,
        images: &StructArray,
        rows: &[usize],
        call: &mut CallStats,
    ) -> Result<Vec<f32>> {
        let limit = self.device_batch.load(Ordering::Relaxed).max(1);
        if rows.len() > limit {
            let mut out = Vec::new();
            for part in rows.chunks(limit) {
                out.extend(self.forward(images, part, call)?);
            }
            return Ok(out);
        }
        let started = Instant::now();
        let inputs = self.rows.inputs(images, rows)?;
        call.preprocess += started.elapsed();
        let started = Instant::now();
        let model = &self.rows.model;
        let batch = rows.len();
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.output.forward(model, inputs, batch)
        }))
        .unwrap_or_else(|payload| {
            Err(model_error(
                &model.manifest.name,
                format!(
                    "forward pass of {batch} images panicked: {}",
                    crate::error::panic_message(payload.as_ref())
                ),
            ))
        });
        call.network += started.elapsed();
        call.forward_passes += 1;
        match attempt {
            Ok(out) => {
                call.images += batch as u64;
                Ok(out)
            }
            Err(error) if batch > 1 && is_allocation_failure(&error.to_string()) => {
                call.batch_halvings += 1;
                self.device_batch.fetch_min(batch / 2, Ordering::Relaxed);
                self.forward(images, rows, call)
            }
            Err(error) => Err(error),
        }
    }
}

/// What both network-stage UDFs do with their call: `compute` on the image struct argument,
/// under `catch_panics` (a panic is a query error naming the UDF).
fn on_images(
    name: &str,
    args: &ScalarFunctionArgs,
    compute: impl FnOnce(&StructArray) -> Result<ArrayRef>,
) -> datafusion::common::Result<ColumnarValue> {
    crate::error::catch_panics(name, || {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some(images) = arrays.first().and_then(|a| a.as_struct_opt()) else {
            return exec_err!("{name} input must be an image struct");
        };
        let array = compute(images)
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        Ok(ColumnarValue::Array(array))
    })
}

/// The `errorCol` UDF: null where the network stage gives an output, else the reason it does
/// not (null image, inconsistent fields, over the size limits, unsupported mode). Reads no
/// pixel: cheap next to the network.
#[derive(Debug)]
struct ImageProblemUdf {
    rows: RowCheck,
    signature: Signature,
    name: String,
}

impl ImageProblemUdf {
    fn new(rows: RowCheck) -> Self {
        ImageProblemUdf {
            name: format!("image_problem_{}", rows.model.manifest.name),
            rows,
            signature: Signature::exact(vec![image_type()], Volatility::Immutable),
        }
    }
}

impl PartialEq for ImageProblemUdf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.rows.options == other.rows.options
            && self.rows.limits == other.rows.limits
            && Arc::ptr_eq(&self.rows.model, &other.rows.model)
    }
}

impl Eq for ImageProblemUdf {}

impl Hash for ImageProblemUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.rows.options.hash(state);
    }
}

impl ScalarUDFImpl for ImageProblemUdf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        on_images(&self.name, &args, |images| {
            let problems: StringArray = (0..images.len())
                .map(|row| self.rows.image(images, row).err().map(|p| p.message))
                .collect();
            Ok(Arc::new(problems))
        })
    }
}

impl<O: NetworkOutput> PartialEq for NetworkUdf<O> {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.batch_size == other.batch_size
            && self.output == other.output
            && self.rows.options == other.rows.options
            && Arc::ptr_eq(&self.rows.model, &other.rows.model)
            && self.metrics.same(&other.metrics)
    }
}

impl<O: NetworkOutput> Eq for NetworkUdf<O> {}

impl<O: NetworkOutput> Hash for NetworkUdf<O> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.batch_size.hash(state);
        self.output.hash(state);
    }
}

impl<O: NetworkOutput> ScalarUDFImpl for NetworkUdf<O> {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(self.output.data_type(&self.rows.model))
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        on_images(&self.name, &args, |images| self.compute(images))
    }
}
