//! Spark-ML semantics: estimators fit on the output of the stages before them, transformers pass
//! through, an empty pipeline is the identity, params are validated by name.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::Float64Type;
use deep_pipelines::feature::{HandleInvalid, StringIndexerParams};
use deep_pipelines::prelude::*;
use deep_pipelines::{Error, Params};

/// Test estimator: learns the mean of `input` and subtracts it into `output`.
#[derive(Debug)]
struct MeanCenterer {
    input: String,
    output: String,
}

#[derive(Debug)]
struct MeanCentererModel {
    mean: f64,
    input: String,
    output: String,
}

#[async_trait]
impl Estimator for MeanCenterer {
    type Model = MeanCentererModel;
    fn uid(&self) -> &str {
        "MeanCenterer_test"
    }
    async fn fit(&self, df: &DataFrame) -> deep_pipelines::Result<MeanCentererModel> {
        let batches = df
            .clone()
            .select(vec![col(self.input.as_str())])?
            .collect()
            .await?;
        let (mut sum, mut n) = (0.0, 0.0);
        for b in &batches {
            for v in b.column(0).as_primitive::<Float64Type>().iter().flatten() {
                sum += v;
                n += 1.0;
            }
        }
        Ok(MeanCentererModel {
            mean: sum / n,
            input: self.input.clone(),
            output: self.output.clone(),
        })
    }
}

impl Transformer for MeanCentererModel {
    fn uid(&self) -> &str {
        "MeanCenterer_test"
    }
    fn transform(&self, df: DataFrame) -> deep_pipelines::Result<DataFrame> {
        Ok(df.with_column(&self.output, col(self.input.as_str()) - lit(self.mean))?)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Test transformer that counts how often it is applied.
#[derive(Debug, Clone)]
struct Counting(Arc<AtomicUsize>);

impl Transformer for Counting {
    fn uid(&self) -> &str {
        "Counting_test"
    }
    fn transform(&self, df: DataFrame) -> deep_pipelines::Result<DataFrame> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(df)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

async fn labels_df(ctx: &SessionContext) -> DataFrame {
    // b x3, a x2, c x2 -> frequencyDesc: b=0, then ties alphabetical: a=1, c=2.
    ctx.sql("SELECT * FROM (VALUES ('b'), ('a'), ('c'), ('b'), ('a'), ('b'), ('c')) AS t(label)")
        .await
        .unwrap()
}

async fn collect(df: DataFrame) -> RecordBatch {
    let batches = df.collect().await.unwrap();
    datafusion::arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

#[tokio::test]
async fn second_estimator_is_fitted_on_the_first_ones_output() {
    let ctx = SessionContext::new();
    let df = labels_df(&ctx).await;
    let before = Arc::new(AtomicUsize::new(0));
    let after = Arc::new(AtomicUsize::new(0));
    let pipeline = Pipeline::new()
        .with_estimator(
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("idx"),
        )
        .with_transformer(Counting(Arc::clone(&before)))
        .with_estimator(MeanCenterer {
            input: "idx".into(),
            output: "centered".into(),
        })
        .with_transformer(Counting(Arc::clone(&after)));
    let model = pipeline.fit(&df).await.unwrap();

    // idx = [0, 1, 2, 0, 1, 0, 2] -> mean 6/7: only computable on the indexer's output.
    let centerer = model.stage::<MeanCentererModel>().unwrap();
    assert!(
        (centerer.mean - 6.0 / 7.0).abs() < 1e-12,
        "mean {}",
        centerer.mean
    );
    assert_eq!(
        model.stage::<StringIndexerModel>().unwrap().labels(),
        ["b", "a", "c"]
    );
    // Spark: stages before the last estimator transform the data during fit; later ones don't.
    assert_eq!(before.load(Ordering::SeqCst), 1);
    assert_eq!(after.load(Ordering::SeqCst), 0);
    assert_eq!(model.stages().len(), 4);

    let out = collect(model.transform(df).unwrap()).await;
    let centered: Vec<f64> = out
        .column_by_name("centered")
        .unwrap()
        .as_primitive::<Float64Type>()
        .values()
        .to_vec();
    assert!((centered.iter().sum::<f64>()).abs() < 1e-9);
    assert_eq!(after.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn empty_pipeline_is_the_identity() {
    let ctx = SessionContext::new();
    let df = labels_df(&ctx).await;
    let model = Pipeline::new().fit(&df).await.unwrap();
    assert!(model.stages().is_empty());
    let out = collect(model.transform(df.clone()).unwrap()).await;
    assert_eq!(out, collect(df).await);
}

#[tokio::test]
async fn index_to_string_inverts_string_indexer_and_unseen_labels_follow_handle_invalid() {
    let ctx = SessionContext::new();
    let df = labels_df(&ctx).await;
    let indexer = StringIndexer::new()
        .with_output_col("idx")
        .fit(&df)
        .await
        .unwrap();
    let back = IndexToString::new()
        .with_input_col("idx")
        .with_output_col("back")
        .with_labels(indexer.labels());
    let out = collect(back.transform(indexer.transform(df).unwrap()).unwrap()).await;
    assert_eq!(
        out.column_by_name("label").unwrap(),
        out.column_by_name("back").unwrap()
    );

    let unseen = ctx.sql("SELECT 'zebra' AS label").await.unwrap();
    let err = indexer
        .transform(unseen.clone())
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("zebra"), "{err}");
    let keep = StringIndexerModel::from_labels(
        StringIndexerParams {
            output_col: "idx".into(),
            handle_invalid: HandleInvalid::Keep,
            ..Default::default()
        },
        indexer.labels().to_vec(),
    )
    .unwrap();
    let out = collect(keep.transform(unseen).unwrap()).await;
    assert_eq!(
        out.column_by_name("idx")
            .unwrap()
            .as_primitive::<Float64Type>()
            .value(0),
        3.0
    );
}

fn assert_names_param(result: deep_pipelines::Result<()>, param: &str) {
    match result {
        Err(Error::InvalidParam { param: p, .. }) => assert_eq!(p, param),
        other => panic!("expected invalid `{param}`, got {other:?}"),
    }
}

#[test]
fn invalid_params_are_rejected_by_name() {
    let lr = |f: fn(LogisticRegression) -> LogisticRegression| {
        f(LogisticRegression::new()).params().validate()
    };
    assert_names_param(lr(|l| l.with_reg_param(-1.0)), "regParam");
    assert_names_param(lr(|l| l.with_elastic_net_param(1.5)), "elasticNetParam");
    assert_names_param(lr(|l| l.with_tol(f64::NAN)), "tol");
    assert_names_param(lr(|l| l.with_features_col("")), "featuresCol");
    assert!(lr(|l| l).is_ok());

    let featurizer = |f: DeepImageFeaturizer| f.params().validate();
    assert_names_param(
        featurizer(DeepImageFeaturizer::new().with_batch_size(0)),
        "batchSize",
    );
    assert_names_param(
        featurizer(DeepImageFeaturizer::new().with_model_name("AlexNet")),
        "modelName",
    );
    assert_names_param(
        featurizer(DeepImageFeaturizer::new().with_device("tpu")),
        "device",
    );

    assert_names_param(
        StringIndexer::new()
            .with_handle_invalid("bogus")
            .params()
            .validate(),
        "handleInvalid",
    );
    assert_names_param(
        MulticlassClassificationEvaluator::new()
            .with_metric_name("auc")
            .params()
            .validate(),
        "metricName",
    );
}

#[test]
fn params_have_spark_defaults_and_explain_themselves() {
    let params = LogisticRegression::new().params().clone();
    let explained = params.explain_params();
    let get = |name: &str| {
        explained
            .iter()
            .find(|p| p.name == name)
            .unwrap()
            .default
            .clone()
    };
    assert_eq!(get("maxIter"), 100);
    assert_eq!(get("regParam"), 0.0);
    assert_eq!(get("elasticNetParam"), 0.0);
    assert_eq!(get("tol"), 1e-6);
    assert_eq!(get("fitIntercept"), true);
    assert_eq!(get("standardization"), true);
    assert_eq!(get("family"), "auto");
    assert_eq!(get("featuresCol"), "features");
    assert_eq!(get("labelCol"), "label");
    assert_eq!(get("predictionCol"), "prediction");
    assert_eq!(get("probabilityCol"), "probability");
    assert_eq!(get("rawPredictionCol"), "rawPrediction");
    assert!(explained.iter().all(|p| !p.doc.is_empty()));
}

#[tokio::test]
async fn random_split_is_deterministic_disjoint_and_complete() {
    let ctx = SessionContext::new();
    let df = ctx
        .sql("SELECT value AS id FROM generate_series(1, 2000)")
        .await
        .unwrap();
    let count = |df: DataFrame| async move { df.count().await.unwrap() };
    let splits = random_split(df.clone(), &[0.8, 0.2], 42).unwrap();
    let (a, b) = (
        count(splits[0].clone()).await,
        count(splits[1].clone()).await,
    );
    assert_eq!(a + b, 2000);
    assert!((1500..1700).contains(&a), "80% split has {a} rows");
    let again = random_split(df.clone(), &[4.0, 1.0], 42).unwrap();
    assert_eq!(
        collect(again[1].clone()).await,
        collect(splits[1].clone()).await
    );
    let other_seed = random_split(df.clone(), &[0.8, 0.2], 7).unwrap();
    assert_ne!(
        collect(other_seed[1].clone()).await,
        collect(splits[1].clone()).await
    );
    let overlap = splits[0]
        .clone()
        .join(
            splits[1].clone().with_column_renamed("id", "id2").unwrap(),
            datafusion::prelude::JoinType::Inner,
            &["id"],
            &["id2"],
            None,
        )
        .unwrap();
    assert_eq!(count(overlap).await, 0);
    assert!(random_split(df, &[0.5, -1.0], 1).is_err());
}

/// Deterministic overlapping two-class data: `n` rows of `d` features (uniform noise, the
/// class shifts the first two features), labels 0/1.
fn two_classes(n: usize, d: usize) -> (Vec<f32>, Vec<f64>) {
    let mut state = 2024u64;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        let label = (i % 2) as f64;
        for j in 0..d {
            let shift = if j < 2 { 0.8 * label } else { 0.0 };
            x.push(((uniform() - 0.5) * (j + 1) as f64 + shift) as f32);
        }
        y.push(label);
    }
    (x, y)
}

/// A DataFrame `id, features (FixedSizeList<Float32>, null where `None`), label[, weight]`.
/// Null vectors still occupy values in the child array: they are filled with 100s, so a fit
/// that read them would visibly change.
fn vectors_df(
    ctx: &SessionContext,
    rows: &[Option<Vec<f32>>],
    labels: &[Option<f64>],
    weights: Option<&[f64]>,
) -> DataFrame {
    use datafusion::arrow::array::{FixedSizeListArray, Float32Array, Float64Array, Int64Array};
    use datafusion::arrow::buffer::NullBuffer;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let d = rows.iter().flatten().next().unwrap().len();
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.clone().unwrap_or_else(|| vec![100.0; d]))
        .collect();
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let features = FixedSizeListArray::try_new(
        Arc::clone(&item),
        d as i32,
        Arc::new(Float32Array::from(values)),
        Some(NullBuffer::from(
            rows.iter().map(Option::is_some).collect::<Vec<_>>(),
        )),
    )
    .unwrap();
    let mut fields = vec![
        Field::new("id", DataType::Int64, false),
        Field::new("features", features.data_type().clone(), true),
        Field::new("label", DataType::Float64, true),
    ];
    let mut columns: Vec<datafusion::arrow::array::ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(0..rows.len() as i64)),
        Arc::new(features),
        Arc::new(Float64Array::from(labels.to_vec())),
    ];
    if let Some(w) = weights {
        fields.push(Field::new("weight", DataType::Float64, false));
        columns.push(Arc::new(Float64Array::from(w.to_vec())));
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    ctx.read_batch(batch).unwrap()
}

fn assert_same_fit(a: &LogisticRegressionModel, b: &LogisticRegressionModel, rel: f64) {
    let (a, b) = (a.fitted(), b.fitted());
    assert_eq!(a.coefficients.len(), b.coefficients.len());
    for (what, x, y) in [
        ("coefficients", &a.coefficients, &b.coefficients),
        ("intercepts", &a.intercepts, &b.intercepts),
    ] {
        for (i, (p, q)) in x.iter().zip(y.iter()).enumerate() {
            assert!(
                (p - q).abs() <= rel * p.abs().max(1.0),
                "{what}[{i}]: {p} vs {q}"
            );
        }
    }
}

#[tokio::test]
async fn rows_with_null_features_or_labels_are_skipped_and_counted() {
    let ctx = SessionContext::new();
    let (x, y) = two_classes(80, 3);
    let d = 3;
    // Rows 3, 10, 17, ... have null features (as bad images give); rows 5 and 40 a null label.
    let null_features = |i: usize| i % 7 == 3;
    let null_label = |i: usize| i == 5 || i == 40;
    let rows: Vec<Option<Vec<f32>>> = (0..80)
        .map(|i| (!null_features(i)).then(|| x[i * d..(i + 1) * d].to_vec()))
        .collect();
    let labels: Vec<Option<f64>> = (0..80).map(|i| (!null_label(i)).then_some(y[i])).collect();
    let expected_skipped = (0..80)
        .filter(|&i| null_features(i) || null_label(i))
        .count();
    assert_eq!(expected_skipped, 13);
    let with_nulls = vectors_df(&ctx, &rows, &labels, None);
    // The same data with those rows left out, built directly (not by filtering).
    let kept: Vec<usize> = (0..80)
        .filter(|&i| !null_features(i) && !null_label(i))
        .collect();
    let clean = vectors_df(
        &ctx,
        &kept.iter().map(|&i| rows[i].clone()).collect::<Vec<_>>(),
        &kept.iter().map(|&i| labels[i]).collect::<Vec<_>>(),
        None,
    );
    let lr = LogisticRegression::new().with_reg_param(1e-2);
    let skipped = lr.fit(&with_nulls).await.unwrap();
    let reference = lr.fit(&clean).await.unwrap();
    assert_eq!(skipped.num_skipped_rows(), expected_skipped);
    assert_eq!(reference.num_skipped_rows(), 0);
    // Same rows in the same order into a deterministic fit: the same optimum (1e-12 leaves room
    // for nothing but summation order).
    assert_same_fit(&skipped, &reference, 1e-12);
    assert!(skipped.fitted().coefficients[0].abs() > 0.1);

    // Applied, a null vector gives a null prediction; the others are predicted.
    let out = collect(skipped.transform(with_nulls).unwrap()).await;
    let prediction = out.column_by_name("prediction").unwrap();
    assert_eq!(out.num_rows(), 80);
    assert_eq!(
        prediction.null_count(),
        (0..80).filter(|&i| null_features(i)).count()
    );
}

#[tokio::test]
async fn weight_column_counts_a_row_w_times() {
    // Weight 2 == the row twice, weight 0 == the row left out (Spark's weightCol). With
    // standardization=false: Spark's weighted std uses reliability weights (sum w - sum w^2 /
    // sum w), which differs between "weight 2" and "two rows", so with standardization the
    // penalties, and the optima, would differ slightly (as in Spark).
    let ctx = SessionContext::new();
    let (x, y) = two_classes(90, 3);
    let d = 3;
    let weight = |i: usize| match i % 5 {
        0 => 2.0,
        3 => 0.0,
        _ => 1.0,
    };
    let rows: Vec<Option<Vec<f32>>> = (0..90)
        .map(|i| Some(x[i * d..(i + 1) * d].to_vec()))
        .collect();
    let labels: Vec<Option<f64>> = y.iter().map(|v| Some(*v)).collect();
    let weights: Vec<f64> = (0..90).map(weight).collect();
    let weighted_df = vectors_df(&ctx, &rows, &labels, Some(&weights));
    let mut expanded: Vec<usize> = Vec::new();
    for i in 0..90 {
        for _ in 0..weight(i) as usize {
            expanded.push(i);
        }
    }
    // 18 rows of weight 2 and 18 of weight 0: 90 rows again, a different multiset.
    assert_eq!(expanded.len(), 90);
    let expanded_df = vectors_df(
        &ctx,
        &expanded
            .iter()
            .map(|&i| rows[i].clone())
            .collect::<Vec<_>>(),
        &expanded.iter().map(|&i| labels[i]).collect::<Vec<_>>(),
        None,
    );
    let lr = LogisticRegression::new()
        .with_reg_param(1e-2)
        .with_standardization(false)
        .with_tol(1e-12)
        .with_max_iter(1000);
    let weighted = lr
        .clone()
        .with_weight_col("weight")
        .fit(&weighted_df)
        .await
        .unwrap();
    let expanded = lr.fit(&expanded_df).await.unwrap();
    // The same objective, reached from differently scaled starting problems: 1e-6 relative.
    assert_same_fit(&weighted, &expanded, 1e-6);
    // And the weights matter: ignoring them gives another fit.
    let unweighted = lr.fit(&weighted_df).await.unwrap();
    let diff = unweighted
        .fitted()
        .coefficients
        .iter()
        .zip(&weighted.fitted().coefficients)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff > 1e-3, "weights changed nothing: {diff}");
}

#[tokio::test]
async fn log_loss_is_the_mean_negative_log_probability_of_the_label() {
    use datafusion::arrow::array::{FixedSizeListArray, Float64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let ctx = SessionContext::new();
    // Hand-made probabilities, one of them 0 for the true class: Spark clips at eps = 1e-15.
    let labels = [0.0, 1.0, 2.0, 1.0, 2.0];
    let predictions = [0.0, 0.0, 2.0, 1.0, 0.0];
    let probabilities = [
        [0.7, 0.2, 0.1],
        [0.5, 0.25, 0.25],
        [0.1, 0.1, 0.8],
        [0.3, 0.6, 0.1],
        [1.0, 0.0, 0.0],
    ];
    let expected = -(0.7f64.ln() + 0.25f64.ln() + 0.8f64.ln() + 0.6f64.ln() + 1e-15f64.ln()) / 5.0;
    let item = Arc::new(Field::new("item", DataType::Float64, true));
    let probability = FixedSizeListArray::try_new(
        Arc::clone(&item),
        3,
        Arc::new(Float64Array::from(probabilities.concat())),
        None,
    )
    .unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("label", DataType::Float64, false),
        Field::new("prediction", DataType::Float64, false),
        Field::new("probability", probability.data_type().clone(), false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Float64Array::from(labels.to_vec())),
            Arc::new(Float64Array::from(predictions.to_vec())),
            Arc::new(probability),
        ],
    )
    .unwrap();
    let evaluator = MulticlassClassificationEvaluator::new().with_metric_name("logLoss");
    assert!(!evaluator.is_larger_better());
    let log_loss = evaluator
        .evaluate(&ctx.read_batch(batch).unwrap())
        .await
        .unwrap();
    assert!(
        (log_loss - expected).abs() < 1e-12,
        "logLoss {log_loss}, by hand {expected}"
    );

    // On a fitted model's probability column: the same formula, by hand from the column.
    let (x, y) = two_classes(60, 3);
    let rows: Vec<Option<Vec<f32>>> = (0..60)
        .map(|i| Some(x[i * 3..(i + 1) * 3].to_vec()))
        .collect();
    let labels: Vec<Option<f64>> = y.iter().map(|v| Some(*v)).collect();
    let df = vectors_df(&ctx, &rows, &labels, None);
    let model = LogisticRegression::new()
        .with_reg_param(0.1)
        .fit(&df)
        .await
        .unwrap();
    let predicted = model.transform(df).unwrap();
    let out = collect(predicted.clone()).await;
    let probability = out
        .column_by_name("probability")
        .unwrap()
        .as_fixed_size_list();
    let label = out
        .column_by_name("label")
        .unwrap()
        .as_primitive::<Float64Type>();
    let by_hand = -(0..out.num_rows())
        .map(|i| {
            let p = probability.value(i);
            p.as_primitive::<Float64Type>()
                .value(label.value(i) as usize)
                .max(1e-15)
                .ln()
        })
        .sum::<f64>()
        / out.num_rows() as f64;
    let log_loss = evaluator.evaluate(&predicted).await.unwrap();
    assert!(
        (log_loss - by_hand).abs() < 1e-12 && by_hand > 0.1,
        "logLoss {log_loss}, by hand {by_hand}"
    );
}

#[tokio::test]
async fn string_indexer_skip_drops_rows_with_unseen_or_null_labels() {
    let ctx = SessionContext::new();
    let train = ctx
        .sql(
            "SELECT * FROM (VALUES (1, 'b'), (2, 'a'), (3, NULL), (4, 'b'), (5, 'c'), (6, 'a'), \
             (7, 'b')) AS t(id, label)",
        )
        .await
        .unwrap();
    let indexer = StringIndexer::new()
        .with_output_col("idx")
        .with_handle_invalid("skip")
        .fit(&train)
        .await
        .unwrap();
    // Fit ignores nulls (as Spark): null is not a label. b x3, a x2, c x1.
    assert_eq!(indexer.labels(), ["b", "a", "c"]);
    let test = ctx
        .sql(
            "SELECT * FROM (VALUES (10, 'a'), (11, 'zebra'), (12, NULL), (13, 'c'), (14, 'b')) \
             AS t(id, label)",
        )
        .await
        .unwrap();
    let out = collect(
        indexer
            .transform(test)
            .unwrap()
            .sort_by(vec![col("id")])
            .unwrap(),
    )
    .await;
    let ids: Vec<i64> = out
        .column_by_name("id")
        .unwrap()
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .values()
        .to_vec();
    let idx: Vec<f64> = out
        .column_by_name("idx")
        .unwrap()
        .as_primitive::<Float64Type>()
        .values()
        .to_vec();
    assert_eq!(ids, [10, 13, 14]);
    assert_eq!(idx, [1.0, 2.0, 0.0]);
    // The training rows themselves: only the null one goes.
    assert_eq!(indexer.transform(train).unwrap().count().await.unwrap(), 6);
}

/// `with_device` moves the network stages on one device and no other stage: a stage moved to
/// a device this build lacks is an error naming it; a device no stage uses changes nothing.
#[test]
fn with_device_moves_the_network_stages_on_that_device() {
    let featurizer: Arc<dyn Transformer> = Arc::new(DeepImageFeaturizer::new());
    let model = PipelineModel::new("p", vec![featurizer]);
    let same = model.with_device("wgpu", "nowhere").unwrap();
    assert_eq!(same.network().unwrap().network_params().device, "cpu");
    let err = model.with_device("cpu", "nowhere").unwrap_err().to_string();
    assert!(
        err.contains("unknown device `nowhere`") && err.contains("DeepImageFeaturizer"),
        "{err}"
    );
    let moved = model.with_device("cpu", "cpu").unwrap();
    assert_eq!(moved.network().unwrap().network_params().device, "cpu");
}
