//! The two traits of a network: [`ImageNetwork`], what the network stages run (built-in
//! architectures and users' own burn modules), and [`Architecture`], how the catalog builds a
//! built-in one and maps a checkpoint's tensor names onto it.

use burn::prelude::*;
use burn::store::ModuleSnapshot;

use super::cpu;
use super::layers::{FoldBatchNorms, NameMap, global_average_pool};

/// A network the featurizer and predictor can run. Implement it for any burn module to use
/// your own model (see [`super::register_network`]); the built-in architectures implement it too.
///
/// The input is a normalised RGB batch `[N, 3, S, S]` made as the model's [`super::Manifest`] says.
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

    /// The CPU plan that computes [`ImageNetwork::feature_map`] on the CPU device, if any: the
    /// engine then hands it the input buffer itself, without a burn tensor in between.
    fn plan(&self) -> Option<&cpu::Plan> {
        None
    }
}

/// A built-in architecture's configuration (`ResNetConfig::resnet50()`, a narrowed test
/// network, ...): how to build the network and how a checkpoint's tensor names map onto it.
/// Everything the catalog loads goes through these two methods.
pub trait Architecture {
    type Network: ImageNetwork + FoldBatchNorms + cpu::CpuPlan + ModuleSnapshot + Module + 'static;

    /// The network with freshly initialised weights (load real ones with [`super::load_weights`]).
    fn init(&self, device: &Device) -> Self::Network;

    /// Checkpoint names (torchvision's, or the checkpoint's own) -> this crate's field paths.
    fn weight_names(&self) -> NameMap;
}
