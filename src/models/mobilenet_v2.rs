//! MobileNetV2 (torchvision layout: `features.0` stem, `features.1..17` inverted residuals with
//! a `conv` Sequential, `features.18` 1x1 head, `classifier.1` linear). ReLU6, BatchNorm eps 1e-5.

use burn::nn::LinearConfig;
use burn::prelude::*;

use super::Architecture;
use super::inverted_residual::{InvertedResidual, InvertedResidualBody, InvertedResidualNet};
use super::layers::{Act, ConvSpec, NameMap, make_divisible};

const BN_EPS: f64 = 1e-5;
/// (expand ratio t, output channels c, repeats n, first stride s), from the paper.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

#[derive(Debug, Clone, PartialEq)]
pub struct MobileNetV2Config {
    pub width_mult: f64,
    pub num_classes: usize,
}

impl MobileNetV2Config {
    pub fn mobilenet_v2() -> Self {
        MobileNetV2Config {
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

    /// Channels of the 1x1 head (the pooled feature size).
    pub fn feature_dim(&self) -> usize {
        make_divisible(1280.0 * self.width_mult.max(1.0), 8)
    }
}

impl Architecture for MobileNetV2Config {
    type Network = InvertedResidualNet;

    fn init(&self, device: &Device) -> InvertedResidualNet {
        let mut channels = make_divisible(32.0 * self.width_mult, 8);
        let stem = ConvSpec::new(3, channels, 3)
            .stride(2)
            .with_bn(BN_EPS, device);
        let mut blocks = Vec::new();
        for &(t, c, n, s) in &SETTINGS {
            let out = make_divisible(c as f64 * self.width_mult, 8);
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let hidden = channels * t;
                blocks.push(InvertedResidual {
                    expand: (t != 1)
                        .then(|| ConvSpec::new(channels, hidden, 1).with_bn(BN_EPS, device)),
                    depthwise: ConvSpec::new(hidden, hidden, 3)
                        .stride(stride)
                        .depthwise()
                        .with_bn(BN_EPS, device),
                    se: None,
                    project: ConvSpec::new(hidden, out, 1).with_bn(BN_EPS, device),
                    residual: stride == 1 && channels == out,
                    act: Act::Relu6,
                    se_acts: (Act::Relu, Act::Sigmoid),
                });
                channels = out;
            }
        }
        let last = self.feature_dim();
        InvertedResidualNet {
            body: InvertedResidualBody {
                stem,
                blocks,
                head: ConvSpec::new(channels, last, 1).with_bn(BN_EPS, device),
                act: Act::Relu6,
            },
            classifier: LinearConfig::new(last, self.num_classes).init(device),
        }
    }

    fn weight_names(&self) -> NameMap {
        let mut map = NameMap::default();
        map.conv_bn("features.0", "body.stem");
        let mut i = 0;
        for &(t, _, n, _) in &SETTINGS {
            for _ in 0..n {
                let from = format!("features.{}.conv", i + 1);
                let to = format!("body.blocks.{i}");
                let mut k = 0;
                if t != 1 {
                    map.conv_bn(&format!("{from}.0"), &format!("{to}.expand"));
                    k = 1;
                }
                map.conv_bn(&format!("{from}.{k}"), &format!("{to}.depthwise"))
                    .prefix(&format!("{from}.{}", k + 1), &format!("{to}.project.conv"))
                    .prefix(&format!("{from}.{}", k + 2), &format!("{to}.project.bn"));
                i += 1;
            }
        }
        map.conv_bn(&format!("features.{}", i + 1), "body.head")
            .prefix("classifier.1", "classifier");
        map
    }
}
