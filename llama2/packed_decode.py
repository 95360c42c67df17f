"""PackedModel: an inference-only copy of a Transformer laid out for fast CPU decoding.

It repeats the block maths of `llama2.model` on fused, re-laid-out weights, so it imports both the
model (rotary embeddings, the attention mask, the KV cache) and `llama2.cpu_kernels` (`linear`).
It lives apart from both so that dependencies go one way: model -> cpu_kernels, and this module
-> model and cpu_kernels; `llama2.generation` uses it.

Quantized projections (`llama2.quant.QuantLinear`) are fused the same way, by concatenating their
integer rows and scales; the packed copy then holds quantized weights too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama2.cpu_kernels import linear
from llama2.model import KVCache, Transformer, apply_rope, attention_mask, rope_frequencies
from llama2.quant import QuantLinear

# A projection of the packed copy: a float weight (seen as (out, in), stored (in, out)), or modules
# called in turn (quantized: one fused QuantLinear, or several when their modes differ).
Projection = torch.Tensor | tuple[nn.Module, ...]


def _fuse(mods: list[nn.Module]) -> Projection:
    """One projection computing the outputs of `mods` end to end."""
    if all(isinstance(m, nn.Linear) for m in mods):
        return torch.cat([m.weight for m in mods]).detach().t().contiguous().t()
    if all(isinstance(m, QuantLinear) for m in mods):
        try:
            return (QuantLinear.cat(mods),)
        except ValueError:
            pass
    return tuple(mods)


def _project(x: torch.Tensor, w: Projection) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return linear(x, w)
    return w[0](x) if len(w) == 1 else torch.cat([m(x) for m in w], dim=-1)


class PackedModel:
    """An inference-only copy of a Transformer laid out for fast CPU decoding.

    Decoding at batch 1 is memory-bound: the time goes into streaming the weights. A (1, in) @
    (in, out) product streams a weight faster than F.linear's (out, in) layout, so the weights are
    stored (in, out); fusing wq|wk|wv and w1|w3 halves the number of matmuls per layer. From
    `cpu_kernels.ONEDNN_MIN_ROWS` rows on (batched decoding, prefill) `linear` hands the same
    weights, seen as (out, in), to oneDNN, which is faster there than MKL. The copy costs one extra
    set of weights; the embedding table is shared, not copied.
    """

    def __init__(self, model: Transformer):
        self.args = model.args
        with torch.no_grad():
            self.layers = []
            for layer in model.layers:
                at, ff = layer.attention, layer.feed_forward
                self.layers.append((
                    layer.attention_norm.weight.detach(),
                    _fuse([at.wq, at.wk, at.wv]),  # (q+k+v, dim)
                    _fuse([at.wo]),
                    layer.ffn_norm.weight.detach(),
                    _fuse([ff.w1, ff.w3]),  # (2*hidden, dim)
                    _fuse([ff.w2]),
                ))
            self.tok_embeddings = model.tok_embeddings.weight.detach()
            self.norm = model.norm.weight.detach()
            self.output = _fuse([model.output])  # (vocab, dim), stored (dim, vocab)

    def _norm(self, x, w):
        return F.rms_norm(x, (x.shape[-1],), w, eps=self.args.norm_eps)

    def __call__(self, tokens, *, positions, cache: KVCache, last_only: bool = True):
        """Same contract as Transformer.forward with a cache: tokens (B, T) -> logits (B, T|1, vocab)."""
        a = self.args
        B, T = tokens.shape
        hd, nq, nkv = a.head_dim, a.n_heads, a.n_kv_heads
        fc = rope_frequencies(positions, hd, a.rope_theta)  # (B, T, 1, hd/2)
        start, S = cache.length, cache.length + T
        mask = attention_mask(T, cache=cache, device=tokens.device)  # (B, 1, T, S)
        x = self.tok_embeddings[tokens]  # (B, T, dim)
        for i, (n1, wqkv, wo, n2, w13, w2) in enumerate(self.layers):
            q, k, v = _project(self._norm(x, n1), wqkv).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
            q, k = apply_rope(q.reshape(B, T, nq, hd), fc), apply_rope(k.reshape(B, T, nkv, hd), fc)  # in x's dtype
            cache.k[i][:, :, start:S] = k.transpose(1, 2)
            cache.v[i][:, :, start:S] = v.view(B, T, nkv, hd).transpose(1, 2)
            keys, values = cache.k[i][:, :, :S], cache.v[i][:, :, :S]  # (B, nkv, S, hd)
            # SDPA also for single-token steps: explicit grouped matmuls + softmax were no faster,
            # at batch 1 or batched.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                 enable_gqa=nq != nkv)
            out = out.transpose(1, 2).reshape(B, T, nq * hd)
            x = x + _project(out, wo)
            gate, up = _project(self._norm(x, n2), w13).chunk(2, dim=-1)
            x = x + _project(F.silu(gate) * up, w2)
        cache.length = S
        if last_only:
            x = x[:, -1:]
        return _project(self._norm(x, self.norm), self.output).float()
