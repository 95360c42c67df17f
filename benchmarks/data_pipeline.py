"""Data pipeline throughput: `pretokenize` MB/s for 1..N workers, and the packed loader's batch time.

    python benchmarks/data_pipeline.py --tokenizer tokenizer.model [--mb 10] [--workers 1 2]

The corpus is the Python standard library's source (one JSONL document per file, ~10 MB), so the
numbers are reproducible on any machine without a download.
"""
from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

from llama2.data import PackedLoader, TokenDataset
from llama2.pretokenize import pretokenize


def build_corpus(path: Path, megabytes: float) -> int:
    """Write stdlib .py files as JSONL documents until `megabytes` of text; returns the text bytes."""
    total = 0
    with open(path, "w") as out:
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.write(json.dumps({"text": text}) + "\n")
            total += len(text.encode())
            if total >= megabytes * 1e6:
                break
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--mb", type=float, default=10.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nbytes = build_corpus(tmp / "corpus.jsonl", a.mb)
        print(f"corpus: {nbytes / 1e6:.1f} MB of text")
        for w in a.workers:
            t0 = time.perf_counter()
            m = pretokenize([tmp / "corpus.jsonl"], a.tokenizer, tmp / f"out{w}", workers=w, progress=False)
            dt = time.perf_counter() - t0
            print(f"pretokenize workers={w}: {dt:.2f} s, {nbytes / 1e6 / dt:.2f} MB/s, "
                  f"{m['num_tokens'] / dt / 1e6:.2f} M tokens/s ({m['num_tokens']:,} tokens, {m['num_docs']} docs)")
        ds = TokenDataset.open(tmp / f"out{a.workers[0]}")
        loader = PackedLoader(ds, a.seq_len, a.batch_size, seed=0)
        next(loader)  # the first batch builds the epoch's permutation
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            next(loader)
        dt = (time.perf_counter() - t0) / n
        print(f"loader {a.batch_size}x{a.seq_len}: {dt * 1e3:.3f} ms per batch "
              f"({dt / a.batch_size * 1e6:.1f} us per row, {a.batch_size * a.seq_len / dt / 1e6:.1f} M tokens/s)")


if __name__ == "__main__":
    main()
