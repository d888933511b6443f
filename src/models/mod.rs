//! Pretrained networks: one manifest per model (input size, preprocessing, feature size, weight
//! file + sha256, licence), one file per architecture, and a per-process cache so a model is
//! loaded once however many partitions and batches use it.

pub mod efficientnet_lite;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn::prelude::*;
use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use efficientnet_lite::{EfficientNetLiteConfig, FoldedEfficientNetLite};

/// Environment variable naming the folder that holds one sub-folder per model.
pub const MODEL_DIR_ENV: &str = "DEEP_PIPELINES_MODEL_DIR";

/// Named models: (name used in `modelName`, folder under the model directory).
const REGISTRY: &[(&str, &str)] = &[("EfficientNetLite0", "efficientnet_lite0")];

/// Names accepted by `DeepImageFeaturizer.modelName`.
pub fn available_models() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// The model directory: `$DEEP_PIPELINES_MODEL_DIR`, else this crate's bundled `models/`.
pub fn model_dir() -> PathBuf {
    std::env::var_os(MODEL_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models")))
}

/// Resize filter named in a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    Nearest,
    Bilinear,
    /// Catmull-Rom cubic (a = -0.5), PIL's and torchvision's "bicubic".
    Bicubic,
}

/// How an image becomes the network's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessSpec {
    /// Resize so the shorter side has this length (aspect kept), then crop; 0 = resize straight
    /// to `input_size` x `input_size`.
    pub resize_shorter_side: u32,
    pub filter: ResizeFilter,
    /// `center` (the only crop so far) after the shorter-side resize.
    pub crop: String,
    /// Channel order the network expects (`RGB`).
    pub channel_order: String,
    /// Per-channel `(pixel - mean) / std`, pixel in 0..=255.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Where the weights come from and how to check them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsSpec {
    pub file: String,
    pub sha256: Option<String>,
    pub source: String,
    pub license: String,
}

/// Everything about one named model, read from `<model_dir>/<folder>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub architecture: String,
    pub description: String,
    pub input_size: u32,
    pub preprocess: PreprocessSpec,
    pub feature_dim: usize,
    pub num_classes: usize,
    pub weights: WeightsSpec,
}

fn model_error(model: &str, message: impl Into<String>) -> Error {
    Error::Model {
        model: model.to_string(),
        message: message.into(),
    }
}

/// Reads the manifest of a named model.
pub fn manifest(name: &str) -> Result<(Manifest, PathBuf)> {
    let folder = REGISTRY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            model_error(
                name,
                format!(
                    "unknown model; available: {}",
                    available_models().join(", ")
                ),
            )
        })?;
    let dir = model_dir().join(folder);
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        model_error(
            name,
            format!(
                "cannot read {}: {e} (set {MODEL_DIR_ENV} to the folder holding `{folder}/`)",
                path.display()
            ),
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| model_error(name, format!("malformed {}: {e}", path.display())))?;
    Ok((manifest, dir))
}

/// Reads a weight file, refusing one larger than `max_bytes` before reading it.
pub fn read_weight_file(path: &Path, max_bytes: u64, model: &str) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .map_err(|e| {
            model_error(
                model,
                format!("cannot read weight file {}: {e}", path.display()),
            )
        })?
        .len();
    if len > max_bytes {
        return Err(model_error(
            model,
            format!(
                "weight file {} is {len} bytes, more than the {max_bytes} the architecture can need",
                path.display()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| {
        model_error(
            model,
            format!("cannot read weight file {}: {e}", path.display()),
        )
    })
}

/// The most bytes a safetensors file for `module` can hold: 8 bytes per parameter (f64 at most)
/// plus a header of up to the format's 100 MB cap.
pub fn max_weight_bytes<M: Module>(module: &M) -> u64 {
    module.num_params() as u64 * 8 + 100_000_000
}

/// Checks an untrusted safetensors buffer before anything is allocated for its tensors: the
/// header parses, offsets lie inside the buffer and match each shape, every tensor is F32 and
/// none holds more values than the whole module.
pub fn check_safetensors_header(bytes: &[u8], max_values: usize, what: &str) -> Result<(), String> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("{what}: not a valid safetensors file: {e}"))?;
    let data_len = bytes.len().saturating_sub(8 + header_len(bytes));
    for (name, info) in metadata.tensors() {
        if info.dtype != safetensors::Dtype::F32 {
            return Err(format!(
                "{what}: tensor `{name}` has dtype {:?}, expected F32",
                info.dtype
            ));
        }
        let values = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&v| v <= max_values)
            .ok_or_else(|| {
                format!(
                    "{what}: tensor `{name}` has shape {:?}, larger than the whole model",
                    info.shape
                )
            })?;
        let (start, end) = info.data_offsets;
        if end > data_len || start > end || end - start != values * 4 {
            return Err(format!(
                "{what}: tensor `{name}` has offsets {start}..{end} that do not fit its shape {:?} or the file",
                info.shape
            ));
        }
    }
    Ok(())
}

fn header_len(bytes: &[u8]) -> usize {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, |b| u64::from_le_bytes(b) as usize)
}

/// Loads safetensors weights (PyTorch layout) from a file into `module`, failing on any
/// missing, unexpected or mis-shaped tensor and naming it.
pub fn load_safetensors<M: ModuleSnapshot + Module>(
    module: &mut M,
    path: &Path,
    name_map: &[(&str, &str)],
    model: &str,
) -> Result<()> {
    if !path.is_file() {
        return Err(model_error(
            model,
            format!("weight file {} not found", path.display()),
        ));
    }
    let bytes = read_weight_file(path, max_weight_bytes(module), model)?;
    load_safetensors_bytes(module, bytes, &path.display().to_string(), name_map, model)
}

/// [`load_safetensors`] from bytes already read (`what` names them in errors). The header is
/// checked by [`check_safetensors_header`] first: hostile files fail before any allocation.
pub fn load_safetensors_bytes<M: ModuleSnapshot + Module>(
    module: &mut M,
    bytes: Vec<u8>,
    what: &str,
    name_map: &[(&str, &str)],
    model: &str,
) -> Result<()> {
    check_safetensors_header(&bytes, module.num_params(), what)
        .map_err(|e| model_error(model, e))?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .with_from_adapter(PyTorchToBurnAdapter)
        .allow_partial(true)
        .validate(false);
    for (from, to) in name_map {
        store = store.with_key_remapping(*from, *to);
    }
    let result = module
        .load_from(&mut store)
        .map_err(|e| model_error(model, format!("reading {what}: {e}")))?;
    let mut problems: Vec<String> = result.errors.iter().map(|e| format!("{e:?}")).collect();
    problems.extend(
        result
            .missing
            .iter()
            .map(|(p, _)| format!("tensor `{p}` missing from the file")),
    );
    problems.extend(
        result
            .unused
            .iter()
            .map(|p| format!("unexpected tensor `{p}` in the file")),
    );
    if !problems.is_empty() {
        let shown = problems.len().min(5);
        return Err(model_error(
            model,
            format!(
                "weights {what} do not match the architecture ({} problem(s)): {}{}",
                problems.len(),
                problems[..shown].join("; "),
                if problems.len() > shown { "; ..." } else { "" }
            ),
        ));
    }
    Ok(())
}

fn check_sha256(bytes: &[u8], path: &Path, expected: &str, model: &str) -> Result<()> {
    let found = hex::encode(Sha256::digest(bytes));
    if !found.eq_ignore_ascii_case(expected) {
        return Err(model_error(
            model,
            format!(
                "weight file {} has sha256 {found}, the manifest expects {expected}",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A network ready to run: `features` for the featurizer, `logits` for ImageNet predictions.
#[derive(Debug)]
pub enum Network {
    EfficientNetLite(FoldedEfficientNetLite),
}

impl Network {
    pub fn features(&self, input: Tensor<4>) -> Tensor<2> {
        match self {
            Network::EfficientNetLite(n) => n.features(input),
        }
    }

    pub fn logits(&self, features: Tensor<2>) -> Tensor<2> {
        match self {
            Network::EfficientNetLite(n) => n.logits(features),
        }
    }
}

/// A named model loaded on a device.
#[derive(Debug)]
pub struct LoadedModel {
    pub manifest: Manifest,
    pub network: Network,
    pub device: Device,
    /// Images run through the network so far (all callers of [`LoadedModel::features`]).
    images_processed: AtomicU64,
}

impl LoadedModel {
    /// Loads a named model from the model directory (uncached; see [`load_model`]).
    pub fn load(name: &str, device: &Device) -> Result<Self> {
        let (manifest, dir) = manifest(name)?;
        let weights = dir.join(&manifest.weights.file);
        if !weights.is_file() {
            return Err(model_error(
                name,
                format!(
                    "weight file {} not found; get it from: {} and put it there (or set {MODEL_DIR_ENV})",
                    weights.display(),
                    manifest.weights.source
                ),
            ));
        }
        let network = match manifest.architecture.as_str() {
            "efficientnet_lite0" => {
                let mut net = EfficientNetLiteConfig::lite0().init(device);
                let bytes = read_weight_file(&weights, max_weight_bytes(&net), name)?;
                if let Some(sha) = &manifest.weights.sha256 {
                    check_sha256(&bytes, &weights, sha, name)?;
                }
                load_safetensors_bytes(
                    &mut net,
                    bytes,
                    &weights.display().to_string(),
                    efficientnet_lite::WEIGHT_NAME_MAP,
                    name,
                )?;
                Network::EfficientNetLite(net.fold_batch_norms())
            }
            other => {
                return Err(model_error(name, format!("unknown architecture `{other}`")));
            }
        };
        Ok(LoadedModel {
            manifest,
            network,
            device: device.clone(),
            images_processed: AtomicU64::new(0),
        })
    }

    /// How many images this model has run through the network in this process: a cost meter
    /// (e.g. to check that tuning featurizes each row once).
    pub fn images_processed(&self) -> u64 {
        self.images_processed.load(Ordering::Relaxed)
    }

    /// Runs a batch of preprocessed inputs (`batch` x 3 x S x S, concatenated) to features.
    pub fn features(&self, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        let s = self.manifest.input_size as usize;
        let x = self.input_tensor(inputs, batch, s)?;
        self.images_processed
            .fetch_add(batch as u64, Ordering::Relaxed);
        tensor_to_vec(self.network.features(x), &self.manifest.name)
    }

    /// Runs a batch of preprocessed inputs to ImageNet logits.
    pub fn logits(&self, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        let s = self.manifest.input_size as usize;
        let x = self.input_tensor(inputs, batch, s)?;
        tensor_to_vec(
            self.network.logits(self.network.features(x)),
            &self.manifest.name,
        )
    }

    fn input_tensor(&self, inputs: Vec<f32>, batch: usize, s: usize) -> Result<Tensor<4>> {
        if inputs.len() != batch * 3 * s * s {
            return Err(model_error(
                &self.manifest.name,
                format!(
                    "input has {} values, expected {batch}x3x{s}x{s}",
                    inputs.len()
                ),
            ));
        }
        Ok(Tensor::from_data(
            TensorData::new(inputs, [batch, 3, s, s]),
            &self.device,
        ))
    }
}

fn tensor_to_vec(t: Tensor<2>, model: &str) -> Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| model_error(model, format!("reading output: {e:?}")))
}

/// The device named by a featurizer's `device` param: `cpu` (burn's flex backend) or, with the
/// `wgpu` feature, `wgpu`. Always explicit: `Device::default()` may pick a software GPU.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(Default::default())),
        other => Err(Error::param(
            "DeepImageFeaturizer",
            "device",
            format!(
                "unknown device `{other}`; available: {}",
                available_devices().join(", ")
            ),
        )),
    }
}

/// Device names this build supports.
pub fn available_devices() -> Vec<&'static str> {
    let mut devices = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        devices.push("wgpu");
    }
    devices
}

type Cache = Mutex<HashMap<(String, String), Arc<LoadedModel>>>;

/// Loads a named model on a named device once per process and shares it.
pub fn load_model(name: &str, device_name: &str) -> Result<Arc<LoadedModel>> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (name.to_string(), device_name.to_string());
    // Holding the lock while loading makes concurrent partitions wait for one load.
    let mut map = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(model) = map.get(&key) {
        return Ok(Arc::clone(model));
    }
    let model = Arc::new(LoadedModel::load(name, &device(device_name)?)?);
    map.insert(key, Arc::clone(&model));
    Ok(model)
}
