//! ResNet-18/34/50/101/152 (torchvision layout, v1.5: the stride sits on the bottleneck's 3x3).
//! Field names are torchvision's (`layer3.1.conv2.weight`); only `downsample.0/1` are renamed.

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear, LinearConfig};
use burn::prelude::*;

use super::cpu::{Conv, CpuPlan, Op, Plan};
use super::layers::{
    Act, ConvBn, ConvSpec, FoldBatchNorms, NameMap, batch_norm, bn_forward, fold_into,
    global_average_pool, max_pool,
};
use super::{Architecture, ImageNetwork};

const BN_EPS: f64 = 1e-5;

/// Shape of a ResNet: block kind, blocks per stage, stage widths ("planes").
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    pub bottleneck: bool,
    pub layers: [usize; 4],
    pub stem_width: usize,
    pub widths: [usize; 4],
    pub num_classes: usize,
}

impl ResNetConfig {
    fn standard(bottleneck: bool, layers: [usize; 4]) -> Self {
        ResNetConfig {
            bottleneck,
            layers,
            stem_width: 64,
            widths: [64, 128, 256, 512],
            num_classes: 1000,
        }
    }
    pub fn resnet18() -> Self {
        Self::standard(false, [2, 2, 2, 2])
    }
    pub fn resnet34() -> Self {
        Self::standard(false, [3, 4, 6, 3])
    }
    pub fn resnet50() -> Self {
        Self::standard(true, [3, 4, 6, 3])
    }
    pub fn resnet101() -> Self {
        Self::standard(true, [3, 4, 23, 3])
    }
    pub fn resnet152() -> Self {
        Self::standard(true, [3, 8, 36, 3])
    }

    /// Every width divided by `divisor` (small networks for tests).
    pub fn narrow(mut self, divisor: usize) -> Self {
        self.stem_width /= divisor;
        self.widths = self.widths.map(|w| w / divisor);
        self
    }

    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    fn expansion(&self) -> usize {
        if self.bottleneck { 4 } else { 1 }
    }

    /// Channels of the last feature map (the pooled feature size).
    pub fn feature_dim(&self) -> usize {
        self.widths[3] * self.expansion()
    }
}

impl Architecture for ResNetConfig {
    type Network = ResNet;

    fn init(&self, device: &Device) -> ResNet {
        let mut inplanes = self.stem_width;
        let expansion = self.expansion();
        let mut stages = Vec::new();
        for (stage, (&blocks, &planes)) in self.layers.iter().zip(&self.widths).enumerate() {
            let mut layer = Vec::new();
            for b in 0..blocks {
                let stride = if b == 0 && stage > 0 { 2 } else { 1 };
                let out = planes * expansion;
                let downsample = (b == 0 && (stride != 1 || inplanes != out)).then(|| {
                    ConvSpec::new(inplanes, out, 1)
                        .stride(stride)
                        .with_bn(BN_EPS, device)
                });
                let block = if self.bottleneck {
                    Block {
                        conv1: ConvSpec::new(inplanes, planes, 1).init(device),
                        bn1: Some(batch_norm(planes, BN_EPS, device)),
                        conv2: ConvSpec::new(planes, planes, 3).stride(stride).init(device),
                        bn2: Some(batch_norm(planes, BN_EPS, device)),
                        conv3: Some(ConvSpec::new(planes, out, 1).init(device)),
                        bn3: Some(batch_norm(out, BN_EPS, device)),
                        downsample,
                    }
                } else {
                    Block {
                        conv1: ConvSpec::new(inplanes, planes, 3)
                            .stride(stride)
                            .init(device),
                        bn1: Some(batch_norm(planes, BN_EPS, device)),
                        conv2: ConvSpec::new(planes, planes, 3).init(device),
                        bn2: Some(batch_norm(planes, BN_EPS, device)),
                        conv3: None,
                        bn3: None,
                        downsample,
                    }
                };
                layer.push(block);
                inplanes = out;
            }
            stages.push(layer);
        }
        let mut stages = stages.into_iter();
        let mut next = || stages.next().unwrap_or_default();
        ResNet {
            conv1: ConvSpec::new(3, self.stem_width, 7).stride(2).init(device),
            bn1: Some(batch_norm(self.stem_width, BN_EPS, device)),
            layer1: next(),
            layer2: next(),
            layer3: next(),
            layer4: next(),
            fc: LinearConfig::new(inplanes, self.num_classes).init(device),
        }
    }

    /// torchvision names -> fields: only the `downsample` Sequential differs.
    fn weight_names(&self) -> NameMap {
        let mut map = NameMap::default();
        map.pattern(r"\.downsample\.0\.", ".downsample.conv.")
            .pattern(r"\.downsample\.1\.", ".downsample.bn.");
        map
    }
}

/// A basic block (two 3x3) or, with `conv3`, a bottleneck (1x1, 3x3, 1x1).
#[derive(Module, Debug)]
pub struct Block {
    conv1: Conv2d,
    bn1: Option<BatchNorm>,
    conv2: Conv2d,
    bn2: Option<BatchNorm>,
    conv3: Option<Conv2d>,
    bn3: Option<BatchNorm>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(d) => d.forward(x.clone()),
            None => x.clone(),
        };
        let mut out = Act::Relu.apply(bn_forward(&self.bn1, self.conv1.forward(x)));
        out = bn_forward(&self.bn2, self.conv2.forward(out));
        if let Some(conv3) = &self.conv3 {
            out = bn_forward(&self.bn3, conv3.forward(Act::Relu.apply(out)));
        }
        Act::Relu.apply(out + identity)
    }

    /// One residual step: the last convolution's ReLU comes after the shortcut is added.
    fn cpu_op(&self) -> Option<Op> {
        if self.bn1.is_some() || self.bn2.is_some() || self.bn3.is_some() {
            return None;
        }
        let relu = Some(Act::Relu);
        let mut body = vec![
            Op::Conv(Conv::from_burn(&self.conv1, relu)?),
            Op::Conv(Conv::from_burn(&self.conv2, relu)?),
        ];
        if let Some(conv3) = &self.conv3 {
            body.push(Op::Conv(Conv::from_burn(conv3, relu)?));
        }
        let shortcut = match &self.downsample {
            Some(d) => vec![Op::Conv(Conv::from_conv_bn(d, None)?)],
            None => Vec::new(),
        };
        Op::residual(shortcut, body)
    }

    fn fold(&mut self) {
        fold_into(&mut self.conv1, &mut self.bn1);
        fold_into(&mut self.conv2, &mut self.bn2);
        if let Some(conv3) = &mut self.conv3 {
            fold_into(conv3, &mut self.bn3);
        }
        if let Some(d) = &mut self.downsample {
            d.fold();
        }
    }
}

#[derive(Module, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: Option<BatchNorm>,
    layer1: Vec<Block>,
    layer2: Vec<Block>,
    layer3: Vec<Block>,
    layer4: Vec<Block>,
    fc: Linear,
}

impl ResNet {
    /// Every residual block, stage after stage.
    fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
    }
}

impl ImageNetwork for ResNet {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = Act::Relu.apply(bn_forward(&self.bn1, self.conv1.forward(input)));
        x = max_pool(x, 3, 2, 1, false);
        for block in self.blocks() {
            x = block.forward(x);
        }
        x
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        Some(self.fc.forward(global_average_pool(map)))
    }
}

impl CpuPlan for ResNet {
    fn cpu_plan(&self) -> Option<Plan> {
        if self.bn1.is_some() {
            return None;
        }
        let mut ops = vec![
            Op::Conv(Conv::from_burn(&self.conv1, Some(Act::Relu))?),
            Op::max_pool(3, 2, 1, false),
        ];
        for block in self.blocks() {
            ops.push(block.cpu_op()?);
        }
        Some(Plan::new(ops))
    }
}

impl FoldBatchNorms for ResNet {
    fn fold_batch_norms(mut self) -> Self {
        fold_into(&mut self.conv1, &mut self.bn1);
        for block in self
            .layer1
            .iter_mut()
            .chain(&mut self.layer2)
            .chain(&mut self.layer3)
            .chain(&mut self.layer4)
        {
            block.fold();
        }
        self
    }
}
