"""deep_pipelines.spark in a local[2] Spark session: the stages as pyspark.ml Transformers, Spark's
own persistence, SQL functions, and a Rust-saved pipeline applied to a Spark DataFrame. Features
are compared with the Rust featurizer's (through the local API) for the same files."""

import os
import shutil

import numpy as np
import pyspark.sql.functions as F
import pytest
from pyspark.ml import PipelineModel
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructType

import deep_pipelines as dp
from deep_pipelines.spark import (
    DeepImageFeaturizer,
    DeepImagePredictor,
    register_image_udf,
    transform,
)

from conftest import DATA, FIXTURES, key, seed_pipeline, spark_images
from test_local import SAVED_V0_1_FILES

TOLERANCE = 1e-5
CLASSES = sorted(p.name for p in (DATA / "train").iterdir() if p.is_dir())


def rust_features(path):
    """The Rust featurizer's features for the images under `path`, by `class/file`."""
    out = dp.DeepImageFeaturizer().transform(dp.read_images(path))
    return {
        key(o): (None if f is None else np.asarray(f, dtype=np.float64))
        for o, f in zip(out["origin"].to_pylist(), out["features"].to_pylist())
    }


def assert_features_equal(spark_rows, rust):
    assert set(spark_rows) == set(rust)
    assert spark_rows["broken/corrupt.png"] is None and rust["broken/corrupt.png"] is None
    worst = max(
        np.abs(np.asarray(spark_rows[k], dtype=np.float64) - rust[k]).max()
        for k in rust
        if rust[k] is not None
    )
    assert worst <= TOLERANCE, worst


# The flow of examples/spark/transfer_learning.py.
@pytest.fixture(scope="module")
def fitted(spark):
    return seed_pipeline().fit(spark_images(spark, DATA / "train"))


def test_transfer_learning_with_sparks_logistic_regression_reaches_084(spark, fitted):
    predictions = fitted.transform(spark_images(spark, DATA / "test"))
    assert isinstance(predictions.schema["features"].dataType, VectorUDT)
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(predictions)
    print(f"test accuracy {accuracy:.4f}")
    assert accuracy >= 0.84


def test_features_from_the_image_source_equal_the_rust_featurizers(spark, few_images):
    df = spark_images(spark, few_images)
    out = DeepImageFeaturizer(outputFormat="array").transform(df)
    assert out.schema["features"].dataType == ArrayType(FloatType(), True)
    rows = {key(r.origin): r.features for r in out.select("image.origin", "features").collect()}
    assert_features_equal(rows, rust_features(few_images))


def test_features_from_binary_file_bytes_equal_the_rust_featurizers(spark, few_images):
    df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(few_images))
    out = DeepImageFeaturizer(inputCol="content", outputCol="vec").transform(df)
    rows = {
        key(r.path): r.f
        for r in out.select(
            "path", F.when(out.vec.isNotNull(), vector_to_array("vec", "float32")).alias("f")
        ).collect()
    }
    assert_features_equal(rows, rust_features(few_images))


def test_preprocessing_params_and_error_col_reach_the_executors(spark, few_images):
    df = spark_images(spark, few_images)
    out = DeepImageFeaturizer(outputFormat="array", resizeMode="pad", errorCol="why").transform(df)
    rows = {key(r.origin): (r.features, r.why) for r in out.select("image.origin", "features", "why").collect()}
    # Spark's image source marks an undecodable file with mode -1 (and keeps no reason): null,
    # and a reason saying so.
    features, why = rows["broken/corrupt.png"]
    assert features is None and why.startswith(
        "invalid image struct: Spark's image source could not decode this file"
    ), why
    assert all(w is None for k, (f, w) in rows.items() if k != "broken/corrupt.png")
    rust = dp.DeepImageFeaturizer(resizeMode="pad").transform(dp.read_images(few_images))
    rust = {
        key(o): (None if f is None else np.asarray(f, dtype=np.float64))
        for o, f in zip(rust["origin"].to_pylist(), rust["features"].to_pylist())
    }
    assert_features_equal({k: f for k, (f, _) in rows.items()}, rust)
    cropped = rust_features(few_images)
    assert max(np.abs(rust[k] - cropped[k]).max() for k in rust if rust[k] is not None) > 1e-3


def test_metrics_of_a_job_reach_the_driver(spark, few_images):
    stage = DeepImageFeaturizer(outputFormat="array")
    assert stage.metrics() is None
    out = stage.transform(spark_images(spark, few_images))
    assert out.count() == 65
    metrics = stage.metrics()
    # Every task's rows, once; the corrupt file is a null row with its reason.
    assert metrics["rows"] == 65 and metrics["images"] == 64, metrics
    assert list(metrics["nullRows"].values()) == [1], metrics
    assert metrics["imagesPerSecond"] > 0


def test_a_pipeline_model_saves_and_loads_in_a_fresh_session(spark, fitted, few_images, tmp_path):
    path = str(tmp_path / "fitted")
    fitted.write().overwrite().save(path)

    def predictions(session, model):
        df = spark_images(session, few_images).where("class != 'broken'")
        rows = model.transform(df).select("image.origin", "prediction", "probability").collect()
        return {key(r.origin): (r.prediction, r.probability.toArray()) for r in rows}

    before = predictions(spark, fitted)
    fresh = spark.newSession()
    loaded = PipelineModel.load(path)
    featurizer = loaded.stages[1]
    assert isinstance(featurizer, DeepImageFeaturizer)
    assert featurizer.getModelName() == "EfficientNetLite0" and featurizer.getOutputCol() == "features"
    after = predictions(fresh, loaded)
    assert before.keys() == after.keys() and len(before) == 64
    for k in before:
        assert before[k][0] == after[k][0]
        assert np.abs(before[k][1] - after[k][1]).max() <= 1e-9


def test_sql_functions_return_typed_structs(spark, few_images):
    register_image_udf(spark, "imagenet_top5", modelName="EfficientNetLite0")
    register_image_udf(spark, "saved_predictor", model_path=str(FIXTURES / "saved_v0_1" / "predictor"))
    # A fitted classifier saved by the Rust API (its StringIndexer passes images without labels).
    register_image_udf(spark, "classify", model_path=str(FIXTURES / "saved_v0_1" / "pipeline_model"))
    spark_images(spark, few_images).createOrReplaceTempView("few_images")
    df = spark.sql(
        "SELECT image.origin AS origin, imagenet_top5(image) AS top, "
        "saved_predictor(image) AS saved, classify(image) AS c FROM few_images"
    )
    assert df.schema["c"].dataType == StructType.fromDDL(
        "prediction DOUBLE, label STRING, probability DOUBLE"
    )
    entry = StructType.fromJson(df.schema["top"].dataType.elementType.jsonValue())
    assert [(f.name, f.dataType) for f in entry.fields] == [
        ("class", IntegerType()), ("label", StringType()), ("probability", FloatType())
    ]
    rows = {key(r.origin): r for r in df.collect()}
    assert rows["broken/corrupt.png"].top is None

    local = dp.DeepImagePredictor(topK=5).transform(dp.read_images(few_images))
    expected = dict(zip(map(key, local["origin"].to_pylist()), local["predicted_labels"].to_pylist()))
    for k, row in rows.items():
        if expected[k] is None:
            continue
        assert [e.label for e in row.top] == [e["label"] for e in expected[k]]
        assert np.allclose(
            [e.probability for e in row.top], [e["probability"] for e in expected[k]], atol=TOLERANCE
        )
        assert [e.label for e in row.saved] == [e.label for e in row.top[:3]]  # saved with topK=3
        assert row.c.label in CLASSES and 0.1 <= row.c.probability <= 1.0

    # The classifier's labels match what the Rust pipeline predicts for the same files.
    rust = dp.PipelineModel.load(FIXTURES / "saved_v0_1" / "pipeline_model").transform(
        dp.read_images(few_images)
    )
    predicted = dict(zip(map(key, rust["origin"].to_pylist()), rust["predictedLabel"].to_pylist()))
    for k, row in rows.items():
        if predicted[k] is not None:
            assert row.c.label == predicted[k], k


def test_sql_function_takes_the_precision_param(spark, few_images):
    with pytest.raises(Exception, match="precision"):
        register_image_udf(spark, "bad_precision", modelName="EfficientNetLite0", precision="float8")
    register_image_udf(spark, "top5_f32", modelName="EfficientNetLite0")
    register_image_udf(spark, "top5_bf16", modelName="EfficientNetLite0", precision="bfloat16")
    spark_images(spark, few_images).createOrReplaceTempView("few_images_precision")
    rows = spark.sql(
        "SELECT image.origin AS origin, top5_f32(image) AS f32, top5_bf16(image) AS bf16 "
        "FROM few_images_precision"
    ).collect()
    decoded = [r for r in rows if r.f32 is not None]
    assert decoded and all(r.bf16 is not None for r in decoded)
    for r in decoded:
        # bfloat16 products move each feature vector by a few percent of its norm (float32
        # where the CPU lacks AVX-512 BF16): the best class stays among float32's best three.
        assert r.bf16[0].label in [e.label for e in r.f32[:3]], key(r.origin)


def test_the_predictor_stage_decodes_top_k(spark, few_images):
    df = spark_images(spark, few_images).where("class != 'broken'").limit(4)
    out = DeepImagePredictor(topK=2).transform(df).select("predicted_labels").collect()
    assert all(len(r.predicted_labels) == 2 for r in out)


def test_a_pipeline_saved_by_rust_applies_to_spark_row_for_row(spark, tmp_path):
    folder = tmp_path / "saved_v0_1_images"
    for f in SAVED_V0_1_FILES:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / f, folder / f)
    path = FIXTURES / "saved_v0_1" / "pipeline_model"
    df = spark_images(spark, folder).withColumnRenamed("class", "label")
    out = transform(df, str(path)).collect()
    rust = dp.PipelineModel.load(path).transform(dp.read_images(folder, labelFromFolder=True))
    rust_rows = {key(o): i for i, o in enumerate(rust["origin"].to_pylist())}
    assert len(out) == len(rust_rows) == 8
    for row in out:
        i = rust_rows[key(row.image.origin)]
        assert row.predictedLabel == rust["predictedLabel"][i].as_py()
        assert row.prediction == rust["prediction"][i].as_py()
        assert np.abs(np.array(row.probability) - np.array(rust["probability"][i].as_py())).max() <= 1e-6
        assert np.abs(np.array(row.features) - np.array(rust["features"][i].as_py())).max() <= TOLERANCE


def test_a_missing_input_column_names_it(spark, few_images):
    df = spark_images(spark, few_images)
    with pytest.raises(ValueError, match="pictures"):
        DeepImageFeaturizer(inputCol="pictures").transform(df)


def test_spark_params_are_the_native_stages_names_docs_and_defaults():
    from deep_pipelines import _native
    import json

    for cls in (DeepImageFeaturizer, DeepImagePredictor):
        native = json.loads(_native.Transformer.stage(cls._native_class, "{}").explain_params)
        stage = cls()
        for spec in native:
            param = stage.getParam(spec["name"])
            assert param.doc == spec["doc"]
            assert stage.getOrDefault(param) == spec["default"], spec["name"]
        spark_only = {p.name for p in stage.params} - {s["name"] for s in native}
        assert spark_only <= {"numThreads", "outputFormat"}, spark_only
    featurizer = DeepImageFeaturizer(batchSize=8).setModelName("ResNet50").setErrorCol("why")
    assert isinstance(featurizer, DeepImageFeaturizer)
    assert (featurizer.getBatchSize(), featurizer.getModelName(), featurizer.getErrorCol()) == (
        8,
        "ResNet50",
        "why",
    )
    with pytest.raises(ValueError, match="unknown param.*known: .*alphaBackground"):
        DeepImagePredictor(topk=3)


def test_the_spec_executors_run_carries_no_driver_path():
    import json

    spec = json.loads(json.loads(DeepImageFeaturizer()._spec())[1])
    assert spec["modelDir"] == "", spec
    assert dp.model_dirs()[-1].endswith("deep_pipelines/models"), dp.model_dirs()


def test_the_driver_plans_with_the_manifest_alone(spark, few_images, tmp_path):
    """Planning needs no weights (a Connect client or a small driver stays light): a model
    folder whose weight file is garbage plans a transform; running it names the model."""
    folder = tmp_path / "efficientnet_lite0"
    folder.mkdir()
    shutil.copy(os.path.join(dp.model_dirs()[-1], "efficientnet_lite0", "manifest.json"), folder)
    (folder / "weights.safetensors").write_bytes(b"not safetensors")
    df = spark_images(spark, few_images)
    out = DeepImageFeaturizer(modelDir=str(tmp_path)).transform(df)
    assert "features" in out.columns
    with pytest.raises(Exception, match="EfficientNetLite0"):
        out.select("features").collect()
