"""The peers' training steps: nonprivate, Opacus standard and ghost, a fastDP-style
book-keeping ghost clipping in plain torch, and DPZero.

Every DP step clips each example's gradient (over all trainable tensors) to C,
adds N(0, sigma^2 C^2) to the clipped sum, divides by the expected batch size B and
applies the optimizer, as the crate's `dpsgd` / `ghost` / `dpzo` do.

* `opacus_standard`: Opacus 1.6 `GradSampleModule` + `DPOptimizer`: per-sample
  gradients materialised (B x p x d per adapter), one backward.
* `opacus_ghost`: Opacus 1.6 `grad_sample_mode="ghost"` (fast gradient clipping):
  ghost norms in the first backward, then a second backward of sum_i c_i l_i.
* `fastdp_bk`: book-keeping (Bu et al., "Differentially Private Optimization on
  Large Model at Small Cost", arXiv:2210.00038; the design of fastDP,
  github.com/awslabs/fast-differential-privacy): one backward that records X and G
  of every adapter linear and computes its per-sample norm there, by the ghost form
  <X X^T, G G^T> when 2T^2 < p d, else by the instantiated per-sample gradient;
  then one GEMM per linear for the clipped sum G^T diag(c) X. Autograd never forms a
  weight gradient.
* `dpzero`: DPZero (Zhang et al., arXiv:2310.09639): losses at theta +- lambda z,
  d_i = clip((l+ - l-)/(2 lambda), +-C), g = (sum d_i + sigma C n)/B,
  theta -= lr g z; z regenerated from a seed, never stored (MeZO-style).
"""

import torch
import torch.nn.functional as F

METHODS = ["nonprivate", "opacus_standard", "opacus_ghost", "fastdp_bk", "dpzero"]

# Which crate method each peer method is measured against.
CRATE_METHOD = {
    "nonprivate": "nonprivate",
    "opacus_standard": "dpsgd",
    "opacus_ghost": "ghost",
    "fastdp_bk": "ghost",
    "dpzero": "dpzo",
}


def settings(desc, crate_method):
    for m in desc["methods"]:
        if m["method"] == crate_method:
            return m
    raise SystemExit(
        f"the --describe JSON has no method '{crate_method}'; run "
        f"`dualpriv bench --describe --method all` (it lists {[m['method'] for m in desc['methods']]})"
    )


def optimizer(params, s):
    if s["optimizer"] == "adamw":
        b1, b2, eps = s["betas_eps"]
        return torch.optim.AdamW(
            params, lr=s["lr"], betas=(b1, b2), eps=eps, weight_decay=s["weight_decay"]
        )
    return torch.optim.SGD(params, lr=s["lr"], weight_decay=s["weight_decay"])


class _BkLinear(torch.autograd.Function):
    """y = x W^T whose backward books (x, g) and the per-sample norm, and returns dx only."""

    @staticmethod
    def forward(ctx, x, w, book):
        ctx.save_for_backward(x, w)
        ctx.book = book
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.book.record(w, x, g)
        dx = g @ w if ctx.needs_input_grad[0] else None
        return dx, None, None


def per_sample_sq_norms(x, g):
    """||G_i^T X_i||_F^2 for x [B,T,d], g [B,T,p], by fastDP's mixed rule."""
    t, d, p = x.shape[1], x.shape[2], g.shape[2]
    if 2 * t * t < p * d:
        return (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), x).pow(2).sum((1, 2))


class BookKeeping:
    """Book of one backward: (X, G) and per-sample squared norms of every adapter."""

    def __init__(self, model):
        self.entries = {}
        self.sq = None
        for lin in model.lora_linears():
            lin.book = self

    def linear(self, x, w):
        return _BkLinear.apply(x, w, self)

    def record(self, w, x, g):
        s = per_sample_sq_norms(x, g)
        self.sq = s if self.sq is None else self.sq + s
        self.entries[w] = (x, g)

    def clipped_sums(self, c):
        """Sets w.grad = sum_i c_i G_i^T X_i for every booked weight (one GEMM each)."""
        for w, (x, g) in self.entries.items():
            gc = g * c.to(g.dtype)[:, None, None]
            w.grad = gc.reshape(-1, g.shape[2]).t() @ x.reshape(-1, x.shape[2])
        self.entries = {}
        self.sq = None


def make_step(method, model, desc, batch, device, record=False, lam_override=None):
    """Returns (step(), trainable params): one training step of `method` on `batch`.

    With `record`, the DP steps keep the per-sample norms they formed
    (`step.last_norms`) for `--check`; DPZero keeps its unclipped differences.
    """
    images, ids, pos, targets = batch
    B = ids.shape[0]
    s = settings(desc, CRATE_METHOD[method])
    params = [p for p in model.parameters() if p.requires_grad]
    C, sigma = s["clip_norm"], s["noise_multiplier"]

    if method == "nonprivate":
        opt = optimizer(params, s)

        def step():
            loss = F.cross_entropy(model(images, ids, pos), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, params

    if method == "opacus_standard":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, loss_reduction="mean")
        opt = DPOptimizer(
            optimizer(params, s),
            noise_multiplier=sigma,
            max_grad_norm=C,
            expected_batch_size=B,
            loss_reduction="mean",
        )

        def step():
            loss = F.cross_entropy(gsm(images, ids, pos), targets)
            loss.backward()
            if record:
                sq = sum(p.grad_sample.reshape(B, -1).pow(2).sum(1) for p in params)
                step.last_norms = sq.sqrt().detach().clone()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, params

    if method == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model, max_grad_norm=C, use_ghost_clipping=True, loss_reduction="mean"
        )
        opt = DPOptimizerFastGradientClipping(
            optimizer(params, s),
            noise_multiplier=sigma,
            max_grad_norm=C,
            expected_batch_size=B,
            loss_reduction="mean",
        )
        crit = DPLossFastGradientClipping(
            gsm, opt, torch.nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean"
        )

        def step():
            loss = crit(gsm(images, ids, pos), targets)
            loss.backward()
            if record:
                step.last_norms = gsm.per_sample_gradient_norms.detach().clone()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, params

    if method == "fastdp_bk":
        book = BookKeeping(model)
        opt = optimizer(params, s)
        gen = torch.Generator(device=device).manual_seed(1)

        def step():
            losses = F.cross_entropy(model(images, ids, pos), targets, reduction="none")
            losses.sum().backward()
            c = (C / (book.sq.sqrt() + 1e-6)).clamp(max=1.0)
            if record:
                step.last_norms = book.sq.sqrt().detach().clone()
            book.clipped_sums(c)
            for p in params:
                noise = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
                p.grad.add_(noise, alpha=sigma * C).div_(B)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, params

    if method == "dpzero":
        lam, lr = s["dpzo_lambda"], s["lr"]
        if lam_override is not None:
            lam = lam_override
        gen = torch.Generator(device=device)
        # The scalar noise has its own stream, independent of the directions.
        noise_gen = torch.Generator(device=device).manual_seed(2)
        state = {"seed": 12345}

        def perturb(seed, scale):
            gen.manual_seed(seed)
            for p in params:
                z = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
                p.add_(z, alpha=scale)

        def per_example():
            return F.cross_entropy(model(images, ids, pos), targets, reduction="none")

        def step():
            seed = state["seed"]
            state["seed"] += 1
            with torch.no_grad():
                perturb(seed, lam)
                lp = per_example()
                perturb(seed, -2 * lam)
                lm = per_example()
                perturb(seed, lam)
                raw = (lp - lm).double() / (2 * lam)
                d = raw.clamp(-C, C)
                n = torch.randn((), generator=noise_gen, device=device, dtype=torch.float64)
                g = float((d.sum() + sigma * C * n) / B)
                perturb(seed, -lr * g)
            step.last_raw, step.last_seed = raw, seed

        return step, params

    raise SystemExit(f"unknown method '{method}'; expected one of {', '.join(METHODS)}")
