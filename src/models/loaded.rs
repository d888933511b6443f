//! A model loaded on a device ([`LoadedModel`]): runs preprocessed batches to features or
//! logits, checking every output against the manifest; and its class names.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::prelude::*;

use super::catalog::{load_architecture, load_architecture_from};
use super::cpu::Precision;
use super::engine::{BurnEngine, Engine, Head, Layout};
use super::manifest::{FeatureMode, Manifest};
use super::weights::WeightSource;
use super::{ImageNetwork, model_error};
use crate::error::Result;

/// A model for a device: its manifest, class names and network. What a query's plan needs (output
/// widths, class names) comes from the manifest; the network may be built on the first batch
/// ([`LoadedModel::deferred`]), so a Spark driver or Connect client plans without weights or a GPU.
#[derive(Debug)]
pub struct LoadedModel {
    pub manifest: Manifest,
    /// Class names (index = class), when the manifest names them.
    pub labels: Option<Arc<Vec<String>>>,
    network: NetworkSource,
}

#[derive(Debug)]
enum NetworkSource {
    Built(Arc<dyn Engine>),
    /// What the engine is made from and a device name, built once on first use (a failed
    /// build is tried again).
    Deferred {
        source: EngineSource,
        device: String,
        /// What a built-in network's CPU plan multiplies in.
        precision: Precision,
        built: Mutex<Option<Arc<dyn Engine>>>,
    },
}

/// What a deferred model's engine is built from.
#[derive(Debug, Clone)]
pub(crate) enum EngineSource {
    /// The manifest's architecture with these weights (burn).
    Weights(WeightSource),
    /// An ONNX model file (ONNX Runtime), checked before it is opened.
    #[cfg_attr(not(feature = "onnx"), allow(dead_code))]
    Onnx(PathBuf),
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
            // A model file's description is untrusted: its labels must be in its folder.
            let outside = Path::new(file)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)));
            if manifest.architecture == "onnx" && outside {
                return Err(model_error(
                    &manifest.name,
                    format!("labels `{file}` must be a file in the model's folder"),
                ));
            }
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
    /// A model from its parts, with its class names read from `labels_dir` (or bundled).
    pub(super) fn new(
        manifest: Manifest,
        network: Arc<dyn ImageNetwork>,
        device: &Device,
        labels_dir: &Path,
    ) -> Result<Self> {
        let labels = read_labels(&manifest, labels_dir)?;
        let engine = BurnEngine {
            network,
            device: device.clone(),
        };
        Ok(LoadedModel {
            manifest,
            labels,
            network: NetworkSource::Built(Arc::new(engine)),
        })
    }

    /// A model whose engine is built from `source` on the device named `device` (a built-in
    /// network's CPU plan in `precision`) when a batch first runs; the manifest and class names
    /// (from `dir`) are read now.
    pub(crate) fn deferred(
        manifest: Manifest,
        source: EngineSource,
        dir: &Path,
        device: &str,
        precision: Precision,
    ) -> Result<Self> {
        let labels = read_labels(&manifest, dir)?;
        Ok(LoadedModel {
            manifest,
            labels,
            network: NetworkSource::Deferred {
                source,
                device: device.to_string(),
                precision,
                built: Mutex::new(None),
            },
        })
    }

    /// The engine, built now if it was deferred (an unreadable weight or model file or a
    /// missing device is an error here).
    pub fn engine(&self) -> Result<Arc<dyn Engine>> {
        let (source, device, precision, built) = match &self.network {
            NetworkSource::Built(engine) => return Ok(Arc::clone(engine)),
            NetworkSource::Deferred {
                source,
                device,
                precision,
                built,
            } => (source, device, *precision, built),
        };
        let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(engine) = built.as_ref() {
            return Ok(Arc::clone(engine));
        }
        let engine: Arc<dyn Engine> = match source {
            EngineSource::Weights(weights) => {
                let device = super::runtime::device(device)?;
                let network = load_architecture_from(
                    &self.manifest.architecture,
                    weights,
                    self.manifest.weights.expected_sha256(),
                    &device,
                    precision,
                    &self.manifest.name,
                )?;
                Arc::new(BurnEngine { network, device })
            }
            #[cfg(feature = "onnx")]
            EngineSource::Onnx(path) => {
                Arc::new(super::onnx::OnnxEngine::open(path, &self.manifest, device)?)
            }
            #[cfg(not(feature = "onnx"))]
            EngineSource::Onnx(path) => {
                return Err(model_error(
                    &self.manifest.name,
                    format!("{}: {}", path.display(), super::NO_ONNX),
                ));
            }
        };
        Ok(Arc::clone(built.insert(engine)))
    }

    /// The burn network and its device, built now if deferred; an error for an ONNX model.
    fn burn(&self) -> Result<(Arc<dyn ImageNetwork>, Device)> {
        self.engine()?
            .burn_network()
            .ok_or_else(|| model_error(&self.manifest.name, "an ONNX model has no burn network"))
    }

    /// The burn network (built now if it was deferred; an ONNX model has none).
    pub fn network(&self) -> Result<Arc<dyn ImageNetwork>> {
        self.burn().map(|(network, _)| network)
    }

    /// The burn device the network runs on (resolved now if it was deferred).
    pub fn device(&self) -> Result<Device> {
        self.burn().map(|(_, device)| device)
    }

    /// The layout the network input is written in.
    pub fn layout(&self) -> Layout {
        self.manifest.input_layout()
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
        Self::new(manifest, network, device, dir)
    }

    /// Runs a batch of preprocessed inputs (`batch` x 3 x S x S, concatenated) to pooled features.
    pub fn features(&self, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        self.run(inputs, batch, FeatureMode::Pooled)
    }

    /// Runs a batch to the pooled features or the flattened feature map.
    pub fn run(&self, inputs: Vec<f32>, batch: usize, mode: FeatureMode) -> Result<Vec<f32>> {
        let dim = self.manifest.output_dim(mode);
        self.forward(inputs, batch, Head::Features(mode), dim, "features")
    }

    /// Runs a batch of preprocessed inputs to class logits.
    pub fn logits(&self, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        let dim = self.manifest.num_classes;
        self.forward(inputs, batch, Head::Logits, dim, "logits")
    }

    /// One forward pass, its input and output checked against the manifest.
    fn forward(
        &self,
        inputs: Vec<f32>,
        batch: usize,
        head: Head,
        dim: usize,
        what: &str,
    ) -> Result<Vec<f32>> {
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
        let engine = self.engine()?;
        if engine.layout() != self.layout() {
            return Err(model_error(
                &self.manifest.name,
                format!(
                    "the network reads {:?} input, the manifest says {:?}",
                    engine.layout(),
                    self.layout()
                ),
            ));
        }
        let (values, width) = engine
            .run(inputs, batch, s, head)
            .map_err(|e| model_error(&self.manifest.name, e))?;
        if width != dim || values.len() != batch * dim {
            return Err(model_error(
                &self.manifest.name,
                format!(
                    "the network returned {what} of shape [{batch}, {width}], the manifest says [{batch}, {dim}]"
                ),
            ));
        }
        Ok(values)
    }
}
