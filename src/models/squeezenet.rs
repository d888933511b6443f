//! SqueezeNet 1.1 (torchvision layout: `features.N` with Fire modules, `classifier.1` a 1x1
//! convolution). Logits come from the feature map (conv, ReLU, average), not from the pooled
//! vector, so the class head is not a linear layer on the features.

use burn::nn::conv::Conv2d;
use burn::prelude::*;

use super::cpu::{Conv, CpuPlan, Op, Plan};
use super::layers::{Act, ConvSpec, FoldBatchNorms, NameMap, global_average_pool, max_pool};
use super::{Architecture, ImageNetwork};

/// Fire module widths: (squeeze, expand 1x1, expand 3x3).
const FIRES: [(usize, usize, usize); 8] = [
    (16, 64, 64),
    (16, 64, 64),
    (32, 128, 128),
    (32, 128, 128),
    (48, 192, 192),
    (48, 192, 192),
    (64, 256, 256),
    (64, 256, 256),
];
/// torchvision's Sequential index of each Fire module (pools sit at 2, 5 and 8).
const FIRE_INDEX: [usize; 8] = [3, 4, 6, 7, 9, 10, 11, 12];

#[derive(Debug, Clone, PartialEq)]
pub struct SqueezeNetConfig {
    pub stem_width: usize,
    pub fires: [(usize, usize, usize); 8],
    pub num_classes: usize,
}

impl SqueezeNetConfig {
    pub fn squeezenet1_1() -> Self {
        SqueezeNetConfig {
            stem_width: 64,
            fires: FIRES,
            num_classes: 1000,
        }
    }

    /// Every width divided by `divisor` (small networks for tests).
    pub fn narrow(mut self, divisor: usize) -> Self {
        self.stem_width /= divisor;
        self.fires = self
            .fires
            .map(|(s, e1, e3)| (s / divisor, e1 / divisor, e3 / divisor));
        self
    }

    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn feature_dim(&self) -> usize {
        let (_, e1, e3) = self.fires[7];
        e1 + e3
    }
}

impl Architecture for SqueezeNetConfig {
    type Network = SqueezeNet;

    fn init(&self, device: &Device) -> SqueezeNet {
        let mut channels = self.stem_width;
        let fires = self
            .fires
            .iter()
            .map(|&(s, e1, e3)| {
                let fire = Fire {
                    squeeze: ConvSpec::new(channels, s, 1).bias().init(device),
                    expand1x1: ConvSpec::new(s, e1, 1).bias().init(device),
                    expand3x3: ConvSpec::new(s, e3, 3).bias().init(device),
                };
                channels = e1 + e3;
                fire
            })
            .collect();
        SqueezeNet {
            stem: ConvSpec::new(3, self.stem_width, 3)
                .stride(2)
                .padding([0, 0])
                .bias()
                .init(device),
            fires,
            classifier: ConvSpec::new(channels, self.num_classes, 1)
                .bias()
                .init(device),
        }
    }

    fn weight_names(&self) -> NameMap {
        let mut map = NameMap::default();
        map.prefix("features.0", "stem")
            .prefix("classifier.1", "classifier");
        for (k, index) in FIRE_INDEX.iter().enumerate() {
            map.prefix(&format!("features.{index}"), &format!("fires.{k}"));
        }
        map
    }
}

/// `squeeze` 1x1 then two expand branches (1x1 and 3x3) concatenated, ReLU after each conv.
#[derive(Module, Debug)]
pub struct Fire {
    squeeze: Conv2d,
    expand1x1: Conv2d,
    expand3x3: Conv2d,
}

impl Fire {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let s = Act::Relu.apply(self.squeeze.forward(x));
        Tensor::cat(
            vec![
                Act::Relu.apply(self.expand1x1.forward(s.clone())),
                Act::Relu.apply(self.expand3x3.forward(s)),
            ],
            1,
        )
    }
}

#[derive(Module, Debug)]
pub struct SqueezeNet {
    stem: Conv2d,
    fires: Vec<Fire>,
    classifier: Conv2d,
}

impl ImageNetwork for SqueezeNet {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = Act::Relu.apply(self.stem.forward(input));
        for (k, fire) in self.fires.iter().enumerate() {
            // Max pools (3x3, stride 2, ceil mode) before fires 0, 2 and 4.
            if k % 2 == 0 && k <= 4 {
                x = max_pool(x, 3, 2, 0, true);
            }
            x = fire.forward(x);
        }
        x
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        Some(global_average_pool(
            Act::Relu.apply(self.classifier.forward(map)),
        ))
    }
}

impl CpuPlan for SqueezeNet {
    fn cpu_plan(&self) -> Option<Plan> {
        let relu = |conv: &Conv2d| Conv::from_burn(conv, Some(Act::Relu)).map(Op::Conv);
        let mut ops = vec![relu(&self.stem)?];
        for (k, fire) in self.fires.iter().enumerate() {
            if k % 2 == 0 && k <= 4 {
                ops.push(Op::max_pool(3, 2, 0, true));
            }
            ops.push(relu(&fire.squeeze)?);
            ops.push(Op::Concat(vec![
                vec![relu(&fire.expand1x1)?],
                vec![relu(&fire.expand3x3)?],
            ]));
        }
        Some(Plan::new(ops))
    }
}

/// SqueezeNet has no BatchNorm.
impl FoldBatchNorms for SqueezeNet {
    fn fold_batch_norms(self) -> Self {
        self
    }
}
