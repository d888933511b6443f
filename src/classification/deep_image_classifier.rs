//! [`DeepImageClassifier`] (Estimator) and [`DeepImageClassifierModel`] (Transformer):
//! fine-tuning. The network's last `trainableBlocks` blocks train with a new classifier head on
//! the images' labels; the blocks below stay frozen.
//!
//! Fast by construction: the frozen trunk runs once per image, and its activations at the cut
//! are cached in the estimator ([`TrunkCache`]), keyed by the image's network input. The top
//! then trains for many epochs on the cache (`crate::fine_tune`), and tuning copies of the
//! estimator (folds, param maps) share the cache: an image goes through the trunk once however
//! many fits see it. The fitted model is the whole network again, with the trained blocks
//! spliced in: it runs (and plans on the CPU) like any built-in model, and adds Spark's
//! `rawPrediction`, `probability` and `prediction` columns, like `LogisticRegressionModel`.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use burn::prelude::*;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float64Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, UInt64Type};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{DataFrame, ident};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::logistic_math::{argmax, softmax};
use super::trunk_cache::{Trunk, TrunkCache, TrunkKey, TrunkOutput, TrunkPass, too_many_blocks};
use crate::columns::require_column;
use crate::error::{Error, Result};
use crate::fine_tune::{
    EpochStats, Examples, OptimizerKind, SplitMix64, TrainSettings, Trained, load_top,
    new_classifier, save_top, train,
};
use crate::models::cpu::inference_network;
use crate::models::inverted_residual::{InvertedResidualNet, InvertedResidualTop};
use crate::models::{ImageNetwork, LoadedModel, device, load_trainable, model_error};
use crate::network_stage::{
    NetworkMetrics, NetworkOutput, NetworkParams, NetworkStage, network_setters,
};
use crate::params::{
    AnyParams, ParamMap, Params, Rejected, check, choice_setters, new_uid, setters, string_setters,
};
use crate::persistence::SavedStage;
use crate::registry::{LoadedStage, PersistedStage, StageRegistry};
use crate::stage::{ClassifierColumns, Estimator, Transformer};

/// Params of [`DeepImageClassifier`] and its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeepImageClassifierParams {
    /// `inputCol`, `modelName`, `batchSize`, `device`, ... (saved flat, as Spark names).
    /// `batchSize` is also the images per optimiser step; `device` is where the fitted model
    /// runs (fitting runs on the CPU).
    #[serde(flatten)]
    pub network: NetworkParams,
    pub label_col: String,
    pub prediction_col: String,
    pub probability_col: String,
    pub raw_prediction_col: String,
    pub optimizer: OptimizerKind,
    /// How many of the network's last blocks train (the 1x1 head conv is the last block);
    /// 0 = the new classifier only.
    pub trainable_blocks: usize,
    pub epochs: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Share of the training rows held out to pick the best epoch and stop early; 0 = none.
    pub validation_fraction: f64,
    /// Epochs without a lower validation loss before stopping.
    pub patience: usize,
    /// Train on each image and its mirror image (a second cached view).
    pub horizontal_flip: bool,
    /// Share of the target spread over all classes (PyTorch's `label_smoothing`).
    pub label_smoothing: f64,
    /// Dropout probability on the pooled features before the classifier, while training.
    pub dropout: f64,
    #[serde(skip)]
    #[doc(hidden)]
    pub rejected: Rejected,
}

impl Default for DeepImageClassifierParams {
    fn default() -> Self {
        DeepImageClassifierParams {
            network: NetworkParams::default(),
            label_col: "label".into(),
            prediction_col: "prediction".into(),
            probability_col: "probability".into(),
            raw_prediction_col: "rawPrediction".into(),
            optimizer: OptimizerKind::Sgd,
            trainable_blocks: 2,
            epochs: 20,
            learning_rate: 0.02,
            weight_decay: 1e-4,
            seed: 0,
            validation_fraction: 0.0,
            patience: 3,
            horizontal_flip: true,
            label_smoothing: 0.0,
            dropout: 0.0,
            rejected: Rejected::default(),
        }
    }
}

impl AsRef<NetworkParams> for DeepImageClassifierParams {
    fn as_ref(&self) -> &NetworkParams {
        &self.network
    }
}

impl AsMut<NetworkParams> for DeepImageClassifierParams {
    fn as_mut(&mut self) -> &mut NetworkParams {
        &mut self.network
    }
}

impl Params for DeepImageClassifierParams {
    const STAGE: &'static str = "DeepImageClassifier";

    fn docs() -> &'static [(&'static str, &'static str)] {
        static DOCS: LazyLock<Vec<(&str, &str)>> = LazyLock::new(|| {
            NetworkParams::docs_with(&[
                (
                    "modelName",
                    "pretrained network to fine-tune: EfficientNetLite0/1/2, EfficientNetB0, MobileNetV2",
                ),
                (
                    "batchSize",
                    "images per optimiser step and per forward pass",
                ),
                (
                    "device",
                    "where the fitted model runs: cpu, or (built with the wgpu feature) wgpu / wgpu-cpu; fitting runs on the CPU",
                ),
                ("labelCol", "label column: class indices 0..k-1"),
                ("predictionCol", "predicted class index column"),
                ("probabilityCol", "class probability vector column"),
                ("rawPredictionCol", "logit vector column"),
                (
                    "optimizer",
                    "sgd (momentum 0.9, L2 weight decay) or adamw (decoupled weight decay), as PyTorch's",
                ),
                (
                    "trainableBlocks",
                    "how many of the network's last blocks train (the head conv is the last); 0 = new classifier only",
                ),
                ("epochs", "passes over the training images at most"),
                (
                    "learningRate",
                    "peak step size: reached by a linear warm-up over the first epoch, then annealed to 0 by a cosine",
                ),
                ("weightDecay", "weight decay of every parameter (>= 0)"),
                (
                    "seed",
                    "seed of the classifier's initial weights, shuffles and flips",
                ),
                (
                    "validationFraction",
                    "share of training rows held out for early stopping (0 = none, train on all)",
                ),
                (
                    "patience",
                    "epochs without a lower validation loss before stopping",
                ),
                (
                    "horizontalFlip",
                    "also train on mirror images (a second cached view of each image)",
                ),
                (
                    "labelSmoothing",
                    "share of the training target spread over all classes, in [0, 1)",
                ),
                (
                    "dropout",
                    "dropout probability on the pooled features before the classifier, while training",
                ),
            ])
        });
        &DOCS
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        self.network.validate(s)?;
        if !self.network.model_file.is_empty() {
            return Err(Error::param(
                s,
                "modelFile",
                format!(
                    "fine-tuning runs the built-in networks ({}); for a model file fit a \
                     LogisticRegression on DeepImageFeaturizer's features",
                    crate::models::trainable_models().join(", ")
                ),
            ));
        }
        for (name, value) in [
            ("labelCol", &self.label_col),
            ("predictionCol", &self.prediction_col),
            ("probabilityCol", &self.probability_col),
            ("rawPredictionCol", &self.raw_prediction_col),
        ] {
            check::non_empty(s, name, value)?;
        }
        check::in_range(s, "trainableBlocks", self.trainable_blocks as f64, 0.0, 1e4)?;
        check::in_range(s, "epochs", self.epochs as f64, 1.0, 1e6)?;
        check::in_range(s, "learningRate", self.learning_rate, 1e-12, 10.0)?;
        check::at_least(s, "weightDecay", self.weight_decay, 0.0)?;
        check::in_range(s, "validationFraction", self.validation_fraction, 0.0, 0.9)?;
        check::in_range(s, "patience", self.patience as f64, 1.0, 1e6)?;
        check::in_range(s, "labelSmoothing", self.label_smoothing, 0.0, 0.99)?;
        check::in_range(s, "dropout", self.dropout, 0.0, 0.95)?;
        self.rejected.check(s)
    }

    fn rejected(&self) -> &Rejected {
        &self.rejected
    }
}

impl DeepImageClassifierParams {
    /// The trunk this fit cuts from the network.
    fn trunk_key(&self) -> TrunkKey {
        TrunkKey {
            model_name: self.network.model_name.clone(),
            model_dir: self.network.model_dir.clone(),
            trainable_blocks: self.trainable_blocks,
            views: if self.horizontal_flip { 2 } else { 1 },
        }
    }

    fn settings(&self) -> TrainSettings {
        TrainSettings {
            optimizer: self.optimizer,
            epochs: self.epochs,
            learning_rate: self.learning_rate,
            batch_size: self.network.batch_size,
            weight_decay: self.weight_decay,
            seed: self.seed,
            patience: self.patience,
            label_smoothing: self.label_smoothing,
            dropout: self.dropout,
        }
    }
}

/// Called after every epoch of a fit (see [`DeepImageClassifier::with_progress`]).
pub type Progress = Arc<dyn Fn(&EpochStats) + Send + Sync>;

/// Fine-tunes a pretrained network's last blocks with a new classifier head.
///
/// ```no_run
/// # async fn demo(train: datafusion::prelude::DataFrame) -> deep_pipelines::Result<()> {
/// use deep_pipelines::prelude::*;
/// let classifier = DeepImageClassifier::new()
///     .with_model_name("EfficientNetLite0")
///     .with_label_col("labelIndex")
///     .with_trainable_blocks(2)
///     .with_epochs(15)
///     .with_progress(|epoch| eprintln!("{epoch}"));
/// let model = classifier.fit(&train).await?;
/// // prediction, probability, rawPrediction
/// let predictions = model.transform(train)?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DeepImageClassifier {
    uid: String,
    params: DeepImageClassifierParams,
    trunks: TrunkCache,
    progress: Option<Progress>,
}

impl std::fmt::Debug for DeepImageClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeepImageClassifier")
            .field("uid", &self.uid)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Default for DeepImageClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl DeepImageClassifier {
    pub fn new() -> Self {
        Self::from_params(DeepImageClassifierParams::default())
    }

    pub fn from_params(params: DeepImageClassifierParams) -> Self {
        DeepImageClassifier {
            uid: new_uid("DeepImageClassifier"),
            params,
            trunks: TrunkCache::default(),
            progress: None,
        }
    }

    pub fn params(&self) -> &DeepImageClassifierParams {
        &self.params
    }

    /// Calls `progress` after every epoch (loss, accuracy, validation, images/s).
    pub fn with_progress(mut self, progress: impl Fn(&EpochStats) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }

    /// Images the frozen trunk has run since this estimator was made (its clones and tuning
    /// copies included): each distinct image once per cut, however many fits used it.
    pub fn trunk_images(&self) -> u64 {
        self.trunks.images()
    }

    /// Activations this estimator holds in its trunk cache, in bytes.
    pub fn trunk_cache_bytes(&self) -> usize {
        self.trunks.bytes()
    }

    /// Empties the trunk cache (the next fit runs the trunk again).
    pub fn clear_trunk_cache(&self) {
        self.trunks.clear();
    }

    network_setters!();
    string_setters! {
        with_label_col: label_col,
        with_prediction_col: prediction_col,
        with_probability_col: probability_col,
        with_raw_prediction_col: raw_prediction_col,
    }
    setters! {
        with_trainable_blocks: trainable_blocks: usize,
        with_epochs: epochs: usize,
        with_learning_rate: learning_rate: f64,
        with_weight_decay: weight_decay: f64,
        with_seed: seed: u64,
        with_validation_fraction: validation_fraction: f64,
        with_patience: patience: usize,
        with_horizontal_flip: horizontal_flip: bool,
        with_label_smoothing: label_smoothing: f64,
        with_dropout: dropout: f64,
    }
    choice_setters! { with_optimizer: optimizer: OptimizerKind = "optimizer" }

    async fn fit_images(&self, df: &DataFrame) -> Result<DeepImageClassifierModel> {
        let p = &self.params;
        p.validate()?;
        let label_type = require_column(df, &p.label_col)?;
        if !label_type.is_numeric() {
            return Err(Error::column(
                &p.label_col,
                format!(
                    "expected numeric class indices 0..k-1, got {label_type} (index strings with StringIndexer)"
                ),
            ));
        }
        let trunk = self.trunks.get(p.trunk_key())?;
        let keys = "__trunk_key";
        // The trunk runs on the CPU (its plan), and rows it cannot take are skipped, not
        // explained.
        let pass = NetworkParams {
            device: "cpu".into(),
            error_col: String::new(),
            ..p.network.clone()
        };
        let cached = pass
            .add_column(
                &self.uid,
                keys,
                df.clone(),
                &NetworkMetrics::default(),
                |_| Ok(TrunkOutput(Arc::clone(&trunk), TrunkPass::CacheKey)),
            )?
            .select(vec![ident(keys), ident(p.label_col.as_str())])?;
        // Partitions concatenated in partition order: the same rows in the same order on
        // every run, so the fit is reproducible.
        let streams = cached.execute_stream_partitioned().await?;
        let parts =
            futures::future::try_join_all(streams.into_iter().map(|s| read_keys(s, &p.label_col)))
                .await?;
        let mut examples = Examples::new(trunk.dims, trunk.views);
        let mut skipped = 0;
        for part in parts {
            skipped += part.skipped;
            for (key, label) in part.rows {
                let activations = trunk.activations(key).ok_or_else(|| {
                    model_error(
                        &p.network.model_name,
                        "a trunk activation left the cache mid-fit",
                    )
                })?;
                examples.push(activations, label);
            }
        }
        self.fit_examples(&trunk, examples, skipped)
    }

    /// The frozen trunk of this fit as a transformer adding `output_col`: each image's
    /// activations at the cut, every view (a `FixedSizeList<Float32>` of
    /// [`Self::activation_len`]), nothing cached. A distributed fit runs it where the images
    /// are, and trains the top on what it gave with [`Self::fit_spilled`].
    pub fn trunk_stage(&self, output_col: &str) -> Result<ClassifierTrunk> {
        let p = &self.params;
        p.validate()?;
        check::non_empty(DeepImageClassifierParams::STAGE, "outputCol", output_col)?;
        Ok(ClassifierTrunk {
            uid: new_uid("ClassifierTrunk"),
            params: DeepImageClassifierParams {
                network: NetworkParams {
                    device: "cpu".into(),
                    ..p.network.clone()
                },
                ..p.clone()
            },
            output_col: output_col.to_string(),
            trunk: self.trunks.get(p.trunk_key())?,
            metrics: NetworkMetrics::default(),
        })
    }

    /// Values per image of [`Self::trunk_stage`]'s output.
    pub fn activation_len(&self) -> Result<usize> {
        Ok(self.trunks.get(self.params.trunk_key())?.row_len())
    }

    /// Fits the top on activations [`Self::trunk_stage`] gave, spilled to `path` as
    /// little-endian f32 rows ([`Self::activation_len`] values each), one per label, in order;
    /// `skipped`: training rows left out (no image or no label), for the fit's facts. The file
    /// is memory-mapped, not read into memory.
    pub fn fit_spilled(
        &self,
        path: &Path,
        labels: Vec<usize>,
        skipped: usize,
    ) -> Result<DeepImageClassifierModel> {
        let run = || {
            self.params.validate()?;
            if let Some(&label) = labels.iter().max()
                && label > 1_000_000
            {
                return Err(Error::column(
                    &self.params.label_col,
                    format!("labels must be class indices 0, 1, 2, ...; found {label}"),
                ));
            }
            let trunk = self.trunks.get(self.params.trunk_key())?;
            let examples = Examples::spilled(trunk.dims, trunk.views, path, labels)?;
            self.fit_examples(&trunk, examples, skipped)
        };
        run().map_err(|e| e.in_stage(&self.uid))
    }

    /// Trains the top on `examples` (activations at `trunk`'s cut and class labels).
    fn fit_examples(
        &self,
        trunk: &Trunk,
        examples: Examples,
        skipped: usize,
    ) -> Result<DeepImageClassifierModel> {
        let p = &self.params;
        let classes = examples.labels.iter().max().map_or(0, |&l| l + 1);
        if examples.is_empty() {
            return Err(Error::Fit(format!(
                "DeepImageClassifier: no rows with an image in `{}` and a label in `{}` to fit on",
                p.network.input_col, p.label_col
            )));
        }
        let classes = classes.max(2);
        let (train_rows, validation) = split_validation(&examples, p.validation_fraction, p.seed);
        let train_rows = match &validation {
            Some(_) => examples.subset(&train_rows),
            None => examples,
        };
        let mut rng = SplitMix64::new(p.seed ^ 0x5EED_C1A5_5F1E_4D00);
        let head_channels = trunk.network.body.head.conv.weight.dims()[0];
        let classifier = new_classifier(head_channels, classes, &mut rng);
        let top = trunk
            .network
            .top(p.trainable_blocks, classifier)
            .ok_or_else(|| {
                too_many_blocks(&p.network.model_name, &trunk.network, p.trainable_blocks)
            })?;
        let progress = self.progress.clone();
        let mut report = |stats: &EpochStats| {
            if let Some(progress) = &progress {
                progress(stats);
            }
        };
        let Trained {
            top,
            history,
            best_epoch,
        } = train(
            top,
            &train_rows,
            validation.as_ref(),
            &p.settings(),
            &mut report,
        )?;
        let facts = FitFacts {
            num_classes: classes,
            trainable_blocks: p.trainable_blocks,
            training_rows: train_rows.len(),
            validation_rows: validation.as_ref().map_or(0, Examples::len),
            skipped_rows: skipped,
            best_epoch,
            history,
        };
        DeepImageClassifierModel::new(
            self.uid.clone(),
            p.clone(),
            (*trunk.network).clone(),
            top,
            facts,
        )
    }
}

/// Seeded hold-out of `fraction` of the rows: (training row indices, validation examples).
fn split_validation(
    examples: &Examples,
    fraction: f64,
    seed: u64,
) -> (Vec<usize>, Option<Examples>) {
    let n = examples.len();
    let held = ((n as f64) * fraction).round() as usize;
    if held == 0 || held >= n {
        return ((0..n).collect(), None);
    }
    let mut order = SplitMix64::new(seed ^ 0x7A11_DA7E).permutation(n);
    let train = order.split_off(held);
    let mut validation = order;
    validation.sort_unstable();
    let mut train = train;
    train.sort_unstable();
    (train, Some(examples.subset(&validation)))
}

/// The (cache key, label) rows of one partition; rows without an image or a label are skipped.
#[derive(Default)]
struct KeyRows {
    rows: Vec<(u64, usize)>,
    skipped: usize,
}

async fn read_keys(
    mut stream: datafusion::execution::SendableRecordBatchStream,
    label_col: &str,
) -> Result<KeyRows> {
    let mut out = KeyRows::default();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let keys = batch.column(0).as_primitive::<UInt64Type>();
        let labels = cast(batch.column(1), &DataType::Float64)?;
        let labels = labels.as_primitive::<Float64Type>();
        for row in 0..batch.num_rows() {
            if keys.is_null(row) || labels.is_null(row) {
                out.skipped += 1;
                continue;
            }
            let label = labels.value(row);
            if label < 0.0 || label.fract() != 0.0 || label > 1e6 {
                return Err(Error::column(
                    label_col,
                    format!("labels must be class indices 0, 1, 2, ...; found {label}"),
                ));
            }
            out.rows.push((keys.value(row), label as usize));
        }
    }
    Ok(out)
}

#[async_trait]
impl Estimator for DeepImageClassifier {
    type Model = DeepImageClassifierModel;

    fn uid(&self) -> &str {
        &self.uid
    }

    async fn fit(&self, df: &DataFrame) -> Result<DeepImageClassifierModel> {
        self.fit_images(df).await.map_err(|e| e.in_stage(&self.uid))
    }

    fn save_stage(&self) -> Result<SavedStage> {
        Ok(SavedStage::of(
            <Self as PersistedStage>::CLASS,
            &self.uid,
            &self.params,
        ))
    }

    /// Tuning copies share the trunk cache and the progress callback.
    fn copy_with(&self, overrides: &ParamMap) -> Result<Self> {
        Ok(DeepImageClassifier {
            params: overrides.apply(&self.uid, &self.params)?,
            ..self.clone()
        })
    }
}

impl PersistedStage for DeepImageClassifier {
    const CLASS: &'static str = "DeepImageClassifier";

    fn restore(saved: &SavedStage, _: &StageRegistry) -> Result<Self> {
        Ok(DeepImageClassifier {
            uid: saved.uid.clone(),
            ..Self::from_params(saved.params()?)
        })
    }

    fn from_params_json(params: serde_json::Value) -> Result<Self> {
        Ok(Self::from_params(DeepImageClassifierParams::from_json(
            params,
        )?))
    }

    fn into_stage(self) -> LoadedStage {
        LoadedStage::Estimator(Arc::new(self))
    }
}

/// The frozen trunk of a [`DeepImageClassifier`] fit ([`DeepImageClassifier::trunk_stage`]):
/// adds each image's activations at the cut. Runs on the CPU; not saved (a fit makes it).
#[derive(Debug)]
pub struct ClassifierTrunk {
    uid: String,
    params: DeepImageClassifierParams,
    output_col: String,
    trunk: Arc<Trunk>,
    metrics: NetworkMetrics,
}

impl Transformer for ClassifierTrunk {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        let trunk = &self.trunk;
        self.params
            .network
            .add_column(&self.uid, &self.output_col, df, &self.metrics, |_| {
                Ok(TrunkOutput(Arc::clone(trunk), TrunkPass::Activations))
            })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn network(&self) -> Option<&dyn NetworkStage> {
        Some(self)
    }
}

impl NetworkStage for ClassifierTrunk {
    fn network_params(&self) -> &NetworkParams {
        &self.params.network
    }

    fn params(&self) -> &dyn AnyParams {
        &self.params
    }

    fn meter(&self) -> &NetworkMetrics {
        &self.metrics
    }
}

// ---------------------------------------------------------------------------------------------
// The fitted model

/// What a fit learned besides the weights, kept in the saved metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FitFacts {
    pub num_classes: usize,
    pub trainable_blocks: usize,
    pub training_rows: usize,
    pub validation_rows: usize,
    /// Training rows without an image (or a label).
    pub skipped_rows: usize,
    /// The epoch whose weights the model has (the last, or the best on validation).
    pub best_epoch: usize,
    pub history: Vec<EpochStats>,
}

const TOP_DATA: &str = "top.safetensors";

/// A fine-tuned network: adds `rawPrediction` (logits), `probability` and `prediction`.
#[derive(Debug, Clone)]
pub struct DeepImageClassifierModel {
    uid: String,
    params: DeepImageClassifierParams,
    /// The whole fine-tuned network (folded), on the CPU.
    network: Arc<InvertedResidualNet>,
    /// The trained part, as saved.
    top: Arc<InvertedResidualTop>,
    facts: FitFacts,
    metrics: NetworkMetrics,
}

impl DeepImageClassifierModel {
    fn new(
        uid: String,
        params: DeepImageClassifierParams,
        base: InvertedResidualNet,
        top: InvertedResidualTop,
        facts: FitFacts,
    ) -> Result<Self> {
        Ok(DeepImageClassifierModel {
            uid,
            params,
            network: Arc::new(base.with_top(top.clone())),
            top: Arc::new(top),
            facts,
            metrics: NetworkMetrics::default(),
        })
    }

    pub fn params(&self) -> &DeepImageClassifierParams {
        &self.params
    }

    pub fn num_classes(&self) -> usize {
        self.facts.num_classes
    }

    /// Classes, blocks trained, rows used and skipped, the kept epoch and every epoch's stats.
    pub fn fit_facts(&self) -> &FitFacts {
        &self.facts
    }

    /// One entry per epoch run.
    pub fn history(&self) -> &[EpochStats] {
        &self.facts.history
    }

    // `DeepImageClassifierModel::load` is in the `builtin` module, above every stage.

    /// Saves the model: params and fit facts in `metadata.json`, the trained blocks and head in
    /// `data/top.safetensors` (PyTorch layout), the frozen part by reference (name + sha256).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::persistence::save(&self.save_stage()?, path.as_ref(), false)
    }
}

impl Transformer for DeepImageClassifierModel {
    fn uid(&self) -> &str {
        &self.uid
    }

    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        let p = &self.params;
        p.validate()?;
        let device = device(&p.network.device)?;
        let network = (*self.network).clone().to_device(&device);
        let precision = p.network.parsed_precision(&self.uid)?;
        let network = inference_network(network, &device, precision);
        let output = Logits {
            network,
            classes: self.facts.num_classes,
            device,
        };
        let raw = p.raw_prediction_col.as_str();
        let df = p
            .network
            .add_column(&self.uid, raw, df, &self.metrics, |_| Ok(output))?;
        let classes = self.facts.num_classes;
        let mut df = df;
        for (name, output) in [
            (&p.probability_col, FromRaw::Probability),
            (&p.prediction_col, FromRaw::Prediction),
        ] {
            let udf = ScalarUDF::new_from_impl(FromRawUdf {
                output,
                classes,
                signature: Signature::any(1, Volatility::Immutable),
            });
            df = df.with_column(name, udf.call(vec![ident(raw)]))?;
        }
        Ok(df)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn network(&self) -> Option<&dyn NetworkStage> {
        Some(self)
    }

    fn classifier(&self) -> Option<ClassifierColumns> {
        let p = &self.params;
        Some(ClassifierColumns::new(
            &p.prediction_col,
            &p.probability_col,
            &p.label_col,
        ))
    }

    fn describe(&self) -> String {
        format!(
            "DeepImageClassifierModel({}, {} classes)",
            self.params.network.model_name,
            self.num_classes()
        )
    }

    fn save_stage(&self) -> Result<SavedStage> {
        let p = &self.params;
        let mut saved = p
            .network
            .save(<Self as PersistedStage>::CLASS, &self.uid, p)?;
        if let serde_json::Value::Object(extra) = &mut saved.extra {
            extra.insert(
                "fit".into(),
                serde_json::to_value(&self.facts)
                    .map_err(|e| Error::Persistence(format!("{}: {e}", self.uid)))?,
            );
        }
        Ok(saved.with_data(TOP_DATA, save_top(&self.top)?))
    }

    fn copy_with(&self, overrides: &ParamMap) -> Result<Arc<dyn Transformer>> {
        let params: DeepImageClassifierParams = overrides.apply(&self.uid, &self.params)?;
        if params.trainable_blocks != self.params.trainable_blocks
            || params.network.model_name != self.params.network.model_name
        {
            return Err(Error::param(
                &self.uid,
                "trainableBlocks / modelName",
                "a fitted model's network cannot change; refit the estimator",
            ));
        }
        Ok(Arc::new(DeepImageClassifierModel {
            params,
            ..self.clone()
        }))
    }
}

impl NetworkStage for DeepImageClassifierModel {
    fn network_params(&self) -> &NetworkParams {
        &self.params.network
    }

    fn params(&self) -> &dyn AnyParams {
        &self.params
    }

    fn meter(&self) -> &NetworkMetrics {
        &self.metrics
    }
}

impl PersistedStage for DeepImageClassifierModel {
    const CLASS: &'static str = "DeepImageClassifierModel";

    fn restore(saved: &SavedStage, _: &StageRegistry) -> Result<Self> {
        let params: DeepImageClassifierParams = NetworkParams::restore(saved)?;
        let facts: FitFacts = saved.extra_field("fit")?;
        let model_name = &params.network.model_name;
        let dir = params.network.model_folder();
        let (_, base) = load_trainable(model_name, dir)?;
        let head_channels = base.body.head.conv.weight.dims()[0];
        let classifier = new_classifier(head_channels, facts.num_classes, &mut SplitMix64::new(0));
        let mut top = base
            .top(facts.trainable_blocks, classifier)
            .ok_or_else(|| {
                Error::Persistence(format!(
                    "{} `{}`: {} has fewer than {} trainable blocks",
                    saved.class, saved.uid, model_name, facts.trainable_blocks
                ))
            })?;
        let bytes = saved.data_file(TOP_DATA)?.to_vec();
        let what = format!("{} `{}`: data/{TOP_DATA}", saved.class, saved.uid);
        load_top(&mut top, bytes, &what, model_name)?;
        Self::new(saved.uid.clone(), params, base, top, facts)
    }

    fn into_stage(self) -> LoadedStage {
        LoadedStage::Transformer(Arc::new(self))
    }
}

/// The fitted network's pass: logits of every image.
#[derive(Debug)]
struct Logits {
    network: Arc<dyn ImageNetwork>,
    classes: usize,
    device: Device,
}

impl PartialEq for Logits {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.network, &other.network)
    }
}

impl Eq for Logits {}

impl Hash for Logits {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.network) as *const ()).hash(state);
        self.classes.hash(state);
    }
}

impl NetworkOutput for Logits {
    const VERB: &'static str = "classify";

    fn width(&self, _: &LoadedModel) -> usize {
        self.classes
    }

    fn forward(&self, model: &LoadedModel, inputs: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        let s = model.manifest.input_size as usize;
        let x = Tensor::from_data(TensorData::new(inputs, [batch, 3, s, s]), &self.device);
        let map = self.network.feature_map(x);
        let logits = self.network.logits(map).ok_or_else(|| {
            model_error(&model.manifest.name, "the fine-tuned network has no head")
        })?;
        logits
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| model_error(&model.manifest.name, format!("reading logits: {e:?}")))
    }

    fn data_type(&self, _: &LoadedModel) -> DataType {
        vector_type(self.classes)
    }

    fn build(&self, _: &LoadedModel, values: Vec<f32>, valid: Vec<bool>) -> Result<ArrayRef> {
        let values: Vec<f64> = values.into_iter().map(f64::from).collect();
        vector_array(values, self.classes, valid)
    }
}

fn vector_type(size: usize) -> DataType {
    DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float64, true)),
        size as i32,
    )
}

fn vector_array(values: Vec<f64>, size: usize, valid: Vec<bool>) -> Result<ArrayRef> {
    Ok(Arc::new(FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float64, true)),
        size as i32,
        Arc::new(Float64Array::from(values)),
        Some(NullBuffer::from(valid)),
    )?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FromRaw {
    Probability,
    Prediction,
}

/// `probability` (softmax) or `prediction` (argmax) from the `rawPrediction` column.
#[derive(Debug, PartialEq, Eq, Hash)]
struct FromRawUdf {
    output: FromRaw,
    classes: usize,
    signature: Signature,
}

impl ScalarUDFImpl for FromRawUdf {
    fn name(&self) -> &str {
        match self.output {
            FromRaw::Probability => "classifier_probability",
            FromRaw::Prediction => "classifier_prediction",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(match self.output {
            FromRaw::Probability => vector_type(self.classes),
            FromRaw::Prediction => DataType::Float64,
        })
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::common::Result<ColumnarValue> {
        crate::error::catch_panics(self.name(), || {
            let arrays = ColumnarValue::values_to_arrays(&args.args)?;
            let Some((raw, logits)) = arrays[0].as_fixed_size_list_opt().and_then(|raw| {
                Some((
                    raw,
                    raw.values().as_primitive_opt::<Float64Type>()?.values(),
                ))
            }) else {
                return datafusion::common::exec_err!(
                    "{} takes the model's rawPrediction column (vectors of f64)",
                    self.name()
                );
            };
            let k = self.classes;
            let valid: Vec<bool> = (0..raw.len()).map(|row| raw.is_valid(row)).collect();
            let rows = logits.chunks(k);
            let array: ArrayRef = match self.output {
                FromRaw::Probability => {
                    let values = rows.flat_map(softmax).collect();
                    vector_array(values, k, valid)
                        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
                }
                FromRaw::Prediction => {
                    let values: Vec<f64> = rows.map(|r| argmax(r) as f64).collect();
                    Arc::new(Float64Array::new(
                        values.into(),
                        Some(NullBuffer::from(valid)),
                    ))
                }
            };
            Ok(ColumnarValue::Array(array))
        })
    }
}
