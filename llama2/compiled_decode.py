"""A compiled one-token decoding step (gpt-fast's structure) for batch-1 decoding on the CPU.

Decoding one sequence is memory-bound: each token reads every weight once. The eager step spends
its time in two places that `torch.compile` removes (measured, docs/results.md):

- the matrix-vector products: MKL's and oneDNN's fp32 kernels stream a (1, in) x (in, out) product
  at 10-20 GB/s on the 2-core CPU this project is measured on, where a plain sum reads 30-50 GB/s.
  Written as a reduction, `(w * x).sum(-1)` over a row-major (out, in) weight, inductor emits one
  vectorised loop per product that streams the weight at 20-30 GB/s;
- the ~20 small operations of every layer (norms, rotary embeddings, attention over the cache,
  SwiGLU, residuals): each a dispatch and often a parallel region, fused here into a few loops.

Quantized projections (`llama2.quant.QuantLinear`) are the same reduction over their integers with
the dequantisation fused into it, with fp32 activations and accumulation: an int8 weight streams one
byte per entry, and so does an int4 weight, whose codes the step keeps one per byte (inductor's loop
over packed nibbles was 1.5x slower than streaming twice the bytes, measured). torch's own int8/int4
CPU kernels, which the eager path calls, take bf16 activations (see `llama2.quant`).

Batches stay eager: their products are compute-bound and already go to oneDNN. The same step over
B rows with oneDNN's products (an opaque custom op) was tried and measured 0.87-1.26x the eager
path's speed from run to run at batches 16 and 64, no reliable gain (docs/results.md).

The step reads the same `KVCache` the eager prefill fills, so prefill stays eager (it is
compute-bound, and already runs through oneDNN) and every later token is one call of the compiled
step. Attention covers the whole cache under its key mask (unfilled columns are masked); the
cache's length is a dynamic dimension, so one compilation serves every generation, and inductor
caches it on disk across processes. The weights are arguments, not constants, so
`Decoder.refresh()` after an RLHF update reuses the compiled code too.

On a GPU (`Decoder(compile=True)` with a CUDA model, any float dtype) the same step runs as CUDA
graphs (mode "reduce-overhead", cuBLAS products): shapes are static there, so each cache size
compiles once (benchmarks/gpu_decode.py measures it).

The maths is the model's (llama2.model): RMSNorm in fp32, Meta's interleaved rotary pairs, grouped
attention; only the order of the floating-point sums differs (tested: logits to tolerance, greedy
tokens equal to the eager model's).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from llama2.model import KVCache, Transformer
from llama2.quant import QuantLinear, unpack_nibbles

COMPILE_HELP = ("decode single sequences with the compiled step (torch.compile; fp32 or int8/int4 CPU models): "
                "~2x faster at batch 1, after a one-time compilation of about a minute, cached on disk")

# A projection as the step reads it: ("float", w (out, in)), ("int8", q (out, in), scales (out,)),
# or ("int4", codes (out, in) uint8 in [0, 15], scales (out, G), mins (out, G)); see `_project`.
Projection = tuple


def _projection(mods: list[nn.Module]) -> Projection:
    """One projection computing the outputs of `mods` (fused q|k|v, w1|w3) end to end."""
    if all(isinstance(m, nn.Linear) for m in mods):
        return ("float", torch.cat([m.weight.detach() for m in mods]).contiguous())
    if all(isinstance(m, QuantLinear) for m in mods):
        q = QuantLinear.cat(mods) if len(mods) > 1 else mods[0]
        if q.mode == "int8":
            return ("int8", q.weight_q.contiguous(), q.scales.float().contiguous())
        # One code per byte: inductor's loop over packed nibbles was 1.5x slower than streaming
        # twice the bytes (benchmarks/generate.py measures the result).
        return ("int4", unpack_nibbles(q.weight_q).contiguous(), q.scales.float().contiguous(),
                q.mins.float().contiguous())
    raise ValueError("a fused projection mixes float and quantized layers")


def _project(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """x (1, in) -> (1, out) as a reduction over each weight row (see the module docstring)."""
    kind = p[0]
    if kind == "float" and x.is_cuda:  # on a GPU the product is cuBLAS's (CUDA graphs)
        return F.linear(x, p[1])
    if kind == "float":
        return (p[1] * x).sum(-1)[None]
    if kind == "int8":
        return ((p[1].float() * x).sum(-1) * p[2])[None]
    codes, scales, mins = p[1], p[2], p[3]  # (N, K) uint8, (N, G), (N, G)
    N, K = codes.shape
    G = scales.shape[1]
    w = codes.float().view(N, G, K // G) * scales[..., None] + mins[..., None]  # fused: never stored
    return (w.view(N, K) * x).sum(-1)[None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta's rotary embedding on interleaved pairs: x (B, heads, hd) with cos, sin (B, 1, hd/2).
    `model.apply_rope`'s complex product written in reals: inductor does not compile complex tensors."""
    pairs = x.float().view(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _step(layers, embedding, norm, head, shape, token, position, column, mask, ks, vs):
    """One token through the model: token (1,), position (1,) -> logits (1, vocab).

    `shape` = (n_heads, n_kv_heads, head_dim, norm_eps, rope_theta). The new key and value go to
    cache column `column` (1,); attention covers the cache's columns where `mask` (1, S), the
    cache's key mask, is set (the filled ones). S is a dynamic size.
    """
    nq, nkv, hd, eps, theta = shape
    if isinstance(layers, tuple):  # stacked: each tensor holds every layer's (see `_stack`)
        norms1, qkvs, wos, norms2, w13s, w2s = layers
        layers = [(norms1[i], _select(qkvs, i), _select(wos, i), norms2[i], _select(w13s, i), _select(w2s, i))
                  for i in range(norms1.shape[0])]
    B = token.shape[0]
    x = embedding[token]  # (B, dim)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=token.device) / hd))
    angles = position.float()[:, None, None] * inv_freq  # (B, 1, hd/2)
    cos, sin = angles.cos(), angles.sin()
    hidden = ~mask[:, None, None, :]  # (B, 1, 1, S)
    for i, (n1, wqkv, wo, n2, w13, w2) in enumerate(layers):
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * n1
        q, k, v = _project(h, wqkv).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q = _rotate(q.view(B, nq, hd), cos, sin).type_as(x)
        k = _rotate(k.view(B, nkv, hd), cos, sin).type_as(x)
        ks[i][:, :, column] = k[:, :, None]  # index_put with a tensor index: no specialisation
        vs[i][:, :, column] = v.view(B, nkv, 1, hd)
        scores = (q.view(B, nkv, nq // nkv, hd) @ ks[i].transpose(-1, -2)) / math.sqrt(hd)  # (B, nkv, rep, S)
        probs = scores.float().masked_fill(hidden, float("-inf")).softmax(-1).type_as(x)
        x = x + _project((probs @ vs[i]).reshape(B, nq * hd), wo)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * n2
        gate, up = _project(h, w13).chunk(2, dim=-1)
        x = x + _project(F.silu(gate) * up, w2)
    x = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * norm
    return _project(x, head).float()


def _select(p: Projection, i: int) -> Projection:
    return (p[0], *(t[i] for t in p[1:]))


def _stack(layers: list[tuple]) -> tuple | list[tuple]:
    """Every layer's tensors stacked into one per role, when all layers agree in kind and shape (they
    do unless a checkpoint mixes float and quantized layers): a few graph arguments instead of ~7
    per layer, whose guards dynamo checks on every call (0.9 ms a token for SmolLM2's 30 layers)."""
    roles = list(zip(*layers))
    out = []
    for role in roles:
        if isinstance(role[0], torch.Tensor):
            if any(t.shape != role[0].shape for t in role):
                return layers
            out.append(torch.stack(role))
        else:
            if any(p[0] != role[0][0] or any(a.shape != b.shape for a, b in zip(p[1:], role[0][1:])) for p in role):
                return layers
            out.append((role[0][0], *(torch.stack(ts) for ts in list(zip(*role))[1:])))
    return tuple(out)


_compiled: dict[str, object] = {}


def compiled_step(cuda_graphs: bool = False):
    """`_step` compiled once per process (fullgraph: a graph break would be a bug, not a slowdown);
    with `cuda_graphs`, as CUDA graphs (mode "reduce-overhead", static shapes)."""
    key = "cuda" if cuda_graphs else "cpu"
    if key not in _compiled:
        _compiled[key] = torch.compile(_step, fullgraph=True, mode="reduce-overhead" if cuda_graphs else None)
    return _compiled[key]


def supported(model: Transformer) -> str | None:
    """Why the compiled step cannot run `model` (None when it can)."""
    p = next(model.parameters())
    if model.args.head != "lm":
        return "the compiled step decodes language models (this one has a scalar reward head)"
    if p.device.type == "cuda":
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            return "the compiled step runs quantized weights on the CPU only"
        return None
    if p.device.type != "cpu":
        return f"the compiled step is for the CPU and CUDA (the model is on {p.device.type})"
    if p.dtype != torch.float32:
        return f"the compiled step is for fp32 models on the CPU (this one is {p.dtype})"
    return None


class CompiledDecode:
    """The compiled step over `model`'s weights (fused q|k|v and w1|w3, as PackedModel).

    Call it as a decoding step: `step(token (1,), position (1,), cache)` writes the token's keys and
    values at `cache.length` and returns its logits (1, vocab). Rebuild it after the weights change.
    """

    def __init__(self, model: Transformer):
        why = supported(model)
        if why:
            raise ValueError(why)
        a = model.args
        with torch.no_grad():
            layers = [
                (layer.attention_norm.weight.detach(),
                 _projection([layer.attention.wq, layer.attention.wk, layer.attention.wv]),
                 _projection([layer.attention.wo]),
                 layer.ffn_norm.weight.detach(),
                 _projection([layer.feed_forward.w1, layer.feed_forward.w3]),
                 _projection([layer.feed_forward.w2]))
                for layer in model.layers]
            self.layers = _stack(layers)
            self.embedding = model.tok_embeddings.weight.detach()
            self.norm = model.norm.weight.detach()
            self.head = _projection([model.output])
        self.shape = (a.n_heads, a.n_kv_heads, a.head_dim, float(a.norm_eps), float(a.rope_theta))
        self.cuda_graphs = self.embedding.is_cuda
        self._prepared = lambda: None  # weak reference to the first key tensor of the cache last prepared
        if self.cuda_graphs:  # static inputs: CUDA graphs read them in place instead of copying each replay
            for t in self._tensors():
                torch._dynamo.mark_static_address(t)

    def _tensors(self) -> list[torch.Tensor]:
        out = [self.embedding, self.norm, *self.head[1:]]
        for n1, wqkv, wo, n2, w13, w2 in ([self.layers] if isinstance(self.layers, tuple) else self.layers):
            out += [n1, n2, *wqkv[1:], *wo[1:], *w13[1:], *w2[1:]]
        return out

    def _prepare(self, cache: KVCache) -> None:
        """Mark a cache's tensors once, not at every step: the marks' cost grows with each call
        (measured: 37 us a step after 100 calls, 1.4 ms after 1,000)."""
        for t in (cache.key_mask, *cache.k, *cache.v):
            if self.cuda_graphs:  # the cache is written in place: a static input of the graph
                torch._dynamo.mark_static_address(t)
            else:  # one compiled step for every cache size
                torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1 if t.dim() == 2 else 2)
        self._prepared = weakref.ref(cache.k[0])

    def __call__(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if token.shape[0] != 1:
            raise ValueError(f"the compiled step decodes one row, got {token.shape[0]}")
        if self._prepared() is not cache.k[0]:
            self._prepare(cache)
        column = torch.tensor([cache.length], device=token.device)
        logits = compiled_step(self.cuda_graphs)(self.layers, self.embedding, self.norm, self.head, self.shape,
                                                 token, position, column, cache.key_mask, cache.k, cache.v)
        if self.cuda_graphs:
            logits = logits.clone()  # the graph's output buffer is reused by the next replay
        cache.length += 1
        return logits
