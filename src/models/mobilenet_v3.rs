//! MobileNetV3-Large / -Small (torchvision layout: `features.N.block.K`, squeeze-excite with
//! hard-sigmoid gates, hard-swish, BatchNorm eps 1e-3; `classifier.0` and `classifier.3`).

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use super::cpu::{CpuPlan, Plan};
use super::inverted_residual::{InvertedResidual, InvertedResidualBody};
use super::layers::{
    Act, ConvSpec, FoldBatchNorms, NameMap, SqueezeExcitation, global_average_pool, make_divisible,
};
use super::{Architecture, ImageNetwork};

const BN_EPS: f64 = 1e-3;

/// One inverted-residual row of the paper's table, before width scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSpec {
    pub input: usize,
    pub kernel: usize,
    pub expanded: usize,
    pub output: usize,
    pub squeeze_excite: bool,
    pub hard_swish: bool,
    pub stride: usize,
}

const fn b(
    input: usize,
    kernel: usize,
    expanded: usize,
    output: usize,
    squeeze_excite: bool,
    hard_swish: bool,
    stride: usize,
) -> BlockSpec {
    BlockSpec {
        input,
        kernel,
        expanded,
        output,
        squeeze_excite,
        hard_swish,
        stride,
    }
}

const LARGE: [BlockSpec; 15] = [
    b(16, 3, 16, 16, false, false, 1),
    b(16, 3, 64, 24, false, false, 2),
    b(24, 3, 72, 24, false, false, 1),
    b(24, 5, 72, 40, true, false, 2),
    b(40, 5, 120, 40, true, false, 1),
    b(40, 5, 120, 40, true, false, 1),
    b(40, 3, 240, 80, false, true, 2),
    b(80, 3, 200, 80, false, true, 1),
    b(80, 3, 184, 80, false, true, 1),
    b(80, 3, 184, 80, false, true, 1),
    b(80, 3, 480, 112, true, true, 1),
    b(112, 3, 672, 112, true, true, 1),
    b(112, 5, 672, 160, true, true, 2),
    b(160, 5, 960, 160, true, true, 1),
    b(160, 5, 960, 160, true, true, 1),
];

const SMALL: [BlockSpec; 11] = [
    b(16, 3, 16, 16, true, false, 2),
    b(16, 3, 72, 24, false, false, 2),
    b(24, 3, 88, 24, false, false, 1),
    b(24, 5, 96, 40, true, true, 2),
    b(40, 5, 240, 40, true, true, 1),
    b(40, 5, 240, 40, true, true, 1),
    b(40, 5, 120, 48, true, true, 1),
    b(48, 5, 144, 48, true, true, 1),
    b(48, 5, 288, 96, true, true, 2),
    b(96, 5, 576, 96, true, true, 1),
    b(96, 5, 576, 96, true, true, 1),
];

#[derive(Debug, Clone, PartialEq)]
pub struct MobileNetV3Config {
    pub blocks: Vec<BlockSpec>,
    /// Width of the classifier's hidden layer, before width scaling.
    pub last_channel: usize,
    pub width_mult: f64,
    pub num_classes: usize,
}

impl MobileNetV3Config {
    pub fn large() -> Self {
        MobileNetV3Config {
            blocks: LARGE.to_vec(),
            last_channel: 1280,
            width_mult: 1.0,
            num_classes: 1000,
        }
    }

    pub fn small() -> Self {
        MobileNetV3Config {
            blocks: SMALL.to_vec(),
            last_channel: 1024,
            width_mult: 1.0,
            num_classes: 1000,
        }
    }

    pub fn with_width_mult(mut self, width_mult: f64) -> Self {
        self.width_mult = width_mult;
        self
    }

    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    fn adjust(&self, channels: usize) -> usize {
        make_divisible(channels as f64 * self.width_mult, 8)
    }

    /// Channels of the last 1x1 convolution (the pooled feature size): 6x the last block's.
    pub fn feature_dim(&self) -> usize {
        6 * self.blocks.last().map_or(16, |b| self.adjust(b.output))
    }
}

impl Architecture for MobileNetV3Config {
    type Network = MobileNetV3;

    fn init(&self, device: &Device) -> MobileNetV3 {
        let first = self.blocks.first().map_or(16, |b| self.adjust(b.input));
        let blocks = self
            .blocks
            .iter()
            .map(|spec| {
                let (input, expanded, output) = (
                    self.adjust(spec.input),
                    self.adjust(spec.expanded),
                    self.adjust(spec.output),
                );
                InvertedResidual {
                    expand: (expanded != input)
                        .then(|| ConvSpec::new(input, expanded, 1).with_bn(BN_EPS, device)),
                    depthwise: ConvSpec::new(expanded, expanded, spec.kernel)
                        .stride(spec.stride)
                        .depthwise()
                        .with_bn(BN_EPS, device),
                    se: spec.squeeze_excite.then(|| {
                        SqueezeExcitation::new(
                            expanded,
                            make_divisible((expanded / 4) as f64, 8),
                            device,
                        )
                    }),
                    project: ConvSpec::new(expanded, output, 1).with_bn(BN_EPS, device),
                    residual: spec.stride == 1 && input == output,
                    act: if spec.hard_swish {
                        Act::HardSwish
                    } else {
                        Act::Relu
                    },
                    se_acts: (Act::Relu, Act::HardSigmoid),
                }
            })
            .collect();
        let last_in = self.blocks.last().map_or(first, |b| self.adjust(b.output));
        let hidden = self.adjust(self.last_channel);
        MobileNetV3 {
            body: InvertedResidualBody {
                stem: ConvSpec::new(3, first, 3).stride(2).with_bn(BN_EPS, device),
                blocks,
                head: ConvSpec::new(last_in, self.feature_dim(), 1).with_bn(BN_EPS, device),
                act: Act::HardSwish,
            },
            fc1: LinearConfig::new(self.feature_dim(), hidden).init(device),
            fc2: LinearConfig::new(hidden, self.num_classes).init(device),
        }
    }

    fn weight_names(&self) -> NameMap {
        let mut map = NameMap::default();
        map.conv_bn("features.0", "body.stem");
        for (i, spec) in self.blocks.iter().enumerate() {
            let from = format!("features.{}.block", i + 1);
            let to = format!("body.blocks.{i}");
            let mut k = 0;
            if self.adjust(spec.expanded) != self.adjust(spec.input) {
                map.conv_bn(&format!("{from}.0"), &format!("{to}.expand"));
                k += 1;
            }
            map.conv_bn(&format!("{from}.{k}"), &format!("{to}.depthwise"));
            k += 1;
            if spec.squeeze_excite {
                map.prefix(&format!("{from}.{k}"), &format!("{to}.se"));
                k += 1;
            }
            map.conv_bn(&format!("{from}.{k}"), &format!("{to}.project"));
        }
        map.conv_bn(&format!("features.{}", self.blocks.len() + 1), "body.head")
            .prefix("classifier.0", "fc1")
            .prefix("classifier.3", "fc2");
        map
    }
}

#[derive(Module, Debug)]
pub struct MobileNetV3 {
    body: InvertedResidualBody,
    fc1: Linear,
    fc2: Linear,
}

impl ImageNetwork for MobileNetV3 {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        self.body.forward(input)
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        let hidden = Act::HardSwish.apply(self.fc1.forward(global_average_pool(map)));
        Some(self.fc2.forward(hidden))
    }
}

impl CpuPlan for MobileNetV3 {
    fn cpu_plan(&self) -> Option<Plan> {
        self.body.cpu_plan()
    }
}

impl FoldBatchNorms for MobileNetV3 {
    fn fold_batch_norms(mut self) -> Self {
        self.body.fold();
        self
    }
}
