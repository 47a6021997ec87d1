//! The one validation layer of the backends: every shape and length check of the
//! model ops ([`Backend`](super::Backend)) and of the DP ops
//! ([`DpBackend`](super::dp::DpBackend)).
//!
//! The traits' public methods run the check of their op here, on the buffers'
//! lengths, and only then call the device's `*_unchecked` implementation, so a new
//! backend (bf16, multi-GPU) implements the math and inherits the checks. On a GPU
//! an unchecked launch with wrong lengths reads or writes out of bounds, which is why
//! the implementations are `unsafe fn`s whose contract is the function of the same
//! name here.
//!
//! A failed check is an [`Error::Shape`] (or [`Error::Config`] from a config's own
//! validation) naming the buffer and the expected size; nothing here panics, and
//! products of dimensions that overflow `usize` are shape errors too.
#![allow(clippy::too_many_arguments)]

use super::{AttnShape, Blocks, MatmulSpec, PatchShape, RopeShape, RowShape};
use crate::dp::clip::LinearShape;
use crate::dp::prune::UpdateConfig;
use crate::error::ensure_shape;
use crate::vision::tokens::{TokenSelectConfig, TokenShape};
use crate::{Error, Result};

/// `got == want`, or a shape error naming the buffer.
pub fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    ensure_shape(got == want, || {
        format!("{name} has {got} values, expected {want}")
    })
}

/// [`check_len`] for the buffer `name` of op `what`, the message formed only on
/// failure (a passing check allocates nothing: the checks run on every op of a
/// training step).
pub fn check_op_len(what: &str, name: &str, got: usize, want: usize) -> Result<()> {
    ensure_shape(got == want, || {
        format!("{what} {name} has {got} values, expected {want}")
    })
}

/// The product of `dims`, or a shape error when it overflows `usize`.
pub fn checked(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("{what}: size {dims:?} overflows usize")))
}

// ---------------------------------------------------------------------------
// matmul, bias, residual, copies, patches

/// [`Backend::matmul`](super::Backend::matmul): A is m×k, B k×n, C m×n values.
pub fn matmul(c: usize, a: usize, b: usize, s: MatmulSpec) -> Result<()> {
    check_len("matmul A", a, checked(&[s.m, s.k], "matmul A")?)?;
    check_len("matmul B", b, checked(&[s.k, s.n], "matmul B")?)?;
    check_len("matmul C", c, checked(&[s.m, s.n], "matmul C")?)
}

/// [`Backend::add_bias`](super::Backend::add_bias): `dim` biases, `rows × dim` outputs.
pub fn add_bias(y: usize, bias: usize, s: RowShape) -> Result<()> {
    check_len("bias", bias, s.dim)?;
    check_len("biased output", y, checked(&[s.rows, s.dim], "bias")?)
}

/// [`Backend::axpy`](super::Backend::axpy): `x` as long as `y`.
pub fn axpy(y: usize, x: usize) -> Result<()> {
    check_len("axpy x", x, y)
}

/// [`Backend::copy_blocks`](super::Backend::copy_blocks): every block inside the
/// source and the destination.
pub fn copy_blocks(dst: usize, src: usize, b: &Blocks) -> Result<()> {
    if b.count == 0 || b.len == 0 {
        return Ok(());
    }
    let end = |off: usize, stride: usize| {
        (b.count - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(off))
            .and_then(|v| v.checked_add(b.len))
    };
    ensure_shape(
        end(b.src_off, b.src_stride).is_some_and(|e| e <= src),
        || format!("copy_blocks reads past the source ({src} values): {b:?}"),
    )?;
    ensure_shape(
        end(b.dst_off, b.dst_stride).is_some_and(|e| e <= dst),
        || format!("copy_blocks writes past the destination ({dst} values): {b:?}"),
    )
}

/// [`Backend::patchify`](super::Backend::patchify): the patch divides the image,
/// `[b, c, s, s]` images and `[b, (s/p)², c·p·p]` patches.
pub fn patchify(out: usize, images: usize, s: PatchShape) -> Result<()> {
    ensure_shape(s.patch >= 1 && s.size.is_multiple_of(s.patch), || {
        format!(
            "patch size {} must divide the image size {}",
            s.patch, s.size
        )
    })?;
    let np = s.size / s.patch;
    let pdim = checked(&[s.channels, s.patch, s.patch], "patchify")?;
    check_len(
        "images",
        images,
        checked(&[s.b, s.channels, s.size, s.size], "images")?,
    )?;
    check_len("patches", out, checked(&[s.b, np, np, pdim], "patches")?)
}

// ---------------------------------------------------------------------------
// Norms

/// [`Backend::layernorm_fwd`](super::Backend::layernorm_fwd).
pub fn layernorm_fwd(
    out: usize,
    mean: usize,
    rstd: usize,
    x: usize,
    w: usize,
    b: usize,
    s: RowShape,
) -> Result<()> {
    let n = checked(&[s.rows, s.dim], "layernorm")?;
    check_len("layernorm x", x, n)?;
    check_len("layernorm out", out, n)?;
    check_len("layernorm weight", w, s.dim)?;
    check_len("layernorm bias", b, s.dim)?;
    check_len("layernorm mean", mean, s.rows)?;
    check_len("layernorm rstd", rstd, s.rows)
}

/// [`Backend::layernorm_bwd`](super::Backend::layernorm_bwd).
pub fn layernorm_bwd(
    dx: usize,
    dw: usize,
    db: usize,
    dout: usize,
    x: usize,
    w: usize,
    mean: usize,
    rstd: usize,
    s: RowShape,
) -> Result<()> {
    let n = checked(&[s.rows, s.dim], "layernorm")?;
    for (name, got) in [("dx", dx), ("dout", dout), ("x", x)] {
        check_op_len("layernorm_bwd", name, got, n)?;
    }
    for (name, got) in [("w", w), ("dw", dw), ("db", db)] {
        check_op_len("layernorm_bwd", name, got, s.dim)?;
    }
    check_len("layernorm_bwd mean", mean, s.rows)?;
    check_len("layernorm_bwd rstd", rstd, s.rows)
}

/// [`Backend::rmsnorm_fwd`](super::Backend::rmsnorm_fwd).
pub fn rmsnorm_fwd(out: usize, rstd: usize, x: usize, w: usize, s: RowShape) -> Result<()> {
    let n = checked(&[s.rows, s.dim], "rmsnorm")?;
    check_len("rmsnorm x", x, n)?;
    check_len("rmsnorm out", out, n)?;
    check_len("rmsnorm weight", w, s.dim)?;
    check_len("rmsnorm rstd", rstd, s.rows)
}

/// [`Backend::rmsnorm_bwd`](super::Backend::rmsnorm_bwd).
pub fn rmsnorm_bwd(
    dx: usize,
    dw: usize,
    dout: usize,
    x: usize,
    w: usize,
    rstd: usize,
    s: RowShape,
) -> Result<()> {
    let n = checked(&[s.rows, s.dim], "rmsnorm")?;
    for (name, got) in [("dx", dx), ("dout", dout), ("x", x)] {
        check_op_len("rmsnorm_bwd", name, got, n)?;
    }
    check_len("rmsnorm_bwd w", w, s.dim)?;
    check_len("rmsnorm_bwd dw", dw, s.dim)?;
    check_len("rmsnorm_bwd rstd", rstd, s.rows)
}

// ---------------------------------------------------------------------------
// RoPE

/// [`Backend::rope_fwd`](super::Backend::rope_fwd) and its backward: an even head
/// dimension and `[b, t, heads·hd]` values.
pub fn rope(x: usize, s: RopeShape) -> Result<()> {
    ensure_shape(s.hd.is_multiple_of(2), || {
        format!("rope needs an even head dimension, got {}", s.hd)
    })?;
    let row = checked(&[s.heads, s.hd], "rope")?;
    check_len("rope input", x, checked(&[s.b, s.t, row], "rope")?)
}

// ---------------------------------------------------------------------------
// Attention

/// The heads of an [`AttnShape`]: kv heads divide the query heads, and the
/// probabilities (and every per-head matrix) fit in `usize`.
pub fn attn_shape(s: &AttnShape) -> Result<()> {
    ensure_shape(s.hkv >= 1 && s.hq.is_multiple_of(s.hkv), || {
        format!(
            "attention: kv heads ({}) must be ≥ 1 and divide query heads ({})",
            s.hkv, s.hq
        )
    })?;
    checked(&[s.b, s.hq, s.t, s.t.max(s.hd)], "attention")?;
    Ok(())
}

/// [`Backend::attention_fwd`](super::Backend::attention_fwd).
pub fn attention_fwd(
    out: usize,
    probs: usize,
    q: usize,
    k: usize,
    v: usize,
    s: AttnShape,
) -> Result<()> {
    attn_shape(&s)?;
    check_len("attention q", q, s.q_len())?;
    check_len("attention out", out, s.q_len())?;
    check_len("attention k", k, s.kv_len())?;
    check_len("attention v", v, s.kv_len())?;
    check_len("attention probs", probs, s.probs_len())
}

/// [`Backend::attention_probs`](super::Backend::attention_probs).
pub fn attention_probs(probs: usize, q: usize, k: usize, v: usize, s: AttnShape) -> Result<()> {
    attn_shape(&s)?;
    check_len("attention q", q, s.q_len())?;
    check_len("attention k", k, s.kv_len())?;
    check_len("attention v", v, s.kv_len())?;
    check_len("attention probs", probs, s.probs_len())
}

/// [`Backend::attention_bwd`](super::Backend::attention_bwd).
pub fn attention_bwd(
    dq: usize,
    dk: usize,
    dv: usize,
    dout: usize,
    q: usize,
    k: usize,
    v: usize,
    probs: usize,
    s: AttnShape,
) -> Result<()> {
    attn_shape(&s)?;
    for (name, got) in [("dq", dq), ("dout", dout), ("q", q)] {
        check_op_len("attention_bwd", name, got, s.q_len())?;
    }
    for (name, got) in [("dk", dk), ("dv", dv), ("k", k), ("v", v)] {
        check_op_len("attention_bwd", name, got, s.kv_len())?;
    }
    check_len("attention_bwd probs", probs, s.probs_len())
}

// ---------------------------------------------------------------------------
// Activations

/// An elementwise forward `out = f(x)`: `x` as long as `out` (`what` names the op).
pub fn unary(what: &str, out: usize, x: usize) -> Result<()> {
    check_op_len(what, "input", x, out)
}

/// An elementwise backward `dx = dout · f'(x)`: `dout` and `x` as long as `dx`.
fn unary_bwd(what: &str, dx: usize, dout: usize, x: usize) -> Result<()> {
    check_op_len(what, "dout", dout, dx)?;
    check_op_len(what, "x", x, dx)
}

/// [`Backend::gelu_bwd`](super::Backend::gelu_bwd).
pub fn gelu_bwd(dx: usize, dout: usize, x: usize) -> Result<()> {
    unary_bwd("gelu_bwd", dx, dout, x)
}

/// [`Backend::gelu_erf_bwd`](super::Backend::gelu_erf_bwd).
pub fn gelu_erf_bwd(dx: usize, dout: usize, x: usize) -> Result<()> {
    unary_bwd("gelu_erf_bwd", dx, dout, x)
}

/// [`Backend::swiglu_fwd`](super::Backend::swiglu_fwd).
pub fn swiglu_fwd(out: usize, gate: usize, up: usize) -> Result<()> {
    check_len("swiglu gate", gate, out)?;
    check_len("swiglu up", up, out)
}

/// [`Backend::swiglu_bwd`](super::Backend::swiglu_bwd): every buffer as long as `dout`.
pub fn swiglu_bwd(dgate: usize, dup: usize, dout: usize, gate: usize, up: usize) -> Result<()> {
    for (name, got) in [("dgate", dgate), ("dup", dup), ("gate", gate), ("up", up)] {
        check_op_len("swiglu_bwd", name, got, dout)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Embedding and the loss

fn ids_in_vocab(ids: &[u32], vocab: usize, what: &str) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Error::Shape(format!(
            "{what}: token id {id} is out of range for a vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// [`Backend::embedding_fwd`](super::Backend::embedding_fwd) (`what` = "embedding")
/// and its backward ("embedding_bwd"): `s.rows` ids, each below `vocab`, a
/// `vocab × dim` table and a `rows × dim` buffer of token rows.
pub fn embedding(
    what: &str,
    ids: &[u32],
    table: usize,
    rows: usize,
    s: RowShape,
    vocab: usize,
) -> Result<()> {
    check_op_len(what, "ids", ids.len(), s.rows)?;
    check_op_len(what, "table", table, checked(&[vocab, s.dim], what)?)?;
    check_op_len(what, "rows", rows, checked(&[s.rows, s.dim], what)?)?;
    ids_in_vocab(ids, vocab, what)
}

/// [`Backend::cross_entropy`](super::Backend::cross_entropy): `rows × vocab` logits,
/// one target and weight per row, and every target of a row with a non-zero weight
/// below the vocabulary. `weight_is_zero` reads the weights back; it runs only when
/// some target is out of range (masked rows may hold anything), the rare path.
pub fn cross_entropy(
    losses: usize,
    dlogits: usize,
    logits: usize,
    targets: &[u32],
    weights: usize,
    s: RowShape,
    weight_is_zero: impl FnOnce() -> Result<Vec<bool>>,
) -> Result<()> {
    let n = checked(&[s.rows, s.dim], "cross_entropy")?;
    check_len("cross_entropy logits", logits, n)?;
    check_len("cross_entropy dlogits", dlogits, n)?;
    check_len("cross_entropy losses", losses, s.rows)?;
    check_len("cross_entropy targets", targets.len(), s.rows)?;
    check_len("cross_entropy weights", weights, s.rows)?;
    if targets.iter().all(|&t| (t as usize) < s.dim) {
        return Ok(());
    }
    let zero = weight_is_zero()?;
    if zero.len() != s.rows {
        return Err(Error::Internal(format!(
            "cross_entropy read back {} weights for {} rows",
            zero.len(),
            s.rows
        )));
    }
    for (row, (&tg, &z)) in targets.iter().zip(&zero).enumerate() {
        ensure_shape(z || (tg as usize) < s.dim, || {
            format!(
                "cross_entropy: target {tg} of row {row} is out of range for a vocabulary of {}",
                s.dim
            )
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Token selection

/// [`Backend::select_tokens`](super::Backend::select_tokens): the config against the
/// shape, then `[B, H, N]` CLS attention, `[B, N, H·hd]` keys and `[B, N, D]` hidden
/// states.
pub fn select_tokens(
    attn_cls: usize,
    keys: usize,
    hidden: usize,
    shape: &TokenShape,
    cfg: &TokenSelectConfig,
) -> Result<()> {
    cfg.validate(shape)?;
    for (name, got, want, layout) in [
        ("attn_cls", attn_cls, shape.attn_len()?, "B·H·N"),
        ("keys", keys, shape.keys_len()?, "B·N·H·hd"),
        ("hidden", hidden, shape.hidden_len()?, "B·N·D"),
    ] {
        ensure_shape(got == want, || {
            format!("{name} has {got} elements, expected {want} = {layout}")
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// DP ops

/// A linear layer's captured input `x` (b·t·d values) and output gradient `g`
/// (b·t·p values).
pub fn linear(s: LinearShape, x: usize, g: usize) -> Result<()> {
    let want = checked(&[s.b, s.t, s.d], "linear input")?;
    ensure_shape(x == want, || {
        format!(
            "linear input has {x} values, expected b*t*d = {}*{}*{}",
            s.b, s.t, s.d
        )
    })?;
    linear_grad(s, g)
}

/// A linear layer's output gradient `g`: b·t·p values.
pub fn linear_grad(s: LinearShape, g: usize) -> Result<()> {
    let want = checked(&[s.b, s.t, s.p], "linear output gradient")?;
    ensure_shape(g == want, || {
        format!(
            "linear output gradient has {g} values, expected b*t*p = {}*{}*{}",
            s.b, s.t, s.p
        )
    })
}

fn factors(s: LinearShape, factors: usize) -> Result<()> {
    ensure_shape(factors == s.b, || {
        format!("{factors} clip factors for a batch of {}", s.b)
    })
}

/// [`DpBackend::add_layer_sq_norms`](super::dp::DpBackend::add_layer_sq_norms): one
/// norm slot per example, then [`linear`].
pub fn add_layer_sq_norms(x: usize, g: usize, s: LinearShape, slots: usize) -> Result<()> {
    ensure_shape(slots == s.b, || {
        format!("{slots} norm slots for batch {}", s.b)
    })?;
    linear(s, x, g)
}

/// [`DpBackend::clipped_weight_sum`](super::dp::DpBackend::clipped_weight_sum):
/// [`linear`], one factor per example and a p×d output.
pub fn clipped_weight_sum(
    x: usize,
    g: usize,
    fac: usize,
    s: LinearShape,
    out: usize,
) -> Result<()> {
    linear(s, x, g)?;
    factors(s, fac)?;
    let want = checked(&[s.p, s.d], "clipped sum")?;
    ensure_shape(out == want, || {
        format!("clipped sum buffer has {out} values, expected p*d = {want}")
    })
}

/// [`DpBackend::clipped_bias_sum`](super::dp::DpBackend::clipped_bias_sum):
/// [`linear_grad`], one factor per example and p outputs.
pub fn clipped_bias_sum(g: usize, fac: usize, s: LinearShape, out: usize) -> Result<()> {
    linear_grad(s, g)?;
    factors(s, fac)?;
    ensure_shape(out == s.p, || {
        format!("clipped bias buffer has {out} values, expected p = {}", s.p)
    })
}

/// [`DpBackend::per_example_weight_grads`](super::dp::DpBackend::per_example_weight_grads):
/// [`linear`], and a b×p×d result that fits in `usize`.
pub fn per_example_weight_grads(x: usize, g: usize, s: LinearShape) -> Result<()> {
    linear(s, x, g)?;
    checked(&[s.b, s.p, s.d], "per-example weight gradients")?;
    Ok(())
}

/// [`DpBackend::per_example_bias_grads`](super::dp::DpBackend::per_example_bias_grads):
/// b·t·p gradient values.
pub fn per_example_bias_grads(g: usize, s: LinearShape) -> Result<()> {
    let want = checked(&[s.b, s.t, s.p], "G")?;
    ensure_shape(g == want, || format!("G has {g} values, expected b*t*p"))
}

/// [`DpBackend::add_row_sq_norms`](super::dp::DpBackend::add_row_sq_norms): one norm
/// slot per row, and rows of equal length.
pub fn add_row_sq_norms(per_example: usize, rows: usize, slots: usize) -> Result<()> {
    ensure_shape(
        slots == rows && (rows == 0 || per_example.is_multiple_of(rows)),
        || format!("{per_example} values in {rows} rows with {slots} norm slots"),
    )
}

/// [`DpBackend::weighted_row_sum`](super::dp::DpBackend::weighted_row_sum): one factor
/// per row, and `rows` rows as long as `out`.
pub fn weighted_row_sum(per_example: usize, fac: usize, rows: usize, out: usize) -> Result<()> {
    ensure_shape(
        fac == rows && rows.checked_mul(out) == Some(per_example),
        || format!("{per_example} values for {rows} rows of {out} with {fac} factors"),
    )
}

/// The lengths of one tensor of
/// [`DpBackend::noise_prune_update`](super::dp::DpBackend::noise_prune_update):
/// `(tensor id, grad, param, m, v)`, a moment buffer `None` when not given.
pub type UpdateLens = (u32, usize, usize, Option<usize>, Option<usize>);

/// [`DpBackend::noise_prune_update`](super::dp::DpBackend::noise_prune_update): a
/// valid config, and per tensor a param as long as the gradient, and moment buffers
/// of that length wherever given or needed by the optimizer.
pub fn noise_prune_update(tensors: &[UpdateLens], cfg: &UpdateConfig) -> Result<()> {
    cfg.validate()?;
    for &(id, n, param, m, v) in tensors {
        let moment_bad =
            |b: Option<usize>, needed: bool| (b.is_some() || needed) && b.unwrap_or(0) != n;
        if param != n || moment_bad(m, cfg.opt.needs_m()) || moment_bad(v, cfg.opt.needs_v()) {
            return Err(Error::Shape(format!(
                "tensor {id}: grad has {n} values but param/m/v have {param}/{}/{}",
                m.unwrap_or(0),
                v.unwrap_or(0)
            )));
        }
    }
    Ok(())
}
