//! What names mean in this process: devices by name, model names (the catalog's, then users'
//! networks from [`register_network`]) resolved to manifests and loaded models, and the
//! per-process cache that loads a model once however many partitions and batches use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use burn::prelude::*;

use super::catalog;
use super::cpu::Precision;
use super::inverted_residual::InvertedResidualNet;
use super::loaded::{EngineSource, LoadedModel};
use super::manifest::{MODEL_DIR_ENV, Manifest, model_dirs, read_manifest, resolve_dir};
use super::weights::WeightSource;
use super::{ImageNetwork, model_error};
use crate::error::{Error, Result};

/// The device named by a `device` param: `cpu` (burn's flex backend) or, with the `wgpu`
/// feature, `wgpu` (the first GPU adapter: discrete, integrated, then virtual), `wgpu:<n>` (the
/// n-th GPU adapter, counting from 0 in that order: what a Spark task's GPU address names) or
/// `wgpu-cpu` (a software Vulkan adapter such as Mesa's llvmpipe: slow, for tests). Always
/// explicit: `Device::default()` may pick a software adapter. A name with no such adapter is an
/// error naming the adapters found.
pub fn device(name: &str) -> Result<Device> {
    match parse_device("models", name)? {
        DeviceName::Cpu => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        gpu => super::gpu::device(name, gpu),
    }
}

/// What a device name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceName {
    Cpu,
    /// The n-th GPU adapter (`wgpu` is `Gpu(0)`).
    #[cfg(feature = "wgpu")]
    Gpu(usize),
    /// A software (CPU) Vulkan adapter.
    #[cfg(feature = "wgpu")]
    SoftwareGpu,
}

/// A device name's meaning, without looking for adapters (cheap: a driver that plans a query
/// for GPU executors has none); an unknown name is an error listing the names this build takes.
pub(crate) fn parse_device(stage: &str, name: &str) -> Result<DeviceName> {
    match name {
        "cpu" => return Ok(DeviceName::Cpu),
        #[cfg(feature = "wgpu")]
        "wgpu" => return Ok(DeviceName::Gpu(0)),
        #[cfg(feature = "wgpu")]
        "wgpu-cpu" => return Ok(DeviceName::SoftwareGpu),
        _ => {}
    }
    #[cfg(feature = "wgpu")]
    if let Some(n) = name.strip_prefix("wgpu:").and_then(|n| n.parse().ok()) {
        return Ok(DeviceName::Gpu(n));
    }
    Err(Error::param(
        stage,
        "device",
        format!(
            "unknown device `{name}`; available: {}",
            available_devices().join(", ")
        ),
    ))
}

/// Device names this build supports (`wgpu:<n>` stands for `wgpu:0`, `wgpu:1`, ...).
pub fn available_devices() -> Vec<&'static str> {
    let mut devices = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        devices.extend(["wgpu", "wgpu:<n>", "wgpu-cpu"]);
    }
    devices
}

/// The device a name means, in words: `cpu`, or `wgpu: <adapter> (<type>, <backend>)`.
pub fn device_label(name: &str) -> String {
    #[cfg(feature = "wgpu")]
    if let Ok(gpu @ (DeviceName::Gpu(_) | DeviceName::SoftwareGpu)) = parse_device("models", name) {
        return super::gpu::label(name, gpu);
    }
    name.to_string()
}

/// Names accepted by `modelName`: the named models, then any registered with [`register_network`].
pub fn available_models() -> Vec<String> {
    let mut names: Vec<String> = catalog::names().map(str::to_string).collect();
    names.extend(user_models().read().map_or_else(
        |_| Vec::new(),
        |m| {
            m.keys()
                .filter(|k| !names.contains(k))
                .cloned()
                .collect::<Vec<_>>()
        },
    ));
    names
}

/// Reads the manifest of a named model from the default model directory.
pub fn manifest(name: &str) -> Result<(Manifest, PathBuf)> {
    manifest_in(name, None)
}

/// Reads the manifest of a named model from `dir` (or the default directory when `None`).
/// A model registered with [`register_network`] answers with its own manifest.
pub fn manifest_in(name: &str, dir: Option<&Path>) -> Result<(Manifest, PathBuf)> {
    if let Some(user) = user_model(name) {
        return Ok((user.manifest.clone(), PathBuf::new()));
    }
    let folder = catalog::folder(name).ok_or_else(|| {
        model_error(
            name,
            format!(
                "unknown model; available: {}",
                available_models().join(", ")
            ),
        )
    })?;
    read_manifest(name, folder, dir)
}

/// Loading by name (here rather than in `loaded.rs`: a name may be a user's network).
impl LoadedModel {
    /// Loads a named model from the default model directory (uncached; see [`load_model`]).
    pub fn load(name: &str, device: &Device) -> Result<Self> {
        Self::load_from(name, None, device)
    }

    /// Loads a named model from `dir` (or the default directory).
    pub fn load_from(name: &str, dir: Option<&Path>, device: &Device) -> Result<Self> {
        let (manifest, folder) = manifest_in(name, dir)?;
        let weights = weight_source(name, &manifest, &folder, dir)?;
        let network = catalog::load_architecture_from(
            &manifest.architecture,
            &weights,
            manifest.weights.expected_sha256(),
            device,
            Precision::F32,
            &manifest.name,
        )?;
        Self::new(manifest, network, device, &folder)
    }
}

/// The weights of a model's manifest: the file in `folder`; else, when no `modelDir` was
/// given (`dir`), the weights built into this binary for that model; else an error saying
/// where to get them.
fn weight_source(
    name: &str,
    manifest: &Manifest,
    folder: &Path,
    dir: Option<&Path>,
) -> Result<WeightSource> {
    let weights = folder.join(&manifest.weights.file);
    let searched = dir.is_none_or(|d| d.as_os_str().is_empty());
    let built_in = folder
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(catalog::embedded_weights)
        .filter(|_| searched && !weights.is_file());
    if let Some(bytes) = built_in {
        return Ok(WeightSource::Embedded(bytes));
    }
    if !weights.is_file() {
        return Err(model_error(
            name,
            format!(
                "weight file {} not found. Get it from {} (licence: {}) and put it at that path, \
                     or point {MODEL_DIR_ENV} / the modelDir param at a folder holding `{}/{}` \
                     (without modelDir, these folders are searched in order: {})",
                weights.display(),
                manifest.weights.source,
                manifest.weights.license,
                folder
                    .file_name()
                    .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
                manifest.weights.file,
                model_dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ));
    }
    Ok(WeightSource::File(weights))
}

/// A named model as the network `DeepImageClassifier` fine-tunes: weights loaded on the CPU,
/// BatchNorms folded. Only the inverted-residual family can be ([`trainable_models`]); the
/// error for any other model names them.
pub fn load_trainable(name: &str, dir: Option<&Path>) -> Result<(Manifest, InvertedResidualNet)> {
    let unsupported = || {
        model_error(
            name,
            format!(
                "fine-tuning supports {}; for another model fit a LogisticRegression on \
                 DeepImageFeaturizer's features",
                trainable_models().join(", ")
            ),
        )
    };
    if user_model(name).is_some() || !trainable_models().contains(&name) {
        return Err(unsupported());
    }
    let (manifest, folder) = manifest_in(name, dir)?;
    let weights = weight_source(name, &manifest, &folder, dir)?;
    let network = catalog::load_trainable(
        &manifest.architecture,
        &weights,
        manifest.weights.expected_sha256(),
        &manifest.name,
    )?
    .ok_or_else(unsupported)?;
    Ok((manifest, network))
}

/// The named models `DeepImageClassifier` can fine-tune.
pub fn trainable_models() -> Vec<&'static str> {
    catalog::trainable_names()
}

/// What a cached model was loaded from: its weight file's size and modification time. A
/// different stamp on the next lookup (the file was replaced) loads the model again.
type Stamp = Option<(u64, std::time::SystemTime)>;

fn stamp(weights: &WeightSource) -> Stamp {
    let WeightSource::File(path) = weights else {
        return None;
    };
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// One cache entry: its own lock, so loading one model never blocks another's lookup.
type Slot = Arc<Mutex<Option<(Stamp, Arc<LoadedModel>)>>>;
type Cache = Mutex<HashMap<(String, String, PathBuf, Precision), Slot>>;

/// Loads a named model on a named device once per process and shares it.
pub fn load_model(name: &str, device_name: &str) -> Result<Arc<LoadedModel>> {
    load_model_in(name, device_name, None)
}

/// [`load_model`] from a given model directory (`None` or empty: the default one). The manifest,
/// class names and the weight file's presence are checked now; the weights are read and the
/// device resolved when the first batch runs, so planning a query needs neither. A model whose
/// weight file changed since it was cached is loaded again.
pub fn load_model_in(
    name: &str,
    device_name: &str,
    dir: Option<&Path>,
) -> Result<Arc<LoadedModel>> {
    load_model_as(name, device_name, dir, Precision::F32)
}

/// [`load_model_in`] with the network's CPU plan in `precision` (a user's network, which has
/// no plan of ours, runs as registered).
pub fn load_model_as(
    name: &str,
    device_name: &str,
    dir: Option<&Path>,
    precision: Precision,
) -> Result<Arc<LoadedModel>> {
    if let Some(user) = user_model(name) {
        return Ok(user);
    }
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let explicit = dir
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf);
    let dir = resolve_dir(dir, catalog::folder(name).unwrap_or_default());
    let key = (
        name.to_string(),
        device_name.to_string(),
        dir.clone(),
        precision,
    );
    // The map's lock is held only to find the entry; the entry's lock while loading makes
    // concurrent partitions wait for one load of this model, and nobody else.
    let slot: Slot = Arc::clone(
        cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(key)
            .or_default(),
    );
    let mut entry = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (manifest, folder) = manifest_in(name, Some(&dir))?;
    let weights = weight_source(name, &manifest, &folder, explicit.as_deref())?;
    parse_device("models", device_name)?;
    let now = stamp(&weights);
    if let Some((loaded, model)) = entry.as_ref()
        && *loaded == now
    {
        return Ok(Arc::clone(model));
    }
    let model = Arc::new(LoadedModel::deferred(
        manifest,
        EngineSource::Weights(weights),
        &folder,
        device_name,
        precision,
    )?);
    *entry = Some((now, Arc::clone(&model)));
    Ok(model)
}

type UserModels = RwLock<HashMap<String, Arc<LoadedModel>>>;

fn user_models() -> &'static UserModels {
    static USER: OnceLock<UserModels> = OnceLock::new();
    USER.get_or_init(Default::default)
}

fn user_model(name: &str) -> Option<Arc<LoadedModel>> {
    user_models().read().ok()?.get(name).cloned()
}

/// Makes your own network usable by name in `DeepImageFeaturizer` / `DeepImagePredictor` (and
/// SQL) in this process: the equivalent of sparkdl's `TFImageTransformer`. The manifest says how
/// images are preprocessed and what the network returns; outputs are checked against it.
/// Labels: `Some("imagenet")` or a file path (absolute, or relative to the working directory).
/// The network runs on `device`: the stages' `device` and `modelDir` params do not apply to it.
///
/// ```no_run
/// use std::sync::Arc;
/// use burn::prelude::*;
/// use deep_pipelines::models::{ImageNetwork, register_network, manifest};
///
/// #[derive(Debug)]
/// struct MeanColour; // any burn module works the same way
/// impl ImageNetwork for MeanColour {
///     fn feature_map(&self, input: Tensor<4>) -> Tensor<4> { input } // [N, 3, S, S]
/// }
///
/// let (mut m, _) = manifest("EfficientNetLite0").unwrap(); // start from a known manifest
/// m.name = "MeanColour".into();
/// m.architecture = "custom".into();
/// m.feature_dim = 3;
/// m.feature_map = [3, m.input_size as usize, m.input_size as usize];
/// register_network(m, Arc::new(MeanColour), &Device::flex()).unwrap();
/// // DeepImageFeaturizer::new().with_model_name("MeanColour") now yields 3-d mean colours.
/// ```
///
/// A name already registered is an error: use [`replace_network`] to replace it.
pub fn register_network(
    manifest: Manifest,
    network: Arc<dyn ImageNetwork>,
    device: &Device,
) -> Result<()> {
    add_network(manifest, network, device, false)
}

/// [`register_network`], replacing a network registered under the same name. Stages planned
/// before keep the network they were planned with.
pub fn replace_network(
    manifest: Manifest,
    network: Arc<dyn ImageNetwork>,
    device: &Device,
) -> Result<()> {
    add_network(manifest, network, device, true)
}

fn add_network(
    manifest: Manifest,
    network: Arc<dyn ImageNetwork>,
    device: &Device,
    replace: bool,
) -> Result<()> {
    if catalog::folder(&manifest.name).is_some() {
        return Err(model_error(
            &manifest.name,
            "a built-in model has this name; choose another",
        ));
    }
    manifest
        .validate()
        .map_err(|e| model_error(&manifest.name, e))?;
    let model = LoadedModel::new(manifest, network, device, Path::new(""))?;
    let mut models = user_models()
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !replace && models.contains_key(&model.manifest.name) {
        return Err(model_error(
            &model.manifest.name,
            "a network is already registered under this name; use replace_network to replace it",
        ));
    }
    models.insert(model.manifest.name.clone(), Arc::new(model));
    Ok(())
}

/// An ONNX model file as a model, once per process for each file, description and device (a
/// replaced file or `<name>.json` loads again). The manifest comes from
/// [`model_file_manifest`](super::onnx::model_file_manifest) now; the file is checked and
/// opened in ONNX Runtime when the first batch runs. Class names (`labels`) are read from the
/// file's folder. ONNX models run on `cpu`.
pub fn load_model_file(
    path: &Path,
    overrides: &str,
    device_name: &str,
) -> Result<Arc<LoadedModel>> {
    let stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    if device_name != "cpu" {
        return Err(model_error(
            &stem,
            format!("ONNX model files run on `cpu` here, not `{device_name}`"),
        ));
    }
    #[cfg(not(feature = "onnx"))]
    {
        let _ = overrides;
        Err(model_error(
            &stem,
            format!("{}: {}", path.display(), super::NO_ONNX),
        ))
    }
    #[cfg(feature = "onnx")]
    {
        type FileCache = Mutex<HashMap<(PathBuf, String, Stamp, Stamp), Arc<LoadedModel>>>;
        static CACHE: OnceLock<FileCache> = OnceLock::new();
        let file = |p: &Path| {
            let meta = std::fs::metadata(p).ok()?;
            Some((meta.len(), meta.modified().ok()?))
        };
        let key = (
            path.to_path_buf(),
            overrides.to_string(),
            file(path),
            file(&path.with_extension("json")),
        );
        let cache = CACHE.get_or_init(Default::default);
        if let Some(model) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Arc::clone(model));
        }
        let manifest = super::onnx::model_file_manifest(path, overrides)?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let source = EngineSource::Onnx(path.to_path_buf());
        let model = Arc::new(LoadedModel::deferred(
            manifest,
            source,
            folder,
            device_name,
            Precision::F32,
        )?);
        cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Arc::clone(&model));
        Ok(model)
    }
}

#[cfg(all(test, not(feature = "onnx")))]
mod tests {
    /// A build without the `onnx` feature: a model file is a clear error naming the feature.
    #[test]
    fn a_model_file_needs_the_onnx_feature() {
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/onnx/cnn_bn.onnx"
        );
        let e = super::load_model_file(std::path::Path::new(file), "", "cpu")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`onnx` feature") && e.contains("cnn_bn"), "{e}");
    }
}
