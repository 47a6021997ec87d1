#!/usr/bin/env python3
"""Writes tests/data/gelu_erf.json: reference values for the exact (erf) GELU.

* "erf": f64 points x with Python's math.erf / math.erfc (the C library's) and the
  exact values from mpmath at 50 digits (rounded once to f64).
* "gelu": f32 points x (as u32 bit patterns, exact whatever the JSON float parser) with
  torch.nn.functional.gelu(x, approximate="none") in f32 on the CPU, its autograd
  backward for dout = 1 (so d gelu/dx), and the exact values of x·Φ(x) and
  Φ(x) + x·φ(x) from mpmath at 50 digits (f64, for rounding to f32 in the test).

torch's f32 GELU computes 1 + erf(x/√2) in f32, so for x < 0 it loses relative
accuracy to cancellation (over 1 ulp from x ≈ −1.5 on, 1e-4 relative at −3) and
returns −0 from x ≈ −5.5 on, where x·Φ(x) is still ~1e-7; the mpmath values are what
the crate's f64 twin is judged against there.

Needs torch and mpmath (the /work/venv of the project's sessions); not run in CI.
Run from the repository root: python scripts/make_gelu_fixture.py
"""
import json
import math
import re
import struct

import mpmath
import torch

mpmath.mp.dps = 50


def f32_bits(v):
    return struct.unpack("<I", struct.pack("<f", v))[0]


def erf_points():
    xs = [0.0, -0.0, 1e-300, -1e-300, 1e-20, 1e-8, -1e-8, 1e-3, -1e-3]
    xs += [i * 0.075 for i in range(-80, 81)]  # [-6, 6]
    xs += [6.5 + 0.5 * i for i in range(42)]  # the far tail, to 27
    xs += [-7.0, -10.0, -27.0, 0.5 + 1e-12, 1.0 - 1e-12, 2.0 ** -0.5]
    out = []
    for x in xs:
        m = mpmath.mpf(x)
        out.append({"x": x, "math_erf": math.erf(x), "math_erfc": math.erfc(x),
                    "erf": float(mpmath.erf(m)), "erfc": float(mpmath.erfc(m))})
    return out


def gelu_points():
    xs = [0.0, -0.0, 1.4e-45, -1.4e-45, 1e-38, -1e-38, 1e-30, -1e-30, 1e-10, -1e-10,
          1e-6, -1e-6, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 5.0, -5.0,
          10.0, -10.0, 13.0, -13.0, 14.0, -14.0, 20.0, -20.0, 1e4, -1e4, 1e30, -1e30,
          3.4e38, -3.4e38]
    xs += [i * 0.1 for i in range(-120, 121)]  # [-12, 12]
    x = torch.tensor(xs, dtype=torch.float32, requires_grad=True)
    y = torch.nn.functional.gelu(x, approximate="none")
    y.backward(torch.ones_like(y))
    out = []
    for xv, yv, gv in zip(x.detach().tolist(), y.detach().tolist(), x.grad.tolist()):
        m = mpmath.mpf(xv)
        cdf = mpmath.ncdf(m)
        pdf = mpmath.npdf(m)
        out.append({"x": f32_bits(xv), "torch_fwd": f32_bits(yv), "torch_bwd": f32_bits(gv),
                    "fwd": float(m * cdf), "bwd": float(cdf + m * pdf)})
    return out


def main():
    data = {
        "note": "written by scripts/make_gelu_fixture.py; f32 values are u32 bit patterns",
        "torch": torch.__version__,
        "mpmath": mpmath.__version__,
        "erf": erf_points(),
        "gelu": gelu_points(),
    }
    # One point a line, so a diff of a regenerated file reads point by point.
    text = json.dumps(data, indent=1)
    text = re.sub(r"\{\s+([^{}]*?)\s+\}", lambda m: "{" + re.sub(r"\s*\n\s*", " ", m[1]) + "}", text)
    with open("tests/data/gelu_erf.json", "w") as f:
        f.write(text + "\n")
    print(f"{len(data['erf'])} erf points, {len(data['gelu'])} gelu points")


if __name__ == "__main__":
    main()
