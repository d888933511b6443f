//! The seam every network stage ([`crate::DeepImageFeaturizer`], [`crate::DeepImagePredictor`],
//! [`crate::DeepImageClassifierModel`], or one of yours) plugs into:
//!
//! - [`NetworkParams`]: the params they all have (`inputCol`, `modelName`, `device`, ...), one
//!   struct flattened into each stage's params, so the saved JSON stays flat and Spark-named;
//!   `network_setters!` gives a stage their builder setters.
//! - [`NetworkOutput`]: what a stage computes per image — the one thing stages differ in.
//!   [`NetworkParams::add_column`] turns it into a lazy, batched column.
//! - [`NetworkStageParams`](crate::network_transformer::NetworkStageParams) +
//!   [`NetworkTransformer`](crate::network_transformer::NetworkTransformer) (a module of its
//!   own, above the stage traits): a stage made of its params type alone; the featurizer and
//!   the predictor are two.
//! - [`NetworkStage`]: the capability code that holds stages as `dyn Transformer` asks for
//!   ([`crate::Transformer::network`]): the shared params, every param, the counters.
//!
//! A new network stage is its own file (its params type with `NetworkStageParams`, its
//! `NetworkOutput`, `pub type MyStage = NetworkTransformer<MyStageParams>`), a line in
//! `lib.rs` and one in `builtin.rs`; batches, SQL, the command line and Python find it through
//! the capability.

mod metrics;
mod model_file;
mod udf;

use std::any::Any;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{DataFrame, cast, ident};
use serde::{Deserialize, Serialize};

use crate::columns::require_column;
use crate::error::{Error, Result};
use crate::image::{DecodeLimits, decode_expr, image_type, is_bytes};
use crate::models::cpu::Precision;
use crate::models::{
    LoadedModel, available_models, device_label, load_model_as, load_model_file, manifest_in,
    parse_device,
};
use crate::params::{AnyParams, Params, Rejected, check};
use crate::persistence::SavedStage;
use crate::preprocess::{AlphaBackground, PreprocessOptions, ResizeMode};

pub use metrics::{NetworkMetrics, NetworkStats};
use udf::{ImageProblemUdf, NetworkUdf, RowCheck};

/// What a network stage is to code that holds it as a `dyn Transformer` (batches, SQL, the
/// command line, the Python bindings): asked for with [`crate::Transformer::network`].
pub trait NetworkStage: Send + Sync {
    /// The params every network stage has: image column, model, device, preprocessing.
    fn network_params(&self) -> &NetworkParams;

    /// All of the stage's params (Spark names): JSON, docs and defaults.
    fn params(&self) -> &dyn AnyParams;

    /// The counters this stage (with its clones and tuning copies) adds to.
    fn meter(&self) -> &NetworkMetrics;

    /// What the stage has done since it was made, loaded or reset: rows, images, null rows and
    /// why, seconds in preprocessing and in the network, images/s and the device.
    fn metrics(&self) -> NetworkStats {
        self.meter().snapshot()
    }

    /// Sets [`NetworkStage::metrics`] back to zero (e.g. between two runs of one fitted stage).
    fn reset_metrics(&self) {
        self.meter().reset();
    }

    /// Images run through the network: a cost meter, e.g. to check that tuning featurizes each
    /// row once.
    fn images_processed(&self) -> u64 {
        self.meter().images()
    }
}

/// What a network stage computes per image: the featurizer's features, the predictor's
/// classes, a fine-tuned network's logits. Implement it (and use [`NetworkParams::add_column`])
/// to build a network stage of your own.
pub trait NetworkOutput: Debug + PartialEq + Eq + Hash + Send + Sync + Any {
    /// First word of the UDF's name (`<verb>_<model>`), as EXPLAIN and errors show it.
    const VERB: &'static str;

    /// Values one forward pass gives per image.
    fn width(&self, model: &LoadedModel) -> usize;

    /// Runs `batch` preprocessed images (concatenated, `[batch, 3, S, S]`) through the network.
    fn forward(&self, model: &LoadedModel, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>>;

    /// The output column's type.
    fn data_type(&self, model: &LoadedModel) -> DataType;

    /// The output column from `width` values per row; rows that are not `valid` are null.
    fn build(&self, model: &LoadedModel, values: Vec<f32>, valid: Vec<bool>) -> Result<ArrayRef>;
}

/// The params every network stage has, flattened into each stage's params struct
/// (`#[serde(flatten)] pub network: NetworkParams`): one declaration, one default, one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkParams {
    /// Image column: Spark's ImageSchema struct (or encoded bytes, through `BatchTransformer`
    /// and SQL functions).
    pub input_col: String,
    /// A named model (`models::available_models()`).
    pub model_name: String,
    /// Images per forward pass.
    pub batch_size: usize,
    /// `cpu`, or with the `wgpu` feature `wgpu` / `wgpu-cpu`.
    pub device: String,
    /// Folder holding `<model>/manifest.json` and weights; empty = `$DEEP_PIPELINES_MODEL_DIR`
    /// or the bundled `models/`.
    pub model_dir: String,
    /// `crop` (the manifest's resize + centre crop) or `pad` (letterbox, nothing cut off).
    pub resize_mode: ResizeMode,
    /// Colour transparent pixels are composited over (and letterbox padding): `white`,
    /// `black`, `#rrggbb`, or `none` (drop alpha, keep the stored colour).
    pub alpha_background: String,
    /// Column to add with the reason for each null output; empty = none.
    pub error_col: String,
    /// An ONNX model file (`.onnx`) to run instead of `modelName`, described by `<name>.json`
    /// next to it (the manifest schema), else by its graph and ImageNet preprocessing. Left out
    /// of the saved JSON when empty (as it is for a named model), so such a saved stage reads
    /// as it did before model files existed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model_file: String,
    /// JSON in the manifest schema over the model file's description (e.g.
    /// `{"input_size": 224, "labels": "classes.txt"}`); empty = none (and not saved).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model_manifest: String,
    /// What the CPU plan's matrix products multiply in: `float32` (or empty, the default), or
    /// `bfloat16` (weights and activations rounded to bfloat16, sums in float32; on CPUs with
    /// AVX-512 BF16, else float32). Left out of the saved JSON when empty, so stages saved
    /// before it existed save back unchanged.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub precision: String,
    /// A `resizeMode` string the setter could not parse, reported by `validate`.
    #[serde(skip)]
    #[doc(hidden)]
    pub rejected: Rejected,
}

impl Default for NetworkParams {
    fn default() -> Self {
        NetworkParams {
            input_col: "image".into(),
            model_name: "EfficientNetLite0".into(),
            batch_size: 32,
            device: "cpu".into(),
            model_dir: String::new(),
            resize_mode: ResizeMode::Crop,
            alpha_background: "white".into(),
            error_col: String::new(),
            model_file: String::new(),
            model_manifest: String::new(),
            precision: String::new(),
            rejected: Rejected::default(),
        }
    }
}

/// The docs of [`NetworkParams`], in declaration order.
const NETWORK_DOCS: &[(&str, &str)] = &[
    ("inputCol", "image column (ImageSchema struct)"),
    (
        "modelName",
        "named pretrained model, e.g. EfficientNetLite0",
    ),
    ("batchSize", "images per forward pass"),
    (
        "device",
        "cpu, or (built with the wgpu feature) wgpu (a GPU) or wgpu-cpu (software Vulkan)",
    ),
    (
        "modelDir",
        "folder with <model>/manifest.json + weights; empty = default",
    ),
    (
        "resizeMode",
        "crop (the model's resize + centre crop, default) or pad (letterbox, nothing cut off)",
    ),
    (
        "alphaBackground",
        "colour transparent pixels are composited over, and letterbox padding: white (default), black, #rrggbb, none (drop alpha)",
    ),
    (
        "errorCol",
        "column to add with the reason of each null output (`<kind>: <detail>`: empty, truncated, over the decode limits, invalid image struct, ...); empty = none",
    ),
    (
        "modelFile",
        "an ONNX model file (.onnx) run instead of modelName, described by <name>.json next to it (the manifest schema) or by its graph; empty = none",
    ),
    (
        "modelManifest",
        "JSON in the manifest schema over the model file's description (input_size, preprocess, onnx outputs, labels, ...); empty = none",
    ),
    (
        "precision",
        "float32 (or empty, the default), or bfloat16: the CPU plan's matrix products with bfloat16 weights and activations, float32 sums (faster on CPUs with AVX-512 BF16, else float32; each image's features within 8% of their float32 norm, typically 1-3%)",
    ),
];

impl NetworkParams {
    /// A stage's param docs: the shared params first (with the stage's own doc where `own`
    /// names one of them), then the stage's own params.
    pub fn docs_with(own: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let doc_of = |name: &str| own.iter().find(|(n, _)| *n == name).map(|(_, d)| *d);
        let shared = NETWORK_DOCS
            .iter()
            .map(|&(name, doc)| (name, doc_of(name).unwrap_or(doc)));
        let rest = own
            .iter()
            .copied()
            .filter(|(name, _)| NETWORK_DOCS.iter().all(|(n, _)| n != name));
        shared.chain(rest).collect()
    }

    /// Checks the shared params, naming `stage` and the param in the error.
    pub fn validate(&self, stage: &str) -> Result<()> {
        check::non_empty(stage, "inputCol", &self.input_col)?;
        if !self.model_manifest.is_empty() && self.model_file.is_empty() {
            return Err(Error::param(
                stage,
                "modelManifest",
                "describes a modelFile; set modelFile too",
            ));
        }
        if self.model_file.is_empty() && !available_models().contains(&self.model_name) {
            return Err(Error::param(
                stage,
                "modelName",
                format!(
                    "unknown model `{}`; available: {}",
                    self.model_name,
                    available_models().join(", ")
                ),
            ));
        }
        check::in_range(stage, "batchSize", self.batch_size as f64, 1.0, 4096.0)?;
        parse_device(stage, &self.device)?;
        if self.parsed_precision(stage)? != Precision::F32 && !self.model_file.is_empty() {
            return Err(Error::param(
                stage,
                "precision",
                format!(
                    "`{}` applies to built-in networks; a modelFile runs in ONNX Runtime's own precision",
                    self.precision
                ),
            ));
        }
        self.preprocess_options(stage)?;
        self.rejected.check(stage)
    }

    /// The `precision` param parsed.
    pub(crate) fn parsed_precision(&self, stage: &str) -> Result<Precision> {
        if self.precision.is_empty() {
            return Ok(Precision::F32);
        }
        Precision::parse(&self.precision).ok_or_else(|| {
            Error::param(
                stage,
                "precision",
                format!(
                    "`{}` is not a precision: use {}",
                    self.precision,
                    Precision::NAMES.join(" or ")
                ),
            )
        })
    }

    /// The preprocessing options (`alphaBackground` parsed).
    fn preprocess_options(&self, stage: &str) -> Result<PreprocessOptions> {
        let alpha_background = AlphaBackground::parse(&self.alpha_background).ok_or_else(|| {
            Error::param(
                stage,
                "alphaBackground",
                format!(
                    "`{}` is not a colour: use white, black, #rrggbb or none",
                    self.alpha_background
                ),
            )
        })?;
        Ok(PreprocessOptions {
            resize_mode: self.resize_mode,
            alpha_background,
        })
    }

    /// The model folder param as the model lookup takes it (empty: the default lookup).
    pub(crate) fn model_folder(&self) -> Option<&Path> {
        (!self.model_dir.is_empty()).then(|| Path::new(&self.model_dir))
    }

    /// What the model is called in logs: the model file, or the model name.
    pub fn model_label(&self) -> &str {
        if self.model_file.is_empty() {
            &self.model_name
        } else {
            &self.model_file
        }
    }

    /// The model these params name: `modelFile` if set, else `modelName` (from `modelDir`),
    /// loaded once per process; its network is built when the first batch runs.
    pub fn model(&self) -> Result<Arc<LoadedModel>> {
        if self.model_file.is_empty() {
            let precision = self.parsed_precision("network stage")?;
            load_model_as(
                &self.model_name,
                &self.device,
                self.model_folder(),
                precision,
            )
        } else {
            load_model_file(
                Path::new(&self.model_file),
                &self.model_manifest,
                &self.device,
            )
        }
    }

    /// `df` plus `output_col`, a lazy column of `output(model)` for each image of `input_col`
    /// (and `errorCol`, if set), counted in `metrics`. The model's manifest is read now (a
    /// missing weight file fails here); its weights load when the first batch runs.
    ///
    /// The input is an image struct or encoded bytes (decoded in the query, once per row). A
    /// null row's reason is the decoder's for bytes and, for structs, `<inputCol>_error` when
    /// the DataFrame has it (as `read_images` and `decode_image_column` add it).
    pub fn add_column<O: NetworkOutput>(
        &self,
        stage: &str,
        output_col: &str,
        df: DataFrame,
        metrics: &NetworkMetrics,
        output: impl FnOnce(&LoadedModel) -> Result<O>,
    ) -> Result<DataFrame> {
        let input_type =
            require_image_input(&df, &self.input_col).map_err(|e| e.in_stage(stage))?;
        let model = self.model()?;
        let output = output(&model)?;
        let rows = RowCheck {
            options: self.preprocess_options(stage)?,
            model,
            limits: DecodeLimits::default(),
        };
        // The decoded bytes, as a column of their own: decoded once for the output and the reason.
        let decoded = format!("__{output_col}_decoded");
        let (df, input) = if is_bytes(&input_type) {
            let df = df.with_column(&decoded, decode_expr(ident(&self.input_col), rows.limits))?;
            (df, vec![ident(&decoded)])
        } else {
            let reasons = format!("{}_error", self.input_col);
            let mut input = vec![ident(&self.input_col)];
            if df
                .schema()
                .field_with_unqualified_name(&reasons)
                .is_ok_and(|f| {
                    matches!(
                        f.data_type(),
                        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                    )
                })
            {
                input.push(cast(ident(&reasons), DataType::Utf8));
            }
            (df, input)
        };
        let df = if self.error_col.is_empty() {
            df
        } else {
            let check = ScalarUDF::new_from_impl(ImageProblemUdf::new(rows.clone()));
            df.with_column(&self.error_col, check.call(input.clone()))?
        };
        let udf = NetworkUdf::new(
            rows,
            self.batch_size,
            output,
            metrics.clone(),
            &device_label(&self.device),
        );
        let udf = ScalarUDF::new_from_impl(udf);
        let df = df.with_column(output_col, udf.call(input))?;
        Ok(if is_bytes(&input_type) {
            df.drop_columns(&[&decoded])?
        } else {
            df
        })
    }

    /// What a network stage saves: its params plus a reference to its network (name + weight
    /// sha256; a built-in model's weights are not copied, a model file is: see `model_file`).
    pub fn save<P: Params>(&self, class: &str, uid: &str, params: &P) -> Result<SavedStage> {
        if !self.model_file.is_empty() {
            return model_file::save(self, SavedStage::of(class, uid, params));
        }
        let (manifest, _) = manifest_in(&self.model_name, self.model_folder())?;
        let reference = ModelReference {
            sha256: manifest.weights.expected_sha256().map(str::to_string),
            name: manifest.name,
            weights_file: manifest.weights.file,
        };
        Ok(SavedStage::of(class, uid, params).with_extra(reference.extra()))
    }

    /// A saved network stage's params, after checking that the model it was saved with is the
    /// one installed now. A stage saved before `alphaBackground` existed dropped alpha: it
    /// loads with `none`, so a fitted pipeline keeps preprocessing as it was fitted (the
    /// default for new stages is `white`).
    pub fn restore<P: Params + AsRef<NetworkParams>>(saved: &SavedStage) -> Result<P> {
        let mut json = saved.params.clone();
        if let Some(map) = json.as_object_mut() {
            map.entry("alphaBackground")
                .or_insert_with(|| serde_json::Value::from("none"));
        }
        if json
            .get("modelFile")
            .and_then(|f| f.as_str())
            .is_some_and(|f| !f.is_empty())
        {
            model_file::restore(saved, &mut json)?;
            return P::from_json(json);
        }
        let params = P::from_json(json)?;
        let network = params.as_ref();
        let reference: ModelReference = saved.extra_field("model")?;
        let (manifest, dir) = manifest_in(&network.model_name, network.model_folder())?;
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
        Ok(params)
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
    /// As `extra` of a saved stage.
    fn extra(&self) -> serde_json::Value {
        serde_json::json!({ "model": self })
    }
}

/// Checks that `column` exists and is an image struct.
/// The type of `column`: an image struct or encoded bytes; else an error naming both.
fn require_image_input(df: &DataFrame, column: &str) -> Result<DataType> {
    let found = require_column(df, column)?;
    if found != image_type() && !is_bytes(&found) {
        return Err(Error::column(
            column,
            format!(
                "expected an image struct (ImageSchema: origin, height, width, nChannels, mode, data) \
                 or encoded image bytes (Binary), got {found}"
            ),
        ));
    }
    Ok(found)
}

/// The builder setters of [`NetworkParams`], for a stage or estimator whose `params` field is
/// `AsMut<NetworkParams>`: `with_input_col`, `with_model_name`, `with_batch_size`,
/// `with_device`, `with_model_dir`, `with_resize_mode`, `with_alpha_background`,
/// `with_error_col`, `with_model_file`, `with_model_manifest`, `with_precision`, and
/// `with_network_params` for all at once.
macro_rules! network_setters {
    () => {
        fn network_mut(&mut self) -> &mut $crate::network_stage::NetworkParams {
            ::std::convert::AsMut::as_mut(&mut self.params)
        }

        /// Image column (ImageSchema struct).
        pub fn with_input_col(mut self, v: impl Into<String>) -> Self {
            self.network_mut().input_col = v.into();
            self
        }

        /// A named model (`models::available_models()`).
        pub fn with_model_name(mut self, v: impl Into<String>) -> Self {
            self.network_mut().model_name = v.into();
            self
        }

        /// Images per forward pass.
        pub fn with_batch_size(mut self, v: usize) -> Self {
            self.network_mut().batch_size = v;
            self
        }

        /// `cpu`, or with the `wgpu` feature `wgpu` / `wgpu-cpu`.
        pub fn with_device(mut self, v: impl Into<String>) -> Self {
            self.network_mut().device = v.into();
            self
        }

        /// Folder holding `<model>/manifest.json` and weights; empty = the default lookup.
        pub fn with_model_dir(mut self, v: impl Into<String>) -> Self {
            self.network_mut().model_dir = v.into();
            self
        }

        /// `crop` or `pad` (the enum or its name; a bad name fails validation).
        pub fn with_resize_mode(
            mut self,
            v: impl $crate::params::IntoChoice<$crate::preprocess::ResizeMode>,
        ) -> Self {
            let network = self.network_mut();
            let value = $crate::params::IntoChoice::into_choice(v);
            network
                .rejected
                .set("resizeMode", value, &mut network.resize_mode);
            self
        }

        /// `white`, `black`, `#rrggbb` or `none`.
        pub fn with_alpha_background(mut self, v: impl Into<String>) -> Self {
            self.network_mut().alpha_background = v.into();
            self
        }

        /// Column for the reason of each null output; empty = none.
        pub fn with_error_col(mut self, v: impl Into<String>) -> Self {
            self.network_mut().error_col = v.into();
            self
        }

        /// An ONNX model file (`.onnx`) to run instead of `modelName`.
        pub fn with_model_file(mut self, v: impl Into<String>) -> Self {
            self.network_mut().model_file = v.into();
            self
        }

        /// JSON in the manifest schema over the model file's own description.
        pub fn with_model_manifest(mut self, v: impl Into<String>) -> Self {
            self.network_mut().model_manifest = v.into();
            self
        }

        /// `float32` or `bfloat16` (the CPU plan's matrix products; a bad name fails
        /// validation).
        pub fn with_precision(mut self, v: impl Into<String>) -> Self {
            self.network_mut().precision = v.into();
            self
        }

        /// Every shared network param at once.
        pub fn with_network_params(mut self, v: $crate::network_stage::NetworkParams) -> Self {
            *self.network_mut() = v;
            self
        }
    };
}
pub(crate) use network_setters;
