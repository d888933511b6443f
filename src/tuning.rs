//! Model selection: [`ParamGridBuilder`], [`CrossValidator`] and [`TrainValidationSplit`], with
//! Spark's params, and a **feature cache** so the network runs once per row, not
//! folds x param maps times.
//!
//! # The feature cache
//! Before splitting, every transformer stage of the pipeline that no param map touches and that
//! runs on the input data alone (its input columns are there) is applied once and the result
//! materialised in memory (Arrow batches, like Spark's `cache()`): for
//! `[StringIndexer, DeepImageFeaturizer, LogisticRegression]` tuned over the logistic
//! regression's params, the featurizer runs once per row and every fold and param map fits
//! `[StringIndexer, LogisticRegression]` on the cached features. The cache holds the input
//! rows plus the cached stages' outputs (e.g. 5 KiB of features per image), so it needs memory
//! for the data set's rows; the chosen model still contains every stage in its original order.
//!
//! ```no_run
//! # async fn demo(train: datafusion::prelude::DataFrame) -> deep_pipelines::Result<()> {
//! use deep_pipelines::prelude::*;
//! use deep_pipelines::tuning::{CrossValidator, ParamGridBuilder};
//!
//! let lr = LogisticRegression::new().with_label_col("labelIndex");
//! let grid = ParamGridBuilder::new()
//!     .add_grid(Estimator::uid(&lr), "regParam", [1e-3, 1e-2, 1e-1])
//!     .add_grid(Estimator::uid(&lr), "elasticNetParam", [0.0, 0.5])
//!     .build();
//! let pipeline = Pipeline::new()
//!     .with_estimator(StringIndexer::new().with_input_col("label").with_output_col("labelIndex"))
//!     .with_transformer(DeepImageFeaturizer::new())
//!     .with_estimator(lr);
//! let evaluator = MulticlassClassificationEvaluator::new()
//!     .with_label_col("labelIndex")
//!     .with_metric_name("accuracy");
//! let cv = CrossValidator::new(pipeline, grid, evaluator).with_num_folds(3);
//! let model = cv.fit(&train).await?;
//! println!("best: {} (mean accuracy {:.3})", model.best_param_map(), model.best_metric());
//! # Ok(()) }
//! ```

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::prelude::{DataFrame, col, lit};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::evaluation::Evaluator;
use crate::params::{ParamMap, Params, check, new_uid, setters, string_setters};
use crate::pipeline::{Estimator, Pipeline, PipelineModel, PipelineStage, Transformer};
use crate::split::random_split;

/// Builds the cartesian product of param values, as Spark's `ParamGridBuilder`.
#[derive(Debug, Clone, Default)]
pub struct ParamGridBuilder {
    axes: Vec<(String, String, Vec<serde_json::Value>)>,
}

impl ParamGridBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tries each of `values` for param `param` (Spark name) of the stage with uid `stage_uid`.
    pub fn add_grid<V: Into<serde_json::Value>>(
        mut self,
        stage_uid: &str,
        param: &str,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        self.axes.push((
            stage_uid.to_string(),
            param.to_string(),
            values.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Every combination, the first axis varying slowest. No axes: one empty map.
    pub fn build(&self) -> Vec<ParamMap> {
        self.axes
            .iter()
            .fold(vec![ParamMap::new()], |maps, (stage, param, values)| {
                maps.iter()
                    .flat_map(|m| {
                        values
                            .iter()
                            .map(move |v| m.clone().put(stage, param, v.clone()))
                    })
                    .collect()
            })
    }
}

/// Params of [`CrossValidator`] (Spark names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CrossValidatorParams {
    pub num_folds: usize,
    pub seed: u64,
    /// Fits run at once (param maps x folds).
    pub parallelism: usize,
    /// Integer column 0..numFolds-1 assigning rows to folds; empty = random folds by `seed`.
    pub fold_col: String,
}

impl Default for CrossValidatorParams {
    fn default() -> Self {
        CrossValidatorParams {
            num_folds: 3,
            seed: 0,
            parallelism: 1,
            fold_col: String::new(),
        }
    }
}

impl Params for CrossValidatorParams {
    const STAGE: &'static str = "CrossValidator";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("numFolds", "number of folds (>= 2)"),
            ("seed", "seed of the random fold assignment"),
            ("parallelism", "fits run concurrently (>= 1)"),
            (
                "foldCol",
                "integer column of fold indices 0..numFolds-1 (empty: random folds)",
            ),
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        check::at_least(s, "numFolds", self.num_folds as f64, 2.0)?;
        check::at_least(s, "parallelism", self.parallelism as f64, 1.0)
    }
}

/// Params of [`TrainValidationSplit`] (Spark names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrainValidationSplitParams {
    pub train_ratio: f64,
    pub seed: u64,
    pub parallelism: usize,
}

impl Default for TrainValidationSplitParams {
    fn default() -> Self {
        TrainValidationSplitParams {
            train_ratio: 0.75,
            seed: 0,
            parallelism: 1,
        }
    }
}

impl Params for TrainValidationSplitParams {
    const STAGE: &'static str = "TrainValidationSplit";

    fn docs() -> &'static [(&'static str, &'static str)] {
        &[
            (
                "trainRatio",
                "fraction of rows used for training, in (0, 1)",
            ),
            ("seed", "seed of the random split"),
            ("parallelism", "fits run concurrently (>= 1)"),
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = Self::STAGE;
        if !(self.train_ratio > 0.0 && self.train_ratio < 1.0) {
            return Err(Error::param(
                s,
                "trainRatio",
                format!("must be in (0, 1), got {}", self.train_ratio),
            ));
        }
        check::at_least(s, "parallelism", self.parallelism as f64, 1.0)
    }
}

/// What both tuners share: the pipeline, the grid, the metric.
#[derive(Debug, Clone)]
struct Search {
    pipeline: Pipeline,
    param_maps: Vec<ParamMap>,
    evaluator: Arc<dyn Evaluator>,
}

/// The data after the cached stages, and the pipeline still to fit per fold.
struct Prepared {
    data: DataFrame,
    /// Stages not cached, in order.
    rest: Pipeline,
    /// Per original stage: `Some` when it was cached (its transformer), `None` otherwise.
    cached: Vec<Option<Arc<dyn Transformer>>>,
}

impl Search {
    fn new(
        pipeline: Pipeline,
        param_maps: Vec<ParamMap>,
        evaluator: impl Evaluator + 'static,
    ) -> Self {
        Search {
            pipeline,
            param_maps,
            evaluator: Arc::new(evaluator),
        }
    }

    /// Checks every param map against the pipeline before any work.
    fn check(&self) -> Result<()> {
        if self.param_maps.is_empty() {
            return Err(Error::param(
                "CrossValidator",
                "estimatorParamMaps",
                "must hold at least one param map (ParamGridBuilder::build)",
            ));
        }
        let uids: HashSet<&str> = self.pipeline.stage_uids().into_iter().collect();
        for map in &self.param_maps {
            if let Some(entry) = map
                .entries()
                .iter()
                .find(|e| !uids.contains(e.stage.as_str()))
            {
                return Err(Error::param(
                    "CrossValidator",
                    "estimatorParamMaps",
                    format!(
                        "param `{}` names stage `{}`, which is not in the pipeline",
                        entry.param, entry.stage
                    ),
                ));
            }
            Estimator::copy_with(&self.pipeline, map)?;
        }
        Ok(())
    }

    /// Runs and materialises the untuned transformer stages that need only the input columns.
    async fn prepare(&self, df: &DataFrame) -> Result<Prepared> {
        let tuned: HashSet<&str> = self
            .param_maps
            .iter()
            .flat_map(|m| m.entries().iter().map(|e| e.stage.as_str()))
            .collect();
        let mut current = df.clone();
        let mut rest = Vec::new();
        let mut cached = Vec::new();
        for stage in self.pipeline.stages() {
            if let PipelineStage::Transformer(t) = stage
                && !tuned.contains(t.uid())
                && let Ok(next) = t.transform(current.clone())
            {
                current = next;
                cached.push(Some(Arc::clone(t)));
                continue;
            }
            rest.push(stage.clone());
            cached.push(None);
        }
        let data = if cached.iter().any(Option::is_some) {
            current.cache().await?
        } else {
            current
        };
        Ok(Prepared {
            data,
            rest: Pipeline::from_stages(self.pipeline.uid(), rest),
            cached,
        })
    }

    /// Fits every param map on every (train, validation) split; returns metrics[map][split].
    async fn evaluate(
        &self,
        rest: &Pipeline,
        splits: &[(DataFrame, DataFrame)],
        parallelism: usize,
    ) -> Result<Vec<Vec<f64>>> {
        let jobs = (0..self.param_maps.len())
            .flat_map(|m| (0..splits.len()).map(move |s| (m, s)))
            .map(|(m, s)| async move {
                let estimator = Estimator::copy_with(rest, &self.param_maps[m])?;
                let (train, validation) = &splits[s];
                let model = estimator.fit(train).await?;
                let metric = self
                    .evaluator
                    .evaluate(&model.transform(validation.clone())?)
                    .await?;
                Ok::<_, Error>((m, s, metric))
            });
        let results: Vec<(usize, usize, f64)> = futures::stream::iter(jobs)
            .buffer_unordered(parallelism)
            .try_collect()
            .await?;
        let mut metrics = vec![vec![f64::NAN; splits.len()]; self.param_maps.len()];
        for (m, s, metric) in results {
            metrics[m][s] = metric;
        }
        Ok(metrics)
    }

    /// Picks the best map, refits it on all the data and returns the tuned model.
    async fn finish(&self, prepared: Prepared, metrics: Vec<Vec<f64>>) -> Result<TunedModel> {
        let avg: Vec<f64> = metrics
            .iter()
            .map(|m| m.iter().sum::<f64>() / m.len() as f64)
            .collect();
        let std: Vec<f64> = metrics
            .iter()
            .zip(&avg)
            .map(|(m, mean)| {
                (m.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m.len() as f64).sqrt()
            })
            .collect();
        let larger = self.evaluator.is_larger_better();
        let best = (0..avg.len())
            .filter(|&i| avg[i].is_finite())
            .reduce(|a, b| {
                let better = if larger {
                    avg[b] > avg[a]
                } else {
                    avg[b] < avg[a]
                };
                if better { b } else { a }
            })
            .ok_or_else(|| Error::Fit("no param map gave a finite metric".into()))?;
        let cached_stages = prepared
            .cached
            .iter()
            .flatten()
            .map(|t| t.uid().to_string())
            .collect();
        let refit = Estimator::copy_with(&prepared.rest, &self.param_maps[best])?
            .fit(&prepared.data)
            .await?;
        // Put the cached transformers back in their places among the refitted stages.
        let mut fitted = refit.stages().iter();
        let stages = prepared
            .cached
            .into_iter()
            .map(|c| c.or_else(|| fitted.next().cloned()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Fit("refitted pipeline lost a stage".into()))?;
        Ok(TunedModel {
            best_model: PipelineModel::new(self.pipeline.uid(), stages),
            param_maps: self.param_maps.clone(),
            avg_metrics: avg,
            std_metrics: std,
            fold_metrics: metrics,
            best_index: best,
            metric_name: self.evaluator.metric_name().to_string(),
            cached_stages,
        })
    }
}

/// The result of tuning: the best pipeline refitted on all the data, and every map's metrics.
#[derive(Debug, Clone)]
pub struct TunedModel {
    best_model: PipelineModel,
    param_maps: Vec<ParamMap>,
    avg_metrics: Vec<f64>,
    std_metrics: Vec<f64>,
    fold_metrics: Vec<Vec<f64>>,
    best_index: usize,
    metric_name: String,
    cached_stages: Vec<String>,
}

impl TunedModel {
    /// The chosen pipeline, refitted on all the data with the best param map.
    pub fn best_model(&self) -> &PipelineModel {
        &self.best_model
    }
    /// The param maps tried, in grid order.
    pub fn param_maps(&self) -> &[ParamMap] {
        &self.param_maps
    }
    /// Mean metric per param map (Spark's `avgMetrics`; one split for TrainValidationSplit).
    pub fn avg_metrics(&self) -> &[f64] {
        &self.avg_metrics
    }
    /// Standard deviation over folds per param map (Spark's `stdMetrics`).
    pub fn std_metrics(&self) -> &[f64] {
        &self.std_metrics
    }
    /// `[param map][fold]` metrics.
    pub fn fold_metrics(&self) -> &[Vec<f64>] {
        &self.fold_metrics
    }
    pub fn best_index(&self) -> usize {
        self.best_index
    }
    pub fn best_param_map(&self) -> &ParamMap {
        &self.param_maps[self.best_index]
    }
    pub fn best_metric(&self) -> f64 {
        self.avg_metrics[self.best_index]
    }
    pub fn metric_name(&self) -> &str {
        &self.metric_name
    }
    /// Uids of the stages computed once into the feature cache.
    pub fn cached_stages(&self) -> &[String] {
        &self.cached_stages
    }
}

impl Transformer for TunedModel {
    fn uid(&self) -> &str {
        self.best_model.uid()
    }
    /// Applies the best model.
    fn transform(&self, df: DataFrame) -> Result<DataFrame> {
        self.best_model.transform(df)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Spark's `CrossValidatorModel`.
pub type CrossValidatorModel = TunedModel;
/// Spark's `TrainValidationSplitModel`.
pub type TrainValidationSplitModel = TunedModel;

/// k-fold cross-validation over a param grid, as Spark's `CrossValidator`.
#[derive(Debug, Clone)]
pub struct CrossValidator {
    uid: String,
    search: Search,
    params: CrossValidatorParams,
}

impl CrossValidator {
    pub fn new(
        pipeline: Pipeline,
        param_maps: Vec<ParamMap>,
        evaluator: impl Evaluator + 'static,
    ) -> Self {
        CrossValidator {
            uid: new_uid("CrossValidator"),
            search: Search::new(pipeline, param_maps, evaluator),
            params: CrossValidatorParams::default(),
        }
    }
    pub fn params(&self) -> &CrossValidatorParams {
        &self.params
    }
    setters! {
        with_num_folds: num_folds: usize,
        with_seed: seed: u64,
        with_parallelism: parallelism: usize,
    }
    string_setters! { with_fold_col: fold_col }

    fn folds(&self, data: &DataFrame) -> Result<Vec<(DataFrame, DataFrame)>> {
        let k = self.params.num_folds;
        let fold_col = self.params.fold_col.as_str();
        if !fold_col.is_empty() {
            let t = crate::columns::require_column(data, fold_col)?;
            if !t.is_integer() {
                return Err(Error::column(
                    fold_col,
                    format!("foldCol must hold integers 0..{}, got {t}", k - 1),
                ));
            }
            return (0..k)
                .map(|i| {
                    let fold = col(fold_col);
                    Ok((
                        data.clone().filter(fold.clone().not_eq(lit(i as i64)))?,
                        data.clone().filter(fold.eq(lit(i as i64)))?,
                    ))
                })
                .collect();
        }
        let parts = random_split(data.clone(), &vec![1.0; k], self.params.seed)?;
        (0..k)
            .map(|i| {
                let mut others = parts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| p.clone());
                let first = others
                    .next()
                    .ok_or_else(|| Error::Fit("cross-validation needs >= 2 folds".into()))?;
                let train = others.try_fold(first, |a, b| a.union(b))?;
                Ok((train, parts[i].clone()))
            })
            .collect()
    }
}

#[async_trait]
impl Estimator for CrossValidator {
    type Model = CrossValidatorModel;

    fn uid(&self) -> &str {
        &self.uid
    }

    async fn fit(&self, df: &DataFrame) -> Result<CrossValidatorModel> {
        self.params.validate()?;
        self.search.check()?;
        let prepared = self.search.prepare(df).await?;
        let folds = self.folds(&prepared.data)?;
        let metrics = self
            .search
            .evaluate(&prepared.rest, &folds, self.params.parallelism)
            .await?;
        self.search.finish(prepared, metrics).await
    }
}

/// One train / validation split over a param grid, as Spark's `TrainValidationSplit`.
#[derive(Debug, Clone)]
pub struct TrainValidationSplit {
    uid: String,
    search: Search,
    params: TrainValidationSplitParams,
}

impl TrainValidationSplit {
    pub fn new(
        pipeline: Pipeline,
        param_maps: Vec<ParamMap>,
        evaluator: impl Evaluator + 'static,
    ) -> Self {
        TrainValidationSplit {
            uid: new_uid("TrainValidationSplit"),
            search: Search::new(pipeline, param_maps, evaluator),
            params: TrainValidationSplitParams::default(),
        }
    }
    pub fn params(&self) -> &TrainValidationSplitParams {
        &self.params
    }
    setters! {
        with_train_ratio: train_ratio: f64,
        with_seed: seed: u64,
        with_parallelism: parallelism: usize,
    }
}

#[async_trait]
impl Estimator for TrainValidationSplit {
    type Model = TrainValidationSplitModel;

    fn uid(&self) -> &str {
        &self.uid
    }

    async fn fit(&self, df: &DataFrame) -> Result<TrainValidationSplitModel> {
        self.params.validate()?;
        self.search.check()?;
        let prepared = self.search.prepare(df).await?;
        let r = self.params.train_ratio;
        let parts = random_split(prepared.data.clone(), &[r, 1.0 - r], self.params.seed)?;
        let [train, validation] = <[DataFrame; 2]>::try_from(parts)
            .map_err(|_| Error::Fit("random_split returned the wrong number of parts".into()))?;
        let metrics = self
            .search
            .evaluate(
                &prepared.rest,
                &[(train, validation)],
                self.params.parallelism,
            )
            .await?;
        self.search.finish(prepared, metrics).await
    }
}
