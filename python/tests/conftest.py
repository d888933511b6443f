"""Shared fixtures: the repository's data, and one Spark session (local[2]) for the whole run."""

import os
import shutil
import sys
from pathlib import Path

import pytest

from cluster import cluster, cluster_spark  # noqa: F401  (a standalone cluster: cluster.py)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "fashion-mnist-small"
FIXTURES = ROOT / "tests" / "fixtures"

# Executors run this interpreter (the venv the wheel is installed in).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def key(origin):
    """`class/file.png` of a path or file: URI (file names repeat across class folders)."""
    return "/".join(origin.rstrip("/").split("/")[-2:])


def spark_images(spark, *paths):
    """Spark's `image` source over `paths`, with the class (parent folder) as `class`."""
    import pyspark.sql.functions as F

    df = spark.read.format("image").option("recursiveFileLookup", "true").load([str(p) for p in paths])
    return df.withColumn("class", F.regexp_extract("image.origin", r"/([^/]+)/[^/]+$", 1))


def seed_pipeline():
    """The flow of examples/spark/transfer_learning.py: StringIndexer, DeepImageFeaturizer,
    Spark's LogisticRegression (made when called: under Spark Connect, Connect's stages)."""
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import StringIndexer

    from deep_pipelines.spark import DeepImageFeaturizer

    return Pipeline(
        stages=[
            StringIndexer(inputCol="class", outputCol="label"),
            DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="EfficientNetLite0"),
            LogisticRegression(maxIter=200, regParam=1e-3),
        ]
    )


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("deep-pipelines-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def few_images(tmp_path_factory):
    """64 test images (8 per class of the first 8 classes, in class folders) plus one corrupt
    file, `broken/corrupt.png`: what the parity and bad-input tests read."""
    root = tmp_path_factory.mktemp("few")
    classes = sorted(p.name for p in (DATA / "test").iterdir() if p.is_dir())[:8]
    for c in classes:
        (root / c).mkdir()
        for f in sorted((DATA / "test" / c).glob("*.png"))[:8]:
            shutil.copy(f, root / c / f.name)
    (root / "broken").mkdir()
    good = next((DATA / "test" / classes[0]).glob("*.png")).read_bytes()
    (root / "broken" / "corrupt.png").write_bytes(good[: len(good) // 3])
    return root


def pytest_collection_modifyitems(items):
    """The cluster's tests first: its SparkContext then never has to stop the local one."""
    items.sort(key=lambda item: "cluster_spark" not in getattr(item, "fixturenames", ()))
