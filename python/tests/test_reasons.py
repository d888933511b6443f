"""Every null row says why, whatever the input: five hostile files (a PNG bomb, a photo cut after
60 bytes, an empty file, a text file, a good photo) as a folder, as a pyarrow binary column, as
Spark's `binaryFile` content and as Spark's `image` structs (Spark's file sources skip the
empty file). Each bad row's `errorCol` starts
with the kind of its problem, in the same words everywhere; the good row has features."""

import struct
import zlib

import pyarrow as pa
import pytest

import deep_pipelines as dp
from conftest import FIXTURES
from deep_pipelines.spark import DeepImageFeaturizer as SparkFeaturizer


def _png_bomb(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


PHOTO = (FIXTURES / "photos" / "chelsea.png").read_bytes()

# name -> (bytes, what each reason starts with where the decoder says why; None: features)
FILES = {
    "bomb.png": (_png_bomb(40_000, 40_000), "over the decode limits: "),
    "cut.png": (PHOTO[:60], "truncated: "),
    "empty.png": (b"", "empty: "),
    "notes.png": (b"a text file, not an image\n", "unsupported format: "),
    "photo.png": (PHOTO, None),
}
# Spark's image source keeps no reason: its row for a file it cannot decode has mode -1.
SPARK_IMAGE = "invalid image struct: Spark's image source could not decode this file"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    for name, (data, _) in FILES.items():
        (folder / name).write_bytes(data)
    return folder


def _name(origin: str) -> str:
    return origin.rstrip("/").rsplit("/", 1)[-1]


def _check(reasons, features, expected=None, files=FILES):
    """`reasons` / `features`: file name -> the row's errorCol / features."""
    assert set(reasons) == set(files), reasons
    for name, (_, kind) in files.items():
        want = kind if expected is None or kind is None else expected
        if want is None:
            assert reasons[name] is None and features[name] is not None, (name, reasons[name])
        else:
            assert reasons[name] is not None and reasons[name].startswith(want), (name, reasons[name])
            assert features[name] is None, name


def test_a_folder_and_pyarrow_bytes_give_each_rows_reason(hostile):
    table = dp.read_images(str(hostile))
    stage = dp.DeepImageFeaturizer(errorCol="why")
    out = stage.transform(table).to_pylist()
    names = [_name(r["origin"]) for r in out]
    from_folder = {n: r["why"] for n, r in zip(names, out)}
    _check(from_folder, {n: r["features"] for n, r in zip(names, out)})
    # The reader's image_error and the stage's errorCol: the same words.
    assert from_folder == {n: r["image_error"] for n, r in zip(names, out)}

    for kind in (pa.binary(), pa.large_binary()):
        content = pa.array([data for data, _ in FILES.values()], kind)
        table = pa.table({"name": list(FILES), "content": content})
        out = dp.DeepImageFeaturizer(inputCol="content", errorCol="why").transform(table).to_pylist()
        reasons = {r["name"]: r["why"] for r in out}
        _check(reasons, {r["name"]: r["features"] for r in out})
        assert reasons == from_folder, kind
    counts = dp.DeepImageFeaturizer(inputCol="content", errorCol="why")
    counts.transform(table)
    assert counts.metrics()["nullRows"] == {
        "over the decode limits": 1, "truncated": 1, "empty": 1, "unsupported format": 1,
    }, counts.metrics()


# Spark's file sources list no empty file: no row at all for it.
SPARK_FILES = {name: v for name, v in FILES.items() if v[0]}


def test_spark_binary_file_and_image_structs_give_each_rows_reason(spark, hostile):
    files = spark.read.format("binaryFile").load(str(hostile))
    out = SparkFeaturizer(inputCol="content", errorCol="why", outputFormat="array").transform(files)
    rows = out.select("path", "why", "features").collect()
    _check(
        {_name(r.path): r.why for r in rows},
        {_name(r.path): r.features for r in rows},
        files=SPARK_FILES,
    )

    images = spark.read.format("image").load(str(hostile))
    out = SparkFeaturizer(errorCol="why", outputFormat="array").transform(images)
    rows = out.select("image.origin", "why", "features").collect()
    _check(
        {_name(r.origin): r.why for r in rows},
        {_name(r.origin): r.features for r in rows},
        expected=SPARK_IMAGE,
        files=SPARK_FILES,
    )
