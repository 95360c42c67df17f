"""Checkpoints: our native format, format detection, and loading any supported checkpoint.

Native format — a directory holding
    model.safetensors   weights under Meta's parameter names (the names of llama2.model)
    model.json          {"format": "llama2", "model": ModelArgs fields, ...extra metadata}
    tokenizer files     written by the tokenizer's own `save` (tokenizer.model or tokenizer.json)

The other formats have a module each: `hf_checkpoint` (Hugging Face), `meta_checkpoint` (Meta's
params.json + consolidated shards) and `gguf_checkpoint` (llama.cpp); `llama2.convert` is the
`llama2 convert` command. `read_checkpoint` and `load_model` read any of them.

Every reader returns (ModelArgs, state dict in Meta names) and every loader checks the tensors
against the model before loading: missing, unexpected or mis-shaped tensors are refused by name.
Weights are read with safetensors or `torch.load(weights_only=True)`: no pickled code runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llama2.checkpoint_base import (CheckpointError, Loaded, atomic_dir, find_tokenizer, short_list,
                                    unique_tensors)
from llama2.gguf_checkpoint import read_gguf
from llama2.hf_checkpoint import read_hf
from llama2.meta_checkpoint import read_meta
from llama2.model import ModelArgs, Transformer
from llama2.quant import describe, dequantize_state, expected_quantized_shapes, install, is_quant_tensor

NATIVE_CONFIG = "model.json"
NATIVE_WEIGHTS = "model.safetensors"


# ----------------------------------------------------------------------------- format detection


def detect_format(path: str | Path) -> str:
    """'native' | 'hf' | 'meta' | 'gguf' for a checkpoint path (directory or .gguf file)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir():
        if (p / NATIVE_CONFIG).is_file():
            return "native"
        if (p / "config.json").is_file():
            return "hf"
        if (p / "params.json").is_file():
            return "meta"
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        raise CheckpointError(
            f"{p}: not a checkpoint directory (expected {NATIVE_CONFIG}, config.json, params.json or one .gguf file)"
        )
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    raise CheckpointError(f"{p}: not a checkpoint (expected a directory or a .gguf file)")


# ----------------------------------------------------------------------------- checking and building


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `args` must hold, with its shape (tied: no output.weight)."""
    hd = args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size if args.head == "lm" else 1, args.dim)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, args.dim),
            p + "attention.wk.weight": (args.n_kv_heads * hd, args.dim),
            p + "attention.wv.weight": (args.n_kv_heads * hd, args.dim),
            p + "attention.wo.weight": (args.dim, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            p + "feed_forward.w3.weight": (args.hidden_dim, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        })
    return shapes


def check_state_dict(args: ModelArgs, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse missing, unexpected and mis-shaped tensors, naming them. A projection may be held
    quantized (`<name>.weight_q`, `.scales`, `.mins`: llama2.quant) instead of as `<name>.weight`."""
    expected = expected_quantized_shapes(expected_shapes(args), state, args.tie_embeddings)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: expected {list(expected[k])}, got {list(state[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {short_list(unexpected)}")
    if wrong:
        problems.append(f"mismatched shapes: {short_list(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def build_model(
    args: ModelArgs, state: dict[str, torch.Tensor], source: str, device="cpu", dtype=torch.float32,
    dequantize: bool = False,
) -> Transformer:
    """Build on the meta device and materialise by assigning the loaded tensors (no double allocation).

    Projections the state dict holds quantized become `llama2.quant.QuantLinear`s (their integers
    and scales kept as stored; `dtype` applies to the float tensors), or with `dequantize` float
    layers of `dtype` again."""
    check_state_dict(args, state, source)
    if dequantize:
        state = dequantize_state(state, args.tie_embeddings)
    state = {k: v.to(device=device) if is_quant_tensor(k, state) else v.to(device=device, dtype=dtype)
             for k, v in state.items()}
    if args.tie_embeddings and "output.weight_q" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    install(model, state)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return model.eval()


def read_checkpoint(path: str | Path, quantized: bool = False) -> Loaded:
    """Read any supported checkpoint into (args, Meta-named state dict, tokenizer location).

    `quantized`: a GGUF's Q8_0/Q4_0/Q4_1 projections are read as integers and scales (llama2.quant)
    instead of dequantised to fp32. A native checkpoint holds what was saved either way."""
    fmt = detect_format(path)
    if fmt == "gguf":
        return read_gguf(Path(path), dequantize=not quantized)
    return {"native": read_native, "hf": read_hf, "meta": read_meta}[fmt](Path(path))


def load_model(path: str | Path, device="cpu", dtype=torch.float32, with_tokenizer: bool = True,
               dequantize: bool = True):
    """(model, tokenizer) from any supported checkpoint; the tokenizer is None when absent.

    `dequantize` (the default): every weight is float, as training and conversion want. Off, the
    quantized projections of a native checkpoint stay `QuantLinear`s, and a GGUF's Q8_0/Q4_0/Q4_1
    projections are loaded as such (see `read_gguf`; other quantized types are refused by name)."""
    ck = read_checkpoint(path, quantized=not dequantize)
    model = build_model(ck.args, ck.state, ck.source, device, dtype, dequantize=dequantize)
    return model, (ck.tokenizer() if with_tokenizer else None)


# ----------------------------------------------------------------------------- native


def save_native(
    out_dir: str | Path,
    model: Transformer | dict[str, torch.Tensor],
    args: ModelArgs | None = None,
    tokenizer=None,
    meta: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a native checkpoint directory atomically (temp dir, then rename).

    A quantized model's integers and scales are written as they are (`dtype` casts only the float
    weights), and model.json records what is quantized under "quantization"."""
    out_dir = Path(out_dir)
    if isinstance(model, Transformer):
        args, state = model.args, model.state_dict()
        quantization = describe(model)
        if quantization is not None:
            meta = {**(meta or {}), "quantization": quantization}
    else:
        state = model
        if args is None:
            raise ValueError("save_native needs ModelArgs when given a state dict")
    state = unique_tensors(state, args)
    if dtype is not None:
        state = {k: v if is_quant_tensor(k, state) else v.to(dtype) for k, v in state.items()}
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp / NATIVE_WEIGHTS), metadata={"format": "pt"})
        config = {"format": "llama2", "version": 1, "model": args.to_dict(), **(meta or {})}
        (tmp / NATIVE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


def read_native(path: Path) -> Loaded:
    cfg_file = path / NATIVE_CONFIG
    try:
        config = json.loads(cfg_file.read_text())
        args = ModelArgs.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: invalid native config: {e}") from None
    weights = path / NATIVE_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {NATIVE_WEIGHTS}")
    state = load_file(str(weights))
    meta = {k: v for k, v in config.items() if k != "model"}
    return Loaded(args, state, find_tokenizer(path), str(weights), "native", meta)
