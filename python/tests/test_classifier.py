"""Fine-tuning from Python: deep_pipelines.DeepImageClassifier on pyarrow tables, and
deep_pipelines.spark.DeepImageClassifier in a Spark pipeline (the frozen trunk in the executors,
the top trained on the driver from a spill file). The two fits see the same rows in the same
order, so they must agree; the spill path itself is the Rust in-memory fit (a Rust test)."""

import shutil

import numpy as np
import pyarrow as pa
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import StringIndexer
from pyspark.ml.functions import vector_to_array

import deep_pipelines as dp
from deep_pipelines.spark import DeepImageClassifier, DeepImageClassifierModel

from conftest import DATA, key, spark_images

CLASSES = sorted(p.name for p in (DATA / "train").iterdir() if p.is_dir())
PARAMS = dict(labelCol="labelIndex", trainableBlocks=1, epochs=3, seed=3, batchSize=16)


def few(root, split, per_class):
    """The first `per_class` images of each class of `split`, copied under `root`."""
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for f in sorted((DATA / split / c).glob("*.png"))[:per_class]:
            shutil.copy(f, root / c / f.name)
    return root


def local_table(path):
    """Images with `labelIndex` (the class's alphabetical rank), sorted by origin."""
    table = dp.read_images(path, labelFromFolder=True).sort_by("origin")
    index = pa.array([float(CLASSES.index(c)) for c in table["label"].to_pylist()])
    return table.append_column("labelIndex", index)


def accuracy(predictions, labels):
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-tune")
    return few(root / "train", "train", 30), few(root / "test", "test", 10)


@pytest.fixture(scope="module")
def local_fit(data):
    train, _ = data
    epochs = []
    model = dp.DeepImageClassifier(**PARAMS).fit(
        local_table(train), progress=lambda stats, line: epochs.append((stats, line))
    )
    return model, epochs


def test_local_fit_reports_each_epoch_and_predicts(local_fit, data, tmp_path):
    model, epochs = local_fit
    assert [s["epoch"] for s, _ in epochs] == [1, 2, 3]
    assert all("loss" in line for _, line in epochs)
    assert model.fitFacts["numClasses"] == 10 and model.fitFacts["trainingRows"] == 300
    test = local_table(data[1])
    out = model.transform(test)
    assert out["prediction"].null_count == 0
    assert accuracy(out["prediction"].to_pylist(), test["labelIndex"].to_pylist()) >= 0.5
    # Saved in the Rust API's format: the Rust loader reads it and predicts the same.
    model.save(tmp_path / "model")
    again = dp.PipelineModel.load(tmp_path / "model").transform(test)
    assert again["rawPrediction"].to_pylist() == out["rawPrediction"].to_pylist()


def test_local_fit_errors_name_the_param_or_column(data):
    with pytest.raises(ValueError, match="trainableBlocks"):
        dp.DeepImageClassifier(trainableBlocks=99).fit(local_table(data[1]))
    with pytest.raises(ValueError, match="unknown param"):
        dp.DeepImageClassifier(epoch=3)
    with pytest.raises(ValueError, match="labelCol|label"):
        dp.DeepImageClassifier(labelCol="nope").fit(local_table(data[1]))
    strings = dp.read_images(data[1], labelFromFolder=True)
    with pytest.raises(ValueError, match="StringIndexer"):
        dp.DeepImageClassifier(labelCol="label", epochs=1).fit(strings)


def spark_table(spark, path):
    """Spark's images of `path` in `local_table`'s order."""
    return spark_images(spark, path).orderBy("image.origin")


def test_spark_fit_equals_the_local_fit_and_survives_save_load(spark, local_fit, data, tmp_path):
    train, test = data
    lines = []
    classifier = DeepImageClassifier(**PARAMS).setProgress(lambda stats, line: lines.append(line))
    pipeline = Pipeline(
        stages=[
            StringIndexer(inputCol="class", outputCol="labelIndex", stringOrderType="alphabetAsc"),
            classifier,
        ]
    )
    fitted = pipeline.fit(spark_table(spark, train))
    stage = fitted.stages[-1]
    assert isinstance(stage, DeepImageClassifierModel)
    assert len(lines) == 3
    local_model, _ = local_fit
    assert stage.fitFacts["trainingRows"] == local_model.fitFacts["trainingRows"]
    for ours, theirs in zip(stage.fitFacts["history"], local_model.fitFacts["history"]):
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-4, (ours, theirs)

    def predicted(model):
        rows = (
            model.transform(spark_table(spark, test))
            .select("image.origin", "labelIndex", "prediction", vector_to_array("probability").alias("p"))
            .collect()
        )
        return {key(r.origin): (r.labelIndex, r.prediction, r.p) for r in rows}

    here = predicted(fitted)
    assert len(here) == 100
    spark_accuracy = accuracy([v[1] for v in here.values()], [v[0] for v in here.values()])
    local_out = local_model.transform(local_table(test))
    local_accuracy = accuracy(local_out["prediction"].to_pylist(), local_out["labelIndex"].to_pylist())
    assert abs(spark_accuracy - local_accuracy) <= 0.02, (spark_accuracy, local_accuracy)

    fitted.write().overwrite().save(str(tmp_path / "pipeline"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    assert loaded.stages[-1].fitFacts == stage.fitFacts
    again = predicted(loaded)
    assert again.keys() == here.keys()
    for k in here:
        assert again[k][1] == here[k][1]
        assert np.allclose(again[k][2], here[k][2], atol=1e-6)


def test_spark_fit_refuses_string_labels_naming_the_column(spark, data):
    df = spark_table(spark, data[1])
    with pytest.raises(ValueError, match="StringIndexer"):
        DeepImageClassifier(labelCol="class").fit(df)
    with pytest.raises(ValueError, match="labelCol `nope`"):
        DeepImageClassifier(labelCol="nope").fit(df)
