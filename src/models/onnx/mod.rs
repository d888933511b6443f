//! ONNX model files as networks: [`OnnxEngine`] runs one through ONNX Runtime (loaded at run
//! time: `ORT_DYLIB_PATH`, else the `onnxruntime` Python package), [`model_file_manifest`]
//! describes one in the manifest schema of the built-in models (from the graph, a
//! `<name>.json` next to the file and the stage's `modelManifest`), and `model_file` checks an
//! untrusted file before ONNX Runtime opens it.

mod library;
mod model_file;

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorRef, ValueType};
use serde_json::{Value, json};

use super::engine::{Engine, Head, Layout};
use super::manifest::{FeatureMode, Manifest, OnnxSpec};
use super::model_error;
use crate::error::Result;

pub use library::{ORT_DYLIB_ENV, onnxruntime_library, set_onnxruntime_library};

/// The process's ONNX Runtime environment, made once from the library [`onnxruntime_library`]
/// finds.
fn environment() -> std::result::Result<&'static Environment, String> {
    static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = onnxruntime_library()?;
        ort::init_from(&path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
            .with_name("deep-pipelines")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("ONNX Runtime ({}): {e}", path.display()))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// An ONNX model file's session and which of its inputs and outputs the stages use.
#[derive(Debug)]
pub struct OnnxEngine {
    /// ONNX Runtime's `Run` takes the session mutably; one forward pass at a time uses all of
    /// the session's threads anyway.
    session: Mutex<Session>,
    spec: OnnxSpec,
    /// A batch size fixed in the graph (batches are then split and the last one padded).
    fixed_batch: Option<usize>,
}

/// A model file's graph, checked and opened, with the facts a manifest is inferred from.
struct Opened {
    session: Session,
    input: String,
    /// The input's shape (`-1` where dynamic).
    input_shape: Vec<i64>,
    /// Each output's name and shape.
    outputs: Vec<(String, Vec<i64>)>,
}

/// Checks the file, then opens it in ONNX Runtime on the CPU with this workload's options: one
/// intra-op thread per thread of this process's pool (the pool Spark sizes to the task's
/// cores), threads that sleep instead of spinning between passes, every graph optimisation.
/// A manifest's `sha256`, when given, must be the file's.
fn open(path: &Path, input: &str, sha256: Option<&str>) -> std::result::Result<Opened, String> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open ({e})"))?;
    // SAFETY: read-only map of a file we only read; a concurrent writer could change what we
    // check, not make it unsound to read.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot read ({e})"))?;
    model_file::check(&bytes, folder)?;
    if let Some(expected) = sha256 {
        use sha2::Digest;
        let found = hex::encode(sha2::Sha256::digest(&bytes[..]));
        if found != expected.to_ascii_lowercase() {
            return Err(format!(
                "the file's sha256 is {found}, its description says {expected}"
            ));
        }
    }
    drop(bytes);
    let threads = rayon::current_num_threads().max(1);
    let session = Session::builder(environment()?)
        .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::All)?))
        .and_then(|b| Ok(b.with_intra_threads(threads)?))
        .and_then(|b| Ok(b.with_inter_threads(1)?))
        .and_then(|b| Ok(b.with_intra_op_spinning(false)?))
        .and_then(|mut b| b.commit_from_file(path))
        .map_err(|e| format!("ONNX Runtime cannot load it: {e}"))?;
    let shape = |t: &ValueType| t.tensor_shape().map(|s| s.to_vec());
    let images: Vec<_> = session
        .inputs()
        .iter()
        .filter(|i| input.is_empty() || i.name() == input)
        .collect();
    let not_image = |why: String| {
        format!(
            "not an image model: {why}. deep-pipelines runs image models (one float input \
             [batch, 3, height, width] or [batch, height, width, 3]); inputs that are not images \
             (e.g. text) are out of scope"
        )
    };
    let [image] = images.as_slice() else {
        let names: Vec<_> = session.inputs().iter().map(|i| i.name()).collect();
        return Err(not_image(if input.is_empty() {
            format!("it has {} inputs ({})", names.len(), names.join(", "))
        } else {
            format!("no input `{input}` (inputs: {})", names.join(", "))
        }));
    };
    let input_shape = shape(image.dtype()).unwrap_or_default();
    let float = image.dtype().tensor_type() == Some(ort::value::TensorElementType::Float32);
    let channels = |d: i64| d == 3 || d < 0;
    if !float || input_shape.len() != 4 || !(channels(input_shape[1]) || channels(input_shape[3])) {
        return Err(not_image(format!(
            "input `{}` is {}",
            image.name(),
            image.dtype()
        )));
    }
    let input = image.name().to_string();
    let outputs = session
        .outputs()
        .iter()
        .map(|o| (o.name().to_string(), shape(o.dtype()).unwrap_or_default()))
        .collect();
    Ok(Opened {
        session,
        input,
        input_shape,
        outputs,
    })
}

impl OnnxEngine {
    /// Opens the model file at `path` as its manifest describes it, on `device` (`cpu`).
    pub fn open(path: &Path, manifest: &Manifest, device: &str) -> Result<Self> {
        let fail = |e: String| model_error(&manifest.name, format!("{}: {e}", path.display()));
        if device != "cpu" {
            return Err(fail(format!(
                "ONNX model files run on `cpu` here, not `{device}`"
            )));
        }
        let mut spec = manifest.onnx.clone().unwrap_or_default();
        let opened = open(path, &spec.input, manifest.weights.sha256.as_deref()).map_err(fail)?;
        spec.input = opened.input;
        for name in [&spec.features, &spec.logits] {
            if !name.is_empty() && opened.outputs.iter().all(|(o, _)| o != name) {
                let names: Vec<_> = opened.outputs.iter().map(|(o, _)| o.as_str()).collect();
                return Err(fail(format!(
                    "the manifest names output `{name}`; the graph's outputs are {}",
                    names.join(", ")
                )));
            }
        }
        let fixed_batch = usize::try_from(opened.input_shape[0])
            .ok()
            .filter(|&b| b > 0);
        Ok(OnnxEngine {
            session: Mutex::new(opened.session),
            spec,
            fixed_batch,
        })
    }

    /// One pass of exactly the graph's batch (or any batch when it is dynamic).
    fn pass(
        &self,
        input: &[f32],
        batch: usize,
        size: usize,
        output: &str,
    ) -> std::result::Result<(Vec<i64>, Vec<f32>), String> {
        let shape = match self.spec.layout {
            Layout::Nchw => [batch, 3, size, size],
            Layout::Nhwc => [batch, size, size, 3],
        };
        let tensor = TensorRef::from_array_view((shape, input)).map_err(|e| e.to_string())?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session
            .run(ort::inputs![self.spec.input.as_str() => tensor])
            .map_err(|e| format!("ONNX Runtime: {e}"))?;
        let value = outputs
            .get(output)
            .ok_or_else(|| format!("the graph gave no output `{output}`"))?;
        let (shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("output `{output}`: {e}"))?;
        Ok((shape.to_vec(), data.to_vec()))
    }
}

impl Engine for OnnxEngine {
    fn layout(&self) -> Layout {
        self.spec.layout
    }

    fn run(
        &self,
        input: Vec<f32>,
        batch: usize,
        size: usize,
        head: Head,
    ) -> std::result::Result<(Vec<f32>, usize), String> {
        let output = match head {
            Head::Features(_) => &self.spec.features,
            Head::Logits if self.spec.logits.is_empty() => {
                return Err("the manifest names no logits output (onnx.logits)".into());
            }
            Head::Logits => &self.spec.logits,
        };
        let per_image = 3 * size * size;
        let step = self.fixed_batch.unwrap_or(batch.max(1));
        let mut values = Vec::new();
        let mut width = 0;
        for (k, chunk) in input.chunks(step * per_image).enumerate() {
            let n = chunk.len() / per_image;
            let (shape, data) = if n < step {
                let mut padded = chunk.to_vec();
                padded.resize(step * per_image, 0.0);
                self.pass(&padded, step, size, output)?
            } else {
                self.pass(chunk, step, size, output)?
            };
            let (rows, w) = reduce(&shape, data, head, step, output)?;
            if k > 0 && w != width {
                return Err(format!("output `{output}` changed width between passes"));
            }
            width = w;
            values.extend_from_slice(&rows[..n * w]);
        }
        Ok((values, width))
    }
}

/// An output tensor as `batch` rows for `head`: a feature map `[N, C, h, w]` is pooled (global
/// average) or flattened; vectors `[N, D]` are taken as they are.
fn reduce(
    shape: &[i64],
    data: Vec<f32>,
    head: Head,
    batch: usize,
    output: &str,
) -> std::result::Result<(Vec<f32>, usize), String> {
    let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    if dims.first() != Some(&batch) {
        return Err(format!(
            "output `{output}` has shape {shape:?}, not [{batch}, ...]"
        ));
    }
    let width = dims[1..].iter().product::<usize>();
    match (head, dims.len()) {
        (Head::Features(FeatureMode::Pooled), 4) => {
            let (c, plane) = (dims[1], dims[2] * dims[3]);
            let pooled = data
                .chunks_exact(plane.max(1))
                .map(|p| p.iter().sum::<f32>() / plane.max(1) as f32)
                .collect::<Vec<_>>();
            Ok((pooled, c))
        }
        (Head::Features(FeatureMode::Flattened), _) | (_, 2) => Ok((data, width)),
        _ => Err(format!(
            "output `{output}` has shape {shape:?}: expected [batch, D] or a feature map [batch, C, h, w]"
        )),
    }
}

/// The manifest of the model file at `path`: defaults (ImageNet preprocessing, the file's name)
/// under what the graph says (input size and layout, output widths; read only when the JSON
/// leaves them out), under `<stem>.json` next to the file, under `overrides` (the stage's
/// `modelManifest`, JSON). Checked as every manifest is.
pub fn model_file_manifest(path: &Path, overrides: &str) -> Result<Manifest> {
    let stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let fail = |e: String| model_error(&stem, format!("{}: {e}", path.display()));
    if path.extension().and_then(|e| e.to_str()) != Some("onnx") {
        return Err(fail(
            "a model file is an ONNX file ending in `.onnx`".into(),
        ));
    }
    if !path.is_file() {
        return Err(fail("model file not found".into()));
    }
    let file_name = path
        .file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
    let mut given = json!({});
    let side = path.with_extension("json");
    if side.is_file() {
        let text = std::fs::read_to_string(&side)
            .map_err(|e| fail(format!("cannot read {} ({e})", side.display())))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| fail(format!("malformed {}: {e}", side.display())))?;
        merge(&mut given, value);
    }
    if !overrides.trim().is_empty() {
        let value: Value = serde_json::from_str(overrides)
            .map_err(|e| fail(format!("malformed modelManifest: {e}")))?;
        merge(&mut given, value);
    }
    let mut manifest = json!({
        "name": stem,
        "architecture": "onnx",
        "description": format!("ONNX model file {file_name}"),
        "preprocess": {
            "filter": "bilinear", "crop": "center", "channel_order": "RGB",
            "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]
        },
        "feature_layer": "",
        "classifier": "",
        "weights": {"source": "a user's model file", "license": "the model's own"},
        "onnx": {}
    });
    let known = ["input_size", "feature_dim", "num_classes"]
        .iter()
        .all(|k| given.get(k).is_some());
    if !known {
        let input = given
            .pointer("/onnx/input")
            .and_then(Value::as_str)
            .unwrap_or("");
        let opened = open(path, input, None).map_err(fail)?;
        merge(&mut manifest, inferred(&opened, &given).map_err(fail)?);
    }
    merge(&mut manifest, given);
    // The file is the one at `path`, whatever a JSON says.
    manifest["weights"]["file"] = Value::from(file_name);
    if manifest
        .pointer("/preprocess/resize_shorter_side")
        .is_none()
    {
        let size = manifest["input_size"].as_f64().unwrap_or(0.0);
        manifest["preprocess"]["resize_shorter_side"] = Value::from((size / 0.875).round() as u64);
    }
    let manifest: Manifest = serde_json::from_value(manifest)
        .map_err(|e| fail(format!("incomplete model description: {e}")))?;
    manifest.validate().map_err(fail)?;
    Ok(manifest)
}

/// What the graph says: input size and layout, which outputs are features and logits, and
/// their widths.
fn inferred(opened: &Opened, given: &Value) -> std::result::Result<Value, String> {
    let shape = &opened.input_shape;
    let layout = match given.pointer("/onnx/layout").and_then(Value::as_str) {
        Some("NHWC") => Layout::Nhwc,
        Some(_) => Layout::Nchw,
        None if shape[1] != 3 && shape[3] == 3 => Layout::Nhwc,
        None => Layout::Nchw,
    };
    let (h, w) = match layout {
        Layout::Nchw => (shape[2], shape[3]),
        Layout::Nhwc => (shape[1], shape[2]),
    };
    if h <= 0 || h != w {
        return Err(format!(
            "the input's size is {h}x{w} in the graph: give input_size in <name>.json or modelManifest"
        ));
    }
    let named = |key: &str| {
        given
            .pointer(&format!("/onnx/{key}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let has = |name: &str| opened.outputs.iter().any(|(o, _)| o == name);
    let first = opened
        .outputs
        .first()
        .map(|(o, _)| o.clone())
        .unwrap_or_default();
    let features = named("features")
        .or_else(|| has("features").then(|| "features".to_string()))
        .unwrap_or(first.clone());
    let logits = named("logits")
        .or_else(|| has("logits").then(|| "logits".to_string()))
        .or_else(|| {
            opened
                .outputs
                .iter()
                .find(|(o, s)| *o != features && s.len() == 2)
                .map(|(o, _)| o.clone())
        })
        .unwrap_or_else(|| {
            // One output of [N, K]: the classifier's, so also the features.
            let two_d = opened
                .outputs
                .iter()
                .any(|(o, s)| *o == features && s.len() == 2);
            if two_d {
                features.clone()
            } else {
                String::new()
            }
        });
    let shape_of = |name: &str| {
        opened
            .outputs
            .iter()
            .find(|(o, _)| o == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    let width = |name: &str, dims: &[i64]| {
        if dims.iter().skip(1).any(|&d| d <= 0) {
            Err(format!(
                "output `{name}` has shape {dims:?} in the graph: give feature_dim, \
                 feature_map and num_classes in <name>.json or modelManifest"
            ))
        } else {
            Ok(dims[1] as usize)
        }
    };
    let fshape = shape_of(&features);
    let feature_dim = width(&features, &fshape)?;
    let feature_map = match fshape.as_slice() {
        [_, c, y, x] => [*c as usize, *y as usize, *x as usize],
        _ => [fshape[1..].iter().product::<i64>().max(0) as usize, 1, 1],
    };
    let num_classes = if logits.is_empty() {
        0
    } else {
        width(&logits, &shape_of(&logits))?
    };
    Ok(json!({
        "input_size": h,
        "feature_dim": feature_dim,
        "feature_map": feature_map,
        "num_classes": num_classes,
        "onnx": {"input": opened.input, "features": features, "logits": logits, "layout": layout}
    }))
}

/// Merges `more` into `into`, objects key by key (so a JSON may give only what it changes).
fn merge(into: &mut Value, more: Value) {
    match (into, more) {
        (Value::Object(into), Value::Object(more)) => {
            for (k, v) in more {
                merge(into.entry(k).or_insert(Value::Null), v);
            }
        }
        (into, more) => *into = more,
    }
}

/// Checks that a saved pipeline can carry the model file at `path` (its contents: `bytes`)
/// alone: an error names the external-data files it would need.
pub fn onnx_file_to_save(path: &Path, bytes: &[u8]) -> Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let facts = model_file::check(bytes, folder)
        .map_err(|e| model_error("modelFile", format!("{}: {e}", path.display())))?;
    if !facts.external_files.is_empty() {
        return Err(model_error(
            "modelFile",
            format!(
                "{}: keeps weights in other files ({}); a saved pipeline carries one model file: \
                 re-export it without external data",
                path.display(),
                facts
                    .external_files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(())
}
