"""Reward models (Llama 2 §3.2.2): the chat model with its next-token head replaced by a scalar head.

A reward model scores a (dialog, response) pair with one number: the scalar head's output at the
token that closes the response (EOS in Llama 2's format, the end-of-turn token of a chat template),
the dialog rendered exactly as the policy sees it.
- `reward_state`: a reward model's weights from any checkpoint (new head, initialised small);
- `response_ids`: the ids a score is read from;
- `pair_scores`: chosen and rejected in one forward pass;
- `RewardScorer`: batched scoring for rejection sampling, PPO and evaluation (`score`, `prob`).
The preference data these models learn from is in llama2.preference_data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llama2.chat_format import ChatFormat, ChatFormatError, Dialog
from llama2.checkpoint import build_model, read_checkpoint
from llama2.checkpoint_base import CheckpointError
from llama2.cpu_kernels import Ragged
from llama2.model import ModelArgs, Transformer


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

    The sequences run end to end in one unpadded row (llama2.cpu_kernels.Ragged), longest first so that
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
