"""Writes the fuzzers' seed corpus and the image fixtures the Rust encoders cannot make
(CMYK JPEG, JPEG with an EXIF orientation, palette PNG). Needs `pip install pillow`; not needed to run tests.

    python3 fuzz/make_corpus.py
"""
import io
import json
import struct
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent
DECODE = ROOT / "corpus" / "decode_preprocess"
WEIGHTS = ROOT / "corpus" / "weights"
FIXTURES = ROOT.parent / "tests" / "fixtures" / "images"


def gradient(mode, size=(12, 9)):
    img = Image.new("RGB", size)
    img.putdata([(x * 20 % 256, y * 25 % 256, (x * y) % 256) for y in range(size[1]) for x in range(size[0])])
    return img.convert(mode)


def save(img, fmt, **kw):
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def main():
    DECODE.mkdir(parents=True, exist_ok=True)
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    seeds = {
        "rgb.png": save(gradient("RGB"), "PNG"),
        "grey.png": save(gradient("L"), "PNG"),
        "grey_alpha.png": save(gradient("LA"), "PNG"),
        "rgba.png": save(gradient("RGBA"), "PNG"),
        "palette.png": save(gradient("P"), "PNG"),
        "grey16.png": save(gradient("L").convert("I;16"), "PNG"),
        "rgb.jpg": save(gradient("RGB"), "JPEG", quality=80),
        "grey.jpg": save(gradient("L"), "JPEG", quality=80),
        "cmyk.jpg": save(gradient("CMYK"), "JPEG", quality=80),
        "rgb.gif": save(gradient("P"), "GIF"),
        "rgb.bmp": save(gradient("RGB"), "BMP"),
        "rgb.webp": save(gradient("RGB"), "WEBP", lossless=True),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    seeds["exif_rotated.jpg"] = save(gradient("RGB", (16, 8)), "JPEG", quality=90, exif=exif.tobytes())
    for name, data in seeds.items():
        (DECODE / name).write_bytes(data)
    (FIXTURES / "cmyk.jpg").write_bytes(seeds["cmyk.jpg"])
    (FIXTURES / "exif_rotated.jpg").write_bytes(seeds["exif_rotated.jpg"])
    (FIXTURES / "palette.png").write_bytes(seeds["palette.png"])

    # Weights: a valid file holding two of EfficientNet-Lite0's tensors, and a header-only one.
    tensors = {"_conv_stem.weight": [32, 3, 3, 3], "_bn0.weight": [32]}
    header, data, offset = {}, b"", 0
    for name, shape in tensors.items():
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * n]}
        data += struct.pack(f"<{n}f", *[0.01 * (i % 7) for i in range(n)])
        offset += 4 * n
    head = json.dumps(header).encode()
    (WEIGHTS / "two_tensors.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)
    empty = b"{}"
    (WEIGHTS / "empty.safetensors").write_bytes(struct.pack("<Q", len(empty)) + empty)


if __name__ == "__main__":
    main()
