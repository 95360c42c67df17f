"""Loading a model to run it: the device and dtype, and the default model when none is named.

What the commands that generate share (`llama2 chat`/`generate`, evaluation, rejection sampling,
best-of-n, annotation sampling). With no model named, the bundled SmolLM2-135M-Instruct is used,
converted once to our native format in the cache so later starts skip the GGUF dequantisation.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from llama2.checkpoint import load_model, save_native
from llama2.gguf_checkpoint import read_gguf
from llama2.model import Transformer
from llama2.paths import smollm2_gguf
from llama2.tokenizer import Tokenizer


def cache_dir() -> Path:
    """Where converted models are kept: $LLAMA2_HOME, else ~/.cache/llama2."""
    return Path(os.environ.get("LLAMA2_HOME", Path.home() / ".cache" / "llama2"))


def default_model() -> Path:
    """The bundled SmolLM2 model as a native checkpoint in the cache (converted on first use)."""
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (out / "model.json").is_file():
        src = smollm2_gguf()
        print(f"[llama2] converting {src.name} to {out} (once)", file=sys.stderr)
        ck = read_gguf(src)
        save_native(out, ck.state, ck.args, ck.tokenizer(), meta={"converted_from": {"format": "gguf", "path": str(src)}})
    return out


def pick_device(name: str) -> torch.device:
    """A torch device by name; "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_inference(model: str | None, device: str = "auto", dtype: str = "auto",
                       dequantize: bool = False) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) ready for generation; refuses a checkpoint without a tokenizer.

    Quantized weights stay quantized (llama2.quant): a quantized native checkpoint's, and a GGUF's
    Q8_0/Q4_0/Q4_1 projections (a GGUF of another quantized type is refused, naming the tensor).
    `dequantize` loads every weight as float of `dtype` instead (the CLI's --dequantize). The
    bundled default model is the fp32 conversion in the cache either way."""
    path = Path(model) if model else default_model()
    dev = pick_device(device)
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    net, tok = load_model(path, device=dev, dtype=dt, dequantize=dequantize)
    if tok is None:
        raise ValueError(f"{path}: the checkpoint has no tokenizer (tokenizer.model / tokenizer.json)")
    return net, tok
