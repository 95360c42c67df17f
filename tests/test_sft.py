"""SFT (§3.1): answer-only loss masks, packing, last-turn mode, and the recipe end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama2.chat_format import ChatFormat
from llama2.checkpoint import save_native
from llama2.config import ConfigError, load_config
from llama2.dialog_data import DialogLoader, pack, tokenize_dialogs
from llama2.losses import IGNORE, lm_loss
from llama2.model import ModelArgs, Transformer
from llama2.recipes.sft import SFTConfig, load_dialogs, main

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "assets" / "losses" / "sft_tiny.json"

DIALOG = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "add 2 and 3"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "and times 4?"},
    {"role": "assistant", "content": "5 x 4 = 20."},
]


def test_targets_are_exactly_the_answer_tokens(world_tokenizer):
    fmt = ChatFormat(world_tokenizer, "llama2")
    ids, mask = fmt.training_ids(DIALOG)
    ex = tokenize_dialogs([{"id": "a", "messages": DIALOG}], fmt, 512)
    x, y = ex.inputs[0], ex.targets[0]
    assert x.tolist() == ids[:-1]
    assert [t != IGNORE for t in y] == mask[1:]  # target i is trained iff token i+1 is the assistant's
    assert [t for t in y if t != IGNORE] == [t for t, m in zip(ids, mask) if m]
    assert world_tokenizer.eos_id in y.tolist()  # every answer learns to stop
    # both answers are trained; decoding the trained tokens gives the answers back
    text = world_tokenizer.decode([t for t in y.tolist() if t != IGNORE])
    assert "2 + 3 = 5." in text and "5 x 4 = 20." in text and "add" not in text
    # gradients flow only from those positions
    logits = torch.randn(1, len(x), world_tokenizer.vocab_size, requires_grad=True)
    lm_loss(logits, torch.from_numpy(y).long()[None], reduction="sum").backward()
    has_grad = logits.grad[0].abs().sum(-1) > 0
    assert has_grad.tolist() == [t != IGNORE for t in y]


def test_last_turn_only(world_tokenizer):
    fmt = ChatFormat(world_tokenizer, "llama2")
    full = tokenize_dialogs([{"id": "a", "messages": DIALOG}], fmt, 512).targets[0]
    last = tokenize_dialogs([{"id": "a", "messages": DIALOG, "meta": {"train_last_turn_only": True}}], fmt, 512).targets[0]
    text = world_tokenizer.decode([t for t in last.tolist() if t != IGNORE])
    assert "5 x 4 = 20." in text and "2 + 3" not in text
    assert (last != IGNORE).sum() < (full != IGNORE).sum()


def test_too_long_dialogs_are_counted_not_dropped_silently(world_tokenizer):
    fmt = ChatFormat(world_tokenizer, "llama2")
    long = [{"role": "user", "content": "hello " * 300}, {"role": "assistant", "content": "hi"}]
    ex = tokenize_dialogs([{"id": "a", "messages": DIALOG}, {"id": "b", "messages": long}], fmt, 200)
    assert len(ex) == 1 and ex.skipped == {"longer than seq_len": 1}


def test_best_fit_packing():
    lengths = np.array([5, 3, 7, 2, 4, 1, 8])
    rows = pack(lengths, 10, np.arange(7))
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(lengths[r].sum() <= 10 for r in rows)
    assert len(rows) == 3  # 30 tokens in 3 rows of 10: a perfect fit exists and is found


@pytest.fixture(scope="module")
def world_examples(world_dir, world_tokenizer):
    fmt = ChatFormat(world_tokenizer, "llama2")
    return tokenize_dialogs(load_dialogs([str(world_dir / "sft" / "train.jsonl")]), fmt, 256)


def test_packing_fills_rows_on_builtin_data(world_examples):
    loader = DialogLoader(world_examples, 256, 8)
    assert loader.utilisation() >= 0.95  # packing wastes at most 5% of each row


def test_packed_loss_equals_unpacked_loss(world_examples, world_tokenizer):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=world_tokenizer.vocab_size,
                              hidden_dim=64, max_seq_len=256)).eval()
    m.init_weights(std=0.2)
    sub = type(world_examples)(world_examples.inputs[:40], world_examples.targets[:40], world_examples.ids[:40], {})

    # every example's loss sum inside a packed row equals its loss run alone
    loader_p = DialogLoader(sub, 256, 1, packed=True, shuffle=False, epochs=1)
    per_example = {}
    with torch.no_grad():
        for row in loader_p.rows(0):
            b = loader_p.collate([row])
            ce = torch.nn.functional.cross_entropy(
                m(b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"])[0], b["targets"][0],
                ignore_index=IGNORE, reduction="none")
            at = 0
            for i in row:
                n = len(sub.inputs[i])
                per_example[i] = ce[at:at + n].sum().item()
                at += n
        for i in range(len(sub)):
            x = torch.from_numpy(sub.inputs[i]).long()[None]
            alone = lm_loss(m(x), torch.from_numpy(sub.targets[i]).long()[None], reduction="sum").item()
            assert abs(alone - per_example[i]) < 1e-3 * max(1.0, abs(alone))
    assert len(per_example) == len(sub) and max(len(r) for r in loader_p.rows(0)) > 1  # rows do hold several


def test_loader_resumes_exactly(world_examples):
    a = DialogLoader(world_examples, 256, 4, seed=3)
    first = [next(a) for _ in range(5)]
    state = a.state_dict()
    rest = [next(a) for _ in range(4)]
    b = DialogLoader(world_examples, 256, 4, seed=3)
    b.load_state_dict(state)
    for x, y in zip(rest, [next(b) for _ in range(4)]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(first[0]["tokens"], rest[0]["tokens"])


def test_two_ranks_split_rows(world_examples):
    one = DialogLoader(world_examples, 256, 4, seed=1)
    r0 = DialogLoader(world_examples, 256, 2, seed=1, rank=0, world_size=2)
    r1 = DialogLoader(world_examples, 256, 2, seed=1, rank=1, world_size=2)
    for _ in range(3):
        full, a, b = next(one), next(r0), next(r1)
        assert torch.equal(full["tokens"], torch.cat([a["tokens"], b["tokens"]]))


@pytest.fixture(scope="module")
def base_model(world_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=world_tokenizer.vocab_size,
                              hidden_dim=128, max_seq_len=256))
    m.init_weights()
    d = tmp_path_factory.mktemp("sft_base") / "base"
    save_native(d, m, tokenizer=world_tokenizer)
    return d


def sft_overrides(world_dir, base, out, **kw):
    base_kw = {"model": str(base), "out_dir": str(out), "train_data": f"[{world_dir / 'sft' / 'train.jsonl'}]",
               "eval_data": f"[{world_dir / 'sft' / 'test.jsonl'}]", "seq_len": 128, "batch_size": 8,
               "micro_batch_size": 4, "epochs": 0.04, "optim.lr": 3e-3, "eval_every": 4, "ckpt_every": 4,
               "log_every": 1}
    base_kw.update(kw)
    return [f"{k}={v}" for k, v in base_kw.items()]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_recipe_learns_and_matches_reference(world_dir, base_model, tmp_path, monkeypatch, reference):
    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    main(load_config(SFTConfig, None, sft_overrides(world_dir, base_model, tmp_path / "run", ckpt_every=0)))
    got = losses(tmp_path / "run")
    last = max(got)
    assert last >= 8 and got[last] < got[1] - 0.5
    # Silent numerical changes show up here; regenerate deliberately with LLAMA2_UPDATE_REFERENCE=1.
    ref = {int(k): v for k, v in reference(REFERENCE, got).items()}  # every logged step, no more
    assert all(abs(got[s] - ref[s]) < 2e-3 for s in ref), {s: (got[s], ref[s]) for s in ref}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" in rows[-1]
    from llama2.checkpoint import load_model

    model, tok = load_model(tmp_path / "run" / "final")
    assert tok.vocab_size == model.args.vocab_size


def test_float16_with_loss_scaling_learns(world_dir, base_model, tmp_path, monkeypatch):
    """dtype float16: autocast with dynamic loss scaling; a scale too large for the gradients is backed off."""
    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    main(load_config(SFTConfig, None, sft_overrides(world_dir, base_model, tmp_path / "fp16", ckpt_every=0,
                                                    dtype="float16", **{"optim.loss_scale": 5e5})))
    rows = [json.loads(line) for line in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in rows) >= 1 and rows[-1]["skipped"] == 0 and rows[-1]["loss_scale"] < 5e5
    assert all(r["grad_norm"] == 0.0 for r in rows if r["skipped"])  # no update on an overflowed step
    stepped = [r["loss"] for r in rows if not r["skipped"]]
    assert len(stepped) >= 6 and stepped[-1] < stepped[0] - 0.3


def test_pretrain_mix_runs(world_dir, base_model, world_tokenizer, tmp_path, monkeypatch):
    from llama2.pretokenize import pretokenize

    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    tok_dir = tmp_path / "tok"
    world_tokenizer.save(tok_dir)
    pretokenize([world_dir / "corpus" / "pretrain.jsonl"], tok_dir, tmp_path / "tokens", workers=1)
    main(load_config(SFTConfig, None, sft_overrides(world_dir, base_model, tmp_path / "mix", ckpt_every=0,
                                                    epochs=0.005, pretrain_mix=0.5,
                                                    pretrain_data=str(tmp_path / "tokens"))))
    rows = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert all("pretrain_loss" in r for r in rows)


def test_too_little_data_for_one_batch_is_refused_not_looped(world_dir, world_examples, base_model, tmp_path):
    # 5 dialogs pack into at most 5 rows: the loader could never fill a step of 16 rows (it used to
    # cycle through epochs forever looking for one) and the recipe says so before it starts
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join((world_dir / "sft" / "train.jsonl").read_text().splitlines()[:5]) + "\n")
    sub = type(world_examples)(world_examples.inputs[:5], world_examples.targets[:5], world_examples.ids[:5], {})
    with pytest.raises(ValueError, match="5 examples pack into [1-5] rows of 256 tokens, fewer than one step's 16"):
        next(DialogLoader(sub, 256, 16))
    with pytest.raises(ConfigError, match="train_data: [1-5] dialogs pack into [1-5] rows of 128 tokens, fewer than one"):
        main(load_config(SFTConfig, None, sft_overrides(world_dir, base_model, tmp_path / "few",
                                                        train_data=f"[{few}]", eval_data="[]")))


def test_killed_sft_resumes_exactly(world_dir, base_model, tmp_path):
    env = {**os.environ, "LLAMA2_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

    def run(out, extra=(), kill=None):
        e = dict(env, **({"LLAMA2_KILL_AT_STEP": str(kill)} if kill else {}))
        return subprocess.run([sys.executable, "-m", "llama2", "sft", *sft_overrides(world_dir, base_model, out),
                               *extra], env=e, cwd=REPO, capture_output=True, text=True, timeout=600)

    assert run(tmp_path / "full").returncode == 0
    assert run(tmp_path / "k", kill=6).returncode == -9
    r = run(tmp_path / "k", ["--resume"])
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path / "k") == losses(tmp_path / "full")
