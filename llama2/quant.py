"""Weight-only quantized linear layers: int8 per output channel and int4 in groups.

`QuantLinear` takes the place of a `model.Linear` (y = x @ W.T, no bias) with W stored as integers:

- int8: symmetric, one scale per output row: W[n, k] ≈ q[n, k] · scale[n], q in [-127, 127].
- int4: asymmetric in groups of `group_size` (32 or 64) consecutive inputs of a row:
  W[n, k] ≈ code[n, k] · scale[n, g] + min[n, g], code in [0, 15], g = k // group_size. This is
  GGUF's Q4_1 block exactly, and Q4_0 (W = d · (code - 8)) with min = -8·d, so both load as they are.

What is stored (the state dict, and so the native checkpoint) is this canonical form, the same on
every machine: `weight_q` (int8 (N, K); int4: uint8 (N, K/2), input 2j in the low nibble of byte j
and 2j+1 in the high one), `scales` (fp32, (N,) or (N, K/group_size)) and for int4 `mins` (fp32).
The state dict describes itself: a module with `<name>.weight_q` is quantized, its mode is the
dtype of `weight_q` and its group size is K over the number of scale columns.

The products are PyTorch's own CPU kernels: `torch._weight_int8pack_mm` (int8) and
`torch._weight_int4pack_mm_for_cpu` on the layout of `torch._convert_weight_to_int4pack_for_cpu`
(int4, tinygemm's W = (code - 8) · scale + zero, so zero = min + 8 · scale). Both are vectorised only
for bfloat16 activations in torch 2.13 (fp32 activations take a scalar loop, ~10x slower than the
fp32 product itself), so activations, scales and zeros enter them in bfloat16 and the result is cast
back to the input's dtype: that rounding is part of the measured error (docs/models.md). Where a
kernel is missing or the tensors are not on the CPU, the weight is dequantised for each call and
F.linear runs (right, but no faster than fp32). torchao was looked at: its x86 wheel ships CUDA
kernels only, and its CPU weight-only paths call these same two ops, so it adds nothing here.

`quantize_model` swaps a float model's projections for these in place (the embedding and the norms
stay float; the output head on request). Quantized models are for inference: there is no backward.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llama2.model import Transformer

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64)  # int4 group sizes (GGUF's Q4_0/Q4_1 blocks are 32)
KERNEL_DTYPE = torch.bfloat16  # the activations' dtype inside the int8/int4 CPU kernels (see the docstring)
INT4_ROWS = 16  # the int4 CPU packing wants a multiple of 16 output rows: others are padded with zero rows
QUANT_SUFFIXES = ("weight_q", "scales", "mins")
PROJECTIONS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _int8_kernel_ok() -> bool:
    """torch._weight_int8pack_mm exists and agrees with the dequantised product."""
    try:
        g = torch.Generator().manual_seed(0)
        x, q = torch.randn(2, 64, generator=g), torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
        s = torch.rand(8, generator=g) / 100
        y = torch._weight_int8pack_mm(x.to(KERNEL_DTYPE), q, s.to(KERNEL_DTYPE)).float()
        return torch.allclose(y, x @ (q.float() * s[:, None]).T, rtol=0.05, atol=0.05)
    except (AttributeError, RuntimeError):
        return False


def _int4_kernel_ok() -> bool:
    """torch's CPU int4 packing and product exist and agree with the dequantised product."""
    try:
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.int32)
        scale, zero = torch.rand(16, 2, generator=g) / 100, torch.randn(16, 2, generator=g) / 100
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        x = torch.randn(2, 64, generator=g)
        y = torch._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), packed, 32, sz).float()
        w = (codes.float() - 8).view(16, 2, 32) * scale[..., None] + zero[..., None]
        return torch.allclose(y, x @ w.view(16, 64).T, rtol=0.05, atol=0.05)
    except (AttributeError, RuntimeError):
        return False


INT8_KERNEL = _int8_kernel_ok()
INT4_KERNEL = _int4_kernel_ok()


# -- packing and quantizing --------------------------------------------------------------------


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8: input 2j in the low nibble, 2j+1 in the high one."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (N, K/2) uint8 -> (N, K) uint8 codes."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (N, K), scales fp32 (N,)) with w ≈ q · scale[:, None]."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of `group_size` inputs: (codes uint8 (N, K) in [0, 15], scales, mins),
    the two fp32 (N, K/group_size), with w ≈ code · scale + min (min/max of each group map to 0/15)."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(N, K), scales, lo


class QuantLinear(nn.Module):
    """A weight-only quantized y = x @ W.T (no bias), in place of `model.Linear` (see the module docstring)."""

    def __init__(self, mode: str, in_features: int, out_features: int, group_size: int | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"quantization mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode, self.in_features, self.out_features = mode, in_features, out_features
        if mode == "int8":
            self.group_size = None
            self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, device=device))
        else:
            if group_size is None or group_size < 2 or group_size % 2 or in_features % group_size:
                raise ValueError(f"int4 group size {group_size} must be even and divide the layer's "
                                 f"{in_features} inputs")
            self.group_size = group_size
            G = in_features // group_size
            self.register_buffer("weight_q", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                         device=device))
            self.register_buffer("scales", torch.empty(out_features, G, device=device))
            self.register_buffer("mins", torch.empty(out_features, G, device=device))
        self._kernel: tuple | None = None  # the kernel's tensors, made from the buffers at first use
        self.use_kernel = True  # False: dequantise and multiply in the input's dtype (to measure the kernel's rounding)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.mode}, in_features={self.in_features}, out_features={self.out_features}{group}"

    # construction

    @classmethod
    def from_int8(cls, q: torch.Tensor, scales: torch.Tensor) -> QuantLinear:
        m = cls("int8", q.shape[1], q.shape[0], device="meta")
        m.weight_q, m.scales = q.to(torch.int8).contiguous(), scales.float().contiguous()
        return m

    @classmethod
    def from_int4(cls, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> QuantLinear:
        """From codes (N, K) in [0, 15] and per-group scales and mins (N, K/group_size)."""
        N, K = codes.shape
        m = cls("int4", K, N, K // scales.shape[1], device="meta")
        m.weight_q = pack_nibbles(codes).contiguous()
        m.scales, m.mins = scales.float().contiguous(), mins.float().contiguous()
        return m

    @classmethod
    def from_float(cls, weight: torch.Tensor, mode: str, group_size: int | None = None) -> QuantLinear:
        if mode == "int8":
            return cls.from_int8(*quantize_int8(weight))
        if mode == "int4":
            if group_size not in GROUP_SIZES or weight.shape[1] % group_size:
                raise ValueError(f"int4 group size {group_size}: expected one of {GROUP_SIZES} dividing "
                                 f"the layer's {weight.shape[1]} inputs")
            return cls.from_int4(*quantize_int4(weight, group_size))
        raise ValueError(f"quantization mode {mode!r}: expected one of {', '.join(MODES)}")

    @classmethod
    def from_state(cls, prefix: str, state: dict[str, torch.Tensor]) -> QuantLinear:
        """The empty (meta) module whose buffers `state`'s `<prefix>.weight_q`, `.scales`, `.mins` fill."""
        q, scales = state[prefix + ".weight_q"], state[prefix + ".scales"]
        if q.dtype == torch.int8:
            return cls("int8", q.shape[1], q.shape[0], device="meta")
        if q.dtype == torch.uint8 and scales.dim() == 2 and scales.shape[1]:
            return cls("int4", 2 * q.shape[1], q.shape[0], 2 * q.shape[1] // scales.shape[1], device="meta")
        raise ValueError(f"{prefix}.weight_q: dtype {q.dtype} with scales {list(scales.shape)} is neither "
                         "int8 (per-row scales) nor int4 (uint8 nibbles, per-group scales)")

    @staticmethod
    def cat(mods: list[QuantLinear]) -> QuantLinear:
        """One module whose outputs are those of `mods` end to end (fused q|k|v, w1|w3): the same mode
        and group size, rows concatenated."""
        first = mods[0]
        if any(m.mode != first.mode or m.group_size != first.group_size or m.in_features != first.in_features
               for m in mods):
            raise ValueError("only quantized layers of one mode, group size and input width concatenate")
        out = QuantLinear(first.mode, first.in_features, sum(m.out_features for m in mods), first.group_size,
                          device="meta")
        for name in QUANT_SUFFIXES:
            if hasattr(first, name):
                setattr(out, name, torch.cat([getattr(m, name) for m in mods]))
        out.use_kernel = all(m.use_kernel for m in mods)
        return out

    # maths

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (out, in) these integers stand for."""
        if self.mode == "int8":
            return self.weight_q.float() * self.scales[:, None]
        codes = unpack_nibbles(self.weight_q).float().view(self.out_features, -1, self.group_size)
        w = codes * self.scales[..., None] + self.mins[..., None]
        return w.view(self.out_features, self.in_features)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._kernel = None  # .to(device) and friends: rebuild on the new tensors
        return super()._apply(fn, recurse)

    def _kernel_tensors(self) -> tuple:
        if self._kernel is None:
            if self.mode == "int8":
                self._kernel = (self.scales.to(KERNEL_DTYPE),)
            else:
                pad = -self.out_features % INT4_ROWS
                codes = F.pad(unpack_nibbles(self.weight_q).to(torch.int32), (0, 0, 0, pad), value=8)
                packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
                scales = F.pad(self.scales, (0, 0, 0, pad))
                zeros = F.pad(self.mins, (0, 0, 0, pad)) + 8 * scales  # tinygemm: (code - 8) · scale + zero
                sz = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
                self._kernel = (packed, sz)
        return self._kernel

    def uses_kernel(self) -> bool:
        """Whether forward runs torch's int8/int4 kernel here (else: dequantise, then F.linear)."""
        return (self.use_kernel and self.weight_q.device.type == "cpu"
                and (INT8_KERNEL if self.mode == "int8" else INT4_KERNEL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel():
            return F.linear(x, self.dequantize().to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
        if self.mode == "int8":
            (scales,) = self._kernel_tensors()
            y = torch._weight_int8pack_mm(x2, self.weight_q, scales)
        else:
            packed, sz = self._kernel_tensors()
            y = torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)[:, : self.out_features]
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        """Bytes a product streams: the integers and their scales (and mins)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in QUANT_SUFFIXES
                   if hasattr(self, n))


# -- whole models --------------------------------------------------------------------------------


def projection_names(model: Transformer, head: bool) -> list[str]:
    """The module names of a model's projections (and of its output head with `head`)."""
    names = [f"layers.{i}.{p}" for i in range(len(model.layers)) for p in PROJECTIONS]
    return names + (["output"] if head and model.args.head == "lm" else [])


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def quantize_model(model: Transformer, mode: str, group_size: int = 32, head: bool = True) -> Transformer:
    """Replace the model's projections (and its output head, with `head`) by `QuantLinear`s in place.

    The token embedding and the norms stay float. A tied head is quantized from the embedding
    matrix, which stays float for the lookup (the head then has its own integer copy). Layers that
    are already quantized are left as they are. Returns the model, in eval mode.
    """
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size}: expected one of {GROUP_SIZES}")
    for name in projection_names(model, head):
        lin = model.get_submodule(name)
        if isinstance(lin, nn.Linear):
            q = QuantLinear.from_float(lin.weight, mode, group_size if mode == "int4" else None)
            _set_module(model, name, q.to(lin.weight.device))
    return model.eval()


def describe(model: nn.Module) -> dict | None:
    """What is quantized, for model.json and messages: {"layers": {mode/group: count}, "head": ...};
    None for a float model."""
    counts: dict[str, int] = {}
    head = None
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            kind = m.mode + (f"/g{m.group_size}" if m.group_size else "")
            if name == "output":
                head = kind
            else:
                counts[kind] = counts.get(kind, 0) + 1
    if not counts and head is None:
        return None
    return {"layers": counts, "head": head or "float"}


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoded token streams: every product's weights (quantized: integers,
    scales and mins) and the norms; the embedding table is only gathered from, so it counts only
    when it is also the (float, tied) head."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            total += m.nbytes()
        elif isinstance(m, nn.Linear) or name.endswith("norm"):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


# -- state dicts ---------------------------------------------------------------------------------


def quantized_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """The module names a state dict holds quantized (those with a `<name>.weight_q`)."""
    return sorted(k[: -len(".weight_q")] for k in state if k.endswith(".weight_q"))


def expected_quantized_shapes(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor],
                              tied: bool) -> dict[str, tuple[int, ...]]:
    """`expected` (float tensor name -> shape) with every projection that `state` holds quantized
    replaced by its integer and scale tensors' shapes (the group size read from `state`)."""
    out = dict(expected)
    for prefix in quantized_prefixes(state):
        base = prefix + ".weight"
        if base in out:
            N, K = out.pop(base)
        elif prefix == "output" and tied and "tok_embeddings.weight" in out:
            N, K = out["tok_embeddings.weight"]
        else:
            continue  # not a projection: reported as unexpected
        q, scales = state[prefix + ".weight_q"], state.get(prefix + ".scales")
        if q.dtype == torch.int8:
            out.update({prefix + ".weight_q": (N, K), prefix + ".scales": (N,)})
        else:
            G = scales.shape[1] if scales is not None and scales.dim() == 2 else K // GROUP_SIZES[0]
            out.update({prefix + ".weight_q": (N, K // 2), prefix + ".scales": (N, G), prefix + ".mins": (N, G)})
    return out


def install(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Put empty `QuantLinear`s where `state` holds quantized projections, so that
    `model.load_state_dict(state, assign=True)` fills them."""
    for prefix in quantized_prefixes(state):
        _set_module(model, prefix, QuantLinear.from_state(prefix, state))


def dequantize_state(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """`state` with every quantized projection turned back into an fp32 `<name>.weight`; a tied
    head's integer copy is dropped (the embedding it was quantized from is the head again)."""
    prefixes = quantized_prefixes(state)
    out = {k: v for k, v in state.items() if not any(k == f"{p}.{s}" for p in prefixes for s in QUANT_SUFFIXES)}
    for p in prefixes:
        if p == "output" and tied:
            continue
        m = QuantLinear.from_state(p, state)
        m.load_state_dict({s: state[f"{p}.{s}"] for s in QUANT_SUFFIXES if f"{p}.{s}" in state}, assign=True)
        out[p + ".weight"] = m.dequantize()
    return out


def is_quant_tensor(name: str, state_names: Iterable[str]) -> bool:
    """Whether `name` is one of a quantized projection's tensors (kept as stored by dtype casts)."""
    prefix, _, suffix = name.rpartition(".")
    return suffix in QUANT_SUFFIXES and f"{prefix}.weight_q" in state_names
