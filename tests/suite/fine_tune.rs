//! Fine-tuning: the optimiser step against PyTorch's, and `DeepImageClassifier` end to end
//! (save/load, SQL, cross-validation sharing the trunk cache).

use burn::nn::LinearConfig;
use burn::prelude::*;
use deep_pipelines::fine_tune::{OptimizerKind, Trainer, load_top, save_top};
use deep_pipelines::models::inverted_residual::{InvertedResidual, InvertedResidualTop};
use deep_pipelines::models::layers::{Act, ConvBn, ConvSpec};

use crate::common::{self, max_abs_diff, read_tensors};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fine_tune");

/// A conv with a bias and no BatchNorm (a folded `ConvBn`).
fn folded(spec: ConvSpec, device: &Device) -> ConvBn {
    ConvBn {
        conv: spec.bias().init(device),
        bn: None,
    }
}

/// The top `make_step_fixtures.py` builds: one inverted residual 8 -> 16 -> 8, head 8 -> 12,
/// classifier 12 -> 3.
fn fixture_top() -> InvertedResidualTop {
    let device = Device::flex();
    let block = InvertedResidual {
        expand: Some(folded(ConvSpec::new(8, 16, 1), &device)),
        depthwise: folded(ConvSpec::new(16, 16, 3).depthwise(), &device),
        se: None,
        project: folded(ConvSpec::new(16, 8, 1), &device),
        residual: true,
        act: Act::Relu6,
        se_acts: (Act::Relu, Act::Sigmoid),
    };
    InvertedResidualTop {
        blocks: vec![block],
        head: Some(folded(ConvSpec::new(8, 12, 1), &device)),
        classifier: LinearConfig::new(12, 3).init(&device),
        act: Act::Relu6,
    }
}

fn batch(
    tensors: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    step: usize,
) -> (Tensor<4>, Vec<usize>) {
    let (shape, x) = &tensors[&format!("x{step}")];
    let x = Tensor::from_data(
        TensorData::new(x.clone(), [shape[0], shape[1], shape[2], shape[3]]),
        &Device::flex(),
    );
    let y = tensors[&format!("y{step}")]
        .1
        .iter()
        .map(|&v| v as usize)
        .collect();
    (x, y)
}

#[test]
fn optimiser_steps_match_pytorch() {
    let batches = read_tensors(&format!("{FIXTURES}/batches.safetensors"));
    for (name, optimizer, learning_rate) in [
        ("sgd", OptimizerKind::Sgd, 0.05),
        ("adamw", OptimizerKind::AdamW, 1e-2),
    ] {
        let mut top = fixture_top();
        let init = std::fs::read(format!("{FIXTURES}/init.safetensors")).unwrap();
        load_top(&mut top, init, "init.safetensors", "fixture").unwrap();
        let mut trainer = Trainer::new(top, optimizer, 0.05);
        for step in 1..=2 {
            let (x, y) = batch(&batches, step);
            let (loss, _) = trainer.step(x, &y, learning_rate).unwrap();
            let expected = batches[&format!("{name}_loss{step}")].1[0] as f64;
            assert!(
                (loss - expected).abs() < 1e-5,
                "{name} step {step}: loss {loss}, PyTorch {expected}"
            );
            let path = std::env::temp_dir().join(format!(
                "dp-fine-tune-{name}-{step}-{}.safetensors",
                std::process::id()
            ));
            std::fs::write(&path, save_top(&trainer.top()).unwrap()).unwrap();
            let ours = read_tensors(path.to_str().unwrap());
            std::fs::remove_file(&path).ok();
            let reference = read_tensors(&format!("{FIXTURES}/{name}_step{step}.safetensors"));
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                reference.keys().collect::<Vec<_>>(),
                "tensor names"
            );
            for (tensor, (shape, values)) in &reference {
                let (our_shape, ours) = &ours[tensor];
                assert_eq!(our_shape, shape, "{tensor}");
                let diff = max_abs_diff(ours, values);
                assert!(
                    diff < 1e-5,
                    "{name} step {step}: {tensor} differs by {diff}"
                );
            }
        }
    }
}

use std::path::Path;
use std::sync::Arc;

use deep_pipelines::classification::FitFacts;
use std::process::Command;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::Float64Type;
use deep_pipelines::prelude::*;

use crate::common::{collect, few_per_class, images};

/// `[StringIndexer(label -> labelIndex), DeepImageClassifier(Lite0, trainableBlocks 1)]`,
/// a short fit for tests.
fn quick_pipeline(classifier: &DeepImageClassifier) -> Pipeline {
    Pipeline::new()
        .with_estimator(
            // `keep`: a cross-validation fold's training half may lack a class of a small
            // sample (folds are keyed on the rows' values, file paths included, so they differ
            // from clone to clone); that class's rows in the other half get an index of their own.
            StringIndexer::new()
                .with_input_col("label")
                .with_output_col("labelIndex")
                .with_string_order_type("alphabetAsc")
                .with_handle_invalid("keep"),
        )
        .with_estimator(classifier.clone())
}

fn quick_classifier() -> DeepImageClassifier {
    DeepImageClassifier::new()
        .with_label_col("labelIndex")
        .with_trainable_blocks(1)
        .with_epochs(2)
        .with_seed(3)
}

/// `column`'s vectors (f64 lists) by row.
fn vectors(batch: &RecordBatch, column: &str) -> Vec<Vec<u64>> {
    let lists = batch
        .column_by_name(column)
        .unwrap_or_else(|| panic!("no column {column}"));
    // In memory a fixed-size list; read back from the CLI's Parquet, a plain list.
    let value = |row| match lists.as_fixed_size_list_opt() {
        Some(fixed) => fixed.value(row),
        None => lists.as_list::<i32>().value(row),
    };
    (0..lists.len())
        .map(|row| {
            value(row)
                .as_primitive::<Float64Type>()
                .values()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect()
}

async fn predictions_by_origin(model: &PipelineModel, folder: &Path) -> RecordBatch {
    let ctx = SessionContext::new();
    let images = read_images(&ctx, folder.to_str().unwrap(), ReadImagesOptions::default()).unwrap();
    let out = model
        .transform(images)
        .unwrap()
        .sort(vec![col("origin").sort(true, false)])
        .unwrap()
        .select_columns(&["origin", "rawPrediction", "probability", "prediction"])
        .unwrap();
    collect(out).await
}

#[tokio::test]
async fn fitted_classifier_saves_loads_in_a_fresh_process_and_predicts_the_same() {
    let ctx = SessionContext::new();
    let classifier = quick_classifier();
    let model = quick_pipeline(&classifier)
        .fit(&images(&ctx, "train", 0.1))
        .await
        .unwrap();
    let fitted = model.stage::<DeepImageClassifierModel>().unwrap();
    assert_eq!(fitted.num_classes(), 10);
    assert_eq!(fitted.history().len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("model");
    model.save(&saved).unwrap();
    assert!(saved.join("stages").exists() || saved.join("metadata.json").exists());
    let few = few_per_class(dir.path(), "test", 2);
    let here = predictions_by_origin(&model, &few).await;
    assert_eq!(here.num_rows(), 20);

    // Loaded in this process.
    let loaded = PipelineModel::load(&saved).unwrap();
    let again = predictions_by_origin(&loaded, &few).await;
    assert_eq!(
        vectors(&again, "rawPrediction"),
        vectors(&here, "rawPrediction")
    );

    // Loaded in a fresh process: the CLI applies the saved model.
    let out_file = dir.path().join("applied.parquet");
    let out = Command::new(common::cli_binary())
        .args([
            "apply",
            saved.to_str().unwrap(),
            few.to_str().unwrap(),
            "-o",
        ])
        .arg(&out_file)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = ctx
        .read_parquet(out_file.to_str().unwrap(), Default::default())
        .await
        .unwrap()
        .sort(vec![col("origin").sort(true, false)])
        .unwrap();
    let applied = collect(applied).await;
    for column in ["rawPrediction", "probability"] {
        assert_eq!(
            vectors(&applied, column),
            vectors(&here, column),
            "{column} differs between this process and a fresh one"
        );
    }
    let predicted = |b: &RecordBatch| -> Vec<f64> {
        b.column_by_name("prediction")
            .unwrap()
            .as_primitive::<Float64Type>()
            .values()
            .to_vec()
    };
    assert_eq!(predicted(&applied), predicted(&here));

    // As a SQL function: the prediction field of `classify(image)` is the model's prediction.
    let sql = SessionContext::new();
    register_images_table(
        &sql,
        "few",
        few.to_str().unwrap(),
        ReadImagesOptions::default(),
    )
    .unwrap();
    register_model(&sql, "classify", &loaded).unwrap();
    let rows = collect(
        sql.sql("SELECT origin, classify(image)['prediction'] AS p FROM few ORDER BY origin")
            .await
            .unwrap(),
    )
    .await;
    let via_sql: Vec<f64> = rows
        .column(1)
        .as_primitive::<Float64Type>()
        .values()
        .to_vec();
    assert_eq!(via_sql, predicted(&here));
}

#[tokio::test]
async fn cross_validation_runs_the_frozen_trunk_once_per_image() {
    let ctx = SessionContext::new();
    let train = images(&ctx, "train", 0.08).cache().await.unwrap();
    let rows = train.clone().count().await.unwrap() as u64;
    let classifier = quick_classifier().with_epochs(1);
    let grid = ParamGridBuilder::new()
        .add_grid(Estimator::uid(&classifier), "learningRate", [1e-3, 3e-3])
        .build();
    let evaluator = MulticlassClassificationEvaluator::new()
        .with_label_col("labelIndex")
        .with_metric_name("accuracy");
    let cv = CrossValidator::new(quick_pipeline(&classifier), grid, evaluator).with_num_folds(2);
    let model = cv.fit(&train).await.unwrap();
    // 2 folds x 2 param maps + the final fit = 5 fits; each image went through the trunk
    // once, with its mirror image (horizontalFlip).
    assert_eq!(model.avg_metrics().len(), 2);
    assert_eq!(classifier.trunk_images(), 2 * rows);
    assert!(classifier.trunk_cache_bytes() > 0);
    // Another cut is another trunk.
    let other = classifier.clone().with_trainable_blocks(2);
    quick_pipeline(&other).fit(&train).await.unwrap();
    assert_eq!(classifier.trunk_images(), 4 * rows);
}

#[tokio::test]
async fn bad_settings_are_errors_naming_the_param_or_model() {
    let ctx = SessionContext::new();
    let train = images(&ctx, "train", 0.02);
    let fit = |classifier: DeepImageClassifier| {
        let train = train.clone();
        async move {
            quick_pipeline(&classifier)
                .fit(&train)
                .await
                .unwrap_err()
                .to_string()
        }
    };
    let message = fit(quick_classifier().with_model_name("ResNet18")).await;
    assert!(
        message.contains("fine-tuning supports") && message.contains("EfficientNetLite0"),
        "{message}"
    );
    let message = fit(quick_classifier().with_trainable_blocks(18)).await;
    assert!(
        message.contains("trainableBlocks") && message.contains("17 trainable blocks"),
        "{message}"
    );
    let message = fit(quick_classifier().with_optimizer("adam")).await;
    assert!(message.contains("optimizer"), "{message}");
    let message = fit(quick_classifier().with_learning_rate(0.0)).await;
    assert!(message.contains("learningRate"), "{message}");
    // A label column of strings: index it first.
    let message = DeepImageClassifier::new()
        .fit(&train)
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains("StringIndexer"), "{message}");
}

#[tokio::test]
async fn validation_split_keeps_the_best_epoch_and_stops_after_patience() {
    let ctx = SessionContext::new();
    let train = images(&ctx, "train", 0.1).cache().await.unwrap();
    let rows = train.clone().count().await.unwrap();
    let classifier = quick_classifier()
        .with_epochs(8)
        .with_validation_fraction(0.3)
        .with_patience(2);
    let model = quick_pipeline(&classifier).fit(&train).await.unwrap();
    let facts = model
        .stage::<DeepImageClassifierModel>()
        .unwrap()
        .fit_facts()
        .clone();
    assert_eq!(facts.training_rows + facts.validation_rows, rows);
    assert_eq!(
        facts.validation_rows,
        (rows as f64 * 0.3).round() as usize,
        "the held-out share"
    );
    let losses: Vec<f64> = facts
        .history
        .iter()
        .map(|e| e.validation_loss.expect("a validation loss every epoch"))
        .collect();
    assert!(
        facts
            .history
            .iter()
            .all(|e| e.validation_accuracy.is_some())
    );
    // The kept epoch has the lowest validation loss (the first of equals).
    let best = losses
        .iter()
        .enumerate()
        .fold(
            (0, f64::INFINITY),
            |b, (i, &l)| if l < b.1 { (i, l) } else { b },
        )
        .0
        + 1;
    assert_eq!(facts.best_epoch, best, "validation losses {losses:?}");
    // It ran all epochs, or stopped `patience` epochs after the best one.
    assert!(
        losses.len() == 8 || losses.len() == best + 2,
        "stopped after {} epochs, best {best}: {losses:?}",
        losses.len()
    );
}

/// What a distributed fit does (Python, Spark): the frozen trunk's activations written to a file
/// by `trunk_stage`'s output, the top trained on that file. It must be the in-memory fit.
#[tokio::test]
async fn a_fit_on_spilled_activations_is_the_in_memory_fit() {
    let ctx = SessionContext::new();
    let train = images(&ctx, "train", 0.05).cache().await.unwrap();
    let indexed = StringIndexer::new()
        .with_input_col("label")
        .with_output_col("labelIndex")
        .with_string_order_type("alphabetAsc")
        .fit(&train)
        .await
        .unwrap()
        .transform(train)
        .unwrap();
    let classifier = quick_classifier();
    let in_memory = classifier.fit(&indexed).await.unwrap();

    let spiller = quick_classifier();
    let trunk = spiller.trunk_stage("activations").unwrap();
    let rows = collect(
        trunk
            .transform(indexed.clone())
            .unwrap()
            .select_columns(&["activations", "labelIndex"])
            .unwrap(),
    )
    .await;
    let width = spiller.activation_len().unwrap();
    let activations = rows.column(0).as_fixed_size_list();
    assert_eq!(activations.value_length() as usize, width);
    let labels = rows.column(1).as_primitive::<Float64Type>();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activations.f32");
    let mut bytes = Vec::new();
    let mut kept = Vec::new();
    for row in 0..rows.num_rows() {
        assert!(activations.is_valid(row));
        let values = activations.value(row);
        for v in values
            .as_primitive::<datafusion::arrow::datatypes::Float32Type>()
            .values()
        {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        kept.push(labels.value(row) as usize);
    }
    std::fs::write(&path, &bytes).unwrap();
    let spilled = spiller.fit_spilled(&path, kept.clone(), 0).unwrap();
    // The same rows, losses and accuracies, epoch by epoch (only the timings differ).
    let learned = |facts: &FitFacts| {
        let epochs: Vec<_> = facts.history.iter().map(|e| (e.loss, e.accuracy)).collect();
        (
            facts.num_classes,
            facts.training_rows,
            facts.best_epoch,
            epochs,
        )
    };
    assert_eq!(learned(spilled.fit_facts()), learned(in_memory.fit_facts()));

    let few = few_per_class(dir.path(), "test", 1);
    let here = predictions_by_origin(&PipelineModel::of(Arc::new(in_memory)), &few).await;
    let there = predictions_by_origin(&PipelineModel::of(Arc::new(spilled)), &few).await;
    assert_eq!(
        vectors(&there, "rawPrediction"),
        vectors(&here, "rawPrediction")
    );

    // A file that does not hold one row per label is refused, naming it.
    let message = spiller
        .fit_spilled(&path, [kept.clone(), vec![0]].concat(), 0)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("activations.f32") && message.contains("expected"),
        "{message}"
    );
}
