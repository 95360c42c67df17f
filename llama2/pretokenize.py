"""Pretokenizing: read text corpora and encode them into the token shards training reads.

Two stages:
1. Readers turn inputs (.txt, .jsonl, .parquet, .arrow, Hugging Face `save_to_disk` folders,
   directories and globs of these; .txt and .jsonl may be gzipped) into documents with their origin.
2. `pretokenize` encodes documents in worker processes (BOS + text + EOS each) and writes token
   shards: `shard-NNNNN.bin` (raw uint16/uint32) + `shard-NNNNN.idx` (uint64 document offsets)
   + `manifest.json`, into a temporary folder renamed into place only when complete. The format
   is `llama2.data`'s, which reads it back.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import itertools
import json
import multiprocessing as mp
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from llama2 import progress_bars
from llama2.data import FORMAT, MANIFEST, DataError, read_json, tokenizer_file_hash, tokenizer_fingerprint
from llama2.tokenizer import Tokenizer, load_tokenizer

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard, like nanoGPT's FineWeb shards
TXT_SPLITS = ("blank", "line", "file")


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
SUPPORTED_INPUTS = ".txt, .jsonl (both optionally .gz), .parquet, .arrow, or a Hugging Face save_to_disk folder"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):  # only the line formats are worth streaming through gzip
        inner = Path(name[:-3]).suffix
        return _SUFFIXES[inner] if inner in (".txt", ".jsonl") else None
    return _SUFFIXES.get(path.suffix.lower())


def _is_hf_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _hf_sources(path: Path, split: str) -> list[Source]:
    """The Arrow files of a `save_to_disk` folder (a Dataset, or one split of a DatasetDict)."""
    if (path / "dataset_dict.json").is_file():
        splits = read_json(path / "dataset_dict.json").get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} in this DatasetDict (splits: {', '.join(splits)}); choose one with --split")
        path = path / split
    state_file = path / "state.json"
    if not state_file.is_file():
        raise DataError(f"{path}: not a Hugging Face dataset folder (no state.json)")
    files = [f["filename"] for f in read_json(state_file).get("_data_files", [])]
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
                    raise DataError(f"{path}: no supported files in this directory ({SUPPORTED_INPUTS})")
                sources += found
            elif path.is_file():
                kind = _kind(path)
                if kind is None:
                    raise DataError(f"{path}: unsupported file type; expected {SUPPORTED_INPUTS}")
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
    # Imported here, not at the top: pyarrow costs about as much start-up as numpy (~0.15 s),
    # which every pretokenize run and spawned worker would pay for .txt/.jsonl inputs too.
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
# 2. Pretokenize
# ---------------------------------------------------------------------------------------------


def _load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path` (a seam: tests substitute a tokenizer with a larger vocabulary)."""
    return load_tokenizer(path)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


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


CHUNK_CHARS, CHUNK_DOCS = 1 << 16, 1024  # a work unit: short enough to spread over workers, small to pickle


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
