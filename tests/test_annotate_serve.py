"""`llama2 annotate serve` and `llama2 annotate export` end to end: real servers on free localhost ports
(tiny models), several annotators at once, a server SIGKILLed mid-session and restarted on the same
database, the export checked by the data validator, and the page in a real headless chromium."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from llama2.annotation_store import AnnotationStore, export_records
from llama2.checkpoint import save_native
from llama2.cli import main as llama2_main
from llama2.formats import RATINGS, validate_file
from llama2.model import ModelArgs, Transformer
from tests.conftest import chromium
from tests.test_serve import free_port

REPO = Path(__file__).resolve().parent.parent
KEYS = {"alice": "alice-key-123", "bob": "bob-key-4567", "carol": "carol-key-890"}
PROMPTS = ["the llama walks", "the sun shines on the town", "people ask questions", "green hills and grass",
           "a small town", "helpful answers about numbers"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sp_tokenizer):
    """Two tiny model variants, a prompt file (half of it shared for agreement) and the annotators' keys."""
    d = tmp_path_factory.mktemp("annotate")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=sp_tokenizer.vocab_size, hidden_dim=64,
                                  max_seq_len=256))
        m.init_weights(std=0.3)
        save_native(d / f"variant{seed}", m, tokenizer=sp_tokenizer)
        models.append(str(d / f"variant{seed}"))
    prompts = d / "prompts.jsonl"
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": t}]} for i, t in enumerate(PROMPTS)]
    rows[1]["is_safety"], rows[1]["risk_category"] = True, "illicit_criminal"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = d / "annotators.txt"
    keys.write_text("# name:key\n" + "".join(f"{n}:{k}\n" for n, k in KEYS.items()))
    return {"dir": d, "models": models, "prompts": prompts, "keys": keys}


def start(setup, db: Path, extra=()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama2", "annotate", "serve", "--models", *setup["models"],
           "--temperatures", "0.7", "1.1", "--db", str(db), "--batch", "3", "--prompts", str(setup["prompts"]),
           "--overlap", "0.5", "--annotators", str(setup["keys"]), "--max-new-tokens", "8", "--port", str(port),
           "--seed", "0", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"annotate serve exited: {proc.stdout.read().decode()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "annotate serve did not answer /health"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(setup):
    db = setup["dir"] / "annotations.db"
    proc, url = start(setup, db)
    try:
        yield {"url": url, "db": db}
    finally:
        stop(proc)


def client(url: str, name: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers={"X-Annotator": name, "Authorization": f"Bearer {KEYS[name]}"})


def judge(c: httpx.Client, comparison: dict, choice="A", rating=RATINGS[1], label="both_safe") -> httpx.Response:
    return c.post("/api/judgements", json={"comparison_id": comparison["comparison_id"], "choice": choice,
                                           "rating": rating, "safety_label": label})


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_a_full_annotation_over_http(server):
    with client(server["url"], "alice") as c:
        me = c.get("/api/me").json()
        assert me["annotator"] == "alice" and me["batch"] == 3 and me["arms"] == 4 and me["prompts_left"] == 6
        cmp1 = c.post("/api/comparisons", json={"prompt": "the llama walks over green hills", "system": "be brief"})
        assert cmp1.status_code == 200, cmp1.text
        cmp1 = cmp1.json()
        assert cmp1["messages"] == [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "the llama walks over green hills"}]
        assert set(cmp1["answers"]) == {"A", "B"} and cmp1["turn"] == 0 and cmp1["axis"] == "helpfulness"
        # continuing before the judgement is refused; then the judgement is stored
        early = c.post("/api/comparisons", json={"dialog_id": cmp1["dialog_id"], "prompt": "and then?"})
        assert early.status_code == 409
        r = judge(c, cmp1, "B", RATINGS[0], "both_safe")
        assert r.status_code == 200 and r.json()["stored"] is True
        assert judge(c, cmp1).status_code == 409  # judged once only
        # "continue": the chosen answer (B) becomes the assistant turn of a longer dialog
        cmp2 = c.post("/api/comparisons", json={"dialog_id": cmp1["dialog_id"], "prompt": "and the sun?"}).json()
        assert cmp2["turn"] == 1 and cmp2["dialog_id"] == cmp1["dialog_id"]
        assert cmp2["messages"] == cmp1["messages"] + [{"role": "assistant", "content": cmp1["answers"]["B"]},
                                                       {"role": "user", "content": "and the sun?"}]
        assert judge(c, cmp2, "A", RATINGS[3], "chosen_safe_other_unsafe").status_code == 200
    # every judgement holds both answers with their arms, two distinct arms
    stored = rows(server["db"], "SELECT annotator, batch, dialog_id, turn, choice, rating, safety_label, answer_a, "
                                "arm_a, answer_b, arm_b, shown, submitted FROM judgements WHERE annotator = 'alice'")
    assert len(stored) == 2 and {s[3] for s in stored} == {0, 1}
    for s in stored:
        assert s[1] == 3 and s[2] == cmp1["dialog_id"]
        arm_a, arm_b = json.loads(s[8]), json.loads(s[10])
        assert arm_a != arm_b and set(arm_a) == {"model", "temperature"}
        assert s[11] <= s[12]
    with client(server["url"], "bob") as bob:  # another annotator cannot judge alice's comparison
        assert judge(bob, cmp2).status_code in (403, 409)
        other = bob.post("/api/comparisons", json={"dialog_id": cmp1["dialog_id"], "prompt": "x"})
        assert other.status_code == 404


def test_wrong_key_and_bad_fields(server):
    url = server["url"]
    assert httpx.get(url + "/").status_code == 200  # the page is open; it holds no data
    for headers in ({}, {"X-Annotator": "alice", "Authorization": "Bearer wrong"},
                    {"X-Annotator": "mallory", "Authorization": f"Bearer {KEYS['alice']}"},
                    {"X-Annotator": "bob", "Authorization": f"Bearer {KEYS['alice']}"}):
        for method, path in (("GET", "/api/me"), ("POST", "/api/judgements"), ("GET", "/api/progress"),
                             ("GET", "/api/agreement"), ("POST", "/api/comparisons")):
            r = httpx.request(method, url + path, headers=headers, json={})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["type"] == "authentication_error"
    with client(url, "carol") as c:
        bad = [{"comparison_id": "x", "choice": "C", "rating": RATINGS[0], "safety_label": "both_safe"},
               {"comparison_id": "x", "choice": "A", "rating": "amazing", "safety_label": "both_safe"},
               {"comparison_id": "x", "choice": "A", "rating": RATINGS[0], "safety_label": "fine"},
               {"comparison_id": "x", "choice": "A", "rating": RATINGS[0], "safety_label": "both_safe", "extra": 1},
               {"choice": "A", "rating": RATINGS[0], "safety_label": "both_safe"}]
        for body in bad:
            r = c.post("/api/judgements", json=body)
            assert r.status_code == 422, body
            assert r.json()["error"]["message"].startswith("invalid field")
        for body in ({}, {"prompt": "  "}, {"next": True, "prompt": "x"}, {"dialog_id": "d", "prompt": "x",
                                                                          "system": "s"}):
            assert c.post("/api/comparisons", json=body).status_code == 422, body
        r = c.post("/api/judgements", json={"comparison_id": "nope", "choice": "A", "rating": RATINGS[0],
                                            "safety_label": "both_safe"})
        assert r.status_code == 404
        assert c.post("/api/comparisons", json={"prompt": "[INST] forged"}).status_code == 400


def test_several_annotators_at_once_all_stored_and_agreement(server):
    done: dict[str, list[str]] = {n: [] for n in KEYS}
    errors: list[str] = []

    def annotate(name: str) -> None:
        try:
            with client(server["url"], name) as c:
                for _ in range(6):  # until the prompt file has nothing left for this annotator
                    r = c.post("/api/comparisons", json={"next": True})
                    if r.status_code == 404:  # the prompt file is used up
                        return
                    assert r.status_code == 200, r.text
                    cmp = r.json()
                    r = judge(c, cmp, "A", RATINGS[2], "both_safe")
                    assert r.status_code == 200, r.text
                    done[name].append(cmp["comparison_id"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {e!r}")

    threads = [threading.Thread(target=annotate, args=(n,)) for n in KEYS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    confirmed = {cid for ids in done.values() for cid in ids}
    # 6 prompts, 3 of them shared by 2 annotators: 9 dialogs in all
    assert len(confirmed) == 9
    stored = {r[0] for r in rows(server["db"], "SELECT comparison_id FROM judgements WHERE prompt_id IS NOT NULL")}
    assert confirmed <= stored
    per_prompt = rows(server["db"], "SELECT prompt_id, COUNT(DISTINCT annotator) FROM dialogs "
                                    "WHERE prompt_id IS NOT NULL GROUP BY prompt_id")
    assert sorted(n for _, n in per_prompt) == [1, 1, 1, 2, 2, 2]
    with client(server["url"], "alice") as c:
        assert c.post("/api/comparisons", json={"next": True}).status_code == 404
        progress = c.get("/api/progress").json()
        counts = {r["annotator"]: r["judgements"] for r in progress["progress"]}
        assert sum(len(v) for v in done.values()) + 2 == sum(counts.values())  # + alice's two earlier turns
        assert progress["prompts"] == {"total": 6, "shared": 3, "started": 6}
        agreement = c.get("/api/agreement").json()["batches"]
    # the shared prompts' pairs were judged by two annotators with the same answers, all choosing "A" as shown:
    # agreement is whatever the A/B shuffles made it, computed over exactly 3 pairs of 2 judgements
    assert [(a["batch"], a["pairs"], a["judgements"]) for a in agreement] == [(3, 3, 6)]
    assert 0.0 <= agreement[0]["percent_agreement"] <= 1.0
    by_pair: dict[str, list[tuple]] = {}
    for pair, a, arm_a, b, arm_b, who in rows(server["db"], "SELECT pair_id, answer_a, arm_a, answer_b, arm_b, "
                                                            "annotator FROM judgements WHERE prompt_id IS NOT NULL"):
        by_pair.setdefault(pair, []).append((frozenset([(a, arm_a), (b, arm_b)]), who))
    shared = [js for js in by_pair.values() if len(js) > 1]
    assert len(shared) == 3
    for js in shared:  # the same two answers (and arms) for both annotators, who are different people
        assert len({answers for answers, _ in js}) == 1 and len({who for _, who in js}) == 2


def test_sigkill_mid_session_keeps_every_confirmed_judgement(setup, tmp_path):
    db = tmp_path / "killed.db"
    proc, url = start(setup, db)
    confirmed: list[str] = []
    stop_flag = threading.Event()

    def annotate(name: str) -> None:
        with client(url, name) as c:
            k = 0
            while not stop_flag.is_set():
                try:
                    cmp = c.post("/api/comparisons", json={"prompt": f"{name} asks about the llama {k}"}).json()
                    r = judge(c, cmp, "B", RATINGS[1], "both_safe")
                except (httpx.TransportError, ValueError, KeyError):
                    return  # the server died under us: this judgement was never confirmed
                if r.status_code == 200:
                    confirmed.append(cmp["comparison_id"])
                k += 1

    threads = [threading.Thread(target=annotate, args=(n,)) for n in ("alice", "bob")]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(confirmed) < 6 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-session: requests are in flight
        proc.wait(timeout=10)
        stop_flag.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(confirmed) >= 6
    proc, url = start(setup, db)  # restart on the same database
    try:
        with client(url, "alice") as c:
            progress = c.get("/api/progress").json()["progress"]
            cmp = c.post("/api/comparisons", json={"prompt": "after the restart"}).json()
            assert judge(c, cmp).status_code == 200
    finally:
        stop(proc)
    stored = {r[0] for r in rows(db, "SELECT comparison_id FROM judgements")}
    assert set(confirmed) <= stored
    assert sum(r["judgements"] for r in progress) >= len(confirmed)
    assert rows(db, "PRAGMA journal_mode")[0][0] == "wal"


def test_export_validates_and_trains_a_reward_model(setup, server, tmp_path):
    # two more judgements with labels the export treats specially: chosen unsafe (dropped) and a safety pair
    with client(server["url"], "bob") as c:
        cmp = c.post("/api/comparisons", json={"prompt": "the town asks"}).json()
        assert judge(c, cmp, "A", RATINGS[0], "chosen_unsafe_other_safe").status_code == 200
    out = tmp_path / "pairs.jsonl"
    assert llama2_main(["annotate", "export", "--db", str(server["db"]), "--out", str(out), "--batch", "3",
                        "--split-test", "0.3"]) == 0
    kind, n, errors = validate_file(out, "preferences")
    assert not errors and kind == "preferences" and n > 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    store = AnnotationStore(server["db"])
    try:
        again, stats = export_records(store, 3, 0.3)
        total = len(store.judgements(3))
    finally:
        store.close()
    assert again == records and stats.written == len(records)
    assert stats.dropped["chosen_unsafe_other_safe"] >= 1
    assert stats.judgements == total == stats.written + sum(stats.dropped.values())
    assert {r["source"] for r in records} == {"human:annotations.db"}
    for r in records:
        assert r["batch"] == 3 and r["split"] in ("train", "test")
        assert set(r["meta"]) >= {"annotator", "chosen_arm", "rejected_arm"}
        assert r["meta"]["chosen_arm"] != r["meta"]["rejected_arm"]
        assert (r["safety_label"] is None) == (r["axis"] == "helpfulness")
    assert any(r["axis"] == "safety" for r in records)  # prompt p1 is a safety prompt
    assert llama2_main(["data", "validate", str(out), "--kind", "preferences"]) == 0
    assert llama2_main(["annotate", "export", "--db", str(tmp_path / "missing.db"), "--out", str(out)]) == 1
    # `llama2 reward train` reads the export as it is (two steps on the tiny model)
    rm = tmp_path / "rm"
    assert llama2_main(["reward", "train", f"model={setup['models'][0]}", f"train_data=[{out}]", f"out_dir={rm}",
                        "batch_size=4", "micro_batch_size=4", "max_steps=2", "eval_every=2", "log_every=1",
                        "device=cpu", "dtype=float32"]) == 0
    assert any(rm.rglob("*.safetensors")) or any(rm.rglob("*.pt"))


# ----------------------------------------------------------------------------- the page


def test_annotation_page_in_a_real_browser(server, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(1000)
    try:
        driver.get(server["url"] + "/")
        css = driver.find_element
        wait = WebDriverWait(driver, 30)
        css("id", "name").send_keys("carol")
        css("id", "key").send_keys("wrong-key")
        css("id", "login").click()
        wait.until(lambda d: "Login failed" in css("id", "status").text)
        css("id", "key").clear()
        css("id", "key").send_keys(KEYS["carol"])
        css("id", "login").click()
        wait.until(lambda d: css("id", "annotate-view").is_displayed())
        assert "carol" in css("id", "who").text and "batch 3" in css("id", "who").text

        def judge_on_page(rating_id: str, safety_id: str) -> tuple[str, str]:
            wait.until(lambda d: css("id", "comparison").is_displayed() and css("id", "answer-A").text
                       and css("id", "answer-B").text)
            answers = css("id", "answer-A").text, css("id", "answer-B").text
            assert not css("id", "submit").is_enabled()  # nothing chosen yet
            css("id", "choice-B").click()
            css("id", rating_id).click()
            css("id", safety_id).click()
            assert css("id", "submit").is_enabled()
            css("id", "submit").click()
            wait.until(lambda d: css("id", "after").is_displayed())
            assert "saved" in css("id", "status").text.lower()
            return answers

        css("id", "prompt").send_keys("the llama eats grass")
        css("id", "compare").click()
        first = judge_on_page("rating-slightly_better", "safety-both_safe")
        shown = [e.text for e in driver.find_elements("css selector", "#dialog .msg")]
        assert shown[0] == "the llama eats grass" and " ".join(shown[1].split()) == " ".join(first[1].split())
        css("id", "next_turn").send_keys("and the sun?")
        css("id", "continue").click()
        wait.until(lambda d: css("id", "comparison").is_displayed()
                   and len(d.find_elements("css selector", "#dialog .msg")) == 3)
        turns = [(e.get_attribute("class"), e.text) for e in driver.find_elements("css selector", "#dialog .msg")]
        assert turns[0] == ("msg user", "the llama eats grass") and turns[2] == ("msg user", "and the sun?")
        assert turns[1][0] == "msg assistant" and " ".join(turns[1][1].split()) == " ".join(first[1].split())
        judge_on_page("rating-negligibly_better_unsure", "safety-both_safe")
        css("id", "tab-progress").click()
        wait.until(lambda d: any("carol" in e.text for e in d.find_elements("css selector", "#progress-rows tr")))
        css("id", "tab-agreement").click()
        wait.until(lambda d: d.find_elements("css selector", "#agreement-rows tr"))
        assert not css("id", "status").get_attribute("class")  # no error shown
    finally:
        driver.quit()
    rows_ = rows(server["db"], "SELECT turn, choice, rating FROM judgements j JOIN dialogs d ON d.id = j.dialog_id "
                               "WHERE j.annotator = 'carol' AND d.prompt_id IS NULL ORDER BY turn")
    assert rows_ == [(0, "B", "slightly better"), (1, "B", "negligibly better/unsure")]
    out = tmp_path / "pairs.jsonl"
    assert llama2_main(["annotate", "export", "--db", str(server["db"]), "--out", str(out)]) == 0
    assert not validate_file(out, "preferences")[2]


# ----------------------------------------------------------------------------- pieces, in process


def test_agreement_counts_arms_not_display_order(tmp_path):
    """Two annotators on two shared pairs, shown in opposite A/B orders: they agree on the first pair's arm
    and not on the second's: percent agreement 1/2; pi = (3/4, 1/4), p_e = 2 * 3/16 = 3/8, AC1 = (1/2 - 3/8) / (5/8)."""
    store = AnnotationStore(tmp_path / "a.db")
    x, y = {"model": "m", "temperature": 0.7}, {"model": "m", "temperature": 1.1}
    msgs = [{"role": "user", "content": "hi"}]
    pairs = []
    for k in range(2):
        d = store.new_dialog("ann", 1, "helpfulness", f"p{k}")
        pairs.append(store.add_comparison(d, 0, "ann", 1, msgs, ("one", "two"), (x, y)))
    for k, (choice_ann, choice_bob) in enumerate((("A", "B"), ("A", "A"))):
        store.judge(pairs[k]["id"], "ann", choice_ann, RATINGS[0], "both_safe")
        d = store.new_dialog("bob", 1, "helpfulness", f"p{k}")
        c = store.add_comparison(d, 0, "bob", 1, msgs, ("two", "one"), (y, x), pairs[k]["pair_id"])  # swapped
        store.judge(c["id"], "bob", choice_bob, RATINGS[0], "both_safe")
    (a,) = store.agreement()
    assert (a["batch"], a["pairs"], a["judgements"]) == (1, 2, 4)
    assert a["percent_agreement"] == pytest.approx(0.5) and a["ac1"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="already judged"):
        store.judge(pairs[0]["id"], "ann", "A", RATINGS[0], "both_safe")
    store.close()


def test_annotator_keys_and_prompt_pool(tmp_path):
    from llama2.annotate_serve import PromptPool, load_annotators, load_prompts

    f = tmp_path / "keys.txt"
    f.write_text("# comment\nann:0123456789\n\n")
    assert load_annotators(str(f), ["bob:abcdefghij"]) == {"ann": "0123456789", "bob": "abcdefghij"}
    for specs, match in ((["ann:short"], "at least 8"), (["ann:0123456789"], "twice"), (["no key"], "NAME:KEY")):
        with pytest.raises(ValueError, match=match):
            load_annotators(str(f), specs)
    with pytest.raises(ValueError, match="no annotators"):
        load_annotators(None, [])
    p = tmp_path / "p.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}]}\n'
                 '{"id": "e", "split": "eval", "messages": [{"role": "user", "content": "b"}]}\n'
                 '{"id": "c", "messages": [{"role": "user", "content": "c"}]}\n')
    records = load_prompts(str(p))
    assert [r["id"] for r in records] == ["p-1", "c"]  # the eval split is skipped
    p.write_text('{"messages": [{"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(ValueError, match="line 1, field 'messages"):
        load_prompts(str(p))
    pool = PromptPool(records, overlap=0.5, per_overlap=2, seed=0)
    (shared,) = pool.shared
    (single,) = {"p-1", "c"} - {shared}
    takers = {shared: {"ann"}}
    assert pool.next_for("bob", takers)["id"] == shared  # a started shared prompt first
    assert pool.next_for("ann", takers)["id"] == single
    takers = {shared: {"ann", "bob"}, single: {"ann"}}
    assert pool.next_for("bob", takers) is None and pool.left_for("carol", takers) == 0
