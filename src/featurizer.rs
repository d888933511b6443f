//! [`DeepImageFeaturizer`]: a pretrained CNN as a feature-extracting [`Transformer`].
//!
//! The output column is added lazily as a UDF: when the plan runs, each record batch is
//! preprocessed in parallel and pushed through the network `batchSize` images at a time, with the
//! model loaded once per process. Null (or undecodable) images give null features.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::exec_err;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, ident};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::{image_type, to_rgb8};
use crate::models::{FeatureMode, LoadedModel, available_devices, available_models, load_model_in};
use crate::params::{ParamMap, Params, check, new_uid, setters, string_setters};
use crate::persistence::SavedStage;
use crate::pipeline::Transformer;
use crate::preprocess::preprocess;

/// Params of [`DeepImageFeaturizer`] (Spark names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeepImageFeaturizerParams {
    pub input_col: String,
    pub output_col: String,
    pub model_name: String,
    pub batch_size: usize,
    pub device: String,
    /// `pooled` (the manifest's feature vector) or `flattened` (the last feature map).
    pub feature_mode: String,
    /// `float32` or `float16` (half the memory and Parquet size).
    pub output_type: String,
    /// Folder holding `<model>/manifest.json` and weights; empty = `$DEEP_PIPELINES_MODEL_DIR`
    /// or the bundled `models/`.
    pub model_dir: String,
}

impl Default for DeepImageFeaturizerParams {
    fn default() -> Self {
        DeepImageFeaturizerParams {
            input_col: "image".into(),
            output_col: "features".into(),
            model_name: "EfficientNetLite0".into(),
            batch_size: 32,
            device: "cpu".into(),
            feature_mode: "pooled".into(),
            output_type: "float32".into(),
            model_dir: String::new(),
        }
    }
}

impl Params for DeepImageFeaturizerParams {
    const STAGE: &'static str = "DeepImageFeaturizer";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("inputCol", "image column (ImageSchema struct)"),
            (
                "outputCol",
                "feature column to add (FixedSizeList<Float32>)",
            ),
            (
                "modelName",
                "named pretrained model, e.g. EfficientNetLite0",
            ),
            ("batchSize", "images per forward pass"),
            ("device", "cpu, or wgpu when built with the wgpu feature"),
            (
                "featureMode",
                "pooled (feature vector, default) or flattened (last feature map)",
            ),
            ("outputType", "float32 (default) or float16"),
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
        if FeatureMode::parse(&self.feature_mode).is_none() {
            return Err(Error::param(
                s,
                "featureMode",
                format!("`{}` is not pooled or flattened", self.feature_mode),
            ));
        }
        if !matches!(self.output_type.as_str(), "float32" | "float16") {
            return Err(Error::param(
                s,
                "outputType",
                format!("`{}` is not float32 or float16", self.output_type),
            ));
        }
        Ok(())
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

/// Turns an image column into a feature column with a pretrained network.
///
/// ```no_run
/// # fn demo(images: datafusion::prelude::DataFrame) -> deep_pipelines::Result<()> {
/// use deep_pipelines::{DeepImageFeaturizer, Transformer};
/// let featurizer = DeepImageFeaturizer::new()
///     .with_model_name("EfficientNetLite0")
///     .with_output_col("features")
///     .with_batch_size(32);
/// let with_features = featurizer.transform(images)?; // lazy: nothing has run yet
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeepImageFeaturizer {
    uid: String,
    params: DeepImageFeaturizerParams,
}

impl Default for DeepImageFeaturizer {
    fn default() -> Self {
        Self::new()
    }
}

impl DeepImageFeaturizer {
    pub fn new() -> Self {
        Self::from_params(DeepImageFeaturizerParams::default())
    }

    pub fn from_params(params: DeepImageFeaturizerParams) -> Self {
        DeepImageFeaturizer {
            uid: new_uid("DeepImageFeaturizer"),
            params,
        }
    }

    pub fn params(&self) -> &DeepImageFeaturizerParams {
        &self.params
    }

    string_setters! {
        with_input_col: input_col,
        with_output_col: output_col,
        with_model_name: model_name,
        with_device: device,
        with_feature_mode: feature_mode,
        with_output_type: output_type,
        with_model_dir: model_dir,
    }
    setters! { with_batch_size: batch_size: usize }
}

/// Checks that `column` exists and is an image struct.
pub(crate) fn require_image_column(df: &DataFrame, column: &str) -> Result<()> {
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

impl Transformer for DeepImageFeaturizer {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        self.params.validate()?;
        require_image_column(&df, &self.params.input_col).map_err(|e| e.in_stage(&self.uid))?;
        let p = &self.params;
        let model = stage_model(&p.model_name, &p.device, &p.model_dir)?;
        let head = Head::Features {
            mode: FeatureMode::parse(&p.feature_mode).unwrap_or(FeatureMode::Pooled),
            half: p.output_type == "float16",
        };
        with_network_column(df, &p.input_col, &p.output_col, model, p.batch_size, head)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn save_stage(&self) -> Result<SavedStage> {
        let p = &self.params;
        saved_network_stage(
            CLASS_DEEP_IMAGE_FEATURIZER,
            &self.uid,
            p,
            &p.model_name,
            &p.model_dir,
        )
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        Ok(Arc::new(DeepImageFeaturizer {
            uid: self.uid.clone(),
            params: overrides.apply(&self.uid, &self.params)?,
        }))
    }
}

pub(crate) const CLASS_DEEP_IMAGE_FEATURIZER: &str = "DeepImageFeaturizer";

/// The model a network stage runs, loaded now (and cached): a missing or corrupt weight file
/// fails at `transform`, not mid-query.
pub(crate) fn stage_model(name: &str, device: &str, model_dir: &str) -> Result<Arc<LoadedModel>> {
    load_model_in(name, device, Some(Path::new(model_dir)))
}

/// `df` plus `output_col` = the network's `head` output for each image of `input_col`.
pub(crate) fn with_network_column(
    df: DataFrame,
    input_col: &str,
    output_col: &str,
    model: Arc<LoadedModel>,
    batch_size: usize,
    head: Head,
) -> Result<DataFrame> {
    let udf = ScalarUDF::new_from_impl(NetworkUdf::new(model, batch_size, head));
    Ok(df.with_column(output_col, udf.call(vec![ident(input_col)]))?)
}

/// A network stage's params plus a reference to its network (name + weight sha256); the
/// weights are not copied.
pub(crate) fn saved_network_stage<P: Params>(
    class: &str,
    uid: &str,
    params: &P,
    model_name: &str,
    model_dir: &str,
) -> Result<SavedStage> {
    let reference = model_reference(model_name, model_dir)?;
    Ok(SavedStage::of(class, uid, params).with_extra(serde_json::json!({ "model": reference })))
}

/// How a saved network stage names its network: loading checks the installed weights are the
/// same (name + weight sha256; weights are not copied).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ModelReference {
    name: String,
    weights_file: String,
    sha256: Option<String>,
}

fn model_reference(model_name: &str, model_dir: &str) -> Result<ModelReference> {
    let (manifest, _) = crate::models::manifest_in(model_name, Some(Path::new(model_dir)))?;
    Ok(ModelReference {
        sha256: manifest.weights.expected_sha256().map(str::to_string),
        name: manifest.name,
        weights_file: manifest.weights.file,
    })
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

impl DeepImageFeaturizer {
    pub(crate) fn from_saved(saved: &SavedStage) -> Result<Self> {
        let params: DeepImageFeaturizerParams = saved.params()?;
        check_model_reference(saved, &params.model_name, &params.model_dir)?;
        Ok(DeepImageFeaturizer {
            uid: saved.uid.clone(),
            params,
        })
    }
}

/// What a network UDF returns for each image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Head {
    /// The featurizer's: features (pooled or flattened), float32 or float16.
    Features { mode: FeatureMode, half: bool },
    /// The predictor's: softmax probabilities of every class, or the top K decoded.
    Predictions { top_k: usize, decode: bool },
}

/// The UDF behind the featurizer and the predictor: image struct -> one network output per
/// row, computed per record batch in `batch_size`-image forward passes.
#[derive(Debug)]
pub(crate) struct NetworkUdf {
    model: Arc<LoadedModel>,
    batch_size: usize,
    head: Head,
    signature: Signature,
    name: String,
}

impl NetworkUdf {
    pub(crate) fn new(model: Arc<LoadedModel>, batch_size: usize, head: Head) -> Self {
        let verb = match head {
            Head::Features { .. } => "featurize",
            Head::Predictions { .. } => "predict",
        };
        NetworkUdf {
            name: format!("{verb}_{}", model.manifest.name),
            model,
            batch_size,
            head,
            // Volatile: an expensive call the optimiser must never duplicate or inline twice.
            signature: Signature::exact(vec![image_type()], Volatility::Volatile),
        }
    }

    fn output_type(&self) -> DataType {
        match self.head {
            Head::Features { mode, half } => DataType::FixedSizeList(
                Arc::new(Field::new(
                    "item",
                    if half {
                        DataType::Float16
                    } else {
                        DataType::Float32
                    },
                    true,
                )),
                self.model.manifest.output_dim(mode) as i32,
            ),
            Head::Predictions { decode, .. } => {
                crate::predictor::predictions_type(decode, self.model.manifest.num_classes)
            }
        }
    }

    fn compute(&self, images: &datafusion::arrow::array::StructArray) -> Result<ArrayRef> {
        let model = &self.model;
        match self.head {
            Head::Features { mode, .. } => {
                let dim = model.manifest.output_dim(mode);
                let (values, valid) = run_batched(model, images, self.batch_size, dim, |x, n| {
                    model.run(x, n, mode)
                })?;
                let DataType::FixedSizeList(field, dim) = self.output_type() else {
                    unreachable!("features are a FixedSizeList")
                };
                let values: ArrayRef = Arc::new(Float32Array::from(values));
                let values = cast(&values, field.data_type())?;
                let valid = Some(NullBuffer::from(valid));
                Ok(Arc::new(FixedSizeListArray::try_new(
                    field, dim, values, valid,
                )?))
            }
            Head::Predictions { top_k, decode } => {
                let classes = model.manifest.num_classes;
                let (logits, valid) =
                    run_batched(model, images, self.batch_size, classes, |x, n| {
                        model.logits(x, n)
                    })?;
                crate::predictor::predictions(model, top_k, decode, logits, valid)
            }
        }
    }
}

impl PartialEq for NetworkUdf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.batch_size == other.batch_size
            && self.head == other.head
            && Arc::ptr_eq(&self.model, &other.model)
    }
}

impl Eq for NetworkUdf {}

impl Hash for NetworkUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.batch_size.hash(state);
        self.head.hash(state);
    }
}

impl ScalarUDFImpl for NetworkUdf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(self.output_type())
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let Some(images) = arrays[0].as_struct_opt() else {
                return exec_err!("{} input must be an image struct", self.name);
            };
            let array = self
                .compute(images)
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            Ok(ColumnarValue::Array(array))
        })
    }
}

/// Preprocesses every valid image of `images` (in parallel) and runs them through `forward`
/// `batch_size` at a time, each image giving `dim` values. Returns the flat values (zeros for
/// null rows) and the validity of each row.
pub(crate) fn run_batched(
    model: &LoadedModel,
    images: &datafusion::arrow::array::StructArray,
    batch_size: usize,
    dim: usize,
    forward: impl Fn(Vec<f32>, usize) -> Result<Vec<f32>>,
) -> Result<(Vec<f32>, Vec<bool>)> {
    let inputs: Vec<Option<Vec<f32>>> = (0..images.len())
        .into_par_iter()
        .map(|row| {
            if images.is_null(row) {
                return None;
            }
            let int = |name: &str| {
                images
                    .column_by_name(name)
                    .and_then(|c| c.as_primitive_opt::<datafusion::arrow::datatypes::Int32Type>())
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
            preprocess(&rgb, &model.manifest).ok()
        })
        .collect();

    let valid: Vec<bool> = inputs.iter().map(Option::is_some).collect();
    let present: Vec<usize> = (0..inputs.len()).filter(|&i| valid[i]).collect();
    let mut values = vec![0.0f32; inputs.len() * dim];
    let mut inputs = inputs;
    for chunk in present.chunks(batch_size) {
        let mut batch = Vec::new();
        for &row in chunk {
            batch.extend(inputs[row].take().unwrap_or_default());
        }
        let out = forward(batch, chunk.len())?;
        for (k, &row) in chunk.iter().enumerate() {
            values[row * dim..(row + 1) * dim].copy_from_slice(&out[k * dim..(k + 1) * dim]);
        }
    }
    Ok((values, valid))
}
