#!/usr/bin/env python3
"""One peer measurement: a PyTorch copy of the crate's bench model, one method.

    dualpriv bench --describe --preset tiny --batch 32 > tiny-32.json
    python benches/peers/peer.py --describe tiny-32.json --method opacus_ghost --threads 2
    python benches/peers/peer.py --describe tiny-32.json --check

Prints one JSON object: the median step time over the timed steps after warm-up,
and memory. On the CPU, `peak_bytes` is the live-tensor peak of one extra step
above what was live when it started (model, optimizer state and data): the running
sum of the c10 allocator's allocation and free events that `torch.profiler`
records with `profile_memory=True`, so allocator caching never hides a tensor and
workspace buffers of kernels count too. The profiled step is not timed.
`rss_peak_bytes` is the process's resident high-water mark (`ru_maxrss`), whole
interpreter and libraries included. On CUDA, `peak_bytes` is
`torch.cuda.max_memory_allocated()` over the timed steps above the live bytes
before them.

`--check` runs each DP method once from the same weights in float64, on a few
examples, and compares its per-sample gradient norms with brute force (one backward
per example); the book-keeping clipped sum with the brute-force sum of clipped
gradients; DPZero's finite differences with the brute-force directional
derivatives. It exits non-zero on a mismatch.

The data are random (pixels, ids, targets): the step's work depends on shapes only.
Nothing here reads or reports private data.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import CRATE_METHOD, METHODS, BookKeeping, make_step  # noqa: E402
from model import Mllm, make_batch, trainable_count  # noqa: E402


# Layer 0's adapters see inputs that need no gradient; Opacus' hooks still fire
# correctly there (the check compares them with brute force), torch warns anyway.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def fail(msg):
    print(f"peer.py: {msg}", file=sys.stderr)
    sys.exit(2)


def load_describe(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        fail(f"cannot read the describe file {path}: {e}; write it with `dualpriv bench --describe`")
    except json.JSONDecodeError as e:
        fail(f"{path} is not JSON ({e}); write it with `dualpriv bench --describe > {path}`")


def build(desc, dtype, device, seed=0):
    torch.manual_seed(seed)
    # Built on the device: a 7B model need not pass through host memory.
    with torch.device(device):
        model = Mllm(desc).to(dtype=dtype)
    n = trainable_count(model)
    if n != desc["trainable_params"]:
        fail(
            f"the torch model has {n} trainable values, the crate's describe says "
            f"{desc['trainable_params']}: the two models differ"
        )
    return model


def cpu_live_peak(step):
    """Peak of live CPU allocator bytes during `step()` above its start, via profiler events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    events.sort()
    live = peak = 0
    for _, nb in events:
        live += nb
        peak = max(peak, live)
    return peak


def measure(desc, method, args):
    device = torch.device(args.device)
    model = build(desc, torch.float32, device)
    batch = make_batch(desc, desc["batch"], torch.float32, device)
    step, _ = make_step(method, model, desc, batch, device)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_live_peak(step)
    return {
        "side": "torch",
        "method": method,
        "crate_method": CRATE_METHOD[method],
        "preset": desc["preset"],
        "batch": desc["batch"],
        "threads": torch.get_num_threads(),
        "device": str(device),
        "median_ms": statistics.median(times),
        "times_ms": times,
        "peak_bytes": peak,
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "cpu live tensors",
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "trainable_params": trainable_count(model),
        "torch": torch.__version__,
        "opacus": opacus_version(),
    }


def opacus_version():
    try:
        import opacus

        return opacus.__version__
    except ImportError:
        return None


def brute_force_grads(model, batch):
    """Per-example gradients [B, n] of the trainable values, one backward each."""
    images, ids, pos, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(ids.shape[0]):
        sl = slice(i, i + 1)
        loss = F.cross_entropy(model(images[sl], ids[sl], pos[sl]), targets[sl])
        gs = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows), params


def close(name, got, want, rtol, problems):
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
    ok = err <= rtol
    print(f"  {name}: max relative error {err:.2e} ({'ok' if ok else 'MISMATCH'}, tolerance {rtol:.0e})")
    if not ok:
        problems.append(name)


def check(desc, args):
    """Per-sample norms of every DP method against brute force, in float64."""
    dtype, device = torch.float64, torch.device(args.device)
    b = args.check_batch
    desc = dict(desc, batch=b)
    base = build(desc, dtype, device, seed=3)
    # Random B so that both adapters have non-zero per-sample gradients.
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for lin in base.lora_linears():
            w = lin.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=dtype) * 0.05)
    batch = make_batch(desc, b, dtype, device, seed=5)
    per_ex, params = brute_force_grads(copy.deepcopy(base), batch)
    want = per_ex.norm(dim=1)
    print(
        f"check: {desc['preset']}, {b} examples, float64, {per_ex.shape[1]} trainable values; "
        f"brute-force norms {want.min().item():.3e} .. {want.max().item():.3e}"
    )
    problems = []
    for method in ["opacus_standard", "opacus_ghost", "fastdp_bk"]:
        step, _ = make_step(method, copy.deepcopy(base), desc, batch, device, record=True)
        step()
        close(f"{method} per-sample norms", step.last_norms.to(dtype), want, 1e-9, problems)
    # The book-keeping clipped sum against sum_i c_i g_i. C is set to the median
    # norm so that about half the examples are clipped.
    model = copy.deepcopy(base)
    book = BookKeeping(model)
    images, ids, pos, targets = batch
    F.cross_entropy(model(images, ids, pos), targets, reduction="none").sum().backward()
    C = want.median().item()
    c = (C / (book.sq.sqrt() + 1e-6)).clamp(max=1.0)
    book.clipped_sums(c)
    ps = [p for p in model.parameters() if p.requires_grad]
    got = torch.cat([p.grad.reshape(-1) for p in ps])
    cw = (C / (want + 1e-6)).clamp(max=1.0)
    close("fastdp_bk clipped sum", got, (cw[:, None] * per_ex).sum(0), 1e-9, problems)
    # DPZero: (l(θ+λz) − l(θ−λz))/2λ against <g_i, z>, λ small in float64.
    step, ps = make_step("dpzero", copy.deepcopy(base), desc, batch, device, record=True,
                         lam_override=1e-5)
    step()
    gz = torch.Generator(device=device).manual_seed(step.last_seed)
    z = torch.cat([torch.randn(p.shape, generator=gz, device=device, dtype=dtype).reshape(-1)
                   for p in ps])
    close("dpzero finite differences", step.last_raw, per_ex @ z, 1e-6, problems)
    if problems:
        print(f"check FAILED: {', '.join(problems)}", file=sys.stderr)
        sys.exit(1)
    print("check passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--describe", required=True, help="JSON from `dualpriv bench --describe`")
    ap.add_argument("--method", choices=METHODS, help="method to time")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--warmup", type=int, help="warm-up steps (default: 3 x the crate's)")
    ap.add_argument("--steps", type=int, help="timed steps (default: the crate's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--check", action="store_true", help="check per-sample norms, then exit")
    ap.add_argument("--check-batch", type=int, default=4, help="examples of --check")
    args = ap.parse_args()
    if args.threads < 1:
        fail(f"--threads {args.threads} must be at least 1")
    torch.set_num_threads(args.threads)
    desc = load_describe(args.describe)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda, but this torch sees no CUDA device; use --device cpu")
    if args.check:
        check(desc, args)
        return
    if args.method is None:
        fail(f"give --method (one of {', '.join(METHODS)}) or --check")
    args.warmup = 3 * desc["warmup"] if args.warmup is None else args.warmup
    args.steps = desc["steps"] if args.steps is None else max(args.steps, 1)
    print(json.dumps(measure(desc, args.method, args)))


if __name__ == "__main__":
    main()
