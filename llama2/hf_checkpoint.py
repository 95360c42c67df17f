"""Hugging Face Llama checkpoints: import (config.json + safetensors or pytorch_model*.bin) and
export (config.json, model.safetensors, generation_config.json and the tokenizer), loadable by
transformers as LlamaForCausalLM, or as LlamaForSequenceClassification for a reward model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llama2.checkpoint_base import (CheckpointError, Loaded, atomic_dir, read_json, find_tokenizer, short_list,
                                    unique_tensors)
from llama2.model import ModelArgs
from llama2.tokenizer import pad_token_id

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


def _hf_context(cfg: dict) -> int:
    """The context we can serve exactly: a sliding-window model (Mistral 7B v0.1: 4096 of 32768)
    attends to everything within one window, which full causal attention reproduces."""
    n = cfg.get("max_position_embeddings", 4096)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    return min(n, window) if window else n


def args_from_hf_config(cfg: dict, source: str) -> ModelArgs:
    if cfg.get("model_type") not in (None, "llama", "mistral") or (
        cfg.get("architectures") and not any(a in ("LlamaForCausalLM", "MistralForCausalLM", *_HF_CLASSIFIERS)
                                             for a in cfg["architectures"])
    ):
        raise CheckpointError(f"{source}: not a Llama checkpoint (model_type={cfg.get('model_type')!r}, "
                              f"architectures={cfg.get('architectures')})")
    head = _hf_head(cfg, source)
    for key in ("rope_parameters", "rope_scaling"):  # both: a config may carry the old field beside the new
        rope_type = (cfg.get(key) or {}).get("rope_type", (cfg.get(key) or {}).get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"{source}: {key}: rope scaling type {rope_type!r} is not supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
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
            max_seq_len=_hf_context(cfg),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            head=head,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None


def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
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
    cfg = read_json(cfg_file)
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
        raise CheckpointError(f"{path}: unexpected tensors: {short_list(sorted(unknown))}")
    if args.tie_embeddings:
        state.pop("output.weight", None)
    return Loaded(args, state, find_tokenizer(path), str(path), "hf", {})


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
            cfg["pad_token_id"] = pad_token_id(tokenizer)
    return cfg


def save_hf(out_dir: str | Path, args: ModelArgs, state: dict[str, torch.Tensor], tokenizer=None,
            dtype: torch.dtype | None = None) -> Path:
    """Export to a Hugging Face Llama directory (config.json + model.safetensors + tokenizer)."""
    out_dir = Path(out_dir)
    state = unique_tensors(state, args)
    hf_state = {}
    for name, t in state.items():
        if name.endswith("attention.wq.weight"):
            t = meta_to_hf_qk(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta_to_hf_qk(t, args.n_kv_heads)
        hf_name = "score.weight" if args.head == "scalar" and name == "output.weight" else meta_to_hf_name(name)
        hf_state[hf_name] = (t.to(dtype) if dtype else t).contiguous().cpu()
    out_dtype = dtype or next(iter(state.values())).dtype
    with atomic_dir(out_dir) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(args, tokenizer, out_dtype), indent=2) + "\n")
        gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}  # Llama 2's chat defaults
        if tokenizer is not None:
            gen.update(bos_token_id=tokenizer.bos_id, eos_token_id=sorted(tokenizer.stop_ids) or tokenizer.eos_id)
            tokenizer.save(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir
