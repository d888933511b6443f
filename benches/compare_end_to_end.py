#!/usr/bin/env python3
"""End to end, a folder of JPEGs -> EfficientNet-Lite0 pooled features -> Parquet, each side a
whole process (start, model load, decode, resize, network, write), side by side in one run:

  ours      `deep-pipelines featurize <folder> -o features.parquet --batch-size 32`.
  ort       the short script a user who knows ONNX Runtime writes: PIL decode + Resize(256,
            bicubic) + CenterCrop(224) + normalise on two threads (ThreadPoolExecutor, the next
            batch decoded while one runs), ONNX
            Runtime on the same network exported from efficientnet-lite-pytorch (every core,
            no spinning, ENABLE_ALL), batches of 32, pyarrow Parquet.
  daft      Daft (PyPI `daft`): from_glob_path -> url download -> image decode -> resize 224 ->
            a batch UDF running the same ONNX Runtime session -> write_parquet.
  pytorch   torchvision ImageFolder + DataLoader (batch 32, one worker per core), the same
            recipe, efficientnet-lite-pytorch in inference_mode.

Reduced precision, opt-in on both sides (not in the default --sides):
  ours-bf16 our CLI with --precision bfloat16 (bfloat16 GEMMs, where the CPU has AVX-512
            BF16).
  ort-int8  the ort script on ONNX Runtime's own quantized path: the model quantized statically
            (QDQ, int8 per-channel weights, uint8 activations calibrated on the warm-up images).

Each timed run is one child process; its wall time and peak RSS (GNU time's %M: the largest
resident set of the process, or of one of its DataLoader workers) are recorded. Sides alternate in a
rotating order over --repeats rounds after one warm-up run each on --warmup images; medians are
reported. The images are benches/spark_compare.py's generated 640x480 JPEGs: --distinct of them,
repeated (hard links under new names) up to --images files.

Not part of CI (torch is ~5 GB):

    pip install torch torchvision pillow numpy pyarrow onnx onnxruntime daft efficientnet-lite-pytorch
    python3 benches/compare_end_to_end.py --images 1000      # --repeats 3 --sides ours ort daft pytorch
    python3 benches/compare_end_to_end.py --sides ours ours-bf16 ort ort-int8 daft
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spark_compare import ensure_images  # noqa: E402 (the shared photo-like JPEG generator)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Release builds as users get them (`cargo install`, the wheel): not incremental, whatever the
# shell says. An incremental build inlined differently and once ran ResNets 25% faster.
USERS_BUILD = dict(os.environ, CARGO_INCREMENTAL="0")
BATCH = 32
MEAN, STD = 127.0, 128.0  # EfficientNet-Lite0's normalisation, in 0..255 units


def cli_path():
    out = subprocess.run(
        ["cargo", "build", "--release", "--bin", "deep-pipelines", "--message-format=json"],
        cwd=ROOT, check=True, capture_output=True, text=True,
        env=USERS_BUILD,
    ).stdout
    paths = [json.loads(l).get("executable") for l in out.splitlines() if '"executable"' in l]
    return [p for p in paths if p][-1]


def lite0():
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")

    class Features(torch.nn.Module):  # the pooled features our featurizer returns
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.model.extract_features(x), 1), 1)

    return Features().eval()


def export_onnx(path):
    import torch

    torch.onnx.export(lite0(), (torch.randn(1, 3, 224, 224),), path, input_names=["x"],
                      output_names=["features"], dynamic_axes={"x": {0: "n"}, "features": {0: "n"}},
                      opset_version=17, dynamo=False)


def session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def quantize(model, calibration_folder):
    """`model` quantized by ONNX Runtime's static quantization, calibrated on the folder's images."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import numpy as np

    class Images(CalibrationDataReader):
        def __init__(self):
            paths = sorted(os.path.join(calibration_folder, f) for f in os.listdir(calibration_folder))
            self.batches = iter([{"x": np.stack([pil_preprocess(p) for p in paths[i:i + 8]])}
                                 for i in range(0, len(paths), 8)])

        def get_next(self):
            return next(self.batches, None)

    prepared = model.replace(".onnx", "-prepared.onnx")
    quantized = model.replace(".onnx", "-int8.onnx")
    quant_pre_process(model, prepared)
    quantize_static(prepared, quantized, Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return quantized


def pil_preprocess(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = 256 / min(w, h)
        im = im.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        im = im.crop((left, top, left + 224, top + 224))
        x = (np.asarray(im, dtype=np.float32) - MEAN) / STD
    return x.transpose(2, 0, 1)


def write_features(paths, features, out):
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(features.reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, features.shape[1])
    pq.write_table(pa.table({"path": paths, "features": column}), out)


def side_ort(folder, out, model):
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    sess = session(model)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    batches = [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)]
    chunks = []
    with ThreadPoolExecutor(2) as pool:
        # The next batch is decoded while this one runs (not all of them: memory stays bounded).
        pending = [pool.submit(pil_preprocess, p) for p in batches[0]]
        for i in range(len(batches)):
            batch = np.stack([f.result() for f in pending])
            pending = [pool.submit(pil_preprocess, p) for p in batches[i + 1]] if i + 1 < len(batches) else []
            chunks.append(sess.run(None, {"x": batch})[0])
    write_features(paths, np.concatenate(chunks), out)
    return len(paths)


def side_daft(folder, out, model):
    import daft
    import numpy as np
    from daft import col

    @daft.udf(return_dtype=daft.DataType.fixed_size_list(daft.DataType.float32(), 1280), batch_size=BATCH)
    class Featurize:
        def __init__(self):
            self.sess = session(model)

        def __call__(self, images):
            x = (np.stack(images.to_pylist()).astype(np.float32) - MEAN) / STD
            return list(self.sess.run(None, {"x": x.transpose(0, 3, 1, 2)})[0])

    df = daft.from_glob_path(os.path.join(folder, "*.jpg"))
    df = df.with_column("image", col("path").download().decode_image(mode="RGB"))
    df = df.with_column("image", col("image").resize(224, 224))
    df = df.with_column("features", Featurize(col("image")))
    df.select("path", "features").write_parquet(out, write_mode="overwrite")
    return len(os.listdir(folder))


def side_pytorch(folder, out, model):
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms as T

    torch.set_num_threads(os.cpu_count())
    net = lite0()
    transform = T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(mean=[MEAN / 255] * 3, std=[STD / 255] * 3),
    ])
    # ImageFolder wants a folder per class: `folder` is <root>/photos.
    data = datasets.ImageFolder(os.path.dirname(folder), transform=transform)
    chunks = []
    with torch.inference_mode():
        for x, _ in DataLoader(data, batch_size=BATCH, num_workers=os.cpu_count()):
            chunks.append(net(x).numpy())
    import numpy as np

    write_features([p for p, _ in data.samples], np.concatenate(chunks), out)
    return len(data)


def run_side(side, folder, out, model, cli):
    """One timed child process: (seconds, peak RSS in MB)."""
    if side.startswith("ours"):
        cmd = [cli, "featurize", folder, "-o", out, "-q", "--batch-size", str(BATCH)]
        if side == "ours-bf16":
            cmd += ["--precision", "bfloat16"]
    elif side == "ort-int8":
        cmd = [sys.executable, os.path.abspath(__file__), "--side", "ort", folder, out,
               model.replace(".onnx", "-int8.onnx")]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, folder, out, model]
    # GNU time's %M: the child's ru_maxrss. Not os.wait4 here: a child forked from this
    # (torch-importing) process counts the parent's pages until it execs.
    usage = os.path.join(os.path.dirname(model), "rss")
    start = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-o", usage, "-f", "%M"] + cmd, check=True)
    seconds = time.perf_counter() - start
    with open(usage) as f:
        rss_mb = int(f.read().split()[-1]) / 1024
    import pyarrow.parquet as pq

    files = [os.path.join(out, f) for f in os.listdir(out)] if os.path.isdir(out) else [out]
    rows = sum(pq.read_metadata(f).num_rows for f in files if f.endswith(".parquet"))
    return seconds, rss_mb, rows


def folder_of(root, images, distinct, seed):
    """<root>/photos with `images` files: `distinct` generated JPEGs, hard-linked over."""
    source = ensure_images(os.path.join(root + "-source"), distinct, seed)
    photos = os.path.join(root, "photos")
    os.makedirs(photos, exist_ok=True)
    for i in range(images):
        dst = os.path.join(photos, f"img_{i:06d}.jpg")
        if not os.path.exists(dst):
            os.link(source[i % len(source)], dst)
    return photos


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--side":
        side, folder, out, model = sys.argv[2:6]
        rows = {"ort": side_ort, "daft": side_daft, "pytorch": side_pytorch}[side](folder, out, model)
        print(f"    {side}: {rows} rows", flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=1000)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "dp-e2e"))
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", nargs="+", default=["ours", "ort", "daft", "pytorch"])
    parser.add_argument("--cli", help="a built deep-pipelines binary (default: cargo build)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    distinct = min(args.distinct, args.images)
    photos = folder_of(f"{args.dir}-{args.images}", args.images, distinct, args.seed)
    warm = folder_of(f"{args.dir}-warmup", args.warmup, min(distinct, args.warmup), args.seed)
    cli = args.cli or cli_path()
    work = tempfile.mkdtemp(prefix="dp-e2e-out-")
    model = os.path.join(work, "lite0.onnx")
    export_onnx(model)
    if "ort-int8" in args.sides:
        quantize(model, warm)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{args.images} files ({distinct} distinct 640x480 JPEGs), {os.cpu_count()} cores, {cpu}", flush=True)

    def out_path(side):
        return os.path.join(work, f"{side}.parquet" if side != "daft" else "daft")

    for side in args.sides:
        run_side(side, warm, out_path(side), model, cli)
    results = {side: [] for side in args.sides}
    for r in range(args.repeats):
        k = r % len(args.sides)
        for side in args.sides[k:] + args.sides[:k]:
            seconds, rss, rows = run_side(side, photos, out_path(side), model, cli)
            assert rows == args.images, f"{side} wrote {rows} rows, not {args.images}"
            results[side].append((seconds, rss))
            print(f"  round {r + 1} {side}: {seconds:.1f} s, {args.images / seconds:.1f} images/s, "
                  f"peak RSS {rss:.0f} MB", flush=True)
    rate = {s: args.images / statistics.median(t for t, _ in v) for s, v in results.items()}
    rss = {s: statistics.median(m for _, m in v) for s, v in results.items()}
    ours = [s for s in ("ours", "ours-bf16") if s in rate]
    print(f"\n{'side':<10} {'images/s':>9} {'peak RSS MB':>12}" + "".join(f" {o + ' / side':>16}" for o in ours))
    for side in args.sides:
        ratios = "".join(f" {rate[o] / rate[side]:>16.2f}" for o in ours)
        print(f"{side:<10} {rate[side]:>9.1f} {rss[side]:>12.0f}{ratios}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "distinct": distinct, "cpu": cpu, "cores": os.cpu_count(),
                       "images_per_second": rate, "peak_rss_mb": rss, "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
