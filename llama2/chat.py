"""`llama2 chat` and `llama2 generate`: talk to any checkpoint from the terminal.

The model may be a native directory, a Hugging Face directory, a Meta directory or a .gguf file;
with no `--model`, the bundled SmolLM2-135M-Instruct is used (see `llama2.inference`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from llama2.chat_format import ChatFormat, ChatFormatError, Dialog
from llama2.compiled_decode import COMPILE_HELP
from llama2.generation import Decoder, GenerationStats, SamplingParams
from llama2.inference import load_for_inference
from llama2.tokenizer import StreamDecoder


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint: native/HF/Meta directory or .gguf (default: bundled SmolLM2)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, Llama 2 chat)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--format", choices=["auto", "llama2", "template"], default="auto",
                   help="chat format: the model's own template if it has one (auto), or Llama 2's")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--dequantize", action="store_true",
                   help="load quantized weights (a quantized native checkpoint, a Q8_0/Q4_0/Q4_1 GGUF) as float "
                        "of --dtype instead of keeping them int8/int4")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def sampling_params(a, fmt: ChatFormat | None, tok) -> SamplingParams:
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
              seed=a.seed, ignore_eos=getattr(a, "ignore_eos", False))
    if fmt is None:  # a plain completion: only EOS ends it
        return SamplingParams(stop_ids=(tok.eos_id,), **kw)
    return SamplingParams.for_chat(fmt, **kw)


def stream_printer(tok, out=None):
    """An `on_token` callback that prints text as it becomes final (one row only)."""
    dec = StreamDecoder(tok)
    out = out or sys.stdout

    def on_token(row: int, token: int) -> None:
        piece = dec.push(token)
        if piece:
            out.write(piece)
            out.flush()

    def finish() -> None:
        rest = dec.flush()
        if rest:
            out.write(rest)
        out.flush()

    return on_token, finish


# ----------------------------------------------------------------------------- llama2 generate


def generate_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 generate", description="Complete one prompt and print the result.")
    add_sampling_args(p)
    p.add_argument("--prompt", required=True, help="the text (with --chat: the user message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat format")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (benchmarking)")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, finish reason, timing")
    p.add_argument("--no-stream", action="store_true", help="print the text only when done")
    a = p.parse_args(argv)
    if a.greedy:
        a.temperature = 0.0
    model, tok = load_for_inference(a.model, a.device, a.dtype, a.dequantize)
    fmt = None
    if a.chat:
        fmt = ChatFormat(tok, a.format)
        dialog: Dialog = ([{"role": "system", "content": a.system}] if a.system else [])
        dialog.append({"role": "user", "content": a.prompt})
        ids = fmt.prompt_ids(dialog)
    else:
        ids = tok.encode(a.prompt, bos=getattr(tok, "add_bos", True))
    params = sampling_params(a, fmt, tok)
    gen = Decoder(model, tok, compile=a.compile)
    stats = GenerationStats()
    stream = not (a.json or a.no_stream)
    on_token, finish = stream_printer(tok) if stream else (None, None)
    t0 = time.perf_counter()
    out = gen.generate([ids], params, on_token=on_token, stats=stats)[0]
    total = time.perf_counter() - t0
    if a.json:
        print(json.dumps({
            "text": out.text, "tokens": out.tokens, "prompt_tokens": out.prompt_tokens,
            "finish_reason": out.finish_reason, "logprobs": [round(x, 5) for x in out.logprobs],
            "stop_token": out.stop_token,
            "stop_logprob": None if out.stop_logprob is None else round(out.stop_logprob, 5),
            "timing": {"seconds": round(total, 4), "prefill_tokens_per_s": round(stats.prefill_tps, 2),
                       "decode_tokens_per_s": round(stats.decode_tps, 2)},
        }, ensure_ascii=False))
    elif stream:
        finish()
        print()
    else:
        print(out.text)
    return 0


# ----------------------------------------------------------------------------- llama2 chat

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit"


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 chat", description="Chat with a model (streaming, multi-turn). " + HELP)
    add_sampling_args(p)
    p.add_argument("--system", help="system message for the whole conversation")
    a = p.parse_args(argv)
    model, tok = load_for_inference(a.model, a.device, a.dtype, a.dequantize)
    fmt = ChatFormat(tok, a.format)
    gen = Decoder(model, tok, compile=a.compile)
    params = sampling_params(a, fmt, tok)
    system = a.system
    history: Dialog = []
    interactive = sys.stdin.isatty()
    print(f"[llama2] {model.args.num_params() / 1e6:.0f}M parameters, chat format: {fmt.style}. {HELP}",
          file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("[llama2] conversation reset", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            print(f"[llama2] system message {'set' if system else 'cleared'}; conversation reset", file=sys.stderr)
            continue
        dialog = ([{"role": "system", "content": system}] if system else []) + history
        dialog.append({"role": "user", "content": text})
        try:
            ids = fmt.prompt_ids(dialog)
        except ChatFormatError as e:
            print(f"[llama2] {e}", file=sys.stderr)
            continue
        # Keep the conversation inside the context: forget the oldest exchanges first.
        while len(ids) + params.max_new_tokens > model.args.max_seq_len and len(history) >= 2:
            history = history[2:]
            dialog = ([{"role": "system", "content": system}] if system else []) + history + [dialog[-1]]
            ids = fmt.prompt_ids(dialog)
        on_token, finish = stream_printer(tok)
        if interactive:
            sys.stdout.write("assistant> ")
        out = gen.generate([ids], params, on_token=on_token)[0]
        finish()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history = dialog[1:] if system else dialog
        history = history + [{"role": "assistant", "content": out.text.strip()}]
    return 0
