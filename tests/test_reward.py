"""Reward models (Llama 2 §3.2.2): the ranking loss and its margins, one-pass pair scoring, the
scalar head in native and Hugging Face checkpoints, data mixes and data errors, the scorer, and
the tiny recipe trained on the built-in world (held-out accuracy, reference losses, resume)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2.chat_format import ChatFormat
from llama2.checkpoint import build_model, read_checkpoint, save_native
from llama2.config import ConfigError, load_config
from llama2.formats import RATINGS
from llama2.losses import MARGINS, ranking_loss
from llama2.model import ModelArgs, Transformer
from llama2.recipes.reward_model import RewardConfig, main
from llama2.preference_data import PairLoader, PairRow, mix_pairs, read_pairs, tokenize_pairs
from llama2.reward_scoring import RewardScorer, pair_scores, response_ids, reward_state
from llama2.formats import DataError

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "assets" / "losses" / "reward_tiny.json"
ENV = {"LLAMA2_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


# ----------------------------------------------------------------------------- the loss


def test_ranking_loss_with_each_margin_table_hand_computed():
    # Table 27: the margin grows with the rating.
    assert MARGINS["small"] == {"significantly better": 1, "better": 2 / 3, "slightly better": 1 / 3,
                                "negligibly better/unsure": 0}
    assert MARGINS["large"] == {"significantly better": 3, "better": 2, "slightly better": 1,
                                "negligibly better/unsure": 0}
    chosen = torch.tensor([2.0, 0.5, 1.0, 0.0])
    rejected = torch.tensor([0.0, 0.5, 0.0, 1.0])  # gaps r_c - r_r = 2, 0, 1, -1; one pair per rating
    # Each pair costs softplus(-(gap - m)) = log(1 + e^(m - gap)); the loss is their mean.
    #   none : m = 0, 0, 0, 0        -> log(1+e^-2) + log 2 + log(1+e^-1) + log(1+e^1)
    #          = 0.126928 + 0.693147 + 0.313262 + 1.313262 = 2.446599; / 4 = 0.611650
    #   small: m = 1, 2/3, 1/3, 0    -> log(1+e^-1) + log(1+e^(2/3)) + log(1+e^(-2/3)) + log(1+e^1)
    #          = 0.313262 + 1.081037 + 0.414370 + 1.313262 = 3.121931; / 4 = 0.780483
    #   large: m = 3, 2, 1, 0        -> log(1+e^1) + log(1+e^2) + log 2 + log(1+e^1)
    #          = 1.313262 + 2.126928 + 0.693147 + 1.313262 = 5.446599; / 4 = 1.361650
    expected = {"none": 0.611650, "small": 0.780483, "large": 1.361650}
    for table, value in expected.items():
        m = torch.tensor([MARGINS[table][r] for r in RATINGS])
        assert ranking_loss(chosen, rejected, m).item() == pytest.approx(value, abs=1e-6), table
    # The gradient of one pair's loss w.r.t. r_c is -σ(m - gap): with m = 1 and gap = 2, -σ(-1) = -0.268941.
    c = torch.tensor([2.0], requires_grad=True)
    ranking_loss(c, torch.tensor([0.0]), torch.tensor([1.0])).backward()
    assert c.grad.item() == pytest.approx(-0.268941, abs=1e-6)


# ----------------------------------------------------------------------------- the model


def tiny_args(vocab: int, **kw) -> ModelArgs:
    return ModelArgs(**{"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": vocab,
                        "hidden_dim": 64, "max_seq_len": 256, **kw})


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory, sp_tokenizer):
    """A random next-token model with the small SentencePiece tokenizer, saved natively."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(sp_tokenizer.vocab_size))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return save_native(tmp_path_factory.mktemp("lm") / "lm", model, tokenizer=sp_tokenizer)


@pytest.fixture(scope="module")
def rm(lm_checkpoint):
    ck = read_checkpoint(lm_checkpoint)
    args, state = reward_state(ck.args, ck.state, seed=0)
    state["output.weight"] = state["output.weight"] * 50  # scores of order 1, so differences show
    return build_model(args, state, "test"), ck.tokenizer()


DIALOGS = [
    [{"role": "user", "content": "where does the llama walk?"}],
    [{"role": "system", "content": "answer with numbers"}, {"role": "user", "content": "how many hills?"}],
    [{"role": "user", "content": "the sun"}, {"role": "assistant", "content": "shines"},
     {"role": "user", "content": "and the town?"}],
]
RESPONSES = ["over green hills", "12", "people ask questions and get helpful answers about numbers"]


def test_reward_state_replaces_the_head_and_keeps_the_rest(lm_checkpoint, tmp_path):
    ck = read_checkpoint(lm_checkpoint)
    args, state = reward_state(ck.args, ck.state, seed=0)
    assert ck.args.head == "lm" and args.head == "scalar"
    assert state["output.weight"].shape == (1, args.dim)
    # N(0, 1/(dim+1)²): initial scores ~1/sqrt(dim), near 0
    assert state["output.weight"].std().item() == pytest.approx(1 / (args.dim + 1), rel=0.5)
    assert all(torch.equal(state[k], ck.state[k]) for k in ck.state if k != "output.weight")
    # saved and loaded like any other checkpoint; model.json records the scalar head
    path = save_native(tmp_path / "rm", state, args, ck.tokenizer())
    assert json.loads((path / "model.json").read_text())["model"]["head"] == "scalar"
    again = read_checkpoint(path)
    assert again.args == args and torch.equal(again.state["output.weight"], state["output.weight"])
    assert reward_state(again.args, again.state, seed=1)[1]["output.weight"] is again.state["output.weight"]


def test_one_forward_for_chosen_and_rejected_equals_separate_scoring_at_the_eos(rm):
    model, tok = rm
    fmt = ChatFormat(tok)
    ids = [response_ids(fmt, d, r) for d, r in zip(DIALOGS, RESPONSES)]
    for d, r, x in zip(DIALOGS, RESPONSES, ids):
        full, _ = fmt.training_ids(d + [{"role": "assistant", "content": r}])
        assert x == full and x[-1] == tok.eos_id  # Llama 2's format: the answer's closing EOS
    lengths = {len(x) for x in ids}
    assert len(lengths) == 3  # different lengths: the unpadded row and its attention groups are exercised

    def manual(x):  # the head applied by hand to the final hidden state of the unpadded sequence
        h = model(torch.tensor([x]), return_hidden=True)[0, -1]  # (dim,)
        return (h @ model.output.weight[0]).item()

    with torch.no_grad():
        c, r = pair_scores(model, ids[:2], [ids[2], ids[0]])
        expected = [manual(x) for x in (ids[0], ids[1], ids[2], ids[0])]
    assert torch.allclose(torch.cat([c, r]), torch.tensor(expected), atol=1e-5)
    assert len(set(round(e, 4) for e in expected[:3])) == 3  # the scores differ: the check can fail


def test_score_token_with_a_chat_template_is_the_end_of_turn(sp_tokenizer, tmp_path):
    from llama2.tokenizer import load_tokenizer

    # A ChatML-like template: each turn ends with EOS and then a newline that the model never
    # generates; the score is read at the EOS and the newline is cut.
    template = ("{% for m in messages %}{{ bos_token + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")
    sp_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(tmp_path)
    fmt = ChatFormat(tok)
    assert fmt.style == "template"
    full, mask = fmt.training_ids(DIALOGS[0] + [{"role": "assistant", "content": RESPONSES[0]}])
    ids = response_ids(fmt, DIALOGS[0], RESPONSES[0])
    assert ids[-1] == tok.eos_id and full[len(ids) - 1] == tok.eos_id and mask[len(ids) - 1]
    assert ids == full[: len(ids)] and tok.decode(full[len(ids):]) == "\n"


def test_scorer_batches_by_length_and_gives_probabilities(rm):
    model, tok = rm
    dialogs, responses = DIALOGS * 2, RESPONSES + ["no", "maybe", "yes"]
    one = RewardScorer(model, tok, batch_size=1)
    many = RewardScorer(model, tok, batch_size=4)
    s1, s4 = one.score(dialogs, responses), many.score(dialogs, responses)
    assert s1.shape == (6,) and torch.allclose(s1, s4, atol=1e-5)
    assert torch.allclose(many.prob(dialogs, responses), torch.sigmoid(s4))
    with pytest.raises(ValueError, match="dialog 1: .* more than the reward model.s context of 256"):
        many.score(DIALOGS[:2], ["ok", "numbers " * 300])
    with pytest.raises(ValueError, match="2 dialogs but 1 responses"):
        many.score(DIALOGS[:2], ["ok"])


def test_hf_export_loads_in_transformers_with_the_same_scores(rm, tmp_path, capsys):
    from transformers import LlamaForSequenceClassification

    from llama2.convert import convert_cli

    model, tok = rm
    native = save_native(tmp_path / "rm", model, tokenizer=tok)
    assert convert_cli([str(native), str(tmp_path / "hf"), "--to", "hf"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["id2label"] == {"0": "LABEL_0"}
    assert cfg["pad_token_id"] == tok.unk_id != tok.eos_id  # never the token a sequence ends with
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    scorer = RewardScorer(native, batch_size=8)
    ids = scorer.ids(DIALOGS, RESPONSES)
    T = max(map(len, ids))
    batch = torch.tensor([x + [cfg["pad_token_id"]] * (T - len(x)) for x in ids])  # right-padded, as we pad
    with torch.no_grad():
        theirs = hf(input_ids=batch, attention_mask=(batch != cfg["pad_token_id"]).long()).logits[:, 0]
    assert torch.allclose(theirs, scorer.score_ids(ids), atol=1e-4)
    back = read_checkpoint(tmp_path / "hf")  # and back: the score layer is our scalar head
    assert back.args.head == "scalar"
    assert all(torch.allclose(back.state[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- data


def pair(**kw) -> dict:
    base = {"id": "p", "messages": [{"role": "user", "content": "Where does Lucy live?"}],
            "chosen": "Lucy lives in Fairfield.", "rejected": "Lucy lives in", "rating": "better",
            "axis": "helpfulness", "safety_label": None, "source": "test", "batch": 1, "split": "train"}
    return {**base, **kw}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("bad, field, message", [
    ({"rating": "much better"}, "rating", "must be one of"),
    ({"chosen": "  "}, "chosen", "must not be empty"),
    ({"rejected": "Lucy lives in Fairfield. "}, "rejected", "same text as 'chosen'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "messages[1].role", "the last message must be 'user'"),
])
def test_bad_pairs_are_errors_naming_file_line_and_field(tmp_path, bad, field, message):
    path = write(tmp_path / "prefs.jsonl", [pair(id="a"), pair(id="b", **bad)])
    with pytest.raises(DataError, match=re.escape(f"prefs.jsonl, line 2, field '{field}': ") + f".*{message}") as e:
        read_pairs([path])
    assert e.value.line == 2 and e.value.field == field


def test_long_and_identically_tokenized_pairs_are_counted_skips(tmp_path, sp_tokenizer):
    fmt = ChatFormat(sp_tokenizer)
    long = pair(id="long", chosen="the llama walks " * 40)
    rows = read_pairs([write(tmp_path / "prefs.jsonl", [pair(id="ok"), long])])
    fits = len(response_ids(fmt, rows[0].record["messages"], rows[0].record["chosen"]))  # the longer side of "ok"
    data = tokenize_pairs(rows, fmt, max_len=fits)
    assert len(data) == 1 and data.ids == ["ok"]
    assert data.skipped == {f"{tmp_path / 'prefs.jsonl'}: longer than the context ({fits} tokens)": 1}
    same = PairRow(pair(chosen="the llama", rejected="the llama "), "x.jsonl", 1)  # differs only in a space
    assert tokenize_pairs([same], fmt, fits).skipped == {"x.jsonl: chosen and rejected tokenize identically": 1}


def test_cli_reports_a_data_error_in_one_line(tmp_path, capsys, lm_checkpoint):
    from llama2.cli import main as cli_main

    path = write(tmp_path / "prefs.jsonl", [pair(id="a"), pair(id="b", rating="meh")])
    rc = cli_main(["reward", "train", f"model={lm_checkpoint}", f"train_data=[{path}]", f"out_dir={tmp_path}/o"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "prefs.jsonl, line 2, field 'rating': must be one of" in err


def rows_of(n_help: int, n_safe: int, n_open: int = 0) -> list[PairRow]:
    rows = [PairRow(pair(id=f"h{i}"), "h.jsonl", i) for i in range(n_help)]
    rows += [PairRow(pair(id=f"s{i}", axis="safety", safety_label="both_safe"), "s.jsonl", i) for i in range(n_safe)]
    rows += [PairRow(pair(id=f"o{i}", axis="safety", safety_label="both_safe", source="harmless-open"), "o.jsonl", i)
             for i in range(n_open)]
    return rows


def test_data_mixes_of_the_two_reward_models():
    # Helpfulness RM: all helpfulness pairs + an equal amount sampled from the rest.
    mixed, s = mix_pairs(rows_of(100, 150, 50), "helpfulness", seed=0)
    ids = [r.record["id"] for r in mixed]
    assert sum(i[0] == "h" for i in ids) == 100 and len(ids) == 200 and len(set(ids)) == 200
    assert s["main"] == {"test (helpfulness)": 100}
    assert sum(s["other"].values()) == 100 and set(s["other"]) == {"test (safety)", "harmless-open (safety)"}
    # ... uniformly: both sources are sampled roughly in proportion (150:50)
    assert 55 <= s["other"]["test (safety)"] <= 95
    # Safety RM: all safety pairs (here + the harmless open-source source as main data), 90/10 with helpfulness.
    mixed, s = mix_pairs(rows_of(100, 150, 30), "safety", main_sources=["harmless-open"], seed=0)
    assert s["main"] == {"harmless-open (safety)": 30, "test (safety)": 150}
    assert s["other"] == {"test (helpfulness)": 20} and len(mixed) == 200  # 180 / 0.9 = 200
    # Open-source helpfulness pairs are not the helpfulness RM's main data: they join the sampled
    # rest with the safety pairs (§3.2.2); the safety RM still takes every safety pair as main.
    rows = rows_of(100, 150) + [PairRow(pair(id=f"g{i}", source="open-help"), "g.jsonl", i) for i in range(60)]
    mixed, s = mix_pairs(rows, "helpfulness", open_source=["open-help"], seed=0)
    assert s["main"] == {"test (helpfulness)": 100} and s["other_available"] == 210
    assert set(s["other"]) == {"test (safety)", "open-help (helpfulness)"} and len(mixed) == 200
    _, s = mix_pairs(rows, "safety", open_source=["open-help"], seed=0)
    assert s["main"] == {"test (safety)": 150} and set(s["other"]) == {"test (helpfulness)", "open-help (helpfulness)"}
    # Too few other pairs: all of them, and the shortfall is reported.
    _, s = mix_pairs(rows_of(100, 30), "helpfulness")
    assert s["other_wanted"] == 100 and s["other_available"] == 30 and s["other"] == {"test (safety)": 30}
    with pytest.raises(ValueError, match="no safety pairs"):
        mix_pairs(rows_of(10, 0), "safety")


def test_pair_loader_cuts_sorted_micro_batches_and_resumes():
    import numpy as np

    lengths = np.arange(40) % 13
    a = PairLoader(lengths, batch_size=8, micro_batch_size=2, rank=0, world_size=2, seed=3)
    b = PairLoader(lengths, batch_size=8, micro_batch_size=2, rank=1, world_size=2, seed=3)
    step_a, step_b = a.next_step(), b.next_step()
    assert a.accum == 2 and len(step_a) == 2 and all(len(m) == 2 for m in step_a)
    together = np.concatenate(step_a + step_b)
    assert len(set(together.tolist())) == 8  # the ranks split one global batch
    order = [step_a[0], step_b[0], step_a[1], step_b[1]]
    assert list(np.concatenate([lengths[m] for m in order])) == sorted(lengths[together], reverse=True)
    state = a.state_dict()
    ahead = [a.next_step() for _ in range(6)]  # crosses an epoch boundary (5 steps per epoch)
    c = PairLoader(lengths, batch_size=8, micro_batch_size=2, rank=0, world_size=2, seed=3)
    c.load_state_dict(state)
    assert all(all((x == y).all() for x, y in zip(s1, s2)) for s1, s2 in zip(ahead, [c.next_step() for _ in range(6)]))
    with pytest.raises(ValueError, match="cannot resume the pair loader"):
        PairLoader(lengths[:-1], 8, 2).load_state_dict(state)


def test_every_reward_config_loads():
    files = sorted((REPO / "configs" / "reward").glob("*.yaml"))
    assert {f.stem for f in files} >= {"tiny", "tiny_safety", "7B", "70B"}
    for f in files:
        cfg = load_config(RewardConfig, f)
        assert cfg.objective in ("helpfulness", "safety") and cfg.margin in MARGINS, f
    assert load_config(RewardConfig, REPO / "configs" / "reward" / "70B.yaml").optim.lr == 5e-6  # §3.2.2
    with pytest.raises(ConfigError, match="unknown key 'mix.share'"):
        load_config(RewardConfig, None, ["mix.share=0.2"])


# ----------------------------------------------------------------------------- trained on the built-in world

# The CI backbone: a small model pretrained briefly on the world's corpus (the tiny preset's 3M
# chat model takes ~20 CPU minutes; scripts/reward_tiny.sh trains the RMs on it). A random
# backbone learned surface cues (refusals, repetition, truncation) but plateaued lower.
BACKBONE = {"preset": "tiny", "model.dim": 64, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 2,
            "model.hidden_dim": 176, "data.seq_len": 128, "batch_tokens": 4096, "micro_batch_size": 32,
            "max_steps": 100, "optim.lr": 3e-3, "optim.warmup_steps": 10, "eval_every": 0, "ckpt_every": 0,
            "log_every": 50, "data.workers": 1}


def overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


@pytest.fixture(scope="session")
def world_rm(tmp_path_factory):
    """The built-in world, a briefly pretrained backbone and the tiny helpfulness RM trained on it."""
    from llama2.recipes.pretrain import PretrainConfig
    from llama2.recipes.pretrain import main as pretrain
    from llama2.world.generate import generate_world

    os.environ.update(ENV)
    root = tmp_path_factory.mktemp("reward_world")
    generate_world(root / "world", seed=0, size="tiny", quiet=True, corpus_chars=2_000_000)
    pretrain(load_config(PretrainConfig, None, overrides(
        {**BACKBONE, "out_dir": root / "pt", "data.corpus": f"[{root / 'world/corpus/pretrain.jsonl'}]"})))
    prefs = root / "world" / "preferences"
    main(load_config(RewardConfig, REPO / "configs" / "reward" / "tiny.yaml", overrides(
        {"model": root / "pt" / "final", "out_dir": root / "rm", "train_data": f"[{prefs / 'offline_train.jsonl'}]",
         "eval_data": f"[{prefs / 'offline_test.jsonl'}]", "ckpt_every": 0, "eval_every": 0})))
    return root


def test_tiny_reward_model_beats_chance_on_held_out_pairs(world_rm):
    report = json.loads((world_rm / "rm" / "eval" / "eval.json").read_text())
    overall = report["overall"]
    by_rating = {r: v["accuracy"] for r, v in overall["by_rating"].items()}
    by_task = {t: (round(v["accuracy"], 3), v["pairs"]) for t, v in overall["by_task"].items()}
    print(f"\nheld-out accuracy {overall['accuracy']:.3f}; by rating {by_rating}; by task family {by_task}")
    assert overall["pairs"] == 600 and report["skipped"] == {}
    # The tiny preset's targets are >= 0.75 overall and >= 0.9 on "significantly better". This CI
    # backbone measures 0.810 and 0.904; the bound leaves room for other CPUs' arithmetic (the
    # tiny chat model of scripts/reward_tiny.sh clears 0.9 with a margin).
    assert overall["accuracy"] >= 0.75
    assert by_rating["significantly better"] >= 0.88
    # Table 8's shape: the most distinct pairs are the easiest, the least distinct near chance
    assert by_rating["significantly better"] > by_rating["slightly better"] > by_rating["negligibly better/unsure"]
    # not only "looks familiar": every task family is clearly above chance
    assert all(acc >= 0.6 for acc, n in by_task.values()), by_task
    assert report["test_sets"]["offline_test/safety"]["accuracy"] >= 0.8
    assert (world_rm / "rm" / "eval" / "eval.png").stat().st_size > 10_000
    assert json.loads((world_rm / "rm" / "final" / "model.json").read_text())["model"]["head"] == "scalar"


def test_tiny_recipe_matches_stored_reference_losses(world_rm, reference):
    rows = [json.loads(line) for line in (world_rm / "rm" / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["loss"] for r in rows if r["step"] <= 8}
    # The head starts near zero, so the first loss is the uninformed mean of log(1 + e^m(rating))
    # over the first batch: rebuild that batch as the recipe does and check.
    from llama2.tokenizer import load_tokenizer

    prefs = world_rm / "world" / "preferences" / "offline_train.jsonl"
    mixed, _ = mix_pairs(read_pairs([prefs]), "helpfulness", seed=0)
    data = tokenize_pairs(mixed, ChatFormat(load_tokenizer(world_rm / "pt" / "tokenizer")), 512)
    (first,) = PairLoader(data.lengths, 32, 32, seed=0).next_step()
    uninformed = sum(math.log1p(math.exp(MARGINS["small"][data.rating[i]])) for i in first) / len(first)
    assert got[1] == pytest.approx(uninformed, abs=0.01)
    # Silent numerical changes show up here; regenerate deliberately with LLAMA2_UPDATE_REFERENCE=1.
    ref = {int(k): v for k, v in reference(REFERENCE, got).items()}
    assert sorted(ref) == list(range(1, 9))
    assert all(abs(got[s] - ref[s]) < 2e-3 for s in ref), {s: (got[s], ref[s]) for s in ref}


def run_reward_cli(args: list[str], env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "llama2", "reward", *args], env={**os.environ, **ENV, **(env or {})},
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_exactly(world_rm, tmp_path):
    prefs = world_rm / "world" / "preferences"
    short = {"model": world_rm / "pt" / "final", "train_data": f"[{prefs / 'offline_train.jsonl'}]",
             "batch_size": 8, "micro_batch_size": 4, "max_steps": 6, "ckpt_every": 3, "eval_every": 0,
             "log_every": 1, "optim.lr": 1e-3, "objective": "safety"}
    main(load_config(RewardConfig, None, overrides({**short, "out_dir": tmp_path / "full"})))
    killed = run_reward_cli(["train", *overrides({**short, "out_dir": tmp_path / "killed"})],
                            env={"LLAMA2_KILL_AT_STEP": "5"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after step 5; the last checkpoint is step 3
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-00000003"]
    main(load_config(RewardConfig, None, overrides({**short, "out_dir": tmp_path / "killed"})), resume=True)

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    assert losses(tmp_path / "killed") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 6
    with pytest.raises(ConfigError, match="cannot resume: margin was 'small' in the checkpoint, now 'large'"):
        main(load_config(RewardConfig, None, overrides({**short, "out_dir": tmp_path / "killed", "margin": "large"})),
             resume=True)


@pytest.mark.slow
def test_torchrun_fsdp2_matches_single_process(world_rm, tmp_path):
    prefs = world_rm / "world" / "preferences"
    short = {"model": world_rm / "pt" / "final", "train_data": f"[{prefs / 'offline_train.jsonl'}]",
             "eval_data": f"[{prefs / 'offline_test.jsonl'}]", "batch_size": 8, "micro_batch_size": 4, "max_steps": 4,
             "ckpt_every": 0, "eval_every": 0, "log_every": 1, "optim.lr": 1e-3, "objective": "safety"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank below (OMP_NUM_THREADS=1): the same per-process sums
    try:
        main(load_config(RewardConfig, None, overrides({**short, "out_dir": tmp_path / "one"})))
    finally:
        torch.set_num_threads(threads)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llama2",
                          "reward", "train", *overrides({**short, "out_dir": tmp_path / "two", "micro_batch_size": 2})],
                         env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")]
    assert len(a) == len(b) == 4 and all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(a, b)), (a, b)
    # the final held-out report: each rank scores part of the test pairs, the scores are summed
    ra, rb = [json.loads((tmp_path / n / "eval" / "eval.json").read_text())["overall"]
              for n in ("one", "two")]
    assert ra["pairs"] == rb["pairs"] == 600 and ra["accuracy"] == rb["accuracy"]


def test_eval_and_score_commands(world_rm, tmp_path, capsys):
    from llama2.cli import main as cli_main

    rm, test = world_rm / "rm" / "final", world_rm / "world" / "preferences" / "offline_test.jsonl"
    assert cli_main(["reward", "eval", "--model", str(rm), "--data", str(test), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "offline_test/helpfulness" in out and "negl./unsure" in out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    stored = json.loads((world_rm / "rm" / "eval" / "eval.json").read_text())
    assert report["overall"]["accuracy"] == pytest.approx(stored["overall"]["accuracy"], abs=1e-9)
    # score: {messages, response} records, or messages ending with the answer; a bad record names its line
    pairs = [json.loads(line) for line in test.read_text().splitlines()[:3]]
    recs = [{"id": p["id"], "messages": p["messages"], "response": p["chosen"]} for p in pairs]
    recs.append({"messages": pairs[0]["messages"] + [{"role": "assistant", "content": pairs[0]["chosen"]}]})
    assert cli_main(["reward", "score", "--model", str(rm), "--data", str(write(tmp_path / "s.jsonl", recs)),
                     "--out", str(tmp_path / "scores.jsonl")]) == 0
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == [p["id"] for p in pairs] + ["line 4"]
    assert scores[3]["score"] == scores[0]["score"] and scores[0]["prob"] == pytest.approx(
        1 / (1 + math.exp(-scores[0]["score"])), abs=1e-6)
    expected = RewardScorer(rm).score([p["messages"] for p in pairs], [p["chosen"] for p in pairs])
    assert [s["score"] for s in scores[:3]] == pytest.approx(expected.tolist(), abs=1e-5)
    capsys.readouterr()
    bad = write(tmp_path / "bad.jsonl", [recs[0], {"messages": pairs[0]["messages"]}])
    assert cli_main(["reward", "score", "--model", str(rm), "--data", str(bad)]) == 1
    assert "bad.jsonl, line 2, field 'response': missing" in capsys.readouterr().err
    long = write(tmp_path / "long.jsonl", [recs[0], {**recs[1], "response": "Lucy lives in Fairfield. " * 200}])
    assert cli_main(["reward", "score", "--model", str(rm), "--data", str(long)]) == 1
    assert "long.jsonl, line 2, field 'response': " in capsys.readouterr().err
