"""Deep Learning Pipelines on Arrow, powered by the deep-pipelines Rust crate.

Local use, no Spark (pyarrow tables in, pyarrow tables out; pandas / Polars / Daft / Ray data
converts to and from pyarrow)::

    import deep_pipelines as dp
    images = dp.read_images("photos/", labelFromFolder=True)
    features = dp.DeepImageFeaturizer(modelName="EfficientNetLite0").transform(images)
    predictions = dp.PipelineModel.load("fitted-model").transform(images)

On Spark, the same stages are ``pyspark.ml`` Transformers: see :mod:`deep_pipelines.spark`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, Union

import pyarrow as pa

from . import _native

__version__ = _native.__version__
__all__ = [
    "DeepImageFeaturizer",
    "DeepImagePredictor",
    "PipelineModel",
    "available_models",
    "model_dir",
    "read_images",
    "set_num_threads",
]

MODEL_DIR_ENV = _native.MODEL_DIR_ENV


def model_dir(explicit: Optional[str] = None) -> str:
    """Where models are looked up: ``explicit`` (a stage's ``modelDir``), else
    ``$DEEP_PIPELINES_MODEL_DIR``, else the models shipped in this package (EfficientNet-Lite0).
    Other named models need their weights in a folder given one of the first two ways."""
    if explicit:
        return os.fspath(explicit)
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def available_models():
    """The ``modelName`` values the native core knows."""
    return list(_native.available_models())


def set_num_threads(num_threads: int) -> bool:
    """Sizes the native thread pool (decoding, resizing, the networks) for this process. Takes
    effect only before the first native work; returns False if the pool already exists."""
    return _native.init_threads(int(num_threads))


def read_images(
    path: Union[str, os.PathLike],
    recursive: bool = True,
    labelFromFolder: bool = False,
    dropInvalid: bool = False,
) -> pa.Table:
    """The images under ``path`` as a table: ``origin`` (+ ``label``, the parent folder's name),
    ``image`` (Spark's ImageSchema struct) and ``image_error`` (why a file did not decode; its
    ``image`` is then null)."""
    stream = _native.read_images(os.fspath(path), recursive, labelFromFolder, dropInvalid)
    return pa.RecordBatchReader.from_stream(stream).read_all()


Data = Union[pa.Table, pa.RecordBatch, Iterable[pa.RecordBatch]]


def _batches(data: Data) -> Iterable[pa.RecordBatch]:
    if isinstance(data, pa.Table):
        return data.to_batches()
    if isinstance(data, pa.RecordBatch):
        return [data]
    if hasattr(data, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(data)
    return data


class _Native:
    """A native transformer applied batch by batch."""

    def __init__(self, native: "_native.Transformer"):
        self._native = native

    def transform_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.record_batch(self._native.transform(batch))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return pa.schema(self._native.output_schema(schema))

    def transform(self, data: Data) -> pa.Table:
        """``data`` (a table, a record batch, or an iterable / stream of batches) with the
        stages' output columns added. Null or undecodable images give null rows."""
        schema = data.schema if isinstance(data, (pa.Table, pa.RecordBatch)) else None
        out = [self.transform_batch(b) for b in _batches(data) if b.num_rows > 0]
        if out:
            return pa.Table.from_batches(out)
        if schema is None:
            raise ValueError("transform: no batches given")
        return self.output_schema(schema).empty_table()


class _NetworkStage(_Native):
    """A network stage with Spark-named params; the native core fills in the defaults and checks
    the values (one place for both: the Rust params type). ``getParams()`` lists every param
    with its value."""

    _class = ""

    def __init__(self, **params: Any):
        known = self._known_params()
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"{self._class}: unknown param(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        self._given = {k: v for k, v in params.items() if v is not None}
        native = _native.Transformer.stage(self._class, self.native_params_json())
        super().__init__(native)

    @classmethod
    def _known_params(cls) -> set:
        return set(json.loads(_native.Transformer.stage(cls._class, "{}").params_json))

    def native_params_json(self) -> str:
        """The params given, with ``modelDir`` resolved (see :func:`model_dir`)."""
        params = dict(self._given)
        params["modelDir"] = model_dir(params.get("modelDir"))
        return json.dumps(params, sort_keys=True)

    def getParams(self) -> Dict[str, Any]:
        """Every param's value, defaults included (``modelDir`` resolved)."""
        return json.loads(self._native.params_json)

    def copy(self, **overrides: Any) -> "_NetworkStage":
        return type(self)(**{**self._given, **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self._given.items()))
        return f"{self._class}({args})"


class DeepImageFeaturizer(_NetworkStage):
    """Adds ``outputCol``: the pretrained network's feature vector per image
    (``fixed_size_list<float32>``; null for null or undecodable images). ``inputCol`` holds
    images (Spark's ImageSchema struct, e.g. from :func:`read_images`) or encoded bytes."""

    _class = "DeepImageFeaturizer"


class DeepImagePredictor(_NetworkStage):
    """Adds ``outputCol``: the network's ImageNet predictions per image — the ``topK``
    ``(class, description, probability)`` when ``decodePredictions``, else all probabilities."""

    _class = "DeepImagePredictor"


class PipelineModel(_Native):
    """A fitted pipeline saved by the Rust API (``PipelineModel::save``) or the command line."""

    def __init__(self, native: "_native.Transformer", path: str):
        super().__init__(native)
        self.path = path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PipelineModel":
        path = os.fspath(path)
        return cls(_native.Transformer.load(path), path)

    @property
    def stage_uids(self):
        return list(self._native.stage_uids)

    def __repr__(self) -> str:
        return f"PipelineModel({self.path!r}, stages={self.stage_uids})"
