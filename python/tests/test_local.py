"""The package without Spark: pyarrow in, pyarrow out, the same native core as the Rust API."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import deep_pipelines as dp

from conftest import DATA, FIXTURES


def test_read_images_gives_spark_image_structs_and_labels(few_images):
    table = dp.read_images(few_images, labelFromFolder=True)
    assert table.num_rows == 65
    image = table.schema.field("image").type
    assert [f.name for f in image] == ["origin", "height", "width", "nChannels", "mode", "data"]
    broken = table.filter(pc.equal(table["label"], "broken"))
    assert broken.num_rows == 1
    assert broken["image"].null_count == 1
    assert broken["image_error"][0].as_py()  # says why


def test_featurizer_gives_1280_features_and_null_for_a_corrupt_file(few_images):
    table = dp.read_images(few_images, labelFromFolder=True)
    out = dp.DeepImageFeaturizer(batchSize=16).transform(table)
    features = out["features"]
    assert features.type.list_size == 1280
    nulls = [row for row, v in enumerate(features.to_pylist()) if v is None]
    labels = out["label"].to_pylist()
    assert [labels[r] for r in nulls] == ["broken"]
    valid = np.array([v for v in features.to_pylist() if v is not None], dtype=np.float32)
    assert valid.shape == (64, 1280) and np.isfinite(valid).all() and valid.std() > 0


def test_featurizer_takes_encoded_bytes_like_the_image_struct(few_images):
    files = sorted(p for p in few_images.rglob("*.png") if p.parent.name != "broken")[:8]
    table = pa.table({"content": pa.array([p.read_bytes() for p in files], pa.large_binary())})
    from_bytes = dp.DeepImageFeaturizer(inputCol="content").transform(table)["features"]
    images = dp.read_images(few_images)
    origins = [o.split("/")[-1] for o in images["origin"].to_pylist()]
    order = [origins.index(p.name) for p in files]
    from_structs = dp.DeepImageFeaturizer().transform(images.take(order))["features"]
    a = np.array(from_bytes.to_pylist(), dtype=np.float32)
    b = np.array(from_structs.to_pylist(), dtype=np.float32)
    assert np.abs(a - b).max() <= 1e-5


def test_bad_params_and_columns_are_clear_errors(few_images):
    with pytest.raises(ValueError, match="unknown param"):
        dp.DeepImageFeaturizer(modelname="EfficientNetLite0")
    table = dp.read_images(few_images)
    with pytest.raises(ValueError, match="pictures"):
        dp.DeepImageFeaturizer(inputCol="pictures").transform(table)
    with pytest.raises(ValueError, match="batchSize"):
        dp.DeepImageFeaturizer(batchSize=0).transform(table)
    with pytest.raises(Exception, match="NoSuchNet"):
        dp.DeepImageFeaturizer(modelName="NoSuchNet").transform(table)


def test_struct_rows_are_checked_and_preprocessing_params_pass_through(few_images):
    images = dp.read_images(few_images).slice(0, 2)
    good = images["image"].combine_chunks()
    fields = {f.name: good.field(i) for i, f in enumerate(good.type)}
    # Row 1 now claims more bytes than it carries: null, with the reason in errorCol.
    height = pa.array([fields["height"][0].as_py(), 10_000], pa.int32())
    bad = pa.StructArray.from_arrays(
        [fields["origin"], height, fields["width"], fields["nChannels"], fields["mode"], fields["data"]],
        fields=list(good.type),
    )
    table = pa.table({"image": bad})
    stage = dp.DeepImageFeaturizer(resizeMode="pad", alphaBackground="#ffffff", errorCol="why")
    out = stage.transform(table)
    assert out["features"][0].is_valid and not out["features"][1].is_valid
    assert out["why"][0].as_py() is None
    assert "bytes, expected" in out["why"][1].as_py()
    crop = dp.DeepImageFeaturizer().transform(table)["features"][0].as_py()
    assert np.abs(np.array(crop) - np.array(out["features"][0].as_py())).max() > 1e-3
    with pytest.raises(ValueError, match="alphaBackground"):
        dp.DeepImageFeaturizer(alphaBackground="grey").transform(table)


# The 8 images of tests/suite/saved_v0_1.rs, in its order.
SAVED_V0_1_FILES = [
    "test/ankle-boot/00000.png", "test/ankle-boot/00023.png", "test/bag/00018.png",
    "test/bag/00030.png", "test/sneaker/00009.png", "test/sneaker/00012.png",
    "test/trouser/00002.png", "test/trouser/00003.png",
]


def saved_v0_1_images():
    """SAVED_V0_1_FILES read by the Rust reader (label from folder), in that order."""
    images = dp.read_images(DATA / "test", labelFromFolder=True)
    origins = images["origin"].to_pylist()
    rows = [next(r for r, o in enumerate(origins) if o.endswith(f)) for f in SAVED_V0_1_FILES]
    return images.take(rows)


def expected_table(name):
    """A fixture's expected output table (as the Rust test printed it): header, rows."""
    text = (FIXTURES / "saved_v0_1" / f"{name}.expected.txt").read_text()
    lines = [l for l in text.splitlines() if l.startswith("| ")]
    split = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]
    return split(lines[0]), [split(l) for l in lines[1:]]


def test_a_pipeline_saved_by_rust_0_1_predicts_what_it_did_then():
    """tests/fixtures/saved_v0_1: saved by the Rust API, with its outputs on 8 images. Labels
    exactly, probabilities within 1e-4: bit for bit until the CPU plan (issue 13) reordered the
    network's sums, as tests/suite/saved_v0_1.rs says."""
    header, rows = expected_table("pipeline_model")
    model = dp.PipelineModel.load(FIXTURES / "saved_v0_1" / "pipeline_model")
    assert [u.split("_")[0] for u in model.stage_uids] == [
        "StringIndexer", "DeepImageFeaturizer", "LogisticRegression", "IndexToString"
    ]
    out = model.transform(saved_v0_1_images())
    assert len(rows) == out.num_rows == 8
    p, l = header.index("probability"), header.index("predictedLabel")
    for got_p, got_l, row in zip(out["probability"].to_pylist(), out["predictedLabel"].to_pylist(), rows):
        want = [float(x) for x in row[p].strip("[]").split(",")]
        assert np.allclose(got_p, want, rtol=0, atol=1e-4), (got_p, want)
        assert got_l == row[l]


def test_bfloat16_precision_is_a_param(few_images):
    table = dp.read_images(few_images)
    table = table.filter(pc.is_valid(table["image"]))
    f32 = np.array(dp.DeepImageFeaturizer().transform(table)["features"].to_pylist(), dtype=np.float32)
    stage = dp.DeepImageFeaturizer(precision="bfloat16")
    assert stage.getParams()["precision"] == "bfloat16"
    bf16 = np.array(stage.transform(table)["features"].to_pylist(), dtype=np.float32)
    # The bfloat16 plan's tolerance on real images: each image's features within 8% of their
    # float32 norm (README "How it runs").
    error = np.linalg.norm(bf16 - f32, axis=1) / np.linalg.norm(f32, axis=1)
    assert error.max() <= 0.08, error.max()
    with pytest.raises(ValueError, match="precision"):
        dp.DeepImageFeaturizer(precision="half").transform(table)


def test_local_transform_of_an_empty_table_has_the_output_schema(few_images):
    empty = dp.read_images(few_images).slice(0, 0)
    out = dp.DeepImageFeaturizer().transform(empty)
    assert out.num_rows == 0 and "features" in out.schema.names


def test_every_native_network_stage_has_a_local_class_with_its_params():
    for name in ("DeepImageFeaturizer", "DeepImagePredictor"):
        assert name in dp.__all__
        stage = getattr(dp, name)(batchSize=4)
        params = stage.getParams()
        assert params["batchSize"] == 4 and params["modelName"] == "EfficientNetLite0"
        assert "inputCol" in type(stage).__doc__ and "errorCol" in type(stage).__doc__


def test_metrics_count_rows_images_and_null_reasons(few_images):
    stage = dp.DeepImageFeaturizer(batchSize=16)
    assert stage.metrics()["rows"] == 0
    table = dp.read_images(few_images)
    stage.transform(table)
    metrics = stage.metrics()
    assert metrics["rows"] == 65 and metrics["images"] == 64, metrics
    assert metrics["nullRows"] == {"truncated": 1}, metrics
    # Each record batch's valid images, 16 per forward pass.
    passes = sum(-(-(b.num_rows - b["image"].null_count) // 16) for b in table.to_batches())
    assert metrics["forwardPasses"] == passes and metrics["device"] == "cpu", metrics
    assert metrics["imagesPerSecond"] > 0
