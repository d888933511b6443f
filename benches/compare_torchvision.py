#!/usr/bin/env python3
"""Forward-pass throughput, side by side in one run: PyTorch eager, ONNX Runtime (the same
graphs exported with torch.onnx) and this crate's CPU path (`benches/zoo.rs --serve`: folded
BatchNorm, the NHWC plan the featurizer runs), at batch 8 and 32, for EfficientNet-Lite0,
ResNet-50, MobileNetV2, MobileNetV3-Large, EfficientNet-B0, Inception v3 and ResNet-18.

Each measurement is one forward pass (input to logits) after two warm-up passes; the median of
`--repeats` rounds is reported. Each side uses every core (torch.set_num_threads, ONNX Runtime
intra-op threads without spinning, rayon's default pool) and runs alone. Rounds are interleaved (every model, batch and side once per
round, sides in a rotating order), so machine noise hits all sides alike. It also measures the
machine's f32 GEMM peak (the plan's GEMM on all threads, and torch.mm) and prints the GFLOP/s
each side reaches against it.

Needs a Python with torch + torchvision (efficientnet-lite-pytorch for Lite0, onnxruntime + onnx
for the ONNX Runtime column); never needed by CI:

    pip install torch torchvision efficientnet-lite-pytorch onnxruntime onnx
    python3 benches/compare_torchvision.py            # --repeats 5 --batches 8 32 --json out.json
    python3 benches/compare_torchvision.py --bf16     # + ours with bfloat16 GEMMs (opt-in)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torchvision.models as tvm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Release builds as users get them (`cargo install`, the wheel): not incremental, whatever the
# shell says. An incremental build inlined differently and once ran ResNets 25% faster.
USERS_BUILD = dict(os.environ, CARGO_INCREMENTAL="0")


def lite0():
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


MODELS = [  # (name shared with benches/zoo.rs, builder, input size)
    ("efficientnet_lite0", lite0, 224),
    ("resnet50", tvm.resnet50, 224),
    ("mobilenet_v2", tvm.mobilenet_v2, 224),
    ("mobilenet_v3_large", tvm.mobilenet_v3_large, 224),
    ("efficientnet_b0", tvm.efficientnet_b0, 224),
    ("inception_v3", lambda: tvm.inception_v3(weights=None, aux_logits=True, init_weights=False), 299),
    ("resnet18", tvm.resnet18, 224),
]


def gflop_per_image(model, size):
    """2 x multiply-adds of every convolution and linear layer, for one image."""
    total = [0]

    def conv(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total[0] += 2 * out.numel() * k

    def linear(m, inp, out):
        total[0] += 2 * out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    with torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total[0] / 1e9


class Ours:
    """benches/zoo.rs in --serve mode: one request per line."""

    def __init__(self, precision="float32"):
        self.name = {"float32": "ours", "bfloat16": "ours-bf16"}[precision]
        out = subprocess.run(
            ["cargo", "bench", "--bench", "zoo", "--no-run", "--message-format=json"],
            cwd=ROOT, check=True, capture_output=True, text=True,
            env=USERS_BUILD,
        ).stdout
        exe = [json.loads(l).get("executable") for l in out.splitlines() if '"executable"' in l]
        exe = [e for e in exe if e and "zoo" in os.path.basename(e)][-1]
        env = dict(os.environ, ZOO_PRECISION=precision)
        self.proc = subprocess.Popen([exe, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer or answer.startswith("error"):
            raise RuntimeError(f"zoo --serve: {line}: {answer}")
        return answer

    def prepare(self, name, model, size):
        return name

    def time(self, handle, batch, size):
        return float(self.ask(f"time {handle} {batch}"))


class Torch:
    name = "pytorch"

    def prepare(self, name, model, size):
        return model

    def time(self, model, batch, size):
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)
            return time.perf_counter() - start


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, threads):
        import onnxruntime as ort

        self.ort = ort
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = threads
        self.options.inter_op_num_threads = 1
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its threads would otherwise spin after each run, taking the cores from the next side.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.dir = tempfile.mkdtemp(prefix="dp-onnx-")

    def prepare(self, name, model, size):
        path = os.path.join(self.dir, f"{name}.onnx")
        x = torch.randn(1, 3, size, size)
        try:
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17,
                              dynamo=False)
        except Exception:  # torch builds without the TorchScript exporter
            batch = torch.export.Dim("n")
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"],
                              dynamic_shapes={"x": {0: batch}}, dynamo=True)
        return self.ort.InferenceSession(path, self.options, providers=["CPUExecutionProvider"])

    def time(self, session, batch, size):
        x = torch.randn(batch, 3, size, size).numpy()
        start = time.perf_counter()
        session.run(None, {"x": x})
        return time.perf_counter() - start


def torch_gemm_gflops(size):
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--models", nargs="+", default=[m[0] for m in MODELS])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--bf16", action="store_true",
                        help="also time ours with bfloat16 GEMMs (the stages' precision=bfloat16)")
    args = parser.parse_args()

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    ours = Ours()
    sides = [Torch()]
    try:
        sides.append(OnnxRuntime(threads))
    except ImportError:
        print("onnxruntime not installed: no ONNX Runtime column", flush=True)
    sides.append(ours)
    if args.bf16:
        sides.append(Ours("bfloat16"))
    level, ours_threads = ours.ask("info").split()
    peak_ours = max(float(ours.ask("gemm 2048")) for _ in range(2))
    peak_torch = max(torch_gemm_gflops(2048) for _ in range(2))
    peak = max(peak_ours, peak_torch)
    print(f"torch {torch.__version__}, {threads} threads; ours: {level} kernels, {ours_threads} threads")
    print(f"f32 GEMM 2048^3: ours {peak_ours:.0f} GFLOP/s, torch.mm {peak_torch:.0f} GFLOP/s", flush=True)

    models = [m for m in MODELS if m[0] in args.models]
    prepared, gflops = {}, {}
    for name, build, size in models:
        try:
            model = build().eval()
        except ImportError as e:
            print(f"skipping {name}: {e}", flush=True)
            continue
        gflops[name] = gflop_per_image(model, size)
        for side in sides:
            prepared[(side.name, name)] = side.prepare(name, model, size)
            for batch in args.batches:  # warm-up
                for _ in range(2):
                    side.time(prepared[(side.name, name)], batch, size)
        print(f"  prepared {name} ({gflops[name]:.2f} GFLOP/image)", flush=True)

    times = {}
    for r in range(args.repeats):
        for name, _, size in models:
            if name not in gflops:
                continue
            for batch in args.batches:
                k = r % len(sides)
                for side in sides[k:] + sides[:k]:
                    time.sleep(0.05)  # let the previous side's idle threads go to sleep
                    t = side.time(prepared[(side.name, name)], batch, size)
                    times.setdefault((side.name, name, batch), []).append(t)
        print(f"  round {r + 1}/{args.repeats} done", flush=True)

    names = [s.name for s in sides]
    rows = []
    header = f"{'model':<19} {'batch':>5} " + " ".join(f"{n + ' img/s':>17}" for n in names)
    header += f" {'ours/pytorch':>12}" + (f" {'ours/ort':>9}" if "onnxruntime" in names else "")
    header += f" {'bf16/ort':>9}" if "onnxruntime" in names and "ours-bf16" in names else ""
    header += "   GFLOP/s (% of GEMM peak) " + " / ".join(names)
    print("\n" + header)
    for name, _, _ in models:
        if name not in gflops:
            continue
        for batch in args.batches:
            rate = {n: batch / statistics.median(times[(n, name, batch)]) for n in names}
            row = {"model": name, "batch": batch, "gflop_per_image": gflops[name],
                   "images_per_second": rate, "ours_over_pytorch": rate["ours"] / rate["pytorch"]}
            line = f"{name:<19} {batch:>5} " + " ".join(f"{rate[n]:>17.1f}" for n in names)
            line += f" {row['ours_over_pytorch']:>12.2f}"
            if "onnxruntime" in names:
                row["ours_over_onnxruntime"] = rate["ours"] / rate["onnxruntime"]
                line += f" {row['ours_over_onnxruntime']:>9.2f}"
                if "ours-bf16" in names:
                    row["ours_bf16_over_onnxruntime"] = rate["ours-bf16"] / rate["onnxruntime"]
                    line += f" {row['ours_bf16_over_onnxruntime']:>9.2f}"
            achieved = {n: rate[n] * gflops[name] for n in names}
            row["gflop_per_second"] = achieved
            line += "   " + " / ".join(f"{achieved[n]:.0f} ({100 * achieved[n] / peak:.0f}%)" for n in names)
            rows.append(row)
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": threads, "kernels": level,
                       "gemm_peak_gflops": {"ours": peak_ours, "torch_mm": peak_torch},
                       "repeats": args.repeats, "rows": rows}, f, indent=1)
    for side in sides:
        if isinstance(side, Ours):
            side.proc.stdin.close()


if __name__ == "__main__":
    sys.exit(main())
