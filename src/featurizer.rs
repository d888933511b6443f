//! [`DeepImageFeaturizer`]: a pretrained CNN as a feature-extracting [`Transformer`].
//!
//! The output column is added lazily as a UDF: when the plan runs, each record batch is
//! preprocessed in parallel and pushed through the network `batchSize` images at a time, with the
//! model loaded once per process. Null (or undecodable) images give null features.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array};
use datafusion::arrow::buffer::NullBuffer;
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
use crate::models::{LoadedModel, available_devices, available_models, load_model};
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
}

impl Default for DeepImageFeaturizerParams {
    fn default() -> Self {
        DeepImageFeaturizerParams {
            input_col: "image".into(),
            output_col: "features".into(),
            model_name: "EfficientNetLite0".into(),
            batch_size: 32,
            device: "cpu".into(),
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
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        check::non_empty(s, "inputCol", &self.input_col)?;
        check::non_empty(s, "outputCol", &self.output_col)?;
        if !available_models().contains(&self.model_name.as_str()) {
            return Err(Error::param(
                s,
                "modelName",
                format!(
                    "unknown model `{}`; available: {}",
                    self.model_name,
                    available_models().join(", ")
                ),
            ));
        }
        check::in_range(s, "batchSize", self.batch_size as f64, 1.0, 4096.0)?;
        if !available_devices().contains(&self.device.as_str()) {
            return Err(Error::param(
                s,
                "device",
                format!(
                    "unknown device `{}`; available: {}",
                    self.device,
                    available_devices().join(", ")
                ),
            ));
        }
        Ok(())
    }
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
        // Load now (cached): a missing or corrupt weight file fails here, not mid-query.
        let model = load_model(&self.params.model_name, &self.params.device)?;
        let udf = ScalarUDF::new_from_impl(FeaturizeUdf::new(model, self.params.batch_size));
        Ok(df.with_column(
            &self.params.output_col,
            udf.call(vec![ident(self.params.input_col.as_str())]),
        )?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Params plus a reference to the network (name + weight sha256); weights are not copied.
    fn save_stage(&self) -> Result<SavedStage> {
        let (manifest, _) = crate::models::manifest(&self.params.model_name)?;
        let reference = ModelReference {
            name: manifest.name,
            weights_file: manifest.weights.file,
            sha256: manifest.weights.sha256,
        };
        Ok(
            SavedStage::of(CLASS_DEEP_IMAGE_FEATURIZER, &self.uid, &self.params)
                .with_extra(serde_json::json!({ "model": reference })),
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

/// How a saved featurizer names its network: loading checks the installed weights are the same.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModelReference {
    name: String,
    weights_file: String,
    sha256: Option<String>,
}

impl DeepImageFeaturizer {
    pub(crate) fn from_saved(saved: &SavedStage) -> Result<Self> {
        let params: DeepImageFeaturizerParams = saved.params()?;
        let reference: ModelReference = saved.extra_field("model")?;
        let (manifest, dir) = crate::models::manifest(&params.model_name)?;
        if reference.sha256 != manifest.weights.sha256 {
            return Err(Error::Persistence(format!(
                "DeepImageFeaturizer `{}` was saved with {} weights sha256 {}, but the installed model ({}) has sha256 {}",
                saved.uid,
                reference.name,
                reference.sha256.as_deref().unwrap_or("(none)"),
                dir.join(&manifest.weights.file).display(),
                manifest.weights.sha256.as_deref().unwrap_or("(none)"),
            )));
        }
        Ok(DeepImageFeaturizer {
            uid: saved.uid.clone(),
            params,
        })
    }
}

/// The UDF behind the featurizer: image struct -> `FixedSizeList<Float32>[feature_dim]`.
#[derive(Debug)]
struct FeaturizeUdf {
    model: Arc<LoadedModel>,
    batch_size: usize,
    signature: Signature,
    name: String,
}

impl FeaturizeUdf {
    fn new(model: Arc<LoadedModel>, batch_size: usize) -> Self {
        FeaturizeUdf {
            name: format!("featurize_{}", model.manifest.name),
            model,
            batch_size,
            // Volatile: an expensive call the optimiser must never duplicate or inline twice.
            signature: Signature::exact(vec![image_type()], Volatility::Volatile),
        }
    }

    fn output_type(&self) -> DataType {
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float32, true)),
            self.model.manifest.feature_dim as i32,
        )
    }
}

impl PartialEq for FeaturizeUdf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.batch_size == other.batch_size
            && Arc::ptr_eq(&self.model, &other.model)
    }
}

impl Eq for FeaturizeUdf {}

impl Hash for FeaturizeUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.batch_size.hash(state);
    }
}

impl ScalarUDFImpl for FeaturizeUdf {
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
                return exec_err!("featurizer input must be an image struct");
            };
            let features = featurize(&self.model, images, self.batch_size)
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            let DataType::FixedSizeList(field, dim) = self.output_type() else {
                unreachable!("output_type is a FixedSizeList")
            };
            let (values, valid) = features;
            let array = FixedSizeListArray::try_new(
                field,
                dim,
                Arc::new(Float32Array::from(values)),
                Some(NullBuffer::from(valid)),
            )?;
            Ok(ColumnarValue::Array(Arc::new(array) as ArrayRef))
        })
    }
}

/// Preprocesses every valid image of `images` and runs them through the network in batches.
/// Returns the flat feature values (zeros for null rows) and the validity of each row.
pub(crate) fn featurize(
    model: &LoadedModel,
    images: &datafusion::arrow::array::StructArray,
    batch_size: usize,
) -> Result<(Vec<f32>, Vec<bool>)> {
    let dim = model.manifest.feature_dim;
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
        let out = model.features(batch, chunk.len())?;
        for (k, &row) in chunk.iter().enumerate() {
            values[row * dim..(row + 1) * dim].copy_from_slice(&out[k * dim..(k + 1) * dim]);
        }
    }
    Ok((values, valid))
}
