//! Pretrained networks: one manifest per model (input size, preprocessing, feature layer and
//! size, classifier head, weight file + sha256 + where to get it, licence), one file per
//! architecture, weight loading from safetensors or PyTorch checkpoints (read without running
//! pickle code), users' own networks ([`ImageNetwork`] + [`register_network`]), and a per-process
//! cache so a model is loaded once however many partitions and batches use it.
//!
//! Files (each uses only those above it; everything public is re-exported here):
//! - `network.rs`: the two traits, [`ImageNetwork`] (what runs) and [`Architecture`] (how a
//!   built-in network is built and named).
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
mod engine;
#[cfg(feature = "wgpu")]
mod gpu;
mod loaded;
mod manifest;
mod network;
#[cfg(feature = "onnx")]
mod onnx;
mod runtime;
mod weights;

use crate::error::Error;

pub use catalog::load_architecture;
pub use engine::{BurnEngine, Engine, Head, Layout};
pub use loaded::{LoadedModel, imagenet_labels};
pub use manifest::{
    FeatureMode, MODEL_DIR_ENV, Manifest, OnnxSpec, PreprocessSpec, ResizeFilter, WeightsSpec,
    add_model_dir, model_dir, model_dirs, user_model_dir,
};
pub use network::{Architecture, ImageNetwork};
#[cfg(feature = "onnx")]
pub use onnx::{
    ORT_DYLIB_ENV, OnnxEngine, model_file_manifest, onnx_file_to_save, onnxruntime_library,
    set_onnxruntime_library,
};
pub(crate) use runtime::parse_device;
pub use runtime::{
    available_devices, available_models, device, device_label, load_model, load_model_as,
    load_model_file, load_model_in, load_trainable, manifest, manifest_in, register_network,
    replace_network, trainable_models,
};
pub use weights::{
    WeightSource, check_safetensors_header, load_pytorch, load_safetensors, load_safetensors_bytes,
    load_weights, load_weights_from, max_weight_bytes, read_weight_file,
};

/// What a build without the `onnx` feature says of a model file.
#[cfg(not(feature = "onnx"))]
pub(crate) const NO_ONNX: &str =
    "this build runs no ONNX model files: build deep-pipelines with the `onnx` feature";

pub(crate) fn model_error(model: &str, message: impl Into<String>) -> Error {
    Error::Model {
        model: model.to_string(),
        message: message.into(),
    }
}
