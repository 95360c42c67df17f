"""The data formats of the recipe, their validators and readers (JSONL and Parquet).

Four kinds of record, one JSON object per line (or one Parquet row), the same for the built-in
world and for a user's own data:
  pretrain     {"text", "source"?}                                          (Llama 2 §2)
  sft          {"id", "messages" ending with assistant, "source", "split", "task"?}   (§3.1)
  prompts      {"id", "messages" ending with user, "split", "batch", "is_safety",
                "risk_category", "attack_vector", "task", "reference", "user_turns"?}   (§3.2, §4)
  preferences  {"id", "messages" ending with user, "chosen", "rejected", "rating", "axis",
                "safety_label", "source", "batch", "split", "task"?}         (§3.2.1)
Every record may also carry "meta" (any JSON object) for the user's own bookkeeping; any other
unknown field is refused, so that a misspelt field name does not silently drop data.

Every error names the file, the 1-based line (or Parquet row) and the field:
  data/sft.jsonl, line 3, field 'messages[1].role': must be one of 'system', 'user', 'assistant', got 'bot'
`llama2 data validate FILE [--kind pretrain|sft|prompts|preferences]` runs these checks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, Literal, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from llama2.chat_format import ROLES, SPECIAL_TAGS, Message

KINDS = ("pretrain", "sft", "prompts", "preferences")
SPLITS = ("train", "test", "eval")
PREFERENCE_SPLITS = ("train", "test")
RISK_CATEGORIES = ("illicit_criminal", "hateful_harmful", "unqualified_advice")
# The four answers of the annotator's "how much better" question, best first (§3.2.1).
RATINGS = ("significantly better", "better", "slightly better", "negligibly better/unsure")
# The two preference axes; one reward model each (§3.2.2), and the two parts of the gated reward (§3.2.3).
AXES = ("helpfulness", "safety")
# §3.2.1: the pair where the chosen answer is unsafe and the other safe is dropped, so it has no label.
SAFETY_LABELS = ("chosen_safe_other_unsafe", "both_safe", "both_unsafe")


# Optional fields live in a `total=False` subclass (typing.NotRequired needs Python 3.11).
class PretrainRecord(TypedDict, total=False):
    text: str  # required
    source: str


class _SFTRequired(TypedDict):
    id: str
    messages: list[Message]  # system only first; user/assistant alternate; ends with assistant
    source: str
    split: Literal["train", "test", "eval"]


class SFTRecord(_SFTRequired, total=False):
    task: str | None


class PromptRecord(TypedDict):
    id: str
    messages: list[Message]  # ends with a user turn
    split: Literal["train", "test", "eval"]
    batch: int | None  # the weekly preference batch the prompt belongs to (§3.2.1)
    is_safety: bool  # routes PPO's reward to the safety RM (§3.2.3)
    risk_category: str | None  # one of RISK_CATEGORIES when is_safety
    attack_vector: str | None
    task: str  # selects the grader
    reference: dict  # everything the grader needs


class _PreferenceRequired(TypedDict):
    id: str
    messages: list[Message]  # the context, ending with the user turn both answers reply to
    chosen: str
    rejected: str
    rating: str  # one of RATINGS
    axis: Literal["helpfulness", "safety"]
    safety_label: str | None  # one of SAFETY_LABELS on the safety axis, else null
    source: str
    batch: int
    split: Literal["train", "test"]


class PreferenceRecord(_PreferenceRequired, total=False):
    task: str | None


FIELDS = {  # kind -> (required fields, optional fields)
    "pretrain": ({"text"}, {"source", "meta"}),
    "sft": ({"id", "messages", "source", "split"}, {"task", "meta"}),
    "prompts": ({"id", "messages", "split", "batch", "is_safety", "risk_category", "attack_vector", "task",
                 "reference"}, {"meta", "user_turns"}),
    "preferences": ({"id", "messages", "chosen", "rejected", "rating", "axis", "safety_label", "source", "batch",
                     "split"}, {"task", "meta"}),
}


class DataError(ValueError):
    """A record (or file) that breaks its format; the message names file, line/row and field."""

    def __init__(self, path, line: int | None, field: str | None, message: str, row: bool = False):
        self.path, self.line, self.field = str(path), line, field
        where = [self.path]
        if line is not None:
            where.append(f"{'row' if row else 'line'} {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")


class FieldError(ValueError):
    """One record's problem: the field (dotted path) and what is wrong, without file or line."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _choices(options) -> str:
    return ", ".join(repr(o) for o in options)


def _type(v) -> str:
    return "null" if v is None else {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                     list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _need_str(obj: dict, key: str, where: str | None = None, empty_ok: bool = False) -> str:
    v = obj.get(key)
    field = where or key
    if not isinstance(v, str):
        raise FieldError(field, f"must be a string, got {_type(v)}")
    if not empty_ok and not v.strip():
        raise FieldError(field, "must not be empty")
    return v


def _no_tags(text: str, field: str) -> None:
    for tag in SPECIAL_TAGS:
        if tag in text:
            raise FieldError(field, f"contains the chat-format tag {tag!r}, which would let text forge a turn")


def _need_choice(obj: dict, key: str, options, nullable: bool = False):
    v = obj.get(key)
    if v is None and nullable:
        return None
    if v not in options:
        return_null = " or null" if nullable else ""
        raise FieldError(key, f"must be one of {_choices(options)}{return_null}, got {v!r}")
    return v


def _check_messages(obj: dict, last_role: str) -> None:
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        raise FieldError("messages", f"must be a list of messages, got {_type(msgs)}")
    if not msgs:
        raise FieldError("messages", "must not be empty")
    expect = "user"
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FieldError(where, f"must be an object with 'role' and 'content', got {_type(m)}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise FieldError(f"{where}.{extra[0]}", "unknown field (a message has only 'role' and 'content')")
        role = m.get("role")
        if role not in ROLES:
            raise FieldError(f"{where}.role", f"must be one of {_choices(ROLES)}, got {role!r}")
        content = _need_str(m, "content", f"{where}.content")
        _no_tags(content, f"{where}.content")
        if role == "system":
            if i != 0:
                raise FieldError(f"{where}.role", "a system message may only come first")
            continue
        if role != expect:
            raise FieldError(f"{where}.role", f"expected {expect!r} (user and assistant turns alternate), got {role!r}")
        expect = "assistant" if role == "user" else "user"
    if msgs[-1]["role"] != last_role:
        what = "the answer to learn" if last_role == "assistant" else "the turn to answer"
        raise FieldError(f"messages[{len(msgs) - 1}].role", f"the last message must be {last_role!r} ({what}), "
                                                              f"got {msgs[-1]['role']!r}")


def _check_int(obj: dict, key: str, nullable: bool) -> None:
    v = obj.get(key)
    if v is None and nullable:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(key, f"must be an integer{' or null' if nullable else ''}, got {_type(v)}")
    if v < 0:
        raise FieldError(key, f"must be >= 0, got {v}")


def _check_optional_task(obj: dict) -> None:
    if obj.get("task") is not None:
        _need_str(obj, "task")


def _check_user_turns(obj: dict) -> None:
    """A multi-turn prompt's user turns, said one after the other (the model answers each): a
    non-empty list of non-empty strings, the first of which is the prompt's last user message."""
    turns = obj["user_turns"]
    if not isinstance(turns, list):
        raise FieldError("user_turns", f"must be a non-empty list of strings, got {_type(turns)}")
    if not turns:
        raise FieldError("user_turns", "must be a non-empty list of strings, got an empty list")
    for i, t in enumerate(turns):
        if not isinstance(t, str):
            raise FieldError(f"user_turns[{i}]", f"must be a string, got {_type(t)}")
        if not t.strip():
            raise FieldError(f"user_turns[{i}]", "must not be empty")
        _no_tags(t, f"user_turns[{i}]")
    if turns[0] != obj["messages"][-1]["content"]:
        raise FieldError("user_turns[0]", "must be the prompt's last user message (messages holds the first turn)")


def check_record(obj, kind: str) -> None:
    """Raise `FieldError` for the first problem of `obj` as a record of `kind`."""
    if not isinstance(obj, dict):
        raise FieldError(None, f"must be a JSON object, got {_type(obj)}")
    required, optional = FIELDS[kind]
    missing = sorted(required - set(obj))
    if missing:
        raise FieldError(missing[0], "missing")
    unknown = sorted(set(obj) - required - optional)
    if unknown and kind != "pretrain":  # plain text may carry any metadata columns
        raise FieldError(unknown[0], f"unknown field for a {kind} record (known: {', '.join(sorted(required | optional))})")
    if "meta" in obj and obj["meta"] is not None and not isinstance(obj["meta"], dict):
        raise FieldError("meta", f"must be an object, got {_type(obj['meta'])}")
    if kind == "pretrain":
        _need_str(obj, "text")
        if obj.get("source") is not None:
            _need_str(obj, "source")
        return
    _need_str(obj, "id")
    if kind == "sft":
        _check_messages(obj, "assistant")
        _need_str(obj, "source")
        _need_choice(obj, "split", SPLITS)
        _check_optional_task(obj)
        return
    _check_messages(obj, "user")
    if kind == "prompts":
        _need_choice(obj, "split", SPLITS)
        _check_int(obj, "batch", nullable=True)
        if not isinstance(obj["is_safety"], bool):
            raise FieldError("is_safety", f"must be true or false, got {_type(obj['is_safety'])}")
        cat = _need_choice(obj, "risk_category", RISK_CATEGORIES, nullable=True)
        if obj["is_safety"] and cat is None:
            raise FieldError("risk_category", "a safety prompt (is_safety true) needs its risk category")
        if not obj["is_safety"] and cat is not None:
            raise FieldError("risk_category", "must be null when is_safety is false")
        if obj["attack_vector"] is not None:
            _need_str(obj, "attack_vector")
            if not obj["is_safety"]:
                raise FieldError("attack_vector", "must be null when is_safety is false")
        _need_str(obj, "task")
        if not isinstance(obj["reference"], dict):
            raise FieldError("reference", f"must be an object, got {_type(obj['reference'])}")
        if "user_turns" in obj:
            _check_user_turns(obj)
        return
    # preferences
    chosen, rejected = _need_str(obj, "chosen"), _need_str(obj, "rejected")
    _no_tags(chosen, "chosen")
    _no_tags(rejected, "rejected")
    if chosen.strip() == rejected.strip():
        raise FieldError("rejected", "is the same text as 'chosen' (a pair must differ)")
    _need_choice(obj, "rating", RATINGS)
    axis = _need_choice(obj, "axis", AXES)
    label = _need_choice(obj, "safety_label", SAFETY_LABELS, nullable=True)
    if axis == "safety" and label is None:
        raise FieldError("safety_label", f"a safety pair needs one of {_choices(SAFETY_LABELS)}")
    if axis == "helpfulness" and label is not None:
        raise FieldError("safety_label", "must be null for a helpfulness pair")
    _need_str(obj, "source")
    _check_int(obj, "batch", nullable=False)
    _need_choice(obj, "split", PREFERENCE_SPLITS)
    _check_optional_task(obj)


def infer_kind(obj) -> str | None:
    """The record kind its fields imply, or None when they imply none."""
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj or "rejected" in obj:
        return "preferences"
    if "messages" in obj:
        if {"reference", "is_safety", "risk_category"} & set(obj):
            return "prompts"
        msgs = obj["messages"]
        last = msgs[-1].get("role") if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else None
        return "prompts" if last == "user" else "sft"
    if "text" in obj:
        return "pretrain"
    return None


# -- readers ------------------------------------------------------------------------------------

def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def iter_rows(path) -> Iterator[tuple[int, object]]:
    """(1-based line or row number, parsed object) for every record of a JSONL or Parquet file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a .jsonl or .parquet file")
    if _is_parquet(path):
        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowIOError / ArrowInvalid
            raise DataError(path, None, None, f"not a readable Parquet file ({e})") from None
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                row += 1
                yield row, _from_parquet(obj)
        return
    with open(path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, None, f"invalid JSON ({e.msg} at column {e.colno})") from None


def _from_parquet(obj: dict) -> dict:
    """Parquet has no free-form objects: `reference`/`meta` may be stored as JSON strings."""
    for key in ("reference", "meta"):
        if isinstance(obj.get(key), str):
            try:
                obj[key] = json.loads(obj[key])
            except json.JSONDecodeError:
                pass  # left as a string: the validator names the field
    return obj


def validate_file(path, kind: str | None = None, max_errors: int = 20) -> tuple[str, int, list[DataError]]:
    """(kind, number of records, errors) for a whole file; at most `max_errors` errors are kept."""
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r} (choose from {', '.join(KINDS)})")
    parquet = _is_parquet(path)
    errors: list[DataError] = []
    seen_ids: dict[str, int] = {}
    n = 0
    try:
        for line, obj in iter_rows(path):
            n += 1
            if kind is None:
                kind = infer_kind(obj)
                if kind is None:
                    raise DataError(path, line, None, "cannot tell the kind of record from its fields "
                                                      f"(pass --kind {'|'.join(KINDS)})", parquet)
            try:
                check_record(obj, kind)
                rid = obj.get("id")
                if rid is not None:
                    if rid in seen_ids:
                        raise FieldError("id", f"duplicate id {rid!r} (first at {'row' if parquet else 'line'} {seen_ids[rid]})")
                    seen_ids[rid] = line
            except FieldError as e:
                errors.append(DataError(path, line, e.field, e.message, parquet))
                if len(errors) >= max_errors:
                    break
    except DataError as e:  # unreadable line: stop here, report it with what came before
        errors.append(e)
    if n == 0 and not errors:
        errors.append(DataError(path, None, None, "no records"))
    return kind or "unknown", n, errors


def read_records(path, kind: str | None = None) -> list[dict]:
    """All records of a JSONL or Parquet file, validated; the first problem raises `DataError`."""
    _, _, errors = validate_file(path, kind, max_errors=1)
    if errors:
        raise errors[0]
    return [obj for _, obj in iter_rows(path)]


def write_jsonl(path, records) -> int:
    """Write records one JSON object per line (UTF-8, stable key order); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_parquet(path, records: list[dict]) -> int:
    """Write records as Parquet; `reference` and `meta` become JSON strings (they differ per task)."""
    rows = [{k: (json.dumps(v) if k in ("reference", "meta") and isinstance(v, dict) else v) for k, v in r.items()}
            for r in records]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return len(rows)


def validate_cli(argv: list[str]) -> int:
    """`llama2 data validate FILE… [--kind K]`: check data files, print every problem found."""
    ap = argparse.ArgumentParser(prog="llama2 data validate",
                                 description="Check data files against their formats (JSONL or Parquet; docs/data.md).")
    ap.add_argument("files", nargs="+", metavar="FILE")
    ap.add_argument("--kind", choices=KINDS, help="the record kind (default: inferred from the first record)")
    ap.add_argument("--max-errors", type=int, default=20, help="stop listing a file's problems after this many")
    args = ap.parse_args(argv)
    status = 0
    for path in args.files:
        kind, n, errors = validate_file(path, args.kind, args.max_errors)
        if not errors:
            print(f"{path}: {n} {kind} records, all valid")
            continue
        status = 1
        for e in errors:
            print(e, file=sys.stderr)
        if len(errors) >= args.max_errors:
            print(f"{path}: stopped after {len(errors)} problems", file=sys.stderr)
    return status
