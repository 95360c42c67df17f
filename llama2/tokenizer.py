"""Tokenizers behind one interface (Llama 2 §2.2): SentencePiece, Hugging Face and GGUF vocabularies.

Llama 2's own tokenizer is a SentencePiece BPE model with 32k pieces, every number split into
single digits and unknown UTF-8 characters decomposed into byte pieces; `<unk>`=0, `<s>`=1,
`</s>`=2. Models we import bring their own: a Hugging Face `tokenizer.json`, or the vocabulary a
GGUF file embeds as metadata (rebuilt as a `tokenizers.Tokenizer` by `llama2.gguf_vocab`).

One safety rule holds for every backend: `encode` never turns text into a control token. A user
who types "<|im_start|>" or "</s>" gets those characters as plain text, so nobody can forge a
chat turn or end a sequence from inside a message. Only the chat layer, rendering a trusted
template, asks for special-token strings to be read as tokens (`encode_special`).
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
import tokenizers

from llama2.chat_template import end_of_turn
from llama2.gguf_vocab import gguf_vocabulary

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template beside the config

# Used only when a bare tokenizer.json comes without tokenizer_config.json to name its specials.
_GUESS = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "unk": ("<unk>",),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


class Tokenizer:
    """Text <-> token ids, plus the special ids and chat template a model needs (Llama 2 §2.2).

    A backend subclass provides `_encode(text) -> (ids, offsets)` (specials as plain text),
    `_decode(ids)`, `id_to_piece`, `piece_to_id` and `save`, then calls `_finish()`.
    """

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    vocab_size: int
    special_tokens: list[str]  # texts of control tokens ("<s>", "<|im_end|>", ...)
    chat_template: str | None  # the Jinja chat template of an imported model
    add_bos: bool  # whether this model's plain-text sequences start with BOS (Llama: yes)
    stop_ids: set[int]  # EOS and the chat template's end-of-turn token

    def _finish(self) -> None:
        """Derive what depends on the backend being ready: stop ids and the special-token splitter."""
        self.stop_ids = {self.eos_id} if self.eos_id is not None else set()
        end_of_turn = self._end_of_turn_id()
        if end_of_turn is not None:
            self.stop_ids.add(end_of_turn)
        # Longest first, so "<|im_start|>" is not cut short by a special that is its prefix.
        names = sorted(set(self.special_tokens), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None

    # -- shared -------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it stay plain text."""
        return self._wrap(self._encode(text)[0], bos, eos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per token, the (start, end) character span of `text` it came from."""
        return self._encode(text)

    def encode_special(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Like `encode`, but special-token strings become their ids: only for rendered templates.

        The chat layer calls this on text a trusted template produced, after refusing messages
        that contain special-token strings. Text between specials is encoded segment by segment,
        which is how SentencePiece-era chat templates (Llama 2's `<s>[INST] ...`) were tokenized.
        """
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            if m.start() > start:
                ids += self._encode(text[start : m.start()])[0]
            ids.append(self.piece_to_id(m.group()))
            start = m.end()
        if start < len(text):
            ids += self._encode(text[start:])[0]
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens (BOS, EOS, <|im_end|>, ...) are left out."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return self._decode(ids)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def _end_of_turn_id(self) -> int | None:
        """The special token the chat template writes right after an assistant answer, if any."""
        if not self.chat_template or not self.special_tokens:
            return None
        name = end_of_turn(self.chat_template, self.special_tokens, self.template_variables())
        return None if name is None else self.piece_to_id(name)

    def template_variables(self) -> dict[str, str | None]:
        """The special-token strings transformers passes to a chat template."""
        text = lambda i: None if i is None else self.id_to_piece(i)  # noqa: E731
        return {
            "bos_token": text(self.bos_id) or "",
            "eos_token": text(self.eos_id) or "",
            "unk_token": text(self.unk_id),
            "pad_token": text(self.pad_id),
        }

    def _config(self, tokenizer_class: str) -> dict:
        """tokenizer_config.json as transformers reads it: special tokens, BOS rule, template."""
        cfg: dict = {"tokenizer_class": tokenizer_class}
        for key, i in (("bos", self.bos_id), ("eos", self.eos_id), ("unk", self.unk_id), ("pad", self.pad_id)):
            cfg[f"{key}_token"] = None if i is None else self.id_to_piece(i)  # null: "has none"
        cfg.update(add_bos_token=self.add_bos, add_eos_token=False, clean_up_tokenization_spaces=False)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, template={self.chat_template is not None})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `tokenizer.model`: Llama 2's own format (§2.2)."""

    def __init__(self, model: bytes, chat_template: str | None = None, source: str = "tokenizer.model"):
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"{source}: not a SentencePiece model ({e})") from None
        self._model = model
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())
        )
        self.special_tokens = [
            sp.id_to_piece(i) for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)
        ]
        self.chat_template = chat_template
        self.add_bos = self.bos_id is not None  # Meta's Llama prepends <s> to every sequence
        self._finish()

    def _encode(self, text):
        # SentencePiece never matches control pieces in text: "</s>" is encoded as characters.
        out = self._sp.encode(text, return_type="offset_mapping")
        return list(out["ids"]), [tuple(o) for o in out["offsets"]]

    def _decode(self, ids):
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self._sp.id_to_piece(i)

    def piece_to_id(self, s: str) -> int | None:
        i = self._sp.piece_to_id(s)  # returns unk_id for unknown pieces
        return i if self._sp.id_to_piece(i) == s else None

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.model (and tokenizer_config.json when there is a chat template)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.model").write_bytes(self._model)
        if self.chat_template:
            (d / CONFIG_FILE).write_text(json.dumps(self._config("LlamaTokenizer"), indent=2, ensure_ascii=False))


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`: a Hugging Face tokenizer.json, or a vocabulary rebuilt from GGUF."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool | None = None,
        vocab_size: int | None = None,
    ):
        serialized = tokenizer.to_str()
        # Two copies: `_tk` reads special-token strings in the input as plain text (the safe
        # default for user text); `_tk_special` extracts them, for rendered chat templates.
        self._tk = tokenizers.Tokenizer.from_str(serialized)
        self._tk.encode_special_tokens = True
        self._tk_special = tokenizers.Tokenizer.from_str(serialized)
        for tk in (self._tk, self._tk_special):  # some tokenizer.json files ship with these enabled
            tk.no_truncation()
            tk.no_padding()
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.vocab_size = vocab_size or self._tk.get_vocab_size(with_added_tokens=True)
        added = self._tk.get_added_tokens_decoder()
        self.special_tokens = [t.content for _, t in sorted(added.items()) if t.special]
        self.chat_template = chat_template
        if add_bos is None:  # ask the post-processor whether it prepends BOS
            first = self._tk_special.encode("a", add_special_tokens=True).ids[:1]
            add_bos = bos_id is not None and first == [bos_id]
        self.add_bos = add_bos
        self._finish()

    def _encode(self, text):
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_special(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # Let `tokenizers` split out the specials itself: its per-segment normalization is what
        # transformers' apply_chat_template produces.
        return self._wrap(self._tk_special.encode(text, add_special_tokens=False).ids, bos, eos)

    def _decode(self, ids):
        return self._tk.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        piece = self._tk.id_to_token(i) if 0 <= i < self.vocab_size else None
        if piece is None:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def piece_to_id(self, s: str) -> int | None:
        return self._tk.token_to_id(s)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json, loadable here and by transformers."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tk_special.save(str(d / "tokenizer.json"))
        (d / CONFIG_FILE).write_text(json.dumps(self._config("PreTrainedTokenizerFast"), indent=2, ensure_ascii=False))


# -- loading ------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.model, a tokenizer.json, a directory holding either, or a .gguf file."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():  # complete, added tokens included
            return _load_hf(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return _load_sentencepiece(path / "tokenizer.model")
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return tokenizer_from_gguf(path)
    if path.suffix == ".json":
        return _load_hf(path)
    if path.suffix == ".gguf":
        raise ValueError(f"{path}: not a GGUF file (bad magic {magic!r})")
    return _load_sentencepiece(path)


def _read_config(directory: Path) -> dict:
    """tokenizer_config.json (and chat_template.jinja) beside a tokenizer file, if any."""
    cfg: dict = {}
    file = directory / CONFIG_FILE
    if file.is_file():
        try:
            cfg = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{file}: expected a JSON object")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (directory / TEMPLATE_FILE).is_file():
        template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{file}: chat_template must be a string")
    cfg["chat_template"] = template
    return cfg


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_sentencepiece(file: Path) -> SentencePieceTokenizer:
    cfg = _read_config(file.parent)
    return SentencePieceTokenizer(file.read_bytes(), cfg["chat_template"], source=str(file))


def _load_hf(file: Path) -> HFTokenizer:
    try:
        tk = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON or schema
        raise ValueError(f"{file}: not a Hugging Face tokenizer.json ({e})") from None
    cfg = _read_config(file.parent)
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        if f"{kind}_token" in cfg:  # present but null means "this model has none"
            text = _token_text(cfg[f"{kind}_token"])
            ids[kind] = tk.token_to_id(text) if text is not None else None
        else:
            found = (tk.token_to_id(t) for t in _GUESS[kind])
            ids[kind] = next((i for i in found if i is not None), None)
    add_bos = cfg.get("add_bos_token")
    return HFTokenizer(
        tk,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        unk_id=ids["unk"],
        pad_id=ids["pad"],
        chat_template=cfg["chat_template"],
        add_bos=add_bos if isinstance(add_bos, bool) else None,
    )


# -- GGUF ---------------------------------------------------------------------------------------
def tokenizer_from_gguf(source) -> HFTokenizer:
    """The tokenizer embedded in a GGUF file (a path, or a `gguf.GGUFReader` already open: reading
    a GGUF's header takes seconds, so a checkpoint loader can share its reader)."""
    return HFTokenizer(**gguf_vocabulary(source))


def pad_token_id(tokenizer: Tokenizer) -> int:
    """A padding id that never occurs in a rendered dialog: the tokenizer's pad token unless it
    doubles as BOS/EOS/end-of-turn, else <unk> (SentencePiece with byte fallback never emits it).
    Hugging Face's sequence classifier reads the score at the last non-pad token, so the pad id
    must not be a token the sequence ends with."""
    used = {tokenizer.bos_id, tokenizer.eos_id, *tokenizer.stop_ids}
    for candidate in (tokenizer.pad_id, tokenizer.unk_id):
        if candidate is not None and candidate not in used:
            return candidate
    raise ValueError("the tokenizer has no pad or unk token distinct from BOS/EOS/end-of-turn to pad with")


# -- streaming ----------------------------------------------------------------------------------
class StreamDecoder:
    """Text of generated tokens as they arrive; the pieces join to exactly `decode(all_ids)`.

    A token's text depends on its neighbours: a UTF-8 character may be split over several byte
    tokens, and SentencePiece drops the space of the very first piece. So each step decodes a
    short window that starts at the last plain token already shown and emits what the new tokens
    add to it. Text is held back while it ends in an incomplete character, and while a run of
    byte-fallback pieces (<0xE6><0x9D>...) is open: `tokenizers` decodes such a run all at once,
    so one bad byte at its end would turn the whole run into U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # window start: already shown, decoded again only as context
        self._shown = 0  # tokens whose text has been returned
        self._last_plain: int | None = None  # index of the newest token that is neither special nor a byte
        self._in_bytes = False  # the newest non-special token is a byte piece
        self._special = {tokenizer.piece_to_id(s) for s in tokenizer.special_tokens}
        self._bytes = {tokenizer.piece_to_id(f"<0x{b:02X}>") for b in range(256)} - {None}

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id not in self._special:
            self._in_bytes = token_id in self._bytes
            if not self._in_bytes:
                self._last_plain = len(self._ids) - 1
        return "" if self._in_bytes else self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is left (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self._ids[self._start : self._shown])
        text = decode(self._ids[self._start :])
        if not final and (text.endswith("\ufffd") or len(text) <= len(before)):
            return ""
        self._shown = len(self._ids)
        if self._last_plain is not None:
            self._start = self._last_plain
        return text[len(before) :]


# -- training (§2.2) ----------------------------------------------------------------------------
def _read_lines(inputs: list[str | Path], max_chars: int) -> Iterator[str]:
    """Training sentences: lines of .txt files, lines of the `text` field of .jsonl records.

    SentencePiece skips sentences longer than its limit, so long lines are cut at a space.
    """
    for file in map(Path, inputs):
        if not file.is_file():
            raise FileNotFoundError(f"training input not found: {file}")
        with open(file, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if file.suffix == ".jsonl":
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{file}:{n}: invalid JSON ({e})") from None
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f'{file}:{n}: expected an object with a string "text" field')
                    lines = text.split("\n")
                else:
                    lines = [line.rstrip("\n")]
                for text in lines:
                    while len(text) > max_chars:
                        cut = text.rfind(" ", 1, max_chars)
                        cut = cut if cut > 0 else max_chars
                        yield text[:cut]
                        text = text[cut:]
                    if text:
                        yield text


def train_sentencepiece(
    inputs: list[str | Path],
    out_dir: str | Path,
    vocab_size: int = 32000,
    *,
    character_coverage: float = 0.99995,
    max_sentences: int = 2_000_000,
    threads: int = 2,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE tokenizer the Llama 2 way (§2.2); writes out_dir/tokenizer.model.

    Numbers split into single digits, byte fallback for characters outside the vocabulary,
    text kept as is (identity normalization, whitespace runs preserved), <unk>/<s>/</s> = 0/1/2
    and no padding piece. Inputs larger than `max_sentences` lines are sampled uniformly.
    """
    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} is too small: 256 byte pieces + 3 specials come first")
    max_bytes = 4192  # SentencePiece's sentence limit (bytes); 4 bytes per character at most
    model = io.BytesIO()
    errors: list[Exception] = []

    def sentences():  # SentencePiece would bury an input error inside its own message
        try:
            yield from _read_lines(inputs, max_bytes // 4)
        except (ValueError, OSError) as e:
            errors.append(e)

    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            split_digits=True,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_bytes,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high" for a small corpus
        if not errors:
            raise ValueError(f"SentencePiece training failed: {e}") from None
    if errors:
        raise errors[0]
    tokenizer = SentencePieceTokenizer(model.getvalue())
    tokenizer.save(out_dir)
    return tokenizer
