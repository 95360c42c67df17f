"""Data pipeline: readers, pretokenize, the packed loader (rows, doc ids, positions, ranks, resume)."""
import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch

import llama2.pretokenize as pretok
from llama2.cli import main as cli_main
from llama2.data import DataError, PackedLoader, TokenDataset
from llama2.pretokenize import pretokenize, read_documents, write_token_dataset

WORDS = "the a llama walks over green hills and eats grass while sun shines on models tokens data".split()


def _train_sp(path: Path, vocab_size: int, seed: int) -> Path:
    rng = random.Random(seed)
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    return path


class SPTokenizer:
    """A SentencePiece tokenizer with the llama2.tokenizer interface whose ids can be shifted up."""

    def __init__(self, path, id_offset=0):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.id_offset = id_offset  # > 0 fakes a large vocabulary (ids shifted up)
        self.vocab_size = self.sp.get_piece_size() + id_offset
        self.bos_id, self.eos_id, self.pad_id = 1, 2, -1

    def encode(self, text, bos=False, eos=False):
        ids = [i + self.id_offset for i in self.sp.encode(text)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([i - self.id_offset for i in ids if i >= self.id_offset])  # <s>, </s> -> ""


@pytest.fixture(scope="session")
def sp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    return {"a": _train_sp(root / "a.model", 400, seed=0), "b": _train_sp(root / "b.model", 300, seed=1),
            "c": _train_sp(root / "c.model", 400, seed=2)}


@pytest.fixture
def tokenizer(sp_models):
    """Path of the test tokenizer; workers load it by path."""
    return sp_models["a"]


def load(path):
    return pretok._load_tokenizer(str(path))


# ---------------------------------------------------------------------------------------------
# Readers


def texts(inputs, **kw):
    return [d.text for d in read_documents(inputs, **kw)]


def test_txt_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n\r\n\n  \nthree\n\nfour\nfive")
    docs = list(read_documents(f))
    assert [d.text for d in docs] == ["one\ntwo", "three", "four\nfive"]
    assert [d.origin for d in docs] == [f"{f}:line 1", f"{f}:line 6", f"{f}:line 8"]
    assert texts(f, txt_split="line") == ["one", "two", "three", "four", "five"]
    assert texts(f, txt_split="file") == ["one\ntwo\n\n\n  \nthree\n\nfour\nfive"]
    g = tmp_path / "b.txt.gz"
    g.write_bytes(gzip.compress("α\n\nβ\n".encode()))
    assert texts(g) == ["α", "β"]
    (tmp_path / "bad.txt").write_bytes(b"ok\nfine\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: not valid UTF-8"):
        texts(tmp_path / "bad.txt")


def test_jsonl_reader(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "hello", "id": 1}\n\n{"text": "  "}\n{"text": "world", "body": "b"}\n')
    docs = list(read_documents(f))
    assert [(d.text, d.origin) for d in docs] == [("hello", f"{f}:line 1"), ("world", f"{f}:line 4")]
    g = tmp_path / "b.jsonl.gz"
    g.write_bytes(gzip.compress(b'{"body": "x"}\n{"body": "y"}\n'))
    assert texts(g, field="body") == ["x", "y"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "a"', r"bad\.jsonl:2: invalid JSON \(Expecting"),
    ('["a"]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"body": "a"}', r"bad\.jsonl:2: no field 'text' \(fields: 'body'\); choose one with --field"),
    ('{"text": 3}', r"bad\.jsonl:2: field 'text' is int, expected a string"),
])
def test_jsonl_errors(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        texts(f)


def test_parquet_reader(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", "", "b", "c"], "n": [1, 2, 3, 4]}), f, row_group_size=2)
    docs = list(read_documents(f))
    assert [(d.text, d.origin) for d in docs] == [("a", f"{f}:row 0"), ("b", f"{f}:row 2"), ("c", f"{f}:row 3")]
    with pytest.raises(DataError, match=r"a\.parquet: no column 'body' \(columns: text, n\)"):
        texts(f, field="body")
    with pytest.raises(DataError, match=r"a\.parquet: column 'n' has type int64, expected strings"):
        texts(f, field="n")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet:row 1: field 'text' is null"):
        texts(tmp_path / "null.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read as parquet"):
        texts(tmp_path / "junk.parquet")


def _save_to_disk(folder: Path, rows: list[str], files: int = 2) -> None:
    """The on-disk layout of `datasets.Dataset.save_to_disk`: Arrow IPC *stream* shards + JSON."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    per = -(-len(rows) // files)
    for i, name in enumerate(names):
        table = pa.table({"text": rows[i * per:(i + 1) * per], "label": list(range(len(rows[i * per:(i + 1) * per])))})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=2)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "x", "_split": None}))


def test_hf_save_to_disk(tmp_path):
    _save_to_disk(tmp_path / "ds", ["d0", "d1", "d2", "d3", "d4"])
    docs = list(read_documents(tmp_path / "ds"))
    assert [d.text for d in docs] == ["d0", "d1", "d2", "d3", "d4"]
    assert docs[4].origin == f"{tmp_path / 'ds' / 'data-00001-of-00002.arrow'}:row 1"
    _save_to_disk(tmp_path / "dd" / "train", ["t0", "t1"], files=1)
    _save_to_disk(tmp_path / "dd" / "test", ["e0"], files=1)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert texts(tmp_path / "dd") == ["t0", "t1"]
    assert texts(tmp_path / "dd", split="test") == ["e0"]
    with pytest.raises(DataError, match=r"dd: no split 'valid' in this DatasetDict \(splits: train, test\)"):
        texts(tmp_path / "dd", split="valid")
    # a plain Arrow *file* (not stream) is read too
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": ["x", "y"]}))
    assert texts(tmp_path / "f.arrow") == ["x", "y"]


def test_inputs_dirs_globs_and_errors(tmp_path):
    (tmp_path / "c" / "sub").mkdir(parents=True)
    (tmp_path / "c" / "b.txt").write_text("B")
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "A"}\n')
    (tmp_path / "c" / "sub" / "c.txt").write_text("C")
    (tmp_path / "c" / "README.md").write_text("skipped: not a corpus format")
    (tmp_path / "c" / ".hidden.txt").write_text("skipped: hidden")
    _save_to_disk(tmp_path / "c" / "hf", ["H"], files=1)
    assert texts(tmp_path / "c") == ["A", "B", "H", "C"]  # sorted by path
    assert texts(str(tmp_path / "c" / "**" / "*.txt")) == ["B", "C"]
    with pytest.raises(DataError, match=r"README\.md: unsupported file type; expected \.txt"):
        texts(tmp_path / "c" / "README.md")
    with pytest.raises(DataError, match=r"nope\.txt: no such file or directory"):
        texts(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"\*\.zzz: the pattern matches no files"):
        texts(str(tmp_path / "*.zzz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no supported files in this directory"):
        texts(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Pretokenize


def _corpus(root: Path) -> list[str]:
    """Three files in three formats; returns the documents in corpus order."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) + f" {i}" for i in range(300)]
    root.mkdir()
    (root / "a.txt").write_text("\n\n".join(docs[:100]) + "\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[100:200]))
    pq.write_table(pa.table({"text": docs[200:]}), root / "c.parquet")
    return docs


def test_pretokenize_deterministic_and_decodes(tmp_path, tokenizer, monkeypatch):
    docs = _corpus(tmp_path / "corpus")
    monkeypatch.setattr(pretok, "CHUNK_CHARS", 1000)  # ~40 chunks, so both workers take turns
    m1 = pretokenize([tmp_path / "corpus"], tokenizer, tmp_path / "w1", workers=1, shard_tokens=2000, progress=False)
    m2 = pretokenize([tmp_path / "corpus"], tokenizer, tmp_path / "w2", workers=2, shard_tokens=2000, progress=False)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir()) and "manifest.json" in names
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert m1 == m2
    tok = load(tokenizer)
    assert m1["dtype"] == "uint16" and m1["tokenizer"]["vocab_size"] == tok.vocab_size == 400
    assert (m1["tokenizer"]["bos_id"], m1["tokenizer"]["eos_id"]) == (1, 2)
    assert m1["num_docs"] == 300 and [s["num_docs"] for s in m1["sources"]] == [100, 100, 100]
    assert len(m1["shards"]) > 2 and sum(s["num_tokens"] for s in m1["shards"]) == m1["num_tokens"]
    assert all(s["num_tokens"] < 2000 + 200 for s in m1["shards"])  # a shard closes once it reaches 2000
    ds = TokenDataset.open(tmp_path / "w1", tokenizer=tokenizer)
    assert ds.num_tokens == m1["num_tokens"] and len(ds) == 300
    for i in (0, 99, 100, 250, 299):
        ids = ds.document(i).tolist()
        assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tok.encode(docs[i])
        assert tok.decode(ids) == docs[i]
    assert not list(tmp_path.glob(".w*"))  # no temporary folders left behind


def test_token_dtype_by_vocab_size(tmp_path, sp_models, monkeypatch):
    assert pretok.token_dtype(32000) == np.uint16 and pretok.token_dtype(65536) == np.uint16
    assert pretok.token_dtype(65537) == np.uint32 and pretok.token_dtype(128256) == np.uint32
    monkeypatch.setattr(pretok, "_load_tokenizer", lambda p: SPTokenizer(p, id_offset=70000))
    (tmp_path / "a.txt").write_text("the llama\n\nwalks over hills")
    m = pretokenize([tmp_path / "a.txt"], sp_models["a"], tmp_path / "out", workers=2, progress=False)
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 70400
    ds = TokenDataset.open(tmp_path / "out")
    ids = ds.document(1).tolist()
    assert ids[0] == 1 and ids[-1] == 2 and min(ids[1:-1]) >= 70000
    assert SPTokenizer(sp_models["a"], 70000).decode(ids) == "walks over hills"


def test_pretokenize_errors_leave_nothing(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("fine text\n")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"b\.jsonl:2: no field 'text'"):
            pretokenize([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer, tmp_path / "out", workers=workers, progress=False)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"empty corpus: no documents in .*blank\.txt"):
        pretokenize([tmp_path / "blank.txt"], tokenizer, tmp_path / "out", progress=False)
    pretokenize([tmp_path / "a.txt"], tokenizer, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"out: already exists and is not empty; pass --overwrite"):
        pretokenize([tmp_path / "a.txt"], tokenizer, tmp_path / "out", progress=False)
    m = pretokenize([tmp_path / "a.txt"] * 2, tokenizer, tmp_path / "out", overwrite=True, progress=False)
    assert m["num_docs"] == 2 and TokenDataset.open(tmp_path / "out").num_docs == 2


def test_progress_bar_and_its_off_switch(tmp_path, tokenizer, monkeypatch, capfd):
    """pretokenize draws a bar on stderr, and none with LLAMA2_NO_PROGRESS=1 (what CI and logs set)."""
    (tmp_path / "a.txt").write_text("some text\n\nmore text\n")
    monkeypatch.delenv("LLAMA2_NO_PROGRESS", raising=False)
    pretokenize([tmp_path / "a.txt"], tokenizer, tmp_path / "on", workers=1)
    assert "pretokenize" in capfd.readouterr().err
    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    pretokenize([tmp_path / "a.txt"], tokenizer, tmp_path / "off", workers=1)
    assert "pretokenize" not in capfd.readouterr().err


def test_interrupted_run_leaves_no_dataset(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "a.txt").write_text("\n\n".join(f"document {i}" for i in range(50)))
    monkeypatch.setattr(pretok, "CHUNK_DOCS", 10)
    seen, add = [], pretok._ShardWriter.add

    def add_then_die(self, tokens, lengths):
        add(self, tokens, lengths)
        seen.append(((tmp_path / "out").exists(), len(list(tmp_path.glob(".out.partial-*")))))
        if len(seen) == 2:
            raise KeyboardInterrupt  # as if killed while writing

    monkeypatch.setattr(pretok._ShardWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretokenize([tmp_path / "a.txt"], tokenizer, tmp_path / "out", workers=2, progress=False)
    assert seen == [(False, 1), (False, 1)]  # while writing, only the hidden partial folder exists
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(DataError, match="not a pretokenized dataset"):
        TokenDataset.open(tmp_path / "out")


def test_cli(tmp_path, tokenizer, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "the llama"}\n{"text": "eats grass"}\n')
    args = ["data", "pretokenize", "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli_main(args + ["--workers", "1", str(tmp_path / "a.jsonl")]) == 0
    assert "2 documents, 1 shard(s), uint16" in capsys.readouterr().out
    assert cli_main(["data", "info", str(tmp_path / "out")]) == 0
    assert "2 documents" in capsys.readouterr().out
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n')
    assert cli_main(args + ["--overwrite", str(tmp_path / "b.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama2 data: error: ") and "b.jsonl:2: invalid JSON" in err and "\n" not in err
    assert cli_main(["data", "frobnicate"]) == 2


# ---------------------------------------------------------------------------------------------
# Loading and packing


def test_open_refuses_incomplete_or_corrupt(tmp_path):
    write_token_dataset(tmp_path / "ds", [[1, 5, 2], [1, 6, 7, 2]], vocab_size=10)
    assert TokenDataset.open(tmp_path / "ds").num_tokens == 7
    with pytest.raises(DataError, match=r"nothing: not a pretokenized dataset: no manifest\.json"):
        TokenDataset.open(tmp_path / "nothing")
    shard = tmp_path / "ds" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard-00000\.bin: 12 bytes, expected 7 uint16 tokens"):
        TokenDataset.open(tmp_path / "ds")


def test_vocab_mismatch_is_refused(tmp_path, tokenizer, sp_models):
    (tmp_path / "a.txt").write_text("the llama eats grass")
    pretokenize([tmp_path / "a.txt"], tokenizer, tmp_path / "out", progress=False)
    TokenDataset.open(tmp_path / "out", tokenizer=tokenizer)  # same file
    copy = tmp_path / "elsewhere" / "tok.model"
    copy.parent.mkdir()
    shutil.copy(tokenizer, copy)
    TokenDataset.open(tmp_path / "out", tokenizer=copy)  # same content at another path
    TokenDataset.open(tmp_path / "out", tokenizer=load(tokenizer))  # a loaded tokenizer
    with pytest.raises(DataError, match=r"vocabulary mismatch: .*out was tokenized with .*a\.model "
                                        r"\(vocab_size 400\) but the tokenizer .*b\.model has vocab_size 300"):
        TokenDataset.open(tmp_path / "out", tokenizer=sp_models["b"])
    with pytest.raises(DataError, match=r"vocabulary mismatch: .*\(content hash [0-9a-f]{12}\) but the tokenizer "
                                        r".*c\.model encodes differently"):
        TokenDataset.open(tmp_path / "out", tokenizer=sp_models["c"])  # same size, other vocabulary


def _hand_dataset(tmp_path):
    # stream (no shuffle): 1 10 11 2 | 1 20 2 | 1 30 31 32 33 2   (13 tokens)
    write_token_dataset(tmp_path / "hand", [[1, 10, 11, 2], [1, 20, 2], [1, 30, 31, 32, 33, 2]], vocab_size=64)
    return TokenDataset.open(tmp_path / "hand")


def test_packing_hand_checked(tmp_path):
    loader = PackedLoader(_hand_dataset(tmp_path), seq_len=4, batch_size=1, shuffle=False, epochs=1)
    assert len(loader) == 3  # rows of 5 tokens overlapping by one: (13 - 1) // 4
    got = [{k: v[0].tolist() for k, v in b.items()} for b in loader]
    assert got == [
        {"tokens": [1, 10, 11, 2], "targets": [10, 11, 2, 1], "doc_ids": [0, 0, 0, 0], "positions": [0, 1, 2, 3]},
        {"tokens": [1, 20, 2, 1], "targets": [20, 2, 1, 30], "doc_ids": [0, 0, 0, 1], "positions": [0, 1, 2, 0]},
        # a row that starts mid-document starts at position 0
        {"tokens": [30, 31, 32, 33], "targets": [31, 32, 33, 2], "doc_ids": [0, 0, 0, 0], "positions": [0, 1, 2, 3]},
    ]
    # without an epoch limit the next epoch's stream follows at once
    endless = PackedLoader(_hand_dataset(tmp_path), seq_len=4, batch_size=2, shuffle=False)
    next(endless)
    b = next(endless)
    assert b["tokens"].tolist() == [[30, 31, 32, 33], [2, 1, 10, 11]]
    assert b["doc_ids"][1].tolist() == [0, 1, 1, 1] and b["positions"][1].tolist() == [0, 0, 1, 2]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in b.items()} == {k: (torch.int64, (2, 4)) for k in b}


def _random_dataset(tmp_path, n_docs=40, seed=0):
    """Documents BOS, 100 + i, filler..., EOS: BOS marks every start, the 2nd token names the doc."""
    rng = np.random.default_rng(seed)
    docs = [[1, 100 + i] + rng.integers(3, 100, size=rng.integers(0, 30)).tolist() + [2] for i in range(n_docs)]
    write_token_dataset(tmp_path / f"rand{seed}", docs, vocab_size=1000, shard_tokens=100)
    return TokenDataset.open(tmp_path / f"rand{seed}"), docs


def _stream(batches):
    """The token stream that consecutive rows cover (they overlap by one token)."""
    tokens = torch.cat([b["tokens"] for b in batches]).flatten()
    return torch.cat([tokens, batches[-1]["targets"][-1, -1:]]).tolist()


def test_every_document_once_per_epoch_in_order(tmp_path):
    ds, docs = _random_dataset(tmp_path)
    assert len(ds.shards) > 3  # documents are read across shard files
    T, B = 16, 2
    batches = list(PackedLoader(ds, T, B, seed=3, epochs=1))
    assert len(batches) == (ds.num_tokens - 1) // T // B
    for b in batches:
        assert {k: tuple(v.shape) for k, v in b.items()} == {k: (B, T) for k in b}  # full rows, no padding
        assert torch.equal(b["tokens"][:, 1:], b["targets"][:, :-1])  # targets = inputs shifted by one
        bos = b["tokens"] == 1
        # positions restart exactly where a document (BOS) starts, and at the row start
        assert torch.equal((b["positions"] == 0)[:, 1:], bos[:, 1:]) and (b["positions"][:, 0] == 0).all()
        assert torch.equal(b["doc_ids"], torch.cumsum(bos.long(), 1) - bos[:, :1].long())
        assert torch.equal(b["positions"][:, 1:][~bos[:, 1:]], b["positions"][:, :-1][~bos[:, 1:]] + 1)
    stream = _stream(batches)
    order = [stream[i + 1] - 100 for i, t in enumerate(stream[:-1]) if t == 1]
    assert len(set(order)) == len(order)  # no document twice
    assert stream == sum((docs[d] for d in order), [])[:len(stream)]  # whole documents, in order
    assert ds.num_tokens - len(stream) < B * T  # only a tail short of one global batch is left
    # the order is the epoch's shuffle; another epoch or seed shuffles differently, the same seed alike
    epoch0 = PackedLoader(ds, T, B, seed=3)._epoch(0)[0].tolist()
    assert order == epoch0[:len(order)] and order != sorted(order)
    assert PackedLoader(ds, T, B, seed=3)._epoch(1)[0].tolist() != epoch0
    assert PackedLoader(ds, T, B, seed=4)._epoch(0)[0].tolist() != epoch0


def test_ranks_split_rows_disjointly(tmp_path):
    ds, _ = _random_dataset(tmp_path)
    T, B = 8, 2
    single = list(PackedLoader(ds, T, 2 * B, seed=1, epochs=2))
    ranks = [list(PackedLoader(ds, T, B, rank=r, world_size=2, seed=1, epochs=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) > 0
    for whole, r0, r1 in zip(single, *ranks):
        for key in whole:
            assert torch.equal(whole[key], torch.cat([r0[key], r1[key]])), key
    # within an epoch the ranks' rows are disjoint and together are the single process's rows
    ranks = [list(PackedLoader(ds, T, B, rank=r, world_size=2, seed=1, epochs=1)) for r in range(2)]
    single = list(PackedLoader(ds, T, 2 * B, seed=1, epochs=1))
    rows = [[tuple(row) for b in r for row in b["tokens"].tolist()] for r in ranks]
    assert set(rows[0]).isdisjoint(rows[1]) and len(set(rows[0] + rows[1])) == len(rows[0] + rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(tuple(row) for b in single for row in b["tokens"].tolist())


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resume_mid_epoch_and_across_epochs(tmp_path):
    ds, _ = _random_dataset(tmp_path, n_docs=12, seed=5)
    T, B = 8, 2
    per_epoch = (ds.num_tokens - 1) // (T * B)
    reference = PackedLoader(ds, T, B, seed=7)
    expected = [next(reference) for _ in range(3 * per_epoch)]
    for k in (0, 1, per_epoch - 1, per_epoch + 2):
        first = PackedLoader(ds, T, B, seed=7)
        for _ in range(k):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as JSON
        assert set(state) == {"epoch", "offset", "seed", "num_tokens", "num_docs"}
        resumed = PackedLoader(ds, T, B, seed=7)
        resumed.load_state_dict(state)
        assert all(_equal(next(resumed), expected[i]) for i in range(k, k + per_epoch + 2))  # over an epoch end
    assert state["epoch"] == 1
    # a world of 2 ranks x B/2 resumes a 1-rank run's position
    halves = [PackedLoader(ds, T, B // 2, rank=r, world_size=2, seed=7) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    b0, b1 = next(halves[0]), next(halves[1])
    assert _equal({k: torch.cat([b0[k], b1[k]]) for k in b0}, expected[per_epoch + 2])
    with pytest.raises(DataError, match="saved with seed 7, this loader has seed 8"):
        PackedLoader(ds, T, B, seed=8).load_state_dict(state)
    other, _ = _random_dataset(tmp_path, n_docs=13, seed=6)
    with pytest.raises(DataError, match="saved for a dataset of"):
        PackedLoader(other, T, B, seed=7).load_state_dict(state)
    # a finite loader stops after its epochs; a resumed one serves only what is left
    finite = PackedLoader(ds, T, B, seed=7, epochs=2)
    finite.load_state_dict(state)
    assert len(finite) == len(list(finite)) == (2 * ds.num_tokens - 1) // T // B - (per_epoch + 2)


def test_train_val_split(tmp_path):
    ds, _ = _random_dataset(tmp_path, n_docs=200)
    train, val = ds.split(0.1, seed=0)
    docs = lambda d: {tuple(d.document(i).tolist()) for i in range(len(d))}  # noqa: E731
    assert docs(train).isdisjoint(docs(val)) and docs(train) | docs(val) == docs(ds)
    assert len(train) + len(val) == len(ds) and train.num_tokens + val.num_tokens == ds.num_tokens
    assert 0.1 <= val.num_tokens / ds.num_tokens < 0.1 + 40 / ds.num_tokens  # one document over at most
    again = ds.split(0.1, seed=0)[1]
    assert docs(again) == docs(val) and docs(ds.split(0.1, seed=1)[1]) != docs(val)
    batches = list(PackedLoader(val, 8, 2, shuffle=False, epochs=1))  # an evaluation pass
    assert len(batches) == (val.num_tokens - 1) // 16
    with pytest.raises(DataError, match="cannot fill one global batch"):
        PackedLoader(val, 512, 8, epochs=1)
