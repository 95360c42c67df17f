"""`llama2 convert`: read a checkpoint in any supported format and write it in another."""
from __future__ import annotations

import argparse

import torch

from llama2.checkpoint import check_state_dict, read_checkpoint, save_native
from llama2.hf_checkpoint import save_hf
from llama2.meta_checkpoint import save_meta


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
                   help="store weights in this dtype (default: as read)")
    a = p.parse_args(argv)
    ck = read_checkpoint(a.source)
    check_state_dict(ck.args, ck.state, ck.source)
    tok = ck.tokenizer()
    dtype = getattr(torch, a.dtype) if a.dtype else None
    if a.to == "native":
        save_native(a.out, ck.state, ck.args, tok, meta={"converted_from": {"format": ck.format, "path": ck.source}},
                    dtype=dtype)
    elif a.to == "hf":
        save_hf(a.out, ck.args, ck.state, tok, dtype)
    else:
        save_meta(a.out, ck.args, ck.state, tok, dtype)
    n = sum(t.numel() for t in ck.state.values())
    print(f"wrote {a.to} checkpoint to {a.out} ({n / 1e6:.1f}M parameters, from {ck.format} {ck.source})")
    return 0
