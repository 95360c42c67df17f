"""The Llama 2 transformer (Llama 2 §2.2, Table 1; Appendix A.2.1).

Decoder-only, pre-norm RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention, no biases.
Parameter names follow Meta's released checkpoints (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `norm`, `output`) so that official weights
load with a plain `load_state_dict`. This file holds no distributed or training code.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 4096  # model width (Table 1)
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (MHA, 7B/13B); 8 for GQA (34B/70B)
    vocab_size: int = 32000  # SentencePiece BPE, 32k (§2.2)
    hidden_dim: int = 11008  # SwiGLU inner width
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 4096  # context length (§2.2)
    tie_embeddings: bool = False  # Llama 2 unties; SmolLM2 and other small models tie
    head_dim: int | None = None  # None = dim // n_heads
    head: str = "lm"  # "lm": next-token logits; "scalar": one score per position (reward/value models, §3.2.2)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"head={self.head!r}: expected 'lm' or 'scalar'")
        if self.head == "scalar":
            self.tie_embeddings = False  # a scalar head cannot share the embedding matrix

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def num_params(self, include_embeddings: bool = True) -> int:
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * hd * (2 * self.n_heads + 2 * kv)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        out_rows = self.vocab_size if self.head == "lm" else 1
        emb = self.vocab_size * self.dim + (0 if self.tie_embeddings else out_rows * self.dim)
        return self.n_layers * per_layer + self.dim + (emb if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention (PaLM appendix B).

        N counts the weights that take part in a matmul: every projection and the output head, once
        even when it is tied to the embedding (the lookup is no matmul), but not the norm gains.
        Attention is counted as if not causal (PaLM's convention; the kernels skip about half).
        tests/test_model.py checks it against torch's FLOP counter on a real step.
        """
        hd, kv = self.head_dim, self.n_kv_heads
        n = self.n_layers * (self.dim * hd * (2 * self.n_heads + 2 * kv) + 3 * self.dim * self.hidden_dim)
        n += (self.vocab_size if self.head == "lm" else 1) * self.dim  # output head (a scalar one: 1 row)
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def meta_ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4·dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Size presets. The four paper sizes are Table 1 / SPEC §1; `tiny` is ours: ~3M parameters, what a
# 2-core CPU can pretrain in minutes (a ~2M model at dim 192 learned the built-in world's facts in
# ~1,500 steps; wider models got too few steps in the same time).
PRESETS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=4096, hidden_dim=512,
                      max_seq_len=512),
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "34B": ModelArgs(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, hidden_dim=22016),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs.from_dict({**PRESETS[name].to_dict(), **overrides})


class _RMSNormFP32(torch.autograd.Function):
    """y = x · rsqrt(mean(x²) + eps) · w for fp32 x and w, with the backward written out.

    Autograd through F.rms_norm's CPU kernel records pow/mean/rsqrt/mul and replays them in ~10
    passes; here the backward is five elementwise passes and two reductions: 1.1 ms instead of
    1.9 ms forward + backward for 1,520 x 192 (a PPO mini-batch of the tiny model), where the norms
    are ~5% of a training step.
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            return _RMSNormFP32.apply(x, self.weight, self.eps)
        # Normalise in fp32 (as Meta does) and cast back before the gain.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Complex rotations e^{i·pos·θ_j} for each position: (B, T) -> (B, T, 1, head_dim/2) complex64."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1) of each head (Meta's interleaved layout). x: (B, T, H, hd)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


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


_ONEDNN_LINEAR = _onednn_linear_op()
# Rows (tokens) from which oneDNN beats MKL. Measured on the 2-core Zen 4 (AVX-512) this project
# runs on: at training shapes MKL's sgemm is up to 1.3x slower, e.g. (2048x384)·(384x1024) 15.7 ms
# oneDNN vs 21.2 ms MKL; in decoding SmolLM2-135M, the products of one step take 29 / 40 / 71 ms
# (oneDNN, 2 / 4 / 12 rows) vs 40 / 57 / 144 ms (MKL); but a single row is MKL's: 17 ms vs 29 ms,
# oneDNN's per-call setup costing more than the product.
_ONEDNN_MIN_ROWS = 2


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _ONEDNN_LINEAR(x, w, None, "none", [None], "")


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
    if (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.numel() >= _ONEDNN_MIN_ROWS * x.shape[-1]
            and (w.is_contiguous() or w.t().is_contiguous()) and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        return _OneDNNLinear.apply(x, w)
    return F.linear(x, w)


class KVCache:
    """Key/value buffers for incremental decoding, one (k, v) pair per layer.

    Every row of the batch writes the same columns; rows of different prompt lengths are left-padded
    and `key_mask` marks which columns hold real tokens, so padding is never attended to.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)  # (B, n_kv, S, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # columns filled so far
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) at the next columns; return keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def rows(self, start: int, end: int, column: int) -> "KVCache":
        """A view of rows [start, end) whose next write goes to `column`: filling it fills this cache.

        Generation prefills groups of similar-length prompts through such views, each group padded
        only to its own longest prompt and right-aligned with the whole batch's columns.
        """
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[start:end] for t in self.k], [t[start:end] for t in self.v]
        view.key_mask, view.length, view.max_len = self.key_mask[start:end], column, self.max_len
        return view

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (drop finished sequences)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.key_mask = self.key_mask[rows]


class _TakeRows(torch.autograd.Function):
    """x.index_select(0, index) for indices without repeats, whose gradient is then a copy into
    zeros (index_copy_) rather than autograd's index_add_, a scatter-add ~7x slower on CPU."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return g.new_zeros(ctx.rows, *g.shape[1:]).index_copy_(0, index, g), None


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
    no padded copy. (Packed pretraining/SFT rows keep their document mask: at 4 documents per
    256-token row this layout measured no faster there, 1.56 s vs 1.55 s for 4 micro-batches.)
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
            outs.append(out if g.index is None else _TakeRows.apply(out, g.index))
        return (outs[0] if len(outs) == 1 else torch.cat(outs))[None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, freqs_cis, mask, cache: KVCache | None = None, layer: int = 0,
                keep: torch.Tensor | None = None):
        """x (B, T, dim) -> (B, T, dim); with `keep` (flat indices into the B x T positions) only
        those positions' outputs, (K, dim): every position is still a key and value."""
        B, T, _ = x.shape
        # Three products, not one on torch.cat([wq, wk, wv]): fusing at compute time (and w1|w3 below)
        # bought nothing measurable in a training step of the 20M benchmark model (0.96-1.04x over
        # alternating rounds), the concatenation and the gradient split eating what it saves.
        q = linear(x, self.wq.weight).view(B, T, self.n_heads, self.head_dim)
        k = linear(x, self.wk.weight).view(B, T, self.n_kv_heads, self.head_dim)
        v = linear(x, self.wv.weight).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, Ragged):  # (1, N) row of sequences: attend within each, in padded copies
            return linear(_keep_rows(mask.attention(q, k, v, gqa), keep), self.wo.weight)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd), S = cached + T
        if mask is None:  # plain causal attention over this chunk only (training, no cache)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return linear(_keep_rows(out.transpose(1, 2).reshape(B, T, -1), keep), self.wo.weight)


def _keep_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, d) itself, or its positions `keep` (flat indices into B x T, no repeats) as (K, d)."""
    return x if keep is None else _TakeRows.apply(x.reshape(-1, x.shape[-1]), keep)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return linear(F.silu(linear(x, self.w1.weight)) * linear(x, self.w3.weight), self.w2.weight)  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, mask, cache: KVCache | None = None, keep: torch.Tensor | None = None):
        h = _keep_rows(x, keep) + self.attention(self.attention_norm(x), freqs_cis, mask, cache, self.layer_id, keep)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask(
    T: int,
    *,
    doc_ids: torch.Tensor | None = None,
    cache: KVCache | None = None,
    device=None,
) -> torch.Tensor | None:
    """Boolean mask (True = may attend), broadcastable to (B, 1, T, S); None means plain causal.

    - `doc_ids` (B, T): packed rows; a token attends only to earlier tokens of its own document.
    - `cache`: queries are the T columns after `cache.length`; keys are every filled column that
      `cache.key_mask` marks as real. Each query may also see itself, so that padded rows never see
      an empty set of keys (an all-masked softmax row would produce NaN and leak into later layers).
    """
    if doc_ids is None and cache is None:
        return None
    if cache is None:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        return (same_doc & causal)[:, None]
    start, S = cache.length, cache.length + T
    q_col = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    k_col = torch.arange(S, device=device)[None, :]  # (1, S)
    causal = k_col <= q_col  # (T, S)
    mask = causal[None] & cache.key_mask[:, None, :S]  # (B, T, S)
    mask = mask | (k_col == q_col)[None]
    if doc_ids is not None:  # documents inside the new chunk stay apart; cached columns are one doc
        raise ValueError("doc_ids cannot be combined with a KV cache")
    return mask[:, None]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # The table is given, not drawn by nn.Embedding: its normal_ on the meta device (build_model)
        # imports torch._dynamo, 1.3 s of every process's start-up. Off meta, the same N(0, 1) draw.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        if not self.tok_embeddings.weight.is_meta:
            nn.init.normal_(self.tok_embeddings.weight)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # The next-token head, or for reward/value models a scalar regression head in its place (§3.2.2).
        self.output = nn.Linear(args.dim, args.vocab_size if args.head == "lm" else 1, bias=False)
        self.activation_checkpointing = False  # recompute each block in backward to save memory
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fresh weights: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers) (GPT-2 style;
        the paper is silent, torchtitan and nanoGPT do this), norms at 1."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.args.n_layers), generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        lengths: Ragged | list[int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) (or (B, 1, vocab) with `last_only`; vocab = 1 for a scalar head).

        positions: (B, T) rotary positions; default 0..T-1 (after the cache's filled columns).
        doc_ids: (B, T) document index of each token in a packed row (see `attention_mask`).
        return_hidden: return the final normalised hidden states (B, T, dim) instead of logits.
        lengths: tokens is one row (1, N) of sequences of these lengths end to end (see `Ragged`):
            each sequence is computed as if alone, with no padding; outputs are (1, N, ...).
        keep: (K,) flat indices into the B x T positions, increasing: the output is then those
            positions' logits (K, vocab) (or hidden states (K, dim)), as `out.flatten(0, 1)[keep]`.
            The last block's attention output projection and feed-forward, the final norm and the
            head run only there (no other position's output depends on them): answer tokens of
            SFT and PPO, the last token of a reward model's sequences.
        """
        B, T = tokens.shape
        if lengths is not None:
            ragged = lengths if isinstance(lengths, Ragged) else Ragged(lengths, tokens.device, positions)
            if B != 1 or ragged.total != T or cache is not None or doc_ids is not None or last_only:
                raise ValueError(f"ragged input is one row of sum(lengths) = {ragged.total} tokens without a cache, "
                                 f"doc_ids or last_only; got tokens {tuple(tokens.shape)}")
            return self._forward(tokens, ragged.positions, ragged, None, False, return_hidden, keep)
        if keep is not None and (cache is not None or last_only):
            raise ValueError("keep cannot be combined with a KV cache or last_only")
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        mask = attention_mask(T, doc_ids=doc_ids, cache=cache, device=tokens.device)
        return self._forward(tokens, positions, mask, cache, last_only, return_hidden, keep)

    def _forward(self, tokens, positions, mask, cache, last_only, return_hidden, keep=None):
        T = tokens.shape[1]
        freqs_cis = rope_frequencies(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            sel = keep if i == last else None  # earlier blocks: every position feeds later keys/values
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, freqs_cis, mask, cache, sel, use_reentrant=False)
            else:
                h = layer(h, freqs_cis, mask, cache, sel)
        if keep is not None and last < 0:
            h = _keep_rows(h, keep)
        if cache is not None:
            cache.length += T
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return h if return_hidden else self.head(h)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output projection of final normalised hidden states (from `return_hidden=True`):
        (..., dim) -> (..., vocab) fp32 logits (vocab = 1 for a scalar head)."""
        return linear(hidden, self.output.weight).float()
