//! Training a network's top on cached trunk activations: what [`crate::DeepImageClassifier`]
//! runs once the frozen trunk has run over the training images.
//!
//! Mini-batch SGD with momentum or AdamW (PyTorch's update rules) on the cross-entropy, the
//! learning rate warmed up linearly over the first epoch then annealed to 0 by a cosine, on
//! burn's autodiff over the CPU backend; seeded initialisation, shuffles and view choice, so a fit is reproducible;
//! one [`EpochStats`] per epoch, and early stopping on a validation split (the best epoch's
//! weights are kept).

use std::sync::Arc;
use std::time::Instant;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::inverted_residual::InvertedResidualTop;
use crate::models::load_safetensors_bytes;

/// Training examples: the trunk's activations at the cut (`views` per example, each of `dims`
/// `[C, h, w]`; view 0 is the image, view 1 its mirror when augmenting) and class labels. Rows
/// are shared with the trunk cache, or read from a spill file, never copied.
#[derive(Debug, Clone, Default)]
pub struct Examples {
    pub dims: [usize; 3],
    pub views: usize,
    rows: Vec<Stored>,
    pub labels: Vec<usize>,
}

/// Where an example's activations are.
#[derive(Debug, Clone)]
enum Stored {
    /// Shared with the trunk cache.
    Shared(Arc<[f32]>),
    /// Row `.1` of a spill file.
    Spilled(Arc<SpillFile>, usize),
}

/// A file of activation rows (little-endian f32), memory-mapped: the fit reads it through the
/// page cache, so the process's memory stays bounded however many rows it holds.
#[derive(Debug)]
struct SpillFile {
    map: memmap2::Mmap,
}

impl SpillFile {
    fn floats(&self) -> &[f32] {
        let bytes: &[u8] = &self.map;
        // SAFETY: a mapping starts on a page boundary (aligned for f32), its length was checked
        // to be a multiple of 4, and every bit pattern is an f32.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) }
    }
}

impl Examples {
    pub fn new(dims: [usize; 3], views: usize) -> Self {
        Examples {
            dims,
            views,
            rows: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// The examples of a spill file: one row of `views * C * h * w` little-endian f32 per
    /// label, in order. The file must not change while the examples live.
    pub fn spilled(
        dims: [usize; 3],
        views: usize,
        path: &std::path::Path,
        labels: Vec<usize>,
    ) -> Result<Self> {
        let what = |e: String| Error::Fit(format!("activation spill file {}: {e}", path.display()));
        if cfg!(target_endian = "big") {
            return Err(what(
                "little-endian rows need a little-endian machine".into(),
            ));
        }
        let file = std::fs::File::open(path).map_err(|e| what(e.to_string()))?;
        let row = views * dims.iter().product::<usize>();
        let expected = (labels.len() * row * 4) as u64;
        let size = file.metadata().map_err(|e| what(e.to_string()))?.len();
        if size != expected {
            return Err(what(format!(
                "{size} bytes, expected {expected} ({} rows of {row} f32)",
                labels.len()
            )));
        }
        let rows = if labels.is_empty() {
            Vec::new()
        } else {
            // SAFETY: the spill file is the fit's own temporary file, not written while mapped.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| what(e.to_string()))?;
            let file = Arc::new(SpillFile { map });
            (0..labels.len())
                .map(|i| Stored::Spilled(Arc::clone(&file), i))
                .collect()
        };
        Ok(Examples {
            dims,
            views,
            rows,
            labels,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn view_len(&self) -> usize {
        self.dims.iter().product()
    }

    /// View `view` of example `i`.
    pub fn view(&self, i: usize, view: usize) -> &[f32] {
        let len = self.view_len();
        let row: &[f32] = match &self.rows[i] {
            Stored::Shared(row) => row,
            Stored::Spilled(file, at) => &file.floats()[at * len * self.views..],
        };
        &row[view * len..][..len]
    }

    /// Appends one example: all its views, `views * C * h * w` values.
    pub fn push(&mut self, views: Arc<[f32]>, label: usize) {
        self.rows.push(Stored::Shared(views));
        self.labels.push(label);
    }

    /// The examples at `rows`, in that order.
    pub fn subset(&self, rows: &[usize]) -> Examples {
        Examples {
            dims: self.dims,
            views: self.views,
            rows: rows.iter().map(|&i| self.rows[i].clone()).collect(),
            labels: rows.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// A batch of `(example, view)` pairs as a `[N, C, h, w]` tensor and its labels.
    fn batch(&self, picks: &[(usize, usize)], device: &Device) -> (Tensor<4>, Vec<usize>) {
        let mut values = Vec::with_capacity(picks.len() * self.view_len());
        for &(i, view) in picks {
            values.extend_from_slice(self.view(i, view));
        }
        let [c, h, w] = self.dims;
        let x = Tensor::from_data(TensorData::new(values, [picks.len(), c, h, w]), device);
        (x, picks.iter().map(|&(i, _)| self.labels[i]).collect())
    }
}

crate::params::choice! {
    /// `optimizer`: the update rule, as PyTorch's.
    #[derive(Default)]
    pub enum OptimizerKind {
        /// `torch.optim.SGD(momentum=0.9, weight_decay=wd)`: L2 added to the gradient.
        #[default]
        Sgd = "sgd",
        /// `torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)`: decoupled decay.
        AdamW = "adamw",
    }
}

/// The optimiser's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainSettings {
    pub optimizer: OptimizerKind,
    pub epochs: usize,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub weight_decay: f64,
    pub seed: u64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    pub label_smoothing: f64,
    /// Dropout probability on the pooled features during training.
    pub dropout: f64,
}

/// What one epoch did. `validation_*` are `None` without a validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EpochStats {
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's batches (the weights moving as they go).
    pub loss: f64,
    pub accuracy: f64,
    pub validation_loss: Option<f64>,
    pub validation_accuracy: Option<f64>,
    pub seconds: f64,
    /// Training examples per second of this epoch (validation included in the time).
    pub images_per_second: f64,
}

impl std::fmt::Display for EpochStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {}: loss {:.4}, accuracy {:.4}",
            self.epoch, self.loss, self.accuracy
        )?;
        if let (Some(loss), Some(accuracy)) = (self.validation_loss, self.validation_accuracy) {
            write!(
                f,
                ", validation loss {loss:.4}, validation accuracy {accuracy:.4}"
            )?;
        }
        write!(
            f,
            " ({:.1} s, {:.0} images/s)",
            self.seconds, self.images_per_second
        )
    }
}

/// A trained top, its history, and the epoch whose weights it has.
#[derive(Debug)]
pub struct Trained {
    pub top: InvertedResidualTop,
    pub history: Vec<EpochStats>,
    pub best_epoch: usize,
}

/// A seeded generator (SplitMix64): shuffles, view choices and initial weights.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }

    /// `0..n` in a random order (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, self.below(i + 1));
        }
        order
    }
}

/// A new `inputs -> classes` linear layer, initialised as PyTorch's `nn.Linear` (uniform in
/// +-1/sqrt(inputs)) from `rng`.
pub fn new_classifier(inputs: usize, classes: usize, rng: &mut SplitMix64) -> Linear {
    let bound = 1.0 / (inputs as f64).sqrt();
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let device = Device::flex();
    let mut linear = LinearConfig::new(inputs, classes).init(&device);
    // burn's Linear weight is [inputs, classes] (PyTorch's transposed).
    let weight = TensorData::new(draw(inputs * classes), [inputs, classes]);
    linear.weight = Param::from_tensor(Tensor::from_data(weight, &device));
    linear.bias = Some(Param::from_tensor(Tensor::from_data(
        TensorData::new(draw(classes), [classes]),
        &device,
    )));
    linear
}

/// Mean cross-entropy of `logits` against `labels`, with label smoothing `smoothing` (the
/// target puts `1 - smoothing` on the label and spreads `smoothing` over all classes, as
/// PyTorch's `label_smoothing`).
fn cross_entropy(logits: Tensor<2>, labels: &[usize], smoothing: f64) -> Tensor<1> {
    let [n, k] = logits.dims();
    let spread = (smoothing / k as f64) as f32;
    let mut target = vec![spread; n * k];
    for (row, &label) in labels.iter().enumerate() {
        target[row * k + label] += (1.0 - smoothing) as f32;
    }
    let target = Tensor::<2>::from_data(TensorData::new(target, [n, k]), &logits.device());
    (log_softmax(logits, 1) * target)
        .sum()
        .div_scalar(n as f64)
        .neg()
}

/// Correct predictions (argmax, first on ties) among `logits` rows.
fn correct(logits: &[f32], classes: usize, labels: &[usize]) -> usize {
    logits
        .chunks(classes)
        .zip(labels)
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            best.0 == **label
        })
        .count()
}

fn scalar(t: Tensor<1>) -> Result<f64> {
    let values = t
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::Model {
            model: "fine-tuning".into(),
            message: format!("reading the loss: {e:?}"),
        })?;
    Ok(values.first().copied().unwrap_or(f32::NAN) as f64)
}

fn floats<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data().try_to_vec::<f32>().map_err(|e| Error::Model {
        model: "fine-tuning".into(),
        message: format!("reading logits: {e:?}"),
    })
}

/// A top being trained: its weights on the autodiff device and the optimiser's state.
pub struct Trainer {
    top: InvertedResidualTop,
    optim: ModuleOptimizer,
    device: Device,
    label_smoothing: f64,
    /// Dropout on the pooled features, and the generator of its masks.
    dropout: f64,
    rng: SplitMix64,
}

impl Trainer {
    /// `optimizer` with weight decay `weight_decay` on every parameter, as PyTorch's: SGD with
    /// momentum 0.9 (no dampening, no Nesterov), or AdamW (betas 0.9, 0.999, eps 1e-8).
    pub fn new(top: InvertedResidualTop, optimizer: OptimizerKind, weight_decay: f64) -> Self {
        let device = Device::flex().autodiff();
        let optim = match optimizer {
            OptimizerKind::Sgd => SgdConfig::new()
                .with_momentum(Some(MomentumConfig {
                    momentum: 0.9,
                    dampening: 0.0,
                    nesterov: false,
                }))
                .with_weight_decay((weight_decay > 0.0).then_some(WeightDecayConfig {
                    penalty: weight_decay as f32,
                }))
                .init(),
            OptimizerKind::AdamW => AdamWConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.999)
                .with_epsilon(1e-8)
                .with_weight_decay(weight_decay as f32)
                .init(),
        };
        Trainer {
            top: top.fork(&device).train(),
            optim,
            device,
            label_smoothing: 0.0,
            dropout: 0.0,
            rng: SplitMix64::new(0),
        }
    }

    /// Label smoothing of the loss, and dropout (probability `dropout`, masks drawn from
    /// `seed`) on the pooled features before the classifier; both 0 by default.
    pub fn with_regularisation(mut self, label_smoothing: f64, dropout: f64, seed: u64) -> Self {
        self.label_smoothing = label_smoothing;
        self.dropout = dropout;
        self.rng = SplitMix64::new(seed);
        self
    }

    /// A dropout mask for `rows` x `width` features: 0, or `1 / (1 - p)` to keep the mean.
    fn dropout_mask(&mut self, rows: usize, width: usize) -> Tensor<2> {
        let keep = (1.0 / (1.0 - self.dropout)) as f32;
        let mask: Vec<f32> = (0..rows * width)
            .map(|_| {
                if self.rng.uniform() < self.dropout {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        Tensor::from_data(TensorData::new(mask, [rows, width]), &self.device)
    }

    /// One optimiser step of size `learning_rate` on a batch (`x`: `[N, C, h, w]`); returns the
    /// batch's mean loss before the step and its logits.
    pub fn step(
        &mut self,
        x: Tensor<4>,
        labels: &[usize],
        learning_rate: f64,
    ) -> Result<(f64, Vec<f32>)> {
        let x = x.to_device(&self.device);
        let mut features = self.top.features(x);
        if self.dropout > 0.0 {
            let [rows, width] = features.dims();
            features = features * self.dropout_mask(rows, width);
        }
        let logits = self.top.classifier.forward(features);
        let loss = cross_entropy(logits.clone(), labels, self.label_smoothing);
        let grads = loss.backward();
        let grads = GradientsParams::from_grads(grads, &self.top);
        let top = self.top.clone();
        self.top = self.optim.step(learning_rate, top, grads);
        Ok((scalar(loss.detach())?, floats(logits.detach())?))
    }

    /// The current weights, off the autodiff device.
    pub fn top(&self) -> InvertedResidualTop {
        self.top.valid().to_device(&Device::flex())
    }
}

/// The learning rate of step `step` (from 0) of `total`: a linear warm-up from `base / warmup`
/// to `base` over the first `warmup` steps, then `base` annealed to 0 by a cosine.
pub fn learning_rate_at(base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Loss and accuracy of `top` on `examples` (view 0), in batches.
pub fn evaluate(
    top: &InvertedResidualTop,
    examples: &Examples,
    batch_size: usize,
) -> Result<(f64, f64)> {
    let device = Device::flex();
    let (mut loss, mut right) = (0.0, 0);
    let rows: Vec<(usize, usize)> = (0..examples.len()).map(|i| (i, 0)).collect();
    for picks in rows.chunks(batch_size.max(1)) {
        let (x, labels) = examples.batch(picks, &device);
        let logits = top.forward(x);
        loss += scalar(cross_entropy(logits.clone(), &labels, 0.0))? * picks.len() as f64;
        let classes = logits.dims()[1];
        right += correct(&floats(logits)?, classes, &labels);
    }
    let n = examples.len().max(1) as f64;
    Ok((loss / n, right as f64 / n))
}

/// Trains `top` on `train` for up to `settings.epochs` epochs: each epoch visits every example
/// once, in a seeded order, with a seeded choice of its view. With `validation`, stops after
/// `patience` epochs without a lower validation loss and returns the best epoch's weights.
pub fn train(
    top: InvertedResidualTop,
    train: &Examples,
    validation: Option<&Examples>,
    settings: &TrainSettings,
    progress: &mut dyn FnMut(&EpochStats),
) -> Result<Trained> {
    let mut rng = SplitMix64::new(settings.seed);
    let mut trainer = Trainer::new(top, settings.optimizer, settings.weight_decay)
        .with_regularisation(
            settings.label_smoothing,
            settings.dropout,
            settings.seed ^ 0xD50F_0D0E,
        );
    let batch_size = settings.batch_size.max(1);
    let steps_per_epoch = train.len().div_ceil(batch_size);
    let total_steps = settings.epochs * steps_per_epoch;
    // One epoch of warm-up when there are several: full-size steps on a new head's random
    // gradients are what makes fine-tuning diverge.
    let warmup = if settings.epochs > 1 {
        steps_per_epoch
    } else {
        0
    };
    let mut step = 0;
    let mut history = Vec::new();
    let mut best: Option<(f64, usize, InvertedResidualTop)> = None;
    for epoch in 1..=settings.epochs {
        let started = Instant::now();
        let order = rng.permutation(train.len());
        let picks: Vec<(usize, usize)> = order
            .into_iter()
            .map(|i| (i, rng.below(train.views.max(1))))
            .collect();
        let (mut loss, mut right) = (0.0, 0);
        for batch in picks.chunks(batch_size) {
            let (x, labels) = train.batch(batch, &trainer.device);
            let learning_rate = learning_rate_at(settings.learning_rate, step, total_steps, warmup);
            step += 1;
            let (batch_loss, logits) = trainer.step(x, &labels, learning_rate)?;
            if !batch_loss.is_finite() {
                return Err(Error::Model {
                    model: "fine-tuning".into(),
                    message: format!(
                        "the loss became {batch_loss} in epoch {epoch}: lower learningRate"
                    ),
                });
            }
            loss += batch_loss * batch.len() as f64;
            right += correct(&logits, logits.len() / batch.len(), &labels);
        }
        let n = train.len().max(1) as f64;
        let evaluated = match validation {
            Some(v) if !v.is_empty() => {
                Some(evaluate(&trainer.top(), v, settings.batch_size.max(64))?)
            }
            _ => None,
        };
        let seconds = started.elapsed().as_secs_f64();
        let stats = EpochStats {
            epoch,
            loss: loss / n,
            accuracy: right as f64 / n,
            validation_loss: evaluated.map(|e| e.0),
            validation_accuracy: evaluated.map(|e| e.1),
            seconds,
            images_per_second: n / seconds.max(1e-9),
        };
        progress(&stats);
        history.push(stats);
        if let Some((validation_loss, _)) = evaluated {
            if best.as_ref().is_none_or(|b| validation_loss < b.0) {
                best = Some((validation_loss, epoch, trainer.top()));
            } else if best
                .as_ref()
                .is_some_and(|b| epoch - b.1 >= settings.patience)
            {
                break;
            }
        }
    }
    Ok(match best {
        Some((_, best_epoch, top)) => Trained {
            top,
            history,
            best_epoch,
        },
        None => Trained {
            top: trainer.top(),
            best_epoch: history.len(),
            history,
        },
    })
}

/// The top's weights as safetensors in PyTorch's layout (linear weights `[out, in]`), named by
/// module path (`blocks.0.expand.conv.weight`, `head.conv.bias`, `classifier.weight`, ...).
pub fn save_top(top: &InvertedResidualTop) -> Result<Vec<u8>> {
    let failed = |e: String| Error::Persistence(format!("saving the trained top: {e}"));
    let mut store = SafetensorsStore::from_bytes(None).with_to_adapter(BurnToPyTorchAdapter);
    top.save_into(&mut store)
        .map_err(|e| failed(e.to_string()))?;
    store.get_bytes().map_err(|e| failed(e.to_string()))
}

/// Loads weights written by [`save_top`] into `top` (which must have the same structure);
/// missing, unexpected or mis-shaped tensors are an error naming them.
pub fn load_top(
    top: &mut InvertedResidualTop,
    bytes: Vec<u8>,
    what: &str,
    model: &str,
) -> Result<()> {
    load_safetensors_bytes::<_, &str, &str>(top, bytes, what, &[], model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_anneals_to_zero() {
        let lr = |step| learning_rate_at(0.1, step, 100, 10);
        assert!((lr(0) - 0.01).abs() < 1e-12);
        assert!((lr(9) - 0.1).abs() < 1e-12);
        assert!((lr(10) - 0.1).abs() < 1e-12);
        assert!((lr(55) - 0.05).abs() < 1e-12);
        assert!(lr(99) > 0.0 && lr(99) < 1e-3);
        assert!((1..100).all(|s| s <= 10 || lr(s) <= lr(s - 1)));
        // No warm-up: the cosine from the first step.
        assert!((learning_rate_at(0.1, 0, 100, 0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn seeded_permutations_are_permutations_and_repeat() {
        let a = SplitMix64::new(5).permutation(50);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, SplitMix64::new(5).permutation(50));
        assert_ne!(a, SplitMix64::new(6).permutation(50));
    }
}
