"""Meta's checkpoints (the llama repository's format): params.json + consolidated.NN.pth shards,
one per model-parallel rank, with tokenizer.model beside them or in the parent folder.

Meta's parameter names are ours (llama2.model follows the reference code), and so is its rotary
layout (q/k rows interleaved as pairs), so no tensor is renamed or permuted either way.
`save_meta` writes one shard (model parallel 1) as a plain state dict, which
`torch.load(weights_only=True)` reads.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llama2.checkpoint_base import CheckpointError, Loaded, atomic_dir, read_json, unique_tensors
from llama2.model import ModelArgs, meta_ffn_hidden_dim
from llama2.tokenizer import Tokenizer

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
    params = read_json(params_file)
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
    # Meta releases keep tokenizer.model beside the checkpoint folder or inside it; `save_meta`
    # writes a model's non-SentencePiece tokenizer as tokenizer.json inside it.
    tok = next((d / "tokenizer.model" for d in (path, path.parent) if (d / "tokenizer.model").is_file()), None)
    if tok is None and (path / "tokenizer.json").is_file():
        tok = path
    return Loaded(args, state, tok, str(path), "meta", {})


def meta_params(args: ModelArgs) -> dict:
    """params.json for `args`, with the `multiple_of` / `ffn_dim_multiplier` from which Meta's
    reference code computes the SwiGLU width `hidden_dim`."""
    if args.head != "lm":
        raise CheckpointError("Meta's format holds language models only; write a reward model as native or hf")
    if args.head_dim != args.dim // args.n_heads:
        raise CheckpointError(f"head_dim={args.head_dim} is not dim // n_heads, which Meta's format assumes")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": 256, "ffn_dim_multiplier": None,
              "norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len}
    if meta_ffn_hidden_dim(args.dim) != args.hidden_dim:
        # A multiplier with multiple_of 1 reproduces any width (the half keeps the float product
        # from landing just below it before Meta's int() truncates).
        base = int(2 * 4 * args.dim / 3)
        params.update(multiple_of=1, ffn_dim_multiplier=(args.hidden_dim + 0.5) / base)
        assert meta_ffn_hidden_dim(args.dim, 1, params["ffn_dim_multiplier"]) == args.hidden_dim
    return {k: v for k, v in params.items() if v is not None}


def save_meta(out_dir: str | Path, args: ModelArgs, state: dict[str, torch.Tensor], tokenizer: Tokenizer | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Export to Meta's format: params.json + consolidated.00.pth (+ the tokenizer's own files).

    Meta's models never tie the output matrix to the embedding, so a tied model is written with
    an output.weight equal to its embedding (and reads back untied).
    """
    out_dir = Path(out_dir)
    params = meta_params(args)
    state = unique_tensors(state, args)
    if args.tie_embeddings:  # a copy: two names for one storage would be loaded as a tied pair again
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    state = {k: (t.to(dtype) if dtype else t).cpu() for k, t in state.items()}
    with atomic_dir(out_dir) as tmp:
        torch.save(state, tmp / "consolidated.00.pth")
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir
