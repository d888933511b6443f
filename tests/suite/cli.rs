//! The `deep-pipelines` command line, driven as a user would: `fit` on the bundled images with
//! `--test` (accuracy, confusion matrix, a saved model), `apply` of that model, `fit
//! --fine-tune`, `featurize` of a folder with a broken file, `models`, and errors that name the
//! file and exit non-zero.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;

fn cli(args: &[&str]) -> Output {
    Command::new(common::cli_binary())
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A string column as Rust strings (Parquet reads them back as Utf8View).
fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let column = cast(batch.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
    let column = column.as_string::<i32>();
    (0..column.len())
        .map(|r| column.is_valid(r).then(|| column.value(r).to_string()))
        .collect()
}

#[tokio::test]
async fn fit_with_test_then_apply_the_saved_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("fitted-model");
    let train = format!("{}/train", common::DATA);
    let test = format!("{}/test", common::DATA);
    let out = cli(&[
        "fit",
        &train,
        "-o",
        model.to_str().unwrap(),
        "--test",
        &test,
    ]);
    let stdout = text(&out.stdout);
    println!("{stdout}\n{}", text(&out.stderr));
    assert!(out.status.success());
    let accuracy: f64 = stdout
        .split("accuracy ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(accuracy >= 0.84, "test accuracy {accuracy}");
    assert!(stdout.contains("confusion matrix"), "{stdout}");
    // Progress lines on stderr (not a terminal here: plain lines, the last one at the end).
    assert!(text(&out.stderr).contains("test: featurize: 500/500 images"));

    // Saving over it needs --overwrite.
    let again = cli(&["fit", &train, "-o", model.to_str().unwrap(), "-q"]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("--overwrite"));

    let predictions = dir.path().join("out/predictions.parquet");
    let out = cli(&[
        "apply",
        model.to_str().unwrap(),
        &test,
        "-o",
        predictions.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).is_empty(),
        "--quiet printed {}",
        text(&out.stderr)
    );
    let batch = common::read_parquet(&predictions).await;
    assert_eq!(batch.num_rows(), 500);
    let origins = strings(&batch, "origin");
    let labels = strings(&batch, "predictedLabel");
    let right = origins
        .iter()
        .zip(&labels)
        .filter(|(origin, label)| {
            let folder = Path::new(origin.as_deref().unwrap()).parent().unwrap();
            folder.file_name().unwrap().to_str() == label.as_deref()
        })
        .count();
    let apply_accuracy = right as f64 / 500.0;
    assert!(
        (apply_accuracy - accuracy).abs() < 1e-9,
        "apply {apply_accuracy} vs fit's test {accuracy}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");

    // The saved model as a SQL function over an image folder gives apply's labels.
    let few = dir.path().join("few");
    std::fs::create_dir_all(&few).unwrap();
    for (i, origin) in origins.iter().take(12).enumerate() {
        std::fs::copy(origin.as_deref().unwrap(), few.join(format!("{i:02}.png"))).unwrap();
    }
    let via_sql = dir.path().join("sql.parquet");
    let out = cli(&[
        "sql",
        "SELECT origin, classify(image)['label'] AS label FROM photos ORDER BY origin",
        "--images",
        &format!("photos={}", few.display()),
        "--model",
        &format!("classify={}", model.display()),
        "-o",
        via_sql.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sql_labels = strings(&common::read_parquet(&via_sql).await, "label");
    let expected: Vec<Option<String>> = labels.iter().take(12).cloned().collect();
    assert_eq!(sql_labels, expected);
}

#[tokio::test]
async fn fit_fine_tune_reports_epochs_and_the_model_applies() {
    let dir = tempfile::tempdir().unwrap();
    let train = common::few_per_class(dir.path(), "train", 5);
    let test = common::few_per_class(dir.path(), "test", 2);
    let model = dir.path().join("tuned");
    let out = cli(&[
        "fit",
        train.to_str().unwrap(),
        "-o",
        model.to_str().unwrap(),
        "--fine-tune",
        "1",
        "--epochs",
        "2",
        "--test",
        test.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("fine-tuned 1 blocks of EfficientNetLite0: 2 epochs"),
        "{stdout}"
    );
    assert!(stdout.contains("test: 20 images, accuracy"), "{stdout}");
    assert!(
        stderr.contains("fit: frozen trunk: 50/50 images"),
        "{stderr}"
    );
    assert!(stderr.contains("fit: epoch 2: loss"), "{stderr}");

    let predictions = dir.path().join("predictions.parquet");
    let out = cli(&[
        "apply",
        model.to_str().unwrap(),
        test.to_str().unwrap(),
        "-o",
        predictions.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let batch = common::read_parquet(&predictions).await;
    assert_eq!(batch.num_rows(), 20);
    assert!(
        strings(&batch, "predictedLabel")
            .iter()
            .all(Option::is_some)
    );
}

#[tokio::test]
async fn featurize_writes_features_and_a_reason_per_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("bag")).unwrap();
    for name in ["00018.png", "00030.png"] {
        std::fs::copy(
            format!("{}/test/bag/{name}", common::DATA),
            images.join("bag").join(name),
        )
        .unwrap();
    }
    std::fs::write(
        images.join("bag/broken.png"),
        b"\x89PNG\r\n\x1a\n truncated",
    )
    .unwrap();
    let output = dir.path().join("features.parquet");
    let out = cli(&[
        "featurize",
        images.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "--output-type",
        "float16",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let batch = common::read_parquet(&output).await;
    assert_eq!(batch.num_rows(), 3);
    // Written as a plain list (every Parquet reader opens a null row of one).
    let features = batch.column_by_name("features").unwrap().as_list::<i32>();
    for r in (0..3).filter(|&r| features.is_valid(r)) {
        assert_eq!(features.value_length(r), 1280);
    }
    let decode_errors = strings(&batch, "image_error");
    let origins = strings(&batch, "origin");
    for r in 0..3 {
        let broken = origins[r].as_deref().unwrap().ends_with("broken.png");
        assert_eq!(features.is_null(r), broken, "row {r}");
        assert_eq!(
            decode_errors[r].is_some(),
            broken,
            "row {r}: {:?}",
            decode_errors[r]
        );
    }

    // The features file, queried with SQL.
    let out = cli(&[
        "sql",
        "SELECT count(*) AS n, count(features) AS with_features FROM feats",
        "--parquet",
        &format!("feats={}", output.display()),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("| 3 | 2 "), "{table}");
    let bad = cli(&["sql", "SELECT 1", "--parquet", "nameonly"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("NAME=PATH"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn models_and_errors_name_what_is_wrong() {
    let out = cli(&["models"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    let lite0 = stdout
        .lines()
        .find(|l| l.starts_with("EfficientNetLite0 "))
        .unwrap();
    assert!(
        lite0.contains("installed") && lite0.contains("1280"),
        "{lite0}"
    );

    let missing = cli(&["featurize", "no/such/folder", "-o", "x.parquet"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("no/such/folder"),
        "{}",
        text(&missing.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let out = cli(&[
        "featurize",
        common::DATA,
        "-o",
        dir.path().join("f.parquet").to_str().unwrap(),
        "--model",
        "NoSuchNet",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("NoSuchNet"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("f.parquet").exists());

    let usage = cli(&["featurize"]);
    assert_eq!(usage.status.code(), Some(2));
}

/// From a folder outside the repository, with no `$DEEP_PIPELINES_MODEL_DIR` and an empty
/// home: the binary's built-in EfficientNet-Lite0 featurizes and predicts. Then the lookup
/// order, each folder holding a broken copy in turn: `--model-dir`, the variable, `./models`
/// and the user's data folder are each searched before the built-in weights.
#[tokio::test]
async fn from_any_folder_the_built_in_model_runs_after_the_model_folders() {
    let work = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let images = common::few_per_class(work.path(), "test", 1);
    let run = |command: &str, env: &[(&str, &std::path::Path)], extra: &[&str]| {
        let mut cmd = Command::new(common::cli_binary());
        cmd.args([command, images.to_str().unwrap(), "-o", "out.parquet", "-q"])
            .args(extra)
            .current_dir(work.path())
            .env_remove(deep_pipelines::models::MODEL_DIR_ENV)
            .env_remove("XDG_DATA_HOME")
            .env("HOME", home.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    // Each image's features, by origin (the two partitions finish in any order).
    let features = || async {
        let batch = common::read_parquet(&work.path().join("out.parquet")).await;
        assert_eq!(batch.num_rows(), 10);
        let column = batch.column_by_name("features").unwrap().as_list::<i32>();
        assert_eq!(column.null_count(), 0);
        let origins = strings(&batch, "origin");
        (0..batch.num_rows())
            .map(|r| {
                let values = column.value(r);
                let values = values.as_primitive::<datafusion::arrow::datatypes::Float32Type>();
                (origins[r].clone().unwrap(), values.values().to_vec())
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let out = run("featurize", &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built_in = features().await;
    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/models");
    let out = run("featurize", &[], &["--model-dir", models]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        &built_in,
        &features().await,
        "built-in weights = the repository's"
    );
    let out = run("predict", &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let batch = common::read_parquet(&work.path().join("out.parquet")).await;
    assert_eq!(batch.num_rows(), 10);

    // A broken copy (the manifest, garbage weights) in a folder: found there, so it fails
    // naming that folder, before the built-in weights are tried.
    let broken = |root: &std::path::Path| {
        let folder = root.join("efficientnet_lite0");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("weights.safetensors"), b"garbage").unwrap();
        root.to_path_buf()
    };
    let fails_in = |out: Output, root: &std::path::Path| {
        assert_eq!(out.status.code(), Some(1));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(&root.display().to_string()), "{stderr}");
    };
    let user = broken(&home.path().join(".local/share/deep-pipelines/models"));
    fails_in(run("featurize", &[], &[]), &user);
    let xdg = tempfile::tempdir().unwrap();
    let xdg_models = broken(&xdg.path().join("deep-pipelines/models"));
    fails_in(
        run("featurize", &[("XDG_DATA_HOME", xdg.path())], &[]),
        &xdg_models,
    );
    let local = broken(&work.path().join("models"));
    fails_in(
        run("featurize", &[], &[]),
        std::path::Path::new("models/efficientnet_lite0"),
    );
    let env = tempfile::tempdir().unwrap();
    let env_models = broken(env.path());
    let variable = [(deep_pipelines::models::MODEL_DIR_ENV, env_models.as_path())];
    fails_in(run("featurize", &variable, &[]), &env_models);
    // The variable pointing at good weights wins over the broken ./models and data folder.
    let good = [(
        deep_pipelines::models::MODEL_DIR_ENV,
        std::path::Path::new(models),
    )];
    let out = run("featurize", &good, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&local).unwrap();

    // A model with no built-in weights: the error names the folders searched.
    let out = run("featurize", &[], &["--model", "SqueezeNet1_1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not found") && stderr.contains("searched in order: models"),
        "{stderr}"
    );
}
