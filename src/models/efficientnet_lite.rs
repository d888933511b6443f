//! EfficientNet-Lite0/1/2: inverted residuals without squeeze-excite, ReLU6, TF "SAME"
//! padding, BatchNorm eps 1e-3. The checkpoint's names (`_blocks.3._bn1.weight`, the
//! efficientnet-lite-pytorch layout) map onto the shared [`InvertedResidualNet`] by regex
//! rules (`NAME_RULES`).

use burn::nn::LinearConfig;
use burn::prelude::*;

use super::Architecture;
use super::inverted_residual::{InvertedResidual, InvertedResidualBody, InvertedResidualNet};
use super::layers::{Act, ConvSpec, NameMap};

/// One stage of MBConv blocks; the stride applies to the stage's first block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageConfig {
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand: usize,
    pub input: usize,
    pub output: usize,
}

/// Shape of an EfficientNet-Lite network.
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetLiteConfig {
    pub stem_channels: usize,
    pub stages: Vec<StageConfig>,
    pub head_channels: usize,
    pub num_classes: usize,
    pub bn_eps: f64,
}

impl EfficientNetLiteConfig {
    /// EfficientNet-Lite0 as in the TF reference (MODEL.md of the bundled weights).
    pub fn lite0() -> Self {
        Self::scaled([1, 2, 2, 3, 3, 4, 1], [16, 24, 40, 80, 112, 192, 320])
    }

    /// EfficientNet-Lite1 (depth x1.1, width x1.0; 240 px): the Lite0 table with more repeats.
    pub fn lite1() -> Self {
        Self::scaled([1, 3, 3, 4, 4, 5, 1], [16, 24, 40, 80, 112, 192, 320])
    }

    /// EfficientNet-Lite2 (depth x1.2, width x1.1; 260 px). Lite keeps the stem (32) and the
    /// head (1280) fixed and the first and last stages at one block.
    pub fn lite2() -> Self {
        Self::scaled([1, 3, 3, 4, 4, 5, 1], [16, 24, 48, 88, 120, 208, 352])
    }

    /// The Lite stage table (kernel, stride, expand per stage) with the given repeats and widths.
    fn scaled(repeats: [usize; 7], widths: [usize; 7]) -> Self {
        const KERNEL_STRIDE_EXPAND: [(usize, usize, usize); 7] = [
            (3, 1, 1),
            (3, 2, 6),
            (5, 2, 6),
            (3, 2, 6),
            (5, 1, 6),
            (5, 2, 6),
            (3, 1, 6),
        ];
        let mut input = 32;
        let stages = (0..7)
            .map(|i| {
                let (kernel, stride, expand) = KERNEL_STRIDE_EXPAND[i];
                let stage = StageConfig {
                    repeats: repeats[i],
                    kernel,
                    stride,
                    expand,
                    input,
                    output: widths[i],
                };
                input = widths[i];
                stage
            })
            .collect();
        EfficientNetLiteConfig {
            stem_channels: 32,
            stages,
            head_channels: 1280,
            num_classes: 1000,
            bn_eps: 1e-3,
        }
    }
}

impl Architecture for EfficientNetLiteConfig {
    type Network = InvertedResidualNet;

    fn init(&self, device: &Device) -> InvertedResidualNet {
        let conv_bn = |i: usize, o: usize, k: usize, stride: usize, depthwise: bool| {
            let spec = ConvSpec::new(i, o, k).stride(stride).same();
            let spec = if depthwise { spec.depthwise() } else { spec };
            spec.with_bn(self.bn_eps, device)
        };
        let mut blocks = Vec::new();
        for stage in &self.stages {
            for r in 0..stage.repeats {
                let input = if r == 0 { stage.input } else { stage.output };
                let stride = if r == 0 { stage.stride } else { 1 };
                let hidden = input * stage.expand;
                blocks.push(InvertedResidual {
                    expand: (stage.expand != 1).then(|| conv_bn(input, hidden, 1, 1, false)),
                    depthwise: conv_bn(hidden, hidden, stage.kernel, stride, true),
                    se: None,
                    project: conv_bn(hidden, stage.output, 1, 1, false),
                    residual: stride == 1 && input == stage.output,
                    act: Act::Relu6,
                    se_acts: (Act::Relu, Act::Sigmoid),
                });
            }
        }
        let last = self.stages.last().map_or(self.stem_channels, |s| s.output);
        InvertedResidualNet {
            body: InvertedResidualBody {
                stem: conv_bn(3, self.stem_channels, 3, 2, false),
                blocks,
                head: conv_bn(last, self.head_channels, 1, 1, false),
                act: Act::Relu6,
            },
            classifier: LinearConfig::new(self.head_channels, self.num_classes).init(device),
        }
    }

    /// The checkpoint's names follow no table: the same rules fit every Lite size.
    fn weight_names(&self) -> NameMap {
        let mut map = NameMap::default();
        for (from, to) in NAME_RULES {
            map.pattern(from, to);
        }
        map
    }
}

/// Checkpoint names -> fields (regex, replacement, applied in order). BatchNorm
/// `weight`/`bias` -> `gamma`/`beta` and the linear transpose are burn-store's PyTorch adapter's.
const NAME_RULES: &[(&str, &str)] = &[
    (r"^_conv_stem\.", "body.stem.conv."),
    (r"^_bn0\.", "body.stem.bn."),
    (r"^_conv_head\.", "body.head.conv."),
    (r"^_bn1\.", "body.head.bn."),
    (r"^_fc\.", "classifier."),
    (
        r"^_blocks\.(\d+)\._expand_conv\.",
        "body.blocks.$1.expand.conv.",
    ),
    (r"^_blocks\.(\d+)\._bn0\.", "body.blocks.$1.expand.bn."),
    (
        r"^_blocks\.(\d+)\._depthwise_conv\.",
        "body.blocks.$1.depthwise.conv.",
    ),
    (r"^_blocks\.(\d+)\._bn1\.", "body.blocks.$1.depthwise.bn."),
    (
        r"^_blocks\.(\d+)\._project_conv\.",
        "body.blocks.$1.project.conv.",
    ),
    (r"^_blocks\.(\d+)\._bn2\.", "body.blocks.$1.project.bn."),
];
