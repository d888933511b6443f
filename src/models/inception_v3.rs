//! Inception v3 (torchvision layout: `Conv2d_1a_3x3`, `Mixed_5b` .. `Mixed_7c`, `AuxLogits`, `fc`;
//! renamed to snake case on load). Every convolution is a `BasicConv2d`: conv without bias,
//! BatchNorm eps 1e-3, ReLU. Input 299x299. torchvision's pretrained weights expect
//! `transform_input`, which is the same as normalising with mean = std = 127.5 (see the manifest);
//! the network itself applies no input transform. The auxiliary classifier is loaded (so
//! checkpoints match) but only runs in training, so it is never called.

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear, LinearConfig};
use burn::prelude::*;

use super::cpu::{Conv, CpuPlan, Op, Plan};
use super::layers::{
    Act, ConvSpec, FoldBatchNorms, NameMap, avg_pool, batch_norm, bn_forward, fold_into,
    global_average_pool, max_pool,
};
use super::{Architecture, ImageNetwork};

const BN_EPS: f64 = 1e-3;

#[derive(Debug, Clone, PartialEq)]
pub struct InceptionV3Config {
    /// Every width is divided by this (1 for the real network; 8 for small test networks).
    pub width_divisor: usize,
    pub num_classes: usize,
    pub aux_logits: bool,
}

impl InceptionV3Config {
    pub fn inception_v3() -> Self {
        InceptionV3Config {
            width_divisor: 1,
            num_classes: 1000,
            aux_logits: true,
        }
    }

    pub fn narrow(mut self, divisor: usize) -> Self {
        self.width_divisor = divisor;
        self
    }

    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn feature_dim(&self) -> usize {
        2048 / self.width_divisor
    }
}

impl Architecture for InceptionV3Config {
    type Network = InceptionV3;

    fn init(&self, device: &Device) -> InceptionV3 {
        let n = Narrow {
            d: self.width_divisor,
            device,
        };
        InceptionV3 {
            conv2d_1a_3x3: n.basic(3, 32, [3, 3], 2, [0, 0]),
            conv2d_2a_3x3: n.basic(32, 32, [3, 3], 1, [0, 0]),
            conv2d_2b_3x3: n.basic(32, 64, [3, 3], 1, [1, 1]),
            conv2d_3b_1x1: n.basic(64, 80, [1, 1], 1, [0, 0]),
            conv2d_4a_3x3: n.basic(80, 192, [3, 3], 1, [0, 0]),
            mixed_5b: n.inception_a(192, 32),
            mixed_5c: n.inception_a(256, 64),
            mixed_5d: n.inception_a(288, 64),
            mixed_6a: n.inception_b(288),
            mixed_6b: n.inception_c(768, 128),
            mixed_6c: n.inception_c(768, 160),
            mixed_6d: n.inception_c(768, 160),
            mixed_6e: n.inception_c(768, 192),
            aux_logits: self.aux_logits.then(|| InceptionAux {
                conv0: n.basic(768, 128, [1, 1], 1, [0, 0]),
                conv1: n.basic(128, 768, [5, 5], 1, [0, 0]),
                fc: LinearConfig::new(768 / n.d, self.num_classes).init(device),
            }),
            mixed_7a: n.inception_d(768),
            mixed_7b: n.inception_e(1280),
            mixed_7c: n.inception_e(2048),
            fc: LinearConfig::new(self.feature_dim(), self.num_classes).init(device),
        }
    }

    /// torchvision's CamelCase module names -> this crate's snake-case fields.
    fn weight_names(&self) -> NameMap {
        let mut map = NameMap::default();
        map.pattern("^Conv2d_", "conv2d_")
            .pattern("^Mixed_", "mixed_")
            .pattern(r"^AuxLogits\.", "aux_logits.");
        map
    }
}

/// Builds layers with every channel count divided by `d` (3 input channels stay).
struct Narrow<'a> {
    d: usize,
    device: &'a Device,
}

impl Narrow<'_> {
    fn basic(
        &self,
        input: usize,
        output: usize,
        kernel: [usize; 2],
        stride: usize,
        padding: [usize; 2],
    ) -> BasicConv2d {
        let input = if input == 3 { 3 } else { input / self.d };
        let output = output / self.d;
        BasicConv2d {
            conv: ConvSpec::new(input, output, 1)
                .kernel(kernel)
                .stride(stride)
                .padding(padding)
                .init(self.device),
            bn: Some(batch_norm(output, BN_EPS, self.device)),
        }
    }

    fn one(&self, input: usize, output: usize) -> BasicConv2d {
        self.basic(input, output, [1, 1], 1, [0, 0])
    }

    fn inception_a(&self, input: usize, pool_features: usize) -> InceptionA {
        InceptionA {
            branch1x1: self.one(input, 64),
            branch5x5_1: self.one(input, 48),
            branch5x5_2: self.basic(48, 64, [5, 5], 1, [2, 2]),
            branch3x3dbl_1: self.one(input, 64),
            branch3x3dbl_2: self.basic(64, 96, [3, 3], 1, [1, 1]),
            branch3x3dbl_3: self.basic(96, 96, [3, 3], 1, [1, 1]),
            branch_pool: self.one(input, pool_features),
        }
    }

    fn inception_b(&self, input: usize) -> InceptionB {
        InceptionB {
            branch3x3: self.basic(input, 384, [3, 3], 2, [0, 0]),
            branch3x3dbl_1: self.one(input, 64),
            branch3x3dbl_2: self.basic(64, 96, [3, 3], 1, [1, 1]),
            branch3x3dbl_3: self.basic(96, 96, [3, 3], 2, [0, 0]),
        }
    }

    fn inception_c(&self, input: usize, c7: usize) -> InceptionC {
        let row = |i, o| self.basic(i, o, [1, 7], 1, [0, 3]);
        let col = |i, o| self.basic(i, o, [7, 1], 1, [3, 0]);
        InceptionC {
            branch1x1: self.one(input, 192),
            branch7x7_1: self.one(input, c7),
            branch7x7_2: row(c7, c7),
            branch7x7_3: col(c7, 192),
            branch7x7dbl_1: self.one(input, c7),
            branch7x7dbl_2: col(c7, c7),
            branch7x7dbl_3: row(c7, c7),
            branch7x7dbl_4: col(c7, c7),
            branch7x7dbl_5: row(c7, 192),
            branch_pool: self.one(input, 192),
        }
    }

    fn inception_d(&self, input: usize) -> InceptionD {
        InceptionD {
            branch3x3_1: self.one(input, 192),
            branch3x3_2: self.basic(192, 320, [3, 3], 2, [0, 0]),
            branch7x7x3_1: self.one(input, 192),
            branch7x7x3_2: self.basic(192, 192, [1, 7], 1, [0, 3]),
            branch7x7x3_3: self.basic(192, 192, [7, 1], 1, [3, 0]),
            branch7x7x3_4: self.basic(192, 192, [3, 3], 2, [0, 0]),
        }
    }

    fn inception_e(&self, input: usize) -> InceptionE {
        InceptionE {
            branch1x1: self.one(input, 320),
            branch3x3_1: self.one(input, 384),
            branch3x3_2a: self.basic(384, 384, [1, 3], 1, [0, 1]),
            branch3x3_2b: self.basic(384, 384, [3, 1], 1, [1, 0]),
            branch3x3dbl_1: self.one(input, 448),
            branch3x3dbl_2: self.basic(448, 384, [3, 3], 1, [1, 1]),
            branch3x3dbl_3a: self.basic(384, 384, [1, 3], 1, [0, 1]),
            branch3x3dbl_3b: self.basic(384, 384, [3, 1], 1, [1, 0]),
            branch_pool: self.one(input, 192),
        }
    }
}

/// Convolution (no bias) + BatchNorm + ReLU.
#[derive(Module, Debug)]
pub struct BasicConv2d {
    conv: Conv2d,
    bn: Option<BatchNorm>,
}

impl BasicConv2d {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Act::Relu.apply(bn_forward(&self.bn, self.conv.forward(x)))
    }

    fn fold(&mut self) {
        fold_into(&mut self.conv, &mut self.bn);
    }

    /// The folded convolution with its ReLU, as a plan step.
    fn op(&self) -> Option<Op> {
        if self.bn.is_some() {
            return None;
        }
        Conv::from_burn(&self.conv, Some(Act::Relu)).map(Op::Conv)
    }
}

/// A chain of `BasicConv2d`s as plan steps.
fn chain(convs: &[&BasicConv2d]) -> Option<Vec<Op>> {
    convs.iter().map(|c| c.op()).collect()
}

impl InceptionA {
    fn op(&self) -> Option<Op> {
        Some(Op::Concat(vec![
            chain(&[&self.branch1x1])?,
            chain(&[&self.branch5x5_1, &self.branch5x5_2])?,
            chain(&[
                &self.branch3x3dbl_1,
                &self.branch3x3dbl_2,
                &self.branch3x3dbl_3,
            ])?,
            vec![Op::avg_pool(3, 1, 1), self.branch_pool.op()?],
        ]))
    }
}

impl InceptionB {
    fn op(&self) -> Option<Op> {
        Some(Op::Concat(vec![
            chain(&[&self.branch3x3])?,
            chain(&[
                &self.branch3x3dbl_1,
                &self.branch3x3dbl_2,
                &self.branch3x3dbl_3,
            ])?,
            vec![Op::max_pool(3, 2, 0, false)],
        ]))
    }
}

impl InceptionC {
    fn op(&self) -> Option<Op> {
        Some(Op::Concat(vec![
            chain(&[&self.branch1x1])?,
            chain(&[&self.branch7x7_1, &self.branch7x7_2, &self.branch7x7_3])?,
            chain(&[
                &self.branch7x7dbl_1,
                &self.branch7x7dbl_2,
                &self.branch7x7dbl_3,
                &self.branch7x7dbl_4,
                &self.branch7x7dbl_5,
            ])?,
            vec![Op::avg_pool(3, 1, 1), self.branch_pool.op()?],
        ]))
    }
}

impl InceptionD {
    fn op(&self) -> Option<Op> {
        Some(Op::Concat(vec![
            chain(&[&self.branch3x3_1, &self.branch3x3_2])?,
            chain(&[
                &self.branch7x7x3_1,
                &self.branch7x7x3_2,
                &self.branch7x7x3_3,
                &self.branch7x7x3_4,
            ])?,
            vec![Op::max_pool(3, 2, 0, false)],
        ]))
    }
}

impl InceptionE {
    fn op(&self) -> Option<Op> {
        let split =
            |a: &BasicConv2d, b: &BasicConv2d| Some(Op::Concat(vec![vec![a.op()?], vec![b.op()?]]));
        Some(Op::Concat(vec![
            chain(&[&self.branch1x1])?,
            vec![
                self.branch3x3_1.op()?,
                split(&self.branch3x3_2a, &self.branch3x3_2b)?,
            ],
            vec![
                self.branch3x3dbl_1.op()?,
                self.branch3x3dbl_2.op()?,
                split(&self.branch3x3dbl_3a, &self.branch3x3dbl_3b)?,
            ],
            vec![Op::avg_pool(3, 1, 1), self.branch_pool.op()?],
        ]))
    }
}

impl CpuPlan for InceptionV3 {
    fn cpu_plan(&self) -> Option<Plan> {
        let mut ops = chain(&[
            &self.conv2d_1a_3x3,
            &self.conv2d_2a_3x3,
            &self.conv2d_2b_3x3,
        ])?;
        ops.push(Op::max_pool(3, 2, 0, false));
        ops.extend(chain(&[&self.conv2d_3b_1x1, &self.conv2d_4a_3x3])?);
        ops.push(Op::max_pool(3, 2, 0, false));
        for block in [&self.mixed_5b, &self.mixed_5c, &self.mixed_5d] {
            ops.push(block.op()?);
        }
        ops.push(self.mixed_6a.op()?);
        for block in [
            &self.mixed_6b,
            &self.mixed_6c,
            &self.mixed_6d,
            &self.mixed_6e,
        ] {
            ops.push(block.op()?);
        }
        ops.push(self.mixed_7a.op()?);
        ops.push(self.mixed_7b.op()?);
        ops.push(self.mixed_7c.op()?);
        Some(Plan::new(ops))
    }
}

/// `fold()` on each listed `BasicConv2d` field of a block.
macro_rules! fold_fields {
    ($($block:ty: $($field:ident),+;)+) => {
        $(impl $block {
            fn fold(&mut self) {
                $(self.$field.fold();)+
            }
        })+
    };
}

fold_fields! {
    InceptionA: branch1x1, branch5x5_1, branch5x5_2, branch3x3dbl_1, branch3x3dbl_2,
        branch3x3dbl_3, branch_pool;
    InceptionB: branch3x3, branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3;
    InceptionC: branch1x1, branch7x7_1, branch7x7_2, branch7x7_3, branch7x7dbl_1,
        branch7x7dbl_2, branch7x7dbl_3, branch7x7dbl_4, branch7x7dbl_5, branch_pool;
    InceptionD: branch3x3_1, branch3x3_2, branch7x7x3_1, branch7x7x3_2, branch7x7x3_3,
        branch7x7x3_4;
    InceptionE: branch1x1, branch3x3_1, branch3x3_2a, branch3x3_2b, branch3x3dbl_1,
        branch3x3dbl_2, branch3x3dbl_3a, branch3x3dbl_3b, branch_pool;
    InceptionV3: conv2d_1a_3x3, conv2d_2a_3x3, conv2d_2b_3x3, conv2d_3b_1x1, conv2d_4a_3x3,
        mixed_5b, mixed_5c, mixed_5d, mixed_6a, mixed_6b, mixed_6c, mixed_6d, mixed_6e, mixed_7a,
        mixed_7b, mixed_7c;
}

/// The auxiliary classifier is dropped: it only runs in training.
impl FoldBatchNorms for InceptionV3 {
    fn fold_batch_norms(mut self) -> Self {
        self.fold();
        self.aux_logits = None;
        self
    }
}

fn cat(parts: Vec<Tensor<4>>) -> Tensor<4> {
    Tensor::cat(parts, 1)
}

#[derive(Module, Debug)]
pub struct InceptionA {
    branch1x1: BasicConv2d,
    branch5x5_1: BasicConv2d,
    branch5x5_2: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionA {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self
            .branch5x5_2
            .forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_3.forward(
            self.branch3x3dbl_2
                .forward(self.branch3x3dbl_1.forward(x.clone())),
        );
        let bp = self.branch_pool.forward(avg_pool(x, 3, 1, 1));
        cat(vec![b1, b5, b3, bp])
    }
}

#[derive(Module, Debug)]
pub struct InceptionB {
    branch3x3: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
}

impl InceptionB {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(
            self.branch3x3dbl_2
                .forward(self.branch3x3dbl_1.forward(x.clone())),
        );
        cat(vec![b3, bd, max_pool(x, 3, 2, 0, false)])
    }
}

#[derive(Module, Debug)]
pub struct InceptionC {
    branch1x1: BasicConv2d,
    branch7x7_1: BasicConv2d,
    branch7x7_2: BasicConv2d,
    branch7x7_3: BasicConv2d,
    branch7x7dbl_1: BasicConv2d,
    branch7x7dbl_2: BasicConv2d,
    branch7x7dbl_3: BasicConv2d,
    branch7x7dbl_4: BasicConv2d,
    branch7x7dbl_5: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionC {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let mut b7 = self.branch7x7_1.forward(x.clone());
        for conv in [&self.branch7x7_2, &self.branch7x7_3] {
            b7 = conv.forward(b7);
        }
        let mut bd = self.branch7x7dbl_1.forward(x.clone());
        for conv in [
            &self.branch7x7dbl_2,
            &self.branch7x7dbl_3,
            &self.branch7x7dbl_4,
            &self.branch7x7dbl_5,
        ] {
            bd = conv.forward(bd);
        }
        let bp = self.branch_pool.forward(avg_pool(x, 3, 1, 1));
        cat(vec![b1, b7, bd, bp])
    }
}

#[derive(Module, Debug)]
pub struct InceptionD {
    branch3x3_1: BasicConv2d,
    branch3x3_2: BasicConv2d,
    branch7x7x3_1: BasicConv2d,
    branch7x7x3_2: BasicConv2d,
    branch7x7x3_3: BasicConv2d,
    branch7x7x3_4: BasicConv2d,
}

impl InceptionD {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b3 = self
            .branch3x3_2
            .forward(self.branch3x3_1.forward(x.clone()));
        let mut b7 = self.branch7x7x3_1.forward(x.clone());
        for conv in [
            &self.branch7x7x3_2,
            &self.branch7x7x3_3,
            &self.branch7x7x3_4,
        ] {
            b7 = conv.forward(b7);
        }
        cat(vec![b3, b7, max_pool(x, 3, 2, 0, false)])
    }
}

#[derive(Module, Debug)]
pub struct InceptionE {
    branch1x1: BasicConv2d,
    branch3x3_1: BasicConv2d,
    branch3x3_2a: BasicConv2d,
    branch3x3_2b: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3a: BasicConv2d,
    branch3x3dbl_3b: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionE {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b3 = self.branch3x3_1.forward(x.clone());
        let b3 = cat(vec![
            self.branch3x3_2a.forward(b3.clone()),
            self.branch3x3_2b.forward(b3),
        ]);
        let bd = self
            .branch3x3dbl_2
            .forward(self.branch3x3dbl_1.forward(x.clone()));
        let bd = cat(vec![
            self.branch3x3dbl_3a.forward(bd.clone()),
            self.branch3x3dbl_3b.forward(bd),
        ]);
        let bp = self.branch_pool.forward(avg_pool(x, 3, 1, 1));
        cat(vec![b1, b3, bd, bp])
    }
}

/// The training-time auxiliary classifier: kept so checkpoints load, never run.
#[derive(Module, Debug)]
pub struct InceptionAux {
    conv0: BasicConv2d,
    conv1: BasicConv2d,
    fc: Linear,
}

#[derive(Module, Debug)]
pub struct InceptionV3 {
    conv2d_1a_3x3: BasicConv2d,
    conv2d_2a_3x3: BasicConv2d,
    conv2d_2b_3x3: BasicConv2d,
    conv2d_3b_1x1: BasicConv2d,
    conv2d_4a_3x3: BasicConv2d,
    mixed_5b: InceptionA,
    mixed_5c: InceptionA,
    mixed_5d: InceptionA,
    mixed_6a: InceptionB,
    mixed_6b: InceptionC,
    mixed_6c: InceptionC,
    mixed_6d: InceptionC,
    mixed_6e: InceptionC,
    aux_logits: Option<InceptionAux>,
    mixed_7a: InceptionD,
    mixed_7b: InceptionE,
    mixed_7c: InceptionE,
    fc: Linear,
}

impl ImageNetwork for InceptionV3 {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv2d_1a_3x3.forward(input);
        x = self.conv2d_2a_3x3.forward(x);
        x = self.conv2d_2b_3x3.forward(x);
        x = max_pool(x, 3, 2, 0, false);
        x = self.conv2d_3b_1x1.forward(x);
        x = self.conv2d_4a_3x3.forward(x);
        x = max_pool(x, 3, 2, 0, false);
        for block in [&self.mixed_5b, &self.mixed_5c, &self.mixed_5d] {
            x = block.forward(x);
        }
        x = self.mixed_6a.forward(x);
        for block in [
            &self.mixed_6b,
            &self.mixed_6c,
            &self.mixed_6d,
            &self.mixed_6e,
        ] {
            x = block.forward(x);
        }
        x = self.mixed_7a.forward(x);
        x = self.mixed_7b.forward(x);
        self.mixed_7c.forward(x)
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        Some(self.fc.forward(global_average_pool(map)))
    }
}
