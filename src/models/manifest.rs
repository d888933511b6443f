//! The manifest: what a named model is (input size, preprocessing, outputs, weight file), its
//! validation, and where manifests live (the model directory).

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use super::engine::Layout;
use super::model_error;
use crate::error::Result;

/// Environment variable naming the folder that holds one sub-folder per model.
pub const MODEL_DIR_ENV: &str = "DEEP_PIPELINES_MODEL_DIR";

/// Folders added by the program that embeds this crate ([`add_model_dir`]), searched last.
static ADDED_DIRS: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());

/// Adds a folder to search for models when a stage's `modelDir` is empty, after
/// `$DEEP_PIPELINES_MODEL_DIR` and `./models`: the Python package adds the models it ships, so
/// a Spark executor finds them wherever the package is installed on it.
pub fn add_model_dir(dir: impl Into<PathBuf>) {
    let dir = dir.into();
    let mut dirs = ADDED_DIRS.write().unwrap_or_else(|p| p.into_inner());
    if !dirs.contains(&dir) {
        dirs.push(dir);
    }
}

/// The folders searched, in order, for a model whose `modelDir` is empty:
/// `$DEEP_PIPELINES_MODEL_DIR` (if set), `models` in the current directory (the repository's
/// models when run from its root), the user's data folder ([`user_model_dir`]), then those
/// added with [`add_model_dir`]. Found at run time, on the machine that runs the model: nothing
/// built from this crate (a wheel, a deployed binary, a saved pipeline) carries a folder of the
/// machine that built it. When none holds a model's weights, the weights built into the binary
/// (EfficientNet-Lite0, with the default `embedded-model` feature) are used.
pub fn model_dirs() -> Vec<PathBuf> {
    let env = std::env::var_os(MODEL_DIR_ENV).filter(|d| !d.is_empty());
    let added = ADDED_DIRS.read().map(|d| d.clone()).unwrap_or_default();
    env.map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("models")])
        .chain(user_model_dir())
        .chain(added)
        .collect()
}

/// The user's model folder: `$XDG_DATA_HOME/deep-pipelines/models`, else
/// `~/.local/share/deep-pipelines/models` (None without a home folder).
pub fn user_model_dir() -> Option<PathBuf> {
    let env = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let data = env("XDG_DATA_HOME").or_else(|| env("HOME").map(|h| h.join(".local/share")))?;
    Some(data.join("deep-pipelines").join("models"))
}

/// The first folder of [`model_dirs`].
pub fn model_dir() -> PathBuf {
    model_dirs().swap_remove(0)
}

/// Where model `folder` (its sub-folder) lives: `dir` if given and not empty (an empty
/// `modelDir` param means the search), else the first of [`model_dirs`] that has the sub-folder,
/// else the first of them (so that an error names where it should be).
pub(super) fn resolve_dir(dir: Option<&Path>, folder: &str) -> PathBuf {
    if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
        return dir.to_path_buf();
    }
    let dirs = model_dirs();
    let found = dirs.iter().find(|d| d.join(folder).is_dir());
    found.unwrap_or(&dirs[0]).clone()
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
    /// Channel order the network expects: `RGB`, or `BGR` (Caffe- and OpenCV-trained models).
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
    /// For an ONNX model file: its input and output names and the input layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnx: Option<OnnxSpec>,
}

/// Which of an ONNX graph's inputs and outputs a model file's manifest uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OnnxSpec {
    /// The image input (its only input when empty).
    pub input: String,
    /// The output that gives features: `[N, D]`, or a feature map `[N, C, h, w]` (pooled by
    /// global average, or flattened).
    pub features: String,
    /// The output that gives class logits `[N, classes]`; empty: none.
    pub logits: String,
    /// The input's layout: `NCHW` (PyTorch's) or `NHWC`.
    pub layout: Layout,
}

impl Manifest {
    /// The layout the network input is written in (NCHW unless an ONNX manifest says NHWC).
    pub fn input_layout(&self) -> Layout {
        self.onnx.as_ref().map_or(Layout::Nchw, |o| o.layout)
    }

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
        } else if p.channel_order != "RGB" && p.channel_order != "BGR" {
            format!(
                "unsupported channel_order `{}` (`RGB` or `BGR`)",
                p.channel_order
            )
        } else if self.onnx.is_none() && self.architecture == "onnx" {
            "an `onnx` manifest needs its `onnx` section (input, features, logits, layout)"
                .to_string()
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

/// Reads and validates the manifest of the named model `name` kept in `folder` under `dir`
/// (or the default directory). Returns it with the model's folder, where its weights are.
pub(super) fn read_manifest(
    name: &str,
    folder: &str,
    dir: Option<&Path>,
) -> Result<(Manifest, PathBuf)> {
    let dir = resolve_dir(dir, folder).join(folder);
    // A model folder may hold just the weights: the manifest compiled into this crate then
    // describes them.
    let path = dir.join("manifest.json");
    let (text, path) = if path.is_file() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| model_error(name, format!("cannot read {}: {e}", path.display())))?;
        (text, path)
    } else {
        let text = super::catalog::bundled_manifest(folder).ok_or_else(|| {
            model_error(
                name,
                format!(
                    "no {} (set {MODEL_DIR_ENV} or modelDir to the folder holding `{folder}/`)",
                    path.display()
                ),
            )
        })?;
        (
            text.to_string(),
            PathBuf::from(format!("<bundled {folder}/manifest.json>")),
        )
    };
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| model_error(name, format!("malformed {}: {e}", path.display())))?;
    manifest
        .validate()
        .map_err(|e| model_error(name, format!("{}: {e}", path.display())))?;
    Ok((manifest, dir))
}
