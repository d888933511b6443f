"""deep_pipelines.sparkdl: sparkdl 1.x's API. Its README's examples (v1.6.0, the last 1.x release)
run here as the README has them, only their imports changed, and are checked for what sparkdl
promised: names, params, defaults, output types, row counts.

The examples name `InceptionV3`, whose torchvision weights cannot be downloaded here. The tests
supply an InceptionV3 of their own, as a user supplies converted weights: a model folder in
$DEEP_PIPELINES_MODEL_DIR (on the driver and, through SparkContext.environment, in the executors)
holding `inception_v3/manifest.json` and random-valued weights with the tensor names and shapes of
torchvision's checkpoint (tests/fixtures/zoo/tensors/inception_v3.txt), made by
`write_random_weights` below. The native InceptionV3 runs on them: shapes, schemas and row counts
are real; its predictions mean nothing, and nothing here checks accuracy."""

import hashlib
import inspect
import json
import math
import os
import re
import shutil

import numpy as np
import pyspark.sql.functions as F
import pytest
from pyspark.errors import AnalysisException
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegressionModel
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import DenseVector, VectorUDT
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

import deep_pipelines as dp
from deep_pipelines import spark as native_spark
from deep_pipelines import sparkdl

from conftest import DATA, ROOT

README = "https://github.com/databricks/spark-deep-learning/blob/v1.6.0/README.md"
IMAGENET_LABELS = (ROOT / "models" / "imagenet_classes.txt").read_text().splitlines()

# sparkdl's DeepImagePredictor output with decodePredictions (named_image.py, decodedSchema).
SPARKDL_DECODED = ArrayType(
    StructType(
        [
            StructField("class", StringType(), False),
            StructField("description", StringType(), False),
            StructField("probability", FloatType(), False),
        ]
    ),
    True,
)


# ---------------------------------------------------------------- the README's examples, verbatim

# "Working with images in Spark" (the imageIO.readImagesWithCustomFn block is not Python: its
# decode_f is a placeholder, `<your image library, see imageIO.PIL_decode>`).
WORKING_WITH_IMAGES = '''\
from pyspark.ml.image import ImageSchema
image_df = ImageSchema.readImages("/data/myimages")
'''
SHOW = '''\
image_df.show()
'''

# "Transfer learning".
TRANSFER_LEARNING = '''\
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml import Pipeline
from sparkdl import DeepImageFeaturizer

featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="InceptionV3")
lr = LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3, labelCol="label")
p = Pipeline(stages=[featurizer, lr])

model = p.fit(train_images_df)    # train_images_df is a dataset of images and labels

# Inspect training error
df = model.transform(train_images_df.limit(10)).select("image", "probability",  "uri", "label")
predictionAndLabels = df.select("prediction", "label")
evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
print("Training set accuracy = " + str(evaluator.evaluate(predictionAndLabels)))
'''

# "Applying popular image models".
APPLYING_POPULAR_MODELS = '''\
from pyspark.ml.image import ImageSchema
from sparkdl import DeepImagePredictor

image_df = ImageSchema.readImages(sample_img_dir)

predictor = DeepImagePredictor(inputCol="image", outputCol="predicted_labels", modelName="InceptionV3", decodePredictions=True, topK=10)
predictions_df = predictor.transform(image_df)
'''

# "Deploying models as SQL functions": the registration from a model file (the Keras-model
# blocks build `InceptionV3(weights="imagenet")` with Keras), the table, and the query.
REGISTER_KERAS_FILE = '''\
from sparkdl.udf.keras_image_model import registerKerasImageUDF

registerKerasImageUDF("my_custom_keras_model_udf", "/tmp/model-full-tmp.h5")
'''
SQL_TABLE = '''\
from pyspark.ml.image import ImageSchema

image_df = ImageSchema.readImages(sample_img_dir)
image_df.registerTempTable("sample_images")
'''
SQL_QUERY = "SELECT my_custom_keras_model_udf(image) as predictions from sample_images"

# Not run: the TensorFlow / Keras blocks (KerasImageFileEstimator, TFImageTransformer,
# KerasImageFileTransformer, TFTransformer, KerasTransformer, registerKerasImageUDF of a Keras
# model): they build TensorFlow graphs and Keras models, which deep-pipelines does not run.

IMPORTS = {
    "from pyspark.ml.image import ImageSchema": "from deep_pipelines.sparkdl import ImageSchema",
    "from sparkdl.udf.keras_image_model import registerKerasImageUDF":
        "from deep_pipelines.sparkdl import registerKerasImageUDF",
}


def only_imports_changed(snippet: str) -> str:
    """The README snippet with its sparkdl (and Spark 2.3 ImageSchema) imports pointed at
    deep_pipelines.sparkdl; every other line as the README has it."""
    out = []
    for line in snippet.splitlines():
        new = IMPORTS.get(line, re.sub(r"^from sparkdl import ", "from deep_pipelines.sparkdl import ", line))
        assert new == line or line.startswith("from "), line
        out.append(new)
    return "\n".join(out) + "\n"


def run_readme(snippet: str, namespace: dict) -> dict:
    exec(compile(only_imports_changed(snippet), README, "exec"), namespace)
    return namespace


# ---------------------------------------------------------------- an InceptionV3 of the tests' own


def write_random_weights(tensor_list, path, seed=0) -> str:
    """A safetensors file with every tensor `tensor_list` names (name, [shape], float32 a line),
    random-valued: convolutions and linear layers He-normal, BatchNorms the identity (weight and
    running_var 1, bias and running_mean 0), biases 0. Returns its sha256."""
    entries = []
    for line in tensor_list.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        assert dtype == "float32", line
        entries.append((name, json.loads(shape)))
    header, offset = {}, 0
    for name, shape in entries:
        end = offset + 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(text).to_bytes(8, "little"), text):
            sha.update(chunk)
            f.write(chunk)
        for name, shape in entries:
            n = math.prod(shape)
            if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
                values = np.ones(n, np.float32)
            elif name.endswith(("bias", "running_mean")):
                values = np.zeros(n, np.float32)
            else:
                std = np.float32(math.sqrt(2.0 / math.prod(shape[1:])))
                values = rng.standard_normal(n, dtype=np.float32) * std
            chunk = values.astype("<f4").tobytes()
            sha.update(chunk)
            f.write(chunk)
    return sha.hexdigest()


@pytest.fixture(scope="module")
def inception_v3(spark, tmp_path_factory):
    """A model folder with InceptionV3 (random weights), searched first by the driver and by
    the executors' Python workers while this module's tests run."""
    models = tmp_path_factory.mktemp("models")
    folder = models / "inception_v3"
    folder.mkdir()
    sha = write_random_weights(
        ROOT / "tests" / "fixtures" / "zoo" / "tensors" / "inception_v3.txt",
        folder / "weights.safetensors",
    )
    manifest = json.loads((ROOT / "models" / "inception_v3" / "manifest.json").read_text())
    manifest["description"] = "Inception v3 with random test weights (untrained)"
    manifest["weights"] = {
        "file": "weights.safetensors",
        "sha256": sha,
        "source": "python/tests/test_sparkdl.py write_random_weights",
        "license": "test data",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))

    env = spark.sparkContext.environment
    saved = os.environ.get(dp.MODEL_DIR_ENV), env.get(dp.MODEL_DIR_ENV)
    os.environ[dp.MODEL_DIR_ENV] = env[dp.MODEL_DIR_ENV] = str(models)
    yield models
    for mapping, value in zip((os.environ, env), saved):
        if value is None:
            mapping.pop(dp.MODEL_DIR_ENV, None)
        else:
            mapping[dp.MODEL_DIR_ENV] = value


@pytest.fixture(scope="module")
def sample_img_dir(tmp_path_factory):
    """Four images in one folder (readImages reads a folder's files, not its sub-folders)."""
    folder = tmp_path_factory.mktemp("sample_images")
    for f in ("chelsea.png", "coffee.png"):
        shutil.copy(ROOT / "tests" / "fixtures" / "photos" / f, folder / f)
    for c in ("bag", "sneaker"):
        f = sorted((DATA / "test" / c).glob("*.png"))[0]
        shutil.copy(f, folder / f"{c}-{f.name}")
    return str(folder)


@pytest.fixture(scope="module")
def train_images_df(spark, tmp_path_factory):
    """What the README leaves to the user: images with `uri` and a numeric `label` (2 classes x
    2 Fashion-MNIST images)."""
    root = tmp_path_factory.mktemp("train")
    classes = ["bag", "sneaker"]
    for c in classes:
        for f in sorted((DATA / "train" / c).glob("*.png"))[:2]:
            shutil.copy(f, root / f"{c}-{f.name}")
    df = sparkdl.ImageSchema.readImages(str(root))
    cls = F.regexp_extract("image.origin", r"/([a-z-]+)-[^/]+$", 1)
    label = F.array_position(F.array(*map(F.lit, classes)), cls) - 1
    df = df.withColumn("uri", F.col("image.origin")).withColumn("label", label.cast("double"))
    return df.coalesce(1)  # one Python worker loads the network


def decoded_rows(rows, col):
    return [[(e["class"], e["description"], e["probability"]) for e in r[col]] for r in rows]


# ---------------------------------------------------------------- the README, run


def test_readme_working_with_images(spark, sample_img_dir, capsys):
    # The README's folder is a literal, "/data/myimages": the test's folder stands in for it.
    snippet = WORKING_WITH_IMAGES.replace('"/data/myimages"', "myimages")
    ns = run_readme(snippet + SHOW, {"myimages": sample_img_dir})
    image_df = ns["image_df"]
    assert image_df.columns == ["image"]
    assert image_df.schema["image"].dataType.names == sparkdl.ImageSchema.imageFields
    assert image_df.count() == 4
    shown = capsys.readouterr().out  # image_df.show() printed the images
    assert "|               image|" in shown and shown.count("|{file:") == 4


def test_readme_transfer_learning(spark, inception_v3, train_images_df, capsys):
    ns = {"train_images_df": train_images_df}
    # The README's own slip, which fails on sparkdl too: `df` keeps `probability` but not
    # `prediction`, and the next line selects `prediction`.
    with pytest.raises(AnalysisException, match="prediction"):
        run_readme(TRANSFER_LEARNING, ns)
    model = ns["model"]
    featurizer, lr = model.stages
    assert isinstance(featurizer, sparkdl.DeepImageFeaturizer)
    assert featurizer.getModelName() == "InceptionV3" and featurizer.getScaleHint() == "SCALE_AREA_AVERAGING"
    assert isinstance(lr, LogisticRegressionModel) and lr.numClasses == 2
    assert lr.numFeatures == 2048  # InceptionV3's pooled Mixed_7c
    assert ns["df"].columns == ["image", "probability", "uri", "label"]

    # The README's last lines, on `df` as the README meant it: `prediction` kept.
    ns["df"] = (
        model.transform(train_images_df.limit(10))
        .select("image", "prediction", "probability", "uri", "label")
        .cache()
    )
    run_readme(TRANSFER_LEARNING[TRANSFER_LEARNING.index("predictionAndLabels = "):], ns)
    assert re.search(r"Training set accuracy = [01]\.\d+", capsys.readouterr().out)
    assert ns["df"].count() == 4
    ns["df"].unpersist()


def test_readme_applying_popular_image_models(spark, inception_v3, sample_img_dir):
    ns = run_readme(APPLYING_POPULAR_MODELS, {"sample_img_dir": sample_img_dir})
    predictions_df = ns["predictions_df"]
    assert predictions_df.schema["predicted_labels"].dataType == SPARKDL_DECODED
    rows = predictions_df.select("image.origin", "predicted_labels").collect()
    assert len(rows) == 4
    wnids = sparkdl.imagenet_wnids()
    for row in rows:
        entries = row.predicted_labels
        assert len(entries) == 10
        probabilities = [e.probability for e in entries]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-5
        for e in entries:
            assert e["class"] in wnids and e.description == IMAGENET_LABELS[wnids.index(e["class"])]

    # The same classes as the native core's, the index written as its WordNet id.
    local = dp.DeepImagePredictor(modelName="InceptionV3", topK=10).transform(dp.read_images(sample_img_dir))
    expected = {
        os.path.basename(o): [(wnids[e["class"]], e["label"]) for e in p]
        for o, p in zip(local["origin"].to_pylist(), local["predicted_labels"].to_pylist())
    }
    got = {os.path.basename(r.origin): [(e["class"], e.description) for e in r.predicted_labels] for r in rows}
    assert got == expected


def test_readme_sql_functions(spark, inception_v3, sample_img_dir):
    # The README's registration from a (Keras) model file: a clear error, naming what to use.
    with pytest.raises(NotImplementedError, match="registerNamedImageUDF"):
        run_readme(REGISTER_KERAS_FILE, {})
    # Registered from a model name instead, under the README's function name.
    sparkdl.registerNamedImageUDF("my_custom_keras_model_udf", "InceptionV3")
    run_readme(SQL_TABLE, {"sample_img_dir": sample_img_dir})
    out = spark.sql(SQL_QUERY)
    assert out.schema["predictions"].dataType == ArrayType(FloatType(), True)
    rows = out.collect()
    assert len(rows) == 4
    for r in rows:
        assert len(r.predictions) == 1000 and abs(sum(r.predictions) - 1) < 1e-3


# ---------------------------------------------------------------- sparkdl's params and defaults


def test_params_and_defaults_are_sparkdls():
    featurizer = sparkdl.DeepImageFeaturizer()
    assert sorted(p.name for p in featurizer.params) == ["inputCol", "modelName", "outputCol", "scaleHint"]
    assert featurizer.getScaleHint() == "SCALE_AREA_AVERAGING"
    assert not any(featurizer.hasDefault(n) for n in ("inputCol", "outputCol", "modelName"))
    assert str(inspect.signature(sparkdl.DeepImageFeaturizer.__init__)) == (
        "(self, inputCol=None, outputCol=None, modelName=None, scaleHint='SCALE_AREA_AVERAGING')"
    )

    predictor = sparkdl.DeepImagePredictor()
    assert sorted(p.name for p in predictor.params) == [
        "decodePredictions", "inputCol", "modelName", "outputCol", "topK"
    ]
    assert predictor.getOrDefault("decodePredictions") is False and predictor.getOrDefault("topK") == 5
    assert predictor.getOutputCol() == predictor.uid + "__output"
    assert not predictor.hasDefault("inputCol") and not predictor.hasDefault("modelName")
    assert str(inspect.signature(sparkdl.DeepImagePredictor.__init__)) == (
        "(self, inputCol=None, outputCol=None, modelName=None, decodePredictions=False, topK=5)"
    )
    assert str(inspect.signature(sparkdl.DeepImagePredictor.setParams)) == (
        "(self, inputCol=None, outputCol=None, modelName=None, decodePredictions=False, topK=5)"
    )
    # The native module keeps its own defaults.
    assert native_spark.DeepImagePredictor().getOrDefault("decodePredictions") is True
    assert native_spark.DeepImageFeaturizer().getModelName() == "EfficientNetLite0"


def test_model_names_map_to_native_models_and_xception_is_a_clear_error():
    assert sparkdl.SUPPORTED_MODELS == ["InceptionV3", "ResNet50", "VGG16", "VGG19"]
    for name in sparkdl.SUPPORTED_MODELS:
        stage = sparkdl.DeepImageFeaturizer(inputCol="image", outputCol="f", modelName=name)
        native = stage._native()
        assert native.getModelName() == name and name in dp.available_models()
        predictor = sparkdl.DeepImagePredictor(inputCol="image", modelName=name, topK=3)._native()
        assert (predictor.getModelName(), predictor.getTopK(), predictor.getDecodePredictions()) == (name, 3, False)
    # deep-pipelines' own names are taken too.
    assert sparkdl.DeepImagePredictor(modelName="EfficientNetLite0").getModelName() == "EfficientNetLite0"
    for cls in (sparkdl.DeepImageFeaturizer, sparkdl.DeepImagePredictor):
        with pytest.raises(ValueError, match="Xception.*no deep-pipelines implementation.*InceptionV3"):
            cls(modelName="Xception")
        with pytest.raises(TypeError, match="NASNet.*not in the supported list"):
            cls(modelName="NASNet")
    with pytest.raises(TypeError, match="scaleHint"):
        sparkdl.DeepImageFeaturizer(scaleHint="BICUBIC")
    for hint in sparkdl.SCALE_HINTS:
        assert sparkdl.DeepImageFeaturizer(scaleHint=hint).getScaleHint() == hint
    with pytest.raises(ValueError, match="set inputCol, modelName"):
        sparkdl.DeepImagePredictor().transform(None)


def test_wnids_are_the_imagenet_classes_in_class_order():
    wnids = sparkdl.imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    # A few classes of the order Keras's imagenet_class_index.json gives.
    assert (wnids[0], IMAGENET_LABELS[0]) == ("n01440764", "tench")
    assert (wnids[281], IMAGENET_LABELS[281]) == ("n02123045", "tabby")
    assert (wnids[999], IMAGENET_LABELS[999]) == ("n15075141", "toilet tissue")


def test_output_types_with_the_bundled_model(spark, sample_img_dir):
    image_df = sparkdl.ImageSchema.readImages(sample_img_dir)
    featurizer = sparkdl.DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="EfficientNetLite0")
    features = featurizer.transform(image_df)
    assert isinstance(features.schema["features"].dataType, VectorUDT)
    native = native_spark.DeepImageFeaturizer(outputFormat="array").transform(image_df)
    ours = {r.origin: r.f for r in features.select("image.origin", vector_to_array("features").alias("f")).collect()}
    theirs = {r.origin: r.features for r in native.select("image.origin", "features").collect()}
    assert ours.keys() == theirs.keys() and len(ours) == 4
    assert all(len(ours[k]) == 1280 and np.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)

    predictor = sparkdl.DeepImagePredictor(inputCol="image", modelName="EfficientNetLite0")
    out = predictor.transform(image_df)
    col = predictor.uid + "__output"
    assert isinstance(out.schema[col].dataType, VectorUDT)
    vectors = [r[col] for r in out.collect()]
    assert all(isinstance(v, DenseVector) and v.size == 1000 and abs(v.toArray().sum() - 1) < 1e-3 for v in vectors)

    predictor.setParams(outputCol="top", decodePredictions=True, topK=3)
    decoded = predictor.transform(image_df)
    assert decoded.schema["top"].dataType == SPARKDL_DECODED
    native = native_spark.DeepImagePredictor(topK=3).transform(image_df)
    wnids = sparkdl.imagenet_wnids()
    expected = {
        r.origin: [(wnids[e["class"]], e.label, e.probability) for e in r.predicted_labels]
        for r in native.select("image.origin", "predicted_labels").collect()
    }
    got = {r.origin: decoded_rows([r], "top")[0] for r in decoded.select("image.origin", "top").collect()}
    assert got == expected


def test_null_and_undecodable_images_give_null(spark, few_images):
    df = sparkdl.ImageSchema.readImages(str(few_images), recursive=True).where("image.origin like '%/broken/%'")
    out = sparkdl.DeepImagePredictor(
        inputCol="image", outputCol="p", modelName="EfficientNetLite0", decodePredictions=True
    ).transform(df)
    assert [r.p for r in out.collect()] == [None]


def test_a_missing_weight_file_names_it(spark, sample_img_dir):
    image_df = sparkdl.ImageSchema.readImages(sample_img_dir)
    with pytest.raises(Exception, match="resnet50-0676ba61.pth"):
        sparkdl.DeepImageFeaturizer(inputCol="image", outputCol="f", modelName="ResNet50").transform(image_df)


def test_stages_save_and_load_with_sparks_persistence(spark, sample_img_dir, tmp_path):
    image_df = sparkdl.ImageSchema.readImages(sample_img_dir)
    featurizer = sparkdl.DeepImageFeaturizer(
        inputCol="image", outputCol="features", modelName="InceptionV3", scaleHint="SCALE_FAST"
    )
    predictor = sparkdl.DeepImagePredictor(inputCol="image", modelName="VGG16", decodePredictions=True, topK=2)
    model = Pipeline(stages=[featurizer, predictor]).fit(image_df)  # no transform: no weights needed
    model.write().overwrite().save(str(tmp_path / "model"))
    f, p = PipelineModel.load(str(tmp_path / "model")).stages
    assert isinstance(f, sparkdl.DeepImageFeaturizer) and isinstance(p, sparkdl.DeepImagePredictor)
    assert f.uid == featurizer.uid and p.uid == predictor.uid
    assert (f.getInputCol(), f.getOutputCol(), f.getModelName(), f.getScaleHint()) == (
        "image", "features", "InceptionV3", "SCALE_FAST"
    )
    assert (p.getInputCol(), p.getOutputCol(), p.getModelName(), p.getDecodePredictions(), p.getTopK()) == (
        "image", predictor.uid + "__output", "VGG16", True, 2
    )


# ---------------------------------------------------------------- reading images


def test_read_images_as_spark_2_3_and_sparkdl_0x_did(spark, few_images):
    from pyspark.ml.image import ImageSchema as SparkImageSchema

    assert sparkdl.ImageSchema.columnSchema == SparkImageSchema.columnSchema
    path = str(few_images)
    assert sparkdl.ImageSchema.readImages(path).count() == 0  # the files are in sub-folders
    everything = sparkdl.ImageSchema.readImages(path, recursive=True)
    assert everything.columns == ["image"] and everything.count() == 65
    assert sparkdl.ImageSchema.readImages(path, recursive=True, dropImageFailures=True).count() == 64
    assert sparkdl.ImageSchema.readImages(path, recursive=True, numPartitions=3).rdd.getNumPartitions() == 3
    sample = sparkdl.ImageSchema.readImages(path, recursive=True, sampleRatio=0.5, seed=1).count()
    assert 0 < sample < 65
    with pytest.raises(ValueError, match="sampleRatio"):
        sparkdl.ImageSchema.readImages(path, sampleRatio=2.0)
    old = sparkdl.readImages(str(few_images / "broken"))
    assert old.columns == ["filePath", "image"] and old.first().filePath.endswith("/broken/corrupt.png")


def test_tensorflow_and_keras_stages_are_clear_errors():
    for name in (
        "TFImageTransformer", "TFTransformer", "TFInputGraph", "KerasImageFileTransformer",
        "KerasTransformer", "KerasImageFileEstimator", "imageInputPlaceholder", "registerKerasImageUDF",
    ):
        with pytest.raises(NotImplementedError, match=f"{name} runs TensorFlow / Keras models"):
            getattr(sparkdl, name)(inputCol="image", outputCol="out")
