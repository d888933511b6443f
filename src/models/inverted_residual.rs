//! The MobileNet / EfficientNet family: the inverted-residual block, the stem -> blocks -> head
//! body, and the one network (body + linear classifier) that MobileNetV2, EfficientNet-B0 and
//! EfficientNet-Lite all are, built from their own tables.

use burn::nn::Linear;
use burn::prelude::*;

use super::ImageNetwork;
use super::cpu::{Conv, CpuPlan, Op, Plan, SqueezeExcite};
use super::layers::{Act, ConvBn, FoldBatchNorms, SqueezeExcitation, global_average_pool};

/// The MobileNet / EfficientNet inverted-residual block: [1x1 expand + act] -> depthwise kxk +
/// act -> [squeeze-excite] -> 1x1 project (linear) [+ input].
#[derive(Module, Debug)]
pub struct InvertedResidual {
    pub expand: Option<ConvBn>,
    pub depthwise: ConvBn,
    pub se: Option<SqueezeExcitation>,
    pub project: ConvBn,
    pub residual: bool,
    #[module(skip)]
    pub act: Act,
    /// Squeeze-excite activation and gate.
    #[module(skip)]
    pub se_acts: (Act, Act),
}

impl InvertedResidual {
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let Some(expand) = &self.expand {
            x = self.act.apply(expand.forward(x));
        }
        x = self.act.apply(self.depthwise.forward(x));
        if let Some(se) = &self.se {
            x = se.forward(x, self.se_acts.0, self.se_acts.1);
        }
        x = self.project.forward(x);
        if self.residual { x + input } else { x }
    }

    /// The block as plan steps: one residual step, or its convolutions in sequence.
    pub fn cpu_ops(&self) -> Option<Vec<Op>> {
        let mut body = Vec::new();
        if let Some(expand) = &self.expand {
            body.push(Op::Conv(Conv::from_conv_bn(expand, Some(self.act))?));
        }
        body.push(Op::Conv(Conv::from_conv_bn(
            &self.depthwise,
            Some(self.act),
        )?));
        if let Some(se) = &self.se {
            let (act, gate) = self.se_acts;
            body.push(Op::SqueezeExcite(SqueezeExcite::from_burn(se, act, gate)?));
        }
        body.push(Op::Conv(Conv::from_conv_bn(&self.project, None)?));
        if self.residual {
            Some(vec![Op::residual(Vec::new(), body)?])
        } else {
            Some(body)
        }
    }
}

/// stem -> inverted residuals -> 1x1 head, each conv + BatchNorm, as the MobileNets and
/// EfficientNet-B0 are built (`act` after the stem and the head).
#[derive(Module, Debug)]
pub struct InvertedResidualBody {
    pub stem: ConvBn,
    pub blocks: Vec<InvertedResidual>,
    pub head: ConvBn,
    #[module(skip)]
    pub act: Act,
}

impl InvertedResidualBody {
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = self.act.apply(self.stem.forward(input));
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.act.apply(self.head.forward(x))
    }

    pub fn cpu_plan(&self) -> Option<Plan> {
        let mut ops = vec![Op::Conv(Conv::from_conv_bn(&self.stem, Some(self.act))?)];
        for block in &self.blocks {
            ops.extend(block.cpu_ops()?);
        }
        ops.push(Op::Conv(Conv::from_conv_bn(&self.head, Some(self.act))?));
        Some(Plan::new(ops))
    }

    pub fn fold(&mut self) {
        self.stem.fold();
        self.head.fold();
        for b in &mut self.blocks {
            if let Some(expand) = &mut b.expand {
                expand.fold();
            }
            b.depthwise.fold();
            b.project.fold();
        }
    }
}

/// An [`InvertedResidualBody`] and a linear classifier on its pooled features (`classifier`).
#[derive(Module, Debug)]
pub struct InvertedResidualNet {
    pub body: InvertedResidualBody,
    pub classifier: Linear,
}

impl ImageNetwork for InvertedResidualNet {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        self.body.forward(input)
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        Some(self.classifier.forward(global_average_pool(map)))
    }
}

impl CpuPlan for InvertedResidualNet {
    fn cpu_plan(&self) -> Option<Plan> {
        self.body.cpu_plan()
    }
}

impl FoldBatchNorms for InvertedResidualNet {
    fn fold_batch_norms(mut self) -> Self {
        self.body.fold();
        self
    }
}

/// The part of an [`InvertedResidualNet`] that `DeepImageClassifier` trains: its last blocks
/// (the 1x1 head conv counting as the last one) and a new classifier, over the activations of
/// the frozen trunk below them. BatchNorms are folded (frozen statistics, as in fine-tuning
/// with the network in eval mode): each trained conv has a weight and a bias.
#[derive(Module, Debug)]
pub struct InvertedResidualTop {
    pub blocks: Vec<InvertedResidual>,
    pub head: Option<ConvBn>,
    pub classifier: Linear,
    #[module(skip)]
    pub act: Act,
}

impl InvertedResidualTop {
    /// Class logits from the trunk's activations at the cut (`[N, C, h, w]`; with no trained
    /// block, the pooled features as `[N, C, 1, 1]`).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.classifier.forward(self.features(x))
    }

    /// The pooled features the classifier reads.
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = x;
        for block in &self.blocks {
            x = block.forward(x);
        }
        if let Some(head) = &self.head {
            x = self.act.apply(head.forward(x));
        }
        global_average_pool(x)
    }
}

impl InvertedResidualNet {
    /// How many blocks can train: every inverted residual, then the head conv.
    pub fn trainable_blocks(&self) -> usize {
        self.body.blocks.len() + 1
    }

    /// The frozen trunk below the last `k` trainable blocks, as a CPU plan of the folded
    /// network: the whole body when `k = 0` (its map is then pooled), else the stem and the
    /// inverted residuals before the cut. `None` if `k` is too large or a layer has no plan.
    pub fn trunk_plan(&self, k: usize) -> Option<Plan> {
        if k == 0 {
            return self.body.cpu_plan();
        }
        let keep = self.trainable_blocks().checked_sub(k)?;
        let body = &self.body;
        let mut ops = vec![Op::Conv(Conv::from_conv_bn(&body.stem, Some(body.act))?)];
        for block in &body.blocks[..keep] {
            ops.extend(block.cpu_ops()?);
        }
        Some(Plan::new(ops))
    }

    /// The last `k` trainable blocks (copies) with `classifier` on top.
    pub fn top(&self, k: usize, classifier: Linear) -> Option<InvertedResidualTop> {
        let keep = self.trainable_blocks().checked_sub(k)?;
        let blocks = if k == 0 {
            Vec::new()
        } else {
            self.body.blocks[keep..].to_vec()
        };
        Some(InvertedResidualTop {
            blocks,
            head: (k > 0).then(|| self.body.head.clone()),
            classifier,
            act: self.body.act,
        })
    }

    /// This network with its last blocks, head and classifier replaced by `top`'s: the
    /// fine-tuned network, which runs (and plans) like any other.
    pub fn with_top(mut self, top: InvertedResidualTop) -> InvertedResidualNet {
        let keep = self.body.blocks.len().saturating_sub(top.blocks.len());
        self.body.blocks.truncate(keep);
        self.body.blocks.extend(top.blocks);
        if let Some(head) = top.head {
            self.body.head = head;
        }
        self.classifier = top.classifier;
        self
    }
}
