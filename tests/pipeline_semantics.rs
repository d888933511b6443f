//! Spark-ML semantics: estimators fit on the output of the stages before them, transformers pass
//! through, an empty pipeline is the identity, params are validated by name.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::Float64Type;
use deep_pipelines::feature::StringIndexerParams;
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
            handle_invalid: "keep".into(),
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
