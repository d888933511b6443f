//! The seam between the network stages and what runs a network: [`Engine`], one forward pass
//! over a batch buffer in the layout the engine declares, returning the rows a [`Head`] asks for.
//! Burn networks (with their CPU plan) and ONNX Runtime sessions implement it; the stages never
//! see a tensor type.

use std::sync::Arc;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::layers::flatten;
use super::manifest::FeatureMode;
use super::{ImageNetwork, cpu};

/// How a batch of images lies in the input buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Layout {
    /// `[batch, channel, y, x]`: PyTorch's, and every built-in network's.
    #[default]
    Nchw,
    /// `[batch, y, x, channel]`: TensorFlow's.
    Nhwc,
}

/// What a forward pass returns per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Head {
    /// The feature vector, or the flattened last feature map.
    Features(FeatureMode),
    /// Class logits.
    Logits,
}

/// Runs a network: `batch` preprocessed images, concatenated in [`Engine::layout`], to `batch`
/// rows of what `head` asks for. Errors are messages; the caller names the model.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// The layout [`Engine::run`] reads its input in.
    fn layout(&self) -> Layout {
        Layout::Nchw
    }

    /// One forward pass: `input` holds `batch` images of `size x size x 3`. Returns the values
    /// and the width of one row.
    fn run(
        &self,
        input: Vec<f32>,
        batch: usize,
        size: usize,
        head: Head,
    ) -> Result<(Vec<f32>, usize), String>;

    /// The burn network behind this engine, if it is one (benchmarks and tests that drive the
    /// network's own methods).
    fn burn_network(&self) -> Option<(Arc<dyn ImageNetwork>, Device)> {
        None
    }
}

/// A burn network on a device: the built-in architectures and users' registered networks.
#[derive(Debug, Clone)]
pub struct BurnEngine {
    pub network: Arc<dyn ImageNetwork>,
    pub device: Device,
}

impl Engine for BurnEngine {
    fn run(
        &self,
        input: Vec<f32>,
        batch: usize,
        size: usize,
        head: Head,
    ) -> Result<(Vec<f32>, usize), String> {
        let dims = [batch, 3, size, size];
        let planned = match self.network.plan() {
            Some(plan) if self.device == Device::flex() => match plan.run_nchw(&input, dims) {
                Ok(map) => Some(map.to_tensor(&self.device)),
                Err(e) => {
                    cpu::warn_once(&e);
                    None
                }
            },
            _ => None,
        };
        let map = match planned {
            Some(map) => map,
            None => {
                let x = Tensor::from_data(TensorData::new(input, dims), &self.device);
                self.network.feature_map(x)
            }
        };
        let out = match head {
            Head::Features(FeatureMode::Pooled) => self.network.features(map),
            Head::Features(FeatureMode::Flattened) => flatten(map),
            Head::Logits => self
                .network
                .logits(map)
                .ok_or("this network has no classifier head")?,
        };
        let [rows, width] = out.dims();
        if rows != batch {
            return Err(format!(
                "the network returned {rows} rows for {batch} images"
            ));
        }
        let values = out
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| format!("reading output: {e:?}"))?;
        Ok((values, width))
    }

    fn burn_network(&self) -> Option<(Arc<dyn ImageNetwork>, Device)> {
        Some((Arc::clone(&self.network), self.device.clone()))
    }
}
