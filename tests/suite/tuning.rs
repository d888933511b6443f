//! Tuning: the param grid, CrossValidator / TrainValidationSplit choosing by a metric, and the
//! feature cache that runs the network once per row however many folds and param maps.

use crate::common;

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, FixedSizeListArray, Float32Array, Float64Array, RecordBatch,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use deep_pipelines::pipeline::PipelineStage;
use deep_pipelines::prelude::*;

#[tokio::test]
async fn cross_validation_featurizes_each_row_once() {
    let ctx = SessionContext::new();
    let train = common::images(&ctx, "train", 0.3);
    let rows = train.clone().count().await.unwrap() as u64;
    let pipeline = common::example_pipeline();
    let featurizer_uid = pipeline.stage_uids()[1].to_string();
    let PipelineStage::Transformer(stage) = &pipeline.stages()[1] else {
        panic!("stage 1 is the featurizer")
    };
    let featurizer = stage
        .as_any()
        .downcast_ref::<DeepImageFeaturizer>()
        .unwrap()
        .clone();
    let lr_uid = pipeline.stage_uids()[2].to_string();
    let grid = ParamGridBuilder::new()
        .add_grid(&lr_uid, "regParam", [1e-3, 1e-2, 1e-1])
        .add_grid(&lr_uid, "elasticNetParam", [0.0, 0.5])
        .build();
    assert_eq!(grid.len(), 6);
    let evaluator = MulticlassClassificationEvaluator::new()
        .with_label_col("labelIndex")
        .with_metric_name("accuracy");
    let cv = CrossValidator::new(pipeline, grid, evaluator)
        .with_num_folds(3)
        .with_seed(11)
        .with_parallelism(2);

    let model = cv.fit(&train).await.unwrap();
    // The stage's own count: clones and the tuner's copies count into it, other tests do not.
    let forward = featurizer.images_processed();
    println!(
        "{rows} rows, {forward} images through the network; mean accuracy per map: {:?}; best {}",
        model.avg_metrics(),
        model.best_param_map()
    );
    assert_eq!(forward, rows, "the network must run once per row");
    assert_eq!(model.cached_stages(), [featurizer_uid]);
    assert_eq!(model.avg_metrics().len(), 6);
    assert!(model.fold_metrics().iter().all(|f| f.len() == 3));
    let best = model.best_metric();
    assert!(model.avg_metrics().iter().all(|m| *m <= best));
    assert!(best > 0.6, "best mean accuracy {best}");

    // The chosen model is a whole pipeline: it featurizes new images itself.
    let test = common::images(&ctx, "test", 0.2);
    let accuracy = MulticlassClassificationEvaluator::new()
        .with_label_col("labelIndex")
        .with_metric_name("accuracy")
        .evaluate(&model.transform(test).unwrap())
        .await
        .unwrap();
    println!("test accuracy of the chosen model: {accuracy:.3}");
    assert!(accuracy > 0.6);
}

/// Two Gaussian blobs in 4-d, labels 0/1, plus a fold column.
fn blobs(ctx: &SessionContext, n: usize, separation: f32) -> DataFrame {
    let mut state = 42u64;
    let mut normal = move || {
        // Box-Muller from a 64-bit LCG.
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (u, v) = (uniform(), uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    };
    let mut values = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let label = (i % 2) as f64;
        for d in 0..4 {
            let shift = if d < 2 {
                separation * label as f32
            } else {
                0.0
            };
            values.push(normal() + shift);
        }
        labels.push(label);
    }
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let features =
        FixedSizeListArray::try_new(item, 4, Arc::new(Float32Array::from(values)), None).unwrap();
    let ids: Vec<i64> = (0..n as i64).collect();
    let folds: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("features", features.data_type().clone(), true),
        Field::new("label", DataType::Float64, false),
        Field::new("fold", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(datafusion::arrow::array::Int64Array::from(ids)),
            Arc::new(features),
            Arc::new(Float64Array::from(labels)),
            Arc::new(datafusion::arrow::array::Int64Array::from(folds)),
        ],
    )
    .unwrap();
    ctx.read_batch(batch).unwrap()
}

#[test]
fn param_grid_is_the_cartesian_product() {
    let grid = ParamGridBuilder::new()
        .add_grid("a", "x", [1, 2, 3])
        .add_grid("b", "y", ["p", "q"])
        .build();
    assert_eq!(grid.len(), 6);
    let pairs: Vec<String> = grid
        .iter()
        .map(|m| {
            m.entries()
                .iter()
                .map(|e| e.value.to_string())
                .collect::<Vec<_>>()
                .join("")
        })
        .collect();
    assert_eq!(
        pairs,
        ["1\"p\"", "1\"q\"", "2\"p\"", "2\"q\"", "3\"p\"", "3\"q\""]
    );
    assert_eq!(ParamGridBuilder::new().build().len(), 1);
}

#[tokio::test]
async fn strong_regularisation_loses_on_auc_and_fold_column_is_used() {
    let ctx = SessionContext::new();
    let data = blobs(&ctx, 300, 1.5);
    let lr = LogisticRegression::new();
    let uid = Estimator::uid(&lr).to_string();
    let pipeline = Pipeline::new().with_estimator(lr);
    // With L1 at 10, every coefficient is zero: all scores tie and the AUC is 0.5.
    let grid = ParamGridBuilder::new()
        .add_grid(&uid, "regParam", [10.0, 1e-3])
        .add_grid(&uid, "elasticNetParam", [1.0])
        .build();
    let cv = CrossValidator::new(
        pipeline.clone(),
        grid.clone(),
        BinaryClassificationEvaluator::new(),
    )
    .with_fold_col("fold");
    let model = cv.fit(&data).await.unwrap();
    println!("AUC per map: {:?}", model.avg_metrics());
    assert_eq!(model.best_index(), 1);
    assert!((model.avg_metrics()[0] - 0.5).abs() < 1e-9);
    assert!(model.avg_metrics()[1] > 0.8);
    assert!(model.cached_stages().is_empty());

    // Fold k is exactly the rows with `fold == k`: each per-fold metric equals the one computed
    // here by hand (fit on `fold != k`, evaluate on `fold == k`). Random folds would differ.
    for k in 0..3i64 {
        let train = data.clone().filter(col("fold").not_eq(lit(k))).unwrap();
        let validation = data.clone().filter(col("fold").eq(lit(k))).unwrap();
        for (m, map) in grid.iter().enumerate() {
            let fitted = Estimator::copy_with(&pipeline, map)
                .unwrap()
                .fit(&train)
                .await
                .unwrap();
            let by_hand = BinaryClassificationEvaluator::new()
                .evaluate(&fitted.transform(validation.clone()).unwrap())
                .await
                .unwrap();
            let reported = model.fold_metrics()[m][k as usize];
            println!("map {m} fold {k}: by hand {by_hand}, cross-validator {reported}");
            assert!(
                (by_hand - reported).abs() < 1e-12,
                "map {m} fold {k}: by hand {by_hand}, cross-validator {reported}"
            );
        }
    }
    // The folds differ from each other, so matching all of them is not a coincidence.
    let tuned = &model.fold_metrics()[1];
    assert!(
        tuned.iter().any(|m| (m - tuned[0]).abs() > 1e-6),
        "{tuned:?}"
    );

    let tvs = TrainValidationSplit::new(pipeline, grid, BinaryClassificationEvaluator::new())
        .with_train_ratio(0.7)
        .with_seed(3);
    let model = tvs.fit(&data).await.unwrap();
    assert_eq!(model.best_index(), 1);
    assert_eq!(model.fold_metrics()[0].len(), 1);
}

#[tokio::test]
async fn bad_grids_fail_before_any_fit() {
    let ctx = SessionContext::new();
    let data = blobs(&ctx, 30, 1.0);
    let lr = LogisticRegression::new();
    let uid = Estimator::uid(&lr).to_string();
    let pipeline = Pipeline::new().with_estimator(lr);
    let evaluator = BinaryClassificationEvaluator::new;

    let grid = ParamGridBuilder::new()
        .add_grid(&uid, "regParm", [0.1])
        .build();
    let err = CrossValidator::new(pipeline.clone(), grid, evaluator())
        .fit(&data)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("regParm") && err.contains("no such param"),
        "{err}"
    );

    let grid = ParamGridBuilder::new()
        .add_grid(&uid, "regParam", [-1.0])
        .build();
    let err = CrossValidator::new(pipeline.clone(), grid, evaluator())
        .fit(&data)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("regParam") && err.contains(">= 0"), "{err}");

    let grid = ParamGridBuilder::new()
        .add_grid("Nope_1", "regParam", [0.1])
        .build();
    let err = CrossValidator::new(pipeline.clone(), grid, evaluator())
        .fit(&data)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not in the pipeline"), "{err}");

    let grid = ParamGridBuilder::new()
        .add_grid(&uid, "regParam", [0.1])
        .build();
    let err = CrossValidator::new(pipeline, grid, evaluator())
        .with_num_folds(1)
        .fit(&data)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("numFolds"), "{err}");
}

/// Tuning compares fits: they must not depend on thread scheduling or partition timing.
#[tokio::test]
async fn logistic_fits_are_reproducible_bit_for_bit() {
    let ctx = SessionContext::new();
    let batch = blobs(&ctx, 3000, 0.8).collect().await.unwrap().remove(0);
    let parts: Vec<Vec<RecordBatch>> = (0..4).map(|i| vec![batch.slice(i * 750, 750)]).collect();
    let table = datafusion::datasource::MemTable::try_new(batch.schema(), parts).unwrap();
    let df = ctx.read_table(Arc::new(table)).unwrap();
    let fit = || async {
        let model = LogisticRegression::new()
            .with_reg_param(1e-3)
            .with_max_iter(30)
            .fit(&df)
            .await
            .unwrap();
        let f = model.fitted();
        (f.coefficients.clone(), f.intercepts.clone())
    };
    let first = fit().await;
    for _ in 0..3 {
        assert_eq!(fit().await, first);
    }
}

/// `stdMetrics` is Spark's: per param map, the population standard deviation (divide by the
/// number of folds, as pyspark's `np.std(metrics_all, axis=0)`) of the per-fold metrics, and
/// `avgMetrics` their mean; both checked here by hand from `fold_metrics`.
#[tokio::test]
async fn std_metrics_are_the_population_std_of_the_fold_metrics() {
    let ctx = SessionContext::new();
    let data = blobs(&ctx, 120, 0.8);
    let lr = LogisticRegression::new();
    let uid = Estimator::uid(&lr).to_string();
    let grid = ParamGridBuilder::new()
        .add_grid(&uid, "regParam", [1e-3, 0.3])
        .build();
    let evaluator = MulticlassClassificationEvaluator::new().with_metric_name("accuracy");
    let model = CrossValidator::new(Pipeline::new().with_estimator(lr), grid, evaluator)
        .with_num_folds(4)
        .with_seed(5)
        .fit(&data)
        .await
        .unwrap();
    assert_eq!(model.std_metrics().len(), 2);
    for (m, folds) in model.fold_metrics().iter().enumerate() {
        assert_eq!(folds.len(), 4);
        let k = folds.len() as f64;
        let mean = folds.iter().sum::<f64>() / k;
        let std = (folds.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / k).sqrt();
        println!("map {m}: folds {folds:?}, mean {mean}, std {std}");
        assert!((model.avg_metrics()[m] - mean).abs() < 1e-12);
        assert!(
            (model.std_metrics()[m] - std).abs() < 1e-12,
            "map {m}: stdMetrics {}, population std by hand {std}",
            model.std_metrics()[m]
        );
        // Folds differ, so the std is not 0 and the sample std (k - 1) would differ by
        // sqrt(4/3): the check tells the two definitions apart.
        assert!(std > 1e-3, "map {m}: folds {folds:?} all equal");
    }
}
