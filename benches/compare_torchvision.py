#!/usr/bin/env python3
"""Side-by-side forward-pass throughput: PyTorch (torchvision / efficientnet-lite-pytorch) and
this crate's `cargo bench --bench zoo`, same models, batch 8, same machine, one run; prints
images/s for both and the ratio (ours / PyTorch).

Needs a Python with torch + torchvision (and optionally efficientnet-lite-pytorch); not part of CI:

    pip install torch torchvision efficientnet-lite-pytorch
    python3 benches/compare_torchvision.py
"""
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torchvision.models as tvm

BATCH = 8
MODELS = [  # (bench name, builder, input size)
    ("resnet18", lambda: tvm.resnet18(), 224),
    ("resnet50", lambda: tvm.resnet50(), 224),
    ("mobilenet_v2", lambda: tvm.mobilenet_v2(), 224),
    ("mobilenet_v3_large", lambda: tvm.mobilenet_v3_large(), 224),
    ("squeezenet1_1", lambda: tvm.squeezenet1_1(), 224),
    ("efficientnet_b0", lambda: tvm.efficientnet_b0(), 224),
    ("efficientnet_lite0", None, 224),
    ("inception_v3", lambda: tvm.inception_v3(weights=None, aux_logits=True, init_weights=False), 299),
]


def lite0():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    return EfficientNet.from_name("efficientnet-lite0")


def torch_images_per_second(model, size, repeats=5):
    model.eval()
    x = torch.randn(BATCH, 3, size, size)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def ours():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        ["cargo", "bench", "--bench", "zoo", "--", "--output-format", "bencher"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    rates = {}
    for name, ns in re.findall(r"test zoo/(\w+?)_batch\d+_\d+ \.\.\. bench:\s+([\d,]+) ns/iter", out):
        rates[name] = BATCH / (int(ns.replace(",", "")) * 1e-9)
    return rates


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}", flush=True)
    theirs = {}
    for name, build, size in MODELS:
        model = build() if build else lite0()
        if model is not None:
            theirs[name] = torch_images_per_second(model, size)
            print(f"  torch {name}: {theirs[name]:.1f} img/s", flush=True)
    mine = ours()
    print(f"\n{'model':<20} {'PyTorch img/s':>14} {'ours img/s':>11} {'ours/PyTorch':>13}")
    for name, _, _ in MODELS:
        t, o = theirs.get(name), mine.get(name)
        ratio = f"{o / t:.2f}" if t and o else "-"
        print(f"{name:<20} {t or float('nan'):>14.1f} {o or float('nan'):>11.1f} {ratio:>13}")


if __name__ == "__main__":
    sys.exit(main())
