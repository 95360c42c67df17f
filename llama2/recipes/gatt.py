"""Ghost Attention (Llama 2 §3.3): teach the model to keep a system instruction for a whole dialog.

    llama2 rlhf gatt --config configs/rlhf/gatt_tiny.yaml policy=RUN/v2/ppo/final [key=value ...] [--resume]

The paper's recipe, step by step (RUN = out_dir):
  1. instructions: synthetic constraints — the built-in world's language / public figure / hobby
     constraints and their combinations, half of them in the short form ("Figure: Napoleon") — or
     your own JSONL file of instructions, each optionally naming its checker `module:function`;
  2. synthetic dialogs: the user turns of multi-turn SFT dialogs; every assistant answer is sampled
     from the policy (the latest RLHF model in the paper) turn by turn, with the instruction
     concatenated to every user message. An answer that breaks the instruction (by its checker) is
     re-sampled up to `retries` times, then the dialog is dropped — counted in RUN/stats.json;
  3. training data: the instruction only in the first turn (as the system message, the paper's
     choice, or prepended to the first user message), the loss zero on every token of earlier
     turns, assistant turns included: only the last answer trains (`meta.train_last_turn_only`).
     Written to RUN/data/gatt.jsonl, optionally mixed with other SFT dialogs (`mix_data`);
  4. fine-tune with the SFT recipe (packing, FSDP, exact resume): RUN/sft/final, RUN/final -> it.
The multi-turn evaluation is `llama2 evaluate multi-turn` (llama2/recipes/multi_turn.py).
"""
from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from llama2.chat_format import SPECIAL_TAGS
from llama2.config import ConfigError, load_object
from llama2.inference import load_for_inference
from llama2.recipes.common import open_run, recipe_cli, write_atomic, write_jsonl_atomic
from llama2.recipes.rejection_sampling import fine_tune_on
from llama2.recipes.sft import SFTConfig, load_dialogs
from llama2.sampling import DialogSampler
from llama2.train import derive_seed
from llama2.world import gatt as world_gatt

WORLD_CHECKER = "llama2.world.gatt:check"
Checker = Callable[[str, str], bool]
# answer_fn(dialogs, seed) -> one (text, complete) per dialog (each dialog ends with a user turn)
AnswerFn = Callable[[list[list[dict]], int], list[tuple[str, bool]]]


def gatt_sft() -> SFTConfig:
    # §3.3: the GAtt data is fine-tuned on "similar to Rejection Sampling", i.e. like SFT with the
    # SFT recipe's paper defaults; model, train_data and out_dir are filled in by the recipe.
    return SFTConfig(out_dir="")


@dataclass
class GattConfig:
    out_dir: str = "runs/gatt"
    policy: str = ""  # the model that samples the answers and is fine-tuned (§3.3: the latest RLHF model); required
    dialogs: list[str] = field(default_factory=list)  # SFT dialog files whose user turns are reused; required
    split: str = "train"  # only dialogs of this split
    tasks: list[str] = field(default_factory=list)  # only dialogs of these tasks ([] = all)
    min_user_turns: int = 2  # dialogs with fewer user turns are not GAtt dialogs (counted)
    # Also build dialogs of this many user turns from the user messages of the shorter dialogs, on
    # unrelated topics one after another (not in the paper, whose dialog data was multi-turn; 0 = off).
    stitch_turns: int = 0
    max_dialogs: int = 0  # 0 = all; else a seeded subset
    # "world": the built-in world's constraints; else a JSONL file, one {"instruction": ...,
    # "checker": "module:function" (optional), "kind": ... (optional)} per line.
    instructions: str = "world"
    constraint_kinds: list[str] = field(default_factory=lambda: list(world_gatt.KINDS))  # world kinds to train on
    hold_out: list[str] = field(default_factory=list)  # world constraint values never trained on (e.g. [napoleon])
    max_constraints: int = 3  # world instructions combine 1..this many kinds (§3.3: combinations)
    short_share: float = 0.5  # §3.3: half the instructions in the short form ("Figure: Napoleon")
    system_message: bool = True  # §3.3: the instruction as the system message; false = before the first user message
    every_turn: bool = False  # one training dialog per prefix (each answer trained once); §3.3: the whole dialog
    temperature: float = 1.0  # sampling the answers (the paper's rejection-sampling temperatures)
    top_p: float = 1.0
    max_new_tokens: int = 64
    retries: int = 4  # re-samples of an answer that breaks its instruction before the dialog is dropped
    # Not in the paper, off by default: `module:function(instruction, answer, rng) -> answer` rewriting
    # an answer still failing after the retries, instead of dropping its dialog (e.g. the world's
    # llama2.world.gatt:comply, for a model too small to follow instructions even when repeated).
    repair: str = ""
    mix_data: list[str] = field(default_factory=list)  # other SFT dialogs to mix into the fine-tuning set
    mix_share: float = 0.0  # their share of the fine-tuning set (§3.3: GAtt data alone)
    sample_batch_size: int = 32
    sft: SFTConfig = field(default_factory=gatt_sft)  # the fine-tuning step (llama2 sft's options)
    seed: int = 0
    device: str = "auto"


@dataclass
class Instruction:
    text: str
    checker: Checker | None  # None: used for training, never checked or evaluated
    checker_name: str
    kind: str  # for reports: the world's constraint kinds ("figure+hobby") or the file's "kind"
    id: str


# ----------------------------------------------------------------------------- instructions


def read_instructions(path: str) -> list[Instruction]:
    """Instructions from a JSONL file; errors name the file, line and field."""
    out, checkers = [], {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"instructions: cannot read {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ConfigError(f"{where}: expected an object, got {type(rec).__name__}")
        text = rec.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: field 'instruction': a non-empty string is required")
        unknown = sorted(set(rec) - {"instruction", "checker", "kind", "id"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} "
                              "(expected instruction, checker, kind, id)")
        name = rec.get("checker") or ""
        if not isinstance(name, str):
            raise ConfigError(f"{where}: field 'checker': expected a `module:function` string")
        if name and name not in checkers:
            try:
                checkers[name] = load_object(name, f"{where}: field 'checker'")
            except ConfigError:
                raise
            except ImportError as e:
                raise ConfigError(f"{where}: field 'checker': cannot import {name!r}: {e}") from None
            if not callable(checkers[name]):
                raise ConfigError(f"{where}: field 'checker': {name!r} is not a function")
        out.append(Instruction(text.strip(), checkers.get(name), name, str(rec.get("kind") or "custom"),
                               str(rec.get("id") or f"line-{n}")))
    if not out:
        raise ConfigError(f"instructions: {path} holds no instruction")
    return out


def world_instruction(rng: random.Random, kinds: list[str], hold_out: list[str] = (), max_constraints: int = 3,
                      short_share: float = 0.5, must: str | None = None) -> Instruction:
    """A random world instruction: 1..max_constraints distinct kinds of `kinds` (`must` among them
    if given), values not in `hold_out`, in the short form with probability `short_share` (§3.3)."""
    values = {"language": sorted(world_gatt.LANGUAGES), "figure": sorted(world_gatt.FIGURES),
              "hobby": list(world_gatt.HOBBIES)}
    pools = {k: [v for v in values[k] if v not in hold_out] for k in kinds}
    usable_kinds = [k for k in kinds if pools[k]]
    if not usable_kinds or (must is not None and must not in usable_kinds):
        raise ConfigError(f"constraint kinds {kinds} with hold_out {list(hold_out)} leave no {must or ''} constraint")
    n = rng.randint(1, max(1, min(max_constraints, len(usable_kinds))))
    if must is None:
        chosen = rng.sample(usable_kinds, n)
    else:
        chosen = [must] + rng.sample([k for k in usable_kinds if k != must], n - 1)
    chosen = sorted(chosen, key=world_gatt.KINDS.index)
    constraints = tuple(world_gatt.Constraint(k, rng.choice(pools[k])) for k in chosen)
    text = world_gatt.render(constraints, rng, short=rng.random() < short_share)
    return Instruction(text, world_gatt.check, WORLD_CHECKER, "+".join(chosen),
                       "+".join(f"{c.kind}:{c.value}" for c in constraints))


def check_kinds(kinds: list[str], where: str) -> None:
    bad = [k for k in kinds if k not in world_gatt.KINDS]
    if bad or not kinds:
        raise ConfigError(f"{where}: {bad or kinds} — expected a non-empty list of {', '.join(world_gatt.KINDS)}")


# ----------------------------------------------------------------------------- data construction


def sampling_dialog(instruction: str, users: list[str], answers: list[str]) -> list[dict]:
    """The dialog turn len(answers)+1 is sampled from: the instruction concatenated to every user
    message (§3.3), the earlier answers as sampled."""
    if len(answers) >= len(users):
        raise ValueError(f"{len(answers)} answers for {len(users)} user turns: nothing left to sample")
    messages = []
    for i, question in enumerate(users[: len(answers) + 1]):
        messages.append({"role": "user", "content": f"{instruction}\n{question}"})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def instructed_dialog(instruction: str, users: list[str], answers: list[str], system_message: bool = True) -> list[dict]:
    """The instruction once, in the first turn: as the system message, or before the first user
    message; then the user turns as they were and the answers (len(answers) <= len(users))."""
    messages = [{"role": "system", "content": instruction}] if system_message else []
    for i, question in enumerate(users):
        first = i == 0 and not system_message
        messages.append({"role": "user", "content": f"{instruction}\n{question}" if first else question})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def training_records(instruction: str, users: list[str], answers: list[str], pid: str, system_message: bool = True,
                     every_turn: bool = False, source: str = "gatt") -> list[dict]:
    """SFT dialog records (§3.3): the instruction only in the first turn, the loss on the last
    answer only (`meta.train_last_turn_only`). `every_turn`: one record per prefix."""
    if len(users) != len(answers) or not users:
        raise ValueError(f"{len(users)} user turns but {len(answers)} answers")
    ends = range(1, len(users) + 1) if every_turn else (len(users),)
    return [{"id": f"{pid}-t{end}", "split": "train", "source": source, "task": "gatt",
             "messages": instructed_dialog(instruction, users[:end], answers[:end], system_message),
             "meta": {"train_last_turn_only": True}} for end in ends]


def user_turns(records: list[dict], min_user_turns: int, stitch_turns: int, stats: dict) -> list[tuple[str, list[str]]]:
    """(id, user messages) of every dialog with enough user turns; with `stitch_turns`, also
    dialogs made of the shorter dialogs' user messages in order. Dialogs with no user turn, and
    those with too few (used only when stitched), are counted in `stats['skipped']`."""
    out, loose = [], []
    for n, rec in enumerate(records):
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        if not users:
            stats["skipped"]["no user turn"] = stats["skipped"].get("no user turn", 0) + 1
        elif len(users) >= min_user_turns:
            out.append((str(rec.get("id", n)), users))
        else:
            loose += users
    key = "stitched: dialogs with too few user turns" if stitch_turns else "too few user turns"
    if loose:
        stats["skipped"][key] = len([r for r in records if 0 < sum(m["role"] == "user" for m in r["messages"])
                                     < min_user_turns])
    if stitch_turns:
        for i in range(0, len(loose) - stitch_turns + 1, stitch_turns):
            out.append((f"stitched-{i // stitch_turns}", loose[i:i + stitch_turns]))
    return out


def usable(text: str) -> bool:
    """An answer can be trained on: not empty, and no chat tag that would forge a turn."""
    return bool(text.strip()) and not any(tag in text for tag in SPECIAL_TAGS)


def synthesize(dialogs: list[tuple[str, list[str], Instruction]], answer_fn: AnswerFn, fits: Callable[[list[dict]], bool],
               retries: int, seed: int, repair: Callable | None = None, log: Callable[[str], None] = lambda s: None
               ) -> tuple[list[tuple[str, list[str], list[str], Instruction]], dict]:
    """Step 2: every answer sampled turn by turn with the instruction on every user message; one
    that breaks the instruction (or is cut off, empty, or forges a turn) is re-sampled up to
    `retries` times, then repaired (`repair`) or its dialog dropped. A dialog whose next prompt
    does not fit the context stops there (and is skipped if not even its first turn fits).
    Returns (id, users, answers, instruction) of the kept dialogs and the counts."""
    stats = {"dialogs": len(dialogs), "answers": 0, "samples": 0, "resampled": 0, "repaired": 0,
             "dropped_broke_instruction": 0, "skipped_longer_than_context": 0, "shortened_by_context": 0,
             "first_try_pass": 0}
    answers: list[list[str]] = [[] for _ in dialogs]
    users: list[list[str]] = [list(u) for _, u, _ in dialogs]
    alive = set(range(len(dialogs)))
    turn = 0
    rng = random.Random(seed)
    while True:
        todo = sorted(i for i in alive if turn < len(users[i]))
        if not todo:
            break
        ready = []
        for i in todo:
            if fits(sampling_dialog(dialogs[i][2].text, users[i], answers[i])):
                ready.append(i)
            else:  # the context is full: the dialog ends with the answers it has
                users[i] = users[i][:turn]
                if turn == 0:
                    alive.discard(i)
                    stats["skipped_longer_than_context"] += 1
                else:
                    stats["shortened_by_context"] += 1
        pending = ready
        for attempt in range(retries + 1):
            if not pending:
                break
            outs = answer_fn([sampling_dialog(dialogs[i][2].text, users[i], answers[i]) for i in pending],
                             derive_seed(seed, turn, attempt))
            stats["samples"] += len(pending)
            if attempt:
                stats["resampled"] += len(pending)
            left = []
            for i, (text, complete) in zip(pending, outs):
                ins = dialogs[i][2]
                text = text.strip()
                if complete and usable(text) and (ins.checker is None or ins.checker(ins.text, text)):
                    answers[i].append(text)
                    stats["first_try_pass"] += attempt == 0
                else:
                    left.append((i, text))
            pending = [i for i, _ in left]
        for i, text in (left if pending else []):
            ins = dialogs[i][2]
            fixed = repair(ins.text, text or "OK.", rng) if repair is not None else None
            if fixed is not None and usable(fixed) and (ins.checker is None or ins.checker(ins.text, fixed)):
                answers[i].append(fixed.strip())
                stats["repaired"] += 1
            else:
                alive.discard(i)
                stats["dropped_broke_instruction"] += 1
        log(f"turn {turn + 1}: {len(ready)} answers, {len(alive)} dialogs left")
        turn += 1
    kept = [(dialogs[i][0], users[i], answers[i], dialogs[i][2]) for i in sorted(alive) if answers[i]]
    stats["kept"] = len(kept)
    stats["answers"] = sum(len(a) for _, _, a, _ in kept)
    stats["first_try_pass_rate"] = stats["first_try_pass"] / stats["samples"] if stats["samples"] else 0.0
    return kept, stats


def model_answer_fn(sampler: DialogSampler, temperature: float, top_p: float, max_new_tokens: int) -> AnswerFn:
    """Answers from a checkpoint (temperature 0: greedy)."""
    def answer(dialogs: list[list[dict]], seed: int) -> list[tuple[str, bool]]:
        outs = sampler.sample(dialogs, 1, temperature, top_p, max_new_tokens, seed)
        return [(o[0].text, o[0].finish_reason != "length") for o in outs]
    return answer


def context_check(sampler: DialogSampler, max_seq_len: int, max_new_tokens: int) -> Callable[[list[dict]], bool]:
    """Does a dialog's prompt leave room for a whole answer in the context?"""
    return lambda dialog: len(sampler.format.prompt_ids(dialog)) + max_new_tokens <= max_seq_len


# ----------------------------------------------------------------------------- the recipe

RESUME_KEYS = ["policy", "dialogs", "split", "tasks", "min_user_turns", "stitch_turns", "max_dialogs", "instructions",
               "constraint_kinds", "hold_out", "max_constraints", "short_share", "system_message", "every_turn",
               "temperature", "top_p", "max_new_tokens", "retries", "repair", "mix_data", "mix_share",
               "sft.chat_format", "seed"]


def say(text: str) -> None:
    print(f"[gatt] {text}", file=sys.stderr, flush=True)


def check_config(cfg: GattConfig) -> None:
    if not cfg.policy:
        raise ConfigError("policy: the model to sample from and fine-tune is required (e.g. policy=runs/sft/final)")
    if not cfg.dialogs:
        raise ConfigError("dialogs: at least one SFT dialog file is required (e.g. WORLD/sft/train.jsonl)")
    if cfg.instructions == "world":
        check_kinds(cfg.constraint_kinds, "constraint_kinds")
    if not 0.0 <= cfg.short_share <= 1.0:
        raise ConfigError(f"short_share={cfg.short_share}: expected a share in [0, 1]")
    if not 0.0 <= cfg.mix_share < 1.0:
        raise ConfigError(f"mix_share={cfg.mix_share}: expected a share in [0, 1)")
    if cfg.mix_share > 0 and not cfg.mix_data:
        raise ConfigError("mix_share > 0 needs mix_data (SFT dialog files)")
    if cfg.retries < 0 or cfg.min_user_turns < 1 or cfg.stitch_turns < 0:
        raise ConfigError("retries >= 0, min_user_turns >= 1 and stitch_turns >= 0 are required")


def build_dialogs(cfg: GattConfig, stats: dict) -> list[tuple[str, list[str], Instruction]]:
    """Steps 1-2's inputs: the dialogs' user turns, each with its instruction (seeded)."""
    records = [r for r in load_dialogs(cfg.dialogs, cfg.split) if not cfg.tasks or r.get("task") in cfg.tasks]
    turns = user_turns(records, cfg.min_user_turns, cfg.stitch_turns, stats)
    rng = random.Random(derive_seed(cfg.seed, 1))
    if cfg.max_dialogs and len(turns) > cfg.max_dialogs:
        turns = rng.sample(turns, cfg.max_dialogs)
    if not turns:
        raise ConfigError(f"dialogs: no dialog of split {cfg.split!r} with >= {cfg.min_user_turns} user turns in "
                          f"{cfg.dialogs} (skipped: {stats['skipped']}); lower min_user_turns or set stitch_turns")
    if cfg.instructions == "world":
        return [(pid, users, world_instruction(rng, cfg.constraint_kinds, cfg.hold_out, cfg.max_constraints,
                                               cfg.short_share)) for pid, users in turns]
    pool = read_instructions(cfg.instructions)
    return [(pid, users, rng.choice(pool)) for pid, users in turns]


def mixed_in(cfg: GattConfig, n_gatt: int) -> list[dict]:
    """`mix_share` of the fine-tuning set drawn (seeded) from `mix_data`."""
    if cfg.mix_share <= 0:
        return []
    pool = load_dialogs(cfg.mix_data, cfg.split)
    want = round(n_gatt * cfg.mix_share / (1 - cfg.mix_share))
    return random.Random(derive_seed(cfg.seed, 2)).sample(pool, min(want, len(pool)))


def make_data(cfg: GattConfig, out: Path) -> dict:
    """Steps 1-3: RUN/data/gatt.jsonl and RUN/stats.json (read back when already written)."""
    data, stats_path = out / "data" / "gatt.jsonl", out / "stats.json"
    if data.is_file() and stats_path.is_file():
        say(f"data already made: {data}")
        return json.loads(stats_path.read_text())
    stats: dict = {"skipped": {}}
    dialogs = build_dialogs(cfg, stats)
    model, tok = load_for_inference(cfg.policy, cfg.device)
    sampler = DialogSampler(model, tok, cfg.sft.chat_format, cfg.sample_batch_size)
    max_seq_len = min(cfg.sft.seq_len, model.args.max_seq_len)
    repair = load_object(cfg.repair, "repair") if cfg.repair else None
    say(f"{len(dialogs)} dialogs ({sum(len(u) for _, u, _ in dialogs)} user turns); sampling every answer with "
        f"the instruction on every user turn (T={cfg.temperature}, up to {cfg.retries} re-samples)")
    t0 = time.perf_counter()
    kept, sampled = synthesize(dialogs, model_answer_fn(sampler, cfg.temperature, cfg.top_p, cfg.max_new_tokens),
                               context_check(sampler, max_seq_len, cfg.max_new_tokens), cfg.retries, cfg.seed,
                               repair, say)
    del sampler, model
    if not kept:
        raise ValueError(f"no dialog kept: every one broke its instruction after {cfg.retries} re-samples or did not "
                         f"fit the context ({sampled}); raise retries, or set repair (see docs/rlhf.md)")
    records = []
    for pid, users, answers, ins in kept:
        for r in training_records(ins.text, users, answers, f"gatt-{pid}", cfg.system_message, cfg.every_turn):
            r["meta"]["instruction_kind"] = ins.kind
            records.append(r)
    mix = mixed_in(cfg, len(records))
    write_jsonl_atomic(data, records + mix)
    kinds: dict[str, int] = {}
    for _, _, _, ins in kept:
        kinds[ins.kind] = kinds.get(ins.kind, 0) + 1
    stats.update(sampled)
    stats.update({"training_records": len(records), "mixed_in": len(mix), "kinds": kinds,
                  "unchecked_instructions": sum(ins.checker is None for _, _, _, ins in kept),
                  "seconds_sampling": round(time.perf_counter() - t0, 2), "data": str(data)})
    write_atomic(stats_path, json.dumps(stats, indent=1) + "\n")
    say(f"kept {stats['kept']} of {stats['dialogs']} dialogs ({stats['answers']} answers; {stats['resampled']} "
        f"re-samples, {stats['repaired']} repaired, {stats['dropped_broke_instruction']} dropped for breaking the "
        f"instruction, {stats['skipped_longer_than_context']} longer than the context); {len(records)} training "
        f"dialogs + {len(mix)} mixed in -> {data}")
    return stats


def main(cfg: GattConfig, resume: bool = False) -> int:
    check_config(cfg)
    out = Path(cfg.out_dir)
    open_run(out, cfg, resume, RESUME_KEYS, "GAtt")
    make_data(cfg, out)
    final = fine_tune_on(cfg.policy, cfg.sft, out / "data" / "gatt.jsonl", out, "gatt")
    link = out / "final"
    print(f"[gatt] done: {link} -> {final}  (evaluate it: llama2 evaluate multi-turn --model {link} "
          f"--baseline {cfg.policy})", flush=True)
    return 0


def run(policy: str, sft_dialogs: list[str], out_dir: str | Path, cfg: GattConfig) -> Path:
    """What the pipeline calls: GAtt on `policy` with the user turns of `sft_dialogs`, in `out_dir`
    (resumed when it already holds a run). Returns the fine-tuned model's path."""
    out = Path(out_dir)
    cfg = replace(cfg, policy=str(policy), dialogs=[str(p) for p in sft_dialogs], out_dir=str(out))
    main(cfg, resume=(out / "config.yaml").is_file())
    return out / "sft" / "final"


def cli(argv: list[str]) -> int:
    return recipe_cli(argv, GattConfig, main, "llama2 rlhf gatt", __doc__.split("\n\n")[0])
