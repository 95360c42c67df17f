"""Reward models (Llama 2 §3.2.2): the chat model with its next-token head replaced by a scalar head.

A reward model scores a (dialog, response) pair with one number: the scalar head's output at the
token that closes the response (EOS in Llama 2's format, the end-of-turn token of a chat template),
the dialog rendered exactly as the policy sees it. What every stage that trains or uses one shares:
- `reward_state`: a reward model's weights from any checkpoint (new head, initialised small);
- `response_ids`: the ids a score is read from;
- `read_pairs`, `mix_pairs`, `tokenize_pairs`: preference files (errors name file, line and field),
  the helpfulness / safety data mixes, and tokenized pairs with counted skips;
- `pair_scores`: chosen and rejected in one forward pass; `PairLoader`: resumable batches;
- `RewardScorer`: batched scoring for rejection sampling, PPO and evaluation (`score`, `prob`);
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

from llama2.chat_format import ChatFormat, ChatFormatError, Dialog
from llama2.checkpoint import build_model, read_checkpoint
from llama2.checkpoint_base import CheckpointError
from llama2.losses import RATINGS
from llama2.model import ModelArgs, Ragged, Transformer
from llama2.world.formats import AXES, DataError, iter_rows, validate_file

OBJECTIVES = AXES  # one reward model per preference axis: helpfulness and safety (§3.2.2)
# Share of a reward model's training mix drawn from the *other* pairs (§3.2.2): the helpfulness RM
# adds "an equal amount" of safety and open-source pairs (half the mix); the safety RM is 90/10.
PAPER_OTHER_SHARE = {"helpfulness": 0.5, "safety": 0.1}


# ----------------------------------------------------------------------------- the model


def reward_state(args: ModelArgs, state: dict[str, torch.Tensor], init_std: float | None = None,
                 seed: int = 0) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """A reward model's (args, weights) from a checkpoint's: the next-token head replaced (§3.2.2).

    The new head is N(0, std²) with std = 1/(dim+1) by default: the final hidden state is
    RMS-normalised (norm ≈ sqrt(dim)), so initial scores are ~1/sqrt(dim), close to 0. The first
    loss is then the uninformed log(1 + e^m) rather than a random preference, while the backbone
    still gets a gradient from the first step (a zero head would give it none).
    A checkpoint that already has a scalar head (a reward model being trained on a new weekly
    batch) is returned as it is.
    """
    if args.head == "scalar":
        return args, dict(state)
    rm_args = ModelArgs.from_dict({**args.to_dict(), "head": "scalar", "tie_embeddings": False})
    std = 1.0 / (args.dim + 1) if init_std is None else init_std
    head = torch.randn(1, args.dim, generator=torch.Generator().manual_seed(seed)) * std
    state = {k: v for k, v in state.items() if k != "output.weight"}
    state["output.weight"] = head.to(state["tok_embeddings.weight"].dtype)
    return rm_args, state


def response_ids(fmt: ChatFormat, dialog: Dialog, response: str) -> list[int]:
    """Ids of `dialog` answered by `response`, ending with the token that closes the answer.

    That token (EOS / end of turn) has seen the whole dialog and the whole answer, and it is the
    same token for every answer, so the score is read there. Template glue after it (ChatML's
    newline) is cut: causal attention means it could not change the score anyway.
    """
    ids, mask = fmt.training_ids(list(dialog) + [{"role": "assistant", "content": response}])
    last = len(mask) - 1 - mask[::-1].index(True)
    return ids[: last + 1]


def packed_scores(model: Transformer, seqs: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """The scalar head at each sequence's last token (the token that closes the answer, see
    `response_ids`): (N,) float32, in the order of `seqs`.

    The sequences run end to end in one unpadded row (llama2.model.Ragged), longest first so that
    attention groups similar lengths: each is computed as if alone and costs its own tokens only.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    tokens = torch.as_tensor(np.concatenate([np.asarray(seqs[i], dtype=np.int64) for i in order]))[None].to(device)
    ragged = Ragged([len(seqs[i]) for i in order], tokens.device)
    scores = model(tokens, lengths=ragged, keep=ragged.ends)[:, 0].float()  # the last block only there
    return torch.empty_like(scores).index_copy_(0, torch.tensor(order, device=scores.device), scores)


def pair_scores(model: Transformer, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y_c) and r(x, y_r) of B pairs in ONE forward pass over all 2B sequences (§3.2.2)."""
    scores = packed_scores(model, list(chosen) + list(rejected), device)  # (2B,)
    return scores[: len(chosen)], scores[len(chosen):]


# ----------------------------------------------------------------------------- data


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
              main_sources: Sequence[str] = (), seed: int = 0) -> tuple[list[PairRow], dict]:
    """The training mix of one reward model (§3.2.2) and a summary naming its sources.

    Main pairs: every pair of the objective's axis (and of `main_sources`, e.g. harmless
    open-source data for the safety RM). Other pairs are sampled uniformly without replacement
    so that they make up `other_share` of the mix (0.5: "an equal amount" for helpfulness; 0.1:
    the safety RM's 90/10); when there are too few, all are taken and the shortfall reported.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    share = PAPER_OTHER_SHARE[objective] if other_share is None else other_share
    if not 0 <= share < 1:
        raise ValueError(f"mix.other_share: expected a share in [0, 1), got {share}")
    main = [r for r in rows if r.record["axis"] == objective or r.record["source"] in main_sources]
    if not main:
        raise ValueError(f"no {objective} pairs in the training data (check the files' 'axis' fields)")
    pool = [r for r in rows if not (r.record["axis"] == objective or r.record["source"] in main_sources)]
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


# ----------------------------------------------------------------------------- scoring


class RewardScorer:
    """Scores (dialog, response) pairs with a reward model, for rejection sampling, PPO and
    evaluation. `score` gives the raw scalar; `prob` its sigmoid, the form the PPO safety gate
    thresholds (§3.2.3). Sequences are sorted by length and batched; each batch runs unpadded."""

    def __init__(self, model: Transformer | str | Path, tokenizer=None, batch_size: int = 32,
                 device: str | torch.device = "cpu", chat_format: str = "auto", dtype: torch.dtype = torch.float32):
        if isinstance(model, (str, Path)):
            ck = read_checkpoint(model)
            if ck.args.head != "scalar":
                raise CheckpointError(f"{model}: not a reward model (its head is {ck.args.head!r}); "
                                      "train one with `llama2 reward train`")
            tokenizer = tokenizer or ck.tokenizer()
            model = build_model(ck.args, ck.state, ck.source, device, dtype)
        if model.args.head != "scalar":
            raise ValueError("RewardScorer needs a model with a scalar head (ModelArgs.head='scalar')")
        if tokenizer is None:
            raise ValueError("RewardScorer needs the reward model's tokenizer")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = torch.device(device)
        self.fmt = ChatFormat(tokenizer, chat_format)

    def ids(self, dialogs: Sequence[Dialog], responses: Sequence[str]) -> list[list[int]]:
        if len(dialogs) != len(responses):
            raise ValueError(f"{len(dialogs)} dialogs but {len(responses)} responses")
        seqs = []
        limit = self.model.args.max_seq_len
        for i, (dialog, response) in enumerate(zip(dialogs, responses)):
            try:
                ids = response_ids(self.fmt, dialog, response)
            except ChatFormatError as e:
                raise ChatFormatError(f"dialog {i}: {e}") from None
            if len(ids) > limit:
                raise ValueError(f"dialog {i}: {len(ids)} tokens with its response, more than the reward "
                                 f"model's context of {limit}")
            seqs.append(ids)
        return seqs

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores (N,) on CPU of already tokenized sequences, in their order."""
        out = torch.empty(len(seqs), dtype=torch.float32)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first: memory peaks early
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            out[idx] = packed_scores(self.model, [seqs[i] for i in idx], self.device).cpu()
        return out

    def score(self, dialogs: Sequence[Dialog], responses: Sequence[str]) -> torch.Tensor:
        """Raw reward r(x, y) of each (dialog ending with a user turn, response): (N,) float32."""
        return self.score_ids(self.ids(dialogs, responses))

    def prob(self, dialogs: Sequence[Dialog], responses: Sequence[str]) -> torch.Tensor:
        """σ(r(x, y)): the score as a probability, as the PPO safety gate uses it (§3.2.3)."""
        return torch.sigmoid(self.score(dialogs, responses))


# ----------------------------------------------------------------------------- evaluation


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
