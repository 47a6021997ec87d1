#!/usr/bin/env python3
"""Builds tests/data/hf/image/: what Pillow and transformers' CLIPImageProcessorPil make of
a set of small images, for tests/hf_image.rs to compare with byte for byte.

Needs numpy, Pillow and transformers (5.x); not run in CI. Run from the repository root:

    python scripts/make_image_fixture.py      # writes tests/data/hf/image/

It reads tests/data/hf/image.png (made by make_hf_fixture.py; not rewritten) and writes:

  *.png, *.jpg        source images in the modes a user brings: RGB in both orientations
                      and odd sizes, L, LA, RGBA, P (with and without tRNS), 1-bit, 2-bit,
                      16-bit grey (with and without tRNS), 16-bit RGB and grey+alpha
                      (written byte by byte: Pillow cannot save those), JPEG 4:2:0, 4:4:4
                      and grey, and a PNG whose IHDR says width 0
  preproc_*.json      preprocessor configs that leave fields out, use the legacy int forms
                      of size/crop_size, crop larger than the image, skip steps
  cases.json          what every tensor in refs.safetensors is:
                        {"op": "decode", "src"}: Image.open(src).convert("RGB"), HWC u8
                        {"op": "resize", "src", "width", "height", "box"}: the decoded
                          image through Image.resize(..., BICUBIC, box), HWC u8
                        {"op": "preprocess", "src", "config", "mode"}: pixel_values, CHW
                          f32, from CLIPImageProcessorPil.from_dict(config) on the decoded
                          image; mode "pad" first applies LLaVA's expand2square with
                          tuple(int(x * 255) for x in image_mean)
  refs.safetensors    the tensors, named "<op>/<index>"
"""
import io
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

HF = os.path.join("tests", "data", "hf")
OUT = os.path.join(HF, "image")


def noisy(h, w, seed, channels=3):
    """A gradient with noise: smooth enough to compress, rough enough that every filter
    tap matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / w, yy * 255.0 / h, (xx + yy) * 127.0 / (w + h)], -1)
    base = np.concatenate([base, 255.0 - base], -1)[..., :channels]
    return np.clip(base + rng.normal(0, 45, base.shape), 0, 255).astype(np.uint8)


def png_bytes(w, h, bit_depth, colour_type, rows, extra=b""):
    """A PNG written chunk by chunk, for the layouts Pillow cannot save."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def trns(data):
    crc = zlib.crc32(b"tRNS" + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + b"tRNS" + data + struct.pack(">I", crc)


def write_sources():
    def save(name, im, **kw):
        im.save(os.path.join(OUT, name), **kw)

    save("portrait.png", Image.fromarray(noisy(71, 33, 1), "RGB"))
    save("big.png", Image.fromarray(noisy(120, 160, 2), "RGB"))
    save("grey.png", Image.fromarray(noisy(29, 40, 3, 1)[..., 0], "L"))
    save("grey_alpha.png", Image.fromarray(noisy(17, 23, 4, 2), "LA"))
    save("rgba.png", Image.fromarray(noisy(31, 45, 5, 4), "RGBA"))
    pal = Image.fromarray(noisy(20, 30, 6), "RGB").quantize(16)
    save("palette.png", pal)
    save("palette_trns.png", pal, transparency=3)
    save("mono.png", Image.fromarray(noisy(13, 19, 7, 1)[..., 0] > 127))
    # 16-bit grey: Pillow opens it as I;16 and convert("RGB") clips at 255 (no scaling).
    g16 = (noisy(15, 21, 8, 1)[..., 0].astype(np.uint16) * 4).astype(np.uint16)
    g16[0, :4] = [0, 255, 256, 65535]
    save("grey16.png", Image.fromarray(g16))
    rows16 = [b"".join(struct.pack(">H", int(v)) for v in r) for r in g16]
    with open(os.path.join(OUT, "grey16_trns.png"), "wb") as f:
        f.write(png_bytes(21, 15, 16, 0, rows16, trns(struct.pack(">H", 256))))
    # 16-bit RGB and grey+alpha: Pillow keeps the high byte of each sample.
    rng = np.random.default_rng(9)
    rgb16 = rng.integers(0, 65536, (11, 14, 3), dtype=np.uint16)
    with open(os.path.join(OUT, "rgb16.png"), "wb") as f:
        f.write(png_bytes(14, 11, 16, 2, [r.astype(">u2").tobytes() for r in rgb16]))
    la16 = rng.integers(0, 65536, (9, 12, 2), dtype=np.uint16)
    with open(os.path.join(OUT, "la16.png"), "wb") as f:
        f.write(png_bytes(12, 9, 16, 4, [r.astype(">u2").tobytes() for r in la16]))
    # 2-bit grey: samples scale by 85.
    g2 = rng.integers(0, 4, (7, 16))
    rows2 = [bytes(int("".join(f"{v:02b}" for v in r[i:i + 4]), 2) for i in range(0, 16, 4))
             for r in g2]
    with open(os.path.join(OUT, "grey2.png"), "wb") as f:
        f.write(png_bytes(16, 7, 2, 0, rows2))
    # A PNG whose IHDR claims width 0 (CRCs valid): a zero-size image.
    with open(os.path.join(OUT, "zero_width.png"), "wb") as f:
        f.write(png_bytes(0, 5, 8, 2, [b""] * 5))
    photo = Image.open(os.path.join(HF, "image.png"))
    save("photo.jpg", photo, quality=90)
    save("photo444.jpg", photo, quality=95, subsampling=0)
    save("grey.jpg", Image.open(os.path.join(OUT, "grey.png")), quality=90)


def write_configs():
    configs = {
        # Legacy int forms; everything else from transformers' defaults (bicubic, CLIP's
        # mean and std, every step on). The crop is larger than the resized image.
        "preproc_int.json": {"size": 30, "crop_size": 48},
        # No resize; an odd, non-square crop that pads along one axis for some inputs.
        "preproc_crop.json": {"do_resize": False, "crop_size": {"height": 40, "width": 21},
                              "image_mean": [0.5, 0.25, 0.75], "image_std": [0.5, 0.2, 0.3]},
        # An exact resize, no crop, normalise without rescale.
        "preproc_exact.json": {"size": {"height": 50, "width": 33}, "do_center_crop": False,
                               "do_rescale": False, "image_mean": 100.0, "image_std": 50.0},
        # Rescale only.
        "preproc_rescale.json": {"size": {"shortest_edge": 24}, "crop_size": 24,
                                 "do_normalize": False, "rescale_factor": 0.0039},
    }
    for name, cfg in configs.items():
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(cfg, f, indent=2)
    return ["../preprocessor_config.json"] + list(configs)


def expand2square(img, color):
    """LLaVA-1.5's `pad` aspect mode (llava/mm_utils.py: expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, ((side - w) // 2, 0) if w < h else (0, (side - h) // 2))
    return out


def main():
    from transformers import CLIPImageProcessorPil

    os.makedirs(OUT, exist_ok=True)
    write_sources()
    configs = write_configs()
    cases, tensors = [], {}

    def add(case, array):
        name = f"{case['op']}/{len(cases)}"
        case["tensor"] = name
        cases.append(case)
        tensors[name] = np.ascontiguousarray(array)

    def src_path(src):
        return os.path.join(HF, "image.png") if src == "../image.png" else os.path.join(OUT, src)

    decoded = {}
    for src in ["../image.png", "portrait.png", "big.png", "grey.png", "grey_alpha.png",
                "rgba.png", "palette.png", "palette_trns.png", "mono.png", "grey16.png",
                "grey16_trns.png", "rgb16.png", "la16.png", "grey2.png", "photo.jpg",
                "photo444.jpg", "grey.jpg"]:
        im = Image.open(src_path(src))
        rgb = im.convert("RGB")
        decoded[src] = rgb
        if src == "big.png":  # plain RGB and large: its resizes check the decode
            continue
        add({"op": "decode", "src": src, "pillow_mode": im.mode}, np.array(rgb))

    resizes = {
        "../image.png": [(84, 56), (56, 37), (150, 100), (13, 9), (1, 1), (75, 20), (30, 50),
                         (7, 113), (300, 2), (76, 51), (75, 50)],
        "portrait.png": [(56, 120), (17, 36), (100, 5), (33, 200), (2, 71)],
        "big.png": [(11, 8), (56, 42), (3, 100), (159, 119), (480, 7)],
        "grey.png": [(77, 56)],
        "rgba.png": [(81, 56)],
        "palette_trns.png": [(84, 56)],
        "grey16.png": [(78, 56)],
        "photo.jpg": [(84, 56)],
    }
    for src, sizes in resizes.items():
        for w, h in sizes:
            out = decoded[src].resize((w, h), Image.Resampling.BICUBIC)
            add({"op": "resize", "src": src, "width": w, "height": h, "box": None},
                np.array(out))
    # Regions: fractional, integral and equal to the output size (Pillow crops), the
    # whole image, a zero-width sliver.
    for box, (w, h) in [((3.3, 1.7, 60.2, 44.9), (40, 30)), ((10, 5, 40, 25), (30, 20)),
                        ((10, 5, 40, 25), (61, 9)), ((0, 0, 75, 50), (75, 50)),
                        ((10.5, 0, 11.5, 50), (5, 50)), ((20, 10, 20, 30), (3, 40)),
                        ((0.25, 49, 75, 50), (150, 3))]:
        out = decoded["../image.png"].resize((w, h), Image.Resampling.BICUBIC, box=box)
        add({"op": "resize", "src": "../image.png", "width": w, "height": h,
             "box": list(box)}, np.array(out))

    pre = {
        "../preprocessor_config.json": ["portrait.png", "big.png", "rgba.png", "photo.jpg"],
        "preproc_int.json": ["../image.png", "portrait.png"],
        "preproc_crop.json": ["../image.png", "portrait.png", "grey.png", "la16.png"],
        "preproc_exact.json": ["../image.png", "big.png"],
        "preproc_rescale.json": ["portrait.png", "palette.png"],
    }
    assert set(pre) == set(configs)
    for cfg_name, srcs in pre.items():
        with open(os.path.join(OUT, cfg_name)) as f:
            ip = CLIPImageProcessorPil.from_dict(json.load(f))
        mean = ip.image_mean if isinstance(ip.image_mean, (list, tuple)) else [ip.image_mean] * 3
        fill = tuple(int(x * 255) for x in mean)
        for src in srcs:
            for mode in ["crop", "pad"]:
                img = decoded[src] if mode == "crop" else expand2square(decoded[src], fill)
                pv = ip(img, return_tensors="np")["pixel_values"][0]
                assert pv.dtype == np.float32, pv.dtype
                add({"op": "preprocess", "src": src, "config": cfg_name, "mode": mode}, pv)

    save_file(tensors, os.path.join(OUT, "refs.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    size = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {OUT}: {len(cases)} cases, {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
