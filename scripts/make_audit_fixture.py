#!/usr/bin/env python3
"""Reference values for the one-run privacy audit (tests/audit.rs).

An independent implementation, with scipy's binomial, of the (eps, delta) p-value of
Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv 2305.08846, Algorithm 2 / Theorem 5.2), the eps lower bound found by scipy's brentq
root finder, and the Mann-Whitney AUC (scipy.stats.mannwhitneyu, ties as midranks).

Run: /work/venv/bin/python scripts/make_audit_fixture.py  (writes tests/data/audit/bound.json)
"""
import json
import math
import os

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats


def p_value(m, r, v, eps, delta):
    q = scipy.special.expit(eps)
    tail = scipy.stats.binom.sf(v - 1, r, q)  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # P[v - i <= Bin < v] = sf(v - i - 1) - sf(v - 1), for i = 1..v
    i = np.arange(1, v + 1)
    window = scipy.stats.binom.sf(v - i - 1, r, q) - tail
    alpha = max(0.0, float(np.max(window / i)))
    return min(tail + alpha * delta * 2 * m, 1.0)


def eps_lower_bound(m, r, v, delta, beta):
    f = lambda e: beta - p_value(m, r, v, e, delta)  # > 0 where eps is rejected
    if f(0.0) <= 0:
        return 0.0
    hi = 1.0
    while f(hi) > 0:
        hi *= 2
    return scipy.optimize.brentq(f, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-12)


def main():
    grid = []
    for m, r, v, delta in [
        (100, 20, 15, 0.0),
        (100, 20, 15, 1e-5),
        (100, 20, 20, 1e-5),
        (1000, 100, 70, 1e-5),
        (1000, 100, 100, 1e-5),
        (1000, 1000, 560, 1e-5),
        (1000, 1000, 600, 0.0),
        (1000, 200, 150, 1e-3),
        (2000, 200, 120, 1e-5),
        (5000, 2000, 1300, 1e-6),
        (5000, 500, 499, 1e-6),
        (500, 50, 30, 1e-5),
        (1000, 100, 55, 1e-5),
    ]:
        beta = 0.05
        eps = eps_lower_bound(m, r, v, delta, beta)
        grid.append(
            {
                "m": m,
                "r": r,
                "v": v,
                "delta": delta,
                "beta": beta,
                "epsilon": eps,
                "p_at": [[e, p_value(m, r, v, e, delta)] for e in (0.0, 0.5, 1.0, 2.0, 4.0)],
            }
        )
    rng = np.random.default_rng(7)
    aucs = []
    for n_in, n_out, shift, rounding in [(50, 60, 0.5, None), (200, 200, 1.0, 1), (30, 10, 0.0, 0)]:
        a = rng.normal(shift, 1.0, n_in)
        b = rng.normal(0.0, 1.0, n_out)
        if rounding is not None:  # ties
            a, b = np.round(a, rounding), np.round(b, rounding)
        u = scipy.stats.mannwhitneyu(a, b, alternative="two-sided").statistic
        aucs.append({"in": a.tolist(), "out": b.tolist(), "auc": float(u) / (n_in * n_out)})
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "audit", "bound.json")
    with open(out, "w") as f:
        json.dump({"generator": "scripts/make_audit_fixture.py", "scipy": scipy.__version__,
                   "bounds": grid, "aucs": aucs}, f, indent=1)
    print(f"wrote {os.path.normpath(out)}: {len(grid)} bounds, {len(aucs)} AUCs")
    for g in grid:
        print(g["m"], g["r"], g["v"], g["delta"], round(g["epsilon"], 6))


if __name__ == "__main__":
    main()
