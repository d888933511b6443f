//! The native core of the `deep_pipelines` Python package: this workspace's pipelines applied to
//! pyarrow data. Arrow crosses through the Arrow PyCapsule interface (the C Data Interface:
//! buffers are shared, not copied), and Rust work runs with the GIL released so that other
//! Python threads (Spark's reader and writer threads in a worker) go on.

use std::ffi::CStr;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, RecordBatchIterator, StructArray, make_array};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema, from_ffi, to_ffi};
use arrow::ffi_stream::FFI_ArrowArrayStream;
use deep_pipelines::batch::BatchTransformer;
use deep_pipelines::params::AnyParams;
use deep_pipelines::registry::PersistedStage as _;
use deep_pipelines::stage::PipelineStage;
use deep_pipelines::{
    DeepImageClassifier, PipelineModel, ReadImagesOptions, StageRegistry, Transformer as _,
};
use pyo3::exceptions::{PyIOError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyTuple};

const SCHEMA: &CStr = c"arrow_schema";
const ARRAY: &CStr = c"arrow_array";
const STREAM: &CStr = c"arrow_array_stream";

/// The crate's errors as Python exceptions: bad params and columns are `ValueError`s, files
/// `OSError`s, the rest `RuntimeError`s; the message is the crate's (it names the column,
/// param or file).
fn py_err(e: deep_pipelines::Error) -> PyErr {
    use deep_pipelines::Error as E;
    match e {
        E::InvalidParam { .. } | E::Column { .. } => PyValueError::new_err(e.to_string()),
        E::Io { .. } => PyIOError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

fn arrow_err(e: ArrowError) -> PyErr {
    PyValueError::new_err(format!("Arrow C Data Interface: {e}"))
}

/// What `obj`'s PyCapsule-interface `method` exports; an error saying what was expected if it
/// has no such method.
fn export<'py>(obj: &Bound<'py, PyAny>, method: &str, what: &str) -> PyResult<Bound<'py, PyAny>> {
    if !obj.hasattr(method)? {
        return Err(PyValueError::new_err(format!(
            "expected {what} (an object with {method}), got {}",
            obj.get_type()
        )));
    }
    obj.call_method0(method)
}

/// An array from any object with `__arrow_c_array__` (pyarrow arrays and record batches,
/// Polars, ...). The array's buffers are moved, not copied.
fn import_array(obj: &Bound<'_, PyAny>) -> PyResult<ArrayRef> {
    let capsules = export(obj, "__arrow_c_array__", "an Arrow array or record batch")?;
    let (schema, array): (Bound<'_, PyCapsule>, Bound<'_, PyCapsule>) = capsules.extract()?;
    let schema = schema
        .pointer_checked(Some(SCHEMA))?
        .cast::<FFI_ArrowSchema>();
    let array = array.pointer_checked(Some(ARRAY))?.cast::<FFI_ArrowArray>();
    // SAFETY: the capsules hold a valid ArrowSchema / ArrowArray (PyCapsule interface). The
    // array is moved out and an empty (released) one left behind, so the capsule's destructor
    // does not release what we now own; the schema is only read.
    let data = unsafe {
        let array = std::ptr::replace(array.as_ptr(), FFI_ArrowArray::empty());
        from_ffi(array, schema.as_ref())
    }
    .map_err(arrow_err)?;
    Ok(make_array(data))
}

fn import_batch(obj: &Bound<'_, PyAny>) -> PyResult<RecordBatch> {
    let array = import_array(obj)?;
    let Some(rows) = array.as_any().downcast_ref::<StructArray>() else {
        return Err(PyValueError::new_err(format!(
            "expected a record batch (a struct array), got {}",
            array.data_type()
        )));
    };
    Ok(RecordBatch::from(rows.clone()))
}

fn import_schema(obj: &Bound<'_, PyAny>) -> PyResult<SchemaRef> {
    let capsule = export(obj, "__arrow_c_schema__", "an Arrow schema")?;
    let capsule: Bound<'_, PyCapsule> = capsule.extract()?;
    let schema = capsule
        .pointer_checked(Some(SCHEMA))?
        .cast::<FFI_ArrowSchema>();
    // SAFETY: a valid ArrowSchema (PyCapsule interface), only read.
    let schema = Schema::try_from(unsafe { schema.as_ref() }).map_err(arrow_err)?;
    Ok(Arc::new(schema))
}

/// An Arrow array (or a record batch, as a struct array) handed to Python: pass it to
/// `pyarrow.array` / `pyarrow.record_batch`, which take it through `__arrow_c_array__`.
#[pyclass(frozen, module = "deep_pipelines._native")]
struct ArrowArray {
    array: ArrayRef,
    field: Field,
}

impl ArrowArray {
    fn of_batch(batch: RecordBatch) -> Self {
        let array: ArrayRef = Arc::new(StructArray::from(batch));
        ArrowArray {
            field: Field::new("", array.data_type().clone(), false),
            array,
        }
    }
}

#[pymethods]
impl ArrowArray {
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_array__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let _ = requested_schema; // we give the array as it is
        let schema = FFI_ArrowSchema::try_from(&self.field).map_err(arrow_err)?;
        let (array, _) = to_ffi(&self.array.to_data()).map_err(arrow_err)?;
        let schema = PyCapsule::new_with_value(py, schema, SCHEMA)?;
        let array = PyCapsule::new_with_value(py, array, ARRAY)?;
        PyTuple::new(py, [schema.into_any(), array.into_any()])
    }
}

/// An Arrow schema handed to Python: `pyarrow.schema(x)` takes it through `__arrow_c_schema__`.
#[pyclass(frozen, module = "deep_pipelines._native")]
struct ArrowSchema {
    schema: SchemaRef,
}

#[pymethods]
impl ArrowSchema {
    fn __arrow_c_schema__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        let schema = FFI_ArrowSchema::try_from(self.schema.as_ref()).map_err(arrow_err)?;
        PyCapsule::new_with_value(py, schema, SCHEMA)
    }
}

/// Record batches handed to Python: `pyarrow.table(x)` / `RecordBatchReader.from_stream(x)`
/// take them through `__arrow_c_stream__` (each call gives a fresh stream over the batches).
#[pyclass(frozen, module = "deep_pipelines._native")]
struct ArrowStream {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

#[pymethods]
impl ArrowStream {
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = requested_schema;
        let reader = RecordBatchIterator::new(
            self.batches.clone().into_iter().map(Ok),
            Arc::clone(&self.schema),
        );
        PyCapsule::new_with_value(py, FFI_ArrowArrayStream::new(Box::new(reader)), STREAM)
    }
}

/// A network stage of class `class` (as the registry names it: `DeepImageFeaturizer`, ...)
/// built from its params (Spark names, as JSON; missing ones take their defaults).
fn network_stage(class: &str, params_json: &str) -> PyResult<Arc<dyn deep_pipelines::Transformer>> {
    let params: serde_json::Value = serde_json::from_str(params_json)
        .map_err(|e| PyValueError::new_err(format!("{class} params: {e}")))?;
    let not_network = || {
        PyValueError::new_err(format!(
            "`{class}` is not a network stage; network stages: {}",
            network_stage_classes().join(", ")
        ))
    };
    match StageRegistry::builtin().make(class, params) {
        Ok(PipelineStage::Transformer(stage)) if stage.network().is_some() => Ok(stage),
        // A network stage's own error (a bad param value) names what is wrong.
        Err(e) if network_stage_classes().iter().any(|c| c == class) => Err(py_err(e)),
        _ => Err(not_network()),
    }
}

/// The registered classes that are network stages (made with their default params).
#[pyfunction]
fn network_stage_classes() -> Vec<String> {
    let registry = StageRegistry::builtin();
    registry
        .classes()
        .filter(|class| {
            matches!(
                registry.make(class, serde_json::json!({})),
                Ok(PipelineStage::Transformer(stage)) if stage.network().is_some()
            )
        })
        .map(str::to_string)
        .collect()
}

/// A saved transformer (a fitted `PipelineModel` or one stage), as a one-or-more-stage pipeline.
fn load_pipeline(path: &str) -> PyResult<PipelineModel> {
    match deep_pipelines::builtin::load(path).map_err(py_err)? {
        PipelineStage::Transformer(stage) => Ok(PipelineModel::of(stage)),
        PipelineStage::Estimator(stage) => Err(PyValueError::new_err(format!(
            "{path}: `{}` is an unfitted estimator; save a fitted model (PipelineModel) to apply it",
            stage.uid()
        ))),
    }
}

/// `model` with its stages on `wgpu` (the first GPU) moved to the GPU a Spark task was given.
fn on_task_gpu(model: PipelineModel, gpu: Option<usize>) -> PyResult<PipelineModel> {
    match gpu {
        Some(n) => model
            .with_device("wgpu", &format!("wgpu:{n}"))
            .map_err(py_err),
        None => Ok(model),
    }
}

/// A fitted pipeline or a network stage, applied to record batches.
#[pyclass(frozen, module = "deep_pipelines._native")]
struct Transformer {
    inner: BatchTransformer,
}

impl Transformer {
    /// `f` of a one-stage network pipeline's params, as a JSON string.
    fn network_params(&self, f: impl Fn(&dyn AnyParams) -> serde_json::Value) -> Option<String> {
        let [stage] = self.inner.model().stages() else {
            return None;
        };
        Some(f(stage.network()?.params()).to_string())
    }
}

#[pymethods]
impl Transformer {
    /// A pipeline (or stage) saved by the Rust API or by `deep_pipelines`.
    /// `gpu`: the GPU address a Spark task was given; stages on `wgpu` run on that GPU.
    #[staticmethod]
    #[pyo3(signature = (path, gpu=None))]
    fn load(py: Python<'_>, path: String, gpu: Option<usize>) -> PyResult<Self> {
        let model = py.detach(|| load_pipeline(&path))?;
        Ok(Transformer {
            inner: BatchTransformer::new(on_task_gpu(model, gpu)?),
        })
    }

    /// A network stage by class (see `network_stage_classes`) with params given as JSON
    /// (Spark names); `gpu` as for `load`.
    #[staticmethod]
    #[pyo3(signature = (class_name, params_json, gpu=None))]
    fn stage(class_name: &str, params_json: &str, gpu: Option<usize>) -> PyResult<Self> {
        let model = PipelineModel::of(network_stage(class_name, params_json)?);
        Ok(Transformer {
            inner: BatchTransformer::new(on_task_gpu(model, gpu)?),
        })
    }

    /// Saves the pipeline to `path` (replacing what is there), as the Rust API does: a stage's
    /// model file is copied in, so the folder runs anywhere.
    fn save(&self, py: Python<'_>, path: String) -> PyResult<()> {
        py.detach(|| self.inner.model().save_overwrite(&path))
            .map_err(py_err)
    }

    /// A one-stage network pipeline's params, defaults filled in, as JSON (Spark names); None
    /// for other pipelines.
    #[getter]
    fn params_json(&self) -> Option<String> {
        // Every param, the optional ones left out of saved JSON included.
        self.network_params(|p| {
            let all = p.explain().into_iter().map(|i| (i.name, i.value));
            serde_json::Value::Object(all.collect())
        })
    }

    /// A one-stage network pipeline's params as JSON `[{name, doc, value, default}]`, in the
    /// stage's order; None for other pipelines.
    #[getter]
    fn explain_params(&self) -> Option<String> {
        self.network_params(|p| serde_json::to_value(p.explain()).unwrap_or_default())
    }

    /// The metrics of the pipeline's first network stage, as JSON (None: no network stage):
    /// rows, images, forward passes, null rows by reason, seconds, images/s, device.
    #[getter]
    fn metrics_json(&self) -> Option<String> {
        let stats = self.inner.model().network()?.metrics();
        let mut json = serde_json::to_value(&stats).ok()?;
        json["imagesPerSecond"] = stats.images_per_second().into();
        Some(json.to_string())
    }

    /// The input column the pipeline reads images from (None: no network stage).
    #[getter]
    fn image_col(&self) -> Option<String> {
        self.inner.image_col().map(str::to_string)
    }

    /// The stages' uids, in order.
    #[getter]
    fn stage_uids(&self) -> Vec<String> {
        let stages = self.inner.model().stages();
        stages.iter().map(|s| s.uid().to_string()).collect()
    }

    /// The pipeline applied to one record batch: its columns plus the stages' outputs.
    fn transform(&self, py: Python<'_>, batch: &Bound<'_, PyAny>) -> PyResult<ArrowArray> {
        let batch = import_batch(batch)?;
        let out = py.detach(|| self.inner.transform(batch)).map_err(py_err)?;
        Ok(ArrowArray::of_batch(out))
    }

    /// The schema `transform` gives for batches of `schema` (from the manifests: no weights are
    /// read, no device is opened).
    fn output_schema(&self, py: Python<'_>, schema: &Bound<'_, PyAny>) -> PyResult<ArrowSchema> {
        let schema = import_schema(schema)?;
        let schema = py
            .detach(|| self.inner.output_schema(schema))
            .map_err(py_err)?;
        Ok(ArrowSchema { schema })
    }
}

/// A fine-tuning fit driven from Python (`deep_pipelines.DeepImageClassifier`, and its Spark
/// estimator): the frozen trunk runs where the images are (`trunk`), its activations are
/// spilled to a file, and `fit` trains the top on that file, memory-mapped.
#[pyclass(frozen, module = "deep_pipelines._native")]
struct ClassifierFit {
    inner: DeepImageClassifier,
}

#[pymethods]
impl ClassifierFit {
    /// The estimator with params given as JSON (Spark names; missing ones take their defaults).
    #[new]
    fn new(params_json: &str) -> PyResult<Self> {
        let params: serde_json::Value = serde_json::from_str(params_json)
            .map_err(|e| PyValueError::new_err(format!("DeepImageClassifier params: {e}")))?;
        let inner = DeepImageClassifier::from_params_json(params).map_err(py_err)?;
        Ok(ClassifierFit { inner })
    }

    /// Every param, defaults filled in, as JSON.
    #[getter]
    fn params_json(&self) -> String {
        self.inner.params().json().to_string()
    }

    /// Every param as JSON `[{name, doc, value, default}]`, in the stage's order.
    #[getter]
    fn explain_params(&self) -> String {
        serde_json::to_string(&self.inner.params().explain()).unwrap_or_default()
    }

    /// The frozen trunk as a transformer adding `output_col` (each image's activations at the
    /// cut, `activation_len` float32 values); loads the network.
    fn trunk(&self, py: Python<'_>, output_col: &str) -> PyResult<Transformer> {
        let stage = py
            .detach(|| self.inner.trunk_stage(output_col))
            .map_err(py_err)?;
        Ok(Transformer {
            inner: BatchTransformer::from_stage(Arc::new(stage)),
        })
    }

    /// Values per image of the trunk's output.
    #[getter]
    fn activation_len(&self, py: Python<'_>) -> PyResult<usize> {
        py.detach(|| self.inner.activation_len()).map_err(py_err)
    }

    /// Trains the top on `spill_path` (little-endian float32 rows of `activation_len`, one per
    /// label) and saves the fitted model to `out_dir`; `progress(json, line)` is called after
    /// every epoch. Returns the fit's facts (classes, rows, kept epoch, history) as JSON.
    #[pyo3(signature = (spill_path, labels, skipped, out_dir, progress=None))]
    fn fit(
        &self,
        py: Python<'_>,
        spill_path: String,
        labels: Vec<usize>,
        skipped: usize,
        out_dir: String,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let mut estimator = self.inner.clone();
        if let Some(progress) = progress {
            estimator = estimator.with_progress(move |stats| {
                let json = serde_json::to_string(stats).unwrap_or_default();
                Python::attach(|py| {
                    if let Err(e) = progress.call1(py, (json, stats.to_string())) {
                        e.print(py);
                    }
                });
            });
        }
        py.detach(|| {
            let model =
                estimator.fit_spilled(std::path::Path::new(&spill_path), labels, skipped)?;
            model.save(&out_dir)?;
            Ok::<_, deep_pipelines::Error>(
                serde_json::to_string(model.fit_facts()).unwrap_or_default(),
            )
        })
        .map_err(py_err)
    }
}

/// A pipeline as a function of one image column (what a SQL function calls): a struct
/// `{prediction, label, probability}` for a classifier pipeline, else its last column.
#[pyclass(frozen, module = "deep_pipelines._native")]
struct ImageFunction {
    inner: deep_pipelines::sql::ImageFunction,
}

#[pymethods]
impl ImageFunction {
    #[staticmethod]
    #[pyo3(signature = (name, path, gpu=None))]
    fn load(py: Python<'_>, name: &str, path: String, gpu: Option<usize>) -> PyResult<Self> {
        let model = on_task_gpu(py.detach(|| load_pipeline(&path))?, gpu)?;
        let inner = deep_pipelines::sql::ImageFunction::new(name, &model).map_err(py_err)?;
        Ok(ImageFunction { inner })
    }

    #[staticmethod]
    #[pyo3(signature = (name, class_name, params_json, gpu=None))]
    fn stage(
        py: Python<'_>,
        name: &str,
        class_name: &str,
        params_json: &str,
        gpu: Option<usize>,
    ) -> PyResult<Self> {
        let stage = network_stage(class_name, params_json)?;
        let model = PipelineModel::new(format!("{name}_function"), vec![stage]);
        let model = on_task_gpu(model, gpu)?;
        let inner = py
            .detach(|| deep_pipelines::sql::ImageFunction::new(name, &model))
            .map_err(py_err)?;
        Ok(ImageFunction { inner })
    }

    /// The output's type, as the one field (`value`) of a schema.
    fn return_schema(&self) -> ArrowSchema {
        let field = Field::new("value", self.inner.return_type(), true);
        ArrowSchema {
            schema: Arc::new(Schema::new(vec![field])),
        }
    }

    /// One value per image of `images` (Spark's image struct, ours, or encoded bytes).
    fn __call__(&self, py: Python<'_>, images: &Bound<'_, PyAny>) -> PyResult<ArrowArray> {
        let images = import_array(images)?;
        let out = py.detach(|| self.inner.call(&images)).map_err(py_err)?;
        Ok(ArrowArray {
            field: Field::new("", out.data_type().clone(), true),
            array: out,
        })
    }
}

/// The images under `path` as record batches of `origin` (+ `label`), `image`, `image_error`.
#[pyfunction]
#[pyo3(signature = (path, recursive=true, label_from_folder=false, drop_invalid=false))]
fn read_images(
    py: Python<'_>,
    path: String,
    recursive: bool,
    label_from_folder: bool,
    drop_invalid: bool,
) -> PyResult<ArrowStream> {
    let options = ReadImagesOptions::default()
        .with_recursive(recursive)
        .with_label_from_folder(label_from_folder)
        .with_drop_invalid(drop_invalid);
    let (schema, batches) = py
        .detach(|| {
            let ctx = deep_pipelines::prelude::SessionContext::new();
            let df = deep_pipelines::read_images(&ctx, &path, options)?;
            let schema: SchemaRef = Arc::clone(df.schema().inner());
            let batches = deep_pipelines::batch::run_blocking("read_images", async move {
                Ok(df.collect().await?)
            })?;
            Ok((schema, batches))
        })
        .map_err(py_err)?;
    Ok(ArrowStream { schema, batches })
}

/// Sizes the native thread pool (decoding, preprocessing, the networks) once per process,
/// before its first use. Returns False when the pool already exists (its size stays).
#[pyfunction]
fn init_threads(num_threads: usize) -> bool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads.max(1))
        .build_global()
        .is_ok()
}

/// Threads in the native pool (creating it with the default size if it does not exist yet).
#[pyfunction]
fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Adds a folder to search for models when a stage's `modelDir` is empty, after
/// `$DEEP_PIPELINES_MODEL_DIR` and `./models` (the package adds the models it ships).
#[pyfunction]
fn add_model_dir(dir: String) {
    deep_pipelines::models::add_model_dir(dir);
}

/// The folders searched, in order, for a model whose `modelDir` is empty.
#[pyfunction]
fn model_dirs() -> Vec<String> {
    let dirs = deep_pipelines::models::model_dirs();
    dirs.iter().map(|d| d.display().to_string()).collect()
}

/// The named models (`modelName` values).
#[pyfunction]
fn available_models() -> Vec<String> {
    deep_pipelines::models::available_models()
}

/// ONNX Runtime's library for model files (`modelFile`), when `ORT_DYLIB_PATH` is not set.
#[pyfunction]
fn set_onnxruntime_library(path: String) {
    deep_pipelines::models::set_onnxruntime_library(path);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MODEL_DIR_ENV", deep_pipelines::models::MODEL_DIR_ENV)?;
    m.add_class::<Transformer>()?;
    m.add_class::<ImageFunction>()?;
    m.add_class::<ClassifierFit>()?;
    m.add_class::<ArrowArray>()?;
    m.add_class::<ArrowSchema>()?;
    m.add_class::<ArrowStream>()?;
    m.add_function(wrap_pyfunction!(read_images, m)?)?;
    m.add_function(wrap_pyfunction!(init_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(available_models, m)?)?;
    m.add_function(wrap_pyfunction!(network_stage_classes, m)?)?;
    m.add_function(wrap_pyfunction!(add_model_dir, m)?)?;
    m.add_function(wrap_pyfunction!(model_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(set_onnxruntime_library, m)?)?;
    Ok(())
}
