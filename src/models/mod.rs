//! Pretrained networks: one manifest per model (input size, preprocessing, feature layer and
//! size, classifier head, weight file + sha256 + where to get it, licence), one file per
//! architecture, weight loading from safetensors or PyTorch checkpoints (read without running
//! pickle code), users' own networks ([`ImageNetwork`] + [`register_network`]), and a per-process
//! cache so a model is loaded once however many partitions and batches use it.

pub mod efficientnet;
pub mod efficientnet_lite;
pub mod inception_v3;
pub mod layers;
pub mod mobilenet_v2;
pub mod mobilenet_v3;
pub mod resnet;
pub mod squeezenet;
pub mod vgg;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use burn::prelude::*;
use burn::store::{
    ApplyError, ApplyResult, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use layers::{FoldBatchNorms, NameMap, flatten, global_average_pool};

/// Environment variable naming the folder that holds one sub-folder per model.
pub const MODEL_DIR_ENV: &str = "DEEP_PIPELINES_MODEL_DIR";

/// Named models: (name used in `modelName`, folder under the model directory).
const REGISTRY: &[(&str, &str)] = &[
    ("EfficientNetLite0", "efficientnet_lite0"),
    ("EfficientNetLite1", "efficientnet_lite1"),
    ("EfficientNetLite2", "efficientnet_lite2"),
    ("ResNet18", "resnet18"),
    ("ResNet34", "resnet34"),
    ("ResNet50", "resnet50"),
    ("ResNet101", "resnet101"),
    ("ResNet152", "resnet152"),
    ("MobileNetV2", "mobilenet_v2"),
    ("MobileNetV3Large", "mobilenet_v3_large"),
    ("MobileNetV3Small", "mobilenet_v3_small"),
    ("SqueezeNet1_1", "squeezenet1_1"),
    ("EfficientNetB0", "efficientnet_b0"),
    ("InceptionV3", "inception_v3"),
    ("VGG16", "vgg16"),
    ("VGG16BN", "vgg16_bn"),
    ("VGG19", "vgg19"),
    ("VGG19BN", "vgg19_bn"),
];

/// A network the featurizer and predictor can run. Implement it for any burn module to use
/// your own model (see [`register_network`]); the built-in architectures implement it too.
///
/// The input is a normalised RGB batch `[N, 3, S, S]` made as the model's [`Manifest`] says.
pub trait ImageNetwork: Send + Sync + std::fmt::Debug {
    /// The last feature map, `[N, C, h, w]` (`featureMode = flattened` returns it flattened).
    /// A network that ends in a vector can return it as `[N, D, 1, 1]`.
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4>;

    /// The feature vector from the map (`featureMode = pooled`); global average pool by default.
    fn features(&self, map: Tensor<4>) -> Tensor<2> {
        global_average_pool(map)
    }

    /// Class logits from the map, for [`crate::DeepImagePredictor`]; `None` if there is no head.
    fn logits(&self, _map: Tensor<4>) -> Option<Tensor<2>> {
        None
    }
}

/// Names accepted by `modelName`: the named models, then any registered with [`register_network`].
pub fn available_models() -> Vec<String> {
    let mut names: Vec<String> = REGISTRY.iter().map(|(name, _)| name.to_string()).collect();
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

/// The default model directory: `$DEEP_PIPELINES_MODEL_DIR`, else this crate's bundled `models/`.
pub fn model_dir() -> PathBuf {
    std::env::var_os(MODEL_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(model_dir_bundled)
}

/// This crate's `models/`: manifests of every named model, Lite weights, class names.
fn model_dir_bundled() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models"))
}

/// `dir` if given and not empty (an empty `modelDir` param means the default), else [`model_dir`].
fn resolve_dir(dir: Option<&Path>) -> PathBuf {
    dir.filter(|d| !d.as_os_str().is_empty())
        .map_or_else(model_dir, Path::to_path_buf)
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
    /// The first hex digits of the sha256 when only those are published (torchvision puts 8
    /// of them in its file names); checked when `sha256` is absent.
    #[serde(default)]
    pub sha256_prefix: Option<String>,
    pub source: String,
    pub license: String,
}

impl WeightsSpec {
    /// What the file's sha256 must be (or start with), if anything is known.
    pub fn expected_sha256(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.sha256_prefix.as_deref())
    }
}

/// Everything about one named model, read from `<model_dir>/<folder>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub architecture: String,
    pub description: String,
    pub input_size: u32,
    pub preprocess: PreprocessSpec,
    /// Which layer the pooled feature vector comes from (e.g. "global average pool of layer4").
    #[serde(default)]
    pub feature_layer: String,
    /// Size of the pooled feature vector.
    pub feature_dim: usize,
    /// Shape `[C, h, w]` of the last feature map at `input_size` (`featureMode = flattened`;
    /// zeros when unknown, which refuses that mode).
    #[serde(default)]
    pub feature_map: [usize; 3],
    /// The classifier head (e.g. "fc 2048 -> 1000").
    #[serde(default)]
    pub classifier: String,
    pub num_classes: usize,
    /// Class names: `imagenet` (bundled ILSVRC-2012 names) or a text file (one name per line)
    /// relative to the model's folder.
    #[serde(default)]
    pub labels: Option<String>,
    pub weights: WeightsSpec,
}

impl Manifest {
    /// Checks what preprocessing and the output columns rely on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let p = &self.preprocess;
        let problem = if self.input_size == 0 || self.feature_dim == 0 {
            "input_size and feature_dim must be positive".to_string()
        } else if p.resize_shorter_side != 0 && p.resize_shorter_side < self.input_size {
            format!(
                "resize_shorter_side {} is smaller than the {} crop",
                p.resize_shorter_side, self.input_size
            )
        } else if p.resize_shorter_side != 0 && p.crop != "center" {
            format!("unsupported crop `{}` (only `center`)", p.crop)
        } else if p.channel_order != "RGB" {
            format!(
                "unsupported channel_order `{}` (only `RGB`)",
                p.channel_order
            )
        } else if p.std.iter().any(|s| !s.is_finite() || *s == 0.0)
            || p.mean.iter().any(|m| !m.is_finite())
        {
            "mean must be finite and std finite and non-zero".to_string()
        } else if [self.feature_dim, self.num_classes, self.feature_map_len()]
            .iter()
            .any(|&d| d > i32::MAX as usize)
        {
            "an output size is larger than an Arrow list can hold".to_string()
        } else {
            return Ok(());
        };
        Err(format!("invalid manifest for `{}`: {problem}", self.name))
    }

    fn feature_map_len(&self) -> usize {
        self.feature_map
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// Length of one output row in the given mode.
    pub fn output_dim(&self, mode: FeatureMode) -> usize {
        match mode {
            FeatureMode::Pooled => self.feature_dim,
            FeatureMode::Flattened => self.feature_map_len(),
        }
    }
}

/// What the featurizer returns: the pooled feature vector or the flattened last feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureMode {
    Pooled,
    Flattened,
}

impl FeatureMode {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "pooled" => Some(FeatureMode::Pooled),
            "flattened" => Some(FeatureMode::Flattened),
            _ => None,
        }
    }
}

fn model_error(model: &str, message: impl Into<String>) -> Error {
    Error::Model {
        model: model.to_string(),
        message: message.into(),
    }
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
    let dir = resolve_dir(dir).join(folder);
    // A model folder may hold just the weights: the bundled manifest then describes them.
    let path = Some(dir.join("manifest.json"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| model_dir_bundled().join(folder).join("manifest.json"));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        model_error(
            name,
            format!(
                "cannot read {}: {e} (set {MODEL_DIR_ENV} or modelDir to the folder holding `{folder}/`)",
                path.display()
            ),
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| model_error(name, format!("malformed {}: {e}", path.display())))?;
    manifest
        .validate()
        .map_err(|e| model_error(name, format!("{}: {e}", path.display())))?;
    Ok((manifest, dir))
}

/// Reads a weight file, refusing one larger than `max_bytes` before reading it.
pub fn read_weight_file(path: &Path, max_bytes: u64, model: &str) -> Result<Vec<u8>> {
    check_weight_size(path, max_bytes, model)?;
    std::fs::read(path).map_err(|e| {
        model_error(
            model,
            format!("cannot read weight file {}: {e}", path.display()),
        )
    })
}

/// Refuses a weight file larger than `max_bytes`, from its metadata, before reading it.
fn check_weight_size(path: &Path, max_bytes: u64, model: &str) -> Result<()> {
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
    Ok(())
}

/// The most bytes a safetensors file for `module` can hold: 8 bytes per parameter (f64 at most)
/// plus a header of up to the format's 100 MB cap.
pub fn max_weight_bytes<M: Module>(module: &M) -> u64 {
    module.num_params() as u64 * 8 + 100_000_000
}

/// Checks an untrusted safetensors buffer before anything is allocated for its tensors: the
/// header parses, offsets lie inside the buffer and match each shape, every tensor is F32 and
/// none holds more values than the whole module.
/// Returns the tensor names.
pub fn check_safetensors_header(
    bytes: &[u8],
    max_values: usize,
    what: &str,
) -> Result<Vec<String>, String> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("{what}: not a valid safetensors file: {e}"))?;
    let data_len = bytes.len().saturating_sub(8 + header_len(bytes));
    let mut names = Vec::new();
    for (name, info) in metadata.tensors() {
        // PyTorch's BatchNorm step counters (int64 scalars) are ignored on load.
        let counter = is_batch_counter(&name);
        if info.dtype != safetensors::Dtype::F32 && !counter {
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
        if end > data_len || start > end || end - start != values * info.dtype.bitsize() / 8 {
            return Err(format!(
                "{what}: tensor `{name}` has offsets {start}..{end} that do not fit its shape {:?} or the file",
                info.shape
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// `bn.num_batches_tracked`: a training counter PyTorch saves with every BatchNorm; no weight.
fn is_batch_counter(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

fn header_len(bytes: &[u8]) -> usize {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, |b| u64::from_le_bytes(b) as usize)
}

/// Loads safetensors weights (PyTorch layout) from a file into `module`, failing on any
/// missing, unexpected or mis-shaped tensor and naming it.
pub fn load_safetensors<M: ModuleSnapshot + Module, A: AsRef<str>, B: AsRef<str>>(
    module: &mut M,
    path: &Path,
    name_map: &[(A, B)],
    model: &str,
) -> Result<()> {
    require_file(path, model)?;
    let bytes = read_weight_file(path, max_weight_bytes(module), model)?;
    load_safetensors_bytes(module, bytes, &path.display().to_string(), name_map, model)
}

fn require_file(path: &Path, model: &str) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(model_error(
            model,
            format!("weight file {} not found", path.display()),
        ))
    }
}

/// [`load_safetensors`] from bytes already read (`what` names them in errors). The header is
/// checked by [`check_safetensors_header`] first: hostile files fail before any allocation.
pub fn load_safetensors_bytes<M: ModuleSnapshot + Module, A: AsRef<str>, B: AsRef<str>>(
    module: &mut M,
    bytes: Vec<u8>,
    what: &str,
    name_map: &[(A, B)],
    model: &str,
) -> Result<()> {
    let file_names = check_safetensors_header(&bytes, module.num_params(), what)
        .map_err(|e| model_error(model, e))?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .with_from_adapter(PyTorchToBurnAdapter)
        .allow_partial(true)
        .validate(false);
    for (from, to) in name_map {
        store = store.with_key_remapping(from.as_ref(), to.as_ref());
    }
    apply_store(module, &mut store, what, model, || {
        FileNames::new(file_names, name_map)
    })
}

/// Loads a PyTorch checkpoint (`torch.save(state_dict)`, zip or legacy format) into `module`.
/// burn-store's reader parses the pickle stream as data and never executes it.
pub fn load_pytorch<M: ModuleSnapshot + Module, A: AsRef<str>, B: AsRef<str>>(
    module: &mut M,
    path: &Path,
    name_map: &[(A, B)],
    model: &str,
) -> Result<()> {
    require_file(path, model)?;
    check_weight_size(path, max_weight_bytes(module), model)?;
    let mut store = PytorchStore::from_file(path)
        .map_indices_contiguous(false)
        .allow_partial(true)
        .validate(false);
    for (from, to) in name_map {
        store = store.with_key_remapping(from.as_ref(), to.as_ref());
    }
    apply_store(
        module,
        &mut store,
        &path.display().to_string(),
        model,
        || {
            // Only on error: the file's own names, to report problems as the checkpoint spells them.
            let names = PytorchStore::from_file(path)
                .map_indices_contiguous(false)
                .keys()
                .unwrap_or_default();
            FileNames::new(names, name_map)
        },
    )
}

/// Applies a store to `module` and turns missing, unexpected and mis-shaped tensors into one
/// error naming up to five of them, as the file names them (`file_names` is called only then).
fn apply_store<M: ModuleSnapshot, S: ModuleStore>(
    module: &mut M,
    store: &mut S,
    what: &str,
    model: &str,
    file_names: impl FnOnce() -> FileNames,
) -> Result<()>
where
    S::Error: std::fmt::Display,
{
    let result: ApplyResult = module
        .load_from(store)
        .map_err(|e| model_error(model, format!("reading {what}: {e}")))?;
    let unused: Vec<&String> = result
        .unused
        .iter()
        .filter(|p| !is_batch_counter(p))
        .collect();
    if result.errors.is_empty() && result.missing.is_empty() && unused.is_empty() {
        return Ok(());
    }
    let names = file_names();
    let mut problems: Vec<String> = result
        .errors
        .iter()
        .map(|e| match e {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => {
                let note = if expected.num_dims() == 2 {
                    " (2-d shapes in burn's [in, out] layout: PyTorch's linear weights transposed)"
                } else {
                    ""
                };
                format!(
                    "tensor {} has shape {:?}, the architecture needs {:?}{note}",
                    names.name(path),
                    found.as_slice(),
                    expected.as_slice()
                )
            }
            other => format!("{other:?}"),
        })
        .collect();
    problems.extend(
        result
            .missing
            .iter()
            .map(|(p, _)| format!("tensor `{p}` missing from the file")),
    );
    problems.extend(
        unused
            .iter()
            .map(|p| format!("unexpected tensor {} in the file", names.name(p))),
    );
    let shown = problems.len().min(5);
    Err(model_error(
        model,
        format!(
            "weights {what} do not match the architecture ({} problem(s)): {}{}",
            problems.len(),
            problems[..shown].join("; "),
            if problems.len() > shown { "; ..." } else { "" }
        ),
    ))
}

/// Module paths back to the weight file's names, by running the name map's rules forward on
/// every name in the file (as burn-store's key remapper does).
struct FileNames(HashMap<String, String>);

impl FileNames {
    fn new<A: AsRef<str>, B: AsRef<str>>(names: Vec<String>, rules: &[(A, B)]) -> Self {
        let rules: Vec<(regex::Regex, &str)> = rules
            .iter()
            .filter_map(|(from, to)| Some((regex::Regex::new(from.as_ref()).ok()?, to.as_ref())))
            .collect();
        let map = names
            .into_iter()
            .map(|original| {
                let mut mapped = original.clone();
                for (pattern, to) in &rules {
                    if pattern.is_match(&mapped) {
                        mapped = pattern.replace_all(&mapped, *to).into_owned();
                    }
                }
                (mapped, original)
            })
            .collect();
        FileNames(map)
    }

    /// `` `file.name` (module path `a.b`) ``, or just `` `a.b` `` when the names agree.
    fn name(&self, path: &str) -> String {
        match self.0.get(path) {
            Some(original) if original != path => format!("`{original}` (module path `{path}`)"),
            _ => format!("`{path}`"),
        }
    }
}

/// Loads weights into `module` from a safetensors file or a PyTorch checkpoint (by extension:
/// `.pth`, `.pt`, `.bin` are PyTorch), checking the sha256 when one is given.
pub fn load_weights<M: ModuleSnapshot + Module>(
    mut module: M,
    path: &Path,
    names: &NameMap,
    sha256: Option<&str>,
    model: &str,
) -> Result<M> {
    require_file(path, model)?;
    names.check().map_err(|e| model_error(model, e))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(extension.as_str(), "pth" | "pt" | "bin") {
        if let Some(sha) = sha256 {
            // Hashed in chunks: a 550 MB VGG checkpoint is not held twice in memory.
            check_weight_size(path, max_weight_bytes(&module), model)?;
            check_sha256(file_sha256(path, model)?, path, sha, model)?;
        }
        load_pytorch(&mut module, path, &names.0, model)?;
    } else {
        let bytes = read_weight_file(path, max_weight_bytes(&module), model)?;
        if let Some(sha) = sha256 {
            check_sha256(Sha256::digest(&bytes), path, sha, model)?;
        }
        load_safetensors_bytes(
            &mut module,
            bytes,
            &path.display().to_string(),
            &names.0,
            model,
        )?;
    }
    Ok(module)
}

/// Checks the file's sha256 against `expected`: the whole digest, or its first digits.
fn check_sha256(digest: impl AsRef<[u8]>, path: &Path, expected: &str, model: &str) -> Result<()> {
    let found = hex::encode(digest);
    let expected_lower = expected.to_ascii_lowercase();
    if expected.len() < 8 || !found.starts_with(&expected_lower) {
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

/// The sha256 of a file, read 1 MiB at a time.
fn file_sha256(path: &Path, model: &str) -> Result<impl AsRef<[u8]>> {
    use std::io::Read;
    let read_error = |e: std::io::Error| {
        model_error(
            model,
            format!("cannot read weight file {}: {e}", path.display()),
        )
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buffer[..n]);
    }
}

/// Architectures a manifest's `architecture` may name.
pub const ARCHITECTURES: &[&str] = &[
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "efficientnet_b0",
    "inception_v3",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
];

/// Builds the full-size `architecture` (1000 ImageNet classes), loads `weights` into it and
/// folds its BatchNorms into the convolutions (what the featurizer and predictor run).
pub fn load_architecture(
    architecture: &str,
    weights: &Path,
    sha256: Option<&str>,
    device: &Device,
    model: &str,
) -> Result<Arc<dyn ImageNetwork>> {
    use efficientnet::EfficientNetConfig;
    use efficientnet_lite::EfficientNetLiteConfig as Lite;
    use inception_v3::InceptionV3Config;
    use mobilenet_v2::MobileNetV2Config;
    use mobilenet_v3::MobileNetV3Config;
    use resnet::ResNetConfig;
    use squeezenet::SqueezeNetConfig;
    use vgg::VggConfig;

    fn shared<N: ImageNetwork + FoldBatchNorms + 'static>(net: N) -> Result<Arc<dyn ImageNetwork>> {
        Ok(Arc::new(net.fold_batch_norms()))
    }
    let lite = |c: Lite| {
        let names = NameMap(
            efficientnet_lite::WEIGHT_NAME_MAP
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        );
        shared(load_weights(
            c.init(device),
            weights,
            &names,
            sha256,
            model,
        )?)
    };
    let resnet = |c: ResNetConfig| {
        shared(load_weights(
            c.init(device),
            weights,
            &resnet::weight_names(),
            sha256,
            model,
        )?)
    };
    let vgg = |c: VggConfig| {
        shared(load_weights(
            c.init(device),
            weights,
            &c.weight_names(),
            sha256,
            model,
        )?)
    };
    match architecture {
        "efficientnet_lite0" => lite(Lite::lite0()),
        "efficientnet_lite1" => lite(Lite::lite1()),
        "efficientnet_lite2" => lite(Lite::lite2()),
        "resnet18" => resnet(ResNetConfig::resnet18()),
        "resnet34" => resnet(ResNetConfig::resnet34()),
        "resnet50" => resnet(ResNetConfig::resnet50()),
        "resnet101" => resnet(ResNetConfig::resnet101()),
        "resnet152" => resnet(ResNetConfig::resnet152()),
        "vgg16" => vgg(VggConfig::vgg16(false)),
        "vgg16_bn" => vgg(VggConfig::vgg16(true)),
        "vgg19" => vgg(VggConfig::vgg19(false)),
        "vgg19_bn" => vgg(VggConfig::vgg19(true)),
        "mobilenet_v2" => {
            let c = MobileNetV2Config::mobilenet_v2();
            shared(load_weights(
                c.init(device),
                weights,
                &c.weight_names(),
                sha256,
                model,
            )?)
        }
        "mobilenet_v3_large" | "mobilenet_v3_small" => {
            let c = if architecture.ends_with("large") {
                MobileNetV3Config::large()
            } else {
                MobileNetV3Config::small()
            };
            shared(load_weights(
                c.init(device),
                weights,
                &c.weight_names(),
                sha256,
                model,
            )?)
        }
        "squeezenet1_1" => {
            let c = SqueezeNetConfig::squeezenet1_1();
            shared(load_weights(
                c.init(device),
                weights,
                &squeezenet::weight_names(),
                sha256,
                model,
            )?)
        }
        "efficientnet_b0" => {
            let c = EfficientNetConfig::b0();
            shared(load_weights(
                c.init(device),
                weights,
                &c.weight_names(),
                sha256,
                model,
            )?)
        }
        "inception_v3" => {
            let c = InceptionV3Config::inception_v3();
            shared(load_weights(
                c.init(device),
                weights,
                &inception_v3::weight_names(),
                sha256,
                model,
            )?)
        }
        other => Err(model_error(
            model,
            format!(
                "unknown architecture `{other}`; available: {}",
                ARCHITECTURES.join(", ")
            ),
        )),
    }
}

/// A model loaded on a device: its manifest, network and class names.
#[derive(Debug)]
pub struct LoadedModel {
    pub manifest: Manifest,
    pub network: Arc<dyn ImageNetwork>,
    pub device: Device,
    /// Class names (index = class), when the manifest names them.
    pub labels: Option<Arc<Vec<String>>>,
    /// Images run through the network so far (all callers).
    images_processed: AtomicU64,
}

/// The 1000 ILSVRC-2012 class names (torchvision's spelling), index = class.
pub fn imagenet_labels() -> Vec<String> {
    include_str!("../../models/imagenet_classes.txt")
        .lines()
        .map(str::to_string)
        .collect()
}

fn read_labels(manifest: &Manifest, dir: &Path) -> Result<Option<Arc<Vec<String>>>> {
    let labels = match manifest.labels.as_deref() {
        None => return Ok(None),
        Some("imagenet") => imagenet_labels(),
        Some(file) => {
            let path = dir.join(file);
            std::fs::read_to_string(&path)
                .map_err(|e| {
                    model_error(
                        &manifest.name,
                        format!("cannot read labels {}: {e}", path.display()),
                    )
                })?
                .lines()
                .map(str::to_string)
                .collect()
        }
    };
    if labels.len() != manifest.num_classes {
        return Err(model_error(
            &manifest.name,
            format!(
                "{} class names for {} classes",
                labels.len(),
                manifest.num_classes
            ),
        ));
    }
    Ok(Some(Arc::new(labels)))
}

impl LoadedModel {
    /// Loads a named model from the default model directory (uncached; see [`load_model`]).
    pub fn load(name: &str, device: &Device) -> Result<Self> {
        Self::load_from(name, None, device)
    }

    /// Loads a named model from `dir` (or the default directory).
    pub fn load_from(name: &str, dir: Option<&Path>, device: &Device) -> Result<Self> {
        let (manifest, folder) = manifest_in(name, dir)?;
        let weights = folder.join(&manifest.weights.file);
        if !weights.is_file() {
            return Err(model_error(
                name,
                format!(
                    "weight file {} not found. Get it from {} (licence: {}) and put it at that path, \
                     or point {MODEL_DIR_ENV} / the modelDir param at a folder holding `{}/{}`",
                    weights.display(),
                    manifest.weights.source,
                    manifest.weights.license,
                    folder
                        .file_name()
                        .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
                    manifest.weights.file,
                ),
            ));
        }
        Self::from_weights(manifest, &weights, &folder, device)
    }

    /// Builds the manifest's architecture with the weights in `weights` (labels from `dir`).
    pub fn from_weights(
        manifest: Manifest,
        weights: &Path,
        dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let network = load_architecture(
            &manifest.architecture,
            weights,
            manifest.weights.expected_sha256(),
            device,
            &manifest.name,
        )?;
        let labels = read_labels(&manifest, dir)?;
        Ok(LoadedModel {
            manifest,
            network,
            device: device.clone(),
            labels,
            images_processed: AtomicU64::new(0),
        })
    }

    /// How many images this model has run through the network in this process: a cost meter
    /// (e.g. to check that tuning featurizes each row once).
    pub fn images_processed(&self) -> u64 {
        self.images_processed.load(Ordering::Relaxed)
    }

    /// Runs a batch of preprocessed inputs (`batch` x 3 x S x S, concatenated) to pooled features.
    pub fn features(&self, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        self.run(inputs, batch, FeatureMode::Pooled)
    }

    /// Runs a batch to the pooled features or the flattened feature map.
    pub fn run(&self, inputs: Vec<f32>, batch: usize, mode: FeatureMode) -> Result<Vec<f32>> {
        let map = self.feature_map(inputs, batch)?;
        let out = match mode {
            FeatureMode::Pooled => self.network.features(map),
            FeatureMode::Flattened => flatten(map),
        };
        self.output(out, batch, self.manifest.output_dim(mode), "features")
    }

    /// Runs a batch of preprocessed inputs to class logits.
    pub fn logits(&self, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        let map = self.feature_map(inputs, batch)?;
        let logits = self.network.logits(map).ok_or_else(|| {
            model_error(&self.manifest.name, "this network has no classifier head")
        })?;
        self.output(logits, batch, self.manifest.num_classes, "logits")
    }

    fn feature_map(&self, inputs: Vec<f32>, batch: usize) -> Result<Tensor<4>> {
        let s = self.manifest.input_size as usize;
        if inputs.len() != batch * 3 * s * s {
            return Err(model_error(
                &self.manifest.name,
                format!(
                    "input has {} values, expected {batch}x3x{s}x{s}",
                    inputs.len()
                ),
            ));
        }
        self.images_processed
            .fetch_add(batch as u64, Ordering::Relaxed);
        let x = Tensor::from_data(TensorData::new(inputs, [batch, 3, s, s]), &self.device);
        Ok(self.network.feature_map(x))
    }

    /// Reads an output tensor, checking it has the size the manifest promises.
    fn output(&self, t: Tensor<2>, batch: usize, dim: usize, what: &str) -> Result<Vec<f32>> {
        let dims = t.dims();
        if dims != [batch, dim] {
            return Err(model_error(
                &self.manifest.name,
                format!(
                    "the network returned {what} of shape {dims:?}, the manifest says [{batch}, {dim}]"
                ),
            ));
        }
        t.into_data()
            .try_to_vec::<f32>()
            .map_err(|e| model_error(&self.manifest.name, format!("reading output: {e:?}")))
    }
}

/// The device named by a `device` param: `cpu` (burn's flex backend) or, with the `wgpu`
/// feature, `wgpu`. Always explicit: `Device::default()` may pick a software GPU.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(Default::default())),
        other => Err(Error::param(
            "models",
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

type Cache = Mutex<HashMap<(String, String, PathBuf), Arc<LoadedModel>>>;

/// Loads a named model on a named device once per process and shares it.
pub fn load_model(name: &str, device_name: &str) -> Result<Arc<LoadedModel>> {
    load_model_in(name, device_name, None)
}

/// [`load_model`] from a given model directory (`None` or empty: the default one).
pub fn load_model_in(
    name: &str,
    device_name: &str,
    dir: Option<&Path>,
) -> Result<Arc<LoadedModel>> {
    if let Some(user) = user_model(name) {
        return Ok(user);
    }
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let dir = resolve_dir(dir);
    let key = (name.to_string(), device_name.to_string(), dir.clone());
    // Holding the lock while loading makes concurrent partitions wait for one load.
    let mut map = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(model) = map.get(&key) {
        return Ok(Arc::clone(model));
    }
    let model = Arc::new(LoadedModel::load_from(
        name,
        Some(&dir),
        &device(device_name)?,
    )?);
    map.insert(key, Arc::clone(&model));
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
pub fn register_network(
    manifest: Manifest,
    network: Arc<dyn ImageNetwork>,
    device: &Device,
) -> Result<()> {
    if REGISTRY.iter().any(|(n, _)| *n == manifest.name) {
        return Err(model_error(
            &manifest.name,
            "a built-in model has this name; choose another",
        ));
    }
    manifest
        .validate()
        .map_err(|e| model_error(&manifest.name, e))?;
    let labels = read_labels(&manifest, Path::new(""))?;
    let model = LoadedModel {
        manifest,
        network,
        device: device.clone(),
        labels,
        images_processed: AtomicU64::new(0),
    };
    let mut models = user_models()
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    models.insert(model.manifest.name.clone(), Arc::new(model));
    Ok(())
}
