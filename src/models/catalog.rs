//! The named models: one table of the name used in `modelName`, the folder under the model
//! directory (also the `architecture` its manifest names) and the architecture to build.

use std::any::{Any, TypeId};
use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;

use super::cpu::{Precision, inference_network};
use super::efficientnet::EfficientNetConfig;
use super::efficientnet_lite::EfficientNetLiteConfig;
use super::inception_v3::InceptionV3Config;
use super::inverted_residual::InvertedResidualNet;
use super::layers::FoldBatchNorms;
use super::mobilenet_v2::MobileNetV2Config;
use super::mobilenet_v3::MobileNetV3Config;
use super::resnet::ResNetConfig;
use super::squeezenet::SqueezeNetConfig;
use super::vgg::VggConfig;
use super::weights::{WeightSource, load_weights_from};
use super::{Architecture, ImageNetwork, model_error};
use crate::error::Result;

/// One named model: the name used in `modelName`; its folder under the model directory, which
/// is also the `architecture` its manifest names; the manifest compiled in (the text, not a path:
/// a folder holding only weights is described by it); its full-size config (1000 ImageNet
/// classes).
struct Entry {
    name: &'static str,
    folder: &'static str,
    manifest: &'static str,
    config: fn() -> Box<dyn LoadArchitecture>,
}

macro_rules! entry {
    ($name:literal, $folder:literal, $config:expr) => {
        Entry {
            name: $name,
            folder: $folder,
            manifest: include_str!(concat!("../../models/", $folder, "/manifest.json")),
            config: || Box::new($config),
        }
    };
}

#[rustfmt::skip]
const CATALOG: &[Entry] = &[
    entry!("EfficientNetLite0", "efficientnet_lite0", EfficientNetLiteConfig::lite0()),
    entry!("EfficientNetLite1", "efficientnet_lite1", EfficientNetLiteConfig::lite1()),
    entry!("EfficientNetLite2", "efficientnet_lite2", EfficientNetLiteConfig::lite2()),
    entry!("ResNet18", "resnet18", ResNetConfig::resnet18()),
    entry!("ResNet34", "resnet34", ResNetConfig::resnet34()),
    entry!("ResNet50", "resnet50", ResNetConfig::resnet50()),
    entry!("ResNet101", "resnet101", ResNetConfig::resnet101()),
    entry!("ResNet152", "resnet152", ResNetConfig::resnet152()),
    entry!("MobileNetV2", "mobilenet_v2", MobileNetV2Config::mobilenet_v2()),
    entry!("MobileNetV3Large", "mobilenet_v3_large", MobileNetV3Config::large()),
    entry!("MobileNetV3Small", "mobilenet_v3_small", MobileNetV3Config::small()),
    entry!("SqueezeNet1_1", "squeezenet1_1", SqueezeNetConfig::squeezenet1_1()),
    entry!("EfficientNetB0", "efficientnet_b0", EfficientNetConfig::b0()),
    entry!("InceptionV3", "inception_v3", InceptionV3Config::inception_v3()),
    entry!("VGG16", "vgg16", VggConfig::vgg16(false)),
    entry!("VGG16BN", "vgg16_bn", VggConfig::vgg16(true)),
    entry!("VGG19", "vgg19", VggConfig::vgg19(false)),
    entry!("VGG19BN", "vgg19_bn", VggConfig::vgg19(true)),
];

/// The named models' names, in catalog order.
pub(super) fn names() -> impl Iterator<Item = &'static str> {
    CATALOG.iter().map(|e| e.name)
}

/// The folder of a named model, `None` if the catalog has no such name.
pub(super) fn folder(name: &str) -> Option<&'static str> {
    CATALOG.iter().find(|e| e.name == name).map(|e| e.folder)
}

/// The manifest this crate ships for the model in `folder`.
/// The weights built into this binary for model folder `folder`: EfficientNet-Lite0's, with the
/// `embedded-model` feature (on by default), so an installed program has a model wherever it runs.
pub(super) fn embedded_weights(folder: &str) -> Option<&'static [u8]> {
    #[cfg(feature = "embedded-model")]
    if folder == "efficientnet_lite0" {
        return Some(include_bytes!(
            "../../models/efficientnet_lite0/weights.safetensors"
        ));
    }
    let _ = folder;
    None
}

pub(super) fn bundled_manifest(folder: &str) -> Option<&'static str> {
    CATALOG
        .iter()
        .find(|e| e.folder == folder)
        .map(|e| e.manifest)
}

/// Builds the full-size `architecture` (1000 ImageNet classes), loads `weights` into it, folds
/// its BatchNorms into the convolutions and, on the CPU, copies it into its fast
/// [`super::cpu::Plan`] (what the featurizer and predictor run).
pub fn load_architecture(
    architecture: &str,
    weights: &Path,
    sha256: Option<&str>,
    device: &Device,
    model: &str,
) -> Result<Arc<dyn ImageNetwork>> {
    let weights = WeightSource::File(weights.to_path_buf());
    let precision = Precision::F32;
    load_architecture_from(architecture, &weights, sha256, device, precision, model)
}

/// [`load_architecture`] from a file or built-in bytes, its CPU plan in `precision`.
pub(super) fn load_architecture_from(
    architecture: &str,
    weights: &WeightSource,
    sha256: Option<&str>,
    device: &Device,
    precision: Precision,
    model: &str,
) -> Result<Arc<dyn ImageNetwork>> {
    let config = CATALOG
        .iter()
        .find(|e| e.folder == architecture)
        .map(|e| e.config)
        .ok_or_else(|| {
            let available: Vec<&str> = CATALOG.iter().map(|e| e.folder).collect();
            model_error(
                model,
                format!(
                    "unknown architecture `{architecture}`; available: {}",
                    available.join(", ")
                ),
            )
        })?;
    config().load(weights, sha256, device, precision, model)
}

/// The named models `DeepImageClassifier` can fine-tune: those whose network is an
/// [`InvertedResidualNet`] (EfficientNet-Lite, EfficientNet-B0, MobileNetV2).
pub(super) fn trainable_names() -> Vec<&'static str> {
    CATALOG
        .iter()
        .filter(|e| (e.config)().fine_tunes())
        .map(|e| e.name)
        .collect()
}

/// Builds `architecture` with `weights` on the CPU, BatchNorms folded, as the network
/// `DeepImageClassifier` fine-tunes; `None` when the architecture is not one it can.
pub(super) fn load_trainable(
    architecture: &str,
    weights: &WeightSource,
    sha256: Option<&str>,
    model: &str,
) -> Result<Option<InvertedResidualNet>> {
    match CATALOG.iter().find(|e| e.folder == architecture) {
        Some(entry) => (entry.config)().load_trainable(weights, sha256, model),
        None => Ok(None),
    }
}

/// An [`Architecture`] with its network type erased, so one table holds every config.
trait LoadArchitecture {
    fn load(
        &self,
        weights: &WeightSource,
        sha256: Option<&str>,
        device: &Device,
        precision: Precision,
        model: &str,
    ) -> Result<Arc<dyn ImageNetwork>>;

    /// Whether the network is an [`InvertedResidualNet`], the family fine-tuning supports.
    fn fine_tunes(&self) -> bool;

    /// The folded network on the CPU, if it [`fine_tunes`](Self::fine_tunes).
    fn load_trainable(
        &self,
        weights: &WeightSource,
        sha256: Option<&str>,
        model: &str,
    ) -> Result<Option<InvertedResidualNet>>;
}

impl<A: Architecture> LoadArchitecture for A {
    fn load(
        &self,
        weights: &WeightSource,
        sha256: Option<&str>,
        device: &Device,
        precision: Precision,
        model: &str,
    ) -> Result<Arc<dyn ImageNetwork>> {
        let network = load_weights_from(
            self.init(device),
            weights,
            &self.weight_names(),
            sha256,
            model,
        )?;
        Ok(inference_network(network, device, precision))
    }

    fn fine_tunes(&self) -> bool {
        TypeId::of::<A::Network>() == TypeId::of::<InvertedResidualNet>()
    }

    fn load_trainable(
        &self,
        weights: &WeightSource,
        sha256: Option<&str>,
        model: &str,
    ) -> Result<Option<InvertedResidualNet>> {
        if !self.fine_tunes() {
            return Ok(None);
        }
        let network: Box<dyn Any> = Box::new(self.init(&Device::flex()));
        let Ok(network) = network.downcast::<InvertedResidualNet>() else {
            return Ok(None);
        };
        let network = load_weights_from(*network, weights, &self.weight_names(), sha256, model)?;
        Ok(Some(network.fold_batch_norms()))
    }
}
