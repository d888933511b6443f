"""Pretrained-network stages as ``pyspark.ml`` Transformers and a fine-tuning Estimator, with
this package's own defaults (sparkdl 1.x's exact names, defaults and output types:
:mod:`deep_pipelines.sparkdl`).

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

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Dict, Iterator, Optional, Tuple

import pyarrow as pa
from pyspark import AccumulatorParam, keyword_only
from pyspark.ml import Estimator, Model, Transformer
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import (
    DefaultParamsReadable,
    DefaultParamsReader,
    DefaultParamsWritable,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructField, StructType

from deep_pipelines import (
    _activation_rows,
    _model_files,
    _native,
    _print_epoch,
    _Spill,
    _train_top,
    _write_files,
)

__all__ = [
    "DeepImageClassifier",
    "DeepImageClassifierModel",
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


def _model_folder(digest: str, files: Dict[str, bytes]) -> str:
    """A local folder holding a model's files (written once per machine, by content)."""
    import tempfile

    parent = os.path.join(tempfile.gettempdir(), "deep-pipelines-models")
    folder = os.path.join(parent, digest)
    if not os.path.isdir(folder):
        os.makedirs(parent, exist_ok=True)
        partial = tempfile.mkdtemp(prefix=f"{digest}.", dir=parent)
        _write_files(files, partial)
        try:
            os.rename(partial, folder)
        except OSError:  # another worker wrote it first
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def _carried(native) -> Tuple[str, Dict[str, bytes]]:
    """A native stage saved into memory (its files by relative path) and their digest: what
    the executors rebuild it from (:func:`_model_folder`)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="deep-pipelines-stage-") as tmp:
        folder = os.path.join(tmp, "stage")
        native.save(folder)
        files = _model_files(folder)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    return digest.hexdigest()[:32], files


def _task_gpu() -> Optional[int]:
    """The GPU Spark gave the running task (the first address of its ``gpu`` resource, as
    ``spark.task.resource.gpu.amount`` asks), or None: on the driver, or with no GPU scheduled."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpu = ctx.resources().get("gpu") if ctx is not None else None
    if gpu is None or not gpu.addresses:
        return None
    try:
        return int(gpu.addresses[0])
    except ValueError:  # a discovery script's own naming: leave `wgpu` to mean the first GPU
        return None


def _on_gpu(params_json: str, gpu: Optional[int]) -> str:
    """Params JSON with ``device`` `wgpu` (the first GPU) moved to ``wgpu:<gpu>``."""
    params = json.loads(params_json)
    if gpu is None or params.get("device") != "wgpu":
        return params_json
    return json.dumps({**params, "device": f"wgpu:{gpu}"})


def _cached(kind: str, spec: str, num_threads: int, files: Optional[Dict[str, bytes]] = None):
    """The native object for ``(kind, spec)`` in this process, made on first use: a stage, a
    saved pipeline, a SQL function, a fine-tuning fit's trunk, or a model carried as ``files``
    (``spec`` is their digest) -- never a path of the driver's. In a task given a GPU, its
    network stages on device `wgpu` run on that GPU (`wgpu:<address>`)."""
    gpu = _task_gpu()
    key = (kind, spec, gpu)
    native = _CACHE.get(key)
    if native is None:
        _init_threads(num_threads)
        if kind == "stage":
            cls, params = json.loads(spec)
            native = _native.Transformer.stage(cls, params, gpu)
        elif kind == "load":
            native = _native.Transformer.load(spec, gpu)
        elif kind == "stage_function":
            name, cls, params = json.loads(spec)
            native = _native.ImageFunction.stage(name, cls, params, gpu)
        elif kind == "load_function":
            name, path = json.loads(spec)
            native = _native.ImageFunction.load(name, path, gpu)
        elif kind == "trunk":
            native = _native.ClassifierFit(_on_gpu(spec, gpu)).trunk(_ACTIVATIONS)
        elif kind == "files":
            native = _native.Transformer.load(_model_folder(spec, files or {}), gpu)
        else:  # pragma: no cover - internal
            raise ValueError(kind)
        _CACHE[key] = native
    return native


# ---------------------------------------------------------------- metrics

_COUNTS = ("rows", "images", "forwardPasses", "preprocessSeconds", "networkSeconds", "wallSeconds")


def _merge(into: Dict[str, Any], more: Dict[str, Any]) -> Dict[str, Any]:
    """Adds ``more``'s counts (and its per-reason ``nullRows``) to ``into``."""
    for name, value in more.items():
        if isinstance(value, dict):
            into[name] = _merge(dict(into.get(name, {})), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[name] = into.get(name, 0) + value
    return into


def _task_metrics(before: Optional[str], after: Optional[str]) -> Dict[str, Any]:
    """What a native stage did between two ``metrics_json`` readings (one task)."""
    if after is None:
        return {}
    old, new = json.loads(before or "{}"), json.loads(after)
    delta = {k: new.get(k, 0) - old.get(k, 0) for k in _COUNTS}
    reasons = new.get("nullRows") or {}
    seen = old.get("nullRows") or {}
    delta["nullRows"] = {r: n - seen.get(r, 0) for r, n in reasons.items() if n - seen.get(r, 0)}
    return delta


class _MetricsParam(AccumulatorParam):
    """Spark accumulator of a stage's metrics: counts summed over the tasks."""

    def zero(self, value):
        return {}

    def addInPlace(self, value1, value2):
        return _merge(dict(value1), value2)


def _new_metrics(df: DataFrame):
    """An accumulator for what the executors do for one transform; None under Spark Connect
    (no accumulators there)."""
    try:
        return df.sparkSession.sparkContext.accumulator({}, _MetricsParam())
    except Exception:
        return None


def _map_batches(kind: str, spec: str, num_threads: int, new_columns, files=None, metrics=None):
    """The function ``mapInArrow`` runs: each batch plus the native pipeline's new columns,
    cast to types Spark takes; the task's metrics go to the ``metrics`` accumulator."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        native = _cached(kind, spec, num_threads, files)
        before = native.metrics_json
        try:
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
        finally:
            if metrics is not None:
                metrics.add(_task_metrics(before, native.metrics_json))

    return run


def _apply(
    df: DataFrame, kind: str, spec: str, native, num_threads: int, files=None, metrics=None
) -> DataFrame:
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
    run = _map_batches(kind, spec, num_threads, names, files, metrics)
    return df.mapInArrow(run, spark_schema)


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
    specs = json.loads(cls._explain_native())
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


class _ConnectSafeOverwrite:
    """MLWriter mixin: ``.overwrite()`` under Spark Connect too. pyspark 4.3's
    ``MLWriter._handleOverwrite`` calls the JVM session, which a Connect client has not
    (SPARK-55452); there Connect's ML helper deletes the path on the server."""

    def _handleOverwrite(self, path: str) -> None:
        from pyspark.sql.utils import is_remote

        if is_remote():
            from pyspark.ml.connect.readwrite import RemoteMLWriter

            RemoteMLWriter.handleOverwrite(path, True)
        else:
            super()._handleOverwrite(path)


class _StageWriter(_ConnectSafeOverwrite, DefaultParamsWriter):
    """The Python stages' DefaultParamsWriter, overwrite working under Connect. A network
    stage with a ``modelFile`` also saves its native stage under ``native/``: the model file
    is copied in (with its sha256), so the saved stage runs on another machine."""

    def saveImpl(self, path: str) -> None:
        super().saveImpl(path)
        stage = self.instance
        if isinstance(stage, _NetworkTransformer) and stage.getOrDefault("modelFile"):
            native = _native.Transformer.stage(*json.loads(stage._spec()))
            native.save(os.path.join(_local_path(path), "native"))


class _StageReader(DefaultParamsReader):
    """Reads what :class:`_StageWriter` wrote: a saved model file is checked and used from a
    local copy, not from the path it was saved from."""

    def load(self, path: str):
        stage = super().load(path)
        native = os.path.join(_local_path(path), "native")
        if os.path.isdir(native):
            params = json.loads(_native.Transformer.load(native).params_json)
            stage._set(modelFile=params["modelFile"], modelManifest="")
        return stage


class _NativeStage(Params):
    """Params of a native stage (see :func:`_native_params`) plus ``numThreads``; ``__init__``
    and ``setParams`` take any of them by keyword."""

    _native_class = ""
    _native_defaults: Dict[str, Any] = {}
    _spark_defaults: Dict[str, Any] = {}

    @classmethod
    def _explain_native(cls) -> str:
        return _native.Transformer.stage(cls._native_class, "{}").explain_params

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

    def write(self) -> MLWriter:
        return _StageWriter(self)

    def metrics(self) -> Optional[Dict[str, Any]]:
        """What the executors did for the DataFrame of this stage's last ``transform``, summed
        over the tasks of the actions run on it so far (Spark accumulators): ``rows``,
        ``images``, ``nullRows`` by reason, ``forwardPasses``, seconds, ``imagesPerSecond``
        (images per second of the tasks' wall time, over all executors). Also logged
        (logger ``deep_pipelines.spark``, INFO). None before a transform, or under Spark
        Connect (no accumulators)."""
        accumulator = getattr(self, "_metrics", None)
        if accumulator is None:
            return None
        value = dict(accumulator.value)
        if not value:
            return value
        wall = value.get("wallSeconds", 0)
        value["imagesPerSecond"] = value.get("images", 0) / wall if wall > 0 else 0.0
        logging.getLogger("deep_pipelines.spark").info(
            "%s(%s): %s", self._native_class, self.getOrDefault("modelName"), json.dumps(value)
        )
        return value

    def _require_columns(self, df: DataFrame, *params: str) -> None:
        for param in params:
            col = self.getOrDefault(param)
            if col not in df.columns:
                raise ValueError(
                    f"{self._native_class}: {param} `{col}` not found; columns: {', '.join(df.columns)}"
                )


class _NetworkTransformer(_NativeStage, Transformer, DefaultParamsReadable, DefaultParamsWritable):
    """A native network stage as a ``pyspark.ml`` Transformer."""

    def _spec(self) -> str:
        return json.dumps([self._native_class, json.dumps(self._native_params(), sort_keys=True)])

    def _check_input(self, df: DataFrame) -> None:
        self._require_columns(df, "inputCol")
        if self.getOrDefault("outputCol") in df.columns:
            raise ValueError(
                f"{self._native_class}: output column `{self.getOrDefault('outputCol')}` already exists"
            )

    def _run(self, df: DataFrame) -> DataFrame:
        self._check_input(df)
        spec = self._spec()
        threads = self.getOrDefault("numThreads")
        native = _cached("stage", spec, threads)
        self._metrics = _new_metrics(df)
        if self.getOrDefault("modelFile"):
            # The model file travels with the task, as a saved stage (the file, its description
            # and class names, sha256-checked), never as a path of the driver's.
            digest, files = _carried(native)
            return _apply(df, "files", digest, native, threads, files, metrics=self._metrics)
        return _apply(df, "stage", spec, native, threads, metrics=self._metrics)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return self._run(dataset)

    @classmethod
    def read(cls) -> MLReader:
        return _StageReader(cls)


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
    ``decodePredictions`` (default) an ``array<struct<class: int (the ImageNet class index),
    label: string (the class name), probability: float>>`` of the
    ``topK`` classes, else ``array<float>`` of all class probabilities. Null or undecodable
    images give null. Params: ``explainParams()``."""

    _native_class = "DeepImagePredictor"


# ---------------------------------------------------------------- fine-tuning

_ACTIVATIONS = "__activations"


def _trunk_rows(spec: str, num_threads: int, image_col: str, label_col: str):
    """The function ``mapInArrow`` runs for a fit: each image's activations at the cut (little-
    endian float32 bytes) and its label."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        trunk = _cached("trunk", spec, num_threads)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            out = pa.record_batch(trunk.transform(batch.select([image_col])))
            rows = pa.array(_activation_rows(out.column(_ACTIVATIONS)), pa.binary())
            labels = batch.column(label_col).cast(pa.float64())
            yield pa.RecordBatch.from_arrays([rows, labels], names=["activations", "label"])

    return run


class _ClassifierParams(_NativeStage):
    _native_class = "DeepImageClassifier"

    @classmethod
    def _explain_native(cls) -> str:
        return _native.ClassifierFit("{}").explain_params


@_native_params
class DeepImageClassifier(_ClassifierParams, Estimator, DefaultParamsReadable, DefaultParamsWritable):
    """Fine-tunes a pretrained network: its last ``trainableBlocks`` blocks train with a new
    classifier head on ``labelCol`` (class indices 0..k-1, e.g. from ``StringIndexer``). The
    same params and defaults as the Rust ``DeepImageClassifier`` (``explainParams()``).

    The frozen trunk runs in the executors (``mapInArrow``), once per image; its activations at
    the cut stream to the driver a partition at a time and are spilled to a local file there,
    on which the top trains (memory-mapped: the driver's memory stays that of a partition; its
    disk holds ``rows x activation size``, e.g. 2 x 37 KiB per image for EfficientNet-Lite0 with
    2 blocks and mirror images). One line per epoch is printed on the driver (``progress``)."""

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._progress = _print_epoch

    def setProgress(self, progress) -> "DeepImageClassifier":
        """``progress(stats: dict, line: str)`` after each epoch, on the driver; None: quiet."""
        self._progress = progress
        return self

    def _fit(self, dataset: DataFrame) -> "DeepImageClassifierModel":
        from pyspark.sql.types import NumericType

        self._require_columns(dataset, "inputCol", "labelCol")
        image_col, label_col = self.getInputCol(), self.getLabelCol()
        if not isinstance(dataset.schema[label_col].dataType, NumericType):
            raise ValueError(
                f"DeepImageClassifier: labelCol `{label_col}` is "
                f"{dataset.schema[label_col].dataType.simpleString()}; expected class indices "
                "0..k-1 (index strings with StringIndexer)"
            )
        spec = json.dumps(self._native_params(), sort_keys=True)
        threads = self.getNumThreads()
        fit = _native.ClassifierFit(spec)
        rows = dataset.select(image_col, label_col).mapInArrow(
            _trunk_rows(spec, threads, image_col, label_col), "activations binary, label double"
        )
        import tempfile

        with tempfile.TemporaryDirectory(prefix="deep-pipelines-fit-") as folder:
            spill = _Spill(folder, fit.activation_len, label_col)
            try:
                spill.add((r[0], r[1]) for r in rows.toLocalIterator())
            finally:
                spill.close()
            files, facts = _train_top(fit, spill, getattr(self, "_progress", _print_epoch))
        model = DeepImageClassifierModel()
        model._set(**{p.name: self.getOrDefault(p) for p in self.params if self.isDefined(p)})
        return model._with_fit(files, facts)


@_native_params
class DeepImageClassifierModel(_ClassifierParams, Model, MLReadable, MLWritable):
    """A fine-tuned network (fitted by :class:`DeepImageClassifier`): adds ``rawPrediction``
    and ``probability`` (Spark ML vectors) and ``prediction``. ``fitFacts``: classes, rows,
    the kept epoch, per-epoch history. Saved with Spark's writer; the executors get the model
    with the task, not from a path."""

    _files: Dict[str, bytes] = {}
    fitFacts: Dict[str, Any] = {}

    def _with_fit(self, files: Dict[str, bytes], facts: Dict[str, Any]) -> "DeepImageClassifierModel":
        self._files = files
        self.fitFacts = facts
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        self._digest = digest.hexdigest()[:32]
        return self

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        self._require_columns(dataset, "inputCol")
        threads = self.getNumThreads()
        native = _cached("files", self._digest, threads, self._files)
        self._metrics = _new_metrics(dataset)
        out = _apply(dataset, "files", self._digest, native, threads, self._files, self._metrics)
        for col in (self.getRawPredictionCol(), self.getProbabilityCol()):
            out = out.withColumn(col, F.when(out[col].isNotNull(), array_to_vector(out[col])))
        return out

    def write(self) -> MLWriter:
        return _ClassifierModelWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _ClassifierModelReader(cls)


def _local_path(path: str) -> str:
    if path.startswith("file:"):
        from urllib.parse import urlparse

        return urlparse(path).path
    if "://" in path:
        raise ValueError(
            f"DeepImageClassifierModel: {path}: saves to local or shared file systems only"
        )
    return path


class _ClassifierModelWriter(_ConnectSafeOverwrite, MLWriter):
    """Spark's metadata (params, fit facts), and the native model's files under ``native/``."""

    def __init__(self, instance: DeepImageClassifierModel):
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        DefaultParamsWriter.saveMetadata(
            self.instance, path, self.sparkSession, extraMetadata={"fitFacts": self.instance.fitFacts}
        )
        _write_files(self.instance._files, os.path.join(_local_path(path), "native"))


class _ClassifierModelReader(MLReader):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> DeepImageClassifierModel:
        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        model = self.cls()
        DefaultParamsReader.getAndSetParams(model, metadata)
        files = _model_files(os.path.join(_local_path(path), "native"))
        return model._with_fit(files, metadata.get("fitFacts", {}))


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
    precision: str = "",
):
    """Registers ``name`` as a Spark SQL function of an image column (Spark's ``image`` struct
    or encoded bytes): ``SELECT name(image) FROM t``. With ``modelName``, the network's ImageNet
    predictions (``array<struct<class: int, label: string, probability: float>>``: class
    index, class name and probability of the ``topK`` best; all
    probabilities without ``decodePredictions``); with ``model_path``, a pipeline saved by the
    Rust API: ``struct<prediction, label, probability>`` for a classifier, else its last column.
    Runs per Arrow batch (``arrow_udf``); null for null or undecodable images. ``precision``
    (with ``modelName``) is the stages' param: ``"bfloat16"`` runs the network's matrix products
    in bfloat16 on CPUs with AVX-512 BF16. Returns the UDF."""
    try:
        from pyspark.sql.functions import arrow_udf
    except ImportError as e:  # pragma: no cover - Spark < 4.1
        raise RuntimeError("register_image_udf needs pyspark >= 4.1 (arrow_udf)") from e
    if (modelName is None) == (model_path is None):
        raise ValueError("register_image_udf: give exactly one of modelName or model_path")
    sql_name = name.lower()
    if model_path is not None and precision:
        raise ValueError(
            "register_image_udf: precision applies to modelName; a saved pipeline keeps the "
            "precision its stages were saved with"
        )
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
        if precision:
            params["precision"] = precision
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
