"""Pretraining data: read text corpora, pretokenize them into memory-mapped shards, and pack the
tokens into fixed-length rows for training (Llama 2 §2.1: "sequences packed to the full context").

Three stages, top to bottom:
1. Readers turn inputs (.txt, .jsonl, .parquet, .arrow, Hugging Face `save_to_disk` folders,
   directories and globs of these; .txt and .jsonl may be gzipped) into documents with their origin.
2. `pretokenize` encodes documents in worker processes (BOS + text + EOS each) and writes token
   shards: `shard-NNNNN.bin` (raw uint16/uint32) + `shard-NNNNN.idx` (uint64 document offsets)
   + `manifest.json`, into a temporary folder renamed into place only when complete.
3. `TokenDataset` memory-maps the shards; `PackedLoader` cuts the (per-epoch shuffled) stream of
   documents into rows of seq_len + 1 tokens, sharded by rank and resumable from a small state dict.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from llama2 import progress_bars

MANIFEST = "manifest.json"
FORMAT = "llama2-tokens/1"
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard, like nanoGPT's FineWeb shards
TXT_SPLITS = ("blank", "line", "file")


class DataError(ValueError):
    """Bad input data; the message names the file, the line (1-based) or row (0-based), and the field."""


# ---------------------------------------------------------------------------------------------
# 1. Readers
# ---------------------------------------------------------------------------------------------


class Document(NamedTuple):
    text: str
    origin: str  # "path:line 12" for text formats, "path:row 3" for columnar ones


class Source(NamedTuple):
    path: Path
    kind: str  # "txt" | "jsonl" | "parquet" | "arrow"


_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
_SUPPORTED = ".txt, .jsonl (both optionally .gz), .parquet, .arrow, or a Hugging Face save_to_disk folder"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):  # only the line formats are worth streaming through gzip
        inner = Path(name[:-3]).suffix
        return _SUFFIXES[inner] if inner in (".txt", ".jsonl") else None
    return _SUFFIXES.get(path.suffix.lower())


def _is_hf_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def _hf_sources(path: Path, split: str) -> list[Source]:
    """The Arrow files of a `save_to_disk` folder (a Dataset, or one split of a DatasetDict)."""
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} in this DatasetDict (splits: {', '.join(splits)}); choose one with --split")
        path = path / split
    state_file = path / "state.json"
    if not state_file.is_file():
        raise DataError(f"{path}: not a Hugging Face dataset folder (no state.json)")
    files = [f["filename"] for f in _read_json(state_file).get("_data_files", [])]
    if not files:
        raise DataError(f"{state_file}: lists no data files (_data_files)")
    return [Source(path / f, "arrow") for f in files]


def _walk(path: Path, split: str) -> list[Source]:
    """Supported files under a directory, sorted by path so the corpus order is reproducible."""
    found: list[Source] = []
    for root, dirs, files in os.walk(path):
        root_path = Path(root)
        if _is_hf_dataset(root_path):
            found += _hf_sources(root_path, split)
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            kind = _kind(root_path / name)
            if kind and not name.startswith("."):
                found.append(Source(root_path / name, kind))
    found.sort(key=lambda s: str(s.path))
    return found


def resolve_inputs(inputs: Sequence[str | os.PathLike], split: str = "train") -> list[Source]:
    """Expand files, directories and globs into the ordered list of files to read."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources: list[Source] = []
    for item in inputs:
        text = str(item)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"{text}: the pattern matches no files")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(text)]
        for path in paths:
            if path.is_dir():
                found = _hf_sources(path, split) if _is_hf_dataset(path) else _walk(path, split)
                if not found:
                    raise DataError(f"{path}: no supported files in this directory ({_SUPPORTED})")
                sources += found
            elif path.is_file():
                kind = _kind(path)
                if kind is None:
                    raise DataError(f"{path}: unsupported file type; expected {_SUPPORTED}")
                sources.append(Source(path, kind))
            else:
                raise DataError(f"{path}: no such file or directory")
    if not sources:
        raise DataError("no input files given")
    return sources


def _open_binary(path: Path):
    try:
        return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line ending), decoding UTF-8 line by line so a bad
    byte is reported on its own line."""
    with _open_binary(path) as f:
        try:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    raw = raw[3:]
                try:
                    yield n, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        except (OSError, EOFError) as e:  # e.g. a truncated or corrupt .gz
            raise DataError(f"{path}: cannot read ({e})") from None


def _read_txt(path: Path, txt_split: str) -> Iterator[Document]:
    """Plain text. `blank` (default): documents are separated by blank lines; `line`: one document
    per line; `file`: the whole file is one document."""
    if txt_split == "line":
        for n, line in _lines(path):
            if line.strip():
                yield Document(line, f"{path}:line {n}")
        return
    block: list[str] = []
    first = 0
    for n, line in _lines(path):
        if txt_split == "blank" and not line.strip():
            if block:
                yield Document("\n".join(block), f"{path}:line {first}")
            block = []
            continue
        if not block:
            first = n
        block.append(line)
    text = "\n".join(block)
    if text.strip():
        yield Document(text, f"{path}:line {first}")


def _read_jsonl(path: Path, field: str) -> Iterator[Document]:
    """One JSON object per line with a string field (default `text`); blank lines are skipped."""
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            keys = ", ".join(map(repr, list(record)[:10])) or "none"
            raise DataError(f"{path}:{n}: no field {field!r} (fields: {keys}); choose one with --field")
        text = record[field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{n}: field {field!r} is {type(text).__name__}, expected a string")
        if text.strip():
            yield Document(text, f"{path}:line {n}")


def _read_columnar(path: Path, kind: str, field: str) -> Iterator[Document]:
    """A string column of a Parquet file or an Arrow IPC file (the files of `save_to_disk`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            pf = pq.ParquetFile(path)
            schema, batches = pf.schema_arrow, None
        else:
            try:  # `datasets` writes the streaming format; plain Arrow files use the file format
                reader = pa.ipc.open_stream(pa.memory_map(str(path)))
                batches = iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(pa.memory_map(str(path)))
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as {kind} ({e})") from None
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); choose one with --field")
    column_type = schema.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or getattr(pa.types, "is_string_view", lambda t: False)(column_type)):
        raise DataError(f"{path}: column {field!r} has type {column_type}, expected strings")
    if batches is None:
        batches = pf.iter_batches(batch_size=4096, columns=[field])
    row = 0
    try:
        for batch in batches:
            for text in batch.column(batch.schema.get_field_index(field)).to_pylist():
                if text is None:
                    raise DataError(f"{path}:row {row}: field {field!r} is null")
                if text.strip():
                    yield Document(text, f"{path}:row {row}")
                row += 1
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}:row {row}: cannot read ({e})") from None


def read_source(source: Source, field: str = "text", txt_split: str = "blank") -> Iterator[Document]:
    """Documents of one file, in file order. Empty (whitespace-only) documents are skipped."""
    if source.kind == "txt":
        if txt_split not in TXT_SPLITS:
            raise ValueError(f"txt_split must be one of {', '.join(TXT_SPLITS)}, got {txt_split!r}")
        return _read_txt(source.path, txt_split)
    if source.kind == "jsonl":
        return _read_jsonl(source.path, field)
    return _read_columnar(source.path, source.kind, field)


def read_documents(inputs, field: str = "text", txt_split: str = "blank", split: str = "train") -> Iterator[Document]:
    """Every document of every input, in order (see `resolve_inputs` and `read_source`)."""
    for source in resolve_inputs(inputs, split):
        yield from read_source(source, field, txt_split)


# ---------------------------------------------------------------------------------------------
# Tokenizer identity: which tokenizer made a dataset, and is it the one training will use?
# ---------------------------------------------------------------------------------------------

# Exercises digits, whitespace runs, code, accents, CJK and emoji (byte fallback).
_PROBE = "Llama 2: 70B params, 2.0T tokens.\n\n\tdef f(x):  return x**2  # naïve café 東京 🦙 </s> [INST]"
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _load_tokenizer(path):
    from llama2.tokenizer import load_tokenizer  # lazily: worker processes import only what they use

    return load_tokenizer(path)


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


def tokenizer_fingerprint(tok) -> str:
    """sha256 of what the tokenizer does (every id's text, a probe's encoding, special ids): equal
    for the same vocabulary saved as tokenizer.model, tokenizer.json or GGUF."""
    h = hashlib.sha256(json.dumps([tok.vocab_size, tok.bos_id, tok.eos_id, tok.encode(_PROBE)]).encode())
    for i in range(tok.vocab_size):
        h.update(tok.decode([i]).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------------------------
# 2. Pretokenize
# ---------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends documents to shard-NNNNN.bin (tokens) + .idx (uint64 offsets, num_docs + 1).
    A shard is closed before the first document that would start at or past `shard_tokens`, so
    documents never straddle shards."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._lengths: list[np.ndarray] = []
        self._tokens = 0

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        lengths = np.concatenate(self._lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64)
        offsets.tofile(self.out_dir / self.shards[-1]["offsets"])
        self.shards[-1].update(num_tokens=int(self._tokens), num_docs=int(len(lengths)))
        self._file, self._lengths, self._tokens = None, [], 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: (sum(lengths),) the concatenated documents of one chunk."""
        starts = np.cumsum(lengths) - lengths  # (n_docs,) chunk-relative start of each doc
        done = 0
        while done < len(lengths):
            if self._file is None:
                name = f"shard-{len(self.shards):05d}"
                self.shards.append({"tokens": f"{name}.bin", "offsets": f"{name}.idx"})
                self._file = open(self.out_dir / f"{name}.bin", "wb")
            # documents [done, k) start before this shard is full (k > done while it has room)
            k = int(np.searchsorted(starts, starts[done] + self.shard_tokens - self._tokens, side="left"))
            if k <= done:
                self._close()
                continue
            lo, hi = int(starts[done]), int(starts[k - 1] + lengths[k - 1])
            tokens[lo:hi].astype(self.dtype, copy=False).tofile(self._file)
            self._lengths.append(lengths[done:k])
            self._tokens += hi - lo
            done = k

    def close(self) -> list[dict]:
        self._close()
        return self.shards


_worker_tokenizer: tuple[str, object] | None = None


def _encode_texts(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """BOS + text + EOS per document -> (tokens (total,) uint32, lengths (n_docs,) int64)."""
    ids = [tok.encode(t, bos=True, eos=True) for t in texts]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 32):
        raise ValueError(f"the tokenizer returned an id outside [0, 2**32): {tokens.max()}")
    return tokens.astype(np.uint32), lengths


def _encode_in_worker(args: tuple[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Runs in a worker process: load the tokenizer from its path once, then encode a chunk."""
    global _worker_tokenizer
    path, texts = args
    if _worker_tokenizer is None or _worker_tokenizer[0] != path:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
        _worker_tokenizer = (path, _load_tokenizer(path))
    return _encode_texts(_worker_tokenizer[1], texts)


CHUNK_CHARS, CHUNK_DOCS = 1 << 16, 1024  # a work unit: ~10 ms of tokenizing, small to pickle


def _chunks(sources: list[Source], field: str, txt_split: str) -> Iterator[tuple[int, list[str]]]:
    """(source index, texts): consecutive documents of one source grouped into work units. The
    grouping does not depend on the number of workers and results are consumed in submission
    order, so the output is the same for any worker count."""
    for i, source in enumerate(sources):
        chunk, chars = [], 0
        for doc in read_source(source, field, txt_split):
            chunk.append(doc.text)
            chars += len(doc.text)
            if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
                yield i, chunk
                chunk, chars = [], 0
        if chunk:
            yield i, chunk


@contextlib.contextmanager
def _worker_pool(workers: int):
    """A process pool for `workers` > 1, else None (encode inline). Started before any progress
    bar thread exists, since fork copies only the calling thread."""
    if workers <= 1:
        yield None
        return
    # fork is cheap and keeps the parent's imports; spawn is the portable fallback
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        yield pool


def _encoded_chunks(chunks: Iterator[tuple[int, list[str]]], tok, tokenizer_path: str, pool, workers: int):
    """(source index, n_docs, (tokens, lengths)) per chunk, in order: inline without a pool, else
    with a bounded window of chunks in flight (Pool.imap would read the whole corpus ahead)."""
    if pool is None:
        for i, texts in chunks:
            yield i, len(texts), _encode_texts(tok, texts)
        return
    pending: deque = deque()
    window = 4 * workers  # enough to keep every worker busy while the oldest is collected
    for i, texts in chunks:
        pending.append((i, len(texts), pool.apply_async(_encode_in_worker, ((tokenizer_path, texts),))))
        if len(pending) >= window:
            i, n, result = pending.popleft()
            yield i, n, result.get()
    while pending:
        i, n, result = pending.popleft()
        yield i, n, result.get()


def pretokenize(
    inputs,
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    field: str = "text",
    txt_split: str = "blank",
    split: str = "train",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus into `out_dir` (shards + manifest.json); returns the manifest.

    Each document is stored as BOS + tokens + EOS. The output is written to a temporary sibling
    folder and renamed into place at the end, so an interrupted run leaves no dataset behind.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DataError(f"{out_dir}: already exists and is not empty; pass --overwrite to replace it")
    sources = resolve_inputs(inputs, split)
    tokenizer_path = str(tokenizer_path)
    tok = _load_tokenizer(tokenizer_path)  # in this process too: fail early, read vocab and ids
    dtype = token_dtype(tok.vocab_size)

    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        stats = [{"path": str(s.path), "num_docs": 0, "num_tokens": 0} for s in sources]
        total_tokens = 0
        with _worker_pool(workers) as pool, tqdm(unit=" docs", unit_scale=True, desc="pretokenize",
                                                 disable=not (progress and progress_bars()), dynamic_ncols=True) as bar:
            chunks = _chunks(sources, field, txt_split)
            for i, n, (tokens, lengths) in _encoded_chunks(chunks, tok, tokenizer_path, pool, workers):
                if tokens.size and int(tokens.max()) >= tok.vocab_size:
                    raise ValueError(f"{sources[i].path}: token id {int(tokens.max())} >= vocab_size {tok.vocab_size}")
                writer.add(tokens, lengths)
                stats[i]["num_docs"] += n
                stats[i]["num_tokens"] += int(tokens.size)
                total_tokens += int(tokens.size)
                bar.update(n)
                bar.set_postfix(file=f"{i + 1}/{len(sources)}", tokens=f"{total_tokens:,}", refresh=False)
        shards = writer.close()
        num_docs = sum(s["num_docs"] for s in stats)
        if num_docs == 0:
            raise DataError(f"empty corpus: no documents in {', '.join(str(s.path) for s in sources)}"
                            + (f" (field {field!r})" if any(s.kind != "txt" for s in sources) else ""))
        manifest = {
            "format": FORMAT,
            "tokenizer": {
                "path": tokenizer_path,
                "sha256": tokenizer_file_hash(tokenizer_path),
                "fingerprint": tokenizer_fingerprint(tok),
                "vocab_size": int(tok.vocab_size),
                "bos_id": int(tok.bos_id),
                "eos_id": int(tok.eos_id),
            },
            "dtype": dtype.name,
            "documents": "bos + text + eos",
            "options": {"field": field, "txt_split": txt_split, "split": split},
            "num_tokens": total_tokens,
            "num_docs": num_docs,
            "shards": shards,
            "sources": stats,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        # the rename is the commit point; a replaced dataset is moved aside first, then deleted
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():
            old.unlink()
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_token_dataset(out_dir, documents: Iterable[Sequence[int]], *, vocab_size: int, bos_id: int = 1,
                        eos_id: int = 2, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Write already-tokenized documents (stored as given) as a dataset: for tests and generators."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = [np.asarray(d, dtype=np.int64) for d in documents]
    if not docs or not any(len(d) for d in docs):
        raise DataError(f"{out_dir}: empty corpus: no tokens to write")
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate(docs)
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise DataError(f"{out_dir}: token ids must lie in [0, {vocab_size}), got {tokens.min()}..{tokens.max()}")
    writer = _ShardWriter(out_dir, token_dtype(vocab_size), shard_tokens)
    writer.add(tokens, lengths)
    manifest = {
        "format": FORMAT,
        "tokenizer": {"path": None, "sha256": None, "fingerprint": None, "vocab_size": vocab_size,
                      "bos_id": bos_id, "eos_id": eos_id},
        "dtype": token_dtype(vocab_size).name,
        "num_tokens": int(lengths.sum()),
        "num_docs": len(docs),
        "shards": writer.close(),
        "sources": [],
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------
# 3. Loading: memory-mapped dataset and the packed, sharded, resumable loader
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
        manifest = _read_json(manifest_file)
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
        tok = _load_tokenizer(str(path)) if path is not None else tokenizer
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


# ---------------------------------------------------------------------------------------------
# CLI: `llama2 data <subcommand>`
# ---------------------------------------------------------------------------------------------


def pretokenize_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 data pretokenize", description=(
        "Tokenize text into memory-mapped token shards for pretraining (each document: BOS + text + EOS). "
        f"Inputs: {_SUPPORTED}; directories and globs of these."))
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
