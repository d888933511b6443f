#!/usr/bin/env python3
"""A model file through our ONNX stage, checked and timed side by side (issue: "Bring your own
model"). Makes, in a temporary folder (nothing committed): a torchvision ResNet-50 with seeded
random weights, saved as a `.pth` state dict (with a copy of our ResNet50 manifest, so our
built-in ResNet-50 loads it) and exported to ONNX with `torch.onnx.export`. Then, in one run:

1. parity: `benches/onnx_stage.rs` prints the largest |logit| difference on the bundled photos
   between the ONNX stage and our built-in ResNet-50 loaded from the `.pth`;
2. speed: one forward pass (preprocessed input to logits) at batch 8 and 32, interleaved
   rounds, median of `--repeats`: through our ONNX stage's engine (`LoadedModel::logits`, what
   a stage's batches call) and through ONNX Runtime's own Python session on the same file, with
   the same options (every core as intra-op threads, no spinning, all graph optimisations).

Needs torch, torchvision and onnxruntime (never CI):

    pip install torch torchvision onnx onnxruntime
    python3 benches/onnx_resnet50.py            # --repeats 5 --json out.json
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

import numpy as np
import onnxruntime as ort
import torch
import torchvision.models as tvm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(os.path.dirname(ROOT), "shared", "data", "photos")


def make_models(folder):
    torch.manual_seed(0)
    net = tvm.resnet50(weights=None).eval()
    model_dir = os.path.join(folder, "models", "resnet50")
    os.makedirs(model_dir)
    torch.save(net.state_dict(), os.path.join(model_dir, "resnet50-random.pth"))
    with open(os.path.join(ROOT, "models", "resnet50", "manifest.json")) as f:
        manifest = json.load(f)
    manifest["weights"].update(file="resnet50-random.pth", sha256=None, sha256_prefix=None)
    with open(os.path.join(model_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    onnx_file = os.path.join(folder, "resnet50.onnx")
    torch.onnx.export(
        net,
        torch.zeros(1, 3, 224, 224),
        onnx_file,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    # The preprocessing of our ResNet50 manifest, said next to the file.
    with open(os.path.join(folder, "resnet50.json"), "w") as f:
        json.dump({"preprocess": manifest["preprocess"], "labels": "imagenet"}, f)
    return os.path.join(folder, "models"), onnx_file


def ort_session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--json")
    args = ap.parse_args()
    threads = os.cpu_count()
    folder = tempfile.mkdtemp(prefix="onnx-resnet50-")
    try:
        model_dir, onnx_file = make_models(folder)
        photos = sorted(os.path.join(PHOTOS, p) for p in os.listdir(PHOTOS) if p.endswith(".png"))
        env = {**os.environ, "ORT_DYLIB_PATH": os.environ.get("ORT_DYLIB_PATH") or ort_library()}
        ours = subprocess.Popen(
            ["cargo", "bench", "-q", "--bench", "onnx_stage", "--", model_dir, onnx_file, *photos],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        parity = json.loads(ours.stdout.readline())
        print("parity:", json.dumps(parity))

        def ours_time(batch):
            ours.stdin.write(f"time {batch}\n")
            ours.stdin.flush()
            return float(ours.stdout.readline())

        session = ort_session(onnx_file, threads)

        def ort_time(batch):
            x = (np.arange(batch * 3 * 224 * 224, dtype=np.int64) * 7919 % 255).astype(np.float32)
            x = (x / 128.0 - 1.0).reshape(batch, 3, 224, 224)
            start = time.perf_counter()
            session.run(["logits"], {"image": x})
            return time.perf_counter() - start

        times = {(side, b): [] for side in ("ours", "ort") for b in args.batches}
        for side, run in (("ours", ours_time), ("ort", ort_time)):
            for b in args.batches:
                run(b), run(b)  # warm-up
        for r in range(args.repeats):
            order = [("ours", ours_time), ("ort", ort_time)]
            for side, run in order if r % 2 == 0 else order[::-1]:
                for b in args.batches:
                    times[(side, b)].append(run(b))
        ours.stdin.close()
        ours.wait()
        rows = []
        for b in args.batches:
            o = b / statistics.median(times[("ours", b)])
            t = b / statistics.median(times[("ort", b)])
            rows.append({"batch": b, "ours_img_s": round(o, 2), "ort_python_img_s": round(t, 2),
                         "ours_over_ort": round(o / t, 3)})
            print(f"batch {b:3d}: our ONNX stage {o:7.2f} img/s, ONNX Runtime Python {t:7.2f} img/s, "
                  f"ours/ORT {o / t:.3f}")
        result = {"threads": threads, "onnxruntime": ort.__version__, "torch": torch.__version__,
                  "parity": parity, "speed": rows}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ort_library():
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    libs = sorted(f for f in os.listdir(capi) if f.startswith("libonnxruntime.so"))
    return os.path.join(capi, libs[-1])


if __name__ == "__main__":
    main()
