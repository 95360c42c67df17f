"""Ghost Attention end to end (§3.3): the recipe's data construction, the multi-turn evaluation,
the attention probabilities of Figure 10, and the recipe resumed after a kill."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2.chat_format import ChatFormat
from llama2.config import ConfigError, load_config
from llama2.dialog_data import tokenize_dialogs
from llama2.losses import IGNORE
from llama2.model import ModelArgs, Transformer, attention_probs
from llama2.recipes import gatt as recipe
from llama2.recipes.gatt import Instruction, read_instructions, sampling_dialog, synthesize, training_records
from llama2.recipes.multi_turn import (MultiTurnConfig, build_eval_dialogs, converse, first_below_half, score,
                                       system_attention, system_span)
from llama2.world import gatt as world_gatt

REPO = Path(__file__).resolve().parent.parent
USERS = ["What is 2 + 2?", "Name a red fruit.", "Where does Tom live?"]
ANSWERS = ["Napoleon here. 4.", "Napoleon here. An apple.", "Napoleon here. Oakton."]


def world_ins(text: str) -> Instruction:
    return Instruction(text, world_gatt.check, recipe.WORLD_CHECKER, "figure", text)


# ----------------------------------------------------------------------------- data construction


def test_sampling_dialog_has_the_instruction_on_every_user_turn():
    msgs = sampling_dialog("Figure: Napoleon", USERS, ANSWERS[:2])
    assert msgs == world_gatt.sampling_messages("Figure: Napoleon", USERS, ANSWERS[:2])
    assert [m["content"] for m in msgs if m["role"] == "user"] == [f"Figure: Napoleon\n{u}" for u in USERS]
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == ANSWERS[:2]
    with pytest.raises(ValueError, match="nothing left to sample"):
        sampling_dialog("x", USERS, ANSWERS)


def test_training_data_keeps_the_instruction_in_the_first_turn_only(world_tokenizer):
    (rec,) = training_records("Figure: Napoleon", USERS, ANSWERS, "d", system_message=True)
    assert rec["messages"] == world_gatt.training_dialogs("Figure: Napoleon", USERS, ANSWERS, every_turn=False)[0][
        "messages"]
    assert rec["messages"][0] == {"role": "system", "content": "Figure: Napoleon"}
    assert [m["content"] for m in rec["messages"] if m["role"] == "user"] == USERS
    assert rec["meta"]["train_last_turn_only"] is True
    (plain,) = training_records("Figure: Napoleon", USERS, ANSWERS, "d", system_message=False)
    assert [m["role"] for m in plain["messages"]][:2] == ["user", "assistant"]
    assert [m["content"] for m in plain["messages"] if m["role"] == "user"] == ["Figure: Napoleon\n" + USERS[0]] + USERS[1:]
    assert len(training_records("x", USERS, ANSWERS, "d", every_turn=True)) == 3

    # which tokens carry loss: exactly the last answer (and the token that closes it), nothing earlier
    fmt = ChatFormat(world_tokenizer)
    for r in (rec, plain):
        ex = tokenize_dialogs([r], fmt, 512)
        tgt, inp = ex.targets[0], ex.inputs[0]
        trained = [int(t) for t in tgt if t != IGNORE]
        assert world_tokenizer.decode(trained[:-1]).strip() == ANSWERS[-1]  # then the token closing the turn
        first_trained = int((tgt != IGNORE).nonzero()[0][0])
        earlier = world_tokenizer.decode([int(t) for t in inp[: first_trained + 1]])
        for a in ANSWERS[:-1]:
            assert a in earlier  # the earlier answers are there, in the context, without loss
        ids, mask = fmt.training_ids(r["messages"], last_turn_only=True)
        assert [i for i, m in zip(ids[1:], mask[1:]) if m] == trained


def fake_answerer(rule):
    """An answer function that calls rule(instruction, question, attempt) and records its prompts."""
    seen = []

    def answer(dialogs, seed):
        out = []
        for d in dialogs:
            seen.append(d)
            instruction, question = d[-1]["content"].split("\n", 1)
            out.append((rule(instruction, question, seed), True))
        return out
    return answer, seen


def test_synthesis_resamples_then_drops_and_counts():
    dialogs = [("a", USERS, world_ins("Figure: Napoleon")), ("b", USERS[:2], world_ins("Hobby: chess")),
               ("c", USERS, Instruction("Be kind.", None, "", "custom", "c"))]
    rng = random.Random(0)
    first_seeds = set()

    def rule(instruction, question, seed):
        if instruction == "Be kind.":
            return "Sure."
        if instruction == "Hobby: chess":
            return "I do not play."  # never holds: dropped after the retries
        if question == USERS[1] and seed in first_seeds:  # holds on the first re-sample only
            return "An apple."
        return world_gatt.comply(instruction, "Fine.", rng)

    answer, seen = fake_answerer(rule)
    first_seeds.update(recipe.derive_seed(0, t, 0) for t in range(5))
    kept, stats = synthesize(dialogs, answer, lambda d: True, retries=2, seed=0)
    assert [k[0] for k in kept] == ["a", "c"]
    assert stats["dropped_broke_instruction"] == 1 and stats["kept"] == 2
    assert stats["resampled"] == 2 + 1  # b's first turn twice; a's second turn once
    assert all(world_gatt.check("Figure: Napoleon", a) for a in kept[0][2])
    assert kept[1][2] == ["Sure."] * 3  # no checker: used for training, never checked
    for d in seen:  # the instruction on every user turn while sampling
        instruction = d[-1]["content"].split("\n")[0]
        assert all(m["content"].startswith(instruction + "\n") for m in d if m["role"] == "user")

    # repair instead of dropping; a dialog that does not fit the context at all is skipped, one that
    # fills it later is cut there
    answer, _ = fake_answerer(lambda i, q, s: "I do not play.")
    kept, stats = synthesize(dialogs[:2], answer, lambda d: len(d) < 3, retries=0, seed=0,
                             repair=world_gatt.comply)
    assert stats["repaired"] == 2 and stats["shortened_by_context"] == 2 and [len(k[2]) for k in kept] == [1, 1]
    kept, stats = synthesize(dialogs[:2], answer, lambda d: False, retries=0, seed=0)
    assert kept == [] and stats["skipped_longer_than_context"] == 2


def test_user_turns_skip_dialogs_without_enough_user_turns():
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(5)]
    recs.append({"id": "m", "messages": [{"role": "system", "content": "s"}] + [
        m for u in USERS for m in ({"role": "user", "content": u}, {"role": "assistant", "content": "a"})]})
    recs.append({"id": "empty", "messages": []})
    stats = {"skipped": {}}
    out = recipe.user_turns(recs, 2, 2, stats)
    assert out[0] == ("m", USERS) and [u for _, u in out[1:]] == [["q0", "q1"], ["q2", "q3"]]
    assert stats["skipped"] == {"no user turn": 1, "stitched: dialogs with too few user turns": 5}
    stats = {"skipped": {}}
    assert recipe.user_turns(recs, 2, 0, stats) == [("m", USERS)]
    assert stats["skipped"] == {"no user turn": 1, "too few user turns": 5}


def test_world_instructions_respect_kinds_hold_out_and_short_share():
    rng = random.Random(0)
    made = [recipe.world_instruction(rng, ["language", "figure"], ["napoleon"], 3, 0.5) for _ in range(300)]
    assert {k for m in made for k in m.kind.split("+")} == {"language", "figure"}
    assert not any("napoleon" in m.id for m in made)
    assert 100 < sum(":" in m.text for m in made) < 200  # half in the short form
    assert all(world_gatt.parse(m.text) and m.checker is world_gatt.check for m in made)
    assert all("hobby" in recipe.world_instruction(rng, list(world_gatt.KINDS), must="hobby").kind for _ in range(20))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, match", [
    ('{"instruction": "Be brief.", "checker": "no_such_module_xyz:check"}', r":2: field 'checker': no module"),
    ('{"instruction": "Be brief.", "checker": "llama2.world.gatt:nope"}', r":2: field 'checker': module .* has no"),
    ('{"instruction": "Be brief.", "checker": "nocolon"}', r":2: field 'checker': expected `module:attr`"),
    ('{"instruction": ""}', r":2: field 'instruction': a non-empty string"),
    ('{"instruction": "x", "chekcer": "a:b"}', r":2: unknown field\(s\) 'chekcer'"),
    ('not json', r":2: not JSON"),
])
def test_bad_instruction_files_name_file_line_and_field(tmp_path, line, match):
    f = tmp_path / "ins.jsonl"
    f.write_text('{"instruction": "Figure: Napoleon", "checker": "llama2.world.gatt:check"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=str(f).replace(".", r"\.") + match):
        read_instructions(str(f))


def test_instruction_file_with_and_without_checkers(tmp_path):
    f = tmp_path / "ins.jsonl"
    f.write_text('{"instruction": "Figure: Napoleon", "checker": "llama2.world.gatt:check", "kind": "figure"}\n'
                 '\n{"instruction": "Be kind."}\n')
    a, b = read_instructions(str(f))
    assert a.checker is world_gatt.check and a.kind == "figure" and b.checker is None and b.id == "line-3"


def test_recipe_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="policy: the model"):
        recipe.main(load_config(recipe.GattConfig, None, [f"out_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="constraint_kinds"):
        recipe.check_config(load_config(recipe.GattConfig, None, ["policy=p", "dialogs=[d]",
                                                                  "constraint_kinds=[colour]"]))
    with pytest.raises(ConfigError, match="mix_share > 0 needs mix_data"):
        recipe.check_config(load_config(recipe.GattConfig, None, ["policy=p", "dialogs=[d]", "mix_share=0.5"]))


# ----------------------------------------------------------------------------- evaluation


def test_multi_turn_evaluation_fails_a_model_that_forgets_and_passes_one_that_holds(world_dir):
    cfg = MultiTurnConfig(prompts=[str(world_dir / "prompts" / "eval.jsonl")], dialogs=9, turns=6,
                          train_kinds=["language", "figure"])
    dialogs = build_eval_dialogs(cfg)
    assert {d.group for d in dialogs} == {"seen", "unseen_kind"}  # hobby was never trained on
    assert sum("hobby" in d.instruction.kind for d in dialogs) >= 3
    assert all(len(set(d.users)) == 6 for d in dialogs)
    rng = random.Random(0)

    def holds(msgs):  # complies with the system message on every turn
        return [world_gatt.comply(m[0]["content"], "Fine.", rng) for m in msgs]

    def forgets_after_two(msgs):
        return [world_gatt.comply(m[0]["content"], "Fine.", rng) if len(m) <= 4 else "Fine." for m in msgs]

    good = score(dialogs, converse(dialogs, holds, lambda d: True))
    assert [r["share"] for r in good["overall"]] == [1.0] * 6 and good["first_turn_below_half"] is None
    assert good["turns_reached"] == {"max": 6, "min": 6, "mean": 6.0}
    bad = score(dialogs, converse(dialogs, forgets_after_two, lambda d: True))
    assert [r["share"] for r in bad["overall"]] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert bad["first_turn_below_half"] == first_below_half(bad["overall"]) == 3 and bad["overall"][2]["ci95"][1] < 0.5
    assert set(bad["by_group"]) == {"seen", "unseen_kind"}
    # the context: a dialog stops at the first turn that does not fit
    short = converse(dialogs, holds, lambda d: sum(m["role"] == "user" for m in d) <= 2)
    assert all(len(a) == 2 for a in short) and score(dialogs, short)["turns_reached"]["max"] == 2


# ----------------------------------------------------------------------------- attention probabilities


def test_attention_probabilities_leave_the_logits_unchanged():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96,
                              max_seq_len=64)).eval()
    m.init_weights()
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        plain = m(tokens)
        for a in (b.attention for b in m.layers):
            a.record_weights = True
        recorded = m(tokens)
        packed = m(tokens, doc_ids=torch.tensor([[0] * 8 + [1] * 12] * 2))
        for a in (b.attention for b in m.layers):
            a.record_weights = False
        assert torch.allclose(plain, recorded, atol=1e-5)
        assert torch.allclose(packed, m(tokens, doc_ids=torch.tensor([[0] * 8 + [1] * 12] * 2)), atol=1e-5)
        probs = attention_probs(m, tokens)
    assert all(a.weights is None and not a.record_weights for a in (b.attention for b in m.layers))
    assert len(probs) == 2 and probs[0].shape == (2, 4, 20, 20)
    assert torch.allclose(probs[1].sum(-1), torch.ones(2, 4, 20), atol=1e-5)
    assert probs[0].triu(1).abs().max() == 0  # causal
    assert torch.allclose(m(tokens), plain)  # the flag is off again


def test_system_span_and_system_attention(world_tokenizer):
    fmt = ChatFormat(world_tokenizer)
    msgs = training_records("Figure: Napoleon", USERS, ANSWERS, "d")[0]["messages"]
    start, end = system_span(fmt, msgs)
    ids = fmt.training_ids(msgs)[0]
    assert "Napoleon" in world_tokenizer.decode(ids[start:end])
    assert "2 + 2" not in world_tokenizer.decode(ids[start:end])
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=world_tokenizer.vocab_size, hidden_dim=64,
                              max_seq_len=256)).eval()
    m.init_weights()
    grid = system_attention(m, ids, (start, end), "cpu")
    assert len(grid) == 2 and len(grid[0]) == len(ids) - end and all(0 < x <= 1 for row in grid for x in row)


# ----------------------------------------------------------------------------- the recipe, killed and resumed



def gatt_overrides(world_dir, policy, out):
    # a random model follows no instruction: the world's `comply` repairs its answers (retries 0)
    kw = {"policy": str(policy), "out_dir": str(out), "dialogs": f"[{world_dir / 'sft' / 'train.jsonl'}]",
          "max_dialogs": 16, "max_new_tokens": 12, "retries": 0, "repair": "llama2.world.gatt:comply",
          "every_turn": "true", "sft.seq_len": 256, "sft.batch_size": 4, "sft.micro_batch_size": 2,
          "sft.epochs": 1, "sft.optim.lr": 3e-3, "sft.ckpt_every": 2, "sft.log_every": 1,
          "constraint_kinds": "[language,figure]"}
    return [f"{k}={v}" for k, v in kw.items()]


@pytest.mark.slow
def test_killed_gatt_resumes_exactly_and_evaluates(world_dir, tiny_policy, tmp_path):
    env = {**os.environ, "LLAMA2_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

    def run(out, extra=(), kill=None):
        e = dict(env, **({"LLAMA2_KILL_AT_STEP": str(kill)} if kill else {}))
        return subprocess.run([sys.executable, "-m", "llama2", "rlhf", "gatt",
                               *gatt_overrides(world_dir, tiny_policy, out), *extra],
                              env=e, cwd=REPO, capture_output=True, text=True, timeout=600)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    stats = json.loads((tmp_path / "full" / "stats.json").read_text())
    assert stats["kept"] >= 14 and stats["repaired"] > 0 and stats["dropped_broke_instruction"] == 0
    records = [json.loads(x) for x in (tmp_path / "full" / "data" / "gatt.jsonl").read_text().splitlines()]
    assert len(records) == stats["training_records"] and all(r["meta"]["train_last_turn_only"] for r in records)
    assert all(r["messages"][0]["role"] == "system" for r in records)
    assert all(world_gatt.check(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in records)
    assert "hobby" not in stats["kinds"] and not any("hobby" in k for k in stats["kinds"])
    assert (tmp_path / "full" / "final" / "model.json").is_file()

    assert run(tmp_path / "k", kill=2).returncode == -9
    with pytest.raises(ConfigError, match="add --resume"):
        recipe.main(load_config(recipe.GattConfig, None, gatt_overrides(world_dir, tiny_policy, tmp_path / "k")))
    r = run(tmp_path / "k", ["--resume"])
    assert r.returncode == 0, r.stderr

    def losses(out):
        return {j["step"]: j["loss"] for j in map(json.loads, (out / "sft" / "metrics.jsonl").read_text().splitlines())}
    assert losses(tmp_path / "k") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) >= 3

    # what the pipeline calls: a finished run is picked up, not redone
    cfg = load_config(recipe.GattConfig, None, gatt_overrides(world_dir, tiny_policy, tmp_path / "elsewhere"))
    stamp = (tmp_path / "full" / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    final = recipe.run(tiny_policy, [world_dir / "sft" / "train.jsonl"], tmp_path / "full", cfg)
    assert final == tmp_path / "full" / "sft" / "final" and final.stat() and \
        (final / "model.safetensors").stat().st_mtime_ns == stamp

    # the multi-turn evaluation from the command line, with Figure 10's attention plot
    ev = subprocess.run([sys.executable, "-m", "llama2", "evaluate", "multi-turn", "--model",
                         str(tmp_path / "full" / "final"), "--baseline", str(tiny_policy), "--turns", "30",
                         "--attention-plot", "--out", str(tmp_path / "ev"), "dialogs=3", "max_new_tokens=8",
                         f"prompts=[{world_dir / 'prompts' / 'eval.jsonl'}]"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "ev" / "multi_turn.json").read_text())
    assert 1 < result["model"]["turns_reached"]["max"] < 30  # stopped by the 256-token context
    assert (tmp_path / "ev" / "adherence.png").stat().st_size > 0
    assert (tmp_path / "ev" / "attention.png").stat().st_size > 0
    assert set(result["attention"]["mean_max_weight"]) == {"model", "baseline"}
    assert "baseline_first_turn_below_half" in result
