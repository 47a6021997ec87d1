#!/usr/bin/env python3
"""Crate against PyTorch peers, interleaved: the driver of `scripts/bench-peers.sh`.

For each (preset, batch) it writes the crate's `bench --describe` JSON, runs the
peers' `--check` once per preset, then for each round runs every pair in turn, one
process each: crate nonprivate, torch nonprivate, crate ghost, Opacus ghost, crate
dpsgd, Opacus standard, crate dpzo, DPZero, crate dualpriv, fastDP-style BK. A
side's figure is the median over rounds of each process's median step. Prints one
markdown table and writes `OUT/peers.json` with every process's figures.

On the CPU each round also runs one crate process with every method and
`--interleave` (one timed step of each in turn, each method with its own model):
the crate's own ratios (ghost / nonprivate, dpzo / nonprivate, dualpriv / ghost)
are also given from it, as the median over rounds of each process's ratio, since
the per-method processes above run up to minutes apart on a shared VM. (Not on a
GPU: five 7B models do not fit, and CUDA events time the device alone.)

Memory, per side:
* crate, CPU: the step's peak heap above the model, data and optimizer state
  (counting allocator, `peak_bytes` of `dualpriv bench --json`); GPU: peak live
  device buffers of the timed steps.
* torch, CPU: the live-tensor peak of one step above what was live at its start
  (`peer.py`); GPU: `torch.cuda.max_memory_allocated` above the start.
* both: the process's resident high-water mark (`ru_maxrss` from `wait4`).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))

# (label, side, method): the interleaved order of one round.
PAIRS = [
    ("nonprivate", "nonprivate"),
    ("ghost", "opacus_ghost"),
    ("dpsgd", "opacus_standard"),
    ("dpzo", "dpzero"),
    ("dualpriv", "fastdp_bk"),
]

ROW_NAMES = {
    ("crate", "nonprivate"): "dualpriv nonprivate",
    ("torch", "nonprivate"): "torch nonprivate",
    ("crate", "ghost"): "dualpriv ghost",
    ("torch", "opacus_ghost"): 'Opacus ghost (`grad_sample_mode="ghost"`)',
    ("torch", "fastdp_bk"): "torch fastDP-style BK (one backward)",
    ("crate", "dpsgd"): "dualpriv dpsgd",
    ("torch", "opacus_standard"): "Opacus standard",
    ("crate", "dpzo"): "dualpriv dpzo",
    ("torch", "dpzero"): "torch DPZero",
    ("crate", "dualpriv"): "dualpriv dualpriv",
}

RATIOS = [
    ("dualpriv nonprivate / torch nonprivate", ("crate", "nonprivate"), ("torch", "nonprivate")),
    ("dualpriv ghost / Opacus ghost", ("crate", "ghost"), ("torch", "opacus_ghost")),
    ("dualpriv ghost / torch fastDP-style BK", ("crate", "ghost"), ("torch", "fastdp_bk")),
    ("dualpriv dpsgd / Opacus standard", ("crate", "dpsgd"), ("torch", "opacus_standard")),
    ("dualpriv ghost / dualpriv nonprivate", ("crate", "ghost"), ("crate", "nonprivate")),
    ("dualpriv dpzo / dualpriv nonprivate", ("crate", "dpzo"), ("crate", "nonprivate")),
    ("dualpriv dualpriv / dualpriv ghost", ("crate", "dualpriv"), ("crate", "ghost")),
]

MEM_PAIRS = [
    ("nonprivate", ("crate", "nonprivate"), ("torch", "nonprivate")),
    ("ghost / Opacus ghost", ("crate", "ghost"), ("torch", "opacus_ghost")),
    ("dpsgd / Opacus standard", ("crate", "dpsgd"), ("torch", "opacus_standard")),
    ("dpzo / DPZero", ("crate", "dpzo"), ("torch", "dpzero")),
]


def fail(msg):
    print(f"bench-peers: {msg}", file=sys.stderr)
    sys.exit(2)


def run_rss(cmd, env):
    """Runs `cmd`; returns (stdout, peak RSS of that process in bytes) or exits naming it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    # stderr drains on a thread so neither pipe can fill; the child is reaped by
    # wait4 (not Popen.wait) to get its own rusage.
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()))
    t.start()
    out = p.stdout.read()
    t.join()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        fail(f"`{' '.join(cmd)}` failed (exit {p.returncode}):\n{err[0].strip()[-2000:]}")
    return out, ru.ru_maxrss * 1024


def crate_rows(args, preset, batch, methods, env, extra=()):
    cmd = [
        args.dualpriv, "bench", "--backend", args.backend, "--preset", preset,
        "--batch", str(batch), "--method", methods, "--steps", str(args.steps), "--json", *extra,
    ]
    out, rss = run_rss(cmd, env)
    try:
        rows = json.loads(out)
    except json.JSONDecodeError as e:
        fail(f"`{' '.join(cmd)}` printed no JSON ({e}): {out[:500]}")
    res = []
    for r in rows:
        peak = r.get("device_peak_bytes") if r.get("device_peak_bytes") is not None else r.get("peak_bytes")
        res.append({
            "side": "crate", "method": r["method"], "median_ms": r["median_ms"], "peak_bytes": peak,
            "peak_kind": "device peak" if r.get("device_peak_bytes") is not None else "step heap",
            "rss_peak_bytes": rss, "visual_tokens": r["visual_tokens"],
        })
    return res


def crate_run(args, preset, batch, method, env):
    return crate_rows(args, preset, batch, method, env)[0]


# The crate's own ratios from its interleaved process (CPU): (name, numerator, denominator).
INTERLEAVED_RATIOS = [
    ("dualpriv ghost / dualpriv nonprivate", "ghost", "nonprivate"),
    ("dualpriv dpzo / dualpriv nonprivate", "dpzo", "nonprivate"),
    ("dualpriv dualpriv / dualpriv ghost", "dualpriv", "ghost"),
]


def peer_run(args, desc_path, method, env):
    cmd = [
        args.python, os.path.join(HERE, "peer.py"), "--describe", desc_path, "--method", method,
        "--threads", str(args.threads), "--steps", str(args.steps), "--device", args.device,
    ]
    out, rss = run_rss(cmd, env)
    try:
        r = json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as e:
        fail(f"`{' '.join(cmd)}` printed no JSON ({e}): {out[:500]}")
    r["rss_peak_bytes"] = rss
    return r


def mib(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def fmt_ms(runs):
    ms = [r["median_ms"] for r in runs]
    lo, hi, mid = min(ms), max(ms), statistics.median(ms)
    return f"{mid:.0f}" if hi - lo < 0.05 * mid else f"{mid:.0f} ({lo:.0f}–{hi:.0f})"


def summarise(results, configs):
    """Markdown table: one column per (preset, batch)."""
    cols = [f"{p} B = {b}" for p, b in configs]
    lines = ["| ms/step (median over rounds; range) | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    med = {}
    for (side, m), name in ROW_NAMES.items():
        cells = []
        for c in configs:
            runs = results.get(c, {}).get((side, m), [])
            if runs:
                med[(c, side, m)] = statistics.median(r["median_ms"] for r in runs)
                cells.append(fmt_ms(runs))
            else:
                cells.append("—")
        if any(x != "—" for x in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, a, b in RATIOS:
        cells = []
        for c in configs:
            x, y = med.get((c, *a)), med.get((c, *b))
            cells.append(f"{x / y:.2f}" if x and y else "—")
        lines.append(f"| **{name}** | " + " | ".join(cells) + " |")
    for name, a, b in INTERLEAVED_RATIOS:
        cells = []
        for c in configs:
            rounds = results.get(c, {}).get("interleaved", [])
            ratios = [r[a]["median_ms"] / r[b]["median_ms"] for r in rounds if a in r and b in r]
            if ratios:
                lo, hi, mid = min(ratios), max(ratios), statistics.median(ratios)
                cells.append(f"{mid:.2f}" if len(ratios) == 1 else f"{mid:.2f} ({lo:.2f}–{hi:.2f})")
            else:
                cells.append("—")
        if any(x != "—" for x in cells):
            lines.append(f"| **{name}, interleaved in one process** | " + " | ".join(cells) + " |")

    def peak(c, key, field):
        runs = results.get(c, {}).get(key, [])
        vals = [r[field] for r in runs if r.get(field) is not None]
        return statistics.median(vals) if vals else None

    for name, a, b in MEM_PAIRS:
        cells, ratio = [], []
        for c in configs:
            x, y = peak(c, a, "peak_bytes"), peak(c, b, "peak_bytes")
            cells.append(f"{mib(x)} / {mib(y)}")
            ratio.append(f"{x / y:.2f}" if x and y else "—")
        lines.append(f"| step peak MiB, {name} (crate / torch) | " + " | ".join(cells) + " |")
        lines.append(f"| **peak memory ratio, {name}** | " + " | ".join(ratio) + " |")
    cells = []
    for c in configs:
        x, y = peak(c, ("crate", "ghost"), "rss_peak_bytes"), peak(c, ("torch", "opacus_ghost"), "rss_peak_bytes")
        cells.append(f"{mib(x)} / {mib(y)}")
    lines.append("| process RSS MiB, ghost / Opacus ghost (crate / torch) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description="crate vs PyTorch peers, interleaved")
    ap.add_argument("--dualpriv", required=True, help="the dualpriv binary")
    ap.add_argument("--python", required=True, help="python with torch and opacus")
    ap.add_argument("--preset", default="tiny", help="comma list of presets")
    ap.add_argument("--batch", default="32,128", help="comma list of batch sizes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-check", action="store_true", help="skip the peers' norm check")
    args = ap.parse_args()
    if args.rounds < 2:
        fail(f"--rounds {args.rounds}: interleaving needs at least 2 rounds")
    args.backend = args.device
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        fail(f"--batch {args.batch!r} is not a comma list of integers, e.g. 32,128")
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    configs = [(p, b) for p in presets for b in batches]
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               KINETO_LOG_LEVEL="5")
    descs = {}
    for p, b in configs:
        path = os.path.join(args.out, f"describe-{p}-{b}.json")
        out, _ = run_rss([args.dualpriv, "bench", "--describe", "--preset", p, "--batch", str(b),
                          "--method", "all", "--steps", str(args.steps)], env)
        with open(path, "w") as f:
            f.write(out)
        descs[(p, b)] = path
    if not args.no_check:
        for p in presets:
            path = descs[(p, batches[0])]
            with open(path) as f:
                frozen = json.load(f)["frozen_params"]
            if frozen > 200_000_000:
                # The check copies the model in float64 once per method.
                print(f"bench-peers: {p} is too large for the float64 norm check; skipped",
                      file=sys.stderr)
                continue
            print(f"bench-peers: checking the peers' per-sample norms on {p}", file=sys.stderr)
            r = subprocess.run([args.python, os.path.join(HERE, "peer.py"), "--describe", path,
                                "--check", "--device", args.device], env=env,
                               capture_output=True, text=True)
            sys.stderr.write(r.stdout)
            if r.returncode != 0:
                fail(f"the peers' --check failed on {p}:\n{r.stderr[-2000:]}")
    results = {c: {} for c in configs}
    for rnd in range(args.rounds):
        for c in configs:
            p, b = c
            for crate_m, peer_m in PAIRS:
                print(f"bench-peers: round {rnd + 1}/{args.rounds}, {p} B={b}: {crate_m} / {peer_m}",
                      file=sys.stderr)
                results[c].setdefault(("crate", crate_m), []).append(crate_run(args, p, b, crate_m, env))
                results[c].setdefault(("torch", peer_m), []).append(peer_run(args, descs[c], peer_m, env))
            if args.device == "cpu":
                print(f"bench-peers: round {rnd + 1}/{args.rounds}, {p} B={b}: the crate's methods "
                      "interleaved", file=sys.stderr)
                rows = crate_rows(args, p, b, ",".join(m for m, _ in PAIRS), env, ["--interleave"])
                results[c].setdefault("interleaved", []).append({r["method"]: r for r in rows})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs" if args.device == "cpu" else "GPU"
    table = summarise(results, configs)
    header = (f"{stamp}; {machine}; {args.threads} threads per side; {args.rounds} rounds, "
              f"{args.steps} timed steps per process")
    print(header)
    print(table)
    doc = {
        "date": stamp, "machine": machine, "threads": args.threads, "rounds": args.rounds,
        "steps": args.steps, "device": args.device, "table": table,
        "runs": [
            dict(r, preset=p, batch=b) for (p, b), by in results.items()
            for key, rs in by.items() if key != "interleaved" for r in rs
        ],
        "interleaved": [
            dict(rows=list(r.values()), preset=p, batch=b) for (p, b), by in results.items()
            for r in by.get("interleaved", [])
        ],
    }
    with open(os.path.join(args.out, "peers.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.out, "peers.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
