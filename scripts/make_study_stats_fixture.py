"""Writes tests/data/study/stats.json: reference values of the study's statistics
(mean, sample standard deviation, Student-t quantiles and 95 % intervals of a mean)
from numpy and scipy.stats, for tests/study.rs.

Run: /work/venv/bin/python scripts/make_study_stats_fixture.py (scipy 1.17)
"""
import json
import pathlib

import numpy as np
import scipy
import scipy.stats as st

rng = np.random.default_rng(20261201)
samples = [
    [0.61, 0.58, 0.64],
    [0.012, -0.03, 0.025, 0.004],
    [1.0, 1.0 + 1e-9, 1.0 - 2e-9],
    list(rng.normal(0.5, 0.1, 5)),
    list(rng.normal(-0.02, 0.05, 10)),
    list(rng.normal(0.3, 0.2, 30)),
]
cases = []
for xs in samples:
    xs = [float(x) for x in xs]
    n = len(xs)
    mean = float(np.mean(xs))
    std = float(np.std(xs, ddof=1))
    lo, hi = st.t.interval(0.95, n - 1, loc=mean, scale=std / np.sqrt(n))
    cases.append({"xs": xs, "mean": mean, "std": std, "lo95": float(lo), "hi95": float(hi)})
quantiles = []
for df in [1, 2, 3, 4, 5, 7, 9, 14, 29, 100]:
    for p in [0.6, 0.9, 0.95, 0.975, 0.995]:
        quantiles.append({"df": df, "p": p, "t": float(st.t.ppf(p, df))})
cdf = []
for df in [1.5, 3.0, 10.0]:
    for t in [-3.0, -0.5, 0.0, 0.7, 2.5, 8.0]:
        cdf.append({"df": df, "t": t, "cdf": float(st.t.cdf(t, df))})
out = pathlib.Path(__file__).resolve().parent.parent / "tests/data/study/stats.json"
out.write_text(
    json.dumps(
        {"scipy": scipy.__version__, "cases": cases, "quantiles": quantiles, "cdf": cdf},
        indent=1,
    )
    + "\n"
)
print(f"wrote {out}")
