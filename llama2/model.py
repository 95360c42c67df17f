"""The Llama 2 transformer (Llama 2 §2.2, Table 1; Appendix A.2.1).

Decoder-only, pre-norm RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention, no biases.
Parameter names follow Meta's released checkpoints (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `norm`, `output`) so that official weights
load with a plain `load_state_dict`. No distributed or training code here, and no CPU kernels: the
products, norms, row gathers and unpadded batches reach `llama2.cpu_kernels` (see its docstring).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama2 import cpu_kernels


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


# Size presets. The four paper sizes are Table 1's; `tiny` is ours: ~3M parameters, small enough to
# pretrain on a CPU in minutes (wider models get too few steps in the same time).
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


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight, normalised in fp32 (as Meta does) and cast back before the gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear without bias (the model has none), its product taken by `cpu_kernels.linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.weight)


def rope_frequencies(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Complex rotations e^{i·pos·θ_j} for each position: (B, T) -> (B, T, 1, head_dim/2) complex64."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1) of each head (Meta's interleaved layout). x: (B, T, H, hd)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        # Inspection only (Figure 10, `attention_probs`): when set, the next forward takes an explicit
        # softmax path and keeps its probabilities (B, heads, T, S) in `weights`. Off, nothing changes.
        self.record_weights = False
        self.weights: torch.Tensor | None = None

    def forward(self, x, freqs_cis, mask, cache: KVCache | None = None, layer: int = 0,
                keep: torch.Tensor | None = None):
        """x (B, T, dim) -> (B, T, dim); with `keep` (flat indices into the B x T positions) only
        those positions' outputs, (K, dim): every position is still a key and value."""
        B, T, _ = x.shape
        # Three products, not one on torch.cat([wq, wk, wv]): fusing at compute time (and w1|w3 below)
        # bought nothing measurable in training, the concatenation and the gradient split eating it.
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, cpu_kernels.Ragged):  # (1, N) row of sequences: attend within each
            return self.wo(_keep_rows(mask.attention(q, k, v, gqa), keep))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd), S = cached + T
        if self.record_weights:
            out = self._explicit_attention(q, k, v, mask)
        elif mask is None:  # plain causal attention over this chunk only (training, no cache)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(_keep_rows(out.transpose(1, 2).reshape(B, T, -1), keep))

    def _explicit_attention(self, q, k, v, mask):
        """softmax(q·kᵀ/√d + mask)·v written out, the probabilities kept in `self.weights` (detached, fp32)."""
        T, S = q.shape[2], k.shape[2]
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, S)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        self.weights = probs.detach()
        return (probs @ v.float()).type_as(q)


def _keep_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, d) itself, or its positions `keep` (flat indices into B x T, no repeats) as (K, d)."""
    return x if keep is None else cpu_kernels.take_rows(x.reshape(-1, x.shape[-1]), keep)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)  # gate
        self.w2 = Linear(args.hidden_dim, args.dim)  # down
        self.w3 = Linear(args.dim, args.hidden_dim)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


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


def attention_mask(T: int, *, doc_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                   device=None) -> torch.Tensor | None:
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
        # imports torch._dynamo, a slow import at every process's start-up. Off meta, the same N(0, 1) draw.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        if not self.tok_embeddings.weight.is_meta:
            nn.init.normal_(self.tok_embeddings.weight)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # The next-token head, or for reward/value models a scalar regression head in its place (§3.2.2).
        self.output = Linear(args.dim, args.vocab_size if args.head == "lm" else 1)
        self.activation_checkpointing = False  # recompute each block in backward to save memory
        self.tie_weights()

    def tie_weights(self) -> None:
        # A quantized head (llama2.quant) keeps its own integer copy of the embedding matrix.
        if self.args.tie_embeddings and isinstance(self.output, nn.Linear):
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
        lengths: cpu_kernels.Ragged | list[int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) (or (B, 1, vocab) with `last_only`; vocab = 1 for a scalar head).

        positions: (B, T) rotary positions; default 0..T-1 (after the cache's filled columns).
        doc_ids: (B, T) document index of each token in a packed row (see `attention_mask`).
        return_hidden: return the final normalised hidden states (B, T, dim) instead of logits.
        lengths: tokens is one row (1, N) of sequences of these lengths end to end (see `cpu_kernels.Ragged`):
            each sequence is computed as if alone, with no padding; outputs are (1, N, ...).
        keep: (K,) flat indices into the B x T positions, increasing: the output is then those
            positions' logits (K, vocab) (or hidden states (K, dim)), as `out.flatten(0, 1)[keep]`.
            The last block's attention output projection and feed-forward, the final norm and the
            head run only there (no other position's output depends on them): answer tokens of
            SFT and PPO, the last token of a reward model's sequences.
        """
        B, T = tokens.shape
        if lengths is not None:
            ragged = (lengths if isinstance(lengths, cpu_kernels.Ragged)
                      else cpu_kernels.Ragged(lengths, tokens.device, positions))
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
        return self.output(hidden).float()


@torch.no_grad()
def attention_probs(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities of every layer for `tokens` (B, T): a list of (B, heads, T, T)
    fp32 tensors, computed with an explicit softmax for this one forward (the model's own path is
    untouched; its logits are the same to float rounding). For plots such as Figure 10."""
    blocks = [layer.attention for layer in model.layers]
    try:
        for a in blocks:
            a.record_weights, a.weights = True, None
        model(tokens)
        return [a.weights for a in blocks]
    finally:
        for a in blocks:
            a.record_weights, a.weights = False, None


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
