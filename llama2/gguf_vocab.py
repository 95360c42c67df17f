"""Tokenizers rebuilt from the vocabulary a GGUF file embeds as metadata (`tokenizer.ggml.*`).

llama.cpp stores a model's tokenizer as lists (tokens, token types, scores or merges) plus a few
settings; this module turns them back into a `tokenizers.Tokenizer` that encodes like the
original: GPT-2-style byte-level BPE (`tokenizer.ggml.model == "gpt2"`, e.g. SmolLM2) and
SentencePiece BPE with byte fallback (`"llama"`, Llama 2's own GGUFs).

`gguf` is imported inside the two functions that read a file: it brings numpy with it, which
would more than double the import time of `llama2.tokenizer` (and of `llama2 tokenize`) for
users whose tokenizer is not a GGUF.
"""
from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

# llama.cpp's token types (`tokenizer.ggml.token_type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# How text is cut into words before byte-level BPE. GPT-2's rule (contractions, letters, numbers,
# other symbols, each with one leading space) is built into `tokenizers`' ByteLevel pre-tokenizer.
# Llama 3 groups digits by three and keeps newlines apart; Qwen2 splits digits one by one.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> how text is split before byte-level BPE, following llama.cpp's table.
# "smollm" (and the StarCoder family) isolate every numeric character, then split like GPT-2.
_GPT2_PRE = {"gpt2", "mpt", "olmo"}
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "falcon3"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}
GGUF_PRE_TYPES = sorted(_GPT2_PRE | _DIGITS_PRE | _LLAMA3_PRE | _QWEN2_PRE)


def _gguf_metadata(reader) -> dict:
    """The tokenizer.* metadata of a GGUF file as plain Python values."""
    from gguf import GGUFValueType  # see the module docstring: numpy comes with it

    meta = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        # Each value lives in `field.parts[i]` for i in `field.data`; strings are raw UTF-8 bytes.
        if kind == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                meta[key] = [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
            else:
                meta[key] = [field.parts[i][0].item() for i in field.data]
        elif kind == GGUFValueType.STRING:
            meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        else:
            meta[key] = field.parts[field.data[0]][0].item()
    return meta


def gguf_vocabulary(source) -> dict:
    """The tokenizer embedded in a GGUF file (a path, or a `gguf.GGUFReader` already open: reading
    a GGUF's header takes seconds, so a checkpoint loader can share its reader), as the keyword
    arguments of `llama2.tokenizer.HFTokenizer`: the rebuilt `tokenizer`, special ids, template."""
    from gguf import GGUFReader  # see the module docstring: numpy comes with it

    if isinstance(source, GGUFReader):
        reader, path = source, Path(str(getattr(source.data, "filename", "model.gguf")))
    else:
        path = Path(source)
        try:
            reader = GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError/struct.error/... on damaged files
            raise ValueError(f"{path}: cannot read GGUF ({e})") from None
    meta = _gguf_metadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(f"{path}: this GGUF carries no tokenizer (tokenizer.ggml.model/tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "gpt2":
        tk = _byte_level_bpe(path, tokens, types, meta)
    elif kind == "llama":
        tk = _sentencepiece_bpe(path, tokens, types, meta)
    else:
        raise ValueError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)"
        )
    for key in ("bos", "eos", "unknown", "padding"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id={i} is outside the vocabulary")
    special = lambda key: meta.get(f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    # llama.cpp prepends BOS to SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    bos = special("bos")
    if add_bos and bos is not None:  # so that transformers, loading our saved copy, adds it too
        tk.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)],
        )
    return dict(
        tokenizer=tk,
        bos_id=bos,
        eos_id=special("eos"),
        unk_id=special("unknown"),
        pad_id=special("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos=add_bos,
        vocab_size=len(tokens),
    )


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable bytes stand for themselves, the rest
    (controls, space, 127-160, 173) are shifted to 256+ so every token is visible text."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _added(tokens, types) -> list[AddedToken]:
    """Control tokens as special added tokens, user-defined ones as plain added tokens.

    Both are matched whole in text (user-defined always, control only in `encode_special`);
    without this they would be cut into pieces.
    """
    return [
        AddedToken(t, special=ty in (CONTROL, UNKNOWN), normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (CONTROL, UNKNOWN, USER_DEFINED)
    ]


def _vocab(tokens: list[str], types: list[int], spell=lambda t: t) -> dict[str, int]:
    """piece -> id; `spell` rewrites normal pieces (added tokens keep their text)."""
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        key = t if ty in (CONTROL, USER_DEFINED, UNKNOWN) else spell(t)
        vocab.setdefault(key, i)  # a duplicate keeps its first id
    return vocab


def _bpe(path, **kwargs) -> models.BPE:
    try:
        return models.BPE(**kwargs)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown pieces
        raise ValueError(f"{path}: inconsistent vocabulary or merges ({e})") from None


def _byte_level_bpe(path, tokens, types, meta) -> tokenizers.Tokenizer:
    """GPT-2-style byte-level BPE (`tokenizer.ggml.model == "gpt2"`), e.g. SmolLM2's."""
    pre = meta.get("tokenizer.ggml.pre", "")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())

    def spell(t: str) -> str:  # a few converters store plain UTF-8 text instead of byte letters
        return t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8"))

    if pre not in GGUF_PRE_TYPES:
        raise ValueError(
            f"{path}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
            f"(supported: {', '.join(GGUF_PRE_TYPES)})"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = _bpe(path, vocab=_vocab(tokens, types, spell), merges=merges, ignore_merges=pre in _LLAMA3_PRE)
    tk = tokenizers.Tokenizer(bpe)
    gpt2_words = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        tk.pre_tokenizer = gpt2_words
    elif pre in _DIGITS_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_words])
    else:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT), "isolated")
        to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.pre_tokenizer = pre_tokenizers.Sequence([split, to_bytes])
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens(_added(tokens, types))
    return tk


def _sentencepiece_bpe(path, tokens, types, meta) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback (`tokenizer.ggml.model == "llama"`): Llama 2's GGUFs."""
    scores = meta.get("tokenizer.ggml.scores")
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    elif scores is not None:
        merges = _merges_from_scores(tokens, types, scores)
    else:
        raise ValueError(f"{path}: a 'llama' vocabulary needs tokenizer.ggml.scores or merges")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = _bpe(
        path, vocab=_vocab(tokens, types), merges=merges, unk_token=None if unk is None else tokens[unk],
        fuse_unk=True, byte_fallback=True,
    )
    tk = tokenizers.Tokenizer(bpe)
    # SentencePiece writes spaces as "▁" and, with a dummy prefix, starts the text with one.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if prefix else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tk.add_tokens(_added(tokens, types))
    return tk


def _merges_from_scores(tokens, types, scores) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores.

    SentencePiece merges, at each step, the adjacent pair whose joined piece has the highest
    score. A merge list ranked by that score reproduces it: every way to cut a normal piece into
    two normal pieces is a merge, ranked by the score of the whole piece.
    """
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == NORMAL}
    found = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                found.append((-scores[i], normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]

