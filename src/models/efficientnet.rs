//! EfficientNet-B0 (torchvision layout: `features.S.B.block.K`, MBConv with squeeze-excite, SiLU,
//! symmetric padding, BatchNorm eps 1e-5; `classifier.1` linear). Stochastic depth and dropout
//! are training-only and absent here.

use burn::nn::LinearConfig;
use burn::prelude::*;

use super::Architecture;
use super::inverted_residual::{InvertedResidual, InvertedResidualBody, InvertedResidualNet};
use super::layers::{Act, ConvSpec, NameMap, SqueezeExcitation, make_divisible};

const BN_EPS: f64 = 1e-5;

/// One stage: (expand ratio, kernel, stride, input, output, layers), before scaling.
pub type StageSpec = (usize, usize, usize, usize, usize, usize);

const B0: [StageSpec; 7] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
];

#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetConfig {
    pub stages: Vec<StageSpec>,
    pub width_mult: f64,
    pub depth_mult: f64,
    pub num_classes: usize,
}

impl EfficientNetConfig {
    pub fn b0() -> Self {
        EfficientNetConfig {
            stages: B0.to_vec(),
            width_mult: 1.0,
            depth_mult: 1.0,
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

    fn layers(&self, n: usize) -> usize {
        (n as f64 * self.depth_mult).ceil() as usize
    }

    /// Channels of the last 1x1 convolution: 4x the last stage's output.
    pub fn feature_dim(&self) -> usize {
        4 * self.stages.last().map_or(32, |s| self.adjust(s.4))
    }

    /// Every block as (expand, kernel, stride, input, output), scaled.
    fn blocks(&self) -> Vec<(usize, usize, usize, usize, usize)> {
        let mut blocks = Vec::new();
        for &(expand, kernel, stride, input, output, n) in &self.stages {
            let (input, output) = (self.adjust(input), self.adjust(output));
            for i in 0..self.layers(n) {
                let (input, stride) = if i == 0 { (input, stride) } else { (output, 1) };
                blocks.push((expand, kernel, stride, input, output));
            }
        }
        blocks
    }
}

impl Architecture for EfficientNetConfig {
    type Network = InvertedResidualNet;

    fn init(&self, device: &Device) -> InvertedResidualNet {
        let stem = self.stages.first().map_or(32, |s| self.adjust(s.3));
        let blocks = self
            .blocks()
            .into_iter()
            .map(|(expand, kernel, stride, input, output)| {
                let expanded = make_divisible((input * expand) as f64, 8);
                InvertedResidual {
                    expand: (expanded != input)
                        .then(|| ConvSpec::new(input, expanded, 1).with_bn(BN_EPS, device)),
                    depthwise: ConvSpec::new(expanded, expanded, kernel)
                        .stride(stride)
                        .depthwise()
                        .with_bn(BN_EPS, device),
                    se: Some(SqueezeExcitation::new(expanded, (input / 4).max(1), device)),
                    project: ConvSpec::new(expanded, output, 1).with_bn(BN_EPS, device),
                    residual: stride == 1 && input == output,
                    act: Act::Silu,
                    se_acts: (Act::Silu, Act::Sigmoid),
                }
            })
            .collect();
        let last_in = self.stages.last().map_or(stem, |s| self.adjust(s.4));
        InvertedResidualNet {
            body: InvertedResidualBody {
                stem: ConvSpec::new(3, stem, 3).stride(2).with_bn(BN_EPS, device),
                blocks,
                head: ConvSpec::new(last_in, self.feature_dim(), 1).with_bn(BN_EPS, device),
                act: Act::Silu,
            },
            classifier: LinearConfig::new(self.feature_dim(), self.num_classes).init(device),
        }
    }

    fn weight_names(&self) -> NameMap {
        let mut map = NameMap::default();
        map.conv_bn("features.0", "body.stem");
        let mut j = 0;
        for (s, &(expand, _, _, input, output, n)) in self.stages.iter().enumerate() {
            for i in 0..self.layers(n) {
                let input = if i == 0 {
                    self.adjust(input)
                } else {
                    self.adjust(output)
                };
                let from = format!("features.{}.{i}.block", s + 1);
                let to = format!("body.blocks.{j}");
                let mut k = 0;
                if make_divisible((input * expand) as f64, 8) != input {
                    map.conv_bn(&format!("{from}.0"), &format!("{to}.expand"));
                    k = 1;
                }
                map.conv_bn(&format!("{from}.{k}"), &format!("{to}.depthwise"))
                    .prefix(&format!("{from}.{}", k + 1), &format!("{to}.se"))
                    .conv_bn(&format!("{from}.{}", k + 2), &format!("{to}.project"));
                j += 1;
            }
        }
        map.conv_bn(&format!("features.{}", self.stages.len() + 1), "body.head")
            .prefix("classifier.1", "classifier");
        map
    }
}
