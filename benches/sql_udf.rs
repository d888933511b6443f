//! Per-batch overhead of a fitted pipeline registered as a SQL function (`register_model`):
//! 100 one-row batches through `SELECT fn(image) FROM t`, against the same 100 one-row batches
//! through the pipeline's DataFrame transform (same network calls, no SQL-function wrapper) and
//! the same 100 images through the transform in one batch (the network's own cost).
//! `(sql_function_100x1 - transform_100x1) / 100` is what the SQL function adds per batch.
//!
//! Two networks: a tiny user network (`register_network`, mean colour of a 32x32 crop) where
//! the overhead dominates, and the bundled EfficientNetLite0 for a realistic ratio.
//! `cargo bench --bench sql_udf -- --warm-up-time 1 --measurement-time 5`

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::*;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionConfig;
use deep_pipelines::models::{ImageNetwork, manifest, register_network};
use deep_pipelines::prelude::*;
use tokio::runtime::Runtime;

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/fashion-mnist-small"
);
const BATCHES: usize = 100;

/// Mean of each input channel: a network whose forward pass costs next to nothing.
#[derive(Debug)]
struct MeanColour;

impl ImageNetwork for MeanColour {
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let [n, c, _, _] = input.dims();
        input.mean_dim(3).mean_dim(2).reshape([n, c, 1, 1])
    }

    fn logits(&self, map: Tensor<4>) -> Option<Tensor<2>> {
        let [n, c, _, _] = map.dims();
        Some(map.reshape([n, c]))
    }
}

fn register_tiny_network() -> &'static str {
    let (mut m, _) = manifest("EfficientNetLite0").expect("bundled manifest");
    m.name = "BenchMeanColour".into();
    m.architecture = "custom".into();
    m.input_size = 32;
    m.preprocess.resize_shorter_side = 32;
    m.feature_dim = 3;
    m.feature_map = [3, 1, 1];
    m.num_classes = 3;
    m.labels = None;
    register_network(m, Arc::new(MeanColour), &Device::flex()).expect("network registers");
    "BenchMeanColour"
}

/// `[StringIndexer, DeepImageFeaturizer(network), LogisticRegression]` fitted on 10% of train/.
async fn fitted(ctx: &SessionContext, network: &str) -> PipelineModel {
    let options = ReadImagesOptions::default()
        .with_label_from_folder(true)
        .with_sample(0.1, 7);
    let train = read_images(ctx, format!("{DATA}/train"), options).expect("train images");
    Pipeline::new()
        .with_estimator(
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("labelIndex"),
        )
        .with_transformer(DeepImageFeaturizer::new().with_model_name(network))
        .with_estimator(
            LogisticRegression::new()
                .with_label_col("labelIndex")
                .with_max_iter(50),
        )
        .fit(&train)
        .await
        .expect("pipeline fits")
}

/// Registers table `t`: the first [`BATCHES`] test images, one row per record batch; returns
/// the same images as one batch.
async fn one_row_batches(ctx: &SessionContext) -> RecordBatch {
    let images = read_images(ctx, format!("{DATA}/test"), ReadImagesOptions::default())
        .expect("test images")
        .select_columns(&["image"])
        .expect("image column")
        .limit(0, Some(BATCHES))
        .expect("limit");
    let batches = images.collect().await.expect("images read");
    let all = concat_batches(&batches[0].schema(), &batches).expect("concat");
    assert_eq!(all.num_rows(), BATCHES);
    let rows: Vec<RecordBatch> = (0..BATCHES).map(|r| all.slice(r, 1)).collect();
    let table = MemTable::try_new(all.schema(), vec![rows]).expect("table");
    ctx.register_table("t", Arc::new(table))
        .expect("table registers");
    all
}

async fn rows(df: DataFrame) -> usize {
    let batches = df.collect().await.expect("query runs");
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// Seconds per iteration of each call criterion makes, by benchmark name.
type Samples = RefCell<BTreeMap<String, Vec<f64>>>;

fn bench_network(c: &mut Criterion, rt: &Runtime, network: &str, samples: &Samples) {
    // One partition: the batches reach the function one by one, as a single scan would.
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    let (model, all) = rt.block_on(async {
        let model = fitted(&ctx, network).await;
        (model, one_row_batches(&ctx).await)
    });
    register_model(&ctx, "classify", &model).expect("function registers");
    let outputs = ["prediction", "probability"];
    let (sql, transform_100x1, transform_1x100) = rt.block_on(async {
        let sql = ctx
            .sql("SELECT classify(image) AS p FROM t")
            .await
            .expect("query plans");
        let table = ctx.table("t").await.expect("table t");
        let per_row = model.transform(table).expect("transform");
        let one = model
            .transform(ctx.read_batch(all).expect("batch"))
            .expect("transform");
        (
            sql,
            per_row.select_columns(&outputs).expect("columns"),
            one.select_columns(&outputs).expect("columns"),
        )
    });

    let mut group = c.benchmark_group(format!("sql_udf_{network}"));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    let variants = [
        ("sql_function_100x1", sql),
        ("transform_100x1", transform_100x1),
        ("transform_1x100", transform_1x100),
    ];
    for (name, df) in variants {
        let key = format!("{network}/{name}");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    assert_eq!(rt.block_on(rows(df.clone())), BATCHES);
                }
                let elapsed = started.elapsed();
                samples
                    .borrow_mut()
                    .entry(key.clone())
                    .or_default()
                    .push(elapsed.as_secs_f64() / iters as f64);
                elapsed
            })
        });
    }
    group.finish();
}

/// Per-batch figures (µs): each variant's median, mean ± sd and range over criterion's calls,
/// and the SQL function's overhead over the same batches through `transform`.
fn report(samples: &Samples) {
    let samples = samples.borrow();
    let per_batch = |key: &str| -> Option<Vec<f64>> {
        let mut v: Vec<f64> = samples
            .get(key)?
            .iter()
            .map(|s| s * 1e6 / BATCHES as f64)
            .collect();
        v.sort_by(f64::total_cmp);
        Some(v)
    };
    let median = |v: &[f64]| v[v.len() / 2];
    println!("\nper batch of 1 row, µs (median, mean ± sd, min..max over criterion's calls):");
    let networks: Vec<&str> = samples
        .keys()
        .filter_map(|k| k.split_once('/').map(|(n, _)| n))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for network in networks {
        for variant in ["sql_function_100x1", "transform_100x1", "transform_1x100"] {
            let Some(v) = per_batch(&format!("{network}/{variant}")) else {
                continue;
            };
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            println!(
                "  {network:<18} {variant:<20} median {:>9.1}  mean {mean:>9.1} ± {sd:>7.1}  range {:.1}..{:.1}  (n={})",
                median(&v),
                v[0],
                v[v.len() - 1],
                v.len()
            );
        }
        let sql = per_batch(&format!("{network}/sql_function_100x1"));
        let direct = per_batch(&format!("{network}/transform_100x1"));
        if let (Some(sql), Some(direct)) = (sql, direct) {
            println!(
                "  {network:<18} SQL-function overhead per batch (median sql - median transform_100x1): {:.1} µs ({:.2}x)",
                median(&sql) - median(&direct),
                median(&sql) / median(&direct)
            );
        }
    }
}

fn bench_sql_udf(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let samples = Samples::default();
    let tiny = register_tiny_network();
    bench_network(c, &rt, tiny, &samples);
    bench_network(c, &rt, "EfficientNetLite0", &samples);
    report(&samples);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = bench_sql_udf
}
criterion_main!(benches);
