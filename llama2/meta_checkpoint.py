"""Meta's checkpoints (the llama repository's format): params.json + consolidated.NN.pth shards,
one per model-parallel rank, with tokenizer.model beside them or in the parent folder.

Meta's parameter names are ours (llama2.model follows the reference code), and so is its rotary
layout (q/k rows interleaved as pairs), so no tensor is renamed or permuted either way.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llama2.checkpoint_base import CheckpointError, Loaded
from llama2.model import ModelArgs

# How Meta's model-parallel shards split each tensor (fairscale Column/RowParallelLinear,
# ParallelEmbedding): the dimension to concatenate along, or None for replicated tensors.
_META_SPLIT_DIM = {
    "tok_embeddings": 1, "output": 0,
    "attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1,
    "feed_forward.w1": 0, "feed_forward.w3": 0, "feed_forward.w2": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None,
}


def _meta_split_dim(name: str):
    base = re.sub(r"^layers\.\d+\.", "", name).removesuffix(".weight")
    if base not in _META_SPLIT_DIM:
        raise KeyError(name)
    return _META_SPLIT_DIM[base]


def read_meta(path: Path) -> Loaded:
    params_file = path / "params.json"
    try:
        params = json.loads(params_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{params_file}: invalid JSON: {e}") from None
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: no consolidated.*.pth shards next to params.json")
    parts = []
    for f in shards:
        try:
            parts.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # weights_only refuses pickled code: report, do not fall back
            raise CheckpointError(f"{f}: cannot be read as plain tensors ({e})") from None
    state: dict[str, torch.Tensor] = {}
    for name in parts[0]:
        if name == "rope.freqs":  # Llama 1 checkpoints stored the rotary table; we recompute it
            continue
        try:
            dim = _meta_split_dim(name)
        except KeyError:
            raise CheckpointError(f"{shards[0]}: unexpected tensor {name}") from None
        missing = [str(f) for f, p in zip(shards, parts) if name not in p]
        if missing:
            raise CheckpointError(f"tensor {name} is missing from shard(s) {', '.join(missing)}")
        tensors = [p[name] for p in parts]
        state[name] = tensors[0] if dim is None or len(tensors) == 1 else torch.cat(tensors, dim=dim)
    if "tok_embeddings.weight" not in state or "layers.0.feed_forward.w1.weight" not in state:
        raise CheckpointError(f"{shards[0]}: missing tok_embeddings / layer tensors")
    try:
        vocab = params.get("vocab_size", -1)
        args = ModelArgs(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            # Llama 2's params.json says vocab_size -1 ("take it from the tokenizer"): read the tensor.
            vocab_size=vocab if vocab and vocab > 0 else state["tok_embeddings.weight"].shape[0],
            hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=params.get("max_seq_len", 4096),
        )
    except KeyError as e:
        raise CheckpointError(f"{params_file}: missing field {e.args[0]!r}") from None
    # Meta releases keep tokenizer.model beside the checkpoint folder or inside it.
    tok = next((d / "tokenizer.model" for d in (path, path.parent) if (d / "tokenizer.model").is_file()), None)
    return Loaded(args, state, tok, str(path), "meta", {})

