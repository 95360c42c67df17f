"""`llama2 tokenize` and `llama2 tokenizer train`: the tokenizer from the command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama2.chat_format import ChatFormat, ChatFormatError
from llama2.paths import smollm2_gguf
from llama2.tokenizer import load_tokenizer, train_sentencepiece


def tokenize_cli(argv: list[str]) -> int:
    """`llama2 tokenize`: print the ids of a text, or of a dialog in the chat format (§3)."""
    p = argparse.ArgumentParser(prog="llama2 tokenize", description=tokenize_cli.__doc__)
    p.add_argument("text", nargs="?", help="the text to tokenize")
    p.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json, a directory or a .gguf "
                   "(default: the bundled SmolLM2 model)")
    p.add_argument("--bos", action="store_true", help="prepend BOS")
    p.add_argument("--eos", action="store_true", help="append EOS")
    p.add_argument("--chat", metavar="DIALOG.json", help="a JSON list of {role, content} messages")
    p.add_argument("--format", choices=["auto", "llama2", "template"], default="auto",
                   help="chat format: the tokenizer's template if it has one (auto), or Llama 2's")
    p.add_argument("--mask", action="store_true",
                   help="with --chat on a dialog ending in an answer: also print the assistant mask")
    args = p.parse_args(argv)
    if (args.text is None) == (args.chat is None):
        p.error("give either a text or --chat DIALOG.json")
    tokenizer = load_tokenizer(args.tokenizer or smollm2_gguf())
    if args.chat is None:
        print(json.dumps(tokenizer.encode(args.text, bos=args.bos, eos=args.eos)))
        return 0

    file = Path(args.chat)
    try:
        dialog = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    fmt = ChatFormat(tokenizer, style=args.format)
    try:
        last = dialog[-1] if isinstance(dialog, list) and dialog else None
        if isinstance(last, dict) and last.get("role") == "assistant":  # a training dialog
            ids, mask = fmt.training_ids(dialog)
        else:
            ids, mask = fmt.prompt_ids(dialog), None
    except ChatFormatError as e:
        raise ChatFormatError(f"{file}: {e}") from None
    if args.mask and mask is not None:
        print(json.dumps({"ids": ids, "assistant_mask": [int(m) for m in mask]}))
    else:
        print(json.dumps(ids))
    return 0


def tokenizer_cli(argv: list[str]) -> int:
    """`llama2 tokenizer train`: train a SentencePiece BPE tokenizer the Llama 2 way (§2.2)."""
    p = argparse.ArgumentParser(prog="llama2 tokenizer", description="tokenizer tools")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help=tokenizer_cli.__doc__, description=train_sentencepiece.__doc__)
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt or .jsonl (`text` field)")
    t.add_argument("--vocab-size", type=int, default=32000, help="pieces in the vocabulary (paper: 32000)")
    t.add_argument("--out", required=True, metavar="DIR", help="where tokenizer.model is written")
    t.add_argument("--character-coverage", type=float, default=0.99995,
                   help="share of characters given their own piece; the rest fall back to bytes")
    t.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled from large inputs")
    t.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    tok = train_sentencepiece(
        args.input, args.out, args.vocab_size, character_coverage=args.character_coverage,
        max_sentences=args.max_sentences, threads=args.threads,
    )
    print(f"wrote {Path(args.out) / 'tokenizer.model'} ({tok.vocab_size} pieces)", file=sys.stderr)
    return 0

