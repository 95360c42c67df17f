"""`llama2 data pretokenize` and `llama2 data info` (`llama2 data validate` is llama2.formats.validate_cli;
the subcommands are dispatched by llama2.cli)."""
from __future__ import annotations

import argparse
import os
import sys

from llama2.data import TokenDataset
from llama2.pretokenize import DEFAULT_SHARD_TOKENS, SUPPORTED_INPUTS, TXT_SPLITS, pretokenize


def pretokenize_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 data pretokenize", description=(
        "Tokenize text into memory-mapped token shards for pretraining (each document: BOS + text + EOS). "
        f"Inputs: {SUPPORTED_INPUTS}; directories and globs of these."))
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model, tokenizer.json, a folder or a .gguf")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: CPU count)")
    p.add_argument("--field", default="text", help="JSONL field / Parquet or Arrow column holding the text")
    p.add_argument("--split", default="train", help="split of a Hugging Face DatasetDict folder")
    p.add_argument("--txt-split", choices=TXT_SPLITS, default="blank",
                   help=".txt documents: separated by blank lines (default), one per line, or one per file")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    m = pretokenize(a.inputs, a.tokenizer, a.out, workers=a.workers, field=a.field, txt_split=a.txt_split,
                    split=a.split, shard_tokens=a.shard_tokens, overwrite=a.overwrite, progress=not a.quiet)
    print(f"{a.out}: {m['num_tokens']:,} tokens, {m['num_docs']:,} documents, {len(m['shards'])} shard(s), {m['dtype']}")
    for s in m["sources"]:
        if s["num_docs"] == 0:
            print(f"warning: {s['path']}: no documents", file=sys.stderr)
    return 0


def info_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 data info", description="Summarise a pretokenized dataset.")
    p.add_argument("path")
    a = p.parse_args(argv)
    ds = TokenDataset.open(a.path)
    tok = ds.manifest["tokenizer"]
    print(f"{a.path}: {ds.num_tokens:,} tokens, {ds.num_docs:,} documents "
          f"(mean {ds.num_tokens / ds.num_docs:,.1f} tokens), {len(ds.shards)} shard(s), {ds.manifest['dtype']}")
    print(f"tokenizer: {tok['path']} (vocab {tok['vocab_size']}, bos {tok['bos_id']}, eos {tok['eos_id']})")
    return 0
