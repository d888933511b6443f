"""Transfer learning on Spark with deep_pipelines: sparkdl's article, on Spark 4.

Reads the bundled Fashion-MNIST images with Spark's `image` source, featurizes them with a
pretrained EfficientNet-Lite0 (the Rust core, per Arrow batch, in the executors), fits Spark's
own LogisticRegression on the features, evaluates, saves and reloads the fitted pipeline with
Spark's persistence, and classifies images from SQL.

    pip install deep_pipelines-*.whl "pyspark>=4.1" "pandas<3"
    python examples/spark/transfer_learning.py            # from the repository root
"""

import os
import sys
import tempfile
import time
from pathlib import Path

from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import IndexToString, StringIndexer
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from deep_pipelines.spark import DeepImageFeaturizer, register_image_udf

DATA = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-small"


def images(spark, folder):
    """Spark's image source; the class is the image's folder name."""
    df = spark.read.format("image").option("recursiveFileLookup", "true").load(str(folder))
    return df.withColumn("class", F.regexp_extract("image.origin", r"/([^/]+)/[^/]+$", 1))


def main():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("deep-pipelines transfer learning")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    train, test = images(spark, DATA / "train"), images(spark, DATA / "test")

    indexer = StringIndexer(inputCol="class", outputCol="label").fit(train)
    pipeline = Pipeline(
        stages=[
            indexer,
            DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="EfficientNetLite0"),
            LogisticRegression(maxIter=200, regParam=1e-3),
            IndexToString(inputCol="prediction", outputCol="predictedClass", labels=indexer.labels),
        ]
    )
    start = time.time()
    model = pipeline.fit(train)
    print(f"fitted on {train.count()} images in {time.time() - start:.1f} s")

    predictions = model.transform(test)
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(predictions)
    print(f"test accuracy: {accuracy:.3f} on {test.count()} images")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fashion-model")
        model.write().overwrite().save(path)  # Spark's own persistence
        reloaded = PipelineModel.load(path)
        again = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(reloaded.transform(test))
        print(f"reloaded pipeline's accuracy: {again:.3f}")

    # SQL: an ImageNet classifier as a function of the image column.
    register_image_udf(spark, "imagenet_top3", modelName="EfficientNetLite0", topK=3)
    test.createOrReplaceTempView("test_images")
    spark.sql(
        "SELECT class, imagenet_top3(image)[0].label AS imagenet_guess FROM test_images LIMIT 5"
    ).show(truncate=False)
    spark.stop()


if __name__ == "__main__":
    main()
