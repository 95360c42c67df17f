"""Preference pairs for the reward models (Llama 2 §3.2.1–3.2.2): reading, the data mixes,
tokenizing, resumable batches and accuracy by test set, rating level and task family.

- `read_pairs`, `mix_pairs`, `tokenize_pairs`: preference files (errors name file, line and field),
  the helpfulness / safety data mixes, and tokenized pairs with counted skips;
- `PairLoader`: resumable batches;
- `accuracy_report`: accuracy per test set, rating level and task family (Tables 7 and 8).
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from llama2.chat_format import ChatFormat, ChatFormatError
from llama2.formats import AXES, RATINGS, DataError, iter_rows, validate_file
from llama2.reward_scoring import response_ids

# Share of a reward model's training mix drawn from the *other* pairs (§3.2.2): the helpfulness RM
# adds "an equal amount" of safety and open-source pairs (half the mix); the safety RM is 90/10.
PAPER_OTHER_SHARE = {"helpfulness": 0.5, "safety": 0.1}


class PairRow(NamedTuple):
    """One preference record and where it came from (for error messages and test-set names)."""

    record: dict
    path: str
    line: int


def read_pairs(paths: Sequence[str | Path]) -> list[PairRow]:
    """Every record of the preference files, validated (unknown rating, empty or identical
    responses, a dialog that does not end with a user turn, ... raise `DataError` naming the
    file, line and field)."""
    rows: list[PairRow] = []
    for path in paths:
        _, _, errors = validate_file(path, "preferences", max_errors=1)
        if errors:
            raise errors[0]
        rows += [PairRow(obj, str(path), line) for line, obj in iter_rows(path)]
    return rows


def mix_pairs(rows: Sequence[PairRow], objective: str, other_share: float | None = None,
              main_sources: Sequence[str] = (), seed: int = 0,
              open_source: Sequence[str] = ()) -> tuple[list[PairRow], dict]:
    """The training mix of one reward model (§3.2.2) and a summary naming its sources.

    Main pairs: the pairs of the objective's axis (and of `main_sources`). For the helpfulness RM
    these are your own annotations only: pairs of an `open_source` source belong to the rest,
    from which "an equal amount [is] uniformly sampled from Meta Safety and from the open-source
    datasets"; the safety RM's main data is every safety pair ("all Meta Safety and Anthropic
    Harmless data"), open-source or not. Other pairs are sampled uniformly without replacement so
    that they make up `other_share` of the mix (0.5 for helpfulness; 0.1, the safety RM's 90/10);
    when there are too few, all are taken and the shortfall reported.
    """
    if objective not in AXES:
        raise ValueError(f"objective: expected one of {', '.join(AXES)}, got {objective!r}")
    share = PAPER_OTHER_SHARE[objective] if other_share is None else other_share
    if not 0 <= share < 1:
        raise ValueError(f"mix.other_share: expected a share in [0, 1), got {share}")
    def is_main(r: PairRow) -> bool:
        if r.record["source"] in main_sources:
            return True
        return r.record["axis"] == objective and not (objective == "helpfulness" and r.record["source"] in open_source)

    main = [r for r in rows if is_main(r)]
    if not main:
        raise ValueError(f"no {objective} pairs in the training data (check the files' 'axis' and 'source' fields)")
    pool = [r for r in rows if not is_main(r)]
    wanted = round(len(main) * share / (1 - share))
    other = random.Random(seed).sample(pool, min(wanted, len(pool)))
    def count(rs: list[PairRow]) -> dict[str, int]:
        return dict(sorted(Counter(f"{r.record['source']} ({r.record['axis']})" for r in rs).items()))

    summary = {"objective": objective, "other_share": share, "main": count(main), "other": count(other),
               "other_wanted": wanted, "other_available": len(pool)}
    return main + other, summary


@dataclass
class PairData:
    """Tokenized preference pairs and what evaluation groups them by."""

    chosen: list[np.ndarray] = field(default_factory=list)
    rejected: list[np.ndarray] = field(default_factory=list)
    rating: list[str] = field(default_factory=list)
    axis: list[str] = field(default_factory=list)
    task: list[str] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)
    test_set: list[str] = field(default_factory=list)  # "<file stem>/<axis>" (Tables 7 and 8)
    ids: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # "file: reason" -> count, reported never silent

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def lengths(self) -> np.ndarray:
        """Per pair, the longer of its two sequences (what a padded batch costs)."""
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)], dtype=np.int64)

    def select(self, idx: Sequence[int]) -> PairData:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return PairData(pick(self.chosen), pick(self.rejected), pick(self.rating), pick(self.axis), pick(self.task),
                        pick(self.batch), pick(self.test_set), pick(self.ids), Counter(self.skipped))


def tokenize_pairs(rows: Sequence[PairRow], fmt: ChatFormat, max_len: int) -> PairData:
    """Ids of both responses of every pair. A pair whose longer sequence exceeds `max_len` tokens,
    or whose two responses tokenize identically, is skipped and counted per file."""
    data = PairData()
    for rec, path, line in rows:
        seqs = []
        for side in ("chosen", "rejected"):
            try:
                seqs.append(np.asarray(response_ids(fmt, rec["messages"], rec[side]), dtype=np.int32))
            except ChatFormatError as e:
                raise DataError(path, line, side, str(e)) from None
        c, r = seqs
        if max(len(c), len(r)) > max_len:
            data.skipped[f"{path}: longer than the context ({max_len} tokens)"] += 1
            continue
        if len(c) == len(r) and (c == r).all():
            data.skipped[f"{path}: chosen and rejected tokenize identically"] += 1
            continue
        data.chosen.append(c)
        data.rejected.append(r)
        data.rating.append(rec["rating"])
        data.axis.append(rec["axis"])
        data.task.append(rec.get("task") or "unknown")
        data.batch.append(rec["batch"])
        data.test_set.append(f"{Path(path).stem}/{rec['axis']}")
        data.ids.append(rec["id"])
    return data


class PairLoader:
    """Pair indices for each optimizer step: a new permutation every epoch, the global batch
    sorted by length and cut into micro-batches (similar lengths pad less; the gradient of the
    step is the same however it is cut), micro-batch k of rank r being number k·world + r.
    Resumable from (epoch, cursor); a partial last batch of an epoch is dropped."""

    def __init__(self, lengths: np.ndarray, batch_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(f"batch_size={batch_size} is not a multiple of micro_batch_size x world_size = "
                             f"{micro_batch_size * world_size}")
        if batch_size > len(lengths):
            raise ValueError(f"batch_size={batch_size} pairs, but the training mix has only {len(lengths)} pairs")
        self.lengths, self.B, self.micro = np.asarray(lengths), batch_size, micro_batch_size
        self.rank, self.world, self.seed = rank, world_size, seed
        self.accum = batch_size // (micro_batch_size * world_size)
        self.epoch, self.cursor = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.B

    def next_step(self) -> list[np.ndarray]:
        """This rank's `accum` micro-batches of pair indices for the next optimizer step."""
        if self.cursor + self.B > len(self.lengths):
            self.epoch, self.cursor = self.epoch + 1, 0
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.lengths))
        step = order[self.cursor: self.cursor + self.B]
        self.cursor += self.B
        step = step[np.argsort(-self.lengths[step], kind="stable")]
        micro = step.reshape(self.accum * self.world, self.micro)
        return [micro[k * self.world + self.rank] for k in range(self.accum)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "pairs": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("pairs") != len(self.lengths):
            raise ValueError(f"cannot resume the pair loader: saved for seed {state.get('seed')} and "
                             f"{state.get('pairs')} pairs, now seed {self.seed} and {len(self.lengths)}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def _accuracy(correct: np.ndarray) -> dict:
    return {"pairs": int(len(correct)), "accuracy": float(correct.mean()) if len(correct) else None}


def accuracy_report(r_c: torch.Tensor, r_r: torch.Tensor, data: PairData) -> dict:
    """Accuracy (r_c > r_r; a tie counts half) overall and per test set, each also by rating level
    (Table 8: highest on "significantly better", towards chance on "negligibly better"), by task
    family (a small model can learn "looks familiar" instead of quality) and by batch."""
    diff = (r_c - r_r).double().numpy()
    correct = (diff > 0) + 0.5 * (diff == 0)

    def breakdown(idx: np.ndarray) -> dict:
        out = _accuracy(correct[idx])
        out["mean_gap"] = float(diff[idx].mean()) if len(idx) else None
        for key, values, order in (("by_rating", data.rating, RATINGS), ("by_task", data.task, None),
                                   ("by_batch", data.batch, None)):
            groups = defaultdict(list)
            for i in idx:
                groups[values[i]].append(i)
            keys = [k for k in order if k in groups] if order else sorted(groups)
            out[key] = {str(k): _accuracy(correct[groups[k]]) for k in keys}
        return out

    sets = defaultdict(list)
    for i, name in enumerate(data.test_set):
        sets[name].append(i)
    report = {"overall": breakdown(np.arange(len(diff))),
              "test_sets": {name: breakdown(np.array(idx)) for name, idx in sorted(sets.items())}}
    report["skipped"] = dict(data.skipped)
    return report
