//! A model loaded on a device ([`LoadedModel`]): runs preprocessed batches to features or
//! logits, checking every output against the manifest; and its class names.

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::prelude::*;

use super::catalog::{load_architecture, load_architecture_from};
use super::layers::flatten;
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

/// A network and the device it runs on.
#[derive(Debug, Clone)]
struct Built {
    network: Arc<dyn ImageNetwork>,
    device: Device,
}

#[derive(Debug)]
enum NetworkSource {
    Built(Built),
    /// Weights and a device name, built once on first use (a failed build is tried again).
    Deferred {
        weights: WeightSource,
        device: String,
        built: Mutex<Option<Built>>,
    },
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
    /// A model from its parts, with its class names read from `labels_dir` (or bundled).
    pub(super) fn new(
        manifest: Manifest,
        network: Arc<dyn ImageNetwork>,
        device: &Device,
        labels_dir: &Path,
    ) -> Result<Self> {
        let labels = read_labels(&manifest, labels_dir)?;
        Ok(LoadedModel {
            manifest,
            labels,
            network: NetworkSource::Built(Built {
                network,
                device: device.clone(),
            }),
        })
    }

    /// A model whose network is built from `weights` on the device named `device` when a batch
    /// first runs; the manifest and class names (from `dir`) are read now.
    pub(super) fn deferred(
        manifest: Manifest,
        weights: WeightSource,
        dir: &Path,
        device: &str,
    ) -> Result<Self> {
        let labels = read_labels(&manifest, dir)?;
        Ok(LoadedModel {
            manifest,
            labels,
            network: NetworkSource::Deferred {
                weights,
                device: device.to_string(),
                built: Mutex::new(None),
            },
        })
    }

    fn built(&self) -> Result<Built> {
        match &self.network {
            NetworkSource::Built(built) => Ok(built.clone()),
            NetworkSource::Deferred {
                weights,
                device,
                built,
            } => {
                let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(b) = built.as_ref() {
                    return Ok(b.clone());
                }
                let device = super::runtime::device(device)?;
                let network = load_architecture_from(
                    &self.manifest.architecture,
                    weights,
                    self.manifest.weights.expected_sha256(),
                    &device,
                    &self.manifest.name,
                )?;
                Ok(built.insert(Built { network, device }).clone())
            }
        }
    }

    /// The network, built now if it was deferred (an unreadable weight file or a missing
    /// device is an error here).
    pub fn network(&self) -> Result<Arc<dyn ImageNetwork>> {
        self.built().map(|b| b.network)
    }

    /// The device the network runs on (resolved now if it was deferred).
    pub fn device(&self) -> Result<Device> {
        self.built().map(|b| b.device)
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
        let (network, map) = self.feature_map(inputs, batch)?;
        let out = match mode {
            FeatureMode::Pooled => network.features(map),
            FeatureMode::Flattened => flatten(map),
        };
        self.output(out, batch, self.manifest.output_dim(mode), "features")
    }

    /// Runs a batch of preprocessed inputs to class logits.
    pub fn logits(&self, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        let (network, map) = self.feature_map(inputs, batch)?;
        let logits = network.logits(map).ok_or_else(|| {
            model_error(&self.manifest.name, "this network has no classifier head")
        })?;
        self.output(logits, batch, self.manifest.num_classes, "logits")
    }

    fn feature_map(
        &self,
        inputs: Vec<f32>,
        batch: usize,
    ) -> Result<(Arc<dyn ImageNetwork>, Tensor<4>)> {
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
        let Built { network, device } = self.built()?;
        let x = Tensor::from_data(TensorData::new(inputs, [batch, 3, s, s]), &device);
        Ok((Arc::clone(&network), network.feature_map(x)))
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
