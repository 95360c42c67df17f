"""Checkpoints: our native format, and import/export of Hugging Face, Meta and GGUF checkpoints.

Native format — a directory holding
    model.safetensors   weights under Meta's parameter names (the names of llama2.model)
    model.json          {"format": "llama2", "model": ModelArgs fields, ...extra metadata}
    tokenizer files     written by the tokenizer's own `save` (tokenizer.model or tokenizer.json)

Every importer returns (ModelArgs, state dict in Meta names) and every loader checks the tensors
against the model before loading: missing, unexpected or mis-shaped tensors are refused by name.
Weights are read with safetensors or `torch.load(weights_only=True)`: no pickled code runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llama2.model import ModelArgs, Transformer

NATIVE_CONFIG = "model.json"
NATIVE_WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensors."""


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
    """Refuse missing, unexpected and mis-shaped tensors, naming them."""
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: expected {list(expected[k])}, got {list(state[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if wrong:
        problems.append(f"mismatched shapes: {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" … (+{len(items) - n} more)" if len(items) > n else "")


def build_model(
    args: ModelArgs, state: dict[str, torch.Tensor], source: str, device="cpu", dtype=torch.float32
) -> Transformer:
    """Build on the meta device and materialise by assigning the loaded tensors (no double allocation)."""
    check_state_dict(args, state, source)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return model.eval()


@dataclass
class Loaded:
    """What a checkpoint holds besides weights."""

    args: ModelArgs
    state: dict[str, torch.Tensor]
    tokenizer_path: Path | None  # a file or directory load_tokenizer understands
    source: str  # where it came from, for messages
    format: str
    meta: dict  # extra metadata (native: everything in model.json besides "model")
    preloaded_tokenizer: object | None = None  # GGUF: built from the already-open reader

    def tokenizer(self):
        """The checkpoint's tokenizer, or None when it has none."""
        if self.preloaded_tokenizer is None and self.tokenizer_path is not None:
            from llama2.tokenizer import load_tokenizer

            self.preloaded_tokenizer = load_tokenizer(self.tokenizer_path)
        return self.preloaded_tokenizer


def read_checkpoint(path: str | Path) -> Loaded:
    """Read any supported checkpoint into (args, Meta-named state dict, tokenizer location)."""
    fmt = detect_format(path)
    return {"native": read_native, "hf": read_hf, "meta": read_meta, "gguf": read_gguf}[fmt](Path(path))


def load_model(path: str | Path, device="cpu", dtype=torch.float32, with_tokenizer: bool = True):
    """(model, tokenizer) from any supported checkpoint; the tokenizer is None when absent."""
    ck = read_checkpoint(path)
    model = build_model(ck.args, ck.state, ck.source, device, dtype)
    return model, (ck.tokenizer() if with_tokenizer else None)


# ----------------------------------------------------------------------------- native


def _atomic_dir(out_dir: Path):
    """A temporary sibling directory to fill; `_commit_dir` renames it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def _commit_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():  # replace: move the old one aside first so a crash never leaves neither
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _unique_tensors(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if args.tie_embeddings:
        state.pop("output.weight", None)  # shared with tok_embeddings; safetensors refuses aliases
    return state


def save_native(
    out_dir: str | Path,
    model: Transformer | dict[str, torch.Tensor],
    args: ModelArgs | None = None,
    tokenizer=None,
    meta: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a native checkpoint directory atomically (temp dir, then rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if isinstance(model, Transformer):
        args, state = model.args, model.state_dict()
    else:
        state = model
        if args is None:
            raise ValueError("save_native needs ModelArgs when given a state dict")
    state = _unique_tensors(state, args)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    tmp = _atomic_dir(out_dir)
    try:
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp / NATIVE_WEIGHTS), metadata={"format": "pt"})
        config = {"format": "llama2", "version": 1, "model": args.to_dict(), **(meta or {})}
        (tmp / NATIVE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        _commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_native(path: Path) -> Loaded:
    from safetensors.torch import load_file

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
    return Loaded(args, state, _find_tokenizer(path), str(weights), "native", meta)


def _find_tokenizer(*dirs: Path) -> Path | None:
    for d in dirs:
        for name in ("tokenizer.json", "tokenizer.model"):
            if (d / name).is_file():
                return d
    return None


# ----------------------------------------------------------------------------- Hugging Face

# HF stores q/k rows of each head as [all real parts; all imaginary parts] (rotate_half layout);
# Meta (and we) interleave them as pairs. These two permutations convert between the layouts.


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}


def hf_to_meta_name(name: str) -> str | None:
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.weight"
    return None


def meta_to_hf_name(name: str) -> str:
    for hf, meta in _HF_TOP.items():
        if name == meta:
            return hf
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    inverse = {v: k for k, v in _HF_LAYER.items()}
    if not m or m.group(2) not in inverse:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}.weight"


# A reward model travels as a sequence classifier with one label: its `score` layer is our scalar
# head (§3.2.2), read at the last token that is not padding.
_HF_CLASSIFIERS = ("LlamaForSequenceClassification", "MistralForSequenceClassification")


def _hf_head(cfg: dict, source: str) -> str:
    """'lm' or 'scalar' for a transformers config; multi-label classifiers are refused."""
    if not any(a in _HF_CLASSIFIERS for a in cfg.get("architectures") or []):
        return "lm"
    labels = len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else cfg.get("num_labels", 2)
    if labels != 1:
        raise CheckpointError(f"{source}: a sequence classifier with {labels} labels; a reward model has 1")
    return "scalar"


def args_from_hf_config(cfg: dict, source: str) -> ModelArgs:
    if cfg.get("model_type") not in (None, "llama", "mistral") or (
        cfg.get("architectures") and not any(a in ("LlamaForCausalLM", "MistralForCausalLM", *_HF_CLASSIFIERS)
                                             for a in cfg["architectures"])
    ):
        raise CheckpointError(f"{source}: not a Llama checkpoint (model_type={cfg.get('model_type')!r}, "
                              f"architectures={cfg.get('architectures')})")
    head = _hf_head(cfg, source)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise CheckpointError(f"{source}: rope scaling type {rope_type!r} is not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not a Llama 2 architecture")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={cfg['hidden_act']!r} (Llama uses silu)")
    try:
        heads = cfg["num_attention_heads"]
        return ModelArgs(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            head=head,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None


def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{index}: names shard {f}, which is missing")
            state.update(load_file(str(path / f)))
        return state
    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise CheckpointError(f"{path}: no *.safetensors (or pytorch_model*.bin) weights")


def read_hf(path: Path) -> Loaded:
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from None
    args = args_from_hf_config(cfg, str(cfg_file))
    state, unknown = {}, []
    for name, t in _read_hf_tensors(path).items():
        if args.head == "scalar" and name in ("score.weight", "lm_head.weight"):
            # the classifier's score layer is our scalar head; a classifier has no lm_head
            meta = "output.weight" if name == "score.weight" else None
        else:
            meta = hf_to_meta_name(name)
        if meta is None:
            if name.endswith("rotary_emb.inv_freq"):  # older exports stored this buffer
                continue
            unknown.append(name)
            continue
        if meta.endswith("attention.wq.weight"):
            t = hf_to_meta_qk(t, args.n_heads)
        elif meta.endswith("attention.wk.weight"):
            t = hf_to_meta_qk(t, args.n_kv_heads)
        state[meta] = t
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors: {_short(sorted(unknown))}")
    if args.tie_embeddings:
        state.pop("output.weight", None)
    return Loaded(args, state, _find_tokenizer(path), str(path), "hf", {})


def hf_config(args: ModelArgs, tokenizer=None, dtype: torch.dtype = torch.float32) -> dict:
    """A transformers LlamaConfig dict (written for both transformers 4.x and 5.x readers)."""
    cfg = {
        "architectures": ["LlamaForSequenceClassification" if args.head == "scalar" else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if tokenizer is not None:
        cfg["bos_token_id"] = tokenizer.bos_id
        cfg["eos_token_id"] = tokenizer.eos_id
        if tokenizer.pad_id is not None:
            cfg["pad_token_id"] = tokenizer.pad_id
    if args.head == "scalar":
        # One label, and a pad id that never ends a real sequence: transformers reads the score
        # at the rightmost token that is not padding, which must be the answer's EOS/end of turn.
        cfg.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, problem_type="regression")
        if tokenizer is not None:
            from llama2.tokenizer import pad_token_id

            cfg["pad_token_id"] = pad_token_id(tokenizer)
    return cfg


def save_hf(out_dir: str | Path, args: ModelArgs, state: dict[str, torch.Tensor], tokenizer=None,
            dtype: torch.dtype | None = None) -> Path:
    """Export to a Hugging Face Llama directory (config.json + model.safetensors + tokenizer)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = _unique_tensors(state, args)
    hf_state = {}
    for name, t in state.items():
        if name.endswith("attention.wq.weight"):
            t = meta_to_hf_qk(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta_to_hf_qk(t, args.n_kv_heads)
        hf_name = "score.weight" if args.head == "scalar" and name == "output.weight" else meta_to_hf_name(name)
        hf_state[hf_name] = (t.to(dtype) if dtype else t).contiguous().cpu()
    out_dtype = dtype or next(iter(state.values())).dtype
    tmp = _atomic_dir(out_dir)
    try:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(args, tokenizer, out_dtype), indent=2) + "\n")
        gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}  # Llama 2's chat defaults
        if tokenizer is not None:
            gen.update(bos_token_id=tokenizer.bos_id, eos_token_id=sorted(tokenizer.stop_ids) or tokenizer.eos_id)
            tokenizer.save(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- Meta

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


# ----------------------------------------------------------------------------- GGUF

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
    import gguf
    import numpy as np

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
        raise CheckpointError(f"{path}: unexpected tensors: {_short(sorted(unknown))}")
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
    from llama2.tokenizer import tokenizer_from_gguf

    return Loaded(args, state, path, str(path), "gguf", {}, tokenizer_from_gguf(reader))


# ----------------------------------------------------------------------------- CLI


def convert_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llama2 convert",
        description="Convert a checkpoint (native dir, Hugging Face dir, Meta dir with params.json, or .gguf) "
                    "to our native format or to a Hugging Face Llama directory.",
    )
    p.add_argument("source", help="checkpoint to read")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--to", choices=["native", "hf"], default="native")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store weights in this dtype (default: as read)")
    a = p.parse_args(argv)
    ck = read_checkpoint(a.source)
    check_state_dict(ck.args, ck.state, ck.source)
    tok = ck.tokenizer()
    dtype = getattr(torch, a.dtype) if a.dtype else None
    if a.to == "native":
        save_native(a.out, ck.state, ck.args, tok, meta={"converted_from": {"format": ck.format, "path": ck.source}},
                    dtype=dtype)
    else:
        save_hf(a.out, ck.args, ck.state, tok, dtype)
    n = sum(t.numel() for t in ck.state.values())
    print(f"wrote {a.to} checkpoint to {a.out} ({n / 1e6:.1f}M parameters, from {ck.format} {ck.source})")
    return 0
