"""Dialog data for SFT-style training (Llama 2 §3.1): tokenize, mask, pack, load.

§3.1: "we concatenate all the prompts and answers from the training set... we zero-out the loss
on tokens from the user prompt, so we only backpropagate on answer tokens". Each dialog becomes
(input, target) pairs whose target is IGNORE except on assistant tokens (the chat format's mask,
including the EOS that ends each answer). Examples are packed whole into rows of `seq_len`
positions (best-fit decreasing), each with its own document id and positions, so that the
packed-attention mask keeps them apart; an example is never split across rows.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from llama2.chat_format import ChatFormat, ChatFormatError
from llama2.losses import IGNORE


@dataclass
class DialogExamples:
    inputs: list[np.ndarray]  # int32 token ids fed to the model
    targets: list[np.ndarray]  # int32 next-token targets, IGNORE where no loss
    ids: list[str]
    skipped: dict[str, int]  # reason -> count (reported, never silent)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.inputs], dtype=np.int64)

    @property
    def trained_tokens(self) -> int:
        return int(sum((t != IGNORE).sum() for t in self.targets))


def tokenize_dialogs(records: list[dict], fmt: ChatFormat, seq_len: int, last_turn_only: bool = False,
                     where: str = "") -> DialogExamples:
    """Training pairs for each record with `messages` ending in an assistant turn.

    A record may ask for last-turn-only training with meta.train_last_turn_only (Ghost Attention
    data, §3.3). Dialogs longer than `seq_len` are skipped and counted.
    """
    inputs, targets, ids, skipped = [], [], [], {}
    for n, rec in enumerate(records):
        last_only = bool((rec.get("meta") or {}).get("train_last_turn_only", last_turn_only))
        try:
            toks, mask = fmt.training_ids(rec["messages"], last_turn_only=last_only)
        except ChatFormatError as e:
            raise ChatFormatError(f"{where}record {n + 1} (id {rec.get('id')!r}): {e}") from None
        if len(toks) - 1 > seq_len:
            skipped["longer than seq_len"] = skipped.get("longer than seq_len", 0) + 1
            continue
        toks = np.asarray(toks, dtype=np.int32)
        tgt = toks[1:].copy()
        tgt[~np.asarray(mask[1:], dtype=bool)] = IGNORE  # learn only assistant tokens
        if (tgt != IGNORE).sum() == 0:
            skipped["no assistant tokens"] = skipped.get("no assistant tokens", 0) + 1
            continue
        inputs.append(toks[:-1])
        targets.append(tgt)
        ids.append(str(rec.get("id", n)))
    return DialogExamples(inputs, targets, ids, skipped)


def pack(lengths: np.ndarray, seq_len: int, order: np.ndarray) -> list[list[int]]:
    """Best-fit decreasing: each example (longest first, ties in `order`) goes into the row with
    the least room that still fits it. Returns rows as lists of example indices."""
    ranked = sorted(order.tolist(), key=lambda i: -int(lengths[i]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in ranked:
        need = int(lengths[i])
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, r))
    return rows


class DialogLoader:
    """Packed batches of dialog examples, reshuffled and repacked per epoch, sharded by rank,
    resumable from (epoch, cursor). Batches: tokens, targets, doc_ids, positions — all (B, T)."""

    def __init__(self, examples: DialogExamples, seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, packed: bool = True,
                 epochs: int | None = None, pad_id: int = 0):
        if len(examples) == 0:
            raise ValueError("no training examples (every dialog was skipped: " + str(examples.skipped) + ")")
        self.ex, self.T, self.B = examples, seq_len, batch_size
        self.rank, self.world, self.seed, self.shuffle, self.packed = rank, world_size, seed, shuffle, packed
        self.epochs, self.pad_id = epochs, pad_id
        self.epoch, self.cursor = 0, 0  # cursor: global rows already consumed in this epoch
        self._rows_cache: tuple[int, list[list[int]]] | None = None

    def rows(self, epoch: int) -> list[list[int]]:
        if self._rows_cache and self._rows_cache[0] == epoch:
            return self._rows_cache[1]
        n = len(self.ex)
        order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
        if self.packed:
            rows = pack(self.ex.lengths, self.T, order)
            # shuffle the rows too: best-fit puts the long examples first
            if self.shuffle:
                perm = np.random.default_rng((self.seed, epoch, 1)).permutation(len(rows))
                rows = [rows[i] for i in perm]
        else:
            rows = [[int(i)] for i in order]
        self._rows_cache = (epoch, rows)
        return rows

    def steps_per_epoch(self) -> int:
        """Optimizer-visible batches per epoch (a partial last batch is dropped: all ranks stay in step)."""
        return len(self.rows(0)) // (self.B * self.world)

    def utilisation(self) -> float:
        """Share of non-padding positions in the packed rows (§3.1: packing fills the context)."""
        rows = self.rows(0)
        used = sum(int(self.ex.lengths[i]) for r in rows for i in r)
        return used / (len(rows) * self.T)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        per_step = self.B * self.world
        while True:
            if self.epochs is not None and self.epoch >= self.epochs:
                raise StopIteration
            rows = self.rows(self.epoch)
            if self.cursor + per_step <= len(rows):
                break
            if len(rows) < per_step:  # no epoch can fill a step: stop instead of looping through epochs
                raise ValueError(f"{len(self.ex)} examples pack into {len(rows)} rows of {self.T} tokens, fewer than "
                                 f"one step's {per_step} rows ({self.B} per rank x {self.world} ranks)")
            self.epoch, self.cursor = self.epoch + 1, 0
        first = self.cursor + self.rank * self.B
        batch = self.collate([rows[first + b] for b in range(self.B)])
        self.cursor += per_step
        return batch

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        B, T = len(rows), self.T
        tokens = np.full((B, T), self.pad_id, dtype=np.int64)
        targets = np.full((B, T), IGNORE, dtype=np.int64)
        doc_ids = np.full((B, T), -1, dtype=np.int64)
        positions = np.zeros((B, T), dtype=np.int64)
        for b, row in enumerate(rows):
            at = 0
            for d, i in enumerate(row):
                x, y = self.ex.inputs[i], self.ex.targets[i]
                n = len(x)
                tokens[b, at:at + n], targets[b, at:at + n] = x, y
                doc_ids[b, at:at + n], positions[b, at:at + n] = d, np.arange(n)
                at += n
            # padding: its own document (never attended to by real tokens), no loss
            doc_ids[b, at:] = len(row)
            positions[b, at:] = np.arange(T - at)
        return {k: torch.from_numpy(v) for k, v in
                dict(tokens=tokens, targets=targets, doc_ids=doc_ids, positions=positions).items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "examples": len(self.ex)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("examples") != len(self.ex):
            raise ValueError(f"cannot resume the dialog loader: saved for seed {state.get('seed')} and "
                             f"{state.get('examples')} examples, now seed {self.seed} and {len(self.ex)}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
