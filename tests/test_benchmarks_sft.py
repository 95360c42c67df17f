"""benchmarks/sft.py feeds trl the rows our SFT loader packs: same tokens, targets, documents (no trl needed)."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from llama2.dialog_data import DialogExamples
from llama2.losses import IGNORE, lm_loss

spec = importlib.util.spec_from_file_location("bench_sft", Path(__file__).parent.parent / "benchmarks" / "sft.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def synthetic_examples(n=13, seed=0) -> DialogExamples:
    rng = np.random.default_rng(seed)
    inputs, targets = [], []
    for _ in range(n):
        length = int(rng.integers(5, 30))
        x = rng.integers(3, 50, length).astype(np.int32)
        y = np.roll(x, -1)
        y[: length // 2] = IGNORE  # the "prompt" has no loss
        inputs.append(x)
        targets.append(y)
    return DialogExamples(inputs, targets, [str(i) for i in range(n)], {})


def test_trl_rows_are_our_loader_rows():
    ex = synthetic_examples()
    batch = next(bench.recipe_loader(ex, 32, 4, pad_id=0))
    rows = [bench.trl_example(batch, b) for b in range(4)]
    assert torch.equal(torch.tensor([r["input_ids"] for r in rows]), batch["tokens"])
    assert torch.equal(torch.tensor([r["shift_labels"] for r in rows]), batch["targets"])
    pos = torch.tensor([r["position_ids"] for r in rows])
    # transformers' packed-sequence detection (a new document wherever positions do not step by 1) gives our doc ids
    starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
    assert torch.equal(starts.cumsum(-1), batch["doc_ids"])
    # non-padding tokens: the dialogs' lengths, padding tail excluded
    loader = bench.recipe_loader(ex, 32, 4, pad_id=0)
    rows_idx = loader.rows(0)[:4]
    assert bench.non_padding(batch) == sum(len(ex.inputs[i]) for r in rows_idx for i in r)


def test_full_row_has_no_padding():
    x = np.arange(3, 11, dtype=np.int32)
    y = x.copy()
    y[:2] = IGNORE
    ex = DialogExamples([x, x.copy()], [y, y.copy()], ["a", "b"], {})
    batch = next(bench.recipe_loader(ex, 16, 1, pad_id=0))
    assert bench.non_padding(batch) == 16


def test_shift_labels_loss_is_our_loss():
    from transformers.loss import loss_utils as lf  # the test extra: missing is a failure
    ex = synthetic_examples(seed=1)
    batch = next(bench.recipe_loader(ex, 32, 4, pad_id=0))
    logits = torch.randn(4, 32, 50)
    ours = lm_loss(logits, batch["targets"])
    n = int((batch["targets"] != IGNORE).sum())
    theirs = lf.ForCausalLMLoss(logits, batch["targets"], 50, num_items_in_batch=n, shift_labels=batch["targets"])
    torch.testing.assert_close(theirs, ours)
