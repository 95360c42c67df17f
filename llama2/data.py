"""Pretokenized datasets, as training reads them (Llama 2 §2.1: "sequences packed to the full context").

A dataset is a folder of token shards written by `llama2.pretokenize`: `shard-NNNNN.bin` (raw
uint16/uint32) + `shard-NNNNN.idx` (uint64 document offsets) + `manifest.json`, which also records
which tokenizer made it. `TokenDataset` memory-maps the shards and checks that the tokenizer
training will use is that one; `PackedLoader` cuts the (per-epoch shuffled) stream of documents
into rows of seq_len + 1 tokens, sharded by rank and resumable from a small state dict.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from llama2.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "llama2-tokens/1"


class DataError(ValueError):
    """Bad input data; the message names the file, the line (1-based) or row (0-based), and the field."""


def read_json(path: Path) -> dict:
    """A JSON file; unreadable or invalid JSON is a DataError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Tokenizer identity: which tokenizer made a dataset, and is it the one training will use?
# ---------------------------------------------------------------------------------------------

# Exercises digits, whitespace runs, code, accents, CJK and emoji (byte fallback).
_PROBE = "Llama 2: 70B params, 2.0T tokens.\n\n\tdef f(x):  return x**2  # naïve café 東京 🦙 </s> [INST]"
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_file_hash(path: str | os.PathLike) -> str | None:
    """sha256 of the tokenizer's file(s) (of a folder: its tokenizer files); None for files over
    64 MiB (a GGUF holds the weights too) — `tokenizer_fingerprint` then decides."""
    path = Path(path)
    files = [path / n for n in _TOKENIZER_FILES if (path / n).is_file()] if path.is_dir() else [path]
    if not files or any(f.stat().st_size > 64 << 20 for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of what the tokenizer does (every id's text, a probe's encoding, special ids): equal
    for the same vocabulary saved as tokenizer.model, tokenizer.json or GGUF."""
    h = hashlib.sha256(json.dumps([tok.vocab_size, tok.bos_id, tok.eos_id, tok.encode(_PROBE)]).encode())
    for i in range(tok.vocab_size):
        h.update(tok.decode([i]).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading: memory-mapped dataset and the packed, sharded, resumable loader
# ---------------------------------------------------------------------------------------------


class TokenDataset:
    """A pretokenized dataset (or a subset of its documents), memory-mapped, read-only."""

    def __init__(self, path: Path, manifest: dict, shards: list[np.ndarray],
                 doc_shard: np.ndarray, doc_start: np.ndarray, doc_len: np.ndarray):
        self.path, self.manifest, self.shards = path, manifest, shards
        self.doc_shard, self.doc_start, self.doc_len = doc_shard, doc_start, doc_len  # (num_docs,)
        tok = manifest["tokenizer"]
        self.vocab_size, self.bos_id, self.eos_id = tok["vocab_size"], tok["bos_id"], tok["eos_id"]
        self.num_docs = len(doc_len)
        self.num_tokens = int(doc_len.sum())

    @classmethod
    def open(cls, path: str | os.PathLike, tokenizer=None) -> "TokenDataset":
        """Open a `pretokenize` output folder; with `tokenizer` (a path or a loaded tokenizer),
        refuse a dataset made with a different vocabulary."""
        path = Path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            hint = " (an interrupted `llama2 data pretokenize` leaves no manifest)" if path.is_dir() else ""
            raise DataError(f"{path}: not a pretokenized dataset: no {MANIFEST}{hint}")
        manifest = read_json(manifest_file)
        if manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        dtype = np.dtype(manifest["dtype"])
        shards, doc_shard, doc_start, doc_len = [], [], [], []
        for i, shard in enumerate(manifest["shards"]):
            bin_file, idx_file = path / shard["tokens"], path / shard["offsets"]
            for f in (bin_file, idx_file):
                if not f.is_file():
                    raise DataError(f"{f}: missing (listed in {manifest_file})")
            if bin_file.stat().st_size != shard["num_tokens"] * dtype.itemsize:
                raise DataError(f"{bin_file}: {bin_file.stat().st_size} bytes, expected "
                                f"{shard['num_tokens']} {dtype.name} tokens (truncated or modified?)")
            offsets = np.fromfile(idx_file, dtype=np.uint64).astype(np.int64)
            if len(offsets) != shard["num_docs"] + 1 or offsets[-1] != shard["num_tokens"]:
                raise DataError(f"{idx_file}: document offsets do not match {manifest_file}")
            shards.append(np.memmap(bin_file, dtype=dtype, mode="r"))
            doc_shard.append(np.full(shard["num_docs"], i, dtype=np.int32))
            doc_start.append(offsets[:-1])
            doc_len.append(np.diff(offsets))
        ds = cls(path, manifest, shards, np.concatenate(doc_shard), np.concatenate(doc_start), np.concatenate(doc_len))
        if ds.num_tokens == 0:
            raise DataError(f"{path}: empty dataset (no tokens)")
        if tokenizer is not None:
            ds.check_tokenizer(tokenizer)
        return ds

    def check_tokenizer(self, tokenizer) -> None:
        """Raise DataError unless `tokenizer` (a path or a loaded tokenizer) has this dataset's vocabulary."""
        want = self.manifest["tokenizer"]
        path = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        tok = load_tokenizer(str(path)) if path is not None else tokenizer
        made_with = f"{self.path} was tokenized with {want['path']}"
        for key in ("vocab_size", "bos_id", "eos_id"):
            if getattr(tok, key) != want[key]:
                raise DataError(f"vocabulary mismatch: {made_with} ({key} {want[key]}) but the tokenizer "
                                f"{path or ''} has {key} {getattr(tok, key)}; re-run `llama2 data pretokenize`")
        if path is not None and want.get("sha256") and tokenizer_file_hash(path) == want["sha256"]:
            return  # the same file(s): no need to compare behaviour
        if want.get("fingerprint") and tokenizer_fingerprint(tok) != want["fingerprint"]:
            raise DataError(f"vocabulary mismatch: {made_with} (content hash {want['fingerprint'][:12]}) but the "
                            f"tokenizer {path or ''} encodes differently; re-run `llama2 data pretokenize`")

    def __len__(self) -> int:
        return self.num_docs

    def document(self, i: int) -> np.ndarray:
        """The tokens of document i (BOS ... EOS), as a read-only view."""
        s, a = int(self.doc_shard[i]), int(self.doc_start[i])
        return self.shards[s][a:a + int(self.doc_len[i])]

    def subset(self, indices: np.ndarray) -> "TokenDataset":
        """A view of some documents (in the given order), sharing the memory maps."""
        indices = np.asarray(indices, dtype=np.int64)
        return TokenDataset(self.path, self.manifest, self.shards,
                            self.doc_shard[indices], self.doc_start[indices], self.doc_len[indices])

    def split(self, val_fraction: float, seed: int = 0) -> tuple["TokenDataset", "TokenDataset"]:
        """(train, val): a random held-out set of whole documents holding about `val_fraction`
        of the tokens (at least one document); both keep the corpus order."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if self.num_docs < 2:
            raise DataError(f"{self.path}: one document cannot be split into train and validation sets")
        order = np.random.default_rng([seed, 0x7A1]).permutation(self.num_docs)
        covered = np.cumsum(self.doc_len[order])  # tokens held out if we stop after each doc
        n_val = int(np.searchsorted(covered, val_fraction * self.num_tokens)) + 1
        n_val = min(n_val, self.num_docs - 1)
        is_val = np.zeros(self.num_docs, dtype=bool)
        is_val[order[:n_val]] = True
        return self.subset(np.flatnonzero(~is_val)), self.subset(np.flatnonzero(is_val))


class PackedLoader:
    """Fixed-length rows of packed documents, as batches of torch tensors.

    The epoch-e stream is every document (BOS ... EOS) concatenated in the order of a permutation
    seeded by (seed, epoch); epochs follow each other without a gap. Global row r is the window
    stream[r*T : r*T + T + 1] (T = seq_len): inputs = row[:-1], targets = row[1:], so consecutive
    rows overlap by one token and every token (but the very first) is a target once per epoch. A global
    batch is B * world_size consecutive rows; rank k takes rows k*B ... k*B + B - 1 of it.

    Batch: tokens, targets, positions (B, T) int64; doc_ids (B, T) int64 — the document index
    within the row (0, 1, ...), positions restart at 0 where a document starts and at the row start.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, epochs: int | None = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.ds, self.T, self.B = dataset, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle, self.epochs = rank, world_size, seed, shuffle, epochs
        self.rows_per_batch = batch_size * world_size  # global batch, in rows
        self.row = 0  # next global row index; the same on every rank
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if epochs is not None and len(self) == 0:
            raise DataError(f"{dataset.path}: {dataset.num_tokens} tokens x {epochs} epoch(s) cannot fill one "
                            f"global batch of {self.rows_per_batch} rows x {seq_len + 1} tokens")

    # -- the epoch stream ----------------------------------------------------------------------

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order (D,), ends (D,)): documents of the epoch in order, and the cumulative token end
        of each in the epoch stream. The current and previous epochs are cached."""
        if epoch not in self._epoch_cache:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.ds.num_docs)
            else:
                order = np.arange(self.ds.num_docs)
            self._epoch_cache = {e: v for e, v in self._epoch_cache.items() if e == epoch - 1}
            self._epoch_cache[epoch] = (order, np.cumsum(self.ds.doc_len[order]))
        return self._epoch_cache[epoch]

    def _fill_row(self, start: int, out: np.ndarray) -> list[int]:
        """Copy stream[start : start + len(out)] into `out`; return the offsets in the row where a
        document begins (0 excluded). A loop over documents, numpy slices for the tokens."""
        N, ds = self.ds.num_tokens, self.ds
        filled, need, starts = 0, len(out), []
        while filled < need:
            epoch, offset = divmod(start + filled, N)
            order, ends = self._epoch(epoch)
            k = int(np.searchsorted(ends, offset, side="right"))  # the document holding `offset`
            within = offset - (int(ends[k]) - int(ds.doc_len[order[k]]))
            while filled < need and k < len(order):
                d = order[k]
                if within == 0 and filled > 0:
                    starts.append(filled)
                n = min(int(ds.doc_len[d]) - within, need - filled)
                a = int(ds.doc_start[d]) + within
                out[filled:filled + n] = ds.shards[ds.doc_shard[d]][a:a + n]
                filled, within, k = filled + n, 0, k + 1
        return starts

    def rows(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Global rows first ... first + count - 1 as a batch dict (the rows need not be this rank's)."""
        T = self.T
        buf = np.empty((count, T + 1), dtype=np.int64)
        doc_ids = np.zeros((count, T), dtype=np.int64)
        seg_start = np.zeros((count, T), dtype=np.int64)  # where each token's document begins in the row
        for b in range(count):
            starts = [s for s in self._fill_row((first + b) * T, buf[b]) if s < T]
            if starts:
                doc_ids[b, starts] = 1
                seg_start[b, starts] = starts
        doc_ids = np.cumsum(doc_ids, axis=1)
        positions = np.arange(T) - np.maximum.accumulate(seg_start, axis=1)
        return {
            "tokens": torch.from_numpy(np.ascontiguousarray(buf[:, :-1])),  # (B, T)
            "targets": torch.from_numpy(np.ascontiguousarray(buf[:, 1:])),  # (B, T)
            "doc_ids": torch.from_numpy(doc_ids),  # (B, T)
            "positions": torch.from_numpy(positions),  # (B, T)
        }

    # -- iteration and resume ------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches left (finite `epochs` only): a global batch is served if its last row ends
        within the last epoch."""
        if self.epochs is None:
            raise TypeError("an infinite PackedLoader (epochs=None) has no length")
        total_rows = (self.epochs * self.ds.num_tokens - 1) // self.T
        return max(0, (total_rows - self.row) // self.rows_per_batch)

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self.row * self.T // self.ds.num_tokens

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.epochs is not None and len(self) == 0:
            raise StopIteration
        batch = self.rows(self.row + self.rank * self.B, self.B)
        self.row += self.rows_per_batch
        return batch

    def state_dict(self) -> dict:
        """Where the next batch starts, in (epoch, token offset): small and JSON-serialisable."""
        epoch, offset = divmod(self.row * self.T, self.ds.num_tokens)
        return {"epoch": epoch, "offset": offset, "seed": self.seed,
                "num_tokens": self.ds.num_tokens, "num_docs": self.ds.num_docs}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict()` was taken (any batch size or world size)."""
        where = "data loader state"
        if (state.get("num_tokens"), state.get("num_docs")) != (self.ds.num_tokens, self.ds.num_docs):
            raise DataError(f"{where}: saved for a dataset of {state.get('num_tokens')} tokens / "
                            f"{state.get('num_docs')} documents, this one has {self.ds.num_tokens} / {self.ds.num_docs}")
        if state.get("seed") != self.seed:
            raise DataError(f"{where}: saved with seed {state.get('seed')}, this loader has seed {self.seed}")
        position = int(state["epoch"]) * self.ds.num_tokens + int(state["offset"])
        if position % self.T:
            raise DataError(f"{where}: position {position} is not a multiple of seq_len {self.T}")
        self.row = position // self.T
