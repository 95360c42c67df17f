"""GGUF checkpoints (llama.cpp): a llama-architecture .gguf file, dequantised to fp32, with the
tokenizer its metadata embeds."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

from llama2.checkpoint_base import CheckpointError, Loaded, short_list
from llama2.model import ModelArgs
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


def read_gguf(path: Path) -> Loaded:
    """A llama-architecture GGUF, dequantised to fp32 (q/k rows are already in Meta's layout:
    llama.cpp's converter permutes HF weights back to the interleaved rotary layout)."""
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
    state, unknown = {}, []
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if t.name in _GGUF_TOP:
            name = _GGUF_TOP[t.name]
        elif m and m.group(2) in _GGUF_LAYER:
            name = f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
        else:
            unknown.append(t.name)
            continue
        # gguf lists shapes innermost-first; the dequantised array is already (rows, cols) = (out, in).
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        rows_cols = tuple(int(x) for x in reversed(t.shape.tolist()))
        state[name] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(rows_cols))  # copy: the mmap is read-only
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors: {short_list(sorted(unknown))}")
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
            tie_embeddings="output.weight" not in state,
            head_dim=int(_gguf_field(reader, "llama.attention.key_length", dim // heads)),
        )
    except TypeError as e:
        raise CheckpointError(f"{path}: missing llama.* metadata ({e})") from None
    return Loaded(args, state, path, str(path), "gguf", {}, tokenizer_from_gguf(reader))
