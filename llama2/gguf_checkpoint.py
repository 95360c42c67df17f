"""GGUF checkpoints (llama.cpp): a llama-architecture .gguf file, dequantised to fp32 or with its
quantized projections kept as integers (llama2.quant), with the tokenizer its metadata embeds.

Kept quantized (`read_gguf(path, dequantize=False)`), each projection maps to a `QuantLinear`:

- Q4_0 (blocks of 32: fp16 d, 32 4-bit codes; w = d · (code - 8)) and Q4_1 (fp16 d and m;
  w = d · code + m) -> int4 with group size 32, the same codes and scales: exact (the int4 CPU
  kernel then rounds scales and zeros to bfloat16; see llama2.quant).
- Q8_0 (blocks of 32: fp16 d, 32 int8) -> int8 with one scale per row, requantized from the
  block values (torch's int8 kernel has per-row scales only): each weight moves by at most half
  a step of its row's scale (max |w| / 127 / 2), where the blocks had finer steps.
- F32/F16/BF16 projections stay float; any other type is refused, naming the tensor and type
  (`dequantize=True` reads every type the gguf package knows).

The token embedding is always dequantised to fp32 (only looked up). A tied head is quantized from
the embedding's own blocks when those are of a type above.
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

from llama2.checkpoint_base import CheckpointError, Loaded, short_list
from llama2.model import ModelArgs
from llama2.quant import pack_nibbles, quantize_int8
from llama2.tokenizer import tokenizer_from_gguf

_GGUF_LAYER = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


Q = gguf.GGMLQuantizationType
KEPT_QUANTIZED = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def _blocks(t, block_bytes: int) -> np.ndarray:
    """A quantized tensor's raw bytes as (rows, blocks per row, block_bytes)."""
    raw = np.asarray(t.data, dtype=np.uint8)
    return raw.reshape(raw.shape[0], -1, block_bytes)


def _fp16(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as fp32 (rows, blocks)."""
    return torch.from_numpy(np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0]
                            .astype(np.float32))


def _q4_codes(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The 32 4-bit codes of each block (byte i: code i low, code i + 16 high) as uint8 (rows, cols)."""
    qs = blocks[..., start:start + 16]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, blocks, 32) in input order
    return torch.from_numpy(codes.reshape(codes.shape[0], -1))


def quantized_tensors(name: str, t) -> dict[str, torch.Tensor]:
    """A Q8_0/Q4_0/Q4_1 GGUF tensor as a QuantLinear's tensors under `name` (a module name)."""
    if t.tensor_type == Q.Q8_0:  # fp16 d, 32 int8
        b = _blocks(t, 34)
        q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8)).float()  # (rows, blocks, 32)
        w = (q * _fp16(b, 0)[..., None]).reshape(b.shape[0], -1)
        q8, scales = quantize_int8(w)  # per-row: see the module docstring
        return {f"{name}.weight_q": q8, f"{name}.scales": scales}
    if t.tensor_type == Q.Q4_0:  # fp16 d, 16 bytes of codes; w = d · (code - 8)
        b = _blocks(t, 18)
        d = _fp16(b, 0)
        return {f"{name}.weight_q": pack_nibbles(_q4_codes(b, 2)), f"{name}.scales": d, f"{name}.mins": -8 * d}
    if t.tensor_type == Q.Q4_1:  # fp16 d, fp16 m, 16 bytes of codes; w = d · code + m
        b = _blocks(t, 20)
        return {f"{name}.weight_q": pack_nibbles(_q4_codes(b, 4)), f"{name}.scales": _fp16(b, 0),
                f"{name}.mins": _fp16(b, 2)}
    raise ValueError(f"{t.name}: {t.tensor_type.name} is not kept quantized")


def read_gguf(path: Path, dequantize: bool = True) -> Loaded:
    """A llama-architecture GGUF, dequantised to fp32, or with `dequantize=False` its Q8_0/Q4_0/Q4_1
    projections kept as integers (see the module docstring). q/k rows are already in Meta's layout:
    llama.cpp's converter permutes HF weights back to the interleaved rotary layout."""
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.gguf"))))
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture={arch!r}; only 'llama' is supported")
    scaling = _gguf_field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported")
    state, unknown, tied_head = {}, [], None
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if t.name in _GGUF_TOP:
            name = _GGUF_TOP[t.name]
        elif m and m.group(2) in _GGUF_LAYER:
            name = f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
        else:
            unknown.append(t.name)
            continue
        if not dequantize and name != "tok_embeddings.weight" and "norm" not in name:  # a projection
            if t.tensor_type in KEPT_QUANTIZED:
                state.update(quantized_tensors(name.removesuffix(".weight"), t))
                continue
            if t.tensor_type not in FLOAT_TYPES:
                raise CheckpointError(
                    f"{path}: tensor {t.name} is {t.tensor_type.name}, which cannot be kept quantized (Q8_0, Q4_0 "
                    "and Q4_1 can); load it dequantised to fp32 instead (--dequantize, dequantize=True)")
        if not dequantize and name == "tok_embeddings.weight" and t.tensor_type in KEPT_QUANTIZED:
            tied_head = t  # quantized as the head if the model turns out tied (no output.weight)
        # gguf lists shapes innermost-first; the dequantised array is already (rows, cols) = (out, in).
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        rows_cols = tuple(int(x) for x in reversed(t.shape.tolist()))
        state[name] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(rows_cols))  # copy: the mmap is read-only
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors: {short_list(sorted(unknown))}")
    tied = "output.weight" not in state and "output.weight_q" not in state
    if tied and tied_head is not None:
        state.update(quantized_tensors("output", tied_head))
    try:
        heads = int(_gguf_field(reader, "llama.attention.head_count"))
        dim = int(_gguf_field(reader, "llama.embedding_length"))
        tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
        args = ModelArgs(
            dim=dim,
            n_layers=int(_gguf_field(reader, "llama.block_count")),
            n_heads=heads,
            n_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", heads)),
            vocab_size=int(_gguf_field(reader, "llama.vocab_size", len(tokens) if tokens else 0)),
            hidden_dim=int(_gguf_field(reader, "llama.feed_forward_length")),
            norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
            max_seq_len=int(_gguf_field(reader, "llama.context_length", 4096)),
            tie_embeddings=tied,
            head_dim=int(_gguf_field(reader, "llama.attention.key_length", dim // heads)),
        )
    except TypeError as e:
        raise CheckpointError(f"{path}: missing llama.* metadata ({e})") from None
    return Loaded(args, state, path, str(path), "gguf", {}, tokenizer_from_gguf(reader))
