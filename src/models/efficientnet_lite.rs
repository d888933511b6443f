//! EfficientNet-Lite0/1/2: MBConv blocks without squeeze-excite, ReLU6, TF "SAME"
//! padding, BatchNorm eps 1e-3. Field names follow the PyTorch checkpoint with the leading
//! underscores dropped (`_blocks.3._bn1.weight` -> `blocks.3.bn1.gamma`), see [`WEIGHT_NAME_MAP`].

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

use super::ImageNetwork;
use super::layers::{fold_batch_norm as fold, global_average_pool};

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

    /// Builds the network with freshly initialised weights (load real ones with the store).
    pub fn init(&self, device: &Device) -> EfficientNetLite {
        let bn = |c: usize| {
            BatchNormConfig::new(c)
                .with_epsilon(self.bn_eps)
                .init(device)
        };
        let conv = |i: usize, o: usize, k: usize, stride: usize, groups: usize| {
            Conv2dConfig::new([i, o], [k, k])
                .with_stride([stride, stride])
                .with_groups(groups)
                .with_padding(PaddingConfig2d::Same)
                .with_bias(false)
                .init(device)
        };
        let mut blocks = Vec::new();
        for stage in &self.stages {
            for r in 0..stage.repeats {
                let input = if r == 0 { stage.input } else { stage.output };
                let stride = if r == 0 { stage.stride } else { 1 };
                let hidden = input * stage.expand;
                let expand = stage.expand != 1;
                blocks.push(MbConv {
                    expand_conv: expand.then(|| conv(input, hidden, 1, 1, 1)),
                    bn0: expand.then(|| bn(hidden)),
                    depthwise_conv: conv(hidden, hidden, stage.kernel, stride, hidden),
                    bn1: bn(hidden),
                    project_conv: conv(hidden, stage.output, 1, 1, 1),
                    bn2: bn(stage.output),
                    residual: stride == 1 && input == stage.output,
                });
            }
        }
        let last = self.stages.last().map_or(self.stem_channels, |s| s.output);
        EfficientNetLite {
            conv_stem: conv(3, self.stem_channels, 3, 2, 1),
            bn0: bn(self.stem_channels),
            blocks,
            conv_head: conv(last, self.head_channels, 1, 1, 1),
            bn1: bn(self.head_channels),
            fc: LinearConfig::new(self.head_channels, self.num_classes).init(device),
        }
    }
}

/// How checkpoint names map onto this module's fields: drop the leading `_` of every path
/// segment (`_blocks.0._bn1` -> `blocks.0.bn1`). BatchNorm `weight`/`bias` -> `gamma`/`beta`
/// and the `fc` transpose are handled by burn-store's PyTorch adapter.
pub const WEIGHT_NAME_MAP: &[(&str, &str)] = &[(r"(^|\.)_", "$1")];

/// Inverted-residual block: [1x1 expand] -> depthwise kxk -> 1x1 project (+ skip).
#[derive(Module, Debug)]
pub struct MbConv {
    expand_conv: Option<Conv2d>,
    bn0: Option<BatchNorm>,
    depthwise_conv: Conv2d,
    bn1: BatchNorm,
    project_conv: Conv2d,
    bn2: BatchNorm,
    residual: bool,
}

fn relu6<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clamp(0.0, 6.0)
}

impl MbConv {
    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let (Some(conv), Some(bn)) = (&self.expand_conv, &self.bn0) {
            x = relu6(bn.forward(conv.forward(x)));
        }
        x = relu6(self.bn1.forward(self.depthwise_conv.forward(x)));
        x = self.bn2.forward(self.project_conv.forward(x));
        if self.residual { x + input } else { x }
    }
}

/// The EfficientNet-Lite network.
#[derive(Module, Debug)]
pub struct EfficientNetLite {
    conv_stem: Conv2d,
    bn0: BatchNorm,
    blocks: Vec<MbConv>,
    conv_head: Conv2d,
    bn1: BatchNorm,
    fc: Linear,
}

impl EfficientNetLite {
    /// `[batch, 3, H, W]` normalised RGB -> `[batch, head_channels]` global-average-pooled features.
    pub fn features(&self, input: Tensor<4>) -> Tensor<2> {
        let mut x = relu6(self.bn0.forward(self.conv_stem.forward(input)));
        for block in &self.blocks {
            x = block.forward(x);
        }
        let x = relu6(self.bn1.forward(self.conv_head.forward(x)));
        global_average_pool(x)
    }

    /// Features -> ImageNet logits.
    pub fn logits(&self, features: Tensor<2>) -> Tensor<2> {
        self.fc.forward(features)
    }

    /// The same function with every BatchNorm folded into the convolution before it: one
    /// convolution + bias per layer instead of a convolution and four element-wise passes.
    pub fn fold_batch_norms(self) -> FoldedEfficientNetLite {
        let blocks = self
            .blocks
            .into_iter()
            .map(|b| FoldedMbConv {
                expand_conv: match (b.expand_conv, b.bn0) {
                    (Some(conv), Some(bn)) => Some(fold(conv, &bn)),
                    _ => None,
                },
                depthwise_conv: fold(b.depthwise_conv, &b.bn1),
                project_conv: fold(b.project_conv, &b.bn2),
                residual: b.residual,
            })
            .collect();
        FoldedEfficientNetLite {
            conv_stem: fold(self.conv_stem, &self.bn0),
            blocks,
            conv_head: fold(self.conv_head, &self.bn1),
            fc: self.fc,
        }
    }
}

/// [`MbConv`] with its BatchNorms folded away (inference only).
#[derive(Module, Debug)]
pub struct FoldedMbConv {
    expand_conv: Option<Conv2d>,
    depthwise_conv: Conv2d,
    project_conv: Conv2d,
    residual: bool,
}

impl FoldedMbConv {
    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let Some(conv) = &self.expand_conv {
            x = relu6(conv.forward(x));
        }
        x = relu6(self.depthwise_conv.forward(x));
        x = self.project_conv.forward(x);
        if self.residual { x + input } else { x }
    }
}

/// [`EfficientNetLite`] with its BatchNorms folded away: what the featurizer runs.
#[derive(Module, Debug)]
pub struct FoldedEfficientNetLite {
    conv_stem: Conv2d,
    blocks: Vec<FoldedMbConv>,
    conv_head: Conv2d,
    fc: Linear,
}

impl ImageNetwork for FoldedEfficientNetLite {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = relu6(self.conv_stem.forward(input));
        for block in &self.blocks {
            x = block.forward(x);
        }
        relu6(self.conv_head.forward(x))
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        Some(self.fc.forward(global_average_pool(map)))
    }
}
