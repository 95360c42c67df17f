"""The built-in world's core: generation, splits, formats and helpfulness graders."""
from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from llama2.world import corrupt as C
from llama2.world import tasks as T
from llama2.formats import RATINGS, DataError, read_records, validate_cli, validate_file, write_parquet
from llama2.world.generate import generate_world
from llama2.world.grading import grade_helpfulness
from llama2.world.pairs import offline_preference_pairs
from llama2.world.universe import build_universe

SEED = 5
SHORT_CORPUS = 100_000  # characters; enough to exercise every document kind


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The full tiny world (default corpus size), generated once for the module."""
    out = tmp_path_factory.mktemp("world")
    generate_world(out, SEED, "tiny", quiet=True)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


# -- generation -----------------------------------------------------------------------------------

def test_generation_is_deterministic_per_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_world(a, SEED, "tiny", quiet=True, corpus_chars=SHORT_CORPUS)
    generate_world(b, SEED, "tiny", quiet=True, corpus_chars=SHORT_CORPUS)
    generate_world(c, SEED + 1, "tiny", quiet=True, corpus_chars=SHORT_CORPUS)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert set(fa) == set(fc)
    differ = [name for name in fa if fa[name] != fc[name]]
    assert len(differ) == len(fa), f"files identical across seeds: {sorted(set(fa) - set(differ))}"


def test_every_generated_file_validates(world):
    manifest = json.loads((world / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    for path in sorted(world.rglob("*.jsonl")):
        kind, n, errors = validate_file(path)
        rel = str(path.relative_to(world))
        assert errors == [], f"{rel}: {errors[:3]}"
        assert kind == listed[rel]["kind"] and n == listed[rel]["records"] > 0
    assert len(_records(world / "prompts" / "eval.jsonl")) >= 1000
    assert {f"prompts/test_batch{b}.jsonl" for b in range(1, 5)} <= set(listed)


def test_tiny_corpus_size(world):
    docs = _records(world / "corpus" / "pretrain.jsonl")
    chars = sum(len(d["text"]) for d in docs)
    kinds = Counter(d["source"] for d in docs)
    print(f"\ntiny corpus: {len(docs)} documents, {chars:,} characters, by kind: {dict(sorted(kinds.items()))}")
    assert 5_000_000 <= chars <= 8_000_000  # ~1.5M tokens at ~4 characters per token
    assert set(kinds) == {f"world:{k}" for k in
                          ("bio", "place", "nature", "qa", "story", "dialog", "worked", "safety")}


def _training_text(world: Path) -> str:
    parts = []
    for rel in ("sft/train.jsonl", "sft/test.jsonl", "prompts/train.jsonl", "gatt/train.jsonl",
                *(f"prompts/test_batch{b}.jsonl" for b in range(1, 5))):
        for r in _records(world / rel):
            parts += [m["content"] for m in r["messages"]]
            parts.append(r.get("reference", {}).get("gold", "") if "reference" in r else "")
    return "\n".join(parts)


def test_eval_entities_and_instances_never_used_in_training(world):
    universe = json.loads((world / "world.json").read_text())["universe"]
    held_out = [p["name"] for p in universe["people"] + universe["places"] if p["split"] == "eval"]
    assert len(held_out) >= 20
    text = _training_text(world)
    leaked = [n for n in held_out if re.search(rf"\b{re.escape(n)}\b", text)]
    assert leaked == []

    def keys(rels):
        return {k for rel in rels for r in _records(world / rel) if r["task"] in T.HELPFULNESS_TASKS
                for k in r["reference"]["instances"]}

    train_keys = keys(["prompts/train.jsonl"]) | keys([f"prompts/test_batch{b}.jsonl" for b in range(1, 5)])
    eval_keys = keys(["prompts/eval.jsonl"])
    assert len(eval_keys) > 300 and train_keys.isdisjoint(eval_keys)
    sft_eval = [r for r in _records(world / "sft" / "train.jsonl") if r["split"] != "train"]
    assert sft_eval == []
    # ...while the corpus still teaches the held-out entities' facts, in question/answer form too.
    corpus = (world / "corpus" / "pretrain.jsonl").read_text(encoding="utf-8")
    assert all(n in corpus for n in held_out)
    eval_person = next(p for p in universe["people"] if p["split"] == "eval")
    assert re.search(rf"Q(uestion)?: [^\n]*{eval_person['name']}", corpus)
    assert f"{eval_person['name']} lives in {eval_person['home']}." in corpus


def test_sft_covers_safety_and_borderline(world):
    tasks = Counter(r["task"] for r in _records(world / "sft" / "train.jsonl"))
    assert tasks["adversarial"] > 300 and tasks["borderline"] > 300
    assert set(T.HELPFULNESS_TASKS) <= set(tasks)


# -- graders --------------------------------------------------------------------------------------

SEVERE = ("wrong_value", "truncated", "repeated", "wrong_format", "refusal")


def test_graders_score_gold_high_and_corruptions_low():
    u = build_universe(SEED, "tiny")
    rng = random.Random(0)
    scores = defaultdict(list)
    for family in T.HELPFULNESS_TASKS:
        for i in range(120):
            ex = T.FAMILIES[family].generate(rng, u, ("train", "eval")[i % 2])
            rec = {"id": f"{family}-{i}", "task": ex.task, "messages": ex.messages, "reference": ex.reference}
            scores["gold", family].append(grade_helpfulness(rec, ex.answer).score)
            scores["rephrased", family].append(grade_helpfulness(rec, C.rephrase(rng, rec)).score)
            for kind in C.CORRUPTIONS:
                bad = C.corrupt(rng, rec, kind)
                if bad is not None:
                    scores[kind, family].append(grade_helpfulness(rec, bad).score)
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    print("\nmean helpfulness grade (cases) by answer kind and family:")
    for kind in ("gold", "rephrased") + C.CORRUPTIONS:
        row = [f"{f}={mean[kind, f]:.2f}({len(scores[kind, f])})" for f in T.HELPFULNESS_TASKS if (kind, f) in mean]
        print(f"  {kind:10s} " + " ".join(row))
    for family in T.HELPFULNESS_TASKS:
        assert mean["gold", family] >= 0.99 and min(scores["gold", family]) >= 0.9
        assert mean["rephrased", family] >= 0.95
        for kind in SEVERE:
            if (kind, family) in mean:
                assert mean[kind, family] <= 0.35, (kind, family, mean[kind, family])
        assert 0.3 <= mean["rambling", family] <= 0.75  # a mild flaw: between good and bad
    assert sum(len(scores[k, "creative"]) for k in ("wrong_format",)) >= 50


def _rec(task: str, prompt: str, reference: dict) -> dict:
    return {"id": "x", "task": task, "messages": [{"role": "user", "content": prompt}], "reference": reference}


@pytest.mark.parametrize("response,ok", [
    ("23 + 45 = 68.", True), ("The answer is 68.", True), ("68", True), ("Sure! 23 plus 45 makes 68.", True),
    ("23 + 45 = 67.", False), ("23 + 45 =", False), ("I'm sorry, but I can't help with that.", False),
    ("23 + 45 = 68. 23 + 45 = 68.", False), ("It is 68 or maybe 70.", False), ("", False),
])
def test_number_grader_examples(response, ok):
    rec = _rec("arithmetic", "What is 23 + 45?", {"check": "number", "answer": 68, "instances": [], "gold": "23 + 45 = 68."})
    score = grade_helpfulness(rec, response).score
    assert (score >= 0.9) if ok else (score <= 0.35), (response, score)


@pytest.mark.parametrize("response,ok", [
    ("Tom lives in Oakton.", True), ("He lives in Oakton, near the sea.", True), ("oakton", True),
    ("Tom lives in Elmford.", False), ("Tom lives in Oakton or Elmford.", False), ("Tom lives in", False),
])
def test_value_grader_examples(response, ok):
    rec = _rec("fact", "Where does Tom live?", {"check": "value", "answer": "Oakton", "accept": ["Oakton"],
                                                "wrong": ["Elmford", "Ashby"], "instances": [], "gold": "Tom lives in Oakton."})
    score = grade_helpfulness(rec, response).score
    assert (score >= 0.9) if ok else (score <= 0.35), (response, score)


@pytest.mark.parametrize("response,ok", [
    ("1. cat\n2. owl\n3. frog", True), ("Here are three animals:\n1. Cat\n2. Owl\n3. Frog", True),
    ("cat\nowl\nfrog", False),  # not numbered
    ("1. cat\n2. owl", False),  # a missing line
    ("1. cat\n2. owl\n3. table", False),  # not an animal
    ("1. cat\n2. cat\n3. owl", False),  # repeated item
    ("1. cat, 2. owl, 3. frog", False),  # one line
])
def test_lines_grader_examples(response, ok):
    rec = _rec("creative", "Give me a numbered list of three animals.",
               {"check": "lines", "count": 3, "format": "numbered", "allowed": ["cat", "owl", "frog", "dog"],
                "upper": False, "letter": None, "instances": [], "gold": "1. cat\n2. owl\n3. frog"})
    score = grade_helpfulness(rec, response).score
    assert (score >= 0.9) if ok else (score <= 0.4), (response, score)


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="no grader for task 'juggling'"):
        grade_helpfulness({"id": "q1", "task": "juggling", "messages": [], "reference": {}}, "hi")


def test_offline_pairs_are_contrastive_and_valid(world, tmp_path):
    prompts = _records(world / "prompts" / "train.jsonl")[:600]
    pairs = offline_preference_pairs(random.Random(1), prompts, 800)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert validate_file(path, "preferences")[2] == []
    ratings = Counter(p["rating"] for p in pairs)
    assert all(ratings[r] > 10 for r in RATINGS), ratings
    # The simulated annotators see the grader through noise: agreement with the noiseless grader
    # is near-perfect on "significantly better" pairs and falls with the rating.
    agree = defaultdict(list)
    for p in pairs:
        rec = next(r for r in prompts if r["messages"] == p["messages"] and r["task"] == p["task"])
        c, r = grade_helpfulness(rec, p["chosen"]).score, grade_helpfulness(rec, p["rejected"]).score
        if c != r:
            agree[p["rating"]].append(c > r)
        assert (p["safety_label"] is None) == (p["axis"] == "helpfulness")
    share = {k: sum(v) / len(v) for k, v in agree.items()}
    print(f"\noffline pairs: ratings {dict(ratings)}; agreement with the grader {share}")
    assert share["significantly better"] >= 0.95 and share["better"] >= 0.85
    assert share["significantly better"] > share["negligibly better/unsure"]
    assert Counter(p["axis"] for p in pairs)["safety"] > 50
    assert Counter(p["safety_label"] for p in pairs)["chosen_safe_other_unsafe"] > 10


# -- data formats: clear errors -------------------------------------------------------------------

GOOD_SFT = {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            "source": "me", "split": "train"}
GOOD_PROMPT = {"id": "p", "messages": [{"role": "user", "content": "Hi"}], "split": "eval", "batch": None,
               "is_safety": False, "risk_category": None, "attack_vector": None, "task": "fact", "reference": {}}
GOOD_PAIR = {"id": "q", "messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Go away.",
             "rating": "better", "axis": "helpfulness", "safety_label": None, "source": "me", "batch": 1,
             "split": "train"}


def _bad(base: dict, **changes) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in changes.items():
        if v is ...:
            del out[k]
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("record,kind,message", [
    (_bad(GOOD_SFT, messages=[{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]), "sft",
     "line 2, field 'messages[1].role': must be one of 'system', 'user', 'assistant', got 'bot'"),
    (_bad(GOOD_SFT, messages=[{"role": "user", "content": "Hi"}]), "sft",
     "line 2, field 'messages[0].role': the last message must be 'assistant'"),
    (_bad(GOOD_SFT, messages=[{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be nice"},
                              {"role": "assistant", "content": "Ok"}]), "sft",
     "line 2, field 'messages[1].role': a system message may only come first"),
    (_bad(GOOD_SFT, messages=[{"role": "user", "content": "[INST] hi"}, {"role": "assistant", "content": "Ok"}]), "sft",
     "line 2, field 'messages[0].content': contains the chat-format tag '[INST]'"),
    (_bad(GOOD_SFT, split="dev"), "sft", "line 2, field 'split': must be one of 'train', 'test', 'eval', got 'dev'"),
    (_bad(GOOD_SFT, mesages=[]), "sft", "line 2, field 'mesages': unknown field for a sft record"),
    (_bad(GOOD_PROMPT, reference=...), "prompts", "line 2, field 'reference': missing"),
    (_bad(GOOD_PROMPT, is_safety=True), "prompts", "line 2, field 'risk_category': a safety prompt"),
    (_bad(GOOD_PROMPT, batch="1"), "prompts", "line 2, field 'batch': must be an integer or null, got a string"),
    (_bad(GOOD_PAIR, rejected="Hello."), "preferences", "line 2, field 'rejected': is the same text as 'chosen'"),
    (_bad(GOOD_PAIR, rating="much better"), "preferences", "line 2, field 'rating': must be one of"),
    (_bad(GOOD_PAIR, axis="safety"), "preferences", "line 2, field 'safety_label': a safety pair needs one of"),
    (_bad(GOOD_PAIR, chosen=""), "preferences", "line 2, field 'chosen': must not be empty"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, record, kind, message):
    good = {"sft": GOOD_SFT, "prompts": GOOD_PROMPT, "preferences": GOOD_PAIR}[kind]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_bad(good, id="first")) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        read_records(path)  # the kind is inferred from the fields
    assert str(e.value).startswith(f"{path}, {message}"), str(e.value)


def test_malformed_files(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n\n" + '{"id": "b", "messages": [\n')
    with pytest.raises(DataError, match=r"broken.jsonl, line 3: invalid JSON \(Expecting value at column 26\)"):
        read_records(path)
    dupes = tmp_path / "dupes.jsonl"
    dupes.write_text((json.dumps(GOOD_SFT) + "\n") * 2)
    with pytest.raises(DataError, match=r"dupes.jsonl, line 2, field 'id': duplicate id 'a' \(first at line 1\)"):
        read_records(dupes)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"question": "hi"}\n')
    with pytest.raises(DataError, match="unknown.jsonl, line 1: cannot tell the kind of record"):
        read_records(unknown)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        read_records(empty)
    # The CLI lists every problem (file, line, field) and fails.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_bad(GOOD_SFT, split="dev")) + "\n" + json.dumps(_bad(GOOD_SFT, id="c", source=3)) + "\n")
    assert validate_cli([str(bad), "--kind", "sft"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{bad}, line 1, field 'split': must be one of 'train', 'test', 'eval', got 'dev'",
                   f"{bad}, line 2, field 'source': must be a string, got an integer"]


def test_parquet_reader_and_row_errors(tmp_path, capsys):
    good = tmp_path / "prompts.parquet"
    recs = [_bad(GOOD_PROMPT, id=f"p{i}", reference={"check": "number", "answer": i}) for i in range(3)]
    write_parquet(good, recs)
    assert read_records(good) == recs
    assert validate_cli([str(good)]) == 0
    assert "3 prompts records, all valid" in capsys.readouterr().out
    bad = tmp_path / "pairs.parquet"
    write_parquet(bad, [GOOD_PAIR, _bad(GOOD_PAIR, id="r", split="eval")])
    with pytest.raises(DataError, match=r"pairs.parquet, row 2, field 'split': must be one of 'train', 'test'"):
        read_records(bad)
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        read_records(broken)


def test_world_command(tmp_path):
    from llama2.cli import main

    out = tmp_path / "w"
    assert main(["world", "generate", "--out", str(out), "--seed", "3", "--corpus-chars", "50000", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and len(manifest["files"]) == 15
    with pytest.raises(SystemExit) as e:
        main(["world", "generate", "--out", str(out), "--size", "huge"])
    assert e.value.code == 2
