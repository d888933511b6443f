//! Pretrained networks: one manifest per model (input size, preprocessing, feature layer and
//! size, classifier head, weight file + sha256 + where to get it, licence), one file per
//! architecture, weight loading from safetensors or PyTorch checkpoints (read without running
//! pickle code), users' own networks ([`ImageNetwork`] + [`register_network`]), and a per-process
//! cache so a model is loaded once however many partitions and batches use it.
//!
//! Files (each uses only those above it; everything public is re-exported here):
//! - `layers.rs`, `inverted_residual.rs`: building blocks the architectures share; `cpu/`: the
//!   fast CPU path each architecture's folded layers are copied into ([`cpu::Plan`]).
//! - one file per architecture family (`resnet.rs`, `vgg.rs`, ...), each config an
//!   [`Architecture`].
//! - `manifest.rs`: the manifest, its validation, the model directory.
//! - `weights.rs`: reading and checking weight files.
//! - `catalog.rs`: the one table of named models and their architectures.
//! - `loaded.rs`: a model on a device ([`LoadedModel`]) and its class names.
//! - `runtime.rs`: what names mean in this process: devices, the cache, users' networks.

pub mod cpu;
pub mod efficientnet;
pub mod efficientnet_lite;
pub mod inception_v3;
pub mod inverted_residual;
pub mod layers;
pub mod mobilenet_v2;
pub mod mobilenet_v3;
pub mod resnet;
pub mod squeezenet;
pub mod vgg;

mod catalog;
#[cfg(feature = "wgpu")]
mod gpu;
mod loaded;
mod manifest;
mod runtime;
mod weights;

use burn::prelude::*;
use burn::store::ModuleSnapshot;

use crate::error::Error;
use layers::{FoldBatchNorms, NameMap, global_average_pool};

pub use catalog::load_architecture;
pub use loaded::{LoadedModel, imagenet_labels};
pub use manifest::{
    FeatureMode, MODEL_DIR_ENV, Manifest, PreprocessSpec, ResizeFilter, WeightsSpec, model_dir,
};
pub use runtime::{
    available_devices, available_models, device, device_label, load_model, load_model_in,
    load_trainable, manifest, manifest_in, register_network, replace_network, trainable_models,
};
pub use weights::{
    check_safetensors_header, load_pytorch, load_safetensors, load_safetensors_bytes, load_weights,
    max_weight_bytes, read_weight_file,
};

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

/// A built-in architecture's configuration (`ResNetConfig::resnet50()`, a narrowed test
/// network, ...): how to build the network and how a checkpoint's tensor names map onto it.
/// Everything the catalog loads goes through these two methods.
pub trait Architecture {
    type Network: ImageNetwork + FoldBatchNorms + cpu::CpuPlan + ModuleSnapshot + Module + 'static;

    /// The network with freshly initialised weights (load real ones with [`load_weights`]).
    fn init(&self, device: &Device) -> Self::Network;

    /// Checkpoint names (torchvision's, or the checkpoint's own) -> this crate's field paths.
    fn weight_names(&self) -> NameMap;
}

pub(crate) fn model_error(model: &str, message: impl Into<String>) -> Error {
    Error::Model {
        model: model.to_string(),
        message: message.into(),
    }
}
