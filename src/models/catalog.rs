//! The named models: one table of the name used in `modelName`, the folder under the model
//! directory (also the `architecture` its manifest names) and the architecture to build.

use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;

use super::efficientnet::EfficientNetConfig;
use super::efficientnet_lite::EfficientNetLiteConfig;
use super::inception_v3::InceptionV3Config;
use super::layers::FoldBatchNorms;
use super::mobilenet_v2::MobileNetV2Config;
use super::mobilenet_v3::MobileNetV3Config;
use super::resnet::ResNetConfig;
use super::squeezenet::SqueezeNetConfig;
use super::vgg::VggConfig;
use super::weights::load_weights;
use super::{Architecture, ImageNetwork, model_error};
use crate::error::Result;

/// One named model: the name used in `modelName`; its folder under the model directory, which
/// is also the `architecture` its manifest names; its full-size config (1000 ImageNet classes).
type Entry = (
    &'static str,
    &'static str,
    fn() -> Box<dyn LoadArchitecture>,
);

#[rustfmt::skip]
const CATALOG: &[Entry] = &[
    ("EfficientNetLite0", "efficientnet_lite0", || Box::new(EfficientNetLiteConfig::lite0())),
    ("EfficientNetLite1", "efficientnet_lite1", || Box::new(EfficientNetLiteConfig::lite1())),
    ("EfficientNetLite2", "efficientnet_lite2", || Box::new(EfficientNetLiteConfig::lite2())),
    ("ResNet18",          "resnet18",           || Box::new(ResNetConfig::resnet18())),
    ("ResNet34",          "resnet34",           || Box::new(ResNetConfig::resnet34())),
    ("ResNet50",          "resnet50",           || Box::new(ResNetConfig::resnet50())),
    ("ResNet101",         "resnet101",          || Box::new(ResNetConfig::resnet101())),
    ("ResNet152",         "resnet152",          || Box::new(ResNetConfig::resnet152())),
    ("MobileNetV2",       "mobilenet_v2",       || Box::new(MobileNetV2Config::mobilenet_v2())),
    ("MobileNetV3Large",  "mobilenet_v3_large", || Box::new(MobileNetV3Config::large())),
    ("MobileNetV3Small",  "mobilenet_v3_small", || Box::new(MobileNetV3Config::small())),
    ("SqueezeNet1_1",     "squeezenet1_1",      || Box::new(SqueezeNetConfig::squeezenet1_1())),
    ("EfficientNetB0",    "efficientnet_b0",    || Box::new(EfficientNetConfig::b0())),
    ("InceptionV3",       "inception_v3",       || Box::new(InceptionV3Config::inception_v3())),
    ("VGG16",             "vgg16",              || Box::new(VggConfig::vgg16(false))),
    ("VGG16BN",           "vgg16_bn",           || Box::new(VggConfig::vgg16(true))),
    ("VGG19",             "vgg19",              || Box::new(VggConfig::vgg19(false))),
    ("VGG19BN",           "vgg19_bn",           || Box::new(VggConfig::vgg19(true))),
];

/// The named models' names, in catalog order.
pub(super) fn names() -> impl Iterator<Item = &'static str> {
    CATALOG.iter().map(|(name, _, _)| *name)
}

/// The folder of a named model, `None` if the catalog has no such name.
pub(super) fn folder(name: &str) -> Option<&'static str> {
    CATALOG
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, folder, _)| *folder)
}

/// Builds the full-size `architecture` (1000 ImageNet classes), loads `weights` into it and
/// folds its BatchNorms into the convolutions (what the featurizer and predictor run).
pub fn load_architecture(
    architecture: &str,
    weights: &Path,
    sha256: Option<&str>,
    device: &Device,
    model: &str,
) -> Result<Arc<dyn ImageNetwork>> {
    let (_, _, config) = CATALOG
        .iter()
        .find(|(_, folder, _)| *folder == architecture)
        .ok_or_else(|| {
            let available: Vec<&str> = CATALOG.iter().map(|(_, folder, _)| *folder).collect();
            model_error(
                model,
                format!(
                    "unknown architecture `{architecture}`; available: {}",
                    available.join(", ")
                ),
            )
        })?;
    config().load(weights, sha256, device, model)
}

/// An [`Architecture`] with its network type erased, so one table holds every config.
trait LoadArchitecture {
    fn load(
        &self,
        weights: &Path,
        sha256: Option<&str>,
        device: &Device,
        model: &str,
    ) -> Result<Arc<dyn ImageNetwork>>;
}

impl<A: Architecture> LoadArchitecture for A {
    fn load(
        &self,
        weights: &Path,
        sha256: Option<&str>,
        device: &Device,
        model: &str,
    ) -> Result<Arc<dyn ImageNetwork>> {
        let network = load_weights(
            self.init(device),
            weights,
            &self.weight_names(),
            sha256,
            model,
        )?;
        Ok(Arc::new(network.fold_batch_norms()))
    }
}
