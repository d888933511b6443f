//! What the network stages ([`crate::DeepImageFeaturizer`], [`crate::DeepImagePredictor`])
//! share: the lazily evaluated network UDF, the batching of images into forward passes, the
//! per-stage forward counter, the model reference written when a stage is saved and the checks of
//! the params every network stage has. A stage differs from another only in its
//! [`NetworkOutput`]: which forward pass it runs and the column it builds from the results.

use std::any::Any;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StructArray};
use datafusion::arrow::datatypes::{DataType, Int32Type};
use datafusion::common::exec_err;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, ident};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::{image_type, to_rgb8};
use crate::models::{LoadedModel, available_devices, available_models, load_model_in};
use crate::params::{Params, check};
use crate::persistence::SavedStage;
use crate::preprocess::preprocess;

/// Images a stage has run through its network. Clones of a stage and its `copy_with` copies
/// share one count (a tuner's copies count into the stage the user holds); a new or loaded stage
/// starts at 0. Unlike a count on the process-wide cached model, no other stage disturbs it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ImageCount(Arc<AtomicU64>);

impl ImageCount {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, images: usize) {
        self.0.fetch_add(images as u64, Ordering::Relaxed);
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
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
}

impl NetworkParams<'_> {
    /// `df` plus `output_col`, a lazy column of `output(model)` for each image of `input_col`.
    /// The model is loaded (and cached) now: a missing or corrupt weight file fails here, not
    /// mid-query.
    pub(crate) fn add_column<O: NetworkOutput>(
        &self,
        df: DataFrame,
        images: &ImageCount,
        output: impl FnOnce(&LoadedModel) -> Result<O>,
    ) -> Result<DataFrame> {
        require_image_column(&df, self.input_col).map_err(|e| e.in_stage(self.uid))?;
        let model = load_model_in(
            self.model_name,
            self.device,
            Some(Path::new(self.model_dir)),
        )?;
        let output = output(&model)?;
        let udf = NetworkUdf::new(model, self.batch_size, output, images.clone());
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

/// The UDF behind a network stage: image struct -> one output per row, computed per record batch
/// in `batch_size`-image forward passes. Null or undecodable images give null rows.
#[derive(Debug)]
struct NetworkUdf<O> {
    model: Arc<LoadedModel>,
    batch_size: usize,
    output: O,
    images: ImageCount,
    signature: Signature,
    name: String,
}

impl<O: NetworkOutput> NetworkUdf<O> {
    fn new(model: Arc<LoadedModel>, batch_size: usize, output: O, images: ImageCount) -> Self {
        NetworkUdf {
            name: format!("{}_{}", O::VERB, model.manifest.name),
            model,
            batch_size,
            output,
            images,
            // Volatile: an expensive call the optimiser must never duplicate or inline twice.
            signature: Signature::exact(vec![image_type()], Volatility::Volatile),
        }
    }

    fn compute(&self, images: &StructArray) -> Result<ArrayRef> {
        let model = &self.model;
        let width = self.output.width(model);
        let (values, valid) = self.run_batched(images, width)?;
        self.output.build(model, values, valid)
    }

    /// Preprocesses every valid image (in parallel) and runs them through the network
    /// `batch_size` at a time, each giving `width` values. Returns the flat values (zeros for
    /// null rows) and the validity of each row.
    fn run_batched(&self, images: &StructArray, width: usize) -> Result<(Vec<f32>, Vec<bool>)> {
        let mut inputs: Vec<Option<Vec<f32>>> = (0..images.len())
            .into_par_iter()
            .map(|row| self.preprocessed(images, row))
            .collect();
        let valid: Vec<bool> = inputs.iter().map(Option::is_some).collect();
        let present: Vec<usize> = (0..inputs.len()).filter(|&i| valid[i]).collect();
        let mut values = vec![0.0f32; inputs.len() * width];
        for chunk in present.chunks(self.batch_size) {
            let mut batch = Vec::new();
            for &row in chunk {
                batch.extend(inputs[row].take().unwrap_or_default());
            }
            let out = self.output.forward(&self.model, batch, chunk.len())?;
            self.images.add(chunk.len());
            for (k, &row) in chunk.iter().enumerate() {
                values[row * width..(row + 1) * width]
                    .copy_from_slice(&out[k * width..(k + 1) * width]);
            }
        }
        Ok((values, valid))
    }

    /// The network input for one row, `None` for a null or undecodable image.
    fn preprocessed(&self, images: &StructArray, row: usize) -> Option<Vec<f32>> {
        if images.is_null(row) {
            return None;
        }
        let int = |name: &str| {
            images
                .column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int32Type>())
                .map(|a| a.value(row))
        };
        let data = images
            .column_by_name("data")
            .and_then(|c| c.as_binary_opt::<i32>())
            .map(|a| a.value(row))?;
        let rgb = to_rgb8(
            int("height")?,
            int("width")?,
            int("nChannels")?,
            int("mode")?,
            data,
        )
        .ok()?;
        preprocess(&rgb, &self.model.manifest).ok()
    }
}

impl<O: NetworkOutput> PartialEq for NetworkUdf<O> {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.batch_size == other.batch_size
            && self.output == other.output
            && Arc::ptr_eq(&self.model, &other.model)
            && self.images.same(&other.images)
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
        Ok(self.output.data_type(&self.model))
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let Some(images) = arrays.first().and_then(|a| a.as_struct_opt()) else {
                return exec_err!("{} input must be an image struct", self.name);
            };
            let array = self
                .compute(images)
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            Ok(ColumnarValue::Array(array))
        })
    }
}
