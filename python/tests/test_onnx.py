"""ONNX model files (``modelFile``) from Python: pyarrow, Spark local[2] and Spark's persistence,
against PyTorch's outputs (tests/fixtures/onnx/make_fixtures.py). The cluster's run is in
test_cluster.py."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

import deep_pipelines as dp

from conftest import FIXTURES

ONNX = FIXTURES / "onnx"
EXPECTED = json.loads((ONNX / "expected.json").read_text())
TOLERANCE = 1e-4


def model_copy(folder, name):
    """The fixture model `name` (file, description, labels) copied into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in (f"{name}.onnx", f"{name}.json", "labels.txt"):
        shutil.copy(ONNX / f, folder / f)
    return str(folder / f"{name}.onnx")


@pytest.fixture(scope="module")
def onnx_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_images")
    for name in EXPECTED["images"]:
        shutil.copy(ONNX / name, folder / name)
    return folder


def by_image(origins, values):
    return {os.path.basename(o): np.array(v, dtype=np.float32) for o, v in zip(origins, values)}


def assert_like_torch(model, rows, what="pooled"):
    assert sorted(rows) == EXPECTED["images"]
    for k, name in enumerate(EXPECTED["images"]):
        want = np.array(EXPECTED["models"][model][what][k], dtype=np.float32)
        diff = np.abs(rows[name] - want).max()
        assert diff < TOLERANCE, (model, name, diff)


@pytest.mark.parametrize("model", ["cnn_bn", "convnext_block", "tiny_vit"])
def test_pyarrow_featurizer_matches_pytorch(onnx_images, model):
    table = dp.read_images(onnx_images)
    out = dp.DeepImageFeaturizer(modelFile=str(ONNX / f"{model}.onnx"), batchSize=2).transform(table)
    origins = [i["origin"] for i in out["image"].to_pylist()]
    assert_like_torch(model, by_image(origins, out["features"].to_pylist()))
    predicted = dp.DeepImagePredictor(modelFile=str(ONNX / f"{model}.onnx"), topK=3).transform(table)
    top = predicted["predicted_labels"].to_pylist()[0]
    logits = np.array(EXPECTED["models"][model]["logits"][EXPECTED["images"].index(
        os.path.basename(origins[0]))])
    assert top[0]["class"] == int(logits.argmax())
    assert top[0]["label"] == f"class{int(logits.argmax())}"  # labels.txt beside the file


def test_a_text_model_is_refused_naming_the_file(onnx_images):
    table = dp.read_images(onnx_images)
    stage = dp.DeepImageFeaturizer(modelFile=str(ONNX / "hostile" / "text_input.onnx"))
    with pytest.raises(Exception, match=r"text_input\.onnx.*not an image model"):
        stage.transform(table)


def test_spark_featurizer_runs_a_model_file_and_its_saved_stage_carries_it(spark, onnx_images, tmp_path):
    from deep_pipelines.spark import DeepImageFeaturizer

    source = model_copy(tmp_path / "source", "convnext_block")
    df = spark.read.format("image").load(str(onnx_images))
    stage = DeepImageFeaturizer(modelFile=source, outputFormat="array", batchSize=3)
    out = stage.transform(df)
    shutil.rmtree(tmp_path / "source")  # executors get the model from the task, not this path
    rows = out.select("image.origin", "features").collect()
    assert_like_torch("convnext_block", by_image([r[0] for r in rows], [r[1] for r in rows]))

    model_copy(tmp_path / "source", "convnext_block")
    saved = str(tmp_path / "stage")
    stage.write().overwrite().save(saved)
    shutil.rmtree(tmp_path / "source")
    loaded = DeepImageFeaturizer.load(saved)
    assert loaded.getOrDefault("modelFile") != source
    rows = loaded.transform(df).select("image.origin", "features").collect()
    assert_like_torch("convnext_block", by_image([r[0] for r in rows], [r[1] for r in rows]))
