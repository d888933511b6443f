//! VGG-16 / VGG-19, with or without BatchNorm (torchvision layout: `features.N` convolutions,
//! `classifier.0/3/6` linears). The feature vector is the second fully connected layer's
//! activation ("fc2", 4096-d), as sparkdl's VGG featurizers returned.

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::module::adaptive_avg_pool2d;

use super::cpu::{Conv, CpuPlan, Op, Plan};
use super::layers::{
    Act, ConvSpec, FoldBatchNorms, NameMap, batch_norm, flatten, fold_into, max_pool,
};
use super::{Architecture, ImageNetwork};

const BN_EPS: f64 = 1e-5;
/// `None` is a 2x2 max pool, `Some(c)` a 3x3 convolution to `c` channels.
const VGG16: &[Option<usize>] = &[
    Some(64),
    Some(64),
    None,
    Some(128),
    Some(128),
    None,
    Some(256),
    Some(256),
    Some(256),
    None,
    Some(512),
    Some(512),
    Some(512),
    None,
    Some(512),
    Some(512),
    Some(512),
    None,
];
const VGG19: &[Option<usize>] = &[
    Some(64),
    Some(64),
    None,
    Some(128),
    Some(128),
    None,
    Some(256),
    Some(256),
    Some(256),
    Some(256),
    None,
    Some(512),
    Some(512),
    Some(512),
    Some(512),
    None,
    Some(512),
    Some(512),
    Some(512),
    Some(512),
    None,
];

#[derive(Debug, Clone, PartialEq)]
pub struct VggConfig {
    pub layers: Vec<Option<usize>>,
    pub batch_norm: bool,
    /// Width of the two hidden fully connected layers.
    pub hidden: usize,
    pub num_classes: usize,
}

impl VggConfig {
    pub fn vgg16(batch_norm: bool) -> Self {
        Self::new(VGG16, batch_norm)
    }
    pub fn vgg19(batch_norm: bool) -> Self {
        Self::new(VGG19, batch_norm)
    }
    fn new(layers: &[Option<usize>], batch_norm: bool) -> Self {
        VggConfig {
            layers: layers.to_vec(),
            batch_norm,
            hidden: 4096,
            num_classes: 1000,
        }
    }

    /// Every width divided by `divisor` (small networks for tests).
    pub fn narrow(mut self, divisor: usize) -> Self {
        self.layers = self.layers.iter().map(|l| l.map(|c| c / divisor)).collect();
        self.hidden /= divisor;
        self
    }

    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    fn last_channels(&self) -> usize {
        self.layers.iter().rev().find_map(|l| *l).unwrap_or(3)
    }
}

impl Architecture for VggConfig {
    type Network = Vgg;

    fn init(&self, device: &Device) -> Vgg {
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        let mut channels = 3;
        for &c in self.layers.iter().flatten() {
            convs.push(ConvSpec::new(channels, c, 3).bias().init(device));
            if self.batch_norm {
                bns.push(batch_norm(c, BN_EPS, device));
            }
            channels = c;
        }
        Vgg {
            layers: self.layers.iter().map(Option::is_some).collect(),
            convs,
            bns,
            fc1: LinearConfig::new(self.last_channels() * 49, self.hidden).init(device),
            fc2: LinearConfig::new(self.hidden, self.hidden).init(device),
            fc3: LinearConfig::new(self.hidden, self.num_classes).init(device),
        }
    }

    /// `features.N` (torchvision's Sequential index) -> `convs.k` / `bns.k`.
    fn weight_names(&self) -> NameMap {
        let mut map = NameMap::default();
        let (mut index, mut k) = (0, 0);
        for layer in &self.layers {
            if layer.is_none() {
                index += 1;
                continue;
            }
            map.prefix(&format!("features.{index}"), &format!("convs.{k}"));
            if self.batch_norm {
                map.prefix(&format!("features.{}", index + 1), &format!("bns.{k}"));
                index += 3;
            } else {
                index += 2;
            }
            k += 1;
        }
        map.prefix("classifier.0", "fc1")
            .prefix("classifier.3", "fc2")
            .prefix("classifier.6", "fc3");
        map
    }
}

#[derive(Module, Debug)]
pub struct Vgg {
    /// `true` for a convolution, `false` for a max pool, in order.
    #[module(skip)]
    layers: Vec<bool>,
    convs: Vec<Conv2d>,
    /// One per convolution in the BN variants; empty without BatchNorm or once folded.
    bns: Vec<BatchNorm>,
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl ImageNetwork for Vgg {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input;
        let mut k = 0;
        for &is_conv in &self.layers {
            if !is_conv {
                x = max_pool(x, 2, 2, 0, false);
                continue;
            }
            x = self.convs[k].forward(x);
            if let Some(bn) = self.bns.get(k) {
                x = bn.forward(x);
            }
            x = Act::Relu.apply(x);
            k += 1;
        }
        x
    }

    /// fc2's activation: `relu(fc2(relu(fc1(flatten(avgpool7x7(map))))))`.
    fn features(&self, map: Tensor<4>) -> Tensor<2> {
        let x = flatten(adaptive_avg_pool2d(map, [7, 7]));
        let x = Act::Relu.apply(self.fc1.forward(x));
        Act::Relu.apply(self.fc2.forward(x))
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        Some(self.fc3.forward(self.features(map)))
    }
}

impl CpuPlan for Vgg {
    fn cpu_plan(&self) -> Option<Plan> {
        if !self.bns.is_empty() {
            return None;
        }
        let mut convs = self.convs.iter();
        let mut ops = Vec::new();
        for &is_conv in &self.layers {
            ops.push(if is_conv {
                Op::Conv(Conv::from_burn(convs.next()?, Some(Act::Relu))?)
            } else {
                Op::max_pool(2, 2, 0, false)
            });
        }
        Some(Plan::new(ops))
    }
}

impl FoldBatchNorms for Vgg {
    fn fold_batch_norms(mut self) -> Self {
        let bns = std::mem::take(&mut self.bns);
        for (conv, bn) in self.convs.iter_mut().zip(bns) {
            fold_into(conv, &mut Some(bn));
        }
        self
    }
}
