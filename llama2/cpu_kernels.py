"""CPU fast paths of the transformer: each computes what the model defines, only faster on CPU.

The hook: `llama2.model` imports this module (`from llama2 import cpu_kernels`) and reaches it in
one place per kernel, always through the qualified name, so `grep cpu_kernels. llama2/model.py`
lists every touch point:

- `linear(x, w)`: x @ w.T, as F.linear. Every projection of the model is a `model.Linear`, whose
  forward is this call. oneDNN runs it from `ONEDNN_MIN_ROWS` rows (tokens) on.
- `rms_norm(x, weight, eps)`: the model's RMSNorm (normalise in fp32, cast back, then the gain),
  for fp32 CPU tensors with its backward written out. `model.RMSNorm.forward` is this call.
- `take_rows(x, index)`: x.index_select(0, index) whose gradient is an index_copy_ (model's
  `keep=`: the last block computes only the positions whose outputs are read).
- `Ragged`: sequences of mixed lengths end to end in one unpadded row; the model's attention
  asks it for the attention within each sequence (`model(tokens, lengths=...)`).

Each function falls back to the plain torch op wherever its fast path does not apply (another
device or dtype, autocast, torch.compile), so the model means the same thing everywhere. This
module depends on torch only and never imports `llama2.model`: dependencies go one way. The packed
decoding copy of a model (`PackedModel`), which needs the model's rotary embeddings and KV cache
as well as `linear`, lives in `llama2.packed_decode`, which imports both.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# -- oneDNN linear ------------------------------------------------------------------------------


def _onednn_linear_op():
    """oneDNN's fp32 matmul (`torch.ops.mkldnn._linear_pointwise`), or None where it is missing or wrong.

    It is a private op (what inductor emits for CPU linears), so we check it exists, works on both
    weight layouts we pass and agrees with F.linear before trusting it; otherwise F.linear (MKL) runs.
    """
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 5, 16, generator=g), torch.randn(24, 16, generator=g)
        ok = all(torch.allclose(op(x, wl, None, "none", [None], ""), F.linear(x, w), atol=1e-5)
                 for wl in (w, w.t().contiguous().t()))
        return op if ok else None
    except (AttributeError, RuntimeError):
        return None


# The oneDNN op, called as ONEDNN_LINEAR(x, w, None, "none", [None], "") = x @ w.T; None where unusable.
ONEDNN_LINEAR = _onednn_linear_op()
# Rows (tokens) from which oneDNN beats MKL on the AVX-512 CPUs this project runs on: MKL's sgemm is
# slower both at training shapes and at the few rows of batched decoding, but a single row (batch-1
# decoding) is MKL's, oneDNN's per-call setup costing more than the product there.
ONEDNN_MIN_ROWS = 2


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ONEDNN_LINEAR(x, w, None, "none", [None], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w.T through oneDNN, with oneDNN for the input gradient too (both are row-major
    products with M = tokens); the weight gradient g.T @ x stays with MKL, which was as fast there."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _onednn(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _onednn(g, w.t())  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        return gx, gw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w.T with w (out, in): nn.Linear's product, through oneDNN where that is faster.

    w may also be the transpose of a contiguous (in, out) matrix (PackedModel's decoding layout):
    then the single-row path is `x @ w_t`, the fastest streaming of the weight at batch 1.
    """
    if (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]
            and (w.is_contiguous() or w.t().is_contiguous()) and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        return _OneDNNLinear.apply(x, w)
    return F.linear(x, w)


# -- RMSNorm ------------------------------------------------------------------------------------


class _RMSNormFP32(torch.autograd.Function):
    """y = x · rsqrt(mean(x²) + eps) · w for fp32 x and w, with the backward written out.

    Autograd through F.rms_norm's CPU kernel records pow/mean/rsqrt/mul and replays them in ~10
    passes; here the backward is five elementwise passes and two reductions.
    """

    @staticmethod
    def forward(ctx, x, w, eps):
        d = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        d = g.shape[-1]
        gw = (g * xhat).reshape(-1, d).sum(0) if ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gh = g * w  # gradient w.r.t. xhat
            dot = (gh * xhat).sum(-1, keepdim=True).div_(d)
            gx = torch.addcmul(gh, xhat, dot, value=-1).mul_(rstd)
        return gx, gw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight over the last dimension, normalised in fp32 and cast back
    to x's dtype before the gain (as Meta's RMSNorm); fp32 CPU tensors take the written-out backward."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        return _RMSNormFP32.apply(x, weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


# -- row gathers --------------------------------------------------------------------------------


class _TakeRows(torch.autograd.Function):
    """x.index_select(0, index) for indices without repeats, whose gradient is then a copy into
    zeros (index_copy_) rather than autograd's index_add_, a scatter-add that is much slower on CPU."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return g.new_zeros(ctx.rows, *g.shape[1:]).index_copy_(0, index, g), None


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(0, index) for `index` without repeats; its backward is a copy, not a scatter-add."""
    return _TakeRows.apply(x, index)


# -- unpadded batches ---------------------------------------------------------------------------


class Ragged:
    """Sequences of different lengths laid end to end in one row (1, N), without padding.

    Every per-token operation (the products, norms, SwiGLU and the head) then runs on the N real
    tokens only; attention, the one place where tokens meet, runs on right-padded copies of q, k, v
    gathered for it and is read back at the real positions. Right padding needs no mask under
    causal attention (a real query never sees the padding after it). Batches of answers of mixed
    lengths (PPO's update, reward scoring) cost their tokens instead of B x L_max, as with
    flash-attention's varlen kernels on GPU; the gather is a copy of q, k, v, small next to the
    products it saves.

    Attention's cost grows with the square of the padded length, so consecutive sequences are
    grouped (`Group`) and each group is padded only to its own longest: a group grows while its
    padded attention costs at most `waste` times its sequences' own. Callers sort by length (PPO's
    micro-batches and reward scoring do), so that groups are few; a group of equal lengths needs
    no padded copy. (Packed pretraining/SFT rows keep their document mask: with a few documents
    per row this layout was no faster there.)
    """

    class Group(NamedTuple):
        start: int  # first token of the group in the row
        end: int  # one past its last
        batch: int  # sequences in the group
        max_len: int
        index: torch.Tensor | None  # (tokens,) flat position in (batch x max_len); None: all of max_len

    def __init__(self, lengths, device=None, positions: torch.Tensor | None = None, waste: float = 1.25):
        self.lengths = [int(n) for n in lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"ragged lengths must be positive, got {self.lengths}")
        self.total = sum(self.lengths)
        n = torch.tensor(self.lengths, device=device)
        starts = torch.cumsum(n, 0) - n
        local = torch.arange(self.total, device=device) - torch.repeat_interleave(starts, n)  # 0.. in each
        self.positions = local[None] if positions is None else positions.reshape(1, self.total)  # for RoPE
        self.ends = torch.cumsum(n, 0) - 1  # (B,) each sequence's last token in the row
        self.groups, first, token = [], 0, 0
        for i in range(1, len(self.lengths) + 1):
            if i < len(self.lengths):
                part = self.lengths[first: i + 1]
                if len(part) * max(part) ** 2 <= waste * sum(x * x for x in part):
                    continue
            part = self.lengths[first:i]
            size, longest = sum(part), max(part)
            index = None
            if min(part) != longest:
                rows = torch.repeat_interleave(torch.arange(len(part), device=device), n[first:i])
                index = rows * longest + local[token: token + size]
            self.groups.append(Ragged.Group(token, token + size, len(part), longest, index))
            first, token = i, token + size

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Causal attention within each sequence: q, k, v (1, N, heads, hd) -> (1, N, heads x hd)."""
        outs = []
        # split, not slices: a slice's backward zero-fills a whole (N, heads, hd) gradient per group
        sizes = [g.end - g.start for g in self.groups]
        parts = zip(*(x[0].split(sizes) for x in (q, k, v)))
        for g, qkv in zip(self.groups, parts):
            padded = []
            for x in qkv:
                if g.index is not None:
                    x = x.new_zeros(g.batch * g.max_len, *x.shape[1:]).index_copy_(0, g.index, x)
                padded.append(x.view(g.batch, g.max_len, *x.shape[1:]).transpose(1, 2))  # (b, heads, L, hd)
            # The output is laid out (b, L, heads, hd) in memory, as its inputs are: the reshape is free.
            out = F.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=gqa)
            out = out.transpose(1, 2).reshape(g.batch * g.max_len, -1)
            outs.append(out if g.index is None else take_rows(out, g.index))
        return (outs[0] if len(outs) == 1 else torch.cat(outs))[None]
