//! A model loaded on a device ([`LoadedModel`]): runs preprocessed batches to features or
//! logits, checking every output against the manifest; and its class names.

use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;

use super::catalog::load_architecture;
use super::layers::flatten;
use super::manifest::{FeatureMode, Manifest};
use super::{ImageNetwork, model_error};
use crate::error::Result;

/// A model loaded on a device: its manifest, network and class names.
#[derive(Debug)]
pub struct LoadedModel {
    pub manifest: Manifest,
    pub network: Arc<dyn ImageNetwork>,
    pub device: Device,
    /// Class names (index = class), when the manifest names them.
    pub labels: Option<Arc<Vec<String>>>,
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
            network,
            device: device.clone(),
            labels,
        })
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
