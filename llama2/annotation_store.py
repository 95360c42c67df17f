"""The SQLite store of `llama2 annotate serve` (human preference annotation, Llama 2 §3.2.1) and its export.

Three tables: `dialogs` (one per annotator and conversation; the prompt-file record it came from),
`comparisons` (two answers shown as A and B, with the arm — model variant and temperature — that
sampled each; written when generated, before any judgement) and `judgements` (one row per
submitted judgement: annotator, batch, dialog, turn, the context, both answers with their arms,
the choice, rating, safety label and the shown/submitted timestamps — complete by itself, so the
export reads this table only).

Durability: WAL journal with `synchronous=FULL`. In WAL mode a commit appends the transaction to
the WAL; with NORMAL it is not fsynced at commit, which survives a killed process (the bytes are
in the OS's page cache) but may lose the last commits on a power cut or kernel crash. A human
judgement costs a person a minute; the tool commits at most a few per second, so an fsync per
commit (FULL) is free in practice and a judgement whose HTTP 200 was sent survives power loss too.
Each judgement is one `BEGIN IMMEDIATE ... COMMIT` transaction, answered only after the commit.

Agreement: a share of the prompt file is shown to several annotators with the *same* first-turn
answers (same pair id); on those pairs, per batch, the percent agreement on the choice and Gwet's
AC1 (`llama2.agreement`) are reported.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from llama2.agreement import gwet
from llama2.formats import RATINGS, SAFETY_LABELS, FieldError, check_record

# The fourth answer to the safety question: the chosen answer is unsafe and the other safe. The
# paper drops these pairs (§3.2.1), so the preference format has no label for it; the tool records it.
CHOSEN_UNSAFE = "chosen_unsafe_other_safe"
LABELS = SAFETY_LABELS + (CHOSEN_UNSAFE,)
CHOICES = ("A", "B")

SCHEMA = """
CREATE TABLE IF NOT EXISTS dialogs (
    id TEXT PRIMARY KEY,
    annotator TEXT NOT NULL,
    batch INTEGER NOT NULL,
    prompt_id TEXT,                      -- the prompt-file record, or NULL for a prompt the annotator wrote
    axis TEXT NOT NULL,
    task TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dialogs_prompt ON dialogs(prompt_id);
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,
    dialog_id TEXT NOT NULL REFERENCES dialogs(id),
    turn INTEGER NOT NULL,               -- 0 for the first user turn, 1 after one "continue", ...
    annotator TEXT NOT NULL,
    batch INTEGER NOT NULL,
    pair_id TEXT NOT NULL,               -- the comparison whose answers these are (itself unless shared)
    messages TEXT NOT NULL,              -- JSON: the dialog up to the user turn both answers reply to
    answer_a TEXT NOT NULL, arm_a TEXT NOT NULL,
    answer_b TEXT NOT NULL, arm_b TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (dialog_id, turn)
);
CREATE TABLE IF NOT EXISTS judgements (
    comparison_id TEXT PRIMARY KEY REFERENCES comparisons(id),
    annotator TEXT NOT NULL,
    batch INTEGER NOT NULL,
    dialog_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    pair_id TEXT NOT NULL,
    prompt_id TEXT,
    axis TEXT NOT NULL,
    task TEXT,
    messages TEXT NOT NULL,
    answer_a TEXT NOT NULL, arm_a TEXT NOT NULL,
    answer_b TEXT NOT NULL, arm_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B')),
    rating TEXT NOT NULL,
    safety_label TEXT NOT NULL,
    shown REAL NOT NULL,
    submitted REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS judgements_pair ON judgements(pair_id);
"""


class StoreError(ValueError):
    """A request the store refuses: `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class AnnotationStore:
    """One SQLite connection (WAL, synchronous=FULL) shared by the server's threads behind a lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"{self.path}: the directory {self.path.parent} does not exist")
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise OSError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); use a local file system")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        """Run the statements in one IMMEDIATE transaction; committed (and fsynced) when this returns."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # -- writing ------------------------------------------------------------------------------------
    def new_dialog(self, annotator: str, batch: int, axis: str, prompt_id: str | None = None,
                   task: str | None = None) -> str:
        did = new_id("dlg")
        sql = "INSERT INTO dialogs (id, annotator, batch, prompt_id, axis, task, created) VALUES (?, ?, ?, ?, ?, ?, ?)"
        self._tx([(sql, (did, annotator, batch, prompt_id, axis, task, time.time()))])
        return did

    def add_comparison(self, dialog_id: str, turn: int, annotator: str, batch: int, messages: list[dict],
                       answers: tuple[str, str], arms: tuple[dict, dict], pair_id: str | None = None) -> dict:
        cid = new_id("cmp")
        row = {"id": cid, "dialog_id": dialog_id, "turn": turn, "annotator": annotator, "batch": batch,
               "pair_id": pair_id or cid, "messages": json.dumps(messages, ensure_ascii=False),
               "answer_a": answers[0], "arm_a": json.dumps(arms[0], sort_keys=True),
               "answer_b": answers[1], "arm_b": json.dumps(arms[1], sort_keys=True), "created": time.time()}
        cols = ", ".join(row)
        self._tx([(f"INSERT INTO comparisons ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))])
        return self.comparison(cid)

    def judge(self, comparison_id: str, annotator: str, choice: str, rating: str, safety_label: str) -> dict:
        """Store one judgement in one transaction; 404/403/409 as StoreError when it cannot be."""
        if choice not in CHOICES or rating not in RATINGS or safety_label not in LABELS:
            raise StoreError(422, f"bad judgement: choice {choice!r}, rating {rating!r}, safety label {safety_label!r}")
        c = self.comparison(comparison_id)
        if c is None:
            raise StoreError(404, f"no comparison {comparison_id!r}")
        if c["annotator"] != annotator:
            raise StoreError(403, f"comparison {comparison_id!r} was shown to another annotator")
        d = self.dialog(c["dialog_id"])
        row = {"comparison_id": comparison_id, "annotator": annotator, "batch": c["batch"],
               "dialog_id": c["dialog_id"], "turn": c["turn"], "pair_id": c["pair_id"], "prompt_id": d["prompt_id"],
               "axis": d["axis"], "task": d["task"], "messages": json.dumps(c["messages"], ensure_ascii=False),
               "answer_a": c["answer_a"], "arm_a": json.dumps(c["arm_a"], sort_keys=True),
               "answer_b": c["answer_b"], "arm_b": json.dumps(c["arm_b"], sort_keys=True), "choice": choice,
               "rating": rating, "safety_label": safety_label, "shown": c["created"], "submitted": time.time()}
        cols = ", ".join(row)
        try:
            self._tx([(f"INSERT INTO judgements ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))])
        except sqlite3.IntegrityError:
            raise StoreError(409, f"comparison {comparison_id!r} is already judged") from None
        return row

    # -- reading ------------------------------------------------------------------------------------
    def dialog(self, dialog_id: str) -> dict | None:
        rows = self._all("SELECT * FROM dialogs WHERE id = ?", (dialog_id,))
        return dict(rows[0]) if rows else None

    def comparison(self, comparison_id: str) -> dict | None:
        rows = self._all("SELECT * FROM comparisons WHERE id = ?", (comparison_id,))
        return _comparison(rows[0]) if rows else None

    def last_comparison(self, dialog_id: str) -> dict | None:
        rows = self._all("SELECT * FROM comparisons WHERE dialog_id = ? ORDER BY turn DESC LIMIT 1", (dialog_id,))
        return _comparison(rows[0]) if rows else None

    def judgement(self, comparison_id: str) -> dict | None:
        rows = self._all("SELECT * FROM judgements WHERE comparison_id = ?", (comparison_id,))
        return _judgement(rows[0]) if rows else None

    def takers(self) -> dict[str, set[str]]:
        """prompt id -> the annotators who have a dialog on it."""
        out: dict[str, set[str]] = defaultdict(set)
        for r in self._all("SELECT prompt_id, annotator FROM dialogs WHERE prompt_id IS NOT NULL"):
            out[r["prompt_id"]].add(r["annotator"])
        return out

    def first_pair(self, prompt_id: str) -> dict | None:
        """The earliest first-turn comparison generated for a prompt-file record (the pair overlap annotators share)."""
        rows = self._all("SELECT c.* FROM comparisons c JOIN dialogs d ON c.dialog_id = d.id "
                         "WHERE d.prompt_id = ? AND c.turn = 0 ORDER BY c.created LIMIT 1", (prompt_id,))
        return _comparison(rows[0]) if rows else None

    def judgements(self, batch: int | None = None) -> list[dict]:
        sql, args = "SELECT * FROM judgements", ()
        if batch is not None:
            sql, args = sql + " WHERE batch = ?", (batch,)
        return [_judgement(r) for r in self._all(sql + " ORDER BY submitted, comparison_id", args)]

    def progress(self) -> list[dict]:
        """Per annotator and batch: dialogs started, comparisons shown, judgements stored, the last one's time."""
        rows = self._all(
            "SELECT d.annotator, d.batch, COUNT(DISTINCT d.id) AS dialogs, COUNT(c.id) AS comparisons, "
            "COUNT(j.comparison_id) AS judgements, MAX(j.submitted) AS last_submitted "
            "FROM dialogs d LEFT JOIN comparisons c ON c.dialog_id = d.id "
            "LEFT JOIN judgements j ON j.comparison_id = c.id GROUP BY d.annotator, d.batch "
            "ORDER BY d.batch, d.annotator")
        return [dict(r) for r in rows]

    def agreement(self) -> list[dict]:
        """Per batch, on the pairs judged by two or more annotators: percent agreement on the choice and Gwet's AC1."""
        by_pair: dict[tuple[int, str], list[dict]] = defaultdict(list)
        for j in self.judgements():
            by_pair[j["batch"], j["pair_id"]].append(j)
        batches: dict[int, list[list[int]]] = defaultdict(list)
        for (batch, _), js in sorted(by_pair.items()):
            if len({j["annotator"] for j in js}) < 2:
                continue
            batches[batch].append([choice_category(j) for j in js])
        out = []
        for batch, subjects in sorted(batches.items()):
            a = gwet(subjects, categories=[0, 1])
            out.append({"batch": batch, "pairs": len(subjects), "judgements": sum(map(len, subjects)),
                        "percent_agreement": a.pa, "ac1": a.coefficient})
        return out


def choice_category(j: dict) -> int:
    """Which of the pair's two arms was chosen, in an order that does not depend on how A/B were shown."""
    arms = sorted([json.dumps(j["arm_a"], sort_keys=True), json.dumps(j["arm_b"], sort_keys=True)])
    chosen = j["arm_a"] if j["choice"] == "A" else j["arm_b"]
    return arms.index(json.dumps(chosen, sort_keys=True))


def _comparison(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["messages"], d["arm_a"], d["arm_b"] = json.loads(d["messages"]), json.loads(d["arm_a"]), json.loads(d["arm_b"])
    return d


_judgement = _comparison


# ----------------------------------------------------------------------------- export


@dataclass
class ExportStats:
    judgements: int = 0
    written: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"chosen_unsafe_other_safe": 0, "identical_answers": 0,
                                                             "invalid": 0})
    splits: dict[str, int] = field(default_factory=lambda: {"train": 0, "test": 0})


def split_of(key: str, test_share: float) -> str:
    """A stable split from a hash: every turn of a dialog, and every annotator of a shared prompt, lands together."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
    return "test" if h < test_share else "train"


def export_records(store: AnnotationStore, batch: int | None = None, split_test: float = 0.0
                   ) -> tuple[list[dict], ExportStats]:
    """Preference records (llama2.formats) from the stored judgements; pairs whose chosen answer is
    unsafe and the other safe are dropped (§3.2.1), as are identical answers; each drop is counted."""
    if not 0.0 <= split_test < 1.0:
        raise ValueError(f"--split-test must be in [0, 1), got {split_test}")
    stats = ExportStats()
    records = []
    source = f"human:{store.path.name}"
    for j in store.judgements(batch):
        stats.judgements += 1
        if j["safety_label"] == CHOSEN_UNSAFE:
            stats.dropped["chosen_unsafe_other_safe"] += 1
            continue
        a, b = (j["answer_a"], j["arm_a"]), (j["answer_b"], j["arm_b"])
        (chosen, chosen_arm), (rejected, rejected_arm) = (a, b) if j["choice"] == "A" else (b, a)
        if chosen.strip() == rejected.strip():
            stats.dropped["identical_answers"] += 1
            continue
        split = split_of(j["prompt_id"] or j["dialog_id"], split_test)
        rec = {"id": f"human-{j['comparison_id']}", "messages": j["messages"], "chosen": chosen, "rejected": rejected,
               "rating": j["rating"], "axis": j["axis"],
               "safety_label": j["safety_label"] if j["axis"] == "safety" else None,
               "source": source, "batch": j["batch"], "split": split, "task": j["task"],
               "meta": {"annotator": j["annotator"], "chosen_arm": chosen_arm, "rejected_arm": rejected_arm,
                        "dialog": j["dialog_id"], "turn": j["turn"], "pair": j["pair_id"], "prompt_id": j["prompt_id"],
                        "safety_label_given": j["safety_label"], "shown": j["shown"], "submitted": j["submitted"]}}
        try:
            check_record(rec, "preferences")
        except FieldError:  # e.g. an empty answer, or one that contains a chat-format tag
            stats.dropped["invalid"] += 1
            continue
        records.append(rec)
        stats.written += 1
        stats.splits[split] += 1
    return records, stats
