"""What every checkpoint format shares: the error, the record a reader returns, and the helpers
that write a checkpoint directory atomically.

Every reader (`llama2.checkpoint` for the native format, `hf_checkpoint`, `meta_checkpoint`,
`gguf_checkpoint`) returns a `Loaded`: ModelArgs and a state dict under Meta's parameter names
(the names of llama2.model), plus where the tokenizer is. Writers fill a temporary sibling
directory and rename it into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llama2.model import ModelArgs
from llama2.tokenizer import Tokenizer, load_tokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensors."""


@dataclass
class Loaded:
    """What a checkpoint holds besides weights."""

    args: ModelArgs
    state: dict[str, torch.Tensor]
    tokenizer_path: Path | None  # a file or directory load_tokenizer understands
    source: str  # where it came from, for messages
    format: str
    meta: dict  # extra metadata (native: everything in model.json besides "model")
    preloaded_tokenizer: Tokenizer | None = None  # GGUF: built from the already-open reader

    def tokenizer(self) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None when it has none."""
        if self.preloaded_tokenizer is None and self.tokenizer_path is not None:
            self.preloaded_tokenizer = load_tokenizer(self.tokenizer_path)
        return self.preloaded_tokenizer


def short_list(items: list[str], n: int = 8) -> str:
    """The first `n` items of a list for a message, and how many more there are."""
    return ", ".join(items[:n]) + (f" … (+{len(items) - n} more)" if len(items) > n else "")


def find_tokenizer(*dirs: Path) -> Path | None:
    """The first of `dirs` that holds a tokenizer.json or tokenizer.model."""
    for d in dirs:
        for name in ("tokenizer.json", "tokenizer.model"):
            if (d / name).is_file():
                return d
    return None


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, params.json); invalid JSON names the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` fill `tmp`, a sibling of `out`; on success it is renamed into
    place (replacing an existing `out`: the old one is moved aside first, so a crash never leaves
    neither), on an error or a kill it is removed. A reader never sees a half-written directory."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unique_tensors(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors; a tied output matrix is left out (it is the embedding)."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if args.tie_embeddings:
        state.pop("output.weight", None)  # shared with tok_embeddings; safetensors refuses aliases
    return state
