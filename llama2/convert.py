"""`llama2 convert`: read a checkpoint in any supported format and write it in another."""
from __future__ import annotations

import argparse

import torch

from llama2.checkpoint import build_model, check_state_dict, read_checkpoint, save_native
from llama2.hf_checkpoint import save_hf
from llama2.meta_checkpoint import save_meta
from llama2.quant import GROUP_SIZES, MODES, describe, dequantize_state, quantize_model


def convert_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llama2 convert",
        description="Convert a checkpoint (native dir, Hugging Face dir, Meta dir with params.json, or .gguf) "
                    "to our native format, a Hugging Face Llama directory or Meta's format (params.json + consolidated.00.pth).",
    )
    p.add_argument("source", help="checkpoint to read")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--to", choices=["native", "hf", "meta"], default="native")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store weights in this dtype (default: as read; quantized weights keep their integers)")
    p.add_argument("--quantize", choices=[*MODES, "gguf"], default=None,
                   help="native only: store the projections and the output head quantized, int8 (per output "
                        "channel) or int4 (groups of --group-size inputs); 'gguf' keeps a GGUF's own Q8_0/Q4_0/Q4_1 "
                        "blocks (docs/models.md, Quantized weights)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=32, help="int4 group size (default 32)")
    p.add_argument("--float-head", action="store_true", help="with --quantize int8|int4: keep the output head float")
    a = p.parse_args(argv)
    if a.quantize and a.to != "native":
        p.error("--quantize writes the native format only (--to native)")
    ck = read_checkpoint(a.source, quantized=a.quantize == "gguf")
    if a.quantize == "gguf" and ck.format != "gguf":
        p.error(f"--quantize gguf needs a .gguf source, not a {ck.format} checkpoint")
    check_state_dict(ck.args, ck.state, ck.source)
    tok = ck.tokenizer()
    dtype = getattr(torch, a.dtype) if a.dtype else None
    meta = {"converted_from": {"format": ck.format, "path": ck.source}}
    if a.to == "native" and a.quantize:
        model = build_model(ck.args, ck.state, ck.source, dequantize=a.quantize in MODES)
        if a.quantize in MODES:
            quantize_model(model, a.quantize, a.group_size, head=not a.float_head)
        save_native(a.out, model, tokenizer=tok, meta=meta, dtype=dtype)
        print(f"quantized: {describe(model)}")
    elif a.to == "native":
        save_native(a.out, ck.state, ck.args, tok, meta=meta, dtype=dtype)
    else:
        state = dequantize_state(ck.state, ck.args.tie_embeddings)  # HF and Meta formats hold float weights
        (save_hf if a.to == "hf" else save_meta)(a.out, ck.args, state, tok, dtype)
    n = sum(t.numel() for t in ck.state.values())
    print(f"wrote {a.to} checkpoint to {a.out} ({n / 1e6:.1f}M stored values, from {ck.format} {ck.source})")
    return 0
