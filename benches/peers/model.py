"""The crate's LLaVA-style model in plain PyTorch, built from `dualpriv bench --describe`.

Same sizes, same frozen/trainable split, same token counts as the crate
(src/model/{vit,projector,llama,lora,mllm}.rs):

    images [B,3,S,S] -> patches [B,P,3pp] -> Linear (bias) -> [CLS, patches] + positions
      -> pre-LayerNorm -> (layers - 1) pre-norm CLIP layers (MHSA with biases,
         fc1 -> quick_gelu -> fc2) -> drop CLS (feature "patch")            frozen
      -> projector Linear(Dv->D) -> GELU(tanh) -> Linear(D->D), biases       frozen
    [visual V, text T] -> Llama layers: RMSNorm, q/k/v/o (RoPE rotate-half,
      causal GQA), RMSNorm, SwiGLU (gate, up, down); no biases                frozen
      + LoRA on q, k, v, o, gate, up, down: h = W x + (alpha/r) B(A x)        trainable
    -> RMSNorm -> lm_head (untied) at the T text rows -> logits of the answer row

The loss of example i is the cross-entropy at its answer position (the built-in data
has one per example). The trainable tensors are exactly the LoRA A (r x d) and
B (p x r) of every adapted linear, as `nn.Linear` modules so that Opacus' samplers
apply to them unchanged.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / sqrt(mean(x^2) + eps) * w (frozen)."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * r * self.weight


class LoraLinear(nn.Module):
    """A frozen bias-free linear with a LoRA adapter.

    `book` switches the adapter to the book-keeping path of `methods.BookKeeping`:
    the same forward, but a backward that returns no weight gradient and hands
    (X, G) of each adapter linear to the book instead.
    """

    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=False)
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        # PEFT's init, as the crate's: A Kaiming-uniform with bound 1/sqrt(d_in), B zeros.
        nn.init.uniform_(self.lora_A.weight, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank
        self.book = None

    def forward(self, x):
        if self.book is None:
            u = self.lora_A(x)
            return self.base(x) + self.scale * self.lora_B(u)
        u = self.book.linear(x, self.lora_A.weight)
        return self.base(x) + self.scale * self.book.linear(u, self.lora_B.weight)


def rope_tables(seq_len, head_dim, theta, dtype, device):
    """cos/sin of rotate-half RoPE for positions 0..seq_len-1, [seq_len, head_dim]."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device)


def apply_rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class VitLayer(nn.Module):
    def __init__(self, d, heads, mlp, eps):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        h = self.ln1(x)
        q, k, v = (
            m(h).view(b, n, self.heads, hd).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.o(a)
        f = self.fc1(self.ln2(x))
        return x + self.fc2(f * torch.sigmoid(1.702 * f))


class VisionTower(nn.Module):
    def __init__(self, v):
        super().__init__()
        d = v["hidden"]
        self.patch = v["patch_size"]
        self.patch_embed = nn.Linear(v["patch_dim"], d, bias=v["patch_bias"])
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        self.pos = nn.Parameter(torch.randn(v["tokens"], d) * 0.02)
        self.pre_ln = nn.LayerNorm(d, eps=v["ln_eps"])
        self.layers = nn.ModuleList(
            VitLayer(d, v["heads"], v["mlp"], v["ln_eps"]) for _ in range(v["layers_run"])
        )
        self.keep_cls = v["feature"] == "cls_patch"

    def forward(self, images):
        b, c, s, _ = images.shape
        p = self.patch
        n = s // p
        patches = (
            images.view(b, c, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c * p * p)
        )
        x = self.patch_embed(patches)
        x = torch.cat([self.cls.expand(b, 1, -1), x], dim=1) + self.pos
        x = self.pre_ln(x)
        for layer in self.layers:
            x = layer(x)
        return x if self.keep_cls else x[:, 1:]


class LlamaLayer(nn.Module):
    def __init__(self, l, rank, alpha):
        super().__init__()
        d, hd = l["hidden"], l["head_dim"]
        kv = l["kv_heads"] * hd
        self.ln1 = RMSNorm(d, l["rms_eps"])
        self.q = LoraLinear(d, d, rank, alpha)
        self.k = LoraLinear(d, kv, rank, alpha)
        self.v = LoraLinear(d, kv, rank, alpha)
        self.o = LoraLinear(d, d, rank, alpha)
        self.ln2 = RMSNorm(d, l["rms_eps"])
        self.gate = LoraLinear(d, l["mlp"], rank, alpha)
        self.up = LoraLinear(d, l["mlp"], rank, alpha)
        self.down = LoraLinear(l["mlp"], d, rank, alpha)
        self.heads, self.kv_heads, self.hd = l["heads"], l["kv_heads"], hd

    def forward(self, x, cos, sin):
        b, n, d = x.shape
        h = self.ln1(x)
        q = self.q(h).view(b, n, self.heads, self.hd).transpose(1, 2)
        k = self.k(h).view(b, n, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(h).view(b, n, self.kv_heads, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        m = self.ln2(x)
        return x + self.down(F.silu(self.gate(m)) * self.up(m))


class Mllm(nn.Module):
    """The whole model; `forward` returns the logits of each example's answer row."""

    def __init__(self, desc):
        super().__init__()
        v, l = desc["vision"], desc["llm"]
        rank, alpha = desc["lora_rank"], desc["lora_alpha"]
        d = l["hidden"]
        self.vision = VisionTower(v)
        self.proj1 = nn.Linear(v["hidden"], d, bias=desc["projector_bias"])
        self.proj2 = nn.Linear(d, d, bias=desc["projector_bias"])
        self.proj_act = "tanh" if desc["projector_act"] == "gelu_tanh" else "none"
        self.embed = nn.Embedding(l["vocab"], d)
        self.layers = nn.ModuleList(LlamaLayer(l, rank, alpha) for _ in range(l["layers"]))
        self.norm = RMSNorm(d, l["rms_eps"])
        self.lm_head = nn.Linear(d, l["vocab"], bias=False)
        self.head_dim, self.theta = l["head_dim"], l["rope_theta"]
        for name, p in self.named_parameters():
            p.requires_grad_(".lora_" in name)
        self._rope = {}

    def lora_linears(self):
        return [m for m in self.modules() if isinstance(m, LoraLinear)]

    def rope(self, n, dtype, device):
        key = (n, dtype, device)
        if key not in self._rope:
            self._rope[key] = rope_tables(n, self.head_dim, self.theta, dtype, device)
        return self._rope[key]

    def forward(self, images, ids, answer_pos):
        # The frozen tower and projector need no graph: nothing before them trains.
        with torch.no_grad():
            vis = self.proj2(F.gelu(self.proj1(self.vision(images)), approximate=self.proj_act))
            txt = self.embed(ids)
        nv, nt = vis.shape[1], ids.shape[1]
        x = torch.cat([vis, txt], dim=1)
        cos, sin = self.rope(nv + nt, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x)[:, nv:])
        rows = torch.arange(ids.shape[0], device=ids.device)
        return logits[rows, answer_pos]


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_batch(desc, batch, dtype, device, seed=0):
    """A fixed batch with the crate's shapes: random pixels, ids, answer positions."""
    g = torch.Generator().manual_seed(seed)
    v, l = desc["vision"], desc["llm"]
    s, t = v["image_size"], desc["text_len"]
    images = torch.rand(batch, 3, s, s, generator=g).to(dtype=dtype, device=device)
    ids = torch.randint(0, l["vocab"], (batch, t), generator=g).to(device)
    # Varied answer positions in the second half of the text, as the built-in data.
    pos = torch.randint(t // 2, max(t - 1, t // 2 + 1), (batch,), generator=g).to(device)
    targets = torch.randint(0, l["vocab"], (batch,), generator=g).to(device)
    return images, ids, pos, targets
