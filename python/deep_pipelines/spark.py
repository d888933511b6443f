"""sparkdl's API on Spark 4: pretrained-network stages as ``pyspark.ml`` Transformers.

The stages run the deep-pipelines native core on Arrow batches inside the executors
(``mapInArrow``; no per-row Python), load each model once per Python worker, save and load with
Spark's own ``PipelineModel.write().save()`` / ``PipelineModel.load()``, and drop into a
``pyspark.ml.Pipeline`` next to Spark's estimators::

    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from deep_pipelines.spark import DeepImageFeaturizer

    images = spark.read.format("image").load("photos/")     # or binaryFile's `content`
    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features",
                                     modelName="EfficientNetLite0")
    model = Pipeline(stages=[featurizer, LogisticRegression(labelCol="label")]).fit(train)

SQL: :func:`register_image_udf`. A pipeline fitted and saved by the Rust API: :func:`transform`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import pyarrow as pa
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructField, StructType

from deep_pipelines import _native

__all__ = [
    "DeepImageFeaturizer",
    "DeepImagePredictor",
    "register_image_udf",
    "transform",
]


# ---------------------------------------------------------------- Arrow <-> Spark types


def _spark_arrow_type(t: pa.DataType) -> pa.DataType:
    """The Arrow type Spark can take for ``t`` (Spark has no fixed-size lists, float16 or
    unsigned integers)."""
    if pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(pa.field("element", _spark_arrow_type(t.value_type), True))
    if pa.types.is_struct(t):
        return pa.struct(
            [pa.field(f.name, _spark_arrow_type(f.type), True) for f in t]
        )
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_uint8(t) or pa.types.is_uint16(t):
        return pa.int32()
    if pa.types.is_uint32(t) or pa.types.is_uint64(t):
        return pa.int64()
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_dictionary(t):
        return _spark_arrow_type(t.value_type)
    return t


def _to_spark_array(array: pa.Array) -> pa.Array:
    target = _spark_arrow_type(array.type)
    return array if array.type == target else array.cast(target)


def _spark_field(field: pa.Field) -> StructField:
    from pyspark.sql.pandas.types import from_arrow_type

    return StructField(field.name, from_arrow_type(_spark_arrow_type(field.type)), True)


def _arrow_schema(df: DataFrame) -> pa.Schema:
    """The Arrow schema of the batches ``mapInArrow`` hands over for ``df``, as far as the
    native pipeline needs it to plan: columns Arrow cannot describe here (e.g. ML vectors) are
    left out; they still pass through untouched."""
    from pyspark.sql.pandas.types import to_arrow_schema

    conf = df.sparkSession.conf
    timezone = conf.get("spark.sql.session.timeZone")
    large = (conf.get("spark.sql.execution.arrow.useLargeVarTypes", "false") or "").lower() == "true"
    fields = []
    for field in df.schema.fields:
        try:
            schema = to_arrow_schema(
                StructType([field]), timezone=timezone, prefers_large_types=large
            )
        except Exception:  # a type Arrow conversion does not cover: not an input we read
            continue
        fields.append(schema.field(0))
    return pa.schema(fields)


# ---------------------------------------------------------------- executor side

# One native transformer per (kind, spec) per Python worker process: Spark reuses workers
# (spark.python.worker.reuse), so a model loads once per worker, not once per task or batch.
_CACHE: Dict[Tuple[str, str], Any] = {}


def _init_threads(num_threads: int) -> None:
    """The native pool's size in a Spark worker: ``numThreads`` if set, else the task's CPUs
    (``spark.task.cpus``), so that Spark's parallel tasks do not oversubscribe the cores."""
    if num_threads <= 0:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        num_threads = ctx.cpus() if ctx is not None else os.cpu_count() or 1
    _native.init_threads(num_threads)


def _cached(kind: str, spec: str, num_threads: int):
    key = (kind, spec)
    native = _CACHE.get(key)
    if native is None:
        _init_threads(num_threads)
        if kind == "stage":
            cls, params = json.loads(spec)
            native = _native.Transformer.stage(cls, params)
        elif kind == "load":
            native = _native.Transformer.load(spec)
        elif kind == "stage_function":
            name, cls, params = json.loads(spec)
            native = _native.ImageFunction.stage(name, cls, params)
        elif kind == "load_function":
            name, path = json.loads(spec)
            native = _native.ImageFunction.load(name, path)
        else:  # pragma: no cover - internal
            raise ValueError(kind)
        _CACHE[key] = native
    return native


def _map_batches(kind: str, spec: str, num_threads: int, new_columns):
    """The function ``mapInArrow`` runs: each batch plus the native pipeline's new columns,
    cast to types Spark takes."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        native = _cached(kind, spec, num_threads)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            out = pa.record_batch(native.transform(batch))
            arrays = list(batch.columns)
            names = list(batch.schema.names)
            for name in new_columns:
                arrays.append(_to_spark_array(out.column(name)))
                names.append(name)
            yield pa.RecordBatch.from_arrays(arrays, names=names)

    return run


def _apply(df: DataFrame, kind: str, spec: str, native, num_threads: int) -> DataFrame:
    """``df`` with the native pipeline's new columns, through ``mapInArrow``. The output schema
    is found on the driver (the native pipeline run on no rows)."""
    in_schema = _arrow_schema(df)
    out_schema = pa.schema(native.output_schema(in_schema))
    existing = set(df.schema.names)
    new = [f for f in out_schema if f.name not in existing]
    if not new:
        raise ValueError("the pipeline adds no column to the DataFrame")
    spark_schema = StructType(list(df.schema.fields) + [_spark_field(f) for f in new])
    names = [f.name for f in new]
    return df.mapInArrow(_map_batches(kind, spec, num_threads, names), spark_schema)


# ---------------------------------------------------------------- stages


_CONVERTERS = (
    (bool, TypeConverters.toBoolean),
    (int, TypeConverters.toInt),
    (float, TypeConverters.toFloat),
    (str, TypeConverters.toString),
)


def _native_params(cls):
    """Class decorator: declares the native stage's params (``cls._native_class``) as Spark
    ``Param``s with ``getX`` / ``setX``, their names, docs and defaults read from the Rust params
    type (one place for them: adding a param there adds it here). Params the class declares
    itself (Spark-only ones such as ``numThreads``) are kept."""
    specs = json.loads(_native.Transformer.stage(cls._native_class, "{}").explain_params)
    for spec in specs:
        name, default = spec["name"], spec["default"]
        if not isinstance(getattr(cls, name, None), Param):
            convert = next(c for t, c in _CONVERTERS if isinstance(default, t))
            setattr(cls, name, Param(Params._dummy(), name, spec["doc"], typeConverter=convert))
    for name in [n for n in dir(cls) if isinstance(getattr(cls, n), Param)]:
        accessor = name[0].upper() + name[1:]
        if not hasattr(cls, "get" + accessor):
            setattr(cls, "get" + accessor, lambda self, _n=name: self.getOrDefault(_n))
        if not hasattr(cls, "set" + accessor):
            setattr(cls, "set" + accessor, lambda self, value, _n=name: self._set(**{_n: value}))
    cls._native_defaults = {spec["name"]: spec["default"] for spec in specs}
    return cls


class _NetworkTransformer(Transformer, DefaultParamsReadable, DefaultParamsWritable):
    """A native network stage as a ``pyspark.ml`` Transformer: the params of the Rust stage
    (see :func:`_native_params`) plus ``numThreads``; ``__init__`` and ``setParams`` take any of
    them by keyword."""

    _native_class = ""
    _native_defaults: Dict[str, Any] = {}
    _spark_defaults: Dict[str, Any] = {}

    numThreads = Param(
        Params._dummy(),
        "numThreads",
        "native threads per Python worker; 0: the task's CPUs (spark.task.cpus)",
        typeConverter=TypeConverters.toInt,
    )

    @keyword_only
    def __init__(self, **params: Any):
        super().__init__()
        self._setDefault(**self._native_defaults, numThreads=0, **self._spark_defaults)
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, **params: Any):
        """Sets params by name (``None`` leaves one as it is); an unknown name is an error that
        lists the known ones."""
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"{self._native_class}: unknown param(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return self._set(**{k: v for k, v in params.items() if v is not None})

    def _native_params(self) -> Dict[str, Any]:
        """The native stage's params as set here. An empty ``modelDir`` stays empty: each
        executor searches its own folders (:func:`deep_pipelines.model_dirs`), never the
        driver's."""
        return {name: self.getOrDefault(name) for name in self._native_defaults}

    def _spec(self) -> str:
        return json.dumps([self._native_class, json.dumps(self._native_params(), sort_keys=True)])

    def _check_input(self, df: DataFrame) -> None:
        col = self.getOrDefault("inputCol")
        if col not in df.columns:
            raise ValueError(
                f"{self._native_class}: input column `{col}` not found; columns: {', '.join(df.columns)}"
            )
        if self.getOrDefault("outputCol") in df.columns:
            raise ValueError(
                f"{self._native_class}: output column `{self.getOrDefault('outputCol')}` already exists"
            )

    def _run(self, df: DataFrame) -> DataFrame:
        self._check_input(df)
        spec = self._spec()
        threads = self.getOrDefault("numThreads")
        native = _cached("stage", spec, threads)
        return _apply(df, "stage", spec, native, threads)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return self._run(dataset)


@_native_params
class DeepImageFeaturizer(_NetworkTransformer):
    """Adds ``outputCol``: the pretrained network's feature vector per image, a Spark ML
    ``Vector`` (``outputFormat="vector"``, what Spark's estimators take) or ``array<float>``
    (``outputFormat="array"``). ``inputCol``: Spark's ``image`` source struct (BGR; 1, 3 or 4
    channels) or encoded bytes (``binaryFile``'s ``content``). Null or undecodable images give
    null features, never a failed job. Params: ``explainParams()``."""

    _native_class = "DeepImageFeaturizer"
    _spark_defaults = {"outputFormat": "vector"}

    outputFormat = Param(
        Params._dummy(),
        "outputFormat",
        "vector (Spark ML DenseVector, default) or array (array<float>)",
        typeConverter=TypeConverters.toString,
    )

    def _transform(self, dataset: DataFrame) -> DataFrame:
        fmt = self.getOutputFormat()
        if fmt not in ("vector", "array"):
            raise ValueError(f"DeepImageFeaturizer: outputFormat `{fmt}` is not one of vector, array")
        out = self._run(dataset)
        if fmt == "vector":
            from pyspark.ml.functions import array_to_vector

            from pyspark.sql import functions as F

            col = out[self.getOutputCol()]
            # array_to_vector fails on null (an undecodable image): keep those rows null.
            out = out.withColumn(self.getOutputCol(), F.when(col.isNotNull(), array_to_vector(col)))
        return out


@_native_params
class DeepImagePredictor(_NetworkTransformer):
    """Adds ``outputCol``: the network's ImageNet predictions per image. With
    ``decodePredictions`` (default) an ``array<struct<class, label, probability>>`` of the
    ``topK`` classes, else ``array<float>`` of all class probabilities. Null or undecodable
    images give null. Params: ``explainParams()``."""

    _native_class = "DeepImagePredictor"


# ---------------------------------------------------------------- Rust-saved pipelines, SQL


def transform(df: DataFrame, path: str, numThreads: int = 0) -> DataFrame:
    """Applies a pipeline fitted and saved by the Rust API (``PipelineModel::save``) or the
    command line to a Spark DataFrame: its input columns plus every column the pipeline adds,
    row for row. ``path`` must be readable where the executors run (a shared file system)."""
    path = os.path.abspath(os.fspath(path)) if "://" not in str(path) else str(path)
    native = _cached("load", path, numThreads)
    image_col = native.image_col
    if image_col is not None and image_col not in df.columns:
        raise ValueError(
            f"the pipeline at {path} reads images from `{image_col}`, not found; "
            f"columns: {', '.join(df.columns)}"
        )
    return _apply(df, "load", path, native, numThreads)


def register_image_udf(
    spark: SparkSession,
    name: str,
    modelName: Optional[str] = None,
    model_path: Optional[str] = None,
    *,
    decodePredictions: bool = True,
    topK: int = 5,
    batchSize: int = 32,
    modelDir: Optional[str] = None,
    numThreads: int = 0,
):
    """Registers ``name`` as a Spark SQL function of an image column (Spark's ``image`` struct
    or encoded bytes): ``SELECT name(image) FROM t``. With ``modelName``, the network's ImageNet
    predictions (``array<struct<class, label, probability>>``, the ``topK`` best; all
    probabilities without ``decodePredictions``); with ``model_path``, a pipeline saved by the
    Rust API: ``struct<prediction, label, probability>`` for a classifier, else its last column.
    Runs per Arrow batch (``arrow_udf``); null for null or undecodable images. Returns the UDF."""
    try:
        from pyspark.sql.functions import arrow_udf
    except ImportError as e:  # pragma: no cover - Spark < 4.1
        raise RuntimeError("register_image_udf needs pyspark >= 4.1 (arrow_udf)") from e
    if (modelName is None) == (model_path is None):
        raise ValueError("register_image_udf: give exactly one of modelName or model_path")
    sql_name = name.lower()
    if model_path is not None:
        path = os.path.abspath(os.fspath(model_path))
        kind, spec = "load_function", json.dumps([sql_name, path])
    else:
        params = {
            "inputCol": "image",
            "outputCol": "prediction",
            "modelName": modelName,
            "decodePredictions": decodePredictions,
            "topK": topK,
            "batchSize": batchSize,
            "modelDir": modelDir or "",
        }
        kind = "stage_function"
        spec = json.dumps([sql_name, "DeepImagePredictor", json.dumps(params, sort_keys=True)])
    function = _cached(kind, spec, numThreads)
    value = pa.schema(function.return_schema()).field("value")
    return_type = _spark_field(value).dataType

    def call(images: pa.Array) -> pa.Array:
        f = _cached(kind, spec, numThreads)
        if isinstance(images, pa.ChunkedArray):
            images = images.combine_chunks()
        return _to_spark_array(pa.array(f(images)))

    udf = arrow_udf(call, return_type)
    return spark.udf.register(name, udf)
